"""The latent and text-embedding cache: the frozen VAE and text encoder run once per image and caption, not per step.

For every image the cache holds the VAE posterior q(z | x) = N(μ, σ²) of the cropped image and of its mirror image
(when random flips are on), in the UNet's latent units (already multiplied by the VAE scaling factor, see
`encode_posterior`); for every distinct caption its text embedding; and the empty prompt's embedding, which
classifier-free dropout swaps in. Each training step draws its own latent z = μ + σ·ε from the cached posterior, as
encoding the image again would.

| code name                       | symbol          | shape              | meaning                                    |
|---------------------------------|-----------------|--------------------|--------------------------------------------|
| `latent_mean`                   | μ               | (N, C, h, w)       | posterior mean, latent units               |
| `latent_logvar`                 | log σ²          | (N, C, h, w)       | posterior log-variance, latent units       |
| `*_flipped`                     |                 | (N, C, h, w)       | the same for the horizontally mirrored image |
| `text_embeds`                   | c               | (M, L, D)          | one per distinct caption                   |
| `empty_embed`                   | ∅               | (1, L, D)          | the empty prompt's embedding               |

A cache lives in `<root>/<key>/`, where the key is a hash of everything that determines its content: the VAE's
weights and config, the text encoder's weights and config, the tokenizer, the resolution, the crop and flip
settings, and the data (`dataset_fingerprint`). A later run with the same inputs reuses it; a change of any input
gives a new key, so the cache is computed again. A cache is written to a temporary folder and renamed when
complete, so an interrupted build is never read. Arrays are `.npy` files read memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from latentdiff.conditioning import encode_posterior, encode_prompts
from latentdiff.data.dataset import ImageTransform, SampleChoices, SampleKey, captions_of, read_image

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout changes


def sample_posterior(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """z = μ + σ·ε with σ = exp(log σ² / 2); all (B, C, h, w)."""
    return mean + torch.exp(0.5 * logvar) * noise


# ---- the key --------------------------------------------------------------------------------------------------------


def _hash_module(digest: Any, module: torch.nn.Module) -> None:
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict = {k: v for k, v in as_dict.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def cache_key(
    vae, text_encoder, tokenizer, data_fingerprint: str, resolution: int, center_crop: bool, random_flip: bool
) -> str:
    """A hash of everything a cache's content depends on (see the module docstring)."""
    digest = hashlib.sha256(f"latentdiff-cache-{CACHE_FORMAT}".encode())
    _hash_module(digest, vae)
    _hash_module(digest, text_encoder)
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(f"{type(tokenizer).__name__}|{tokenizer.model_max_length}".encode())
    digest.update(f"{data_fingerprint}|{resolution}|{center_crop}|{random_flip}".encode())
    return digest.hexdigest()[:20]


# ---- the cache --------------------------------------------------------------------------------------------------


class LatentCache:
    """A built cache, read memory-mapped. See the module docstring for the arrays."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.caption_ids: list[list[int]] = meta["caption_ids"]
        self.captions: list[str] = meta["captions"]  # distinct captions, by caption id
        self.valid = np.load(self.path / "valid.npy")
        self.latent_mean = np.load(self.path / "latent_mean.npy", mmap_mode="r")
        self.latent_logvar = np.load(self.path / "latent_logvar.npy", mmap_mode="r")
        flipped = self.path / "latent_mean_flipped.npy"
        self.latent_mean_flipped = np.load(flipped, mmap_mode="r") if flipped.exists() else None
        self.latent_logvar_flipped = (
            np.load(self.path / "latent_logvar_flipped.npy", mmap_mode="r") if flipped.exists() else None
        )
        self.text_embeds = np.load(self.path / "text_embeds.npy", mmap_mode="r")
        self.empty_embed = torch.from_numpy(np.load(self.path / "empty_embed.npy"))

    def __len__(self) -> int:
        return len(self.caption_ids)

    @property
    def num_unreadable(self) -> int:
        return int((~self.valid).sum())

    def posterior(self, index: int, flip: bool) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each (C, h, w) float32, of image `index` (mirrored if `flip`)."""
        if flip and self.latent_mean_flipped is None:
            raise ValueError("this cache was built without random_flip: it has no mirrored posteriors")
        mean, logvar = (
            (self.latent_mean_flipped, self.latent_logvar_flipped)
            if flip
            else (self.latent_mean, self.latent_logvar)
        )
        return torch.from_numpy(np.array(mean[index])), torch.from_numpy(np.array(logvar[index]))

    def text_embed(self, caption_id: int) -> Tensor:
        """(L, D) embedding of distinct caption `caption_id`."""
        return torch.from_numpy(np.array(self.text_embeds[caption_id]))


def load_or_build_cache(
    root: str | Path,
    key: str,
    dataset,
    image_column: str,
    caption_column: str,
    transform: ImageTransform,
    random_flip: bool,
    vae,
    tokenizer,
    text_encoder,
    batch_size: int = 16,
    progress: bool = True,
) -> LatentCache:
    """The cache `<root>/<key>`, built first if it does not exist.

    Args:
        root: folder of caches.
        key: `cache_key(...)` of the inputs.
        dataset: a `datasets.Dataset` whose image column is not decoded; every row is cached.
        transform: the crop (must be a center crop: one crop per image is stored).
        random_flip: also cache the mirrored images' posteriors.
        vae, tokenizer, text_encoder: the frozen parts, on the device to run them on.
        batch_size: images per VAE call and captions per text-encoder call.
        progress: show progress bars.
    """
    path = Path(root) / key
    if (path / "meta.json").exists():
        logger.info("latent cache found: %s (reused)", path)
        return LatentCache(path)
    if not transform.center_crop:
        raise ValueError("the latent cache stores one crop per image: build it with a center-crop transform")
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(root) / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    logger.info("building the latent cache in %s (%d images)", path, len(dataset))
    try:
        _build(
            tmp,
            dataset,
            image_column,
            caption_column,
            transform,
            random_flip,
            vae,
            tokenizer,
            text_encoder,
            batch_size,
            progress,
        )
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (path / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = LatentCache(path)
    logger.info(
        "latent cache built in %.1f s: %d images (%d unreadable, skipped), %d distinct captions",
        time.perf_counter() - start,
        len(cache),
        cache.num_unreadable,
        len(cache.text_embeds),
    )
    return cache


@torch.no_grad()
def _build(
    folder: Path,
    dataset,
    image_column: str,
    caption_column: str,
    transform: ImageTransform,
    random_flip: bool,
    vae,
    tokenizer,
    text_encoder,
    batch_size: int,
    progress: bool,
) -> None:
    n = len(dataset)
    # Captions: every distinct caption once, plus the empty prompt.
    captions_per_row = [captions_of(c) for c in dataset[caption_column]]
    distinct: dict[str, int] = {}
    caption_ids = [[distinct.setdefault(c, len(distinct)) for c in row] for row in captions_per_row]
    texts = list(distinct)
    empty = encode_prompts(tokenizer, text_encoder, [""]).float().cpu()
    text_embeds = np.lib.format.open_memmap(
        folder / "text_embeds.npy", mode="w+", dtype=np.float32, shape=(len(texts), *empty.shape[1:])
    )
    for start in tqdm(range(0, len(texts), batch_size), desc="caching text embeddings", disable=not progress):
        chunk = texts[start : start + batch_size]
        text_embeds[start : start + len(chunk)] = (
            encode_prompts(tokenizer, text_encoder, chunk).float().cpu().numpy()
        )
    text_embeds.flush()
    np.save(folder / "empty_embed.npy", empty.numpy())

    # Images: the posterior of the crop and of its mirror image.
    valid = np.zeros(n, dtype=bool)
    arrays: dict[str, np.memmap] = {}
    images = dataset.select_columns([image_column])
    for start in tqdm(range(0, n, batch_size), desc="caching VAE latents", disable=not progress):
        indices = list(range(start, min(start + batch_size, n)))
        pixels, readable = [], []
        for i in indices:
            try:
                pixels.append(transform(read_image(images[i][image_column])))
                readable.append(i)
            except Exception as error:  # noqa: BLE001 - an unreadable image is skipped, never fatal
                logger.warning("skipping unreadable image at index %d: %s", i, error)
        if not readable:
            continue
        batch = torch.stack(pixels)
        views = {"": batch, "_flipped": batch.flip(-1)} if random_flip else {"": batch}
        for suffix, view in views.items():
            mean, logvar = encode_posterior(vae, view)
            for name, values in ((f"latent_mean{suffix}", mean), (f"latent_logvar{suffix}", logvar)):
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, *values.shape[1:])
                    )
                arrays[name][readable] = values.cpu().numpy()
        valid[readable] = True
    if not valid.any():
        raise RuntimeError(f"none of the {n} images of the dataset could be read")
    for array in arrays.values():
        array.flush()
    np.save(folder / "valid.npy", valid)
    meta = {"format": CACHE_FORMAT, "num_images": n, "caption_ids": caption_ids, "captions": texts}
    (folder / "meta.json").write_text(json.dumps(meta))


class CachedTextImageDataset(torch.utils.data.Dataset):
    """Samples read from a `LatentCache`, keyed by (epoch, index) like `TextImageDataset`.

    The caption and flip choices are drawn exactly as `TextImageDataset` draws them (`SampleChoices`), so cached and
    uncached training see the same samples. An unreadable image is replaced by the next readable one.

    Args:
        cache: the cache.
        indices: the dataset rows this dataset exposes (e.g. the training part); item i is row indices[i].
        random_flip: mirror half of the samples.
        seed: seed of the per-sample choices.

    Items: {"latent_mean", "latent_logvar": (C, h, w) float32 (latent units), "prompt_embeds": (L, D),
    "caption": str (the caption drawn, for a text encoder that is trained), "index": int, "skipped": list[int]}.
    """

    def __init__(self, cache: LatentCache, indices: Sequence[int], random_flip: bool, seed: int) -> None:
        self.cache = cache
        self.indices = list(indices)
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        epoch, position = (0, key) if isinstance(key, int) else key
        skipped: list[int] = []
        for offset in range(len(self)):
            index = self.indices[(position + offset) % len(self)]
            if not self.cache.valid[index]:
                skipped.append(index)
                continue
            ids = self.cache.caption_ids[index]
            choices = SampleChoices.draw(self.seed, epoch, index, len(ids), self.random_flip)
            mean, logvar = self.cache.posterior(index, choices.flip)
            caption_id = ids[choices.caption_index]
            return {
                "latent_mean": mean,
                "latent_logvar": logvar,
                "prompt_embeds": self.cache.text_embed(caption_id),
                "caption": self.cache.captions[caption_id],
                "index": index,
                "skipped": skipped,
            }
        raise RuntimeError(f"none of the {len(self)} cached images is readable")


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples: latent_mean, latent_logvar (B, C, h, w), prompt_embeds (B, L, D), captions, indices,
    skipped."""
    return {
        "captions": [item["caption"] for item in items],
        "latent_mean": torch.stack([item["latent_mean"] for item in items]),
        "latent_logvar": torch.stack([item["latent_logvar"] for item in items]),
        "prompt_embeds": torch.stack([item["prompt_embeds"] for item in items]),
        "indices": torch.tensor([item["index"] for item in items]),
        "skipped": [i for item in items for i in item["skipped"]],
    }
