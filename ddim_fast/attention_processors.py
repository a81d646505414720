"""ddim_fast's attention inside Stable Diffusion UNets: ``patch_attention`` for ldm's ``CrossAttention`` (found
by structure) and ``FusedAttnProcessor``, a diffusers attention processor, which ``fuse_attention`` puts on
every diffusers ``Attention`` module it can serve (``unfuse_attention`` puts the original processors back).
All of them call ``ddim_fast.attention.fused_attention`` with their ``backend`` (default 'auto': per call
shape, the fastest correct of our fused kernel and the SDPA backends on CUDA, measured once and cached; SDPA on
the CPU; so a patched UNet never runs a slower attention than SDPA's best). ``backend="fused"`` forces our
kernel. See ``ddim_fast.attention`` for the kernels, shapes, masks and precision, and
``ddim_fast.attention.attention_choices()`` for what ran.

The way back from ``FusedAttnProcessor`` in diffusers: ``unet.set_default_attn_processor()`` refuses it
(diffusers only accepts its own processor classes there). Use ``ddim_fast.restore(pipe)`` (after
``ddim_fast.optimize(pipe)``) or ``unfuse_attention(model, originals)`` (after ``fuse_attention``), which
put back the very processor objects that were there; or ``unet.set_attn_processor(AttnProcessor2_0())``,
which always works.
"""

from __future__ import annotations

import inspect
import logging
import math
import types
from typing import Optional

import torch
from torch import nn

from ddim_fast._checks import reasons_summary
from ddim_fast.attention import ATTENTION_BACKENDS, MAX_HEAD_DIM, fused_attention

logger = logging.getLogger(__name__)

__all__ = ["patch_attention", "unpatch_attention", "FusedAttnProcessor", "fuse_attention", "unfuse_attention",
           "unservable_reason", "FusedAttention", "MAX_HEAD_DIM"]


# --------------------------------------------------------------------------------------------------
# ldm patcher
# --------------------------------------------------------------------------------------------------

_ORIGINAL_FORWARD = "_ddim_fast_original_forward"
_BACKEND = "_ddim_fast_attention_backend"


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
    out = fused_attention(q, k, v, scale=float(self.scale), mask=attn_mask, backend=getattr(self, _BACKEND, "auto"))
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    return self.to_out(out)


def patch_attention(model: nn.Module, *, allow_none: bool = False, backend: str = "auto") -> int:
    """Makes every ldm-style CrossAttention in ``model`` (found by structure, see
    ``_is_ldm_cross_attention``) run ``ddim_fast.attention.fused_attention(..., backend=backend)``: with 'auto'
    the fastest correct implementation per call shape (ldm's bool masks: our fused kernel, which keeps ldm's
    masked_fill meaning), 'fused' our kernel always. Returns how many modules were patched (already patched
    ones are not counted twice, but take the new ``backend``). ``unpatch_attention`` restores them.

    Finding nothing to patch is an error (``ValueError``) unless ``allow_none``: a diffusers UNet has no
    ldm CrossAttention, and silently leaving it unfused is how a benchmark ends up measuring nothing. For
    diffusers use ``unet.set_attn_processor(FusedAttnProcessor())``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"patch_attention: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    count = 0
    already = 0
    for name, module in model.named_modules():
        if hasattr(module, _ORIGINAL_FORWARD):
            setattr(module, _BACKEND, backend)
            already += 1
            continue
        if not _is_ldm_cross_attention(module):
            continue
        # Remember the instance attribute (if any) so unpatch restores exactly what was there.
        setattr(module, _ORIGINAL_FORWARD, module.__dict__.get("forward"))
        setattr(module, _BACKEND, backend)
        module.forward = types.MethodType(_fused_ldm_forward, module)
        logger.debug("patch_attention: patched %s", name or type(module).__name__)
        count += 1
    if count == 0 and already == 0 and not allow_none:
        diffusers_attention = sum(1 for m in model.modules() if type(m).__name__ == "Attention")
        hint = (f" It holds {diffusers_attention} diffusers Attention modules: use "
                "unet.set_attn_processor(ddim_fast.FusedAttnProcessor()) for those (or ddim_fast.optimize(pipe) for a "
                "whole pipeline)." if diffusers_attention else "")
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
        module.__dict__.pop(_BACKEND, None)
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
    ``AttnProcessor2_0``'s outputs through ``ddim_fast.attention.fused_attention``, for self- and
    cross-attention. It handles spatial_norm, 4-D inputs, group_norm, norm_cross, norm_q/norm_k, attention masks
    (via ``attn.prepare_attention_mask``), residual_connection and rescale_output_factor. Like AttnProcessor2_0
    the softmax scale is 1/sqrt(head_dim). ``backend`` is passed to ``fused_attention``: 'auto' (default) runs,
    per call shape, the fastest correct of our fused kernel and the SDPA backends (measured on CUDA; SDPA on the
    CPU), so it is never slower than the SDPA that AttnProcessor2_0 runs; 'fused' always runs our kernel.

    Shapes: hidden_states [B, L, C] or [B, C, H, W], encoder_hidden_states [B, Lk, Ck], attention_mask
    [B, Lk] / [B, 1 or Lq, Lk] (diffusers' conventions) -> hidden_states' shape.

    ``fuse_attention(model)`` sets it only where it reproduces the processor in place (see
    ``unservable_reason``). The way back: ``unfuse_attention(model, fused.originals)`` or
    ``ddim_fast.restore(pipe)`` put back the original processor objects; ``set_attn_processor(AttnProcessor2_0())``
    always works; ``set_default_attn_processor()`` refuses this class (diffusers checks for its own classes).
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


# --------------------------------------------------------------------------------------------------
# Putting FusedAttnProcessor on the modules it serves, and taking it off again
# --------------------------------------------------------------------------------------------------

# diffusers processors whose outputs FusedAttnProcessor reproduces (the same math: projections, softmax(q k^T /
# sqrt(d) + mask) v, output projection, residual, rescale). Looked up by name: not every diffusers version has all.
_SERVED_PROCESSOR_NAMES = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor")
# The classic processors apply attn.scale; AttnProcessor2_0 (like FusedAttnProcessor) always uses 1/sqrt(d).
_USES_ATTN_SCALE = ("AttnProcessor", "XFormersAttnProcessor", "SlicedAttnProcessor")

# Why a processor family cannot be served, by a part of its class name (first match wins).
_UNSERVED_FAMILIES = (
    ("IPAdapter", "IP-Adapter image-prompt attention (extra image keys/values)"),
    ("AddedKV", "added key/value projections"),
    ("Joint", "joint attention (text and image tokens in one sequence)"),
    ("PAG", "perturbed-attention guidance"),
    ("CustomDiffusion", "Custom Diffusion (trained key/value projections in the processor)"),
    ("Fused", "fused QKV projections (fuse_qkv_projections)"),
)


def _served_processor_classes() -> dict[type, str]:
    from diffusers.models import attention_processor as ap

    return {getattr(ap, name): name for name in _SERVED_PROCESSOR_NAMES if hasattr(ap, name)}


def unservable_reason(module: nn.Module, processor=None) -> Optional[str]:
    """Why ``FusedAttnProcessor`` cannot stand in for the processor of the diffusers attention ``module``
    (``processor`` defaults to ``module.processor``), or None when it can: the module is a diffusers
    ``Attention``, its processor one of AttnProcessor / AttnProcessor2_0 / XFormersAttnProcessor /
    SlicedAttnProcessor (or already a FusedAttnProcessor), no added key/value projections, a head dim of at
    most ``MAX_HEAD_DIM``, weights in fp32 / fp16 / bf16, and, for the processors that apply ``attn.scale``,
    the default 1/sqrt(head_dim) scale."""
    from diffusers.models.attention_processor import Attention

    if processor is None:
        processor = getattr(module, "processor", None)
    cls_name = type(processor).__name__
    if not isinstance(module, Attention):
        return f"{type(module).__name__} is not a diffusers Attention module"
    if not isinstance(processor, FusedAttnProcessor):
        served = _served_processor_classes()
        if type(processor) not in served:
            for part, reason in _UNSERVED_FAMILIES:
                if part in cls_name:
                    return f"{cls_name}: {reason}"
            base = next((name for cls, name in served.items() if isinstance(processor, cls)), None)
            if base is not None:
                # A user's wrapper (call counting, attention-map capture, ...): replacing it would skip its code.
                return f"{cls_name}: a subclass of {base} whose own code would be skipped"
            return f"{cls_name}: a processor the fused kernels do not reproduce"
    if getattr(module, "added_kv_proj_dim", None) is not None:
        return f"{cls_name}: added key/value projections"
    heads = int(module.heads)
    head_dim = int(getattr(module, "inner_kv_dim", module.inner_dim)) // heads
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}, the fused kernels' limit"
    weight = next(module.parameters(), None)
    if weight is not None and weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{weight.dtype} weights (the fused kernels take float32, float16 and bfloat16)"
    if cls_name in _USES_ATTN_SCALE and not math.isclose(float(module.scale), head_dim ** -0.5, rel_tol=1e-6):
        return f"{cls_name} with softmax scale {module.scale:g} (the fused processor uses 1/sqrt(head_dim))"
    return None


class FusedAttention:
    """What :func:`fuse_attention` did to a model: ``originals`` maps each fused module's name (as in
    ``model.attn_processors``, without the ``.processor`` suffix) to the processor object it had;
    ``unserved`` maps each module left alone to the reason; ``already`` counts modules that ran a
    FusedAttnProcessor before; ``processor`` is the FusedAttnProcessor set."""

    def __init__(self, originals: dict, unserved: dict, processor: "FusedAttnProcessor", already: int = 0):
        self.originals = originals
        self.unserved = unserved
        self.processor = processor
        self.already = already

    @property
    def count(self) -> int:
        return len(self.originals)

    def unserved_summary(self) -> str:
        """One line: each reason once, with how many modules and the first module's name."""
        return reasons_summary(self.unserved)


def _attention_modules(model: nn.Module):
    """(name, module) of every module with a diffusers processor, as ``model.attn_processors`` lists them."""
    for name, module in model.named_modules():
        if hasattr(module, "get_processor") and hasattr(module, "set_processor"):
            yield name, module


def fuse_attention(model: nn.Module, *, backend: str = "auto") -> FusedAttention:
    """Sets one ``FusedAttnProcessor(backend)`` on every attention module of the diffusers ``model`` (a UNet,
    a ControlNet, ...) that it can serve (see :func:`unservable_reason`); the others keep their processors.
    Returns a :class:`FusedAttention` with the original processor objects, for :func:`unfuse_attention`.
    Modules that already run a FusedAttnProcessor are left as they are (counted in ``already``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_attention: model must be a torch.nn.Module, got {type(model).__name__}")
    processor = FusedAttnProcessor(backend)
    originals: dict[str, object] = {}
    unserved: dict[str, str] = {}
    already = 0
    for name, module in _attention_modules(model):
        current = module.get_processor()
        if isinstance(current, FusedAttnProcessor):
            already += 1
            continue
        reason = unservable_reason(module, current)
        if reason is not None:
            unserved[name] = reason
            continue
        originals[name] = current
        # Per module, not model.set_attn_processor(dict): that would also touch the unserved modules.
        module.set_processor(processor)
    return FusedAttention(originals, unserved, processor, already)


def unfuse_attention(model: nn.Module, originals: dict) -> int:
    """Puts back the processor objects ``originals`` (``FusedAttention.originals``: module name -> processor)
    on the modules of ``model`` that still run a FusedAttnProcessor; returns how many. A module whose
    processor was changed since is left with that one (logged)."""
    modules = dict(_attention_modules(model))
    restored = 0
    for name, original in originals.items():
        module = modules.get(name)
        if module is None:
            logger.warning("unfuse_attention: module %s is gone from %s; its processor is not restored", name,
                           type(model).__name__)
            continue
        if not isinstance(module.get_processor(), FusedAttnProcessor):
            logger.info("unfuse_attention: %s has a processor set since (%s); keeping it", name,
                        type(module.get_processor()).__name__)
            continue
        module.set_processor(original)
        restored += 1
    return restored
