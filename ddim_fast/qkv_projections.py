"""Fused query/key/value projections for diffusers attention modules, with the weights still the user's tensors.

What diffusers' ``fuse_qkv_projections()`` does — one GEMM over ``cat([W_q, W_k, W_v])`` instead of three —
saves launches and reads the input once, but it builds new weight tensors: a LoRA loaded or fused afterwards,
or any in-place update of ``to_q``/``to_k``/``to_v``, is then no longer what runs. Here the concatenation *is*
the weights' storage: :func:`fuse_qkv` packs the projection weights (and biases) of an attention module into one
``[3C, C_in]`` buffer and points each ``nn.Parameter`` (the very same objects) at its rows
(``param.data = packed[rows]``). Whatever writes the weights in place — ``load_state_dict``, ``copy_``,
PEFT's ``merge`` through ``param.data`` — writes the packed buffer, so the fused GEMM always reads the current
weights, with nothing to refresh.

The projections the processor calls are wrapped (an instance ``forward`` on each ``nn.Linear``), so any
processor works unchanged (diffusers' ``AttnProcessor2_0``, ``ddim_fast.FusedAttnProcessor``, ...): for
self-attention, ``to_q(x)`` computes q, k and v in one GEMM and keeps k and v for the ``to_k(x)`` and ``to_v(x)``
calls that follow with the same input (the same tensor object, not written in between: its version counter is
checked); for cross-attention, ``to_k(context)`` computes k and v and keeps v for ``to_v(context)``. A call with
any other input runs its own projection, so the results never depend on the call order (the shared GEMM is
only wasted). The fused outputs are column slices of one ``[..., 3C]`` tensor (as with diffusers' fused
processors), equal to the separate projections within fp32 rounding of a differently blocked GEMM.

Each call falls back to the module's own ``nn.Linear`` forward when the fusion does not hold any more: autograd
is recording (the packed buffer is not a leaf: gradients must reach the parameters), a projection was replaced
(PEFT's LoRA layers wrap it), or a weight was given new storage (``param.data = ...``, ``.to()``,
``load_state_dict(assign=True)``, PEFT's safe merge). In the last case the module is packed again on its next
call (not while Dynamo traces or a CUDA graph captures). :func:`unfuse_qkv` gives every parameter its own
storage again (same values, same strides as before) and removes the wrappers.

Served: diffusers ``Attention`` modules whose ``to_q``/``to_k``/``to_v`` are plain ``nn.Linear`` (not subclasses,
not PEFT layers, no instance ``forward``), with one dtype and device, biases all present or all absent, and not
fused by diffusers already; the others are listed with the reason. Keep the packing out of ``save_pretrained``
(safetensors refuses tensors that share storage): ``ddim_fast.restore(pipe)`` first.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ddim_fast._checks import reasons_summary

logger = logging.getLogger(__name__)

__all__ = ["fuse_qkv", "unfuse_qkv", "FusedQKV", "QKVGroup"]

_SELF = ("to_q", "to_k", "to_v")
_CROSS = ("to_k", "to_v")


class QKVGroup:
    """The fused projections of one attention module: ``names`` (``to_q, to_k, to_v`` for self-attention,
    ``to_k, to_v`` for cross-attention), their ``nn.Linear`` modules, and the packed ``weight`` [sum of out
    features, in features] (and ``bias``) whose rows the parameters are."""

    def __init__(self, attn: nn.Module, names: tuple[str, ...]):
        self.attn = attn
        self.names = names
        self.linears: list[nn.Linear] = [getattr(attn, name) for name in names]
        self.sizes = [linear.out_features for linear in self.linears]
        # What unfuse restores: each tensor's own strides (a contiguous storage each, as before).
        self._strides = {id(p): p.stride() for p in self._tensors()}
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.valid = False
        self._stash: list | None = None
        self.packs = 0
        self.fused_calls = 0
        self.pack()

    def _tensors(self) -> list[torch.Tensor]:
        return [p for linear in self.linears for p in (linear.weight, linear.bias) if p is not None]

    def pack(self) -> None:
        """(Re)builds the packed buffers from the parameters' current values and points the parameters at
        their rows."""
        with torch.no_grad():
            weights = [linear.weight for linear in self.linears]
            self.weight = self._pack(weights)
            if self.linears[0].bias is not None:
                self.bias = self._pack([linear.bias for linear in self.linears])
            else:
                self.bias = None
        self._expected = [(p, p.data_ptr()) for p in self._tensors()]
        self.valid = True
        self.packs += 1

    @staticmethod
    def _pack(params: list[torch.Tensor]) -> torch.Tensor:
        packed = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            rows = p.shape[0]
            p.data = packed[start:start + rows]
            start += rows
        return packed

    def holds(self) -> bool:
        """Whether the fusion still describes the module: the same Linear modules in their slots, the same
        parameter objects in them, each still on its rows of the packed buffers."""
        modules = self.attn._modules
        for name, linear in zip(self.names, self.linears):
            if modules.get(name) is not linear:
                return False
        expected = self._expected
        tensors = self._tensors()
        return len(tensors) == len(expected) and all(
            p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(tensors, expected))

    def unpack(self) -> None:
        """Gives every parameter its own storage again (current values, the strides it had before packing)."""
        with torch.no_grad():
            for p, ptr in self._expected:
                if p.data_ptr() != ptr:  # given its own storage since (by the user): nothing to undo
                    continue
                own = torch.empty_strided(p.shape, self._strides.get(id(p), p.stride()), dtype=p.dtype,
                                          device=p.device)
                own.copy_(p.detach())
                p.data = own
        self.weight = self.bias = None
        self._stash = None
        self.valid = False

    # ---- the projections --------------------------------------------------------------------------

    def revalidate(self) -> bool:
        """Checks (eagerly) that the fusion still holds and sets ``valid``; a module whose weights were given
        new storage (``.to()``, ``param.data = ...``) is packed again first, unless a CUDA graph is capturing.
        Returns ``valid``. Called by every eager call of the first projection; compiled code reads ``valid``
        (a Dynamo guard), so run :meth:`FusedQKV.revalidate` before calling it (``optimize`` does)."""
        ok = self.weight is not None and self.holds()
        if not ok and self.weight is not None and all(
                self.attn._modules.get(n) is l for n, l in zip(self.names, self.linears)):
            capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
            if not capturing and len({(p.dtype, p.device) for p in self._tensors()}) == 1:
                logger.info("ddim_fast: the %s projection weights of an attention module were given new storage; "
                            "packing them again", "/".join(self.names))
                self.pack()
                ok = True
        self.valid = ok
        return ok

    def _fused_now(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._tensors()):
            return False  # the packed buffer is no leaf: gradients must reach the parameters
        if torch.compiler.is_compiling():
            return self.valid  # data pointers cannot be read while tracing; `valid` is guarded on
        return self.revalidate()

    def project(self, index: int, x: torch.Tensor) -> torch.Tensor:
        linear = self.linears[index]
        if index == 0:
            self._stash = None
            if self._fused_now(x):
                out = F.linear(x, self.weight, self.bias)
                parts = list(out.split(self.sizes, dim=-1))
                if torch.compiler.is_compiling():  # no counter inside traced code: Dynamo would guard on it
                    self._stash = [x, None, *parts]
                else:
                    # Inference tensors have no version counter: their identity decides, as while tracing.
                    self._stash = [x, None if x.is_inference() else x._version, *parts]
                    self.fused_calls += 1
                return parts[0]
        else:
            stash = self._stash
            # Same input object, not written since. (Dynamo cannot compare version counters while tracing:
            # there the object's identity decides; no diffusers processor writes its input in place between
            # the projections.)
            if stash is not None and stash[0] is x and stash[2 + index] is not None and (
                    torch.compiler.is_compiling() or stash[1] is None or stash[1] == x._version):
                result = stash[2 + index]
                stash[2 + index] = None
                if index == len(self.sizes) - 1:
                    self._stash = None
                return result
        return F.linear(x, linear.weight, linear.bias)


class _Projection:
    """The instance ``forward`` of one fused ``nn.Linear``: ``linear(x)`` goes through its group."""

    def __init__(self, group: QKVGroup, index: int):
        self.group = group
        self.index = index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.project(self.index, x)

    def __repr__(self) -> str:
        return f"<ddim_fast fused {self.group.names[self.index]} projection>"


class FusedQKV:
    """What :func:`fuse_qkv` did to a model: ``groups`` (module name -> :class:`QKVGroup`) and ``unserved``
    (module name -> why it was left alone)."""

    def __init__(self, groups: dict, unserved: dict):
        self.groups = groups
        self.unserved = unserved

    @property
    def count(self) -> int:
        return len(self.groups)

    def revalidate(self) -> None:
        """:meth:`QKVGroup.revalidate` for every group: what compiled code needs before each call."""
        for group in self.groups.values():
            group.revalidate()

    def unserved_summary(self) -> str:
        return reasons_summary(self.unserved)


def unfusable_reason(attn: nn.Module) -> Optional[str]:
    """Why :func:`fuse_qkv` leaves the diffusers attention module ``attn`` alone, or None."""
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv") or hasattr(attn, "to_kv"):
        return "fused by diffusers already (fuse_qkv_projections)"
    names = _CROSS if getattr(attn, "is_cross_attention", False) else _SELF
    linears = [attn._modules.get(name) for name in names]
    for name, linear in zip(names, linears):
        if linear is None:
            return f"no {name} projection"
        if type(linear) is not nn.Linear:
            kind = "a PEFT layer" if hasattr(linear, "base_layer") else type(linear).__name__
            return f"{name} is {kind}, not a plain nn.Linear"
        if "forward" in linear.__dict__:
            return f"{name} has its own forward"
    if len({linear.in_features for linear in linears}) != 1:
        return "projections of different input widths"
    tensors = [p for linear in linears for p in (linear.weight, linear.bias) if p is not None]
    if len({(p.dtype, p.device) for p in tensors}) != 1:
        return "projection weights of different dtypes or devices"
    if len({linear.bias is None for linear in linears}) != 1:
        return "some projections have a bias and others not"
    if any(p.is_meta for p in tensors):
        return "weights on the meta device"
    return None


def fuse_qkv(model: nn.Module) -> FusedQKV:
    """Fuses the q/k/v (self-attention) or k/v (cross-attention) projections of every diffusers ``Attention``
    module of ``model`` that :func:`unfusable_reason` accepts. Returns a :class:`FusedQKV` for
    :func:`unfuse_qkv`. Modules fused already (by an earlier call) are left as they are."""
    from diffusers.models.attention_processor import Attention

    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_qkv: model must be a torch.nn.Module, got {type(model).__name__}")
    groups: dict[str, QKVGroup] = {}
    unserved: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        if any(isinstance(getattr(module, n, None), nn.Module) and isinstance(
                getattr(module, n).__dict__.get("forward"), _Projection) for n in _SELF):
            continue
        reason = unfusable_reason(module)
        if reason is not None:
            unserved[name] = reason
            continue
        names = _CROSS if module.is_cross_attention else _SELF
        group = QKVGroup(module, names)
        for index, linear in enumerate(group.linears):
            linear.forward = _Projection(group, index)
        groups[name] = group
    return FusedQKV(groups, unserved)


def unfuse_qkv(model: nn.Module, fused: FusedQKV) -> int:
    """Undoes :func:`fuse_qkv`: every packed parameter gets its own storage again (current values) and the
    projection wrappers are removed (a wrapper replaced by someone else since is left alone). Returns how many
    modules were unfused."""
    count = 0
    for group in fused.groups.values():
        group.unpack()
        for linear in group.linears:
            if isinstance(linear.__dict__.get("forward"), _Projection):
                del linear.forward
        count += 1
    return count
