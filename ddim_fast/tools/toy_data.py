"""The embedded model of ``python -m ddim_fast demo``: a small procedurally generated image set and its
*exact* denoiser, wrapped as an ldm-style model object that ``FastDDIMSampler`` can sample from.

For a finite data set {x_i} and the forward process x_t = sqrt(a) x0 + sqrt(1 - a) eps, the optimal
eps-predictor is closed form. The posterior over data images is a softmax (an attention over the data):

    w_i(x_t) = softmax_i( log prior_i - ||x_t - sqrt(a) x_i||^2 / (2 (1 - a)) )
    E[x0 | x_t] = sum_i w_i x_i,        eps_hat = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a)

so deterministic DDIM with it must end on (a slightly noised copy of) one data image: the demo can check
its own output. Conditioning is a class-weight vector: a one-hot row restricts the prior to that class's
images, an all-zero row (the "unconditional" embedding) is the uniform prior over every image, so
classifier-free guidance has its usual meaning.
"""

from __future__ import annotations

import math

import torch

from ddim_fast import schedule

CLASS_NAMES = ("rings", "squares", "crosses", "stripes")
IMAGES_PER_CLASS = 4
NUM_CLASSES = len(CLASS_NAMES)
NUM_IMAGES = NUM_CLASSES * IMAGES_PER_CLASS

# Four colours (RGB in [0, 1]) shared by the classes, so class identity is carried by shape alone.
_COLOURS = ((0.95, 0.25, 0.2), (0.2, 0.75, 0.3), (0.25, 0.45, 0.95), (0.95, 0.85, 0.2))


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    return torch.meshgrid(coords, coords, indexing="ij")  # (y, x), each [size, size] in (-1, 1)


def _soft(mask_distance: torch.Tensor, width: float) -> torch.Tensor:
    """Anti-aliased indicator of {distance < 0}: a smooth edge one pixel wide keeps glyphs distinct but smooth."""
    return torch.sigmoid(-mask_distance / width)


def _glyph(class_index: int, variant: int, size: int) -> torch.Tensor:
    """One glyph as a [size, size] float64 mask in [0, 1]. Variants change scale and position."""
    y, x = _grid(size)
    px = 2.0 / size
    shift = 0.18 * ((variant % 2) * 2 - 1)  # variants 0/2 left-up, 1/3 right-down
    scale = 0.55 if variant < 2 else 0.8
    cy, cx = y - shift, x - shift * (1 if variant in (0, 3) else -1)
    if class_index == 0:  # ring
        r = torch.sqrt(cx**2 + cy**2)
        return _soft((r - scale).abs() - 0.14 * scale - px, px)
    if class_index == 1:  # filled square
        d = torch.maximum(cx.abs(), cy.abs()) - scale * 0.8
        return _soft(d, px)
    if class_index == 2:  # plus-shaped cross
        arm = 0.2 * scale + px
        d_h = torch.maximum(cy.abs() - arm, cx.abs() - scale)
        d_v = torch.maximum(cx.abs() - arm, cy.abs() - scale)
        return _soft(torch.minimum(d_h, d_v), px)
    if class_index == 3:  # diagonal stripes
        period = 0.5 * scale + 0.25
        phase = torch.remainder((x + (1 if variant % 2 else -1) * y) / period + variant * 0.25, 1.0)
        return _soft((phase - 0.5).abs() - 0.25, 0.5 * px / period)
    raise ValueError(f"class_index must be in [0, {NUM_CLASSES}), got {class_index}")


def make_images(size: int = 32, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded data set: images [NUM_IMAGES, channels, size, size] float32 in [-1, 1] and their
    class labels int64 [NUM_IMAGES] (IMAGES_PER_CLASS consecutive images per class).

    Colour depends on the variant, shape on the class; channels 1 gives grey glyphs.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    images, labels = [], []
    for class_index in range(NUM_CLASSES):
        for variant in range(IMAGES_PER_CLASS):
            mask = _glyph(class_index, variant, size)
            if channels == 1:
                img = mask[None]
            else:
                colour = torch.tensor(_COLOURS[(variant + class_index) % len(_COLOURS)], dtype=torch.float64)
                background = 0.08
                img = background + mask[None] * (colour[:, None, None] - background)
            images.append(img * 2 - 1)
            labels.append(class_index)
    return torch.stack(images).float(), torch.tensor(labels, dtype=torch.int64)


def class_embedding(labels: torch.Tensor | list[int] | None, batch_size: int | None = None,
                    device=None) -> torch.Tensor:
    """Conditioning for the embedded model: one-hot rows [B, NUM_CLASSES] float32 for class labels, or
    all-zero rows (the unconditional embedding) when ``labels`` is None (then ``batch_size`` is needed)."""
    if labels is None:
        if batch_size is None:
            raise ValueError("class_embedding: batch_size is required when labels is None")
        return torch.zeros(batch_size, NUM_CLASSES, device=device)
    labels = torch.as_tensor(labels, dtype=torch.int64, device=device).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"class labels must lie in [0, {NUM_CLASSES}), got {labels.tolist()}")
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).float()


class ExactDenoiser(torch.nn.Module):
    """The optimal eps-predictor of a finite image set under a given alpha_cumprod schedule.

    forward(x [B, C, H, W], t int64 [B] or scalar, c [B, K] class weights) -> eps_hat [B, C, H, W].
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        self.register_buffer("images", images.float())
        flat = images.reshape(images.shape[0], -1).double()
        # float64 copies for the logits: see posterior_logits.
        self.register_buffer("flat_images64", flat)
        self.register_buffer("sq_norms64", flat.pow(2).sum(-1))
        membership = torch.nn.functional.one_hot(labels.long(), NUM_CLASSES).float()  # [N, K]
        self.register_buffer("membership", membership)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())

    def posterior_logits(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """log p(i | x_t, c) up to a constant: [B, N] float64."""
        b = x.shape[0]
        a = self.alphas_cumprod[t.reshape(-1).long()].double().reshape(-1, 1)  # [B or 1, 1]
        a = a.expand(b, 1) if a.shape[0] == 1 else a
        flat_x = x.reshape(b, -1).double()
        # ||x - sqrt(a) y||^2 = ||x||^2 - 2 sqrt(a) x.y + a ||y||^2: one [B, D] x [D, N] product instead
        # of a [B, N, D] difference tensor. At small t the distances are tiny next to the norms, so this
        # is done in float64 (fp32 would lose them to cancellation).
        sq_dist = (flat_x.pow(2).sum(-1, keepdim=True) - 2 * a.sqrt() * (flat_x @ self.flat_images64.T)
                   + a * self.sq_norms64[None])
        logits = -sq_dist.clamp_min(0) / (2 * (1 - a))
        if c is not None:
            weights = c.reshape(b, -1).double() @ self.membership.double().T  # [B, N]: prior mass of image i
            unconditional = weights.sum(-1, keepdim=True) <= 0
            log_prior = torch.where(weights > 0, weights.clamp_min(1e-300).log(), torch.full_like(weights, -math.inf))
            logits = logits + torch.where(unconditional, torch.zeros_like(log_prior), log_prior)
        return logits

    def predict_x0(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t, c]: [B, C, H, W] float32."""
        probs = torch.softmax(self.posterior_logits(x, t, c), dim=-1)
        return (probs @ self.flat_images64).float().reshape(x.shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        a = self.alphas_cumprod[t.reshape(-1).long()].reshape(-1, *([1] * (x.dim() - 1)))
        x0 = self.predict_x0(x, t, c)
        return ((x.float() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)


class EmbeddedLdmModel(torch.nn.Module):
    """An ldm ``LatentDiffusion``-shaped wrapper of :class:`ExactDenoiser`: it has exactly what ldm's
    ``DDIMSampler`` (and so ``FastDDIMSampler``) reads — num_timesteps, betas, alphas_cumprod,
    alphas_cumprod_prev, device, parameterization='eps', apply_model(x, t, c) — with SD's schedule
    (ldm "linear", 0.00085 .. 0.012, 1000 steps).
    """

    parameterization = "eps"

    def __init__(self, size: int = 32, channels: int = 3, device: torch.device | str | None = None,
                 linear_start: float = 0.00085, linear_end: float = 0.012, num_timesteps: int = 1000):
        super().__init__()
        betas = schedule.ldm_betas("linear", num_timesteps, linear_start, linear_end)
        abar = schedule.alphas_cumprod(betas)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.num_timesteps = num_timesteps
        self.linear_start, self.linear_end = linear_start, linear_end
        # ldm registers these as fp32 buffers (its to_torch); the sampler reads their device.
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", abar.float())
        self.register_buffer("alphas_cumprod_prev", abar_prev.float())
        images, labels = make_images(size, channels)
        self.register_buffer("labels", labels)
        self.denoiser = ExactDenoiser(images, labels, abar.float())
        self.to(device if device is not None else "cpu")

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def images(self) -> torch.Tensor:
        """The data set, [N, C, H, W] in [-1, 1]."""
        return self.denoiser.images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.denoiser.images.shape[1:])

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond, *args, **kwargs) -> torch.Tensor:
        """eps_hat for x_noisy [B, C, H, W] at timesteps t [B] under conditioning cond [B, K] (or None,
        or ldm's dict form {'c_crossattn': [tensor]})."""
        if isinstance(cond, dict):
            values = next(iter(cond.values()))
            cond = torch.cat(values, 0) if isinstance(values, (list, tuple)) else values
        elif isinstance(cond, (list, tuple)):
            cond = torch.cat(list(cond), 0)
        return self.denoiser(x_noisy, t, cond)

    def get_learned_conditioning(self, labels) -> torch.Tensor:
        """ldm's text-encoder hook, here: class labels -> one-hot rows; None/'' entries -> unconditional."""
        if isinstance(labels, (list, tuple)) and labels and all(v in (None, "") for v in labels):
            return class_embedding(None, len(labels), self.device)
        return class_embedding(labels, device=self.device)


# --------------------------------------------------------------------------------------------------
# Checks the demo runs on its own output
# --------------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """PSNR in dB per sample for images in [-1, 1] (peak-to-peak 2): a, b [B, ...] -> [B]."""
    mse = (a.double() - b.double()).pow(2).reshape(a.shape[0], -1).mean(-1)
    return 10 * torch.log10(peak_to_peak**2 / mse.clamp_min(1e-20))


def nearest_images(samples: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For samples [B, C, H, W]: (index of the nearest data image [B], PSNR to it in dB [B])."""
    flat_s = samples.double().reshape(samples.shape[0], -1).cpu()
    flat_d = images.double().reshape(images.shape[0], -1).cpu()
    dist = torch.cdist(flat_s, flat_d)
    index = dist.argmin(dim=1)
    return index, psnr(samples.cpu(), images.cpu()[index])
