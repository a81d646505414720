"""One call for diffusers users: ``ddim_fast.optimize(pipe)`` makes an existing pipeline's own ``pipe(...)``
fast — fused DDIM step, fused attention, CUDA-graphed UNet — with the same images; ``ddim_fast.restore(pipe)``
undoes it exactly. Nothing of the pipeline's ``__call__`` is changed: progress bars, callbacks,
``output_type``, ``num_images_per_prompt`` and generators behave as before.

What it does per component:

* **schedulers** (``scheduler``, and ``inverse_scheduler`` in pipelines like DiffEdit): a diffusers
  ``DDIMScheduler`` becomes ``FastDDIMScheduler.from_config(its config)``, a ``DDIMInverseScheduler``
  ``FastDDIMInverseScheduler`` (both are subclasses of the diffusers classes, so ``isinstance`` checks in
  pipelines still pass). Any other scheduler is kept (logged); ``scheduler="ddim"`` switches the main one
  to ``FastDDIMScheduler`` from its current config, as ``DDIMScheduler.from_config(pipe.scheduler.config)``
  would.
* **attention** (the UNet's, and the ControlNet's when the pipeline has one): every diffusers ``Attention``
  module whose processor the fused kernels reproduce gets ``FusedAttnProcessor`` (self- and cross-attention,
  masks); the rest (IP-Adapter, added-KV, joint attention, head dims > 256, ...) keep their processors and
  are listed in one warning with the reasons. Fusing nothing is an error unless ``attention=False``.
* **cuda_graph**: the UNet's (and ControlNet's) ``forward`` is replaced by a
  :class:`ddim_fast.module_graph.GraphedForward` that replays a CUDA graph captured per call signature
  (shapes, dtypes, keyword structure, Python scalars such as a LoRA scale), recaptures when the model's
  structure changes, copies its outputs out (never aliased by the next replay) and runs eagerly, with one
  warning, when the model cannot be captured. On a CPU pipeline the same static-buffer path runs eagerly.

Not accelerated: the text encoder, the VAE, image pre/post-processing, the safety checker, and every
scheduler other than DDIM (they keep working, unchanged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ddim_fast import graphs
from ddim_fast.attention_processors import FusedAttention, fuse_attention, unfuse_attention
from ddim_fast.module_graph import GraphedForward

logger = logging.getLogger(__name__)

__all__ = ["optimize", "restore", "optimized_state", "OptimizeState"]

_STATE_ATTR = "_ddim_fast_state"
# Model components whose attention and forward are optimized: the denoiser, and its ControlNet(s).
_MODEL_COMPONENTS = ("unet", "controlnet")


@dataclass
class OptimizeState:
    """What :func:`optimize` did to a pipeline (``optimized_state(pipe)``), all of which :func:`restore` undoes.

    schedulers: component name -> (original scheduler, its fused replacement).
    kept_schedulers: component name -> why it was kept.
    attention: model name -> ``FusedAttention`` (fused module names with their original processors, and
    the modules left alone with the reason).
    graphed: model name (``"unet"``, ``"controlnet"``, ``"controlnet.nets.0"`` ...) -> its ``GraphedForward``.
    models: the model objects acted on (restore reverts those, even if the pipeline holds others by then).
    """

    schedulers: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    kept_schedulers: dict[str, str] = field(default_factory=dict)
    attention: dict[str, FusedAttention] = field(default_factory=dict)
    graphed: dict[str, GraphedForward] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def fused_attention_count(self) -> int:
        """Attention modules switched to the fused processor by this optimize call."""
        return sum(fused.count for fused in self.attention.values())


def optimized_state(pipe) -> OptimizeState | None:
    """The :class:`OptimizeState` of a pipeline :func:`optimize` was applied to, else None."""
    return pipe.__dict__.get(_STATE_ATTR)


def _check_pipeline(pipe, what: str) -> None:
    if not (hasattr(pipe, "config") and hasattr(pipe, "components")):
        raise TypeError(f"{what}: pipe must be a diffusers DiffusionPipeline, got {type(pipe).__name__}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"optimize: {name} must be True or False, got {value!r}")
    return value


def _components(pipe) -> dict[str, Any]:
    """Every registered component, optional ones included (``pipe.components`` leaves those out)."""
    return {name: getattr(pipe, name, None) for name in pipe.config.keys() if not name.startswith("_")}


def _models(pipe) -> dict[str, nn.Module]:
    return {name: module for name, module in _components(pipe).items()
            if name in _MODEL_COMPONENTS and isinstance(module, nn.Module)}


def _graph_targets(name: str, model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose forward gets a graph: the model, or each net of a MultiControlNetModel (its own
    forward is a Python loop over them with per-net arguments)."""
    nets = getattr(model, "nets", None)
    if isinstance(nets, nn.ModuleList) and type(model).__name__.startswith("Multi"):
        return {f"{name}.nets.{i}": net for i, net in enumerate(nets)}
    return {name: model}


# --------------------------------------------------------------------------------------------------
# optimize
# --------------------------------------------------------------------------------------------------


def _swap_schedulers(pipe, mode, state: OptimizeState) -> None:
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from ddim_fast.scheduler import FastDDIMInverseScheduler, FastDDIMScheduler

    for name, component in _components(pipe).items():
        if not isinstance(component, SchedulerMixin):
            continue
        kind = type(component).__name__
        if isinstance(component, (FastDDIMScheduler, FastDDIMInverseScheduler)):
            state.kept_schedulers[name] = f"{kind} is already fused"
            continue
        if type(component) is DDIMScheduler:
            replacement = FastDDIMScheduler.from_config(component.config)
        elif type(component) is DDIMInverseScheduler:
            replacement = FastDDIMInverseScheduler.from_config(component.config)
        elif mode == "ddim" and name == "scheduler":
            replacement = FastDDIMScheduler.from_config(component.config)
        else:
            state.kept_schedulers[name] = (
                f"{kind} is not a DDIM scheduler"
                + (" (scheduler='ddim' switches it to FastDDIMScheduler from its config)" if name == "scheduler" else ""))
            continue
        # DiffusionPipeline.__setattr__ also updates pipe.config[name] (restore puts that back the same way).
        setattr(pipe, name, replacement)
        state.schedulers[name] = (component, replacement)


def optimize(pipe, *, scheduler: bool | str = True, attention: bool = True, cuda_graph: bool = True):
    """Makes the diffusers pipeline ``pipe`` fast in place and returns it: fused DDIM scheduler(s), fused
    attention in the UNet (and ControlNet), UNet (and ControlNet) forward replayed from CUDA graphs. The
    images stay the same (fp32 on CPU: the scheduler swap alone is bit-identical, with fused attention
    within 1e-5 relative; the graph path equals the eager path). See the module docstring for what each
    component gets, and :func:`restore` for the way back.

    pipe: a ``DiffusionPipeline`` with a ``unet`` (StableDiffusion*, SDXL, ControlNet, DiffEdit, ...).
    scheduler: True (DDIM schedulers become the fused ones, others are kept), ``"ddim"`` (the main scheduler
    becomes ``FastDDIMScheduler`` from its config whatever it is), False (schedulers untouched).
    attention: fuse every attention module the kernels can serve; ``ValueError`` when none can (pass False
    to optimize the rest anyway). cuda_graph: graph the forward passes (eager static buffers off CUDA).

    Raises ValueError when ``pipe`` is optimized already (``restore(pipe)`` first) or has no ``unet`` while
    attention or cuda_graph is asked for. The state is in ``optimized_state(pipe)``.
    """
    _check_pipeline(pipe, "optimize")
    if not (scheduler is True or scheduler is False or scheduler == "ddim"):
        raise ValueError(f"optimize: scheduler must be True, False or 'ddim', got {scheduler!r}")
    attention = _check_flag("attention", attention)
    cuda_graph = _check_flag("cuda_graph", cuda_graph)
    if optimized_state(pipe) is not None:
        raise ValueError(f"optimize: this {type(pipe).__name__} is optimized already; call ddim_fast.restore(pipe) "
                         "first to optimize it again with other options")
    models = _models(pipe)
    if (attention or cuda_graph) and "unet" not in models:
        raise ValueError(f"optimize: {type(pipe).__name__} has no `unet` (attention and cuda_graph act on the UNet; "
                         "pass attention=False, cuda_graph=False to swap the scheduler alone)")

    state = OptimizeState(models=models)
    try:
        _apply(pipe, models, state, scheduler=scheduler, attention=attention, cuda_graph=cuda_graph)
    except BaseException:
        _undo(pipe, state)  # a failed optimize leaves the pipeline as it was
        raise
    pipe.__dict__[_STATE_ATTR] = state
    logger.info("ddim_fast.optimize(%s): %s", type(pipe).__name__, _summary(state))
    return pipe


def _apply(pipe, models: dict, state: OptimizeState, *, scheduler, attention: bool, cuda_graph: bool) -> None:
    """The work of optimize, recording every change in `state` as it is made (so that _undo can revert a
    partial run)."""
    if attention:
        for name, model in models.items():
            state.attention[name] = fuse_attention(model)
        running_fused = sum(fused.count + fused.already for fused in state.attention.values())
        if running_fused == 0:
            reasons = "; ".join(f"{name}: {fused.unserved_summary() or 'no attention modules'}"
                                for name, fused in state.attention.items())
            raise ValueError(f"optimize(attention=True): no attention module of {type(pipe).__name__} can run the "
                             f"fused kernels ({reasons}); pass attention=False to optimize the rest")
        unserved = [f"{name}: {fused.unserved_summary()}" for name, fused in state.attention.items() if fused.unserved]
        if unserved:
            logger.warning("ddim_fast.optimize: %d attention module(s) keep their processors: %s",
                           sum(len(fused.unserved) for fused in state.attention.values()), " | ".join(unserved))

    if scheduler is not False:
        _swap_schedulers(pipe, scheduler, state)

    if cuda_graph:
        pools = graphs.GraphPools()  # one memory pool per device for every graphed model of this pipeline
        for name, model in models.items():
            for target_name, target in _graph_targets(name, model).items():
                if _is_graphed(target):
                    logger.info("ddim_fast.optimize: %s is graphed already (shared with another optimized "
                                "pipeline); leaving it as it is", target_name)
                    continue
                state.graphed[target_name] = GraphedForward(target, pools=pools).install()


def _is_graphed(module: nn.Module) -> bool:
    from ddim_fast.module_graph import _InstalledForward

    return isinstance(module.__dict__.get("forward"), _InstalledForward)


def _summary(state: OptimizeState) -> str:
    parts = []
    for name, (original, replacement) in state.schedulers.items():
        parts.append(f"{name}: {type(original).__name__} -> {type(replacement).__name__}")
    for name, reason in state.kept_schedulers.items():
        parts.append(f"{name} kept ({reason})")
    for name, fused in state.attention.items():
        total = fused.count + fused.already + len(fused.unserved)
        parts.append(f"{name} attention: {fused.count + fused.already} of {total} modules fused")
    if state.graphed:
        parts.append("CUDA graphs (eager static buffers off CUDA): " + ", ".join(state.graphed))
    return "; ".join(parts) or "nothing to do"


# --------------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------------


def restore(pipe):
    """Undoes :func:`optimize` on ``pipe`` and returns it: the original scheduler objects are put back (and
    ``pipe.config`` with them), every fused attention module gets back the very processor object it had,
    the graphed forwards are removed and their graphs freed. A component replaced by the user since
    ``optimize`` is left as the user set it (logged). Calling it on a pipeline that is not optimized is a
    no-op.

    The other ways back for attention alone: ``unet.set_attn_processor(AttnProcessor2_0())`` always works;
    ``unet.set_default_attn_processor()`` refuses ``FusedAttnProcessor`` (diffusers accepts only its own
    processor classes there), so call it after ``restore``.
    """
    _check_pipeline(pipe, "restore")
    state = optimized_state(pipe)
    if state is None:
        return pipe
    _undo(pipe, state)
    del pipe.__dict__[_STATE_ATTR]
    return pipe


def _undo(pipe, state: OptimizeState) -> None:
    """Reverts what `state` records, last change first: graphs, attention processors, schedulers."""
    for graphed in state.graphed.values():
        graphed.uninstall()
    for name, fused in state.attention.items():
        unfuse_attention(state.models[name], fused.originals)
    for name, (original, replacement) in state.schedulers.items():
        if getattr(pipe, name, None) is replacement:
            setattr(pipe, name, original)
        else:
            logger.info("ddim_fast.restore: pipe.%s was replaced since optimize(); keeping the new one", name)
