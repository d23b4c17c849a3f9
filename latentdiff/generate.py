"""`generate`: prompt -> PNG files; the library function behind `latentdiff generate`.

It checks every argument (that the output folder exists and is writable, that no existing file would be replaced,
the seed, the size against the model's config files, the LoRA files and scales) before loading a model, seeds one
generator per image (image i of a batch is the image a single run with seed + i gives), and writes the prompt, seed
and settings into each PNG's text chunks (and the web UIs' `parameters` chunk) so any image can be made again. An existing file is never replaced unless
`overwrite=True` (CLI: `--overwrite`): the run is refused before any work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from latentdiff import validation
from latentdiff.images import image_grid, png_text

logger = logging.getLogger(__name__)


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
    karras: bool = False,
    eta: float = 0.0,
    loras: Sequence[str | Path | tuple[str | Path, float]] = (),
    grid: bool = True,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    classifier: str | Path | None = None,
    class_labels: str | None = None,
    classifier_scale: float = 5.0,
    control: str | Path | None = None,
    controlnet: str | Path | None = None,
    control_scale: float = 1.0,
    compile: bool = False,
) -> list[Path]:
    """Generate images for one prompt and save them as PNG.

    Args:
        prompt: the text.
        output: a file path ending in ".png"; its folder must exist, and an existing file is refused unless
            overwrite.
        model: a diffusers SD folder or hub id; default: the embedded default model.
        negative: negative prompt (default: the empty prompt).
        steps: sampler steps; guidance: classifier-free guidance scale (<= 1: none). Each (and the sampler) defaults
            to the model folder's sampling settings (`sampling_settings.json`), else to diffusers' defaults (50
            steps, guidance 7.5, the folder's sampler).
        seed: seed of the first image (image i uses seed + i), 0 .. 2**64 - num_images; None or -1: a fresh random
            seed, logged and saved in the PNGs.
        num_images: how many images; with several, `grid=True` writes one grid at `output`, `grid=False` writes
            numbered files `<stem>-1.png ... <stem>-N.png` beside it.
        height, width: pixels (default: the model's native size).
        sampler: one of ddim, ddpm, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde (each built on the model's
            scheduler config: its training schedule), or None for the model's own sampler; eta: DDIM's η.
        karras: space the noise levels by Karras et al. 2022 (euler, heun, dpmpp_2m, dpmpp_2m_sde).
        loras: LoRA adapters to load, as paths or (path, scale) pairs (needs `LatentPipeline.load_lora_weights`).
        device, torch_dtype: where and in which dtype to run (default CPU, float32).
        overwrite: replace existing files; without it an existing output file is refused before any work.
        classifier: a folder written by train/train_classifier.py: classifier guidance (Dhariwal & Nichol 2021)
            towards `class_labels` with scale `classifier_scale`; default with class_labels and the embedded model:
            its own layout classifier (latentdiff/assets/classifier). A stochastic sampler (ddpm) follows it best.
        class_labels: the target, as `read_class_labels` reads it: a shapes layout ("a red circle in the top left")
            for a layout classifier, or "name=index" pairs ("color=2 shape=0").
        control, controlnet: a condition image file and the ControlNet folder it is for (both or neither); the
            image size defaults to the condition's. control_scale: the ControlNet's weight (0: off).
        compile: `torch.compile` the UNet as one graph (fullgraph=True) before sampling: each step runs the
            compiled graph, after a first step that compiles it (tens of seconds on a GPU, minutes on a CPU).

    Returns:
        The paths written.
    """
    from latentdiff.default_model import DEFAULT_CLASSIFIER_DIR
    from pipelines.latent_pipeline import LatentPipeline

    output = Path(output)
    paths = _output_paths(output, num_images, grid)
    _check_arguments(paths, steps, num_images, sampler, karras, eta, guidance, overwrite)
    seed = validation.check_seed(seed, num_images)
    _check_model(model, height, width, loras)
    if (control is None) != (controlnet is None):
        raise ValueError(
            "control (the condition image) and controlnet (the ControlNet folder) go together: pass both "
            "(CLI: --control IMAGE --controlnet PATH) or neither."
        )
    if control is not None and not Path(control).is_file():
        raise ValueError(f"control={str(control)!r} is not an image file.")
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
    if seed is None:
        seed = validation.random_seed()
    logger.info("generating %d image(s) for %r with seed %d", num_images, prompt, seed)

    pipe = load_pipeline(LatentPipeline, model, sampler, karras, loras, device, torch_dtype)
    condition = {}
    if controlnet is not None:
        from latentdiff.data.dataset import read_image
        from pipelines.controlnet import ControlNetPipeline

        parts = (pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)
        pipe = ControlNetPipeline(*parts, controlnet=controlnet, sampling_settings=pipe.sampling_settings)
        pipe.to(device=device, dtype=torch_dtype)
        condition = {"image": read_image(control), "controlnet_conditioning_scale": control_scale}
    if compile:
        pipe.unet.compile(fullgraph=True)  # in place: the pipeline keeps the same module
    steps, guidance = pipe.resolve_sampling(steps, guidance)

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
        **condition,
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
    if controlnet is not None:
        settings.update(control=str(control), controlnet=str(controlnet), control_scale=str(control_scale))
    return save_images(images, paths, settings, seed, grid, overwrite)


def save_images(
    images: list, paths: list[Path], settings: dict[str, str], seed: int, grid: bool, overwrite: bool
) -> list[Path]:
    """Write images made with seeds seed, seed + 1, ...: one PNG at paths[0] (a grid of several when `grid`) or
    one file per image (`_output_paths`); each PNG carries `settings`, its size and its seed(s) as text chunks.
    Without `overwrite` an existing file is never replaced."""
    settings = {**settings, "size": "{}x{}".format(*images[0].size)}
    if len(images) == 1 or grid:
        image = images[0] if len(images) == 1 else image_grid(images)
        seeds = str(seed) if len(images) == 1 else f"{seed}..{seed + len(images) - 1} (row by row)"
        _save_png(image, paths[0], {**settings, "seed": seeds}, overwrite)
        return paths[:1]
    for i, (image, path) in enumerate(zip(images, paths)):
        _save_png(image, path, {**settings, "seed": str(seed + i)}, overwrite)
    return paths


def _output_paths(output: Path, num_images: int, grid: bool) -> list[Path]:
    """The files a call writes: `output`, or `<stem>-1.png ... <stem>-N.png` beside it for N separate images."""
    if num_images == 1 or grid or not isinstance(num_images, int):
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(num_images)]


def load_pipeline(
    pipeline_class,
    model: str | Path | None,
    sampler: str | None,
    karras: bool,
    loras: Sequence[str | Path | tuple[str | Path, float]],
    device: str | torch.device,
    torch_dtype: torch.dtype | None,
):
    """`pipeline_class` (LatentPipeline or an editing pipeline) over `model` (None: the embedded default), with
    the sampler (None: the model's own) and LoRA adapters asked for, on `device` in `torch_dtype`."""
    from latentdiff.schedulers.registry import choose_sampler

    pipe = (
        pipeline_class() if model is None else pipeline_class.from_pretrained(model, torch_dtype=torch_dtype)
    )
    pipe.to(device=device, dtype=torch_dtype)
    pipe.scheduler = choose_sampler(pipe.scheduler, sampler, karras)
    for lora in loras:
        path, scale = lora if isinstance(lora, tuple) else (lora, 1.0)
        pipe.load_lora_weights(path, scale=scale)
    return pipe


def _check_model(
    model: str | Path | None,
    height: int | None,
    width: int | None,
    loras: Sequence[str | Path | tuple[str | Path, float]],
) -> None:
    """The model is there (the embedded default, a folder or a hub id), and the size and LoRA files suit it."""
    from latentdiff.default_model import DEFAULT_MODEL_DIR

    if model is None and not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise ValueError(
            f"model=None means the embedded default model ({DEFAULT_MODEL_DIR}), which this installation does not "
            "have yet; pass model='path/to/sd-folder' or a hub id (CLI: --model PATH_OR_ID)."
        )
    _check_size_and_loras(DEFAULT_MODEL_DIR if model is None else Path(model), height, width, loras)


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
    paths: list[Path],
    steps: int | None,
    num_images: int,
    sampler: str | None,
    karras: bool,
    eta: float,
    guidance: float | None,
    overwrite: bool,
) -> None:
    """Everything that can be checked without a model, so a typo fails in a second, not after loading."""
    from latentdiff.schedulers.registry import check_sampler

    for path in paths:
        validation.check_output_file(path, overwrite)
    if paths[0].suffix.lower() != ".png":
        raise ValueError(
            f"output={str(paths[0])!r} must be a .png file name, e.g. {str(paths[0].with_suffix('.png'))!r}."
        )
    if guidance is not None:
        validation.check_finite("guidance", guidance, "5.0")
    validation.check_finite("eta", eta, "0.0")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} must be an int >= 1.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if sampler is not None:
        check_sampler(sampler, karras)
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0.")


def _check_size_and_loras(
    model_dir: Path,
    height: int | None,
    width: int | None,
    loras: Sequence[str | Path | tuple[str | Path, float]],
) -> None:
    """Checks that need the model's config files or the LoRA files but no weights: the image size (for a local
    model folder; a hub model is checked by the pipeline once loaded), each LoRA file and scale."""
    from latentdiff.lora import find_lora_file

    geometry = _native_geometry(model_dir)
    if geometry is not None and (height is not None or width is not None):
        native_side, multiple = geometry
        validation.check_image_size(height or native_side, width or native_side, native_side, multiple)
    for lora in loras:
        path, scale = lora if isinstance(lora, tuple) else (lora, 1.0)
        validation.check_finite(f"the scale of LoRA {str(path)!r}", scale, "0.8")
        validation.check_safetensors_file(find_lora_file(path))


def _native_geometry(model_dir: Path) -> tuple[int, int] | None:
    """(native image side, the multiple sides must be) from a local model folder's UNet and VAE config.json; None
    when the folder or files are not there (a hub id)."""
    from latentdiff.conditioning import vae_scale_factor

    unet_file, vae_file = model_dir / "unet" / "config.json", model_dir / "vae" / "config.json"
    if not (unet_file.is_file() and vae_file.is_file()):
        return None
    try:
        unet, vae = json.loads(unet_file.read_text()), json.loads(vae_file.read_text())
        vae_factor = vae_scale_factor(vae)
        return unet["sample_size"] * vae_factor, vae_factor * 2 ** (len(unet["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError):
        return None  # a broken config is reported, naming its file, when the model loads


def _save_png(image, path: Path, settings: dict[str, str], overwrite: bool) -> None:
    """Write `image` as PNG with `settings` in text chunks; without overwrite, never replace a file (mode "x")."""
    with open(path, "wb" if overwrite else "xb") as file:
        image.save(file, format="PNG", pnginfo=png_text(settings))
