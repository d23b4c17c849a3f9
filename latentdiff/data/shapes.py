"""The shapes world: a procedural, captioned image world fully determined by a seed (shared/SHAPES.md).

A scene is a flat background and one or two flat-coloured objects, each in its own cell of a 3×3 grid. Geometry is
relative to the canvas side S, so one scene renders at any size ≥ 32:

| quantity            | value                                                                          |
|---------------------|--------------------------------------------------------------------------------|
| object bounding box | `small` 0.20·S, `large` 0.30·S, square (the star is 0.951 as tall as wide)     |
| cell centre         | ((col + ½)·S/3, (row + ½)·S/3), row and col in 0..2                            |
| object centre       | cell centre + offset, each component in ±S/24, the box kept inside the canvas  |
| gap between objects | bounding boxes at least S/20 apart along x or y (they never touch)             |
| triangle            | upright isosceles: apex at the top centre, base along the bottom of the box    |
| star                | regular five-pointed star, upright, inner/outer radius 0.382                   |

Rendering is anti-aliased by drawing at 4× and averaging 4×4 blocks (a box filter): an edge pixel is then an exact
mix of the object's colour and the background's, which the detector (latentdiff.eval.detector) relies on.

Captions follow one grammar (SHAPES.md, "Captions"); `format_caption` writes it and `parse_caption` reads it back:

    a {size} {color} {shape} {where} on a {background} background
    a {size} {color} {shape} {where} and a {size} {color} {shape} {where}, on a {background} background

Size, `{where}` and the background clause are each optional. Training data never shows the held-out colour-shape
pairs (HELD_OUT_PAIRS) nor the reserved `star`, which only star-only scenes (the LoRA demonstration) use.
All randomness comes in as a `numpy.random.Generator`; nothing here touches a global RNG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")  # the base training shapes
STAR = "star"  # reserved for the LoRA demonstration: never in base training data
ALL_SHAPES: tuple[str, ...] = (*SHAPES, STAR)
SIZES: dict[str, float] = {"small": 0.20, "large": 0.30}  # bounding-box side as a fraction of S
# position name -> (row, col) of its cell in the 3×3 grid
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
# position name -> the phrase a caption uses for it
WHERE_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
# colour-shape pairs never rendered in training data (they measure compositional generalisation)
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
)

MAX_OFFSET = 1.0 / 24.0  # largest centre offset from the cell centre, in units of S
MIN_GAP = 1.0 / 20.0  # smallest gap between two objects' bounding boxes, in units of S
STAR_INNER_RATIO = math.sin(math.radians(18)) / math.sin(math.radians(54))  # r/R of a regular star, 0.382
MIN_SIZE = 32  # smallest canvas side the geometry is drawn well at
_SUPERSAMPLE = 4  # draw at 4× then average 4×4 blocks


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene; every attribute is set.

    offset: (dx, dy) of the object's bounding-box centre from its cell centre, in units of the canvas side S,
    each in [-1/24, 1/24]; +y points down.
    """

    color: str
    shape: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        _check_choice("color", self.color, OBJECT_COLORS)
        _check_choice("shape", self.shape, ALL_SHAPES)
        _check_choice("size", self.size, SIZES)
        _check_choice("position", self.position, POSITIONS)
        if any(abs(o) > MAX_OFFSET + 1e-9 for o in self.offset):
            raise ValueError(
                f"offset={self.offset} exceeds ±1/24 of the canvas side; keep each component within it"
            )

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the object's square bounding box, in units of S."""
        row, col = POSITIONS[self.position]
        cx = (col + 0.5) / 3 + self.offset[0]
        cy = (row + 0.5) / 3 + self.offset[1]
        half = SIZES[self.size] / 2
        return (cx - half, cy - half, cx + half, cy + half)


@dataclass(frozen=True)
class Scene:
    """A background colour name and one or two objects in distinct cells."""

    background: str
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        _check_choice("background", self.background, BACKGROUND_COLORS)
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects must be in distinct cells, got positions {positions}")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _offset_bounds(size: str, position: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (x, y) interval of offsets that keep the object's box within ±1/24 and inside the canvas."""
    row, col = POSITIONS[position]
    half = SIZES[size] / 2
    centre = np.array([(col + 0.5) / 3, (row + 0.5) / 3])
    low = np.maximum(-MAX_OFFSET, half - centre)
    high = np.minimum(MAX_OFFSET, 1 - half - centre)
    return low, high


def _boxes_apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    return max(gap_x, gap_y) >= MIN_GAP


def _place(
    rng: np.random.Generator, attributes: list[tuple[str, str, str, str]], tries: int = 256
) -> tuple[ObjectSpec, ...]:
    """Draws offsets for objects (colour, shape, size, position) until no two boxes come within MIN_GAP."""
    bounds = [_offset_bounds(size, position) for _, _, size, position in attributes]
    for _ in range(tries):
        objects = tuple(
            ObjectSpec(c, s, z, p, tuple(float(v) for v in rng.uniform(low, high)))
            for (c, s, z, p), (low, high) in zip(attributes, bounds)
        )
        boxes = [o.bbox() for o in objects]
        if all(_boxes_apart(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i)):
            return objects
    # worst case measured: two large objects in edge-adjacent cells fit apart on 17% of tries, so 256 tries all
    # fail with probability below 1e-20
    raise RuntimeError(f"could not place {attributes} apart in {tries} tries")


def sample_scene(
    rng: np.random.Generator,
    num_objects: int | None = None,
    allow_held_out: bool = False,
    star_only: bool = False,
) -> Scene:
    """Draws a random scene.

    rng: the only source of randomness. num_objects: 1 or 2; None draws it (each with probability ½).
    allow_held_out: whether the held-out colour-shape pairs may appear (never in training data; the detector's own
    accuracy uses them). star_only: every object is a star (the LoRA demonstration's data); otherwise objects are
    circles, squares and triangles, never stars.
    """
    if num_objects is None:
        num_objects = int(rng.integers(1, 3))
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects={num_objects!r} must be 1, 2 or None (random)")
    shapes = (STAR,) if star_only else SHAPES
    pairs = [(c, s) for c in OBJECT_COLORS for s in shapes if allow_held_out or (c, s) not in HELD_OUT_PAIRS]
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    cells = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    attributes = []
    for cell in cells:
        color, shape = pairs[int(rng.integers(len(pairs)))]
        size = str(rng.choice(list(SIZES)))
        attributes.append((color, shape, size, list(POSITIONS)[int(cell)]))
    return Scene(background, _place(rng, attributes))


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def star_points(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """The ten vertices of an upright regular star as wide as x0..x1, centred in the box (x0, y0, x1, y1)."""
    outer = (x1 - x0) / (2 * math.sin(math.radians(72)))  # R: the star is 2R·sin72° wide
    inner = outer * STAR_INNER_RATIO
    height = outer * (1 + math.cos(math.radians(36)))  # from the top tip down to the two lower tips
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2 - height / 2 + outer  # centre of the circumscribed circle
    points = []
    for k in range(10):
        angle = math.radians(-90 + 36 * k)
        radius = outer if k % 2 == 0 else inner
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


Outline = tuple[
    tuple[float, float], ...
]  # a polygon's vertices (u, v) in units of its bounding box, in [0, 1]²


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str | Outline,
    box: tuple[float, ...],
    fill,
    supersample: int = _SUPERSAMPLE,
) -> None:
    """Draws a shape filling the bounding box (x0, y0, x1, y1), in the pixels of the supersampled canvas: a shape
    name, or an Outline (the polygon (x0 + u·(x1 − x0), y0 + v·(y1 − y0)); `latentdiff.data.irregular`)."""
    x0, y0, x1, y1 = (v * supersample for v in box)
    if not isinstance(shape, str):
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in shape], fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == STAR:
        draw.polygon(star_points(x0, y0, x1, y1), fill=fill)
    else:
        raise ValueError(f"shape={shape!r} is not one of {list(ALL_SHAPES)}")


def shape_coverage(
    shape: str,
    box: tuple[float, float, float, float],
    height: int,
    width: int,
    supersample: int = _SUPERSAMPLE,
) -> np.ndarray:
    """The fraction of each pixel a shape covers, drawn as render_scene draws it: (height, width) float32 in
    [0, 1]. box: the shape's bounding box (x0, y0, x1, y1) in pixels of this window (it may reach outside).
    supersample: drawn at this many times the resolution, then box-filtered (render_scene's is 4; more places
    the edges more exactly)."""
    mask = Image.new("L", (width * supersample, height * supersample), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, box, 255, supersample)
    return np.asarray(mask.reduce(supersample), dtype=np.float32) / 255.0


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Renders a scene as an anti-aliased RGB image of `size`×`size` pixels (size ≥ 32)."""
    shapes = [(obj.shape, obj.bbox(), OBJECT_COLORS[obj.color]) for obj in scene.objects]
    return render_shapes(BACKGROUND_COLORS[scene.background], shapes, size)


def render_shapes(
    background: tuple[int, int, int],
    shapes: list[tuple[str | Outline, tuple[float, float, float, float], tuple[int, int, int]]],
    size: int = 64,
) -> Image.Image:
    """An anti-aliased RGB image of `size`×`size` pixels (size ≥ 32): each (shape name or Outline, bounding box
    (x0, y0, x1, y1) in units of S, RGB fill) drawn in order over a flat background. `render_scene` and the layouts of
    `latentdiff.data.layouts` draw through it."""
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size={size!r} must be an int ≥ {MIN_SIZE}")
    image = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), background)
    draw = ImageDraw.Draw(image)
    for shape, box, fill in shapes:
        _draw_shape(draw, shape, tuple(v * size for v in box), fill)
    return image.reduce(_SUPERSAMPLE)  # box filter: each pixel is the mean of a 4×4 block


POLYGON_CAPTION = "random polygons"  # the caption of every polygon scene (they are VAE data only: no grammar)


def render_polygon_scene(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A scene for autoencoder training only: one to three irregular polygons (3 to 12 vertices at random angles
    and radii, so with sharp points and notches) of palette colours, anywhere and possibly overlapping, on a
    palette background, anti-aliased like render_scene. They teach a VAE detail that the captioned shapes do not
    have (a VAE trained on circles, squares and triangles alone rounds off shapes it never saw, the LoRA
    demonstration's star among them); they never enter a text-to-image training set."""
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size={size!r} must be an int ≥ {MIN_SIZE}")
    background = list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))]
    image = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), BACKGROUND_COLORS[background])
    draw = ImageDraw.Draw(image)
    colors = list(OBJECT_COLORS.values())
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(0.06, 0.2) * size  # outer radius R, in pixels: a box of about 0.12 S to 0.4 S
        cx, cy = rng.uniform(radius, size - radius, 2)
        count = int(rng.integers(3, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = radius * rng.uniform(0.3, 1.0, count)
        points = [
            ((cx + r * np.cos(a)) * _SUPERSAMPLE, (cy + r * np.sin(a)) * _SUPERSAMPLE)
            for a, r in zip(angles, radii)
        ]
        draw.polygon(points, fill=colors[rng.integers(len(colors))])
    return image.reduce(_SUPERSAMPLE)


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedObject:
    """An object as a caption states it; size and position are None where the caption leaves them out."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption states: its objects and the background (None where left out)."""

    objects: tuple[ParsedObject, ...]
    background: str | None = None


def describe_scene(scene: Scene) -> ParsedCaption:
    """The full description of a scene: every attribute stated."""
    objects = tuple(ParsedObject(o.color, o.shape, o.size, o.position) for o in scene.objects)
    return ParsedCaption(objects, scene.background)


def format_caption(caption: ParsedCaption) -> str:
    """Writes a caption in the shapes grammar; left-out attributes are left out of the text."""

    def phrase(obj: ParsedObject) -> str:
        words = ["a", obj.size, obj.color, obj.shape, obj.position and WHERE_PHRASES[obj.position]]
        return " ".join(w for w in words if w)

    text = " and ".join(phrase(o) for o in caption.objects)
    if caption.background is not None:
        text += ("," if len(caption.objects) > 1 else "") + f" on a {caption.background} background"
    return text


def caption_scene(scene: Scene, rng: np.random.Generator, drop_prob: float = 0.2) -> str:
    """A caption of the scene in which each object's size and position, and the background clause, are each left
    out with probability `drop_prob` (0 gives the full caption)."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob={drop_prob!r} must be in [0, 1]")

    def keep(value: str) -> str | None:
        return None if rng.random() < drop_prob else value

    full = describe_scene(scene)
    objects = tuple(ParsedObject(o.color, o.shape, keep(o.size), keep(o.position)) for o in full.objects)
    return format_caption(ParsedCaption(objects, keep(full.background)))


# position phrases as word tuples, longest first so "in the top left" wins over "at the top"
_WHERE_WORDS = sorted(
    ((tuple(phrase.split()), name) for name, phrase in WHERE_PHRASES.items()), key=lambda p: -len(p[0])
)
_VOCABULARY = frozenset(
    {"a", "an", "and", "on", "background"}
    | set(OBJECT_COLORS)
    | set(ALL_SHAPES)
    | set(SIZES)
    | set(BACKGROUND_COLORS)
    | {w for phrase in WHERE_PHRASES.values() for w in phrase.split()}
)


def parse_caption(text: str) -> ParsedCaption:
    """Reads a caption of the shapes grammar back into the attributes it states (case and commas are ignored).

    Raises ValueError naming any unknown words, or saying where the text leaves the grammar.
    """
    words = re.sub(r"[,.;]", " ", text.lower()).split()
    unknown = [w for w in words if w not in _VOCABULARY]
    if unknown:
        raise ValueError(
            f"unknown words {unknown} in prompt {text!r}; the shapes world knows the colours "
            f"{list(OBJECT_COLORS)}, shapes {list(ALL_SHAPES)}, sizes {list(SIZES)}, positions "
            f"{list(WHERE_PHRASES.values())} and backgrounds {list(BACKGROUND_COLORS)}"
        )
    i = 0

    def fail(expected: str):
        found = " ".join(words[i:]) or "the end"
        return ValueError(f"cannot parse prompt {text!r}: expected {expected} at {found!r}")

    objects: list[ParsedObject] = []
    while True:
        if i >= len(words) or words[i] not in ("a", "an"):
            raise fail("'a'")
        i += 1
        size = words[i] if i < len(words) and words[i] in SIZES else None
        i += size is not None
        if i >= len(words) or words[i] not in OBJECT_COLORS:
            raise fail(f"a colour {list(OBJECT_COLORS)}")
        color = words[i]
        i += 1
        if i >= len(words) or words[i] not in ALL_SHAPES:
            raise fail(f"a shape {list(ALL_SHAPES)}")
        shape = words[i]
        i += 1
        position = None
        for phrase, name in _WHERE_WORDS:
            if tuple(words[i : i + len(phrase)]) == phrase:
                position, i = name, i + len(phrase)
                break
        objects.append(ParsedObject(color, shape, size, position))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    background = None
    if i < len(words):
        if words[i : i + 2] != ["on", "a"] or i + 4 != len(words) or words[i + 3] != "background":
            raise fail("'on a {background} background' or the end")
        background = words[i + 2]
        if background not in BACKGROUND_COLORS:
            i += 2
            raise fail(f"a background {list(BACKGROUND_COLORS)}")
    if len(objects) > 2:
        raise ValueError(f"prompt {text!r} names {len(objects)} objects; the shapes world has one or two")
    positions = [o.position for o in objects if o.position is not None]
    if len(set(positions)) != len(positions):
        raise ValueError(f"prompt {text!r} puts two objects in the same cell {positions[0]!r}")
    return ParsedCaption(tuple(objects), background)


def scene_for_caption(caption: ParsedCaption, rng: np.random.Generator) -> Scene:
    """A scene that shows what the caption states, with the attributes it leaves out drawn at random."""
    free_cells = [p for p in POSITIONS if p not in {o.position for o in caption.objects}]
    rng.shuffle(free_cells)
    attributes = []
    for obj in caption.objects:
        size = obj.size or str(rng.choice(list(SIZES)))
        position = obj.position or free_cells.pop()
        attributes.append((obj.color, obj.shape, size, position))
    background = caption.background or str(rng.choice(list(BACKGROUND_COLORS)))
    return Scene(background, _place(rng, attributes))


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def iter_shapes_samples(
    num_images: int,
    size: int = 64,
    seed: int = 0,
    star_only: bool = False,
    drop_prob: float = 0.2,
    star_fraction: float = 1.0,
    polygon_fraction: float = 0.0,
) -> Iterator[tuple[Image.Image, str, Scene | None]]:
    """Yields (image, caption, scene) training samples: never a held-out pair, never a star unless star_only.

    With star_only, each sample is a star-only scene with probability star_fraction and a base scene otherwise (a
    LoRA that also sees base scenes forgets less of them). With polygon_fraction > 0, each sample is instead a
    polygon scene (render_polygon_scene; caption POLYGON_CAPTION, scene None) with that probability: autoencoder
    data only. Sample i draws from its own generator seeded by (seed, i), so it is the same whatever num_images is.
    """
    if num_images < 0:
        raise ValueError(f"num_images={num_images!r} must be ≥ 0")
    _check_fractions(star_fraction, polygon_fraction)
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        if polygon_fraction > 0 and np.random.default_rng([seed, index, 2]).random() < polygon_fraction:
            yield render_polygon_scene(rng, size), POLYGON_CAPTION, None
            continue
        star = star_only and (
            star_fraction >= 1.0 or np.random.default_rng([seed, index, 1]).random() < star_fraction
        )
        scene = sample_scene(rng, star_only=star)
        yield render_scene(scene, size), caption_scene(scene, rng, drop_prob), scene


def _check_fractions(star_fraction: float, polygon_fraction: float) -> None:
    if not 0.0 <= star_fraction <= 1.0:
        raise ValueError(
            f"star_fraction={star_fraction!r} must be in [0, 1] (--star-fraction), e.g. 0.5 for half star scenes"
        )
    if not 0.0 <= polygon_fraction <= 1.0:
        raise ValueError(
            f"polygon_fraction={polygon_fraction!r} must be in [0, 1] (--polygon-fraction), e.g. 0.5 for VAE data"
        )


METADATA_NAME = "metadata.jsonl"
_WORK_PREFIX = ".make-dataset-"  # the temporary folder a run writes into (a killed run can leave one behind)
_IMAGE_NAME = re.compile(r"images/\d{6,}\.png")  # the file names write_shapes_dataset gives images


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    size: int = 64,
    seed: int = 0,
    star_only: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    star_fraction: float = 1.0,
    polygon_fraction: float = 0.0,
) -> Path:
    """Writes a shapes dataset as an imagefolder: `images/NNNNNN.png` and `metadata.jsonl` with the columns
    `file_name` and `text`, readable by `datasets.load_dataset("imagefolder", data_dir=out_dir)`. star_only,
    star_fraction and polygon_fraction (autoencoder data): as `iter_shapes_samples`.

    Every argument is checked before anything is written, and the dataset is written into a temporary folder inside
    out_dir and swapped in at the end, so a failed or interrupted run leaves out_dir as it was. A non-empty out_dir
    is refused unless overwrite is set; overwrite replaces only a dataset this function wrote (`metadata.jsonl` and
    the `images/NNNNNN.png` it lists), refuses, naming them, when `images/` or `metadata.jsonl` hold anything else,
    and leaves other files in out_dir alone. Returns the folder.
    """
    out = Path(out_dir)
    _check_dataset_arguments(num_images, size, seed, star_fraction, polygon_fraction)
    _check_replaceable(out, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=out))
    try:
        _write_samples(work, num_images, size, seed, star_only, progress, star_fraction, polygon_fraction)
        if (out / "images").exists():
            (out / "images").rename(work / "replaced-images")  # removed with `work`
        (work / "images").rename(out / "images")
        (work / METADATA_NAME).replace(out / METADATA_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    logger.info(
        "wrote %d shapes images of %d px (seed %d, star_only=%s) to %s",
        num_images,
        size,
        seed,
        star_only,
        out,
    )
    return out


def _check_dataset_arguments(
    num_images: int, size: int, seed: int, star_fraction: float, polygon_fraction: float
) -> None:
    """The arguments of write_shapes_dataset, each named with its CLI flag."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1 (--num-images)")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size={size!r} must be an int >= {MIN_SIZE} (--size), e.g. 64")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0 (--seed)")
    _check_fractions(star_fraction, polygon_fraction)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse an out_dir that is a file, or non-empty without overwrite, or holding what this function did not
    write; remove the temporary folders of killed runs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} exists and is not a folder; choose a folder path")
    if not out.is_dir():
        return
    for stale in out.glob(_WORK_PREFIX + "*"):
        logger.info("removing %s, left by an interrupted make-dataset run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"out_dir={str(out)!r} is not empty; pass --overwrite (overwrite=True) to replace the dataset "
            "there, or choose an empty folder"
        )
    written = _dataset_files(out)
    images = out / "images"
    foreign = (
        [p for p in sorted(images.rglob("*")) if p.is_file() and p not in written] if images.is_dir() else []
    )
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:5])
        raise FileExistsError(
            f"--overwrite replaces only a dataset make-dataset wrote, but {str(images)!r} also holds {len(foreign)} "
            f"other file(s) ({names}{', ...' if len(foreign) > 5 else ''}); move them elsewhere or choose another "
            "folder. Nothing was changed."
        )
    others = [p.name for p in out.iterdir() if p.name not in ("images", METADATA_NAME)]
    if others:
        logger.warning(
            "%s holds other files besides the dataset (%s); they are left in place", out, others[:5]
        )


def _dataset_files(out: Path) -> set[Path]:
    """The images listed in out/metadata.jsonl under the names this function gives them; FileExistsError when the
    file is not one this function wrote."""
    metadata = out / METADATA_NAME
    if not metadata.exists():
        return set()
    files = set()
    for line_number, line in enumerate(metadata.read_text(errors="replace").splitlines(), start=1):
        try:
            file_name = json.loads(line)["file_name"]
        except (ValueError, KeyError, TypeError):
            file_name = None
        if not isinstance(file_name, str) or not _IMAGE_NAME.fullmatch(file_name):
            raise FileExistsError(
                f"--overwrite replaces only a dataset make-dataset wrote, but {str(metadata)!r} line {line_number} "
                "is not one it writes; move the file elsewhere or choose another folder. Nothing was changed."
            )
        files.add(out / file_name)
    return files


def _write_samples(
    work: Path,
    num_images: int,
    size: int,
    seed: int,
    star_only: bool,
    progress: bool,
    star_fraction: float,
    polygon_fraction: float,
) -> None:
    """`images/` and `metadata.jsonl` of the dataset, written into `work`."""
    (work / "images").mkdir()
    digits = max(6, len(str(num_images - 1)))
    rows = []
    samples = iter_shapes_samples(
        num_images, size, seed, star_only, star_fraction=star_fraction, polygon_fraction=polygon_fraction
    )
    for index, (image, caption, _) in enumerate(
        tqdm(samples, total=num_images, desc="shapes dataset", unit="img", disable=not progress)
    ):
        file_name = f"images/{index:0{digits}d}.png"
        image.save(work / file_name)
        rows.append(json.dumps({"file_name": file_name, "text": caption}))
    (work / METADATA_NAME).write_text("\n".join(rows) + "\n")
