"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): the multistep 2nd-order solver "2M" and its SDE variant.

DPM-Solver++ integrates the diffusion ODE exactly in its linear part and approximates the data prediction x̂₀ by a
polynomial in λ = log(α/σ), the half log-SNR. It carries the VP sample x_t (unscaled model input, x_T = z). With
sigmas.py's σ_i (VE noise level): α_i = 1/√(1 + σ_i²), σ_i^{VP} = σ_i α_i, λ_i = −log σ_i. Equation numbers are
Lu et al. 2022's (DPM-Solver++); the SDE variant is their §4's SDE-DPM-Solver++ (diffusers' ``sde-dpmsolver++``).

| code name          | symbol                                          | equation                                            |
|--------------------|-------------------------------------------------|-----------------------------------------------------|
| ``alpha_t``, ``sigma_t`` | α_{i+1}, σ_{i+1} (VP)                     | target noise level of the step                      |
| ``h``              | h_i = λ_{i+1} − λ_i                             | step size in λ                                      |
| ``denoised``       | D_i = x̂₀(x_i, t_i)                              | eq. 8: the data-prediction model                    |
| ``r``              | r_i = h_{i−1} / h_i                             | Algorithm 2                                         |
| ``D1``             | (D_i − D_{i−1}) / r_i                           | first difference, per unit h                        |
| ``eta``            | η = 0 (ODE) or 1 (SDE)                          | how much of the step's noise is fresh               |
| ``phi``            | φ = 1 − e^{−(1+η) h}                            | exact integral of the linear part                   |
| ``prev_sample``    | x_{i+1} = (σ_{i+1}/σ_i) e^{−ηh} x_i + α_{i+1} φ D_i + α_{i+1} c D1 + σ_{i+1} √(1 − e^{−2ηh}) z | eq. 9 (η = 0, c = 0: DPM-Solver++(1), i.e. DDIM) |
| ``c``              | φ/2 (``midpoint``) or 1 − φ/((1+η) h) (``heun``) | Algorithm 2 (2M): D_i + D1/2 · … ; the ``heun`` form is its Taylor variant |

The first step has no D_{i−1} and is first order; so is the last step when it lands on σ = 0 (``final_sigmas_type``
zero), and, with ``lower_order_final``, every last step of a schedule under 15 steps (diffusers' rule: it
stabilises few-step sampling). Unlike Euler, the timesteps are integers (diffusers rounds them), and ``linspace``
and ``leading`` spacing are diffusers' DPM variants, which divide [0, T) into n + 1 parts and drop the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from latentdiff.schedulers.base import SchedulerOutput, dynamic_threshold, require_choice
from latentdiff.schedulers.sigmas import (
    KarrasSigmasConfig,
    SigmaScheduler,
    karras_sigmas,
    sigma_to_timestep,
    upcast,
)

ALGORITHM_TYPES = (
    "dpmsolver++",
    "sde-dpmsolver++",
)  # data prediction; diffusers' noise-prediction ones are not built
SOLVER_TYPES = ("midpoint", "heun")
SOLVER_ORDERS = (1, 2)
FEW_STEPS = 15  # below this, lower_order_final makes the last step first order (diffusers' threshold)


@dataclass(frozen=True)
class DPMSolverMultistepSchedulerConfig(KarrasSigmasConfig):
    """diffusers' DPMSolverMultistepScheduler keywords for DPM-Solver++ of order 1 or 2, ODE or SDE."""

    solver_order: int = 2  # 2: DPM-Solver++(2M); 1: DPM-Solver++(1), which is DDIM
    algorithm_type: str = "dpmsolver++"  # dpmsolver++ (ODE, η = 0) | sde-dpmsolver++ (SDE, η = 1)
    solver_type: str = "midpoint"  # the 2nd-order correction's form (table above)
    lower_order_final: bool = True  # first-order last step below 15 steps
    euler_at_final: bool = False  # first-order last step always
    thresholding: bool = False  # Imagen's dynamic thresholding of x̂₀ (base.py)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    lambda_min_clipped: float = -math.inf  # diffusers' option to stop early in λ; only −inf (off) is built
    variance_type: str | None = None  # learned variances are not built; only None

    def validate(self) -> None:
        super().validate()
        require_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES)
        require_choice("solver_type", self.solver_type, SOLVER_TYPES)
        if self.solver_order not in SOLVER_ORDERS:
            raise ValueError(
                f"solver_order={self.solver_order!r} is not built; choose 1 or 2 (2 is DPM-Solver++(2M))."
            )
        if self.lambda_min_clipped != -math.inf:
            raise ValueError(f"lambda_min_clipped={self.lambda_min_clipped} is not supported; use -inf.")
        if self.variance_type is not None:
            raise ValueError(
                f"variance_type={self.variance_type!r} (a learned variance) is not supported; use None."
            )


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++(2M) and SDE-DPM-Solver++(2M) (table above); keywords are diffusers' names."""

    config_class = DPMSolverMultistepSchedulerConfig
    config: DPMSolverMultistepSchedulerConfig
    init_noise_sigma = 1.0  # the VP sample: x_T = z
    timestep_dtype: ClassVar[torch.dtype] = torch.long

    def __init__(self, **config: Any) -> None:
        self._previous_denoised: Tensor | None = None  # D_{i−1}
        super().__init__(**config)

    def _timesteps_and_sigmas(self, n: int) -> tuple[Tensor, Tensor]:
        c = self.config
        T = c.num_train_timesteps
        if c.use_karras_sigmas:  # eq. 5 over the whole trained range
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            return sigma_to_timestep(sigmas, self.train_sigmas).round(), sigmas
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif c.timestep_spacing == "leading":
            timesteps = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + c.steps_offset
            if timesteps[0] > T - 1:
                raise ValueError(
                    f"steps_offset={c.steps_offset} with num_inference_steps={n} puts the first timestep at "
                    f"{timesteps[0]}, past the last trained one ({T - 1}); use fewer steps or steps_offset=0."
                )
        else:
            timesteps = np.array(self._spaced_timesteps(n))
        timesteps = torch.from_numpy(timesteps.astype(np.float64))
        return timesteps, self.train_sigmas[timesteps.long()]

    def _use_schedule(self, timesteps: Tensor, sigmas: Tensor, device: str | torch.device | None) -> None:
        super()._use_schedule(timesteps, sigmas, device)
        self._previous_denoised = None

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """The model input is x_t itself (the VP sample)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One multistep step x_i → x_{i+1} (table above).

        Args:
            model_output: the model's prediction on ``sample`` (ε, x₀ or v), (B, C, H, W).
            timestep: t_i, the next entry of ``self.timesteps``.
            sample: x_i, the VP sample, (B, C, H, W).
            generator: draws z for the SDE variant when ``variance_noise`` is not given.
            variance_noise: z ~ N(0, I), shape of ``sample`` (SDE variant only).
            return_dict: False returns the tuple (prev_sample, pred_original_sample).

        Returns:
            ``SchedulerOutput(prev_sample=x_{i+1}, pred_original_sample=D_i)``, dtype of ``model_output``.
        """
        c = self.config
        self._check_noise_arguments(0.0, sample, generator, variance_noise)
        i = self._current_index(timestep)
        n = len(self._timestep_list)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha = 1 / math.sqrt(1 + sigma**2)
        denoised = self._predict_original_and_epsilon(model_output, sample, alpha**2)[0]  # D_i, eq. 8
        if c.thresholding:
            denoised = dynamic_threshold(denoised, c.dynamic_thresholding_ratio, c.sample_max_value)
        sample = upcast(sample)

        last = i == n - 1
        first_order = (
            c.solver_order == 1
            or self._previous_denoised is None
            or (last and (c.euler_at_final or (c.lower_order_final and n < FEW_STEPS) or sigma_next == 0))
        )
        eta = 1.0 if c.algorithm_type == "sde-dpmsolver++" else 0.0
        alpha_t = 1 / math.sqrt(1 + sigma_next**2)
        sigma_t, sigma_s = sigma_next * alpha_t, sigma * alpha  # VP noise scales σ_{i+1}, σ_i
        h = half_log_snr(sigma_next) - half_log_snr(sigma)
        phi = -math.expm1(-(1 + eta) * h)  # 1 − e^{−(1+η)h}, exact for small h
        decay = (sigma_t / sigma_s) * math.exp(-eta * h) if sigma_next > 0 else 0.0  # (σ_{i+1}/σ_i) e^{−ηh}
        prev_sample = decay * sample + alpha_t * phi * denoised
        if not first_order:
            h_previous = half_log_snr(sigma) - half_log_snr(float(self.sigmas[i - 1]))
            d1 = (denoised - self._previous_denoised) * (h / h_previous)  # (D_i − D_{i−1}) / r_i
            correction = phi / 2 if c.solver_type == "midpoint" else 1 - phi / ((1 + eta) * h)
            prev_sample = prev_sample + alpha_t * correction * d1
        if eta > 0:
            noise = self._noise_like(sample, generator, variance_noise)
            prev_sample = prev_sample + sigma_t * math.sqrt(-math.expm1(-2 * eta * h)) * noise

        self._previous_denoised = denoised
        self._index = i + 1
        return self._output(prev_sample.to(model_output.dtype), denoised, return_dict)


def half_log_snr(sigma: float) -> float:
    """λ = log(α/σ^{VP}) = −log σ; +∞ at σ = 0 (x₀ itself)."""
    return -math.log(sigma) if sigma > 0 else math.inf
