"""ShapesBench sweeps: score one model at several values of one sampling setting, and plot the curves.

`latentdiff bench --sweep guidance=1.5,2,3,5,7.5` (or `steps=10,25,50,100`) generates the bench prompts once per
value, scores each group (full match and fidelity, as `shapesbench.score`), scores the detector and the VAE ceiling
once (they do not depend on the setting), and draws one PNG: a panel per metric, a line per group against the swept
value, the VAE ceiling as a grey reference line.

Sweeps of several samplers over steps (one `--sweep steps=... --sampler X --json` each) are drawn together by
`plot_sweeps` (`python -m latentdiff.eval.sweep OUT.png A.json B.json ...`): a line per sampler of each metric over
all the prompts, steps on a log scale.

The plot is drawn with PIL, already a dependency: a few lines and labels do not justify matplotlib and its
compiled dependencies (about 40 MB installed) in a package meant to install and start light.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from latentdiff.eval.shapesbench import (
    BenchPrompt,
    GenerateFn,
    bench_settings,
    generate_images,
    reference_scores,
    score,
)

# swept setting -> how its values are read
SWEEPABLE: dict[str, type] = {"guidance": float, "steps": int}
PLOTTED: tuple[str, ...] = ("full_match", "fidelity")
# group -> line colour (RGB); groups not named here take grey
GROUP_COLOURS = {
    "single": (31, 119, 180),
    "two": (214, 39, 40),
    "held_out": (44, 160, 44),
    "star": (148, 103, 189),
}


def parse_sweep(text: str) -> tuple[str, list[float | int]]:
    """Reads `NAME=V1,V2,...` (NAME one of SWEEPABLE) into (NAME, values in the given order).

    Raises ValueError saying what to write when the text is not of that form."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in SWEEPABLE:
        raise ValueError(
            f"--sweep {text!r}: write NAME=V1,V2,... with NAME one of {list(SWEEPABLE)}, "
            "e.g. --sweep guidance=1.5,2,3,5,7.5"
        )
    try:
        parsed = [SWEEPABLE[name](v) for v in values.split(",") if v.strip()]
    except ValueError:
        kind = "integers" if SWEEPABLE[name] is int else "numbers"
        raise ValueError(
            f"--sweep {text!r}: the values of {name} must be {kind}, e.g. {name}=10,25,50"
        ) from None
    if not parsed or len(set(parsed)) != len(parsed):
        raise ValueError(f"--sweep {text!r}: give one or more distinct values after {name}=")
    return name, parsed


def run_sweep(
    make_generate_fn: Callable[[float | int], GenerateFn],
    name: str,
    values: Sequence[float | int],
    prompts: Sequence[BenchPrompt],
    *,
    vae=None,
    image_size: int = 64,
    detector_scenes: int = 200,
    batch_size: int = 16,
    settings: dict | None = None,
    progress: bool = True,
) -> dict:
    """Scores the bench prompts at each value of one setting.

    make_generate_fn(value) -> a generate_fn (as `shapesbench.run_bench` takes) that samples at that value.
    Returns {"sweep": name, "values": [...], "results": [{group: scores} per value, in order], "detector": ...,
    "vae_ceiling": ..., "settings": ...}: JSON as it stands.
    """
    results = []
    for value in values:
        images = generate_images(make_generate_fn(value), prompts, batch_size, progress)
        results.append(score(images, prompts))
    return {
        "sweep": name,
        "values": list(values),
        "results": results,
        **reference_scores(vae, prompts, detector_scenes, image_size, progress),
        "settings": bench_settings(settings, prompts, detector_scenes, image_size),
    }


def format_sweep_table(sweep: dict) -> str:
    """Plain text: one row per value, full match and fidelity per group."""
    groups = list(sweep["results"][0])
    header = f"{sweep['sweep']:<10}" + "".join(f"{g + ' ' + m[:4]:>16}" for g in groups for m in PLOTTED)
    lines = [header, "-" * len(header)]
    for value, result in zip(sweep["values"], sweep["results"]):
        cells = [result[g][m] for g in groups for m in PLOTTED]
        lines.append(f"{value:<10g}" + "".join(f"{'-' if v is None else f'{v:.3f}':>16}" for v in cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the plot

_PANEL = (360, 240)  # plot area of one panel, pixels
_MARGIN = (48, 30, 16, 40)  # left, top, right, bottom around each plot area
_GREY = (150, 150, 150)  # the VAE ceiling
# sampler (as `sampler_label` writes it) -> line colour (RGB), for plots of several sweeps
SAMPLER_COLOURS = {
    "ddim": (31, 119, 180),
    "ddpm": (127, 127, 127),
    "euler": (44, 160, 44),
    "euler_a": (255, 127, 14),
    "heun": (148, 103, 189),
    "dpmpp_2m": (140, 86, 75),
    "dpmpp_2m karras": (214, 39, 40),
    "dpmpp_2m_sde": (227, 119, 194),
    "dpmpp_2m_sde karras": (23, 190, 207),
}


@dataclass(frozen=True)
class Series:
    """One line of a panel: `label` in the legend, drawn in `colour` through the points (x, y); a y of None is
    left out."""

    label: str
    colour: tuple[int, int, int]
    xs: Sequence[float]
    ys: Sequence[float | None]


def _y_range(values: Sequence[float], metric: str) -> tuple[float, float]:
    """Full match on [0, 1]; fidelity from the tenth below its smallest value (at most 0.8) to 1."""
    if metric == "full_match":
        return 0.0, 1.0
    low = min([0.8, *values])
    return float(int(low * 10)) / 10, 1.0


def _draw_panel(
    draw,
    font,
    origin: tuple[int, int],
    series: Sequence[Series],
    metric: str,
    x_label: str,
    ceiling: float | None,
    log_x: bool = False,
) -> None:
    """One metric's panel: axes, ticks at every x of the series, one line per series, the ceiling in grey.
    log_x: place x on a log scale (for steps, whose useful values crowd at the low end)."""
    x0, y0 = origin[0] + _MARGIN[0], origin[1] + _MARGIN[1]
    width, height = _PANEL
    ticks = sorted({float(x) for s in series for x in s.xs})
    scale = math.log if log_x else float
    low, high = _y_range([y for s in series for y in s.ys if y is not None], metric)
    x_low, x_high = scale(ticks[0]), scale(ticks[-1])

    def at(x: float, y: float) -> tuple[float, float]:
        fx = 0.5 if x_high == x_low else (scale(x) - x_low) / (x_high - x_low)
        return x0 + 8 + fx * (width - 16), y0 + height - (y - low) / (high - low) * height

    draw.rectangle((x0, y0, x0 + width, y0 + height), outline=(0, 0, 0))
    for k in range(6):  # y ticks and grid
        y = low + k * (high - low) / 5
        _, py = at(ticks[0], y)
        draw.line((x0, py, x0 + width, py), fill=(225, 225, 225))
        draw.text((x0 - 6, py), f"{y:.2f}", fill=(0, 0, 0), font=font, anchor="rm")
    for x in ticks:
        px, _ = at(x, low)
        draw.line((px, y0 + height, px, y0 + height + 4), fill=(0, 0, 0))
        draw.text((px, y0 + height + 6), f"{x:g}", fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((x0 + width / 2, y0 + height + 22), x_label, fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((x0 + width / 2, y0 - 8), metric.replace("_", " "), fill=(0, 0, 0), font=font, anchor="mb")
    if ceiling is not None and low <= ceiling <= high:
        _, py = at(ticks[0], ceiling)
        draw.line((x0, py, x0 + width, py), fill=_GREY, width=2)
    for line in series:
        points = [at(x, y) for x, y in zip(line.xs, line.ys) if y is not None]
        if len(points) > 1:
            draw.line(points, fill=line.colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=line.colour)


def _plot_panels(
    panels: dict[str, list[Series]],
    x_label: str,
    ceiling: dict,
    path: str | os.PathLike,
    log_x: bool = False,
) -> Path:
    """Saves one PNG: a panel per metric (panels: metric -> its series, the same labels in each), the ceiling's
    value of that metric in grey, a legend underneath. Returns the path."""
    font = ImageFont.load_default()
    panel_width = _MARGIN[0] + _PANEL[0] + _MARGIN[2]
    panel_height = _MARGIN[1] + _PANEL[1] + _MARGIN[3]
    image = Image.new("RGB", (panel_width * len(panels), panel_height + 24), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for index, (metric, series) in enumerate(panels.items()):
        origin = (index * panel_width, 0)
        _draw_panel(draw, font, origin, series, metric, x_label, ceiling.get(metric), log_x)
    legend = [(s.label, s.colour) for s in next(iter(panels.values()))] + [("VAE ceiling", _GREY)]
    x = _MARGIN[0]
    for label, colour in legend:
        draw.line((x, panel_height + 10, x + 18, panel_height + 10), fill=colour, width=2)
        draw.text((x + 22, panel_height + 10), label, fill=(0, 0, 0), font=font, anchor="lm")
        x += 36 + int(draw.textlength(label, font=font))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def plot_sweep(sweep: dict, path: str | os.PathLike) -> Path:
    """Saves the sweep as one PNG: a panel per metric (full match, fidelity), a line per group against the swept
    value, the VAE ceiling in grey, a legend underneath. Returns the path."""
    panels = {
        metric: [
            Series(
                g,
                GROUP_COLOURS.get(g, (90, 90, 90)),
                sweep["values"],
                [r[g][metric] for r in sweep["results"]],
            )
            for g in sweep["results"][0]
        ]
        for metric in PLOTTED
    }
    return _plot_panels(panels, sweep["sweep"], sweep.get("vae_ceiling", {}), path)


def overall(result: dict, metric: str) -> float:
    """A metric over all the prompts of one sweep value's result ({group: scores}): the groups' scores weighted
    by their prompt counts (for full match, the fraction of all prompts that match)."""
    counts = {g: result[g]["num_prompts"] for g in result}
    return sum(result[g][metric] * n for g, n in counts.items()) / sum(counts.values())


def sampler_label(sweep: dict) -> str:
    """The sampler a sweep ran, from its settings: e.g. `dpmpp_2m karras`."""
    settings = sweep["settings"]
    return settings["sampler"] + (" karras" if settings.get("karras") else "")


def plot_sweeps(sweeps: Sequence[dict], path: str | os.PathLike) -> Path:
    """Saves several steps sweeps (one per sampler, as `run_sweep` returns them) as one PNG: a panel per metric,
    a line per sampler of that metric over all prompts (`overall`) against steps on a log scale, the first sweep's
    VAE ceiling in grey. Returns the path."""
    if not sweeps or any(s["sweep"] != sweeps[0]["sweep"] for s in sweeps):
        raise ValueError(
            "plot_sweeps: give one or more sweeps of the same setting (e.g. all --sweep steps=...)"
        )
    panels = {
        metric: [
            Series(
                sampler_label(s),
                SAMPLER_COLOURS.get(sampler_label(s), (90, 90, 90)),
                s["values"],
                [overall(r, metric) for r in s["results"]],
            )
            for s in sweeps
        ]
        for metric in PLOTTED
    }
    return _plot_panels(panels, sweeps[0]["sweep"], sweeps[0].get("vae_ceiling", {}), path, log_x=True)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m latentdiff.eval.sweep OUT.png A.json B.json ...`: plots the sweeps that `latentdiff bench --sweep
    ... --json` wrote, one line per sampler (plot_sweeps)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("plot", help="where to save the PNG")
    parser.add_argument("sweeps", nargs="+", help="JSON files written by latentdiff bench --sweep ... --json")
    args = parser.parse_args(argv)
    sweeps = [json.loads(Path(p).read_text()) for p in args.sweeps]
    print(f"saved the plot to {plot_sweeps(sweeps, args.plot)}")


if __name__ == "__main__":
    main()
