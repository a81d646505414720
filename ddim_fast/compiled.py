"""``torch.compile`` for the models ``ddim_fast.optimize(pipe, compile=...)`` acts on, and a compile cache that
makes a second process start fast.

:class:`CompiledForward` wraps a module's own forward in ``torch.compile`` (Inductor compiles the body, our
custom ops inside it run through their fake kernels at trace time and as opaque calls at run time; Triton kernels
registered as custom ops stay opaque to Dynamo). It is either installed as the module's instance ``forward``
(no CUDA graphs) or handed to ``module_graph.GraphedForward(forward=...)``, which captures the compiled code in
its CUDA graphs (the compile happens in the first warm-up run, before capture). Callables in ``before_call`` run
before each compiled call (eagerly, outside the compiled region): ``optimize`` uses it to re-check fused QKV
packings, which compiled code cannot check itself.

Compile options: ``compile=True`` is Inductor's default mode; a string is a ``torch.compile`` mode; a dict holds
``torch.compile`` keyword arguments. ``dynamic`` defaults to False (a pipeline's loop has one shape; a new shape
compiles once more). Modes that use CUDA graphs themselves (``"reduce-overhead"``, ``"max-autotune"``) cannot run
inside ours: with ``cuda_graph`` on, ``optimize`` refuses them (use ``"max-autotune-no-cudagraphs"``).

Compile cache. Inductor's own caches (FX graph cache, AOTAutograd cache; on by default) live in
``TORCHINDUCTOR_CACHE_DIR`` (a temp folder by default) and already make a second process on the same machine
skip most of the work. On top, the artifacts of a compile (``torch.compiler.save_cache_artifacts()``) are saved
to one file per model configuration in a user cache folder and loaded (``load_cache_artifacts``) before the
next compile of that configuration, so a fresh machine or container with the folder mounted starts warm too.
The file name is a hash of what decides the compiled code: the model class and config, dtype, device name,
the optimize options that change the body (channels_last, fused QKV, attention processors), the compile
options and the versions of torch, triton, diffusers and ddim_fast. Folder: ``DDIM_FAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/ddim_fast``, else ``~/.cache/ddim_fast``; files are written atomically (temporary name, then
rename) and a file that cannot be read or loaded is ignored with one log line (never an error).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ddim_fast.attention_choice import default_cache_dir
from ddim_fast.forward_override import ForwardOverride

logger = logging.getLogger(__name__)

__all__ = ["CompiledForward", "compile_options", "cache_dir", "cache_key", "CUDA_GRAPH_MODES"]

# torch.compile modes that capture CUDA graphs themselves.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(compile: Any) -> dict | None:
    """The ``torch.compile`` keyword arguments for optimize's ``compile`` option (None: no compile).
    Raises ValueError/TypeError naming the option for anything else."""
    if compile is False or compile is None:
        return None
    if compile is True:
        options: dict = {}
    elif isinstance(compile, str):
        if compile not in _MODES:
            raise ValueError(f"optimize: compile must be True, False, one of {_MODES} or a dict of torch.compile "
                             f"arguments, got {compile!r}")
        options = {"mode": compile}
    elif isinstance(compile, dict):
        allowed = {"mode", "options", "dynamic", "fullgraph", "backend"}
        unknown = sorted(set(compile) - allowed)
        if unknown:
            raise ValueError(f"optimize: compile dict takes {sorted(allowed)}, got unknown keys {unknown}")
        options = dict(compile)
    else:
        raise TypeError(f"optimize: compile must be True, False, a mode string or a dict, got "
                        f"{type(compile).__name__}")
    options.setdefault("dynamic", False)
    return options


def uses_cuda_graphs(options: dict) -> bool:
    """Whether these torch.compile options make Inductor capture CUDA graphs itself."""
    if options.get("mode") in CUDA_GRAPH_MODES:
        return True
    inner = options.get("options") or {}
    return bool(inner.get("triton.cudagraphs"))


def cache_dir() -> Path | None:
    """Where compile-cache files go: the ``compile`` folder of the user cache folder ddim_fast's measured
    attention choices use (``attention_choice.default_cache_dir``: ``DDIM_FAST_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ddim_fast``, else ``~/.cache/ddim_fast``); None when ``DDIM_FAST_CACHE_DIR`` is set empty
    (nothing on disk)."""
    root = default_cache_dir()
    return None if root is None else Path(root) / "compile"


def _versions() -> dict:
    import ddim_fast

    found = {"torch": torch.__version__, "ddim_fast": ddim_fast.__version__}
    for name in ("triton", "diffusers"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed: part of the key as such
            found[name] = None
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def cache_key(model: nn.Module, options: dict, extra: dict) -> str:
    """A hash of what decides the code compiled for ``model`` (see the module docstring)."""
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    config = getattr(model, "config", None)
    description = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _jsonable(dict(config)) if config is not None else repr(model),
        "dtype": str(weight.dtype) if weight is not None else None,
        "device": device_name,
        "compile": _jsonable(options),
        "extra": _jsonable(extra),
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


class _ArtifactFile:
    """One compile-cache file: loaded before the first compile, written after it (once per process)."""

    _loaded: set[str] = set()

    def __init__(self, path: Path):
        self.path = path
        self.saved = False
        self.loaded = False

    def load(self) -> None:
        if str(self.path) in self._loaded or not self.path.is_file():
            return
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a stale or foreign file must never stop the user: compile from scratch
            logger.info("ddim_fast: compile cache %s not loaded (%s: %s)", self.path, type(exc).__name__, exc)
            return
        self._loaded.add(str(self.path))
        self.loaded = info is not None
        logger.info("ddim_fast: compile cache loaded from %s", self.path)

    def save(self) -> None:
        if self.saved:
            return
        self.saved = True
        try:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None:
                return
            data = artifacts[0]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            logger.info("ddim_fast: compile cache saved to %s (%d bytes)", self.path, len(data))
        except Exception as exc:  # a read-only home, a full disk: the compile itself worked
            logger.info("ddim_fast: compile cache not saved to %s (%s: %s)", self.path, type(exc).__name__, exc)


class CompiledForward:
    """``torch.compile`` of ``module``'s own forward (the one it has now), called with its arguments.

    options: ``torch.compile`` keyword arguments (see :func:`compile_options`). before_call: callables run
    eagerly before each call. cache_file: a compile-cache file path (or None): loaded now, saved after the
    first call. Counters: ``calls``; ``compiled_frames`` is Dynamo's count after the first call."""

    def __init__(self, module: nn.Module, options: dict, *, before_call: Iterable[Callable[[], Any]] = (),
                 cache_file: str | os.PathLike | None = None):
        self.module = module
        self.options = dict(options)
        self.original_forward = module.forward
        self.compiled = torch.compile(self.original_forward, **self.options)
        self.before_call = list(before_call)
        self.calls = 0
        self.enabled = True
        self._artifacts = _ArtifactFile(Path(cache_file)) if cache_file is not None else None
        if self._artifacts is not None:
            self._artifacts.load()
        self._override = ForwardOverride(module, "the compiled forward")

    @property
    def cache_loaded(self) -> bool:
        return self._artifacts is not None and self._artifacts.loaded

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or not self.enabled:  # an outer torch.compile traces the plain forward
            return self.original_forward(*args, **kwargs)
        for check in self.before_call:
            check()
        out = self.compiled(*args, **kwargs)
        self.calls += 1
        if self.calls == 1 and self._artifacts is not None:
            self._artifacts.save()
        return out

    def install(self) -> "CompiledForward":
        """Makes ``module(...)`` call the compiled forward (an instance ``forward`` that looks like the
        original to ``inspect.signature``)."""
        if self._override.installed is None:
            installed = functools.wraps(self.original_forward)(
                lambda *args, **kwargs: self(*args, **kwargs))
            installed._ddim_fast_compiled = True
            self._override.install(installed)
        return self

    def uninstall(self) -> bool:
        """Puts back the forward the module had; False (and nothing changed) when someone replaced ours (this
        wrapper then passes every call to the original forward)."""
        removed = self._override.uninstall()
        if not removed:
            self.enabled = False
        return removed
