"""Pipelines over latentdiff's models: text-to-image (`LatentPipeline`, with `invert` for DDIM inversion),
image-to-image (`LatentImg2ImgPipeline`) and inpainting (`LatentInpaintPipeline`); the shared steps (prompt encoding,
the denoising loop, guidance) live in `LatentPipeline`."""

from pipelines.img2img_pipeline import LatentImg2ImgPipeline
from pipelines.inpaint_pipeline import LatentInpaintPipeline
from pipelines.latent_pipeline import LatentPipeline, PipelineOutput

__all__ = ["LatentImg2ImgPipeline", "LatentInpaintPipeline", "LatentPipeline", "PipelineOutput"]
