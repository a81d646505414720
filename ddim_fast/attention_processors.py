"""Fused attention inside Stable Diffusion UNets: ``patch_attention`` for ldm's ``CrossAttention`` (found by
structure) and ``FusedAttnProcessor``, a diffusers attention processor. Both call
``ddim_fast.attention.fused_attention``; see that module for the kernels, shapes, masks and precision.
"""

from __future__ import annotations

import inspect
import logging
import math
import types
from typing import Optional

import torch
from torch import nn

from ddim_fast.attention import ATTENTION_BACKENDS, fused_attention

logger = logging.getLogger(__name__)

__all__ = ["patch_attention", "unpatch_attention", "FusedAttnProcessor"]


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


def patch_attention(model: nn.Module, *, allow_none: bool = False) -> int:
    """Makes every ldm-style CrossAttention in ``model`` (found by structure, see
    ``_is_ldm_cross_attention``) run the fused attention op; returns how many modules were patched
    (already patched ones are not counted twice). ``unpatch_attention`` restores them.

    Finding nothing to patch is an error (``ValueError``) unless ``allow_none``: a diffusers UNet has no
    ldm CrossAttention, and silently leaving it unfused is how a benchmark ends up measuring nothing. For
    diffusers use ``unet.set_attn_processor(FusedAttnProcessor())``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    already = 0
    for name, module in model.named_modules():
        if hasattr(module, _ORIGINAL_FORWARD):
            already += 1
            continue
        if not _is_ldm_cross_attention(module):
            continue
        # Remember the instance attribute (if any) so unpatch restores exactly what was there.
        setattr(module, _ORIGINAL_FORWARD, module.__dict__.get("forward"))
        module.forward = types.MethodType(_fused_ldm_forward, module)
        logger.debug("patch_attention: patched %s", name or type(module).__name__)
        count += 1
    if count == 0 and already == 0 and not allow_none:
        diffusers_attention = sum(1 for m in model.modules() if type(m).__name__ == "Attention")
        hint = (f" It holds {diffusers_attention} diffusers Attention modules: use "
                "unet.set_attn_processor(ddim_fast.FusedAttnProcessor()) for those." if diffusers_attention else "")
        raise ValueError(
            f"patch_attention: no ldm CrossAttention module (to_q/to_k/to_v/to_out, int heads, a scale and "
            f"forward(x, context, mask)) was found in {type(model).__name__}.{hint} Pass allow_none=True to "
            "accept a model with nothing to patch.")
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
