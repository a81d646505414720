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

This module is the ldm facade (upstream's signatures, attributes and results). Below it, one job per
module (docs/design.md section 7): ``sampler_inputs`` (argument checks), ``sampler_schedule`` (the
attributes ``make_schedule`` sets and the coefficient tables), ``sampler_noise`` (x_T and the step
noise), ``sampler_plan`` (the ``RunPlan`` built once per run) and ``sampler_step`` (the ``StepExecutor``
that runs every step — sampling, decoding, ``p_sample_ddim`` and inversion — eagerly or through CUDA
graphs, and the sampling and inversion loops over it); ``ddim_fast.guidance`` holds the guided model call
shared with the diffusers side.

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
conditioning structure, guidance scale) and replays it in ``sample``, ``decode`` and ``encode`` (see
``ddim_fast.graphs``; runs with quantize_x0, dynamic_threshold or a score_corrector step eagerly); on CPU
it runs the same static-buffer loop eagerly, and so it does on a GPU when the model cannot be captured
(logged once; CompVis ldm's UNet is such a model: its ``timestep_embedding`` copies a CPU ``arange`` to
the GPU on every call — build it with ``device=timesteps.device`` to get the graph). In the default
``noise_mode="torch"`` the per-step ``randn`` is drawn *outside* the graph, before each replay, into a
static buffer (default dtype, like upstream's ``torch.randn(x.shape)``): same global-generator draws, in
the same order, as the eager loop, hence the same numbers. With ``"philox"`` the kernel draws in the
graph from the device ``rng_state`` and the step index.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ddim_fast import _checks
from ddim_fast import graphs as _graphs
from ddim_fast import ops as _ops
from ddim_fast import sampler_plan as _plan
from ddim_fast import sampler_schedule as _tables
from ddim_fast import sampler_step as _step
from ddim_fast import schedule as _schedule
from ddim_fast.guidance import cfg_batch
from ddim_fast.sampler_inputs import check_generator, check_sampling_inputs, is_guided, warn_conditioning_batch
from ddim_fast.sampler_noise import NOISE_MODES, randn_per_sample

logger = logging.getLogger(__name__)

__all__ = ["FastDDIMSampler", "slerp"]


class FastDDIMSampler:
    """Drop-in for ldm's ``DDIMSampler(model, schedule="linear", device=...)``.

    ``model`` is an ldm ``LatentDiffusion``-like object (what is read from it: docs/design.md section 7).
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
        # Captured steps, one per (shapes, conditioning structure, guidance scale, options): see
        # sampler_step.StepExecutor.graph_step.
        self.graph_cache = _graphs.GraphRunner(graph_cache_size)
        self._table: torch.Tensor | None = None
        self._table_original: torch.Tensor | None = None
        self._has_noise = False

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
        buffers = _tables.ldm_schedule_buffers(self.model, self.ddim_timesteps, ddim_eta, self.device)
        if verbose:
            logger.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", buffers["ddim_alphas"],
                        buffers["ddim_alphas_prev"])
            logger.info("For the chosen value of eta, which is %s, this results in the following sigma_t "
                        "schedule for ddim sampler %s", ddim_eta, buffers["ddim_sigmas"])
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self._table, self._has_noise = _tables.ldm_table(alphas_cumprod, self.ddim_timesteps, ddim_eta, self.device)
        self._table_original = None

    def _original_table(self) -> torch.Tensor:
        """Table for ``use_original_steps``: every t from T-1 down to 0, alpha_prev = alphas_cumprod_prev,
        sigma = ddim_sigmas_for_original_num_steps (upstream's values); built on first use."""
        if self._table_original is None:
            self._table_original = _tables.original_steps_table(
                self.alphas_cumprod, self.alphas_cumprod_prev, self.ddim_sigmas_for_original_num_steps, self.device)
        return self._table_original

    def _require_schedule(self):
        if self._table is None:
            raise RuntimeError("call make_schedule() (or sample()) before this method")

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
        warn_conditioning_batch(conditioning, batch_size, logger)
        C, H, W = shape
        size = (batch_size, C, H, W)
        check_sampling_inputs("FastDDIMSampler.sample", size if x_T is None else x_T.shape, cond=conditioning,
                              uncond=unconditional_conditioning,
                              guided=is_guided(unconditional_conditioning, unconditional_guidance_scale, ucg_schedule),
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
        check_sampling_inputs("FastDDIMSampler.ddim_sampling", shape if x_T is None else x_T.shape, cond=cond,
                              uncond=unconditional_conditioning,
                              guided=is_guided(unconditional_conditioning, unconditional_guidance_scale, ucg_schedule),
                              mask=mask, x0=x0)
        device = self.model.betas.device
        b = shape[0]
        generator = check_generator(generator, b)
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

        plan = self._run_plan(table, b, total, temperature=temperature, noise_dropout=noise_dropout,
                              quantize=quantize_denoised, dynamic_threshold=dynamic_threshold,
                              score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                              original=ddim_use_original_steps, generator=generator)
        op = "FastDDIMSampler.ddim_sampling"
        if ucg_schedule is not None:
            scales = [_checks.finite_float(op, f"ucg_schedule[{i}]", ucg_schedule[i]) for i in range(total)]
        else:
            scales = [_checks.finite_float(op, "unconditional_guidance_scale", unconditional_guidance_scale)] * total
        img = _step.sampling_loop(self._executor(plan), img, cond, unconditional_conditioning, scales,
                                  desc="DDIM Sampler", callback=callback, img_callback=img_callback,
                                  log_every_t=log_every_t, intermediates=intermediates, mask=mask, x0=x0)
        return img, intermediates

    def _run_plan(self, table, batch, total, *, original=False, **options) -> _plan.RunPlan:
        """The run plan of ``total`` steps over ``table``'s last rows (options: temperature, noise_dropout,
        quantize, dynamic_threshold, score_corrector, corrector_kwargs, generator), checked before any work."""
        if original:
            has_noise = bool(torch.any(self.ddim_sigmas_for_original_num_steps != 0))
        else:
            has_noise = self._has_noise
        return _plan.plan_run(self.model, table, batch, total, noise_mode=self.noise_mode, has_noise=has_noise,
                              backend=self.backend, device=self.device, legacy_x0_as_eps=self.legacy_x0_as_eps,
                              **options)

    def _executor(self, plan: _plan.RunPlan) -> _step.StepExecutor:
        return _step.StepExecutor(self.model, plan, self.graph_cache if self.cuda_graph else None)

    # ---------------------------------------------------------------------------------------------
    # p_sample_ddim, decode, encode, stochastic_encode
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1., unconditional_conditioning=None, dynamic_threshold=None):
        """ldm's single step at grid position ``index`` (model timestep ``t``, int64 [B]).
        Returns (x_prev, pred_x0), both [B, C, H, W]."""
        self._require_schedule()
        check_sampling_inputs("FastDDIMSampler.p_sample_ddim", x.shape, cond=c, uncond=unconditional_conditioning,
                              guided=is_guided(unconditional_conditioning, unconditional_guidance_scale))
        table = self._original_table() if use_original_steps else self._table
        row = table.shape[0] - 1 - int(index)
        plan = self._run_plan(table, x.shape[0], table.shape[0] - row, temperature=temperature,
                              noise_dropout=noise_dropout, quantize=quantize_denoised,
                              dynamic_threshold=dynamic_threshold, score_corrector=score_corrector,
                              corrector_kwargs=corrector_kwargs, original=use_original_steps)
        unconditional_guidance_scale = _checks.finite_float("FastDDIMSampler.p_sample_ddim",
                                                            "unconditional_guidance_scale", unconditional_guidance_scale)
        use_cfg = unconditional_conditioning is not None and unconditional_guidance_scale != 1.0
        cond_cfg = cfg_batch(c, unconditional_conditioning) if use_cfg else None
        executor = _step.StepExecutor(self.model, plan)  # one eager step: no graph
        return executor.single_step(x, c, cond_cfg, float(unconditional_guidance_scale), t, repeat_noise=repeat_noise)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1., unconditional_conditioning=None,
               use_original_steps=False, callback=None):
        """Denoise ``x_latent`` from grid position ``t_start`` down to 0 (img2img). Returns x [B, C, H, W]."""
        self._require_schedule()
        check_sampling_inputs("FastDDIMSampler.decode", x_latent.shape, cond=cond, uncond=unconditional_conditioning,
                              guided=is_guided(unconditional_conditioning, unconditional_guidance_scale))
        table = self._original_table() if use_original_steps else self._table
        total = max(0, min(int(t_start), table.shape[0]))
        logger.info("Running DDIM Sampling with %d timesteps", total)
        plan = self._run_plan(table, x_latent.shape[0], total, original=use_original_steps)
        scales = [_checks.finite_float("FastDDIMSampler.decode", "unconditional_guidance_scale",
                                       unconditional_guidance_scale)] * total
        return _step.sampling_loop(self._executor(plan), x_latent, cond, unconditional_conditioning, scales,
                                   desc="Decoding image", callback=callback)

    @torch.no_grad()
    def encode(self, x0, c, t_enc, use_original_steps=False, return_intermediates=None,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, callback=None,
               legacy_encode_timesteps=False):
        """DDIM inversion of ``x0`` [B, C, H, W] over the first ``t_enc`` grid points: the fused step with
        (a_t, a_next) in place of (a_t, a_prev) and sigma = 0, through the same step executor as sampling
        (CUDA graphs included). Returns (x_enc, {'x_encoded', 'intermediate_steps' [, 'intermediates']}) like
        upstream. ``legacy_encode_timesteps=True`` feeds the loop index as the model timestep (the
        CompVis-fork bug)."""
        self._require_schedule()
        n_ref = self.ddpm_num_timesteps if use_original_steps else self.ddim_timesteps.shape[0]
        if not 0 <= int(t_enc) <= n_ref:
            raise ValueError(f"t_enc must lie in [0, {n_ref}], got {t_enc}")
        num_steps = int(t_enc)
        x_next = x0
        intermediates, inter_steps = [], []
        if num_steps > 0:
            if use_original_steps:
                alphas, alphas_next = self.alphas_cumprod_prev, self.alphas_cumprod
                grid = np.arange(self.ddpm_num_timesteps)
            else:
                alphas, alphas_next, grid = self.ddim_alphas_prev, self.ddim_alphas, self.ddim_timesteps
            table = _tables.inversion_table(alphas, alphas_next, grid, num_steps,
                                            legacy_timesteps=legacy_encode_timesteps, device=self.device)
            plan = _plan.plan_inversion(table, _plan.prediction_type(self.model, self.legacy_x0_as_eps), self.backend)
            unconditional_guidance_scale = _checks.finite_float("FastDDIMSampler.encode", "unconditional_guidance_scale",
                                                                unconditional_guidance_scale)
            use_cfg = unconditional_guidance_scale != 1.0
            if use_cfg and unconditional_conditioning is None:
                raise ValueError("encode: unconditional_guidance_scale != 1 needs unconditional_conditioning")
            check_sampling_inputs("FastDDIMSampler.encode", x0.shape, cond=c, uncond=unconditional_conditioning,
                                  guided=use_cfg)
            scales = [unconditional_guidance_scale] * num_steps
            x_next, intermediates, inter_steps = _step.inversion_loop(
                self._executor(plan), x0, c, unconditional_conditioning if use_cfg else None, scales,
                return_intermediates=return_intermediates, callback=callback)
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
