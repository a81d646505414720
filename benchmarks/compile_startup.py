"""First-call and steady-state time of ``torch.compile`` variants of a diffusers pipeline, each in a fresh process,
with Inductor's caches cold, warm (same machine), and restored from ddim_fast's compile-cache file only (a fresh
machine or container): what ``optimize(pipe, compile=...)`` costs at start-up and gains per step.

    python benchmarks/compile_startup.py                    # CPU, tiny SD pipeline
    python benchmarks/compile_startup.py --device cuda --model sd15 --steps 50 --json out.json

Per variant, three child processes in order, each timing ``pipe(...)`` plain first (the reference latents and
the plain it/s), then the variant's first call (compile + capture included) and its steady state (median of
``--repeats`` calls), and the relative error of its latents against plain's:

* ``cold``: empty ``TORCHINDUCTOR_CACHE_DIR`` and ``DDIM_FAST_CACHE_DIR`` (both temporary folders);
* ``warm``: the same folders again (Inductor's FX graph / AOTAutograd caches hit);
* ``file``: a new empty ``TORCHINDUCTOR_CACHE_DIR``, the ``DDIM_FAST_CACHE_DIR`` the cold run wrote (only
  ``torch.compiler.load_cache_artifacts`` from ddim_fast's file can help; ``compile(unet)`` alone has no file).

Variants: ``compile(unet)`` (``torch.compile(pipe.unet)``, default mode: the line a diffusers user knows),
``optimize(compile)`` (``ddim_fast.optimize(pipe, compile=True)``: on CUDA with its graphs around the compiled
UNet), ``optimize`` (no compile, for scale). Prints one table (hardware named) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("compile(unet)", "optimize(compile)", "optimize")


def _child(args) -> dict:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import diffusers

    import ddim_fast
    from ddim_fast.reference import relative_error
    from ddim_fast.tools.problems import SD15_UNET_CONFIG, SD_SCHEDULER_CONFIG

    tiny = dict(sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    config, text, resolution, vae_blocks = ((tiny, (8, 32), 32, 2) if args.model == "tiny"
                                            else (SD15_UNET_CONFIG, (77, 768), 512, 4))
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    device = torch.device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**config)
        vae = diffusers.AutoencoderKL(block_out_channels=(32,) * vae_blocks, latent_channels=4, norm_num_groups=8,
                                      down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                                      up_block_types=("UpDecoderBlock2D",) * vae_blocks)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    diffusers.utils.logging.set_verbosity_error()
    pipe.to(device=device, dtype=dtype)
    pipe.unet.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    embeds = {k: torch.randn(1, *text, generator=gen).to(device, dtype)
              for k in ("prompt_embeds", "negative_prompt_embeds")}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def run():
        out = pipe(**embeds, height=resolution, width=resolution, num_inference_steps=args.steps, guidance_scale=7.5,
                   generator=torch.Generator(device).manual_seed(0), output_type="latent").images
        sync()
        return out

    def timed(n):
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = run()
            samples.append(time.perf_counter() - t0)
        return out, statistics.median(samples)

    run()  # lazy initialisation (allocator, cuDNN, ...) before anything is timed
    expected, plain_s = timed(args.repeats)
    t0 = time.perf_counter()
    if args.variant == "compile(unet)":
        pipe.unet = torch.compile(pipe.unet)
    elif args.variant == "optimize(compile)":
        ddim_fast.optimize(pipe, compile=True)
    else:
        ddim_fast.optimize(pipe)
    first = run()
    first_s = time.perf_counter() - t0
    out, steady_s = timed(args.repeats)
    state = ddim_fast.optimized_state(pipe)
    loaded = bool(state and any(c.cache_loaded for c in state.compiled.values()))
    return {"variant": args.variant, "phase": args.phase, "first_call_s": first_s, "it_per_s": args.steps / steady_s,
            "plain_it_per_s": args.steps / plain_s, "speedup": plain_s / steady_s,
            "rel_error_vs_plain": relative_error(out, expected), "first_equals_steady": bool(torch.equal(first, out)),
            "ddim_fast_cache_loaded": loaded, "summary": state.summary if state else ""}


def _hardware(device: str) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from conftest import hardware_name

    return hardware_name(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="tiny", choices=("tiny", "sd15"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the project's CPU convention: 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="ddim_fast_compile_") as tmp:
        for variant in args.variants.split(","):
            folders = {"inductor": Path(tmp, variant, "inductor"), "ddim_fast": Path(tmp, variant, "ddim_fast"),
                       "inductor_fresh": Path(tmp, variant, "inductor_fresh")}
            for phase in ("cold", "warm", "file"):
                if phase == "file" and not variant.startswith("optimize(compile"):
                    continue
                env = dict(os.environ, DDIM_FAST_CACHE_DIR=str(folders["ddim_fast"]),
                           TORCHINDUCTOR_CACHE_DIR=str(folders["inductor_fresh" if phase == "file" else "inductor"]))
                command = [sys.executable, __file__, "--child", "--variant", variant, "--phase", phase,
                           "--device", args.device, "--model", args.model, "--steps", str(args.steps),
                           "--repeats", str(args.repeats), "--threads", str(args.threads)]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    print(f"{variant} {phase}: failed (rc={done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                row = json.loads(lines[-1][len("RESULT "):])
                rows.append(row)
                print(f"{variant:18s} {phase:5s} first call {row['first_call_s']:8.2f} s  {row['it_per_s']:8.2f} it/s "
                      f"(plain {row['plain_it_per_s']:7.2f}, {row['speedup']:5.2f}x)  rel err {row['rel_error_vs_plain']:.1e}"
                      f"  file loaded {row['ddim_fast_cache_loaded']}", flush=True)
    hardware = _hardware(args.device)
    print(f"on {hardware}, {args.model}, {args.steps} steps, torch threads {args.threads if args.device == 'cpu' else '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "model": args.model, "steps": args.steps,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
