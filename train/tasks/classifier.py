"""The noise-aware classifier task: train p_φ(y | x_t, t) on noisy latents for classifier guidance (Dhariwal & Nichol
2021, §4) through the one training loop (`train.loop`), for `train_classifier.py`.

The classifier (`latentdiff.models.classifier.NoiseAwareClassifier`) reads the layout of a shapes scene: one head per
cell of the 3×3 grid, each over "empty" and the 18 colour-shape pairs (`latentdiff.data.scene_labels`). Labels come
from each training caption read with the shapes grammar; a caption that leaves some object's position out does not
fix the layout, so its row is not used. The latents and the noise are those of the diffusion model it will guide:
its VAE (frozen) and its training noise schedule, from --pretrained_model_name_or_path (default: the embedded model).

| code name      | symbol           | meaning                                                                   |
|----------------|------------------|---------------------------------------------------------------------------|
| `latents`      | x₀               | the VAE posterior mean of the image, in latent units (× scaling factor)   |
| `timesteps`    | t                | uniform over the training timesteps 0 … T − 1                             |
| `noisy`        | x_t              | √ᾱ_t x₀ + √(1 − ᾱ_t) ε (Ho et al. 2020, eq. 4), what the UNet sees         |
| `logits[c]`    | log p_φ(y_c | x_t) | up to a constant, for cell c, (B, K)                                     |

    loss = (1/9) Σ_c CE(logits[c], y_c)

The images are encoded once, before training (the frozen VAE's posterior mean of an unflipped image is the same in
every epoch), so a training step costs the classifier alone.

With --irregular_images N, N more scenes are drawn with distorted objects (`latentdiff.data.irregular`: domes, rounded
or pinched squares, curved triangles, blobs, each refused by the strict detector) and labelled `{colour} irregular`:
the classifier then has 25 classes per cell (IRREGULAR_CELL_ATTRIBUTES), the first 19 as before, so that its gradient
of log p(y = a crisp shape | x_t) pushes away from the shapes the detector refuses. Scene i of them draws from the
generator seeded by (--seed, i); the last --validation_holdout / 2 are held out.

Validation measures the accuracy against t on the held-out rows (fixed noise): per cell, on the cells that hold an
object, and whole layouts (all nine cells right); with irregular scenes also on their held-out objects. The export writes the classifier folder (`classifier/`, EMA weights
if enabled) and that table (`accuracy_against_t.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from latentdiff.conditioning import encode_posterior, vae_scale_factor
from latentdiff.data.dataset import TextImageDataset, captions_of, collate_text_image
from latentdiff.data.irregular import IrregularScene, irregular_scene
from latentdiff.data.scene_labels import (
    CELL_ATTRIBUTES,
    EMPTY,
    IRREGULAR_CELL_ATTRIBUTES,
    caption_labels,
    cell_attribute,
    has_layout,
    irregular_class,
    object_class,
)
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.models.classifier import ClassifierConfig, NoiseAwareClassifier
from train.data import split_image_datasets
from train.loop import Trainer
from train.loop_config import ConfigError, LoopConfig, flag
from train.randomness import BatchRandom

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClassifierTaskConfig(LoopConfig):
    """Every option of `train/train_classifier.py`: the loop's flags plus the classifier's."""

    pretrained_model_name_or_path: str | None = flag(
        None,
        "SD-layout folder of the diffusion model to guide: its vae/ makes the latents and its scheduler/ the noise "
        "(default: the embedded default model).",
        exists="folder",
    )
    block_out_channels: list[int] = flag([32, 64], "Classifier widths per level (the latent halves between).")
    layers_per_block: int = flag(1, "ResBlocks per level.", at_least=1)
    time_embed_dim: int = flag(128, "Width of the timestep embedding.", at_least=1)
    pool_size: int = flag(
        3, "Features are averaged over a P x P grid before the heads (3: one average per cell).", at_least=1
    )
    validation_timesteps: list[int] = flag(
        [0, 200, 400, 600, 800, 900, 999], "Timesteps t at which validation measures the accuracy."
    )
    irregular_images: int = flag(
        0,
        "Extra scenes with distorted objects labelled '{colour} irregular' (latentdiff.data.irregular); > 0 gives "
        "the classifier 25 classes per cell instead of 19.",
        at_least=0,
    )

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.random_flip:
            raise ConfigError(
                "--random_flip mirrors objects between the left and right cells, so the caption's layout would be "
                "wrong for half the images; leave it off for the classifier."
            )
        if any(c < 1 for c in self.block_out_channels):
            raise ConfigError(
                f"--block_out_channels={self.block_out_channels} must be positive widths, e.g. 32 64."
            )

    @property
    def model_folder(self) -> Path:
        return Path(self.pretrained_model_name_or_path or DEFAULT_MODEL_DIR)


@dataclasses.dataclass
class FrozenParts:
    """What the classifier is trained for: the diffusion model's VAE (frozen) and training noise schedule."""

    vae: nn.Module
    noise_scheduler: Any  # latentdiff.schedulers.DDPMScheduler: add_noise, alphas_cumprod


def build_frozen_parts(cfg: ClassifierTaskConfig, device: torch.device) -> FrozenParts:
    """The VAE (eval, no gradients) and the noise schedule of --pretrained_model_name_or_path; the VAE's
    down-sampling factor must divide --resolution."""
    from diffusers import AutoencoderKL

    from latentdiff.schedulers import DDPMScheduler

    folder = cfg.model_folder
    for part in ("vae", "scheduler"):
        if not (folder / part).is_dir():
            raise ConfigError(
                f"--pretrained_model_name_or_path={str(folder)!r} has no {part}/ folder; pass an SD-layout folder "
                "(model_index.json, vae/, scheduler/, ...)."
            )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device).eval().requires_grad_(False)
    factor = vae_scale_factor(vae)
    if cfg.resolution % factor:
        raise ConfigError(
            f"--resolution={cfg.resolution} is not divisible by the VAE's down-sampling factor {factor}; use the "
            "image size the diffusion model was trained at."
        )
    return FrozenParts(vae, DDPMScheduler.from_pretrained(folder, subfolder="scheduler"))


def build_classifier(cfg: ClassifierTaskConfig, vae: nn.Module) -> NoiseAwareClassifier:
    """A new classifier over the cell layout, reading the VAE's latent channels; float32, train mode."""
    config = ClassifierConfig(
        attributes=IRREGULAR_CELL_ATTRIBUTES if cfg.irregular_images else CELL_ATTRIBUTES,
        in_channels=int(vae.config.latent_channels),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_groups=min(8, min(cfg.block_out_channels)),
        time_embed_dim=cfg.time_embed_dim,
        pool_size=cfg.pool_size,
    )
    return NoiseAwareClassifier(config).float().train()


def layout_labels(captions: list[str]) -> torch.Tensor:
    """(B, 9) class indices, one column per cell of CELL_ATTRIBUTES, of captions that each place every object."""
    rows = [caption_labels(caption) for caption in captions]
    return torch.tensor([[row[name] for name, _ in CELL_ATTRIBUTES] for row in rows])


def irregular_labels(scene: IrregularScene) -> list[int]:
    """(9,) class indices of an irregular scene, in CELL_ATTRIBUTES order."""
    cells = {name: EMPTY for name, _ in CELL_ATTRIBUTES}
    for i, obj in enumerate(scene.scene.objects):
        k = irregular_class(obj.color) if i in scene.irregular else object_class(obj.color, obj.shape)
        cells[cell_attribute(obj.position)] = k
    return list(cells.values())


class LatentLayouts(torch.utils.data.Dataset):
    """Encoded samples keyed by (epoch, index): {"latents": x₀ (C, h, w), "labels": (9,) class indices}.

    The images are encoded once (the posterior mean of a centre-cropped, unflipped image is the same every epoch),
    so a step costs the classifier alone.
    """

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        self.latents = latents  # (N, C, h, w)
        self.labels = labels  # (N, 9)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index = key if isinstance(key, int) else key[1]
        return {"latents": self.latents[index], "labels": self.labels[index]}


def collate_layouts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """latents (B, C, h, w), labels (B, 9)."""
    return {key: torch.stack([item[key] for item in items]) for key in ("latents", "labels")}


class ClassifierTask:
    """Data, loss, validation and export of noise-aware classifier training."""

    def __init__(
        self, cfg: ClassifierTaskConfig, frozen: FrozenParts, accelerator: Accelerator, seed: int
    ) -> None:
        self.cfg = cfg
        self.vae = frozen.vae
        self.noise_scheduler = frozen.noise_scheduler
        self.accelerator = accelerator
        self.device = accelerator.device
        self.seed = seed
        self.holdout: LatentLayouts | None = None
        self.irregular_holdout: LatentLayouts | None = None
        self.accuracy: dict[int, dict[str, float]] = {}

    def datasets(self, dataset) -> tuple[LatentLayouts, Any]:
        """(training dataset, collate) over the rows whose caption places every object, encoded; the last
        --validation_holdout of them are held out for validation."""
        captions = [captions_of(value)[0] for value in dataset[self.cfg.caption_column]]
        keep = [i for i, caption in enumerate(captions) if has_layout(caption)]
        logger.info(
            "%d of %d captions place every object (the others do not fix the layout and are not used)",
            len(keep),
            len(captions),
        )
        if len(keep) <= self.cfg.validation_holdout:
            raise ConfigError(
                f"only {len(keep)} captions of --train_data_dir place every object, not more than "
                f"--validation_holdout={self.cfg.validation_holdout}; use shapes-world captions with positions "
                "(latentdiff make-dataset shapes) or a smaller holdout."
            )
        train, held = split_image_datasets(self.cfg, dataset.select(keep), self.seed)
        self.holdout = self.encode(held) if held is not None else None
        train = self.encode(train)
        if self.cfg.irregular_images:
            irregular = self.encode_irregular(self.cfg.irregular_images)
            split = len(irregular) - self.cfg.validation_holdout // 2
            self.irregular_holdout = LatentLayouts(irregular.latents[split:], irregular.labels[split:])
            train = LatentLayouts(
                torch.cat([train.latents, irregular.latents[:split]]),
                torch.cat([train.labels, irregular.labels[:split]]),
            )
        return train, collate_layouts

    @torch.no_grad()
    def encode_irregular(self, count: int) -> LatentLayouts:
        """x₀ and labels of `count` irregular scenes at --resolution, scene i drawn from (--seed, i)."""
        latents, labels = [], []
        for start in tqdm(
            range(0, count, 64), desc="irregular", disable=not self.accelerator.is_local_main_process
        ):
            pixels = []
            for i in range(start, min(start + 64, count)):
                scene, image = irregular_scene(np.random.default_rng([self.seed, i]), self.cfg.resolution)
                pixels.append(
                    torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                )
                labels.append(irregular_labels(scene))
            latents.append(encode_posterior(self.vae, torch.stack(pixels).to(self.device))[0].cpu())
        return LatentLayouts(torch.cat(latents), torch.tensor(labels))

    @torch.no_grad()
    def encode(self, images: TextImageDataset) -> LatentLayouts:
        """Every image's x₀ (the VAE posterior mean in latent units) and layout labels, on the CPU; an unreadable
        image is replaced by the next readable one (with its caption) and reported."""
        latents, labels, skipped = [], [], []
        chunks = range(0, len(images), 64)
        for start in tqdm(chunks, desc="encoding", disable=not self.accelerator.is_local_main_process):
            items = [images[i] for i in range(start, min(start + 64, len(images)))]
            batch = collate_text_image(items)
            latents.append(encode_posterior(self.vae, batch["pixel_values"].to(self.device))[0].cpu())
            labels.append(layout_labels(batch["captions"]))
            skipped += batch["skipped"]
        if skipped:
            logger.warning(
                "%d unreadable image(s) replaced by the next readable one: %s", len(skipped), skipped
            )
        return LatentLayouts(torch.cat(latents), torch.cat(labels))

    def logits(self, model: nn.Module, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(B, 9, K) logits of x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, cells in CELL_ATTRIBUTES order."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        logits = model(noisy, timesteps)
        return torch.stack([logits[name] for name, _ in CELL_ATTRIBUTES], 1)

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        """(1/9) Σ_c CE(logits[c], y_c), t uniform, ε ~ N(0, I)."""
        latents = batch["latents"].to(self.device)
        noise = rng.randn(*latents.shape[1:])
        timesteps = rng.randint(0, self.noise_scheduler.config.num_train_timesteps)
        logits = self.logits(model, latents, noise, timesteps)  # (B, 9, K)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].to(self.device).flatten())

    @torch.no_grad()
    def read_right(
        self, model: nn.Module, layouts: LatentLayouts, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, 9) whether each cell is read right at t with fixed noise, (N, 9) labels)."""
        latents, labels = layouts.latents.to(self.device), layouts.labels.to(self.device)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        timesteps = torch.full((len(latents),), t, device=self.device)
        return self.logits(model, latents, noise, timesteps).argmax(-1) == labels, labels

    @torch.no_grad()
    def accuracy_against_t(self, model: nn.Module) -> dict[int, dict[str, float]]:
        """{t: {cells, objects, layouts[, irregular_objects]}} on the held-out rows with fixed noise: the share of
        cells read right, of the cells holding an object read right, of layouts with all nine cells right (and of
        the held-out irregular scenes' objects read right)."""
        table = {}
        for t in self.cfg.validation_timesteps:
            right, labels = self.read_right(model, self.holdout, t)
            table[t] = {
                "cells": float(right.float().mean()),
                "objects": float(right[labels != EMPTY].float().mean()),
                "layouts": float(right.all(1).float().mean()),
            }
            if self.irregular_holdout is not None:
                right, labels = self.read_right(model, self.irregular_holdout, t)
                table[t]["irregular_objects"] = float(right[labels != EMPTY].float().mean())
        return table

    def validate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """The accuracy against t (logged as val_objects_t{t}, val_layouts_t{t})."""
        logs: dict[str, float] = {}
        if self.accelerator.is_main_process and self.holdout is not None:
            model = trainer.model
            model.eval()
            with trainer.averaged_weights() as averaged:
                self.accuracy = self.accuracy_against_t(averaged)
            model.train()
            for t, row in self.accuracy.items():
                logs[f"val_objects_t{t}"] = row["objects"]
                logs[f"val_layouts_t{t}"] = row["layouts"]
                if "irregular_objects" in row:
                    logs[f"val_irregular_t{t}"] = row["irregular_objects"]
        self.accelerator.wait_for_everyone()
        return logs

    def export(self, trainer: Trainer) -> Path:
        """Save the classifier (EMA weights if enabled) to --output_dir/classifier, and the last accuracy table to
        --output_dir/accuracy_against_t.json."""
        out = Path(self.cfg.output_dir) / "classifier"
        if self.accelerator.is_main_process:
            with trainer.averaged_weights() as model:
                model.save_pretrained(out)
            if self.accuracy:
                table = {str(t): row for t, row in self.accuracy.items()}
                (Path(self.cfg.output_dir) / "accuracy_against_t.json").write_text(
                    json.dumps(table, indent=2)
                )
            logger.info("saved the classifier to %s", out)
        self.accelerator.wait_for_everyone()
        return out
