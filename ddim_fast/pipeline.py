"""One call for diffusers users: ``ddim_fast.optimize(pipe)`` makes an existing pipeline's own ``pipe(...)``
fast — fused DDIM step, fused attention and projections, channels_last, CUDA-graphed UNet — with the same
images; ``ddim_fast.restore(pipe)`` undoes it exactly. Nothing of the pipeline's ``__call__`` is changed: progress bars, callbacks,
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
* **the models** (the UNet, and the ControlNet(s) when the pipeline has them). Each option is True, False or
  ``"auto"`` (the default), decided per model by the device its weights are on at ``optimize`` time: on CUDA
  everything below is on; on the CPU none of it (measured: no gain there, see docs/design.md "optimize on the
  CPU"), so a CPU pipeline gets the fused scheduler only and diffusers' images bit for bit.

  - ``attention``: every diffusers ``Attention`` module whose processor the fused kernels reproduce gets
    ``FusedAttnProcessor`` (self- and cross-attention, masks); the rest (IP-Adapter, added-KV, joint attention,
    head dims > 256, a pipeline's own processors such as pix2pix-zero's, subclasses of diffusers' processors,
    ...) keep their processors, with the reason in the summary. Fusing nothing is not an error.
  - ``fuse_qkv``: one GEMM for each module's q/k/v (k/v) projections over a buffer that is the weights' own
    storage (``ddim_fast.qkv_projections``): LoRA and in-place weight updates keep working.
  - ``channels_last``: 4-D weights in ``torch.channels_last``; restore gives each its strides back.
  - ``unet_body`` (default False; ``"auto"``: CUDA only): the fused GroupNorm(+SiLU) and GEGLU ops in the
    ResnetBlock2D, GEGLU and GroupNorm modules they reproduce (``ddim_fast.unet_fusion``).
  - ``compile`` (default False): ``torch.compile`` of the forward (``ddim_fast.compiled``), run inside the graphs.
  - ``cuda_graph``: the forward is replaced by a :class:`ddim_fast.module_graph.GraphedForward` that replays a
    CUDA graph captured per call signature (shapes, dtypes, keyword structure, Python scalars such as a LoRA
    scale), recaptures when the model's structure changes, copies its outputs out (never aliased by the next
    replay) and runs eagerly, with one warning, when the model cannot be captured. ``"auto"``: calls off CUDA
    pass straight through; True: they run the static-buffer path eagerly (testing without a GPU).

  The order: processors, the UNet-body fusion, fused projections, layout, then what wraps the forward
  (compile inside, graphs outside); ``restore`` undoes it in reverse.

What was done and what was kept, and why, is one line: ``optimized_state(pipe).summary``. It is logged as a
warning (shown without any logging setup, like diffusers' own warnings) when something was left out (a
scheduler kept, attention modules keeping their processors), or always with ``verbose=True``; else at INFO.

Not accelerated: the text encoder, the VAE, image pre/post-processing, the safety checker, and every
scheduler other than DDIM (they keep working, unchanged).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddim_fast import graphs
from ddim_fast.attention_processors import FusedAttention, fuse_attention, unfuse_attention
from ddim_fast.compiled import CompiledForward, cache_dir, cache_key, compile_options, uses_cuda_graphs
from ddim_fast.module_graph import GraphedForward
from ddim_fast.qkv_projections import FusedQKV, fuse_qkv, unfuse_qkv
from ddim_fast.unet_fusion import FusedUnetBody, fuse_unet_body, unfuse_unet_body

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
    unet_body: model name -> ``unet_fusion.FusedUnetBody`` (ResnetBlock2D / GEGLU / GroupNorm modules given the
    fused GroupNorm(+SiLU) and GEGLU ops, modules left alone with the reason).
    qkv: model name -> ``qkv_projections.FusedQKV`` (fused projection groups, modules left alone with the reason).
    channels_last: model name -> [(tensor, strides it had)] for every weight made channels_last.
    compiled: model name (as in ``graphed``) -> its ``compiled.CompiledForward``.
    graphed: model name (``"unet"``, ``"controlnet"``, ``"controlnet.nets.0"`` ...) -> its ``GraphedForward``.
    models: the model objects acted on (restore reverts those, even if the pipeline holds others by then).
    choices: model name -> what each option resolved to for it (``"auto"`` decided by its device).
    summary: one line saying what was swapped, fused and graphed, and what was kept and why.
    """

    schedulers: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    kept_schedulers: dict[str, str] = field(default_factory=dict)
    attention: dict[str, FusedAttention] = field(default_factory=dict)
    unet_body: dict[str, FusedUnetBody] = field(default_factory=dict)
    qkv: dict[str, FusedQKV] = field(default_factory=dict)
    channels_last: dict[str, list] = field(default_factory=dict)
    compiled: dict[str, CompiledForward] = field(default_factory=dict)
    graphed: dict[str, GraphedForward] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
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


_AUTO = "auto"


def _check_choice(name: str, value) -> bool | str:
    if value is True or value is False or value == _AUTO:
        return value
    raise ValueError(f"optimize: {name} must be True, False or 'auto', got {value!r}")


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _resolve(model: nn.Module, *, attention, cuda_graph, channels_last, fuse_qkv, unet_body) -> dict[str, Any]:
    """What each option means for one model: ``"auto"`` decided by the device its weights are on now.

    The CPU defaults do only what was measured to pay there (``benchmarks/bench_pipeline.py``, group
    ``pipeline cpu tiny-sd``; docs/design.md "optimize on the CPU"): the fused scheduler. Fused attention is
    slower than PyTorch's SDPA on the CPU at small head dims, CUDA graphs do nothing there (the static-buffer
    copies and checks were pure cost), channels_last and fused QKV projections measured no gain."""
    cuda = _device_of(model).type == "cuda"
    return {
        "attention": cuda if attention == _AUTO else attention,
        # "auto" installs the wrapper everywhere (a pipeline moved to CUDA later gets its graphs); off CUDA its
        # calls pass straight through. True also runs the static-buffer path off CUDA (testing without a GPU).
        "cuda_graph": cuda_graph,
        "channels_last": cuda if channels_last == _AUTO else channels_last,
        "fuse_qkv": cuda if fuse_qkv == _AUTO else fuse_qkv,
        # Off by default until a GPU run measures the fused GroupNorm(+SiLU) / GEGLU kernels inside the graphed
        # UNet (bench_pipeline's optimize-unet-body row); "auto": CUDA only (on the CPU the ops are PyTorch's own
        # composites: nothing to gain, docs/design.md "UNet body fusion").
        "unet_body": cuda if unet_body == _AUTO else unet_body,
    }


def optimize(pipe, *, scheduler: bool | str = True, attention: bool | str = _AUTO, cuda_graph: bool | str = _AUTO,
             channels_last: bool | str = _AUTO, fuse_qkv: bool | str = _AUTO, unet_body: bool | str = False,
             compile: Any = False,
             compile_cache: bool | str | os.PathLike = True, verbose: bool = False):
    """Makes the diffusers pipeline ``pipe`` fast in place and returns it: fused DDIM scheduler(s), and for the
    UNet (and ControlNet): fused attention, fused QKV projections, channels_last weights, optionally
    ``torch.compile``, and its forward replayed from CUDA graphs. The images stay the same (fp32 on CPU: the
    scheduler swap alone is bit-identical, with fused attention within 1e-5 relative; the graph path equals the
    eager path; channels_last and fused QKV change only the rounding of convolutions and GEMMs). See the module
    docstring for what each component gets, and :func:`restore` for the way back.

    Each model option takes True, False or ``"auto"`` (the default), which decides by the device the model's
    weights are on when ``optimize`` is called (move the pipeline to its device first): on CUDA everything is on;
    on the CPU only what was measured to pay there (the fused scheduler; see ``_resolve``).

    pipe: a ``DiffusionPipeline`` with a ``unet`` (StableDiffusion*, SDXL, ControlNet, DiffEdit, LEDITS++, ...).
    scheduler: True (DDIM schedulers become the fused ones, carrying their state over; others are kept),
    ``"ddim"`` (the main scheduler becomes ``FastDDIMScheduler`` from its config whatever it is), False
    (schedulers untouched).
    attention: fuse every attention module the kernels can serve; the others keep their processors (named,
    with the reason, in the summary warning), even when that is all of them: the rest is optimized anyway.
    cuda_graph: replay the forward passes from CUDA graphs. ``"auto"``: graphs for calls on CUDA, other calls
    pass straight through; True: also the static-buffer path off CUDA (eager, for testing); False: none.
    channels_last: the models' 4-D weights in ``torch.channels_last`` (convolutions then run NHWC; restore gives
    each weight back the strides it had).
    fuse_qkv: one GEMM for the q/k/v (k/v for cross-attention) projections of each attention module, over a
    buffer that *is* the projection weights' storage (``ddim_fast.qkv_projections``: LoRA and in-place updates
    keep working).
    unet_body: the fused GroupNorm(+SiLU), time-embedding add and GEGLU ops (``ddim_fast.unet_ops``) in every
    ResnetBlock2D, GEGLU and GroupNorm they reproduce (``ddim_fast.unet_fusion``; the rest named with the reason
    in the summary). False by default (not yet measured on a GPU); ``"auto"``: on CUDA models only.
    compile: False (default), True (``torch.compile``, Inductor's default mode), a mode string
    (``"max-autotune-no-cudagraphs"``, ...) or a dict of ``torch.compile`` arguments: compiles the models' forward,
    which then runs inside our CUDA graphs (modes that capture CUDA graphs themselves are refused while
    ``cuda_graph`` is on). See ``ddim_fast.compiled``.
    compile_cache: with ``compile``, save the compiled artifacts to (and load them from) a file per model
    configuration in the user cache folder (True), in the given folder, or not at all (False).
    verbose: log the one-line summary as a warning even when nothing was left out (it is a warning anyway
    when something was: a scheduler or attention modules kept as they were).

    Raises ValueError when ``pipe`` is optimized already (``restore(pipe)`` first) or has no ``unet`` while a
    model option is on. The state, and its ``summary``, are in ``optimized_state(pipe)``.
    """
    _check_pipeline(pipe, "optimize")
    if not (scheduler is True or scheduler is False or scheduler == "ddim"):
        raise ValueError(f"optimize: scheduler must be True, False or 'ddim', got {scheduler!r}")
    choices = {name: _check_choice(name, value) for name, value in (
        ("attention", attention), ("cuda_graph", cuda_graph), ("channels_last", channels_last),
        ("fuse_qkv", fuse_qkv), ("unet_body", unet_body))}
    options = compile_options(compile)
    if options is not None and cuda_graph is not False and uses_cuda_graphs(options):
        raise ValueError(f"optimize: compile mode {options.get('mode')!r} captures CUDA graphs itself, which cannot "
                         "run inside optimize's graphs: pass compile=True or 'max-autotune-no-cudagraphs', or "
                         "cuda_graph=False")
    if not (compile_cache is True or compile_cache is False or isinstance(compile_cache, (str, os.PathLike))):
        raise TypeError(f"optimize: compile_cache must be True, False or a folder, got {compile_cache!r}")
    verbose = _check_flag("verbose", verbose)
    if optimized_state(pipe) is not None:
        raise ValueError(f"optimize: this {type(pipe).__name__} is optimized already; call ddim_fast.restore(pipe) "
                         "first to optimize it again with other options")
    models = _models(pipe)
    wants_model = any(value is not False for value in choices.values()) or options is not None
    if wants_model and "unet" not in models:
        raise ValueError(f"optimize: {type(pipe).__name__} has no `unet` (attention, cuda_graph, channels_last, "
                         "fuse_qkv, unet_body and compile act on the UNet; pass them as False to swap the scheduler "
                         "alone)")

    state = OptimizeState(models=models)
    state.choices = {name: _resolve(model, **choices) for name, model in models.items()}
    try:
        _apply(pipe, models, state, scheduler=scheduler, compile_options=options, compile_cache=compile_cache)
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


def _to_channels_last(model: nn.Module) -> list:
    """Every 4-D parameter and buffer of ``model`` that is not channels_last already gets a channels_last copy
    as its data (the same tensor objects). Returns [(tensor, its strides before)] for restore."""
    changed = []
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is None or tensor.dim() != 4 or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    if tensor.is_contiguous(memory_format=torch.channels_last):
                        continue
                    changed.append((tensor, tensor.stride()))
                    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return changed


def _restore_layout(changed: list) -> None:
    """Gives each tensor back the strides it had (its current values copied), unless its layout was changed
    since by someone else (then it is left as it is)."""
    with torch.no_grad():
        for tensor, stride in changed:
            if tensor.stride() == stride or not tensor.is_contiguous(memory_format=torch.channels_last):
                continue
            tensor.data = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype,
                                              device=tensor.device).copy_(tensor.data)


def _cache_file(model: nn.Module, options: dict, compile_cache, state: OptimizeState, name: str):
    if compile_cache is False:
        return None
    folder = cache_dir() if compile_cache is True else Path(compile_cache)
    if folder is None:  # DDIM_FAST_CACHE_DIR set empty: memory only
        return None
    choices = dict(state.choices.get(name.split(".")[0], {}))
    choices["processors"] = sorted({type(p).__name__ for p in getattr(model, "attn_processors", {}).values()})
    return folder / f"{type(model).__name__}-{cache_key(model, options, choices)}.bin"


def _apply(pipe, models: dict, state: OptimizeState, *, scheduler, compile_options: dict | None,
           compile_cache) -> None:
    """The work of optimize, recording every change in `state` as it is made (so that _undo can revert a
    partial run). Order: what changes a model's body (processors, UNet-body fusion, fused projections, layouts) before what
    wraps its forward (compile, graphs)."""
    for name, model in models.items():
        choice = state.choices[name]
        if choice["attention"]:
            # Modules the kernels cannot serve keep their processors (the summary names them and says why); even
            # when none can be served, the scheduler and the graphs are still worth having.
            state.attention[name] = fuse_attention(model)
        if choice["unet_body"]:
            # Instance-level forwards on ResnetBlock2D / GEGLU / GroupNorm (parameters read at call time); the
            # modules they cannot reproduce exactly keep their forward (named, with the reason, in the summary).
            state.unet_body[name] = fuse_unet_body(model)
        if choice["fuse_qkv"]:
            state.qkv[name] = fuse_qkv(model)
        if choice["channels_last"]:
            state.channels_last[name] = _to_channels_last(model)

    if scheduler is not False:
        _swap_schedulers(pipe, scheduler, state)

    pools = graphs.GraphPools()  # one memory pool per device for every graphed model of this pipeline
    for name, model in models.items():
        choice = state.choices[name]
        if choice["cuda_graph"] is False and compile_options is None:
            continue
        for target_name, target in _graph_targets(name, model).items():
            if _is_wrapped(target):
                logger.info("ddim_fast.optimize: %s is graphed or compiled already (shared with another optimized "
                            "pipeline); leaving it as it is", target_name)
                continue
            forward = None
            if compile_options is not None:
                qkv = state.qkv.get(name)
                compiled = CompiledForward(target, compile_options,
                                           before_call=[qkv.revalidate] if qkv is not None and qkv.count else [],
                                           cache_file=_cache_file(target, compile_options, compile_cache, state,
                                                                  target_name))
                state.compiled[target_name] = compiled
                forward = compiled
            if choice["cuda_graph"] is False:
                compiled.install()
                continue
            off_cuda = "static" if choice["cuda_graph"] is True else "passthrough"
            state.graphed[target_name] = GraphedForward(target, pools=pools, off_cuda=off_cuda,
                                                        forward=forward).install()


def _is_wrapped(module: nn.Module) -> bool:
    from ddim_fast.module_graph import _InstalledForward

    forward = module.__dict__.get("forward")
    return isinstance(forward, _InstalledForward) or getattr(forward, "_ddim_fast_compiled", False)


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
    for name, fused in state.unet_body.items():
        counts = fused.counts
        part = (f"{name} body: {len(fused.patched) + fused.already} modules fused ("
                + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + ")")
        if fused.skipped:
            part += f", {len(fused.skipped)} kept ({fused.skipped_summary()})"
        parts.append(part)
    for name, fused in state.qkv.items():
        total = fused.count + len(fused.unserved)
        part = f"{name} QKV projections: {fused.count} of {total} attention modules fused"
        if fused.unserved:
            part += f" ({fused.unserved_summary()})"
        parts.append(part)
    for name, changed in state.channels_last.items():
        parts.append(f"{name} weights channels_last ({len(changed)} tensors)")
    if state.compiled:
        options = next(iter(state.compiled.values())).options
        parts.append(f"torch.compile({', '.join(f'{k}={v!r}' for k, v in options.items())}): "
                     + ", ".join(state.compiled))
    if state.graphed:
        static = [name for name, graphed in state.graphed.items() if graphed.off_cuda == "static"]
        parts.append("CUDA graphs (calls on CUDA"
                     + (f"; eager static buffers off CUDA for {', '.join(static)}" if static else "")
                     + "): " + ", ".join(state.graphed))
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
    """Reverts what `state` records, last change first: graphs, compiled forwards, layouts, fused projections,
    the UNet-body fusion, attention processors, schedulers."""
    for graphed in state.graphed.values():
        graphed.uninstall()
    for compiled in state.compiled.values():
        compiled.uninstall()
    for changed in state.channels_last.values():
        _restore_layout(changed)
    for name, fused in state.qkv.items():
        unfuse_qkv(state.models[name], fused)
    for name, fused in state.unet_body.items():
        unfuse_unet_body(state.models[name], fused)
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
