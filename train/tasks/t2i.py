"""The text-to-image task: models, data, the diffusion loss, validation and export for the training loop.

`train_t2i.py` (full fine-tune or from scratch) and `train_lora.py` (adapters) both train through this task and the
one loop of `train.loop`; the flags are in `t2i_config.py`, the models in `t2i_models.py`.

The loss (Ho et al. 2020; Rombach et al. 2022, eq. 2), per sample of the batch:

| code name        | symbol       | meaning                                                                          |
|------------------|--------------|----------------------------------------------------------------------------------|
| `latents`        | z₀           | z₀ = μ + σ·ε_z from the VAE posterior of the image, or μ (`--latent_sample mean`) |
| `prompt_embeds`  | c            | text embedding; replaced by the empty prompt's ∅ with probability p (CFG dropout) |
| `noise`          | ε            | ε ~ N(0, I), plus noise_offset · N(0, I) per channel when set                     |
| `input_noise`    | ε'           | ε + γ·ξ, ξ ~ N(0, I) (--input_perturbation γ, arXiv:2301.11706); ε otherwise     |
| `timesteps`      | t            | uniform in {0, …, T−1}                                                           |
| `noisy_latents`  | z_t          | √ᾱ_t z₀ + √(1 − ᾱ_t) ε'                                                           |
| `target`         | y            | ε (epsilon), v = √ᾱ_t ε − √(1 − ᾱ_t) z₀ (v_prediction), or z₀ (sample)          |
| `snr`            | SNR(t)       | ᾱ_t / (1 − ᾱ_t)                                                                  |
| `weight`         | w(t)         | 1, or min-SNR-γ (Hang et al. 2023, arXiv:2303.09556) for the prediction type     |

    loss = mean_b w(t_b) · mean_{c,h,w} (UNet(z_t, t, c) − y)²

Min-SNR-γ weights every timestep by min(SNR, γ) in x₀ units. The three targets differ in scale from an x₀ error:
‖ε̂ − ε‖² = SNR·‖ẑ₀ − z₀‖² and ‖v̂ − v‖² = (SNR + 1)·‖ẑ₀ − z₀‖², so the weight applied to the MSE is
min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, and min(SNR, γ) for x₀. (For ε at SNR = 0, the limit 1.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from latentdiff.conditioning import encode_posterior, encode_prompts
from latentdiff.data.cache import (
    CachedTextImageDataset,
    cache_key,
    collate_cached,
    load_or_build_cache,
    sample_posterior,
)
from latentdiff.data.dataset import ImageTransform, TextImageDataset, collate_text_image, dataset_fingerprint
from latentdiff.images import image_grid
from latentdiff.model_card import pipeline_card
from train.loop import Trainer
from train.randomness import BatchRandom, derive_seed
from train.tasks.t2i_config import LATENT_CACHE_FOLDER, T2IConfig
from train.tasks.t2i_models import T2IModels, unet_and_text_encoder

logger = logging.getLogger(__name__)

VALIDATION_TIMESTEPS = 4  # fixed timesteps per held-out sample in the validation loss


# ---- min-SNR-γ and the loss ------------------------------------------------------------------------------------


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weight of min-SNR-γ (arXiv:2303.09556) for an MSE on the given target; snr (B,) -> (B,).

    epsilon: min(SNR, γ)/SNR (→ 1 as SNR → 0); v_prediction: min(SNR, γ)/(SNR + 1); sample: min(SNR, γ).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(
            snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr)
        )
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(
        f"prediction_type={prediction_type!r} is unknown; choose epsilon, v_prediction or sample."
    )


def diffusion_target(
    noise_schedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """y: ε, v = √ᾱ_t ε − √(1 − ᾱ_t) z₀, or z₀; (B, C, h, w)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_schedule.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"prediction_type={prediction_type!r} is unknown; choose epsilon, v_prediction or sample."
    )


# ---- the task -----------------------------------------------------------------------------------------------------


class TextToImageTask:
    """Data, loss, validation and export of text-to-image training.

    Args:
        cfg: the run's config.
        models: from `build_models`.
        accelerator: the run's accelerator (main-process-first cache building, device).
        seed: the run's seed (per-sample data choices, validation noise).
    """

    def __init__(self, cfg: T2IConfig, models: T2IModels, accelerator: Accelerator, seed: int) -> None:
        self.cfg = cfg
        self.models = models
        self.accelerator = accelerator
        self.seed = seed
        self.device = accelerator.device
        self.noise_schedule = models.noise_scheduler.noise_schedule
        self.num_train_timesteps = models.noise_scheduler.config.num_train_timesteps
        self.prediction_type = models.noise_scheduler.config.prediction_type
        self.cache = None
        self._posterior_checked = False  # the wide-posterior warning is given once
        with torch.no_grad():
            self.empty_embed = encode_prompts(models.tokenizer, models.text_encoder, [""]).to(
                self.device
            )  # ∅
        self._holdout_batch: dict[str, torch.Tensor] | None = None

    # ---- data ----

    def datasets(
        self, dataset, holdout: int | None = None
    ) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, Any]:
        """(training dataset, held-out dataset or None, collate function). The last `holdout` rows (default
        --validation_holdout) are held out. With --cache_latents the cache is built here (by the main process
        first)."""
        cfg = self.cfg
        holdout = cfg.validation_holdout if holdout is None else holdout
        n_train = len(dataset) - holdout
        transform = ImageTransform(cfg.resolution, cfg.center_crop)
        if cfg.cache_latents:
            with self.accelerator.main_process_first():
                key = cache_key(
                    self.models.vae,
                    self.models.text_encoder,
                    self.models.tokenizer,
                    dataset_fingerprint(dataset, cfg.image_column, cfg.caption_column),
                    cfg.resolution,
                    cfg.center_crop,
                    cfg.random_flip,
                )
                root = Path(cfg.latents_cache_dir or Path(cfg.output_dir) / LATENT_CACHE_FOLDER)
                self.cache = load_or_build_cache(
                    root,
                    key,
                    dataset,
                    cfg.image_column,
                    cfg.caption_column,
                    transform,
                    cfg.random_flip,
                    self.models.vae,
                    self.models.tokenizer,
                    self.models.text_encoder,
                    batch_size=max(cfg.train_batch_size, 8),
                    progress=self.accelerator.is_local_main_process,
                )
            self.empty_embed = self.cache.empty_embed.to(device=self.device, dtype=self.empty_embed.dtype)

            def make(indices: Iterable[int], flip: bool):
                return CachedTextImageDataset(self.cache, list(indices), flip, self.seed)

            collate = collate_cached
        else:

            def make(indices: Iterable[int], flip: bool):
                indices = list(indices)
                return TextImageDataset(
                    dataset.select(indices), cfg.image_column, cfg.caption_column, transform, flip, self.seed
                )

            collate = collate_text_image
        train = make(range(n_train), cfg.random_flip)
        held_out = make(range(n_train, len(dataset)), False) if holdout else None
        return train, held_out, collate

    # ---- loss ----

    def _posterior(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "latent_mean" in batch:
            return batch["latent_mean"].to(self.device), batch["latent_logvar"].to(self.device)
        with torch.no_grad():
            return encode_posterior(self.models.vae, batch["pixel_values"].to(self.device))

    def _prompt_embeds(self, batch: dict[str, Any], trained_text_encoder: nn.Module | None) -> torch.Tensor:
        if trained_text_encoder is not None:
            return encode_prompts(self.models.tokenizer, trained_text_encoder, batch["captions"], self.device)
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"].to(device=self.device, dtype=self.empty_embed.dtype)
        with torch.no_grad():
            return encode_prompts(
                self.models.tokenizer, self.models.text_encoder, batch["captions"], self.device
            )

    def per_sample_loss(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
        extra_channels: torch.Tensor | None = None,
        teacher_from: int | None = None,
    ) -> torch.Tensor:
        """w(t)·MSE(UNet(z_t, t, c), y) per sample, (B,) float32 (see the module docstring); `input_noise` (default
        ε) is the noise of z_t when it differs from the target's (--input_perturbation); `extra_channels`
        (B, C', h, w), when given, are concatenated to z_t (an inpainting UNet's mask and masked-image latents);
        `teacher_from`: samples from this index on take the frozen model's prediction at the same (z_t, t, c) as
        their target y instead of the true one (`teacher_prediction`: a prior kept by distillation)."""
        noisy_latents = self.noise_schedule.add_noise(
            latents, noise if input_noise is None else input_noise, timesteps
        )
        target = diffusion_target(self.noise_schedule, latents, noise, timesteps, self.prediction_type)
        if extra_channels is not None:
            noisy_latents = torch.cat([noisy_latents, extra_channels.to(noisy_latents)], dim=1)
        if teacher_from is not None:
            k = teacher_from
            with torch.no_grad():
                taught = self.teacher_prediction(unet, noisy_latents[k:], timesteps[k:], prompt_embeds[k:])
            target = torch.cat([target[:k], taught.to(target.dtype)])
        model_output = unet(noisy_latents, timesteps, prompt_embeds)
        mse = ((model_output.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma is None:
            return mse
        return (
            min_snr_weight(self.noise_schedule.snr(timesteps), self.cfg.snr_gamma, self.prediction_type) * mse
        )

    def _warn_if_posterior_is_wide(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        """Warn once when σ of the posterior is comparable to the spread of μ (latent units): sampling z₀ then adds
        noise as strong as the image's own signal (a VAE trained on its posterior mean leaves σ ≈ 1)."""
        if self._posterior_checked:
            return
        self._posterior_checked = True
        sigma, spread = float(torch.exp(0.5 * logvar).mean()), float(mean.std())
        if sigma > 0.1 * spread:
            logger.warning(
                "the VAE posterior is wide: mean σ %.3g against a spread of μ of %.3g (latent units), so sampling "
                "z₀ = μ + σ·ε buries the image in noise the decoder never saw; if the VAE was trained on its "
                "posterior mean (train_vae.py --latent_sample mean), train with --latent_sample mean.",
                sigma,
                spread,
            )

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        """The training loss of one micro-batch (mean over its samples); all randomness from `rng`."""
        return self.sample_losses(model, batch, rng).mean()

    def sample_losses(self, model: nn.Module, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        """The training loss of each sample of the micro-batch, (B,); all randomness from `rng`."""
        unet, trained_text_encoder = unet_and_text_encoder(model)
        if (
            trained_text_encoder is not None
        ):  # ∅ through the text encoder being trained, as the pipeline computes it
            self.empty_embed = encode_prompts(self.models.tokenizer, trained_text_encoder, [""], self.device)
        mean, logvar = self._posterior(batch)
        if self.cfg.latent_sample == "mean":
            latents = mean  # z₀ = μ, what a decoder trained on the posterior mean reads
        else:
            self._warn_if_posterior_is_wide(mean, logvar)
            latents = sample_posterior(mean, logvar, rng.randn(*mean.shape[1:]))  # z₀ ~ q(z | x)
        prompt_embeds = self._prompt_embeds(batch, trained_text_encoder)
        drop = rng.rand() < self.cfg.cond_dropout_prob  # (B,): classifier-free dropout, per sample
        prompt_embeds = torch.where(
            drop[:, None, None], self.empty_embed.to(prompt_embeds.dtype), prompt_embeds
        )
        noise = rng.randn(*latents.shape[1:])
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * rng.randn(latents.shape[1], 1, 1)
        timesteps = rng.randint(0, self.num_train_timesteps)
        input_noise = None
        if self.cfg.input_perturbation:  # ε' = ε + γ·ξ in z_t, ε still the target (arXiv:2301.11706)
            input_noise = noise + self.cfg.input_perturbation * rng.randn(*latents.shape[1:])
        extra = self.extra_channels(batch, rng)
        denoiser = self.denoiser(unet, batch)
        return self.per_sample_loss(
            denoiser, latents, prompt_embeds, noise, timesteps, input_noise, extra, self.teacher_from(batch)
        )

    def extra_channels(self, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor | None:
        """Inputs the UNet reads next to z_t (none for text-to-image; `InpaintingTask` gives mask and image)."""
        return None

    def denoiser(self, unet: nn.Module, batch: dict[str, Any]):
        """What predicts from (z_t, t, c) for this batch: the UNet (a ControlNet task adds its condition)."""
        return unet

    def teacher_from(self, batch: dict[str, Any]) -> int | None:
        """The index from which the batch's samples are distilled from the frozen model (none for text-to-image;
        DreamBooth's `--prior_target model` gives its class half)."""
        return None

    def teacher_prediction(
        self,
        unet: nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """The frozen model's prediction at (z_t, t, c), for tasks whose `teacher_from` is not None."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen model to distil from")

    # ---- validation ----

    def _holdout(self, holdout: torch.utils.data.Dataset, collate) -> dict[str, torch.Tensor] | None:
        """Held-out samples, each repeated at VALIDATION_TIMESTEPS fixed timesteps with fixed noise."""
        try:
            batch = collate([holdout[(0, i)] for i in range(len(holdout))])
        except RuntimeError as error:  # every held-out image is unreadable
            logger.warning("no validation loss: %s", error)
            return None
        with torch.no_grad():
            mean, _ = self._posterior(batch)
            prompt_embeds = self._prompt_embeds(batch, None)
        k = VALIDATION_TIMESTEPS
        timesteps = (
            (torch.arange(k) + 0.5) * self.num_train_timesteps / k
        ).long()  # T/8, 3T/8, 5T/8, 7T/8 for k=4
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "validation"))
        latents = mean.repeat_interleave(k, dim=0)
        return {
            "latents": latents,
            "captions": [caption for caption in batch["captions"] for _ in range(k)],
            "prompt_embeds": prompt_embeds.repeat_interleave(k, dim=0),
            "timesteps": timesteps.repeat(len(mean)).to(self.device),
            "noise": torch.randn(latents.shape, generator=generator).to(self.device),
        }

    @torch.no_grad()
    def validation_loss(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> float:
        """The training loss (without dropout) on the held-out samples at fixed noise and timesteps; the captions
        are encoded by `text_encoder` when it is trained, else the embeddings computed once are used."""
        b = self._holdout_batch
        losses = []
        for start in range(0, len(b["latents"]), self.cfg.train_batch_size):
            part = {k: v[start : start + self.cfg.train_batch_size] for k, v in b.items()}
            with self.accelerator.autocast():
                prompt_embeds = (
                    part["prompt_embeds"]
                    if text_encoder is None
                    else encode_prompts(self.models.tokenizer, text_encoder, part["captions"], self.device)
                )
                losses.append(
                    self.per_sample_loss(
                        self.denoiser(unet, part),
                        part["latents"],
                        prompt_embeds,
                        part["noise"],
                        part["timesteps"],
                        extra_channels=part.get("extra_channels"),
                    )
                )
        return float(torch.cat(losses).mean())

    def validation_pipeline(
        self, pipeline_class: type, unet: nn.Module, text_encoder: nn.Module | None = None
    ):
        """`pipeline_class` over the model in training: DDIM with the training schedule, no progress bar."""
        from latentdiff.schedulers import DDIMScheduler

        pipe = pipeline_class(
            unet,
            DDIMScheduler.from_config(self.models.noise_scheduler.config),
            self.models.vae,
            text_encoder or self.models.text_encoder,
            self.models.tokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def validation_images(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> list[Image.Image]:
        """One image per validation prompt: DDIM with the training schedule; prompt i uses seed i."""
        from pipelines.latent_pipeline import LatentPipeline

        pipe = self.validation_pipeline(LatentPipeline, unet, text_encoder)
        images = []
        for i, prompt in enumerate(self.cfg.validation_prompts):
            with self.accelerator.autocast():
                images.extend(
                    pipe(
                        prompt,
                        num_inference_steps=self.cfg.validation_num_inference_steps,
                        guidance_scale=self.cfg.validation_guidance_scale,
                        height=self.cfg.resolution,
                        width=self.cfg.resolution,
                        generator=torch.Generator(device="cpu").manual_seed(i),
                    ).images
                )
        return images

    def attach_holdout(self, holdout: torch.utils.data.Dataset | None, collate) -> None:
        """Prepare the fixed validation batch (main process)."""
        if holdout is not None and self.accelerator.is_main_process:
            self._holdout_batch = self._holdout(holdout, collate)

    def validate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Validation loss (trained and EMA weights) and the prompt grid, on the main process."""
        logs: dict[str, float] = {}
        if self.accelerator.is_main_process:
            unet, text_encoder = unet_and_text_encoder(trainer.model)
            trainer.model.eval()
            try:
                if self._holdout_batch is not None:
                    logs["val_loss"] = self.validation_loss(unet, text_encoder)
                with trainer.averaged_weights():
                    if self._holdout_batch is not None and trainer.ema is not None:
                        logs["val_loss_ema"] = self.validation_loss(unet, text_encoder)
                    if self.cfg.validation_prompts:
                        self._save_grid(self.validation_images(unet, text_encoder), step)
            finally:
                trainer.model.train()
        self.accelerator.wait_for_everyone()
        return logs

    def _save_grid(self, images: list[Image.Image], step: int) -> Path:
        grid = image_grid(images, columns=min(4, len(images)))
        folder = Path(self.cfg.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        grid.save(path)
        (folder / "prompts.txt").write_text(
            "\n".join(f"{i}: {p}" for i, p in enumerate(self.cfg.validation_prompts)) + "\n"
        )
        if self.cfg.report_to in ("tensorboard", "all"):
            try:
                writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_images(
                    "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
                )
            except Exception as error:  # noqa: BLE001 - a tracker problem must not stop training
                logger.warning("could not log the validation images to TensorBoard: %s", error)
        return path

    # ---- export ----

    def card_details(self, trainer: Trainer) -> dict[str, object]:
        """What the model card says about the run."""
        cfg = self.cfg
        return {
            "trained with": f"latentdiff `{type(self).__name__}` (train/)",
            "base model": cfg.pretrained_model_name_or_path or f"from scratch ({cfg.unet_config})",
            "data": cfg.dataset_name or cfg.train_data_dir,
            "resolution": cfg.resolution,
            "steps": trainer.global_step,
            "global batch": trainer.global_batch * cfg.gradient_accumulation_steps,
            "learning rate": cfg.learning_rate,
            "prediction type": self.prediction_type,
            "EMA weights": "yes" if trainer.ema else "no",
        }

    def export(self, trainer: Trainer) -> Path:
        """Write the SD-layout pipeline folder into --output_dir: the UNet with EMA weights if enabled, the frozen
        parts in float32, and the training noise scheduler's config (prediction type included)."""
        from pipelines.latent_pipeline import LatentPipeline

        out = Path(self.cfg.output_dir)
        if self.accelerator.is_main_process:
            unet, text_encoder = unet_and_text_encoder(trainer.model)
            with trainer.averaged_weights():
                self.models.vae.to(torch.float32)
                text_encoder = (text_encoder or self.models.text_encoder).to(torch.float32)
                LatentPipeline(
                    unet, self.models.noise_scheduler, self.models.vae, text_encoder, self.models.tokenizer
                ).save_pretrained(out, model_card=pipeline_card(out, self.card_details(trainer)))
            logger.info("saved the pipeline (%s weights) to %s", "EMA" if trainer.ema else "trained", out)
        self.accelerator.wait_for_everyone()
        return out
