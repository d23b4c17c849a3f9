"""Pipelines over latentdiff's models: `LatentPipeline` (text-to-image)."""

from pipelines.latent_pipeline import LatentPipeline, PipelineOutput

__all__ = ["LatentPipeline", "PipelineOutput"]
