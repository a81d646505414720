"""scripts/native_selfcheck.py (every C++ op called with bad input in a child process must raise the documented
exception) and scripts/native_toolchain.py (the build that falls back to another compiler when the self-check
fails, and stops when that fails too; the ELF and compiler facts both report).

The self-check runs for real here (the extension the tests load); deaths, hangs and missing exceptions are
injected with its test-only knob. The fallback decision runs with fake compilers (tiny scripts that answer
--version) and fake build / self-check steps: no test compiles the extension.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SELFCHECK = REPO / "scripts" / "native_selfcheck.py"
TOOLCHAIN = REPO / "scripts" / "native_toolchain.py"

# The cases the first H200 run died on (issue 17), by the names the self-check prints.
GPU_RUN_CRASHES = ["cpu/ddim_step/guidance_scale=nan", "cpu/ddim_step/guidance_scale=inf",
                   "cpu/ddim_step/temperature=nan", "cpu/ddim_step/clip_range=nan", "cpu/ddim_step/clip_range=0", "cpu/scaled_masked_softmax/mask dim 3",
                   "cpu/scaled_masked_softmax/mask dim 1", "cpu/scaled_masked_softmax/mask rank",
                   "cpu/attention/head dim"]


def _load(name: str, path: Path):
    if name not in sys.modules:
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def toolchain():
    return _load("native_toolchain", TOOLCHAIN)


def _selfcheck(tmp_path, *args, inject: str = "", timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k != "DDIM_FAST_SELFCHECK_INJECT"}
    if inject:
        env["DDIM_FAST_SELFCHECK_INJECT"] = inject
    out = tmp_path / "selfcheck.json"
    proc = subprocess.run([sys.executable, str(SELFCHECK), "--device", "cpu", "--json", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def test_selfcheck_passes_on_this_build(tmp_path):
    proc, report = _selfcheck(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report["ok"] and report["children"] == 1 and report["devices_checked"] == ["cpu"], report["summary"]
    names = [c["name"] for c in report["cases"]]
    assert set(GPU_RUN_CRASHES) <= set(names), sorted(set(GPU_RUN_CRASHES) - set(names))
    assert {c["op"] for c in report["cases"]} == {"ddim_step", "ddim_step_out", "scaled_masked_softmax",
                                                   "scaled_masked_softmax_", "attention"}
    assert {c["expected"] for c in report["cases"]} == {None, "ValueError", "TypeError", "IndexError"}
    assert all(c["ok"] and c["outcome"] in ("raised", "returned") for c in report["cases"]), report["cases"]
    # one line per case, then the summary
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(names) + 1 and lines[-1].startswith("native self-check: passed"), proc.stdout
    facts = report["toolchain"]
    assert facts["extension"].endswith(".so") and "libstdc++.so.6" in facts["needed"]
    assert facts["loaded"]["libstdc++"] and facts["loaded"]["libgcc_s"], facts["loaded"]
    assert facts["torch"]["version"] == report["versions"]["torch"]
    # at::parallel_for compiled as OpenMP (without -fopenmp it silently runs on one thread), on one runtime
    assert "GOMP_parallel" in facts["openmp_imports"] and facts["openmp_runtimes_loaded"] == 1, facts
    assert facts["glibcxx"]["missing_from_runtime"] == [], facts["glibcxx"]


def test_selfcheck_names_deaths_hangs_and_missing_exceptions_and_goes_on(tmp_path):
    killed, hung, silent = ("cpu/ddim_step/clip_range=0", "cpu/scaled_masked_softmax/mask dim 1",
                            "cpu/attention/head dim")
    proc, report = _selfcheck(tmp_path, "--timeout", "3", inject=f"segv:{killed},hang:{hung},noraise:{silent}")
    assert proc.returncode == 1, proc.stdout[-4000:]
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name[killed]["outcome"] == "died" and by_name[killed]["signal"] == "SIGSEGV", by_name[killed]
    assert "Segmentation fault" in by_name[killed]["stderr_tail"]  # faulthandler's report, kept
    assert by_name[hung]["outcome"] == "hang"
    assert by_name[silent]["outcome"] == "no_exception"
    assert [n for n, c in by_name.items() if not c["ok"]] == [killed, hung, silent]
    # the cases after each death/hang ran in a fresh child, and the last one passed
    assert report["children"] == 3 and report["cases"][-1]["ok"], report["summary"]
    for name, words in ((killed, "died by SIGSEGV"), (hung, "no answer within 3 s"), (silent, "returned normally")):
        line = next(ln for ln in proc.stdout.splitlines() if name in ln)
        assert line.startswith("FAIL") and words in line, line
    assert "native self-check: FAILED: 21/24" in proc.stdout, proc.stdout[-600:]
    # after a death it records which std:: symbols of the library the dynamic linker bound outside libstdc++:
    # none, with libstdc++ linked before torch's libraries (before that, libc10 lent std::ostringstream's
    # constructor and libtorch_cpu exception_ptr's reference counting)
    assert report["toolchain"]["std_bindings_outside_libstdcxx"] == {}


def test_judge():
    judge = _load("native_selfcheck", SELFCHECK).judge
    case = {"expected": "ValueError", "match": "must be finite"}
    assert judge(case, {"got": "ValueError", "message": "ddim_step: guidance_scale must be finite, got nan"})[0]
    assert judge(case, {"got": "RuntimeError", "message": "must be finite"})[1] == "wrong_exception"
    assert judge(case, {"got": "ValueError", "message": "another check"})[1] == "wrong_exception"
    assert judge(case, {})[1] == "no_exception"
    assert judge({"expected": None, "match": ""}, {})[0]
    assert judge({"expected": None, "match": ""}, {"got": "TypeError", "message": "x"})[1] == "unexpected_exception"


def test_the_extension_takes_std_from_libstdcxx_first():
    """setup.py lists libstdc++ before torch's libraries, so no std:: symbol of the extension resolves to the
    copies of libstdc++ code that libc10 / libtorch_cpu export (see docs/design.md, Build)."""
    from ddim_fast import _C

    needed = toolchain().elf_facts(_C.__file__).needed
    assert needed.index("libstdc++.so.6") < needed.index("libc10.so"), needed


# --------------------------------------------------------------------------------------------------------------
# The fallback decision (scripts/native_toolchain.py build_and_check), with fake compilers and fake steps
# --------------------------------------------------------------------------------------------------------------


def fake_compiler(folder: Path, name: str, banner: str, version: str) -> str:
    path = folder / name
    path.write_text(f"#!/bin/sh\ncase \"$1\" in\n  --version) echo '{banner}';;\n"
                    f"  -dumpfullversion) echo {version};;\nesac\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def compilers(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    image = fake_compiler(bin_dir, "g++", "g++ (Image) 15.1.0", "15.1.0")
    fake_compiler(bin_dir, "gcc", "gcc (Image) 15.1.0", "15.1.0")
    matching = fake_compiler(bin_dir, "g++-13", "g++-13 (Distro) 13.3.0", "13.3.0")
    fake_compiler(bin_dir, "gcc-13", "gcc-13 (Distro) 13.3.0", "13.3.0")
    tc = toolchain()
    # only the fake compilers are candidates (never this machine's /usr/bin/g++)
    monkeypatch.setattr(tc, "fallback_candidates",
                        lambda info: [(matching, f"a GCC {info['gcc_major']}, the major version torch was built with")])
    return {"image": image, "matching": matching, "bin": bin_dir}


TORCH_INFO = {"version": "2.11.0+cu130", "compiler": "GCC 13.3", "gcc_major": 13, "cxx_compiler": None, "cuda": "13.0"}


class Steps:
    """Fake build and self-check: the self-check fails for the compilers in `bad`."""

    def __init__(self, bad: set[str]):
        self.bad, self.builds, self.checks, self.lines = bad, [], 0, []
        self.sha = "sha-0"

    def build(self, env):
        tc = toolchain()
        self.builds.append({"CXX": env.get("CXX"), "CC": env.get("CC")})
        self.sha = f"sha-{len(self.builds)}"
        return tc.BuildResult(True, tc.compiler_identity(env["CXX"]))

    def selfcheck(self):
        tc = toolchain()
        self.checks += 1
        if self.builds[-1]["CXX"] in self.bad:
            return tc.SelfcheckResult(False, ["cpu/ddim_step/guidance_scale=nan: died by SIGSEGV (an error of this op "
                                              "kills the process)"], "23/24 cases")
        return tc.SelfcheckResult(True, [], "24/24 cases as documented on cpu")

    def run(self, env, record):
        return toolchain().build_and_check(env, build=self.build, selfcheck=self.selfcheck, torch_info=TORCH_INFO,
                                           extension_sha=lambda: self.sha, record_path=record, say=self.lines.append)


def test_passing_build_keeps_its_compiler_and_records_it(tmp_path, compilers):
    steps, record = Steps(bad=set()), tmp_path / "toolchain.json"
    assert steps.run({"CXX": compilers["image"]}, record) == 0
    assert [b["CXX"] for b in steps.builds] == [compilers["image"]]
    saved = json.loads(record.read_text())
    assert saved["compiler"]["version"] == "15.1.0" and saved["selfcheck"]["ok"]
    assert saved["why"] == "CXX from the environment"
    assert saved["extension_sha256"] == "sha-1" and saved["rejected"] == []


def test_failing_build_falls_back_once_and_remembers(tmp_path, compilers):
    steps, record = Steps(bad={compilers["image"]}), tmp_path / "toolchain.json"
    env = {"CXX": compilers["image"], "CC": str(compilers["bin"] / "gcc")}
    assert steps.run(env, record) == 0, steps.lines
    assert steps.builds == [{"CXX": compilers["image"], "CC": env["CC"]},
                            {"CXX": compilers["matching"], "CC": str(compilers["bin"] / "gcc-13")}]
    text = "\n".join(steps.lines)
    assert "self-check FAILED with the extension built by" in text and "GCC 15.1.0" in text
    assert "cpu/ddim_step/guidance_scale=nan: died by SIGSEGV" in text
    assert f"rebuilding with {compilers['matching']} (GCC 13.3.0) (a GCC 13" in text
    saved = json.loads(record.read_text())
    assert saved["compiler"]["path"] == compilers["matching"] and saved["selfcheck"]["ok"]
    assert saved["why"].startswith("fallback: ") and [r["compiler"]["version"] for r in saved["rejected"]] == ["15.1.0"]

    # the next setup (same environment) builds straight with the compiler that passed: one build, one check
    again = Steps(bad={compilers["image"]})
    assert again.run(env, record) == 0
    assert [b["CXX"] for b in again.builds] == [compilers["matching"]] and again.checks == 1
    assert "not " + compilers["image"] in again.lines[0] and "failed the self-check" in again.lines[0]


def test_both_compilers_failing_stops_with_what_to_try(tmp_path, compilers):
    steps, record = Steps(bad={compilers["image"], compilers["matching"]}), tmp_path / "toolchain.json"
    assert steps.run({"CXX": compilers["image"]}, record) == 1
    assert len(steps.builds) == 2 and steps.checks == 2
    last = steps.lines[-1]
    assert last.startswith("[setup] FAILED: the extension raises its errors wrongly with both compilers"), last
    for words in (compilers["image"], "GCC 15.1.0", compilers["matching"], "GCC 13.3.0",
                  "cpu/ddim_step/guidance_scale=nan: died by SIGSEGV", "kill the Python process",
                  "torch 2.11.0+cu130 was built with GCC 13.3", "CC=gcc-13 CXX=g++-13 bash scripts/setup_env.sh",
                  "build/native_selfcheck.json"):
        assert words in last, (words, last)
    assert len(json.loads(record.read_text())["rejected"]) == 2


def test_no_fallback_compiler_stops(tmp_path, compilers, monkeypatch):
    monkeypatch.setattr(toolchain(), "fallback_candidates", lambda info: [(compilers["image"], "the same one")])
    steps, record = Steps(bad={compilers["image"]}), tmp_path / "toolchain.json"
    assert steps.run({"CXX": compilers["image"]}, record) == 1
    assert len(steps.builds) == 1
    assert "FAILED: no other compiler to fall back to" in steps.lines[-1], steps.lines


def test_up_to_date_build_skips_a_passed_selfcheck(tmp_path, compilers):
    tc, record = toolchain(), tmp_path / "toolchain.json"
    steps = Steps(bad=set())
    assert steps.run({"CXX": compilers["image"]}, record) == 0

    def nothing_recompiled(env):
        return tc.BuildResult(True, None, recompiled=False)

    steps.build = nothing_recompiled  # same library (sha-1) as the record
    steps.checks = 0
    assert steps.run({"CXX": compilers["image"]}, record) == 0
    assert steps.checks == 0 and "passed before on this very library" in steps.lines[-1]


def test_choose_fallback_skips_the_failed_and_missing_compilers(compilers, monkeypatch):
    tc = toolchain()
    monkeypatch.setattr(tc, "fallback_candidates", lambda info: [
        (str(compilers["bin"] / "no-such-g++"), "missing"), (compilers["image"], "the failed one"),
        (compilers["matching"], "the one to take")])
    failed = tc.compiler_identity(compilers["image"])
    identity, why = tc.choose_fallback(failed, TORCH_INFO)
    assert identity["path"] == compilers["matching"] and identity["kind"] == "gcc" and why == "the one to take"
    assert tc.choose_fallback(failed, TORCH_INFO, [identity]) is None
    assert tc.c_compiler_for(compilers["matching"]) == str(compilers["bin"] / "gcc-13")


def test_real_fallback_candidates_prefer_torchs_gcc_major():
    torch_info = {"version": "2.11.0", "gcc_major": 13, "cxx_compiler": "/opt/rh/gcc-toolset-13/root/usr/bin/c++"}
    names = [c for c, _ in toolchain().fallback_candidates(torch_info)]
    assert names == ["g++-13", "/opt/rh/gcc-toolset-13/root/usr/bin/c++", "/usr/bin/g++", "/usr/bin/c++"]


BUILD_LOG = """\
[1/3] /opt/gcc/bin/g++ -MMD -MF <checkout>/build/temp/csrc/ops.o.d -fPIC -c -c <checkout>/csrc/ops.cpp -o <checkout>/build/temp/csrc/ops.o -O3 -fopenmp -std=c++17
[2/3] /usr/local/cuda/bin/nvcc -MD -MF x.o.d -c -c <checkout>/csrc/cuda/ddim_step_kernel.cu -o x.o -O3 -ccbin /opt/gcc/bin/gcc -std=c++17
[3/3] /opt/gcc/bin/g++ -MMD -c -c <checkout>/csrc/cpu/attention_cpu.cpp -o y.o -std=c++17
"""


def test_compilers_in_log():
    tc = toolchain()
    assert tc.compilers_in_log(BUILD_LOG) == {"cxx": "/opt/gcc/bin/g++", "ccbin": "/opt/gcc/bin/gcc", "compiled": 3}
    assert tc.compilers_in_log("ninja: no work to do.\n") == {"cxx": None, "ccbin": None, "compiled": 0}
