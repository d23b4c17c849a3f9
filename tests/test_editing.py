"""Editing pipelines: image-to-image (SDEdit), inpainting (mask blending and SD-inpainting UNets), DDIM inversion.

Parity with diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline on tiny diffusers-written
folders (conftest.py's text-to-image one, and here an inpainting one whose UNet takes 9 channels), same noise,
max |Δ| <= 2e-3 as the text-to-image parity test; then the closed-form edge cases and bad input.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from latentdiff.cli import main
from latentdiff.conditioning import encode_images
from latentdiff.data.shapes import ObjectSpec, Scene, render_scene
from pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline, LatentPipeline
from tests.conftest import build_tiny_sd_components

PROMPT = "a red circle in the top left"
PROMPTS = [PROMPT, "a small blue square on a white background"]
STEPS = 4
SIDE = 32
TOLERANCE = 2e-3  # as the text-to-image parity test: float32 rounding through a 4-step chain and the VAE


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scene_image() -> Image.Image:
    """A 32 px shapes scene: a red circle top left and a blue square bottom right on black."""
    objects = (
        ObjectSpec("red", "circle", "large", "top left"),
        ObjectSpec("blue", "square", "large", "bottom right"),
    )
    return render_scene(Scene("black", objects), SIDE)


def square_mask(x0: int = 8, y0: int = 8, x1: int = 24, y1: int = 24) -> Image.Image:
    """A binary mask: 255 (repaint) inside the box, 0 elsewhere."""
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def pixels_of(image: Image.Image) -> torch.Tensor:
    """A PIL image as the (1, 3, H, W) tensor in [-1, 1] the VAE encodes."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 127.5 - 1


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_for(folder) -> DiffusersDDIM:
    """diffusers' DDIM read from the folder's config as LatentPipeline reads it (clip_sample off; see
    test_pipeline.py's reference fixture)."""
    return DiffusersDDIM.from_pretrained(folder, subfolder="scheduler", clip_sample=False)


@pytest.fixture(scope="module")
def img2img(tiny_sd_dir) -> LatentImg2ImgPipeline:
    return quiet(LatentImg2ImgPipeline.from_pretrained(tiny_sd_dir))


@pytest.fixture(scope="module")
def inpaint(img2img) -> LatentInpaintPipeline:
    return LatentInpaintPipeline.from_pipe(img2img)


@pytest.fixture(scope="module")
def tiny_inpainting_dir(tmp_path_factory):
    """A tiny SD-inpainting folder written by diffusers: conftest's parts with a UNet of 9 input channels."""
    path = tmp_path_factory.mktemp("tiny-sd-inpainting") / "model"
    components = build_tiny_sd_components(path.parent)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    StableDiffusionInpaintPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ parity with diffusers


IMG2IMG_CASES = {
    "strength 0.75, cfg": dict(prompt=PROMPT, strength=0.75, guidance_scale=6.0),
    "strength 0.5, negative, no cfg": dict(prompt=PROMPT, strength=0.5, guidance_scale=1.0),
    "strength 0.6, eta 1": dict(prompt=PROMPT, strength=0.6, guidance_scale=7.5, eta=1.0),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES, ids=list(IMG2IMG_CASES))
def test_img2img_matches_stable_diffusion_img2img(img2img, tiny_sd_dir, case):
    """diffusers samples z₀ from the VAE posterior with the generator before drawing ε: sample_posterior=True."""
    reference = quiet(
        StableDiffusionImg2ImgPipeline.from_pretrained(
            tiny_sd_dir, scheduler=ddim_for(tiny_sd_dir), safety_checker=None
        )
    )
    arguments = dict(IMG2IMG_CASES[case], image=scene_image(), num_inference_steps=STEPS, output_type="np")
    ours = img2img(**arguments, generator=seeded(0), sample_posterior=True).images
    theirs = reference(**arguments, generator=seeded(0)).images
    assert ours.shape == (1, SIDE, SIDE, 3) and ours.std() > 0.01
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_img2img_batch_matches_diffusers_given_the_same_image_latents(img2img, tiny_sd_dir):
    """Two prompts × two images, one generator: diffusers takes z₀ itself as `image` (4 channels); ours encodes the
    posterior mean of the same image."""
    reference = quiet(
        StableDiffusionImg2ImgPipeline.from_pretrained(
            tiny_sd_dir, scheduler=ddim_for(tiny_sd_dir), safety_checker=None
        )
    )
    image = scene_image()
    with torch.no_grad():
        image_latents = encode_images(img2img.vae, pixels_of(image))
    arguments = dict(
        prompt=PROMPTS,
        negative_prompt=["a green triangle", "a star"],
        strength=0.8,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        output_type="np",
    )
    ours = img2img(**arguments, image=image, generator=seeded(3)).images
    theirs = reference(**arguments, image=image_latents, generator=seeded(3)).images
    assert ours.shape == (4, SIDE, SIDE, 3)
    assert np.abs(ours - theirs).max() <= TOLERANCE


INPAINT_CASES = {
    "strength 1, cfg": dict(strength=1.0, guidance_scale=6.0),
    "strength 0.7, no cfg": dict(strength=0.7, guidance_scale=1.0),
}


@pytest.mark.parametrize("case", INPAINT_CASES, ids=list(INPAINT_CASES))
def test_mask_blending_matches_stable_diffusion_inpaint_with_a_4_channel_unet(inpaint, tiny_sd_dir, case):
    reference = quiet(
        StableDiffusionInpaintPipeline.from_pretrained(
            tiny_sd_dir, scheduler=ddim_for(tiny_sd_dir), safety_checker=None
        )
    )
    arguments = dict(
        INPAINT_CASES[case],
        prompt=PROMPT,
        image=scene_image(),
        mask_image=square_mask(),
        num_inference_steps=STEPS,
        output_type="np",
    )
    ours = inpaint(**arguments, generator=seeded(1), sample_posterior=True, keep_unmasked=False).images
    theirs = reference(**arguments, generator=seeded(1)).images
    assert ours.std() > 0.01
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("case", INPAINT_CASES, ids=list(INPAINT_CASES))
def test_inpainting_unet_folder_matches_stable_diffusion_inpaint(tiny_inpainting_dir, case):
    ours_pipe = quiet(LatentInpaintPipeline.from_pretrained(tiny_inpainting_dir))
    assert ours_pipe.unet.config.in_channels == 9 and ours_pipe.inpainting_kind == "inpainting_unet"
    reference = quiet(
        StableDiffusionInpaintPipeline.from_pretrained(
            tiny_inpainting_dir, scheduler=ddim_for(tiny_inpainting_dir), safety_checker=None
        )
    )
    arguments = dict(
        INPAINT_CASES[case],
        prompt=PROMPT,
        image=scene_image(),
        mask_image=square_mask(4, 12, 28, 28),
        num_inference_steps=STEPS,
        output_type="np",
    )
    ours = ours_pipe(**arguments, generator=seeded(2), sample_posterior=True, keep_unmasked=False).images
    theirs = reference(**arguments, generator=seeded(2)).images
    assert ours.std() > 0.01
    assert np.abs(ours - theirs).max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------------- behaviour


def test_strength_0_returns_the_image_through_the_vae(img2img):
    image = scene_image()
    out = img2img(PROMPT, image=image, strength=0.0, num_inference_steps=STEPS, output_type="pt").images
    pixels = pixels_of(image)
    with torch.no_grad():
        round_trip = img2img._decode(encode_images(img2img.vae, pixels))
    torch.testing.assert_close(out, round_trip, rtol=0, atol=1e-6)


def test_strength_1_is_text_to_image_from_the_same_noise(img2img):
    text_to_image = LatentPipeline.from_pipe(img2img)
    arguments = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    edited = img2img(PROMPTS, image=scene_image(), strength=1.0, generator=seeded(4), **arguments).images
    generated = text_to_image(PROMPTS, generator=seeded(4), **arguments).images
    np.testing.assert_allclose(edited, generated, rtol=0, atol=1e-6)


def test_more_strength_moves_further_from_the_image(img2img):
    image = scene_image()
    arguments = dict(num_inference_steps=10, output_type="np")
    start = img2img(PROMPT, image=image, strength=0.0, **arguments).images
    distances = [
        np.abs(
            img2img(PROMPT, image=image, strength=s, generator=seeded(5), **arguments).images - start
        ).mean()
        for s in (0.2, 0.6, 1.0)
    ]
    assert distances[0] < distances[1] < distances[2]


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_keep_unmasked_leaves_every_pixel_outside_the_mask_exactly(inpaint, tiny_inpainting_dir, strength):
    image, mask = scene_image(), square_mask(4, 4, 20, 16)
    outside = np.asarray(mask) == 0
    for pipe in (inpaint, quiet(LatentInpaintPipeline.from_pretrained(tiny_inpainting_dir))):
        [out] = pipe(
            PROMPT,
            image=image,
            mask_image=mask,
            strength=strength,
            num_inference_steps=STEPS,
            generator=seeded(0),
        ).images
        out, original = np.asarray(out), np.asarray(image)
        assert np.array_equal(out[outside], original[outside])
        assert np.abs(out[~outside].astype(int) - original[~outside]).max() > 10  # the inside was repainted


def test_blending_with_an_empty_mask_keeps_the_image_and_a_full_mask_is_text_to_image(inpaint):
    """m = 0: every step re-imposes z₀ noised, and the last z₀ itself; m = 1: blending is the identity."""
    image = scene_image()
    arguments = dict(num_inference_steps=STEPS, output_type="latent")
    empty = torch.zeros(SIDE, SIDE)
    kept = inpaint(PROMPT, image=image, mask_image=empty, generator=seeded(6), **arguments).images
    pixels = pixels_of(image)
    with torch.no_grad():
        torch.testing.assert_close(kept, encode_images(inpaint.vae, pixels), rtol=0, atol=1e-6)
    full = inpaint(PROMPT, image=image, mask_image=torch.ones(SIDE, SIDE), generator=seeded(6), **arguments)
    generated = LatentPipeline.from_pipe(inpaint)(PROMPT, generator=seeded(6), **arguments)
    torch.testing.assert_close(full.images, generated.images, rtol=0, atol=1e-6)


def test_inversion_is_exact_when_the_prediction_does_not_depend_on_the_sample(img2img):
    """A UNet whose output is a constant ε̂ = c (conv_out weights 0, bias c): DDIM's step is then an affine map of
    z that inversion undoes exactly, and z_T has a closed form: with x̂₀ = (z₀ − √(1 − ᾱ_f) c) / √ᾱ_f read at the
    chain's end ᾱ_f (the sampler's final_alpha_cumprod), z_T = √ᾱ_{τ_1} x̂₀ + √(1 − ᾱ_{τ_1}) c at the first
    sampler timestep τ_1."""
    unet = copy.deepcopy(img2img.unet)
    c = torch.tensor([0.3, -0.5, 0.8, 0.1])
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.copy_(c)
    pipe = quiet(
        LatentPipeline(unet, img2img.scheduler, img2img.vae, img2img.text_encoder, img2img.tokenizer)
    )
    image = scene_image()
    with torch.no_grad():
        z_0 = encode_images(pipe.vae, pixels_of(image)).double()
    z_T = pipe.invert(image, PROMPT, num_inference_steps=STEPS)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
    alpha_first, alpha_final = alphas_cumprod[pipe.scheduler.timesteps[0]], pipe.scheduler.final_alpha_cumprod
    c = c.double()[None, :, None, None]
    x_0 = (z_0 - (1 - alpha_final) ** 0.5 * c) / alpha_final**0.5
    torch.testing.assert_close(
        z_T.double(), alpha_first**0.5 * x_0 + (1 - alpha_first) ** 0.5 * c, rtol=0, atol=1e-4
    )
    again = pipe(
        PROMPT, latents=z_T, num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent"
    ).images
    torch.testing.assert_close(again.double(), z_0, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- bad input


def grey_mask() -> Image.Image:
    mask = np.array(square_mask())
    mask[0, 0] = 128  # one anti-aliased pixel
    return Image.fromarray(mask)


BAD_EDITS = {
    "mask of another size": (
        dict(mask_image=Image.new("L", (SIDE, 2 * SIDE))),
        ValueError,
        ["mask_image", "32x64"],
    ),
    "non-binary mask": (dict(mask_image=grey_mask()), ValueError, ["not binary", "128", "threshold"]),
    "non-binary mask tensor": (dict(mask_image=torch.full((SIDE, SIDE), 0.5)), ValueError, ["not binary"]),
    "image size the VAE cannot take": (
        dict(image=Image.new("RGB", (30, SIDE)), mask_image=Image.new("L", (30, SIDE))),
        ValueError,
        ["image is 30x32", "divisible by 8"],
    ),
    "strength above 1": (dict(strength=1.5), ValueError, ["strength=1.5", "[0, 1]"]),
    "strength below 0": (dict(strength=-0.1), ValueError, ["strength=-0.1"]),
    "masked-image latents for a 4-channel UNet": (
        dict(masked_image_latents=torch.zeros(1, 4, 8, 8)),
        ValueError,
        ["masked_image_latents", "takes 4", "9 input channels"],
    ),
    "no mask": (dict(mask_image=None), ValueError, ["mask_image is required"]),
}


@pytest.mark.parametrize("case", BAD_EDITS, ids=list(BAD_EDITS))
def test_bad_inpainting_input_names_itself(inpaint, case):
    arguments, error, names = BAD_EDITS[case]
    arguments = {"image": scene_image(), "mask_image": square_mask(), **arguments}
    with pytest.raises(error) as raised:
        inpaint(PROMPT, num_inference_steps=STEPS, **arguments)
    assert all(name in str(raised.value) for name in names), str(raised.value)


def test_bad_img2img_input_names_itself(img2img):
    with pytest.raises(ValueError, match=r"strength=2"):
        img2img(PROMPT, image=scene_image(), strength=2)
    with pytest.raises(ValueError, match="image is required"):
        img2img(PROMPT)
    with pytest.raises(ValueError, match=r"values in \[255, 255\]; pass pixels in \[-1, 1\]"):
        img2img(PROMPT, image=torch.full((1, 3, SIDE, SIDE), 255.0))
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        img2img([PROMPT] * 3, image=[scene_image()] * 2)


def test_an_inpainting_unet_needs_the_inpainting_pipeline(tiny_inpainting_dir):
    pipe = quiet(LatentPipeline.from_pretrained(tiny_inpainting_dir))
    for call in (
        lambda: pipe(PROMPT, num_inference_steps=STEPS),
        lambda: LatentImg2ImgPipeline.from_pipe(pipe)(PROMPT, image=scene_image()),
        lambda: pipe.invert(scene_image(), PROMPT, num_inference_steps=STEPS),
    ):
        with pytest.raises(ValueError, match="takes 9 input channels.*LatentInpaintPipeline"):
            call()


# ------------------------------------------------------------------------------------------------------ the CLI


def test_cli_edit_and_inpaint_write_the_pipelines_images(img2img, inpaint, tiny_sd_dir, tmp_path):
    scene_image().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    flags = ["--model", str(tiny_sd_dir), "--steps", str(STEPS), "--seed", "3", "--guidance", "4"]
    assert (
        main(
            [
                "edit",
                str(tmp_path / "in.png"),
                PROMPT,
                "--strength",
                "0.5",
                "-o",
                str(tmp_path / "e.png"),
                *flags,
            ]
        )
        == 0
    )
    args = [
        "inpaint",
        str(tmp_path / "in.png"),
        str(tmp_path / "mask.png"),
        PROMPT,
        "-o",
        str(tmp_path / "i.png"),
    ]
    assert main([*args, *flags]) == 0
    common = dict(num_inference_steps=STEPS, guidance_scale=4.0)
    [edited] = img2img(PROMPT, image=scene_image(), strength=0.5, generator=seeded(3), **common).images
    [inpainted] = inpaint(
        PROMPT, image=scene_image(), mask_image=square_mask(), generator=seeded(3), **common
    ).images
    written = Image.open(tmp_path / "e.png")
    assert written.text["strength"] == "0.5" and written.text["seed"] == "3"
    assert np.array_equal(np.asarray(written), np.asarray(edited))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "i.png")), np.asarray(inpainted))


def test_cli_names_a_bad_mask_file_and_a_missing_image(tiny_sd_dir, tmp_path, capsys):
    scene_image().save(tmp_path / "in.png")
    grey_mask().save(tmp_path / "grey.png")
    out = ["-o", str(tmp_path / "o.png"), "--model", str(tiny_sd_dir), "--steps", "1"]
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "grey.png"), PROMPT, *out]) == 2
    assert "mask_image is not binary" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "nowhere.png"), PROMPT, *out]) == 2
    assert "image=" in (err := capsys.readouterr().err) and "no such file" in err
    assert main(["edit", str(tmp_path / "in.png"), PROMPT, "--strength", "1.2", *out]) == 2
    assert "strength=1.2" in capsys.readouterr().err
