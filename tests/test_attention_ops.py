"""ddim_fast attention ops against the float64 oracle (tests/oracles.py): scaled_masked_softmax(_) (C++ CPU, CUDA), attention
(C++ CPU, Triton under the interpreter on CPU, Triton on CUDA), the Python front door, masks, strides,
errors, opcheck."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import oracles
from conftest import DTYPES, TOLERANCES, assert_fully_written, assert_rel_close, misaligned, poison, requires_cuda
from ddim_fast import attention as fa
from ddim_fast._library import interpreting
from oracles import relative_error
from ddim_fast.triton import attention as triton_attention
from ddim_fast.triton.attention import attention_triton

ops = torch.ops.ddim_fast

# Where the Triton kernel runs in this session: on CUDA tensors when there is a device (tests/conftest.py then
# leaves TRITON_INTERPRET unset, so Triton compiles for it), else on CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and not interpreting(),
    reason="no CUDA device and TRITON_INTERPRET is not 1: Triton runs CPU tensors only under its interpreter")


def rand(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def key_padding_mask(batch_shape, lk, device="cpu", seed=1, fully_masked_first=True):
    """[*batch_shape, 1, Lk] bool, True = keep; the first batch item fully masked (uniform row)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(tuple(batch_shape) + (1, lk), generator=gen) > 0.3
    if fully_masked_first:
        mask.view(-1, lk)[0] = False
    return mask.to(device)


def check_flash_rule(out, q, k, v, scale, mask, dtype):
    """Table tolerance (for a reduction over the Lk keys: tests/conftest.py's `tolerance`), and (fp16/bf16)
    flash-attention's rule: error <= 2x a same-precision PyTorch one."""
    ref = oracles.attention(q, k, v, scale, mask)
    assert_rel_close(out, ref, dtype, reduction=k.shape[-2])
    if dtype != torch.float32:
        torch_err = relative_error(oracles.attention(q, k, v, scale, mask, dtype=dtype), ref)
        assert relative_error(out, ref) <= 2 * torch_err + 1e-4, "worse than 2x a same-precision PyTorch attention"


# ------------------------------------------------------------------------------------------------
# scaled_masked_softmax
# ------------------------------------------------------------------------------------------------


SOFTMAX_CASES = [
    # scores shape, mask shape (None = no mask), mask kind
    ((3, 5, 77), (3, 1, 77), "bool"),  # ldm: [(b h), 1, j]
    ((2, 3, 4, 113), (2, 1, 1, 113), "bool"),  # key padding, 4-D
    ((2, 3, 4, 1), None, None),
    ((2, 3, 7, 33), (2, 3, 7, 33), "float"),  # full additive mask
    ((6, 1300), (1, 1300), "float"),  # block-per-row length on CUDA
    ((4, 0), None, None),
    ((0, 3, 9), (1, 1, 9), "bool"),
]


def make_mask(shape, kind, dtype, device="cpu"):
    if shape is None:
        return None
    gen = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.4
        if mask.numel():
            mask.view(-1, shape[-1])[0] = False  # a fully masked row -> uniform, not NaN
        return mask.to(device)
    return (torch.randn(shape, generator=gen) * 2).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mask_shape,kind", SOFTMAX_CASES)
def test_scaled_masked_softmax_cpu(shape, mask_shape, kind, dtype):
    scores = rand(shape, dtype) * 4
    mask = make_mask(mask_shape, kind, dtype)
    out = ops.scaled_masked_softmax(scores, mask, 0.37)
    ref = oracles.scaled_masked_softmax(scores, mask, 0.37)
    assert out.dtype == dtype and out.shape == scores.shape
    assert_fully_written(out)
    assert_rel_close(out, ref, dtype)
    if kind == "bool" and scores.numel():
        first = out.reshape(-1, shape[-1])[0].double()
        assert torch.allclose(first, torch.full_like(first, 1.0 / shape[-1]), rtol=1e-2), "fully masked row not uniform"


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_masked_softmax_inplace_strided_misaligned(dtype):
    base = rand((2, 77, 3, 20), dtype)
    scores = base.transpose(1, 3)  # [2, 20, 3, 77], last dim strided
    mask = key_padding_mask((2, 1), 77).reshape(2, 1, 1, 77)
    ref = oracles.scaled_masked_softmax(scores, mask, 0.5)
    out = ops.scaled_masked_softmax(scores, mask, 0.5)
    assert_rel_close(out, ref, dtype)
    returned = fa.scaled_masked_softmax(scores, mask, 0.5, inplace=True)
    assert returned is scores
    assert_rel_close(scores, ref, dtype, "in-place")
    shifted = misaligned(rand((5, 9, 40), dtype))
    assert_rel_close(ops.scaled_masked_softmax(shifted, None, 1.0), oracles.scaled_masked_softmax(shifted, None, 1.0),
                     dtype, "misaligned")


def test_scaled_masked_softmax_minus_inf_additive_mask():
    scores = rand((2, 4, 70), torch.float32)
    mask = torch.zeros(2, 1, 70)
    mask[..., :40] = float("-inf")
    out = fa.scaled_masked_softmax(scores, mask, 1.0)
    assert_rel_close(out, oracles.scaled_masked_softmax(scores, mask, 1.0), torch.float32)
    assert (out[..., :40] == 0).all()


def test_scaled_masked_softmax_wrapper_and_errors():
    scores = rand((2, 3, 5, 8), torch.float32)
    out = fa.scaled_masked_softmax(scores, torch.zeros(2, 1, 1, 8, dtype=torch.float64), 2.0)  # float mask cast
    assert_rel_close(out, oracles.scaled_masked_softmax(scores, None, 2.0), torch.float32)
    ref_backend = fa.scaled_masked_softmax(scores, None, 2.0, backend="reference")
    assert_rel_close(ref_backend, oracles.scaled_masked_softmax(scores, None, 2.0), torch.float32)
    with pytest.raises(ValueError, match="dim 3 must be 8"):
        ops.scaled_masked_softmax(scores, torch.ones(2, 1, 1, 7, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="dim 1 must be 3 or 1"):
        ops.scaled_masked_softmax(scores, torch.ones(2, 2, 1, 8, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="must have 4 dims"):
        ops.scaled_masked_softmax(scores, torch.ones(1, 8, dtype=torch.bool), 1.0)  # no implicit broadcasting
    with pytest.raises(TypeError, match="mask must be bool"):
        ops.scaled_masked_softmax(scores, torch.ones(2, 1, 1, 8, dtype=torch.float16), 1.0)
    with pytest.raises(ValueError, match="2 to 4 dims"):
        ops.scaled_masked_softmax(rand((1, 2, 3, 4, 5), torch.float32), None, 1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fa.scaled_masked_softmax(scores.double(), None, 1.0)
    with pytest.raises(ValueError, match="internal overlap"):
        ops.scaled_masked_softmax_(torch.zeros(4, 1).expand(4, 6), None, 1.0)


# ------------------------------------------------------------------------------------------------
# attention: C++ CPU kernel
# ------------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # batch dims, Lq, Lk, d
    ((2, 8), 64, 77, 40),
    ((3,), 33, 1, 64),  # ldm 3-D layout, one key
    ((1, 2), 17, 113, 80),
    ((2, 1), 5, 200, 160),
    ((1, 1), 1, 77, 40),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,lq,lk,d", ATTENTION_CASES)
def test_attention_cpu(batch, lq, lk, d, dtype):
    q, k, v = rand(batch + (lq, d), dtype, seed=1), rand(batch + (lk, d), dtype, seed=2), rand(batch + (lk, d), dtype, seed=3)
    mask = key_padding_mask(batch[:1] + (1,) * (len(batch) - 1), lk).reshape(batch[:1] + (1,) * (len(batch) - 1) + (1, lk))
    scale = d ** -0.5
    for m in (None, mask):
        out = ops.attention(q, k, v, scale, m)
        assert_fully_written(out)
        check_flash_rule(out, q, k, v, scale, m, dtype)


def test_attention_cpu_sd_sizes():
    # SD1.5 top level, cross-attention with CFG batch, fp16 storage; and one long self-attention row set.
    q, k, v = rand((2, 8, 4096, 40), torch.float16, seed=1), rand((2, 8, 77, 40), torch.float16, seed=2), \
        rand((2, 8, 77, 40), torch.float16, seed=3)
    check_flash_rule(ops.attention(q, k, v, 40 ** -0.5, None), q, k, v, 40 ** -0.5, None, torch.float16)
    q, k, v = rand((1, 1, 256, 40), torch.float32, seed=4), rand((1, 1, 4096, 40), torch.float32, seed=5), \
        rand((1, 1, 4096, 40), torch.float32, seed=6)
    check_flash_rule(ops.attention(q, k, v, 40 ** -0.5, None), q, k, v, 40 ** -0.5, None, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_cpu_strided_views_and_masks(dtype):
    # diffusers' layout: [b, n, h*d] -> view [b, n, h, d] -> transpose: strided q/k/v, no copies.
    b, h, lq, lk, d = 2, 3, 19, 77, 40
    q = rand((b, lq, h * d), dtype, seed=1).view(b, lq, h, d).transpose(1, 2)
    k = rand((b, lk, h * d), dtype, seed=2).view(b, lk, h, d).transpose(1, 2)
    v = misaligned(rand((b, h, lk, d), dtype, seed=3))
    full_float = (torch.randn(b, h, lq, lk) * 3).to(dtype)
    head_bool = torch.rand(1, h, 1, lk) > 0.5
    for mask in (None, full_float, head_bool, key_padding_mask((b, 1), lk)):
        out = ops.attention(q, k, v, 0.2, mask)
        assert out.is_contiguous() and out.shape == q.shape
        assert_rel_close(out, oracles.attention(q, k, v, 0.2, mask), dtype)


def test_attention_cpu_empty_and_errors():
    q = rand((2, 3, 0, 40), torch.float32)
    assert ops.attention(q, rand((2, 3, 5, 40), torch.float32), rand((2, 3, 5, 40), torch.float32), 1.0, None).shape == q.shape
    q = rand((2, 4, 40), torch.float32)
    out = ops.attention(q, rand((2, 0, 40), torch.float32), rand((2, 0, 40), torch.float32), 1.0, None)
    assert out.shape == q.shape and (out == 0).all()  # softmax over no keys times an empty v
    k = rand((2, 6, 40), torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        ops.attention(q, rand((2, 6, 32), torch.float32), k, 1.0, None)
    with pytest.raises(ValueError, match="leading"):
        ops.attention(q, rand((1, 6, 40), torch.float32), rand((1, 6, 40), torch.float32), 1.0, None)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.attention(q, k.half(), k, 1.0, None)
    with pytest.raises(ValueError, match="dim 1 must be 4 or 1"):
        ops.attention(q, k, k, 1.0, torch.ones(2, 3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 dims"):
        ops.attention(q, k, k, 1.0, torch.ones(2, 6, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# attention: Triton (TRITON_DEVICE: compiled on CUDA, interpreter on CPU without one)
# ------------------------------------------------------------------------------------------------

TRITON_CASES = [
    # batch dims, Lq, Lk, d, dtype
    ((2, 1), 33, 77, 40, torch.float16),
    ((2,), 20, 1, 64, torch.float32),  # 3-D layout, one key
    ((1, 2), 17, 113, 80, torch.bfloat16),
    ((1, 1), 9, 150, 160, torch.float32),  # online-softmax loop (3 key tiles)
    ((1, 1), 70, 130, 64, torch.float16),  # loop, two query blocks
    ((2, 1), 5, 77, 17, torch.float32),  # odd head dim: padded columns, no 16-byte vectors (17 * 4 B rows)
]


@requires_triton
@pytest.mark.parametrize("batch,lq,lk,d,dtype", TRITON_CASES)
def test_attention_triton(batch, lq, lk, d, dtype):
    dev = TRITON_DEVICE
    q, k, v = rand(batch + (lq, d), dtype, dev, seed=1), rand(batch + (lk, d), dtype, dev, seed=2), \
        rand(batch + (lk, d), dtype, dev, seed=3)
    mask = key_padding_mask(batch[:1] + (1,) * (len(batch) - 1), lk, dev).reshape(
        batch[:1] + (1,) * (len(batch) - 1) + (1, lk))
    scale = d ** -0.5
    for m in (None, mask):
        out = attention_triton(q, k, v, scale, m)
        assert out.device.type == dev
        assert_fully_written(out)
        check_flash_rule(out, q, k, v, scale, m, dtype)


@requires_triton
def test_attention_triton_strided_float_mask_and_minus_inf():
    dev = TRITON_DEVICE
    b, h, lq, lk, d = 1, 2, 16, 140, 40
    q = rand((b, lq, h * d), torch.float32, dev, seed=1).view(b, lq, h, d).transpose(1, 2)
    k = rand((b, lk, h * d), torch.float32, dev, seed=2).view(b, lk, h, d).transpose(1, 2)
    v = misaligned(rand((b, h, lk, d), torch.float32, dev, seed=3))
    mask = torch.randn(b, h, lq, lk).to(dev)
    mask[..., :64] = float("-inf")  # a whole first key tile of -inf: the online softmax must not NaN
    out = attention_triton(q, k, v, 0.3, mask)
    assert_rel_close(out, oracles.attention(q, k, v, 0.3, mask), torch.float32)


@requires_triton
def test_attention_triton_sd_size():
    # SD1.5's top-level cross-attention (Lq 4096, Lk 77, d 40), one head: the interpreter is slow.
    dev = TRITON_DEVICE
    q, k, v = rand((1, 1, 4096, 40), torch.float16, dev, seed=1), rand((1, 1, 77, 40), torch.float16, dev, seed=2), \
        rand((1, 1, 77, 40), torch.float16, dev, seed=3)
    out = attention_triton(q, k, v, 40 ** -0.5, None)
    check_flash_rule(out, q, k, v, 40 ** -0.5, None, torch.float16)


def _layouts(dtype, device, d=40, lq=19, lk=77, b=2, h=3):
    """(name, q, k, v, expected ALIGN): the layouts the 16-byte path is for, and the ones it must refuse."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()

    def contiguous(n, seed):
        return rand((b, h, n, d), dtype, device, seed=seed)

    def diffusers(n, seed):  # [b, n, h*d] viewed [b, h, n, d]
        return rand((b, n, h * d), dtype, device, seed=seed).view(b, n, h, d).transpose(1, 2)

    def ldm(n, seed):  # 3-D [b*h, n, d]
        return rand((b * h, n, d), dtype, device, seed=seed)

    def wide_rows(n, seed):  # rows of d + 1 elements: no row stride is a multiple of the vector
        return rand((b, h, n, d + 1), dtype, device, seed=seed)[..., :d]

    def head_dim_strided(n, seed):  # head dim not unit-stride
        return rand((b, h, d, n), dtype, device, seed=seed).transpose(-1, -2)

    return [
        ("contiguous", contiguous(lq, 1), contiguous(lk, 2), contiguous(lk, 3), vec),
        ("diffusers", diffusers(lq, 1), diffusers(lk, 2), diffusers(lk, 3), vec),
        ("ldm 3-D", ldm(lq, 1), ldm(lk, 2), ldm(lk, 3), vec),
        ("misaligned q", misaligned(contiguous(lq, 1)), contiguous(lk, 2), contiguous(lk, 3), 1),
        ("wide rows", contiguous(lq, 1), wide_rows(lk, 2), contiguous(lk, 3), 1),
        ("strided head dim", contiguous(lq, 1), contiguous(lk, 2), head_dim_strided(lk, 3), 1),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_align_decision(dtype):
    # The host check behind the kernel's 16-byte accesses: SD's layouts get ALIGN = elements per 16 bytes,
    # a misaligned base, an odd row stride or a strided head dim get 1. Size-1 dims never count.
    for name, q, k, v, expected in _layouts(dtype, "cpu"):
        out = torch.empty(q.shape, dtype=dtype)
        assert triton_attention._vector_align([q, k, v, out]) == expected, name
    one_query = torch.empty(2, 3, 40, 1, dtype=dtype).transpose(-1, -2)  # [2, 3, 1, 40] with stride 1 on Lq
    assert triton_attention._vector_align([one_query] * 4) == 16 // one_query.element_size()
    # Rows of 20 elements: 80 B in fp32 (a multiple of 16 B), 40 B in fp16/bf16 (not one).
    rows20 = torch.empty(2, 3, 5, 20, dtype=dtype)
    assert triton_attention._vector_align([rows20] * 4) == (4 if dtype == torch.float32 else 1)


@requires_triton
def test_alignment_flag_is_load_bearing():
    # The kernel rebuilds its strides as (s // ALIGN) * ALIGN, so a wrong ALIGN reads wrong elements (here
    # the rows of a [.., 41]-wide buffer as if 40 apart): the host check above is what keeps results right.
    q = rand((1, 1, 8, 40), torch.float32, TRITON_DEVICE, seed=1)
    k = rand((1, 1, 16, 41), torch.float32, TRITON_DEVICE, seed=2)[..., :40]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cfg = triton_attention.launch_config(1, 8, 16, 40, q.dtype, q.device)
    grid, args, kwargs = triton_attention.kernel_arguments(q, k, k, out, None, 0.3, cfg)
    assert kwargs["ALIGN"] == 1
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        triton_attention._attention_kernel[grid](*args, **dict(kwargs, ALIGN=4))
    assert relative_error(out, oracles.attention(q, k, k, 0.3)) > 1e-2


def test_mask_row_broadcast_flag():
    # Key-padding masks (one row for every query: ldm's [B*H, 1, Lk], diffusers' [B, H, 1, Lk], and a
    # [B, H, Lq, Lk] mask expanded from one) take the kernel's row-broadcast load; full masks do not.
    q, k = torch.empty(2, 3, 19, 40), torch.empty(2, 3, 77, 40)
    cfg = triton_attention.launch_config(6, 19, 77, 40, q.dtype, q.device)

    def flag(q, k, mask):
        return triton_attention.kernel_arguments(q, k, k, torch.empty(q.shape), mask, 1.0, cfg)[2]["MASK_ROW_BCAST"]

    assert flag(q, k, None) is False
    assert flag(q, k, torch.ones(2, 1, 1, 77, dtype=torch.bool))
    assert flag(q, k, torch.ones(1, 3, 1, 77).expand(2, 3, 19, 77))
    assert flag(q.flatten(0, 1), k.flatten(0, 1), torch.ones(6, 1, 77, dtype=torch.bool))
    assert not flag(q, k, torch.ones(2, 3, 19, 77))
    assert not flag(q.flatten(0, 1), k.flatten(0, 1), torch.ones(6, 19, 77, dtype=torch.bool))


@pytest.mark.parametrize("major", [8, 9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_launch_config_gives_every_warp_its_own_work(monkeypatch, major, dtype):
    # The tile rules of launch_config for every SD shape and mask on sm_80- and sm_90-like devices (the
    # compiled ex2 counts are checked by scripts/triton_aot_check.py): on sm_90 a tile of 64+ rows has 16 rows
    # per warp; where the warps sit on the keys (sm_80 at BLOCK_M < BLOCK_D, and 32-row tiles) each gets 8+
    # keys and head columns; shrinking halves warps with rows and stops at 4 warps.
    cuda = torch.device("cuda", 0)
    for sms in (108, 132):
        monkeypatch.setattr(triton_attention, "_device_traits", lambda index, sms=sms: (sms, major))
        for d, lq, self_attn, bh, masked in itertools.product((40, 64, 80, 160), (4096, 1024, 256, 64),
                                                             (False, True), (16, 64), (False, True)):
            lk = lq if self_attn else 77
            cfg = triton_attention.launch_config(bh, lq, lk, d, dtype, cuda, masked=masked)
            bm, bn, bd, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["num_warps"]
            what = f"sm_{major}x d{d} {lq}x{lk} bh{bh} masked={masked}: {cfg}"
            assert bd >= d and bn >= 16, what
            if dtype == torch.float32:
                assert not cfg["SINGLE_TILE"] and (bm, warps) == (16, 4), what
                continue
            assert cfg["SINGLE_TILE"] == (lk <= 128), what
            on_rows = bm >= 64 if major >= 9 else bm >= bd
            if on_rows:
                assert bm == 16 * warps, what
            else:
                assert bn >= 8 * warps and bd >= 8 * warps, what
            assert warps >= 4, what


LAYOUTS = ("contiguous", "diffusers", "ldm 3-D", "misaligned q", "wide rows", "strided head dim")  # _layouts'


@requires_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_triton_layouts(dtype, layout):
    # Every layout of _layouts through the op, aligned (16-byte path) or not: the single tile with no mask
    # and with a key-padding mask (one mask row for all queries), the key loop with a full additive mask.
    # One test per layout: each compiles its own specializations (1-3 s apiece on a GPU), so they spread
    # over the device check's workers instead of one 19 s test.
    assert [case[0] for case in _layouts(dtype, "cpu")] == list(LAYOUTS)
    for lk, masks in ((77, ("none", "padding")), (130, ("full",))):
        for name, q, k, v, _expected in _layouts(dtype, TRITON_DEVICE, lq=9, lk=lk, b=1, h=2):
            if name != layout:
                continue
            for kind in masks:
                mask = {"none": None,
                        "full": (torch.randn(q.shape[:-1] + (lk,)) * 2).to(dtype).to(TRITON_DEVICE),
                        "padding": key_padding_mask(q.shape[:1] + (1,) * (q.dim() - 3), lk, TRITON_DEVICE).reshape(
                            q.shape[:1] + (1,) * (q.dim() - 3) + (1, lk))}[kind]
                out = attention_triton(q, k, v, 0.2, mask)
                assert_rel_close(out, oracles.attention(q, k, v, 0.2, mask), dtype, f"{name} Lk {lk} mask {kind}")


def test_fused_attention_front_door():
    q, k, v = rand((2, 2, 9, 40), torch.float32, seed=1), rand((2, 2, 77, 40), torch.float32, seed=2), \
        rand((2, 2, 77, 40), torch.float32, seed=3)
    ref = oracles.attention(q, k, v, 40 ** -0.5)
    for backend in ("auto", "native", "reference"):
        assert_rel_close(fa.fused_attention(q, k, v, backend=backend), ref, torch.float32, backend)
    if TRITON_DEVICE != "cpu" or interpreting():
        dev = [t.to(TRITON_DEVICE) for t in (q, k, v)]
        assert_rel_close(fa.fused_attention(*dev, backend="triton"), ref, torch.float32, "triton")
        assert_rel_close(fa.fused_attention(*dev, backend="auto"), ref, torch.float32, f"auto on {TRITON_DEVICE}")
    float64_mask = torch.zeros(2, 1, 1, 77, dtype=torch.float64)
    assert_rel_close(fa.fused_attention(q, k, v, mask=float64_mask), ref, torch.float32, "cast float mask")
    with pytest.raises(ValueError, match="backend must be one of"):
        fa.fused_attention(q, k, v, backend="cudnn")
    with pytest.raises(TypeError, match="scale must be"):
        fa.fused_attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="q must be"):
        fa.fused_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(TypeError, match="mask must be bool"):
        fa.fused_attention(q, k, v, mask=torch.ones(2, 1, 1, 77, dtype=torch.int64))
    with pytest.raises(ValueError, match="dim 3 must be 77"):  # the mask check runs before any device rule
        attention_triton(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), 1.0,
                         torch.ones(2, 1, 1, 76, dtype=torch.bool, device=TRITON_DEVICE))


NON_FINITE_SCALES = [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf"), (1e39, r"1e\+39")]


@pytest.mark.parametrize("scale, shown", NON_FINITE_SCALES)
def test_non_finite_scale_rejected_everywhere(scale, shown):
    """softmax(q k^T * nan) is NaN everywhere: every door refuses a scale that is not finite in float32 (1e39 is
    finite as a double, inf once the kernels take float(scale)), naming the op and the value; the output is not
    written (scaled_masked_softmax_ leaves the scores as they were)."""
    q, k, v = rand((1, 2, 5, 8), torch.float32, seed=1), rand((1, 2, 7, 8), torch.float32, seed=2), \
        rand((1, 2, 7, 8), torch.float32, seed=3)
    scores = rand((1, 2, 5, 7), torch.float32, seed=4)
    kept = scores.clone()
    message = rf"scale must be finite \(in float32's range\), got {shown}"
    calls = {
        "fused_attention": lambda: fa.fused_attention(q, k, v, scale=scale),
        "fused_attention(reference)": lambda: fa.fused_attention(q, k, v, scale=scale, backend="reference"),
        "attention (C++ CPU)": lambda: ops.attention(q, k, v, scale, None),
        "attention (fake)": lambda: ops.attention(q.to("meta"), k.to("meta"), v.to("meta"), scale, None),
        "scaled_masked_softmax": lambda: fa.scaled_masked_softmax(scores, None, scale),
        "scaled_masked_softmax (C++ CPU)": lambda: ops.scaled_masked_softmax(scores, None, scale),
        "scaled_masked_softmax_ (C++ CPU)": lambda: ops.scaled_masked_softmax_(scores, None, scale),
        "scaled_masked_softmax (fake)": lambda: ops.scaled_masked_softmax(scores.to("meta"), None, scale),
        "scaled_masked_softmax_ (fake)": lambda: ops.scaled_masked_softmax_(scores.to("meta"), None, scale),
    }
    if TRITON_DEVICE != "cpu" or interpreting():
        dev = [t.to(TRITON_DEVICE) for t in (q, k, v)]
        calls["attention_triton"] = lambda: attention_triton(*dev, scale, None)
        calls["fused_attention(triton)"] = lambda: fa.fused_attention(*dev, scale=scale, backend="triton")
    if torch.cuda.is_available():
        cuda = [t.cuda() for t in (q, k, v)]
        calls["attention (CUDA)"] = lambda: ops.attention(*cuda, scale, None)
        if fa.has_native_kernel("cuda", "scaled_masked_softmax"):
            calls["scaled_masked_softmax (CUDA)"] = lambda: ops.scaled_masked_softmax(scores.cuda(), None, scale)
    for name, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(f"{name}: accepted scale {scale}")
    assert torch.equal(scores, kept), "scaled_masked_softmax_ wrote the scores before refusing the scale"
    # The rule's boundary: the largest finite float32 is accepted (by Python and C++ alike); zero and negative
    # scales are ordinary finite logits.
    fa.fused_attention(q, k, v, scale=3.4028234663852886e38)
    ops.scaled_masked_softmax(scores, None, -3.4028234663852886e38)
    for ok in (-0.5, 0):
        assert torch.isfinite(ops.attention(q, k, v, ok, None)).all(), ok
    with pytest.raises(TypeError, match="scale must be a float"):
        fa.scaled_masked_softmax(scores, None, True)


# ------------------------------------------------------------------------------------------------
# opcheck: every op on every device here
# ------------------------------------------------------------------------------------------------


def _opcheck_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _opcheck_devices())
def test_opcheck(device):
    scores = rand((2, 3, 4, 77), torch.float32, device)
    mask = key_padding_mask((2, 1), 77, device).reshape(2, 1, 1, 77)
    # CUDA softmax kernels exist only in an extension built with CUDA (a CPU-only build has none).
    if fa.has_native_kernel(device, "scaled_masked_softmax"):
        torch.library.opcheck(ops.scaled_masked_softmax.default, (scores, mask, 0.5))
        torch.library.opcheck(ops.scaled_masked_softmax_.default, (scores.clone(), None, 0.5))
    q, k, v = rand((1, 2, 5, 40), torch.float32, device), rand((1, 2, 7, 40), torch.float32, device), \
        rand((1, 2, 7, 40), torch.float32, device)
    torch.library.opcheck(ops.attention.default, (q, k, v, 0.3, mask[:1, :, :, :7]))  # CUDA: the Triton kernel
    # The Triton op runs CPU tensors only under the interpreter (a CUDA machine compiles for its device).
    if device == "cuda" or interpreting():
        torch.library.opcheck(ops.attention_triton.default, (q, k, v, 0.3, None))


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mask_shape,kind", SOFTMAX_CASES + [((2, 8, 64, 4096), (2, 1, 1, 4096), "bool")])
def test_scaled_masked_softmax_cuda(shape, mask_shape, kind, dtype):
    if not fa.has_native_kernel("cuda", "scaled_masked_softmax"):
        pytest.skip("the extension was built without CUDA kernels")
    scores = rand(shape, dtype, "cuda") * 4
    mask = make_mask(mask_shape, kind, dtype, "cuda")
    out = ops.scaled_masked_softmax(scores, mask, 0.37)
    assert_fully_written(out)
    assert_rel_close(out, oracles.scaled_masked_softmax(scores, mask, 0.37), dtype)
    inplace = scores.clone()
    assert ops.scaled_masked_softmax_(inplace, mask, 0.37) is None
    assert torch.equal(inplace, out)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,lq,lk,d", ATTENTION_CASES + [((2, 8), 4096, 77, 40), ((1, 2), 1024, 1024, 80),
                                                          ((2, 8), 64, 64, 160), ((2, 5), 300, 4096, 64)])
def test_attention_cuda(batch, lq, lk, d, dtype):
    q, k, v = (rand(batch + (n, d), dtype, "cuda", seed=s) for n, s in ((lq, 1), (lk, 2), (lk, 3)))
    mask = key_padding_mask(batch[:1] + (1,) * (len(batch) - 1), lk, "cuda").reshape(
        batch[:1] + (1,) * (len(batch) - 1) + (1, lk))
    for m in (None, mask):
        for out in (ops.attention(q, k, v, d ** -0.5, m), attention_triton(q, k, v, d ** -0.5, m)):
            assert_fully_written(out)
            check_flash_rule(out, q, k, v, d ** -0.5, m, dtype)
