"""`generate`: prompt -> PNG files; the library function behind `latentdiff generate`.

It checks every argument (and that the output folder exists) before loading a model, seeds one generator per image
(image i of a batch is the image a single run with seed + i gives), and writes the prompt, seed and settings into
each PNG's text chunks so any image can be made again.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")


def generate(
    prompt: str,
    output: str | Path,
    model: str | Path | None = None,
    negative: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
    sampler: str | None = None,
    eta: float = 0.0,
    loras: Sequence[str | Path | tuple[str | Path, float]] = (),
    grid: bool = True,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
) -> list[Path]:
    """Generate images for one prompt and save them as PNG.

    Args:
        prompt: the text.
        output: a file path ending in ".png"; its folder must exist.
        model: a diffusers SD folder or hub id; default: the embedded default model.
        negative: negative prompt (default: the empty prompt).
        steps: sampler steps; guidance: classifier-free guidance scale (<= 1: none); sampler: "ddim" or "ddpm"
            (both read the model's scheduler config). Each defaults to the model folder's sampling settings
            (`sampling_settings.json`), else to diffusers' defaults (50 steps, guidance 7.5, the folder's sampler).
        seed: seed of the first image (image i uses seed + i); default: a fresh random seed, logged and saved in
            the PNGs.
        num_images: how many images; with several, `grid=True` writes one grid at `output`, `grid=False` writes
            numbered files `<stem>-1.png ... <stem>-N.png` beside it.
        height, width: pixels (default: the model's native size).
        eta: DDIM's η.
        loras: LoRA adapters to load, as paths or (path, scale) pairs (needs `LatentPipeline.load_lora_weights`).
        device, torch_dtype: where and in which dtype to run (default CPU, float32).

    Returns:
        The paths written.
    """
    from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
    from pipelines.latent_pipeline import DEFAULT_MODEL_DIR, LatentPipeline

    output = Path(output)
    _check_arguments(output, steps, num_images, sampler, eta)
    if model is None and not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise ValueError(
            f"model=None means the embedded default model ({DEFAULT_MODEL_DIR}), which this installation does not "
            "have yet; pass model='path/to/sd-folder' or a hub id (CLI: --model PATH_OR_ID)."
        )
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    logger.info("generating %d image(s) for %r with seed %d", num_images, prompt, seed)

    pipe = (
        LatentPipeline() if model is None else LatentPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    )
    pipe.to(device=device, dtype=torch_dtype)
    if sampler is not None:  # an explicit sampler wins over the one the model carries
        sampler_class = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
        if type(pipe.scheduler) is not sampler_class:
            pipe.scheduler = sampler_class.from_config(pipe.scheduler.config)
    steps, guidance = pipe.resolve_sampling(steps, guidance)
    for lora in loras:
        path, scale = lora if isinstance(lora, tuple) else (lora, 1.0)
        if not hasattr(pipe, "load_lora_weights"):
            raise NotImplementedError("loras: this LatentPipeline has no load_lora_weights yet.")
        pipe.load_lora_weights(path, scale=scale)

    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
    images = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        height=height,
        width=width,
        generator=generators,
        eta=eta,
    ).images

    settings = {
        "prompt": prompt,
        "negative_prompt": negative or "",
        "model": str(model or "embedded default"),
    }
    sampler = sampler or type(pipe.scheduler).__name__
    settings.update(steps=str(steps), guidance=str(guidance), sampler=sampler, eta=str(eta))
    if num_images == 1 or grid:
        image = images[0] if num_images == 1 else image_grid(images)
        seeds = str(seed) if num_images == 1 else f"{seed}..{seed + num_images - 1} (row by row)"
        image.save(output, pnginfo=_png_text({**settings, "seed": seeds}))
        return [output]
    paths = []
    for i, image in enumerate(images):
        path = output.with_name(f"{output.stem}-{i + 1}{output.suffix}")
        image.save(path, pnginfo=_png_text({**settings, "seed": str(seed + i)}))
        paths.append(path)
    return paths


def image_grid(images: list) -> object:
    """Tile PIL images of one size into a near-square grid (columns = ceil(sqrt(n))), row by row."""
    import PIL.Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _check_arguments(
    output: Path, steps: int | None, num_images: int, sampler: str | None, eta: float
) -> None:
    """Everything that can be checked without a model, so a typo fails in a second, not after loading."""
    if output.is_dir():
        raise ValueError(
            f"output={str(output)!r} is a folder; pass a file name in it, e.g. {str(output / 'out.png')!r}."
        )
    if not output.parent.is_dir():
        raise ValueError(
            f"output={str(output)!r}: the folder {str(output.parent)!r} does not exist; create it first or pick "
            "another path."
        )
    if output.suffix.lower() != ".png":
        raise ValueError(
            f"output={str(output)!r} must be a .png file name, e.g. {str(output.with_suffix('.png'))!r}."
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} must be an int >= 1.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}.")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0.")


def _png_text(settings: dict[str, str]):
    """PNG text chunks holding the settings that made an image."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, value)
    return info
