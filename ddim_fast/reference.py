"""Every ddim_fast op in plain PyTorch, written for clarity rather than speed: the ``reference`` backend.

A production path, not the tests' oracle: ``backend="reference"`` of the step, attention and softmax runs these
functions (float64 latents, which no kernel stores, and devices without kernels), as does the UNet-body ops'
fallback (``ddim_fast.unet_ops``); ``attention_choice`` checks a candidate kernel against :func:`attention` in
float64 before it trusts a timing; the drop-ins take :func:`dynamic_threshold` from here, the tools time
:func:`ddim_step` in fp32 (``compute_dtype=None``) as "what ldm/diffusers do per step" and report
:func:`relative_error`. The seeded noise (:func:`philox_normal`, :func:`seeded_noise`) is the kernels' Philox
mapping in numpy, which the reference backend draws on the host.

The tests hold every backend, this one included, to independent float64 formulas written from the equations in
tests/oracles.py (docs/design.md, "Testing"), so none of these functions is checked against itself.
"""

from __future__ import annotations

import numpy as np
import torch

from ddim_fast import _checks
from ddim_fast import schedule as _schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def guidance_combine(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: model_output [2B, ...] = cat([uncond, cond]) -> uncond + s (cond - uncond) [B, ...]."""
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def predict_x0_eps(x: torch.Tensor, model_output: torch.Tensor, sqrt_alpha, sqrt_one_minus_alpha, prediction_type: str):
    """(x0_hat, eps_hat) from the model output for eps / v / sample parameterisations."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x - sqrt_one_minus_alpha * eps) / sqrt_alpha
    elif prediction_type == "v_prediction":
        x0 = sqrt_alpha * x - sqrt_one_minus_alpha * model_output
        eps = sqrt_alpha * model_output + sqrt_one_minus_alpha * x
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x - sqrt_alpha * x0) / sqrt_one_minus_alpha
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0, eps


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding scale s per sample, as diffusers computes it: the `ratio` quantile of
    |x0| over each sample, clamped to [1, max_value]. x0 [B, ...] -> s [B] (float32, or float64 for fp64 x0)."""
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def ddim_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    row: torch.Tensor | int | None = None,
    *,
    guidance_scale: float | None = None,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    x0_threshold: torch.Tensor | None = None,
    use_clipped_model_output: bool = False,
    noise: torch.Tensor | None = None,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = torch.float64,
    step: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step, unfused, with the semantics of ``ddim_fast.ops.ddim_step``.

    x [B, ...]; model_output [B, ...] or [2B, ...] (uncond first) with guidance_scale; table [R, 8] from
    ddim_fast.schedule.coefficient_table; row the index of the table row to use, an int or an int64 tensor of
    one element (``ops.ddim_step`` says what a row is for each caller); noise [B, ...] or None;
    x0_threshold [B] (per-sample dynamic-threshold scale s: x0 -> clamp(x0, -s, s) / s). ``step=`` is the
    deprecated keyword name of ``row`` (a DeprecationWarning until 0.3).
    Returns (x_prev, pred_x0) in compute_dtype (x's dtype when compute_dtype is None), laid out like
    ``torch.empty_like(x)`` (channels_last x gives channels_last outputs).
    """
    if step is not None or row is None:
        row = _checks.row_from_renamed_step("ddim_fast.reference.ddim_step", row, step)
    dtype = x.dtype if compute_dtype is None else compute_dtype
    x_layout = x  # the outputs are laid out like x (like_input), whatever the arithmetic below leaves
    coefs = table[row].reshape(-1).to(dtype) if torch.is_tensor(row) else table[int(row)].to(dtype)
    sqrt_alpha = coefs[_schedule.COL_SQRT_ALPHA]
    sqrt_one_minus_alpha = coefs[_schedule.COL_SQRT_ONE_MINUS_ALPHA]
    sqrt_alpha_prev = coefs[_schedule.COL_SQRT_ALPHA_PREV]
    dir_coef = coefs[_schedule.COL_DIR_COEF]
    sigma = coefs[_schedule.COL_SIGMA]

    x = x.to(dtype)
    m = model_output.to(dtype)
    if guidance_scale is not None:
        m = guidance_combine(m, guidance_scale)
    x0, eps = predict_x0_eps(x, m, sqrt_alpha, sqrt_one_minus_alpha, prediction_type)
    clamped = False
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
        clamped = True
    if x0_threshold is not None:
        s = x0_threshold.to(dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s
        clamped = True
    if clamped and use_clipped_model_output:
        eps = (x - sqrt_alpha * x0) / sqrt_one_minus_alpha
    x_prev = sqrt_alpha_prev * x0 + dir_coef * eps
    if noise is not None:
        x_prev = x_prev + sigma * temperature * noise.to(dtype)
    return like_input(x_prev, x_layout), like_input(x0, x_layout)


def like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as ``torch.empty_like(x)`` lays out a result (x's strides when x is non-overlapping and
    dense, e.g. channels_last; else x's suggested memory format), the layout every ddim_fast backend gives its
    outputs. The values are unchanged; ``t`` itself when it already has that layout."""
    if x.is_contiguous() and t.is_contiguous():
        return t  # the common case, without an allocation (benchmarks time this function)
    like = torch.empty_like(x, dtype=t.dtype, device=t.device)
    if like.stride() == t.stride():
        return t
    return like.copy_(t)


# ----------------------------------------------------------------------------------------------------
# Seeded noise: Philox4x32-10 + Box-Muller, the mapping of csrc/include/ddim_fast/philox.h
# ----------------------------------------------------------------------------------------------------

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on uint32 counters [N, 4] with key (k0, k1): uint32 [N, 4]."""
    c = [counter[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    for round_ in range(10):
        if round_ > 0:
            k0 = (k0 + np.uint64(_W0)) & _MASK32
            k1 = (k1 + np.uint64(_W1)) & _MASK32
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return np.stack(c, axis=1).astype(np.uint32)


def philox_words(seed: int, offset: int, numel: int) -> np.ndarray:
    """The raw Philox words for elements [0, numel): uint32 [ceil(numel/4), 4] (group g = i >> 2)."""
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    counter = np.stack(
        [
            groups & _MASK32,
            groups >> np.uint64(32),
            np.full_like(groups, offset & 0xFFFFFFFF),
            np.full_like(groups, offset >> 32),
        ],
        axis=1,
    ).astype(np.uint32)
    return philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))


def philox_normal(seed: int, offset: int, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals of the seeded in-kernel draw: element i (row-major in `shape`) at table row k uses
    offset = rng_offset + k. Computed in float64 from the same 24-bit uniforms as the kernels, so it
    matches them to fp32 rounding of the transcendental functions."""
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape)) if shape else 1
    words = philox_words(seed, offset, numel).astype(np.float64)
    u = np.floor(words / 256.0) * 2.0**-24  # (r >> 8) * 2^-24
    radius_a = np.sqrt(-2.0 * np.log(u[:, 0] + 2.0**-24))
    radius_b = np.sqrt(-2.0 * np.log(u[:, 2] + 2.0**-24))
    angle_a = 2.0 * np.pi * u[:, 1]
    angle_b = 2.0 * np.pi * u[:, 3]
    z = np.stack(
        [radius_a * np.cos(angle_a), radius_a * np.sin(angle_a), radius_b * np.cos(angle_b), radius_b * np.sin(angle_b)],
        axis=1,
    ).reshape(-1)[:numel]
    return torch.from_numpy(z.reshape(shape)).to(dtype)


def philox_normal_rows(streams, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The seeded draw with one Philox stream per batch row (rng_state [B, 2]): ``streams`` holds one
    (seed, offset) pair per batch row of ``shape`` (offset = that row's rng offset + table row). Row b is the
    one-stream draw of a single sample, ``philox_normal(seed_b, offset_b, shape[1:])``: group g = j >> 2 of
    the index j inside the row, never straddling rows, so a row's noise does not depend on b or on B."""
    shape = tuple(int(s) for s in shape)
    streams = [(int(seed), int(offset)) for seed, offset in streams]
    if not shape or len(streams) != shape[0]:
        raise ValueError(f"philox_normal_rows: need one (seed, offset) per row of shape {shape}, got {len(streams)}")
    rows = [philox_normal(seed, offset, shape[1:], dtype) for seed, offset in streams]
    if not rows:
        return torch.empty(shape, dtype=dtype)
    return torch.stack(rows)


def seeded_noise(rng_state, row: int, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The noise the kernels draw for ``rng_state`` at table row ``row``: [2] = (seed, offset), one stream over
    the tensor (philox_normal with offset + row), or [B, 2], one stream per batch row (philox_normal_rows).
    ``rng_state`` is a tensor or nested sequence of ints (read on the host)."""
    values = rng_state.tolist() if isinstance(rng_state, torch.Tensor) else list(rng_state)
    row = int(row)
    if values and isinstance(values[0], (list, tuple)):
        return philox_normal_rows([(seed, offset + row) for seed, offset in values], shape, dtype)
    if len(values) == 0 and len(tuple(shape)) > 0 and int(tuple(shape)[0]) == 0:
        return torch.empty(tuple(int(s) for s in shape), dtype=dtype)  # a [0, 2] state for an empty batch
    seed, offset = (int(v) for v in values)
    return philox_normal(seed, offset + row, shape, dtype)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def apply_attention_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean masks keep True positions and fill the rest with -finfo.max (ldm's masked_fill: a fully
    masked row then softmaxes to a uniform row, never NaN); float masks are added (diffusers style)."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, -torch.finfo(scores.dtype).max)
    return scores + mask.to(scores.dtype)


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float,
                          compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(scores * scale (+ mask)) over the last dim. scores [..., Lq, Lk]; mask broadcastable to it."""
    s = scores.to(compute_dtype) * scale
    return torch.softmax(apply_attention_mask(s, mask), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
              compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) v. q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv] -> [..., Lq, Dv]."""
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2))
    probs = scaled_masked_softmax(scores, mask, scale, compute_dtype)
    return torch.matmul(probs, v.to(compute_dtype))


# ----------------------------------------------------------------------------------------------------
# UNet body: GroupNorm (+ SiLU), GEGLU
# ----------------------------------------------------------------------------------------------------


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float, apply_silu: bool, channel_add: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """GroupNorm over x [B, C, *spatial] with ``num_groups`` groups of C / num_groups consecutive channels:
    per (sample, group), mean and biased variance over the group's channels and every spatial position;
    y = (x' - mean) / sqrt(var + eps) * weight[c] + bias[c] with x' = x + channel_add[b, c] (when given, [B, C]);
    then SiLU y * sigmoid(y) when ``apply_silu``. Returns compute_dtype, laid out like ``torch.empty_like(x)``."""
    batch, channels = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    ones = (1,) * len(spatial)
    v = x.to(compute_dtype)
    if channel_add is not None:
        v = v + channel_add.to(compute_dtype).reshape(batch, channels, *ones)
    grouped = v.reshape(batch, num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(v.shape)
    if weight is not None:
        y = y * weight.to(compute_dtype).reshape(channels, *ones)
    if bias is not None:
        y = y + bias.to(compute_dtype).reshape(channels, *ones)
    if apply_silu:
        y = y * torch.sigmoid(y)
    return like_input(y, x)


def geglu(h: torch.Tensor, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diffusers' GEGLU after its projection: h [..., 2D] = [values, gates] -> values * gelu(gates) [..., D], with
    the exact (erf) GELU g * (1 + erf(g / sqrt(2))) / 2 (``F.gelu``'s default). Returns compute_dtype."""
    values, gates = h.to(compute_dtype).chunk(2, dim=-1)
    return values * (0.5 * gates * (1.0 + torch.erf(gates * (2.0 ** -0.5))))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 for two empty tensors)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if ref64.numel() == 0:
        return 0.0
    denom = torch.linalg.vector_norm(ref64).item()
    num = torch.linalg.vector_norm(out64 - ref64).item()
    return num / denom if denom > 0 else num
