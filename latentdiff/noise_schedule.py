"""The forward (noising) process that training and both samplers share.

Notation (timesteps are 0-indexed as in diffusers: index ``t`` here is Ho et al.'s ``t + 1``):

| code name                         | symbol                        | equation                                            |
|-----------------------------------|-------------------------------|-----------------------------------------------------|
| ``betas``                         | β_t                           | q(x_t ∣ x_{t−1}) = N(√(1 − β_t) x_{t−1}, β_t I), Ho et al. 2020 eq. 2 |
| ``alphas``                        | α_t = 1 − β_t                 | Ho et al. 2020 §2                                   |
| ``alphas_cumprod``                | ᾱ_t = ∏_{s≤t} α_s             | q(x_t ∣ x₀) = N(√ᾱ_t x₀, (1 − ᾱ_t) I), Ho eq. 4      |
| ``sqrt_alphas_cumprod``           | √ᾱ_t                          | signal scale of x_t                                 |
| ``sqrt_one_minus_alphas_cumprod`` | √(1 − ᾱ_t)                    | noise scale of x_t                                  |
| ``add_noise``                     | x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε  | Ho eq. 4, reparametrised                            |
| ``get_velocity``                  | v_t = √ᾱ_t ε − √(1 − ᾱ_t) x₀  | Salimans & Ho 2022 §4 (v-prediction)                |
| ``snr``                           | SNR(t) = ᾱ_t / (1 − ᾱ_t)      | Kingma et al. 2021 eq. 1 (used by min-SNR weighting) |

The schedule is computed in float64 once; tensors that touch samples are cast to the sample's dtype and device at
the point of use, by the one broadcasting helper :func:`extract`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

# Nichol & Dhariwal 2021 eq. 17: the offset s keeps β_0 from being vanishingly small; the cap keeps β_T < 1.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """The per-step variances β_t, float64, shape (T,).

    Args:
        beta_schedule: one of
            ``linear``: β_t evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020 §4: 1e-4 → 0.02);
            ``scaled_linear``: √β_t evenly spaced (Stable Diffusion: 0.00085 → 0.012);
            ``squaredcos_cap_v2``: Nichol & Dhariwal 2021 eq. 17, ᾱ(u) = cos²((u + s)/(1 + s) · π/2),
            β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999); ignores ``beta_start`` and ``beta_end``;
            ``sigmoid``: β_t = beta_start + (beta_end − beta_start) · sigmoid(τ_t), τ evenly spaced in [−6, 6]
            (the GeoDiff schedule, Xu et al. 2022).
        num_train_timesteps: T, the length of the training chain.
        beta_start, beta_end: first and last β for the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        trained_betas: explicit β_t (length T), used instead of the named schedule when given.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; choose one of {BETA_SCHEDULES}.")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer.")
    T = num_train_timesteps
    uses_range = trained_betas is None and beta_schedule != "squaredcos_cap_v2"
    if uses_range and not beta_start <= beta_end:
        raise ValueError(
            f"beta_start={beta_start} is larger than beta_end={beta_end}: the noise must grow along the chain; "
            f"swap them (e.g. beta_start={beta_end}, beta_end={beta_start})."
        )

    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
        if betas.numel() != T:
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps={T}; pass "
                f"num_train_timesteps={betas.numel()} or {T} betas."
            )
        name = "trained_betas"
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        name = "beta_start/beta_end"
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        name = "beta_start/beta_end"
    elif beta_schedule == "squaredcos_cap_v2":
        u = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA)
        name = "num_train_timesteps"
    else:  # sigmoid
        tau = torch.linspace(-6, 6, T, dtype=torch.float64)
        betas = beta_start + (beta_end - beta_start) * torch.sigmoid(tau)
        name = "beta_start/beta_end"

    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(
            f"{name} give betas outside (0, 1] (min {betas.min().item():.3g}, max {betas.max().item():.3g}); "
            "every step must add some noise and none can add more than all of it."
        )
    return betas


def rescale_betas_zero_snr(betas: Tensor) -> Tensor:
    """Rescale β so that the last step has zero SNR, ᾱ_{T−1} = 0 (Lin et al. 2024, Algorithm 1).

    √ᾱ_t is mapped affinely: shifted so that its last value is 0, then scaled so that its first value is unchanged.
    Returns float64 betas of the same length; the last one is exactly 1.
    """
    sqrt_alphas_cumprod = torch.cumprod(1 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])  # undo the cumprod
    return 1 - alphas


def extract(values: Tensor, timesteps: Tensor, ndim: int) -> Tensor:
    """Gather ``values[timesteps]`` and shape it to broadcast over a batch of ``ndim``-dimensional samples.

    Args:
        values: a per-timestep table, shape (T,), on any device (the schedule's are float64 on the CPU).
        timesteps: integer timesteps in [0, T), shape (B,) (or 0-d for one timestep shared by the batch).
        ndim: the number of dimensions of the samples, e.g. 4 for (B, C, H, W).

    Returns:
        shape (B, 1, ..., 1) with ``ndim`` dimensions, dtype and device of ``values``; the caller casts it once.
    """
    index = torch.as_tensor(timesteps).to(device=values.device, dtype=torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= values.shape[0]):
        raise ValueError(
            f"timesteps must lie in [0, {values.shape[0]}); got values from {int(index.min())} to {int(index.max())}."
        )
    return values[index].reshape(-1, *([1] * (ndim - 1)))


class NoiseSchedule:
    """ᾱ_t and the buffers derived from it, float64, shape (T,) each; named after their formula (table above).

    Built from betas (see :func:`make_betas`); it holds no sampler state and knows nothing of any model.
    """

    def __init__(self, betas: Tensor) -> None:
        self.betas = betas.to(torch.float64).cpu()
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def _coefficient(self, values: Tensor, timesteps: Tensor | int, like: Tensor) -> Tensor:
        # values[t], broadcastable over `like`, in like's dtype and on like's device (cast on the CPU first: some
        # devices have no float64).
        return extract(values, torch.as_tensor(timesteps), like.ndim).to(like.dtype).to(like.device)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (Ho et al. 2020 eq. 4).

        Args:
            original_samples: x₀, shape (B, C, H, W) (any number of trailing dimensions).
            noise: ε ~ N(0, I), same shape as ``original_samples``.
            timesteps: t per sample, integers in [0, T), shape (B,), or one int for the whole batch.

        Returns:
            x_t, same shape, dtype and device as ``original_samples``.
        """
        return (
            self._coefficient(self.sqrt_alphas_cumprod, timesteps, original_samples) * original_samples
            + self._coefficient(self.sqrt_one_minus_alphas_cumprod, timesteps, original_samples) * noise
        )

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """The v-prediction target v_t = √ᾱ_t ε − √(1 − ᾱ_t) x₀ (Salimans & Ho 2022 §4).

        Args:
            sample: x₀, shape (B, C, H, W).
            noise: ε, same shape.
            timesteps: t per sample, shape (B,), or one int.

        Returns:
            v_t, same shape, dtype and device as ``sample``.
        """
        return (
            self._coefficient(self.sqrt_alphas_cumprod, timesteps, sample) * noise
            - self._coefficient(self.sqrt_one_minus_alphas_cumprod, timesteps, sample) * sample
        )

    def snr(self, timesteps: Tensor | int) -> Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t), float32, shape (B,) on the device of ``timesteps`` (inf where ᾱ_t = 1)."""
        timesteps = torch.as_tensor(timesteps)
        alphas_cumprod = extract(self.alphas_cumprod, timesteps, 1)
        return (alphas_cumprod / (1 - alphas_cumprod)).to(torch.float32).to(timesteps.device)
