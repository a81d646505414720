"""Where the ldm sampler's noise comes from: x_T and the per-step z (``noise_mode="torch"``, ldm's global-RNG
draws or the caller's generators), or the seeds of the kernel's Philox stream (``noise_mode="philox"``).
The mapping is documented in docs/design.md section 4."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NOISE_MODES", "NoiseSource", "randn_per_sample"]

NOISE_MODES = ("torch", "philox")


def randn_per_sample(shape, generator, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normals of ``shape`` [B, ...] in the default dtype: from the global RNG (generator None), one
    generator, or one generator per sample, each drawing its own row (so a sample's draws do not depend on
    its batch or its position in it). Drawn on each generator's device, then moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, out=out) if out is not None else torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(shape, generator=generator, device=generator.device)
    else:
        z = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
    z = z.to(device)
    return out.copy_(z) if out is not None else z


@dataclass(frozen=True, eq=False)
class NoiseSource:
    """The step noise of one run.

    mode: "torch" (z drawn per step, as ldm does: even at eta = 0, to keep the global RNG in step),
    "philox" (the kernel draws from ``rng_state``; nothing drawn here) or "none" (DDIM inversion: no noise,
    no draws). has_noise: some sigma of the run is non-zero. generator: None (the global RNG), one
    ``torch.Generator`` or one per sample. dropout: ldm's ``noise_dropout`` on z. rng_state: philox only,
    int64 [2] (one stream) or [B, 2] (one per sample), on the sampling device."""

    mode: str
    has_noise: bool = False
    generator: Any = None
    dropout: float = 0.0
    rng_state: torch.Tensor | None = None

    @classmethod
    def for_run(cls, mode: str, has_noise: bool, generator, dropout: float, device) -> "NoiseSource":
        """The source of a sampling run (``generator`` already checked). In philox mode with noise, one seed
        per run from the generator (or the global CPU RNG); with one generator per sample, one seed per
        sample: the kernel then draws row b's noise from row b's (seed, offset) alone."""
        rng_state = None
        if mode == "philox" and has_noise:
            generators = generator if isinstance(generator, list) else [generator]
            seeds = [torch.randint(0, 2**62, (1,), generator=g, device=g.device if g is not None else "cpu").item()
                     for g in generators]
            rows = torch.tensor([[seed, 0] for seed in seeds], dtype=torch.int64)
            rng_state = (rows if isinstance(generator, list) else rows[0]).to(device)
        return cls(mode, has_noise, generator, float(dropout), rng_state)

    @property
    def needs_buffer(self) -> bool:
        """Whether a captured step reads z from a static buffer (refilled by :meth:`draw` before each replay)."""
        return self.mode == "torch" and self.has_noise

    def draw(self, x: torch.Tensor, repeat_noise: bool = False, out: torch.Tensor | None = None):
        """The z of one step for latents ``x`` [B, ...], or None when the step takes none (the draws happen
        anyway in torch mode: ldm draws even at eta = 0). ``repeat_noise``: one draw for the whole batch
        (ldm's p_sample_ddim option). ``out`` (graph path): draw straight into that static buffer (same
        values as a fresh draw)."""
        if self.mode != "torch":
            return None
        if out is not None and not repeat_noise:
            randn_per_sample(x.shape, self.generator, x.device, out=out)
            if self.dropout > 0.0:
                out.copy_(torch.nn.functional.dropout(out, p=self.dropout))
            return out
        if repeat_noise:
            first = self.generator if not isinstance(self.generator, list) else self.generator[0]
            one = randn_per_sample((1, *x.shape[1:]), first, x.device)
            z = one.repeat(x.shape[0], *([1] * (x.dim() - 1)))
        else:
            z = randn_per_sample(x.shape, self.generator, x.device)
        if self.dropout > 0.0:
            # dropout(sigma * z * T) == sigma * T * dropout(z): same RNG draws, same mask.
            z = torch.nn.functional.dropout(z, p=self.dropout)
        return z if self.has_noise else None
