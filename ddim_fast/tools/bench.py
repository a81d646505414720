"""``python -m ddim_fast bench``: the end-to-end DDIM loops on one UNet with one seed, each proven to run what
its name says, then timed side by side: diffusers' DDIMScheduler loop, FastDDIMSampler eager (``fast``), with a
CUDA graph (``fast+graph``), with the attention fused as ``optimize()`` fuses it pinned to our kernel
(``fast+attn``) or left to its per-shape choice (``fast+attn-auto``); it/s, ms per step, the time per step
outside the UNet, agreement with the diffusers loop. With ``--breakdown``: where one UNet step's time goes, by
kind of kernel (convolution, GEMM, attention, normalization, elementwise, copies/layout), for plain,
channels_last, ``optimize`` and ``torch.compile``, from torch.profiler's kernel times.

This module is the command line only. What it runs, the benchmark harness (the loop variants and their
proofs, the timing, the kernel breakdown), lives in the repository's ``benchmarks/harness/`` beside the
pytest-benchmark suites that share it: measurement code is not shipped in the wheel (``ddim_fast/`` is), so
``bench`` runs from a checkout of the repository (the source tree, or ``pip install -e .``) and says so
anywhere else. :func:`load_harness` finds it next to this package.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HARNESS = "harness"


def harness_folder() -> Path | None:
    """The checkout's ``benchmarks/`` folder holding the harness package, or None (an installed package)."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    return folder if (folder / HARNESS / "__init__.py").is_file() else None


def load_harness(module: str | None = None) -> ModuleType:
    """The checkout's benchmark harness (``benchmarks/harness``), or its submodule ``module`` ("e2e",
    "loops", "breakdown", ...). Loaded under its own name, ``harness``, so that the benchmark suites (which
    pytest lets import it from ``benchmarks/``) and this command share one copy. RuntimeError with what to do
    when there is no checkout, or when another module called ``harness`` is loaded already."""
    folder = harness_folder()
    if folder is None:
        raise RuntimeError("`python -m ddim_fast bench` runs the benchmark harness of a checkout of the ddim-fast "
                           "repository (benchmarks/harness/), which the installed package does not include: run it "
                           "from the source tree (or an editable install, pip install -e .)")
    package = folder / HARNESS
    loaded = sys.modules.get(HARNESS)
    if loaded is None:
        spec = importlib.util.spec_from_file_location(HARNESS, package / "__init__.py",
                                                      submodule_search_locations=[str(package)])
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[HARNESS] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[HARNESS]
            raise
    elif Path(loaded.__file__).resolve().parent != package.resolve():
        raise RuntimeError(f"a module named {HARNESS!r} from {loaded.__file__} is loaded already; the bench needs "
                           f"{package}")
    return importlib.import_module(f"{HARNESS}.{module}") if module else loaded


def _harness_names(module: str, attribute: str) -> tuple[str, ...] | None:
    """Names the harness defines (variant names for --help and validation), None without a checkout."""
    try:
        return tuple(getattr(load_harness(module), attribute))
    except (RuntimeError, ImportError):  # no checkout, or a broken one: the other commands must still work
        return None


def add_arguments(parser) -> None:
    import torch

    from ddim_fast.tools import arguments
    from ddim_fast.tools.problems import DTYPES, UNET_CONFIGS

    on_gpu = torch.cuda.is_available()
    models = sorted(UNET_CONFIGS) + ["sdxl-unet"]
    parser.add_argument("--model", choices=models, default="sd15-unet" if on_gpu else "tiny-unet",
                        help="UNet config (random weights); sd15-unet on a GPU, tiny-unet on the CPU by default; "
                             "sdxl-unet with --breakdown only")
    parser.add_argument("--steps", type=arguments.steps, default=50 if on_gpu else 10,
                        help="DDIM steps, 1 to 1000 (50 on a GPU, 10 on the CPU by default)")
    parser.add_argument("--batch", type=arguments.positive_int, default=1, help="samples per run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16" if on_gpu else "fp32",
                        help="dtype of the latents and the UNet's weights (fp16 on a GPU, fp32 on the CPU by default)")
    parser.add_argument("--guidance", type=arguments.finite_float, default=7.5,
                        help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--resolution", type=arguments.resolution, default=None,
                        help="image size in pixels, a multiple of 8 (latent = resolution / 8) (default: the model's "
                             "own: " + ", ".join(f"{8 * cfg['sample_size']} for {name}"
                                                 for name, (cfg, _) in sorted(UNET_CONFIGS.items()))
                             + ", 1024 for sdxl-unet)")
    parser.add_argument("--device", type=arguments.device, default="auto",
                        help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton"),
                        help="FastDDIMSampler's step kernel")
    parser.add_argument("--noise-mode", choices=("torch", "philox"), default="torch",
                        help="FastDDIMSampler noise: 'torch' draws ldm's per-step randn (exact drop-in), "
                             "'philox' draws in-kernel (nothing at eta = 0)")
    parser.add_argument("--repeats", type=arguments.positive_int, default=3,
                        help="timed rounds (every loop once per round, interleaved); the best is reported")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0,
                        help="seed of the UNet's weights, x_T and the stand-in text embeddings")
    loops = _harness_names("loops", "VARIANT_EXPECTATIONS")
    parser.add_argument("--variants", type=arguments.names(loops) if loops else str, default=None,
                        metavar="NAME[,NAME...]",
                        help="comma-separated subset of " + (",".join(loops) if loops else "the harness's loops")
                             + " (default: diffusers, fast, fast+attn, and fast+graph on a GPU)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the loops: one UNet step per variant under torch.profiler, its time by "
                             "kind of kernel (CUDA kernels on a GPU, CPU operators on the CPU)")
    steps = _harness_names("pipelines", "VARIANTS")
    parser.add_argument("--breakdown-variants", type=arguments.names(steps) if steps else str, default=None,
                        metavar="NAME[,NAME...]",
                        help="with --breakdown: comma-separated subset of " + (",".join(steps) if steps else
                                                                                 "the harness's pipeline variants")
                             + " (default: plain, channels-last, optimize, and compile-reduce-overhead on a GPU)")
    parser.add_argument("--breakdown-calls", type=arguments.positive_int, default=None,
                        help="with --breakdown: UNet calls profiled per variant (default: 3 on a GPU, 2 on the CPU)")
    parser.add_argument("--json", metavar="FILE", type=arguments.output_file,
                        help="write the results as JSON (default: none)")


def check_arguments(args) -> str | None:
    """What one option says about another, refused before any work (cli.main prints it as argparse does)."""
    if args.model == "sdxl-unet" and not args.breakdown:
        return "argument --model: sdxl-unet is for --breakdown only (the loops run SD1.5-shaped UNets)"
    if not args.breakdown and (args.breakdown_variants or args.breakdown_calls):
        return "argument --breakdown-variants/--breakdown-calls: only with --breakdown"
    if args.breakdown and args.variants:
        return "argument --variants: names the loops; with --breakdown use --breakdown-variants"
    return None


def main(args) -> int:
    if args.breakdown:
        breakdown = load_harness("breakdown")
        report = breakdown.run_breakdown(args.model, batch=args.batch, dtype=args.dtype, resolution=args.resolution,
                                         device=args.device, variants=args.breakdown_variants,
                                         calls=args.breakdown_calls)
        print(breakdown.format_breakdown(report))
        ok = not report["failed"]
    else:
        e2e = load_harness("e2e")
        report = e2e.run_bench(args.model, steps=args.steps, batch=args.batch, dtype=args.dtype,
                               guidance=args.guidance, resolution=args.resolution, device=args.device,
                               repeats=args.repeats, seed=args.seed, backend=args.backend, variants=args.variants,
                               check=False, noise_mode=args.noise_mode)
        print(e2e.format_bench(e2e.check_agreement(report)))
        ok = report["agree"]
    if args.json:
        _write_json(args.json, report)
    return 0 if ok else 1


def _write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
