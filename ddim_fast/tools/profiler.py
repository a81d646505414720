"""``python -m ddim_fast profile``: latency of every DDIM step, split into the model call and the rest
(guidance combine + DDIM update), for the embedded model, a tiny UNet (CPU) or SD1.5's UNet (GPU).

Timing: CUDA events on GPU (read after one synchronisation at the end, so the loop is not perturbed),
``time.perf_counter`` on CPU. On GPU each step is an NVTX range ('ddim step i' > 'model') for Nsight
Systems. ``--trace`` writes a Chrome trace (torch.profiler), ``--plot`` a PNG of latency per step
(matplotlib), ``--json`` the table for machines.

With ``--cuda-graph`` the whole step is one replayed graph: the model call is then not observable per
step and only the step total is reported.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from typing import Any

import torch

from ddim_fast.tools import bench

logger = logging.getLogger(__name__)

MODELS = ("embedded", "tiny-unet", "sd15-unet")


def embedded_problem(device: torch.device, dtype: torch.dtype, *, batch: int = 4, steps: int = 50,
                     guidance: float | None = 3.0, size: int = 32, seed: int = 0) -> bench.Problem:
    """The demo's embedded model (exact denoiser of the glyph set), class-conditional with CFG."""
    from ddim_fast.tools import toy_data

    model = toy_data.EmbeddedLdmModel(size=size, device=device)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    x_T = torch.randn(batch, *model.image_shape, generator=gen).to(device, dtype)
    labels = [i % toy_data.NUM_CLASSES for i in range(batch)]
    cond = toy_data.class_embedding(labels, device=device)
    use_cfg = guidance not in (None, 1.0)
    uncond = toy_data.class_embedding(None, batch, device=device) if use_cfg else None
    return bench.Problem(model, x_T, cond, uncond, steps, guidance)


def build_problem(model: str, device: torch.device, dtype: torch.dtype, *, batch: int, steps: int,
                  guidance: float | None, resolution: int | None = None, seed: int = 0) -> bench.Problem:
    if model == "embedded":
        return embedded_problem(device, dtype, batch=batch, steps=steps, guidance=guidance, seed=seed)
    if model in bench.UNET_CONFIGS:
        if model == "sd15-unet" and device.type != "cuda":
            logger.warning("sd15-unet on the CPU is very slow (860M parameters); use tiny-unet there")
        return bench.unet_problem(model, device, dtype, batch=batch, steps=steps, guidance=guidance,
                                  resolution=resolution, seed=seed)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


class _RecordFunctionHooks(bench.StepHooks):
    """StepHooks whose step ranges are also torch.profiler record_function ranges (steps in the trace)."""

    def __init__(self, device: torch.device, nvtx: bool = True):
        super().__init__(device, nvtx)
        self._ranges: list[Any] = []

    def _open_range(self, name: str) -> None:
        super()._open_range(name)
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        self._ranges.append(rf)

    def _close_range(self) -> None:
        if self._ranges:
            self._ranges.pop().__exit__(None, None, None)
        super()._close_range()


def profile_steps(problem: bench.Problem, *, backend: str = "auto", cuda_graph: bool = False,
                  noise_mode: str = "torch", warmup: int = 1, repeats: int = 1, trace: str | None = None,
                  ) -> tuple[list[dict[str, float]], torch.Tensor]:
    """Run the loop ``warmup`` times untimed, then ``repeats`` times with per-step stamps; returns (one
    row per step, each column the median over the repeats (see ``bench.StepHooks.rows``), the last timed
    run's samples [B, C, H, W]). backend 'reference' times the plain-PyTorch loop, anything else
    ``FastDDIMSampler(backend=...)``. ``trace`` records the first timed run."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if cuda_graph and warmup < 1:
        raise ValueError("cuda_graph needs warmup >= 1: the first run captures the graph (warm-up model calls "
                         "and capture would land in the timed run)")
    device = problem.device
    hooks_type = _RecordFunctionHooks if trace else bench.StepHooks

    if backend == "reference":
        if cuda_graph:
            raise ValueError("--cuda-graph needs a FastDDIMSampler backend, not 'reference'")

        def run(hooks):
            return bench.reference_loop(problem, hooks)
    else:
        hooked = bench.HookedModel(problem.model, bench.StepHooks(device, nvtx=False))
        hooked_problem = bench.Problem(hooked, problem.x_T, problem.cond, problem.uncond, problem.steps,
                                       problem.guidance, problem.unet)
        sampler = bench.make_fast_sampler(hooked_problem, backend=backend, cuda_graph=cuda_graph,
                                          noise_mode=noise_mode)

        def run(hooks):
            hooked._hooks = hooks
            return bench.fast_loop(hooked_problem, sampler, callback=hooks.step_end)

    def timed_run(hooks):
        hooks.begin()
        try:
            return run(hooks)
        finally:
            hooks.finish()  # NVTX / record_function ranges closed even when the loop raises

    for _ in range(warmup):
        run(bench.StepHooks(device, nvtx=False))
    bench.synchronize(device)
    runs = []
    for r in range(repeats):
        hooks = hooks_type(device)
        if trace and r == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                samples = timed_run(hooks)
                bench.synchronize(device)
            prof.export_chrome_trace(trace)
        else:
            samples = timed_run(hooks)
        runs.append(hooks.rows())
    if len(runs[0]) == 0:
        raise RuntimeError("no step was timed: the sampler never called its callback")
    rows = [{"step": per_run[0]["step"],
             **{col: _median([r[col] for r in per_run]) for col in ("model_ms", "update_ms", "total_ms")}}
            for per_run in zip(*runs)]
    return rows, samples


def _median(values: list[float]) -> float:
    kept = sorted(v for v in values if v == v)
    return statistics.median(kept) if kept else float("nan")


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """mean/p50/p90/min of each column and steps per second (1000 / mean total ms)."""
    out = {col: bench.summarize([r[col] for r in rows]) for col in ("model_ms", "update_ms", "total_ms")}
    mean_total = out["total_ms"]["mean"]
    out["it_per_s"] = 1e3 / mean_total if mean_total > 0 else float("nan")
    out["steps"] = len(rows)
    return out


def _fmt(value: float, width: int = 10) -> str:
    return f"{'-':>{width}}" if value != value else f"{value:>{width}.3f}"


def format_table(rows: list[dict[str, float]], stats: dict[str, Any], header: str = "") -> str:
    lines = [header] if header else []
    lines.append(f"{'step':>5} {'model ms':>10} {'guid+upd ms':>12} {'total ms':>10}")
    for r in rows:
        lines.append(f"{r['step']:>5} {_fmt(r['model_ms'])} {_fmt(r['update_ms'], 12)} {_fmt(r['total_ms'])}")
    lines.append(f"{'':>5} {'model ms':>10} {'guid+upd ms':>12} {'total ms':>10}")
    for key in ("mean", "p50", "p90"):
        lines.append(f"{key:>5} {_fmt(stats['model_ms'][key])} {_fmt(stats['update_ms'][key], 12)} "
                     f"{_fmt(stats['total_ms'][key])}")
    lines.append(f"{stats['steps']} steps, {stats['it_per_s']:.2f} it/s")
    return "\n".join(lines)


def write_plot(rows: list[dict[str, float]], path: str, title: str) -> bool:
    """PNG of latency per step (model, guidance+update, total). False (and a logged reason) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps, [r["total_ms"] for r in rows], label="total", marker=".")
    if any(not math.isnan(r["model_ms"]) for r in rows):
        ax.plot(steps, [r["model_ms"] for r in rows], label="model", marker=".")
        ax.plot(steps, [r["update_ms"] for r in rows], label="guidance + update", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    # Wrapped, and laid out with the axes: a long title (model, shape, backend, hardware) must not run off.
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=9, loc="left")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_profile(model: str = "embedded", *, steps: int = 50, batch: int = 4, dtype: str = "fp32",
                guidance: float | None = None, backend: str = "auto", cuda_graph: bool = False,
                noise_mode: str = "torch", device: str | None = None, resolution: int | None = None,
                warmup: int = 1, repeats: int = 1, seed: int = 0, trace: str | None = None) -> dict[str, Any]:
    """Profile one configuration; returns the JSON-able report (rows + summary + environment)."""
    from ddim_fast.tools import info

    dev = bench.resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise RuntimeError("--cuda-graph needs a CUDA device")
    if guidance is None:
        guidance = 3.0 if model == "embedded" else 7.5
    problem = build_problem(model, dev, bench.DTYPES[dtype], batch=batch, steps=steps, guidance=guidance,
                            resolution=resolution, seed=seed)
    rows, _ = profile_steps(problem, backend=backend, cuda_graph=cuda_graph, noise_mode=noise_mode, warmup=warmup,
                            repeats=repeats, trace=trace)
    return {
        "kind": "profile",
        "date": time.strftime("%Y-%m-%d"),
        "environment": info.environment_summary(dev),
        "config": {"model": model, "steps": steps, "batch": batch, "dtype": dtype, "guidance": guidance,
                   "backend": backend, "cuda_graph": cuda_graph, "noise_mode": noise_mode, "device": str(dev),
                   "shape": list(problem.x_T.shape), "repeats": repeats,
                   "timer": "cuda events" if dev.type == "cuda" else "perf_counter"},
        "rows": rows,
        "summary": summary(rows),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="embedded")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES), default="fp32")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default 3 for embedded, 7.5 for UNets; 1 = off)")
    parser.add_argument("--backend", choices=("auto", "native", "triton", "reference"), default="auto",
                        help="reference = the plain-PyTorch loop; others select FastDDIMSampler's step kernel")
    parser.add_argument("--cuda-graph", action="store_true", help="FastDDIMSampler(cuda_graph=True) (GPU only)")
    parser.add_argument("--noise-mode", choices=("torch", "philox"), default="torch")
    parser.add_argument("--resolution", type=int, default=None, help="UNet models: image size in pixels")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; each step's times are their median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", metavar="FILE", help="write a Chrome trace (torch.profiler) of the timed run")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of latency per step (needs matplotlib)")
    parser.add_argument("--json", metavar="FILE", help="write rows and summary as JSON")


def main(args) -> int:
    report = run_profile(args.model, steps=args.steps, batch=args.batch, dtype=args.dtype, guidance=args.guidance,
                         backend=args.backend, cuda_graph=args.cuda_graph, noise_mode=args.noise_mode,
                         device=args.device, resolution=args.resolution, warmup=args.warmup, repeats=args.repeats,
                         seed=args.seed,
                         trace=args.trace)
    cfg = report["config"]
    header = (f"profile: {cfg['model']} {cfg['shape']} {cfg['dtype']}, CFG {cfg['guidance']}, backend {cfg['backend']}"
              f"{', CUDA graph' if cfg['cuda_graph'] else ''} on {report['environment']['hardware']} ({cfg['timer']})")
    print(format_table(report["rows"], report["summary"], header))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.trace:
        print(f"wrote Chrome trace {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    if args.plot:
        if write_plot(report["rows"], args.plot, header):
            print(f"wrote {args.plot}")
        else:
            print(f"--plot {args.plot}: matplotlib is not installed (pip install matplotlib); no plot written")
    return 0
