"""latentdiff's ConditionalUNet against diffusers' UNet2DConditionModel: same config, same weights, one
process, CPU.

For each latent size (8x8, 16x16) and batch (16, 64) it measures
- train: one step of forward, MSE loss, backward, AdamW (median wall time -> samples/s);
- infer: one forward under `torch.inference_mode()` (median wall time -> samples/s);
- peak memory of one such step: the rise of the process's resident set size above its size just before the
  step (VmHWM, reset through /proc/self/clear_refs after `malloc_trim`; Linux only);
- for train, also the activations kept for the backward pass (storages seen by
  `torch.autograd.graph.saved_tensors_hooks`, parameters excluded): exact and free of allocator noise.
The two models' steps alternate (ours, theirs, theirs, ours, ...) so that load from other processes hits both
alike; times are medians, and the ratio of the fastest runs is printed beside the ratio of medians (on a
shared machine the minimum is the run least disturbed). Ratios > 1 favour latentdiff: speed = our samples/s
over theirs, memory = their MiB over ours.

The config is the first row of shared/FEASIBILITY.md: block_out_channels (64, 128, 128), one ResBlock per
level, cross-attention on the two upper levels and in the middle, 8 heads, cross_attention_dim 128, 4 latent
channels; text length 77.

With `--compile` both UNets go through `torch.compile(fullgraph=True)` (inductor) first, and the table adds the
first call of each case, which compiles (each new shape and train/eval switch compiles again), apart from the timed
steps. `--profile` prints the ops that cost most in one step of each model (torch.profiler, self CPU time) instead.

    python -m benchmarks.bench_unet                         # 7 timed repeats per case
    python -m benchmarks.bench_unet --quick                 # 3 timed repeats per case
    python -m benchmarks.bench_unet --quick --compile --sizes 16 --batches 64    # compiled against compiled
    python -m benchmarks.bench_unet --profile --sizes 16 --batches 64          # the top ops of one train step
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from latentdiff.models.unet import ConditionalUNet

CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,  # diffusers' name for the head count
    cross_attention_dim=128,
)
Step = Callable[[], torch.Tensor | None]


def build_models(directory: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' UNet with random weights, saved, and loaded into latentdiff's UNet; checked to agree."""
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**CONFIG).eval()
    theirs.save_pretrained(directory)
    ours = ConditionalUNet.from_pretrained(directory)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, CONFIG["cross_attention_dim"])
    with torch.no_grad():
        difference = (ours(sample, 500, context) - theirs(sample, 500, context).sample).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"the two UNets disagree (max abs difference {difference:.2e}); fix parity first")
    return ours, theirs


def make_steps(
    model: torch.nn.Module, diffusers_api: bool, batch: int, size: int, text_len: int
) -> dict[str, Step]:
    """The train and infer steps of one model on fixed random inputs (its own AdamW)."""
    generator = torch.Generator().manual_seed(batch * 100 + size)
    sample = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, text_len, CONFIG["cross_attention_dim"], generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    target = torch.randn(batch, 4, size, size, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward() -> torch.Tensor:
        out = model(sample, timesteps, context)
        return out.sample if diffusers_api else out

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(forward(), target).backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            forward()

    def loss() -> torch.Tensor:  # the forward of `train`, for counting what it keeps for backward
        model.train()
        return torch.nn.functional.mse_loss(forward(), target)

    return {"train": train, "infer": infer, "loss": loss}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mib(step: Step) -> float:
    """Peak resident memory during `step()` above the resident memory just before it, in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap to the OS: the baseline is what is live
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    step()
    return (_status_kib("VmHWM") - before) / 1024


def saved_for_backward_mib(model: torch.nn.Module, loss: Step) -> float:
    """MiB of the distinct storages autograd keeps for the backward pass of `loss()`, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss()
    return sum(storages.values()) / 2**20


def print_profile(
    models: tuple[torch.nn.Module, torch.nn.Module], mode: str, batch: int, size: int, text_len: int
) -> None:
    """The ops of one `mode` step of each model, most self CPU time first (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    for i, (name, model) in enumerate(zip(("latentdiff", "diffusers"), models)):
        step = make_steps(model, i == 1, batch, size, text_len)[mode]
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"## {name}: one {mode} step, {size}x{size}, batch {batch}")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
        )


def timed(step: Step, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    step()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 timed repeats per case instead of 7")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per model and case")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="latent H = W")
    parser.add_argument("--text-len", type=int, default=77, help="text tokens L")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (steadier on a busy machine; use with --threads 1)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both UNets (fullgraph=True) before timing"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the top ops of one step of each model and stop"
    )
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    with tempfile.TemporaryDirectory() as directory:
        models = build_models(Path(directory))
    if args.profile:
        for mode in args.modes:
            print_profile(models, mode, args.batches[0], args.sizes[0], args.text_len)
        return
    if args.compile:
        for model in models:
            model.compile(fullgraph=True)
    counts = [sum(p.numel() for p in model.parameters()) for model in models]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, params ours {counts[0]:,} / "
        f"diffusers {counts[1]:,}, {repeats} repeats, {args.clock} clock, text length {args.text_len}"
        f"{', both compiled (fullgraph=True)' if args.compile else ''}\n"
    )
    columns = [
        "step",
        "latent",
        "batch",
        "ours ms",
        "diffusers ms",
        "ours samples/s",
        "speed ratio",
        "best ratio",
        "ours peak MiB",
        "diffusers peak MiB",
        "peak ratio",
        "ours saved MiB",
        "diffusers saved MiB",
    ]
    if args.compile:
        columns += ["ours first call s", "diffusers first call s"]  # the compile, apart from the timed steps
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for mode in args.modes:
        for size in args.sizes:
            for batch in args.batches:
                steps = [
                    make_steps(model, i == 1, batch, size, args.text_len) for i, model in enumerate(models)
                ]
                # warm-up: first-call allocations, AdamW state, and with --compile the compile
                first = [timed(step[mode]) for step in steps]
                times: list[list[float]] = [[], []]
                peaks: list[list[float]] = [[], []]
                for r in range(repeats):
                    for i in (0, 1) if r % 2 == 0 else (1, 0):
                        times[i].append(timed(steps[i][mode], clock))
                for r in range(max(2, repeats // 2)):
                    for i in (0, 1) if r % 2 == 0 else (1, 0):
                        peaks[i].append(peak_rss_mib(steps[i][mode]))
                t = [statistics.median(x) for x in times]
                m = [statistics.median(x) for x in peaks]
                saved = ["–", "–"]
                if mode == "train" and not args.compile:  # saved-tensor hooks see eager autograd only
                    saved = [f"{saved_for_backward_mib(mo, st['loss']):.0f}" for mo, st in zip(models, steps)]
                    for model in models:
                        model.zero_grad(set_to_none=True)
                print(
                    f"| {mode} | {size}x{size} | {batch} | {t[0] * 1e3:.0f} | {t[1] * 1e3:.0f} | "
                    f"{batch / t[0]:.0f} | {t[1] / t[0]:.2f} | {min(times[1]) / min(times[0]):.2f} | {m[0]:.0f} | {m[1]:.0f} | "
                    f"{m[1] / max(m[0], 1e-9):.2f} | {saved[0]} | {saved[1]} |"
                    + (f" {first[0]:.1f} | {first[1]:.1f} |" if args.compile else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
