"""A pytest plugin for the device check (``benchmarks/gpu_check.sh``, stage 5), loaded with
``-p pytest_gpu_check`` (``benchmarks/`` on ``PYTHONPATH``):

* ``--cuda-only``: keep only the CUDA tests — every test of a file named in ``--cuda-files`` (comma-separated
  paths, the files that exist for the GPU code), and elsewhere the tests carrying a ``skipif`` mark whose reason
  names CUDA or a GPU (the suite's ``requires_cuda`` markers), so the CPU tests of mixed files do not spend the
  lease's minutes;
* ``--per-test-timeout S``: fail a test that runs longer than S seconds (SIGALRM in the process running it,
  with a traceback of every thread dumped to stderr first), for images without pytest-timeout. A test stuck
  inside one C call (a kernel that never returns) is interrupted when that call returns; the stage's own
  ``timeout --signal=INT`` covers the rest, and pytest still writes its JUnit XML then.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import pytest

CUDA_WORDS = ("cuda", "gpu")


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check")
    group.addoption("--cuda-only", action="store_true", default=False,
                    help="keep only CUDA tests (see benchmarks/pytest_gpu_check.py)")
    group.addoption("--cuda-files", default="", help="comma-separated test files whose every test is kept")
    group.addoption("--per-test-timeout", type=float, default=0.0,
                    help="fail a test after this many seconds (0: off)")


def is_cuda_test(item) -> bool:
    for mark in item.iter_markers(name="skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if any(word in reason for word in CUDA_WORDS):
            return True
    return False


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


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
