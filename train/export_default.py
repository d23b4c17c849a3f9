"""Ship a trained pipeline folder as the embedded default: its weights stored in float16, checked against float32.

    python train/export_default.py outputs/default/pipeline latentdiff/assets/default

The weights are saved in float16 (half the size) and loaded back in float32, as `LatentPipeline()` runs them.
Before anything is written over the destination, the script generates the ShapesBench prompts of a few groups with
both weight sets (same seeds, the --steps and --guidance it will carry) and reports the largest pixel difference and how many images the
detector reads differently; with --max-changed N it refuses to ship when more than N images change verdict.
The shipped folder carries --steps and --guidance (DDIM) as its recommended sampling settings
(`sampling_settings.json`, read by `LatentPipeline` and the CLI when the caller sets none).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.eval import shapesbench
from latentdiff.model_card import CARD_NAME, model_card
from latentdiff.sampling_settings import SamplingSettings
from pipelines.latent_pipeline import LatentPipeline

PARTS = ("unet", "vae", "text_encoder")


def default_card(prompts: int, changed: int, settings: SamplingSettings) -> str:
    """The embedded default's model card: what it is, how it was made, how it was checked."""
    return model_card(
        "latentdiff embedded default (shapes world)",
        "The small complete text-to-image model shipped inside the latentdiff package: its own AutoencoderKL, CLIP "
        "text tower and UNet, trained by this project's scripts (`train/build_default.sh`) on the shapes world "
        "(coloured circles, squares and triangles, small or large, in nine positions on white, black or gray, "
        "64 px). "
        "It loads offline with `LatentPipeline()` and is scored by `latentdiff bench` (ShapesBench); the README "
        "of the repository lists its latest scores.",
        tags=["shapes"],
        details={
            "weights": "float16 safetensors, loaded in float32",
            "float16 check": f"{changed} of {prompts} ShapesBench images read differently than in float32",
            "recommended sampling": f"DDIM, {settings.num_inference_steps} steps, guidance {settings.guidance_scale:g} (carried in sampling_settings.json)",
        },
        usage='from latentdiff import LatentPipeline\n\nimage = LatentPipeline("a large red circle in the top left")().images[0]',
    )


def generate(
    pipe: LatentPipeline, prompts: list[shapesbench.BenchPrompt], steps: int, guidance: float
) -> np.ndarray:
    images = []
    for start in range(0, len(prompts), 16):
        batch = prompts[start : start + 16]
        generators = [torch.Generator().manual_seed(p.seed) for p in batch]
        out = pipe(
            [p.text for p in batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        )
        images.append(out.images)
    return np.concatenate(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="trained SD-layout folder (train_t2i.py's --output_dir)")
    parser.add_argument("destination", type=Path, help="where the embedded default goes")
    parser.add_argument("--prompts-per-group", type=int, default=16)
    # The defaults are the settings chosen by the strict ShapesBench sweeps (README, "guidance sweep").
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps: checked, and carried by the model")
    parser.add_argument(
        "--guidance", type=float, default=1.5, help="guidance: checked, and carried by the model"
    )
    parser.add_argument("--max-changed", type=int, default=None, help="refuse if more images change verdict")
    args = parser.parse_args()

    full = LatentPipeline.from_pretrained(args.source)
    full.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        half_dir = Path(tmp) / "default"
        halved = copy.deepcopy(full)  # cast a copy: .to() works in place, and `full` must keep float32
        for name in PARTS:
            getattr(halved, name).to(torch.float16)
        settings = SamplingSettings("ddim", args.steps, args.guidance)
        halved.save_pretrained(half_dir, sampling_settings=settings)
        half = LatentPipeline.from_pretrained(half_dir)  # float16 on disk, float32 in memory
        half.set_progress_bar_config(disable=True)
        prompts = shapesbench.bench_prompts(per_group=args.prompts_per_group)
        a = generate(full, prompts, args.steps, args.guidance)
        b = generate(half, prompts, args.steps, args.guidance)
        diff = float(np.abs(a - b).max())
        verdict_a, verdict_b = (
            [
                shapesbench.matches_prompt(Image.fromarray((x * 255).round().astype(np.uint8)), p.text)
                for x, p in zip(images, prompts)
            ]
            for images in (a, b)
        )
        changed = sum(x != y for x, y in zip(verdict_a, verdict_b))
        print(
            f"{len(prompts)} prompts: max |float32 - float16| pixel difference {diff:.4f} (in [0, 1]); "
            f"{changed} image(s) read differently by the detector; matches float32 {sum(verdict_a)}, "
            f"float16 {sum(verdict_b)}"
        )
        if args.max_changed is not None and changed > args.max_changed:
            print(
                f"refusing to ship float16 weights: {changed} > --max-changed {args.max_changed}",
                file=sys.stderr,
            )
            return 1
        if args.destination.exists():
            shutil.rmtree(args.destination)
        shutil.copytree(half_dir, args.destination)
        (args.destination / CARD_NAME).write_text(default_card(len(prompts), changed, settings))
    size = sum(f.stat().st_size for f in args.destination.rglob("*") if f.is_file())
    print(f"wrote {args.destination} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
