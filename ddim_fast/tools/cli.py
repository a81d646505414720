"""``python -m ddim_fast demo|profile|bench|info`` (also installed as the ``ddim-fast`` command).

demo     sample the embedded model (exact denoiser of a built-in glyph set) with FastDDIMSampler, write
         PNGs, check the result; no downloads
profile  latency per DDIM step (model vs guidance+update), table/JSON/plot/Chrome trace
bench    end-to-end loop: diffusers DDIMScheduler loop vs FastDDIMSampler (eager, CUDA graph, fused attention)
info     which backends are built and usable, versions, hardware
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _prepare_environment(show_progress: bool) -> None:
    # tqdm reads TQDM_* when it is first imported (torch imports it), triton reads TRITON_INTERPRET when
    # it is: so both are set here, first. The samplers' progress bars would garble the timing tables;
    # without a GPU, ddim_fast's Triton kernels can only run in the interpreter.
    if not show_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def build_parser() -> argparse.ArgumentParser:
    from ddim_fast.tools import bench, demo, info, profiler

    parser = argparse.ArgumentParser(prog="python -m ddim_fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--progress", action="store_true", help="show the samplers' progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives steadier CPU timings on a busy machine)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,profile,bench,info}")
    for name, module, help_text in (
        ("demo", demo, "sample the embedded model, write PNGs, check the result"),
        ("profile", profiler, "latency per DDIM step"),
        ("bench", bench, "end-to-end loops: diffusers vs FastDDIMSampler"),
        ("info", info, "backends, versions, hardware"),
    ):
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").strip().split("\n\n")[0])
        module.add_arguments(p)
        p.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _prepare_environment(show_progress="--progress" in argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except (RuntimeError, ValueError, TypeError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
