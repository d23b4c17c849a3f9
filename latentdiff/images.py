"""Image files: tiling images into a grid, and the PNG text chunks that carry an image's recipe between tools."""

from __future__ import annotations

import math
from collections.abc import Mapping

import PIL.Image
from PIL.PngImagePlugin import PngInfo

# Stable Diffusion web UI sampler names for this project's samplers.
# This project's sampler names (and diffusers' class names) as the Stable Diffusion web UIs write them.
WEBUI_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
}


def image_grid(images: list[PIL.Image.Image], columns: int | None = None) -> PIL.Image.Image:
    """Tile PIL images of one size row by row; `columns` default: ceil(sqrt(n)), a near-square grid."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def webui_parameters(settings: Mapping[str, str]) -> str:
    """The `parameters` text of the Stable Diffusion web UIs (AUTOMATIC1111, Forge, ComfyUI's readers):

        <prompt>
        Negative prompt: <negative prompt>
        Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: default

    from this project's settings keys (prompt, negative_prompt, steps, sampler, guidance, seed, size, model).
    """
    lines = [settings.get("prompt", "")]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings.get("steps"),
        "Sampler": webui_sampler_name(settings.get("sampler"), settings.get("karras") == "True"),
        "CFG scale": settings.get("guidance"),
        "Seed": settings.get("seed"),
        "Size": settings.get("size"),
        "Model": settings.get("model"),
        "Eta": settings.get("eta"),
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value not in (None, "")))
    return "\n".join(lines)


def webui_sampler_name(sampler: str | None, karras: bool = False) -> str | None:
    """A sampler's name as the web UIs write it ("DPM++ 2M Karras"); unknown names pass through unchanged."""
    if not sampler:
        return sampler
    name = WEBUI_SAMPLER_NAMES.get(sampler, sampler)
    return f"{name} Karras" if karras else name


def parse_webui_parameters(text: str) -> dict[str, str]:
    """The fields of a web UI `parameters` text: "prompt", "negative_prompt" and each "Key: value" of its last line."""
    *head, last = text.split("\n")
    negative = [line for line in head if line.startswith("Negative prompt: ")]
    out = {
        "prompt": "\n".join(line for line in head if not line.startswith("Negative prompt: ")),
        "negative_prompt": negative[0].removeprefix("Negative prompt: ") if negative else "",
    }
    for item in last.split(", "):
        key, _, value = item.partition(": ")
        out[key] = value
    return out


def png_text(settings: Mapping[str, str]) -> PngInfo:
    """PNG text chunks: one per setting (this project's keys), plus the web UIs' `parameters` chunk."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, value)
    info.add_text("parameters", webui_parameters(settings))
    return info
