"""Sampling settings that travel with a model (`sampling_settings.json`): read when the caller sets nothing,
overridden by explicit arguments, absent means diffusers' defaults, a malformed file is an error naming it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import cli
from latentdiff.generate import generate
from latentdiff.sampling_settings import SETTINGS_FILE, SamplingSettings, read_sampling_settings
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
from pipelines import LatentPipeline

PROMPT = "a red circle in the top left"
CARRIED = {"sampler": "ddpm", "num_inference_steps": 3, "guidance_scale": 1.0}


@pytest.fixture()
def carrying_dir(tiny_sd_dir, tmp_path):
    """The tiny SD folder with a sampling_settings.json: DDPM, 3 steps, guidance 1 (none of diffusers' defaults)."""
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "model")
    (folder / SETTINGS_FILE).write_text(json.dumps(CARRIED))
    return folder


def steps_run(pipe: LatentPipeline, **arguments) -> tuple[int, np.ndarray]:
    """(number of denoising steps a call runs, its image) for fixed initial noise."""
    seen = []
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = pipe(
        PROMPT,
        latents=latents,
        output_type="np",
        generator=torch.Generator().manual_seed(1),
        callback_on_step_end=lambda *step: seen.append(step[1]),
        **arguments,
    ).images
    return len(seen), image


def test_a_folder_without_the_file_keeps_diffusers_defaults(tiny_sd_dir):
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    assert pipe.sampling_settings == SamplingSettings()
    assert type(pipe.scheduler) is DDIMScheduler  # the folder's PNDM config read as DDIM, as before
    assert pipe.resolve_sampling() == (50, 7.5)  # StableDiffusionPipeline.__call__'s defaults


def test_the_carried_settings_are_used_when_the_caller_sets_none(carrying_dir, tiny_sd_dir):
    pipe = LatentPipeline.from_pretrained(carrying_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling_settings == SamplingSettings(**CARRIED)
    assert type(pipe.scheduler) is DDPMScheduler
    count, carried = steps_run(pipe)
    assert count == 3
    # the same call on the folder without the file, with the carried values given explicitly
    plain = LatentPipeline.from_pretrained(tiny_sd_dir, scheduler=pipe.scheduler)
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(steps_run(plain, num_inference_steps=3, guidance_scale=1.0)[1], carried)


def test_explicit_arguments_win(carrying_dir, tiny_sd_dir):
    pipe = LatentPipeline.from_pretrained(carrying_dir, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is DDIMScheduler  # an explicit sampler wins over the carried one
    count, image = steps_run(pipe, num_inference_steps=2, guidance_scale=4.0)
    assert count == 2
    plain = LatentPipeline.from_pretrained(tiny_sd_dir, scheduler=DDIMScheduler())
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(steps_run(plain, num_inference_steps=2, guidance_scale=4.0)[1], image)
    assert steps_run(pipe, guidance_scale=4.0)[0] == 3  # only what is given is overridden


def test_save_pretrained_writes_the_settings_and_they_round_trip(tiny_sd_dir, carrying_dir, tmp_path):
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / SETTINGS_FILE).exists()  # none given, none carried: no file
    given = SamplingSettings(sampler="ddim", num_inference_steps=25, guidance_scale=3.0)
    pipe.save_pretrained(tmp_path / "given", sampling_settings=given)
    assert json.loads((tmp_path / "given" / SETTINGS_FILE).read_text()) == given.to_dict()
    assert LatentPipeline.from_pretrained(tmp_path / "given").sampling_settings == given
    LatentPipeline.from_pretrained(carrying_dir).save_pretrained(
        tmp_path / "again"
    )  # carried settings travel
    assert read_sampling_settings(tmp_path / "again") == SamplingSettings(**CARRIED)


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "is not valid JSON"),
        ("[25, 3.0]", "must hold a JSON object"),
        ('{"steps": 25}', "unknown keys ['steps']"),
        ('{"num_inference_steps": 0}', "num_inference_steps=0"),
        ('{"guidance_scale": "high"}', "guidance_scale='high'"),
        ('{"sampler": "euler-magic"}', "sampler='euler-magic'"),
    ],
)
def test_a_malformed_file_is_an_error_naming_it(tiny_sd_dir, tmp_path, text, says):
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "model")
    (folder / SETTINGS_FILE).write_text(text)
    with pytest.raises(ValueError, match=str(folder / SETTINGS_FILE)) as error:
        LatentPipeline.from_pretrained(folder)
    assert says in str(error.value)


def test_generate_and_the_cli_use_the_carried_settings_unless_given(carrying_dir, tmp_path, capsys):
    [path] = generate(PROMPT, tmp_path / "carried.png", model=carrying_dir, seed=0)
    with Image.open(path) as image:
        assert (image.text["steps"], image.text["guidance"]) == ("3", "1.0")
        assert image.text["sampler"] == "DDPMScheduler"
    arguments = ["generate", PROMPT, "--model", str(carrying_dir), "--seed", "0", "--steps", "2"]
    assert cli.main([*arguments, "--sampler", "ddim", "-o", str(tmp_path / "given.png")]) == 0
    with Image.open(tmp_path / "given.png") as image:
        assert (image.text["steps"], image.text["guidance"], image.text["sampler"]) == ("2", "1.0", "ddim")
    (carrying_dir / SETTINGS_FILE).write_text("{broken")
    assert cli.main(["generate", PROMPT, "--model", str(carrying_dir), "-o", str(tmp_path / "x.png")]) == 2
    assert str(carrying_dir / SETTINGS_FILE) in capsys.readouterr().err
