"""Pipelines over latentdiff's models: text-to-image (`LatentPipeline`, with `invert` for DDIM inversion),
image-to-image (`LatentImg2ImgPipeline`), inpainting (`LatentInpaintPipeline`) and spatial control
(`ControlNetPipeline`); the shared steps (prompt encoding, the denoising loop, guidance) live in `LatentPipeline`.

Names are imported lazily, so that `latentdiff generate` (which needs `pipelines.latent_pipeline` only) does not
import the others."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "ControlNetPipeline": "pipelines.controlnet",
    "LatentImg2ImgPipeline": "pipelines.img2img_pipeline",
    "LatentInpaintPipeline": "pipelines.inpaint_pipeline",
    "LatentPipeline": "pipelines.latent_pipeline",
    "PipelineOutput": "pipelines.latent_pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
