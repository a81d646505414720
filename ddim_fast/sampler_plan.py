"""The ldm sampler's run plan: everything fixed before the first step of a run (the coefficient table and its
model timesteps, the rows the run covers, the prediction type, the noise source, the options), built and
checked once per run, before any work.

Tables (``ddim_fast.sampler_schedule``) index by **step**: row k is the k-th step of the table's full run,
and a run of ``num_steps`` steps covers its last rows, from ``start_row = R - num_steps`` on
(``timesteps=`` and ``decode(t_start)`` run a tail of the grid, ``p_sample_ddim`` one row, an inversion
all of its table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ddim_fast import _checks
from ddim_fast import ops as _ops
from ddim_fast import schedule as _schedule
from ddim_fast.sampler_inputs import check_generator
from ddim_fast.sampler_noise import NoiseSource

__all__ = ["RunPlan", "plan_run", "plan_inversion", "prediction_type"]


@dataclass(frozen=True, eq=False)
class RunPlan:
    """One run of the fused step: sampling or decoding, a single ``p_sample_ddim`` step, or an inversion.

    table: fp32 [R, 8] on the sampling device, rows in run order. timesteps: int64 [R], the model
    timestep of each row (the table's timestep column; the model gets it expanded to its batch).
    start_row, num_steps: the run covers rows [start_row, start_row + num_steps). noise: where z comes
    from. Options of the unfused paths (quantize, dynamic_threshold, score_corrector): see
    ``ddim_fast.sampler_step``."""

    table: torch.Tensor
    timesteps: torch.Tensor
    start_row: int
    num_steps: int
    prediction_type: str
    noise: NoiseSource
    backend: str = "auto"
    temperature: float = 1.0
    quantize: bool = False
    dynamic_threshold: float | None = None
    score_corrector: Any = None
    corrector_kwargs: dict = field(default_factory=dict)

    @property
    def fused(self) -> bool:
        """Whether every step is the model call plus one fused launch (what a CUDA graph captures); the
        unfused options add Python work per step."""
        return not (self.quantize or self.dynamic_threshold is not None or self.score_corrector is not None)


def prediction_type(model, legacy_x0_as_eps: bool = False) -> str:
    """The op's prediction type for an ldm model's ``parameterization`` ("eps", "v", "x0"); "x0" models are
    treated as eps by upstream, which ``legacy_x0_as_eps`` reproduces."""
    param = getattr(model, "parameterization", "eps")
    if param == "x0" and legacy_x0_as_eps:
        return "epsilon"
    return _ops.canonical_prediction_type(param)


def _table_timesteps(table: torch.Tensor) -> torch.Tensor:
    """int64 [R]: the model timestep of each row (stored as an exact fp32 integer in the table)."""
    return table[:, _schedule.COL_TIMESTEP].round().to(torch.int64)


def plan_run(model, table: torch.Tensor, batch: int, num_steps: int, *, noise_mode: str, has_noise: bool,
             backend: str, device, legacy_x0_as_eps: bool = False, temperature=1., noise_dropout=0.,
             quantize=False, dynamic_threshold=None, score_corrector=None, corrector_kwargs=None,
             generator=None) -> RunPlan:
    """The plan of a sampling run over the last ``num_steps`` rows of ``table`` for a batch of ``batch``
    (``has_noise``: some sigma of the table is non-zero; ``device``: the sampler's, where the Philox state
    goes). Checks every option first (messages name the argument), then, in philox mode with noise, draws
    the run's seeds: a rejected call draws nothing."""
    pred_type = prediction_type(model, legacy_x0_as_eps)
    op = "FastDDIMSampler"
    temperature = _checks.finite_float(op, "temperature", temperature)
    noise_dropout = _checks.finite_float(op, "noise_dropout", noise_dropout, minimum=0.0)
    if noise_dropout >= 1.0:
        raise ValueError(f"{op}: noise_dropout must be a probability in [0, 1), got {noise_dropout:g}")
    if score_corrector is not None and pred_type != "epsilon":
        raise ValueError("score_corrector needs an eps-parameterised model (as upstream), got "
                         f"parameterization={getattr(model, 'parameterization', None)!r}")
    if noise_dropout and noise_mode == "philox":
        raise ValueError("noise_dropout needs noise_mode='torch' (dropout acts on a drawn noise tensor)")
    if dynamic_threshold is not None and not 0.0 < float(dynamic_threshold) <= 1.0:
        raise ValueError(f"dynamic_threshold must be a percentile ratio in (0, 1], got {dynamic_threshold!r}")
    generator = check_generator(generator, batch)
    noise = NoiseSource.for_run(noise_mode, has_noise, generator, noise_dropout, device)
    return RunPlan(
        table=table, timesteps=_table_timesteps(table), start_row=table.shape[0] - num_steps, num_steps=num_steps,
        prediction_type=pred_type, noise=noise, backend=backend, temperature=float(temperature),
        quantize=bool(quantize), dynamic_threshold=None if dynamic_threshold is None else float(dynamic_threshold),
        score_corrector=score_corrector, corrector_kwargs=dict(corrector_kwargs or {}))


def plan_inversion(table: torch.Tensor, pred_type: str, backend: str) -> RunPlan:
    """The plan of a DDIM inversion over every row of ``table`` (:func:`inversion_table`): no noise, no draws."""
    return RunPlan(table=table, timesteps=_table_timesteps(table), start_row=0, num_steps=table.shape[0],
                   prediction_type=pred_type, noise=NoiseSource("none"), backend=backend)
