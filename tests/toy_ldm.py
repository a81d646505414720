"""A small deterministic ldm-like model for sampler tests (no weights to download).

``ToyLDM`` has what ldm's ``DDIMSampler`` reads from a ``LatentDiffusion`` model (docs/design.md section 7):
``num_timesteps``, ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``,
``sqrt_one_minus_alphas_cumprod`` (fp32 buffers computed in float64 like ldm's ``register_schedule``),
``device``, ``parameterization`` ("eps", "v" or "x0"), ``apply_model(x, t, cond)``,
``predict_eps_from_z_and_v``, ``predict_start_from_z_and_v``, ``q_sample`` and
``first_stage_model.quantize``. The schedule is SD's: ldm "linear" (linear in sqrt(beta)) from
0.00085 to 0.012 over 1000 steps.

The network is tiny but nonlinear in x, t and the conditioning, and the conditioning multiplies the
x path, so classifier-free guidance changes the result. Conditioning may be a tensor [B, L, D], a list
of such tensors, or an ldm-style dict {"c_crossattn": [ctx], "c_concat": [latent-shaped tensor]}.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ddim_fast import schedule as _schedule


class ToyQuantizer(nn.Module):
    """A VQ-style quantizer: snaps every value to a grid of step 1/8 (``quantize`` returns ldm's tuple
    (quantized, loss, info))."""

    def quantize(self, z: torch.Tensor):
        return torch.round(z * 8.0) / 8.0, torch.zeros((), device=z.device), (None, None, None)


class ToyLDM(nn.Module):
    """Deterministic ldm-like denoiser. x [B, C, H, W], t int64 [B], cond as documented in the module."""

    def __init__(self, channels: int = 4, context_dim: int = 8, parameterization: str = "eps",
                 num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        if parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"parameterization must be 'eps', 'v' or 'x0', got {parameterization!r}")
        self.parameterization = parameterization
        self.num_timesteps = int(num_timesteps)
        self.channels = channels
        self.context_dim = context_dim
        gen = torch.Generator().manual_seed(seed)

        def param(*shape, scale):
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float32) * scale)

        self.w_x = param(channels, channels, scale=0.4)
        self.w_t = param(channels, 16, scale=0.5)
        self.w_c = param(channels, context_dim, scale=0.6)
        self.w_out = param(channels, channels, scale=0.5)
        self.w_concat = param(channels, channels, scale=0.3)
        self.first_stage_model = ToyQuantizer()

        # ldm's register_schedule: float64 numpy math, stored as fp32 buffers.
        betas = _schedule.ldm_betas("linear", self.num_timesteps, linear_start, linear_end).numpy()
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        to_torch = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        self.register_buffer("posterior_mean_coef1", to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2",
                             to_torch((1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)))
        self.apply_model_calls = 0
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # ---------------------------------------------------------------------------------------------
    def _context_vector(self, cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-sample context vector [B, C], optional concat tensor [B, C, H, W])."""
        concat = None
        if isinstance(cond, dict):
            crossattn = cond.get("c_crossattn")
            concat_list = cond.get("c_concat")
            if concat_list is not None:
                concat = torch.cat(list(concat_list), dim=1) if isinstance(concat_list, list) else concat_list
            ctx = torch.cat(list(crossattn), dim=1) if isinstance(crossattn, list) else crossattn
        elif isinstance(cond, list):
            ctx = torch.cat(cond, dim=1)
        else:
            ctx = cond
        if ctx is None:
            raise ValueError("ToyLDM.apply_model: conditioning has no cross-attention context")
        vec = torch.tanh(ctx @ self.w_c.t()).mean(dim=1)  # [B, L, D] -> [B, C]
        return vec, concat

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = 8
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.to(torch.float32)[:, None] * freqs[None] / 10.0
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [B, 16]
        return emb @ self.w_t.t()  # [B, C]

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """x [B, C, H, W], t int64 [B], cond -> model output [B, C, H, W] (eps, v or x0 by parameterization)."""
        self.apply_model_calls += 1
        ctx_vec, concat = self._context_vector(cond)
        temb = self._time_embedding(t)
        h = torch.einsum("bchw,dc->bdhw", x, self.w_x)
        if concat is not None:
            h = h + torch.einsum("bchw,dc->bdhw", concat, self.w_concat)
        gate = 1.0 + 0.5 * torch.tanh(ctx_vec)[:, :, None, None]
        h = torch.tanh(h * gate + temb[:, :, None, None] + 0.3 * ctx_vec[:, :, None, None])
        return 0.8 * torch.einsum("bchw,dc->bdhw", h, self.w_out) + 0.2 * torch.sin(x)

    def forward(self, x, t, cond):
        return self.apply_model(x, t, cond)

    # ldm's DDPM helpers ------------------------------------------------------------------------
    @staticmethod
    def _extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return buffer.gather(-1, t).reshape(t.shape[0], *([1] * (ndim - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.dim()) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * noise)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t.dim()) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim()) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t.dim()) * v
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.dim()) * x_t)


def make_conditioning(batch: int, context_len: int = 5, context_dim: int = 8, seed: int = 1, device="cpu"):
    """(cond, uncond) context tensors [B, L, D] with fixed values."""
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, context_len, context_dim, generator=gen)
    uncond = torch.randn(batch, context_len, context_dim, generator=gen) * 0.1
    return cond.to(device), uncond.to(device)
