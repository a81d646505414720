"""End-to-end DDIM sampling loops (pytest-benchmark): the whole run of S steps, UNet included.

Groups (the baseline of each is marked ``extra_info['baseline']``):

* ``e2e cpu tiny-unet``: tiny diffusers UNet (random weights) on the CPU, fp32, CFG 7.5, 10 steps —
  diffusers' DDIMScheduler loop (baseline), the plain-PyTorch reference loop, FastDDIMSampler, and
  FastDDIMSampler with the fused attention patched into the UNet;
* ``e2e cpu embedded``: the demo's embedded model (exact denoiser), 50 steps — reference loop
  (baseline) vs FastDDIMSampler, where the step math is a larger share of the run;
* ``e2e cuda sd15-unet``: SD1.5-config UNet, fp16, 512x512, CFG 7.5, 50 steps — diffusers loop
  (baseline), FastDDIMSampler eager, + CUDA graph, + fused attention. Skipped without CUDA.

Every loop's output is checked against the baseline's before it is timed.

    pytest benchmarks/bench_e2e.py --benchmark-only
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from ddim_fast import bench, info, profiler, reference  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CPU_STEPS = 10
GPU_STEPS = 50


def _extra(benchmark, problem: bench.Problem, baseline: bool = False) -> None:
    benchmark.extra_info.update({
        "hardware": info.hardware_name(problem.device),
        "steps": problem.steps,
        "shape": list(problem.x_T.shape),
        "dtype": str(problem.x_T.dtype).replace("torch.", ""),
        "guidance": problem.guidance,
        "baseline": baseline,
    })


def _time(benchmark, fn, device: torch.device, rounds: int | None = None):
    """benchmark(fn), synchronising the GPU inside the timed call so kernels are counted."""
    def run():
        out = fn()
        bench.synchronize(device)
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
    problem = bench.unet_problem("tiny-unet", torch.device("cpu"), torch.float32, batch=1, steps=CPU_STEPS,
                                 guidance=7.5)
    problem.extra["expected"] = bench.diffusers_loop(problem)
    return problem


def _patched(problem: bench.Problem) -> bench.Problem:
    """A copy of the problem whose UNet (a deep copy) has ddim_fast's fused attention patched in."""
    attention = pytest.importorskip("ddim_fast.attention")
    unet = copy.deepcopy(problem.unet)
    attention.patch_attention(unet)
    patched = copy.copy(problem)
    patched.unet, patched.model = unet, bench.LdmUNetModel(unet)
    return patched


@pytest.mark.benchmark(group="e2e cpu tiny-unet")
@pytest.mark.parametrize("loop", ["diffusers", "reference", "fast", "fast+attn"])
def test_e2e_cpu_tiny_unet(benchmark, tiny_problem, loop):
    if loop == "diffusers":
        fn = lambda: bench.diffusers_loop(tiny_problem)  # noqa: E731
    elif loop == "reference":
        fn = lambda: bench.reference_loop(tiny_problem)  # noqa: E731
    else:
        problem = _patched(tiny_problem) if loop == "fast+attn" else tiny_problem
        sampler = bench.make_fast_sampler(problem)
        fn = lambda: bench.fast_loop(problem, sampler)  # noqa: E731
    out = fn()
    assert reference.relative_error(out, tiny_problem.extra["expected"]) <= bench.RUN_TOLERANCES[torch.float32]
    _extra(benchmark, tiny_problem, baseline=loop == "diffusers")
    _time(benchmark, fn, tiny_problem.device)


# --------------------------------------------------------------------------------------------------
# CPU: the embedded model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_problem():
    problem = profiler.embedded_problem(torch.device("cpu"), torch.float32, batch=8, steps=50, guidance=3.0)
    problem.extra["expected"] = bench.reference_loop(problem)
    return problem


@pytest.mark.benchmark(group="e2e cpu embedded")
@pytest.mark.parametrize("loop", ["reference", "fast"])
def test_e2e_cpu_embedded(benchmark, embedded_problem, loop):
    if loop == "reference":
        fn = lambda: bench.reference_loop(embedded_problem)  # noqa: E731
    else:
        sampler = bench.make_fast_sampler(embedded_problem)
        fn = lambda: bench.fast_loop(embedded_problem, sampler)  # noqa: E731
    out = fn()
    assert reference.relative_error(out, embedded_problem.extra["expected"]) <= bench.RUN_TOLERANCES[torch.float32]
    _extra(benchmark, embedded_problem, baseline=loop == "reference")
    _time(benchmark, fn, embedded_problem.device)


# --------------------------------------------------------------------------------------------------
# GPU: SD1.5-config UNet, fp16, 512x512, CFG 7.5, 50 steps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_problem():
    pytest.importorskip("diffusers")
    problem = bench.unet_problem("sd15-unet", torch.device("cuda"), torch.float16, batch=1, steps=GPU_STEPS,
                                 guidance=7.5, resolution=512)
    problem.extra["expected"] = bench.diffusers_loop(problem)
    return problem


@requires_cuda
@pytest.mark.benchmark(group="e2e cuda sd15-unet fp16 512px")
@pytest.mark.parametrize("loop", ["diffusers", "fast", "fast+graph", "fast+attn"])
def test_e2e_cuda_sd15(benchmark, sd15_problem, loop):
    problem = sd15_problem
    graph = loop in ("fast+graph", "fast+attn")
    if loop == "diffusers":
        fn = lambda: bench.diffusers_loop(problem)  # noqa: E731
    else:
        run_problem = _patched(problem) if loop == "fast+attn" else problem
        sampler = bench.make_fast_sampler(run_problem, cuda_graph=graph)
        fn = lambda: bench.fast_loop(run_problem, sampler)  # noqa: E731
    torch.manual_seed(0)
    out = fn()  # also the capture
    assert reference.relative_error(out, problem.extra["expected"]) <= bench.RUN_TOLERANCES[torch.float16]
    if graph:
        # The sampler falls back to its eager step when capture fails: that must not be timed as "graph".
        entries = [sampler.graph_cache.get(key) for key in sampler.graph_cache.keys()]
        assert entries and all(entry.captured for entry in entries), \
            f"{loop}: the SD1.5 UNet step was not captured into a CUDA graph (see the warning logged)"
    _extra(benchmark, problem, baseline=loop == "diffusers")
    benchmark.extra_info["cuda_graph"] = graph
    _time(benchmark, fn, problem.device, rounds=3)
