"""Shared test helpers: the one tolerance table (docs/design.md), poisoning, relative error, devices.

TRITON_INTERPRET=1 is set here, before anything imports triton, when no CUDA device is present, so the
Triton kernels run on CPU tensors in CI.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddim_fast.reference import relative_error  # noqa: E402

# docs/design.md's numerical contract: relative error (||out - ref|| / ||ref||) against the fp64 reference,
# by storage dtype. The one table every kernel test uses.
TOLERANCES = {
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# Whole-run sampler contract (fp32): drop-ins equal upstream to this relative error.
SAMPLER_RTOL = 1e-5

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | float, what: str = "output"):
    """Relative-error check with the table's tolerance for `dtype` (or an explicit float), and no new NaN."""
    tol = dtype if isinstance(dtype, float) else TOLERANCES[dtype]
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
