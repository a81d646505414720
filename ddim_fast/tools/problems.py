"""The sampling problems the tools share (``profile``, ``demo``, ``generate`` and the benchmark harness in the
checkout's ``benchmarks/harness/``): SD's noise schedule and UNet configs, random-weight diffusers UNets, the
ldm-style wrapper ``FastDDIMSampler`` samples them through, :class:`Problem` (everything a loop gets), the
plain-PyTorch DDIM loop (ldm's, unfused) and the ``FastDDIMSampler`` loop.

Nothing of the product imports this module (tests/test_package.py checks the layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ddim_fast import reference, schedule

if TYPE_CHECKING:
    from ddim_fast.tools.timing import StepHooks

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


