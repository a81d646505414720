"""The Triton ddim_step ops against the float64 oracle (tests/oracles.py) and against the C++ op.

On this CPU machine the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)
on CPU tensors, so shapes are tiny except one 2x4x64x64 case. On a GPU machine the same tests run on
CUDA tensors (the device is picked by `DEVICE`). The case builders here are also used by
tests/test_ddim_step_cuda.py and tests/test_graph_safety.py.
"""

from __future__ import annotations

import pytest
import torch

import ddim_fast.ops  # noqa: F401  (loads the C++ extension: torch.ops.ddim_fast.*)
import oracles
from conftest import DTYPES, assert_fully_written, assert_rel_close, misaligned, poison
from ddim_fast import reference, schedule
from ddim_fast.triton import ddim_step as triton_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PREDICTIONS = ("epsilon", "v_prediction", "sample")

# |z_triton - z_cpp| for the same Philox words: fp32 rounding of log/sqrt/sin/cos (an ulp or two of
# values up to ~5.6) plus approximate transcendental instructions on the GPU.
NORMALS_ATOL = 2e-5


# --------------------------------------------------------------------------------------------------
# Case builders
# --------------------------------------------------------------------------------------------------


def make_table(device, eta: float = 0.7) -> torch.Tensor:
    """A 6-row table over the whole alpha range (sigma > 0 so the noise term matters)."""
    alphas = [0.0047, 0.05, 0.3, 0.6, 0.9, 0.991]
    alphas_prev = alphas[1:] + [0.9991]
    sigmas = schedule.ddim_sigmas(alphas, alphas_prev, eta)
    return schedule.coefficient_table([981, 781, 581, 381, 181, 1], alphas, alphas_prev, sigmas, device=device)


def make_case(shape, dtype, device, *, guided=True, noise="tensor", clamp=None, seed=0, row=2):
    """Random inputs of one step: a dict of the op's keyword-like arguments (tensors on `device`)."""
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    mo_shape = (2 * batch, *shape[1:]) if guided else tuple(shape)
    case = dict(
        x=torch.randn(shape, generator=gen).to(dtype).to(device),
        model_output=torch.randn(mo_shape, generator=gen).to(dtype).to(device),
        table=make_table(device),
        row=torch.tensor([row], dtype=torch.int64, device=device),
        guidance_scale=7.5 if guided else None,
        prediction_type="epsilon",
        clip_range=None,
        x0_threshold=None,
        use_clipped_model_output=False,
        noise=None,
        rng_state=None,
        temperature=1.0,
    )
    if noise == "tensor":
        case["noise"] = torch.randn(shape, generator=gen).to(dtype).to(device)
    elif noise == "philox":
        case["rng_state"] = torch.tensor([0x1234_5678_9ABC + seed, 7], dtype=torch.int64, device=device)
    if clamp == "static":
        case["clip_range"] = 1.5
    elif clamp == "dynamic":
        case["x0_threshold"] = (1.0 + 2.0 * torch.rand(batch, generator=gen)).to(device)
    return case


ARG_ORDER = ("x", "model_output", "table", "row", "guidance_scale", "prediction_type", "clip_range",
             "x0_threshold", "use_clipped_model_output", "noise", "rng_state", "temperature")


def positional(case) -> list:
    return [case[k] for k in ARG_ORDER]


def run_functional(backend: str, case, return_pred_x0=True):
    op = triton_step.ddim_step_triton if backend == "triton" else torch.ops.ddim_fast.ddim_step
    return op(*positional(case), return_pred_x0)


def run_out(backend: str, case, out, pred_x0_out):
    op = triton_step.ddim_step_triton_out if backend == "triton" else torch.ops.ddim_fast.ddim_step_out
    op(*positional(case), out, pred_x0_out)


def reference_for(case):
    """(x_prev, pred_x0) of the float64 oracle (tests/oracles.py), the seeded noise drawn by the numpy Philox."""
    noise = case["noise"]
    if case["rng_state"] is not None:
        noise = reference.seeded_noise(case["rng_state"].cpu(), int(case["row"].item()), case["x"].shape,
                                       torch.float64)
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in case.items()}
    return oracles.ddim_step(
        cpu["x"], cpu["model_output"], cpu["table"], cpu["row"], guidance_scale=cpu["guidance_scale"],
        prediction_type=cpu["prediction_type"], clip_range=cpu["clip_range"], x0_threshold=cpu["x0_threshold"],
        use_clipped_model_output=cpu["use_clipped_model_output"],
        noise=None if noise is None else noise.cpu(), temperature=cpu["temperature"])


def check_case(backend: str, case, what: str = ""):
    """Functional and out variants (poisoned outputs) against the reference, with the dtype's tolerance."""
    dtype = case["x"].dtype
    ref_out, ref_x0 = reference_for(case)
    out, pred_x0 = run_functional(backend, case)
    assert out.dtype == dtype and pred_x0.dtype == dtype
    assert_rel_close(out, ref_out, dtype, f"{backend} x_prev {what}")
    assert_rel_close(pred_x0, ref_x0, dtype, f"{backend} pred_x0 {what}")
    out2 = poison(torch.empty_like(case["x"]))
    x0_2 = poison(torch.empty_like(case["x"]))
    run_out(backend, case, out2, x0_2)
    assert_fully_written(out2, f"{backend} out {what}")
    assert_fully_written(x0_2, f"{backend} pred_x0_out {what}")
    assert torch.equal(out2, out) and torch.equal(x0_2, pred_x0), f"{backend}: out variant != functional {what}"
    # Without pred_x0 (what a sampler's ordinary step asks for; on CUDA the lean kernel when the layout allows):
    # the same bits.
    out3, _ = run_functional(backend, case, return_pred_x0=False)
    out4 = poison(torch.empty_like(case["x"]))
    run_out(backend, case, out4, None)
    assert torch.equal(out3, out) and torch.equal(out4, out), f"{backend}: x_prev without pred_x0 differs {what}"


# --------------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "nocfg"])
def test_matches_reference(dtype, prediction_type, guided):
    case = make_case((3, 5, 7, 9), dtype, DEVICE, guided=guided, seed=hash((str(dtype), prediction_type)) % 997)
    case["prediction_type"] = prediction_type
    check_case("triton", case)


@pytest.mark.parametrize("clamp", ["static", "dynamic"])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_clamp_options(clamp, use_clipped, prediction_type):
    case = make_case((2, 3, 5, 7), torch.float32, DEVICE, clamp=clamp, seed=11)
    case["prediction_type"] = prediction_type
    case["use_clipped_model_output"] = use_clipped
    ref_out, ref_x0 = reference_for(case)
    # The clamp must actually bite, or this test could not fail.
    unclamped = reference_for({**case, "clip_range": None, "x0_threshold": None})[1]
    assert not torch.allclose(unclamped, ref_x0)
    check_case("triton", case, f"{clamp} clipped={use_clipped}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_philox_noise_and_temperature(dtype):
    case = make_case((2, 3, 7, 5), dtype, DEVICE, noise="philox", seed=3)
    case["temperature"] = 0.6
    check_case("triton", case, "philox")
    # Another row draws other noise (offset + row).
    out_a = run_functional("triton", case)[0]
    out_b = run_functional("triton", {**case, "table": case["table"][[2, 2]].contiguous(),
                                      "row": torch.tensor([1], device=DEVICE)})[0]
    same_row = run_functional("triton", {**case, "table": case["table"][[2, 2]].contiguous(),
                                         "row": torch.tensor([0], device=DEVICE)})[0]
    assert not torch.equal(out_a, out_b) and not torch.equal(same_row, out_b)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1, 1, 5), (3, 4, 2, 1, 3), (1, 4, 13)])
def test_odd_sizes(shape):
    for noise in ("tensor", "philox"):
        check_case("triton", make_case(shape, torch.float32, DEVICE, noise=noise, clamp="dynamic"), f"{shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned_views(dtype):
    shape = (2, 3, 6, 10)
    base = make_case(shape, dtype, DEVICE, noise="tensor", seed=5)
    views = {
        # dense but permuted (what channels_last produces)
        "permuted": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        # not dense: every other column of a wider tensor
        "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2],
        # storage offset of one element: no 16-byte alignment
        "misaligned": misaligned,
    }
    for name, view in views.items():
        case = dict(base)
        for key in ("x", "model_output", "noise"):
            case[key] = view(base[key])
        assert case["x"].data_ptr() != base["x"].data_ptr()
        check_case("triton", case, name)
        # strided outputs too
        out = poison(view(torch.empty_like(base["x"])))
        x0 = poison(view(torch.empty_like(base["x"])))
        run_out("triton", case, out, x0)
        assert_fully_written(out, name)
        ref_out, ref_x0 = reference_for(case)
        assert_rel_close(out, ref_out, dtype, f"strided out {name}")
        assert_rel_close(x0, ref_x0, dtype, f"strided pred_x0 {name}")


def test_more_than_four_strided_dims_falls_back():
    # 6-D, strided in every dim: cannot collapse to 4 dims -> contiguous copies, results unchanged.
    case = make_case((2, 3, 2, 3, 2, 4), torch.float32, DEVICE, noise="philox", clamp="dynamic", seed=9)
    for key in ("x", "model_output"):
        t = case[key]
        big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype, device=t.device)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        case[key] = view
    out_base = torch.zeros([2 * s for s in case["x"].shape], device=DEVICE)
    out = poison(out_base[tuple(slice(None, None, 2) for _ in case["x"].shape)])
    run_out("triton", case, out, None)
    assert_fully_written(out)
    assert_rel_close(out, reference_for(case)[0], torch.float32, "6-D strided")
    assert out_base[1::2].eq(0).all(), "wrote outside the view"


def test_in_place_update():
    case = make_case((2, 4, 5, 3), torch.float32, DEVICE, noise="philox")
    ref_out, _ = reference_for(case)
    x = case["x"]
    run_out("triton", case, x, None)
    assert_rel_close(x, ref_out, torch.float32, "in-place")


@pytest.mark.parametrize("shape", [(0, 4, 8, 8), (2, 0, 3), (3, 4, 0)])
def test_empty(shape):
    case = make_case(shape, torch.float32, DEVICE)
    out, pred_x0 = run_functional("triton", case)
    assert out.shape == shape and pred_x0.shape == shape
    run_out("triton", case, torch.empty(shape, device=DEVICE), None)


def test_pred_x0_only_when_asked():
    case = make_case((2, 3, 4, 5), torch.float16, DEVICE)
    out, pred_x0 = run_functional("triton", case, return_pred_x0=False)
    assert pred_x0.shape == (0,)
    assert_rel_close(out, reference_for(case)[0], torch.float16)


@pytest.mark.parametrize("bad_row", [-1, 6, 1 << 40])
def test_out_of_range_row_writes_nan(bad_row):
    case = make_case((2, 3, 4, 5), torch.float32, DEVICE, clamp="static")
    case["row"] = torch.tensor([bad_row], device=DEVICE)
    out, pred_x0 = run_functional("triton", case)
    assert torch.isnan(out).all() and torch.isnan(pred_x0).all()


@pytest.mark.slow
def test_real_size_fp16():
    case = make_case((2, 4, 64, 64), torch.float16, DEVICE, noise="philox", clamp="dynamic", seed=21)
    case["use_clipped_model_output"] = True
    check_case("triton", case, "2x4x64x64 fp16")


# --------------------------------------------------------------------------------------------------
# Against the C++ op (CPU kernel here, CUDA kernel on a GPU machine)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", ["cfg-tensor", "philox-dynamic-v", "nocfg-static-sample-clipped"])
def test_matches_cpp_op(dtype, options):
    case = make_case((3, 4, 9, 7), dtype, DEVICE, guided="nocfg" not in options,
                     noise="philox" if "philox" in options else "tensor",
                     clamp="dynamic" if "dynamic" in options else ("static" if "static" in options else None))
    case["prediction_type"] = {"v": "v_prediction", "sample": "sample"}.get(options.split("-")[-1], "epsilon")
    if "clipped" in options:
        case["prediction_type"] = "sample"
        case["use_clipped_model_output"] = True
    tri_out, tri_x0 = run_functional("triton", case)
    cpp_out, cpp_x0 = run_functional("native", case)
    # Both are fp32 math on the same inputs: for fp32 storage they agree far inside the contract;
    # for fp16/bf16 they may differ by one rounding of the stored output.
    tol = 2e-7 if dtype == torch.float32 else 0.5 * {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_rel_close(tri_out, cpp_out, tol, "triton vs C++ x_prev")
    assert_rel_close(tri_x0, cpp_x0, tol, "triton vs C++ pred_x0")


def normals_case(seed: int, offset: int, shape, device):
    """A step whose x_prev is exactly the seeded normal z: sqrt(a_prev) = 0, dir = 0, sigma = 1."""
    table = schedule.coefficient_table([1], [0.5], [0.0], [1.0], device=device)
    return dict(
        x=torch.zeros(shape, device=device), model_output=torch.zeros(shape, device=device), table=table,
        row=torch.tensor([0], device=device), guidance_scale=None, prediction_type="epsilon", clip_range=None,
        x0_threshold=None, use_clipped_model_output=False, noise=None,
        rng_state=torch.tensor([seed, offset], dtype=torch.int64, device=device), temperature=1.0)


@pytest.mark.parametrize("seed,offset", [(0, 0), (42, 3), (-1, (1 << 40) + 5), (0x7FFF_FFFF_FFFF_FFFF, -7)])
def test_same_seed_same_normals(seed, offset):
    shape = (3, 5, 11)  # 165 elements: 41 full Philox groups and a partial one
    case = normals_case(seed, offset, shape, DEVICE)
    z_triton = run_functional("triton", case)[0].cpu().double()
    z_cpp = run_functional("native", case)[0].cpu().double()
    z_ref = reference.philox_normal(seed, offset, shape, torch.float64)
    assert (z_triton - z_ref).abs().max().item() <= NORMALS_ATOL
    assert (z_cpp - z_ref).abs().max().item() <= NORMALS_ATOL
    assert (z_triton - z_cpp).abs().max().item() <= NORMALS_ATOL
    assert 0.7 < z_ref.std().item() < 1.3  # really normals, not zeros


# --------------------------------------------------------------------------------------------------
# Validation: the C++ op's rules and messages
# --------------------------------------------------------------------------------------------------


def _bad_cases():
    d = DEVICE
    good = lambda: make_case((2, 3, 4), torch.float32, d)  # noqa: E731
    yield "0-dim x", {"x": torch.tensor(1.0, device=d)}
    yield "float64 x", {"x": torch.zeros(2, 3, 4, dtype=torch.float64, device=d)}
    yield "model_output dtype", {"model_output": torch.zeros(4, 3, 4, dtype=torch.float16, device=d)}
    yield "model_output shape", {"model_output": torch.zeros(4, 3, 5, device=d)}
    yield "guided batch", {"model_output": torch.zeros(2, 3, 4, device=d)}
    yield "unguided batch", {"guidance_scale": None}
    yield "table dtype", {"table": good()["table"].double()}
    yield "table shape", {"table": torch.zeros(3, 7, device=d)}
    yield "table rows", {"table": torch.zeros(0, 8, device=d)}
    yield "row dtype", {"row": torch.tensor([1], dtype=torch.int32, device=d)}
    yield "row numel", {"row": torch.tensor([1, 2], device=d)}
    yield "prediction", {"prediction_type": "eps"}
    yield "both clamps", {"clip_range": 1.0, "x0_threshold": torch.ones(2, device=d)}
    yield "clip_range", {"clip_range": -1.0}
    yield "threshold shape", {"x0_threshold": torch.ones(3, device=d)}
    yield "threshold dtype", {"x0_threshold": torch.ones(2, dtype=torch.float16, device=d)}
    yield "noise and rng", {"rng_state": torch.tensor([1, 2], device=d)}
    yield "noise shape", {"noise": torch.zeros(2, 3, 5, device=d)}
    yield "rng shape", {"noise": None, "rng_state": torch.tensor([1, 2, 3], device=d)}
    yield "rng dtype", {"noise": None, "rng_state": torch.tensor([1.0, 2.0], device=d)}
    yield "rng rows", {"noise": None, "rng_state": torch.zeros(3, 2, dtype=torch.int64, device=d)}
    yield "rng columns", {"noise": None, "rng_state": torch.zeros(2, 3, dtype=torch.int64, device=d)}
    yield "rng rows strided", {"noise": None, "rng_state": torch.zeros(2, 2, dtype=torch.int64, device=d).t()}
    yield "temperature", {"temperature": float("inf")}
    yield "temperature nan", {"temperature": float("nan")}
    yield "guidance nan", {"guidance_scale": float("nan")}
    yield "guidance inf", {"guidance_scale": float("inf")}
    yield "guidance -inf", {"guidance_scale": float("-inf")}
    yield "clip_range nan", {"clip_range": float("nan")}
    yield "clip_range zero", {"clip_range": 0.0}


@pytest.mark.parametrize("name,change", list(_bad_cases()), ids=[n for n, _ in _bad_cases()])
def test_validation_matches_cpp(name, change):
    case = {**make_case((2, 3, 4), torch.float32, DEVICE), **change}
    errors = []
    for backend in ("native", "triton"):
        with pytest.raises((ValueError, TypeError)) as info:
            run_functional(backend, case)
        errors.append(info)
    cpp, tri = errors
    assert cpp.type is tri.type, f"{name}: C++ raised {cpp.type.__name__}, Triton {tri.type.__name__}"
    assert str(cpp.value).splitlines()[0] == str(tri.value).splitlines()[0]
    # The out variants check the same way.
    for op in (torch.ops.ddim_fast.ddim_step_out, triton_step.ddim_step_triton_out):
        with pytest.raises(cpp.type) as info:
            op(*positional(case), torch.empty_like(case["x"]), None)
        assert str(info.value).splitlines()[0] == str(cpp.value).splitlines()[0]


def test_validation_of_written_args():
    case = make_case((2, 3, 4), torch.float32, DEVICE)
    x = case["x"]
    expanded = torch.zeros(1, 3, 4, device=DEVICE).expand(2, 3, 4)
    bad = {
        "internal overlap": (expanded, None, "out has internal overlap"),
        "overlaps model_output": (case["model_output"][:2], None, "out overlaps model_output"),
        "pred_x0 overlaps out": (torch.empty_like(x), "same", "pred_x0_out overlaps out"),
    }
    # out shares x's storage, shifted by one element
    shifted_storage = torch.zeros(x.numel() + 1, device=DEVICE)
    case_shift = {**case, "x": shifted_storage[:-1].view(2, 3, 4)}
    with pytest.raises(ValueError, match="out partially overlaps x"):
        run_out("triton", case_shift, shifted_storage[1:].view(2, 3, 4), None)
    for name, (out, x0, msg) in bad.items():
        x0 = out if x0 == "same" else x0
        with pytest.raises(ValueError, match=msg):
            run_out("triton", case, out, x0)
        with pytest.raises(ValueError, match=msg):
            run_out("native", case, out, x0)


# --------------------------------------------------------------------------------------------------
# torch.library contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["tensor", "philox", "philox-rows", "channels_last"])
def test_opcheck(noise):
    case = make_case((2, 3, 4, 5), torch.float32, DEVICE, noise="tensor" if noise == "channels_last" else noise,
                     clamp="dynamic")
    if noise == "philox-rows":
        case["rng_state"] = rows_state(STREAMS[:2], DEVICE)
    if noise == "channels_last":
        for key in ("x", "model_output", "noise"):
            case[key] = case[key].contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(triton_step.ddim_step_triton, tuple(positional(case)) + (True,))
    out, x0 = torch.empty_like(case["x"]), torch.empty_like(case["x"])
    torch.library.opcheck(triton_step.ddim_step_triton_out, tuple(positional(case)) + (out, x0))


# --------------------------------------------------------------------------------------------------
# Seeded noise per sample (rng_state [B, 2])
# --------------------------------------------------------------------------------------------------

STREAMS = [(0x1234_5678_9ABC + 31 * b, 5 * b + (b << 36)) for b in range(8)]


def rows_state(streams, device) -> torch.Tensor:
    return torch.tensor([list(s) for s in streams], dtype=torch.int64, device=device)


def rows_normals_case(streams, sample_shape, device, dtype=torch.float32, row=0):
    """A step whose x_prev is the per-row seeded normal z (sqrt(a_prev) = 0, dir = 0, sigma = 1)."""
    shape = (len(streams),) + tuple(sample_shape)
    case = normals_case(0, 0, shape, device)
    case["x"], case["model_output"] = case["x"].to(dtype), case["model_output"].to(dtype)
    case["rng_state"] = rows_state(streams, device)
    case["table"] = schedule.coefficient_table([1] * (row + 1), [0.5] * (row + 1), [0.0] * (row + 1),
                                               [1.0] * (row + 1), device=device)
    case["row"] = torch.tensor([row], device=device)
    return case


# sample_numel % 8 == 0, % 4 == 0 only (fp16's 8-element rows straddle two samples), % 4 != 0 (padded groups).
ROW_SAMPLE_SHAPES = [(4, 6, 6), (3, 2, 2), (3, 5, 7), (1, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample_shape", ROW_SAMPLE_SHAPES, ids=str)
def test_per_row_noise_belongs_to_the_sample(dtype, sample_shape):
    """Bit-identical noise for a sample whether it is row 0 of a batch of 1 or row 5 of a batch of 8; equal to
    the per-row reference, and to the C++ op's per-row draw to fp32 rounding of the transcendentals."""
    z8 = run_functional("triton", rows_normals_case(STREAMS, sample_shape, DEVICE, dtype, row=2))[0]
    for b in (0, 5, 7):
        alone = run_functional("triton", rows_normals_case([STREAMS[b]], sample_shape, DEVICE, dtype, row=2))[0]
        assert torch.equal(alone[0], z8[b]), f"row {b} of 8 != batch of 1"
    expected = reference.philox_normal_rows([(s, o + 2) for s, o in STREAMS], z8.shape, torch.float64)
    if dtype == torch.float32:
        assert (z8.cpu().double() - expected).abs().max().item() <= NORMALS_ATOL
    else:
        assert_rel_close(z8, expected, dtype, "per-row normals")
    z_cpp = run_functional("native", rows_normals_case(STREAMS, sample_shape, DEVICE, dtype, row=2))[0]
    if dtype == torch.float32:
        assert (z8 - z_cpp).abs().max().item() <= NORMALS_ATOL
    else:  # one storage rounding apart at most
        assert_rel_close(z8, z_cpp, 0.5 * {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], "triton vs C++")


def test_per_row_state_of_one_row_equals_the_one_stream_state():
    for sample_shape in ((3, 5, 7), (4, 8, 8)):
        rows = run_functional("triton", rows_normals_case([(42, 9)], sample_shape, DEVICE))[0]
        flat = run_functional("triton", normals_case(42, 9, (1,) + sample_shape, DEVICE))[0]
        assert torch.equal(rows, flat)


@pytest.mark.parametrize("layout", ["permuted", "sliced"])
def test_per_row_noise_strided(layout):
    sample_shape = (3, 5, 7)
    case = rows_normals_case(STREAMS[:3], sample_shape, DEVICE, torch.float16, row=1)
    contiguous = run_functional("triton", case)[0]
    view = {"permuted": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
            "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2]}[layout]
    strided = dict(case, x=view(case["x"]), model_output=view(case["model_output"]))
    assert torch.equal(run_functional("triton", strided)[0], contiguous)
    out = poison(view(torch.empty_like(case["x"])))
    run_out("triton", strided, out, None)
    assert torch.equal(out, contiguous)


def test_per_row_noise_in_a_full_step():
    case = make_case((3, 4, 5, 7), torch.float32, DEVICE, noise="philox", clamp="dynamic", seed=4)
    case["rng_state"] = rows_state(STREAMS[:3], DEVICE)
    case["temperature"] = 0.7
    check_case("triton", case, "per-row philox")


# --------------------------------------------------------------------------------------------------
# Memory formats
# --------------------------------------------------------------------------------------------------


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (1, 4, 64, 64)], ids=str)
@pytest.mark.parametrize("noise", ["tensor", "philox", "philox-rows", "none"])
def test_channels_last_keeps_layout_and_values(dtype, shape, noise):
    """channels_last in, channels_last out, bit-identical to the contiguous computation."""
    case = make_case(shape, dtype, DEVICE, noise="none" if noise == "none" else noise.split("-")[0],
                     clamp="dynamic", seed=3)
    if noise == "philox-rows":
        case["rng_state"] = rows_state(STREAMS[: shape[0]], DEVICE)
    want_out, want_x0 = run_functional("triton", case)
    cl_case = dict(case, x=_cl(case["x"]), model_output=_cl(case["model_output"]))
    if case["noise"] is not None:
        cl_case["noise"] = _cl(case["noise"])
    out, x0 = run_functional("triton", cl_case)
    assert out.stride() == cl_case["x"].stride() and x0.stride() == cl_case["x"].stride()
    assert torch.equal(out, want_out) and torch.equal(x0, want_x0)
    buf, buf_x0 = poison(torch.empty_like(cl_case["x"])), poison(torch.empty_like(cl_case["x"]))
    run_out("triton", cl_case, buf, buf_x0)
    assert torch.equal(buf, want_out) and torch.equal(buf_x0, want_x0)


def _plan_of(case, out=None, pred_x0=None):
    """The launcher's plan for a case (its layout and noise decisions), as run_ddim_step computes it."""
    x, mo = case["x"], case["model_output"]
    b = x.shape[0]
    uncond, cond = (mo[:b], mo[b:]) if case["guidance_scale"] is not None else (mo, None)
    out = torch.empty_like(x) if out is None else out
    args = [x, uncond, x if cond is None else cond, x if case["noise"] is None else case["noise"], out,
            out if pred_x0 is None else pred_x0]
    noise_mode = (triton_step._NOISE_TENSOR if case["noise"] is not None else
                  triton_step._NOISE_PHILOX if case["rng_state"] is not None else triton_step._NOISE_NONE)
    per_row = case["rng_state"] is not None and case["rng_state"].dim() == 2
    # The memory-order decision is the C++ rules' (ddim_step_check), as in run_ddim_step.
    flat = torch.ops.ddim_fast.ddim_step_check(
        x, mo, case["table"], case["row"], case["guidance_scale"], case["prediction_type"], case["clip_range"],
        case["x0_threshold"], case["use_clipped_model_output"], case["noise"], case["rng_state"],
        case["temperature"], out, pred_x0, False)[4]
    return triton_step._plan(x.shape, tuple(a.stride() for a in args), x.dtype, noise_mode, per_row, flat)


def test_launch_plan_runs_dense_shared_layouts_in_memory_order():
    """The launcher's choice: channels_last (every argument dense, one layout) takes the CONTIGUOUS
    (memory-order, 16-byte) path unless Philox needs logical indices; mixed layouts take the strided path."""
    shape = (2, 4, 9, 7)
    base = make_case(shape, torch.float16, DEVICE, noise="tensor", clamp="dynamic")
    cl = dict(base, x=_cl(base["x"]), model_output=_cl(base["model_output"]), noise=_cl(base["noise"]))
    assert _plan_of(base).contiguous
    assert _plan_of(cl).contiguous, "channels_last must run in memory order"
    assert not _plan_of(dict(cl, noise=base["noise"])).contiguous  # mixed layouts: strided
    philox = dict(cl, noise=None, rng_state=torch.tensor([1, 2], device=DEVICE))
    assert not _plan_of(philox).contiguous  # Philox needs the logical index: strided
    assert _plan_of(dict(base, noise=None, rng_state=torch.tensor([1, 2], device=DEVICE))).contiguous
    rows_odd = make_case((2, 3, 5, 7), torch.float16, DEVICE, noise="philox")
    rows_odd["rng_state"] = rows_state(STREAMS[:2], DEVICE)
    assert _plan_of(rows_odd).noise == triton_step._NOISE_PHILOX_ROWS_PADDED  # 3*5*7 % 4 != 0
    rows_even = make_case((2, 4, 9, 7), torch.float16, DEVICE, noise="philox")
    rows_even["rng_state"] = rows_state(STREAMS[:2], DEVICE)
    assert _plan_of(rows_even).noise == triton_step._NOISE_PHILOX_ROWS and _plan_of(rows_even).contiguous
    # The plan is cached: one object per (shape, strides, dtype, options).
    assert _plan_of(cl) is _plan_of(cl)


def test_non_dense_and_batch_inner_layouts_stay_correct():
    """Layouts the memory-order path must not take: a batch dim that is not outermost with dynamic
    thresholding (the sample is not position // sample_numel), and a dense but permuted layout with Philox."""
    case = make_case((3, 4, 5, 6), torch.float32, DEVICE, noise="tensor", clamp="dynamic", seed=12)
    batch_inner = lambda t: t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # noqa: E731
    moved = dict(case, x=batch_inner(case["x"]), noise=batch_inner(case["noise"]),
                 model_output=batch_inner(case["model_output"]))
    assert not _plan_of(moved).contiguous
    want_out, want_x0 = run_functional("triton", case)
    out, x0 = run_functional("triton", moved)
    assert torch.equal(out, want_out) and torch.equal(x0, want_x0)
    assert_rel_close(out, reference_for(case)[0], torch.float32)


def test_repeated_launches_reuse_the_compiled_kernel_with_the_jit_arguments(monkeypatch):
    """The eager fast path (issue 19): the first launch of a specialization goes through Triton's JIT; later
    launches with the same key call the CompiledKernel the JIT returned, with the very arguments the JIT
    would have bound (all parameters in signature order, constexprs included) on the same grid; a launch
    that specializes differently (a misaligned pointer, another table length, other options) goes through
    the JIT again. On a GPU the tests above run this path for real; here a stand-in records the calls."""
    calls = []

    class FakeCompiled:
        function = object()

        def __getitem__(self, grid):
            return lambda *args: calls.append(("compiled", grid, args))

    class FakeJit:
        arg_names = triton_step._ddim_step_kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, num_warps, **constexprs):
                calls.append(("jit", grid, args + tuple(constexprs[n] for n in triton_step._CONSTEXPR_NAMES)))
                return FakeCompiled()
            return launch

    monkeypatch.setattr(triton_step, "_ddim_step_kernel", FakeJit())
    monkeypatch.setattr(triton_step, "_LAUNCHERS", {})
    case = make_case((2, 4, 8, 8), torch.float32, DEVICE, noise="tensor")
    run_functional("triton", case)
    run_functional("triton", case)
    assert [c[0] for c in calls] == ["jit", "compiled"]
    assert calls[0][1] == calls[1][1]  # the same grid
    jit_args, fast_args = calls[0][2], calls[1][2]
    assert len(fast_args) == len(triton_step._ddim_step_kernel.arg_names)  # every parameter, constexprs too
    for a, b in zip(jit_args, fast_args):  # the outputs are fresh tensors per call; everything else is identical
        assert type(a) is type(b) and (isinstance(a, torch.Tensor) or a == b)
    misaligned_x = dict(case, x=misaligned(case["x"]))
    run_functional("triton", misaligned_x)
    longer_table = dict(case, table=torch.cat([case["table"], case["table"]]))
    run_functional("triton", longer_table)
    run_functional("triton", dict(case, prediction_type="v_prediction"))
    assert [c[0] for c in calls] == ["jit", "compiled", "jit", "jit", "jit"]
    run_functional("triton", longer_table)
    assert calls[-1][0] == "compiled"
