#!/usr/bin/env python3
"""Checks a CUDA build of ddim_fast._C on a machine without a GPU (docs: DESIGN.md, "Build").

Run by scripts/cuda_build_check.sh with the Python of a CUDA build of torch and the freshly built copy of
the package first on sys.path; it can be run by hand the same way:

    PYTHONPATH=BUILT_COPY VENV/bin/python scripts/cuda_build_check.py [--arch 90] [--cuobjdump PATH]

What it checks (every failure is printed; exit status 1 if any):
* the import: ``ddim_fast`` and its ``_C`` come from the built copy, against a torch with CUDA;
* the device code: the extension's fat binary holds cubins for every ``--arch`` (``cuobjdump --list-elf``),
  and the DDIM step's vector kernel moves 16 bytes per access there (LDG.E.128 / STG.E.128 in its SASS);
* the dispatcher, op by op, against the table in DESIGN.md / ddim_fast/_library.py: ``ddim_step``,
  ``ddim_step_out``, ``scaled_masked_softmax`` and ``scaled_masked_softmax_`` have C++ kernels for CPU
  (csrc/cpu) and CUDA (csrc/cuda); ``attention`` has a C++ CPU kernel and, on CUDA, the Triton kernel
  registered from Python; the Triton ops (``ddim_step_triton``, ``ddim_step_triton_out``,
  ``attention_triton``) are registered from Python for CPU and CUDA, as are both kernels of the UNet-body ops
  (``group_norm_silu``, ``geglu`` and their ``_triton`` twins); every op has its fake (Meta) kernel;
  the namespace holds no op this table does not know;
* ``_library.NATIVE_KERNELS`` (what backend='native' trusts) says the same;
* a fake-tensor pass of every op on CUDA fake tensors (``FakeTensorMode``) and a pass on meta tensors:
  output shapes, dtypes and devices;
* one real CPU call of each C++ CPU op against ddim_fast.reference: the C++20 build under this torch
  computes what the reference does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

TAG = "[cuda-build-check]"

# Where each op's kernel must come from, per dispatch key: "cpu" / "cuda" = a C++ kernel of csrc/cpu or
# csrc/cuda; "shared" = a device-agnostic C++ kernel of csrc/ itself (CompositeExplicitAutograd, e.g. the step's
# argument checks); "python" = registered from Python (ddim_fast/_library.py: the Triton kernels and every fake
# kernel).
EXPECTED = {
    "ddim_step_check": {"CPU": "shared", "CUDA": "shared"},
    "ddim_step": {"CPU": "cpu", "CUDA": "cuda", "Meta": "python"},
    "ddim_step_out": {"CPU": "cpu", "CUDA": "cuda", "Meta": "python"},
    "scaled_masked_softmax": {"CPU": "cpu", "CUDA": "cuda", "Meta": "python"},
    "scaled_masked_softmax_": {"CPU": "cpu", "CUDA": "cuda", "Meta": "python"},
    "attention": {"CPU": "cpu", "CUDA": "python", "Meta": "python"},
    "ddim_step_triton": {"CPU": "python", "CUDA": "python", "Meta": "python"},
    "ddim_step_triton_out": {"CPU": "python", "CUDA": "python", "Meta": "python"},
    "attention_triton": {"CPU": "python", "CUDA": "python", "Meta": "python"},
    # The UNet-body ops: PyTorch's composite on the CPU, the Triton kernels on CUDA, all registered from Python.
    "group_norm_silu": {"CPU": "python", "CUDA": "python", "Meta": "python"},
    "group_norm_silu_triton": {"CPU": "python", "CUDA": "python", "Meta": "python"},
    "geglu": {"CPU": "python", "CUDA": "python", "Meta": "python"},
    "geglu_triton": {"CPU": "python", "CUDA": "python", "Meta": "python"},
}

_REGISTERED = re.compile(r"^(\w+): registered at (\S+?)(?::\d+)? \[(?:default backend )?kernel\]", re.M)


def registration_sites(op: str) -> dict[str, str]:
    """{dispatch key: file that registered the kernel} from the dispatcher's table of ddim_fast::op."""
    import torch

    return {key: path for key, path in _REGISTERED.findall(torch._C._dispatch_dump_table(f"ddim_fast::{op}"))}


def classify(path: str) -> str:
    """'cpu' / 'cuda' for a C++ file of csrc/cpu or csrc/cuda, 'shared' for one of csrc/ itself, 'python' for a
    .py registration, else the path."""
    norm = path.replace("\\", "/")
    if norm.endswith(".py"):
        return "python"
    for kind in ("cpu", "cuda"):
        if f"/csrc/{kind}/" in norm and norm.endswith((".cpp", ".cu")):
            return kind
    if re.search(r"/csrc/[^/]+\.cpp$", norm):
        return "shared"
    return path


def check_dispatcher(expected: dict = EXPECTED) -> list[str]:
    import torch

    problems = []
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddim_fast::")}
    for op in sorted(names - set(expected)):
        problems.append(f"ddim_fast::{op} is registered but this check has no expectation for it (add it to EXPECTED)")
    for op, keys in expected.items():
        if op not in names:
            problems.append(f"ddim_fast::{op}: no such op (csrc/ops.cpp defines the schemas)")
            continue
        sites = registration_sites(op)
        for key, want in keys.items():
            got = sites.get(key)
            if got is None:
                problems.append(f"ddim_fast::{op}: no {key} kernel (expected one from {want})")
            elif classify(got) != want:
                problems.append(f"ddim_fast::{op}: the {key} kernel is registered at {got}, expected {want}")
        print(f"{TAG} ddim_fast::{op}: " + ", ".join(f"{k}={classify(v)}" for k, v in sorted(sites.items())
                                                      if k in ("CPU", "CUDA", "Meta")))
    return problems


def check_native_table() -> list[str]:
    from ddim_fast import _library

    want = {(device, op) for op, keys in EXPECTED.items() for key, device in (("CPU", "cpu"), ("CUDA", "cuda"))
            if op in _library._NATIVE_OPS and keys[key] == device}
    got = set(_library.NATIVE_KERNELS)
    if got != want:
        return [f"_library.NATIVE_KERNELS is {sorted(got)}, expected {sorted(want)}"]
    return []


def _step_args(torch, device, dtype, batch=2):
    x = torch.empty(batch, 4, 8, 8, device=device, dtype=dtype)
    model_output = torch.empty(2 * batch, 4, 8, 8, device=device, dtype=dtype)  # CFG: [uncond; cond]
    table = torch.empty(10, 8, device=device, dtype=torch.float32)
    step = torch.empty(1, device=device, dtype=torch.int64)
    rng = torch.empty(2, device=device, dtype=torch.int64)
    return [x, model_output, table, step, 7.5, "epsilon", None, None, False, None, rng, 1.0]


def op_calls(torch, device) -> list[tuple[str, tuple, list[tuple]]]:
    """(op, arguments, expected (shape, dtype) of each output; None for an op that returns nothing)."""
    half = torch.float16
    x_shape = (2, 4, 8, 8)
    calls = []
    for op in ("ddim_step", "ddim_step_triton"):
        calls.append((op, tuple(_step_args(torch, device, half) + [True]), [(x_shape, half), (x_shape, half)]))
    for op in ("ddim_step_out", "ddim_step_triton_out"):
        out = torch.empty(x_shape, device=device, dtype=half)
        calls.append((op, tuple(_step_args(torch, device, half) + [out, torch.empty_like(out)]), None))
    scores = torch.empty(2, 3, 4, 77, device=device, dtype=half)
    mask = torch.empty(2, 1, 1, 77, device=device, dtype=torch.bool)
    calls.append(("scaled_masked_softmax", (scores, mask, 0.5), [((2, 3, 4, 77), half)]))
    calls.append(("scaled_masked_softmax_", (scores, mask, 0.5), None))
    q = torch.empty(2, 8, 64, 40, device=device, dtype=half)
    k = torch.empty(2, 8, 77, 40, device=device, dtype=half)
    for op in ("attention", "attention_triton"):
        calls.append((op, (q, k, k, 40 ** -0.5, None), [((2, 8, 64, 40), half)]))
        mask3 = torch.empty(16, 1, 77, device=device, dtype=torch.bool)  # ldm: [B*H, Lq or 1, Lk]
        calls.append((op, (q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1), 0.2, mask3), [((16, 64, 40), half)]))
    h = torch.empty(2, 5, 8, 8, device=device, dtype=half).to(memory_format=torch.channels_last)
    weight = torch.empty(5, device=device, dtype=half)
    for op in ("group_norm_silu", "group_norm_silu_triton"):
        calls.append((op, (h, weight, weight, 5, 1e-5, True, torch.empty(2, 5, device=device, dtype=half)),
                      [((2, 5, 8, 8), half)]))
    for op in ("geglu", "geglu_triton"):
        calls.append((op, (torch.empty(2, 7, 16, device=device, dtype=half),), [((2, 7, 8), half)]))
    return calls


def check_fake_pass(device_kind: str) -> list[str]:
    """Every op on fake CUDA tensors (device_kind 'cuda': FakeTensorMode) or on meta tensors ('meta')."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    problems = []
    mode = FakeTensorMode() if device_kind == "cuda" else contextlib.nullcontext()
    want_device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("meta")
    with mode:
        for op, args, outputs in op_calls(torch, device_kind):
            try:
                result = getattr(torch.ops.ddim_fast, op)(*args)
            except Exception as exc:  # noqa: BLE001 - report every op, not the first failure
                problems.append(f"{device_kind} pass: ddim_fast::{op} raised {type(exc).__name__}: {exc}")
                continue
            results = [] if result is None else (list(result) if isinstance(result, (tuple, list)) else [result])
            if outputs is None:
                if results:
                    problems.append(f"{device_kind} pass: ddim_fast::{op} returned {len(results)} values, expected none")
                continue
            if len(results) != len(outputs):
                problems.append(f"{device_kind} pass: ddim_fast::{op} returned {len(results)} values, expected "
                                f"{len(outputs)}")
                continue
            for i, (t, (shape, dtype)) in enumerate(zip(results, outputs)):
                got = (tuple(t.shape), t.dtype, t.device)
                if got != (shape, dtype, want_device):
                    problems.append(f"{device_kind} pass: ddim_fast::{op} output {i} is {got}, expected "
                                    f"{(shape, dtype, want_device)}")
    print(f"{TAG} {device_kind} pass: {len(op_calls(torch, 'meta'))} op calls")
    return problems


def check_cpu_numerics() -> list[str]:
    """One real call of each C++ CPU kernel against the fp64 reference (fp32 storage, contract 1e-6)."""
    import numpy as np
    import torch

    from ddim_fast import reference, schedule

    problems = []
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 40, generator=gen) for n in (33, 77, 77))
    mask = torch.rand(2, 1, 1, 77, generator=gen) > 0.3
    scores = torch.randn(2, 3, 33, 77, generator=gen) * 3
    x = torch.randn(2, 4, 8, 8, generator=gen)
    model_output = torch.randn(4, 4, 8, 8, generator=gen)
    alphas = np.linspace(0.1, 0.9, 10)
    table = schedule.coefficient_table(np.arange(10), alphas, np.minimum(alphas + 0.05, 1.0))
    row = schedule.step_index(3)  # the table row the op reads
    calls = {
        "attention": (lambda: torch.ops.ddim_fast.attention(q, k, v, 0.2, mask),
                      lambda: reference.attention(q, k, v, 0.2, mask)),
        "scaled_masked_softmax": (lambda: torch.ops.ddim_fast.scaled_masked_softmax(scores, mask, 0.3),
                                  lambda: reference.scaled_masked_softmax(scores, mask, 0.3)),
        "ddim_step": (lambda: torch.ops.ddim_fast.ddim_step(x, model_output, table, row, 7.5, "epsilon", None, None,
                                                            False, None, None, 1.0, False)[0],
                      lambda: reference.ddim_step(x, model_output, table, row, guidance_scale=7.5)[0]),
    }
    for name, (run, ref) in calls.items():
        try:
            out, expected = run(), ref()
        except Exception as exc:  # noqa: BLE001 - report every op
            problems.append(f"cpu: ddim_fast::{name} raised {type(exc).__name__}: {exc}")
            continue
        err = float(reference.relative_error(out.double(), expected.double()))
        print(f"{TAG} cpu: ddim_fast::{name} relative error {err:.2e} against the reference")
        if not err <= 1e-6:
            problems.append(f"cpu: ddim_fast::{name} relative error {err:.2e} > 1e-6 against the reference")
    return problems


def find_cuobjdump(explicit: str | None) -> str | None:
    """cuobjdump: --cuobjdump, $CUDA_HOME/bin, PATH, or the one the triton wheel of this Python bundles."""
    import importlib.util
    import shutil

    candidates = [explicit, os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def check_device_code(so_path: str, archs: list[int], cuobjdump: str | None) -> list[str]:
    """The built extension holds a cubin for every target, with the step's 16-byte vector path in it."""
    if cuobjdump is None:
        return ["no cuobjdump found (give --cuobjdump, put it on PATH or in $CUDA_HOME/bin): the extension's "
                "device code was not checked"]
    listing = subprocess.run([cuobjdump, "--list-elf", so_path], capture_output=True, text=True)
    if listing.returncode != 0:
        return [f"cuobjdump --list-elf {so_path} failed: {listing.stderr.strip()[:500]}"]
    problems = []
    found = sorted({int(a) for a in re.findall(r"\.sm_(\d+)\.cubin", listing.stdout)})
    print(f"{TAG} device code: cubins for sm_{', sm_'.join(map(str, found)) if found else '(none)'}")
    for arch in archs:
        if arch not in found:
            problems.append(f"{so_path} has no sm_{arch} cubin (cuobjdump --list-elf: {listing.stdout.strip()[:300]})")
    _rows, sass_problems = sass_report(so_path, [a for a in archs if a in found], cuobjdump)
    return problems + sass_problems


# Kernels whose every global access must be 16 bytes wide (their whole point: all-contiguous, 16-byte aligned
# arguments): at least one LDG.E.128 and one STG.E.128 each, i.e. widest load and store 128 bits.
VECTOR_KERNELS = ("ddim_step_vector_kernel", "ddim_step_lean_kernel")
# The lean step kernels exist to be small (a step inside a CUDA graph pays for a cold kernel's instruction
# fetches; the general vector kernel is ~3,200 SASS instructions for fp16): each instantiation must stay under
# this many (measured 168-496 on sm_90, nvcc 13.0).
LEAN_KERNEL = "ddim_step_lean_kernel"
LEAN_MAX_INSTRUCTIONS = 640
_SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/", re.M)

_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_SASS_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def sass_access_bits(text: str) -> tuple[int, int]:
    """Widest LDG / STG of a SASS listing in bits (LDG.E.128 -> 128; LDG.E with no size -> 32; .U16 -> 16)."""
    widest = {"LDG": 0, "STG": 0}
    for op, quals in _SASS_ACCESS.findall(text):
        bits = 32
        for q in quals.strip(".").split("."):
            if q in ("64", "128", "256"):
                bits = int(q)
            elif q in ("U8", "S8"):
                bits = 8
            elif q in ("U16", "S16"):
                bits = 16
        widest[op] = max(widest[op], bits)
    return widest["LDG"], widest["STG"]


def sass_functions(sass: str) -> dict[str, str]:
    """{mangled function name: its SASS} of a cuobjdump -sass listing."""
    starts = list(_SASS_FUNCTION.finditer(sass))
    return {m.group(1): sass[m.end(): starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
            for i, m in enumerate(starts)}


def ptxas_stats(log: str) -> dict[tuple[str, int], dict]:
    """{(mangled name, arch): {regs, stack, spill_stores, spill_loads}} from an nvcc -Xptxas -v log."""
    stats = {}
    entries = list(_PTXAS_ENTRY.finditer(log))
    for i, m in enumerate(entries):
        body = log[m.end(): entries[i + 1].start() if i + 1 < len(entries) else len(log)]
        used, spill = _PTXAS_USED.search(body), _PTXAS_SPILL.search(body)
        stats[(m.group(1), int(m.group(2)))] = dict(
            regs=int(used.group(1)) if used else -1, stack=int(spill.group(1)) if spill else 0,
            spill_stores=int(spill.group(2)) if spill else 0, spill_loads=int(spill.group(3)) if spill else 0)
    return stats


def _demangle(names: list[str]) -> dict[str, str]:
    import shutil

    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    run = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = run.stdout.splitlines() if run.returncode == 0 else names
    return {n: re.sub(r"\(anonymous namespace\)::|ddim_fast::", "", d) for n, d in zip(names, out)}


def sass_report(binary: str, archs: list[int], cuobjdump: str, ptxas_log: str = "",
                vector_kernels=VECTOR_KERNELS, verbose: bool = False) -> tuple[list[dict], list[str]]:
    """Per kernel and target: widest global load/store from the SASS (plus registers and spills when the
    ptxas -v log is given); problems: a vector kernel (``vector_kernels``) missing, or narrower than 128 bits."""
    rows, problems = [], []
    stats = ptxas_stats(ptxas_log) if ptxas_log else {}
    for arch in archs:
        run = subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{arch}", binary], capture_output=True, text=True)
        if run.returncode != 0:
            problems.append(f"cuobjdump -sass -arch sm_{arch} {binary} failed: {run.stderr.strip()[:300]}")
            continue
        functions = sass_functions(run.stdout)
        names = _demangle(sorted(functions))
        for pattern in vector_kernels:
            if not any(pattern in name for name in functions):
                problems.append(f"sm_{arch}: no {pattern} in the SASS of {binary}")
        for name in sorted(functions):
            ld, st = sass_access_bits(functions[name])
            vector = any(pattern in name for pattern in vector_kernels)
            instructions = len(_SASS_INSTRUCTION.findall(functions[name]))
            row = dict(kernel=names[name], mangled=name, arch=f"sm_{arch}", max_global_load_bits=ld,
                       max_global_store_bits=st, max_global_load_bytes=ld // 8, max_global_store_bytes=st // 8,
                       vector_path=vector, sass_instructions=instructions, **stats.get((name, arch), {}))
            row["status"] = "ok"
            if vector and (ld < 128 or st < 128):
                row["status"] = "FAIL"
                problems.append(f"sm_{arch} {names[name]}: widest global load/store {ld}/{st} bits, expected 128 "
                                f"(LDG.E.128 / STG.E.128 on the all-contiguous, 16-byte aligned vector path)")
            if LEAN_KERNEL in name and instructions > LEAN_MAX_INSTRUCTIONS:
                row["status"] = "FAIL"
                problems.append(f"sm_{arch} {names[name]}: {instructions} SASS instructions, expected at most "
                                f"{LEAN_MAX_INSTRUCTIONS} (the lean step kernel must stay small)")
            rows.append(row)
    for row in rows:
        if verbose or row["vector_path"] or row["status"] != "ok":
            regs = f"{row['regs']:>3} regs" if "regs" in row else "        "
            print(f"{TAG} {row['arch']} {regs} {row['sass_instructions']:>5} instr LDG {row['max_global_load_bits']:>3} "
                  f"STG {row['max_global_store_bits']:>3} bits{' (vector path: needs 128)' if row['vector_path'] else ''} "
                  f"{row['status']:<4} {row['kernel']}")
    others = [r for r in rows if not r["vector_path"]]
    if others and not verbose:
        widths = sorted({(r["max_global_load_bits"], r["max_global_store_bits"]) for r in others})
        regs = [r["regs"] for r in others if "regs" in r]
        print(f"{TAG} {len(others)} other kernels (scalar paths): widest LDG/STG bits "
              + ", ".join(f"{ld}/{st}" for ld, st in widths)
              + (f"; {min(regs)}-{max(regs)} registers" if regs else ""))
    return rows, problems


def sass_main(args) -> int:
    cuobjdump = find_cuobjdump(args.cuobjdump)
    if cuobjdump is None:
        print(f"{TAG} FAIL: no cuobjdump (give --cuobjdump, or put it on PATH or in $CUDA_HOME/bin)")
        return 1
    log = Path(args.ptxas_log).read_text() if args.ptxas_log else ""
    rows, problems = sass_report(args.sass, [int(a) for a in args.arch.split(",")], cuobjdump, log,
                                 () if args.no_vector_kernels else VECTOR_KERNELS, args.verbose)
    if args.json:
        import json

        path = Path(args.json)
        old = json.loads(path.read_text()) if args.json_append and path.exists() else []
        path.write_text(json.dumps(old + [dict(r, source=args.source or args.sass) for r in rows], indent=1) + "\n")
    for p in problems:
        print(f"{TAG} FAIL: {p}")
    return 1 if problems else 0


# The C++ standard torch's cpp_extension passes on Linux: `cpp_flag_prefix + 'c++NN'` (its rule for C++ sources
# that name none) and the '-std=c++NN' literals of its nvcc and JIT paths. torch 2.11 says c++17, 2.13+ c++20.
_STD_RULE = re.compile(r"cpp_flag_prefix\s*\+\s*['\"](c\+\+\d+)['\"]")
_STD_LITERAL = re.compile(r"['\"]-std=(c\+\+\d+)['\"]")


def cpp_extension_source() -> Path | None:
    """torch/utils/cpp_extension.py of the torch this Python imports (found without importing torch)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "cpp_extension.py"
    return path if path.exists() else None


def torch_cpp_standards(source: str) -> set[str]:
    """The standards ('c++17', 'c++20') torch's cpp_extension passes itself, read from its source."""
    return set(_STD_RULE.findall(source)) | set(_STD_LITERAL.findall(source))


def check_std_flags(build_log: str, allowed: set[str], torch_label: str = "torch") -> list[str]:
    """Every -std=c++NN of the build must be one torch's cpp_extension chooses for this version: an extension
    compiled for another standard than torch's headers were written for (C++20 since 2.13) fails or miscompiles."""
    if not allowed:
        return [f"could not tell which C++ standard {torch_label}'s cpp_extension chooses (no -std=c++NN in its source)"]
    used = sorted(set(re.findall(r"-std=(c\+\+\d+)", build_log)))
    return [f"the build passed -std={u}, but {torch_label}'s cpp_extension chooses -std={'/'.join(sorted(allowed))}: "
            f"let torch choose (setup.py passes no -std)" for u in used if u not in allowed]


def std_main(log_path: str) -> int:
    source = cpp_extension_source()
    if source is None:
        print(f"{TAG} FAIL: torch/utils/cpp_extension.py not found for this Python ({sys.executable})")
        return 1
    import importlib.metadata

    label = f"torch {importlib.metadata.version('torch')}"
    allowed = torch_cpp_standards(source.read_text())
    problems = check_std_flags(Path(log_path).read_text(errors="replace"), allowed, label)
    for p in problems:
        print(f"{TAG} FAIL: {p}")
    if not problems:
        print(f"{TAG} C++ standard: -std={'/'.join(sorted(allowed))}, as {label}'s cpp_extension chooses")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities the build targeted")
    parser.add_argument("--cuobjdump", default=None, help="cuobjdump to read the device code with")
    parser.add_argument("--source-root", default=None, help="the built copy ddim_fast must be imported from")
    parser.add_argument("--sass", metavar="BINARY", default=None,
                        help="only report the SASS of this object / library (widest LDG/STG per kernel; the vector "
                             "kernels must reach 128 bits) and exit; no torch needed (scripts/nvcc_check.sh uses it)")
    parser.add_argument("--ptxas-log", default=None, help="with --sass: an nvcc -Xptxas -v log, for registers/spills")
    parser.add_argument("--json", default=None, help="with --sass: write the rows to this JSON file")
    parser.add_argument("--json-append", action="store_true", help="with --json: append to the file's rows")
    parser.add_argument("--source", default=None, help="with --json: the source file named in the rows")
    parser.add_argument("--verbose", action="store_true", help="with --sass: one line per kernel")
    parser.add_argument("--no-vector-kernels", action="store_true",
                        help="with --sass: the binary is not expected to hold a vector kernel (another .cu file)")
    parser.add_argument("--check-std", metavar="BUILD_LOG", default=None,
                        help="only check that every -std=c++NN in this build log is the one this Python's torch "
                             "cpp_extension chooses, and exit (no torch import)")
    args = parser.parse_args(argv)
    if args.sass:
        return sass_main(args)
    if args.check_std:
        return std_main(args.check_std)

    import torch

    import ddim_fast
    from ddim_fast import _C

    problems = []
    print(f"{TAG} torch {torch.__version__} (CUDA {torch.version.cuda}), ddim_fast from {Path(ddim_fast.__file__).parent}, "
          f"_C {Path(_C.__file__).name}")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} has no CUDA: this check needs a CUDA build of torch")
    if args.source_root and not Path(_C.__file__).resolve().is_relative_to(Path(args.source_root).resolve()):
        problems.append(f"ddim_fast._C was imported from {_C.__file__}, not from the built copy {args.source_root}")
    problems += check_device_code(_C.__file__, [int(a) for a in args.arch.split(",")], find_cuobjdump(args.cuobjdump))
    problems += check_dispatcher()
    problems += check_native_table()
    problems += check_fake_pass("cuda")
    problems += check_fake_pass("meta")
    problems += check_cpu_numerics()
    for p in problems:
        print(f"{TAG} FAIL: {p}")
    if problems:
        print(f"{TAG} FAIL: {len(problems)} problem(s)")
        return 1
    print(f"{TAG} ok: CUDA build links and loads; every op has its kernels where DESIGN.md says; fake and meta passes "
          "clean; CPU kernels match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
