"""The CPU step next to a busy neighbour (pytest-benchmark): how much slower each parallel op gets when
another process keeps a core busy, measured against PyTorch's own elementwise ops in the same run.

Group ``step cpu 16x4x128x128 fp32 busy neighbour``. Every implementation is timed twice, back to back:
``idle`` (nothing of ours running beside it), then ``loaded`` while one busy neighbour per CPU this
process may run on, but one, runs (one on a 2-core machine): each a plain ``python -c "while True: pass"`` process, not
pinned, started before the loaded timing and killed after it. So the op's threads have one core to
themselves and the neighbour's share to fight for, which is what "one other process keeps a core busy"
means on a 2-core box. One timed call = one op call (the stall being measured happens per parallel
region, so it is not averaged away over several calls). Entries, each ``idle`` and ``loaded``:

* ``cpp-op (2 threads)``, ``cpp-op (1 thread)``: ``torch.ops.ddim_fast.ddim_step_out`` (guided, noise
  tensor) into a preallocated buffer, with ``torch.set_num_threads`` 2 and 1;
* ``unfused (2 threads)``: ``reference.ddim_step(compute_dtype=None)``, what ldm/diffusers do per step
  (tensor ops with their temporaries: 11 parallel regions per call against the fused op's one);
* ``torch.add (2 threads)``: one PyTorch elementwise op over the same bytes as the fused step
  (``torch.add(a, b, alpha=0.5, out=o)``, three tensors of 5/3 x the latent's size: 2 reads, 1 write);
* ``copy (2 threads)``: ``copy_`` of the same bytes (the group's copy).

Each line prints the median and, for ``loaded``, its ratio to the same implementation's ``idle`` median
and the time added; then the mean with its ratio to the idle mean (the figure to compare between entries:
a loaded call runs either at idle speed or after a scheduler tick's stall, so the median jumps between
the two from run to run), the spread (quartiles and max of the timed calls) and what was measured around
it: the neighbours' CPU share (the proof that they ran: at least ``MIN_NEIGHBOUR_SHARE`` cores each, else
the entry fails) and the CPU time of every *other* process on the machine (``background``): on a shared
machine "idle" is only as idle as that says. docs/design.md ("CPU threads next to a busy process") reads
the results.

    pytest benchmarks/bench_contention.py --benchmark-only
    CI=1 pytest benchmarks/bench_contention.py --benchmark-only     # few rounds (a few seconds)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch

import ddim_fast  # noqa: F401  (registers the ops)
from bench_step import StepProblem, shape_id
from conftest import IN_CI, RESULTS, StepTimer, run_benchmark

SHAPE = (16, 4, 128, 128)
GROUP = f"step cpu {shape_id(SHAPE)} fp32 busy neighbour"
ROUNDS = 15 if IN_CI else 100
MIN_NEIGHBOUR_SHARE = 0.05  # cores; a neighbour that got less did not load the machine (on a machine
# already loaded by others a neighbour gets less than a core: its share and the background are printed)
SETTLE_S = 0.2  # after starting the neighbours, before timing

IMPLS = {  # name: (threads, kind)
    "cpp-op (2 threads)": (2, "cpp-op"),
    "cpp-op (1 thread)": (1, "cpp-op"),
    "unfused (2 threads)": (2, "unfused"),
    "torch.add (2 threads)": (2, "torch.add"),
    "copy (2 threads)": (2, "copy"),
}
LOADS = ["idle", "loaded"]


# --------------------------------------------------------------------------------------------------
# CPU accounting (Linux /proc) and the neighbours
# --------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has spent busy since boot (/proc/stat: all but idle
    and iowait), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq [steal guest ...]: steal is the hypervisor's, guest time is
    # already in user
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:7]) - idle) / CLK_TCK


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class BusyNeighbours:
    """``count`` busy-loop processes (``while True: pass``), unpinned, for the duration of a ``with``."""

    def __init__(self, count: int):
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyNeighbours":
        for _ in range(self.count):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                               stdin=subprocess.DEVNULL))
        time.sleep(SETTLE_S)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def seconds(self) -> list[float]:
        return [process_seconds(p.pid) for p in self.procs]


class CpuMeter:
    """What the machine did while a timing ran: the neighbours' CPU share (cores each) and everyone
    else's (cores: neither this process nor the neighbours)."""

    def __init__(self, neighbours: BusyNeighbours | None):
        self.neighbours = neighbours

    def __enter__(self) -> "CpuMeter":
        self.wall0 = time.perf_counter()
        self.machine0 = machine_busy_seconds()
        self.own0 = own_seconds()
        self.n0 = self.neighbours.seconds() if self.neighbours else []
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall0
        n1 = self.neighbours.seconds() if self.neighbours else []
        self.neighbour_share = [(b - a) / wall for a, b in zip(self.n0, n1)]
        machine1 = machine_busy_seconds()
        if machine1 is None or self.machine0 is None:
            self.background = float("nan")
        else:
            neighbours = sum(b - a for a, b in zip(self.n0, n1))
            others = (machine1 - self.machine0) - (own_seconds() - self.own0) - neighbours
            self.background = max(0.0, others / wall)
        self.wall = wall


# --------------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------------


class ContentionProblem(StepProblem):
    """bench_step's problem (same inputs, same fused call) plus a same-bytes ``torch.add``."""

    def __init__(self):
        super().__init__(SHAPE, torch.float32, "cpu")
        n = self.bytes_moved // 4 // 3  # three fp32 tensors: 2 reads + 1 write = the step's bytes
        gen = torch.Generator().manual_seed(1)
        self.add_a = torch.randn(n, generator=gen)
        self.add_b = torch.randn(n, generator=gen)
        self.add_out = torch.empty(n)
        self.add_bytes = 3 * n * 4

    def add(self):
        return torch.add(self.add_a, self.add_b, alpha=0.5, out=self.add_out)


_PROBLEM: list[ContentionProblem] = []
_MEANS: dict[tuple[str, str], float] = {}  # (impl, load): mean seconds per call


def problem() -> ContentionProblem:
    """The group's one problem, its results checked when it is made (whichever entries run)."""
    if not _PROBLEM:
        p = ContentionProblem()
        check_results(p)
        _PROBLEM.append(p)
    return _PROBLEM[0]


def step_fn(p: ContentionProblem, kind: str):
    if kind == "cpp-op":
        return p.fused_out("native")
    if kind == "unfused":
        return p.unfused
    if kind == "torch.add":
        return p.add
    return p.copy


def check_results(p: ContentionProblem) -> None:
    """The timed calls compute what they claim: the op (1 and 2 threads, bit-identical) vs the float64
    reference, the add vs its definition."""
    fused = p.fused_out("native")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused().clone()
        torch.set_num_threads(2)
        two = fused().clone()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two), "the C++ op gives different bits with 1 and 2 threads"
    p.check(two, "C++ op", 1e-6)
    assert torch.equal(p.add(), p.add_a + 0.5 * p.add_b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the CPU accounting")
@pytest.mark.skipif(available_cpus() < 2, reason="needs 2 CPUs (2 threads and a neighbour)")
@pytest.mark.parametrize("impl,load", [(i, load) for i in IMPLS for load in LOADS],
                         ids=[f"{i}-{load}" for i in IMPLS for load in LOADS])
def test_step_cpu_busy_neighbour(benchmark, impl, load):
    p = problem()
    threads, kind = IMPLS[impl]
    fn = step_fn(p, kind)
    saved = torch.get_num_threads()
    n_neighbours = available_cpus() - 1 if load == "loaded" else 0
    try:
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        with BusyNeighbours(n_neighbours) as neighbours:
            timer = StepTimer(fn, "cpu", 1)  # warms up under the same conditions
            with CpuMeter(neighbours if n_neighbours else None) as meter:
                run_benchmark(benchmark, timer, group=GROUP, name=f"{impl} {load}",
                              bytes_moved=p.add_bytes if kind == "torch.add" else p.bytes_moved,
                              rounds=ROUNDS, is_copy=kind == "copy" and load == "idle",
                              scale_only=kind == "copy",
                              relative_to=f"{impl} idle" if load == "loaded" else None)
            assert neighbours.alive(), "a busy neighbour died during the timing"
    finally:
        torch.set_num_threads(saved)
    shares = meter.neighbour_share
    assert all(s >= MIN_NEIGHBOUR_SHARE for s in shares), (
        f"the busy neighbours got {shares} cores during the timing (< {MIN_NEIGHBOUR_SHARE}): not loaded")
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable: one plain call, nothing to report
        return
    stats = benchmark.stats.stats
    us = 1e6
    # Stalls make the loaded distribution bimodal (a call either runs at idle speed or waits for the
    # scheduler), so the median jumps between the modes from run to run; the mean is the time a loop of
    # such calls loses on average, hence printed beside it, as a ratio to the idle mean.
    _MEANS[(impl, load)] = stats.mean
    idle_mean = _MEANS.get((impl, "idle"))
    mean = f"mean {stats.mean * us:.0f} us" + (f" ({stats.mean / idle_mean:.2f}x idle)"
                                               if load == "loaded" and idle_mean else "")
    spread = f"{mean} [q1 {stats.q1 * us:.0f}, q3 {stats.q3 * us:.0f}, max {stats.max * us:.0f} us]"
    load_note = (f"neighbours {n_neighbours} x {min(shares):.2f}-{max(shares):.2f} cores, " if shares else "")
    note = f"{spread} {load_note}background {meter.background:.2f} cores"
    RESULTS[-1].note = note  # the entry run_benchmark just recorded
    benchmark.extra_info.update({
        "shape": list(SHAPE), "dtype": "float32", "impl": impl, "load": load, "threads": threads,
        "busy_neighbours": n_neighbours, "neighbour_cores": shares,
        "background_cores": None if math.isnan(meter.background) else meter.background,
        "q1_s": stats.q1, "q3_s": stats.q3, "max_s": stats.max, "rounds": ROUNDS,
    })
