"""Training data: image conversion, unreadable images, caption choice, transforms, fingerprint and the latent cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.dataset import (
    ImageTransform,
    SampleChoices,
    TextImageDataset,
    check_columns,
    collate_text_image,
    dataset_fingerprint,
    load_image_caption_dataset,
    read_image,
    without_image_decoding,
)

CAPTIONS = [
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow star",
    "a purple circle",
    "an orange square",
]


def make_imagefolder(folder: Path, size: int = 32, seed: int = 0) -> Path:
    """An imagefolder of 9 images: 6 RGB, one grayscale, one RGBA (not square), one corrupt file.

    Rows (imagefolder sorts files by name): 0-5 RGB, 6 corrupt ("6_bad.png"), 7 grayscale, 8 RGBA.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
    (folder / "6_bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    rows.append({"file_name": "6_bad.png", "text": "a broken file"})
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(folder / "7_gray.png")
    rows.append({"file_name": "7_gray.png", "text": "a gray square"})
    rgba = rng.integers(0, 256, (size + 8, size, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "8_rgba.png")
    rows.append({"file_name": "8_rgba.png", "text": "a white star"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def hf_dataset(imagefolder):
    return without_image_decoding(load_image_caption_dataset(train_data_dir=str(imagefolder)), "image")


def test_read_image_converts_to_rgb_and_composites_transparency_over_white():
    gray = read_image(Image.new("L", (4, 4), 100))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent
    rgb = read_image(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (10, 20, 30)
    palette = Image.new("P", (4, 4), 3)
    assert read_image(palette).mode == "RGB"


def test_unreadable_image_is_replaced_by_the_next_and_reported(hf_dataset):
    data = TextImageDataset(hf_dataset, "image", "text", ImageTransform(32, center_crop=True), False, seed=0)
    assert hf_dataset[6]["image"]["path"].endswith("6_bad.png")
    item = data[(0, 6)]
    assert item["index"] == 7 and item["skipped"] == [6] and item["caption"] == "a gray square"
    items = [data[(0, i)] for i in range(len(data))]  # never raises
    for item in items:
        assert item["pixel_values"].shape == (3, 32, 32)
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    batch = collate_text_image(items)
    assert batch["pixel_values"].shape == (9, 3, 32, 32) and batch["skipped"] == [6]


def test_all_unreadable_raises(hf_dataset):
    bad_only = hf_dataset.select([6])
    data = TextImageDataset(bad_only, "image", "text", ImageTransform(32, True), False, seed=0)
    with pytest.raises(RuntimeError, match="could be read"):
        data[(0, 0)]


def test_list_captions_pick_one_at_random_reproducibly():
    import datasets

    captions = [["one", "two", "three"]]
    image = Image.new("RGB", (8, 8))
    hf = datasets.Dataset.from_dict({"image": [image], "text": captions}).cast_column(
        "image", datasets.Image()
    )
    hf = without_image_decoding(hf, "image")
    check_columns(hf, "image", "text")
    data = TextImageDataset(hf, "image", "text", ImageTransform(8, True), False, seed=3)
    picks = [data[(epoch, 0)]["caption"] for epoch in range(30)]
    assert set(picks) == {"one", "two", "three"}  # each epoch draws again
    assert picks == [
        data[(epoch, 0)]["caption"] for epoch in range(30)
    ]  # the same key gives the same caption
    other_seed = TextImageDataset(hf, "image", "text", ImageTransform(8, True), False, seed=4)
    assert picks != [other_seed[(epoch, 0)]["caption"] for epoch in range(30)]


def test_transform_center_crop_random_crop_and_flip():
    ramp = np.tile(
        np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3)
    )  # 32 x 64, brighter to the right
    image = Image.fromarray(ramp)
    center = ImageTransform(16, center_crop=True)(image)  # resized to 16 x 32, the middle 16 columns kept
    assert center.shape == (3, 16, 16)
    crops = {
        float(ImageTransform(16)(image, SampleChoices(0, False, x, 0.0))[0, 0, 0])
        for x in np.linspace(0, 0.99, 8)
    }
    assert len(crops) > 3  # random crops move along the long side
    flipped = ImageTransform(16, center_crop=True)(image, SampleChoices(0, True, 0.5, 0.5))
    assert torch.equal(flipped, center.flip(-1))
    choices = [SampleChoices.draw(0, epoch, 5, 1, random_flip=True).flip for epoch in range(40)]
    assert 10 < sum(choices) < 30
    assert not any(SampleChoices.draw(0, epoch, 5, 1, random_flip=False).flip for epoch in range(40))


def test_missing_or_wrong_columns_name_the_flag(hf_dataset):
    with pytest.raises(ValueError, match=r"--caption_column='caption'.*\['image', 'text'\]"):
        check_columns(hf_dataset, "image", "caption")
    with pytest.raises(ValueError, match="--image_column='picture'"):
        check_columns(hf_dataset, "picture", "text")
    with pytest.raises(ValueError, match="captions must be strings"):
        check_columns(hf_dataset, "text", "image")


def test_fingerprint_changes_with_the_data(tmp_path):
    folder = make_imagefolder(tmp_path / "a")
    load = lambda: without_image_decoding(load_image_caption_dataset(train_data_dir=str(folder)), "image")  # noqa: E731
    first = dataset_fingerprint(load(), "image", "text")
    assert dataset_fingerprint(load(), "image", "text") == first
    lines = (folder / "metadata.jsonl").read_text().replace("a red circle", "a red square")
    (folder / "metadata.jsonl").write_text(lines)
    assert dataset_fingerprint(load(), "image", "text") != first


# ---- the latent cache ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts(tiny_sd_dir):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    return (
        AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae").eval(),
        CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer"),
        CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").eval(),
    )


def test_cached_posterior_matches_the_vae_and_the_uncached_samples(tmp_path, hf_dataset, tiny_parts):
    from latentdiff.conditioning import encode_images, encode_prompts
    from latentdiff.data.cache import CachedTextImageDataset, cache_key, encode_posterior, load_or_build_cache

    vae, tokenizer, text_encoder = tiny_parts
    transform = ImageTransform(32, center_crop=True)
    key = cache_key(
        vae, text_encoder, tokenizer, dataset_fingerprint(hf_dataset, "image", "text"), 32, True, True
    )
    cache = load_or_build_cache(
        tmp_path,
        key,
        hf_dataset,
        "image",
        "text",
        transform,
        True,
        vae,
        tokenizer,
        text_encoder,
        batch_size=4,
        progress=False,
    )
    assert cache.num_unreadable == 1 and not cache.valid[6]
    uncached = TextImageDataset(hf_dataset, "image", "text", transform, True, seed=1)
    cached = CachedTextImageDataset(cache, range(len(hf_dataset)), True, seed=1)
    flips = set()
    with torch.no_grad():
        for epoch in range(3):
            for i in (0, 6, 8):
                a, b = uncached[(epoch, i)], cached[(epoch, i)]
                assert a["index"] == b["index"] and a["skipped"] == b["skipped"]
                pixels = a["pixel_values"][None]
                mean, logvar = encode_posterior(vae, pixels)
                # the cache holds what encoding the (possibly mirrored) crop gives, in the units encode_images uses
                torch.testing.assert_close(b["latent_mean"], mean[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(b["latent_logvar"], logvar[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(mean, encode_images(vae, pixels), atol=1e-5, rtol=1e-5)
                expected_text = encode_prompts(tokenizer, text_encoder, [a["caption"]])[0]
                torch.testing.assert_close(b["prompt_embeds"], expected_text, atol=1e-5, rtol=1e-5)
                flips.add(
                    bool(
                        torch.equal(a["pixel_values"], transform(read_image(hf_dataset[a["index"]]["image"])))
                    )
                )
        torch.testing.assert_close(cache.empty_embed, encode_prompts(tokenizer, text_encoder, [""]))
    assert flips == {True, False}  # both mirrored and plain samples were compared


def test_cache_key_follows_its_inputs(hf_dataset, tiny_parts):
    from latentdiff.data.cache import cache_key

    vae, tokenizer, text_encoder = tiny_parts
    base = ("abc", 32, True, False)
    key = cache_key(vae, text_encoder, tokenizer, *base)
    assert cache_key(vae, text_encoder, tokenizer, *base) == key
    assert cache_key(vae, text_encoder, tokenizer, "abd", 32, True, False) != key  # data
    assert cache_key(vae, text_encoder, tokenizer, "abc", 16, True, False) != key  # resolution
    assert cache_key(vae, text_encoder, tokenizer, "abc", 32, True, True) != key  # flips
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # the decoder does not change the posterior, but it is the VAE
    try:
        assert cache_key(vae, text_encoder, tokenizer, *base) != key
    finally:
        with torch.no_grad():
            vae.decoder.conv_out.bias.sub_(1.0)
