"""Weight casts under ``torch.autocast``: what a captured step pays per call (pytest-benchmark).

Under autocast every fp32 weight an autocast op reads is cast to half precision on each call, unless the
autocast cache serves it; a CUDA graph cannot use that cache, so a graph captured with it off replays
every cast (``ddim_fast.graphs.CapturedStep(autocast_weights="recast")``: ~5 GB of traffic per SD1.5 UNet
step). ``autocast_weights="hoist"`` (the default) serves them from half-precision copies made once,
outside the graph (``ddim_fast.graphs.AutocastWeightCasts``).

CPU group ``autocast weights cpu mlp bf16`` (CPU autocast casts to bf16; a stack of Linear layers, fp32
weights, batch 8, so the casts are a large share of the work), one forward per call:

* ``recast (cache off)``: what a graph captured with casts inside replays: every weight cast every call;
* ``hoisted copies``: the same forward with the casts served by ``AutocastWeightCasts`` — on the CPU this
  runs the interception (a Python dispatch mode, a few microseconds per op) that a graph replay does not
  have, so it over-counts what a replay costs;
* ``bf16 weights`` (floor): the model already in bf16, no autocast.

Each entry records the weight casts that really ran per call (dispatched ``aten._to_copy`` of an fp32
parameter, counted below the interception) and their bytes (4 read + 2 written per element): the
hoisted entry must show 0, the recast one every weight. The GPU figure (graph replays, recast vs hoist) is
in ``benchmarks/gpu_micro.py``.

    pytest benchmarks/bench_autocast.py --benchmark-only
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import StepTimer, run_benchmark
from ddim_fast import graphs
from harness.proofs import OpCounter

LAYERS, WIDTH, BATCH = 4, 1024, 8
GROUP = f"autocast weights cpu mlp {LAYERS}x{WIDTH} batch {BATCH} bf16"


def make_mlp(width: int = WIDTH, layers: int = LAYERS, device="cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods).to(device).eval()


class WeightCastCounter(OpCounter):
    """Counts the weight casts that really ran: ``aten._to_copy`` of an fp32 ``nn.Parameter``."""

    def __init__(self):
        super().__init__()
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        casts = self.casts = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
                    casts["count"] += 1
                    casts["elements"] += args[0].numel()
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()


def casts_per_call(fn) -> tuple[int, int]:
    """(weight casts, bytes they move) of one call of ``fn``."""
    with WeightCastCounter() as counter:
        fn()
    return counter.casts["count"], counter.casts["elements"] * 6


@pytest.mark.parametrize("impl", ["recast (cache off)", "hoisted copies", "bf16 weights"])
def test_autocast_weight_casts_cpu(benchmark, impl):
    model = make_mlp()
    x = torch.randn(BATCH, WIDTH)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    if impl == "bf16 weights":
        half = make_mlp().to(torch.bfloat16)
        xh = x.to(torch.bfloat16)

        def call():
            with torch.no_grad():
                return half(xh)
    else:
        hoist = impl == "hoisted copies"
        casts = graphs.AutocastWeightCasts(torch.device("cpu"), torch.bfloat16)

        def call():
            # The counter (when active) is entered before the interception, so it sees only casts that ran.
            intercept = casts.intercept() if hoist else contextlib.nullcontext()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), intercept:
                return model(x)

        call()  # the hoisted copies are made here (a graph's warm-up)
        assert torch.equal(call(), expected), f"{impl}: differs from eager autocast"
    count, moved = casts_per_call(call)
    n_weights = sum(1 for _ in model.parameters())
    if impl == "recast (cache off)":
        assert count == n_weights, (count, n_weights)
    elif impl == "hoisted copies":
        assert count == 0, f"hoisted copies still cast {count} weights per call"
    run_benchmark(benchmark, StepTimer(call, "cpu", 5), group=GROUP, name=impl, bytes_moved=0,
                  baseline=impl == "recast (cache off)", unit="us/call", scale_only=impl == "bf16 weights",
                  extra={"weight_casts_per_call": count, "cast_bytes_per_call": moved, "weights": n_weights,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "note": "hoisted copies on CPU include the Python interception a graph replay does not run"})
