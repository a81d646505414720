"""Import time (issue 11): what ``import ddim_fast`` costs on top of ``import torch``, in fresh interpreters.

Each measurement is a fresh ``python -c`` subprocess that times, with perf_counter inside the process,
``import torch`` and then the import under test (so interpreter start-up is not counted). Variants:

* ``import torch`` alone (the floor);
* ``import torch; import ddim_fast`` (registers every op: the C++ extension, fake kernels, Triton stubs);
* ``import torch; import ddim_fast.ops``;
* ``import torch; import ddim_fast.scheduler`` with diffusers made unimportable (what the module itself
  costs) and with diffusers (what a diffusers user pays: mostly diffusers' own import).

Variants are interleaved (one of each per round) so a slow spell of the machine hits all alike; the
medians over the rounds are reported with the ratio ``(torch + X) / torch`` — across processes, and within
each process (``median_in_process_ratio``: the spread of ``import torch`` itself cancels). Each child also reports
which heavy modules the import pulled in (triton, torch._dynamo, diffusers).

    pytest benchmarks/bench_import.py --benchmark-only    # quick: ddim_fast's import and its floor, 3 rounds
    python benchmarks/bench_import.py [--repeats 7] [--json FILE]   # every variant, interleaved rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys, time
{block}
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
{imports}
t2 = time.perf_counter()
print("DDIM_FAST_IMPORT_TIME " + json.dumps({{"torch_s": t1 - t0, "extra_s": t2 - t1,
    "modules": {{m: sys.modules.get(m) is not None for m in ("triton", "torch._dynamo", "diffusers", "ddim_fast._C")}}}}))
"""

# name -> (python statements after `import torch`, block diffusers?)
VARIANTS = {
    "import torch": ("", False),
    "import torch; import ddim_fast": ("import ddim_fast", False),
    "import torch; import ddim_fast.ops": ("import ddim_fast.ops", False),
    "import torch; import ddim_fast.scheduler (diffusers blocked)": ("import ddim_fast.scheduler", True),
    "import torch; import ddim_fast.scheduler (with diffusers)": ("import ddim_fast.scheduler", False),
}

GOAL_RATIO = 1.10  # "costs little more than import torch": reported, not asserted


def child_source(name: str) -> str:
    imports, block = VARIANTS[name]
    # sys.modules[name] = None makes `import diffusers` raise ImportError, as if it were not installed.
    return _CHILD.format(block="sys.modules['diffusers'] = None" if block else "", imports=imports or "pass")


def run_child(name: str, python: str = sys.executable, timeout: float = 120.0) -> dict:
    """One fresh interpreter: {'torch_s', 'extra_s', 'total_s', 'modules'}."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([python, "-c", child_source(name)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name!r} failed in a fresh interpreter (rc={proc.returncode}): {proc.stderr[-2000:]}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DDIM_FAST_IMPORT_TIME ")), None)
    if line is None:
        raise RuntimeError(f"{name!r}: the child printed no timing line; stdout: {proc.stdout[-500:]}")
    data = json.loads(line.split(" ", 1)[1])
    data["total_s"] = data["torch_s"] + data["extra_s"]
    return data


def measure(repeats: int = 5, variants: list[str] | None = None, runner=run_child, separate_floor: bool = True) -> dict:
    """Interleaved rounds of every variant; medians, the ratio to ``import torch`` and the modules seen.

    ``separate_floor``: time ``import torch`` alone in interpreters of its own too (the standalone script's
    full measurement). Without it (the pytest group, a few seconds instead of a minute) the floor is the
    ``import torch`` that every child times before its own import, and the 'import torch' row says so."""
    variants = list(VARIANTS) if variants is None else list(variants)
    if separate_floor and "import torch" not in variants:
        variants.insert(0, "import torch")
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            samples[name].append(runner(name))
    if "import torch" in samples:
        torch_median = statistics.median(s["torch_s"] for s in samples["import torch"])
    else:
        torch_runs = [dict(s, extra_s=0.0, total_s=s["torch_s"], modules={}) for runs in samples.values() for s in runs]
        samples = {"import torch": torch_runs, **samples}
        torch_median = statistics.median(s["torch_s"] for s in torch_runs)
    rows = {}
    for name, runs in samples.items():
        total = statistics.median(s["total_s"] for s in runs)
        extra = statistics.median(s["extra_s"] for s in runs)
        rows[name] = {
            "median_total_s": total, "median_extra_s": extra,
            "ratio_to_import_torch": total / torch_median,
            # (torch + X) / torch within each process, then the median: the run-to-run spread of `import
            # torch` (tens of ms) cancels out.
            "median_in_process_ratio": statistics.median(s["total_s"] / s["torch_s"] for s in runs),
            "totals_s": [s["total_s"] for s in runs],
            "modules": runs[-1]["modules"],
        }
    return {"kind": "import_time", "repeats": repeats, "import_torch_median_s": torch_median, "variants": rows,
            "floor": "import torch in interpreters of its own" if separate_floor else
                     "import torch as timed inside the same interpreters, before their import",
            "goal": f"import torch; import ddim_fast <= {GOAL_RATIO}x import torch"}


def format_table(result: dict, hardware: str) -> str:
    lines = [f"import time on {hardware}, medians of {result['repeats']} fresh interpreters (interleaved); floor: "
             f"{result.get('floor', 'import torch in interpreters of its own')}",
             f"{'variant':<62} {'total ms':>9} {'extra ms':>9} {'x torch':>8} {'in-proc':>8}  heavy modules imported"]
    for name, row in result["variants"].items():
        heavy = ", ".join(m for m, seen in row["modules"].items() if seen and m != "ddim_fast._C") or "-"
        lines.append(f"{name:<62} {row['median_total_s'] * 1e3:>9.1f} {row['median_extra_s'] * 1e3:>9.1f} "
                     f"{row['ratio_to_import_torch']:>7.3f}x {row['median_in_process_ratio']:>7.3f}x  {heavy}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------


# The pytest group: what the import must cost and never pull in, quickly (3 fresh interpreters, a few seconds;
# the floor is each one's own `import torch`). The full table, every variant in rounds of its own, is the
# standalone script's: python benchmarks/bench_import.py --repeats 7.
PYTEST_VARIANTS = ["import torch; import ddim_fast"]
PYTEST_REPEATS = 3


def test_import_time(benchmark):
    from conftest import hardware_name, record_result

    from ddim_fast.tools.figures import relative_spread

    benchmark.group = "import time (fresh interpreter)"
    result = benchmark.pedantic(measure, kwargs={"repeats": PYTEST_REPEATS, "variants": PYTEST_VARIANTS,
                                                 "separate_floor": False},
                                rounds=1, iterations=1, warmup_rounds=0)
    hardware = hardware_name("cpu")
    benchmark.extra_info.update({"hardware": hardware, "import_time": result})
    for name, row in result["variants"].items():
        record_result("import time (fresh interpreter)", name, row["median_total_s"], hardware=hardware,
                      baseline=name == "import torch", unit="ms", spread=relative_spread(row["totals_s"]))
    row = result["variants"]["import torch; import ddim_fast"]
    benchmark.extra_info["ratio_ddim_fast_to_torch"] = row["ratio_to_import_torch"]
    benchmark.extra_info["in_process_ratio_ddim_fast_to_torch"] = row["median_in_process_ratio"]
    print("\n" + format_table(result, hardware))
    # What the import must never pull in (issue 11): the Dynamo stack and Triton.
    modules = result["variants"]["import torch; import ddim_fast"]["modules"]
    assert not modules["torch._dynamo"] and not modules["triton"], modules
    assert modules["ddim_fast._C"], "import ddim_fast did not load the extension"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
    from conftest import hardware_name

    result = measure(args.repeats)
    result["hardware"] = hardware_name("cpu")
    print(format_table(result, result["hardware"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
