"""Host time outside the graph replays (pytest-benchmark, CPU): what a pipeline's step costs the host besides the
UNet's own kernels, and what ``GraphedForward`` adds per UNet call. On the GPU this time overlaps with the
previous replay until it exceeds it; here it is measured alone, with the UNet's body replaced by a stub.

Groups:

* ``host cpu GraphedForward per call, SD1.5 module tree``: SD1.5's UNet built on the meta device (709 modules,
  686 parameters; no weights allocated), its forward body a stub that returns the sample. Entries: the stub
  called directly (baseline), ``ModuleWatch.changed()`` (the per-call check), ``ModuleWatch`` walk (a full walk
  of the tree: what the per-call fingerprint walk cost before the watch), and a whole ``GraphedForward`` call
  on the static-buffer path (bind, check, key, copy-in, "replay" = the stub, copy-out).
* ``host cpu pipeline step, tiny SD, stub UNet``: a StableDiffusionPipeline (CFG 7.5, 20 steps, 1x4x64x64
  latents, output_type="latent") whose UNet forward is a stub returning a fixed noise prediction: the pipeline's
  own Python, the scheduler step and the guidance math per step; plain, ``optimize(pipe)`` (CPU defaults: the
  fused scheduler; the graph wrapper passes through) and ``optimize(pipe, cuda_graph=True)`` (the static-buffer
  path on every UNet call, what a CUDA run does around its replays).

    pytest benchmarks/bench_graph_host.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import ddim_fast  # noqa: F401
from conftest import IN_CI, StepTimer, record_result, run_benchmark  # noqa: F401

diffusers = pytest.importorskip("diffusers")

from ddim_fast.module_graph import GraphedForward, ModuleWatch  # noqa: E402
from ddim_fast.tools.problems import SD15_UNET_CONFIG, SD_SCHEDULER_CONFIG  # noqa: E402

TREE_GROUP = "host cpu GraphedForward per call, SD1.5 module tree"
PIPE_GROUP = "host cpu pipeline call, 20 steps, tiny SD 1x4x64x64 cfg7.5, stub UNet"
CALLS = 20 if IN_CI else 100


@pytest.fixture(scope="module")
def sd15_tree():
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_UNET_CONFIG)
    return unet.eval()


def _stub_output(sample):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _tree_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 64, 64, generator=gen), torch.randn(2, 77, 768, generator=gen)


@pytest.mark.parametrize("entry", ["stub called directly", "ModuleWatch.changed()", "ModuleWatch walk",
                                   "GraphedForward call (static path)"])
def test_graphed_forward_host(benchmark, sd15_tree, entry):
    unet = sd15_tree
    x, cond = _tree_inputs()
    t = torch.tensor(500)
    if entry == "stub called directly":
        def call():
            return _stub_output(x)
    elif entry == "ModuleWatch.changed()":
        watch = ModuleWatch(unet)
        call = watch.changed
    elif entry == "ModuleWatch walk":
        watch = ModuleWatch(unet)
        call = watch._walk
    else:
        graphed = GraphedForward(unet, off_cuda="static", forward=lambda sample, *a, **k: _stub_output(sample))
        graphed.install()
        request_cleanup = graphed.uninstall

        def call():
            return unet(x, t, encoder_hidden_states=cond)
    try:
        with torch.no_grad():
            timer = StepTimer(call, "cpu", CALLS)
            run_benchmark(benchmark, timer, group=TREE_GROUP, name=entry, bytes_moved=0,
                          baseline=entry == "stub called directly", unit="us/call",
                          scale_only=entry == "ModuleWatch walk")
        if entry == "GraphedForward call (static path)":
            assert graphed.cache.misses == 1 and graphed.cache.hits > 0 and graphed.invalidations == 0
            benchmark.extra_info["watch_walks"] = graphed.watch.walks
        if entry.startswith("ModuleWatch"):
            benchmark.extra_info["modules"] = len(watch._modules)
            benchmark.extra_info["tensors"] = len(watch._tensors)
    finally:
        if entry == "GraphedForward call (static path)":
            request_cleanup()


@pytest.fixture(scope="module")
def stub_pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**tiny).eval()
        vae = diffusers.AutoencoderKL(block_out_channels=(32,) * 4, latent_channels=4, norm_num_groups=8,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    # The stub: the class forward replaced for this module only (GraphedForward wraps whatever forward it finds).
    unet.forward = lambda sample, timestep, encoder_hidden_states=None, **kwargs: _stub_output(noise.clone())
    yield pipe
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["plain", "optimize", "optimize(cuda_graph=True)"])
def test_pipeline_step_host(benchmark, stub_pipe, variant):
    pipe = stub_pipe
    gen = torch.Generator().manual_seed(1)
    embeds = {k: torch.randn(1, 8, 32, generator=gen) for k in ("prompt_embeds", "negative_prompt_embeds")}
    steps = 20

    def run():
        with torch.no_grad():
            return pipe(**embeds, height=512, width=512, num_inference_steps=steps, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images

    if variant != "plain":
        ddim_fast.optimize(pipe, **({"cuda_graph": True} if "cuda_graph" in variant else {}))
    try:
        timer = StepTimer(run, "cpu", 1)
        seconds = run_benchmark(benchmark, timer, group=PIPE_GROUP, name=variant, bytes_moved=0,
                                baseline=variant == "plain", unit="ms/call", rounds=5 if IN_CI else 15)
        state = ddim_fast.optimized_state(pipe)
        if state is not None:
            graphed = state.graphed["unet"]
            expect_static = "cuda_graph" in variant
            assert (graphed.cache.hits > 0) == expect_static and (graphed.eager_calls > 0) != expect_static
        benchmark.extra_info["us_per_pipeline_step"] = seconds / steps * 1e6
    finally:
        ddim_fast.restore(pipe)
