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
EXPECTED = {"summary.txt", "env.txt", "micro.json", "bench_e2e.json", "bench_pipeline.json", "generate.json",
            "tests.xml", "logs.tar.gz"}

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
    order = ["build", "native kernels registered", "micro-benchmark", "python -m ddim_fast bench",
             "pipeline", "generate", "pytest the CUDA tests"]
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
    ET.parse(out / "tests.xml")  # well-formed JUnit
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"micro.log", "bench_e2e.log", "tests.log", "build.log", "summary.txt", "env.txt",
            "sanitizer_racecheck_softmax.log"} <= names
    assert "git:" in (out / "env.txt").read_text()
    assert summary.count("total ") == 1  # one packaging, not one per background job


def test_dry_run_past_its_deadline_skips_the_stages_and_still_packages(tmp_path):
    out = tmp_path / "out"
    proc = run_script(out, timeout=120, DDIM_FAST_CHECK_DEADLINE="12")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1
    for stage in ("build", "micro-benchmark", "python -m ddim_fast bench", "pytest the CUDA tests"):
        assert re.search(r"SKIP  " + re.escape(stage) + r".*global deadline", summary), (stage, summary)
    assert {p.name for p in out.iterdir()} >= {"summary.txt", "env.txt", "logs.tar.gz"}


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


def test_plugin_per_test_timeout_fails_the_slow_test_only(tmp_path):
    proc = _pytest(tmp_path, "test_mixed.py", "--per-test-timeout=1", "--junitxml", str(tmp_path / "j.xml"),
                   env={"SLOW": "30"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cases = _junit_cases(tmp_path / "j.xml")
    assert cases["test_slow"].find("failure") is not None
    assert "per-test-timeout" in cases["test_slow"].find("failure").get("message", "") + proc.stdout
    assert cases["test_plain_cpu"].find("failure") is None


def test_timeout_with_sigint_still_writes_junit(tmp_path):
    # What the tests stage does: `timeout --signal=INT` around pytest, in the foreground.
    proc = _pytest(tmp_path, "test_mixed.py", "--junitxml", str(tmp_path / "j.xml"), env={"SLOW": "60"},
                   wrap=("timeout", "--signal=INT", "--kill-after=20", "8"))
    assert proc.returncode in (2, 124, -signal.SIGINT), proc.stdout + proc.stderr
    cases = _junit_cases(tmp_path / "j.xml")
    assert "test_plain_cpu" in cases and cases["test_plain_cpu"].find("failure") is None
