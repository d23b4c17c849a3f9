"""Conditioning: text -> CLIP embeddings, and images <-> VAE latents.

The frozen parts (a `transformers` CLIP tokenizer + text encoder, a `diffusers.AutoencoderKL`) are passed in; this
module only says how they are used, the same way in training and in the pipeline.

| code name             | meaning                                                                           |
|-----------------------|-----------------------------------------------------------------------------------|
| `prompt_embeds`       | c: CLIP's last hidden state, (B, L, D), L = tokenizer.model_max_length            |
| empty-prompt embeds   | ∅: the unconditional c of classifier-free guidance is `encode_prompts([""])`, as SD |
| `latents`             | z = (E(x) - shift_factor) · scaling_factor: what the UNet sees, about unit variance  |
| `images`              | x in [-1, 1], (B, 3, H, W); H = h · vae_scale_factor                              |

`scaling_factor` (and `shift_factor` where a VAE has one) are read here and nowhere else: every other module
works on latents already scaled.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)


def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """Encode prompts with a CLIP tokenizer and text encoder, as Stable Diffusion does.

    Args:
        tokenizer: a `transformers.CLIPTokenizer`; prompts are padded to `tokenizer.model_max_length` (L) tokens,
            and a longer prompt is truncated to L with a warning that says how many tokens were dropped.
        text_encoder: a `transformers.CLIPTextModel` (or any model returning `last_hidden_state`).
        prompts: B strings; `""` gives the unconditional (empty-prompt) embedding.
        device: where to run the text encoder's input; default: the text encoder's device.

    Returns:
        (B, L, D) last hidden states, in the text encoder's dtype, on `device`. Gradients flow if enabled (the
        caller wraps frozen use in `torch.no_grad()`).
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str, got {prompts!r}; wrap a single prompt as [prompt].")
    if len(prompts) == 0:
        raise ValueError('prompts is an empty list; pass at least one prompt ("" for the unconditional one).')
    max_length = tokenizer.model_max_length
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    for index, full_ids in enumerate(tokenizer(prompts, truncation=False, verbose=False).input_ids):
        dropped = len(full_ids) - max_length
        if dropped > 0:
            kept_text = tokenizer.decode(full_ids[1 : max_length - 1])
            logger.warning(
                "prompt %d is %d tokens long but the text encoder reads at most %d: its last %d token(s) were "
                "dropped; what is kept: %r",
                index,
                len(full_ids),
                max_length,
                dropped,
                kept_text,
            )
    device = text_encoder.device if device is None else device
    return text_encoder(tokens.input_ids.to(device)).last_hidden_state


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel along a side: 2 ** (number of VAE levels - 1), from the VAE's config (8 for SD).

    `vae` is a `diffusers.AutoencoderKL` or its config.json dict (read before any weight is loaded).
    """
    config = vae if isinstance(vae, dict) else vae.config  # diffusers' config is a dict as well
    return 2 ** (len(config["block_out_channels"]) - 1)


def _shift_factor(vae) -> float:
    """The VAE's latent shift (SD3/Flux VAEs have one; SD 1.x/2.x do not: 0)."""
    shift = getattr(vae.config, "shift_factor", None)
    return 0.0 if shift is None else float(shift)


def encode_images(
    vae, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
) -> torch.Tensor:
    """Images -> latents z = (E(x) - shift) · scaling_factor.

    Args:
        vae: a `diffusers.AutoencoderKL`.
        images: (B, 3, H, W) in [-1, 1]; H and W divisible by `vae_scale_factor(vae)`. Cast to the VAE's dtype and
            device.
        generator: randomness for `sample=True`.
        sample: draw z from the posterior N(μ, σ²) instead of taking its mean μ.

    Returns:
        (B, latent_channels, H / f, W / f) latents, already multiplied by the VAE scaling factor, in the VAE's dtype.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mean
    return (latents - _shift_factor(vae)) * vae.config.scaling_factor


def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of `images` in latent units: (mean, logvar) of z = (E(x) − shift) · scaling_factor.

    Args:
        vae: a `diffusers.AutoencoderKL`.
        images: (B, 3, H, W) in [-1, 1].

    Returns:
        mean (B, C, h, w) = (μ − shift)·s and logvar (B, C, h, w) = log σ² + 2 log s, float32, where N(μ, σ²) is
        the VAE's posterior and s its scaling factor; z = mean + exp(logvar / 2)·ε is distributed as
        `encode_images(vae, images, sample=True)`.
    """
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    scale = float(vae.config.scaling_factor)
    mean = (posterior.mean.float() - _shift_factor(vae)) * scale
    logvar = posterior.logvar.float() + 2.0 * math.log(scale)
    return mean, logvar


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images x = D(z / scaling_factor + shift).

    Args:
        vae: a `diffusers.AutoencoderKL`.
        latents: (B, latent_channels, h, w), already multiplied by the VAE scaling factor (what the sampler returns).

    Returns:
        (B, 3, h · f, w · f) images, nominally in [-1, 1] (not clamped). A float16 VAE whose output is not finite
        (it overflows on some latents) is run again in float32, with a warning; the result is then float32.
    """
    z = latents / vae.config.scaling_factor + _shift_factor(vae)
    images = vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample
    if vae.dtype == torch.float16 and not torch.isfinite(images).all():
        logger.warning("the float16 VAE decoder overflowed; decoding again in float32")
        vae.to(torch.float32)
        try:
            images = vae.decode(z.to(device=vae.device, dtype=torch.float32)).sample
        finally:
            vae.to(torch.float16)
    return images
