"""An independent restatement of ldm's ``DDIMSampler`` numerics (CompVis / Stability-AI
``ldm/models/diffusion/ddim.py`` and ``make_ddim_timesteps`` / ``make_ddim_sampling_parameters``),
used as the oracle for ``ddim_fast.FastDDIMSampler``. Written for these tests, unfused, in fp32 torch
exactly where upstream computes in fp32 and float64 numpy where upstream does.

What it keeps from upstream, on purpose:
- the schedule: ``range(0, T, T // S) + 1`` (or "quad"), alphas gathered from the model's fp32
  ``alphas_cumprod``, alphas_prev starting with alphas_cumprod[0], sigmas from the mixed
  numpy-float64 / torch-fp32 expression;
- ``p_sample_ddim``'s order of operations (guidance combine, v -> eps, score corrector, pred_x0,
  quantize, dir_xt, noise = sigma * randn * temperature, dropout, sum);
- one ``torch.randn(x.shape)`` per step from the global generator, even at eta = 0;
- the CFG batch order (unconditional first) for tensors, dicts (of tensors or lists) and lists;
- callbacks, the intermediates logging rule, ``timesteps`` subsetting, ``decode``, ``encode``,
  ``stochastic_encode``.

Where upstream crashes or raises, the oracle does what ddim_fast documents instead (no numerics
change for the cases upstream can run): grid points >= T are dropped (S = 3); ``use_original_steps``
reads the sampler's own ``ddim_sigmas_for_original_num_steps``; ``dynamic_threshold`` applies
diffusers-style percentile thresholding (max value 1.0) to pred_x0; "x0" models predict the sample
unless ``legacy_x0_as_eps``; ``encode`` uses real timesteps unless ``legacy_encode_timesteps``.
"""

from __future__ import annotations

import numpy as np
import torch


def oracle_timesteps(S: int, T: int, discretize: str = "uniform") -> np.ndarray:
    if discretize == "uniform":
        grid = np.asarray(list(range(0, T, T // S)))
    else:
        grid = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(int)
    grid = grid + 1
    return grid[grid < T]


class OracleDDIM:
    def __init__(self, model, legacy_x0_as_eps: bool = False):
        self.model = model
        self.T = model.num_timesteps
        self.legacy_x0_as_eps = legacy_x0_as_eps

    # ---------------------------------------------------------------------------------------------
    def make_schedule(self, S, discretize="uniform", eta=0.0):
        m = self.model
        self.ddim_timesteps = oracle_timesteps(S, self.T, discretize)
        acp = m.alphas_cumprod
        acp_cpu = acp.cpu()
        self.alphas_cumprod = acp.clone().float()
        self.alphas_cumprod_prev = m.alphas_cumprod_prev.clone().float()
        alphas = acp_cpu[self.ddim_timesteps]  # fp32 torch
        alphas_prev = np.asarray([acp_cpu[0].item()] + acp_cpu[self.ddim_timesteps[:-1]].tolist())  # float64
        ap = torch.from_numpy(alphas_prev)
        # (1 - alphas) is an fp32 torch op upstream; the rest promotes to float64.
        sigmas = eta * torch.sqrt((1 - ap) / (1 - alphas) * (1 - alphas / ap))
        self.ddim_sigmas = sigmas.to(m.device)
        self.ddim_alphas = alphas.to(m.device)
        self.ddim_alphas_prev = alphas_prev
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - alphas).to(m.device)
        self.ddim_sigmas_for_original_num_steps = eta * torch.sqrt(
            (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
            * (1 - self.alphas_cumprod / self.alphas_cumprod_prev))

    # ---------------------------------------------------------------------------------------------
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None,
               quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0,
               score_corrector=None, corrector_kwargs=None, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None,
               ucg_schedule=None, discretize="uniform", use_original_steps=False, timesteps=None):
        self.make_schedule(S, discretize, eta)
        size = (batch_size, *shape)
        return self.ddim_sampling(conditioning, size, x_T=x_T, use_original_steps=use_original_steps,
                                  callback=callback, timesteps=timesteps, quantize_denoised=quantize_x0,
                                  mask=mask, x0=x0, img_callback=img_callback, log_every_t=log_every_t,
                                  temperature=temperature, noise_dropout=noise_dropout,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning,
                                  dynamic_threshold=dynamic_threshold, ucg_schedule=ucg_schedule)

    def ddim_sampling(self, cond, size, x_T=None, use_original_steps=False, callback=None, timesteps=None,
                      quantize_denoised=False, mask=None, x0=None, img_callback=None, log_every_t=100,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                      dynamic_threshold=None, ucg_schedule=None):
        device = self.model.betas.device
        b = size[0]
        img = torch.randn(size, device=device) if x_T is None else x_T
        if timesteps is None:
            grid = self.T if use_original_steps else self.ddim_timesteps
        elif not use_original_steps:
            n = self.ddim_timesteps.shape[0]
            grid = self.ddim_timesteps[: int(min(timesteps / n, 1) * n) - 1]
        else:
            grid = timesteps
        inter = {"x_inter": [img], "pred_x0": [img]}
        if use_original_steps:
            order, total = list(reversed(range(0, grid))), grid
        else:
            order, total = list(np.flip(grid)), grid.shape[0]
        for i, step in enumerate(order):
            index = total - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            if mask is not None:
                img = self.model.q_sample(x0, ts) * mask + (1.0 - mask) * img
            if ucg_schedule is not None:
                unconditional_guidance_scale = ucg_schedule[i]
            img, pred_x0 = self.p_sample_ddim(
                img, cond, ts, index, use_original_steps=use_original_steps, quantize_denoised=quantize_denoised,
                temperature=temperature, noise_dropout=noise_dropout, score_corrector=score_corrector,
                corrector_kwargs=corrector_kwargs, unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, dynamic_threshold=dynamic_threshold)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                inter["x_inter"].append(img)
                inter["pred_x0"].append(pred_x0)
        return img, inter

    @staticmethod
    def cfg_cat(c, uc):
        if isinstance(c, dict):
            return {k: ([torch.cat([uc[k][i], c[k][i]]) for i in range(len(c[k]))] if isinstance(c[k], list)
                        else torch.cat([uc[k], c[k]])) for k in c}
        if isinstance(c, list):
            return [torch.cat([uc[i], c[i]]) for i in range(len(c))]
        return torch.cat([uc, c])

    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False,
                      quantize_denoised=False, temperature=1.0, noise_dropout=0.0, score_corrector=None,
                      corrector_kwargs=None, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                      dynamic_threshold=None):
        m = self.model
        b, device = x.shape[0], x.device
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            out = m.apply_model(x, t, c)
        else:
            out_u, out_c = m.apply_model(torch.cat([x] * 2), torch.cat([t] * 2),
                                         self.cfg_cat(c, unconditional_conditioning)).chunk(2)
            out = out_u + unconditional_guidance_scale * (out_c - out_u)
        param = m.parameterization
        if param == "x0" and self.legacy_x0_as_eps:
            param = "eps"
        if use_original_steps:
            alphas, alphas_prev = m.alphas_cumprod, m.alphas_cumprod_prev
            sqrt_1m, sigmas = m.sqrt_one_minus_alphas_cumprod, self.ddim_sigmas_for_original_num_steps
        else:
            alphas, alphas_prev = self.ddim_alphas, self.ddim_alphas_prev
            sqrt_1m, sigmas = self.ddim_sqrt_one_minus_alphas, self.ddim_sigmas
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]), device=device)
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]), device=device)
        sigma_t = torch.full((b, 1, 1, 1), float(sigmas[index]), device=device)
        sqrt_1m_at = torch.full((b, 1, 1, 1), float(sqrt_1m[index]), device=device)
        if param == "v":
            e_t = m.predict_eps_from_z_and_v(x, t, out)
        elif param == "x0":
            e_t = (x - a_t.sqrt() * out) / sqrt_1m_at
        else:
            e_t = out
        if score_corrector is not None:
            e_t = score_corrector.modify_score(m, e_t, x, t, c, **(corrector_kwargs or {}))
        if param == "v":
            pred_x0 = m.predict_start_from_z_and_v(x, t, out)
        elif param == "x0":
            pred_x0 = out
        else:
            pred_x0 = (x - sqrt_1m_at * e_t) / a_t.sqrt()
        if quantize_denoised:
            pred_x0, _, *_ = m.first_stage_model.quantize(pred_x0)
        if dynamic_threshold is not None:
            s = torch.quantile(pred_x0.reshape(b, -1).abs().float(), dynamic_threshold, dim=1)
            s = s.clamp(min=1.0, max=1.0).reshape(b, 1, 1, 1)
            pred_x0 = torch.clamp(pred_x0, -s, s) / s
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        if repeat_noise:
            z = torch.randn((1, *x.shape[1:]), device=device).repeat(b, *([1] * (x.dim() - 1)))
        else:
            z = torch.randn(x.shape, device=device)
        noise = sigma_t * z * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0

    # ---------------------------------------------------------------------------------------------
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, callback=None):
        grid = np.arange(self.T) if use_original_steps else self.ddim_timesteps
        grid = grid[:t_start]
        total = grid.shape[0]
        x = x_latent
        for i, step in enumerate(np.flip(grid)):
            index = total - i - 1
            ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
            x, _ = self.p_sample_ddim(x, cond, ts, index, use_original_steps=use_original_steps,
                                      unconditional_guidance_scale=unconditional_guidance_scale,
                                      unconditional_conditioning=unconditional_conditioning)
            if callback:
                callback(i)
        return x

    def encode(self, x0, c, t_enc, use_original_steps=False, unconditional_guidance_scale=1.0,
               unconditional_conditioning=None, legacy_encode_timesteps=False):
        if use_original_steps:
            alphas_next = self.alphas_cumprod[:t_enc]
            alphas = self.alphas_cumprod_prev[:t_enc]
            grid = np.arange(self.T)[:t_enc]
        else:
            alphas_next = self.ddim_alphas[:t_enc]
            alphas = torch.tensor(self.ddim_alphas_prev[:t_enc])
            grid = self.ddim_timesteps[:t_enc]
        x = x0
        for i, step in enumerate(grid):
            t_val = i if legacy_encode_timesteps else int(step)
            t = torch.full((x0.shape[0],), t_val, device=x0.device, dtype=torch.long)
            if unconditional_guidance_scale == 1.0:
                eps = self.model.apply_model(x, t, c)
            else:
                eps_u, eps_c = self.model.apply_model(torch.cat((x, x)), torch.cat((t, t)),
                                                      torch.cat((unconditional_conditioning, c))).chunk(2)
                eps = eps_u + unconditional_guidance_scale * (eps_c - eps_u)
            a_next, a = alphas_next[i], alphas[i]
            x = (a_next / a).sqrt() * x + a_next.sqrt() * ((1 / a_next - 1).sqrt() - (1 / a - 1).sqrt()) * eps
        return x

    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        if use_original_steps:
            sa, s1m = self.model.sqrt_alphas_cumprod, self.model.sqrt_one_minus_alphas_cumprod
        else:
            sa, s1m = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = torch.randn_like(x0)
        shape = (t.shape[0],) + (1,) * (x0.dim() - 1)
        return sa.gather(-1, t).reshape(shape) * x0 + s1m.gather(-1, t).reshape(shape) * noise
