"""Shared helpers of every benchmark file (``pytest benchmarks --benchmark-only``).

* ``hardware_name(device)`` / ``versions()``: what the numbers were measured on;
* ``requires_cuda``: skip marker (GPU groups skip cleanly without CUDA);
* ``StepTimer``: runs one step function ``steps`` times per timed call — eagerly, or captured as ONE CUDA
  graph of ``steps`` unrolled calls that is replayed (launch overhead removed) — synchronising the device
  inside the timed call; on the CPU it is a plain host-timed loop;
* ``run_benchmark(benchmark, ...)``: times it with pytest-benchmark, divides by the steps per call, and
  attaches ``benchmark.extra_info`` (hardware, versions, bytes moved, per-step time, GB/s, baseline);
* every result is also recorded so that the terminal summary prints, per group, each entry's ratio to
  the group's baseline and to the group's memory-copy entry, with the hardware named.

Round counts: ``CI`` set in the environment means quick rounds (the CPU groups must stay under ~60 s).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA device (GPU benchmark group)")

IN_CI = bool(os.environ.get("CI"))


# --------------------------------------------------------------------------------------------------
# What the numbers were measured on
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """'<model name> (<N> cores)' from /proc/cpuinfo, falling back to platform.processor()."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def hardware_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing: only the Triton entries are affected
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Calls ``step_fn()`` ``steps`` times per ``__call__``.

    ``use_graph`` (CUDA only): the ``steps`` calls are captured once into one CUDA graph and each
    ``__call__`` replays it, so per-launch CPU overhead disappears and what is left is kernel time.
    Captured with ``ddim_fast.graphs.CapturedStep`` (warm-up and capture on one side stream, a host
    sync reported as ``GraphCaptureError`` before capture, the caller's stream current again after a
    failure). ``step_fn`` must then be capture-safe (static buffers, no host sync).
    """

    def __init__(self, step_fn: Callable[[], object], device: torch.device | str, steps: int,
                 use_graph: bool = False):
        self.step_fn = step_fn
        self.device = torch.device(device)
        self.steps = steps
        self.graph = None
        if use_graph:
            if self.device.type != "cuda":
                raise ValueError(f"StepTimer: use_graph needs a CUDA device, got {self.device}")
            from ddim_fast.graphs import CapturedStep

            def unrolled(_static):
                for _ in range(steps):
                    step_fn()

            # The step functions read and write their own fixed tensors; the anchor only names the device.
            anchor = {"device": torch.empty(0, device=self.device)}
            self.graph = CapturedStep(unrolled, anchor, warmup_iters=2).capture().graph
        else:
            for _ in range(2):  # warm-up: lazy init, Triton/inductor compiles, allocator
                step_fn()
        synchronize(self.device)

    def launch(self) -> None:
        """Enqueue one call's work (``steps`` steps) without waiting for it."""
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.steps):
                self.step_fn()

    def __call__(self) -> None:
        self.launch()
        synchronize(self.device)

    def seconds_per_step(self, repeats: int = 5) -> float:
        """Median over `repeats` of the time per step: CUDA events on the GPU (the end event is
        recorded right after the work is enqueued, before the host waits, so the host's wake-up is not
        counted), perf_counter on the CPU. Every repeat's time stays in ``self.samples``."""
        samples = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                synchronize(self.device)  # nothing of the previous repeat still queued ahead of `start`
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.launch()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / self.steps)
            else:
                t0 = time.perf_counter()
                self()
                samples.append((time.perf_counter() - t0) / self.steps)
        samples.sort()
        self.samples = samples
        return samples[len(samples) // 2]


# --------------------------------------------------------------------------------------------------
# pytest-benchmark glue and the ratio summary
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    group: str
    name: str
    seconds_per_step: float
    bytes_moved: int
    hardware: str
    baseline: bool
    is_copy: bool
    is_peer: bool = False   # the competitor a user would pick instead (torch.compile of the unfused step)
    unit: str = "us/step"
    scale_only: bool = False  # an entry for scale (an allocation, a copy): no "faster than" ratios
    relative_to: str | None = None  # another entry of the group: the summary prints this one's time over it
    note: str = ""  # printed at the end of the entry's summary line (a spread, a measured condition)
    steps: int | None = None  # sampling steps per timed call (end-to-end groups): time per step = call / steps
    spread: float | None = None  # relative spread of the timed rounds (figures.relative_spread); None: unknown


RESULTS: list[Result] = []


def record_result(group: str, name: str, seconds: float, *, hardware: str, bytes_moved: int = 0,
                  baseline: bool = False, is_copy: bool = False, is_peer: bool = False,
                  unit: str = "us/call", scale_only: bool = False, steps: int | None = None,
                  spread: float | None = None) -> None:
    """Adds a measurement made without a StepTimer (host-time, import-time, end-to-end groups) to the
    summary. ``seconds`` is per step when ``steps`` (steps per timed call) is given, else per call;
    ``spread``: the relative spread of its rounds (``benchmark_spread``), None when unknown."""
    RESULTS.append(Result(group, name, seconds, int(bytes_moved), hardware, baseline, is_copy, is_peer, unit,
                          scale_only or is_copy, steps=steps, spread=spread))


def benchmark_spread(benchmark) -> float | None:
    """pytest-benchmark's rounds of this benchmark as a relative spread (IQR / 2 / median), None without
    at least 3 rounds: what ``figures.noise_band`` needs to call a difference 'the same'."""
    from ddim_fast.tools.figures import relative_spread

    stats = getattr(benchmark, "stats", None)
    data = getattr(getattr(stats, "stats", None), "data", None)
    return relative_spread(data) if data else None


def run_benchmark(benchmark, timer: StepTimer, *, group: str, name: str, bytes_moved: int,
                  baseline: bool = False, is_copy: bool = False, is_peer: bool = False,
                  rounds: int | None = None, extra: dict | None = None, unit: str = "us/step",
                  scale_only: bool = False, relative_to: str | None = None) -> float:
    """Times ``timer`` with pytest-benchmark (one timed call = ``timer.steps`` steps) and returns the
    median seconds per step (CUDA-event timed on the GPU). Attaches the shared ``extra_info``.
    ``relative_to`` names another entry of the group to print this one's time as a multiple of."""
    if rounds is None:
        rounds = 3 if IN_CI else 10
    benchmark.group = group
    benchmark.pedantic(timer, rounds=rounds, iterations=1, warmup_rounds=1)
    from ddim_fast.tools.figures import relative_spread

    stats = getattr(benchmark, "stats", None)
    if stats is not None and timer.device.type == "cpu":
        per_step = stats.stats.median / timer.steps
        spread = benchmark_spread(benchmark)
    else:
        per_step = timer.seconds_per_step(repeats=3 if IN_CI else 7)
        spread = relative_spread(timer.samples)
    hardware = hardware_name(timer.device)
    benchmark.extra_info.update({
        "hardware": hardware,
        **{f"{k}_version": v for k, v in versions().items()},
        "steps_per_call": timer.steps,
        "cuda_graph": timer.graph is not None,
        "seconds_per_step": per_step,
        "bytes_moved": int(bytes_moved),
        "gb_per_s": bytes_moved / per_step / 1e9 if per_step > 0 else float("nan"),
        "baseline": baseline,
        "relative_spread": spread,
        **(extra or {}),
    })
    RESULTS.append(Result(group, name, per_step, int(bytes_moved), hardware, baseline, is_copy, is_peer, unit,
                          scale_only or is_copy, relative_to=relative_to, spread=spread))
    return per_step


def compare(r: Result, other: Result) -> str:
    """'2.00x faster than X', '1.25x slower than X' (never 'faster' for a slow-down), or 'the same as X
    (...)' when the difference lies inside the two entries' timing noise (``figures.noise_band``)."""
    from ddim_fast.tools.figures import compare_phrase, noise_band

    return compare_phrase(other.seconds_per_step / r.seconds_per_step, other.name, width=6,
                          noise=noise_band(r.spread, other.spread))


def format_group(group: str, results: list[Result]) -> list[str]:
    """The summary lines of one group: each entry's time, GB/s (when it moves bytes), its ratio to the
    group's baseline, to its peer (torch.compile), to its copy and to the entry it names as
    ``relative_to``, then its note."""
    base = next((r for r in results if r.baseline), None)
    copy = next((r for r in results if r.is_copy), None)
    peer = next((r for r in results if r.is_peer), None)
    lines = [f"[{group}] on {results[0].hardware}"]
    width = max(34, *(len(r.name) for r in results))
    for r in results:
        scale = 1e3 if r.unit.startswith("ms") else 1e6
        value = r.seconds_per_step * scale
        parts = [f"  {r.name:<{width}} {value:10.3f} {r.unit}" if r.steps else
                 f"  {r.name:<{width}} {value:10.1f} {r.unit}"]
        if r.steps:  # end-to-end: the per-step time above, and what one timed call (a whole run) took
            parts.append(f"({r.steps} steps per call, {r.seconds_per_step * r.steps * scale:.1f} "
                         f"{r.unit.split('/')[0]} per call)")
        if r.bytes_moved:
            parts.append(f"{r.bytes_moved / r.seconds_per_step / 1e9:7.1f} GB/s")
        if base is not None and r is not base and not r.scale_only:
            parts.append(compare(r, base))
        if peer is not None and r is not peer and not r.scale_only and r is not base:
            parts.append(compare(r, peer))
        if copy is not None and r is not copy:
            parts.append(f"{r.seconds_per_step / copy.seconds_per_step:5.2f}x the copy time")
        other = next((o for o in results if r.relative_to is not None and o.name == r.relative_to), None)
        if other is not None:  # as a ratio and as the time added (per step, in the group's unit)
            added = (r.seconds_per_step - other.seconds_per_step) * (1e3 if r.unit.startswith("ms") else 1e6)
            parts.append(f"{r.seconds_per_step / other.seconds_per_step:5.2f}x {other.name} ({added:+.1f} "
                         f"{r.unit.split('/')[0]})")
        if r.note:
            parts.append(r.note)
        lines.append("  ".join(parts))
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("ddim-fast benchmarks: time per step / call, ratios within each group")
    groups: dict[str, list[Result]] = {}
    for r in RESULTS:
        groups.setdefault(r.group, []).append(r)
    for group, results in groups.items():
        for line in format_group(group, results):
            tr.write_line(line)
