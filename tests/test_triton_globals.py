"""Triton's launch-time check of the globals a kernel read, run without a GPU.

Before every GPU launch, Triton's JIT (``JITFunction.run``, triton 3.6) compares each global that the kernel
and the functions it calls read at compile time with its current value, with ``!=``, and refuses to launch
when one differs. The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) never runs that check, so
a global that compares unequal to itself (``tl.constexpr(float("nan"))``) passed every CPU test and made the
Triton step unlaunchable on the first H200 run (2026-12-04). Here the same comparison runs for every
``@triton.jit`` function of ``ddim_fast.triton``, on the globals Triton's own dependency finder records
(``JITFunction.cache_key`` fills ``used_global_vals`` with the deep copies a launch compares against).

It runs in a subprocess with ``TRITON_INTERPRET=0``: under the interpreter ``@triton.jit`` builds
``InterpretedFunction`` objects, which Triton's dependency finder does not walk. Computing ``cache_key``
needs no GPU and no driver.

Also here: the launchers' own refusal of CPU tensors outside the interpreter (another path only a real launch
takes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

# Printed as JSON by the child: {"kernels": {qualified name: [failing globals]}}.
_CHECK = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    from triton.runtime.jit import JITFunction

    def jit_functions(package_name):
        package = importlib.import_module(package_name)
        paths = getattr(package, "__path__", None)
        modules = [package] if paths is None else [
            importlib.import_module(f"{package_name}.{info.name}") for info in pkgutil.iter_modules(paths)]
        for module in modules:
            for name, value in vars(module).items():
                if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                    yield f"{module.__name__}.{name}", value

    def failing_globals(fn):
        # What JITFunction.run raises on before a launch: a used global whose current value compares
        # unequal (`!=`, as Triton does) to the copy recorded when the kernel was compiled.
        fn.cache_key  # runs Triton's DependenciesFinder, which fills used_global_vals
        missing = object()
        out = []
        for (name, _), (recorded, globals_dict) in fn.used_global_vals.items():
            current = globals_dict.get(name, missing)
            if current != recorded:
                out.append(f"{name} (recorded {recorded!r}, now {current!r})")
        return out

    result = {name: failing_globals(fn) for name, fn in jit_functions(sys.argv[1])}
    print(json.dumps({"kernels": result}))
""")


def _run_check(package: str, extra_path: Path | None = None) -> dict[str, list[str]]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _CHECK, package], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=180)
    assert proc.returncode == 0, f"the globals check itself failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])["kernels"]


@pytest.fixture(scope="module")
def package_result():
    return _run_check("ddim_fast.triton")


def test_every_kernel_passes_tritons_launch_time_globals_check(package_result):
    # The launch entry points must be among the functions checked (and through them, what they call).
    short = {name.rsplit(".", 1)[-1] for name in package_result}
    assert {"_ddim_step_kernel", "_attention_kernel"} <= short, sorted(package_result)
    failing = {name: bad for name, bad in package_result.items() if bad}
    assert not failing, ("Triton would refuse every GPU launch of these kernels ('Global variable ... has changed "
                         f"since we compiled this kernel'): {failing}. A global read by jit code must compare equal "
                         "to itself (no NaN constexpr): build such values inside the kernel.")


def test_the_check_catches_a_nan_global(tmp_path):
    """The check can fail: a kernel whose helper reads a NaN constexpr global (the 2026-12-04 defect) is caught,
    both in the helper and, through Triton's transitive walk, in the kernel that calls it."""
    (tmp_path / "nan_global_kernels.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        _NAN = tl.constexpr(float("nan"))
        _ONE = tl.constexpr(1.0)

        @triton.jit
        def _helper(x):
            return tl.where(x > 0, x, _NAN)

        @triton.jit
        def _kernel(ptr):
            tl.store(ptr, _helper(tl.load(ptr)) * _ONE)
    """))
    result = _run_check("nan_global_kernels", extra_path=tmp_path)
    assert set(result) == {"nan_global_kernels._helper", "nan_global_kernels._kernel"}
    for name, bad in result.items():
        assert len(bad) == 1 and bad[0].startswith("_NAN"), (name, bad)


@pytest.mark.parametrize("launcher", ["attention", "geglu", "group_norm"])
def test_launchers_refuse_cpu_tensors_outside_the_interpreter(monkeypatch, launcher):
    """Without TRITON_INTERPRET=1 a CPU tensor is a RuntimeError naming the op and the argument before any launch
    (the interpreter that runs these tests is switched off for the check only)."""
    import torch

    import ddim_fast._library as library

    monkeypatch.setattr(library, "interpreting", lambda: False)
    module = library.triton_module(launcher)
    if launcher == "attention":
        q = torch.randn(1, 1, 16, 16)
        call, op, arg = (lambda: module._check_inputs(q, q, q, None, 0.25)), "attention_triton", "q"
    elif launcher == "geglu":
        call, op, arg = (lambda: module.geglu_triton_impl(torch.randn(2, 8))), "geglu_triton", "h"
    else:
        x = torch.randn(1, 4, 2, 2)
        call, op, arg = (lambda: module.group_norm_silu_triton_impl(x, None, None, 2, 1e-5, True)), \
            "group_norm_silu_triton", "x"
    with pytest.raises(RuntimeError, match=f"{op}: {arg} must be a CUDA tensor, got cpu .*TRITON_INTERPRET=1"):
        call()
