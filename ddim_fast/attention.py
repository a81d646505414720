"""Fused attention for Stable Diffusion's UNet: the ops, their Python front door, and drop-in patchers
for ldm's ``CrossAttention`` and diffusers' attention processors.

Ops (schemas in csrc/ops.cpp, except the Triton one):

* ``torch.ops.ddim_fast.scaled_masked_softmax(scores, mask, scale)`` and the in-place
  ``scaled_masked_softmax_``: softmax(scores * scale (+ mask)) over the last dim in one pass (ldm's
  ``sim * scale`` -> ``masked_fill_`` -> ``softmax`` chain). C++ CPU kernel; CUDA kernel (warp per row up
  to 1024 keys, block per row beyond) when the extension is built with CUDA.
* ``torch.ops.ddim_fast.attention(q, k, v, scale, mask)``: softmax(q k^T * scale (+ mask)) v. C++ CPU
  kernel; on CUDA the fused Triton kernel (registered below with ``torch.library.register_kernel``).
* ``torch.ops.ddim_fast.attention_triton(q, k, v, scale, mask)``: the Triton kernel as its own custom op
  (runs on CPU tensors under ``TRITON_INTERPRET=1``; see ddim_fast/triton/attention.py).

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

import functools
import inspect
import logging
import math
import types
from typing import Optional

import torch
from torch import nn

from ddim_fast import reference
from ddim_fast.ops import has_native_kernel, triton_available

logger = logging.getLogger(__name__)

__all__ = [
    "fused_attention",
    "scaled_masked_softmax",
    "patch_attention",
    "unpatch_attention",
    "FusedAttnProcessor",
    "ATTENTION_BACKENDS",
]

ATTENTION_BACKENDS = ("auto", "native", "triton", "reference")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Fake kernels of the C++-defined ops, and the CUDA kernel of ddim_fast::attention (Triton)
# --------------------------------------------------------------------------------------------------


@torch.library.register_fake("ddim_fast::scaled_masked_softmax")
def _scaled_masked_softmax_fake(scores, mask, scale):
    return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)


@torch.library.register_fake("ddim_fast::scaled_masked_softmax_")
def _scaled_masked_softmax_inplace_fake(scores, mask, scale):
    return None


@torch.library.register_fake("ddim_fast::attention")
def _attention_fake(q, k, v, scale, mask):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@functools.lru_cache(maxsize=None)
def _triton_attention_module():
    """ddim_fast.triton.attention, or None when Triton cannot be used here."""
    if not triton_available():
        return None
    try:
        from ddim_fast.triton import attention as triton_attention
    except Exception as exc:  # triton broken: the C++ kernels still work
        logger.warning("ddim_fast: the Triton attention kernel is unavailable: %s", exc)
        return None
    return triton_attention


def _register_cuda_attention() -> None:
    module = _triton_attention_module()
    if module is None:
        return

    def attention_cuda(q, k, v, scale, mask):
        return module.attention_triton_impl(q, k, v, scale, mask)

    torch.library.register_kernel("ddim_fast::attention", "cuda", attention_cuda)




# --------------------------------------------------------------------------------------------------
# Python front door
# --------------------------------------------------------------------------------------------------


def _require_float_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_qkv(op: str, q, k, v) -> None:
    """The q/k/v rule shared by every attention op (wrapper and Triton op): tensors of one float dtype and
    device, q [B, H, Lq, D] or [B*H, Lq, D], k/v with q's rank and leading dims (nothing is broadcast), one
    head dim D, as many values as keys."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_float_tensor(op, name, t)
    if q.dim() not in (3, 4):
        raise ValueError(f"{op}: q must be [B, H, Lq, D] or [B*H, Lq, D], got shape {tuple(q.shape)}")
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"{op}: k and v must have q's {q.dim()} dims, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    lead = tuple(q.shape[:-2])
    if tuple(k.shape[:-2]) != lead or tuple(v.shape[:-2]) != lead:
        raise ValueError(f"{op}: k and v must have q's leading (batch/head) dims {lead} (nothing is broadcast), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: q, k and v must have one head dim D, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: k and v must have the same number of keys, got {k.shape[-2]} and {v.shape[-2]}")


def check_mask(op: str, mask: torch.Tensor, score_shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """The mask rule shared by every attention op (Python wrappers and the Triton op): mask.dim() ==
    len(score_shape) ([..., Lq, Lk]), last dim Lk, every other dim equal or 1 (broadcast without a copy);
    bool (True = keep) or additive in the scores' dtype; on the scores' device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{op}: mask must be on device {device}, got {mask.device}")
    if mask.dtype != torch.bool and mask.dtype != dtype:
        raise TypeError(f"{op}: mask must be bool (True = keep) or have the scores' dtype {dtype} (additive), "
                        f"got {mask.dtype}")
    if mask.dim() != len(score_shape):
        raise ValueError(f"{op}: mask must have {len(score_shape)} dims like the scores {score_shape} "
                         f"(each dim equal or 1, last dim = Lk), got shape {tuple(mask.shape)}")
    for d, (m, s) in enumerate(zip(mask.shape, score_shape)):
        last = d == len(score_shape) - 1
        if m != s and (last or m != 1):
            raise ValueError(f"{op}: mask shape {tuple(mask.shape)} does not fit scores {score_shape}: dim {d} "
                             f"must be {s}{'' if last else ' or 1'} (only size-1 dims are broadcast)")


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
    if backend == "triton" and _triton_attention_module() is None:
        raise RuntimeError("backend='triton': Triton is not usable here (needs a CUDA GPU, or TRITON_INTERPRET=1 "
                           "set before triton is imported for CPU tensors)")
    if backend == "native" and not has_native_kernel(device.type, "attention"):
        raise RuntimeError(f"backend='native': ddim_fast::attention has no {device.type} kernel (CUDA needs Triton)")
    if backend != "auto":
        return backend
    if device.type == "cuda" and _triton_attention_module() is not None:
        return "triton"
    if has_native_kernel(device.type, "attention"):
        return "native"
    raise RuntimeError(f"ddim_fast has no attention kernel for device {device}; use backend='reference'")


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) v in one fused kernel, fp32 math.

    q [B, H, Lq, D] and k, v [B, H, Lk, D] (any strides), or [B*H, Lq, D] and [B*H, Lk, D].
    ``scale`` defaults to 1/sqrt(D). ``mask``: see the module docstring (bool keeps True; float is
    additive and is cast to q's dtype). ``backend``: 'auto' (Triton on CUDA, C++ on CPU), 'native'
    (torch.ops.ddim_fast.attention), 'triton' (torch.ops.ddim_fast.attention_triton) or 'reference'
    (PyTorch, fp32 math). Returns [..., Lq, D] in q's dtype (contiguous).
    """
    op = "fused_attention"
    check_qkv(op, q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
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

    scores [..., Lq, Lk] (2 to 4 dims, any strides); mask per the module docstring. ``inplace`` writes
    the result into ``scores`` (the C++ ``scaled_masked_softmax_``). ``backend``: 'auto'/'native' (the
    C++ CPU / CUDA kernels) or 'reference'. Returns a tensor of scores' shape and dtype.
    """
    op = "scaled_masked_softmax"
    _require_float_tensor(op, "scores", scores)
    if not 2 <= scores.dim() <= 4:
        raise ValueError(f"{op}: scores must have 2 to 4 dims [..., Lq, Lk], got shape {tuple(scores.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float, got {type(scale).__name__}")
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


# --------------------------------------------------------------------------------------------------
# ldm patcher
# --------------------------------------------------------------------------------------------------

_ORIGINAL_FORWARD = "_ddim_fast_original_forward"


def _is_ldm_cross_attention(module: nn.Module) -> bool:
    """ldm's CrossAttention by structure: to_q/to_k/to_v projections, to_out, int heads, numeric scale,
    and forward(x, context=None, mask=None). diffusers' Attention (forward(hidden_states, ...)) is not."""
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in ("to_q", "to_k", "to_v", "to_out")):
        return False
    heads, scale = getattr(module, "heads", None), getattr(module, "scale", None)
    if not isinstance(heads, int) or isinstance(heads, bool) or not isinstance(scale, (int, float)):
        return False
    forward = getattr(module, _ORIGINAL_FORWARD, None) or module.forward
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[:3] == ["x", "context", "mask"]


def _fused_ldm_forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ldm CrossAttention.forward on the fused op. x [b, n, query_dim], context [b, m, context_dim],
    mask [b, ...] (flattened to [b, m]; True = keep) -> [b, n, query_dim]."""
    heads = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k = self.to_k(context)
    v = self.to_v(context)
    b, n, inner = q.shape
    head_dim = inner // heads
    # 'b n (h d) -> b h n d' as strided views: the kernels take any strides, so no copies.
    q = q.view(b, n, heads, head_dim).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, head_dim).transpose(1, 2)
    attn_mask = None
    if mask is not None:
        # ldm: rearrange(mask, 'b ... -> b (...)'), repeat over heads, masked_fill(~mask, -max).
        attn_mask = mask.reshape(b, -1)
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.bool()
        attn_mask = attn_mask.view(b, 1, 1, attn_mask.shape[-1])
    out = fused_attention(q, k, v, scale=float(self.scale), mask=attn_mask)
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    return self.to_out(out)


def patch_attention(model: nn.Module) -> int:
    """Makes every ldm-style CrossAttention in ``model`` (found by structure, see
    ``_is_ldm_cross_attention``) run the fused attention op; returns how many modules were patched
    (already patched ones are not counted twice). ``unpatch_attention`` restores them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, _ORIGINAL_FORWARD) or not _is_ldm_cross_attention(module):
            continue
        # Remember the instance attribute (if any) so unpatch restores exactly what was there.
        setattr(module, _ORIGINAL_FORWARD, module.__dict__.get("forward"))
        module.forward = types.MethodType(_fused_ldm_forward, module)
        logger.debug("patch_attention: patched %s", name or type(module).__name__)
        count += 1
    return count


def unpatch_attention(model: nn.Module) -> int:
    """Restores the modules ``patch_attention`` patched; returns how many."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if not hasattr(module, _ORIGINAL_FORWARD):
            continue
        original = module.__dict__.pop(_ORIGINAL_FORWARD)
        if original is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = original
        count += 1
    return count


# --------------------------------------------------------------------------------------------------
# diffusers processor
# --------------------------------------------------------------------------------------------------


class FusedAttnProcessor:
    """A diffusers attention processor (``unet.set_attn_processor(FusedAttnProcessor())``) that gives
    ``AttnProcessor2_0``'s outputs with the fused op, for self- and cross-attention. It handles
    spatial_norm, 4-D inputs, group_norm, norm_cross, norm_q/norm_k, attention masks (via
    ``attn.prepare_attention_mask``), residual_connection and rescale_output_factor. Like
    AttnProcessor2_0 the softmax scale is 1/sqrt(head_dim). ``backend`` is passed to ``fused_attention``.
    """

    def __init__(self, backend: str = "auto"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"FusedAttnProcessor: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # [batch * heads, 1 or Lq, Lk] -> [batch, heads, 1 or Lq, Lk]: fits the op's mask rule.
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        if attention_mask is not None and attention_mask.shape[2] not in (1, query.shape[2]):
            raise ValueError(f"FusedAttnProcessor: attention_mask gives {attention_mask.shape[2]} query rows, "
                             f"expected 1 or {query.shape[2]}")
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            raise ValueError(f"FusedAttnProcessor: attention_mask has {attention_mask.shape[-1]} keys, "
                             f"expected {key.shape[2]}")

        if value.dtype != query.dtype:
            value = value.to(query.dtype)
        if key.dtype != query.dtype:
            key = key.to(query.dtype)
        hidden_states = fused_attention(query, key, value, scale=1.0 / math.sqrt(head_dim), mask=attention_mask,
                                        backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# Last, once every helper above exists: the Triton module imports check_mask from this one.
_register_cuda_attention()
