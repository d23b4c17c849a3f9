"""Samplers over the noise schedule: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), with diffusers' interface."""

from latentdiff.schedulers.base import SchedulerConfig, SchedulerOutput
from latentdiff.schedulers.ddim import DDIMScheduler, DDIMSchedulerConfig
from latentdiff.schedulers.ddpm import DDPMScheduler, DDPMSchedulerConfig

__all__ = [
    "DDIMScheduler",
    "DDIMSchedulerConfig",
    "DDPMScheduler",
    "DDPMSchedulerConfig",
    "SchedulerConfig",
    "SchedulerOutput",
]
