"""The Stable Diffusion scale and GPU benchmarks: their FLOP count, and their functions run on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_gpu, bench_sd_scale
from latentdiff import ConditionalUNet, UNetConfig
from tests.test_unet import SD1_STYLE, SD2_STYLE, SD15_CONFIG, SD21_CONFIG, THREE_LEVELS


@pytest.mark.parametrize(
    "config, side",
    [(SD15_CONFIG, 64), (SD21_CONFIG, 96), (SD1_STYLE, 16), (SD2_STYLE, 16), (THREE_LEVELS, 16)],
    ids=["sd15", "sd21", "sd1", "sd2", "three_levels"],
)
def test_unet_flops_from_the_config_equal_torchs_count(config, side):
    """MFU's numerator: the FLOPs counted from the config alone equal what torch's FlopCounterMode counts in the
    UNet's forward (on the meta device: shapes only, so Stable Diffusion's size costs nothing)."""
    c = UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **config})
    with torch.device("meta"):
        model = ConditionalUNet(c)
        sample, context = torch.empty(1, c.in_channels, side, side), torch.empty(1, 77, c.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            model(sample, torch.tensor([1]), context)
    assert bench_gpu.unet_forward_flops(c, side, side, 77) == counter.get_total_flops()


@pytest.mark.slow  # a subprocess that imports torch and diffusers: about a minute on a loaded 2-core machine
def test_sd_scale_measures_load_and_steps_of_both_unets(tmp_path, one_thread):
    folder = tmp_path / "unet"
    size_bytes = bench_sd_scale.write_unet(bench_sd_scale.TINY_CONFIG, folder)
    load = bench_sd_scale.in_subprocess(  # a process of its own, as each measurement of the script
        {"folder": str(folder), "dtype": "float32", "threads": 1, "kind": "load", "side": "latentdiff"}
    )
    assert load["weights_mib"] == pytest.approx(size_bytes / 2**20, rel=0.01)  # the file is the weights
    assert load["seconds"] > 0 and load["peak_mib"] >= 0
    steps = bench_sd_scale.measure_steps(folder, torch.bfloat16, repeats=1)
    for name in ("cfg", "train"):
        assert all(s > 0 for s in steps[name]["seconds"]) and len(steps[name]["peak_mib"]) == 2
    ours, theirs = bench_sd_scale.shared_models(folder, torch.float32)  # one set of weights for both
    theirs_weights = theirs.state_dict()
    assert all(w.data_ptr() == theirs_weights[n].data_ptr() for n, w in ours.state_dict().items())


def test_gpu_benchmark_runs_a_tiny_model_on_the_cpu(capsys, one_thread):
    bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--batch", "1", "--steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    train = next(line for line in out.splitlines() if line.startswith("| train step"))
    pipeline = next(line for line in out.splitlines() if line.startswith("| pipeline 32x32"))
    for row in (train, pipeline):
        ratio = float(row.split("|")[4])
        assert ratio > 0
    assert "measured here" in out  # a CPU's peak is measured, not looked up


def test_eval_checkpoint_loads_the_ema_weights_and_scores_each_prompt_set(tiny_sd_dir, tmp_path, one_thread):
    from safetensors.torch import save_file

    from benchmarks import eval_checkpoint
    from pipelines.latent_pipeline import LatentPipeline

    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    averaged = {f"unet.{name}": torch.full_like(t, 0.01) for name, t in pipe.unet.state_dict().items()}
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    save_file(averaged, str(checkpoint / "ema.safetensors"))
    eval_checkpoint.load_ema(pipe, checkpoint)
    assert all(torch.all(t == 0.01) for t in pipe.unet.state_dict().values())

    save_file({"unet.no_such.weight": torch.zeros(1)}, str(checkpoint / "ema.safetensors"))
    with pytest.raises(ValueError, match="another architecture"):
        eval_checkpoint.load_ema(pipe, checkpoint)
    with pytest.raises(FileNotFoundError, match="--use_ema"):
        eval_checkpoint.load_ema(pipe, tmp_path)

    out = tmp_path / "scores.json"
    results = eval_checkpoint.main(
        [
            "--model",
            str(tiny_sd_dir),
            "--prompt-seeds",
            "7",
            "8",
            "--per-group",
            "1",
            "--steps",
            "2",
            "--json",
            str(out),
        ]
    )
    assert set(results) == {"7", "8"} and results["7"]["single"]["num_prompts"] == 1
    assert json.loads(out.read_text())["results"]["8"]["two"]["num_prompts"] == 1


def test_denoise_from_scenes_scores_rendered_scenes_and_redraws(tmp_path, one_thread):
    """The SDEdit diagnostic on the embedded default, two prompts a group: the rendered scenes it starts from are
    read right (else its rows mean nothing), each strength is scored per group, and the refusals grid is written."""
    from benchmarks import denoise_from_scenes

    grid, out = tmp_path / "refused.png", tmp_path / "report.json"
    report = denoise_from_scenes.main(
        ["--per-group", "2", "--strengths", "1", "0.25", "--steps", "4", "--grid", str(grid), "--json", str(out)]
    )
    assert all(report["rendered"][g]["full_match"] == 1.0 for g in ("single", "two", "held_out"))
    for strength in ("strength 0.25", "strength 1.0"):
        assert {g: report[strength][g]["num_prompts"] for g in ("single", "two", "held_out")} == {
            "single": 2,
            "two": 2,
            "held_out": 2,
        }
    assert grid.is_file() and json.loads(out.read_text())["steps"] == 4
    with pytest.raises(SystemExit):
        denoise_from_scenes.main(["--strengths", "0"])
