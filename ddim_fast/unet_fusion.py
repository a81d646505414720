"""Puts the fused UNet-body ops (``ddim_fast.unet_ops``) into a diffusers model, and takes them out again.

``fuse_unet_body(model)`` walks a diffusers model (a ``UNet2DConditionModel``, a ControlNet, a VAE: any module
tree) and gives, by instance-level ``forward`` overrides (the classes and the module tree are untouched):

* every ``ResnetBlock2D``: norm1 + SiLU as one ``group_norm_silu``, and norm2 with the time-embedding add before
  it and the SiLU after it as another (``channel_add``); ``scale_shift`` blocks fuse norm2 without the add and SiLU;
  the residual sum skips diffusers' division by an ``output_scale_factor`` of 1 (a pass over the output that
  changes no bit). A block's ``nonlinearity`` is also applied to the time embedding, so the block's forward is
  overridden rather than its modules replaced;
* every diffusers ``GEGLU`` (the transformer blocks' feed-forward): ``proj`` then ``geglu`` in one pass;
* every other ``torch.nn.GroupNorm`` (Transformer2DModel's ``norm``, ``conv_norm_out``, the VAE attention's
  ``group_norm``): ``group_norm_silu(..., apply_silu=False)``. The SiLU after ``conv_norm_out`` stays separate: it
  runs in the UNet's own forward, once per step, on the smallest-channel level.

Only what the kernels reproduce exactly is fused: ``ResnetBlock2D`` / ``GEGLU`` classes whose ``forward`` is
diffusers' own (the source of the version the fused forwards mirror, compared by its syntax tree), exact
``nn.GroupNorm`` norms without hooks, a ``nn.SiLU`` nonlinearity, fp32/fp16/bf16 parameters. Everything else is
left alone and reported with the reason (``FusedUnetBody.skipped``).

At call time the fused forwards read the modules' parameters (LoRA, ``load_state_dict`` and in-place updates keep
working) and fall back to the original computation for what the ops do not take: float64 or other devices' inputs,
autograd (grad mode on and a tensor that requires grad: the ops have no backward), a time embedding that does not
have the block's dtype or a [B, C] / [1, C] shape.

``unfuse_unet_body(model, record)`` removes the overrides (putting back any instance-level ``forward`` that was
there before), after which the model computes bit for bit what it computed before ``fuse_unet_body``.

Differences from the plain model are rounding only: the Triton kernels keep fp32 between the fused steps (no
rounding of ``hidden_states + temb`` or of the normalized tensor before SiLU to fp16); under ``torch.autocast``
the fused GroupNorm returns the input's dtype where autocast's GroupNorm returns fp32 (the next convolution or
projection casts it to the autocast dtype anyway).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import logging
import textwrap
import types
from typing import Optional

import torch
from torch import nn

from ddim_fast._checks import KERNEL_DTYPES, reasons_summary

logger = logging.getLogger(__name__)

__all__ = ["fuse_unet_body", "unfuse_unet_body", "FusedUnetBody", "FUSION_BACKENDS"]

# 'auto': torch.ops.ddim_fast.group_norm_silu / geglu (PyTorch's composite on the CPU, Triton on CUDA); 'triton':
# the Triton ops (CUDA; CPU tensors under TRITON_INTERPRET=1).
FUSION_BACKENDS = ("auto", "triton")

_STATE = "_ddim_fast_unet_fusion"  # instance attribute of a fused module: its _Fusion

# The syntax-tree digests (ast.dump, sha256, 16 hex digits) of the diffusers methods the fused forwards below
# reproduce, by diffusers version: a version whose ResnetBlock2D.forward or GEGLU.forward / gelu differs is skipped
# with a reason rather than run with a forward that computes something else. Add a version's digests after
# checking its source against _fused_resnet_forward / _fused_geglu_forward (`_method_digest(cls.forward)`).
_KNOWN_DIGESTS = {
    "ResnetBlock2D.forward": {"c33728fbb237b59e"},  # diffusers 0.42
    "GEGLU.forward": {"dd7ddb4f856d3276"},  # diffusers 0.42
    "GEGLU.gelu": {"77cba12125f7e8a7"},  # diffusers 0.42
}


@dataclasses.dataclass
class _Fusion:
    """What a fused module carries: its kind, the backend's ops, and the instance-level forward it had (None: none).
    The ops are held as objects (not looked up by name per call): torch.compile traces the fused forwards as plain
    attribute reads."""

    kind: str
    backend: str
    original_forward: object
    group_norm: object = None
    geglu: object = None


@dataclasses.dataclass
class FusedUnetBody:
    """What :func:`fuse_unet_body` did: ``patched`` maps each fused module's name to its kind ("resnet", "geglu",
    "group_norm"); ``skipped`` maps each module left alone to the reason; ``already`` counts modules fused before
    (left as they were); ``backend`` the ops' backend."""

    patched: dict
    skipped: dict
    already: int
    backend: str

    @property
    def counts(self) -> dict:
        """Fused modules per kind."""
        out: dict[str, int] = {}
        for kind in self.patched.values():
            out[kind] = out.get(kind, 0) + 1
        return out

    def skipped_summary(self) -> str:
        """One line: each reason once, with how many modules and the first module's name."""
        return reasons_summary(self.skipped)


# --------------------------------------------------------------------------------------------------
# Call-time helpers
# --------------------------------------------------------------------------------------------------

_GROUP_NORM_OPS = {"auto": "group_norm_silu", "triton": "group_norm_silu_triton"}
_GEGLU_OPS = {"auto": "geglu", "triton": "geglu_triton"}


def _ops_take(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the fused op computes what the module would for these tensors: kernel dtypes on one CPU or CUDA
    device, and nothing autograd would need (the ops have no backward)."""
    if x.dtype not in KERNEL_DTYPES or x.device.type not in ("cpu", "cuda"):
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES or t.device != x.device or (grad and t.requires_grad):
            return False
    return True


def _normalize(module: nn.Module, norm: nn.GroupNorm, x: torch.Tensor, silu: bool,
               add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """norm(x + add[:, :, None, ...]) (then the block's SiLU when ``silu``) through the fused op, or unfused when
    the op does not take these tensors. ``add`` [B, C] or None."""
    if _ops_take(x, norm.weight, norm.bias, add) and x.dim() >= 2:
        return getattr(module, _STATE).group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, add)
    if add is not None:
        x = x + add.reshape(tuple(add.shape) + (1,) * (x.dim() - 2))
    y = norm(x)
    return module.nonlinearity(y) if silu else y


# --------------------------------------------------------------------------------------------------
# The fused forwards (bound to the instances by fuse_unet_body)
# --------------------------------------------------------------------------------------------------


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args,
                          **kwargs) -> torch.Tensor:
    """diffusers 0.42's ResnetBlock2D.forward with norm1 + SiLU and (temb add +) norm2 + SiLU fused.
    input_tensor [B, C_in, H, W], temb [B, temb_channels] (or None) -> [B, C_out, H', W']."""
    if args or kwargs.get("scale", None) is not None:
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)  # diffusers' deprecation path

    hidden_states = _normalize(self, self.norm1, input_tensor, True)

    if self.upsample is not None:
        # upsample_nearest_nhwc fails with large batch sizes (diffusers issue 984): as diffusers does.
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    projected = self.time_emb_proj is not None
    if projected:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)  # [B, C] here; diffusers appends [:, :, None, None]

    if self.time_embedding_norm == "default":
        add = None
        if temb is not None:
            batch, channels = hidden_states.shape[0], hidden_states.shape[1]
            if (projected and temb.dim() == 2 and temb.shape[1] == channels and temb.shape[0] in (1, batch)
                    and temb.dtype == hidden_states.dtype):
                add = temb.expand(batch, channels)  # stride 0 over the batch when temb has one row
            else:  # type promotion or broadcasting the op does not do: diffusers' own add
                hidden_states = hidden_states + (temb[:, :, None, None] if projected else temb)
        hidden_states = _normalize(self, self.norm2, hidden_states, True, add)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(
                f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
            )
        if projected:
            temb = temb[:, :, None, None]
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = _normalize(self, self.norm2, hidden_states, False)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:  # e.g. the VAE decoder's "group" (no time embedding): norm2 alone, as diffusers does
        hidden_states = _normalize(self, self.norm2, hidden_states, True)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    output_tensor = input_tensor + hidden_states
    # diffusers divides by output_scale_factor even when it is 1.0 (every SD UNet block): one more full pass over the
    # block's output for a division that changes no bit.
    if self.output_scale_factor != 1:
        output_tensor = output_tensor / self.output_scale_factor
    return output_tensor


def _fused_geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' GEGLU.forward with chunk -> gelu -> mul as one ``geglu``: [..., dim_in] -> [..., dim_out]."""
    if args or kwargs.get("scale", None) is not None:
        return type(self).forward(self, hidden_states, *args, **kwargs)  # diffusers' deprecation path
    h = self.proj(hidden_states)
    if not _ops_take(h) or h.dim() < 1:
        values, gate = h.chunk(2, dim=-1)
        return values * self.gelu(gate)
    return getattr(self, _STATE).geglu(h)


def _fused_group_norm_forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.GroupNorm's name
    """nn.GroupNorm.forward through ``group_norm_silu(..., apply_silu=False)``: [B, C, *] -> [B, C, *]."""
    if not _ops_take(input, self.weight, self.bias) or input.dim() < 2:
        return nn.GroupNorm.forward(self, input)
    return getattr(self, _STATE).group_norm(input, self.weight, self.bias, self.num_groups, self.eps, False, None)


_FORWARDS = {"resnet": _fused_resnet_forward, "geglu": _fused_geglu_forward, "group_norm": _fused_group_norm_forward}


# --------------------------------------------------------------------------------------------------
# What can be fused
# --------------------------------------------------------------------------------------------------

_DIGESTS: dict = {}


def _method_digest(fn) -> Optional[str]:
    """sha256 (16 hex digits) of the syntax tree of a function's source (comments and formatting ignored), or None
    when its source cannot be read."""
    if fn not in _DIGESTS:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            _DIGESTS[fn] = hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]
        except (OSError, TypeError, SyntaxError):
            _DIGESTS[fn] = None
    return _DIGESTS[fn]


def _version_reason(owner: str, fn) -> Optional[str]:
    if _method_digest(fn) not in _KNOWN_DIGESTS[owner]:
        import diffusers

        return (f"diffusers {diffusers.__version__}'s {owner} is not the one the fused forward reproduces "
                f"(known: diffusers 0.42)")
    return None


def _params_reason(module: nn.Module) -> Optional[str]:
    for name, p in module.named_parameters():
        if p.dtype not in KERNEL_DTYPES:
            return f"{p.dtype} parameter {name} (the kernels take float32, float16 and bfloat16)"
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _resnet_reason(module: nn.Module, resnet_cls) -> Optional[str]:
    if type(module).forward is not resnet_cls.forward:
        return f"{type(module).__name__} overrides ResnetBlock2D.forward"
    reason = _version_reason("ResnetBlock2D.forward", resnet_cls.forward)
    if reason:
        return reason
    for name in ("norm1", "norm2"):
        norm = getattr(module, name, None)
        if type(norm) is not nn.GroupNorm:
            return f"{name} is {type(norm).__name__}, not torch.nn.GroupNorm"
        if _hooked(norm):
            return f"{name} has forward hooks (the fused forward does not call {name})"
    if type(module.nonlinearity) is not nn.SiLU:
        return f"nonlinearity {type(module.nonlinearity).__name__} (the fused op applies SiLU only)"
    if _hooked(module.nonlinearity):
        return "nonlinearity has forward hooks"
    return _params_reason(module.norm1) or _params_reason(module.norm2)


def _geglu_reason(module: nn.Module, geglu_cls) -> Optional[str]:
    if type(module).forward is not geglu_cls.forward or type(module).gelu is not geglu_cls.gelu:
        return f"{type(module).__name__} overrides GEGLU.forward or GEGLU.gelu"
    reason = _version_reason("GEGLU.forward", geglu_cls.forward) or _version_reason("GEGLU.gelu", geglu_cls.gelu)
    if reason:
        return reason
    from diffusers.utils import is_torch_npu_available

    if is_torch_npu_available():
        return "torch_npu is available (diffusers' GEGLU then runs torch_npu.npu_geglu)"
    return None


def _group_norm_reason(module: nn.Module) -> Optional[str]:
    return _params_reason(module)


# --------------------------------------------------------------------------------------------------
# Fuse / unfuse
# --------------------------------------------------------------------------------------------------


def fuse_unet_body(model: nn.Module, *, backend: str = "auto") -> FusedUnetBody:
    """Fuses the non-GEMM hot paths of every ResnetBlock2D, GEGLU and other GroupNorm in ``model`` (see the module
    docstring for what and why); returns a :class:`FusedUnetBody` for :func:`unfuse_unet_body`. Modules fused
    before are left as they are (counted in ``already``). ``backend``: 'auto' (the ops: PyTorch's composite on
    the CPU, Triton on CUDA) or 'triton' (the Triton ops everywhere; CPU tensors need TRITON_INTERPRET=1)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_unet_body: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in FUSION_BACKENDS:
        raise ValueError(f"fuse_unet_body: backend must be one of {FUSION_BACKENDS}, got {backend!r}")
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D

    patched: dict[str, str] = {}
    skipped: dict[str, str] = {}
    already = 0
    covered: set[int] = set()  # norms a fused ResnetBlock2D's forward runs itself
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, ResnetBlock2D):
            kind, reason = "resnet", _resnet_reason(module, ResnetBlock2D)
        elif isinstance(module, GEGLU):
            kind, reason = "geglu", _geglu_reason(module, GEGLU)
        elif type(module) is nn.GroupNorm:
            kind, reason = "group_norm", _group_norm_reason(module)
        else:
            continue
        if _STATE in module.__dict__:
            already += 1
            if kind == "resnet":
                covered.update((id(module.norm1), id(module.norm2)))
            continue
        if reason is None and "forward" in module.__dict__:
            reason = "forward already replaced on the instance (another patcher)"
        if reason is not None:
            skipped[name] = reason
            continue
        if kind == "resnet":
            covered.update((id(module.norm1), id(module.norm2)))
        candidates.append((name, module, kind))

    for name, module, kind in candidates:
        if kind == "group_norm" and id(module) in covered:
            continue  # its block's fused forward normalizes with the op
        module.__dict__[_STATE] = _Fusion(kind, backend, module.__dict__.get("forward"),
                                          getattr(torch.ops.ddim_fast, _GROUP_NORM_OPS[backend]),
                                          getattr(torch.ops.ddim_fast, _GEGLU_OPS[backend]))
        module.forward = types.MethodType(_FORWARDS[kind], module)
        patched[name] = kind
        logger.debug("fuse_unet_body: fused %s (%s)", name or type(module).__name__, kind)
    return FusedUnetBody(patched, skipped, already, backend)


def unfuse_unet_body(model: nn.Module, record: FusedUnetBody) -> int:
    """Removes the fused forwards ``fuse_unet_body`` set on ``model`` (the modules named in ``record.patched``),
    putting back whatever instance-level ``forward`` each had before; returns how many modules were restored. A
    module gone from the model, or no longer fused, is logged and skipped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse_unet_body: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(record, FusedUnetBody):
        raise TypeError(f"unfuse_unet_body: record must be the FusedUnetBody fuse_unet_body returned, got "
                        f"{type(record).__name__}")
    modules = dict(model.named_modules())
    restored = 0
    for name in record.patched:
        module = modules.get(name)
        if module is None:
            logger.warning("unfuse_unet_body: module %s is gone from %s; nothing to restore", name,
                           type(model).__name__)
            continue
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            logger.info("unfuse_unet_body: %s is not fused (unfused before?)", name)
            continue
        if state.original_forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = state.original_forward
        restored += 1
    return restored
