"""``ddim_fast.optimize(pipe)`` / ``restore(pipe)`` on diffusers' own pipelines (tiny random-weight components,
CPU, same seed with and without), and the graphed forward (``ddim_fast.module_graph.GraphedForward``) that it
puts on the UNet: keys, recapture on structure changes, copy-out, eager fallback. CUDA-graph tests at the end
skip without a GPU.

Each pipeline is run five ways (the runs are cached per module, every test below reads them):
  base        diffusers as it is (DDIMScheduler, AttnProcessor2_0, eager UNet)
  sched       optimize(pipe, attention=False, cuda_graph=False)       must equal base bit for bit
  attn        optimize(pipe, cuda_graph=False)                        within 1e-5 relative of base
  full        optimize(pipe)  (the graph path; eager static buffers on CPU)   equal to attn bit for bit
  graph_only  optimize(pipe, scheduler=False, attention=False)        equal to base bit for bit
and once more after restore(pipe), which must equal base again.

Pipelines fed PIL images (img2img, SDXL img2img, DiffEdit) run on channels_last latents
(``VaeImageProcessor.preprocess``): their ``sched``/``attn`` exactness and their one-graph-per-run count need
the fused step to keep the input's memory format (see docs/design.md, "Outputs keep the input's memory format").
"""

from __future__ import annotations

import functools
import inspect
import logging

import pytest
import torch

from conftest import SAMPLER_RTOL, assert_rel_close, requires_cuda

diffusers = pytest.importorskip("diffusers")

import tiny_pipelines as tp  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

import ddim_fast  # noqa: E402
from ddim_fast import graphs  # noqa: E402
from ddim_fast.module_graph import GraphedForward  # noqa: E402
from ddim_fast.pipeline import optimized_state  # noqa: E402
from ddim_fast.scheduler import FastDDIMInverseScheduler, FastDDIMScheduler  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads make a tiny UNet call 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The pipelines: (builder, call) where call(pipe, generator) returns one tensor holding everything compared
# (final latents, and per-step latents where a callback records them).
STEPS = 3


def _gen(seed: int = 0):
    return torch.Generator().manual_seed(seed)


def _with_step_latents(pipe_call):
    """Runs pipe_call(callback_on_step_end=...) and returns cat(per-step latents, final output), flattened."""
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    final = pipe_call(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
    assert len(seen) >= 2, "the callback did not run every step"
    return torch.cat([t.flatten() for t in seen] + [final.flatten()])


def _call_sd(pipe, generator, **kwargs):
    embeds = tp.prompt_embeds()
    return _with_step_latents(lambda **cb: pipe(**embeds, height=32, width=32, num_inference_steps=STEPS,
                                                guidance_scale=7.5, generator=generator, output_type="latent",
                                                **kwargs, **cb).images)


def _call_sd_eta1_list_generators(pipe, generator):
    # eta = 1 draws the step noise from the pipeline's generators: one per image here (num_images_per_prompt=2).
    embeds = tp.prompt_embeds()
    generators = [generator, torch.Generator().manual_seed(99)]
    return pipe(**embeds, height=32, width=32, num_inference_steps=STEPS, guidance_scale=7.5, eta=1.0,
                num_images_per_prompt=2, generator=generators, output_type="latent").images


def _call_sd_np(pipe, generator):
    embeds = tp.prompt_embeds()
    image = pipe(**embeds, height=32, width=32, num_inference_steps=STEPS, guidance_scale=7.5, generator=generator,
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    return torch.from_numpy(image)


def _call_sd_zero_snr(pipe, generator):
    return _call_sd(pipe, generator, guidance_rescale=0.7)


def _call_img2img(pipe, generator):
    embeds = tp.prompt_embeds()
    return _with_step_latents(lambda **cb: pipe(**embeds, image=tp.pil_image(), strength=0.75,
                                                num_inference_steps=STEPS + 1, guidance_scale=7.5, generator=generator,
                                                output_type="latent", **cb).images)


def _call_inpaint(pipe, generator):
    embeds = tp.prompt_embeds()
    return pipe(**embeds, image=tp.pil_image(), mask_image=tp.pil_image(5, channels=1), height=32, width=32,
                num_inference_steps=STEPS, guidance_scale=7.5, generator=generator, output_type="latent").images


def _call_sdxl(pipe, generator):
    embeds = tp.prompt_embeds(pooled=True)
    return _with_step_latents(lambda **cb: pipe(**embeds, height=32, width=32, num_inference_steps=STEPS,
                                                guidance_scale=5.0, generator=generator, output_type="latent",
                                                **cb).images)


def _call_sdxl_img2img(pipe, generator):
    embeds = tp.prompt_embeds(pooled=True)
    return pipe(**embeds, image=tp.pil_image(), strength=0.75, num_inference_steps=STEPS + 1, guidance_scale=5.0,
                generator=generator, output_type="latent").images


def _call_controlnet(pipe, generator):
    embeds = tp.prompt_embeds()
    return pipe(**embeds, image=tp.pil_image(6), height=32, width=32, num_inference_steps=STEPS, guidance_scale=7.5,
                controlnet_conditioning_scale=0.8, generator=generator, output_type="latent").images


def _call_diffedit(pipe, generator):
    # DiffEdit: DDIM inversion with pipe.inverse_scheduler, then the masked edit from the inverted latents.
    embeds = tp.prompt_embeds()
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    inverted = pipe.invert(image=tp.pil_image(), num_inference_steps=STEPS + 1, inpaint_strength=0.8,
                           generator=generator, output_type="latent", **embeds).latents
    edited = pipe(mask_image=mask, image_latents=inverted, num_inference_steps=STEPS + 1, inpaint_strength=0.8,
                  generator=generator, output_type="latent", **embeds).images
    return torch.cat([inverted.flatten(), edited.flatten()])


CASES = {
    "sd": (tp.sd, _call_sd),
    "sd-eta1-generator-list": (tp.sd, _call_sd_eta1_list_generators),
    "sd-output-np": (tp.sd, _call_sd_np),
    "sd-zero-snr-vpred-guidance-rescale": (functools.partial(tp.sd, tp.ZERO_SNR_CONFIG), _call_sd_zero_snr),
    "img2img": (tp.sd_img2img, _call_img2img),
    "inpaint-9ch": (tp.sd_inpaint, _call_inpaint),
    "sdxl": (tp.sdxl, _call_sdxl),
    "sdxl-img2img": (tp.sdxl_img2img, _call_sdxl_img2img),
    "controlnet": (tp.sd_controlnet, _call_controlnet),
    "diffedit-inversion": (tp.sd_diffedit, _call_diffedit),
}
# Pipelines whose latents are channels_last (PIL inputs through VaeImageProcessor.preprocess).
CHANNELS_LAST = {"img2img", "sdxl-img2img", "diffedit-inversion"}
# Runs that amplify rounding beyond the 1e-5 contract whatever the attention kernel: DiffEdit inverts with CFG 7.5
# and edits from the inverted latents; diffusers' own AttnProcessor and AttnProcessor2_0 differ by ~2e-5 there.
# For these the bound is 1.5x that spread of diffusers' own processors (measured in the same test).
ILL_CONDITIONED = {"diffedit-inversion"}

# The model options are spelled out: their "auto" defaults depend on the device (on the CPU, optimize(pipe) swaps
# the scheduler only: the `default` variant).
_OFF = dict(attention=False, cuda_graph=False, channels_last=False, fuse_qkv=False)
# Everything on, whatever the device (what optimize(pipe) does on CUDA; static buffers also on the CPU).
ALL_ON = dict(attention=True, cuda_graph=True, channels_last=True, fuse_qkv=True)
VARIANTS = {
    "default": {},
    "sched": _OFF,
    "attn": dict(_OFF, attention=True),
    "full": dict(_OFF, attention=True, cuda_graph=True),
    "graph_only": dict(_OFF, scheduler=False, cuda_graph=True),
    "body": dict(_OFF, cuda_graph=True, channels_last=True, fuse_qkv=True),
}


@functools.lru_cache(maxsize=None)
def _runs(case: str) -> dict:
    build, call = CASES[case]
    pipe = build()
    torch.manual_seed(0)
    with torch.no_grad():
        out = {"base": call(pipe, _gen())}
        out["pipe"] = pipe
        for name, options in VARIANTS.items():
            strides = {key: t.stride() for key, t in pipe.unet.state_dict(keep_vars=True).items()}
            ddim_fast.optimize(pipe, **options)
            state = optimized_state(pipe)
            out[name] = call(pipe, _gen())
            out[f"{name}_state"] = state
            out[f"{name}_counts"] = {k: (g.cache.misses, g.cache.hits, g.eager_calls, g.invalidations)
                                     for k, g in state.graphed.items()}
            out[f"{name}_qkv_calls"] = sum(g.fused_calls for fused in state.qkv.values() for g in fused.groups.values())
            ddim_fast.restore(pipe)
            out[f"{name}_strides_back"] = all(t.stride() == strides[key]
                                              for key, t in pipe.unet.state_dict(keep_vars=True).items())
        out["restored"] = call(pipe, _gen())
        if case in ILL_CONDITIONED:
            originals = dict(pipe.unet.attn_processors)
            pipe.unet.set_attn_processor(AttnProcessor())
            out["classic_processor"] = call(pipe, _gen())
            pipe.unet.set_attn_processor(originals)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_scheduler_swap_is_bit_identical(case):
    runs = _runs(case)
    state = runs["sched_state"]
    assert state.schedulers, f"{case}: no DDIM scheduler was swapped"
    for original, replacement in state.schedulers.values():
        assert isinstance(replacement, (FastDDIMScheduler, FastDDIMInverseScheduler))
        assert isinstance(replacement, type(original))  # pipelines' isinstance(scheduler, DDIMScheduler) checks
    assert torch.equal(runs["sched"], runs["base"]), (
        f"{case}: FastDDIMScheduler changed the output (max |diff| "
        f"{(runs['sched'] - runs['base']).abs().max():.2e})"
        + (" -- a channels_last pipeline: needs the step to keep the memory format" if case in CHANNELS_LAST else ""))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_attention_within_drop_in_tolerance(case):
    runs = _runs(case)
    state = runs["attn_state"]
    assert state.fused_attention_count > 0
    assert all(not fused.unserved for fused in state.attention.values()), "every SD attention module is servable"
    # 'auto' (ddim_fast.backends): on the CPU the processors run SDPA, the kernel diffusers runs, so the bits match;
    # our kernel inside a pipeline: tests/test_attention_patchers.py::test_fused_backend_in_an_sd_pipeline.
    assert torch.equal(runs["attn"], runs["sched"]), f"{case}: the CPU attention processors did not run SDPA"
    tolerance = SAMPLER_RTOL
    if case in ILL_CONDITIONED:
        spread = ddim_fast.reference.relative_error(runs["classic_processor"], runs["base"])
        assert spread > SAMPLER_RTOL, f"{case}: diffusers' own processors agree to {spread:.1e}; drop the exception"
        tolerance = 1.5 * spread
    assert_rel_close(runs["attn"], runs["base"], tolerance, f"{case}: optimize(cuda_graph=False) vs diffusers")


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_path_equals_eager(case):
    runs = _runs(case)
    assert torch.equal(runs["full"], runs["attn"]), f"{case}: the graph path changed the output of optimize()"
    assert torch.equal(runs["graph_only"], runs["base"]), f"{case}: the graph path changed diffusers' output"
    for variant in ("full", "graph_only"):
        counts = runs[f"{variant}_counts"]
        assert "unet" in counts and (case != "controlnet" or "controlnet" in counts)
        for name, (misses, hits, eager, invalidations) in counts.items():
            # Every call went through the static buffers (on CPU: EagerStep), none passed through.
            assert eager == 0 and invalidations == 0, f"{case} {variant} {name}: {counts}"
            assert misses >= 1 and hits >= 1, f"{case} {variant} {name}: {counts}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_graph_per_signature(case):
    """The fused pipeline needs no more graphs than diffusers' own loop has call signatures (a step that
    changed the latents' layout would make every step after the first a second signature)."""
    runs = _runs(case)
    reference = {name: counts[0] for name, counts in runs["graph_only_counts"].items()}
    got = {name: counts[0] for name, counts in runs["full_counts"].items()}
    assert got == reference, f"{case}: graphs captured {got}, diffusers' loop has {reference} signatures"


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_defaults_swap_the_scheduler_only(case):
    """On the CPU, optimize(pipe) does only what pays there: the images are diffusers' own, bit for bit; the
    graph wrapper is installed but passes every CPU call straight through (no static-buffer copies)."""
    runs = _runs(case)
    state = runs["default_state"]
    assert torch.equal(runs["default"], runs["base"]), f"{case}: optimize(pipe)'s CPU defaults changed the output"
    assert state.schedulers and not state.attention and not state.qkv and not state.channels_last
    assert all(choice == dict(attention=False, cuda_graph="auto", channels_last=False, fuse_qkv=False,
                              unet_body=False)
               for choice in state.choices.values()), state.choices
    for name, (misses, hits, eager, _) in runs["default_counts"].items():
        assert misses == hits == 0 and eager > 0, f"{case} {name}: {runs['default_counts']}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_channels_last_and_fused_qkv_within_fp32_tolerance(case):
    """Forced on (the CPU default is off): channels_last weights and fused QKV projections through the graph path
    change only the rounding of convolutions and GEMMs; restore gives every weight back its strides."""
    runs = _runs(case)
    state = runs["body_state"]
    assert state.channels_last["unet"] and state.qkv["unet"].count > 0 and not state.qkv["unet"].unserved
    assert runs["body_qkv_calls"] > 0, f"{case}: the fused projections never ran"
    tolerance = SAMPLER_RTOL
    if case in ILL_CONDITIONED:
        tolerance = 1.5 * ddim_fast.reference.relative_error(runs["classic_processor"], runs["base"])
    assert_rel_close(runs["body"], runs["base"], tolerance, f"{case}: channels_last + fused QKV vs diffusers")
    assert runs["body_strides_back"] and runs["full_strides_back"], f"{case}: restore left other strides"
    counts = runs["body_counts"]
    assert all(eager == 0 and invalidations == 0 and misses >= 1 for misses, _, eager, invalidations
               in counts.values()), counts


@pytest.mark.parametrize("case", sorted(CASES))
def test_restore_gives_back_diffusers_output(case):
    runs = _runs(case)
    assert torch.equal(runs["restored"], runs["base"])
    pipe = runs["pipe"]
    assert optimized_state(pipe) is None
    assert "forward" not in pipe.unet.__dict__
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert type(pipe.scheduler) is diffusers.DDIMScheduler


def test_graphed_channels_last_unet_returns_the_samples_layout():
    """channels_last weights make the UNet's prediction channels_last inside the graph; the graph path hands it
    out in the layout of the (contiguous) sample, as the plain UNet does, so that guidance and the fused step see
    one layout. Checked on the static-buffer path (cuda_graph=True on the CPU)."""
    pipe = tp.sd()
    sample = torch.randn(2, 4, 16, 16)
    cond = tp.prompt_embeds()["prompt_embeds"].repeat(2, 1, 1)
    with torch.no_grad():
        plain = pipe.unet(sample, 10, cond).sample
        ddim_fast.optimize(pipe, channels_last=True, cuda_graph=True, attention=False, fuse_qkv=False)
        try:
            out = pipe.unet(sample, 10, cond).sample
            hit = pipe.unet(sample, 10, cond).sample
            assert optimized_state(pipe).graphed["unet"].cache.hits == 1
        finally:
            ddim_fast.restore(pipe)
    assert plain.is_contiguous() and out.is_contiguous() and hit.is_contiguous()
    assert_rel_close(out, plain, SAMPLER_RTOL, "channels_last UNet through the graph path")


def test_unet_body_option_fuses_runs_and_restores():
    """optimize(unet_body=True): the fused GroupNorm(+SiLU) / GEGLU ops run in the UNet (counted at the dispatcher,
    every step), through the graph path too, within the fp32 tolerance of diffusers; the summary names the fused
    modules; restore takes every instance forward away and gives diffusers' output back bit for bit. Off by
    default on both devices ("auto": CUDA only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    pipe = tp.sd()
    with torch.no_grad():
        base = _call_sd(pipe, _gen())
    for cuda_graph in (False, True):
        ddim_fast.optimize(pipe, attention=False, unet_body=True, cuda_graph=cuda_graph)
        state = optimized_state(pipe)
        fused = state.unet_body["unet"]
        assert fused.counts["resnet"] > 0 and fused.counts["geglu"] > 0 and not fused.skipped
        assert "unet body:" in state.summary and "resnet" in state.summary
        with torch.no_grad(), Count() as count:
            out = _call_sd(pipe, _gen())
        assert count.ops.get("ddim_fast::group_norm_silu", 0) >= 2 * fused.counts["resnet"] * STEPS, count.ops
        assert count.ops.get("ddim_fast::geglu", 0) == fused.counts["geglu"] * STEPS, count.ops
        assert_rel_close(out, base, SAMPLER_RTOL, f"unet_body=True, cuda_graph={cuda_graph} vs diffusers")
        ddim_fast.restore(pipe)
        assert not any("forward" in m.__dict__ for m in pipe.unet.modules()), "restore left a fused forward"
        with torch.no_grad():
            assert torch.equal(_call_sd(pipe, _gen()), base)
    ddim_fast.optimize(pipe)
    assert optimized_state(pipe).unet_body == {}, "unet_body must be off by default on the CPU"
    ddim_fast.restore(pipe)
    with pytest.raises(ValueError, match="unet_body must be True, False or 'auto'"):
        ddim_fast.optimize(pipe, unet_body="yes")


def test_eta_run_uses_the_generators():
    """The eta = 1 case would prove nothing if the generators had no effect."""
    pipe = _runs("sd-eta1-generator-list")["pipe"]
    with torch.no_grad():
        other = _call_sd_eta1_list_generators(pipe, _gen(5))
    assert not torch.allclose(other, _runs("sd-eta1-generator-list")["base"])


# --------------------------------------------------------------------------------------------------
# optimize / restore: objects, options, errors
# --------------------------------------------------------------------------------------------------


def test_restore_puts_back_the_very_same_objects():
    pipe = tp.sd()
    scheduler = pipe.scheduler
    config_entry = tuple(pipe.config["scheduler"])
    processors = dict(pipe.unet.attn_processors)
    assert "forward" not in pipe.unet.__dict__
    signature = inspect.signature(pipe.unet.forward)
    params = dict(pipe.unet.named_parameters())
    strides = {name: p.stride() for name, p in params.items()}

    assert ddim_fast.optimize(pipe, **ALL_ON) is pipe
    state = optimized_state(pipe)
    assert isinstance(pipe.scheduler, FastDDIMScheduler) and pipe.scheduler.config.steps_offset == 1
    assert tuple(pipe.config["scheduler"]) != config_entry
    assert all(isinstance(p, ddim_fast.FusedAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert state.fused_attention_count == len(processors)
    assert set(state.attention["unet"].originals) == {name[: -len(".processor")] for name in processors}
    assert isinstance(pipe.unet.forward, object) and "forward" in pipe.unet.__dict__
    assert inspect.signature(pipe.unet.forward) == signature  # code probing the forward's parameters sees no change
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipe.unet.conv_in.weight.is_contiguous()
    attn1 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    qkv = (attn1.to_q.weight, attn1.to_k.weight, attn1.to_v.weight)
    assert len({w.untyped_storage().data_ptr() for w in qkv}) == 1, "q/k/v weights share the packed storage"
    # While optimized, diffusers' set_default_attn_processor refuses the fused processor (it accepts only its
    # own classes); set_attn_processor works.
    with pytest.raises(ValueError, match="set_default_attn_processor"):
        pipe.unet.set_default_attn_processor()

    assert ddim_fast.restore(pipe) is pipe
    assert pipe.scheduler is scheduler
    assert tuple(pipe.config["scheduler"]) == config_entry
    restored = pipe.unet.attn_processors
    assert restored.keys() == processors.keys()
    assert all(restored[name] is processors[name] for name in processors)
    assert "forward" not in pipe.unet.__dict__
    # The very same parameters, each with its own storage and the strides it had.
    assert all(p is params[name] and p.stride() == strides[name] for name, p in pipe.unet.named_parameters())
    assert len({w.untyped_storage().data_ptr() for w in qkv}) == 3
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    pipe.unet.set_default_attn_processor()  # works again after restore
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    assert ddim_fast.restore(pipe) is pipe  # restoring a plain pipeline is a no-op


def test_restore_keeps_what_the_user_replaced():
    pipe = tp.sd()
    ddim_fast.optimize(pipe, attention=True)
    mine = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = mine
    pipe.unet.set_attn_processor(AttnProcessor())
    ddim_fast.restore(pipe)
    assert pipe.scheduler is mine
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())


def test_other_schedulers_are_kept_unless_ddim_is_asked_for(caplog):
    pipe = tp.sd()
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = euler
    with caplog.at_level(logging.INFO, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, cuda_graph=False)
    assert pipe.scheduler is euler
    assert "EulerDiscreteScheduler is not a DDIM scheduler" in optimized_state(pipe).kept_schedulers["scheduler"]
    assert "scheduler kept (EulerDiscreteScheduler is not a DDIM scheduler" in caplog.text
    ddim_fast.restore(pipe)

    ddim_fast.optimize(pipe, scheduler="ddim", attention=False, cuda_graph=False)
    assert type(pipe.scheduler) is FastDDIMScheduler
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    ddim_fast.restore(pipe)
    assert pipe.scheduler is euler


def test_optimize_rejects_bad_arguments():
    pipe = tp.sd()
    with pytest.raises(TypeError, match="pipe must be a diffusers DiffusionPipeline"):
        ddim_fast.optimize(pipe.unet)
    with pytest.raises(ValueError, match="scheduler must be True, False or 'ddim'"):
        ddim_fast.optimize(pipe, scheduler="euler")
    with pytest.raises(ValueError, match="scheduler must be True, False or 'ddim'"):
        ddim_fast.optimize(pipe, scheduler=1)
    for name in ("attention", "cuda_graph", "channels_last", "fuse_qkv"):
        with pytest.raises(ValueError, match=f"{name} must be True, False or 'auto'"):
            ddim_fast.optimize(pipe, **{name: "yes"})
        with pytest.raises(ValueError, match=f"{name} must be True, False or 'auto'"):
            ddim_fast.optimize(pipe, **{name: None})
    with pytest.raises(ValueError, match="compile must be True, False, one of"):
        ddim_fast.optimize(pipe, compile="fast")
    with pytest.raises(TypeError, match="compile must be True, False, a mode string or a dict"):
        ddim_fast.optimize(pipe, compile=3)
    with pytest.raises(ValueError, match="compile dict takes"):
        ddim_fast.optimize(pipe, compile={"modes": "default"})
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        ddim_fast.optimize(pipe, compile="reduce-overhead")
    with pytest.raises(TypeError, match="compile_cache must be True, False or a folder"):
        ddim_fast.optimize(pipe, compile=True, compile_cache=1)
    assert optimized_state(pipe) is None and type(pipe.scheduler) is diffusers.DDIMScheduler
    ddim_fast.optimize(pipe)
    with pytest.raises(ValueError, match="optimized already; call ddim_fast.restore"):
        ddim_fast.optimize(pipe)
    ddim_fast.restore(pipe)


class _CustomProcessor(AttnProcessor2_0):
    """A user's processor: a subclass, so not one the fused kernels may assume they reproduce."""


class _PipelineOwnProcessor:
    """A pipeline's own processor class (pix2pix-zero's cross-attention processor is one): not diffusers'."""

    def __init__(self):
        self.inner = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


def _warnings(caplog, logger="ddim_fast.pipeline"):
    return [r for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


@pytest.mark.parametrize("processor, reason", [
    (_CustomProcessor, "_CustomProcessor: a subclass of AttnProcessor2_0 whose own code would be skipped"),
    (_PipelineOwnProcessor, "_PipelineOwnProcessor: a processor the fused kernels do not reproduce"),
])
def test_nothing_fusable_still_optimizes_the_rest(caplog, processor, reason):
    """Every processor the pipeline's own or a user's subclass: attention=True keeps them (the fused kernels would
    skip their code), says so in one warning line naming the modules and why, and still swaps the scheduler and
    graphs the UNet."""
    pipe = tp.sd()
    pipe.unet.set_attn_processor(processor())
    processors = dict(pipe.unet.attn_processors)
    base = _call_sd(pipe, _gen())
    with caplog.at_level(logging.INFO, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, attention=True, cuda_graph=True)
    state = optimized_state(pipe)
    assert type(pipe.scheduler) is FastDDIMScheduler and "unet" in state.graphed
    assert state.fused_attention_count == 0
    assert all(pipe.unet.attn_processors[name] is processors[name] for name in processors)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert message == f"ddim_fast.optimize(StableDiffusionPipeline): {state.summary}"
    assert (f"unet attention: 0 of {len(processors)} modules fused, {len(processors)} keep their processors "
            f"({reason}: {len(processors)} modules (down_blocks.1.attentions.0.transformer_blocks.0.attn1, ...))"
            in state.summary)
    assert "scheduler: DDIMScheduler -> FastDDIMScheduler" in state.summary
    with torch.no_grad():
        out = _call_sd(pipe, _gen())
    assert torch.equal(out, base), "scheduler swap and graphs alone must keep the output bit for bit"
    ddim_fast.restore(pipe)
    assert type(pipe.scheduler) is diffusers.DDIMScheduler and "forward" not in pipe.unet.__dict__


def test_unserved_modules_are_listed_in_one_warning(caplog):
    pipe = tp.sd()
    processors = pipe.unet.attn_processors
    names = sorted(processors)
    custom = {name: (_CustomProcessor() if i % 2 else processors[name]) for i, name in enumerate(names)}
    pipe.unet.set_attn_processor(dict(custom))  # diffusers pops the entries of the dict it is given
    with caplog.at_level(logging.WARNING, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, attention=True, cuda_graph=False)
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert (f"unet attention: {len(names) - len(names) // 2} of {len(names)} modules fused, {len(names) // 2} keep "
            "their processors" in message)
    assert "_CustomProcessor: a subclass of AttnProcessor2_0 whose own code would be skipped" in message
    state = optimized_state(pipe)
    assert state.fused_attention_count == len(names) - len(names) // 2
    kept = pipe.unet.attn_processors
    assert all(kept[name] is custom[name] for name in names[1::2])
    ddim_fast.restore(pipe)
    assert all(pipe.unet.attn_processors[name] is custom[name] for name in names)


def test_a_failed_optimize_leaves_the_pipeline_as_it_was(monkeypatch):
    pipe = tp.sd_controlnet()
    scheduler, processors = pipe.scheduler, dict(pipe.unet.attn_processors)

    class Failing(GraphedForward):
        def install(self):
            if isinstance(self.module, diffusers.ControlNetModel):  # the unet is already graphed by then
                raise RuntimeError("install failed")
            return super().install()

    monkeypatch.setattr(ddim_fast.pipeline, "GraphedForward", Failing)
    with pytest.raises(RuntimeError, match="install failed"):
        ddim_fast.optimize(pipe)
    assert optimized_state(pipe) is None and pipe.scheduler is scheduler
    assert "forward" not in pipe.unet.__dict__ and "forward" not in pipe.controlnet.__dict__
    assert all(pipe.unet.attn_processors[name] is processors[name] for name in processors)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.controlnet.attn_processors.values())


def test_pipeline_without_unet_needs_scheduler_only():
    pipe = tp.sd()
    unet = pipe.unet
    pipe.register_modules(unet=None)
    with pytest.raises(ValueError, match="has no `unet`"):
        ddim_fast.optimize(pipe)
    ddim_fast.optimize(pipe, attention=False, cuda_graph=False, channels_last=False, fuse_qkv=False)
    assert type(pipe.scheduler) is FastDDIMScheduler
    ddim_fast.restore(pipe)
    pipe.register_modules(unet=unet)


def test_fused_schedulers_expose_what_pipelines_read():
    """Pipelines read these off the scheduler (issue 12): each as diffusers has it."""
    for config in (tp.SD_SCHEDULER_CONFIG, tp.ZERO_SNR_CONFIG):
        upstream, fast = diffusers.DDIMScheduler(**config), None
        fast = FastDDIMScheduler.from_config(upstream.config)
        for s in (upstream, fast):
            s.set_timesteps(7)
        for name in ("init_noise_sigma", "order", "num_inference_steps"):
            assert getattr(fast, name) == getattr(upstream, name) and type(getattr(fast, name)) is type(
                getattr(upstream, name)), name
        for name in ("alphas_cumprod", "final_alpha_cumprod", "timesteps", "betas", "alphas"):
            a, b = getattr(fast, name), getattr(upstream, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert hasattr(fast, "set_begin_index") == hasattr(upstream, "set_begin_index")
        x = torch.randn(2, 4, 8, 8)
        assert fast.scale_model_input(x, 981) is x and upstream.scale_model_input(x, 981) is x
        noise, t = torch.randn(2, 4, 8, 8), torch.tensor([801, 1])
        assert torch.equal(fast.add_noise(x, noise, t), upstream.add_noise(x, noise, t))
        for pair in ((801, 658), (1, -142)):
            assert torch.equal(fast._get_variance(*pair), upstream._get_variance(*pair)), pair
        ours = {k: v for k, v in fast.config.items() if k not in ("timestep_pairing", "_use_default_values")}
        theirs = {k: v for k, v in upstream.config.items() if k != "_use_default_values"}
        assert ours == theirs
    upstream = diffusers.DDIMInverseScheduler(**tp.SD_SCHEDULER_CONFIG)
    fast = FastDDIMInverseScheduler.from_config(upstream.config)
    for s in (upstream, fast):
        s.set_timesteps(7)
    assert torch.equal(fast.timesteps, upstream.timesteps) and fast.timesteps.dtype == upstream.timesteps.dtype
    assert torch.equal(fast.alphas_cumprod, upstream.alphas_cumprod)
    assert torch.equal(fast.initial_alpha_cumprod, upstream.initial_alpha_cumprod)
    assert (fast.init_noise_sigma, fast.order, fast.num_inference_steps) == (
        upstream.init_noise_sigma, upstream.order, upstream.num_inference_steps)


def test_optimize_raises_no_warning():
    """Issue 21: reading every config key as a pipeline attribute made diffusers warn (FutureWarning: Accessing
    config attribute 'requires_safety_checker' directly ...). Any warning is an error here; a complete optimize
    (SD: every module fused) is quiet, and so is restore."""
    import warnings

    pipe = tp.sd()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddim_fast.optimize(pipe)
        ddim_fast.restore(pipe)
        ddim_fast.optimize(pipe, scheduler=False, attention=False, cuda_graph=False)
        ddim_fast.restore(pipe)


def test_summary_is_returned_and_shown_when_something_is_left_out(caplog):
    """The one-line summary is on the state; it is a warning (seen with no logging setup) when something the
    user asked for was left out or with verbose=True, and INFO otherwise."""
    pipe = tp.sd()
    with caplog.at_level(logging.INFO, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, attention=True, cuda_graph=False)
    state = optimized_state(pipe)
    n = len(pipe.unet.attn_processors)
    assert state.summary == (f"scheduler: DDIMScheduler -> FastDDIMScheduler; unet attention: {n} of {n} modules "
                             "fused")
    assert not state.left_out and not _warnings(caplog)
    assert [r.getMessage() for r in caplog.records if r.name == "ddim_fast.pipeline"] == [
        f"ddim_fast.optimize(StableDiffusionPipeline): {state.summary}"]
    ddim_fast.restore(pipe)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, verbose=True)
    assert [r.getMessage() for r in _warnings(caplog)] == [
        f"ddim_fast.optimize(StableDiffusionPipeline): {optimized_state(pipe).summary}"]
    assert optimized_state(pipe).summary == ("scheduler: DDIMScheduler -> FastDDIMScheduler; CUDA graphs (calls on "
                                             "CUDA): unet")
    ddim_fast.restore(pipe)
    ddim_fast.optimize(pipe, **ALL_ON)
    assert optimized_state(pipe).summary == (
        f"scheduler: DDIMScheduler -> FastDDIMScheduler; unet attention: {n} of {n} modules fused; unet QKV "
        f"projections: {n} of {n} attention modules fused; unet weights channels_last "
        f"({len(optimized_state(pipe).channels_last['unet'])} tensors); CUDA graphs (calls on CUDA; eager static "
        "buffers off CUDA for unet): unet")
    ddim_fast.restore(pipe)

    # An Euler scheduler is kept: the user must learn that the step they wanted fused is not.
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    assert optimized_state(pipe).left_out
    assert [r.getMessage() for r in _warnings(caplog)] == [
        "ddim_fast.optimize(StableDiffusionPipeline): scheduler kept (EulerDiscreteScheduler is not a DDIM scheduler "
        "(scheduler='ddim' switches it to FastDDIMScheduler from its config))"]
    ddim_fast.restore(pipe)
    with pytest.raises(TypeError, match="verbose must be True or False"):
        ddim_fast.optimize(pipe, verbose="yes")


def test_summary_warning_reaches_stderr_without_logging_setup():
    """What a user running a script sees: nothing configured, the left-out summary on stderr (Python's last-resort
    handler), a complete optimize silent."""
    import subprocess
    import sys

    code = (
        "import sys, logging; sys.path.insert(0, 'tests'); import tiny_pipelines as tp, ddim_fast, diffusers\n"
        "pipe = tp.sd()\n"
        "ddim_fast.optimize(pipe, cuda_graph=False); ddim_fast.restore(pipe)\n"
        "print('--- complete ---', file=sys.stderr)\n"
        "pipe.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())\n"
        "pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)\n"
        "ddim_fast.optimize(pipe, cuda_graph=False)\n")
    root = __file__.rsplit("/tests/", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "ddim_fast" in line or "---" in line]
    assert ours[0] == "--- complete ---", ours
    assert len(ours) == 2 and ours[1].startswith("ddim_fast.optimize(StableDiffusionPipeline): scheduler kept "
                                                 "(EulerDiscreteScheduler is not a DDIM scheduler"), ours


# --------------------------------------------------------------------------------------------------
# Scheduler state: what a pipeline set on its scheduler before optimize() survives the swap (and restore)
# --------------------------------------------------------------------------------------------------


def _step_all(scheduler, seed: int = 0, eta: float = 0.0):
    """Steps a fixed latent through scheduler.timesteps with fixed model outputs (and variance noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    outs = []
    for t in scheduler.timesteps:
        eps = torch.randn(1, 4, 8, 8, generator=gen)
        noise = torch.randn(1, 4, 8, 8, generator=gen)
        step = scheduler.step if eta == 0 else functools.partial(scheduler.step, eta=eta, variance_noise=noise)
        x = step(eps, t, x).prev_sample
        outs.append(x)
    return torch.stack(outs)


@pytest.mark.parametrize("inverse", [False, True])
def test_swap_carries_the_schedule_over(inverse):
    """set_timesteps on the original, then optimize, then steps (the essential sequence of LEDITS++'s invert then
    edit): the fused scheduler takes the schedule, and steps as the original does, bit for bit."""
    pipe = tp.sd_diffedit()
    name = "inverse_scheduler" if inverse else "scheduler"
    original = getattr(pipe, name)
    original.set_timesteps(34)
    reference = diffusers.DDIMInverseScheduler.from_config(original.config) if inverse else \
        diffusers.DDIMScheduler.from_config(original.config)
    reference.set_timesteps(34)
    ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    fused = getattr(pipe, name)
    assert type(fused) is (FastDDIMInverseScheduler if inverse else FastDDIMScheduler)
    assert fused.num_inference_steps == 34
    assert torch.equal(fused.timesteps, original.timesteps) and fused.timesteps is not original.timesteps
    assert torch.equal(_step_all(fused), _step_all(reference))
    if not inverse:
        assert torch.equal(_step_all(fused, eta=1.0), _step_all(reference, eta=1.0))
    ddim_fast.restore(pipe)


def test_swap_carries_config_overrides_timesteps_and_added_attributes():
    pipe = tp.sd()
    original = pipe.scheduler
    # LEDITS++ style: a config value overridden by attribute (diffusers' FrozenDict takes it; the item stays).
    original.config.timestep_spacing = "trailing"
    original.set_timesteps(7)
    original.timesteps = original.timesteps.flip(0)[1:].flip(0).clone()  # a hand-made schedule: 6 of the 7
    original.my_tag = "kept"
    ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    fused = pipe.scheduler
    assert fused.config.timestep_spacing == "trailing" and fused.config["timestep_spacing"] == "trailing"
    assert fused.num_inference_steps == 7 and torch.equal(fused.timesteps, original.timesteps)
    assert fused.my_tag == "kept"
    reference = diffusers.DDIMScheduler(**dict(tp.SD_SCHEDULER_CONFIG, timestep_spacing="trailing"))
    reference.set_timesteps(7)
    reference.timesteps = original.timesteps.clone()
    assert torch.equal(_step_all(fused), _step_all(reference))
    ddim_fast.restore(pipe)


def test_restore_gives_the_original_the_state_the_pipeline_left():
    """Decision: restore puts the original object back with the fused one's newer state (the last schedule,
    attributes added since, config overrides), so the pipeline goes on as if it had never been optimized."""
    pipe = tp.sd()
    original = pipe.scheduler
    original.set_timesteps(5)
    ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    pipe.scheduler.config.timestep_spacing = "trailing"
    pipe.scheduler.set_timesteps(12)
    pipe.scheduler.added_later = 3
    ddim_fast.restore(pipe)
    assert pipe.scheduler is original
    assert original.num_inference_steps == 12 and original.config.timestep_spacing == "trailing"
    plain = diffusers.DDIMScheduler(**dict(tp.SD_SCHEDULER_CONFIG, timestep_spacing="trailing"))
    plain.set_timesteps(12)
    assert torch.equal(original.timesteps, plain.timesteps) and original.added_later == 3
    assert torch.equal(_step_all(original), _step_all(plain))


def test_scheduler_with_edited_alphas_is_kept(caplog):
    pipe = tp.sd()
    original = pipe.scheduler
    original.alphas_cumprod = original.alphas_cumprod * 0.999
    with caplog.at_level(logging.WARNING, logger="ddim_fast.pipeline"):
        ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    assert pipe.scheduler is original
    reason = optimized_state(pipe).kept_schedulers["scheduler"]
    assert reason.startswith("DDIMScheduler: its alphas_cumprod differ from what its config gives")
    assert len(_warnings(caplog)) == 1 and reason in _warnings(caplog)[0].getMessage()
    ddim_fast.restore(pipe)


# LEDITS++ (diffusers' LEditsPPPipelineStableDiffusion): invert() sets the schedule on the scheduler and leaves
# the inversion in the pipeline; each edit call then runs set_timesteps(len(scheduler.timesteps)) and steps with
# eta = 1 and the inverted noise maps. A fresh scheduler from the config has 1000 timesteps: edits after a swap
# that lost the state ran a different schedule (issue 17: rel. 1.66).
LEDITS_STEPS = 4


def _long_timesteps(add_noise):
    # diffusers 0.42's LEDITS++ invert() calls add_noise(x0, noise, torch.Tensor([t])) (a float index), which its
    # own DDIMScheduler rejects; the same integer cast is applied to both schedulers compared here.
    def patched(self, original_samples, noise, timesteps):
        return add_noise(self, original_samples, noise, timesteps.long())
    return patched


@pytest.fixture()
def ledits(monkeypatch):
    if not hasattr(diffusers, "LEditsPPPipelineStableDiffusion"):
        pytest.skip("this diffusers has no LEditsPPPipelineStableDiffusion")
    monkeypatch.setattr(diffusers.DDIMScheduler, "add_noise", _long_timesteps(diffusers.DDIMScheduler.add_noise))
    monkeypatch.setattr(FastDDIMScheduler, "add_noise", _long_timesteps(FastDDIMScheduler.add_noise))
    return tp.ledits_pp()


def _ledits_invert(pipe, steps: int = LEDITS_STEPS):
    pipe.invert(image=tp.pil_image(), num_inversion_steps=steps, skip=0.15, generator=_gen(0))


def _ledits_edit(pipe):
    return pipe(editing_prompt_embeds=tp.prompt_embeds()["prompt_embeds"], edit_guidance_scale=5.0,
                use_intersect_mask=False, output_type="latent", generator=_gen(1)).images


@torch.no_grad()
def test_ledits_pp_edit_after_invert_then_optimize(ledits):
    pipe = ledits
    _ledits_invert(pipe)
    steps, timesteps = pipe.scheduler.num_inference_steps, pipe.scheduler.timesteps.clone()
    base = _ledits_edit(pipe)
    assert torch.isfinite(base).all()

    _ledits_invert(pipe)
    ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    assert pipe.scheduler.num_inference_steps == steps and torch.equal(pipe.scheduler.timesteps, timesteps)
    assert torch.equal(_ledits_edit(pipe), base), "the swap changed LEDITS++'s edit"
    ddim_fast.restore(pipe)

    # Fully optimized (invert() put diffusers' AttnProcessor on every module: it is fused like any other).
    _ledits_invert(pipe)
    ddim_fast.optimize(pipe, attention=True)
    assert optimized_state(pipe).fused_attention_count > 0
    assert_rel_close(_ledits_edit(pipe), base, SAMPLER_RTOL, "LEDITS++ edit, optimize() after invert()")
    ddim_fast.restore(pipe)


@torch.no_grad()
def test_ledits_pp_invert_while_optimized_then_restore(ledits):
    """restore hands the original scheduler the schedule invert() set on the fused one: edits after restore
    equal plain diffusers' (invert, edit), not edits on the schedule of an invert() before optimize."""
    pipe = ledits
    _ledits_invert(pipe)
    base = _ledits_edit(pipe)
    _ledits_invert(pipe, steps=LEDITS_STEPS + 3)
    ddim_fast.optimize(pipe, attention=False, cuda_graph=False)
    _ledits_invert(pipe)
    optimized = _ledits_edit(pipe)
    ddim_fast.restore(pipe)
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
    assert torch.equal(optimized, base)
    assert torch.equal(_ledits_edit(pipe), base), "the edit after restore lost the schedule invert() set"


# --------------------------------------------------------------------------------------------------
# GraphedForward on a UNet (the eager static-buffer path on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def unet():
    return tp.tiny_unet()


def _inputs(batch: int = 2, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=gen), torch.randn(batch, tp.TEXT_TOKENS, tp.TEXT_DIM, generator=gen)


def _eager(unet, *args, **kwargs):
    return type(unet).forward(unet, *args, **kwargs)


@torch.no_grad()
def test_timesteps_are_data_not_keys(unet):
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = _inputs()
    kinds = [901, 651, torch.tensor(401), torch.tensor(151, dtype=torch.int64), 21.0, torch.tensor([11, 11])]
    for t in kinds:
        got = unet(x, t, encoder_hidden_states=cond).sample
        assert torch.equal(got, _eager(unet, x, t, cond).sample), t
    # int, 0-d int64 tensor, float, [2] tensor: four signatures; every other call replayed one of them.
    assert graphed.cache.misses == 4 and graphed.cache.hits == 2 and graphed.eager_calls == 0
    graphed.uninstall()


@torch.no_grad()
def test_positional_and_keyword_calls_share_a_graph_and_outputs_are_fresh(unet):
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = _inputs()
    first = unet(x, 500, cond)
    second = unet(sample=x * 0.5, timestep=400, encoder_hidden_states=cond, return_dict=True)
    assert graphed.cache.misses == 1 and graphed.cache.hits == 1
    assert isinstance(first, type(_eager(unet, x, 500, cond)))
    assert torch.equal(first.sample, _eager(unet, x, 500, cond).sample)  # untouched by the second call
    assert torch.equal(second.sample, _eager(unet, x * 0.5, 400, cond).sample)
    runner = graphed.cache.get(graphed.last_key)
    assert second.sample is not runner.static_outputs.sample
    as_tuple = unet(x, 500, cond, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], first.sample)
    assert graphed.cache.misses == 2  # return_dict is part of the key
    # A channels_last input is another graph, and the output keeps the layout eager gives.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    got = unet(x_cl, 500, cond).sample
    expected = _eager(unet, x_cl, 500, cond).sample
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    assert graphed.cache.misses == 3


@torch.no_grad()
def test_python_scalars_in_kwargs_key_separate_graphs(unet):
    """A LoRA scale in cross_attention_kwargs is baked into a capture (diffusers applies it to the PEFT layers
    in Python before the forward runs): each value needs its own graph."""
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # "scale without the PEFT backend is ineffective", once per call
    try:
        graphed = GraphedForward(unet, off_cuda="static").install()
        x, cond = _inputs()
        for scale in (0.5, 1.0, 0.5, None, 1.0):
            kwargs = None if scale is None else {"scale": scale}
            got = unet(x, 500, cond, cross_attention_kwargs=kwargs).sample
            assert torch.equal(got, _eager(unet, x, 500, cond, cross_attention_kwargs=kwargs).sample)
        assert graphed.cache.misses == 3 and graphed.cache.hits == 2 and len(graphed.cache) == 3
    finally:
        diffusers_logger.setLevel(level)


class _LoraLinear(torch.nn.Module):
    """A hand-made LoRA adapter around a Linear, carrying the Python state of a PEFT tuner layer
    (``_active_adapter``, ``_disable_adapters``, ``merged_adapters``, ``scaling``) that the fingerprint reads."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)
        self._active_adapter = "default"
        self._disable_adapters = False
        self.merged_adapters = []
        self.scaling = {"default": 1.0}

    def forward(self, x):
        out = self.base_layer(x)
        if not self._disable_adapters:
            out = out + self.scaling["default"] * self.lora_B(self.lora_A(x))
        return out


@torch.no_grad()
def test_structure_changes_recapture_and_in_place_weights_do_not(unet):
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = _inputs()

    def check(expect_misses, expect_invalidations, what):
        got = unet(x, 500, cond).sample
        assert torch.equal(got, _eager(unet, x, 500, cond).sample), what
        assert (graphed.cache.misses, graphed.invalidations) == (expect_misses, expect_invalidations), what
        return got

    before = check(1, 0, "first call")
    check(1, 0, "second call replays")
    # In place (same tensors): the graph stays valid; the replay reads the new weights.
    unet.conv_out.weight.mul_(0.5)
    changed = check(1, 0, "in-place weight update")
    assert not torch.equal(changed, before)
    unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()})  # copied into the same tensors
    check(1, 0, "load_state_dict into the same tensors")
    # New tensors (assign=True): recapture.
    unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()}, assign=True)
    check(2, 1, "load_state_dict(assign=True)")
    # Processors changed.
    unet.set_attn_processor(AttnProcessor())
    check(3, 2, "processors changed")
    # An adapter added (a submodule replaced).
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    attn.to_q = _LoraLinear(attn.to_q)
    with_adapter = check(4, 3, "adapter added")
    # Its Python-side state: scaling and the disabled flag (no module or tensor changes at all).
    attn.to_q.scaling["default"] = 0.25
    scaled = check(5, 4, "LoRA scaling changed")
    assert not torch.equal(scaled, with_adapter)
    attn.to_q._disable_adapters = True
    check(6, 5, "adapter disabled")
    # Adapter removed again.
    attn.to_q = attn.to_q.base_layer
    check(7, 6, "adapter removed")
    # A forward hook added.
    handle = unet.conv_out.register_forward_hook(lambda module, args, out: out * 2)
    check(8, 7, "hook added")
    handle.remove()
    check(9, 8, "hook removed")
    graphed.uninstall()


@torch.no_grad()
def test_timestep_cond_and_added_cond_kwargs_are_static_inputs():
    unet = tp.tiny_unet(sdxl=True)
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = _inputs()
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        added = {"text_embeds": torch.randn(2, tp.POOLED_DIM, generator=gen),
                 "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2) + seed}
        got = unet(x, 500, cond, added_cond_kwargs=added).sample
        assert torch.equal(got, _eager(unet, x, 500, cond, added_cond_kwargs=added).sample)
    assert graphed.cache.misses == 1 and graphed.cache.hits == 1

    from diffusers import UNet2DConditionModel

    lcm = UNet2DConditionModel.from_config(tp.tiny_unet().config, time_cond_proj_dim=8).eval()  # LCM-style
    graphed = GraphedForward(lcm, off_cuda="static").install()
    for w in (2.0, 6.0):
        timestep_cond = torch.full((2, 8), w)
        got = lcm(x, 500, cond, timestep_cond=timestep_cond).sample
        assert torch.equal(got, _eager(lcm, x, 500, cond, timestep_cond=timestep_cond).sample)
    assert graphed.cache.misses == 1 and graphed.cache.hits == 1


@torch.no_grad()
def test_controlnet_residuals_are_static_inputs(unet):
    controlnet = tp.tiny_controlnet()
    graphed_unet = GraphedForward(unet, off_cuda="static").install()
    graphed_cn = GraphedForward(controlnet, off_cuda="static").install()
    x, cond = _inputs()
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for scale in (0.8, 0.8):
        down, mid = controlnet(x, 500, cond, controlnet_cond=image, conditioning_scale=scale, return_dict=False)
        down_ref, mid_ref = _eager(controlnet, x, 500, cond, controlnet_cond=image, conditioning_scale=scale,
                                   return_dict=False)
        assert all(torch.equal(a, b) for a, b in zip(down, down_ref)) and torch.equal(mid, mid_ref)
        got = unet(x, 500, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert torch.equal(got, _eager(unet, x, 500, cond, down_block_additional_residuals=down_ref,
                                       mid_block_additional_residual=mid_ref).sample)
    assert (graphed_cn.cache.misses, graphed_cn.cache.hits) == (1, 1)
    assert (graphed_unet.cache.misses, graphed_unet.cache.hits) == (1, 1)


@torch.no_grad()
def test_capture_failure_runs_eagerly_with_one_warning(unet, monkeypatch, caplog):
    def failing_capture(*args, **kwargs):
        raise graphs.GraphCaptureError("the step's last warm-up run failed under sync debug mode: .item()")

    monkeypatch.setattr(graphs, "capture_step", failing_capture)
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = _inputs()
    with caplog.at_level(logging.WARNING, logger="ddim_fast.module_graph"):
        for t in (500, 400, 300):
            assert torch.equal(unet(x, t, cond).sample, _eager(unet, x, t, cond).sample)
    warnings = [r for r in caplog.records if r.name == "ddim_fast.module_graph"]
    assert len(warnings) == 1 and "cannot be captured into a CUDA graph" in warnings[0].getMessage()
    assert graphed.disabled_reason.startswith("capture failed") and graphed.eager_calls == 3


def test_training_and_autograd_pass_through(unet):
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = _inputs()
    with torch.enable_grad():
        unet(x, 500, cond)
    unet.train()
    with torch.no_grad():
        unet(x, 500, cond)
    unet.eval()
    assert graphed.eager_calls == 2 and graphed.cache.misses == 0
    with torch.no_grad():
        unet(x, 500, cond)
    assert graphed.cache.misses == 1


def test_uninstall_restores_the_forward_and_refuses_double_install(unet):
    own = unet.forward
    graphed = GraphedForward(unet, off_cuda="static").install()
    with pytest.raises(ValueError, match="already graphed"):
        GraphedForward(unet)
    assert graphed.uninstall() and "forward" not in unet.__dict__
    # An instance-level forward the module had before is put back as it was.
    unet.forward = own
    graphed = GraphedForward(unet, off_cuda="static").install()
    assert graphed.uninstall() and unet.__dict__["forward"] is own
    # Wrapped again by someone else after install: ours turns into a pass-through instead of unwrapping theirs.
    del unet.forward
    graphed = GraphedForward(unet, off_cuda="static").install()
    theirs = unet.forward
    unet.forward = lambda *a, **k: theirs(*a, **k)
    assert not graphed.uninstall() and not graphed.enabled
    x, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, 500, cond).sample, _eager(unet, x, 500, cond).sample)
    assert graphed.eager_calls == 1


# --------------------------------------------------------------------------------------------------
# CUDA graphs (skip without a GPU)
# --------------------------------------------------------------------------------------------------

FP16_RUN_RTOL = 1e-2  # whole fp16 runs: the graph replays the same kernels; the tolerance covers fp16 rounding


@requires_cuda
@torch.no_grad()
def test_cuda_pipeline_graph_replay_matches_eager():
    pipe = tp.sd().to("cuda", torch.float16)
    embeds = {k: v.to("cuda", torch.float16) for k, v in tp.prompt_embeds().items()}

    def run():
        return pipe(**embeds, height=32, width=32, num_inference_steps=4, guidance_scale=7.5,
                    generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images

    expected = run()
    ddim_fast.optimize(pipe)
    first, second = run(), run()
    graphed = optimized_state(pipe).graphed["unet"]
    runners = [graphed.cache.get(key) for key in graphed.cache.keys()]
    assert runners and all(r.captured for r in runners), "the UNet was not captured into a CUDA graph"
    assert graphed.cache.misses == 1 and graphed.cache.hits == 2 * 4 - 1
    assert torch.equal(first, second)
    assert_rel_close(first, expected, FP16_RUN_RTOL, "optimize(pipe) on CUDA fp16 vs diffusers")
    ddim_fast.restore(pipe)


@requires_cuda
@torch.no_grad()
def test_cuda_graph_reads_in_place_weight_updates_and_never_aliases_outputs():
    unet = tp.tiny_unet().to("cuda")
    graphed = GraphedForward(unet, off_cuda="static").install()
    x, cond = (t.cuda() for t in _inputs())
    t = torch.tensor(500, device="cuda")
    # Replays run the kernels eager runs do, but library heuristics may pick other algorithms inside a
    # capture: fp32 agreement per call, not bit equality.
    first = unet(x, t, cond).sample
    kept = first.clone()
    assert_rel_close(first, _eager(unet, x, t, cond).sample, torch.float32, "first replay")
    unet.conv_out.weight.mul_(0.5)  # fuse_lora-style in-place update
    second = unet(x, t, cond).sample
    assert graphed.cache.misses == 1 and graphed.cache.hits == 1 and graphed.cache.get(graphed.last_key).captured
    assert_rel_close(second, _eager(unet, x, t, cond).sample, torch.float32, "replay after an in-place update")
    assert not torch.allclose(second, kept)
    assert torch.equal(first, kept), "the second replay overwrote the first call's output"
    unet.set_attn_processor(AttnProcessor())
    assert_rel_close(unet(x, t, cond).sample, _eager(unet, x, t, cond).sample, torch.float32, "after recapture")
    assert graphed.invalidations == 1 and graphed.cache.misses == 2
    graphed.uninstall()


class _SyncingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep):
        if sample.sum().item() > 1e9:  # a host sync: cannot be captured
            return sample
        return self.linear(sample) * timestep


@requires_cuda
@torch.no_grad()
def test_cuda_uncapturable_model_runs_eagerly_with_one_warning(caplog):
    model = _SyncingModel().cuda().eval()
    graphed = GraphedForward(model).install()
    x = torch.randn(2, 4, device="cuda")
    with caplog.at_level(logging.WARNING, logger="ddim_fast.module_graph"):
        for t in (3, 5):
            assert torch.equal(model(x, t), model.linear(x) * torch.tensor([t], device="cuda"))
    assert len([r for r in caplog.records if "cannot be captured" in r.getMessage()]) == 1
    assert graphed.disabled_reason is not None
