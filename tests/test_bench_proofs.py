"""The bench variants prove what their names say (the checkout's ``benchmarks/harness``, loaded as ``python -m
ddim_fast bench`` loads it): op counts at the dispatcher, UNet forward counts, graph capture and replay checks —
and each proof fails when the variant did not run what it claims. CPU only (tiny UNet); the GPU graph path is
covered by the same checks fed fake samplers."""

from __future__ import annotations

import pytest
import torch

from ddim_fast.tools import problems
from ddim_fast.tools.bench import load_harness

diffusers = pytest.importorskip("diffusers")

e2e, loops, proofs = load_harness("e2e"), load_harness("loops"), load_harness("proofs")


@pytest.fixture(scope="module")
def tiny():
    return problems.unet_problem("tiny-unet", torch.device("cpu"), torch.float32, batch=1, steps=2, guidance=7.5)


def test_op_counter_sees_the_fused_ops_and_sdpa():
    q = torch.randn(1, 2, 5, 8)
    with proofs.OpCounter() as ops:
        torch.ops.ddim_fast.attention(q, q, q, 0.5, None)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.softmax(q, -1)
    assert ops.fused_attention == 1
    assert ops.unfused_attention == 2  # the SDPA kernel and the softmax
    assert ops.fused_steps == 0


def test_every_variant_proves_itself(tiny):
    report = e2e.run_bench("tiny-unet", steps=2, repeats=1, variants=("diffusers", "reference", "fast", "fast+attn"))
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
    assert "proof:" in e2e.format_bench(e2e.check_agreement(report))


def test_fast_attn_runs_what_optimize_fuses_pinned_to_our_kernel(tiny):
    from ddim_fast.attention_processors import FusedAttnProcessor

    variant = loops.Variant.build(tiny, "fast+attn")
    try:
        processors = set(variant.unet.attn_processors.values())
        assert len(processors) == 1
        (processor,) = processors
        assert isinstance(processor, FusedAttnProcessor) and processor.backend == "fused"
        assert variant.unet is not tiny.unet  # a copy: the problem's UNet keeps diffusers' processors
        assert not any(isinstance(p, FusedAttnProcessor) for p in tiny.unet.attn_processors.values())
    finally:
        variant.close()


def test_fast_attn_leaves_what_optimize_leaves_and_counts_it(tiny):
    # A module the product's filter refuses (here a user's subclass of diffusers' processor) keeps its processor,
    # as optimize() leaves it, and runs SDPA: the proof expects exactly that many unfused attention ops.
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    class CountingProcessor(AttnProcessor2_0):
        pass

    problem = copy.copy(tiny)
    problem.unet = copy.deepcopy(tiny.unet)
    first = next(iter(problem.unet.attn_processors)).removesuffix(".processor")
    problem.unet.get_submodule(first).set_processor(CountingProcessor())
    variant = loops.Variant.build(problem, "fast+attn")
    try:
        n = variant.n_attention
        assert variant.n_fused == n - 1 and list(variant.unserved) == [first]
        variant.first_call()
        assert variant.proof["fused_attention_ops"] == 2 * (n - 1)
        assert variant.proof["unfused_attention_ops"] == 2  # one module x two forwards
        assert "subclass of AttnProcessor2_0" in variant.proof["unserved_attention_modules"][first]
    finally:
        variant.close()


def test_fast_attn_fails_when_one_module_stays_unfused(tiny):
    from diffusers.models.attention_processor import AttnProcessor2_0

    variant = loops.Variant.build(tiny, "fast+attn")
    try:
        # Behind the fusing's back (its record still says every module is fused): the op counts catch it.
        name = next(iter(variant.unet.attn_processors)).removesuffix(".processor")
        variant.unet.get_submodule(name).set_processor(AttnProcessor2_0())
        with pytest.raises(AssertionError, match="some attention ran unfused"):
            variant.first_call()
        assert variant.proof["unfused_attention_ops"] == 2  # one module x two forwards
    finally:
        variant.close()


def test_fast_attn_auto_runs_optimizes_choice_and_names_it(tiny):
    variant = loops.Variant.build(tiny, "fast+attn-auto")
    try:
        variant.first_call()
        n = variant.n_attention
        # On the CPU the choice is SDPA by rule: every attention call ran one SDPA, through the fused processor.
        assert variant.proof["fused_attention_ops"] + variant.proof["unfused_attention_ops"] == 2 * n
        assert variant.proof["attention_backends"] and all(
            "(rule)" in how or "(measured)" in how for how in variant.proof["attention_backends"].values())
    finally:
        variant.close()


def test_the_harness_has_one_fuse_attention():
    # The bench fuses with the product's function (its filter included), not a copy of its own.
    from ddim_fast import attention_processors

    assert not hasattr(loops, "fuse_attention") and not hasattr(proofs, "fuse_attention")
    assert loops.fuse_attention_as_optimize.__code__.co_names.count("fuse_attention") == 1
    assert attention_processors.fuse_attention.__module__ == "ddim_fast.attention_processors"


def test_fast_fails_when_the_step_is_not_the_fused_op(tiny, monkeypatch):
    original = loops.make_fast_sampler
    monkeypatch.setattr(loops, "make_fast_sampler", lambda *a, **k: original(*a, **{**k, "backend": "reference"}))
    variant = loops.Variant.build(tiny, "fast")
    try:
        with pytest.raises(AssertionError, match="0 fused step ops for 2 UNet forwards"):
            variant.first_call()
    finally:
        variant.close()


def test_bench_reports_a_failed_proof_without_timing_it(monkeypatch, capsys):
    original = loops.make_fast_sampler
    monkeypatch.setattr(loops, "make_fast_sampler", lambda *a, **k: original(*a, **{**k, "backend": "reference"}))
    report = e2e.run_bench("tiny-unet", steps=2, repeats=1, variants=("diffusers", "fast"), check=False)
    assert "fast" in report["failed"] and "fast" not in report["results"]
    assert report["proofs"]["fast"]["ok"] is False


def test_timed_calls_are_checked(tiny):
    variant = loops.Variant.build(tiny, "fast")
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
        assert loops.Variant.build(tiny, "fast+graph") == "CUDA graphs need a GPU"
    # A sampler whose cached steps are the eager fallback (what a failed capture leaves) fails the proof.
    sampler = problems.make_fast_sampler(tiny, cuda_graph=True)
    problems.fast_loop(tiny, sampler)  # on CPU the graph path runs eagerly over static buffers
    entries = proofs.graph_entries(sampler)
    assert entries and not any(e.captured for e in entries)
    failures = proofs.prove_graph("fast+graph", sampler)
    assert failures and "not captured CUDA graphs" in failures[0]
    empty = problems.make_fast_sampler(tiny, cuda_graph=True)
    assert "no captured step" in proofs.prove_graph("fast+graph", empty)[0]


def test_timed_graph_call_accounting():
    graph = proofs.Expectation(fused_step=True, fused_attention=False, graph=True)
    eager = proofs.Expectation(fused_step=True, fused_attention=False, graph=False)
    assert proofs.prove_timed_call("g", graph, 50, forwards=0, replays=50) == []
    assert proofs.prove_timed_call("g", graph, 50, forwards=1, replays=49) == []  # fp16: eager first step
    assert proofs.prove_timed_call("g", graph, 50, forwards=50, replays=0)  # ran eagerly
    assert proofs.prove_timed_call("g", graph, 50, forwards=2, replays=48)
    assert proofs.prove_timed_call("e", eager, 50, forwards=50, replays=0) == []
    assert proofs.prove_timed_call("e", eager, 50, forwards=49, replays=0)


def test_forward_counter_counts_apply_model_of_ldm_style_models():
    from ddim_fast.tools import profiler

    problem = profiler.embedded_problem(torch.device("cpu"), torch.float32, batch=2, steps=3, guidance=3.0)
    variant = loops.Variant.build(problem, "fast")
    try:
        variant.first_call()
        assert variant.proof["unet_forwards"] == 3 and variant.proof["fused_step_ops"] == 3
        assert variant.n_attention is None
    finally:
        variant.close()
    assert "apply_model" not in problem.model.__dict__  # the counter is gone
    assert loops.Variant.build(problem, "diffusers") == "the diffusers loop needs a UNet problem"


def test_op_counter_counts_the_triton_steps_undispatched_calls():
    # ops.ddim_step's eager Triton path calls the op's kernel function without the dispatcher: still counted.
    from ddim_fast import _library, ops, schedule

    x = torch.randn(1, 4, 8, 8)
    table = schedule.coefficient_table([1, 0], [0.5, 0.9], [0.9, 1.0])
    original = _library.ddim_step_triton_kernel
    with proofs.OpCounter() as counted:
        ops.ddim_step(x, torch.randn(1, 4, 8, 8), table, torch.tensor([0]), backend="triton")
        ops.ddim_step(x, torch.randn(1, 4, 8, 8), table, torch.tensor([0]), backend="native")
    assert counted.count("ddim_fast::ddim_step_triton") == 1 and counted.fused_steps == 2
    assert _library.ddim_step_triton_kernel is original  # unwrapped on exit
