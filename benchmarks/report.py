"""Turn the committed benchmark results under benchmarks/results/ into the README's results section.

Inputs (every ``*.json`` in ``--results``):

* pytest-benchmark files (``pytest benchmarks --benchmark-only --benchmark-json=FILE``): one table per
  file, grouped by benchmark group, with the ratio of each entry to its group's baseline; the pipeline
  benchmark's entries (``benchmarks/bench_pipeline.py``, also its ``DDIM_FAST_PIPELINE_JSON`` file, and the
  device check's ``bench_pipeline*.json``) get their own table: every variant's it/s, first call, UNet-alone
  time, ratio to plain and to the best compiled peer, agreement with plain, and issue 18's goals;
* ``python -m ddim_fast bench --breakdown --json FILE`` files: a UNet step's time by kind of kernel per variant;
* ``python -m ddim_fast bench --json FILE`` files: the end-to-end loops (it/s, ms/step, non-UNet time);
* ``python -m ddim_fast profile --json FILE`` files: per-step latency summaries;
* ``benchmarks/gpu_micro.py --json FILE`` files (the device check's micro-benchmark): step, attention and
  autocast-graph tables, the goals met or not, what was skipped and what failed;
* ``python -m ddim_fast generate --json FILE`` files: images per second. They name no hardware or settings:
  those come from the device check's summary of the same run (a ``*-summary.txt`` beside the file with the
  same name prefix, e.g. ``gpu-h200-2026-12-04-generate.json`` and ``gpu-h200-2026-12-04-summary.txt``).

The markdown replaces what is between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the
README; a bar chart of the ratios goes to ``--chart`` (needs matplotlib; skipped with a message otherwise).
Every number written comes from one of those files, and each table names its file, hardware and date.

    python benchmarks/report.py                   # write README.md and benchmarks/results/chart.png
    python benchmarks/report.py --dry-run         # print the markdown only
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from ddim_fast.tools.figures import is_within_noise, noise_band, relative_spread  # noqa: E402
from ddim_fast.tools.figures import ratio_phrase as speed_phrase  # noqa: E402  (one wording of every ratio)
START, END = "<!-- results:start -->", "<!-- results:end -->"

# How a group's baseline is recognised when no benchmark sets extra_info["baseline"]: the first of
# these words found in a benchmark's name (what everyone else is compared with).
BASELINE_WORDS = ("baseline", "diffusers", "reference", "unfused", "eager", "torch", "sdpa")


def is_copy_entry(bench: dict[str, Any]) -> bool:
    """The memory-copy floor of a group (a copy of the bytes the op must move), not a competitor."""
    extra = bench.get("extra_info") or {}
    if "is_copy" in extra:
        return bool(extra["is_copy"])
    return _is_baseline_name(_short_name(bench), "copy")


def _fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def _short_name(bench: dict[str, Any]) -> str:
    return bench.get("name") or bench.get("fullname", "?")


def per_step_seconds(bench: dict[str, Any]) -> float | None:
    """Seconds per sampling step when the entry says how many steps one timed call runs."""
    extra = bench.get("extra_info") or {}
    if isinstance(extra.get("seconds_per_step"), (int, float)):
        return float(extra["seconds_per_step"])
    steps = extra.get("steps_per_call") or extra.get("steps")
    if isinstance(steps, int) and steps > 0:
        return bench["stats"]["median"] / steps
    return None


def _entry_time(bench: dict[str, Any]) -> float:
    """What ratios compare: seconds per step when known, else the median of a timed call."""
    per_step = per_step_seconds(bench)
    return per_step if per_step is not None else bench["stats"]["median"]


def entry_spread(bench: dict[str, Any]) -> float | None:
    """The relative spread of an entry's timed rounds (what ``figures.noise_band`` compares ratios with):
    extra_info['relative_spread'] when the benchmark recorded it, else pytest-benchmark's IQR / 2 / median;
    None when neither is there."""
    extra = bench.get("extra_info") or {}
    if isinstance(extra.get("relative_spread"), (int, float)):
        return float(extra["relative_spread"])
    st = bench.get("stats") or {}
    if isinstance(st.get("iqr"), (int, float)) and st.get("median") and st.get("rounds", 0) >= 3:
        return st["iqr"] / 2 / st["median"]
    return None


def _is_baseline_name(name: str, word: str) -> bool:
    return re.search(rf"(^|[\[\-_,. ]){re.escape(word)}($|[\]\-_,. ])", name.lower()) is not None


def pick_baseline(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The group's baseline: extra_info['baseline'] true, else the first BASELINE_WORDS match, else None."""
    for e in entries:
        if (e.get("extra_info") or {}).get("baseline"):
            return e
    for word in BASELINE_WORDS:
        for e in entries:
            if _is_baseline_name(_short_name(e), word):
                return e
    return None


def classify(data: Any) -> str | None:
    if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
        return "pytest-benchmark"
    if isinstance(data, dict) and data.get("kind") in ("bench", "profile", "import_time", "gpu_micro", "breakdown"):
        return data["kind"]
    if isinstance(data, dict) and {"generated", "images_per_s", "world_size"} <= set(data):
        return "generate"
    return None


def run_summary(results_dir: str, name: str) -> str | None:
    """The device check's summary.txt of the run a result file belongs to: the file in ``results_dir`` named
    like ``name`` up to its last '-' plus ``-summary.txt`` (None when there is none)."""
    stem = os.path.splitext(name)[0]
    for cut in range(stem.count("-"), 0, -1):
        candidate = os.path.join(results_dir, stem.rsplit("-", cut)[0] + "-summary.txt")
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                return f.read()
    return None


def generate_section(name: str, data: dict[str, Any], summary: str | None) -> list[str]:
    """``python -m ddim_fast generate --json``: images per second of the whole job and per process. The
    hardware and the command come from the run's summary (the JSON names neither)."""
    gpu = command = None
    for line in (summary or "").splitlines():
        if line.startswith("gpu ") and gpu is None:
            gpu = line[4:].strip()
        m = re.match(r"(ok|FAIL)\s+(python -m ddim_fast generate .*?)(\s+\(\d+s\))?$", line)
        if m:
            command = m.group(2)
    date = re.search(r"\d{4}-\d{2}-\d{2}", name)
    lines = [f"#### `{name}` — `python -m ddim_fast generate`, {gpu or 'hardware not recorded'}"
             + (f", {date.group(0)}" if date else ""), ""]
    if command:
        lines += [f"`{command}` (from the run's summary):", ""]
    per_rank = data.get("per_rank_images_per_s") or []
    lines += ["| samples | new | resumed | processes | wall time | images/s (job) | images/s per process |",
              "|---:|---:|---:|---:|---:|---:|---|",
              f"| {data['samples']} | {data.get('new', '-')} | {data.get('resumed', '-')} | {data['world_size']} | "
              f"{_fmt_time(data.get('wall_seconds', float('nan')))} | {data.get('job_images_per_s', data['images_per_s']):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in per_rank) or '-'} |", ""]
    return lines


def import_time_section(name: str, data: dict[str, Any]) -> list[str]:
    """``benchmarks/bench_import.py --json``: each import variant's time in fresh interpreters."""
    lines = [f"#### `{name}` — `python benchmarks/bench_import.py`, {data.get('hardware', '?')}", "",
             f"Medians of {data.get('repeats', '?')} fresh interpreters (goal: {data.get('goal', '-')}):", "",
             "| import | total | on top of `import torch` | ratio | heavy modules pulled in |",
             "|---|---:|---:|---:|---|"]
    for variant, r in data.get("variants", {}).items():
        heavy = [m for m, loaded in (r.get("modules") or {}).items() if loaded and m != "ddim_fast._C"]
        lines.append(f"| `{variant}` | {_fmt_time(r['median_total_s'])} | {_fmt_time(r['median_extra_s'])} | "
                     f"{r['ratio_to_import_torch']:.3f}x | {', '.join(heavy) or '-'} |")
    return lines + [""]


def gpu_micro_section(name: str, data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """``benchmarks/gpu_micro.py --json`` (the device check's micro-benchmark): step and attention tables."""
    hw = data.get("hardware", "?")
    args = data.get("args") or {}
    versions = data.get("versions") or {}
    lines = [f"#### `{name}` — `benchmarks/gpu_micro.py`, {hw}, {str(data.get('date', '?'))[:10]}"
             + ("" if data.get("complete") else " (incomplete: the run was cut short)"), ""]
    conditions = [f"{k} {v}" for k, v in versions.items() if v] if isinstance(versions, dict) else []
    conditions += [f"--{k} {v}" for k, v in args.items() if v not in ("", None) and k != "device"]
    if conditions:
        lines += [f"Run with {', '.join(conditions)}; medians per call, each entry's result checked against the "
                  "float64 reference (rel. error)."]
    skipped: dict[str, int] = {}
    for entry in data.get("skipped") or []:
        skipped[entry.get("why", "?")] = skipped.get(entry.get("why", "?"), 0) + 1
    if skipped:
        lines += ["Skipped: " + "; ".join(f"{n} entr{'y' if n == 1 else 'ies'} {why}" for why, n in skipped.items())
                  + "."]
    lines.append("")
    chart = []
    step = data.get("step") or []
    if step:
        lines += ["| step group | implementation | time per call | GB/s | x the copy | vs unfused eager | "
                  "vs torch.compile | rel. error |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in step:
            groups.setdefault(r["group"], []).append(r)
            err = r.get("rel_error")
            lines.append(f"| {r['group']} | `{r['name']}` | {_fmt_time(r['seconds'])} | {r.get('gb_per_s', 0):.0f} | "
                         f"{r.get('x_copy', float('nan')):.2f} | {speed_phrase(r.get('speedup_vs_unfused_eager', 0))} | "
                         f"{speed_phrase(r.get('speedup_vs_compile', 0))} | {'-' if err is None else f'{err:.1e}'} |")
        for group, rows in groups.items():
            copy = next((r for r in rows if r.get("impl") == "copy"), None)
            bars = [{"name": r["name"], "seconds": r["seconds"], "baseline": r["name"] == "unfused-eager"}
                    for r in rows if r is not copy]
            chart.append({"title": f"step {group}", "hardware": hw, "bars": bars,
                          "floor": copy["seconds"] if copy else None, "floor_label": "copy of the same bytes",
                          "unit": "per call"})
        lines.append("")
    attention = data.get("attention") or []
    if attention:
        lines += ["| attention | implementation | time per call | TFLOP/s | vs best SDPA | vs ldm einsum | rel. error |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in attention:
            lines.append(f"| {r['group']} | `{r['impl']}` | {_fmt_time(r['seconds'])} | {r.get('tflop_per_s', 0):.2f} | "
                         f"{speed_phrase(r.get('speedup_vs_best_sdpa', 0))} | {speed_phrase(r.get('speedup_vs_einsum', 0))} | "
                         f"{r['rel_error']:.1e}{'' if r.get('correct', True) else ' WRONG'} |")
        lines.append("")
    autocast = data.get("autocast_graph") or []
    if autocast:
        lines += ["| autocast graph | fp32 weights | weight casts (warm-up + capture) | replay | equals eager "
                  "autocast | sees in-place updates |", "|---|---:|---:|---:|---|---|"]
        for r in autocast:
            speed = r.get("speedup_vs_recast")
            lines.append(f"| `{r['mode']}` | {r.get('weights', '-')} ({r.get('fp32_weight_bytes', 0) / 2**20:.0f} MiB) | "
                         f"{r.get('weight_casts_during_warmup_and_capture', '-')} | {_fmt_time(r['replay_seconds'])}"
                         f"{'' if speed is None else ' (' + speed_phrase(speed) + ' than recast)'} | "
                         f"{'yes' if r.get('output_equals_eager_autocast') else 'NO'} | "
                         f"{'yes' if r.get('in_place_update_seen') else 'NO'} |")
        lines.append("")
    goals = data.get("goals") or {}
    if goals:
        lines.append("Goals: " + "; ".join(f"{goal} = {g['value']:.2f} ({'met' if g.get('met') else 'not met'})"
                                         for goal, g in goals.items()) + ".")
        lines.append("")
    for e in data.get("errors") or []:
        lines.append(f"- error in {e.get('section')} {e.get('entry')}: {e.get('error')}")
    return lines + [""], chart


def _pytest_hardware(data: dict[str, Any]) -> str:
    """GPU name if the benchmarks recorded one (extra_info['hardware']), else the CPU from machine_info."""
    for b in data.get("benchmarks", []):
        hw = (b.get("extra_info") or {}).get("hardware")
        if hw:
            return hw
    cpu = data.get("machine_info", {}).get("cpu", {})
    brand = cpu.get("brand_raw") or data.get("machine_info", {}).get("processor") or "unknown CPU"
    count = cpu.get("count")
    return f"{brand} ({count} cores)" if count else brand


def pytest_benchmark_section(name: str, data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines for one pytest-benchmark file, and one chart group per benchmark group."""
    date = str(data.get("datetime", "?"))[:10]
    commit_info = data.get("commit_info") or {}
    commit = commit_info.get("id", "")
    dirty = " (+ uncommitted changes)" if commit_info.get("dirty") else ""
    hardware = _pytest_hardware(data)
    lines = [f"#### `{name}` — pytest-benchmark, {hardware}, {date}"
             + (f", commit `{commit[:10]}`{dirty}" if commit else ""), ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    imports = []
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info") or {}
        if isinstance(extra.get("import_time"), dict):  # one timed call of many fresh interpreters: its own table
            imports.append(dict(extra["import_time"], hardware=extra.get("hardware", hardware)))
            continue
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    chart = []
    lines += ["| group | benchmark | median per call | per step (or op) | rounds | vs baseline | vs copy floor |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for group, entries in groups.items():
        copy = next((e for e in entries if is_copy_entry(e)), None)
        base = pick_baseline([e for e in entries if e is not copy])
        bars = []
        for e in entries:
            st = e["stats"]
            if e is copy:
                ratio_text = "floor"
            elif base is None:
                ratio_text = "-"
            elif e is base:
                ratio_text = "baseline"
            else:
                ratio_text = speed_phrase(_entry_time(base) / _entry_time(e),
                                          noise=noise_band(entry_spread(base), entry_spread(e)))
            copy_text = "-" if copy is None else (
                "1.00x (the floor)" if e is copy else f"{_entry_time(e) / _entry_time(copy):.2f}x the copy time")
            per_step = per_step_seconds(e)
            lines.append(f"| {group} | `{_short_name(e)}` | {_fmt_time(st['median'])} | "
                         f"{'-' if per_step is None else _fmt_time(per_step)} | "
                         f"{st.get('rounds', '-')} | {ratio_text} | {copy_text} |")
            if e is not copy:
                bars.append({"name": _short_name(e), "seconds": _entry_time(e), "baseline": e is base,
                             "spread": entry_spread(e)})
        chart.append({"title": group, "hardware": hardware, "bars": bars,
                      "floor": None if copy is None else _entry_time(copy),
                      "floor_label": "copy of the same bytes", "unit": "per step (or op)"})
    lines.append("")
    lines.append("Ratios: the baseline's time (per step when recorded, else the median per call) over the "
                 "entry's; a group's baseline is the entry marked `baseline` (else the one named "
                 "diffusers/reference/unfused/eager/torch). The copy entry is not a competitor: it copies the bytes "
                 "the op must move, the floor a memory-bound kernel can approach.")
    lines.append("")
    for result in imports:
        lines += import_time_section(f"{name}: test_import_time", result)
    return lines, chart


# The pipeline benchmark's table (benchmarks/bench_pipeline.py): the order its variants are shown in, the peers
# optimize is measured against, and issue 18's goals per pipeline.
PIPELINE_ORDER = ("plain", "optimize", "compile-reduce-overhead", "diffusers-recipe", "compile-default",
                  "optimize-no-attention", "optimize-no-graph", "optimize-no-channels-last", "optimize-unet-body",
                  "optimize-compile")
PIPELINE_PEERS = ("compile-reduce-overhead", "diffusers-recipe")
PIPELINE_GOALS = {"sd15": {"peer": 1.3, "plain": 3.5, "first_call_s": 10.0}, "sdxl": {"peer": 1.2}}


def is_pipeline_entry(bench: dict[str, Any]) -> bool:
    extra = bench.get("extra_info") or {}
    return isinstance(extra.get("variant"), str) and isinstance(extra.get("ms_per_step"), (int, float))


def _pipeline_label(group: str, extra: dict[str, Any]) -> str:
    if {"pipeline", "resolution", "batch", "dtype"} <= set(extra):
        return f"{extra['pipeline']} {extra['resolution']}px b{extra['batch']} {extra['dtype']}"
    return group


def pipeline_section(name: str, data: dict[str, Any], entries: list[dict[str, Any]]
                     ) -> tuple[list[str], list[dict[str, Any]]]:
    """The pipeline benchmark's entries of one results file as one table (rows per group in PIPELINE_ORDER),
    then issue 18's goals against the measured ratios, and one chart group per pipeline group."""
    date = str(data.get("datetime", "?"))[:10]
    commit = (data.get("commit_info") or {}).get("id", "")
    hardware = _pytest_hardware(data)
    lines = [f"#### `{name}` — `benchmarks/bench_pipeline.py`, {hardware}, {date}"
             + (f", commit `{commit[:10]}`" if commit else ""), "",
             "`pipe(...)` of a diffusers pipeline (random-weight UNet of the named config, DDIM, CFG 7.5, "
             "output_type=\"latent\"), per denoising step; first call = the variant's first `pipe(...)` in the "
             "run (compiles and CUDA-graph captures happen there); peers = `compile-reduce-overhead`, "
             "`diffusers-recipe`.", "",
             "| pipeline | variant | it/s | ms/step | first call | UNet alone ms/step | overhead ms/step | vs plain "
             "| vs best peer | rel. error vs plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e.get("group") or "(no group)", []).append(e)
    chart, goal_lines = [], []
    for group, rows in groups.items():
        rows = sorted(rows, key=lambda e: (PIPELINE_ORDER.index(e["extra_info"]["variant"])
                                           if e["extra_info"]["variant"] in PIPELINE_ORDER else len(PIPELINE_ORDER)))
        by_variant = {e["extra_info"]["variant"]: e for e in rows}
        base = by_variant.get("plain")
        peers = [by_variant[v] for v in PIPELINE_PEERS if v in by_variant]
        best_peer = min(peers, key=lambda e: e["extra_info"]["ms_per_step"]) if peers else None
        label = _pipeline_label(group, rows[0]["extra_info"])

        def versus(e, other):
            if other is None:
                return "-"
            if e is other:
                return "baseline" if other is base else "best peer"
            return speed_phrase(other["extra_info"]["ms_per_step"] / e["extra_info"]["ms_per_step"],
                                noise=noise_band(entry_spread(other), entry_spread(e)))

        bars = []
        for e in rows:
            x = e["extra_info"]
            first = x.get("first_call_s")
            err = x.get("rel_error_vs_plain")
            agree = "" if x.get("agrees_with_plain", True) else " (DISAGREES)"
            lines.append(f"| {label} | `{x['variant']}` | {x['it_per_s']:.1f} | {x['ms_per_step']:.3f} | "
                         f"{'-' if first is None else f'{first:.1f} s'} | "
                         f"{x.get('unet_ms_per_step', float('nan')):.3f} | "
                         f"{x.get('overhead_ms_per_step', float('nan')):.3f} | "
                         f"{versus(e, base)} | {versus(e, best_peer)} | "
                         f"{'-' if err is None else f'{err:.1e}'}{agree} |")
            bars.append({"name": x["variant"], "seconds": x["ms_per_step"] / 1e3, "baseline": e is base,
                         "spread": entry_spread(e)})
        chart.append({"title": f"pipeline {label}", "hardware": rows[0]["extra_info"].get("hardware", hardware),
                      "bars": bars, "floor": None, "floor_label": "", "unit": "per step"})
        optimize = by_variant.get("optimize")
        goals = PIPELINE_GOALS.get(str(rows[0]["extra_info"].get("pipeline")), {})
        if optimize is not None and goals:
            o = optimize["extra_info"]
            checks = []
            if best_peer is not None and "peer" in goals:
                value = best_peer["extra_info"]["ms_per_step"] / o["ms_per_step"]
                checks.append(f"optimize >= {goals['peer']}x the best peer ({best_peer['extra_info']['variant']}): "
                              f"{value:.2f}x, {'met' if value >= goals['peer'] else 'not met'}")
            elif "peer" in goals:
                checks.append(f"optimize >= {goals['peer']}x the best peer: no peer measured in this file")
            if base is not None and "plain" in goals:
                value = base["extra_info"]["ms_per_step"] / o["ms_per_step"]
                checks.append(f"optimize >= {goals['plain']}x plain: {value:.2f}x, "
                              f"{'met' if value >= goals['plain'] else 'not met'}")
            if "first_call_s" in goals and isinstance(o.get("first_call_s"), (int, float)):
                value = o["first_call_s"]
                checks.append(f"first call <= {goals['first_call_s']:.0f} s: {value:.1f} s, "
                              f"{'met' if value <= goals['first_call_s'] else 'not met'}")
            if checks:
                goal_lines.append(f"- {label}: " + "; ".join(checks) + ".")
    lines.append("")
    if goal_lines:
        lines += ["Issue 18's goals, from this file:", ""] + goal_lines + [""]
    return lines, chart


def breakdown_section(name: str, data: dict[str, Any]) -> list[str]:
    """``python -m ddim_fast bench --breakdown --json``: ms per UNet step by kind of kernel, one column per
    variant."""
    cfg, variants = data.get("config", {}), data.get("variants", {})
    names = list(variants)
    lines = [f"#### `{name}` — `python -m ddim_fast bench --breakdown`, {_hardware(data)}, "
             f"{data.get('date', '?')}", "",
             f"{cfg.get('model')} {cfg.get('dtype')}, batch {cfg.get('batch')} (UNet batch {cfg.get('unet_batch')}), "
             f"latent {'x'.join(str(v) for v in cfg.get('latent', []))}: {cfg.get('source')}, {cfg.get('calls')} calls "
             "per variant, ms per UNet step.", "",
             "| kind | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for kind in data.get("kinds", []):
        lines.append(f"| {kind} | " + " | ".join(f"{variants[n]['kinds_ms'].get(kind, 0):.3f}" for n in names) + " |")
    lines.append("| **sum** | " + " | ".join(f"{variants[n]['kernel_ms']:.3f}" for n in names) + " |")
    lines.append("| wall per call | " + " | ".join(f"{variants[n]['wall_ms']:.3f}" for n in names) + " |")
    lines.append("| graphed | " + " | ".join("yes" if variants[n].get("graphed") else "no" for n in names) + " |")
    lines.append("")
    for n, why in (data.get("failed") or {}).items():
        lines.append(f"- {n}: FAILED: {why}")
    return lines + [""]


def _hardware(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    threads = env.get("torch_threads")
    on_cpu = "cuda" not in str(data.get("config", {}).get("device", ""))
    return env.get("hardware", "?") + (f", {threads} torch thread{'s' if threads != 1 else ''}"
                                       if threads and on_cpu else "")


def bench_section(name: str, data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    cfg = data.get("config", {})
    base = data.get("baseline", "diffusers")
    hw = _hardware(data)
    latent = "x".join(str(v) for v in cfg.get("latent", []))
    lines = [f"#### `{name}` — `python -m ddim_fast bench`, {hw}, {data.get('date', '?')}", "",
             f"{cfg.get('model')} (random weights), {cfg.get('dtype')}, batch {cfg.get('batch')}, latent {latent}, "
             f"{cfg.get('steps')} steps, CFG {cfg.get('guidance')}; UNet alone "
             f"{data.get('unet_only_ms_per_step', float('nan')):.3f} ms/step"
             + (f" ({data['unet_graph_ms_per_step']:.3f} in a CUDA graph, the floor of the graph loops)"
                if data.get("unet_graph_ms_per_step") else "")
             + f"; outputs agree with the {base} loop "
             f"within {cfg.get('tolerance', float('nan')):.0e}: {'yes' if data.get('agree') else 'NO'}.", "",
             f"| loop | it/s | ms/step | non-UNet ms/step | non-UNet share | vs {base} | rel. error vs {base} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    bars = []
    results = data.get("results", {})
    base_spread = relative_spread(results.get(base, {}).get("seconds_all") or [])
    for loop, r in results.items():
        speed = r.get(f"speedup_vs_{base}", float("nan"))
        err = r.get(f"rel_error_vs_{base}")
        spread = relative_spread(r.get("seconds_all") or [])
        verdict = "baseline" if loop == base else speed_phrase(speed, noise=noise_band(base_spread, spread))
        lines.append(f"| {loop} | {r['it_per_s']:.1f} | {r['ms_per_step']:.3f} | {r['non_unet_ms_per_step']:.3f} | "
                     f"{100 * r['non_unet_fraction']:.1f}% | {verdict} | "
                     f"{'-' if err is None else f'{err:.1e}'} |")
        bars.append({"name": loop, "seconds": r["ms_per_step"] / 1e3, "baseline": loop == base, "spread": spread})
    unet_ms = data.get("unet_graph_ms_per_step") or data.get("unet_only_ms_per_step")
    chart = [{"title": f"end to end: {cfg.get('model')} {cfg.get('dtype')}, batch {cfg.get('batch')}", "hardware": hw,
              "bars": bars, "floor": unet_ms / 1e3 if unet_ms else None,
              "floor_label": "UNet alone" + (" (CUDA graph)" if data.get("unet_graph_ms_per_step") else ""),
              "unit": "per step"}] if bars else []
    for loop, why in (data.get("skipped") or {}).items():
        lines.append(f"| {loop} | skipped: {why} | | | | | |")
    for loop, why in (data.get("failed") or {}).items():
        lines.append(f"| {loop} | FAILED: {why} | | | | | |")
    lines.append("")
    lines.append("non-UNet = the loop's time per step minus the UNet's alone (graph loops: minus the graph-captured "
                 "UNet's)" + ("; a negative value means the difference is below this machine's timing noise."
                              if any(r["non_unet_ms_per_step"] < 0 for r in data.get("results", {}).values())
                              else "."))
    lines.append("")
    return lines, chart


def profile_section(name: str, data: dict[str, Any]) -> list[str]:
    """One table per profiled backend (files with several backends: interleaved runs, one table each, then
    their totals compared)."""
    cfg = data.get("config", {})
    hw = _hardware(data)
    backends = data.get("backends") or {cfg.get("backend"): {"summary": data.get("summary", {})}}

    def f(d, k):
        v = d.get(k, float("nan"))
        return "-" if v != v else f"{v:.3f}"

    repeats = cfg.get("repeats", 1)
    lines = [f"#### `{name}` — `python -m ddim_fast profile`, {hw}, {data.get('date', '?')}", "",
             f"{cfg.get('model')} {cfg.get('shape')}, {cfg.get('dtype')}, CFG {cfg.get('guidance')}"
             f"{', CUDA graph' if cfg.get('cuda_graph') else ''} ({cfg.get('timer')}, median of {repeats} timed "
             f"run{'s' if repeats != 1 else ''} per step{', interleaved' if len(backends) > 1 else ''}):", ""]
    for backend, entry in backends.items():
        s = entry.get("summary", {})
        lines += [f"| backend {backend}: ms per step | mean | p50 | p90 |", "|---|---:|---:|---:|"]
        for label, col in (("model", "model_ms"), ("guidance + update", "update_ms"),
                           ("other (between steps)", "other_ms"), ("total", "total_ms")):
            if col in s:
                d = s[col]
                lines.append(f"| {label} | {f(d, 'mean')} | {f(d, 'p50')} | {f(d, 'p90')} |")
        lines += ["", f"{s.get('steps')} steps, {s.get('it_per_s', float('nan')):.1f} it/s.", ""]
    if len(backends) > 1:
        base = "reference" if "reference" in backends else next(iter(backends))
        b = backends[base]["summary"]
        for backend, entry in backends.items():
            if backend != base:
                s = entry["summary"]
                lines.append(f"- {backend} vs {base}, total per step (p50): " + speed_phrase(
                    b["total_ms"]["p50"] / s["total_ms"]["p50"],
                    noise=noise_band(b.get("total_spread"), s.get("total_spread"))))
        lines.append("")
    return lines


def _on_gpu(kind: str, data: dict[str, Any]) -> bool:
    if kind == "gpu_micro":
        return "cuda" in str(data.get("device", ""))
    if kind == "import_time":
        return False
    if kind == "generate":
        return True  # generate's JSON names no device; the device check (its only committed source) runs on one
    if kind == "pytest-benchmark":
        return any("cuda" in str(b.get("group", "")).lower() or "gpu" in str(b.get("group", "")).lower()
                   for b in data.get("benchmarks", []))
    return "cuda" in str(data.get("config", {}).get("device", ""))


def build_markdown(results_dir: str, note: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The results section (markdown) and the chart data from every JSON file in ``results_dir``."""
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    lines = [f"Generated by `python benchmarks/report.py` from the files in `benchmarks/results/` "
             f"({len(paths)} file{'s' if len(paths) != 1 else ''}); every number below is in one of them.", ""]
    if note:
        lines += [note, ""]
    any_gpu = False
    chart: list[dict[str, Any]] = []
    used = 0
    for path in paths:
        name = os.path.basename(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipping {name}: {exc}", file=sys.stderr)
            continue
        kind = classify(data)
        if kind == "pytest-benchmark":
            pipeline = [b for b in data.get("benchmarks", []) if is_pipeline_entry(b)]
            section, points = pipeline_section(name, data, pipeline) if pipeline else ([], [])
            rest = [b for b in data.get("benchmarks", []) if not is_pipeline_entry(b)]
            if rest or not pipeline:
                more, more_points = pytest_benchmark_section(name, dict(data, benchmarks=rest))
                section, points = section + more, points + more_points
        elif kind == "bench":
            section, points = bench_section(name, data)
        elif kind == "profile":
            section, points = profile_section(name, data), []
        elif kind == "breakdown":
            section, points = breakdown_section(name, data), []
        elif kind == "import_time":
            section, points = import_time_section(name, data), []
        elif kind == "gpu_micro":
            section, points = gpu_micro_section(name, data)
        elif kind == "generate":
            section, points = generate_section(name, data, run_summary(results_dir, name)), []
        else:
            print(f"report: skipping {name}: not a pytest-benchmark, bench, profile, breakdown, import_time, "
                  "gpu_micro or generate JSON", file=sys.stderr)
            continue
        lines += section
        chart += points
        used += 1
        any_gpu = any_gpu or _on_gpu(kind, data)
    if used == 0:
        lines.append("No results yet: run `pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/"
                     "<hardware>-<date>.json`, then `python benchmarks/report.py`.")
    if used and not any_gpu:
        lines.append("No GPU measurement is committed yet: the GPU groups (SD1.5-config UNet, fp16, 512x512, CFG 7.5, "
                     "50 steps, CUDA graphs, fused attention) skip on the CPU and are to be run on the H100/H200.")
        lines.append("")
    if chart:
        lines.append("![time per step of each benchmark group, with its floor](benchmarks/results/chart.png)")
    return "\n".join(lines).rstrip() + "\n", chart


def replace_between_markers(text: str, body: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the README has no '{START}' ... '{END}' section")
    return text[:start + len(START)] + "\n" + body + text[end:]


def bar_label(name: str) -> str:
    """A chart label from a benchmark name: 'test_step_cpu[16x4x128x128-cpp-op]' -> 'cpp-op' (the group
    title already says the shape and the test)."""
    m = re.fullmatch(r"test_\w+\[(.*)\]", name)
    if not m:
        return name
    return re.sub(r"^\d+(x\d+)+-", "", m.group(1))


def write_chart(groups: list[dict[str, Any]], path: str) -> bool:
    """One panel per benchmark group: a horizontal bar per entry (its time; the baseline grey, faster
    entries green, slower red, each labelled with its ratio to the baseline) and the group's floor (the
    copy of the same bytes, or the UNet alone) as a dashed line. The hardware is in every panel's title.
    False when matplotlib is missing or there is nothing to draw."""
    groups = [g for g in groups if g["bars"]]
    if not groups:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    heights = [0.45 * len(g["bars"]) + 0.9 for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        bars = g["bars"]
        scale, unit = (1e6, "µs") if max(b["seconds"] for b in bars) < 1e-3 else (1e3, "ms")
        base = next((b for b in bars if b["baseline"]), None)
        values = [b["seconds"] * scale for b in bars]
        def noise(b):
            return noise_band(base.get("spread"), b.get("spread"))

        # Green faster, red slower; a difference inside the noise is neither (light grey).
        colours = ["0.6" if b["baseline"] or base is None else
                   "0.8" if is_within_noise(base["seconds"] / b["seconds"], noise(b)) else
                   ("tab:green" if b["seconds"] <= base["seconds"] else "tab:red") for b in bars]
        ax.barh(range(len(bars)), values, color=colours)
        ax.set_yticks(range(len(bars)), [bar_label(b["name"]) for b in bars], fontsize=9)
        ax.invert_yaxis()
        top = max(values + ([g["floor"] * scale] if g["floor"] else []))
        for i, (b, v) in enumerate(zip(bars, values)):
            text = "baseline" if b["baseline"] else (
                speed_phrase(base["seconds"] / b["seconds"], noise=noise(b)).replace("inside the ", "")
                if base is not None else "")
            ax.text(v + 0.01 * top, i, f"{v:.3g} {unit}  {text}", va="center", fontsize=8)
        floor_text = ""
        if g["floor"]:
            ax.axvline(g["floor"] * scale, color="k", ls="--", lw=1)
            floor_text = f"\ndashed line = floor: {g['floor_label']}, {g['floor'] * scale:.3g} {unit}"
        ax.set_xlim(0, top * 1.7)
        ax.set_title(f"{g['title']} — {g['hardware']}{floor_text}", fontsize=10, loc="left")
        ax.set_xlabel(f"time {g['unit']} ({unit}), lower is better", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of result JSON files")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--chart", default=os.path.join(HERE, "results", "chart.png"))
    parser.add_argument("--dry-run", action="store_true", help="print the markdown, write nothing")
    parser.add_argument("--note", default=None, help="a sentence put above the tables (conditions of the run)")
    args = parser.parse_args(argv)

    body, points = build_markdown(args.results, args.note)
    if args.dry_run:
        print(body)
        return 0
    try:
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        text = replace_between_markers(text, body)
    except (OSError, ValueError) as exc:
        print(f"report: cannot update {args.readme}: {exc}", file=sys.stderr)
        return 1
    if write_chart(points, args.chart):
        print(f"report: wrote {args.chart}")
    else:
        body = "\n".join(line for line in body.split("\n") if "(benchmarks/results/chart.png)" not in line)
        text = replace_between_markers(text, body)
        why = "nothing to chart" if not points else "matplotlib is not installed (pip install matplotlib)"
        print(f"report: chart skipped: {why}")
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"report: wrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
