"""End-to-end DDIM sampling loops (pytest-benchmark): the whole run of S steps, UNet included.

Groups (the baseline of each is marked ``extra_info['baseline']``):

* ``e2e cpu tiny-unet``: tiny diffusers UNet (random weights) on the CPU, fp32, CFG 7.5, 10 steps —
  diffusers' DDIMScheduler loop (baseline), the plain-PyTorch reference loop, FastDDIMSampler, and
  FastDDIMSampler with the fused attention patched into the UNet;
* ``e2e cpu embedded``: the demo's embedded model (exact denoiser), 50 steps — reference loop
  (baseline) vs FastDDIMSampler, where the step math is a larger share of the run;
* ``e2e cuda sd15-unet``: SD1.5-config UNet, fp16, 512x512, CFG 7.5, 50 steps — diffusers loop
  (baseline), FastDDIMSampler eager, + CUDA graph, + fused attention. Skipped without CUDA.

Every loop proves what its name says before it is timed, with ``harness.loops.Variant`` (the same
proofs as ``python -m ddim_fast bench``): its first call runs under a dispatcher-level op counter
and a UNet forward counter — "fast" loops one ``torch.ops.ddim_fast`` step op per UNet forward,
"+attn" a ddim_fast attention op for every attention module ``optimize()`` fuses of every forward and no
SDPA/softmax there (the product's ``fuse_attention`` pinned to ``backend="fused"``), "+graph" only
captured CUDA graphs — and every timed call is checked again (forwards, graph replays per step). Its
output is checked against the baseline's.

    pytest benchmarks/bench_e2e.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from conftest import benchmark_spread, record_result  # noqa: E402
from ddim_fast import reference  # noqa: E402
from ddim_fast.tools import info, problems, profiler  # noqa: E402
from ddim_fast.tools.figures import relative_spread  # noqa: E402
from ddim_fast.tools.timing import synchronize  # noqa: E402
from harness import loops  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU_STEPS = 10
GPU_STEPS = 50


def _extra(benchmark, problem: problems.Problem, baseline: bool = False) -> None:
    benchmark.extra_info.update({
        "hardware": info.hardware_name(problem.device),
        "steps": problem.steps,
        "shape": list(problem.x_T.shape),
        "dtype": str(problem.x_T.dtype).replace("torch.", ""),
        "guidance": problem.guidance,
        "baseline": baseline,
    })


def _time(benchmark, fn, device: torch.device, rounds: int | None = None):
    """benchmark(fn), synchronising the GPU inside the timed call so kernels are counted (host-timed:
    a whole sampling run of tens of ms to seconds, the device synchronised at its end)."""
    def run():
        out = fn()
        synchronize(device)
        return out

    if rounds is None:
        return benchmark(run)
    return benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


# --------------------------------------------------------------------------------------------------
# CPU: tiny UNet
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_problem():
    pytest.importorskip("diffusers")
    problem = problems.unet_problem("tiny-unet", torch.device("cpu"), torch.float32, batch=1, steps=CPU_STEPS,
                                 guidance=7.5)
    problem.extra["expected"] = loops.diffusers_loop(problem)
    problem.extra["baseline"] = "diffusers"
    return problem


def _variant(problem: problems.Problem, loop: str) -> loops.Variant:
    variant = loops.Variant.build(problem, loop)
    if isinstance(variant, str):
        pytest.skip(f"{loop}: {variant}")
    return variant


def _proven(benchmark, problem: problems.Problem, loop: str, tolerance: float, rounds: int | None = None) -> None:
    """Build the loop, prove it (first call), check its output, time it (each timed call checked too)."""
    variant = _variant(problem, loop)
    try:
        out = variant.first_call()
        err = reference.relative_error(out, problem.extra["expected"])
        assert err <= tolerance, f"{loop}: relative error {err:.2e} vs the baseline > {tolerance:.0e}"
        _extra(benchmark, problem, baseline=loop == problem.extra["baseline"])
        benchmark.extra_info["proof"] = variant.proof
        benchmark.extra_info["cuda_graph"] = variant.expect.graph
        benchmark.extra_info["fused_attention"] = variant.expect.fused_attention
        _time(benchmark, variant, problem.device, rounds=rounds)
        per_call, spread = benchmark.stats.stats.median, benchmark_spread(benchmark)
        if problem.device.type == "cuda":  # the figure to read on a GPU: CUDA events around the whole run
            times = loops.time_call(variant, problem.device, rounds or 3, warmup=0)
            benchmark.extra_info["seconds_cuda_events"] = sorted(times)[len(times) // 2]
            benchmark.extra_info["it_per_s_cuda_events"] = problem.steps / benchmark.extra_info["seconds_cuda_events"]
            per_call, spread = benchmark.extra_info["seconds_cuda_events"], relative_spread(times)
        assert variant.proof["ok"], variant.proof["problems"]
        # pytest-benchmark's own table shows whole runs: the summary shows the time per step too.
        benchmark.extra_info["seconds_per_step"] = per_call / problem.steps
        benchmark.extra_info["relative_spread"] = spread
        record_result(benchmark.group, loop, per_call / problem.steps, hardware=info.hardware_name(problem.device),
                      baseline=loop == problem.extra["baseline"], unit="ms/step", steps=problem.steps,
                      spread=spread)
    finally:
        variant.close()


@pytest.mark.benchmark(group="e2e cpu tiny-unet")
@pytest.mark.parametrize("loop", ["diffusers", "reference", "fast", "fast+attn"])
def test_e2e_cpu_tiny_unet(benchmark, tiny_problem, loop):
    _proven(benchmark, tiny_problem, loop, loops.RUN_TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------------
# CPU: the embedded model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_problem():
    problem = profiler.embedded_problem(torch.device("cpu"), torch.float32, batch=8, steps=50, guidance=3.0)
    problem.extra["expected"] = problems.reference_loop(problem)
    problem.extra["baseline"] = "reference"
    return problem


@pytest.mark.benchmark(group="e2e cpu embedded")
@pytest.mark.parametrize("loop", ["reference", "fast"])
def test_e2e_cpu_embedded(benchmark, embedded_problem, loop):
    _proven(benchmark, embedded_problem, loop, loops.RUN_TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------------
# GPU: SD1.5-config UNet, fp16, 512x512, CFG 7.5, 50 steps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_problem():
    pytest.importorskip("diffusers")
    problem = problems.unet_problem("sd15-unet", torch.device("cuda"), torch.float16, batch=1, steps=GPU_STEPS,
                                 guidance=7.5, resolution=512)
    problem.extra["expected"] = loops.diffusers_loop(problem)
    problem.extra["baseline"] = "diffusers"
    return problem


@requires_cuda
@pytest.mark.benchmark(group="e2e cuda sd15-unet fp16 512px")
@pytest.mark.parametrize("loop", ["diffusers", "fast", "fast+graph", "fast+attn"])
def test_e2e_cuda_sd15(benchmark, sd15_problem, loop):
    # fast+attn on the GPU is graph-captured too; its proof checks both.
    _proven(benchmark, sd15_problem, loop, loops.RUN_TOLERANCES[torch.float16], rounds=3)
