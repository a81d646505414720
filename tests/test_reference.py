"""The reference backend (ddim_fast/reference.py) and the tests' float64 oracles (tests/oracles.py), each held to
what does not come from the other: the step against hand-written closed forms (both), the other oracles against
hand-computed values and PyTorch's own float64 functionals, the reference backend's attention, softmax, GroupNorm
and GEGLU against the oracles; Philox4x32-10 against the published Random123 known-answer vectors, the normal
mapping of csrc/include/ddim_fast/philox.h, and the C++ Philox (seen through the op) against the numpy one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oracles
from conftest import assert_rel_close
from ddim_fast import reference, schedule

# The two step implementations the closed forms hold: the product's PyTorch backend and the tests' oracle.
STEP_IMPLEMENTATIONS = {"reference backend": reference.ddim_step, "test oracle": oracles.ddim_step}
step_implementations = pytest.mark.parametrize("ddim_step", list(STEP_IMPLEMENTATIONS.values()),
                                               ids=list(STEP_IMPLEMENTATIONS))

# --------------------------------------------------------------------------------------------------
# ddim_step closed forms on a tiny case (plain Python floats, no tensors in the expected values)
# --------------------------------------------------------------------------------------------------

A_T, A_PREV, SIGMA = 0.64, 0.81, 0.2
SA, S1A, SAP = math.sqrt(A_T), math.sqrt(1 - A_T), math.sqrt(A_PREV)  # 0.8, 0.6, 0.9
DIR = math.sqrt(1 - A_PREV - SIGMA**2)


def _tiny_table() -> torch.Tensor:
    # Row 0 is a dummy so that the tests also check that `row` selects the row.
    return schedule.coefficient_table([999, 500], [0.01, A_T], [0.5, A_PREV], [0.0, SIGMA])


def _closed_form(x, m, prediction, noise=0.0, temperature=1.0, clip=None, reuse=False):
    if prediction == "epsilon":
        eps, x0 = m, (x - S1A * m) / SA
    elif prediction == "v_prediction":
        x0, eps = SA * x - S1A * m, SA * m + S1A * x
    else:
        x0, eps = m, (x - SA * m) / S1A
    if clip is not None:
        x0 = min(max(x0, -clip), clip)
        if reuse:
            eps = (x - SA * x0) / S1A
    return SAP * x0 + DIR * eps + SIGMA * temperature * noise, x0


# fp32 table entries: compare the fp64 step (which reads the fp32 table) to fp32-level precision.
CLOSE = dict(rtol=1e-6, atol=1e-6)


def test_oracle_reads_the_documented_table_columns():
    """The oracle's column numbers are written out (not imported); they must be the layout schedule builds."""
    assert (oracles.SQRT_ALPHA, oracles.SQRT_ONE_MINUS_ALPHA, oracles.SQRT_ALPHA_PREV, oracles.DIR_COEF,
            oracles.SIGMA) == (schedule.COL_SQRT_ALPHA, schedule.COL_SQRT_ONE_MINUS_ALPHA,
                               schedule.COL_SQRT_ALPHA_PREV, schedule.COL_DIR_COEF, schedule.COL_SIGMA)
    assert oracles.PREDICTION_TYPES == reference.PREDICTION_TYPES


@step_implementations
@pytest.mark.parametrize("prediction", oracles.PREDICTION_TYPES)
def test_ddim_step_closed_form(ddim_step, prediction):
    xs, ms, zs = [1.0, -2.0, 0.5], [0.5, 0.25, -1.5], [0.3, -1.1, 2.0]
    x = torch.tensor([xs], dtype=torch.float64)
    m = torch.tensor([ms], dtype=torch.float64)
    z = torch.tensor([zs], dtype=torch.float64)
    for row in (1, torch.tensor([1])):
        out, x0 = ddim_step(x, m, _tiny_table(), row, prediction_type=prediction, noise=z, temperature=0.5)
        expected = [_closed_form(a, b, prediction, c, 0.5) for a, b, c in zip(xs, ms, zs)]
        assert out.dtype == torch.float64 and out.shape == (1, 3)
        torch.testing.assert_close(out[0], torch.tensor([e[0] for e in expected], dtype=torch.float64), **CLOSE)
        torch.testing.assert_close(x0[0], torch.tensor([e[1] for e in expected], dtype=torch.float64), **CLOSE)


@step_implementations
def test_ddim_step_closed_form_eps_values(ddim_step):
    # One case computed by hand: x = 1, eps = 0.5 -> x0 = (1 - 0.6*0.5)/0.8 = 0.875,
    # x_prev = 0.9*0.875 + sqrt(0.15)*0.5 (no noise).
    out, x0 = ddim_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), _tiny_table(), 1)
    assert x0.item() == pytest.approx(0.875, abs=1e-6)
    assert out.item() == pytest.approx(0.9 * 0.875 + math.sqrt(0.15) * 0.5, abs=1e-6)


@step_implementations
@pytest.mark.parametrize("reuse", [False, True])
def test_ddim_step_guidance_and_clip(ddim_step, reuse):
    uncond, cond, xs, scale = [0.2, -3.0], [1.0, 4.0], [2.5, -0.1], 7.5
    m = torch.tensor([uncond, cond], dtype=torch.float64).reshape(2, 2)
    x = torch.tensor([xs], dtype=torch.float64)
    out, x0 = ddim_step(x, m, _tiny_table(), 1, guidance_scale=scale, clip_range=1.0, use_clipped_model_output=reuse)
    combined = [u + scale * (c - u) for u, c in zip(uncond, cond)]
    expected = [_closed_form(a, b, "epsilon", clip=1.0, reuse=reuse) for a, b in zip(xs, combined)]
    torch.testing.assert_close(out[0], torch.tensor([e[0] for e in expected], dtype=torch.float64), **CLOSE)
    torch.testing.assert_close(x0[0], torch.tensor([e[1] for e in expected], dtype=torch.float64), **CLOSE)
    assert x0.abs().max().item() <= 1.0


@step_implementations
def test_ddim_step_dynamic_threshold_closed_form(ddim_step):
    x = torch.tensor([[3.0, -1.0], [0.2, 0.1]], dtype=torch.float64)
    m = torch.tensor([[2.0, -0.5], [0.4, -3.0]], dtype=torch.float64)  # sample prediction: x0 = m
    s = torch.tensor([1.5, 2.0], dtype=torch.float32)
    out, x0 = ddim_step(x, m, _tiny_table(), 1, prediction_type="sample", x0_threshold=s)
    expected_x0 = [[1.5 / 1.5, -0.5 / 1.5], [0.4 / 2.0, -2.0 / 2.0]]
    torch.testing.assert_close(x0, torch.tensor(expected_x0, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # eps is NOT re-derived without use_clipped_model_output: it comes from the unclamped x0.
    eps = (x - SA * m) / S1A
    torch.testing.assert_close(out, SAP * x0 + DIR * eps, **CLOSE)


@step_implementations
def test_ddim_step_keeps_nan_through_the_clamp(ddim_step):
    x = torch.tensor([[float("nan"), 1.0]], dtype=torch.float64)
    out, x0 = ddim_step(x, torch.zeros(1, 2, dtype=torch.float64), _tiny_table(), 1, clip_range=1.0)
    assert math.isnan(x0[0, 0].item()) and math.isnan(out[0, 0].item()) and not math.isnan(out[0, 1].item())


def test_dynamic_threshold_scale():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.3, 2.0, 10.0]).reshape(3, 1, 1, 1)
    s = reference.dynamic_threshold(x0, ratio=0.9, max_value=4.0)
    flat = x0.reshape(3, -1).abs().numpy().astype(np.float64)
    expected = np.clip(np.quantile(flat, 0.9, axis=1), 1.0, 4.0)
    assert s.shape == (3,) and s.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-6)
    assert s[0].item() == 1.0 and s[2].item() == 4.0  # both clamps are hit


@step_implementations
def test_ddim_step_no_noise_ignores_sigma(ddim_step):
    x, m = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    out_none, _ = ddim_step(x, m, _tiny_table(), 1)
    out_zero, _ = ddim_step(x, m, _tiny_table(), 1, noise=torch.zeros(1, 1))
    assert out_none.item() == out_zero.item()


def test_unknown_prediction_types_are_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        reference.predict_x0_eps(torch.ones(1), torch.ones(1), 1.0, 0.0, "eps")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        oracles.ddim_step(torch.ones(1, 1), torch.ones(1, 1), _tiny_table(), 1, prediction_type="eps")


@pytest.mark.parametrize("relative_error", [reference.relative_error, oracles.relative_error],
                         ids=["reference backend", "test oracle"])
def test_relative_error(relative_error):
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])) == pytest.approx(0.1)
    assert relative_error(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])) == 1.0  # ref 0: absolute
    assert relative_error(torch.empty(0), torch.empty(0)) == 0.0


# --------------------------------------------------------------------------------------------------
# The other oracles against hand-computed values and PyTorch's own float64 functionals; the reference
# backend's functions against the oracles
# --------------------------------------------------------------------------------------------------


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_softmax_oracle_by_hand():
    scores = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    torch.testing.assert_close(oracles.scaled_masked_softmax(scores, None, 1.0),
                               torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    keep = torch.tensor([[True, False]])
    torch.testing.assert_close(oracles.scaled_masked_softmax(scores, keep, 1.0),
                               torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    nothing = torch.tensor([[False, False]])  # ldm's fully masked row: uniform
    torch.testing.assert_close(oracles.scaled_masked_softmax(scores, nothing, 1.0),
                               torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    minus_inf = torch.full((1, 2), -math.inf, dtype=torch.float64)  # additive: NaN, as softmax gives it
    assert torch.isnan(oracles.scaled_masked_softmax(scores, minus_inf, 1.0)).all()


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_oracle_matches_pytorch_sdpa_math(mask_kind):
    q, k, v = _rand(2, 3, 5, 8, seed=1), _rand(2, 3, 7, 8, seed=2), _rand(2, 3, 7, 6, seed=3)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(4)) > 0.3
        mask[..., 0] = True  # SDPA gives NaN for a fully masked row; ldm's meaning is checked by hand above
    elif mask_kind == "float":
        mask = _rand(2, 1, 1, 7, seed=5)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(oracles.attention(q, k, v, 0.3, mask), expected, rtol=1e-12, atol=1e-12)


def test_group_norm_silu_oracle_matches_pytorch():
    x, w, b, add = _rand(2, 8, 3, 5, seed=1), _rand(8, seed=2), _rand(8, seed=3), _rand(2, 8, seed=4)
    expected = F.silu(F.group_norm(x + add[:, :, None, None], 4, w, b, eps=1e-5))
    torch.testing.assert_close(oracles.group_norm_silu(x, w, b, 4, 1e-5, True, add), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oracles.group_norm_silu(x, None, None, 2, 1e-6, False),
                               F.group_norm(x, 2, eps=1e-6), rtol=1e-12, atol=1e-12)


def test_geglu_oracle_matches_pytorch():
    h = _rand(3, 4, 10, seed=6)
    values, gates = h.chunk(2, dim=-1)
    torch.testing.assert_close(oracles.geglu(h), values * F.gelu(gates), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_reference_backend_attention_and_softmax_match_the_oracle(mask_kind):
    q, k, v = _rand(2, 5, 8, seed=7).float(), _rand(2, 9, 8, seed=8).float(), _rand(2, 9, 8, seed=9).float()
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 5, 9, generator=torch.Generator().manual_seed(10)) > 0.4
        mask[0, 0] = False  # one fully masked row
    elif mask_kind == "float":
        mask = _rand(2, 1, 9, seed=11).float()
    assert_rel_close(reference.attention(q, k, v, 0.35, mask), oracles.attention(q, k, v, 0.35, mask), 1e-14)
    scores = q @ k.transpose(-1, -2)
    assert_rel_close(reference.scaled_masked_softmax(scores, mask, 0.35),
                     oracles.scaled_masked_softmax(scores, mask, 0.35), 1e-14)


def test_reference_backend_unet_ops_match_the_oracle():
    x, w, b, add = _rand(2, 8, 3, 5, seed=12).float(), _rand(8, seed=13).float(), None, _rand(2, 8, seed=14).float()
    assert_rel_close(reference.group_norm_silu(x, w, b, 4, 1e-5, True, add),
                     oracles.group_norm_silu(x, w, b, 4, 1e-5, True, add), 1e-14)
    h = _rand(3, 10, seed=15).half()
    assert_rel_close(reference.geglu(h), oracles.geglu(h), 1e-14)


# --------------------------------------------------------------------------------------------------
# Philox4x32-10
# --------------------------------------------------------------------------------------------------

# Random123's published known-answer vectors (kat_vectors: counter words, key words, result words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    got = reference.philox4x32_10(np.array([counter], dtype=np.uint32), key)
    assert got.dtype == np.uint32 and got.shape == (1, 4)
    assert [int(w) for w in got[0]] == list(expected)


def test_philox_batched_equals_single():
    counters = np.array([c for c, _, _ in PHILOX_KAT[:2]] * 3, dtype=np.uint32)
    got = reference.philox4x32_10(counters, (0, 0))
    single = reference.philox4x32_10(counters[:1], (0, 0))
    assert [int(w) for w in got[0]] == list(PHILOX_KAT[0][2])
    np.testing.assert_array_equal(got[2], single[0])
    np.testing.assert_array_equal(got[4], single[0])


def test_philox_words_counter_layout():
    seed, offset = 0x1234567890ABCDEF, 0xFEDCBA9876543210
    words = reference.philox_words(seed, offset, 10)  # 3 groups
    assert words.shape == (3, 4)
    for g in range(3):
        counter = np.array([[g, 0, offset & 0xFFFFFFFF, offset >> 32]], dtype=np.uint32)
        np.testing.assert_array_equal(words[g], reference.philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))[0])


def test_philox_normal_mapping():
    seed, offset = 7, 3
    z = reference.philox_normal(seed, offset, (3, 3), dtype=torch.float64).reshape(-1).numpy()
    words = reference.philox_words(seed, offset, 9).astype(np.uint64)
    for i in range(9):
        r = words[i // 4]
        u = lambda w: float(int(w) >> 8) * 2.0**-24  # noqa: E731
        pair = (0, 1) if i % 4 < 2 else (2, 3)
        radius = math.sqrt(-2.0 * math.log(u(r[pair[0]]) + 2.0**-24))
        angle = 2.0 * math.pi * u(r[pair[1]])
        expected = radius * (math.cos(angle) if i % 2 == 0 else math.sin(angle))
        assert z[i] == pytest.approx(expected, rel=1e-12, abs=1e-12), i


def test_philox_normal_seed_masking_and_determinism():
    a = reference.philox_normal(-1, 5, (17,))
    b = reference.philox_normal((1 << 64) - 1, 5, (17,))
    assert torch.equal(a, b)
    assert not torch.equal(reference.philox_normal(1, 5, (17,)), reference.philox_normal(1, 6, (17,)))
    assert reference.philox_normal(0, 0, (2, 0)).shape == (2, 0)
    # A prefix of a longer draw: element i depends on i only, not on the shape.
    assert torch.equal(reference.philox_normal(3, 4, (2, 5)).reshape(-1), reference.philox_normal(3, 4, (13,))[:10])


def _noise_table() -> torch.Tensor:
    # sqrt(a_prev) = 0, dir = sqrt(1 - 0 - 1) = 0, sigma = 1: x_prev = sigma * z exactly.
    return schedule.coefficient_table([0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("seed,offset", [(0, 0), (42, 7), (2**40 + 5, 2**33 + 1), (-3, 11)])
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_cpp_philox_matches_numpy(seed, offset, numel):
    """The C++ Philox + Box-Muller (through the op with a sigma=1 table) equals the numpy mapping."""
    from ddim_fast import ops

    x = torch.randn(numel, 1)
    step = 2
    z = ops.ddim_step(x, torch.randn(numel, 1), _noise_table(), step,
                      rng_state=torch.tensor([seed, offset], dtype=torch.int64))
    expected = reference.philox_normal(seed, offset + step, (numel, 1), dtype=torch.float64)
    # Same 24-bit uniforms; the normals differ only by fp32 rounding of log/sqrt/sin/cos.
    torch.testing.assert_close(z.double(), expected, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------------------------------
# Per-row Philox streams (rng_state [B, 2]) and the seeded-noise helper
# --------------------------------------------------------------------------------------------------


def test_philox_normal_rows_is_one_stream_per_row():
    streams = [(7, 3), (2**40 + 1, 5), (-2, 0)]
    z = reference.philox_normal_rows(streams, (3, 2, 5), dtype=torch.float64)  # 10 per row: % 4 != 0
    assert z.shape == (3, 2, 5)
    for b, (seed, offset) in enumerate(streams):
        assert torch.equal(z[b], reference.philox_normal(seed, offset, (2, 5), dtype=torch.float64))
    # A row's draw does not depend on its position or on the other rows.
    swapped = reference.philox_normal_rows(streams[::-1], (3, 2, 5), dtype=torch.float64)
    assert torch.equal(swapped[0], z[2]) and torch.equal(swapped[2], z[0])
    # Row b restarts its groups at 0: it is not the continuation of row b - 1 (as the one-stream draw is).
    one_stream = reference.philox_normal(7, 3, (3, 2, 5), dtype=torch.float64)
    assert torch.equal(one_stream[0], z[0]) and not torch.equal(one_stream[1], reference.philox_normal_rows(
        [(7, 3)] * 3, (3, 2, 5), dtype=torch.float64)[1])
    with pytest.raises(ValueError, match="one \\(seed, offset\\) per row"):
        reference.philox_normal_rows(streams, (2, 5))


def test_philox_words_of_a_row_use_the_index_within_the_row():
    # The counter of element j of row b: (j >> 2, offset_b + table row); the key: seed_b. Checked on the words.
    seed, offset, numel = 0xDEADBEEF12345, 77, 10
    words = reference.philox_words(seed, offset, numel)
    for g in range(3):
        counter = np.array([[g, 0, offset, 0]], dtype=np.uint32)
        np.testing.assert_array_equal(words[g], reference.philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))[0])


def test_seeded_noise_both_state_shapes():
    one = reference.seeded_noise(torch.tensor([5, 6]), 2, (2, 3, 4))
    assert torch.equal(one, reference.philox_normal(5, 8, (2, 3, 4)))
    rows = reference.seeded_noise(torch.tensor([[5, 6], [9, 1]]), 2, (2, 3, 4))
    assert torch.equal(rows, reference.philox_normal_rows([(5, 8), (9, 3)], (2, 3, 4)))
    assert torch.equal(rows[0], one[0]) and not torch.equal(rows[1], one[1])
    assert reference.seeded_noise(torch.zeros(0, 2, dtype=torch.int64), 0, (0, 3)).shape == (0, 3)


def test_reference_outputs_are_laid_out_like_x():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    m = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # another layout: the result still follows x
    out, x0 = reference.ddim_step(x, m, _tiny_table(), 1)
    assert out.stride() == x.stride() and x0.stride() == x.stride()
    want, want_x0 = reference.ddim_step(x.contiguous(), m, _tiny_table(), 1)
    assert torch.equal(out, want) and torch.equal(x0, want_x0)
    t = torch.randn(2, 3, 4, 5)
    assert reference.like_input(t, torch.empty(2, 3, 4, 5)) is t  # already laid out: no copy
