"""A model's ``forward`` replayed from CUDA graphs: :class:`GraphedForward`, what ``ddim_fast.optimize(pipe)``
puts on a pipeline's UNet (and ControlNet) so that the pipeline's own loop replays ~1,000 kernels per call as one
graph. Built on ``ddim_fast.graphs`` (static buffers, capture on a side stream, one memory pool per cache).

Per call, in order:

1. **Eager pass-through** (the original forward, untouched) when a graph cannot be right: autograd is on
   (training), the model is in train mode (dropout draws), under ``torch.compile`` tracing, after a capture
   failed once (a host sync or data-dependent shapes: one warning, then always eager), or when an argument
   is an object whose state a key cannot describe (one warning per type).
2. The arguments are bound to the original signature (positional or keyword calls give one key) and the
   ``timestep`` argument becomes data: a Python number turns into the ``[1]`` tensor the UNet would build
   itself (int64, or float64 for a float), a 0-d tensor is moved to the sample's device, so every step of a
   loop replays one graph with its timestep copied in.
3. The **module fingerprint** is taken: every submodule (identity, train flag), every parameter and buffer
   (data pointer and dtype), every diffusers attention processor and instance-level ``forward`` override
   (identity), forward hooks, and PEFT adapter state (active / merged / disabled adapters, LoRA scalings).
   When it differs from the one the cached graphs were captured under, the cache is dropped (counted in
   ``invalidations``) and the call recaptures: adding or removing adapters, changing processors, ``.to()``,
   or assigning new weight tensors never replays a stale graph. Weights changed *in place* (``fuse_lora``
   without safe merge, ``load_state_dict`` into the same tensors, ``param.data.copy_``) keep their
   addresses: the graphs stay valid and the next replay reads the new values. The walk is host work on
   every call (measured: 0.6 ms for SD1.5's 709 modules and 686 parameters on the 2-core build machine);
   PyTorch has no cheaper signal for all of these changes (``.to()`` and ``param.data = ...`` notify
   nothing), and in a pipeline's loop it overlaps with the previous replay still running on the GPU.
4. The **key** (``graphs.tree_signature`` of the bound arguments: shapes, dtypes, strides, devices, the
   structure of nested dicts / lists / tuples, the values of Python scalars such as a LoRA ``scale`` in
   ``cross_attention_kwargs`` or ``return_dict``; plus the autocast state) selects a cache entry; a miss
   builds static buffers and captures (warm-up on the side stream first), a hit copies the arguments into
   the entry's static buffers.
5. Replay, then **copy out**: the returned outputs are fresh tensors (clones of the graph's static outputs,
   strides kept), never the static outputs themselves, so nothing the pipeline holds from one call (e.g.
   ``noise_pred_uncond`` read after a second UNet call, as SAG does) is overwritten by the next replay. The
   copy is one small device kernel per output tensor (a UNet's output is the latents' size).

On the CPU (or any non-CUDA device) steps 2-5 run the same way with ``graphs.EagerStep`` (the forward runs
eagerly over the static buffers), so this logic is exercised and tested without a GPU; the outputs equal the
plain forward's bit for bit.

Not combined with: ``torch.compile(unet)`` (compile the original instead, or use one of the two), and
accelerate's model CPU offload (the weights move every call, so every call would recapture).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from ddim_fast import graphs

logger = logging.getLogger(__name__)

__all__ = ["GraphedForward", "module_fingerprint"]

_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


# --------------------------------------------------------------------------------------------------
# What a captured graph depends on besides its inputs
# --------------------------------------------------------------------------------------------------


def _peft_state(state: dict) -> tuple:
    """The Python-side state of a PEFT tuner layer (``BaseTunerLayer``) that its forward branches on or
    multiplies by: active adapters, disabled flag, merged adapters and the LoRA ``scaling`` floats
    (``set_adapters(weights=...)`` and diffusers' LoRA ``scale`` change those)."""
    active = state.get("_active_adapter")
    scaling = state.get("scaling")
    return (
        "peft",
        tuple(active) if isinstance(active, (list, tuple)) else active,
        bool(state.get("_disable_adapters", False)),
        tuple(state.get("merged_adapters", ())),
        tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None,
    )


def module_fingerprint(root: nn.Module) -> tuple[tuple, list]:
    """(fingerprint, refs): a tuple that changes whenever something a captured graph of ``root`` bakes in
    changes, and the objects whose ``id`` it contains (keep ``refs`` alive with the fingerprint, so that no
    id can be reused by a new object while the fingerprint is compared against).

    Covered: the module tree (each submodule's identity in depth-first order, its train flag, hooks,
    instance ``forward`` overrides below the root, diffusers attention processors), each parameter's and
    buffer's data pointer and dtype (a new tensor, a dtype or device move), PEFT adapter state. Not
    covered: values of tensors (replays read them live), and arbitrary Python attributes of custom modules
    (set them before optimizing, or call ``GraphedForward.clear()`` after changing them)."""
    items: list = []
    refs: list = []
    stack = [root]
    while stack:
        module = stack.pop()
        state = module.__dict__
        refs.append(module)
        items.append(id(module))
        items.append(state.get("training", False))
        for tensors in (state.get("_parameters"), state.get("_buffers")):
            if tensors:
                for tensor in tensors.values():
                    if tensor is None:
                        items.append(None)
                    else:
                        items.append(tensor.data_ptr())
                        items.append(tensor.dtype)
        processor = state.get("processor")
        if processor is not None:
            refs.append(processor)
            items.append(("processor", id(processor)))
        if module is not root:
            forward = state.get("forward")
            if forward is not None:
                refs.append(forward)
                items.append(("forward", id(forward)))
        if state.get("_forward_pre_hooks") or state.get("_forward_hooks"):
            items.append(("hooks", tuple(state["_forward_pre_hooks"]), tuple(state["_forward_hooks"])))
        if "_active_adapter" in state:
            items.append(_peft_state(state))
        children = state.get("_modules")
        if children:
            stack.extend(child for child in reversed(children.values()) if child is not None)
    return tuple(items), refs


def _autocast_state() -> tuple:
    state = []
    for device_type in ("cuda", "cpu"):
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except (TypeError, RuntimeError):  # a build without this device type's autocast
            continue
        state.append((device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None))
    return tuple(state)


# --------------------------------------------------------------------------------------------------
# Arguments and outputs
# --------------------------------------------------------------------------------------------------


def _fresh_containers(tree: Any) -> Any:
    """The same tensors in new dicts / lists / tuples: the forward may consume a list it is given (the UNet
    ``pop``s T2I-Adapter residuals), which must not empty the static inputs between warm-up, capture and
    eager replays."""
    if isinstance(tree, dict):
        return {key: _fresh_containers(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_fresh_containers(value) for value in tree]
    if isinstance(tree, tuple):
        return tuple(_fresh_containers(value) for value in tree)
    return tree


def _copy_out(tree: Any) -> Any:
    """Clones of the tensors of an output pytree in the same containers; diffusers' ``BaseOutput`` (an
    OrderedDict dataclass, e.g. ``UNet2DConditionOutput``) is rebuilt as its own class."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()  # preserve_format: a dense tensor keeps its strides (channels_last stays so)
    if isinstance(tree, collections.OrderedDict) and dataclasses.is_dataclass(tree):
        return type(tree)(**{key: _copy_out(value) for key, value in tree.items()})
    if isinstance(tree, dict):
        return type(tree)((key, _copy_out(value)) for key, value in tree.items())
    if isinstance(tree, list):
        return [_copy_out(value) for value in tree]
    if isinstance(tree, tuple):
        copied = tuple(_copy_out(value) for value in tree)
        return type(tree)(*copied) if hasattr(tree, "_fields") else copied
    return tree


def _first_tensor(tree: Any) -> torch.Tensor | None:
    tensors = graphs.tree_tensors(tree)
    return tensors[0] if tensors else None


def _timestep_tensor(timestep: Any, like: torch.Tensor | None) -> Any:
    """The timestep as a device tensor the forward treats exactly as it treats the original: a Python number
    becomes the ``[1]`` tensor diffusers' ``get_time_embed`` builds from it (int64, or float64 for a float;
    float32 on MPS, where float64 does not exist) with a fill kernel (no host-to-device copy); a 0-d tensor
    moves to the sample's device (``get_time_embed`` does ``timesteps[None].to(sample.device)``). Anything
    else is returned unchanged."""
    if like is None:
        return timestep
    device = like.device
    if isinstance(timestep, bool):
        return timestep
    if isinstance(timestep, int):
        return torch.full((1,), timestep, dtype=torch.int64, device=device)
    if isinstance(timestep, float):
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return torch.full((1,), timestep, dtype=dtype, device=device)
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 0 and timestep.device != device:
        return timestep.to(device)
    return timestep


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------


class GraphedForward:
    """Replays ``module``'s forward from CUDA graphs cached per call signature (see the module docstring for
    the exact rules). :meth:`install` puts it on the module as an instance ``forward`` (so ``module(...)``,
    hooks and ``inspect.signature(module.forward)`` behave as before), :meth:`uninstall` takes it off.

    module: any ``nn.Module`` whose forward takes tensors, nested dicts / lists / tuples of them and Python
    scalars (a diffusers ``UNet2DConditionModel``: sample [B, C, H, W], timestep (int, float, 0-d or [B]
    tensor), encoder_hidden_states [B, L, D], timestep_cond, added_cond_kwargs {"text_embeds", "time_ids"},
    down_block_additional_residuals (tuple of [B, C_i, H_i, W_i]), mid_block_additional_residual, ...).
    cache_size: graphs kept (LRU; all share one memory pool per device). use_graph: False runs the static-
    buffer path eagerly everywhere (what the CPU always does). timestep_arg: the argument treated as data.
    pools: a ``graphs.GraphPools`` to share (one pool for a pipeline's UNet and ControlNet).

    The graphs live in ``self.cache``, a ``graphs.GraphRunner`` (captures never fall back silently here: a
    failed capture disables the wrapper with one warning; under autocast the weight casts are recorded in the
    graph, ``autocast_weights="recast"``, see ``_build``). Counters: ``calls``, ``eager_calls``
    (pass-through), ``cache.hits`` / ``cache.misses`` (graph entries), ``invalidations`` (cache dropped on a
    fingerprint change); ``last_key`` is the key of the last static-buffer call.
    """

    def __init__(self, module: nn.Module, *, cache_size: int = 8, use_graph: bool = True,
                 timestep_arg: str = "timestep", pools: graphs.GraphPools | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"GraphedForward: module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(getattr(module, "forward", None), _InstalledForward):
            raise ValueError(f"GraphedForward: {type(module).__name__}.forward is already graphed")
        self.module = module
        # What restore puts back: the instance attribute if there was one, else nothing (the class's forward).
        self._had_instance_forward = "forward" in module.__dict__
        self._previous_instance_forward = module.__dict__.get("forward")
        self.original_forward: Callable[..., Any] = module.forward
        self.signature = inspect.signature(self.original_forward)
        self._params = list(self.signature.parameters.values())
        self.timestep_arg = timestep_arg
        self.use_graph = bool(use_graph)
        # "recast": under torch.autocast with fp32 weights, the casts stay inside the graph. Hoisting them
        # (graphs.py's default) would serve stale half copies after PEFT's fuse_lora / merge, which write
        # through param.data without bumping a version counter; pipelines that want the speed load fp16
        # weights (torch_dtype=torch.float16), which need no cast at all.
        self.cache = graphs.GraphRunner(cache_size, pools=pools, fallback=False, autocast_weights="recast")
        self.enabled = True
        self.disabled_reason: str | None = None
        self._fingerprint: tuple | None = None
        self._fingerprint_refs: list = []
        self.invalidations = 0
        self.calls = 0
        self.eager_calls = 0
        self.last_key: Any = None
        self._installed: _InstalledForward | None = None

    # ---- installation ---------------------------------------------------------------------------

    def install(self) -> "GraphedForward":
        """Makes ``module.forward`` (and so ``module(...)``) go through this wrapper."""
        if self._installed is None:
            self._installed = _InstalledForward(self)
            self.module.forward = self._installed
        return self

    def uninstall(self) -> bool:
        """Puts back the forward the module had and drops the graphs. Returns False (and only disables the
        wrapper, which then passes every call through) when something else has replaced ``module.forward``
        since, e.g. a hook library wrapping it: removing ours would remove theirs too."""
        self.clear()
        installed, self._installed = self._installed, None
        if installed is None:
            return True
        if self.module.__dict__.get("forward") is not installed:
            self.enabled = False
            logger.warning("ddim_fast: %s.forward was wrapped again after optimize(); the CUDA-graph wrapper "
                           "now passes every call through instead of being removed", type(self.module).__name__)
            return False
        if self._had_instance_forward:
            self.module.forward = self._previous_instance_forward
        else:
            del self.module.forward
        return True

    def clear(self) -> None:
        """Drops every captured graph (and their memory pool); the next call captures again."""
        self.cache.clear()
        self._fingerprint = None
        self._fingerprint_refs = []

    # ---- the call -------------------------------------------------------------------------------

    def _passthrough_reason(self) -> str | None:
        if not self.enabled:
            return "disabled"
        if self.disabled_reason is not None:
            return self.disabled_reason
        if torch.is_grad_enabled():
            return "autograd is enabled"
        if self.module.training:
            return "the model is in train mode"
        if torch.compiler.is_compiling():
            return "torch.compile is tracing"
        return None

    def _call_original(self, values: dict) -> Any:
        args: list = []
        kwargs: dict = {}
        for param in self._params:
            value = values[param.name]
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                args.append(value)
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(value)
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            else:
                kwargs[param.name] = value
        return self.original_forward(*args, **kwargs)

    def _refresh_fingerprint(self) -> None:
        fingerprint, refs = module_fingerprint(self.module)
        if fingerprint != self._fingerprint:
            if len(self.cache):
                self.invalidations += 1
                logger.info("ddim_fast: %s changed (modules, processors, adapters or weight tensors); dropping "
                            "%d captured graph(s), the next calls capture again", type(self.module).__name__,
                            len(self.cache))
                self.cache.clear()
            self._fingerprint = fingerprint
        self._fingerprint_refs = refs

    def __call__(self, *args, **kwargs) -> Any:
        self.calls += 1
        if self._passthrough_reason() is not None:
            self.eager_calls += 1
            return self.original_forward(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        # The device the timestep goes to: the sample's (the UNet moves it there), else the first tensor's.
        anchor = _first_tensor(values.get("sample"))
        if anchor is None:
            anchor = _first_tensor(values)
        if self.timestep_arg in values:
            values[self.timestep_arg] = _timestep_tensor(values[self.timestep_arg], anchor)
        try:
            signature = graphs.tree_signature(values)
        except TypeError as exc:
            _warn_once(f"signature-{type(self.module).__name__}-{exc}",
                       "ddim_fast: %s is called with an argument a graph key cannot describe (%s); those calls "
                       "run eagerly", type(self.module).__name__, exc)
            self.eager_calls += 1
            return self.original_forward(*args, **kwargs)
        if anchor is None:
            self.eager_calls += 1
            return self.original_forward(*args, **kwargs)

        self._refresh_fingerprint()
        key = (signature, _autocast_state())
        self.last_key = key
        device = anchor.device
        one_cuda_device = device.type == "cuda" and all(t.device == device for t in graphs.tree_tensors(values))
        use_graph = self.use_graph and one_cuda_device and graphs.cuda_graphs_available(device)
        try:
            runner = self.cache.prepare(key, values, self._forward_on_static, use_graph=use_graph)
        except graphs.GraphCaptureError as exc:  # from now on every call passes through
            self.disabled_reason = f"capture failed: {exc}"
            logger.warning("ddim_fast: %s cannot be captured into a CUDA graph (%s); it runs eagerly from now on "
                           "(same results, no graph speed-up). Typical causes: a host sync (.item(), .cpu(), "
                           "printing a tensor) or data-dependent shapes in its forward.",
                           type(self.module).__name__, exc)
            self.eager_calls += 1
            return self.original_forward(*args, **kwargs)
        return _copy_out(runner.replay())

    def _forward_on_static(self, static: dict) -> Any:
        return self._call_original(_fresh_containers(static))


class _InstalledForward:
    """The instance ``forward`` put on a graphed module: calls the wrapper, and looks like the original to
    ``inspect.signature`` (``__wrapped__``) so that code probing the forward's parameters sees no change."""

    def __init__(self, wrapper: GraphedForward):
        functools.update_wrapper(self, wrapper.original_forward)
        self.wrapper = wrapper

    def __call__(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<ddim_fast graphed forward of {type(self.wrapper.module).__name__}>"
