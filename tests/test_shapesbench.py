"""ShapesBench: the detector reads rendered scenes, the scores mean what they say, the bench runs end to end."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from latentdiff.data.shapes import (
    BACKGROUND_COLORS,
    HELD_OUT_PAIRS,
    ObjectSpec,
    Scene,
    describe_scene,
    format_caption,
    parse_caption,
    render_scene,
    sample_scene,
    scene_for_caption,
)
from latentdiff.eval.detector import (
    IRREGULAR,
    MAX_CONCAVE_DEPTH,
    MAX_OUTLINE_DEVIATION,
    MIN_STAR_ARM_DEPTH,
    MIN_STAR_HARMONIC,
    concave_depth,
    connected_components,
    detect,
    outline_deviation,
    star_arms,
)
from latentdiff.eval.shapesbench import (
    ALL_GROUPS,
    GROUPS,
    METRICS,
    bench_prompts,
    detector_accuracy,
    evaluate,
    matches_prompt,
    read_prompt_file,
    run_bench,
    score,
    vae_ceiling,
)
from latentdiff.eval.sweep import (
    GROUP_COLOURS,
    SAMPLER_COLOURS,
    format_sweep_table,
    overall,
    parse_sweep,
    plot_sweep,
    plot_sweeps,
    run_sweep,
)


def render_prompt(text: str, seed: int, size: int = 64) -> Image.Image:
    """A perfect generator: renders what the prompt states."""
    return render_scene(scene_for_caption(parse_caption(text), np.random.default_rng(seed)), size)


@pytest.mark.parametrize("size", [32, 48, 64, 96, 128])
def test_detector_reads_rendered_scenes_on_every_background(size):
    rng = np.random.default_rng(size)
    matched = total = 0
    for index in range(40):
        scene = sample_scene(rng, allow_held_out=True, star_only=index % 5 == 4)
        for background in BACKGROUND_COLORS:
            shown = dataclasses.replace(scene, background=background)
            matched += matches_prompt(render_scene(shown, size), format_caption(describe_scene(shown)))
            total += 1
    assert matched / total >= 0.99


def test_detector_accuracy_reports_full_match():
    result = detector_accuracy(num_scenes=60, size=64, include_star=True)
    assert set(METRICS) <= set(result) and result["num_prompts"] == 60
    assert result["full_match"] >= 0.99


def test_detector_rejects_an_extra_object():
    scene = Scene(
        "white",
        (ObjectSpec("red", "circle", "large", "left"), ObjectSpec("red", "square", "small", "top right")),
    )
    image = render_scene(scene, 64)
    assert matches_prompt(image, format_caption(describe_scene(scene)))  # control: the full caption matches
    first_only = dataclasses.replace(scene, objects=scene.objects[:1])
    result = evaluate(image, format_caption(describe_scene(first_only)))
    assert all(all(v) for v in result.correct.values())  # every stated attribute is right ...
    assert not result.full_match  # ... but there is one object too many


def test_a_blank_image_matches_no_prompt():
    blank = Image.new("RGB", (64, 64), BACKGROUND_COLORS["gray"])
    detection = detect(blank)
    assert detection.objects == () and detection.background == "gray"
    assert not matches_prompt(blank, "a small red circle on the left on a gray background")
    assert not matches_prompt(blank, "a red circle")


def test_detector_ignores_a_stray_speck_but_counts_a_blob():
    scene = Scene("black", (ObjectSpec("blue", "circle", "large", "center"),))
    pixels = np.array(render_scene(scene, 64))
    pixels[2:4, 2:4] = (220, 40, 40)  # a 2×2 red speck: noise
    assert matches_prompt(Image.fromarray(pixels), "a large blue circle in the center on a black background")
    pixels[2:10, 2:10] = (240, 240, 240)  # an 8×8 white blob: an extra object, even in a background colour
    assert not matches_prompt(
        Image.fromarray(pixels), "a large blue circle in the center on a black background"
    )


def test_connected_components_separate_same_colour_regions():
    classes = np.full((6, 7), -1)
    classes[0:2, 0:2] = 3  # a block
    classes[4, 4] = classes[5, 5] = 3  # two pixels touching at a corner: one region under 8-connectivity
    classes[0:3, 5] = 1  # a region of another class
    classes[0:2, 2] = 1  # touching the block but of another class
    labels = connected_components(classes)
    assert labels[0, 0] == labels[1, 1] != labels[0, 2]
    assert labels[4, 4] == labels[5, 5] != labels[0, 0]
    assert labels[0, 5] == labels[2, 5] != labels[0, 2]
    assert len(np.unique(labels[labels >= 0])) == 4 and (labels[classes < 0] == -1).all()


def test_scores_count_each_attribute():
    prompt = "a large red circle on the left on a white background"
    wrong_size = render_scene(Scene("white", (ObjectSpec("red", "circle", "small", "left"),)), 64)
    result = score([wrong_size], [prompt])["single"]
    assert result["size"] == 0.0 and result["full_match"] == 0.0
    assert result["color"] == result["shape"] == result["position"] == result["background"] == 1.0
    wrong_colour = render_scene(Scene("white", (ObjectSpec("blue", "circle", "large", "left"),)), 64)
    result = score([wrong_colour], [prompt])["single"]
    assert result["color"] == 0.0 and result["shape"] == 1.0 and result["full_match"] == 0.0


def test_two_object_prompts_match_objects_by_colour_and_shape():
    image = render_scene(
        Scene(
            "black",
            (
                ObjectSpec("yellow", "triangle", "large", "top"),
                ObjectSpec("blue", "square", "small", "bottom"),
            ),
        ),
        64,
    )
    # stated in the other order than the detector lists them (largest first)
    prompt = "a small blue square at the bottom and a large yellow triangle at the top, on a black background"
    assert score([image], [prompt])["two"]["full_match"] == 1.0
    swapped = (
        "a small blue square at the top and a large yellow triangle at the bottom, on a black background"
    )
    result = score([image], [swapped])["two"]
    assert result["position"] == 0.0 and result["color"] == result["shape"] == 1.0


def test_bench_prompts_are_fixed_and_state_every_attribute():
    prompts = bench_prompts(ALL_GROUPS)
    assert prompts == bench_prompts(ALL_GROUPS)
    assert bench_prompts(["two"]) == [p for p in prompts if p.group == "two"]  # a group stands alone
    for group in ALL_GROUPS:
        texts = [p.text for p in prompts if p.group == group]
        assert 40 <= len(texts) == len(set(texts)) <= 60
        assert [p.seed for p in prompts if p.group == group] == list(range(len(texts)))
    for prompt in prompts:
        caption = parse_caption(prompt.text)
        assert caption.background is not None
        assert all(o.size is not None and o.position is not None for o in caption.objects)
        pairs = {(o.color, o.shape) for o in caption.objects}
        assert len(caption.objects) == (2 if prompt.group == "two" else 1)
        assert bool(pairs & HELD_OUT_PAIRS) == (prompt.group == "held_out")
        assert any(o.shape == "star" for o in caption.objects) == (prompt.group == "star")
    held_out = {
        (o.color, o.shape) for p in prompts if p.group == "held_out" for o in parse_caption(p.text).objects
    }
    assert held_out == HELD_OUT_PAIRS


def test_perfect_and_wrong_generators_score_one_and_zero():
    prompts = bench_prompts(ALL_GROUPS, per_group=12)
    perfect = score([render_prompt(p.text, p.seed) for p in prompts], prompts)
    assert set(perfect) == {*ALL_GROUPS, "star_small", "star_large"}  # the star group also by the star's size
    small = [p for p in prompts if p.group == "star" and " small " in p.text]
    assert perfect["star_small"]["num_prompts"] == len(small) > 0
    assert perfect["star_small"]["num_prompts"] + perfect["star_large"]["num_prompts"] == 12
    for group in ALL_GROUPS:
        assert all(perfect[group][m] == 1.0 for m in METRICS if m != "fidelity"), group
        assert 0.96 <= perfect[group]["fidelity"] <= 1.0, group  # anti-aliasing is all a rendered shape loses

    def recolour(text: str) -> str:  # red <-> blue, everything else kept
        return text.replace("red", "#").replace("blue", "red").replace("#", "blue")

    changed = [p for p in prompts if p.group == "single" and ("red" in p.text or "blue" in p.text)]
    wrong = score([render_prompt(recolour(p.text), p.seed) for p in changed], changed)["single"]
    assert wrong["color"] == 0.0 and wrong["full_match"] == 0.0 and wrong["shape"] == 1.0


def test_read_prompt_file_names_the_bad_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(
        "# my prompts\na red circle\n\na green triangle and a blue square, on a black background\n"
    )
    prompts = read_prompt_file(good)
    assert [(p.group, p.seed) for p in prompts] == [("single", 0), ("held_out", 1)]
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\na red dodecahedron on the left\n")
    with pytest.raises(ValueError, match=r"line 2.*dodecahedron"):
        read_prompt_file(bad)


def test_run_bench_returns_the_issue_json_and_a_grid(tmp_path):
    calls = []

    def generate(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        calls.append(len(texts))
        return [render_prompt(t, s) for t, s in zip(texts, seeds)]

    prompts = bench_prompts(per_group=5)
    result = run_bench(
        generate,
        prompts,
        detector_scenes=20,
        batch_size=4,
        settings={"sampler": "ddim", "steps": 25},
        grid_path=tmp_path / "grid.png",
        progress=False,
    )
    assert set(result) == {*GROUPS, "detector", "vae_ceiling", "settings"}
    assert calls == [4, 4, 4, 3]
    for group in GROUPS:
        assert result[group]["full_match"] == 1.0 and result[group]["num_prompts"] == 5
    assert result["detector"]["full_match"] == 1.0 and result["vae_ceiling"] == {"full_match": None}
    assert result["settings"]["steps"] == 25 and result["settings"]["prompts_per_group"]["two"] == 5
    json.dumps(result)  # JSON as it stands
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 0 and grid.height > 0


class IdentityVAE(torch.nn.Module):
    """A stand-in AutoencoderKL whose latents are the image itself: its reconstructions are exact."""

    config = SimpleNamespace(scaling_factor=0.18215, shift_factor=None, block_out_channels=(4,))

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def encode(self, images):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=images))

    def decode(self, latents):
        return SimpleNamespace(sample=latents)


def test_vae_ceiling_measures_the_vae():
    assert vae_ceiling(IdentityVAE(), num_scenes=30, size=32)["full_match"] == 1.0
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    untrained = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()
    assert vae_ceiling(untrained, num_scenes=12, size=32)["full_match"] < 0.5


def test_star_vae_ceiling_scores_star_scenes():
    """star_only scores reconstructions of single-star scenes: perfect through an identity VAE, and a VAE that
    blurs (an 8x8 average pool and nearest up-sampling) loses the star's points."""
    assert vae_ceiling(IdentityVAE(), num_scenes=12, size=64, star_only=True)["full_match"] == 1.0
    small, large = (
        vae_ceiling(IdentityVAE(), num_scenes=12, size=64, star_only=True, star_size=size)["num_prompts"]
        for size in ("small", "large")
    )
    assert small + large == 12 and small > 0 and large > 0  # the same scenes, split by the star's size

    class BlurVAE(IdentityVAE):
        def decode(self, latents):
            pooled = torch.nn.functional.avg_pool2d(latents, 8)
            return SimpleNamespace(sample=torch.nn.functional.interpolate(pooled, scale_factor=8))

    assert vae_ceiling(BlurVAE(), num_scenes=12, size=64, star_only=True)["shape"] < 0.5


# ------------------------------------------------------------------------------------------ strict shapes


def draw_polygon(points: list[tuple[float, float]], size: int = 64, background: str = "white") -> Image.Image:
    """A red polygon (vertices in pixels) anti-aliased as render_scene draws: at 4x, then 4x4 box-filtered."""
    image = Image.new("RGB", (4 * size, 4 * size), BACKGROUND_COLORS[background])
    ImageDraw.Draw(image).polygon([(4 * x, 4 * y) for x, y in points], fill=(220, 40, 40))
    return image.reduce(4)


def bowed_polygon(
    corners: list[tuple[float, float]], depth: float, per_side: int = 12
) -> list[tuple[float, float]]:
    """The polygon through `corners` with each side bowed towards the centroid by `depth` pixels at its middle
    (a parabola: depth · 4t(1 - t) along the side), i.e. concave sides."""
    cx, cy = np.mean(corners, axis=0)
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        normal = np.array([-(y1 - y0), x1 - x0]) / np.hypot(x1 - x0, y1 - y0)
        if normal @ (np.array([cx, cy]) - [(x0 + x1) / 2, (y0 + y1) / 2]) < 0:
            normal = -normal  # point inwards
        for t in np.arange(per_side) / per_side:
            bow = depth * 4 * t * (1 - t)
            points.append((x0 + t * (x1 - x0) + bow * normal[0], y0 + t * (y1 - y0) + bow * normal[1]))
    return points


def square_corners(side: float, cx: float = 32.2, cy: float = 31.7) -> list[tuple[float, float]]:
    h = side / 2
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def triangle_corners(side: float, cx: float = 32.2, cy: float = 31.7) -> list[tuple[float, float]]:
    h = side / 2
    return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def circle_points(side: float, cx: float = 32.2, cy: float = 31.7, n: int = 96) -> list[tuple[float, float]]:
    angles = 2 * np.pi * np.arange(n) / n
    return [(cx + side / 2 * np.cos(a), cy + side / 2 * np.sin(a)) for a in angles]


def half_dome(side: float) -> list[tuple[float, float]]:
    """A circle with its bottom fifth cut off flat (as wide as the circle, 0.8 as tall)."""
    floor = 31.7 + 0.3 * side
    return [(x, min(y, floor)) for x, y in circle_points(side)]


def flared_cup(side: float, cx: float = 32.2, cy: float = 31.7) -> list[tuple[float, float]]:
    """A square whose sides lean in by a tenth of the side towards the bottom (a cup, 0.8 as wide at its foot)."""
    h = side / 2
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + 0.4 * side, cy + h), (cx - 0.4 * side, cy + h)]


def lumpy_blob(side: float, cx: float = 32.2, cy: float = 31.7) -> list[tuple[float, float]]:
    """A heptagon with uneven corners (radii 0.88 to 1.04 of the circle's): a blob with flats and bumps."""
    radii = (1.0, 0.9, 1.04, 0.93, 1.02, 0.88, 1.0)
    angles = 2 * np.pi * np.arange(7) / 7 - np.pi / 2
    return [(cx + side / 2 * r * np.cos(a), cy + side / 2 * r * np.sin(a)) for r, a in zip(radii, angles)]


COUNTER_EXAMPLES = {  # name: (the shape a person might be told it is, the ideal shape as drawn, the counter-example)
    "concave square": ("square", square_corners, lambda s: bowed_polygon(square_corners(s), 0.1 * s)),
    "concave triangle": ("triangle", triangle_corners, lambda s: bowed_polygon(triangle_corners(s), 0.1 * s)),
    "half-dome": ("circle", circle_points, half_dome),
    "flared cup": ("square", square_corners, flared_cup),
    "lumpy blob": ("circle", circle_points, lumpy_blob),
}


@pytest.mark.parametrize("side", [12.8, 19.2])  # small and large at 64 px
@pytest.mark.parametrize("name", list(COUNTER_EXAMPLES))
def test_shapes_a_person_would_not_call_the_shape_are_irregular(name, side):
    """Each counter-example, drawn as render_scene draws (anti-aliased), is read as irregular and fails the prompt;
    the ideal shape drawn the same way (control) is read as the shape and matches it."""
    shape, ideal, counter = COUNTER_EXAMPLES[name]
    size = "large" if side > 16 else "small"
    prompt = f"a {size} red {shape} in the center on a white background"
    assert detect(draw_polygon(ideal(side))).objects[0].shape == shape
    assert matches_prompt(draw_polygon(ideal(side)), prompt)
    assert detect(draw_polygon(counter(side))).objects[0].shape == IRREGULAR
    assert not matches_prompt(draw_polygon(counter(side)), prompt)


@pytest.mark.parametrize("side", [12.8, 19.2])
@pytest.mark.parametrize("shape, corners", [("square", square_corners), ("triangle", triangle_corners)])
def test_sides_bowed_by_a_hundredth_still_read_as_the_shape(shape, corners, side):
    assert detect(draw_polygon(bowed_polygon(corners(side), 0.01 * side))).objects[0].shape == shape


def test_concave_depth_is_zero_for_convex_shapes_and_the_hull_deficit_over_its_perimeter():
    square = np.zeros((24, 24), np.float32)
    square[4:20, 4:20] = 1.0
    assert concave_depth(square) == pytest.approx(0.0, abs=0.02)
    notched = square.copy()
    notched[4:12, 10:14] = 0.0  # a 8x4 slot cut from the top side: the hull stays the 16x16 square
    assert concave_depth(notched) == pytest.approx(32 / 64, abs=0.02)  # deficit 32 px² over a 64 px perimeter
    assert concave_depth(notched) > MAX_CONCAVE_DEPTH * 16
    # sides bowed in by δ at their middle (parabolas) lose (2/3)·δ·L each: the depth is (2/3)·δ for any shape, less
    # about a quarter pixel where the anti-aliased edge rounds the sharp corners off the hull
    for corners in (square_corners, triangle_corners):
        pixels = np.asarray(draw_polygon(bowed_polygon(corners(40.0), 3.0)), np.float32)
        alpha = (240 - pixels[..., 1]) / (240 - 40)  # red on white, read in the green channel
        assert concave_depth(alpha) == pytest.approx(2 / 3 * 3.0, abs=0.45)


def test_outline_deviation_of_a_rectangle_read_as_a_square_is_its_overhang():
    """A w×h rectangle fitted by a square of the same area (side √(wh), same centroid) sticks out by (w − √(wh))/2
    at its short ends: the deviation is that over √(wh)."""
    rectangle = np.zeros((40, 40), np.float32)
    rectangle[12:28, 10:30] = 1.0  # 20 wide, 16 tall
    d = np.sqrt(20 * 16)
    assert outline_deviation(rectangle, "square") == pytest.approx((20 - d) / 2 / d, abs=0.005)
    with pytest.raises(ValueError, match="star"):
        outline_deviation(rectangle, "star")


@pytest.mark.parametrize("size, share", [(32, 0.8), (64, 0.5)])
def test_rendered_shapes_keep_well_inside_the_outline_checks(size, share):
    """The checks leave room for anti-aliasing at every size: rendered shapes use at most `share` of them, small
    ones (6.4 px at 32 px, where a pixel's rounding is 5 % of the side) included."""
    for shape in MAX_OUTLINE_DEVIATION:
        for object_size in ("small", "large"):
            for offset in ((0.013, -0.02), (-0.007, 0.031)):
                scene = Scene("black", (ObjectSpec("green", shape, object_size, "center", offset),))
                pixels = np.asarray(render_scene(scene, size), np.float32)
                alpha = (pixels[..., 1] - 20) / (170 - 20)  # green (40, 170, 60) on black: the green channel
                deviation = outline_deviation(alpha, shape)
                assert deviation < share * MAX_OUTLINE_DEVIATION[shape], (shape, object_size)
                assert concave_depth(alpha) < share * MAX_CONCAVE_DEPTH * size * 0.2


def test_two_touching_objects_of_one_colour_are_one_wrong_object():
    prompt = "a large red square on the left and a large red square in the center, on a black background"
    apart = Scene(
        "black",
        (
            ObjectSpec("red", "square", "large", "left", (-0.01, 0.0)),
            ObjectSpec("red", "square", "large", "center", (0.01, 0.0)),
        ),
    )
    pixels = np.array(render_scene(apart, 64))
    assert matches_prompt(Image.fromarray(pixels), prompt)  # control: 3.4 px apart (x 19.6 to 23.0)
    bridged = pixels.copy()
    bridged[30:33, 19:24] = (0.4 * np.array([220, 40, 40]) + 0.6 * np.array([20, 20, 20])).astype(np.uint8)
    detection = detect(Image.fromarray(bridged))  # a faint 40 % red bridge: the two squares touch
    assert len(detection.objects) == 1 and detection.objects[0].shape == IRREGULAR
    assert not matches_prompt(Image.fromarray(bridged), prompt)
    touching = pixels.copy()
    touching[24:40, 19:24] = (220, 40, 40)  # fully joined
    assert not matches_prompt(Image.fromarray(touching), prompt)


def test_fidelity_is_about_one_for_rendered_shapes_and_low_for_the_wrong_shape():
    for shape in ("circle", "square", "triangle", "star"):
        for size in ("small", "large"):
            scene = Scene("gray", (ObjectSpec("blue", shape, size, "center", (0.013, -0.02)),))
            prompt = format_caption(describe_scene(scene))
            assert 0.93 <= evaluate(render_scene(scene, 64), prompt).fidelity[0] <= 1.0, (shape, size)
    circle = render_scene(Scene("gray", (ObjectSpec("blue", "circle", "large", "center"),)), 64)
    asked_square = evaluate(circle, "a large blue square in the center on a gray background")
    assert asked_square.fidelity[0] < 0.9 and not asked_square.full_match
    nothing = Image.new("RGB", (64, 64), BACKGROUND_COLORS["gray"])
    assert evaluate(nothing, "a blue circle").fidelity == (0.0,)  # no object: fidelity 0


# ------------------------------------------------------------------------------------------------ the star


def star_polygon(
    side: float,
    inner: float = 0.382,
    points: int = 5,
    arm_lengths: tuple[float, ...] | None = None,
    lean: float = 0.0,
    cx: float = 32.2,
    cy: float = 31.7,
) -> list[tuple[float, float]]:
    """An upright star with `points` arms, `side` wide for five (outer radius R = side / (2 sin 72°)), its valleys
    at inner·R; arm_lengths scales each tip's radius; lean stretches it by (1 + lean·cos θ) towards the right."""
    radius = side / (2 * np.sin(np.radians(72)))
    lengths = arm_lengths or (1.0,) * points
    vertices = []
    for j in range(2 * points):
        angle = -np.pi / 2 + j * np.pi / points
        r = radius * (lengths[j // 2] if j % 2 == 0 else inner) * (1 + lean * np.cos(angle))
        vertices.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
    return vertices


def bumpy_circle(side: float, cx: float = 32.2, cy: float = 31.7) -> list[tuple[float, float]]:
    """A circle with five soft bumps (radius 1 + 0.08·cos 5θ): five-fold, but no arms."""
    angles = 2 * np.pi * np.arange(200) / 200
    return [
        (
            cx + side / 2 * (1 + 0.08 * np.cos(5 * a)) * np.cos(a),
            cy + side / 2 * (1 + 0.08 * np.cos(5 * a)) * np.sin(a),
        )
        for a in angles
    ]


NOT_STARS = {  # name: drawn at side s
    "pentagon": lambda s: star_polygon(
        s, inner=np.cos(np.pi / 5)
    ),  # valleys on the sides: a regular pentagon
    "hexagon": lambda s: star_polygon(s, inner=np.cos(np.pi / 6), points=6),
    "four-point star": lambda s: star_polygon(s, points=4),
    "six-point star": lambda s: star_polygon(s, inner=0.45, points=6),
    "bumpy circle": bumpy_circle,
    "star with an arm gone": lambda s: star_polygon(s, arm_lengths=(1, 1, 0.382, 1, 1)),
    "star with a stub arm": lambda s: star_polygon(s, arm_lengths=(1, 1, 1, 0.5, 1)),
    "lopsided star": lambda s: star_polygon(s, lean=0.35),
}


@pytest.mark.parametrize("side", [12.8, 19.2])  # small and large at 64 px
@pytest.mark.parametrize("name", list(NOT_STARS))
def test_five_points_gone_wrong_are_not_stars(name, side):
    """Each is refused as a star (its five arms are missing, unequal or not there at all); the star drawn the same
    way is read as one (control)."""
    size = "large" if side > 16 else "small"
    prompt = f"a {size} red star in the center on a white background"
    assert detect(draw_polygon(star_polygon(side))).objects[0].shape == "star"
    assert matches_prompt(draw_polygon(star_polygon(side)), prompt)
    assert detect(draw_polygon(NOT_STARS[name](side))).objects[0].shape != "star"
    assert not matches_prompt(draw_polygon(NOT_STARS[name](side)), prompt)


@pytest.mark.parametrize("side", [12.8, 19.2])
def test_a_blurred_or_fat_star_is_still_a_star(side):
    """Blur (as a VAE's decoder leaves a small star) costs the thin arms' template fit most: a star blurred by a
    Gaussian of 0.8 px fits below the base shapes' 0.85 and is still read as a star, by its arms; so is a fat star
    (valleys at 0.6 of the tips instead of 0.382)."""
    blurred = draw_polygon(star_polygon(side)).filter(ImageFilter.GaussianBlur(0.8))
    found = detect(blurred).objects[0]
    assert found.shape == "star"
    if side < 16:
        assert found.fits["star"] < 0.85
    assert star_arms(_region_alpha(blurred))["depth"] >= MIN_STAR_ARM_DEPTH
    assert detect(draw_polygon(star_polygon(side, inner=0.6))).objects[0].shape == "star"


def _region_alpha(image: Image.Image) -> np.ndarray:
    """α of a red object on white (read in the green channel, as draw_polygon draws it)."""
    return (240 - np.asarray(image, np.float32)[..., 1]) / (240 - 40)


def test_star_arms_reads_a_regular_star():
    """r(θ) of a star drawn at 128 px swings between the tips and 0.382 of them: every tip clear of every valley by
    more than half the longest arm, the tips alike, the 5-fold harmonic well above the threshold; a circle has none."""
    star = star_arms(_region_alpha(draw_polygon(star_polygon(60.0, cx=64.2, cy=63.7), size=128)))
    assert star["depth"] > 0.5 and star["tip_ratio"] > 0.95 and star["harmonic"] > 3 * MIN_STAR_HARMONIC
    circle = star_arms(_region_alpha(draw_polygon(circle_points(60.0, cx=64.2, cy=63.7), size=128)))
    assert circle["harmonic"] < 0.01 and circle["depth"] < MIN_STAR_ARM_DEPTH


# ------------------------------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize(
    "text, expected",
    [("guidance=1.5,2,3", ("guidance", [1.5, 2.0, 3.0])), ("steps=10, 25,50", ("steps", [10, 25, 50]))],
)
def test_parse_sweep_reads_name_and_values(text, expected):
    assert parse_sweep(text) == expected


@pytest.mark.parametrize(
    "text, says",
    [
        ("eta=0,1", "NAME one of"),
        ("guidance", "NAME one of"),
        ("steps=10,2.5", "must be integers"),
        ("steps=", "one or more"),
    ],
)
def test_parse_sweep_says_what_to_write(text, says):
    with pytest.raises(ValueError, match=says):
        parse_sweep(text)


def test_run_sweep_scores_each_value_and_plots_them(tmp_path):
    """Value 1 renders each prompt (perfect), value 2 swaps red and blue (wrong colour, right shapes): the sweep
    must score each value as run_bench would, and the plot and JSON are written."""
    prompts = bench_prompts(per_group=6)

    def make_generate_fn(value):
        def generate(texts, seeds):
            swap = (
                (lambda t: t.replace("red", "#").replace("blue", "red").replace("#", "blue"))
                if value == 2
                else str
            )
            return [render_prompt(swap(t), s) for t, s in zip(texts, seeds)]

        return generate

    sweep = run_sweep(make_generate_fn, "guidance", [1.0, 2.0], prompts, detector_scenes=12, progress=False)
    assert sweep["values"] == [1.0, 2.0] and len(sweep["results"]) == 2
    assert sweep["results"][0] == score([render_prompt(p.text, p.seed) for p in prompts], prompts)
    for group in GROUPS:
        assert (
            sweep["results"][0][group]["full_match"] == 1.0 and sweep["results"][0][group]["fidelity"] > 0.96
        )
    swapped = make_generate_fn(2)([p.text for p in prompts], [p.seed for p in prompts])
    assert sweep["results"][1] == score(swapped, prompts)
    assert any(sweep["results"][1][g]["full_match"] < 1.0 for g in GROUPS)
    assert sweep["detector"]["full_match"] == 1.0 and sweep["vae_ceiling"] == {"full_match": None}
    json.loads(json.dumps(sweep))
    path = plot_sweep(sweep, tmp_path / "plots" / "sweep.png")
    with Image.open(path) as plot:
        assert plot.format == "PNG" and plot.width > plot.height > 200
        # each group's line is drawn in its colour
        colours = {c for _, c in plot.convert("RGB").getcolors(1 << 20)}
    assert {GROUP_COLOURS[g] for g in GROUPS} <= colours
    assert "guidance" in format_sweep_table(sweep)


def test_plot_sweeps_draws_one_line_per_sampler_over_all_prompts(tmp_path):
    def steps_sweep(sampler: str, karras: bool, full_match: list[float]) -> dict:
        # single: 2 prompts; two: 6 prompts at full_match, so overall = (2 * 1.0 + 6 * f) / 8
        results = [
            {
                "single": {"full_match": 1.0, "fidelity": 0.9, "num_prompts": 2},
                "two": {"full_match": f, "fidelity": 0.8, "num_prompts": 6},
            }
            for f in full_match
        ]
        settings = {"sampler": sampler, "karras": karras}
        values = [4, 8, 50][: len(full_match)]
        return {"sweep": "steps", "values": values, "results": results, "settings": settings}

    assert overall(steps_sweep("ddim", False, [0.5])["results"][0], "full_match") == (2 + 3) / 8
    assert overall(steps_sweep("ddim", False, [0.5])["results"][0], "fidelity") == pytest.approx(0.825)
    sweeps = [steps_sweep("ddim", False, [0.0, 0.5, 1.0]), steps_sweep("dpmpp_2m", True, [0.5, 1.0])]
    path = plot_sweeps(sweeps, tmp_path / "steps.png")
    with Image.open(path) as plot:
        assert plot.format == "PNG" and plot.width > plot.height > 200
        colours = {c for _, c in plot.convert("RGB").getcolors(1 << 20)}
    assert {SAMPLER_COLOURS["ddim"], SAMPLER_COLOURS["dpmpp_2m karras"]} <= colours
    with pytest.raises(ValueError, match="same setting"):
        plot_sweeps([sweeps[0], {**sweeps[1], "sweep": "guidance"}], tmp_path / "mixed.png")
