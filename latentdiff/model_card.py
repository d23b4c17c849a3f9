"""Model cards: the `README.md` beside a saved model, with the YAML front matter the Hugging Face hub and diffusers
read (library, license, tags, base model, pipeline tag), so a folder pushed to the hub is described and findable."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

CARD_NAME = "README.md"
REPOSITORY = "latentdiff"


def model_card(
    title: str,
    description: str,
    tags: Iterable[str] = (),
    base_model: str | None = None,
    details: Mapping[str, object] | None = None,
    usage: str | None = None,
) -> str:
    """The text of a model card: front matter, a title, a description, how to use it and a table of `details`."""
    front = {
        "library_name": "diffusers",
        "license": "apache-2.0",
        "pipeline_tag": "text-to-image",
        "tags": ["text-to-image", "diffusers", REPOSITORY, *tags],
        **({"base_model": base_model} if base_model else {}),
    }
    lines = ["---", *_yaml_lines(front), "---", "", f"# {title}", "", description, ""]
    if usage:
        lines += ["## How to use", "", "```python", usage.strip(), "```", ""]
    if details:
        lines += ["## Details", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in details.items()]
        lines.append("")
    lines.append(f"Made with {REPOSITORY}, a latent text-to-image diffusion system (Apache-2.0).")
    return "\n".join(lines) + "\n"


def pipeline_card(
    directory: str | Path, details: Mapping[str, object] | None = None, description: str = ""
) -> str:
    """The card of a Stable Diffusion folder in the diffusers layout saved by `LatentPipeline.save_pretrained`."""
    usage = (
        "from latentdiff import LatentPipeline\n\n"
        f'pipe = LatentPipeline.from_pretrained("{Path(directory).name}")\n'
        'image = pipe("a prompt").images[0]\n\n'
        "# or with diffusers\n"
        "from diffusers import StableDiffusionPipeline\n\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{Path(directory).name}", safety_checker=None)'
    )
    text = (
        description
        or "A text-to-image latent diffusion model in the Stable Diffusion folder layout of diffusers."
    )
    return model_card(Path(directory).name, text, details=details, usage=usage)


def lora_card(
    directory: str | Path,
    base_model: str | None = None,
    details: Mapping[str, object] | None = None,
) -> str:
    """The card of a LoRA adapter folder (`pytorch_lora_weights.safetensors`, diffusers' layout)."""
    usage = (
        "from latentdiff import LatentPipeline\n\n"
        f'pipe = LatentPipeline.from_pretrained("{base_model or "base-model"}")\n'
        f'pipe.load_lora_weights("{Path(directory).name}", scale=1.0)\n\n'
        "# or with diffusers\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{base_model or "base-model"}")\n'
        f'pipe.load_lora_weights("{Path(directory).name}")'
    )
    return model_card(
        Path(directory).name,
        "A LoRA adapter (Hu et al. 2021) for a text-to-image latent diffusion model, in diffusers' file layout.",
        tags=["lora"],
        base_model=base_model,
        details=details,
        usage=usage,
    )


def _yaml_lines(values: Mapping[str, object]) -> list[str]:
    """YAML for a mapping of strings and lists of strings (JSON-quoted strings are valid YAML)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {json.dumps(item)}" for item in value)]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return lines
