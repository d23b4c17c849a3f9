"""The embedded default's own training stages, in miniature: the word tokenizer, train_vae.py, train_clip.py (the
tool that built the default's tokenizer; no longer a stage of train/build_default.sh, which takes the tokenizer from
the shipped default), and train_t2i.py from scratch on their outputs, ending in a pipeline that loads and generates;
and the recipe's own configs, read as build_default.sh passes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.data.shapes import write_shapes_dataset
from latentdiff.data.tokenizer import build_word_tokenizer
from train import train_clip, train_t2i, train_vae
from train.arguments import parse_config
from train.loop_config import ConfigError
from train.tasks import clip, vae
from train.tasks.t2i_config import T2IConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", num_images=24, size=32, seed=0)


def common_flags(data: Path, out: Path, steps: int = 2) -> list[str]:
    return [
        "--train_data_dir", str(data), "--resolution", "32", "--center_crop", "--train_batch_size", "4",
        "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
        "--output_dir", str(out), "--report_to", "none", "--mixed_precision", "no", "--validation_holdout", "4",
        "--validation_steps", str(steps),
    ]  # fmt: skip


def test_word_tokenizer_makes_every_word_one_token_and_still_reads_other_text(tmp_path):
    words = ["a", "large", "green", "triangle", "left", "right", "background", "red", "gray", "star", ","]
    tokenizer = build_word_tokenizer(tmp_path / "tok", words, model_max_length=16)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    pieces = tokenizer.tokenize("a large zebra")
    assert pieces[:2] == ["a</w>", "large</w>"] and "".join(pieces[2:]).replace("</w>", "") == "zebra"
    assert tokenizer.unk_token_id not in tokenizer("a large zebra").input_ids[1:-1]
    ids = tokenizer("a red star", padding="max_length").input_ids
    assert len(ids) == 16 and ids[0] == tokenizer.bos_token_id


def test_foreground_weights_mark_pixels_away_from_the_median_colour():
    images = -torch.ones(1, 3, 8, 8)
    images[0, 0, 2:4, 2:4] = 1.0  # a red 2x2 object on black
    weights = vae.foreground_weights(images, 11.0, 0.1)
    assert weights.shape == (1, 1, 8, 8)
    assert weights[0, 0, 2:4, 2:4].eq(11).all() and weights.sum() == 11 * 4 + 60


def test_foreground_margin_weights_the_background_beside_objects_too():
    images = -torch.ones(1, 3, 8, 8)
    images[0, 0, 3, 3] = 1.0  # one red pixel on black
    weights = vae.foreground_weights(images, 11.0, 0.1, margin=1)
    assert weights[0, 0, 2:5, 2:5].eq(11).all() and weights.sum() == 11 * 9 + 55
    assert vae.foreground_weights(images, 11.0, 0.1, margin=0).sum() == 11 + 63


def test_decoder_only_fine_tune_keeps_the_encoder_and_its_scaling_factor(tmp_path, shapes_data, one_thread):
    from diffusers import AutoencoderKL

    before = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        scaling_factor=0.75,
    )  # fmt: skip
    before.save_pretrained(tmp_path / "base")
    flags = common_flags(shapes_data, tmp_path / "run", steps=2)
    args = ["--pretrained_vae_model_name_or_path", str(tmp_path / "base"), "--train_decoder_only"]
    assert train_vae.main([*flags, *args, "--foreground_weight", "11", "--foreground_margin", "1"]) == 0
    after = AutoencoderKL.from_pretrained(tmp_path / "run" / "vae")
    assert after.config.scaling_factor == 0.75
    old, new = before.state_dict(), after.state_dict()
    for name in old:
        if name.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(new[name], old[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(new[n], old[n]) for n in old if n.startswith("decoder."))


def test_caption_words_are_the_words_and_punctuation_of_every_caption():
    from datasets import Dataset

    data = Dataset.from_dict({"text": [["a red circle and a Blue square, on a white background", "a star"]]})
    assert clip.caption_words(data, "text") == [
        "a", "red", "circle", "and", "blue", "square", ",", "on", "white", "background", "star",
    ]  # fmt: skip


@pytest.mark.slow
def test_vae_then_clip_then_unet_from_scratch_give_a_pipeline(tmp_path, shapes_data, one_thread):
    vae_json = tmp_path / "vae.json"
    vae_json.write_text(json.dumps({
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
        "sample_size": 32,
    }))  # fmt: skip
    flags = common_flags(shapes_data, tmp_path / "vae-run", steps=3)
    assert train_vae.main([*flags, "--vae_config", str(vae_json), "--foreground_weight", "11"]) == 0
    vae_dir = tmp_path / "vae-run" / "vae"
    vae_config = json.loads((vae_dir / "config.json").read_text())
    assert (
        vae_config["latent_channels"] == 4 and vae_config["scaling_factor"] != 0.18215
    )  # measured, not SD's
    assert (tmp_path / "vae-run" / "validation" / "step-000003.png").is_file()

    clip_json = tmp_path / "clip.json"
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip_json.write_text(json.dumps({"projection_dim": 16, "text_config": tower,
                                     "vision_config": {**tower, "patch_size": 8}}))  # fmt: skip
    flags = common_flags(shapes_data, tmp_path / "clip-run")
    args = [
        *flags,
        "--clip_config",
        str(clip_json),
        "--max_text_length",
        "24",
        "--tokenizer_extra_words",
        "star",
    ]
    assert train_clip.main(args) == 0
    clip_dir = tmp_path / "clip-run"
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    assert (
        tokenizer.model_max_length == 24 and len(tokenizer("star", add_special_tokens=False).input_ids) == 1
    )
    text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    whole = __import__("transformers").CLIPModel.from_pretrained(clip_dir / "clip")
    ids = tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    torch.testing.assert_close(text_encoder(ids).last_hidden_state, whole.text_model(ids).last_hidden_state)

    unet_json = tmp_path / "unet.json"
    unet_json.write_text(json.dumps({
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
        "attention_levels": [False, True], "layers_per_block": 1, "num_attention_heads": 2,
        "cross_attention_dim": 16, "norm_num_groups": 8,
    }))  # fmt: skip
    flags = common_flags(shapes_data, tmp_path / "pipeline")
    args = [*flags, "--unet_config", str(unet_json), "--pretrained_vae_model_name_or_path", str(vae_dir),
            "--pretrained_text_encoder_name_or_path", str(clip_dir), "--cache_latents"]  # fmt: skip
    assert train_t2i.main(args) == 0

    from latentdiff import LatentPipeline

    pipe = LatentPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_bad_stage_flags_are_refused_before_training(tmp_path, shapes_data):
    base = ["--train_data_dir", str(shapes_data), "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="exactly one of --vae_config"):
        parse_config(base, vae.VaeConfig)
    with pytest.raises(ConfigError, match="foreground_weight"):
        parse_config([*base, "--vae_config", __file__, "--foreground_weight", "0.5"], vae.VaeConfig)
    with pytest.raises(ConfigError, match="foreground_margin"):
        parse_config([*base, "--vae_config", __file__, "--foreground_margin", "-1"], vae.VaeConfig)
    with pytest.raises(ConfigError, match="--train_decoder_only fine-tunes"):
        parse_config([*base, "--vae_config", __file__, "--train_decoder_only"], vae.VaeConfig)
    with pytest.raises(ConfigError, match="clip_config"):
        parse_config(base, clip.ClipConfig)


def test_the_recipe_runs_existing_configs_and_trains_only_what_it_ships():
    """Every `--config` build_default.sh passes exists and parses with its script's options; no stage trains the
    contrastive CLIP; the UNet stage reads its text tower's tokenizer and width from the shipped default and trains
    the tower's weights from fresh with the UNet."""
    script = (REPO / "train" / "build_default.sh").read_text()
    stages = re.findall(r"train/(train_\w+)\.py --config (train/configs/\S+\.yaml)", script)
    assert [name for name, _ in stages] == ["train_vae", "train_vae", "train_t2i"]
    classes = {"train_vae": vae.VaeConfig, "train_t2i": T2IConfig}
    configs = {path: parse_config(["--config", str(REPO / path)], classes[name]) for name, path in stages}
    unet = configs["train/configs/shapes_t2i.yaml"]
    tower = REPO / unet.pretrained_text_encoder_name_or_path
    assert (tower / "text_encoder" / "config.json").is_file() and (tower / "tokenizer").is_dir()
    assert unet.train_text_encoder and unet.text_encoder_init == "random"
    assert unet.pretrained_vae_model_name_or_path.startswith(
        configs["train/configs/shapes_vae_refine.yaml"].output_dir
    )
    assert "train_clip" not in script.split("set -euo pipefail")[1]
