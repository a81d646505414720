"""``python -m ddim_fast bench --breakdown``: where one UNet step's time goes, by kind of kernel (issue 18's map:
every later choice about the UNet body cites it).

For each variant (``plain``, ``channels-last``, ``optimize``, ``compile-reduce-overhead`` by default on a GPU;
any of :data:`harness.pipelines.VARIANTS`), one UNet call on the pipeline's per-step inputs (the CFG batch)
is made ready as that variant runs it (plain and channels-last captured into a CUDA graph here, optimize through
its own graphs, reduce-overhead through Inductor's), then timed (CUDA events, ``wall_ms``) and profiled
under ``torch.profiler``: every CUDA kernel's time is summed by kind (:func:`kernel_kind`, a rule table on the
kernel's name: convolution, GEMM, attention, normalization, elementwise, copies/layout, other). All variants
are prepared before ONE profiler session starts (on some CUDA/CUPTI stacks a profiler session that ends before
a graph is captured leaves that graph's kernels untraced), each profiled inside its own range, and each
kernel is given to the range it started in.

On the CPU the same runs with CPU activities: each operator's self CPU time, classified by the operator's
name with the same table (``aten::mkldnn_convolution`` is a convolution, ``aten::addmm`` a GEMM, ...).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ddim_fast.tools.problems import DTYPES, resolve_device
from ddim_fast.tools.timing import synchronize
from harness.pipelines import VARIANTS, PipelineSetup, optimize_options, variant_unet
from harness.proofs import compile_counters, prove_compiled

KINDS = ("convolution", "GEMM", "attention", "normalization", "elementwise", "copies/layout", "other")

# First match wins, on the lower-cased name of a CUDA kernel or a CPU operator. Each pattern says what it is
# meant to catch; tests/test_breakdown.py holds real names of each (cuDNN, cuBLAS(Lt), cutlass, SDPA's
# backends, ATen, Inductor, ours). Inductor's generated Triton kernels are named by the ops they fuse and are
# classified by those first (:func:`inductor_kind`).
_WORD = r"(?:^|[^a-z0-9])({})(?:$|[^a-z0-9])"
KERNEL_RULES: tuple[tuple[str, str, str], ...] = (
    ("copies/layout", r"^memcpy|^memset|nchwtonhwc|nhwctonchw",
     "the runtime's copies and fills; cuDNN's layout conversions"),
    ("attention", r"flash|fmha|attention|sdpa|_attn|mha_|softmax",
     "SDPA's flash / efficient (fmha_cutlass) / cuDNN (cudnn_generated_*sdpa*) kernels, ours (_attention_kernel, "
     "softmax_*_kernel), ATen's softmax"),
    ("normalization", r"(group|layer|batch|rms|instance)_?norm|rowwisemoments|computefusedparams|welford",
     "GroupNorm / LayerNorm kernels (ATen's RowwiseMoments + fused-params + apply, vectorized_layer_norm)"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|winograd|implicit_gemm|implicit_convolve|im2col|col2im|cudnn",
     "cuDNN (sm90_xmma_fprop_implicit_gemm_*, *scudnn_winograd*, other cudnn kernels), cutlass conv, ATen's "
     "convolution operators"),
    ("GEMM", r"gemm|gemv|nvjet|cublas|cutlass|matmul|wgmma|splitkreduce|" + _WORD.format("addmm|mm|bmm|baddbmm|linear"),
     "cuBLAS / cuBLASLt (sm90_xmma_gemm_*, nvjet_*, splitKreduce), cutlass GEMMs, ATen's mm / addmm / bmm / linear"),
    ("copies/layout", r"copy|transpose|permute|catarraybatched|upsample|index|gather|scatter|"
     + _WORD.format("cat|clone|contiguous|to|reshape|view|expand|pad|constant_pad_nd|as_strided|chunk|split|"
                    "unbind|slice|select|narrow|squeeze|unsqueeze|flatten|unflatten|t|stack|repeat"),
     "copies (direct_copy_kernel, _to_copy), transposes, concatenation, nearest upsampling, views"),
    ("elementwise", r"elementwise|vectorized|pointwise|ddim_step|geglu|"
     + _WORD.format("add|add_|mul|mul_|sub|div|silu|gelu|sigmoid|exp|neg|where|clamp|tanh|rsub|pow|sqrt|rsqrt|"
                    "sin|cos|arange|fill_|zero_|addcmul|baddbmm_|lerp|maximum|minimum"),
     "ATen's elementwise kernels (add, mul, SiLU, GELU, fills), ddim_fast's fused DDIM step and GEGLU"),
)
_COMPILED_RULES = tuple((kind, re.compile(pattern)) for kind, pattern, _ in KERNEL_RULES)

_INDUCTOR = re.compile(r"^triton_(poi|red|per|tem)_fused_?([a-z0-9_]*?)(?:_\d+)?$")
_NORM_OPS = re.compile(r"group_norm|layer_norm|batch_norm|var_mean|rms_norm")
# Tokens of the ops that only move data: a pointwise kernel fusing nothing else is a copy / layout change.
_LAYOUT_TOKENS = frozenset({"clone", "to", "copy", "cat", "permute", "transpose", "view", "unsafe", "constant", "pad",
                            "nd", "expand", "unsqueeze", "squeeze", "slice", "select", "reshape", "as", "strided",
                            "contiguous", "stack", "split", "with", "sizes", "alias", "t", "repeat", "index",
                            "upsample", "nearest2d", "nearest", "2d"})


def inductor_kind(name: str) -> str | None:
    """The kind of an Inductor-generated Triton kernel from the fused ops in its name
    (``triton_{poi|red|per|tem}_fused_<op>_<op>..._<n>``); None for any other kernel. Templates: convolution
    or GEMM; norms (their reductions and the fused apply) normalization; softmax attention; a pointwise kernel
    of data-movement ops only copies/layout, any other pointwise kernel elementwise (a convolution's bias or
    a residual add it carries included); other reductions other."""
    m = _INDUCTOR.match(name)
    if m is None:
        return None
    flavour, ops = m.group(1), m.group(2)
    if flavour == "tem":
        if "convolution" in ops:
            return "convolution"
        return "GEMM" if re.search(r"(^|_)(mm|addmm|bmm|baddbmm)(_|$)", ops) else "other"
    if _NORM_OPS.search(ops):
        return "normalization"
    if "softmax" in ops or "scaled_dot_product" in ops:
        return "attention"
    if flavour == "poi":
        tokens = {t for t in ops.split("_") if t}
        return "copies/layout" if tokens and tokens <= _LAYOUT_TOKENS else "elementwise"
    return "other"


def kernel_kind(name: str) -> str:
    """The kind (one of :data:`KINDS`) of a CUDA kernel or CPU operator, from its name."""
    lowered = name.lower()
    kind = inductor_kind(lowered)
    if kind is not None:
        return kind
    for kind, pattern in _COMPILED_RULES:
        if pattern.search(lowered):
            return kind
    return "other"


# --------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------


@dataclass
class StepUnderTest:
    """One variant's UNet call, ready to time and profile. ``keep`` holds what must stay alive (the graph,
    the modified UNet, the optimized pipeline)."""

    name: str
    fn: Callable[[], Any]
    graphed: bool
    how: str
    keep: list = field(default_factory=list)
    proof: dict = field(default_factory=dict)


def _unet_fn(unet, setup: PipelineSetup) -> Callable[[], Any]:
    x, t, cond = setup.unet_inputs

    @torch.no_grad()
    def call():
        return unet(x, t, encoder_hidden_states=cond, **setup.unet_kwargs)

    return call


def _captured(call: Callable[[], Any], device: torch.device):
    """``call`` (reading fixed tensors) captured into one CUDA graph; its replay."""
    from ddim_fast.graphs import CapturedStep

    def step(_static):
        call()  # the output lives in the graph's pool; nothing here reads it

    anchor = {"device": torch.empty(0, device=device)}
    return CapturedStep(step, anchor, warmup_iters=2).capture()


def prepare_step(setup: PipelineSetup, name: str) -> StepUnderTest:
    """The UNet call of variant ``name`` as that variant runs it, warmed up (compiled, captured). Each variant
    works on its own copy of what it changes, so that all of them can be prepared before profiling."""
    import ddim_fast

    if name not in VARIANTS:
        raise ValueError(f"unknown breakdown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    on_cuda = setup.device.type == "cuda"
    if v.kind == "optimize":
        missing = sorted(set(v.optimize_kwargs) - optimize_options())
        if missing:
            raise ValueError(f"{name}: this ddim_fast.optimize has no {', '.join(missing)} option")
        setup.reset()
        pipe = copy.deepcopy(setup.pipe)  # its own UNet: optimize changes the forward and the processors
        ddim_fast.optimize(pipe, **v.optimize_kwargs)
        call = _unet_fn(pipe.unet, setup)
        for _ in range(2):  # the first call captures (measuring attention choices first)
            call()
        state = ddim_fast.optimized_state(pipe)
        graphed = state.graphed.get("unet")
        captured = graphed is not None and on_cuda and graphed.eager_calls == 0 and len(graphed.cache) > 0
        proof = {"fused_attention_modules": state.fused_attention_count, "cuda_graph_captured": captured}
        options = "".join(f", {k}={a!r}" for k, a in v.optimize_kwargs.items())
        return StepUnderTest(name, call, captured, f"optimize(pipe{options})", [pipe], proof)
    if v.kind == "compile":
        # Its own copy (Dynamo guards on the module; nothing else may touch it) and no Dynamo reset: a reset would
        # drop the compiled code of a compile variant prepared before this one.
        source = copy.deepcopy(setup.original_unet)
        before = compile_counters(setup.device)
        unet, modified = variant_unet(source, v)
        call = _unet_fn(unet, setup)
        for _ in range(3):  # compile; reduce-overhead records its CUDA graphs on the calls after the first
            call()
        after = compile_counters(setup.device)
        cudagraphs = on_cuda and v.compile_mode == "reduce-overhead"
        problems = prove_compiled(name, before, after, fullgraph=v.fullgraph, cudagraphs=cudagraphs)
        if problems:
            raise AssertionError("; ".join(problems))
        return StepUnderTest(name, call, cudagraphs, f"torch.compile(mode={v.compile_mode!r}, fullgraph={v.fullgraph})",
                             [unet, modified, source], {"compile_counters": {k: after[k] - before[k] for k in after}})
    unet, modified = variant_unet(setup.original_unet, v)
    call = _unet_fn(unet, setup)
    how = "diffusers' UNet" + (" in channels_last" if v.channels_last else "")
    if on_cuda:
        captured = _captured(call, setup.device)
        return StepUnderTest(name, captured.replay, True, how + ", one CUDA graph", [captured, modified])
    call()
    return StepUnderTest(name, call, False, how + ", eager", [modified])


def wall_seconds(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds per call of ``fn`` (``calls`` back to back, after the device drained): CUDA events on a GPU,
    perf_counter on the CPU (the product's own timer of measured choices)."""
    from ddim_fast.attention_choice import cuda_event_seconds

    synchronize(device)
    return cuda_event_seconds(fn, calls, device)


RANGE_PREFIX = "ddim_fast breakdown: "


def profile_steps(steps: list[StepUnderTest], device: torch.device, calls: int) -> Any:
    """ONE torch.profiler session over ``calls`` calls of every step, each variant in its own range
    (``RANGE_PREFIX + name``), the device drained at both ends of a range. Returns the profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in steps:
            synchronize(device)
            with torch.profiler.record_function(RANGE_PREFIX + step.name):
                for _ in range(calls):
                    step.fn()
                synchronize(device)
    return prof


@dataclass
class TimedEvent:
    """What the breakdown reads of a profiler event: name, start and duration (µs), and whether it ran on
    the device (a kernel, a copy) or is a CPU operator."""

    name: str
    start_us: float
    duration_us: float
    on_device: bool


def timed_events(prof) -> tuple[list[TimedEvent], dict[str, tuple[float, float]]]:
    """(device kernels and CPU operators, {variant: (range start, range end)}) from a finished profiler. CPU
    operators are the events named ``ns::op`` (``aten::addmm``, ``ddim_fast::attention``) with their self CPU
    time; annotations, runtime calls (``cudaLaunchKernel``) and the ranges themselves are left out."""
    from torch.autograd import DeviceType

    events, ranges = [], {}
    for e in prof.events():
        start, end = e.time_range.start, e.time_range.end
        if e.name.startswith(RANGE_PREFIX):
            if e.device_type == DeviceType.CPU:
                ranges[e.name[len(RANGE_PREFIX):]] = (start, end)
            continue
        if e.device_type == DeviceType.CPU:
            if "::" in e.name and not e.is_async:
                events.append(TimedEvent(e.name, start, float(e.self_cpu_time_total), False))
        else:
            events.append(TimedEvent(e.name, start, float(end - start), True))
    return events, ranges


def summarize_events(events: list[TimedEvent], start: float, end: float, calls: int, on_device: bool,
                     top: int = 12) -> dict[str, Any]:
    """The events that started inside [start, end] (device kernels when ``on_device``, else CPU operators)
    summed per kind, in ms per call; the heaviest kernels; the names classified 'other'."""
    kinds = dict.fromkeys(KINDS, 0.0)
    per_name: dict[str, list] = {}
    for e in events:
        if e.on_device != on_device or not (start <= e.start_us <= end):
            continue
        kind = kernel_kind(e.name)
        kinds[kind] += e.duration_us
        entry = per_name.setdefault(e.name, [kind, 0.0, 0])
        entry[1] += e.duration_us
        entry[2] += 1
    total = sum(kinds.values())
    heaviest = sorted(per_name.items(), key=lambda item: -item[1][1])
    return {
        "kinds_ms": {k: v / calls / 1e3 for k, v in kinds.items()},
        "kernel_ms": total / calls / 1e3,
        "kernels_per_call": sum(n for _, _, n in per_name.values()) / calls,
        "top": [{"name": name[:160], "kind": kind, "ms": us / calls / 1e3, "calls": n / calls}
                for name, (kind, us, n) in heaviest[:top]],
        "other": [{"name": name[:160], "ms": us / calls / 1e3}
                  for name, (kind, us, n) in heaviest if kind == "other"][:top],
    }


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

MODELS = {"tiny-unet": "tiny-sd", "sd15-unet": "sd15", "sdxl-unet": "sdxl"}
# The opt-in optimize-unet-body last: its Triton JIT compiles must not push the compiled peer past the stage cap.
GPU_VARIANTS = ("plain", "channels-last", "optimize", "compile-reduce-overhead", "optimize-unet-body")
CPU_VARIANTS = ("plain", "channels-last", "optimize")  # torch.compile on the CPU: minutes; ask for it by name


def run_breakdown(model: str = "tiny-unet", *, batch: int = 1, dtype: str | None = None,
                  resolution: int | None = None, device: str | None = None,
                  variants: tuple[str, ...] | None = None, calls: int | None = None) -> dict[str, Any]:
    """Prepare every variant, time it, profile it (one session), and return the JSON-able report (see the
    module docstring)."""
    from ddim_fast.tools import info

    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    dtype = dtype or ("fp16" if on_cuda else "fp32")
    variants = tuple(variants or (GPU_VARIANTS if on_cuda else CPU_VARIANTS))
    calls = calls or (3 if on_cuda else 2)
    setup = PipelineSetup.from_name(MODELS[model], dev, DTYPES[dtype], steps=2, batch=batch, resolution=resolution)
    steps, failed = [], {}
    for name in variants:
        try:
            steps.append(prepare_step(setup, name))
        except (AssertionError, RuntimeError, ValueError) as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    wall = {s.name: wall_seconds(s.fn, dev, 10 if on_cuda else calls) for s in steps}
    prof = profile_steps(steps, dev, calls)
    events, ranges = timed_events(prof)
    results = {}
    for s in steps:
        start, end = ranges.get(s.name, (float("inf"), float("-inf")))
        summary = summarize_events(events, start, end, calls, on_device=on_cuda)
        summary.update(graphed=s.graphed, how=s.how, wall_ms=wall[s.name] * 1e3, proof=s.proof)
        if on_cuda and summary["kernels_per_call"] == 0:
            failed[s.name] = "the profiler recorded no CUDA kernel of this variant's step"
        results[s.name] = summary
    x = setup.unet_inputs[0]
    return {
        "kind": "breakdown",
        "date": time.strftime("%Y-%m-%d"),
        "environment": info.environment_summary(dev),
        "config": {"model": model, "pipeline": setup.name, "batch": batch, "unet_batch": x.shape[0],
                   "latent": list(x.shape[1:]), "dtype": dtype, "device": str(dev), "calls": calls,
                   "source": "torch.profiler CUDA kernel times" if on_cuda else
                             "torch.profiler CPU operators' self time"},
        "kinds": list(KINDS),
        "rules": [{"kind": kind, "pattern": pattern, "catches": what} for kind, pattern, what in KERNEL_RULES],
        "variants": results,
        "failed": failed,
    }


def format_breakdown(report: dict[str, Any]) -> str:
    cfg, variants = report["config"], report["variants"]
    names = list(variants)
    total = "sum of kernels" if cfg["device"].startswith("cuda") else "sum of operators"
    lines = [f"breakdown: {cfg['model']} {cfg['dtype']}, batch {cfg['batch']} (UNet batch {cfg['unet_batch']} with "
             f"CFG), latent {'x'.join(map(str, cfg['latent']))}, on {report['environment']['hardware']} "
             f"({cfg['source']}, {cfg['calls']} calls per variant)"]
    width = max(16, *(len(n) for n in names)) if names else 16
    lines.append(f"{'ms per UNet step':<18}" + "".join(f"{n:>{width + 2}}" for n in names))
    for kind in report["kinds"]:
        lines.append(f"{kind:<18}" + "".join(f"{variants[n]['kinds_ms'][kind]:>{width + 2}.3f}" for n in names))
    lines.append(f"{total:<18}" + "".join(f"{variants[n]['kernel_ms']:>{width + 2}.3f}" for n in names))
    lines.append(f"{'wall per call':<18}" + "".join(f"{variants[n]['wall_ms']:>{width + 2}.3f}" for n in names))
    lines.append(f"{'graphed':<18}"
                 + "".join(f"{'yes' if variants[n]['graphed'] else 'no':>{width + 2}}" for n in names))
    for n in names:
        lines.append(f"{n}: {variants[n]['how']}; heaviest: " + "; ".join(
            f"{k['name'][:60]} {k['ms']:.3f} ms ({k['kind']})" for k in variants[n]["top"][:3]))
        if variants[n]["other"]:
            lines.append(f"{n}: unclassified ('other'): " + "; ".join(
                f"{k['name'][:60]} {k['ms']:.3f} ms" for k in variants[n]["other"][:3]))
    for n, why in report.get("failed", {}).items():
        lines.append(f"{n}: FAILED: {why}")
    return "\n".join(lines)
