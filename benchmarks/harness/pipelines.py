"""A diffusers pipeline's own ``pipe(...)`` call in each variant the pipeline benchmark compares
(``benchmarks/bench_pipeline.py``) and the kernel breakdown profiles (:mod:`harness.breakdown`), each proven
to run what its name says.

Variants (``VARIANTS``; the names are read by scripts, keep them):

* ``plain``: the pipeline as diffusers builds it (``DDIMScheduler``, SDPA attention processors, eager UNet);
* ``channels-last``: plain with the UNet in channels_last (a breakdown variant, not a table row);
* ``compile-default``: ``pipe.unet = torch.compile(unet)``;
* ``compile-reduce-overhead``: ``torch.compile(unet, mode="reduce-overhead")`` (Inductor's CUDA graphs);
* ``diffusers-recipe``: diffusers' recommended recipe: the UNet in channels_last, ``fuse_qkv_projections()``,
  ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)``;
* ``optimize``: ``ddim_fast.optimize(pipe)``; its parts ``optimize-no-attention`` (``attention=False``),
  ``optimize-no-graph`` (``cuda_graph=False``), and, where this ``optimize`` has the option,
  ``optimize-no-channels-last`` (``channels_last=False``), ``optimize-unet-body`` (``unet_body=True``: the fused
  GroupNorm(+SiLU) / GEGLU ops, off by default until measured) and ``optimize-compile`` (``compile=True``). A part
  whose option ``optimize`` does not have is skipped with that reason.

Proofs (``PipelineRun.proof``, checked before anything is timed; a failed one raises AssertionError):

* plain, optimize without graphs, compile-less parts: one extra call (the second, untimed) under a dispatcher
  op counter (``harness.proofs.OpCounter``) and a counter of attention-module calls: plain runs no ddim_fast op
  and one SDPA per attention call; optimize runs one fused step op per step and, per attention call, exactly one
  attention op (ours or the SDPA backend its per-shape choice picked, listed in ``attention_backends``);
* optimize with CUDA graphs: the same counters over the FIRST call (the capture must be seen: replays run
  no Python), every UNet call through the graph path, every cached entry a captured graph;
* torch.compile variants: Dynamo's counters (:func:`harness.proofs.compile_counters`): graphs compiled, no
  graph break under ``fullgraph``, CUDA graphs recorded and none skipped under ``reduce-overhead`` on CUDA, no
  recompilation during the timed calls; the recipe's UNet is channels_last with fused QKV processors.

Every variant's final latents are compared with plain's (``rel_error_vs_plain``; fp32 1e-5, fp16 1e-2).
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ddim_fast.reference import relative_error
from ddim_fast.tools.problems import (SD15_TEXT_TOKENS, SD15_UNET_CONFIG, SD_SCHEDULER_CONFIG, TINY_TEXT_TOKENS,
                                      TINY_UNET_CONFIG, require_diffusers)
from ddim_fast.tools.timing import synchronize
from harness.loops import attention_backends
from harness.proofs import OpCounter, compile_counters, prove_compiled, prove_no_recompile

GUIDANCE = 7.5
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# Stable Diffusion XL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), written out
# so that no download is needed: random weights, SDXL's shapes and work per step.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_TOKENS, SDXL_TEXT_DIM, SDXL_POOLED_DIM = 77, 2048, 1280

# The same structure at toy size (CPU tests of the SDXL path): 6 time ids x 8 + a pooled embedding of 32 = 80.
TINY_XL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline's UNet config, text conditioning and image size (the VAE is never run: output_type="latent",
    so it is a small one with the right scale factor, ``2 ** (vae_blocks - 1)``)."""

    unet: dict
    text_tokens: int
    text_dim: int
    resolution: int
    vae_blocks: int
    pooled_dim: int | None = None  # SDXL's pooled text embedding (StableDiffusionXLPipeline), else None


PIPELINES = {
    "tiny-sd": PipelineConfig(TINY_UNET_CONFIG, TINY_TEXT_TOKENS, TINY_UNET_CONFIG["cross_attention_dim"], 32, 2),
    "tiny-sdxl": PipelineConfig(TINY_XL_UNET_CONFIG, TINY_TEXT_TOKENS, 32, 32, 2, pooled_dim=32),
    "sd15": PipelineConfig(SD15_UNET_CONFIG, SD15_TEXT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"], 512, 4),
    "sdxl": PipelineConfig(SDXL_UNET_CONFIG, SDXL_TEXT_TOKENS, SDXL_TEXT_DIM, 1024, 4, pooled_dim=SDXL_POOLED_DIM),
}


class PipelineSetup:
    """One pipeline (random-weight UNet of ``unet_config``, DDIM with SD's schedule) and the inputs of its call:
    ``embeds`` (prompt embeddings, batch ``batch``), and ``unet_inputs`` / ``unet_kwargs``, what the pipeline's
    UNet sees per step (the CFG batch of 2 x batch, the pipeline's own keywords). ``build_on_device``: the UNet's
    random weights are drawn on ``device`` (seconds instead of a minute for SDXL's 2.6 B parameters on the CPU)."""

    def __init__(self, name, device, dtype, unet_config, text_tokens, text_dim, resolution, steps, vae_blocks, *,
                 batch: int = 1, pooled_dim: int | None = None, build_on_device: bool = False):
        diffusers = require_diffusers()
        self.name, self.device, self.dtype, self.steps, self.resolution = name, torch.device(device), dtype, steps, \
            resolution
        self.batch, self.pooled_dim = batch, pooled_dim
        build_device = self.device if build_on_device else torch.device("cpu")
        with torch.random.fork_rng(devices=[build_device] if build_device.type == "cuda" else []), build_device:
            torch.manual_seed(0)
            unet = diffusers.UNet2DConditionModel(**unet_config)
            # Never decoded (output_type="latent"): the VAE only sets vae_scale_factor, so it is made small.
            vae = diffusers.AutoencoderKL(block_out_channels=(32,) * vae_blocks, latent_channels=4, norm_num_groups=8,
                                          down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                                          up_block_types=("UpDecoderBlock2D",) * vae_blocks)
        scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG)
        if pooled_dim is None:
            self.pipe = diffusers.StableDiffusionPipeline(
                vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        else:
            self.pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                scheduler=scheduler, add_watermarker=False)
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # the .to(dtype) of config-built models warns
        try:
            self.pipe.to(device=self.device, dtype=dtype)
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        self.pipe.unet.eval().requires_grad_(False)
        self.pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(1)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(self.device, dtype)

        self.embeds = {key: randn(batch, text_tokens, text_dim) for key in ("prompt_embeds", "negative_prompt_embeds")}
        latent = resolution // 2 ** (vae_blocks - 1)
        cond = torch.cat([self.embeds["negative_prompt_embeds"], self.embeds["prompt_embeds"]])
        self.unet_inputs = (randn(2 * batch, 4, latent, latent), torch.tensor(500, device=self.device), cond)
        # The keywords StableDiffusion(XL)Pipeline passes its UNet, exactly: a compiled UNet called otherwise
        # would recompile (Dynamo guards on them), a graphed one capture another graph.
        self.unet_kwargs: dict[str, Any] = {"timestep_cond": None, "cross_attention_kwargs": None,
                                            "added_cond_kwargs": None, "return_dict": False}
        if pooled_dim is not None:
            self.embeds["pooled_prompt_embeds"] = randn(batch, pooled_dim)
            self.embeds["negative_pooled_prompt_embeds"] = randn(batch, pooled_dim)
            # SDXL's micro-conditioning: original size, crop top-left, target size (what the pipeline passes).
            time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype,
                                    device=self.device).repeat(2 * batch, 1)
            self.unet_kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([self.embeds["negative_pooled_prompt_embeds"],
                                          self.embeds["pooled_prompt_embeds"]]), "time_ids": time_ids}
        self.original_unet = self.pipe.unet
        self.expected: torch.Tensor | None = None  # plain's latents, the reference of every variant

    @classmethod
    def from_name(cls, name: str, device, dtype: torch.dtype, *, steps: int = 50, batch: int = 1,
                  resolution: int | None = None, build_on_device: bool | None = None) -> "PipelineSetup":
        """The pipeline ``PIPELINES[name]`` (``resolution`` in pixels overrides its own)."""
        if name not in PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {name!r}")
        c = PIPELINES[name]
        device = torch.device(device)
        return cls(name, device, dtype, c.unet, c.text_tokens, c.text_dim, resolution or c.resolution, steps,
                   c.vae_blocks,
                   batch=batch, pooled_dim=c.pooled_dim,
                   build_on_device=device.type == "cuda" if build_on_device is None else build_on_device)

    def synchronize(self):
        synchronize(self.device)

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        out = self.pipe(**self.embeds, height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                        guidance_scale=GUIDANCE, generator=torch.Generator(self.device).manual_seed(0),
                        output_type="latent").images
        self.synchronize()
        return out

    @torch.no_grad()
    def unet_call(self):
        """One UNet call on the step's inputs, through whatever the variant made of ``pipe.unet``, as the pipeline
        makes it (its keywords; the output is a tuple, ``return_dict=False``)."""
        x, t, cond = self.unet_inputs
        return self.pipe.unet(x, t, encoder_hidden_states=cond, **self.unet_kwargs)

    def unet_seconds_per_step(self, repeats: int = 5) -> float:
        """The pipeline's UNet (as the variant left it) alone: median over `repeats` of ``steps`` calls on the
        step's inputs (the same statistic as the pipeline's median, so the difference is the overhead)."""
        self.unet_call()
        samples = []
        for _ in range(repeats):
            self.synchronize()
            t0 = time.perf_counter()
            for _ in range(self.steps):
                self.unet_call()
            self.synchronize()
            samples.append((time.perf_counter() - t0) / self.steps)
        return sorted(samples)[len(samples) // 2]

    def reset(self) -> None:
        """Back to plain: optimize undone, the original UNet in place."""
        import ddim_fast

        if ddim_fast.optimized_state(self.pipe) is not None:
            ddim_fast.restore(self.pipe)
        self.pipe.unet = self.original_unet

    def plain_latents(self) -> torch.Tensor:
        """Plain's final latents (computed once, with the pipeline plain)."""
        if self.expected is None:
            self.reset()
            self.expected = self.run()
        return self.expected


# --------------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineVariant:
    """What a variant does to the pipeline. kind: "plain" (diffusers' own UNet, maybe channels_last), "optimize"
    (``ddim_fast.optimize(pipe, **optimize_kwargs)``) or "compile" (``pipe.unet = torch.compile(unet, mode,
    fullgraph)``, after channels_last / fused QKV for the recipe)."""

    name: str
    kind: str
    optimize_kwargs: dict = field(default_factory=dict)
    compile_mode: str | None = None
    fullgraph: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    in_table: bool = True  # False: a breakdown variant only

    @property
    def compiles(self) -> bool:
        return self.kind == "compile" or bool(self.optimize_kwargs.get("compile"))


VARIANTS = {v.name: v for v in (
    PipelineVariant("plain", "plain"),
    PipelineVariant("optimize", "optimize"),
    PipelineVariant("compile-reduce-overhead", "compile", compile_mode="reduce-overhead"),
    PipelineVariant("diffusers-recipe", "compile", compile_mode="reduce-overhead", fullgraph=True, channels_last=True,
                    fuse_qkv=True),
    PipelineVariant("compile-default", "compile", compile_mode="default"),
    PipelineVariant("optimize-no-attention", "optimize", {"attention": False}),
    PipelineVariant("optimize-no-graph", "optimize", {"cuda_graph": False}),
    PipelineVariant("optimize-no-channels-last", "optimize", {"channels_last": False}),
    PipelineVariant("optimize-unet-body", "optimize", {"unet_body": True}),
    PipelineVariant("optimize-compile", "optimize", {"compile": True}),
    PipelineVariant("channels-last", "plain", channels_last=True, in_table=False),
)}
TABLE_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.in_table)


def optimize_options() -> frozenset[str]:
    """The keyword arguments this ``ddim_fast.optimize`` takes (its options grow between versions)."""
    import ddim_fast

    return frozenset(inspect.signature(ddim_fast.optimize).parameters)


def skip_reason(variant: PipelineVariant, device: torch.device) -> str | None:
    """Why ``variant`` cannot run here (None: it can)."""
    missing = sorted(set(variant.optimize_kwargs) - optimize_options())
    if missing:
        return f"this ddim_fast.optimize has no {', '.join(missing)} option"
    if variant.compiles and os.environ.get("DDIM_FAST_BENCH_NO_COMPILE"):
        return "DDIM_FAST_BENCH_NO_COMPILE is set"
    if variant.compiles and device.type == "cpu" and os.environ.get("CI"):
        return "torch.compile on the CPU compiles for minutes on two cores; run without CI=1"
    return None


def variant_unet(unet, variant: PipelineVariant):
    """(what ``pipe.unet`` becomes, the modified copy or None) for a plain or compile variant: the UNet itself,
    or a copy in channels_last and/or with fused QKV projections (the user's UNet is never changed), compiled
    with the variant's ``torch.compile`` options."""
    modified = None
    if variant.channels_last or variant.fuse_qkv:
        modified = copy.deepcopy(unet)
        if variant.channels_last:
            modified.to(memory_format=torch.channels_last)
        if variant.fuse_qkv:
            modified.fuse_qkv_projections()
    model = modified if modified is not None else unet
    if variant.kind == "compile":
        model = compile_unet(model, variant)
    return model, modified


def compile_unet(model, variant: PipelineVariant):
    """``torch.compile`` with the variant's options (one place, so that tests can compile with Dynamo alone)."""
    return torch.compile(model, mode=variant.compile_mode, fullgraph=variant.fullgraph)


def attention_modules(model) -> list[torch.nn.Module]:
    """The diffusers attention modules of ``model`` (those with a processor)."""
    return [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "get_processor")]


class AttentionCalls:
    """Counts the calls of every attention module of a model that really ran in Python (eagerly or while a
    CUDA graph was being captured; a replay calls none). ``remove()`` detaches it."""

    def __init__(self, model):
        self.count = 0
        self.modules = attention_modules(model)

        def hook(_module, _args):
            self.count += 1

        self._handles = [m.register_forward_pre_hook(hook) for m in self.modules]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _processor_names(unet) -> list[str]:
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


class PipelineRun:
    """One variant on one :class:`PipelineSetup`: ``prepare()``, ``first_call()`` (its wall time is
    ``first_call_s``; compiles and captures happen there), ``prove()`` (AssertionError when the variant did not
    run what its name says; ``proof`` holds what was seen either way), timed calls (``run()``: each one
    checked), ``finish()`` (checks what the timed calls did), ``close()`` (the pipeline back to plain)."""

    def __init__(self, setup: PipelineSetup, variant: str | PipelineVariant):
        self.setup = setup
        self.variant = VARIANTS[variant] if isinstance(variant, str) else variant
        self.name = self.variant.name
        self.proof: dict[str, Any] = {}
        self.problems: list[str] = []
        self.first_call_s: float | None = None
        self.rel_error: float | None = None
        self._counters_after_warmup: dict[str, int] | None = None
        self._unet_copy = None

    # -- state ---------------------------------------------------------------------------------------

    @property
    def captures(self) -> bool:
        """optimize captures the UNet into CUDA graphs here (so its proof call must capture again)."""
        return (self.variant.kind == "optimize" and not self.variant.compiles and self.setup.device.type == "cuda"
                and self.variant.optimize_kwargs.get("cuda_graph", True))

    def prepare(self) -> "PipelineRun":
        import ddim_fast

        setup, v = self.setup, self.variant
        if v.kind != "plain":
            setup.plain_latents()  # the reference, computed while the pipeline is plain
        setup.reset()
        pipe = setup.pipe
        if v.kind == "optimize":
            ddim_fast.attention.clear_attention_choices()  # the proof lists what this run chose
            ddim_fast.optimize(pipe, **v.optimize_kwargs)
            self.proof.update(scheduler=type(pipe.scheduler).__name__, optimize_kwargs=dict(v.optimize_kwargs),
                              fused_attention_modules=ddim_fast.optimized_state(pipe).fused_attention_count)
        else:
            if v.kind == "compile":
                torch._dynamo.reset()
            pipe.unet, self._unet_copy = variant_unet(setup.original_unet, v)
            self.proof.update(scheduler=type(pipe.scheduler).__name__,
                              attn_processors=_processor_names(self._counted_unet()))
            if v.kind == "compile":
                self.proof["compile_options"] = {"mode": v.compile_mode, "fullgraph": v.fullgraph}
        return self

    def close(self) -> None:
        self.setup.reset()
        self._unet_copy = None
        if self.variant.kind == "compile":
            torch._dynamo.reset()  # frees the compiled graphs (and the cudagraph trees' memory)

    # -- calls ---------------------------------------------------------------------------------------

    def first_call(self) -> torch.Tensor:
        """The variant's first ``pipe(...)`` call, wall-timed (``first_call_s``: compiles, CUDA-graph captures
        and optimize's attention measurements happen here, nothing of the proofs), then the proof: Dynamo's
        counters for the compiled variants (after two warm-up calls: reduce-overhead records its CUDA graphs
        on the calls after the first), else one more call under the op counters; a graphed optimize variant is
        restored and optimized again first, so that this call captures again under the counters (a replay
        runs no Python) with its attention choices already made."""
        before = compile_counters(self.setup.device) if self.variant.compiles else None
        t0 = time.perf_counter()
        out = self.setup.run()
        self.first_call_s = time.perf_counter() - t0
        if self.variant.compiles:
            for _ in range(2):
                self.setup.run()
            self._counters_after_warmup = compile_counters(self.setup.device)
            self._check_compile(before, self._counters_after_warmup)
        else:
            if self.captures:
                import ddim_fast

                ddim_fast.restore(self.setup.pipe)
                ddim_fast.optimize(self.setup.pipe, **self.variant.optimize_kwargs)
            self._counted_call()
        self._check_state()
        if self.variant.kind == "plain":
            self.rel_error = 0.0 if not self.variant.channels_last else relative_error(out, self.setup.plain_latents())
            if self.setup.expected is None and not self.variant.channels_last:
                self.setup.expected = out
        else:
            self.rel_error = relative_error(out, self.setup.plain_latents())
        self.proof["rel_error_vs_plain"] = self.rel_error
        return out

    def _counted_call(self) -> torch.Tensor:
        """One call under the dispatcher op counter and the attention-call counter; checks the counts."""
        calls = AttentionCalls(self._counted_unet())
        try:
            with OpCounter() as ops:
                out = self.setup.run()
        finally:
            calls.remove()
        self._check_ops(ops, calls)
        return out

    def _counted_unet(self):
        return self._unet_copy if self._unet_copy is not None else self.setup.original_unet

    def run(self) -> torch.Tensor:
        """One timed call (the pipeline's own ``pipe(...)``, device synchronised at its end)."""
        return self.setup.run()

    def finish(self) -> None:
        """After the timed calls: a compiled variant compiled nothing more (no recompilation)."""
        if self._counters_after_warmup is not None:
            problems = prove_no_recompile(self.name, self._counters_after_warmup,
                                          compile_counters(self.setup.device))
            self._fail_on(problems)

    # -- proofs --------------------------------------------------------------------------------------

    def _fail_on(self, problems: list[str]) -> None:
        if problems:
            self.problems += problems
            self.proof["ok"] = False
            self.proof["problems"] = self.problems
            raise AssertionError("; ".join(problems))
        self.proof.setdefault("ok", True)

    def _check_ops(self, ops: OpCounter, calls: AttentionCalls) -> None:
        v, steps, problems = self.variant, self.setup.steps, []
        fused, unfused = ops.fused_attention, ops.unfused_attention
        self.proof.update(fused_step_ops=ops.fused_steps, fused_attention_ops=fused, unfused_attention_ops=unfused,
                          attention_calls=calls.count, attention_modules=len(calls.modules))
        if v.kind == "plain":
            if ops.fused_steps or fused:
                problems.append(f"{self.name}: ran {ops.fused_steps} ddim_fast step ops and {fused} ddim_fast "
                                "attention ops; plain must run none")
            if calls.count != len(calls.modules) * steps or unfused != calls.count:
                problems.append(f"{self.name}: {unfused} SDPA/softmax ops for {calls.count} attention calls "
                                f"({len(calls.modules)} modules x {steps} steps)")
        else:  # optimize and its parts
            import ddim_fast

            state = ddim_fast.optimized_state(self.setup.pipe)
            swapped = v.optimize_kwargs.get("scheduler", True) is not False
            if swapped and ops.fused_steps != steps:
                problems.append(f"{self.name}: {ops.fused_steps} fused step ops for {steps} steps")
            if calls.count < len(calls.modules):
                problems.append(f"{self.name}: {calls.count} attention calls ran for {len(calls.modules)} modules")
            if fused + unfused != calls.count:
                problems.append(f"{self.name}: {fused} ddim_fast + {unfused} SDPA/softmax attention ops for "
                                f"{calls.count} attention calls (expected one each)")
            # What optimize resolved the attention option to for the UNet ("auto": on for CUDA, off on the CPU).
            if state.choices.get("unet", {}).get("attention", v.optimize_kwargs.get("attention", True)):
                choices = ddim_fast.attention.attention_choices()
                if state.fused_attention_count == 0 or not choices:
                    problems.append(f"{self.name}: no attention call went through ddim_fast's FusedAttnProcessor")
                self.proof["attention_backends"] = attention_backends(choices)
            elif fused:
                problems.append(f"{self.name}: ran {fused} ddim_fast attention ops with attention=False")
        self._fail_on(problems)

    def _check_compile(self, before: dict[str, int], after: dict[str, int]) -> None:
        v, on_cuda = self.variant, self.setup.device.type == "cuda"
        self.proof["compile_counters"] = {k: after[k] - before[k] for k in after}
        cudagraphs = on_cuda and v.compile_mode == "reduce-overhead"
        problems = prove_compiled(self.name, before, after, fullgraph=v.fullgraph, cudagraphs=cudagraphs)
        if v.kind == "compile":
            from torch._dynamo.eval_frame import OptimizedModule

            if not isinstance(self.setup.pipe.unet, OptimizedModule):
                problems.append(f"{self.name}: pipe.unet is not torch.compile's OptimizedModule")
        if v.channels_last:
            conv = self._unet_copy.conv_in.weight
            if not conv.is_contiguous(memory_format=torch.channels_last):
                problems.append(f"{self.name}: the UNet's weights are not channels_last")
        if v.fuse_qkv:
            names = _processor_names(self._unet_copy)
            fused = [m for m in attention_modules(self._unet_copy) if getattr(m, "fused_projections", False)]
            self.proof["fused_qkv_modules"] = len(fused)
            if names != ["FusedAttnProcessor2_0"] or not fused:
                problems.append(f"{self.name}: fuse_qkv_projections() left processors {names} and {len(fused)} fused "
                                "modules")
        self._fail_on(problems)

    def _check_state(self) -> None:
        """What the pipeline holds after the first call: the scheduler, and for optimize the graph path."""
        import ddim_fast

        v, problems = self.variant, []
        scheduler = type(self.setup.pipe.scheduler).__name__
        if v.kind == "optimize":
            state = ddim_fast.optimized_state(self.setup.pipe)
            if v.optimize_kwargs.get("scheduler", True) is not False and scheduler != "FastDDIMScheduler":
                problems.append(f"{self.name}: the scheduler is {scheduler}, not FastDDIMScheduler")
            graphed = state.graphed.get("unet") if state is not None else None
            if not v.optimize_kwargs.get("cuda_graph", True):
                if graphed is not None:
                    problems.append(f"{self.name}: the UNet is graphed with cuda_graph=False")
            elif not v.compiles:  # what optimize(compile=True) graphs is its own business: recorded, not required
                problems += self._check_graph(graphed)
        elif scheduler != "DDIMScheduler":
            problems.append(f"{self.name}: the scheduler is {scheduler}, not diffusers' DDIMScheduler")
        if v.kind == "plain" and "forward" in self.setup.pipe.unet.__dict__:
            problems.append(f"{self.name}: the UNet's forward is replaced")
        self._fail_on(problems)

    def _check_graph(self, graphed) -> list[str]:
        if graphed is None:
            return [f"{self.name}: optimize did not graph the UNet"]
        cache = graphed.cache
        entries = [cache.get(key) for key in cache.keys()]
        captured = [bool(getattr(e, "captured", False)) for e in entries]
        self.proof.update(cuda_graph_entries=len(entries), cuda_graph_captured=bool(captured) and all(captured),
                          unet_eager_calls=int(getattr(graphed, "eager_calls", 0)))
        if self.setup.device.type != "cuda":
            return []  # no CUDA graphs off CUDA: what runs there is optimize's CPU path, timed as it is
        if graphed.eager_calls or not entries or not all(captured):
            return [f"{self.name}: {graphed.eager_calls} UNet calls passed the graph path, {sum(captured)} of "
                    f"{len(entries)} cached entries captured (see the warning logged)"]
        return []

    # -- agreement -----------------------------------------------------------------------------------

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.setup.dtype]

    def agrees(self) -> bool:
        return self.rel_error is not None and self.rel_error <= self.tolerance


def unet_step(run: PipelineRun) -> Callable[[], Any]:
    """One UNet call of the prepared variant (for the UNet-alone time and the kernel breakdown)."""
    return run.setup.unet_call
