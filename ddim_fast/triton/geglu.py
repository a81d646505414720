"""Triton GEGLU: h [..., 2D] -> h[..., :D] * gelu(h[..., D:]) in one pass, the tail of diffusers' ``GEGLU``.

The op ``ddim_fast::geglu_triton(h) -> out`` (schema in csrc/ops.cpp; kernel and fake kernel registered by
ddim_fast/_library.py, which imports this module on the first call). It is also the CUDA kernel of
``ddim_fast::geglu``. diffusers' GEGLU (models/activations.py) is ``hidden_states, gate = proj(x).chunk(2, dim=-1);
return hidden_states * F.gelu(gate)`` with the exact GELU (``approximate="none"``): g * (1 + erf(g / sqrt(2))) / 2.
Eager PyTorch runs that as two kernels (gelu on the strided gate view, then the product) and rounds gelu(gate) to
the storage dtype in between; this kernel reads each half once, keeps everything in fp32 (libdevice's erff) and
writes the product once: 3 passes over [..., D] instead of 5.

Layout: h's last dim must be unit-stride and its leading dims must walk memory with one row stride (a
contiguous projection output, or a slice of one); anything else is copied to a contiguous tensor first. The
output is a new contiguous [..., D] tensor (what ``a * gelu(gate)`` returns for a contiguous projection).

Tiles: [BLOCK_R rows, BLOCK_D columns]; the values at column d and the gates at d + D. When h and out are
16-byte aligned and D and the row stride are multiples of 16 bytes (SD1.5: D = 1280 / 2560 / 5120; SDXL 5120)
the host sets ALIGN (elements per 16 bytes) and every access is one 16-byte vector (checked offline for sm_90 and
sm_80 by scripts/triton_aot_check.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import ddim_fast  # noqa: F401  (registers torch.ops.ddim_fast.*)
from ddim_fast._checks import allocate_geglu_output, check_geglu_args
from ddim_fast._library import check_triton_device

__all__ = ["geglu_triton", "geglu_triton_impl", "launch_config"]

_TILE = 4096  # elements of the output tile: 32 per thread on 4 warps (values and gates: 64 fp32 registers)
_SQRT1_2 = tl.constexpr(0.7071067811865476)


# Integer arguments are not specialized: ALIGN carries the divisibility that matters, so one compile per constexpr
# combination serves every shape (see group_norm.py).
@triton.jit(do_not_specialize=["rows", "D", "stride_h", "stride_out"])
def _geglu_kernel(
    h_ptr, out_ptr,
    rows, D, stride_h, stride_out,
    ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r0 = tl.program_id(0) * BLOCK_R
    d0 = tl.program_id(1) * BLOCK_D
    if ALIGN > 1:
        # Host-guaranteed multiples of ALIGN (elements per 16 bytes): (v // A) * A is how Triton's alignment
        # analysis learns it (the JIT only hints integers divisible by 16). No @triton.jit helper for this: under
        # the interpreter every helper call costs milliseconds.
        D = (D // ALIGN) * ALIGN
        stride_h = (stride_h // ALIGN) * ALIGN
        stride_out = (stride_out // ALIGN) * ALIGN
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = ((r0 + r) < rows)[:, None] & ((d0 + d) < D)[None, :]
    # int64 tile bases (tensors over 2^31 elements), int32 offsets inside the tile.
    values_ptr = h_ptr + (r0.to(tl.int64) * stride_h + d0) + (r[:, None] * stride_h + d[None, :])
    values = tl.load(values_ptr, mask=mask, other=0.0).to(tl.float32)
    gates = tl.load(values_ptr + D, mask=mask, other=0.0).to(tl.float32)
    # F.gelu's exact form; tl.math.erf is libdevice's erff on the GPU (2 ulp), numpy's erf in the interpreter.
    out = values * (0.5 * gates * (1.0 + tl.math.erf(gates * _SQRT1_2)))
    out_ptrs = out_ptr + (r0.to(tl.int64) * stride_out + d0) + (r[:, None] * stride_out + d[None, :])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(rows: int, d: int, element_size: int = 2) -> dict:
    """BLOCK_R x BLOCK_D tile and warps from the shape alone (scripts/triton_aot_check.py compiles the same): up to 256
    columns (SD's D = 1280 / 2560 / 5120 split into 5 / 10 / 20 blocks, no idle lanes) by as many rows as fill _TILE.
    Every SD shape takes the same tile: one JIT compile per dtype."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, _TILE // block_d))
    tile = block_r * block_d
    num_warps = 4 if tile >= 2048 else (2 if tile >= 1024 else 1)
    if element_size >= 4 and tile >= 4096:
        num_warps = 8  # fp32: 16 values and 16 gates per thread (106 registers at 4 warps on sm_90)
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)


def _row_stride(h: torch.Tensor):
    """The one stride between consecutive rows of h viewed as [rows, 2D] (unit last-dim stride), or None."""
    if h.shape[-1] > 1 and h.stride(-1) != 1:
        return None
    dims = [(int(n), int(s)) for n, s in zip(h.shape[:-1], h.stride()[:-1]) if n != 1]
    if not dims:
        return 0
    size, stride = dims[-1]
    for n, s in reversed(dims[:-1]):
        if s != stride * size:
            return None
        size *= n
    return stride


def kernel_arguments(h: torch.Tensor, out: torch.Tensor, row_stride: int) -> tuple:
    """(grid, positional arguments, keywords) of the launch for a checked h with the given row stride. The one
    packing of the launch: scripts/triton_aot_check.py compiles exactly what this returns (with meta tensors)."""
    d = int(out.shape[-1])
    rows = out.numel() // d
    cfg = launch_config(rows, d, h.element_size())
    vec = 16 // h.element_size()
    aligned = (h.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0 and d % vec == 0 and row_stride % vec == 0)
    num_warps = cfg["num_warps"]
    if not aligned and num_warps == 4:
        # Element-wise accesses keep one 64-bit address per element in registers: 166 registers at 4 warps left 12
        # warps per SM (offline ptxas -v); twice the warps for the same tile.
        num_warps = 8
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(d, cfg["BLOCK_D"]))
    args = [h, out, rows, d, row_stride, d]
    kwargs = dict(ALIGN=vec if aligned else 1, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=num_warps)
    return grid, args, kwargs


def geglu_triton_impl(h: torch.Tensor) -> torch.Tensor:
    """Launches the kernel (no custom-op wrapper: the op and the CUDA kernel of ddim_fast::geglu call this).
    h [..., 2D] -> a new contiguous [..., D] tensor in h's dtype."""
    op = "geglu_triton"
    check_geglu_args(op, h)
    check_triton_device(op, "h", h)
    out = allocate_geglu_output(h)
    if out.numel() == 0:
        return out
    row_stride = _row_stride(h)
    if row_stride is None:
        h = h.contiguous()
        row_stride = int(h.shape[-1])
    grid, args, kwargs = kernel_arguments(h, out, row_stride)
    device = h.device
    switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    if switch:
        with torch.cuda.device(device):
            _geglu_kernel[grid](*args, **kwargs)
    else:
        _geglu_kernel[grid](*args, **kwargs)
    return out


# The op (schema in csrc/ops.cpp, registered by ddim_fast/_library.py, which calls geglu_triton_impl).
geglu_triton = torch.ops.ddim_fast.geglu_triton
