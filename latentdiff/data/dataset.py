"""Image–caption datasets for training: loading through `datasets`, and the per-sample transform.

A dataset is a hub name (or a folder `datasets` can read) or a local imagefolder: images plus a `metadata.jsonl`
whose lines hold a `file_name` and a caption. Each sample becomes

    pixel_values  (3, R, R) float32 in [-1, 1]  (R = resolution): RGB; grayscale, palette and RGBA images are
                  converted (transparent pixels composited over white), EXIF rotation applied
    caption       str: one caption; a list of captions yields one chosen at random

Every random choice of a sample (which caption, flip or not, where to crop) is drawn from a generator seeded by
(seed, epoch, index), so a sample looks the same whichever process or data-loader worker reads it, and a resumed run
sees exactly what an uninterrupted one would. Samples are addressed by the key (epoch, index).

An image that cannot be read is never fatal: the sample is replaced by the next readable one (index + 1, …) and the
unreadable index is reported in the sample's `skipped` list, for the training loop to count and log.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

SampleKey = tuple[int, int]  # (epoch, index)


def load_image_caption_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
):
    """Load a `datasets.Dataset`: `dataset_name` (hub name or a folder) or else the imagefolder `train_data_dir`.

    Images are not decoded here (the image column is switched to `decode=False`); `TextImageDataset` decodes them,
    so that an unreadable file can be skipped instead of raising inside `datasets`.
    """
    import datasets

    if dataset_name is None and train_data_dir is None:
        raise ValueError(
            "no data: give dataset_name (hub name or folder) or train_data_dir (an imagefolder)."
        )
    if dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise ValueError(f"train_data_dir={str(folder)!r} is not a folder.")
        loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"the dataset has no {split!r} split; it has {sorted(loaded)}.")
        loaded = loaded[split]
    return loaded


def check_columns(dataset, image_column: str, caption_column: str) -> None:
    """Raise a ValueError naming the flag when a column is missing or holds the wrong type."""
    import datasets

    columns = list(dataset.column_names)
    for flag, name in (("image_column", image_column), ("caption_column", caption_column)):
        if name not in columns:
            raise ValueError(
                f"--{flag}={name!r} is not a column of the dataset; its columns are {columns}. Pass "
                f"--{flag} with one of them (an imagefolder's captions are the metadata.jsonl keys other than "
                "file_name)."
            )
    image_feature = dataset.features[image_column]
    if not isinstance(image_feature, datasets.Image) and not _is_string(image_feature):
        raise ValueError(
            f"--image_column={image_column!r} holds {image_feature}, not images (or image paths)."
        )
    caption_feature = dataset.features[caption_column]
    inner = getattr(caption_feature, "feature", None)
    if not _is_string(caption_feature) and not (inner is not None and _is_string(inner)):
        raise ValueError(
            f"--caption_column={caption_column!r} holds {caption_feature}; captions must be strings or lists of "
            "strings."
        )


def _is_string(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def without_image_decoding(dataset, image_column: str):
    """The dataset with its image column returning {'bytes', 'path'} (or a path string) instead of PIL images."""
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def dataset_fingerprint(dataset, image_column: str, caption_column: str) -> str:
    """A hash of what the data is: every caption and every image (its bytes, or path + size + modification time).

    `dataset` must not decode images (see `without_image_decoding`). Changing, adding or removing an image or a
    caption changes the fingerprint.
    """
    digest = hashlib.sha256()
    for row in dataset.select_columns([image_column, caption_column]):
        image = row[image_column]
        if isinstance(image, dict) and image.get("bytes") is not None:
            digest.update(hashlib.sha256(image["bytes"]).digest())
        else:
            path = image["path"] if isinstance(image, dict) else image
            try:
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except (OSError, TypeError):
                digest.update(f"{path}|missing".encode())
        digest.update(json.dumps(row[caption_column]).encode())
    return digest.hexdigest()[:16]


# ---- decoding and transforms -------------------------------------------------------------------------------------


def read_image(value: Any) -> Image.Image:
    """A PIL RGB image from a `datasets` image value ({'bytes', 'path'}, a path, or a PIL image).

    Grayscale, 16-bit, CMYK and palette images are converted to RGB; images with transparency are composited over
    white; the EXIF orientation is applied. Raises (OSError, ValueError, …) when the file cannot be decoded.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        path = value["path"] if isinstance(value, dict) else value
        if path is None:
            raise ValueError("the image has neither bytes nor a path")
        image = Image.open(path)
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in (
        "I;16",
        "I;16B",
        "I;16L",
        "I",
    ):  # 16/32-bit grayscale: scale to 8 bits before converting
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


@dataclass(frozen=True)
class SampleChoices:
    """The random choices for one sample in one epoch (drawn in this order, always all of them)."""

    caption_index: int  # which caption of a list
    flip: bool  # mirror horizontally (only if random_flip)
    crop_x: float  # random-crop offset as a fraction of the free room, in [0, 1)
    crop_y: float

    @classmethod
    def draw(cls, seed: int, epoch: int, index: int, num_captions: int, random_flip: bool) -> SampleChoices:
        rng = np.random.default_rng([seed, epoch, index])
        caption_index = int(rng.integers(num_captions)) if num_captions > 1 else 0
        flip = bool(rng.random() < 0.5) and random_flip
        crop_x, crop_y = float(rng.random()), float(rng.random())
        return cls(caption_index, flip, crop_x, crop_y)


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `resolution` (bilinear), crop a `resolution` square, optionally mirror.

    center_crop: crop the center; otherwise crop at the random offset of `SampleChoices`.
    """

    resolution: int
    center_crop: bool = False

    def __call__(self, image: Image.Image, choices: SampleChoices | None = None) -> torch.Tensor:
        """RGB PIL image -> (3, R, R) float32 in [-1, 1]."""
        r = self.resolution
        scale = r / min(image.size)
        size = (max(r, round(image.size[0] * scale)), max(r, round(image.size[1] * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        room_x, room_y = size[0] - r, size[1] - r
        if self.center_crop or choices is None:
            left, top = room_x // 2, room_y // 2
        else:
            left, top = int(choices.crop_x * (room_x + 1)), int(choices.crop_y * (room_y + 1))
        image = image.crop((left, top, left + r, top + r))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        if choices is not None and choices.flip:
            pixels = pixels.flip(-1)
        return pixels


def captions_of(value: Any) -> list[str]:
    """The caption(s) of a row as a list (a missing caption is the empty prompt)."""
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value) if len(value) else [""]
    raise TypeError(f"a caption must be a string or a list of strings, got {value!r}")


class TextImageDataset(torch.utils.data.Dataset):
    """Decoded, transformed samples keyed by (epoch, index) (a plain int index means epoch 0).

    Args:
        dataset: a `datasets.Dataset` whose image column is not decoded (see `without_image_decoding`).
        image_column, caption_column: column names.
        transform: the `ImageTransform`.
        random_flip: mirror half of the samples (per sample and epoch).
        seed: seed of the per-sample choices.

    Items: {"pixel_values": (3, R, R) float32 in [-1, 1], "caption": str, "index": int (the sample actually
    read), "skipped": list of unreadable indices that were replaced by it}.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        caption_column: str,
        transform: ImageTransform,
        random_flip: bool,
        seed: int,
    ) -> None:
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.transform = transform
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        epoch, index = (0, key) if isinstance(key, int) else key
        skipped: list[int] = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                sample, _ = self._sample(self.dataset[candidate], epoch, candidate)
                return {**sample, "skipped": skipped}
            except Exception as error:  # noqa: BLE001 - any decoding failure skips the image
                logger.warning("skipping unreadable image at index %d: %s", candidate, error)
                skipped.append(candidate)
        raise RuntimeError(f"none of the {len(self)} images of the dataset could be read")

    def _sample(self, row: dict[str, Any], epoch: int, index: int) -> tuple[dict[str, Any], SampleChoices]:
        """One row's sample and its random choices; raises when its image cannot be decoded."""
        image = read_image(row[self.image_column])
        captions = captions_of(row[self.caption_column])
        choices = SampleChoices.draw(self.seed, epoch, index, len(captions), self.random_flip)
        sample = {
            "pixel_values": self.transform(image, choices),
            "caption": captions[choices.caption_index],
            "index": index,
        }
        return sample, choices


class ConditionedTextImageDataset(TextImageDataset):
    """`TextImageDataset` whose items also hold a condition image (ControlNet training), cropped and flipped with
    the image: "conditioning_pixel_values" (3, R, R) float32 in [0, 1]. A row whose condition cannot be read is
    skipped like one whose image cannot.

    Args: those of `TextImageDataset`, and `conditioning_column`, the column of the condition images.
    """

    def __init__(
        self, dataset, image_column: str, caption_column: str, conditioning_column: str, *args
    ) -> None:
        super().__init__(dataset, image_column, caption_column, *args)
        self.conditioning_column = conditioning_column

    def _sample(self, row: dict[str, Any], epoch: int, index: int) -> tuple[dict[str, Any], SampleChoices]:
        sample, choices = super()._sample(row, epoch, index)
        condition = self.transform(read_image(row[self.conditioning_column]), choices)
        sample["conditioning_pixel_values"] = (condition + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        return sample, choices


def collate_text_image(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: pixel_values (B, 3, R, R), captions list[str], indices (B,), skipped list[int] (and
    conditioning_pixel_values (B, 3, R, R) when the items have them)."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
        "skipped": [i for item in items for i in item["skipped"]],
        **(
            {"conditioning_pixel_values": torch.stack([item["conditioning_pixel_values"] for item in items])}
            if "conditioning_pixel_values" in items[0]
            else {}
        ),
    }
