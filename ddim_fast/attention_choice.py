"""Choosing an implementation by measuring it: the machinery behind ``fused_attention(backend="auto")`` on
CUDA (``ddim_fast.attention`` says which candidates exist and how each runs; this module knows nothing about
attention kernels).

For one call shape (a :class:`ChoiceKey`) :func:`measure` runs every candidate on the same inputs, rejects
each one that raises or whose output is further from the reference than the tolerance (correct first: a
wrong candidate is never chosen, however fast), times the rest, and returns a :class:`Choice`:

1. each candidate once (warm-up: lazy init, Triton compiles), checked against the reference, then timed
   once (``calls`` calls) — a rough time;
2. the candidates within ``PRUNE_FACTOR`` of the best rough time timed ``reps`` more times, median;
3. the fastest wins; the ``preferred`` candidate (the static default) wins a near-tie (within
   ``TIE_MARGIN``), so that timing noise does not flip the choice between processes.

Timing (:func:`cuda_event_seconds`): CUDA events on the current stream around ``calls`` back-to-back calls,
after the warm-up, the host waiting on the end event only; never host timers around asynchronous work. The
calls are timed as an eager caller issues them (a kernel whose host launch costs more than its run is
charged for it).

A :class:`ChoiceCache` keeps choices in memory (per process) and, optionally, in a small JSON file under
``$DDIM_FAST_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ddim_fast`` or ``~/.cache/ddim_fast``; set it to an
empty string to keep choices in memory only), keyed by the device's name and stamped with the versions that
decide speed (torch, triton, cuDNN, ddim_fast, a hash of our kernel's source): a stamp that differs
invalidates that device's entries. Reading or writing the file never fails a call (a warning, once).

:func:`measurable` says when measuring is not allowed: inside CUDA-graph capture, while torch.compile traces,
under ``torch.cuda.set_sync_debug_mode`` (measuring synchronizes), and for tensors that are not plain eager
tensors (fake, functional, meta). The caller then uses a cached choice or its static default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["Choice", "ChoiceKey", "ChoiceCache", "measure", "measurable", "cuda_event_seconds", "TOLERANCES",
           "tolerance", "default_cache_dir", "CACHE_FILE_NAME", "CACHE_FORMAT"]

# The project's one tolerance table (tests/conftest.py TOLERANCES, docs/design.md section 5): relative error
# ||out - ref|| / ||ref|| against the float64 reference, by storage dtype. tests/test_attention_choice.py
# checks the two tables agree.
TOLERANCES = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def tolerance(dtype: torch.dtype, reduction: int = 1) -> float:
    """The table's tolerance, widened for an output that sums ``reduction`` terms in fp32 (attention sums Lk
    products per output: rounding errors add like a random walk, ~u sqrt(n); tests/conftest.py's rule)."""
    return max(TOLERANCES[dtype], math.sqrt(max(int(reduction), 1)) * FP32_UNIT_ROUNDOFF)


PRUNE_FACTOR = 1.5   # candidates slower than this times the best rough time are not timed again
TIE_MARGIN = 0.03    # the preferred candidate wins when within 3% of the fastest
DEFAULT_CALLS = 8    # calls per timing
DEFAULT_REPS = 5     # timings per candidate that survives pruning (median)


# --------------------------------------------------------------------------------------------------
# Keys and choices
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceKey:
    """One call shape: ``device`` (e.g. 'cuda:0', for the in-memory cache), ``device_name`` (the disk key),
    ``dtype``, q/k/v ``shapes`` and ``strides``, the mask's kind and shape."""

    op: str
    device: str
    device_name: str
    dtype: str
    shapes: tuple
    strides: tuple
    mask: str
    mask_shape: tuple = ()

    def disk_key(self) -> str:
        """The key inside one device's entries of the cache file (the device name is the level above)."""
        shapes = ";".join("x".join(map(str, s)) for s in self.shapes)
        strides = ";".join("x".join(map(str, s)) for s in self.strides)
        mask = self.mask + ("[" + "x".join(map(str, self.mask_shape)) + "]" if self.mask != "none" else "")
        return f"{self.op}|{self.dtype}|{shapes}|strides {strides}|mask {mask}"

    def describe(self) -> str:
        return f"{self.op} {self.dtype} on {self.device_name} " + self.disk_key().split("|", 2)[2]


@dataclass
class Choice:
    """What runs for one key: ``backend``; ``source`` — 'measured' (this process), 'disk' (the cache file),
    'static' (could not be measured: the caller's static default) or 'rule' (no measurement on this device);
    ``seconds`` per call of each timed candidate; ``rejected`` candidate -> why (raised, wrong output);
    ``errors`` candidate -> relative error vs the reference; ``calls``: eager calls that used it; ``key``: the
    call shape it was made for."""

    backend: str
    source: str
    seconds: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    calls: int = 0
    key: Optional[ChoiceKey] = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {"backend": self.backend, "seconds": self.seconds, "rejected": self.rejected, "errors": self.errors}

    @classmethod
    def from_json(cls, data: dict, source: str = "disk") -> "Choice":
        if not isinstance(data, dict) or not isinstance(data.get("backend"), str):
            raise ValueError(f"not a choice: {data!r}")
        return cls(data["backend"], source, dict(data.get("seconds") or {}), dict(data.get("rejected") or {}),
                   dict(data.get("errors") or {}))


# --------------------------------------------------------------------------------------------------
# When measuring is allowed
# --------------------------------------------------------------------------------------------------


def measurable(*tensors: torch.Tensor) -> Optional[str]:
    """None when the call may measure now; else why not (the caller uses its cached or static choice)."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    for t in tensors:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return f"{type(t).__name__} inputs (not plain eager tensors)"
    if any(t.device.type == "meta" for t in tensors):
        return "meta tensors"
    # Whatever the tensors' device: a capture in progress on this thread's CUDA stream must not see a sync.
    if torch.cuda.is_available():
        if torch.cuda.is_current_stream_capturing():
            return "the current stream is capturing a CUDA graph"
        if torch.cuda.get_sync_debug_mode() != 0:
            return "torch.cuda.set_sync_debug_mode is on (measuring synchronizes)"
    return None


# --------------------------------------------------------------------------------------------------
# Timing and the measurement itself
# --------------------------------------------------------------------------------------------------


# GPU cycles the stream is kept busy per timed call before the start event (~100 us at 2 GHz, more than a Triton
# launch's host time): the calls queue up behind it, so the events time the kernels back to back, as a CUDA graph
# replays them, not the host's launch cost (which a graph does not pay and which differs between candidates).
_QUEUE_CYCLES_PER_CALL = 200_000


def cuda_event_seconds(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn`` on the current stream, from CUDA events (the
    host waits on the end event only), with the calls queued behind a busy-wait kernel so that the GPU time is
    measured, not the launch (the choices serve graph replays). On the CPU (synchronous kernels) perf_counter
    around the calls."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_QUEUE_CYCLES_PER_CALL * calls)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


Timer = Callable[[str, Callable[[], object], int], float]  # (candidate name, fn, calls) -> seconds per call


def measure(candidates: dict, check: Callable[[object], float], tol: float, timer: Timer, *,
            preferred: Optional[str] = None, calls: int = DEFAULT_CALLS, reps: int = DEFAULT_REPS) -> Choice:
    """Chooses among ``candidates`` (name -> zero-argument callable returning the output) as the module
    docstring says. ``check(output)`` returns the output's relative error vs the reference; ``tol`` the largest
    accepted. ``timer(name, fn, calls)`` returns seconds per call (injected: tests pass fake timings).
    Raises RuntimeError when no candidate is correct."""
    # A forced SDPA backend that cannot take the inputs warns ("Flash attention kernel not used because ...")
    # before it raises: the candidate is rejected with the reason; the user sees no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _measure(candidates, check, tol, timer, preferred, calls, reps)


def _measure(candidates: dict, check: Callable[[object], float], tol: float, timer: Timer,
             preferred: Optional[str], calls: int, reps: int) -> Choice:
    rejected: dict = {}
    errors: dict = {}
    rough: dict = {}
    for name, fn in candidates.items():
        try:
            out = fn()
            err = float(check(out))
        except Exception as exc:  # a backend without a kernel for this shape, a launch failure, ...
            rejected[name] = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            continue
        errors[name] = err
        if not err <= tol:  # NaN fails too
            rejected[name] = f"wrong: relative error {err:.2e} > tolerance {tol:.1e}"
            continue
        rough[name] = timer(name, fn, calls)
    if not rough:
        raise RuntimeError(f"no candidate gave a correct result: {rejected}")
    best_rough = min(rough.values())
    seconds = dict(rough)
    for name, fn in candidates.items():
        if name in rough and rough[name] <= PRUNE_FACTOR * best_rough:
            seconds[name] = statistics.median([rough[name]] + [timer(name, fn, calls) for _ in range(reps - 1)])
    fastest = min(seconds, key=lambda n: (seconds[n], n))
    chosen = fastest
    if preferred in seconds and seconds[preferred] <= (1.0 + TIE_MARGIN) * seconds[fastest]:
        chosen = preferred
    return Choice(chosen, "measured", seconds, rejected, errors)


# --------------------------------------------------------------------------------------------------
# The cache: memory, and a JSON file per user
# --------------------------------------------------------------------------------------------------

CACHE_FILE_NAME = "attention-choices.json"
CACHE_FORMAT = 1


def default_cache_dir() -> Optional[str]:
    """$DDIM_FAST_CACHE_DIR (an empty value: no disk cache), else $XDG_CACHE_HOME/ddim_fast, else
    ~/.cache/ddim_fast."""
    configured = os.environ.get("DDIM_FAST_CACHE_DIR")
    if configured is not None:
        return configured or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddim_fast")


class ChoiceCache:
    """Choices per :class:`ChoiceKey`, in memory and (with a directory) in ``<dir>/attention-choices.json``::

        {"format": 1, "devices": {"<device name>": {"stamp": {"torch": ..., ...}, "choices": {"<key>": {...}}}}}

    ``stamp(device_name)`` returns what decides speed on that device; entries written under another stamp are
    ignored (and replaced on the next write). ``directory=...`` (the default) follows
    :func:`default_cache_dir` at each use; None keeps everything in memory."""

    def __init__(self, directory=..., stamp: Optional[Callable[[str], dict]] = None):
        self._directory = directory
        self._stamp = stamp or (lambda device_name: {})
        self.memory: dict = {}
        self._disk_loaded: dict = {}  # device name -> {disk key: Choice} read from the file (valid stamp only)
        self._lock = threading.Lock()
        self._warned = False

    @property
    def directory(self) -> Optional[str]:
        return default_cache_dir() if self._directory is ... else self._directory

    @property
    def path(self) -> Optional[str]:
        directory = self.directory
        return os.path.join(directory, CACHE_FILE_NAME) if directory else None

    def get(self, key: ChoiceKey) -> Optional[Choice]:
        """The choice for ``key`` from memory, else from the file (then kept in memory), else None."""
        choice = self.memory.get(key)
        if choice is not None:
            return choice
        entries = self._disk_entries(key.device_name)
        data = entries.get(key.disk_key())
        if data is None:
            return None
        choice = Choice(data.backend, "disk", dict(data.seconds), dict(data.rejected), dict(data.errors))
        self.memory[key] = choice
        return choice

    def put(self, key: ChoiceKey, choice: Choice, *, persist: bool = True) -> None:
        self.memory[key] = choice
        if persist and choice.source == "measured":
            self._write(key, choice)

    def clear(self) -> None:
        """Forgets the in-memory choices (the file stays)."""
        self.memory.clear()
        self._disk_loaded.clear()

    # -- file --------------------------------------------------------------------------------------

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("ddim_fast attention choice cache: %s %s failed (%s: %s); choices stay in memory",
                           what, self.path, type(exc).__name__, exc)

    def _read_file(self) -> dict:
        path = self.path
        if not path or not os.path.exists(path):
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT
                    or not isinstance(data.get("devices"), dict)):
                return {}
            return data
        except (OSError, ValueError) as exc:
            self._warn("reading", exc)
            return {}

    def _disk_entries(self, device_name: str) -> dict:
        if device_name in self._disk_loaded:
            return self._disk_loaded[device_name]
        entries: dict = {}
        device = self._read_file().get("devices", {}).get(device_name) if self.path else None
        if isinstance(device, dict) and device.get("stamp") == self._stamp(device_name):
            for disk_key, data in (device.get("choices") or {}).items():
                try:
                    entries[disk_key] = Choice.from_json(data)
                except ValueError:
                    continue
        self._disk_loaded[device_name] = entries
        return entries

    def _write(self, key: ChoiceKey, choice: Choice) -> None:
        path = self.path
        if not path:
            return
        with self._lock:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                data = self._read_file() or {"format": CACHE_FORMAT, "devices": {}}
                stamp = self._stamp(key.device_name)
                device = data["devices"].get(key.device_name)
                if not isinstance(device, dict) or device.get("stamp") != stamp:
                    device = {"stamp": stamp, "choices": {}}  # another version's entries: invalidated
                device.setdefault("choices", {})[key.disk_key()] = choice.to_json()
                data["devices"][key.device_name] = device
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
                self._disk_loaded.setdefault(key.device_name, {})[key.disk_key()] = choice
            except (OSError, TypeError, ValueError) as exc:
                self._warn("writing", exc)


def source_hash(*paths: str) -> str:
    """A short hash of files' bytes (our kernels' sources: a changed kernel invalidates the cached timings)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(b"missing:" + path.encode())
    return digest.hexdigest()[:16]
