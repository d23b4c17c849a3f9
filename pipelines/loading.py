"""Loading a Stable Diffusion folder in the diffusers layout into the five parts `LatentPipeline` takes.

`model_dir` finds the folder (a local path, or a hub snapshot of "owner/name"); `load_parts` checks its layout and
files, then loads this project's UNet and sampler beside diffusers' `AutoencoderKL` and transformers' CLIP text
encoder and tokenizer, with the sampling settings the folder carries (`latentdiff.sampling_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from latentdiff import validation
from latentdiff.hub import SUBFOLDERS, local_folder
from latentdiff.models.unet import ConditionalUNet
from latentdiff.sampling_settings import SETTINGS_FILE, read_sampling_settings
from latentdiff.schedulers.registry import SAMPLERS, sampler_from_config, scheduler_from_folder_config


def model_dir(path_or_hub_id: str | Path) -> Path:
    """A local folder, or the hub snapshot of `path_or_hub_id` when no local folder has that name."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"path_or_hub_id={str(path_or_hub_id)!r} is a file; pass the model folder that holds it."
        )
    text = str(path_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"path_or_hub_id={text!r}: no such folder (and not a hub id of the form owner/name)."
        )
    try:
        return local_folder(text)
    except Exception as error:  # offline, unknown id, gated repo: say what was tried
        raise FileNotFoundError(
            f"path_or_hub_id={text!r} is not a local folder and could not be fetched from the Hugging Face hub: "
            f"{error}"
        ) from error


def load_parts(directory: Path, torch_dtype: torch.dtype | None = None, scheduler=None) -> dict[str, Any]:
    """The five parts of the SD folder `directory` and its sampling settings, as `LatentPipeline(**parts)` takes
    them; the sampler is the one its sampling settings name, built from its scheduler config."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    missing = [name + "/" for name in SUBFOLDERS if not (directory / name).is_dir()]
    if not (directory / "scheduler" / "scheduler_config.json").is_file() and "scheduler/" not in missing:
        missing.append("scheduler/scheduler_config.json")
    if scheduler is not None:
        missing = [name for name in missing if not name.startswith("scheduler/")]
    if not (directory / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise ValueError(
            f"{directory} is not a Stable Diffusion folder in the diffusers layout: it lacks {', '.join(missing)} "
            f"(expected model_index.json and {', '.join(name + '/' for name in SUBFOLDERS)})."
        )
    dtype = torch.float32 if torch_dtype is None else torch_dtype
    for name in ("unet", "vae", "text_encoder"):  # a truncated file is named here, not deep inside a loader
        validation.check_safetensors_folder(directory / name)
    settings = read_sampling_settings(directory)
    if settings.sampler is not None and settings.sampler not in SAMPLERS:
        raise ValueError(
            f"{directory / SETTINGS_FILE}: sampler={settings.sampler!r} is not one of {list(SAMPLERS)}; "
            "fix the file or delete it to use diffusers' defaults."
        )
    if scheduler is None:
        config_file = directory / "scheduler" / "scheduler_config.json"
        scheduler = scheduler_from_folder_config(validation.read_json_file(config_file))
        if settings.sampler is not None:
            scheduler = sampler_from_config(settings.sampler, scheduler.config)
    return {
        "sampling_settings": settings,
        "unet": ConditionalUNet.from_pretrained(directory, subfolder="unet", torch_dtype=dtype),
        "scheduler": scheduler,
        "vae": AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=dtype),
        "text_encoder": load_text_encoder(directory / "text_encoder", dtype),
        "tokenizer": CLIPTokenizer.from_pretrained(directory / "tokenizer"),
    }


def load_text_encoder(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' `CLIPTextModel` of `folder` (config.json and model.safetensors, as its save_pretrained writes),
    in eval mode: built from its config on the meta device and given the stored tensors, cast to `dtype`. This skips
    transformers' loader, whose first call in a process builds its table of every model type's weight renamings
    (BENCHMARKS.md, section 5). A folder in another form (sharded, pickled, or weights under other names, as older
    transformers wrote them) goes through `CLIPTextModel.from_pretrained`, which reads them all."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = folder / "model.safetensors"
    if weights.is_file():
        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
        expected = set(model.state_dict())
        state = {name: t.to(dtype) for name, t in load_file(weights).items()}
        # the buffers no checkpoint holds: CLIP's embeddings' positions 0 .. max_position_embeddings − 1
        unsaved = [name for name, _ in model.named_buffers() if name not in expected]
        if set(state) == expected and len(unsaved) == 1 and unsaved[0].endswith("embeddings.position_ids"):
            model.load_state_dict(state, strict=True, assign=True)
            embeddings = model.get_submodule(unsaved[0].rsplit(".", 1)[0])
            embeddings.position_ids = torch.arange(model.config.max_position_embeddings).expand((1, -1))
            return model.eval()
    # loaded as stored, then cast: works with transformers 4.x (torch_dtype=) and 5.x (dtype=) alike
    return CLIPTextModel.from_pretrained(folder).to(dtype).eval()
