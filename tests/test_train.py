"""Training: the config, the loop (data order, accumulation, EMA, checkpoints, resume, NaN), the diffusion loss, and
real (tiny) runs of train/train_t2i.py: end to end through accelerate, exact resume, SIGKILL, two processes, the
latent cache and classifier-free dropout."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel

import train.checkpoints
import train.data
import train.ema
import train.launch
import train.loop
import train.randomness
from train import train_t2i
from train.arguments import parse_config
from train.loop_config import ConfigError, LoopConfig
from train.tasks import t2i, t2i_models
from train.tasks.t2i_config import T2IConfig

REPO = Path(__file__).resolve().parents[1]


def parse_t2i(argv: list[str]) -> T2IConfig:
    return parse_config(argv, T2IConfig)


def build_models(cfg: T2IConfig, device: torch.device):
    return t2i_models.build_models(cfg, t2i_models.resolve_model_files(cfg), device, torch.float32)


def free_port() -> int:
    """A free TCP port for torchrun's rendezvous (its default, 29500, may be taken on a shared machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ---- the config --------------------------------------------------------------------------------------------------


def test_yaml_then_flags_build_one_frozen_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "train_data_dir: data\npretrained_model_name_or_path: model\nlearning_rate: 1e-4\n"
        "resolution: 64\nvalidation_prompts: [a red circle, a blue square]\nuse_ema: true\n"
    )
    cfg = parse_t2i(["--config", str(path), "--resolution", "32", "--no-use_ema"])
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)  # YAML reads 1e-4 as a string
    assert cfg.resolution == 32 and cfg.use_ema is False  # flags override the file
    assert cfg.validation_prompts == ["a red circle", "a blue square"] and cfg.cond_dropout_prob == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resolution = 64
    path.write_text("train_data_dir: data\npretrained_model_name_or_path: model\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'.*'learning_rate'"):
        parse_t2i(["--config", str(path)])


def test_bad_values_are_refused_with_the_flag_named(tmp_path, capsys):
    base = ["--train_data_dir", "d", "--pretrained_model_name_or_path", "m"]
    with pytest.raises(SystemExit) as exit_info:
        parse_t2i([*base, "--prediction_type", "x0"])
    assert exit_info.value.code == 2 and "invalid choice: 'x0'" in capsys.readouterr().err
    path = tmp_path / "run.yaml"
    path.write_text("train_data_dir: d\npretrained_model_name_or_path: m\nprediction_type: x0\n")
    with pytest.raises(ConfigError, match="--prediction_type='x0' is unknown; choose one of epsilon"):
        parse_t2i(["--config", str(path)])
    with pytest.raises(ConfigError, match="--cond_dropout_prob=1.5"):
        parse_t2i([*base, "--cond_dropout_prob", "1.5"])
    with pytest.raises(ConfigError, match="--cache_latents.*--center_crop"):
        parse_t2i([*base, "--cache_latents"])
    with pytest.raises(ConfigError, match="no training data"):
        parse_t2i(["--pretrained_model_name_or_path", "m"])
    with pytest.raises(ConfigError, match="--unet_config='u.json': no such file"):
        parse_t2i([*base, "--unet_config", "u.json"])
    unet_config = tmp_path / "u.json"
    unet_config.write_text("{}")
    with pytest.raises(ConfigError, match="missing: --pretrained_vae_model_name_or_path"):
        parse_t2i(
            [
                "--train_data_dir",
                "d",
                "--unet_config",
                str(unet_config),
                "--pretrained_text_encoder_name_or_path",
                "t",
            ]
        )


# ---- the diffusion loss ------------------------------------------------------------------------------------------


def test_min_snr_weights_give_the_same_x0_loss_for_every_prediction_type():
    """For one denoiser (one x̂₀ error), the weighted ε, v and x₀ losses all equal min(SNR, γ)·‖ẑ₀ − z₀‖²."""
    from latentdiff.noise_schedule import NoiseSchedule, make_betas

    schedule = NoiseSchedule(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    gen = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([0, 10, 100, 400, 700, 999])
    z0 = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    z0_hat = z0 + 0.1 * torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    a = schedule.sqrt_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    zt = a * z0 + s * eps
    eps_hat = (zt - a * z0_hat) / s  # the same denoiser, written as each parametrisation
    v_hat = a * eps_hat - s * z0_hat
    snr = schedule.snr(timesteps).double()
    gamma = 5.0
    expected = torch.clamp(snr, max=gamma) * ((z0_hat - z0) ** 2).mean(dim=(1, 2, 3))
    for prediction_type, prediction in (("epsilon", eps_hat), ("v_prediction", v_hat), ("sample", z0_hat)):
        target = t2i.diffusion_target(schedule, z0, eps, timesteps, prediction_type)
        mse = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        weighted = t2i.min_snr_weight(snr, gamma, prediction_type) * mse
        torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=0)
    zero_snr = t2i.min_snr_weight(torch.tensor([0.0, 0.0]), gamma, "epsilon")  # zero-terminal-SNR schedules
    assert torch.equal(zero_snr, torch.ones(2))  # the limit of min(SNR, γ)/SNR, not 0/0


# ---- the loop, on a toy problem ------------------------------------------------------------------------------------


class ToyData(torch.utils.data.Dataset):
    """y = x·w_true, 10 samples keyed by (epoch, index)."""

    def __init__(self, n: int = 10) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        _, index = key
        return {"x": self.x[index], "y": self.y[index], "index": index}


def toy_collate(items):
    return {
        "x": torch.stack([i["x"] for i in items]),
        "y": torch.stack([i["y"] for i in items]),
        "indices": [i["index"] for i in items],
    }


def toy_loss(model, batch, rng):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


def toy_cfg(tmp_path: Path, **overrides) -> LoopConfig:
    values = dict(
        dataset_name="toy",
        output_dir=str(tmp_path),
        report_to="none",
        train_batch_size=2,
        max_train_steps=4,
        learning_rate=1e-2,
        lr_warmup_steps=0,
        checkpointing_steps=None,
        seed=0,
        adam_weight_decay=0.0,
    )
    return LoopConfig(**{**values, **overrides})


def toy_trainer(cfg, compute_loss=toy_loss, data=None):
    accelerator = train.launch.make_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return train.loop.Trainer(cfg, accelerator, model, compute_loss, data or ToyData(), toy_collate, seed=0)


def test_epoch_order_is_a_permutation_and_split_across_processes_like_one_process():
    one = train.data.EpochBatchSampler(10, batch_size=4, num_processes=1, process_index=0, seed=5)
    parts = [train.data.EpochBatchSampler(10, 2, 2, rank, seed=5) for rank in range(2)]
    assert one.batches_per_epoch == 2  # 10 // 4: the incomplete last batch is dropped
    batches = [b for b, _ in zip(one, range(6))]
    for epoch in range(3):
        seen = [index for b in batches[2 * epoch : 2 * epoch + 2] for e, index in b if e == epoch]
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    assert [b[0][1] for b in batches[:2]] != [b[0][1] for b in batches[2:4]]  # reshuffled each epoch
    for big, *small in zip(one, *parts, range(6)):
        assert (
            big == small[0] + small[1]
        )  # process 0 takes the first half of the global batch, process 1 the rest
    resumed = train.data.EpochBatchSampler(10, 4, 1, 0, seed=5, start=3)
    assert [b for b, _ in zip(resumed, range(3))] == batches[3:6]  # restart mid-epoch at the exact next batch


def test_batch_random_gives_each_sample_the_same_numbers_whatever_the_process_count():
    whole = train.randomness.BatchRandom(
        7, 3, 0, global_batch=4, offset=0, local_batch=4, device=torch.device("cpu")
    )
    halves = [train.randomness.BatchRandom(7, 3, 0, 4, offset, 2, torch.device("cpu")) for offset in (0, 2)]
    assert torch.equal(whole.randn(3, 2), torch.cat([h.randn(3, 2) for h in halves]))
    assert torch.equal(whole.randint(0, 1000), torch.cat([h.randint(0, 1000) for h in halves]))
    other_step = train.randomness.BatchRandom(7, 4, 0, 4, 0, 4, torch.device("cpu"))
    assert not torch.equal(
        train.randomness.BatchRandom(7, 3, 0, 4, 0, 4, torch.device("cpu")).rand(), other_step.rand()
    )


def test_ema_follows_diffusers_ema_model_and_round_trips(tmp_path):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ours, reference = train.ema.EMA(model, decay=0.9), EMAModel(model.parameters(), decay=0.9)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        reference.step(model.parameters())
    for (name, _), expected in zip(model.named_parameters(), reference.shadow_params):
        torch.testing.assert_close(ours.shadow[name], expected)
    ours.save(tmp_path / "ema.safetensors")
    loaded = train.ema.EMA(model, decay=0.9)
    loaded.load(tmp_path / "ema.safetensors")
    assert loaded.num_updates == 6 and all(torch.equal(loaded.shadow[k], v) for k, v in ours.shadow.items())
    before = model.weight.detach().clone()
    with ours.swapped_into(model):
        assert torch.equal(model.weight, ours.shadow["weight"])
    assert torch.equal(model.weight, before)


def test_gradient_accumulation_equals_the_larger_batch_and_the_lr_schedule_counts_optimizer_steps(tmp_path):
    common = dict(max_train_steps=5, lr_scheduler="linear", lr_warmup_steps=2)
    big = toy_trainer(toy_cfg(tmp_path / "big", train_batch_size=2, **common))
    big.train()
    accumulated = toy_trainer(
        toy_cfg(tmp_path / "acc", train_batch_size=1, gradient_accumulation_steps=2, **common)
    )
    accumulated.train()
    for a, b in zip(big.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # linear warm-up over 2 steps, then linear decay to 0 at step 5: after 5 optimizer steps the rate is 0,
    # and it was stepped 5 times, not 10 (micro-batches) nor 5 x processes.
    assert accumulated.lr_scheduler.last_epoch == 5 and accumulated.lr_scheduler.get_last_lr()[0] == 0.0


def test_checkpoints_are_rotated_and_latest_ignores_incomplete_ones(tmp_path):
    run = toy_trainer(toy_cfg(tmp_path, checkpointing_steps=1, checkpoints_total_limit=2, max_train_steps=5))
    result = run.train()
    assert [p.name for p in train.checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert result.last_checkpoint == tmp_path / "checkpoint-5"
    (tmp_path / ".tmp-checkpoint-9").mkdir()  # a save interrupted by a crash
    (tmp_path / "checkpoint-8").mkdir()  # a folder without trainer_state.json
    assert train.checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-5"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train.checkpoints.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-8"))
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 0)  # 5 batches per epoch


def test_non_finite_loss_stops_before_the_update_and_the_last_checkpoint_resumes(tmp_path, caplog):
    calls = {"n": 0}

    def nan_at_step_3(model, batch, rng):
        calls["n"] += 1
        loss = toy_loss(model, batch, rng)
        return loss * float("nan") if calls["n"] == 3 else loss

    run = toy_trainer(toy_cfg(tmp_path, checkpointing_steps=2, max_train_steps=6), nan_at_step_3)
    with caplog.at_level(logging.ERROR), pytest.raises(train.loop.NonFiniteLossError) as error:
        run.train()
    assert error.value.step == 3 and "loss is nan at step 3" in str(error.value)
    assert "checkpoint-2" in str(error.value) and "loss is nan at step 3" in caplog.text
    assert [p.name for p in train.checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert torch.equal(run.model.weight.detach(), saved["model.weight"])  # the NaN step changed nothing
    resumed = toy_trainer(
        toy_cfg(tmp_path, checkpointing_steps=2, max_train_steps=6, resume_from_checkpoint="latest")
    )
    result = resumed.train()
    assert (
        result.global_step == 6
        and len(result.losses) == 4
        and all(map(torch.isfinite, torch.tensor(result.losses)))
    )


# ---- real runs of train_t2i.py ------------------------------------------------------------------------------------


def command_line(values: dict) -> list[str]:
    """A training script's flags from {name: value}: True is the bare flag, a list its values after the flag, None
    leaves the flag out, anything else is --name str(value)."""
    args = []
    for name, value in values.items():
        if value is True:
            args.append(f"--{name}")
        elif isinstance(value, list):
            args += [f"--{name}", *map(str, value)]
        elif value is not None:
            args += [f"--{name}", str(value)]
    return args


def t2i_args(model: Path, data: Path, out: Path, **flags) -> list[str]:
    """Flags of a tiny run: 9 images (one corrupt), batch 2 -> 4 batches per epoch."""
    values = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "learning_rate": 1e-4,
        "lr_warmup_steps": 0,
        "seed": 0,
        "report_to": "none",
        "checkpointing_steps": 100,
        **flags,
    }
    return command_line(values)


def unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def relative_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
):
    """‖a − b‖ / ‖a − start‖: how far two runs ended apart, relative to how far training moved the weights."""
    keys = sorted(a)
    flat = lambda d: torch.cat([d[k].flatten().double() for k in keys])  # noqa: E731
    return float((flat(a) - flat(b)).norm() / (flat(a) - flat(start)).norm())


@pytest.mark.slow
def test_end_to_end_through_accelerate_launch_exports_a_loadable_pipeline(tmp_path, tiny_sd_dir, train_data):
    out = tmp_path / "run"
    args = t2i_args(
        tiny_sd_dir,
        train_data,
        out,
        use_ema=True,
        ema_decay=0.9,
        prediction_type="v_prediction",
        snr_gamma=5.0,
        noise_offset=0.05,
        validation_prompts=["a red circle", "a blue square"],
        validation_steps=2,
        validation_holdout=1,
        validation_num_inference_steps=2,
        report_to="tensorboard",
        checkpointing_steps=2,
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_config.yaml"),
        str(REPO / "train" / "train_t2i.py"),
        *args,
    ]
    done = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr
    assert "1 process(es)" in log and "1 unreadable sample(s) were skipped" in log and "indices [6]" in log
    assert "val_loss=" in log and "val_loss_ema=" in log
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "step-000002.png",
        "step-000004.png",
    ]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    scheduler_config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == "v_prediction" and scheduler_config["clip_sample"] is False
    # the exported UNet holds the EMA weights of the last checkpoint
    ema = load_file(str(out / "checkpoint-4" / "ema.safetensors"))
    exported = unet_weights(out)
    assert all(torch.equal(exported[name], ema[name]) for name in ema)
    assert not torch.equal(exported["conv_in.weight"], unet_weights(tiny_sd_dir)["conv_in.weight"])

    from latentdiff import LatentPipeline

    pipe = LatentPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0


def test_compile_trains_through_one_graph_to_the_same_weights(
    tmp_path, tiny_sd_dir, train_data, one_thread, eager_compile
):
    """--compile trains the UNet through torch.compile(fullgraph=True) (a graph break would raise) and reaches the
    weights of the plain run: dynamo's eager backend stands in for inductor (same graph, seconds not minutes), so the
    kernels, and the weights, are the same up to float32 rounding of reordered ops."""
    asked = eager_compile  # the keyword arguments of each torch.compile call
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, plain, max_train_steps=2)) == 0
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, compiled, max_train_steps=2, compile=True)) == 0
    assert asked == [{"fullgraph": True}] and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    start = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert relative_difference(unet_weights(compiled), unet_weights(plain), start) < 1e-4


@pytest.mark.slow
def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, tiny_sd_dir, train_data, one_thread):
    common = dict(
        use_ema=True,
        ema_decay=0.9,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=2,
        checkpointing_steps=3,
        random_flip=True,
        snr_gamma=5.0,
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, whole, max_train_steps=6, **common)) == 0
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, split, max_train_steps=3, **common)) == 0
    state = json.loads((split / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (
        0,
        3,
    )  # stopped mid-epoch; 6 steps cross into epoch 1
    assert (
        train_t2i.main(
            t2i_args(
                tiny_sd_dir, train_data, split, max_train_steps=6, resume_from_checkpoint="latest", **common
            )
        )
        == 0
    )
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(whole / "checkpoint-6" / name)), load_file(str(split / "checkpoint-6" / name))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name
    a, b = unet_weights(whole), unet_weights(split)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert relative_difference(a, unet_weights(tiny_sd_dir), unet_weights(tiny_sd_dir)) > 0  # it did train


@pytest.mark.slow
def test_run_killed_right_after_a_checkpoint_resumes_from_it(
    tmp_path, tiny_sd_dir, train_data, one_thread, caplog
):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "train" / "train_t2i.py"),
        *t2i_args(tiny_sd_dir, train_data, out, max_train_steps=1000, checkpointing_steps=2, use_ema=True),
    ]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline, lines = time.monotonic() + 240, []
    try:
        for line in process.stderr:
            lines.append(line)
            if "saved checkpoint" in line or time.monotonic() > deadline:
                break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert any("saved checkpoint" in line for line in lines), "".join(lines[-20:])
    latest = train.checkpoints.find_checkpoint(out, "latest")
    assert latest is not None
    step = int(latest.name.split("-")[1])
    with caplog.at_level(logging.INFO):
        code = train_t2i.main(
            t2i_args(
                tiny_sd_dir,
                train_data,
                out,
                max_train_steps=step + 2,
                checkpointing_steps=2,
                use_ema=True,
                resume_from_checkpoint="latest",
            )
        )
    assert code == 0 and f"resumed from {latest} at step {step}" in caplog.text
    assert not list(
        out.glob(".tmp-*")
    )  # a half-written checkpoint of the killed run is cleaned up, never used
    assert (
        json.loads((out / f"checkpoint-{step + 2}" / "trainer_state.json").read_text())["global_step"]
        == step + 2
    )
    from latentdiff import LatentPipeline

    source = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    assert LatentPipeline.from_pretrained(out).unet.config.block_out_channels == tuple(
        source["block_out_channels"]
    )


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, tiny_sd_dir, train_data, one_thread
):
    two, one = tmp_path / "two", tmp_path / "one"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "train" / "train_t2i.py"),
        *t2i_args(tiny_sd_dir, train_data, two, train_batch_size=1),
    ]
    done = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in done.stderr  # really two processes, not one twice
    assert json.loads((two / "checkpoint-4" / "trainer_state.json").read_text())["num_processes"] == 2
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, one, train_batch_size=2)) == 0
    # Same samples, noise and timesteps; only the float summation order differs (batch of 2 vs 2 x 1 and an
    # all-reduce). Adam turns tiny gradient differences into at most lr-sized steps on a few weights, so the runs
    # are compared relative to how far training moved the weights: measured 1e-4; a different sample, noise or
    # timestep assignment moves them apart by order 1.
    start = unet_weights(tiny_sd_dir)
    assert relative_difference(unet_weights(one), unet_weights(two), start) < 1e-2


@pytest.mark.slow
def test_latent_cache_is_reused_invalidated_and_trains_like_no_cache(
    tmp_path, tiny_sd_dir, train_data, one_thread, monkeypatch
):
    from diffusers import AutoencoderKL

    encodes = {"n": 0}
    original = AutoencoderKL.encode

    def counting_encode(self, *args, **kwargs):
        encodes["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    cache = tmp_path / "cache"

    def run(name: str, **flags) -> int:
        encodes["n"] = 0
        args = t2i_args(
            tiny_sd_dir,
            train_data,
            tmp_path / name,
            max_train_steps=2,
            center_crop=True,
            random_flip=True,
            latents_cache_dir=cache,
            **flags,
        )
        assert train_t2i.main(args) == 0
        return encodes["n"]

    assert run("first", cache_latents=True) > 0
    assert len(list(cache.iterdir())) == 1
    assert run("second", cache_latents=True) == 0  # reused: the VAE never runs
    assert len(list(cache.iterdir())) == 1
    assert run("smaller", cache_latents=True, resolution=16) > 0  # another resolution: computed again
    assert len(list(cache.iterdir())) == 2
    assert run("uncached") > 0
    start = unet_weights(tiny_sd_dir)
    assert (
        relative_difference(unet_weights(tmp_path / "first"), unet_weights(tmp_path / "second"), start) == 0
    )
    # the cache stores exactly what the uncached run encodes each step (up to the VAE's batch composition)
    assert (
        relative_difference(unet_weights(tmp_path / "first"), unet_weights(tmp_path / "uncached"), start)
        < 1e-2
    )


def text_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path / "text_encoder" / "model.safetensors")).items()}


@pytest.mark.slow
def test_train_text_encoder_trains_both_resumes_exactly_and_cached_equals_uncached(
    tmp_path, tiny_sd_dir, train_data, one_thread
):
    common = dict(train_text_encoder=True, center_crop=True, validation_holdout=2, validation_steps=2,
                  latents_cache_dir=tmp_path / "cache")  # fmt: skip
    whole, split, uncached = tmp_path / "whole", tmp_path / "split", tmp_path / "uncached"
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, whole, cache_latents=True, **common)) == 0
    text_start, unet_start = text_encoder_weights(tiny_sd_dir), unet_weights(tiny_sd_dir)
    assert (
        relative_difference(text_encoder_weights(whole), text_start, text_start) > 0
    )  # the text tower trained
    assert relative_difference(unet_weights(whole), unet_start, unet_start) > 0
    # a checkpoint holds both modules: stopping at step 2 and resuming ends where the uninterrupted run ends
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, split, cache_latents=True, max_train_steps=2,
                                   checkpointing_steps=2, **common)) == 0  # fmt: skip
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, split, cache_latents=True,
                                   resume_from_checkpoint="latest", **common)) == 0  # fmt: skip
    for weights in (text_encoder_weights, unet_weights):
        a, b = weights(whole), weights(split)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, weights.__name__
    # the cache gives the trained text encoder the captions the uncached run reads
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, uncached, **common)) == 0
    assert relative_difference(text_encoder_weights(whole), text_encoder_weights(uncached), text_start) < 1e-2
    assert relative_difference(unet_weights(whole), unet_weights(uncached), unet_start) < 1e-2
    # --text_encoder_init random: the same shape and vocabulary, fresh weights, trained; refused when not trained
    fresh = tmp_path / "fresh"
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, fresh, text_encoder_init="random", max_train_steps=1,
                                   **common)) == 0  # fmt: skip
    fresh_weights = text_encoder_weights(fresh)
    assert fresh_weights.keys() == text_start.keys()
    flat = lambda d: torch.cat([d[k].flatten().double() for k in sorted(d)])  # noqa: E731
    assert (flat(fresh_weights) - flat(text_start)).norm() > 0.5 * flat(
        text_start
    ).norm()  # not the loaded ones
    with pytest.raises(ConfigError, match="--text_encoder_init random.*add --train_text_encoder"):
        parse_t2i(t2i_args(tiny_sd_dir, train_data, fresh, text_encoder_init="random"))
    # --text_encoder_layers 0: a fresh tower of embeddings alone, saved so that the pipeline loads it as trained
    flat_tower = tmp_path / "flat"
    assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, flat_tower, text_encoder_init="random",
                                   text_encoder_layers=0, max_train_steps=1, **common)) == 0  # fmt: skip
    saved = CLIPTextModel.from_pretrained(flat_tower / "text_encoder")
    assert saved.config.num_hidden_layers == 0 and not any(
        ".layers." in n for n, _ in saved.named_parameters()
    )
    assert not any(".layers." in k for k in text_encoder_weights(flat_tower))
    with pytest.raises(ConfigError, match="--text_encoder_layers.*add --text_encoder_init random"):
        parse_t2i(t2i_args(tiny_sd_dir, train_data, fresh, text_encoder_layers=0, **common))
    with pytest.raises(ConfigError, match="--text_encoder_layers=-1 must be an integer >= 0"):
        parse_t2i(t2i_args(tiny_sd_dir, train_data, fresh, text_encoder_init="random",
                                     text_encoder_layers=-1, **common))  # fmt: skip


@pytest.mark.slow
def test_classifier_free_dropout_uses_the_cached_empty_prompt(tmp_path, tiny_sd_dir, train_data, one_thread):
    cfg = parse_t2i(t2i_args(tiny_sd_dir, train_data, tmp_path, cache_latents=True, center_crop=True))
    accelerator = train.launch.make_accelerator(cfg)
    models = build_models(cfg, accelerator.device)
    task = t2i.TextToImageTask(cfg, models, accelerator, seed=0)
    train_set, _, collate = task.datasets(train.data.load_data(cfg))
    assert isinstance(train_set, t2i.CachedTextImageDataset)
    batch = collate([train_set[(0, i)] for i in range(8)])
    empty = task.cache.empty_embed
    seen = []
    models.unet.register_forward_pre_hook(lambda module, args: seen.append(args[2].detach().clone()))

    def dropped(p: float) -> torch.Tensor:
        task.cfg = dataclasses.replace(cfg, cond_dropout_prob=p)
        rng = train.randomness.BatchRandom(0, 0, 0, 8, 0, 8, torch.device("cpu"))
        task.compute_loss(models.unet, batch, rng)
        return torch.tensor([torch.equal(row, empty[0]) for row in seen[-1]])

    assert dropped(1.0).all()
    assert not dropped(0.0).any()
    half = dropped(0.5)
    assert half.any() and not half.all()
    assert not torch.equal(batch["prompt_embeds"][0], empty[0])  # the captions themselves are not empty


@pytest.mark.slow
def test_latent_sample_mean_trains_on_the_posterior_mean_and_a_wide_posterior_is_warned_of(
    tmp_path, tiny_sd_dir, train_data, one_thread, caplog
):
    cfg = parse_t2i(t2i_args(tiny_sd_dir, train_data, tmp_path, cache_latents=True, center_crop=True))
    accelerator = train.launch.make_accelerator(cfg)
    models = build_models(cfg, accelerator.device)
    task = t2i.TextToImageTask(cfg, models, accelerator, seed=0)
    train_set, _, collate = task.datasets(train.data.load_data(cfg))
    batch = collate([train_set[(0, i)] for i in range(4)])
    seen = []
    models.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))

    def unet_input(latent_sample: str, sigma: float) -> torch.Tensor:
        batch["latent_logvar"] = torch.full_like(batch["latent_mean"], 2 * math.log(sigma))
        task.cfg = dataclasses.replace(cfg, latent_sample=latent_sample)
        task.compute_loss(
            models.unet, batch, train.randomness.BatchRandom(0, 0, 0, 4, 0, 4, torch.device("cpu"))
        )
        return seen[-1]

    with caplog.at_level("WARNING"):
        assert torch.equal(unet_input("mean", 1.0), unet_input("mean", 3.0))  # σ is not read: z₀ = μ
        assert "posterior is wide" not in caplog.text
        assert not torch.allclose(unet_input("sample", 1.0), unet_input("sample", 3.0))  # z₀ = μ + σ·ε_z
        assert "posterior is wide" in caplog.text and "--latent_sample mean" in caplog.text


@pytest.mark.slow
def test_bad_flags_fail_before_any_model_is_loaded(tmp_path, tiny_sd_dir, train_data, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(train_t2i, "build_models", no_loading)
    read = lambda part: json.loads((tiny_sd_dir / part / "config.json").read_text())  # noqa: E731
    vae_factor = 2 ** (len(read("vae")["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(read("unet")["block_out_channels"]) - 1)
    factor = vae_factor * unet_factor
    bad_resolution = 32 + factor // 2
    with pytest.raises(
        ConfigError,
        match=rf"--resolution={bad_resolution} is not divisible by {factor} "
        rf"\(VAE factor {vae_factor} x UNet down-sampling factor {unet_factor}\)",
    ):
        train_t2i.main(t2i_args(tiny_sd_dir, train_data, tmp_path, resolution=bad_resolution))
    with pytest.raises(ConfigError, match=r"--caption_column='caption' is not a column.*\['image', 'text'\]"):
        train_t2i.main(t2i_args(tiny_sd_dir, train_data, tmp_path, caption_column="caption"))
    unet_config = tmp_path / "unet.yaml"
    hidden = read("text_encoder")["hidden_size"]
    unet_config.write_text(
        "sample_size: 8\nblock_out_channels: [32, 64]\nattention_levels: [true, false]\n"
        f"num_attention_heads: 2\nnorm_num_groups: 8\ncross_attention_dim: {hidden + 16}\n"
    )
    with pytest.raises(
        ConfigError,
        match=f"cross_attention_dim is {hidden + 16} but the text encoder's hidden size is {hidden}",
    ):
        train_t2i.main(t2i_args(tiny_sd_dir, train_data, tmp_path, unet_config=unet_config))
    script = subprocess.run(
        [
            sys.executable,
            str(REPO / "train" / "train_t2i.py"),
            *t2i_args(tiny_sd_dir, train_data, tmp_path, resolution=bad_resolution),
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 2 and f"train_t2i.py: error: --resolution={bad_resolution}" in script.stderr
    assert "Traceback" not in script.stderr


@pytest.mark.slow
def test_nan_loss_stops_the_script_cleanly_and_it_resumes(
    tmp_path, tiny_sd_dir, train_data, one_thread, caplog, monkeypatch
):
    original, calls = t2i.TextToImageTask.compute_loss, {"n": 0}

    def nan_at_step_2(self, model, batch, rng):
        calls["n"] += 1
        loss = original(self, model, batch, rng)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(t2i.TextToImageTask, "compute_loss", nan_at_step_2)
    args = t2i_args(tiny_sd_dir, train_data, tmp_path, max_train_steps=3, checkpointing_steps=1)
    with caplog.at_level(logging.ERROR):
        assert train_t2i.main(args) == 1
    assert "loss is nan at step 2" in caplog.text and "checkpoint-1" in caplog.text
    assert not (tmp_path / "model_index.json").exists()  # nothing exported from a failed run
    monkeypatch.setattr(t2i.TextToImageTask, "compute_loss", original)
    assert train_t2i.main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert (tmp_path / "model_index.json").exists()


def test_example_config_parses():
    cfg = parse_t2i(["--config", str(REPO / "train" / "configs" / "example_t2i.yaml"), "--seed", "3"])
    assert cfg.seed == 3 and cfg.cache_latents and cfg.center_crop and cfg.learning_rate == 1e-5


# ---- each task's flags, diffusers' flags -------------------------------------------------------------------------


def test_each_task_accepts_only_its_own_flags(tmp_path):
    from train.tasks.vae import VaeConfig

    base = ["--train_data_dir", "d", "--output_dir", str(tmp_path), "--vae_config", __file__]
    assert parse_config(base, VaeConfig).learning_rate == 1e-4  # a loop flag
    for t2i_only in (["--snr_gamma", "5"], ["--prediction_type", "epsilon"], ["--cond_dropout_prob", "0.1"]):
        with pytest.raises(SystemExit):  # argparse: unrecognized arguments
            parse_config([*base, *t2i_only], VaeConfig)
    path = tmp_path / "vae.yaml"
    path.write_text("train_data_dir: d\nsnr_gamma: 5.0\n")
    with pytest.raises(ConfigError, match="unknown option 'snr_gamma' for VaeConfig"):
        parse_config(["--config", str(path)], VaeConfig)


def test_diffusers_flag_names_carry_over(tmp_path):
    base = ["--train_data_dir", "d", "--pretrained_model_name_or_path", "m"]
    cfg = parse_t2i([*base, "--proportion_empty_prompts", "0.25", "--input_perturbation", "0.1",
                     "--validation_epochs", "2", "--revision", "main", "--variant", "fp16"])  # fmt: skip
    assert cfg.cond_dropout_prob == 0.25 and cfg.input_perturbation == 0.1 and cfg.validation_epochs == 2
    assert cfg.revision == "main" and cfg.variant == "fp16"
    path = tmp_path / "run.yaml"
    path.write_text("train_data_dir: d\npretrained_model_name_or_path: m\nproportion_empty_prompts: 0.3\n")
    assert parse_t2i(["--config", str(path)]).cond_dropout_prob == 0.3
    with pytest.raises(ConfigError, match="--input_perturbation=-0.1 must be >= 0"):
        parse_t2i([*base, "--input_perturbation", "-0.1"])


def test_validation_epochs_validates_when_an_epoch_it_divides_ends(tmp_path):
    # 10 samples, batch 2: 5 micro-batches per epoch; 2 per optimizer step -> epochs 2 and 4 end at steps 5 and 10
    steps = []
    cfg = toy_cfg(tmp_path, max_train_steps=12, gradient_accumulation_steps=2, validation_epochs=2)
    run = toy_trainer(cfg)
    run.validate = lambda trainer, step: steps.append(step) or {}
    run.train()
    assert steps == [5, 10, 12]  # and once at the end


@pytest.mark.slow
def test_input_perturbation_moves_the_unet_input_not_the_target(
    tmp_path, tiny_sd_dir, train_data, one_thread
):
    cfg = parse_t2i(t2i_args(tiny_sd_dir, train_data, tmp_path, cache_latents=True, center_crop=True))
    accelerator = train.launch.make_accelerator(cfg)
    models = build_models(cfg, accelerator.device)
    task = t2i.TextToImageTask(cfg, models, accelerator, seed=0)
    train_set, _, collate = task.datasets(train.data.load_data(cfg))
    batch = collate([train_set[(0, i)] for i in range(4)])
    seen = []

    class ZeroUNet(torch.nn.Module):  # ε̂ = 0: the loss is then mean(ε²), the target alone
        def forward(self, noisy_latents, timesteps, prompt_embeds):
            seen.append(noisy_latents)
            return torch.zeros_like(noisy_latents)

    def run(gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        task.cfg = dataclasses.replace(cfg, input_perturbation=gamma, snr_gamma=None)
        rng = train.randomness.BatchRandom(0, 0, 0, 4, 0, 4, torch.device("cpu"))
        return task.compute_loss(ZeroUNet(), batch, rng), seen[-1]

    (loss0, z0), (loss1, z1), (loss2, z2) = run(0.0), run(0.5), run(1.0)
    assert torch.equal(loss0, loss1) and torch.equal(loss0, loss2)  # the target is still ε
    assert not torch.allclose(z0, z1)
    torch.testing.assert_close(z2 - z0, 2 * (z1 - z0))  # z_t moves by √(1 − ᾱ_t)·γ·ξ: linear in γ


@pytest.mark.parametrize(
    "name, task",
    [("example_t2i", "t2i"), ("shapes_t2i", "t2i"), ("shapes_vae", "vae"), ("shapes_vae_refine", "vae"),
     ("shapes_clip", "clip"), ("shapes_lora_star", "lora"), ("shapes_classifier", "classifier"),
     ("shapes_dreambooth_star", "dreambooth"), ("shapes_textual_inversion_star", "textual_inversion"),
     ("shapes_vae_star_decoder", "vae")],
)  # fmt: skip
def test_every_shipped_yaml_config_parses_with_its_task_config(name, task):
    from train.tasks.classifier import ClassifierTaskConfig
    from train.tasks.clip import ClipConfig
    from train.tasks.dreambooth import DreamBoothConfig
    from train.tasks.lora import LoraConfig
    from train.tasks.textual_inversion import TextualInversionConfig
    from train.tasks.vae import VaeConfig

    config_class = {
        "t2i": T2IConfig, "vae": VaeConfig, "clip": ClipConfig, "lora": LoraConfig, "classifier": ClassifierTaskConfig,
        "dreambooth": DreamBoothConfig, "textual_inversion": TextualInversionConfig,
    }[task]  # fmt: skip
    cfg = parse_config(["--config", str(REPO / "train" / "configs" / f"{name}.yaml")], config_class)
    assert type(cfg) is config_class and cfg.train_data_dir
