"""Fully fused Triton attention: softmax(q k^T * scale (+ mask)) v in one launch, fp32 math.

The op ``ddim_fast::attention_triton(q, k, v, scale, mask) -> out`` (schema in csrc/ops.cpp; kernel and
fake kernel registered by ddim_fast/_library.py, which imports this module on the first call). It is also
the CUDA kernel of ``ddim_fast::attention``.

Layouts: q [B, H, Lq, D] / k, v [B, H, Lk, D] with any strides (diffusers' ``view(...).transpose(1, 2)``
needs no copy), or ldm's 3-D [B*H, L, D]. Head dims up to 256 (SD: 40, 64, 80, 160); the head dim is
padded to a power of two inside the kernel (tl.arange needs one) and the padded columns are masked.

Two kernel shapes (chosen by a constexpr):
* Lk <= 128 (cross-attention: 77 text tokens): every key in one tile, so the softmax is exact in
  registers: one q k^T, one max, one sum, one p v; no rescaling loop;
* longer Lk (self-attention): flash-attention's online softmax over key tiles of 64, the running max
  and sum kept per query row and the accumulator rescaled when the max grows.

Masks (documented in ddim_fast/attention.py): same number of dims as q, last dim Lk, the query dim Lq or
1, leading dims equal or 1 (size-1 dims broadcast with stride 0). Boolean (True = keep; masked logits
become -FLT_MAX like ldm's masked_fill, so a fully masked row is uniform) or additive in q's dtype.

fp32 inputs use IEEE fp32 dots (not TF32) so fp32 storage meets the 1e-6 contract; fp16/bf16 inputs use
tensor-core dots with fp32 accumulation, and the probabilities are rounded to the input dtype before
the p v product (what every flash-attention kernel does). Under ``TRITON_INTERPRET=1`` (CPU tensors)
tiles are widened to fp32 first: the interpreter's bf16 arithmetic is not IEEE-correct.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

import ddim_fast  # noqa: F401  (registers torch.ops.ddim_fast.*)
from ddim_fast._checks import check_mask, check_qkv
from ddim_fast._library import interpreting as _interpreting

__all__ = ["attention_triton", "attention_triton_impl", "launch_config"]

_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = 0, 1, 2  # csrc/include/ddim_fast/softmax_math.h MaskKind
_SINGLE_TILE_MAX_KEYS = 128
_MAX_HEAD_DIM = 256
# ldm's masked_fill value (-finfo(float32).max) as a module-level constexpr for jit code.
_MASKED_LOGIT = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _scores_tile(q, k_ptrs, mask_ptrs, offs_m, offs_n, LQ, LK, D, scale, offs_d, stride_kn, stride_kd,
                 stride_mm, stride_mn, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr):
    """Scaled, masked logits [BLOCK_M, BLOCK_N] of one key tile; keys past LK get -inf."""
    key_ok = offs_n < LK
    k = tl.load(k_ptrs + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # Same order as the reference: (q . k) * scale, then the mask.
    s = s * scale
    if MASK_KIND != 0:
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
                         LQ, LK, D, scale, sk2, sk3, sv2, sv3, sm2, sm3,
                         MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr):
    """One key tile of the online softmax: updates (running max, running sum, unnormalized p v)."""
    s = _scores_tile(q, k_ptrs, mask_ptrs, offs_m, offs_n, LQ, LK, D, scale, offs_d, sk2, sk3, sm2, sm3,
                     MASK_KIND, DOT_FP32)
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    # A row that holds only -inf so far (additive -inf masks) shifts by 0, not by -inf:
    # exp(-inf - -inf) would be NaN; exp(-inf - 0) = 0 is right.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp(row_max - shift)
    p = tl.exp(s - shift[:, None])
    row_sum = row_sum * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * sv2 + offs_d[None, :] * sv3,
                mask=(offs_n < LK)[:, None] & (offs_d < D)[None, :], other=0.0)
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
    H, LQ, LK, D, scale, num_m_blocks,
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_TILE: tl.constexpr, DOT_FP32: tl.constexpr, INTERP_TILES: tl.constexpr,
):
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
    col_ok = offs_d < D

    q_ptrs = q_ptr + b0 * sq0 + b1 * sq1
    k_ptrs = k_ptr + b0 * sk0 + b1 * sk1
    v_ptrs = v_ptr + b0 * sv0 + b1 * sv1
    mask_ptrs = mask_ptr + b0 * sm0 + b1 * sm1

    # Padded head-dim columns load as 0: they add nothing to q . k and produce 0 columns of p v
    # that are never stored.
    q = tl.load(q_ptrs + offs_m[:, None].to(tl.int64) * sq2 + offs_d[None, :] * sq3,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    if SINGLE_TILE:
        # Every key is in this one tile: exact softmax, no running max.
        s = _scores_tile(q, k_ptrs, mask_ptrs, offs_m, offs_n0, LQ, LK, D, scale, offs_d, sk2, sk3, sm2, sm3,
                         MASK_KIND, DOT_FP32)
        row_max = tl.max(s, axis=1)
        p = tl.exp(s - row_max[:, None])
        row_sum = tl.sum(p, axis=1)
        v = tl.load(v_ptrs + offs_n0[:, None].to(tl.int64) * sv2 + offs_d[None, :] * sv3,
                    mask=(offs_n0 < LK)[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v)
        acc = acc / row_sum[:, None]
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
                    LQ, LK, D, scale, sk2, sk3, sv2, sv3, sm2, sm3, MASK_KIND, DOT_FP32)
        else:
            for start_n in range(0, LK, BLOCK_N):
                row_max, row_sum, acc = _online_softmax_tile(
                    q, k_ptrs, v_ptrs, mask_ptrs, offs_m, start_n + offs_n0, offs_d, row_max, row_sum, acc,
                    LQ, LK, D, scale, sk2, sk3, sv2, sv3, sm2, sm3, MASK_KIND, DOT_FP32)
        acc = acc / row_sum[:, None]

    o_ptrs = o_ptr + b0 * so0 + b1 * so1 + offs_m[:, None].to(tl.int64) * so2 + offs_d[None, :] * so3
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Host side: checks, launch configuration, the custom op
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# CUDA tiles (BLOCK_M, BLOCK_N or None = every key in one tile, num_warps) by (fp32?, BLOCK_D, single tile,
# BLOCK_N of the single tile). Chosen with scripts/triton_aot_check.py (offline triton.compile for sm_90 and
# sm_80, then ptxas -v) so that no SD variant spills registers on either target: the [BLOCK_M, BLOCK_N] fp32
# scores, the [BLOCK_M, BLOCK_D] fp32 accumulator and the dot operands all live in registers, so wide head
# dims and the 128-key single tile need 8 warps or fewer query rows. Two kinds of spill shaped these tables:
# * the 255-register ceiling: the 128-key single tile at BLOCK_D 64 (SD1.5 d40 and SD2 d64 cross-attention,
#   77 text tokens) with 128 query rows spilled 8 B on sm_90 and 40-168 B on sm_80; 64 rows fit (194-210
#   registers on sm_90, 231 on sm_80 and 255 there with a mask, no spill). It costs twice the programs, each
#   re-reading the head's 77-key K and V (about 12 KiB at d40 fp16, from L2) for half as many query rows;
# * ptxas trading a few spilled bytes for occupancy well below the ceiling (it capped 8-warp tiles at 64,
#   80 or 128 registers and 4-warp fp32 tiles at 128 or 168): BLOCK_N 32 key loops at BLOCK_D 64/128
#   (masked, or shrunk to 64 query rows on small grids) did that on sm_80; BLOCK_N 64 compiles clean at
#   128-182 (BLOCK_D 128) and 152-230 (BLOCK_D 64 with a mask) registers, so masked and unmasked loops now
#   share BLOCK_N 64 there, which also halves the loop trips of self-attention.
# fp32 uses IEEE dots, which Triton lowers to unrolled FMA loops on whole register tiles: only small tiles
# fit, and never the 128-key single tile (it spilled tens of KiB per thread), so fp32 always takes the key
# loop; at BLOCK_D 64/128 only 16-row tiles on 4 warps were clean on both targets with every mask kind
# (32-row tiles spilled 4-32 B). fp32 is the exact-reference path, not the fast one.
_HALF_SINGLE_TILES = {  # block_d -> {single-tile block_n: (block_m, num_warps)}
    64: {128: (64, 8), 64: (128, 8), 32: (128, 8), 16: (128, 8)},
    128: {128: (32, 8), 64: (64, 8), 32: (64, 8), 16: (64, 8)},
    256: {128: (32, 8), 64: (32, 8), 32: (32, 8), 16: (32, 8)},
}
_HALF_LOOP_TILES = {64: (128, 64, 8), 128: (64, 64, 8), 256: (32, 32, 8)}  # block_d -> (block_m, block_n, warps)
_HALF_LOOP_TILES_MASKED = {64: (128, 64, 8), 128: (64, 64, 8), 256: (32, 16, 8)}  # d160: the mask tile costs registers
_FP32_LOOP_TILES = {64: (16, 16, 4), 128: (16, 32, 4), 256: (16, 16, 4)}


def launch_config(batch_heads: int, lq: int, lk: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device, masked: bool = False) -> dict:
    """Tile sizes and warps for one call: {BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_TILE, num_warps, num_stages}."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    single = lk <= _SINGLE_TILE_MAX_KEYS
    if device.type != "cuda":
        # Interpreter: fewer, larger programs run faster; no warps to tune.
        block_n = max(16, triton.next_power_of_2(lk)) if single else 64
        return dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_TILE=single, num_warps=4, num_stages=1)
    block_d = max(64, block_d)  # the tables start at 64: narrower heads pad to it (masked columns)
    if dtype == torch.float32:
        single = False
        block_m, block_n, num_warps = _FP32_LOOP_TILES[block_d]
        min_block_m = 16
    elif single:
        block_n = max(16, triton.next_power_of_2(lk))
        block_m, num_warps = _HALF_SINGLE_TILES[block_d][block_n]
        min_block_m = 32
    else:
        block_m, block_n, num_warps = (_HALF_LOOP_TILES_MASKED if masked else _HALF_LOOP_TILES)[block_d]
        min_block_m = 32
    # Small query levels (Lq 256 / 64 at 512 px) would leave SMs idle: shrink the query tile until the
    # grid covers every SM about twice. A shrunk tile needs fewer registers, but ptxas may then aim at a
    # higher occupancy and spill a few bytes to get there (BLOCK_N 32 loops did on sm_80): the shrunk
    # tiles of the SD shapes are compiled by scripts/triton_aot_check.py too.
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while block_m > min_block_m and batch_heads * triton.cdiv(lq, block_m) < target:
        block_m //= 2
    num_stages = 1 if single else (2 if block_d >= 128 else 3)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_TILE=single, num_warps=num_warps,
                num_stages=num_stages)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    op = "attention_triton"
    check_qkv(op, q, k, v)
    head_dim = q.shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D must be at most {_MAX_HEAD_DIM}, got {head_dim}")
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError(f"{op}: CPU tensors run only under TRITON_INTERPRET=1 (set before triton is imported)")
    if mask is not None:
        check_mask(op, mask, tuple(q.shape[:-1]) + (k.shape[-2],), q.dtype, q.device)


def _strides4(t: torch.Tensor) -> list[int]:
    """Strides of [..., L, D] viewed as 4-D [b0, b1, L, D] (a 3-D tensor gets b1 of size 1, stride 0)."""
    strides = list(t.stride())
    return [strides[0], 0] + strides[1:] if t.dim() == 3 else strides


def attention_triton_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launches the fused kernel (no custom-op wrapper: used by the op and by the CUDA kernel of
    ddim_fast::attention). q [B, H, Lq, D] or [B*H, Lq, D]; k, v [..., Lk, D]; mask per check_mask.
    Returns a new contiguous tensor shaped like q."""
    _check_inputs(q, k, v, mask)
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

    if mask is None:
        mask_kind, mask_arg, mask_strides = _MASK_NONE, q, [0, 0, 0, 0]  # any pointer: never read
    else:
        mask_kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADDITIVE
        # Broadcast (size-1) dims read one element for every index: stride 0.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = [0 if m == 1 else st for m, st in zip(mask.shape, mask.stride())]
        if mask.dim() == 3:
            mask_strides = [mask_strides[0], 0] + mask_strides[1:]

    num_m_blocks = triton.cdiv(lq, cfg["BLOCK_M"])
    grid = (num_m_blocks * batch_heads,)
    dot_fp32 = q.dtype == torch.float32 or q.device.type != "cuda"
    with torch.cuda.device(q.device) if q.device.type == "cuda" else _nullcontext():
        _attention_kernel[grid](
            q, k, v, out, mask_arg,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out), *mask_strides,
            heads, lq, lk, head_dim, float(scale), num_m_blocks,
            MASK_KIND=mask_kind, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            SINGLE_TILE=cfg["SINGLE_TILE"], DOT_FP32=dot_fp32,
            INTERP_TILES=0 if q.device.type == "cuda" else triton.cdiv(lk, cfg["BLOCK_N"]),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# The op (schema in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls attention_triton_impl).
attention_triton = torch.ops.ddim_fast.attention_triton
