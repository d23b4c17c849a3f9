"""The text-to-image task's models: where each part is, what its config says (read once per run and checked before
any weight is loaded), and the parts built from that.

    files = resolve_model_files(cfg)        # folders (hub ids downloaded), configs read, sizes cross-checked
    models = build_models(cfg, files, device, weight_dtype)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiff.conditioning import vae_scale_factor
from latentdiff.hub import local_folder
from latentdiff.models.unet import UNetConfig
from train.arguments import read_mapping
from train.loop_config import ConfigError
from train.tasks.t2i_config import T2IConfig

# Stable Diffusion 1.x's training schedule: used when no scheduler config is given or found.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of the model is and what its config says, read once per run.

    model_folder: the SD folder of --pretrained_model_name_or_path (None when every part is given separately);
    vae_folder, text_folder: `(root, subfolder or None)` of the VAE and of the text encoder + tokenizer;
    unet: the UNet's shape (from --unet_config or the folder's unet/config.json); vae_config, text_config: their
    config.json; noise_schedule: the training scheduler config (--noise_scheduler_config, the folder's, or SD's).
    """

    model_folder: Path | None
    vae_folder: tuple[Path, str | None]
    text_folder: tuple[Path, str | None]
    unet: UNetConfig
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    noise_schedule: dict[str, Any]


def unet_config_from_file(path: str | Path) -> UNetConfig:
    """A `UNetConfig` from a JSON/YAML file: UNetConfig field names, or a diffusers UNet2DConditionModel config."""
    values = read_mapping(path, "--unet_config")
    try:
        if "_class_name" in values or "down_block_types" in values:
            return UNetConfig.from_diffusers(values)
        return UNetConfig(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--unet_config={str(path)!r}: {error}") from error


def _part(folder: Path, name: str) -> tuple[Path, str | None]:
    """(folder, subfolder) of a part: `<folder>/<name>/` in an SD folder, else the folder itself."""
    return (folder, name) if (folder / name).is_dir() else (folder, None)


def _part_config(part: tuple[Path, str | None], name: str = "config.json") -> dict[str, Any]:
    root, sub = part
    file = root / (sub or "") / name
    if not file.is_file():
        raise ConfigError(
            f"{root} holds no {sub or '.'}/{name}: is it a Stable Diffusion folder in the diffusers layout?"
        )
    return json.loads(file.read_text())


def resolve_model_files(cfg: T2IConfig) -> ModelFiles:
    """Find every part (downloading hub ids: configs, tokenizer files and safetensors weights), read the configs
    once, and check that the parts fit together and divide --resolution; ConfigError otherwise."""

    def folder(flag: str) -> Path | None:
        path_or_id = getattr(cfg, flag)
        if path_or_id is None:
            return None
        looks_local = (
            Path(path_or_id).is_absolute() or path_or_id.startswith(".") or path_or_id.count("/") > 1
        )
        if looks_local and not Path(path_or_id).is_dir():
            raise ConfigError(
                f"--{flag}={path_or_id!r}: no such folder. Pass the path of a Stable Diffusion folder in the "
                "diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or a hub id."
            )
        try:
            return local_folder(path_or_id, cfg.cache_dir, cfg.revision, cfg.variant)
        except Exception as error:  # noqa: BLE001 - no such folder, and the hub could not provide it
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"--{flag}={path_or_id!r} is not a local folder, and the hub could not provide it ({reason}). Pass "
                "the path of a Stable Diffusion folder in the diffusers layout, or a hub id with network access "
                "(or already in --cache_dir)."
            ) from error

    model_folder = folder("pretrained_model_name_or_path")
    vae_root = folder("pretrained_vae_model_name_or_path") or model_folder
    text_root = folder("pretrained_text_encoder_name_or_path") or model_folder
    vae_part, text_part = _part(vae_root, "vae"), _part(text_root, "text_encoder")
    if cfg.unet_config is not None:
        unet = unet_config_from_file(cfg.unet_config)
    else:
        try:
            unet = UNetConfig.from_diffusers(_part_config((model_folder, "unet")))
        except ValueError as error:
            raise ConfigError(f"{model_folder}/unet/config.json: {error}") from error
    if cfg.noise_scheduler_config is not None:
        noise_schedule = read_mapping(cfg.noise_scheduler_config, "--noise_scheduler_config")
    elif model_folder is not None and (model_folder / "scheduler" / "scheduler_config.json").is_file():
        noise_schedule = _part_config((model_folder, "scheduler"), "scheduler_config.json")
    else:
        noise_schedule = dict(SD_NOISE_SCHEDULE)
    files = ModelFiles(
        model_folder,
        vae_part,
        text_part,
        unet,
        _part_config(vae_part),
        _part_config(text_part),
        noise_schedule,
    )
    check_model_files(cfg, files)
    return files


def check_model_files(cfg: T2IConfig, files: ModelFiles) -> None:
    """The resolution against the model's down-sampling factor, the UNet's input channels against the VAE's latents
    and its cross-attention width against the text encoder."""
    vae_factor = vae_scale_factor(files.vae_config)
    unet_factor = 2 ** (files.unet.levels - 1)
    factor = vae_factor * unet_factor
    if cfg.resolution % factor:
        lower, upper = cfg.resolution // factor * factor, (cfg.resolution // factor + 1) * factor
        raise ConfigError(
            f"--resolution={cfg.resolution} is not divisible by {factor} (VAE factor {vae_factor} x UNet "
            f"down-sampling factor {unet_factor}); use {lower or upper} or {upper}."
        )
    latent_channels = files.vae_config.get("latent_channels", 4)
    inpainting = 2 * latent_channels + 1  # [z_t, mask, masked-image latents]
    if files.unet.in_channels == inpainting and not cfg.inpainting:
        raise ConfigError(
            f"the UNet takes {inpainting} input channels, an inpainting UNet over the VAE's {latent_channels}-channel "
            "latents: add --inpainting to train it as one."
        )
    allowed = (latent_channels, inpainting) if cfg.inpainting else (latent_channels,)
    if files.unet.in_channels not in allowed:
        raise ConfigError(
            f"the UNet takes {files.unet.in_channels} input channels but the VAE makes {latent_channels}-channel "
            f"latents; set in_channels of --unet_config to {' or '.join(map(str, allowed))} (out_channels to "
            f"{latent_channels})."
        )
    hidden = files.text_config.get("text_config", files.text_config).get("hidden_size")
    if hidden is not None and files.unet.cross_attention_dim != hidden:
        raise ConfigError(
            f"the UNet's cross_attention_dim is {files.unet.cross_attention_dim} but the text encoder's hidden size "
            f"is {hidden}; set cross_attention_dim of --unet_config to match."
        )


@dataclass
class T2IModels:
    """The parts: `unet` (trained), `vae`, `text_encoder`, `tokenizer` (frozen), `noise_scheduler` (the training
    noise schedule, a DDPMScheduler whose config records the prediction type)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: Any


def build_noise_scheduler(cfg: T2IConfig, files: ModelFiles):
    """The training DDPMScheduler of `files.noise_schedule`; --prediction_type overrides the file's. A config that
    does not say `clip_sample` gets False: latents are not confined to [-1, 1], and the exported folder should not
    clip them when sampled."""
    from latentdiff.schedulers import DDPMScheduler

    overrides: dict[str, Any] = {}
    if "clip_sample" not in files.noise_schedule:
        overrides["clip_sample"] = False
    if cfg.prediction_type is not None:
        overrides["prediction_type"] = cfg.prediction_type
    return DDPMScheduler.from_config(files.noise_schedule, **overrides)


def build_text_encoder(cfg: T2IConfig, files: ModelFiles) -> nn.Module:
    """The CLIP text encoder as loaded, or (--text_encoder_init random) one of the same config with fresh weights,
    seeded by the global seed the script set."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root, sub = files.text_folder
    if cfg.text_encoder_init == "pretrained":
        return CLIPTextModel.from_pretrained(root / (sub or ""), variant=cfg.variant)
    config = CLIPTextConfig.from_dict(files.text_config.get("text_config", files.text_config))
    if cfg.text_encoder_layers is not None:
        config.num_hidden_layers = cfg.text_encoder_layers
    return CLIPTextModel(config)


def build_models(
    cfg: T2IConfig, files: ModelFiles, device: torch.device, weight_dtype: torch.dtype
) -> T2IModels:
    """Load (or, with --unet_config, create) the parts; the VAE and text encoder frozen, in `weight_dtype`, on
    `device`; the UNet float32 in train mode (the loop moves it)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from latentdiff.models.unet import ConditionalUNet
    from latentdiff.models.unet_diffusers import load_weights

    root, sub = files.text_folder
    tokenizer = CLIPTokenizer.from_pretrained(Path(*(p for p in _part(root, "tokenizer") if p)))
    text_encoder = build_text_encoder(cfg, files)
    root, sub = files.vae_folder
    vae = AutoencoderKL.from_pretrained(root, subfolder=sub, variant=cfg.variant)
    if cfg.unet_config is not None:
        unet = ConditionalUNet(files.unet)
    else:
        unet = load_weights(files.unet, files.model_folder / "unet", variant=cfg.variant)
    if cfg.inpainting and unet.config.in_channels == vae.config.latent_channels:
        from train.tasks.inpaint import widen_conv_in

        unet = widen_conv_in(unet, vae.config.latent_channels)  # zero weights on the mask and masked image
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device=device, dtype=weight_dtype)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.compile:
        unet.compile(fullgraph=True)  # in place: parameter names and the class stay as they are
    return T2IModels(unet, vae, text_encoder, tokenizer, build_noise_scheduler(cfg, files))


def trained_module(cfg: T2IConfig, models: T2IModels) -> nn.Module:
    """The module the loop trains: the UNet, or with --train_text_encoder ModuleDict(unet=, text_encoder=) with the
    text encoder unfrozen, float32, in train mode (the task reads either layout)."""
    if not cfg.train_text_encoder:
        return models.unet
    models.text_encoder.requires_grad_(True)
    models.text_encoder.to(torch.float32)
    models.text_encoder.train()
    return nn.ModuleDict({"unet": models.unet, "text_encoder": models.text_encoder})


def unet_and_text_encoder(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The trained UNet, and the text encoder if it is trained too (model = ModuleDict(unet=, text_encoder=))."""
    if isinstance(model, nn.ModuleDict):
        return model["unet"], model["text_encoder"] if "text_encoder" in model else None
    return model, None
