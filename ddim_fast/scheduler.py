"""diffusers drop-ins: ``FastDDIMScheduler`` (``DDIMScheduler``) and ``FastDDIMInverseScheduler``
(``DDIMInverseScheduler``), whose ``step`` is one fused ``ddim_fast.ops.ddim_step`` launch.

Swap them into any diffusers pipeline::

    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)

Same config keys and defaults, same ``set_timesteps`` / ``step`` / ``add_noise`` / ``get_velocity`` results
(fp32: relative error ~1e-7 per step), same public tensors (``betas``, ``alphas``, ``alphas_cumprod`` —
bit-identical to diffusers' fp32 buffers —, ``final_alpha_cumprod``, ``timesteps``), same noise draws
(``randn_tensor`` with the caller's generator, exactly when diffusers draws).

How the step avoids host work: ``set_timesteps`` builds, on the host, a coefficient table with one fp32 row
*per training timestep* t in [0, T): row t holds the coefficients of the step that starts at t. The timestep
and the two alphas come from ``ddim_fast.schedule.coefficient_table`` (float64, rounded once to fp32); the
five step coefficients (sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sigma, sqrt(1 - a_prev - sigma^2)) are then
recomputed with diffusers' own fp32 arithmetic (``_FusedDDIMBase._match_diffusers_rounding``), so the kernel
reads the scalars diffusers' ``step`` computes, bit for bit. Every timestep diffusers accepts has a row and
the row index *is* the timestep: a timestep that arrives as a Python int (or CPU tensor) selects a cached
one-element device view, one that arrives as a device tensor (``for t in scheduler.timesteps`` on CUDA) is
reshaped in place — no ``.item()``, no host-to-device copy, no per-step sync. The table lives on the
sample's device after the first step (one copy), one table per ``eta`` (sigma depends on it).

Extensions (keyword-only, off by default so results stay diffusers'):

- ``step(model_output_2b, t, sample, guidance_scale=7.5)``: ``model_output_2b`` is the UNet output on
  ``cat([uncond, cond])`` ([2B, ...]); the classifier-free-guidance combine ``u + s (c - u)`` happens inside
  the kernel (no chunk copies, no combined tensor). Equals combining first, then stepping.
- ``timestep_pairing="grid"`` (constructor keyword and config key): diffusers' ``step`` moves from t to
  ``t - T // S`` whatever the spacing, which is not the next grid point for ``linspace`` nor for ``trailing``
  when S does not divide T. ``"grid"`` moves to the next grid point (the final alpha after the last one).
  The default ``"upstream"`` reproduces diffusers. diffusers' own classes ignore the key (with a warning)
  when they load a config that has it.
- :func:`graphed_denoise_loop`: a whole text-to-image denoising loop (UNet + guidance + step) captured once
  into a CUDA graph with ``ddim_fast.graphs`` and replayed per step; eager on CPU.

diffusers is optional: importing this module works without it; constructing the classes then raises an
ImportError that says what to install.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, Callable

import numpy as np
import torch

from ddim_fast import _checks, ops, reference
from ddim_fast import schedule as _schedule
from ddim_fast.guidance import guided_model_output

logger = logging.getLogger(__name__)

try:
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddim_inverse import DDIMInverseScheduler
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    from diffusers.utils.torch_utils import randn_tensor

    _DIFFUSERS_IMPORT_ERROR: ImportError | None = None
    _DDIM_COMPATIBLES = [entry.name for entry in KarrasDiffusionSchedulers]
except ImportError as _exc:  # diffusers is an optional dependency
    _DIFFUSERS_IMPORT_ERROR = _exc
    _DDIM_COMPATIBLES = ["DDIMScheduler"]
    DDIMSchedulerOutput = None  # type: ignore[assignment,misc]
    randn_tensor = None  # type: ignore[assignment]

    class _MissingDiffusers:
        """Placeholder base used when diffusers is missing: every entry point raises ImportError."""

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            _require_diffusers(cls.__name__)

        @classmethod
        def from_config(cls, *args, **kwargs):
            _require_diffusers(cls.__name__)

    class DDIMScheduler(_MissingDiffusers):  # type: ignore[no-redef]
        pass

    class DDIMInverseScheduler(_MissingDiffusers):  # type: ignore[no-redef]
        pass

    def register_to_config(init):  # type: ignore[no-redef]
        return init


__all__ = ["FastDDIMScheduler", "FastDDIMInverseScheduler", "graphed_denoise_loop", "TIMESTEP_PAIRINGS"]

TIMESTEP_PAIRINGS = ("upstream", "grid")


def _require_diffusers(what: str) -> None:
    if _DIFFUSERS_IMPORT_ERROR is not None:
        raise ImportError(
            f"{what} is a diffusers scheduler and needs the `diffusers` package (pip install diffusers); "
            f"importing it failed: {_DIFFUSERS_IMPORT_ERROR}"
        ) from _DIFFUSERS_IMPORT_ERROR


# --------------------------------------------------------------------------------------------------
# diffusers' fp32 buffers, reproduced bit for bit (pipelines read alphas_cumprod directly)
# --------------------------------------------------------------------------------------------------


def _rescale_zero_terminal_snr_fp32(betas: torch.Tensor) -> torch.Tensor:
    """Zero-terminal-SNR rescale in the buffer's own dtype with diffusers' operation order, so the fp32
    result is bit-identical to diffusers' (tests/test_schedule.py holds it to Lin et al.'s algorithm in float64)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _diffusers_fp32_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                          trained_betas, rescale_betas_zero_snr: bool) -> torch.Tensor:
    """The fp32 [T] betas diffusers' DDIM schedulers hold for this config."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Same Python doubles as diffusers' list, rounded once to fp32.
        betas = _schedule.squaredcos_cap_v2_betas(num_train_timesteps).to(torch.float32)
    else:
        raise ValueError(
            f"beta_schedule must be one of {_schedule.DIFFUSERS_BETA_SCHEDULES} (or pass trained_betas), "
            f"got {beta_schedule!r}"
        )
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr_fp32(betas)
    return betas


def _check_pairing(timestep_pairing: str) -> None:
    if timestep_pairing not in TIMESTEP_PAIRINGS:
        raise ValueError(f"timestep_pairing must be one of {TIMESTEP_PAIRINGS}, got {timestep_pairing!r}")


def _grid_point_below(grid: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """For each t, the largest grid timestep strictly below t, or -1 when there is none."""
    ascending = np.unique(np.asarray(grid, dtype=np.int64))
    pos = np.searchsorted(ascending, timesteps, side="left") - 1
    return np.where(pos >= 0, ascending[np.clip(pos, 0, None)], -1)


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _ddim_output(prev_sample: torch.Tensor, pred_original_sample: torch.Tensor):
    """``DDIMSchedulerOutput(prev_sample=..., pred_original_sample=...)`` for two tensors, built without the
    dataclass machinery of diffusers' ``BaseOutput.__post_init__`` (a third of the host time of a fused
    step at SD latent sizes). The result is the same object state: the two items in field order (what
    indexing, ``keys()`` and ``to_tuple()`` read) and the two attributes (tests/test_scheduler_diffusers.py
    compares it with the normal constructor)."""
    out = DDIMSchedulerOutput.__new__(DDIMSchedulerOutput)
    collections.OrderedDict.__setitem__(out, "prev_sample", prev_sample)
    collections.OrderedDict.__setitem__(out, "pred_original_sample", pred_original_sample)
    attributes = out.__dict__
    attributes["prev_sample"] = prev_sample
    attributes["pred_original_sample"] = pred_original_sample
    return out


class _FusedDDIMBase:
    """Shared machinery of both drop-ins (a mixin placed before the diffusers class in their bases): fp32
    buffers, the per-timestep coefficient tables and the row lookup. Every method a pipeline may call is
    defined here or in the concrete class; nothing of diffusers' own step runs."""

    order = 1
    _has_variance = False  # True for the forward scheduler (eta > 0 adds noise); inversion is deterministic

    # Subclasses set these in __init__ / set_timesteps.
    _row_alpha: np.ndarray  # float64 [T]: alpha_cumprod the step starting at t reads as "current"
    _row_alpha_prev: np.ndarray  # float64 [T]: alpha_cumprod that step moves to

    def _init_buffers(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                      rescale_betas_zero_snr, timestep_pairing):
        _check_pairing(timestep_pairing)
        self.betas = _diffusers_fp32_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                           rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # Host float64 copy for building tables (self.alphas_cumprod may be moved to a device by add_noise).
        self._abar_host = self.alphas_cumprod.double().numpy()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._tables: dict[tuple[float, torch.device], torch.Tensor] = {}
        self._row_index_cache: dict[torch.device, torch.Tensor] = {}
        self._row_views: dict[tuple[torch.device, Any], torch.Tensor] = {}

    # ---- tables ---------------------------------------------------------------------------------

    def _host_table(self, eta: float) -> torch.Tensor:
        key = (eta, torch.device("cpu"))
        table = self._tables.get(key)
        if table is None:
            rows = np.arange(self._row_alpha.size, dtype=np.int64)
            # Layout, timestep and alpha columns from the shared builder; the step coefficients (and sigma,
            # which depends on eta) are then filled with diffusers' own fp32 arithmetic.
            table = _schedule.coefficient_table(rows, self._row_alpha, self._row_alpha_prev)
            self._match_diffusers_rounding(table, eta)
            self._tables[key] = table
        return table

    def _match_diffusers_rounding(self, table: torch.Tensor, eta: float) -> None:
        """Overwrite the step coefficients of `table` with the values diffusers computes per step in fp32
        (same operations, same order), so the fused step sees bit-identical scalars. sigma_t = eta *
        sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) (0 for inversion).

        The float64-then-round values differ from those by an ulp or two, which is harmless except where
        diffusers' formula cancels: with zero-terminal SNR and eta > 0 the first step's
        1 - a_prev - sigma^2 is 0 in exact arithmetic but a few fp32 ulps upstream, and its square root
        (~3e-4) is what diffusers multiplies eps by. A negative difference (NaN upstream) becomes 0 here.
        """
        alpha = torch.from_numpy(self._row_alpha).to(torch.float32)
        alpha_prev = torch.from_numpy(self._row_alpha_prev).to(torch.float32)
        beta = 1 - alpha
        table[:, _schedule.COL_SQRT_ALPHA] = alpha**0.5
        table[:, _schedule.COL_SQRT_ONE_MINUS_ALPHA] = beta**0.5
        table[:, _schedule.COL_SQRT_ALPHA_PREV] = alpha_prev**0.5
        if self._has_variance and eta != 0.0:
            variance = ((1 - alpha_prev) / beta) * (1 - alpha / alpha_prev)
            sigma = torch.nan_to_num(eta * variance**0.5, nan=0.0, posinf=0.0)
        else:
            sigma = torch.zeros_like(alpha)
        table[:, _schedule.COL_SIGMA] = sigma
        table[:, _schedule.COL_DIR_COEF] = (1 - alpha_prev - sigma**2).clamp(min=0) ** 0.5

    def _table(self, eta: float, device: torch.device) -> torch.Tensor:
        """The fp32 [T, 8] table for this eta on `device`: built on the host once, copied once."""
        key = (eta, device)
        table = self._tables.get(key)
        if table is None:
            table = self._host_table(eta).to(device)
            self._tables[key] = table
        return table

    def _row_index(self, timestep, device: torch.device) -> torch.Tensor:
        """The int64 [1] tensor on `device` holding the table row of `timestep`, without a host sync.
        Host timesteps (ints, CPU tensors) map to cached one-element views of an arange on `device`: one
        dict lookup per step."""
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" and timestep.device == device:
                # Device-side lookup: the row is the timestep itself (elements of scheduler.timesteps).
                if timestep.numel() != 1:
                    raise ValueError(f"timestep must hold one value, got a tensor of shape {tuple(timestep.shape)}")
                if timestep.is_floating_point():
                    raise TypeError(f"timestep must be an integer tensor, got {timestep.dtype}")
                return timestep.reshape(1).to(torch.int64)
            if timestep.numel() != 1:
                raise ValueError(f"timestep must hold one value, got a tensor of shape {tuple(timestep.shape)}")
            # A CPU scalar (no device sync), or a tensor on another device than the sample (syncs, unavoidably).
            timestep = timestep.item()
        if isinstance(timestep, bool):  # True == 1 as a dict key: never let it reach the cache
            raise TypeError("timestep must be an int or an integer tensor, got bool")
        view = self._row_views.get((device, timestep))
        if view is not None:
            return view
        key = (device, timestep)
        if not isinstance(timestep, (int, np.integer)):
            if isinstance(timestep, float) and timestep.is_integer():
                timestep = int(timestep)
            else:
                raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        timestep = int(timestep)
        num_rows = self._row_alpha.size
        if not 0 <= timestep < num_rows:
            raise IndexError(f"timestep must lie in [0, {num_rows}) (num_train_timesteps), got {timestep}")
        index = self._row_index_cache.get(device)
        if index is None:
            index = torch.arange(num_rows, dtype=torch.int64, device=device)
            self._row_index_cache[device] = index
        view = index[timestep:timestep + 1]
        self._row_views[key] = view
        return view

    def _reset_tables(self) -> None:
        # Captured graph steps (FastDDIMScheduler.graph_step) read the table and the timesteps from their
        # own static buffers, refilled on every graph_step call, so they stay valid across set_timesteps:
        # a pipeline calling set_timesteps(S) before each image reuses its graph instead of recapturing.
        self._tables = {}

    # ---- diffusers API shared by both ---------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDIM does not scale the model input: returns `sample` unchanged."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _check_num_inference_steps(self, num_inference_steps) -> int:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        num_inference_steps = int(num_inference_steps)
        if num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {self.config.num_train_timesteps} as the unet model trained with this scheduler can only handle"
                f" maximal {self.config.num_train_timesteps} timesteps."
            )
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be > 0, got {num_inference_steps}")
        return num_inference_steps

    def _run_step(self, model_output, sample, table, row, *, guidance_scale, clip_range, thresholding,
                  use_clipped_model_output, noise):
        """One fused step (two launches with dynamic thresholding: x0 first, then the clamped step)."""
        prediction_type = self.config.prediction_type
        if prediction_type not in reference.PREDICTION_TYPES:
            raise ValueError(f"prediction_type given as {prediction_type} must be one of `epsilon`, `sample`, "
                             "or `v_prediction`")
        x0_threshold = None
        if thresholding:
            _, x0 = ops.ddim_step(sample, model_output, table, row, guidance_scale=guidance_scale,
                                  prediction_type=prediction_type, return_pred_x0=True)
            x0_threshold = reference.dynamic_threshold(
                x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value
            ).to(torch.float32).contiguous()
        return ops.ddim_step(sample, model_output, table, row, guidance_scale=guidance_scale,
                             prediction_type=prediction_type, clip_range=clip_range, x0_threshold=x0_threshold,
                             use_clipped_model_output=use_clipped_model_output, noise=noise, return_pred_x0=True)

    def _output(self, prev_sample, pred_original_sample, return_dict):
        if not return_dict:
            return prev_sample, pred_original_sample
        return _ddim_output(prev_sample, pred_original_sample)


# --------------------------------------------------------------------------------------------------
# FastDDIMScheduler
# --------------------------------------------------------------------------------------------------


class FastDDIMScheduler(_FusedDDIMBase, DDIMScheduler):
    """diffusers ``DDIMScheduler`` with a fused, sync-free ``step``. Same config keys and defaults, plus
    ``timestep_pairing`` ("upstream" = diffusers' t - T // S, "grid" = the next grid point).

    Public tensors: ``betas``/``alphas``/``alphas_cumprod`` fp32 [T] (bit-identical to diffusers'),
    ``final_alpha_cumprod`` (0-dim fp32), ``timesteps`` int64 [S] (descending), ``num_inference_steps``.
    """

    _compatibles = list(_DDIM_COMPATIBLES)
    _has_variance = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        timestep_pairing: str = "upstream",
    ):
        _require_diffusers(type(self).__name__)
        self._init_buffers(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                           rescale_betas_zero_snr, timestep_pairing)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final_alpha_host = float(self.final_alpha_cumprod)
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """diffusers' (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev) in fp32 (a_prev = final alpha for t < 0)."""
        alpha = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return ((1 - alpha_prev) / (1 - alpha)) * (1 - alpha / alpha_prev)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """diffusers' dynamic thresholding of a predicted x0 [B, ...] (same dtype out)."""
        s = reference.dynamic_threshold(sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        s = s.reshape(-1, *([1] * (sample.dim() - 1)))
        work = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        return (torch.clamp(work, -s, s) / s).to(sample.dtype)

    # add_noise / get_velocity: diffusers' DDIMScheduler has them, its DDIMInverseScheduler does not.
    @staticmethod
    def _broadcast_alpha(values: torch.Tensor, ndim: int) -> torch.Tensor:
        values = values.flatten()
        return values.reshape(values.shape[0], *([1] * (ndim - 1))) if ndim > 1 else values

    def _alpha_factors(self, like: torch.Tensor, timesteps: torch.Tensor):
        # Moved like diffusers does (it reassigns alphas_cumprod to the sample's device).
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        abar = self.alphas_cumprod.to(dtype=like.dtype)[timesteps.to(like.device)]
        sqrt_alpha = self._broadcast_alpha(abar**0.5, like.dim())
        sqrt_one_minus_alpha = self._broadcast_alpha((1 - abar) ** 0.5, like.dim())
        return sqrt_alpha, sqrt_one_minus_alpha

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise. original_samples/noise [B, ...],
        timesteps [B] (or one) -> [B, ...]."""
        _check_tensor("original_samples", original_samples)
        _check_tensor("noise", noise)
        sqrt_alpha, sqrt_one_minus_alpha = self._alpha_factors(original_samples, _check_tensor("timesteps", timesteps))
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) sample. sample/noise [B, ...], timesteps [B]."""
        _check_tensor("sample", sample)
        _check_tensor("noise", noise)
        sqrt_alpha, sqrt_one_minus_alpha = self._alpha_factors(sample, _check_tensor("timesteps", timesteps))
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The descending grid of ``num_inference_steps`` timesteps (``timestep_spacing``, ``steps_offset``) and
        the coefficient tables; ``timesteps`` and the eta = 0 table are put on `device`."""
        num_inference_steps = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        if cfg.timestep_spacing not in _schedule.DIFFUSERS_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_schedule.DIFFUSERS_SPACINGS}, "
                             f"got {cfg.timestep_spacing!r}")
        num_train = cfg.num_train_timesteps
        grid = _schedule.diffusers_timesteps(num_inference_steps, num_train, cfg.timestep_spacing, cfg.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(grid).to(device)

        # Row t = the step that starts at t, for every t the model can be called at.
        rows = np.arange(num_train, dtype=np.int64)
        if cfg.timestep_pairing == "upstream":
            prev = _schedule.previous_timesteps(rows, num_train, num_inference_steps, "upstream")
        else:
            prev = _grid_point_below(grid, rows)
        self._row_prev_timestep = prev
        self._row_alpha = self._abar_host
        self._row_alpha_prev = _schedule.alpha_at(self._abar_host, prev, outside=self._final_alpha_host)
        self._reset_tables()
        self._table(0.0, self.timesteps.device)  # the concrete device (cuda:0, not cuda) that samples report

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
    ):
        """One DDIM step from `timestep` (diffusers' ``DDIMScheduler.step``, fused into one kernel).

        model_output [B, ...] (or [2B, ...] = UNet(cat([uncond, cond])) with ``guidance_scale``: the
        classifier-free-guidance combine then happens in the kernel); sample [B, ...]; timestep an int or a
        one-element integer tensor (an element of ``self.timesteps``; on the sample's device it is used
        without a host sync). eta > 0 adds sigma * z with z = ``variance_noise`` [B, ...] or
        ``randn_tensor(..., generator=generator)`` drawn exactly as diffusers draws it.
        Returns ``DDIMSchedulerOutput(prev_sample [B, ...], pred_original_sample [B, ...])`` or that tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        _check_tensor("model_output", model_output)
        _check_tensor("sample", sample)
        eta = _checks.finite_float("FastDDIMScheduler.step", "eta", eta, minimum=0.0)
        if guidance_scale is not None:
            guidance_scale = _checks.finite_float("FastDDIMScheduler.step", "guidance_scale", guidance_scale,
                                                  optional=True)

        device = sample.device
        table = self._table(eta, device)
        row = self._row_index(timestep, device)

        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is None:
                # diffusers draws noise shaped like the (combined) model output.
                shape = sample.shape if guidance_scale is not None else model_output.shape
                variance_noise = randn_tensor(shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            noise = _check_tensor("variance_noise", variance_noise).to(device)

        cfg = self.config
        clip_range = None
        if not cfg.thresholding:
            if cfg.clip_sample:
                clip_range = float(cfg.clip_sample_range)
            elif use_clipped_model_output:
                # diffusers re-derives eps from x0 even when nothing was clipped; an infinite clip range makes
                # the kernel take that same path without changing x0.
                clip_range = math.inf
        prev_sample, pred_original_sample = self._run_step(
            model_output, sample, table, row, guidance_scale=guidance_scale, clip_range=clip_range,
            thresholding=cfg.thresholding, use_clipped_model_output=bool(use_clipped_model_output), noise=noise)
        return self._output(prev_sample, pred_original_sample, return_dict)


    # ---- CUDA graphs ------------------------------------------------------------------------------

    def graph_step(
        self,
        unet: Callable[..., Any],
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        guidance_scale: float | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        use_graph: bool = True,
    ):
        """One denoising step — UNet, classifier-free guidance and the fused DDIM step — as a replayable
        object (``ddim_fast.graphs.CapturedStep`` on CUDA, ``EagerStep`` elsewhere), loaded with these inputs
        and positioned at the first of ``self.timesteps``. Each ``replay()`` runs one step in place:
        ``static_inputs["x"]`` becomes x_prev and the device step index ``static_inputs["step"]`` advances.

        unet: called as ``unet(x, t, encoder_hidden_states=..., return_dict=False)[0]`` (diffusers'
        ``UNet2DConditionModel`` convention) with x [2B, C, H, W] = cat([x, x]) when ``guidance_scale`` is
        given (encoder_hidden_states [2B, L, D] = cat([uncond, cond])), else x [B, C, H, W]; t is an int64 [1]
        device tensor. latents [B, C, H, W]. With eta > 0 all per-step noise is drawn here, up front, with
        ``randn_tensor(latents.shape, generator=...)`` in step order — the draws diffusers' pipeline loop makes.
        Captured steps are cached on this scheduler per (shapes, dtypes, number of steps, unet, guidance
        scale, eta, prediction type, clipping); the table and timesteps are static inputs refilled here, so
        a cached step survives ``set_timesteps`` with the same number of steps. A unet that cannot be
        captured (it syncs the host) runs the same step eagerly (logged once). Call
        ``set_timesteps(S, device=latents.device)`` first.
        """
        from ddim_fast import graphs

        if self.num_inference_steps is None:
            raise ValueError("graph_step: call set_timesteps(num_inference_steps, device) first")
        _check_tensor("latents", latents)
        _check_tensor("encoder_hidden_states", encoder_hidden_states)
        if self.config.thresholding:
            raise ValueError("graph_step: dynamic thresholding needs a data-dependent quantile per step; use step()")
        eta = _checks.finite_float("FastDDIMScheduler.graph_step", "eta", eta, minimum=0.0)
        if guidance_scale is not None:
            guidance_scale = _checks.finite_float("FastDDIMScheduler.graph_step", "guidance_scale", guidance_scale,
                                                  optional=True)
        device = latents.device
        guided = guidance_scale is not None
        batch = latents.shape[0]
        if encoder_hidden_states.shape[0] != (2 * batch if guided else batch):
            raise ValueError(
                f"graph_step: encoder_hidden_states must have batch {2 * batch if guided else batch} "
                f"({'cat([uncond, cond]) with guidance' if guided else 'no guidance'}), "
                f"got {encoder_hidden_states.shape[0]}"
            )
        table = self._table(eta, device)
        timesteps = self.timesteps.to(device=device, dtype=torch.int64)
        num_steps = timesteps.shape[0]
        noise = None
        if eta > 0:
            model_dtype = getattr(unet, "dtype", latents.dtype)
            noise = torch.stack([randn_tensor(latents.shape, generator=generator, device=device, dtype=model_dtype)
                                 for _ in range(num_steps)])
        values = {"x": latents, "step": torch.zeros(1, dtype=torch.int64, device=device),
                  "cond": encoder_hidden_states, "noise": noise, "table": table, "timesteps": timesteps}
        cfg = self.config
        clip_range = float(cfg.clip_sample_range) if cfg.clip_sample else None
        prediction_type = cfg.prediction_type

        def unet_output(model_input, t, cond):
            return unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]

        @torch.no_grad()
        def one_step(static):
            x, step = static["x"], static["step"]
            t = static["timesteps"].index_select(0, step)  # the row of the table is the timestep itself
            model_output = guided_model_output(unet_output, x, t, static["cond"], guided)
            step_noise = None if static["noise"] is None else static["noise"].index_select(0, step).squeeze(0)
            ops.ddim_step(x, model_output, static["table"], t, guidance_scale=guidance_scale,
                          prediction_type=prediction_type, clip_range=clip_range, noise=step_noise, out=x)
            step.add_(1)

        if getattr(self, "_graph_runner", None) is None:
            self._graph_runner = graphs.GraphRunner(2)
        # Everything one_step bakes in: shapes/dtypes (signature), the unet, and the Python scalars.
        key = (graphs.tree_signature(values), id(unet), guidance_scale, eta, prediction_type, clip_range,
               bool(use_graph))
        return self._graph_runner.prepare(key, values, one_step, use_graph=use_graph)


def graphed_denoise_loop(
    scheduler: FastDDIMScheduler,
    unet: Callable[..., Any],
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    guidance_scale: float | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    use_graph: bool = True,
) -> torch.Tensor:
    """The whole DDIM denoising loop over ``scheduler.timesteps`` (what a text-to-image pipeline's loop does:
    UNet on cat([x, x]), guidance, step), one CUDA-graph replay per step with no host work in between.

    Shapes as in :meth:`FastDDIMScheduler.graph_step`. Returns the final latents [B, C, H, W] (a new tensor).
    Results equal diffusers' loop with the same inputs and generator (up to fp32 rounding).
    """
    if not isinstance(scheduler, FastDDIMScheduler):
        raise TypeError(f"scheduler must be a FastDDIMScheduler, got {type(scheduler).__name__}")
    runner = scheduler.graph_step(unet, latents, encoder_hidden_states, guidance_scale=guidance_scale, eta=eta,
                                  generator=generator, use_graph=use_graph)
    with torch.no_grad():
        for _ in range(scheduler.timesteps.shape[0]):
            runner.replay()
    return runner.static_inputs["x"].clone()


# --------------------------------------------------------------------------------------------------
# FastDDIMInverseScheduler
# --------------------------------------------------------------------------------------------------


class FastDDIMInverseScheduler(_FusedDDIMBase, DDIMInverseScheduler):
    """diffusers ``DDIMInverseScheduler`` (DDIM inversion: x_t -> x_next with sigma = 0), fused.

    ``step(model_output, t, sample)`` moves *to* timestep t from the "current" timestep
    min(t - T // S, T - 1) (upstream) or the previous grid point (``timestep_pairing="grid"``); a current
    timestep below 0 reads ``initial_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alphas_cumprod[0]).
    ``timesteps`` is ascending. Same kernel as the forward step with (a_current, a_t) and sigma = 0.
    """

    _compatibles = ["DDIMInverseScheduler"]
    ignore_for_config = ["kwargs"]
    _deprecated_kwargs = ["set_alpha_to_zero"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        timestep_pairing: str = "upstream",
        **kwargs,
    ):
        _require_diffusers(type(self).__name__)
        if kwargs.get("set_alpha_to_zero", None) is not None:
            logger.warning("FastDDIMInverseScheduler: `set_alpha_to_zero` is deprecated; use `set_alpha_to_one`")
            set_alpha_to_one = kwargs["set_alpha_to_zero"]
        self._init_buffers(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                           rescale_betas_zero_snr, timestep_pairing)
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._initial_alpha_host = float(self.initial_alpha_cumprod)
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps).copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The ascending grid (``leading`` + ``steps_offset`` or ``trailing``) and the coefficient table."""
        num_inference_steps = self._check_num_inference_steps(num_inference_steps)
        cfg = self.config
        if cfg.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"{cfg.timestep_spacing} is not supported. Please make sure to choose one of "
                             "'leading' or 'trailing'.")
        num_train = cfg.num_train_timesteps
        grid = _schedule.diffusers_timesteps(num_inference_steps, num_train, cfg.timestep_spacing,
                                             cfg.steps_offset)[::-1].copy()
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(grid).to(device)

        # Row t = the inversion step that ends at t, starting from the "current" timestep.
        rows = np.arange(num_train, dtype=np.int64)
        if cfg.timestep_pairing == "upstream":
            current = np.minimum(rows - num_train // num_inference_steps, num_train - 1)
        else:
            current = _grid_point_below(grid, rows)
        self._row_current_timestep = current
        self._row_alpha = _schedule.alpha_at(self._abar_host, current, outside=self._initial_alpha_host)
        self._row_alpha_prev = self._abar_host
        self._reset_tables()
        self._table(0.0, self.timesteps.device)  # the concrete device (cuda:0, not cuda) that samples report

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        guidance_scale: float | None = None,
    ):
        """One inversion step to `timestep` (diffusers' ``DDIMInverseScheduler.step``, fused).

        model_output [B, ...] (or [2B, ...] with ``guidance_scale``), sample [B, ...] ->
        ``DDIMSchedulerOutput(prev_sample [B, ...] (the noisier sample), pred_original_sample [B, ...])``.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        _check_tensor("model_output", model_output)
        _check_tensor("sample", sample)
        if guidance_scale is not None:
            guidance_scale = _checks.finite_float("FastDDIMInverseScheduler.step", "guidance_scale", guidance_scale,
                                                  optional=True)
        device = sample.device
        table = self._table(0.0, device)
        row = self._row_index(timestep, device)
        clip_range = float(self.config.clip_sample_range) if self.config.clip_sample else None
        prev_sample, pred_original_sample = self._run_step(
            model_output, sample, table, row, guidance_scale=guidance_scale, clip_range=clip_range,
            thresholding=False, use_clipped_model_output=False, noise=None)
        return self._output(prev_sample, pred_original_sample, return_dict)
