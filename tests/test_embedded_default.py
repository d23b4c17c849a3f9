"""The embedded default model shipped in latentdiff/assets/default: it loads offline, draws what simple prompts say
(this guards the shipped weights), and `LatentPipeline()`, `latentdiff generate` and `latentdiff bench` use it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from latentdiff import LatentPipeline, cli
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.eval import shapesbench
from latentdiff.sampling_settings import SETTINGS_FILE, SamplingSettings

# Simple single-object prompts of the training grammar (none is a ShapesBench prompt); seed i for prompt i.
GUARD_PROMPTS = [
    "a large red circle in the top left on a black background",
    "a large blue square in the center on a white background",
    "a large yellow triangle at the bottom on a gray background",
    "a large green square on the right on a black background",
    "a large orange circle in the bottom right on a white background",
    "a large purple triangle at the top on a gray background",
    # held-out colour-shape pairs (never in the training images) and two objects
    "a small purple circle in the center on a white background",
    "a large green triangle on the left on a black background",
    "a small orange square in the top right on a gray background",
    "a small red circle on the left and a large blue triangle on the right, on a black background",
]


@pytest.fixture(scope="module")
def default_pipe() -> LatentPipeline:
    pipe = LatentPipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_default_is_small_safetensors_in_the_sd_layout():
    files = [f for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file()]
    assert (DEFAULT_MODEL_DIR / "model_index.json").is_file()
    weights = [f for f in files if f.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    assert not weights, f"pickled weights shipped: {weights}"
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3  # unet, vae, text encoder


def test_the_default_carries_its_sampling_settings(default_pipe):
    carried = json.loads((DEFAULT_MODEL_DIR / SETTINGS_FILE).read_text())
    assert default_pipe.sampling_settings == SamplingSettings(**carried)
    assert carried.keys() == {"sampler", "num_inference_steps", "guidance_scale"}
    assert type(default_pipe.scheduler).__name__.lower().startswith(carried["sampler"])


def test_the_default_loads_offline_in_float32(default_pipe):
    for part in (default_pipe.unet, default_pipe.vae, default_pipe.text_encoder):
        assert all(p.dtype == torch.float32 for p in part.parameters())
    code = "from latentdiff import LatentPipeline; LatentPipeline(); print('ok')"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_default_draws_what_simple_prompts_ask_for(default_pipe):
    # Each image must be read by the detector as its whole prompt (colour, shape, size, position, background and no
    # extra object): this guards the shipped weights, held-out pairs included, at the sampling settings the default
    # carries (sampling_settings.json: 4 DDIM steps, guidance 1.5), as LatentPipeline()(prompt) runs. The strict
    # detector (outline checks, issue 18) reads all 10 as their prompts (8 at the guidance 2 carried before: two
    # triangles, their sides bowed in, were refused); one miss is allowed, as another CPU's float rounding may move an
    # image (README "The embedded default").
    generators = [torch.Generator().manual_seed(i) for i in range(len(GUARD_PROMPTS))]
    images = default_pipe(GUARD_PROMPTS, generator=generators).images
    right = [shapesbench.matches_prompt(image, prompt) for image, prompt in zip(images, GUARD_PROMPTS)]
    assert sum(right) >= len(GUARD_PROMPTS) - 1, (
        f"only {sum(right)} of {len(GUARD_PROMPTS)} images match their prompt: {right}"
    )


def test_latentdiff_generate_uses_the_default(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli.main(["generate", GUARD_PROMPTS[0], "-o", str(out), "--seed", "0"]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    assert Image.open(out).size == (64, 64)
    assert gc.isenabled()  # generate pauses garbage collection while it runs, and only then


def test_bench_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    assert cli.main(["bench", "--model", str(tmp_path)]) == 2
    assert "is not a Stable Diffusion folder" in capsys.readouterr().err


def test_bench_names_an_unknown_word_in_a_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na red zebra\n")
    assert cli.main(["bench", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "zebra" in err and "line 2" in err


@pytest.mark.slow
def test_bench_runs_on_a_prompt_file_and_writes_the_json(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(GUARD_PROMPTS[:2]) + "\n")
    out = tmp_path / "bench.json"
    args = ["bench", "--prompts", str(prompts), "--json", str(out), "--grid", str(tmp_path / "grid.png")]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    assert result["single"]["num_prompts"] == 2 and result["detector"]["full_match"] >= 0.99
    assert result["vae_ceiling"]["full_match"] is not None and (tmp_path / "grid.png").is_file()


def test_bench_sweep_names_a_bad_setting_before_loading_a_model(capsys):
    assert cli.main(["bench", "--sweep", "temperature=1,2"]) == 2
    assert "--sweep 'temperature=1,2'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sweep_scores_each_value_and_writes_the_plot_and_json(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(GUARD_PROMPTS[0] + "\n")
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = [
        "bench",
        "--prompts",
        str(prompts),
        "--sweep",
        "steps=2,6",
        "--json",
        str(out),
        "--plot",
        str(plot),
    ]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    assert result["sweep"] == "steps" and result["values"] == [2, 6] and result["settings"]["steps"] == [2, 6]
    assert [r["single"]["num_prompts"] for r in result["results"]] == [1, 1]
    assert result["detector"]["full_match"] >= 0.99 and result["vae_ceiling"]["fidelity"] > 0.9
    with Image.open(plot) as image:
        assert image.format == "PNG"
