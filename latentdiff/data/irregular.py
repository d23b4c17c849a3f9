"""Irregular objects: distorted outlines of the shapes world's shapes, the negatives of classifier guidance.

The default model, sampled from the empty prompt, draws shapes the strict detector refuses (README, "Classifier
guidance"): domes, rounded or pinched squares, triangles with curved sides, lumpy blobs. A classifier trained on crisp
shapes alone reads them as the nearest crisp shape, so its gradient cannot push away from them. These outlines, drawn
in a shapes scene in place of an object and labelled `{colour} irregular` (`latentdiff.data.scene_labels`), give it
that class. Every outline is a polygon in units of its bounding box (an `Outline`: vertices (u, v) ∈ [0, 1]², drawn
by `render_shapes` in the object's box), so its size and place follow the scene's grammar.

| kind             | outline (θ around the box centre, δ a random depth)                                     |
|------------------|------------------------------------------------------------------------------------------|
| dome             | a half-ellipse of height h on a rectangle of height 1 − h, h ∈ [0.3, 1]                  |
| rounded square   | a square with corner radius r ∈ [0.22, 0.32] (between the detector's square and circle) |
| pinched square   | a square whose sides bow in (δ ∈ [0.05, 0.15]) or out (δ ∈ [−0.15, −0.05])             |
| curved triangle  | the upright triangle with one to three sides bowed in, δ ∈ [0.08, 0.2]                  |
| blob             | ρ(θ) = ½ (1 + Σ_{k=2..5} a_k cos(kθ + φ_k)), a_k ∈ [−0.1, 0.1]                           |

`irregular_scene` keeps a drawn outline only when the strict detector (`latentdiff.eval.detector`) refuses it: the
class is, by construction, what the detector reads as `irregular`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentdiff.data.shapes import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    Outline,
    Scene,
    render_shapes,
    sample_scene,
)

ARC_POINTS = 48  # vertices per curved stretch of an outline


def _normalised(points: np.ndarray) -> Outline:
    """The (N, 2) points scaled and shifted to span [0, 1] in u and in v, as an Outline."""
    low, high = points.min(0), points.max(0)
    unit = (points - low) / (high - low)
    return tuple((float(u), float(v)) for u, v in unit)


def _bowed(a: np.ndarray, b: np.ndarray, centre: np.ndarray, depth: float) -> np.ndarray:
    """(ARC_POINTS, 2) points from a towards b along a parabola whose middle sits `depth` towards `centre` from the
    chord's midpoint (depth < 0 bows outwards); b itself is left to the next side."""
    s = np.linspace(0.0, 1.0, ARC_POINTS, endpoint=False)[:, None]
    inward = centre - (a + b) / 2
    inward = inward / np.linalg.norm(inward)
    return a + s * (b - a) + 4 * s * (1 - s) * depth * inward


def _depth(rng: np.random.Generator) -> float:
    """A bow depth δ ∈ ±[0.05, 0.15], in units of the box, either sign."""
    return float(rng.uniform(0.05, 0.15) * rng.choice([-1.0, 1.0]))


def dome(rng: np.random.Generator) -> Outline:
    """A half-ellipse of height h ∈ [0.3, 1] on a rectangle of height 1 − h (h = 1: a half-disc)."""
    h = rng.uniform(0.3, 1.0)
    theta = np.linspace(math.pi, 2 * math.pi, ARC_POINTS)
    arc = np.stack([0.5 + 0.5 * np.cos(theta), h + h * np.sin(theta)], 1)
    return _normalised(np.concatenate([arc, [[1.0, 1.0], [0.0, 1.0]]]))


def rounded_square(rng: np.random.Generator) -> Outline:
    """A unit square with corner radius r ∈ [0.22, 0.32] (0.5 would be the circle; the strict detector reads r ≤ 0.2
    as a square and most r ≥ 0.3 as a circle)."""
    r = rng.uniform(0.22, 0.32)
    corners = [(1 - r, 1 - r, 0.0), (r, 1 - r, 0.5 * math.pi), (r, r, math.pi), (1 - r, r, 1.5 * math.pi)]
    quarter = np.linspace(0.0, 0.5 * math.pi, ARC_POINTS // 4)
    arcs = [
        np.stack([cx + r * np.cos(start + quarter), cy + r * np.sin(start + quarter)], 1)
        for cx, cy, start in corners
    ]
    return _normalised(np.concatenate(arcs))


def _bowed_polygon(corners: np.ndarray, depths: list[float]) -> Outline:
    """The polygon through `corners` (N, 2) with side i bowed by depths[i]."""
    centre = corners.mean(0)
    sides = [_bowed(corners[i], corners[(i + 1) % len(corners)], centre, d) for i, d in enumerate(depths)]
    return _normalised(np.concatenate(sides))


def pinched_square(rng: np.random.Generator) -> Outline:
    """A square whose four sides all bow in, or all bow out, by about the same δ."""
    depth = _depth(rng)
    depths = [depth * rng.uniform(0.8, 1.2) for _ in range(4)]
    return _bowed_polygon(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), depths)


def curved_triangle(rng: np.random.Generator) -> Outline:
    """The upright triangle (apex top centre) with one to three of its sides bowed in by δ ∈ [0.08, 0.2] (the strict
    detector still reads sides bowed out by 0.2 as a triangle)."""
    curved = rng.permutation(3)[: int(rng.integers(1, 4))]
    depths = [rng.uniform(0.08, 0.2) if i in curved else 0.0 for i in range(3)]
    return _bowed_polygon(np.array([[0.5, 0.0], [1.0, 1.0], [0.0, 1.0]]), depths)


def blob(rng: np.random.Generator) -> Outline:
    """ρ(θ) = ½ (1 + Σ_{k=2..5} a_k cos(kθ + φ_k)), a lumpy circle."""
    theta = np.linspace(0.0, 2 * math.pi, 2 * ARC_POINTS, endpoint=False)
    rho = np.ones_like(theta)
    for k in range(2, 6):
        rho += rng.uniform(-0.1, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return _normalised(np.stack([0.5 * rho * np.cos(theta), 0.5 * rho * np.sin(theta)], 1))


KINDS: dict[str, Callable[[np.random.Generator], Outline]] = {
    "dome": dome,
    "rounded square": rounded_square,
    "pinched square": pinched_square,
    "curved triangle": curved_triangle,
    "blob": blob,
}


def random_outline(rng: np.random.Generator) -> Outline:
    """An outline of a kind drawn uniformly from KINDS."""
    return KINDS[list(KINDS)[int(rng.integers(len(KINDS)))]](rng)


@dataclass(frozen=True)
class IrregularScene:
    """A shapes scene (its crisp objects' colours, shapes and cells) in which the objects at `irregular` (indices
    into scene.objects) are drawn with `outlines` instead of their shape."""

    scene: Scene
    irregular: tuple[int, ...]
    outlines: tuple[Outline, ...]

    def render(self, size: int = 64) -> Image.Image:
        """The scene as render_scene draws it, with the irregular objects' outlines in their boxes."""
        drawn = dict(zip(self.irregular, self.outlines))
        shapes = [
            (drawn.get(i, obj.shape), obj.bbox(), OBJECT_COLORS[obj.color])
            for i, obj in enumerate(self.scene.objects)
        ]
        return render_shapes(BACKGROUND_COLORS[self.scene.background], shapes, size)


def _refused(image: Image.Image, scene: IrregularScene) -> bool:
    """Whether the strict detector reads each irregular object (its colour, in its cell) as irregular only."""
    from latentdiff.eval.detector import IRREGULAR, detect

    found = detect(image).objects
    for i in scene.irregular:
        obj = scene.scene.objects[i]
        shapes = {o.shape for o in found if o.color == obj.color and o.position == obj.position}
        if shapes != {IRREGULAR}:
            return False
    return True


def irregular_scene(
    rng: np.random.Generator, size: int = 64, tries: int = 64
) -> tuple[IrregularScene, Image.Image]:
    """A random shapes scene whose first object (and the second, if any, with probability ½) is drawn irregular,
    redrawing outlines until the strict detector refuses every irregular one; (scene, its image at `size`)."""
    scene = sample_scene(rng)
    irregular = tuple(i for i in range(len(scene.objects)) if i == 0 or rng.random() < 0.5)
    for _ in range(tries):
        drawn = IrregularScene(scene, irregular, tuple(random_outline(rng) for _ in irregular))
        image = drawn.render(size)
        if _refused(image, drawn):
            return drawn, image
    raise RuntimeError(
        f"no outline of {list(KINDS)} was refused by the detector in {tries} tries at size {size}"
    )
