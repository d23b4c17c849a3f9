"""DDIM sampling (Song et al. 2021) and its deterministic inversion x₀ → x_T.

One step goes from x_t to x_{t'}, t' the previous timestep in ``scheduler.timesteps``. Song et al. write α_t for
what Ho et al. and this code call ᾱ_t; equation numbers are Song et al.'s.

| code name                 | symbol                                              | equation                                  |
|---------------------------|-----------------------------------------------------|-------------------------------------------|
| ``alpha_prod_t``          | ᾱ_t                                                 | q(x_t ∣ x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I)     |
| ``alpha_prod_t_prev``     | ᾱ_{t'}; after the last step ``final_alpha_cumprod`` | 1 if ``set_alpha_to_one`` else ᾱ_0        |
| ``pred_original_sample``  | x̂₀ = f_θ(x_t)                                       | eq. 9, "predicted x₀" of eq. 12           |
| ``pred_epsilon``          | ε̂ = ε_θ(x_t)                                        | eq. 12                                    |
| ``variance``              | σ_t(1)² = (1 − ᾱ_{t'})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t'}) | eq. 16 at η = 1: DDPM's β̃_t               |
| ``std_dev_t``             | σ_t(η) = η σ_t(1)                                   | eq. 16                                    |
| ``pred_sample_direction`` | √(1 − ᾱ_{t'} − σ_t²) ε̂                              | eq. 12, "direction pointing to x_t"       |
| ``prev_sample``           | x_{t'} = √ᾱ_{t'} x̂₀ + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z | eq. 12                                   |
| ``invert_step``           | x_t = √ᾱ_t x̂₀ + √(1 − ᾱ_t) ε̂, x̂₀ and ε̂ from x_{t'}   | eq. 12 at η = 0 solved for x_t (§4.3, eq. 13) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from latentdiff.schedulers.base import Scheduler, SchedulerConfig, SchedulerOutput


@dataclass(frozen=True)
class DDIMSchedulerConfig(SchedulerConfig):
    """diffusers' DDIMScheduler keywords: the shared ones plus ``set_alpha_to_one``."""

    # ᾱ after the last step: 1 (x₀ exactly) or ᾱ_0 (Stable Diffusion uses False)
    set_alpha_to_one: bool = True


class DDIMScheduler(Scheduler):
    """Song et al. 2021's sampler (η = 0: deterministic; η = 1: DDPM's posterior variance) and its inversion.

    Keywords are diffusers' names. Unlike diffusers' DDIMScheduler, the previous timestep is read from
    ``self.timesteps`` rather than recomputed as t − T // n; the two agree for ``leading`` spacing and for
    ``trailing`` spacing when n divides T, and differ for ``linspace`` and for ``trailing`` with other n
    (diffusers issues #12633, #11347), where diffusers evaluates ᾱ at a timestep the next step does not use.
    """

    config_class = DDIMSchedulerConfig
    config: DDIMSchedulerConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

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
        """One DDIM step x_t → x_{t'} (eq. 12, table above).

        Args:
            model_output: the model's prediction on ``sample`` (ε, x₀ or v per ``prediction_type``),
                shape (B, C, H, W).
            timestep: t, one of ``self.timesteps``.
            sample: x_t, shape (B, C, H, W).
            eta: η >= 0 of eq. 16; 0 is deterministic, 1 has DDPM's posterior variance.
            generator: draws z when η > 0 and ``variance_noise`` is not given.
            variance_noise: z ~ N(0, I), shape of ``sample``, for reproducible sampling (used when η > 0).
            return_dict: False returns the tuple (prev_sample, pred_original_sample).

        Returns:
            ``SchedulerOutput(prev_sample=x_{t'}, pred_original_sample=x̂₀)``, dtype and device of ``sample``.
        """
        self._check_noise_arguments(eta, sample, generator, variance_noise)
        prev_timestep = self.previous_timestep(timestep)

        alpha_prod_t = self._alpha_prod(int(timestep))
        alpha_prod_t_prev = self._alpha_prod(prev_timestep)

        pred_original_sample, pred_epsilon = self._predict_original_and_epsilon(
            model_output, sample, alpha_prod_t
        )
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * math.sqrt(variance)
        direction_variance = 1 - alpha_prod_t_prev - std_dev_t**2
        if direction_variance < -1e-12:  # only η > 1 gets here; rounding alone stays above this
            raise ValueError(
                f"eta={eta} is too large at timestep {int(timestep)}: σ_t(η)² exceeds 1 − ᾱ_prev; use eta <= 1."
            )
        pred_sample_direction = math.sqrt(max(direction_variance, 0.0)) * pred_epsilon
        prev_sample = math.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        if eta > 0:
            prev_sample = prev_sample + std_dev_t * self._noise_like(sample, generator, variance_noise)

        return self._output(prev_sample, pred_original_sample, return_dict)

    def invert_step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> SchedulerOutput:
        """One deterministic step up the chain, x_{t'} → x_t: the η = 0 step of eq. 12 solved for x_t.

        The inversion loop visits the timesteps in ascending order, starting from x₀ (Song et al. §4.3, §5.4)::

            scheduler.set_timesteps(50)
            latents = x0
            for t in scheduler.timesteps.flip(0):              # τ_n < … < τ_1
                model_output = model(latents, t)               # evaluated at the step's noisier end t
                latents = scheduler.invert_step(model_output, t, latents).prev_sample
            # latents is x_{τ_1}; sampling with step() from there returns to x0

        x̂₀ and ε̂ are read from the model output as if it were made on ``sample`` at its own noise level ᾱ_{t'};
        then x_t = √ᾱ_t x̂₀ + √(1 − ᾱ_t) ε̂. When ε̂ does not depend on the sample this undoes :meth:`step` (η = 0)
        exactly; for a real model it is the usual approximation ε̂(x_t) ≈ ε̂(x_{t'}). x̂₀ is never clipped or
        thresholded here: a clipped x̂₀ could not be inverted.

        Args:
            model_output: the model's prediction on ``sample`` at ``timestep``, shape (B, C, H, W).
            timestep: t, one of ``self.timesteps``: the noise level this step reaches.
            sample: x_{t'} at the previous timestep of t (x₀, at ``final_alpha_cumprod``, for the last one).

        Returns:
            ``SchedulerOutput(prev_sample=x_t, pred_original_sample=x̂₀)``: ``prev_sample`` is the sample the loop
            carries on with, named as in :meth:`step` so that both loops read alike.
        """
        prev_timestep = self.previous_timestep(timestep)
        alpha_prod_t = self._alpha_prod(int(timestep))
        alpha_prod_t_prev = self._alpha_prod(prev_timestep)
        if self.config.prediction_type == "sample" and alpha_prod_t_prev == 1.0:
            raise ValueError(
                "prediction_type='sample' cannot be inverted from x₀ itself: ε̂ = (x − √ᾱ x̂₀)/√(1 − ᾱ) is 0/0 at "
                "ᾱ = 1. Use set_alpha_to_one=False (start from ᾱ_0 < 1)."
            )
        pred_original_sample, pred_epsilon = self._predict_original_and_epsilon(
            model_output, sample, alpha_prod_t_prev
        )
        next_sample = (
            math.sqrt(alpha_prod_t) * pred_original_sample + math.sqrt(1 - alpha_prod_t) * pred_epsilon
        )
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=pred_original_sample)
