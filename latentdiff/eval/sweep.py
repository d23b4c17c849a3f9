"""ShapesBench sweeps: score one model at several values of one sampling setting, and plot the curves.

`latentdiff bench --sweep guidance=1.5,2,3,5,7.5` (or `steps=10,25,50,100`) generates the bench prompts once per
value, scores each group (full match and fidelity, as `shapesbench.score`), scores the detector and the VAE ceiling
once (they do not depend on the setting), and draws one PNG: a panel per metric, a line per group against the swept
value, the VAE ceiling as a grey reference line.

The plot is drawn with PIL, already a dependency: a few lines and labels do not justify matplotlib and its
compiled dependencies (about 40 MB installed) in a package meant to install and start light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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


def _y_range(values: Sequence[float], metric: str) -> tuple[float, float]:
    """Full match on [0, 1]; fidelity from the tenth below its smallest value (at most 0.8) to 1."""
    if metric == "full_match":
        return 0.0, 1.0
    low = min([0.8, *values])
    return float(int(low * 10)) / 10, 1.0


def _draw_panel(draw, font, origin, sweep: dict, metric: str) -> None:
    """One metric's panel: axes, ticks, one line per group, the VAE ceiling in grey."""
    x0, y0 = origin[0] + _MARGIN[0], origin[1] + _MARGIN[1]
    width, height = _PANEL
    values = [float(v) for v in sweep["values"]]
    groups = list(sweep["results"][0])
    series = {g: [r[g][metric] for r in sweep["results"]] for g in groups}
    ceiling = sweep.get("vae_ceiling", {}).get(metric)
    low, high = _y_range([v for s in series.values() for v in s if v is not None], metric)
    x_low, x_high = min(values), max(values)

    def at(x: float, y: float) -> tuple[float, float]:
        fx = 0.5 if x_high == x_low else (x - x_low) / (x_high - x_low)
        return x0 + 8 + fx * (width - 16), y0 + height - (y - low) / (high - low) * height

    draw.rectangle((x0, y0, x0 + width, y0 + height), outline=(0, 0, 0))
    for k in range(6):  # y ticks and grid
        y = low + k * (high - low) / 5
        _, py = at(x_low, y)
        draw.line((x0, py, x0 + width, py), fill=(225, 225, 225))
        draw.text((x0 - 6, py), f"{y:.2f}", fill=(0, 0, 0), font=font, anchor="rm")
    for x in values:  # x ticks at the swept values
        px, _ = at(x, low)
        draw.line((px, y0 + height, px, y0 + height + 4), fill=(0, 0, 0))
        draw.text((px, y0 + height + 6), f"{x:g}", fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((x0 + width / 2, y0 + height + 22), sweep["sweep"], fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((x0 + width / 2, y0 - 8), metric.replace("_", " "), fill=(0, 0, 0), font=font, anchor="mb")
    if ceiling is not None and low <= ceiling <= high:
        _, py = at(x_low, ceiling)
        draw.line((x0, py, x0 + width, py), fill=(150, 150, 150), width=2)
    for group, ys in series.items():
        points = [at(x, y) for x, y in zip(values, ys) if y is not None]
        colour = GROUP_COLOURS.get(group, (90, 90, 90))
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)


def plot_sweep(sweep: dict, path: str | os.PathLike) -> Path:
    """Saves the sweep as one PNG: a panel per metric (full match, fidelity), a line per group against the swept
    value, the VAE ceiling in grey, a legend underneath. Returns the path."""
    font = ImageFont.load_default()
    panel_width = _MARGIN[0] + _PANEL[0] + _MARGIN[2]
    panel_height = _MARGIN[1] + _PANEL[1] + _MARGIN[3]
    image = Image.new("RGB", (panel_width * len(PLOTTED), panel_height + 24), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for index, metric in enumerate(PLOTTED):
        _draw_panel(draw, font, (index * panel_width, 0), sweep, metric)
    legend = [(g, GROUP_COLOURS.get(g, (90, 90, 90))) for g in sweep["results"][0]]
    legend.append(("VAE ceiling", (150, 150, 150)))
    x = _MARGIN[0]
    for label, colour in legend:
        draw.line((x, panel_height + 10, x + 18, panel_height + 10), fill=colour, width=2)
        draw.text((x + 22, panel_height + 10), label, fill=(0, 0, 0), font=font, anchor="lm")
        x += 36 + int(draw.textlength(label, font=font))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
