"""Tiny random-weight diffusers pipelines built from configs (no downloads), in the style of diffusers' own
pipeline tests, for ``ddim_fast.optimize`` tests: SD, SD img2img, SD inpaint (9-channel UNet), SDXL, SDXL
img2img, SD ControlNet, DiffEdit (which inverts with ``DDIMInverseScheduler``).

No text encoder or tokenizer: every call passes prompt embeddings (what the UNet sees is the same). Latents
are 4 x 16 x 16 (32 px images through a two-block VAE); a UNet call takes a few ms on one CPU core.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

# Stable Diffusion's scheduler config (what SD checkpoints ship).
SD_SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           set_alpha_to_one=False, steps_offset=1)
# SD 2.x-style zero-terminal-SNR v-prediction with trailing spacing (where guidance_rescale matters).
ZERO_SNR_CONFIG = dict(SD_SCHEDULER_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing",
                       rescale_betas_zero_snr=True)

TEXT_DIM = 32
TEXT_TOKENS = 7
POOLED_DIM = 32  # SDXL pooled text embedding (text_encoder_2's projection_dim)
IMAGE_SIZE = 32


def tiny_unet(*, in_channels: int = 4, sdxl: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel

    if sdxl:
        # SDXL's added conditioning: pooled text embeds + 6 time ids of addition_time_embed_dim each.
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM, use_linear_projection=True,
                     attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2))
    else:
        extra = dict(attention_head_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=IMAGE_SIZE // 2, in_channels=in_channels,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM, norm_num_groups=8,
            **extra)
    return unet.eval()


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8)
    return vae.eval()


def tiny_controlnet(seed: int = 2):
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel(
            block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=TEXT_DIM,
            conditioning_embedding_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8)
    return controlnet.eval()


def ddim(config: dict | None = None):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(config or SD_SCHEDULER_CONFIG))


def prompt_embeds(batch: int = 1, seed: int = 3, pooled: bool = False) -> dict:
    """prompt_embeds / negative_prompt_embeds [batch, 7, 32] (and SDXL's pooled [batch, 32] pair)."""
    gen = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=gen),
           "negative_prompt_embeds": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=gen)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=gen)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=gen)
    return out


def pil_image(seed: int = 4, channels: int = 3) -> PIL.Image.Image:
    """A random 32 x 32 PIL image: through ``VaeImageProcessor.preprocess`` it becomes a channels_last tensor,
    as users' PIL inputs do."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, channels), dtype=np.uint8)
    return PIL.Image.fromarray(array if channels == 3 else array[..., 0])


def _sd_common(unet, scheduler):
    return dict(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd(config: dict | None = None):
    from diffusers import StableDiffusionPipeline

    return _quiet(StableDiffusionPipeline(**_sd_common(tiny_unet(), ddim(config))))


def sd_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    return _quiet(StableDiffusionImg2ImgPipeline(**_sd_common(tiny_unet(), ddim())))


def sd_inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    return _quiet(StableDiffusionInpaintPipeline(**_sd_common(tiny_unet(in_channels=9), ddim())))


def sd_controlnet():
    from diffusers import StableDiffusionControlNetPipeline

    return _quiet(StableDiffusionControlNetPipeline(controlnet=tiny_controlnet(), **_sd_common(tiny_unet(), ddim())))


def sd_diffedit():
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    return _quiet(StableDiffusionDiffEditPipeline(inverse_scheduler=DDIMInverseScheduler(**SD_SCHEDULER_CONFIG),
                                                  **_sd_common(tiny_unet(), ddim())))


def _sdxl_common():
    return dict(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                unet=tiny_unet(sdxl=True), scheduler=ddim())


def sdxl():
    from diffusers import StableDiffusionXLPipeline

    return _quiet(StableDiffusionXLPipeline(**_sdxl_common(), add_watermarker=False))


def sdxl_img2img():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _quiet(StableDiffusionXLImg2ImgPipeline(**_sdxl_common(), add_watermarker=False,
                                                   requires_aesthetics_score=False))


class TinyTokenizer:
    """A stand-in for ``CLIPTokenizer`` (no vocabulary to download) for pipelines that tokenize even when given
    embeddings (LEDITS++ tokenizes the empty negative prompt): one token per character, between start and end
    tokens, padded with the end token to ``model_max_length``."""

    model_max_length = TEXT_TOKENS
    vocab_size = 64
    bos_token_id, eos_token_id = 0, 1

    def _ids(self, text: str) -> list[int]:
        return [self.bos_token_id] + [2 + ord(ch) % (self.vocab_size - 2) for ch in text] + [self.eos_token_id]

    def __call__(self, texts, padding="max_length", max_length=None, truncation=False, return_tensors="pt",
                 return_length=False, **kwargs):
        from transformers import BatchEncoding

        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._ids(t) for t in texts]
        if truncation and max_length is not None:
            rows = [r[: max_length - 1] + [self.eos_token_id] if len(r) > max_length else r for r in rows]
        width = max_length if padding == "max_length" and max_length is not None else max(map(len, rows))
        lengths = [len(r) for r in rows]
        ids = torch.tensor([r + [self.eos_token_id] * (width - len(r)) for r in rows], dtype=torch.int64)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.int64)
        data = {"input_ids": ids, "attention_mask": mask}
        if return_length:
            data["length"] = torch.tensor(lengths, dtype=torch.int64)
        return BatchEncoding(data)

    added_tokens_encoder: dict = {}  # read by diffusers' textual-inversion prompt conversion

    def tokenize(self, text: str) -> list[str]:
        return list(text)

    def batch_decode(self, ids, **kwargs):
        return ["" for _ in ids]


def tiny_text_encoder(seed: int = 5):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=TinyTokenizer.vocab_size, hidden_size=TEXT_DIM, intermediate_size=37,
                                num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=TEXT_TOKENS,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return CLIPTextModel(config).eval()


def ledits_pp():
    """LEDITS++ (``invert`` then edit calls on the inverted latents) with a DDIM scheduler, which it keeps."""
    from diffusers import LEditsPPPipelineStableDiffusion

    parts = dict(_sd_common(tiny_unet(), ddim()), text_encoder=tiny_text_encoder(), tokenizer=TinyTokenizer())
    return _quiet(LEditsPPPipelineStableDiffusion(**parts))
