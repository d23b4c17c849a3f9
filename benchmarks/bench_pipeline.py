"""LatentPipeline against diffusers' StableDiffusionPipeline: same SD-layout folder, same weights, CPU.

The model is the size of the embedded default this machine can train (shared/FEASIBILITY.md): a UNet
(64, 128, 128) with one ResBlock per level, cross-attention on the two upper levels and in the middle, 8 heads,
cross_attention_dim 128, on 16x16x4 latents; an f=4 AutoencoderKL (32, 64, 64), so 64x64 px images; a 3-layer,
128-wide CLIP text model with a 77-token BPE tokenizer. Random weights, written once by diffusers'
`StableDiffusionPipeline.save_pretrained`; both pipelines load that folder, and they share the very same VAE, text
encoder and tokenizer objects (only the UNet and the sampler are each project's own).

Each call: 25 DDIM steps, classifier-free guidance 7.5 (cond + uncond in one batch), output_type "np", progress bars
off, batch 1 and 4 (4 prompts). Calls alternate (ours, theirs, theirs, ours, ...) after one warm-up each, so load
from other processes hits both alike; the table gives the median wall time per image, the ratio ours / diffusers
(< 1: latentdiff is faster), and the ratio of the fastest calls (less sensitive to a loaded machine). The images of
the two pipelines are compared first (max |Δ| on [0, 1]).

    python -m benchmarks.bench_pipeline                 # 2 threads, 7 calls each per batch size
    python -m benchmarks.bench_pipeline --repeats 3     # quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.conftest import build_tiny_clip_tokenizer  # run as a module from the repository root

PROMPTS = [
    "a small red circle in the top left on a black background",
    "a large blue square in the center on a white background",
    "a yellow triangle at the bottom",
    "a purple star on the right on a gray background",
]
STEPS = 25
GUIDANCE = 7.5


def write_model(directory: Path) -> Path:
    """The benchmark's SD-layout folder, written by diffusers from random components."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer(directory / "tokenizer-source")
    torch.manual_seed(0)  # a script, not the library: the global RNG is ours to seed
    unet = UNet2DConditionModel(
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
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
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
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "model")
    return directory / "model"


def load_both(folder: Path):
    from diffusers import StableDiffusionPipeline

    from pipelines import LatentPipeline

    ours = LatentPipeline.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(
        folder, vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, safety_checker=None
    )
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def timed(pipe, batch: int, seed: int) -> tuple[float, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    images = pipe(
        PROMPTS[:batch],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=generator,
        output_type="np",
    ).images
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per pipeline and batch size")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (CI machines have 2 cores)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (at most 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = load_both(write_model(Path(tmp)))
        with torch.inference_mode():
            _, a = timed(ours, 2, seed=0)
            _, b = timed(theirs, 2, seed=0)
        print(f"# same images: max |ours - diffusers| = {np.abs(a - b).max():.2e} (pixels in [0, 1])")
        print(
            f"# torch {torch.__version__}, {args.threads} threads, {STEPS} DDIM steps, guidance {GUIDANCE}, 64x64 px"
        )
        print(
            "| batch | latentdiff s/image | diffusers s/image | ratio (ours/diffusers) | ratio of fastest calls |"
        )
        print("|---|---|---|---|---|")
        for batch in args.batches:
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            timed(ours, batch, seed=1)  # warm-up
            timed(theirs, batch, seed=1)
            for repeat in range(args.repeats):
                order = [("ours", ours), ("theirs", theirs)]
                for name, pipe in order if repeat % 2 == 0 else order[::-1]:
                    times[name].append(timed(pipe, batch, seed=repeat)[0] / batch)
            ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["theirs"])
            fastest = min(times["ours"]) / min(times["theirs"])
            print(f"| {batch} | {ours_s:.3f} | {theirs_s:.3f} | {ours_s / theirs_s:.2f} | {fastest:.2f} |")


if __name__ == "__main__":
    main()
