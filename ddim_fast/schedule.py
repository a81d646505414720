"""Noise schedules, timestep grids and the device coefficient table.

Everything here is computed in float64 on the host, once per schedule. The sampling loop then reads
one fp32 row of the coefficient table per step from device memory (see docs/design.md): no ``.item()``,
no per-step Python floats, one CUDA graph for every step.

Names follow their upstreams: ``ldm_*`` reproduce CompVis/Stability-AI ``ldm`` (``make_beta_schedule``,
``make_ddim_timesteps``, ``make_ddim_sampling_parameters``); ``diffusers_*`` reproduce diffusers'
``DDIMScheduler`` grids (``timestep_spacing``, ``steps_offset``). diffusers' beta schedules and zero-SNR rescale
run in diffusers' own fp32 arithmetic in ``ddim_fast.scheduler`` (its buffers must be bit-identical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Column numbers of the coefficient table; csrc/include/ddim_fast/step_math.h (TableColumn) mirrors them.
COL_TIMESTEP = 0
COL_SQRT_ALPHA = 1
COL_SQRT_ONE_MINUS_ALPHA = 2
COL_SQRT_ALPHA_PREV = 3
COL_DIR_COEF = 4
COL_SIGMA = 5
COL_ALPHA = 6
COL_ALPHA_PREV = 7
TABLE_COLUMNS = 8

LDM_BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt", "squaredcos_cap_v2")
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
LDM_DISCRETIZATIONS = ("uniform", "quad")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------
# Beta schedules (float64, shape [T])
# ----------------------------------------------------------------------------------------------------


def squaredcos_cap_v2_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta).

    Returns float64 [T].
    """
    num_timesteps = _check_positive_int("num_timesteps", num_timesteps)

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def ldm_betas(
    schedule: str = "linear",
    num_timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """ldm's ``make_beta_schedule``: float64 [T].

    ``linear`` is linear in sqrt(beta) (diffusers calls that ``scaled_linear``); ``sqrt_linear`` is
    linear in beta; ``sqrt`` is sqrt of a linear ramp; ``cosine`` is ldm's cosine with offset
    ``cosine_s``; ``squaredcos_cap_v2`` is accepted here too for convenience.
    SD1.x/2.x use ``linear`` with linear_start=0.00085, linear_end=0.012.
    """
    num_timesteps = _check_positive_int("num_timesteps", num_timesteps)
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    if schedule == "squaredcos_cap_v2":
        return squaredcos_cap_v2_betas(num_timesteps)
    raise ValueError(f"unknown ldm beta schedule {schedule!r}; expected one of {LDM_BETA_SCHEDULES}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s): float64 [T]."""
    return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0)


# ----------------------------------------------------------------------------------------------------
# Timestep grids
# ----------------------------------------------------------------------------------------------------


def ldm_timesteps(num_ddim_steps: int, num_train_timesteps: int = 1000, discretize: str = "uniform", *,
                  name: str = "num_ddim_steps") -> np.ndarray:
    """ldm's ``make_ddim_timesteps``: ascending int64 timesteps, each shifted by +1 as upstream does.

    ``uniform`` is ``range(0, T, T // S) + 1``: when S does not divide T that grid has more than S
    steps (S=7, T=1000 gives 8: [1, 143, ..., 995]). Upstream's grid can then end at T itself (S=3
    gives [1, 334, 667, 1000]) and crash with an IndexError; here entries >= T are dropped, so S=3
    samples [1, 334, 667]. ``quad`` is ``(linspace(0, sqrt(0.8 T), S) ** 2).astype(int) + 1``.
    ``name``: what errors call the step count (the caller's own argument name, e.g. the sampler's ``S``).
    """
    num_ddim_steps = _check_positive_int(name, num_ddim_steps)
    num_train_timesteps = _check_positive_int("num_train_timesteps", num_train_timesteps)
    if num_ddim_steps > num_train_timesteps:
        raise ValueError(f"{name} must be <= num_train_timesteps ({num_train_timesteps}), got {num_ddim_steps}")
    if discretize == "uniform":
        stride = num_train_timesteps // num_ddim_steps
        grid = np.arange(0, num_train_timesteps, stride, dtype=np.int64)
    elif discretize == "quad":
        grid = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_ddim_steps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"unknown ddim_discretize {discretize!r}; expected one of {LDM_DISCRETIZATIONS}")
    grid = grid + 1
    return grid[grid < num_train_timesteps]


@dataclass(frozen=True)
class LdmDdimParameters:
    """ldm's ``make_ddim_sampling_parameters`` output, all float64 [S] indexed like ``ddim_timesteps``
    (ascending: index 0 is the last step run)."""

    timesteps: np.ndarray
    alphas: np.ndarray
    alphas_prev: np.ndarray
    sigmas: np.ndarray


def ldm_ddim_parameters(alphas_cumprod_: torch.Tensor | np.ndarray, ddim_timesteps: np.ndarray, eta: float) -> LdmDdimParameters:
    """alpha_t, alpha_prev (the previous grid point; alpha_cumprod[0] before the first) and
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)), in float64."""
    abar = np.asarray(torch.as_tensor(alphas_cumprod_).detach().cpu().double().numpy())
    timesteps = np.asarray(ddim_timesteps, dtype=np.int64)
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError("ddim_timesteps must be a non-empty 1-D array")
    if timesteps.min() < 0 or timesteps.max() >= abar.size:
        raise ValueError(f"ddim_timesteps must lie in [0, {abar.size}), got [{timesteps.min()}, {timesteps.max()}]")
    alphas = abar[timesteps]
    alphas_prev = np.concatenate([abar[:1], abar[timesteps[:-1]]])
    sigmas = float(eta) * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return LdmDdimParameters(timesteps, alphas, alphas_prev, sigmas)


def diffusers_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """diffusers ``DDIMScheduler.set_timesteps`` grid: descending int64 [S].

    leading: arange(S) * (T // S) + steps_offset; trailing: round(arange(T, 0, -T/S)) - 1;
    linspace: round(linspace(0, T - 1, S)).
    """
    num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
    num_train_timesteps = _check_positive_int("num_train_timesteps", num_train_timesteps)
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps ({num_train_timesteps})"
        )
    if timestep_spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
    elif timestep_spacing == "leading":
        grid = (np.arange(0, num_inference_steps) * (num_train_timesteps // num_inference_steps)).round()[::-1]
        grid = grid + steps_offset
    elif timestep_spacing == "trailing":
        grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {DIFFUSERS_SPACINGS}")
    return np.ascontiguousarray(grid).astype(np.int64)


def previous_timesteps(
    timesteps: np.ndarray, num_train_timesteps: int, num_inference_steps: int, pairing: str = "upstream"
) -> np.ndarray:
    """The timestep each step of a descending grid moves to (-1 means "past the end": final alpha).

    ``upstream`` is what diffusers' ``DDIMScheduler.step`` computes, t - T // S, whatever the spacing
    (wrong for ``linspace`` and for ``trailing`` when S does not divide T); ``grid`` takes the next grid
    point, which is what the grid means.
    """
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if pairing == "upstream":
        return timesteps - num_train_timesteps // num_inference_steps
    if pairing == "grid":
        return np.concatenate([timesteps[1:], np.array([-1], dtype=np.int64)])
    raise ValueError(f"pairing must be 'upstream' or 'grid', got {pairing!r}")


def alpha_at(alphas_cumprod_: torch.Tensor, timesteps: np.ndarray, outside: float) -> np.ndarray:
    """alpha_cumprod at each timestep (float64), ``outside`` where t < 0 or t >= T."""
    abar = torch.as_tensor(alphas_cumprod_).detach().cpu().double().numpy()
    t = np.asarray(timesteps, dtype=np.int64)
    inside = (t >= 0) & (t < abar.size)
    return np.where(inside, abar[np.clip(t, 0, abar.size - 1)], float(outside))


def ddim_sigmas(alphas: np.ndarray, alphas_prev: np.ndarray, eta: float) -> np.ndarray:
    """sigma_t = eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev)) (ldm's formula, diffusers' variance)."""
    alphas = np.asarray(alphas, dtype=np.float64)
    alphas_prev = np.asarray(alphas_prev, dtype=np.float64)
    return float(eta) * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))


# ----------------------------------------------------------------------------------------------------
# The coefficient table
# ----------------------------------------------------------------------------------------------------


def coefficient_table(
    timesteps: Sequence[int] | np.ndarray,
    alphas: Sequence[float] | np.ndarray,
    alphas_prev: Sequence[float] | np.ndarray,
    sigmas: Sequence[float] | np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The device coefficient table: fp32 [S, TABLE_COLUMNS], one row per step in the order the steps
    run (row k is what the k-th step reads: ``ops.ddim_step(..., row=k)``).

    All inputs are per step, in run order: the model timestep, alpha_cumprod at it, the alpha_cumprod
    the step moves to (a_next for inversion) and sigma (None = 0, deterministic DDIM / inversion).
    Square roots are taken in float64 and rounded once to fp32. 1 - a_prev - sigma^2 is clamped at 0
    (it is -1e-17 rather than 0 for eta = 1 at some steps in float64).
    """
    t = np.asarray(timesteps, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64)
    ap = np.asarray(alphas_prev, dtype=np.float64)
    s = np.zeros_like(a) if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    if not (t.ndim == a.ndim == ap.ndim == s.ndim == 1) or not (t.size == a.size == ap.size == s.size):
        raise ValueError(
            "timesteps, alphas, alphas_prev and sigmas must be 1-D and equally long, got sizes "
            f"{t.size}, {a.size}, {ap.size}, {s.size}"
        )
    if t.size == 0:
        raise ValueError("a coefficient table needs at least one step")
    if np.any((a < 0) | (a > 1)) or np.any((ap < 0) | (ap > 1)):
        raise ValueError("alphas and alphas_prev must lie in [0, 1]")
    table = np.zeros((t.size, TABLE_COLUMNS), dtype=np.float64)
    table[:, COL_TIMESTEP] = t
    table[:, COL_SQRT_ALPHA] = np.sqrt(a)
    table[:, COL_SQRT_ONE_MINUS_ALPHA] = np.sqrt(1.0 - a)
    table[:, COL_SQRT_ALPHA_PREV] = np.sqrt(ap)
    table[:, COL_DIR_COEF] = np.sqrt(np.maximum(1.0 - ap - s**2, 0.0))
    table[:, COL_SIGMA] = s
    table[:, COL_ALPHA] = a
    table[:, COL_ALPHA_PREV] = ap
    return torch.from_numpy(table).to(dtype=torch.float32, device=device).contiguous()


def ldm_coefficient_table(params: LdmDdimParameters, device=None) -> torch.Tensor:
    """The table for an ldm DDIM run: ldm iterates ``ddim_timesteps`` from the last to the first."""
    order = slice(None, None, -1)
    return coefficient_table(
        params.timesteps[order], params.alphas[order], params.alphas_prev[order], params.sigmas[order], device
    )


def step_index(step: int = 0, device=None) -> torch.Tensor:
    """The int64 [1] tensor of the op's ``row`` argument for a table in run order (row k = step k, as
    :func:`coefficient_table` builds them); bump it in place to advance."""
    return torch.tensor([step], dtype=torch.int64, device=device)
