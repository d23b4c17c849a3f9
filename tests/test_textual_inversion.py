"""Textual inversion: the file format (diffusers' learned_embeds.safetensors, diffusers' pipeline as the oracle), the
pipeline's `load_textual_inversion`, bad files, and training (train/train_textual_inversion.py: only the new rows)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff import textual_inversion
from pipelines.latent_pipeline import LatentPipeline
from tests.test_train import command_line

PROMPT = "a <thing> on the left on a white background"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir) -> LatentPipeline:
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(loaded) -> LatentPipeline:
    """A fresh pipeline for each test: loading an embedding changes the tokenizer and the text encoder."""
    fresh = LatentPipeline(
        loaded.unet,
        loaded.scheduler,
        loaded.vae,
        copy.deepcopy(loaded.text_encoder),
        copy.deepcopy(loaded.tokenizer),
    )
    fresh.set_progress_bar_config(disable=True)
    return fresh


def embedding_file(folder: Path, token: str = "<thing>", num_vectors: int = 2, width: int = 32) -> Path:
    """A learned-embeddings file in diffusers' layout, {token: (N, D)}, with vectors far from any word's."""
    folder.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(num_vectors, width, generator=torch.Generator().manual_seed(3))
    save_file({token: vectors}, str(folder / textual_inversion.TEXT_INVERSION_WEIGHTS_NAME))
    return folder


def images(pipeline, prompt: str = PROMPT) -> np.ndarray:
    return pipeline(
        prompt,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_an_embedding_file_gives_diffusers_images(pipe, tiny_sd_dir, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = embedding_file(tmp_path / "ti")  # two vectors: the prompt is expanded to "<thing> <thing>_1"
    reference = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir,
        scheduler=DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler"),
        safety_checker=None,
    )
    reference.set_progress_bar_config(disable=True)
    before = images(pipe)
    reference.load_textual_inversion(str(folder))
    assert pipe.load_textual_inversion(folder) == "<thing>"
    theirs, ours = images(reference), images(pipe)
    assert np.abs(ours - before).max() > 0.05  # the new word changes the image ...
    assert np.abs(ours - theirs).max() <= 2e-3  # ... as it does in diffusers
    assert pipe.maybe_convert_prompt(PROMPT) == reference.maybe_convert_prompt(PROMPT, reference.tokenizer)


def test_loading_adds_rows_and_leaves_the_others_and_a_token_given_renames(pipe, tmp_path):
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    folder = embedding_file(tmp_path / "ti", num_vectors=1)
    assert pipe.load_textual_inversion(folder / "learned_embeds.safetensors", token="<other>") == "<other>"
    after = pipe.text_encoder.get_input_embeddings().weight
    (new_id,) = pipe.tokenizer.convert_tokens_to_ids(["<other>"])
    assert torch.equal(after[: len(before)], before) and new_id >= len(before)
    torch.testing.assert_close(
        after[new_id], load_file(str(folder / "learned_embeds.safetensors"))["<thing>"][0]
    )
    assert pipe.tokenizer.tokenize("a <other> star")[1] == "<other>"


def test_a_known_token_a_wrong_width_and_a_missing_file_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"'star' is already in the tokenizer's vocabulary \(as 'star</w>'"):
        pipe.load_textual_inversion(embedding_file(tmp_path / "a", token="star"))
    with pytest.raises(
        ValueError, match="has shape \\(1, 768\\) but this text encoder's token embeddings are 32 wide"
    ):
        pipe.load_textual_inversion(embedding_file(tmp_path / "b", num_vectors=1, width=768))
    with pytest.raises(FileNotFoundError, match="no textual inversion embedding at"):
        pipe.load_textual_inversion(tmp_path / "nothing")
    assert (
        len(pipe.tokenizer) == len(pipe.tokenizer.get_vocab()) and "<thing>" not in pipe.tokenizer.get_vocab()
    )


def test_the_web_ui_layout_loads_under_the_file_name(pipe, tmp_path):
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "shiny.safetensors"))
    assert pipe.load_textual_inversion(tmp_path / "shiny.safetensors") == "shiny"


# ---- training: train/train_textual_inversion.py -------------------------------------------------------------------


def ti_args(model: Path, data: Path, out: Path, **flags) -> list[str]:
    """A tiny run: 9 images (one corrupt), batch 2; `circle` in the captions is read as the new word `<round>`."""
    values = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 3,
        "learning_rate": 5e-2,
        "adam_weight_decay": 1e-2,  # AdamW's decay would move every row it were given: only v* is
        "lr_warmup_steps": 0,
        "seed": 0,
        "report_to": "none",
        "checkpointing_steps": 3,
        "placeholder_token": "<round>",
        "initializer_token": "square",
        "num_vectors": 2,
        "replace_word": "circle",
        **flags,
    }
    return command_line(values)


def test_training_changes_only_the_new_rows_and_exports_a_loadable_file(
    tiny_sd_dir, train_data, tmp_path, monkeypatch
):
    from train import train_textual_inversion

    seen = {}
    add = train_textual_inversion.add_placeholder

    def add_and_keep(cfg, models, dtype):  # the run's models, and E before S* is added
        seen["before"] = models.text_encoder.get_input_embeddings().weight.detach().clone()
        seen["models"] = models
        trained = add(cfg, models, dtype)
        seen["start"] = trained.vectors.detach().clone()
        seen["unet"] = {k: v.clone() for k, v in models.unet.state_dict().items()}
        return trained

    monkeypatch.setattr(train_textual_inversion, "add_placeholder", add_and_keep)
    out = tmp_path / "run"
    assert train_textual_inversion.main(ti_args(tiny_sd_dir, train_data, out)) == 0
    models = seen["models"]
    square = models.tokenizer.convert_tokens_to_ids("square</w>")
    embedding = models.text_encoder.get_input_embeddings().weight
    assert torch.equal(
        embedding[: len(seen["before"])], seen["before"]
    )  # every row there before: bit-identical
    assert torch.equal(embedding[-2:], seen["before"][[square, square]])  # E's new rows are not even written
    assert all(torch.equal(v, seen["unet"][k]) for k, v in models.unet.state_dict().items())
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert list(saved) == ["<round>"] and saved["<round>"].shape == (2, 32)
    assert torch.equal(seen["start"], seen["before"][[square, square]])  # v* starts as the initializer ...
    assert (saved["<round>"] - seen["start"]).abs().min() > 0  # ... and every coordinate trained
    assert sorted(load_file(str(out / "checkpoint-3" / "model.safetensors"))) == ["model.vectors"]  # v* alone
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_textual_inversion(out)
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[-2:], saved["<round>"])


def test_a_placeholder_the_tokenizer_knows_is_refused(tiny_sd_dir, train_data, tmp_path):
    from train import train_textual_inversion
    from train.loop_config import ConfigError

    with pytest.raises(ConfigError, match="'star' is already in the tokenizer's vocabulary"):
        train_textual_inversion.main(
            ti_args(tiny_sd_dir, train_data, tmp_path / "a", placeholder_token="star")
        )
    with pytest.raises(ConfigError, match="initializer token 'squares' is [0-9]+ tokens"):
        train_textual_inversion.main(
            ti_args(tiny_sd_dir, train_data, tmp_path / "b", initializer_token="squares")
        )


def test_bench_word_flag_writes_the_token_where_the_prompt_says_the_word():
    from latentdiff.cli import _parse_words, _replace_words

    words = _parse_words(["star=<star>"])
    assert _replace_words("a small red star in the top left", words) == "a small red <star> in the top left"
    assert _replace_words("a red stars", words) == "a red stars"  # whole words only
    with pytest.raises(SystemExit, match="expected WORD=TOKEN"):
        _parse_words(["star"])
