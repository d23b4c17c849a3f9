"""Pipelines over latentdiff's models: text-to-image (`LatentPipeline`, with `invert` for DDIM inversion),
image-to-image (`LatentImg2ImgPipeline`), inpainting (`LatentInpaintPipeline`) and spatial control
(`ControlNetPipeline`); the shared steps (prompt encoding, the denoising loop, guidance) live in `LatentPipeline`."""

from pipelines.controlnet import ControlNetPipeline
from pipelines.img2img_pipeline import LatentImg2ImgPipeline
from pipelines.inpaint_pipeline import LatentInpaintPipeline
from pipelines.latent_pipeline import LatentPipeline, PipelineOutput

__all__ = [
    "ControlNetPipeline",
    "LatentImg2ImgPipeline",
    "LatentInpaintPipeline",
    "LatentPipeline",
    "PipelineOutput",
]
