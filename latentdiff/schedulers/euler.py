"""Euler's method on the probability-flow ODE (Karras et al. 2022, EDM) and its ancestral variant.

One step goes from σ_i to σ_{i+1} (sigmas.py: x = x_t/√ᾱ_t, σ² = (1 − ᾱ)/ᾱ). Equation numbers are EDM's.

| code name              | symbol                                         | equation                                        |
|------------------------|------------------------------------------------|-------------------------------------------------|
| ``sigma``              | σ_i                                            | the current noise level                         |
| ``gamma``              | γ_i = min(S_churn/n, √2 − 1) on [S_tmin, S_tmax] | Algorithm 2, line 4 ("churn": noise added back) |
| ``sigma_hat``          | σ̂_i = (1 + γ_i) σ_i                            | Algorithm 2, line 5                             |
| (churned sample)       | x̂_i = x_i + √(σ̂_i² − σ_i²) S_noise z           | Algorithm 2, line 6                             |
| ``derivative``         | d_i = (x̂_i − D(x̂_i; σ̂_i)) / σ̂_i                | Algorithm 2, line 7 (eq. 3)                     |
| ``prev_sample``        | x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i) d_i             | Algorithm 2, line 8: one Euler step             |
| ``sigma_up``           | σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²)    | ancestral: the DDPM posterior's noise (η = 1)   |
| ``sigma_down``         | σ_down = √(σ_{i+1}² − σ_up²)                   | ancestral: deterministic part of the step       |
| (ancestral step)       | x_{i+1} = x_i + (σ_down − σ_i) d_i + σ_up z    | Euler to σ_down, then fresh noise up to σ_{i+1} |

With ε-prediction, d_i = ε̂ and the Euler step x_{i+1} = x_i + (σ_{i+1} − σ_i) ε̂ is DDIM's η = 0 step written for x
(Song et al. 2021 eq. 14); the ancestral step draws the noise DDIM's η = 1 would (σ_up² + σ_down² = σ_{i+1}², and
σ_down = σ_{i+1}² / σ_i is the posterior mean's noise level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from latentdiff.schedulers.base import SchedulerOutput
from latentdiff.schedulers.sigmas import KarrasScheduler, KarrasSigmasConfig, SigmaSchedulerConfig, upcast


@dataclass(frozen=True)
class EulerDiscreteSchedulerConfig(KarrasSigmasConfig):
    """diffusers' EulerDiscreteScheduler keywords (Karras sigmas, final σ); its exponential/beta sigmas are not
    built."""


class EulerDiscreteScheduler(KarrasScheduler):
    """EDM Algorithm 2 with Euler steps only (no Heun correction); churn off by default: then deterministic.

    Keywords are diffusers' names. diffusers' ``trailing`` spacing yields n + 1 timesteps for some n (e.g. 61);
    this one keeps n.
    """

    config_class = EulerDiscreteSchedulerConfig
    config: EulerDiscreteSchedulerConfig

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One Euler step σ_i → σ_{i+1} (table above).

        Args:
            model_output: the model's prediction on ``scale_model_input(sample)`` (ε, x₀ or v), (B, C, H, W).
            timestep: t_i, the next entry of ``self.timesteps``.
            sample: x_i, (B, C, H, W), unscaled (x_T = ``init_noise_sigma`` · z).
            s_churn, s_tmin, s_tmax, s_noise: EDM's S_churn (total churn over the n steps), S_tmin, S_tmax
                (σ range where churn applies) and S_noise (noise inflation); S_churn = 0 is plain Euler.
            generator: draws the churn noise z (only when γ_i > 0).
            return_dict: False returns the tuple (prev_sample, pred_original_sample).

        Returns:
            ``SchedulerOutput(prev_sample=x_{i+1}, pred_original_sample=D(x̂_i; σ̂_i))``, dtype of ``model_output``.
        """
        i = self._current_index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        gamma = min(s_churn / (len(self.sigmas) - 1), math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        sample = upcast(sample)
        if gamma > 0:
            noise = self._noise_like(model_output, generator, None)
            sample = sample + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise
        denoised = self._denoised(model_output, sample, sigma_hat)
        derivative = (sample - denoised) / sigma_hat
        prev_sample = sample + (sigma_next - sigma_hat) * derivative
        self._index = i + 1
        return self._output(prev_sample.to(model_output.dtype), denoised, return_dict)


@dataclass(frozen=True)
class EulerAncestralDiscreteSchedulerConfig(SigmaSchedulerConfig):
    """diffusers' EulerAncestralDiscreteScheduler keywords (it has no Karras sigmas)."""


class EulerAncestralDiscreteScheduler(KarrasScheduler):
    """Euler steps down to σ_down, then fresh noise σ_up z (table above); keywords are diffusers' names."""

    config_class = EulerAncestralDiscreteSchedulerConfig
    config: EulerAncestralDiscreteSchedulerConfig

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One ancestral step σ_i → σ_{i+1} (table above).

        Args:
            model_output: the model's prediction on ``scale_model_input(sample)`` (ε, x₀ or v), (B, C, H, W).
            timestep: t_i, the next entry of ``self.timesteps``.
            sample: x_i, (B, C, H, W), unscaled.
            generator: draws z when ``variance_noise`` is not given (a list: one generator per sample).
            variance_noise: z ~ N(0, I), shape of ``sample``.
            return_dict: False returns the tuple (prev_sample, pred_original_sample).

        Returns:
            ``SchedulerOutput(prev_sample=x_{i+1}, pred_original_sample=D(x_i; σ_i))``, dtype of ``model_output``.
        """
        self._check_noise_arguments(0.0, sample, generator, variance_noise)
        i = self._current_index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        sample = upcast(sample)
        denoised = self._denoised(model_output, sample, sigma)
        derivative = (sample - denoised) / sigma
        prev_sample = sample + (sigma_down - sigma) * derivative
        noise = self._noise_like(model_output, generator, variance_noise)
        prev_sample = prev_sample + sigma_up * noise
        self._index = i + 1
        return self._output(prev_sample.to(model_output.dtype), denoised, return_dict)
