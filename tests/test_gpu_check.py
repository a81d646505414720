"""The device check script (benchmarks/gpu_check.sh) and its helpers, on the CPU: the dry run (stage order,
per-stage caps, the global deadline, packaging, file count and names), the pytest plugin it loads (CUDA-only
selection, per-test timeout) and the SIGINT path that still writes JUnit XML. The GPU itself is not needed:
these are the parts that must not break before a GPU session runs the script for real."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
EXPECTED = {"summary.txt", "env.txt", "micro.json", "bench_e2e.json", "bench_pipeline.json", "bench_pipeline2.json",
            "bench_pipeline3.json", "generate.json", "tests.xml", "logs.tar.gz"}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")


def run_script(out, timeout=600, **env):
    full_env = dict(os.environ, DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, **env)
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_runs_every_stage_in_order_cuts_a_hung_stage_and_packages(tmp_path):
    out = tmp_path / "out"
    proc = run_script(out, DRY_RUN_SLOW="micro", CAP_micro="3")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, summary  # the hung stage is a failure...
    assert "micro-benchmark" in summary and "cut at its limit of 3s" in summary
    # ...and every stage after it still ran, in the planned order
    order = ["build", "native kernels registered", "native self-check", "micro-benchmark",
             "python -m ddim_fast bench --model", "generate", "pytest the CUDA tests", "pipeline: bench_pipeline.py",
             "python -m ddim_fast bench --breakdown"]
    outcomes = [ln for ln in summary.splitlines() if re.match(r"(ok|FAIL|SKIP)  ", ln)]
    positions = [next(i for i, ln in enumerate(outcomes) if word in ln) for word in order]
    assert positions == sorted(positions), summary
    # stage 6 runs beside stage 5: all three sanitizer stand-ins ran
    assert all(f"ok    {name}" in summary for name in ("memcheck (native step tests)", "memcheck (softmax kernels)",
                                                         "racecheck (softmax block kernel)")), summary
    assert "FAIL  python -m ddim_fast bench" not in summary and "agreement with diffusers" in summary
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8 and files <= EXPECTED, files
    assert {"summary.txt", "env.txt", "bench_e2e.json", "tests.xml", "logs.tar.gz"} <= files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    bench = json.loads((out / "bench_e2e.json").read_text())
    assert bench["proofs"]["fast+attn"]["ok"] and bench["proofs"]["fast+attn"]["fused_attention_ops"] > 0
    # the pipeline stage's results file, written entry by entry in pytest-benchmark's layout (report.py reads it)
    pipeline = json.loads((out / "bench_pipeline.json").read_text())
    entries = {b["extra_info"]["variant"]: b["extra_info"] for b in pipeline["benchmarks"]}
    assert set(entries) == {"plain"} and "machine_info" in pipeline, summary
    for extra in entries.values():
        assert extra["it_per_s"] > 0 and extra["first_call_s"] > 0 and extra["hardware"]
        assert extra["agrees_with_plain"] and extra["rel_error_vs_plain"] <= 1e-5
    assert "[pipeline cpu tiny-sd" in summary and "ms per UNet step" in summary  # both tables in the summary
    assert "not in this run: STAGES=pipeline2" in summary
    ET.parse(out / "tests.xml")  # well-formed JUnit
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"micro.log", "bench_e2e.log", "tests.log", "build.log", "summary.txt", "env.txt",
            "sanitizer_racecheck_softmax.log", "bench_pipeline.log", "breakdown.json"} <= names
    assert "git:" in (out / "env.txt").read_text()
    assert summary.count("total ") == 1  # one packaging, not one per background job
    # the tests' digest: counts from the JUnit file, crashes, the slowest tests, xdist workers lost
    assert re.search(r"tests\.xml: (\d+) of \1 selected tests \(complete\)", summary), summary
    assert re.search(r"tests\.xml: \d+ tests: \d+ passed, 0 failed, 0 errors, \d+ skipped; 0 crashed", summary), summary
    assert "xdist workers went down" in summary and "Triton cache:" in summary
    if os.path.exists(os.path.join(ROOT, "scripts", "native_selfcheck.py")):
        assert "native_selfcheck.log" in names and "FAIL  native self-check" not in summary
    else:
        assert "SKIP  native self-check: scripts/native_selfcheck.py is not in this checkout" in summary


def test_dry_run_holds_the_tests_cap_back_from_the_stages_before_them(tmp_path):
    # deadline 45, tests' cap 30: the stages before the tests must end by 45 - 10 - 30 = 5 s, under the 10 s a
    # stage needs, so the build and the micro stage are skipped for the hold, and the tests still get their
    # turn (a hung stand-in here, cut at what is left of its cap).
    out = tmp_path / "out"
    proc = run_script(out, timeout=180, DDIM_FAST_CHECK_DEADLINE="45", CAP_tests="30", STAGES="micro,tests",
                      DRY_RUN_SLOW="tests")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1, summary
    for stage in ("build", "micro-benchmark"):
        assert re.search(r"SKIP  " + stage + r".*after the 30s held for the tests", summary), summary
    assert re.search(r"pytest the CUDA tests .*cut at its limit of [1-3]\ds", summary), summary
    assert not re.search(r"SKIP  pytest the CUDA tests", summary), summary


def test_dry_run_of_a_later_stage_alone(tmp_path):
    # STAGES=pipeline2: the rows the default run leaves, in a device run of their own; nothing else runs.
    out = tmp_path / "out"
    proc = run_script(out, timeout=300, STAGES="pipeline2")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    assert re.search(r"ok    pipeline2: bench_pipeline.py .*collection only", summary), summary
    for stage in ("micro", "bench", "generate", "tests", "pipeline", "breakdown"):
        assert f"SKIP  {stage} (not in STAGES=pipeline2)" in summary, stage
    assert not re.search(r"(ok|FAIL)  +pipeline3", summary)
    with tarfile.open(out / "logs.tar.gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bench_pipeline2.log"))
        log = tar.extractfile(member).read().decode()
    assert "sd15-b4-plain" in log and "sd15-b1-compile-default" in log and "sd15-b1-optimize-compile" in log
    assert "sd15-b1-plain" not in log and "sdxl" not in log and "cpu_tiny" not in log


# --------------------------------------------------------------------------------------------------
# the pytest plugin and the SIGINT path
# --------------------------------------------------------------------------------------------------

_TESTS = textwrap.dedent('''
    import time
    import pytest

    requires_cuda = pytest.mark.skipif(False, reason="needs a CUDA device")

    @requires_cuda
    def test_marked_cuda():
        pass

    def test_plain_cpu():
        pass

    def test_slow():
        time.sleep(float(__import__("os").environ.get("SLOW", "0")))
''')


def _pytest(tmp_path, *args, env=None, timeout=120, wrap=()):
    (tmp_path / "test_mixed.py").write_text(_TESTS)
    (tmp_path / "test_whole.py").write_text("def test_in_whole_file():\n    pass\n")
    full_env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {}))
    cmd = [*wrap, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_gpu_check",
           "--rootdir", str(tmp_path), "-c", os.devnull, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)


def _junit_cases(path):
    root = ET.parse(path).getroot()
    return {case.get("name"): case for case in root.iter("testcase")}


def test_plugin_keeps_only_cuda_tests(tmp_path):
    proc = _pytest(tmp_path, "test_mixed.py", "test_whole.py", "--cuda-only", "--cuda-files=test_whole.py",
                   "--junitxml", str(tmp_path / "j.xml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(_junit_cases(tmp_path / "j.xml")) == {"test_marked_cuda", "test_in_whole_file"}
    assert "pytest_gpu_check: 2 tests selected" in proc.stdout


def test_plugin_per_test_timeout_fails_the_slow_test_only(tmp_path):
    proc = _pytest(tmp_path, "test_mixed.py", "--per-test-timeout=1", "--junitxml", str(tmp_path / "j.xml"),
                   env={"SLOW": "30"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cases = _junit_cases(tmp_path / "j.xml")
    assert cases["test_slow"].find("failure") is not None
    assert "per-test-timeout" in cases["test_slow"].find("failure").get("message", "") + proc.stdout
    assert cases["test_plain_cpu"].find("failure") is None


_ISOLATED = textwrap.dedent('''
    import os, signal, time
    import pytest

    def test_before():
        pass

    @pytest.mark.isolate
    def test_segfaults():
        os.kill(os.getpid(), signal.SIGSEGV)

    def test_raises_in_child():
        assert os.environ.get("PYTEST_XDIST_WORKER") is None  # the child is no xdist worker
        with pytest.raises(ValueError):
            int("x")

    def test_raises_wrongly():
        with pytest.raises(ValueError):
            pass

    @pytest.mark.isolate
    def test_skips_in_child():
        pytest.skip("said the child")

    @pytest.mark.isolate
    @pytest.mark.parametrize("value", ["a b", "c[d]"])
    def test_odd_ids(value):
        assert value

    @pytest.mark.isolate
    def test_hangs():
        time.sleep(float(os.environ.get("HANG", "0")))

    def test_after():
        pass
''')


def _isolated_run(tmp_path, *args):
    # Plugin autoload off, as in gpu_check.sh: the children start in about a second.
    (tmp_path / "test_isolated.py").write_text(_ISOLATED)
    proc = _pytest(tmp_path, "test_isolated.py", "--isolate", "--junitxml", str(tmp_path / "j.xml"), *args,
                   env={"HANG": "60", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, timeout=300)
    return proc, _junit_cases(tmp_path / "j.xml")


def _check_isolated(proc, cases):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "INTERNALERROR" not in out
    # the crash is one failed test, named, with the signal; every other test ran and kept its own outcome
    crash = cases["test_segfaults"].find("failure")
    assert crash is not None and "SIGSEGV" in (crash.get("message", "") + (crash.text or "")), out
    hung = cases["test_hangs"].find("failure")
    hung = hung if hung is not None else cases["test_hangs"].find("error")  # killed before its setup ended
    assert hung is not None and "did not finish within 15 s" in hung.text, out
    assert "DID NOT RAISE" in cases["test_raises_wrongly"].find("failure").get("message", "")
    assert cases["test_skips_in_child"].find("skipped").get("message") == "said the child"
    for name in ("test_before", "test_raises_in_child", "test_odd_ids[a b]", "test_odd_ids[c[d]]", "test_after"):
        assert all(case.find(tag) is None for case in [cases[name]] for tag in ("failure", "error", "skipped")), name
    assert len(cases) == 9


def test_plugin_isolates_tests_that_may_crash(tmp_path):
    _check_isolated(*_isolated_run(tmp_path, "--isolate-timeout=15"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import pytest_gpu_check
    finally:
        sys.path.pop(0)
    digest = pytest_gpu_check.junit_summary(str(tmp_path / "j.xml"))
    assert digest.startswith("tests.xml: 9 tests: 5 passed, 3 failed, 0 errors, 1 skipped; 1 crashed;"), digest
    assert "crashed: test_isolated::test_segfaults" in digest
    assert "(INCOMPLETE: 1 never ran)" in pytest_gpu_check.junit_summary(str(tmp_path / "j.xml"), selected=10)


def test_plugin_isolates_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    _check_isolated(*_isolated_run(tmp_path, "--isolate-timeout=15", "-p", "xdist.plugin", "-n", "2"))


def test_timeout_with_sigint_still_writes_junit(tmp_path):
    # What the tests stage does: `timeout --signal=INT` around pytest, in the foreground.
    proc = _pytest(tmp_path, "test_mixed.py", "--junitxml", str(tmp_path / "j.xml"), env={"SLOW": "60"},
                   wrap=("timeout", "--signal=INT", "--kill-after=20", "8"))
    assert proc.returncode in (2, 124, -signal.SIGINT), proc.stdout + proc.stderr
    cases = _junit_cases(tmp_path / "j.xml")
    assert "test_plain_cpu" in cases and cases["test_plain_cpu"].find("failure") is None
