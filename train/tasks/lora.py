"""The LoRA task: text-to-image training of low-rank adapters on a frozen model, through the text-to-image task
(`train.tasks.t2i`) and the one loop (`train.loop`).

What differs from a full fine-tune (Hu et al. 2021; `latentdiff.lora` has the symbols):
- the config adds `--rank`, `--lora_alpha`, `--lora_dropout`, `--lora_targets`, `--train_text_encoder`
  (`LoraConfig` extends `T2IConfig`; every shared flag is the same);
- the UNet's frozen weights are kept in the run's precision (float16/bfloat16 under mixed precision, like the VAE
  and text encoder), the adapter's A and B in float32, and only they are optimised (`add_adapters`);
- checkpoints hold the trained parameters only, not a copy of the frozen model (`checkpoint_trained_parameters_only`),
  and resume restores them, the optimizer, the schedule and the data position exactly;
- the export is the adapter alone: `pytorch_lora_weights.safetensors` + `lora_config.json` in --output_dir, loaded
  by `LatentPipeline.load_lora_weights(output_dir)` or `latentdiff generate --lora output_dir`; diffusers' keys, or
  kohya's with `--save_format kohya` (for the web UIs).
The loss, data and validation grids are `TextToImageTask`'s (with --train_text_encoder, the empty prompt of the
classifier-free dropout goes through the adapted text encoder too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from latentdiff.lora import (
    ATTENTION_TARGETS,
    LORA_CONFIG_NAME,
    LORA_WEIGHTS_NAME,
    SAVE_FORMATS,
    TARGET_GROUPS,
    TEXT_ENCODER_TARGETS,
    LoraSpec,
    add_lora,
    check_targets,
    save_lora,
)
from latentdiff.model_card import CARD_NAME, lora_card
from train.loop import Trainer
from train.loop_config import ConfigError, flag
from train.randomness import derive_seed
from train.tasks.t2i import TextToImageTask
from train.tasks.t2i_config import T2IConfig
from train.tasks.t2i_models import ModelFiles, T2IModels, unet_and_text_encoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraConfig(T2IConfig):
    """Every option of `train/train_lora.py`: those of `train_t2i.py` plus the adapter's."""

    EXPORTED: ClassVar[tuple[str, ...]] = (
        LORA_WEIGHTS_NAME,
        LORA_WEIGHTS_NAME + ".partial",  # save_lora's temporary file
        LORA_CONFIG_NAME,
        CARD_NAME,
    )  # the adapter alone

    rank: int = flag(4, "LoRA rank r of every adapted layer (4 to 64 are usual).")
    lora_alpha: float | None = flag(
        None, "LoRA alpha: the update is scaled by alpha / rank. Default: the rank (scale 1)."
    )
    lora_dropout: float = flag(0.0, "Dropout on the adapters' input, in [0, 1).")
    lora_targets: list[str] = flag(
        list(ATTENTION_TARGETS),
        "UNet layers to adapt: module names or suffixes (to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2 conv1 conv2 "
        f"...) or groups ({', '.join(TARGET_GROUPS)}).",
    )
    train_text_encoder: bool = flag(
        False, f"Also adapt the text encoder's attention ({' '.join(TEXT_ENCODER_TARGETS)})."
    )
    save_format: str = flag(
        "diffusers",
        "Key layout of the saved adapter: diffusers (unet.<module>.lora_A.weight, what diffusers loads) or kohya "
        "(lora_unet_<module>.lora_down.weight with .alpha, what the AUTOMATIC1111/ComfyUI web UIs load).",
        choices=SAVE_FORMATS,
    )
    output_dir: str = flag("sd-model-lora", "Where checkpoints, logs, validation images and the adapter go.")

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.inpainting:
            raise ConfigError(
                "--inpainting trains new input channels of the UNet, which adapters on a frozen UNet cannot: use "
                "train_t2i.py --inpainting."
            )
        try:  # rank, alpha and dropout are checked by the adapter's own spec, the one place that knows them
            self.unet_lora_spec()
        except ValueError as error:
            raise ConfigError(f"--rank/--lora_alpha/--lora_dropout/--lora_targets: {error}") from None

    def unet_lora_spec(self) -> LoraSpec:
        return LoraSpec(self.rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def text_encoder_lora_spec(self) -> LoraSpec:
        return LoraSpec(self.rank, self.lora_alpha, self.lora_dropout, TEXT_ENCODER_TARGETS)


def check_lora_targets(cfg: LoraConfig, files: ModelFiles) -> None:
    """Refuse --lora_targets that name no layer of the UNet, from its config alone (the UNet is built on the meta
    device: no weights, no memory)."""
    from latentdiff.models.unet import ConditionalUNet

    with torch.device("meta"):
        unet = ConditionalUNet(files.unet)
    try:
        check_targets(unet, cfg.lora_targets, "UNet")
    except ValueError as error:
        raise ConfigError(f"--lora_targets: {error}") from None


def add_adapters(cfg: LoraConfig, models: T2IModels, weight_dtype: torch.dtype, seed: int) -> nn.Module:
    """Freeze the UNet in `weight_dtype`, add a float32 adapter to it (and to the text encoder with
    --train_text_encoder); returns the module the loop trains: the UNet, or ModuleDict(unet=, text_encoder=).

    The adapters' A matrices are drawn from a generator seeded by the run's seed, so a run is reproducible without
    touching the global RNG."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "lora"))
    models.unet.to(dtype=weight_dtype)
    unet_parameters = add_lora(models.unet, cfg.unet_lora_spec(), generator=generator)
    trained = sum(p.numel() for p in unet_parameters)
    total = sum(p.numel() for p in models.unet.parameters()) - trained
    logger.info(
        "LoRA rank %d on %s: %d trainable parameters, %.2f%% of the UNet's %d",
        cfg.rank,
        ", ".join(cfg.unet_lora_spec().target_modules),
        trained,
        100 * trained / total,
        total,
    )
    if not cfg.train_text_encoder:
        return models.unet
    if getattr(models.text_encoder.config, "num_hidden_layers", None) == 0:
        raise ConfigError(
            "--train_text_encoder adapts the text encoder's attention, and this model's text encoder has none (0 "
            "layers: token and position embeddings only); leave --train_text_encoder off."
        )
    add_lora(models.text_encoder, cfg.text_encoder_lora_spec(), generator=generator)
    models.text_encoder.train()  # the adapters' dropout; CLIP's own dropout is 0
    return nn.ModuleDict({"unet": models.unet, "text_encoder": models.text_encoder})


def checkpoint_trained_parameters_only(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` write only the parameters that require gradients (the adapters) and
    `load_state` read them back, instead of a full copy of the frozen model in every checkpoint.

    The optimizer, LR schedule, RNG states (and the loop's EMA and data position) are saved and restored as usual.
    Loading checks that the checkpoint holds exactly the trained parameters of this run.
    """

    def trained_names(model: nn.Module) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def keep_trained(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for i, model in enumerate(models):
            names = trained_names(model)
            weights[i] = {key: value for key, value in weights[i].items() if key in names}

    def load_trained(models: list[nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            names = trained_names(model)
            if set(state) != names:
                raise ValueError(
                    f"{path} holds {len(state)} tensors but this run trains {len(names)} parameters "
                    f"(e.g. missing {sorted(names - set(state))[:2]}, unexpected {sorted(set(state) - names)[:2]}): "
                    "resume with the --rank, --lora_targets and --train_text_encoder of the run that wrote it."
                )
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate's strict full-model load would miss the frozen weights

    accelerator.register_save_state_pre_hook(keep_trained)
    accelerator.register_load_state_pre_hook(load_trained)


class LoraTask(TextToImageTask):
    """`TextToImageTask` whose export is the adapter alone (its loss, data and validation are unchanged)."""

    def export(self, trainer: Trainer) -> Path:
        """Write the adapter (EMA weights if --use_ema) into --output_dir: pytorch_lora_weights.safetensors and
        lora_config.json, diffusers' layout."""
        out = Path(self.cfg.output_dir)
        path = out / LORA_WEIGHTS_NAME
        if self.accelerator.is_main_process:
            unet, text_encoder = unet_and_text_encoder(trainer.model)
            with trainer.averaged_weights():
                card = lora_card(
                    out,
                    self.cfg.pretrained_model_name_or_path,
                    {
                        **self.card_details(trainer),
                        "rank": self.cfg.rank,
                        "targets": " ".join(self.cfg.lora_targets),
                    },
                )
                path = save_lora(
                    out,
                    unet=unet,
                    text_encoder=text_encoder,
                    model_card=card,
                    save_format=self.cfg.save_format,
                )
            unet_adapter = sum(
                p.numel() for name, p in self.models.unet.named_parameters() if ".lora_" in name
            )
            unet_base = sum(
                p.numel() for name, p in self.models.unet.named_parameters() if ".lora_" not in name
            )
            logger.info(
                "saved the LoRA adapter (%s weights, %.1f kB; its UNet part has %d parameters, %.2f%% of the "
                "UNet's %d) to %s",
                "EMA" if trainer.ema else "trained",
                path.stat().st_size / 1e3,
                unet_adapter,
                100 * unet_adapter / unet_base,
                unet_base,
                path,
            )
        self.accelerator.wait_for_everyone()
        return path
