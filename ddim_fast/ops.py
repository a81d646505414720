"""Typed front door of the ``torch.ops.ddim_fast`` step operators: input checks with clear errors, dtype
promotion, and the call of the backend that ``ddim_fast.backends`` chooses (C++ CPU, CUDA C++, Triton,
reference). The ops themselves, their fake kernels and the Triton registrations are set up by
``import ddim_fast`` (``ddim_fast._library``); schemas live in csrc/ops.cpp.
"""

from __future__ import annotations

from typing import Literal

import torch

from ddim_fast import _checks, backends, reference
from ddim_fast._checks import allocate_step_outputs, canonical_prediction_type  # noqa: F401  (public)
from ddim_fast import _library
from ddim_fast._library import has_native_kernel, triton_found

Backend = Literal["auto", "native", "triton", "reference"]
BACKENDS = backends.STEP_BACKENDS


def triton_available() -> bool:
    """True when triton is installed (its kernels need a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors)."""
    return triton_found()


# The step's backend choice lives with every other op's in ddim_fast.backends (the one resolver); this is the
# same function under its public name here.
resolve_backend = backends.resolve_step_backend


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PREDICTIONS = _checks._PREDICTION_ALIASES


def ddim_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    row: torch.Tensor | int | None = None,
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
    step: torch.Tensor | int | None = None,
):
    """One fused DDIM step (one kernel launch): guidance combine, x0/eps prediction, optional clamp,
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * temperature * z.

    Shapes: x [B, ...]; model_output [B, ...], or [2B, ...] = cat([uncond, cond]) with ``guidance_scale``;
    table [R, 8] fp32 (``ddim_fast.schedule.coefficient_table``) and ``row`` the index of the table row to use,
    an int64 tensor of one element (both on x's device: bump ``row`` in place to advance without host work) or
    an int. What a row is depends on who built the table: ``FastDDIMSampler`` (ldm) builds one row per sampling
    step and passes the step's index; ``FastDDIMScheduler`` / ``FastDDIMInverseScheduler`` (diffusers) build one
    row per training timestep and pass the timestep itself. noise [B, ...] or
    rng_state int64 for in-kernel Philox normals: [2] = (seed, offset), one stream over the whole tensor, or
    [B, 2], one (seed, offset) per batch row, so that a sample's noise depends on its own seed only, not on
    its place in the batch or the batch size (row k uses offset + k; mapping in csrc/include/ddim_fast/philox.h);
    x0_threshold [B] fp32 dynamic-threshold scale s (x0 -> clamp(x0, -s, s) / s) or clip_range (> 0; +inf
    clamps nothing but still re-derives eps with ``use_clipped_model_output``).
    ``prediction_type``: 'epsilon'/'eps', 'v_prediction'/'v', 'sample'/'x0'.

    Mixed dtypes are promoted like PyTorch would (fp16 model output with fp32 x computes and stores fp32).
    Outputs are laid out like ``torch.empty_like(x)`` (channels_last x gives channels_last outputs), as
    element-wise PyTorch ops do; the kernels run dense shared layouts in memory order, as fast as contiguous.
    ``out`` (may be ``x`` itself) and ``pred_x0_out`` receive the results in place.
    CUDA-graph capture needs a tensor ``row`` and a kernel backend: ``backend="reference"`` with ``rng_state``
    reads the seed on the host, and an int ``row`` is copied to the device on every call.
    ``step=`` is the deprecated keyword name of ``row`` (until 0.3: a DeprecationWarning; passing the row
    positionally works in every version).
    Returns x_prev [B, ...], or (x_prev, pred_x0) when ``return_pred_x0`` or ``pred_x0_out`` is given.
    """
    # The checks here are about Python types only (what must hold before promotion and the op call); each costs
    # a type test in the common case (tensors of a float dtype, Python floats, a tensor row). Every rule about
    # values, shapes, devices and overlap is the op's (csrc/ddim_step_args.cpp, for every backend).
    if step is not None or row is None:
        row = _checks.row_from_renamed_step("ddim_fast.ops.ddim_step", row, step)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        _checks.require_float_tensor("ddim_step", "x", x, allow_float64=True)
    if not isinstance(model_output, torch.Tensor) or model_output.dtype not in _FLOAT_DTYPES:
        _checks.require_float_tensor("ddim_step", "model_output", model_output, allow_float64=True)
    if not isinstance(table, torch.Tensor):
        _checks.require_tensor("ddim_step", "table", table)
    if not isinstance(row, torch.Tensor):
        if isinstance(row, bool):
            raise TypeError("ddim_step: row must be an int64 tensor or an int, got bool")
        if not isinstance(row, int):
            _checks.require_tensor("ddim_step", "row", row)
        row = torch.tensor([row], dtype=torch.int64, device=x.device)
    canonical = _PREDICTIONS.get(prediction_type) if type(prediction_type) is str else None
    prediction_type = canonical if canonical is not None else canonical_prediction_type(prediction_type)
    # Scalars become Python floats here (0-dim tensors, numpy scalars, ints); their values (finite, clip_range > 0)
    # are checked with every other rule by the op (csrc/ddim_step_args.cpp), whichever backend runs.
    if guidance_scale is not None and type(guidance_scale) is not float:
        guidance_scale = _checks.real_number("ddim_step", "guidance_scale", guidance_scale, optional=True)
    if clip_range is not None and type(clip_range) is not float:
        clip_range = _checks.real_number("ddim_step", "clip_range", clip_range, optional=True)
    if type(temperature) is not float:
        temperature = _checks.real_number("ddim_step", "temperature", temperature)
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.dtype not in _FLOAT_DTYPES):
        _checks.require_float_tensor("ddim_step", "noise", noise, allow_float64=True)
    if rng_state is not None and not isinstance(rng_state, torch.Tensor):
        _checks.require_tensor("ddim_step", "rng_state", rng_state)
    if x0_threshold is not None and not isinstance(x0_threshold, torch.Tensor):
        _checks.require_tensor("ddim_step", "x0_threshold", x0_threshold)

    # Promote like eager PyTorch would (ldm under autocast feeds fp16 model outputs to fp32 latents).
    dtype = x.dtype
    if model_output.dtype != dtype:
        dtype = torch.promote_types(dtype, model_output.dtype)
        model_output = model_output if model_output.dtype == dtype else model_output.to(dtype)
    x_in = x if x.dtype == dtype else x.to(dtype)
    if noise is not None and noise.dtype != dtype:
        noise = noise.to(dtype)

    backend = resolve_backend(backend, x.device, dtype)
    want_pred_x0 = return_pred_x0 or pred_x0_out is not None

    if backend == "reference":
        return _reference_step(x_in, model_output, table, row, guidance_scale, prediction_type, clip_range,
                               x0_threshold, use_clipped_model_output, noise, rng_state, temperature, out,
                               pred_x0_out, want_pred_x0)

    if backend == "triton":
        # Eagerly, the Triton op's own kernel function is called without the dispatcher hop (a Python kernel
        # behind the C++ dispatcher costs a few microseconds per step); under torch.compile the op itself is
        # traced (opaque, with its fake kernel). Same function either way.
        if torch.compiler.is_compiling():
            functional, out_variant = _TRITON_STEP, _TRITON_STEP_OUT
        else:
            functional, out_variant = _library.ddim_step_triton_kernel, _library.ddim_step_triton_out_kernel
    else:
        functional, out_variant = _NATIVE_STEP, _NATIVE_STEP_OUT

    args = (x_in, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
            bool(use_clipped_model_output), noise, rng_state, temperature)
    if out is None and pred_x0_out is None:
        x_prev, pred_x0 = functional(*args, bool(want_pred_x0))
        return (x_prev, pred_x0) if want_pred_x0 else x_prev

    # Laid out like the functional op's outputs (empty_like keeps channels_last).
    if out is None:
        out = torch.empty_like(x_in)
    if pred_x0_out is None and want_pred_x0:
        pred_x0_out = torch.empty_like(x_in)
    out_variant(*args, out, pred_x0_out)
    return (out, pred_x0_out) if want_pred_x0 else out


# The op overloads themselves: calling .default skips the OpOverloadPacket's overload resolution.
_NATIVE_STEP = torch.ops.ddim_fast.ddim_step.default
_NATIVE_STEP_OUT = torch.ops.ddim_fast.ddim_step_out.default
_TRITON_STEP = torch.ops.ddim_fast.ddim_step_triton.default
_TRITON_STEP_OUT = torch.ops.ddim_fast.ddim_step_triton_out.default
_CHECK = torch.ops.ddim_fast.ddim_step_check.default  # the step's argument rules, for the reference path


def _reference_step(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                    use_clipped_model_output, noise, rng_state, temperature, out, pred_x0_out, want_pred_x0):
    """backend='reference': the PyTorch implementation (float64 latents, devices without kernels), with the
    kernels' argument rules, their seeded noise (drawn on the host) and their output layout."""
    dtype = x.dtype
    # The kernels' argument rules and messages (csrc/ddim_step_args.cpp), float64 included. Not on meta tensors
    # (they have no data to check; the reference computes shapes alike).
    if x.device.type != "meta":
        _CHECK(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
               bool(use_clipped_model_output), noise, rng_state, temperature, out, pred_x0_out, True)
    ref_noise = noise
    if rng_state is not None:
        ref_noise = reference.seeded_noise(rng_state, int(row.reshape(-1)[0]), x.shape).to(x.device)
    x_prev, pred_x0 = reference.ddim_step(
        x, model_output, table, row, guidance_scale=guidance_scale, prediction_type=prediction_type,
        clip_range=clip_range, x0_threshold=x0_threshold, use_clipped_model_output=use_clipped_model_output,
        noise=ref_noise, temperature=temperature,
        compute_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x_prev, pred_x0 = x_prev.to(dtype), pred_x0.to(dtype)  # .to keeps the empty_like(x) layout
    if out is not None:
        out.copy_(x_prev)
        x_prev = out
    if pred_x0_out is not None:
        pred_x0_out.copy_(pred_x0)
        pred_x0 = pred_x0_out
    return (x_prev, pred_x0) if want_pred_x0 else x_prev
