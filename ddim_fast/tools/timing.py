"""Timers the tools share: per-step stamps of a sampling loop (:class:`StepHooks`, CUDA events on the GPU,
NVTX ranges for Nsight), the model proxy that stamps around ``apply_model`` (:class:`HookedModel`), and the
summary statistics ``profile`` prints."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepHooks:
    """Per-step timestamps: loop begin, model start/end, step end. CUDA events on GPU (read after one
    sync at the end, so the loop is not perturbed), perf_counter on CPU. On GPU with ``nvtx``, NVTX
    ranges 'ddim step i' (one per step, from the previous step's end) and 'model' inside them.

    Call ``begin()`` right before the loop, ``step_end(i)`` after each step (the samplers' ``callback``),
    ``finish()`` after the loop; ``model_start``/``model_end`` come from :class:`HookedModel`. Model calls
    made while a CUDA graph is being captured are not stamped (they are not really run then)."""

    def __init__(self, device: torch.device, nvtx: bool = True):
        self.cuda = device.type == "cuda"
        self.nvtx = nvtx and self.cuda
        self.begin_stamp: Any = None
        self.model_starts: dict[int, Any] = {}
        self.model_ends: dict[int, Any] = {}
        self.step_ends: dict[int, Any] = {}
        self._step_open = False
        self._model_open = False

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()

    # Step ranges: NVTX here; the profiler's subclass adds torch.profiler ranges.
    def _open_range(self, name: str) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)

    def _close_range(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_pop()

    def _open_step(self, i: int) -> None:
        self._open_range(f"ddim step {i}")
        self._step_open = True

    def _close_step(self) -> None:
        if self._step_open:
            self._close_range()
            self._step_open = False

    def begin(self) -> None:
        self.begin_stamp = self._stamp()
        self._open_step(0)

    def model_start(self, i: int) -> None:
        if self._capturing():
            return
        if not self._step_open:  # a loop run without begin(): open the step here
            self._open_step(i)
        if self.nvtx and not self._model_open:
            torch.cuda.nvtx.range_push("model")
        self._model_open = True
        self.model_starts.setdefault(i, self._stamp())  # first call of the step (models may be called twice)

    def model_end(self, i: int) -> None:
        if self._capturing():
            return
        self.model_ends[i] = self._stamp()
        self._close_model()

    def _close_model(self) -> None:
        if self._model_open and self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._model_open = False

    def step_end(self, i: int) -> None:
        self.step_ends[i] = self._stamp()
        self._close_model()
        self._close_step()
        self._open_step(i + 1)

    def finish(self) -> None:
        """Close every range still open (innermost first); safe to call twice and after an exception."""
        self._close_model()
        self._close_step()

    def _ms(self, a, b) -> float:
        if a is None or b is None:
            return float("nan")
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def rows(self) -> list[dict[str, float]]:
        """One dict per step: model_ms, update_ms (guidance + DDIM update: model end -> step end), other_ms
        (previous step end -> model start: the loop's work between the steps, input preparation included),
        total_ms (previous step end -> step end; step 0 from its model start, or from begin() when the model
        was not observed). NaN where not observed (the model runs inside a replayed CUDA graph; step 0's
        other_ms: what runs before it is the run's setup)."""
        self.finish()
        if self.cuda:
            torch.cuda.synchronize()
        rows = []
        steps = sorted(self.step_ends)
        per_step_model = all(i in self.model_starts and i in self.model_ends for i in steps)
        for k, i in enumerate(steps):
            if k > 0:
                start = self.step_ends[steps[k - 1]]
            else:
                start = self.model_starts[i] if per_step_model else self.begin_stamp
            rows.append({
                "step": i,
                "model_ms": self._ms(self.model_starts[i], self.model_ends[i]) if per_step_model else float("nan"),
                "update_ms": self._ms(self.model_ends[i], self.step_ends[i]) if per_step_model else float("nan"),
                "other_ms": self._ms(start, self.model_starts[i]) if per_step_model and k > 0 else float("nan"),
                "total_ms": self._ms(start, self.step_ends[i]),
            })
        return rows


class HookedModel:
    """Proxy of an ldm-style model that stamps ``hooks`` around apply_model (everything else passes through).
    The step index is the number of completed steps (``hooks.step_end`` calls)."""

    def __init__(self, model, hooks: StepHooks):
        self._model = model
        self._hooks = hooks

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, *args, **kwargs):
        i = len(self._hooks.step_ends)
        self._hooks.model_start(i)
        try:
            out = self._model.apply_model(*args, **kwargs)
        except BaseException:
            self._hooks.finish()  # leave no NVTX / profiler range open behind the exception
            raise
        self._hooks.model_end(i)
        return out


def summarize(values_ms: list[float]) -> dict[str, float]:
    """mean, p50, p90 (nearest rank), min of a list of milliseconds."""
    vals = sorted(v for v in values_ms if v == v)
    if not vals:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "min": float("nan")}
    p90 = vals[max(0, math.ceil(0.9 * len(vals)) - 1)]  # nearest rank
    return {"mean": statistics.fmean(vals), "p50": statistics.median(vals), "p90": p90, "min": vals[0]}


