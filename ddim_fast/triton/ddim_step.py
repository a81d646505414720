"""Triton kernel of the fused DDIM step, with the same semantics as the C++ ``ddim_fast::ddim_step`` op.

Two ops (schemas in csrc/ops.cpp beside the C++ ones; kernels and fake kernels registered by
ddim_fast/_library.py, which imports this module on their first call), called by
``ddim_fast.ops.ddim_step(..., backend="triton")`` with the positional arguments of the C++ schema:

* ``ddim_fast::ddim_step_triton(x, model_output, table, row, guidance_scale, prediction_type, clip_range,
  x0_threshold, use_clipped_model_output, noise, rng_state, temperature, return_pred_x0) -> (x_prev, pred_x0)``
* ``ddim_fast::ddim_step_triton_out(..., temperature, out, pred_x0_out) -> None`` (writes out / pred_x0_out)

Semantics shared with the C++ kernels:
* all math in fp32 whatever the storage dtype (fp32, fp16, bf16);
* the row index and that table row are read on the device (``row`` is a tensor: bump it in place to
  advance, no host sync); a row index outside the table reads nothing: every output element becomes NaN;
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

Argument checks: the step's rules live in one place, csrc/ddim_step_args.cpp; the launcher calls them through
the ``ddim_fast::ddim_step_check`` op (same messages as the C++ kernels, by construction), which also decides
the memory-order path. The functional op skips the overlap checks of the outputs it just allocated (they
could not fail). Everything that follows from shapes, strides, dtype and options (collapsed sizes/strides,
noise mode, block size, grid) is a cached _Plan.

On CPU tensors the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported) with a fixed block size; on CUDA the block size and warp count are chosen by problem size.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import ddim_fast  # noqa: F401  (registers torch.ops.ddim_fast.*)
from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

from ddim_fast.triton import PlanCache

__all__ = ["ddim_step_triton", "ddim_step_triton_out", "run_ddim_step"]

_KERNEL_DIMS = 4  # logical dims the kernel indexes after collapsing
# PREDICTION and CLAMP constexprs: the codes ddim_step_check returns (step_math.h Prediction, X0Clamp).
_PREDICTIONS = {"epsilon": 0, "v_prediction": 1, "sample": 2}
_CLAMP_NONE, _CLAMP_STATIC, _CLAMP_DYNAMIC = 0, 1, 2
# NOISE constexpr: none, a noise tensor, Philox with one stream over the tensor (rng_state [2]), Philox with
# one stream per batch row (rng_state [B, 2]) when sample_numel % 4 == 0, and when it is not (padded groups).
_NOISE_NONE, _NOISE_TENSOR, _NOISE_PHILOX, _NOISE_PHILOX_ROWS, _NOISE_PHILOX_ROWS_PADDED = 0, 1, 2, 3, 4

# Elements per Philox call: the kernel works on [groups, 4] tiles so one call serves 4 elements.
_GROUP = 4
# What an out-of-range row index writes is a quiet NaN built from its bit pattern inside the kernel (_quiet_nan).
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
    table_ptr, table_row_ptr, rng_ptr, thr_ptr,
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

    # The table row (the op's `row`), read on the device. An out-of-range index reads row 0 (always present)
    # and the outputs are forced to NaN below, so nothing is read out of bounds.
    table_row = tl.load(table_row_ptr)
    valid_row = (table_row >= 0) & (table_row < num_rows)
    coefs = table_ptr + tl.where(valid_row, table_row, 0) * 8
    sqrt_alpha = tl.load(coefs + 1)
    sqrt_one_minus_alpha = tl.load(coefs + 2)
    sqrt_alpha_prev = tl.load(coefs + 3)
    dir_coef = tl.load(coefs + 4)
    noise_coef = tl.load(coefs + 5) * temperature

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
        # philox.h: key = (lo, hi)(seed), counter = (lo, hi)(g), (lo, hi)(offset + table_row), for group g of a
        # stream. NOISE 2: one stream over the tensor, tile row r holds its groups r * GROUPS_PER_ROW + h.
        # NOISE 3/4: one stream per batch row (rng_state [B, 2]), group gid of the tile is group g of stream
        # `stream` (3: sample_numel % 4 == 0, the padded and the global group spaces coincide; 4: padded).
        z = tl.zeros([ROWS, VEC], dtype=tl.float32)
        if NOISE == 2:
            seed0 = tl.load(rng_ptr)
            offset0 = tl.load(rng_ptr + 1) + table_row
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
                offset = tl.load(rng_ptr + 2 * stream_h + 1, mask=live, other=0) + table_row
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

    x_prev = tl.where(valid_row, x_prev, _quiet_nan(x_prev))
    tl.store(out_ptr + oo, x_prev.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        x0 = tl.where(valid_row, x0, _quiet_nan(x0))
        tl.store(x0_ptr + op, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# Whether @triton.jit built an interpreter function (TRITON_INTERPRET=1 when triton was imported): then the
# kernel runs on CPU tensors, with the interpreter's launch configuration.
_INTERPRETED = isinstance(_ddim_step_kernel, _InterpretedFunction)


# ----------------------------------------------------------------------------------------------------
# Validation: csrc/ddim_step_args.cpp, the one place the step's argument rules live
# ----------------------------------------------------------------------------------------------------

# Raises what the C++ step op raises for the same arguments (same messages), else returns
# [prediction, clamp, noise kind (0 none, 1 tensor, 2 Philox), rng_per_row, flat].
_CHECK = torch.ops.ddim_fast.ddim_step_check.default
_NOISE_OF_KIND = (_NOISE_NONE, _NOISE_TENSOR, _NOISE_PHILOX)


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


class _Plan:
    """Everything about a launch that follows from shapes, strides, dtype and options: computed once per
    such key (cached), so a repeated step only validates, looks the plan up and launches."""

    __slots__ = ("contiguous", "copy_in", "sizes", "strides", "block_groups", "num_warps", "grid", "noise")

    def __init__(self, shape, arg_strides, noise_mode, per_row, flat):
        numel = math.prod(shape)
        sample_numel = numel // shape[0] if shape[0] else 0
        philox = noise_mode == _NOISE_PHILOX
        # Memory order (DdimStepParams::flat, decided by the C++ checks): row-major, or one dense layout shared
        # by every argument (channels_last) where the memory position means what the options need.
        self.contiguous = bool(flat)
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


_PLANS = PlanCache(512)  # distinct (shape, layout, options) keys kept; a loop uses one or two
_STRIDE = torch.Tensor.stride


def _plan(shape, arg_strides, dtype, noise_mode, per_row, flat) -> _Plan:
    key = (shape, arg_strides, dtype, noise_mode, per_row, flat)
    plan = _PLANS.get(key)  # the hit, inline: this runs on every eager step
    if plan is None:
        plan = _PLANS.get_or_make(key, lambda: _Plan(tuple(int(n) for n in shape), arg_strides, noise_mode,
                                                     per_row, flat))
    return plan


def run_ddim_step(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                  use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out,
                  fresh_outputs: bool = False) -> None:
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"ddim_step (Triton kernel): x must be a CUDA tensor, got {x.device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    # Fresh outputs (the functional op's empty_like(x)) overlap nothing: the check skips them.
    prediction, clamp, noise_kind, per_row, flat = _CHECK(
        x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
        use_clipped_model_output, noise, rng_state, temperature, None if fresh_outputs else out,
        None if fresh_outputs else pred_x0_out, False)
    numel = x.numel()
    if numel == 0:
        return
    batch = x.shape[0]
    if guidance_scale is not None:
        uncond, cond = model_output[:batch], model_output[batch:]
    else:
        uncond, cond = model_output, None
    noise_mode = _NOISE_OF_KIND[noise_kind]
    # Kernel arguments in the order x, uncond, cond, noise, out, pred_x0; absent ones stand in as x
    # (their pointers are never dereferenced: the constexpr options remove those loads/stores).
    args = [x, uncond, x if cond is None else cond, x if noise is None else noise, out,
            out if pred_x0_out is None else pred_x0_out]
    plan = _plan(x.shape, tuple(map(_STRIDE, args)), x.dtype, noise_mode, bool(per_row), flat)
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

    pointers = (*args, table, row, row if rng_state is None else rng_state,
                table if x0_threshold is None else x0_threshold)
    params = (*pointers, numel, numel // x.shape[0], table.shape[0], plan.sizes[1], plan.sizes[2], plan.sizes[3],
              *plan.strides, 1.0 if guidance_scale is None else float(guidance_scale),
              1.0 if clip_range is None else float(clip_range), float(temperature))
    constexprs = (prediction, cond is not None, clamp, bool(use_clipped_model_output), plan.noise,
                  pred_x0_out is not None, plan.contiguous, plan.block_groups)
    # Triton launches on the current device's stream: make that x's device when it is not already.
    device = x.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            _launch(plan, params, constexprs, pointers, device)
    else:
        _launch(plan, params, constexprs, pointers, device)
    for dst, tmp in write_back:
        dst.copy_(tmp)


# The kernel's constexpr parameters, in its signature order (checked below against the kernel itself).
_CONSTEXPR_NAMES = ("PREDICTION", "GUIDED", "CLAMP", "USE_CLIPPED", "NOISE", "WRITE_X0", "CONTIGUOUS", "BLOCK_GROUPS")
if tuple(_ddim_step_kernel.arg_names[-len(_CONSTEXPR_NAMES):]) != _CONSTEXPR_NAMES:  # pragma: no cover
    raise ImportError("ddim_fast.triton.ddim_step: _CONSTEXPR_NAMES no longer matches the kernel's signature")

# Compiled kernels of earlier launches, keyed by everything Triton's JIT specializes a launch on. Triton's own
# `kernel[grid](...)` binds and specializes all 43 arguments in Python on every call (~100 us per eager step on
# the H200, issue 19); a launch whose specialization was seen before calls the CompiledKernel Triton returned for
# it, with the same arguments in the same order, exactly what JITFunction.run does after its cache lookup. The
# key: the plan (shape, strides, dtype, noise mode, layout path: it fixes every int argument, hence their
# ==1 / %16 / 32-bit specializations), the table's row count (the one int argument not in the plan), the
# constexprs, the 16-byte alignment of each pointer (the only thing Triton specializes pointers on) and the
# device. Float arguments are never specialized. The first launch of a key goes through the JIT (compile,
# globals check, launch); the interpreter returns no CompiledKernel, so CPU runs always take that path.
_LAUNCHERS: dict = {}
_LAUNCHERS_MAX = 256
_DATA_PTR = torch.Tensor.data_ptr
_LOW_FOUR_BITS = (15).__and__


def _launch(plan: "_Plan", params: tuple, constexprs: tuple, pointers: tuple, device: torch.device) -> None:
    # The pointers' low four bits (0: 16-byte aligned), as bytes built in C: finer than Triton's aligned / not
    # split, which only costs a JIT pass for each other misalignment seen.
    key = (plan, constexprs, params[len(pointers) + 2], bytes(map(_LOW_FOUR_BITS, map(_DATA_PTR, pointers))),
           device.index)
    compiled = _LAUNCHERS.get(key)
    if compiled is not None:
        compiled[plan.grid](*params, *constexprs)
        return
    compiled = _ddim_step_kernel[plan.grid](*params, **dict(zip(_CONSTEXPR_NAMES, constexprs)),
                                            num_warps=plan.num_warps)
    if compiled is not None and hasattr(compiled, "function"):  # a CompiledKernel (not the interpreter's None)
        if len(_LAUNCHERS) >= _LAUNCHERS_MAX:
            _LAUNCHERS.clear()
        _LAUNCHERS[key] = compiled


# ----------------------------------------------------------------------------------------------------
# The ops (schemas in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls run_ddim_step)
# ----------------------------------------------------------------------------------------------------

ddim_step_triton = torch.ops.ddim_fast.ddim_step_triton
ddim_step_triton_out = torch.ops.ddim_fast.ddim_step_triton_out
