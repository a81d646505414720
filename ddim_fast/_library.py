"""Registration of every ``torch.ops.ddim_fast`` operator, run once by ``import ddim_fast``.

* Loads the C++ extension ``ddim_fast._C``: that defines every schema (csrc/ops.cpp) and registers the C++
  CPU and CUDA kernels (csrc/cpu, csrc/cuda).
* Registers the fake (meta) kernels of every op, for ``torch.compile``, ``opcheck`` and meta tensors.
* Registers the Triton kernels (``ddim_step_triton``, ``ddim_step_triton_out``, ``attention_triton``,
  ``group_norm_silu_triton``, ``geglu_triton``, and the CUDA kernels of ``attention``, ``group_norm_silu`` and
  ``geglu``) as thin functions that import ``ddim_fast.triton`` on their first call: importing the package does
  not import Triton, so it costs little more than ``import torch``.
* Registers the CPU kernels of ``group_norm_silu`` and ``geglu``: PyTorch's own composites (``_composite``).
* Answers which backends exist, as module-level constants that ``torch.compile`` reads without tracing
  the dispatcher (``has_native_kernel``, ``triton_found``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ddim_fast import _composite
from ddim_fast._checks import (allocate_geglu_output, allocate_group_norm_output, allocate_step_outputs,
                               check_softmax_scale)

try:
    from ddim_fast import _C  # noqa: F401  (loading the library registers the schemas and C++ kernels)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "ddim_fast._C (the compiled kernels) is not built or does not match this torch: run "
        "`bash scripts/setup_env.sh` in the repository (or `pip install --no-build-isolation -e .`). "
        f"Original error: {exc}"
    ) from exc

# The ops whose kernels the C++ extension may provide, and the dispatch keys it may provide them for.
_NATIVE_OPS = ("ddim_step", "ddim_step_out", "scaled_masked_softmax", "scaled_masked_softmax_", "attention")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Read before any Python kernel is registered below: "native" means compiled C++/CUDA, never Triton.
NATIVE_KERNELS = frozenset(
    (device, op)
    for op in _NATIVE_OPS
    for device, key in _DEVICE_KEYS.items()
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"ddim_fast::{op}", key)
)

# Whether the triton package is installed (checked without importing it).
TRITON_FOUND = importlib.util.find_spec("triton") is not None


def has_native_kernel(device_type: str, op: str = "ddim_step") -> bool:
    """True when the C++ extension registered a kernel of ``op`` for this device type ('cpu', 'cuda')."""
    return (device_type, op) in NATIVE_KERNELS


def triton_found() -> bool:
    """True when triton is installed. Its kernels run on CUDA tensors, and on CPU tensors only when
    ``TRITON_INTERPRET=1`` was set before triton was first imported."""
    return TRITON_FOUND


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(op: str, name: str, tensor) -> None:
    """Triton kernels run on CUDA tensors, and on CPU tensors only under the interpreter: anything else is a
    RuntimeError naming the op and the argument (never a Triton error from deep inside the launch). Meta tensors
    pass (scripts/triton_aot_check.py plans launches on them)."""
    if tensor.device.type == "cpu" and not interpreting():  # meta tensors pass: the offline compile check
        raise RuntimeError(f"{op}: {name} must be a CUDA tensor, got {tensor.device} (CPU tensors run only under "
                           "TRITON_INTERPRET=1, set before triton is imported)")


def triton_module(name: str):
    """``ddim_fast.triton.<name>``, imported on first use, with a message that says what is missing."""
    if not TRITON_FOUND:
        raise RuntimeError(f"ddim_fast's Triton kernels need the triton package (pip install triton==3.6.0); "
                           f"it is not installed, so ddim_fast.triton.{name} cannot run")
    return importlib.import_module(f"ddim_fast.triton.{name}")


# --------------------------------------------------------------------------------------------------
# Fake kernels (shapes, dtypes, devices only)
# --------------------------------------------------------------------------------------------------


def _check_same_device(x, **tensors):
    # The Meta dispatch key outranks CPU, so a call mixing CPU and meta tensors lands in the fake kernel,
    # not in the C++ checks: reject it with the message the kernels give.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"ddim_step: {name} must be on x's device {x.device}, got {t.device}")


def _ddim_step_fake(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                    use_clipped_model_output, noise, rng_state, temperature, return_pred_x0):
    _check_same_device(x, model_output=model_output, table=table, row=row, x0_threshold=x0_threshold,
                       noise=noise, rng_state=rng_state)
    return allocate_step_outputs(x, return_pred_x0)


def _ddim_step_out_fake(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                        use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out):
    _check_same_device(x, model_output=model_output, table=table, row=row, x0_threshold=x0_threshold,
                       noise=noise, rng_state=rng_state, out=out, pred_x0_out=pred_x0_out)
    return None


def _softmax_fake(scores, mask, scale):
    check_softmax_scale("scaled_masked_softmax", scale)
    return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)


def _softmax_inplace_fake(scores, mask, scale):
    check_softmax_scale("scaled_masked_softmax_", scale)
    return None


def _attention_fake(q, k, v, scale, mask):
    # As the kernels do: a non-finite scale is an error, not NaN outputs (also under torch.compile).
    check_softmax_scale("attention", scale)
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"attention: q, k, v must be 3-D or 4-D alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _group_norm_silu_fake(x, weight, bias, num_groups, eps, apply_silu, channel_add=None):
    for name, t in (("weight", weight), ("bias", bias), ("channel_add", channel_add)):
        if t is not None and t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} must be on x's device {x.device}, got {t.device}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be [B, C, *spatial] with at least 2 dims, got {x.dim()} dims")
    return allocate_group_norm_output(x)


def _geglu_fake(h):
    if h.dim() < 1:
        raise ValueError("geglu: h must be [..., 2*D] (the GEGLU projection's output), got a 0-dim tensor")
    return allocate_geglu_output(h)


for _name, _fake in (("ddim_step", _ddim_step_fake), ("ddim_step_triton", _ddim_step_fake),
                     ("ddim_step_out", _ddim_step_out_fake), ("ddim_step_triton_out", _ddim_step_out_fake),
                     ("scaled_masked_softmax", _softmax_fake), ("scaled_masked_softmax_", _softmax_inplace_fake),
                     ("attention", _attention_fake), ("attention_triton", _attention_fake),
                     ("group_norm_silu", _group_norm_silu_fake), ("group_norm_silu_triton", _group_norm_silu_fake),
                     ("geglu", _geglu_fake), ("geglu_triton", _geglu_fake)):
    torch.library.register_fake(f"ddim_fast::{_name}", _fake)


# --------------------------------------------------------------------------------------------------
# Triton kernels, imported on first call
# --------------------------------------------------------------------------------------------------


_step_launcher = None  # ddim_fast.triton.ddim_step.run_ddim_step, bound on the first Triton step


def _run_triton_step(*args, fresh_outputs: bool) -> None:
    global _step_launcher
    if _step_launcher is None:
        _step_launcher = triton_module("ddim_step").run_ddim_step
    _step_launcher(*args, fresh_outputs=fresh_outputs)


def _ddim_step_triton(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                      use_clipped_model_output, noise, rng_state, temperature, return_pred_x0):
    out, pred_x0 = allocate_step_outputs(x, return_pred_x0)
    # Fresh outputs overlap nothing: the launcher skips the overlap checks that could not fail.
    _run_triton_step(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                     use_clipped_model_output, noise, rng_state, temperature, out,
                     pred_x0 if return_pred_x0 else None, fresh_outputs=True)
    return out, pred_x0


def _ddim_step_triton_out(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                          use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out):
    _run_triton_step(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                     use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out, fresh_outputs=False)


def _attention_triton(q, k, v, scale, mask):
    return triton_module("attention").attention_triton_impl(q, k, v, scale, mask)


# The Triton step ops' kernels, also called directly by ddim_fast.ops.ddim_step outside torch.compile.
ddim_step_triton_kernel = _ddim_step_triton
ddim_step_triton_out_kernel = _ddim_step_triton_out

# CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1 (the launchers say so otherwise).
torch.library.register_kernel("ddim_fast::ddim_step_triton", ("cpu", "cuda"), _ddim_step_triton)
torch.library.register_kernel("ddim_fast::ddim_step_triton_out", ("cpu", "cuda"), _ddim_step_triton_out)
torch.library.register_kernel("ddim_fast::attention_triton", ("cpu", "cuda"), _attention_triton)
# ddim_fast::attention has a C++ CPU kernel; on CUDA its kernel is the Triton one.
if not has_native_kernel("cuda", "attention"):
    torch.library.register_kernel("ddim_fast::attention", "cuda", _attention_triton)


# The UNet-body ops (ddim_fast/unet_ops.py) have no C++ kernels: on the CPU PyTorch's own composite
# (ddim_fast/_composite.py), on CUDA the Triton kernels (the composite when triton is not installed).
def _group_norm_silu_triton(x, weight, bias, num_groups, eps, apply_silu, channel_add=None):
    return triton_module("group_norm").group_norm_silu_triton_impl(x, weight, bias, num_groups, eps, apply_silu,
                                                                  channel_add)


def _geglu_triton(h):
    return triton_module("geglu").geglu_triton_impl(h)


torch.library.register_kernel("ddim_fast::group_norm_silu_triton", ("cpu", "cuda"), _group_norm_silu_triton)
torch.library.register_kernel("ddim_fast::geglu_triton", ("cpu", "cuda"), _geglu_triton)
torch.library.register_kernel("ddim_fast::group_norm_silu", "cpu", _composite.group_norm_silu_composite)
torch.library.register_kernel("ddim_fast::geglu", "cpu", _composite.geglu_composite)
if TRITON_FOUND:
    torch.library.register_kernel("ddim_fast::group_norm_silu", "cuda", _group_norm_silu_triton)
    torch.library.register_kernel("ddim_fast::geglu", "cuda", _geglu_triton)
else:  # pragma: no cover - CUDA without triton
    torch.library.register_kernel("ddim_fast::group_norm_silu", "cuda", _composite.group_norm_silu_composite)
    torch.library.register_kernel("ddim_fast::geglu", "cuda", _composite.geglu_composite)
