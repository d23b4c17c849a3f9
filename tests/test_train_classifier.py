"""train_classifier.py: the layout labels of shapes captions, a tiny run through the shared loop that resumes exactly
and whose classifier guides the pipeline, and bad flags refused before training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.data.scene_labels import (
    CELL_ATTRIBUTES,
    EMPTY,
    IRREGULAR_CELL_ATTRIBUTES,
    NUM_CLASSES,
    caption_labels,
    class_name,
    object_class,
)
from latentdiff.data.shapes import ParsedCaption, format_caption, parse_caption, write_shapes_dataset
from latentdiff.generate import generate, read_class_labels
from latentdiff.models.classifier import ClassifierConfig, NoiseAwareClassifier
from train import train_classifier
from train.arguments import parse_config
from train.loop_config import ConfigError
from train.tasks.classifier import ClassifierTaskConfig

TIMESTEPS = [0, 500, 999]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", num_images=32, size=32, seed=0)


def flags(model: Path, data: Path, out: Path, steps: int, **extra) -> list[str]:
    values = {
        "pretrained_model_name_or_path": model, "train_data_dir": data, "output_dir": out, "resolution": 32,
        "train_batch_size": 4, "max_train_steps": steps, "learning_rate": 1e-3, "lr_warmup_steps": 0, "seed": 0,
        "report_to": "none", "mixed_precision": "no", "validation_holdout": 4, "checkpointing_steps": 2,
        "use_ema": True, "ema_decay": 0.9, "block_out_channels": "8 16", "validation_timesteps": "0 500 999",
        **extra,
    }  # fmt: skip
    return [
        part
        for name, value in values.items()
        for part in ((f"--{name}",) if value is True else (f"--{name}", *str(value).split()))
    ]


def test_caption_labels_read_the_layout_and_refuse_what_does_not_fix_it():
    labels = caption_labels(
        "a red circle in the top left and a small blue square at the bottom, on a white background"
    )
    assert labels == {
        name: {"top_left": object_class("red", "circle"), "bottom": object_class("blue", "square")}.get(
            name, EMPTY
        )
        for name, _ in CELL_ATTRIBUTES
    }
    assert [class_name(k) for k in (0, 1, NUM_CLASSES - 1)] == ["empty", "red circle", "orange triangle"]
    assert all(object_class(*class_name(k).split()) == k for k in range(1, NUM_CLASSES))  # a bijection
    with pytest.raises(ValueError, match="the red circle has no position"):
        caption_labels("a red circle in the top left and a red circle")
    with pytest.raises(ValueError, match="no class for a red star"):
        caption_labels("a red star in the center")


def test_a_config_without_pool_size_loads_as_the_global_mean(tmp_path):
    model = NoiseAwareClassifier(ClassifierConfig(block_out_channels=(8, 16)))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["pool_size"]  # a folder written before pool_size existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert NoiseAwareClassifier.from_pretrained(tmp_path).config.pool_size == 1


@pytest.mark.slow
def test_tiny_run_resumes_exactly_and_its_classifier_guides_the_pipeline(
    tmp_path, tiny_sd_dir, shapes_data, one_thread
):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_classifier.main(flags(tiny_sd_dir, shapes_data, whole, 4)) == 0
    assert train_classifier.main(flags(tiny_sd_dir, shapes_data, split, 2)) == 0
    resumed = flags(tiny_sd_dir, shapes_data, split, 4, resume_from_checkpoint="latest")
    assert train_classifier.main(resumed) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(whole / "checkpoint-4" / name)), load_file(str(split / "checkpoint-4" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    classifier = NoiseAwareClassifier.from_pretrained(whole / "classifier")
    assert classifier.config.attributes == CELL_ATTRIBUTES and classifier.config.in_channels == 4
    assert classifier.heads["center"].in_features == 16 * 3 * 3  # C_last x P² with pool_size 3
    ema = load_file(str(whole / "checkpoint-4" / "ema.safetensors"))
    assert all(
        torch.equal(classifier.state_dict()[k], ema[k]) for k in ema
    )  # the export holds the EMA weights
    table = json.loads((whole / "accuracy_against_t.json").read_text())
    assert sorted(map(int, table)) == TIMESTEPS
    assert all(0 <= row[key] <= 1 for row in table.values() for key in ("cells", "objects", "layouts"))

    from pipelines import LatentPipeline

    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    labels = caption_labels("a red circle in the top left")
    plain = pipe("", generator=torch.Generator().manual_seed(0), **run).images
    guided = pipe(
        "", generator=torch.Generator().manual_seed(0), classifier=classifier, class_labels=labels, **run
    ).images
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)

    from PIL import Image

    from latentdiff import cli

    out = tmp_path / "guided.png"
    command = ["generate", "", "--model", str(tiny_sd_dir), "--steps", "2", "--seed", "0", "-o", str(out)]
    guide = ["--classifier", str(whole / "classifier"), "--class-labels", "a red circle in the top left"]
    assert cli.main([*command, *guide, "--classifier-scale", "3"]) == 0
    assert Image.open(out).text["class_labels"] == "a red circle in the top left"


@pytest.mark.slow
def test_a_run_with_irregular_scenes_has_their_classes_and_reports_their_accuracy(
    tmp_path, tiny_sd_dir, shapes_data, one_thread
):
    assert train_classifier.main(flags(tiny_sd_dir, shapes_data, tmp_path, 2, irregular_images=8)) == 0
    classifier = NoiseAwareClassifier.from_pretrained(tmp_path / "classifier")
    assert classifier.config.attributes == IRREGULAR_CELL_ATTRIBUTES
    table = json.loads((tmp_path / "accuracy_against_t.json").read_text())
    assert all(0 <= row["irregular_objects"] <= 1 for row in table.values())


def test_class_labels_read_from_text_as_pairs_or_a_layout(tmp_path):
    out = tmp_path / "out.png"  # never the working folder, where the README's own command leaves an out.png
    assert read_class_labels("color=2, shape=0 cell=4") == {"color": 2, "shape": 0, "cell": 4}
    assert read_class_labels("a blue square on the right") == caption_labels("a blue square on the right")
    with pytest.raises(ValueError, match="'color=red' is not name=index"):
        read_class_labels("color=red")
    with pytest.raises(ValueError, match="class_labels='a blue square': the blue square has no position"):
        read_class_labels("a blue square")
    with pytest.raises(ValueError, match="a classifier trained for it"):
        generate("", out, model="some/sd-folder", class_labels="a blue square on the right")
    with pytest.raises(ValueError, match="needs class_labels"):
        generate("", out, classifier="some/classifier")


def test_bad_flags_are_refused_before_training(tmp_path, tiny_sd_dir, shapes_data):
    base = flags(tiny_sd_dir, shapes_data, tmp_path, 2)
    with pytest.raises(ConfigError, match="--random_flip mirrors objects"):
        parse_config([*base, "--random_flip"], ClassifierTaskConfig)
    with pytest.raises(ConfigError, match="--irregular_images"):
        parse_config([*base, "--irregular_images", "-1"], ClassifierTaskConfig)
    with pytest.raises(ConfigError, match="--block_out_channels"):
        parse_config([*base, "--block_out_channels", "8", "0"], ClassifierTaskConfig)
    with pytest.raises(ConfigError, match="--pretrained_model_name_or_path='nowhere' is not a folder"):
        parse_config([*base, "--pretrained_model_name_or_path", "nowhere"], ClassifierTaskConfig)
    with pytest.raises(ConfigError, match="not divisible by the VAE's down-sampling factor 4"):
        train_classifier.main([*base, "--resolution", "30"])
    with pytest.raises(ConfigError, match="has no vae/ folder"):
        train_classifier.main([*base, "--pretrained_model_name_or_path", str(shapes_data)])
    with pytest.raises(ConfigError, match="place every object, not more than --validation_holdout=31"):
        train_classifier.main([*base, "--validation_holdout", "31"])


@pytest.mark.slow
def test_the_shipped_classifier_steers_the_default_from_the_empty_prompt():
    # The empty prompt, no classifier-free guidance, DDPM 25 steps, s = 5 (README, "Classifier guidance"): each image
    # must be read as its target and nothing else. The strict ShapesBench detector with its outline checks reads 5 of
    # these 8 as their targets (measured 2026-12-03); over the first 144 targets 0.396 (0.306 on another draw of 144;
    # 0.46 / 0.33 at s = 10), the misses nearly all the shape (domes, blobs, rounded squares) while the classifier
    # reads 0.89-0.97 of the final latents as their targets. At least half of the 8 must be read, while unguided the
    # same seeds give none.
    from latentdiff import LatentPipeline
    from latentdiff.default_model import DEFAULT_CLASSIFIER_DIR
    from latentdiff.eval.shapesbench import bench_prompts, matches_prompt
    from latentdiff.schedulers.registry import choose_sampler

    targets = [  # the first ShapesBench single-object prompts, size and background left free
        format_caption(
            ParsedCaption(tuple(replace(o, size=None) for o in parse_caption(p.text).objects), None)
        )
        for p in bench_prompts(("single",), per_group=8)
    ]
    pipe = LatentPipeline()
    pipe.scheduler = choose_sampler(pipe.scheduler, "ddpm", False)
    pipe.set_progress_bar_config(disable=True)
    classifier = NoiseAwareClassifier.from_pretrained(DEFAULT_CLASSIFIER_DIR)
    rows = [caption_labels(target) for target in targets]
    labels = {name: [row[name] for row in rows] for name, _ in CELL_ATTRIBUTES}
    run = dict(num_inference_steps=25, guidance_scale=1.0)

    def right(**guidance) -> list[bool]:
        generators = [torch.Generator().manual_seed(i) for i in range(len(targets))]
        images = pipe([""] * len(targets), generator=generators, **run, **guidance).images
        return [matches_prompt(image, target) for image, target in zip(images, targets)]

    guided = right(classifier=classifier, classifier_guidance_scale=5.0, class_labels=labels)
    assert sum(guided) >= len(targets) // 2, guided  # 5 of 8 here
    assert sum(right()) == 0
