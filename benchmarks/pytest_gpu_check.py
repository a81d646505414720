"""A pytest plugin for the device check (``benchmarks/gpu_check.sh``, stage 5), loaded with
``-p pytest_gpu_check`` (``benchmarks/`` on ``PYTHONPATH``):

* ``--cuda-only``: keep only the CUDA tests — every test of a file named in ``--cuda-files`` (comma-separated
  paths, the files that exist for the GPU code), and elsewhere the tests carrying a ``skipif`` mark whose reason
  names CUDA or a GPU (the suite's ``requires_cuda`` markers), so the CPU tests of mixed files do not spend the
  lease's minutes;
* ``--isolate``: run each test that could kill its process in a child process of its own, so a crash costs
  that one test (reported as a failure naming the test and the signal) and never the pytest-xdist worker
  running it, with the worker's queue and a restart (10-20 s of imports on the GPU image). Isolated: the tests
  marked ``isolate``, and every test whose own body uses ``pytest.raises`` (error paths: on the first H200
  image every error raised inside the C++ extension segfaulted the process, issue 17). A test whose skip
  marks already skip it runs in process. The child is ``python -m pytest NODEID`` with this plugin writing
  each report as JSON (``--isolate-report``); the parent logs those reports as its own, so the terminal,
  the JUnit XML and xdist see one ordinary test;
* ``--per-test-timeout S``: fail a test that runs longer than S seconds (SIGALRM in the process running it,
  with a traceback of every thread dumped to stderr first), for images without pytest-timeout. A test stuck
  inside one C call (a kernel that never returns) is interrupted when that call returns; the stage's own
  ``timeout --signal=INT`` covers the rest, and pytest still writes its JUnit XML then.

With ``--cuda-only`` it prints ``pytest_gpu_check: N tests selected``. Run as a script, it summarizes a JUnit
file for summary.txt: ``python pytest_gpu_check.py tests.xml [N]`` (N: that count, to tell a complete file).
"""

from __future__ import annotations

import faulthandler
import functools
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

CUDA_WORDS = ("cuda", "gpu")
ISOLATE_MARK = "isolate"
# Seconds a child gets beyond the test itself: interpreter start, imports (torch, the test module), CUDA init.
CHILD_STARTUP_S = 30.0
DEFAULT_TEST_TIMEOUT_S = 60.0


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check")
    group.addoption("--cuda-only", action="store_true", default=False,
                    help="keep only CUDA tests (see benchmarks/pytest_gpu_check.py)")
    group.addoption("--cuda-files", default="", help="comma-separated test files whose every test is kept")
    group.addoption("--per-test-timeout", type=float, default=0.0,
                    help="fail a test after this many seconds (0: off)")
    group.addoption("--isolate", action="store_true", default=False,
                    help=f"run tests marked {ISOLATE_MARK!r} and tests using pytest.raises in a child process each")
    group.addoption("--isolate-timeout", type=float, default=0.0,
                    help="seconds an isolated test's child process may run (0: from the per-test timeout)")
    group.addoption("--isolate-report", default="", help="(internal) write every test report here as JSON lines")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{ISOLATE_MARK}: the device check runs this test in a child process of its own "
                   "(benchmarks/pytest_gpu_check.py --isolate): it may kill the process it runs in")


# --------------------------------------------------------------------------------------------------
# --cuda-only
# --------------------------------------------------------------------------------------------------


def is_cuda_test(item) -> bool:
    for mark in item.iter_markers(name="skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if any(word in reason for word in CUDA_WORDS):
            return True
    return False


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _announce_selected(config, count: int) -> None:
    """One terminal line with the number of tests selected (gpu_check.sh compares the JUnit file with it)."""
    global _announced
    if _announced or not config.getoption("--cuda-only"):
        return
    _announced = True
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"pytest_gpu_check: {count} tests selected")


_announced = False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):  # the xdist controller: every worker collects the same
    _announce_selected(node.config, len(ids))


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):  # not inside an xdist worker
        _announce_selected(session.config, len(session.items))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--cuda-only"):
        return
    whole = {_norm(p) for p in config.getoption("--cuda-files").split(",") if p.strip()}
    keep, drop = [], []
    for item in items:
        (keep if _norm(str(item.path)) in whole or is_cuda_test(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------------------------------
# --isolate: one child process per test that could crash
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _uses_pytest_raises(function) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return "pytest.raises(" in source


def should_isolate(item) -> bool:
    if item.get_closest_marker(ISOLATE_MARK) is not None:
        return True
    function = getattr(item, "function", None)
    return function is not None and _uses_pytest_raises(function)


def _skipped_by_marks(item) -> bool:
    """True when a skip/skipif mark skips the test here (nothing to isolate: it never runs)."""
    try:
        from _pytest.skipping import evaluate_skip_marks
    except ImportError:  # a pytest without it: isolate, the child skips
        return False
    try:
        return evaluate_skip_marks(item) is not None
    except Exception:  # a condition that fails to evaluate: let the normal protocol report it
        return True


def _child_timeout(config) -> float:
    """Seconds the child may take: --isolate-timeout, else under pytest-timeout's per-test limit when one
    is set (so the parent reports the timeout, not pytest-timeout's alarm inside the parent's wait), else
    the per-test timeout plus start-up."""
    if config.getoption("--isolate-timeout") > 0:
        return config.getoption("--isolate-timeout")
    outer = getattr(config.option, "timeout", None)  # pytest-timeout's --timeout, when loaded
    if outer:
        return max(5.0, float(outer) - 5.0)
    own = config.getoption("--per-test-timeout") or DEFAULT_TEST_TIMEOUT_S
    return own + CHILD_STARTUP_S


def _child_command(item, report_path: str, timeout: float) -> list[str]:
    config = item.config
    inifile = str(config.inipath) if config.inipath else os.devnull
    cmd = [sys.executable, "-m", "pytest", item.nodeid, "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-p", __name__, "--isolate-report", report_path, "--rootdir", str(config.rootpath), "-c", inifile,
           # a test still running near the limit dumps every thread's stack before the parent kills it
           "-o", f"faulthandler_timeout={max(1, int(timeout - 3))}"]
    per_test = config.getoption("--per-test-timeout")
    if per_test:
        cmd.append(f"--per-test-timeout={per_test:g}")
    return cmd


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    env.pop("PYTEST_ADDOPTS", None)  # the parent's -n / --junitxml must not reach the child
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _synthetic_report(item, when: str, outcome: str, longrepr, duration: float = 0.0):
    from _pytest.reports import TestReport

    return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, outcome, longrepr, when,
                      sections=[], duration=duration, start=time.time() - duration, stop=time.time(),
                      user_properties=list(item.user_properties))


def run_isolated(item) -> None:
    """Run `item` in a child pytest and log the child's reports (or a crash report) as this process's."""
    config = item.config
    timeout = _child_timeout(config)
    fd, report_path = tempfile.mkstemp(prefix="isolated_", suffix=".jsonl")
    os.close(fd)
    t0 = time.monotonic()
    output, problem = "", None
    try:
        proc = subprocess.run(_child_command(item, report_path, timeout), cwd=str(config.rootpath),
                              env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout)
        output = proc.stdout
        if proc.returncode < 0:
            problem = f"the child process running it was killed by {_signal_name(proc.returncode)}"
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        problem = f"the child process running it did not finish within {timeout:g} s (killed)"
    elapsed = time.monotonic() - t0
    reports = []
    try:
        with open(report_path) as f:
            for line in f:
                if line.strip():
                    reports.append(config.hook.pytest_report_from_serializable(config=config, data=json.loads(line)))
    finally:
        os.unlink(report_path)
    reports = [r for r in reports if r is not None and getattr(r, "nodeid", None) == item.nodeid]
    for report in reports:
        report.nodeid, report.location = item.nodeid, item.location
        if isinstance(report.longrepr, list):  # a skip's (path, line, reason), a list after JSON
            report.longrepr = tuple(report.longrepr)
    phases = {r.when: r for r in reports}
    if problem is None and "teardown" not in phases:
        problem = ("the child process ran no complete test for this node id "
                   f"(exit status {proc.returncode}, phases reported: {sorted(phases) or 'none'})")
    if problem is not None:
        # Whatever the child reported, the test failed: its setup if that is where it stopped, else its call.
        tail = "\n".join(output.splitlines()[-60:])
        message = f"{item.nodeid}: {problem} [isolated test, {elapsed:.1f} s]\n--- child output (tail) ---\n{tail}"
        setup = phases.get("setup")
        if setup is None or not setup.passed:
            reports = [_synthetic_report(item, "setup", "failed", message, elapsed)]
        else:
            reports = [setup, _synthetic_report(item, "call", "failed", message, elapsed)]
        reports.append(_synthetic_report(item, "teardown", "passed", None))
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if not item.config.getoption("--isolate") or not should_isolate(item) or _skipped_by_marks(item):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    run_isolated(item)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_runtest_logreport(report):
    """In a child (--isolate-report): append each report as one JSON line, flushed, so a crash keeps the
    reports of the phases that finished."""
    path = _report_path
    if not path:
        return
    data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
    with open(path, "a") as f:
        f.write(json.dumps(data) + "\n")


_report_path = ""
_config = None


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    global _report_path, _config
    _config = session.config
    _report_path = session.config.getoption("--isolate-report")


# --------------------------------------------------------------------------------------------------
# --per-test-timeout
# --------------------------------------------------------------------------------------------------


class PerTestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = item.config.getoption("--per-test-timeout")
    usable = seconds and seconds > 0 and hasattr(signal, "setitimer")
    if usable:
        def on_alarm(signum, frame):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            raise PerTestTimeout(f"{item.nodeid} ran longer than --per-test-timeout={seconds:g} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if usable:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------------
# summary of a JUnit file (gpu_check.sh writes it into summary.txt)
# --------------------------------------------------------------------------------------------------


def junit_summary(path: str, slowest: int = 8, selected: int | None = None) -> str:
    """Counts, crashes and the slowest tests of a JUnit XML file, as a few lines of text; with `selected`
    (the run's "N tests selected" line), whether the file holds every selected test."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    counts = dict(passed=0, failed=0, error=0, skipped=0)
    crashed = []
    for case in cases:
        kind = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), None)
        counts[{"failure": "failed", "error": "error", "skipped": "skipped", None: "passed"}[kind]] += 1
        text = " ".join((el.get("message") or "") + (el.text or "") for el in case if el.tag in ("failure", "error"))
        if "crashed while running" in text or "child process running it was killed" in text:
            crashed.append(f"{case.get('classname')}::{case.get('name')}")
    total_time = sum(float(c.get("time") or 0) for c in cases)
    if selected is not None:
        complete = "complete" if len(cases) >= selected else f"INCOMPLETE: {selected - len(cases)} never ran"
        lines = [f"tests.xml: {len(cases)} of {selected} selected tests ({complete})"]
    else:
        lines = []
    lines += [f"tests.xml: {len(cases)} tests: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['error']} errors, {counts['skipped']} skipped; {len(crashed)} crashed; "
             f"{total_time:.0f} s of test time"]
    lines += [f"  crashed: {name}" for name in crashed[:10]]
    cases.sort(key=lambda c: -float(c.get("time") or 0))
    lines.append("  slowest: " + ", ".join(f"{c.get('name')} {float(c.get('time') or 0):.1f}s"
                                          for c in cases[:slowest]))
    return "\n".join(lines)


if __name__ == "__main__":
    # python pytest_gpu_check.py JUNIT.xml [SELECTED]
    print(junit_summary(sys.argv[1], selected=int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else None))
