"""Samplers over the noise schedule, under diffusers' class names and interface.

DDPM (Ho et al. 2020), DDIM (Song et al. 2021), Euler, Euler ancestral and Heun (Karras et al. 2022), DPM-Solver++
2M and its SDE variant (Lu et al. 2022). ``registry`` maps the CLI's short names to them.
"""

from latentdiff.schedulers.base import SchedulerConfig, SchedulerOutput
from latentdiff.schedulers.ddim import DDIMScheduler, DDIMSchedulerConfig
from latentdiff.schedulers.ddpm import DDPMScheduler, DDPMSchedulerConfig
from latentdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig
from latentdiff.schedulers.euler import (
    EulerAncestralDiscreteScheduler,
    EulerAncestralDiscreteSchedulerConfig,
    EulerDiscreteScheduler,
    EulerDiscreteSchedulerConfig,
)
from latentdiff.schedulers.heun import HeunDiscreteScheduler, HeunDiscreteSchedulerConfig
from latentdiff.schedulers.registry import SAMPLERS, check_sampler, sampler_from_config

__all__ = [
    "SAMPLERS",
    "DDIMScheduler",
    "DDIMSchedulerConfig",
    "DDPMScheduler",
    "DDPMSchedulerConfig",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepSchedulerConfig",
    "EulerAncestralDiscreteScheduler",
    "EulerAncestralDiscreteSchedulerConfig",
    "EulerDiscreteScheduler",
    "EulerDiscreteSchedulerConfig",
    "HeunDiscreteScheduler",
    "HeunDiscreteSchedulerConfig",
    "SchedulerConfig",
    "SchedulerOutput",
    "check_sampler",
    "sampler_from_config",
]
