"""CUDA-graph building blocks shared by the ldm sampler and the diffusers scheduler side.

The pattern (one denoising step = model call + guidance + fused DDIM step, replayed for every step):

1. Put everything the step reads into **static input buffers** — a pytree (tensor, or dict / list /
   tuple of them, nested) built with :func:`make_static` and refreshed with :func:`copy_into`. Values
   that change per step must live in device memory (the step index, the latents, the noise buffer),
   never in Python floats.
2. Wrap the step in a :class:`CapturedStep` ``(fn, static_inputs)``. ``fn(static_inputs)`` must only
   launch device work on the current stream (no ``.item()``, no host reads, no new Python-side
   decisions per call) and may update its static inputs in place (e.g. ``x`` <- x_prev and
   ``step += 1``). :meth:`CapturedStep.capture` warms ``fn`` up on a side stream (lazy cuBLAS/cuDNN
   init, autotuning), restores the static inputs it mutated, then captures it once into a
   ``torch.cuda.CUDAGraph``. :meth:`CapturedStep.replay` relaunches the whole step with one call.
3. Keep captured steps in a :class:`GraphCache` (a small LRU) keyed by :func:`tree_signature` of
   what the capture baked in (shapes, dtypes, devices, conditioning structure, Python scalars such
   as the guidance scale).

Where CUDA graphs are not available (a CPU device, or ``torch.cuda`` missing), use
:func:`make_step` which returns an :class:`EagerStep` with the same interface: ``replay`` just
calls ``fn(static_inputs)``, so callers keep one code path. The fallback is logged once per reason.

Parameters of the model are read by address at replay time, so weights modified *in place* (e.g. a
LoRA merged into the same tensors with ``param.data.add_``) take effect on the next replay; weights
*replaced* by new tensors do not (clear the cache, or recapture).

Example (the shape of what ``ddim_fast.sampler`` does)::

    static = make_static({"x": x, "step": step, "cond": cond})

    def one_step(s):
        t = timesteps.index_select(0, s["step"])
        model_output = model(s["x"], t, s["cond"])
        ops.ddim_step(s["x"], model_output, table, s["step"], out=s["x"])   # x <- x_prev, in place
        s["step"].add_(1)

    runner = cache.get_or_create(tree_signature(static), lambda: make_step(one_step, static).capture())
    copy_into(runner.static_inputs, {"x": x, "step": step, "cond": cond})
    for _ in range(num_steps):
        runner.replay()
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Hashable

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CapturedStep",
    "EagerStep",
    "GraphCache",
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


# --------------------------------------------------------------------------------------------------
# pytrees of tensors
# --------------------------------------------------------------------------------------------------


def tree_signature(tree: Any) -> Hashable:
    """A hashable description of everything a capture bakes in.

    Tensors contribute (shape, dtype, device, stride); dicts (keys in insertion order and sorted, so
    two dicts with the same keys match), lists and tuples their structure; ``None``, bools, ints,
    floats and strings their value and type (a guidance scale of 7.5 and one of 5.0 need different
    graphs). Anything else raises ``TypeError`` — an unknown object could hide state the graph bakes.
    """
    if isinstance(tree, torch.Tensor):
        return ("T", tuple(tree.shape), tree.dtype, str(tree.device), tuple(tree.stride()))
    if isinstance(tree, dict):
        return ("D", tuple((key, tree_signature(tree[key])) for key in sorted(tree, key=repr)))
    if isinstance(tree, (list, tuple)):
        return ("L" if isinstance(tree, list) else "U", tuple(tree_signature(v) for v in tree))
    if tree is None or isinstance(tree, (bool, int, float, str, torch.dtype, torch.device)):
        return ("V", type(tree).__name__, tree)
    raise TypeError(
        f"tree_signature: expected tensors, dicts, lists, tuples or scalars, got {type(tree).__name__}"
    )


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of a pytree, in a deterministic order (dict keys sorted like tree_signature)."""
    out: list[torch.Tensor] = []

    def visit(node):
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            for key in sorted(node, key=repr):
                visit(node[key])
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(tree)
    return out


def make_static(tree: Any) -> Any:
    """A copy of `tree` whose tensors are fresh buffers holding the same values (same shape, dtype,
    device and strides, so the signature is unchanged); non-tensor leaves are kept as they are."""
    if isinstance(tree, torch.Tensor):
        buffer = torch.empty_strided(tree.shape, tree.stride(), dtype=tree.dtype, device=tree.device)
        return buffer.copy_(tree)
    if isinstance(tree, dict):
        return {key: make_static(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [make_static(value) for value in tree]
    if isinstance(tree, tuple):
        return tuple(make_static(value) for value in tree)
    return tree


def copy_into(static: Any, values: Any) -> None:
    """Copy the tensors of `values` into the matching buffers of `static` (same structure required:
    compare :func:`tree_signature` first). A leaf that already *is* the static buffer is skipped."""
    if isinstance(static, torch.Tensor):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"copy_into: expected a tensor for a static buffer, got {type(values).__name__}")
        if values is not static:
            if values.shape != static.shape:
                raise ValueError(f"copy_into: shape {tuple(values.shape)} does not match the static "
                                 f"buffer's {tuple(static.shape)}")
            static.copy_(values)
        return
    if isinstance(static, dict):
        if not isinstance(values, dict) or set(values) != set(static):
            raise ValueError("copy_into: dict keys differ from the static inputs'")
        for key in static:
            copy_into(static[key], values[key])
        return
    if isinstance(static, (list, tuple)):
        if not isinstance(values, (list, tuple)) or len(values) != len(static):
            raise ValueError("copy_into: sequence length differs from the static inputs'")
        for s, v in zip(static, values):
            copy_into(s, v)
        return
    if static != values:
        raise ValueError(f"copy_into: non-tensor leaf {values!r} differs from the captured {static!r}")


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


class CapturedStep:
    """One step function captured into a CUDA graph over static input buffers.

    ``fn(static_inputs)`` launches the step's device work and may mutate its static inputs in place;
    whatever it returns (tensors allocated during capture live in the graph's private memory pool)
    becomes ``static_outputs``, overwritten by every replay — clone what you keep.

    ``warmup_iters`` eager runs happen on a side stream before capture (required by CUDA graphs for
    lazy library initialisation); static inputs are snapshotted before and restored after each, so
    warm-up leaves no trace. ``pool`` may be shared between captures that never run concurrently.
    """

    captured = True

    def __init__(self, fn: Callable[[Any], Any], static_inputs: Any, *, warmup_iters: int = 2, pool=None):
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

    def _snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in tree_tensors(self.static_inputs)]

    def _restore(self, snapshot: list[torch.Tensor]) -> None:
        for buffer, saved in zip(tree_tensors(self.static_inputs), snapshot):
            buffer.copy_(saved)

    def capture(self) -> "CapturedStep":
        """Warm up on a side stream, capture once, leave the static inputs as they were. Returns self."""
        with torch.cuda.device(self.device):
            snapshot = self._snapshot()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_iters):
                    self.fn(self.static_inputs)
                    self._restore(snapshot)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.static_outputs = self.fn(self.static_inputs)
            # Capture records kernels without running them, but restore anyway: some ops (host-side
            # bookkeeping of custom kernels) may have touched the buffers.
            self._restore(snapshot)
            self.graph = graph
        return self

    def replay(self) -> Any:
        """Relaunch the captured step on the current stream; returns the static outputs."""
        if self.graph is None:
            raise RuntimeError("CapturedStep.replay: call capture() first")
        self.graph.replay()
        self.replays += 1
        return self.static_outputs


def make_step(fn: Callable[[Any], Any], static_inputs: Any, *, use_graph: bool = True, warmup_iters: int = 2,
              pool=None) -> CapturedStep | EagerStep:
    """A :class:`CapturedStep` when `use_graph` and the static inputs live on a CUDA device where graphs
    work, else an :class:`EagerStep` (logged once). Call ``.capture()`` on the result before replaying."""
    tensors = tree_tensors(static_inputs)
    device = tensors[0].device if tensors else torch.device("cpu")
    if use_graph and cuda_graphs_available(device):
        return CapturedStep(fn, static_inputs, warmup_iters=warmup_iters, pool=pool)
    return EagerStep(fn, static_inputs)


# --------------------------------------------------------------------------------------------------
# The per-shape cache
# --------------------------------------------------------------------------------------------------


class GraphCache:
    """A small LRU of captured steps keyed by a hashable signature (see :func:`tree_signature`).

    Each entry holds a graph and its memory pool, so keep ``maxsize`` small (a few shapes / guidance
    scales). ``hits`` / ``misses`` / ``evictions`` count lookups, for tests and profiling.
    """

    def __init__(self, maxsize: int = 4):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"GraphCache: maxsize must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
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

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Any) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            old_key, _ = self._entries.popitem(last=False)
            self.evictions += 1
            logger.debug("ddim_fast.graphs: evicted captured step %r", old_key)

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """The entry for `key`, created by ``factory()`` (e.g. build + capture) on a miss."""
        entry = self.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        entry = factory()
        self.put(key, entry)
        return entry

    def clear(self) -> None:
        """Drop every captured step (and with it its graph memory pool)."""
        self._entries.clear()
