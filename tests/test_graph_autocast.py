"""Weight casts under torch.autocast kept out of captured graphs (``ddim_fast.graphs.AutocastWeightCasts``,
``CapturedStep(autocast_weights="hoist")``): same results as eager autocast, no cast left per call, in-place
weight updates seen. The interception runs on the CPU (CPU autocast, bf16); the capture tests need CUDA."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ddim_fast import graphs

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mlp(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).to(device).eval()


class CastCounter(contextlib.AbstractContextManager):
    """Counts the weight casts that really ran (aten._to_copy of a Parameter) below any interception."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.count = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def run(model, x, casts=None, device_type="cpu", dtype=torch.bfloat16):
    intercept = casts.intercept() if casts is not None else contextlib.nullcontext()
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, cache_enabled=False), intercept:
        return model(x)


def eager(model, x, device_type="cpu", dtype=torch.bfloat16):
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
        return model(x)


def test_hoisted_casts_give_eager_autocast_results_and_cast_once():
    model, x = mlp(), torch.randn(4, 32)
    casts = graphs.AutocastWeightCasts(torch.device("cpu"), torch.bfloat16)
    with CastCounter() as first:
        out = run(model, x, casts)
    with CastCounter() as second:
        again = run(model, x, casts)
    expected = eager(model, x)
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert first.count == 4 and second.count == 0  # 2 weights + 2 biases, cast once
    assert casts.count == 4 and casts.hits == 4
    assert casts.bytes == sum(p.numel() for p in model.parameters()) * 2
    assert all(copy.dtype == torch.bfloat16 and torch.equal(copy, src.to(torch.bfloat16))
               for src, copy in casts.copies())
    with CastCounter() as plain:
        run(model, x)
    assert plain.count == 4  # without the interception every call casts every weight


def test_in_place_updates_are_recast_and_data_writes_need_force():
    model, x = mlp(), torch.randn(4, 32)
    casts = graphs.AutocastWeightCasts(torch.device("cpu"), torch.bfloat16)
    run(model, x, casts)
    assert casts.refresh() == 0
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # bumps the version counter
    assert casts.refresh() == 1
    assert torch.equal(run(model, x, casts), eager(model, x))
    model[2].weight.data.mul_(0.5)  # a write through .data bumps no counter
    assert casts.refresh() == 0
    assert not torch.equal(run(model, x, casts), eager(model, x))  # stale, as documented
    assert casts.refresh(force=True) == casts.count
    assert torch.equal(run(model, x, casts), eager(model, x))
    model[2].bias.data = torch.randn(16)  # new storage: detected by its address
    assert torch.equal(run(model, x, casts), eager(model, x))


def test_only_fp32_weights_cast_to_the_autocast_dtype_are_served():
    casts = graphs.AutocastWeightCasts(torch.device("cpu"), torch.bfloat16)
    w = torch.nn.Parameter(torch.randn(8, 8))
    activation = torch.randn(8, 8)
    with casts.intercept():
        a = activation.to(torch.bfloat16)          # not a weight: cast normally
        b = w.to(torch.float16)                     # another dtype: cast normally
        c = w.detach().to(torch.bfloat16)           # a detached view-like tensor that needs no grad: normal
        d = w.to(torch.bfloat16)                    # served
        e = w.to(torch.bfloat16)
    assert casts.count == 1 and d is e
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float16 and torch.equal(c, d)


def test_captured_step_rejects_an_unknown_autocast_weights_mode():
    with pytest.raises(ValueError, match="autocast_weights must be one of"):
        graphs.CapturedStep(lambda s: None, {"x": torch.zeros(1)}, autocast_weights="sometimes")


@requires_cuda
@pytest.mark.parametrize("mode", ["hoist", "recast"])
def test_capture_under_autocast_matches_eager_and_sees_in_place_updates(mode):
    model, x = mlp("cuda"), torch.randn(4, 32, device="cuda")
    static = {"x": x.clone()}

    def fn(s):
        with torch.no_grad():
            return model(s["x"])

    with CastCounter() as counter, torch.autocast("cuda", dtype=torch.float16):
        step = graphs.CapturedStep(fn, static, warmup_iters=2, autocast_weights=mode).capture()
    # hoist: each weight cast once (first warm-up run), none in the second warm-up nor in the capture
    assert counter.count == (4 if mode == "hoist" else 3 * 4)
    assert (step.weight_casts is not None) == (mode == "hoist")
    torch.cuda.empty_cache()  # the caller's autocast context is gone: its cache must not be read
    assert torch.equal(step.replay(), eager(model, x, "cuda", torch.float16))
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    assert torch.equal(step.replay().clone(), eager(model, x, "cuda", torch.float16))
