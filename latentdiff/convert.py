"""`latentdiff convert FILE OUT`: a single-file Stable Diffusion checkpoint (the `.safetensors` the web UIs share,
keys `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`) into the diffusers folder layout that
`LatentPipeline.from_pretrained` reads.

The conversion is diffusers' own (`StableDiffusionPipeline.from_single_file`); this module checks the input, writes
the folder with a model card, and checks that this project's UNet can express the converted model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from latentdiff.model_card import CARD_NAME, pipeline_card


def convert_single_file(
    checkpoint: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    original_config: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """Convert `checkpoint` into an SD folder at `output` (which must not exist yet); returns `output`.

    Args:
        checkpoint: a single-file SD 1.x/2.x checkpoint in safetensors (pickled `.ckpt` files are refused).
        output: the folder to write (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, README.md).
        config: a diffusers folder or hub id of the same architecture, whose component configs, tokenizer and
            scheduler are used (default: the one diffusers infers from the checkpoint's keys, fetched from the hub).
        original_config: the checkpoint's original LDM YAML config (legacy conversion, when `config` is not given).
        local_files_only: never reach the hub (then `config` must be a local folder).
    """
    from diffusers import StableDiffusionPipeline

    from latentdiff.models.unet import UNetConfig

    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint={str(checkpoint)!r}: no such file.")
    if checkpoint.suffix != ".safetensors":
        raise ValueError(
            f"checkpoint={str(checkpoint)!r} is not a .safetensors file; pickled checkpoints (.ckpt, .pt) can run code "
            "when loaded and are not converted here: get the .safetensors version of the model."
        )
    if output.exists():
        raise FileExistsError(f"output={str(output)!r} already exists; pass a new folder name.")
    if config is not None and not Path(config).is_dir() and local_files_only:
        raise ValueError(
            f"config={str(config)!r} is not a local folder, and local_files_only forbids the hub."
        )
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=None if config is None else str(config),
        original_config=None if original_config is None else str(original_config),
        local_files_only=local_files_only,
        safety_checker=None,
        requires_safety_checker=False,
    )
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.is_dir() else None) as tmp:
        folder = Path(tmp) / output.name
        pipe.save_pretrained(folder, safe_serialization=True)
        try:
            UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
        except ValueError as error:
            raise ValueError(f"{checkpoint} converts to a UNet this project cannot run: {error}") from error
        details = {
            "converted from": checkpoint.name,
            "converter": "diffusers StableDiffusionPipeline.from_single_file",
        }
        (folder / CARD_NAME).write_text(pipeline_card(output, details))
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), output)
    return output
