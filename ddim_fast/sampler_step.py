"""The ldm sampler's step executor: one step = the model call (guided or not, ``ddim_fast.guidance``) and the
fused ``ops.ddim_step``, run eagerly or through a ``graphs.GraphRunner``; sampling, decoding, ``p_sample_ddim``
and DDIM inversion (``encode``) all step through it.

The step index is a device int64 [1] tensor (the table row), bumped on the device after each step: the loop
does no ``.item()`` and no host sync. The model gets the row's timestep from ``RunPlan.timesteps`` expanded
to its batch (a view, as diffusers' UNet expands its timestep).

Unfused paths (eager only, they need Python per step): ``quantize`` (ldm's ``quantize_x0``: pred_x0 through
``first_stage_model.quantize``, then x_prev corrected by sqrt(a_prev) (x0_new - x0), x_prev being linear in
x0), ``dynamic_threshold`` (pred_x0 first, its per-sample percentile, then the thresholded step: two
launches), ``score_corrector`` (guidance combined first, as upstream, then ``modify_score`` on eps).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from tqdm import tqdm

from ddim_fast import graphs as _graphs
from ddim_fast import ops as _ops
from ddim_fast import reference as _reference
from ddim_fast import schedule as _schedule
from ddim_fast.guidance import cfg_batch, combine, guided_model_output
from ddim_fast.sampler_plan import RunPlan

__all__ = ["StepExecutor", "sampling_loop", "inversion_loop"]

_HALF = (torch.float16, torch.bfloat16)


class StepExecutor:
    """Runs the steps of one :class:`~ddim_fast.sampler_plan.RunPlan` with one ldm model (``apply_model``,
    ``q_sample`` for masks, ``first_stage_model.quantize`` for ``quantize``).

    graphs: a :class:`~ddim_fast.graphs.GraphRunner` to run fused steps through (one captured step per
    shape, conditioning structure and guidance scale; on CPU, or for a model that cannot be captured, the
    same static-buffer step eagerly), or None for eager steps. A plan with unfused options steps eagerly
    (logged once)."""

    def __init__(self, model, plan: RunPlan, graphs: _graphs.GraphRunner | None = None):
        if graphs is not None and not plan.fused:
            _graphs._log_once("sampler-unfused", "ddim_fast: quantize_x0 / dynamic_threshold / score_corrector "
                              "run unfused Python per step; the CUDA-graph path is off for such runs")
            graphs = None
        self.model = model
        self.plan = plan
        self.graphs = graphs
        self.step: torch.Tensor | None = None  # int64 [1]: the current table row (eager steps)
        self._graph = None  # ((guided, scale), step graph) of the last graphed step

    # ---- the loop --------------------------------------------------------------------------------

    def steps(self, x: torch.Tensor, cond, uncond, scales: list[float], *, desc: str,
              pred_at: Callable[[int], bool] | None = None, mask=None, x0=None
              ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Run the plan's steps from its first row, with guidance scale ``scales[i]`` (one per step) at step i
        (guided when ``uncond`` is given and the scale is not 1). Yields ``(i, x, pred_x0)`` after step i:
        x [B, ...] the new latents, pred_x0 [B, ...] when ``pred_at(i)`` (else None or a buffer). On the
        graph path both are the step graph's static buffers, overwritten by the next step: keep them with
        :meth:`owned`. ``mask`` [broadcastable to x] / ``x0``: ldm's inpainting, x <- q_sample(x0, t) * mask
        + (1 - mask) * x before each step."""
        if len(scales) != self.plan.num_steps:
            raise ValueError(f"StepExecutor.steps: {len(scales)} guidance scales for a plan of {self.plan.num_steps} "
                             "steps")
        batch = x.shape[0]
        self.step = torch.full((1,), self.plan.start_row, dtype=torch.int64, device=x.device)
        # Half-precision latents with a model that answers in fp32 come out of the first step in fp32
        # (type promotion, as upstream): static buffers cannot change dtype, so that step runs eagerly and
        # the graph takes over with the dtype every later step has.
        eager_first_step = self.graphs is not None and x.dtype in _HALF
        cond_cfg = cfg_batch(cond, uncond) if uncond is not None and any(s != 1.0 for s in scales) else None
        total = self.plan.num_steps
        for i in tqdm(range(total), desc=desc, total=total):
            scale = scales[i]
            guided = uncond is not None and scale != 1.0
            if self.graphs is not None and not (eager_first_step and i == 0):
                x, pred_x0 = self.graph_step(x, cond_cfg if guided else cond, guided, scale, mask, x0)
            else:
                t = self.plan.timesteps.index_select(0, self.step)
                if mask is not None:
                    x = self.model.q_sample(x0, t.expand(batch)) * mask + (1.0 - mask) * x
                x, pred_x0 = self.eager_step(x, cond, cond_cfg if guided else None, scale, t,
                                             want_pred=pred_at is not None and pred_at(i))
                self.step.add_(1)
            yield i, x, pred_x0

    def single_step(self, x: torch.Tensor, cond, cond_cfg, scale: float, t: torch.Tensor, *,
                    repeat_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ldm's ``p_sample_ddim``: the plan's first row, eagerly, with the caller's model timesteps t int64 [B].
        Returns (x_prev, pred_x0), both [B, ...]."""
        self.step = torch.full((1,), self.plan.start_row, dtype=torch.int64, device=x.device)
        return self.eager_step(x, cond, cond_cfg, scale, t, want_pred=True, repeat_noise=repeat_noise)

    def owned(self, tensor):
        """``tensor`` itself, or a copy when it is a static buffer of the step graph in use (the next step
        overwrites those)."""
        if self._graph is not None:
            static = self._graph[1].static_inputs
            if tensor is static["x"] or tensor is static["pred"]:
                return tensor.clone()
        return tensor

    # ---- one step, eagerly ---------------------------------------------------------------------------

    def eager_step(self, x: torch.Tensor, cond, cond_cfg, scale: float, t: torch.Tensor, *, want_pred: bool,
                   repeat_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step at row ``self.step`` (not bumped here). cond_cfg: the guided conditioning cat([uc, c])
        when this step is guided, else None. t: int64 [1] (the row's timestep, expanded to the model's
        batch) or [B] (p_sample_ddim's). Returns (x_prev [B, ...], pred_x0 [B, ...] or None)."""
        plan, model = self.plan, self.model
        batch = x.shape[0]
        guided = cond_cfg is not None
        t_batch = t.expand(batch)
        t_model = (t.expand(2 * batch) if t.numel() == 1 else torch.cat([t, t])) if guided else t_batch
        model_output = guided_model_output(model.apply_model, x, t_model, cond_cfg if guided else cond, guided)
        guidance = scale if guided else None
        if plan.score_corrector is not None:
            # Upstream combines guidance first and hands eps to the corrector: do that unfused.
            if guidance is not None:
                model_output, guidance = combine(model_output, guidance), None
            model_output = plan.score_corrector.modify_score(model, model_output, x, t_batch, cond,
                                                             **plan.corrector_kwargs)
        common = dict(guidance_scale=guidance, prediction_type=plan.prediction_type, temperature=plan.temperature,
                      backend=plan.backend)
        noise, table, step = plan.noise, plan.table, self.step
        if plan.quantize:
            z = noise.draw(x, repeat_noise)
            x_prev, x0_raw = _ops.ddim_step(x, model_output, table, step, noise=z, rng_state=noise.rng_state,
                                            return_pred_x0=True, **common)
            x0_new, _, *_ = model.first_stage_model.quantize(x0_raw)
            if plan.dynamic_threshold is not None:
                s = _reference.dynamic_threshold(x0_new, plan.dynamic_threshold, 1.0).to(x0_new.dtype)
                s = s.reshape(-1, *([1] * (x0_new.dim() - 1)))
                x0_new = torch.minimum(torch.maximum(x0_new, -s), s) / s
            # x_prev is linear in x0 with coefficient sqrt(a_prev): swap the raw x0 for the new one.
            sqrt_a_prev = table.index_select(0, step)[:, _schedule.COL_SQRT_ALPHA_PREV]
            x_prev = x_prev + sqrt_a_prev.reshape(*([1] * x.dim())).to(x_prev.dtype) * (x0_new - x0_raw)
            return x_prev, x0_new
        if plan.dynamic_threshold is not None:
            _, x0_raw = _ops.ddim_step(x, model_output, table, step, return_pred_x0=True, **common)
            s = _reference.dynamic_threshold(x0_raw, plan.dynamic_threshold, 1.0).to(torch.float32)
            z = noise.draw(x, repeat_noise)
            return _ops.ddim_step(x, model_output, table, step, x0_threshold=s, noise=z, rng_state=noise.rng_state,
                                  return_pred_x0=True, **common)
        z = noise.draw(x, repeat_noise)
        result = _ops.ddim_step(x, model_output, table, step, noise=z, rng_state=noise.rng_state,
                                return_pred_x0=want_pred, **common)
        return result if want_pred else (result, None)

    # ---- one step, through the graph runner -------------------------------------------------------------

    def graph_step(self, x: torch.Tensor, cond_in, guided: bool, scale: float, mask, x0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step through a captured (or, on CPU, eager) static-buffer step. The step graph is looked up
        again only when the guidance changes (ucg_schedule); x and the step row then move over from the
        previous one. Returns (x, pred_x0): the step graph's static buffers."""
        plan = self.plan
        if self._graph is None or self._graph[0] != (guided, scale):
            previous = None if self._graph is None else self._graph[1]
            # The noise buffer has randn's default dtype, as the eager draw: the op then casts it to the
            # step dtype inside the graph exactly as it casts the eager z (fp16 latents included). It and
            # "pred" are outputs of the step: what a hit copies into them is overwritten before it is read.
            values = {
                "x": x, "step": self.step if previous is None else previous.static_inputs["step"],
                "table": plan.table, "timesteps": plan.timesteps, "cond": cond_in,
                "noise": torch.empty(x.shape, device=x.device) if plan.noise.needs_buffer else None,
                "rng": plan.noise.rng_state, "pred": torch.empty_like(x),
            }
            key = ("ldm-step", id(self.model), _graphs.tree_signature(values), guided, scale if guided else None,
                   plan.prediction_type, plan.temperature, plan.backend)
            # Falls back to the eager static-buffer step (logged) when the model cannot be captured; the
            # fallback is cached under the key too, so capture is not retried every run.
            self._graph = ((guided, scale), self.graphs.prepare(key, values, self._graph_fn(guided, scale)))
        step_graph = self._graph[1]
        s = step_graph.static_inputs
        if mask is not None:
            t = s["timesteps"].index_select(0, s["step"]).expand(x.shape[0])
            s["x"].copy_(self.model.q_sample(x0, t) * mask + (1.0 - mask) * s["x"])
        # torch mode: drawn even at eta = 0 (then into no buffer), like upstream
        plan.noise.draw(s["x"], out=s["noise"])
        step_graph.replay()
        return s["x"], s["pred"]

    def _graph_fn(self, guided: bool, scale: float) -> Callable:
        """The captured step: everything it bakes in (model, guidance, prediction type, temperature,
        backend) is in the runner key; the rest is read from the static buffers."""
        model = self.model
        guidance = scale if guided else None
        prediction_type, temperature, backend = self.plan.prediction_type, self.plan.temperature, self.plan.backend

        def one_step(s):
            x, step = s["x"], s["step"]
            t = s["timesteps"].index_select(0, step).expand(2 * x.shape[0] if guided else x.shape[0])
            model_output = guided_model_output(model.apply_model, x, t, s["cond"], guided)
            _ops.ddim_step(x, model_output, s["table"], step, guidance_scale=guidance,
                           prediction_type=prediction_type, noise=s["noise"], rng_state=s["rng"],
                           temperature=temperature, out=x, pred_x0_out=s["pred"], backend=backend)
            step.add_(1)

        return one_step


# --------------------------------------------------------------------------------------------------
# the two loops over the executor
# --------------------------------------------------------------------------------------------------


def sampling_loop(executor: StepExecutor, img: torch.Tensor, cond, uncond, scales: list[float], *, desc: str,
                  callback=None, img_callback=None, log_every_t=None, intermediates=None, mask=None, x0=None):
    """ldm's ``ddim_sampling`` / ``decode`` loop: the plan's steps with ldm's ``callback(i)``,
    ``img_callback(pred_x0, i)`` and, every ``log_every_t`` steps (and the last), x and pred_x0 appended to
    ``intermediates['x_inter']`` / ``['pred_x0']`` (snapshots, never a graph's static buffers).
    img [B, ...] -> the final x [B, ...]."""
    total = len(scales)

    def log_now(i):
        index = total - i - 1
        return log_every_t is not None and (index % log_every_t == 0 or index == total - 1)

    def pred_at(i):
        return img_callback is not None or log_now(i)

    for i, img, pred_x0 in executor.steps(img, cond, uncond, scales, desc=desc, pred_at=pred_at, mask=mask, x0=x0):
        if pred_at(i):
            pred_x0 = executor.owned(pred_x0)
        keep = log_now(i) and intermediates is not None
        img_logged = executor.owned(img) if keep else None
        if callback:
            callback(i)
        if img_callback:
            img_callback(pred_x0, i)
        if keep:
            intermediates["x_inter"].append(img_logged)
            intermediates["pred_x0"].append(pred_x0)
    return executor.owned(img)


def inversion_loop(executor: StepExecutor, x0: torch.Tensor, cond, uncond, scales: list[float], *,
                   return_intermediates=None, callback=None):
    """ldm's ``encode`` loop (DDIM inversion, the plan's rows in order): ``callback(i)`` after step i and,
    with ``return_intermediates`` = n, x after every (num_steps // n)-th step and the last two. x0 [B, ...]
    -> (x_enc [B, ...], intermediates, their step indices)."""
    num_steps = len(scales)
    every = max(1, num_steps // return_intermediates) if return_intermediates else None
    intermediates, inter_steps = [], []
    x = x0
    for i, x, _ in executor.steps(x0, cond, uncond, scales, desc="Encoding image"):
        if return_intermediates and (i % every == 0 and i < num_steps - 1 or i >= num_steps - 2):
            intermediates.append(executor.owned(x))
            inter_steps.append(i)
        if callback:
            callback(i)
    return executor.owned(x), intermediates, inter_steps
