"""`generate`: prompt -> PNG files; the library function behind `latentdiff generate`.

It checks every argument (and that the output folder exists) before loading a model, seeds one generator per image
(image i of a batch is the image a single run with seed + i gives), and writes the prompt, seed and settings into
each PNG's text chunks (and in the web UIs' `parameters` chunk) so any image can be made again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from latentdiff.images import image_grid, png_text

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")


def generate(
    prompt: str,
    output: str | Path,
    model: str | Path | None = None,
    negative: str | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int | None = None,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    loras: Sequence[str | Path | tuple[str | Path, float]] = (),
    grid: bool = True,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    control: str | Path | None = None,
    controlnet: str | Path | None = None,
    control_scale: float = 1.0,
) -> list[Path]:
    """Generate images for one prompt and save them as PNG.

    Args:
        prompt: the text.
        output: a file path ending in ".png"; its folder must exist.
        model: a diffusers SD folder or hub id; default: the embedded default model.
        negative: negative prompt (default: the empty prompt).
        steps: sampler steps; guidance: classifier-free guidance scale (<= 1: none).
        seed: seed of the first image (image i uses seed + i); default: a fresh random seed, logged and saved in
            the PNGs.
        num_images: how many images; with several, `grid=True` writes one grid at `output`, `grid=False` writes
            numbered files `<stem>-1.png ... <stem>-N.png` beside it.
        height, width: pixels (default: the model's native size).
        sampler: "ddim" or "ddpm" (both read the model's scheduler config); eta: DDIM's η.
        loras: LoRA adapters to load, as paths or (path, scale) pairs.
        device, torch_dtype: where and in which dtype to run (default CPU, float32).
        control, controlnet: a condition image file and the ControlNet folder it is for (both or neither); the
            image size defaults to the condition's. control_scale: the ControlNet's weight (0: off).

    Returns:
        The paths written.
    """
    from latentdiff.default_model import DEFAULT_MODEL_DIR
    from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
    from pipelines.latent_pipeline import LatentPipeline

    output = Path(output)
    _check_arguments(output, steps, num_images, sampler, eta)
    if (control is None) != (controlnet is None):
        raise ValueError(
            "control (the condition image) and controlnet (the ControlNet folder) go together: pass both "
            "(CLI: --control IMAGE --controlnet PATH) or neither."
        )
    if control is not None and not Path(control).is_file():
        raise ValueError(f"control={str(control)!r} is not an image file.")
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
    condition = {}
    if controlnet is not None:
        from latentdiff.data.dataset import read_image
        from pipelines.controlnet import ControlNetPipeline

        parts = (pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)
        pipe = ControlNetPipeline(*parts, controlnet=controlnet)
        condition = {"image": read_image(control), "controlnet_conditioning_scale": control_scale}
    pipe.to(device=device, dtype=torch_dtype)
    sampler_class = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    if type(pipe.scheduler) is not sampler_class:
        pipe.scheduler = sampler_class.from_config(pipe.scheduler.config)
    for lora in loras:
        path, scale = lora if isinstance(lora, tuple) else (lora, 1.0)
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
        **condition,
    ).images

    settings = {
        "prompt": prompt,
        "negative_prompt": negative or "",
        "model": str(model or "embedded default"),
    }
    settings.update(steps=str(steps), guidance=str(guidance), sampler=sampler, eta=str(eta))
    if controlnet is not None:
        settings.update(control=str(control), controlnet=str(controlnet), control_scale=str(control_scale))
    settings["size"] = "{}x{}".format(*images[0].size)
    if num_images == 1 or grid:
        image = images[0] if num_images == 1 else image_grid(images)
        seeds = str(seed) if num_images == 1 else f"{seed}..{seed + num_images - 1} (row by row)"
        image.save(output, pnginfo=png_text({**settings, "seed": seeds}))
        return [output]
    paths = []
    for i, image in enumerate(images):
        path = output.with_name(f"{output.stem}-{i + 1}{output.suffix}")
        image.save(path, pnginfo=png_text({**settings, "seed": str(seed + i)}))
        paths.append(path)
    return paths


def _check_arguments(output: Path, steps: int, num_images: int, sampler: str, eta: float) -> None:
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
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}.")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0.")
