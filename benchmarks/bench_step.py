"""One DDIM step (guidance combine + x0 prediction + update + noise), fused vs unfused (pytest-benchmark).

Groups (the baseline of each is the unfused reference; every group also times a plain memory copy of
the bytes the fused op must move, so "x the copy time" says how close the op is to the memory bound):

* ``step cpu BxCxHxW fp32``: the C++ CPU op (``ddim_step_out`` into a preallocated buffer) vs
  ``reference.ddim_step(compute_dtype=None)`` — what ldm/diffusers do per step: chunk, guidance combine,
  x0 prediction, update, each a separate tensor op with its own temporaries — on the same inputs, whose
  results are compared before timing;
* ``step cuda BxCxHxW dtype``: unfused eager, unfused under ``torch.compile``, our CUDA op, our Triton
  op, each eager and inside a CUDA graph (20 steps unrolled per graph, time divided), and a
  device-to-device copy of the same bytes. Skipped without CUDA.

Shapes: 2x4x64x64 (SD 512 px latent, batch 2) and 16x4x128x128 (a large batch at 1024 px).

    pytest benchmarks/bench_step.py --benchmark-only            # ratios printed at the end
    CI=1 pytest benchmarks/bench_step.py --benchmark-only       # quick rounds (CPU group < 60 s)
"""

from __future__ import annotations

import pytest
import torch

import ddim_fast.ops  # noqa: F401  (loads the C++ extension)
from conftest import StepTimer, hardware_name, requires_cuda, run_benchmark
from ddim_fast import ops, reference, schedule

SHAPES = [(2, 4, 64, 64), (16, 4, 128, 128)]
GUIDANCE = 7.5
STEP_ROW = 25  # a middle step of a 50-step SD schedule (sigma > 0: the noise term is live)
# Relative error against the float64 reference that counts as "the same result" (docs/design.md's table;
# the unfused fp16 baseline computes in fp16, hence its looser bound).
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3}
UNFUSED_FP16_TOLERANCE = 1e-2

# Issue goals for the CPU group at the large size (reported, not asserted: timings are noisy on shared CI).
CPU_GOAL_SPEEDUP = 5.0
CPU_GOAL_COPY_RATIO = 2.5


def shape_id(shape) -> str:
    return "x".join(str(s) for s in shape)


def sd_table(device) -> torch.Tensor:
    alphas_cumprod = schedule.alphas_cumprod(schedule.ldm_betas("linear", 1000, 0.00085, 0.012))
    params = schedule.ldm_ddim_parameters(alphas_cumprod, schedule.ldm_timesteps(50, 1000), 1.0)
    return schedule.ldm_coefficient_table(params, device=device)


class StepProblem:
    """Inputs of one guided step with a noise tensor, and the bytes a fused step must move:
    read x, both model-output halves and the noise, write x_prev (5 tensors of x's size)."""

    def __init__(self, shape, dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.x = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.model_output = torch.randn((2 * shape[0], *shape[1:]), generator=gen).to(dtype).to(device)
        self.noise = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.table = sd_table(device)
        self.step = torch.tensor([STEP_ROW], dtype=torch.int64, device=device)
        self.out = torch.empty_like(self.x)
        self.bytes_moved = 5 * self.x.numel() * self.x.element_size()
        # A copy that moves the same bytes: read half of them, write the other half.
        copy_numel = self.bytes_moved // 2 // self.x.element_size()
        self.copy_src = torch.randn(copy_numel, generator=gen).to(dtype).to(device)
        self.copy_dst = torch.empty_like(self.copy_src)

    def unfused(self, step=None, compute_dtype=None):
        return reference.ddim_step(self.x, self.model_output, self.table, STEP_ROW if step is None else step,
                                   guidance_scale=GUIDANCE, noise=self.noise, compute_dtype=compute_dtype)[0]

    def fused_out(self, backend: str):
        if backend == "triton":
            from ddim_fast.triton import ddim_step as triton_step

            op = triton_step.ddim_step_triton_out
        else:
            op = torch.ops.ddim_fast.ddim_step_out
        args = (self.x, self.model_output, self.table, self.step, GUIDANCE, "epsilon", None, None, False,
                self.noise, None, 1.0, self.out, None)

        def run():
            op(*args)
            return self.out

        return run

    def copy(self):
        self.copy_dst.copy_(self.copy_src)
        return self.copy_dst

    def check(self, out: torch.Tensor, what: str, tol: float):
        ref = reference.ddim_step(self.x, self.model_output, self.table, STEP_ROW, guidance_scale=GUIDANCE,
                                  noise=self.noise)[0]
        err = reference.relative_error(out, ref)
        assert err <= tol, f"{what}: relative error {err:.2e} vs the float64 reference > {tol:.0e}"


# --------------------------------------------------------------------------------------------------
# CPU group
# --------------------------------------------------------------------------------------------------

CPU_IMPLS = ["unfused", "cpp-op", "copy"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_step_cpu(benchmark, shape, impl):
    problem = StepProblem(shape, torch.float32, "cpu")
    group = f"step cpu {shape_id(shape)} fp32"
    steps = 20 if shape[0] * shape[2] * shape[3] <= 2 * 64 * 64 else 3
    if impl == "unfused":
        fn = problem.unfused
    elif impl == "cpp-op":
        fused = problem.fused_out("native")
        # Same inputs, same result: fused vs unfused (both fp32) and vs the float64 reference.
        out = fused().clone()
        unfused = problem.unfused()
        err = reference.relative_error(out, unfused)
        assert err <= 2e-6, f"C++ op vs unfused fp32: relative error {err:.2e}"
        problem.check(out, "C++ op", TOLERANCE[torch.float32])
        fn = fused
    else:
        fn = problem.copy
    run_benchmark(benchmark, StepTimer(fn, "cpu", steps), group=group, name=impl,
                  bytes_moved=problem.bytes_moved, baseline=impl == "unfused", is_copy=impl == "copy",
                  extra={"shape": list(shape), "dtype": "float32", "impl": impl,
                         "goal": f">= {CPU_GOAL_SPEEDUP}x unfused and <= {CPU_GOAL_COPY_RATIO}x copy (large size)"})


# --------------------------------------------------------------------------------------------------
# GPU group
# --------------------------------------------------------------------------------------------------

GPU_IMPLS = ["unfused-eager", "unfused-compile", "cuda-op", "triton-op"]
GPU_STEPS_PER_CALL = 20
_COMPILED = {}


def _compiled_unfused(problem: StepProblem):
    """The unfused reference under torch.compile (inductor fuses it into one or two kernels); step is a
    device tensor so the compiled graph is step-independent, like ours."""
    key = (tuple(problem.x.shape), problem.dtype)
    if key not in _COMPILED:
        def step_fn(x, model_output, table, step, noise):
            return reference.ddim_step(x, model_output, table, step, guidance_scale=GUIDANCE, noise=noise,
                                       compute_dtype=None)[0]

        _COMPILED[key] = torch.compile(step_fn, fullgraph=True, dynamic=False)
    compiled = _COMPILED[key]
    return lambda: compiled(problem.x, problem.model_output, problem.table, problem.step, problem.noise)


@requires_cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("impl", GPU_IMPLS + ["copy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_step_cuda(benchmark, shape, dtype, impl, graph):
    if impl == "copy" and graph:
        pytest.skip("one copy entry per group (eager: a single cudaMemcpyAsync kernel)")
    problem = StepProblem(shape, dtype, "cuda")
    group = f"step cuda {shape_id(shape)} {str(dtype).replace('torch.', '')}"
    if impl == "unfused-eager":
        fn = lambda: problem.unfused(step=problem.step)  # noqa: E731
        out = fn()
        problem.check(out, impl, TOLERANCE[dtype] if dtype == torch.float32 else UNFUSED_FP16_TOLERANCE)
    elif impl == "unfused-compile":
        fn = _compiled_unfused(problem)
        out = fn()
        problem.check(out, impl, TOLERANCE[dtype] if dtype == torch.float32 else UNFUSED_FP16_TOLERANCE)
    elif impl in ("cuda-op", "triton-op"):
        if impl == "cuda-op" and not ops.has_native_kernel("cuda"):
            pytest.skip("the C++ extension was built without CUDA kernels")
        fn = problem.fused_out("triton" if impl == "triton-op" else "native")
        problem.check(fn().clone(), impl, TOLERANCE[dtype])
    else:
        fn = problem.copy
    timer = StepTimer(fn, "cuda", GPU_STEPS_PER_CALL, use_graph=graph)
    name = impl + (" +graph" if graph else "")
    run_benchmark(benchmark, timer, group=group, name=name, bytes_moved=problem.bytes_moved,
                  baseline=impl == "unfused-eager" and not graph, is_copy=impl == "copy",
                  extra={"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": impl,
                         "device_name": hardware_name("cuda")})
