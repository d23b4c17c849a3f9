"""ShapesBench: how well generated images follow shapes-world prompts, read by the procedural detector.

The fixed prompt set (bench_prompts) is drawn from the caption grammar with BENCH_SEED; every prompt states every
attribute (size, position, background). Groups:

| group      | prompts                                                                                  |
|------------|------------------------------------------------------------------------------------------|
| `single`   | one object, a colour-shape pair seen in training                                          |
| `two`      | two objects, pairs seen in training                                                       |
| `held_out` | one object whose colour-shape pair is held out of training (green triangle, purple circle,  |
|            | orange square), 16 prompts each: compositional generalisation                             |
| `star`     | one star (the LoRA demonstration; not in the default run)                                 |

Prompt i of a group is generated with seed i. Scores per group (score), each a fraction in [0, 1]:

- `color`, `shape`, `size`, `position`: over the objects the prompts state, the fraction whose matched detection
  has that attribute right (an object with no detection left to match counts as wrong). Stated objects are matched
  one-to-one to detections, preferring detections of the stated colour and shape, then the most attributes right.
- `background`: over the prompts stating one, the fraction whose detected background is right.
- `full_match`: the fraction of prompts where every stated attribute of every object and the background are right
  and the detector finds no extra object (exactly as many objects as stated).
- `fidelity`: over the objects the prompts state, the mean soft IoU of the matched detection's pixels with the
  ideal shape the prompt names, fitted to them in position and size (DetectedObject.fits), so that it measures
  shape alone: a pinched square may pass as a square, it does not score its fidelity; an object with no detection
  scores 0. Rendered scenes score about 0.98 to 0.99 at 64 px, the loss being anti-aliasing.

An attribute no prompt of a group states scores None. `detector_accuracy` scores the detector on freshly rendered
scenes with their full captions (the score means something only if that is ≥ 0.99); `vae_ceiling` scores the same
scenes after a VAE encode and decode, the most a generator working through that VAE can reach.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from latentdiff.data.shapes import (
    HELD_OUT_PAIRS,
    STAR,
    ParsedCaption,
    ParsedObject,
    describe_scene,
    format_caption,
    parse_caption,
    render_scene,
    sample_scene,
)
from latentdiff.eval.detector import DetectedObject, Detection, detect

logger = logging.getLogger(__name__)

BENCH_SEED = 7  # seed of the fixed prompt set
DETECTOR_SEED = 11  # seed of the rendered scenes the detector and the VAE ceiling are scored on
GROUPS: tuple[str, ...] = ("single", "two", "held_out")  # the default run
STAR_GROUP = "star"
STAR_SIZES = ("small", "large")  # the star group is also scored per size: `star_small`, `star_large`
ALL_GROUPS: tuple[str, ...] = (*GROUPS, STAR_GROUP)
PROMPTS_PER_GROUP = 48
STAR_SEED_OFFSET = 1  # star scenes of the star VAE ceiling: their own stream of DETECTOR_SEED
_COUNTED: tuple[str, ...] = ("color", "shape", "size", "position", "background")  # right/wrong per statement
METRICS: tuple[str, ...] = (*_COUNTED, "full_match", "fidelity")
_OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")

GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]


@dataclass(frozen=True)
class BenchPrompt:
    """One bench prompt: its group, its text and the seed its image is generated with."""

    group: str
    text: str
    seed: int


def prompt_group(caption: ParsedCaption) -> str:
    """The group a prompt belongs to: `star` if it names a star, `held_out` if it names a held-out pair, else
    `single` or `two` by its number of objects."""
    if any(o.shape == STAR for o in caption.objects):
        return STAR_GROUP
    if any((o.color, o.shape) in HELD_OUT_PAIRS for o in caption.objects):
        return "held_out"
    return "single" if len(caption.objects) == 1 else "two"


def _draw_caption(group: str, rng: np.random.Generator, index: int) -> ParsedCaption:
    if group == "single":
        return describe_scene(sample_scene(rng, num_objects=1))
    if group == "two":
        return describe_scene(sample_scene(rng, num_objects=2))
    if group == STAR_GROUP:
        return describe_scene(sample_scene(rng, num_objects=1, star_only=True))
    if group == "held_out":  # the three pairs in turn, everything else drawn
        color, shape = sorted(HELD_OUT_PAIRS)[index % len(HELD_OUT_PAIRS)]
        drawn = describe_scene(sample_scene(rng, num_objects=1))
        size, position = drawn.objects[0].size, drawn.objects[0].position
        return ParsedCaption((ParsedObject(color, shape, size, position),), drawn.background)
    raise ValueError(f"group={group!r} is not one of {list(ALL_GROUPS)}")


def bench_prompts(
    groups: Sequence[str] = GROUPS, per_group: int = PROMPTS_PER_GROUP, seed: int = BENCH_SEED
) -> list[BenchPrompt]:
    """The fixed prompt set: `per_group` distinct full-attribute prompts per group, drawn with `seed` (each group
    from its own generator, so a group's prompts do not depend on the others). Prompt i of a group has seed i."""
    prompts = []
    for group in groups:
        if group not in ALL_GROUPS:
            raise ValueError(f"group={group!r} is not one of {list(ALL_GROUPS)}")
        rng = np.random.default_rng([seed, ALL_GROUPS.index(group)])
        texts: list[str] = []
        while len(texts) < per_group:
            text = format_caption(_draw_caption(group, rng, len(texts)))
            if text not in texts:
                texts.append(text)
        prompts += [BenchPrompt(group, text, i) for i, text in enumerate(texts)]
    return prompts


def read_prompt_file(path: str | os.PathLike) -> list[BenchPrompt]:
    """Reads bench prompts from a text file, one per line (blank lines and lines starting with # skipped); the
    group follows from the prompt (prompt_group) and prompt i of the file has seed i. Raises ValueError naming
    the line of a prompt outside the shapes grammar."""
    prompts = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            caption = parse_caption(text)
        except ValueError as error:
            raise ValueError(f"{path}, line {line_number}: {error}") from None
        prompts.append(BenchPrompt(prompt_group(caption), text, len(prompts)))
    if not prompts:
        raise ValueError(
            f"prompt file {str(path)!r} holds no prompts; write one shapes-world prompt per line"
        )
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptResult:
    """How one image follows one prompt.

    correct: attribute -> list of bools, one per stated object that states it (`background`: one entry if the
    prompt states it); full_match: every stated attribute right and no extra object; fidelity: one IoU in [0, 1]
    per stated object (see the module docstring).
    """

    caption: ParsedCaption
    detection: Detection
    matched: tuple[DetectedObject | None, ...]
    correct: dict[str, list[bool]]
    full_match: bool
    fidelity: tuple[float, ...]


def _attributes_right(stated: ParsedObject, found: DetectedObject | None) -> list[bool]:
    return [
        found is not None and getattr(found, a) == getattr(stated, a)
        for a in _OBJECT_ATTRIBUTES
        if getattr(stated, a) is not None
    ]


def match_objects(
    stated: Sequence[ParsedObject], detected: Sequence[DetectedObject]
) -> tuple[DetectedObject | None, ...]:
    """Matches stated objects one-to-one to detections: the assignment with the most colour-and-shape matches,
    then the most attributes right (ties: larger detections first). Unmatched stated objects get None."""
    # the six largest regions are plenty for ≤ 2 stated objects; None stands for "no detection"
    candidates = [*detected[:6], *([None] * len(stated))]

    def quality(assignment) -> tuple[int, int]:
        pairs = list(zip(stated, assignment))
        colour_shape = sum(d is not None and (d.color, d.shape) == (s.color, s.shape) for s, d in pairs)
        return colour_shape, sum(sum(_attributes_right(s, d)) for s, d in pairs)

    # max keeps the first best assignment, and permutations list larger regions first
    return tuple(max(itertools.permutations(candidates, len(stated)), key=quality))


def evaluate(image, caption: ParsedCaption | str) -> PromptResult:
    """Reads one image against one prompt (a ParsedCaption, or text in the shapes grammar)."""
    if isinstance(caption, str):
        caption = parse_caption(caption)
    detection = detect(image)
    matched = match_objects(caption.objects, detection.objects)
    correct: dict[str, list[bool]] = {a: [] for a in (*_OBJECT_ATTRIBUTES, "background")}
    for stated, found in zip(caption.objects, matched):
        for attribute in _OBJECT_ATTRIBUTES:
            if getattr(stated, attribute) is not None:
                correct[attribute].append(
                    found is not None and getattr(found, attribute) == getattr(stated, attribute)
                )
    if caption.background is not None:
        correct["background"].append(detection.background == caption.background)
    full_match = len(detection.objects) == len(caption.objects) and all(all(v) for v in correct.values())
    fidelity = tuple(
        0.0 if found is None else found.fits[stated.shape] for stated, found in zip(caption.objects, matched)
    )
    return PromptResult(caption, detection, matched, correct, full_match, fidelity)


def matches_prompt(image, prompt: str) -> bool:
    """Whether the detector reads the image as the prompt: every stated attribute right, no extra object."""
    return evaluate(image, prompt).full_match


def _summarise(results: Sequence[PromptResult]) -> dict[str, float | int | None]:
    """METRICS over a list of prompt results (None for an attribute no prompt states), plus `num_prompts`."""
    summary: dict[str, float | int | None] = {}
    for metric in _COUNTED:
        values = [v for r in results for v in r.correct[metric]]
        summary[metric] = float(np.mean(values)) if values else None
    summary["full_match"] = float(np.mean([r.full_match for r in results])) if results else None
    fidelity = [f for r in results for f in r.fidelity]
    summary["fidelity"] = float(np.mean(fidelity)) if fidelity else None
    summary["num_prompts"] = len(results)
    return summary


def _as_prompt(prompt: BenchPrompt | str) -> BenchPrompt:
    return (
        prompt
        if isinstance(prompt, BenchPrompt)
        else BenchPrompt(prompt_group(parse_caption(prompt)), prompt, 0)
    )


def score(images: Sequence, prompts: Sequence[BenchPrompt | str]) -> dict[str, dict[str, float | int | None]]:
    """Scores images against their prompts, per group: {group: {color, shape, size, position, background,
    full_match, fidelity, num_prompts}} (definitions in the module docstring). images: PIL images or (H, W, 3) uint8
    arrays, one per prompt; a prompt given as text is put in the group prompt_group assigns it."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
    bench = [_as_prompt(p) for p in prompts]
    results: dict[str, list[PromptResult]] = {}
    for image, prompt in zip(images, bench):
        results.setdefault(prompt.group, []).append(evaluate(image, prompt.text))
    summary = {group: _summarise(group_results) for group, group_results in results.items()}
    for size in STAR_SIZES:  # the star group by size: a small star is about 3 latent pixels across
        sized = [r for r in results.get(STAR_GROUP, []) if r.caption.objects[0].size == size]
        if sized:
            summary[f"{STAR_GROUP}_{size}"] = _summarise(sized)
    return summary


def _render_scenes(
    num_scenes: int,
    size: int,
    seed: int,
    include_star: bool,
    star_only: bool = False,
    star_size: str | None = None,
) -> list[tuple[Image.Image, str]]:
    """Fresh scenes of every composition (held-out pairs included) with their full captions; include_star: every
    fourth scene is a star-only one; star_only: single-star scenes only, from their own stream of `seed`;
    star_size: of those, only the ones whose star has this size (about half)."""
    samples = []
    for index in range(num_scenes):
        if star_only:
            rng = np.random.default_rng([seed, STAR_SEED_OFFSET, index])
            scene = sample_scene(rng, num_objects=1, star_only=True)
            if star_size is not None and describe_scene(scene).objects[0].size != star_size:
                continue
        else:
            rng = np.random.default_rng([seed, index])
            scene = sample_scene(rng, allow_held_out=True, star_only=include_star and index % 4 == 3)
        samples.append((render_scene(scene, size), format_caption(describe_scene(scene))))
    return samples


def detector_accuracy(
    num_scenes: int = 200, size: int = 64, seed: int = DETECTOR_SEED, include_star: bool = False
) -> dict[str, float | int | None]:
    """The detector scored on freshly rendered scenes (one or two objects, every colour-shape pair, every
    background) against their full captions: {color, shape, size, position, background, full_match, fidelity,
    num_prompts}.
    include_star: every fourth scene is a star-only one."""
    samples = _render_scenes(num_scenes, size, seed, include_star)
    return _summarise([evaluate(image, caption) for image, caption in samples])


def vae_ceiling(
    vae,
    num_scenes: int = 200,
    size: int = 64,
    seed: int = DETECTOR_SEED,
    batch_size: int = 16,
    progress: bool = False,
    star_only: bool = False,
    star_size: str | None = None,
) -> dict[str, float | int | None]:
    """The detector scored on the detector_accuracy scenes after an encode and decode by `vae` (a
    diffusers.AutoencoderKL; latents are the posterior mean): the most a generator through this VAE can reach.
    Runs on the VAE's device and dtype. size: the image side, divisible by the VAE's down-sampling factor.
    star_only: score single-star scenes instead (the most a star LoRA on this VAE can reach); star_size: only
    those of this size."""
    import torch

    from latentdiff.conditioning import decode_latents, encode_images

    samples = _render_scenes(
        num_scenes, size, seed, include_star=False, star_only=star_only, star_size=star_size
    )
    decoded: list[Image.Image] = []
    batches = range(0, len(samples), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="vae ceiling", disable=not progress):
            batch = np.stack([np.asarray(image) for image, _ in samples[start : start + batch_size]])
            # (B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]
            images = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1
            reconstructions = decode_latents(vae, encode_images(vae, images))
            pixels = ((reconstructions.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            decoded += [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]
    return _summarise([evaluate(image, caption) for image, (_, caption) in zip(decoded, samples)])


# ---------------------------------------------------------------------------------------------------------------
# The whole bench
# ---------------------------------------------------------------------------------------------------------------


def run_bench(
    generate_fn: GenerateFn,
    prompts: Sequence[BenchPrompt] | None = None,
    *,
    vae=None,
    image_size: int = 64,
    detector_scenes: int = 200,
    batch_size: int = 16,
    settings: dict | None = None,
    grid_path: str | os.PathLike | None = None,
    grid_count: int = 24,
    progress: bool = True,
) -> dict:
    """Runs ShapesBench: generates one image per prompt, scores them, and scores the detector and the VAE.

    generate_fn(prompts, seeds) -> list of PIL images, one per prompt; called with up to batch_size prompts at a
    time. prompts: defaults to bench_prompts() (single, two, held_out). vae: the generator's AutoencoderKL for
    the VAE ceiling (None leaves it out: {"full_match": None}). image_size: side of the rendered scenes for the
    detector and VAE scores. settings: recorded as given (sampler, steps, guidance, model), with the bench's own
    added. grid_path: where to save a grid PNG of the first grid_count prompts of each group, interleaved.

    Returns {"single": {...}, "two": {...}, "held_out": {...}, "detector": {...}, "vae_ceiling": {...},
    "settings": {...}}, each score dict holding METRICS and num_prompts; with star prompts and a vae, also
    "vae_ceiling_star" (the VAE ceiling on single-star scenes; `vae_ceiling_star_small`/`_large` by star size).
    """
    prompts = list(prompts) if prompts is not None else bench_prompts()
    images = generate_images(generate_fn, prompts, batch_size, progress)
    result: dict = score(images, prompts)
    result.update(reference_scores(vae, prompts, detector_scenes, image_size, progress))
    result["settings"] = bench_settings(settings, prompts, detector_scenes, image_size)
    if grid_path is not None:
        order = _interleave_groups(prompts, grid_count)
        save_grid(
            [images[i] for i in order],
            [prompts[i].text for i in order],
            grid_path,
            marks=[matches_prompt(images[i], prompts[i].text) for i in order],
        )
    return result


def bench_settings(
    settings: dict | None, prompts: Sequence[BenchPrompt], detector_scenes: int, image_size: int
) -> dict:
    """The settings a result records: the caller's (sampler, steps, guidance, model) and the bench's own."""
    return {
        **(settings or {}),
        "prompt_seed": BENCH_SEED,
        "prompts_per_group": {
            g: sum(p.group == g for p in prompts) for g in dict.fromkeys(p.group for p in prompts)
        },
        "detector_scenes": detector_scenes,
        "detector_seed": DETECTOR_SEED,
        "scene_size": image_size,
    }


def generate_images(
    generate_fn: GenerateFn, prompts: Sequence[BenchPrompt], batch_size: int = 16, progress: bool = True
) -> list[Image.Image]:
    """One image per prompt: generate_fn(texts, seeds) called with up to batch_size prompts at a time."""
    images: list[Image.Image] = []
    with tqdm(total=len(prompts), desc="shapesbench", unit="img", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            generated = list(generate_fn([p.text for p in batch], [p.seed for p in batch]))
            if len(generated) != len(batch):
                raise ValueError(f"generate_fn returned {len(generated)} images for {len(batch)} prompts")
            images += generated
            bar.update(len(batch))
    return images


def reference_scores(
    vae, prompts: Sequence[BenchPrompt], detector_scenes: int, image_size: int, progress: bool = True
) -> dict[str, dict]:
    """The rows that do not depend on the generator: "detector" (rendered scenes) and "vae_ceiling" (the same
    scenes through `vae`; {"full_match": None} without one), and "vae_ceiling_star" when the prompts hold stars."""
    rows: dict[str, dict] = {"detector": detector_accuracy(detector_scenes, image_size)}
    rows["vae_ceiling"] = (
        vae_ceiling(vae, detector_scenes, image_size, progress=progress)
        if vae is not None
        else {"full_match": None}
    )
    if vae is not None and any(p.group == STAR_GROUP for p in prompts):
        rows["vae_ceiling_star"] = vae_ceiling(
            vae, detector_scenes, image_size, progress=progress, star_only=True
        )
        for size in STAR_SIZES:
            rows[f"vae_ceiling_star_{size}"] = vae_ceiling(
                vae, detector_scenes, image_size, progress=progress, star_only=True, star_size=size
            )
    return rows


def _interleave_groups(prompts: Sequence[BenchPrompt], count: int) -> list[int]:
    """Indices of up to `count` prompts, taking the groups in turn."""
    by_group: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_group.setdefault(p.group, []).append(i)
    turns = itertools.zip_longest(*by_group.values())
    return [i for turn in turns for i in turn if i is not None][:count]


def format_table(result: dict) -> str:
    """A plain-text table of a run_bench result: one row per group, one column per metric."""
    rows = [name for name in result if name != "settings"]
    header = f"{'group':<24}" + "".join(f"{m:>12}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for name in rows:
        cells = [result[name].get(m) for m in METRICS]
        lines.append(f"{name:<24}" + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in cells))
    return "\n".join(lines)


def save_grid(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    path: str | os.PathLike,
    columns: int = 6,
    cell: int = 128,
    marks: Sequence[bool] | None = None,
) -> Path:
    """Saves a PNG grid: each image scaled to cell×cell pixels with its prompt written under it (in green or red
    when marks says whether it matched). Returns the path."""
    if len(images) != len(prompts) or (marks is not None and len(marks) != len(images)):
        raise ValueError(
            f"got {len(images)} images, {len(prompts)} prompts and "
            f"{None if marks is None else len(marks)} marks; pass one of each per image"
        )
    font = ImageFont.load_default()
    wrap = max(cell // 6, 8)  # the default bitmap font is about 6 px per character
    captions = [textwrap.wrap(p, wrap) for p in prompts]
    text_height = 11 * max((len(c) for c in captions), default=1) + 4
    rows = math.ceil(len(images) / columns) if images else 0
    grid = Image.new("RGB", (columns * cell, max(rows, 1) * (cell + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        colour = (0, 0, 0) if marks is None else ((0, 130, 0) if marks[i] else (200, 0, 0))
        draw.multiline_text((x + 2, y + cell + 2), "\n".join(lines), fill=colour, font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
