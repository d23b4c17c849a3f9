"""DDPM ancestral sampling (Ho et al. 2020), on the full chain or a sub-sequence of it.

One step goes from x_t to x_{t'}, t' the previous timestep in ``scheduler.timesteps`` (t' = t − 1 on the full
chain). Equation numbers are Ho et al. 2020's; their t is our t + 1 (our timesteps start at 0).

| code name                    | symbol                                | equation                                         |
|------------------------------|---------------------------------------|--------------------------------------------------|
| ``alpha_prod_t``             | ᾱ_t                                   | eq. 4: q(x_t ∣ x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I)     |
| ``alpha_prod_t_prev``        | ᾱ_{t'}                                | 1 after the last step: x₀ carries no noise       |
| ``current_alpha_t``          | α_t = ᾱ_t / ᾱ_{t'}                    | the step's α (α_t itself on the full chain)      |
| ``current_beta_t``           | β_t = 1 − α_t                         | the step's β                                     |
| ``pred_original_sample``     | x̂₀                                    | eq. 15, from the model output (base.py)          |
| ``pred_original_sample_coeff`` | √ᾱ_{t'} β_t / (1 − ᾱ_t)            | eq. 7, μ̃_t's weight on x₀                        |
| ``current_sample_coeff``     | √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t)         | eq. 7, μ̃_t's weight on x_t                       |
| ``posterior_variance``       | β̃_t = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t  | eq. 7                                            |
| ``variance``                 | σ_t² = β̃_t or β_t                     | §3.2: fixed_small or fixed_large                 |
| ``prev_sample``              | x_{t'} = μ̃_t(x_t, x̂₀) + σ_t z         | eq. 6; Algorithm 2 (z = 0 on the last step)      |

With an unclipped ε-prediction, μ̃_t(x_t, x̂₀) equals eq. 11, (x_t − β_t / √(1 − ᾱ_t) · ε̂) / √α_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from latentdiff.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput, require_choice

# The "_log" names sample with the same σ_t² as their plain names (σ_t = exp(½ log σ_t²)); they exist so that
# diffusers configs load. Learned variances ("learned", "learned_range") need a model that predicts them.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


@dataclass(frozen=True)
class DDPMSchedulerConfig(SchedulerConfig):
    """diffusers' DDPMScheduler keywords: the shared ones plus ``variance_type``."""

    variance_type: str = "fixed_small"  # σ_t² = β̃_t (fixed_small) or β_t (fixed_large), Ho et al. §3.2

    def validate(self) -> None:
        super().validate()
        require_choice("variance_type", self.variance_type, VARIANCE_TYPES)


class DDPMScheduler(Scheduler):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2) over ``timesteps``; keywords are diffusers' names.

    Differences from diffusers' DDPMScheduler, on purpose:
      * the step that returns x₀ adds no noise (Algorithm 2: z = 0 at the end), whatever the last timestep is;
        diffusers adds noise whenever t > 0, which with ``fixed_large`` and ``trailing`` spacing (last t = 99 for
        10 steps) or ``steps_offset=1`` puts σ = √β_t noise into the final sample;
      * ``fixed_large_log`` samples with σ_t² = β_t (diffusers takes the square root of log β_t, a NaN).

    As in diffusers, ``set_timesteps(timesteps=[…])`` takes custom timesteps, and a scheduler on which
    ``set_timesteps`` was never called steps over the whole training chain.
    """

    config_class = DDPMSchedulerConfig
    config: DDPMSchedulerConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        # as diffusers: before set_timesteps, step walks the whole training chain T−1, …, 0
        self._use_timesteps(list(range(self.config.num_train_timesteps - 1, -1, -1)))

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One ancestral step x_t → x_{t'} (table above).

        Args:
            model_output: the model's prediction on ``sample`` (ε, x₀ or v per ``prediction_type``),
                shape (B, C, H, W).
            timestep: t, one of ``self.timesteps``.
            sample: x_t, shape (B, C, H, W).
            eta: accepted so that one loop drives DDPM and DDIM; DDPM's noise is set by ``variance_type`` and
                ``eta`` is not used (it must still be >= 0).
            generator: draws z when ``variance_noise`` is not given.
            variance_noise: z ~ N(0, I), shape of ``sample``, for reproducible sampling; not used on the last step.
            return_dict: False returns the tuple (prev_sample, pred_original_sample).

        Returns:
            ``SchedulerOutput(prev_sample=x_{t'}, pred_original_sample=x̂₀)``, dtype and device of ``sample``.
        """
        self._check_noise_arguments(eta, sample, generator, variance_noise)
        prev_timestep = self.previous_timestep(timestep)

        alpha_prod_t = self._alpha_prod(int(timestep))
        alpha_prod_t_prev = self._alpha_prod(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        pred_original_sample, _ = self._predict_original_and_epsilon(model_output, sample, alpha_prod_t)
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        # μ̃_t(x_t, x̂₀), eq. 7
        pred_original_sample_coeff = math.sqrt(alpha_prod_t_prev) * current_beta_t / beta_prod_t
        current_sample_coeff = math.sqrt(current_alpha_t) * (1 - alpha_prod_t_prev) / beta_prod_t
        prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        if prev_timestep >= 0:  # Algorithm 2: z = 0 on the step that returns x₀
            posterior_variance = (1 - alpha_prod_t_prev) / beta_prod_t * current_beta_t
            variance = (
                posterior_variance if self.config.variance_type.startswith("fixed_small") else current_beta_t
            )
            noise = self._noise_like(sample, generator, variance_noise)
            prev_sample = prev_sample + math.sqrt(variance) * noise

        return self._output(prev_sample, pred_original_sample, return_dict)
