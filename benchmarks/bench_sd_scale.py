"""latentdiff's ConditionalUNet against diffusers' UNet2DConditionModel at Stable Diffusion size, on CPU.

The Stable Diffusion 1.5 and 2.1 UNet configs (as published: 860 M and 866 M parameters), random weights, written by
diffusers' `save_pretrained` as a folder (float32 safetensors) in a temporary directory. Each measurement runs in its
own subprocess, so that its peak resident memory is its own and only one model lives at a time:

- load: `ConditionalUNet.from_pretrained(folder, torch_dtype=...)` against diffusers' `from_pretrained`, then one
  read of every weight (safetensors files are memory-mapped: a weight not read yet costs neither time nor memory).
  Time, and the peak resident memory above the process's memory before loading (VmHWM after resetting it through
  /proc/self/clear_refs) as a multiple of the loaded weights' size (target <= 1.3: no second full copy).
- cfg step: one UNet call of a classifier-free-guided denoising step, batch 1 (cond + uncond: 2 samples), 64x64
  latents (512 px), under `torch.inference_mode()`.
- train step: forward, MSE loss, backward at 32x32 latents (256 px), batch 1; no optimizer, whose state would add
  two more copies of the weights.

The steps of both models run in one process on the very same weight tensors (diffusers loads the folder; ours takes
its state dict with `load_state_dict(assign=True)`, no copy), alternating ours, theirs, theirs, ours, ... so that load
from other processes hits both alike. Times are medians; ratio = their time / ours (> 1: latentdiff is faster); the
memory column is the peak rise during the step.

    python -m benchmarks.bench_sd_scale                    # SD 1.5 and 2.1, float32 and bfloat16, 3 repeats
    python -m benchmarks.bench_sd_scale --quick            # 1 repeat (after one warm-up call per model)
    python -m benchmarks.bench_sd_scale --quick --models sd15 --dtypes float32    # the shortest run
    python -m benchmarks.bench_sd_scale --parts load       # load time and memory only (a minute or two)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_unet import _status_kib
from tests.test_unet import SD15_CONFIG, SD21_CONFIG

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = {  # for the test: the SD 2.1 layout (linear projections, per-level heads), tiny
    **SD21_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "layers_per_block": 1,
}
CONFIGS = {"sd15": SD15_CONFIG, "sd21": SD21_CONFIG, "tiny": TINY_CONFIG}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CFG_LATENT, TRAIN_LATENT, TEXT_LEN = 64, 32, 77


def write_unet(config: dict[str, Any], folder: Path) -> int:
    """diffusers' UNet of `config` with random weights saved in `folder`; returns the weights file's bytes."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # a script, not the library: the global RNG is ours to seed
    UNet2DConditionModel.from_config(config).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _rss_mib(field: str) -> float:
    return _status_kib(field) / 1024


def _reset_peak() -> float:
    """Free what can be freed, reset the high-water mark VmHWM to the current RSS, return that RSS in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_mib("VmRSS")


def load_model(side: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """`side` ("latentdiff" or "diffusers") loads the UNet folder in `dtype`, in eval mode."""
    if side == "latentdiff":
        from latentdiff.models.unet import ConditionalUNet

        return ConditionalUNet.from_pretrained(folder, torch_dtype=dtype)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).eval()


def measure_load(side: str, folder: Path, dtype: torch.dtype) -> dict[str, float]:
    """Load time (seconds, every weight read once) and peak RSS rise (MiB) against the loaded weights' MiB."""
    before = _reset_peak()
    start = time.perf_counter()
    model = load_model(side, folder, dtype)
    with torch.no_grad():
        for p in model.parameters():  # read every weight: a memory-mapped one counts once it is in memory
            p.sum()
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"seconds": seconds, "peak_mib": _rss_mib("VmHWM") - before, "weights_mib": weights}


def shared_models(folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, theirs) on the very same weight tensors: diffusers loads the folder, ours takes its state dict as it
    is (same parameter names; `assign=True` on a meta-device model: no copy)."""
    from latentdiff.models.unet import ConditionalUNet, UNetConfig

    theirs = load_model("diffusers", folder, dtype)
    with torch.device("meta"):
        ours = ConditionalUNet(UNetConfig.from_diffusers(dict(theirs.config)))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs


def make_steps(
    model: torch.nn.Module, diffusers_api: bool, dtype: torch.dtype, config: dict[str, Any]
) -> dict[str, Callable[[], None]]:
    """The CFG step (2 samples at 64x64) and the train step (1 sample at 32x32) of one model, fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    channels, width = config["in_channels"], config["cross_attention_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    cfg_sample, cfg_context = randn(2, channels, CFG_LATENT, CFG_LATENT), randn(2, TEXT_LEN, width)
    train_sample, train_context = randn(1, channels, TRAIN_LATENT, TRAIN_LATENT), randn(1, TEXT_LEN, width)
    target = randn(1, config["out_channels"], TRAIN_LATENT, TRAIN_LATENT)
    timestep = torch.tensor([500])

    def forward(sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = model(sample, timestep.expand(sample.shape[0]), context)
        return out.sample if diffusers_api else out

    def cfg() -> None:
        model.eval()
        with torch.inference_mode():
            forward(cfg_sample, cfg_context)

    def train() -> None:
        model.train()
        torch.nn.functional.mse_loss(forward(train_sample, train_context).float(), target.float()).backward()
        model.zero_grad(set_to_none=True)

    return {"cfg": cfg, "train": train}


def measure_steps(folder: Path, dtype: torch.dtype, repeats: int) -> dict[str, dict[str, list[float]]]:
    """{step: {"seconds": [ours, theirs] medians, "peak_mib": [ours, theirs] medians}} over `repeats` alternating
    runs after one warm-up call each."""
    ours, theirs = shared_models(folder, dtype)
    config = dict(theirs.config)
    steps = [make_steps(model, i == 1, dtype, config) for i, model in enumerate((ours, theirs))]
    results = {}
    for name in ("cfg", "train"):
        for side in steps:
            side[name]()
        seconds: list[list[float]] = [[], []]
        peaks: list[list[float]] = [[], []]
        for r in range(repeats):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                before = _reset_peak()
                start = time.perf_counter()
                steps[i][name]()
                seconds[i].append(time.perf_counter() - start)
                peaks[i].append(_rss_mib("VmHWM") - before)
        results[name] = {
            "seconds": [statistics.median(s) for s in seconds],
            "peak_mib": [statistics.median(p) for p in peaks],
        }
    return results


def run_worker(task: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process (the `--worker` entry point)."""
    if task["threads"]:
        torch.set_num_threads(task["threads"])
    folder, dtype = Path(task["folder"]), DTYPES[task["dtype"]]
    if task["kind"] == "load":
        return measure_load(task["side"], folder, dtype)
    return measure_steps(folder, dtype, task["repeats"])


def in_subprocess(task: dict[str, Any]) -> dict[str, Any]:
    """`run_worker(task)` in a fresh Python process: its memory is its own; returns the JSON it prints last."""
    command = [sys.executable, "-m", "benchmarks.bench_sd_scale", "--worker", json.dumps(task)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measurement {task} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_rows(
    model: str, dtype: str, folder: Path, repeats: int, threads: int | None, parts: list[str]
) -> list[str]:
    """The table's rows for one config and dtype: load, then the cfg and train steps (those `parts` name)."""
    task = {"folder": str(folder), "dtype": dtype, "repeats": repeats, "threads": threads}
    rows = []
    if "load" in parts:
        loads = [
            in_subprocess({**task, "kind": "load", "side": side}) for side in ("latentdiff", "diffusers")
        ]
        weights = loads[0]["weights_mib"]
        rows.append(
            f"| {model} | {dtype} | load | {loads[0]['seconds']:.2f} | {loads[1]['seconds']:.2f} | "
            f"{loads[1]['seconds'] / loads[0]['seconds']:.2f} | {loads[0]['peak_mib']:.0f} "
            f"({loads[0]['peak_mib'] / weights:.2f}x) | {loads[1]['peak_mib']:.0f} "
            f"({loads[1]['peak_mib'] / weights:.2f}x) |"
        )
    if "steps" not in parts:
        return rows
    steps = in_subprocess({**task, "kind": "steps"})
    labels = {
        "cfg": f"cfg step {CFG_LATENT}x{CFG_LATENT}",
        "train": f"train step {TRAIN_LATENT}x{TRAIN_LATENT}",
    }
    for name, label in labels.items():
        (s_ours, s_theirs), (m_ours, m_theirs) = steps[name]["seconds"], steps[name]["peak_mib"]
        rows.append(
            f"| {model} | {dtype} | {label} | {s_ours:.2f} | {s_theirs:.2f} | {s_theirs / s_ours:.2f} | "
            f"{m_ours:.0f} | {m_theirs:.0f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["sd15", "sd21"], choices=sorted(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--parts", nargs="+", default=["load", "steps"], choices=["load", "steps"])
    parser.add_argument("--quick", action="store_true", help="1 timed repeat per step instead of 3")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per model and step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement, as JSON
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"# torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {repeats} timed "
        f"repeat(s) after a warm-up; ratio = diffusers s / latentdiff s (> 1: latentdiff faster); load peak = "
        f"RSS rise (x the loaded weights' size)"
    )
    print(
        "| model | dtype | what | latentdiff s | diffusers s | ratio | latentdiff peak MiB | diffusers peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "unet"
            write_unet(CONFIGS[model], folder)
            for dtype in args.dtypes:
                for row in table_rows(model, dtype, folder, repeats, args.threads, args.parts):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
