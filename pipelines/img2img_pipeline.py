"""LatentImg2ImgPipeline: image + text -> image by SDEdit (Meng et al. 2022, arXiv:2108.01073).

The image is encoded to z₀, noised to the timestep that `strength` selects, and denoised with the prompt by the
loop and guidance of `LatentPipeline` (`_denoise`): the larger the strength, the more noise and the less of the image
is kept. The sampler is the pipeline's own; only the tail of its timesteps is visited.

| code name      | symbol | meaning                                                                                      |
|----------------|--------|----------------------------------------------------------------------------------------------|
| `strength`     | s      | in [0, 1]: the share of the n sampler steps run; the first visited timestep is τ_{n - ⌊s·n⌋+1}   |
| `image_latents`| z₀     | E(x₀) · scaling_factor, (B, C, h, w)                                                           |
| `noise`        | ε      | ~ N(0, I), (B, C, h, w)                                                                         |
| `latents`      | z_τ    | √ᾱ_τ z₀ + √(1 − ᾱ_τ) ε (Ho et al. 2020 eq. 4) at the first visited timestep τ                 |

Edge cases: s = 0 visits no timestep and returns the image through the VAE (decode(z₀)); s = 1 starts from pure noise
(z = ε · init_noise_sigma, the image unused), so it is text-to-image from the same noise. diffusers'
StableDiffusionImg2ImgPipeline noises z₀ to τ_1 even at s = 1, which differs where ᾱ_{τ_1} > 0 (SD's schedule; not
on a zero-terminal-SNR one), and refuses s = 0.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from latentdiff.conditioning import vae_scale_factor
from pipelines.image_inputs import ImageInput, batched, encode_image_latents, image_tensor
from pipelines.latent_pipeline import LatentPipeline, PipelineOutput, randn


def strength_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The last ⌊s · n⌋ of the sampler's n timesteps (descending): the part of the chain SDEdit runs."""
    num_steps = min(int(len(timesteps) * strength), len(timesteps))
    return timesteps[len(timesteps) - num_steps :]


def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a number in [0, 1], got {strength!r}.")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength={strength} is outside [0, 1]: 0 keeps the image (no step), 1 ignores it (all steps from "
            "noise); SDEdit edits typically use 0.5-0.8."
        )


class LatentImg2ImgPipeline(LatentPipeline):
    """SDEdit image-to-image over the same five parts as `LatentPipeline` (and loaded the same ways).

    `LatentImg2ImgPipeline.from_pipe(pipe)` shares an already loaded pipeline's parts (no copy). `invert` and the
    LoRA methods are `LatentPipeline`'s.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        callback_on_step_end: Callable[..., dict | None] | None = None,
        sample_posterior: bool = False,
    ) -> PipelineOutput:
        """Edit images toward a prompt.

        Args:
            prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt,
                prompt_embeds, negative_prompt_embeds, eta, output_type, callback_on_step_end: as in
                `LatentPipeline.__call__`; num_inference_steps is n of the full chain, of which ⌊s · n⌋ run.
            image: x₀: a PIL image, a list of P (one per prompt), or a (B, 3, H, W) tensor in [-1, 1]; its size is
                the output's and must be divisible by the VAE factor × the UNet's down-sampling factor.
            strength: s in [0, 1] (table above).
            generator: draws ε (and z₀ with sample_posterior) and the stochastic steps' noise; a list of B
                generators gives image i its own.
            sample_posterior: z₀ a sample of the VAE posterior (diffusers' behaviour) instead of its mean.
        """
        if prompt is None and prompt_embeds is None:
            prompt = self.prompt  # the prompt given at construction, if any
        num_inference_steps, guidance_scale = self.resolve_sampling(num_inference_steps, guidance_scale)
        self._check_scalars(num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, eta)
        self._check_output(output_type, callback_on_step_end)
        check_strength(strength)
        self._check_unet_takes_latents()
        images = self._image_tensor(image)
        do_guidance = guidance_scale > 1.0
        context = self._context(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, do_guidance
        )
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = strength_timesteps(self.scheduler.timesteps, strength)
        num_prompts = context.shape[0] // (2 if do_guidance else 1) // num_images_per_prompt
        images = batched(images, num_prompts, num_images_per_prompt, "image")
        image_latents = self._image_latents(images, generator, sample_posterior)
        latents, _ = self._start_latents(image_latents, timesteps, strength, generator)
        latents = self._denoise(
            latents,
            timesteps,
            context,
            guidance_scale,
            guidance_rescale,
            generator,
            eta,
            callback_on_step_end,
        )
        return PipelineOutput(images=self._to_output(latents, output_type))

    # --------------------------------------------------------------------------- the editing pipelines' parts

    def _image_tensor(self, image: ImageInput | None) -> torch.Tensor:
        """x₀ (B, 3, H, W) in [-1, 1], its size checked against the VAE and UNet."""
        if image is None:
            raise ValueError("image is required: the picture to edit (a PIL image or a (B, 3, H, W) tensor).")
        return image_tensor(image, vae_scale_factor(self.vae) * self.unet.downsample_factor)

    def _image_latents(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        sample_posterior: bool,
    ) -> torch.Tensor:
        """z₀ of a batch of B images, (B, C, h, w), in the UNet's dtype and on its device."""
        if isinstance(generator, list) and len(generator) != images.shape[0]:
            raise ValueError(
                f"generator is a list of {len(generator)} but the batch has {images.shape[0]} images "
                "(prompts × num_images_per_prompt): pass one generator or one per image."
            )
        latents = encode_image_latents(self.vae, images, generator, sample_posterior)
        return latents.to(device=self.device, dtype=self.dtype)

    def _start_latents(
        self,
        image_latents: torch.Tensor,
        timesteps: torch.Tensor,
        strength: float,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_τ, ε): z₀ noised to the first visited timestep τ (module table); pure noise at s = 1; z₀ at s = 0."""
        noise = randn(tuple(image_latents.shape), generator, self.device, self.dtype)
        if strength == 1.0:
            return noise * self.scheduler.init_noise_sigma, noise
        if len(timesteps) == 0:
            return image_latents, noise
        return self.scheduler.add_noise(image_latents, noise, int(timesteps[0])), noise
