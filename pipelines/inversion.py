"""DDIM inversion as a pipeline method: an image -> the noise z_T that DDIM sampling maps back to it.

Song et al. 2021 §4.3 / §5.4: DDIM's η = 0 update is the Euler step of an ODE, so it can be run backwards, from z₀
up the chain to z_T (`DDIMScheduler.invert_step`). Sampling from that z_T with the same prompt, steps and guidance
1 gives the image back up to the approximation ε̂(z_t) ≈ ε̂(z_{t'}) (exact as the steps shrink); sampling it with a
changed prompt edits the image while keeping its layout (Mokady et al. 2023 use it as the start of
null-text inversion; with guidance > 1 the reconstruction drifts, which is what their method corrects).

    pipe = LatentPipeline()
    z_T = pipe.invert(image, "a large red circle in the center on a black background", num_inference_steps=50)
    same = pipe("a large red circle ...", latents=z_T, num_inference_steps=50, guidance_scale=1.0).images[0]
    edited = pipe("a large blue circle ...", latents=z_T, num_inference_steps=50, guidance_scale=1.0).images[0]
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from latentdiff.conditioning import vae_scale_factor
from pipelines.image_inputs import ImageInput, batched, encode_image_latents, image_tensor


class InversionMixin:
    """`invert` for a pipeline with LatentPipeline's parts and shared steps (`_context`, `_guided_prediction`)."""

    @torch.no_grad()
    def invert(
        self,
        image: ImageInput,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_T of DDIM inversion: the noise from which `pipe(prompt, latents=z_T, num_inference_steps=n,
        guidance_scale=w)` redraws `image`.

        Args:
            image: x₀: a PIL image, a list of P (one per prompt), or a (B, 3, H, W) tensor in [-1, 1]; encoded to
                the VAE posterior mean.
            prompt: the image's caption (one, or P prompts); the prompt the inversion conditions on.
            num_inference_steps: n; regenerate with the same n (the inversion visits the sampler's timesteps in
                ascending order).
            guidance_scale: w of the inversion's model calls (1: the conditional branch alone, which inverts
                best); negative_prompt and the embeddings as in `LatentPipeline.__call__`.

        Returns:
            z_T, (B, C, h, w) with B = max(P, images), in the UNet's dtype; divide by the sampler's init_noise_sigma
            (1 for DDIM) before passing it as `latents` to a sampler that has another.
        """
        if not hasattr(self.scheduler, "invert_step"):
            raise TypeError(
                f"invert needs a sampler with invert_step (this project's DDIMScheduler); the pipeline has "
                f"{type(self.scheduler).__name__}: set pipe.scheduler = DDIMScheduler.from_config("
                "pipe.scheduler.config) first."
            )
        self._check_scalars(num_inference_steps, guidance_scale, 0.0, 1, 0.0)
        self._check_unet_takes_latents()
        do_guidance = guidance_scale > 1.0
        images = image_tensor(image, vae_scale_factor(self.vae) * self.unet.downsample_factor)
        context = self._context(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, 1, do_guidance
        )
        num_prompts = context.shape[0] // (2 if do_guidance else 1)
        if images.shape[0] > 1 and num_prompts == 1:  # one prompt for several images
            context = context.repeat_interleave(images.shape[0], dim=0)
            num_prompts = images.shape[0]
        images = batched(images, num_prompts, 1, "image")
        latents = encode_image_latents(self.vae, images).to(device=self.device, dtype=self.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in tqdm(self.scheduler.timesteps.flip(0), **self._progress_bar_config):  # τ_n < … < τ_1
            model_output = self._guided_prediction(latents, t, context, guidance_scale)
            latents = self.scheduler.invert_step(model_output, t, latents).prev_sample
        return latents
