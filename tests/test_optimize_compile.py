"""``optimize(pipe, compile=...)``: the compiled forward runs inside ``GraphedForward`` (on the CPU through its eager
static-buffer path), or installed alone with ``cuda_graph=False``; a Dynamo trace of an optimized model never
captures; the compile-cache file is written after the first call, loaded by the next optimize, and a bad file is
ignored. Dynamo runs with the ``eager`` backend here (the composition logic, in seconds); Inductor itself is
measured by ``benchmarks/compile_startup.py`` (minutes on two cores)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import SAMPLER_RTOL, assert_rel_close

diffusers = pytest.importorskip("diffusers")

import tiny_pipelines as tp  # noqa: E402

import ddim_fast  # noqa: E402
from ddim_fast import compiled as compiled_module  # noqa: E402
from ddim_fast.module_graph import GraphedForward  # noqa: E402
from ddim_fast.pipeline import optimized_state  # noqa: E402

DYNAMO = {"backend": "eager"}  # Dynamo's trace, no AOTAutograd/Inductor: the composition logic in seconds
ALL_ON = dict(attention=True, cuda_graph=True, channels_last=True, fuse_qkv=True)


@pytest.fixture(autouse=True)
def fresh_dynamo(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("DDIM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _run(pipe, steps: int = 3):
    embeds = tp.prompt_embeds()
    with torch.no_grad():
        return pipe(**embeds, height=32, width=32, num_inference_steps=steps, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_compiled_forward_inside_the_graph_path(cuda_graph):
    pipe = tp.sd()
    expected = _run(pipe)
    ddim_fast.optimize(pipe, **dict(ALL_ON, cuda_graph=cuda_graph), compile=DYNAMO, compile_cache=False)
    state = optimized_state(pipe)
    compiled = state.compiled["unet"]
    got = _run(pipe)
    assert compiled.calls >= 3 and _frames() >= 1, "the compiled forward did not run"
    assert _frames() == 1, f"recompiled: {_frames()} graphs (a guard on per-call Python state?)"
    if cuda_graph:
        graphed = state.graphed["unet"]
        assert graphed.forward is compiled and graphed.eager_calls == 0 and graphed.cache.misses == 1
    else:
        assert "unet" not in state.graphed and pipe.unet.__dict__["forward"]._ddim_fast_compiled
    assert "torch.compile(backend='eager', dynamic=False): unet" in state.summary
    assert_rel_close(got, expected, SAMPLER_RTOL, "optimize(compile=...) vs diffusers")
    ddim_fast.restore(pipe)
    assert "forward" not in pipe.unet.__dict__
    assert torch.equal(_run(pipe), expected)


def test_new_shapes_recompile_through_the_graph_key():
    """Replays skip Dynamo's guards: a call whose key differs (another shape) misses, warms up through the
    compiled forward (which re-checks its guards and recompiles) and gets its own entry."""
    unet = tp.tiny_unet()
    compiled = compiled_module.CompiledForward(unet, compiled_module.compile_options(DYNAMO))
    graphed = GraphedForward(unet, off_cuda="static", forward=compiled).install()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch, size in ((2, 16), (2, 16), (1, 16), (2, 8)):
            x = torch.randn(batch, 4, size, size, generator=gen)
            cond = torch.randn(batch, tp.TEXT_TOKENS, tp.TEXT_DIM, generator=gen)
            got = unet(x, 500, cond).sample
            assert_rel_close(got, type(unet).forward(unet, x, 500, cond).sample, SAMPLER_RTOL, f"{batch}x{size}")
    assert graphed.cache.misses == 3 and graphed.cache.hits == 1 and _frames() >= 3
    graphed.uninstall()


def test_dynamo_tracing_an_optimized_model_never_captures():
    pipe = tp.sd()
    ddim_fast.optimize(pipe, **ALL_ON)
    graphed = optimized_state(pipe).graphed["unet"]
    x = torch.randn(2, 4, 16, 16)
    cond = torch.randn(2, tp.TEXT_TOKENS, tp.TEXT_DIM)
    with torch.no_grad():
        expected = pipe.unet(x, 500, cond).sample
        traced = torch.compile(pipe.unet, backend="eager")(x, 500, cond).sample
    assert graphed.cache.misses == 1, "a capture happened while Dynamo traced"
    assert_rel_close(traced, expected, SAMPLER_RTOL, "torch.compile of an optimized UNet")
    ddim_fast.restore(pipe)


def test_compile_cache_file_is_written_loaded_and_a_bad_one_ignored(tmp_path, monkeypatch, caplog):
    saved, loaded = [], []

    def save():
        saved.append(1)
        return (b"artifacts", None)

    def load(data):
        loaded.append(data)
        if data != b"artifacts":
            raise RuntimeError("not a cache")
        return object()

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    monkeypatch.setattr(compiled_module._ArtifactFile, "_loaded", set())
    folder = tmp_path / "mine"
    pipe = tp.sd()
    ddim_fast.optimize(pipe, compile=DYNAMO, compile_cache=folder)
    compiled = optimized_state(pipe).compiled["unet"]
    assert not compiled.cache_loaded and not loaded
    _run(pipe, steps=2)
    files = sorted(folder.iterdir())
    assert [f.name.startswith("UNet2DConditionModel-") and f.suffix == ".bin" for f in files] == [True]
    assert files[0].read_bytes() == b"artifacts" and len(saved) == 1, "saved once, after the first call"
    ddim_fast.restore(pipe)

    # The next optimize of the same configuration loads it (before compiling); other options give another file.
    ddim_fast.optimize(pipe, compile=DYNAMO, compile_cache=folder)
    assert optimized_state(pipe).compiled["unet"].cache_loaded and loaded == [b"artifacts"]
    ddim_fast.restore(pipe)
    ddim_fast.optimize(pipe, compile=DYNAMO, compile_cache=folder, fuse_qkv=True)
    assert len(loaded) == 1
    ddim_fast.restore(pipe)

    # A file that cannot be loaded: one INFO line, compiled from scratch, no error.
    monkeypatch.setattr(compiled_module._ArtifactFile, "_loaded", set())
    files[0].write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="ddim_fast.compiled"):
        ddim_fast.optimize(pipe, compile=DYNAMO, compile_cache=folder)
    assert not optimized_state(pipe).compiled["unet"].cache_loaded
    assert "not loaded (RuntimeError: not a cache)" in caplog.text
    _run(pipe, steps=2)
    ddim_fast.restore(pipe)

    # compile_cache=False: no file at all; the default folder is DDIM_FAST_CACHE_DIR's.
    assert compiled_module.cache_dir() == tmp_path / "cache" / "compile"
    # ... and set empty it means nothing on disk, as for the attention choices (one folder rule for both)
    monkeypatch.setenv("DDIM_FAST_CACHE_DIR", "")
    assert compiled_module.cache_dir() is None
    ddim_fast.optimize(pipe, compile=DYNAMO)
    assert optimized_state(pipe).compiled["unet"]._artifacts is None
    ddim_fast.restore(pipe)
