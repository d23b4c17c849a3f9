"""LatentInpaintPipeline: repaint the masked region of an image from a prompt; keep the rest.

Two kinds of model, told apart by the UNet's input channels (C = the VAE's latent channels):

- **any text-to-image UNet** (C inputs): mask blending, as diffusers' inpainting pipeline does for 4-channel UNets
  (RePaint-style, Lugmayr et al. 2022, without resampling). After every sampler step the known region is put back
  from the original latents noised to the step's new timestep with the same ε:
      z_{t'} ← m ⊙ z_{t'} + (1 − m) ⊙ (√ᾱ_{t'} z₀ + √(1 − ᾱ_{t'}) ε),   z₀ itself after the last step;
- **an SD-inpainting UNet** (2C + 1 inputs: latents, mask, masked-image latents; SD-inpainting's 9 for C = 4): the
  UNet sees [z_t, m, E(x₀ ⊙ (1 − m))] concatenated along channels at every step, as
  diffusers' StableDiffusionInpaintPipeline feeds it.

| code name              | symbol           | meaning                                                                  |
|------------------------|------------------|--------------------------------------------------------------------------|
| `masks`                | m (pixels)       | (B, 1, H, W) in {0, 1}: 1 = repaint (see pipelines/image_inputs.py)       |
| `latent_masks`         | m (latents)      | (B, 1, h, w): m resized to the latent grid by nearest neighbour (diffusers') |
| `masked_image_latents` | E(x₀ ⊙ (1 − m))  | (B, C, h, w): the known part of the image, encoded                        |
| `keep_unmasked`        |                  | output = m ⊙ D(z₀') + (1 − m) ⊙ x₀ in pixels: outside the mask, exactly x₀ |

Without `keep_unmasked` the output is the decoded latents, as diffusers returns them; the VAE round trip then changes
the kept pixels a little (and on a VAE of f = 8, a latent pixel straddling the mask's edge repaints a few of them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from latentdiff.conditioning import vae_scale_factor
from pipelines.image_inputs import ImageInput, batched, mask_tensor
from pipelines.img2img_pipeline import LatentImg2ImgPipeline, check_strength, strength_timesteps
from pipelines.latent_pipeline import PipelineOutput, randn

BLEND = "blend"  # a text-to-image UNet: the known region re-imposed after every step
INPAINTING_UNET = "inpainting_unet"  # a UNet that takes [z_t, m, masked-image latents]


class LatentInpaintPipeline(LatentImg2ImgPipeline):
    """Inpainting with a text-to-image UNet (mask blending) or an SD-inpainting UNet; loaded like LatentPipeline
    (`from_pretrained` reads a diffusers inpainting folder as it reads a text-to-image one)."""

    @property
    def inpainting_kind(self) -> str:
        """BLEND for a UNet of C input channels, INPAINTING_UNET for one of 2C + 1 (see the module docstring)."""
        latent_channels, in_channels = self.vae.config.latent_channels, self.unet.config.in_channels
        if in_channels == latent_channels:
            return BLEND
        if in_channels == 2 * latent_channels + 1:
            return INPAINTING_UNET
        raise ValueError(
            f"the UNet takes {in_channels} input channels; inpainting needs {latent_channels} (a text-to-image "
            f"UNet, mask blending) or {2 * latent_channels + 1} (an inpainting UNet: latents, mask, masked-image "
            f"latents) for this VAE's {latent_channels} latent channels."
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        masked_image_latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        callback_on_step_end: Callable[..., dict | None] | None = None,
        keep_unmasked: bool = True,
        sample_posterior: bool = False,
    ) -> PipelineOutput:
        """Repaint the white part of `mask_image` in `image` following the prompt.

        Args:
            image: x₀, as in `LatentImg2ImgPipeline` (one, or one per prompt).
            mask_image: m, the image's size: a PIL image read as grayscale, 255 (white) repaint and 0 (black)
                keep, nothing else; or a tensor of 1s and 0s, (B, 1, H, W), (1, H, W) or (H, W). One mask for
                every image or one per prompt.
            strength: s in [0, 1]: 1 (default) repaints the masked region from pure noise; less starts from the
                image noised to the timestep s selects (as `LatentImg2ImgPipeline`), keeping some of what was there.
            masked_image_latents: (B, C, h, w), E(x₀ ⊙ (1 − m)) precomputed, for an inpainting UNet only.
            keep_unmasked: composite the decoded image with x₀ so that pixels outside the mask are exactly the
                input's (output types "pil", "np", "pt"; "latent" returns the latents as they are).
            sample_posterior: z₀ and the masked image's latents sampled from the VAE posterior (diffusers') rather
                than its mean.
            The other arguments are `LatentImg2ImgPipeline.__call__`'s.
        """
        if prompt is None and prompt_embeds is None:
            prompt = self.prompt  # the prompt given at construction, if any
        num_inference_steps, guidance_scale = self.resolve_sampling(num_inference_steps, guidance_scale)
        self._check_scalars(num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, eta)
        self._check_output(output_type, callback_on_step_end)
        check_strength(strength)
        kind = self.inpainting_kind
        if masked_image_latents is not None and kind == BLEND:
            raise ValueError(
                f"masked_image_latents is an input of inpainting UNets ({2 * self.vae.config.latent_channels + 1} "
                f"input channels), but this UNet takes {self.unet.config.in_channels} (a text-to-image UNet, "
                "inpainted by mask blending): leave masked_image_latents out, or load an inpainting UNet."
            )
        images = self._image_tensor(image)
        if mask_image is None:
            raise ValueError("mask_image is required: white (255) where to repaint, black (0) where to keep.")
        masks = mask_tensor(mask_image, tuple(images.shape[-2:]))
        do_guidance = guidance_scale > 1.0
        context = self._context(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, do_guidance
        )
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = strength_timesteps(self.scheduler.timesteps, strength)
        num_prompts = context.shape[0] // (2 if do_guidance else 1) // num_images_per_prompt
        images = batched(images, num_prompts, num_images_per_prompt, "image")
        masks = batched(masks, num_prompts, num_images_per_prompt, "mask_image")

        # diffusers' order of draws from the generator: z₀ (if sampled), then ε, then the masked image's latents
        if kind == BLEND or strength < 1.0:
            image_latents = self._image_latents(images, generator, sample_posterior)
            latents, noise = self._start_latents(image_latents, timesteps, strength, generator)
        else:  # an inpainting UNet from pure noise: the image enters through the masked-image latents alone
            factor = vae_scale_factor(self.vae)
            shape = (
                images.shape[0],
                self.vae.config.latent_channels,
                images.shape[2] // factor,
                images.shape[3] // factor,
            )
            latents = randn(shape, generator, self.device, self.dtype) * self.scheduler.init_noise_sigma
        latent_masks = F.interpolate(masks, size=latents.shape[-2:]).to(device=self.device, dtype=self.dtype)

        extra_channels, after_step = None, None
        if kind == INPAINTING_UNET:
            if masked_image_latents is None:
                masked_images = images * (1 - masks)
                masked_image_latents = self._image_latents(masked_images, generator, sample_posterior)
            elif tuple(masked_image_latents.shape) != tuple(latents.shape):
                raise ValueError(
                    f"masked_image_latents has shape {tuple(masked_image_latents.shape)}; this call needs "
                    f"{tuple(latents.shape)} (batch, latent channels, latent height, latent width)."
                )
            extra_channels = torch.cat([latent_masks, masked_image_latents.to(latents)], dim=1)
        else:

            def after_step(t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
                t_prev = self.scheduler.previous_timestep(t)
                known = (
                    image_latents if t_prev < 0 else self.scheduler.add_noise(image_latents, noise, t_prev)
                )
                return latent_masks * latents + (1 - latent_masks) * known

        latents = self._denoise(
            latents,
            timesteps,
            context,
            guidance_scale,
            guidance_rescale,
            generator,
            eta,
            callback_on_step_end,
            extra_channels=extra_channels,
            after_step=after_step,
        )
        if output_type == "latent":
            return PipelineOutput(images=latents)
        decoded = self._decode(latents)
        if keep_unmasked:
            masks = masks.to(decoded.device)
            decoded = masks * decoded + (1 - masks) * (images.to(decoded.device) / 2 + 0.5)
        return PipelineOutput(images=self._images_as(decoded, output_type))
