"""The GEMM-based C++ CPU attention kernel (csrc/cpu/attention_cpu.cpp) at the edges its fast paths add:
vector tails of the key and head dims, query blocks and per-head chunks, fp32 operands read in place vs.
copied, the fp16/bf16 <-> fp32 vector conversions (bit-exact with torch's casts), mask rows read in place
vs. gathered, thread counts, and fp32 precision at 4096 keys. Broader op coverage is in
tests/test_attention_ops.py."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, assert_fully_written, assert_rel_close, misaligned
import oracles
from ddim_fast import attention as fa  # noqa: F401  (registers the fake kernels; loads the extension)
from oracles import relative_error

ops = torch.ops.ddim_fast


def rand(shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def qkv(batch, lq, lk, d, dtype, seed=1):
    return rand(batch + (lq, d), dtype, seed), rand(batch + (lk, d), dtype, seed + 1), rand(batch + (lk, d), dtype, seed + 2)


def check(out, q, k, v, scale, mask, dtype):
    ref = oracles.attention(q, k, v, scale, mask)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert_rel_close(out, ref, dtype)
    if dtype != torch.float32:  # flash-attention's rule: within 2x of a same-precision PyTorch attention
        torch_err = relative_error(oracles.attention(q, k, v, scale, mask, dtype=dtype), ref)
        assert relative_error(out, ref) <= 2 * torch_err + 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lk,d", [(1, 1), (15, 3), (16, 16), (17, 40), (33, 17), (77, 80)])
def test_vector_tails(lk, d, dtype):
    # Key counts and head dims around the 16-lane vector width: full vectors, tails, tail only.
    q, k, v = qkv((2, 3), 21, lk, d, dtype)
    bool_mask = torch.rand(2, 1, 1, lk, generator=torch.Generator().manual_seed(5)) > 0.3
    for mask in (None, bool_mask, rand((1, 3, 21, lk), dtype, seed=7)):
        out = ops.attention(q, k, v, d ** -0.5, mask)
        assert_fully_written(out)
        check(out, q, k, v, d ** -0.5, mask, dtype)


@pytest.mark.parametrize("lq,lk", [(600, 77), (100, 1024), (70, 2100)])
def test_query_blocks_and_chunks(lq, lk):
    # Lq not a multiple of the query block (256 rows at 77 keys, 32 at 1024, 16 at 2100), one head and
    # several heads (the chunk split across threads differs).
    for batch in ((1, 1), (3,)):
        q, k, v = qkv(batch, lq, lk, 24, torch.float32)
        check(ops.attention(q, k, v, 0.2, None), q, k, v, 0.2, None, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_operand_layouts(dtype):
    # fp32 q/k/v are read in place when their rows are unit-stride and at least D apart, copied otherwise:
    # transposed (last-dim stride != 1), keys expanded from one row (row stride 0), misaligned, and
    # diffusers' [b, n, h*d] head views.
    b, h, lq, lk, d = 2, 3, 37, 50, 24
    q = rand((b, h, d, lq), dtype, 1).transpose(-1, -2)
    k = rand((b, h, 1, d), dtype, 2).expand(b, h, lk, d)
    v = misaligned(rand((b, h, lk, d), dtype, 3))
    check(ops.attention(q, k, v, 0.3, None), q, k, v, 0.3, None, dtype)
    q = rand((b, lq, h * d), dtype, 4).view(b, lq, h, d).transpose(1, 2)
    k = rand((b, lk, h * d), dtype, 5).view(b, lk, h, d).transpose(1, 2)
    v = rand((b, h, lk, d + 5), dtype, 6)[..., 5:]
    check(ops.attention(q, k, v, 0.3, None), q, k, v, 0.3, None, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_rows_in_place_and_gathered(dtype):
    # Bool and fp32 mask rows with unit stride are read in place; strided rows, fp16/bf16 additive rows
    # and broadcast rows (converted once per head) go through a buffer. A fully masked bool row is uniform;
    # an additive row of -inf is NaN (as in PyTorch).
    b, h, lq, lk, d = 2, 2, 19, 45, 16
    q, k, v = qkv((b, h), lq, lk, d, dtype)
    gen = torch.Generator().manual_seed(9)
    strided_bool = (torch.rand(b, h, lk, lq, generator=gen) > 0.4).transpose(-1, -2)
    strided_bool[0, 0, 3] = False
    strided_add = rand((b, 1, lk, lq), dtype, 10, scale=2.0).transpose(-1, -2)
    key_padding = torch.rand(b, 1, 1, lk, generator=gen) > 0.5
    key_padding[1] = False  # every row of batch 1 fully masked
    for mask in (strided_bool, strided_add, key_padding, strided_bool.contiguous(), strided_add.contiguous()):
        out = ops.attention(q, k, v, 0.25, mask)
        check(out, q, k, v, 0.25, mask, dtype)
    uniform = ops.attention(q, k, v, 0.25, key_padding)[1]
    assert torch.allclose(uniform.float(), v[1].float().mean(dim=-2, keepdim=True).expand_as(uniform), atol=1e-2)
    minus_inf = torch.zeros(b, h, lq, lk, dtype=dtype)
    minus_inf[0, 1, 4] = float("-inf")
    out = ops.attention(q, k, v, 0.25, minus_inf)
    assert torch.isnan(out[0, 1, 4]).all() and not torch.isnan(out[0, 1, :4]).any()
    assert_rel_close(out, oracles.attention(q, k, v, 0.25, minus_inf), dtype)  # NaN only where the reference has it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_conversions_bit_exact(dtype):
    # The kernel upcasts fp16/bf16 inputs exactly and rounds the fp32 result once (nearest even), so it
    # equals the fp32 kernel on the upcast inputs followed by torch's cast, bit for bit: normal values,
    # subnormal inputs and outputs, overflow to inf, and NaN.
    q, k, v = qkv((2, 2), 40, 77, 40, dtype)
    specials = [1.0, 1e-6, 3e-39] + ([7e4] if dtype == torch.float16 else [])
    for factor in specials:
        vs = (v.float() * factor).to(dtype)
        qs = (q.float() * factor).to(dtype)
        for qq in (q, qs):
            out = ops.attention(qq, k, vs, 0.15, None)
            expected = ops.attention(qq.float(), k.float(), vs.float(), 0.15, None).to(dtype)
            assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), f"factor {factor}"
    v_nan = v.clone()
    v_nan[0, 1, 5, 7] = float("nan")
    out = ops.attention(q, k, v_nan, 0.15, None)
    assert torch.isnan(out[0, 1, :, 7]).all() and not torch.isnan(out[0, 0]).any()


def test_thread_counts_agree():
    # The per-head chunks (and so the GEMM block boundaries) depend on the thread count; the result
    # must not (beyond fp32 rounding). Also exercises MKL pinned to one thread inside the parallel region.
    q, k, v = qkv((2, 4), 300, 77, 40, torch.float32)
    mask = torch.rand(2, 1, 1, 77, generator=torch.Generator().manual_seed(3)) > 0.2
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.attention(q, k, v, 40 ** -0.5, mask))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert_rel_close(out, outs[0], 1e-6, "thread count")
    check(outs[0], q, k, v, 40 ** -0.5, mask, torch.float32)


def test_fp32_precision_4096_keys():
    # fp32 within 1e-6 of the fp64 reference at 4096 keys, with a key-padding mask and an additive one.
    q, k, v = qkv((1, 2), 48, 4096, 64, torch.float32)
    key_padding = torch.rand(1, 1, 1, 4096, generator=torch.Generator().manual_seed(4)) > 0.5
    for mask in (None, key_padding, rand((1, 2, 1, 4096), torch.float32, 8, scale=3.0)):
        check(ops.attention(q, k, v, 64 ** -0.5, mask), q, k, v, 64 ** -0.5, mask, torch.float32)


def test_sd_cross_attention_size():
    # One real SD1.5 size per storage dtype: 8 heads, CFG batch, Lq 1024, 77 text tokens, d 80.
    for dtype in DTYPES:
        q, k, v = qkv((2, 8), 1024, 77, 80, dtype)
        check(ops.attention(q, k, v, 80 ** -0.5, None), q, k, v, 80 ** -0.5, None, dtype)
