"""``python -m ddim_fast demo``: sample a model whose correct output is known, with ``FastDDIMSampler``,
and check the result. No downloads.

The model is ``ddim_fast.tools.toy_data.EmbeddedLdmModel``: the exact (closed-form) denoiser of 16 built-in
glyph images in 4 classes, dressed as an ldm model with SD's noise schedule. Deterministic DDIM with it
must end on one of the data images, and class-conditional sampling with classifier-free guidance on an
image of the requested class. The demo

1. times the plain-PyTorch reference loop (``reference.ddim_step`` per step, unfused) and
   ``FastDDIMSampler`` per step on the same problem, and checks they agree;
2. samples unconditionally and class-conditionally (CFG) and checks every sample lands on a data image
   (PSNR to the nearest one above a threshold) of the right class;
3. shows the x0 predictions over the steps for one sample;
4. inverts data images with DDIM (``encode``) and reconstructs them (``decode``), PSNR printed;
5. samples along a slerp between two noises.

PNGs go to ``--out`` (default ./ddim_fast_demo). Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from typing import Any

import torch

from ddim_fast import reference
from ddim_fast.tools import bench, profiler, toy_data

# A DDIM sample is x_prev = sqrt(a_0) x0_hat + sqrt(1 - a_0) eps_hat at the last step, so it keeps a
# sqrt(1 - a_0) ~ 0.029 trace of noise around the data image: ~36.7 dB. Well below that is a miss.
SAMPLE_PSNR_DB = 30.0
# DDIM inversion + reconstruction of a data image with the exact denoiser.
RECONSTRUCTION_PSNR_DB = 25.0
# Reference loop vs FastDDIMSampler over a whole fp32 run (docs/design.md's drop-in contract).
AGREEMENT_RTOL = 1e-5


# --------------------------------------------------------------------------------------------------
# PNG output
# --------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, same shape."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, upscale: int = 2, pad_value: int = 255) -> torch.Tensor:
    """images [N, C, H, W] in [-1, 1] -> one uint8 picture [H', W', C] with ``nrow`` images per row,
    each upscaled (nearest) ``upscale`` times, separated by ``pad`` pixels."""
    if images.dim() != 4:
        raise ValueError(f"image_grid: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    imgs = to_uint8(images)
    if upscale > 1:
        imgs = imgs.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, c, h, w = imgs.shape
    ncol = max(1, nrow)
    nrows = (n + ncol - 1) // ncol
    canvas = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, top:top + h, left:left + w] = imgs[k]
    return canvas.permute(1, 2, 0).contiguous()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: torch.Tensor) -> bytes:
    """A minimal PNG encoder (8-bit grey or RGB, no filtering) for when Pillow is missing.
    pixels: uint8 [H, W] or [H, W, 1|3]."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"encode_png: pixels must be uint8, got {pixels.dtype}")
    if pixels.dim() == 2:
        pixels = pixels[..., None]
    h, w, c = pixels.shape
    if c not in (1, 3):
        raise ValueError(f"encode_png: expected 1 or 3 channels, got {c}")
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.reshape(h, w * c)], dim=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 6)) + _png_chunk(b"IEND", b""))


def save_png(pixels: torch.Tensor, path: str) -> str:
    """Write uint8 [H, W, C] with Pillow, or with the built-in encoder when Pillow is not installed."""
    arr = pixels if pixels.shape[-1] == 3 else pixels[..., 0]
    try:
        from PIL import Image
    except ImportError:
        with open(path, "wb") as f:
            f.write(encode_png(pixels))
        return path
    Image.fromarray(arr.numpy()).save(path)
    return path


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
    """Run every part of the demo; returns a JSON-able report with 'passed' and the per-check results."""
    FastDDIMSampler = bench.require_sampler()
    dev = bench.resolve_device(device)
    size = 16 if quick else 32
    steps = steps or (20 if quick else 50)
    batch = batch or (8 if quick else 16)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(seed)

    model = toy_data.EmbeddedLdmModel(size=size, device=dev)
    images, labels = model.images, model.labels.cpu()
    report: dict[str, Any] = {"device": str(dev), "steps": steps, "batch": batch,
                              "image_shape": list(model.image_shape),
                              "guidance": guidance, "checks": {}, "files": []}
    files = report["files"]
    files.append(save_png(image_grid(images, toy_data.IMAGES_PER_CLASS, upscale=64 // size),
                          os.path.join(out_dir, "data.png")))
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
    problem = bench.Problem(model, x_T, cond, uncond, steps, guidance)
    ref_rows, ref_out = profiler.profile_steps(problem, backend="reference", repeats=3)
    fast_rows, fast_out = profiler.profile_steps(problem, backend=backend, repeats=3)
    ref_ms = profiler.summary(ref_rows)["total_ms"]["mean"]
    fast_ms = profiler.summary(fast_rows)["total_ms"]["mean"]
    rel = reference.relative_error(fast_out, ref_out)
    print(f"per-step latency (batch {batch} with CFG = {2 * batch} model rows): reference loop {ref_ms:.3f} ms, "
          f"FastDDIMSampler {fast_ms:.3f} ms ({ref_ms / fast_ms:.2f}x); "
          f"relative difference of the samples {rel:.2e} (<= {AGREEMENT_RTOL:.0e})")
    report["latency_ms_per_step"] = {"reference": ref_ms, "fast": fast_ms}
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
    files.append(save_png(image_grid(samples, min(batch, 8), upscale=64 // size),
                          os.path.join(out_dir, "samples.png")))
    if trajectory:
        # Log-spaced frames: the prediction commits to one image within the first few steps.
        last = len(trajectory) - 1
        frames = sorted(set(round((1 + last) ** (k / 9)) - 1 for k in range(10)))
        strip = torch.cat([trajectory[k] for k in frames] + [samples[:1]])
        files.append(save_png(image_grid(strip, len(strip), upscale=64 // size), os.path.join(out_dir, "pred_x0.png")))

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
    files.append(save_png(image_grid(fast_out, toy_data.NUM_CLASSES, upscale=64 // size),
                          os.path.join(out_dir, "conditional.png")))

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
    # inversion.png rows: the data images, their DDIM-inverted x_T, the reconstructions.
    files.append(save_png(image_grid(torch.cat([x0, x_inv.clamp(-1, 1), recon]), len(pick), upscale=64 // size),
                          os.path.join(out_dir, "inversion.png")))

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
    files.append(save_png(image_grid(frames, len(alphas), upscale=64 // size), os.path.join(out_dir, "slerp.png")))

    report["passed"] = all(c["passed"] for c in report["checks"].values())
    report["seconds"] = time.perf_counter() - t_start
    print(f"wrote {', '.join(os.path.basename(f) for f in files)} to {out_dir}")
    print(f"demo {'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.1f} s")
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="ddim_fast_demo", help="directory for the PNGs (default ./ddim_fast_demo)")
    parser.add_argument("--quick", action="store_true", help="smaller images, batch and step count (for tests)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, --quick 20)")
    parser.add_argument("--batch", type=int, default=None, help="samples per run (default 16, --quick 8)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton", "reference"))
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")


def main(args) -> int:
    report = run_demo(args.out, quick=args.quick, steps=args.steps, batch=args.batch, guidance=args.guidance,
                      seed=args.seed, device=args.device, backend=args.backend)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1
