"""The ldm sampler's schedule: the attributes ldm's ``make_schedule`` sets (upstream's names, dtypes, devices
and mixed precision) and the fp32 coefficient tables the fused step reads, indexed by **step** (row k = the
k-th step of the table's full run): the DDIM grid's (``make_schedule``), every training step's
(``use_original_steps``), and DDIM inversion's (``encode``). Tables are computed in float64 on the host and
rounded once to fp32 (``ddim_fast.schedule.coefficient_table``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ddim_fast import schedule as _schedule

__all__ = ["ldm_schedule_buffers", "ldm_table", "original_steps_table", "inversion_table"]


def ldm_schedule_buffers(model, ddim_timesteps: np.ndarray, eta: float, device) -> dict[str, Any]:
    """What ldm's ``make_schedule`` registers for the grid ``ddim_timesteps`` (int64 [S'] ascending), by name, in
    upstream's order. The model's schedule, fp32 [T] on the model's device: ``betas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev`` and the five derived ``sqrt_*`` / ``log_*`` tensors. The grid's, with upstream's
    mixed precision (alphas gathered in fp32, alphas_prev as float64 numpy, sigmas promoted to float64 with
    1 - a_t taken in fp32): ``ddim_sigmas`` float64, ``ddim_alphas`` fp32, ``ddim_alphas_prev`` float64 numpy,
    ``ddim_sqrt_one_minus_alphas`` fp32, all [S']; and ``ddim_sigmas_for_original_num_steps`` fp32 [T],
    computed on ``device`` (the sampler's, where ``register_buffer`` moves every tensor) as upstream does."""
    device = torch.device(device)
    model_device = getattr(model, "device", device)

    def to_torch(x):
        return x.clone().detach().to(torch.float32).to(model_device)

    def on_device(x):
        return x.to(device) if x.device != device else x

    acp_cpu = model.alphas_cumprod.detach().cpu().to(torch.float32)
    buffers: dict[str, Any] = {
        "betas": to_torch(model.betas),
        "alphas_cumprod": to_torch(model.alphas_cumprod),
        "alphas_cumprod_prev": to_torch(model.alphas_cumprod_prev),
        "sqrt_alphas_cumprod": to_torch(torch.sqrt(acp_cpu)),
        "sqrt_one_minus_alphas_cumprod": to_torch(torch.sqrt(1.0 - acp_cpu)),
        "log_one_minus_alphas_cumprod": to_torch(torch.log(1.0 - acp_cpu)),
        "sqrt_recip_alphas_cumprod": to_torch(torch.sqrt(1.0 / acp_cpu)),
        "sqrt_recipm1_alphas_cumprod": to_torch(torch.sqrt(1.0 / acp_cpu - 1)),
    }
    ddim_alphas = acp_cpu[torch.from_numpy(ddim_timesteps)]
    ddim_alphas_prev = np.asarray([float(acp_cpu[0])] + acp_cpu[ddim_timesteps[:-1]].tolist())
    prev64 = torch.from_numpy(ddim_alphas_prev)
    buffers["ddim_sigmas"] = eta * torch.sqrt((1 - prev64) / (1 - ddim_alphas) * (1 - ddim_alphas / prev64))
    buffers["ddim_alphas"] = ddim_alphas
    buffers["ddim_alphas_prev"] = ddim_alphas_prev
    buffers["ddim_sqrt_one_minus_alphas"] = torch.sqrt(1.0 - ddim_alphas)
    acp, acp_prev = on_device(buffers["alphas_cumprod"]), on_device(buffers["alphas_cumprod_prev"])
    buffers["ddim_sigmas_for_original_num_steps"] = eta * torch.sqrt((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))
    return buffers


def ldm_table(alphas_cumprod: torch.Tensor, ddim_timesteps: np.ndarray, eta: float, device
              ) -> tuple[torch.Tensor, bool]:
    """The table of the DDIM grid (rows in run order: the grid descending), computed in float64 from the
    model's fp32 ``alphas_cumprod`` [T]; and whether any of its sigmas is non-zero. fp32 [S', 8] on ``device``."""
    acp_cpu = alphas_cumprod.detach().cpu().to(torch.float32)
    params = _schedule.ldm_ddim_parameters(acp_cpu, ddim_timesteps, eta)
    return _schedule.ldm_coefficient_table(params, device=device), bool(np.any(params.sigmas != 0))


def _host64(values) -> np.ndarray:
    """float64 numpy copy of a tensor (any device) or array."""
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def original_steps_table(alphas_cumprod, alphas_cumprod_prev, sigmas, device) -> torch.Tensor:
    """The table of ``use_original_steps``: every t from T-1 down to 0, with a_prev = ``alphas_cumprod_prev``
    and sigma = ``sigmas`` (ldm's ``ddim_sigmas_for_original_num_steps``), all [T]. fp32 [T, 8]."""
    acp, acp_prev, sig = _host64(alphas_cumprod), _host64(alphas_cumprod_prev), _host64(sigmas)
    order = np.arange(acp.shape[0] - 1, -1, -1)
    return _schedule.coefficient_table(order, acp[order], acp_prev[order], sig[order], device=device)


def inversion_table(alphas, alphas_next, grid, num_steps: int, *, legacy_timesteps: bool, device) -> torch.Tensor:
    """The table of a DDIM inversion over the first ``num_steps`` grid points (ascending): row k moves from
    a = ``alphas[k]`` to a_next = ``alphas_next[k]`` with sigma 0, and the model sees ``grid[k]`` (or k with
    ``legacy_timesteps``, the CompVis-fork bug). fp32 [num_steps, 8]."""
    model_t = np.arange(num_steps) if legacy_timesteps else grid[:num_steps]
    return _schedule.coefficient_table(model_t, _host64(alphas)[:num_steps], _host64(alphas_next)[:num_steps], None,
                                       device=device)
