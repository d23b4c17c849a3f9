"""Sampler names: the CLI's short names and diffusers' class names, mapped to this project's samplers.

| name           | class                              | settings                                   |
|----------------|------------------------------------|--------------------------------------------|
| ``ddim``       | DDIMScheduler                      | η from the caller (0: deterministic)        |
| ``ddpm``       | DDPMScheduler                      |                                            |
| ``euler``      | EulerDiscreteScheduler             | Karras sigmas optional                     |
| ``euler_a``    | EulerAncestralDiscreteScheduler    |                                            |
| ``heun``       | HeunDiscreteScheduler              | Karras sigmas optional                     |
| ``dpmpp_2m``   | DPMSolverMultistepScheduler        | algorithm_type dpmsolver++, order 2; Karras optional |
| ``dpmpp_2m_sde`` | DPMSolverMultistepScheduler      | algorithm_type sde-dpmsolver++, order 2; Karras optional |
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from latentdiff.schedulers.base import Scheduler
from latentdiff.schedulers.ddim import DDIMScheduler
from latentdiff.schedulers.ddpm import DDPMScheduler
from latentdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
from latentdiff.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from latentdiff.schedulers.heun import HeunDiscreteScheduler

logger = logging.getLogger(__name__)

# diffusers' class name -> this project's class of that name
SCHEDULER_CLASSES: dict[str, type[Scheduler]] = {
    cls.__name__: cls
    for cls in (
        DDIMScheduler,
        DDPMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
    )
}

# short name -> (class, the config values that make it that sampler)
SAMPLERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}
KARRAS_SAMPLERS = tuple(
    name
    for name, (cls, _) in SAMPLERS.items()
    if "use_karras_sigmas" in cls.config_class.__dataclass_fields__
)

# folder configs written for these diffusers classes read as this project's DDIM (same training-schedule keys)
DDIM_READERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")


def check_sampler(name: str, karras: bool = False) -> None:
    """A ValueError naming the argument when ``name`` is unknown or takes no Karras sigmas."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is unknown; choose one of {', '.join(SAMPLERS)}.")
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(
            f"karras=True: sampler {name!r} has no Karras sigmas; use one of {', '.join(KARRAS_SAMPLERS)}, "
            "or drop karras."
        )


def sampler_from_config(name: str, config: Mapping[str, Any], karras: bool = False) -> Scheduler:
    """The sampler ``name`` (table above) built on another scheduler's config (its training schedule).

    Args:
        name: one of ``SAMPLERS``.
        config: a scheduler config (this project's or diffusers'), e.g. ``pipe.scheduler.config``.
        karras: space σ by Karras et al. 2022 eq. 5 (euler, heun, dpmpp_2m, dpmpp_2m_sde only).
    """
    check_sampler(name, karras)
    cls, settings = SAMPLERS[name]
    if "use_karras_sigmas" in cls.config_class.__dataclass_fields__:
        settings = {**settings, "use_karras_sigmas": karras}
    return cls.from_config(config, **settings)


def choose_sampler(scheduler: Any, name: str | None = None, karras: bool = False) -> Any:
    """The sampler to run: ``name`` built on ``scheduler``'s config, or ``scheduler`` itself when ``name`` is None
    (switched to Karras sigmas when ``karras``, if its class has them).

    Args:
        scheduler: the model's sampler (this project's or diffusers'), e.g. ``pipe.scheduler``.
        name: one of ``SAMPLERS``, or None for the model's own.
        karras: space σ by Karras et al. 2022 eq. 5.
    """
    if name is not None:
        return sampler_from_config(name, scheduler.config, karras)
    if not karras:
        return scheduler
    if "use_karras_sigmas" not in scheduler.config:
        raise ValueError(
            f"karras=True: the model's sampler {type(scheduler).__name__} has no Karras sigmas; choose a sampler "
            f"that has them ({', '.join(KARRAS_SAMPLERS)})."
        )
    return type(scheduler).from_config(scheduler.config, use_karras_sigmas=True)


def scheduler_from_folder_config(config: Mapping[str, Any]) -> Scheduler:
    """This project's sampler for a folder's ``scheduler_config.json``, by its ``_class_name``.

    Euler, Euler ancestral, Heun and DPM-Solver multistep configs load the sampler of that name; DDIM, DDPM and
    PNDM (what Stable Diffusion folders ship) load DDIM, as does any other class (with a warning). DDIM gets
    ``clip_sample=False`` when the config does not set it: clamping x̂₀ to [-1, 1] is meant for pixels, and SD's
    latents are not bounded by 1 (PNDM configs never carry the key; diffusers' StableDiffusionPipeline forces it
    off as well). An explicit ``clip_sample: true`` is kept here; ``LatentPipeline`` turns it off as diffusers'
    pipeline does.
    """
    written_for = config.get("_class_name", "an unnamed scheduler")
    if written_for in SCHEDULER_CLASSES and written_for not in DDIM_READERS:
        return SCHEDULER_CLASSES[written_for].from_config(config)
    if written_for not in DDIM_READERS:
        logger.warning(
            "the scheduler config names %s, which this project does not build; it is read as DDIMScheduler (the "
            "training schedule keys are the same). Pass scheduler=... to choose another sampler.",
            written_for,
        )
    return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))
