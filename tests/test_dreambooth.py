"""DreamBooth (train/train_dreambooth.py): class images drawn once by the base model and reused, the prior-preservation
loss (both terms and their weight, against the text-to-image loss computed by hand), and the exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.latent_pipeline import LatentPipeline
from tests.test_train import command_line
from train import train_dreambooth
from train.arguments import parse_config
from train.randomness import BatchRandom
from train.tasks.dreambooth import DreamBoothConfig

PROMPT = "a sks circle"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    """Four instance images, a plain folder (no captions): --instance_prompt names them."""
    folder = tmp_path_factory.mktemp("instances")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def db_args(model: Path, data: Path, out: Path, **flags) -> list[str]:
    values = {
        "pretrained_model_name_or_path": model,
        "instance_data_dir": data,
        "instance_prompt": PROMPT,
        "output_dir": out,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 1,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "seed": 0,
        "report_to": "none",
        "checkpointing_steps": 100,
        "validation_num_inference_steps": 2,
        **flags,
    }
    return command_line(values)


def prior_args(model, data, out, classes, count, **flags):
    return db_args(
        model,
        data,
        out,
        with_prior_preservation=True,
        class_data_dir=classes,
        class_prompt="a circle",
        num_class_images=count,
        sample_batch_size=2,
        **flags,
    )


def test_class_images_are_generated_once_counted_and_reused(tiny_sd_dir, instance_dir, tmp_path, monkeypatch):
    calls = []
    draw = LatentPipeline.__call__

    def counted(self, prompt, **kwargs):
        calls.append(len(prompt))
        return draw(self, prompt, **kwargs)

    monkeypatch.setattr(LatentPipeline, "__call__", counted)
    classes = tmp_path / "classes"
    assert train_dreambooth.main(prior_args(tiny_sd_dir, instance_dir, tmp_path / "a", classes, 3)) == 0
    assert calls == [2, 1]  # 3 images in batches of 2
    rows = [json.loads(line) for line in (classes / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a circle"] * 3 and all(
        (classes / r["file_name"]).is_file() for r in rows
    )
    stamps = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    calls.clear()
    assert train_dreambooth.main(prior_args(tiny_sd_dir, instance_dir, tmp_path / "b", classes, 3)) == 0
    assert calls == []  # reused, not drawn again
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir() if p.suffix == ".png"} == {
        k: v for k, v in stamps.items() if k.endswith(".png")
    }
    assert train_dreambooth.main(prior_args(tiny_sd_dir, instance_dir, tmp_path / "c", classes, 4)) == 0
    assert (
        calls == [1] and len((classes / "metadata.jsonl").read_text().splitlines()) == 4
    )  # topped up by one
    exported = LatentPipeline.from_pretrained(tmp_path / "c")  # the full fine-tune is a pipeline folder
    assert exported.unet.config.cross_attention_dim == 32


def test_the_loss_is_the_instance_loss_plus_lambda_times_the_class_loss(tiny_sd_dir, instance_dir, tmp_path):
    from accelerate import Accelerator

    from latentdiff.data.dataset import collate_text_image
    from latentdiff.sampling_settings import SamplingSettings
    from train.tasks.dreambooth import DreamBoothTask, PairedRandom, generate_class_images, instance_images
    from train.tasks.t2i import TextToImageTask
    from train.tasks.t2i_models import build_models, resolve_model_files

    weight = 0.37
    cfg = parse_config(
        prior_args(
            tiny_sd_dir, instance_dir, tmp_path / "run", tmp_path / "classes", 2, prior_loss_weight=weight
        ),
        DreamBoothConfig,
    )
    files = resolve_model_files(cfg)
    accelerator = Accelerator(cpu=True)
    models = build_models(cfg, files, accelerator.device, torch.float32)
    classes = generate_class_images(cfg, models, accelerator, 0, SamplingSettings())
    task = DreamBoothTask(cfg, models, accelerator, 0, SamplingSettings())
    train_set, collate = task.paired_datasets(instance_images(cfg), classes)
    pairs = [train_set[(0, i)] for i in range(2)]
    batch = collate(pairs)
    assert batch["num_instances"] == 2 and batch["captions"] == [PROMPT, PROMPT, "a circle", "a circle"]

    def rng() -> BatchRandom:
        return BatchRandom(0, 5, 0, 2, 0, 2, accelerator.device)

    loss = task.compute_loss(models.unet, batch, rng())
    # by hand: the text-to-image loss of the instances with the loop's randomness, and of the class images with
    # the second stream; then mean + weight * mean
    plain = TextToImageTask(cfg, models, accelerator, 0)
    stream = PairedRandom(rng())
    instance_loss = plain.compute_loss(models.unet, collate_text_image([p[0] for p in pairs]), rng())
    class_loss = plain.compute_loss(models.unet, collate_text_image([p[1] for p in pairs]), stream.classes)
    assert instance_loss > 0 and class_loss > 0 and not torch.isclose(instance_loss, class_loss)
    torch.testing.assert_close(loss, instance_loss + weight * class_loss)


def test_use_lora_exports_an_adapter_the_pipeline_loads(tiny_sd_dir, instance_dir, tmp_path):
    out = tmp_path / "lora"
    args = db_args(
        tiny_sd_dir, instance_dir, out, use_lora=True, rank=2, learning_rate=1e-2, max_train_steps=2
    )
    assert train_dreambooth.main(args) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(
        PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    pipe.load_lora_weights(out)
    tuned = pipe(
        PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert np.abs(tuned - base).max() > 0  # the trained adapter changes the images


def test_prior_preservation_without_its_class_flags_is_refused(tiny_sd_dir, instance_dir, tmp_path):
    from train.loop_config import ConfigError

    with pytest.raises(ConfigError, match="--with_prior_preservation needs --class_data_dir"):
        parse_config(
            db_args(tiny_sd_dir, instance_dir, tmp_path, with_prior_preservation=True), DreamBoothConfig
        )


def _task_and_batch(tiny_sd_dir, instance_dir, tmp_path, **flags):
    """A DreamBooth task with --prior_target model and one batch of two instance and two class images."""
    from accelerate import Accelerator

    from latentdiff.sampling_settings import SamplingSettings
    from train.tasks.dreambooth import DreamBoothTask, generate_class_images, instance_images
    from train.tasks.lora import add_adapters
    from train.tasks.t2i_models import build_models, resolve_model_files

    args = prior_args(tiny_sd_dir, instance_dir, tmp_path / "run", tmp_path / "classes", 2, **flags)
    cfg = parse_config([*args, "--prior_target", "model"], DreamBoothConfig)
    accelerator = Accelerator(cpu=True)
    models = build_models(cfg, resolve_model_files(cfg), accelerator.device, torch.float32)
    classes = generate_class_images(cfg, models, accelerator, 0, SamplingSettings())
    trained = add_adapters(cfg, models, torch.float32, 0) if cfg.use_lora else models.unet
    task = DreamBoothTask(cfg, models, accelerator, 0, SamplingSettings())
    train_set, collate = task.paired_datasets(instance_images(cfg), classes)
    return task, trained, collate([train_set[(0, i)] for i in range(2)]), accelerator


@pytest.mark.parametrize("use_lora", [True, False])
def test_prior_target_model_fits_the_class_half_to_the_frozen_model(
    tiny_sd_dir, instance_dir, tmp_path, use_lora
):
    """--prior_target model: the class term is ‖x̂_θ(z_t, c) − x̂_θ₀(z_t, c)‖², so it is exactly 0 while the weights
    are the base's (a new adapter's B is 0), and once they move it is the squared gap between the moved model and
    the base at the same z_t, t and c, computed here by hand; the instance term keeps the true target."""
    from train.tasks.dreambooth import PairedRandom

    flags = {"latent_sample": "mean", **({"use_lora": True, "rank": 2} if use_lora else {})}
    task, trained, batch, accelerator = _task_and_batch(tiny_sd_dir, instance_dir, tmp_path, **flags)

    def rng() -> BatchRandom:
        return BatchRandom(0, 5, 0, 2, 0, 2, accelerator.device)

    losses = task.sample_losses(trained, batch, PairedRandom(rng()))
    assert (losses[:2] > 0).all() and (losses[2:] == 0).all()  # the base model is its own teacher

    base = {name: p.detach().clone() for name, p in trained.named_parameters()}
    with torch.no_grad():  # move the trained weights (the adapter's, or the whole UNet's)
        generator = torch.Generator().manual_seed(1)
        for p in (p for p in trained.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    losses = task.sample_losses(trained, batch, PairedRandom(rng()))
    assert (losses[2:] > 0).all()

    # by hand: z_t, t and c of the class half from the same random stream, the base model's prediction as target
    moved = {name: p.detach().clone() for name, p in trained.named_parameters()}
    stream = PairedRandom(rng())
    mean, _ = task._posterior(batch)  # z₀ = μ (--latent_sample mean)
    embeds = task._prompt_embeds(batch, None)
    drop = stream.rand() < task.cfg.cond_dropout_prob
    embeds = torch.where(drop[:, None, None], task.empty_embed.to(embeds.dtype), embeds)
    noise = stream.randn(*mean.shape[1:])
    timesteps = stream.randint(0, task.num_train_timesteps)
    noisy = task.noise_schedule.add_noise(mean, noise, timesteps)
    with torch.no_grad():
        student = trained(noisy[2:], timesteps[2:], embeds[2:])
        trained.load_state_dict(base, strict=False)
        teacher = trained(noisy[2:], timesteps[2:], embeds[2:])
        trained.load_state_dict(moved, strict=False)
    torch.testing.assert_close(losses[2:], ((student - teacher) ** 2).mean(dim=(1, 2, 3)))


def test_prior_target_model_is_refused_without_the_prior_or_with_a_trained_text_encoder(
    tiny_sd_dir, instance_dir, tmp_path
):
    from train.loop_config import ConfigError

    with pytest.raises(ConfigError, match="add --with_prior_preservation"):
        parse_config(db_args(tiny_sd_dir, instance_dir, tmp_path, prior_target="model"), DreamBoothConfig)
    args = prior_args(tiny_sd_dir, instance_dir, tmp_path, tmp_path / "c", 2, train_text_encoder=True)
    with pytest.raises(ConfigError, match="--train_text_encoder"):
        parse_config([*args, "--prior_target", "model"], DreamBoothConfig)
