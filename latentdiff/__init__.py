"""latentdiff: latent text-to-image diffusion with a from-scratch noise schedule, samplers and UNet.

The library is importable with no side effects: no I/O, no environment reads, no device choice at import.
Public names are imported lazily so that `latentdiff --version` does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "DDPMScheduler": "latentdiff.schedulers",
    "DDIMScheduler": "latentdiff.schedulers",
    "EulerDiscreteScheduler": "latentdiff.schedulers",
    "EulerAncestralDiscreteScheduler": "latentdiff.schedulers",
    "HeunDiscreteScheduler": "latentdiff.schedulers",
    "DPMSolverMultistepScheduler": "latentdiff.schedulers",
    "ConditionalUNet": "latentdiff.models.unet",
    "UNetConfig": "latentdiff.models.unet",
    "ControlNetModel": "latentdiff.models.controlnet",
    # The pipeline lives in the top-level `pipelines` package (it imports latentdiff, never the reverse at import
    # time); it is re-exported here lazily for `from latentdiff import LatentPipeline`.
    "LatentPipeline": "pipelines.latent_pipeline",
    "LatentImg2ImgPipeline": "pipelines.img2img_pipeline",
    "LatentInpaintPipeline": "pipelines.inpaint_pipeline",
    "ControlNetPipeline": "pipelines.controlnet",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
