"""Pipelines over latentdiff's models: `LatentPipeline` (text-to-image) and `ControlNetPipeline` (with spatial
conditions)."""

from pipelines.controlnet import ControlNetPipeline
from pipelines.latent_pipeline import LatentPipeline, PipelineOutput

__all__ = ["ControlNetPipeline", "LatentPipeline", "PipelineOutput"]
