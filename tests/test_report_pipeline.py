"""benchmarks/report.py renders the pipeline benchmark's table (bench_pipeline.py's entries, from a
pytest-benchmark file or the file the device check writes entry by entry) and the kernel breakdown
(``bench --breakdown --json``) into the README, from synthetic results files: every number shown comes from
the file, the ratios are plain's and the best peer's time over the entry's, issue 18's goals are judged on the
measured ratios, a disagreeing entry is marked."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import report as module
    finally:
        sys.path.pop(0)
    return module


def _entry(variant, ms, first, *, group="pipeline cuda sd15 fp16 512px b1 cfg7.5 50 steps", err=1e-3, agrees=True):
    extra = {"variant": variant, "hardware": "Fake H200", "it_per_s": 1e3 / ms, "ms_per_step": ms,
             "first_call_s": first, "unet_ms_per_step": ms * 0.9, "overhead_ms_per_step": ms * 0.1,
             "rel_error_vs_plain": 0.0 if variant == "plain" else err, "agrees_with_plain": agrees,
             "tolerance": 1e-2, "pipeline": "sd15", "resolution": 512, "batch": 1, "dtype": "float16",
             "steps": 50, "baseline": variant == "plain"}
    return {"group": group, "name": f"test_pipeline_cuda[sd15-b1-{variant}]", "fullname": "x", "params": {},
            "stats": {"median": ms * 50 / 1e3, "min": 0, "max": 0, "mean": ms * 50 / 1e3, "stddev": 0, "rounds": 3,
                      "iqr": 0.0, "q1": 0, "q3": 0, "ops": 1}, "extra_info": extra}


def _pipeline_file():
    return {"machine_info": {"node": "gpu", "cpu": {"brand_raw": "Fake CPU"}}, "commit_info": {"id": "abcdef1234567"},
            "datetime": "2027-01-02T03:04:05", "benchmarks": [
                _entry("compile-default", 20.0, 58.0),
                _entry("plain", 40.0, 3.5),
                _entry("optimize", 6.0, 4.0),
                _entry("compile-reduce-overhead", 8.0, 50.0),
                _entry("diffusers-recipe", 7.5, 52.0),
                _entry("optimize-no-graph", 30.0, 2.0, err=5e-2, agrees=False)]}


def _breakdown_file():
    kinds = ["convolution", "GEMM", "attention", "normalization", "elementwise", "copies/layout", "other"]
    variant = {"kinds_ms": dict(zip(kinds, [5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125])), "kernel_ms": 11.875,
               "wall_ms": 12.5, "graphed": True}
    return {"kind": "breakdown", "date": "2027-01-02", "environment": {"hardware": "Fake H200"},
            "config": {"model": "sd15-unet", "dtype": "fp16", "batch": 1, "unet_batch": 2, "latent": [4, 64, 64],
                       "device": "cuda:0", "calls": 3, "source": "torch.profiler CUDA kernel times"},
            "kinds": kinds, "variants": {"plain": variant, "optimize": dict(variant, kernel_ms=9.0, wall_ms=9.5)},
            "failed": {"compile-reduce-overhead": "AssertionError: nothing compiled"}}


def test_report_renders_the_pipeline_table_and_the_breakdown(report, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu-fake-2027-01-02-bench_pipeline.json").write_text(json.dumps(_pipeline_file()))
    (results / "gpu-fake-2027-01-02-breakdown.json").write_text(json.dumps(_breakdown_file()))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    assert report.main(["--results", str(results), "--readme", str(readme), "--chart", str(tmp_path / "c.png")]) == 0
    text = readme.read_text()
    table = text[text.index("bench_pipeline.json"):text.index("breakdown.json` —")]
    rows = [line for line in table.splitlines() if line.startswith("| sd15 512px b1 float16 |")]
    # in the table's order, whatever the file's
    assert [row.split("|")[2].strip() for row in rows] == [
        "`plain`", "`optimize`", "`compile-reduce-overhead`", "`diffusers-recipe`", "`compile-default`",
        "`optimize-no-graph`"]
    optimize = rows[1].split("|")
    assert optimize[3].strip() == "166.7" and optimize[5].strip() == "4.0 s"
    assert optimize[8].strip() == "6.67x faster"  # plain 40 ms / 6 ms
    assert optimize[9].strip() == "1.25x faster"  # best peer: the recipe, 7.5 ms / 6 ms
    assert rows[3].split("|")[9].strip() == "best peer" and rows[0].split("|")[8].strip() == "baseline"
    assert "5.0e-02 (DISAGREES)" in rows[5]
    assert "optimize >= 1.3x the best peer (diffusers-recipe): 1.25x, not met" in table
    assert "optimize >= 3.5x plain: 6.67x, met" in table and "first call <= 10 s: 4.0 s, met" in table
    assert "Fake H200" in table and "commit `abcdef1234`" in table
    breakdown = text[text.index("breakdown.json` —"):]
    assert "| convolution | 5.000 | 5.000 |" in breakdown and "| **sum** | 11.875 | 9.000 |" in breakdown
    assert "compile-reduce-overhead: FAILED: AssertionError: nothing compiled" in breakdown
    assert "old" not in text


def test_pipeline_entries_from_the_device_checks_partial_file_render_too(report, tmp_path):
    # bench_pipeline.py's DDIM_FAST_PIPELINE_JSON file: pytest-benchmark's layout with only the finished entries
    data = _pipeline_file()
    data["benchmarks"] = data["benchmarks"][1:3]
    body, chart = report.build_markdown(_write(tmp_path, data))
    assert "`benchmarks/bench_pipeline.py`" in body and "no peer measured in this file" in body
    assert chart and chart[0]["title"].startswith("pipeline sd15")


def _write(tmp_path, data):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "bench_pipeline.json").write_text(json.dumps(data))
    return str(folder)
