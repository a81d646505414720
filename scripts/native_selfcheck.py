#!/usr/bin/env python3
"""Post-build self-check of ddim_fast._C: every C++ op, called with bad input, must raise the documented Python
exception (docs/design.md section 8) and not kill the process.

    python3 scripts/native_selfcheck.py [--json PATH] [--device cpu|cuda|all] [--timeout S] [--bindings]

The ops run in a child process, never in this one. Each case calls one op (``ddim_step``, ``ddim_step_out``,
``scaled_masked_softmax``, ``scaled_masked_softmax_``, ``attention``) on one device with one bad argument and
expects an exception type (and a fragment of its message, so it is our check that fired); a few valid calls
must return normally. A case whose child dies by a signal, hangs past --timeout, returns normally or raises
another type fails and is named; after a death or a hang the remaining cases continue in a fresh child. CPU
cases always run; CUDA cases when --device is cuda or all and a CUDA device is visible (``ddim_fast::attention``
has no C++ CUDA kernel: its CUDA kernel is Triton's, registered from Python, so it is checked on CPU only).
The cases include those the first H200 run died on (issue 17): non-finite guidance_scale / temperature,
clip_range nan or 0 on CUDA, the softmax mask shape errors, the CPU attention head-dim mismatch. Each case
records what its C++ message streams (literal text, a string, a dtype, an integer, a float, a shape): on that
run only messages that format a number crashed.

Exit status 0 when every case behaved as expected, 1 otherwise. One line per case, then a summary. --json
writes the cases and the toolchain facts: the compiler that built the library (build/toolchain.json, else the
library's .comment section), torch's compiler (torch.__config__), the libstdc++ / libgcc_s / OpenMP runtimes the
child process loaded, the GLIBCXX versions the library needs against those the loaded libstdc++ defines, the
OpenMP entry points it imports, versions. --bindings (automatic when a case died) also records which std::
symbols of the library the dynamic linker bound outside libstdc++ (LD_DEBUG=bindings).

Test-only knob: DDIM_FAST_SELFCHECK_INJECT="KIND:CASE[,KIND:CASE...]" (KIND: segv, hang, noraise) makes the
child kill itself with SIGSEGV, sleep, or skip the call at the case named CASE (as printed), so tests can prove
that deaths, hangs and missing exceptions are caught and named.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import native_toolchain  # noqa: E402  (scripts/ is not a package)

PREFIX = "@@selfcheck "  # the child's protocol lines on stdout (anything else it prints is ignored)
IMPORT_TIMEOUT = 180.0  # seconds a child may take to import torch and ddim_fast (and init CUDA)


# --------------------------------------------------------------------------------------------------------------
# The cases (built in the child: they need torch)
# --------------------------------------------------------------------------------------------------------------


class Case:
    def __init__(self, device: str, op: str, what: str, expected: str | None, match: str, streams: str, call):
        self.name = f"{device}/{op}/{what}"
        self.device, self.op, self.expected, self.match = device, op, expected, match
        self.streams, self.call = streams, call

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "op": self.op, "expected": self.expected,
                "match": self.match, "message_streams": self.streams}


STEP_ARGS = ("x", "model_output", "table", "row", "guidance_scale", "prediction_type", "clip_range",
             "x0_threshold", "use_clipped_model_output", "noise", "rng_state", "temperature")


def build_cases(torch, devices: list[str]) -> list[Case]:
    ops = torch.ops.ddim_fast
    cases: list[Case] = []

    for d in devices:
        def step_args(d=d, **change):
            x = torch.zeros(2, 4, 8, 8, device=d)
            args = {"x": x, "model_output": torch.zeros_like(x), "table": torch.zeros(10, 8, device=d),
                    "row": torch.tensor([3], device=d), "guidance_scale": None, "prediction_type": "epsilon",
                    "clip_range": None, "x0_threshold": None, "use_clipped_model_output": False, "noise": None,
                    "rng_state": None, "temperature": 1.0}
            if change.get("guidance_scale") is not None:
                args["model_output"] = torch.zeros(4, 4, 8, 8, device=d)
            args.update(change)
            return [args[k] for k in STEP_ARGS]

        def step(**change):
            return lambda: ops.ddim_step(*step_args(**change), True)

        def step_out(out):
            return lambda: ops.ddim_step_out(*step_args(), out(), None)

        def add(op, what, expected, match, streams, call):
            cases.append(Case(d, op, what, expected, match, streams, call))

        add("ddim_step", "valid call", None, "", "-", step())
        add("ddim_step", "guidance_scale=nan", "ValueError", "guidance_scale must be finite", "float",
            step(guidance_scale=float("nan")))
        add("ddim_step", "guidance_scale=inf", "ValueError", "guidance_scale must be finite", "float",
            step(guidance_scale=float("inf")))
        add("ddim_step", "temperature=nan", "ValueError", "temperature must be finite", "float",
            step(temperature=float("nan")))
        add("ddim_step", "clip_range=nan", "ValueError", "clip_range must be > 0", "float",
            step(clip_range=float("nan")))
        add("ddim_step", "clip_range=0", "ValueError", "clip_range must be > 0", "float", step(clip_range=0.0))
        add("ddim_step", "model_output shape", "ValueError", "model_output must be [B, ...]", "shape",
            step(model_output=torch.zeros(2, 4, 8, 9, device=d)))
        add("ddim_step", "row numel", "ValueError", "row must hold exactly one index", "int",
            step(row=torch.tensor([1, 2], device=d)))
        add("ddim_step", "table dtype", "TypeError", "table must be float32", "dtype",
            step(table=torch.zeros(10, 8, dtype=torch.float64, device=d)))
        add("ddim_step", "0-dim x", "ValueError", "must have a batch dimension", "literal",
            step(x=torch.zeros((), device=d), model_output=torch.zeros((), device=d)))
        add("ddim_step", "prediction_type", "ValueError", "prediction_type must be", "string",
            step(prediction_type="bogus"))
        if d == "cpu":  # CUDA cannot tell the host about an out-of-range row without a sync: it writes NaN
            add("ddim_step", "row out of range", "IndexError", "is outside the coefficient table", "int",
                step(row=torch.tensor([99])))
        add("ddim_step_out", "out shape", "ValueError", "out must have x's shape", "shape",
            step_out(lambda: torch.zeros(2, 4, 8, 7, device=d)))
        add("ddim_step_out", "out internal overlap", "ValueError", "out has internal overlap", "string",
            step_out(lambda: torch.zeros(1, 4, 8, 8, device=d).expand(2, 4, 8, 8)))

        def softmax(mask, inplace=False, d=d):
            def call():
                scores = torch.zeros(2, 3, 5, 8, device=d)
                m = mask() if mask is not None else None
                op = ops.scaled_masked_softmax_ if inplace else ops.scaled_masked_softmax
                return op(scores, m, 1.0)
            return call

        def bool_mask(*shape, d=d):
            return lambda: torch.ones(*shape, dtype=torch.bool, device=d)

        add("scaled_masked_softmax", "valid call", None, "", "-", softmax(bool_mask(2, 1, 1, 8)))
        add("scaled_masked_softmax", "mask dim 3", "ValueError", "dim 3 must be 8", "shape",
            softmax(bool_mask(2, 1, 1, 7)))
        add("scaled_masked_softmax", "mask dim 1", "ValueError", "dim 1 must be 3 or 1", "shape",
            softmax(bool_mask(2, 2, 1, 8)))
        add("scaled_masked_softmax", "mask rank", "ValueError", "must have 4 dims", "shape", softmax(bool_mask(1, 8)))
        add("scaled_masked_softmax", "mask dtype", "TypeError", "mask must be bool", "dtype",
            softmax(lambda: torch.ones(2, 1, 1, 8, dtype=torch.float16, device=d)))
        add("scaled_masked_softmax_", "mask dim 3", "ValueError", "dim 3 must be 8", "shape",
            softmax(bool_mask(2, 1, 1, 7), inplace=True))

        if d == "cpu":
            def attention(k_shape, v_shape, k_dtype=torch.float32):
                return lambda: ops.attention(torch.zeros(2, 4, 40), torch.zeros(*k_shape, dtype=k_dtype),
                                             torch.zeros(*v_shape), 1.0, None)

            add("attention", "valid call", None, "", "-", attention((2, 6, 40), (2, 6, 40)))
            add("attention", "head dim", "ValueError", "must have one head dim", "int",
                attention((2, 6, 32), (2, 6, 40)))
            add("attention", "leading dims", "ValueError", "leading (batch/head) dims", "shape",
                attention((1, 6, 40), (1, 6, 40)))
            add("attention", "dtype", "TypeError", "must share a dtype", "dtype",
                attention((2, 6, 40), (2, 6, 40), torch.float16))
    return cases


# --------------------------------------------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------------------------------------------


def _emit(kind: str, value) -> None:
    sys.stdout.write(PREFIX + json.dumps({kind: value}) + "\n")
    sys.stdout.flush()


def loaded_libraries() -> list[str]:
    """The shared libraries this process has mapped (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if re.search(r"\.so(\.\d+)*$", line.strip())})
    except OSError:
        return []


def run_child(device: str, start: int) -> int:
    import faulthandler

    faulthandler.enable()  # a death prints the Python frame it happened in (the parent keeps stderr's tail)
    sys.path.insert(0, str(REPO))  # the build of this checkout, whatever is installed
    import torch

    import ddim_fast  # noqa: F401  (loads ddim_fast._C, registers the ops)
    from ddim_fast import _C, _library

    devices = ["cpu"]
    problems, notes = [], []
    if device in ("cuda", "all"):
        if torch.cuda.is_available() and _library.has_native_kernel("cuda"):
            devices.append("cuda")
        elif device == "cuda":
            problems.append("--device cuda: " + ("the extension has no CUDA kernels (built without CUDA)"
                                                 if torch.cuda.is_available() else "no CUDA device is visible to torch"))
        elif torch.cuda.is_available():  # a legitimate build (no nvcc, DDIM_FAST_NO_CUDA=1): nothing to check there
            notes.append("CUDA cases skipped: a CUDA device is visible but the extension has no CUDA kernels")
    if device == "cuda":
        devices.remove("cpu")
    loaded = loaded_libraries()
    openmp = [p for p in loaded if re.search(r"^lib(g|i|)omp[0-9]*(-[0-9a-f]+)?\.so", os.path.basename(p))]
    if len(openmp) > 1:  # e.g. clang's -fopenmp: the extension's parallel regions ignore torch.set_num_threads
        notes.append(f"{len(openmp)} OpenMP runtimes loaded: {', '.join(openmp)}")
    cases = build_cases(torch, devices)
    if start == 0:
        _emit("cases", [c.describe() for c in cases])
        _emit("facts", {"extension": _C.__file__, "ddim_fast": os.path.dirname(ddim_fast.__file__),
                        "loaded": loaded, "torch": native_toolchain.torch_compiler(),
                        "python": sys.version.split()[0], "devices": devices, "problems": problems, "notes": notes,
                        "torch_threads": torch.get_num_threads()})
    inject = {}  # case name -> segv / hang / noraise (the test-only knob)
    for item in filter(None, os.environ.get("DDIM_FAST_SELFCHECK_INJECT", "").split(",")):
        kind, _, target = item.partition(":")
        inject[target] = kind
    for index in range(start, len(cases)):
        case = cases[index]
        _emit("start", index)
        t0 = time.perf_counter()
        raised = None
        try:
            if inject.get(case.name) == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            if inject.get(case.name) == "hang":
                time.sleep(3600)
            if inject.get(case.name) != "noraise":
                case.call()
                if case.device == "cuda":
                    torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (the point is to see which exception arrives)
            raised = exc
        result = {"index": index, "seconds": round(time.perf_counter() - t0, 4)}
        if raised is not None:
            result["got"] = type(raised).__name__
            result["message"] = (str(raised).strip().splitlines() or [""])[0][:300]
        _emit("result", result)
    _emit("end", True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------------------------


def judge(case: dict, result: dict) -> tuple[bool, str, str]:
    """(ok, outcome, detail) of a case the child finished."""
    got, message = result.get("got"), result.get("message", "")
    if case["expected"] is None:
        if got is None:
            return True, "returned", "returned normally"
        return False, "unexpected_exception", f"raised {got}: {message} (a valid call)"
    if got is None:
        return False, "no_exception", f"returned normally, expected {case['expected']}"
    if got != case["expected"] or case["match"] not in message:
        return False, "wrong_exception", f"raised {got}: {message}; expected {case['expected']} with '{case['match']}'"
    return True, "raised", f"{got}: {message}"


def signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class Child:
    """One child process and a thread that turns its protocol lines into queue items (None = its stdout closed)."""

    def __init__(self, device: str, start: int, env: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", "--device", device,
                                      "--start", str(start)], stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, text=True, env=env, cwd=os.getcwd())
        self.items: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                try:
                    self.items.put(json.loads(line[len(PREFIX):]))
                except ValueError:
                    pass
        self.items.put(None)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its pid
        self.proc.wait()

    def stderr_tail(self, lines: int = 12) -> str:
        self.stderr.seek(0)
        return "\n".join(self.stderr.read().strip().splitlines()[-lines:])


_STD_PREFIXES = ("_ZNS", "_ZNKS", "_ZSt", "_ZTVS", "_ZTIS", "_ZTTS", "_ZNSt", "_ZNKSt")  # std:: (mangled)


def std_bindings(env: dict) -> dict[str, list[str]]:
    """{library: [std:: symbols of ddim_fast._C the dynamic linker bound there]} for every library but libstdc++."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bind")
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import ddim_fast"],
                       env=dict(env, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=out), capture_output=True,
                       timeout=IMPORT_TIMEOUT, cwd=os.getcwd())
        text = "".join(Path(tmp, f).read_text(errors="replace") for f in os.listdir(tmp))
    found: dict[str, set[str]] = {}
    pattern = re.compile(r"binding file (\S*ddim_fast/_C[^ ]*) \[\d+\] to (\S+) \[\d+\]: normal symbol `([^']+)'")
    for src, lib, sym in pattern.findall(text):
        if os.path.basename(lib) != os.path.basename(src) and sym.startswith(_STD_PREFIXES) \
                and "libstdc++" not in lib:
            found.setdefault(os.path.basename(lib), set()).add(sym)
    cxxfilt = shutil.which("c++filt")
    result = {}
    for lib, syms in sorted(found.items()):
        names = sorted(syms)
        if cxxfilt:
            names = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
            names = [n for n in names if n]
        result[lib] = names
    return result


def toolchain_facts(facts: dict, record_path: Path) -> dict:
    so = facts.get("extension")
    elf = native_toolchain.elf_facts(so) if so else native_toolchain.ElfFacts()
    loaded = facts.get("loaded", [])

    def matching(pattern):
        return [p for p in loaded if re.search(pattern, os.path.basename(p))]

    runtime = next(iter(matching(r"^libstdc\+\+\.so")), None)
    record = native_toolchain.load_record(record_path)
    so_sha = native_toolchain.sha256(Path(so)) if so else None
    built_by = record.get("compiler") if record and record.get("extension_sha256") == so_sha else None
    openmp = matching(r"^lib(g|i|)omp[0-9]*(-[0-9a-f]+)?\.so")
    omp_imports = sorted(s for s in elf.undefined if s.startswith(("GOMP_", "omp_", "__kmpc_")))
    return {
        "extension": so,
        "built_by": built_by,
        "build_record": str(record_path) if record else None,
        "so_comment": elf.comment,
        "torch": facts.get("torch"),
        "needed": elf.needed,
        "runpath": elf.runpath,
        "loaded": {"libstdc++": matching(r"^libstdc\+\+"), "libgcc_s": matching(r"^libgcc_s"), "openmp": openmp,
                   "libc10": matching(r"^libc10\.so"), "libtorch_cpu": matching(r"^libtorch_cpu\.so")},
        "glibcxx": native_toolchain.glibcxx_report(so, runtime) if so else None,
        "openmp_imports": omp_imports,
        "openmp_runtimes_loaded": len(openmp),
    }


def run_parent(args) -> int:
    t0 = time.time()
    env = dict(os.environ)
    cases: list[dict] | None = None
    facts: dict = {}
    results: dict[int, dict] = {}
    problems: list[str] = []
    child_stderr: list[str] = []  # the stderr of a child that died before any case (an import error, ...)
    start, children = 0, 0
    while True:
        child = Child(args.device, start, env)
        children += 1
        current, started_at, finished = None, None, False
        while True:
            waited = IMPORT_TIMEOUT if current is None else args.timeout
            try:
                item = child.items.get(timeout=max(0.1, waited - (time.time() - started_at if started_at else 0)))
            except queue.Empty:
                child.kill()
                if current is None:
                    problems.append(f"a child did not import ddim_fast within {IMPORT_TIMEOUT:.0f} s")
                    finished = True
                else:
                    results[current] = {"ok": False, "outcome": "hang",
                                        "detail": f"no answer within {args.timeout:g} s (child killed)"}
                    start = current + 1
                break
            if item is None:  # stdout closed: the child is gone
                returncode = child.proc.wait()
                if current is not None:
                    tail = child.stderr_tail()
                    results[current] = {"ok": False, "outcome": "died", "signal": signal_name(returncode),
                                        "detail": f"died by {signal_name(returncode)} (an error of this op kills "
                                                  f"the process)", "stderr_tail": tail}
                    start = current + 1
                elif not finished:
                    tail = child.stderr_tail(40)
                    problems.append(f"a child ended ({signal_name(returncode)}) before running a case: "
                                    f"{(tail.splitlines() or ['no output'])[-1]}")
                    child_stderr.append(tail)
                    finished = True
                break
            if "cases" in item:
                cases = item["cases"]
            elif "facts" in item:
                facts = item["facts"]
                problems.extend(facts.get("problems", []))
            elif "start" in item:
                current, started_at = item["start"], time.time()
            elif "result" in item:
                res = item["result"]
                ok, outcome, detail = judge(cases[res["index"]], res)
                results[res["index"]] = {"ok": ok, "outcome": outcome, "detail": detail, "seconds": res["seconds"]}
                current, started_at = None, None
            elif "end" in item:
                finished = True
                child.kill()
                break
        if finished or cases is None or start >= len(cases):
            break

    rows = []
    for i, case in enumerate(cases or []):
        res = results.get(i, {"ok": False, "outcome": "not_run", "detail": "not run (the check stopped early)"})
        rows.append({**case, **res})
        print(f"{'ok  ' if res['ok'] else 'FAIL'}  {case['name']:<48} {res['detail'][:150]}")
    failed = [r for r in rows if not r["ok"]]
    devices = facts.get("devices", [])
    seconds = time.time() - t0
    ok = bool(rows) and not failed and not problems
    summary = (f"{len(rows) - len(failed)}/{len(rows)} cases as documented on {', '.join(devices) or 'no device'} "
               f"in {seconds:.1f} s ({children} child process{'es' if children > 1 else ''})")
    for p in problems:
        print(f"FAIL  {p}")
    for n in facts.get("notes", []):
        print(f"note  {n}")
    print(f"native self-check: {'passed' if ok else 'FAILED'}: {summary}")
    if failed and any(r["outcome"] == "died" for r in failed):
        print("  an op's error killed its process: see docs/design.md, 'Build' (the toolchain) and --json's toolchain")

    if args.json:
        toolchain = toolchain_facts(facts, Path(args.record))
        if args.bindings or any(r["outcome"] == "died" for r in failed):
            try:
                toolchain["std_bindings_outside_libstdcxx"] = std_bindings(env)
            except (OSError, subprocess.SubprocessError) as exc:
                toolchain["std_bindings_outside_libstdcxx"] = f"not collected: {exc}"
        report = {"ok": ok, "summary": summary, "device": args.device, "devices_checked": devices,
                  "cases": rows, "problems": problems, "notes": facts.get("notes", []), "child_stderr": child_stderr, "children": children, "seconds": round(seconds, 2),
                  "toolchain": toolchain,
                  "versions": {"python": facts.get("python"), "torch": (facts.get("torch") or {}).get("version"),
                               "cuda": (facts.get("torch") or {}).get("cuda")}}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"],
                        help="cpu, cuda, or all (CPU, and CUDA when a device is visible); default all")
    parser.add_argument("--json", metavar="PATH", help="write the cases and the toolchain facts here")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one case may take (default 60)")
    parser.add_argument("--bindings", action="store_true",
                        help="record the std:: symbols bound outside libstdc++ (LD_DEBUG; automatic after a death)")
    parser.add_argument("--record", default=str(native_toolchain.RECORD), help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.device, args.start)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
