"""Typed front door of the ``torch.ops.ddim_fast`` step operators: input checks with clear errors and the
backend choice (C++ CPU, CUDA C++, Triton, reference). The ops themselves, their fake kernels and the Triton
registrations are set up by ``import ddim_fast`` (``ddim_fast._library``); schemas live in csrc/ops.cpp.
"""

from __future__ import annotations

from typing import Literal

import torch

from ddim_fast import _checks, reference
from ddim_fast._checks import allocate_step_outputs, canonical_prediction_type  # noqa: F401  (public)
from ddim_fast._library import has_native_kernel, triton_found

Backend = Literal["auto", "native", "triton", "reference"]
BACKENDS = ("auto", "native", "triton", "reference")


def triton_available() -> bool:
    """True when triton is installed (its kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors)."""
    return triton_found()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs a step on ``device`` with storage ``dtype``.

    'auto': the C++ kernel when the extension has one for the device, else Triton on CUDA, else the
    reference (pure PyTorch: float64, and devices without kernels such as MPS). On ``meta`` tensors the op
    itself runs (its fake kernel gives shapes only). An explicit backend that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kernel_dtype = dtype in _checks.KERNEL_DTYPES
    if backend == "native":
        if not has_native_kernel(device.type) and device.type != "meta":
            raise RuntimeError(
                f"backend='native': the ddim_fast C++ extension has no {device.type} kernel "
                "(for CUDA, build on a machine whose torch has CUDA and nvcc; see setup.py)")
    if backend in ("native", "triton") and not kernel_dtype:
        raise TypeError(f"ddim_step: backend={backend!r} supports float32/float16/bfloat16, got {dtype} "
                        "(backend='auto' or 'reference' computes float64 in PyTorch)")
    if backend == "triton" and not triton_found():
        raise RuntimeError("backend='triton': the triton package is not installed (pip install triton==3.6.0)")
    if backend != "auto":
        return backend
    if not kernel_dtype:
        return "reference"
    if device.type == "meta" or has_native_kernel(device.type):
        return "native"
    if device.type == "cuda" and triton_found():
        return "triton"
    return "reference"


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
    op = "ddim_step"
    _checks.require_float_tensor(op, "x", x, allow_float64=True)
    _checks.require_float_tensor(op, "model_output", model_output, allow_float64=True)
    _checks.require_tensor(op, "table", table)
    if isinstance(step, bool):
        raise TypeError("ddim_step: step must be an int64 tensor or an int, got bool")
    if isinstance(step, int):
        step = torch.tensor([step], dtype=torch.int64, device=x.device)
    _checks.require_tensor(op, "step", step)
    prediction_type = canonical_prediction_type(prediction_type)
    guidance_scale = _checks.optional_finite_float(op, "guidance_scale", guidance_scale)
    if clip_range is not None:
        # +inf is allowed: "clamp nothing, but re-derive eps" (diffusers' use_clipped_model_output).
        clip_range = _checks.real_number(op, "clip_range", clip_range, optional=True)
        if not clip_range > 0:
            raise ValueError(f"ddim_step: clip_range must be > 0, got {clip_range:g} (inf clamps nothing)")
    if temperature is None:
        raise TypeError("ddim_step: temperature must be a float, got None")
    temperature = _checks.finite_float(op, "temperature", temperature)
    if noise is not None:
        _checks.require_float_tensor(op, "noise", noise, allow_float64=True)
    if rng_state is not None:
        _checks.require_tensor(op, "rng_state", rng_state)
    if x0_threshold is not None:
        _checks.require_tensor(op, "x0_threshold", x0_threshold)

    # Promote like eager PyTorch would (ldm under autocast feeds fp16 model outputs to fp32 latents).
    dtype = torch.promote_types(x.dtype, model_output.dtype)
    x_in = x if x.dtype == dtype else x.to(dtype)
    model_output = model_output if model_output.dtype == dtype else model_output.to(dtype)
    if noise is not None and noise.dtype != dtype:
        noise = noise.to(dtype)

    backend = resolve_backend(backend, x.device, dtype)
    want_pred_x0 = return_pred_x0 or pred_x0_out is not None

    if backend == "reference":
        ref_noise = noise
        if rng_state is not None:
            seed, offset = (int(v) for v in rng_state.tolist())
            ref_noise = reference.philox_normal(seed, offset + int(step.reshape(-1)[0]), x.shape).to(x.device)
        x_prev, pred_x0 = reference.ddim_step(
            x_in, model_output, table, step, guidance_scale=guidance_scale, prediction_type=prediction_type,
            clip_range=clip_range, x0_threshold=x0_threshold, use_clipped_model_output=use_clipped_model_output,
            noise=ref_noise, temperature=temperature,
            compute_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        x_prev, pred_x0 = x_prev.to(dtype), pred_x0.to(dtype)
        if out is not None:
            out.copy_(x_prev)
            x_prev = out
        if pred_x0_out is not None:
            pred_x0_out.copy_(pred_x0)
            pred_x0 = pred_x0_out
        return (x_prev, pred_x0) if want_pred_x0 else x_prev

    if backend == "triton":
        functional, out_variant = torch.ops.ddim_fast.ddim_step_triton, torch.ops.ddim_fast.ddim_step_triton_out
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
