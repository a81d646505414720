"""``python -m ddim_fast bench``: the end-to-end DDIM loop, timed, on one UNet with one seed.

Loops compared (same UNet weights, same x_T, same conditioning, same steps):

* ``diffusers``: what a diffusers pipeline does — UNet on cat([x, x]) -> chunk -> guidance combine ->
  ``DDIMScheduler.step`` (SD's scheduler config);
* ``fast``: ``FastDDIMSampler`` (ldm API) on the UNet wrapped as an ldm-style model;
* ``fast+graph``: the same with ``cuda_graph=True`` (GPU only);
* ``fast+attn``: the same with ``FusedAttnProcessor(backend="fused")`` (our fused attention kernel, not the
  per-shape choice of ``backend="auto"``, which may be SDPA) on every attention module of (a copy of) the
  UNet, with the CUDA graph on GPU.

Each variant proves what its name says before it is timed (``report['proofs']``; see
:func:`run_bench`): fused step ops counted at the dispatcher, one per UNet forward; a ddim_fast attention op
for every attention module of every forward and no SDPA/softmax for ``+attn``; really captured graphs and
one replay per step for ``+graph``.

Outputs must agree with the diffusers loop (fp32: 1e-5 relative; fp16/bf16: the whole-run tolerance
below); it/s, ms per step and the non-UNet time per step are printed and written with ``--json``.

This module also holds the pieces ``profile`` shares: the UNet configs, the ldm-style UNet wrapper, the
plain-PyTorch reference loop, and the timers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ddim_fast import reference, schedule

logger = logging.getLogger(__name__)

# SD's noise schedule: ldm "linear" 0.00085 .. 0.012 over 1000 steps (diffusers' "scaled_linear").
SD_LINEAR_START, SD_LINEAR_END, SD_NUM_TIMESTEPS = 0.00085, 0.012, 1000
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=SD_NUM_TIMESTEPS, beta_start=SD_LINEAR_START, beta_end=SD_LINEAR_END,
    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    prediction_type="epsilon",
)

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), written out so that no
# download is needed: the weights are random, the shapes and the work per step are SD1.5's.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT_TOKENS = 77

# A tiny UNet with the same block structure (cross-attention down/up blocks), for CPU runs and tests.
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=8,
)
TINY_TEXT_TOKENS = 8

UNET_CONFIGS = {"sd15-unet": (SD15_UNET_CONFIG, SD15_TEXT_TOKENS), "tiny-unet": (TINY_UNET_CONFIG, TINY_TEXT_TOKENS)}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Whole-run agreement with the diffusers loop. fp32: the drop-in contract. Half precision: diffusers
# does the step arithmetic in the storage dtype and ddim_fast in fp32, so the runs drift apart by a few
# fp16 ulps per step; 50 steps of that stay well inside these bounds.
RUN_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def require_diffusers():
    """Import diffusers or explain how to get it."""
    try:
        import diffusers
    except ImportError as exc:
        raise RuntimeError(
            "this needs diffusers (pip install 'ddim-fast[test]' or pip install diffusers); "
            f"import failed: {exc}"
        ) from exc
    return diffusers


def require_sampler():
    """``ddim_fast.FastDDIMSampler``, with a clear error when ddim_fast/sampler.py is missing or broken."""
    try:
        from ddim_fast.sampler import FastDDIMSampler
    except ImportError as exc:
        raise RuntimeError(f"ddim_fast.sampler.FastDDIMSampler is not available: {exc}") from exc
    return FastDDIMSampler


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: no CUDA device is available")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_unet(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A diffusers ``UNet2DConditionModel`` from the named config with random (seeded) weights, in eval mode."""
    diffusers = require_diffusers()
    if name not in UNET_CONFIGS:
        raise ValueError(f"model must be one of {sorted(UNET_CONFIGS)}, got {name!r}")
    config, _ = UNET_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**config)
    # diffusers warns on every .to(dtype) of a model built without from_pretrained; nothing here is
    # meant to stay fp32, so keep the output readable.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        unet = unet.to(device=device, dtype=dtype)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return unet.eval().requires_grad_(False)


class LdmUNetModel(torch.nn.Module):
    """A diffusers UNet dressed as an ldm ``LatentDiffusion`` for ``FastDDIMSampler``: SD's schedule as
    fp32 buffers (betas, alphas_cumprod, alphas_cumprod_prev), num_timesteps, device,
    parameterization='eps', and apply_model(x [B,4,h,w], t [B], c [B,77,768]) -> eps [B,4,h,w]."""

    parameterization = "eps"

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        device = next(unet.parameters()).device
        betas = schedule.ldm_betas("linear", SD_NUM_TIMESTEPS, SD_LINEAR_START, SD_LINEAR_END)
        abar = schedule.alphas_cumprod(betas)
        self.num_timesteps = SD_NUM_TIMESTEPS
        self.register_buffer("betas", betas.float().to(device))
        self.register_buffer("alphas_cumprod", abar.float().to(device))
        self.register_buffer("alphas_cumprod_prev",
                             torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]).float().to(device))

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond, *args, **kwargs) -> torch.Tensor:
        if isinstance(cond, dict):  # ldm's {'c_crossattn': [tensor]} form
            values = next(iter(cond.values()))
            cond = torch.cat(values, 0) if isinstance(values, (list, tuple)) else values
        return self.unet(x_noisy, t, encoder_hidden_states=cond).sample


@dataclass
class Problem:
    """One sampling problem: everything every loop gets identically."""

    model: Any                      # ldm-style model (apply_model, schedule buffers)
    x_T: torch.Tensor               # [B, C, H, W]
    cond: torch.Tensor | None       # conditioning [B, ...]
    uncond: torch.Tensor | None     # unconditional conditioning [B, ...] (None without guidance)
    steps: int
    guidance: float | None          # None or 1.0: no classifier-free guidance
    unet: Any = None                # the raw diffusers UNet when the model wraps one
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.x_T.device

    @property
    def uses_guidance(self) -> bool:
        return self.guidance is not None and self.guidance != 1.0 and self.uncond is not None


def unet_problem(name: str, device: torch.device, dtype: torch.dtype, *, batch: int = 1, steps: int = 50,
                 guidance: float | None = 7.5, resolution: int | None = None, seed: int = 0) -> Problem:
    """A UNet problem: random-weight UNet, seeded x_T and seeded stand-in text embeddings.
    ``resolution`` is in pixels (latent = resolution / 8); default the config's sample size * 8."""
    config, tokens = UNET_CONFIGS[name]
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise ValueError(f"resolution must be a positive multiple of 8 (the latent is resolution / 8), "
                         f"got {resolution}")
    latent = (resolution // 8) if resolution else config["sample_size"]
    unet = build_unet(name, device, dtype, seed)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    x_T = torch.randn(batch, config["in_channels"], latent, latent, generator=gen).to(device, dtype)
    cond = torch.randn(batch, tokens, config["cross_attention_dim"], generator=gen).to(device, dtype)
    uncond = torch.randn(batch, tokens, config["cross_attention_dim"], generator=gen).to(device, dtype)
    return Problem(LdmUNetModel(unet), x_T, cond, uncond if guidance not in (None, 1.0) else None,
                   steps, guidance, unet=unet)


# --------------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------------


def ldm_table(model, steps: int, eta: float = 0.0) -> torch.Tensor:
    """The coefficient table of an ldm DDIM run ('uniform' grid) on the model's device: fp32 [S', 8]."""
    timesteps = schedule.ldm_timesteps(steps, model.num_timesteps)
    params = schedule.ldm_ddim_parameters(model.alphas_cumprod, timesteps, eta)
    return schedule.ldm_coefficient_table(params, device=model.device)


@torch.no_grad()
def reference_loop(problem: Problem, hooks: "StepHooks | None" = None) -> torch.Tensor:
    """The plain-PyTorch DDIM loop (what ldm does, unfused): apply_model on cat([x, x]), then
    ``reference.ddim_step`` (chunk, combine, x0/eps, update as separate fp32 tensor ops) per step,
    including ldm's per-step ``randn(x.shape)`` from the global generator (drawn even at eta = 0, where
    sigma = 0 multiplies it away). Returns x_0 [B, C, H, W] in x_T's dtype."""
    model, x = problem.model, problem.x_T
    table = ldm_table(model, problem.steps)
    host_table = table.cpu()
    b = x.shape[0]
    for i in range(table.shape[0]):
        t = torch.full((b,), int(host_table[i, schedule.COL_TIMESTEP]), device=x.device, dtype=torch.long)
        if problem.uses_guidance:
            inputs = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([problem.uncond, problem.cond]))
        else:
            inputs = (x, t, problem.cond)
        if hooks:  # around the call alone, as HookedModel stamps FastDDIMSampler's: the same "model" time
            hooks.model_start(i)
        out = model.apply_model(*inputs)
        if hooks:
            hooks.model_end(i)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
        x_prev, _ = reference.ddim_step(x, out, host_table if x.device.type == "cpu" else table, i,
                                        guidance_scale=problem.guidance if problem.uses_guidance else None,
                                        noise=noise, compute_dtype=torch.float32)
        x = x_prev.to(problem.x_T.dtype)
        if hooks:
            hooks.step_end(i)
    return x


@torch.no_grad()
def diffusers_loop(problem: Problem, scheduler=None) -> torch.Tensor:
    """What a diffusers pipeline's denoising loop does with ``DDIMScheduler`` (SD's config)."""
    if problem.unet is None:
        raise ValueError("diffusers_loop needs a UNet problem (problem.unet is None)")
    if scheduler is None:
        scheduler = require_diffusers().DDIMScheduler(**SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(problem.steps, device=problem.device)
    latents = problem.x_T
    context = torch.cat([problem.uncond, problem.cond]) if problem.uses_guidance else problem.cond
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if problem.uses_guidance else latents
        noise_pred = problem.unet(model_input, t, encoder_hidden_states=context).sample
        if problem.uses_guidance:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + problem.guidance * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


def make_fast_sampler(problem: Problem, *, backend: str = "auto", cuda_graph: bool = False,
                      noise_mode: str = "torch"):
    FastDDIMSampler = require_sampler()
    return FastDDIMSampler(problem.model, "linear", problem.device, noise_mode=noise_mode, backend=backend,
                           cuda_graph=cuda_graph)


@torch.no_grad()
def fast_loop(problem: Problem, sampler, callback: Callable | None = None) -> torch.Tensor:
    """``FastDDIMSampler.sample`` with ldm's keywords; returns the samples."""
    samples, _ = sampler.sample(
        problem.steps, problem.x_T.shape[0], tuple(problem.x_T.shape[1:]), conditioning=problem.cond,
        unconditional_guidance_scale=problem.guidance if problem.uses_guidance else 1.0,
        unconditional_conditioning=problem.uncond if problem.uses_guidance else None,
        eta=0.0, x_T=problem.x_T, verbose=False, log_every_t=10**9, callback=callback,
    )
    return samples


@torch.no_grad()
def unet_only_loop(problem: Problem) -> None:
    """The UNet calls of a run and nothing else (the floor every loop pays)."""
    x = torch.cat([problem.x_T] * 2) if problem.uses_guidance else problem.x_T
    context = torch.cat([problem.uncond, problem.cond]) if problem.uses_guidance else problem.cond
    t = torch.full((x.shape[0],), 501, device=x.device, dtype=torch.long)
    for _ in range(problem.steps):
        problem.model.apply_model(x, t, context)


def graphed_unet_only_loop(problem: Problem) -> Callable[[], None]:
    """The UNet calls of a run replayed from one captured CUDA graph (GPU only): the floor of the
    graph-captured loops, without launch overhead. Returns the function to time. Captured like the
    samplers' steps (``ddim_fast.graphs.CapturedStep``: warm-up and capture on one side stream, host
    syncs reported); raises ``ddim_fast.graphs.GraphCaptureError`` (a RuntimeError) when the UNet
    cannot be captured, with the caller's stream left current."""
    from ddim_fast import graphs

    x = torch.cat([problem.x_T] * 2) if problem.uses_guidance else problem.x_T.clone()
    context = torch.cat([problem.uncond, problem.cond]) if problem.uses_guidance else problem.cond
    t = torch.full((x.shape[0],), 501, device=x.device, dtype=torch.long)

    def unet_call(static):
        with torch.no_grad():
            problem.model.apply_model(static["x"], static["t"], static["context"])

    captured = graphs.CapturedStep(unet_call, {"x": x, "t": t, "context": context}, warmup_iters=3).capture()

    def replay():
        for _ in range(problem.steps):
            captured.replay()

    return replay


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class StepHooks:
    """Per-step timestamps: loop begin, model start/end, step end. CUDA events on GPU (read after one
    sync at the end, so the loop is not perturbed), perf_counter on CPU. On GPU with ``nvtx``, NVTX
    ranges 'ddim step i' (one per step, from the previous step's end) and 'model' inside them.

    Call ``begin()`` right before the loop, ``step_end(i)`` after each step (the samplers' ``callback``),
    ``finish()`` after the loop; ``model_start``/``model_end`` come from :class:`HookedModel`. Model calls
    made while a CUDA graph is being captured are not stamped (they are not really run then)."""

    def __init__(self, device: torch.device, nvtx: bool = True):
        self.cuda = device.type == "cuda"
        self.nvtx = nvtx and self.cuda
        self.begin_stamp: Any = None
        self.model_starts: dict[int, Any] = {}
        self.model_ends: dict[int, Any] = {}
        self.step_ends: dict[int, Any] = {}
        self._step_open = False
        self._model_open = False

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()

    # Step ranges: NVTX here; the profiler's subclass adds torch.profiler ranges.
    def _open_range(self, name: str) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)

    def _close_range(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_pop()

    def _open_step(self, i: int) -> None:
        self._open_range(f"ddim step {i}")
        self._step_open = True

    def _close_step(self) -> None:
        if self._step_open:
            self._close_range()
            self._step_open = False

    def begin(self) -> None:
        self.begin_stamp = self._stamp()
        self._open_step(0)

    def model_start(self, i: int) -> None:
        if self._capturing():
            return
        if not self._step_open:  # a loop run without begin(): open the step here
            self._open_step(i)
        if self.nvtx and not self._model_open:
            torch.cuda.nvtx.range_push("model")
        self._model_open = True
        self.model_starts.setdefault(i, self._stamp())  # first call of the step (models may be called twice)

    def model_end(self, i: int) -> None:
        if self._capturing():
            return
        self.model_ends[i] = self._stamp()
        self._close_model()

    def _close_model(self) -> None:
        if self._model_open and self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._model_open = False

    def step_end(self, i: int) -> None:
        self.step_ends[i] = self._stamp()
        self._close_model()
        self._close_step()
        self._open_step(i + 1)

    def finish(self) -> None:
        """Close every range still open (innermost first); safe to call twice and after an exception."""
        self._close_model()
        self._close_step()

    def _ms(self, a, b) -> float:
        if a is None or b is None:
            return float("nan")
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def rows(self) -> list[dict[str, float]]:
        """One dict per step: model_ms, update_ms (guidance + DDIM update: model end -> step end), other_ms
        (previous step end -> model start: the loop's work between the steps, input preparation included),
        total_ms (previous step end -> step end; step 0 from its model start, or from begin() when the model
        was not observed). NaN where not observed (the model runs inside a replayed CUDA graph; step 0's
        other_ms: what runs before it is the run's setup)."""
        self.finish()
        if self.cuda:
            torch.cuda.synchronize()
        rows = []
        steps = sorted(self.step_ends)
        per_step_model = all(i in self.model_starts and i in self.model_ends for i in steps)
        for k, i in enumerate(steps):
            if k > 0:
                start = self.step_ends[steps[k - 1]]
            else:
                start = self.model_starts[i] if per_step_model else self.begin_stamp
            rows.append({
                "step": i,
                "model_ms": self._ms(self.model_starts[i], self.model_ends[i]) if per_step_model else float("nan"),
                "update_ms": self._ms(self.model_ends[i], self.step_ends[i]) if per_step_model else float("nan"),
                "other_ms": self._ms(start, self.model_starts[i]) if per_step_model and k > 0 else float("nan"),
                "total_ms": self._ms(start, self.step_ends[i]),
            })
        return rows


class HookedModel:
    """Proxy of an ldm-style model that stamps ``hooks`` around apply_model (everything else passes through).
    The step index is the number of completed steps (``hooks.step_end`` calls)."""

    def __init__(self, model, hooks: StepHooks):
        self._model = model
        self._hooks = hooks

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, *args, **kwargs):
        i = len(self._hooks.step_ends)
        self._hooks.model_start(i)
        try:
            out = self._model.apply_model(*args, **kwargs)
        except BaseException:
            self._hooks.finish()  # leave no NVTX / profiler range open behind the exception
            raise
        self._hooks.model_end(i)
        return out


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``fn()`` per repeat. On a GPU: CUDA events recorded on the current stream before and
    after the call (the device drained first, so nothing earlier is counted), read after synchronising;
    on the CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def summarize(values_ms: list[float]) -> dict[str, float]:
    """mean, p50, p90 (nearest rank), min of a list of milliseconds."""
    vals = sorted(v for v in values_ms if v == v)
    if not vals:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "min": float("nan")}
    p90 = vals[max(0, math.ceil(0.9 * len(vals)) - 1)]  # nearest rank
    return {"mean": statistics.fmean(vals), "p50": statistics.median(vals), "p90": p90, "min": vals[0]}


# --------------------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Variant proofs: what each loop really ran
# --------------------------------------------------------------------------------------------------

FUSED_STEP_OPS = frozenset({"ddim_fast::ddim_step", "ddim_fast::ddim_step_out", "ddim_fast::ddim_step_triton",
                            "ddim_fast::ddim_step_triton_out"})
FUSED_ATTENTION_OPS = frozenset({"ddim_fast::attention", "ddim_fast::attention_triton"})


def is_unfused_attention_op(name: str) -> bool:
    """An ATen op that only an unfused attention runs: every SDPA backend kernel (flash, efficient,
    cuDNN, the CPU flash kernel) or a softmax (SDPA's math path, the ldm einsum path). A SD UNet has no
    softmax outside its attention."""
    if not name.startswith("aten::"):
        return False
    return any(word in name for word in ("scaled_dot_product", "_efficient_attention", "_flash_attention",
                                         "softmax"))


class OpCounter:
    """Counts every operator dispatched while it is active (a ``TorchDispatchMode``: it sees the ops that
    reach the dispatcher below autograd and autocast, ``torch.ops.ddim_fast.*`` included, on any device).
    Python-side only: kernels replayed from a CUDA graph are not dispatched, hence not counted.

        with OpCounter() as ops:
            loop()
        ops.count("ddim_fast::attention"), ops.fused_attention, ops.unfused_attention, ops.fused_steps
    """

    def __init__(self):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func._schema.name] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> "OpCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def fused_steps(self) -> int:
        return sum(self.counts[n] for n in FUSED_STEP_OPS)

    @property
    def fused_attention(self) -> int:
        return sum(self.counts[n] for n in FUSED_ATTENTION_OPS)

    @property
    def unfused_attention(self) -> int:
        return sum(c for n, c in self.counts.items() if is_unfused_attention_op(n))


class ForwardCounter:
    """Counts the Python calls of a model: an ldm-style model's ``apply_model`` (an instance attribute
    wrapping it) or a module's forward (a forward pre-hook, e.g. a diffusers UNet). These are the model
    evaluations that really ran eagerly, or were being captured; a CUDA graph replay calls neither.
    ``remove()`` detaches it."""

    def __init__(self, model):
        self.count = 0
        self._model = model
        self._handle = None
        if not hasattr(model, "apply_model"):
            def hook(_module, _args):
                self.count += 1

            self._handle = model.register_forward_pre_hook(hook)
        else:
            original = model.apply_model

            def apply_model(*args, **kwargs):
                self.count += 1
                return original(*args, **kwargs)

            model.apply_model = apply_model

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        else:
            self._model.__dict__.pop("apply_model", None)


def attention_modules(unet) -> dict[str, Any]:
    """{name: processor} of every attention module of a diffusers UNet (``unet.attn_processors``)."""
    return dict(unet.attn_processors)


def fuse_attention(unet) -> int:
    """Puts ``FusedAttnProcessor(backend="fused")`` on every attention module of a diffusers UNet (ldm-style
    models: ``patch_attention(backend="fused")``); returns how many modules now run the fused op. Raises when
    there are none. "fused", not the product's default "auto": auto runs SDPA wherever that measured faster, and
    this variant's name (and its proof) is about our kernel."""
    from ddim_fast.attention_processors import FusedAttnProcessor, patch_attention

    if hasattr(unet, "set_attn_processor") and hasattr(unet, "attn_processors"):
        n = len(unet.attn_processors)
        if n == 0:
            raise ValueError(f"{type(unet).__name__} has no attention module to fuse")
        unet.set_attn_processor(FusedAttnProcessor(backend="fused"))
        return n
    return patch_attention(unet, backend="fused")


def check_fused_processors(unet) -> list[str]:
    """Names of the attention modules whose processor is not ddim_fast's ``FusedAttnProcessor``."""
    from ddim_fast.attention_processors import FusedAttnProcessor

    return [name for name, proc in attention_modules(unet).items() if not isinstance(proc, FusedAttnProcessor)]


@dataclass
class Expectation:
    """What one bench variant must have run, per UNet forward, for its name to be true."""

    fused_step: bool          # every step ran a torch.ops.ddim_fast step op (one per UNet forward)
    fused_attention: bool     # every attention module of every forward ran a ddim_fast attention op
    graph: bool               # the steps were replayed from captured CUDA graphs


VARIANT_EXPECTATIONS = {
    "diffusers": Expectation(fused_step=False, fused_attention=False, graph=False),
    "reference": Expectation(fused_step=False, fused_attention=False, graph=False),
    "fast": Expectation(fused_step=True, fused_attention=False, graph=False),
    "fast+graph": Expectation(fused_step=True, fused_attention=False, graph=True),
    "fast+attn": Expectation(fused_step=True, fused_attention=True, graph=False),  # graph=True on GPU
}


def prove_ops(name: str, expect: Expectation, ops: OpCounter, forwards: int, n_attention: int | None) -> list[str]:
    """The dispatcher-level checks of one proof run (``forwards`` model forwards ran in Python under
    ``ops``); returns what failed (empty: proven). ``n_attention`` None: a model without attention modules
    (the attention checks are skipped)."""
    problems = []
    if forwards <= 0:
        return [f"{name}: the model never ran"]
    steps = ops.fused_steps
    if expect.fused_step and steps != forwards:
        problems.append(f"{name}: {steps} fused step ops for {forwards} UNet forwards (expected one per forward)")
    if not expect.fused_step and steps:
        problems.append(f"{name}: ran {steps} ddim_fast step ops; this variant must be unfused")
    fused, unfused = ops.fused_attention, ops.unfused_attention
    if n_attention is None:
        if expect.fused_attention:
            problems.append(f"{name}: the model has no attention modules to fuse")
        return problems
    want = n_attention * forwards
    if expect.fused_attention:
        if fused != want or unfused:
            problems.append(f"{name}: {fused} ddim_fast attention ops and {unfused} unfused attention ops (SDPA/"
                            f"softmax) for {n_attention} attention modules x {forwards} forwards = {want}: "
                            "some attention ran unfused")
    else:
        if fused:
            problems.append(f"{name}: ran {fused} ddim_fast attention ops; this variant's attention must be the "
                            "UNet's own")
        if unfused != want:
            problems.append(f"{name}: {unfused} unfused attention ops for {n_attention} modules x {forwards} "
                            f"forwards = {want}")
    return problems


def graph_entries(sampler) -> list[Any]:
    return [sampler.graph_cache.get(k) for k in sampler.graph_cache.keys()]


def prove_graph(name: str, sampler) -> list[str]:
    """Every step the sampler cached is a really captured CUDA graph (not the eager fallback)."""
    from ddim_fast import graphs

    entries = graph_entries(sampler)
    if not entries:
        return [f"{name}: no captured step in the sampler's graph cache (the graph path did not run)"]
    bad = [type(e).__name__ for e in entries
           if not (isinstance(e, graphs.CapturedStep) and e.captured and e.graph is not None)]
    if bad:
        return [f"{name}: {len(bad)} of {len(entries)} cached steps are not captured CUDA graphs ({', '.join(bad)}): "
                "capture failed and the loop ran eagerly (see the warning logged)"]
    return []


def captured_graphs(sampler) -> int:
    """How many of the sampler's cached steps are captured CUDA graphs."""
    from ddim_fast import graphs

    return sum(isinstance(e, graphs.CapturedStep) and e.graph is not None for e in graph_entries(sampler))


def replay_count(sampler) -> int:
    return sum(getattr(e, "replays", 0) for e in graph_entries(sampler))


def prove_timed_call(name: str, expect: Expectation, steps: int, forwards: int, replays: int) -> list[str]:
    """One timed call of a loop: eager loops run ``steps`` forwards; graph loops replay every step but
    (half-precision latents) the first, which runs eagerly, and run no other forward."""
    if not expect.graph:
        if forwards != steps:
            return [f"{name}: a timed run made {forwards} UNet forwards for {steps} steps"]
        return []
    if forwards + replays != steps or replays < steps - 1:
        return [f"{name}: a timed run replayed {replays} graphs and ran {forwards} eager UNet forwards for "
                f"{steps} steps (expected {steps} replays, or {steps - 1} after one eager first step)"]
    return []


class Variant:
    """One bench loop on a problem, with what it must prove (see :func:`run_bench`).

    ``Variant.build(problem, name)`` returns the variant or a string saying why it cannot run here.
    ``first_call(seed)`` runs the loop once under an :class:`OpCounter` (the warm-up: graph capture,
    compiles) and returns its output, raising AssertionError when the proof fails (``self.proof`` holds
    the counts either way); ``__call__`` runs one timed call and checks it (``check_timed_call``)."""

    def __init__(self, name: str, problem: Problem, fn: Callable[[], torch.Tensor], expect: Expectation,
                 unet, sampler=None):
        self.name, self.problem, self.fn, self.expect = name, problem, fn, expect
        self.unet, self.sampler = unet, sampler
        self.n_attention = len(attention_modules(unet)) if unet is not None else None
        self.forwards = ForwardCounter(unet if unet is not None else problem.model)
        self.proof: dict[str, Any] = {}
        self.timed_calls = 0

    @classmethod
    def build(cls, problem: Problem, name: str, *, backend: str = "auto", noise_mode: str = "torch"
              ) -> "Variant | str":
        if name not in VARIANT_EXPECTATIONS:
            raise ValueError(f"unknown bench variant {name!r}; expected one of {', '.join(VARIANT_EXPECTATIONS)}")
        expect = VARIANT_EXPECTATIONS[name]
        on_gpu = problem.device.type == "cuda"
        if name == "fast+attn" and on_gpu:
            expect = Expectation(fused_step=True, fused_attention=True, graph=True)
        if name == "diffusers":
            if problem.unet is None:
                return "the diffusers loop needs a UNet problem"
            return cls(name, problem, lambda: diffusers_loop(problem), expect, problem.unet)
        if name == "reference":
            return cls(name, problem, lambda: reference_loop(problem), expect, problem.unet)
        if expect.graph and not on_gpu:
            return "CUDA graphs need a GPU"
        run_problem = problem
        if expect.fused_attention:
            fused_unet = copy.deepcopy(problem.unet)
            fuse_attention(fused_unet)
            unfused = check_fused_processors(fused_unet)
            if unfused:
                raise AssertionError(f"{name}: attention modules without FusedAttnProcessor: {unfused}")
            run_problem = copy.copy(problem)
            run_problem.unet = fused_unet
            run_problem.model = LdmUNetModel(fused_unet)
        sampler = make_fast_sampler(run_problem, backend=backend, cuda_graph=expect.graph, noise_mode=noise_mode)
        return cls(name, run_problem, lambda: fast_loop(run_problem, sampler), expect, run_problem.unet, sampler)

    def first_call(self, seed: int = 0) -> torch.Tensor:
        # Same global RNG state for every loop: ldm-style samplers draw from it even at eta = 0.
        before = self.forwards.count
        torch.manual_seed(seed)
        with OpCounter() as ops:
            out = self.fn()
        synchronize(self.problem.device)
        forwards = self.forwards.count - before
        problems = prove_ops(self.name, self.expect, ops, forwards, self.n_attention)
        if self.expect.graph:
            problems += prove_graph(self.name, self.sampler)
        self.proof = {
            "unet_forwards": forwards, "attention_modules": self.n_attention,
            "fused_step_ops": ops.fused_steps, "fused_attention_ops": ops.fused_attention,
            "unfused_attention_ops": ops.unfused_attention,
            "graphs_captured": captured_graphs(self.sampler) if self.expect.graph else 0,
            "expect": {"fused_step": self.expect.fused_step, "fused_attention": self.expect.fused_attention,
                       "graph": self.expect.graph},
            "timed_calls_checked": 0, "ok": not problems, "problems": problems,
        }
        if problems:
            raise AssertionError("; ".join(problems))
        return out

    def __call__(self) -> torch.Tensor:
        """One timed call, checked like the proof run (the caller synchronises: no host wait here)."""
        f0 = self.forwards.count
        r0 = replay_count(self.sampler) if self.sampler is not None else 0
        out = self.fn()
        replays = (replay_count(self.sampler) - r0) if self.sampler is not None else 0
        problems = prove_timed_call(self.name, self.expect, self.problem.steps, self.forwards.count - f0, replays)
        self.proof["timed_calls_checked"] = self.proof.get("timed_calls_checked", 0) + 1
        if problems:
            self.proof["ok"] = False
            self.proof.setdefault("problems", []).extend(problems)
            raise AssertionError("; ".join(problems))
        return out

    def close(self) -> None:
        self.forwards.remove()


def run_bench(model: str = "tiny-unet", *, steps: int = 50, batch: int = 1, dtype: str = "fp32",
              guidance: float = 7.5, resolution: int | None = None, device: str | None = None,
              repeats: int = 3, seed: int = 0, backend: str = "auto", variants: tuple[str, ...] | None = None,
              check: bool = True, noise_mode: str = "torch") -> dict[str, Any]:
    """Time every loop on the same problem; returns the JSON-able result (see module docstring).

    Every variant proves what it ran (``report['proofs']``) before it is timed: its first call (the
    warm-up: graph capture, compiles) runs under an :class:`OpCounter` and a :class:`ForwardCounter` on its
    UNet, and must show one fused step op per UNet forward exactly where the name says "fast", a
    ddim_fast attention op for every attention module of every forward (and no SDPA / softmax) exactly
    where it says "attn", and only really captured CUDA graphs where it says "graph" (or "attn" on GPU);
    every timed call is checked too (UNet forwards and graph replays per call). A variant whose proof
    fails is reported as failed and its times are dropped. With ``check``, a failed proof or an output
    that disagrees with the diffusers loop raises AssertionError."""
    from ddim_fast.tools import info

    dev = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    problem = unet_problem(model, dev, torch_dtype, batch=batch, steps=steps, guidance=guidance,
                           resolution=resolution, seed=seed)
    if variants is None:
        variants = ("diffusers", "fast", "fast+graph", "fast+attn") if dev.type == "cuda" else (
            "diffusers", "fast", "fast+attn")
    for name in variants:
        if name not in VARIANT_EXPECTATIONS:
            raise ValueError(f"unknown bench variant {name!r}; expected one of {', '.join(VARIANT_EXPECTATIONS)}")
    tol = RUN_TOLERANCES[torch_dtype]

    results: dict[str, Any] = {}
    outputs: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    notes: dict[str, str] = {}
    proofs: dict[str, Any] = {}
    loops: dict[str, Variant] = {}
    built: list[Variant] = []
    try:
        for name in variants:
            variant = None
            try:
                variant = Variant.build(problem, name, backend=backend, noise_mode=noise_mode)
                if isinstance(variant, str):
                    skipped[name] = variant
                    continue
                built.append(variant)
                outputs[name] = variant.first_call(seed)
            except ValueError:
                raise
            except Exception as exc:  # one broken variant must not hide the others' numbers; reported as failed
                if isinstance(variant, Variant) and variant.proof:
                    proofs[name] = variant.proof
                if check:
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"
                outputs.pop(name, None)
                logger.debug("bench variant %s failed", name, exc_info=True)
                continue
            proofs[name] = variant.proof
            loops[name] = variant
        floors: dict[str, Callable[[], Any]] = {"unet": lambda: unet_only_loop(problem)}
        if dev.type == "cuda" and any(v.expect.graph for v in loops.values()):
            try:
                floors["unet_graph"] = graphed_unet_only_loop(problem)
            except RuntimeError as exc:  # capture failed: compare the graph loops with the eager UNet instead
                logger.warning("could not capture the UNet alone in a CUDA graph (%s); using the eager UNet time",
                               exc)
        for fn in floors.values():
            fn()

        # Interleaved rounds (every loop once per round, the UNet alone too) so that a slow spell of the
        # machine hits all of them alike; the best round of each is reported. Every timed call of a loop is
        # checked (UNet forwards, graph replays): what was timed is what the proof run showed.
        times: dict[str, list[float]] = {name: [] for name in [*loops, *floors]}
        for _ in range(repeats):
            for name, fn in [*loops.items(), *floors.items()]:
                if name in loops and not proofs[name]["ok"]:
                    continue
                try:
                    times[name] += time_call(fn, dev, 1, warmup=0)
                except AssertionError as exc:
                    if check:
                        raise
                    failed[name] = f"AssertionError: {exc}"
    finally:
        for variant in built:
            variant.close()
    for name in list(loops):
        if not proofs[name]["ok"]:
            del loops[name]
    unet_ms = min(times["unet"]) / steps * 1e3
    unet_graph_ms = min(times["unet_graph"]) / steps * 1e3 if "unet_graph" in times else None
    for name, variant in loops.items():
        best = min(times[name])
        # Graph-captured loops are compared with the graph-captured UNet (no launch overhead in either).
        floor = unet_graph_ms if (unet_graph_ms is not None and variant.expect.graph) else unet_ms
        results[name] = {
            "seconds": best, "seconds_all": times[name], "it_per_s": steps / best, "ms_per_step": best / steps * 1e3,
            "unet_floor_ms_per_step": floor, "non_unet_ms_per_step": best / steps * 1e3 - floor,
            "cuda_graph": variant.expect.graph, "fused_attention": variant.expect.fused_attention,
        }
        results[name]["non_unet_fraction"] = results[name]["non_unet_ms_per_step"] / results[name]["ms_per_step"]

    baseline = "diffusers" if "diffusers" in results else next(iter(results), None)
    for name, res in results.items():
        res["speedup_vs_" + baseline] = results[baseline]["seconds"] / res["seconds"] if baseline else float("nan")
        if baseline and name != baseline:
            res["rel_error_vs_" + baseline] = reference.relative_error(outputs[name], outputs[baseline])

    report = {
        "kind": "bench",
        "date": time.strftime("%Y-%m-%d"),
        "environment": info.environment_summary(dev),
        "config": {"model": model, "steps": steps, "batch": batch, "dtype": dtype, "guidance": guidance,
                   "latent": list(problem.x_T.shape[1:]), "device": str(dev), "repeats": repeats,
                   "backend": backend, "noise_mode": noise_mode, "seed": seed, "tolerance": tol},
        "unet_only_ms_per_step": unet_ms,
        "unet_graph_ms_per_step": unet_graph_ms,
        "results": results,
        "proofs": proofs,
        "skipped": skipped,
        "failed": failed,
        "notes": notes,
        "baseline": baseline,
    }
    if check:
        bad = {n: r["rel_error_vs_" + baseline] for n, r in results.items()
               if n != baseline and not r["rel_error_vs_" + baseline] <= tol}
        report["agree"] = not bad
        if bad:
            raise AssertionError(
                f"outputs disagree with the {baseline} loop beyond {tol:.0e} ({dtype}): "
                + ", ".join(f"{n}: {e:.3e}" for n, e in bad.items()))
    return report


def format_bench(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"bench: {cfg['model']}, {cfg['dtype']}, batch {cfg['batch']}, latent {'x'.join(map(str, cfg['latent']))}, "
        f"{cfg['steps']} steps, CFG {cfg['guidance']} on {report['environment']['hardware']}",
        f"UNet alone: {report['unet_only_ms_per_step']:.3f} ms per step"
        + (f" (CUDA graph: {report['unet_graph_ms_per_step']:.3f} ms)" if report.get("unet_graph_ms_per_step") else ""),
        f"{'loop':<12} {'it/s':>9} {'ms/step':>9} {'non-UNet ms/step':>17} {'non-UNet %':>10} "
        f"{'speedup':>8} {'rel err':>10}",
    ]
    base = report["baseline"]
    for name, r in report["results"].items():
        err = r.get("rel_error_vs_" + base)
        lines.append(
            f"{name:<12} {r['it_per_s']:>9.2f} {r['ms_per_step']:>9.3f} {r['non_unet_ms_per_step']:>17.3f} "
            f"{100 * r['non_unet_fraction']:>9.2f}% {r['speedup_vs_' + base]:>7.2f}x "
            f"{'-' if err is None else format(err, '.2e'):>10}")
    for name, why in report["skipped"].items():
        lines.append(f"{name:<12} skipped: {why}")
    for name, why in report.get("failed", {}).items():
        lines.append(f"{name:<12} FAILED: {why}")
    for name, why in report.get("notes", {}).items():
        lines.append(f"{name:<12} note: {why}")
    for name, proof in report.get("proofs", {}).items():
        if name in report["results"]:
            lines.append(f"{name:<12} proof: {proof_summary(proof)}")
    if "agree" in report:
        lines.append(f"agreement with {base} (tolerance {cfg['tolerance']:.0e}): "
                     f"{'PASS' if report['agree'] else 'FAIL'}")
    return "\n".join(lines)


def proof_summary(proof: dict[str, Any]) -> str:
    """One line: what a variant was shown to run."""
    parts = [f"{proof['unet_forwards']} UNet forwards", f"{proof['fused_step_ops']} fused step ops",
             f"{proof['fused_attention_ops']} fused attention ops / {proof['attention_modules']} modules",
             f"{proof['unfused_attention_ops']} unfused attention ops"]
    if proof["expect"]["graph"]:
        parts.append(f"{proof['graphs_captured']} CUDA graphs captured")
    if "timed_calls_checked" in proof:
        parts.append(f"{proof['timed_calls_checked']} timed calls checked")
    return ", ".join(parts) + (" (ok)" if proof["ok"] else " (FAILED)")


def add_arguments(parser) -> None:
    from ddim_fast.tools import arguments

    on_gpu = torch.cuda.is_available()
    parser.add_argument("--model", choices=sorted(UNET_CONFIGS), default="sd15-unet" if on_gpu else "tiny-unet",
                        help="UNet config (random weights); sd15-unet on a GPU, tiny-unet on the CPU by default")
    parser.add_argument("--steps", type=arguments.steps, default=50 if on_gpu else 10,
                        help="DDIM steps, 1 to 1000 (50 on a GPU, 10 on the CPU by default)")
    parser.add_argument("--batch", type=arguments.positive_int, default=1, help="samples per run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16" if on_gpu else "fp32",
                        help="dtype of the latents and the UNet's weights (fp16 on a GPU, fp32 on the CPU by default)")
    parser.add_argument("--guidance", type=arguments.finite_float, default=7.5,
                        help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--resolution", type=arguments.resolution, default=None,
                        help="image size in pixels, a multiple of 8 (latent = resolution / 8) (default: the model's "
                             "own: " + ", ".join(f"{8 * cfg['sample_size']} for {name}"
                                                 for name, (cfg, _) in sorted(UNET_CONFIGS.items())) + ")")
    parser.add_argument("--device", type=arguments.device, default="auto",
                        help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton"),
                        help="FastDDIMSampler's step kernel")
    parser.add_argument("--noise-mode", choices=("torch", "philox"), default="torch",
                        help="FastDDIMSampler noise: 'torch' draws ldm's per-step randn (exact drop-in), "
                             "'philox' draws in-kernel (nothing at eta = 0)")
    parser.add_argument("--repeats", type=arguments.positive_int, default=3,
                        help="timed rounds (every loop once per round, interleaved); the best is reported")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0,
                        help="seed of the UNet's weights, x_T and the stand-in text embeddings")
    parser.add_argument("--variants", type=arguments.names(VARIANT_EXPECTATIONS), default=None,
                        metavar="NAME[,NAME...]",
                        help="comma-separated subset of " + ",".join(VARIANT_EXPECTATIONS) + " (default: diffusers, "
                             "fast, fast+attn, and fast+graph on a GPU)")
    parser.add_argument("--json", metavar="FILE", type=arguments.output_file,
                        help="write the results as JSON (default: none)")


def main(args) -> int:
    report = run_bench(args.model, steps=args.steps, batch=args.batch, dtype=args.dtype, guidance=args.guidance,
                       resolution=args.resolution, device=args.device, repeats=args.repeats, seed=args.seed,
                       backend=args.backend, variants=args.variants, check=False, noise_mode=args.noise_mode)
    print(format_bench(_check(report)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if report["agree"] else 1


def _check(report: dict[str, Any]) -> dict[str, Any]:
    """Fill report['agree'] (every loop within the dtype's tolerance of the baseline)."""
    base, tol = report["baseline"], report["config"]["tolerance"]
    report["agree"] = not report.get("failed") and all(
        r["rel_error_vs_" + base] <= tol for n, r in report["results"].items() if n != base)
    return report
