"""The UNet-body ops (group_norm_silu, geglu) against the float64 oracle (tests/oracles.py): the CPU kernels (PyTorch composites), the
Triton kernels under the interpreter on CPU (on CUDA tensors when a device is present), every dtype, NCHW and
channels_last, strided and misaligned views, empty tensors, poisoned outputs and workspaces, errors, opcheck.

Interpreter shapes stay tiny (a program costs tens of milliseconds there); one real SD shape per op runs through
the CPU kernel, and on CUDA through the Triton kernels."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import oracles
from conftest import DTYPES, assert_fully_written, assert_rel_close, misaligned, requires_cuda
from ddim_fast import unet_ops
from ddim_fast._library import interpreting

ops = torch.ops.ddim_fast

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and not interpreting(),
    reason="no CUDA device and TRITON_INTERPRET is not 1: Triton runs CPU tensors only under its interpreter")

# (backend label, device, op): the op's own kernel on the CPU (PyTorch's composite), the Triton op where it runs.
BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=requires_triton),
]


def rand(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def group_norm_op(backend):
    return ops.group_norm_silu_triton if backend == "triton" else ops.group_norm_silu


def geglu_op(backend):
    return ops.geglu_triton if backend == "triton" else ops.geglu


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and Triton workspace the ops allocate starts as NaN: an element a kernel fails to write (or a
    partial the finalize kernel reads before the statistics kernel wrote it) shows up as NaN."""
    import ddim_fast._composite as composite
    from ddim_fast._checks import allocate_geglu_output, allocate_group_norm_output
    from ddim_fast.triton import geglu as triton_geglu
    from ddim_fast.triton import group_norm as triton_group_norm

    def nan_group_norm_output(x):
        out = allocate_group_norm_output(x)
        return out.fill_(float("nan")) if out.numel() else out

    def nan_geglu_output(h):
        out = allocate_geglu_output(h)
        return out.fill_(float("nan")) if out.numel() else out

    real_empty = torch.empty

    def nan_workspace(*shape, **kwargs):
        t = real_empty(*shape, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    for module in (composite, triton_group_norm):
        monkeypatch.setattr(module, "allocate_group_norm_output", nan_group_norm_output)
    for module in (composite, triton_geglu):
        monkeypatch.setattr(module, "allocate_geglu_output", nan_geglu_output)
    monkeypatch.setattr(triton_group_norm, "_workspace", lambda n, device: nan_workspace(n, dtype=torch.float32,
                                                                                           device=device))


def expected_layout(x):
    return torch.empty_like(x).stride()


# ------------------------------------------------------------------------------------------------
# group_norm_silu
# ------------------------------------------------------------------------------------------------

# (shape, num_groups): odd sizes, group sizes of 1 / 3 / 5 / 8, 2-D, 3-D (the VAE attention's [B, C, L]) and 5-D.
GN_SHAPES = [
    ((2, 24, 5, 7), 8),
    ((3, 20, 4, 4), 4),
    ((1, 6, 3, 5), 2),
    ((2, 16, 9), 16),
    ((5, 12), 4),
    ((1, 8, 2, 3, 3), 2),
]


def _layouts(shape, dtype, device):
    """(label, x) in NCHW, channels_last (4-D), a strided view (every other spatial column of a wider buffer, so the
    spatial dims do not collapse: the copy path), a channel-strided view, and a misaligned copy."""
    x = rand(shape, dtype, device, scale=2.0, offset=0.5)
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.to(memory_format=torch.channels_last)
        wide = rand(shape[:3] + (2 * shape[3],), dtype, device, seed=1).to(memory_format=torch.channels_last)
        yield "strided-spatial", wide[..., ::2]
        rows = rand(shape[:3] + (shape[3] + 3,), dtype, device, seed=7)
        yield "strided-rows", rows[..., :shape[3]]  # spatial dims that do not collapse: the copy path
    chans = rand((shape[0], 2 * shape[1]) + tuple(shape[2:]), dtype, device, seed=2)
    yield "strided-channels", chans[:, ::2]
    yield "misaligned", misaligned(x)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_layouts_dtypes(backend, device, dtype, poisoned):
    op = group_norm_op(backend)
    # The interpreter pays tens of ms per program and operation: every layout in fp32, two in fp16/bf16.
    few = backend == "triton" and TRITON_DEVICE == "cpu" and dtype != torch.float32
    for shape, groups in (GN_SHAPES[0], GN_SHAPES[3]):
        channels = shape[1]
        weight = rand((channels,), dtype, device, seed=3, offset=1.0)
        bias = rand((channels,), dtype, device, seed=4)
        for label, x in _layouts(shape, dtype, device):
            if few and label not in ("channels_last", "misaligned"):
                continue
            y = op(x, weight, bias, groups, 1e-5, True, None)
            what = f"{backend} {dtype} {shape} {label}"
            assert y.dtype == dtype and y.shape == x.shape, what
            assert y.stride() == expected_layout(x), f"{what}: output strides {y.stride()}"
            assert_fully_written(y, what)
            assert_rel_close(y, oracles.group_norm_silu(x, weight, bias, groups, 1e-5, True), dtype, what)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,groups", GN_SHAPES)
def test_group_norm_silu_options(backend, device, shape, groups, poisoned):
    """Every option combination (affine or not, SiLU or not, channel_add [B, C] or a broadcast [1, C] view) on odd
    shapes, fp32 (the tight tolerance)."""
    op = group_norm_op(backend)
    dtype = torch.float32
    x = rand(shape, dtype, device, scale=3.0, offset=-1.0)
    channels, batch = shape[1], shape[0]
    weight = rand((channels,), dtype, device, seed=3)
    bias = rand((channels,), dtype, device, seed=4)
    adds = [None, rand((batch, channels), dtype, device, seed=5),
            rand((1, channels), dtype, device, seed=6).expand(batch, channels)]
    combos = [((weight, bias), True, adds[1]), ((None, None), True, None), ((weight, None), False, adds[2]),
              ((None, bias), False, adds[1]), ((weight, bias), False, None)]
    if backend == "triton" and TRITON_DEVICE == "cpu" and shape != GN_SHAPES[0][0]:
        combos = combos[:1]  # the interpreter pays tens of ms per program: every combination on one shape
    for (w, b), silu, add in combos:
        y = op(x, w, b, groups, 1e-6, silu, add)
        what = f"{backend} {shape} affine={w is not None}/{b is not None} silu={silu} add={add is not None}"
        assert_fully_written(y, what)
        assert_rel_close(y, oracles.group_norm_silu(x, w, b, groups, 1e-6, silu, add), dtype, what)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_norm_silu_mixed_parameter_dtypes(backend, device):
    """fp16 activations with fp32 parameters (autocast's fp32 master weights) and a bf16 channel_add."""
    x = rand((2, 16, 3, 5), torch.float16, device).to(memory_format=torch.channels_last)
    weight = rand((16,), torch.float32, device, seed=3)
    bias = rand((16,), torch.float32, device, seed=4)
    add = rand((2, 16), torch.bfloat16, device, seed=5)
    y = group_norm_op(backend)(x, weight, bias, 4, 1e-5, True, add)
    assert y.dtype == torch.float16
    assert_rel_close(y, oracles.group_norm_silu(x, weight, bias, 4, 1e-5, True, add), torch.float16)


@requires_triton
def test_group_norm_triton_offset_mean_fp32():
    """fp32 within 1e-6 with a mean of 4 std (the kernels subtract the mean before scaling). The fp32 mean itself is
    off by about an ulp of |mean|, so no fp32 kernel meets 1e-6 once |mean| / std reaches the tens."""
    x = rand((2, 16, 6, 6), torch.float32, TRITON_DEVICE, scale=1.0, offset=4.0)
    weight = rand((16,), torch.float32, TRITON_DEVICE, seed=3)
    y = ops.group_norm_silu_triton(x, weight, None, 4, 1e-5, True, None)
    assert_rel_close(y, oracles.group_norm_silu(x, weight, None, 4, 1e-5, True), torch.float32)


@requires_triton
def test_group_norm_triton_finalize_loops(monkeypatch, poisoned):
    """The finalize kernel's loops over chunks and channel blocks (one tile covers a group under the interpreter;
    the GPU tiles loop): force the GPU tiling with tiny tiles, so each group takes several iterations of both loops
    and several groups share a program."""
    from ddim_fast.triton import group_norm as gn

    monkeypatch.setattr(gn, "_FINALIZE_TILE", 4)
    monkeypatch.setattr(gn, "finalize_config", lambda n, g, cg, interpreted, real=gn.finalize_config: real(n, g, cg))
    monkeypatch.setattr(gn, "launch_config", lambda b, c, hw, layout, size, real=gn.launch_config: dict(
        real(b, c, hw, layout, size), BLOCK_P=4, num_chunks=-(-hw // 4)))
    monkeypatch.setattr(gn, "_PLANS", gn.PlanCache(512))
    x = rand((1, 24, 3, 3), torch.float32, TRITON_DEVICE, scale=2.0, offset=1.0).to(memory_format=torch.channels_last)
    add = rand((1, 24), torch.float32, TRITON_DEVICE, seed=5)
    plan = gn.plan_launch(x.shape, x.stride(), x.stride(), 2, x.element_size())
    fin = plan.fin
    assert plan.num_chunks == 3 and fin["BLOCK_K"] < 3 and fin["BLOCK_G"] < 12 and fin["BLOCK_GROUPS"] == 2, fin
    y = ops.group_norm_silu_triton(x, None, None, 2, 1e-5, True, add)
    assert_fully_written(y)
    assert_rel_close(y, oracles.group_norm_silu(x, None, None, 2, 1e-5, True, add), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_norm_silu_empty(backend, device):
    op = group_norm_op(backend)
    for shape in [(0, 8, 4, 4), (2, 8, 0, 4), (3, 0, 2, 2), (0, 8)]:
        x = torch.empty(shape, device=device)
        w = torch.ones(shape[1], device=device)
        y = op(x, w, None, 4 if shape[1] else 1, 1e-5, True, None)
        assert y.shape == x.shape and y.stride() == expected_layout(x)
    x = torch.empty((0, 8, 4, 4), device=device).to(memory_format=torch.channels_last)
    assert op(x, None, None, 2, 1e-5, False, None).stride() == x.stride()


def test_group_norm_silu_real_sd_shape_cpu():
    """SD1.5's first up-block norm at 512 px, batch 2 (CFG), channels_last fp32 through the CPU kernel."""
    x = rand((2, 640, 32, 32), torch.float32).to(memory_format=torch.channels_last)
    weight, bias = rand((640,), seed=3), rand((640,), seed=4)
    add = rand((2, 640), seed=5)
    y = ops.group_norm_silu(x, weight, bias, 32, 1e-6, True, add)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(y, oracles.group_norm_silu(x, weight, bias, 32, 1e-6, True, add), torch.float32)


@requires_triton
def test_group_norm_triton_real_sd_channels():
    """Real SD channel counts and groups (640 channels, 32 groups of 20, 128-channel tiles that cut groups) on the
    mid-block's 8x8 spatial size, batch 1 under the interpreter (few programs), fp16 channels_last."""
    x = rand((1, 640, 8, 8), torch.float16, TRITON_DEVICE).to(memory_format=torch.channels_last)
    weight, bias = rand((640,), torch.float16, TRITON_DEVICE, seed=3), rand((640,), torch.float16, TRITON_DEVICE, 4)
    add = rand((1, 640), torch.float16, TRITON_DEVICE, seed=5)
    y = ops.group_norm_silu_triton(x, weight, bias, 32, 1e-6, True, add)
    assert_rel_close(y, oracles.group_norm_silu(x, weight, bias, 32, 1e-6, True, add), torch.float16)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_cuda_real_sd_shapes(dtype):
    """Every SD1.5 GroupNorm configuration at 512 px, batch 2, channels_last, through the op's CUDA kernel."""
    for channels, size in [(320, 64), (640, 32), (1280, 16), (1280, 8), (2560, 8), (1920, 16), (960, 32), (640, 64)]:
        x = rand((2, channels, size, size), dtype, "cuda").to(memory_format=torch.channels_last)
        weight = rand((channels,), dtype, "cuda", seed=3)
        bias = rand((channels,), dtype, "cuda", seed=4)
        add = rand((2, channels), dtype, "cuda", seed=5)
        y = ops.group_norm_silu(x, weight, bias, 32, 1e-5, True, add)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_rel_close(y, oracles.group_norm_silu(x, weight, bias, 32, 1e-5, True, add), dtype,
                         f"{channels}x{size}x{size}")


def test_group_norm_silu_cpu_matches_plain_modules():
    """The CPU kernel is the plain diffusers computation: nn.GroupNorm then nn.SiLU, bit for bit in fp32."""
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = rand((2, 16, 5, 5)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.silu(norm(x))
        got = ops.group_norm_silu(x, norm.weight, norm.bias, 4, 1e-6, True, None)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------------
# geglu
# ------------------------------------------------------------------------------------------------

GEGLU_SHAPES = [(3, 5, 2 * 13), (2, 4, 2 * 40), (7, 2 * 8), (2 * 3,), (1, 1, 2 * 1)]


def _geglu_layouts(shape, dtype, device):
    h = rand(shape, dtype, device, scale=2.0)
    yield "contiguous", h
    wide = rand(tuple(shape[:-1]) + (shape[-1] + 6,), dtype, device, seed=1)
    yield "row-strided", wide[..., 3:3 + shape[-1]]
    if h.dim() >= 2:
        t = rand((shape[-1],) + tuple(shape[:-1]), dtype, device, seed=2)
        yield "transposed", t.movedim(0, -1)  # last dim not unit-stride: the copy path
    yield "misaligned", misaligned(h)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_layouts_dtypes(backend, device, dtype, poisoned):
    op = geglu_op(backend)
    for shape in GEGLU_SHAPES:
        for label, h in _geglu_layouts(shape, dtype, device):
            out = op(h)
            what = f"{backend} {dtype} {shape} {label}"
            assert out.shape == tuple(shape[:-1]) + (shape[-1] // 2,) and out.dtype == dtype, what
            assert out.is_contiguous(), what
            assert_fully_written(out, what)
            assert_rel_close(out, oracles.geglu(h), dtype, what)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_geglu_empty(backend, device):
    op = geglu_op(backend)
    for shape in [(0, 8), (3, 0), (2, 0, 6)]:
        out = op(torch.empty(shape, device=device))
        assert out.shape == tuple(shape[:-1]) + (shape[-1] // 2,)


def test_geglu_cpu_matches_diffusers():
    """The CPU kernel is diffusers' GEGLU tail (chunk, F.gelu, mul), bit for bit in fp32."""
    h = rand((2, 9, 2 * 24))
    values, gate = h.chunk(2, dim=-1)
    assert torch.equal(ops.geglu(h), values * F.gelu(gate))


def test_geglu_real_sd_shape_cpu():
    """SD1.5's 8x8 level at 512 px, batch 2: [2, 64, 2 * 5120] fp32."""
    h = rand((2, 64, 2 * 5120))
    assert_rel_close(ops.geglu(h), oracles.geglu(h), torch.float32)


@requires_triton
def test_geglu_triton_real_sd_width():
    """SD1.5's widest GEGLU (D = 5120, the 8x8 level) on a few rows under the interpreter, fp16."""
    h = rand((1, 4, 2 * 5120), torch.float16, TRITON_DEVICE)
    assert_rel_close(ops.geglu_triton(h), oracles.geglu(h), torch.float16)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_cuda_real_sd_shapes(dtype):
    for tokens, d in [(4096, 1280), (1024, 2560), (256, 5120), (64, 5120)]:
        h = rand((2, tokens, 2 * d), dtype, "cuda")
        assert_rel_close(ops.geglu(h), oracles.geglu(h), dtype, f"{tokens}x{d}")


# ------------------------------------------------------------------------------------------------
# Front door, errors, opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=requires_triton)])
def test_front_door_backends(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = rand((2, 8, 3, 3), torch.float16, device).to(memory_format=torch.channels_last)
    w, b = rand((8,), torch.float16, device, 3), rand((8,), torch.float16, device, 4)
    y = unet_ops.group_norm_silu(x, w, b, 2, 1e-5, channel_add=rand((2, 8), torch.float16, device, 5),
                                 backend=backend)
    assert y.stride() == x.stride()
    assert_rel_close(y, oracles.group_norm_silu(x, w, b, 2, 1e-5, True, rand((2, 8), torch.float16, device, 5)),
                     torch.float16)
    h = rand((3, 2 * 8), torch.bfloat16, device)
    assert_rel_close(unet_ops.geglu(h, backend=backend), oracles.geglu(h), torch.bfloat16)


GN_ERRORS = [
    (lambda x: dict(x=x.long()), TypeError, "x must be a float32, float16 or bfloat16"),
    (lambda x: dict(x=x[0, 0, 0]), ValueError, "x must be [B, C, *spatial]"),
    (lambda x: dict(num_groups=3), ValueError, "num_groups (3) must divide the channel count C"),
    (lambda x: dict(num_groups=0), ValueError, "num_groups must be > 0"),
    (lambda x: dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda x: dict(eps=float("nan")), ValueError, "eps must be finite"),
    (lambda x: dict(weight=torch.ones(7)), ValueError, "weight must be [C] = [8]"),
    (lambda x: dict(bias=torch.ones(8, dtype=torch.int32)), TypeError, "bias must be a float32"),
    (lambda x: dict(weight=torch.ones(8, device="meta")), ValueError, "weight must be on x's device"),
    (lambda x: dict(channel_add=torch.ones(2, 8, 1)), ValueError, "channel_add must be [B, C] = [2, 8]"),
]


@pytest.mark.parametrize("change,exc,message", GN_ERRORS)
@pytest.mark.parametrize("entry", ["front", "op", pytest.param("triton", marks=requires_triton)])
def test_group_norm_silu_errors(change, exc, message, entry):
    device = TRITON_DEVICE if entry == "triton" else "cpu"
    x = rand((2, 8, 3, 3), device=device)
    args = dict(x=x, weight=None, bias=None, num_groups=4, eps=1e-5, channel_add=None)
    args.update(change(x))
    if entry == "front":
        call = lambda: unet_ops.group_norm_silu(**args)  # noqa: E731
    else:
        op = ops.group_norm_silu_triton if entry == "triton" else ops.group_norm_silu
        call = lambda: op(args["x"], args["weight"], args["bias"], args["num_groups"], args["eps"], True,  # noqa: E731
                          args["channel_add"])
    with pytest.raises(exc, match=re.escape(message)):
        call()


@pytest.mark.parametrize("entry", ["front", "op", pytest.param("triton", marks=requires_triton)])
def test_geglu_errors(entry):
    fn = {"front": unet_ops.geglu, "op": ops.geglu, "triton": ops.geglu_triton}[entry]
    with pytest.raises(ValueError, match=r"h's last dim must be even"):
        fn(torch.ones(3, 5))
    with pytest.raises(TypeError, match="h must be a float32"):
        fn(torch.ones(3, 4, dtype=torch.int64))


def test_front_door_argument_errors():
    x = rand((2, 8, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        unet_ops.group_norm_silu(x, num_groups=4, backend="cuda")
    with pytest.raises(TypeError, match="apply_silu must be a bool"):
        unet_ops.group_norm_silu(x, num_groups=4, apply_silu=1)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        unet_ops.group_norm_silu(x, num_groups=4.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        unet_ops.group_norm_silu([1.0], num_groups=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        unet_ops.geglu(rand((2, 4)), backend="native")


@pytest.mark.parametrize("name", ["group_norm_silu", pytest.param("group_norm_silu_triton", marks=requires_triton)])
def test_opcheck_group_norm_silu(name):
    device = TRITON_DEVICE if name.endswith("triton") else "cpu"
    op = getattr(ops, name)
    x = rand((2, 8, 3, 4), device=device).to(memory_format=torch.channels_last)
    w, b, add = rand((8,), device=device, seed=3), rand((8,), device=device, seed=4), rand((2, 8), device=device, seed=5)
    torch.library.opcheck(op, (x, w, b, 4, 1e-5, True, add))
    if name == "group_norm_silu":
        torch.library.opcheck(op, (rand((3, 6, 5), device=device), None, None, 3, 1e-6, False, None))


@pytest.mark.parametrize("name", ["geglu", pytest.param("geglu_triton", marks=requires_triton)])
def test_opcheck_geglu(name):
    device = TRITON_DEVICE if name.endswith("triton") else "cpu"
    torch.library.opcheck(getattr(ops, name), (rand((2, 3, 2 * 8), device=device),))


def test_fake_kernels_give_layouts_and_shapes():
    x = torch.empty(2, 8, 4, 4, device="meta").to(memory_format=torch.channels_last)
    assert ops.group_norm_silu(x, None, None, 4, 1e-5, True, None).stride() == x.stride()
    assert ops.geglu(torch.empty(2, 5, 12, device="meta")).shape == (2, 5, 6)
