"""Any sampler in LatentPipeline: diffusers' scheduler objects and this project's, against StableDiffusionPipeline.

Everything runs on the tiny diffusers-written SD folder of conftest.py (32 px images, a few steps).
"""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from latentdiff.cli import SAMPLER_NAMES, main
from latentdiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    sampler_from_config,
)
from latentdiff.schedulers.registry import SAMPLERS as REGISTRY
from pipelines import LatentPipeline

PROMPTS = ["a red circle in the top left", "a small blue square on a white background"]
STEPS = 4
TOLERANCE = 2e-3  # images in [0, 1], as tests/test_pipeline.py's parity tests

# name -> (diffusers' class, this project's class, config values that make the sampler)
SAMPLERS = {
    "euler": (diffusers.EulerDiscreteScheduler, EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler, {}),
    "heun-karras": (diffusers.HeunDiscreteScheduler, HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde-karras": (
        diffusers.DPMSolverMultistepScheduler,
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
}


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir) -> LatentPipeline:
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_sd_dir) -> StableDiffusionPipeline:
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    return reference


def with_scheduler(pipe: LatentPipeline, scheduler) -> LatentPipeline:
    other = LatentPipeline(pipe.unet, scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)
    other.set_progress_bar_config(disable=True)
    return other


def reference_with(reference: StableDiffusionPipeline, scheduler) -> StableDiffusionPipeline:
    other = StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})
    other.set_progress_bar_config(disable=True)
    return other


def images(pipeline, generators: bool) -> np.ndarray:
    """Two prompts with guidance; one generator, or (generators=True) one per image."""
    generator = (
        [torch.Generator().manual_seed(i) for i in range(2)]
        if generators
        else torch.Generator().manual_seed(0)
    )
    return pipeline(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=6.0, generator=generator, output_type="np"
    ).images


@pytest.mark.parametrize("generators", [False, True], ids=["one generator", "a generator per image"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_a_diffusers_scheduler_drives_latent_pipeline_as_stable_diffusion(pipe, reference, name, generators):
    theirs_class, _, settings = SAMPLERS[name]
    config = dict(reference.scheduler.config)
    ours = images(with_scheduler(pipe, theirs_class.from_config(config, **settings)), generators)
    theirs = images(reference_with(reference, theirs_class.from_config(config, **settings)), generators)
    assert ours.std() > 0.01 and np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("theirs_class", [diffusers.DDIMScheduler, diffusers.DDPMScheduler])
def test_diffusers_ddim_and_ddpm_with_their_defaults_drive_latent_pipeline_as_stable_diffusion(
    pipe, reference, theirs_class
):
    # Built from the folder's PNDM config, they take diffusers' default clip_sample=True; StableDiffusionPipeline
    # turns it off when given the scheduler, and so must LatentPipeline (clamping latents to [-1, 1] ruins them).
    config = dict(reference.scheduler.config)
    ours_scheduler = theirs_class.from_config(config)
    assert ours_scheduler.config.clip_sample is True
    ours = images(with_scheduler(pipe, ours_scheduler), generators=False)
    theirs = images(reference_with(reference, theirs_class.from_config(config)), generators=False)
    assert ours_scheduler.config.clip_sample is False
    assert ours.std() > 0.01 and np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("name", SAMPLERS)
def test_own_samplers_give_stable_diffusions_images_with_diffusers_samplers(pipe, reference, name):
    theirs_class, ours_class, settings = SAMPLERS[name]
    config = dict(reference.scheduler.config)
    ours = images(with_scheduler(pipe, ours_class.from_config(config, **settings)), generators=True)
    theirs = images(reference_with(reference, theirs_class.from_config(config, **settings)), generators=True)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    # The sampler matters: a sampler of the other family draws other images. Each is close to one of its own family:
    # DDIM is Euler's method in x/sqrt(alpha_bar) against sigma (Karras et al. 2022, eq. 4), and Euler ancestral
    # draws DDPM's ancestral steps; so deterministic samplers are set against DDPM, stochastic ones against DDIM.
    stochastic = name in ("euler_a", "dpmpp_2m_sde-karras")
    contrast_class = DDIMScheduler if stochastic else DDPMScheduler
    contrast = images(with_scheduler(pipe, contrast_class.from_config(config)), generators=True)
    assert np.abs(ours - contrast).max() > 1e-2


def test_scheduler_swap_by_from_config_as_in_diffusers(pipe):
    swapped = with_scheduler(pipe, pipe.scheduler)
    swapped.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert swapped.scheduler.config.beta_schedule == "scaled_linear"
    first = images(swapped, generators=False)
    swapped.scheduler = EulerDiscreteScheduler.from_config(swapped.scheduler.config)
    assert np.abs(images(swapped, generators=False) - first).max() <= TOLERANCE


@pytest.mark.parametrize(
    "written,loaded",
    [
        (diffusers.EulerDiscreteScheduler, EulerDiscreteScheduler),
        (diffusers.EulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler),
        (diffusers.HeunDiscreteScheduler, HeunDiscreteScheduler),
        (diffusers.DPMSolverMultistepScheduler, DPMSolverMultistepScheduler),
        (diffusers.PNDMScheduler, DDIMScheduler),  # as SD 1.x ships: DDIM, clip_sample off
        (diffusers.UniPCMultistepScheduler, DDIMScheduler),  # not built here: DDIM, with a warning
    ],
)
def test_a_folder_config_naming_a_sampler_loads_that_sampler(tiny_sd_dir, tmp_path, written, loaded, caplog):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    config = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    shutil.rmtree(folder / "scheduler")
    written.from_config(config, use_karras_sigmas=True).save_pretrained(folder / "scheduler")
    pipe = LatentPipeline.from_pretrained(folder)
    assert type(pipe.scheduler) is loaded
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    if "use_karras_sigmas" in pipe.scheduler.config:
        assert pipe.scheduler.config.use_karras_sigmas
    if loaded is DDIMScheduler:
        assert pipe.scheduler.config.clip_sample is False
    if written is diffusers.UniPCMultistepScheduler:
        assert "UniPCMultistepScheduler" in caplog.text
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images.std() > 0.01


# ------------------------------------------------------------------------------------------------ CLI and names


def test_cli_sampler_names_are_the_registrys_and_help_lists_them(capsys):
    assert SAMPLER_NAMES == tuple(REGISTRY)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = capsys.readouterr().out
    assert "{" + ",".join(SAMPLER_NAMES) + "}" in shown and "--karras" in shown


def test_cli_generate_with_a_sampler_and_karras_writes_that_samplers_image(
    pipe, tiny_sd_dir, tmp_path, capsys
):
    out = tmp_path / "dpm.png"
    arguments = [
        "generate",
        PROMPTS[0],
        "--model",
        str(tiny_sd_dir),
        "--steps",
        "3",
        "--seed",
        "5",
        "--guidance",
        "5",
        "-o",
        str(out),
    ]
    assert main([*arguments, "--sampler", "dpmpp_2m", "--karras"]) == 0
    with Image.open(out) as image:
        assert image.text["sampler"] == "dpmpp_2m" and image.text["karras"] == "True"
        written = np.asarray(image.convert("RGB"))
    chosen = with_scheduler(pipe, sampler_from_config("dpmpp_2m", pipe.scheduler.config, karras=True))
    expected = chosen(
        PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, generator=[torch.Generator().manual_seed(5)]
    )
    np.testing.assert_array_equal(written, np.asarray(expected.images[0]))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sampler", "euler_a", "--karras"], "no Karras sigmas"),
        (["--sampler", "ddim", "--karras"], "no Karras sigmas"),
        (["--karras"], "DDIMScheduler has no Karras sigmas"),  # the model's own sampler is DDIM
        (["--sampler", "euler", "--steps", "1001"], "num_inference_steps=1001"),
    ],
)
def test_cli_bad_sampler_input_is_a_clear_error(tiny_sd_dir, tmp_path, capsys, extra, message):
    arguments = ["generate", PROMPTS[0], "--model", str(tiny_sd_dir), "-o", str(tmp_path / "x.png"), *extra]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_unknown_sampler_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "--sampler", "lms"])
    assert exit_info.value.code == 2 and "invalid choice: 'lms'" in capsys.readouterr().err
