"""The pipeline benchmark's variants (``benchmarks/harness/pipelines.py``) prove what their names say, and each
proof fails when the variant did not run it: plain runs diffusers' own attention and scheduler, optimize the
fused step and its attention choice, the compiled variants really went through Dynamo, the recipe's UNet is
channels_last with fused QKV projections. CPU, tiny pipelines, 2 steps; the compiled variants compile with
Dynamo alone (``backend="eager"``: Inductor on two cores would take minutes; the GPU run compiles for real)."""

from __future__ import annotations

import os

import pytest
import torch

from ddim_fast.tools.bench import load_harness

diffusers = pytest.importorskip("diffusers")

pipelines, proofs = load_harness("pipelines"), load_harness("proofs")


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield pipelines.PipelineSetup.from_name("tiny-sd", "cpu", torch.float32, steps=2)
    torch.set_num_threads(threads)


@pytest.fixture
def dynamo_only(monkeypatch):
    monkeypatch.setattr(pipelines, "compile_unet",
                        lambda model, variant: torch.compile(model, backend="eager", fullgraph=variant.fullgraph))


def _run(setup, name):
    run = pipelines.PipelineRun(setup, name).prepare()
    try:
        run.first_call()
        run.run()
        run.finish()
    finally:
        run.close()
    return run


def test_plain_and_optimize_prove_what_they_ran(tiny):
    n = len(pipelines.attention_modules(tiny.original_unet))
    plain = _run(tiny, "plain")
    assert plain.proof["fused_step_ops"] == 0 and plain.proof["fused_attention_ops"] == 0
    assert plain.proof["unfused_attention_ops"] == plain.proof["attention_calls"] == n * 2
    assert plain.proof["scheduler"] == "DDIMScheduler" and plain.rel_error == 0 and plain.first_call_s > 0
    # optimize's CPU defaults: the fused scheduler only, so plain's latents bit for bit
    optimize = _run(tiny, "optimize")
    assert optimize.proof["scheduler"] == "FastDDIMScheduler" and optimize.proof["fused_step_ops"] == 2
    assert optimize.proof["fused_attention_modules"] == 0 and optimize.proof["fused_attention_ops"] == 0
    assert optimize.agrees() and optimize.rel_error == 0
    # attention forced on (what "auto" does on CUDA): every module fused, every call through FusedAttnProcessor
    forced = _run(tiny, pipelines.PipelineVariant("optimize-attention", "optimize", {"attention": True}))
    assert forced.proof["fused_attention_modules"] == n and forced.proof["attention_backends"]
    assert forced.agrees() and forced.rel_error <= 1e-5
    no_attention = _run(tiny, "optimize-no-attention")
    assert no_attention.proof["fused_attention_ops"] == 0 and no_attention.proof["fused_step_ops"] == 2
    no_graph = _run(tiny, "optimize-no-graph")
    assert no_graph.proof["fused_step_ops"] == 2 and "cuda_graph_entries" not in no_graph.proof
    # every run left the pipeline plain
    assert type(tiny.pipe.scheduler) is diffusers.DDIMScheduler and tiny.pipe.unet is tiny.original_unet
    assert "forward" not in tiny.original_unet.__dict__


def test_plain_fails_when_our_attention_runs_in_it(tiny):
    from ddim_fast.attention_processors import FusedAttnProcessor

    module = pipelines.attention_modules(tiny.original_unet)[0]
    original = module.get_processor()
    module.set_processor(FusedAttnProcessor(backend="fused"))
    try:
        run = pipelines.PipelineRun(tiny, "plain").prepare()
        with pytest.raises(AssertionError, match="plain must run none"):
            run.first_call()
        assert run.proof["ok"] is False and run.proof["fused_attention_ops"] == 2  # one module x two steps
        run.close()
    finally:
        module.set_processor(original)


def test_optimize_fails_when_its_step_is_not_the_fused_op(tiny, monkeypatch):
    import ddim_fast

    real = ddim_fast.optimize
    monkeypatch.setattr(ddim_fast, "optimize", lambda pipe, **kwargs: real(pipe, scheduler=False, **kwargs))
    run = pipelines.PipelineRun(tiny, "optimize").prepare()
    try:
        with pytest.raises(AssertionError, match="0 fused step ops for 2 steps"):
            run.first_call()
    finally:
        run.close()


def test_compiled_variants_prove_dynamo_compiled(tiny, dynamo_only):
    default = _run(tiny, "compile-default")
    assert default.proof["compile_counters"]["unique_graphs"] >= 1
    assert default.proof["compile_options"] == {"mode": "default", "fullgraph": False}
    recipe = _run(tiny, "diffusers-recipe")
    assert recipe.proof["compile_options"] == {"mode": "reduce-overhead", "fullgraph": True}
    assert recipe.proof["attn_processors"] == ["FusedAttnProcessor2_0"] and recipe.proof["fused_qkv_modules"] > 0
    assert recipe.agrees()
    # the recipe worked on a copy: the pipeline's UNet keeps its layout and diffusers' processors
    assert tiny.original_unet.conv_in.weight.is_contiguous()
    assert {type(p).__name__ for p in tiny.original_unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_a_compiled_variant_that_did_not_compile_fails(tiny, monkeypatch):
    monkeypatch.setattr(pipelines, "compile_unet", lambda model, variant: model)
    run = pipelines.PipelineRun(tiny, "compile-reduce-overhead").prepare()
    try:
        with pytest.raises(AssertionError, match="Dynamo compiled nothing.*not torch.compile's OptimizedModule"):
            run.first_call()
    finally:
        run.close()


def test_compile_proof_rules():
    before = dict.fromkeys(("unique_graphs", "frames_ok", "graph_breaks", "fxgraph_cache_hit", "fxgraph_cache_miss",
                            "cudagraph_skips", "cudagraphs_recorded"), 0)
    good = dict(before, unique_graphs=1, cudagraphs_recorded=2)
    assert proofs.prove_compiled("x", before, good, fullgraph=True, cudagraphs=True) == []
    broken = dict(good, graph_breaks=3, cudagraph_skips=1, cudagraphs_recorded=0)
    problems = proofs.prove_compiled("x", before, broken, fullgraph=True, cudagraphs=True)
    assert len(problems) == 3 and "3 graph breaks" in problems[0] and "skipped CUDA graphs" in problems[1]
    assert proofs.prove_compiled("x", before, broken, fullgraph=False, cudagraphs=False) == []
    assert "recompiles" in proofs.prove_no_recompile("x", good, dict(good, unique_graphs=2))[0]


def test_skip_reasons(monkeypatch):
    cpu = torch.device("cpu")
    options = pipelines.optimize_options()
    for name, variant in pipelines.VARIANTS.items():
        missing = set(variant.optimize_kwargs) - options
        reason = pipelines.skip_reason(variant, cpu)
        assert (reason is not None) == bool(missing or (variant.compiles and os.environ.get("CI"))), name
    monkeypatch.setenv("DDIM_FAST_BENCH_NO_COMPILE", "1")
    assert "DDIM_FAST_BENCH_NO_COMPILE" in pipelines.skip_reason(pipelines.VARIANTS["compile-default"], cpu)
    assert pipelines.TABLE_VARIANTS[:4] == ("plain", "optimize", "compile-reduce-overhead", "diffusers-recipe")
    assert "channels-last" not in pipelines.TABLE_VARIANTS


def test_the_sdxl_pipeline_runs_plain_and_optimized():
    setup = pipelines.PipelineSetup.from_name("tiny-sdxl", "cpu", torch.float32, steps=2, batch=2)
    assert type(setup.pipe).__name__ == "StableDiffusionXLPipeline"
    assert setup.unet_call()[0].shape == setup.unet_inputs[0].shape  # the UNet alone, with SDXL's added cond
    plain = _run(setup, "plain")
    assert plain.proof["unfused_attention_ops"] == plain.proof["attention_calls"] > 0
    optimize = _run(setup, "optimize")
    assert optimize.proof["fused_step_ops"] == 2 and optimize.agrees()
