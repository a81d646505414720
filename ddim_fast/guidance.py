"""Classifier-free guidance as both drop-ins run it: one model call on the guided batch, the combine inside
the fused step.

The guided batch is ``cat([x, x])`` with the conditioning ``cat([uc, c])``, unconditional half first (ldm's
and diffusers' order); the model output ``[2B, ...]`` then goes to ``ops.ddim_step(..., guidance_scale=s)``,
which reads both halves in place and combines ``m_u + s (m_c - m_u)``. Used by the ldm sampler's step
executor (``ddim_fast.sampler_step``) and by ``FastDDIMScheduler.graph_step``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["cfg_batch", "guided_model_output", "combine"]


def cfg_batch(cond, uncond):
    """ldm's guided conditioning ``cat([uc, c])`` for a tensor [B, ...], a list of tensors, or a dict of
    tensors or of lists of tensors (per key, per list element). Returns the same structure with batch 2B."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict):
            raise TypeError("unconditional_conditioning must be a dict when conditioning is a dict, "
                            f"got {type(uncond).__name__}")
        out = {}
        for key, value in cond.items():
            if isinstance(value, list):
                out[key] = [torch.cat([uncond[key][i], value[i]]) for i in range(len(value))]
            else:
                out[key] = torch.cat([uncond[key], value])
        return out
    if isinstance(cond, list):
        if not isinstance(uncond, list):
            raise TypeError("unconditional_conditioning must be a list when conditioning is a list, "
                            f"got {type(uncond).__name__}")
        return [torch.cat([uncond[i], cond[i]]) for i in range(len(cond))]
    return torch.cat([uncond, cond])


def guided_model_output(model_fn: Callable[[torch.Tensor, Any, Any], torch.Tensor], x: torch.Tensor, t, cond,
                        guided: bool) -> torch.Tensor:
    """The one model call of a step: ``model_fn(cat([x, x]), t, cond)`` when ``guided`` (``cond`` is then the
    guided conditioning, e.g. :func:`cfg_batch`'s, and ``t`` what the model takes for a batch of 2B), else
    ``model_fn(x, t, cond)``. x [B, ...] -> model output [2B, ...] (guided) or [B, ...], uncombined: the
    fused step combines the halves."""
    return model_fn(torch.cat([x, x]) if guided else x, t, cond)


def combine(model_output: torch.Tensor, scale: float) -> torch.Tensor:
    """``m_u + s (m_c - m_u)`` outside the kernel, for the unfused paths that need the combined output
    (ldm's score corrector). model_output [2B, ...] -> [B, ...]."""
    m_u, m_c = model_output.chunk(2)
    return m_u + scale * (m_c - m_u)
