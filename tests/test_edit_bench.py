"""ShapesBench edits (latentdiff/eval/edits.py): the cases are what they say, and the scoring reads an edit right.

An oracle that renders each case's edited scene must score 1.0 on every kind with no pixel changed outside the
inpainting masks; an edit that changes nothing must score 0.0 (the start never already matches the target).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.shapes import render_scene
from latentdiff.eval import edits

SIZE = 64
PER_KIND = 6


@pytest.fixture(scope="module")
def cases():
    return edits.edit_cases(per_kind=PER_KIND, size=SIZE)


def test_cases_are_fixed_by_the_seed_and_change_one_thing(cases):
    again = edits.edit_cases(per_kind=PER_KIND, size=SIZE)
    assert [(c.start, c.edited) for c in cases] == [(c.start, c.edited) for c in again]
    assert [c.kind for c in cases] == [k for k in edits.EDIT_KINDS for _ in range(PER_KIND)]
    for case in cases:
        start, edited = case.start.objects, case.edited.objects
        assert case.start.background == case.edited.background
        if case.kind in ("recolour", "invert"):  # one word: the colour
            assert len(start) == len(edited) == 1 and start[0].color != edited[0].color
            assert case.target == case.source_prompt.replace(start[0].color, edited[0].color, 1)
        elif case.kind == "add":
            assert len(start) == 1 and edited[0] == start[0] and len(edited) == 2
        else:
            assert len(start) == 2 and len(edited) == 1 and edited[0] in start


def test_masks_sit_on_the_latent_grid_and_clear_the_objects_they_keep(cases):
    for case in cases:
        if case.kind not in edits.INPAINT_KINDS:
            assert case.mask is None
            continue
        ys, xs = np.nonzero(case.mask)
        assert case.mask.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one box
        assert all(v % 4 == 0 for v in (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
        kept = case.edited.objects[0]  # add: the first object; remove: the one left
        x0, y0, x1, y1 = (v * SIZE for v in kept.bbox())
        assert not case.mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))].any()


def test_an_oracle_scores_one_and_keeps_the_outside_and_doing_nothing_scores_zero(cases):
    def oracle(kind, batch):
        return [render_scene(case.edited, SIZE) for case in batch]

    def nothing(kind, batch):
        return [case.start_image(SIZE) for case in batch]

    result, images = edits.run_edit_bench(oracle, cases, size=SIZE, progress=False)
    assert len(images) == len(cases) and all(isinstance(i, Image.Image) for i in images)
    for kind in edits.EDIT_KINDS:
        assert result[kind]["full_match"] == 1.0 and result[kind]["unedited"] == 0.0
        assert result[kind]["num_cases"] == PER_KIND
    assert result["add"]["outside_mask_max_change"] == 0 and result["remove"]["outside_mask_max_change"] == 0
    unchanged, _ = edits.run_edit_bench(nothing, cases, size=SIZE, progress=False)
    assert all(unchanged[kind]["full_match"] == 0.0 for kind in edits.EDIT_KINDS)
    table = edits.format_edit_table(result)
    assert all(kind in table for kind in edits.EDIT_KINDS)


def test_an_edit_function_returning_too_few_images_is_named(cases):
    with pytest.raises(ValueError, match="returned 0 images for 6 recolour cases"):
        edits.run_edit_bench(lambda kind, batch: [], cases, size=SIZE, progress=False)


def test_bench_edits_command_runs_every_kind_and_keeps_the_outside_exactly(tiny_sd_dir, tmp_path):
    """The whole path on the tiny SD folder (random weights, so only the mechanics are checked: four kinds scored,
    a grid and JSON written, and inpainting changes no pixel outside its masks)."""
    arguments = ["bench", "--edits", "--model", str(tiny_sd_dir), "--edit-cases", "2", "--steps", "2"]
    files = ["--json", str(tmp_path / "edits.json"), "--grid", str(tmp_path / "edits.png")]
    assert main([*arguments, *files]) == 0
    result = json.loads((tmp_path / "edits.json").read_text())
    assert [kind for kind in result if kind != "settings"] == list(edits.EDIT_KINDS)
    assert all(result[kind]["num_cases"] == 2 for kind in edits.EDIT_KINDS)
    assert result["add"]["outside_mask_max_change"] == 0 and result["remove"]["outside_mask_max_change"] == 0
    assert result["settings"]["recolour_strength"] == 0.7
    assert Image.open(tmp_path / "edits.png").size[0] == 6 * 128


def test_bench_edits_of_an_inpainting_unet_runs_the_inpainting_kinds(tiny_sd_dir, tmp_path, capsys):
    """A folder whose UNet takes [latents, mask, masked-image latents] (as train_t2i.py --inpainting exports):
    --edits scores add and remove by default, and refuses the kinds it cannot run, naming the fix."""
    from pipelines import LatentInpaintPipeline
    from train.tasks.inpaint import widen_conv_in

    pipe = LatentInpaintPipeline.from_pretrained(tiny_sd_dir)
    pipe.unet = widen_conv_in(pipe.unet, pipe.vae.config.latent_channels)
    folder = tmp_path / "inpainting"
    pipe.save_pretrained(folder)
    arguments = ["bench", "--edits", "--model", str(folder), "--edit-cases", "1", "--steps", "2"]
    assert (
        main([*arguments, "--json", str(tmp_path / "edits.json"), "--grid", str(tmp_path / "grid.png")]) == 0
    )
    result = json.loads((tmp_path / "edits.json").read_text())
    assert [kind for kind in result if kind != "settings"] == list(edits.INPAINT_KINDS)
    assert result["add"]["outside_mask_max_change"] == 0 and result["remove"]["outside_mask_max_change"] == 0
    assert main([*arguments, "--edit-kinds", "remove", "--json", str(tmp_path / "remove.json")]) == 0
    assert list(json.loads((tmp_path / "remove.json").read_text())) == ["remove", "settings"]
    capsys.readouterr()
    assert main([*arguments, "--edit-kinds", "add,recolour"]) == 2
    assert "use --edit-kinds add,remove" in capsys.readouterr().err
    assert main([*arguments, "--edit-kinds", "paint"]) == 2
    assert "--edit-kinds='paint': name some of recolour, add, remove, invert" in capsys.readouterr().err


def test_psnr_is_the_textbook_formula():
    black, grey = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (16, 16, 16))
    assert edits.psnr(black, black) == float("inf")
    assert edits.psnr(grey, black) == pytest.approx(10 * np.log10(255**2 / 16**2))


def test_inversion_psnr_command_prints_a_row_per_step_count(tiny_sd_dir, capsys):
    arguments = [
        "bench",
        "--edits",
        "--model",
        str(tiny_sd_dir),
        "--edit-cases",
        "1",
        "--inversion-steps",
        "2,3",
    ]
    assert main(arguments) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["2", "3"]
    assert lines[-1].startswith("VAE round trip to the image:")
