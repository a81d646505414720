"""Fused attention for Stable Diffusion's UNet: the Python front door of the attention ops (the patchers
that put them into ldm and diffusers UNets are in ``ddim_fast.attention_processors``).

Ops (schemas in csrc/ops.cpp; registered by ``import ddim_fast``):

* ``torch.ops.ddim_fast.scaled_masked_softmax(scores, mask, scale)`` and the in-place
  ``scaled_masked_softmax_``: softmax(scores * scale (+ mask)) over the last dim in one pass (ldm's
  ``sim * scale`` -> ``masked_fill_`` -> ``softmax`` chain). C++ CPU kernel; CUDA kernel (warp per row up
  to 1024 keys, block per row beyond) when the extension is built with CUDA.
* ``torch.ops.ddim_fast.attention(q, k, v, scale, mask)``: softmax(q k^T * scale (+ mask)) v. C++ CPU
  kernel; on CUDA the fused Triton kernel.
* ``torch.ops.ddim_fast.attention_triton(q, k, v, scale, mask)``: the Triton kernel as its own op (runs on
  CPU tensors under ``TRITON_INTERPRET=1``; see ddim_fast/triton/attention.py).

All of them compute in fp32 whatever the storage dtype (fp32, fp16, bf16) and return the input dtype.

Accepted shapes:

* attention: q [B, H, Lq, D] with k, v [B, H, Lk, D] (any strides), or ldm's 3-D [B*H, Lq, D] with
  [B*H, Lk, D]. Leading dims must match exactly (no broadcasting); one head dim D for q, k and v.
* scaled_masked_softmax: scores [..., Lq, Lk] with 2 to 4 dims, any strides.
* masks (both ops): the mask has as many dims as the scores [..., Lq, Lk] (for attention: q's dims with
  Lk last); its last dim is Lk and every other dim is either the scores' size or 1 (broadcast without a
  copy). So ldm's key-padding mask is [B*H, 1, Lk] (3-D) or [B, 1, 1, Lk] (4-D), diffusers'
  ``prepare_attention_mask`` output viewed as [B, H, 1 or Lq, Lk] fits, and a full [B, H, Lq, Lk] mask
  fits. Boolean masks keep True and give masked logits -FLT_MAX like ldm's ``masked_fill`` (a fully
  masked row becomes uniform, never NaN); float masks are additive and must have the scores' dtype
  (``fused_attention`` / ``scaled_masked_softmax`` cast them for you). Any other shape raises ValueError.

ldm's ``ATTN_PRECISION=fp32`` (the default of Stability-AI's ldm/modules/attention.py, read from the
environment) upcasts q and k so the scores and the softmax are fp32 under fp16 autocast. Every kernel
here already computes the scores, the softmax and the p v product in fp32 (p is rounded to the input
dtype before the tensor-core p v product in the fp16/bf16 Triton kernel, as any flash-attention kernel
does), so the patched forward honours that intent for either setting.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ddim_fast import reference
from ddim_fast._checks import check_mask, check_qkv, check_softmax_scale, require_float_tensor
from ddim_fast._library import has_native_kernel, triton_found

__all__ = ["fused_attention", "scaled_masked_softmax", "ATTENTION_BACKENDS", "check_mask", "check_qkv"]

ATTENTION_BACKENDS = ("auto", "native", "triton", "reference")


# --------------------------------------------------------------------------------------------------
# Python front door
# --------------------------------------------------------------------------------------------------


def _check_mask(op: str, mask, score_shape: tuple, dtype: torch.dtype, device: torch.device):
    """check_mask after casting a float mask to the scores' dtype (the wrappers accept any float mask).
    Returns the mask (None stays None)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"{op}: mask must be bool (True = keep) or floating point (additive), got {mask.dtype}")
        mask = mask.to(dtype)
    check_mask(op, mask, score_shape, dtype, device)
    return mask


def _resolve_attention_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_found():
        raise RuntimeError("backend='triton': the triton package is not installed (pip install triton==3.6.0); "
                           "its kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
    if backend == "native" and not has_native_kernel(device.type, "attention"):
        raise RuntimeError(f"backend='native': ddim_fast::attention has no {device.type} kernel (CUDA needs Triton)")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_found():
        return "triton"
    if has_native_kernel(device.type, "attention"):
        return "native"
    raise RuntimeError(f"ddim_fast has no attention kernel for device {device}; use backend='reference'")


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) v in one fused kernel, fp32 math.

    q [B, H, Lq, D] and k, v [B, H, Lk, D] (any strides), or [B*H, Lq, D] and [B*H, Lk, D].
    ``scale`` defaults to 1/sqrt(D); it must be finite (NaN or inf raise ValueError). ``mask``: see the module docstring (bool keeps True; float is
    additive and is cast to q's dtype). ``backend``: 'auto' (Triton on CUDA, C++ on CPU), 'native'
    (torch.ops.ddim_fast.attention), 'triton' (torch.ops.ddim_fast.attention_triton) or 'reference'
    (PyTorch, fp32 math). Returns [..., Lq, D] in q's dtype (contiguous).
    """
    op = "fused_attention"
    check_qkv(op, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_softmax_scale(op, scale)
    mask = _check_mask(op, mask, tuple(q.shape[:-1]) + (k.shape[-2],), q.dtype, q.device)

    backend = _resolve_attention_backend(backend, q.device)
    if backend == "reference":
        return reference.attention(q, k, v, float(scale), mask, compute_dtype=torch.float32).to(q.dtype)
    if backend == "triton":
        return torch.ops.ddim_fast.attention_triton(q, k, v, float(scale), mask)
    return torch.ops.ddim_fast.attention(q, k, v, float(scale), mask)


def scaled_masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 1.0, *,
                          inplace: bool = False, backend: str = "auto") -> torch.Tensor:
    """softmax(scores * scale (+ mask)) over the last dim in one pass, fp32 math.

    scores [..., Lq, Lk] (2 to 4 dims, any strides); mask per the module docstring; ``scale`` finite. ``inplace`` writes
    the result into ``scores`` (the C++ ``scaled_masked_softmax_``). ``backend``: 'auto'/'native' (the
    C++ CPU / CUDA kernels) or 'reference'. Returns a tensor of scores' shape and dtype.
    """
    op = "scaled_masked_softmax"
    require_float_tensor(op, "scores", scores)
    if not 2 <= scores.dim() <= 4:
        raise ValueError(f"{op}: scores must have 2 to 4 dims [..., Lq, Lk], got shape {tuple(scores.shape)}")
    scale = check_softmax_scale(op, scale)
    mask = _check_mask(op, mask, tuple(scores.shape), scores.dtype, scores.device)
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"{op}: backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend != "reference" and not has_native_kernel(scores.device.type, "scaled_masked_softmax"):
        if backend == "native":
            raise RuntimeError(f"{op}: no {scores.device.type} kernel (build the extension with CUDA for GPUs)")
        backend = "reference"
    if backend == "reference":
        out = reference.scaled_masked_softmax(scores, mask, float(scale), compute_dtype=torch.float32).to(scores.dtype)
        return scores.copy_(out) if inplace else out
    if inplace:
        torch.ops.ddim_fast.scaled_masked_softmax_(scores, mask, float(scale))
        return scores
    return torch.ops.ddim_fast.scaled_masked_softmax(scores, mask, float(scale))
