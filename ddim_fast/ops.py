"""Typed front door of the ``torch.ops.ddim_fast`` operators: input checks with clear errors, fake
(meta) kernels for the C++-defined ops, and the backend choice (C++ CPU, CUDA C++, Triton, reference).

Schemas live in csrc/ops.cpp; device kernels in csrc/cpu, csrc/cuda and ddim_fast/triton.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from ddim_fast import reference

try:
    from ddim_fast import _C  # noqa: F401  (loading the library registers torch.ops.ddim_fast.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "ddim_fast._C is not built: run `pip install --no-build-isolation -e .` in the repository "
        f"(or `python setup.py build_ext --inplace`). Original error: {exc}"
    ) from exc

Backend = Literal["auto", "native", "triton", "reference"]
BACKENDS = ("auto", "native", "triton", "reference")

# Accepted spellings of the parameterisation: diffusers' names and ldm's.
_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "sample": "sample",
    "x0": "sample",
}


def canonical_prediction_type(prediction_type: str) -> str:
    """'eps'/'epsilon' -> 'epsilon', 'v'/'v_prediction' -> 'v_prediction', 'x0'/'sample' -> 'sample'."""
    if not isinstance(prediction_type, str):
        raise TypeError(f"prediction_type must be a str, got {type(prediction_type).__name__}")
    try:
        return _PREDICTION_ALIASES[prediction_type]
    except KeyError:
        raise ValueError(
            f"prediction_type must be one of {sorted(_PREDICTION_ALIASES)}, got {prediction_type!r}"
        ) from None


@functools.lru_cache(maxsize=None)
def _has_native_kernel_cached(device_type: str, op: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"ddim_fast::{op}", key)


# Constants for torch.compile: registrations and imports cannot change while a graph runs, and Dynamo
# cannot trace the dispatcher query or the import, so both are evaluated once at trace time.
@torch.compiler.assume_constant_result
def has_native_kernel(device_type: str, op: str = "ddim_step") -> bool:
    """True when the C++ extension registered `op` for this device type ('cpu', 'cuda')."""
    return _has_native_kernel_cached(device_type, op)


@functools.lru_cache(maxsize=None)
def _triton_available_cached() -> bool:
    try:
        from ddim_fast.triton import ddim_step as _  # noqa: F401
    except Exception:  # triton missing or broken: the other backends still work
        return False
    return True


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """True when ddim_fast's Triton kernels can run here (a CUDA GPU, or TRITON_INTERPRET=1 on CPU)."""
    return _triton_available_cached()


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'native' when the C++ kernel exists for the device, else 'triton' on CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "native" and not has_native_kernel(device.type):
            raise RuntimeError(
                f"backend='native': the ddim_fast C++ extension has no {device.type} kernel "
                "(for CUDA, build on a machine whose torch has CUDA and nvcc; see setup.py)"
            )
        return backend
    if has_native_kernel(device.type):
        return "native"
    if device.type == "cuda" and triton_available():
        return "triton"
    raise RuntimeError(f"ddim_fast has no kernel for device {device}; use backend='reference'")


# --------------------------------------------------------------------------------------------------
# Fake kernels of the C++-defined ops (shapes/dtypes only), used by torch.compile and opcheck.
# --------------------------------------------------------------------------------------------------


def _check_same_device(x, **tensors):
    # The Meta dispatch key outranks CPU, so a call mixing CPU and meta tensors lands in the fake kernel,
    # not in the C++ checks: reject it with the message the kernels give.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"ddim_step: {name} must be on x's device {x.device}, got {t.device}")


def allocate_step_outputs(x: torch.Tensor, return_pred_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The functional step's outputs: (x_prev, pred_x0), contiguous, x's dtype; pred_x0 is [0] unless asked.
    Mirrors allocate_ddim_step_outputs in csrc/ddim_step_args.cpp (fake and Triton kernels use this)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    pred_x0 = torch.empty(x.shape if return_pred_x0 else (0,), dtype=x.dtype, device=x.device)
    return out, pred_x0


@torch.library.register_fake("ddim_fast::ddim_step")
def _ddim_step_fake(x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
                    use_clipped_model_output, noise, rng_state, temperature, return_pred_x0):
    _check_same_device(x, model_output=model_output, table=table, step=step, x0_threshold=x0_threshold,
                       noise=noise, rng_state=rng_state)
    return allocate_step_outputs(x, return_pred_x0)


@torch.library.register_fake("ddim_fast::ddim_step_out")
def _ddim_step_out_fake(x, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
                        use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out):
    _check_same_device(x, model_output=model_output, table=table, step=step, x0_threshold=x0_threshold,
                       noise=noise, rng_state=rng_state, out=out, pred_x0_out=pred_x0_out)
    return None


# --------------------------------------------------------------------------------------------------
# ddim_step
# --------------------------------------------------------------------------------------------------


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"ddim_step: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float_tensor(name: str, value) -> torch.Tensor:
    _require_tensor(name, value)
    if not value.is_floating_point() or value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"ddim_step: {name} must be a float32/float16/bfloat16 tensor, got {value.dtype}")
    return value


def _optional_float(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"ddim_step: {name} must be a float or None, got {type(value).__name__}")
    return float(value)


def ddim_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    step: torch.Tensor | int,
    *,
    guidance_scale: float | None = None,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
    x0_threshold: torch.Tensor | None = None,
    use_clipped_model_output: bool = False,
    noise: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_pred_x0: bool = False,
    out: torch.Tensor | None = None,
    pred_x0_out: torch.Tensor | None = None,
    backend: Backend = "auto",
):
    """One fused DDIM step (one kernel launch): guidance combine, x0/eps prediction, optional clamp,
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * temperature * z.

    Shapes: x [B, ...]; model_output [B, ...], or [2B, ...] = cat([uncond, cond]) with ``guidance_scale``;
    table [S, 8] fp32 (``ddim_fast.schedule.coefficient_table``) and step an int64 tensor holding the row
    (both on x's device: bump ``step`` in place to advance without host work); noise [B, ...] or
    rng_state int64 [2] = (seed, offset) for in-kernel Philox normals (step k uses offset + k);
    x0_threshold [B] fp32 dynamic-threshold scale s (x0 -> clamp(x0, -s, s) / s) or clip_range.
    ``prediction_type``: 'epsilon'/'eps', 'v_prediction'/'v', 'sample'/'x0'.

    Mixed dtypes are promoted like PyTorch would (fp16 model output with fp32 x computes and stores fp32).
    ``out`` (may be ``x`` itself) and ``pred_x0_out`` receive the results in place.
    CUDA-graph capture needs a tensor ``step`` and a kernel backend: ``backend="reference"`` with ``rng_state``
    reads the seed on the host, and an int ``step`` is copied to the device on every call.
    Returns x_prev [B, ...], or (x_prev, pred_x0) when ``return_pred_x0`` or ``pred_x0_out`` is given.
    """
    _require_float_tensor("x", x)
    _require_float_tensor("model_output", model_output)
    _require_tensor("table", table)
    if isinstance(step, bool):
        raise TypeError("ddim_step: step must be an int64 tensor or an int, got bool")
    if isinstance(step, int):
        step = torch.tensor([step], dtype=torch.int64, device=x.device)
    _require_tensor("step", step)
    prediction_type = canonical_prediction_type(prediction_type)
    guidance_scale = _optional_float("guidance_scale", guidance_scale)
    clip_range = _optional_float("clip_range", clip_range)
    temperature = _optional_float("temperature", temperature)
    if temperature is None:
        raise TypeError("ddim_step: temperature must be a float, got None")
    if noise is not None:
        _require_float_tensor("noise", noise)
    if rng_state is not None:
        _require_tensor("rng_state", rng_state)
    if x0_threshold is not None:
        _require_tensor("x0_threshold", x0_threshold)

    # Promote like eager PyTorch would (ldm under autocast feeds fp16 model outputs to fp32 latents).
    dtype = torch.promote_types(x.dtype, model_output.dtype)
    if dtype == torch.float64 and backend != "reference":
        raise TypeError("ddim_step: float64 is not supported by the kernels (use backend='reference')")
    x_in = x if x.dtype == dtype else x.to(dtype)
    model_output = model_output if model_output.dtype == dtype else model_output.to(dtype)
    if noise is not None and noise.dtype != dtype:
        noise = noise.to(dtype)

    backend = resolve_backend(backend, x.device)
    want_pred_x0 = return_pred_x0 or pred_x0_out is not None

    if backend == "reference":
        ref_noise = noise
        if rng_state is not None:
            seed, offset = (int(v) for v in rng_state.tolist())
            ref_noise = reference.philox_normal(seed, offset + int(step.reshape(-1)[0]), x.shape).to(x.device)
        x_prev, pred_x0 = reference.ddim_step(
            x_in, model_output, table, step, guidance_scale=guidance_scale, prediction_type=prediction_type,
            clip_range=clip_range, x0_threshold=x0_threshold, use_clipped_model_output=use_clipped_model_output,
            noise=ref_noise, temperature=temperature, compute_dtype=torch.float32)
        x_prev, pred_x0 = x_prev.to(dtype), pred_x0.to(dtype)
        if out is not None:
            out.copy_(x_prev)
            x_prev = out
        if pred_x0_out is not None:
            pred_x0_out.copy_(pred_x0)
            pred_x0 = pred_x0_out
        return (x_prev, pred_x0) if want_pred_x0 else x_prev

    if backend == "triton":
        from ddim_fast.triton import ddim_step as triton_step

        functional, out_variant = triton_step.ddim_step_triton, triton_step.ddim_step_triton_out
    else:
        functional, out_variant = torch.ops.ddim_fast.ddim_step, torch.ops.ddim_fast.ddim_step_out

    args = (x_in, model_output, table, step, guidance_scale, prediction_type, clip_range, x0_threshold,
            bool(use_clipped_model_output), noise, rng_state, temperature)
    if out is None and pred_x0_out is None:
        x_prev, pred_x0 = functional(*args, bool(want_pred_x0))
        return (x_prev, pred_x0) if want_pred_x0 else x_prev

    if out is None:
        out = torch.empty_like(x_in, memory_format=torch.contiguous_format)
    if pred_x0_out is None and want_pred_x0:
        pred_x0_out = torch.empty_like(x_in, memory_format=torch.contiguous_format)
    out_variant(*args, out, pred_x0_out)
    return (out, pred_x0_out) if want_pred_x0 else out
