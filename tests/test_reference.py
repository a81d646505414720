"""The oracle itself: reference.ddim_step against hand-written closed forms, Philox4x32-10 against the
published Random123 known-answer vectors, the normal mapping of csrc/include/ddim_fast/philox.h, and the
C++ Philox (seen through the op) against the numpy one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddim_fast import reference, schedule

# --------------------------------------------------------------------------------------------------
# ddim_step closed forms on a tiny case (plain Python floats, no tensors in the expected values)
# --------------------------------------------------------------------------------------------------

A_T, A_PREV, SIGMA = 0.64, 0.81, 0.2
SA, S1A, SAP = math.sqrt(A_T), math.sqrt(1 - A_T), math.sqrt(A_PREV)  # 0.8, 0.6, 0.9
DIR = math.sqrt(1 - A_PREV - SIGMA**2)


def _tiny_table() -> torch.Tensor:
    # Row 0 is a dummy so that the tests also check that `step` selects the row.
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


# fp32 table entries: compare the fp64 oracle (which reads the fp32 table) to fp32-level precision.
CLOSE = dict(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", reference.PREDICTION_TYPES)
def test_ddim_step_closed_form(prediction):
    xs, ms, zs = [1.0, -2.0, 0.5], [0.5, 0.25, -1.5], [0.3, -1.1, 2.0]
    x = torch.tensor([xs], dtype=torch.float64)
    m = torch.tensor([ms], dtype=torch.float64)
    z = torch.tensor([zs], dtype=torch.float64)
    for step in (1, torch.tensor([1])):
        out, x0 = reference.ddim_step(x, m, _tiny_table(), step, prediction_type=prediction, noise=z,
                                      temperature=0.5)
        expected = [_closed_form(a, b, prediction, c, 0.5) for a, b, c in zip(xs, ms, zs)]
        assert out.dtype == torch.float64 and out.shape == (1, 3)
        torch.testing.assert_close(out[0], torch.tensor([e[0] for e in expected], dtype=torch.float64), **CLOSE)
        torch.testing.assert_close(x0[0], torch.tensor([e[1] for e in expected], dtype=torch.float64), **CLOSE)


def test_ddim_step_closed_form_eps_values():
    # One case computed by hand: x = 1, eps = 0.5 -> x0 = (1 - 0.6*0.5)/0.8 = 0.875,
    # x_prev = 0.9*0.875 + sqrt(0.15)*0.5 (no noise).
    out, x0 = reference.ddim_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), _tiny_table(), 1)
    assert x0.item() == pytest.approx(0.875, abs=1e-6)
    assert out.item() == pytest.approx(0.9 * 0.875 + math.sqrt(0.15) * 0.5, abs=1e-6)


@pytest.mark.parametrize("reuse", [False, True])
def test_ddim_step_guidance_and_clip(reuse):
    uncond, cond, xs, scale = [0.2, -3.0], [1.0, 4.0], [2.5, -0.1], 7.5
    m = torch.tensor([uncond, cond], dtype=torch.float64).reshape(2, 2)
    x = torch.tensor([xs], dtype=torch.float64)
    out, x0 = reference.ddim_step(x, m, _tiny_table(), 1, guidance_scale=scale, clip_range=1.0,
                                  use_clipped_model_output=reuse)
    combined = [u + scale * (c - u) for u, c in zip(uncond, cond)]
    expected = [_closed_form(a, b, "epsilon", clip=1.0, reuse=reuse) for a, b in zip(xs, combined)]
    torch.testing.assert_close(out[0], torch.tensor([e[0] for e in expected], dtype=torch.float64), **CLOSE)
    torch.testing.assert_close(x0[0], torch.tensor([e[1] for e in expected], dtype=torch.float64), **CLOSE)
    assert x0.abs().max().item() <= 1.0


def test_ddim_step_dynamic_threshold_closed_form():
    x = torch.tensor([[3.0, -1.0], [0.2, 0.1]], dtype=torch.float64)
    m = torch.tensor([[2.0, -0.5], [0.4, -3.0]], dtype=torch.float64)  # sample prediction: x0 = m
    s = torch.tensor([1.5, 2.0], dtype=torch.float32)
    out, x0 = reference.ddim_step(x, m, _tiny_table(), 1, prediction_type="sample", x0_threshold=s)
    expected_x0 = [[1.5 / 1.5, -0.5 / 1.5], [0.4 / 2.0, -2.0 / 2.0]]
    torch.testing.assert_close(x0, torch.tensor(expected_x0, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # eps is NOT re-derived without use_clipped_model_output: it comes from the unclamped x0.
    eps = (x - SA * m) / S1A
    torch.testing.assert_close(out, SAP * x0 + DIR * eps, **CLOSE)


def test_dynamic_threshold_scale():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.3, 2.0, 10.0]).reshape(3, 1, 1, 1)
    s = reference.dynamic_threshold(x0, ratio=0.9, max_value=4.0)
    flat = x0.reshape(3, -1).abs().numpy().astype(np.float64)
    expected = np.clip(np.quantile(flat, 0.9, axis=1), 1.0, 4.0)
    assert s.shape == (3,) and s.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-6)
    assert s[0].item() == 1.0 and s[2].item() == 4.0  # both clamps are hit


def test_ddim_step_no_noise_ignores_sigma():
    x, m = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    out_none, _ = reference.ddim_step(x, m, _tiny_table(), 1)
    out_zero, _ = reference.ddim_step(x, m, _tiny_table(), 1, noise=torch.zeros(1, 1))
    assert out_none.item() == out_zero.item()


def test_predict_x0_eps_rejects_unknown():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        reference.predict_x0_eps(torch.ones(1), torch.ones(1), 1.0, 0.0, "eps")


def test_relative_error():
    assert reference.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert reference.relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])) == pytest.approx(0.1)
    assert reference.relative_error(torch.empty(0), torch.empty(0)) == 0.0


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
    # The counter of element j of row b: (j >> 2, offset_b + step); the key: seed_b. Checked on the words.
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
