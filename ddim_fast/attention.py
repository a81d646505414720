"""Attention for Stable Diffusion's UNet: the Python front door of the attention ops and the choice of what
runs each call (the patchers that put it into ldm and diffusers UNets are in ``ddim_fast.attention_processors``).

``fused_attention(q, k, v, scale, mask, backend="auto")`` runs the fastest correct implementation for the
call's shape: on CUDA it measures, once per (device, dtype, q/k/v shapes and strides, mask), our Triton kernel
against every SDPA backend torch has and keeps the fastest whose output agrees with the float64 reference
(``ddim_fast.attention_choice``; cached in memory and in ``~/.cache/ddim_fast``); on the CPU it takes SDPA.
The rules, and why, are in ``ddim_fast.backends``; :func:`attention_choices` lists what was chosen (for
benchmarks and proofs), and each new choice is logged once at INFO.

Our ops (schemas in csrc/ops.cpp; registered by ``import ddim_fast``):

* ``torch.ops.ddim_fast.scaled_masked_softmax(scores, mask, scale)`` and the in-place
  ``scaled_masked_softmax_``: softmax(scores * scale (+ mask)) over the last dim in one pass (ldm's
  ``sim * scale`` -> ``masked_fill_`` -> ``softmax`` chain). C++ CPU kernel; CUDA kernel (warp per row up
  to 1024 keys, block per row beyond) when the extension is built with CUDA. Public and tested, but no
  ddim_fast path routes attention through it: scores materialized between two GEMMs measured 0.88x ldm's
  einsum path and 0.25x cuDNN SDPA (docs/design.md).
* ``torch.ops.ddim_fast.attention(q, k, v, scale, mask)``: softmax(q k^T * scale (+ mask)) v. C++ CPU
  kernel; on CUDA the fused Triton kernel.
* ``torch.ops.ddim_fast.attention_triton(q, k, v, scale, mask)``: the Triton kernel as its own op (runs on
  CPU tensors under ``TRITON_INTERPRET=1``; see ddim_fast/triton/attention.py).

All of them compute in fp32 whatever the storage dtype (fp32, fp16, bf16) and return the input dtype. The SDPA
backends compute as torch's kernels do (fp32 accumulation in the fused ones).

Accepted shapes:

* attention: q [B, H, Lq, D] with k, v [B, H, Lk, D] (any strides), or ldm's 3-D [B*H, Lq, D] with
  [B*H, Lk, D]. Leading dims must match exactly (no broadcasting); one head dim D for q, k and v.
* scaled_masked_softmax: scores [..., Lq, Lk] with 2 to 4 dims, any strides.
* masks (both ops): the mask has as many dims as the scores [..., Lq, Lk] (for attention: q's dims with
  Lk last); its last dim is Lk and every other dim is either the scores' size or 1 (broadcast without a
  copy). So ldm's key-padding mask is [B*H, 1, Lk] (3-D) or [B, 1, 1, Lk] (4-D), diffusers'
  ``prepare_attention_mask`` output viewed as [B, H, 1 or Lq, Lk] fits, and a full [B, H, Lq, Lk] mask
  fits. Boolean masks keep True and give masked logits -FLT_MAX like ldm's ``masked_fill`` (a fully
  masked row becomes uniform, never NaN); float masks are additive and must have the scores' dtype
  (``fused_attention`` / ``scaled_masked_softmax`` cast them for you). Any other shape raises ValueError.

ldm's ``ATTN_PRECISION=fp32`` (the default of Stability-AI's ldm/modules/attention.py, read from the
environment) upcasts q and k so the scores and the softmax are fp32 under fp16 autocast. Our kernels compute
the scores, the softmax and the p v product in fp32 (p is rounded to the input dtype before the tensor-core
p v product in the fp16/bf16 Triton kernel, as any flash-attention kernel does), and so do SDPA's fused
backends (flash, memory-efficient, cuDNN: fp32 accumulation and softmax), so the patched forward honours that
intent for either setting; 'auto' takes only a backend whose output is within the tolerance table of the
float64 reference on the measured inputs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Optional

import torch

from ddim_fast import attention_choice, reference
from ddim_fast._checks import check_mask, check_qkv, check_softmax_scale, require_float_tensor
from ddim_fast._library import has_native_kernel, triton_found  # noqa: F401  (public through this module)
from ddim_fast.backends import (ATTENTION_BACKENDS, MEASURED, SDPA_BACKENDS, mask_kind, resolve_attention_backend,
                                resolve_softmax_backend, static_attention_choice)

logger = logging.getLogger(__name__)

__all__ = ["fused_attention", "scaled_masked_softmax", "attention_choices", "clear_attention_choices",
           "ATTENTION_BACKENDS", "check_mask", "check_qkv"]

# Largest head dim our fused kernels take (the Triton kernel's limit; SD uses 40 to 160).
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# Python front door
# --------------------------------------------------------------------------------------------------


def _check_mask(op: str, mask, score_shape: tuple, dtype: torch.dtype, device: torch.device):
    """check_mask after casting a float mask to the scores' dtype (the wrappers accept any float mask).
    Returns the mask (None stays None)."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"{op}: mask must be bool (True = keep) or floating point (additive), got {mask.dtype}")
        mask = mask.to(dtype)
    check_mask(op, mask, score_shape, dtype, device)
    return mask


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) v.

    q [B, H, Lq, D] and k, v [B, H, Lk, D] (any strides), or [B*H, Lq, D] and [B*H, Lk, D].
    ``scale`` defaults to 1/sqrt(D); it must be finite (NaN or inf raise ValueError). ``mask``: see the module
    docstring (bool keeps True; float is additive and is cast to q's dtype).

    ``backend``: 'auto' (the fastest correct implementation for this call's shape: measured on CUDA, SDPA on
    the CPU; bool masks take our fused kernel; see ``ddim_fast.backends``), 'fused' (our fused kernel of the
    device: Triton on CUDA, C++ on the CPU), 'native' (torch.ops.ddim_fast.attention), 'triton'
    (torch.ops.ddim_fast.attention_triton), 'reference' (PyTorch, fp32 math), 'sdpa' (torch's
    scaled_dot_product_attention with its own backend pick) or one SDPA backend: 'sdpa_flash',
    'sdpa_efficient', 'sdpa_cudnn', 'sdpa_math' (a bool mask there follows SDPA's rule: a fully masked row
    gives zeros, not ldm's uniform row).

    Returns [..., Lq, D] in q's dtype: contiguous from our kernels and the reference, in the SDPA kernel's own
    layout otherwise.
    """
    op = "fused_attention"
    check_qkv(op, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_softmax_scale(op, scale)
    mask = _check_mask(op, mask, tuple(q.shape[:-1]) + (k.shape[-2],), q.dtype, q.device)
    if backend == "auto":
        backend = _auto_backend(q, k, v, float(scale), mask)
    else:
        backend = resolve_attention_backend(backend, q.device, mask_kind(mask))
    return run_attention(backend, q, k, v, float(scale), mask)


def run_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Runs one concrete backend (as resolved: 'native', 'triton', 'reference' or an SDPA name) on checked
    arguments (a float mask already in q's dtype)."""
    if backend == "triton":
        return torch.ops.ddim_fast.attention_triton(q, k, v, scale, mask)
    if backend == "native":
        return torch.ops.ddim_fast.attention(q, k, v, scale, mask)
    if backend == "reference":
        return reference.attention(q, k, v, scale, mask, compute_dtype=torch.float32).to(q.dtype)
    return _sdpa(backend, q, k, v, scale, mask)


# --------------------------------------------------------------------------------------------------
# SDPA backends
# --------------------------------------------------------------------------------------------------

# torch.nn.attention.SDPBackend member -> the name of its flag in torch._C (_get_<name>_sdp_enabled /
# _set_sdp_use_<name>), the flags torch.nn.attention.sdpa_kernel sets.
_SDP_FLAG_NAMES = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "mem_efficient", "CUDNN_ATTENTION": "cudnn",
                   "MATH": "math", "OVERRIDEABLE": "overrideable"}


class _OnlySdpBackend:
    """Enables one SDPA backend for the duration of a call and restores every flag after: what
    ``sdpa_kernel([backend])`` does, without its per-call list and generator work (a dozen flag reads and
    writes; sdpa_kernel costs about twice a small SDPA call's host time on the CPU). Used in eager code;
    torch.compile traces ``sdpa_kernel`` itself."""

    _flags: Optional[list] = None  # [(flag name, getter, setter)], bound on first use

    def __init__(self, member: str):
        if _OnlySdpBackend._flags is None:
            flags = []
            for name in _SDP_FLAG_NAMES.values():
                getter = getattr(torch._C, f"_get_{name}_sdp_enabled", None)
                setter = getattr(torch._C, f"_set_sdp_use_{name}", None)
                if getter is not None and setter is not None:
                    flags.append((name, getter, setter))
            _OnlySdpBackend._flags = flags
        self.keep = _SDP_FLAG_NAMES[member]
        self.saved: list = []

    def __enter__(self):
        self.saved = [getter() for _, getter, _ in self._flags]
        for name, _, setter in self._flags:
            setter(name == self.keep)
        return self

    def __exit__(self, *exc):
        for (_, _, setter), value in zip(self._flags, self.saved):
            setter(value)
        return False


def _sdpa(backend: str, q, k, v, scale: float, mask) -> torch.Tensor:
    # SDPA's fused kernels take [B, H, L, D]; ldm's 3-D [B*H, L, D] gets a leading dim of 1 (a view).
    three_d = q.dim() == 3
    if three_d:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None else None
    member = SDPA_BACKENDS[backend]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if member is None:
        out = sdpa(q, k, v, attn_mask=mask, scale=scale)
    elif torch.compiler.is_compiling():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, member)]):
            out = sdpa(q, k, v, attn_mask=mask, scale=scale)
    else:
        try:
            with _OnlySdpBackend(member):
                out = sdpa(q, k, v, attn_mask=mask, scale=scale)
        except RuntimeError as exc:
            if "viable backend" not in str(exc) and "No available kernel" not in str(exc):
                raise
            # torch's message speaks of flags turned off; say which backend refused which arguments.
            raise RuntimeError(
                f"fused_attention: backend={backend!r} (SDPBackend.{member}) has no kernel for these arguments on "
                f"{q.device}: {q.dtype}, q {tuple(q.shape)}, k {tuple(k.shape)}, mask "
                f"{None if mask is None else (mask.dtype, tuple(mask.shape))}; backend='auto' or 'sdpa' lets a "
                f"backend that can run them be picked") from exc
    return out.squeeze(0) if three_d else out


def _sdpa_enabled_by_user(backend: str) -> bool:
    """Whether the user's global SDPA flags allow ``backend`` ('auto' never overrides a backend the user turned
    off with torch.backends.cuda.enable_*_sdp(False))."""
    member = SDPA_BACKENDS[backend]
    if member is None:
        return True
    getter = getattr(torch._C, f"_get_{_SDP_FLAG_NAMES[member]}_sdp_enabled", None)
    return bool(getter()) if getter is not None else False


# --------------------------------------------------------------------------------------------------
# backend="auto": the choice per call shape
# --------------------------------------------------------------------------------------------------

# Every choice this process made, by a cheap key (device, dtype, shapes, strides, mask kind and shape): one dict
# lookup per call once a shape is known.
_CHOICES: dict = {}
# Static choices made where measuring was not allowed (capture, compile tracing): used until an eager call measures.
_STATIC: dict = {}
_DEVICE_NAMES: dict = {}


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = device.type
        _DEVICE_NAMES[device] = name
    return name


def _stamp(device_name: str) -> dict:
    """What decides the measured speeds: a cache entry written under another stamp is stale."""
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # not installed
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    package = sys.modules.get("ddim_fast")
    kernel_source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton", "attention.py")
    return {"torch": torch.__version__, "triton": triton_version, "cudnn": cudnn,
            "ddim_fast": getattr(package, "__version__", None), "kernel": attention_choice.source_hash(kernel_source)}


_STAMPS: dict = {}


def _cached_stamp(device_name: str) -> dict:
    if device_name not in _STAMPS:
        _STAMPS[device_name] = _stamp(device_name)
    return _STAMPS[device_name]


CACHE = attention_choice.ChoiceCache(stamp=_cached_stamp)


def _fast_key(q, k, v, mask) -> tuple:
    return (q.device, q.dtype, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(),
            None if mask is None else (mask.dtype == torch.bool, mask.shape))


def _choice_key(q, k, v, mask) -> attention_choice.ChoiceKey:
    kind = mask_kind(mask)
    return attention_choice.ChoiceKey(
        "attention", str(q.device), _device_name(q.device), str(q.dtype).replace("torch.", ""),
        (tuple(q.shape), tuple(k.shape), tuple(v.shape)), (tuple(q.stride()), tuple(k.stride()), tuple(v.stride())),
        kind, tuple(mask.shape) if mask is not None else ())


def _auto_backend(q, k, v, scale: float, mask) -> str:
    fast_key = _fast_key(q, k, v, mask)
    choice = _CHOICES.get(fast_key)
    if choice is None:
        choice = _choose(fast_key, q, k, v, scale, mask)
    elif not torch.compiler.is_compiling():
        choice.calls += 1
    return choice.backend


def _choose(fast_key: tuple, q, k, v, scale: float, mask) -> attention_choice.Choice:
    """A call shape seen for the first time (or only where it could not be measured)."""
    compiling = torch.compiler.is_compiling()
    kind = mask_kind(mask)
    resolved = resolve_attention_backend("auto", q.device, kind)
    if resolved != MEASURED:  # a rule (CPU, other devices, bool masks): nothing to measure
        choice = attention_choice.Choice(resolved, "rule")
        if not compiling:
            choice.key = _choice_key(q, k, v, mask)
            choice.calls = 1
            _CHOICES[fast_key] = choice
            logger.info("ddim_fast attention: %s -> %s (rule: ddim_fast.backends)", choice.key.describe(), resolved)
        return choice
    why_not = attention_choice.measurable(q, k, v, *(() if mask is None else (mask,)))
    if compiling:  # no file reads, no logging, no state written while tracing
        return _STATIC.get(fast_key) or attention_choice.Choice(
            static_attention_choice(q.device, q.dtype, k.shape[-2], q.shape[-1], kind), "static")
    key = _choice_key(q, k, v, mask)
    choice = CACHE.get(key)
    if choice is None and why_not is None:
        try:
            choice = _measure(key, q, k, v, scale, mask)
            CACHE.put(key, choice)
        except Exception as exc:  # the user's call must not fail because a measurement did: the static table
            choice = attention_choice.Choice(
                static_attention_choice(q.device, q.dtype, k.shape[-2], q.shape[-1], kind), "static",
                rejected={"*": f"measurement failed: {type(exc).__name__}: {exc}"})
            logger.warning("ddim_fast attention: measuring %s failed (%s: %s); using the static choice %s",
                           key.describe(), type(exc).__name__, exc, choice.backend)
    if choice is None:  # not measurable now: the static table, until an eager call measures
        choice = _STATIC.get(fast_key)
        if choice is None:
            choice = attention_choice.Choice(static_attention_choice(q.device, q.dtype, k.shape[-2], q.shape[-1], kind),
                                             "static", rejected={"*": f"not measured: {why_not}"})
            choice.key = key
            _STATIC[fast_key] = choice
            logger.info("ddim_fast attention: %s -> %s (static default: %s)", key.describe(), choice.backend, why_not)
        choice.calls += 1
        return choice
    choice.key = key
    choice.calls = 1
    _CHOICES[fast_key] = choice
    _STATIC.pop(fast_key, None)
    timings = ", ".join(f"{name} {s * 1e6:.1f} us" for name, s in sorted(choice.seconds.items(), key=lambda i: i[1]))
    logger.info("ddim_fast attention: %s -> %s (%s: %s%s)", key.describe(), choice.backend, choice.source, timings,
                "; rejected " + "; ".join(f"{n}: {r}" for n, r in choice.rejected.items()) if choice.rejected else "")
    return choice


def attention_candidates(q, k, v, mask) -> list:
    """The backends 'auto' measures on CUDA for these arguments: our Triton kernel (head dim <= 256) and every
    SDPA backend this torch has that the user's global SDPA flags allow, SDPA's own pick first."""
    names = []
    if triton_found() and q.shape[-1] <= MAX_HEAD_DIM:
        names.append("triton")
    for name in SDPA_BACKENDS:
        member = SDPA_BACKENDS[name]
        if member is not None and not _sdpa_available(member):
            continue
        if _sdpa_enabled_by_user(name):
            names.append(name)
    return names


def _sdpa_available(member: str) -> bool:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - torch < 2.3
        return False
    return hasattr(SDPBackend, member)


# Injection points for tests (fake timers and candidate tables keep them deterministic and fast).
TIMER: Optional[attention_choice.Timer] = None
CANDIDATES = attention_candidates


def _random_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``t``'s shape, strides, dtype and device with N(0, 1) values (contiguous when the strides
    overlap, e.g. an expanded mask)."""
    try:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if out.numel():
            out.normal_(generator=generator)
        return out
    except RuntimeError:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)


def _reference_error_fn(q, k, v, scale: float, mask):
    """check(out) -> ||out - ref|| / ||ref|| with ref the float64 attention, computed once, one (batch, head)
    slice at a time (the scores of one head only: 4096 x 4096 x 8 bytes = 128 MiB at SD1.5's self-attention)."""
    lead = q.shape[:-2]
    flat_q = q.reshape(-1, *q.shape[-2:])
    flat_k = k.reshape(-1, *k.shape[-2:])
    flat_v = v.reshape(-1, *v.shape[-2:])
    ref = torch.empty(flat_q.shape, dtype=torch.float64, device=q.device)
    for i in range(flat_q.shape[0]):
        m = None
        if mask is not None:
            index, rest = [], i
            for size, msize in zip(reversed(lead), reversed(mask.shape[:len(lead)])):
                index.append(rest % size if msize > 1 else 0)
                rest //= size
            m = mask[tuple(reversed(index))]
        ref[i] = reference.attention(flat_q[i], flat_k[i], flat_v[i], scale, m, compute_dtype=torch.float64)
    ref_norm = torch.linalg.vector_norm(ref)

    def check(out: torch.Tensor) -> float:
        diff = out.reshape(ref.shape).to(torch.float64) - ref
        return float((torch.linalg.vector_norm(diff) / ref_norm).item()) if ref.numel() else 0.0

    return check


def _measure(key: attention_choice.ChoiceKey, q, k, v, scale: float, mask) -> attention_choice.Choice:
    """Times the candidates on fresh random inputs of the call's shapes, strides and dtype (a private generator:
    the user's RNG streams are untouched), autocast off, no autograd."""
    device = q.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        generator = torch.Generator(device=device).manual_seed(0)
        mq, mk, mv = (_random_like(t, generator) for t in (q, k, v))
        mmask = None if mask is None else _random_like(mask, generator)
        check = _reference_error_fn(mq, mk, mv, scale, mmask)
        candidates = {name: (lambda name=name: run_attention(name, mq, mk, mv, scale, mmask))
                      for name in CANDIDATES(q, k, v, mask)}
        timer = TIMER or (lambda name, fn, calls: attention_choice.cuda_event_seconds(fn, calls, device))
        preferred = static_attention_choice(device, q.dtype, k.shape[-2], q.shape[-1], mask_kind(mask))
        return attention_choice.measure(candidates, check, attention_choice.tolerance(q.dtype, k.shape[-2]), timer,
                                        preferred=preferred)


def attention_choices() -> list[dict]:
    """What ``backend="auto"`` chose in this process, one dict per call shape: ``device`` (its name),
    ``dtype``, ``q``/``k``/``v`` shapes, ``mask`` ('none', 'bool [..]', 'float [..]'), ``backend`` (what ran),
    ``source`` ('measured', 'disk': read from the cache file, 'rule': CPU and bool-mask rules, 'static': could not
    be measured yet), ``seconds`` (per call of each timed candidate), ``rejected`` (candidate -> why) and
    ``calls`` (eager calls through it; CUDA-graph replays run no Python and are not counted)."""
    rows = []
    for choice in list(_CHOICES.values()) + list(_STATIC.values()):
        key = choice.key
        rows.append({"device": key.device_name, "dtype": key.dtype, "q": list(key.shapes[0]), "k": list(key.shapes[1]),
                     "v": list(key.shapes[2]),
                     "mask": key.mask + (f" {list(key.mask_shape)}" if key.mask != "none" else ""),
                     "backend": choice.backend, "source": choice.source, "seconds": dict(choice.seconds),
                     "rejected": dict(choice.rejected), "calls": choice.calls})
    return rows


def clear_attention_choices(*, memory_only: bool = True) -> None:
    """Forgets this process's choices (the next call per shape chooses again; from the cache file when it has
    the shape). ``memory_only=False`` also deletes the cache file."""
    _CHOICES.clear()
    _STATIC.clear()
    CACHE.clear()
    if not memory_only and CACHE.path:
        try:
            os.remove(CACHE.path)
        except FileNotFoundError:
            pass


def scaled_masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor] = None, scale: float = 1.0, *,
                          inplace: bool = False, backend: str = "auto") -> torch.Tensor:
    """softmax(scores * scale (+ mask)) over the last dim in one pass, fp32 math.

    scores [..., Lq, Lk] (2 to 4 dims, any strides); mask per the module docstring; ``scale`` finite. ``inplace`` writes
    the result into ``scores`` (the C++ ``scaled_masked_softmax_``). ``backend``: 'auto'/'native' (the
    C++ CPU / CUDA kernels) or 'reference'. Returns a tensor of scores' shape and dtype. No ddim_fast path calls
    this (it is slower than ldm's einsum path on the GPU; see docs/design.md): it serves callers that ask for it.
    """
    op = "scaled_masked_softmax"
    require_float_tensor(op, "scores", scores)
    if not 2 <= scores.dim() <= 4:
        raise ValueError(f"{op}: scores must have 2 to 4 dims [..., Lq, Lk], got shape {tuple(scores.shape)}")
    scale = check_softmax_scale(op, scale)
    mask = _check_mask(op, mask, tuple(scores.shape), scores.dtype, scores.device)
    backend = resolve_softmax_backend(backend, scores.device)
    if backend == "reference":
        out = reference.scaled_masked_softmax(scores, mask, float(scale), compute_dtype=torch.float32).to(scores.dtype)
        return scores.copy_(out) if inplace else out
    if inplace:
        torch.ops.ddim_fast.scaled_masked_softmax_(scores, mask, float(scale))
        return scores
    return torch.ops.ddim_fast.scaled_masked_softmax(scores, mask, float(scale))
