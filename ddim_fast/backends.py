"""The one backend resolver: which implementation runs each ddim_fast op, for ``backend="auto"`` and for an
explicit backend (refused here, with the reason, when it cannot run). Every front door asks this module:
``ops.ddim_step`` (through ``ops.resolve_backend``, which is :func:`resolve_step_backend`),
``attention.fused_attention`` and the attention processors built on it, ``attention.scaled_masked_softmax``.

What "auto" means, per op, and why (``AUTO_RULES`` holds the same text for tools and docs):

* ``ddim_step``: the C++ kernel of the device (CPU always; CUDA when the extension was built with it), else
  Triton on CUDA, else the pure-PyTorch reference (devices without kernels, e.g. MPS). float64 latents always
  take the reference (the kernels store fp32/fp16/bf16; diffusers steps float64 in float64). ``meta`` tensors
  run the op itself (its fake kernel gives shapes). Why this order: the CUDA op's host cost per eager call is
  ~15 us against the Triton launcher's ~120 us (2026-12-04 H200 run); the reference is several kernels.
* ``attention``: on CUDA, **measured per call shape** (``ddim_fast.attention_choice``): the fastest of our Triton
  kernel and the SDPA backends torch has (flash, memory-efficient, cuDNN, math, and SDPA's own pick) that
  agrees with the float64 reference, cached per device, dtype, shapes and mask; where it cannot be measured
  (inside CUDA-graph capture, torch.compile tracing, sync-debug mode) and nothing is cached, the static table
  :func:`static_attention_choice` (SDPA everywhere except fp16 cross-attention with head dim <= 40, from the
  H200 run). On the CPU and every other device: torch's SDPA (its CPU flash kernel), a static rule from the
  CPU measurements (docs/design.md, "Attention backends"). Boolean masks keep ldm's meaning (a fully masked row
  becomes uniform; SDPA gives zeros), so they take our kernel of the device (Triton on CUDA, C++ on CPU), else
  the reference. ``meta`` tensors take the op's fake kernel.
* ``scaled_masked_softmax``: the C++/CUDA kernel of the device, else the reference. Only a caller that asks
  for this op reaches it: no ddim_fast path routes attention through it (it measured 0.88x ldm's einsum path
  and 0.25x cuDNN SDPA at SD1.5 cross-attention on the H200).

Explicit backends: ``native`` (the compiled C++/CUDA kernel), ``triton``, ``reference``; for attention also
``fused`` (our fused kernel of the device: Triton on CUDA, C++ elsewhere; what "auto" meant before the
measured choice) and the SDPA backends ``sdpa`` (torch's own pick), ``sdpa_flash``, ``sdpa_efficient``,
``sdpa_cudnn``, ``sdpa_math``.

What is built and installed comes from ``ddim_fast._library`` (``NATIVE_KERNELS``, ``TRITON_FOUND``), read at
resolve time; the step's answers are cached per (backend, device type, dtype) — :func:`clear_cache` after
changing what is "built" (tests monkeypatch those two).
"""

from __future__ import annotations

import torch

from ddim_fast import _library
from ddim_fast._checks import KERNEL_DTYPES

__all__ = ["STEP_BACKENDS", "ATTENTION_BACKENDS", "SOFTMAX_BACKENDS", "SDPA_BACKENDS", "MEASURED", "AUTO_RULES",
           "resolve", "resolve_step_backend", "resolve_attention_backend", "resolve_softmax_backend",
           "static_attention_choice", "mask_kind", "clear_cache"]

STEP_BACKENDS = ("auto", "native", "triton", "reference")
# SDPA backends by our name -> torch.nn.attention.SDPBackend member ("sdpa" is SDPA with torch's own pick).
SDPA_BACKENDS = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
ATTENTION_BACKENDS = ("auto", "fused", "native", "triton", "reference") + tuple(SDPA_BACKENDS)
SOFTMAX_BACKENDS = ("auto", "native", "reference")

# resolve_attention_backend's answer for auto on CUDA: the choice is per call shape (ddim_fast.attention_choice).
MEASURED = "measured"

AUTO_RULES = {
    "ddim_step": (
        "C++ kernel of the device (CPU; CUDA when built), else Triton on CUDA, else reference; float64 -> "
        "reference; meta -> the op's fake kernel. The CUDA op's eager host cost is ~8x lower than the Triton "
        "launcher's (H200, 2026-12-04)."),
    "attention": (
        "CUDA: measured per (device, dtype, q/k/v shapes and strides, mask): fastest correct of Triton and the SDPA "
        "backends, cached (memory + disk); static table when it cannot be measured (SDPA, except fp16 "
        "cross-attention with head dim <= 40: Triton, the only shape where it beat cuDNN on the H200). CPU and "
        "other devices: SDPA (best or within noise of the best at every SD shape measured on the CPU). Bool "
        "masks: our kernel of the device (ldm's fully-masked-row semantics), else reference. meta: fake kernel."),
    "scaled_masked_softmax": (
        "C++/CUDA kernel of the device, else reference. Reached only when called: no ddim_fast path routes "
        "attention through it (0.88x ldm's einsum path, 0.25x cuDNN SDPA on the H200)."),
}


def _native(device_type: str, op: str) -> bool:
    return (device_type, op) in _library.NATIVE_KERNELS


def _triton() -> bool:
    return bool(_library.TRITON_FOUND)


def clear_cache() -> None:
    """Forget the cached step resolutions (after monkeypatching what is built, in tests)."""
    _STEP_RESOLVED.clear()


# --------------------------------------------------------------------------------------------------
# ddim_step
# --------------------------------------------------------------------------------------------------

# (backend, device type, dtype) -> resolved backend. The answer depends only on the key and on what was built
# and installed (fixed at import), so a step pays one dict lookup instead of re-deriving it.
_STEP_RESOLVED: dict = {}


def resolve_step_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs a step on ``device`` with storage ``dtype`` (``ops.resolve_backend``).

    'auto': the C++ kernel when the extension has one for the device, else Triton on CUDA, else the
    reference (pure PyTorch: float64, and devices without kernels such as MPS). On ``meta`` tensors the op
    itself runs (its fake kernel gives shapes only). An explicit backend that cannot run raises."""
    if backend not in STEP_BACKENDS:  # before the lookup: an unhashable backend gets this message too
        raise ValueError(f"backend must be one of {STEP_BACKENDS}, got {backend!r}")
    key = (backend, device.type, dtype)
    resolved = _STEP_RESOLVED.get(key)
    if resolved is None:
        resolved = _resolve_step(backend, device.type, dtype)  # raises for a backend that cannot run
        _STEP_RESOLVED[key] = resolved
    return resolved


def _resolve_step(backend: str, device_type: str, dtype: torch.dtype) -> str:
    kernel_dtype = dtype in KERNEL_DTYPES
    if backend == "native":
        if not _native(device_type, "ddim_step") and device_type != "meta":
            raise RuntimeError(
                f"backend='native': the ddim_fast C++ extension has no {device_type} kernel "
                "(for CUDA, build on a machine whose torch has CUDA and nvcc; see setup.py)")
    if backend in ("native", "triton") and not kernel_dtype:
        raise TypeError(f"ddim_step: backend={backend!r} supports float32/float16/bfloat16, got {dtype} "
                        "(backend='auto' or 'reference' computes float64 in PyTorch)")
    if backend == "triton" and not _triton():
        raise RuntimeError("backend='triton': the triton package is not installed (pip install triton==3.6.0)")
    if backend != "auto":
        return backend
    if not kernel_dtype:
        return "reference"
    if device_type == "meta" or _native(device_type, "ddim_step"):
        return "native"
    if device_type == "cuda" and _triton():
        return "triton"
    return "reference"


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def mask_kind(mask) -> str:
    """'none', 'bool' (True = keep, ldm's masked_fill semantics) or 'float' (additive)."""
    if mask is None:
        return "none"
    return "bool" if mask.dtype == torch.bool else "float"


def _sdpa_backend_exists(backend: str) -> bool:
    member = SDPA_BACKENDS[backend]
    if member is None:
        return True
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - torch < 2.3
        return False
    return hasattr(SDPBackend, member)


def _our_attention_kernel(device_type: str) -> str | None:
    """Our fused kernel of the device: Triton on CUDA, the C++ kernel where the extension has one."""
    if device_type == "cuda":
        return "triton" if _triton() else None
    return "native" if _native(device_type, "attention") else None


def resolve_attention_backend(backend: str, device: torch.device, mask: str = "none") -> str:
    """What runs ``fused_attention(..., backend=backend)`` on ``device`` with a mask of kind ``mask``
    ('none', 'bool', 'float'; see :func:`mask_kind`): a concrete backend, or :data:`MEASURED` for 'auto' on
    CUDA without a bool mask (the choice is per call shape: ``ddim_fast.attention_choice``). An explicit
    backend that cannot run here raises."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    device_type = device.type
    if backend == "triton" and not _triton():
        raise RuntimeError("backend='triton': the triton package is not installed (pip install triton==3.6.0); "
                           "its kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
    if backend == "native" and not _native(device_type, "attention"):
        raise RuntimeError(f"backend='native': ddim_fast::attention has no {device_type} kernel (CUDA needs Triton)")
    if backend == "fused":
        ours = _our_attention_kernel(device_type)
        if ours is None:
            raise RuntimeError(f"backend='fused': ddim_fast has no fused attention kernel for device {device_type} "
                               "(CUDA needs the triton package; other devices the C++ extension)")
        return ours
    if backend in SDPA_BACKENDS and not _sdpa_backend_exists(backend):
        raise RuntimeError(f"backend={backend!r}: this torch ({torch.__version__}) has no "
                           f"SDPBackend.{SDPA_BACKENDS[backend]}")
    if backend != "auto":
        return backend
    if device_type == "meta":
        return "native"  # the op's fake kernel: shapes only
    if mask == "bool":
        return _our_attention_kernel(device_type) or "reference"
    if device_type == "cuda":
        return MEASURED
    return "sdpa"


# Where the static table comes from: SD1.5 fp16 at 512 px, batch 2, 8 heads, CUDA graphs, H200 2026-12-04
# (benchmarks/results/gpu-h200-2026-12-04-micro.json), us per call, ours (Triton) vs the best SDPA backend:
#   cross Lq 4096 Lk 77 d 40:   13.7 vs cuDNN 14.8 (1.08x)    self 4096 x 4096 d 40: 237.9 vs cuDNN 157.9 (0.66x)
#   cross Lq 1024 Lk 77 d 80:   12.0 vs cuDNN  8.2 (0.68x)    self 1024 x 1024 d 80:  33.1 vs cuDNN  19.2 (0.58x)
_STATIC_TRITON_MAX_KEYS = 128  # the Triton kernel's one-tile softmax path (no key loop)
_STATIC_TRITON_MAX_HEAD_DIM = 40


def static_attention_choice(device: torch.device, dtype: torch.dtype, lk: int, head_dim: int,
                            mask: str = "none") -> str:
    """The choice for 'auto' when it cannot be measured (CUDA-graph capture, torch.compile tracing, sync-debug
    mode) and none is cached: on CUDA, Triton for fp16 with at most 128 keys and head dim <= 40 (SD1.5's
    cross-attention at 64x64 latents, the one shape where it beat every SDPA backend on the H200), else SDPA
    with torch's own backend pick; elsewhere what :func:`resolve_attention_backend` says."""
    resolved = resolve_attention_backend("auto", device, mask)
    if resolved != MEASURED:
        return resolved
    if (dtype == torch.float16 and lk <= _STATIC_TRITON_MAX_KEYS and head_dim <= _STATIC_TRITON_MAX_HEAD_DIM
            and _triton()):
        return "triton"
    return "sdpa"


# --------------------------------------------------------------------------------------------------
# scaled_masked_softmax
# --------------------------------------------------------------------------------------------------


def resolve_softmax_backend(backend: str, device: torch.device) -> str:
    """'auto': the C++/CUDA kernel of the device, else the reference; 'native' raises without a kernel."""
    if backend not in SOFTMAX_BACKENDS:
        raise ValueError(f"scaled_masked_softmax: backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend == "reference":
        return "reference"
    if _native(device.type, "scaled_masked_softmax"):
        return "native"
    if backend == "native":
        raise RuntimeError(f"scaled_masked_softmax: no {device.type} kernel (build the extension with CUDA for GPUs)")
    return "reference"


# --------------------------------------------------------------------------------------------------
# The one entry point
# --------------------------------------------------------------------------------------------------


def resolve(op: str, backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32, *,
            mask=None) -> str:
    """The backend that runs ``op`` ('ddim_step', 'attention', 'scaled_masked_softmax') with ``backend`` on
    ``device`` for storage ``dtype`` (and, for attention, a ``mask`` tensor, None, or its kind as a string).
    For attention 'auto' on CUDA the answer is :data:`MEASURED` (the choice is per call shape)."""
    device = torch.device(device)
    if op == "ddim_step":
        return resolve_step_backend(backend, device, dtype)
    if op == "attention":
        return resolve_attention_backend(backend, device, mask if isinstance(mask, str) else mask_kind(mask))
    if op == "scaled_masked_softmax":
        return resolve_softmax_backend(backend, device)
    raise ValueError(f"op must be one of {tuple(AUTO_RULES)}, got {op!r}")
