"""The web page's forms, read and checked: JSON values from the browser -> a request the model session runs.

Everything a visitor sends is checked here before it reaches the model, and a bad value raises `InputError` naming
the field and the fix; the page shows the message beside the form. Nothing here touches a file: LoRA adapters are
picked by name from the names the server listed (`Choices.adapters`), never by path, and uploaded images arrive as
`data:` URLs decoded in memory with their pixel count checked before decoding.

| field            | type / range                                                     | default (page)          |
|------------------|------------------------------------------------------------------|-------------------------|
| prompt           | text, 1 .. MAX_PROMPT_CHARS characters                            | —                       |
| negative_prompt  | text, 0 .. MAX_PROMPT_CHARS characters                            | ""                      |
| sampler          | one of `Choices.samplers`                                         | the model's             |
| steps            | int, 1 .. `Choices.max_steps` (the schedule's training steps)     | the model's             |
| guidance         | number, 0 .. MAX_GUIDANCE (<= 1: no classifier-free guidance)     | the model's             |
| seed             | int 0 .. 2**64 - num_images, or "", "random", -1 (a fresh seed)   | random                  |
| width, height    | int, multiples of `Choices.size_multiple`, up to `Choices.max_side` | the model's native size |
| num_images       | int, 1 .. `Choices.max_images`                                    | 1                       |
| karras           | true / false: Karras σ spacing (only for `Choices.karras_samplers`)   | the model's             |
| loras            | list of {"name": one of `Choices.adapters`, "scale": 0 .. MAX_LORA_SCALE} | []              |
| image, mask      | (edit panel) `data:image/png;base64,...` or JPEG, sides multiples of size_multiple | —        |
| strength         | (edit panel) number in [0, 1]                                     | 0.6                     |
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import PIL.Image

MAX_PROMPT_CHARS = 1000
MAX_GUIDANCE = 30.0
MAX_LORA_SCALE = 2.0
RANDOM_SEED_WORDS = ("", "random", "-1")
IMAGE_TYPES = ("image/png", "image/jpeg")


class InputError(ValueError):
    """A form value the server refuses; `field` names the form field, the message says what to enter instead."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Choices:
    """What the loaded model and the server offer; the page's options and the checks' bounds.

    samplers: sampler names (the registry's keys, e.g. ("ddim", "ddpm")); adapters: LoRA adapter names found in the
    adapters folder; size_multiple: image sides must be multiples of this (VAE factor × UNet down-sampling);
    max_side: largest image side in pixels; max_steps: the schedule's num_train_timesteps; max_images: images per
    request; karras_samplers: the samplers that take Karras σ.
    """

    samplers: tuple[str, ...]
    adapters: tuple[str, ...]
    size_multiple: int
    max_side: int
    max_steps: int
    karras_samplers: tuple[str, ...] = ()
    max_images: int = 8


@dataclass(frozen=True)
class TextToImage:
    """A checked text-to-image request. seed None: draw a fresh one; loras: (adapter name, scale) pairs."""

    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    guidance: float
    seed: int | None
    width: int
    height: int
    num_images: int
    loras: tuple[tuple[str, float], ...] = ()
    karras: bool = False


@dataclass(frozen=True)
class EditImage:
    """A checked edit request: the text-to-image settings plus the start image (RGB), an optional inpainting mask
    (L, the image's size; white = repaint) and SDEdit's strength in [0, 1]."""

    settings: TextToImage
    image: PIL.Image.Image
    mask: PIL.Image.Image | None
    strength: float


def parse_text_to_image(form: Mapping[str, Any], choices: Choices) -> TextToImage:
    """Check a text-to-image form (the fields of the module table); raises InputError on the first bad field."""
    if not isinstance(form, Mapping):
        raise InputError("request", "send a JSON object of the form's fields.")
    sampler = form.get("sampler")
    if sampler not in choices.samplers:
        raise InputError(
            "sampler", f"{sampler!r} is not a sampler here; pick one of {', '.join(choices.samplers)}."
        )
    num_images = _int(form, "num_images", 1, choices.max_images)
    return TextToImage(
        prompt=_text(form, "prompt", required=True),
        negative_prompt=_text(form, "negative_prompt", required=False),
        sampler=sampler,
        steps=_int(form, "steps", 1, choices.max_steps),
        guidance=_number(form, "guidance", 0.0, MAX_GUIDANCE),
        seed=_seed(form.get("seed", ""), num_images),
        width=_side(form, "width", choices),
        height=_side(form, "height", choices),
        num_images=num_images,
        loras=_loras(form.get("loras", []), choices.adapters),
        karras=_karras(form.get("karras", False), sampler, choices.karras_samplers),
    )


def parse_edit(form: Mapping[str, Any], choices: Choices) -> EditImage:
    """Check an edit form: the text-to-image fields (width and height are the uploaded image's), the image, the
    optional mask (same size) and strength. Raises InputError."""
    if not isinstance(form, Mapping):
        raise InputError("request", "send a JSON object of the form's fields.")
    image = decode_image(form.get("image"), "image", choices).convert("RGB")
    mask = form.get("mask")
    if mask:
        mask = decode_image(mask, "mask", choices).convert("L")
        if mask.size != image.size:
            raise InputError(
                "mask",
                f"the mask is {_size(mask)} but the image is {_size(image)}; paint the mask on this image.",
            )
    width, height = image.size
    settings = parse_text_to_image({**form, "width": width, "height": height}, choices)
    return EditImage(settings, image, mask or None, _number(form, "strength", 0.0, 1.0))


def decode_image(data_url: Any, field: str, choices: Choices) -> PIL.Image.Image:
    """A `data:image/png;base64,...` (or JPEG) URL -> PIL image, its sides checked against `choices` before the
    pixels are decoded (no decompression bomb gets past the header)."""
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise InputError(field, "upload a PNG or JPEG image.")
    header, _, payload = data_url.partition(",")
    kind = header.removeprefix("data:").removesuffix(";base64")
    if kind not in IMAGE_TYPES or not header.endswith(";base64"):
        raise InputError(field, f"the upload is {kind or 'of no type'}; upload a PNG or JPEG image.")
    try:
        image = PIL.Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    except (binascii.Error, PIL.UnidentifiedImageError, ValueError):
        raise InputError(field, "the upload is not a readable PNG or JPEG image.") from None
    width, height = image.size
    multiple, largest = choices.size_multiple, choices.max_side
    if width > largest or height > largest or width % multiple or height % multiple:
        raise InputError(
            field,
            f"the image is {width}x{height}; its sides must be multiples of {multiple} up to {largest} pixels "
            f"(resize it, e.g. to {min(largest, max(multiple, width // multiple * multiple))} pixels wide).",
        )
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise InputError(field, f"the image could not be decoded ({error}).") from None
    return image


def _size(image: PIL.Image.Image) -> str:
    return "{}x{}".format(*image.size)


def _text(form: Mapping[str, Any], field: str, required: bool) -> str:
    value = form.get(field, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(field, "must be text.")
    value = value.strip()
    if required and not value:
        raise InputError(field, "type what the image should show, e.g. 'a large red circle in the center'.")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(field, f"is {len(value)} characters long; keep it under {MAX_PROMPT_CHARS}.")
    return value


def _number(form: Mapping[str, Any], field: str, low: float, high: float) -> float:
    value = form.get(field)
    try:
        number = (
            float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
        )
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise InputError(field, f"{value!r} is not a number; enter one from {low:g} to {high:g}.")
    if not low <= number <= high:
        raise InputError(field, f"{number:g} is out of range; enter a number from {low:g} to {high:g}.")
    return number


def _int(form: Mapping[str, Any], field: str, low: int, high: int) -> int:
    number = _number(form, field, low, high)
    if number != int(number):
        raise InputError(field, f"{number:g} is not a whole number; enter an integer from {low} to {high}.")
    return int(number)


def _seed(value: Any, num_images: int) -> int | None:
    """The `latentdiff generate` rule (validation.check_seed), read from the page's text; None: random."""
    from latentdiff.validation import check_seed

    if value is None or (isinstance(value, str) and value.strip().lower() in RANDOM_SEED_WORDS):
        return None
    try:
        return check_seed(int(value.strip()) if isinstance(value, str) else value, num_images)
    except (TypeError, ValueError) as error:
        message = str(error) if isinstance(error, ValueError) and "out of range" in str(error) else ""
        raise InputError(
            "seed",
            message or f"{value!r} is not a whole number; enter one such as 42, or leave it empty (random).",
        ) from None


def _side(form: Mapping[str, Any], field: str, choices: Choices) -> int:
    side = _int(form, field, choices.size_multiple, choices.max_side)
    if side % choices.size_multiple:
        raise InputError(
            field,
            f"{side} is not a multiple of {choices.size_multiple} (the model's VAE factor × UNet down-sampling); "
            f"try {side // choices.size_multiple * choices.size_multiple}.",
        )
    return side


def _karras(value: Any, sampler: str, karras_samplers: tuple[str, ...]) -> bool:
    if not isinstance(value, bool):
        raise InputError("karras", "send true or false.")
    if value and sampler not in karras_samplers:
        raise InputError(
            "karras",
            f"the sampler {sampler!r} has no Karras sigmas; untick it or pick {', '.join(karras_samplers)}.",
        )
    return value


def _loras(value: Any, adapters: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list):
        raise InputError("loras", "send a list of {name, scale} objects.")
    picked: dict[str, float] = {}
    for entry in value:
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if name not in adapters:
            available = ", ".join(adapters) if adapters else "none (start the server with --lora-dir DIR)"
            raise InputError(
                "loras", f"no adapter named {name!r} in the adapters folder; available: {available}."
            )
        picked[name] = _number({"loras": entry.get("scale", 1.0)}, "loras", 0.0, MAX_LORA_SCALE)
    return tuple(picked.items())
