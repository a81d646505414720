"""Triton GroupNorm (+ SiLU) over [B, C, *spatial] in any layout, built for channels_last (NHWC) UNets.

The op ``ddim_fast::group_norm_silu_triton(x, weight, bias, num_groups, eps, apply_silu, channel_add) -> y``
(schema in csrc/ops.cpp; kernel and fake kernel registered by ddim_fast/_library.py, which imports this module on
the first call). It is also the CUDA kernel of ``ddim_fast::group_norm_silu``. Semantics (docs/design.md section 3):
per (sample, group) mean and biased variance of x' = x + channel_add[b, c] over the group's C / G consecutive
channels and every spatial position; y = (x' - mean) * rsqrt(var + eps) * weight[c] + bias[c], then SiLU when
``apply_silu``; fp32 math for fp32/fp16/bf16 storage; y laid out like ``torch.empty_like(x)``.

Why not PyTorch's: on a channels_last CUDA tensor ``F.group_norm`` is a slow path (a layout copy around NCHW
kernels), and the SiLU after it is one more pass over memory; in a ResnetBlock2D the time-embedding add before
norm2 is another. Here the whole thing is two passes over x (read for the statistics, read + write for the
output), whatever the layout, with the add and the SiLU folded in.

Three launches, all on the current stream, with one fp32 workspace from the caching allocator (graph-safe, no
host sync):

1. statistics: one program per (sample, chunk of BLOCK_P spatial positions, block of BLOCK_C channels) loads its
   [BLOCK_P, BLOCK_C] tile once and writes, per channel, the tile's mean and its sum of squared deviations from
   that mean (M2: two passes over registers, exact, no E[x^2] - E[x]^2 cancellation);
2. finalize: one program per (sample, group) merges the chunks' and channels' (count, mean, M2) with Chan's
   parallel formula (a first loop for the group mean, a second for M2 = sum M2_k + sum n_k (mean_k - mean)^2),
   and writes per (sample, channel) the normalization as (center, scale, shift): center = mean - channel_add,
   scale = rstd * weight, shift = bias. The time-embedding add costs nothing in the big kernels: it shifts each
   channel's mean (M2 is unchanged), so it only enters here;
3. apply: the statistics kernel's tiles again, y = (x - center) * scale + shift (+ SiLU), stored in y's layout.
   Subtracting the center before scaling keeps the rounding of the normalized value independent of |mean| / std
   (x * scale + (shift - mean * scale) rounds x * scale, a number |mean| / std times larger than the result).

Tiles and 16-byte accesses. A tile is [BLOCK_P positions, BLOCK_C channels]. The LAYOUT constexpr says which
axis is unit-stride: 1 = channels (channels_last: in NHWC a group's channels are contiguous within each pixel, so
the channel axis carries the vectors), 2 = positions (NCHW), 0 = neither (element-wise accesses). When every
base pointer is 16-byte aligned and every other stride (and the extent along the unit-stride axis) is a multiple
of 16 bytes (every SD shape: C in 320 ... 2560, spatial 8x8 ... 128x128), the host sets ALIGN = elements per 16
bytes, and the kernels rebuild those strides as (s // ALIGN) * ALIGN, which is how Triton's alignment analysis
learns a divisibility the JIT only hints for multiples of 16: every x / y access is then one 16-byte vector
(scripts/triton_aot_check.py checks the PTX of every SD launch for sm_90 and sm_80). Channel blocks divide C
where a power of two does (320 = 5 x 64, 960 = 15 x 64, 640 / 1280 / 1920 / 2560 in 128s), so no lane idles.

fp32 storage on the GPU uses IEEE division, sqrt and libdevice's expf (the 1e-6 contract); fp16/bf16 the fast
ones. Under ``TRITON_INTERPRET=1`` (CPU tensors, the tests) the same kernels and launch configurations run, with
numpy's exact math.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

import ddim_fast  # noqa: F401  (registers torch.ops.ddim_fast.*)
from ddim_fast._checks import allocate_group_norm_output, check_group_norm_args
from ddim_fast._library import check_triton_device
from ddim_fast.triton import PlanCache

__all__ = ["group_norm_silu_triton", "group_norm_silu_triton_impl", "launch_config", "plan_launch"]

# LAYOUT constexpr: which tile axis is unit-stride in memory.
LAYOUT_STRIDED, LAYOUT_CHANNELS, LAYOUT_PIXELS = 0, 1, 2
# Elements per statistics/apply tile: 32 per thread on 4 warps (four 16-byte fp16 vectors, eight fp32 ones).
_TILE = 4096
# The finalize tile: [BLOCK_K chunks, BLOCK_GROUPS groups, BLOCK_G channels] fp32 values.
_FINALIZE_TILE = 1024  # 8 values per thread on 4 warps


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


# The statistics and apply kernels (one program per tile: many) call no @triton.jit helpers: under
# TRITON_INTERPRET=1 every helper call re-patches the language module (a few ms each), which made a program cost
# ~100 ms. The finalize kernel (one program per group: few) keeps its tile and store helpers.


# Integer arguments are not specialized (no "== 1" constants, no divisibility-by-16 variants): the kernels learn the
# divisibility that matters from ALIGN, so one compile per constexpr combination serves every shape (the JIT's
# hints made SD's shapes 100+ compiles per kernel: seconds each on a fresh process's first UNet call).
_STATS_INTS = ["C", "HW", "num_chunks", "stride_b", "stride_c", "stride_p"]
_FINALIZE_INTS = ["C", "HW", "chunk_size", "num_chunks", "num_groups", "group_size", "group_blocks", "stride_w",
                  "stride_bias", "stride_add_b", "stride_add_c"]
_APPLY_INTS = ["C", "HW", "num_chunks", "stride_xb", "stride_xc", "stride_xp", "stride_yb", "stride_yc", "stride_yp"]


@triton.jit(do_not_specialize=_STATS_INTS)
def _group_norm_stats_kernel(
    x_ptr, part_ptr,
    C, HW, num_chunks,
    stride_b, stride_c, stride_p,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, IEEE_MATH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (b * num_chunks + chunk, channel block): per channel of its [BLOCK_P, BLOCK_C] tile, the mean and
    # M2 (sum of squared deviations from that mean) over the chunk's positions -> part[b, chunk, 0 / 1, c] (fp32).
    pid = tl.program_id(0)
    b = pid // num_chunks
    chunk = pid - b * num_chunks
    p0 = chunk * BLOCK_P
    c0 = tl.program_id(1) * BLOCK_C
    if ALIGN > 1:
        # The host guarantees these are multiples of ALIGN (elements per 16 bytes); (v // A) * A is how Triton's
        # alignment analysis learns it (tl.multiple_of on an argument is dropped, and the JIT only hints integers
        # divisible by 16: a 40-channel pixel stride or a 4-channel latent gets no hint). The extent along the
        # unit-stride axis too, so the masks stay uniform over each 16-byte vector.
        stride_b = (stride_b // ALIGN) * ALIGN
        if LAYOUT == 1:
            stride_p = (stride_p // ALIGN) * ALIGN
            C = (C // ALIGN) * ALIGN
        else:
            stride_c = (stride_c // ALIGN) * ALIGN
            HW = (HW // ALIGN) * ALIGN
    p = tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mask = ((p0 + p) < HW)[:, None] & ((c0 + c) < C)[None, :]
    # int64 tile base (tensors over 2^31 elements), int32 offsets inside the tile; on the unit-stride axis the
    # literal arange is what makes the elements contiguous to the compiler.
    if LAYOUT == 1:
        ptrs = x_ptr + (b.to(tl.int64) * stride_b + p0.to(tl.int64) * stride_p + c0) + (p[:, None] * stride_p
                                                                                         + c[None, :])
    elif LAYOUT == 2:
        ptrs = x_ptr + (b.to(tl.int64) * stride_b + p0 + c0.to(tl.int64) * stride_c) + (p[:, None]
                                                                                        + c[None, :] * stride_c)
    else:
        ptrs = x_ptr + (b.to(tl.int64) * stride_b + p0.to(tl.int64) * stride_p + c0.to(tl.int64) * stride_c) + (
            p[:, None] * stride_p + c[None, :] * stride_c)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    count = tl.minimum(HW - p0, BLOCK_P).to(tl.float32)
    if IEEE_MATH:  # Triton's `/` is div.full.f32 (2 ulp) on the GPU
        mean = tl.div_rn(tl.sum(x, axis=0), count)
    else:
        mean = tl.sum(x, axis=0) / count
    dev = tl.where(mask, x - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    out = part_ptr + pid.to(tl.int64) * (2 * C) + c0 + c
    cmask = (c0 + c) < C
    tl.store(out, mean, mask=cmask)
    tl.store(out + C, m2, mask=cmask)


@triton.jit
def _sweep_tile(total, rows, add_row, stride_add_c, C, HW, chunk_size, num_chunks, num_groups, group_size, g0, j0,
                k0, mean, WITH_M2: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """total + the [BLOCK_K chunks, BLOCK_GROUPS groups, BLOCK_G channels] tile of partials at (k0, g0, j0):
    n_k * mean_kc (the mean sweep) or M2_kc + n_k * (mean_kc - mean_g)^2 (the M2 sweep; mean [BLOCK_GROUPS]), with
    mean_kc including channel_add."""
    kk = k0 + tl.arange(0, BLOCK_K)
    gi = g0 + tl.arange(0, BLOCK_GROUPS)
    j = j0 + tl.arange(0, BLOCK_G)
    ch = gi[:, None] * group_size + j[None, :]
    cmask = (gi < num_groups)[:, None] & (j < group_size)[None, :]
    m = (kk < num_chunks)[:, None, None] & cmask[None, :, :]
    n_k = tl.minimum(HW - kk * chunk_size, chunk_size).to(tl.float32)[:, None, None]
    at = rows + kk[:, None, None] * (2 * C) + ch[None, :, :]
    means = tl.load(at, mask=m, other=0.0)
    if HAS_ADD:
        means += tl.load(add_row + ch * stride_add_c, mask=cmask, other=0.0).to(tl.float32)[None, :, :]
    if WITH_M2:
        dev = means - mean[None, :, None]
        return total + tl.where(m, tl.load(at + C, mask=m, other=0.0) + n_k * dev * dev, 0.0)
    else:
        return total + tl.where(m, n_k * means, 0.0)


@triton.jit
def _sweep_groups(rows, add_row, stride_add_c, C, HW, chunk_size, num_chunks, num_groups, group_size, g0, mean,
                  WITH_M2: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
                  BLOCK_G: tl.constexpr, ITERS_K: tl.constexpr, ITERS_G: tl.constexpr):
    """One sweep of _sweep_tile over every chunk and channel block of groups g0 ...: [BLOCK_GROUPS] sums per group
    (WITH_M2 False: n_k * mean_kc; True: M2_kc + n_k * (mean_kc - mean)^2)."""
    total = tl.zeros([BLOCK_K, BLOCK_GROUPS, BLOCK_G], dtype=tl.float32)
    for ji in range(0, ITERS_G):
        if ITERS_K > 0:  # the interpreter's trip count (see the finalize kernel)
            for ki in range(0, ITERS_K):
                total = _sweep_tile(total, rows, add_row, stride_add_c, C, HW, chunk_size, num_chunks, num_groups,
                                    group_size, g0, ji * BLOCK_G, ki * BLOCK_K, mean, WITH_M2, HAS_ADD, BLOCK_K,
                                    BLOCK_GROUPS, BLOCK_G)
        else:
            for k0 in range(0, num_chunks, BLOCK_K):
                total = _sweep_tile(total, rows, add_row, stride_add_c, C, HW, chunk_size, num_chunks, num_groups,
                                    group_size, g0, ji * BLOCK_G, k0, mean, WITH_M2, HAS_ADD, BLOCK_K, BLOCK_GROUPS,
                                    BLOCK_G)
    return tl.sum(tl.sum(total, axis=2), axis=0)


@triton.jit
def _store_coefficients(coef, weight_ptr, bias_ptr, add_row, stride_w, stride_bias, stride_add_c, num_groups,
                        group_size, C, g0, j0, mean, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_ADD: tl.constexpr, BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """coef[0 / 1 / 2, c] = center, scale, shift for channels j0 .. j0 + BLOCK_G - 1 of groups g0 ...:
    y = (x + add - mean) * rstd * w + b = (x - center) * scale + shift."""
    gi = g0 + tl.arange(0, BLOCK_GROUPS)
    j = j0 + tl.arange(0, BLOCK_G)
    ch = gi[:, None] * group_size + j[None, :]
    cmask = (gi < num_groups)[:, None] & (j < group_size)[None, :]
    center = tl.zeros([BLOCK_GROUPS, BLOCK_G], dtype=tl.float32) + mean[:, None]
    if HAS_ADD:
        center -= tl.load(add_row + ch * stride_add_c, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.zeros([BLOCK_GROUPS, BLOCK_G], dtype=tl.float32) + rstd[:, None]
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + ch * stride_w, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_GROUPS, BLOCK_G], dtype=tl.float32)
    if HAS_BIAS:
        shift += tl.load(bias_ptr + ch * stride_bias, mask=cmask, other=0.0).to(tl.float32)
    tl.store(coef + ch, center, mask=cmask)
    tl.store(coef + C + ch, scale, mask=cmask)
    tl.store(coef + 2 * C + ch, shift, mask=cmask)


@triton.jit(do_not_specialize=_FINALIZE_INTS)
def _group_norm_finalize_kernel(
    part_ptr, weight_ptr, bias_ptr, add_ptr, coef_ptr,
    C, HW, chunk_size, num_chunks, num_groups, group_size, group_blocks,
    stride_w, stride_bias, stride_add_b, stride_add_c,
    inv_count, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    ITERS_K: tl.constexpr, ITERS_G: tl.constexpr,
):
    # Program b * group_blocks + block: for BLOCK_GROUPS groups of sample b, merges the (count, mean, M2) of every
    # chunk and channel (Chan et al.'s pairwise update in two sweeps: the mean, then
    # M2 = sum M2_kc + sum n_k (mean_kc - mean)^2), then writes coef[b, 0 / 1 / 2, c] = center, scale, shift.
    #
    # Loops: ITERS_G channel blocks per group (a constexpr: 1 for every group of up to 128 channels), and the chunks
    # up to the runtime num_chunks (no re-specialization per shape). Under the interpreter a runtime scalar is a
    # 1-element array that NumPy 2 refuses as a range bound, so there the host passes the chunk trip count as the
    # constexpr ITERS_K (0 when compiled).
    #
    # No IEEE division or square root here: their slow paths are subroutine calls, around which ptxas saved live
    # registers to the stack (4-40 B "spills" per program). The mean and variance multiply by the host's fp32
    # 1 / (HW * group_size), and rsqrt is the hardware's (2^-22.9 relative error): both far inside the fp32 contract.
    pid = tl.program_id(0)
    b = pid // group_blocks
    g0 = (pid - b * group_blocks) * BLOCK_GROUPS
    rows = part_ptr + b.to(tl.int64) * num_chunks * (2 * C)
    add_row = add_ptr + b.to(tl.int64) * stride_add_b

    # Sweep 1 sums n_k * mean_kc (the mean; `mean` is unused then), sweep 2 the M2 terms around that mean.
    mean = tl.zeros([BLOCK_GROUPS], dtype=tl.float32)
    mean = _sweep_groups(rows, add_row, stride_add_c, C, HW, chunk_size, num_chunks, num_groups, group_size, g0, mean,
                         False, HAS_ADD, BLOCK_K, BLOCK_GROUPS, BLOCK_G, ITERS_K, ITERS_G) * inv_count
    m2 = _sweep_groups(rows, add_row, stride_add_c, C, HW, chunk_size, num_chunks, num_groups, group_size, g0, mean,
                       True, HAS_ADD, BLOCK_K, BLOCK_GROUPS, BLOCK_G, ITERS_K, ITERS_G)
    rstd = tl.math.rsqrt(m2 * inv_count + eps)

    coef = coef_ptr + b.to(tl.int64) * (3 * C)
    for ji in range(0, ITERS_G):
        _store_coefficients(coef, weight_ptr, bias_ptr, add_row, stride_w, stride_bias, stride_add_c, num_groups,
                            group_size, C, g0, ji * BLOCK_G, mean, rstd, HAS_WEIGHT, HAS_BIAS, HAS_ADD,
                            BLOCK_GROUPS, BLOCK_G)


@triton.jit(do_not_specialize=_APPLY_INTS)
def _group_norm_apply_kernel(
    x_ptr, y_ptr, coef_ptr,
    C, HW, num_chunks,
    stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, APPLY_SILU: tl.constexpr, IEEE_MATH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # The statistics kernel's tiling: y = (x - center[b, c]) * scale[b, c] + shift[b, c] (+ SiLU), x and y in
    # their own strides (the same LAYOUT: the host picks LAYOUT 0 when their unit-stride axes differ).
    pid = tl.program_id(0)
    b = pid // num_chunks
    chunk = pid - b * num_chunks
    p0 = chunk * BLOCK_P
    c0 = tl.program_id(1) * BLOCK_C
    coef = coef_ptr + b.to(tl.int64) * (3 * C) + c0  # before the hint: C is the coefficients' row length
    if ALIGN > 1:  # host-guaranteed multiples of ALIGN (see the statistics kernel)
        stride_xb = (stride_xb // ALIGN) * ALIGN
        stride_yb = (stride_yb // ALIGN) * ALIGN
        if LAYOUT == 1:
            stride_xp = (stride_xp // ALIGN) * ALIGN
            stride_yp = (stride_yp // ALIGN) * ALIGN
            C = (C // ALIGN) * ALIGN
        else:
            stride_xc = (stride_xc // ALIGN) * ALIGN
            stride_yc = (stride_yc // ALIGN) * ALIGN
            HW = (HW // ALIGN) * ALIGN
    p = tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cmask = (c0 + c) < C
    mask = ((p0 + p) < HW)[:, None] & cmask[None, :]
    bl = b.to(tl.int64)
    if LAYOUT == 1:
        x_ptrs = x_ptr + (bl * stride_xb + p0.to(tl.int64) * stride_xp + c0) + (p[:, None] * stride_xp + c[None, :])
        y_ptrs = y_ptr + (bl * stride_yb + p0.to(tl.int64) * stride_yp + c0) + (p[:, None] * stride_yp + c[None, :])
    elif LAYOUT == 2:
        x_ptrs = x_ptr + (bl * stride_xb + p0 + c0.to(tl.int64) * stride_xc) + (p[:, None] + c[None, :] * stride_xc)
        y_ptrs = y_ptr + (bl * stride_yb + p0 + c0.to(tl.int64) * stride_yc) + (p[:, None] + c[None, :] * stride_yc)
    else:
        x_ptrs = x_ptr + (bl * stride_xb + p0.to(tl.int64) * stride_xp + c0.to(tl.int64) * stride_xc) + (
            p[:, None] * stride_xp + c[None, :] * stride_xc)
        y_ptrs = y_ptr + (bl * stride_yb + p0.to(tl.int64) * stride_yp + c0.to(tl.int64) * stride_yc) + (
            p[:, None] * stride_yp + c[None, :] * stride_yc)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    center = tl.load(coef + c, mask=cmask, other=0.0)
    scale = tl.load(coef + C + c, mask=cmask, other=0.0)
    shift = tl.load(coef + 2 * C + c, mask=cmask, other=0.0)
    y = (x - center[None, :]) * scale[None, :] + shift[None, :]
    if APPLY_SILU:
        # y * sigmoid(y); exp(-y) overflows to inf for y < -88 and y / inf = -0, SiLU's limit.
        if IEEE_MATH:
            y = tl.div_rn(y, 1.0 + libdevice.exp(-y))
        else:
            y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Host side: layout, launch configuration, the op
# ----------------------------------------------------------------------------------------------------

# Whether @triton.jit built interpreter functions (TRITON_INTERPRET=1 when triton was imported): CPU tensors.
_INTERPRETED = isinstance(_group_norm_apply_kernel, InterpretedFunction)


def _collapse_spatial(shape, strides):
    """(HW, stride) of the spatial dims (2:) when they walk memory with one stride (size-1 dims dropped; HW = 1
    gives stride 0), else None."""
    dims = [(int(n), int(s)) for n, s in zip(shape[2:], strides[2:]) if n != 1]
    if not dims:
        return 1, 0
    size, stride = dims[-1]
    for n, s in reversed(dims[:-1]):
        if s != stride * size:
            return None
        size *= n
    return size, stride


def _channel_block(channels: int) -> int:
    """The largest power of two <= 128 that divides C, when one >= 16 does (SD: 320, 960 -> 64; 640, 1280, 1920,
    2560 -> 128): no idle lanes. Else the next power of two of C, at most 128."""
    for block in (128, 64, 32, 16):
        if channels % block == 0:
            return block
    return min(128, triton.next_power_of_2(max(channels, 1)))


def launch_config(batch: int, channels: int, hw: int, layout: int, element_size: int = 2) -> dict:
    """Tiles of the statistics and apply kernels (BLOCK_P positions x BLOCK_C channels, num_warps) from the shape and
    the layout alone (scripts/triton_aot_check.py compiles exactly what a launch gets).

    channels_last / strided: channel blocks of _channel_block(C) (64 or 128 at SD's channel counts), positions filling
    a _TILE-element tile; NCHW: up to 1024 positions per row, channels filling the tile. Every SD shape therefore
    takes one of two channels_last tiles (three NCHW ones) per dtype: one JIT compile each, which a fresh process
    pays on its first UNet call. Small levels are not split further to fill the SMs (SD's smallest, 2 x 1280 x 8 x 8,
    is 40 programs of 4096 elements: its time is launch latency either way)."""
    hw_pow2 = triton.next_power_of_2(max(hw, 1))
    if layout == LAYOUT_PIXELS:
        block_p = min(hw_pow2, 1024)
        block_c = min(triton.next_power_of_2(max(channels, 1)), max(1, _TILE // block_p))
    else:
        block_c = _channel_block(channels)
        block_p = min(hw_pow2, max(1, _TILE // block_c))
    tile = block_p * block_c
    num_warps = 4 if tile >= 2048 else (2 if tile >= 1024 else 1)
    if element_size >= 4 and tile >= 4096:
        # fp32: 16 elements per thread. At 32 (4 warps) the IEEE SiLU's registers made ptxas spill 16 B on sm_80
        # (offline ptxas -v, scripts/triton_aot_check.py).
        num_warps = 8
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps, num_chunks=triton.cdiv(hw, block_p))


def finalize_config(num_chunks: int, num_groups: int, group_size: int, interpreted: bool = False) -> dict:
    """The finalize kernel's [BLOCK_K chunks, BLOCK_GROUPS groups, BLOCK_G channels] tile and warps. GPU: 128 (group,
    channel) columns (BLOCK_G = the group size's power of two, at most 128, times as many groups as fit: SD's 32
    groups of 10 ... 80 channels make 4 ... 32 programs per sample) by _FINALIZE_TILE / 128 chunks, whatever the
    chunk count (the program loops over more; fewer are masked), so SD's six group sizes take four compiles. The
    interpreter pays per program and per operation, not per element: one program per sample, one tile over every
    group, channel and chunk (capped at 2^16 values)."""
    block_g = min(128, triton.next_power_of_2(max(group_size, 1)))
    groups_pow2 = triton.next_power_of_2(max(num_groups, 1))
    if interpreted:
        chunks_pow2 = triton.next_power_of_2(max(num_chunks, 1))
        block_groups = groups_pow2
        block_k = max(1, min(chunks_pow2, (1 << 16) // (block_groups * block_g)))
        return dict(BLOCK_K=block_k, BLOCK_GROUPS=block_groups, BLOCK_G=block_g, num_warps=4)
    block_g = min(block_g, _FINALIZE_TILE)
    block_groups = max(1, min(groups_pow2, 128 // block_g))
    block_k = max(1, _FINALIZE_TILE // (block_groups * block_g))
    tile = block_k * block_groups * block_g
    return dict(BLOCK_K=block_k, BLOCK_GROUPS=block_groups, BLOCK_G=block_g,
                num_warps=4 if tile >= 1024 else (2 if tile >= 256 else 1))


def _layout_of(stride_c: int, stride_p: int, channels: int, hw: int) -> int:
    if channels > 1 and stride_c == 1:
        return LAYOUT_CHANNELS
    if hw > 1 and stride_p == 1:
        return LAYOUT_PIXELS
    return LAYOUT_STRIDED


def _align(layout: int, element_size: int, channels: int, hw: int, pointers, strides) -> int:
    """ALIGN: elements per 16 bytes when every pointer is 16-byte aligned and every stride but the unit one, and
    the extent along the unit-stride axis, are multiples of it; else 1 (element-wise accesses)."""
    vec = 16 // element_size
    if layout == LAYOUT_STRIDED:
        return 1
    extent = channels if layout == LAYOUT_CHANNELS else hw
    if extent % vec or any(ptr % 16 for ptr in pointers) or any(s % vec for s in strides):
        return 1
    return vec


class Plan:
    """Everything about a launch that follows from shape, strides and dtype (cached): the collapsed strides, the
    layouts, the tiles, the grids and the workspace size. ``copy_in`` / ``copy_out``: x's or y's spatial dims
    do not collapse to one stride, so the kernels run on a contiguous copy (one extra pass, correct)."""

    __slots__ = ("batch", "channels", "hw", "x_strides", "y_strides", "copy_in", "copy_out", "stats_layout",
                 "apply_layout", "cfg", "fin", "num_chunks", "group_blocks", "stats_grid", "finalize_grid", "workspace",
                 "coef_offset")

    def __init__(self, shape, x_strides, y_strides, num_groups: int, element_size: int):
        self.batch, self.channels = int(shape[0]), int(shape[1])
        self.copy_in = self.copy_out = False
        xs = _collapse_spatial(shape, x_strides)
        if xs is None:
            self.copy_in = True
            xs = _collapse_spatial(shape, _contiguous_strides(shape))
            x_strides = _contiguous_strides(shape)
        ys = _collapse_spatial(shape, y_strides)
        if ys is None:
            self.copy_out = True
            ys = _collapse_spatial(shape, _contiguous_strides(shape))
            y_strides = _contiguous_strides(shape)
        self.hw = xs[0]
        # Size-1 dims are only ever indexed at 0: stride 0, so whatever torch left there costs no alignment.
        self.x_strides = (0 if self.batch == 1 else int(x_strides[0]), 0 if self.channels == 1 else int(x_strides[1]),
                          xs[1])
        self.y_strides = (0 if self.batch == 1 else int(y_strides[0]), 0 if self.channels == 1 else int(y_strides[1]),
                          ys[1])
        self.stats_layout = _layout_of(self.x_strides[1], self.x_strides[2], self.channels, self.hw)
        y_layout = _layout_of(self.y_strides[1], self.y_strides[2], self.channels, self.hw)
        self.apply_layout = self.stats_layout if y_layout == self.stats_layout else LAYOUT_STRIDED
        self.cfg = launch_config(self.batch, self.channels, self.hw, self.stats_layout, element_size)
        self.num_chunks = self.cfg["num_chunks"]
        self.fin = finalize_config(self.num_chunks, num_groups, self.channels // num_groups, _INTERPRETED)
        self.stats_grid = (self.batch * self.num_chunks, triton.cdiv(self.channels, self.cfg["BLOCK_C"]))
        self.group_blocks = triton.cdiv(num_groups, self.fin["BLOCK_GROUPS"])
        self.finalize_grid = (self.batch * self.group_blocks,)
        self.coef_offset = self.batch * self.num_chunks * 2 * self.channels
        self.workspace = self.coef_offset + self.batch * 3 * self.channels


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


_PLANS = PlanCache(512)


def plan_launch(shape, x_strides, y_strides, num_groups: int, element_size: int) -> Plan:
    key = (tuple(shape), tuple(x_strides), tuple(y_strides), num_groups, element_size)
    return _PLANS.get_or_make(key, lambda: Plan(tuple(int(n) for n in shape), x_strides, y_strides, num_groups,
                                                element_size))


def kernel_arguments(x, y, workspace, weight, bias, channel_add, num_groups: int, eps: float, apply_silu: bool,
                     plan: Plan) -> list:
    """[(kernel, grid, args, kwargs)] of the three launches for checked inputs (x and y already the tensors the
    kernels read and write: contiguous copies where the plan says so). The one packing of the launches:
    scripts/triton_aot_check.py compiles exactly what this returns (with meta tensors)."""
    compiled = x.device.type != "cpu"
    ieee = compiled and x.dtype == torch.float32
    element_size = x.element_size()
    xb, xc, xp = plan.x_strides
    yb, yc, yp = plan.y_strides
    stats_align = _align(plan.stats_layout, element_size, plan.channels, plan.hw, [x.data_ptr()],
                         [xb, xp if plan.stats_layout == LAYOUT_CHANNELS else xc])
    apply_align = _align(plan.apply_layout, element_size, plan.channels, plan.hw, [x.data_ptr(), y.data_ptr()],
                         [xb, yb] + ([xp, yp] if plan.apply_layout == LAYOUT_CHANNELS else [xc, yc]))
    coef = workspace[plan.coef_offset:]
    cfg, fin = plan.cfg, plan.fin
    # Element-wise accesses (ALIGN 1: misaligned views, odd strides) keep one 64-bit address per element in
    # registers: twice the warps for the same tile (168-185 registers at 4 warps left 8-12 warps per SM).
    stats_warps = cfg["num_warps"] * (2 if stats_align == 1 and cfg["num_warps"] == 4 else 1)
    apply_warps = cfg["num_warps"] * (2 if apply_align == 1 and cfg["num_warps"] == 4 else 1)
    group_size = plan.channels // num_groups
    stats = (_group_norm_stats_kernel, plan.stats_grid,
             [x, workspace, plan.channels, plan.hw, plan.num_chunks, xb, xc, xp],
             dict(LAYOUT=plan.stats_layout, ALIGN=stats_align, IEEE_MATH=ieee, BLOCK_P=cfg["BLOCK_P"],
                  BLOCK_C=cfg["BLOCK_C"], num_warps=stats_warps))
    finalize = (_group_norm_finalize_kernel, plan.finalize_grid,
                [workspace, workspace if weight is None else weight, workspace if bias is None else bias,
                 workspace if channel_add is None else channel_add, coef,
                 plan.channels, plan.hw, cfg["BLOCK_P"], plan.num_chunks, num_groups, group_size, plan.group_blocks,
                 0 if weight is None else weight.stride(0), 0 if bias is None else bias.stride(0),
                 0 if channel_add is None or plan.batch == 1 else channel_add.stride(0),
                 0 if channel_add is None else channel_add.stride(1),
                 1.0 / (plan.hw * group_size), float(eps)],
                dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_ADD=channel_add is not None,
                     BLOCK_K=fin["BLOCK_K"], BLOCK_GROUPS=fin["BLOCK_GROUPS"], BLOCK_G=fin["BLOCK_G"],
                     ITERS_G=triton.cdiv(group_size, fin["BLOCK_G"]),
                     # The interpreter needs a constexpr chunk trip count (see the kernel); compiled kernels 0.
                     ITERS_K=0 if compiled else triton.cdiv(plan.num_chunks, fin["BLOCK_K"]),
                     num_warps=fin["num_warps"]))
    apply = (_group_norm_apply_kernel, plan.stats_grid,
             [x, y, coef, plan.channels, plan.hw, plan.num_chunks, xb, xc, xp, yb, yc, yp],
             dict(LAYOUT=plan.apply_layout, ALIGN=apply_align, APPLY_SILU=bool(apply_silu), IEEE_MATH=ieee,
                  BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=apply_warps))
    return [stats, finalize, apply]


def group_norm_silu_triton_impl(x: torch.Tensor, weight, bias, num_groups: int, eps: float, apply_silu: bool,
                                channel_add=None) -> torch.Tensor:
    """Launches the three kernels (no custom-op wrapper: the op and the CUDA kernel of ddim_fast::group_norm_silu
    call this). x [B, C, *spatial]; weight, bias [C] or None; channel_add [B, C] or None. Returns y laid out like
    ``torch.empty_like(x)``."""
    op = "group_norm_silu_triton"
    check_group_norm_args(op, x, weight, bias, num_groups, eps, channel_add)
    check_triton_device(op, "x", x)
    out = allocate_group_norm_output(x)
    if x.numel() == 0:
        return out
    plan = plan_launch(x.shape, x.stride(), out.stride(), num_groups, x.element_size())
    x_in = x.contiguous() if plan.copy_in else x
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if plan.copy_out else out
    workspace = _workspace(plan.workspace, x.device)
    device = x.device
    switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        for kernel, grid, args, kwargs in kernel_arguments(x_in, y, workspace, weight, bias, channel_add,
                                                           num_groups, eps, apply_silu, plan):
            kernel[grid](*args, **kwargs)
    if plan.copy_out:
        out.copy_(y)
    return out


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """The fp32 partials and coefficients, from the caching allocator (tests poison it)."""
    return torch.empty(numel, dtype=torch.float32, device=device)


# The op (schema in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls group_norm_silu_triton_impl).
group_norm_silu_triton = torch.ops.ddim_fast.group_norm_silu_triton
