#!/usr/bin/env python3
"""Offline GPU compile check of the Triton kernels in ddim_fast/triton (the Triton twin of nvcc_check.sh).

No GPU is needed: ``triton.compile`` builds PTX and a cubin for a ``GPUTarget`` on any machine, with the
ptxas bundled in the triton wheel. For sm_90 and sm_80 this script compiles the GPU variants the launchers
produce and fails on any compile error, any register spill, or shared memory / registers beyond the
target's limits.

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
  H100/H200 (132 SMs) and an A100 (108 SMs) x fp16/bf16/fp32 x no mask / bool / additive mask, for ldm's
  3-D contiguous layout ([B*H, 1, Lk] mask) and diffusers' 4-D transposed view ([B, H, Lq, Lk] mask).

Each launch is specialized exactly as Triton's JIT specializes it (its own binder and argument packing:
integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get divisibility
hints), so the compiled code is what the GPU would run. Identical (signature, constants, hints, options)
compile once; so do attention launches that differ only in the hint of ``num_m_blocks`` (it only splits
the program id). Triton 3.6's ``CompiledKernel`` learns ``n_regs``/``n_spills`` only when it loads the
cubin on a device and its metadata has no register count, so registers and spills come from ptxas -v:
the log of Triton's own ptxas run (``knobs.nvidia.dump_ptxas_log``), or, for a kernel already in Triton's
cache, numbers saved beside it by an earlier run, or a rerun of the wheel's ptxas with Triton's flags,
checked to reproduce Triton's cubin byte for byte. Compiles are cached by Triton (``~/.triton/cache`` or
``$TRITON_CACHE_DIR``): a warm run takes seconds.

Usage: ``python scripts/triton_aot_check.py [--quick] [--arch 90,80] [--kernel NAME] [--jobs N] [--verbose]``
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

# SM counts the attention launcher's grid-filling rule sees on each target (H100 SXM / H200; A100 SXM).
# Only its query-tile shrink loop depends on them.
SM_COUNTS = {90: (132,), 80: (108,)}
# Per-block shared memory limits (opt-in maximum): a kernel above them fails to launch.
MAX_SHARED = {90: 232448, 80: 166912}
REGISTERS_PER_SM = 65536
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
    if mode == "heavy":
        return rows[:1]
    if mode == "quick":
        return [rows[0], all_off]
    if mode == "all":
        base = dict(heavy, PREDICTION=predictions[0])
        alternatives = dict(GUIDED=[False], CLAMP=[step._CLAMP_NONE, step._CLAMP_STATIC], USE_CLIPPED=[False],
                            NOISE=[step._NOISE_NONE, step._NOISE_TENSOR], WRITE_X0=[False])
        for name, values in alternatives.items():
            rows += [dict(base, **{name: value}) for value in values]
        rows.append(all_off)
    return rows


def _options_label(step, row: dict) -> str:
    pred = {v: k for k, v in step._PREDICTIONS.items()}[row["PREDICTION"]]
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(pred, pred)
    clamp = {step._CLAMP_NONE: "noclamp", step._CLAMP_STATIC: "clip", step._CLAMP_DYNAMIC: "dynthr"}[row["CLAMP"]]
    if row["CLAMP"] != step._CLAMP_NONE and row["USE_CLIPPED"]:
        clamp += "+eps"
    noise = {step._NOISE_NONE: "nonoise", step._NOISE_TENSOR: "noise", step._NOISE_PHILOX: "philox"}[row["NOISE"]]
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


def step_variants(arch: int, quick: bool) -> list[Variant]:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from ddim_fast.triton import ddim_step as step

    kernel = step._ddim_step_kernel
    names = kernel.arg_names
    expected_prefix = _STEP_TENSOR_ARGS + ["table_ptr", "step_ptr", "rng_ptr", "thr_ptr", "numel", "sample_numel",
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
            # The launcher's packing (ddim_step._run): contiguity over all six tensors, then collapse.
            contiguous = all(t.is_contiguous() for t in tensors)
            sizes, strides = step._collapse(x.shape, [t.stride() for t in tensors])
            if not contiguous and len(sizes) > step._KERNEL_DIMS:
                raise RuntimeError(f"{layout}: collapses to {len(sizes)} dims; the launcher copies it (pick another)")
            if contiguous:
                sizes = [1] * step._KERNEL_DIMS
                strides = [[0] * step._KERNEL_DIMS for _ in tensors]
            else:
                pad = step._KERNEL_DIMS - len(sizes)
                sizes = [1] * pad + sizes
                strides = [[0] * pad + st for st in strides]
            block_groups, num_warps = step._launch_config(numel, contiguous)
            pointers = [_Pointer(dtype, dtype.itemsize if misaligned and i in misaligned else 0)
                        for i in range(len(tensors))]
            fp32_ptr, i64_ptr = _Pointer(torch.float32, 0), _Pointer(torch.int64, 0)
            args = [*pointers, fp32_ptr, i64_ptr, i64_ptr, fp32_ptr, numel, sample_numel, num_rows,
                    sizes[1], sizes[2], sizes[3], *[s for st in strides for s in st], 7.5, 1.0, 1.0]
            rows = _step_option_rows(step, "quick" if quick else ("all" if tier == "sd" else "heavy"))
            for row in rows:
                kwargs = dict(row, CONTIGUOUS=contiguous, BLOCK_GROUPS=block_groups, num_warps=num_warps)
                group = f"{dname} {'contig' if contiguous else 'strided'} BG={block_groups} w={num_warps}"
                label = f"{layout} {_options_label(step, row)}"
                variants.append(Variant("ddim_step", arch, group, label, args, kwargs, [layout]))
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
def _sm_count_as(attention, count: int):
    """The launcher asks the device for its SM count; answer for the target instead (no device here)."""
    original = attention._sm_count
    attention._sm_count = lambda device_index: count
    try:
        yield
    finally:
        attention._sm_count = original


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
            attention._check_inputs(q, k, v, mask)  # the op's own rules: these are launches it accepts
            batch_heads = batch * _ATTN_HEADS
            with _sm_count_as(attention, sms):
                cfg = attention.launch_config(batch_heads, lq, lk, head_dim, dtype, device, masked=mask is not None)
            # The launcher's packing (attention.attention_triton_impl on CUDA).
            if mask is None:
                mask_kind_id, mask_arg, mask_strides = attention._MASK_NONE, q, [0, 0, 0, 0]
            else:
                mask_kind_id = attention._MASK_BOOL if mask.dtype == torch.bool else attention._MASK_ADDITIVE
                mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
                mask_strides = [0 if m == 1 else st for m, st in zip(mask.shape, mask.stride())]
                if mask.dim() == 3:
                    mask_strides = [mask_strides[0], 0] + mask_strides[1:]
            heads = q.shape[1] if q.dim() == 4 else 1
            num_m_blocks = -(-lq // cfg["BLOCK_M"])
            args = [q, k, v, out, mask_arg, *attention._strides4(q), *attention._strides4(k), *attention._strides4(v),
                    *attention._strides4(out), *mask_strides, heads, lq, lk, head_dim, head_dim ** -0.5, num_m_blocks]
            kwargs = dict(MASK_KIND=mask_kind_id, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_D=cfg["BLOCK_D"], SINGLE_TILE=cfg["SINGLE_TILE"], DOT_FP32=dtype == torch.float32,
                          INTERP_TILES=0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            tiles = "1tile" if cfg["SINGLE_TILE"] else "loop"
            group = (f"{dname} mask={mask_kind} BM={cfg['BLOCK_M']} BN={cfg['BLOCK_N']} BD={cfg['BLOCK_D']} {tiles} "
                     f"w={cfg['num_warps']} s={cfg['num_stages']}")
            user = f"d{head_dim} {lq}x{lk} bh{batch_heads} {sms}SM"
            variants.append(Variant("attention", arch, group, layout, args, kwargs, [user]))
    return variants


# ----------------------------------------------------------------------------------------------------
# Specialize, dedupe, compile, measure
# ----------------------------------------------------------------------------------------------------

_KERNEL_FNS = {"ddim_step": ("ddim_fast.triton.ddim_step", "_ddim_step_kernel"),
               "attention": ("ddim_fast.triton.attention", "_attention_kernel")}


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
    except Exception as exc:  # noqa: BLE001 - a compile error is a result to report, not a crash
        text = f"{type(exc).__name__}: {exc}".strip()
        result.error = "\n".join(text.splitlines()[:12])[:1500]
    result.seconds = time.perf_counter() - start
    return index, result


def verdict(result: Result, arch: int, num_warps: int) -> str:
    """"" when clean, else why the variant fails."""
    if result.error:
        return "compile error"
    problems = []
    if result.spill_stores or result.spill_loads:
        problems.append(f"spills {result.spill_stores}/{result.spill_loads} B")
    if result.shared > MAX_SHARED[arch]:
        problems.append(f"shared {result.shared} B > {MAX_SHARED[arch]} B")
    if result.regs * num_warps * 32 > REGISTERS_PER_SM:
        problems.append(f"{result.regs} regs x {num_warps * 32} threads > {REGISTERS_PER_SM}")
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
    parser.add_argument("--kernel", choices=sorted(_KERNEL_FNS), action="append",
                        help="only this kernel (repeatable; default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    parser.add_argument("--verbose", action="store_true", help="list every compile, not only the failing ones")
    parser.add_argument("--dry-run", action="store_true", help="count the distinct compiles per kernel and target only")
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
    kernels = args.kernel or sorted(_KERNEL_FNS, reverse=True)
    start = time.perf_counter()

    # Enumerate, specialize, dedupe.
    variants: list[Variant] = []
    for arch in archs:
        if "ddim_step" in kernels:
            variants += step_variants(arch, args.quick)
        if "attention" in kernels:
            variants += attention_variants(arch, args.quick)
    unique: dict[tuple, tuple[Variant, tuple]] = {}
    for variant in variants:
        spec = specialize(variant)
        key = _dedupe_key(variant, spec)
        if key in unique:
            unique[key][0].users.extend(variant.users)
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
    for i, (variant, _spec) in enumerate(todo):
        result = results[i]
        problem = verdict(result, variant.arch, variant.kwargs["num_warps"])
        if problem:
            failed.append((variant, result, problem))
        row = rows.setdefault((variant.kernel, variant.arch, variant.group),
                              dict(compiles=0, regs=0, spills=0, smem=0, failed=0))
        row["compiles"] += 1
        row["regs"] = max(row["regs"], result.regs)
        row["spills"] = max(row["spills"], result.spill_stores + result.spill_loads)
        row["smem"] = max(row["smem"], result.shared)
        row["failed"] += bool(problem)
    print(f"{'kernel':<9} {'arch':<5} {'launch config':<52} {'compiles':>8} {'regs':>4} {'spill st+ld':>11} "
          f"{'smem B':>7}  status")
    for (kernel, arch, group), row in rows.items():
        status = f"FAIL ({row['failed']} of {row['compiles']})" if row["failed"] else "ok"
        print(f"{kernel:<9} sm_{arch:<2} {group:<52} {row['compiles']:>8} {row['regs']:>4} {row['spills']:>11} "
              f"{row['smem']:>7}  {status}")

    # Detail: every failing compile (every compile with --verbose), with the shapes that launch it.
    detail = [(v, r, p) for v, r, p in failed]
    if args.verbose:
        detail = [(v, results[i], verdict(results[i], v.arch, v.kwargs["num_warps"])) for i, (v, _) in enumerate(todo)]
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

    elapsed = time.perf_counter() - start
    where = ", ".join(f"sm_{a}" for a in archs)
    if failed:
        print(f"{TAG} FAIL: {len(failed)} of {len(todo)} compiles ({where}) have a compile error, register spills or "
              f"too many resources; see the rows above ({elapsed:.0f} s)")
        return 1
    print(f"{TAG} ok: {len(todo)} compiles ({len(variants)} launches; {where}): no errors, no spills "
          f"({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
