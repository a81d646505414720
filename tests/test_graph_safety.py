"""Graph safety of the ddim_step ops: the step index is read on the device, so advancing the loop is an
in-place bump of a tensor — no host sync, one torch.compile graph and one CUDA graph for every step.

Any machine: bumping `step` in place advances the row for the C++ and Triton ops alike, and they agree;
torch.compile(fullgraph=True) of a loop body compiles once across steps. These run where each backend runs:
Triton on CUDA tensors when a GPU is present, else on CPU tensors under the interpreter (TRITON_INTERPRET=1,
set by conftest.py without a GPU); the C++ op on CPU, and on CUDA too when its CUDA kernel is built.
GPU (requires_cuda): one captured CUDA graph (model stand-in + guidance + update) replayed for all 50
steps equals the eager loop; torch.compile(mode="reduce-overhead", fullgraph=True) does not recompile.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import ddim_fast.ops  # noqa: F401  (loads the C++ extension)
import oracles
from conftest import assert_rel_close, requires_cuda
from ddim_fast import ops, reference, schedule
from ddim_fast.triton import ddim_step as triton_step

NUM_STEPS = 50


def device_for(backend: str) -> str:
    """Where `backend` runs on this machine: Triton on CUDA when present (its CPU path exists only under the
    interpreter), else on CPU under TRITON_INTERPRET=1; the C++ op on CUDA when its CUDA kernel is built."""
    if torch.cuda.is_available():
        if backend == "native" and not ops.has_native_kernel("cuda"):
            pytest.skip("the C++ extension was built without its CUDA kernel")
        return "cuda"
    if backend == "triton" and not triton_step._INTERPRETED:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    return "cpu"


def sd_table(num_steps: int, device, eta: float = 0.5) -> torch.Tensor:
    """The ldm coefficient table of SD's schedule for `num_steps` DDIM steps."""
    alphas_cumprod = schedule.alphas_cumprod(schedule.ldm_betas("linear", 1000, 0.00085, 0.012))
    params = schedule.ldm_ddim_parameters(alphas_cumprod, schedule.ldm_timesteps(num_steps, 1000), eta)
    return schedule.ldm_coefficient_table(params, device=device)


def functional_op(backend: str):
    return triton_step.ddim_step_triton if backend == "triton" else torch.ops.ddim_fast.ddim_step


def out_op(backend: str):
    return triton_step.ddim_step_triton_out if backend == "triton" else torch.ops.ddim_fast.ddim_step_out


def stand_in_model(x: torch.Tensor, table: torch.Tensor, step: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A UNet stand-in: [uncond, cond] outputs [2B, ...] that depend on x and on the timestep read from
    the table on the device (no .item())."""
    t = (table.index_select(0, step)[:, 0] / 1000.0).to(x.dtype)  # [1], device-side
    both = torch.cat([x, x])
    mixed = torch.einsum("bchw,dc->bdhw", both, weight)
    cond_shift = torch.cat([torch.zeros_like(x), torch.full_like(x, 0.1)])
    return torch.tanh(mixed * (1.0 + t)) + cond_shift


# --------------------------------------------------------------------------------------------------
# CPU-testable
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_step_is_read_from_the_device_tensor(backend):
    """Bumping the step tensor in place advances the row: each call equals the float64 oracle at that row."""
    device = device_for(backend)
    table = sd_table(10, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=gen).to(device)
    model_output = torch.randn(4, 4, 6, 5, generator=gen).to(device)
    rng = torch.tensor([99, 0], dtype=torch.int64, device=device)
    step = schedule.step_index(0, device=device)
    outputs = []
    for k in range(table.shape[0]):
        out, _ = functional_op(backend)(x, model_output, table, step, 5.0, "epsilon", None, None, False, None,
                                        rng, 1.0, False)
        z = reference.philox_normal(99, k, x.shape, torch.float64)
        ref, _ = oracles.ddim_step(x, model_output, table, k, guidance_scale=5.0, noise=z)
        assert_rel_close(out, ref, torch.float32, f"step {k}")
        outputs.append(out)
        step.add_(1)
    assert not torch.equal(outputs[0], outputs[1])


def test_native_and_triton_agree_after_in_place_bumps():
    device = device_for("triton")
    if device == "cuda":
        device_for("native")  # skips when the C++ CUDA kernel is missing
    table = sd_table(20, device)
    gen = torch.Generator().manual_seed(1)
    x_native = torch.randn(1, 4, 8, 8, generator=gen).to(device)
    x_triton = x_native.clone()
    weight = (torch.randn(4, 4, generator=gen) * 0.3).to(device)
    rng = torch.tensor([7, 1000], dtype=torch.int64, device=device)
    step_native, step_triton = schedule.step_index(0, device=device), schedule.step_index(0, device=device)
    for _ in range(table.shape[0]):
        for backend, x, step in (("native", x_native, step_native), ("triton", x_triton, step_triton)):
            m = stand_in_model(x, table, step, weight)
            out_op(backend)(x, m, table, step, 4.0, "epsilon", None, None, False, None, rng, 1.0, x, None)
            step.add_(1)
    assert step_native.item() == step_triton.item() == table.shape[0]
    assert_rel_close(x_triton, x_native, 1e-5, "triton vs native after 20 in-place steps")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_compiled_loop_body_compiles_once(backend):
    """torch.compile(fullgraph=True) of one step traces once; later steps only bump the step tensor."""
    device = device_for(backend)
    table = sd_table(NUM_STEPS, device)
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(4, 4, generator=gen) * 0.3).to(device)
    rng = torch.tensor([5, 0], dtype=torch.int64, device=device)

    def body(x, step):
        m = stand_in_model(x, table, step, weight)
        x_prev, pred_x0 = functional_op(backend)(x, m, table, step, 7.5, "epsilon", None, None, False, None,
                                                 rng, 1.0, True)
        step.add_(1)
        return x_prev, pred_x0

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(body, backend=counter, fullgraph=True)
    x0 = torch.randn(1, 4, 6, 6, generator=gen).to(device)
    x_c, x_e = x0.clone(), x0.clone()
    step_c, step_e = schedule.step_index(0, device=device), schedule.step_index(0, device=device)
    for _ in range(12):
        x_c, _ = compiled(x_c, step_c)
        x_e, _ = body(x_e, step_e)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 12 steps"
    assert step_c.item() == 12
    assert_rel_close(x_c, x_e, 1e-6, "compiled loop vs eager loop")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_per_row_rng_state_is_read_on_the_device(backend):
    """Per-row seeds ([B, 2]) are read by the kernel at run time, like the step: rewriting them in place (what
    a captured graph's static buffer gets) changes the draw without re-planning, and restoring them restores
    it bit for bit."""
    device = device_for(backend)
    table = schedule.coefficient_table([1], [0.5], [0.0], [1.0], device=device)  # x_prev = z
    x = torch.zeros(3, 4, 5, 7, device=device)
    rng = torch.tensor([[11, 0], [12, 0], [13, 0]], dtype=torch.int64, device=device)
    step = schedule.step_index(0, device=device)
    call = lambda: functional_op(backend)(x, x, table, step, None, "epsilon", None, None, False, None, rng,  # noqa: E731
                                          1.0, False)[0].clone()
    first = call()
    rng[1, 0] = 99
    changed = call()
    assert torch.equal(changed[0], first[0]) and torch.equal(changed[2], first[2])
    assert not torch.equal(changed[1], first[1])
    rng[1, 0] = 12
    assert torch.equal(call(), first)


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


def _eager_loop(backend, x, table, weight, rng, guidance):
    step = schedule.step_index(0, device=x.device)
    x = x.clone()
    for _ in range(table.shape[0]):
        m = stand_in_model(x, table, step, weight)
        out_op(backend)(x, m, table, step, guidance, "epsilon", None, None, False, None, rng, 1.0, x, None)
        step.add_(1)
    return x


@requires_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rng_form", ["one_stream", "per_row"])
def test_cuda_graph_replays_every_step(backend, dtype, rng_form):
    device = "cuda"
    table = sd_table(NUM_STEPS, device)
    gen = torch.Generator(device=device).manual_seed(3)
    x_init = torch.randn(2, 4, 32, 32, generator=gen, device=device).to(dtype)
    weight = (torch.randn(4, 4, generator=gen, device=device) * 0.3).to(dtype)
    # [2]: one stream; [B, 2]: one (seed, offset) per sample, read on the device at every replay.
    rng = torch.tensor([1234, 0] if rng_form == "one_stream" else [[1234, 0], [77, 5]], dtype=torch.int64,
                       device=device)
    expected = _eager_loop(backend, x_init, table, weight, rng, 7.5)

    static_x = x_init.clone()
    static_step = schedule.step_index(0, device=device)

    def one_step():
        m = stand_in_model(static_x, table, static_step, weight)
        out_op(backend)(static_x, m, table, static_step, 7.5, "epsilon", None, None, False, None, rng, 1.0,
                        static_x, None)

    # Warm up on a side stream (Triton compiles, cuBLAS plans), then restore the start state and capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            one_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    static_x.copy_(x_init)
    static_step.zero_()
    for _ in range(NUM_STEPS):
        graph.replay()
        static_step.add_(1)  # the only per-step work: bump the device step index
    torch.cuda.synchronize()
    assert static_step.item() == NUM_STEPS
    # Same kernels on the same inputs: equal up to library (cuBLAS) algorithm choices inside the capture,
    # which guidance 7.5 amplifies over 50 steps. A replay bug (stale step, noise not advancing) is O(1).
    assert_rel_close(static_x, expected, 1e-5 if dtype == torch.float32 else 1e-3, "graph replay vs eager loop")


@requires_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_reduce_overhead_compiles_once(backend):
    device = "cuda"
    table = sd_table(NUM_STEPS, device)
    gen = torch.Generator(device=device).manual_seed(4)
    weight = torch.randn(4, 4, generator=gen, device=device) * 0.3
    rng = torch.tensor([77, 0], dtype=torch.int64, device=device)

    def body(x, step):
        m = stand_in_model(x, table, step, weight)
        x_prev, _ = functional_op(backend)(x, m, table, step, 7.5, "epsilon", None, None, False, None, rng, 1.0,
                                           False)
        return x_prev

    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(body, mode="reduce-overhead", fullgraph=True)
    x_init = torch.randn(1, 4, 32, 32, generator=gen, device=device)
    x_c, x_e = x_init.clone(), x_init.clone()
    step_c = schedule.step_index(0, device=device)
    step_e = schedule.step_index(0, device=device)
    for _ in range(NUM_STEPS):
        x_c = compiled(x_c, step_c).clone()  # clone: cudagraph outputs are overwritten by the next replay
        step_c.add_(1)
        x_e = body(x_e, step_e)
        step_e.add_(1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    assert graphs == 1, f"{graphs} graphs compiled for {NUM_STEPS} steps"
    assert_rel_close(x_c, x_e, 1e-4, "reduce-overhead loop vs eager loop")
