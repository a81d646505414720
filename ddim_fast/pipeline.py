"""One call for diffusers users: ``ddim_fast.optimize(pipe)`` makes an existing pipeline's own ``pipe(...)``
fast — fused DDIM step, fused attention, CUDA-graphed UNet — with the same images; ``ddim_fast.restore(pipe)``
undoes it exactly. Nothing of the pipeline's ``__call__`` is changed: progress bars, callbacks,
``output_type``, ``num_images_per_prompt`` and generators behave as before.

What it does per component:

* **schedulers** (``scheduler``, and ``inverse_scheduler`` in pipelines like DiffEdit): a diffusers
  ``DDIMScheduler`` becomes ``FastDDIMScheduler.from_config(its config)``, a ``DDIMInverseScheduler``
  ``FastDDIMInverseScheduler`` (both are subclasses of the diffusers classes, so ``isinstance`` checks in
  pipelines still pass). The swap carries the scheduler's state over: what ``set_timesteps`` set
  (``num_inference_steps``, ``timesteps``; LEDITS++ ``invert`` leaves them for its edit calls), attributes
  a pipeline added, config values overridden by attribute (``scheduler.config.timestep_spacing = ...``),
  the device ``add_noise`` moved ``alphas_cumprod`` to. A scheduler whose ``alphas_cumprod`` were edited
  after construction is kept (the fused tables come from the config). Any other scheduler is kept too;
  ``scheduler="ddim"`` switches the main one to ``FastDDIMScheduler`` from its current config, as
  ``DDIMScheduler.from_config(pipe.scheduler.config)`` would.
* **attention** (the UNet's, and the ControlNet's when the pipeline has one): every diffusers ``Attention``
  module whose processor the fused kernels reproduce gets ``FusedAttnProcessor`` (self- and cross-attention,
  masks); the rest (IP-Adapter, added-KV, joint attention, head dims > 256, a pipeline's own processors
  such as pix2pix-zero's, subclasses of diffusers' processors, ...) keep their processors, with the reason
  in the summary. Fusing nothing is not an error: the rest is still optimized.
* **cuda_graph**: the UNet's (and ControlNet's) ``forward`` is replaced by a
  :class:`ddim_fast.module_graph.GraphedForward` that replays a CUDA graph captured per call signature
  (shapes, dtypes, keyword structure, Python scalars such as a LoRA scale), recaptures when the model's
  structure changes, copies its outputs out (never aliased by the next replay) and runs eagerly, with one
  warning, when the model cannot be captured. On a CPU pipeline the same static-buffer path runs eagerly.

What was done and what was kept, and why, is one line: ``optimized_state(pipe).summary``. It is logged as a
warning (shown without any logging setup, like diffusers' own warnings) when something was left out (a
scheduler kept, attention modules keeping their processors), or always with ``verbose=True``; else at INFO.

Not accelerated: the text encoder, the VAE, image pre/post-processing, the safety checker, and every
scheduler other than DDIM (they keep working, unchanged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddim_fast import graphs
from ddim_fast.attention_processors import FusedAttention, fuse_attention, unfuse_attention
from ddim_fast.module_graph import GraphedForward

logger = logging.getLogger(__name__)

__all__ = ["optimize", "restore", "optimized_state", "OptimizeState"]

_STATE_ATTR = "_ddim_fast_state"
_ALREADY_FUSED = "is already fused"
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
    summary: one line saying what was swapped, fused and graphed, and what was kept and why.
    """

    schedulers: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    kept_schedulers: dict[str, str] = field(default_factory=dict)
    attention: dict[str, FusedAttention] = field(default_factory=dict)
    graphed: dict[str, GraphedForward] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)
    summary: str = ""

    @property
    def fused_attention_count(self) -> int:
        """Attention modules switched to the fused processor by this optimize call."""
        return sum(fused.count for fused in self.attention.values())

    @property
    def left_out(self) -> bool:
        """Whether something optimize acts on was kept as it was: a scheduler (other than an already fused
        one), or attention modules keeping their processors."""
        return (any(not reason.endswith(_ALREADY_FUSED) for reason in self.kept_schedulers.values())
                or any(fused.unserved for fused in self.attention.values()))


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
    """Every registered component, optional ones included. ``register_modules`` records each component in
    ``pipe.config`` as a (library, class name) pair and sets it as an instance attribute; plain config values
    (``requires_safety_checker``, ...) are not components and are never read as attributes (diffusers
    deprecates that, with a FutureWarning)."""
    attributes = vars(pipe)
    return {name: attributes.get(name) for name, entry in pipe.config.items()
            if not name.startswith("_") and isinstance(entry, (list, tuple)) and len(entry) == 2}


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


# What a DDIM scheduler builds from its config alone (equal in the fused one; only their device may differ).
_DERIVED_BUFFERS = frozenset({"betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "initial_alpha_cumprod",
                              "init_noise_sigma"})
_SCHEDULE_STATE = ("num_inference_steps", "timesteps")
_PLAIN_VALUES = (str, int, float, bool, type(None))


def _same_value(a, b) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, _PLAIN_VALUES) and a == b)


def _config_overrides(config) -> dict:
    """Config values overridden by attribute (``scheduler.config.timestep_spacing = "leading"``, as LEDITS++
    does): diffusers' FrozenDict takes the attribute, its items keep the old value, and the scheduler reads
    the attribute."""
    overrides = {}
    for key, item in config.items():
        if key.startswith("_") or not hasattr(config, key):
            continue
        value = getattr(config, key)
        if not _same_value(value, item):
            overrides[key] = value
    return overrides


def _fused_config(component) -> dict:
    """The config the scheduler acts on: its items with the attribute overrides applied (and taken off
    ``_use_default_values``, the keys ``from_config`` would otherwise reset to the new class's defaults)."""
    config = dict(component.config)
    overrides = _config_overrides(component.config)
    if overrides:
        config.update(overrides)
        if isinstance(config.get("_use_default_values"), list):
            config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in overrides]
    return config


def _unfusable_state(component, replacement) -> str | None:
    """Why ``replacement`` (built from ``component``'s config) cannot stand in for ``component``, or None."""
    for name in ("alphas_cumprod", "final_alpha_cumprod", "initial_alpha_cumprod"):
        ours, theirs = getattr(replacement, name, None), getattr(component, name, None)
        if ours is None or theirs is None:
            continue
        if not (isinstance(theirs, torch.Tensor) and theirs.shape == ours.shape
                and torch.equal(theirs.detach().cpu().to(ours.dtype), ours)):
            return (f"its {name} differ from what its config gives (edited after construction; the fused step "
                    "computes its coefficients from the config)")
    return None


def _carry_scheduler_state(source, target) -> None:
    """Copies what a DDIM scheduler keeps between calls from ``source`` to ``target`` (either one fused): the
    schedule ``set_timesteps`` set (a fused target rebuilds its tables for it, then takes the very timesteps,
    which may have been set by hand), the device of ``alphas_cumprod`` (``add_noise`` moves it), config
    overrides set by attribute, and every other public attribute that is not built from the config (ones a
    pipeline or the user added)."""
    from ddim_fast.scheduler import FastDDIMInverseScheduler, FastDDIMScheduler

    for key, value in _config_overrides(source.config).items():
        if key in target.config and not _same_value(getattr(target.config, key, None), value):
            setattr(target.config, key, value)
    steps = source.num_inference_steps
    if isinstance(target, (FastDDIMScheduler, FastDDIMInverseScheduler)):
        if steps is not None:
            target.set_timesteps(steps, device=source.timesteps.device)
    target.num_inference_steps = steps
    target.timesteps = source.timesteps.clone()
    if isinstance(source.alphas_cumprod, torch.Tensor):
        target.alphas_cumprod = target.alphas_cumprod.to(source.alphas_cumprod.device)
    for name, value in vars(source).items():
        if not name.startswith("_") and name not in _DERIVED_BUFFERS and name not in _SCHEDULE_STATE:
            setattr(target, name, value)


def _swap_schedulers(pipe, mode, state: OptimizeState) -> None:
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from ddim_fast.scheduler import FastDDIMInverseScheduler, FastDDIMScheduler

    for name, component in _components(pipe).items():
        if not isinstance(component, SchedulerMixin):
            continue
        kind = type(component).__name__
        if isinstance(component, (FastDDIMScheduler, FastDDIMInverseScheduler)):
            state.kept_schedulers[name] = f"{kind} {_ALREADY_FUSED}"
            continue
        ddim = type(component) in (DDIMScheduler, DDIMInverseScheduler)
        if type(component) is DDIMInverseScheduler:
            replacement = FastDDIMInverseScheduler.from_config(_fused_config(component))
        elif ddim or (mode == "ddim" and name == "scheduler"):
            replacement = FastDDIMScheduler.from_config(_fused_config(component) if ddim else component.config)
        else:
            state.kept_schedulers[name] = (
                f"{kind} is not a DDIM scheduler"
                + (" (scheduler='ddim' switches it to FastDDIMScheduler from its config)" if name == "scheduler" else ""))
            continue
        if ddim:
            # The swap must not change what the pipeline does next (LEDITS++ edits run on the schedule its
            # invert() set): the fused scheduler takes over the state of the one it replaces.
            reason = _unfusable_state(component, replacement)
            if reason is None:
                try:
                    _carry_scheduler_state(component, replacement)
                except (TypeError, ValueError) as exc:
                    reason = f"its state cannot be carried over ({exc})"
            if reason is not None:
                state.kept_schedulers[name] = f"{kind}: {reason}"
                continue
        # DiffusionPipeline.__setattr__ also updates pipe.config[name] (restore puts that back the same way).
        setattr(pipe, name, replacement)
        state.schedulers[name] = (component, replacement)


def optimize(pipe, *, scheduler: bool | str = True, attention: bool = True, cuda_graph: bool = True,
             verbose: bool = False):
    """Makes the diffusers pipeline ``pipe`` fast in place and returns it: fused DDIM scheduler(s), fused
    attention in the UNet (and ControlNet), UNet (and ControlNet) forward replayed from CUDA graphs. The
    images stay the same (fp32 on CPU: the scheduler swap alone is bit-identical, with fused attention
    within 1e-5 relative; the graph path equals the eager path). See the module docstring for what each
    component gets, and :func:`restore` for the way back.

    pipe: a ``DiffusionPipeline`` with a ``unet`` (StableDiffusion*, SDXL, ControlNet, DiffEdit, LEDITS++, ...).
    scheduler: True (DDIM schedulers become the fused ones, carrying their state over; others are kept),
    ``"ddim"`` (the main scheduler becomes ``FastDDIMScheduler`` from its config whatever it is), False
    (schedulers untouched).
    attention: fuse every attention module the kernels can serve; the others keep their processors (named,
    with the reason, in the summary warning), even when that is all of them: the rest is optimized anyway.
    cuda_graph: graph the forward passes (eager static buffers off CUDA).
    verbose: log the one-line summary as a warning even when nothing was left out (it is a warning anyway
    when something was: a scheduler or attention modules kept as they were).

    Raises ValueError when ``pipe`` is optimized already (``restore(pipe)`` first) or has no ``unet`` while
    attention or cuda_graph is asked for. The state, and its ``summary``, are in ``optimized_state(pipe)``.
    """
    _check_pipeline(pipe, "optimize")
    if not (scheduler is True or scheduler is False or scheduler == "ddim"):
        raise ValueError(f"optimize: scheduler must be True, False or 'ddim', got {scheduler!r}")
    attention = _check_flag("attention", attention)
    cuda_graph = _check_flag("cuda_graph", cuda_graph)
    verbose = _check_flag("verbose", verbose)
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
    state.summary = _summary(state)
    # Things a user must know (the step or attention they asked for is not what runs) are warnings, as in
    # diffusers: shown without any logging setup. A complete optimize is quiet unless asked.
    log = logger.warning if (verbose or state.left_out) else logger.info
    log("ddim_fast.optimize(%s): %s", type(pipe).__name__, state.summary)
    return pipe


def _apply(pipe, models: dict, state: OptimizeState, *, scheduler, attention: bool, cuda_graph: bool) -> None:
    """The work of optimize, recording every change in `state` as it is made (so that _undo can revert a
    partial run)."""
    if attention:
        # Modules the kernels cannot serve keep their processors (the summary names them and says why); even
        # when none can be served, the scheduler and the graphs are still worth having.
        for name, model in models.items():
            state.attention[name] = fuse_attention(model)

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
        part = f"{name} attention: {fused.count + fused.already} of {total} modules fused"
        if fused.unserved:
            part += f", {len(fused.unserved)} keep their processors ({fused.unserved_summary()})"
        parts.append(part)
    if state.graphed:
        parts.append("CUDA graphs (eager static buffers off CUDA): " + ", ".join(state.graphed))
    return "; ".join(parts) or "nothing to do"


# --------------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------------


def restore(pipe):
    """Undoes :func:`optimize` on ``pipe`` and returns it: the original scheduler objects are put back (and
    ``pipe.config`` with them) in the state the pipeline left the fused ones in (the schedule of the last
    ``set_timesteps``, attributes added since, ...: the pipeline goes on as if it had never been optimized,
    e.g. a LEDITS++ ``invert`` run while optimized feeds the edits after restore); every fused attention
    module gets back the very processor object it had; the graphed forwards are removed and their graphs
    freed. A component replaced by the user since
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
            try:
                _carry_scheduler_state(replacement, original)
            except Exception as exc:  # the way back must not fail: the original object, in its own last state
                logger.warning("ddim_fast.restore: pipe.%s gets its original scheduler back without the state set "
                               "since optimize() (%s: %s)", name, type(exc).__name__, exc)
            setattr(pipe, name, original)
        else:
            logger.info("ddim_fast.restore: pipe.%s was replaced since optimize(); keeping the new one", name)
