"""The tools: ``python -m ddim_fast demo|profile|bench|info``, the embedded model they sample, and
benchmarks/report.py. CLI commands run in-process through ``ddim_fast.tools.cli.main`` (one import of
torch/diffusers for the whole file); one test runs the real ``python -m ddim_fast`` entry point."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from ddim_fast.tools import cli
from ddim_fast import reference
from ddim_fast.tools import bench, demo, figures, problems, profiler, toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


# --------------------------------------------------------------------------------------------------
# The embedded model
# --------------------------------------------------------------------------------------------------


def test_embedded_images_are_distinct_classes():
    images, labels = toy_data.make_images(32, 3)
    assert images.shape == (toy_data.NUM_IMAGES, 3, 32, 32)
    assert labels.tolist() == [c for c in range(toy_data.NUM_CLASSES) for _ in range(toy_data.IMAGES_PER_CLASS)]
    assert images.min() >= -1 and images.max() <= 1
    dist = torch.cdist(images.reshape(len(images), -1).double(), images.reshape(len(images), -1).double())
    dist.fill_diagonal_(float("inf"))
    # Distinct enough that "nearest data image" is unambiguous at the demo's PSNR threshold.
    assert toy_data.psnr(images, images[dist.argmin(1)]).max() < demo.SAMPLE_PSNR_DB - 10


def test_exact_denoiser_matches_brute_force_posterior():
    model = toy_data.EmbeddedLdmModel(size=16, channels=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, *model.image_shape, generator=gen)
    t = torch.tensor([999, 700, 400, 120, 10])
    c = torch.cat([toy_data.class_embedding([1, 3]), toy_data.class_embedding(None, 3)])
    eps = model.apply_model(x, t, c)
    # Brute force in float64: Bayes over the data set with a uniform prior inside the class.
    imgs, labels = model.images.double(), model.labels
    for b in range(5):
        a = model.alphas_cumprod[t[b]].double()
        members = labels == (1 if b == 0 else 3) if b < 2 else torch.ones_like(labels, dtype=torch.bool)
        log_lik = -((x[b].double() - a.sqrt() * imgs) ** 2).flatten(1).sum(1) / (2 * (1 - a))
        log_lik[~members] = -float("inf")
        x0 = (torch.softmax(log_lik, 0)[:, None, None, None] * imgs).sum(0)
        eps_ref = (x[b].double() - a.sqrt() * x0) / (1 - a).sqrt()
        assert reference.relative_error(eps[b], eps_ref) < 1e-4, f"sample {b} (t={int(t[b])})"


def test_exact_denoiser_class_prior_excludes_other_classes():
    model = toy_data.EmbeddedLdmModel(size=16)
    x = torch.randn(2, *model.image_shape)
    t = torch.tensor([999, 999])  # near-uniform posterior: the prior decides
    probs = torch.softmax(model.denoiser.posterior_logits(x, t, toy_data.class_embedding([2, 0])), -1)
    for b, cls in enumerate((2, 0)):
        assert probs[b][model.labels != cls].sum() == 0
        assert probs[b][model.labels == cls].sum() == pytest.approx(1.0, abs=1e-5)


def test_class_embedding_rejects_bad_labels():
    with pytest.raises(ValueError, match="class labels"):
        toy_data.class_embedding([0, toy_data.NUM_CLASSES])
    with pytest.raises(ValueError, match="batch_size"):
        toy_data.class_embedding(None)


def test_png_fallback_encoder_round_trips_through_pillow(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    pixels = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(figures.encode_png(pixels))
    with pil.open(path) as img:
        assert img.size == (5, 7)
        assert torch.equal(torch.from_numpy(np.array(img.convert("RGB"))), pixels)
    grey = torch.randint(0, 256, (3, 4), dtype=torch.uint8)
    raw = figures.encode_png(grey)
    assert zlib.decompress(raw[raw.index(b"IDAT") + 4:raw.index(b"IEND") - 8]) == bytes(
        torch.cat([torch.zeros(3, 1, dtype=torch.uint8), grey], 1).flatten().tolist())


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------


def test_demo_quick_runs_end_to_end_and_its_self_check_passes(tmp_path, capsys):
    report_path = tmp_path / "demo.json"
    rc = cli.main(["demo", "--quick", "--out", str(tmp_path / "out"), "--json", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    assert report["passed"] and set(report["checks"]) == {"fast_vs_reference", "unconditional", "conditional",
                                                          "inversion", "slerp"}
    assert report["checks"]["conditional"]["got"] == report["checks"]["conditional"]["requested"]
    assert report["checks"]["fast_vs_reference"]["rel_error"] <= 1e-5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo.png"]  # one labelled figure
    w, h = _png_size(str(tmp_path / "out" / "demo.png"))
    assert w > 300 and h > 600
    latency = report["latency_ms_per_step"]
    for loop in ("reference", "fast"):
        assert set(latency[loop]) == {"model", "guidance_update", "other", "total"}
    assert "interleaved" in latency["measured"]
    assert "demo PASSED" in out and "guidance + DDIM update per step" in out
    assert "the model call, the same call on the same inputs in both loops" in out and "in the fused run:" in out


def test_progress_bars_follow_the_terminal_and_the_flags(tmp_path):
    # Bars on stderr when a person watches (a terminal) or with --progress; never garbling captured output.
    def run(*flags):
        result = subprocess.run([sys.executable, "-m", "ddim_fast", *flags, "demo", "--quick", "--steps", "3",
                                 "--batch", "4", "--out", str(tmp_path)], capture_output=True, text=True,
                                timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "it/s" not in run()  # stderr is a pipe here: no bars by default
    assert "it/s" in run("--progress")
    assert "it/s" not in run("--no-progress")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    out = " ".join(out.split())  # argparse wraps lines
    assert "(default: 3.0)" in out and "(default: ddim_fast_demo)" in out
    assert "(default: 50, or 20 with --quick)" in out and "None" not in out


def _tool_parsers():
    """(name, parser) of the top-level parser and every tool's subparser."""
    import argparse

    parser = cli.build_parser()
    yield "python -m ddim_fast", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_tool_help_shows_every_options_help_and_default():
    # Walks every option of every tool: each has a help text, and its --help line shows a default
    # ("(default: ...)", never "(default: None)") or says it is required.
    import argparse

    seen, problems = 0, []
    for name, parser in _tool_parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            option = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                problems.append(f"{option}: no help text")
                continue
            text = " ".join(formatter._expand_help(action).split())
            if "(default: None)" in text or not ("(default: " in text or "(required)" in text):
                problems.append(f"{option}: no default shown in {text!r}")
        out = parser.format_help()
        if "(default: None)" in " ".join(out.split()):
            problems.append(f"{name} --help shows '(default: None)'")
    assert seen > 50 and not problems, "\n".join(problems)


# Every tool's arguments are checked by argparse before any work or output, and its message names the option
# as the user typed it (argparse's own "argument --steps: ...").
BAD_ARGUMENTS = [
    (["demo", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["demo", "--steps", "-3"], "argument --steps: must be >= 1, got -3"),
    (["demo", "--steps", "1001"], "argument --steps: must be <= 1000"),
    (["demo", "--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
    (["demo", "--batch", "0"], "argument --batch: must be >= 4"),
    (["demo", "--batch", "6"], "argument --batch: must be a multiple of 4 (one figure row per class), got 6"),
    (["demo", "--guidance", "nan"], "argument --guidance: must be a finite number, got nan"),
    (["demo", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["demo", "--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["demo", "--json", "/no/such/folder/r.json"], "argument --json: the folder /no/such/folder does not exist"),
    (["profile", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["profile", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["profile", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["profile", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["profile", "--resolution", "100"],
     "argument --resolution: must be a multiple of 8 (the latent is resolution / 8), got 100"),
    (["profile", "--resolution", "0"], "argument --resolution: must be >= 8"),
    (["profile", "--backend", "auto,auto"], "argument --backend: 'auto' given twice"),
    (["profile", "--backend", "auto,fast"], "argument --backend: unknown 'fast'"),
    (["profile", "--cuda-graph", "--backend", "native,reference"], "argument --cuda-graph: needs FastDDIMSampler"),
    (["profile", "--cuda-graph", "--warmup", "0"], "argument --cuda-graph: needs --warmup >= 1"),
    (["profile", "--plot", "/no/such/folder/p.png"], "argument --plot: the folder /no/such/folder does not exist"),
    (["bench", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["bench", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["bench", "--resolution", "130"], "argument --resolution: must be a multiple of 8"),
    (["bench", "--variants", "diffusers,fastest"], "argument --variants: unknown 'fastest'"),
    (["bench", "--model", "sdxl-unet"], "argument --model: sdxl-unet is for --breakdown only"),
    (["bench", "--breakdown-variants", "plain"], "argument --breakdown-variants/--breakdown-calls: only with"),
    (["bench", "--breakdown", "--variants", "fast"], "argument --variants: names the loops"),
    (["bench", "--breakdown", "--breakdown-variants", "plain,fastest"], "argument --breakdown-variants: unknown"),
    (["info", "--json", "/no/such/folder/i.json"], "argument --json: the folder /no/such/folder does not exist"),
    (["generate", "--out", "OUT", "--num-samples", "0"], "argument --num-samples: must be >= 1, got 0"),
    (["generate", "--out", "OUT", "--num-samples", "2", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["generate", "--out", "OUT", "--num-samples", "2", "--steps", "1001"], "argument --steps: must be <= 1000"),
    (["generate", "--out", "OUT", "--num-samples", "2", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["generate", "--out", "OUT", "--num-samples", "2", "--eta", "-1"], "argument --eta: must be >= 0, got -1"),
    (["generate", "--out", "OUT"], "one of the arguments --num-samples --prompts is required"),
    (["--threads", "0", "info"], "argument --threads: must be >= 1, got 0"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS += [(["profile", "--device", "cuda"], "argument --device: no CUDA device is visible here"),
                      (["profile", "--cuda-graph"], "argument --cuda-graph: needs a CUDA device")]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_by_argparse_before_any_output(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.out == "", "output before the argument check"
    assert message in captured.err, captured.err
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "ddim_fast_demo").exists()


def test_run_demo_refuses_bad_counts_before_any_output(tmp_path, capsys):
    # The Python entry point: a value given is never replaced by a default, and nothing is printed first.
    for kwargs, message in (({"steps": 0}, "run_demo: steps must be >= 1, got 0"),
                            ({"batch": 0}, "run_demo: batch must be >= 4"),
                            ({"steps": 5, "batch": 6}, "run_demo: batch must be a multiple of 4")):
        with pytest.raises(ValueError, match=message):
            demo.run_demo(str(tmp_path / "out"), quick=True, **kwargs)
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()


def test_demo_uses_the_steps_it_was_given(tmp_path, capsys):
    report = demo.run_demo(str(tmp_path), quick=True, steps=3, batch=4)
    assert report["steps"] == 3 and "3 DDIM steps" in capsys.readouterr().out


def test_speed_phrase_never_calls_a_slowdown_faster():
    assert figures.speed_phrase(2.0, 1.0) == "2.00x faster"
    assert figures.speed_phrase(1.0, 1.25) == "1.25x slower"
    assert figures.speed_phrase(0.0, 1.0) == "not comparable"


def test_differences_inside_the_noise_are_called_the_same():
    # Without a measured spread: +-3%.
    assert figures.ratio_phrase(1.01) == "the same (1.01x faster, inside the ±3% noise)"
    assert figures.ratio_phrase(1 / 1.02) == "the same (1.02x slower, inside the ±3% noise)"
    assert figures.ratio_phrase(1.0) == "the same (1.00x, inside the ±3% noise)"
    assert figures.ratio_phrase(1.04) == "1.04x faster" and figures.ratio_phrase(0.9) == "1.11x slower"
    # With measured spreads: the larger one decides, never below the 1.5% floor.
    tight = figures.relative_spread([1.00, 1.001, 1.002, 0.999, 1.0])
    loose = figures.relative_spread([1.0, 1.2, 0.8, 1.1, 0.9])
    assert tight == pytest.approx(0.0005) and loose == pytest.approx(0.1)  # half the IQR over the median
    assert figures.noise_band(tight, tight) == figures.NOISE_FLOOR
    assert figures.noise_band(tight, loose) == pytest.approx(0.1)
    assert figures.noise_band(tight, None) == figures.DEFAULT_NOISE  # one side unmeasured
    assert figures.relative_spread([1.0, 2.0]) is None  # too few rounds to say
    assert figures.ratio_phrase(1.02, noise=figures.noise_band(tight, tight)) == "1.02x faster"
    assert figures.ratio_phrase(1.08, noise=figures.noise_band(tight, loose)).startswith("the same (1.08x faster")
    assert figures.compare_phrase(1.01, "X") == "the same as X (1.01x faster, inside the ±3% noise)"
    assert figures.compare_phrase(2.0, "X") == "2.00x faster than X"
    assert figures.speed_phrase(1.0, 1.01) == "the same (1.01x slower, inside the ±3% noise)"


def test_figure_panels_check_their_labels(tmp_path):
    pytest.importorskip("PIL")
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        figures.Panel("x", images, 2, row_labels=["a", "b"])
    with pytest.raises(ValueError, match="do not fill rows of 4"):
        figures.Panel("x", images, 4)
    path = figures.save([figures.Panel("t", images, 3, caption="c", row_labels=["a", "b"],
                                       col_labels=["1", "2", "3"])], str(tmp_path / "f.png"), title="T")
    w, h = _png_size(path)
    assert w >= 3 * 64 and h >= 2 * 64
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_demo_self_check_fails_on_wrong_samples(tmp_path, monkeypatch):
    # A sampler whose output is off the data manifold must make the demo fail (the check can fail).
    original = demo._sample

    def noisy_sample(*args, **kwargs):
        out = original(*args, **kwargs)
        return out + 0.2 * torch.randn_like(out)

    monkeypatch.setattr(demo, "_sample", noisy_sample)
    report = demo.run_demo(str(tmp_path), quick=True, steps=5, batch=4)
    assert not report["passed"]
    assert not report["checks"]["unconditional"]["passed"] and not report["checks"]["slerp"]["passed"]
    assert report["checks"]["conditional"]["passed"]  # that run does not go through _sample


# --------------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------------


def test_profile_json_and_plot_on_the_embedded_model(tmp_path, capsys):
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    # --device cpu: the CPU timer is what is checked (auto would pick a GPU's CUDA events where one exists).
    rc = cli.main(["profile", "--device", "cpu", "--steps", "5", "--batch", "2", "--repeats", "2", "--json",
                   str(out_json), "--plot", str(out_png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    assert [r["step"] for r in rows] == list(range(5))
    for r in rows:
        assert r["model_ms"] > 0 and r["update_ms"] > 0
        assert r["total_ms"] >= r["model_ms"] + r["update_ms"] - 1e-6
    # The loop's work between steps has its own column (step 0's is the run's setup: not shown).
    assert math.isnan(rows[0]["other_ms"]) and all(r["other_ms"] > 0 for r in rows[1:])
    assert "other ms" in out and "other = from the previous step's end to the model call" in " ".join(out.split())
    s = report["summary"]
    assert s["steps"] == 5 and s["total_ms"]["p50"] <= s["total_ms"]["p90"]
    assert s["it_per_s"] == pytest.approx(1e3 / s["total_ms"]["mean"])
    assert report["config"]["timer"] == "perf_counter" and report["config"]["repeats"] == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out and not out_png.exists()
    else:
        assert _png_size(str(out_png))[0] > 100


def test_profile_columns_add_up_to_the_step(tmp_path):
    # One timed run (no medians across runs): model + guidance/update + other is the whole step, exactly.
    problem = profiler.embedded_problem(torch.device("cpu"), torch.float32, batch=2, steps=4, size=8)
    for backend in ("reference", "native"):
        rows, _ = profiler.profile_steps(problem, backend=backend, warmup=0, repeats=1)
        assert len(rows) == 4
        for r in rows[1:]:
            assert r["model_ms"] + r["update_ms"] + r["other_ms"] == pytest.approx(r["total_ms"], rel=1e-6, abs=1e-6)
        assert rows[0]["model_ms"] + rows[0]["update_ms"] == pytest.approx(rows[0]["total_ms"], rel=1e-6, abs=1e-6)


def test_profile_compares_backends_side_by_side_in_one_run(tmp_path, capsys):
    out_json = tmp_path / "p.json"
    assert cli.main(["profile", "--device", "cpu", "--steps", "3", "--batch", "2", "--repeats", "2",
                     "--backend", "native,reference", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert list(report["backends"]) == ["native", "reference"] and report["config"]["interleaved"]
    assert report["rows"] == report["backends"]["native"]["rows"]  # the first backend at the top level too
    assert "backend native:" in out and "backend reference:" in out and "backends side by side" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("native "))
    assert ("faster" in line or "slower" in line or "the same" in line) and "baseline" in out


def test_profile_backends_interleaves_its_runs(monkeypatch):
    # Same warm-up for every backend, then rounds in alternating order (A B, B A, ...): a slow spell or the
    # machine warming up hits every backend alike.
    calls = []
    reference_loop, fast_loop = problems.reference_loop, problems.fast_loop
    monkeypatch.setattr(problems, "reference_loop",
                        lambda *a, **k: calls.append("reference") or reference_loop(*a, **k))
    monkeypatch.setattr(problems, "fast_loop", lambda *a, **k: calls.append("native") or fast_loop(*a, **k))
    problem = profiler.embedded_problem(torch.device("cpu"), torch.float32, batch=2, steps=2, size=8)
    out = profiler.profile_backends(problem, ("native", "reference"), warmup=1, repeats=3)
    assert calls == ["native", "reference"] + ["native", "reference", "reference", "native", "native", "reference"]
    assert torch.equal(out["native"][1], out["reference"][1])
    with pytest.raises(ValueError, match="distinct"):
        profiler.profile_backends(problem, ("native", "native"))


def test_profile_trace_shows_the_fused_step_op(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "--steps", "3", "--batch", "2", "--backend", "native", "--trace", str(trace)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "ddim_fast::ddim_step" in names or "ddim_fast::ddim_step_out" in names, \
        "FastDDIMSampler did not run the fused ddim_fast step op"
    assert {"ddim step 0", "ddim step 2"} <= names
    capsys.readouterr()


def test_profile_reference_backend_on_tiny_unet(capsys):
    assert cli.main(["profile", "--model", "tiny-unet", "--steps", "2", "--batch", "1", "--backend", "reference",
                     "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "backend reference" in out and "it/s" in out


def test_cli_errors_are_clear(capsys):
    with pytest.raises(SystemExit):
        cli.main(["profile", "--model", "no-such-model"])
    assert "argument --model: invalid choice: 'no-such-model'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------


def test_bench_tiny_unet_agrees_with_the_diffusers_loop(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    rc = cli.main(["bench", "--model", "tiny-unet", "--steps", "3", "--repeats", "1", "--dtype", "fp32",
                   "--json", str(out_json), "--variants", "diffusers,fast,reference"])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out_json.read_text())
    assert report["agree"] and report["baseline"] == "diffusers"
    for name in ("fast", "reference"):
        assert report["results"][name]["rel_error_vs_diffusers"] <= 1e-5
        assert report["results"][name]["it_per_s"] > 0
        assert report["proofs"][name]["ok"], report["proofs"][name]
    assert report["proofs"]["fast"]["fused_step_ops"] == 3 and report["proofs"]["reference"]["fused_step_ops"] == 0
    assert "PASS" in out and report["environment"]["hardware"]
    assert out.count("proof:") == 3


def test_bench_detects_disagreement(monkeypatch):
    loops = bench.load_harness("loops")
    original = loops.fast_loop
    monkeypatch.setattr(loops, "fast_loop", lambda *a, **k: original(*a, **k) * (1 + 1e-3))
    with pytest.raises(AssertionError, match="disagree"):
        bench.load_harness("e2e").run_bench("tiny-unet", steps=2, repeats=1, variants=("diffusers", "fast"))


def test_bench_reports_a_failing_loop_and_exits_nonzero(monkeypatch, capsys):
    def broken_sampler(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(bench.load_harness("loops"), "make_fast_sampler", broken_sampler)
    rc = cli.main(["bench", "--model", "tiny-unet", "--steps", "2", "--repeats", "1", "--variants", "diffusers,fast"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "fast" in out and "FAILED: RuntimeError: sampler exploded" in out


def test_bench_loads_the_checkouts_harness_once_and_explains_without_one(monkeypatch, tmp_path):
    import sys

    harness = bench.load_harness()
    assert harness is sys.modules["harness"] and bench.load_harness() is harness
    assert os.path.dirname(harness.__file__) == os.path.join(ROOT, "benchmarks", "harness")
    assert bench.load_harness("e2e") is sys.modules["harness.e2e"]
    # An installed package has no benchmarks/ beside it: the command says what to do.
    monkeypatch.setattr(bench, "harness_folder", lambda: None)
    with pytest.raises(RuntimeError, match="checkout of the ddim-fast repository"):
        bench.load_harness("e2e")
    # A different module that happens to be called `harness` is not taken for ours.
    monkeypatch.undo()
    fake = type(sys)("harness")
    fake.__file__ = str(tmp_path / "harness" / "__init__.py")
    monkeypatch.setitem(sys.modules, "harness", fake)
    with pytest.raises(RuntimeError, match="is loaded already"):
        bench.load_harness()


def test_bench_breakdown_on_the_cpu(tmp_path, capsys):
    out_json = tmp_path / "breakdown.json"
    rc = cli.main(["--threads", "1", "bench", "--breakdown", "--model", "tiny-unet", "--breakdown-calls", "1",
                   "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(out_json.read_text())
    assert report["kind"] == "breakdown" and list(report["variants"]) == ["plain", "channels-last", "optimize"]
    for name, r in report["variants"].items():
        assert r["kinds_ms"]["convolution"] > 0 and r["kinds_ms"]["GEMM"] > 0, (name, r["kinds_ms"])
        assert r["kinds_ms"]["attention"] > 0 and r["kinds_ms"]["normalization"] > 0, (name, r["kinds_ms"])
        # the kinds add up to the operators' total, and that is within the call's wall time
        assert abs(sum(r["kinds_ms"].values()) - r["kernel_ms"]) < 1e-9
        assert 0 < r["kernel_ms"] and r["wall_ms"] > 0
    for kind in ("convolution", "GEMM", "attention", "normalization", "elementwise", "copies/layout", "other"):
        assert kind in out
    assert "ms per UNet step" in out and "FAILED" not in out


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------


def test_info_prints_the_backends(tmp_path):
    # The real entry point, once: `python -m ddim_fast info`.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ddim_fast", "info", "--json", str(tmp_path / "i.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("C++ CPU", "CUDA extension", "Triton", "torch", "diffusers", "CPU"):
        assert word in proc.stdout
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["backends"]["C++ CPU"].startswith("usable")
    assert data["cpu"]["cores"] == os.cpu_count()


# --------------------------------------------------------------------------------------------------
# benchmarks/report.py
# --------------------------------------------------------------------------------------------------


def _fake_pytest_benchmark_json() -> dict:
    def bench_entry(group, name, median, baseline=False, steps=None):
        extra = {"baseline": True} if baseline else {}
        if steps:
            extra["steps"] = steps
        return {"group": group, "name": name, "fullname": f"benchmarks/x.py::{name}", "extra_info": extra,
                "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.05, "median": median,
                          "stddev": median * 0.01, "rounds": 5, "ops": 1 / median}}

    return {
        "machine_info": {"cpu": {"brand_raw": "Fake CPU 9000", "count": 2}, "node": "ci", "python_version": "3.11"},
        "commit_info": {"id": "abc1234"},
        "datetime": "2026-11-23T19:00:00",
        "version": "5.1.0",
        "benchmarks": [
            bench_entry("step fp32", "test_step[reference]", 2e-3, baseline=True),
            bench_entry("step fp32", "test_step[native]", 5e-4),
            bench_entry("step fp32", "test_step[slow]", 4e-3),
            bench_entry("step fp32", "test_step[copy]", 4e-4),
            bench_entry("e2e", "test_e2e[diffusers]", 0.1, steps=10),
            bench_entry("e2e", "test_e2e[fast]", 0.08, steps=10),
        ],
    }


def _benchmarks_conftest():
    """benchmarks/conftest.py as a module of its own (tests/conftest.py already holds the name 'conftest')."""
    spec = importlib.util.spec_from_file_location("benchmarks_conftest",
                                                  os.path.join(ROOT, "benchmarks", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_benchmark_summary_shows_steps_and_per_step_time_and_calls_noise_the_same():
    bc = _benchmarks_conftest()
    results = [bc.Result("e2e cpu tiny-unet", "diffusers", 0.0127, 0, "Fake CPU", True, False, unit="ms/step",
                         steps=10, spread=0.02),
               bc.Result("e2e cpu tiny-unet", "fast", 0.0125, 0, "Fake CPU", False, False, unit="ms/step",
                         steps=10, spread=0.02),
               bc.Result("e2e cpu tiny-unet", "fast+attn", 0.0100, 0, "Fake CPU", False, False, unit="ms/step",
                         steps=10, spread=0.02)]
    lines = bc.format_group("e2e cpu tiny-unet", results)
    assert lines[0] == "[e2e cpu tiny-unet] on Fake CPU"
    assert "12.700 ms/step" in lines[1] and "(10 steps per call, 127.0 ms per call)" in lines[1]
    assert "the same as diffusers (1.02x faster, inside the ±2% noise)" in lines[2]  # 1.6%: inside the noise
    assert "1.27x faster than diffusers" in lines[3]


def test_report_builds_the_table_and_writes_between_markers(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-2026-11-23.json").write_text(json.dumps(_fake_pytest_benchmark_json()))
    bench_report = {"kind": "bench", "date": "2026-11-23", "environment": {"hardware": "Fake GPU"},
                    "config": {"model": "tiny-unet", "steps": 3, "batch": 1, "dtype": "fp32", "guidance": 7.5,
                               "latent": [4, 16, 16], "tolerance": 1e-5},
                    "unet_only_ms_per_step": 8.0, "baseline": "diffusers", "agree": True,
                    "results": {"diffusers": {"it_per_s": 100.0, "ms_per_step": 10.0, "non_unet_ms_per_step": 2.0,
                                              "non_unet_fraction": 0.2, "speedup_vs_diffusers": 1.0},
                                "fast": {"it_per_s": 120.0, "ms_per_step": 8.33, "non_unet_ms_per_step": 0.33,
                                         "non_unet_fraction": 0.04, "speedup_vs_diffusers": 1.2,
                                         "rel_error_vs_diffusers": 3e-7}}}
    (results / "bench-cpu.json").write_text(json.dumps(bench_report))
    (results / "import.json").write_text(json.dumps({
        "kind": "import_time", "repeats": 3, "hardware": "Fake CPU 9000", "goal": "<= 1.1x",
        "variants": {"import torch; import ddim_fast": {"median_total_s": 0.9, "median_extra_s": 0.009,
                                                       "ratio_to_import_torch": 1.01, "modules": {"triton": False}}}}))
    (results / "micro.json").write_text(json.dumps({
        "kind": "gpu_micro", "device": "cuda:0", "hardware": "Fake H200", "date": "2027-01-01", "complete": True,
        "step": [{"group": "2x4x64x64 fp16", "name": "unfused-eager", "impl": "unfused-eager", "seconds": 2e-5,
                  "gb_per_s": 10, "x_copy": 5.0, "rel_error": 1e-4},
                 {"group": "2x4x64x64 fp16", "name": "copy", "impl": "copy", "seconds": 4e-6, "gb_per_s": 50,
                  "x_copy": 1.0, "rel_error": None}],
        "attention": [{"group": "cross", "impl": "ours_triton", "seconds": 8e-6, "tflop_per_s": 10.0,
                       "speedup_vs_best_sdpa": 1.2, "speedup_vs_einsum": 5.0, "rel_error": 1e-3, "correct": True}]}))
    # generate's JSON names no hardware: the run's summary beside it (same name prefix) does
    (results / "gpu-fake-2027-01-01-generate.json").write_text(json.dumps({
        "rank": 0, "generated": 64, "seconds": 0.5, "images_per_s": 128.0, "samples": 64, "new": 64, "resumed": 0,
        "rows": 64, "wall_seconds": 0.52, "job_images_per_s": 123.4, "per_rank_images_per_s": [128.0],
        "world_size": 1}))
    (results / "gpu-fake-2027-01-01-summary.txt").write_text(
        "gpu Fake H200 sm_90\nok    python -m ddim_fast generate --model embedded --num-samples 64 (3s)\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nafter\n")
    rc = report.main(["--results", str(results), "--readme", str(readme), "--chart", str(tmp_path / "chart.png")])
    assert rc == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- results:end -->\n\nafter\n")
    table = text[text.index("<!-- results:start -->"):text.index("<!-- results:end -->")]
    assert "Fake CPU 9000" in table and "2026-11-23" in table
    assert "4.00x faster" in table  # native vs reference: 2e-3 / 5e-4
    assert "2.00x slower" in table and "0.50x" not in table  # a slowdown is called one
    assert "| floor |" in table and "1.25x the copy time" in table  # the copy is the floor, not a competitor
    assert "1.25x faster" in table  # fast vs diffusers: 0.1 / 0.08
    assert "10.000 ms" in table and "8.000 ms" in table  # per step: median / steps
    assert "cpu-2026-11-23.json" in table and "bench-cpu.json" in table
    assert "120.0" in table  # the bench JSON's it/s
    assert "import torch; import ddim_fast" in table and "1.010x" in table  # import_time JSON
    assert "benchmarks/gpu_micro.py`, Fake H200" in table and "1.20x faster" in table  # gpu_micro JSON
    assert "`python -m ddim_fast generate`, Fake H200 sm_90, 2027-01-01" in table and "| 123.4 |" in table
    assert "`python -m ddim_fast generate --model embedded --num-samples 64`" in table
    assert "No GPU measurement" not in table
    if importlib.util.find_spec("matplotlib"):
        assert _png_size(str(tmp_path / "chart.png"))[0] > 500
    capsys.readouterr()
