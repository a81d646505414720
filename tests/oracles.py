"""The tests' oracles: every ddim_fast op as a float64 formula written from its equations, independently of the
product. Nothing here imports ddim_fast: ``ddim_fast.reference`` is a production path (the ``reference``
backend, float64 latents, devices without kernels), so a test that compared a kernel with it would compare the
product with itself, and one that checked the reference backend against it could not fail.

Each function returns float64 CPU tensors (row-major; the tests compare values, the layout tests strides), and
``relative_error`` is the one metric of ``conftest.assert_rel_close``. tests/test_reference.py holds these
formulas to hand-computed closed forms and to PyTorch's own float64 functionals, and holds ``ddim_fast.reference``
(the backend) to them.
"""

from __future__ import annotations

import math

import torch

# The coefficient table's columns, as csrc/include/ddim_fast/step_math.h (TableColumn) documents them: the op's
# contract with whoever builds a table. Written out here, not imported from ddim_fast.schedule, so that a change
# of layout on one side fails the tests instead of moving both.
SQRT_ALPHA, SQRT_ONE_MINUS_ALPHA, SQRT_ALPHA_PREV, DIR_COEF, SIGMA = 1, 2, 3, 4, 5

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_2 / ||ref||_2 in float64 (the absolute norm when ref is 0; 0 for two empty tensors)."""
    a, b = out.detach().cpu().double().reshape(-1), ref.detach().cpu().double().reshape(-1)
    if b.numel() == 0:
        return 0.0
    diff = math.sqrt(float(((a - b) ** 2).sum()))
    norm = math.sqrt(float((b**2).sum()))
    return diff / norm if norm > 0 else diff


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(torch.float64)


# --------------------------------------------------------------------------------------------------
# DDIM step
# --------------------------------------------------------------------------------------------------


def ddim_step(x, model_output, table, row, *, guidance_scale=None, prediction_type="epsilon", clip_range=None,
              x0_threshold=None, use_clipped_model_output=False, noise=None, temperature=1.0):
    """One DDIM step (Song et al. 2021, eq. 12) in float64: (x_prev, pred_x0), float64 CPU [B, ...].

    With a_t, a_prev and sigma the row's alphas and noise scale (the table stores sqrt(a_t), sqrt(1 - a_t),
    sqrt(a_prev), sqrt(1 - a_prev - sigma^2) and sigma, read here as given):
        eps_model = u + s (c - u)                    for model_output = [u; c] and guidance_scale s
        x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t),  eps = eps_model                          ("epsilon")
        x0 = sqrt(a_t) x - sqrt(1 - a_t) v,        eps = sqrt(a_t) v + sqrt(1 - a_t) x        ("v_prediction")
        x0 = model output,                         eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)   ("sample")
        x0 -> clamp(x0, -r, r) (clip_range r) or clamp(x0, -s_b, s_b) / s_b (x0_threshold s, per sample b);
              eps re-derived from the clamped x0 with use_clipped_model_output
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * temperature * z
    ``row`` is an int or a one-element tensor; ``noise`` (z) a tensor or None (no noise term).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"oracle: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    index = int(row.reshape(-1)[0]) if isinstance(row, torch.Tensor) else int(row)
    coefs = _f64(table)[index]
    sqrt_a = coefs[SQRT_ALPHA].item()
    sqrt_1ma = coefs[SQRT_ONE_MINUS_ALPHA].item()
    sqrt_a_prev = coefs[SQRT_ALPHA_PREV].item()
    direction = coefs[DIR_COEF].item()
    sigma = coefs[SIGMA].item()

    x = _f64(x)
    out = _f64(model_output)
    if guidance_scale is not None:
        batch = x.shape[0]
        uncond, cond = out[:batch], out[batch:]
        out = uncond + float(guidance_scale) * (cond - uncond)

    if prediction_type == "epsilon":
        eps = out
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x - sqrt_1ma * out
        eps = sqrt_a * out + sqrt_1ma * x
    else:
        x0 = out
        eps = (x - sqrt_a * x0) / sqrt_1ma

    clamped = clip_range is not None or x0_threshold is not None
    if clip_range is not None:
        r = float(clip_range)
        x0 = torch.where(x0 < -r, -r, torch.where(x0 > r, r, x0))  # NaN stays NaN
    if x0_threshold is not None:
        s = _f64(x0_threshold).reshape((-1,) + (1,) * (x0.dim() - 1))
        x0 = torch.where(x0 < -s, -s, torch.where(x0 > s, s, x0)) / s
    if clamped and use_clipped_model_output:
        eps = (x - sqrt_a * x0) / sqrt_1ma

    x_prev = sqrt_a_prev * x0 + direction * eps
    if noise is not None:
        x_prev = x_prev + sigma * float(temperature) * _f64(noise)
    return x_prev, x0


# --------------------------------------------------------------------------------------------------
# Softmax and attention
# --------------------------------------------------------------------------------------------------


def scaled_masked_softmax(scores, mask, scale, dtype: torch.dtype = torch.float64):
    """softmax over the last dim of scores * scale with a mask broadcast to the scores' shape: a bool mask keeps
    the True entries (a row with none kept is uniform over every key, ldm's masked_fill meaning), a float mask
    is added (a row that is -inf everywhere is NaN, as softmax gives it). Computed in ``dtype`` (float64 unless
    a test wants plain PyTorch's error in a lower precision)."""
    s = scores.detach().cpu().to(dtype) * scale
    if mask is None:
        return torch.softmax(s, dim=-1)
    mask = mask.detach().cpu()
    if mask.dtype != torch.bool:
        return torch.softmax(s + mask.to(dtype), dim=-1)
    keep = mask.expand(s.shape)
    p = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)  # dropped keys weigh exactly 0
    # A row without a kept key is NaN above (0/0); ldm's masked_fill(-max) makes it uniform.
    return torch.where(keep.any(dim=-1, keepdim=True), p, torch.full((), 1.0 / s.shape[-1], dtype=dtype))


def attention(q, k, v, scale, mask=None, dtype: torch.dtype = torch.float64):
    """softmax(q k^T * scale (+ mask)) v: q [..., Lq, D], k [..., Lk, D], v [..., Lk, Dv] -> [..., Lq, Dv],
    the mask as in :func:`scaled_masked_softmax`."""
    q, k, v = (t.detach().cpu().to(dtype) for t in (q, k, v))
    p = scaled_masked_softmax(q @ k.transpose(-1, -2), mask, scale, dtype)
    return p @ v


# --------------------------------------------------------------------------------------------------
# UNet body
# --------------------------------------------------------------------------------------------------


def group_norm_silu(x, weight, bias, num_groups, eps, apply_silu, channel_add=None):
    """GroupNorm over x [B, C, *spatial] (groups of C / num_groups consecutive channels; mean and biased
    variance over a group's channels and positions), of x + channel_add[b, c] when given, then the per-channel
    affine, then SiLU y * sigmoid(y) when ``apply_silu``."""
    x = _f64(x)
    batch, channels = x.shape[:2]
    ones = (1,) * (x.dim() - 2)
    if channel_add is not None:
        x = x + _f64(channel_add).reshape(batch, channels, *ones)
    groups = x.reshape(batch, num_groups, -1)
    var, mean = torch.var_mean(groups, dim=-1, correction=0, keepdim=True)
    y = ((groups - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * _f64(weight).reshape(channels, *ones)
    if bias is not None:
        y = y + _f64(bias).reshape(channels, *ones)
    if apply_silu:
        y = y / (1.0 + torch.exp(-y))
    return y


def geglu(h):
    """diffusers' GEGLU after its projection: h [..., 2D] = [values, gates] -> values * gelu(gates) [..., D],
    with the exact GELU g * Phi(g) = g (1 + erf(g / sqrt 2)) / 2."""
    h = _f64(h)
    half = h.shape[-1] // 2
    values, gates = h[..., :half], h[..., half:]
    return values * gates * 0.5 * (1.0 + torch.erf(gates / math.sqrt(2.0)))
