"""Classifier guidance on the embedded default, judged by the ShapesBench detector; guided against unguided, same run.

    python -m benchmarks.classifier_guidance --classifier latentdiff/assets/classifier --sampler ddpm --scales 0 5

(a) The classifier's own accuracy against t is its training run's `accuracy_against_t.json` (train_classifier.py).
(b) Classifier guidance alone: the empty prompt, no classifier-free guidance, and as target the layout of each
    ShapesBench single-object prompt (its colour, shape and cell; every other cell empty). An image shows the
    requested class when the detector reads `a {colour} {shape} {where}` in it and nothing else (full match;
    size and background are free). `present` counts images holding the requested object, extra objects allowed;
    `classifier` those whose final latent the classifier itself reads (at t = 0) as the target layout. The misses
    are counted by what the detector read wrong (an image can miss on several): the shape (`irregular` included),
    the colour, the cell, or an extra object. Unguided (scale 0), the requested class is chance: about 1 in 15 × 9
    pairs and cells.
(c) Classifier guidance added to text guidance: each ShapesBench two-object prompt with classifier-free guidance
    --guidance-scale, with and without classifier guidance towards the prompt's layout; full match as ShapesBench
    scores it (every stated attribute right, no extra object).
Image i of a group uses seed i (plus --first-seed), as ShapesBench does, so every scale starts from the same noise;
--prompt-seed draws another set of targets than ShapesBench's fixed one (held-out measurements).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from latentdiff.conditioning import decode_latents
from latentdiff.data.scene_labels import CELL_ATTRIBUTES, caption_labels
from latentdiff.data.shapes import WHERE_PHRASES, parse_caption
from latentdiff.eval.shapesbench import BENCH_SEED, PromptResult, bench_prompts, evaluate
from latentdiff.models.classifier import NoiseAwareClassifier
from latentdiff.schedulers.registry import choose_sampler
from pipelines import LatentPipeline


def generate(
    pipe: LatentPipeline,
    prompts: Sequence[str],
    targets: Sequence[str],
    classifier: NoiseAwareClassifier,
    scale: float,
    args: argparse.Namespace,
    guidance_scale: float,
) -> tuple[list[Image.Image], list[bool]]:
    """One image per prompt (seed first_seed + i for image i), guided towards the layout of targets[i] when
    scale > 0; and whether the classifier reads each final latent (at t = 0) as its target layout."""
    images, read_as_target = [], []
    for start in range(0, len(prompts), args.batch_size):
        part = slice(start, start + args.batch_size)
        rows = [caption_labels(target) for target in targets[part]]
        labels = {name: torch.tensor([row[name] for row in rows]) for name, _ in CELL_ATTRIBUTES}
        guided = dict(classifier=classifier, classifier_guidance_scale=scale, class_labels=labels)
        seeds = range(args.first_seed + start, args.first_seed + start + len(rows))
        latents = pipe(
            list(prompts[part]),
            num_inference_steps=args.steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="latent",
            **(guided if scale > 0 else {}),
        ).images
        with torch.no_grad():
            logits = classifier(latents.to(classifier.device), 0)
            pixels = (decode_latents(pipe.vae, latents).float() / 2 + 0.5).clamp(0, 1)
        read_as_target += [
            all(bool(logits[name][i].argmax() == labels[name][i]) for name in labels)
            for i in range(len(rows))
        ]
        images += [
            Image.fromarray(image)
            for image in (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        ]
    return images, read_as_target


def misses(results: Sequence[PromptResult]) -> str:
    """How many images the detector read with a wrong shape, colour or cell, or with an extra object."""
    counts = {
        attribute: sum(not all(r.correct[attribute]) for r in results)
        for attribute in ("shape", "color", "position")
    }
    counts["extra"] = sum(len(r.detection.objects) > len(r.caption.objects) for r in results)
    return " | ".join(str(count) for count in counts.values())


def object_only(prompt: str) -> str:
    """`a {colour} {shape} {where}` of a one-object prompt (size and background left out)."""
    obj = parse_caption(prompt).objects[0]
    return f"a {obj.color} {obj.shape} {WHERE_PHRASES[obj.position]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--classifier", required=True, help="folder written by train_classifier.py (classifier/)"
    )
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[0.0, 10.0, 30.0], help="classifier scales s"
    )
    parser.add_argument("--sampler", default=None, help="ddim, ddpm, euler_a, ... (default: the model's own)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--count", type=int, default=48, help="images per setting (targets, prompts)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free w in (c)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--prompt-seed", type=int, default=BENCH_SEED, help="draw of the targets (ShapesBench's)"
    )
    parser.add_argument("--first-seed", type=int, default=0, help="image i uses seed first_seed + i")
    parser.add_argument("--skip", choices=["b", "c"], default=None, help="leave one measurement out")
    parser.add_argument("--model", default=None, help="a pipeline folder (default: the embedded default)")
    args = parser.parse_args(argv)
    pipe = LatentPipeline() if args.model is None else LatentPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = choose_sampler(pipe.scheduler, args.sampler, False)
    classifier = NoiseAwareClassifier.from_pretrained(args.classifier)
    if args.skip != "b":
        singles = bench_prompts(("single",), per_group=args.count, seed=args.prompt_seed)
        targets = [object_only(p.text) for p in singles]
        print("(b) empty prompt, classifier guidance alone")
        print(
            "| scale s | requested class (only object) | requested object present | classifier reads target "
            "| misses: shape | colour | cell | extra object |\n|---|---|---|---|---|---|---|---|"
        )
        for scale in args.scales:
            images, read = generate(
                pipe, [""] * len(targets), targets, classifier, scale, args, guidance_scale=1.0
            )
            results = [evaluate(image, target) for image, target in zip(images, targets)]
            exact = sum(r.full_match for r in results) / len(results)
            present = sum(all(all(v) for v in r.correct.values()) for r in results) / len(results)
            print(
                f"| {scale:g} | {exact:.3f} | {present:.3f} | {sum(read) / len(read):.3f} | {misses(results)} |",
                flush=True,
            )
    if args.skip != "c":
        prompts = [p.text for p in bench_prompts(("two",), per_group=args.count, seed=args.prompt_seed)]
        print(
            f"(c) two-object prompts, classifier-free guidance {args.guidance_scale:g} plus classifier guidance"
        )
        print("| scale s | full match |\n|---|---|")
        for scale in args.scales:
            images, _ = generate(pipe, prompts, prompts, classifier, scale, args, args.guidance_scale)
            full = sum(evaluate(image, prompt).full_match for image, prompt in zip(images, prompts))
            print(f"| {scale:g} | {full / len(prompts):.3f} |", flush=True)


if __name__ == "__main__":
    main()
