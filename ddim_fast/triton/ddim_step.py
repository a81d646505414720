"""Triton kernel of the fused DDIM step, with the same semantics as the C++ ``ddim_fast::ddim_step`` op.

Two ops (schemas in csrc/ops.cpp beside the C++ ones; kernels and fake kernels registered by
ddim_fast/_library.py, which imports this module on their first call), called by
``ddim_fast.ops.ddim_step(..., backend="triton")`` with the positional arguments of the C++ schema:

* ``ddim_fast::ddim_step_triton(x, model_output, table, step, guidance_scale, prediction_type, clip_range,
  x0_threshold, use_clipped_model_output, noise, rng_state, temperature, return_pred_x0) -> (x_prev, pred_x0)``
* ``ddim_fast::ddim_step_triton_out(..., temperature, out, pred_x0_out) -> None`` (writes out / pred_x0_out)

Semantics shared with the C++ kernels:
* all math in fp32 whatever the storage dtype (fp32, fp16, bf16);
* the step index and the table row are read on the device (``step`` is a tensor: bump it in place to
  advance, no host sync); a step outside the table is never read: every output element becomes NaN;
* seeded noise is Philox4x32-10 with the mapping of csrc/include/ddim_fast/philox.h, mirrored below line
  for line in uint32 arithmetic, so the integer words are bit-identical to the C++ kernels and the
  normals agree to fp32 rounding of log/sqrt/sin/cos; rng_state [2] is one stream over the tensor,
  [B, 2] one stream per batch row (a sample's noise never depends on its row or the batch size);
* divisions are IEEE round-to-nearest (``tl.div_rn``) where the C++/CUDA kernels divide;
* outputs of the functional op are laid out like ``torch.empty_like(x)`` (channels_last stays so);
* memory order (the CONTIGUOUS constexpr): row-major tensors, and tensors that are all dense with one
  shared layout (channels_last), run as flat memory in 16-byte rows, unless Philox noise needs the
  logical index (then the strided path) or dynamic thresholding needs a sample index the memory position
  does not give (batch not outermost);
* other strided inputs: shapes are collapsed (size-1 dims dropped, dims merged where every argument
  is contiguous across them) to at most 4 logical dims and the strides go to the kernel. Shapes that
  still need more than 4 dims after collapsing fall back to contiguous copies of the inputs (and a
  contiguous temporary for each strided output, copied back): correct, one extra pass over memory.

Host cost per call: the checks of csrc/ddim_step_args.cpp run every call (the functional op skips the
overlap checks of the outputs it just allocated, which could not fail); everything that follows from
shapes, strides, dtype and options (layout path, collapsed sizes/strides, noise mode, block size, grid)
is a cached _Plan.

On CPU tensors the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported) with a fixed block size; on CUDA the block size and warp count are chosen by problem size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

import ddim_fast  # noqa: F401  (registers torch.ops.ddim_fast.*)
from ddim_fast import _checks
from ddim_fast import schedule as _schedule
from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

__all__ = ["ddim_step_triton", "ddim_step_triton_out", "run_ddim_step"]

_MAX_DIMS = 8  # csrc/include/ddim_fast/step_params.h kMaxDims
_KERNEL_DIMS = 4  # logical dims the kernel indexes after collapsing
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PREDICTIONS = {"epsilon": 0, "v_prediction": 1, "sample": 2}  # step_math.h Prediction
_CLAMP_NONE, _CLAMP_STATIC, _CLAMP_DYNAMIC = 0, 1, 2  # step_math.h X0Clamp
# NOISE constexpr: none, a noise tensor, Philox with one stream over the tensor (rng_state [2]), Philox with
# one stream per batch row (rng_state [B, 2]) when sample_numel % 4 == 0, and when it is not (padded groups).
_NOISE_NONE, _NOISE_TENSOR, _NOISE_PHILOX, _NOISE_PHILOX_ROWS, _NOISE_PHILOX_ROWS_PADDED = 0, 1, 2, 3, 4

# Elements per Philox call: the kernel works on [groups, 4] tiles so one call serves 4 elements.
_GROUP = 4
# What an out-of-range step writes is a quiet NaN built from its bit pattern inside the kernel (_quiet_nan).
# Not a module-level tl.constexpr(float("nan")): Triton's JIT compares every global a kernel read with `!=` before
# each GPU launch, and NaN != NaN, so such a kernel refuses to launch ("Global variable ... has changed since we
# compiled this kernel"); the interpreter skips that check. tests/test_triton_globals.py guards every kernel.
_QUIET_NAN_BITS = tl.constexpr(0x7FC00000)


# ----------------------------------------------------------------------------------------------------
# Philox4x32-10 + Box-Muller: csrc/include/ddim_fast/philox.h, line for line, in uint32 arithmetic
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    # Random123 constants (kPhiloxM0/M1/W0/W1). The key is bumped between rounds: nine bumps.
    for round_ in tl.static_range(10):
        if round_ > 0:
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = tl.mul(c0, 0xD2511F53, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = tl.mul(c2, 0xCD9E8D57, sanitize_overflow=False)
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _philox_uniform(r):
    # (r >> 8) * 2^-24: 24 random bits, exact in fp32, in [0, 1).
    return (r >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _box_muller(r_radius, r_angle):
    radius = tl.sqrt_rn(-2.0 * tl.log(_philox_uniform(r_radius) + 5.9604644775390625e-08))
    angle = 6.28318530717958647692 * _philox_uniform(r_angle)
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _quiet_nan(like):
    """A float32 tensor of like's shape filled with the quiet NaN 0x7FC00000."""
    return tl.full(like.shape, _QUIET_NAN_BITS, tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _split_u64(v):
    """An int64 value (tensor or scalar) -> its (low, high) 32-bit words as uint32."""
    return (v & 0xFFFFFFFF).to(tl.uint32), ((v >> 32) & 0xFFFFFFFF).to(tl.uint32)


# ----------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _strided_offsets(idx, size1, size2, size3, s0, s1, s2, s3):
    """Element offsets of logical row-major indices `idx` in a [*, size1, size2, size3] view with strides s."""
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _ddim_step_kernel(
    x_ptr, mu_ptr, mc_ptr, noise_ptr, out_ptr, x0_ptr,
    table_ptr, step_ptr, rng_ptr, thr_ptr,
    numel, sample_numel, num_rows,
    size1, size2, size3,
    sx0, sx1, sx2, sx3,
    smu0, smu1, smu2, smu3,
    smc0, smc1, smc2, smc3,
    sn0, sn1, sn2, sn3,
    so0, so1, so2, so3,
    sp0, sp1, sp2, sp3,
    guidance_scale, clip_range, temperature,
    PREDICTION: tl.constexpr,
    GUIDED: tl.constexpr,
    CLAMP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    NOISE: tl.constexpr,
    WRITE_X0: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    # One program = BLOCK_GROUPS Philox groups = 4 * BLOCK_GROUPS elements, laid out as a [ROWS, VEC] tile of
    # 16-byte rows: VEC = 4 fp32 or 8 fp16/bf16 elements, i.e. GROUPS_PER_ROW = 1 or 2 Philox groups per row.
    # On the CONTIGUOUS path row r holds elements r*VEC .. r*VEC + VEC-1, so the pointer analysis sees VEC
    # consecutive elements starting at a multiple of VEC: with the 16-byte pointer alignment and numel % 16 == 0
    # that Triton's JIT specializes on, every load/store is one 16-byte ld/st.global.v4 per row (an 8-byte
    # [*, 4] tile for fp16 halved the transaction width).
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    GROUPS_PER_ROW: tl.constexpr = VEC // 4
    ROWS: tl.constexpr = BLOCK_GROUPS // GROUPS_PER_ROW
    pid = tl.program_id(0).to(tl.int64)  # int64 indices: tensors over 2^31 elements
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    lane = tl.arange(0, VEC)

    if NOISE == 4:  # _NOISE_PHILOX_ROWS_PADDED
        # Per-row noise streams with sample_numel % 4 != 0: the tile walks the padded group space where each
        # row owns ceil(sample_numel / 4) groups, so a Philox group never straddles two rows (philox.h). Tile
        # element (r, l) is lane l % 4 of group gid = r * GROUPS_PER_ROW + l // 4; the lanes past the row's
        # end are masked off.
        groups_per_stream = (sample_numel + 3) // 4
        gid = rows[:, None] * GROUPS_PER_ROW + (lane // 4)[None, :]
        stream = gid // groups_per_stream
        j = (gid - stream * groups_per_stream) * 4 + (lane % 4)[None, :]
        idx = stream * sample_numel + j
        mask = (j < sample_numel) & (idx < numel)
    else:
        idx = rows[:, None] * VEC + lane[None, :]
        mask = idx < numel

    # The step row, read on the device. An out-of-range step reads row 0 (always present) and the
    # outputs are forced to NaN below, so nothing is read out of bounds.
    step = tl.load(step_ptr)
    valid_step = (step >= 0) & (step < num_rows)
    row = table_ptr + tl.where(valid_step, step, 0) * 8
    sqrt_alpha = tl.load(row + 1)
    sqrt_one_minus_alpha = tl.load(row + 2)
    sqrt_alpha_prev = tl.load(row + 3)
    dir_coef = tl.load(row + 4)
    noise_coef = tl.load(row + 5) * temperature

    if CONTIGUOUS:
        # Memory order: position idx of every argument (row-major, or one shared dense layout such as
        # channels_last; the launcher picks this only where idx means what the options below need).
        ox = idx
        omu = idx
        omc = idx
        onz = idx
        oo = idx
        op = idx
    else:
        ox = _strided_offsets(idx, size1, size2, size3, sx0, sx1, sx2, sx3)
        omu = _strided_offsets(idx, size1, size2, size3, smu0, smu1, smu2, smu3)
        omc = _strided_offsets(idx, size1, size2, size3, smc0, smc1, smc2, smc3)
        onz = _strided_offsets(idx, size1, size2, size3, sn0, sn1, sn2, sn3)
        oo = _strided_offsets(idx, size1, size2, size3, so0, so1, so2, so3)
        op = _strided_offsets(idx, size1, size2, size3, sp0, sp1, sp2, sp3)

    x = tl.load(x_ptr + ox, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mu_ptr + omu, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        m_cond = tl.load(mc_ptr + omc, mask=mask, other=0.0).to(tl.float32)
        m = m + guidance_scale * (m_cond - m)

    # model output -> (x0_hat, eps_hat), same operation order as step_math.h predict_x0_eps. Divisions are
    # IEEE round-to-nearest (tl.div_rn) like the C++/CUDA `/`: Triton's `/` is the approximate div.full.f32.
    if PREDICTION == 0:
        eps = m
        x0 = tl.div_rn(x - sqrt_one_minus_alpha * m, sqrt_alpha)
    elif PREDICTION == 1:
        x0 = sqrt_alpha * x - sqrt_one_minus_alpha * m
        eps = sqrt_alpha * m + sqrt_one_minus_alpha * x
    else:
        x0 = m
        eps = tl.div_rn(x - sqrt_alpha * m, sqrt_one_minus_alpha)

    # Comparisons rather than tl.minimum/maximum, as step_math.h clamp_symmetric: a NaN x0 stays NaN.
    if CLAMP == 1:
        x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))
    if CLAMP == 2:
        thr = tl.load(thr_ptr + idx // sample_numel, mask=mask, other=1.0)
        x0 = tl.div_rn(tl.where(x0 < -thr, -thr, tl.where(x0 > thr, thr, x0)), thr)
    if CLAMP != 0:
        if USE_CLIPPED:
            eps = tl.div_rn(x - sqrt_alpha * x0, sqrt_one_minus_alpha)

    x_prev = sqrt_alpha_prev * x0 + dir_coef * eps
    if NOISE == 1:
        z = tl.load(noise_ptr + onz, mask=mask, other=0.0).to(tl.float32)
        x_prev = x_prev + noise_coef * z
    if NOISE >= 2:
        # philox.h: key = (lo, hi)(seed), counter = (lo, hi)(g), (lo, hi)(offset + step), for group g of a
        # stream. NOISE 2: one stream over the tensor, tile row r holds its groups r * GROUPS_PER_ROW + h.
        # NOISE 3/4: one stream per batch row (rng_state [B, 2]), group gid of the tile is group g of stream
        # `stream` (3: sample_numel % 4 == 0, the padded and the global group spaces coincide; 4: padded).
        z = tl.zeros([ROWS, VEC], dtype=tl.float32)
        if NOISE == 2:
            seed0 = tl.load(rng_ptr)
            offset0 = tl.load(rng_ptr + 1) + step
        for h in tl.static_range(GROUPS_PER_ROW):
            gid_h = rows * GROUPS_PER_ROW + h
            if NOISE == 2:
                seed = seed0
                offset = offset0
                g = gid_h
            else:
                groups_per_stream_h = (sample_numel + 3) // 4
                stream_h = gid_h // groups_per_stream_h
                g = gid_h - stream_h * groups_per_stream_h
                live = stream_h * sample_numel < numel  # tile rows past the last batch row read no seed
                seed = tl.load(rng_ptr + 2 * stream_h, mask=live, other=0)
                offset = tl.load(rng_ptr + 2 * stream_h + 1, mask=live, other=0) + step
            k0, k1 = _split_u64(seed)
            c0, c1 = _split_u64(g)
            c2, c3 = _split_u64(offset)
            c2 = tl.zeros([ROWS], dtype=tl.uint32) + c2
            c3 = tl.zeros([ROWS], dtype=tl.uint32) + c3
            r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
            z0, z1 = _box_muller(r0, r1)
            z2, z3 = _box_muller(r2, r3)
            l2 = lane[None, :]
            z = tl.where(l2 == 4 * h, z0[:, None],
                         tl.where(l2 == 4 * h + 1, z1[:, None],
                                  tl.where(l2 == 4 * h + 2, z2[:, None],
                                           tl.where(l2 == 4 * h + 3, z3[:, None], z))))
        x_prev = x_prev + noise_coef * z

    x_prev = tl.where(valid_step, x_prev, _quiet_nan(x_prev))
    tl.store(out_ptr + oo, x_prev.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        x0 = tl.where(valid_step, x0, _quiet_nan(x0))
        tl.store(x0_ptr + op, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# Whether @triton.jit built an interpreter function (TRITON_INTERPRET=1 when triton was imported): then the
# kernel runs on CPU tensors, with the interpreter's launch configuration.
_INTERPRETED = isinstance(_ddim_step_kernel, _InterpretedFunction)


# ----------------------------------------------------------------------------------------------------
# Validation: the rules and messages of csrc/ddim_step_args.cpp
# ----------------------------------------------------------------------------------------------------

_OVERLAP_NO, _OVERLAP_FULL, _OVERLAP_PARTIAL, _OVERLAP_TOO_HARD = range(4)


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _overlap_status(a: torch.Tensor, b: torch.Tensor) -> int:
    """ATen's get_overlap_status, except that tensors on different storages never overlap even when one
    of them is not dense (ATen answers TooHard there, which rejects a strided x; see the report)."""
    if a is b:
        return _OVERLAP_FULL
    if a.numel() == 0 or b.numel() == 0:
        return _OVERLAP_NO
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return _OVERLAP_NO
    if not _non_overlapping_and_dense(a) or not _non_overlapping_and_dense(b):
        return _OVERLAP_TOO_HARD
    a_begin, b_begin = a.data_ptr(), b.data_ptr()
    a_end = a_begin + a.numel() * a.element_size()
    b_end = b_begin + b.numel() * b.element_size()
    if a_begin == b_begin and a_end == b_end:
        return _OVERLAP_FULL if a.stride() == b.stride() else _OVERLAP_PARTIAL
    if a_begin < b_end and b_begin < a_end:
        return _OVERLAP_PARTIAL
    return _OVERLAP_NO


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


_dtype_str = _checks.c10_dtype_name  # c10::ScalarType names, so messages read exactly like the C++ op's


def _num_str(value: float) -> str:
    """A double as C++ ostream prints it (6 significant digits)."""
    return f"{value:g}"


def _check_like_x(x: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if t.device != x.device:
        raise ValueError(f"ddim_step: {name} must be on x's device {x.device}, got {t.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"ddim_step: {name} must have x's dtype {_dtype_str(x.dtype)}, "
                        f"got {_dtype_str(t.dtype)} (ddim_fast.ops.ddim_step casts for you)")
    if t.shape != x.shape:
        raise ValueError(f"ddim_step: {name} must have x's shape {_shape_str(x.shape)}, got "
                         f"{_shape_str(t.shape)} (nothing is broadcast)")


def _check_written(x, written, name, model_output, noise) -> None:
    _check_like_x(x, written, name)
    if torch._debug_has_internal_overlap(written) == 1:
        raise ValueError(f"ddim_step: {name} has internal overlap (several elements share memory); "
                         "pass a dense tensor")
    with_x = _overlap_status(written, x)
    if not (with_x == _OVERLAP_NO or (with_x == _OVERLAP_FULL and written.stride() == x.stride())):
        raise ValueError(f"ddim_step: {name} partially overlaps x; it may be x itself or disjoint from it")
    if _overlap_status(written, model_output) != _OVERLAP_NO:
        raise ValueError(f"ddim_step: {name} overlaps model_output")
    if noise is not None and _overlap_status(written, noise) != _OVERLAP_NO:
        raise ValueError(f"ddim_step: {name} overlaps noise")


def _validate(x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
              noise, rng_state, temperature, out, pred_x0_out, fresh_outputs: bool = False):
    """Checks every argument like make_ddim_step_params and returns the kernel's options:
    (uncond, cond, prediction, clamp, noise_mode, rng_per_row). ``fresh_outputs``: out / pred_x0_out were just
    allocated by the functional op (empty_like x), so they cannot overlap anything and their overlap checks
    are skipped (they could not fail)."""
    if x.dim() < 1:
        raise ValueError("ddim_step: x must have a batch dimension, got a 0-dim tensor")
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"ddim_step: x may have at most {_MAX_DIMS} dims, got {x.dim()}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"ddim_step: x must be float32, float16 or bfloat16, got {_dtype_str(x.dtype)}")
    device = x.device
    if device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"ddim_step (Triton kernel): x must be a CUDA tensor, got {device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    batch = x.shape[0]

    if model_output.device != device:
        raise ValueError(f"ddim_step: model_output must be on x's device {device}, got {model_output.device}")
    if model_output.dtype != x.dtype:
        raise TypeError(f"ddim_step: model_output must have x's dtype {_dtype_str(x.dtype)}, "
                        f"got {_dtype_str(model_output.dtype)} (ddim_fast.ops.ddim_step casts for you)")
    if model_output.dim() != x.dim() or model_output.shape[1:] != x.shape[1:]:
        raise ValueError("ddim_step: model_output must be [B, ...] or [2B, ...] with x's trailing shape "
                         f"{_shape_str(x.shape[1:])}, got {_shape_str(model_output.shape)}")
    if guidance_scale is not None:
        if model_output.shape[0] != 2 * batch:
            raise ValueError("ddim_step: with guidance_scale, model_output must stack [uncond, cond] along "
                             f"dim 0: expected batch {2 * batch}, got {model_output.shape[0]}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"ddim_step: guidance_scale must be finite, got {_num_str(guidance_scale)}")
        uncond, cond = model_output[:batch], model_output[batch:]
    else:
        if model_output.shape[0] != batch:
            raise ValueError(f"ddim_step: model_output batch must equal x's batch {batch} (or be {2 * batch} "
                             f"with guidance_scale set), got {model_output.shape[0]}")
        uncond, cond = model_output, None

    if table.device != device:
        raise ValueError(f"ddim_step: table must be on x's device {device}, got {table.device} "
                         "(build it with ddim_fast.schedule ... .to(device))")
    if table.dtype != torch.float32:
        raise TypeError(f"ddim_step: table must be float32, got {_dtype_str(table.dtype)}")
    if not (table.dim() == 2 and table.shape[1] == _schedule.TABLE_COLUMNS and table.is_contiguous()):
        raise ValueError(f"ddim_step: table must be a contiguous [num_steps, {_schedule.TABLE_COLUMNS}] tensor, "
                         f"got {_shape_str(table.shape)}")
    if table.shape[0] == 0:
        raise ValueError("ddim_step: table has no rows")
    if step.device != device:
        raise ValueError(f"ddim_step: step must be on x's device {device}, got {step.device}")
    if step.dtype != torch.int64:
        raise TypeError(f"ddim_step: step must be an int64 tensor, got {_dtype_str(step.dtype)}")
    if step.numel() != 1:
        raise ValueError(f"ddim_step: step must hold exactly one index, got {step.numel()} elements")

    prediction = _PREDICTIONS.get(prediction_type)
    if prediction is None:
        raise ValueError("ddim_step: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got "
                         f"'{prediction_type}'")

    if clip_range is not None and x0_threshold is not None:
        raise ValueError("ddim_step: give clip_range or x0_threshold, not both")
    clamp = _CLAMP_NONE
    if clip_range is not None:
        # `> 0` is false for NaN; +inf is allowed (clamps nothing, still re-derives eps when asked).
        if not clip_range > 0:
            raise ValueError(f"ddim_step: clip_range must be > 0, got {_num_str(clip_range)} (inf clamps nothing)")
        clamp = _CLAMP_STATIC
    if x0_threshold is not None:
        if x0_threshold.device != device:
            raise ValueError(f"ddim_step: x0_threshold must be on x's device {device}, got {x0_threshold.device}")
        if x0_threshold.dtype != torch.float32:
            raise TypeError(f"ddim_step: x0_threshold must be float32, got {_dtype_str(x0_threshold.dtype)}")
        if not (x0_threshold.dim() == 1 and x0_threshold.shape[0] == batch and x0_threshold.is_contiguous()):
            raise ValueError(f"ddim_step: x0_threshold must be a contiguous [B] = [{batch}] tensor, got "
                             f"{_shape_str(x0_threshold.shape)}")
        clamp = _CLAMP_DYNAMIC

    if noise is not None and rng_state is not None:
        raise ValueError("ddim_step: give noise or rng_state, not both")
    noise_mode = _NOISE_NONE
    per_row = False
    if noise is not None:
        _check_like_x(x, noise, "noise")
        noise_mode = _NOISE_TENSOR
    if rng_state is not None:
        per_row = _checks.rng_state_per_row(rng_state, x)
        noise_mode = _NOISE_PHILOX
    if not math.isfinite(temperature):
        raise ValueError(f"ddim_step: temperature must be finite, got {_num_str(temperature)}")

    if fresh_outputs:
        return uncond, cond, prediction, clamp, noise_mode, per_row
    _check_written(x, out, "out", model_output, noise)
    if pred_x0_out is not None:
        _check_written(x, pred_x0_out, "pred_x0_out", model_output, noise)
        if _overlap_status(pred_x0_out, out) != _OVERLAP_NO:
            raise ValueError("ddim_step: pred_x0_out overlaps out")
    return uncond, cond, prediction, clamp, noise_mode, per_row


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def _collapse(shape, strides_per_arg):
    """Drops size-1 dims and merges neighbours that every argument walks contiguously. Row-major logical
    indices are unchanged by both, so Philox groups and batch indices stay the same.
    Returns (sizes, [strides per arg]) with at least one dim."""
    dims = [d for d, s in enumerate(shape) if s != 1]
    sizes = [int(shape[d]) for d in dims]
    strides = [[int(st[d]) for d in dims] for st in strides_per_arg]
    d = len(sizes) - 2
    while d >= 0:
        if all(st[d] == st[d + 1] * sizes[d + 1] for st in strides):
            sizes[d] *= sizes[d + 1]
            del sizes[d + 1]
            for st in strides:
                st[d] = st[d + 1]
                del st[d + 1]
        d -= 1
    if not sizes:
        sizes = [1]
        strides = [[0] for _ in strides]
    return sizes, strides


def _launch_config(numel: int, contiguous: bool) -> tuple[int, int]:
    """(BLOCK_GROUPS, num_warps). The interpreter pays per program, not per element: big fixed blocks.

    Every GPU contiguous configuration gives each thread 8 elements (4 * BLOCK_GROUPS / (32 * num_warps)):
    two 16-byte vectors per tensor for fp32, one for fp16/bf16 (the kernel's [ROWS, VEC] tile), so no
    dtype gets narrower accesses or idle (replicated) threads."""
    if _INTERPRETED:
        return 1024, 4
    if not contiguous:
        # Six int64 index -> offset decompositions per element: 512-group blocks need 255 registers and
        # spill on sm_90 (offline ptxas -v); 128 groups on 4 warps stay spill-free.
        return 128, 4
    if numel < (1 << 16):
        # 256 elements on one warp: enough programs to spread small latents over the SMs (an SD 1x4x64x64
        # latent is 64 programs). 128 groups on 4 warps spilled 4 B on sm_80 before (fp16/bf16, sizes not a
        # multiple of 16, every option on); one warp of 8 elements per thread compiles clean on sm_80 and
        # sm_90 (offline ptxas -v).
        return 64, 1
    # 1024 elements on 4 warps from 2^16 elements up. 512 groups on 8 warps (the same 8 elements per thread)
    # made ptxas cap registers at 64 on sm_90 and spill 4 B with fp16/bf16, every option on and numel not a
    # multiple of 16 (offline ptxas -v); 256 groups on 4 warps compile clean everywhere.
    return 256, 4


def _same_strides(t_strides, x_strides, shape) -> bool:
    """t holds every element at x's offset: equal strides on every dim of size > 1."""
    return all(a == b for a, b, n in zip(t_strides, x_strides, shape) if n != 1)


def _dense(shape, strides) -> bool:
    """Non-overlapping and dense: the offsets are exactly 0 .. numel - 1."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(shape, strides) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class _Plan:
    """Everything about a launch that follows from shapes, strides, dtype and options: computed once per
    such key (cached), so a repeated step only validates, looks the plan up and launches."""

    __slots__ = ("contiguous", "copy_in", "sizes", "strides", "block_groups", "num_warps", "grid", "noise")

    def __init__(self, shape, arg_strides, noise_mode, per_row, dynamic):
        numel = math.prod(shape)
        sample_numel = numel // shape[0] if shape[0] else 0
        philox = noise_mode == _NOISE_PHILOX
        x_strides = arg_strides[0]
        row_major_strides = _row_major_strides(shape)
        row_major = all(_same_strides(st, row_major_strides, shape) for st in arg_strides)
        # Memory order: row-major, or one dense layout shared by every argument (channels_last), where the
        # memory position means what the options need: Philox needs the logical index (only row-major
        # gives it), dynamic thresholding the sample (memory position // sample_numel with batch outermost).
        batch_outermost = shape[0] <= 1 or x_strides[0] == sample_numel
        shared_dense = _dense(shape, x_strides) and all(_same_strides(st, x_strides, shape) for st in arg_strides)
        self.contiguous = row_major or (shared_dense and not philox and (not dynamic or batch_outermost))
        self.copy_in = False
        if self.contiguous:
            self.sizes = [1] * _KERNEL_DIMS
            self.strides = [0] * (_KERNEL_DIMS * len(arg_strides))
        else:
            sizes, strides = _collapse(shape, arg_strides)
            if len(sizes) > _KERNEL_DIMS:
                # More strided dims than the kernel indexes: contiguous copies in, contiguous temporaries out.
                self.copy_in = True
                self.contiguous = True
                self.sizes = [1] * _KERNEL_DIMS
                self.strides = [0] * (_KERNEL_DIMS * len(arg_strides))
            else:
                pad = _KERNEL_DIMS - len(sizes)
                self.sizes = [1] * pad + sizes
                self.strides = [s for st in strides for s in [0] * pad + st]
        self.noise = noise_mode
        groups = (numel + _GROUP - 1) // _GROUP
        if philox and per_row:
            if sample_numel % _GROUP == 0:
                self.noise = _NOISE_PHILOX_ROWS
            else:
                self.noise = _NOISE_PHILOX_ROWS_PADDED
                groups = shape[0] * ((sample_numel + _GROUP - 1) // _GROUP)
        self.block_groups, self.num_warps = _launch_config(numel, self.contiguous)
        self.grid = (triton.cdiv(groups, self.block_groups),)


def _row_major_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


_PLANS: dict = {}
_PLANS_MAX = 512  # distinct (shape, layout, options) keys kept; a loop uses one or two


def _plan(shape, arg_strides, dtype, noise_mode, per_row, dynamic) -> _Plan:
    key = (shape, arg_strides, dtype, noise_mode, per_row, dynamic)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(tuple(int(n) for n in shape), arg_strides, noise_mode, per_row, dynamic)
    return plan


def run_ddim_step(x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
                  use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out,
                  fresh_outputs: bool = False) -> None:
    uncond, cond, prediction, clamp, noise_mode, per_row = _validate(
        x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold, noise, rng_state,
        temperature, out, pred_x0_out, fresh_outputs)
    numel = x.numel()
    if numel == 0:
        return
    # Kernel arguments in the order x, uncond, cond, noise, out, pred_x0; absent ones stand in as x
    # (their pointers are never dereferenced: the constexpr options remove those loads/stores).
    args = [x, uncond, x if cond is None else cond, x if noise is None else noise, out,
            out if pred_x0_out is None else pred_x0_out]
    plan = _plan(x.shape, tuple(a.stride() for a in args), x.dtype, noise_mode, per_row, clamp == _CLAMP_DYNAMIC)
    write_back = []
    if plan.copy_in:
        args[:4] = [a.contiguous() for a in args[:4]]
        for k in ((4, 5) if pred_x0_out is not None else (4,)):
            if not args[k].is_contiguous():
                tmp = torch.empty(x.shape, dtype=x.dtype, device=x.device)
                write_back.append((args[k], tmp))
                args[k] = tmp
        if pred_x0_out is None:
            args[5] = args[4]  # never written (WRITE_X0 is False)

    # Triton launches on the current device's stream: make that x's device when it is not already.
    device = x.device
    switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        _ddim_step_kernel[plan.grid](
            *args, table, step, step if rng_state is None else rng_state,
            table if x0_threshold is None else x0_threshold,
            numel, numel // x.shape[0], table.shape[0],
            plan.sizes[1], plan.sizes[2], plan.sizes[3], *plan.strides,
            1.0 if guidance_scale is None else float(guidance_scale),
            1.0 if clip_range is None else float(clip_range),
            float(temperature),
            PREDICTION=prediction, GUIDED=cond is not None, CLAMP=clamp,
            USE_CLIPPED=bool(use_clipped_model_output), NOISE=plan.noise,
            WRITE_X0=pred_x0_out is not None, CONTIGUOUS=plan.contiguous, BLOCK_GROUPS=plan.block_groups,
            num_warps=plan.num_warps,
        )
    for dst, tmp in write_back:
        dst.copy_(tmp)


# ----------------------------------------------------------------------------------------------------
# The ops (schemas in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls run_ddim_step)
# ----------------------------------------------------------------------------------------------------

ddim_step_triton = torch.ops.ddim_fast.ddim_step_triton
ddim_step_triton_out = torch.ops.ddim_fast.ddim_step_triton_out
