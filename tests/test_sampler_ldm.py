"""FastDDIMSampler (ldm drop-in), ddim_fast.graphs and slerp.

The oracle is tests/ldm_oracle.py (an unfused restatement of ldm's DDIMSampler); the model is
tests/toy_ldm.py. "Same images for the same seed": fp32 final latents within conftest.SAMPLER_RTOL.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import SAMPLER_RTOL, requires_cuda  # noqa: E402
from ldm_oracle import OracleDDIM, oracle_timesteps  # noqa: E402
from toy_ldm import ToyLDM, make_conditioning  # noqa: E402

import ddim_fast  # noqa: E402
from ddim_fast import graphs  # noqa: E402
from ddim_fast import sampler as sampler_mod  # noqa: E402
from ddim_fast import sampler_step  # noqa: E402
from ddim_fast import schedule  # noqa: E402
from ddim_fast.reference import relative_error  # noqa: E402
from ddim_fast.sampler import FastDDIMSampler, slerp  # noqa: E402

SHAPE = (4, 6, 5)  # odd latent size on purpose
BATCH = 2


@pytest.fixture(scope="module")
def models():
    return {p: ToyLDM(parameterization=p) for p in ("eps", "v", "x0")}


@pytest.fixture(scope="module")
def conds():
    return make_conditioning(BATCH)


def _assert_close(out, ref, what, tol=SAMPLER_RTOL):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


def _run_pair(model, seed=0, fast_kwargs=None, oracle_kwargs=None, **kwargs):
    """Run the oracle and the fast sampler from the same global seed; returns both (samples, inter)."""
    fast = FastDDIMSampler(model, **(fast_kwargs or {}))
    oracle = OracleDDIM(model, **(oracle_kwargs or {}))
    S = kwargs.pop("S", 10)
    torch.manual_seed(seed)
    ref = oracle.sample(S, BATCH, SHAPE, **kwargs)
    torch.manual_seed(seed)
    out = fast.sample(S, BATCH, SHAPE, verbose=False, **kwargs)
    return out, ref


def _assert_runs_equal(out, ref, what):
    (x, inter), (x_ref, inter_ref) = out, ref
    err = _assert_close(x, x_ref, f"{what} samples")
    for key in ("x_inter", "pred_x0"):
        assert len(inter[key]) == len(inter_ref[key]), f"{what}: {key} count {len(inter[key])} != {len(inter_ref[key])}"
        for j, (a, b) in enumerate(zip(inter[key], inter_ref[key])):
            _assert_close(a, b, f"{what} {key}[{j}]")
    return err


# --------------------------------------------------------------------------------------------------
# Same images as upstream
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_oracle(models, conds, param, scale, eta):
    c, uc = conds
    out, ref = _run_pair(models[param], conditioning=c, unconditional_conditioning=uc,
                         unconditional_guidance_scale=scale, eta=eta, log_every_t=3)
    _assert_runs_equal(out, ref, f"{param} scale={scale} eta={eta}")


def test_cfg_changes_the_result(models, conds):
    """Guards the test above: guidance must matter on the toy model, or CFG bugs would go unseen."""
    c, uc = conds
    fast = FastDDIMSampler(models["eps"])
    x_T = torch.randn(BATCH, *SHAPE)
    a, _ = fast.sample(5, BATCH, SHAPE, conditioning=c, x_T=x_T, verbose=False)
    b, _ = fast.sample(5, BATCH, SHAPE, conditioning=c, unconditional_conditioning=uc,
                       unconditional_guidance_scale=7.5, x_T=x_T, verbose=False)
    assert relative_error(a, b) > 1e-2


def test_two_consecutive_calls_with_random_start(models, conds):
    c, uc = conds
    model = models["eps"]
    fast, oracle = FastDDIMSampler(model), OracleDDIM(model)
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=5.0, eta=0.0)
    torch.manual_seed(3)
    ref1, ref2 = oracle.sample(8, BATCH, SHAPE, **kw)[0], oracle.sample(8, BATCH, SHAPE, **kw)[0]
    torch.manual_seed(3)
    out1, out2 = fast.sample(8, BATCH, SHAPE, verbose=False, **kw)[0], fast.sample(8, BATCH, SHAPE, verbose=False, **kw)[0]
    _assert_close(out1, ref1, "first call")
    _assert_close(out2, ref2, "second call")
    assert relative_error(out1, out2) > 1e-2  # the second call really started from new noise


def test_callbacks_and_intermediates(models, conds):
    c, uc = conds
    calls = {"fast": [], "ref": []}

    def recorder(name):
        return (lambda i: calls[name].append(("cb", i)),
                lambda x0, i: calls[name].append(("img", i, x0.clone())))

    model = models["eps"]
    fast, oracle = FastDDIMSampler(model), OracleDDIM(model)
    cb, icb = recorder("ref")
    torch.manual_seed(1)
    ref = oracle.sample(9, BATCH, SHAPE, conditioning=c, callback=cb, img_callback=icb, log_every_t=4, eta=0.3)
    cb, icb = recorder("fast")
    torch.manual_seed(1)
    out = fast.sample(9, BATCH, SHAPE, conditioning=c, callback=cb, img_callback=icb, log_every_t=4, eta=0.3,
                      verbose=False)
    _assert_runs_equal(out, ref, "callbacks")
    assert [e[:2] for e in calls["fast"]] == [e[:2] for e in calls["ref"]]
    assert len(calls["fast"]) == 2 * 9
    for a, b in zip(calls["fast"], calls["ref"]):
        if a[0] == "img":
            _assert_close(a[2], b[2], f"img_callback pred_x0 at step {a[1]}")


@pytest.mark.parametrize("case", [
    "quantize_x0", "mask", "temperature", "noise_dropout", "score_corrector", "x_T", "ucg_schedule",
    "dynamic_threshold", "dict_cond", "dict_list_cond", "list_cond", "no_cond_uc",
])
def test_every_keyword(models, conds, case):
    c, uc = conds
    model = models["eps"]
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=3.0, eta=0.5,
              log_every_t=2, S=5)
    gen = torch.Generator().manual_seed(11)
    if case == "quantize_x0":
        kw["quantize_x0"] = True
    elif case == "mask":
        mask = torch.zeros(BATCH, 1, *SHAPE[1:])
        mask[..., :3, :] = 1.0
        kw.update(mask=mask, x0=torch.randn(BATCH, *SHAPE, generator=gen))
    elif case == "temperature":
        kw["temperature"] = 0.7
    elif case == "noise_dropout":
        kw["noise_dropout"] = 0.3
    elif case == "score_corrector":
        class Corrector:
            def modify_score(self, model_, e_t, x, t, cond, scale=1.0):
                return e_t * scale + 0.05 * torch.tanh(x)
        kw.update(score_corrector=Corrector(), corrector_kwargs={"scale": 0.9})
    elif case == "x_T":
        kw["x_T"] = torch.randn(BATCH, *SHAPE, generator=gen)
    elif case == "ucg_schedule":
        kw["ucg_schedule"] = [1.0, 4.0, 4.0, 1.0, 6.0]
    elif case == "dynamic_threshold":
        kw["dynamic_threshold"] = 0.9
    elif case == "dict_cond":
        kw.update(conditioning={"c_crossattn": c}, unconditional_conditioning={"c_crossattn": uc})
    elif case == "dict_list_cond":
        concat = torch.randn(BATCH, *SHAPE, generator=gen)
        kw.update(conditioning={"c_crossattn": [c], "c_concat": [concat]},
                  unconditional_conditioning={"c_crossattn": [uc], "c_concat": [concat]})
    elif case == "list_cond":
        kw.update(conditioning=[c, c * 0.5], unconditional_conditioning=[uc, uc])
    elif case == "no_cond_uc":
        kw.update(unconditional_conditioning=None)
    out, ref = _run_pair(model, seed=5, **kw)
    _assert_runs_equal(out, ref, case)
    if case == "dynamic_threshold":
        assert all(p.abs().max() <= 1.0 + 1e-6 for p in out[1]["pred_x0"][1:])


def test_x0_parameterization(models, conds):
    c, uc = conds
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=2.0, eta=0.5)
    out, ref = _run_pair(models["x0"], **kw)
    _assert_runs_equal(out, ref, "x0 (sample prediction)")
    legacy, legacy_ref = _run_pair(models["x0"], fast_kwargs={"legacy_x0_as_eps": True},
                                   oracle_kwargs={"legacy_x0_as_eps": True}, **kw)
    _assert_runs_equal(legacy, legacy_ref, "x0 legacy (treated as eps)")
    assert relative_error(out[0], legacy[0]) > 1e-2


@pytest.mark.parametrize("S,steps", [(7, 8), (3, 3), (13, 14), (9, 9)])
def test_steps_not_dividing_T(models, conds, S, steps):
    c, _ = conds
    fast = FastDDIMSampler(models["eps"])
    fast.make_schedule(S, verbose=False)
    assert len(fast.ddim_timesteps) == steps
    np.testing.assert_array_equal(fast.ddim_timesteps, oracle_timesteps(S, 1000))
    assert fast.ddim_timesteps.max() < 1000
    out, ref = _run_pair(models["eps"], S=S, conditioning=c, eta=0.2, log_every_t=3)
    _assert_runs_equal(out, ref, f"S={S}")


def test_schedule_attributes_match_upstream_types(models):
    model = models["eps"]
    fast, oracle = FastDDIMSampler(model), OracleDDIM(model)
    fast.make_schedule(25, ddim_eta=0.4, verbose=False)
    oracle.make_schedule(25, eta=0.4)
    for name in ("ddim_alphas", "ddim_sigmas", "ddim_sqrt_one_minus_alphas", "ddim_sigmas_for_original_num_steps"):
        a, b = getattr(fast, name), getattr(oracle, name)
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.device == b.device, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert isinstance(fast.ddim_alphas_prev, np.ndarray) and fast.ddim_alphas_prev.dtype == np.float64
    np.testing.assert_array_equal(fast.ddim_alphas_prev, oracle.ddim_alphas_prev)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod"):
        assert getattr(fast, name).dtype == torch.float32, name
    assert fast.device == model.betas.device


def test_use_original_steps_and_timesteps_subset(models, conds):
    c, uc = conds
    model = models["eps"]
    fast, oracle = FastDDIMSampler(model), OracleDDIM(model)
    fast.make_schedule(10, ddim_eta=0.6, verbose=False)
    oracle.make_schedule(10, eta=0.6)
    kw = dict(unconditional_conditioning=uc, unconditional_guidance_scale=2.0, log_every_t=40)
    for extra in ({"ddim_use_original_steps": True, "timesteps": 120}, {"timesteps": 6}):
        torch.manual_seed(2)
        ref = oracle.ddim_sampling(c, (BATCH, *SHAPE), use_original_steps=extra.get("ddim_use_original_steps", False),
                                   timesteps=extra["timesteps"], **kw)
        torch.manual_seed(2)
        out = fast.ddim_sampling(c, (BATCH, *SHAPE), **extra, **kw)
        _assert_runs_equal(out, ref, f"ddim_sampling {extra}")


def test_p_sample_ddim_single_step(models, conds):
    c, uc = conds
    model = models["v"]
    fast, oracle = FastDDIMSampler(model), OracleDDIM(model)
    fast.make_schedule(10, ddim_eta=0.8, verbose=False)
    oracle.make_schedule(10, eta=0.8)
    x = torch.randn(BATCH, *SHAPE)
    t = torch.full((BATCH,), int(fast.ddim_timesteps[6]), dtype=torch.long)
    for repeat in (False, True):
        torch.manual_seed(4)
        ref = oracle.p_sample_ddim(x, c, t, 6, repeat_noise=repeat, unconditional_conditioning=uc,
                                   unconditional_guidance_scale=4.0)
        torch.manual_seed(4)
        out = fast.p_sample_ddim(x, c, t, 6, repeat_noise=repeat, unconditional_conditioning=uc,
                                 unconditional_guidance_scale=4.0)
        _assert_close(out[0], ref[0], f"x_prev repeat={repeat}")
        _assert_close(out[1], ref[1], f"pred_x0 repeat={repeat}")


def test_decode_stochastic_encode_and_encode_match_oracle(models, conds):
    c, uc = conds
    model = models["eps"]
    fast, oracle = FastDDIMSampler(model), OracleDDIM(model)
    fast.make_schedule(12, ddim_eta=0.0, verbose=False)
    oracle.make_schedule(12, eta=0.0)
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(BATCH, *SHAPE, generator=gen)
    t_idx = torch.tensor([7, 7])
    noise = torch.randn(BATCH, *SHAPE, generator=gen)
    z = fast.stochastic_encode(x0, t_idx, noise=noise)
    _assert_close(z, oracle.stochastic_encode(x0, t_idx, noise=noise), "stochastic_encode")
    _assert_close(fast.stochastic_encode(x0, t_idx, use_original_steps=True, noise=noise),
                  oracle.stochastic_encode(x0, t_idx, use_original_steps=True, noise=noise), "stochastic_encode T")
    seen = []
    torch.manual_seed(6)
    ref = oracle.decode(z, c, 8, unconditional_guidance_scale=3.0, unconditional_conditioning=uc)
    torch.manual_seed(6)
    out = fast.decode(z, c, 8, unconditional_guidance_scale=3.0, unconditional_conditioning=uc,
                      callback=seen.append)
    _assert_close(out, ref, "decode")
    assert seen == list(range(8))
    for legacy in (False, True):
        for scale in (1.0, 2.5):
            ref = oracle.encode(x0, c, 9, unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                legacy_encode_timesteps=legacy)
            out, info = fast.encode(x0, c, 9, unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                    legacy_encode_timesteps=legacy, return_intermediates=3)
            _assert_close(out, ref, f"encode legacy={legacy} scale={scale}")
            assert info["x_encoded"] is out and info["intermediate_steps"] == [0, 3, 6, 7, 8]
            assert len(info["intermediates"]) == 5


def test_encode_decode_round_trip(models, conds):
    """DDIM inversion then reconstruction recovers the input (eta = 0, no guidance). Inversion evaluates
    the model one grid point ahead of x, so the error is first order in the step: on the toy model it is
    5.0e-2 relative at S = 50 and halves when S doubles (2.6e-2 at S = 100)."""
    c, _ = conds
    gen = torch.Generator().manual_seed(21)
    x0 = torch.randn(BATCH, *SHAPE, generator=gen) * 0.8
    errors = {}
    for S in (50, 100):
        fast = FastDDIMSampler(models["eps"])
        fast.make_schedule(S, ddim_eta=0.0, verbose=False)
        z, _ = fast.encode(x0, c, S)
        assert relative_error(z, x0) > 0.5  # really went to noise
        errors[S] = relative_error(fast.decode(z, c, S), x0)
    assert errors[50] < 0.06, f"round trip relative error {errors[50]:.3e} at S=50"
    assert errors[100] < 0.6 * errors[50], f"no first-order convergence: {errors}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encode_runs_through_the_shared_step_executor_and_its_graph_path(models, conds, dtype):
    """encode (DDIM inversion) steps through the sampling loop's step executor: with cuda_graph=True its steps
    go through the graph runner (the static-buffer step, eager on CPU; a half-precision first step eagerly)
    and give the eager results bit for bit, intermediates being snapshots rather than the static buffer."""
    c, uc = conds
    # half latents: a model answering in fp32 promotes x at the first step, which then runs eagerly
    model = models["v"] if dtype == torch.float32 else _Fp32Output(models["v"])
    eager, graphed = FastDDIMSampler(model), FastDDIMSampler(model, cuda_graph=True)
    for sampler in (eager, graphed):
        sampler.make_schedule(8, verbose=False)
    x0 = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(8)).to(dtype)
    kw = dict(unconditional_guidance_scale=3.0, unconditional_conditioning=uc, return_intermediates=3)
    ref, ref_out = eager.encode(x0, c, 8, **kw)
    for run in range(2):
        out, out_d = graphed.encode(x0, c, 8, **kw)
        assert out.dtype == ref.dtype and torch.equal(out, ref), f"run {run}"
        assert out_d["intermediate_steps"] == ref_out["intermediate_steps"]
        for a, b in zip(out_d["intermediates"], ref_out["intermediates"], strict=True):
            assert torch.equal(a, b)
        assert len({t.data_ptr() for t in out_d["intermediates"] + [out]}) == len(out_d["intermediates"]) + 1
    assert (graphed.graph_cache.misses, graphed.graph_cache.hits) == (1, 1)
    assert len(eager.graph_cache) == 0


def test_use_original_steps_eta1_is_ddpm_ancestral_sampling(models):
    """eta = 1 over all T steps without clipping is DDPM's ancestral sampler: same noise draws, same
    result as a DDPM posterior-sampling loop (posterior mean coefficients, variance beta~_t)."""
    model = models["eps"]
    T = model.num_timesteps
    fast = FastDDIMSampler(model)
    fast.make_schedule(10, ddim_eta=1.0, verbose=False)
    shape = (1, 4, 3, 3)
    c, _ = make_conditioning(1)
    torch.manual_seed(8)
    out, _ = fast.ddim_sampling(c, shape, ddim_use_original_steps=True, log_every_t=T)

    coef1 = model.posterior_mean_coef1.double()
    coef2 = model.posterior_mean_coef2.double()
    var = model.posterior_variance.double()
    sqrt_a = model.alphas_cumprod.double().sqrt()
    sqrt_1m = (1 - model.alphas_cumprod.double()).sqrt()
    torch.manual_seed(8)
    x = torch.randn(shape)
    x64 = x.double()
    for t in reversed(range(T)):
        tt = torch.full((1,), t, dtype=torch.long)
        eps = model.apply_model(x64.float(), tt, c).double()
        x0 = (x64 - sqrt_1m[t] * eps) / sqrt_a[t]
        mean = coef1[t] * x0 + coef2[t] * x64
        z = torch.randn(shape).double()
        x64 = mean + (var[t].sqrt() * z if t > 0 else 0.0)
    _assert_close(out, x64.float(), "DDPM equivalence")  # measured 2.1e-6


# --------------------------------------------------------------------------------------------------
# Noise modes
# --------------------------------------------------------------------------------------------------


def test_philox_mode_is_deterministic_and_normal(models, conds):
    c, _ = conds
    model = models["eps"]
    fast = FastDDIMSampler(model, noise_mode="philox")
    x_T = torch.randn(BATCH, *SHAPE)

    def run(seed, **kw):
        return fast.sample(4, BATCH, SHAPE, conditioning=c, x_T=x_T, eta=1.0, verbose=False,
                           generator=torch.Generator().manual_seed(seed), **kw)[0]

    a, b, other = run(1), run(1), run(2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert relative_error(a, other) > 1e-3

    # One step on a large latent: (x_prev(T=1) - x_prev(T=0)) / sigma is the drawn noise.
    fast.make_schedule(10, ddim_eta=1.0, verbose=False)
    x = torch.randn(1, 4, 64, 64)
    t = torch.full((1,), int(fast.ddim_timesteps[5]), dtype=torch.long)
    cond1 = c[:1]
    sigma = float(fast.ddim_sigmas[5])

    def one(temperature, seed):
        torch.manual_seed(seed)
        return fast.p_sample_ddim(x, cond1, t, 5, temperature=temperature)[0]

    z = ((one(1.0, 3) - one(0.0, 3)) / sigma).double()
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03
    assert abs(((z.abs() < 1).double().mean() - 0.6827).item()) < 0.02
    # nothing is drawn from the global generator at eta = 0 in philox mode
    state = torch.get_rng_state()
    fast.sample(3, BATCH, SHAPE, conditioning=c, x_T=x_T, eta=0.0, verbose=False)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("noise_mode", ["torch", "philox"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph-path"])
def test_one_generator_per_sample_makes_samples_independent_of_the_batch(models, conds, noise_mode, cuda_graph):
    # generate on torch.distributed relies on this: sample i's x_T and step noise come from its own generator,
    # so it is the same image as row 0 of a batch of 1 or row 2 of a batch of 4.
    c = make_conditioning(4)[0]
    # The model runs one sample at a time, so its own rounding cannot depend on the batch (a batched einsum's
    # can): what is tested is that the sampler's random draws do not.
    fast = FastDDIMSampler(_PerSampleModel(models["eps"]), noise_mode=noise_mode, cuda_graph=cuda_graph)

    def run(seeds, rows):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return fast.sample(4, len(seeds), SHAPE, conditioning=c[rows], eta=1.0, verbose=False, generator=gens)[0]

    batch = run([10, 11, 12, 13], [0, 1, 2, 3])
    alone = run([12], [2])
    pair = run([13, 10], [3, 0])
    assert torch.equal(alone[0], batch[2])
    assert torch.equal(pair[0], batch[3]) and torch.equal(pair[1], batch[0])
    state = torch.get_rng_state()
    run([1, 2], [0, 1])
    assert torch.equal(state, torch.get_rng_state()), "the global RNG was drawn from"
    with pytest.raises(ValueError, match="list of 2 \\(one per sample\\), got a list of 3"):
        fast.sample(4, 2, SHAPE, conditioning=c[:2], verbose=False,
                    generator=[torch.Generator() for _ in range(3)])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fast.sample(4, 2, SHAPE, conditioning=c[:2], verbose=False, generator=7)


def test_torch_mode_draws_noise_even_at_eta0(models, conds):
    c, _ = conds
    fast = FastDDIMSampler(models["eps"])
    x_T = torch.randn(BATCH, *SHAPE)
    torch.manual_seed(0)
    fast.sample(5, BATCH, SHAPE, conditioning=c, x_T=x_T, eta=0.0, verbose=False)
    after = torch.randn(3)
    torch.manual_seed(0)
    for _ in range(5):
        torch.randn(BATCH, *SHAPE)
    torch.testing.assert_close(after, torch.randn(3), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# One fused launch per step, no host sync
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_one_fused_op_per_step_and_no_host_sync(models, conds, monkeypatch, cuda_graph):
    c, uc = conds
    model = models["v"]
    fast = FastDDIMSampler(model, cuda_graph=cuda_graph)
    op_calls = []
    real_step = sampler_mod._ops.ddim_step

    def counting_step(*args, **kwargs):
        op_calls.append(kwargs.get("return_pred_x0", False) or kwargs.get("pred_x0_out") is not None)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sampler_mod._ops, "ddim_step", counting_step)
    syncs = []
    real_loop = sampler_step.sampling_loop

    def watched_loop(*args, **kwargs):
        patched = {}
        for name in ("item", "__bool__", "tolist", "__int__", "__float__", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)
            patched[name] = original

            def make(nm, orig):
                def wrapper(t, *a, **k):
                    syncs.append(nm)
                    return orig(t, *a, **k)
                return wrapper
            setattr(torch.Tensor, name, make(name, original))
        try:
            return real_loop(*args, **kwargs)
        finally:
            for name, original in patched.items():
                setattr(torch.Tensor, name, original)

    monkeypatch.setattr(sampler_step, "sampling_loop", watched_loop)
    calls_before = model.apply_model_calls
    steps = 5
    x_T = torch.randn(BATCH, *SHAPE)
    fast.sample(steps, BATCH, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=6.0,
                eta=0.5, x_T=x_T, log_every_t=100, verbose=False)
    assert syncs == [], f"host syncs in the loop: {syncs}"
    assert len(op_calls) == steps, f"{len(op_calls)} ddim_step calls for {steps} steps"
    # pred_x0 asked for only at logged steps (first and last) in eager mode
    if not cuda_graph:
        assert sum(op_calls) == 2
    assert model.apply_model_calls - calls_before == steps
    # the guard can fail: a .item() in the loop is seen
    monkeypatch.setattr(model, "apply_model", lambda x, t, cc, _m=model.apply_model: (t.sum().item(), _m(x, t, cc))[1])
    fast.sample(2, BATCH, SHAPE, conditioning=c, x_T=x_T, verbose=False)
    assert "item" in syncs


# --------------------------------------------------------------------------------------------------
# CUDA graphs: the generic helpers, the CPU fallback, the cache, and (on a GPU) the captured loop
# --------------------------------------------------------------------------------------------------


def test_graph_helpers_signature_static_and_copy():
    tree = {"x": torch.randn(2, 3), "c": [torch.ones(4), torch.zeros(1)], "s": 2.5, "n": None}
    static = graphs.make_static(tree)
    assert graphs.tree_signature(static) == graphs.tree_signature(tree)
    assert static["x"] is not tree["x"] and torch.equal(static["x"], tree["x"])
    assert graphs.tree_signature({**tree, "s": 3.0}) != graphs.tree_signature(tree)
    assert graphs.tree_signature({**tree, "x": torch.randn(2, 4)}) != graphs.tree_signature(tree)
    assert graphs.tree_signature({**tree, "x": torch.randn(3, 2).t()}) != graphs.tree_signature(tree)
    new = {"x": torch.randn(2, 3), "c": [torch.full((4,), 7.0), torch.ones(1)], "s": 2.5, "n": None}
    graphs.copy_into(static, new)
    assert torch.equal(static["c"][0], new["c"][0]) and torch.equal(static["x"], new["x"])
    with pytest.raises(ValueError, match="shape"):
        graphs.copy_into(static, {**new, "x": torch.randn(3, 3)})
    with pytest.raises(ValueError, match="structure"):
        graphs.copy_into(static, {"x": new["x"]})
    with pytest.raises(ValueError, match="differs"):
        graphs.copy_into(static, {**new, "s": 1.0})
    with pytest.raises(TypeError):
        graphs.tree_signature({"bad": object()})
    assert len(graphs.tree_tensors(static)) == 3


def test_graph_runner_lru_and_refill():
    """GraphRunner: a miss captures (eagerly on CPU) over static copies, a hit refills them from the values,
    the least recently used entry goes first, and fn is only used on a miss."""
    runner = graphs.GraphRunner(2)
    made = []

    def fn_for(key):
        def fn(s):
            made.append(key)
            s["x"].add_(1.0)
        return fn

    steps = {}
    for key in ("a", "b", "a", "c", "b"):
        values = {"x": torch.full((2,), float(ord(key)))}
        steps.setdefault(key, []).append(runner.prepare(key, values, fn_for(key)))
        assert torch.equal(steps[key][-1].static_inputs["x"], values["x"])  # loaded with this call's values
        assert steps[key][-1].static_inputs["x"] is not values["x"]
    assert steps["a"][0] is steps["a"][1] and steps["b"][0] is not steps["b"][1]  # b was evicted, then rebuilt
    assert (runner.hits, runner.misses, runner.evictions) == (1, 4, 2)
    assert runner.keys() == ["c", "b"] and runner.get("a") is None and len(runner) == 2
    steps["b"][1].replay()
    assert made == ["b"] and torch.equal(steps["b"][1].static_inputs["x"], torch.full((2,), ord("b") + 1.0))
    with pytest.raises(ValueError):
        graphs.GraphRunner(0)
    runner.clear()
    assert len(runner) == 0


def test_make_step_falls_back_to_eager_on_cpu(caplog):
    static = graphs.make_static({"x": torch.zeros(3), "step": torch.zeros(1, dtype=torch.int64)})

    def fn(s):
        s["x"].add_(s["step"].double().float())
        s["step"].add_(1)

    graphs._LOGGED.discard("nocuda-cpu")
    with caplog.at_level(logging.INFO, logger="ddim_fast.graphs"):
        runner = graphs.make_step(fn, static).capture()
        graphs.make_step(fn, static)
    assert isinstance(runner, graphs.EagerStep) and not runner.captured
    assert sum("CUDA graphs need a CUDA device" in r.message for r in caplog.records) == 1
    for _ in range(3):
        runner.replay()
    torch.testing.assert_close(static["x"], torch.full((3,), 3.0))
    assert runner.replays == 3
    with pytest.raises(ValueError, match="CUDA tensor"):
        graphs.CapturedStep(fn, static)


def test_capture_step_falls_back_to_eager_when_capture_fails(monkeypatch, caplog):
    """A GraphCaptureError from capture() gives an EagerStep over the same static inputs, with a warning
    each time; fallback=False re-raises. (The capture itself needs a GPU: see the requires_cuda tests.)"""
    static = graphs.make_static({"x": torch.zeros(3)})

    def fn(s):
        s["x"].add_(1.0)

    class FailingCapture:
        def capture(self):
            raise graphs.GraphCaptureError("CUDA graph capture of the step failed: no") from RuntimeError("no")

    monkeypatch.setattr(graphs, "make_step", lambda *a, **k: FailingCapture())
    with caplog.at_level(logging.WARNING, logger="ddim_fast.graphs"):
        runner = graphs.capture_step(fn, static)
        graphs.capture_step(fn, static)
    assert isinstance(runner, graphs.EagerStep) and runner.static_inputs is static
    assert sum("running the step eagerly" in r.message for r in caplog.records) == 2
    runner.replay()
    torch.testing.assert_close(static["x"], torch.ones(3))
    with pytest.raises(graphs.GraphCaptureError):
        graphs.capture_step(fn, static, fallback=False)
    assert graphs.GraphPools().pool("cpu") is None


def test_graph_path_on_cpu_matches_eager_and_reuses_cache(models, conds):
    c, uc = conds
    model = models["eps"]
    eager = FastDDIMSampler(model)
    graphed = FastDDIMSampler(model, cuda_graph=True, graph_cache_size=2)
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=4.0, eta=0.7,
              log_every_t=3, verbose=False)
    for run in range(2):
        torch.manual_seed(run)
        ref = eager.sample(6, BATCH, SHAPE, **kw)
        torch.manual_seed(run)
        out = graphed.sample(6, BATCH, SHAPE, **kw)
        _assert_runs_equal(out, ref, f"graph fallback run {run}")
    assert graphed.graph_cache.misses == 1 and graphed.graph_cache.hits == 1
    # intermediates are snapshots, not views of the static buffer
    assert out[1]["x_inter"][1].data_ptr() != out[1]["x_inter"][2].data_ptr()
    # ucg_schedule switches between runners, carrying x and the step index across
    torch.manual_seed(5)
    ref = eager.sample(4, BATCH, SHAPE, ucg_schedule=[2.0, 1.0, 2.0, 3.0], **kw)
    torch.manual_seed(5)
    out = graphed.sample(4, BATCH, SHAPE, ucg_schedule=[2.0, 1.0, 2.0, 3.0], **kw)
    _assert_runs_equal(out, ref, "graph fallback ucg_schedule")
    assert len(graphed.graph_cache) == 2 and graphed.graph_cache.evictions >= 1
    # a new batch size is a new entry
    torch.manual_seed(0)
    graphed.sample(3, 1, SHAPE, conditioning=c[:1], verbose=False)
    assert graphed.graph_cache.misses >= 4


class _ModelWrapper(torch.nn.Module):
    """Wraps a toy ldm model, delegating every attribute the sampler reads to it; subclasses change
    apply_model."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class _PerSampleModel(_ModelWrapper):
    """The wrapped model applied to each sample alone (batch-invariant results by construction)."""

    def apply_model(self, x, t, cond):
        return torch.cat([self.inner.apply_model(x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(x.shape[0])])


class _Fp32Output(_ModelWrapper):
    """A model that answers in fp32 whatever the latents' dtype (or, with ``same_dtype``, in their dtype)."""

    def __init__(self, model, same_dtype=False):
        super().__init__(model)
        self.same_dtype = same_dtype


    def apply_model(self, x, t, cond):
        out = self.inner.apply_model(x.float(), t, cond)
        return out.to(x.dtype) if self.same_dtype else out


@pytest.mark.parametrize("same_dtype", [False, True], ids=["fp32-output", "same-dtype-output"])
def test_graph_path_half_latents_follow_type_promotion(models, conds, same_dtype):
    """fp16 latents + fp32 model output: the first step promotes x to fp32 (as upstream, and as the eager
    loop does); the static-buffer path must give the same dtype and the same numbers."""
    c, uc = conds
    model = _Fp32Output(models["eps"], same_dtype)
    x_T = torch.randn(BATCH, *SHAPE).half()
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=3.0, x_T=x_T, eta=0.5,
              log_every_t=2, verbose=False)
    torch.manual_seed(0)
    ref = FastDDIMSampler(model).sample(4, BATCH, SHAPE, **kw)
    torch.manual_seed(0)
    out = FastDDIMSampler(model, cuda_graph=True).sample(4, BATCH, SHAPE, **kw)
    assert out[0].dtype == ref[0].dtype == (torch.float16 if same_dtype else torch.float32)
    _assert_runs_equal(out, ref, "half latents")


@requires_cuda
def test_captured_step_on_gpu_restores_warmup_and_replays():
    static = graphs.make_static({"x": torch.zeros(5, device="cuda"),
                                 "step": torch.zeros(1, dtype=torch.int64, device="cuda")})

    def fn(s):
        s["x"].add_(s["step"].float() + 1.0)
        s["step"].add_(1)

    caller = torch.cuda.current_stream()
    runner = graphs.make_step(fn, static).capture()
    assert isinstance(runner, graphs.CapturedStep) and runner.captured
    assert torch.cuda.current_stream() == caller  # capture ran on the side stream, not the caller's
    assert torch.equal(static["x"].cpu(), torch.zeros(5)) and int(static["step"]) == 0  # warm-up left no trace
    for _ in range(3):
        runner.replay()
    torch.testing.assert_close(static["x"].cpu(), torch.full((5,), 6.0))  # 1 + 2 + 3
    assert int(static["step"]) == 3

    # A step that syncs the host (.item(), a CPU -> GPU copy as in ldm's timestep_embedding) is refused
    # before capture: GraphCaptureError, caller's stream current, static inputs restored, the sync debug
    # mode as it was; capture_step then falls back to the eager step.
    for syncing in (lambda s: s["x"].add_(float(s["step"].item())),
                    lambda s: s["x"].add_(torch.arange(5, dtype=torch.float32).to(s["x"].device))):
        static["x"].fill_(2.0)
        with pytest.raises(graphs.GraphCaptureError, match="sync"):
            graphs.make_step(syncing, static).capture()
        assert torch.cuda.current_stream() == caller
        assert torch.cuda.get_sync_debug_mode() == 0
        assert torch.equal(static["x"].cpu(), torch.full((5,), 2.0)) and int(static["step"]) == 3
        eager = graphs.capture_step(syncing, static)
        assert isinstance(eager, graphs.EagerStep)
    # the device keeps working normally after the refused captures, and a new capture succeeds
    again = graphs.capture_step(fn, graphs.make_static({"x": torch.zeros(5, device="cuda"),
                                                        "step": torch.zeros(1, dtype=torch.int64, device="cuda")}))
    assert again.captured
    again.replay()
    torch.testing.assert_close(again.static_inputs["x"].cpu(), torch.ones(5))


@requires_cuda
def test_cuda_graph_matches_eager_on_gpu(conds):
    model = ToyLDM(parameterization="v", device="cuda")
    c, uc = (t.cuda() for t in conds)
    eager = FastDDIMSampler(model)
    graphed = FastDDIMSampler(model, cuda_graph=True)
    assert eager.device.type == "cuda"
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=5.0, eta=0.5,
              log_every_t=2, verbose=False)
    for _ in range(2):
        torch.manual_seed(0)
        ref = eager.sample(10, BATCH, SHAPE, **kw)
        torch.manual_seed(0)
        out = graphed.sample(10, BATCH, SHAPE, **kw)
        _assert_runs_equal(out, ref, "cuda graph vs eager")
        _assert_close(out[0], ref[0], "cuda graph final", tol=1e-6)
    entry = graphed.graph_cache.get(graphed.graph_cache.keys()[-1])
    assert entry.captured and entry.replays >= 20
    # weights changed in place take effect on replay (e.g. a LoRA merged into the same tensors)
    with torch.no_grad():
        model.w_out.mul_(1.5)
    torch.manual_seed(0)
    ref = eager.sample(10, BATCH, SHAPE, **kw)
    torch.manual_seed(0)
    out = graphed.sample(10, BATCH, SHAPE, **kw)
    _assert_close(out[0], ref[0], "cuda graph after in-place weight update", tol=1e-6)
    # philox noise inside the graph: deterministic per seed
    ph = FastDDIMSampler(model, cuda_graph=True, noise_mode="philox")
    x_T = torch.randn(BATCH, *SHAPE, device="cuda")
    runs = [ph.sample(6, BATCH, SHAPE, conditioning=c, eta=1.0, x_T=x_T, verbose=False,
                      generator=torch.Generator().manual_seed(4))[0] for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@requires_cuda
def test_cuda_graph_every_path_matches_eager_on_gpu(conds):
    """ucg_schedule (two captured runners sharing x and the step), inpainting mask (q_sample draws outside
    the graph), img_callback / intermediates (snapshots, not the static buffers), noise_dropout, and two
    batch sizes sharing the cache's memory pool: all equal the eager loop (same global-RNG draws)."""
    model = ToyLDM(parameterization="eps", device="cuda")
    c, uc = (t.cuda() for t in conds)
    eager = FastDDIMSampler(model)
    graphed = FastDDIMSampler(model, cuda_graph=True)
    x0 = torch.randn(BATCH, *SHAPE, device="cuda")
    mask = (torch.rand(BATCH, 1, *SHAPE[1:], device="cuda") > 0.5).float()
    # S = 5 divides T = 1000: exactly 5 steps, one guidance scale each (1.0 = a step without CFG)
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=3.0, eta=0.8,
              ucg_schedule=[3.0, 1.0, 3.0, 5.0, 1.0], mask=mask, x0=x0, noise_dropout=0.2, log_every_t=2,
              verbose=False)
    outs = {}
    for name, sampler in (("eager", eager), ("graph", graphed)):
        preds = []
        torch.manual_seed(11)
        outs[name] = sampler.sample(5, BATCH, SHAPE, img_callback=lambda x, i, p=preds: p.append(x), **kw)
        outs[name + "_preds"] = preds
    _assert_runs_equal(outs["graph"], outs["eager"], "cuda graph, every path")
    assert len({p.data_ptr() for p in outs["graph_preds"]}) == len(outs["graph_preds"])  # no aliasing
    for j, (a, b) in enumerate(zip(outs["graph_preds"], outs["eager_preds"])):
        _assert_close(a, b, f"img_callback pred_x0 {j}")
    assert len(graphed.graph_cache) == 3 and all(graphed.graph_cache.get(k).captured
                                                 for k in graphed.graph_cache.keys())
    # another batch size: a new graph in the same pool; the earlier ones still replay correctly
    torch.manual_seed(2)
    ref1 = eager.sample(4, 1, SHAPE, conditioning=c[:1], eta=0.5, verbose=False)[0]
    torch.manual_seed(2)
    _assert_close(graphed.sample(4, 1, SHAPE, conditioning=c[:1], eta=0.5, verbose=False)[0], ref1, "batch 1")
    torch.manual_seed(11)
    _assert_close(graphed.sample(5, BATCH, SHAPE, **kw)[0], outs["eager"][0], "first graphs after another capture")
    assert graphed.graph_cache.evictions == 0 and graphed.graph_cache.hits >= 3


@requires_cuda
def test_cuda_graph_under_autocast_matches_eager_and_outlives_the_context(conds):
    """ldm samples inside torch.autocast: the graph must hold its own casts (not the autocast cache of the
    capture's context, freed when it exits), so a later call in a new context and in-place weight updates
    still give the eager results."""
    model = ToyLDM(parameterization="eps", device="cuda")
    c, uc = (t.cuda() for t in conds)
    eager, graphed = FastDDIMSampler(model), FastDDIMSampler(model, cuda_graph=True)
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=4.0, eta=0.3,
              verbose=False)
    for run in range(3):
        if run == 2:
            with torch.no_grad():
                model.w_x.mul_(1.4)
        with torch.autocast("cuda"):
            torch.manual_seed(run)
            ref = eager.sample(5, BATCH, SHAPE, **kw)
            torch.manual_seed(run)
            out = graphed.sample(5, BATCH, SHAPE, **kw)
        torch.cuda.empty_cache()  # let freed memory be reused: a graph reading a dead cache would show it
        # fp16 matmuls inside: DESIGN's fp16 bound (a graph reading freed memory is off by O(1) or NaN)
        _assert_close(out[0], ref[0], f"autocast run {run}", tol=2e-3)
    assert graphed.graph_cache.misses == 1 and graphed.graph_cache.get(graphed.graph_cache.keys()[0]).captured


class _HostCopyTimeEmbedding(_ModelWrapper):
    """ldm's UNet habit: the timestep-embedding frequencies are built on the CPU and copied to the GPU on
    every call (ldm.modules.diffusionmodules.util.timestep_embedding) — a sync no graph can capture."""

    def apply_model(self, x, t, cond):
        freqs = torch.exp(-torch.arange(0, 4, dtype=torch.float32) / 4).to(device=t.device)
        return self.inner.apply_model(x, t, cond) + 0.0 * freqs.sum()


@requires_cuda
def test_cuda_graph_falls_back_to_eager_for_an_uncapturable_model(conds, caplog):
    model = _HostCopyTimeEmbedding(ToyLDM(parameterization="eps", device="cuda"))
    c, uc = (t.cuda() for t in conds)
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=4.0, eta=0.5,
              verbose=False)
    graphed = FastDDIMSampler(model, cuda_graph=True)
    torch.manual_seed(0)
    ref = FastDDIMSampler(model).sample(5, BATCH, SHAPE, **kw)
    with caplog.at_level(logging.WARNING, logger="ddim_fast.graphs"):
        for _ in range(2):
            torch.manual_seed(0)
            out = graphed.sample(5, BATCH, SHAPE, **kw)
            _assert_runs_equal(out, ref, "eager fallback")
    assert "running the step eagerly" in caplog.text
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    entry = graphed.graph_cache.get(graphed.graph_cache.keys()[-1])
    assert not entry.captured and (graphed.graph_cache.misses, graphed.graph_cache.hits) == (1, 1)


# --------------------------------------------------------------------------------------------------
# Errors and upstream crashes fixed
# --------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clearly(models, conds):
    c, uc = conds
    model = models["eps"]
    with pytest.raises(ValueError, match="noise_mode"):
        FastDDIMSampler(model, noise_mode="curand")
    with pytest.raises(ValueError, match="backend"):
        FastDDIMSampler(model, backend="cuda")
    fast = FastDDIMSampler(model)
    with pytest.raises(RuntimeError, match="make_schedule"):
        fast.decode(torch.zeros(1, *SHAPE), c[:1], 3)
    with pytest.raises(ValueError, match="ucg_schedule"):
        fast.sample(5, BATCH, SHAPE, conditioning=c, ucg_schedule=[1.0, 2.0], verbose=False)
    with pytest.raises(ValueError, match="noise_dropout"):
        FastDDIMSampler(model, noise_mode="philox").sample(3, BATCH, SHAPE, conditioning=c, eta=1.0,
                                                            noise_dropout=0.1, verbose=False)
    with pytest.raises(ValueError, match="score_corrector"):
        FastDDIMSampler(models["v"]).sample(3, BATCH, SHAPE, conditioning=c, score_corrector=object(),
                                            verbose=False)
    with pytest.raises(ValueError, match="mask needs x0"):
        fast.sample(3, BATCH, SHAPE, conditioning=c, mask=torch.ones(BATCH, 1, *SHAPE[1:]), verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eta=float("nan")), r"ddim_eta \(eta\) must be finite, got nan"),
    (dict(eta=-1.0), r"ddim_eta \(eta\) must be >= 0, got -1"),
    (dict(unconditional_guidance_scale=float("nan")), "unconditional_guidance_scale must be finite"),
    (dict(unconditional_guidance_scale=float("inf")), "unconditional_guidance_scale must be finite"),
    (dict(ucg_schedule=[7.5, float("nan"), 7.5]), r"ucg_schedule\[1\] must be finite"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(noise_dropout=1.0), r"noise_dropout must be a probability in \[0, 1\)"),
    (dict(noise_dropout=-0.5), "noise_dropout must be >= 0"),
])
def test_non_finite_or_out_of_range_scalars_rejected(models, conds, kwargs, match):
    # Each of these gave silent NaN latents (or a meaningless run) before; now a clear error before any step.
    c, uc = conds
    fast = FastDDIMSampler(models["eps"])
    calls = []
    model = fast.model
    original = model.apply_model
    model.apply_model = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with pytest.raises(ValueError, match=match):
            fast.sample(3, BATCH, SHAPE, conditioning=c, unconditional_conditioning=uc, verbose=False, **kwargs)
    finally:
        model.apply_model = original
    assert not calls, "the model ran before the bad argument was rejected"
    fast.make_schedule(3, verbose=False)
    with pytest.raises(ValueError, match="unconditional_guidance_scale must be finite"):
        fast.p_sample_ddim(torch.zeros(BATCH, *SHAPE), c, torch.full((BATCH,), 1), 0,
                           unconditional_guidance_scale=float("nan"), unconditional_conditioning=uc)


def _bad_shape_cases(c, uc):
    """(sample() keywords, exception, message) for shapes upstream fails on deep inside (or runs wrongly)."""
    b, (C, H, W) = BATCH, SHAPE
    gen = torch.Generator().manual_seed(12)
    x0 = torch.randn(b, C, H, W, generator=gen)
    mask = torch.ones(b, 1, H, W)
    concat = torch.randn(b, C, H, W, generator=gen)
    latents = rf"\({b}, {C}, {H}, {W}\)"
    return [
        # inpainting: a pixel-space mask, a mask of the guided batch, a bool mask, x0 of another size / rank
        (dict(mask=torch.ones(b, 1, 8 * H, 8 * W), x0=x0), ValueError,
         rf"sample: mask must broadcast to the latents' shape {latents} .*got \({b}, 1, {8 * H}, {8 * W}\) "
         rf"\(a mask at image resolution must be resized to the latent resolution \({H}, {W}\)\)"),
        (dict(mask=torch.ones(2 * b, 1, H, W), x0=x0), ValueError, "mask must broadcast to the latents' shape"),
        (dict(mask=torch.ones(1, b, 1, H, W), x0=x0), ValueError, "mask must broadcast to the latents' shape"),
        (dict(mask=mask.bool(), x0=x0), TypeError, r"mask must be a real tensor .*got torch.bool; pass mask.float\(\)"),
        (dict(mask=mask, x0=x0[..., :-1]), ValueError,
         rf"x0 \(the latents kept where mask == 1\) must have the latents' shape {latents}.*got \({b}, {C}, {H}, {W - 1}\)"),
        (dict(mask=mask, x0=x0[0]), ValueError, "x0 .* must have the latents' shape"),
        (dict(mask=mask, x0=[x0]), TypeError, "x0 must be a torch.Tensor"),
        (dict(mask=mask), ValueError, r"sample: mask needs x0 \(the latents to keep where mask == 1\)"),
        # guidance: an unconditional batch of another size (cat would even succeed for a tensor), per structure
        (dict(unconditional_conditioning=uc[:1]), ValueError,
         rf"sample: unconditional_conditioning must have the shape of conditioning \({b}, 5, 8\) .*got \(1, 5, 8\)"),
        (dict(conditioning={"c_crossattn": c}, unconditional_conditioning={"c_crossattn": uc[:1]}), ValueError,
         r"unconditional_conditioning\['c_crossattn'\] must have the shape of conditioning\['c_crossattn'\]"),
        (dict(conditioning={"c_crossattn": [c], "c_concat": [concat]},
              unconditional_conditioning={"c_crossattn": [uc], "c_concat": [concat[:1]]}), ValueError,
         r"unconditional_conditioning\['c_concat'\]\[0\] must have the shape of conditioning\['c_concat'\]\[0\] "
         rf"\({b}, {C}, {H}, {W}\)"),
        (dict(conditioning={"c_crossattn": [c], "c_concat": [concat]},
              unconditional_conditioning={"c_crossattn": [uc]}), ValueError,
         r"unconditional_conditioning lacks the key 'c_concat' that conditioning has"),
        (dict(conditioning=[c, c], unconditional_conditioning=[uc, uc[:1]]), ValueError,
         r"unconditional_conditioning\[1\] must have the shape of conditioning\[1\]"),
        (dict(conditioning=[c, c], unconditional_conditioning=[uc]), ValueError,
         "unconditional_conditioning must be a list of 2 like conditioning, got 1"),
        (dict(conditioning={"c_crossattn": c}, unconditional_conditioning=uc), TypeError,
         "unconditional_conditioning must be a dict when conditioning is a dict"),
        (dict(conditioning=None), ValueError, "unconditional_conditioning needs conditioning"),
    ]


@pytest.mark.parametrize("index", range(16))
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_bad_shapes_rejected_before_any_work(models, conds, index, cuda_graph):
    """Each call raises a clear error naming the argument and the expected shape, with no model call, no
    draw from the global generator (a rejected call leaves the RNG as it was), and the schedule untouched."""
    c, uc = conds
    cases = _bad_shape_cases(c, uc)
    assert len(cases) == 16
    kwargs, exc, match = cases[index]
    fast = FastDDIMSampler(models["eps"], cuda_graph=cuda_graph)
    fast.make_schedule(4, verbose=False)
    grid = fast.ddim_timesteps.copy()
    calls = []
    original = fast.model.apply_model
    fast.model.apply_model = lambda *a, **k: calls.append(1) or original(*a, **k)
    kw = dict(conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=3.0, eta=0.5,
              verbose=False)
    kw.update(kwargs)
    try:
        torch.manual_seed(3)
        rng = torch.get_rng_state()
        with pytest.raises(exc, match=match):
            fast.sample(7, BATCH, SHAPE, **kw)
        assert torch.equal(torch.get_rng_state(), rng), "the rejected call drew from the global generator"
        assert np.array_equal(fast.ddim_timesteps, grid), "the rejected call changed the schedule"
        # ddim_sampling (the loop entry, called directly by some scripts) checks the same before drawing x_T.
        loop_kw = {("cond" if k == "conditioning" else k): v for k, v in kw.items() if k not in ("eta", "verbose")}
        loop_kw.setdefault("cond", c)
        with pytest.raises(exc, match=match.replace("sample:", "ddim_sampling:")):
            fast.ddim_sampling(loop_kw.pop("cond"), (BATCH, *SHAPE), **loop_kw)
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        fast.model.apply_model = original
    assert not calls, "the model ran before the bad argument was rejected"


def test_bad_unconditional_shapes_rejected_in_decode_encode_and_p_sample(models, conds):
    c, uc = conds
    fast = FastDDIMSampler(models["eps"])
    fast.make_schedule(4, verbose=False)
    z = torch.randn(BATCH, *SHAPE)
    match = r"unconditional_conditioning must have the shape of conditioning \(2, 5, 8\)"
    with pytest.raises(ValueError, match="decode: " + match):
        fast.decode(z, c, 3, unconditional_guidance_scale=3.0, unconditional_conditioning=uc[:1])
    with pytest.raises(ValueError, match="encode: " + match):
        fast.encode(z, c, 3, unconditional_guidance_scale=3.0, unconditional_conditioning=uc[:1])
    with pytest.raises(ValueError, match="p_sample_ddim: " + match):
        fast.p_sample_ddim(z, c, torch.full((BATCH,), 1), 0, unconditional_guidance_scale=3.0,
                           unconditional_conditioning=uc[:1])
    # Guidance off (scale 1): upstream never reads the unconditional batch, and neither is it checked.
    fast.decode(z, c, 2, unconditional_guidance_scale=1.0, unconditional_conditioning=uc[:1])


@pytest.mark.parametrize("mask_shape, x0_batch", [((1, 1) + SHAPE[1:], BATCH), (SHAPE[1:], BATCH),
                                                  ((BATCH,) + SHAPE, 1)])
def test_broadcast_masks_and_x0_run_as_upstream(models, conds, mask_shape, x0_batch):
    """What upstream's `q_sample(x0, t) * mask + (1 - mask) * img` accepts without changing the latents' shape
    stays accepted, with upstream's results: one mask for the whole batch, a 2-D [H, W] mask, one x0 for all."""
    c, uc = conds
    gen = torch.Generator().manual_seed(21)
    mask = (torch.rand(mask_shape, generator=gen) > 0.5).float()
    x0 = torch.randn(x0_batch, *SHAPE, generator=gen)
    out, ref = _run_pair(models["eps"], seed=4, conditioning=c, unconditional_conditioning=uc,
                         unconditional_guidance_scale=3.0, eta=0.5, mask=mask, x0=x0, S=4, log_every_t=2)
    _assert_runs_equal(out, ref, f"mask {mask_shape}, x0 batch {x0_batch}")


def test_list_conditioning_warning_does_not_crash(models, conds, caplog):
    c, _ = conds
    fast = FastDDIMSampler(models["eps"])
    with caplog.at_level(logging.WARNING, logger="ddim_fast.sampler"):
        x, _ = fast.sample(2, BATCH, SHAPE, conditioning=[c[:1], c[:1]], x_T=torch.randn(1, *SHAPE),
                           verbose=False)
    assert "Got 1 conditionings but batch-size is 2" in caplog.text
    assert x.shape == (1, *SHAPE)


def test_drop_in_import():
    from ddim_fast import FastDDIMSampler as DDIMSampler
    assert DDIMSampler is FastDDIMSampler and ddim_fast.slerp is slerp


# --------------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------------


def test_slerp():
    gen = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    # unit vectors stay on the sphere, and the midpoint is at equal angles from both ends
    u0, u1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    mid = slerp(u0, u1, 0.5)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]))
    for a in (0.1, 0.37, 0.9):
        assert abs(torch.linalg.vector_norm(slerp(u0, u1, a)).item() - 1.0) < 1e-6
    # per-sample alpha
    alphas = torch.tensor([0.0, 0.5, 1.0])
    out = slerp(z0, z1, alphas)
    torch.testing.assert_close(out[0], z0[0])
    torch.testing.assert_close(out[2], z1[2])
    torch.testing.assert_close(out[1], slerp(z0[1:2], z1[1:2], 0.5)[0])
    # near-parallel and antiparallel inputs: finite, linear fallback
    near = z0 * 2.0 + 1e-7
    torch.testing.assert_close(slerp(z0, near, 0.25), 0.75 * z0 + 0.25 * near)
    anti = slerp(u0, -u0, 0.3)
    assert torch.isfinite(anti).all()
    torch.testing.assert_close(anti, 0.7 * u0 - 0.3 * u0)
    assert slerp(z0.half(), z1.half(), 0.5).dtype == torch.float16
    with pytest.raises(ValueError, match="same shape"):
        slerp(z0, z1[:2], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        slerp(z0, z1, torch.ones(2))
