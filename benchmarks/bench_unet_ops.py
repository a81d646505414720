"""The UNet body's fused ops side by side with what a plain diffusers UNet runs (pytest-benchmark).

Groups:
* ``unet gn cuda <where> BxCxHxW <dtype> <layout>``: ResnetBlock2D's norm2 (``h + temb`` then GroupNorm then SiLU:
  "plain", three PyTorch calls) against ``ddim_fast::group_norm_silu`` with ``channel_add`` ("ours"), and a copy of
  the tensor (the memory floor: the fused op reads x twice and writes once, so ~1.5x the copy time is the target).
  SD1.5 shapes at 512 px, batch 2 (CFG), fp16 and bf16, channels_last (what ``optimize`` runs) and NCHW. Each
  entry is one CUDA graph of 10 calls replayed (kernel time, no launch overhead). Skipped without CUDA.
* ``unet geglu cuda 2x<tokens>x2D <dtype>``: diffusers' GEGLU tail (chunk, gelu, mul) against ``ddim_fast::geglu``.
* ``unet gn cpu`` / ``unet geglu cpu`` (fp32, run in CI): the plain modules against the ops' CPU kernels (PyTorch's
  composites), the measurement behind "never slower than plain on the CPU" (docs/design.md section 3).

Before timing, every "ours" entry is checked against its "plain" twin (fp16/bf16: the tolerance table, fp32: 1e-5),
so an entry cannot time something that computes another result. ``python benchmarks/bench_unet_ops.py`` prints the
same comparison as a table (GPU: every SD1.5 GroupNorm and GEGLU shape, with the whole UNet step's sum).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import ddim_fast  # noqa: F401  (registers the ops)
from conftest import StepTimer, hardware_name, requires_cuda, run_benchmark
from ddim_fast.reference import relative_error

GPU_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# SD1.5 at 512 px, batch 2: (where, channels, size) of its 61 GroupNorms, and how many of each one UNet step runs
# (ResnetBlock2D norm1 and norm2, Transformer2DModel norm, conv_norm_out). Up blocks normalize skip concatenations.
# Every entry times ResnetBlock2D's norm2 computation (temb add, GroupNorm, SiLU); norm1 has no add, the transformers'
# norms and conv_norm_out neither add nor SiLU, so the step sums below bound plain's time from above.
SD15_GROUP_NORMS = [
    ("down0", 320, 64, 6), ("down1-in", 320, 32, 1), ("down1", 640, 32, 4), ("down2-in", 640, 16, 1),
    ("down2", 1280, 16, 5), ("down3", 1280, 8, 4), ("mid", 1280, 8, 5),
    ("up0", 2560, 8, 3), ("up0-out", 1280, 8, 3), ("up1", 2560, 16, 2), ("up1-last", 1920, 16, 1),
    ("up1-out", 1280, 16, 6), ("up2", 1920, 32, 1), ("up2-b", 1280, 32, 1), ("up2-c", 960, 32, 1),
    ("up2-out", 640, 32, 6), ("up3", 960, 64, 1), ("up3-b", 640, 64, 2), ("up3-out", 320, 64, 7),
]
# SD1.5's GEGLU (transformer feed-forward, D = 4 x width) per level: (tokens, D, calls per UNet step).
SD15_GEGLU = [(4096, 1280, 5), (1024, 2560, 5), (256, 5120, 5), (64, 5120, 1)]
BATCH = 2


class GroupNormProblem:
    """x [B, C, H, W] (+ temb [B, C]) and the norm2 computation, plain and fused."""

    def __init__(self, channels, size, dtype, device, channels_last=True, batch=BATCH):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, channels, size, size, generator=gen).to(dtype).to(device)
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.temb = torch.randn(batch, channels, generator=gen).to(dtype).to(device)
        # Inference, as the fused UNet runs: parameters without autograd (the ops have no backward; a parameter that
        # requires grad would send the op through the autograd fallback and time that instead).
        self.norm = torch.nn.GroupNorm(32, channels, eps=1e-5).to(device=device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()
        self.out = torch.empty_like(self.x)
        self.device = torch.device(device)
        self.bytes = 3 * self.x.numel() * self.x.element_size()  # the fused op's two reads and one write

    def plain(self):
        return F.silu(self.norm(self.x + self.temb[:, :, None, None]))

    def ours(self):
        return torch.ops.ddim_fast.group_norm_silu(self.x, self.norm.weight, self.norm.bias, 32, 1e-5, True,
                                                   self.temb)

    def copy(self):
        return self.out.copy_(self.x)


class GegluProblem:
    def __init__(self, tokens, d, dtype, device, batch=BATCH):
        gen = torch.Generator().manual_seed(0)
        self.h = torch.randn(batch, tokens, 2 * d, generator=gen).to(dtype).to(device)
        self.out = torch.empty(batch, tokens, d, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.bytes = (self.h.numel() + self.out.numel()) * self.h.element_size()

    def plain(self):
        values, gate = self.h.chunk(2, dim=-1)
        return values * F.gelu(gate)

    def ours(self):
        return torch.ops.ddim_fast.geglu(self.h)

    def copy(self):
        return self.out.copy_(self.h[..., : self.out.shape[-1]])


def checked_timer(problem, impl: str, steps: int, use_graph: bool) -> StepTimer:
    """A StepTimer of problem.<impl>, after checking that 'ours' computes what 'plain' does."""
    if impl == "ours":
        expected, got = problem.plain(), problem.ours()
        dtype = got.dtype
        err = relative_error(got, expected)
        assert err <= TOLERANCE[dtype], f"ours differs from plain: relative error {err:.2e} ({dtype})"
    return StepTimer(getattr(problem, impl), problem.device, steps, use_graph=use_graph)


def _gn_cases():
    cases = []
    for where, channels, size, _calls in SD15_GROUP_NORMS:
        if where not in ("down0", "down2", "up1", "up3-out"):
            continue  # the table (python benchmarks/bench_unet_ops.py) has every shape
        for dtype_name in GPU_DTYPES:
            for layout in ("channels_last", "nchw"):
                cases.append(pytest.param(where, channels, size, dtype_name, layout,
                                          id=f"{where}-{channels}x{size}-{dtype_name}-{layout}"))
    return cases


@requires_cuda
@pytest.mark.parametrize("impl", ["plain", "ours", "copy"])
@pytest.mark.parametrize("where,channels,size,dtype_name,layout", _gn_cases())
def test_group_norm_cuda(benchmark, where, channels, size, dtype_name, layout, impl):
    problem = GroupNormProblem(channels, size, GPU_DTYPES[dtype_name], "cuda", channels_last=layout == "channels_last")
    timer = checked_timer(problem, impl, steps=10, use_graph=True)
    run_benchmark(benchmark, timer, group=f"unet gn cuda {where} {BATCH}x{channels}x{size}x{size} {dtype_name} {layout}",
                  name=impl, bytes_moved=problem.bytes, baseline=impl == "plain", is_copy=impl == "copy")


@requires_cuda
@pytest.mark.parametrize("impl", ["plain", "ours", "copy"])
@pytest.mark.parametrize("tokens,d", [(t, d) for t, d, _ in SD15_GEGLU[:3]])
@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
def test_geglu_cuda(benchmark, tokens, d, dtype_name, impl):
    problem = GegluProblem(tokens, d, GPU_DTYPES[dtype_name], "cuda")
    timer = checked_timer(problem, impl, steps=10, use_graph=True)
    run_benchmark(benchmark, timer, group=f"unet geglu cuda {BATCH}x{tokens}x{2 * d} {dtype_name}", name=impl,
                  bytes_moved=problem.bytes, baseline=impl == "plain", is_copy=impl == "copy")


@pytest.mark.parametrize("impl", ["plain", "ours"])
def test_group_norm_cpu(benchmark, impl):
    problem = GroupNormProblem(320, 32, torch.float32, "cpu")
    timer = checked_timer(problem, impl, steps=1, use_graph=False)
    run_benchmark(benchmark, timer, group=f"unet gn cpu {BATCH}x320x32x32 fp32 channels_last", name=impl,
                  bytes_moved=problem.bytes, baseline=impl == "plain")


@pytest.mark.parametrize("impl", ["plain", "ours"])
def test_geglu_cpu(benchmark, impl):
    problem = GegluProblem(1024, 640, torch.float32, "cpu")
    timer = checked_timer(problem, impl, steps=1, use_graph=False)
    run_benchmark(benchmark, timer, group=f"unet geglu cpu {BATCH}x1024x1280 fp32", name=impl,
                  bytes_moved=problem.bytes, baseline=impl == "plain")


# --------------------------------------------------------------------------------------------------
# CLI table
# --------------------------------------------------------------------------------------------------


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# UNet-body ops on {hardware_name(device)}, torch {torch.__version__}")
    if device == "cpu":
        for problem, label in ((GroupNormProblem(320, 32, torch.float32, "cpu"), "gn 2x320x32x32 fp32 channels_last"),
                               (GegluProblem(1024, 640, torch.float32, "cpu"), "geglu 2x1024x1280 fp32")):
            times = {impl: checked_timer(problem, impl, 3, False).seconds_per_step(9) for impl in ("plain", "ours")}
            print(f"cpu {label}: plain {times['plain'] * 1e3:.3f} ms, ours {times['ours'] * 1e3:.3f} ms "
                  f"({times['plain'] / times['ours']:.2f}x)")
        return 0
    for dtype_name, dtype in GPU_DTYPES.items():
        for layout in ("channels_last", "nchw"):
            total = {"plain": 0.0, "ours": 0.0, "copy": 0.0}
            for where, channels, size, calls in SD15_GROUP_NORMS:
                problem = GroupNormProblem(channels, size, dtype, device, channels_last=layout == "channels_last")
                times = {impl: checked_timer(problem, impl, 20, True).seconds_per_step(7) for impl in total}
                for impl, t in times.items():
                    total[impl] += calls * t
                print(f"gn {dtype_name} {layout:13} {where:9} {BATCH}x{channels:4}x{size:2}x{size:2}: plain "
                      f"{times['plain'] * 1e6:7.1f} us, ours {times['ours'] * 1e6:7.1f} us "
                      f"({times['plain'] / times['ours']:5.2f}x), copy {times['copy'] * 1e6:6.1f} us "
                      f"(ours {times['ours'] / times['copy']:4.2f}x copy)")
            print(f"  -> SD1.5 UNet step, {sum(c for *_, c in SD15_GROUP_NORMS)} GroupNorms ({dtype_name}, {layout}): "
                  f"plain {total['plain'] * 1e3:.3f} ms, ours {total['ours'] * 1e3:.3f} ms, copies "
                  f"{total['copy'] * 1e3:.3f} ms")
        total = {"plain": 0.0, "ours": 0.0}
        for tokens, d, calls in SD15_GEGLU:
            problem = GegluProblem(tokens, d, dtype, device)
            times = {impl: checked_timer(problem, impl, 20, True).seconds_per_step(7) for impl in ("plain", "ours", "copy")}
            for impl in total:
                total[impl] += calls * times[impl]
            print(f"geglu {dtype_name} {BATCH}x{tokens:4}x{2 * d}: plain {times['plain'] * 1e6:7.1f} us, ours "
                  f"{times['ours'] * 1e6:7.1f} us ({times['plain'] / times['ours']:5.2f}x), copy "
                  f"{times['copy'] * 1e6:6.1f} us")
        print(f"  -> SD1.5 UNet step, 16 GEGLUs ({dtype_name}): plain {total['plain'] * 1e3:.3f} ms, ours "
              f"{total['ours'] * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    sys.exit(main())
