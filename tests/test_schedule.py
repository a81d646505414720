"""Schedules: beta schedules (ldm and diffusers names), timestep grids, zero-terminal-SNR rescale,
previous-timestep pairing and the fp32 coefficient table.

Expected values come from the issue (pinned numbers), from diffusers' own DDIMScheduler (installed in
CI), or from formulas written out here independently of ddim_fast/schedule.py (the float64 diffusers beta
schedules and zero-SNR rescale live here: the product runs diffusers' fp32 arithmetic, in ddim_fast/scheduler.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddim_fast import schedule
from ddim_fast import scheduler as fused_scheduler

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale_zero_snr  # noqa: E402

SD_START, SD_END, T = 0.00085, 0.012, 1000
FP32_EPS = float(np.finfo(np.float32).eps)


def _sd_alphas_cumprod() -> torch.Tensor:
    return schedule.alphas_cumprod(schedule.ldm_betas("linear", T, SD_START, SD_END))


# --------------------------------------------------------------------------------------------------
# Pinned values from the issue
# --------------------------------------------------------------------------------------------------


def test_sd_ldm_ddim_alphas_pinned():
    params = schedule.ldm_ddim_parameters(_sd_alphas_cumprod(), schedule.ldm_timesteps(10), eta=0.0)
    # ldm's ascending-timestep order: index 0 is the last step run.
    assert params.alphas.shape == (10,)
    np.testing.assert_allclose(params.alphas[[0, 1, 2, 9]], [0.998296, 0.892981, 0.752143, 0.014005], atol=5e-7)
    assert np.all(np.diff(params.alphas) < 0)
    np.testing.assert_array_equal(params.sigmas, np.zeros(10))


def test_ldm_uniform_s10():
    np.testing.assert_array_equal(schedule.ldm_timesteps(10), np.arange(1, 1000, 100))


def test_ldm_uniform_s7_has_eight_steps():
    ts = schedule.ldm_timesteps(7)
    assert ts.dtype == np.int64
    np.testing.assert_array_equal(ts, [1, 143, 285, 427, 569, 711, 853, 995])


def test_ldm_quad_s10():
    np.testing.assert_array_equal(
        schedule.ldm_timesteps(10, discretize="quad"), [1, 10, 40, 89, 159, 247, 356, 484, 633, 801]
    )


def test_diffusers_leading_offset1_s5():
    np.testing.assert_array_equal(
        schedule.diffusers_timesteps(5, timestep_spacing="leading", steps_offset=1), [801, 601, 401, 201, 1]
    )


def test_diffusers_trailing_s10():
    np.testing.assert_array_equal(schedule.diffusers_timesteps(10, timestep_spacing="trailing"),
                                  np.arange(999, 0, -100))


def test_diffusers_linspace_s10():
    np.testing.assert_array_equal(
        schedule.diffusers_timesteps(10, timestep_spacing="linspace"),
        [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    )


# --------------------------------------------------------------------------------------------------
# Grids against upstream formulas / diffusers itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 7, 9, 10, 20, 25, 27, 50, 250, 999, 1000])
def test_ldm_uniform_matches_upstream_formula(num_steps):
    upstream = np.asarray(list(range(0, T, T // num_steps))) + 1  # ldm's make_ddim_timesteps
    ours = schedule.ldm_timesteps(num_steps)
    # Identical to upstream except that entries == T (an IndexError upstream) are dropped.
    np.testing.assert_array_equal(ours, upstream[upstream < T])
    assert ours.min() >= 1 and ours.max() < T
    assert len(ours) >= min(num_steps, T - 1)


def test_ldm_s3_no_longer_crashes():
    # Upstream: range(0, 1000, 333) + 1 = [1, 334, 667, 1000] -> alphas_cumprod[1000] IndexError.
    ts = schedule.ldm_timesteps(3)
    np.testing.assert_array_equal(ts, [1, 334, 667])
    params = schedule.ldm_ddim_parameters(_sd_alphas_cumprod(), ts, eta=1.0)
    table = schedule.ldm_coefficient_table(params)
    assert table.shape == (3, schedule.TABLE_COLUMNS)
    assert torch.isfinite(table).all()


@pytest.mark.parametrize("num_steps", [2, 5, 10, 13, 50])
def test_ldm_quad_matches_upstream_formula(num_steps):
    upstream = ((np.linspace(0, np.sqrt(T * 0.8), num_steps)) ** 2).astype(int) + 1
    np.testing.assert_array_equal(schedule.ldm_timesteps(num_steps, discretize="quad"), upstream)


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0),
                                            ("trailing", 1), ("linspace", 1)])
@pytest.mark.parametrize("num_steps", [1, 3, 5, 7, 10, 33, 50, 1000])
def test_diffusers_grid_matches_ddim_scheduler(spacing, offset, num_steps):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(num_steps)
    ours = schedule.diffusers_timesteps(num_steps, T, timestep_spacing=spacing, steps_offset=offset)
    assert ours.dtype == np.int64
    if spacing != "leading":
        # diffusers adds steps_offset only for "leading" ("linspace"/"trailing" ignore it upstream too).
        ours = schedule.diffusers_timesteps(num_steps, T, timestep_spacing=spacing, steps_offset=0)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


# --------------------------------------------------------------------------------------------------
# Beta schedules
# --------------------------------------------------------------------------------------------------


def _independent_ldm_betas(name: str, n: int, start: float, end: float, cosine_s: float = 8e-3) -> np.ndarray:
    if name == "linear":
        return np.array([(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (n - 1)) ** 2
                         for i in range(n)])
    if name == "sqrt_linear":
        return np.array([start + (end - start) * i / (n - 1) for i in range(n)])
    if name == "sqrt":
        return np.array([math.sqrt(start + (end - start) * i / (n - 1)) for i in range(n)])
    if name == "cosine":
        f = [math.cos((i / n + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2 for i in range(n + 1)]
        return np.clip([1 - f[i + 1] / f[i] for i in range(n)], 0.0, 0.999)
    if name == "squaredcos_cap_v2":
        g = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - g((i + 1) / n) / g(i / n), 0.999) for i in range(n)])
    raise AssertionError(name)


@pytest.mark.parametrize("name", schedule.LDM_BETA_SCHEDULES)
@pytest.mark.parametrize("n,start,end", [(1000, SD_START, SD_END), (1000, 1e-4, 2e-2), (37, 1e-3, 0.05)])
def test_ldm_betas_match_independent_formula(name, n, start, end):
    ours = schedule.ldm_betas(name, n, start, end)
    assert ours.dtype == torch.float64 and ours.shape == (n,)
    np.testing.assert_allclose(ours.numpy(), _independent_ldm_betas(name, n, start, end), rtol=1e-12, atol=1e-15)


def _diffusers_betas(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                     beta_end: float = 0.02) -> torch.Tensor:
    """diffusers' beta_schedule names in float64 [T] (diffusers computes them in fp32)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return torch.from_numpy(_independent_ldm_betas("squaredcos_cap_v2", num_train_timesteps, 0.0, 0.0))
    raise AssertionError(beta_schedule)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1, in float64:
    shift sqrt(alpha_cumprod) so the last is 0, scale it so the first is unchanged, back to betas."""
    sqrt_abar = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].item(), sqrt_abar[-1].item()
    abar = ((sqrt_abar - last) * (first / (first - last))) ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


@pytest.mark.parametrize("name", schedule.DIFFUSERS_BETA_SCHEDULES)
@pytest.mark.parametrize("start,end", [(SD_START, SD_END), (1e-4, 2e-2)])
def test_diffusers_beta_formulas_match_ddim_scheduler(name, start, end):
    """The float64 formulas above are diffusers' schedules (so that test_ldm_and_diffusers_names_agree holds
    ldm_betas to diffusers' names)."""
    ref = DDIMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end, beta_schedule=name)
    ours = _diffusers_betas(name, T, start, end)
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    # diffusers computes in fp32: equal within fp32 rounding of each beta (a few ulp).
    torch.testing.assert_close(ours.float(), ref.betas, rtol=4 * FP32_EPS, atol=0)
    # Its cumprod runs in fp32 too: our fp32 betas through an fp32 cumprod give its buffer closely, and
    # the float64 product is within the accumulated fp32 rounding (~T ulp).
    torch.testing.assert_close(torch.cumprod(1 - ours.float(), 0), ref.alphas_cumprod, rtol=1e-5, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod(ours), ref.alphas_cumprod.double(), rtol=T * FP32_EPS, atol=0)
    # And the independent float64 formula (diffusers' names -> ldm's formulas).
    ldm_name = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}[name]
    np.testing.assert_allclose(ours.numpy(), _independent_ldm_betas(ldm_name, T, start, end), rtol=1e-12)


def test_ldm_and_diffusers_names_agree():
    # ldm "linear" is diffusers "scaled_linear"; ldm "sqrt_linear" is diffusers "linear".
    torch.testing.assert_close(schedule.ldm_betas("linear", T, SD_START, SD_END),
                               _diffusers_betas("scaled_linear", T, SD_START, SD_END), rtol=0, atol=0)
    torch.testing.assert_close(schedule.ldm_betas("sqrt_linear", T, SD_START, SD_END),
                               _diffusers_betas("linear", T, SD_START, SD_END), rtol=0, atol=0)
    torch.testing.assert_close(schedule.ldm_betas("squaredcos_cap_v2", 100),
                               _diffusers_betas("squaredcos_cap_v2", 100), rtol=1e-15, atol=0)
    torch.testing.assert_close(schedule.squaredcos_cap_v2_betas(100), _diffusers_betas("squaredcos_cap_v2", 100),
                               rtol=1e-15, atol=0)


def test_alphas_cumprod_definition():
    betas = schedule.ldm_betas("linear", T, SD_START, SD_END)
    abar = schedule.alphas_cumprod(betas)
    expected = np.cumprod(1.0 - betas.numpy())
    np.testing.assert_allclose(abar.numpy(), expected, rtol=1e-14)
    assert abar.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Zero-terminal-SNR rescale
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_rescale_zero_terminal_snr(name):
    """The float64 rescale is diffusers'; the scheduler's fp32 rescale (diffusers' operation order) follows it to
    fp32 rounding, ends at an alpha_cumprod of exactly 0 and starts where the schedule did."""
    betas = _diffusers_betas(name, T, SD_START, SD_END)
    rescaled = _rescale_zero_terminal_snr(betas)
    abar_before, abar_after = schedule.alphas_cumprod(betas), schedule.alphas_cumprod(rescaled)
    assert rescaled.dtype == torch.float64
    assert abar_after[-1].item() == pytest.approx(0.0, abs=1e-30)
    assert abar_after[0].item() == pytest.approx(abar_before[0].item(), rel=1e-14)
    assert torch.all(abar_after[1:] < abar_after[:-1])  # still strictly decreasing
    # diffusers' own function applied to the same float64 betas.
    torch.testing.assert_close(rescaled, diffusers_rescale_zero_snr(betas.clone()), rtol=1e-12, atol=1e-15)
    # And the scheduler that uses it. It works in fp32 end to end, where the early betas
    # (1 - abar_i / abar_(i-1)) lose digits to cancellation, so compare the cumulative products.
    ref = DDIMScheduler(num_train_timesteps=T, beta_start=SD_START, beta_end=SD_END, beta_schedule=name,
                        rescale_betas_zero_snr=True)
    torch.testing.assert_close(abar_after.float(), ref.alphas_cumprod, rtol=T * FP32_EPS, atol=1e-6)
    assert ref.alphas_cumprod[-1].item() < 1e-6
    fp32 = fused_scheduler._rescale_zero_terminal_snr_fp32(betas.float())
    assert fp32.dtype == torch.float32
    abar_fp32 = torch.cumprod(1.0 - fp32.double(), 0)
    assert abar_fp32[-1].item() == 0.0
    torch.testing.assert_close(abar_fp32[:-1], abar_after[:-1], rtol=T * FP32_EPS, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# previous_timesteps pairing
# --------------------------------------------------------------------------------------------------


def test_previous_timesteps_upstream_vs_grid():
    ts = schedule.diffusers_timesteps(10, T, "linspace")
    upstream = schedule.previous_timesteps(ts, T, 10, "upstream")
    grid = schedule.previous_timesteps(ts, T, 10, "grid")
    np.testing.assert_array_equal(upstream, ts - 100)
    np.testing.assert_array_equal(grid, [888, 777, 666, 555, 444, 333, 222, 111, 0, -1])
    # "leading" with S dividing T: both pairings agree except where upstream steps past 0.
    lead = schedule.diffusers_timesteps(10, T, "leading", steps_offset=1)
    np.testing.assert_array_equal(schedule.previous_timesteps(lead, T, 10, "upstream"), lead - 100)
    np.testing.assert_array_equal(schedule.previous_timesteps(lead, T, 10, "grid")[:-1], lead[1:])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [7, 10])
def test_upstream_pairing_reproduces_diffusers_step(spacing, num_steps):
    """alpha_at(previous_timesteps(..., 'upstream')) is exactly what DDIMScheduler.step uses."""
    offset = 1 if spacing == "leading" else 0
    ref = DDIMScheduler(num_train_timesteps=T, beta_start=SD_START, beta_end=SD_END, beta_schedule="scaled_linear",
                        set_alpha_to_one=False, steps_offset=offset, timestep_spacing=spacing,
                        clip_sample=False)
    ref.set_timesteps(num_steps)
    ts = schedule.diffusers_timesteps(num_steps, T, spacing, steps_offset=offset)
    prev = schedule.previous_timesteps(ts, T, num_steps, "upstream")
    abar = ref.alphas_cumprod.double()
    a_prev = schedule.alpha_at(abar, prev, outside=abar[0].item())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    for k, t in enumerate(ts):
        out = ref.step(eps.float(), int(t), x.float(), eta=0.0).prev_sample.double()
        a_t = abar[int(t)].item()
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        expected = math.sqrt(a_prev[k]) * x0 + math.sqrt(1 - a_prev[k]) * eps
        torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


def test_alpha_at_outside():
    abar = _sd_alphas_cumprod()
    got = schedule.alpha_at(abar, np.array([-1, 0, 999, 1000]), outside=0.5)
    np.testing.assert_array_equal(got, [0.5, abar[0].item(), abar[999].item(), 0.5])


def test_ldm_ddim_parameters_formula():
    abar = _sd_alphas_cumprod()
    ts = schedule.ldm_timesteps(10)
    params = schedule.ldm_ddim_parameters(abar, ts, eta=0.7)
    a = abar.numpy()
    np.testing.assert_array_equal(params.timesteps, ts)
    np.testing.assert_array_equal(params.alphas, a[ts])
    np.testing.assert_array_equal(params.alphas_prev, np.concatenate([[a[0]], a[ts[:-1]]]))
    expected_sigma = [0.7 * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
                      for at, ap in zip(a[ts], params.alphas_prev)]
    np.testing.assert_allclose(params.sigmas, expected_sigma, rtol=1e-13)
    np.testing.assert_allclose(schedule.ddim_sigmas(params.alphas, params.alphas_prev, 0.7), expected_sigma,
                               rtol=1e-13)


# --------------------------------------------------------------------------------------------------
# Coefficient table
# --------------------------------------------------------------------------------------------------


def _f32(v: float) -> float:
    return float(np.float32(v))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_coefficient_table_columns(eta):
    abar = _sd_alphas_cumprod()
    params = schedule.ldm_ddim_parameters(abar, schedule.ldm_timesteps(10), eta=eta)
    table = schedule.ldm_coefficient_table(params)
    assert table.dtype == torch.float32 and table.shape == (10, 8) and table.is_contiguous()
    # Run order: ldm iterates its ascending grid from the end.
    for row, i in enumerate(range(9, -1, -1)):
        a, ap, s = float(params.alphas[i]), float(params.alphas_prev[i]), float(params.sigmas[i])
        expected = [
            float(params.timesteps[i]), math.sqrt(a), math.sqrt(1 - a), math.sqrt(ap),
            math.sqrt(max(1 - ap - s * s, 0.0)), s, a, ap,
        ]
        assert table[row].tolist() == [_f32(v) for v in expected], f"row {row}"
    assert table[:, schedule.COL_TIMESTEP].tolist() == list(range(901, 0, -100))
    # Column numbers are the ones the kernels hard-code (csrc/include/ddim_fast/step_math.h).
    assert (schedule.COL_TIMESTEP, schedule.COL_SQRT_ALPHA, schedule.COL_SQRT_ONE_MINUS_ALPHA,
            schedule.COL_SQRT_ALPHA_PREV, schedule.COL_DIR_COEF, schedule.COL_SIGMA, schedule.COL_ALPHA,
            schedule.COL_ALPHA_PREV, schedule.TABLE_COLUMNS) == (0, 1, 2, 3, 4, 5, 6, 7, 8)


def test_coefficient_table_dir_coef_clamped_and_no_sigma():
    # 1 - a_prev - sigma^2 slightly negative in float64 -> exactly 0, never NaN.
    table = schedule.coefficient_table([5], [0.5], [0.25], [math.sqrt(0.75) * (1 + 1e-15)])
    assert table[0, schedule.COL_DIR_COEF].item() == 0.0
    det = schedule.coefficient_table([7, 3], [0.3, 0.6], [0.6, 0.9])
    assert det[:, schedule.COL_SIGMA].tolist() == [0.0, 0.0]
    assert det[:, schedule.COL_DIR_COEF].tolist() == [_f32(math.sqrt(0.4)), _f32(math.sqrt(0.1))]


def test_coefficient_table_device_and_step_index():
    table = schedule.coefficient_table([1], [0.5], [0.9], device="cpu")
    assert table.device.type == "cpu"
    step = schedule.step_index(3)
    assert step.dtype == torch.int64 and step.shape == (1,) and step.item() == 3


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: schedule.ldm_betas("nope"), ValueError, "unknown ldm beta schedule 'nope'"),
        (lambda: schedule.ldm_betas("linear", 0), ValueError, "num_timesteps must be > 0"),
        (lambda: schedule.ldm_betas("linear", 10.0), TypeError, "num_timesteps must be an int"),
        (lambda: schedule.ldm_timesteps(0), ValueError, "num_ddim_steps must be > 0"),
        (lambda: schedule.ldm_timesteps(True), TypeError, "num_ddim_steps must be an int"),
        (lambda: schedule.ldm_timesteps(1001), ValueError,
         r"num_ddim_steps must be <= num_train_timesteps \(1000\), got 1001"),
        (lambda: schedule.ldm_timesteps(10, discretize="cubic"), ValueError, "unknown ddim_discretize 'cubic'"),
        (lambda: schedule.diffusers_timesteps(10, timestep_spacing="even"), ValueError,
         "unknown timestep_spacing 'even'"),
        (lambda: schedule.diffusers_timesteps(1001), ValueError, r"num_inference_steps \(1001\) cannot exceed"),
        (lambda: schedule.diffusers_timesteps(-1), ValueError, "num_inference_steps must be > 0"),
        (lambda: schedule.previous_timesteps(np.array([5]), 10, 1, "next"), ValueError,
         "pairing must be 'upstream' or 'grid'"),
        (lambda: schedule.ldm_ddim_parameters(torch.ones(10), np.array([3, 10]), 0.0), ValueError,
         r"ddim_timesteps must lie in \[0, 10\)"),
        (lambda: schedule.ldm_ddim_parameters(torch.ones(10), np.array([], dtype=np.int64), 0.0), ValueError,
         "non-empty 1-D"),
        (lambda: schedule.coefficient_table([1, 2], [0.5], [0.5]), ValueError, "equally long"),
        (lambda: schedule.coefficient_table([], [], []), ValueError, "at least one step"),
        (lambda: schedule.coefficient_table([1], [1.5], [0.5]), ValueError, r"must lie in \[0, 1\]"),
        (lambda: schedule.coefficient_table([1], [0.5], [-0.1]), ValueError, r"must lie in \[0, 1\]"),
        (lambda: schedule.coefficient_table([[1]], [[0.5]], [[0.5]]), ValueError, "must be 1-D"),
    ],
)
def test_bad_inputs_raise_clearly(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("S,exc,match", [(0, ValueError, r"S \(ddim_num_steps\) must be > 0, got 0"),
                                         (-3, ValueError, r"S \(ddim_num_steps\) must be > 0, got -3"),
                                         (2.5, TypeError, r"S \(ddim_num_steps\) must be an int"),
                                         (1001, ValueError, r"S \(ddim_num_steps\) must be <= num_train_timesteps")])
def test_sampler_errors_name_its_own_argument_S(S, exc, match):
    # FastDDIMSampler.sample(S, ...) is ldm's signature: its errors name S, not the schedule's internal name.
    from ddim_fast import FastDDIMSampler
    from ddim_fast.tools.toy_data import EmbeddedLdmModel

    sampler = FastDDIMSampler(EmbeddedLdmModel(size=8))
    with pytest.raises(exc, match=match) as info:
        sampler.sample(S, 1, (3, 8, 8), verbose=False)
    assert "num_ddim_steps" not in str(info.value).replace("ddim_num_steps", "")
