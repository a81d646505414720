"""``FastDDIMSampler``: a drop-in for ldm's ``DDIMSampler`` (CompVis / Stability-AI ``ldm``) built on
the fused ``ddim_fast.ops.ddim_step`` op, plus ``slerp`` for latent interpolation.

Usage in an ldm script, unchanged otherwise::

    from ddim_fast import FastDDIMSampler as DDIMSampler
    sampler = DDIMSampler(model)
    samples, intermediates = sampler.sample(S=50, batch_size=4, shape=(4, 64, 64), conditioning=c,
                                            unconditional_guidance_scale=7.5,
                                            unconditional_conditioning=uc, eta=0.0, x_T=start_code)

Same results as upstream (fp32 relative error <= 1e-5 over a whole run), including the noise: in the
default ``noise_mode="torch"`` one ``torch.randn(x.shape)`` is drawn per step from the global generator
even at eta = 0, exactly as ldm does, so consecutive ``sample()`` calls with ``x_T=None`` match too.

How a step runs: the model is called on ``cat([x, x])`` with ``cat([uc, c])`` (unconditional half first,
for tensors, dicts of tensors or of lists, and lists), then ONE ``ops.ddim_step`` launch does guidance,
the eps/v/x0 conversion and the update. Per-step scalars come from a device coefficient table read at
the row held by a device int64 step index that is bumped in place: the loop does no ``.item()`` and no
host sync (callbacks excepted — they get what they ask for).

Deviations from upstream, all documented keyword-level choices:

- ``use_original_steps=True`` works (upstream reads a sigma table from the model and crashes).
- The list-conditioning batch-size warning no longer crashes; messages go to ``logging``.
- ``S`` that makes upstream's grid reach T (S = 3, 9, 27 for T = 1000) drops that grid point instead
  of raising IndexError; when S does not divide T the grid is ``range(0, T, T // S) + 1`` (more than S
  steps, as upstream: S = 7 runs 8 steps [1, 143, ..., 995]).
- "x0"-parameterised models predict the sample (``prediction_type="sample"``); upstream treats them as
  eps — pass ``legacy_x0_as_eps=True`` to the constructor to reproduce that.
- ``dynamic_threshold=ratio`` is implemented (upstream raises): Imagen / diffusers percentile
  thresholding of pred_x0, s = clamp(quantile(|x0|, ratio), 1, 1.0) per sample, x0 <- clamp(x0, -s, s) / s.
  With diffusers' default max value 1.0 this clamps pred_x0 to [-1, 1]. It needs pred_x0 first, so such
  a step launches the op twice.
- ``encode`` (DDIM inversion) feeds the real grid timesteps to the model; ``legacy_encode_timesteps=True``
  reproduces the CompVis-fork bug that feeds the loop index instead. For v models it converts the
  model output properly (upstream treats it as eps).

Extras (keyword-only): ``noise_mode="philox"`` draws the step noise inside the kernel from a seeded
Philox stream (seed drawn once per ``sample()`` from ``generator=`` or the global CPU generator; nothing
is drawn at eta = 0) — faster, deterministic per seed, but not upstream's stream. ``backend`` is passed
to ``ops.ddim_step``. ``cuda_graph=True`` captures model call + guidance + step once per (shape, dtype,
conditioning structure, guidance scale) and replays it (see ``ddim_fast.graphs``); on CPU it runs the
same static-buffer loop eagerly, and so it does on a GPU when the model cannot be captured (logged once;
CompVis ldm's UNet is such a model: its ``timestep_embedding`` copies a CPU ``arange`` to the GPU on every
call — build it with ``device=timesteps.device`` to get the graph). In the default ``noise_mode="torch"``
the per-step ``randn`` is drawn *outside* the graph, before each replay, into a static buffer (default
dtype, like upstream's ``torch.randn(x.shape)``): same global-generator draws, in the same order, as the
eager loop, hence the same numbers. With ``"philox"`` the kernel draws in the graph from the device
``rng_state`` and the step index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ddim_fast import _checks
from ddim_fast import graphs as _graphs
from ddim_fast import ops as _ops
from ddim_fast import reference as _reference
from ddim_fast import schedule as _schedule

logger = logging.getLogger(__name__)

__all__ = ["FastDDIMSampler", "slerp"]

NOISE_MODES = ("torch", "philox")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _cfg_cat(cond, uncond):
    """ldm's CFG batch: unconditional half first, for tensors, dicts (of tensors or lists) and lists."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict):
            raise TypeError("unconditional_conditioning must be a dict when conditioning is a dict, "
                            f"got {type(uncond).__name__}")
        out = {}
        for key, value in cond.items():
            if isinstance(value, list):
                out[key] = [torch.cat([uncond[key][i], value[i]]) for i in range(len(value))]
            else:
                out[key] = torch.cat([uncond[key], value])
        return out
    if isinstance(cond, list):
        if not isinstance(uncond, list):
            raise TypeError("unconditional_conditioning must be a list when conditioning is a list, "
                            f"got {type(uncond).__name__}")
        return [torch.cat([uncond[i], cond[i]]) for i in range(len(cond))]
    return torch.cat([uncond, cond])


def _fits_latents(shape: tuple, latent_shape: tuple) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``latent_shape`` without changing it (right-aligned dims
    equal or 1, no extra dims)."""
    return len(shape) <= len(latent_shape) and all(
        s in (1, target) for s, target in zip(reversed(shape), reversed(latent_shape)))


def _check_uncond_pairs(op: str, cond, uncond, path: str = "") -> None:
    """unconditional_conditioning mirrors conditioning: same structure, and each tensor the shape of its
    conditional counterpart (the guided batch is cat([uc, c]) and the model output is split in halves)."""
    c_name, u_name = f"conditioning{path}", f"unconditional_conditioning{path}"
    if isinstance(cond, dict):
        if not isinstance(uncond, dict):
            raise TypeError(f"{op}: {u_name} must be a dict when {c_name} is a dict, got {type(uncond).__name__}")
        for key, value in cond.items():
            if key not in uncond:
                raise ValueError(f"{op}: {u_name} lacks the key {key!r} that {c_name} has")
            _check_uncond_pairs(op, value, uncond[key], f"{path}[{key!r}]")
        return
    if isinstance(cond, list):
        if not isinstance(uncond, list):
            raise TypeError(f"{op}: {u_name} must be a list when {c_name} is a list, got {type(uncond).__name__}")
        if len(uncond) != len(cond):
            raise ValueError(f"{op}: {u_name} must be a list of {len(cond)} like {c_name}, got {len(uncond)}")
        for i, (c, u) in enumerate(zip(cond, uncond)):
            _check_uncond_pairs(op, c, u, f"{path}[{i}]")
        return
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{op}: {c_name} must be a tensor, a list or a dict of them, got {type(cond).__name__}")
    if not isinstance(uncond, torch.Tensor):
        raise TypeError(f"{op}: {u_name} must be a tensor like {c_name}, got {type(uncond).__name__}")
    if uncond.shape != cond.shape:
        raise ValueError(f"{op}: {u_name} must have the shape of {c_name} {tuple(cond.shape)} (one unconditional "
                         f"row per conditional row: the guided batch is cat([uc, c])), got {tuple(uncond.shape)}")


def _check_sampling_inputs(op: str, latent_shape, *, cond=None, uncond=None, guided: bool = False, mask=None,
                           x0=None) -> None:
    """The shapes a sampling run combines, checked before any work: no model call, no RNG draw (a rejected
    call leaves the global generator as it was), no schedule change. Upstream would fail deep inside on
    any of these with a bare broadcasting or cat error, or after the first steps.

    latent_shape: the latents' shape [B, C, H, W] (x_T's, or (batch_size, *shape)). With ``guided``
    (unconditional_conditioning given and a guidance scale != 1): ``uncond`` mirrors ``cond`` (tensor, list,
    or dict of tensors / lists; extra dict keys are ignored as upstream does) tensor for tensor, with equal
    shapes. ``mask`` (1 = keep x0): a real tensor that broadcasts to the latents' shape ([B, 1, H, W] is
    ldm's), needing ``x0`` of the latents' rank that broadcasts to it too (usually exactly [B, C, H, W])."""
    latent_shape = tuple(latent_shape)
    if guided:
        if cond is None:
            raise ValueError(f"{op}: unconditional_conditioning needs conditioning (guidance combines both)")
        _check_uncond_pairs(op, cond, uncond)
    if mask is None:
        return
    if x0 is None:
        raise ValueError(f"{op}: mask needs x0 (the latents to keep where mask == 1)")
    for name, value in (("mask", mask), ("x0", x0)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if mask.dtype == torch.bool or mask.is_complex():
        raise TypeError(f"{op}: mask must be a real tensor (1 = keep x0, 0 = sample; upstream computes 1 - mask), "
                        f"got {mask.dtype}; pass mask.float()")
    if not _fits_latents(tuple(mask.shape), latent_shape):
        hint = ""
        if mask.dim() >= 2 and len(latent_shape) >= 2 and tuple(mask.shape[-2:]) != latent_shape[-2:] \
                and mask.shape[-1] > latent_shape[-1]:
            hint = f" (a mask at image resolution must be resized to the latent resolution {latent_shape[-2:]})"
        raise ValueError(f"{op}: mask must broadcast to the latents' shape {latent_shape} without changing it "
                         f"(each dim equal or 1, e.g. [B, 1, H, W]), got {tuple(mask.shape)}{hint}")
    if x0.dim() != len(latent_shape) or not _fits_latents(tuple(x0.shape), latent_shape):
        raise ValueError(f"{op}: x0 (the latents kept where mask == 1) must have the latents' shape {latent_shape} "
                         f"(or size 1 in a dim), got {tuple(x0.shape)}")


def _is_guided(uncond, scale, ucg_schedule=None) -> bool:
    """Whether a run combines unconditional_conditioning with the conditioning (upstream's test: uc given and
    a scale != 1; any non-number scale counts, the scalar checks reject it)."""
    if uncond is None:
        return False
    scales = list(ucg_schedule) if ucg_schedule is not None else [scale]
    try:
        return any(bool(s != 1.0) for s in scales)
    except (TypeError, RuntimeError, ValueError):
        return True


def _check_generator(generator, batch: int):
    """None, one torch.Generator, or a list of ``batch`` generators (one per sample, as diffusers takes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"FastDDIMSampler: generator must be a torch.Generator or a list of {batch} "
                             f"(one per sample), got a list of {len(generator)}")
        return list(generator)
    raise TypeError(f"FastDDIMSampler: generator must be a torch.Generator, a list of them or None, "
                    f"got {type(generator).__name__}")


def randn_per_sample(shape, generator, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normals of ``shape`` [B, ...] in the default dtype: from the global RNG (generator None), one
    generator, or one generator per sample, each drawing its own row (so a sample's draws do not depend on
    its batch or its position in it). Drawn on each generator's device, then moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, out=out) if out is not None else torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(shape, generator=generator, device=generator.device)
    else:
        z = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
    z = z.to(device)
    return out.copy_(z) if out is not None else z


def _first_tensor(tree):
    while isinstance(tree, (list, tuple)):
        tree = tree[0]
    return tree


@dataclass
class _RunConfig:
    """Everything fixed for one sampling / decoding run."""

    table: torch.Tensor            # fp32 [R, 8], rows in run order
    timestep_rows: torch.Tensor    # int64 [R, 2B] model timesteps per row (both CFG halves)
    start_row: int
    num_steps: int
    prediction_type: str
    has_noise: bool                # some sigma in the run is non-zero
    temperature: float
    noise_dropout: float
    quantize: bool
    dynamic_threshold: float | None
    score_corrector: Any
    corrector_kwargs: dict
    rng_state: torch.Tensor | None  # philox mode only: int64 [2] (one stream) or [B, 2] (one per sample)
    generator: Any = None           # torch mode: None (global RNG, as ldm), a generator, or one per sample


class FastDDIMSampler:
    """Drop-in for ldm's ``DDIMSampler(model, schedule="linear", device=...)``.

    ``model`` is an ldm ``LatentDiffusion``-like object (see docs/design.md for what is read from it).
    ``device`` defaults to the device of ``model.betas`` (or ``model.device``); CPU works.
    Keyword-only extras: ``noise_mode`` ("torch" | "philox"), ``backend`` (passed to ``ops.ddim_step``),
    ``cuda_graph``, ``graph_cache_size`` (captured steps kept, LRU), ``legacy_x0_as_eps``.
    """

    def __init__(self, model, schedule: str = "linear", device=None, *, noise_mode: str = "torch",
                 backend: str = "auto", cuda_graph: bool = False, graph_cache_size: int = 4,
                 legacy_x0_as_eps: bool = False, **kwargs):
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if backend not in _ops.BACKENDS:
            raise ValueError(f"backend must be one of {_ops.BACKENDS}, got {backend!r}")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        if device is None:
            betas = getattr(model, "betas", None)
            device = betas.device if isinstance(betas, torch.Tensor) else getattr(model, "device", "cpu")
        self.device = torch.device(device)
        self.noise_mode = noise_mode
        self.backend = backend
        self.cuda_graph = bool(cuda_graph)
        self.legacy_x0_as_eps = bool(legacy_x0_as_eps)
        # Captured steps, one per (shapes, conditioning structure, guidance scale, options): see _graph_step.
        self.graph_cache = _graphs.GraphRunner(graph_cache_size)
        self._table: torch.Tensor | None = None
        self._table_original: torch.Tensor | None = None
        self._has_noise = False
        self._eta = 0.0

    # ---------------------------------------------------------------------------------------------
    # schedule
    # ---------------------------------------------------------------------------------------------

    def register_buffer(self, name: str, attr) -> None:
        """ldm's helper: tensors move to the sampler's device, other values are stored as they are."""
        if isinstance(attr, torch.Tensor) and attr.device != self.device:
            attr = attr.to(self.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Set upstream's schedule attributes (same names, dtypes and devices) and build the device
        coefficient table once. ``ddim_timesteps``: int64 numpy [S'] ascending (S' > S when S does not
        divide T; points >= T dropped); ``ddim_alphas`` fp32, ``ddim_alphas_prev`` float64 numpy,
        ``ddim_sigmas`` float64, ``ddim_sqrt_one_minus_alphas`` fp32, all [S']."""
        T = self.ddpm_num_timesteps
        ddim_eta = _checks.finite_float("FastDDIMSampler.make_schedule", "ddim_eta (eta)", ddim_eta, minimum=0.0)
        self.ddim_timesteps = _schedule.ldm_timesteps(ddim_num_steps, T, ddim_discretize,
                                                      name="FastDDIMSampler: S (ddim_num_steps)")
        if verbose:
            logger.info("Selected timesteps for ddim sampler: %s", self.ddim_timesteps)
            if T % ddim_num_steps:
                logger.info("S=%d does not divide T=%d: ldm's grid range(0, T, T // S) + 1 runs %d steps",
                            ddim_num_steps, T, len(self.ddim_timesteps))
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != T:
            raise ValueError(f"model.alphas_cumprod must have {T} entries (one per timestep), "
                             f"got {alphas_cumprod.shape[0]}")
        model_device = getattr(self.model, "device", self.device)

        def to_torch(x):
            return x.clone().detach().to(torch.float32).to(model_device)

        acp_cpu = alphas_cumprod.detach().cpu().to(torch.float32)
        self.register_buffer("betas", to_torch(self.model.betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(self.model.alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(torch.sqrt(acp_cpu)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(torch.sqrt(1.0 - acp_cpu)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(torch.log(1.0 - acp_cpu)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(torch.sqrt(1.0 / acp_cpu)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(torch.sqrt(1.0 / acp_cpu - 1)))

        # Upstream's mixed precision, reproduced: alphas gathered in fp32, alphas_prev as float64 numpy,
        # sigmas promoted to float64 (with 1 - a_t taken in fp32).
        ddim_alphas = acp_cpu[torch.from_numpy(self.ddim_timesteps)]
        ddim_alphas_prev = np.asarray([float(acp_cpu[0])] + acp_cpu[self.ddim_timesteps[:-1]].tolist())
        prev64 = torch.from_numpy(ddim_alphas_prev)
        ddim_sigmas = ddim_eta * torch.sqrt((1 - prev64) / (1 - ddim_alphas) * (1 - ddim_alphas / prev64))
        if verbose:
            logger.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", ddim_alphas, ddim_alphas_prev)
            logger.info("For the chosen value of eta, which is %s, this results in the following sigma_t "
                        "schedule for ddim sampler %s", ddim_eta, ddim_sigmas)
        self.register_buffer("ddim_sigmas", ddim_sigmas)
        self.register_buffer("ddim_alphas", ddim_alphas)
        self.register_buffer("ddim_alphas_prev", ddim_alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", torch.sqrt(1.0 - ddim_alphas))
        sigmas_original = ddim_eta * torch.sqrt((1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
                                                * (1 - self.alphas_cumprod / self.alphas_cumprod_prev))
        self.register_buffer("ddim_sigmas_for_original_num_steps", sigmas_original)

        # The device table, computed in float64 from the model's fp32 alphas_cumprod, rows in run order.
        params = _schedule.ldm_ddim_parameters(acp_cpu, self.ddim_timesteps, ddim_eta)
        self._table = _schedule.ldm_coefficient_table(params, device=self.device)
        self._table_original = None
        self._eta = float(ddim_eta)
        self._has_noise = bool(np.any(params.sigmas != 0))

    def _original_table(self) -> torch.Tensor:
        """Table for ``use_original_steps``: every t from T-1 down to 0, alpha_prev = alphas_cumprod_prev,
        sigma = ddim_sigmas_for_original_num_steps (upstream's values)."""
        if self._table_original is None:
            T = self.ddpm_num_timesteps
            order = np.arange(T - 1, -1, -1)
            acp = self.alphas_cumprod.detach().double().cpu().numpy()
            acp_prev = self.alphas_cumprod_prev.detach().double().cpu().numpy()
            sig = self.ddim_sigmas_for_original_num_steps.detach().double().cpu().numpy()
            self._table_original = _schedule.coefficient_table(order, acp[order], acp_prev[order], sig[order],
                                                               device=self.device)
        return self._table_original

    def _require_schedule(self):
        if self._table is None:
            raise RuntimeError("call make_schedule() (or sample()) before this method")

    def _prediction_type(self) -> str:
        param = getattr(self.model, "parameterization", "eps")
        if param == "x0" and self.legacy_x0_as_eps:
            return "epsilon"
        return _ops.canonical_prediction_type(param)

    @staticmethod
    def _timestep_rows(table: torch.Tensor, width: int) -> torch.Tensor:
        """int64 [R, width]: the model timestep of each row repeated (what torch.full(..., step) gives)."""
        t = table[:, _schedule.COL_TIMESTEP].round().to(torch.int64)
        return t[:, None].expand(t.shape[0], width).contiguous()

    # ---------------------------------------------------------------------------------------------
    # sample / ddim_sampling
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1.,
               noise_dropout=0., score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1., unconditional_conditioning=None,
               dynamic_threshold=None, ucg_schedule=None, **kwargs):
        """ldm's ``sample``: returns (samples [B, C, H, W], {'x_inter': [...], 'pred_x0': [...]}).

        Extra keyword: ``generator``: a torch.Generator, or a list of ``batch_size`` generators (one per
        sample, as diffusers takes them). It draws x_T (when ``x_T`` is None) and the per-step noise
        (``noise_mode="torch"``), or the Philox seed (``"philox"``; one seed per sample with a list), instead
        of the global RNG. With one generator per sample, sample i depends on its own generator only, not on
        the batch it is in.
        """
        if conditioning is not None:
            if isinstance(conditioning, dict):
                cbs = _first_tensor(conditioning[list(conditioning.keys())[0]]).shape[0]
                if cbs != batch_size:
                    logger.warning("Got %d conditionings but batch-size is %d", cbs, batch_size)
            elif isinstance(conditioning, list):
                for ctmp in conditioning:
                    if ctmp.shape[0] != batch_size:
                        logger.warning("Got %d conditionings but batch-size is %d", ctmp.shape[0], batch_size)
            elif conditioning.shape[0] != batch_size:
                logger.warning("Got %d conditionings but batch-size is %d", conditioning.shape[0], batch_size)

        C, H, W = shape
        size = (batch_size, C, H, W)
        _check_sampling_inputs("FastDDIMSampler.sample", size if x_T is None else x_T.shape, cond=conditioning,
                               uncond=unconditional_conditioning,
                               guided=_is_guided(unconditional_conditioning, unconditional_guidance_scale, ucg_schedule),
                               mask=mask, x0=x0)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        logger.info("Data shape for DDIM sampling is %s, eta %s", size, eta)
        return self.ddim_sampling(conditioning, size, callback=callback, img_callback=img_callback,
                                  quantize_denoised=quantize_x0, mask=mask, x0=x0, ddim_use_original_steps=False,
                                  noise_dropout=noise_dropout, temperature=temperature,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs, x_T=x_T,
                                  log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning,
                                  dynamic_threshold=dynamic_threshold, ucg_schedule=ucg_schedule,
                                  generator=kwargs.get("generator"))

    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, ddim_use_original_steps=False, callback=None, timesteps=None,
                      quantize_denoised=False, mask=None, x0=None, img_callback=None, log_every_t=100,
                      temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None,
                      ucg_schedule=None, generator: torch.Generator | None = None):
        """ldm's ``ddim_sampling``: the loop. ``timesteps`` (int) runs only the first part of the grid as
        upstream does. Returns (img, intermediates)."""
        self._require_schedule()
        _check_sampling_inputs("FastDDIMSampler.ddim_sampling", shape if x_T is None else x_T.shape, cond=cond,
                               uncond=unconditional_conditioning,
                               guided=_is_guided(unconditional_conditioning, unconditional_guidance_scale, ucg_schedule),
                               mask=mask, x0=x0)
        device = self.model.betas.device
        b = shape[0]
        generator = _check_generator(generator, b)
        img = randn_per_sample(shape, generator, device) if x_T is None else x_T

        if ddim_use_original_steps:
            table = self._original_table().to(device)
            total = self.ddpm_num_timesteps if timesteps is None else int(timesteps)
        else:
            table = self._table.to(device)
            n = self.ddim_timesteps.shape[0]
            total = n if timesteps is None else int(min(timesteps / n, 1) * n) - 1
        total = max(0, min(total, table.shape[0]))
        if ucg_schedule is not None and len(ucg_schedule) != total:
            raise ValueError(f"ucg_schedule must have one guidance scale per step ({total}), got {len(ucg_schedule)}")
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        logger.info("Running DDIM Sampling with %d timesteps", total)

        config = self._run_config(table, b, total, temperature=temperature, noise_dropout=noise_dropout,
                                  quantize=quantize_denoised, dynamic_threshold=dynamic_threshold,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                  original=ddim_use_original_steps, generator=generator)
        op = "FastDDIMSampler.ddim_sampling"
        if ucg_schedule is not None:
            scales = [_checks.finite_float(op, f"ucg_schedule[{i}]", ucg_schedule[i]) for i in range(total)]
        else:
            scales = [_checks.finite_float(op, "unconditional_guidance_scale", unconditional_guidance_scale)] * total
        img = self._loop(img, cond, unconditional_conditioning, scales, config, desc="DDIM Sampler",
                         callback=callback, img_callback=img_callback, log_every_t=log_every_t,
                         intermediates=intermediates, mask=mask, x0=x0)
        return img, intermediates

    def _run_config(self, table, batch, total, *, temperature=1., noise_dropout=0., quantize=False,
                    dynamic_threshold=None, score_corrector=None, corrector_kwargs=None, original=False,
                    generator=None) -> _RunConfig:
        prediction_type = self._prediction_type()
        op = "FastDDIMSampler"
        temperature = _checks.finite_float(op, "temperature", temperature)
        noise_dropout = _checks.finite_float(op, "noise_dropout", noise_dropout, minimum=0.0)
        if noise_dropout >= 1.0:
            raise ValueError(f"{op}: noise_dropout must be a probability in [0, 1), got {noise_dropout:g}")
        if score_corrector is not None and prediction_type != "epsilon":
            raise ValueError("score_corrector needs an eps-parameterised model (as upstream), got "
                             f"parameterization={getattr(self.model, 'parameterization', None)!r}")
        if noise_dropout and self.noise_mode == "philox":
            raise ValueError("noise_dropout needs noise_mode='torch' (dropout acts on a drawn noise tensor)")
        if dynamic_threshold is not None and not 0.0 < float(dynamic_threshold) <= 1.0:
            raise ValueError(f"dynamic_threshold must be a percentile ratio in (0, 1], got {dynamic_threshold!r}")
        if original:
            has_noise = bool(torch.any(self.ddim_sigmas_for_original_num_steps != 0))
        else:
            has_noise = self._has_noise
        generator = _check_generator(generator, batch)
        rng_state = None
        if self.noise_mode == "philox" and has_noise:
            # One seed per run from the generator (or the global CPU RNG); with one generator per sample, one
            # seed per sample: the kernel then draws row b's noise from row b's (seed, offset) alone.
            generators = generator if isinstance(generator, list) else [generator]
            seeds = [torch.randint(0, 2**62, (1,), generator=g, device=g.device if g is not None else "cpu").item()
                     for g in generators]
            rows = torch.tensor([[seed, 0] for seed in seeds], dtype=torch.int64)
            rng_state = (rows if isinstance(generator, list) else rows[0]).to(self.device)
        return _RunConfig(
            table=table, timestep_rows=self._timestep_rows(table, 2 * batch), start_row=table.shape[0] - total,
            num_steps=total, prediction_type=prediction_type, has_noise=has_noise, temperature=float(temperature),
            noise_dropout=float(noise_dropout), quantize=bool(quantize),
            dynamic_threshold=None if dynamic_threshold is None else float(dynamic_threshold),
            score_corrector=score_corrector, corrector_kwargs=dict(corrector_kwargs or {}), rng_state=rng_state,
            generator=generator)

    # ---------------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------------

    def _graph_eligible(self, config: _RunConfig) -> bool:
        if not self.cuda_graph:
            return False
        if config.quantize or config.dynamic_threshold is not None or config.score_corrector is not None:
            _graphs._log_once("sampler-unfused", "ddim_fast: quantize_x0 / dynamic_threshold / score_corrector "
                              "run unfused Python per step; the CUDA-graph path is off for such runs")
            return False
        return True

    def _loop(self, img, cond, uncond, scales, config: _RunConfig, *, desc, callback=None, img_callback=None,
              log_every_t=None, intermediates=None, mask=None, x0=None):
        total = config.num_steps
        batch = img.shape[0]
        step = torch.full((1,), config.start_row, dtype=torch.int64, device=img.device)
        use_graph = self._graph_eligible(config)
        # Half-precision latents with a model that answers in fp32 come out of the first step in fp32
        # (type promotion, as upstream): static buffers cannot change dtype, so that step runs eagerly and
        # the graph takes over with the dtype every later step has.
        eager_first_step = use_graph and img.dtype in (torch.float16, torch.bfloat16)
        cond_cfg = None
        if uncond is not None and any(s != 1.0 for s in scales):
            cond_cfg = _cfg_cat(cond, uncond)
        current_graph = None  # ((use_cfg, scale), step graph) of the last graphed step
        for i in tqdm(range(total), desc=desc, total=total):
            index = total - i - 1
            log_now = log_every_t is not None and (index % log_every_t == 0 or index == total - 1)
            want_pred = img_callback is not None or log_now
            scale = scales[i]
            use_cfg = uncond is not None and scale != 1.0
            if use_graph and not (eager_first_step and i == 0):
                current_graph, img, pred_x0 = self._graph_step(current_graph, img, step,
                                                               cond_cfg if use_cfg else cond, use_cfg, scale, config,
                                                               mask, x0)
                if want_pred:
                    pred_x0 = pred_x0.clone()
                    if log_now:
                        img_logged = img.clone()
            else:
                t_row = config.timestep_rows.index_select(0, step).view(-1)
                if mask is not None:
                    img = self.model.q_sample(x0, t_row[:batch]) * mask + (1.0 - mask) * img
                img, pred_x0 = self._step(img, cond, cond_cfg if use_cfg else None, t_row, step, scale, config,
                                          want_pred)
                step.add_(1)
                img_logged = img
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if log_now and intermediates is not None:
                intermediates["x_inter"].append(img_logged)
                intermediates["pred_x0"].append(pred_x0)
        if current_graph is not None:  # img is the graph's static buffer: the next run would overwrite it
            img = img.clone()
        return img

    def _draw_noise(self, x: torch.Tensor, config: _RunConfig, repeat_noise: bool = False,
                    out: torch.Tensor | None = None):
        """Upstream's per-step randn (always, to keep the RNG in step), dropout included; from the run's
        generator(s) when ``sample(generator=...)`` gave some, else the global RNG as ldm draws it.
        ``out`` (graph path): draw straight into that static buffer (same values as a fresh draw)."""
        if self.noise_mode != "torch":
            return None
        if out is not None and not repeat_noise:
            randn_per_sample(x.shape, config.generator, x.device, out=out)
            if config.noise_dropout > 0.0:
                out.copy_(torch.nn.functional.dropout(out, p=config.noise_dropout))
            return out
        if repeat_noise:
            one = randn_per_sample((1, *x.shape[1:]), None if config.generator is None else (
                config.generator if isinstance(config.generator, torch.Generator) else config.generator[0]), x.device)
            z = one.repeat(x.shape[0], *([1] * (x.dim() - 1)))
        else:
            z = randn_per_sample(x.shape, config.generator, x.device)
        if config.noise_dropout > 0.0:
            # dropout(sigma * z * T) == sigma * T * dropout(z): same RNG draws, same mask.
            z = torch.nn.functional.dropout(z, p=config.noise_dropout)
        return z if config.has_noise else None

    def _step(self, x, cond, cond_cfg, t_row, step, scale, config: _RunConfig, want_pred: bool,
              repeat_noise: bool = False):
        """One eager step. cond_cfg is cat([uc, c]) when this step uses guidance, else None.
        t_row int64 [2B] (or [B]); step int64 [1] (not bumped here). Returns (x_prev, pred_x0 | None)."""
        batch = x.shape[0]
        t = t_row[:batch]
        model = self.model
        if cond_cfg is not None:
            model_output = model.apply_model(torch.cat([x, x]), t_row[: 2 * batch], cond_cfg)
            guidance = scale
        else:
            model_output = model.apply_model(x, t, cond)
            guidance = None
        if config.score_corrector is not None:
            # Upstream combines guidance first and hands eps to the corrector: do that unfused.
            if guidance is not None:
                m_u, m_c = model_output.chunk(2)
                model_output = m_u + guidance * (m_c - m_u)
                guidance = None
            model_output = config.score_corrector.modify_score(model, model_output, x, t, cond,
                                                               **config.corrector_kwargs)
        common = dict(guidance_scale=guidance, prediction_type=config.prediction_type,
                      temperature=config.temperature, backend=self.backend)
        if config.quantize:
            z = self._draw_noise(x, config, repeat_noise)
            x_prev, x0_raw = _ops.ddim_step(x, model_output, config.table, step, noise=z,
                                            rng_state=config.rng_state, return_pred_x0=True, **common)
            x0_new, _, *_ = model.first_stage_model.quantize(x0_raw)
            if config.dynamic_threshold is not None:
                s = _reference.dynamic_threshold(x0_new, config.dynamic_threshold, 1.0).to(x0_new.dtype)
                s = s.reshape(-1, *([1] * (x0_new.dim() - 1)))
                x0_new = torch.minimum(torch.maximum(x0_new, -s), s) / s
            # x_prev is linear in x0 with coefficient sqrt(a_prev): swap the raw x0 for the new one.
            sqrt_a_prev = config.table.index_select(0, step)[:, _schedule.COL_SQRT_ALPHA_PREV]
            x_prev = x_prev + sqrt_a_prev.reshape(*([1] * x.dim())).to(x_prev.dtype) * (x0_new - x0_raw)
            return x_prev, x0_new
        if config.dynamic_threshold is not None:
            _, x0_raw = _ops.ddim_step(x, model_output, config.table, step, return_pred_x0=True, **common)
            s = _reference.dynamic_threshold(x0_raw, config.dynamic_threshold, 1.0).to(torch.float32)
            z = self._draw_noise(x, config, repeat_noise)
            return _ops.ddim_step(x, model_output, config.table, step, x0_threshold=s, noise=z,
                                  rng_state=config.rng_state, return_pred_x0=True, **common)
        z = self._draw_noise(x, config, repeat_noise)
        result = _ops.ddim_step(x, model_output, config.table, step, noise=z, rng_state=config.rng_state,
                                return_pred_x0=want_pred, **common)
        return result if want_pred else (result, None)

    # ---------------------------------------------------------------------------------------------
    # CUDA graphs
    # ---------------------------------------------------------------------------------------------

    def _graph_step(self, current, img, step, cond_in, use_cfg, scale, config: _RunConfig, mask, x0):
        """Run one step through a captured (or, on CPU, eager) static-buffer step. ``current`` is
        ``((use_cfg, scale), step_graph)`` of the previous step, or None: the graph is looked up again only when
        the guidance changes (ucg_schedule), and then x and the step row move over from the previous one.
        Returns (current, x, pred_x0) where x and pred_x0 are the step graph's static buffers."""
        batch = img.shape[0]
        if current is None or current[0] != (use_cfg, scale):
            previous = None if current is None else current[1]
            has_noise_buffer = self.noise_mode == "torch" and config.has_noise
            # The noise buffer has randn's default dtype, as the eager draw: the op then casts it to the
            # step dtype inside the graph exactly as it casts the eager z (fp16 latents included). It and
            # "pred" are outputs of the step: what a hit copies into them is overwritten before it is read.
            noise_buffer = torch.empty(img.shape, device=img.device) if has_noise_buffer else None
            values = {
                "x": img, "step": step if previous is None else previous.static_inputs["step"],
                "table": config.table, "timesteps": config.timestep_rows, "cond": cond_in, "noise": noise_buffer,
                "rng": config.rng_state, "pred": torch.empty_like(img),
            }
            key = ("ldm-step", id(self.model), _graphs.tree_signature(values), use_cfg,
                   scale if use_cfg else None, config.prediction_type, config.temperature, self.backend)
            # Falls back to the eager static-buffer step (logged) when the model cannot be captured; the
            # fallback is cached under the key too, so capture is not retried every sample() call.
            step_graph = self.graph_cache.prepare(key, values, self._make_graph_fn(batch, use_cfg, scale, config))
            current = ((use_cfg, scale), step_graph)
        runner = current[1]
        s = runner.static_inputs
        if mask is not None:
            t = s["timesteps"].index_select(0, s["step"]).view(-1)[:batch]
            s["x"].copy_(self.model.q_sample(x0, t) * mask + (1.0 - mask) * s["x"])
        # torch mode: drawn even at eta = 0 (then into no buffer), like upstream
        self._draw_noise(s["x"], config, out=s["noise"])
        runner.replay()
        return current, s["x"], s["pred"]

    def _make_graph_fn(self, batch: int, use_cfg: bool, scale: float, config: _RunConfig) -> Callable:
        model = self.model
        prediction_type, temperature, backend = config.prediction_type, config.temperature, self.backend

        def one_step(s):
            t_row = s["timesteps"].index_select(0, s["step"]).view(-1)
            x = s["x"]
            if use_cfg:
                model_output = model.apply_model(torch.cat([x, x]), t_row, s["cond"])
            else:
                model_output = model.apply_model(x, t_row[:batch], s["cond"])
            _ops.ddim_step(x, model_output, s["table"], s["step"], guidance_scale=scale if use_cfg else None,
                           prediction_type=prediction_type, noise=s["noise"], rng_state=s["rng"],
                           temperature=temperature, out=x, pred_x0_out=s["pred"], backend=backend)
            s["step"].add_(1)
            return None

        return one_step

    # ---------------------------------------------------------------------------------------------
    # p_sample_ddim, decode, encode, stochastic_encode
    # ---------------------------------------------------------------------------------------------

    def _row_of_index(self, index: int, use_original_steps: bool) -> tuple[torch.Tensor, int]:
        table = self._original_table() if use_original_steps else self._table
        return table, table.shape[0] - 1 - int(index)

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None):
        """ldm's single step at grid position ``index`` (model timestep ``t``, int64 [B]).
        Returns (x_prev, pred_x0), both [B, C, H, W]."""
        self._require_schedule()
        _check_sampling_inputs("FastDDIMSampler.p_sample_ddim", x.shape, cond=c, uncond=unconditional_conditioning,
                               guided=_is_guided(unconditional_conditioning, unconditional_guidance_scale))
        table, row = self._row_of_index(index, use_original_steps)
        config = self._run_config(table, x.shape[0], table.shape[0] - row, temperature=temperature,
                                  noise_dropout=noise_dropout, quantize=quantize_denoised,
                                  dynamic_threshold=dynamic_threshold, score_corrector=score_corrector,
                                  corrector_kwargs=corrector_kwargs, original=use_original_steps)
        step = torch.full((1,), row, dtype=torch.int64, device=x.device)
        unconditional_guidance_scale = _checks.finite_float("FastDDIMSampler.p_sample_ddim",
                                                            "unconditional_guidance_scale", unconditional_guidance_scale)
        use_cfg = unconditional_conditioning is not None and unconditional_guidance_scale != 1.0
        t_row = torch.cat([t, t]) if use_cfg else t
        cond_cfg = _cfg_cat(c, unconditional_conditioning) if use_cfg else None
        x_prev, pred_x0 = self._step(x, c, cond_cfg, t_row, step, float(unconditional_guidance_scale), config,
                                     want_pred=True, repeat_noise=repeat_noise)
        return x_prev, pred_x0

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1., unconditional_conditioning=None,
               use_original_steps=False, callback=None):
        """Denoise ``x_latent`` from grid position ``t_start`` down to 0 (img2img). Returns x [B, C, H, W]."""
        self._require_schedule()
        _check_sampling_inputs("FastDDIMSampler.decode", x_latent.shape, cond=cond, uncond=unconditional_conditioning,
                               guided=_is_guided(unconditional_conditioning, unconditional_guidance_scale))
        table = self._original_table() if use_original_steps else self._table
        total = max(0, min(int(t_start), table.shape[0]))
        logger.info("Running DDIM Sampling with %d timesteps", total)
        config = self._run_config(table, x_latent.shape[0], total, original=use_original_steps)
        scales = [_checks.finite_float("FastDDIMSampler.decode", "unconditional_guidance_scale",
                                       unconditional_guidance_scale)] * total
        return self._loop(x_latent, cond, unconditional_conditioning, scales, config, desc="Decoding image",
                          callback=callback)

    @torch.no_grad()
    def encode(self, x0, c, t_enc, use_original_steps=False, return_intermediates=None,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, callback=None,
               legacy_encode_timesteps=False):
        """DDIM inversion of ``x0`` [B, C, H, W] over the first ``t_enc`` grid points: the fused step with
        (a_t, a_next) in place of (a_t, a_prev) and sigma = 0. Returns (x_enc, {'x_encoded', 'intermediate_steps'
        [, 'intermediates']}) like upstream. ``legacy_encode_timesteps=True`` feeds the loop index as the
        model timestep (the CompVis-fork bug)."""
        self._require_schedule()
        n_ref = self.ddpm_num_timesteps if use_original_steps else self.ddim_timesteps.shape[0]
        if not 0 <= int(t_enc) <= n_ref:
            raise ValueError(f"t_enc must lie in [0, {n_ref}], got {t_enc}")
        num_steps = int(t_enc)
        if use_original_steps:
            alphas_next = self.alphas_cumprod.detach().double().cpu().numpy()[:num_steps]
            alphas = self.alphas_cumprod_prev.detach().double().cpu().numpy()[:num_steps]
            grid = np.arange(self.ddpm_num_timesteps)[:num_steps]
        else:
            alphas_next = self.ddim_alphas.detach().double().cpu().numpy()[:num_steps]
            alphas = np.asarray(self.ddim_alphas_prev[:num_steps], dtype=np.float64)
            grid = self.ddim_timesteps[:num_steps]
        model_t = np.arange(num_steps) if legacy_encode_timesteps else grid
        x_next = x0
        intermediates, inter_steps = [], []
        if num_steps > 0:
            table = _schedule.coefficient_table(model_t, alphas, alphas_next, None, device=self.device)
            batch = x0.shape[0]
            t_rows = self._timestep_rows(table, 2 * batch)
            step = torch.zeros(1, dtype=torch.int64, device=x0.device)
            prediction_type = self._prediction_type()
            unconditional_guidance_scale = _checks.finite_float("FastDDIMSampler.encode", "unconditional_guidance_scale",
                                                                unconditional_guidance_scale)
            use_cfg = unconditional_guidance_scale != 1.0
            if use_cfg and unconditional_conditioning is None:
                raise ValueError("encode: unconditional_guidance_scale != 1 needs unconditional_conditioning")
            _check_sampling_inputs("FastDDIMSampler.encode", x0.shape, cond=c, uncond=unconditional_conditioning,
                                   guided=use_cfg)
            cond_cfg = _cfg_cat(c, unconditional_conditioning) if use_cfg else None
            every = max(1, num_steps // return_intermediates) if return_intermediates else None
            for i in tqdm(range(num_steps), desc="Encoding image", total=num_steps):
                t_row = t_rows.index_select(0, step).view(-1)
                if use_cfg:
                    model_output = self.model.apply_model(torch.cat([x_next, x_next]), t_row, cond_cfg)
                else:
                    model_output = self.model.apply_model(x_next, t_row[:batch], c)
                x_next = _ops.ddim_step(x_next, model_output, table, step,
                                        guidance_scale=unconditional_guidance_scale if use_cfg else None,
                                        prediction_type=prediction_type, backend=self.backend)
                step.add_(1)
                if return_intermediates and i % every == 0 and i < num_steps - 1:
                    intermediates.append(x_next)
                    inter_steps.append(i)
                elif return_intermediates and i >= num_steps - 2:
                    intermediates.append(x_next)
                    inter_steps.append(i)
                if callback:
                    callback(i)
        out = {"x_encoded": x_next, "intermediate_steps": inter_steps}
        if return_intermediates:
            out["intermediates"] = intermediates
        return x_next, out

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        """q(x_t | x0) at grid position(s) ``t`` (int64 [B], an index into the DDIM grid, or into all T
        steps with use_original_steps). x0 [B, ...] -> [B, ...]."""
        self._require_schedule()
        if use_original_steps:
            sqrt_a, sqrt_1m = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_a, sqrt_1m = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = torch.randn_like(x0)
        t = t.to(sqrt_a.device)
        shape = (t.shape[0],) + (1,) * (x0.dim() - 1)
        coef_a = sqrt_a.gather(-1, t).reshape(shape).to(x0.device)
        coef_n = sqrt_1m.gather(-1, t).reshape(shape).to(x0.device)
        return coef_a * x0 + coef_n * noise


# --------------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------------


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation between latents, per sample.

    z0, z1: same shape [B, ...] (each sample is flattened to one vector) or [N] (one vector).
    alpha: a float, or a tensor of shape [] or [B] (one weight per sample); 0 gives z0, 1 gives z1.
    Where the two directions are nearly parallel or antiparallel (|cos| > ``dot_threshold``) the
    great circle is ill-defined or numerically unstable, so the result falls back to linear
    interpolation. Computed in float64, returned in z0's dtype. Returns a tensor shaped like z0.
    """
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor):
        raise TypeError("slerp: z0 and z1 must be tensors")
    if z0.shape != z1.shape:
        raise ValueError(f"slerp: z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.dim() == 0:
        raise ValueError("slerp: z0 must have at least one dimension")
    single = z0.dim() == 1
    a = z0.reshape(1, -1) if single else z0.reshape(z0.shape[0], -1)
    b = z1.reshape(1, -1) if single else z1.reshape(z1.shape[0], -1)
    a64, b64 = a.double(), b.to(a.device).double()
    w = torch.as_tensor(alpha, dtype=torch.float64, device=a.device)
    if w.dim() > 1 or (w.dim() == 1 and w.shape[0] not in (1, a.shape[0])):
        raise ValueError(f"slerp: alpha must be a float or a tensor of shape [] or [{a.shape[0]}], "
                         f"got shape {tuple(w.shape)}")
    w = w.reshape(-1, 1)
    norm_a = torch.linalg.vector_norm(a64, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b64, dim=1, keepdim=True)
    cos = (a64 * b64).sum(dim=1, keepdim=True) / (norm_a * norm_b).clamp_min(torch.finfo(torch.float64).tiny)
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin_theta = torch.sin(theta)
    linear = cos.abs() > dot_threshold
    safe_sin = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    c0 = torch.where(linear, 1.0 - w, torch.sin((1.0 - w) * theta) / safe_sin)
    c1 = torch.where(linear, w, torch.sin(w * theta) / safe_sin)
    out = c0 * a64 + c1 * b64
    return out.to(z0.dtype).reshape(z0.shape)
