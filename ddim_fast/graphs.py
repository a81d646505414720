"""CUDA-graph building blocks shared by the ldm sampler and the diffusers scheduler side.

The pattern (one denoising step = model call + guidance + fused DDIM step, replayed for every step):

1. Put everything the step reads into **static input buffers** — a pytree (tensor, or dict / list /
   tuple of them, nested) built with :func:`make_static` and refreshed with :func:`copy_into`. Values
   that change per step must live in device memory (the step index, the latents, the noise buffer),
   never in Python floats.
2. Wrap the step in a :class:`CapturedStep` ``(fn, static_inputs)``. ``fn(static_inputs)`` must only
   launch device work on the current stream (no ``.item()``, no host reads, no host-to-device copies
   of CPU tensors, no new Python-side decisions per call) and may update its static inputs in place
   (e.g. ``x`` <- x_prev and ``step += 1``). :meth:`CapturedStep.capture` warms ``fn`` up on a side
   stream (lazy cuBLAS/cuDNN init, Triton compiles), the last warm-up run with PyTorch's sync
   debug mode set to "error" so that a host sync is reported before capture starts, restores the
   static inputs it mutated, then captures it once into a ``torch.cuda.CUDAGraph`` on that same
   side stream (one stream per device: the cuBLAS workspace made during warm-up is the one the
   capture uses, and captures that share a memory pool must share a stream).
   :meth:`CapturedStep.replay` relaunches the whole step with one call on the current stream.
3. Run it through a :class:`GraphRunner`: the one place that looks a step up by a key the caller
   chooses (:func:`tree_signature` of the values — shapes, dtypes, devices, strides, conditioning
   structure, Python scalars such as the guidance scale — plus whatever else ``fn`` bakes in), captures
   it on a miss over static copies of the values, and refills the static buffers on a hit. Its entries
   share one graph memory pool per device (:class:`GraphPools`, which several runners may share): they
   never replay concurrently and keep no pool tensor alive between replays except their static
   outputs, so one pool sized for the largest step serves them all. The ldm sampler, the diffusers
   scheduler's ``graph_step`` and ``module_graph.GraphedForward`` (``optimize(pipe)``) all use it.

Where CUDA graphs are not available (a CPU device, or ``torch.cuda`` missing), use
:func:`make_step` which returns an :class:`EagerStep` with the same interface: ``replay`` just
calls ``fn(static_inputs)``, so callers keep one code path. The fallback is logged once per reason.
:func:`capture_step` also falls back to an :class:`EagerStep` (with a warning) when the capture
itself fails, e.g. for a model that copies a CPU tensor to the GPU on every call, as ldm's
``timestep_embedding`` does (it builds its frequency table with ``torch.arange`` on the CPU).

Parameters of the model are read by address at replay time, so weights modified *in place* (e.g. a
LoRA merged into the same tensors with ``param.data.add_``) take effect on the next replay; weights
*replaced* by new tensors do not (clear the cache, or recapture). Under ``torch.autocast`` the
half-precision casts of fp32 weights are kept out of the graph (:class:`AutocastWeightCasts`): a
replay re-casts a weight whose version counter or storage changed (``param.add_`` under no_grad,
``copy_``, ``load_state_dict``), but a write through ``param.data`` bumps no counter — call
``step.weight_casts.refresh(force=True)`` after one, or capture with ``autocast_weights="recast"``.

Example (the shape of what ``ddim_fast.sampler_step`` does)::

    def one_step(s):
        t = timesteps.index_select(0, s["step"])
        model_output = model(s["x"], t, s["cond"])
        ops.ddim_step(s["x"], model_output, table, s["step"], out=s["x"])   # x <- x_prev, in place
        s["step"].add_(1)

    values = {"x": x, "step": step, "cond": cond}
    runner = GraphRunner(cache_size=4)
    step_graph = runner.prepare(("my-loop", id(model), tree_signature(values)), values, one_step)
    for _ in range(num_steps):
        step_graph.replay()
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any, Callable, Hashable

import torch
import torch.utils._pytree as pytree

logger = logging.getLogger(__name__)

__all__ = [
    "AutocastWeightCasts",
    "CapturedStep",
    "EagerStep",
    "GraphCaptureError",
    "GraphPools",
    "GraphRunner",
    "capture_step",
    "capture_stream",
    "copy_into",
    "cuda_graphs_available",
    "make_static",
    "make_step",
    "tree_signature",
    "tree_tensors",
]

_LOGGED: set[str] = set()


def _log_once(key: str, message: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(message, *args)


class GraphCaptureError(RuntimeError):
    """A step could not be captured into a CUDA graph (it syncs the host, copies from host memory, ...).
    Nothing is left half-done: the caller's stream is current again and the static inputs are restored."""


# --------------------------------------------------------------------------------------------------
# pytrees of tensors (torch.utils._pytree: dicts, lists, tuples, namedtuples, nested)
# --------------------------------------------------------------------------------------------------


def _leaf_signature(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, str(leaf.device), tuple(leaf.stride()))
    if leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype, torch.device)):
        return ("V", type(leaf).__name__, leaf)
    raise TypeError(
        f"tree_signature: expected tensors, dicts, lists, tuples or scalars, got {type(leaf).__name__}"
    )


def tree_signature(tree: Any) -> Hashable:
    """A hashable description of everything a capture bakes in.

    The pytree structure (container types, dict keys in their order, lengths) and, per leaf, a tensor's
    (shape, dtype, device, stride), or the value and type of ``None``, a bool, int, float, string, dtype or
    device (a guidance scale of 7.5 and one of 5.0 need different graphs). Any other leaf raises
    ``TypeError``: an unknown object could hide state the graph bakes in."""
    leaves, spec = pytree.tree_flatten(tree)
    return (spec, tuple(_leaf_signature(leaf) for leaf in leaves))


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of a pytree, in pytree order."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def make_static(tree: Any) -> Any:
    """A copy of `tree` whose tensors are fresh buffers holding the same values (same shape, dtype,
    device and strides, so the signature is unchanged); non-tensor leaves are kept as they are. The buffers are
    normal tensors even under ``torch.inference_mode()`` (an inference tensor could not be written by a later
    call made outside it), and record no autograd history."""
    with torch.inference_mode(False), torch.no_grad():
        return pytree.tree_map_only(torch.Tensor, _static_copy, tree)


def copy_into(static: Any, values: Any) -> None:
    """Copy the tensors of `values` into the matching buffers of `static` (same structure required:
    compare :func:`tree_signature` first). A leaf that already *is* the static buffer is skipped."""
    static_leaves, static_spec = pytree.tree_flatten(static)
    value_leaves, value_spec = pytree.tree_flatten(values)
    if value_spec != static_spec:
        raise ValueError(f"copy_into: the values' structure differs from the static inputs' "
                         f"({value_spec} vs {static_spec})")
    for buffer, value in zip(static_leaves, value_leaves):
        if isinstance(buffer, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"copy_into: expected a tensor for a static buffer, got {type(value).__name__}")
            if value is not buffer:
                if value.shape != buffer.shape:
                    raise ValueError(f"copy_into: shape {tuple(value.shape)} does not match the static "
                                     f"buffer's {tuple(buffer.shape)}")
                buffer.copy_(value)
        elif buffer != value:
            raise ValueError(f"copy_into: non-tensor leaf {value!r} differs from the captured {buffer!r}")


# --------------------------------------------------------------------------------------------------
# Captured and eager steps
# --------------------------------------------------------------------------------------------------


def cuda_graphs_available(device: torch.device | str) -> bool:
    """True when `device` is a CUDA device on which graphs can be captured; logs the reason once otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        _log_once(f"nocuda-{device.type}", "ddim_fast.graphs: CUDA graphs need a CUDA device; running the "
                  "step eagerly on %s", device)
        return False
    if not torch.cuda.is_available():
        _log_once("nocuda-runtime", "ddim_fast.graphs: torch.cuda is not available; running eagerly")
        return False
    return True


class EagerStep:
    """The CPU / fallback twin of :class:`CapturedStep`: same interface, ``replay`` calls ``fn`` directly."""

    captured = False

    def __init__(self, fn: Callable[[Any], Any], static_inputs: Any):
        self.fn = fn
        self.static_inputs = static_inputs
        self.static_outputs: Any = None
        self.replays = 0

    def capture(self) -> "EagerStep":
        return self

    def replay(self) -> Any:
        self.static_outputs = self.fn(self.static_inputs)
        self.replays += 1
        return self.static_outputs


_CAPTURE_STREAMS: dict[torch.device, Any] = {}
_FAILED_CAPTURES: list[Any] = []  # see CapturedStep.capture


def capture_stream(device: torch.device | str) -> "torch.cuda.Stream":
    """The side stream on which every warm-up and capture for `device` runs (created once per device).

    One stream for warm-up and capture: per-stream library state (the cuBLAS workspace) is then set up
    by the warm-up, not inside the capture; and graphs sharing a memory pool must be captured on the
    same stream for the pool to be reused (torch.cuda.graph's note on ``pool``)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = torch.cuda.Stream(device=device)
        _CAPTURE_STREAMS[device] = stream
    return stream


AUTOCAST_WEIGHT_MODES = ("hoist", "recast")


class AutocastWeightCasts:
    """The half-precision copies of a model's weights that ``torch.autocast`` makes, owned by one
    captured step and kept **out of its graph**.

    Under autocast every fp32 weight that an autocast op (linear, conv, matmul, ...) reads is cast to the
    autocast dtype on each call (a cast kernel: 4 bytes read + 2 written per parameter). Eager autocast
    caches these casts for the duration of its context (for leaf tensors that require grad); a CUDA graph
    cannot use that cache (it is freed when the caller's context exits), so a graph captured with the
    cache off re-casts every weight on every replay: about 5 GB of traffic per SD1.5 UNet step.

    While :meth:`intercept` is active (warm-up and capture), each ``aten._to_copy`` of an fp32 weight — an
    ``nn.Parameter``, or a leaf that requires grad, the tensors autocast's own cache serves — to the
    autocast dtype on its device returns a copy made once, outside the graph, and owned here; the graph
    reads it by address and records no cast. The values are those of the eager cast (``_to_copy`` is
    ``empty_like`` + ``copy_``, and :meth:`refresh` re-casts with ``copy_``), so replays give eager
    autocast's results bit for bit.

    In-place weight updates: :meth:`refresh` (called by every :meth:`CapturedStep.replay`) re-casts each
    weight whose version counter or storage changed since its copy was made: ``with torch.no_grad():
    w.add_(...)``, ``w.copy_(...)``, ``load_state_dict`` (same tensors), ``w.data = new`` (new storage).
    Writes through ``w.data`` (``w.data += delta``, as PEFT's ``merge``/``fuse_lora`` does) do not bump
    the version counter: call ``refresh(force=True)`` after them (or capture with
    ``autocast_weights="recast"``). Copies are ``counted`` and their ``bytes`` reported; a weight first
    seen during the capture itself (not in warm-up) is cast inside the graph and counted in
    ``recast_in_graph``."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype
        self._entries: dict[int, list] = {}  # id(source) -> [source, copy, version, data_ptr]
        self.hits = 0
        self.recast_in_graph = 0
        self.refreshed = 0

    @property
    def count(self) -> int:
        """How many weights have a copy here."""
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of the copies (what a replay would otherwise write, plus twice that read)."""
        return sum(e[1].numel() * e[1].element_size() for e in self._entries.values())

    def copies(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(source weight, its copy) pairs."""
        return [(e[0], e[1]) for e in self._entries.values()]

    def _eligible(self, src, kwargs) -> bool:
        if not isinstance(src, torch.Tensor) or src.dtype != torch.float32 or src.device != self.device:
            return False
        if kwargs.get("dtype") != self.dtype:
            return False
        if kwargs.get("device") not in (None, src.device) or kwargs.get("layout") not in (None, torch.strided):
            return False
        if kwargs.get("memory_format") not in (None, torch.preserve_format):
            return False
        return isinstance(src, torch.nn.Parameter) or (src.is_leaf and src.requires_grad)

    def _lookup(self, func, src, kwargs):
        entry = self._entries.get(id(src))
        if entry is not None and entry[0] is src:
            self.hits += 1
            self._refresh_entry(entry, force=False)
            return entry[1]
        out = func(src, **kwargs)
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self.recast_in_graph += 1  # first seen inside the capture: this cast is recorded in the graph
            return out
        self._entries[id(src)] = [src, out, src._version, src.data_ptr()]
        return out

    def _refresh_entry(self, entry, force: bool) -> bool:
        src, copy = entry[0], entry[1]
        version, ptr = src._version, src.data_ptr()
        if not force and version == entry[2] and ptr == entry[3]:
            return False
        with torch.no_grad():
            copy.copy_(src)
        entry[2], entry[3] = version, ptr
        self.refreshed += 1
        return True

    def refresh(self, force: bool = False) -> int:
        """Re-cast the weights that changed since their copies were made (all of them with ``force``), on
        the current stream; returns how many were re-cast."""
        return sum(self._refresh_entry(e, force) for e in self._entries.values())

    def intercept(self):
        """A context (a ``TorchDispatchMode``) serving the eligible casts from the copies held here."""
        from torch.utils._python_dispatch import TorchDispatchMode

        casts = self
        to_copy = torch.ops.aten._to_copy.default

        class _HoistCasts(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is to_copy and len(args) == 1 and casts._eligible(args[0], kwargs):
                    return casts._lookup(func, args[0], kwargs)
                return func(*args, **kwargs)

        return _HoistCasts()


class CapturedStep:
    """One step function captured into a CUDA graph over static input buffers.

    ``fn(static_inputs)`` launches the step's device work and may mutate its static inputs in place;
    whatever it returns (tensors allocated during capture live in the graph's private memory pool)
    becomes ``static_outputs``, overwritten by every replay — clone what you keep.

    ``warmup_iters`` eager runs happen on the device's :func:`capture_stream` before capture (required
    by CUDA graphs for lazy library initialisation); static inputs are snapshotted before and restored
    after each, so warm-up leaves no trace. The last warm-up run has PyTorch's sync debug mode set to
    "error", so a host sync in ``fn`` (``.item()``, a CPU -> GPU copy, ...) raises
    :class:`GraphCaptureError` before any capture starts. ``pool`` (``torch.cuda.graph_pool_handle()``)
    may be shared between captures that never replay concurrently.

    ``autocast_weights`` (only matters when capturing inside ``torch.autocast``): ``"hoist"`` (default)
    keeps the weight casts out of the graph — the half-precision copies are made once and owned by this
    step (``self.weight_casts``, an :class:`AutocastWeightCasts`; re-cast before a replay when a weight
    changed in place) — so a replay reads 2-byte weights and casts nothing; ``"recast"`` records the casts
    in the graph (every replay re-casts every fp32 weight; no copies to keep in sync).
    """

    captured = True

    def __init__(self, fn: Callable[[Any], Any], static_inputs: Any, *, warmup_iters: int = 2, pool=None,
                 autocast_weights: str = "hoist"):
        if autocast_weights not in AUTOCAST_WEIGHT_MODES:
            raise ValueError(f"autocast_weights must be one of {AUTOCAST_WEIGHT_MODES}, got {autocast_weights!r}")
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1 (CUDA graphs need a warm-up run), got {warmup_iters}")
        tensors = tree_tensors(static_inputs)
        devices = {t.device for t in tensors if t.device.type == "cuda"}
        if not devices:
            raise ValueError("CapturedStep: static_inputs must hold at least one CUDA tensor")
        if len(devices) > 1:
            raise ValueError(f"CapturedStep: static inputs span several CUDA devices: {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.fn = fn
        self.static_inputs = static_inputs
        self.static_outputs: Any = None
        self.warmup_iters = int(warmup_iters)
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self.autocast_weights = autocast_weights
        self.weight_casts: AutocastWeightCasts | None = None

    def _snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in tree_tensors(self.static_inputs)]

    def _restore(self, snapshot: list[torch.Tensor]) -> None:
        for buffer, saved in zip(tree_tensors(self.static_inputs), snapshot):
            buffer.copy_(saved)

    def _checked_warmup_run(self) -> None:
        """One warm-up run that raises GraphCaptureError on a host sync (what capture would fail on)."""
        previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self.fn(self.static_inputs)
        except Exception as exc:
            raise GraphCaptureError(
                "the step's last warm-up run failed under torch.cuda.set_sync_debug_mode('error') (a host "
                f"sync, which a CUDA graph cannot capture): {exc}") from exc
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)

    def capture(self) -> "CapturedStep":
        """Warm up on the capture stream, capture once there, leave the static inputs as they were.
        Returns self; raises :class:`GraphCaptureError` (caller's stream current again, inputs
        restored) when ``fn`` cannot be captured.

        Under ``torch.autocast`` (ldm's scripts sample inside one) warm-up and capture run with the
        autocast weight cache off: with it on, the capture would read the fp16 weight copies cached during
        warm-up, which the caller's autocast frees when it exits (later replays would read freed memory
        and never see in-place weight updates). With ``autocast_weights="hoist"`` every weight cast then
        reaches an :class:`AutocastWeightCasts` that serves it from copies this step owns (made during
        warm-up, outside the graph); with ``"recast"`` the casts are recorded in the graph."""
        casts = None
        if self.autocast_weights == "hoist" and torch.is_autocast_enabled("cuda"):
            casts = AutocastWeightCasts(self.device, torch.get_autocast_dtype("cuda"))
        intercept = casts.intercept() if casts is not None else contextlib.nullcontext()
        with torch.cuda.device(self.device), self._autocast_without_cache(), intercept:
            caller = torch.cuda.current_stream()
            side = capture_stream(self.device)
            snapshot = self._snapshot()
            side.wait_stream(caller)
            try:
                with torch.cuda.stream(side):
                    for i in range(self.warmup_iters):
                        if i == self.warmup_iters - 1:
                            self._checked_warmup_run()
                        else:
                            self.fn(self.static_inputs)
                        self._restore(snapshot)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, pool=self.pool, stream=side):
                        outputs = self.fn(self.static_inputs)
                except Exception as exc:
                    # When capture_end raises, torch.cuda.graph never leaves its stream context: the
                    # capture stream would stay current for everything the caller does next.
                    torch.cuda.set_stream(caller)
                    # A capture invalidated by CUDA makes CUDAGraph::capture_end throw before it
                    # unregisters its allocation filter, a closure over the CUDAGraph object that the
                    # allocator evaluates during later captures: keep the object alive (its pool's
                    # leftovers are the price; fallbacks are cached per key, so this happens rarely).
                    _FAILED_CAPTURES.append(graph)
                    try:
                        torch.cuda.synchronize(self.device)
                    except Exception:  # the capture's own error again; nothing else is pending
                        logger.debug("ddim_fast.graphs: synchronize after a failed capture raised", exc_info=True)
                    raise GraphCaptureError(f"CUDA graph capture of the step failed: {exc}") from exc
            finally:
                # Capture runs no device work, but Python-side effects of fn (on CPU leaves) did happen.
                with torch.cuda.stream(side):
                    self._restore(snapshot)
                caller.wait_stream(side)
            self.static_outputs = outputs
            self.graph = graph
            self.weight_casts = casts
        return self

    @staticmethod
    def _autocast_without_cache():
        if not torch.is_autocast_enabled("cuda"):
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)

    def replay(self) -> Any:
        """Relaunch the captured step on the current stream; returns the static outputs. Weights hoisted
        out of the graph (see ``autocast_weights``) that changed since the last replay are re-cast first."""
        if self.graph is None:
            raise RuntimeError("CapturedStep.replay: call capture() first")
        if self.weight_casts is not None:
            self.weight_casts.refresh()  # weights changed in place since the last replay: re-cast them
        self.graph.replay()
        self.replays += 1
        return self.static_outputs


def make_step(fn: Callable[[Any], Any], static_inputs: Any, *, use_graph: bool = True, warmup_iters: int = 2,
              pool=None, autocast_weights: str = "hoist") -> CapturedStep | EagerStep:
    """A :class:`CapturedStep` when `use_graph` and the static inputs live on a CUDA device where graphs
    work, else an :class:`EagerStep` (logged once). Call ``.capture()`` on the result before replaying.
    ``autocast_weights``: see :class:`CapturedStep`."""
    tensors = tree_tensors(static_inputs)
    device = tensors[0].device if tensors else torch.device("cpu")
    if use_graph and cuda_graphs_available(device):
        return CapturedStep(fn, static_inputs, warmup_iters=warmup_iters, pool=pool,
                            autocast_weights=autocast_weights)
    return EagerStep(fn, static_inputs)


def capture_step(fn: Callable[[Any], Any], static_inputs: Any, *, use_graph: bool = True, warmup_iters: int = 2,
                 pool=None, fallback: bool = True, autocast_weights: str = "hoist") -> CapturedStep | EagerStep:
    """``make_step(...).capture()``; when the capture fails with :class:`GraphCaptureError` and
    `fallback`, a warning is logged and an :class:`EagerStep` over the same static inputs is returned
    instead, so the caller's loop runs unchanged, only without the graph. (Callers cache the result per
    key, so the warning comes once per cache miss, not per step.)"""
    step = make_step(fn, static_inputs, use_graph=use_graph, warmup_iters=warmup_iters, pool=pool,
                     autocast_weights=autocast_weights)
    try:
        return step.capture()
    except GraphCaptureError as exc:
        if not fallback:
            raise
        logger.warning("ddim_fast.graphs: %s; running the step eagerly over the same static buffers instead "
                       "(same results, no graph speed-up). A common cause is a model that builds a tensor on "
                       "the CPU and copies it to the GPU per call, like ldm's timestep_embedding "
                       "(torch.arange without device=): create it on the GPU instead.", exc)
        return EagerStep(fn, static_inputs)


# --------------------------------------------------------------------------------------------------
# Memory pools and the runner: the one way a step is looked up, captured and refilled
# --------------------------------------------------------------------------------------------------


class GraphPools:
    """One CUDA-graph memory pool per device, for every capture made with this object.

    Captures that share a pool must never replay concurrently and must keep nothing in the pool alive between
    replays except their static outputs (which the allocator never hands to another capture): true for the
    steps of one sampler, and for a pipeline's UNet and ControlNet, which replay one after another on one
    stream. Share one ``GraphPools`` between runners to let them reuse each other's memory; off CUDA there is
    no pool (``pool`` returns None)."""

    def __init__(self):
        self._handles: dict[torch.device, Any] = {}

    def pool(self, device: torch.device | str):
        """The pool of `device` (created on first use), or None off CUDA."""
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        handle = self._handles.get(device)
        if handle is None:
            handle = torch.cuda.graph_pool_handle()
            self._handles[device] = handle
        return handle

    def clear(self) -> None:
        """Forget the pools (their memory is released with the last graph that uses them)."""
        self._handles.clear()


class GraphRunner:
    """Captured steps of one caller, looked up by a key the caller chooses (an LRU of ``cache_size``),
    captured on a miss over static copies of the values, refilled from the values on a hit.

    :meth:`prepare` ``(key, values, fn)`` returns the step (a :class:`CapturedStep`, or an :class:`EagerStep` off
    CUDA or when the capture fell back) whose ``static_inputs`` now hold ``values``; call ``replay()`` on it.
    ``fn(static_inputs)`` is only used on a miss. The key must change whenever anything ``fn`` bakes in does
    (:func:`tree_signature` of the values covers shapes, dtypes, strides and Python scalars; add the model, the
    options, ...). ``pools``: a :class:`GraphPools` (shared between runners that replay one after another).
    ``fallback``: on a failed capture, an eager step with a warning (True) or :class:`GraphCaptureError`
    (False: the caller decides). ``autocast_weights``: see :class:`CapturedStep`.

    The ldm sampler (one entry per shape and guidance scale), ``FastDDIMScheduler.graph_step`` and
    ``module_graph.GraphedForward`` (one entry per call signature) all run their graphs through this class.
    Counters: ``hits``, ``misses``, ``evictions``."""

    def __init__(self, cache_size: int = 4, *, pools: GraphPools | None = None, use_graph: bool = True,
                 warmup_iters: int = 2, fallback: bool = True, autocast_weights: str = "hoist"):
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"GraphRunner: cache_size must be an int >= 1, got {cache_size!r}")
        if autocast_weights not in AUTOCAST_WEIGHT_MODES:
            raise ValueError(f"autocast_weights must be one of {AUTOCAST_WEIGHT_MODES}, got {autocast_weights!r}")
        self.maxsize = cache_size
        self.pools = pools if pools is not None else GraphPools()
        self.use_graph = bool(use_graph)
        self.warmup_iters = warmup_iters
        self.fallback = fallback
        self.autocast_weights = autocast_weights
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def get(self, key: Hashable) -> CapturedStep | EagerStep | None:
        """The cached step of `key` (marked most recently used), or None; counts nothing."""
        step = self._entries.get(key)
        if step is not None:
            self._entries.move_to_end(key)
        return step

    def prepare(self, key: Hashable, values: Any, fn: Callable[[Any], Any], *,
                use_graph: bool | None = None) -> CapturedStep | EagerStep:
        """The step of `key` with `values` copied into its static inputs; on a miss, static copies of `values`
        are made and ``fn`` is captured over them (or wrapped eagerly: off CUDA, ``use_graph`` False, or a
        failed capture with ``fallback``). Raises :class:`GraphCaptureError` when the capture failed and
        ``fallback`` is False (nothing is cached then)."""
        step = self.get(key)
        if step is not None:
            self.hits += 1
            copy_into(step.static_inputs, values)
            return step
        self.misses += 1
        static = make_static(values)
        tensors = tree_tensors(static)
        device = tensors[0].device if tensors else torch.device("cpu")
        step = capture_step(fn, static, use_graph=self.use_graph if use_graph is None else use_graph,
                            warmup_iters=self.warmup_iters, pool=self.pools.pool(device), fallback=self.fallback,
                            autocast_weights=self.autocast_weights)
        self._entries[key] = step
        while len(self._entries) > self.maxsize:
            old_key, _ = self._entries.popitem(last=False)
            self.evictions += 1
            logger.debug("ddim_fast.graphs: evicted captured step %r", old_key)
        return step

    def clear(self) -> None:
        """Drop every captured step (the pools' memory is released with the last graph using it)."""
        self._entries.clear()
