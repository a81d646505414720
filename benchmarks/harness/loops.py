"""The end-to-end sampling loops of ``python -m ddim_fast bench`` and ``benchmarks/bench_e2e.py``, each a
:class:`Variant` that proves what its name says before it is timed.

Loops (same UNet weights, same x_T, same conditioning, same steps):

* ``diffusers``: what a diffusers pipeline does: UNet on cat([x, x]) -> chunk -> guidance combine ->
  ``DDIMScheduler.step`` (SD's scheduler config);
* ``reference``: the plain-PyTorch ldm loop (``ddim_fast.tools.problems.reference_loop``);
* ``fast``: ``FastDDIMSampler`` (ldm API) on the UNet wrapped as an ldm-style model;
* ``fast+graph``: the same with ``cuda_graph=True`` (GPU only);
* ``fast+attn``: the same with the attention fused exactly as ``ddim_fast.optimize()`` fuses it
  (``ddim_fast.attention_processors.fuse_attention``, its filter included) but pinned to
  ``backend="fused"``, so that the name (and the proof) is about our kernel, on (a copy of) the UNet; with
  the CUDA graph on GPU;
* ``fast+attn-auto``: the same with optimize's own per-shape choice (``backend="auto"``: our kernel or an
  SDPA backend, whichever measured faster on this device).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from ddim_fast.tools.problems import (LdmUNetModel, Problem, SD_SCHEDULER_CONFIG, fast_loop, make_fast_sampler,
                                      reference_loop, require_diffusers)
from ddim_fast.tools.timing import synchronize
from harness.proofs import (Expectation, ForwardCounter, OpCounter, captured_graphs, prove_graph, prove_ops,
                            prove_timed_call, replay_count)

# Whole-run agreement with the diffusers loop. fp32: the drop-in contract. Half precision: diffusers
# does the step arithmetic in the storage dtype and ddim_fast in fp32, so the runs drift apart by a few
# fp16 ulps per step; 50 steps of that stay well inside these bounds.
RUN_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@torch.no_grad()
def diffusers_loop(problem: Problem, scheduler=None) -> torch.Tensor:
    """What a diffusers pipeline's denoising loop does with ``DDIMScheduler`` (SD's config)."""
    if problem.unet is None:
        raise ValueError("diffusers_loop needs a UNet problem (problem.unet is None)")
    if scheduler is None:
        scheduler = require_diffusers().DDIMScheduler(**SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(problem.steps, device=problem.device)
    latents = problem.x_T
    context = torch.cat([problem.uncond, problem.cond]) if problem.uses_guidance else problem.cond
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if problem.uses_guidance else latents
        noise_pred = problem.unet(model_input, t, encoder_hidden_states=context).sample
        if problem.uses_guidance:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + problem.guidance * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents



@torch.no_grad()
def unet_only_loop(problem: Problem) -> None:
    """The UNet calls of a run and nothing else (the floor every loop pays)."""
    x = torch.cat([problem.x_T] * 2) if problem.uses_guidance else problem.x_T
    context = torch.cat([problem.uncond, problem.cond]) if problem.uses_guidance else problem.cond
    t = torch.full((x.shape[0],), 501, device=x.device, dtype=torch.long)
    for _ in range(problem.steps):
        problem.model.apply_model(x, t, context)


def graphed_unet_only_loop(problem: Problem) -> Callable[[], None]:
    """The UNet calls of a run replayed from one captured CUDA graph (GPU only): the floor of the
    graph-captured loops, without launch overhead. Returns the function to time. Captured like the
    samplers' steps (``ddim_fast.graphs.CapturedStep``: warm-up and capture on one side stream, host
    syncs reported); raises ``ddim_fast.graphs.GraphCaptureError`` (a RuntimeError) when the UNet
    cannot be captured, with the caller's stream left current."""
    from ddim_fast import graphs

    x = torch.cat([problem.x_T] * 2) if problem.uses_guidance else problem.x_T.clone()
    context = torch.cat([problem.uncond, problem.cond]) if problem.uses_guidance else problem.cond
    t = torch.full((x.shape[0],), 501, device=x.device, dtype=torch.long)

    def unet_call(static):
        with torch.no_grad():
            problem.model.apply_model(static["x"], static["t"], static["context"])

    captured = graphs.CapturedStep(unet_call, {"x": x, "t": t, "context": context}, warmup_iters=3).capture()

    def replay():
        for _ in range(problem.steps):
            captured.replay()

    return replay




def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``fn()`` per repeat. On a GPU: CUDA events recorded on the current stream before and
    after the call (the device drained first, so nothing earlier is counted), read after synchronising;
    on the CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times




# --------------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------------

VARIANT_EXPECTATIONS = {
    "diffusers": Expectation(fused_step=False, fused_attention=False, graph=False),
    "reference": Expectation(fused_step=False, fused_attention=False, graph=False),
    "fast": Expectation(fused_step=True, fused_attention=False, graph=False),
    "fast+graph": Expectation(fused_step=True, fused_attention=False, graph=True),
    "fast+attn": Expectation(fused_step=True, fused_attention=True, graph=False),  # graph=True on GPU
    "fast+attn-auto": Expectation(fused_step=True, fused_attention=True, graph=False, attention_backend="auto"),
}


def fuse_attention_as_optimize(unet, backend: str):
    """What ``ddim_fast.optimize()`` does to a UNet's attention (the product's ``fuse_attention``, which leaves
    the modules its kernels cannot serve on their own processors), with ``backend`` pinned. Returns the
    product's ``FusedAttention`` (``count`` fused modules, ``unserved``: name -> reason)."""
    from ddim_fast.attention_processors import FusedAttnProcessor, fuse_attention

    fused = fuse_attention(unet, backend=backend)
    wrong = [name for name, proc in unet.attn_processors.items()
             if isinstance(proc, FusedAttnProcessor) != (name.removesuffix(".processor") in fused.originals)]
    if wrong:
        raise AssertionError(f"fuse_attention said it fused {fused.count} modules, but the processors of "
                             f"{wrong} say otherwise")
    return fused


class Variant:
    """One bench loop on a problem, with what it must prove (see :func:`run_bench`).

    ``Variant.build(problem, name)`` returns the variant or a string saying why it cannot run here.
    ``first_call(seed)`` runs the loop once under an :class:`OpCounter` (the warm-up: graph capture,
    compiles) and returns its output, raising AssertionError when the proof fails (``self.proof`` holds
    the counts either way); ``__call__`` runs one timed call and checks it (``check_timed_call``)."""

    def __init__(self, name: str, problem: Problem, fn: Callable[[], torch.Tensor], expect: Expectation,
                 unet, sampler=None):
        self.name, self.problem, self.fn, self.expect = name, problem, fn, expect
        self.unet, self.sampler = unet, sampler
        self.n_attention = len(unet.attn_processors) if unet is not None else None
        self.n_fused = self.n_attention
        self.unserved: dict[str, str] = {}
        self.forwards = ForwardCounter(unet if unet is not None else problem.model)
        self.proof: dict[str, Any] = {}
        self.timed_calls = 0

    @classmethod
    def build(cls, problem: Problem, name: str, *, backend: str = "auto", noise_mode: str = "torch"
              ) -> "Variant | str":
        if name not in VARIANT_EXPECTATIONS:
            raise ValueError(f"unknown bench variant {name!r}; expected one of {', '.join(VARIANT_EXPECTATIONS)}")
        expect = VARIANT_EXPECTATIONS[name]
        on_gpu = problem.device.type == "cuda"
        if expect.fused_attention and on_gpu:  # the fused attention runs inside the CUDA graph on a GPU
            expect = Expectation(fused_step=True, fused_attention=True, graph=True,
                                 attention_backend=expect.attention_backend)
        if name == "diffusers":
            if problem.unet is None:
                return "the diffusers loop needs a UNet problem"
            return cls(name, problem, lambda: diffusers_loop(problem), expect, problem.unet)
        if name == "reference":
            return cls(name, problem, lambda: reference_loop(problem), expect, problem.unet)
        if expect.graph and not on_gpu:
            return "CUDA graphs need a GPU"
        run_problem, fused = problem, None
        if expect.fused_attention:
            if problem.unet is None:
                return "fused attention needs a diffusers UNet (the model has no attention processors)"
            fused_unet = copy.deepcopy(problem.unet)
            fused = fuse_attention_as_optimize(fused_unet, expect.attention_backend)
            run_problem = copy.copy(problem)
            run_problem.unet = fused_unet
            run_problem.model = LdmUNetModel(fused_unet)
        sampler = make_fast_sampler(run_problem, backend=backend, cuda_graph=expect.graph, noise_mode=noise_mode)
        variant = cls(name, run_problem, lambda: fast_loop(run_problem, sampler), expect, run_problem.unet, sampler)
        if fused is not None:
            variant.n_fused, variant.unserved = fused.count, dict(fused.unserved)
        return variant

    def first_call(self, seed: int = 0) -> torch.Tensor:
        # Same global RNG state for every loop: ldm-style samplers draw from it even at eta = 0.
        before = self.forwards.count
        torch.manual_seed(seed)
        if self.expect.attention_backend == "auto":
            from ddim_fast.attention import clear_attention_choices

            clear_attention_choices()  # the proof lists what this run chose
        with OpCounter() as ops:
            out = self.fn()
        synchronize(self.problem.device)
        forwards = self.forwards.count - before
        problems = prove_ops(self.name, self.expect, ops, forwards, self.n_attention, self.n_fused)
        if self.expect.graph:
            problems += prove_graph(self.name, self.sampler)
        self.proof = {
            "unet_forwards": forwards, "attention_modules": self.n_attention, "fused_attention_modules": self.n_fused,
            "fused_step_ops": ops.fused_steps, "fused_attention_ops": ops.fused_attention,
            "unfused_attention_ops": ops.unfused_attention,
            "graphs_captured": captured_graphs(self.sampler) if self.expect.graph else 0,
            "expect": {"fused_step": self.expect.fused_step, "fused_attention": self.expect.fused_attention,
                       "graph": self.expect.graph, "attention_backend": self.expect.attention_backend},
            "timed_calls_checked": 0, "ok": not problems, "problems": problems,
        }
        if self.unserved:
            self.proof["unserved_attention_modules"] = self.unserved
        if self.expect.fused_attention and self.expect.attention_backend == "auto":
            from ddim_fast.attention import attention_choices

            self.proof["attention_backends"] = attention_backends(attention_choices())
        if problems:
            raise AssertionError("; ".join(problems))
        return out

    def __call__(self) -> torch.Tensor:
        """One timed call, checked like the proof run (the caller synchronises: no host wait here)."""
        f0 = self.forwards.count
        r0 = replay_count(self.sampler) if self.sampler is not None else 0
        out = self.fn()
        replays = (replay_count(self.sampler) - r0) if self.sampler is not None else 0
        problems = prove_timed_call(self.name, self.expect, self.problem.steps, self.forwards.count - f0, replays)
        self.proof["timed_calls_checked"] = self.proof.get("timed_calls_checked", 0) + 1
        if problems:
            self.proof["ok"] = False
            self.proof.setdefault("problems", []).extend(problems)
            raise AssertionError("; ".join(problems))
        return out

    def close(self) -> None:
        self.forwards.remove()


def attention_backends(choices: list[dict]) -> dict[str, str]:
    """``ddim_fast.attention.attention_choices()`` as {"<dtype> q<shape> k<shape>": "<backend> (<source>)"}."""
    return {f"{c['dtype']} q{c['q']} k{c['k']}": f"{c['backend']} ({c['source']})" for c in choices}
