#!/usr/bin/env python3
"""Offline GPU compile check of the Triton kernels in ddim_fast/triton (the Triton twin of nvcc_check.sh).

No GPU is needed: ``triton.compile`` builds PTX and a cubin for a ``GPUTarget`` on any machine, with the
ptxas bundled in the triton wheel. For sm_90 and sm_80 this script compiles the GPU variants the launchers
produce and fails on any compile error, any register spill, shared memory / registers beyond the target's
limits, or a missing code property that decides speed (read from each compile's PTX and TTGIR):

* widest global load / store: 16 bytes on the contiguous SD paths of the step kernel (every tensor
  contiguous and 16-byte aligned, element count a multiple of 16; the CUDA kernel's LDG.E.128 / STG.E.128
  twin is checked by nvcc_check.sh) and on every SD attention launch at head dims 40/64/80/160; without a
  mask every attention load (ld.global and cp.async) must be 16 bytes;
* ``cp.async`` (or TMA) copies inside the self-attention key loop (the loop's PTX body, not the prologue);
* no duplicated score computation: the ex2 count per thread equals the tile's share, M * N / threads for
  each [M, N] exponential of the TTGIR plus the rows a thread holds for each row rescale (a 64-row tile on
  8 warps along the rows, warpsPerCTA [8, 1], computes every score twice);
* MMA instructions (mma.sync / wgmma) for fp16/bf16 attention;
* registers and the occupancy they allow: the step kernel must leave room for 16 warps per SM; each
  fp16/bf16 attention tile class has a register budget (``ATTENTION_REGISTER_BUDGETS``) that keeps its
  blocks per SM (``--suggest-budgets`` prints the table after an intended change).

Which variants:
* ``ddim_step._ddim_step_kernel``: fp32/fp16/bf16 x every (BLOCK_GROUPS, num_warps) the GPU
  ``_launch_config`` returns over a sweep of element counts (contiguous and strided; strided layouts are
  collapsed with the launcher's ``_collapse``) x the option constexprs. Option rows: each prediction type
  with everything else at its most expensive (guidance, dynamic thresholding + re-derived eps, Philox
  noise, pred_x0 written), each other option value with the rest most expensive, and everything off. SD
  layouts (contiguous sizes that are multiples of 16, channels_last) get every row; the other argument
  specializations (1 element, sizes not multiples of 16, int64 sizes, misaligned pointers, odd strides)
  get the most expensive row.
* ``attention._attention_kernel``: the tiles the GPU ``launch_config`` picks for SD1.5/SD2 shapes (8 heads,
  head dim 40/64/80/160, Lq 4096/1024/256/64, Lk 77 and Lk = Lq, CFG batches of 1 and 4 images) on an
  H100/H200 (132 SMs, sm_90 tables) and an A100 (108 SMs, sm_80 tables) x fp16/bf16/fp32 x no mask / bool /
  additive mask, for ldm's 3-D contiguous layout ([B*H, 1, Lk] key-padding mask) and diffusers' 4-D
  transposed view ([B, H, Lq, Lk] mask), packed by the launcher's own ``kernel_arguments``.

Each launch is specialized exactly as Triton's JIT specializes it (its own binder and argument packing:
integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get divisibility
hints), so the compiled code is what the GPU would run. Identical (signature, constants, hints, options)
compile once (and must meet every requirement of every launch that maps to them); so do attention
launches that differ only in the hint of ``num_m_blocks`` (it only splits the program id). Triton 3.6's
``CompiledKernel`` learns ``n_regs``/``n_spills`` only when it loads the cubin on a device and its metadata
has no register count, so registers and spills come from ptxas -v: the log of Triton's own ptxas run
(``knobs.nvidia.dump_ptxas_log``), or, for a kernel already in Triton's cache, numbers saved beside it by
an earlier run, or a rerun of the wheel's ptxas with Triton's flags, checked to reproduce Triton's cubin
byte for byte. Compiles (PTX and TTGIR included) are cached by Triton (``~/.triton/cache`` or
``$TRITON_CACHE_DIR``): a warm run takes seconds.

Usage: ``python scripts/triton_aot_check.py [--quick] [--arch 90,80] [--kernel NAME] [--jobs N] [--verbose]
[--json FILE] [--suggest-budgets]``. ``--json FILE`` writes one row per compiled configuration: kernel,
arch, dtype, shape (the launches that map to it), config (constexprs, warps, stages), regs, spills,
shared, occupancy (blocks/warps per SM and what limits them), max_global_load_bytes,
max_global_store_bytes, load/store width histograms, cp_async (and in the loop, and widths), tma, ex2
and the tile's share, mma, the requirements, status and problems.
Exit status: 0 all clean (or "skipped" when triton is missing), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The check compiles real GPU code: the interpreter must be off before triton is imported (the test suite
# sets TRITON_INTERPRET=1 for everything else).
os.environ.pop("TRITON_INTERPRET", None)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("triton-aot-check")
TAG = "[triton-aot-check]"

# SM counts the attention launcher's grid-filling rule sees on each target (H100 SXM / H200; A100 SXM): its
# query-tile shrink loop depends on them (and its tile tables on the target's compute capability).
SM_COUNTS = {90: (132,), 80: (108,)}
# Per-block shared memory limits (opt-in maximum): a kernel above them fails to launch.
MAX_SHARED = {90: 232448, 80: 166912}
REGISTERS_PER_SM = 65536
# The DDIM step is a memory-bound stream: every compile must leave room for 16 resident warps per SM (25%
# occupancy; today's variants allow 20-64), the latency hiding a streaming kernel needs to keep DRAM busy.
STEP_EXPECT = dict(min_warps_per_sm=16)
# Attention register budgets per fp16/bf16 tile class (arch, "half", "single" tile or key "loop",
# "masked" or "none", BLOCK_D, num_warps): the registers every compile of the class may use. Each is the
# measured maximum plus at most ~10%, and never more than keeps today's blocks per SM: growing past it loses
# occupancy (or, at one block per SM, heads for the spill the ptxas cap makes). Regenerate after an intended
# change with `python scripts/triton_aot_check.py --kernel attention --suggest-budgets`.
ATTENTION_REGISTER_BUDGETS = {  # measured maximum -> budget
    (80, 'half', 'loop', 'masked', 64, 4): 208,  # 186
    (80, 'half', 'loop', 'masked', 64, 8): 208,  # 188
    (80, 'half', 'loop', 'masked', 128, 4): 168,  # 147
    (80, 'half', 'loop', 'masked', 128, 8): 208,  # 183
    (80, 'half', 'loop', 'masked', 256, 4): 200,  # 182
    (80, 'half', 'loop', 'none', 64, 4): 168,  # 158
    (80, 'half', 'loop', 'none', 64, 8): 176,  # 160
    (80, 'half', 'loop', 'none', 128, 4): 128,  # 128
    (80, 'half', 'loop', 'none', 256, 8): 128,  # 128
    (80, 'half', 'single', 'masked', 64, 4): 255,  # 255
    (80, 'half', 'single', 'masked', 64, 8): 248,  # 224
    (80, 'half', 'single', 'masked', 128, 4): 96,  # 96
    (80, 'half', 'single', 'masked', 128, 8): 112,  # 96
    (80, 'half', 'single', 'masked', 256, 8): 176,  # 158
    (80, 'half', 'single', 'none', 64, 4): 200,  # 180
    (80, 'half', 'single', 'none', 64, 8): 184,  # 168
    (80, 'half', 'single', 'none', 128, 4): 96,  # 90
    (80, 'half', 'single', 'none', 128, 8): 80,  # 80
    (80, 'half', 'single', 'none', 256, 8): 160,  # 144
    (90, 'half', 'loop', 'masked', 64, 4): 160,  # 144
    (90, 'half', 'loop', 'masked', 64, 8): 160,  # 140
    (90, 'half', 'loop', 'masked', 128, 4): 216,  # 195
    (90, 'half', 'loop', 'masked', 128, 8): 216,  # 192
    (90, 'half', 'loop', 'masked', 256, 4): 208,  # 186
    (90, 'half', 'loop', 'none', 64, 4): 144,  # 130
    (90, 'half', 'loop', 'none', 64, 8): 128,  # 114
    (90, 'half', 'loop', 'none', 128, 4): 200,  # 176
    (90, 'half', 'loop', 'none', 128, 8): 192,  # 169
    (90, 'half', 'loop', 'none', 256, 8): 160,  # 140
    (90, 'half', 'single', 'masked', 64, 4): 168,  # 167
    (90, 'half', 'single', 'masked', 64, 8): 168,  # 152
    (90, 'half', 'single', 'masked', 128, 4): 120,  # 106
    (90, 'half', 'single', 'masked', 128, 8): 104,  # 91
    (90, 'half', 'single', 'masked', 256, 8): 176,  # 159
    (90, 'half', 'single', 'none', 64, 4): 160,  # 143
    (90, 'half', 'single', 'none', 64, 8): 128,  # 124
    (90, 'half', 'single', 'none', 128, 4): 120,  # 106
    (90, 'half', 'single', 'none', 128, 8): 80,  # 79
    (90, 'half', 'single', 'none', 256, 8): 168,  # 150
}
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass
class Variant:
    """One launch the check compiles: the kernel, the target, its arguments as the launcher passes them."""

    kernel: str  # "ddim_step" | "attention"
    arch: int  # 90 | 80
    group: str  # the launch configuration, one summary row per group
    label: str  # this launch within its group
    args: list  # positional kernel arguments (meta tensors / pointer stand-ins, ints, floats)
    kwargs: dict  # constexpr keywords + num_warps / num_stages
    users: list = dataclasses.field(default_factory=list)  # the shapes that map to this compile
    # Required code properties (property_problems): load_bytes / store_bytes (widest global access at
    # least), all_loads_bytes (every global load and cp.async at least), cp_async_in_loop, ex2_share
    # (ex2 count = the tile's share), mma, min_warps_per_sm.
    expect: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    regs: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""
    note: str = ""
    props: dict = dataclasses.field(default_factory=dict)  # analyze_ptx + ex2_share + occupancy


class _Pointer:
    """A tensor stand-in for the JIT's specializer: a dtype and a data pointer (alignment is all it reads)."""

    def __init__(self, dtype, byte_offset: int):
        self.dtype = dtype
        self._ptr = 1 << 20 | byte_offset

    def data_ptr(self) -> int:
        return self._ptr


# ----------------------------------------------------------------------------------------------------
# ddim_step variants
# ----------------------------------------------------------------------------------------------------

# The launcher's argument order (ddim_step._run); checked against the kernel's parameter list so a change
# there stops this check with a clear message instead of compiling something the launcher never does.
_STEP_TENSOR_ARGS = ["x_ptr", "mu_ptr", "mc_ptr", "noise_ptr", "out_ptr", "x0_ptr"]


def _step_option_rows(step, mode: str) -> list[dict]:
    """Option constexpr rows. "all": each prediction type with everything else at its most expensive,
    every other option value with the rest most expensive, and everything off; "heavy": the first of
    those; "quick": the first and everything off."""
    heavy = dict(GUIDED=True, CLAMP=step._CLAMP_DYNAMIC, USE_CLIPPED=True, NOISE=step._NOISE_PHILOX, WRITE_X0=True)
    predictions = sorted(step._PREDICTIONS.values())
    rows = [dict(heavy, PREDICTION=p) for p in predictions]
    all_off = dict(PREDICTION=predictions[0], GUIDED=False, CLAMP=step._CLAMP_NONE, USE_CLIPPED=False,
                   NOISE=step._NOISE_NONE, WRITE_X0=False)
    if mode == "heavy":  # the most expensive row, and its per-row Philox twin (padded groups on odd sizes)
        return [rows[0], dict(rows[0], PER_ROW=True)]
    if mode == "quick":
        return [rows[0], all_off]
    if mode == "all":
        base = dict(heavy, PREDICTION=predictions[0])
        alternatives = dict(GUIDED=[False], CLAMP=[step._CLAMP_NONE, step._CLAMP_STATIC], USE_CLIPPED=[False],
                            NOISE=[step._NOISE_NONE, step._NOISE_TENSOR], WRITE_X0=[False])
        for name, values in alternatives.items():
            rows += [dict(base, **{name: value}) for value in values]
        # One Philox stream per sample (rng_state [B, 2]): the launcher's plan picks NOISE 3 or 4 from it.
        rows.append(dict(base, PER_ROW=True))
        rows.append(all_off)
    return rows


def _options_label(step, row: dict) -> str:
    pred = {v: k for k, v in step._PREDICTIONS.items()}[row["PREDICTION"]]
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(pred, pred)
    clamp = {step._CLAMP_NONE: "noclamp", step._CLAMP_STATIC: "clip", step._CLAMP_DYNAMIC: "dynthr"}[row["CLAMP"]]
    if row["CLAMP"] != step._CLAMP_NONE and row["USE_CLIPPED"]:
        clamp += "+eps"
    noise = {step._NOISE_NONE: "nonoise", step._NOISE_TENSOR: "noise", step._NOISE_PHILOX: "philox"}[row["NOISE"]]
    if row.get("PER_ROW"):
        noise += "-per-row"
    return ",".join([pred, "cfg" if row["GUIDED"] else "nocfg", clamp, noise, "x0" if row["WRITE_X0"] else "nox0"])


def _numel_sweep() -> list[int]:
    """Element counts around every power of two up to 2^34 (past the int64 index switch at 2^31)."""
    return sorted({n for k in range(35) for n in (2**k - 1, 2**k, 2**k + 1, 3 * 2**k) if n >= 1})


def _int_class(backend, value: int) -> tuple:
    """How Triton's JIT specializes an integer argument: ("constexpr", 1), ("i32", "D"), ("i64", ""), ..."""
    from triton._C.libtriton import native_specialize_impl

    return tuple(native_specialize_impl(type(backend), value, False, True, True)[:2])


def _step_layouts(step, torch, dtype, backend):
    """(label, tensors x, uncond, cond, noise, out, pred_x0, sample_numel, tier) per argument layout.
    tier "sd" gets every option row; "edge" the most expensive rows only."""
    meta = dict(device="meta", dtype=dtype)
    layouts = []
    # Contiguous: one representative element count per (launch config, integer specialization).
    seen = {}
    for numel in _numel_sweep():
        key = (step._launch_config(numel, True), _int_class(backend, numel))
        seen.setdefault(key, numel)
    for (cfg, cls), numel in sorted(seen.items(), key=lambda kv: kv[1]):
        x = torch.empty(1, numel, **meta)  # batch 1: sample_numel = numel
        t = [x, torch.empty(1, numel, **meta), torch.empty(1, numel, **meta), torch.empty(1, numel, **meta),
             torch.empty(1, numel, **meta), torch.empty(1, numel, **meta)]
        tier = "sd" if cls == ("i32", "D") else "edge"
        layouts.append((f"contig numel={numel}", t, numel, tier, None))
    # Contiguous SD latent with misaligned x and model output (a user's sliced views): no alignment hints.
    latent = (2, 4, 64, 64)
    numel = 2 * 4 * 64 * 64
    t = [torch.empty(latent, **meta) for _ in range(6)]
    layouts.append(("contig misaligned", t, numel // 2, "edge", (0, 1, 2)))
    # channels_last latents (a channels_last UNet): the SD strided case.
    mo = torch.empty((4,) + latent[1:], **meta).to(memory_format=torch.channels_last)
    t = [torch.empty(latent, **meta).to(memory_format=torch.channels_last), mo[:2], mo[2:],
         torch.empty(latent, **meta).to(memory_format=torch.channels_last),
         torch.empty(latent, **meta).to(memory_format=torch.channels_last),
         torch.empty(latent, **meta).to(memory_format=torch.channels_last)]
    layouts.append(("strided channels_last", t, numel // 2, "sd", None))
    # Odd strides (a slice of a wider buffer) next to contiguous tensors: no stride is 1 or a multiple of 16.
    odd = torch.empty(2, 4, 64, 67, **meta)[..., 1:65]
    t = [odd, torch.empty(latent, **meta), torch.empty(latent, **meta), torch.empty(latent, **meta),
         torch.empty(2, 4, 64, 67, **meta)[..., 1:65], torch.empty(latent, **meta)]
    layouts.append(("strided odd", t, numel // 2, "edge", None))
    # Over 2^31 elements, strided: int64 sizes and strides.
    big = (3, 4, 2**15, 2**15)
    wide = torch.empty(3, 4, 2**15, 2**15 + 3, **meta)[..., :2**15]
    t = [wide] + [torch.empty(big, **meta) for _ in range(5)]
    layouts.append(("strided int64", t, 4 * 2**30, "edge", None))
    # Any strided launch config the layouts above miss (the launcher may size strided blocks by numel):
    # a [2, n] slice of a wider buffer with that element count.
    covered = {step._launch_config(t[0].numel(), False) for _, t, _, _, _ in layouts if not t[0].is_contiguous()}
    for numel in _numel_sweep():
        cfg = step._launch_config(numel, False)
        if cfg not in covered and numel % 2 == 0:
            covered.add(cfg)
            rows = numel // 2
            t = [torch.empty(2, rows + 3, **meta)[:, :rows]] + [torch.empty(2, rows, **meta) for _ in range(5)]
            layouts.append((f"strided numel={numel}", t, rows, "sd", None))
    return layouts


def _memory_order(torch, step, tensors, row, per_row) -> bool:
    """Whether the launcher runs these (meta) tensors in memory order: the C++ rules' answer (ddim_step_check's
    `flat`), asked the way run_ddim_step asks it. Both CFG halves share model_output's strides, so the
    unconditional half stands in for model_output."""
    x, uncond, _, noise, out, pred_x0 = tensors
    meta = dict(device="meta")
    rng = None
    if row["NOISE"] == step._NOISE_PHILOX:
        rng = torch.empty((x.shape[0], 2) if per_row else (2,), dtype=torch.int64, **meta)
    thr = torch.empty(x.shape[0], dtype=torch.float32, **meta) if row["CLAMP"] == step._CLAMP_DYNAMIC else None
    clip = 1.0 if row["CLAMP"] == step._CLAMP_STATIC else None
    plan = torch.ops.ddim_fast.ddim_step_check(
        x, uncond, torch.empty(50, 8, dtype=torch.float32, **meta), torch.empty(1, dtype=torch.int64, **meta), None,
        "epsilon", clip, thr, False, noise if row["NOISE"] == step._NOISE_TENSOR else None, rng, 1.0, out,
        pred_x0 if row["WRITE_X0"] else None, False)
    return bool(plan[4])


def step_variants(arch: int, quick: bool) -> list[Variant]:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from ddim_fast.triton import ddim_step as step

    kernel = step._ddim_step_kernel
    names = kernel.arg_names
    expected_prefix = _STEP_TENSOR_ARGS + ["table_ptr", "table_row_ptr", "rng_ptr", "thr_ptr", "numel", "sample_numel",
                                           "num_rows", "size1", "size2", "size3"]
    if names[:len(expected_prefix)] != expected_prefix:
        raise RuntimeError(f"ddim_step._ddim_step_kernel parameters changed ({names}); update "
                           "scripts/triton_aot_check.py step_variants to the launcher's new argument order")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    num_rows = 50  # the table of a 50-step schedule (not a multiple of 16: the common case)
    variants = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dname = DTYPE_NAMES[str(dtype).removeprefix("torch.")]
        for layout, tensors, sample_numel, tier, misaligned in _step_layouts(step, torch, dtype, backend):
            if quick and tier != "sd":
                continue
            x = tensors[0]
            numel = x.numel()
            pointers = [_Pointer(dtype, dtype.itemsize if misaligned and i in misaligned else 0)
                        for i in range(len(tensors))]
            fp32_ptr, i64_ptr = _Pointer(torch.float32, 0), _Pointer(torch.int64, 0)
            rows = _step_option_rows(step, "quick" if quick else ("all" if tier == "sd" else "heavy"))
            for row in rows:
                # The launcher's own plan (ddim_step._plan): memory order or strided, collapsed sizes and
                # strides, the noise mode (per-row Philox: padded or not) and the launch configuration.
                per_row = bool(row.get("PER_ROW"))
                plan = step._plan(tuple(x.shape), tuple(t.stride() for t in tensors), dtype, row["NOISE"], per_row,
                                  _memory_order(torch, step, tensors, row, per_row))
                if plan.copy_in:
                    raise RuntimeError(f"{layout}: the launcher copies this layout (pick another)")
                args = [*pointers, fp32_ptr, i64_ptr, i64_ptr, fp32_ptr, numel, sample_numel, num_rows,
                        plan.sizes[1], plan.sizes[2], plan.sizes[3], *plan.strides, 7.5, 1.0, 1.0]
                # The memory-order SD path (row-major or one shared dense layout such as channels_last, 16-byte
                # aligned, an element count that is a multiple of 16): a memory-bound kernel must move 16 bytes
                # per access there, like the CUDA kernel's vector path (LDG.E.128 / STG.E.128, checked by
                # scripts/nvcc_check.sh). Per-row streams of a sample size not a multiple of 4 pad each row's
                # last group and stay element-wide.
                expect = dict(STEP_EXPECT)
                if plan.contiguous and not misaligned and tier == "sd" and plan.noise != step._NOISE_PHILOX_ROWS_PADDED:
                    expect.update(load_bytes=16, store_bytes=16)
                kwargs = {k: v for k, v in row.items() if k != "PER_ROW"}
                kwargs.update(NOISE=plan.noise, CONTIGUOUS=plan.contiguous, BLOCK_GROUPS=plan.block_groups,
                              num_warps=plan.num_warps)
                group = (f"{dname} {'memory-order' if plan.contiguous else 'strided'} BG={plan.block_groups} "
                         f"w={plan.num_warps}")
                label = f"{layout} {_options_label(step, row)}"
                variants.append(Variant("ddim_step", arch, group, label, args, kwargs, [layout], dict(expect)))
    return variants


# ----------------------------------------------------------------------------------------------------
# attention variants
# ----------------------------------------------------------------------------------------------------

_ATTN_HEADS = 8
_ATTN_HEAD_DIMS = (40, 64, 80, 160)  # SD1.5 levels 40/80/160, SD2 64
_ATTN_QUERY_LENGTHS = (4096, 1024, 256, 64)  # 512 px latents 64x64 ... 8x8
_ATTN_TEXT_TOKENS = 77
_ATTN_BATCHES = (2, 8)  # CFG of 1 and of 4 images


@contextlib.contextmanager
def _device_as(attention, arch: int, sms: int):
    """The launcher asks the device for its SM count and compute capability; answer for the target
    instead (no device here)."""
    original = attention._device_traits
    attention._device_traits = lambda device_index: (sms, arch // 10)
    try:
        yield
    finally:
        attention._device_traits = original


def _attention_tensors(torch, layout: str, batch: int, lq: int, lk: int, head_dim: int, dtype, mask_kind: str):
    """(q, k, v, out, mask) meta tensors as ldm ("ldm": contiguous [B*H, L, D], key-padding mask
    [B*H, 1, Lk]) or diffusers ("diffusers": [B, L, H, D] viewed [B, H, L, D], full mask [B, H, Lq, Lk])
    hand them to the op."""
    meta = dict(device="meta", dtype=dtype)
    heads = _ATTN_HEADS
    if layout == "ldm":
        q = torch.empty(batch * heads, lq, head_dim, **meta)
        k = torch.empty(batch * heads, lk, head_dim, **meta)
        v = torch.empty(batch * heads, lk, head_dim, **meta)
        mask_shape = (batch * heads, 1, lk)
    else:
        q = torch.empty(batch, lq, heads, head_dim, **meta).transpose(1, 2)
        k = torch.empty(batch, lk, heads, head_dim, **meta).transpose(1, 2)
        v = torch.empty(batch, lk, heads, head_dim, **meta).transpose(1, 2)
        mask_shape = (batch, heads, lq, lk)
    out = torch.empty(q.shape, **meta)
    mask = None
    if mask_kind == "bool":
        mask = torch.empty(mask_shape, device="meta", dtype=torch.bool)
    elif mask_kind == "additive":
        mask = torch.empty(mask_shape, **meta)
    return q, k, v, out, mask


def attention_budget_class(kwargs: dict, dtype, arch: int) -> tuple:
    """The register-budget class of an attention launch: (arch, dtype kind, tile kind, mask, BLOCK_D, warps)."""
    import torch

    return (arch, "fp32" if dtype == torch.float32 else "half",
            "single" if kwargs["SINGLE_TILE"] else "loop", "masked" if kwargs["MASK_KIND"] else "none",
            kwargs["BLOCK_D"], kwargs["num_warps"])


def attention_expectations(kwargs: dict, dtype, arch: int) -> dict:
    """The code properties every SD attention launch must compile to (all SD layouts are aligned: the
    launcher's ALIGN > 1): 16-byte q/k/v/out accesses (every load, when no mask adds its narrow reads),
    cp.async copies of K/V inside the self-attention key loop, no warp repeating another's scores (ex2
    per thread = the tile's share), tensor-core MMA for fp16/bf16, and the occupancy floor."""
    import torch

    expect = dict(ex2_share=True, mma=dtype != torch.float32)
    if dtype != torch.float32:  # fp32 is the exact path, not the fast one: no register budget
        # A class without a recorded budget fails (max_regs 0) and says how to record one.
        expect["max_regs"] = ATTENTION_REGISTER_BUDGETS.get(attention_budget_class(kwargs, dtype, arch), 0)
    if kwargs["ALIGN"] > 1:
        expect.update(load_bytes=16, store_bytes=16)
        if kwargs["MASK_KIND"] == 0:
            expect["all_loads_bytes"] = 16
        if not kwargs["SINGLE_TILE"]:
            expect["cp_async_in_loop"] = True
    return expect


def attention_variants(arch: int, quick: bool) -> list[Variant]:
    import torch

    from ddim_fast.triton import attention

    kernel = attention._attention_kernel
    if kernel.arg_names[:5] != ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "mask_ptr"]:
        raise RuntimeError(f"attention._attention_kernel parameters changed ({kernel.arg_names}); update "
                           "scripts/triton_aot_check.py attention_variants to the launcher's argument order")
    device = torch.device("cuda", 0)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    masks = ("none", "bool", "additive")
    layouts = ("ldm",) if quick else ("ldm", "diffusers")
    variants = []
    for sms, dtype, mask_kind, layout in itertools.product(SM_COUNTS[arch], dtypes, masks, layouts):
        dname = DTYPE_NAMES[str(dtype).removeprefix("torch.")]
        for head_dim, lq, self_attn, batch in itertools.product(_ATTN_HEAD_DIMS, _ATTN_QUERY_LENGTHS, (False, True),
                                                                _ATTN_BATCHES):
            lk = lq if self_attn else _ATTN_TEXT_TOKENS
            q, k, v, out, mask = _attention_tensors(torch, layout, batch, lq, lk, head_dim, dtype, mask_kind)
            attention._check_inputs(q, k, v, mask, head_dim ** -0.5)  # the op's own rules: launches it accepts
            batch_heads = batch * _ATTN_HEADS
            with _device_as(attention, arch, sms):
                cfg = attention.launch_config(batch_heads, lq, lk, head_dim, dtype, device, masked=mask is not None)
            # The launcher's own packing (attention.attention_triton_impl on CUDA).
            _grid, args, kwargs = attention.kernel_arguments(q, k, v, out, mask, head_dim ** -0.5, cfg)
            tiles = "1tile" if cfg["SINGLE_TILE"] else "loop"
            group = (f"{dname} mask={mask_kind} BM={cfg['BLOCK_M']} BN={cfg['BLOCK_N']} BD={cfg['BLOCK_D']} {tiles} "
                     f"w={cfg['num_warps']} s={cfg['num_stages']}")
            user = f"d{head_dim} {lq}x{lk} bh{batch_heads} {sms}SM"
            variants.append(Variant("attention", arch, group, f"{layout} d{head_dim}", args, kwargs, [user],
                                    attention_expectations(kwargs, dtype, arch)))
    return variants


# ----------------------------------------------------------------------------------------------------
# group_norm / geglu variants (the UNet body's kernels)
# ----------------------------------------------------------------------------------------------------

# Every GroupNorm input an SD UNet has: the channel counts its blocks normalize (320 / 640 / 1280 down and mid,
# 960 / 1920 / 2560 the up blocks' skip concatenations) at every level size of SD1.5/SD2 at 512 px (latents 64 ... 8)
# and SDXL at 1024 px (128 ... 32), 32 groups, CFG batches of 1 and 4 images, channels_last (the layout optimize
# runs) and NCHW. The launcher's tiles depend on (batch, C, size, layout) only: the shapes dedupe to a few
# configurations per dtype.
_GN_CHANNELS = (320, 640, 960, 1280, 1920, 2560)
_GN_SIZES = (8, 16, 32, 64, 128)
_GN_BATCHES = (2, 8)
_GN_GROUPS = 32
# The SD call sites' options: ResnetBlock2D norm1 (SiLU), norm2 (time-embedding add + SiLU), Transformer2DModel's
# norm and conv_norm_out (plain GroupNorm); all with affine parameters of the activations' dtype.
_GN_OPTIONS = (("norm1", True, False), ("norm2", True, True), ("norm", False, False))
# A memory-bound stream: every compile must leave room for 16 resident warps per SM (as the step kernel).
_STREAM_EXPECT = dict(min_warps_per_sm=16)
_GN_KERNELS = ("stats", "finalize", "apply")


def _gn_launches(gn, torch, dtype, shape, channels_last: bool, silu: bool, add: bool, affine_dtype=None,
                 misaligned: bool = False, channel_stride: int = 1, groups: int = _GN_GROUPS):
    """The three launches group_norm_silu_triton_impl makes for meta tensors of this shape (the launcher's own
    plan and packing), and whether the plan aligned x/y for 16-byte accesses."""
    batch, channels = shape[0], shape[1]
    meta = dict(device="meta", dtype=dtype)
    if channel_stride > 1:  # a channel-sliced view: neither axis unit-stride (LAYOUT 0)
        x = torch.empty(batch, channels * channel_stride, *shape[2:], **meta)[:, ::channel_stride]
    elif misaligned:  # storage offset of one element: no 16-byte alignment
        numel = 1
        for n in shape:
            numel *= n
        x = torch.empty(numel + 1, **meta)[1:].view(shape)
        if channels_last:
            x = torch.empty(numel + 1, **meta)[1:].view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2)
    else:
        x = torch.empty(shape, **meta)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
    y = torch.empty_like(x)
    plan = gn.plan_launch(x.shape, x.stride(), y.stride(), groups, x.element_size())
    if plan.copy_in or plan.copy_out:
        raise RuntimeError(f"group_norm {shape}: the launcher copies this layout (pick another)")
    workspace = torch.empty(plan.workspace, device="meta", dtype=torch.float32)
    params = dict(device="meta", dtype=affine_dtype or dtype)
    weight, bias = torch.empty(channels, **params), torch.empty(channels, **params)
    channel_add = torch.empty(batch, channels, **meta) if add else None
    launches = gn.kernel_arguments(x, y, workspace, weight, bias, channel_add, groups, 1e-5, silu, plan)
    return plan, launches


def group_norm_variants(arch: int, quick: bool) -> list[Variant]:
    import torch

    from ddim_fast.triton import group_norm as gn

    expected = {"stats": ["x_ptr", "part_ptr", "C", "HW", "num_chunks"],
                "finalize": ["part_ptr", "weight_ptr", "bias_ptr", "add_ptr", "coef_ptr"],
                "apply": ["x_ptr", "y_ptr", "coef_ptr", "C", "HW", "num_chunks"]}
    for name, prefix in expected.items():
        fn = getattr(gn, f"_group_norm_{name}_kernel")
        if fn.arg_names[:len(prefix)] != prefix:
            raise RuntimeError(f"group_norm._group_norm_{name}_kernel parameters changed ({fn.arg_names}); update "
                               "scripts/triton_aot_check.py group_norm_variants to the launcher's argument order")
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16, torch.float32)
    layouts = (True,) if quick else (True, False)
    variants = []

    def add_launches(dname, layout_label, user, plan, launches, sd: bool):
        for kind, (kernel, _grid, args, kwargs) in zip(_GN_KERNELS, launches):
            expect = dict(_STREAM_EXPECT)
            # The SD paths (aligned, channels or positions unit-stride) must move 16 bytes per x / y access; the
            # finalize kernel reads a few KiB of fp32 partials per program and has no width requirement.
            if sd and kind != "finalize" and kwargs.get("ALIGN", 1) > 1:
                expect["load_bytes"] = 16
                if kind == "apply":
                    expect["store_bytes"] = 16
            if kind == "finalize":
                config = (f"BK={kwargs['BLOCK_K']} BGr={kwargs['BLOCK_GROUPS']} BG={kwargs['BLOCK_G']} "
                          f"w={kwargs['num_warps']}")
            else:
                config = (f"L={kwargs['LAYOUT']} A={kwargs['ALIGN']} BP={kwargs['BLOCK_P']} BC={kwargs['BLOCK_C']} "
                          f"w={kwargs['num_warps']}")
            group = f"{dname} {kind} {config}"
            variants.append(Variant(f"group_norm_{kind}", arch, group, f"{layout_label} {user}", list(args),
                                    dict(kwargs), [user], expect))

    for dtype in dtypes:
        dname = DTYPE_NAMES[str(dtype).removeprefix("torch.")]
        for channels_last in layouts:
            layout_label = "channels_last" if channels_last else "nchw"
            for batch, channels, size in itertools.product(_GN_BATCHES, _GN_CHANNELS, _GN_SIZES):
                shape = (batch, channels, size, size)
                for option, silu, add in _GN_OPTIONS:
                    plan, launches = _gn_launches(gn, torch, dtype, shape, channels_last, silu, add)
                    add_launches(dname, layout_label, f"{option} {batch}x{channels}x{size}x{size}", plan, launches,
                                 sd=True)
        if quick:
            continue
        # fp32 parameters under fp16/bf16 activations (autocast's fp32 master weights): the finalize kernel's
        # pointer types change.
        if dtype != torch.float32:
            plan, launches = _gn_launches(gn, torch, dtype, (2, 320, 64, 64), True, True, True, torch.float32)
            add_launches(dname, "channels_last", "fp32-params 2x320x64x64", plan, launches, sd=True)
        # Off the SD paths (element-wise accesses, correct and compiled clean): misaligned views, a channel-sliced
        # view (neither axis unit-stride), small groups (3 channels), channels not a multiple of 16 bytes (20 in 4
        # groups), a [B, C, L] view (the VAE's attention norm), a single pixel ([N, C]).
        edge = [("misaligned", dict(shape=(2, 320, 64, 64), channels_last=True, misaligned=True)),
                ("misaligned nchw", dict(shape=(2, 320, 64, 64), channels_last=False, misaligned=True)),
                ("channel-sliced", dict(shape=(2, 320, 32, 32), channels_last=False, channel_stride=2)),
                ("C=96", dict(shape=(2, 96, 16, 16), channels_last=True)),
                ("C=20 G=4", dict(shape=(2, 20, 9, 9), channels_last=True, groups=4)),
                ("[B, C, L] view", dict(shape=(1, 512, 4096), channels_last=False)),
                ("[N, C]", dict(shape=(8, 1280), channels_last=False))]
        for label, kw in edge:
            plan, launches = _gn_launches(gn, torch, dtype, silu=True, add=True, **kw)
            add_launches(dname, label, f"edge {label} {kw['shape']}", plan, launches, sd=False)
    return variants


# SD1.5 / SD2 / SDXL GEGLU inputs: [batch, tokens, 2D] with D = 4 x the transformer width (1280 / 2560 / 5120) at
# every level's token count (64 ... 4096 at 512 px, up to 16384 at SDXL's 1024 px), CFG batches of 1 and 4 images.
_GEGLU_WIDTHS = (1280, 2560, 5120)
_GEGLU_TOKENS = (64, 256, 1024, 4096, 16384)


def geglu_variants(arch: int, quick: bool) -> list[Variant]:
    import torch

    from ddim_fast.triton import geglu

    if geglu._geglu_kernel.arg_names[:6] != ["h_ptr", "out_ptr", "rows", "D", "stride_h", "stride_out"]:
        raise RuntimeError(f"geglu._geglu_kernel parameters changed ({geglu._geglu_kernel.arg_names}); update "
                           "scripts/triton_aot_check.py geglu_variants to the launcher's argument order")
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16, torch.float32)
    variants = []
    for dtype in dtypes:
        dname = DTYPE_NAMES[str(dtype).removeprefix("torch.")]
        meta = dict(device="meta", dtype=dtype)
        cases = [(f"{b}x{t}x{2 * d}", torch.empty(b, t, 2 * d, **meta), True)
                 for b, t, d in itertools.product((2, 8), _GEGLU_TOKENS, _GEGLU_WIDTHS)]
        if not quick:
            # Element-wise paths: a misaligned projection output, an odd width, a row-strided slice.
            cases += [("misaligned 2x4096x2560", torch.empty(2 * 4096 * 2560 + 1, **meta)[1:].view(2, 4096, 2560),
                       False),
                      ("odd D 2x77x(2*333)", torch.empty(2, 77, 666, **meta), False),
                      ("row-strided 2x1024x(2*1280)", torch.empty(2, 1024, 2 * 1280 + 8, **meta)[..., :2 * 1280],
                       True)]
        for label, h, sd in cases:
            row_stride = geglu._row_stride(h)
            if row_stride is None:
                raise RuntimeError(f"geglu {label}: the launcher copies this layout (pick another)")
            out = torch.empty((*h.shape[:-1], h.shape[-1] // 2), **meta)
            _grid, args, kwargs = geglu.kernel_arguments(h, out, row_stride)
            expect = dict(_STREAM_EXPECT)
            if sd and kwargs["ALIGN"] > 1:
                expect.update(load_bytes=16, store_bytes=16)
            group = f"{dname} A={kwargs['ALIGN']} BR={kwargs['BLOCK_R']} BD={kwargs['BLOCK_D']} w={kwargs['num_warps']}"
            variants.append(Variant("geglu", arch, group, label, list(args), dict(kwargs), [label], expect))
    return variants


# ----------------------------------------------------------------------------------------------------
# Code-generation properties: what decides speed, read from the PTX and TTGIR of each compile
# ----------------------------------------------------------------------------------------------------

# One PTX memory instruction: optional predicate, opcode with its dotted qualifiers, operands.
_PTX_GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)+)\s", re.M)
_PTX_CP_ASYNC = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global[\w.:]*\s+"
                           r"\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", re.M)
_PTX_TMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?cp\.async\.bulk\.tensor", re.M)
_PTX_EX2 = re.compile(r"^\s*(?:@!?%p\d+\s+)?ex2\.approx", re.M)
_PTX_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(wgmma\.mma_async|mma\.sync)", re.M)
_PTX_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
_PTX_TYPE = re.compile(r"^[bsuf](8|16|32|64|128)$")


def _access_bytes(qualifiers: str) -> int:
    """Bytes moved by one ld/st.global from its qualifiers (".L1::evict_last.v4.b32" -> 16)."""
    vec, bits = 1, 0
    for part in qualifiers.strip(".").split("."):
        if part in ("v2", "v4", "v8"):
            vec = int(part[1:])
        elif _PTX_TYPE.match(part):
            bits = int(_PTX_TYPE.match(part).group(1))
    return vec * bits // 8


def _loop_bodies(ptx: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the PTX loops: a block label and the last branch back to it."""
    spans = []
    for label in _PTX_LABEL.finditer(ptx):
        back = [m.end() for m in re.finditer(r"\bbra(?:\.uni)?\s+" + re.escape(label.group(1)) + r";", ptx)
                if m.start() > label.start()]
        if back:
            spans.append((label.start(), back[-1]))
    return spans


def analyze_ptx(ptx: str) -> dict:
    """Per-thread code properties of one kernel's PTX (static instruction counts, one thread's view):
    global load/store widths, cp.async (and TMA) copies, in total and inside a loop, ex2, MMA."""
    loads, stores = {}, {}
    for m in _PTX_GLOBAL_ACCESS.finditer(ptx):
        width = _access_bytes(m.group(2))
        hist = loads if m.group(1) == "ld" else stores
        hist[width] = hist.get(width, 0) + 1
    cp_async = [(m.start(), int(m.group(1), 0)) for m in _PTX_CP_ASYNC.finditer(ptx)]
    loops = _loop_bodies(ptx)
    in_loop = sum(1 for pos, _ in cp_async if any(a <= pos < b for a, b in loops))
    mma = [m.group(1) for m in _PTX_MMA.finditer(ptx)]
    return dict(
        load_widths=dict(sorted(loads.items())), store_widths=dict(sorted(stores.items())),
        max_global_load_bytes=max(loads, default=0), max_global_store_bytes=max(stores, default=0),
        min_global_load_bytes=min(loads, default=0),
        cp_async=len(cp_async), cp_async_in_loop=in_loop, cp_async_bytes=max((b for _, b in cp_async), default=0),
        min_cp_async_bytes=min((b for _, b in cp_async), default=0),
        tma=len(_PTX_TMA.findall(ptx)), ex2=len(_PTX_EX2.findall(ptx)), mma=len(mma),
        mma_kind=("wgmma" if "wgmma.mma_async" in mma else "mma.sync") if mma else "")


_TTGIR_LAYOUT = re.compile(r"^#(\w+) = #ttg\.(blocked|nvidia_mma)<\{(.*)\}>", re.M)
# An exponential of a tensor: tl.exp (math.exp) or libdevice's expf (the fp32 IEEE path), with its shape and layout.
_TTGIR_EXP = re.compile(r"(?:= math\.exp2? %\S+ : |symbol = \"__nv_exp2?f\"\} : \()"
                        r"tensor<([0-9x]+)xf32, (#ttg\.slice<\{dim = (\d+), parent = #(\w+)\}>|#(\w+))>")


def _layout_fields(body: str) -> dict:
    return {key: [int(v) for v in value.split(",")] if value.strip() else []
            for key, value in re.findall(r"(\w+) = \[([0-9, ]*)\]", body)}


def _rows_per_thread(layout: tuple[str, dict], rows: int) -> float:
    """Distinct rows (dim 0) of a [rows, cols] tensor that one thread holds, for a layout without
    duplication along the rows: an MMA layout gives each warp 16-row slabs (8 row-threads of 2 rows, for
    mma.sync m16 and for each warp of a wgmma m64 group); a blocked layout has threadsPerWarp[0] x
    warpsPerCTA[0] row-threads."""
    kind, fields = layout
    if kind == "nvidia_mma":
        return rows / (8 * fields["warpsPerCTA"][0])
    return rows / (fields["threadsPerWarp"][0] * fields["warpsPerCTA"][0])


def expected_exp_count(ttgir: str, num_warps: int) -> int | None:
    """The ex2 count per thread that the kernel's exponentials need when no warp repeats another's work:
    each [M, N] exp is spread over all threads (M * N / threads each), each [M] row exp (the online
    softmax's rescale) costs the rows a thread holds in its parent layout. None when the TTGIR has no exp.
    A duplicated layout (e.g. warpsPerCTA [8, 1] on a 64-row tile: two 4-warp groups on the same rows)
    computes more than this."""
    layouts = {m.group(1): (m.group(2), _layout_fields(m.group(3))) for m in _TTGIR_LAYOUT.finditer(ttgir)}
    threads = 32 * num_warps
    total, found = 0.0, False
    for m in _TTGIR_EXP.finditer(ttgir):
        found = True
        shape = [int(x) for x in m.group(1).split("x")]
        if len(shape) == 2:
            total += shape[0] * shape[1] / threads
        elif len(shape) == 1 and m.group(3) == "1":  # a row vector: slice of a 2-D parent along dim 1
            total += _rows_per_thread(layouts[m.group(4)], shape[0])
        else:
            return None  # an exp of a shape this rule does not cover
    return round(total) if found else None


def _blocks_by_registers(regs: int, num_warps: int) -> int:
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    return (REGISTERS_PER_SM // regs_per_warp) // num_warps


def register_budget(regs: int, num_warps: int) -> int:
    """A budget for a measured register count: about 10% more (rounded up to 8), but never so many that fewer
    blocks fit per SM than now."""
    blocks = _blocks_by_registers(regs, num_warps)
    ceiling = max(r for r in range(regs, 256) if _blocks_by_registers(r, num_warps) >= blocks)
    return max(regs, min(ceiling, -(-int(regs * 1.1) // 8) * 8))


def occupancy(arch: int, regs: int, num_warps: int, shared: int) -> dict:
    """Blocks and warps per SM that registers, shared memory and the hardware caps allow (sm_80/sm_90:
    64 warps, 32 blocks, 64K registers allocated per warp in units of 256, 1 KiB of shared memory reserved
    per block; 164 / 228 KiB of shared memory per SM)."""
    by_regs = _blocks_by_registers(regs, num_warps)
    smem_per_sm = {90: 233472, 80: 167936}[arch]
    by_smem = smem_per_sm // (shared + 1024) if shared else 32
    blocks = min(by_regs, by_smem, 64 // num_warps, 32)
    limit = "registers" if blocks == by_regs else ("shared memory" if blocks == by_smem else "warps")
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps, occupancy=blocks * num_warps / 64,
                occupancy_limit=limit)


def property_problems(expect: dict, props: dict) -> list[str]:
    """Which of a variant's required code properties its compile misses (empty: all there)."""
    problems = []
    for key, label in (("load_bytes", "max_global_load_bytes"), ("store_bytes", "max_global_store_bytes")):
        if key in expect and props[label] < expect[key]:
            widths = props["load_widths" if key == "load_bytes" else "store_widths"]
            problems.append(f"widest global {'load' if key == 'load_bytes' else 'store'} {props[label]} B < "
                            f"{expect[key]} B (widths B:count {widths})")
    if "all_loads_bytes" in expect:
        narrow = {w: c for w, c in props["load_widths"].items() if w < expect["all_loads_bytes"]}
        if narrow or (props["cp_async"] and props["min_cp_async_bytes"] < expect["all_loads_bytes"]):
            problems.append(f"global loads narrower than {expect['all_loads_bytes']} B (ld.global B:count {narrow}, "
                            f"cp.async min {props['min_cp_async_bytes']} B)")
    if expect.get("cp_async_in_loop") and props["cp_async_in_loop"] + props["tma"] == 0:
        problems.append(f"no cp.async/TMA copy inside the key loop ({props['cp_async']} cp.async in all)")
    if expect.get("ex2_share"):
        share = props.get("ex2_share")
        if share is None:
            problems.append("no exponential found in the TTGIR to check the ex2 share against")
        elif props["ex2"] != share:
            problems.append(f"ex2 per thread {props['ex2']} != the tile's share {share} "
                            f"({'duplicated' if props['ex2'] > share else 'missing'} exponentials)")
    if expect.get("mma") and props["mma"] == 0:
        problems.append("no MMA instruction (mma.sync / wgmma) for a tensor-core dtype")
    if "max_regs" in expect and props["regs"] > expect["max_regs"]:
        if expect["max_regs"] <= 0:
            problems.append("registers: no register budget recorded for this tile class (add it to "
                            "ATTENTION_REGISTER_BUDGETS: --suggest-budgets prints the table)")
        else:
            problems.append(f"registers: {props['regs']} > the tile class's budget {expect['max_regs']} "
                            f"({props['warps_per_sm']} warps per SM now)")
    if "min_warps_per_sm" in expect and props["warps_per_sm"] < expect["min_warps_per_sm"]:
        problems.append(f"occupancy: {props['regs']} registers allow {props['warps_per_sm']} warps per SM "
                        f"({props['occupancy_limit']}-limited) < {expect['min_warps_per_sm']}")
    return problems


# ----------------------------------------------------------------------------------------------------
# Specialize, dedupe, compile, measure
# ----------------------------------------------------------------------------------------------------

_KERNEL_FNS = {"group_norm_stats": ("ddim_fast.triton.group_norm", "_group_norm_stats_kernel"),
               "group_norm_finalize": ("ddim_fast.triton.group_norm", "_group_norm_finalize_kernel"),
               "group_norm_apply": ("ddim_fast.triton.group_norm", "_group_norm_apply_kernel"),
               "geglu": ("ddim_fast.triton.geglu", "_geglu_kernel"),
               "ddim_step": ("ddim_fast.triton.ddim_step", "_ddim_step_kernel"),
               "attention": ("ddim_fast.triton.attention", "_attention_kernel")}


# The kernel families --kernel selects, each with the name of the function that enumerates its launches (in run
# order; looked up when main runs, so tests can replace one).
_FAMILIES = {"ddim_step": "step_variants", "attention": "attention_variants", "group_norm": "group_norm_variants",
             "geglu": "geglu_variants"}


def _kernel_fn(kernel: str):
    import importlib

    module, name = _KERNEL_FNS[kernel]
    return getattr(importlib.import_module(module), name)


def specialize(variant: Variant):
    """What Triton's JIT would compile for this launch on the variant's target: (signature, constexprs,
    attrs, options), computed with the JIT's own binder and argument packing."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel_fn(variant.kernel)
    backend = make_backend(GPUTarget("cuda", variant.arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(variant.kwargs)
    # What JITFunction.run adds before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, extra = binder(*variant.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, extra)
    return signature, constexprs, attrs, options.__dict__


# Integer arguments whose divisibility hint changes no tile code: they only split the program id
# (pid % n, pid // n). Launches that differ only in these hints compile once (the first one met).
_HINT_BLIND_ARGS = {"attention": ("num_m_blocks",)}


def _dedupe_key(variant: Variant, spec) -> tuple:
    signature, constexprs, attrs, options = spec
    names = list(signature)
    blind = {(names.index(name),) for name in _HINT_BLIND_ARGS.get(variant.kernel, ())}
    attrs = {path: hint for path, hint in attrs.items() if path not in blind}
    return (variant.kernel, variant.arch, tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in attrs.items())),
            tuple(sorted((k, repr(v)) for k, v in options.items())))


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas_log(text: str) -> dict | None:
    used, spill = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text)
    if used is None or spill is None:
        return None
    return dict(regs=int(used.group(1)), spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
                stack=int(spill.group(1)))


def _stats_file_name(arch: int, options: dict) -> tuple[str, list[str]]:
    """(name of the stats file kept in the kernel's Triton cache directory, the flags Triton's make_cubin
    passes ptxas besides -v)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    if knobs.compilation.disable_line_info:
        debug_info = ["-lineinfo", "-suppress-debug-info"]
    elif knobs.nvidia.disable_ptxas_opt:
        debug_info = ["-g"]
    else:
        debug_info = ["-lineinfo"]
    fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
    extra = options["ptx_options"].split(" ") if options.get("ptx_options") else []
    flags = [*debug_info, *fmad, "-v", *extra, f"--gpu-name={sm_arch_from_capability(arch)}"]
    return "triton_aot_check-" + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16] + ".json", flags


def _ptxas_stats(kernel, arch: int, options: dict, compile_log: str) -> dict:
    """Registers, spill store/load bytes and stack frame bytes of the kernel's cubin, from ptxas -v:
    the log of Triton's own ptxas run when this call compiled it, else the numbers saved beside the
    kernel in Triton's cache by an earlier run, else a rerun of the wheel's ptxas on the kernel's PTX with
    Triton's flags (checked to reproduce Triton's cubin byte for byte: "same_cubin")."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.cache import get_cache_manager

    # The numbers depend only on the compiled kernel (Triton's hash covers source, options, target and the
    # ptxas version) and on the flags: keep them beside the kernel in Triton's cache, so a warm run does not
    # rerun ptxas.
    cache = get_cache_manager(kernel.hash)
    stats_name, flags = _stats_file_name(arch, options)
    keys = {"regs", "spill_stores", "spill_loads", "stack", "same_cubin"}
    stats = _parse_ptxas_log(compile_log)
    if stats is not None:
        stats["same_cubin"] = True  # Triton's own ptxas run made the cubin
    else:
        cached = cache.get_file(stats_name)
        if cached is not None:
            with contextlib.suppress(OSError, ValueError):
                stats = json.loads(Path(cached).read_text())
                if isinstance(stats, dict) and set(stats) == keys:
                    return stats
        stats = None
    if stats is None:
        with tempfile.TemporaryDirectory(prefix="triton_aot_") as tmp:
            src, dst = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
            src.write_text(kernel.asm["ptx"])
            run = subprocess.run([get_ptxas(arch).path, *flags, str(src), "-o", str(dst)], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                raise RuntimeError(f"ptxas rerun failed: {run.stderr.strip()[:2000]}")
            same_cubin = dst.read_bytes() == kernel.asm["cubin"]
        stats = _parse_ptxas_log(run.stderr)
        if stats is None:
            raise RuntimeError(f"unexpected ptxas -v output: {run.stderr.strip()[:2000]}")
        stats["same_cubin"] = same_cubin
    cache.put(json.dumps(stats), stats_name, binary=False)
    return stats


def compile_one(job: tuple) -> tuple[int, Result]:
    """Worker: compile one specialization for its target and measure it. Never raises."""
    index, kernel_name, arch, (signature, constexprs, attrs, options) = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result()
    start = time.perf_counter()
    try:
        fn = _kernel_fn(kernel_name)
        # Triton prints ptxas -v's log when it runs ptxas (the knob is no part of the cache key), and the whole
        # PTX when ptxas fails: capture both (the error says enough).
        knobs.nvidia.dump_ptxas_log = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                    options=options)
        result.shared = int(kernel.metadata.shared)
        stats = _ptxas_stats(kernel, arch, options, captured.getvalue())
        result.regs, result.stack = stats["regs"], stats["stack"]
        result.spill_stores, result.spill_loads = stats["spill_stores"], stats["spill_loads"]
        if not stats["same_cubin"]:
            result.note = "ptxas rerun differs from Triton's cubin"
        num_warps = options["num_warps"]
        result.props = analyze_ptx(kernel.asm["ptx"])
        result.props["ex2_share"] = expected_exp_count(kernel.asm["ttgir"], num_warps)
        result.props["regs"] = result.regs
        result.props.update(occupancy(arch, result.regs, num_warps, result.shared))
    except Exception as exc:  # noqa: BLE001 - a compile error is a result to report, not a crash
        text = f"{type(exc).__name__}: {exc}".strip()
        result.error = "\n".join(text.splitlines()[:12])[:1500]
    result.seconds = time.perf_counter() - start
    return index, result


def verdict(result: Result, arch: int, num_warps: int, expect: dict | None = None) -> str:
    """"" when clean, else why the variant fails: compile error, spills, resources beyond the target, or a
    required code property missing (see Variant.expect)."""
    if result.error:
        return "compile error"
    problems = property_problems(expect, result.props) if expect else []
    if result.spill_stores or result.spill_loads:
        problems.append(f"spills {result.spill_stores}/{result.spill_loads} B")
    if result.shared > MAX_SHARED[arch]:
        problems.append(f"shared {result.shared} B > {MAX_SHARED[arch]} B")
    if result.regs * num_warps * 32 > REGISTERS_PER_SM:
        problems.append(f"registers: {result.regs} regs x {num_warps * 32} threads > {REGISTERS_PER_SM}")
    return "; ".join(problems)


def _short_users(users: list[str], limit: int = 2) -> str:
    unique = list(dict.fromkeys(users))
    more = f" +{len(unique) - limit}" if len(unique) > limit else ""
    return ", ".join(unique[:limit]) + more


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a subset: sm_90 only; ddim_step: SD layouts with the most expensive and the all-off "
                             "options; attention: ldm's layout only")
    parser.add_argument("--arch", default=None, help="comma-separated compute capabilities (default 90,80; --quick 90)")
    parser.add_argument("--kernel", choices=sorted(_FAMILIES), action="append",
                        help="only this kernel (repeatable; default: all; group_norm is its three kernels)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    parser.add_argument("--verbose", action="store_true", help="list every compile, not only the failing ones")
    parser.add_argument("--dry-run", action="store_true", help="count the distinct compiles per kernel and target only")
    parser.add_argument("--suggest-budgets", action="store_true",
                        help="print ATTENTION_REGISTER_BUDGETS for the compiled attention variants (after an intended "
                             "change of the kernel or its tiles) and exit 0")
    parser.add_argument("--json", metavar="FILE", help="also write one JSON row per compiled configuration: kernel, "
                        "arch, dtype, shape, config, regs, spills, occupancy, max_global_load/store_bytes, load and "
                        "store widths, cp_async (in the loop too), ex2 (and the tile's share), mma, status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{TAG} %(message)s")

    try:
        import torch  # noqa: F401
        import triton
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        print(f"{TAG} skipped: triton (with its NVIDIA backend) or torch is not installed ({exc})")
        return 0
    try:
        get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - a wheel without ptxas cannot do this check
        print(f"{TAG} skipped: the triton wheel has no usable ptxas ({exc})")
        return 0

    archs = [int(a) for a in (args.arch or ("90" if args.quick else "90,80")).split(",")]
    for arch in archs:
        if arch not in SM_COUNTS:
            parser.error(f"--arch: expected some of {sorted(SM_COUNTS)}, got {arch}")
    kernels = args.kernel or list(_FAMILIES)
    start = time.perf_counter()

    # Enumerate, specialize, dedupe.
    variants: list[Variant] = []
    for arch in archs:
        for family in kernels:
            variants += globals()[_FAMILIES[family]](arch, args.quick)
    unique: dict[tuple, tuple[Variant, tuple]] = {}
    for variant in variants:
        spec = specialize(variant)
        key = _dedupe_key(variant, spec)
        if key in unique:
            kept = unique[key][0]
            kept.users.extend(variant.users)
            # One compile, one code: it must meet every requirement of every launch that maps to it.
            for name, value in variant.expect.items():
                pick = min if name.startswith("max_") else max  # the stricter of two requirements
                kept.expect[name] = pick(kept.expect.get(name, value), value)
        else:
            unique[key] = (variant, spec)
    todo = list(unique.values())
    log.info("triton %s: %d launches -> %d distinct compiles (%s; %d jobs)", triton.__version__, len(variants),
             len(todo), ", ".join(f"sm_{a}" for a in archs), args.jobs)

    if args.dry_run:
        counts = {}
        for variant, _spec in todo:
            counts[(variant.kernel, variant.arch)] = counts.get((variant.kernel, variant.arch), 0) + 1
        for (kernel, arch), count in sorted(counts.items()):
            print(f"{TAG} {kernel} sm_{arch}: {count} distinct compiles")
        return 0

    jobs = [(i, v.kernel, v.arch, spec) for i, (v, spec) in enumerate(todo)]
    results: dict[int, Result] = {}
    if args.jobs > 1 and len(jobs) > 1:
        # fork: the workers inherit the imported triton/torch and this script's module state.
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for index, result in pool.imap_unordered(compile_one, jobs):
                results[index] = result
    else:
        for job in jobs:
            index, result = compile_one(job)
            results[index] = result

    # Summary: one row per launch configuration (group), worst numbers over its compiles.
    rows: dict[tuple, dict] = {}
    failed = []
    records = []
    for i, (variant, _spec) in enumerate(todo):
        result = results[i]
        problem = verdict(result, variant.arch, variant.kwargs["num_warps"], variant.expect)
        if problem:
            failed.append((variant, result, problem))
        records.append(json_row(variant, result, problem))
        props = result.props
        row = rows.setdefault((variant.kernel, variant.arch, variant.group),
                              dict(compiles=0, regs=0, spills=0, smem=0, failed=0, warps=None, ld=None, st=None,
                                   cp=None, ex2=0, mma=None))
        row["compiles"] += 1
        row["regs"] = max(row["regs"], result.regs)
        row["spills"] = max(row["spills"], result.spill_stores + result.spill_loads)
        row["smem"] = max(row["smem"], result.shared)
        row["failed"] += bool(problem)
        if props:
            # Worst over the group's compiles: fewest warps, narrowest widest-access, fewest loop copies.
            for name, value in (("warps", props["warps_per_sm"]), ("ld", props["max_global_load_bytes"]),
                                ("st", props["max_global_store_bytes"]), ("cp", props["cp_async_in_loop"]),
                                ("mma", props["mma"])):
                row[name] = value if row[name] is None else min(row[name], value)
            row["ex2"] = max(row["ex2"], props["ex2"])
    print(f"{'kernel':<9} {'arch':<5} {'launch config':<52} {'compiles':>8} {'regs':>4} {'warps/SM':>8} "
          f"{'spill st+ld':>11} {'smem B':>7} {'ld B':>4} {'st B':>4} {'cp.async@loop':>13} {'ex2':>4} {'mma':>4}  status")
    for (kernel, arch, group), row in rows.items():
        status = f"FAIL ({row['failed']} of {row['compiles']})" if row["failed"] else "ok"
        dash = lambda v: "-" if v is None else v  # noqa: E731
        print(f"{kernel:<9} sm_{arch:<2} {group:<52} {row['compiles']:>8} {row['regs']:>4} {dash(row['warps']):>8} "
              f"{row['spills']:>11} {row['smem']:>7} {dash(row['ld']):>4} {dash(row['st']):>4} {dash(row['cp']):>13} "
              f"{row['ex2']:>4} {dash(row['mma']):>4}  {status}")

    # Detail: the failing compiles, at most 3 per launch configuration (every compile with --verbose), with
    # the shapes that launch them.
    shown: dict[tuple, int] = {}
    detail = []
    for v, r, p in failed:
        key = (v.kernel, v.arch, v.group)
        shown[key] = shown.get(key, 0) + 1
        if shown[key] <= 3:
            detail.append((v, r, p))
    hidden = sum(max(0, n - 3) for n in shown.values())
    if args.verbose:
        detail = [(v, results[i], verdict(results[i], v.arch, v.kwargs["num_warps"], v.expect))
                  for i, (v, _) in enumerate(todo)]
    if detail:
        print(f"\n{'kernel':<9} {'arch':<5} {'launch config / variant':<80} {'regs':>4} {'spill st/ld':>11} "
              f"{'smem':>6}  status")
    for variant, result, problem in detail:
        what = f"{variant.group} | {variant.label}"
        if variant.kernel == "attention":
            what += f" [{_short_users(variant.users)}]"
        spill = f"{result.spill_stores}/{result.spill_loads}" if not result.error else "-"
        status = ("FAIL " + problem) if problem else "ok"
        if result.note:
            status += f" ({result.note})"
        print(f"{variant.kernel:<9} sm_{variant.arch:<2} {what:<80} {result.regs:>4} {spill:>11} {result.shared:>6}  "
              f"{status}")
        if result.error:
            print("    " + result.error.replace("\n", "\n    "))

    if hidden and not args.verbose:
        print(f"({hidden} more failing compiles of the same launch configurations: --verbose lists them, --json has "
              "every row)")

    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        log.info("wrote %d rows to %s", len(records), args.json)

    if args.suggest_budgets:
        import torch

        measured: dict[tuple, int] = {}
        for i, (variant, _spec) in enumerate(todo):
            dtype = next((a.dtype for a in variant.args if hasattr(a, "dtype")), None)
            if variant.kernel == "attention" and not results[i].error and dtype != torch.float32:
                key = attention_budget_class(variant.kwargs, dtype, variant.arch)
                measured[key] = max(measured.get(key, 0), results[i].regs)
        print("ATTENTION_REGISTER_BUDGETS = {  # measured maximum -> budget")
        for key, regs in sorted(measured.items()):
            print(f"    {key!r}: {register_budget(regs, key[-1])},  # {regs}")
        print("}")
        del torch
        return 0

    elapsed = time.perf_counter() - start
    where = ", ".join(f"sm_{a}" for a in archs)
    if failed:
        kinds: dict[str, int] = {}
        for variant, _result, problem in failed:
            for part in problem.split("; "):
                kind = f"{variant.kernel}: " + re.split(r" [\d(]", part)[0].strip()
                kinds[kind] = kinds.get(kind, 0) + 1
        print(f"{TAG} FAIL: {len(failed)} of {len(todo)} compiles ({where}) have a compile error, register spills, "
              f"too many resources or a missing code property; see the rows above ({elapsed:.0f} s). By kind: "
              + "; ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items())))
        return 1
    print(f"{TAG} ok: {len(todo)} compiles ({len(variants)} launches; {where}): no errors, no spills, every required "
          f"code property present ({elapsed:.0f} s)")
    return 0


def json_row(variant: Variant, result: Result, problem: str) -> dict:
    """One --json row per compiled configuration."""
    kwargs = variant.kwargs
    dtype = next((a.dtype for a in variant.args if hasattr(a, "dtype")), None)
    name = DTYPE_NAMES.get(str(dtype).removeprefix("torch."), str(dtype))
    config = {k: v for k, v in kwargs.items()}
    row = dict(kernel=variant.kernel, arch=f"sm_{variant.arch}", dtype=name, shape=list(dict.fromkeys(variant.users)),
               config=config, group=variant.group, label=variant.label, regs=result.regs,
               spills=result.spill_stores + result.spill_loads, spill_stores=result.spill_stores,
               spill_loads=result.spill_loads, stack=result.stack, shared=result.shared)
    props = dict(result.props)
    props.pop("regs", None)
    for key in ("max_global_load_bytes", "max_global_store_bytes", "cp_async", "mma"):
        row[key] = props.pop(key, None)
    row.update(props)
    row.update(expect=variant.expect, status="FAIL" if problem else "ok", problems=problem, error=result.error,
               compile_seconds=round(result.seconds, 3))
    return row


if __name__ == "__main__":
    sys.exit(main())
