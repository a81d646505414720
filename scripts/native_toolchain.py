#!/usr/bin/env python3
"""Which toolchain built ddim_fast._C, what the built library resolves at run time, and the build that refuses a
toolchain whose extension cannot raise its errors (docs/design.md, "Build").

    python3 scripts/native_toolchain.py build [--device all|cpu|cuda] [--selfcheck-json PATH]   # setup_env.sh runs it
    python3 scripts/native_toolchain.py facts     # the built library's toolchain facts as JSON

``build`` compiles the extension in place (``setup.py build_ext --inplace``, ninja, incremental; log in
build/build.log), records the compiler in build/toolchain.json, and runs scripts/native_selfcheck.py (every C++
op called with bad input in a child process). When the self-check fails (an op's error killed the process, hung,
or reached Python as the wrong exception), it rebuilds once with a fallback compiler: a GCC of the major version
torch was built with (``g++-13`` for a GCC 13 torch) when one is on PATH, else torch's own recorded compiler when
it exists here, else the system ``g++``/``c++``, whichever differs from the one that failed. If that fails too it
stops (exit 1) and says what crashed, with which compiler, and what to try. The decision is remembered in
build/toolchain.json, so the next setup builds straight with the compiler that passed (an up-to-date build stays
a few seconds: the self-check is skipped when the library it passed on is unchanged).

The rest of this module (ELF facts of a library, compiler identity, torch's compiler) is shared with
scripts/native_selfcheck.py.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RECORD = REPO / "build" / "toolchain.json"
SELFCHECK_JSON = REPO / "build" / "native_selfcheck.json"
TAG = "[setup]"

# --------------------------------------------------------------------------------------------------------------
# ELF facts (x86-64 / aarch64 little-endian ELF64 only; anything else answers empty facts)
# --------------------------------------------------------------------------------------------------------------

_SHT_DYNSYM, _SHT_DYNAMIC, _SHT_VERDEF, _SHT_VERNEED = 11, 6, 0x6FFFFFFD, 0x6FFFFFFE
_DT_NEEDED, _DT_RUNPATH, _DT_RPATH = 1, 29, 15


@dataclass
class ElfFacts:
    needed: list[str] = field(default_factory=list)  # DT_NEEDED, in link order (the lookup order after the globals)
    runpath: list[str] = field(default_factory=list)
    undefined: list[str] = field(default_factory=list)  # undefined dynamic symbols (mangled)
    version_needs: dict[str, list[str]] = field(default_factory=dict)  # file -> versions needed from it
    version_defs: list[str] = field(default_factory=list)  # versions this library defines
    comment: list[str] = field(default_factory=list)  # .comment: the compilers of every object linked in


def elf_facts(path: str | os.PathLike) -> ElfFacts:
    """DT_NEEDED, RUNPATH, undefined dynamic symbols, symbol versions needed/defined and .comment of an ELF file."""
    facts = ElfFacts()
    try:
        data = Path(path).read_bytes()
    except OSError:
        return facts
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return facts
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]

    def section_bytes(s) -> bytes:
        return data[s[4]:s[4] + s[5]]

    def cstr(blob: bytes, offset: int) -> str:
        end = blob.find(b"\0", offset)
        return blob[offset:end if end >= 0 else None].decode("utf-8", "replace")

    shstr = section_bytes(sections[e_shstrndx]) if e_shstrndx < len(sections) else b""
    for s in sections:
        name, kind, link = cstr(shstr, s[0]), s[1], s[6]
        strtab = section_bytes(sections[link]) if link < len(sections) else b""
        blob = section_bytes(s)
        if name == ".comment":
            facts.comment = sorted({c.decode("utf-8", "replace") for c in blob.split(b"\0") if c.strip()})
        elif kind == _SHT_DYNAMIC:
            for off in range(0, len(blob) - 15, 16):
                tag, val = struct.unpack_from("<qQ", blob, off)
                if tag == _DT_NEEDED:
                    facts.needed.append(cstr(strtab, val))
                elif tag in (_DT_RUNPATH, _DT_RPATH):
                    facts.runpath.extend(cstr(strtab, val).split(":"))
                elif tag == 0:
                    break
        elif kind == _SHT_DYNSYM:
            for off in range(24, len(blob) - 23, 24):  # entry 0 is the null symbol
                st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", blob, off)
                if st_shndx == 0 and st_name:
                    facts.undefined.append(cstr(strtab, st_name))
        elif kind == _SHT_VERNEED:
            off = 0
            for _ in range(s[7]):  # sh_info: number of entries
                _ver, cnt, file_off, aux, nxt = struct.unpack_from("<HHIII", blob, off)
                names, aux_off = [], off + aux
                for _ in range(cnt):
                    _hash, _flags, _other, name_off, aux_next = struct.unpack_from("<IHHII", blob, aux_off)
                    names.append(cstr(strtab, name_off))
                    aux_off += aux_next
                facts.version_needs[cstr(strtab, file_off)] = names
                if not nxt:
                    break
                off += nxt
        elif kind == _SHT_VERDEF:
            off = 0
            for _ in range(s[7]):
                _ver, _flags, _ndx, cnt, _hash, aux, nxt = struct.unpack_from("<HHHHIII", blob, off)
                if cnt:
                    (name_off, _n) = struct.unpack_from("<II", blob, off + aux)
                    facts.version_defs.append(cstr(strtab, name_off))
                if not nxt:
                    break
                off += nxt
    return facts


def version_key(name: str) -> tuple[int, ...]:
    """GLIBCXX_3.4.30 -> (3, 4, 30), for ordering symbol versions."""
    return tuple(int(x) for x in re.findall(r"\d+", name))


def glibcxx_report(extension: str, runtime: str | None) -> dict:
    """The GLIBCXX versions the extension needs from libstdc++.so.6 against those the loaded runtime defines.
    A version the runtime lacks means some std:: symbols can only have come from elsewhere (torch's libraries
    export copies of libstdc++ code they link statically) or the library would not load."""
    needs = elf_facts(extension).version_needs.get("libstdc++.so.6", [])
    needed = sorted((v for v in needs if v.startswith("GLIBCXX_")), key=version_key)
    defined = sorted((v for v in elf_facts(runtime).version_defs if v.startswith("GLIBCXX_")), key=version_key) \
        if runtime else []
    return {
        "needed_max": needed[-1] if needed else None,
        "runtime_max": defined[-1] if defined else None,
        "missing_from_runtime": [v for v in needed if defined and v not in defined],
    }


# --------------------------------------------------------------------------------------------------------------
# Compilers
# --------------------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def compiler_identity(command: str) -> dict | None:
    """{'command', 'path', 'realpath', 'kind' ('gcc'/'clang'/'other'), 'version', 'version_line'} of a compiler
    command (a name on PATH or a path; extra words like 'g++ -pthread' are dropped), or None when not found."""
    words = shlex.split(command) if command else []
    if not words:
        return None
    path = shutil.which(words[0])
    if path is None:
        return None
    banner = _run([path, "--version"]).strip().splitlines()
    version_line = banner[0] if banner else ""
    kind = "clang" if "clang" in version_line.lower() else "gcc" if (
        "(GCC)" in version_line or "Free Software Foundation" in "\n".join(banner) or "g++" in version_line
        or "gcc" in version_line) else "other"
    version = _run([path, "-dumpfullversion", "-dumpversion"]).strip() if kind == "gcc" else ""
    if not version:
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", version_line)
        version = match.group(1) if match else ""
    return {"command": words[0], "path": path, "realpath": os.path.realpath(path), "kind": kind,
            "version": version, "version_line": version_line}


def describe(identity: dict | None) -> str:
    """'/usr/bin/g++ (GCC 12.2.0)' for the messages."""
    if not identity:
        return "an unknown compiler"
    name = {"gcc": "GCC", "clang": "clang"}.get(identity["kind"], identity["kind"])
    return f"{identity['path']} ({name} {identity['version'] or '?'})"


def same_compiler(a: dict | None, b: dict | None) -> bool:
    return bool(a and b and a["realpath"] == b["realpath"] and a["version"] == b["version"])


def env_cxx(env: dict[str, str]) -> str:
    """The C++ compiler command setuptools (and so torch's BuildExtension) takes: $CXX, else Python's configured CXX."""
    return env.get("CXX") or sysconfig.get_config_var("CXX") or "c++"


def c_compiler_for(cxx_path: str) -> str:
    """The C driver beside a C++ driver (nvcc's -ccbin comes from $CC): g++-13 -> gcc-13, c++ -> cc,
    clang++ -> clang."""
    directory, name = os.path.split(cxx_path)
    for cxx, cc in (("clang++", "clang"), ("g++", "gcc"), ("c++", "cc")):
        if cxx in name:
            candidate = os.path.join(directory, name.replace(cxx, cc, 1))
            if os.path.exists(candidate):
                return candidate
    return cxx_path


def torch_version() -> str | None:
    """The installed torch's version, without importing torch (that takes seconds)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_compiler() -> dict:
    """What torch says it was built with: {'version': '2.13.0+cpu', 'compiler': 'GCC 13.3', 'gcc_major': 13,
    'cxx_compiler': '/opt/rh/gcc-toolset-13/root/usr/bin/c++', 'cxx11_abi': True, 'cuda': ...}."""
    import torch

    config = torch.__config__.show()
    match = re.search(r"^\s*-\s*GCC (\d+)(\.\d+)*", config, re.M)
    compiler = re.search(r"^\s*-\s*(GCC [\d.]+|clang [\d.]+)", config, re.M)
    cxx = re.search(r"CXX_COMPILER=([^,\s]+)", config)
    return {
        "version": torch_version() or torch.__version__,
        "cuda": torch.version.cuda,
        "compiler": compiler.group(1) if compiler else None,
        "gcc_major": int(match.group(1)) if match else None,
        "cxx_compiler": cxx.group(1) if cxx else None,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
    }


def fallback_candidates(torch_info: dict) -> list[tuple[str, str]]:
    """(command, why) in order of preference."""
    out = []
    major, version = torch_info.get("gcc_major"), torch_info.get("version")
    if major:
        out.append((f"g++-{major}", f"a GCC {major}, the major version torch {version} was built with"))
    if torch_info.get("cxx_compiler"):
        out.append((torch_info["cxx_compiler"], f"the compiler torch {version} records it was built with"))
    out.append(("/usr/bin/g++", "the system's g++"))
    out.append(("/usr/bin/c++", "the system's c++"))
    return out


def choose_fallback(failed: dict | None, torch_info: dict, tried: list[dict] = ()) -> tuple[dict, str] | None:
    """The first candidate compiler (fallback_candidates) found here that is not `failed` nor one of `tried`,
    with why it was chosen; None when there is none."""
    for command, why in fallback_candidates(torch_info):
        identity = compiler_identity(command)
        if identity is None or same_compiler(identity, failed) or any(same_compiler(identity, t) for t in tried):
            continue
        return identity, why
    return None


def compiler_env(env: dict[str, str], identity: dict) -> dict[str, str]:
    """env with CC/CXX set to this compiler (CC drives nvcc's -ccbin too)."""
    return dict(env, CXX=identity["path"], CC=c_compiler_for(identity["path"]))


# --------------------------------------------------------------------------------------------------------------
# What the build log says
# --------------------------------------------------------------------------------------------------------------

_NINJA_STEP = re.compile(r"^\[\d+/\d+\] (\S+)(.*)$", re.M)


def compilers_in_log(text: str) -> dict:
    """{'cxx': the C++ compiler of the ninja compile steps (or None when nothing was compiled), 'ccbin': nvcc's
    host compiler (-ccbin) if any, 'compiled': how many steps ran}."""
    cxx, ccbin, steps = None, None, 0
    for command, rest in _NINJA_STEP.findall(text):
        steps += 1
        if os.path.basename(command) == "nvcc":
            match = re.search(r"-ccbin\s+(\S+)", rest)
            ccbin = ccbin or (match.group(1) if match else None)
        elif cxx is None:
            cxx = command
    return {"cxx": cxx, "ccbin": ccbin, "compiled": steps}


def extension_path(root: Path = REPO) -> Path | None:
    found = sorted((root / "ddim_fast").glob("_C*.so"))
    return found[0] if found else None


def sha256(path: Path | None) -> str | None:
    if path is None or not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_record(path: Path = RECORD) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_record(record: dict, path: Path = RECORD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------------------
# build -> record -> self-check -> (fallback) : the decision, with the build and the self-check passed in
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    ok: bool
    compiler: dict | None  # what compiled (from the log; None when nothing was recompiled and no record says)
    ccbin: str | None = None
    log_tail: str = ""
    recompiled: bool = True


@dataclass
class SelfcheckResult:
    ok: bool
    failures: list[str]  # 'cpu/ddim_step/guidance_scale=nan: died by SIGSEGV', ...
    summary: str = ""


def _rejected(record: dict, compiler: dict | None, torch_version: str) -> dict | None:
    for entry in record.get("rejected", []):
        if same_compiler(entry.get("compiler"), compiler) and entry.get("torch") == torch_version:
            return entry
    return None


def build_and_check(env: dict[str, str], *, build: Callable[[dict], BuildResult],
                    selfcheck: Callable[[], SelfcheckResult], torch_info: dict | Callable[[], dict], extension_sha: Callable[[], str | None],
                    record_path: Path = RECORD, say: Callable[[str], None] = print,
                    choose: Callable = choose_fallback, report: str = "build/native_selfcheck.json") -> int:
    """The build that refuses a toolchain whose extension cannot raise its errors. Returns the exit status.
    torch_info: torch_compiler()'s dict, or a function that returns it (called only when a self-check runs, so an
    up-to-date build does not import torch here); its 'version' must be known up front (torch_version())."""
    record = load_record(record_path)
    wanted = compiler_identity(env_cxx(env))
    build_env = env
    why = "CXX from the environment" if env.get("CXX") else "Python's configured C++ compiler (CXX unset)"
    lazy = torch_info
    torch_info = {"version": torch_version()} if callable(lazy) else lazy
    previous = _rejected(record, wanted, torch_info["version"])
    chosen = record.get("compiler") if previous else None
    if previous and chosen and compiler_identity(chosen["path"]) and not same_compiler(chosen, wanted):
        say(f"{TAG} building with {describe(chosen)}, not {describe(wanted)}: that one failed the self-check "
            f"on {previous.get('date')} ({previous.get('failures', ['?'])[0]}); delete build/toolchain.json to "
            f"retry it")
        build_env = compiler_env(env, chosen)
        why = record.get("why", "the fallback that passed the self-check before")

    result = build(build_env)
    if not result.ok:
        return 1
    compiler = result.compiler or compiler_identity(env_cxx(build_env))
    sha = extension_sha()
    if not result.recompiled and record.get("extension_sha256") == sha and record.get("selfcheck", {}).get("ok") \
            and record.get("torch", {}).get("version") == torch_info["version"]:
        say(f"{TAG} self-check: passed before on this very library (build/toolchain.json); built by "
            f"{describe(record.get('compiler'))}")
        return 0
    if not result.recompiled and record.get("extension_sha256") == sha and record.get("compiler"):
        compiler = record["compiler"]  # nothing recompiled: the record knows who built this library

    if callable(lazy):
        torch_info = lazy()
    check = selfcheck()
    new_record = {"extension_sha256": sha, "compiler": compiler, "cuda_host_compiler": result.ccbin,
                  "why": why, "torch": torch_info, "rejected": record.get("rejected", []), "date": now(),
                  "selfcheck": {"ok": check.ok, "json": report, "summary": check.summary}}
    if check.ok:
        save_record(new_record, record_path)
        say(f"{TAG} self-check passed: {check.summary}; built by {describe(compiler)}")
        return 0

    failures = check.failures
    say(f"{TAG} self-check FAILED with the extension built by {describe(compiler)}:")
    for line in failures[:8]:
        say(f"{TAG}   {line}")
    if len(failures) > 8:
        say(f"{TAG}   ... and {len(failures) - 8} more ({report})")
    rejected = [e for e in new_record["rejected"] if not (same_compiler(e.get("compiler"), compiler)
                                                           and e.get("torch") == torch_info["version"])]
    rejected.append({"compiler": compiler, "torch": torch_info["version"], "failures": failures[:20], "date": now()})
    new_record["rejected"] = rejected
    save_record(new_record, record_path)

    pick = choose(compiler, torch_info, [e["compiler"] for e in rejected])
    hint = _hint(torch_info, report)
    if pick is None:
        say(f"{TAG} FAILED: no other compiler to fall back to (looked for: "
            f"{', '.join(c for c, _ in fallback_candidates(torch_info))}). Errors raised inside ddim_fast._C would "
            f"kill the Python process, so the build stops here. {hint}")
        return 1
    fallback, fallback_why = pick
    say(f"{TAG} rebuilding with {describe(fallback)} ({fallback_why})")
    result = build(compiler_env(env, fallback))
    if not result.ok:
        say(f"{TAG} FAILED: the rebuild with {describe(fallback)} did not build either. {hint}")
        return 1
    check = selfcheck()
    new_record.update(extension_sha256=extension_sha(), compiler=result.compiler or fallback,
                      cuda_host_compiler=result.ccbin,
                      why=f"fallback: {describe(compiler)} failed the self-check ({failures[0]}); "
                          f"{describe(fallback)} is {fallback_why}",
                      date=now(), selfcheck={"ok": check.ok, "json": report,
                                             "summary": check.summary})
    if check.ok:
        save_record(new_record, record_path)
        say(f"{TAG} self-check passed with {describe(fallback)}: {check.summary}. Built with it instead of "
            f"{describe(compiler)} (remembered in build/toolchain.json)")
        return 0
    new_record["rejected"].append({"compiler": new_record["compiler"], "torch": torch_info["version"],
                                   "failures": check.failures[:20], "date": now()})
    save_record(new_record, record_path)
    say(f"{TAG} FAILED: the extension raises its errors wrongly with both compilers: {describe(compiler)} "
        f"({failures[0]}) and {describe(fallback)} ({check.failures[0] if check.failures else '?'}). Errors raised "
        f"inside ddim_fast._C would kill the Python process, so the build stops here. {hint}")
    return 1


def _hint(torch_info: dict, report: str) -> str:
    major = torch_info.get("gcc_major")
    if major:
        try_this = f"CC=gcc-{major} CXX=g++-{major} bash scripts/setup_env.sh"
        built = f"torch {torch_info.get('version')} was built with {torch_info.get('compiler')}: try a GCC {major}, " \
                f"e.g. `{try_this}`"
    else:
        built = "try another compiler, e.g. `CC=gcc CXX=g++ bash scripts/setup_env.sh`"
    return f"{built} (details: {report}, build/toolchain.json)."


# --------------------------------------------------------------------------------------------------------------
# The real build and self-check
# --------------------------------------------------------------------------------------------------------------


def run_build(env: dict[str, str], root: Path = REPO, python: str = sys.executable) -> BuildResult:
    """setup.py build_ext --inplace (ninja, incremental), its log in build/build.log, progress lines as before."""
    log = root / "build" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    env.setdefault("MAX_JOBS", "2")
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([python, "setup.py", "build_ext", "--inplace"], cwd=root, env=env, stdout=f,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        print(tail)
        print(f"{TAG} FAILED: the extension did not build (full log: build/build.log)")
        return BuildResult(False, None, log_tail=tail)
    for line in sorted({line for line in text.splitlines() if line.startswith("ddim_fast: building")}):
        print(line)
    for step, source in re.findall(r"^(\[\d+/\d+\]) .* -c (\S+) -o ", text, re.M):
        print(f"{TAG}   {step} compiled {os.path.relpath(source, root) if os.path.isabs(source) else source}")
    found = compilers_in_log(text)
    if "ninja: no work to do" in text:
        print(f"{TAG}   up to date: nothing recompiled")
    print(f"{TAG} build done in {time.time() - start:.0f} s")
    compiler = compiler_identity(found["cxx"]) if found["cxx"] else None
    return BuildResult(True, compiler, ccbin=found["ccbin"], recompiled=found["compiled"] > 0)


def run_selfcheck(device: str, json_path: Path = SELFCHECK_JSON, root: Path = REPO,
                  python: str = sys.executable) -> SelfcheckResult:
    json_path.unlink(missing_ok=True)
    proc = subprocess.run([python, str(root / "scripts" / "native_selfcheck.py"), "--device", device,
                           "--json", str(json_path)], cwd=root, capture_output=True, text=True)
    try:
        report = json.loads(json_path.read_text())
    except (OSError, ValueError):
        report = None
    if report is None:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return SelfcheckResult(False, [f"the self-check itself failed (rc {proc.returncode}): "
                                       f"{lines[-1] if lines else 'no output'}"])
    failures = [f"{c['name']}: {c['detail']}" for c in report["cases"] if not c["ok"]]
    failures += [f"self-check: {p}" for p in report.get("problems", [])]
    return SelfcheckResult(proc.returncode == 0 and not failures, failures, report.get("summary", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build in place, self-check, fall back to another compiler if needed")
    b.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="devices the self-check covers")
    b.add_argument("--selfcheck-json", default=str(SELFCHECK_JSON),
                   help="where the self-check writes its report (default build/native_selfcheck.json)")
    sub.add_parser("facts", help="print the toolchain facts of the built extension as JSON")
    args = parser.parse_args(argv)
    if args.command == "facts":
        so = extension_path()
        facts = elf_facts(so) if so else ElfFacts()
        print(json.dumps({"extension": str(so), "record": load_record(), "needed": facts.needed,
                          "comment": facts.comment, "torch": torch_compiler()}, indent=2))
        return 0
    report = Path(args.selfcheck_json).resolve()
    shown = str(report.relative_to(REPO)) if report.is_relative_to(REPO) else str(report)
    return build_and_check(dict(os.environ), build=run_build, selfcheck=lambda: run_selfcheck(args.device, report),
                           torch_info=torch_compiler, extension_sha=lambda: sha256(extension_path()), report=shown)


if __name__ == "__main__":
    sys.exit(main())
