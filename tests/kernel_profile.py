"""Which CUDA kernels a call launched (torch.profiler), for the tests that prove a path ran a given kernel.

A test that proves "this layout runs the vector kernel" must not pass by skipping: where the profiler records
CUDA kernels, a call that launched none of ours fails. The test skips only when the profiler itself cannot
record CUDA activity, told apart in two ways:

* kineto was built without CUDA activity (``ProfilerActivity.CUDA`` not in ``torch.profiler.supported_activities()``,
  e.g. no CUPTI): nothing is profiled;
* the profiler ran but recorded no CUDA kernel at all, not even the probe: every profile starts with a ``fill_`` of
  a one-element CUDA tensor, a PyTorch kernel any working CUPTI records, so an empty kernel list means CUPTI
  could not trace (a driver or permission problem), not that our op launched nothing.

The decision is ``check_profile`` (pure, tested on the CPU with fake events in tests/test_kernel_profile.py).
"""

from __future__ import annotations

import pytest
import torch


def launched_kernels(fn, expect: str) -> list[str]:
    """Names of the CUDA kernels recorded while ``fn()`` ran (after the probe). Fails when kernels were recorded but
    none has ``expect`` in its name; skips when the profiler cannot record CUDA kernels here."""
    from torch.profiler import ProfilerActivity, profile, supported_activities

    cuda_activity = ProfilerActivity.CUDA in supported_activities()
    events = []
    if cuda_activity:
        probe = torch.empty(1, device="cuda")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            probe.fill_(1.0)
            fn()
            torch.cuda.synchronize()
        events = prof.events()
    return check_profile(events, expect, cuda_activity=cuda_activity)


def check_profile(events, expect: str, *, cuda_activity: bool) -> list[str]:
    """The names of the CUDA-device events (kernels, memcpy, memset) among ``events`` (objects with ``name`` and
    ``device_type``, as torch.profiler's FunctionEvent), after the checks in the module docstring."""
    if not cuda_activity:
        pytest.skip("torch.profiler cannot record CUDA activity here (ProfilerActivity.CUDA is not supported: "
                    "kineto without CUPTI)")
    names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        pytest.skip("the profiler ran but recorded no CUDA kernel, not even the probe's fill_: CUPTI cannot trace "
                    "kernels on this machine")
    if not any(expect in n for n in names):
        shown = sorted(set(names))
        pytest.fail(f"the profiler recorded {len(names)} CUDA kernels but none named *{expect}*: the call did not "
                    f"run our kernel. Recorded: {shown[:10]}{' ...' if len(shown) > 10 else ''}")
    return names
