"""`train_t2i.py --inpainting`: random masks, the zero-initialised widening of a text-to-image UNet (step 0 predicts
exactly what the base model does), a tiny run through the script whose export loads with LatentInpaintPipeline,
exact resume, and the flags that cannot go together."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from latentdiff.models.unet_diffusers import load_unet
from tests.test_train import t2i_args, unet_weights
from train import train_t2i
from train.loop_config import ConfigError
from train.randomness import BatchRandom
from train.tasks.inpaint import inpainting_channels, widen_conv_in
from train.tasks.inpaint_masks import MAX_HALF_SIZE, random_masks


def batch_random(batch: int, seed: int = 0) -> BatchRandom:
    return BatchRandom(seed, 0, 0, batch, 0, batch, torch.device("cpu"))


def test_random_masks_are_binary_shapes_and_fully_masked_as_often_as_asked():
    masks = random_masks(batch_random(4000), 16, 24, full_mask_prob=0.25)
    assert masks.shape == (4000, 1, 16, 24) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    coverage = masks.mean(dim=(1, 2, 3))
    full = coverage == 1
    assert abs(float(full.float().mean()) - 0.25) < 0.03  # binomial sd ~0.007
    partial = coverage[~full]
    assert bool((partial > 0).all())  # every mask repaints something
    assert float(partial.max()) <= min(
        1.0, 3 * (2 * MAX_HALF_SIZE) ** 2 + 0.1
    )  # at most three quarter-images
    assert 0.05 < float(partial.mean()) < 0.4
    # the same micro-batch draws the same masks; p_full at its ends
    assert torch.equal(
        random_masks(batch_random(8, 3), 16, 16, 0.25), random_masks(batch_random(8, 3), 16, 16, 0.25)
    )
    assert bool((random_masks(batch_random(64), 8, 8, 1.0) == 1).all())
    assert not bool((random_masks(batch_random(64), 8, 8, 0.0).mean(dim=(1, 2, 3)) == 1).any())


def test_widened_unet_predicts_exactly_what_the_text_to_image_unet_does(tiny_sd_dir):
    unet = load_unet(tiny_sd_dir / "unet").eval()
    c = unet.config.in_channels
    widened = widen_conv_in(unet, c).eval()
    assert widened.config.in_channels == inpainting_channels(c) == 2 * c + 1
    assert float(widened.conv_in.weight[:, c:].abs().max()) == 0
    generator = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, c, 8, 8, generator=generator)
    extra = torch.randn(2, c + 1, 8, 8, generator=generator)  # any mask and masked image
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        base = unet(z_t, t, context)
        start = widened(torch.cat([z_t, extra], dim=1), t, context)
    torch.testing.assert_close(start, base, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="only a text-to-image UNet"):
        widen_conv_in(widened, c)


@pytest.mark.slow
def test_inpainting_run_exports_an_inpainting_folder_and_resumes_exactly(
    tmp_path, tiny_sd_dir, train_data, one_thread
):
    from pipelines import LatentInpaintPipeline

    common = dict(
        inpainting=True,
        inpainting_full_mask_prob=0.5,
        use_ema=True,
        ema_decay=0.9,
        checkpointing_steps=2,
        validation_holdout=1,
        validation_steps=4,
        validation_prompts=["a red circle"],
        validation_num_inference_steps=2,
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, whole, max_train_steps=4, **common)) == 0
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, split, max_train_steps=2, **common)) == 0
    resumed = t2i_args(
        tiny_sd_dir, train_data, split, max_train_steps=4, resume_from_checkpoint="latest", **common
    )
    assert train_t2i.main(resumed) == 0
    a, b = unet_weights(whole), unet_weights(split)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6  # resume draws the same masks
    assert (whole / "validation" / "step-000004.png").is_file()

    c = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"].shape[
        1
    ]
    assert json.loads((whole / "unet" / "config.json").read_text())["in_channels"] == 2 * c + 1
    assert float(a["conv_in.weight"][:, c:].abs().max()) > 0  # the new channels were trained
    index = json.loads((whole / "model_index.json").read_text())
    # diffusers' DiffusionPipeline picks its class by this name
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert type(diffusers.DiffusionPipeline.from_pretrained(whole)).__name__ == index["_class_name"]

    pipe = LatentInpaintPipeline.from_pretrained(whole)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.inpainting_kind == "inpainting_unet"
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    out = pipe(
        "a red circle",
        image=image,
        mask_image=mask,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 32)
    kept = (image / 2 + 0.5)[..., mask[0, 0] == 0]
    assert torch.equal(out[..., mask[0, 0] == 0], kept)


def test_inpainting_flags_that_cannot_go_together(tmp_path, tiny_sd_dir, train_data, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(train_t2i, "build_models", no_loading)
    cached = t2i_args(
        tiny_sd_dir, train_data, tmp_path / "a", inpainting=True, cache_latents=True, center_crop=True
    )
    with pytest.raises(ConfigError, match="--inpainting .* needs the images.*drop --cache_latents"):
        train_t2i.main(cached)
    unet = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    c = json.loads((tiny_sd_dir / "vae" / "config.json").read_text())["latent_channels"]
    unet_config = tmp_path / "unet.json"
    unet_config.write_text(json.dumps({**unet, "in_channels": 2 * c + 1}))
    with pytest.raises(
        ConfigError, match=f"takes {2 * c + 1} input channels, an inpainting UNet.*add --inpainting"
    ):
        train_t2i.main(t2i_args(tiny_sd_dir, train_data, tmp_path / "b", unet_config=unet_config))
    unet_config.write_text(json.dumps({**unet, "in_channels": c + 1}))
    with pytest.raises(ConfigError, match=f"set in_channels of --unet_config to {c} or {2 * c + 1}"):
        train_t2i.main(
            t2i_args(tiny_sd_dir, train_data, tmp_path / "c", unet_config=unet_config, inpainting=True)
        )


def test_lora_refuses_inpainting(tmp_path, tiny_sd_dir, train_data):
    from train.arguments import parse_config
    from train.tasks.lora import LoraConfig

    with pytest.raises(
        ConfigError, match="--inpainting trains new input channels.*train_t2i.py --inpainting"
    ):
        parse_config(t2i_args(tiny_sd_dir, train_data, tmp_path, inpainting=True), LoraConfig)
