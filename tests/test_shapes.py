"""The shapes world (shared/SHAPES.md): determinism, held-out compositions, captions, geometry, dataset files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from latentdiff.data.shapes import (
    BACKGROUND_COLORS,
    HELD_OUT_PAIRS,
    MAX_OFFSET,
    MIN_GAP,
    OBJECT_COLORS,
    POLYGON_CAPTION,
    SHAPES,
    SIZES,
    STAR,
    ObjectSpec,
    ParsedCaption,
    ParsedObject,
    Scene,
    caption_scene,
    describe_scene,
    format_caption,
    iter_shapes_samples,
    parse_caption,
    render_scene,
    sample_scene,
    write_shapes_dataset,
)


def test_same_seed_gives_same_image_and_caption():
    first = list(iter_shapes_samples(12, size=48, seed=3))
    again = list(iter_shapes_samples(12, size=48, seed=3))
    for (image_a, caption_a, scene_a), (image_b, caption_b, scene_b) in zip(first, again):
        assert image_a.tobytes() == image_b.tobytes() and caption_a == caption_b and scene_a == scene_b
    # sample i does not depend on how many are asked for, and another seed gives other samples
    assert [c for _, c, _ in iter_shapes_samples(5, size=48, seed=3)] == [c for _, c, _ in first[:5]]
    other = list(iter_shapes_samples(12, size=48, seed=4))
    assert sum(a.tobytes() != b.tobytes() for (a, _, _), (b, _, _) in zip(first, other)) >= 10


def test_training_data_never_shows_held_out_pairs_or_star():
    seen = Counter()
    for _, caption, scene in iter_shapes_samples(3000, size=32, seed=0):
        for obj in scene.objects:
            seen[obj.color, obj.shape] += 1
        for obj in parse_caption(caption).objects:
            assert (obj.color, obj.shape) not in HELD_OUT_PAIRS and obj.shape != STAR, caption
    assert not set(seen) & HELD_OUT_PAIRS
    # every colour and every shape still appears, in every allowed pair, and no star
    assert set(seen) == {(c, s) for c in OBJECT_COLORS for s in SHAPES} - HELD_OUT_PAIRS
    # star-only scenes (the LoRA data) are all stars, in every colour
    stars = [
        s for _, _, scene in iter_shapes_samples(200, size=32, seed=0, star_only=True) for s in scene.objects
    ]
    assert {o.shape for o in stars} == {STAR} and {o.color for o in stars} == set(OBJECT_COLORS)
    # a star fraction mixes star-only scenes with base scenes (still no held-out pair), and keeps the star scenes
    mixed = [
        scene for _, _, scene in iter_shapes_samples(400, size=32, seed=0, star_only=True, star_fraction=0.5)
    ]
    star_scenes = [scene for scene in mixed if {o.shape for o in scene.objects} == {STAR}]
    base_scenes = [scene for scene in mixed if STAR not in {o.shape for o in scene.objects}]
    assert len(star_scenes) + len(base_scenes) == 400 and 150 < len(star_scenes) < 250
    assert not {(o.color, o.shape) for scene in base_scenes for o in scene.objects} & HELD_OUT_PAIRS
    with pytest.raises(ValueError, match="star_fraction=1.5 must be in"):
        next(iter_shapes_samples(1, star_only=True, star_fraction=1.5))
    # the detector's scenes may use held-out pairs
    rng = np.random.default_rng(0)
    pairs = {(o.color, o.shape) for _ in range(500) for o in sample_scene(rng, allow_held_out=True).objects}
    assert HELD_OUT_PAIRS <= pairs


def test_polygon_scenes_mix_into_autoencoder_data_only_where_asked():
    """polygon_fraction swaps that share of samples for random-polygon scenes (VAE data): captioned
    POLYGON_CAPTION, no scene, palette colours only; the other samples are the same base scenes as without it."""
    plain = list(iter_shapes_samples(300, size=32, seed=5))
    mixed = list(iter_shapes_samples(300, size=32, seed=5, polygon_fraction=0.5))
    polygons = [(image, caption, scene) for image, caption, scene in mixed if scene is None]
    assert 100 < len(polygons) < 200 and {caption for _, caption, _ in polygons} == {POLYGON_CAPTION}
    for (image, caption, scene), (base_image, base_caption, _) in zip(mixed, plain):
        if scene is not None:
            assert caption == base_caption and image.tobytes() == base_image.tobytes()
    drawn = 0
    for image, _, _ in iter_shapes_samples(20, size=64, seed=5, polygon_fraction=1.0):
        counts = Counter(map(tuple, np.asarray(image).reshape(-1, 3).tolist()))
        assert counts.most_common(1)[0][0] in BACKGROUND_COLORS.values()
        drawn += any(colour in counts for colour in OBJECT_COLORS.values())  # a polygon's flat fill
    assert drawn >= 18  # (a thin sliver may cover no whole pixel)
    with pytest.raises(ValueError, match="polygon_fraction=2 must be in"):
        next(iter_shapes_samples(1, polygon_fraction=2))


def test_captions_parse_back_to_the_rendered_attributes():
    left_out = Counter()
    total = Counter()
    for _, caption, scene in iter_shapes_samples(1500, size=32, seed=1):
        parsed = parse_caption(caption)
        assert len(parsed.objects) == len(scene.objects)
        for stated, obj in zip(parsed.objects, scene.objects):
            assert (stated.color, stated.shape) == (obj.color, obj.shape)
            for attribute in ("size", "position"):
                total[attribute] += 1
                if getattr(stated, attribute) is None:
                    left_out[attribute] += 1
                else:
                    assert getattr(stated, attribute) == getattr(obj, attribute), caption
        total["background"] += 1
        if parsed.background is None:
            left_out["background"] += 1
        else:
            assert parsed.background == scene.background
        assert format_caption(parsed) == caption  # the text is exactly the grammar's
    for attribute in total:  # each optional part is left out with probability 0.2
        assert 0.16 < left_out[attribute] / total[attribute] < 0.24, attribute


def test_full_captions_follow_the_grammar():
    scene = Scene(
        "gray",
        (
            ObjectSpec("red", "circle", "large", "top left"),
            ObjectSpec("blue", "triangle", "small", "bottom"),
        ),
    )
    text = caption_scene(scene, np.random.default_rng(0), drop_prob=0.0)
    assert text == (
        "a large red circle in the top left and a small blue triangle at the bottom, on a gray background"
    )
    assert parse_caption(text) == describe_scene(scene)
    one = Scene("white", (ObjectSpec("green", "square", "small", "right"),))
    assert (
        caption_scene(one, np.random.default_rng(0), 0.0)
        == "a small green square on the right on a white background"
    )
    assert parse_caption("A Red Circle") == ParsedCaption((ParsedObject("red", "circle"),), None)
    assert caption_scene(one, np.random.default_rng(0), drop_prob=1.0) == "a green square"


@pytest.mark.parametrize(
    "prompt, named",
    [
        ("a red hexagon on the left", "hexagon"),
        ("a crimson circle", "crimson"),
        ("a small blue square next to a tree", "next"),
    ],
)
def test_unknown_words_raise(prompt, named):
    with pytest.raises(ValueError, match=named):
        parse_caption(prompt)


@pytest.mark.parametrize(
    "prompt",
    [
        "red a circle",
        "a red",
        "a circle",
        "a red circle on a blue background",
        "a red circle on the left and a blue square on the left",
        "a red circle and a blue square and a green circle",
    ],
)
def test_known_words_out_of_grammar_raise(prompt):
    with pytest.raises(ValueError, match="prompt"):
        parse_caption(prompt)


def test_scenes_keep_objects_apart_inside_the_canvas():
    rng = np.random.default_rng(5)
    for _ in range(2000):
        scene = sample_scene(rng, num_objects=2)
        boxes = [o.bbox() for o in scene.objects]
        for obj, (x0, y0, x1, y1) in zip(scene.objects, boxes):
            assert max(abs(v) for v in obj.offset) <= MAX_OFFSET
            assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
        a, b = boxes
        assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= MIN_GAP - 1e-12


@pytest.mark.parametrize("size", [32, 64, 100])
def test_rendered_square_has_its_size_colour_and_place(size):
    scene = Scene("black", (ObjectSpec("yellow", "square", "large", "bottom right", offset=(0.02, -0.03)),))
    pixels = np.asarray(render_scene(scene, size)).astype(int)
    assert pixels.shape == (size, size, 3)
    assert tuple(pixels[0, 0]) == BACKGROUND_COLORS["black"]
    covered = np.abs(pixels - BACKGROUND_COLORS["black"]).sum(-1) > 0
    ys, xs = np.nonzero(covered)
    x0, y0, x1, y1 = (v * size for v in scene.objects[0].bbox())
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1 and abs(ys.min() - y0) <= 1
    assert abs((xs.max() + 1 - xs.min()) - SIZES["large"] * size) <= 2  # 0.30·S wide, to a pixel at each edge
    centre = pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]
    assert tuple(centre) == OBJECT_COLORS["yellow"]
    # anti-aliased: an edge pixel is a mix of the two colours, not one of them
    assert len({tuple(p) for p in pixels.reshape(-1, 3)}) > 2


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="size"):
        render_scene(sample_scene(np.random.default_rng(0)), size=16)
    with pytest.raises(ValueError, match="color"):
        ObjectSpec("pink", "circle", "small", "top")
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(np.random.default_rng(0), num_objects=3)


def test_written_dataset_loads_through_datasets_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = write_shapes_dataset(tmp_path / "shapes", num_images=10, size=32, seed=2, progress=False)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["file_name", "text"]] * 10
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    expected = {caption: image.tobytes() for image, caption, _ in iter_shapes_samples(10, size=32, seed=2)}
    assert len(loaded) == 10
    for row in loaded:
        assert row["text"] in expected
        assert row["image"].convert("RGB").tobytes() == expected[row["text"]]


def test_make_dataset_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shapes_dataset(out, num_images=3, size=32, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    write_shapes_dataset(out, num_images=3, size=32, progress=False, overwrite=True)
    write_shapes_dataset(out, num_images=2, size=32, progress=False, overwrite=True)  # replaces the dataset
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list((out / "images").iterdir())) == 2
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2
