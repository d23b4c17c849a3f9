"""The procedural detector of ShapesBench: reads the background and the objects of a shapes-world image.

Steps (shared/SHAPES.md, "ShapesBench"), for an RGB image p of side S:

| step       | rule                                                                                       |
|------------|--------------------------------------------------------------------------------------------|
| background | b = the background colour nearest (over the whole palette) to the most pixels               |
| colour     | each pixel is read as a mix p ≈ b + α·(c − b) of b and one palette colour c ≠ b: c is the   |
|            | colour whose mixing line passes nearest p, α = clip((p − b)·(c − b) / ‖c − b‖², 0, 1); the  |
|            | pixel belongs to c when α ≥ ½ (an anti-aliased edge pixel goes to the side it mostly is)    |
| regions    | 8-connected components of same-colour pixels with α ≥ TOUCH_ALPHA, kept where α ≥ ½ (the    |
|            | core): two same-colour objects joined by a faint bridge are one region, as a person sees    |
|            | them; a region whose core Σα is below MIN_AREA_FRACTION·S² is noise and dropped             |
| geometry   | soft area A = Σα over the region and its one-pixel fringe; centroid = the α-weighted mean   |
| fit        | each shape's template (SHAPE_GEOMETRY: fill f = area / box area, centroid offset) is drawn |
|            | with box side d = √(A / f) on the region's centroid (position and size fitted, so only the |
|            | shape is left to compare); its fit is the soft IoU Σ min(α, t) / Σ max(α, t)               |
| shape      | the shape of the best fit, if that fit is ≥ MIN_SHAPE_IOU and, for the base world's shapes   |
|            | (circle, square, triangle), the α = ½ edge keeps to the shape's outline: (a) its concave    |
|            | depth (convex hull area − A) / hull perimeter, the mean depth by which the edge falls inside |
|            | its hull, is ≤ MAX_CONCAVE_DEPTH·d (pinched squares, concave triangles fail); (b) no edge   |
|            | point is further than MAX_OUTLINE_DEVIATION[shape]·d from the fitted template's outline (a  |
|            | half-dome or a lumpy blob read as a circle, a flared cup read as a square fail); else       |
|            | IRREGULAR. A star is read by its five arms instead (`star_arms`): a fit ≥ MIN_STAR_IOU (its |
|            | thin arms lose IoU to any blur first) and a radius r(θ) around the centroid that rises to  |
|            | five tips of like length, each clear of every valley between them                          |
| size       | `large` when the fitted box side d ≥ 0.25·S, else `small` (boxes are 0.30·S and 0.20·S)    |
| position   | the 3×3 cell holding the α-weighted centroid                                               |

Regions whose colour is a background colour (e.g. a black blob on white) are reported as objects too, with that
colour, so that they count as extra objects against a prompt. A region's fits are kept (DetectedObject.fits): the fit
of the shape a prompt asks for is ShapesBench's shape fidelity. Pure numpy, plus PIL to draw the templates: about
3 ms of CPU per 64×64 image (templates at 16× supersampling, so that a rendered shape fits its own template to
about 0.99 rather than 0.96).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from latentdiff.data.shapes import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    POSITIONS,
    STAR,
    shape_coverage,
    star_points,
)

MIN_AREA_FRACTION = 0.003  # regions smaller than this fraction of the canvas are noise
LARGE_THRESHOLD = 0.25  # bounding-box side (fraction of S) between small (0.20) and large (0.30)
TOUCH_ALPHA = 0.25  # same-colour pixels this strong join regions: objects that touch are one region
MIN_SHAPE_IOU = 0.85  # a region no template fits this well is IRREGULAR (rendered ≥ 0.89 at 32 px)
IRREGULAR = "irregular"  # the shape read for a region that fits no template
# The outline checks of the base world's shapes, both over the fitted side d (measured on 400 rendered scenes at
# 32 to 128 px, 400 through the shipped VAE at 64 px, and the 288 images of the shipped default's bench at two seeds)
# concave depth: sides bowed in by 2 % of d reach it (pinched squares, concave triangles); rendered ≤ 0.004, VAE ≤ 0.006
MAX_CONCAVE_DEPTH = 0.0125
# outline deviation: rendered ≤ 0.025 (circle), 0.045 (square), 0.049 (triangle) at 32 px and ≤ 0.025 from 64 px; VAE
# ≤ 0.044. A circle is seen by its even curve (a flat or a bump 5 % of d out reads as a half-dome or a lumpy blob), a
# square by straight, upright sides (a cup flared by 10 % of d reaches 0.066), a triangle by its three corners: the
# eye forgives a rounded or leaning apex, which moves the outline most (generated triangles read as such reach 0.066)
MAX_OUTLINE_DEVIATION: dict[str, float] = {"circle": 0.045, "square": 0.06, "triangle": 0.08}
# The star, by its arms (star_arms). Its arms are thin, so blur costs its template fit most: rendered stars fit
# ≥ 0.93 at 64 px, their reconstructions by the shipped VAE 0.75-0.90 (small stars, 12.8 px across, lowest), and those
# are plainly five-pointed stars to the eye. So a star needs a fit of MIN_STAR_IOU and its five arms: the radius r(θ)
# of its α = ½ edge around the centroid has a 5-fold harmonic of ≥ MIN_STAR_HARMONIC of the mean radius (rendered
# ≥ 0.154 at 64 px, shipped VAE ≥ 0.059; a regular pentagon 0.042, a circle with five bumps 0.040); every tip stands
# beyond every valley by ≥ MIN_STAR_ARM_DEPTH of the longest arm (rendered ≥ 0.38 at 64 px and ≥ 0.07 for a 6.4 px
# star at 32 px; VAE ≥ 0.08, 0.12 at the 5th percentile; a star with an arm gone ≤ 0.03, a 4-point star < 0); and the
# shortest tip is ≥ MIN_STAR_TIP_RATIO of the longest (rendered ≥ 0.88, VAE ≥ 0.71; a 4-point star 0.53-0.70, an arm
# gone 0.47-0.65). A fat star (valleys at 0.6 of the tips instead of 0.382) is still read as a star; a star with one
# arm cut short is read as one only while blur could have done it (an arm at 0.62 of the others often passes, at 0.5
# it fails). Measured on 200 rendered single-star scenes at 32, 64 and 128 px, their reconstructions by the shipped
# VAE and the star-refined decoder, and the counter-examples of tests/test_shapesbench.py drawn at both sizes.
MIN_STAR_IOU = 0.72
MIN_STAR_HARMONIC = 0.055
MIN_STAR_ARM_DEPTH = 0.06
MIN_STAR_TIP_RATIO = 0.70
STAR_RAYS = 180  # r(θ) is read along this many rays, every 2°
TEMPLATE_SUPERSAMPLE = 16  # templates are drawn at 16× (edges within 1/32 px), scenes at 4×

_PALETTE_NAMES = (*OBJECT_COLORS, *BACKGROUND_COLORS)
_PALETTE = np.array([*OBJECT_COLORS.values(), *BACKGROUND_COLORS.values()], dtype=np.float32)  # (K, 3)
_BACKGROUND_INDEX = {name: _PALETTE_NAMES.index(name) for name in BACKGROUND_COLORS}
_CELL_NAMES = {cell: name for name, cell in POSITIONS.items()}
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class DetectedObject:
    """One region the detector read. color is an object colour, or a background colour for a stray blob.

    bbox: (x0, y0, x1, y1) in pixels of the pixels with α ≥ ½ (x1, y1 exclusive); centroid (x, y) in pixels;
    area: soft area Σα in pixels; box_side: the side d in pixels of the best-fitting template's box; fits: shape ->
    soft IoU in [0, 1] of the region with that shape's template fitted in position and size (the shape fidelity).
    """

    color: str
    shape: str
    size: str
    position: str
    area: float
    box_side: float
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    fits: dict[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Detection:
    """The detector's reading of one image: the background colour name and the objects, largest first."""

    background: str
    objects: tuple[DetectedObject, ...]


def _as_rgb_array(image) -> np.ndarray:
    """A PIL image or a (H, W, 3) uint8 array in 0..255 -> (H, W, 3) float32 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise TypeError(
            f"image must be a PIL image or a (H, W, 3) uint8 array, got {type(image).__name__} "
            f"with shape {getattr(array, 'shape', None)} and dtype {getattr(array, 'dtype', None)}"
        )
    return array.astype(np.float32)


def _background(pixels: np.ndarray) -> str:
    """The background colour nearest to the most pixels. pixels: (N, 3)."""
    # ‖p − c‖² = ‖p‖² − 2 p·c + ‖c‖²; ‖p‖² is the same for every c
    nearest = ((_PALETTE**2).sum(-1) - 2 * pixels @ _PALETTE.T).argmin(1)
    counts = np.bincount(nearest, minlength=len(_PALETTE))
    return max(BACKGROUND_COLORS, key=lambda name: counts[_BACKGROUND_INDEX[name]])


def _unmix(pixels: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads each pixel as b + α·(c − b). pixels: (N, 3). Returns (colour index (N,), α (N, K)) where colour
    index is the palette colour whose mixing line is nearest and α holds every colour's mixing weight."""
    b = _PALETTE[_BACKGROUND_INDEX[background]]
    directions = _PALETTE - b  # (K, 3), c − b
    norms = (directions**2).sum(-1)
    norms[_BACKGROUND_INDEX[background]] = np.inf  # b is not a candidate against itself
    offsets = pixels - b  # (N, 3), p − b
    dots = offsets @ directions.T  # (N, K), (p − b)·(c − b)
    alpha = np.clip(dots / norms, 0.0, 1.0)  # (N, K)
    # ‖(p − b) − α(c − b)‖² = ‖p − b‖² − 2α (p − b)·(c − b) + α² ‖c − b‖²; ‖p − b‖² is the same for every c
    residual = alpha * (alpha * np.where(np.isinf(norms), 0.0, norms) - 2 * dots)
    residual[:, _BACKGROUND_INDEX[background]] = np.inf
    return residual.argmin(1), alpha


def connected_components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal class. classes: (H, W) int, −1 for background.

    Returns (H, W) int64 component ids (−1 for background); a component's id is the largest flat index among its
    pixels. Label propagation (each pixel takes the largest id among same-class neighbours) with pointer jumping.
    """
    height, width = classes.shape
    foreground = classes >= 0
    ids = np.where(foreground, np.arange(height * width).reshape(height, width), -1)
    padded_classes = np.pad(classes, 1, constant_values=-1)
    same = [  # same[k]: the neighbour at offset k is in the same class
        foreground & (padded_classes[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == classes)
        for dy, dx in _NEIGHBOURS
    ]
    while True:
        padded = np.pad(ids, 1, constant_values=-1)
        new = ids.copy()
        for (dy, dx), mask in zip(_NEIGHBOURS, same):
            np.maximum(
                new, np.where(mask, padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width], -1), out=new
            )
        flat = new.ravel()
        for _ in range(4):  # pointer jumping: an id points at a pixel of the same component with a larger id
            flat[foreground.ravel()] = np.maximum(flat, flat[np.maximum(flat, 0)])[foreground.ravel()]
        if np.array_equal(new, ids):
            return ids
        ids = new


def _polygon_fill_and_centroid(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(area, centroid y) of a polygon by the shoelace formula."""
    xs, ys = np.array(points).T
    cross = xs * np.roll(ys, -1) - np.roll(xs, -1) * ys
    area = cross.sum() / 2
    return float(abs(area)), float(((ys + np.roll(ys, -1)) * cross).sum() / (6 * area))


_STAR_FILL, _STAR_CENTROID_Y = _polygon_fill_and_centroid(star_points(-0.5, -0.5, 0.5, 0.5))
# shape -> (fill: area over its d×d box's area, centroid's y below the box centre in units of d)
SHAPE_GEOMETRY: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.0),
    "circle": (math.pi / 4, 0.0),
    "triangle": (0.5, 1 / 6),  # a triangle's centroid lies a third of the way up from its base
    STAR: (_STAR_FILL, _STAR_CENTROID_Y),  # ≈ (0.311, 0.052) for a regular star 0.951 as tall as wide
}


def _centroid(soft: np.ndarray) -> tuple[float, float]:
    """The α-weighted centroid (x, y) of a region's soft coverage (h, w), in window pixels (pixel centres at +½)."""
    grid_y, grid_x = np.mgrid[0 : soft.shape[0], 0 : soft.shape[1]]
    area = float(soft.sum())
    return float((soft * (grid_x + 0.5)).sum() / area), float((soft * (grid_y + 0.5)).sum() / area)


def template_box(shape: str, cx: float, cy: float, d: float) -> tuple[float, float, float, float]:
    """The d×d box (x0, y0, x1, y1) that puts the shape's centroid on (cx, cy) (SHAPE_GEOMETRY's offset)."""
    top = cy - SHAPE_GEOMETRY[shape][1] * d - d / 2
    return (cx - d / 2, top, cx + d / 2, top + d)


def _fit_templates(soft: np.ndarray) -> tuple[dict[str, float], dict[str, float], tuple[float, float]]:
    """Fits each shape's template to a region's soft coverage by moments and measures the fit.

    soft: (h, w) coverage α of one region. Each template's box side is d = √(A / fill) from the soft area A, and its
    centroid sits on the region's α-weighted centroid. Returns (shape -> soft IoU Σ min(α, t) / Σ max(α, t),
    shape -> d in pixels, centroid (x, y) in window pixels).
    """
    area = float(soft.sum())
    cx, cy = _centroid(soft)
    fits, sides = {}, {}
    for shape in SHAPE_GEOMETRY:
        d = math.sqrt(area / SHAPE_GEOMETRY[shape][0])
        box = template_box(shape, cx, cy, d)
        # pad the window so the template fits whole: the part it draws outside the region counts against it
        pad = math.ceil(max(0.0, -box[0], -box[1], box[2] - soft.shape[1], box[3] - soft.shape[0])) + 1
        template = shape_coverage(
            shape,
            tuple(v + pad for v in box),
            soft.shape[0] + 2 * pad,
            soft.shape[1] + 2 * pad,
            TEMPLATE_SUPERSAMPLE,
        )
        padded = np.pad(soft, pad)
        fits[shape] = float(np.minimum(padded, template).sum() / np.maximum(padded, template).sum())
        sides[shape] = d
    return fits, sides, (cx, cy)


def _edge_points(soft: np.ndarray) -> np.ndarray:
    """Where α crosses ½ at the two ends of every row and every column of a region, by linear interpolation
    between pixel centres (on an anti-aliased straight edge, α is linear across the edge and this is exact).
    soft: (h, w) coverage. Returns (N, 2) points (x, y) in window pixels."""
    points = []
    for lines, transpose in ((soft, False), (soft.T, True)):
        padded = np.pad(lines, ((0, 0), (1, 1)))  # α = 0 beyond the window
        for index in np.nonzero((lines >= 0.5).any(1))[0]:
            inside = np.nonzero(padded[index] >= 0.5)[0]
            for i, outside in ((inside[0], inside[0] - 1), (inside[-1], inside[-1] + 1)):
                a, b = padded[index, outside], padded[index, i]  # α outside (< ½) and inside (≥ ½)
                along = outside + (0.5 - a) / (b - a) * (i - outside) - 0.5  # pixel centre of padded j: j − ½
                points.append((index + 0.5, along) if transpose else (along, index + 0.5))
    return np.array(points, dtype=np.float64)


def _hull(points: np.ndarray) -> np.ndarray:
    """The convex hull of (N, 2) points (x, y), its vertices in order (Andrew's monotone chain): (M, 2)."""
    ordered = sorted(set(map(tuple, points)))

    def half(chain):
        hull: list[tuple[float, float]] = []
        for p in chain:
            while (
                len(hull) >= 2
                and (
                    (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                    - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                )
                <= 0
            ):
                hull.pop()
            hull.append(p)
        return hull[:-1]

    return np.array(half(ordered) + half(ordered[::-1]), dtype=np.float64).reshape(-1, 2)


def concave_depth(soft: np.ndarray) -> float:
    """(hull area − soft area) / hull perimeter, in pixels: the mean depth by which a region's α = ½ edge falls
    inside its convex hull. About 0 for a convex shape; a side of length L bowed in by δ at its middle (a parabola)
    adds (2/3)·δ·L to the deficit, so sides bowed by δ all round give (2/3)·δ whatever the shape. soft: (h, w)
    coverage α of one region."""
    hull = _hull(_edge_points(soft))
    if len(hull) < 3:
        return 0.0
    perimeter = float(np.hypot(*(np.roll(hull, -1, 0) - hull).T).sum())
    return (_polygon_fill_and_centroid(hull)[0] - float(soft.sum())) / perimeter


def _distance_to_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance of each of (N, 2) points to the closed polygon (M, 2)'s sides: (N,)."""
    start, side = polygon, np.roll(polygon, -1, 0) - polygon  # (M, 2)
    offset = points[:, None, :] - start[None]  # (N, M, 2)
    t = np.clip(
        (offset * side).sum(-1) / (side**2).sum(-1), 0.0, 1.0
    )  # the nearest point's place along a side
    return np.hypot(*np.moveaxis(offset - t[..., None] * side, -1, 0)).min(1)


def outline_deviation(soft: np.ndarray, shape: str) -> float:
    """The largest distance of the region's α = ½ edge from the outline of the shape's template fitted in position
    and size (as for its fit), over the template's side d. Rendered shapes: ≤ 0.015 at 64 px (≤ 0.025 at 32 px).
    soft: (h, w) coverage α of one region; shape: circle, square or triangle."""
    cx, cy = _centroid(soft)
    d = math.sqrt(float(soft.sum()) / SHAPE_GEOMETRY[shape][0])
    x0, y0, x1, y1 = template_box(shape, cx, cy, d)
    edge = _edge_points(soft)
    if shape == "circle":
        distance = np.abs(np.hypot(edge[:, 0] - cx, edge[:, 1] - cy) - d / 2)
    elif shape == "square":
        distance = _distance_to_polygon(edge, np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]))
    elif shape == "triangle":
        distance = _distance_to_polygon(edge, np.array([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]))
    else:
        raise ValueError(f"shape={shape!r} has no outline check; one of {list(MAX_OUTLINE_DEVIATION)}")
    return float(distance.max() / d)


def radial_profile(
    soft: np.ndarray, rays: int = STAR_RAYS, step: float = 0.125
) -> tuple[np.ndarray, np.ndarray]:
    """r(θ): along each of `rays` rays from the region's α-weighted centroid, the distance (pixels) at which α
    (bilinear between pixel centres) last crosses ½. θ = 0 points right, θ = 90° down. soft: (h, w) coverage.
    Returns (θ (rays,), r (rays,))."""
    cx, cy = _centroid(soft)
    theta = np.arange(rays) * (2 * math.pi / rays)
    t = np.arange(0.0, math.hypot(*soft.shape) + 1, step)
    padded = np.pad(soft, 1)  # α = 0 one pixel beyond the window; pixel centre of padded j is at j − ½
    x = cx + 0.5 + np.cos(theta)[:, None] * t
    y = cy + 0.5 + np.sin(theta)[:, None] * t
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0

    def at(yy, xx):
        inside = (yy >= 0) & (yy < padded.shape[0]) & (xx >= 0) & (xx < padded.shape[1])
        return np.where(inside, padded[yy.clip(0, padded.shape[0] - 1), xx.clip(0, padded.shape[1] - 1)], 0.0)

    alpha = (at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy) + (
        at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    ) * fy
    inside = alpha >= 0.5
    last = inside.shape[1] - 1 - inside[:, ::-1].argmax(1)  # the last sample inside on each ray
    rows = np.arange(rays)
    a, b = alpha[rows, last], alpha[rows, np.minimum(last + 1, len(t) - 1)]
    r = t[last] + np.where(a > b, (a - 0.5) / np.maximum(a - b, 1e-9), 0.0) * step
    return theta, np.where(inside.any(1), r, 0.0)


def star_arms(soft: np.ndarray) -> dict[str, float]:
    """The five arms of a star in a region's r(θ) (radial_profile). The five tips are the largest r within ±18° of
    the 5-fold harmonic's crests, the five valleys the smallest r within ±18° of its troughs. Returns harmonic:
    |mean r·e^(−5iθ)| / mean r (for r = m + A·cos 5θ it is A / 2m, a quarter of the tip-to-valley swing over the
    mean radius); depth: (shortest tip − highest valley) / longest tip, > 0 when every arm stands clear of every
    valley; tip_ratio: shortest tip / longest tip. soft: (h, w) coverage α of one region."""
    theta, r = radial_profile(soft)
    mean = float(r.mean())
    if mean <= 0:
        return {"harmonic": 0.0, "depth": -1.0, "tip_ratio": 0.0}
    # for r = m + A·cos(5θ − φ), mean r·e^(−5iθ) = (A/2)·e^(−iφ): the crests lie at θ = φ/5 + k·72°
    fifth = (r * np.exp(-5j * theta)).mean()
    crest = -np.angle(fifth) / 5
    tips, valleys = [], []

    def near(centre: float) -> np.ndarray:
        """The rays within ±18° (a quarter of the 72° between tips) of centre."""
        return np.abs((theta - centre + math.pi) % (2 * math.pi) - math.pi) <= math.radians(18)

    for k in range(5):
        tips.append(float(r[near(crest + k * 2 * math.pi / 5)].max()))
        valleys.append(float(r[near(crest + (k + 0.5) * 2 * math.pi / 5)].min()))
    return {
        "harmonic": float(abs(fifth)) / mean,
        "depth": (min(tips) - max(valleys)) / max(tips),
        "tip_ratio": min(tips) / max(tips),
    }


def _is_star(fit: float, soft: np.ndarray) -> bool:
    """A star: its template fits ≥ MIN_STAR_IOU and its outline has five arms of like length (star_arms)."""
    if fit < MIN_STAR_IOU:
        return False
    arms = star_arms(soft)
    return (
        arms["harmonic"] >= MIN_STAR_HARMONIC
        and arms["depth"] >= MIN_STAR_ARM_DEPTH
        and arms["tip_ratio"] >= MIN_STAR_TIP_RATIO
    )


def _read_shape(fits: dict[str, float], sides: dict[str, float], soft: np.ndarray) -> str:
    """The shape whose template fits best (fill ratio, corners and symmetry at once), or IRREGULAR when even the
    best fit is below MIN_SHAPE_IOU, or when the region's outline strays from a base-world shape's (concave sides
    deeper than MAX_CONCAVE_DEPTH·d, or an edge further than MAX_OUTLINE_DEVIATION[shape]·d from its outline). A
    best fit of the star is judged by its arms instead (_is_star)."""
    best = max(fits, key=fits.get)
    if best == STAR:
        return STAR if _is_star(fits[best], soft) else IRREGULAR
    if fits[best] < MIN_SHAPE_IOU:
        return IRREGULAR
    if best in MAX_OUTLINE_DEVIATION and (
        concave_depth(soft) > MAX_CONCAVE_DEPTH * sides[best]
        or outline_deviation(soft, best) > MAX_OUTLINE_DEVIATION[best]
    ):
        return IRREGULAR
    return best


def detect(image) -> Detection:
    """Reads a shapes-world image: a PIL image or a (H, W, 3) uint8 array. Returns a Detection."""
    rgb = _as_rgb_array(image)
    height, width, _ = rgb.shape
    pixels = rgb.reshape(-1, 3)
    background = _background(pixels)
    colour, alpha = _unmix(pixels, background)
    alpha = alpha.reshape(height, width, -1)
    colour = colour.reshape(height, width)
    own_alpha = np.take_along_axis(alpha, colour[..., None], axis=2)[..., 0]  # α of each pixel's own colour
    # regions: components of pixels with α ≥ TOUCH_ALPHA (same-colour objects that touch join), cut to the core
    joined = connected_components(np.where(own_alpha >= TOUCH_ALPHA, colour, -1))
    components = np.where(own_alpha >= 0.5, joined, -1)
    side = math.sqrt(height * width)
    # noise first: regions whose own Σα is below MIN_AREA_FRACTION·S² are dropped before any geometry
    ids, inverse = np.unique(components, return_inverse=True)
    core_area = np.bincount(inverse.ravel(), weights=own_alpha.ravel())
    kept = [c for c, a in zip(ids, core_area) if c >= 0 and a >= MIN_AREA_FRACTION * side * side]
    objects = []
    for component in kept:
        core = components == component
        ys, xs = np.nonzero(core)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        k = int(colour[ys[0], xs[0]])
        # the region, its faint bridges and its one-pixel fringe of the same colour, in a window one pixel wider
        # than the region's box (and its bridges')
        bys, bxs = np.nonzero(joined == component)
        y0w, y1w = min(y0, int(bys.min())), max(y1, int(bys.max()) + 1)
        x0w, x1w = min(x0, int(bxs.min())), max(x1, int(bxs.max()) + 1)
        wy0, wy1, wx0, wx1 = max(y0w - 1, 0), min(y1w + 1, height), max(x0w - 1, 0), min(x1w + 1, width)
        padded_core = np.pad(core[wy0:wy1, wx0:wx1], 1)
        grown = joined[wy0:wy1, wx0:wx1] == component
        for dy, dx in [(0, 0), *_NEIGHBOURS]:  # 3×3 dilation
            grown |= padded_core[
                1 + dy : padded_core.shape[0] - 1 + dy, 1 + dx : padded_core.shape[1] - 1 + dx
            ]
        fringe = grown & (colour[wy0:wy1, wx0:wx1] == k)
        soft = np.where(fringe, alpha[wy0:wy1, wx0:wx1, k], 0.0).astype(np.float32)
        fits, sides, (cx, cy) = _fit_templates(soft)
        cx, cy = cx + wx0, cy + wy0
        shape = _read_shape(fits, sides, soft)
        d = sides[max(fits, key=fits.get)]
        cell = (min(int(3 * cy / height), 2), min(int(3 * cx / width), 2))
        objects.append(
            DetectedObject(
                color=_PALETTE_NAMES[k],
                shape=shape,
                size="large" if d >= LARGE_THRESHOLD * side else "small",
                position=_CELL_NAMES[cell],
                area=float(soft.sum()),
                box_side=d,
                bbox=(x0, y0, x1, y1),
                centroid=(cx, cy),
                fits=fits,
            )
        )
    objects.sort(key=lambda o: -o.area)
    return Detection(background, tuple(objects))
