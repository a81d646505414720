"""The package as a user meets it: ``import ddim_fast`` registers every op and stays light (no Dynamo,
Triton or diffusers imported), the public import paths work, and the layout has no import cycles."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddim_fast"

OPS = ("ddim_step", "ddim_step_out", "ddim_step_triton", "ddim_step_triton_out", "scaled_masked_softmax",
       "scaled_masked_softmax_", "attention", "attention_triton", "group_norm_silu", "group_norm_silu_triton", "geglu",
       "geglu_triton")


def _run(code: str) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_registers_every_op_without_heavy_imports():
    out = _run(
        "import sys, torch, ddim_fast\n"
        f"ops = {OPS!r}\n"
        "missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key('ddim_fast::' + n, 'Meta')]\n"
        "assert not missing, missing\n"
        "x = torch.randn(2, 4, 3)\n"
        "table = ddim_fast.schedule.coefficient_table([1, 0], [0.5, 0.9], [0.9, 1.0])\n"
        "out, _ = torch.ops.ddim_fast.ddim_step(x, torch.randn(2, 4, 3), table, torch.tensor([0]), None, 'epsilon',"
        " None, None, False, None, None, 1.0, False)\n"
        "assert out.shape == x.shape\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton', 'diffusers', 'transformers') if m in sys.modules))\n")
    assert out.strip() == "[]", f"import ddim_fast pulled in {out.strip()}"


def test_public_import_paths():
    _run(
        "import ddim_fast, ddim_fast.ops, ddim_fast.attention\n"
        "from ddim_fast import (FastDDIMSampler, FastDDIMScheduler, FastDDIMInverseScheduler, FusedAttnProcessor,"
        " patch_attention, unpatch_attention, graphed_denoise_loop, slerp, fused_attention, ops, reference,"
        " schedule)\n"
        "from ddim_fast import fuse_unet_body, unfuse_unet_body, unet_ops, unet_fusion\n"
        "from ddim_fast.unet_ops import group_norm_silu, geglu\n"
        "from ddim_fast.attention_processors import FusedAttnProcessor as P, patch_attention as pa\n"
        "assert P is FusedAttnProcessor and pa is patch_attention\n"
        "assert callable(ddim_fast.ops.ddim_step)\n")


def _imports_of(path: Path) -> set[str]:
    """ddim_fast modules imported anywhere in `path` (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("ddim_fast"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if (PACKAGE / (sub.replace("ddim_fast.", "", 1).replace(".", "/") + ".py")).exists()
                              or (PACKAGE / sub.replace("ddim_fast.", "", 1).replace(".", "/")).is_dir()
                              else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ddim_fast"))
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_import_cycles_and_tools_apart():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        # The package __init__ resolves public names lazily; importing `ddim_fast` itself is not a dependency.
        graph[name] = {m for m in _imports_of(path) if m != "ddim_fast" and m != name}
    for name, deps in graph.items():
        if not name.startswith("ddim_fast.tools") and name != "ddim_fast.__main__":
            tools = sorted(d for d in deps if d.startswith("ddim_fast.tools"))
            assert not tools, f"product module {name} imports the tools {tools}"

    def visit(node, stack):
        if node in stack:
            cycle = stack[stack.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        for dep in graph.get(node, ()):
            visit(dep, stack + [node])

    for name in graph:
        visit(name, [])
