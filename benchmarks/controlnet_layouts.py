"""The ControlNet demonstration: layouts placing the embedded default's objects where text cannot say.

    python benchmarks/controlnet_layouts.py outputs/controlnet-layout [--count 96] [--seed 1000] [--steps N]
        [--scale S] [--guidance G] [--figure PATH]

Test layouts are drawn from seed 1000 unless --seed says (training used seed 0), a third each with 1, 2 and 3
objects, anywhere on the canvas. Each is generated twice with the same noise: by the default with the ControlNet
(caption + silhouettes) and by the default alone (caption only: the text says colours and shapes, not places). Both are scored against the
layout by `latentdiff.eval.layouts`; with the ControlNet's scale at 0 the images must equal the base's bit for bit.
Sampling: the default's carried settings (its sampler, steps and guidance) unless --steps or --guidance say.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data.layouts import Layout, layout_caption, layout_condition, sample_layout
from latentdiff.eval.layouts import score_layout, summarise
from pipelines import ControlNetPipeline, LatentPipeline

TEST_SEED, BATCH = 1000, 16


def test_layouts(count: int, seed: int = TEST_SEED) -> list[Layout]:
    return [sample_layout(np.random.default_rng([seed, i]), num_objects=1 + i % 3) for i in range(count)]


def generate(
    pipe, layouts: list[Layout], scale: float | None, steps: int, guidance: float
) -> list[Image.Image]:
    """One image per layout, seed i for layout i; scale None: the base pipeline (caption only)."""
    images = []
    for start in range(0, len(layouts), BATCH):
        part = layouts[start : start + BATCH]
        arguments = dict(
            prompt=[layout_caption(layout) for layout in part],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(start + i) for i in range(len(part))],
        )
        if scale is not None:
            arguments.update(
                image=[layout_condition(layout) for layout in part], controlnet_conditioning_scale=scale
            )
        images += pipe(**arguments).images
    return images


def table(rows: dict[str, list[dict]]) -> str:
    columns = ("position", "color", "shape", "size", "object")
    lines = [
        "| objects | layouts | " + " | ".join(f"{c} accuracy" for c in columns) + " | full match |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for name, results in rows.items():
        s = summarise(results)
        values = " | ".join(f"{s[f'{c}_accuracy']:.3f}" for c in columns)
        lines.append(f"| {name} | {s['layouts']} | {values} | {s['full_match']:.3f} |")
    return "\n".join(lines)


def by_count(layouts: list[Layout], images: list[Image.Image]) -> dict[str, list[dict]]:
    results = [score_layout(image, layout) for image, layout in zip(images, layouts)]
    rows = {str(n): [r for r, layout in zip(results, layouts) if len(layout.objects) == n] for n in (1, 2, 3)}
    return {**rows, "all": results}


def figure(layouts: list[Layout], controlled: list, base: list, path: Path, count: int = 6) -> None:
    """Rows of (condition, with the ControlNet, caption only), 128 px each."""
    cell = 128
    grid = Image.new("RGB", (3 * cell, count * cell), (255, 255, 255))
    for row in range(count):
        for column, image in enumerate((layout_condition(layouts[row]), controlled[row], base[row])):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (column * cell, row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("controlnet", help="the trained ControlNet folder")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test layouts' seed (training: 0)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's recommended")
    parser.add_argument("--scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's recommended")
    parser.add_argument("--figure", default=None, help="where to save the README figure")
    args = parser.parse_args()
    layouts = test_layouts(args.count, args.seed)
    base = LatentPipeline()
    parts = (base.unet, base.scheduler, base.vae, base.text_encoder, base.tokenizer)
    controlled = ControlNetPipeline(
        *parts, controlnet=args.controlnet, sampling_settings=base.sampling_settings
    )
    for pipe in (base, controlled):
        pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    steps, guidance = base.resolve_sampling(args.steps, args.guidance)
    with_control = generate(controlled, layouts, args.scale, steps, guidance)
    caption_only = generate(base, layouts, None, steps, guidance)
    switched_off = generate(controlled, layouts[:BATCH], 0.0, steps, guidance)
    identical = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(switched_off, caption_only[:BATCH])
    )
    sampler, seconds = type(base.scheduler).__name__, time.perf_counter() - started
    print(
        f"{args.count} layouts (seed {args.seed}), {sampler} {steps} steps, guidance {guidance}, "
        f"ControlNet scale {args.scale}, {seconds:.0f} s"
    )
    print("\nwith the ControlNet (caption + layout):\n" + table(by_count(layouts, with_control)))
    print("\nthe default alone (caption only):\n" + table(by_count(layouts, caption_only)))
    print(f"\nControlNet at scale 0 gives the default's images bit for bit ({BATCH} layouts): {identical}")
    if args.figure:
        picked = [2, 5, 1, 4, 0, 3]  # two layouts of 3 objects, two of 2, two of 1
        figure(
            [layouts[i] for i in picked],
            [with_control[i] for i in picked],
            [caption_only[i] for i in picked],
            Path(args.figure),
        )


if __name__ == "__main__":
    main()
