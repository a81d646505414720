"""What a benchmark variant really ran, proven at run time: operators counted at the dispatcher
(:class:`OpCounter`), model forwards counted in Python (:class:`ForwardCounter`), CUDA graphs really
captured and replayed, and what ``torch.compile`` really compiled (Dynamo's counters). A variant whose proof
fails is reported as failed and its time is dropped: a name must say what was measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FUSED_STEP_OPS = frozenset({"ddim_fast::ddim_step", "ddim_fast::ddim_step_out", "ddim_fast::ddim_step_triton",
                            "ddim_fast::ddim_step_triton_out"})
FUSED_ATTENTION_OPS = frozenset({"ddim_fast::attention", "ddim_fast::attention_triton"})


def is_unfused_attention_op(name: str) -> bool:
    """An ATen op that only an unfused attention runs: every SDPA backend kernel (flash, efficient,
    cuDNN, the CPU flash kernel) or a softmax (SDPA's math path, the ldm einsum path). A SD UNet has no
    softmax outside its attention."""
    if not name.startswith("aten::"):
        return False
    return any(word in name for word in ("scaled_dot_product", "_efficient_attention", "_flash_attention",
                                         "softmax"))


class OpCounter:
    """Counts every operator dispatched while it is active (a ``TorchDispatchMode``: it sees the ops that
    reach the dispatcher below autograd and autocast, ``torch.ops.ddim_fast.*`` included, on any device).
    Python-side only: kernels replayed from a CUDA graph are not dispatched, hence not counted. The Triton
    step's eager path calls the op's kernel function without the dispatcher hop (``ops.ddim_step``); those
    calls are counted under the op's name too (the functions are wrapped while the counter is active).

        with OpCounter() as ops:
            loop()
        ops.count("ddim_fast::attention"), ops.fused_attention, ops.unfused_attention, ops.fused_steps
    """

    def __init__(self):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func._schema.name] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._wrapped: list[tuple[str, Any]] = []

    # ddim_fast._library attribute -> the op whose kernel function it is (called without the dispatcher).
    UNDISPATCHED = {"ddim_step_triton_kernel": "ddim_fast::ddim_step_triton",
                    "ddim_step_triton_out_kernel": "ddim_fast::ddim_step_triton_out"}

    def __enter__(self) -> "OpCounter":
        from ddim_fast import _library

        for attribute, op in self.UNDISPATCHED.items():
            original = getattr(_library, attribute, None)
            if original is None:
                continue

            def counted(*args, _original=original, _op=op, **kwargs):
                self.counts[_op] += 1
                return _original(*args, **kwargs)

            setattr(_library, attribute, counted)
            self._wrapped.append((attribute, original))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from ddim_fast import _library

        self._mode.__exit__(*exc)
        for attribute, original in self._wrapped:
            setattr(_library, attribute, original)
        self._wrapped.clear()

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def fused_steps(self) -> int:
        return sum(self.counts[n] for n in FUSED_STEP_OPS)

    @property
    def fused_attention(self) -> int:
        return sum(self.counts[n] for n in FUSED_ATTENTION_OPS)

    @property
    def unfused_attention(self) -> int:
        return sum(c for n, c in self.counts.items() if is_unfused_attention_op(n))


class ForwardCounter:
    """Counts the Python calls of a model: an ldm-style model's ``apply_model`` (an instance attribute
    wrapping it) or a module's forward (a forward pre-hook, e.g. a diffusers UNet). These are the model
    evaluations that really ran eagerly, or were being captured; a CUDA graph replay calls neither.
    ``remove()`` detaches it."""

    def __init__(self, model):
        self.count = 0
        self._model = model
        self._handle = None
        if not hasattr(model, "apply_model"):
            def hook(_module, _args):
                self.count += 1

            self._handle = model.register_forward_pre_hook(hook)
        else:
            original = model.apply_model

            def apply_model(*args, **kwargs):
                self.count += 1
                return original(*args, **kwargs)

            model.apply_model = apply_model

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        else:
            self._model.__dict__.pop("apply_model", None)



@dataclass(frozen=True)
class Expectation:
    """What one bench variant must have run, per UNet forward, for its name to be true."""

    fused_step: bool          # every step ran a torch.ops.ddim_fast step op (one per UNet forward)
    fused_attention: bool     # the attention modules run ddim_fast's FusedAttnProcessor (optimize's fusing)
    graph: bool               # the steps were replayed from captured CUDA graphs
    # With fused_attention: "fused" pins our kernel (every fused module runs a ddim_fast attention op);
    # "auto" is optimize's own choice per call shape (ours or an SDPA backend, chosen by measurement).
    attention_backend: str = "fused"


def prove_ops(name: str, expect: Expectation, ops: OpCounter, forwards: int, n_attention: int | None,
              n_fused: int | None = None) -> list[str]:
    """The dispatcher-level checks of one proof run (``forwards`` model forwards ran in Python under
    ``ops``); returns what failed (empty: proven). ``n_attention``: the model's attention modules (None: a
    model without any; the attention checks are skipped); ``n_fused``: how many of them the fusing served
    (default all; the others keep their own processor, as ``optimize()`` leaves them, and run unfused)."""
    problems = []
    if forwards <= 0:
        return [f"{name}: the model never ran"]
    steps = ops.fused_steps
    if expect.fused_step and steps != forwards:
        problems.append(f"{name}: {steps} fused step ops for {forwards} UNet forwards (expected one per forward)")
    if not expect.fused_step and steps:
        problems.append(f"{name}: ran {steps} ddim_fast step ops; this variant must be unfused")
    fused, unfused = ops.fused_attention, ops.unfused_attention
    if n_attention is None:
        if expect.fused_attention:
            problems.append(f"{name}: the model has no attention modules to fuse")
        return problems
    n_fused = n_attention if n_fused is None else n_fused
    want = n_attention * forwards
    if not expect.fused_attention:
        if fused:
            problems.append(f"{name}: ran {fused} ddim_fast attention ops; this variant's attention must be the "
                            "UNet's own")
        if unfused != want:
            problems.append(f"{name}: {unfused} unfused attention ops for {n_attention} modules x {forwards} "
                            f"forwards = {want}")
    elif n_fused == 0:
        problems.append(f"{name}: none of the {n_attention} attention modules runs the fused processor")
    elif expect.attention_backend == "fused":
        want_fused, want_unfused = n_fused * forwards, (n_attention - n_fused) * forwards
        if fused != want_fused or unfused != want_unfused:
            problems.append(f"{name}: {fused} ddim_fast attention ops and {unfused} unfused attention ops (SDPA/"
                            f"softmax) for {n_fused} fused of {n_attention} attention modules x {forwards} forwards "
                            f"(expected {want_fused} and {want_unfused}): some attention ran unfused")
    elif fused + unfused != want:  # "auto": each module's call runs exactly one attention, ours or SDPA's
        problems.append(f"{name}: {fused} ddim_fast + {unfused} SDPA/softmax attention ops for {n_attention} "
                        f"modules x {forwards} forwards = {want}")
    return problems


def graph_entries(sampler) -> list[Any]:
    return [sampler.graph_cache.get(k) for k in sampler.graph_cache.keys()]


def prove_graph(name: str, sampler) -> list[str]:
    """Every step the sampler cached is a really captured CUDA graph (not the eager fallback)."""
    from ddim_fast import graphs

    entries = graph_entries(sampler)
    if not entries:
        return [f"{name}: no captured step in the sampler's graph cache (the graph path did not run)"]
    bad = [type(e).__name__ for e in entries
           if not (isinstance(e, graphs.CapturedStep) and e.captured and e.graph is not None)]
    if bad:
        return [f"{name}: {len(bad)} of {len(entries)} cached steps are not captured CUDA graphs ({', '.join(bad)}): "
                "capture failed and the loop ran eagerly (see the warning logged)"]
    return []


def captured_graphs(sampler) -> int:
    """How many of the sampler's cached steps are captured CUDA graphs."""
    from ddim_fast import graphs

    return sum(isinstance(e, graphs.CapturedStep) and e.graph is not None for e in graph_entries(sampler))


def replay_count(sampler) -> int:
    return sum(getattr(e, "replays", 0) for e in graph_entries(sampler))


def prove_timed_call(name: str, expect: Expectation, steps: int, forwards: int, replays: int) -> list[str]:
    """One timed call of a loop: eager loops run ``steps`` forwards; graph loops replay every step but
    (half-precision latents) the first, which runs eagerly, and run no other forward."""
    if not expect.graph:
        if forwards != steps:
            return [f"{name}: a timed run made {forwards} UNet forwards for {steps} steps"]
        return []
    if forwards + replays != steps or replays < steps - 1:
        return [f"{name}: a timed run replayed {replays} graphs and ran {forwards} eager UNet forwards for "
                f"{steps} steps (expected {steps} replays, or {steps - 1} after one eager first step)"]
    return []




# --------------------------------------------------------------------------------------------------
# torch.compile: what Dynamo and Inductor really did
# --------------------------------------------------------------------------------------------------


def compile_counters(device: Any = None) -> dict[str, int]:
    """A snapshot of the counters a compile proof reads: Dynamo's compiled graphs, frames and graph breaks,
    Inductor's FX-graph cache hits/misses and CUDA-graph skips, and (``device`` on CUDA) how many CUDA graphs
    the cudagraph trees of ``mode="reduce-overhead"`` have recorded on it."""
    from torch._dynamo.utils import counters

    snapshot = {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames_ok": int(counters["frames"]["ok"]),  # frames compiled without fullgraph (fullgraph counts none)
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        "cudagraphs_recorded": 0,
    }
    if device is not None and getattr(device, "type", None) == "cuda":
        from torch._inductor import cudagraph_trees

        try:
            manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        except Exception:  # no tree was ever made on this device
            manager = None
        if manager is not None:
            snapshot["cudagraphs_recorded"] = sum(len(nodes) for nodes in manager.roots.values())
    return snapshot


def prove_compiled(name: str, before: dict[str, int], after: dict[str, int], *, fullgraph: bool,
                   cudagraphs: bool) -> list[str]:
    """The checks of a ``torch.compile`` variant over its first call(s) (``before``/``after``:
    :func:`compile_counters` around them): Dynamo compiled at least one graph of the model; with
    ``fullgraph`` no graph break; with ``cudagraphs`` (``mode="reduce-overhead"`` on CUDA) no CUDA graph was
    skipped and at least one was recorded."""
    problems = []
    graphs = after["unique_graphs"] - before["unique_graphs"]
    if graphs < 1:
        problems.append(f"{name}: Dynamo compiled nothing ({graphs} new graphs): the model ran eagerly")
    if fullgraph and after["graph_breaks"] > before["graph_breaks"]:
        problems.append(f"{name}: {after['graph_breaks'] - before['graph_breaks']} graph breaks under fullgraph=True")
    if cudagraphs:
        skips = after["cudagraph_skips"] - before["cudagraph_skips"]
        if skips:
            problems.append(f"{name}: Inductor skipped CUDA graphs {skips} times (TORCH_LOGS=perf_hints says why)")
        if after["cudagraphs_recorded"] <= before["cudagraphs_recorded"]:
            problems.append(f"{name}: no CUDA graph was recorded by the cudagraph trees")
    return problems


def prove_no_recompile(name: str, before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The timed calls of a compiled variant ran what its first call compiled: no new Dynamo graph."""
    new = after["unique_graphs"] - before["unique_graphs"]
    return [f"{name}: Dynamo compiled {new} more graphs during the timed calls (recompiles)"] if new else []
