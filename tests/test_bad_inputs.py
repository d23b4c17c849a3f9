"""Bad inputs (issue 24): each is refused with one sentence that names the argument or file, or warned about by name,
and nothing the user had is lost. Every row snapshots the files involved and asserts they are byte-identical after.

Item numbers are the issue's. The training-side items (2, 6, 9, the checkpoint markers of 8, the data folders of 11,
"nan images/s" of 12) belong to train/ and are tested there.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from latentdiff import cli, lora
from latentdiff.data import shapes
from latentdiff.data.tokenizer import closed_vocabulary
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.generate import generate
from latentdiff.models.unet import ConditionalUNet
from latentdiff.noise_schedule import make_betas
from latentdiff.schedulers import DDIMScheduler
from pipelines.latent_pipeline import LatentPipeline

# ---------------------------------------------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots` (or the file itself) -> its bytes: equal snapshots mean nothing was lost."""
    files = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                files[str(path)] = path.read_bytes()
    return files


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`latentdiff ARGV` in this process: (exit code, stderr); argparse's own errors exit through SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir) -> LatentPipeline:
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_file(tiny_sd_dir, tmp_path_factory) -> Path:
    """A rank-2 adapter on the tiny UNet's attention, written by `lora.save_lora`."""
    unet = ConditionalUNet.from_pretrained(tiny_sd_dir, subfolder="unet")
    lora.add_lora(
        unet, lora.LoraSpec(2, 2.0, 0.0, lora.ATTENTION_TARGETS), generator=torch.Generator().manual_seed(0)
    )
    return lora.save_lora(tmp_path_factory.mktemp("lora"), unet=unet)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the cheap checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks")

    monkeypatch.setattr("pipelines.latent_pipeline._load_parts", refuse)


def existing_dataset(tmp_path: Path) -> Path:
    """A folder holding a dataset make-dataset wrote and a user's own file beside it."""
    out = shapes.write_shapes_dataset(tmp_path / "data", num_images=3, size=32, progress=False)
    (out / "notes.txt").write_text("mine")
    return out


# ------------------------------------------------------------ 1 and 12: make-dataset loses nothing, leaves nothing

BAD_DATASET_FLAGS = [
    (["--size", "7"], "size=7"),
    (["--polygon-fraction", "2"], "polygon_fraction=2.0"),
    (["--star-fraction", "-1"], "star_fraction=-1.0"),
    (["--num-images", "0"], "num_images=0"),  # item 7
    (["--seed", "-3"], "seed=-3"),
]


@pytest.mark.parametrize("flags, named", BAD_DATASET_FLAGS)
def test_make_dataset_overwrite_checks_every_flag_before_touching_the_folder(tmp_path, capsys, flags, named):
    out = existing_dataset(tmp_path)
    before = snapshot(out)
    code, err = run_cli(["make-dataset", "shapes", out, "--overwrite", *flags], capsys)
    assert code == 2 and named in err
    assert snapshot(out) == before


@pytest.mark.parametrize("flags, named", BAD_DATASET_FLAGS[:2])
def test_a_failed_make_dataset_leaves_no_folder_behind(tmp_path, capsys, flags, named):
    out = tmp_path / "new"
    code, err = run_cli(["make-dataset", "shapes", out, *flags], capsys)
    assert code == 2 and named in err and not out.exists()
    code, _ = run_cli(["make-dataset", "shapes", out, "--num-images", "2", "--size", "32"], capsys)  # item 12
    assert code == 0 and len(list((out / "images").iterdir())) == 2


def test_make_dataset_overwrite_refuses_and_names_files_it_did_not_write(tmp_path, capsys):
    out = existing_dataset(tmp_path)
    (out / "images" / "holiday.jpg").write_bytes(b"a user's photo")
    before = snapshot(out)
    code, err = run_cli(
        ["make-dataset", "shapes", out, "--overwrite", "--num-images", "2", "--size", "32"], capsys
    )
    assert code == 2 and "holiday.jpg" in err and "Nothing was changed" in err
    assert snapshot(out) == before


def test_make_dataset_overwrite_refuses_a_metadata_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "theirs"
    (out / "images").mkdir(parents=True)
    (out / "images" / "cat.png").write_bytes(b"png")
    (out / "metadata.jsonl").write_text('{"file_name": "images/cat.png", "text": "a cat"}\n')
    before = snapshot(out)
    code, err = run_cli(
        ["make-dataset", "shapes", out, "--overwrite", "--num-images", "2", "--size", "32"], capsys
    )
    assert code == 2 and "metadata.jsonl" in err and "line 1" in err
    assert snapshot(out) == before


def test_make_dataset_overwrite_replaces_only_its_own_dataset(tmp_path, capsys):
    out = existing_dataset(tmp_path)
    code, _ = run_cli(
        ["make-dataset", "shapes", out, "--overwrite", "--num-images", "2", "--size", "32"], capsys
    )
    assert code == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.jsonl", "notes.txt"]


def test_make_dataset_failing_midway_leaves_the_old_dataset(tmp_path, monkeypatch):
    out = existing_dataset(tmp_path)
    before = snapshot(out)
    real = shapes.render_scene

    def render_then_fail(scene, size=64):
        if len(list(out.rglob("*.png"))) > 4:  # the old 3 images and 2 new ones
            raise OSError("disk full")
        return real(scene, size)

    monkeypatch.setattr(shapes, "render_scene", render_then_fail)
    with pytest.raises(OSError, match="disk full"):
        shapes.write_shapes_dataset(out, num_images=6, size=32, progress=False, overwrite=True)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        ["images", "metadata.jsonl", "notes.txt"]
    )


def test_a_killed_make_dataset_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "data"
    (out / ".make-dataset-killed" / "images").mkdir(parents=True)  # what a SIGKILL mid-run leaves
    shapes.write_shapes_dataset(out, num_images=2, size=32, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.jsonl"]


# ------------------------------------------------------------------------------ 3: generate never replaces a file


@pytest.mark.parametrize("num_images, existing", [(1, "out.png"), (2, "out-2.png")])
def test_generate_never_replaces_an_existing_file(tmp_path, tiny_sd_dir, no_model_load, num_images, existing):
    (tmp_path / existing).write_text("not an image: a user's notes")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=rf"{existing}.*already exists.*--overwrite"):
        generate("a red circle", tmp_path / "out.png", model=tiny_sd_dir, num_images=num_images, grid=False)
    assert snapshot(tmp_path) == before


def test_generate_overwrite_replaces_the_file(tmp_path, tiny_sd_dir, capsys):
    out = tmp_path / "out.png"
    out.write_text("old")
    code, err = run_cli(
        ["generate", "a red circle", "--model", tiny_sd_dir, "--steps", "1", "-o", out], capsys
    )
    assert code == 2 and "--overwrite" in err and out.read_text() == "old"
    args = ["generate", "a red circle", "--model", tiny_sd_dir, "--steps", "1", "-o", out, "--overwrite"]
    assert run_cli(args, capsys)[0] == 0
    assert out.read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------------------- 4: unknown words named


def test_words_the_model_lacks_are_warned_about_by_name(pipe, caplog):
    with caplog.at_level("WARNING"):
        pipe(
            "an astronaut riding a red circle",
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
        )
    warned = " ".join(r.getMessage() for r in caplog.records if "vocabulary lacks" in r.getMessage())
    assert all(f"'{word}'" in warned for word in ("astronaut", "riding")) and "'red'" not in warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipe("a red circle", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert not [r for r in caplog.records if "vocabulary lacks" in r.getMessage()]


def test_the_default_has_a_closed_vocabulary_and_clip_an_open_one():
    from transformers import CLIPTokenizer

    default = closed_vocabulary(CLIPTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer"))
    assert {"circle", "square", "background"} <= default and "astronaut" not in default

    class OpenVocabulary:  # CLIP's tokenizer: 49,408 tokens
        def get_vocab(self):
            return {f"token{i}</w>": i for i in range(49408)}

    assert closed_vocabulary(OpenVocabulary()) is None


# ------------------------------------------------------------------------------- 5: non-finite numbers refused


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"guidance_scale": math.inf}, "guidance_scale=inf"),
        ({"guidance_scale": math.nan}, "guidance_scale=nan"),
        ({"guidance_rescale": math.nan}, "guidance_rescale=nan"),
        ({"eta": math.nan}, "eta=nan"),
        ({"latents": torch.full((1, 4, 8, 8), math.nan)}, "latents: 256 of 256 values are not finite"),
        (
            {"prompt": None, "prompt_embeds": torch.full((1, 77, 32), math.nan)},
            "prompt_embeds: 2464 of 2464 values are not finite",
        ),
    ],
)
def test_pipeline_refuses_non_finite_numbers(pipe, kwargs, named):
    call = {"prompt": "a red circle", "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=named):
        pipe(**call)


def test_lora_scales_must_be_finite(pipe, lora_file, capsys, tmp_path):
    before = {name: t.clone() for name, t in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="scale.*nan"):
        pipe.load_lora_weights(lora_file, scale=math.nan)
    name = pipe.load_lora_weights(lora_file, scale=0.5)
    try:
        with pytest.raises(ValueError, match=f"weight of adapter '{name}'=inf"):
            pipe.set_adapters([name], [math.inf])
        assert pipe._adapter_weights() == {name: 0.5}
    finally:
        pipe.unload_lora_weights()
    assert all(torch.equal(t, before[n]) for n, t in pipe.unet.state_dict().items())
    code, err = run_cli(
        ["generate", "a red circle", "--lora", f"{lora_file}:nan", "-o", tmp_path / "x.png"], capsys
    )
    assert code == 2 and "not a finite number" in err and not (tmp_path / "x.png").exists()
    code, err = run_cli(["generate", "a red circle", "--guidance", "inf", "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and "--guidance" in err


@pytest.mark.parametrize(
    "part, named",
    [
        ("unet", "the denoised latents: .* not finite"),
        ("vae", "the image the VAE decoded from finite latents: .* not finite"),
    ],
)
def test_nan_weights_give_an_error_not_a_black_image(tiny_sd_dir, tmp_path, part, named):
    broken = LatentPipeline.from_pretrained(tiny_sd_dir)
    broken.set_progress_bar_config(disable=True)
    layer = broken.unet.conv_out if part == "unet" else broken.vae.decoder.conv_out
    with torch.no_grad():
        layer.weight.fill_(math.nan)
    with pytest.raises(ValueError, match=named):
        broken("a red circle", num_inference_steps=1)


# ------------------------------------------------------------------------------------------------- 7: smaller


def test_seed_minus_one_is_random_and_the_seed_used_is_printed_and_stored(tmp_path, tiny_sd_dir, capsys):
    from PIL import Image

    out = tmp_path / "out.png"
    code = cli.main(
        [
            "generate",
            "a red circle",
            "--model",
            str(tiny_sd_dir),
            "--steps",
            "1",
            "-o",
            str(out),
            "--seed",
            "-1",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "(seed " in printed
    seed = int(printed.split("(seed ")[1].split(")")[0])
    assert seed >= 0 and Image.open(out).text["seed"] == str(seed)


def test_beta_start_above_beta_end_is_refused():
    with pytest.raises(ValueError, match="beta_start=0.02 is larger than beta_end=0.0001"):
        make_betas("linear", 1000, 0.02, 0.0001)
    with pytest.raises(ValueError, match="beta_start"):
        DDIMScheduler(beta_start=0.012, beta_end=0.00085, beta_schedule="scaled_linear")


def test_a_callback_may_not_change_the_latents_shape(pipe):
    def grow(pipeline, i, t, state):
        return {"latents": torch.zeros(1, 4, 16, 16)}

    with pytest.raises(
        ValueError, match=r"callback_on_step_end returned latents .*\(1, 4, 16, 16\).*same shape"
    ):
        pipe("a red circle", num_inference_steps=2, callback_on_step_end=grow)


# ----------------------------------------------------------------------- 8: corrupt weights name their file


@pytest.mark.parametrize(
    "part, file",
    [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ],
)
def test_a_truncated_weights_file_is_named(tiny_sd_dir, tmp_path, capsys, part, file):
    model = shutil.copytree(tiny_sd_dir, tmp_path / "model")
    weights = model / part / file
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*truncated or corrupt"):
        LatentPipeline.from_pretrained(model)
    code, err = run_cli(["generate", "a red circle", "--model", model, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and str(weights) in err
    assert snapshot(model) == before


def test_a_truncated_lora_file_is_named(pipe, lora_file, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(lora_file.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}.*truncated or corrupt"):
        pipe.load_lora_weights(broken)
    assert pipe.get_list_adapters() == {"unet": [], "text_encoder": []}


# --------------------------------------------------------------------- 10 and 11: cheap checks first, each named


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--height", "100000"], "height=100000 is larger than this model can make: at most 256 px"),
        (["--width", "30"], "width=30 must be a positive int divisible by 8"),
        (["--seed", str(10**23)], "seed=100000000000000000000000 is out of range"),
        (["--lora", "some/path:abc"], "the scale 'abc' is not a number"),
        (["--lora", "no/such/adapter"], "no LoRA adapter at 'no/such/adapter'"),
        (["-o", "no/such/folder/x.png"], "the folder 'no/such/folder' does not exist"),
        (["--steps", "0"], "steps=0"),
    ],
)
def test_generate_checks_cheap_things_before_loading_the_model(
    tiny_sd_dir, tmp_path, capsys, no_model_load, flags, named
):
    args = ["generate", "a red circle", "--model", tiny_sd_dir, "-o", tmp_path / "x.png", *flags]
    code, err = run_cli(args, capsys)
    assert code == 2 and named in err and err.count("\n") == 1  # one line, no traceback


def test_an_unwritable_output_folder_is_refused_before_loading(
    tmp_path, tiny_sd_dir, monkeypatch, no_model_load
):
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path)  # root ignores chmod
    with pytest.raises(ValueError, match="is not writable"):
        generate("a red circle", tmp_path / "x.png", model=tiny_sd_dir)


def test_bench_checks_the_json_folder_before_running(tmp_path, capsys, no_model_load):
    code, err = run_cli(
        ["bench", "--json", tmp_path / "missing" / "r.json", "--grid", tmp_path / "g.png"], capsys
    )
    assert code == 2 and "--json" in err and "does not exist" in err


def test_unet_config_and_weights_that_disagree_are_named(tiny_sd_dir, tmp_path):
    unet_dir = shutil.copytree(tiny_sd_dir / "unet", tmp_path / "unet")
    config = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
    with pytest.raises(ValueError, match=r"do not match its config.json.*another shape"):
        ConditionalUNet.from_pretrained(unet_dir)
    (unet_dir / "config.json").write_text("{not json")
    before = snapshot(unet_dir)
    with pytest.raises(ValueError, match=r"unet/config.json is not valid JSON"):
        ConditionalUNet.from_pretrained(unet_dir)
    assert snapshot(unet_dir) == before


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        ({"generator": 0}, TypeError, r"generator must be a torch.Generator.*manual_seed"),
        ({"guidance_scale": "5"}, TypeError, "guidance_scale must be a number"),
        ({"height": 100000}, ValueError, "height=100000 is larger"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 16)}, ValueError, r"prompt_embeds .* width 32"),
    ],
)
def test_pipeline_arguments_are_named(pipe, kwargs, error, named):
    with pytest.raises(error, match=named):
        pipe(**{"prompt": "a red circle", "num_inference_steps": 1, **kwargs})


def test_a_float16_input_into_a_float32_unet_is_named(pipe):
    with pytest.raises(TypeError, match=r"sample is torch.float16 but the UNet's weights are torch.float32"):
        pipe.unet(torch.zeros(1, 4, 8, 8, dtype=torch.float16), 10, torch.zeros(1, 77, 32))


# ------------------------------------------------------------------------------------------------- 12: noise


def test_generate_logs_no_float32_note(tmp_path, tiny_sd_dir):
    notes: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = notes.append
    diffusers_logger = logging.getLogger("diffusers")  # it does not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        generate("a red circle", tmp_path / "x.png", model=tiny_sd_dir, steps=1)
    finally:
        diffusers_logger.removeHandler(handler)
    assert (tmp_path / "x.png").is_file()
    assert not [r for r in notes if "kept in float32" in r.getMessage()]
