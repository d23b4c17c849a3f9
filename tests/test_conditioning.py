"""latentdiff.conditioning: prompts -> CLIP embeddings and images <-> latents, checked against diffusers."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL

from latentdiff.conditioning import decode_latents, encode_images, encode_prompts, vae_scale_factor


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    """diffusers' own pipeline over the tiny folder: the oracle for prompt encoding."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)


def tiny_vae(levels: int, **config) -> AutoencoderKL:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(8, 16, 16, 16)[:levels],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            **config,
        ).eval()


def test_prompts_and_empty_prompt_match_stable_diffusion(sd):
    prompts = ["a red circle in the top left", "a small blue square on a white background"]
    with torch.no_grad():
        ours = encode_prompts(sd.tokenizer, sd.text_encoder, prompts + ["", ""])
        cond, uncond = sd.encode_prompt(prompts, "cpu", 1, True)
    length, dim = sd.tokenizer.model_max_length, sd.text_encoder.config.hidden_size
    assert ours.shape == (4, length, dim)
    torch.testing.assert_close(ours[:2], cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[2:], uncond, rtol=0, atol=1e-5)  # SD's uncond is the empty prompt's
    assert not torch.allclose(ours[0], ours[2], atol=1e-3)  # the prompt changes the embedding


def test_long_prompt_is_truncated_with_a_warning_counting_dropped_tokens(sd, caplog):
    tokenizer = sd.tokenizer
    long_prompt = " ".join(["red circle"] * 60)
    num_tokens = len(tokenizer(long_prompt, truncation=False, verbose=False).input_ids)
    dropped = num_tokens - tokenizer.model_max_length
    assert dropped > 0
    with caplog.at_level(logging.WARNING, logger="latentdiff.conditioning"), torch.no_grad():
        embeds = encode_prompts(tokenizer, sd.text_encoder, ["a red circle", long_prompt])
    messages = [r.getMessage() for r in caplog.records if r.name == "latentdiff.conditioning"]
    assert len(messages) == 1, messages
    assert "prompt 1" in messages[0] and f"last {dropped} token(s) were dropped" in messages[0]
    assert embeds.shape[1] == tokenizer.model_max_length
    # what is kept is the prompt's start: the same embedding as the prompt cut to model_max_length - 2 tokens
    kept_ids = tokenizer(long_prompt, truncation=False, verbose=False).input_ids[
        1 : tokenizer.model_max_length - 1
    ]
    with torch.no_grad():
        cut = encode_prompts(tokenizer, sd.text_encoder, [tokenizer.decode(kept_ids)])
    torch.testing.assert_close(embeds[1], cut[0], rtol=0, atol=1e-5)


def test_short_prompts_warn_nothing(sd, caplog):
    with caplog.at_level(logging.WARNING), torch.no_grad():
        encode_prompts(sd.tokenizer, sd.text_encoder, ["a red circle", ""])
    assert not [r for r in caplog.records if r.name == "latentdiff.conditioning"]


def test_bad_prompts_are_rejected(sd):
    with pytest.raises(TypeError, match="prompts"):
        encode_prompts(sd.tokenizer, sd.text_encoder, "a red circle")
    with pytest.raises(ValueError, match="prompts is an empty list"):
        encode_prompts(sd.tokenizer, sd.text_encoder, [])


@pytest.mark.parametrize("levels, factor", [(1, 1), (2, 2), (3, 4), (4, 8)])
def test_vae_scale_factor_comes_from_the_config(levels, factor):
    vae = tiny_vae(levels)
    assert vae_scale_factor(vae) == factor
    with torch.no_grad():
        latents = encode_images(vae, torch.zeros(1, 3, 16, 16))
    assert latents.shape == (1, 4, 16 // factor, 16 // factor)


@pytest.mark.parametrize("shift_factor", [None, 0.25])
def test_latents_are_scaled_and_shifted_and_decode_inverts_it(shift_factor):
    vae = tiny_vae(2, scaling_factor=0.5, shift_factor=shift_factor)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = encode_images(vae, images)
        mean = vae.encode(images).latent_dist.mean
        expected = (mean - (shift_factor or 0.0)) * 0.5
        torch.testing.assert_close(latents, expected)
        torch.testing.assert_close(decode_latents(vae, latents), vae.decode(mean).sample, rtol=0, atol=1e-5)


def test_sampled_latents_follow_the_generator():
    vae = tiny_vae(2)
    images = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        first = encode_images(vae, images, torch.Generator().manual_seed(1), sample=True)
        again = encode_images(vae, images, torch.Generator().manual_seed(1), sample=True)
        other = encode_images(vae, images, torch.Generator().manual_seed(2), sample=True)
        mean = encode_images(vae, images)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other) and not torch.allclose(first, mean)


def test_float16_overflow_is_decoded_again_in_float32(caplog):
    vae = tiny_vae(2)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)  # activations beyond float16's 65504, normalised away later
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = decode_latents(vae, latents)  # float32 reference
        assert torch.isfinite(expected).all()
        vae.half()
        assert not torch.isfinite(vae.decode(latents.half() / vae.config.scaling_factor).sample).all()
        with caplog.at_level(logging.WARNING, logger="latentdiff.conditioning"):
            images = decode_latents(vae, latents.half())
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-3)
    assert any("float32" in r.getMessage() for r in caplog.records)
    assert vae.dtype == torch.float16  # the caller's VAE is left as it was
