"""Training throughput of train/train_t2i.py's loop on CPU: our UNet vs diffusers' UNet, and --cache_latents.

Every row runs the real loop (`trainer.Trainer` + `t2i.TextToImageTask`: data loading and transforms, VAE posterior,
text encoder, classifier-free dropout, noise, UNet forward and backward, clipping, AdamW, EMA) on an imagefolder of
random 64 px images with captions, and reports images/s over the training steps (the loop's own count: global
samples per second, first step excluded).

Two models, both with the UNet of shared/FEASIBILITY.md's first row ((64, 128, 128), one ResBlock per level,
cross-attention on the two upper levels and in the middle, 8 heads, cross_attention_dim 128) on 16x16x4 latents and
a 3-layer, 128-wide CLIP text model:
- `shapes`: the small f=4 AutoencoderKL (32, 64, 64) of the embedded default, 64 px images.
- `sd-vae`: an SD-shaped f=8 AutoencoderKL (128, 256, 512, 512), two ResBlocks per level, 128 px images: the VAE
  encode dominates the step, as it does when fine-tuning Stable Diffusion.

Rows per model: latentdiff's ConditionalUNet, diffusers' UNet2DConditionModel (same weights, same loop, through a
wrapper that returns `.sample`), and latentdiff's UNet with --cache_latents (the cache is built before the timed
run; its build time is printed). Runs alternate (ours, diffusers, cached, cached, diffusers, ours, ...) and the
median over repeats is reported, so load from other processes hits all rows alike.

    python -m benchmarks.bench_train                          # both models, batch 8, 6 steps, 2 repeats
    python -m benchmarks.bench_train --threads 1              # on a machine shared with other jobs
    python -m benchmarks.bench_train --models shapes --repeats 1 --steps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.conftest import build_tiny_clip_tokenizer  # run as a module from the repository root
from train.data import load_data
from train.launch import make_accelerator
from train.loop import Trainer
from train.tasks.t2i import TextToImageTask
from train.tasks.t2i_config import T2IConfig
from train.tasks.t2i_models import build_models, resolve_model_files

MODELS = {
    "shapes": {"vae_channels": (32, 64, 64), "vae_layers": 1, "image_size": 64},
    "sd-vae": {"vae_channels": (128, 256, 512, 512), "vae_layers": 2, "image_size": 128},
}
WORDS = "red green blue yellow circle square triangle small large left right top bottom center".split()


def write_model(directory: Path, vae_channels: tuple[int, ...], vae_layers: int, image_size: int) -> Path:
    """An SD-layout folder of random components, written by diffusers."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer-source")
    torch.manual_seed(0)  # a script: the global RNG is ours to seed
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,  # diffusers' name for the head count
        cross_attention_dim=128,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        layers_per_block=vae_layers,
        latent_channels=4,
        sample_size=image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory / "model")
    return directory / "model"


def write_images(directory: Path, count: int, size: int) -> Path:
    """An imagefolder of random RGB images with random captions."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            directory / f"{i:04d}.png"
        )
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": "a " + " ".join(rng.choice(WORDS, 4))}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DConditionModel called like ConditionalUNet (returns the tensor, not `.sample`)."""

    def __init__(self, folder: Path) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def train_once(model: Path, data: Path, out: Path, unet: str, cache: bool, args, image_size: int) -> float:
    """One run of the loop; returns its images/s."""
    cfg = T2IConfig(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
        output_dir=str(out),
        resolution=image_size,
        center_crop=True,
        random_flip=True,
        cache_latents=cache,
        latents_cache_dir=str(out.parent / "cache"),
        train_batch_size=args.batch,
        max_train_steps=args.steps + 1,  # the first step is excluded from the timing
        lr_warmup_steps=0,
        checkpointing_steps=None,
        use_ema=True,
        report_to="none",
        seed=0,
    )
    accelerator = make_accelerator(cfg)
    models = build_models(cfg, resolve_model_files(cfg), accelerator.device, torch.float32)
    if unet == "diffusers":
        models.unet = DiffusersUNet(model).train()
    task = TextToImageTask(cfg, models, accelerator, seed=0)
    train_set, _, collate = task.datasets(load_data(cfg))
    result = Trainer(cfg, accelerator, models.unet, task.compute_loss, train_set, collate, seed=0).train()
    return result.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row (median reported)")
    parser.add_argument("--images", type=int, default=32, help="images in the dataset")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (CI machines have 2 cores)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"
    logging.disable(logging.WARNING)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            spec = MODELS[name]
            folder = Path(tmp) / name
            model = write_model(folder, spec["vae_channels"], spec["vae_layers"], spec["image_size"])
            data = write_images(folder / "images", args.images, spec["image_size"])
            start = time.perf_counter()
            train_once(
                model,
                data,
                folder / "warm",
                "ours",
                True,
                argparse.Namespace(**{**vars(args), "steps": 1}),
                spec["image_size"],
            )  # builds the cache (and warms up)
            build = time.perf_counter() - start
            order = [("ours", False), ("diffusers", False), ("ours", True)]
            speeds: dict[tuple[str, bool], list[float]] = {key: [] for key in order}
            for repeat in range(args.repeats):
                for i, (unet, cache) in enumerate(order if repeat % 2 == 0 else order[::-1]):
                    out = folder / f"run-{repeat}-{i}"
                    speeds[(unet, cache)].append(
                        train_once(model, data, out, unet, cache, args, spec["image_size"])
                    )
            median = {key: statistics.median(values) for key, values in speeds.items()}
            rows.append((name, spec, median, build))

    print(
        f"# torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} timed steps, "
        f"median of {args.repeats} runs; images/s (global samples per second of training steps)"
    )
    print(
        "| model | image px | latentdiff UNet | diffusers UNet | ours / diffusers | latentdiff + cache_latents | "
        "cache / no cache | cache build (1 step incl.) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, spec, median, build in rows:
        ours, theirs, cached = median[("ours", False)], median[("diffusers", False)], median[("ours", True)]
        print(
            f"| {name} | {spec['image_size']} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | {cached:.1f} | "
            f"{cached / ours:.2f}x | {build:.1f} s |"
        )


if __name__ == "__main__":
    main()
