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
    sampler: str | None = None,
    karras: bool = False,
    eta: float = 0.0,
    loras: Sequence[str | Path | tuple[str | Path, float]] = (),
    grid: bool = True,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    classifier: str | Path | None = None,
    class_labels: str | None = None,
    classifier_scale: float = 5.0,
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
        sampler: one of ddim, ddpm, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde (each built on the model's
            scheduler config: its training schedule), or None for the model's own sampler; eta: DDIM's η.
        karras: space the noise levels by Karras et al. 2022 (euler, heun, dpmpp_2m, dpmpp_2m_sde).
        loras: LoRA adapters to load, as paths or (path, scale) pairs (needs `LatentPipeline.load_lora_weights`).
        device, torch_dtype: where and in which dtype to run (default CPU, float32).
        classifier: a folder written by train/train_classifier.py: classifier guidance (Dhariwal & Nichol 2021)
            towards `class_labels` with scale `classifier_scale`; default with class_labels and the embedded model:
            its own layout classifier (latentdiff/assets/classifier). A stochastic sampler (ddpm) follows it best.
        class_labels: the target, as `read_class_labels` reads it: a shapes layout ("a red circle in the top left")
            for a layout classifier, or "name=index" pairs ("color=2 shape=0").

    Returns:
        The paths written.
    """
    from latentdiff.default_model import DEFAULT_CLASSIFIER_DIR, DEFAULT_MODEL_DIR
    from latentdiff.schedulers.registry import choose_sampler
    from pipelines.latent_pipeline import LatentPipeline

    output = Path(output)
    _check_arguments(output, steps, num_images, sampler, karras, eta)
    if classifier is None and class_labels is not None and model is None:
        classifier = DEFAULT_CLASSIFIER_DIR  # the embedded default's own
    if (classifier is None) != (class_labels is None):
        raise ValueError(
            "classifier guidance needs class_labels (--class-labels ...) and, for a model other than the embedded "
            "default, a classifier trained for it (--classifier FOLDER)."
        )
    guidance_kwargs = {}
    if classifier is not None:
        from latentdiff.models.classifier import NoiseAwareClassifier

        guide = NoiseAwareClassifier.from_pretrained(classifier).to(device)
        guidance_kwargs = dict(
            classifier=guide,
            class_labels=read_class_labels(class_labels),
            classifier_guidance_scale=classifier_scale,
        )
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
    pipe.scheduler = choose_sampler(pipe.scheduler, sampler, karras)
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
        **guidance_kwargs,
    ).images

    settings = {
        "prompt": prompt,
        "negative_prompt": negative or "",
        "model": str(model or "embedded default"),
    }
    settings.update(
        steps=str(steps), guidance=str(guidance), sampler=sampler or type(pipe.scheduler).__name__
    )
    settings.update(karras=str(karras), eta=str(eta))
    if classifier is not None:
        settings.update(
            classifier=str(classifier), class_labels=class_labels, classifier_scale=str(classifier_scale)
        )
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


def read_class_labels(text: str) -> dict[str, int]:
    """Target labels of classifier guidance from text: "name=index" pairs separated by spaces or commas
    ("color=2 shape=0"), or else a shapes-world layout caption read by `latentdiff.data.scene_labels` ("a red circle
    in the top left": that cell holds a red circle, every other cell is empty)."""
    from latentdiff.data.scene_labels import caption_labels

    if "=" not in text:
        try:
            return caption_labels(text)
        except ValueError as error:
            raise ValueError(f"class_labels={text!r}: {error}") from error
    labels = {}
    for pair in text.replace(",", " ").split():
        name, _, index = pair.partition("=")
        if not name or not index.isdigit():
            raise ValueError(f"class_labels={text!r}: {pair!r} is not name=index, e.g. 'color=2 shape=0'.")
        labels[name] = int(index)
    return labels


def _check_arguments(
    output: Path, steps: int, num_images: int, sampler: str | None, karras: bool, eta: float
) -> None:
    """Everything that can be checked without a model, so a typo fails in a second, not after loading."""
    from latentdiff.schedulers.registry import check_sampler

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
    if sampler is not None:
        check_sampler(sampler, karras)
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0.")
