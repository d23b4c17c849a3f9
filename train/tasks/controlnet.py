"""The ControlNet task (Zhang et al. 2023): a frozen text-to-image model, a trainable ControlNet, through the
text-to-image task (`train.tasks.t2i`) and the one loop (`train.loop`).

What differs from a full fine-tune:
- the config adds `--controlnet_model_name_or_path` (start from a ControlNet folder; default: a copy of the UNet's
  encoder with zero convolutions, `ControlNetModel.from_unet`), `--conditioning_image_column` and
  `--conditioning_embedding_out_channels` (`ControlNetTrainConfig` extends `T2IConfig`);
- the UNet, VAE and text encoder are frozen in the run's precision; the ControlNet (float32) is what the loop
  trains, checkpoints, averages (EMA) and resumes;
- the loss is the text-to-image loss with ε_θ(z_t, t, c) + the ControlNet's residuals for the sample's condition
  image (`denoiser`); classifier-free dropout replaces the caption, never the condition, as in the paper;
- validation renders each validation prompt with a held-out condition image (prompt i, held-out row i mod n);
- the export is the ControlNet alone, in diffusers' ControlNetModel layout: `ControlNetModel.from_pretrained`,
  `ControlNetPipeline(..., controlnet=output_dir)`, `latentdiff generate --control IMAGE --controlnet output_dir`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from latentdiff.conditioning import vae_scale_factor
from latentdiff.data.dataset import (
    ConditionedTextImageDataset,
    ImageTransform,
    collate_text_image,
    without_image_decoding,
)
from latentdiff.models.controlnet import DEFAULT_CONDITIONING_CHANNELS, ControlNetModel
from train.loop import Trainer
from train.loop_config import ConfigError, flag
from train.tasks.t2i import TextToImageTask
from train.tasks.t2i_config import T2IConfig
from train.tasks.t2i_models import T2IModels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlNetTrainConfig(T2IConfig):
    """Every option of `train/train_controlnet.py`: those of `train_t2i.py` plus the ControlNet's."""

    controlnet_model_name_or_path: str | None = flag(
        None,
        "A ControlNet folder (diffusers' ControlNetModel layout) to continue training; default: a new ControlNet "
        "copied from the UNet's encoder, its zero convolutions at 0.",
        exists="folder",
    )
    conditioning_image_column: str = flag(
        "conditioning_image", "Dataset column of the condition images (an imagefolder: a metadata.jsonl key)."
    )
    conditioning_embedding_out_channels: list[int] | None = flag(
        None,
        "Channels of the new ControlNet's condition embedding, one stride-2 conv between consecutive entries: "
        "log2(VAE factor) + 1 entries. Default: diffusers' 16 32 96 256, cut to the VAE's factor.",
    )
    output_dir: str = flag(
        "sd-controlnet", "Where checkpoints, logs, validation images and the ControlNet go."
    )

    def check_combinations(self) -> None:
        super().check_combinations()
        for name, value in (
            ("--unet_config", self.unet_config),
            ("--train_text_encoder", self.train_text_encoder),
            ("--cache_latents", self.cache_latents),
        ):
            if value:
                raise ConfigError(
                    f"{name} is not available for ControlNet training: the UNet and text encoder come frozen from "
                    "--pretrained_model_name_or_path, and the latent cache holds no condition images."
                )
        if self.validation_prompts and not self.validation_holdout:
            raise ConfigError(
                "--validation_prompts need condition images: add --validation_holdout N (held-out rows whose "
                "conditions render the prompts)."
            )


def build_controlnet(
    cfg: ControlNetTrainConfig, models: T2IModels, weight_dtype: torch.dtype
) -> ControlNetModel:
    """Freeze the UNet in `weight_dtype` on the VAE's device; return the trainable float32 ControlNet (loaded, or
    copied from the UNet)."""
    unet = models.unet
    if cfg.controlnet_model_name_or_path is not None:
        controlnet = ControlNetModel.from_pretrained(cfg.controlnet_model_name_or_path)
    else:
        steps = int(math.log2(vae_scale_factor(models.vae)))
        channels = cfg.conditioning_embedding_out_channels or [
            DEFAULT_CONDITIONING_CHANNELS[min(i, len(DEFAULT_CONDITIONING_CHANNELS) - 1)]
            for i in range(steps + 1)
        ]
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(channels))
    controlnet.check_compatible(unet)
    if controlnet.config.condition_factor != vae_scale_factor(models.vae):
        raise ConfigError(
            f"--conditioning_embedding_out_channels {list(controlnet.config.conditioning_embedding_out_channels)} "
            f"shrinks condition images {controlnet.config.condition_factor}x but the VAE's factor is "
            f"{vae_scale_factor(models.vae)}: give log2 of it + 1 entries"
        )
    unet.requires_grad_(False).eval().to(device=models.vae.device, dtype=weight_dtype)
    controlnet.float().train()
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()  # nothing of the frozen UNet is trained
        controlnet.enable_gradient_checkpointing()
    return controlnet


class Controlled(nn.Module):
    """ε_θ(z_t, t, c) with a ControlNet's residuals for fixed condition images: (z_t, t, c) -> prediction."""

    def __init__(self, unet: nn.Module, controlnet: ControlNetModel, condition: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.controlnet, self.condition = unet, controlnet, condition

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        condition = self.condition.to(device=sample.device, dtype=sample.dtype)
        down, mid = self.controlnet(sample, timestep, context, condition, return_dict=False)
        return self.unet(
            sample, timestep, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )


class ControlNetTask(TextToImageTask):
    """`TextToImageTask` with condition images: its loss, data order and checkpoints, a ControlNet trained."""

    def datasets(self, dataset) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, Any]:
        """(training set, held-out set or None, collate): rows with their condition images."""
        cfg = self.cfg
        if cfg.conditioning_image_column not in dataset.column_names:
            raise ConfigError(
                f"--conditioning_image_column={cfg.conditioning_image_column!r} is not a column of the dataset; its "
                f"columns are {list(dataset.column_names)}."
            )
        dataset = without_image_decoding(dataset, cfg.conditioning_image_column)
        self._validation_conditions: list[torch.Tensor] = []  # held-out conditions (3, R, R), for the grid
        transform = ImageTransform(cfg.resolution, cfg.center_crop)
        columns = (cfg.image_column, cfg.caption_column, cfg.conditioning_image_column, transform)
        n_train = len(dataset) - cfg.validation_holdout

        def make(indices: range, flip: bool) -> ConditionedTextImageDataset:
            return ConditionedTextImageDataset(dataset.select(indices), *columns, flip, self.seed)

        holdout = make(range(n_train, len(dataset)), False) if cfg.validation_holdout else None
        return make(range(n_train), cfg.random_flip), holdout, collate_text_image

    def denoiser(self, unet: nn.Module, batch: dict[str, Any]) -> nn.Module:
        """The frozen UNet with the trained ControlNet (`unet` here) and the batch's condition images."""
        return Controlled(self.models.unet, unet, batch["conditioning_pixel_values"].to(self.device))

    def _holdout(self, holdout, collate) -> dict[str, torch.Tensor] | None:
        fixed = super()._holdout(holdout, collate)
        if fixed is None:
            return None
        conditions = collate([holdout[(0, i)] for i in range(len(holdout))])["conditioning_pixel_values"]
        self._validation_conditions = list(conditions)
        repeats = len(fixed["latents"]) // len(conditions)
        return {**fixed, "conditioning_pixel_values": conditions.repeat_interleave(repeats, dim=0)}

    @torch.no_grad()
    def validation_images(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> list[Image.Image]:
        """Prompt i with held-out condition i mod n and seed i: DDIM with the training schedule."""
        from latentdiff.schedulers import DDIMScheduler
        from pipelines.controlnet import ControlNetPipeline

        m = self.models
        pipe = ControlNetPipeline(
            m.unet,
            DDIMScheduler.from_config(m.noise_scheduler.config),
            m.vae,
            m.text_encoder,
            m.tokenizer,
            unet,
        )
        pipe.set_progress_bar_config(disable=True)
        images = []
        conditions = self._validation_conditions
        for i, prompt in enumerate(self.cfg.validation_prompts):
            with self.accelerator.autocast():
                images += pipe(
                    prompt,
                    image=conditions[i % len(conditions)][None],
                    num_inference_steps=self.cfg.validation_num_inference_steps,
                    guidance_scale=self.cfg.validation_guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(i),
                ).images
        return images

    def export(self, trainer: Trainer) -> Path:
        """Write the ControlNet (EMA weights if --use_ema) into --output_dir, diffusers' ControlNetModel layout."""
        out = Path(self.cfg.output_dir)
        if self.accelerator.is_main_process:
            with trainer.averaged_weights():
                trainer.model.save_pretrained(out)
            logger.info("saved the ControlNet (%s weights) to %s", "EMA" if trainer.ema else "trained", out)
        self.accelerator.wait_for_everyone()
        return out
