"""scripts/triton_aot_check.py: it finds spills (a kernel built to spill fails, a small one passes), it
enumerates both kernels, and it skips cleanly without triton.

Every case runs in a subprocess: the check compiles real GPU code, so triton must be imported there with
TRITON_INTERPRET unset (this test session sets it, and @triton.jit then builds interpreter functions).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "triton_aot_check.py"

pytest.importorskip("triton")

# One kernel whose [N, N] fp32 tile must stay live across a column reduction: with one warp, N = 128 needs
# 512 values per thread (ptxas caps at 255 registers, so it spills); N = 16 needs 8.
PROBE_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def probe_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tile = tl.load(x_ptr + offs[:, None] * N + offs[None, :])
    scaled = tile / tl.max(tile, axis=0)[None, :]
    tl.store(out_ptr + offs[:, None] * N + offs[None, :], scaled * tl.sum(tile, axis=1)[:, None])
'''

PROBE_DRIVER = '''
import sys
sys.path.insert(0, {script_dir!r})
sys.path.insert(0, {probe_dir!r})
import triton_aot_check as check
import torch

check._KERNEL_FNS["probe"] = ("probe_module", "probe_kernel")
for n in (128, 16):
    meta = torch.empty(n * n, device="meta", dtype=torch.float32)
    variant = check.Variant("probe", 90, f"N={{n}}", f"N={{n}}", [meta, meta], dict(N=n, num_warps=1))
    _, result = check.compile_one((0, "probe", 90, check.specialize(variant)))
    print(f"N={{n}} regs={{result.regs}} spills={{result.spill_stores}}/{{result.spill_loads}} "
          f"error={{result.error!r}} verdict={{check.verdict(result, 90, 1)!r}}")
'''


def run_python(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # cold: the compile really runs ptxas
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_spilling_kernel_fails_and_small_kernel_passes(tmp_path):
    (tmp_path / "probe_module.py").write_text(PROBE_KERNEL)
    driver = PROBE_DRIVER.format(script_dir=str(SCRIPT.parent), probe_dir=str(tmp_path))
    proc = run_python(["-c", textwrap.dedent(driver)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    big, small = lines["N=128"], lines["N=16"]
    assert "error=''" in big and "verdict='spills" in big, big
    assert "spills=0/0" in small and "verdict=''" in small and "error=''" in small, small


def test_dry_run_enumerates_both_kernels(tmp_path):
    proc = run_python([str(SCRIPT), "--quick", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {}
    for line in proc.stdout.splitlines():
        if "distinct compiles" in line:
            name = line.split()[1]
            counts[name] = int(line.split(":")[1].split()[0])
    assert counts.get("ddim_step", 0) > 0 and counts.get("attention", 0) > 0, proc.stdout


def test_skips_without_triton(tmp_path):
    # sys.modules["triton"] = None makes `import triton` raise ImportError, as on a machine without it.
    code = (f"import sys, runpy; sys.modules['triton'] = None; sys.argv = [{str(SCRIPT)!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = run_python(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout
