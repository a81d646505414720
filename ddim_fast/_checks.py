"""Argument checks and output allocators shared by every layer above them: the ops front doors
(``ddim_fast.ops``, ``ddim_fast.attention``), the Triton launchers (``ddim_fast.triton``), the fake kernels
(``ddim_fast._library``) and the drop-ins (samplers, scheduler). Imports nothing from ddim_fast, so no
import cycle can go through it.

Every message names the operation, the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Accepted spellings of the parameterisation: diffusers' names and ldm's.
_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "sample": "sample",
    "x0": "sample",
}


def canonical_prediction_type(prediction_type: str) -> str:
    """'eps'/'epsilon' -> 'epsilon', 'v'/'v_prediction' -> 'v_prediction', 'x0'/'sample' -> 'sample'."""
    if not isinstance(prediction_type, str):
        raise TypeError(f"prediction_type must be a str, got {type(prediction_type).__name__}")
    try:
        return _PREDICTION_ALIASES[prediction_type]
    except KeyError:
        raise ValueError(
            f"prediction_type must be one of {sorted(_PREDICTION_ALIASES)}, got {prediction_type!r}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def require_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float_tensor(op: str, name: str, value, *, allow_float64: bool = False) -> torch.Tensor:
    """A float32/float16/bfloat16 tensor (float64 too with ``allow_float64``)."""
    require_tensor(op, name, value)
    if value.dtype not in KERNEL_DTYPES and not (allow_float64 and value.dtype == torch.float64):
        expected = "float32, float16, bfloat16 or float64" if allow_float64 else "float32, float16 or bfloat16"
        raise TypeError(f"{op}: {name} must be a {expected} tensor, got {value.dtype}")
    return value


def row_from_renamed_step(op: str, row, step):
    """The table row of a step function called with ``step=``, the row argument's name in ddim_fast 0.1
    (a DeprecationWarning that names ``row``; removed in 0.3), or the error when neither or both are given."""
    if step is None:
        raise TypeError(f"{op}: missing the table row: {op}(x, model_output, table, row, ...)")
    if row is not None:
        raise TypeError(f"{op}: got both row and step (step is the deprecated name of row); pass row only")
    warnings.warn(f"{op}: the keyword `step` is deprecated and will be removed in ddim_fast 0.3; pass `row` "
                  "(the index of the table row to use), or pass it positionally", DeprecationWarning, stacklevel=3)
    return step


# --------------------------------------------------------------------------------------------------
# Python scalars
# --------------------------------------------------------------------------------------------------


def real_number(op: str, name: str, value, *, optional: bool = False) -> float:
    # bool is an int subclass: True as a guidance scale is a bug, not 1.0. 0-dim tensors and numpy scalars
    # are what pipelines sometimes pass; reading one costs a host sync only when it lives on a GPU.
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float{' or None' if optional else ''}, got {type(value).__name__}")
    return float(value)


def finite_float(op: str, name: str, value, *, minimum: float | None = None, exclusive: bool = False,
                 optional: bool = False) -> float:
    """``value`` as a float, refusing NaN, +-inf and (with ``minimum``) values below it (or equal to it with
    ``exclusive``): a non-finite guidance scale or eta would silently turn every latent into NaN.
    Called on every sampling step: a plain finite Python float within the bounds returns after a few checks."""
    if type(value) is float and math.isfinite(value) and (
            minimum is None or value > minimum or (value == minimum and not exclusive)):
        return value
    v = real_number(op, name, value, optional=optional)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if minimum is not None and (v < minimum or (exclusive and v == minimum)):
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise ValueError(f"{op}: {name} must be {bound}, got {v:g}")
    return v


# --------------------------------------------------------------------------------------------------
# Output allocation (mirrored by allocate_ddim_step_outputs in csrc/ddim_step_args.cpp)
# --------------------------------------------------------------------------------------------------


def allocate_step_outputs(x: torch.Tensor, return_pred_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The functional step's outputs (x_prev, pred_x0) in x's dtype; pred_x0 has shape [0] unless asked.
    Laid out like element-wise PyTorch lays out its result: ``torch.empty_like(x)`` (x's strides when x is
    non-overlapping and dense, so channels_last stays channels_last; else x's suggested memory format).
    Used by the fake kernels and the Triton op so that every backend allocates alike."""
    out = torch.empty_like(x)
    pred_x0 = torch.empty_like(x) if return_pred_x0 else torch.empty((0,), dtype=x.dtype, device=x.device)
    return out, pred_x0


# --------------------------------------------------------------------------------------------------
# Attention: q/k/v and mask rules (every attention op and wrapper)
# --------------------------------------------------------------------------------------------------


def check_qkv(op: str, q, k, v) -> None:
    """Tensors of one float dtype and device, q [B, H, Lq, D] or [B*H, Lq, D], k/v with q's rank and leading
    dims (nothing is broadcast), one head dim D, as many values as keys."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_float_tensor(op, name, t)
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


# Largest finite float32: the kernels multiply the scores by float32(scale), so a larger double overflows to inf.
_FLOAT32_MAX = 3.4028234663852886e38


def check_softmax_scale(op: str, scale) -> float:
    """The softmax scale of the attention ops as a float: a real number (not bool) whose float32 value is
    finite. NaN or +-inf (or a double beyond float32's range) would make every output NaN without a word."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a float, got {type(scale).__name__}")
    value = float(scale)
    if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
        raise ValueError(f"{op}: scale must be finite (in float32's range), got {value}")
    return value


def check_mask(op: str, mask: torch.Tensor, score_shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """mask.dim() == len(score_shape) ([..., Lq, Lk]), last dim Lk, every other dim equal or 1 (broadcast
    without a copy); bool (True = keep) or additive in the scores' dtype; on the scores' device."""
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


# --------------------------------------------------------------------------------------------------
# UNet-body ops: group_norm_silu and geglu (every kernel, fake kernel and the front door)
# --------------------------------------------------------------------------------------------------


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def check_group_norm_args(op: str, x, weight, bias, num_groups, eps, channel_add) -> None:
    """x a float32/float16/bfloat16 tensor [B, C, *spatial] (at least 2 dims, any strides); num_groups an int
    > 0 dividing C; eps a finite float >= 0; weight and bias None or float tensors [C]; channel_add None or a
    float tensor [B, C] (any strides, stride 0 broadcasts); all on x's device."""
    require_float_tensor(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, C, *spatial] with at least 2 dims, got shape {_shape_str(x.shape)}")
    channels = int(x.shape[1])
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"{op}: num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0:
        raise ValueError(f"{op}: num_groups must be > 0, got {num_groups}")
    if channels % num_groups != 0:
        raise ValueError(f"{op}: num_groups ({num_groups}) must divide the channel count C = x.shape[1] = {channels}")
    finite_float(op, "eps", eps, minimum=0.0)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        require_float_tensor(op, name, t)
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{op}: {name} must be [C] = [{channels}], got shape {_shape_str(t.shape)}")
    if channel_add is not None:
        require_float_tensor(op, "channel_add", channel_add)
        if channel_add.device != x.device:
            raise ValueError(f"{op}: channel_add must be on x's device {x.device}, got {channel_add.device}")
        if tuple(channel_add.shape) != (int(x.shape[0]), channels):
            raise ValueError(f"{op}: channel_add must be [B, C] = [{int(x.shape[0])}, {channels}] (one value per "
                             f"sample and channel, added to x before normalizing), got shape "
                             f"{_shape_str(channel_add.shape)}")


def check_geglu_args(op: str, h) -> int:
    """h a float32/float16/bfloat16 tensor [..., 2D] (at least 1 dim, even last dim). Returns D."""
    require_float_tensor(op, "h", h)
    if h.dim() < 1:
        raise ValueError(f"{op}: h must be [..., 2*D] (the GEGLU projection's output), got a 0-dim tensor")
    if h.shape[-1] % 2 != 0:
        raise ValueError(f"{op}: h's last dim must be even ([..., 2*D]: values then gates), got shape "
                         f"{_shape_str(h.shape)}")
    return int(h.shape[-1]) // 2


def allocate_group_norm_output(x: torch.Tensor) -> torch.Tensor:
    """group_norm_silu's output: ``torch.empty_like(x)`` (channels_last stays channels_last; NCHW stays NCHW; a
    non-dense view gets x's suggested memory format), what every backend and the fake kernel return."""
    return torch.empty_like(x)


def allocate_geglu_output(h: torch.Tensor) -> torch.Tensor:
    """geglu's output: a new contiguous [..., D] tensor in h's dtype (what diffusers' ``a * gelu(gate)`` gives for
    a contiguous projection output)."""
    return torch.empty((*h.shape[:-1], h.shape[-1] // 2), dtype=h.dtype, device=h.device)


def reasons_summary(reasons: dict[str, str]) -> str:
    """One line for the modules a patcher left alone (name -> why): each reason once, with how many modules and
    the first one's name (``fuse_attention``, ``fuse_qkv`` and ``fuse_unet_body`` report this way)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{reason}: {len(names)} module{'s' if len(names) > 1 else ''} ({names[0]}"
                     f"{', ...' if len(names) > 1 else ''})" for reason, names in by_reason.items())
