"""ddim-fast: fused CUDA C++ and Triton kernels for Stable Diffusion's DDIM sampling loop.

Drop-ins: ``FastDDIMSampler`` (ldm ``DDIMSampler``), ``FastDDIMScheduler`` / ``FastDDIMInverseScheduler``
(diffusers), ``patch_attention`` / ``FusedAttnProcessor`` (fused attention); ``optimize(pipe)`` /
``restore(pipe)`` do all of it to a diffusers pipeline in one call, CUDA-graphed UNet included; ``fuse_unet_body``
/ ``unfuse_unet_body`` put the fused GroupNorm(+SiLU) and GEGLU ops into a diffusers UNet. Low level: ``ddim_fast.ops``
and the ``torch.ops.ddim_fast`` operators, which importing this package registers. Architecture:
docs/design.md.
"""

from __future__ import annotations

import importlib

from ddim_fast import _library  # noqa: F401  (loads the kernels: registers every torch.ops.ddim_fast op)

__version__ = "0.1.0"

# Public names and the submodule that defines each; imported on first use so that `import ddim_fast`
# costs little more than `import torch`, and diffusers stays optional.
_LAZY = {
    "FastDDIMSampler": "ddim_fast.sampler",
    "slerp": "ddim_fast.sampler",
    "FastDDIMScheduler": "ddim_fast.scheduler",
    "FastDDIMInverseScheduler": "ddim_fast.scheduler",
    "graphed_denoise_loop": "ddim_fast.scheduler",
    "patch_attention": "ddim_fast.attention_processors",
    "unpatch_attention": "ddim_fast.attention_processors",
    "FusedAttnProcessor": "ddim_fast.attention_processors",
    "fuse_attention": "ddim_fast.attention_processors",
    "unfuse_attention": "ddim_fast.attention_processors",
    "fuse_unet_body": "ddim_fast.unet_fusion",
    "unfuse_unet_body": "ddim_fast.unet_fusion",
    "unet_fusion": "ddim_fast.unet_fusion",
    "unet_ops": "ddim_fast.unet_ops",
    "optimize": "ddim_fast.pipeline",
    "restore": "ddim_fast.pipeline",
    "optimized_state": "ddim_fast.pipeline",
    "pipeline": "ddim_fast.pipeline",
    "module_graph": "ddim_fast.module_graph",
    "fused_attention": "ddim_fast.attention",
    "ops": "ddim_fast.ops",
    "attention": "ddim_fast.attention",
    "graphs": "ddim_fast.graphs",
    "reference": "ddim_fast.reference",
    "schedule": "ddim_fast.schedule",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ddim_fast' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
