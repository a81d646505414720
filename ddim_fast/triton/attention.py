"""Fully fused Triton attention: softmax(q k^T * scale (+ mask)) v in one launch, fp32 math.

The op ``ddim_fast::attention_triton(q, k, v, scale, mask) -> out`` (schema in csrc/ops.cpp; kernel and
fake kernel registered by ddim_fast/_library.py, which imports this module on the first call). It is also
the CUDA kernel of ``ddim_fast::attention``.

Layouts: q [B, H, Lq, D] / k, v [B, H, Lk, D] with any strides (diffusers' ``view(...).transpose(1, 2)``
needs no copy), or ldm's 3-D [B*H, L, D]. Head dims up to 256 (SD: 40, 64, 80, 160). The head dim is a
constexpr (one compile per head dim), padded to a power of two inside the kernel (tl.arange needs one)
with the padded columns masked; the host checks whether q, k, v and out allow 16-byte vectors (aligned
bases, unit head-dim stride, other strides multiples of 16 bytes: every SD layout) and says so in the
constexpr ALIGN, which turns into divisibility hints. Any other layout runs element-wise, correctly.

Two kernel shapes (chosen by a constexpr):
* Lk <= 128 (cross-attention: 77 text tokens): every key in one tile, so the softmax is exact in
  registers: one q k^T, one max, one sum, one p v; no rescaling loop;
* longer Lk (self-attention): flash-attention's online softmax over key tiles (launch_config's
  tables), the running max and sum kept per query row and the accumulator rescaled when the max grows;
  with 16-byte K/V loads Triton's pipeliner streams the tiles with cp.async.

Masks (documented in ddim_fast/attention.py): same number of dims as q, last dim Lk, the query dim Lq or
1, leading dims equal or 1 (size-1 dims broadcast with stride 0). Boolean (True = keep; masked logits
become -FLT_MAX like ldm's masked_fill, so a fully masked row is uniform) or additive in q's dtype. A
mask with one row for every query (key padding) is loaded as that one row.

fp32 inputs use IEEE fp32 dots (not TF32), libdevice's expf and IEEE division on the GPU, so fp32 storage
meets the 1e-6 contract; fp16/bf16 inputs use tensor-core dots (mma.sync on sm_80, wgmma on sm_90) with
fp32 accumulation and the fast ex2-based exp, and the probabilities are rounded to the input dtype before
the p v product (what every flash-attention kernel does). Under ``TRITON_INTERPRET=1`` (CPU tensors)
tiles are widened to fp32 first: the interpreter's bf16 arithmetic is not IEEE-correct.

scripts/triton_aot_check.py compiles every SD launch offline for sm_90 and sm_80 and fails when one loses
its 16-byte accesses, its cp.async key loop, its MMA instructions, its register budget, or when warps
duplicate each other's work (ex2 count per thread above the tile's share).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

import ddim_fast  # noqa: F401  (registers torch.ops.ddim_fast.*)
from ddim_fast._checks import check_mask, check_qkv, check_softmax_scale
from ddim_fast._library import check_triton_device

__all__ = ["attention_triton", "attention_triton_impl", "kernel_arguments", "launch_config"]

_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = 0, 1, 2  # csrc/include/ddim_fast/softmax_math.h MaskKind
_SINGLE_TILE_MAX_KEYS = 128
_MAX_HEAD_DIM = 256
# ldm's masked_fill value (-finfo(float32).max) as a module-level constexpr for jit code.
_MASKED_LOGIT = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _hinted(stride, ALIGN: tl.constexpr):
    """`stride` with its divisibility by ALIGN made visible to the compiler. The host guarantees the
    divisibility (``_vector_align``), so the value is unchanged; ``(s // A) * A`` is how Triton's alignment
    analysis learns it (``tl.multiple_of`` on a kernel argument is dropped, and the JIT only hints integers
    divisible by 16: a d40 row stride of 40 elements gets no hint at all, so every access was 2 bytes)."""
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def _head_offsets(offs_d, stride_d, ALIGN: tl.constexpr):
    # Aligned launches have a unit head-dim stride (host-checked): the literal arange is what makes the
    # columns contiguous to the compiler, so 16-byte vectors (8 fp16/bf16 or 4 fp32 columns) are legal.
    if ALIGN > 1:
        return offs_d[None, :]
    else:
        return offs_d[None, :] * stride_d


@triton.jit
def _exp(x, IEEE_MATH: tl.constexpr):
    # tl.exp is ex2.approx.f32(x * log2(e)): the product's rounding makes the error grow with |x| (about 1e-6
    # relative at x = -20), and with div.full's 2 ulp it took the fp32 GPU path past its 1e-6 contract at
    # 4096 keys (1.3e-6 in a numpy emulation of the kernel's arithmetic; 4.9e-7 with exact exp and
    # division). libdevice's expf reduces the argument exactly first (2 ulp). fp16/bf16 keep the fast one.
    if IEEE_MATH:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _normalize(acc, row_sum, IEEE_MATH: tl.constexpr):
    """acc / row_sum per row: IEEE-rounded on the fp32 GPU path (`/` is the 2-ulp div.full.f32 there)."""
    if IEEE_MATH:
        num, den = tl.broadcast(acc, row_sum[:, None])
        return tl.div_rn(num, den)
    else:
        return acc / row_sum[:, None]


@triton.jit
def _scores_tile(q, k_ptrs, mask_ptrs, offs_m, offs_n, LQ, LK, scale, offs_d, stride_kn, stride_kd,
                 stride_mm, stride_mn, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, MASK_KIND: tl.constexpr,
                 MASK_ROW_BCAST: tl.constexpr, DOT_FP32: tl.constexpr):
    """Scaled, masked logits [BLOCK_M, BLOCK_N] of one key tile; keys past LK get -inf."""
    key_ok = offs_n < LK
    # HEAD_DIM is a constexpr: `offs_d < HEAD_DIM` is constant over runs of gcd(HEAD_DIM, BLOCK_D) columns
    # (8 at d40), so the padded-column mask does not split a 16-byte vector.
    k = tl.load(k_ptrs + offs_n[:, None].to(tl.int64) * stride_kn + _head_offsets(offs_d, stride_kd, ALIGN),
                mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # Same order as the reference: (q . k) * scale, then the mask.
    s = s * scale
    if MASK_KIND != 0:
        if MASK_ROW_BCAST:
            # One mask row for every query (key padding: ldm's [B*H, 1, Lk], diffusers' [B, H, 1, Lk]; the
            # host passes the query stride as 0): load the BLOCK_N values once per thread's columns and
            # broadcast, instead of a [BLOCK_M, BLOCK_N] tile of repeated reads and the registers they hold.
            m_offs = offs_n.to(tl.int64) * stride_mn
            if MASK_KIND == 1:
                keep = tl.load(mask_ptrs + m_offs, mask=key_ok, other=1) != 0
                s = tl.where(keep[None, :], s, _MASKED_LOGIT)
            else:
                s = s + tl.load(mask_ptrs + m_offs, mask=key_ok, other=0.0).to(tl.float32)[None, :]
        else:
            m_ok = (offs_m < LQ)[:, None] & key_ok[None, :]
            m_offs = offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
            if MASK_KIND == 1:
                keep = tl.load(mask_ptrs + m_offs, mask=m_ok, other=1) != 0
                s = tl.where(keep, s, _MASKED_LOGIT)
            else:
                s = s + tl.load(mask_ptrs + m_offs, mask=m_ok, other=0.0).to(tl.float32)
    # Padded keys: -inf (not -FLT_MAX) so they add exactly 0 even to a fully masked row.
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _online_softmax_tile(q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, offs_d, row_max, row_sum, acc,
                         LQ, LK, scale, sk2, sk3, sv2, sv3, sm2, sm3, HEAD_DIM: tl.constexpr,
                         ALIGN: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
                         DOT_FP32: tl.constexpr, IEEE_MATH: tl.constexpr):
    """One key tile of the online softmax: updates (running max, running sum, unnormalized p v)."""
    s = _scores_tile(q, k_ptrs, mask_ptrs, offs_m, offs_n, LQ, LK, scale, offs_d, sk2, sk3, sm2, sm3,
                     HEAD_DIM, ALIGN, MASK_KIND, MASK_ROW_BCAST, DOT_FP32)
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    # A row that holds only -inf so far (additive -inf masks) shifts by 0, not by -inf:
    # exp(-inf - -inf) would be NaN; exp(-inf - 0) = 0 is right.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = _exp(row_max - shift, IEEE_MATH)
    p = _exp(s - shift[:, None], IEEE_MATH)
    row_sum = row_sum * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * sv2 + _head_offsets(offs_d, sv3, ALIGN),
                mask=(offs_n < LK)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return new_max, row_sum, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr,
    sq0, sq1, sq2, sq3,
    sk0, sk1, sk2, sk3,
    sv0, sv1, sv2, sv3,
    so0, so1, so2, so3,
    sm0, sm1, sm2, sm3,
    H, LQ, LK, scale, num_m_blocks,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_TILE: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_MATH: tl.constexpr, INTERP_TILES: tl.constexpr,
):
    # HEAD_DIM is a constexpr (one specialization per head dim: SD has 40, 64, 80, 160) so the padded-column
    # mask is known at compile time; ALIGN (elements per 16 bytes, or 1) says the host checked that q, k, v
    # and out have 16-byte aligned bases, unit head-dim strides and every other stride a multiple of ALIGN.
    # Together they let every q/k/v/out access be a 16-byte vector and let the software pipeliner turn
    # the key loop's K/V loads into cp.async copies (it needs 4-byte or wider accesses).
    #
    # 1-D grid (axis 0 allows 2^31 - 1 programs): consecutive programs are query blocks of the same
    # (batch, head), so they share that head's K/V in L2.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b0 = (pid_bh // H).to(tl.int64)
    b1 = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < LQ
    col_ok = offs_d < HEAD_DIM

    q_ptrs = q_ptr + b0 * _hinted(sq0, ALIGN) + b1 * _hinted(sq1, ALIGN)
    k_ptrs = k_ptr + b0 * _hinted(sk0, ALIGN) + b1 * _hinted(sk1, ALIGN)
    v_ptrs = v_ptr + b0 * _hinted(sv0, ALIGN) + b1 * _hinted(sv1, ALIGN)
    mask_ptrs = mask_ptr + b0 * sm0 + b1 * sm1
    sk2 = _hinted(sk2, ALIGN)
    sv2 = _hinted(sv2, ALIGN)

    # Padded head-dim columns load as 0: they add nothing to q . k and produce 0 columns of p v
    # that are never stored.
    q = tl.load(q_ptrs + offs_m[:, None].to(tl.int64) * _hinted(sq2, ALIGN) + _head_offsets(offs_d, sq3, ALIGN),
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    if SINGLE_TILE:
        # Every key is in this one tile: exact softmax, no running max.
        s = _scores_tile(q, k_ptrs, mask_ptrs, offs_m, offs_n0, LQ, LK, scale, offs_d, sk2, sk3, sm2, sm3,
                         HEAD_DIM, ALIGN, MASK_KIND, MASK_ROW_BCAST, DOT_FP32)
        row_max = tl.max(s, axis=1)
        p = _exp(s - row_max[:, None], IEEE_MATH)
        row_sum = tl.sum(p, axis=1)
        v = tl.load(v_ptrs + offs_n0[:, None].to(tl.int64) * sv2 + _head_offsets(offs_d, sv3, ALIGN),
                    mask=(offs_n0 < LK)[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v)
        acc = _normalize(acc, row_sum, IEEE_MATH)
    else:
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # The interpreter cannot loop to a runtime scalar (it converts the bound with int() on a
        # 1-element array, an error under NumPy 2), so on CPU the host passes the tile count as a
        # constexpr; compiled kernels loop to the runtime LK and are not re-specialized per length.
        if INTERP_TILES > 0:
            for tile in range(0, INTERP_TILES):
                row_max, row_sum, acc = _online_softmax_tile(
                    q, k_ptrs, v_ptrs, mask_ptrs, offs_m, tile * BLOCK_N + offs_n0, offs_d, row_max, row_sum, acc,
                    LQ, LK, scale, sk2, sk3, sv2, sv3, sm2, sm3, HEAD_DIM, ALIGN, MASK_KIND, MASK_ROW_BCAST,
                    DOT_FP32, IEEE_MATH)
        else:
            for start_n in range(0, LK, BLOCK_N):
                row_max, row_sum, acc = _online_softmax_tile(
                    q, k_ptrs, v_ptrs, mask_ptrs, offs_m, start_n + offs_n0, offs_d, row_max, row_sum, acc,
                    LQ, LK, scale, sk2, sk3, sv2, sv3, sm2, sm3, HEAD_DIM, ALIGN, MASK_KIND, MASK_ROW_BCAST,
                    DOT_FP32, IEEE_MATH)
        acc = _normalize(acc, row_sum, IEEE_MATH)

    o_ptrs = (o_ptr + b0 * _hinted(so0, ALIGN) + b1 * _hinted(so1, ALIGN)
              + offs_m[:, None].to(tl.int64) * _hinted(so2, ALIGN) + _head_offsets(offs_d, so3, ALIGN))
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Host side: checks, launch configuration, the custom op
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _device_traits(device_index: int) -> tuple[int, int]:
    """(SM count, compute capability major) of a CUDA device: the tile tables and the grid rule use them."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, props.major


# CUDA tiles, per MMA generation, by (fp32?, BLOCK_D, single tile or key loop, BLOCK_N of the single tile).
# Checked by scripts/triton_aot_check.py (offline triton.compile for sm_90 and sm_80; PTX, TTGIR, ptxas -v)
# for every SD variant on both targets: no spills, 16-byte q/k/v/out accesses, cp.async in the key loop, MMA
# for fp16/bf16, and no warp computing another warp's scores (ex2 per thread = the thread's share).
#
# Where the warps go. For the chained q k^T -> p v dots Triton picks one warp layout for both:
# * sm_90 (wgmma, m64 per 4-warp group): warps on the query dim, 16 rows each. A 64-row tile on 8 warps
#   therefore has two warp groups compute the same 64 x BLOCK_N scores and softmax (warpsPerCTA [8, 1]:
#   64 ex2 per thread at Lk 77 where 32 are needed, also at BLOCK_D 128). Every sm_90 tile below with 64+
#   rows has BLOCK_M = 16 x num_warps; 32-row tiles fall back to mma.sync with the warps on the keys.
# * sm_80 (mma.sync m16n8k16): all warps on the query dim when BLOCK_M >= BLOCK_D, else all on the
#   key/head dims (warpsPerCTA [1, W]). On the queries BLOCK_M must be 16 x W; on the keys each warp needs
#   its own n8 columns, so BLOCK_N >= 8 x W (a 32-key tile on 8 warps computes everything twice).
# The shrink loop in launch_config halves warps with rows, which keeps both rules.
#
# Register budget: the [BLOCK_M, BLOCK_N] fp32 scores, the [BLOCK_M, BLOCK_D] fp32 accumulator and (mma.sync)
# the q operand live in registers. The 128-key single tile (SD cross-attention, 77 text tokens) at BLOCK_D 64
# is 64 score + 32 accumulator values per thread at 128 rows / 8 warps; with 16-byte accesses (HEAD_DIM
# constexpr + alignment hints) that is 123 registers on sm_90 and 168 on sm_80 (the 2-byte version of the old
# 64-row tile needed 194 / 228). ptxas also caps 8-warp tiles at 128 registers (two blocks per SM) and spills
# a few bytes rather than exceed it: sm_80's BLOCK_D 128 key loop spilled 20-68 B with the warps on the
# queries (64-128 rows) and 4 B at 64 rows / 8 warps (diffusers' strides), hence 32 rows on 4 warps there
# (128 registers, 12 warps per SM); masked BLOCK_D 256 loops spilled 12 B at 32 x 64 / 8 warps, hence 32 x 32 on
# 4 warps (168-178 registers); fp32's BLOCK_D 128 loop spilled 4 B at 32 keys with an additive mask. fp32 uses
# IEEE dots, which Triton lowers
# to unrolled FMA loops on whole register tiles: only 16-row tiles on 4 warps were spill-free on both targets
# with every mask kind, and never the 128-key single tile (tens of KiB of spills), so fp32 always takes the
# key loop. fp32 is the exact-reference path, not the fast one.
_TILES = {
    9: dict(  # sm_90 and newer (wgmma)
        single={64: {128: (128, 8), 64: (128, 8), 32: (128, 8), 16: (128, 8)},  # block_d -> {block_n: (m, warps)}
                128: {128: (32, 8), 64: (128, 8), 32: (128, 8), 16: (128, 8)},
                256: {128: (32, 8), 64: (32, 8)}},
        loop={64: (128, 64, 8), 128: (128, 64, 8), 256: (32, 64, 8)},  # block_d -> (block_m, block_n, warps)
        loop_masked={64: (128, 64, 8), 128: (128, 64, 8), 256: (32, 32, 4)}),
    8: dict(  # sm_80 / sm_86 / sm_89 (mma.sync)
        single={64: {128: (128, 8), 64: (128, 8), 32: (128, 8), 16: (128, 8)},
                128: {128: (32, 8), 64: (64, 8)},
                256: {128: (32, 8), 64: (32, 8)}},
        loop={64: (128, 64, 8), 128: (32, 64, 4), 256: (32, 64, 8)},
        loop_masked={64: (128, 64, 8), 128: (64, 64, 8), 256: (32, 32, 4)}),
}
_FP32_LOOP_TILES = {64: (16, 16, 4), 128: (16, 16, 4), 256: (16, 16, 4)}
# The shrink loop stops at one warp group (4 warps: what a wgmma needs on sm_90): below it each thread's
# share of the tile doubles again and the 2-warp BLOCK_D 128 key loop spilled 40-84 B with a mask.
_MIN_SHRUNK_WARPS = 4


def launch_config(batch_heads: int, lq: int, lk: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device, masked: bool = False) -> dict:
    """Tile sizes and warps for one call: {BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_TILE, num_warps, num_stages}."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    single = lk <= _SINGLE_TILE_MAX_KEYS
    if device.type != "cuda":
        # Interpreter: fewer, larger programs run faster; no warps to tune.
        block_n = max(16, triton.next_power_of_2(lk)) if single else 64
        return dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_TILE=single, num_warps=4, num_stages=1)
    sms, major = _device_traits(device.index if device.index is not None else torch.cuda.current_device())
    tiles = _TILES[9 if major >= 9 else 8]
    block_d = max(64, block_d)  # the tables start at 64: narrower heads pad to it (masked columns)
    if dtype == torch.float32:
        single = False
        block_m, block_n, num_warps = _FP32_LOOP_TILES[block_d]
        min_block_m = 16
    elif single:
        # The smallest key tile each table has: where the warps sit on the keys (8 warps at BLOCK_D 256, and
        # sm_80's BLOCK_D 128), 64 keys give each warp its own n8 columns; padded keys are masked to -inf.
        block_n = max(min(tiles["single"][block_d]), triton.next_power_of_2(lk))
        block_m, num_warps = tiles["single"][block_d][block_n]
        min_block_m = 32
    else:
        block_m, block_n, num_warps = tiles["loop_masked" if masked else "loop"][block_d]
        min_block_m = 32
    # Small grids (Lq 1024 / 256 / 64 at 512 px) would leave SMs idle: shrink the query tile until the
    # grid covers every SM about twice. Warps halve with the rows: each warp keeps its 16 query rows (a
    # 64-row tile on 8 warps would make two warp groups compute the same scores) or its key columns, and
    # its share of the tile, so the register need per thread stays what the full tile compiled to. That
    # balances the load across SMs. The shrunk tiles of the SD shapes are compiled by
    # scripts/triton_aot_check.py too.
    while (num_warps > _MIN_SHRUNK_WARPS and block_m > min_block_m
           and batch_heads * triton.cdiv(lq, block_m) < 2 * sms):
        block_m //= 2
        num_warps //= 2
    # Key-loop stages: 3 for the fp16/bf16 BLOCK_D 64 loop; 2 at BLOCK_D 128+ (shared memory) and for fp32 (its
    # BLOCK_D 64 loop spilled 4 B at 3 stages on sm_90 with a full mask, ptxas holding it to 72 registers).
    num_stages = 1 if single else (2 if block_d >= 128 or dtype == torch.float32 else 3)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_TILE=single, num_warps=num_warps,
                num_stages=num_stages)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale) -> None:
    op = "attention_triton"
    check_qkv(op, q, k, v)
    check_softmax_scale(op, scale)
    head_dim = q.shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D must be at most {_MAX_HEAD_DIM}, got {head_dim}")
    check_triton_device(op, "q", q)
    if mask is not None:
        check_mask(op, mask, tuple(q.shape[:-1]) + (k.shape[-2],), q.dtype, q.device)


def _strides4(t: torch.Tensor) -> list[int]:
    """Strides of [..., L, D] viewed as 4-D [b0, b1, L, D] (a 3-D tensor gets b1 of size 1, stride 0).
    A size-1 dim is only ever indexed at 0, so its stride is passed as 0: whatever torch left there
    (any value is legal) must not cost the launch its alignment."""
    strides = [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]
    return [strides[0], 0] + strides[1:] if t.dim() == 3 else strides


def _vector_align(tensors: list[torch.Tensor]) -> int:
    """The kernel's ALIGN: elements per 16 bytes (8 for fp16/bf16, 4 for fp32) when every tensor has a
    16-byte aligned base, a unit head-dim stride (or a head dim of 1... never in practice) and all other
    (non-broadcast) strides multiples of that, else 1 (element-wise accesses, any layout). SD's layouts
    (ldm's contiguous [B*H, L, D], diffusers' [B, L, H, D] viewed [B, H, L, D]) are aligned at every
    head dim; the kernel trusts this answer, so a wrong one would read wrong elements, not merely slowly."""
    elems = 16 // tensors[0].element_size()
    for t in tensors:
        strides = _strides4(t)
        if t.data_ptr() % 16 != 0 or (t.shape[-1] > 1 and strides[3] != 1):
            return 1
        if any(s % elems != 0 for s in strides[:3]):
            return 1
    return elems


def attention_triton_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launches the fused kernel (no custom-op wrapper: used by the op and by the CUDA kernel of
    ddim_fast::attention). q [B, H, Lq, D] or [B*H, Lq, D]; k, v [..., Lk, D]; mask per check_mask.
    Returns a new contiguous tensor shaped like q."""
    _check_inputs(q, k, v, mask, scale)
    lq, lk, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if lk == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # softmax over no keys, empty v
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    batch = q.shape[0]
    heads = q.shape[1] if q.dim() == 4 else 1
    batch_heads = batch * heads
    cfg = launch_config(batch_heads, lq, lk, head_dim, q.dtype, q.device, masked=mask is not None)

    grid, args, kwargs = kernel_arguments(q, k, v, out, mask, scale, cfg)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _attention_kernel[grid](*args, **kwargs)
    return out


def kernel_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     mask: Optional[torch.Tensor], scale: float, cfg: dict) -> tuple[tuple, list, dict]:
    """(grid, positional arguments, keywords) of the kernel launch for checked inputs and a launch_config.
    The one packing of the launch: scripts/triton_aot_check.py compiles exactly what this returns."""
    lq, lk, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    heads = q.shape[1] if q.dim() == 4 else 1
    batch_heads = q.shape[0] * heads
    if mask is None:
        mask_kind, mask_arg, mask_strides = _MASK_NONE, q, [0, 0, 0, 0]  # any pointer: never read
    else:
        mask_kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADDITIVE
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        # Broadcast (size-1) dims read one element for every index: stride 0 (_strides4 does that).
        mask_strides = _strides4(mask)
    num_m_blocks = triton.cdiv(lq, cfg["BLOCK_M"])
    compiled = q.device.type != "cpu"  # meta tensors: scripts/triton_aot_check.py's GPU launches
    args = [q, k, v, out, mask_arg,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out), *mask_strides,
            heads, lq, lk, float(scale), num_m_blocks]
    kwargs = dict(HEAD_DIM=head_dim, ALIGN=_vector_align([q, k, v, out]), MASK_KIND=mask_kind,
                  MASK_ROW_BCAST=mask is not None and mask_strides[2] == 0,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                  SINGLE_TILE=cfg["SINGLE_TILE"], DOT_FP32=q.dtype == torch.float32 or not compiled,
                  # The interpreter's exp and `/` are numpy's (exact); tl.div_rn does not run there.
                  IEEE_MATH=q.dtype == torch.float32 and compiled,
                  INTERP_TILES=0 if compiled else triton.cdiv(lk, cfg["BLOCK_N"]),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (num_m_blocks * batch_heads,), args, kwargs


# The op (schema in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls attention_triton_impl).
attention_triton = torch.ops.ddim_fast.attention_triton
