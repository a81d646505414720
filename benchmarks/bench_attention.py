"""Attention side by side (pytest-benchmark): ldm's einsum path, scaled_dot_product_attention (every
backend torch.nn.attention.sdpa_kernel offers), our CUDA softmax path (bmm + fused scale/mask/softmax +
bmm) and our fused Triton kernel, for the SD UNet's attention shapes.

Groups:
* ``attn cuda <model> <cross|self> Lq=.. d=.. <dtype>``: SD1.5 (8 heads, d 40/80/160/160 at Lq
  4096/1024/256/64) and SD2 (d 64, heads 5/10/20/20) per UNet level, batch 2 (CFG), cross (Lk 77) and
  self (Lk = Lq), fp16 and bf16. Each entry reports time, GB/s (q, k, v read once, out written once)
  and TFLOP/s (4 B H Lq Lk d). Skipped without CUDA.
* ``attn cpu cross 16x1024x77x80 fp32``: the C++ CPU op vs the einsum path vs SDPA on CPU (runs in CI).

``python benchmarks/bench_attention.py`` prints the same table on a GPU (plus the whole-UNet-step total
of SD1.5's 16 cross-attention calls and the goal ratios: cross-attention B*H=16, Lq 4096, Lk 77, d 40
>= 1.5x faster than SDPA's best backend and >= 4x faster than einsum; self-attention within 1.25x of
SDPA's best). Goals are reported, never asserted.
"""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import ddim_fast.attention as fused  # noqa: F401  (registers the ops and the CUDA Triton kernel)
from conftest import StepTimer, hardware_name, requires_cuda, run_benchmark

BATCH = 2  # CFG: uncond + cond
TEXT_TOKENS = 77
# (Lq, heads, head_dim) per UNet level at 512 px.
MODELS = {
    "sd15": [(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)],
    "sd2": [(4096, 5, 64), (1024, 10, 64), (256, 20, 64), (64, 20, 64)],
}
# SD1.5's UNet: cross-attention calls per level in one forward (down 2+2+2, mid 1, up 3+3+3).
SD15_CALLS_PER_LEVEL = {4096: 5, 1024: 5, 256: 5, 64: 1}
GPU_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _sdpa_backends() -> dict:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # very old torch
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


class Problem:
    """q [B, H, Lq, d], k/v [B, H, Lk, d] plus ldm's 3-D views, and the work's bytes and FLOPs."""

    def __init__(self, lq, lk, heads, head_dim, dtype, device, batch=BATCH):
        gen = torch.Generator().manual_seed(0)
        shape_q, shape_k = (batch, heads, lq, head_dim), (batch, heads, lk, head_dim)
        self.q = torch.randn(shape_q, generator=gen).to(dtype).to(device)
        self.k = torch.randn(shape_k, generator=gen).to(dtype).to(device)
        self.v = torch.randn(shape_k, generator=gen).to(dtype).to(device)
        self.q3, self.k3, self.v3 = (t.reshape(batch * heads, t.shape[2], head_dim) for t in (self.q, self.k, self.v))
        self.scale = head_dim ** -0.5
        self.device = torch.device(device)
        elem = self.q.element_size()
        self.bytes = elem * batch * heads * head_dim * (2 * lq + 2 * lk)
        self.flops = 4 * batch * heads * lq * lk * head_dim

    # The implementations (each returns the attention output).
    def einsum(self):
        sim = torch.einsum("b i d, b j d -> b i j", self.q3, self.k3) * self.scale
        return torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), self.v3)

    def sdpa(self):
        return F.scaled_dot_product_attention(self.q, self.k, self.v, scale=self.scale)

    def ours_softmax(self):
        sim = torch.bmm(self.q3, self.k3.transpose(1, 2))
        torch.ops.ddim_fast.scaled_masked_softmax_(sim, None, self.scale)  # in place: no second buffer
        return torch.bmm(sim, self.v3)

    def ours_triton(self):
        return torch.ops.ddim_fast.attention_triton(self.q, self.k, self.v, self.scale, None)

    def ours_cpu(self):
        return torch.ops.ddim_fast.attention(self.q, self.k, self.v, self.scale, None)


def implementations(device_type: str) -> dict:
    """name -> (method name, context manager factory)."""
    impls = {"einsum": ("einsum", contextlib.nullcontext)}
    if device_type == "cuda":
        from torch.nn.attention import sdpa_kernel

        for name, backend in _sdpa_backends().items():
            impls[f"sdpa_{name}"] = ("sdpa", lambda b=backend: sdpa_kernel([b]))
        if fused.has_native_kernel("cuda", "scaled_masked_softmax"):
            impls["ours_softmax"] = ("ours_softmax", contextlib.nullcontext)
        impls["ours_triton"] = ("ours_triton", contextlib.nullcontext)
    else:
        impls["sdpa"] = ("sdpa", contextlib.nullcontext)
        impls["ours_cpu"] = ("ours_cpu", contextlib.nullcontext)
    return impls


def make_timer(problem: Problem, method: str, ctx_factory, steps: int):
    """A StepTimer for one implementation, or None when the backend refuses the shape/dtype."""
    fn = getattr(problem, method)

    def step():
        with ctx_factory():
            return fn()

    try:
        step()
    except RuntimeError:  # e.g. an SDPA backend without a kernel for this head dim or dtype
        return None
    return StepTimer(step, problem.device, steps)


def _gpu_cases():
    cases = []
    for model, levels in MODELS.items():
        for lq, heads, head_dim in levels:
            for kind in ("cross", "self"):
                for dtype_name in GPU_DTYPES:
                    cases.append(pytest.param(model, kind, lq, heads, head_dim, dtype_name,
                                              id=f"{model}-{kind}-Lq{lq}-d{head_dim}-{dtype_name}"))
    return cases


GPU_IMPLS = ["einsum", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "ours_softmax", "ours_triton"]


@requires_cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("model,kind,lq,heads,head_dim,dtype_name", _gpu_cases())
def test_attention_cuda(benchmark, model, kind, lq, heads, head_dim, dtype_name, impl):
    lk = TEXT_TOKENS if kind == "cross" else lq
    problem = Problem(lq, lk, heads, head_dim, GPU_DTYPES[dtype_name], "cuda")
    impls = implementations("cuda")
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    timer = make_timer(problem, *impls[impl], steps=10)
    if timer is None:
        pytest.skip(f"{impl} has no kernel for this shape/dtype")
    per_call = run_benchmark(benchmark, timer, group=f"attn cuda {model} {kind} Lq={lq} d={head_dim} {dtype_name}",
                             name=impl, bytes_moved=problem.bytes, baseline=impl == "einsum",
                             extra={"tflops": problem.flops / 1e12})
    benchmark.extra_info["tflop_per_s"] = problem.flops / per_call / 1e12


@pytest.mark.parametrize("impl", ["einsum", "sdpa", "ours_cpu"])
def test_attention_cpu(benchmark, impl):
    problem = Problem(1024, TEXT_TOKENS, 8, 80, torch.float32, "cpu")
    timer = make_timer(problem, *implementations("cpu")[impl], steps=1)
    run_benchmark(benchmark, timer, group="attn cpu cross 16x1024x77x80 fp32", name=impl,
                  bytes_moved=problem.bytes, baseline=impl == "einsum")


# --------------------------------------------------------------------------------------------------
# CLI table
# --------------------------------------------------------------------------------------------------


def _check_close(problem: Problem, out: torch.Tensor, name: str) -> str:
    ref = problem.sdpa() if problem.device.type == "cuda" else problem.einsum()
    err = (out.float().reshape(ref.shape) - ref.float()).norm() / ref.float().norm()
    return "" if err < 2e-2 else f"  (MISMATCH vs SDPA: rel err {err:.2e})"


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# attention benchmark on {hardware_name(device)}, torch {torch.__version__}")
    if device == "cpu":
        problem = Problem(1024, TEXT_TOKENS, 8, 80, torch.float32, "cpu")
        for name, (method, ctx) in implementations("cpu").items():
            timer = make_timer(problem, method, ctx, steps=3)
            print(f"cpu cross 16x1024x77x80 fp32 {name:>10}: {timer.seconds_per_step(5) * 1e3:8.3f} ms")
        return 0
    impls = implementations("cuda")
    unet_total = {}
    goals = {}
    for dtype_name, dtype in GPU_DTYPES.items():
        for model, levels in MODELS.items():
            for kind in ("cross", "self"):
                for lq, heads, head_dim in levels:
                    lk = TEXT_TOKENS if kind == "cross" else lq
                    problem = Problem(lq, lk, heads, head_dim, dtype, device)
                    times = {}
                    for name, (method, ctx) in impls.items():
                        timer = make_timer(problem, method, ctx, steps=20)
                        if timer is None:
                            continue
                        t = timer.seconds_per_step(7)
                        times[name] = t
                        note = _check_close(problem, getattr(problem, method)(), name) if name.startswith("ours") else ""
                        print(f"{model} {kind:5} {dtype_name} B*H={BATCH * heads:3} Lq={lq:5} Lk={lk:5} d={head_dim:3} "
                              f"{name:>15}: {t * 1e6:9.1f} us {problem.bytes / t / 1e9:8.1f} GB/s "
                              f"{problem.flops / t / 1e12:7.2f} TFLOP/s{note}")
                    sdpa_best = min((t for n, t in times.items() if n.startswith("sdpa")), default=float("nan"))
                    ours = times.get("ours_triton", float("nan"))
                    print(f"  -> triton vs best SDPA: {sdpa_best / ours:.2f}x, vs einsum: "
                          f"{times.get('einsum', float('nan')) / ours:.2f}x")
                    if model == "sd15" and kind == "cross":
                        for name, t in times.items():
                            unet_total.setdefault((dtype_name, name), 0.0)
                            unet_total[(dtype_name, name)] += SD15_CALLS_PER_LEVEL[lq] * t
                    if model == "sd15" and lq == 4096:
                        goals[(dtype_name, kind)] = (sdpa_best / ours, times.get("einsum", float("nan")) / ours)
    print("\n# SD1.5 UNet step: the 16 cross-attention calls (batch 2)")
    for (dtype_name, name), total in sorted(unet_total.items()):
        print(f"{dtype_name} {name:>15}: {total * 1e3:8.3f} ms")
    print("\n# goals (Lq 4096, B*H 16, d 40)")
    for (dtype_name, kind), (vs_sdpa, vs_einsum) in sorted(goals.items()):
        goal = ">= 1.5x SDPA best, >= 4x einsum" if kind == "cross" else ">= 0.8x SDPA best (within 1.25x)"
        print(f"{dtype_name} {kind}: {vs_sdpa:.2f}x SDPA best, {vs_einsum:.2f}x einsum   goal {goal}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    sys.exit(main())
