"""`edit_image` and `inpaint_image`: PNG in, PNG out; the library functions behind `latentdiff edit | inpaint`.

They take `generate`'s settings where they mean the same (model, negative prompt, steps, guidance, seed, number of
images, sampler, eta, LoRA adapters), check every argument and file before loading a model, and write the prompt,
seed and settings into each PNG like `generate`. The image's size is the output's; the model must take it (sides
divisible by the VAE factor × the UNet's down-sampling factor: 16 for the embedded default, 64 for SD 1.x).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from latentdiff import validation
from latentdiff.generate import _check_arguments, _check_model, _output_paths, load_pipeline, save_images

logger = logging.getLogger(__name__)


def edit_image(
    image: str | Path,
    prompt: str,
    output: str | Path,
    strength: float = 0.6,
    **settings,
) -> list[Path]:
    """Image-to-image (SDEdit): redraw `image` toward `prompt`, keeping more of it the lower `strength` is.

    Args:
        image: the PNG (or any image file PIL reads) to edit, read as RGB.
        prompt: the text the result should match.
        output: a ".png" path in an existing folder.
        strength: in [0, 1]: the share of the sampler's steps run from the image noised to match (0 keeps it,
            1 ignores it).
        settings: `_run`'s keywords (`generate`'s settings).
    """
    return _run("edit", image, None, prompt, output, strength, **settings)


def inpaint_image(
    image: str | Path,
    mask: str | Path,
    prompt: str,
    output: str | Path,
    strength: float = 1.0,
    **settings,
) -> list[Path]:
    """Inpainting: repaint the white part of `mask` in `image` from `prompt`; every other pixel stays exactly.

    Args:
        image: the image file to inpaint (RGB).
        mask: an image file of the image's size, read as grayscale: 255 (white) repaint, 0 (black) keep; any other
            value is an error (threshold an anti-aliased mask first).
        prompt: what the repainted region should show (the caption of the whole result works best).
        output: a ".png" path in an existing folder.
        strength: 1 repaints from pure noise; less keeps some of what was under the mask.
        settings: `_run`'s keywords.
    """
    return _run("inpaint", image, mask, prompt, output, strength, **settings)


def _run(
    kind: str,
    image: str | Path,
    mask: str | Path | None,
    prompt: str,
    output: str | Path,
    strength: float,
    model: str | Path | None = None,
    negative: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    sampler: str | None = None,
    karras: bool = False,
    eta: float = 0.0,
    loras: Sequence[str | Path | tuple[str | Path, float]] = (),
    grid: bool = True,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """The shared run of `edit_image` and `inpaint_image`; the settings as `latentdiff.generate.generate`'s."""
    from pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline
    from pipelines.img2img_pipeline import check_strength

    output = Path(output)
    paths = _output_paths(output, num_images, grid)
    _check_arguments(paths, steps, num_images, sampler, karras, eta, guidance, overwrite)
    check_strength(strength)
    seed = validation.check_seed(seed, num_images)
    _check_model(model, None, None, loras)
    pictures = {"image": _read_image(image, "image", "RGB")}
    if mask is not None:
        pictures["mask_image"] = _read_image(mask, "mask", "L")
    if seed is None:
        seed = validation.random_seed()
    logger.info("%s: %d image(s) for %r with seed %d", kind, num_images, prompt, seed)

    pipeline_class = LatentInpaintPipeline if kind == "inpaint" else LatentImg2ImgPipeline
    pipe = load_pipeline(pipeline_class, model, sampler, karras, loras, device, torch_dtype)
    steps, guidance = pipe.resolve_sampling(steps, guidance)
    images = pipe(
        prompt,
        **pictures,
        strength=strength,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        generator=[torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)],
        eta=eta,
    ).images
    settings = {
        "prompt": prompt,
        "negative_prompt": negative or "",
        "model": str(model or "embedded default"),
        kind: str(image) if mask is None else f"{image} (mask {mask})",
        "strength": str(strength),
    }
    settings.update(
        steps=str(steps), guidance=str(guidance), sampler=sampler or type(pipe.scheduler).__name__
    )
    settings.update(karras=str(karras), eta=str(eta))
    return save_images(images, paths, settings, seed, grid, overwrite)


def _read_image(path: str | Path, name: str, mode: str):
    """The file at `path` as a PIL image in `mode`, or a ValueError naming the argument."""
    import PIL.Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}={str(path)!r}: no such file.")
    try:
        with PIL.Image.open(path) as opened:
            return opened.convert(mode)
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{name}={str(path)!r} is not an image file PIL can read: {error}") from None
