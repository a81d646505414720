"""The CPU kernels of the UNet-body ops (``group_norm_silu``, ``geglu``): PyTorch's own composites, registered by
``ddim_fast/_library.py`` (also as the CUDA kernels when triton is not installed).

Why composites and not C++ kernels: on the CPU, PyTorch's GroupNorm already has a channels_last kernel (one pass
for the statistics, one for the normalization, threaded over (sample, group)), and the fused op exists for the GPU,
where the channels_last GroupNorm is a slow path and every extra elementwise kernel is a pass over memory. The
composite is what a plain diffusers UNet runs on the CPU (``nn.GroupNorm`` then ``nn.SiLU``; ``proj`` chunk ``gelu``
mul), minus one allocation (SiLU runs in place on the fresh normalized tensor): so a patched UNet on the CPU is
never slower than the plain one (docs/design.md section 3 has the measurement).

Numerics: PyTorch's CPU kernels accumulate fp16/bf16 in fp32, but round to the storage dtype between steps (the
normalized tensor before SiLU, gelu(gate) before the product), as a plain diffusers UNet does. The Triton kernels
keep every intermediate in fp32. Both meet the tolerance table (tests/test_unet_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddim_fast._checks import allocate_geglu_output, allocate_group_norm_output, check_geglu_args, check_group_norm_args


def group_norm_silu_composite(x: torch.Tensor, weight, bias, num_groups: int, eps: float, apply_silu: bool,
                              channel_add=None) -> torch.Tensor:
    """F.group_norm (+ SiLU in place), the output laid out like ``torch.empty_like(x)``."""
    op = "group_norm_silu"
    check_group_norm_args(op, x, weight, bias, num_groups, eps, channel_add)
    if x.numel() == 0:
        return allocate_group_norm_output(x)
    layout = x
    if channel_add is not None:
        x = x + channel_add.to(x.dtype).reshape(tuple(channel_add.shape) + (1,) * (x.dim() - 2))
    # F.group_norm takes weight/bias in x's dtype only; the kernels take any of the three float dtypes.
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if apply_silu:
        y = F.silu(y, inplace=True)
    if y.stride() == layout.stride():
        return y  # the common case (PyTorch kept x's layout), without allocating the expected layout to compare
    like = allocate_group_norm_output(layout)
    if y.stride() != like.stride():
        # PyTorch keeps most channels_last and contiguous inputs' layouts; other views (and batch-1 channels_last
        # inputs) come back contiguous.
        return like.copy_(y)
    return y


def geglu_composite(h: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU tail: ``values, gate = h.chunk(2, -1); values * F.gelu(gate)``, as a new contiguous tensor."""
    check_geglu_args("geglu", h)
    if h.numel() == 0:
        return allocate_geglu_output(h)
    values, gate = h.chunk(2, dim=-1)
    out = F.gelu(gate)
    return out.mul_(values) if out.is_contiguous() else (values * out).contiguous()
