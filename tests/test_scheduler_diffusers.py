"""FastDDIMScheduler / FastDDIMInverseScheduler against diffusers' DDIMScheduler / DDIMInverseScheduler.

Part 1 re-states diffusers' own scheduler tests (tests/schedulers/test_scheduler_ddim.py,
test_scheduler_ddim_inverse.py, test_schedulers.py) for these classes, with the same oracle numbers.
Part 2 runs both side by side on random inputs over whole loops for every config combination.
"""

from __future__ import annotations

import builtins
import importlib.util
import itertools
import math
import sys

import numpy as np
import pytest
import torch

from conftest import SAMPLER_RTOL, assert_rel_close, requires_cuda
from ddim_fast.reference import relative_error

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMInverseScheduler, DDIMScheduler  # noqa: E402

from ddim_fast import schedule  # noqa: E402
from ddim_fast.scheduler import FastDDIMInverseScheduler, FastDDIMScheduler  # noqa: E402

# diffusers' test config (SchedulerCommonTest subclasses for DDIM).
BASE_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True)


def make_config(**overrides):
    config = dict(BASE_CONFIG)
    config.update(overrides)
    return config


def dummy_sample_deter(flip: bool = False) -> torch.Tensor:
    """diffusers' deterministic [4, 3, 8, 8] sample (a permuted, hence non-contiguous, view); flipped = its noise."""
    num_elems = 4 * 3 * 8 * 8
    values = torch.arange(num_elems)
    if flip:
        values = values.flip(-1)
    return (values.reshape(3, 8, 8, 4) / num_elems).permute(3, 0, 1, 2)


def dummy_model(sample, t):
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *([1] * (sample.dim() - 1))).to(sample.dtype)
    return sample * t / (t + 1)


def full_loop(scheduler_class, inverse=False, num_inference_steps=10, **config):
    scheduler = scheduler_class(**make_config(**config))
    scheduler.set_timesteps(num_inference_steps)
    sample = dummy_sample_deter()
    for t in scheduler.timesteps:
        residual = dummy_model(sample, t)
        out = scheduler.step(residual, t, sample) if inverse else scheduler.step(residual, t, sample, 0.0)
        sample = out.prev_sample
    return sample


# ==================================================================================================
# Part 1: diffusers' own scheduler tests, pointed at the fused classes
# ==================================================================================================

# (config, sum |x|, mean |x|) from diffusers' test_scheduler_ddim.py / test_scheduler_ddim_inverse.py.
FORWARD_ORACLES = [
    ({}, 172.0067, 0.223967),
    ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
    ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
    ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
]
INVERSE_ORACLES = [
    ({}, 671.6816, 0.8746),
    ({"prediction_type": "v_prediction"}, 1394.2185, 1.8154),
    ({"set_alpha_to_one": True, "beta_start": 0.01}, 539.9622, 0.7031),
    ({"set_alpha_to_one": False, "beta_start": 0.01}, 542.6722, 0.7066),
]


@pytest.mark.parametrize("config,expected_sum,expected_mean", FORWARD_ORACLES)
def test_full_loop_oracles(config, expected_sum, expected_mean):
    sample = full_loop(FastDDIMScheduler, **config)
    assert abs(sample.abs().sum().item() - expected_sum) < 1e-2
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3
    assert_rel_close(sample, full_loop(DDIMScheduler, **config), SAMPLER_RTOL, "full loop vs diffusers")


@pytest.mark.parametrize("config,expected_sum,expected_mean", INVERSE_ORACLES)
def test_inverse_full_loop_oracles(config, expected_sum, expected_mean):
    sample = full_loop(FastDDIMInverseScheduler, inverse=True, **config)
    assert abs(sample.abs().sum().item() - expected_sum) < 1e-2
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3
    assert_rel_close(sample, full_loop(DDIMInverseScheduler, inverse=True, **config), SAMPLER_RTOL,
                     "inverse loop vs diffusers")


def test_full_loop_with_noise_oracle():
    scheduler = FastDDIMScheduler(**make_config())
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[8 * scheduler.order:]
    sample = scheduler.add_noise(dummy_sample_deter(), dummy_sample_deter(flip=True), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - 354.5418) < 1e-2
    assert abs(sample.abs().mean().item() - 0.4616) < 1e-3


def test_steps_offset_timesteps():
    scheduler = FastDDIMScheduler(**make_config(steps_offset=1))
    scheduler.set_timesteps(5)
    assert torch.equal(scheduler.timesteps, torch.LongTensor([801, 601, 401, 201, 1]))
    inverse = FastDDIMInverseScheduler(**make_config(steps_offset=1))
    inverse.set_timesteps(5)
    assert torch.equal(inverse.timesteps, torch.LongTensor([1, 201, 401, 601, 801]))


def test_variance_values():
    scheduler = FastDDIMScheduler(**make_config())
    for (t, prev), expected in [((0, 0), 0.0), ((420, 400), 0.14771), ((980, 960), 0.32460), ((487, 486), 0.00979),
                                ((999, 998), 0.02)]:
        assert abs(scheduler._get_variance(t, prev).item() - expected) < 1e-5


def test_num_inference_steps_errors():
    scheduler = FastDDIMScheduler(**make_config())
    with pytest.raises(ValueError):
        scheduler.set_timesteps(num_inference_steps=0)
    with pytest.raises(ValueError, match="cannot be larger"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 2), 10, torch.zeros(1, 2))


def _check_save_load_step(scheduler_class, config, time_step, num_inference_steps=50, **step_kwargs):
    """diffusers' check_over_configs / check_over_forward: save_config -> from_pretrained gives the same step,
    and both equal diffusers' own class."""
    import tempfile

    upstream_class = DDIMScheduler if scheduler_class is FastDDIMScheduler else DDIMInverseScheduler
    sample = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(time_step))
    residual = 0.1 * sample
    scheduler = scheduler_class(**config)
    with tempfile.TemporaryDirectory() as tmpdir:
        scheduler.save_config(tmpdir)
        reloaded = scheduler_class.from_pretrained(tmpdir)
    upstream = upstream_class(**config)
    outputs = []
    for s in (scheduler, reloaded, upstream):
        s.set_timesteps(num_inference_steps)
        assert torch.equal(s.scale_model_input(sample, 0), sample)
        kwargs = dict(step_kwargs)
        if "generator_seed" in kwargs:  # diffusers' tests re-seed before every step
            kwargs["generator"] = torch.manual_seed(kwargs.pop("generator_seed"))
        outputs.append(s.step(residual, time_step, sample, **kwargs).prev_sample)
    assert torch.sum(torch.abs(outputs[0] - outputs[1])) < 1e-5, f"save/load changed the step: {config}"
    assert_rel_close(outputs[0], outputs[2], SAMPLER_RTOL, f"step vs diffusers {config} t={time_step}")


CONFIG_SWEEP = (
    [dict(num_train_timesteps=n) for n in (100, 500, 1000)]
    + [dict(steps_offset=o) for o in (0, 1)]
    + [dict(beta_start=b0, beta_end=b1) for b0, b1 in zip([0.0001, 0.001, 0.01, 0.1], [0.002, 0.02, 0.2, 2])]
    + [dict(beta_schedule=s) for s in ("linear", "squaredcos_cap_v2")]
    + [dict(prediction_type=p) for p in ("epsilon", "v_prediction")]
    + [dict(clip_sample=c) for c in (True, False)]
    + [dict(timestep_spacing=s) for s in ("trailing", "leading")]
    + [dict(rescale_betas_zero_snr=r) for r in (True, False)]
)
THRESHOLD_SWEEP = [dict(thresholding=False)] + [
    dict(thresholding=True, prediction_type=p, sample_max_value=m)
    for m in (0.5, 1.0, 2.0) for p in ("epsilon", "v_prediction")
]


def test_over_configs():
    for overrides in CONFIG_SWEEP + THRESHOLD_SWEEP:
        _check_save_load_step(FastDDIMScheduler, make_config(**overrides), 0, eta=0.0)
    for overrides in CONFIG_SWEEP:
        _check_save_load_step(FastDDIMInverseScheduler, make_config(**overrides), 0)


def test_over_forward():
    for t in (1, 10, 49):
        _check_save_load_step(FastDDIMScheduler, make_config(), t, eta=0.0)
        _check_save_load_step(FastDDIMInverseScheduler, make_config(), t)
    for t, steps in zip((1, 10, 50), (10, 50, 500)):
        _check_save_load_step(FastDDIMScheduler, make_config(), t, num_inference_steps=steps, eta=0.0)
    for t, eta in zip((1, 10, 49), (0.0, 0.5, 1.0)):
        _check_save_load_step(FastDDIMScheduler, make_config(), t, eta=eta, generator_seed=0)


@pytest.mark.parametrize("scheduler_class", [FastDDIMScheduler, FastDDIMInverseScheduler])
def test_step_shape_and_outputs_equivalence(scheduler_class):
    scheduler = scheduler_class(**make_config())
    scheduler.set_timesteps(50)
    sample = torch.rand(4, 3, 8, 8)
    residual = 0.1 * sample
    out0 = scheduler.step(residual, 0, sample)
    out1 = scheduler.step(residual, 1, sample)
    assert out0.prev_sample.shape == sample.shape == out1.prev_sample.shape
    assert out0.pred_original_sample.shape == sample.shape
    as_tuple = scheduler.step(residual, 0, sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], out0.prev_sample) and torch.equal(as_tuple[1], out0.pred_original_sample)
    assert len(scheduler) == 1000 and scheduler.order == 1 and scheduler.init_noise_sigma == 1.0


# ---- config: keys, round trips, compatibles ------------------------------------------------------


@pytest.mark.parametrize("fast_class,upstream_class", [(FastDDIMScheduler, DDIMScheduler),
                                                       (FastDDIMInverseScheduler, DDIMInverseScheduler)])
def test_config_keys_and_defaults_match_diffusers(fast_class, upstream_class):
    fast, upstream = fast_class(), upstream_class()
    fast_config = {k: v for k, v in fast.config.items() if not k.startswith("_")}
    upstream_config = {k: v for k, v in upstream.config.items() if not k.startswith("_")}
    assert fast_config.pop("timestep_pairing") == "upstream"
    assert fast_config == upstream_config


def test_from_config_round_trips_with_diffusers(tmp_path, caplog):
    sd_config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)
    upstream = DDIMScheduler(**sd_config)
    fast = FastDDIMScheduler.from_config(upstream.config)
    for key, value in sd_config.items():
        assert fast.config[key] == value
    assert fast.config.timestep_pairing == "upstream"

    # An unknown key (timestep_pairing) must not break diffusers' from_config; it survives as a hidden key.
    fast_grid = FastDDIMScheduler.from_config(upstream.config, timestep_pairing="grid")
    back = DDIMScheduler.from_config(fast_grid.config)
    assert {k: back.config[k] for k in sd_config} == sd_config
    again = FastDDIMScheduler.from_config(back.config)
    assert again.config.timestep_pairing == "grid"

    fast_grid.save_pretrained(tmp_path)
    loaded = FastDDIMScheduler.from_pretrained(tmp_path)
    saved = dict(fast_grid.config)
    saved.pop("_use_default_values", None)
    assert saved == dict(loaded.config)
    assert DDIMScheduler.from_pretrained(tmp_path).config.steps_offset == 1

    inverse = FastDDIMInverseScheduler.from_config(DDIMInverseScheduler(**sd_config).config)
    assert inverse.config.set_alpha_to_one is False and inverse.config.steps_offset == 1


def test_compatibles():
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    assert set(FastDDIMScheduler._compatibles) == {e.name for e in KarrasDiffusionSchedulers}
    assert "DDIMScheduler" in FastDDIMScheduler._compatibles
    scheduler = FastDDIMScheduler(**make_config())
    compatibles = scheduler.compatibles
    assert DDIMScheduler in compatibles and all(c is not None for c in compatibles)
    for other in compatibles:
        try:
            converted = other.from_config(scheduler.config)
        except ImportError:  # a compatible class whose optional dependency is missing (torchsde)
            continue
        new = FastDDIMScheduler.from_config(converted.config)
        assert {k: v for k, v in new.config.items() if k in scheduler.config} == dict(scheduler.config)


def test_timestep_pairing_is_validated():
    with pytest.raises(ValueError, match="timestep_pairing"):
        FastDDIMScheduler(timestep_pairing="nearest")


# ---- public tensors --------------------------------------------------------------------------------

BUFFER_CONFIGS = [
    {},
    dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(1e-4, 2e-2, 50).tolist(), num_train_timesteps=50),
    dict(num_train_timesteps=333, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("config", BUFFER_CONFIGS)
def test_public_tensors_are_diffusers_exactly(config):
    for fast_class, upstream_class, alpha_name in [
        (FastDDIMScheduler, DDIMScheduler, "final_alpha_cumprod"),
        (FastDDIMInverseScheduler, DDIMInverseScheduler, "initial_alpha_cumprod"),
    ]:
        fast, upstream = fast_class(**config), upstream_class(**config)
        for name in ("betas", "alphas", "alphas_cumprod", alpha_name, "timesteps"):
            mine, theirs = getattr(fast, name), getattr(upstream, name)
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
            assert torch.equal(mine, theirs), f"{name} differs from diffusers' for {config}"
        spacings = ("leading", "trailing", "linspace") if fast_class is FastDDIMScheduler else ("leading", "trailing")
        for spacing, steps, offset in itertools.product(spacings, (1, 7, 10), (0, 1)):
            fast = fast_class(**config, timestep_spacing=spacing, steps_offset=offset)
            upstream = upstream_class(**config, timestep_spacing=spacing, steps_offset=offset)
            fast.set_timesteps(steps)
            upstream.set_timesteps(steps)
            assert fast.num_inference_steps == upstream.num_inference_steps == steps
            assert fast.timesteps.dtype == upstream.timesteps.dtype
            assert torch.equal(fast.timesteps, upstream.timesteps), (spacing, steps, offset)


def test_inverse_rejects_linspace_like_diffusers():
    scheduler = FastDDIMInverseScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="not supported"):
        scheduler.set_timesteps(10)


# ---- add_noise / get_velocity --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_get_velocity(dtype):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 5, 6, generator=gen).to(dtype)
    noise = torch.randn(3, 4, 5, 6, generator=gen).to(dtype)
    timesteps = torch.tensor([0, 517, 999])
    fast, upstream = FastDDIMScheduler(beta_schedule="scaled_linear"), DDIMScheduler(beta_schedule="scaled_linear")
    for name in ("add_noise", "get_velocity"):
        mine = getattr(fast, name)(x0, noise, timesteps)
        theirs = getattr(upstream, name)(x0, noise, timesteps)
        assert mine.dtype == theirs.dtype == dtype
        assert torch.equal(mine, theirs), name
    with pytest.raises(TypeError, match="timesteps"):
        fast.add_noise(x0, noise, [1, 2, 3])


# ---- thresholding, clipping, noise ----------------------------------------------------------------


def _random_step_inputs(seed, shape=(2, 3, 5, 7), guided=False):
    """(sample [B, ...], model_output [B, ...], or [2B, ...] = cat([uncond, cond]) when guided)."""
    gen = torch.Generator().manual_seed(seed)
    model_shape = (2 * shape[0], *shape[1:]) if guided else shape
    return torch.randn(shape, generator=gen) * 1.5, torch.randn(model_shape, generator=gen)


def _one_step_pair(config, timestep, eta=0.0, steps=10, **step_kwargs):
    sample, model_output = _random_step_inputs(timestep + 17)
    fast, upstream = FastDDIMScheduler(**config), DDIMScheduler(**config)
    fast.set_timesteps(steps)
    upstream.set_timesteps(steps)
    kwargs_a = dict(step_kwargs)
    kwargs_b = dict(step_kwargs)
    if "generator_seed" in step_kwargs:
        seed = kwargs_a.pop("generator_seed")
        kwargs_b.pop("generator_seed")
        kwargs_a["generator"] = torch.Generator().manual_seed(seed)
        kwargs_b["generator"] = torch.Generator().manual_seed(seed)
    mine = fast.step(model_output, timestep, sample, eta, **kwargs_a)
    theirs = upstream.step(model_output, timestep, sample, eta, **kwargs_b)
    return mine, theirs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_thresholding_and_clipping_match(prediction_type, use_clipped):
    configs = [
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
        dict(thresholding=True, sample_max_value=0.5),
        dict(clip_sample=True, clip_sample_range=0.7),
        dict(clip_sample=False),
    ]
    for overrides in configs:
        config = dict(prediction_type=prediction_type, **overrides)
        for t in (901, 501, 1):
            mine, theirs = _one_step_pair(config, t, use_clipped_model_output=use_clipped)
            assert_rel_close(mine.pred_original_sample, theirs.pred_original_sample, SAMPLER_RTOL, f"x0 {config}")
            assert_rel_close(mine.prev_sample, theirs.prev_sample, SAMPLER_RTOL, f"prev {config} t={t}")
    # The public helper equals diffusers' too.
    x0 = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(2)) * 3
    for max_value in (0.5, 2.0):
        fast = FastDDIMScheduler(thresholding=True, sample_max_value=max_value, dynamic_thresholding_ratio=0.9)
        upstream = DDIMScheduler(thresholding=True, sample_max_value=max_value, dynamic_thresholding_ratio=0.9)
        assert torch.equal(fast._threshold_sample(x0), upstream._threshold_sample(x0))
    # The threshold really clamps: |x0| <= 1 after dividing by s.
    mine, _ = _one_step_pair(dict(thresholding=True, sample_max_value=3.0), 901)
    assert mine.pred_original_sample.abs().max() <= 1.0 + 1e-6


def test_eta_noise_generator_and_variance_noise():
    for eta in (0.5, 1.0):
        mine, theirs = _one_step_pair({}, 501, eta=eta, generator_seed=5)
        assert_rel_close(mine.prev_sample, theirs.prev_sample, SAMPLER_RTOL, f"eta={eta} generator")
        # ... and the noise really was used: another seed gives another result.
        other, _ = _one_step_pair({}, 501, eta=eta, generator_seed=6)
        assert relative_error(other.prev_sample, mine.prev_sample) > 1e-3
    noise = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(9))
    mine, theirs = _one_step_pair({}, 301, eta=0.7, variance_noise=noise)
    assert_rel_close(mine.prev_sample, theirs.prev_sample, SAMPLER_RTOL, "variance_noise")
    # eta = 0 ignores variance_noise, like diffusers.
    mine, theirs = _one_step_pair({}, 301, eta=0.0, variance_noise=noise)
    quiet, _ = _one_step_pair({}, 301, eta=0.0)
    assert torch.equal(mine.prev_sample, quiet.prev_sample)
    assert_rel_close(mine.prev_sample, theirs.prev_sample, SAMPLER_RTOL, "eta 0 with variance_noise")
    with pytest.raises(ValueError, match="generator"):
        _one_step_pair({}, 301, eta=0.5, variance_noise=noise, generator_seed=1)
    # The global generator is drawn from exactly like diffusers draws from it.
    scheduler, upstream = FastDDIMScheduler(), DDIMScheduler()
    scheduler.set_timesteps(10)
    upstream.set_timesteps(10)
    sample, model_output = _random_step_inputs(1)
    torch.manual_seed(123)
    mine = scheduler.step(model_output, 501, sample, eta=1.0).prev_sample
    after_mine = torch.rand(1)
    torch.manual_seed(123)
    theirs = upstream.step(model_output, 501, sample, eta=1.0).prev_sample
    assert torch.equal(after_mine, torch.rand(1))
    assert_rel_close(mine, theirs, SAMPLER_RTOL, "global generator")


def test_timestep_forms_and_errors():
    scheduler = FastDDIMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output = _random_step_inputs(4)
    by_int = scheduler.step(model_output, 501, sample).prev_sample
    for form in (torch.tensor(501), torch.tensor([501]), np.int64(501), 501.0, torch.tensor(501, dtype=torch.int32)):
        assert torch.equal(scheduler.step(model_output, form, sample).prev_sample, by_int), repr(form)
    with pytest.raises(IndexError, match="timestep"):
        scheduler.step(model_output, 1000, sample)
    with pytest.raises(TypeError, match="timestep"):
        scheduler.step(model_output, "501", sample)
    with pytest.raises(ValueError, match="one value"):
        scheduler.step(model_output, torch.tensor([1, 2]), sample)
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(model_output, 501, sample.numpy())
    # The table for each eta is built once on the host and cached.
    scheduler.step(model_output, 501, sample, eta=0.5)
    scheduler.step(model_output, 401, sample, eta=0.5)
    assert sorted(key[0] for key in scheduler._tables) == [0.0, 0.5]


def test_strided_views_match_diffusers():
    """Sliced (gapped), expanded, permuted and channels-last inputs give diffusers' results."""
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(2, 8, 5, 6, generator=gen)
    model_full = torch.randn(2, 8, 5, 6, generator=gen)
    noise = torch.randn(2, 4, 5, 6, generator=gen)
    views = [
        (base[:, :4], model_full[:, 4:]),
        (base[:, :4].contiguous(), model_full[:1, :4].expand(2, 4, 5, 6)),
        (base[:, :4].contiguous().to(memory_format=torch.channels_last), model_full[:, :4].permute(0, 1, 3, 2).mT),
    ]
    for sample, model_output in views:
        for cls, eta in ((FastDDIMScheduler, 0.5), (DDIMScheduler, 0.5)):
            scheduler = cls(clip_sample=False)
            scheduler.set_timesteps(10)
            out = scheduler.step(model_output, 601, sample, eta, variance_noise=noise[:, :, :, :].mT.mT)
            if cls is FastDDIMScheduler:
                mine = out
            else:
                assert_rel_close(mine.prev_sample, out.prev_sample, SAMPLER_RTOL, "strided prev_sample")
                assert_rel_close(mine.pred_original_sample, out.pred_original_sample, SAMPLER_RTOL, "strided x0")


@pytest.mark.parametrize("guided", [False, True], ids=["nocfg", "cfg"])
def test_float64_latents_work_like_diffusers(guided):
    # diffusers steps float64 latents in float64: the drop-in chooses the PyTorch path itself (no backend
    # keyword exists on the scheduler) and gives diffusers' numbers.
    fast, upstream = FastDDIMScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    for s in (fast, upstream):
        s.set_timesteps(10)
    sample, model_output = (t.double() for t in _random_step_inputs(3, guided=guided))
    kwargs = dict(guidance_scale=5.0) if guided else {}
    mine = fast.step(model_output, 501, sample, 0.0, **kwargs)
    combined = model_output
    if guided:
        uncond, cond = model_output.chunk(2)
        combined = uncond + 5.0 * (cond - uncond)
    theirs = upstream.step(combined, 501, sample, 0.0)
    assert mine.prev_sample.dtype == torch.float64
    assert relative_error(mine.prev_sample, theirs.prev_sample) < 1e-14
    assert relative_error(mine.pred_original_sample, theirs.pred_original_sample) < 1e-14


def test_meta_tensors_work_like_diffusers():
    # Shape inference on meta tensors (what accelerate-style tooling does) runs through the op's fake kernel.
    for cls in (FastDDIMScheduler, DDIMScheduler):
        scheduler = cls()
        scheduler.set_timesteps(10)
        sample = torch.empty(2, 4, 8, 8, device="meta")
        out = scheduler.step(torch.empty(2, 4, 8, 8, device="meta"), 501, sample)
        assert out.prev_sample.device.type == "meta" and out.prev_sample.shape == sample.shape
    inverse = FastDDIMInverseScheduler()
    inverse.set_timesteps(10)
    out = inverse.step(torch.empty(1, 4, 8, 8, device="meta"), 501, torch.empty(1, 4, 8, 8, device="meta"))
    assert out.prev_sample.device.type == "meta"


@pytest.mark.parametrize("name, value, match", [
    ("eta", float("nan"), "eta must be finite"), ("eta", float("inf"), "eta must be finite"),
    ("eta", -1.0, "eta must be >= 0"), ("guidance_scale", float("nan"), "guidance_scale must be finite"),
    ("guidance_scale", float("-inf"), "guidance_scale must be finite"),
])
def test_non_finite_or_out_of_range_scalars_rejected(name, value, match):
    scheduler = FastDDIMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output = _random_step_inputs(2, guided=name == "guidance_scale")
    with pytest.raises(ValueError, match=f"FastDDIMScheduler.step: {match}"):
        scheduler.step(model_output, 501, sample, **{name: value})
    with pytest.raises(TypeError, match="guidance_scale must be a float or None, got bool"):
        scheduler.step(model_output, 501, sample, guidance_scale=True)
    inverse = FastDDIMInverseScheduler()
    inverse.set_timesteps(10)
    with pytest.raises(ValueError, match="FastDDIMInverseScheduler.step: guidance_scale must be finite"):
        inverse.step(torch.randn(4, 3, 4, 4), 501, torch.randn(2, 3, 4, 4), guidance_scale=float("nan"))


def test_fast_output_is_a_normal_ddim_scheduler_output():
    import copy
    import pickle

    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    scheduler = FastDDIMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output = _random_step_inputs(2)
    mine = scheduler.step(model_output, 501, sample)
    normal = DDIMSchedulerOutput(prev_sample=mine.prev_sample, pred_original_sample=mine.pred_original_sample)
    assert type(mine) is DDIMSchedulerOutput
    assert list(mine.keys()) == list(normal.keys()) == ["prev_sample", "pred_original_sample"]
    assert mine.__dict__.keys() == normal.__dict__.keys()
    assert mine[0] is normal[0] and mine["pred_original_sample"] is normal[1]
    assert all(a is b for a, b in zip(mine.to_tuple(), normal.to_tuple()))
    for clone in (copy.deepcopy(mine), pickle.loads(pickle.dumps(mine))):
        assert type(clone) is DDIMSchedulerOutput and torch.equal(clone.prev_sample, mine.prev_sample)
    mine.prev_sample = sample  # BaseOutput keeps item and attribute in step
    assert mine["prev_sample"] is sample


def test_isinstance_checks_of_pipelines_pass():
    # LEDITS++ and others dispatch on isinstance(scheduler, DDIMScheduler) / DDIMInverseScheduler.
    assert isinstance(FastDDIMScheduler(), DDIMScheduler)
    assert isinstance(FastDDIMInverseScheduler(), DDIMInverseScheduler)
    for name in ("set_begin_index", "begin_index", "step_index"):
        assert hasattr(FastDDIMScheduler(), name) == hasattr(DDIMScheduler(), name), name
    # Pipelines probe with hasattr: the public surface is diffusers' own, plus the documented graph_step.
    for mine, theirs, extras in ((FastDDIMScheduler(), DDIMScheduler(), {"graph_step"}),
                                 (FastDDIMInverseScheduler(), DDIMInverseScheduler(), set())):
        public = lambda obj: {n for n in dir(obj) if not n.startswith("_")}  # noqa: E731
        assert public(mine) - public(theirs) == extras and public(theirs) <= public(mine), type(mine).__name__


def test_fp16_step_close_to_diffusers():
    fast, upstream = FastDDIMScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    fast.set_timesteps(10)
    upstream.set_timesteps(10)
    sample, model_output = (t.half() for t in _random_step_inputs(8))
    mine = fast.step(model_output, 501, sample).prev_sample
    theirs = upstream.step(model_output.float(), 501, sample.float()).prev_sample
    assert mine.dtype == torch.float16
    assert_rel_close(mine, theirs, torch.float16, "fp16 step")


# ---- diffusers missing ------------------------------------------------------------------------------


def test_import_without_diffusers_then_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    spec = importlib.util.spec_from_file_location("ddim_fast._scheduler_without_diffusers",
                                                  sys.modules["ddim_fast.scheduler"].__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing works
    for cls in (module.FastDDIMScheduler, module.FastDDIMInverseScheduler):
        with pytest.raises(ImportError, match="pip install diffusers"):
            cls()
        with pytest.raises(ImportError, match="diffusers"):
            cls.from_config({})
        with pytest.raises(ImportError, match="diffusers"):
            cls.from_pretrained("nowhere")
    assert "DDIMScheduler" in module.FastDDIMScheduler._compatibles


# ==================================================================================================
# Part 2: side by side with diffusers over whole loops, every config combination
# ==================================================================================================


def _toy_model(weights: torch.Tensor):
    def model(sample, t):
        return 0.9 * torch.tanh(sample * (0.5 + 0.0005 * float(t)) + weights)

    return model


def _run_loops(config, num_inference_steps, eta, seed, shape=(2, 3, 4, 5)):
    """Both schedulers over a whole loop on the same inputs; returns per-step lists of (prev, x0) pairs."""
    gen = torch.Generator().manual_seed(seed)
    x_init = torch.randn(shape, generator=gen)
    model = _toy_model(torch.randn(shape, generator=gen))
    results = []
    for cls in (FastDDIMScheduler, DDIMScheduler):
        scheduler = cls(**config)
        scheduler.set_timesteps(num_inference_steps)
        noise_gen = torch.Generator().manual_seed(seed + 1)
        x, trace = x_init.clone(), []
        for t in scheduler.timesteps:
            out = scheduler.step(model(x, t), t, x, eta, generator=noise_gen if eta > 0 else None)
            x = out.prev_sample
            trace.append((out.prev_sample, out.pred_original_sample))
        results.append(trace)
    return results


SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_side_by_side_every_config(spacing, prediction_type):
    combos = itertools.product((0.0, 0.5, 1.0), ("none", "clip", "threshold"), (False, True), (False, True), (0, 1),
                               (10, 7))
    checked, skipped = 0, 0
    for eta, x0_mode, zero_snr, alpha_to_one, offset, steps in combos:
        if zero_snr and prediction_type == "epsilon" and spacing != "leading":
            skipped += 1
            continue  # these grids start at t = 999 where a_t = 0: x0 = (x - eps) / 0 is not finite upstream
        config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
                      prediction_type=prediction_type, clip_sample=x0_mode == "clip", clip_sample_range=1.3,
                      thresholding=x0_mode == "threshold", sample_max_value=2.0, rescale_betas_zero_snr=zero_snr,
                      set_alpha_to_one=alpha_to_one, steps_offset=offset)
        mine, theirs = _run_loops(config, steps, eta, seed=checked)
        what = f"{config} eta={eta} S={steps}"
        for k, ((prev_a, x0_a), (prev_b, x0_b)) in enumerate(zip(mine, theirs)):
            assert_rel_close(prev_a, prev_b, SAMPLER_RTOL, f"prev_sample step {k} {what}")
            assert_rel_close(x0_a, x0_b, SAMPLER_RTOL, f"pred_original_sample step {k} {what}")
        checked += 1
    assert checked + skipped == 144 and checked >= 72


@pytest.mark.parametrize("config", [{}, dict(prediction_type="v_prediction", clip_sample=False,
                                             timestep_spacing="trailing", set_alpha_to_one=False),
                                    dict(prediction_type="sample", rescale_betas_zero_snr=True, steps_offset=1,
                                         set_alpha_to_one=False),
                                    dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")])
def test_inverse_side_by_side(config):
    gen = torch.Generator().manual_seed(11)
    x_init = torch.randn(2, 3, 4, 5, generator=gen)
    model = _toy_model(torch.randn(2, 3, 4, 5, generator=gen))
    for steps in (10, 7):
        traces = []
        for cls in (FastDDIMInverseScheduler, DDIMInverseScheduler):
            scheduler = cls(**config)
            scheduler.set_timesteps(steps)
            x, trace = x_init.clone(), []
            for t in scheduler.timesteps:
                out = scheduler.step(model(x, t), t, x)
                x = out.prev_sample
                trace.append((out.prev_sample, out.pred_original_sample))
            traces.append(trace)
        for k, ((prev_a, x0_a), (prev_b, x0_b)) in enumerate(zip(*traces)):
            assert_rel_close(prev_a, prev_b, SAMPLER_RTOL, f"inverse prev step {k} {config} S={steps}")
            assert_rel_close(x0_a, x0_b, SAMPLER_RTOL, f"inverse x0 step {k} {config} S={steps}")


def _fp64_step(abar, x, m, t, a_prev):
    """The DDIM eps step in float64 from first principles, for checking the 'grid' pairing."""
    a = abar[t]
    x0 = (x - math.sqrt(1 - a) * m) / math.sqrt(a)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * m


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("trailing", 7), ("trailing", 10), ("leading", 7),
                                           ("leading", 10)])
def test_grid_pairing_differs_exactly_where_it_should(spacing, steps):
    config = dict(timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    upstream = FastDDIMScheduler(**config)
    grid = FastDDIMScheduler(**config, timestep_pairing="grid")
    for s in (upstream, grid):
        s.set_timesteps(steps)
    timesteps = upstream.timesteps.tolist()
    abar = upstream.alphas_cumprod.double()
    final = float(upstream.final_alpha_cumprod)
    sample, model_output = _random_step_inputs(steps)
    expected_grid_prev = schedule.previous_timesteps(np.array(timesteps), 1000, steps, "grid")
    assert np.array_equal(grid._row_prev_timestep[timesteps], expected_grid_prev)
    differing = 0
    for t, t_grid_prev in zip(timesteps, expected_grid_prev):
        a = upstream.step(model_output, t, sample).prev_sample
        b = grid.step(model_output, t, sample).prev_sample
        t_up_prev = t - 1000 // steps
        alpha_up = float(abar[t_up_prev]) if t_up_prev >= 0 else final
        alpha_grid = float(abar[t_grid_prev]) if t_grid_prev >= 0 else final
        expect = _fp64_step(abar, sample.double(), model_output.double(), t, alpha_grid)
        assert_rel_close(b, expect, SAMPLER_RTOL, f"grid pairing t={t}")
        if alpha_up == alpha_grid:
            assert torch.equal(a, b), f"t={t}: pairings agree on the target, results must be identical"
        else:
            differing += 1
            assert relative_error(a, b) > 1e-4, f"t={t}: the pairings target different alphas"
    # leading grids (and trailing ones when S divides T) are already consistent upstream.
    must_differ = spacing == "linspace" or (spacing == "trailing" and 1000 % steps != 0)
    assert (differing > 0) == must_differ, (spacing, steps, differing)


def test_inverse_grid_pairing():
    config = dict(timestep_spacing="trailing", clip_sample=False)
    up = FastDDIMInverseScheduler(**config)
    grid = FastDDIMInverseScheduler(**config, timestep_pairing="grid")
    for s in (up, grid):
        s.set_timesteps(7)
    timesteps = grid.timesteps.tolist()
    assert np.array_equal(grid._row_current_timestep[timesteps], [-1] + timesteps[:-1])
    assert not np.array_equal(up._row_current_timestep[timesteps], [-1] + timesteps[:-1])


@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("config", [dict(clip_sample=False), dict(prediction_type="v_prediction"),
                                    dict(thresholding=True, sample_max_value=2.0)])
def test_fused_guidance_equals_combine_then_step(config, eta):
    scale = 7.5
    scheduler = FastDDIMScheduler(**config)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(21)
    sample = torch.randn(2, 4, 6, 5, generator=gen)
    model_output_2b = torch.randn(4, 4, 6, 5, generator=gen)
    uncond, cond = model_output_2b.chunk(2)
    combined = uncond + scale * (cond - uncond)
    for t in scheduler.timesteps[::3]:
        fused = scheduler.step(model_output_2b, t, sample, eta, generator=torch.Generator().manual_seed(1),
                               guidance_scale=scale)
        plain = scheduler.step(combined, t, sample, eta, generator=torch.Generator().manual_seed(1))
        assert fused.prev_sample.shape == sample.shape
        assert_rel_close(fused.prev_sample, plain.prev_sample, 1e-6, f"fused guidance t={int(t)}")
        assert_rel_close(fused.pred_original_sample, plain.pred_original_sample, 1e-6, "fused guidance x0")
    inverse = FastDDIMInverseScheduler(clip_sample=False)
    inverse.set_timesteps(10)
    fused = inverse.step(model_output_2b, 201, sample, guidance_scale=scale).prev_sample
    assert_rel_close(fused, inverse.step(combined, 201, sample).prev_sample, 1e-6, "inverse fused guidance")
    with pytest.raises(ValueError, match="2B|batch"):
        scheduler.step(combined, 1, sample, guidance_scale=scale)
    with pytest.raises(TypeError, match="guidance_scale"):
        scheduler.step(model_output_2b, 1, sample, guidance_scale="7.5")


# ==================================================================================================
# CUDA: the loop must not synchronise the host
# ==================================================================================================


@requires_cuda
def test_cuda_loop_without_host_sync():
    device = torch.device("cuda")
    fast, upstream = FastDDIMScheduler(), DDIMScheduler()
    fast.set_timesteps(10, device=device)
    upstream.set_timesteps(10, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(device)
    model = _toy_model(torch.randn(2, 4, 8, 8, generator=gen).to(device))
    fast.step(model(x, 999), fast.timesteps[0], x)  # first call copies the table and builds the row views
    x_ref = x.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in fast.timesteps:
            x = fast.step(model(x, 500), t, x).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t in upstream.timesteps:
        x_ref = upstream.step(model(x_ref, 500), t, x_ref).prev_sample
    assert_rel_close(x, x_ref, SAMPLER_RTOL, "cuda loop")


# ==================================================================================================
# graph_step / graphed_denoise_loop: the captured whole step (eager twin on CPU)
# ==================================================================================================


class _ToyUNet(torch.nn.Module):
    """A diffusers-UNet-shaped callable, ``unet(x, t, encoder_hidden_states=..., return_dict=False)[0]``,
    nonlinear in x, t and the context, and graph-safe (t is read on the device, any shape [1] or [B])."""

    def __init__(self, channels: int = 4, context_dim: int = 6, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w_ctx = torch.nn.Parameter(torch.randn(channels, context_dim, generator=gen) * 0.5)
        self.w_mix = torch.nn.Parameter(torch.randn(channels, channels, generator=gen) * 0.4)

    def forward(self, x, t, encoder_hidden_states, return_dict=True):
        scale = (0.5 + 0.0005 * t.reshape(-1).to(x.dtype)).reshape(-1, 1, 1, 1)
        ctx = torch.tanh(encoder_hidden_states @ self.w_ctx.t()).mean(dim=1)[:, :, None, None]
        out = 0.9 * torch.tanh(torch.einsum("bchw,dc->bdhw", x, self.w_mix) * scale + ctx)
        return (out,) if not return_dict else {"sample": out}


GRAPH_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


def _diffusers_guided_loop(unet, latents, cond, steps, guidance_scale, eta, generator, config):
    """diffusers' pipeline loop: UNet on cat([x, x]), chunk, combine, DDIMScheduler.step."""
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, text = unet(torch.cat([x, x]), t, encoder_hidden_states=cond, return_dict=False)[0].chunk(2)
            x = scheduler.step(uncond + guidance_scale * (text - uncond), t, x, eta, generator=generator).prev_sample
    return x


def _graphed_loop_checks(device: torch.device):
    from ddim_fast.scheduler import graphed_denoise_loop

    unet = _ToyUNet().to(device)
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 4, 6, 5, generator=gen).to(device)
    cond = torch.randn(2, 3, 6, generator=gen).to(device)
    fast = FastDDIMScheduler(**GRAPH_CONFIG)
    for steps, eta in ((5, 0.0), (5, 0.7), (4, 0.7)):
        for _ in range(2):  # a pipeline sets the timesteps before every image: the graph must survive it
            fast.set_timesteps(steps, device=device)
            expected = _diffusers_guided_loop(unet, latents, cond, steps, 7.5, eta,
                                              torch.Generator(device=device).manual_seed(9), GRAPH_CONFIG)
            got = graphed_denoise_loop(fast, unet, latents, cond, guidance_scale=7.5, eta=eta,
                                       generator=torch.Generator(device=device).manual_seed(9))
            assert_rel_close(got, expected, SAMPLER_RTOL, f"graphed loop S={steps} eta={eta} on {device}")
            assert got.data_ptr() != latents.data_ptr()
    # one capture per (eta, S): set_timesteps did not throw the graphs away (cache of 2: one eviction)
    assert (fast._graph_runner.misses, fast._graph_runner.hits, fast._graph_runner.evictions) == (3, 3, 1)
    return fast, unet, latents, cond


def test_graphed_loop_survives_set_timesteps_and_matches_diffusers():
    _graphed_loop_checks(torch.device("cpu"))


@pytest.mark.parametrize("guidance_scale", [float("nan"), float("inf"), -float("inf")])
def test_graphed_loop_rejects_non_finite_guidance_before_any_work(guidance_scale):
    """Issue 21: pipe(guidance_scale=nan) silently turns guidance off in diffusers' pipelines (their `> 1` test);
    the fused guidance paths see the scale and refuse it: no UNet call, no draw from the generator, the graph
    cache untouched."""
    from ddim_fast.scheduler import graphed_denoise_loop

    calls = []
    unet = _ToyUNet()
    original = unet.forward
    unet.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    gen = torch.Generator().manual_seed(4)
    latents, cond = torch.randn(1, 4, 6, 5, generator=gen), torch.randn(2, 3, 6, generator=gen)
    fast = FastDDIMScheduler(**GRAPH_CONFIG)
    fast.set_timesteps(3)
    generator = torch.Generator().manual_seed(9)
    state = generator.get_state()
    with pytest.raises(ValueError, match=f"FastDDIMScheduler.graph_step: guidance_scale must be finite, got "
                                         f"{guidance_scale}"):
        graphed_denoise_loop(fast, unet, latents, cond, guidance_scale=guidance_scale, eta=0.7, generator=generator)
    with pytest.raises(ValueError, match="FastDDIMScheduler.step: guidance_scale must be finite"):
        fast.step(torch.randn(2, 4, 6, 5), fast.timesteps[0], latents, eta=0.7, generator=generator,
                  guidance_scale=guidance_scale)
    assert not calls and torch.equal(generator.get_state(), state)
    assert getattr(fast, "_graph_cache", None) is None


@requires_cuda
def test_graphed_loop_captured_on_cuda_without_host_sync():
    device = torch.device("cuda")
    fast, unet, latents, cond = _graphed_loop_checks(device)
    runners = [fast._graph_runner.get(k) for k in fast._graph_runner.keys()]
    assert runners and all(r.captured for r in runners)
    # replays alone never sync the host; and the graph equals the eager fused steps on the same device
    fast.set_timesteps(5, device=device)
    runner = fast.graph_step(unet, latents, cond, guidance_scale=7.5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            runner.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = latents
    with torch.no_grad():
        for t in fast.timesteps:
            x = fast.step(unet(torch.cat([x, x]), t, encoder_hidden_states=cond, return_dict=False)[0], t, x,
                          guidance_scale=7.5).prev_sample
    assert_rel_close(runner.static_inputs["x"], x, 1e-6, "graph vs eager fused steps (fp32)")
    assert int(runner.static_inputs["step"]) == 5
    # weights changed in place are read by the next replay (a LoRA merged into the same tensors)
    with torch.no_grad():
        unet.w_mix.mul_(1.3)
    fast.set_timesteps(5, device=device)
    expected = _diffusers_guided_loop(unet, latents, cond, 5, 7.5, 0.0, None, GRAPH_CONFIG)
    from ddim_fast.scheduler import graphed_denoise_loop

    assert_rel_close(graphed_denoise_loop(fast, unet, latents, cond, guidance_scale=7.5), expected, SAMPLER_RTOL,
                     "after an in-place weight update")
