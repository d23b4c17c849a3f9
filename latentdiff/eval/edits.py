"""ShapesBench edits: does an edit change what it was asked to and keep the rest, read by the bench's detector.

Each case starts from a rendered scene (a fixed seed per case) and asks for one edit; the result is scored with
`shapesbench.evaluate` against the caption of the edited scene (every attribute stated), so a full match means the
edit happened *and* everything else (shape, size, position, background, the other object) survived.

| kind        | start scene      | the edit                                            | scored against                  |
|-------------|------------------|-----------------------------------------------------|---------------------------------|
| `recolour`  | one object       | image-to-image with the caption in a new colour      | the scene with the new colour   |
| `add`       | one object       | inpaint an empty cell with the two-object caption    | the scene with the new object   |
| `remove`    | two objects      | inpaint one object's box with the other's caption    | the scene without the object    |
| `invert`    | one object       | DDIM-invert with the caption, regenerate it with the | the scene with the new colour   |
|             |                  | colour word changed                                  |                                 |

Masks are boxes on the latent grid (sides multiples of the VAE factor), so that the latent mask is the pixel mask:
for `add` the empty cell, for `remove` the object's box grown by `MASK_MARGIN` pixels; neither touches the other
object. The start image itself is scored too (`unedited`): it must not already match (0 for every kind), or an
edit that does nothing would pass. For inpainting, `outside_mask_max_change` is the largest change of any pixel
outside the mask (0 when the pipeline composites).

An edit function does the edits of a batch of cases of one kind: `edit_fn(kind, cases) -> list of PIL images`.
This module knows nothing of the pipelines (latentdiff never imports pipelines); `latentdiff bench --edits` wires
them in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from latentdiff.data.shapes import (
    HELD_OUT_PAIRS,
    OBJECT_COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    describe_scene,
    format_caption,
    render_scene,
    sample_scene,
)
from latentdiff.eval.shapesbench import evaluate

logger = logging.getLogger(__name__)

EDIT_KINDS: tuple[str, ...] = ("recolour", "add", "remove", "invert")
INPAINT_KINDS = ("add", "remove")
EDIT_SEED = 20  # seed of the start scenes; case i of a kind draws from [EDIT_SEED, kind index, i]
CASES_PER_KIND = 24
MASK_MARGIN = 2  # pixels around a removed object's box that the mask also repaints

EditFn = Callable[[str, list["EditCase"]], list[Image.Image]]


@dataclass(frozen=True)
class EditCase:
    """One edit: the start scene, the edited scene it should become, and for inpainting the mask.

    seed: the case's index within its kind, the seed of its noise; mask: (H, W) bool, True = repaint (inpainting
    kinds; None otherwise). Every kind's edit prompt is the edited scene's full caption (`target`).
    """

    kind: str
    seed: int
    start: Scene
    edited: Scene
    mask: np.ndarray | None = None

    @property
    def source_prompt(self) -> str:
        """The start scene's full caption (what inversion conditions on)."""
        return _caption(self.start)

    @property
    def target(self) -> str:
        """The edited scene's full caption: the edit's prompt and what the result is scored against."""
        return _caption(self.edited)

    prompt = target

    def start_image(self, size: int) -> Image.Image:
        return render_scene(self.start, size)

    def mask_image(self) -> Image.Image:
        """The mask as a PIL "L" image: 255 repaint, 0 keep."""
        return Image.fromarray(np.where(self.mask, 255, 0).astype(np.uint8))


def _caption(scene: Scene) -> str:
    return format_caption(describe_scene(scene))


def _new_colour(rng: np.random.Generator, colour: str, shape: str) -> str:
    """Another object colour, never one that makes a held-out pair with `shape` (the model never saw it)."""
    choices = [c for c in OBJECT_COLORS if c != colour and (c, shape) not in HELD_OUT_PAIRS]
    return str(rng.choice(choices))


def _box_pixels(
    box: tuple[float, float, float, float], size: int, grid: int, margin: int = 0
) -> tuple[int, ...]:
    """A box in units of S, grown by `margin` px, then outward to multiples of `grid` px, clipped to the canvas:
    (x0, y0, x1, y1) in pixels, exclusive ends."""
    x0, y0, x1, y1 = (v * size for v in box)
    snap_down = lambda v: max(0, int(np.floor((v - margin) / grid)) * grid)  # noqa: E731
    snap_up = lambda v: min(size, int(np.ceil((v + margin) / grid)) * grid)  # noqa: E731
    return snap_down(x0), snap_down(y0), snap_up(x1), snap_up(y1)


def _overlaps(a: tuple[int, ...], b: tuple[float, ...], size: int) -> bool:
    """Whether pixel box a (exclusive ends) meets box b (units of S) grown by one pixel."""
    bx0, by0, bx1, by1 = (v * size for v in b)
    return a[0] < bx1 + 1 and bx0 - 1 < a[2] and a[1] < by1 + 1 and by0 - 1 < a[3]


def _mask(box: tuple[int, ...], size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return mask


def _recolour_case(kind: str, index: int, rng: np.random.Generator) -> EditCase:
    start = sample_scene(rng, num_objects=1)
    obj = start.objects[0]
    edited = Scene(start.background, (replace(obj, color=_new_colour(rng, obj.color, obj.shape)),))
    return EditCase(kind, index, start, edited)


def _add_case(index: int, rng: np.random.Generator, size: int, grid: int) -> EditCase:
    """A one-object scene and a new object in a free cell whose mask box clears the first object (a start scene
    with no such cell, a large object in the centre, is drawn again)."""
    while True:
        start = sample_scene(rng, num_objects=1)
        first = start.objects[0]
        cells = {
            position: _cell_box(position, size, grid) for position in POSITIONS if position != first.position
        }
        free = [position for position, box in cells.items() if not _overlaps(box, first.bbox(), size)]
        if free:
            break
    position = free[int(rng.integers(len(free)))]
    pairs = [(c, s) for c in OBJECT_COLORS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    new = ObjectSpec(colour, shape, str(rng.choice(list(SIZES))), position)
    edited = Scene(start.background, (first, new))
    return EditCase("add", index, start, edited, _mask(cells[position], size))


def _cell_box(position: str, size: int, grid: int) -> tuple[int, ...]:
    row, col = POSITIONS[position]
    return _box_pixels((col / 3, row / 3, (col + 1) / 3, (row + 1) / 3), size, grid)


def _remove_case(index: int, rng: np.random.Generator, size: int, grid: int) -> EditCase:
    while True:
        start = sample_scene(rng, num_objects=2)
        gone = int(rng.integers(2))
        kept = start.objects[1 - gone]
        box = _box_pixels(start.objects[gone].bbox(), size, grid, MASK_MARGIN)
        if not _overlaps(box, kept.bbox(), size):
            break
    edited = Scene(start.background, (kept,))
    return EditCase("remove", index, start, edited, _mask(box, size))


def edit_cases(
    kinds: Sequence[str] = EDIT_KINDS,
    per_kind: int = CASES_PER_KIND,
    size: int = 64,
    grid: int = 4,
    seed: int = EDIT_SEED,
) -> list[EditCase]:
    """The fixed edit cases: `per_kind` per kind, case i of a kind drawn from its own generator [seed, kind, i].

    size: the scenes' side in pixels; grid: the VAE factor (mask boxes are snapped outward to multiples of it).
    """
    cases = []
    for kind in kinds:
        if kind not in EDIT_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {list(EDIT_KINDS)}")
        for index in range(per_kind):
            rng = np.random.default_rng([seed, EDIT_KINDS.index(kind), index])
            if kind == "add":
                cases.append(_add_case(index, rng, size, grid))
            elif kind == "remove":
                cases.append(_remove_case(index, rng, size, grid))
            else:
                cases.append(_recolour_case(kind, index, rng))
    return cases


def run_edit_bench(
    edit_fn: EditFn,
    cases: Sequence[EditCase] | None = None,
    size: int = 64,
    batch_size: int = 8,
    settings: dict | None = None,
    progress: bool = True,
) -> tuple[dict, list[Image.Image]]:
    """Edits every case and scores it. Returns ({kind: {full_match, unedited, num_cases[,
    outside_mask_max_change]}, "settings": {...}}, the edited images in case order)."""
    cases = list(cases) if cases is not None else edit_cases(size=size)
    images: list[Image.Image] = []
    with tqdm(total=len(cases), desc="edits", unit="img", disable=not progress) as bar:
        for kind in dict.fromkeys(c.kind for c in cases):
            of_kind = [c for c in cases if c.kind == kind]
            for start in range(0, len(of_kind), batch_size):
                batch = of_kind[start : start + batch_size]
                edited = list(edit_fn(kind, batch))
                if len(edited) != len(batch):
                    raise ValueError(f"edit_fn returned {len(edited)} images for {len(batch)} {kind} cases")
                images += edited
                bar.update(len(batch))
    order = [c for kind in dict.fromkeys(c.kind for c in cases) for c in cases if c.kind == kind]
    result: dict = {}
    for kind in dict.fromkeys(c.kind for c in order):
        pairs = [(c, image) for c, image in zip(order, images) if c.kind == kind]
        scores: dict = {
            "full_match": float(np.mean([evaluate(image, c.target).full_match for c, image in pairs])),
            "unedited": float(
                np.mean([evaluate(c.start_image(size), c.target).full_match for c, _ in pairs])
            ),
            "num_cases": len(pairs),
        }
        if kind in INPAINT_KINDS:
            scores["outside_mask_max_change"] = max(_outside_change(c, image, size) for c, image in pairs)
        result[kind] = scores
    result["settings"] = {**(settings or {}), "edit_seed": EDIT_SEED, "scene_size": size}
    return result, images


def _outside_change(case: EditCase, image: Image.Image, size: int) -> int:
    """The largest |edited − start| over the pixels and channels outside the case's mask (uint8 levels)."""
    edited = np.asarray(image.convert("RGB"), dtype=np.int16)
    start = np.asarray(case.start_image(size), dtype=np.int16)
    return int(np.abs(edited - start)[~case.mask].max())


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio 10 log₁₀(255² / MSE) in dB over the RGB pixels (inf for equal images)."""
    difference = np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mse = float(np.mean(difference**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


ReconstructFn = Callable[[list[Image.Image], list[str], int], list[Image.Image]]


def inversion_psnr(
    reconstruct_fn: ReconstructFn,
    round_trip_fn: Callable[[list[Image.Image]], list[Image.Image]],
    steps: Sequence[int],
    cases: Sequence[EditCase],
    size: int = 64,
) -> dict:
    """Reconstruction by DDIM inversion against the number of steps, on the start scenes of `cases`.

    reconstruct_fn(images, captions, n) inverts each image with its caption in n steps and samples it back with the
    same caption (guidance 1); round_trip_fn(images) is the VAE's encode-decode, the ceiling. Returns {"vae round
    trip": mean PSNR, n: {"psnr": mean PSNR to the image, "psnr_to_round_trip": to its VAE round trip}}.
    """
    images = [c.start_image(size) for c in cases]
    captions = [c.source_prompt for c in cases]
    round_trips = round_trip_fn(images)
    result: dict = {"vae round trip": float(np.mean([psnr(r, i) for r, i in zip(round_trips, images)]))}
    for n in steps:
        again = reconstruct_fn(images, captions, n)
        result[n] = {
            "psnr": float(np.mean([psnr(a, i) for a, i in zip(again, images)])),
            "psnr_to_round_trip": float(np.mean([psnr(a, r) for a, r in zip(again, round_trips)])),
        }
    return result


def format_edit_table(result: dict) -> str:
    """A plain-text table of run_edit_bench's scores: one row per kind."""
    header = f"{'edit':<10}{'full_match':>12}{'unedited':>10}{'cases':>7}{'outside-mask max |Δ|':>22}"
    lines = [header, "-" * len(header)]
    for kind, s in result.items():
        if kind == "settings":
            continue
        change = s.get("outside_mask_max_change")
        lines.append(
            f"{kind:<10}{s['full_match']:>12.3f}{s['unedited']:>10.3f}{s['num_cases']:>7}"
            f"{'-' if change is None else change:>22}"
        )
    return "\n".join(lines)
