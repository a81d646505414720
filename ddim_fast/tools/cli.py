"""``python -m ddim_fast demo|profile|bench|info|generate`` (also installed as the ``ddim-fast`` command).

demo     sample the embedded model (exact denoiser of a built-in glyph set) with FastDDIMSampler, check the
         result, write one labelled figure; no downloads
profile  latency per DDIM step (model call, guidance+update, the loop's other work), one backend or several
         side by side (interleaved runs), table/JSON/plot/Chrome trace
bench    end-to-end loop: diffusers DDIMScheduler loop vs FastDDIMSampler (eager, CUDA graph, fused attention),
         each proven; --breakdown: one UNet step's time by kind of kernel (runs the checkout's benchmarks/harness)
info     which backends are built and usable, versions, hardware
generate many images (embedded model or a local diffusers pipeline folder), on one process or under
         torchrun, resumable; sample i depends on its own seed only
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ddim_fast.tools import arguments


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every option's help and default and keeps the descriptions' line breaks.

    argparse's ArgumentDefaultsHelpFormatter would print "(default: None)" for options whose default is
    decided later (50 steps, or 20 with --quick): such options say their default in their help text, as
    "(default: ...)", and are left alone here. Flags show "(default: off)", required options "(required)".
    tests/test_cli.py walks every tool's options and fails on a missing help or default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # a flag (store_true/false/const)
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return text  # its help must say what happens without it; the test catches a silent None
        return f"{text} (default: %(default)s)"


def _prepare_environment(show_progress: bool) -> None:
    # Triton reads TRITON_INTERPRET when it is first imported (importing ddim_fast does not import it):
    # without a GPU, ddim_fast's Triton kernels can only run in the interpreter.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # torch imports tqdm before any of this runs, so TQDM_DISABLE would come too late: switch the
    # samplers' bars (tqdm.tqdm) off by changing the class default for this process instead.
    if not show_progress:
        import functools

        import tqdm

        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


def _wants_progress(argv: list[str]) -> bool:
    """--progress / --no-progress, else progress bars exactly when stderr is a terminal (a person watches)."""
    if "--no-progress" in argv:
        return False
    if "--progress" in argv:
        return True
    return sys.stderr.isatty()


def build_parser() -> argparse.ArgumentParser:
    from ddim_fast.tools import bench, demo, generate, info, profiler

    parser = argparse.ArgumentParser(prog="python -m ddim_fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="the samplers' per-step progress bars on stderr (default: on when stderr is a terminal)")
    parser.add_argument("--threads", type=arguments.positive_int, default=None,
                        help="torch CPU threads (1 gives steadier CPU timings on a busy machine) (default: torch's "
                             "own choice)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,profile,bench,info,generate}")
    for name, module, help_text in (
        ("demo", demo, "sample the embedded model, check it, write a labelled figure"),
        ("profile", profiler, "latency per DDIM step, backends side by side"),
        ("bench", bench, "end-to-end loops: diffusers vs FastDDIMSampler; --breakdown: a UNet step by kernel kind"),
        ("info", info, "backends, versions, hardware"),
        ("generate", generate, "many images, one process or many (torchrun), resumable, the same image per seed"),
    ):
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").strip().split("\n\n")[0],
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.main, check=getattr(module, "check_arguments", None), subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _prepare_environment(show_progress=_wants_progress(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    # What argparse's per-option types cannot see (one option against another, the model's needs): refused
    # the same way, "argument --x: ...", before any work or output.
    problem = args.check(args) if args.check is not None else None
    if problem:
        args.subparser.error(problem)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
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
