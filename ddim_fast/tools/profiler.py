"""``python -m ddim_fast profile``: latency of every DDIM step, split into the model call, the guidance
combine + DDIM update, and the loop's other work between the steps (its Python, the model's inputs), for
the embedded model, a tiny UNet (CPU) or SD1.5's UNet (GPU); one backend, or several side by side in one
run (``--backend auto,reference``: interleaved runs after the same warm-up).

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
import textwrap
import time
from typing import Any

import torch

from ddim_fast.tools import arguments, figures, problems, timing

logger = logging.getLogger(__name__)

MODELS = ("embedded", "tiny-unet", "sd15-unet")
EMBEDDED_SIZE = 32  # the embedded model's image size in pixels (the demo's)


def embedded_problem(device: torch.device, dtype: torch.dtype, *, batch: int = 4, steps: int = 50,
                     guidance: float | None = 3.0, size: int = EMBEDDED_SIZE, seed: int = 0) -> problems.Problem:
    """The demo's embedded model (exact denoiser of the glyph set), class-conditional with CFG."""
    from ddim_fast.tools import toy_data

    model = toy_data.EmbeddedLdmModel(size=size, device=device)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    x_T = torch.randn(batch, *model.image_shape, generator=gen).to(device, dtype)
    labels = [i % toy_data.NUM_CLASSES for i in range(batch)]
    cond = toy_data.class_embedding(labels, device=device)
    use_cfg = guidance not in (None, 1.0)
    uncond = toy_data.class_embedding(None, batch, device=device) if use_cfg else None
    return problems.Problem(model, x_T, cond, uncond, steps, guidance)


def build_problem(model: str, device: torch.device, dtype: torch.dtype, *, batch: int, steps: int,
                  guidance: float | None, resolution: int | None = None, seed: int = 0) -> problems.Problem:
    if model == "embedded":
        return embedded_problem(device, dtype, batch=batch, steps=steps, guidance=guidance, seed=seed,
                                size=EMBEDDED_SIZE if resolution is None else resolution)
    if model in problems.UNET_CONFIGS:
        if model == "sd15-unet" and device.type != "cuda":
            logger.warning("sd15-unet on the CPU is very slow (860M parameters); use tiny-unet there")
        return problems.unet_problem(model, device, dtype, batch=batch, steps=steps, guidance=guidance,
                                  resolution=resolution, seed=seed)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


class _RecordFunctionHooks(timing.StepHooks):
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


COLUMNS = ("model_ms", "update_ms", "other_ms", "total_ms")
BACKENDS = ("auto", "native", "triton", "reference")
# 'reference' is the plain-PyTorch loop; 'sampler:NAME' is FastDDIMSampler(backend=NAME) for any NAME, so that
# FastDDIMSampler(backend="reference") can be profiled beside the plain loop (the demo's --backend reference).
SAMPLER_PREFIX = "sampler:"

# What each column of a step holds (printed under the table; docs/design.md says the same).
COLUMN_LEGEND = (
    "model = the model call (apply_model) alone; guid+upd = from its return to the step's end (guidance "
    "combine, DDIM update, noise draw: one fused op in FastDDIMSampler); other = from the previous step's end "
    "to the model call: the loop's own work between steps (the model's inputs: the CFG batch cat([x, x]) and "
    "the timestep tensor; the loop's Python, progress bar and callbacks; the timer's own stamps). Step 0 has "
    "no 'other': what runs before it is the run's setup. Each column is a median over the timed runs, so "
    "total is not exactly their sum.")


def _loop_runner(problem: problems.Problem, backend: str, *, cuda_graph: bool, noise_mode: str):
    """The function that runs ``backend``'s loop once with given hooks and returns the samples. 'reference'
    is the plain-PyTorch loop (it stamps around its apply_model call itself), anything else
    ``FastDDIMSampler(backend=...)`` on the model wrapped in :class:`timing.HookedModel` (stamps around the
    same call)."""
    if backend == "reference":
        if cuda_graph:
            raise ValueError("--cuda-graph needs a FastDDIMSampler backend, not 'reference'")
        return lambda hooks: problems.reference_loop(problem, hooks)
    kernel = backend[len(SAMPLER_PREFIX):] if backend.startswith(SAMPLER_PREFIX) else backend
    hooked = timing.HookedModel(problem.model, timing.StepHooks(problem.device, nvtx=False))
    hooked_problem = problems.Problem(hooked, problem.x_T, problem.cond, problem.uncond, problem.steps,
                                   problem.guidance, problem.unet)
    sampler = problems.make_fast_sampler(hooked_problem, backend=kernel, cuda_graph=cuda_graph,
                                         noise_mode=noise_mode)

    def run(hooks):
        hooked._hooks = hooks
        return problems.fast_loop(hooked_problem, sampler, callback=hooks.step_end)

    return run


def profile_backends(problem: problems.Problem, backends: tuple[str, ...] | list[str], *, cuda_graph: bool = False,
                     noise_mode: str = "torch", warmup: int = 1, repeats: int = 1, trace: str | None = None,
                     ) -> dict[str, tuple[list[dict[str, float]], torch.Tensor]]:
    """Profile several backends on the same problem, interleaved: every backend gets ``warmup`` untimed runs
    (alternating), then ``repeats`` rounds of one timed run each, the order reversed every other round
    (A B, B A, ...) so that a slow spell of the machine, or its warming up, hits every backend alike.
    Returns, per backend, (one row per step with each column (``COLUMNS``, see
    ``timing.StepHooks.rows``) the median over the timed runs, the last timed run's samples [B, C, H, W]).
    backend 'reference' times the plain-PyTorch loop, anything else ``FastDDIMSampler(backend=...)``.
    ``trace`` records the first round (every backend once, each in a 'backend NAME' range)."""
    backends = list(backends)
    if not backends or len(set(backends)) != len(backends):
        raise ValueError(f"backends must be distinct and at least one, got {backends}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if cuda_graph and warmup < 1:
        raise ValueError("cuda_graph needs warmup >= 1: the first run captures the graph (warm-up model calls "
                         "and capture would land in the timed run)")
    device = problem.device
    hooks_type = _RecordFunctionHooks if trace else timing.StepHooks
    runners = {b: _loop_runner(problem, b, cuda_graph=cuda_graph, noise_mode=noise_mode) for b in backends}

    def timed_run(backend, hooks):
        hooks.begin()
        try:
            return runners[backend](hooks)
        finally:
            hooks.finish()  # NVTX / record_function ranges closed even when the loop raises

    for _ in range(warmup):
        for b in backends:
            runners[b](timing.StepHooks(device, nvtx=False))
    timing.synchronize(device)
    runs: dict[str, list[list[dict[str, float]]]] = {b: [] for b in backends}
    samples: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        order = backends if r % 2 == 0 else backends[::-1]
        prof = None
        if trace and r == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=activities)
            prof.__enter__()
        try:
            for b in order:
                hooks = hooks_type(device)
                if prof is not None:
                    with torch.profiler.record_function(f"backend {b}"):
                        samples[b] = timed_run(b, hooks)
                else:
                    samples[b] = timed_run(b, hooks)
                runs[b].append(hooks.rows())
            if prof is not None:
                timing.synchronize(device)
        finally:
            if prof is not None:
                prof.__exit__(None, None, None)
        if prof is not None:
            prof.export_chrome_trace(trace)
    out = {}
    for b in backends:
        if len(runs[b][0]) == 0:
            raise RuntimeError(f"backend {b}: no step was timed: the sampler never called its callback")
        rows = [{"step": per_run[0]["step"], **{col: _median([r[col] for r in per_run]) for col in COLUMNS}}
                for per_run in zip(*runs[b])]
        out[b] = (rows, samples[b])
    return out


def profile_steps(problem: problems.Problem, *, backend: str = "auto", cuda_graph: bool = False,
                  noise_mode: str = "torch", warmup: int = 1, repeats: int = 1, trace: str | None = None,
                  ) -> tuple[list[dict[str, float]], torch.Tensor]:
    """:func:`profile_backends` with one backend: (rows, the last timed run's samples [B, C, H, W])."""
    return profile_backends(problem, (backend,), cuda_graph=cuda_graph, noise_mode=noise_mode, warmup=warmup,
                            repeats=repeats, trace=trace)[backend]


def _median(values: list[float]) -> float:
    kept = sorted(v for v in values if v == v)
    return statistics.median(kept) if kept else float("nan")


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """mean/p50/p90/min of each column, steps per second (1000 / mean total ms) and the relative spread
    of the per-step totals (``figures.relative_spread``: every step does the same work, so their spread
    is the timing noise that ``figures.ratio_phrase`` compares against)."""
    out = {col: timing.summarize([r[col] for r in rows]) for col in COLUMNS}
    mean_total = out["total_ms"]["mean"]
    out["it_per_s"] = 1e3 / mean_total if mean_total > 0 else float("nan")
    out["steps"] = len(rows)
    out["total_spread"] = figures.relative_spread([r["total_ms"] for r in rows])
    return out


def _fmt(value: float, width: int = 10) -> str:
    return f"{'-':>{width}}" if value != value else f"{value:>{width}.3f}"


_HEAD = f"{'model ms':>10} {'guid+upd ms':>12} {'other ms':>10} {'total ms':>10}"


def _cells(values: dict[str, float]) -> str:
    return (f"{_fmt(values['model_ms'])} {_fmt(values['update_ms'], 12)} {_fmt(values['other_ms'])} "
            f"{_fmt(values['total_ms'])}")


def format_table(rows: list[dict[str, float]], stats: dict[str, Any], header: str = "") -> str:
    lines = [header] if header else []
    lines.append(f"{'step':>5} {_HEAD}")
    for r in rows:
        lines.append(f"{r['step']:>5} {_cells(r)}")
    lines.append(f"{'':>5} {_HEAD}")
    for key in ("mean", "p50", "p90"):
        lines.append(f"{key:>5} {_cells({col: stats[col][key] for col in COLUMNS})}")
    lines.append(f"{stats['steps']} steps, {stats['it_per_s']:.2f} it/s")
    return "\n".join(lines)


def baseline_backend(backends) -> str:
    """What the others are compared with: 'reference' when profiled, else the first backend."""
    return "reference" if "reference" in backends else list(backends)[0]


def format_comparison(per_backend: dict[str, dict[str, Any]]) -> str:
    """Backends side by side: p50 per step of each column, it/s, and each one's total against the baseline
    (:func:`baseline_backend`), worded by ``figures.ratio_phrase`` (differences inside the noise: 'the same')."""
    base = baseline_backend(per_backend)
    width = max(9, *(len(b) for b in per_backend))
    lines = [f"{'backend':<{width}} {_HEAD} {'it/s':>9}  total vs {base}"]
    b_stats = per_backend[base]["summary"]
    for name, data in per_backend.items():
        s = data["summary"]
        if name == base:
            verdict = "baseline"
        else:
            noise = figures.noise_band(s.get("total_spread"), b_stats.get("total_spread"))
            verdict = figures.speed_phrase(b_stats["total_ms"]["p50"], s["total_ms"]["p50"], noise=noise)
        lines.append(f"{name:<{width}} {_cells({col: s[col]['p50'] for col in COLUMNS})} {s['it_per_s']:>9.2f}  "
                     f"{verdict}")
    return "\n".join(lines)


def write_plot(rows: list[dict[str, float]] | dict[str, list[dict[str, float]]], path: str, title: str) -> bool:
    """PNG of latency per step: model, guidance+update, other and total for one backend; the totals of each
    for several (``{backend: rows}``). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    if isinstance(rows, dict) and len(rows) > 1:
        for name, backend_rows in rows.items():
            ax.plot([r["step"] for r in backend_rows], [r["total_ms"] for r in backend_rows], label=f"{name} total",
                    marker=".")
    else:
        rows = next(iter(rows.values())) if isinstance(rows, dict) else rows
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["total_ms"] for r in rows], label="total", marker=".")
        if any(not math.isnan(r["model_ms"]) for r in rows):
            ax.plot(steps, [r["model_ms"] for r in rows], label="model", marker=".")
            ax.plot(steps, [r["update_ms"] for r in rows], label="guidance + update", marker=".")
            ax.plot(steps, [r.get("other_ms", float("nan")) for r in rows], label="other (between steps)",
                    marker=".")
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
                guidance: float | None = None, backend: str | tuple[str, ...] = "auto", cuda_graph: bool = False,
                noise_mode: str = "torch", device: str | None = None, resolution: int | None = None,
                warmup: int = 1, repeats: int = 1, seed: int = 0, trace: str | None = None) -> dict[str, Any]:
    """Profile one configuration on one or several backends (``"auto"`` or ``("auto", "reference")``,
    interleaved: :func:`profile_backends`); returns the JSON-able report: ``backends`` {name: {rows,
    summary}}, and the first backend's ``rows`` and ``summary`` at the top level."""
    from ddim_fast.tools import info

    backends = (backend,) if isinstance(backend, str) else tuple(backend)
    dev = problems.resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise RuntimeError("--cuda-graph needs a CUDA device")
    if guidance is None:
        guidance = 3.0 if model == "embedded" else 7.5
    problem = build_problem(model, dev, problems.DTYPES[dtype], batch=batch, steps=steps, guidance=guidance,
                            resolution=resolution, seed=seed)
    results = profile_backends(problem, backends, cuda_graph=cuda_graph, noise_mode=noise_mode, warmup=warmup,
                               repeats=repeats, trace=trace)
    per_backend = {b: {"rows": rows, "summary": summary(rows)} for b, (rows, _) in results.items()}
    first = per_backend[backends[0]]
    return {
        "kind": "profile",
        "date": time.strftime("%Y-%m-%d"),
        "environment": info.environment_summary(dev),
        "config": {"model": model, "steps": steps, "batch": batch, "dtype": dtype, "guidance": guidance,
                   "backend": ",".join(backends), "backends": list(backends), "cuda_graph": cuda_graph,
                   "noise_mode": noise_mode, "device": str(dev), "shape": list(problem.x_T.shape),
                   "warmup": warmup, "repeats": repeats, "interleaved": len(backends) > 1,
                   "timer": "cuda events" if dev.type == "cuda" else "perf_counter"},
        "columns": COLUMN_LEGEND,
        "backends": per_backend,
        "rows": first["rows"],
        "summary": first["summary"],
    }


def add_arguments(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="embedded",
                        help="embedded: the demo's model (exact denoiser, no weights); tiny-unet / sd15-unet: a "
                             "diffusers UNet with that config and random weights (sd15-unet is for GPUs)")
    parser.add_argument("--steps", type=arguments.steps, default=50, help="DDIM steps, 1 to 1000")
    parser.add_argument("--batch", type=arguments.positive_int, default=4, help="samples per run")
    parser.add_argument("--dtype", choices=sorted(problems.DTYPES), default="fp32",
                        help="dtype of the latents and the UNet's weights")
    parser.add_argument("--guidance", type=arguments.finite_float, default=None,
                        help="classifier-free guidance scale; 1 = off (default: 3 for embedded, 7.5 for UNets)")
    parser.add_argument("--backend", type=arguments.names(BACKENDS), default="auto", metavar="NAME[,NAME...]",
                        help="reference = the plain-PyTorch loop; auto, native, triton select FastDDIMSampler's step "
                             "kernel. Several (--backend auto,reference) are profiled in one run, interleaved, "
                             "and compared side by side")
    parser.add_argument("--cuda-graph", action="store_true", help="FastDDIMSampler(cuda_graph=True) (GPU only)")
    parser.add_argument("--noise-mode", choices=("torch", "philox"), default="torch",
                        help="FastDDIMSampler's step noise: torch draws ldm's per-step randn, philox draws in the "
                             "kernel")
    parser.add_argument("--resolution", type=arguments.resolution, default=None,
                        help="image size in pixels, a multiple of 8: the embedded model's images, a UNet's "
                             f"latent is resolution / 8 (default: {EMBEDDED_SIZE} for embedded, "
                             + ", ".join(f"{8 * cfg['sample_size']} for {name}"
                                         for name, (cfg, _) in sorted(problems.UNET_CONFIGS.items())) + ")")
    parser.add_argument("--device", type=arguments.device, default="auto",
                        help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--warmup", type=arguments.non_negative_int, default=1, help="untimed runs first, per backend")
    parser.add_argument("--repeats", type=arguments.positive_int, default=1,
                        help="timed runs per backend; each step's times are their median")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0,
                        help="seed of x_T, the conditioning and the UNet's random weights")
    parser.add_argument("--trace", metavar="FILE", type=arguments.output_file,
                        help="write a Chrome trace (torch.profiler) of the first timed run(s) (default: none)")
    parser.add_argument("--plot", metavar="FILE", type=arguments.output_file,
                        help="write a PNG of latency per step, needs matplotlib (default: none)")
    parser.add_argument("--json", metavar="FILE", type=arguments.output_file,
                        help="write rows and summary as JSON (default: none)")


def check_arguments(args) -> str | None:
    """What one option says about another, refused before any work (cli.main prints it as argparse does)."""
    if args.cuda_graph:
        if "reference" in args.backend:
            return "argument --cuda-graph: needs FastDDIMSampler backends, not 'reference' (it has no graph path)"
        if args.warmup < 1:
            return "argument --cuda-graph: needs --warmup >= 1 (the first run captures the graph)"
        if problems.resolve_device(args.device).type != "cuda":
            return "argument --cuda-graph: needs a CUDA device"
    return None


def main(args) -> int:
    report = run_profile(args.model, steps=args.steps, batch=args.batch, dtype=args.dtype, guidance=args.guidance,
                         backend=args.backend, cuda_graph=args.cuda_graph, noise_mode=args.noise_mode,
                         device=args.device, resolution=args.resolution, warmup=args.warmup, repeats=args.repeats,
                         seed=args.seed, trace=args.trace)
    cfg = report["config"]
    several = len(cfg["backends"]) > 1
    runs = (f"{cfg['repeats']} timed run{'s' if cfg['repeats'] != 1 else ''} "
            f"{'per backend, interleaved' if several else ''}").strip()
    header = (f"profile: {cfg['model']} {cfg['shape']} {cfg['dtype']}, CFG {cfg['guidance']}, "
              f"{'CUDA graph, ' if cfg['cuda_graph'] else ''}on {report['environment']['hardware']} ({cfg['timer']}, "
              f"median of {runs})")
    print(header)
    for name, data in report["backends"].items():
        print(format_table(data["rows"], data["summary"], f"backend {name}:"))
    print(textwrap.fill(COLUMN_LEGEND, 110))
    if several:
        print(f"backends side by side (p50 per step, ms; {runs}):")
        print(format_comparison(report["backends"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.trace:
        print(f"wrote Chrome trace {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    if args.plot:
        plotted = {name: data["rows"] for name, data in report["backends"].items()}
        if write_plot(plotted, args.plot, header):
            print(f"wrote {args.plot}")
        else:
            print(f"--plot {args.plot}: matplotlib is not installed (pip install matplotlib); no plot written")
    return 0
