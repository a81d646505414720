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
  normals agree to fp32 rounding of log/sqrt/sin/cos;
* inputs may be strided: shapes are collapsed (size-1 dims dropped, dims merged where every argument
  is contiguous across them) to at most 4 logical dims and the strides go to the kernel. Shapes that
  still need more than 4 dims after collapsing fall back to contiguous copies of the inputs (and a
  contiguous temporary for each strided output, copied back): correct, one extra pass over memory.

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
from ddim_fast import schedule as _schedule
from ddim_fast._library import interpreting as _interpreting

__all__ = ["ddim_step_triton", "ddim_step_triton_out", "run_ddim_step"]

_MAX_DIMS = 8  # csrc/include/ddim_fast/step_params.h kMaxDims
_KERNEL_DIMS = 4  # logical dims the kernel indexes after collapsing
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PREDICTIONS = {"epsilon": 0, "v_prediction": 1, "sample": 2}  # step_math.h Prediction
_CLAMP_NONE, _CLAMP_STATIC, _CLAMP_DYNAMIC = 0, 1, 2  # step_math.h X0Clamp
_NOISE_NONE, _NOISE_TENSOR, _NOISE_PHILOX = 0, 1, 2

# Elements per Philox call: the kernel works on [groups, 4] tiles so one call serves 4 elements.
_GROUP = 4
# What an out-of-range step writes (a module-level constexpr: jit code cannot call float()).
_NAN = tl.constexpr(float("nan"))


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
    # One program = BLOCK_GROUPS Philox groups = 4 * BLOCK_GROUPS consecutive logical elements, laid out
    # as a [BLOCK_GROUPS, 4] tile: row g holds elements 4g .. 4g+3, which share one Philox call.
    pid = tl.program_id(0).to(tl.int64)  # int64 indices: tensors over 2^31 elements
    groups = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    lane = tl.arange(0, 4)
    idx = groups[:, None] * 4 + lane[None, :]
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

    # model output -> (x0_hat, eps_hat), same operation order as step_math.h predict_x0_eps.
    if PREDICTION == 0:
        eps = m
        x0 = (x - sqrt_one_minus_alpha * m) / sqrt_alpha
    elif PREDICTION == 1:
        x0 = sqrt_alpha * x - sqrt_one_minus_alpha * m
        eps = sqrt_alpha * m + sqrt_one_minus_alpha * x
    else:
        x0 = m
        eps = (x - sqrt_alpha * m) / sqrt_one_minus_alpha

    if CLAMP == 1:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    if CLAMP == 2:
        thr = tl.load(thr_ptr + idx // sample_numel, mask=mask, other=1.0)
        x0 = tl.minimum(tl.maximum(x0, -thr), thr) / thr
    if CLAMP != 0:
        if USE_CLIPPED:
            eps = (x - sqrt_alpha * x0) / sqrt_one_minus_alpha

    x_prev = sqrt_alpha_prev * x0 + dir_coef * eps
    if NOISE == 1:
        z = tl.load(noise_ptr + onz, mask=mask, other=0.0).to(tl.float32)
        x_prev = x_prev + noise_coef * z
    if NOISE == 2:
        # philox.h mapping: key = (lo, hi)(seed), counter = (lo, hi)(group), (lo, hi)(offset + step).
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1) + step
        k0, k1 = _split_u64(seed)
        c0, c1 = _split_u64(groups)
        c2, c3 = _split_u64(offset)
        c2 = tl.zeros([BLOCK_GROUPS], dtype=tl.uint32) + c2
        c3 = tl.zeros([BLOCK_GROUPS], dtype=tl.uint32) + c3
        r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
        z = tl.where(lane[None, :] == 0, z0[:, None],
                     tl.where(lane[None, :] == 1, z1[:, None],
                              tl.where(lane[None, :] == 2, z2[:, None], z3[:, None])))
        x_prev = x_prev + noise_coef * z

    x_prev = tl.where(valid_step, x_prev, _NAN)
    tl.store(out_ptr + oo, x_prev.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        x0 = tl.where(valid_step, x0, _NAN)
        tl.store(x0_ptr + op, x0.to(x0_ptr.dtype.element_ty), mask=mask)


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


# c10::ScalarType names, so messages read exactly like the C++ op's.
_C10_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _dtype_str(dtype: torch.dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype))


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
              noise, rng_state, temperature, out, pred_x0_out) -> dict:
    """Checks every argument like make_ddim_step_params and returns the kernel's option constants."""
    if x.dim() < 1:
        raise ValueError("ddim_step: x must have a batch dimension, got a 0-dim tensor")
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"ddim_step: x may have at most {_MAX_DIMS} dims, got {x.dim()}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"ddim_step: x must be float32, float16 or bfloat16, got {_dtype_str(x.dtype)}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"ddim_step (Triton kernel): x must be a CUDA tensor, got {x.device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    batch = x.shape[0]

    if model_output.device != x.device:
        raise ValueError(f"ddim_step: model_output must be on x's device {x.device}, got {model_output.device}")
    if model_output.dtype != x.dtype:
        raise TypeError(f"ddim_step: model_output must have x's dtype {_dtype_str(x.dtype)}, "
                        f"got {_dtype_str(model_output.dtype)} (ddim_fast.ops.ddim_step casts for you)")
    if model_output.dim() != x.dim() or model_output.shape[1:] != x.shape[1:]:
        raise ValueError("ddim_step: model_output must be [B, ...] or [2B, ...] with x's trailing shape "
                         f"{_shape_str(x.shape[1:])}, got {_shape_str(model_output.shape)}")
    guided = guidance_scale is not None
    if guided:
        if model_output.shape[0] != 2 * batch:
            raise ValueError("ddim_step: with guidance_scale, model_output must stack [uncond, cond] along "
                             f"dim 0: expected batch {2 * batch}, got {model_output.shape[0]}")
        uncond, cond = model_output[:batch], model_output[batch:]
    else:
        if model_output.shape[0] != batch:
            raise ValueError(f"ddim_step: model_output batch must equal x's batch {batch} (or be {2 * batch} "
                             f"with guidance_scale set), got {model_output.shape[0]}")
        uncond, cond = model_output, None

    if table.device != x.device:
        raise ValueError(f"ddim_step: table must be on x's device {x.device}, got {table.device} "
                         "(build it with ddim_fast.schedule ... .to(device))")
    if table.dtype != torch.float32:
        raise TypeError(f"ddim_step: table must be float32, got {_dtype_str(table.dtype)}")
    if not (table.dim() == 2 and table.shape[1] == _schedule.TABLE_COLUMNS and table.is_contiguous()):
        raise ValueError(f"ddim_step: table must be a contiguous [num_steps, {_schedule.TABLE_COLUMNS}] tensor, "
                         f"got {_shape_str(table.shape)}")
    if table.shape[0] == 0:
        raise ValueError("ddim_step: table has no rows")
    if step.device != x.device:
        raise ValueError(f"ddim_step: step must be on x's device {x.device}, got {step.device}")
    if step.dtype != torch.int64:
        raise TypeError(f"ddim_step: step must be an int64 tensor, got {_dtype_str(step.dtype)}")
    if step.numel() != 1:
        raise ValueError(f"ddim_step: step must hold exactly one index, got {step.numel()} elements")

    if prediction_type not in _PREDICTIONS:
        raise ValueError("ddim_step: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got "
                         f"'{prediction_type}'")

    if clip_range is not None and x0_threshold is not None:
        raise ValueError("ddim_step: give clip_range or x0_threshold, not both")
    clamp = _CLAMP_NONE
    if clip_range is not None:
        if not clip_range > 0:
            raise ValueError(f"ddim_step: clip_range must be > 0, got {_num_str(clip_range)}")
        clamp = _CLAMP_STATIC
    if x0_threshold is not None:
        if x0_threshold.device != x.device:
            raise ValueError(f"ddim_step: x0_threshold must be on x's device {x.device}, got {x0_threshold.device}")
        if x0_threshold.dtype != torch.float32:
            raise TypeError(f"ddim_step: x0_threshold must be float32, got {_dtype_str(x0_threshold.dtype)}")
        if not (x0_threshold.dim() == 1 and x0_threshold.shape[0] == batch and x0_threshold.is_contiguous()):
            raise ValueError(f"ddim_step: x0_threshold must be a contiguous [B] = [{batch}] tensor, got "
                             f"{_shape_str(x0_threshold.shape)}")
        clamp = _CLAMP_DYNAMIC

    if noise is not None and rng_state is not None:
        raise ValueError("ddim_step: give noise or rng_state, not both")
    noise_mode = _NOISE_NONE
    if noise is not None:
        _check_like_x(x, noise, "noise")
        noise_mode = _NOISE_TENSOR
    if rng_state is not None:
        if rng_state.device != x.device:
            raise ValueError(f"ddim_step: rng_state must be on x's device {x.device}, got {rng_state.device}")
        if rng_state.dtype != torch.int64:
            raise TypeError("ddim_step: rng_state must be int64 [seed, offset], "
                            f"got {_dtype_str(rng_state.dtype)}")
        if not (rng_state.dim() == 1 and rng_state.shape[0] == 2 and rng_state.is_contiguous()):
            raise ValueError("ddim_step: rng_state must be a contiguous int64 tensor [seed, offset], got shape "
                             f"{_shape_str(rng_state.shape)}")
        noise_mode = _NOISE_PHILOX
    if not math.isfinite(temperature):
        raise ValueError(f"ddim_step: temperature must be finite, got {_num_str(temperature)}")

    _check_written(x, out, "out", model_output, noise)
    if pred_x0_out is not None:
        _check_written(x, pred_x0_out, "pred_x0_out", model_output, noise)
        if _overlap_status(pred_x0_out, out) != _OVERLAP_NO:
            raise ValueError("ddim_step: pred_x0_out overlaps out")
    return dict(uncond=uncond, cond=cond, guided=guided, clamp=clamp, noise_mode=noise_mode,
                prediction=_PREDICTIONS[prediction_type])


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
    """(BLOCK_GROUPS, num_warps). The interpreter pays per program, not per element: big fixed blocks."""
    if _interpreting():
        return 1024, 4
    if not contiguous:
        # Six int64 index -> offset decompositions per element: 512-group blocks need 255 registers and
        # spill on sm_90 (offline ptxas -v); 128 groups on 4 warps stay spill-free.
        return 128, 4
    if numel < (1 << 16):
        # 256 elements: enough programs to spread small latents over the SMs. 128 groups on 4 warps
        # spilled 4 B on sm_80 (fp16/bf16, sizes not a multiple of 16, every option on: ptxas held it to
        # 40 registers for occupancy); 64 groups compile clean on sm_80 and sm_90 (offline ptxas -v).
        return 64, 4
    if numel < (1 << 22):
        return 256, 4
    return 512, 8


def run_ddim_step(x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
         use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out) -> None:
    v = _validate(x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
                  noise, rng_state, temperature, out, pred_x0_out)
    numel = x.numel()
    if numel == 0:
        return
    uncond, cond = v["uncond"], v["cond"]
    # Kernel arguments in the order x, uncond, cond, noise, out, pred_x0; absent ones stand in as x
    # (their pointers are never dereferenced: the constexpr options remove those loads/stores).
    args = [x, uncond, cond if cond is not None else x, noise if noise is not None else x, out,
            pred_x0_out if pred_x0_out is not None else out]
    contiguous = all(a.is_contiguous() for a in args)
    sizes, strides = _collapse(x.shape, [a.stride() for a in args])
    write_back = []
    if not contiguous and len(sizes) > _KERNEL_DIMS:
        # More strided dims than the kernel indexes: contiguous copies in, contiguous temporaries out.
        args[:4] = [a.contiguous() for a in args[:4]]
        for k in ((4, 5) if pred_x0_out is not None else (4,)):
            if not args[k].is_contiguous():
                tmp = torch.empty(x.shape, dtype=x.dtype, device=x.device)
                write_back.append((args[k], tmp))
                args[k] = tmp
        if pred_x0_out is None:
            args[5] = args[4]  # never written (WRITE_X0 is False)
        contiguous = True
    if not contiguous:
        pad = _KERNEL_DIMS - len(sizes)
        sizes = [1] * pad + sizes
        strides = [[0] * pad + st for st in strides]
    else:
        sizes = [1] * _KERNEL_DIMS
        strides = [[0] * _KERNEL_DIMS for _ in args]

    block_groups, num_warps = _launch_config(numel, contiguous)
    grid = (triton.cdiv(numel, _GROUP * block_groups),)
    sample_numel = numel // x.shape[0]
    # Triton launches on the current device's stream: make that x's device (a no-op when it already is).
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _ddim_step_kernel[grid](
            *args, table, step, rng_state if rng_state is not None else step,
            x0_threshold if x0_threshold is not None else table,
            numel, sample_numel, table.shape[0],
            sizes[1], sizes[2], sizes[3],
            *[s for st in strides for s in st],
            1.0 if guidance_scale is None else float(guidance_scale),
            1.0 if clip_range is None else float(clip_range),
            float(temperature),
            PREDICTION=v["prediction"], GUIDED=v["guided"], CLAMP=v["clamp"],
            USE_CLIPPED=bool(use_clipped_model_output), NOISE=v["noise_mode"],
            WRITE_X0=pred_x0_out is not None, CONTIGUOUS=contiguous, BLOCK_GROUPS=block_groups,
            num_warps=num_warps,
        )
    for dst, tmp in write_back:
        dst.copy_(tmp)


# ----------------------------------------------------------------------------------------------------
# The ops (schemas in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls run_ddim_step)
# ----------------------------------------------------------------------------------------------------

ddim_step_triton = torch.ops.ddim_fast.ddim_step_triton
ddim_step_triton_out = torch.ops.ddim_fast.ddim_step_triton_out
