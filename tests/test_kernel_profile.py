"""The kernel-profile helper's decisions (tests/kernel_profile.py), on the CPU with fake profiler events: it skips
only when the profiler cannot record CUDA activity, and fails when it recorded CUDA kernels but none of ours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kernel_profile

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
PROBE = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"


def _events(*pairs):
    return [SimpleNamespace(name=name, device_type=device) for name, device in pairs]


def test_skips_when_kineto_has_no_cuda_activity():
    with pytest.raises(pytest.skip.Exception, match="cannot record CUDA activity"):
        kernel_profile.check_profile([], "ddim_step", cuda_activity=False)


def test_skips_when_not_even_the_probe_was_recorded():
    # CPU-side runtime calls only (what a profile holds when CUPTI traced no kernel).
    events = _events(("cudaLaunchKernel", CPU), ("cudaDeviceSynchronize", CPU))
    with pytest.raises(pytest.skip.Exception, match="not even the probe"):
        kernel_profile.check_profile(events, "ddim_step", cuda_activity=True)


def test_fails_when_kernels_were_recorded_but_none_of_ours():
    events = _events(("cudaLaunchKernel", CPU), (PROBE, CUDA),
                     ("void at::native::elementwise_kernel<128, 2, ...>", CUDA))
    with pytest.raises(pytest.fail.Exception, match=r"recorded 2 CUDA kernels but none named \*ddim_step\*"):
        kernel_profile.check_profile(events, "ddim_step", cuda_activity=True)


def test_returns_the_kernel_names_when_ours_ran():
    events = _events(("cudaLaunchKernel", CPU), (PROBE, CUDA),
                     ("void ddim_fast::(anonymous namespace)::ddim_step_vector_kernel<float>(...)", CUDA))
    names = kernel_profile.check_profile(events, "ddim_step", cuda_activity=True)
    assert names == [PROBE, "void ddim_fast::(anonymous namespace)::ddim_step_vector_kernel<float>(...)"]


def test_without_cuda_activity_nothing_is_profiled(monkeypatch):
    """The wrapper asks kineto first: on a machine without CUDA activity it neither allocates on CUDA nor profiles."""
    import torch.profiler

    monkeypatch.setattr(torch.profiler, "supported_activities", lambda: {torch.profiler.ProfilerActivity.CPU})
    ran = []
    with pytest.raises(pytest.skip.Exception, match="cannot record CUDA activity"):
        kernel_profile.launched_kernels(lambda: ran.append(1), "ddim_step")
    assert ran == []
