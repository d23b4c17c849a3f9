"""The classifier's negatives: irregular outlines (latentdiff.data.irregular) that the strict detector refuses, and
the label space with their `{colour} irregular` classes (latentdiff.data.scene_labels)."""

from __future__ import annotations

import numpy as np
import pytest

from latentdiff.data.irregular import KINDS, irregular_scene
from latentdiff.data.scene_labels import (
    CELL_ATTRIBUTES,
    IRREGULAR_CELL_ATTRIBUTES,
    NUM_CLASSES,
    NUM_CLASSES_WITH_IRREGULAR,
    cell_attribute,
    class_name,
    irregular_class,
    object_class,
)
from latentdiff.data.shapes import BACKGROUND_COLORS, OBJECT_COLORS, render_shapes, sample_scene
from latentdiff.eval.detector import IRREGULAR, detect
from train.tasks.classifier import irregular_labels


def test_the_irregular_classes_follow_the_crisp_ones_one_per_colour():
    assert NUM_CLASSES_WITH_IRREGULAR == NUM_CLASSES + len(OBJECT_COLORS) == 25
    assert [name for name, _ in IRREGULAR_CELL_ATTRIBUTES] == [name for name, _ in CELL_ATTRIBUTES]
    assert {k for _, k in IRREGULAR_CELL_ATTRIBUTES} == {25}
    assert [irregular_class(c) for c in OBJECT_COLORS] == list(range(NUM_CLASSES, NUM_CLASSES_WITH_IRREGULAR))
    assert [class_name(irregular_class(c)) for c in OBJECT_COLORS] == [
        f"{c} irregular" for c in OBJECT_COLORS
    ]
    assert class_name(object_class("orange", "triangle")) == "orange triangle"  # the first K are unchanged
    with pytest.raises(ValueError, match="class index 25 is outside 0 … 24"):
        class_name(25)
    with pytest.raises(ValueError, match="no irregular class for 'pink': the colours are"):
        irregular_class("pink")


def test_an_outline_draws_where_its_shape_would():
    box = (0.2, 0.3, 0.5, 0.6)
    square = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
    named = np.asarray(render_shapes((0, 0, 0), [("square", box, (255, 255, 255))], 64), dtype=float)
    drawn = np.asarray(render_shapes((0, 0, 0), [(square, box, (255, 255, 255))], 64), dtype=float)
    assert (
        abs(named.sum() - drawn.sum()) / named.sum() < 0.03
    )  # PIL's rectangle stops a supersampled pixel short
    assert np.abs(named - drawn).max() <= 64  # at most a quarter pixel of the edge apart


@pytest.mark.parametrize("kind", list(KINDS))
def test_outlines_of_each_kind_are_mostly_refused_by_the_strict_detector(kind):
    # these 12 draws: dome 12, curved triangle 12, blob 11, pinched square 7, rounded square 4 refused (rounded
    # squares sit between the detector's square and circle; the rest read as those, and irregular_scene redraws
    # them); a kind that drew crisp shapes would get 0
    refused = 0
    for i in range(12):
        rng = np.random.default_rng([3, i])
        scene = sample_scene(rng, num_objects=1)
        obj = scene.objects[0]
        shapes = [(KINDS[kind](rng), obj.bbox(), OBJECT_COLORS[obj.color])]
        refused += [
            o.shape for o in detect(render_shapes(BACKGROUND_COLORS[scene.background], shapes)).objects
        ] == [IRREGULAR]
    assert refused >= 3, f"{kind}: {refused} of 12 refused"


def test_irregular_scenes_are_read_irregular_and_labelled_so():
    for i in range(6):
        scene, image = irregular_scene(np.random.default_rng([0, i]))
        found = detect(image).objects
        labels = dict(zip([name for name, _ in CELL_ATTRIBUTES], irregular_labels(scene)))
        for j, obj in enumerate(scene.scene.objects):
            read = {o.shape for o in found if o.color == obj.color and o.position == obj.position}
            if j in scene.irregular:
                assert read == {IRREGULAR} and labels[cell_attribute(obj.position)] == irregular_class(
                    obj.color
                )
            else:
                assert labels[cell_attribute(obj.position)] == object_class(obj.color, obj.shape)
        assert sum(k != 0 for k in labels.values()) == len(scene.scene.objects)
    with pytest.raises(RuntimeError, match="refused by the detector in 0 tries"):
        irregular_scene(np.random.default_rng(0), tries=0)
