"""scripts/triton_aot_check.py: it finds spills (a kernel built to spill fails, a small one passes), it
enumerates both kernels, and it skips cleanly without triton.

Every case runs in a subprocess: the check compiles real GPU code, so triton must be imported there with
TRITON_INTERPRET unset (this test session sets it, and @triton.jit then builds interpreter functions).
"""

from __future__ import annotations

import json
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


def test_dry_run_enumerates_every_kernel(tmp_path):
    proc = run_python([str(SCRIPT), "--quick", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {}
    for line in proc.stdout.splitlines():
        if "distinct compiles" in line:
            name = line.split()[1]
            counts[name] = int(line.split(":")[1].split()[0])
    assert counts.get("ddim_step", 0) > 0 and counts.get("attention", 0) > 0, proc.stdout
    for kernel in ("group_norm_stats", "group_norm_finalize", "group_norm_apply", "geglu"):
        assert counts.get(kernel, 0) > 0, proc.stdout


def test_skips_without_triton(tmp_path):
    # sys.modules["triton"] = None makes `import triton` raise ImportError, as on a machine without it.
    code = (f"import sys, runpy; sys.modules['triton'] = None; sys.argv = [{str(SCRIPT)!r}]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = run_python(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout


# ------------------------------------------------------------------------------------------------
# The code-property checks: each fails on a bad compile and passes on a good one
# ------------------------------------------------------------------------------------------------

def _check_module():
    """scripts/triton_aot_check.py as a module (its parsers and rules import nothing heavy)."""
    import importlib.util

    if "triton_aot_check_under_test" in sys.modules:
        return sys.modules["triton_aot_check_under_test"]
    spec = importlib.util.spec_from_file_location("triton_aot_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        spec.loader.exec_module(module)  # it pops TRITON_INTERPRET for its own compiles: put it back
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module


PTX_SAMPLE = """
	ld.global.b64 	%rd9, [%rd1];
	// begin inline asm
	@%p1 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
	// end inline asm
	@%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r31 + 0 ], [ %rd16 + 0 ], 0x10, %r34;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	cp.async.cg.shared.global [ %r40 + 0 ], [ %rd20 + 0 ], 0x10, %r34;
	ex2.approx.f32 	%r372, %r371;
	ex2.approx.ftz.f32 	%r373, %r371;
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %r1, %r2, %r3, %r4 }, { %r5 }, { %r6 }, { %r1 };
	@%p26 bra 	$L__BB0_2;
$L__BB0_3:
	@%p3 st.global.v2.b32 [ %rd5 + 0 ], { %r9, %r10 };
	st.global.b16 [ %rd6 + 0 ], { %rs2 };
"""


def test_analyze_ptx_reads_widths_copies_exps_and_mma():
    props = _check_module().analyze_ptx(PTX_SAMPLE)
    assert props["load_widths"] == {2: 1, 8: 1, 16: 1}
    assert props["store_widths"] == {2: 1, 8: 1}
    assert (props["max_global_load_bytes"], props["max_global_store_bytes"], props["min_global_load_bytes"]) == (16, 8, 2)
    assert (props["cp_async"], props["cp_async_in_loop"], props["cp_async_bytes"]) == (2, 1, 16)
    assert (props["ex2"], props["mma"], props["mma_kind"]) == (2, 1, "mma.sync")


def _good_props(**changes):
    props = dict(load_widths={16: 4}, store_widths={16: 2}, max_global_load_bytes=16, max_global_store_bytes=16,
                 min_global_load_bytes=16, cp_async=4, cp_async_in_loop=2, cp_async_bytes=16, min_cp_async_bytes=16,
                 tma=0, ex2=34, ex2_share=34, mma=8, mma_kind="wgmma", regs=114, warps_per_sm=16, blocks_per_sm=2,
                 occupancy=0.25, occupancy_limit="registers")
    props.update(changes)
    return props


@pytest.mark.parametrize("requirement,bad,message", [
    (dict(load_bytes=16), dict(max_global_load_bytes=8, load_widths={8: 4}), "widest global load 8 B < 16 B"),
    (dict(store_bytes=16), dict(max_global_store_bytes=2, store_widths={2: 16}), "widest global store 2 B < 16 B"),
    (dict(all_loads_bytes=16), dict(load_widths={16: 4, 2: 64}), "global loads narrower than 16 B"),
    (dict(all_loads_bytes=16), dict(min_cp_async_bytes=4), "global loads narrower than 16 B"),
    (dict(cp_async_in_loop=True), dict(cp_async_in_loop=0), "no cp.async/TMA copy inside the key loop"),
    (dict(ex2_share=True), dict(ex2=64, ex2_share=32), "ex2 per thread 64 != the tile's share 32 (duplicated"),
    (dict(ex2_share=True), dict(ex2_share=None), "no exponential found"),
    (dict(mma=True), dict(mma=0), "no MMA instruction"),
    (dict(max_regs=128), dict(regs=130), "registers: 130 > the tile class's budget 128"),
    (dict(min_warps_per_sm=16), dict(warps_per_sm=8), "occupancy: 114 registers allow 8 warps per SM"),
])
def test_property_rules_fail_on_a_bad_compile_and_pass_on_a_good_one(requirement, bad, message):
    check = _check_module()
    assert check.property_problems(requirement, _good_props()) == []
    problems = check.property_problems(requirement, _good_props(**bad))
    assert len(problems) == 1 and message in problems[0], problems


TTGIR_SAMPLE = """
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [WM, 1], instrShape = [16, 64, 16]}>
      %alpha_150 = math.exp %alpha : tensor<ROWSxf32, #ttg.slice<{dim = 1, parent = #mma}>> loc(#loc222)
      %p_153 = math.exp %p_152 : tensor<ROWSx64xf32, #mma> loc(#loc225)
      %q = tt.extern_elementwise %x {libname = "", libpath = "", pure = true, symbol = "__nv_expf"} : (tensor<16xf32, #ttg.slice<{dim = 1, parent = #blocked1}>>) -> tensor<16xf32, #ttg.slice<{dim = 1, parent = #blocked1}>> loc(#loc256)
"""


def test_a_tile_class_without_a_budget_fails():
    problems = _check_module().property_problems(dict(max_regs=0), _good_props())
    assert len(problems) == 1 and "no register budget recorded" in problems[0], problems


def test_expected_exp_count_is_the_tile_share():
    check = _check_module()
    # 128 rows x 64 keys on 8 warps along the rows: 32 score exps + 2 row rescales per thread, + 2 rows of the
    # 16-row blocked vector (2 x 4 row-threads).
    ttgir = TTGIR_SAMPLE.replace("WM", "8").replace("ROWS", "128")
    assert check.expected_exp_count(ttgir, 8) == 32 + 2 + 2
    # The share does not depend on the layout's duplication: 64 rows on 8 warps still expects 16 + 1 + 2 per
    # thread, so a kernel that computes each score twice (warpsPerCTA [8, 1]) shows 32 and fails.
    ttgir = TTGIR_SAMPLE.replace("WM", "8").replace("ROWS", "64")
    assert check.expected_exp_count(ttgir, 8) == 16 + 1 + 2
    assert check.expected_exp_count("no exp here", 4) is None


def test_occupancy_and_register_budget():
    check = _check_module()
    assert check.occupancy(90, 123, 8, 0)["warps_per_sm"] == 16  # 2 blocks of 8 warps
    assert check.occupancy(90, 168, 8, 0)["warps_per_sm"] == 8
    assert check.occupancy(90, 168, 4, 0)["warps_per_sm"] == 12
    limited = check.occupancy(80, 64, 4, 100_000)
    assert limited["blocks_per_sm"] == 1 and limited["occupancy_limit"] == "shared memory"
    assert check.register_budget(123, 8) == 128  # 10% would be 136, but 129+ registers lose the second block
    assert check.register_budget(168, 8) == 184  # one block either way: about 10%, rounded up to 8
    assert check.register_budget(72, 4) == 72


# Real compiles (sm_90, no GPU): the old duplicated d40 cross-attention tile, a misaligned launch and a key
# loop without pipelining fail; today's launch passes every rule. One subprocess, a cold Triton cache.
REAL_DRIVER = '''
import sys
sys.path.insert(0, {script_dir!r})
import triton_aot_check as check
import torch
from ddim_fast.triton import attention

def variant(name, lk, cfg, layout="ldm", misalign=False):
    q, k, v, out, mask = check._attention_tensors(torch, layout, 1, 4096, lk, 40, torch.float16, "none")
    if misalign:  # q's base one element off 16 bytes: the launcher refuses the vector path (ALIGN 1)
        q = torch.empty(q.numel() + 1, device="meta", dtype=q.dtype)[1:].view(q.shape)
    cfg = dict(dict(BLOCK_D=64, SINGLE_TILE=lk <= 128, num_stages=1), **cfg)
    _, args, kwargs = attention.kernel_arguments(q, k, v, out, mask, 0.15, cfg)
    if misalign:
        args[0] = check._Pointer(torch.float16, 2)  # what the JIT sees of a misaligned tensor
    expect = check.attention_expectations(dict(kwargs, ALIGN=8), torch.float16, 90)  # SD launches are aligned
    return check.Variant("attention", 90, name, name, args, kwargs, [f"d40 4096x{{lk}}"], expect)

def run(*a, **kw):
    v = variant(*a, **kw)
    _, result = check.compile_one((0, "attention", 90, check.specialize(v)))
    print(v.group, "|", check.verdict(result, 90, v.kwargs["num_warps"], v.expect) or "ok", "|", result.error[:300])

run("today", 77, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8))
run("duplicated", 77, dict(BLOCK_M=64, BLOCK_N=128, num_warps=8))
run("misaligned", 77, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8), misalign=True)
run("loop", 4096, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))
run("unpipelined", 4096, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=1))

# main() end to end on two of them: the summary, the exit status and the --json rows.
check.step_variants = lambda arch, quick: []
check.group_norm_variants = lambda arch, quick: []
check.geglu_variants = lambda arch, quick: []
check.attention_variants = lambda arch, quick: [variant("today", 77, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8)),
                                                variant("duplicated", 77, dict(BLOCK_M=64, BLOCK_N=128, num_warps=8))]
print("main |", check.main(["--arch", "90", "--jobs", "1", "--json", {json_path!r}]))
'''


def test_real_compiles_fail_the_rules_they_break(tmp_path):
    json_path = tmp_path / "rows.json"
    driver = REAL_DRIVER.format(script_dir=str(SCRIPT.parent), json_path=str(json_path))
    proc = run_python(["-c", driver], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(" | ")[0]: line for line in proc.stdout.strip().splitlines() if " | " in line}
    assert lines["today"].split(" | ")[1] == "ok", lines["today"]
    assert lines["loop"].split(" | ")[1] == "ok", lines["loop"]
    assert "ex2 per thread 64 != the tile's share 32 (duplicated exponentials)" in lines["duplicated"], lines["duplicated"]
    assert "widest global load 2 B < 16 B" in lines["misaligned"], lines["misaligned"]
    assert "no cp.async/TMA copy inside the key loop" in lines["unpipelined"], lines["unpipelined"]
    # main(): exit status 1 (one failing compile), and one JSON row per compile with the documented fields.
    assert lines["main"].split(" | ")[1].strip() == "1", proc.stdout[-3000:]
    assert "FAIL: 1 of 2 compiles" in proc.stdout and "attention: ex2 per thread x1" in proc.stdout, proc.stdout[-3000:]
    rows = json.loads(json_path.read_text())
    assert [r["status"] for r in rows] == ["ok", "FAIL"], rows
    for row in rows:
        for key in ("kernel", "arch", "dtype", "shape", "config", "regs", "spills", "max_global_load_bytes",
                    "max_global_store_bytes", "cp_async", "mma", "ex2", "ex2_share", "warps_per_sm", "occupancy"):
            assert key in row, key
    today = rows[0]
    assert (today["kernel"], today["arch"], today["dtype"], today["max_global_load_bytes"]) == ("attention", "sm_90", "fp16", 16)
    assert today["mma"] > 0 and today["ex2"] == today["ex2_share"] == 64 and today["spills"] == 0
