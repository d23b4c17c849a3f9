"""What the ecosystem expects of a text-to-image package, checked on real files: the prompt-first call form, the CLI's
device and dtype, the web UIs' PNG `parameters` chunk, model cards beside every saved model, the license, and the
training extras' message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from latentdiff import cli, lora
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.generate import generate
from latentdiff.images import parse_webui_parameters, webui_parameters
from pipelines.latent_pipeline import LatentPipeline

REPO = Path(__file__).resolve().parents[1]


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n"), f"{path} has no front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_a_prompt_given_at_construction_is_used_when_the_call_names_none():
    pipe = LatentPipeline("a large red circle in the center on a black background")
    pipe.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=2, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(0), **settings).images
    named = pipe(pipe.prompt, generator=torch.Generator().manual_seed(0), **settings).images
    other = pipe(
        "a small blue square in the top left", generator=torch.Generator().manual_seed(0), **settings
    )
    assert (ours == named).all() and not (ours == other.images).all()  # the call's own prompt still wins
    with pytest.raises(ValueError, match=r"pass exactly one of prompt"):
        LatentPipeline(pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)(
            num_inference_steps=2
        )


@pytest.mark.parametrize("model_path", [str(DEFAULT_MODEL_DIR), "owner/some-model"])
def test_a_model_path_is_not_taken_for_a_prompt(model_path):
    with pytest.raises(ValueError, match=r"model folder or hub id, not a prompt.*from_pretrained"):
        LatentPipeline(model_path)


def test_pngs_carry_the_web_ui_parameters_chunk(tmp_path):
    out = tmp_path / "out.png"
    generate("a red circle", out, negative="blurry", steps=2, guidance=3.0, seed=7, sampler="ddim")
    chunks = Image.open(out).text
    fields = parse_webui_parameters(chunks["parameters"])
    assert fields["prompt"] == "a red circle" and fields["negative_prompt"] == "blurry"
    assert fields["Steps"] == "2" and fields["Sampler"] == "DDIM" and fields["CFG scale"] == "3.0"
    assert fields["Seed"] == "7" and fields["Size"] == "{}x{}".format(*Image.open(out).size)
    assert fields["Model"] == "embedded default" and chunks["seed"] == "7"  # the project's own chunks stay
    assert (
        webui_parameters({"prompt": "x", "steps": "3"}) == "x\nSteps: 3"
    )  # no negative line when there is none


def test_web_ui_sampler_names_follow_the_web_uis_spelling(tmp_path):
    out = tmp_path / "euler.png"
    generate("a red circle", out, steps=2, guidance=3.0, seed=1, sampler="dpmpp_2m", karras=True)
    assert parse_webui_parameters(Image.open(out).text["parameters"])["Sampler"] == "DPM++ 2M Karras"
    assert webui_parameters({"prompt": "x", "sampler": "euler_a"}) == "x\nSampler: Euler a"
    assert (
        webui_parameters({"prompt": "x", "sampler": "MySampler"}) == "x\nSampler: MySampler"
    )  # unknown: as is


def test_generate_cli_passes_device_and_dtype(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("latentdiff.generate.generate", lambda *args, **kwargs: seen.update(kwargs) or [])
    assert cli.main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--dtype", "bfloat16"]) == 0
    best = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert seen["device"] == best and seen["torch_dtype"] == torch.bfloat16
    assert cli.main(["generate", "a red circle", "--device", "cpu"]) == 0
    assert seen["device"] == "cpu" and seen["torch_dtype"] is None  # float32, as stored in memory
    with pytest.raises(SystemExit):
        cli.main(["generate", "a red circle", "--dtype", "float8"])


def test_generate_runs_in_bfloat16(tmp_path):
    out = tmp_path / "bf16.png"
    assert cli.main(["generate", "a red circle", "-o", str(out), "--steps", "2", "--device", "cpu",
                     "--dtype", "bfloat16"]) == 0  # fmt: skip
    assert Image.open(out).size == (64, 64)


def test_saved_pipelines_and_adapters_carry_a_model_card(tiny_sd_dir, tmp_path):
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.save_pretrained(tmp_path / "pipe")
    card = front_matter(tmp_path / "pipe" / "README.md")
    assert card["library_name"] == "diffusers" and card["pipeline_tag"] == "text-to-image"
    assert card["license"] == "apache-2.0" and "latentdiff" in card["tags"]
    lora.add_lora(pipe.unet, lora.LoraSpec(4))
    lora.save_lora(tmp_path / "adapter", unet=pipe.unet)
    card = front_matter(tmp_path / "adapter" / "README.md")
    assert "lora" in card["tags"] and card["library_name"] == "diffusers"
    assert "load_lora_weights" in (tmp_path / "adapter" / "README.md").read_text()
    default = front_matter(DEFAULT_MODEL_DIR / "README.md")
    assert "shapes" in default["tags"] and default["license"] == "apache-2.0"


def test_the_license_is_the_apache_license_the_package_declares():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


def test_training_says_which_extras_are_missing():
    code = "import sys; sys.modules['datasets'] = None; import train"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "training needs datasets" in done.stderr and ".[train]" in done.stderr


def test_the_command_line_and_generate_import_only_what_they_use():
    """`latentdiff --help` imports none of torch and the libraries over it; `latentdiff generate`'s modules import
    none of training, the bench, the web UI, the other pipelines or datasets (start-up time spent for nothing)."""
    code = (
        "import json, sys; import latentdiff.cli; cli = sorted(sys.modules); "
        "import latentdiff.generate, pipelines.latent_pipeline; print(json.dumps([cli, sorted(sys.modules)]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cli, generate = json.loads(done.stdout.strip().splitlines()[-1])
    heavy = {"torch", "diffusers", "transformers", "peft", "accelerate", "datasets"}
    assert not heavy & {name.split(".")[0] for name in cli}
    unused = (
        "train",
        "datasets",
        "latentdiff.eval",
        "latentdiff.webui",
        "latentdiff.bench_edits",
        "latentdiff.edit",
    )
    unused += ("pipelines.controlnet", "pipelines.img2img_pipeline", "pipelines.inpaint_pipeline")
    assert [
        name for name in generate if name in unused or name.startswith(tuple(u + "." for u in unused))
    ] == []
