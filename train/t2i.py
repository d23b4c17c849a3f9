"""The text-to-image task: models, data, the diffusion loss, validation and export for the training loop.

`train_t2i.py` (full fine-tune or from scratch) and `train_lora.py` (adapters) both train through this task and the
one loop of `trainer.py`.

The loss (Ho et al. 2020; Rombach et al. 2022, eq. 2), per sample of the batch:

| code name        | symbol       | meaning                                                                          |
|------------------|--------------|----------------------------------------------------------------------------------|
| `latents`        | z₀           | z₀ = μ + σ·ε_z from the VAE posterior of the image, or μ (`--latent_sample mean`) |
| `prompt_embeds`  | c            | text embedding; replaced by the empty prompt's ∅ with probability p (CFG dropout) |
| `noise`          | ε            | ε ~ N(0, I), plus noise_offset · N(0, I) per channel when set                     |
| `timesteps`      | t            | uniform in {0, …, T−1}                                                           |
| `noisy_latents`  | z_t          | √ᾱ_t z₀ + √(1 − ᾱ_t) ε                                                            |
| `target`         | y            | ε (epsilon), v = √ᾱ_t ε − √(1 − ᾱ_t) z₀ (v_prediction), or z₀ (sample)          |
| `snr`            | SNR(t)       | ᾱ_t / (1 − ᾱ_t)                                                                  |
| `weight`         | w(t)         | 1, or min-SNR-γ (Hang et al. 2023, arXiv:2303.09556) for the prediction type     |

    loss = mean_b w(t_b) · mean_{c,h,w} (UNet(z_t, t, c) − y)²

Min-SNR-γ weights every timestep by min(SNR, γ) in x₀ units. The three targets differ in scale from an x₀ error:
‖ε̂ − ε‖² = SNR·‖ẑ₀ − z₀‖² and ‖v̂ − v‖² = (SNR + 1)·‖ẑ₀ − z₀‖², so the weight applied to the MSE is
min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, and min(SNR, γ) for x₀. (For ε at SNR = 0, the limit 1.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from config import ConfigError, TrainConfig
from PIL import Image
from torch import nn
from trainer import BatchRandom, Trainer, derive_seed

from latentdiff.conditioning import encode_prompts
from latentdiff.data.cache import (
    CachedTextImageDataset,
    cache_key,
    collate_cached,
    encode_posterior,
    load_or_build_cache,
    sample_posterior,
)
from latentdiff.data.dataset import (
    ImageTransform,
    TextImageDataset,
    check_columns,
    collate_text_image,
    dataset_fingerprint,
    load_image_caption_dataset,
    without_image_decoding,
)

logger = logging.getLogger(__name__)

# Stable Diffusion 1.x's training schedule: used when no scheduler config is given or found.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}
VALIDATION_TIMESTEPS = 4  # fixed timesteps per held-out sample in the validation loss
HUB_PATTERNS = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]


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


# ---- checks before loading --------------------------------------------------------------------------------------


def _read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--unet_config={str(path)!r}: no such file.")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ConfigError(f"--unet_config={str(path)!r} must hold a mapping of UNetConfig fields.")
    return values


def unet_config_from_file(path: str | Path):
    """A `UNetConfig` from a JSON/YAML file: UNetConfig field names, or a diffusers UNet2DConditionModel config."""
    from latentdiff.models.unet import UNetConfig

    values = _read_config_file(path)
    try:
        if "_class_name" in values or "down_block_types" in values:
            return UNetConfig.from_diffusers(values)
        return UNetConfig(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--unet_config={str(path)!r}: {error}") from error


def _subfolder_config(root: str | None, subfolder: str, name: str = "config.json") -> dict[str, Any] | None:
    """The JSON config `<root>/<subfolder>/<name>` (or `<root>/<name>`) of a local folder; None for a hub id."""
    if root is None or not Path(root).is_dir():
        return None
    for candidate in (Path(root) / subfolder / name, Path(root) / name):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ConfigError(
        f"{root} holds no {subfolder}/{name}: is it a Stable Diffusion folder in the diffusers layout?"
    )


def check_model_files(cfg: TrainConfig) -> None:
    """Checks that read only config files (no weights): the resolution against the model's down-sampling factor,
    the UNet's input channels against the VAE's latents and its cross-attention width against the text encoder.

    Folders given as hub ids are checked after download, in `build_models`.
    """
    vae_config = _subfolder_config(
        cfg.pretrained_vae_model_name_or_path or cfg.pretrained_model_name_or_path, "vae"
    )
    text_config = _subfolder_config(
        cfg.pretrained_text_encoder_name_or_path or cfg.pretrained_model_name_or_path, "text_encoder"
    )
    if cfg.unet_config is not None:
        unet = unet_config_from_file(cfg.unet_config)
        unet_levels, unet_in, unet_cross = (
            len(unet.block_out_channels),
            unet.in_channels,
            unet.cross_attention_dim,
        )
    else:
        raw = _subfolder_config(cfg.pretrained_model_name_or_path, "unet")
        if raw is None:
            return
        unet_levels = len(raw.get("block_out_channels", (320, 640, 1280, 1280)))
        unet_in, unet_cross = raw.get("in_channels", 4), raw.get("cross_attention_dim", 1280)
    if vae_config is not None:
        vae_factor = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
        unet_factor = 2 ** (unet_levels - 1)
        factor = vae_factor * unet_factor
        if cfg.resolution % factor:
            lower, upper = cfg.resolution // factor * factor, (cfg.resolution // factor + 1) * factor
            raise ConfigError(
                f"--resolution={cfg.resolution} is not divisible by {factor} (VAE factor {vae_factor} x UNet "
                f"down-sampling factor {unet_factor}); use {lower or upper} or {upper}."
            )
        latent_channels = vae_config.get("latent_channels", 4)
        if unet_in != latent_channels:
            raise ConfigError(
                f"the UNet takes {unet_in} input channels but the VAE makes {latent_channels}-channel latents; "
                "set in_channels (and out_channels) of --unet_config to match."
            )
    if text_config is not None:
        hidden = text_config.get("text_config", text_config).get("hidden_size")
        if hidden is not None and unet_cross != hidden:
            raise ConfigError(
                f"the UNet's cross_attention_dim is {unet_cross} but the text encoder's hidden size is {hidden}; "
                "set cross_attention_dim of --unet_config to match."
            )


def load_data(cfg: TrainConfig):
    """The `datasets.Dataset` (images not decoded), columns checked, truncated to --max_train_samples."""
    dataset = load_image_caption_dataset(
        cfg.dataset_name, cfg.train_data_dir, cfg.dataset_config_name, cache_dir=cfg.cache_dir
    )
    try:
        check_columns(dataset, cfg.image_column, cfg.caption_column)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.max_train_samples is not None:
        dataset = dataset.select(range(min(cfg.max_train_samples, len(dataset))))
    if cfg.validation_holdout >= len(dataset):
        raise ConfigError(
            f"--validation_holdout={cfg.validation_holdout} leaves no training data: the dataset has "
            f"{len(dataset)} samples."
        )
    return without_image_decoding(dataset, cfg.image_column)


def split_image_datasets(
    cfg: TrainConfig, dataset, seed: int
) -> tuple[TextImageDataset, TextImageDataset | None]:
    """(training rows, the last --validation_holdout rows or None) as decoded, transformed `TextImageDataset`s;
    only the training part is flipped (--random_flip)."""
    transform = ImageTransform(cfg.resolution, cfg.center_crop)
    n_train = len(dataset) - cfg.validation_holdout

    def make(indices: range, flip: bool) -> TextImageDataset:
        return TextImageDataset(
            dataset.select(indices), cfg.image_column, cfg.caption_column, transform, flip, seed
        )

    holdout = make(range(n_train, len(dataset)), False) if cfg.validation_holdout else None
    return make(range(n_train), cfg.random_flip), holdout


# ---- models -------------------------------------------------------------------------------------------------------


@dataclass
class T2IModels:
    """The parts: `unet` (trained), `vae`, `text_encoder`, `tokenizer` (frozen), `noise_scheduler` (the training
    noise schedule, a DDPMScheduler whose config records the prediction type)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: Any


def _local_folder(path_or_id: str, cache_dir: str | None) -> Path:
    """A local folder for a path or a hub id (configs, tokenizer files and safetensors weights are downloaded)."""
    if Path(path_or_id).is_dir():
        return Path(path_or_id)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            path_or_id,
            allow_patterns=HUB_PATTERNS + ["*.json", "*.txt", "*.safetensors"],
            ignore_patterns=["*.bin", "*.ckpt", "*fp16*", "*non_ema*"],
            cache_dir=cache_dir,
        )
    )


def _part(folder: Path, name: str) -> tuple[Path, str | None]:
    """(folder, subfolder) of a part: `<folder>/<name>/` in an SD folder, else the folder itself."""
    return (folder, name) if (folder / name).is_dir() else (folder, None)


def build_noise_scheduler(cfg: TrainConfig, model_folder: Path | None):
    """The training DDPMScheduler: --noise_scheduler_config, else the model's scheduler/, else SD's schedule.

    --prediction_type overrides the file's. A config that does not say `clip_sample` gets False: latents are not
    confined to [-1, 1], and the exported folder should not clip them when sampled.
    """
    from latentdiff.schedulers import DDPMScheduler

    if cfg.noise_scheduler_config is not None:
        values = json.loads(Path(cfg.noise_scheduler_config).read_text())
    elif model_folder is not None and (model_folder / "scheduler" / "scheduler_config.json").is_file():
        values = json.loads((model_folder / "scheduler" / "scheduler_config.json").read_text())
    else:
        values = dict(SD_NOISE_SCHEDULE)
    overrides: dict[str, Any] = {}
    if "clip_sample" not in values:
        overrides["clip_sample"] = False
    if cfg.prediction_type is not None:
        overrides["prediction_type"] = cfg.prediction_type
    return DDPMScheduler.from_config(values, **overrides)


def build_models(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> T2IModels:
    """Load (or, with --unet_config, create) the parts; the VAE and text encoder frozen, in `weight_dtype`, on
    `device`; the UNet float32 in train mode (the loop moves it)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentdiff.models.unet import ConditionalUNet

    model_folder = (
        _local_folder(cfg.pretrained_model_name_or_path, cfg.cache_dir)
        if cfg.pretrained_model_name_or_path
        else None
    )
    vae_folder = (
        _local_folder(cfg.pretrained_vae_model_name_or_path, cfg.cache_dir)
        if cfg.pretrained_vae_model_name_or_path
        else model_folder
    )
    text_folder = (
        _local_folder(cfg.pretrained_text_encoder_name_or_path, cfg.cache_dir)
        if cfg.pretrained_text_encoder_name_or_path
        else model_folder
    )

    check_model_files(
        dataclasses.replace(
            cfg,
            pretrained_model_name_or_path=str(model_folder) if model_folder else None,
            pretrained_vae_model_name_or_path=str(vae_folder),
            pretrained_text_encoder_name_or_path=str(text_folder),
        )
    )
    root, sub = _part(text_folder, "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / (sub or ""))
    root, sub = _part(text_folder, "text_encoder")
    if cfg.text_encoder_init == "random":  # same vocabulary, fresh weights (seeded by the run's seed)
        config = CLIPTextConfig.from_pretrained(root / (sub or ""))  # the weights are not read
        if cfg.text_encoder_layers is not None:
            config.num_hidden_layers = cfg.text_encoder_layers
        text_encoder = CLIPTextModel(config)
    else:
        text_encoder = CLIPTextModel.from_pretrained(root / (sub or ""))
    root, sub = _part(vae_folder, "vae")
    vae = AutoencoderKL.from_pretrained(root, subfolder=sub)
    if cfg.unet_config is not None:
        unet = ConditionalUNet(unet_config_from_file(cfg.unet_config))
    else:
        unet = ConditionalUNet.from_pretrained(model_folder, subfolder="unet")
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device=device, dtype=weight_dtype)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return T2IModels(unet, vae, text_encoder, tokenizer, build_noise_scheduler(cfg, model_folder))


def trained_module(cfg: TrainConfig, models: T2IModels) -> nn.Module:
    """The module the loop trains: the UNet, or with --train_text_encoder ModuleDict(unet=, text_encoder=) with the
    text encoder unfrozen, float32, in train mode (the task reads either layout)."""
    if not cfg.train_text_encoder:
        return models.unet
    models.text_encoder.requires_grad_(True)
    models.text_encoder.to(torch.float32)
    models.text_encoder.train()
    return nn.ModuleDict({"unet": models.unet, "text_encoder": models.text_encoder})


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """dtype of the frozen parts: half precision under mixed precision (they are only run forward)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# ---- the task -----------------------------------------------------------------------------------------------------


class TextToImageTask:
    """Data, loss, validation and export of text-to-image training.

    Args:
        cfg: the run's config.
        models: from `build_models`.
        accelerator: the run's accelerator (main-process-first cache building, device).
        seed: the run's seed (per-sample data choices, validation noise).
    """

    def __init__(self, cfg: TrainConfig, models: T2IModels, accelerator: Accelerator, seed: int) -> None:
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

    def datasets(self, dataset) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, Any]:
        """(training dataset, held-out dataset or None, collate function). The last --validation_holdout rows are
        held out. With --cache_latents the cache is built here (by the main process first)."""
        cfg = self.cfg
        n_train = len(dataset) - cfg.validation_holdout
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
                root = Path(cfg.latents_cache_dir or Path(cfg.output_dir) / "latent_cache")
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
        holdout = make(range(n_train, len(dataset)), False) if cfg.validation_holdout else None
        return train, holdout, collate

    # ---- loss ----

    def _unet_and_text_encoder(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """The trained UNet, and the text encoder if it is trained too (model = ModuleDict(unet=, text_encoder=))."""
        if isinstance(model, nn.ModuleDict):
            return model["unet"], model["text_encoder"] if "text_encoder" in model else None
        return model, None

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
    ) -> torch.Tensor:
        """w(t)·MSE(UNet(z_t, t, c), y) per sample, (B,) float32 (see the module docstring)."""
        noisy_latents = self.noise_schedule.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_schedule, latents, noise, timesteps, self.prediction_type)
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
        unet, trained_text_encoder = self._unet_and_text_encoder(model)
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
        return self.per_sample_loss(unet, latents, prompt_embeds, noise, timesteps).mean()

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
                        unet, part["latents"], prompt_embeds, part["noise"], part["timesteps"]
                    )
                )
        return float(torch.cat(losses).mean())

    @torch.no_grad()
    def validation_images(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> list[Image.Image]:
        """One image per validation prompt: DDIM with the training schedule; prompt i uses seed i."""
        from latentdiff.schedulers import DDIMScheduler
        from pipelines.latent_pipeline import LatentPipeline

        pipe = LatentPipeline(
            unet,
            DDIMScheduler.from_config(self.models.noise_scheduler.config),
            self.models.vae,
            text_encoder or self.models.text_encoder,
            self.models.tokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
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
            unet, text_encoder = self._unet_and_text_encoder(trainer.model)
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
        columns = min(4, len(images))
        rows = math.ceil(len(images) / columns)
        w, h = images[0].size
        grid = Image.new("RGB", (columns * w, rows * h), "white")
        for i, image in enumerate(images):
            grid.paste(image, ((i % columns) * w, (i // columns) * h))
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

    def export(self, trainer: Trainer) -> Path:
        """Write the SD-layout pipeline folder into --output_dir: the UNet with EMA weights if enabled, the frozen
        parts in float32, and the training noise scheduler's config (prediction type included)."""
        from pipelines.latent_pipeline import LatentPipeline

        out = Path(self.cfg.output_dir)
        if self.accelerator.is_main_process:
            unet, text_encoder = self._unet_and_text_encoder(trainer.model)
            with trainer.averaged_weights():
                self.models.vae.to(torch.float32)
                text_encoder = (text_encoder or self.models.text_encoder).to(torch.float32)
                LatentPipeline(
                    unet, self.models.noise_scheduler, self.models.vae, text_encoder, self.models.tokenizer
                ).save_pretrained(out)
            logger.info("saved the pipeline (%s weights) to %s", "EMA" if trainer.ema else "trained", out)
        self.accelerator.wait_for_everyone()
        return out
