"""Samplers in σ, the noise level as a standard deviation: what Euler, Heun and DPM-Solver++ share.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM) write every diffusion
model as x = x₀ + σ n, n ~ N(0, I). The variance-preserving chain of noise_schedule.py is that process scaled by
√ᾱ_t (EDM Table 1, VP column: s(t) = √ᾱ_t): x_t = √ᾱ_t x with σ_t² = (1 − ᾱ_t)/ᾱ_t. Equation numbers are EDM's.

| code name            | symbol                                      | equation                                          |
|----------------------|---------------------------------------------|---------------------------------------------------|
| ``train_sigmas``     | σ_t = √((1 − ᾱ_t)/ᾱ_t), t = 0 … T−1         | Table 1 (VP): σ(t) from s(t) = √ᾱ_t               |
| ``sigmas``           | σ_0 > σ_1 > … > σ_{n−1}, then σ_n           | the visited noise levels; σ_n = 0 (x₀) or σ(0)    |
| ``timesteps``        | t_i with σ(t_i) = σ_i                       | the training timestep shown to the model with σ_i |
| ``interpolate_sigma``| σ(t), linear in t between integers          | fractional timesteps (linspace spacing)           |
| ``karras_sigmas``    | σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7 | eq. 5          |
| ``sigma_to_timestep``| t(σ), linear in log σ between integers      | the inverse of ``train_sigmas``                   |
| ``c_in``             | 1/√(σ² + 1)                                 | Table 1 (VP): x_t = c_in · x, the model's input   |
| ``denoised``         | D(x; σ) = x̂₀                                | from the model output on x_t at ᾱ = 1/(1 + σ²)   |
| ``derivative``       | d = (x − D(x; σ))/σ                         | eq. 3, dx/dσ of the probability-flow ODE, σ(t) = t, s(t) = 1 |

Zero terminal SNR (Lin et al. 2024) makes σ_{T−1} = ∞. As diffusers does, ᾱ_{T−1} is then raised to 2⁻²⁴, so that
σ_max = √(2²⁴ − 1) ≈ 4096 and x = σ_max z stays finite. An ε-prediction model cannot be sampled from there: at
σ_max, x̂₀ = x − σ ε̂ asks ε̂ to be right to 1/4096 of the sample (Lin et al. 2024 §3.2 train such models with
v-prediction), so that combination is refused; v- and x₀-prediction are fine.

The samplers keep a step counter as diffusers' do (Heun visits each timestep twice, DPM-Solver++ remembers the
previous x̂₀), so ``step`` must be called once per entry of ``timesteps``, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from latentdiff.schedulers.base import (
    ScheduleConfig,
    Scheduler,
    check_num_inference_steps,
    extract_timestep,
    require_choice,
)

ZERO_SNR_ALPHA_CUMPROD = 2.0**-24  # ᾱ_{T−1} with zero terminal SNR (diffusers' value): σ_max ≈ 4096
KARRAS_RHO = 7.0  # ρ of eq. 5 (EDM §3: "ρ = 7 ... for all our experiments")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")  # σ_n: 0 (x₀ exactly) or σ(0), the least noise trained on


@dataclass(frozen=True)
class SigmaSchedulerConfig(ScheduleConfig):
    """The schedule of a σ-sampler; diffusers' Euler, Heun and DPM-Solver++ space linearly by default."""

    timestep_spacing: str = "linspace"

    def validate(self) -> None:
        super().validate()
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr=True with prediction_type='epsilon' cannot be sampled in σ: at σ_max ≈ 4096 "
                "the estimate x̂₀ = x − σ ε̂ needs ε̂ right to 1/4096 (Lin et al. 2024 §3.2). Use a "
                "v_prediction model, or DDIMScheduler, which starts at ᾱ = 0 without σ."
            )


@dataclass(frozen=True)
class KarrasSigmasConfig(SigmaSchedulerConfig):
    """A σ-sampler that can space its σ by EDM eq. 5 and choose its final σ."""

    use_karras_sigmas: bool = False  # σ_i from eq. 5 instead of σ(t_i) of the spaced timesteps
    final_sigmas_type: str = "zero"  # zero: end at x₀ | sigma_min: end at σ(0), as some samplers in the wild

    def validate(self) -> None:
        super().validate()
        require_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)


def upcast(sample: Tensor) -> Tensor:
    """``sample`` in at least float32: σ-samplers step half-precision samples in float32, as diffusers does."""
    return sample.to(torch.promote_types(sample.dtype, torch.float32))


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = KARRAS_RHO
) -> Tensor:
    """EDM eq. 5: n noise levels from σ_max down to σ_min, evenly spaced in σ^{1/ρ}; float64, shape (n,)."""
    ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def interpolate_sigma(timesteps: Tensor, train_sigmas: Tensor) -> Tensor:
    """σ(t) at (possibly fractional) timesteps, linear in t between the integers of ``train_sigmas`` (T,)."""
    t = timesteps.to(torch.float64).clamp(0, train_sigmas.shape[0] - 1)
    low = t.floor().long().clamp(max=train_sigmas.shape[0] - 2)
    w = t - low
    return (1 - w) * train_sigmas[low] + w * train_sigmas[low + 1]


def sigma_to_timestep(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """The fractional timesteps whose σ are ``sigmas``: t(σ) linear in log σ between integers, within [0, T−1].

    Each σ is placed after the last trained t whose σ_t ≤ σ. The table increases with t, except that the 2⁻²⁴ clamp
    of a zero-SNR schedule can put σ_{T−1} below σ_{T−2} (linear β): σ_max then still maps to T − 1, as in
    diffusers. Returns float64, shape of ``sigmas``.
    """
    log_table = train_sigmas.log()  # (T,)
    log_sigma = sigmas.to(torch.float64).clamp(min=1e-10).log()  # (n,)
    at_or_below = log_table[None, :] <= log_sigma[:, None]  # (n, T)
    positions = torch.arange(train_sigmas.shape[0])
    low = (at_or_below.long() * positions).amax(dim=1).clamp(max=train_sigmas.shape[0] - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return low + w


class SigmaScheduler(Scheduler):
    """σ-table, timesteps and step counter shared by Euler, Euler ancestral, Heun and DPM-Solver++.

    Subclasses choose the visited (timesteps, σ) in :meth:`_timesteps_and_sigmas` and write ``step``.
    """

    config_class: ClassVar[type[ScheduleConfig]] = SigmaSchedulerConfig
    timestep_dtype: ClassVar[torch.dtype] = (
        torch.float32
    )  # diffusers' Euler and Heun show fractional timesteps

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        alphas_cumprod = self.alphas_cumprod.clone()
        if self.config.rescale_betas_zero_snr:
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        self.train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # float64, (T,), increasing in t
        self.sigmas: Tensor = torch.empty(0, dtype=torch.float64)  # (steps + 1,) float64 on the CPU
        self._index: int | None = None  # position in self.timesteps of the next step
        self._begin_index: int | None = None
        # as diffusers: before set_timesteps, the whole training chain T−1, …, 0
        T = self.config.num_train_timesteps
        full = torch.arange(T - 1, -1, -1, dtype=torch.float64)
        self._use_schedule(full, self.train_sigmas.flip(0), None)

    # ----- timesteps and σ -------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose n noise levels σ_0 > … > σ_{n−1} (``self.sigmas``, then the final σ) and their ``timesteps``."""
        if timesteps is not None:
            raise ValueError(
                f"{type(self).__name__}.set_timesteps takes num_inference_steps, not custom timesteps; "
                "custom timesteps are DDPMScheduler's option."
            )
        n = check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        timesteps_, sigmas = self._timesteps_and_sigmas(n)
        self.num_inference_steps = n
        self._use_schedule(timesteps_, sigmas, device)

    def _timesteps_and_sigmas(self, n: int) -> tuple[Tensor, Tensor]:
        """(t_i, σ_i) for i < n, float64, descending; Euler's and Heun's choice (diffusers' ``linspace`` keeps
        fractional timesteps: σ is interpolated between the trained ones)."""
        c = self.config
        T = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            timesteps = torch.from_numpy(np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64))
        else:
            timesteps = torch.tensor(self._spaced_timesteps(n), dtype=torch.float64)
        sigmas = interpolate_sigma(timesteps, self.train_sigmas)
        if getattr(c, "use_karras_sigmas", False):  # eq. 5 between the spaced schedule's ends
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = sigma_to_timestep(sigmas, self.train_sigmas)
        return timesteps, sigmas

    def _final_sigma(self) -> float:
        """σ_n, where the last step lands: 0 (x₀) or σ(0) with ``final_sigmas_type='sigma_min'``."""
        return (
            float(self.train_sigmas[0])
            if getattr(self.config, "final_sigmas_type", "zero") == "sigma_min"
            else 0.0
        )

    def _use_schedule(self, timesteps: Tensor, sigmas: Tensor, device: str | torch.device | None) -> None:
        final = torch.tensor([self._final_sigma()], dtype=torch.float64)
        self.sigmas = torch.cat([sigmas.to(torch.float64), final])
        self.timesteps = timesteps.to(dtype=self.timestep_dtype, device=device)
        self._timestep_list = self.timesteps.tolist()
        self._index = None
        self._begin_index = None

    # ----- the step counter (diffusers' names) -----------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """The position in ``timesteps`` of the next step; None until the first step or model input."""
        return self._index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (image-to-image starts part-way down)."""
        self._begin_index = begin_index

    def _current_index(self, timestep: float | Tensor) -> int:
        """The step counter, found from the first timestep seen: where it sits in ``timesteps`` (for Heun, which
        lists it twice, its second occurrence: the start of that interval)."""
        if self._index is None:
            if self._begin_index is not None:
                self._index = self._begin_index
            else:
                t = extract_timestep(timestep)
                positions = [i for i, value in enumerate(self._timestep_list) if value == t]
                if not positions:
                    shown = self._timestep_list[:8]
                    raise ValueError(
                        f"timestep={t} is not in this scheduler's timesteps {shown}...; pass one of "
                        "scheduler.timesteps (set_timesteps chose them)."
                    )
                self._index = positions[1] if self.order == 2 and len(positions) > 1 else positions[0]
        if self._index >= len(self._timestep_list):
            raise ValueError(
                f"{type(self).__name__} has taken all {len(self._timestep_list)} steps; call set_timesteps again "
                "to sample anew."
            )
        return self._index

    # ----- the model output --------------------------------------------------------------------------------------

    def _denoised(self, model_output: Tensor, sample: Tensor, sigma: float) -> Tensor:
        """D(x; σ) = x̂₀ from the model output on x_t = x/√(σ² + 1) (table above; base.py's x̂₀ at ᾱ = 1/(1 + σ²))."""
        c_in = (sigma**2 + 1) ** -0.5
        pred_original_sample, _ = self._predict_original_and_epsilon(model_output, sample * c_in, c_in**2)
        return pred_original_sample


class KarrasScheduler(SigmaScheduler):
    """The samplers that carry x = x_t/√ᾱ_t (EDM's unscaled x): Euler, Euler ancestral and Heun.

    x_T = σ_0 z, so the initial noise is scaled by ``init_noise_sigma``, and the model sees c_in x.
    """

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        """σ_0 (diffusers' convention: √(σ_0² + 1) for ``leading`` spacing)."""
        sigma_max = float(self.sigmas.max())
        return (
            sigma_max
            if self.config.timestep_spacing in ("linspace", "trailing")
            else (sigma_max**2 + 1) ** 0.5
        )

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """The model's input c_in x = x/√(σ² + 1), σ of the current step (EDM Table 1)."""
        if timestep is None:
            raise ValueError(f"{type(self).__name__}.scale_model_input needs the timestep: σ depends on it.")
        sigma = float(self.sigmas[self._current_index(timestep)])
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | float) -> Tensor:
        """x = x₀ + σ(t) ε, the sampler's own (unscaled) sample at timestep t; σ(t) interpolated for fractional t.

        Args:
            original_samples: x₀, shape (B, C, H, W). noise: ε, same shape.
            timesteps: t per sample, shape (B,), or one number; e.g. one of ``self.timesteps``.
        """
        t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
        sigma = interpolate_sigma(t, self.train_sigmas).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + sigma.to(original_samples.dtype).to(original_samples.device) * noise
