"""The CUDA ddim_step kernels (native CUDA C++ and Triton) on a GPU: the whole matrix against the
float64 oracle (tests/oracles.py), against the C++ CPU op (seeded noise included), misaligned and strided views (all
three CUDA paths: 16-byte vector, contiguous scalar, strided), empty tensors, a tensor over 2^31 elements
when memory allows, and opcheck. Everything here skips without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import ddim_fast.ops  # noqa: F401  (loads the C++ extension)
from conftest import DTYPES, assert_fully_written, assert_rel_close, misaligned, poison, requires_cuda
from ddim_fast import ops, reference
from kernel_profile import launched_kernels
from test_ddim_step_triton import (NORMALS_ATOL, PREDICTIONS, check_case, make_case, normals_case, positional,
                                   reference_for, run_functional, run_out)

pytestmark = requires_cuda
BACKENDS = ("native", "triton")


@pytest.fixture(autouse=True, scope="module")
def _needs_cuda_kernel():
    if torch.cuda.is_available() and not ops.has_native_kernel("cuda"):
        pytest.fail("the C++ extension was built without its CUDA kernels (see setup.py's build message)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("noise", ["none", "tensor", "philox"])
def test_matrix(backend, dtype, prediction_type, guided, noise):
    case = make_case((3, 4, 17, 9), dtype, "cuda", guided=guided, noise=noise, seed=len(prediction_type))
    case["prediction_type"] = prediction_type
    check_case(backend, case, f"{prediction_type} {noise}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamp", ["static", "dynamic"])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamps(backend, clamp, use_clipped, dtype):
    case = make_case((3, 4, 9, 11), dtype, "cuda", clamp=clamp, noise="philox", seed=2)
    case["use_clipped_model_output"] = use_clipped
    case["temperature"] = 0.8
    check_case(backend, case, f"{clamp} clipped={use_clipped}")


# numel % 8 != 0 exercises the vector path's scalar tail; 1-element and 4-D odd shapes the rest.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 3, 5), (3, 4, 13, 7), (2, 4, 64, 64), (16, 4, 33, 31)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_sizes(backend, shape, dtype):
    check_case(backend, make_case(shape, dtype, "cuda", noise="philox", clamp="dynamic"), f"{shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", ["misaligned", "permuted", "sliced", "misaligned-out"])
def test_views(backend, dtype, view):
    shape = (2, 4, 12, 10)
    base = make_case(shape, dtype, "cuda", noise="tensor", seed=7)
    transform = {
        "misaligned": misaligned,
        "misaligned-out": lambda t: t,
        "permuted": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2],
    }[view]
    case = dict(base)
    for key in ("x", "model_output", "noise"):
        case[key] = transform(base[key])
    check_case(backend, case, view)
    if view == "misaligned-out":
        out = poison(misaligned(torch.empty_like(base["x"])))
        x0 = poison(misaligned(torch.empty_like(base["x"])))
        run_out(backend, case, out, x0)
        assert_fully_written(out)
        ref_out, ref_x0 = reference_for(case)
        assert_rel_close(out, ref_out, dtype, "misaligned out")
        assert_rel_close(x0, ref_x0, dtype, "misaligned pred_x0_out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 8, 8), (2, 0, 3), (3, 4, 0)])
def test_empty(backend, shape):
    case = make_case(shape, torch.float16, "cuda")
    out, pred_x0 = run_functional(backend, case)
    assert out.shape == shape and pred_x0.shape == shape
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place(backend):
    case = make_case((2, 4, 16, 16), torch.float16, "cuda", noise="philox")
    ref_out, _ = reference_for(case)
    run_out(backend, case, case["x"], None)
    assert_rel_close(case["x"], ref_out, torch.float16, "in-place")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_row", [-1, 6])
def test_out_of_range_row_writes_nan(backend, bad_row):
    case = make_case((2, 4, 8, 8), torch.float32, "cuda", clamp="static")
    case["row"].fill_(bad_row)
    out, pred_x0 = run_functional(backend, case)
    assert torch.isnan(out).all() and torch.isnan(pred_x0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpu_op(backend, dtype):
    case = make_case((2, 4, 24, 20), dtype, "cuda", noise="philox", clamp="dynamic")
    gpu_out, gpu_x0 = run_functional(backend, case)
    cpu_case = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in case.items()}
    cpu_out, cpu_x0 = run_functional("native", cpu_case)
    tol = 1e-6 if dtype == torch.float32 else {torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    assert_rel_close(gpu_out, cpu_out, tol, f"{backend} CUDA vs C++ CPU x_prev")
    assert_rel_close(gpu_x0, cpu_x0, tol, f"{backend} CUDA vs C++ CPU pred_x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,offset", [(0, 0), (-1, (1 << 40) + 5)])
def test_same_seed_same_normals_as_cpu(backend, seed, offset):
    shape = (3, 5, 1001)
    z_gpu = run_functional(backend, normals_case(seed, offset, shape, "cuda"))[0].cpu().double()
    z_cpu = run_functional("native", normals_case(seed, offset, shape, "cpu"))[0].double()
    assert (z_gpu - z_cpu).abs().max().item() <= NORMALS_ATOL
    z_ref = reference.philox_normal(seed, offset, shape, torch.float64)
    assert (z_gpu - z_ref).abs().max().item() <= NORMALS_ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_cuda(backend):
    case = make_case((2, 4, 8, 8), torch.float16, "cuda", noise="philox", clamp="dynamic")
    if backend == "native":
        functional, out_variant = torch.ops.ddim_fast.ddim_step.default, torch.ops.ddim_fast.ddim_step_out.default
    else:
        from ddim_fast.triton import ddim_step as triton_step

        functional, out_variant = triton_step.ddim_step_triton, triton_step.ddim_step_triton_out
    torch.library.opcheck(functional, tuple(positional(case)) + (True,))
    torch.library.opcheck(out_variant, tuple(positional(case)) + (torch.empty_like(case["x"]),
                                                                    torch.empty_like(case["x"])))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    """int64 indexing: a [2, 2^30 + 12] fp16 step (numel > 2^31) checked on slices at the start, across
    the 2^31 boundary and at the end (the op is elementwise, so slices of the reference are exact)."""
    per_sample = (1 << 30) + 12
    numel = 2 * per_sample
    need = 4 * numel * 2 + (1 << 30)  # x, two model halves, out (fp16) + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, per_sample, generator=gen, device="cuda", dtype=torch.float16)
    model_output = torch.randn(4, per_sample, generator=gen, device="cuda", dtype=torch.float16)
    case = make_case((2, 8), torch.float16, "cuda", noise="none", clamp="dynamic")
    case.update(x=x, model_output=model_output)
    out = run_functional(backend, case, return_pred_x0=False)[0]
    torch.cuda.synchronize()
    window = 1 << 16
    boundary = (1 << 31) - per_sample  # flat index 2^31 lies in sample 1 at this column
    for sample, start in ((0, 0), (1, boundary - window), (1, per_sample - window)):
        cols = slice(start, start + window)
        sub = dict(case, x=x[[sample], cols], model_output=model_output[[sample, 2 + sample], cols],
                   x0_threshold=case["x0_threshold"][[sample]])
        ref_out, _ = reference_for(sub)
        assert_rel_close(out[[sample], cols], ref_out, torch.float16, f"slice {sample}:{start}")
    del x, model_output, out
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Memory formats: channels_last stays channels_last and takes the 16-byte vector path
# --------------------------------------------------------------------------------------------------


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (1, 4, 64, 64), (2, 4, 64, 64)], ids=str)
@pytest.mark.parametrize("noise", ["tensor", "philox", "philox-rows", "none"])
def test_channels_last_keeps_layout_and_values(backend, dtype, shape, noise):
    case = make_case(shape, dtype, "cuda", noise="none" if noise == "none" else noise.split("-")[0],
                     clamp="dynamic", seed=6)
    if noise == "philox-rows":
        case["rng_state"] = torch.tensor([[5 + b, 3 * b] for b in range(shape[0])], device="cuda")
    want_out, want_x0 = run_functional(backend, case)
    cl_case = dict(case, x=_cl(case["x"]), model_output=_cl(case["model_output"]))
    if case["noise"] is not None:
        cl_case["noise"] = _cl(case["noise"])
    out, x0 = run_functional(backend, cl_case)
    assert out.stride() == cl_case["x"].stride() and x0.stride() == cl_case["x"].stride()
    assert torch.equal(out, want_out) and torch.equal(x0, want_x0)
    buf, buf_x0 = poison(torch.empty_like(cl_case["x"])), poison(torch.empty_like(cl_case["x"]))
    run_out(backend, cl_case, buf, buf_x0)
    assert torch.equal(buf, want_out) and torch.equal(buf_x0, want_x0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_runs_the_vector_kernel(dtype):
    """The native CUDA op runs a channels_last SD latent (every argument dense, one layout) in its 16-byte
    vector kernel, as it does a contiguous one; with Philox noise (logical indices) the strided kernel."""
    case = make_case((2, 4, 64, 64), dtype, "cuda", noise="tensor", seed=8)
    cl_case = dict(case, x=_cl(case["x"]), model_output=_cl(case["model_output"]), noise=_cl(case["noise"]))
    names = launched_kernels(lambda: run_functional("native", cl_case), "ddim_step")
    assert any("ddim_step_vector_kernel" in n for n in names), names
    philox = dict(cl_case, noise=None, rng_state=torch.tensor([1, 2], device="cuda"))
    names = launched_kernels(lambda: run_functional("native", philox), "ddim_step")
    assert any("ddim_step_scalar_kernel" in n for n in names), names


# --------------------------------------------------------------------------------------------------
# Seeded noise per sample (rng_state [B, 2]) on the GPU
# --------------------------------------------------------------------------------------------------

STREAMS = [(0xABCDEF + 7 * b + (b << 35), 11 * b) for b in range(8)]


def _rows_case(streams, sample_shape, device, dtype=torch.float32):
    shape = (len(streams),) + tuple(sample_shape)
    case = normals_case(0, 0, shape, device)
    case["x"], case["model_output"] = case["x"].to(dtype), case["model_output"].to(dtype)
    case["rng_state"] = torch.tensor([list(s) for s in streams], dtype=torch.int64, device=device)
    return case


# % 8 == 0 (vector path for every dtype), % 4 == 0 only (fp16/bf16 leave the vector path), % 4 != 0 (padded).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample_shape", [(4, 16, 16), (3, 2, 2), (3, 5, 7), (1, 1, 3)], ids=str)
def test_per_row_noise_belongs_to_the_sample(backend, dtype, sample_shape):
    z8 = run_functional(backend, _rows_case(STREAMS, sample_shape, "cuda", dtype))[0]
    for b in (0, 5, 7):
        alone = run_functional(backend, _rows_case([STREAMS[b]], sample_shape, "cuda", dtype))[0]
        assert torch.equal(alone[0], z8[b]), f"row {b} of 8 != batch of 1"
    # The same Philox words as the C++ CPU op: the normals agree to fp32 rounding of the transcendentals; a
    # different word would move a normal by O(1), far beyond NORMALS_ATOL.
    z_cpu = run_functional("native", _rows_case(STREAMS, sample_shape, "cpu", dtype))[0]
    expected = reference.philox_normal_rows(STREAMS, z8.shape, torch.float64)
    if dtype == torch.float32:
        assert (z8.cpu().double() - z_cpu.double()).abs().max().item() <= NORMALS_ATOL
        assert (z8.cpu().double() - expected).abs().max().item() <= NORMALS_ATOL
    else:
        assert_rel_close(z8, z_cpu, 0.5 * {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], "CUDA vs CPU")
        assert_rel_close(z8, expected, dtype, "per-row normals")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["misaligned", "channels_last", "sliced"])
def test_per_row_noise_every_path(backend, view):
    """Per-row noise through the scalar (misaligned) and strided kernels equals the vector path's."""
    sample_shape = (4, 16, 16)
    case = _rows_case(STREAMS[:3], sample_shape, "cuda", torch.float16)
    want = run_functional(backend, case)[0]
    transform = {"misaligned": misaligned, "channels_last": _cl,
                 "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2]}[view]
    moved = dict(case, x=transform(case["x"]), model_output=transform(case["model_output"]))
    assert torch.equal(run_functional(backend, moved)[0], want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("guidance_scale", float("nan")), ("guidance_scale", float("inf")),
                                        ("temperature", float("nan")), ("clip_range", float("nan")),
                                        ("clip_range", 0.0)])
def test_non_finite_scalars_rejected_on_cuda(backend, name, value):
    case = make_case((2, 4, 8, 8), torch.float32, "cuda", guided=name == "guidance_scale")
    case[name] = value
    with pytest.raises(ValueError, match=f"ddim_step: {name} must be"):
        run_functional(backend, case)
