"""A model's ``forward`` replayed from CUDA graphs: :class:`GraphedForward`, what ``ddim_fast.optimize(pipe)``
puts on a pipeline's UNet (and ControlNet) so that the pipeline's own loop replays ~1,000 kernels per call as one
graph. Built on ``ddim_fast.graphs`` (static buffers, capture on a side stream, one memory pool per cache).

Per call, in order:

1. **Pass-through** (the forward as it is, nothing copied) when a graph cannot be right or cannot help:
   autograd is on (training), the model is in train mode (dropout draws), Dynamo is tracing the call (the
   module's own forward is traced), after a capture failed once (a host sync or data-dependent shapes: one
   warning, then always eager), when an argument is an object whose state a key cannot describe (one
   warning per type), and, by default (``off_cuda="passthrough"``), for a call whose first argument is not on
   a CUDA device: CUDA graphs do nothing on the CPU, where the static-buffer copies would only cost time.
2. The arguments are bound to the original signature by name, in its order, defaults filled in (positional
   or keyword calls give one key; ``inspect.Signature.bind`` checks the first call of each shape, later ones
   reuse its plan) and the ``timestep`` argument becomes data: a Python number turns into the ``[1]`` tensor
   the UNet would build itself (int64, or float64 for a float), a 0-d tensor is moved to the sample's device,
   so every step of a loop replays one graph with its timestep copied in.
3. The **module watch** (:class:`ModuleWatch`) checks that nothing a graph bakes in changed: every submodule
   in its slot, every parameter and buffer (object, data pointer and dtype), train flags, instance-level
   ``forward`` overrides, diffusers attention processors, forward hooks, PEFT adapter state (active / merged /
   disabled adapters, LoRA scalings). On a change the cache is dropped (counted in ``invalidations``) and the
   call recaptures: adding or removing adapters, changing processors, ``.to()``, or assigning new weight
   tensors never replays a stale graph. Weights changed *in place* (``fuse_lora`` without safe merge,
   ``load_state_dict`` into the same tensors, ``param.data.copy_``) keep their addresses: the graphs stay
   valid and the next replay reads the new values. The check is host work on every call, kept to C-level
   passes over lists the watch built once (see its docstring for how each change is caught); in a pipeline's
   loop it overlaps with the previous replay still running on the GPU.
4. The **key** (the bound arguments' structure: nested dicts / lists / tuples and their keys; per tensor its
   shape, dtype, device and strides; per Python scalar its type and value, such as a LoRA ``scale`` in
   ``cross_attention_kwargs`` or ``return_dict``; plus the autocast state) selects a cache entry; a miss
   builds static buffers and captures (warm-up on the side stream first), a hit copies the call's tensors
   into the entry's static buffers (one flattening of the arguments serves the key and the copies).
5. Replay, then **copy out**: the returned outputs are fresh tensors (clones of the graph's static outputs,
   strides kept), never the static outputs themselves, so nothing the pipeline holds from one call (e.g.
   ``noise_pred_uncond`` read after a second UNet call, as SAG does) is overwritten by the next replay. The
   copy is one small device kernel per output tensor (a UNet's output is the latents' size).

With ``off_cuda="static"`` steps 2-5 also run on the CPU (or any non-CUDA device) with ``graphs.EagerStep`` (the
forward runs eagerly over the static buffers), so this logic is exercised and tested without a GPU; the outputs
equal the plain forward's bit for bit.

``torch.compile``: pass the compiled forward as ``forward=`` (what ``optimize(pipe, compile=...)`` does): it runs
inside the graphs (Inductor's kernels captured, its Python and guards replaced by the replay) and on
pass-through calls. Replays skip Dynamo's guards; the key and the watch cover what they check (shapes,
dtypes, strides, Python scalars, grad mode, the parameters' identity and storage), and a call that changes one
of them misses and warms up through the compiled forward again, which re-checks its guards (recompiling if
needed) before capture. Wrapping a graphed module in ``torch.compile`` from outside traces its original
forward (no graphs inside a compiled region). Not combined with accelerate's model CPU offload (the weights
move every call, so every call would recapture).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import logging
import operator
import weakref
from itertools import chain, repeat
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from ddim_fast import graphs
from ddim_fast.forward_override import ForwardOverride

logger = logging.getLogger(__name__)

__all__ = ["GraphedForward", "ModuleWatch"]

_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


# --------------------------------------------------------------------------------------------------
# What a captured graph depends on besides its inputs
# --------------------------------------------------------------------------------------------------

_FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_PEFT_STATE = ("_active_adapter", "_disable_adapters", "merged_adapters", "scaling")
# diffusers' FreeU factors, set on the UNet's up blocks by enable_freeu / disable_freeu and read by their forward.
_FREEU_STATE = ("s1", "s2", "b1", "b2")
_PLAIN = (bool, int, float, str, type(None))


def _plain_state(obj: Any) -> tuple:
    """The plain Python state of an attention processor, by value: its attributes holding scalars or lists /
    tuples of scalars (IP-Adapter's ``scale`` list, which ``set_ip_adapter_scale`` edits in place)."""
    return tuple((name, repr(value)) for name, value in getattr(obj, "__dict__", {}).items()
                 if type(value) in _PLAIN or (type(value) in (list, tuple) and all(type(v) in _PLAIN for v in value)))
_dtype_of = operator.attrgetter("dtype")

# Bumped by PyTorch's global registration hooks (installed with the first ModuleWatch) for every module, parameter
# and buffer set through nn.Module (setattr, register_*, add_module, ModuleList/ModuleDict/Sequential edits,
# load_state_dict(assign=True), PEFT wrapping a layer) into a module some watch has seen. Registrations into other
# modules are not counted: diffusers' blocks build temporary containers in every forward (``self.resnets[1:]``
# makes a new ModuleList), which would otherwise flag every check; nor are those made while Dynamo traces (it
# would guard on the counter and recompile on every call).
_registrations = [0]
_registration_hooks: list = []
_watched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _count_registration(module, name, value):
    if not torch.compiler.is_compiling() and module in _watched:
        _registrations[0] += 1


def _install_registration_hooks() -> None:
    if not _registration_hooks:
        _registration_hooks.extend([
            torch_module.register_module_module_registration_hook(_count_registration),
            torch_module.register_module_parameter_registration_hook(_count_registration),
            torch_module.register_module_buffer_registration_hook(_count_registration),
        ])


def _own_dict(state: dict, name: str) -> dict:
    value = state.get(name)
    return value if isinstance(value, dict) else {}


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class ModuleWatch:
    """Tells, cheaply and exactly, whether anything a captured graph of ``root`` bakes in has changed since the
    last look: :meth:`changed` is called before every replay.

    What a graph bakes in, in ``root``'s whole module tree:

    * the tree: which module sits in each slot of each ``_modules`` dict (identity, names, order);
    * every parameter and buffer slot (the tensor object, or None) and each tensor's data pointer and dtype
      (new tensors, ``param.data = ...`` as PEFT's safe merge does, ``.to()`` / ``.half()``);
    * each module's train flag and instance ``forward`` override (below the root), diffusers attention
      processors (identity, and each processor's plain attributes by value: IP-Adapter's ``scale``), forward
      (pre-)hooks, per module and PyTorch's global ones;
    * PEFT tuner layers' Python state (active / disabled / merged adapters, LoRA ``scaling``);
    * diffusers' FreeU factors (``s1``, ``s2``, ``b1``, ``b2`` on the up blocks: ``enable_freeu`` / ``disable_freeu``).

    Not baked in: tensor values (replays read them live, so in-place weight updates need no recapture). Not
    watched: other Python attributes of modules (set them before the first call, or call
    ``GraphedForward.clear()``).

    How a check stays cheap without missing a change. The tree is walked once (and again whenever a check
    flags something; the walk's full snapshot then decides, so nothing unrelated costs a recapture). A check
    reads only what can change without a notification, with C-level passes (``map`` over lists built by the
    walk, no Python loop per module):

    * modules, parameters and buffers *set* through ``nn.Module`` (``setattr``, ``register_*``, ``add_module``,
      container ``__setitem__``/``append``, ``load_state_dict(assign=True)``, PEFT's layer replacement) into a
      module some watch has walked run PyTorch's global registration hooks, which bump a counter (checked); *removals*
      (``del``, ``ModuleList.pop``) and ``ModuleList.insert`` (which writes ``_modules`` directly) change the
      size of a ``_modules`` / ``_parameters`` / ``_buffers`` dict (the total size is checked);
    * hooks: registering one anywhere creates a ``torch.utils.hooks.RemovableHandle``, which bumps the class
      counter ``RemovableHandle.next_id`` (checked); removing one shrinks a non-empty hook dict (their total
      size is checked);
    * per tensor, its data pointer and dtype; per parameter / buffer slot, its object (setting one to None
      runs no hook); per module, its train flag and instance ``forward``; processors and PEFT state by
      identity / value.

    The one change left unseen: writing a ``_modules`` / ``_parameters`` / ``_buffers`` dict directly (not through
    ``nn.Module``) so that its size stays the same; PyTorch, diffusers and PEFT never do, and the next walk (any
    check that flags something) still sees it. Measured with SD1.5's UNet (709 modules, 686 parameters) in
    ``benchmarks/bench_graph_host.py``."""

    def __init__(self, root: nn.Module):
        _install_registration_hooks()
        self.root = root
        self.walks = 0
        self._walk()

    def _walk(self) -> None:
        modules: list[nn.Module] = []
        stack = [self.root]
        while stack:
            module = stack.pop()
            modules.append(module)
            children = module.__dict__.get("_modules")
            if children:
                stack.extend(child for child in reversed(children.values()) if child is not None)
        self.walks += 1
        _watched.update(modules)
        dicts = [module.__dict__ for module in modules]
        self._modules = modules  # keeps every object the full snapshot holds by identity alive
        self._dicts = dicts
        self._below_root = dicts[1:]
        self._tensor_dicts = [tensors for d in dicts for name in ("_parameters", "_buffers")
                              if (tensors := _own_dict(d, name))]
        self._tensors = [t for tensors in self._tensor_dicts for t in tensors.values() if t is not None]
        self._hook_dicts = [hooks for d in dicts for name in _FORWARD_HOOK_DICTS if (hooks := _own_dict(d, name))]
        self._sized = [_own_dict(d, name) for d in dicts for name in ("_modules", "_parameters", "_buffers")]
        self._sized += self._hook_dicts
        self._overridden = [d for d in self._below_root if "forward" in d]
        self._attention = [d for d in dicts if "processor" in d]
        self._peft = [d for d in dicts if "_active_adapter" in d]
        self._freeu = [d for d in dicts if any(name in d for name in _FREEU_STATE)]
        self._processors = list({id(d["processor"]): d["processor"] for d in self._attention}.values())
        self._quick = self._take()
        # The full snapshot (compared after a walk): every slot's object by identity, every hook by id.
        self._full = (
            [(name, list(_own_dict(d, name).items())) for d in dicts for name in ("_modules", "_parameters",
                                                                                   "_buffers")],
            [list(_own_dict(d, name)) for d in dicts for name in _FORWARD_HOOK_DICTS],
            list(torch_module._global_forward_hooks), list(torch_module._global_forward_pre_hooks),
        )
        self._full_forwards = [d.get("forward") for d in self._below_root]

    def _take(self) -> tuple:
        """The quick snapshot: fields 0-5 compare by value, 6-8 by identity."""
        dicts, tensors, peft = self._dicts, self._tensors, self._peft
        return (
            (_registrations[0], RemovableHandle.next_id, len(torch_module._global_forward_hooks),
             len(torch_module._global_forward_pre_hooks), sum(map(len, self._sized)), sum(map(len, dicts))),
            list(map(Tensor.data_ptr, tensors)),
            list(map(_dtype_of, tensors)),
            list(map(dict.get, dicts, repeat("training"))),
            # PEFT state by value (PEFT changes its lists and dicts in place); repr of str/bool/float is exact
            [list(map(repr, map(dict.get, peft, repeat(name)))) for name in _PEFT_STATE] if peft else None,
            # FreeU factors and the processors' plain attributes, by value
            ([tuple(map(d.get, _FREEU_STATE)) for d in self._freeu], list(map(_plain_state, self._processors))),
            list(map(dict.get, self._overridden, repeat("forward"))),
            list(map(dict.get, self._attention, repeat("processor"))),
            # a slot set to None runs no registration hook
            list(chain.from_iterable(map(dict.values, self._tensor_dicts))),
        )

    @staticmethod
    def _same_quick(a: tuple, b: tuple, start: int = 0) -> bool:
        return (all(x == y for x, y in zip(a[start:6], b[start:6]))
                and all(_same_objects(x, y) for x, y in zip(a[6:], b[6:])))

    @staticmethod
    def _same_full(a: tuple, b: tuple) -> bool:
        slots_a, slots_b = a[0], b[0]
        return (len(slots_a) == len(slots_b)
                and all(na == nb and len(ia) == len(ib) and all(ka == kb and va is vb for (ka, va), (kb, vb)
                                                                in zip(ia, ib))
                        for (na, ia), (nb, ib) in zip(slots_a, slots_b))
                and a[1:] == b[1:])

    def changed(self) -> bool:
        """Whether what the graphs bake in changed since the last call (or construction). Cheap when nothing
        changed; when something may have, walks the tree again and answers exactly."""
        old_quick, old_full, old_forwards = self._quick, self._full, self._full_forwards
        if self._same_quick(self._take(), old_quick):
            return False
        self._walk()  # the old snapshots keep the previous objects alive: no identity can be reused meanwhile
        # Field 0 only says that something was registered somewhere: the full snapshot says what.
        return not (self._same_quick(self._quick, old_quick, start=1) and self._same_full(self._full, old_full)
                    and _same_objects(self._full_forwards, old_forwards))


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

_SCALARS = (bool, int, float, str, torch.dtype, torch.device, type(None))


class _NotFlat(TypeError):
    """A container type the fast flattening does not know (the key then comes from torch's pytree)."""


def _flatten(tree: Any, leaves: list) -> Any:
    """Appends the leaves of `tree` (dicts, OrderedDicts, lists, tuples and namedtuples of tensors and Python
    scalars) to `leaves` in order and returns a hashable description of its structure (container types, dict
    keys, lengths). Raises _NotFlat for any other container or leaf: the caller then uses torch's pytree."""
    kind = type(tree)
    if kind is dict or kind is collections.OrderedDict:
        return (kind, tuple(tree), tuple(_flatten(value, leaves) for value in tree.values()))
    if kind is list or kind is tuple or (isinstance(tree, tuple) and hasattr(kind, "_fields")):
        return (kind, tuple(_flatten(value, leaves) for value in tree))
    if isinstance(tree, Tensor) or kind in _SCALARS:
        leaves.append(tree)
        return None
    raise _NotFlat(kind.__name__)


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, Tensor):
        return (leaf.shape, leaf.dtype, leaf.device, leaf.stride())
    return (type(leaf), leaf)


def _key_and_leaves(values: Any) -> tuple[Any, list]:
    """(key, leaves): a key covering everything a capture over ``values`` bakes in (structure; per tensor its
    shape, dtype, device and strides; per scalar its type and value), and the leaves in the order
    :func:`_static_leaves` lists a static copy's. Raises TypeError for a leaf no key can describe."""
    leaves: list = []
    try:
        structure = _flatten(values, leaves)
    except _NotFlat:
        leaves = pytree.tree_leaves(values)
        return ("pytree", graphs.tree_signature(values)), leaves
    return (structure, tuple(map(_leaf_key, leaves))), leaves


def _static_leaves(key: Any, static: Any) -> list:
    """The leaves of a static copy, flattened the way ``key`` was made (so they pair with the call's leaves)."""
    if key[0] == "pytree":
        return pytree.tree_leaves(static)
    leaves: list = []
    _flatten(static, leaves)
    return leaves


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


def _copy_out(tree: Any, sample: torch.Tensor | None = None) -> Any:
    """Clones of the tensors of an output pytree in the same containers; diffusers' ``BaseOutput`` (an
    OrderedDict dataclass, e.g. ``UNet2DConditionOutput``) is rebuilt as its own class. An output of the
    contiguous ``sample``'s shape (the UNet's prediction) comes out contiguous, as the plain model's does, even
    when channels_last weights made it channels_last inside the graph: the pipeline's guidance and the fused
    step then see one layout (the step's lean kernel needs that) and callbacks see plain's strides. Everything
    else keeps its strides (preserve_format)."""
    if isinstance(tree, torch.Tensor):
        if (sample is not None and tree.shape == sample.shape and not tree.is_contiguous()
                and sample.is_contiguous()):
            return tree.contiguous()
        return tree.clone()
    if isinstance(tree, collections.OrderedDict) and dataclasses.is_dataclass(tree):
        return type(tree)(**{key: _copy_out(value, sample) for key, value in tree.items()})
    if isinstance(tree, dict):
        return type(tree)((key, _copy_out(value, sample)) for key, value in tree.items())
    if isinstance(tree, list):
        return [_copy_out(value, sample) for value in tree]
    if isinstance(tree, tuple):
        copied = tuple(_copy_out(value, sample) for value in tree)
        return type(tree)(*copied) if hasattr(tree, "_fields") else copied
    return tree


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


class _Binder:
    """Binds a call's arguments to the forward's parameters, by name, in the signature's order, defaults
    filled in: what ``inspect.Signature.bind`` + ``apply_defaults`` give (so positional and keyword calls
    give one key), without their per-call cost. The first call of each shape (number of positional
    arguments, keyword names) is checked with ``Signature.bind``, which raises ``TypeError`` for a call the
    forward would refuse; later calls of that shape reuse its plan."""

    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        params = list(signature.parameters.values())
        self.simple = all(p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                          for p in params)
        self._names = [p.name for p in params]
        self._defaults = {p.name: p.default for p in params}
        self._plans: dict[tuple, tuple] = {}

    def bind(self, args: tuple, kwargs: dict) -> dict:
        if not self.simple:  # *args / **kwargs / positional-only parameters: the general path
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return dict(bound.arguments)
        shape = (len(args), tuple(kwargs))
        plan = self._plans.get(shape)
        if plan is None:
            self.signature.bind(*args, **kwargs)  # raises TypeError like the forward would
            plan = tuple((i if i < len(args) else None) for i in range(len(self._names)))
            self._plans[shape] = plan
        defaults = self._defaults
        return {name: (args[i] if i is not None else kwargs[name] if name in kwargs else defaults[name])
                for name, i in zip(self._names, plan)}


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------

OFF_CUDA_MODES = ("passthrough", "static")


class GraphedForward:
    """Replays ``module``'s forward from CUDA graphs cached per call signature (see the module docstring for
    the exact rules). :meth:`install` puts it on the module as an instance ``forward`` (so ``module(...)``,
    hooks and ``inspect.signature(module.forward)`` behave as before), :meth:`uninstall` takes it off.

    module: any ``nn.Module`` whose forward takes tensors, nested dicts / lists / tuples of them and Python
    scalars (a diffusers ``UNet2DConditionModel``: sample [B, C, H, W], timestep (int, float, 0-d or [B]
    tensor), encoder_hidden_states [B, L, D], timestep_cond, added_cond_kwargs {"text_embeds", "time_ids"},
    down_block_additional_residuals (tuple of [B, C_i, H_i, W_i]), mid_block_additional_residual, ...).
    cache_size: graphs kept (LRU; all share one memory pool per device). use_graph: False runs the static-
    buffer path eagerly everywhere. off_cuda: what a call on another device (the CPU) does: ``"passthrough"``
    (the default: the forward runs as it is, no static buffers; CUDA graphs do nothing there) or ``"static"``
    (the static-buffer path runs eagerly, to test its logic without a GPU). timestep_arg: the argument treated
    as data. pools: a ``graphs.GraphPools`` to share (one pool for a pipeline's UNet and ControlNet).
    forward: what runs in place of the module's own forward, inside the graphs and on pass-through calls (a
    ``torch.compile``-d forward: see ``ddim_fast.pipeline``); the module's original forward is kept as
    ``original_forward`` and runs while Dynamo traces.

    The graphs live in ``self.cache``, a ``graphs.GraphRunner`` (captures never fall back silently here: a
    failed capture disables the wrapper with one warning; under autocast the weight casts are recorded in the
    graph, ``autocast_weights="recast"``, see ``_build``). Counters: ``calls``, ``eager_calls``
    (pass-through), ``cache.hits`` / ``cache.misses`` (graph entries), ``invalidations`` (cache dropped on a
    change the :class:`ModuleWatch` saw); ``last_key`` is the key of the last static-buffer call.
    """

    def __init__(self, module: nn.Module, *, cache_size: int = 8, use_graph: bool = True,
                 off_cuda: str = "passthrough", timestep_arg: str = "timestep",
                 pools: graphs.GraphPools | None = None, forward: Callable[..., Any] | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"GraphedForward: module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(getattr(module, "forward", None), _InstalledForward):
            raise ValueError(f"GraphedForward: {type(module).__name__}.forward is already graphed")
        if off_cuda not in OFF_CUDA_MODES:
            raise ValueError(f"GraphedForward: off_cuda must be one of {OFF_CUDA_MODES}, got {off_cuda!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"GraphedForward: forward must be callable, got {type(forward).__name__}")
        self.module = module
        # What restore puts back: the instance attribute if there was one, else nothing (the class's forward).
        self._override = ForwardOverride(module, "the CUDA-graph wrapper")
        self.original_forward: Callable[..., Any] = module.forward
        self.forward: Callable[..., Any] = self.original_forward if forward is None else forward
        self.signature = inspect.signature(self.original_forward)
        self._params = list(self.signature.parameters.values())
        self._first_arg = self._params[0].name if self._params else None
        self._binder = _Binder(self.signature)
        self.timestep_arg = timestep_arg
        self.use_graph = bool(use_graph)
        self.off_cuda = off_cuda
        # "recast": under torch.autocast with fp32 weights, the casts stay inside the graph. Hoisting them
        # (graphs.py's default) would serve stale half copies after PEFT's fuse_lora / merge, which write
        # through param.data without bumping a version counter; pipelines that want the speed load fp16
        # weights (torch_dtype=torch.float16), which need no cast at all.
        self.cache = graphs.GraphRunner(cache_size, pools=pools, fallback=False, autocast_weights="recast")
        self._leaves: dict[Any, list] = {}  # key -> the static inputs' leaves (tensors to copy a call's into)
        self.enabled = True
        self.disabled_reason: str | None = None
        self.watch: ModuleWatch | None = None
        self.invalidations = 0
        self.calls = 0
        self.eager_calls = 0
        self.last_key: Any = None

    # ---- installation ---------------------------------------------------------------------------

    def install(self) -> "GraphedForward":
        """Makes ``module.forward`` (and so ``module(...)``) go through this wrapper."""
        if self._override.installed is None:
            self._override.install(_InstalledForward(self))
        return self

    def uninstall(self) -> bool:
        """Puts back the forward the module had and drops the graphs. Returns False (and only disables the
        wrapper, which then passes every call through) when something else has replaced ``module.forward``
        since, e.g. a hook library wrapping it: removing ours would remove theirs too."""
        self.clear()
        removed = self._override.uninstall()
        if not removed:
            self.enabled = False
        return removed

    def clear(self) -> None:
        """Drops every captured graph (and their memory pool); the next call captures again."""
        self.cache.clear()
        self._leaves.clear()
        self.watch = None

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
        return None

    def _call(self, values: dict) -> Any:
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
        return self.forward(*args, **kwargs)

    def _check_module(self) -> None:
        """Drops the graphs when the module changed in a way they bake in (see ModuleWatch)."""
        if self.watch is None:
            self.watch = ModuleWatch(self.module)
        elif self.watch.changed() and len(self.cache):
            self.invalidations += 1
            logger.info("ddim_fast: %s changed (modules, processors, adapters or weight tensors); dropping %d "
                        "captured graph(s), the next calls capture again", type(self.module).__name__,
                        len(self.cache))
            self.cache.clear()
            self._leaves.clear()

    def _pass(self, args, kwargs) -> Any:
        self.eager_calls += 1
        return self.forward(*args, **kwargs)

    def __call__(self, *args, **kwargs) -> Any:
        self.calls += 1
        if torch.compiler.is_compiling():  # traced by Dynamo: the plain forward, nothing captured
            self.eager_calls += 1
            return self.original_forward(*args, **kwargs)
        if self._passthrough_reason() is not None:
            return self._pass(args, kwargs)
        if self.off_cuda == "passthrough":  # off CUDA there is nothing to replay: no static buffers either
            first = args[0] if args else kwargs.get(self._first_arg)
            if isinstance(first, Tensor) and first.device.type != "cuda":
                return self._pass(args, kwargs)
        values = self._binder.bind(args, kwargs)
        # The device the timestep goes to: the sample's (the UNet moves it there), else the first tensor's.
        anchor = _first_tensor(values.get("sample"))
        if anchor is None:
            anchor = _first_tensor(values)
        if anchor is None:
            return self._pass(args, kwargs)
        if self.timestep_arg in values:
            values[self.timestep_arg] = _timestep_tensor(values[self.timestep_arg], anchor)
        try:
            signature, leaves = _key_and_leaves(values)
        except TypeError as exc:
            _warn_once(f"signature-{type(self.module).__name__}-{exc}",
                       "ddim_fast: %s is called with an argument a graph key cannot describe (%s); those calls "
                       "run eagerly", type(self.module).__name__, exc)
            return self._pass(args, kwargs)

        self._check_module()
        key = (signature, _autocast_state())
        self.last_key = key
        step = self.cache.get(key)
        static = self._leaves.get(key) if step is not None else None
        if static is not None:  # a hit: the call's tensors into the entry's static buffers
            self.cache.hits += 1
            for buffer, value in zip(static, leaves):
                if buffer is not None and value is not buffer:
                    buffer.copy_(value)
            return _copy_out(step.replay(), anchor)
        device = anchor.device
        one_cuda_device = device.type == "cuda" and all(
            t.device == device for t in leaves if isinstance(t, Tensor))
        use_graph = self.use_graph and one_cuda_device and graphs.cuda_graphs_available(device)
        try:
            step = self.cache.prepare(key, values, self._forward_on_static, use_graph=use_graph)
        except graphs.GraphCaptureError as exc:  # from now on every call passes through
            self.disabled_reason = f"capture failed: {exc}"
            logger.warning("ddim_fast: %s cannot be captured into a CUDA graph (%s); it runs eagerly from now on "
                           "(same results, no graph speed-up). Typical causes: a host sync (.item(), .cpu(), "
                           "printing a tensor) or data-dependent shapes in its forward.",
                           type(self.module).__name__, exc)
            return self._pass(args, kwargs)
        self._leaves[key] = [leaf if isinstance(leaf, Tensor) else None
                             for leaf in _static_leaves(key[0], step.static_inputs)]
        if len(self._leaves) > len(self.cache):  # entries the runner evicted
            live = set(self.cache.keys())
            self._leaves = {k: v for k, v in self._leaves.items() if k in live}
        return _copy_out(step.replay(), anchor)

    def _forward_on_static(self, static: dict) -> Any:
        return self._call(_fresh_containers(static))


def _first_tensor(tree: Any) -> torch.Tensor | None:
    tensors = graphs.tree_tensors(tree)
    return tensors[0] if tensors else None


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
