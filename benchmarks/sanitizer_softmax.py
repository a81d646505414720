"""The softmax kernels run directly, for compute-sanitizer (``benchmarks/gpu_check.sh``, stage 6): the
warp-per-row kernel (short rows, broadcast bool mask, additive mask) and the block-per-row kernel (rows
over 1024 keys: shared memory + __syncthreads, what racecheck is for), in place too, every dtype, small
shapes. Every result is compared with the reference (fp32 math), so a wrong kernel fails here even
where the sanitizer sees nothing.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_softmax.py            # on the GPU
    python benchmarks/sanitizer_softmax.py --device cpu                                  # dry run (C++ CPU kernel)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ddim_fast  # noqa: E402,F401  (registers the ops)
from ddim_fast import reference  # noqa: E402

SHAPES = ((2, 3, 5, 77), (3, 7, 1), (2, 2, 3, 1300), (5, 4097))
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    op, op_ = torch.ops.ddim_fast.scaled_masked_softmax, torch.ops.ddim_fast.scaled_masked_softmax_
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in SHAPES:
            s = torch.randn(shape, generator=gen).to(device, dtype)
            keep = (torch.rand(shape[:-2] + (1, shape[-1]), generator=gen) > 0.3).to(device)
            add = torch.randn(shape, generator=gen).to(device, dtype)
            for mask in (None, keep, add):
                out = op(s, mask, 0.5)
                inplace = s.clone()
                op_(inplace, mask, 0.5)
                assert torch.equal(out, inplace), (dtype, shape, "in place differs")
                ref = reference.scaled_masked_softmax(s, mask, 0.5, compute_dtype=torch.float32)
                err = reference.relative_error(out, ref)
                assert err <= TOLERANCE[dtype], (dtype, shape, f"relative error {err:.2e}")
                cases += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"softmax sanitizer run: {cases} cases on {device}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
