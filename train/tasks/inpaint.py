"""The inpainting task (`train_t2i.py --inpainting`): text-to-image training of an SD-inpainting UNet.

The UNet reads 2C + 1 channels, [z_t, m↓, E(x ⊙ (1 − m))] (Stable Diffusion's inpainting model: 9 for C = 4), the
layout `LatentInpaintPipeline` feeds an inpainting UNet; the loss, data and schedule are `TextToImageTask`'s.

| code name              | symbol          | meaning                                                                 |
|------------------------|-----------------|-------------------------------------------------------------------------|
| `masks`                | m               | (B, 1, H, W) random masks, 1 = repaint (`inpaint_masks.random_masks`)     |
| `latent_masks`         | m↓              | (B, 1, h, w): m resized to the latent grid by nearest neighbour (as the pipeline) |
| `masked_image_latents` | E(x ⊙ (1 − m))  | (B, C, h, w): the VAE latents (posterior mean or sample, as z₀) of the image with the masked part set to 0 (mid-gray) |

    loss = mean_b w(t_b) · mean_{c,h,w} (UNet([z_t, m↓, E(x ⊙ (1 − m))], t, c) − y)²

A text-to-image UNet (C inputs) becomes an inpainting one by `widen_conv_in`: the first convolution gets C + 1 more
input channels with zero weights, so before any step the UNet predicts exactly what the text-to-image model did,
whatever the mask and the masked image (Rombach et al. 2022 initialised SD-inpainting this way).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latentdiff.conditioning import encode_posterior
from latentdiff.data.cache import sample_posterior
from latentdiff.models.unet import ConditionalUNet
from train.randomness import BatchRandom, derive_seed
from train.tasks.inpaint_masks import random_masks
from train.tasks.t2i import TextToImageTask


def inpainting_channels(latent_channels: int) -> int:
    """2C + 1: the input channels of an inpainting UNet over C-channel latents."""
    return 2 * latent_channels + 1


def widen_conv_in(unet: ConditionalUNet, latent_channels: int) -> ConditionalUNet:
    """The same UNet taking [z_t, m↓, masked-image latents] (2C + 1 channels): conv_in's weights for the C + 1 new
    channels are zero, every other weight is the text-to-image UNet's (a new module; `unet` is left as it is)."""
    if unet.config.in_channels != latent_channels:
        raise ValueError(
            f"the UNet takes {unet.config.in_channels} input channels, not the latents' {latent_channels}: only a "
            "text-to-image UNet can be widened into an inpainting one."
        )
    config = dataclasses.replace(unet.config, in_channels=inpainting_channels(latent_channels))
    state = dict(unet.state_dict())
    weight = state["conv_in.weight"]  # (C_out, C, 3, 3)
    extra = weight.new_zeros(weight.shape[0], config.in_channels - latent_channels, *weight.shape[2:])
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)  # (C_out, 2C + 1, 3, 3)
    widened = ConditionalUNet(config).to(device=weight.device, dtype=weight.dtype)
    widened.load_state_dict(state)
    widened.train(unet.training)
    return widened


class InpaintingTask(TextToImageTask):
    """Text-to-image training of an inpainting UNet: each sample gets a random mask, and the UNet reads the mask and
    the masked image's latents next to z_t (see the module docstring). Needs the images (no latent cache)."""

    def masked_image_channels(
        self, pixel_values: torch.Tensor, masks: torch.Tensor, rng: BatchRandom | None
    ) -> torch.Tensor:
        """[m↓, E(x ⊙ (1 − m))]: (B, C + 1, h, w) from images x (B, 3, H, W) in [-1, 1] and masks m (B, 1, H, W);
        the latents are the posterior mean, or (--latent_sample sample) a sample drawn from `rng`."""
        with torch.no_grad():
            mean, logvar = encode_posterior(self.models.vae, pixel_values * (1 - masks))
        if self.cfg.latent_sample == "mean" or rng is None:
            masked_image_latents = mean
        else:
            masked_image_latents = sample_posterior(mean, logvar, rng.randn(*mean.shape[1:]))
        latent_masks = F.interpolate(masks, size=mean.shape[-2:])  # nearest, as LatentInpaintPipeline
        return torch.cat([latent_masks.to(mean), masked_image_latents], dim=1)

    def extra_channels(self, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        """The inpainting inputs of one micro-batch, drawn after every draw of the text-to-image loss."""
        pixel_values = batch["pixel_values"].to(self.device)
        masks = random_masks(
            rng, pixel_values.shape[-2], pixel_values.shape[-1], self.cfg.inpainting_full_mask_prob
        )
        return self.masked_image_channels(pixel_values, masks.to(pixel_values), rng)

    def _holdout(self, holdout: torch.utils.data.Dataset, collate) -> dict[str, torch.Tensor] | None:
        """The text-to-image held-out batch plus fixed random masks and their masked-image latents."""
        b = super()._holdout(holdout, collate)
        if b is None:
            return None
        pixels = collate([holdout[(0, i)] for i in range(len(holdout))])["pixel_values"].to(self.device)
        pixels = pixels.repeat_interleave(len(b["latents"]) // len(pixels), dim=0)
        n = len(pixels)
        rng = BatchRandom(derive_seed(self.seed, "validation masks"), 0, 0, n, 0, n, self.device)
        masks = random_masks(rng, pixels.shape[-2], pixels.shape[-1], self.cfg.inpainting_full_mask_prob)
        b["extra_channels"] = self.masked_image_channels(pixels, masks.to(pixels), None)
        return b

    @torch.no_grad()
    def validation_images(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> list[Image.Image]:
        """One image per validation prompt, inpainted over a fully masked image (text-to-image); prompt i, seed i."""
        from pipelines.inpaint_pipeline import LatentInpaintPipeline

        pipe = self.validation_pipeline(LatentInpaintPipeline, unet, text_encoder)
        size = self.cfg.resolution
        gray, full = Image.new("RGB", (size, size), (128, 128, 128)), torch.ones(1, 1, size, size)
        images = []
        for i, prompt in enumerate(self.cfg.validation_prompts):
            with self.accelerator.autocast():
                images.extend(
                    pipe(
                        prompt,
                        image=gray,
                        mask_image=full,
                        num_inference_steps=self.cfg.validation_num_inference_steps,
                        guidance_scale=self.cfg.validation_guidance_scale,
                        generator=torch.Generator(device="cpu").manual_seed(i),
                    ).images
                )
        return images

    def card_details(self, trainer) -> dict[str, object]:
        return {
            **super().card_details(trainer),
            "inpainting": f"2C+1-channel UNet, fully masked with probability {self.cfg.inpainting_full_mask_prob}",
        }
