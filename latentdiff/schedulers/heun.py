"""Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, EDM, Algorithm 1).

Each interval σ_i → σ_{i+1} takes two model evaluations, so ``timesteps`` lists t_1 … t_{n−1} twice:
[t_0, t_1, t_1, t_2, t_2, …, t_{n−1}, t_{n−1}] (2n − 1 entries, one ``step`` each). Equation numbers are EDM's.

| code name          | symbol                                               | equation                                 |
|--------------------|------------------------------------------------------|------------------------------------------|
| ``derivative``     | d_i = (x_i − D(x_i; σ_i)) / σ_i                      | Algorithm 1, line 4 (eq. 3)              |
| (first stage)      | x̃_{i+1} = x_i + (σ_{i+1} − σ_i) d_i                  | line 5: an Euler step                    |
| ``derivative_next``| d'_i = (x̃_{i+1} − D(x̃_{i+1}; σ_{i+1})) / σ_{i+1}      | line 7, at the Euler step's end          |
| (second stage)     | x_{i+1} = x_i + (σ_{i+1} − σ_i) (d_i + d'_i) / 2     | line 8: the trapezoidal rule             |
| (last interval)    | x_n = x̃_n when σ_n = 0                               | line 6: d' would divide by σ_n = 0       |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from latentdiff.schedulers.base import SchedulerOutput
from latentdiff.schedulers.sigmas import KarrasScheduler, KarrasSigmasConfig, upcast


@dataclass(frozen=True)
class HeunDiscreteSchedulerConfig(KarrasSigmasConfig):
    """diffusers' HeunDiscreteScheduler keywords (its defaults: Stable Diffusion's β range) plus clipping of x̂₀.

    diffusers' Heun has no ``rescale_betas_zero_snr`` (it ignores the key); this one honours it (sigmas.py) and
    ``final_sigmas_type`` as Euler does.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample: bool = False  # clamp x̂₀ to [−clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0


class HeunDiscreteScheduler(KarrasScheduler):
    """EDM Algorithm 1 without churn (deterministic); keywords are diffusers' names."""

    config_class = HeunDiscreteSchedulerConfig
    config: HeunDiscreteSchedulerConfig
    order = 2  # model evaluations per interval

    def __init__(self, **config: Any) -> None:
        self._first_stage: tuple[Tensor, float, Tensor] | None = (
            None  # (d_i, σ_{i+1} − σ_i, x_i) between stages
        )
        super().__init__(**config)

    def _use_schedule(self, timesteps: Tensor, sigmas: Tensor, device: str | torch.device | None) -> None:
        """Every σ_i and t_i but the first twice (the second stage of one interval, the first of the next)."""
        super()._use_schedule(torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]), sigmas, device)
        self.sigmas = torch.cat([self.sigmas[:1], self.sigmas[1:-1].repeat_interleave(2), self.sigmas[-1:]])
        self._first_stage = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` starts an interval (diffusers' name)."""
        return self._first_stage is None

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One stage of Heun's step (table above).

        Args:
            model_output: the model's prediction on ``scale_model_input(sample)`` (ε, x₀ or v), (B, C, H, W).
            timestep: the next entry of ``self.timesteps``.
            sample: x_i on the first stage, x̃_{i+1} on the second, (B, C, H, W), unscaled.
            return_dict: False returns the tuple (prev_sample, pred_original_sample).

        Returns:
            ``SchedulerOutput``: after the first stage prev_sample is x̃_{i+1} (where the model is evaluated
            next), after the second x_{i+1}; pred_original_sample is D at the stage's own point.
        """
        k = self._current_index(timestep)
        sample = upcast(sample)
        if self._first_stage is None:
            sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
            denoised = self._clipped(self._denoised(model_output, sample, sigma))
            derivative = (sample - denoised) / sigma
            self._first_stage = (derivative, sigma_next - sigma, sample)
            prev_sample = sample + (sigma_next - sigma) * derivative
        else:
            sigma_next = float(self.sigmas[k])
            derivative, dt, start = self._first_stage
            denoised = self._clipped(self._denoised(model_output, sample, sigma_next))
            derivative_next = (sample - denoised) / sigma_next
            prev_sample = start + dt * (derivative + derivative_next) / 2
            self._first_stage = None
        self._index = k + 1
        return self._output(prev_sample.to(model_output.dtype), denoised, return_dict)

    def _clipped(self, denoised: Tensor) -> Tensor:
        c = self.config
        return denoised.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else denoised
