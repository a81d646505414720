"""The C++ CPU ddim_step op (torch.ops.ddim_fast.ddim_step / ddim_step_out, through ddim_fast.ops) and the
reference backend against the float64 oracle of tests/oracles.py, with the tolerance table of tests/conftest.py.

Covers every option, every storage dtype, odd/empty/real sizes, non-contiguous and misaligned views of
every argument (outputs poisoned, and their storage outside the view checked untouched), seeded Philox
noise, opcheck, torch.compile, and the bad-input messages.
"""

from __future__ import annotations

import math
import time
import zlib

import pytest
import torch

import oracles
from conftest import DTYPES, assert_fully_written, assert_rel_close, misaligned, poison
from ddim_fast import ops, reference, schedule

SD_START, SD_END = 0.00085, 0.012
NUM_STEPS = 10
ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _sd_table(eta: float = 0.5, num_steps: int = NUM_STEPS) -> torch.Tensor:
    """SD's ldm schedule, rows in run order (row 0 is t=901 for S=10)."""
    abar = schedule.alphas_cumprod(schedule.ldm_betas("linear", 1000, SD_START, SD_END))
    params = schedule.ldm_ddim_parameters(abar, schedule.ldm_timesteps(num_steps), eta)
    return schedule.ldm_coefficient_table(params)


TABLE = _sd_table(0.5)
TABLE_ETA1 = _sd_table(1.0)


def _inversion_table() -> torch.Tensor:
    """DDIM inversion: a_t -> a_next (larger t, smaller alpha), sigma = 0."""
    abar = schedule.alphas_cumprod(schedule.ldm_betas("linear", 1000, SD_START, SD_END)).numpy()
    ts = schedule.ldm_timesteps(NUM_STEPS)
    return schedule.coefficient_table(ts[:-1], abar[ts[:-1]], abar[ts[1:]])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(shape, dtype, guided: bool, seed: int = 0, x_scale: float = 1.0):
    g = _gen(seed)
    x = (torch.randn(shape, generator=g) * x_scale).to(dtype)
    mo_shape = (2 * shape[0],) + tuple(shape[1:]) if guided else tuple(shape)
    mo = torch.randn(mo_shape, generator=g).to(dtype)
    return x, mo


def _reference(x, mo, table, row, *, rng_state=None, noise=None, prediction_type="epsilon", **opts):
    """The float64 oracle (tests/oracles.py); seeded noise is the numpy Philox draw at table row `row` ([2] or
    per-row [B, 2] state; reference.seeded_noise, pinned to Random123's known answers in test_reference.py)."""
    if rng_state is not None:
        noise = reference.seeded_noise(rng_state, int(row), x.shape, dtype=torch.float64)
    prediction_type = ALIASES.get(prediction_type, prediction_type)
    return oracles.ddim_step(x, mo, table, row, noise=noise, prediction_type=prediction_type, **opts)


def _check(x, mo, table, step, dtype, **opts):
    """Run the op (functional, with pred_x0) and compare both outputs with the oracle."""
    out, pred_x0 = ops.ddim_step(x, mo, table, step, return_pred_x0=True, backend="native", **opts)
    ref_out, ref_x0 = _reference(x, mo, table, step, **opts)
    assert out.dtype == dtype and pred_x0.dtype == dtype
    assert out.shape == x.shape and pred_x0.shape == x.shape
    assert_rel_close(out, ref_out, dtype, "x_prev")
    assert_rel_close(pred_x0, ref_x0, dtype, "pred_x0")
    return out, pred_x0


def _unclamped_x0(x, mo, table, step, **opts) -> torch.Tensor:
    return _reference(x, mo, table, step, **opts)[1]


# --------------------------------------------------------------------------------------------------
# Every option, every dtype
# --------------------------------------------------------------------------------------------------

OPTION_SETS = {
    "plain": {},
    "guided": {"guidance_scale": 7.5},
    "clip": {"clip_range": 1.0},
    "clip_reuse": {"clip_range": 0.5, "use_clipped_model_output": True, "guidance_scale": 3.0},
    "threshold": {"x0_threshold": "dynamic"},
    "threshold_reuse": {"x0_threshold": "dynamic", "use_clipped_model_output": True},
    "noise": {"noise": "tensor"},
    "noise_temperature": {"noise": "tensor", "temperature": 0.37, "guidance_scale": 5.0},
    "rng": {"rng_state": (1234, 17)},
    "rng_temperature_guided_clip": {"rng_state": (99, 0), "temperature": 1.7, "guidance_scale": 9.0,
                                    "clip_range": 2.0},
    "reuse_without_clamp": {"use_clipped_model_output": True},  # no clamp: a no-op
}


def _materialize(opts: dict, x, mo, table, step, seed: int = 5) -> dict:
    opts = dict(opts)
    if opts.get("noise") == "tensor":
        opts["noise"] = torch.randn(x.shape, generator=_gen(seed)).to(x.dtype)
    if "rng_state" in opts and not isinstance(opts["rng_state"], torch.Tensor):
        opts["rng_state"] = torch.tensor(opts["rng_state"], dtype=torch.int64)
    if opts.get("x0_threshold") == "dynamic":
        # Imagen dynamic thresholding: s from the unclamped x0 of this very step (diffusers' recipe).
        base = {k: v for k, v in opts.items() if k not in ("x0_threshold", "use_clipped_model_output")}
        x0 = _unclamped_x0(x, mo, table, step, **base)
        opts["x0_threshold"] = reference.dynamic_threshold(x0, ratio=0.9, max_value=3.0).float()
        assert (opts["x0_threshold"] > 1.0).all(), "the test must exercise real clamping"
    return opts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_matches_reference(dtype, prediction, option_set):
    step = 3
    guided = "guidance_scale" in OPTION_SETS[option_set]
    # Per-sample scales so dynamic thresholds differ between samples.
    x, mo = _inputs((3, 4, 5, 7), dtype, guided, seed=zlib.crc32(f"{prediction}/{option_set}".encode()))
    x = x * torch.tensor([0.5, 1.0, 3.0]).reshape(3, 1, 1, 1).to(dtype)
    opts = _materialize(OPTION_SETS[option_set], x, mo, TABLE, step)
    _check(x, mo, TABLE, step, dtype, prediction_type=prediction, **opts)


@pytest.mark.parametrize("alias,canonical", list(ALIASES.items()))
def test_ldm_prediction_aliases(alias, canonical):
    x, mo = _inputs((2, 3, 5), torch.float32, guided=True)
    a = ops.ddim_step(x, mo, TABLE, 2, guidance_scale=4.0, prediction_type=alias, return_pred_x0=True)
    b = ops.ddim_step(x, mo, TABLE, 2, guidance_scale=4.0, prediction_type=canonical, return_pred_x0=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("table_name", ["eta0", "eta1", "inversion"])
def test_every_step_of_a_schedule(table_name):
    """Bump the step tensor in place over a whole schedule; every row is read correctly."""
    table = {"eta0": _sd_table(0.0), "eta1": TABLE_ETA1, "inversion": _inversion_table()}[table_name]
    x, _ = _inputs((2, 4, 6, 6), torch.float32, guided=False)
    rng = torch.tensor([7, 100], dtype=torch.int64)
    step = schedule.step_index(0)
    for k in range(table.shape[0]):
        mo = torch.randn((4, 4, 6, 6), generator=_gen(k))
        out = ops.ddim_step(x, mo, table, step, guidance_scale=7.5, rng_state=rng)
        ref, _ = _reference(x, mo, table, k, guidance_scale=7.5, rng_state=rng)
        assert_rel_close(out, ref, torch.float32, f"step {k}")
        x = out
        step.add_(1)


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (3, 341), (1, 1, 1, 1), (5, 1, 3, 1, 7)])
def test_odd_sizes(dtype, shape):
    x, mo = _inputs(shape, dtype, guided=True, seed=len(shape))
    _check(x, mo, TABLE, 5, dtype, guidance_scale=7.5, rng_state=torch.tensor([3, 4]), clip_range=4.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,guided", [((4, 4, 64, 64), False), ((2, 4, 96, 96), True)],
                         ids=["4x4x64x64", "2x4x96x96"])
def test_real_size(dtype, shape, guided):
    x, mo = _inputs(shape, dtype, guided)
    opts = {"guidance_scale": 7.5} if guided else {}
    _check(x, mo, TABLE, 8, dtype, rng_state=torch.tensor([2024, 1]), **opts)


@pytest.mark.parametrize("shape", [(0, 4, 8, 8), (2, 4, 8, 0), (0,)])
@pytest.mark.parametrize("option_set", ["plain", "rng_temperature_guided_clip", "threshold"])
def test_empty(shape, option_set):
    opts = dict(OPTION_SETS[option_set])
    guided = "guidance_scale" in opts
    x, mo = _inputs(shape, torch.float32, guided)
    if "rng_state" in opts:
        opts["rng_state"] = torch.tensor(opts["rng_state"])
    if opts.get("x0_threshold") == "dynamic":
        opts["x0_threshold"] = torch.full((shape[0],), 2.0)
    out, pred_x0 = ops.ddim_step(x, mo, TABLE, 1, return_pred_x0=True, **opts)
    assert out.shape == x.shape and pred_x0.shape == x.shape
    buf, px = torch.empty(shape), torch.empty(shape)
    res = ops.ddim_step(x, mo, TABLE, 1, out=buf, pred_x0_out=px, **opts)
    assert res[0] is buf and res[1] is px


# --------------------------------------------------------------------------------------------------
# Layouts: non-contiguous, misaligned and expanded views of every argument
# --------------------------------------------------------------------------------------------------


def _layout(t: torch.Tensor, layout: str):
    """A view with `t`'s values in the given layout, and the storage it lives in."""
    if layout == "contiguous":
        return t.clone(), None
    if layout == "transposed":
        base = torch.empty(t.shape[:-2] + (t.shape[-1], t.shape[-2]), dtype=t.dtype)
        view = base.transpose(-1, -2)
    elif layout == "sliced":
        base = torch.empty(t.shape[:-1] + (2 * t.shape[-1] + 1,), dtype=t.dtype)
        view = base[..., 1::2]
    elif layout == "batch_sliced":
        base = torch.empty((t.shape[0] + 2,) + t.shape[1:], dtype=t.dtype)
        view = base[1:-1]
    elif layout == "misaligned":
        view = misaligned(t)
        return view, None
    elif layout == "expanded":  # read-only arguments only: stride 0 along dim 1
        src = t[:, :1].clone()
        t.copy_(src.expand_as(t))
        return src.expand_as(t), None
    else:
        raise AssertionError(layout)
    view.copy_(t)
    return view, base


def _output_view(like: torch.Tensor, layout: str):
    """A poisoned output view and its poisoned storage (to check nothing outside the view is written)."""
    if layout == "misaligned":
        flat = poison(torch.empty(like.numel() + 1, dtype=like.dtype))
        return flat[1:].view(like.shape), flat
    view, base = _layout(like, layout)
    if base is None:
        base = view
    poison(base)
    return view, base


ARGS = ("x", "model_output", "noise", "out", "pred_x0_out")

def _layout_cases():
    for arg in ARGS:
        for layout in ("transposed", "sliced", "batch_sliced", "misaligned", "expanded"):
            if layout == "expanded" and arg in ("out", "pred_x0_out"):
                continue  # outputs cannot be expanded: the internal-overlap error test covers that
            yield pytest.param(arg, layout, id=f"{arg}-{layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("arg,layout", list(_layout_cases()))
def test_layouts(dtype, arg, layout):
    shape = (3, 4, 6, 5)
    x, mo = _inputs(shape, dtype, guided=True, seed=11)
    noise = torch.randn(shape, generator=_gen(12)).to(dtype)
    tensors = {"x": x, "model_output": mo, "noise": noise}
    if arg in tensors:
        tensors[arg], _ = _layout(tensors[arg], layout)  # (expanded rewrites the values in place first)
        if arg == "x":
            x = tensors["x"]
        assert layout == "misaligned" or not tensors[arg].is_contiguous() or layout == "batch_sliced"
    out, out_base = _output_view(torch.empty(shape, dtype=dtype), layout if arg == "out" else "contiguous")
    px, px_base = _output_view(torch.empty(shape, dtype=dtype), layout if arg == "pred_x0_out" else "contiguous")
    opts = dict(guidance_scale=6.0, clip_range=1.5, use_clipped_model_output=True, temperature=0.8)
    res_out, res_px = ops.ddim_step(tensors["x"], tensors["model_output"], TABLE, 4, noise=tensors["noise"],
                                    out=out, pred_x0_out=px, **opts)
    assert res_out is out and res_px is px
    ref_out, ref_x0 = _reference(tensors["x"], tensors["model_output"], TABLE, 4, noise=tensors["noise"], **opts)
    assert_fully_written(out, "out")
    assert_fully_written(px, "pred_x0_out")
    assert_rel_close(out, ref_out, dtype, "x_prev")
    assert_rel_close(px, ref_x0, dtype, "pred_x0")
    for view, base, name in ((out, out_base, "out"), (px, px_base, "pred_x0_out")):
        outside = base.numel() - view.numel()
        still_poisoned = torch.isnan(base.double()).sum().item()
        assert still_poisoned == outside, f"{name}: wrote {outside - still_poisoned} elements outside its view"


@pytest.mark.parametrize("layouts", [
    pytest.param(("transposed", "transposed", "transposed", "transposed"), id="permuted"),
    pytest.param(("transposed", "sliced", "sliced", "transposed"), id="sliced"),
])
def test_all_arguments_strided_and_parallel(layouts):
    """Every argument strided at once, large enough that at::parallel_for splits it into several tasks
    (each restarting the strided walk mid-tensor)."""
    shape = (3, 5, 67, 71)  # 71k elements > the kernel's 32k grain
    dtype = torch.bfloat16
    x, mo = _inputs(shape, dtype, guided=True, seed=21)
    x, _ = _layout(x, layouts[0])
    mo, _ = _layout(mo, layouts[1])
    out, _ = _output_view(torch.empty(shape, dtype=dtype), layouts[2])
    px, _ = _output_view(torch.empty(shape, dtype=dtype), layouts[3])
    rng = torch.tensor([5, 6])
    ops.ddim_step(x, mo, TABLE, 6, guidance_scale=7.5, rng_state=rng, out=out, pred_x0_out=px)
    ref_out, ref_x0 = _reference(x, mo, TABLE, 6, guidance_scale=7.5, rng_state=rng)
    assert_fully_written(out, "out")
    assert_fully_written(px, "pred_x0_out")
    assert_rel_close(out, ref_out, dtype, "x_prev")
    assert_rel_close(px, ref_x0, dtype, "pred_x0")
    # Seeded noise depends on the logical index only: a contiguous run draws the same.
    contiguous = ops.ddim_step(x.contiguous(), mo.contiguous(), TABLE, 6, guidance_scale=7.5, rng_state=rng)
    assert torch.equal(contiguous, out)


@pytest.mark.parametrize("option_set", ["threshold", "rng"])
def test_misaligned_table_step_rng_threshold(option_set):
    """The small arguments (table, step, rng_state, x0_threshold) at storage offset 1 read the same values."""
    x, mo = _inputs((3, 4, 5, 7), torch.float32, guided=False, seed=13)
    opts = _materialize(OPTION_SETS[option_set], x, mo, TABLE, 3)
    step = torch.tensor([3])
    aligned = ops.ddim_step(x, mo, TABLE, step, return_pred_x0=True, **opts)
    moved = {k: misaligned(v) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    got = ops.ddim_step(x, mo, misaligned(TABLE), misaligned(step), return_pred_x0=True, **moved)
    assert misaligned(step).storage_offset() == 1
    assert torch.equal(got[0], aligned[0]) and torch.equal(got[1], aligned[1])


def test_fp32_contiguous_large_matches_reference():
    # The fp32 contiguous fast path (no staging copies) across several parallel tasks.
    x, mo = _inputs((2, 4, 100, 90), torch.float32, guided=True, seed=3)
    _check(x, mo, TABLE, 2, torch.float32, guidance_scale=7.5, rng_state=torch.tensor([8, 9]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option_set,layout", [("noise_temperature", "contiguous"), ("rng", "contiguous"),
                                               ("threshold_reuse", "contiguous"), ("rng", "transposed")])
def test_same_bits_for_any_thread_count(dtype, option_set, layout):
    """The kernel hands its elements out in chunks to however many threads run: 1, 2 and 3 threads (the
    chunks then land on different threads in every run) give the same bits, pred_x0 included. 57k
    elements: 4 chunks, the last one partial."""
    shape = (3, 4, 67, 71)
    x, mo = _inputs(shape, dtype, guided=True, seed=31)
    if layout == "transposed":
        x, _ = _layout(x, "transposed")
    opts = _materialize({**OPTION_SETS[option_set], "guidance_scale": 7.5}, x, mo, TABLE, 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.ddim_step(x, mo, TABLE, 4, return_pred_x0=True, backend="native", **opts))
    finally:
        torch.set_num_threads(threads)
    for n, (out, pred_x0) in zip((2, 3), results[1:]):
        assert torch.equal(out, results[0][0]), f"x_prev with {n} threads differs from 1 thread"
        assert torch.equal(pred_x0, results[0][1]), f"pred_x0 with {n} threads differs from 1 thread"
    ref_out, _ = _reference(x, mo, TABLE, 4, **opts)
    assert_rel_close(results[0][0], ref_out, dtype, "x_prev")


# --------------------------------------------------------------------------------------------------
# Outputs: out=, in place, pred_x0 plumbing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_in_place(dtype):
    x, mo = _inputs((2, 4, 9, 9), dtype, guided=True)
    x_before = x.clone()
    ref_out, _ = _reference(x_before, mo, TABLE, 1, guidance_scale=7.5, rng_state=torch.tensor([1, 2]))
    res = ops.ddim_step(x, mo, TABLE, 1, guidance_scale=7.5, rng_state=torch.tensor([1, 2]), out=x)
    assert res is x
    assert_rel_close(x, ref_out, dtype, "in-place x_prev")


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_out_in_place_strided(layout):
    x, mo = _inputs((2, 3, 8, 5), torch.float32, guided=False)
    xs, base = _layout(x, layout)
    if base is not None:
        outside = poison(base.clone())
        outside_view = outside.as_strided(xs.shape, xs.stride(), xs.storage_offset())
        outside_view.copy_(xs)
        xs = outside_view
    ref_out, _ = _reference(x, mo, TABLE, 7)
    assert ops.ddim_step(xs, mo, TABLE, 7, out=xs) is xs
    assert_rel_close(xs, ref_out, torch.float32, "in-place strided x_prev")
    if layout == "sliced":  # the storage between the view's elements is untouched
        assert torch.isnan(outside).sum().item() == outside.numel() - xs.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_and_pred_x0_out_poisoned(dtype):
    x, mo = _inputs((2, 4, 7, 3), dtype, guided=False)
    out = poison(torch.empty_like(x))
    px = poison(torch.empty_like(x))
    res = ops.ddim_step(x, mo, TABLE, 9, prediction_type="v", clip_range=1.0, out=out, pred_x0_out=px)
    assert isinstance(res, tuple) and res[0] is out and res[1] is px
    assert_fully_written(out, "out")
    assert_fully_written(px, "pred_x0_out")
    ref_out, ref_x0 = _reference(x, mo, TABLE, 9, prediction_type="v_prediction", clip_range=1.0)
    assert_rel_close(out, ref_out, dtype)
    assert_rel_close(px, ref_x0, dtype)


def test_pred_x0_only_when_asked():
    x, mo = _inputs((2, 3, 4), torch.float32, guided=False)
    out = poison(torch.empty_like(x))
    res = ops.ddim_step(x, mo, TABLE, 0, out=out)
    assert res is out  # no pred_x0 requested: a single tensor back, nothing allocated for it
    assert_fully_written(out)
    # out given and pred_x0 asked for: it is allocated for the caller.
    res2 = ops.ddim_step(x, mo, TABLE, 0, out=torch.empty_like(x), return_pred_x0=True)
    assert isinstance(res2, tuple) and res2[1].shape == x.shape
    assert_rel_close(res2[1], _reference(x, mo, TABLE, 0)[1], torch.float32)
    # pred_x0_out given without out: out is allocated.
    px = poison(torch.empty_like(x))
    res3 = ops.ddim_step(x, mo, TABLE, 0, pred_x0_out=px)
    assert res3[1] is px and torch.equal(res3[0], out)
    assert_fully_written(px)
    # Functional: a plain tensor without pred_x0.
    assert isinstance(ops.ddim_step(x, mo, TABLE, 0), torch.Tensor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_ops_functional_returns_empty_pred_x0(dtype):
    x, mo = _inputs((2, 3, 4), dtype, guided=False)
    step = torch.tensor([0])
    out, pred_x0 = torch.ops.ddim_fast.ddim_step(x, mo, TABLE, step, None, "epsilon", None, None, False, None,
                                                 None, 1.0, False)
    assert pred_x0.shape == (0,) and pred_x0.dtype == dtype
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    out2, pred_x0 = torch.ops.ddim_fast.ddim_step(x, mo, TABLE, step, None, "epsilon", None, None, False, None,
                                                  None, 1.0, True)
    assert pred_x0.shape == x.shape and torch.equal(out, out2)


def test_torch_ops_out_variant_without_pred_x0():
    x, mo = _inputs((2, 3, 4), torch.float32, guided=False)
    out = poison(torch.empty_like(x))
    res = torch.ops.ddim_fast.ddim_step_out(x, mo, TABLE, torch.tensor([2]), None, "epsilon", None, None, False,
                                            None, None, 1.0, out, None)
    assert res is None
    assert_fully_written(out)
    assert_rel_close(out, _reference(x, mo, TABLE, 2)[0], torch.float32)


# --------------------------------------------------------------------------------------------------
# Mixed dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_dtype,mo_dtype,noise_dtype,expected",
    [
        (torch.float32, torch.float16, None, torch.float32),
        (torch.float32, torch.bfloat16, torch.float16, torch.float32),
        (torch.float16, torch.float32, None, torch.float32),
        (torch.bfloat16, torch.float16, None, torch.float32),
        (torch.float16, torch.float16, torch.float32, torch.float16),
    ],
)
def test_mixed_dtypes_promote(x_dtype, mo_dtype, noise_dtype, expected):
    g = _gen(4)
    x = torch.randn(2, 3, 5, generator=g).to(x_dtype)
    mo = torch.randn(4, 3, 5, generator=g).to(mo_dtype)
    noise = None if noise_dtype is None else torch.randn(2, 3, 5, generator=g).to(noise_dtype)
    out, px = ops.ddim_step(x, mo, TABLE, 3, guidance_scale=7.5, noise=noise, return_pred_x0=True)
    assert out.dtype == expected and px.dtype == expected
    # The oracle sees the values each input really holds; the noise is cast to the compute dtype first.
    ref_noise = None if noise is None else noise.to(expected)
    ref_out, ref_x0 = _reference(x, mo, TABLE, 3, guidance_scale=7.5, noise=ref_noise)
    assert_rel_close(out, ref_out, expected)
    assert_rel_close(px, ref_x0, expected)


# --------------------------------------------------------------------------------------------------
# Seeded Philox noise and temperature
# --------------------------------------------------------------------------------------------------


def _noise_table(rows: int = 4) -> torch.Tensor:
    # sqrt(a_prev) = 0 and sqrt(1 - a_prev - sigma^2) = 0, sigma = 1: the op returns temperature * z.
    return schedule.coefficient_table([0] * rows, [0.5] * rows, [0.0] * rows, [1.0] * rows)


def _draw(shape, seed, offset, step, temperature=1.0, dtype=torch.float32):
    x = torch.zeros(shape, dtype=dtype)
    return ops.ddim_step(x, torch.zeros(shape, dtype=dtype), _noise_table(), step, temperature=temperature,
                         rng_state=torch.tensor([seed, offset], dtype=torch.int64))


def test_philox_noise_matches_reference():
    z = _draw((3, 4, 5, 7), 1234, 5, 2)
    expected = reference.philox_normal(1234, 5 + 2, (3, 4, 5, 7), dtype=torch.float64)
    torch.testing.assert_close(z.double(), expected, rtol=2e-6, atol=2e-6)


def test_philox_noise_determinism_and_independence():
    a = _draw((2, 4, 8, 8), 42, 0, 1)
    assert torch.equal(a, _draw((2, 4, 8, 8), 42, 0, 1))  # same seed + offset + step: same bits
    assert not torch.equal(a, _draw((2, 4, 8, 8), 42, 0, 2))  # next step: fresh noise
    assert not torch.equal(a, _draw((2, 4, 8, 8), 43, 0, 1))  # other seed
    # The counter's high half is offset + step.
    assert torch.equal(a, _draw((2, 4, 8, 8), 42, 1, 0))
    # Different steps are uncorrelated.
    b = _draw((2, 4, 8, 8), 42, 0, 2)
    assert abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()) < 0.1
    # Seeds and offsets with high 32-bit halves reach the key and counter.
    c = _draw((64,), 5 + (1 << 40), 3 + (1 << 35), 0)
    torch.testing.assert_close(c.double(), reference.philox_normal(5 + (1 << 40), 3 + (1 << 35), (64,),
                                                                   dtype=torch.float64), rtol=2e-6, atol=2e-6)
    assert not torch.equal(c, _draw((64,), 5, 3 + (1 << 35), 0))
    assert not torch.equal(c, _draw((64,), 5 + (1 << 40), 3, 0))


def test_philox_noise_is_standard_normal():
    n = 1 << 20
    z = _draw((n,), 2024, 0, 0).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1.0) < 5 / math.sqrt(2 * n)
    # Tails and symmetry of N(0, 1): P(|z| > 2) = 0.0455, P(z > 0) = 0.5.
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002
    assert abs((z > 0).double().mean().item() - 0.5) < 0.003
    assert torch.isfinite(z).all() and z.abs().max().item() < 6.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temperature(dtype):
    z1 = _draw((4, 33), 9, 9, 0, temperature=1.0, dtype=dtype)
    z_half = _draw((4, 33), 9, 9, 0, temperature=0.5, dtype=dtype)
    assert_rel_close(z_half, z1.double() * 0.5, dtype, "temperature 0.5")
    assert torch.equal(_draw((4, 33), 9, 9, 0, temperature=0.0, dtype=dtype), torch.zeros(4, 33, dtype=dtype))
    # Temperature 0 with noise equals no noise at all.
    x, mo = _inputs((2, 6), dtype, guided=False)
    no_noise = ops.ddim_step(x, mo, TABLE_ETA1, 3)
    noisy_cold = ops.ddim_step(x, mo, TABLE_ETA1, 3, noise=torch.randn(2, 6).to(dtype), temperature=0.0)
    assert torch.equal(no_noise, noisy_cold)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_block_conversions_equal_element_conversions(dtype):
    """The memory-order path converts whole blocks (F16C for fp16 where the CPU has it), the strided path one
    element at a time (c10's conversions): every 16-bit pattern, through every prediction type, gives the
    same output bits on both paths (NaN payloads aside)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 256, 256)
    g = _gen(77)
    table = schedule.coefficient_table([1, 500], [0.5, 0.3], [1.0, 0.61], [0.0, 0.2])
    for step, pred in ((0, "sample"), (1, "epsilon"), (1, "v_prediction")):
        mo = torch.cat([bits, (torch.randn(1, 256, 256, generator=g) * 100).to(dtype)])
        x = (torch.randn(2, 256, 256, generator=g) * 30).to(dtype)
        noise = torch.randn(2, 256, 256, generator=g).to(dtype)
        flat = ops.ddim_step(x, mo, table, step, prediction_type=pred, noise=noise, return_pred_x0=True)
        t = lambda v: v.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731  (strided walk)
        strided = ops.ddim_step(t(x), t(mo), table, step, prediction_type=pred, noise=t(noise), return_pred_x0=True)
        for a, b, name in ((flat[0], strided[0], "x_prev"), (flat[1], strided[1], "pred_x0")):
            same_bits = a.view(torch.int16) == b.view(torch.int16)
            assert (same_bits | (torch.isnan(a) & torch.isnan(b))).all(), f"{pred} {name}"
            assert torch.isnan(a).sum() < a.numel() // 8  # mostly real values: the test compares something


# --------------------------------------------------------------------------------------------------
# Seeded noise per sample: rng_state [B, 2]
# --------------------------------------------------------------------------------------------------

# One (seed, offset) per sample; seeds with high 32-bit halves so both key words matter.
STREAMS = [(1000 + 17 * b + (b << 33), 3 * b + (b << 40)) for b in range(8)]


def _rows(streams) -> torch.Tensor:
    return torch.tensor([list(s) for s in streams], dtype=torch.int64)


def _draw_rows(sample_shape, streams, step, dtype=torch.float32, layout=None, backend="native"):
    """temperature * z for a batch whose row b carries streams[b] (the noise table makes x_prev = z)."""
    shape = (len(streams),) + tuple(sample_shape)
    x = torch.zeros(shape, dtype=dtype)
    mo = torch.zeros(shape, dtype=dtype)
    if layout is not None:
        x, mo = layout(x), layout(mo)
    return ops.ddim_step(x, mo, _noise_table(), step, rng_state=_rows(streams), backend=backend)


# sample_numel % 8 == 0, % 4 == 0 only, and % 4 != 0 (the last Philox group of each row is partial).
ROW_SAMPLE_SHAPES = [(4, 6, 6), (3, 2, 2), (3, 5, 7), (1, 1, 3), (2, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample_shape", ROW_SAMPLE_SHAPES, ids=str)
def test_per_row_noise_belongs_to_the_sample(dtype, sample_shape):
    """A sample's noise is bit-identical whether it is row 0 of a batch of 1 or row 5 of a batch of 8 (or row 1
    of a batch of 3 in another order): a function of its own (seed, offset) and the step only."""
    step = 2
    z8 = _draw_rows(sample_shape, STREAMS, step, dtype)
    for b in (0, 5, 7):
        alone = _draw_rows(sample_shape, [STREAMS[b]], step, dtype)
        assert torch.equal(alone[0], z8[b]), f"row {b} of 8 != batch of 1"
    z3 = _draw_rows(sample_shape, [STREAMS[2], STREAMS[5], STREAMS[0]], step, dtype)
    assert torch.equal(z3[0], z8[2]) and torch.equal(z3[1], z8[5]) and torch.equal(z3[2], z8[0])
    # Against the numpy oracle: row b is the one-stream draw of a single sample with (seed_b, offset_b + step).
    expected = reference.philox_normal_rows([(s, o + step) for s, o in STREAMS], z8.shape, torch.float64)
    assert_rel_close(z8, expected, dtype, "per-row normals")
    for b in (0, 5):
        single = reference.philox_normal(STREAMS[b][0], STREAMS[b][1] + step, sample_shape, torch.float64)
        assert torch.equal(expected[b], single)
    # Rows with different seeds really differ (when a row has more than a couple of elements).
    if math.prod(sample_shape) >= 4:
        assert not torch.equal(z8[0], z8[1])


def test_per_row_state_of_one_row_equals_the_one_stream_state():
    """[1, 2] and [2] with the same (seed, offset) draw the same bits: the per-row mapping extends the old one."""
    for sample_shape in ((4, 5, 7), (4, 8, 8)):
        rows = _draw_rows(sample_shape, [(42, 9)], 3)
        flat = _draw((1,) + sample_shape, 42, 9, 3)
        assert torch.equal(rows, flat)


def test_one_stream_state_is_not_per_row():
    """With [2] the batch is one stream: row 1 continues row 0's stream, it does not restart it (the old
    mapping, unchanged), so two rows of a [2] draw differ, while two rows with the same [B, 2] stream agree."""
    z_one = _draw((2, 4, 6, 6), 42, 9, 3)
    z_rows = _draw_rows((4, 6, 6), [(42, 9), (42, 9)], 3)
    assert torch.equal(z_rows[0], z_one[0]) and torch.equal(z_rows[1], z_one[0])
    assert not torch.equal(z_one[1], z_one[0])
    expected = reference.philox_normal(42, 9 + 3, (2, 4, 6, 6), torch.float64)
    torch.testing.assert_close(z_one.double(), expected, rtol=2e-6, atol=2e-6)


def test_per_row_offsets_and_steps():
    """Row b's counter is offset_b + step: each row advances on its own offset, and every step draws fresh noise."""
    at_step_2 = _draw_rows((3, 5, 7), STREAMS[:4], 2)
    shifted = _draw_rows((3, 5, 7), [(s, o + 2) for s, o in STREAMS[:4]], 0)
    assert torch.equal(at_step_2, shifted)
    at_step_3 = _draw_rows((3, 5, 7), STREAMS[:4], 3)
    for b in range(4):
        assert not torch.equal(at_step_2[b], at_step_3[b])
    # The seed's high word is part of the key.
    low_only = _draw_rows((3, 5, 7), [(s & 0xFFFFFFFF, o) for s, o in STREAMS[:4]], 2)
    assert not torch.equal(low_only[1], at_step_2[1])


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_per_row_noise_any_layout_and_parallel_split(layout):
    """Per-row noise depends on the logical index only: strided and channels_last views draw the bits a
    contiguous run draws, also when at::parallel_for splits a row between tasks (71k-element samples, sample
    size % 4 != 0, so tasks restart mid-row and mid-group)."""
    sample_shape = (5, 67, 71)  # 23,785 elements per sample: % 4 == 1
    views = {
        "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2],
    }
    streams = STREAMS[:3]
    contiguous = _draw_rows(sample_shape, streams, 1, torch.bfloat16)
    strided = _draw_rows(sample_shape, streams, 1, torch.bfloat16, layout=views[layout])
    assert torch.equal(strided, contiguous)
    alone = _draw_rows(sample_shape, streams[2:], 1, torch.bfloat16)
    assert torch.equal(alone[0], contiguous[2])
    expected = reference.philox_normal_rows([(s, o + 1) for s, o in streams], contiguous.shape, torch.float64)
    assert_rel_close(contiguous, expected, torch.bfloat16, "per-row normals, parallel")


@pytest.mark.parametrize("guided", [False, True])
def test_per_row_noise_in_a_full_step(guided):
    """The per-row draw enters x_prev like any noise: the op equals the oracle fed with the per-row normals,
    and the reference backend draws the same."""
    x, mo = _inputs((3, 4, 5, 7), torch.float32, guided=guided, seed=17)
    rng = _rows(STREAMS[:3])
    kw = dict(guidance_scale=7.5 if guided else None, rng_state=rng, temperature=0.8, return_pred_x0=True)
    out, x0 = ops.ddim_step(x, mo, TABLE_ETA1, 4, **kw)
    ref_out, ref_x0 = _reference(x, mo, TABLE_ETA1, 4, guidance_scale=kw["guidance_scale"], rng_state=rng,
                                 temperature=0.8)
    assert_rel_close(out, ref_out, torch.float32, "x_prev")
    assert_rel_close(x0, ref_x0, torch.float32, "pred_x0")
    via_reference = ops.ddim_step(x, mo, TABLE_ETA1, 4, backend="reference", **kw)
    assert_rel_close(out, via_reference[0], 1e-6, "native vs reference backend")


def test_per_row_empty_batch():
    x = torch.zeros(0, 4, 8, 8)
    out = ops.ddim_step(x, x, _noise_table(), 0, rng_state=torch.zeros(0, 2, dtype=torch.int64))
    assert out.shape == x.shape
    ref = ops.ddim_step(x, x, _noise_table(), 0, rng_state=torch.zeros(0, 2, dtype=torch.int64), backend="reference")
    assert ref.shape == x.shape


# --------------------------------------------------------------------------------------------------
# Memory formats: outputs keep x's layout; dense shared layouts run in memory order
# --------------------------------------------------------------------------------------------------


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


CL_OPTIONS = {
    "plain": {},
    "guided": {"guidance_scale": 7.5},
    "noise_clip_reuse": {"noise": "tensor", "guidance_scale": 3.0, "clip_range": 0.5,
                         "use_clipped_model_output": True, "temperature": 0.7},
    "threshold": {"x0_threshold": "dynamic", "use_clipped_model_output": True},
    "rng": {"rng_state": (1234, 17), "guidance_scale": 5.0},  # Philox: the logical-index (strided) path
    "rng_rows": {"rng_state": "rows"},
}


def _cl_opts(option_set, x, mo):
    opts = dict(CL_OPTIONS[option_set])
    if opts.get("rng_state") == "rows":
        opts["rng_state"] = _rows(STREAMS[: x.shape[0]])
    return _materialize(opts, x, mo, TABLE_ETA1, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (1, 4, 64, 64)], ids=str)
@pytest.mark.parametrize("option_set", list(CL_OPTIONS))
def test_channels_last_keeps_layout_and_values(dtype, shape, option_set):
    """channels_last x, model_output (and noise) give channels_last x_prev and pred_x0, bit-identical to the
    contiguous computation, through the front door, the raw functional op and the out variant."""
    x, mo = _inputs(shape, dtype, guided="guidance_scale" in CL_OPTIONS[option_set], seed=len(option_set))
    opts = _cl_opts(option_set, x, mo)
    want_out, want_x0 = ops.ddim_step(x, mo, TABLE_ETA1, 3, return_pred_x0=True, **opts)
    assert want_out.is_contiguous()
    cl_opts = {k: (_cl(v) if k == "noise" else v) for k, v in opts.items()}
    xc, moc = _cl(x), _cl(mo)
    assert not xc.is_contiguous() and xc.is_contiguous(memory_format=torch.channels_last)
    out, x0 = ops.ddim_step(xc, moc, TABLE_ETA1, 3, return_pred_x0=True, **cl_opts)
    for t, name in ((out, "x_prev"), (x0, "pred_x0")):
        assert t.stride() == xc.stride(), f"{name}: strides {t.stride()} != x's {xc.stride()}"
    assert torch.equal(out, want_out) and torch.equal(x0, want_x0)
    raw = torch.ops.ddim_fast.ddim_step(xc, moc, TABLE_ETA1, torch.tensor([3]), opts.get("guidance_scale"),
                                        "epsilon", opts.get("clip_range"), opts.get("x0_threshold"),
                                        opts.get("use_clipped_model_output", False), cl_opts.get("noise"),
                                        opts.get("rng_state"), opts.get("temperature", 1.0), True)
    assert raw[0].stride() == xc.stride() and raw[1].stride() == xc.stride()
    assert torch.equal(raw[0], want_out) and torch.equal(raw[1], want_x0)
    # The out variant into poisoned channels_last buffers.
    buf, buf_x0 = poison(torch.empty_like(xc)), poison(torch.empty_like(xc))
    ops.ddim_step(xc, moc, TABLE_ETA1, 3, out=buf, pred_x0_out=buf_x0, **cl_opts)
    assert torch.equal(buf, want_out) and torch.equal(buf_x0, want_x0)
    # out given, pred_x0 allocated by the front door: laid out like x as well.
    _, allocated = ops.ddim_step(xc, moc, TABLE_ETA1, 3, out=poison(torch.empty_like(xc)), return_pred_x0=True,
                                 **cl_opts)
    assert allocated.stride() == xc.stride() and torch.equal(allocated, want_x0)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_outputs_follow_x_not_the_other_arguments(backend):
    """Mixed layouts: the outputs take x's layout (empty_like(x)), whatever model_output's is, as element-wise
    PyTorch does for a channels_last first operand; non-dense x gets empty_like's suggested format."""
    x, mo = _inputs((2, 4, 9, 7), torch.float32, guided=True, seed=3)
    want = ops.ddim_step(x, mo, TABLE, 2, guidance_scale=7.5, backend=backend)
    got = ops.ddim_step(_cl(x), mo, TABLE, 2, guidance_scale=7.5, backend=backend)
    assert got.stride() == _cl(x).stride() and torch.equal(got, want)
    got = ops.ddim_step(x, _cl(mo), TABLE, 2, guidance_scale=7.5, backend=backend)
    assert got.is_contiguous() and torch.equal(got, want)
    # Not dense: a slice of a wider channels_last tensor.
    wide = _cl(torch.randn(2, 4, 9, 11, generator=_gen(4)))
    xs = wide[..., 2:9]
    xs.copy_(x)
    got = ops.ddim_step(xs, mo, TABLE, 2, guidance_scale=7.5, backend=backend)
    assert got.stride() == torch.empty_like(xs).stride() and torch.equal(got, want)


def test_reference_function_keeps_layout():
    x, mo = _inputs((2, 4, 5, 3), torch.float32, guided=False)
    out, x0 = reference.ddim_step(_cl(x), mo, TABLE, 1)
    assert out.stride() == _cl(x).stride() and x0.stride() == _cl(x).stride()
    want, _ = reference.ddim_step(x, mo, TABLE, 1)
    assert torch.equal(out, want)
    assert_rel_close(out, _reference(x, mo, TABLE, 1)[0], 1e-14, "reference backend vs oracle")


@pytest.mark.parametrize("option_set", ["guided", "noise_clip_reuse", "threshold", "rng", "rng_rows"])
def test_opcheck_channels_last(option_set):
    """The fake kernel lays out its outputs like the C++ op (opcheck compares strides too)."""
    x, mo = _inputs((2, 4, 9, 7), torch.float32, guided="guidance_scale" in CL_OPTIONS[option_set], seed=9)
    opts = _cl_opts(option_set, x, mo)
    args = (_cl(x), _cl(mo), TABLE_ETA1, torch.tensor([3]), opts.get("guidance_scale"), "epsilon",
            opts.get("clip_range"), opts.get("x0_threshold"), opts.get("use_clipped_model_output", False),
            _cl(opts["noise"]) if "noise" in opts else None, opts.get("rng_state"), opts.get("temperature", 1.0))
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step.default, args + (True,))
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step.default, args + (False,))
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step_out.default,
                          args + (torch.empty_like(args[0]), torch.empty_like(args[0])))


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.slow
def test_channels_last_runs_as_fast_as_contiguous():
    """channels_last takes the memory-order (vectorized) path, not the strided gather/scatter walk: it costs
    about what the contiguous layout costs (the strided walk measured 8x the contiguous time at 16x4x128x128).
    Interleaved best-of-N timings, with a wide margin for a shared machine."""
    shape = (4, 4, 128, 128)
    x, mo = _inputs(shape, torch.float32, guided=True, seed=5)
    xc, moc = _cl(x), _cl(mo)
    out, out_c = torch.empty_like(x), torch.empty_like(xc)
    run = lambda a, b, o: ops.ddim_step(a, b, TABLE, 2, guidance_scale=7.5, out=o)  # noqa: E731
    best_contiguous = best_cl = float("inf")
    for _ in range(3):
        best_contiguous = min(best_contiguous, _best_time(lambda: run(x, mo, out), 5))
        best_cl = min(best_cl, _best_time(lambda: run(xc, moc, out_c), 5))
    assert torch.equal(out, out_c)
    assert best_cl < 2.0 * best_contiguous, (f"channels_last {best_cl * 1e6:.0f} us vs contiguous "
                                             f"{best_contiguous * 1e6:.0f} us: not the memory-order path")


# --------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


def _op_args(option_set: str, shape=(2, 3, 4, 5)):
    x, mo = _inputs(shape, torch.float32, guided=True, seed=31)
    noise = torch.randn(shape, generator=_gen(32))
    rng = torch.tensor([3, 4])
    thr = torch.full((shape[0],), 1.5)
    step = torch.tensor([2])
    sets = {
        # (model_output, guidance, prediction, clip, threshold, reuse, noise, rng, temperature)
        "plain": (mo[: shape[0]], None, "epsilon", None, None, False, None, None, 1.0),
        "guided_rng": (mo, 7.5, "epsilon", None, None, False, None, rng, 1.0),
        "v_clip_noise": (mo, 2.0, "v_prediction", 1.0, None, True, noise, None, 0.7),
        "sample_threshold": (mo[: shape[0]], None, "sample", None, thr, True, None, rng, 1.3),
        "strided": (mo.transpose(-1, -2).contiguous().transpose(-1, -2), 3.0, "epsilon", None, None, False,
                    noise[..., :].transpose(1, 2).contiguous().transpose(1, 2), None, 1.0),
    }
    m, g, p, c, t, u, n, r, temp = sets[option_set]
    return (x, m, TABLE, step, g, p, c, t, u, n, r, temp)


@pytest.mark.parametrize("option_set", ["plain", "guided_rng", "v_clip_noise", "sample_threshold", "strided"])
@pytest.mark.parametrize("return_pred_x0", [False, True])
def test_opcheck_functional(option_set, return_pred_x0):
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step.default, _op_args(option_set) + (return_pred_x0,))


@pytest.mark.parametrize("option_set", ["plain", "guided_rng", "v_clip_noise", "sample_threshold"])
@pytest.mark.parametrize("with_pred_x0", [False, True])
def test_opcheck_out(option_set, with_pred_x0):
    args = _op_args(option_set)
    out = torch.empty_like(args[0])
    px = torch.empty_like(args[0]) if with_pred_x0 else None
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step_out.default, args + (out, px))


def test_opcheck_empty():
    torch.library.opcheck(torch.ops.ddim_fast.ddim_step.default, _op_args("guided_rng", shape=(0, 3, 4, 5)) + (True,))


# --------------------------------------------------------------------------------------------------
# ddim_step_check: the step's rules for the backends that are not C++ (Triton launcher, reference path)
# --------------------------------------------------------------------------------------------------

_CHECK = torch.ops.ddim_fast.ddim_step_check.default


@pytest.mark.parametrize("option_set", ["plain", "guided_rng", "v_clip_noise", "sample_threshold", "strided"])
def test_check_op_returns_the_launch_plan(option_set):
    """[prediction, clamp, noise kind, rng per row, flat] for each option set, and its schema passes opcheck
    (it returns ints, not tensors: no fake kernel; the step ops' fake kernels serve torch.compile)."""
    args = _op_args(option_set)
    x, m, table, step, g, p, c, t, u, n, r, temp = args
    plan = _CHECK(*args, None, None, False)
    want_prediction = {"epsilon": 0, "v_prediction": 1, "sample": 2}[p]
    want_clamp = 2 if t is not None else (1 if c is not None else 0)
    want_noise = 1 if n is not None else (2 if r is not None else 0)
    want_flat = option_set != "strided"
    assert plan == [want_prediction, want_clamp, want_noise, 0, int(want_flat)]
    torch.library.opcheck(_CHECK, args + (None, None, False), test_utils=("test_schema", "test_autograd_registration"))
    # Meta tensors (no data): the same decision from shapes, strides and storages alone (the offline Triton
    # compile check asks it about SD layouts this way).
    assert _CHECK(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args), None, None, False) == plan


@pytest.mark.parametrize("bad", ["guidance_nan", "temperature_inf", "clip_zero", "shape", "dtype", "out_overlap"])
def test_check_op_raises_exactly_what_the_cpp_op_raises(bad):
    """One set of rules: the check op and the C++ kernel raise the same exception type and message."""
    x, m, table, step, g, p, c, t, u, n, r, temp = _op_args("v_clip_noise")
    out = torch.empty_like(x)
    if bad == "guidance_nan":
        g = float("nan")
    elif bad == "temperature_inf":
        temp = float("inf")
    elif bad == "clip_zero":
        c = 0.0
    elif bad == "shape":
        m = m[:, :, :2]
    elif bad == "dtype":
        m = m.double()
    else:
        out = m[: x.shape[0]]
    args = (x, m, table, step, g, p, c, t, u, n, r, temp)
    with pytest.raises((ValueError, TypeError)) as from_kernel:
        torch.ops.ddim_fast.ddim_step_out(*args, out, None)
    with pytest.raises(type(from_kernel.value)) as from_check:
        _CHECK(*args, out, None, False)
    assert str(from_check.value).splitlines()[0] == str(from_kernel.value).splitlines()[0]


def test_check_op_allows_float64_only_when_asked():
    x, m, table, step, *rest = _op_args("plain")
    args = (x.double(), m.double(), table, step, *rest)
    assert _CHECK(*args, None, None, True)[4] == 1
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got Double"):
        _CHECK(*args, None, None, False)


def _compile_over_schedule(step_fn, backend: str):
    """Compile step_fn(x, model_output, table, step, rng) with fullgraph=True and run it over every row
    of the 10-step table by bumping the step tensor in place; compare with eager each step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step_fn, backend=counter, fullgraph=True)
    x, _ = _inputs((2, 4, 8, 8), torch.float32, guided=False, seed=41)
    rng = torch.tensor([77, 3])
    step_eager, step_compiled = schedule.step_index(0), schedule.step_index(0)
    x_eager, x_compiled = x.clone(), x.clone()
    for k in range(NUM_STEPS):
        mo = torch.randn((4, 4, 8, 8), generator=_gen(100 + k))
        e_out, e_x0 = step_fn(x_eager, mo, TABLE, step_eager, rng)
        c_out, c_x0 = compiled(x_compiled, mo, TABLE, step_compiled, rng)
        torch.testing.assert_close(c_out, e_out, rtol=0, atol=0, msg=f"x_prev at step {k}")
        torch.testing.assert_close(c_x0, e_x0, rtol=0, atol=0, msg=f"pred_x0 at step {k}")
        x_eager, x_compiled = e_out, c_out
        step_eager.add_(1)
        step_compiled.add_(1)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times over {NUM_STEPS} steps"
    # And the result equals the fp64 oracle run step by step.
    ref = x.double()
    for k in range(NUM_STEPS):
        mo = torch.randn((4, 4, 8, 8), generator=_gen(100 + k))
        ref, _ = _reference(ref, mo, TABLE, k, guidance_scale=7.5, rng_state=rng)
    assert_rel_close(x_compiled, ref, 1e-5, "10 compiled steps")


def _torch_ops_step(x, mo, table, step, rng):
    return torch.ops.ddim_fast.ddim_step(x, mo, table, step, 7.5, "epsilon", None, None, False, None, rng, 1.0, True)


def _wrapper_step(x, mo, table, step, rng):
    return ops.ddim_step(x, mo, table, step, guidance_scale=7.5, rng_state=rng, return_pred_x0=True)


def test_compile_torch_ops_once_over_schedule():
    _compile_over_schedule(_torch_ops_step, "aot_eager")


def test_compile_ops_wrapper_once_over_schedule():
    _compile_over_schedule(_wrapper_step, "inductor")


# --------------------------------------------------------------------------------------------------
# Backends of the front door
# --------------------------------------------------------------------------------------------------


def test_reference_backend_matches_native():
    x, mo = _inputs((2, 3, 6), torch.float32, guided=True)
    kw = dict(guidance_scale=7.5, rng_state=torch.tensor([1, 2]), return_pred_x0=True)
    native = ops.ddim_step(x, mo, TABLE, 4, **kw)
    ref = ops.ddim_step(x, mo, TABLE, 4, backend="reference", **kw)
    assert_rel_close(native[0], ref[0], 1e-6)
    assert_rel_close(native[1], ref[1], 1e-6)


def test_auto_backend_computes_float64_in_pytorch():
    # float64 latents (diffusers accepts them) pick the reference path by themselves and compute in float64.
    x, mo = _inputs((2, 3, 6), torch.float64, guided=True)
    out, x0 = ops.ddim_step(x, mo, TABLE, 4, guidance_scale=3.0, return_pred_x0=True)
    assert out.dtype == x0.dtype == torch.float64
    ref_out, ref_x0 = _reference(x, mo, TABLE, 4, guidance_scale=3.0)
    assert oracles.relative_error(out, ref_out) < 1e-14
    assert oracles.relative_error(x0, ref_x0) < 1e-14


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 4, 8, 8, device="meta")
    out, x0 = ops.ddim_step(x, torch.empty(4, 4, 8, 8, device="meta"), TABLE.to("meta"),
                            torch.zeros(1, dtype=torch.int64, device="meta"), guidance_scale=7.5,
                            return_pred_x0=True)
    assert out.device.type == "meta" and out.shape == x.shape and x0.shape == x.shape


NON_FINITE = [("guidance_scale", float("nan")), ("guidance_scale", float("inf")), ("guidance_scale", float("-inf")),
              ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", float("-inf")),
              ("clip_range", float("nan")), ("clip_range", 0.0), ("clip_range", -1.0), ("clip_range", float("-inf"))]
_NON_FINITE_MESSAGES = {"guidance_scale": "must be finite, got {v}", "temperature": "must be finite, got {v}",
                        "clip_range": r"must be > 0, got {v} \(inf clamps nothing\)"}


def _non_finite_call(name, value, entry):
    """The same bad scalar through the front door ('ops'), the raw functional op and the raw out variant."""
    x, mo = _inputs((2, 3, 6), torch.float32, guided=name == "guidance_scale")
    step = torch.tensor([4])
    kw = {"guidance_scale": None, "clip_range": None, "temperature": 1.0}
    kw[name] = value
    if entry == "ops":
        return lambda: ops.ddim_step(x, mo, TABLE, step, **{name: value})
    args = (x, mo, TABLE, step, kw["guidance_scale"], "epsilon", kw["clip_range"], None, False, None, None,
            kw["temperature"])
    if entry == "raw":
        return lambda: torch.ops.ddim_fast.ddim_step(*args, False)
    return lambda: torch.ops.ddim_fast.ddim_step_out(*args, torch.empty_like(x), None)


@pytest.mark.parametrize("entry", ["ops", "raw", "raw_out"])
@pytest.mark.parametrize("name, value", NON_FINITE)
def test_non_finite_scalars_rejected(name, value, entry):
    """NaN/inf guidance or temperature and NaN/non-positive clip_range are a ValueError naming the argument,
    with one message, whether the front door or the C++ op itself sees them (a raw torch.ops call too)."""
    message = f"ddim_step: {name} " + _NON_FINITE_MESSAGES[name].format(v=f"{value:g}")
    with pytest.raises(ValueError, match=message):
        _non_finite_call(name, value, entry)()


@pytest.mark.parametrize("reuse", [False, True])
def test_clip_range_inf_clamps_nothing(reuse):
    """clip_range=+inf is allowed everywhere: no clamping, and with use_clipped_model_output eps is re-derived
    from x0 (diffusers' behaviour), which differs from the model's eps only by rounding."""
    x, mo = _inputs((2, 3, 6, 5), torch.float32, guided=True, seed=8, x_scale=3.0)
    kw = dict(guidance_scale=7.5, use_clipped_model_output=reuse)
    out, x0 = ops.ddim_step(x, mo, TABLE, 4, clip_range=float("inf"), return_pred_x0=True, **kw)
    ref_out, ref_x0 = _reference(x, mo, TABLE, 4, clip_range=float("inf"), **kw)
    assert_rel_close(out, ref_out, torch.float32, "x_prev")
    assert_rel_close(x0, ref_x0, torch.float32, "pred_x0")
    unclamped = ops.ddim_step(x, mo, TABLE, 4, return_pred_x0=True, guidance_scale=7.5)
    assert torch.equal(x0, unclamped[1])  # nothing was clamped
    if not reuse:
        assert torch.equal(out, unclamped[0])
    raw = torch.ops.ddim_fast.ddim_step(x, mo, TABLE, torch.tensor([4]), 7.5, "epsilon", float("inf"), None, reuse,
                                        None, None, 1.0, True)
    assert torch.equal(raw[0], out) and torch.equal(raw[1], x0)


def test_reference_backend_accepts_float64():
    x, mo = _inputs((2, 3, 6), torch.float64, guided=False)
    out = ops.ddim_step(x, mo, TABLE, 4, backend="reference")
    assert out.dtype == torch.float64
    assert_rel_close(out, _reference(x, mo, TABLE, 4)[0], 1e-14)


# --------------------------------------------------------------------------------------------------
# `row` and its deprecated keyword name `step`
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_fn", [ops.ddim_step, reference.ddim_step], ids=["ops", "reference"])
def test_step_keyword_is_the_deprecated_name_of_row(step_fn):
    """The row positionally, as row=, or (deprecated, with a warning that names `row`) as step=: one result."""
    import warnings

    x, mo = _inputs((2, 3, 6), torch.float32, guided=True)
    want = step_fn(x, mo, TABLE, 4, guidance_scale=7.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # positional and row= warn about nothing
        got = [step_fn(x, mo, TABLE, row, guidance_scale=7.5) for row in (4, torch.tensor([4]))]
        got.append(step_fn(x, mo, TABLE, row=torch.tensor([4]), guidance_scale=7.5))
    with pytest.warns(DeprecationWarning, match=r"the keyword `step` is deprecated .*pass `row`") as record:
        got.append(step_fn(x, mo, TABLE, step=4, guidance_scale=7.5))
    assert record[0].filename == __file__  # points at the caller's line
    for g in got:
        assert torch.equal(g[0] if isinstance(g, tuple) else g, want[0] if isinstance(want, tuple) else want)
    with pytest.raises(TypeError, match="got both row and step"):
        step_fn(x, mo, TABLE, 4, step=4, guidance_scale=7.5)
    with pytest.raises(TypeError, match="missing the table row"):
        step_fn(x, mo, TABLE, guidance_scale=7.5)


# --------------------------------------------------------------------------------------------------
# Bad inputs: exception type and a message naming the argument
# --------------------------------------------------------------------------------------------------

_X = torch.randn(2, 3, 5)
_MO = torch.randn(2, 3, 5)
_ROW = torch.tensor([3])


def _call(**overrides):
    kw = dict(x=_X, model_output=_MO, table=TABLE, row=_ROW)
    kw.update(overrides)
    x, mo, table, row = kw.pop("x"), kw.pop("model_output"), kw.pop("table"), kw.pop("row")
    return lambda: ops.ddim_step(x, mo, table, row, **kw)


def _raw(**overrides):
    args = dict(x=_X, model_output=_MO, table=TABLE, row=_ROW, guidance_scale=None, prediction_type="epsilon",
                clip_range=None, x0_threshold=None, use_clipped_model_output=False, noise=None, rng_state=None,
                temperature=1.0, return_pred_x0=False)
    args.update(overrides)
    return lambda: torch.ops.ddim_fast.ddim_step(*args.values())


_BIG = torch.randn(3, 3, 5)
_OUT_SHARED = torch.empty(2, 3, 5)

BAD_INPUTS = {
    # dtypes
    "x_int": (_call(x=_X.int()), TypeError, "x must be a float32, float16, bfloat16 or float64 tensor, got torch.int32"),
    "x_float64_native": (_call(x=_X.double(), model_output=_MO.double(), backend="native"), TypeError,
                         "backend='native' supports float32/float16/bfloat16, got torch.float64"),
    "x_float64_promoted_triton": (_call(x=_X.double(), backend="triton"), TypeError,
                                  "backend='triton' supports float32/float16/bfloat16"),
    "model_output_int": (_call(model_output=_MO.long()), TypeError, "model_output must be a float32"),
    "table_float64": (_call(table=TABLE.double()), TypeError, "table must be float32, got Double"),
    "row_int32": (_call(row=_ROW.int()), TypeError, "row must be an int64 tensor, got Int"),
    "row_float": (_call(row=_ROW.float()), TypeError, "row must be an int64 tensor, got Float"),
    "rng_state_int32": (_call(rng_state=torch.tensor([1, 2], dtype=torch.int32)), TypeError,
                        r"rng_state must be int64 \(\[seed, offset\] or \[B, 2\]\), got Int"),
    "raw_rng_state_int32": (_raw(rng_state=torch.tensor([1, 2], dtype=torch.int32)), TypeError,
                            r"rng_state must be int64 \(\[seed, offset\] or \[B, 2\]\), got Int"),
    "reference_rng_state_int32": (_call(rng_state=torch.tensor([1, 2], dtype=torch.int32), backend="reference"),
                                  TypeError, r"rng_state must be int64 \(\[seed, offset\] or \[B, 2\]\), got Int"),
    "x0_threshold_half": (_call(x0_threshold=torch.ones(2, dtype=torch.half)), TypeError,
                          "x0_threshold must be float32, got Half"),
    "out_dtype": (_call(out=torch.empty(2, 3, 5, dtype=torch.half)), TypeError, "out must have x's dtype"),
    "raw_model_output_dtype": (_raw(model_output=_MO.half()), TypeError, "model_output must have x's dtype"),
    "raw_noise_dtype": (_raw(noise=_MO.half()), TypeError, "noise must have x's dtype"),
    # shapes
    "model_output_batch": (_call(model_output=torch.randn(4, 3, 5)), ValueError,
                           r"model_output batch must equal x's batch 2 \(or be 4 with guidance_scale set\), got 4"),
    "model_output_batch_guided": (_call(model_output=_MO, guidance_scale=7.5), ValueError,
                                  "with guidance_scale, model_output must stack .* expected batch 4, got 2"),
    "trailing_shape": (_call(model_output=torch.randn(2, 3, 6)), ValueError,
                       r"model_output must be \[B, \.\.\.\] or \[2B, \.\.\.\] with x's trailing shape \[3, 5\]"),
    "model_output_rank": (_call(model_output=torch.randn(2, 15)), ValueError, "with x's trailing shape"),
    "noise_shape": (_call(noise=torch.randn(2, 3, 4)), ValueError,
                    r"noise must have x's shape \[2, 3, 5\], got \[2, 3, 4\]"),
    "noise_broadcast": (_call(noise=torch.randn(1, 3, 5)), ValueError, "nothing is broadcast"),
    "out_shape": (_call(out=torch.empty(2, 3, 6)), ValueError, "out must have x's shape"),
    "pred_x0_out_shape": (_call(pred_x0_out=torch.empty(2, 3)), ValueError, "pred_x0_out must have x's shape"),
    "table_columns": (_call(table=TABLE[:, :7].contiguous()), ValueError,
                      r"table must be a contiguous \[num_rows, 8\] tensor, got \[10, 7\]"),
    "table_1d": (_call(table=TABLE.reshape(-1)), ValueError, r"table must be a contiguous \[num_rows, 8\]"),
    "table_non_contiguous": (_call(table=torch.cat([TABLE, TABLE], 1)[:, ::2]), ValueError,
                             r"table must be a contiguous \[num_rows, 8\] tensor, got \[10, 8\]"),
    "table_no_rows": (_call(table=torch.empty(0, 8)), ValueError, "table has no rows"),
    "row_two_elements": (_call(row=torch.tensor([1, 2])), ValueError,
                         "row must hold exactly one index, got 2 elements"),
    "row_empty": (_call(row=torch.empty(0, dtype=torch.int64)), ValueError, "row must hold exactly one index"),
    "row_past_end": (_call(row=torch.tensor([10])), IndexError,
                     "row index 10 is outside the coefficient table's 10 rows"),
    "row_negative": (_call(row=torch.tensor([-1])), IndexError, "row index -1 is outside"),
    "row_int_past_end": (_call(row=99), IndexError, "row index 99 is outside"),
    "raw_row_past_end": (_raw(row=torch.tensor([10])), IndexError, "row index 10 is outside"),
    "rng_state_shape": (_call(rng_state=torch.tensor([1, 2, 3])), ValueError,
                        r"rng_state must be a contiguous int64 tensor \[seed, offset\] or \[B, 2\] = \[2, 2\] "
                        r"\(one seed and offset per batch row\), got shape \[3\]"),
    "rng_state_rows_too_many": (_call(rng_state=torch.zeros(3, 2, dtype=torch.int64)), ValueError,
                                r"rng_state must be .* or \[B, 2\] = \[2, 2\] .*got shape \[3, 2\]"),
    "rng_state_rows_too_few": (_raw(rng_state=torch.zeros(1, 2, dtype=torch.int64)), ValueError,
                               r"rng_state must be .* or \[B, 2\] = \[2, 2\] .*got shape \[1, 2\]"),
    "rng_state_rows_three_columns": (_call(rng_state=torch.zeros(2, 3, dtype=torch.int64)), ValueError,
                                     r"rng_state must be .*got shape \[2, 3\]"),
    "rng_state_3d": (_raw(rng_state=torch.zeros(2, 1, 2, dtype=torch.int64)), ValueError,
                     r"rng_state must be .*got shape \[2, 1, 2\]"),
    "rng_state_rows_not_contiguous": (_call(rng_state=torch.zeros(2, 2, dtype=torch.int64).t()), ValueError,
                                      r"rng_state must be a contiguous int64 tensor"),
    "reference_rng_state_rows_shape": (_call(rng_state=torch.zeros(3, 2, dtype=torch.int64), backend="reference"),
                                       ValueError, r"rng_state must be .* = \[2, 2\] .*got shape \[3, 2\]"),
    "x0_threshold_shape": (_call(x0_threshold=torch.ones(3)), ValueError,
                           r"x0_threshold must be a contiguous \[B\] = \[2\] tensor, got \[3\]"),
    "x_0dim": (_call(x=torch.tensor(1.0), model_output=torch.tensor(1.0)), ValueError,
               "x must have a batch dimension, got a 0-dim tensor"),
    "x_9dims": (_call(x=torch.randn([1] * 9), model_output=torch.randn([1] * 9)), ValueError,
                "x may have at most 8 dims, got 9"),
    # option conflicts and ranges
    "noise_and_rng_state": (_call(noise=torch.randn(2, 3, 5), rng_state=torch.tensor([1, 2])), ValueError,
                            "give noise or rng_state, not both"),
    "clip_and_threshold": (_call(clip_range=1.0, x0_threshold=torch.ones(2)), ValueError,
                           "give clip_range or x0_threshold, not both"),
    "clip_range_zero": (_call(clip_range=0.0), ValueError, "clip_range must be > 0, got 0"),
    "clip_range_negative": (_call(clip_range=-1.0), ValueError, "clip_range must be > 0, got -1"),
    "prediction_type_unknown": (_call(prediction_type="noise"), ValueError,
                                r"prediction_type must be one of .*got 'noise'"),
    "raw_prediction_type_alias": (_raw(prediction_type="eps"), ValueError,
                                  "prediction_type must be 'epsilon', 'v_prediction' or 'sample', got 'eps'"),
    "temperature_nan": (_call(temperature=float("nan")), ValueError, "temperature must be finite, got nan"),
    "temperature_inf": (_raw(temperature=float("inf")), ValueError, "temperature must be finite"),
    "unknown_backend": (_call(backend="cuda"), ValueError, "backend must be one of"),
    # overlap
    "out_overlaps_model_output": (_call(out=_MO), ValueError, "out overlaps model_output"),
    "out_partially_overlaps_x": (_call(x=_BIG[:2], model_output=torch.randn(2, 3, 5), out=_BIG[1:]), ValueError,
                                 "out partially overlaps x; it may be x itself or disjoint from it"),
    "out_overlaps_noise": (_call(noise=_OUT_SHARED, out=_OUT_SHARED), ValueError, "out overlaps noise"),
    "pred_x0_out_overlaps_out": (_call(out=_OUT_SHARED, pred_x0_out=_OUT_SHARED), ValueError,
                                 "pred_x0_out overlaps out"),
    "pred_x0_out_overlaps_model_output": (_call(pred_x0_out=_MO), ValueError, "pred_x0_out overlaps model_output"),
    "out_internal_overlap": (_call(out=torch.empty(1, 1, 1).expand(2, 3, 5)), ValueError,
                             "out has internal overlap"),
    # non-tensor arguments
    "x_list": (_call(x=[1.0]), TypeError, "x must be a torch.Tensor, got list"),
    "model_output_none": (_call(model_output=None), TypeError, "model_output must be a torch.Tensor, got NoneType"),
    "table_list": (_call(table=[[1.0] * 8]), TypeError, "table must be a torch.Tensor, got list"),
    "row_str": (_call(row="3"), TypeError, "row must be a torch.Tensor, got str"),
    "row_bool": (_call(row=True), TypeError, "row must be an int64 tensor or an int, got bool"),
    "noise_list": (_call(noise=[0.0]), TypeError, "noise must be a torch.Tensor, got list"),
    "rng_state_tuple": (_call(rng_state=(1, 2)), TypeError, "rng_state must be a torch.Tensor, got tuple"),
    "x0_threshold_float": (_call(x0_threshold=1.5), TypeError, "x0_threshold must be a torch.Tensor, got float"),
    "guidance_scale_str": (_call(guidance_scale="7.5"), TypeError, "guidance_scale must be a float or None, got str"),
    "clip_range_bool": (_call(clip_range=True), TypeError, "clip_range must be a float or None, got bool"),
    "temperature_none": (_call(temperature=None), TypeError, "temperature must be a float, got None"),
    "prediction_type_int": (_call(prediction_type=1), TypeError, "prediction_type must be a str, got int"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    call, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        call()


def test_bad_inputs_leave_out_untouched():
    out = poison(torch.empty(2, 3, 5))
    with pytest.raises(IndexError):
        ops.ddim_step(_X, _MO, TABLE, torch.tensor([10]), out=out)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("arg", ["model_output", "table", "row"])
def test_device_mismatch_meta(arg):
    tensors = {"model_output": _MO, "table": TABLE, "row": _ROW}
    tensors[arg] = tensors[arg].to("meta")
    with pytest.raises(ValueError, match=f"{arg} must be on x's device cpu, got meta"):
        ops.ddim_step(_X, tensors["model_output"], tensors["table"], tensors["row"])
