"""Fused kernels for the non-GEMM hot paths of a Stable Diffusion UNet body: the Python front door of the
``group_norm_silu`` and ``geglu`` ops (``ddim_fast.unet_fusion`` puts them into a diffusers UNet).

Ops (schemas in csrc/ops.cpp; registered by ``import ddim_fast``):

* ``torch.ops.ddim_fast.group_norm_silu(x, weight, bias, num_groups, eps, apply_silu, channel_add=None)``:
  GroupNorm over x [B, C, *spatial] (any strides; y laid out like ``torch.empty_like(x)``, so channels_last stays
  channels_last and NCHW stays NCHW), optionally after adding ``channel_add`` [B, C] (ResnetBlock2D's projected
  time embedding) and with SiLU after the affine transform. CPU: PyTorch's composite; CUDA: the Triton kernels
  (ddim_fast/triton/group_norm.py).
* ``torch.ops.ddim_fast.geglu(h)``: diffusers' GEGLU after its projection, h [..., 2D] ->
  h[..., :D] * gelu(h[..., D:]) (exact erf GELU), a new contiguous [..., D] tensor. CPU: PyTorch's composite;
  CUDA: the Triton kernel (ddim_fast/triton/geglu.py).
* ``group_norm_silu_triton`` / ``geglu_triton``: the Triton kernels as ops of their own (CPU tensors under
  ``TRITON_INTERPRET=1``).

x / h are float32, float16 or bfloat16; weight, bias and channel_add any of those three (read as fp32). The Triton
kernels compute everything in fp32; the CPU composites round to the storage dtype between PyTorch's steps, as a
plain UNet does. Both meet the tolerance table of docs/design.md against ``ddim_fast.reference``.

LayerNorm has no op here: PyTorch's ``layer_norm`` is already one vectorized kernel per call, and the
neighbours a fused op could absorb (the residual add before it) live inside ``BasicTransformerBlock.forward``;
docs/design.md section 3 says why that does not pay today.
"""

from __future__ import annotations

from typing import Optional

import torch

from ddim_fast import reference
from ddim_fast._checks import check_geglu_args, check_group_norm_args, require_float_tensor

__all__ = ["group_norm_silu", "geglu", "UNET_OP_BACKENDS"]

# 'auto': the op (PyTorch's composite on the CPU, Triton on CUDA); 'triton': the Triton op on any device it runs
# on (CUDA; CPU under TRITON_INTERPRET=1); 'reference': ddim_fast.reference in fp32, cast back.
UNET_OP_BACKENDS = ("auto", "triton", "reference")


def _check_backend(op: str, backend: str) -> None:
    if backend not in UNET_OP_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {UNET_OP_BACKENDS}, got {backend!r}")


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    num_groups: int = 32, eps: float = 1e-5, apply_silu: bool = True, *,
                    channel_add: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """GroupNorm (+ SiLU) in one fused op, fp32 math: ``F.silu(F.group_norm(x + channel_add, num_groups, weight,
    bias, eps))`` without the intermediate tensors.

    x [B, C, *spatial] (any strides; C divisible by ``num_groups``); weight, bias [C] or None (no affine
    scale / shift); ``eps`` >= 0; ``apply_silu`` False gives the plain GroupNorm; channel_add [B, C] or None, added
    to x per (sample, channel) before the statistics (ResnetBlock2D's ``hidden_states + temb`` before norm2).
    Returns a tensor of x's shape and dtype laid out like ``torch.empty_like(x)``.
    """
    op = "group_norm_silu"
    _check_backend(op, backend)
    if not isinstance(apply_silu, bool):
        raise TypeError(f"{op}: apply_silu must be a bool, got {type(apply_silu).__name__}")
    check_group_norm_args(op, x, weight, bias, num_groups, eps, channel_add)
    if backend == "reference":
        return reference.group_norm_silu(x, weight, bias, int(num_groups), float(eps), apply_silu, channel_add,
                                         compute_dtype=torch.float32).to(x.dtype)
    fn = torch.ops.ddim_fast.group_norm_silu_triton if backend == "triton" else torch.ops.ddim_fast.group_norm_silu
    return fn(x, weight, bias, int(num_groups), float(eps), apply_silu, channel_add)


def geglu(h: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """diffusers' GEGLU after its projection in one pass: h [..., 2D] -> h[..., :D] * gelu(h[..., D:]) with the
    exact (erf) GELU, fp32 math. Returns a new contiguous [..., D] tensor in h's dtype."""
    op = "geglu"
    _check_backend(op, backend)
    require_float_tensor(op, "h", h)
    check_geglu_args(op, h)
    if backend == "reference":
        return reference.geglu(h, compute_dtype=torch.float32).to(h.dtype).contiguous()
    fn = torch.ops.ddim_fast.geglu_triton if backend == "triton" else torch.ops.ddim_fast.geglu
    return fn(h)
