"""A real diffusers StableDiffusionPipeline, built from tiny components (no downloads), gives the same
images with FastDDIMScheduler as with DDIMScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLER_RTOL, assert_rel_close, requires_cuda

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from ddim_fast.scheduler import FastDDIMScheduler  # noqa: E402

# Stable Diffusion's scheduler config (what SD checkpoints ship).
SD_SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000,
    ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)
    return pipe, embeds


def _run(pipe, embeds, output_type, **kwargs):
    prompt_embeds, negative_prompt_embeds = embeds
    with torch.no_grad():
        out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, height=32, width=32,
                   num_inference_steps=kwargs.pop("num_inference_steps", 4), guidance_scale=7.5,
                   generator=kwargs.pop("generator", torch.Generator().manual_seed(42)), output_type=output_type,
                   **kwargs)
    return out.images


@pytest.mark.parametrize("extra_config,call_kwargs,output_types", [
    ({}, {}, ("latent", "np")),
    ({}, {"eta": 0.7}, ("latent",)),  # the scheduler draws its noise from the pipeline's generator, as diffusers does
    ({"timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
     {"num_inference_steps": 3}, ("latent",)),
])
def test_pipeline_same_images(tiny_pipe, extra_config, call_kwargs, output_types):
    pipe, embeds = tiny_pipe
    upstream = DDIMScheduler.from_config(DDIMScheduler(**SD_SCHEDULER_CONFIG).config, **extra_config)
    results = {}
    for name, scheduler in (("diffusers", upstream), ("fast", FastDDIMScheduler.from_config(upstream.config))):
        pipe.scheduler = scheduler
        results[name] = {kind: _run(pipe, embeds, kind, **call_kwargs) for kind in output_types}
    assert isinstance(pipe.scheduler, FastDDIMScheduler)
    ref, fast = results["diffusers"], results["fast"]
    assert fast["latent"].shape == ref["latent"].shape == (1, 4, 16, 16)
    assert_rel_close(fast["latent"], ref["latent"], SAMPLER_RTOL, f"latents {extra_config} {call_kwargs}")
    if "np" in output_types:
        assert fast["np"].shape == ref["np"].shape == (1, 32, 32, 3)
        assert np.abs(fast["np"] - ref["np"]).max() < 1e-4, f"images differ: {np.abs(fast['np'] - ref['np']).max()}"
    if call_kwargs.get("eta"):
        # Another generator seed changes the noise the scheduler draws, so the comparison is not vacuous.
        other = _run(pipe, embeds, "latent", **call_kwargs, generator=torch.Generator().manual_seed(43))
        assert (other - fast["latent"]).abs().max() > 1e-3


# ---- the graphed loop helper (eager on CPU, one CUDA graph per step on GPU) -----------------------------


def _diffusers_loop(unet, latents, cond, guidance_scale, eta, seed, config):
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(4, device=latents.device)
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=cond, return_dict=False)[0]
            uncond, text = out.chunk(2)
            x = scheduler.step(uncond + guidance_scale * (text - uncond), t, x, eta, generator=generator).prev_sample
    return x


def _graphed_vs_diffusers(unet, device, use_graph):
    from ddim_fast.scheduler import graphed_denoise_loop

    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 16, 16, generator=gen).to(device)
    cond = torch.randn(2, 7, 32, generator=gen).to(device)
    for config, eta in ((SD_SCHEDULER_CONFIG, 0.0),
                        (dict(SD_SCHEDULER_CONFIG, prediction_type="v_prediction", clip_sample=True), 0.6)):
        fast = FastDDIMScheduler(**config)
        fast.set_timesteps(4, device=device)
        expected = _diffusers_loop(unet, latents, cond, 7.5, eta, 3, config)
        for _ in range(2):  # the second call reuses the cached runner
            got = graphed_denoise_loop(fast, unet, latents, cond, guidance_scale=7.5, eta=eta,
                                       generator=torch.Generator(device=device).manual_seed(3), use_graph=use_graph)
            assert_rel_close(got, expected, SAMPLER_RTOL, f"graphed loop {config} eta={eta}")
        assert fast._graph_runner.hits == 1 and fast._graph_runner.misses == 1
        runner = fast._graph_runner.get(fast._graph_runner.keys()[0])
        assert runner.captured == (use_graph and device.type == "cuda")
        assert int(runner.static_inputs["step"]) == 4


def test_graphed_loop_eager_on_cpu(tiny_pipe):
    pipe, _ = tiny_pipe
    _graphed_vs_diffusers(pipe.unet, torch.device("cpu"), use_graph=True)
    fast = FastDDIMScheduler(**SD_SCHEDULER_CONFIG)
    fast.set_timesteps(4)
    with pytest.raises(ValueError, match="batch"):
        fast.graph_step(pipe.unet, torch.zeros(2, 4, 16, 16), torch.zeros(2, 7, 32), guidance_scale=7.5)
    with pytest.raises(ValueError, match="set_timesteps"):
        FastDDIMScheduler().graph_step(pipe.unet, torch.zeros(1, 4, 16, 16), torch.zeros(1, 7, 32))


@requires_cuda
def test_graphed_loop_captured_on_cuda(tiny_pipe):
    pipe, _ = tiny_pipe
    unet = pipe.unet.to("cuda")
    try:
        _graphed_vs_diffusers(unet, torch.device("cuda"), use_graph=True)
    finally:
        pipe.unet.to("cpu")
