"""Scoring images generated from layouts (`latentdiff.data.layouts`) with the ShapesBench detector.

The layout's positions are read by the same detector from the layout's own rendered scene (so a triangle's
centroid is compared with a triangle's centroid). Each layout object is matched to a detected object (the
assignment with the smallest total centroid distance); it is

- placed right when the matched centroid lies within POSITION_TOLERANCE · S of the layout's;
- fully right when, in addition, its colour, shape and size are the layout's (each also counted alone).

A layout is a full match when every object is fully right, the background is right and no extra object is found.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from latentdiff.data.layouts import Layout, render_layout
from latentdiff.eval.detector import DetectedObject, detect

POSITION_TOLERANCE = (
    1.0 / 16.0
)  # of the canvas side S: 4 px at 64 px, a quarter of the gap between cell centres


def _distance(a: DetectedObject, b: DetectedObject) -> float:
    return math.dist(a.centroid, b.centroid)


def score_layout(image, layout: Layout) -> dict[str, float | int | bool]:
    """{objects, placed, right, full_match, detector_ok} for one generated image (a PIL image or uint8 array)."""
    pixels = np.asarray(image)
    found = detect(pixels)
    side = pixels.shape[0]
    reference = detect(render_layout(layout, side))
    stated = reference.objects
    detector_ok = sorted((o.color, o.shape, o.size) for o in stated) == sorted(
        (o.color, o.shape, o.size) for o in layout.objects
    )
    best: tuple[DetectedObject | None, ...] = (None,) * len(stated)
    if found.objects:
        candidates = list(found.objects) + [None] * len(stated)
        best = min(
            itertools.permutations(candidates, len(stated)),
            key=lambda pick: sum(side if f is None else _distance(s, f) for s, f in zip(stated, pick)),
        )
    placed = [f is not None and _distance(s, f) <= POSITION_TOLERANCE * side for s, f in zip(stated, best)]
    right = [
        p and (f.color, f.shape, f.size) == (s.color, s.shape, s.size)
        for p, s, f in zip(placed, stated, best)
    ]
    full = all(right) and found.background == layout.background and len(found.objects) == len(stated)
    attribute = {
        name: sum(f is not None and getattr(f, name) == getattr(s, name) for s, f in zip(stated, best))
        for name in ("color", "shape", "size")
    }
    return {
        "objects": len(stated),
        "placed": sum(placed),
        **attribute,
        "right": sum(right),
        "full_match": full,
        "detector_ok": detector_ok,
    }


def summarise(results: Sequence[dict]) -> dict[str, float | int]:
    """Position accuracy (placed objects / objects), attribute-and-position accuracy, full-match rate."""
    objects = sum(r["objects"] for r in results)
    return {
        "layouts": len(results),
        "objects": objects,
        "position_accuracy": sum(r["placed"] for r in results) / objects,
        "object_accuracy": sum(r["right"] for r in results) / objects,
        **{
            f"{name}_accuracy": sum(r[name] for r in results) / objects for name in ("color", "shape", "size")
        },
        "full_match": sum(r["full_match"] for r in results) / len(results),
        "detector_ok": sum(r["detector_ok"] for r in results) / len(results),
    }
