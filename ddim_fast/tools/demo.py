"""``python -m ddim_fast demo``: sample a model whose correct output is known, with ``FastDDIMSampler``,
and check the result. No downloads.

The model is ``ddim_fast.tools.toy_data.EmbeddedLdmModel``: the exact (closed-form) denoiser of 16 built-in
glyph images in 4 classes, dressed as an ldm model with SD's noise schedule. Deterministic DDIM with it
must end on one of the data images, and class-conditional sampling with classifier-free guidance on an
image of the requested class. The demo

1. times, per step and in the same run, the plain-PyTorch reference loop (``reference.ddim_step``:
   guidance combine and DDIM update as separate tensor ops) and ``FastDDIMSampler`` (one fused op), split
   into the model call, the guidance + update work that the fused op replaces and the loop's other work,
   both loops stamped the same way and run interleaved after the same warm-up (``profiler.profile_backends``:
   the model call, the same call in both, then differs only by the machine's noise), and checks that both
   loops give the same samples;
2. samples unconditionally and class-conditionally (CFG) and checks every sample lands on a data image
   (PSNR to the nearest one above a threshold) of the right class;
3. shows the x0 predictions over the steps for one sample;
4. inverts data images with DDIM (``encode``) and reconstructs them (``decode``), PSNR printed;
5. samples along a slerp between two noises.

One labelled figure, ``demo.png``, goes to ``--out`` (default ./ddim_fast_demo): every panel has a title,
a caption with its check, and row / column labels. Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from ddim_fast import reference
from ddim_fast.tools import arguments, figures, problems, profiler, toy_data

# A DDIM sample is x_prev = sqrt(a_0) x0_hat + sqrt(1 - a_0) eps_hat at the last step, so it keeps a
# sqrt(1 - a_0) ~ 0.029 trace of noise around the data image: ~36.7 dB. Well below that is a miss.
SAMPLE_PSNR_DB = 30.0
# DDIM inversion + reconstruction of a data image with the exact denoiser.
RECONSTRUCTION_PSNR_DB = 25.0
# Reference loop vs FastDDIMSampler over a whole fp32 run (docs/design.md's drop-in contract).
AGREEMENT_RTOL = 1e-5
# The class-conditional panel shows one row per class: the batch cycles through the classes.
BATCH_MULTIPLE = toy_data.NUM_CLASSES


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------


def _sampler_uses_fused_step(sampler) -> bool:
    """True when this really is ddim_fast's sampler (not a stand-in): its class lives in ddim_fast.sampler."""
    return type(sampler).__module__ == "ddim_fast.sampler"


def _sample(sampler, steps: int, x_T: torch.Tensor, cond, uncond, guidance: float, img_callback=None):
    samples, _ = sampler.sample(
        steps, x_T.shape[0], tuple(x_T.shape[1:]), conditioning=cond, unconditional_guidance_scale=guidance,
        unconditional_conditioning=uncond, eta=0.0, x_T=x_T, verbose=False, img_callback=img_callback)
    return samples


def _invert_and_reconstruct(sampler, x0: torch.Tensor, cond: torch.Tensor, steps: int):
    """DDIM inversion of x0 over the whole grid (``encode``, which feeds the model the grid timesteps),
    then decoding back (``decode``). Returns (x_T, reconstruction), both [B, C, H, W]."""
    sampler.make_schedule(steps, ddim_eta=0.0, verbose=False)
    n = len(sampler.ddim_timesteps)
    x_T, _ = sampler.encode(x0, cond, n)
    recon = sampler.decode(x_T, cond, n)
    return x_T, recon


def run_demo(out_dir: str = "ddim_fast_demo", *, quick: bool = False, steps: int | None = None,
             batch: int | None = None, guidance: float = 3.0, seed: int = 0, device: str | None = None,
             backend: str = "auto") -> dict[str, Any]:
    """Run every part of the demo; returns a JSON-able report with 'passed' and the per-check results.
    ``steps`` (1 to 1000) and ``batch`` (a multiple of 4) default to 50 and 16, or 20 and 8 with ``quick``;
    bad values are refused before any output."""
    steps = (20 if quick else 50) if steps is None else steps
    batch = (8 if quick else 16) if batch is None else batch
    arguments.require("run_demo", "steps", arguments.int_problem(steps, 1, arguments.MAX_STEPS))
    arguments.require("run_demo", "batch", arguments.int_problem(batch, BATCH_MULTIPLE, multiple_of=BATCH_MULTIPLE,
                                                                 why="one figure row per class"))
    arguments.require("run_demo", "guidance", arguments.float_problem(guidance))
    FastDDIMSampler = problems.require_sampler()
    dev = problems.resolve_device(device)
    size = 16 if quick else 32
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(seed)

    model = toy_data.EmbeddedLdmModel(size=size, device=dev)
    images, labels = model.images, model.labels.cpu()
    report: dict[str, Any] = {"device": str(dev), "steps": steps, "batch": batch,
                              "image_shape": list(model.image_shape),
                              "guidance": guidance, "checks": {}, "files": []}
    files = report["files"]
    panels = [figures.Panel(
        "The data set", images, toy_data.IMAGES_PER_CLASS,
        caption=f"{len(images)} images in {toy_data.NUM_CLASSES} classes; the embedded model is their exact "
                "denoiser, so every correct DDIM sample is one of them",
        row_labels=list(toy_data.CLASS_NAMES))]
    print(f"embedded model: exact denoiser of {len(images)} glyph images {tuple(model.image_shape)} in "
          f"{toy_data.NUM_CLASSES} classes {toy_data.CLASS_NAMES}, SD schedule; device {dev}, {steps} DDIM steps")

    sampler = FastDDIMSampler(model, "linear", dev, backend=backend)
    if not _sampler_uses_fused_step(sampler):
        raise RuntimeError(f"expected ddim_fast.sampler.FastDDIMSampler, got {type(sampler).__module__}")

    # 1. Latency per step: reference loop vs FastDDIMSampler, same class-conditional CFG problem.
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    x_T = torch.randn(batch, *model.image_shape, generator=gen).to(dev)
    cond_labels = [i % toy_data.NUM_CLASSES for i in range(batch)]
    cond = toy_data.class_embedding(cond_labels, device=dev)
    uncond = toy_data.class_embedding(None, batch, device=dev)
    problem = problems.Problem(model, x_T, cond, uncond, steps, guidance)
    # Both loops timed the same way (stamps around the model call alone), interleaved after the same warm-up,
    # so that the model call, the same call on the same inputs in both, shows the same time up to noise.
    fast_name = backend if backend != "reference" else profiler.SAMPLER_PREFIX + backend
    timed = profiler.profile_backends(problem, ("reference", fast_name), repeats=3)
    (ref_rows, ref_out), (fast_rows, fast_out) = timed["reference"], timed[fast_name]
    ref_stats, fast_stats = profiler.summary(ref_rows), profiler.summary(fast_rows)
    ref, fast = ({col: st[col]["p50"] for col in profiler.COLUMNS} for st in (ref_stats, fast_stats))

    def spread(rows, col):
        return figures.relative_spread([r[col] for r in rows])

    rel = reference.relative_error(fast_out, ref_out)
    model_share = ref["model_ms"] / ref["total_ms"] if ref["total_ms"] > 0 else float("nan")
    update_phrase = figures.speed_phrase(ref["update_ms"], fast["update_ms"], noise=figures.noise_band(
        spread(ref_rows, "update_ms"), spread(fast_rows, "update_ms")))
    model_phrase = figures.speed_phrase(ref["model_ms"], fast["model_ms"], noise=figures.noise_band(
        spread(ref_rows, "model_ms"), spread(fast_rows, "model_ms")))
    print(f"guidance + DDIM update per step (batch {batch}, CFG on {2 * batch} model rows; medians of 3 interleaved "
          f"runs each): reference (unfused PyTorch) {ref['update_ms']:.3f} ms, FastDDIMSampler (one fused op) "
          f"{fast['update_ms']:.3f} ms: {update_phrase}")
    print(f"  the model call, the same call on the same inputs in both loops, takes {ref['model_ms']:.3f} / "
          f"{fast['model_ms']:.3f} ms (in the fused run: {model_phrase}); "
          f"the loop's other work between steps (the model's inputs, its Python) {ref['other_ms']:.3f} / "
          f"{fast['other_ms']:.3f} ms; whole steps {ref['total_ms']:.3f} vs {fast['total_ms']:.3f} ms, the model "
          f"{model_share:.0%} of the reference step"
          + (" (it dominates: whole-step timings mostly measure it)" if model_share >= 0.5 else "")
          + f"; samples agree to {rel:.1e} (<= {AGREEMENT_RTOL:.0e})")
    report["latency_ms_per_step"] = {
        "reference": {"model": ref["model_ms"], "guidance_update": ref["update_ms"], "other": ref["other_ms"],
                      "total": ref["total_ms"]},
        "fast": {"model": fast["model_ms"], "guidance_update": fast["update_ms"], "other": fast["other_ms"],
                 "total": fast["total_ms"]},
        "guidance_update_speedup": ref["update_ms"] / fast["update_ms"] if fast["update_ms"] > 0 else float("nan"),
        "guidance_update_verdict": update_phrase,
        "measured": "medians of 3 timed runs per loop, interleaved after one warm-up run each",
    }
    report["checks"]["fast_vs_reference"] = {"rel_error": rel, "passed": rel <= AGREEMENT_RTOL}

    # 2a. Unconditional samples (+ the x0 predictions of sample 0 over the steps).
    x_T_u = torch.randn(batch, *model.image_shape, generator=gen).to(dev)
    trajectory: list[torch.Tensor] = []
    samples = _sample(sampler, steps, x_T_u, uncond, None, 1.0,
                      img_callback=lambda pred_x0, i: trajectory.append(pred_x0[:1].detach().clone()))
    nearest, psnr = toy_data.nearest_images(samples, images)
    ok = bool((psnr >= SAMPLE_PSNR_DB).all())
    print(f"unconditional: {batch} samples, PSNR to the nearest data image min {psnr.min():.1f} / mean "
          f"{psnr.mean():.1f} dB (>= {SAMPLE_PSNR_DB:.0f}): {'PASS' if ok else 'FAIL'}; "
          f"{len(set(nearest.tolist()))} distinct images hit")
    report["checks"]["unconditional"] = {"psnr_min": psnr.min().item(), "psnr_mean": psnr.mean().item(),
                                         "nearest": nearest.tolist(), "passed": ok}
    cols = min(batch, 8)
    shown = samples[:(batch // cols) * cols]
    panels.append(figures.Panel(
        f"Unconditional samples ({steps} DDIM steps, eta 0)", shown, cols,
        caption=f"PSNR to the nearest data image: min {psnr.min():.1f} dB (check: >= {SAMPLE_PSNR_DB:.0f} dB, "
                f"{'passed' if ok else 'FAILED'}); {len(set(nearest.tolist()))} distinct data images"))
    if trajectory:
        # Log-spaced frames: the prediction commits to one image within the first few steps.
        last = len(trajectory) - 1
        frames = sorted(set(round((1 + last) ** (k / 9)) - 1 for k in range(10)))
        strip = torch.cat([trajectory[k] for k in frames] + [samples[:1]])
        timesteps = sampler.ddim_timesteps[::-1]
        panels.append(figures.Panel(
            "pred_x0 of the first sample over the steps", strip, len(strip),
            caption="the model's estimate of the clean image at each step (t = model timestep), then the sample",
            col_labels=[f"t={int(timesteps[k])}" for k in frames] + ["sample"]))

    # 2b. Class-conditional samples with classifier-free guidance (the timed run's output).
    nearest_c, psnr_c = toy_data.nearest_images(fast_out, images)
    got = labels[nearest_c]
    want = torch.tensor(cond_labels)
    right_class = bool((got == want).all())
    ok_c = right_class and bool((psnr_c >= SAMPLE_PSNR_DB).all())
    print(f"class-conditional (CFG {guidance}): {int((got == want).sum())}/{batch} in the requested class, "
          f"PSNR min {psnr_c.min():.1f} dB: {'PASS' if ok_c else 'FAIL'}")
    report["checks"]["conditional"] = {"requested": want.tolist(), "got": got.tolist(),
                                       "psnr_min": psnr_c.min().item(), "passed": ok_c}
    # The timed run's batch cycles through the classes: show it one class per row.
    per_class = batch // toy_data.NUM_CLASSES
    order = torch.tensor([k * toy_data.NUM_CLASSES + c for c in range(toy_data.NUM_CLASSES)
                          for k in range(per_class)])
    panels.append(figures.Panel(
        f"Class-conditional samples, classifier-free guidance {guidance:g}", fast_out[order.to(fast_out.device)],
        per_class,
        caption=f"{int((got == want).sum())}/{batch} land on an image of the requested class (rows), "
                f"PSNR min {psnr_c.min():.1f} dB: {'passed' if ok_c else 'FAILED'}",
        row_labels=[f"asked: {name}" for name in toy_data.CLASS_NAMES]))

    # 3. DDIM inversion and reconstruction of one image per class.
    pick = torch.arange(toy_data.NUM_CLASSES) * toy_data.IMAGES_PER_CLASS
    x0 = images[pick.to(images.device)]
    c0 = toy_data.class_embedding(labels[pick], device=dev)
    x_inv, recon = _invert_and_reconstruct(sampler, x0, c0, steps)
    psnr_r = toy_data.psnr(recon, x0)
    ok_r = bool((psnr_r >= RECONSTRUCTION_PSNR_DB).all())
    print(f"DDIM inversion -> reconstruction of {len(pick)} data images: PSNR min {psnr_r.min():.1f} / mean "
          f"{psnr_r.mean():.1f} dB (>= {RECONSTRUCTION_PSNR_DB:.0f}): {'PASS' if ok_r else 'FAIL'}")
    report["checks"]["inversion"] = {"psnr_min": psnr_r.min().item(), "psnr_mean": psnr_r.mean().item(),
                                     "passed": ok_r}
    panels.append(figures.Panel(
        "DDIM inversion (encode) and reconstruction (decode)", torch.cat([x0, x_inv.clamp(-1, 1), recon]),
        len(pick), caption=f"deterministic DDIM maps each image to a noise x_T and back; check: PSNR >= "
                           f"{RECONSTRUCTION_PSNR_DB:.0f} dB, {'passed' if ok_r else 'FAILED'}",
        row_labels=["data image", "inverted x_T", "reconstruction"],
        col_labels=[f"{float(p):.1f} dB" for p in psnr_r]))

    # 4. Slerp between two noises: every frame is a sample, so every frame lands on a data image.
    from ddim_fast import slerp

    z0, z1 = (torch.randn(1, *model.image_shape, generator=gen).to(dev) for _ in range(2))
    alphas = torch.linspace(0, 1, 8).tolist()
    z = torch.cat([slerp(z0, z1, a) for a in alphas])
    frames = _sample(sampler, steps, z, toy_data.class_embedding(None, len(alphas), device=dev), None, 1.0)
    nearest_s, psnr_s = toy_data.nearest_images(frames, images)
    ok_s = bool((psnr_s >= SAMPLE_PSNR_DB).all())
    print(f"slerp strip: {len(alphas)} frames -> data images {nearest_s.tolist()}, PSNR min {psnr_s.min():.1f} dB: "
          f"{'PASS' if ok_s else 'FAIL'}")
    report["checks"]["slerp"] = {"nearest": nearest_s.tolist(), "psnr_min": psnr_s.min().item(), "passed": ok_s}
    panels.append(figures.Panel(
        "Samples along a slerp between two noises", frames, len(alphas),
        caption=f"every frame is a sample, so every frame is a data image: {'passed' if ok_s else 'FAILED'}",
        col_labels=[f"w={a:.2f}" for a in alphas]))

    report["passed"] = all(c["passed"] for c in report["checks"].values())
    upd = report["latency_ms_per_step"]
    files.append(figures.save(
        panels, os.path.join(out_dir, "demo.png"),
        title=f"ddim-fast demo: FastDDIMSampler on the embedded model ({'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'})",
        subtitle=f"device {dev}; guidance + update per step {upd['reference']['guidance_update']:.3f} ms unfused vs "
                 f"{upd['fast']['guidance_update']:.3f} ms fused "
                 f"({upd['guidance_update_verdict']}); the model call {upd['reference']['model']:.3f} / "
                 f"{upd['fast']['model']:.3f} ms (interleaved runs)",
        cell=64))
    report["seconds"] = time.perf_counter() - t_start
    print(f"wrote {', '.join(os.path.basename(f) for f in files)} to {out_dir}")
    print(f"demo {'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.1f} s")
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=arguments.output_dir, default="ddim_fast_demo",
                        help="directory for the labelled figure demo.png (created when missing)")
    parser.add_argument("--quick", action="store_true", help="smaller images, batch and step count (for tests)")
    parser.add_argument("--steps", type=arguments.steps, default=None,
                        help="DDIM steps, 1 to 1000 (default: 50, or 20 with --quick)")
    parser.add_argument("--batch", type=arguments.integer(BATCH_MULTIPLE, multiple_of=BATCH_MULTIPLE,
                                                          why="one figure row per class"),
                        default=None, help=f"samples per run, a multiple of {BATCH_MULTIPLE} "
                                           "(default: 16, or 8 with --quick)")
    parser.add_argument("--guidance", type=arguments.finite_float, default=3.0,
                        help="classifier-free guidance scale")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0, help="seed of every random draw")
    parser.add_argument("--device", type=arguments.device, default="auto",
                        help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton", "reference"),
                        help="the step kernel FastDDIMSampler uses")
    parser.add_argument("--json", metavar="FILE", type=arguments.output_file, default=None,
                        help="also write the report as JSON (default: not written)")


def main(args) -> int:
    report = run_demo(args.out, quick=args.quick, steps=args.steps, batch=args.batch, guidance=args.guidance,
                      seed=args.seed, device=args.device, backend=args.backend)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1
