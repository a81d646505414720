"""The bench variants prove what their names say (``ddim_fast.tools.bench``): op counts at the dispatcher,
UNet forward counts, graph capture and replay checks — and each proof fails when the variant did not run
what it claims. CPU only (tiny UNet); the GPU graph path is covered by the same checks fed fake samplers."""

from __future__ import annotations

import pytest
import torch

from ddim_fast.tools import bench

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny():
    return bench.unet_problem("tiny-unet", torch.device("cpu"), torch.float32, batch=1, steps=2, guidance=7.5)


def test_op_counter_sees_the_fused_ops_and_sdpa():
    q = torch.randn(1, 2, 5, 8)
    with bench.OpCounter() as ops:
        torch.ops.ddim_fast.attention(q, q, q, 0.5, None)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.softmax(q, -1)
    assert ops.fused_attention == 1
    assert ops.unfused_attention == 2  # the SDPA kernel and the softmax
    assert ops.fused_steps == 0


def test_every_variant_proves_itself(tiny):
    report = bench.run_bench("tiny-unet", steps=2, repeats=1, variants=("diffusers", "reference", "fast", "fast+attn"))
    proofs = report["proofs"]
    n = proofs["fast"]["attention_modules"]
    assert n == len(tiny.unet.attn_processors) > 0
    for name in ("diffusers", "reference"):
        assert proofs[name]["fused_step_ops"] == 0 and proofs[name]["fused_attention_ops"] == 0
        assert proofs[name]["unfused_attention_ops"] == n * 2
    assert proofs["fast"]["fused_step_ops"] == 2 and proofs["fast"]["unfused_attention_ops"] == n * 2
    fused = proofs["fast+attn"]
    assert (fused["fused_step_ops"], fused["fused_attention_ops"], fused["unfused_attention_ops"]) == (2, 2 * n, 0)
    assert all(p["ok"] and p["timed_calls_checked"] == 1 for p in proofs.values())
    assert report["results"]["fast+attn"]["fused_attention"] is True
    assert "proof:" in bench.format_bench(bench._check(report))


def test_fast_attn_fails_when_one_module_stays_unfused(tiny, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    original = bench.fuse_attention

    def fuse_all_but_one(unet):
        n = original(unet)
        name = next(iter(unet.attn_processors))
        processors = dict(unet.attn_processors)
        processors[name] = AttnProcessor2_0()
        unet.set_attn_processor(processors)
        return n

    monkeypatch.setattr(bench, "fuse_attention", fuse_all_but_one)
    with pytest.raises(AssertionError, match="without FusedAttnProcessor"):
        bench.Variant.build(tiny, "fast+attn")
    # Even with the processor check fooled, the op counts catch it.
    monkeypatch.setattr(bench, "check_fused_processors", lambda unet: [])
    variant = bench.Variant.build(tiny, "fast+attn")
    try:
        with pytest.raises(AssertionError, match="some attention ran unfused"):
            variant.first_call()
        assert variant.proof["unfused_attention_ops"] == 2  # one module x two forwards
    finally:
        variant.close()


def test_fast_fails_when_the_step_is_not_the_fused_op(tiny, monkeypatch):
    original = bench.make_fast_sampler
    monkeypatch.setattr(bench, "make_fast_sampler", lambda *a, **k: original(*a, **{**k, "backend": "reference"}))
    variant = bench.Variant.build(tiny, "fast")
    try:
        with pytest.raises(AssertionError, match="0 fused step ops for 2 UNet forwards"):
            variant.first_call()
    finally:
        variant.close()


def test_bench_reports_a_failed_proof_without_timing_it(monkeypatch, capsys):
    original = bench.make_fast_sampler
    monkeypatch.setattr(bench, "make_fast_sampler", lambda *a, **k: original(*a, **{**k, "backend": "reference"}))
    report = bench.run_bench("tiny-unet", steps=2, repeats=1, variants=("diffusers", "fast"), check=False)
    assert "fast" in report["failed"] and "fast" not in report["results"]
    assert report["proofs"]["fast"]["ok"] is False


def test_timed_calls_are_checked(tiny):
    variant = bench.Variant.build(tiny, "fast")
    try:
        variant.first_call()
        variant()
        assert variant.proof["timed_calls_checked"] == 1
        loop = variant.fn
        variant.fn = lambda: (loop(), loop())[1]  # a timed call that runs the loop twice
        with pytest.raises(AssertionError, match="4 UNet forwards for 2 steps"):
            variant()
        assert variant.proof["ok"] is False
    finally:
        variant.close()


def test_graph_variant_skips_without_cuda_and_the_graph_proof_rejects_eager_fallbacks(tiny):
    if not torch.cuda.is_available():
        assert bench.Variant.build(tiny, "fast+graph") == "CUDA graphs need a GPU"
    # A sampler whose cached steps are the eager fallback (what a failed capture leaves) fails the proof.
    sampler = bench.make_fast_sampler(tiny, cuda_graph=True)
    bench.fast_loop(tiny, sampler)  # on CPU the graph path runs eagerly over static buffers
    entries = bench.graph_entries(sampler)
    assert entries and not any(e.captured for e in entries)
    problems = bench.prove_graph("fast+graph", sampler)
    assert problems and "not captured CUDA graphs" in problems[0]
    empty = bench.make_fast_sampler(tiny, cuda_graph=True)
    assert "no captured step" in bench.prove_graph("fast+graph", empty)[0]


def test_timed_graph_call_accounting():
    graph = bench.Expectation(fused_step=True, fused_attention=False, graph=True)
    eager = bench.Expectation(fused_step=True, fused_attention=False, graph=False)
    assert bench.prove_timed_call("g", graph, 50, forwards=0, replays=50) == []
    assert bench.prove_timed_call("g", graph, 50, forwards=1, replays=49) == []  # fp16: eager first step
    assert bench.prove_timed_call("g", graph, 50, forwards=50, replays=0)  # ran eagerly
    assert bench.prove_timed_call("g", graph, 50, forwards=2, replays=48)
    assert bench.prove_timed_call("e", eager, 50, forwards=50, replays=0) == []
    assert bench.prove_timed_call("e", eager, 50, forwards=49, replays=0)


def test_forward_counter_counts_apply_model_of_ldm_style_models():
    from ddim_fast.tools import profiler

    problem = profiler.embedded_problem(torch.device("cpu"), torch.float32, batch=2, steps=3, guidance=3.0)
    variant = bench.Variant.build(problem, "fast")
    try:
        variant.first_call()
        assert variant.proof["unet_forwards"] == 3 and variant.proof["fused_step_ops"] == 3
        assert variant.n_attention is None
    finally:
        variant.close()
    assert "apply_model" not in problem.model.__dict__  # the counter is gone
    assert bench.Variant.build(problem, "diffusers") == "the diffusers loop needs a UNet problem"
