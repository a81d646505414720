"""``python -m ddim_fast bench``: every loop of :mod:`harness.loops` on the same problem, proven, then timed in
interleaved rounds; the report (it/s, ms per step, the non-UNet time per step, agreement with the diffusers
loop) as a dict, a table and JSON.

Each variant proves what its name says before it is timed (``report['proofs']``; see :func:`run_bench`):
fused step ops counted at the dispatcher, one per UNet forward; for ``+attn`` a ddim_fast attention op for
every fused attention module of every forward and no SDPA/softmax there; really captured graphs and one
replay per step for ``+graph``. Outputs must agree with the diffusers loop (fp32: 1e-5 relative; fp16/bf16:
``RUN_TOLERANCES``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from ddim_fast import reference
from ddim_fast.tools.problems import DTYPES, resolve_device, unet_problem
from harness.loops import (RUN_TOLERANCES, VARIANT_EXPECTATIONS, Variant, graphed_unet_only_loop, time_call,
                           unet_only_loop)

logger = logging.getLogger(__name__)


def run_bench(model: str = "tiny-unet", *, steps: int = 50, batch: int = 1, dtype: str = "fp32",
              guidance: float = 7.5, resolution: int | None = None, device: str | None = None,
              repeats: int = 3, seed: int = 0, backend: str = "auto", variants: tuple[str, ...] | None = None,
              check: bool = True, noise_mode: str = "torch") -> dict[str, Any]:
    """Time every loop on the same problem; returns the JSON-able result (see module docstring).

    Every variant proves what it ran (``report['proofs']``) before it is timed: its first call (the
    warm-up: graph capture, compiles) runs under an :class:`OpCounter` and a :class:`ForwardCounter` on its
    UNet, and must show one fused step op per UNet forward exactly where the name says "fast", a
    ddim_fast attention op for every attention module of every forward (and no SDPA / softmax) exactly
    where it says "attn", and only really captured CUDA graphs where it says "graph" (or "attn" on GPU);
    every timed call is checked too (UNet forwards and graph replays per call). A variant whose proof
    fails is reported as failed and its times are dropped. With ``check``, a failed proof or an output
    that disagrees with the diffusers loop raises AssertionError."""
    from ddim_fast.tools import info

    dev = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    problem = unet_problem(model, dev, torch_dtype, batch=batch, steps=steps, guidance=guidance,
                           resolution=resolution, seed=seed)
    if variants is None:
        variants = ("diffusers", "fast", "fast+graph", "fast+attn") if dev.type == "cuda" else (
            "diffusers", "fast", "fast+attn")
    for name in variants:
        if name not in VARIANT_EXPECTATIONS:
            raise ValueError(f"unknown bench variant {name!r}; expected one of {', '.join(VARIANT_EXPECTATIONS)}")
    tol = RUN_TOLERANCES[torch_dtype]

    results: dict[str, Any] = {}
    outputs: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    notes: dict[str, str] = {}
    proofs: dict[str, Any] = {}
    loops: dict[str, Variant] = {}
    built: list[Variant] = []
    try:
        for name in variants:
            variant = None
            try:
                variant = Variant.build(problem, name, backend=backend, noise_mode=noise_mode)
                if isinstance(variant, str):
                    skipped[name] = variant
                    continue
                built.append(variant)
                outputs[name] = variant.first_call(seed)
            except ValueError:
                raise
            except Exception as exc:  # one broken variant must not hide the others' numbers; reported as failed
                if isinstance(variant, Variant) and variant.proof:
                    proofs[name] = variant.proof
                if check:
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"
                outputs.pop(name, None)
                logger.debug("bench variant %s failed", name, exc_info=True)
                continue
            proofs[name] = variant.proof
            loops[name] = variant
        floors: dict[str, Callable[[], Any]] = {"unet": lambda: unet_only_loop(problem)}
        if dev.type == "cuda" and any(v.expect.graph for v in loops.values()):
            try:
                floors["unet_graph"] = graphed_unet_only_loop(problem)
            except RuntimeError as exc:  # capture failed: compare the graph loops with the eager UNet instead
                logger.warning("could not capture the UNet alone in a CUDA graph (%s); using the eager UNet time",
                               exc)
        for fn in floors.values():
            fn()

        # Interleaved rounds (every loop once per round, the UNet alone too) so that a slow spell of the
        # machine hits all of them alike; the best round of each is reported. Every timed call of a loop is
        # checked (UNet forwards, graph replays): what was timed is what the proof run showed.
        times: dict[str, list[float]] = {name: [] for name in [*loops, *floors]}
        for _ in range(repeats):
            for name, fn in [*loops.items(), *floors.items()]:
                if name in loops and not proofs[name]["ok"]:
                    continue
                try:
                    times[name] += time_call(fn, dev, 1, warmup=0)
                except AssertionError as exc:
                    if check:
                        raise
                    failed[name] = f"AssertionError: {exc}"
    finally:
        for variant in built:
            variant.close()
    for name in list(loops):
        if not proofs[name]["ok"]:
            del loops[name]
    unet_ms = min(times["unet"]) / steps * 1e3
    unet_graph_ms = min(times["unet_graph"]) / steps * 1e3 if "unet_graph" in times else None
    for name, variant in loops.items():
        best = min(times[name])
        # Graph-captured loops are compared with the graph-captured UNet (no launch overhead in either).
        floor = unet_graph_ms if (unet_graph_ms is not None and variant.expect.graph) else unet_ms
        results[name] = {
            "seconds": best, "seconds_all": times[name], "it_per_s": steps / best, "ms_per_step": best / steps * 1e3,
            "unet_floor_ms_per_step": floor, "non_unet_ms_per_step": best / steps * 1e3 - floor,
            "cuda_graph": variant.expect.graph, "fused_attention": variant.expect.fused_attention,
        }
        results[name]["non_unet_fraction"] = results[name]["non_unet_ms_per_step"] / results[name]["ms_per_step"]

    baseline = "diffusers" if "diffusers" in results else next(iter(results), None)
    for name, res in results.items():
        res["speedup_vs_" + baseline] = results[baseline]["seconds"] / res["seconds"] if baseline else float("nan")
        if baseline and name != baseline:
            res["rel_error_vs_" + baseline] = reference.relative_error(outputs[name], outputs[baseline])

    report = {
        "kind": "bench",
        "date": time.strftime("%Y-%m-%d"),
        "environment": info.environment_summary(dev),
        "config": {"model": model, "steps": steps, "batch": batch, "dtype": dtype, "guidance": guidance,
                   "latent": list(problem.x_T.shape[1:]), "device": str(dev), "repeats": repeats,
                   "backend": backend, "noise_mode": noise_mode, "seed": seed, "tolerance": tol},
        "unet_only_ms_per_step": unet_ms,
        "unet_graph_ms_per_step": unet_graph_ms,
        "results": results,
        "proofs": proofs,
        "skipped": skipped,
        "failed": failed,
        "notes": notes,
        "baseline": baseline,
    }
    if check:
        bad = {n: r["rel_error_vs_" + baseline] for n, r in results.items()
               if n != baseline and not r["rel_error_vs_" + baseline] <= tol}
        report["agree"] = not bad
        if bad:
            raise AssertionError(
                f"outputs disagree with the {baseline} loop beyond {tol:.0e} ({dtype}): "
                + ", ".join(f"{n}: {e:.3e}" for n, e in bad.items()))
    return report


def format_bench(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"bench: {cfg['model']}, {cfg['dtype']}, batch {cfg['batch']}, latent {'x'.join(map(str, cfg['latent']))}, "
        f"{cfg['steps']} steps, CFG {cfg['guidance']} on {report['environment']['hardware']}",
        f"UNet alone: {report['unet_only_ms_per_step']:.3f} ms per step"
        + (f" (CUDA graph: {report['unet_graph_ms_per_step']:.3f} ms)" if report.get("unet_graph_ms_per_step") else ""),
        f"{'loop':<14} {'it/s':>9} {'ms/step':>9} {'non-UNet ms/step':>17} {'non-UNet %':>10} "
        f"{'speedup':>8} {'rel err':>10}",
    ]
    base = report["baseline"]
    for name, r in report["results"].items():
        err = r.get("rel_error_vs_" + base)
        lines.append(
            f"{name:<14} {r['it_per_s']:>9.2f} {r['ms_per_step']:>9.3f} {r['non_unet_ms_per_step']:>17.3f} "
            f"{100 * r['non_unet_fraction']:>9.2f}% {r['speedup_vs_' + base]:>7.2f}x "
            f"{'-' if err is None else format(err, '.2e'):>10}")
    for name, why in report["skipped"].items():
        lines.append(f"{name:<14} skipped: {why}")
    for name, why in report.get("failed", {}).items():
        lines.append(f"{name:<14} FAILED: {why}")
    for name, why in report.get("notes", {}).items():
        lines.append(f"{name:<14} note: {why}")
    for name, proof in report.get("proofs", {}).items():
        if name in report["results"]:
            lines.append(f"{name:<14} proof: {proof_summary(proof)}")
    if "agree" in report:
        lines.append(f"agreement with {base} (tolerance {cfg['tolerance']:.0e}): "
                     f"{'PASS' if report['agree'] else 'FAIL'}")
    return "\n".join(lines)


def proof_summary(proof: dict[str, Any]) -> str:
    """One line: what a variant was shown to run."""
    parts = [f"{proof['unet_forwards']} UNet forwards", f"{proof['fused_step_ops']} fused step ops",
             f"{proof['fused_attention_ops']} fused attention ops / {proof['attention_modules']} modules",
             f"{proof['unfused_attention_ops']} unfused attention ops"]
    if proof.get("unserved_attention_modules"):
        parts.append(f"{len(proof['unserved_attention_modules'])} modules left unfused as optimize() leaves them")
    if proof.get("attention_backends"):
        parts.append("attention ran " + ", ".join(sorted(set(proof["attention_backends"].values()))))
    if proof["expect"]["graph"]:
        parts.append(f"{proof['graphs_captured']} CUDA graphs captured")
    if "timed_calls_checked" in proof:
        parts.append(f"{proof['timed_calls_checked']} timed calls checked")
    return ", ".join(parts) + (" (ok)" if proof["ok"] else " (FAILED)")




def check_agreement(report: dict[str, Any]) -> dict[str, Any]:
    """Fill report['agree'] (every loop within the dtype's tolerance of the baseline)."""
    base, tol = report["baseline"], report["config"]["tolerance"]
    report["agree"] = not report.get("failed") and all(
        r["rel_error_vs_" + base] <= tol for n, r in report["results"].items() if n != base)
    return report
