"""The ldm sampler's argument checks, run before any work (no model call, no draw from a generator, no
schedule change): the shapes a run combines (latents, mask, x0, conditioning and unconditional
conditioning), whether a run is guided, and the ``generator=`` argument; messages name the argument and
what was expected. Also ldm's warning when the conditioning's batch is not the batch size."""

from __future__ import annotations

import logging

import torch

__all__ = ["check_sampling_inputs", "check_uncond_pairs", "check_generator", "fits_latents", "is_guided",
           "warn_conditioning_batch"]


def fits_latents(shape: tuple, latent_shape: tuple) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``latent_shape`` without changing it (right-aligned dims
    equal or 1, no extra dims)."""
    return len(shape) <= len(latent_shape) and all(
        s in (1, target) for s, target in zip(reversed(shape), reversed(latent_shape)))


def check_uncond_pairs(op: str, cond, uncond, path: str = "") -> None:
    """unconditional_conditioning mirrors conditioning: same structure, and each tensor the shape of its
    conditional counterpart (the guided batch is cat([uc, c]) and the model output is split in halves)."""
    c_name, u_name = f"conditioning{path}", f"unconditional_conditioning{path}"
    if isinstance(cond, dict):
        if not isinstance(uncond, dict):
            raise TypeError(f"{op}: {u_name} must be a dict when {c_name} is a dict, got {type(uncond).__name__}")
        for key, value in cond.items():
            if key not in uncond:
                raise ValueError(f"{op}: {u_name} lacks the key {key!r} that {c_name} has")
            check_uncond_pairs(op, value, uncond[key], f"{path}[{key!r}]")
        return
    if isinstance(cond, list):
        if not isinstance(uncond, list):
            raise TypeError(f"{op}: {u_name} must be a list when {c_name} is a list, got {type(uncond).__name__}")
        if len(uncond) != len(cond):
            raise ValueError(f"{op}: {u_name} must be a list of {len(cond)} like {c_name}, got {len(uncond)}")
        for i, (c, u) in enumerate(zip(cond, uncond)):
            check_uncond_pairs(op, c, u, f"{path}[{i}]")
        return
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{op}: {c_name} must be a tensor, a list or a dict of them, got {type(cond).__name__}")
    if not isinstance(uncond, torch.Tensor):
        raise TypeError(f"{op}: {u_name} must be a tensor like {c_name}, got {type(uncond).__name__}")
    if uncond.shape != cond.shape:
        raise ValueError(f"{op}: {u_name} must have the shape of {c_name} {tuple(cond.shape)} (one unconditional "
                         f"row per conditional row: the guided batch is cat([uc, c])), got {tuple(uncond.shape)}")


def check_sampling_inputs(op: str, latent_shape, *, cond=None, uncond=None, guided: bool = False, mask=None,
                           x0=None) -> None:
    """The shapes a sampling run combines, checked before any work: no model call, no RNG draw (a rejected
    call leaves the global generator as it was), no schedule change. Upstream would fail deep inside on
    any of these with a bare broadcasting or cat error, or after the first steps.

    latent_shape: the latents' shape [B, C, H, W] (x_T's, or (batch_size, *shape)). With ``guided``
    (unconditional_conditioning given and a guidance scale != 1): ``uncond`` mirrors ``cond`` (tensor, list,
    or dict of tensors / lists; extra dict keys are ignored as upstream does) tensor for tensor, with equal
    shapes. ``mask`` (1 = keep x0): a real tensor that broadcasts to the latents' shape ([B, 1, H, W] is
    ldm's), needing ``x0`` of the latents' rank that broadcasts to it too (usually exactly [B, C, H, W])."""
    latent_shape = tuple(latent_shape)
    if guided:
        if cond is None:
            raise ValueError(f"{op}: unconditional_conditioning needs conditioning (guidance combines both)")
        check_uncond_pairs(op, cond, uncond)
    if mask is None:
        return
    if x0 is None:
        raise ValueError(f"{op}: mask needs x0 (the latents to keep where mask == 1)")
    for name, value in (("mask", mask), ("x0", x0)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if mask.dtype == torch.bool or mask.is_complex():
        raise TypeError(f"{op}: mask must be a real tensor (1 = keep x0, 0 = sample; upstream computes 1 - mask), "
                        f"got {mask.dtype}; pass mask.float()")
    if not fits_latents(tuple(mask.shape), latent_shape):
        hint = ""
        if mask.dim() >= 2 and len(latent_shape) >= 2 and tuple(mask.shape[-2:]) != latent_shape[-2:] \
                and mask.shape[-1] > latent_shape[-1]:
            hint = f" (a mask at image resolution must be resized to the latent resolution {latent_shape[-2:]})"
        raise ValueError(f"{op}: mask must broadcast to the latents' shape {latent_shape} without changing it "
                         f"(each dim equal or 1, e.g. [B, 1, H, W]), got {tuple(mask.shape)}{hint}")
    if x0.dim() != len(latent_shape) or not fits_latents(tuple(x0.shape), latent_shape):
        raise ValueError(f"{op}: x0 (the latents kept where mask == 1) must have the latents' shape {latent_shape} "
                         f"(or size 1 in a dim), got {tuple(x0.shape)}")


def is_guided(uncond, scale, ucg_schedule=None) -> bool:
    """Whether a run combines unconditional_conditioning with the conditioning (upstream's test: uc given and
    a scale != 1; any non-number scale counts, the scalar checks reject it)."""
    if uncond is None:
        return False
    scales = list(ucg_schedule) if ucg_schedule is not None else [scale]
    try:
        return any(bool(s != 1.0) for s in scales)
    except (TypeError, RuntimeError, ValueError):
        return True


def check_generator(generator, batch: int):
    """None, one torch.Generator, or a list of ``batch`` generators (one per sample, as diffusers takes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"FastDDIMSampler: generator must be a torch.Generator or a list of {batch} "
                             f"(one per sample), got a list of {len(generator)}")
        return list(generator)
    raise TypeError(f"FastDDIMSampler: generator must be a torch.Generator, a list of them or None, "
                    f"got {type(generator).__name__}")


def _first_tensor(tree):
    while isinstance(tree, (list, tuple)):
        tree = tree[0]
    return tree


def warn_conditioning_batch(conditioning, batch_size: int, logger: logging.Logger) -> None:
    """ldm's warning when the conditioning's batch is not ``batch_size`` (upstream's crashes for a list)."""
    if conditioning is None:
        return
    if isinstance(conditioning, dict):
        cbs = _first_tensor(conditioning[list(conditioning.keys())[0]]).shape[0]
        if cbs != batch_size:
            logger.warning("Got %d conditionings but batch-size is %d", cbs, batch_size)
    elif isinstance(conditioning, list):
        for ctmp in conditioning:
            if ctmp.shape[0] != batch_size:
                logger.warning("Got %d conditionings but batch-size is %d", ctmp.shape[0], batch_size)
    elif conditioning.shape[0] != batch_size:
        logger.warning("Got %d conditionings but batch-size is %d", conditioning.shape[0], batch_size)
