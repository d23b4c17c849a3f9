"""Where in the noise range a model's shape errors are made: SDEdit (Meng et al. 2022) from rendered scenes.

    python -m benchmarks.denoise_from_scenes [--model DIR] [--per-group 48] [--strengths 0.25 0.5 0.75 1]
        [--steps 20] [--guidance G] [--empty-prompt] [--grid PATH]

Each ShapesBench prompt is rendered as a perfect scene (`scene_for_caption`, scene i from seed i), noised to
strength s (t ≈ s·T: the scene's layout, colours and shapes are all still in z_t for small s) and denoised by the
model with its prompt (the image-to-image pipeline, DDIM, `--steps` steps for s = 1, the last s of them otherwise).
The strict detector scores the results per group. At s = 1 the scene is forgotten (plain generation, up to the
sampler's steps); at s = 0.25 only the last quarter of the steps runs, where a well-trained denoiser has nothing to
decide and should give the scene back. So a group that loses full match at small s loses it in the fine detail the
last steps draw (an outline, a corner), one that keeps it there and loses it at large s loses it where the layout
and shapes are chosen. `--empty-prompt` denoises with the empty prompt (the unconditional branch alone, guidance 1).
`--grid` saves, for the smallest strength, each scene the detector refuses beside what the model made of it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from latentdiff.data.shapes import parse_caption, render_scene, scene_for_caption
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.eval.shapesbench import GROUPS, bench_prompts, evaluate, score
from pipelines.img2img_pipeline import LatentImg2ImgPipeline

BATCH = 16


def rendered_scenes(prompts) -> list[Image.Image]:
    """Scene i: a perfect rendering of prompt i (its unstated attributes drawn from seed i)."""
    return [
        render_scene(scene_for_caption(parse_caption(p.text), np.random.default_rng(i)))
        for i, p in enumerate(prompts)
    ]


def denoise(pipe, prompts, scenes, strength: float, steps: int, guidance: float, empty: bool) -> list:
    """The model's redraw of each scene from strength `strength`; image i uses seed i."""
    images = []
    for start in range(0, len(prompts), BATCH):
        part = range(start, min(start + BATCH, len(prompts)))
        images += pipe(
            ["" if empty else prompts[i].text for i in part],
            image=[scenes[i] for i in part],
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=1.0 if empty else guidance,
            generator=[torch.Generator().manual_seed(i) for i in part],
        ).images
    return images


def save_refusals(path: str, prompts, scenes, images) -> int:
    """Scene | redraw, one pair per row, for every redraw the detector refuses; returns the count."""
    pairs = [(s, im) for s, im, p in zip(scenes, images, prompts) if not evaluate(im, p.text).full_match]
    side = 128
    canvas = Image.new("RGB", (2 * side + 4, max(1, len(pairs)) * (side + 4)), "white")
    for row, (scene, image) in enumerate(pairs):
        canvas.paste(scene.resize((side, side), Image.NEAREST), (0, row * (side + 4)))
        canvas.paste(image.resize((side, side), Image.NEAREST), (side + 4, row * (side + 4)))
    canvas.save(path)
    return len(pairs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument(
        "--per-group", type=int, default=48, help="ShapesBench prompts per group (the fixed set)"
    )
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps for strength 1")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's carried guidance")
    parser.add_argument("--empty-prompt", action="store_true", help="denoise with the empty prompt")
    parser.add_argument("--grid", default=None, help="PNG of the refused redraws at the smallest strength")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for s in args.strengths:
        if not 0 < s <= 1:
            parser.error(f"--strengths: {s} is not in (0, 1]")

    pipe = LatentImg2ImgPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    _, guidance = pipe.resolve_sampling(None, args.guidance)
    prompts = bench_prompts(per_group=args.per_group)
    scenes = rendered_scenes(prompts)
    report = {
        "rendered": score(scenes, prompts),
        "model": args.model,
        "guidance": guidance,
        "steps": args.steps,
    }
    print(
        f"{args.model}: DDIM {args.steps} steps, guidance {1.0 if args.empty_prompt else guidance}"
        f"{', empty prompt' if args.empty_prompt else ''}; full match / fidelity per group"
    )
    print("strength  " + "  ".join(f"{g:>16}" for g in GROUPS))
    rows = [("rendered", report["rendered"])]
    for strength in sorted(args.strengths):
        began = time.perf_counter()
        images = denoise(pipe, prompts, scenes, strength, args.steps, guidance, args.empty_prompt)
        result = score(images, prompts)
        report[f"strength {strength}"] = result
        rows.append((f"{strength:g} ({time.perf_counter() - began:.0f} s)", result))
        if args.grid and strength == min(args.strengths):
            count = save_refusals(args.grid, prompts, scenes, images)
            print(f"{count} refused redraws at strength {strength:g} -> {args.grid}")
    for name, result in rows:
        cells = [f"{result[g]['full_match']:.3f} / {result[g]['fidelity']:.3f}" for g in GROUPS]
        print(f"{name:<10}" + "  ".join(f"{c:>16}" for c in cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
