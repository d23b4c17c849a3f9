"""The autoencoder task: train a `diffusers.AutoencoderKL` (Kingma & Welling 2014; Rombach et al. 2022, sec. 3.1)
through the one training loop (`train.loop`), for `train_vae.py`.

Per image x (B, 3, H, W) in [-1, 1], with the encoder's posterior q(z | x) = N(μ, σ²):

| code name      | symbol    | meaning                                                                            |
|----------------|-----------|------------------------------------------------------------------------------------|
| `posterior`    | q(z | x)  | diagonal Gaussian from the encoder, latents (B, C_z, H/f, W/f)                      |
| `latents`      | z         | μ (`--latent_sample mean`) or μ + σ·ε (`--latent_sample sample`)                    |
| `recon`        | x̂         | decoder(z)                                                                         |
| `weight`       | w         | 1 on background pixels, `--foreground_weight` on pixels that differ from the image's |
|                |           | median colour (objects covering a small share of the image) and on the background   |
|                |           | within `--foreground_margin` pixels of them (an object's notches and outline)      |
| `kl`           | KL        | KL(q(z | x) ‖ N(0, I)), summed over the latent, averaged over the batch              |

    loss = mean(w · |x̂ − x|) / mean(w) + kl_weight · KL / (H · W · 3)

Decoding the posterior mean rather than a sample suits small latent spaces: the sample's noise is something the
decoder must otherwise learn to ignore (shared/FEASIBILITY.md, runs B and C). The exported config carries
`scaling_factor` = 1 / std(μ) measured on training images, as Stable Diffusion's does, so that scaled latents have
unit variance for the diffusion model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn
from torch.nn import functional as F

from latentdiff.conditioning import vae_scale_factor
from latentdiff.data.dataset import TextImageDataset, collate_text_image
from train.arguments import read_mapping
from train.data import split_image_datasets
from train.loop import Trainer
from train.loop_config import ConfigError, LoopConfig, flag
from train.randomness import BatchRandom

logger = logging.getLogger(__name__)

LATENT_SAMPLES = ("mean", "sample")  # what the decoder reads: the posterior's mean μ, or μ + σ·ε
VAE_FOLDER = "vae"  # the export, inside --output_dir
SCALING_SAMPLES = 512  # training images whose posterior means set scaling_factor


@dataclasses.dataclass(frozen=True)
class VaeConfig(LoopConfig):
    """Every option of `train/train_vae.py`: the loop's flags plus the VAE's."""

    EXPORTED: ClassVar[tuple[str, ...]] = (VAE_FOLDER,)
    USES_CAPTIONS: ClassVar[bool] = False  # images only

    vae_config: str | None = flag(
        None,
        "JSON or YAML file of diffusers AutoencoderKL constructor arguments (block_out_channels, latent_channels, "
        "layers_per_block, ...): train a VAE of this shape from scratch.",
        exists="file",
    )
    pretrained_vae_model_name_or_path: str | None = flag(
        None, "Folder of a diffusers AutoencoderKL (or an SD folder with vae/) to fine-tune instead."
    )
    kl_weight: float = flag(
        1e-6, "Weight of the KL term (per pixel and channel of the image).", at_least=0, example="1e-6"
    )
    foreground_weight: float = flag(
        1.0,
        "Loss weight of pixels that differ from the image's median colour (1: plain L1); e.g. 11 for scenes of "
        "small objects on a flat background.",
        at_least=1,
        example="1 (plain L1)",
    )
    foreground_threshold: float = flag(
        0.1,
        "A pixel is foreground when some channel differs from the median colour by more than this ([-1, 1] units).",
    )
    foreground_margin: int = flag(
        0,
        "Background pixels within this many pixels (Chebyshev distance) of a foreground pixel are weighted like "
        "it: without a margin, filling an object's notches (background) costs 1/foreground_weight of cutting its "
        "points (foreground), and a VAE learns to round small concave shapes into convex ones.",
        at_least=0,
    )
    train_decoder_only: bool = flag(
        False,
        "Fine-tune the decoder only (with --pretrained_vae_model_name_or_path): the encoder, its latents and the "
        "scaling_factor stay as they were, so a diffusion model trained on them keeps working (as Stable "
        "Diffusion's ft-MSE VAE did).",
    )
    latent_sample: str = flag(
        "mean",
        "Decode the posterior mean (mean) or a sample of the posterior (sample).",
        choices=LATENT_SAMPLES,
    )
    validation_images: int = flag(
        8, "Held-out images shown with their reconstructions in the validation grid.", at_least=0
    )

    def check_combinations(self) -> None:
        super().check_combinations()
        if (self.vae_config is None) == (self.pretrained_vae_model_name_or_path is None):
            raise ConfigError(
                "pass exactly one of --vae_config (a new VAE of that shape) and "
                "--pretrained_vae_model_name_or_path (fine-tune an existing one)."
            )
        if self.train_decoder_only and self.pretrained_vae_model_name_or_path is None:
            raise ConfigError(
                "--train_decoder_only fine-tunes a trained VAE's decoder: pass --pretrained_vae_model_name_or_path "
                "too (a new VAE's encoder would stay random)."
            )


def build_vae(cfg: VaeConfig) -> nn.Module:
    """A new AutoencoderKL of --vae_config's shape, or the one of --pretrained_vae_model_name_or_path, float32, in
    train mode (the encoder frozen with --train_decoder_only). Its down-sampling factor must divide --resolution."""
    from diffusers import AutoencoderKL

    if cfg.vae_config is not None:
        try:
            values = read_mapping(cfg.vae_config, "--vae_config")
            vae = AutoencoderKL(**{k: v for k, v in values.items() if not k.startswith("_")})
        except TypeError as error:
            raise ConfigError(f"--vae_config={cfg.vae_config!r}: {error}") from error
    else:
        folder = Path(cfg.pretrained_vae_model_name_or_path)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae" if (folder / "vae").is_dir() else None)
    factor = vae_scale_factor(vae)
    if cfg.resolution % factor:
        raise ConfigError(
            f"--resolution={cfg.resolution} is not divisible by the VAE's down-sampling factor {factor}."
        )
    if cfg.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    return vae.float().train()


def foreground_weights(
    images: torch.Tensor, weight: float, threshold: float, margin: int = 0
) -> torch.Tensor:
    """(B, 1, H, W): `weight` where a pixel differs from its image's per-channel median colour by more than
    `threshold` in some channel, or lies within `margin` pixels (Chebyshev distance) of such a pixel; 1 elsewhere."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    foreground = ((images - median).abs() > threshold).any(dim=1, keepdim=True).float()
    if margin > 0:
        foreground = F.max_pool2d(foreground, kernel_size=2 * margin + 1, stride=1, padding=margin)
    return 1.0 + (weight - 1.0) * foreground


class VaeTask:
    """Data, loss, validation and export of autoencoder training."""

    def __init__(self, cfg: VaeConfig, vae: nn.Module, accelerator: Accelerator, seed: int) -> None:
        self.cfg = cfg
        self.vae = vae
        self.accelerator = accelerator
        self.seed = seed
        self.holdout_pixels: torch.Tensor | None = None

    def datasets(self, dataset) -> tuple[TextImageDataset, Any]:
        """(training dataset, collate); the last --validation_holdout rows are held out for validation."""
        train, held = split_image_datasets(self.cfg, dataset, self.seed)
        if held is not None:
            self.holdout_pixels = torch.stack([held[i]["pixel_values"] for i in range(len(held))])
        return train, collate_text_image

    def reconstruct(self, vae: nn.Module, images: torch.Tensor, rng: BatchRandom | None = None):
        """(reconstruction, posterior) of images (B, 3, H, W) in [-1, 1]."""
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean
        if self.cfg.latent_sample == "sample":
            noise = rng.randn(*latents.shape[1:]) if rng is not None else torch.zeros_like(latents)
            latents = latents + posterior.std * noise.to(latents)
        return vae.decode(latents).sample, posterior

    def weights(self, images: torch.Tensor) -> torch.Tensor:
        """The loss weight w of each pixel, (B, 1, H, W)."""
        cfg = self.cfg
        return foreground_weights(
            images, cfg.foreground_weight, cfg.foreground_threshold, cfg.foreground_margin
        )

    def compute_loss(self, vae: nn.Module, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        images = batch["pixel_values"].to(self.accelerator.device)
        recon, posterior = self.reconstruct(vae, images, rng)
        weight = self.weights(images)
        l1 = (weight * (recon.float() - images).abs()).mean() / weight.mean()
        kl = posterior.kl().mean() / images[0].numel()  # per image pixel and channel
        return l1 + self.cfg.kl_weight * kl

    @torch.no_grad()
    def validate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Held-out L1 (plain and weighted) and a grid: originals on top, reconstructions below."""
        logs: dict[str, float] = {}
        if self.accelerator.is_main_process and self.holdout_pixels is not None:
            vae = trainer.model
            vae.eval()
            with trainer.averaged_weights():
                images = self.holdout_pixels.to(self.accelerator.device)
                recon = torch.cat([self.reconstruct(vae, chunk)[0] for chunk in images.split(16)]).clamp(
                    -1, 1
                )
            vae.train()
            weight = self.weights(images)
            logs["val_l1"] = float((recon - images).abs().mean())
            logs["val_l1_weighted"] = float((weight * (recon - images).abs()).mean() / weight.mean())
            count = min(self.cfg.validation_images, len(images))
            self._save_grid(images[:count], recon[:count], step)
        self.accelerator.wait_for_everyone()
        return logs

    def _save_grid(self, images: torch.Tensor, recon: torch.Tensor, step: int) -> Path:
        rows = torch.cat(
            [torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1
        )  # (3, 2H, N·W)
        pixels = (
            ((rows.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        )
        folder = Path(self.cfg.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path)
        return path

    @torch.no_grad()
    def scaling_factor(self, vae: nn.Module, dataset: TextImageDataset) -> float:
        """1 / std of the posterior means of up to SCALING_SAMPLES training images (Rombach et al. 2022, sec. G)."""
        count = min(SCALING_SAMPLES, len(dataset))
        images = torch.stack([dataset[i]["pixel_values"] for i in range(count)]).to(self.accelerator.device)
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(32)])
        return 1.0 / float(means.float().std())

    def export(self, trainer: Trainer) -> Path:
        """Save the VAE (EMA weights if enabled) as a diffusers AutoencoderKL folder in --output_dir/vae, with its
        measured scaling_factor (the pretrained one with --train_decoder_only)."""
        out = Path(self.cfg.output_dir) / VAE_FOLDER
        if self.accelerator.is_main_process:
            with trainer.averaged_weights() as vae:
                vae.eval()
                if self.cfg.train_decoder_only:  # the latents are the encoder's as before: so is their scale
                    factor = float(vae.config.scaling_factor)
                else:
                    factor = self.scaling_factor(vae, trainer.dataset)
                if not math.isfinite(factor):
                    raise RuntimeError(f"the latents' std gives a scaling factor of {factor}; not exported")
                vae.register_to_config(scaling_factor=factor)
                vae.save_pretrained(out)
            logger.info("saved the VAE (scaling_factor %.4f) to %s", factor, out)
        self.accelerator.wait_for_everyone()
        return out
