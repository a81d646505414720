"""Shared test helpers: the one tolerance table (docs/design.md), poisoning, relative error, devices, and
IEEE fp32 math (no TF32) for every test.

TRITON_INTERPRET=1 is set here, before anything imports triton, when no CUDA device is present, so the
Triton kernels run on CPU tensors in CI.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from oracles import relative_error  # noqa: E402  (the tests' own metric, tests/oracles.py)

# docs/design.md's numerical contract: relative error (||out - ref|| / ||ref||) against the float64 oracle
# (tests/oracles.py), by storage dtype. The one table every kernel test uses.
TOLERANCES = {
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# Whole-run sampler contract (fp32): drop-ins equal upstream to this relative error.
SAMPLER_RTOL = 1e-5

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The table is for kernels that round each output a few times (the step: a handful of flops per element).
# An output that sums n terms in fp32 (every kernel here accumulates in fp32, whatever the storage dtype)
# carries the rounding of n partial sums instead: for random-sign terms those errors add like a random
# walk, a fraction of u * sqrt(n) of the result's norm (u = 2^-24, fp32's unit roundoff; 0.3 u sqrt(n) for
# attention at n = 1024 and 4096). Such an output is held to max(table, sqrt(n) * u): the table's value up
# to ~280 terms in fp32, 3.8e-6 at 4096. The case that needs it: the Triton attention's fp32 path sums p v
# in one FMA chain over every key (Triton folds `acc += tl.dot(p, v)` into the dot's accumulator): 1.195e-6
# at 4096 keys on the H200 (2026-12-04), 1.186e-6 in a CPU emulation of that chain (4.8e-7 with a separate
# sum per 16-key tile). That is correct fp32 arithmetic past a flat 1e-6, so the fp64 reference is right
# and the flat table entry is what does not fit a 4096-term reduction. fp16/bf16's entries are far above
# sqrt(n) * u for every n used here.
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def tolerance(dtype: torch.dtype, reduction: int = 1) -> float:
    """The table's tolerance for `dtype`, widened for outputs that sum `reduction` terms (see above)."""
    return max(TOLERANCES[dtype], math.sqrt(max(reduction, 1)) * FP32_UNIT_ROUNDOFF)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | float, what: str = "output",
                     reduction: int = 1):
    """Relative-error check with the table's tolerance for `dtype` (widened for a `reduction` of that many
    terms, see `tolerance`) or an explicit float, and no new NaN."""
    tol = dtype if isinstance(dtype, float) else tolerance(dtype, reduction)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref_nan = torch.isnan(ref.double().cpu())
    out_nan = torch.isnan(out.double().cpu())
    assert not (out_nan & ~ref_nan).any(), f"{what}: NaN where the reference has none"
    keep = ~ref_nan
    err = relative_error(out.double().cpu()[keep], ref.double().cpu()[keep])
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element the kernel fails to write is caught."""
    return t.fill_(float("nan"))


def assert_fully_written(t: torch.Tensor, what: str = "output"):
    bad = torch.isnan(t.double()).sum().item()
    assert bad == 0, f"{what}: {bad} of {t.numel()} elements were not written (still NaN poison)"


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` whose data pointer is offset by one element from its storage (storage offset 1)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def devices():
    """Devices the native kernels can be tested on here."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def ieee_fp32():
    """Every test runs its fp32 matmuls and convolutions in IEEE fp32, and the flags are restored after.

    PyTorch lets cuDNN use TF32 (10-bit mantissa) for fp32 convolutions by default (cuBLAS matmuls stay
    IEEE unless asked), so on Ampere and newer GPUs two fp32 runs of one model that pick different kernels
    (eager vs inside a CUDA graph, batch 2 vs 1, ...) differ by ~1e-4 (2.4e-4 for the tiny UNet's graphed
    loop on the H200, 2026-12-04), and nothing is compared like with like against the fp64 references or
    the 1e-5 sampler contract. With TF32 off both sides round as IEEE fp32. On CPU the flags change nothing.
    A test about TF32 itself sets the flags inside its body."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
