"""Sampling settings that travel with a model: `sampling_settings.json` at the root of a model folder.

A model is measured best at some sampler, step count and guidance scale (the embedded default: by a ShapesBench
sweep). The folder carries them so that `LatentPipeline.from_pretrained(folder)("a prompt")` and
`latentdiff generate --model folder` use them when the caller sets none:

    {"sampler": "ddim", "num_inference_steps": 25, "guidance_scale": 3.0}

Every key is optional. Precedence, per setting: an explicit argument, then the folder's file, then diffusers'
defaults (DIFFUSERS_DEFAULTS: 50 steps, guidance 7.5, the sampler the folder's scheduler config names). A folder
without the file behaves exactly as in diffusers; a file that cannot be read is an error naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SETTINGS_FILE = "sampling_settings.json"


@dataclass(frozen=True)
class SamplingSettings:
    """Recommended sampling settings; None leaves a setting to the next source (see the module docstring).

    sampler: a sampler name ("ddim", "ddpm"; the pipeline checks it); num_inference_steps: an int >= 1;
    guidance_scale: classifier-free guidance w (<= 1: off).
    """

    sampler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        problem = _problem(asdict(self))
        if problem:
            raise ValueError(f"SamplingSettings: {problem}")

    def to_dict(self) -> dict[str, str | int | float]:
        """The settings that are set, as written to the file."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def _problem(values: dict) -> str | None:
    """What is wrong with a settings dict, or None."""
    unknown = sorted(set(values) - set(SamplingSettings.__dataclass_fields__))
    if unknown:
        return f"unknown keys {unknown}; the keys are sampler, num_inference_steps and guidance_scale"
    sampler, steps, guidance = (values.get(k) for k in ("sampler", "num_inference_steps", "guidance_scale"))
    if sampler is not None and (not isinstance(sampler, str) or not sampler):
        return f"sampler={sampler!r} must be a sampler name such as 'ddim'"
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        return f"num_inference_steps={steps!r} must be an int >= 1"
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
        return f"guidance_scale={guidance!r} must be a number"
    return None


# diffusers' StableDiffusionPipeline defaults: what a folder without the file gets (its scheduler config's sampler)
DIFFUSERS_DEFAULTS = SamplingSettings(num_inference_steps=50, guidance_scale=7.5)


def read_sampling_settings(model_dir: str | os.PathLike) -> SamplingSettings:
    """The settings a model folder carries; empty SamplingSettings() when it has no SETTINGS_FILE.

    Raises ValueError naming the file when it is not a JSON object of the known keys with valid values.
    """
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return SamplingSettings()
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); write e.g. "
            '{"sampler": "ddim", "num_inference_steps": 25, "guidance_scale": 3.0}, or delete it to use '
            "diffusers' defaults."
        ) from None
    problem = "it must hold a JSON object" if not isinstance(values, dict) else _problem(values)
    if problem:
        raise ValueError(f"{path}: {problem}; fix the file or delete it to use diffusers' defaults.")
    if isinstance(values.get("guidance_scale"), int):
        values["guidance_scale"] = float(values["guidance_scale"])
    return SamplingSettings(**values)


def write_sampling_settings(model_dir: str | os.PathLike, settings: SamplingSettings) -> Path:
    """Writes SETTINGS_FILE into a model folder (the folder must exist). Returns its path."""
    path = Path(model_dir) / SETTINGS_FILE
    path.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return path
