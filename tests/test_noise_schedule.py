"""The forward process: betas by their definitions, ᾱ, zero-SNR, add_noise / velocity / SNR in closed form."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from latentdiff.noise_schedule import (
    BETA_SCHEDULES,
    NoiseSchedule,
    extract,
    make_betas,
    rescale_betas_zero_snr,
)

T = 1000
# beta_start, beta_end as their users set them (Stable Diffusion's for scaled_linear)
RANGES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),
    "sigmoid": (1e-4, 0.02),
}


def betas_of(name: str) -> torch.Tensor:
    return make_betas(name, T, *RANGES[name])


def alpha_bar_by_product(betas: torch.Tensor, t: int) -> float:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), by a plain Python product (independent of torch.cumprod)."""
    return math.prod(1 - b for b in betas[: t + 1].tolist())


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_betas_are_float64_and_alphas_cumprod_strictly_decreasing(name):
    for betas in (betas_of(name), rescale_betas_zero_snr(betas_of(name))):
        schedule = NoiseSchedule(betas)
        assert betas.dtype == torch.float64 and betas.shape == (T,)
        for buffer in (
            "betas",
            "alphas",
            "alphas_cumprod",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
        ):
            assert getattr(schedule, buffer).dtype == torch.float64, buffer
        assert (schedule.alphas_cumprod.diff() < 0).all()
        assert 0 < schedule.alphas_cumprod[0] < 1


def test_linear_and_scaled_linear_betas():
    linear = betas_of("linear")
    assert linear[0].item() == pytest.approx(1e-4, rel=1e-12) and linear[-1].item() == pytest.approx(
        0.02, rel=1e-12
    )
    torch.testing.assert_close(
        linear.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64)
    )
    root = betas_of("scaled_linear").sqrt()  # √β evenly spaced from √0.00085 to √0.012
    assert root[0].item() == pytest.approx(0.00085**0.5) and root[-1].item() == pytest.approx(0.012**0.5)
    step = (0.012**0.5 - 0.00085**0.5) / (T - 1)
    torch.testing.assert_close(root.diff(), torch.full((T - 1,), step, dtype=torch.float64))


def test_cosine_schedule_has_nichol_dhariwal_alpha_bar():
    """Nichol & Dhariwal 2021 eq. 17: ᾱ_t = f(t + 1) / f(0), f(u) = cos²((u/T + s)/(1 + s) · π/2), β capped at 0.999."""
    betas = betas_of("squaredcos_cap_v2")

    def f(u: float) -> float:
        return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2

    assert betas.max().item() <= 0.999
    capped = int((betas >= 0.999).nonzero()[0]) if (betas >= 0.999).any() else T
    assert capped >= T - 1  # only the very last β reaches the cap
    for t in (0, 1, 10, 500, 900, 998):
        assert alpha_bar_by_product(betas, t) == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_sigmoid_schedule_is_a_scaled_sigmoid_of_an_even_grid():
    betas = betas_of("sigmoid")
    fraction = (betas - 1e-4) / (0.02 - 1e-4)  # sigmoid(τ_t), τ evenly spaced in [−6, 6]
    tau = torch.log(fraction / (1 - fraction))
    torch.testing.assert_close(tau, torch.linspace(-6, 6, T, dtype=torch.float64), rtol=0, atol=1e-9)


def test_trained_betas_are_used_as_given():
    betas = torch.linspace(0.001, 0.05, 10, dtype=torch.float64) ** 1.5
    assert torch.equal(make_betas("linear", 10, 1e-4, 0.02, trained_betas=betas.tolist()), betas)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_betas_match_diffusers(name):
    """The same schedules as diffusers' DDPMScheduler builds (it computes them in float32)."""
    theirs = diffusers.DDPMScheduler(beta_schedule=name, beta_start=RANGES[name][0], beta_end=RANGES[name][1])
    torch.testing.assert_close(betas_of(name).float(), theirs.betas, rtol=2e-6, atol=0)
    zero_snr = diffusers.DDPMScheduler(
        beta_schedule=name, beta_start=RANGES[name][0], beta_end=RANGES[name][1], rescale_betas_zero_snr=True
    )
    ours = NoiseSchedule(rescale_betas_zero_snr(betas_of(name)))
    torch.testing.assert_close(ours.alphas_cumprod.float(), zero_snr.alphas_cumprod, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_zero_snr_rescale(name):
    """Lin et al. 2024 Alg. 1: ᾱ_{T−1} = 0, ᾱ_0 kept, and √ᾱ an affine function of the original √ᾱ."""
    before = NoiseSchedule(betas_of(name))
    after = NoiseSchedule(rescale_betas_zero_snr(betas_of(name)))
    assert after.alphas_cumprod[-1].item() == 0.0 and after.betas[-1].item() == 1.0
    assert after.snr(torch.tensor([T - 1])).item() == 0.0
    assert after.alphas_cumprod[0].item() == pytest.approx(before.alphas_cumprod[0].item(), rel=1e-12)
    # constant for an affine map
    slopes = after.sqrt_alphas_cumprod.diff() / before.sqrt_alphas_cumprod.diff()
    torch.testing.assert_close(slopes, slopes[:1].expand_as(slopes), rtol=1e-9, atol=0)


def test_add_noise_is_the_closed_form_for_each_sample():
    """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, each sample of the batch at its own t (Ho et al. 2020 eq. 4)."""
    betas = betas_of("scaled_linear")
    schedule = NoiseSchedule(betas)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    timesteps = torch.tensor([0, 17, 500, 999])
    noisy = schedule.add_noise(x0, noise, timesteps)
    assert noisy.dtype == torch.float32 and noisy.shape == x0.shape
    for i, t in enumerate(timesteps.tolist()):
        alpha_bar = alpha_bar_by_product(betas, t)
        expected = math.sqrt(alpha_bar) * x0[i] + math.sqrt(1 - alpha_bar) * noise[i]
        torch.testing.assert_close(noisy[i], expected, rtol=1e-6, atol=1e-6)
    # one int timestep for the whole batch, and half precision stays half precision
    torch.testing.assert_close(schedule.add_noise(x0, noise, 17)[1], noisy[1])
    assert schedule.add_noise(x0.half(), noise.half(), timesteps).dtype == torch.float16


def test_velocity_is_the_closed_form_and_recovers_x0_and_noise():
    """v = √ᾱ ε − √(1 − ᾱ) x₀; with x_t it gives back x₀ = √ᾱ x_t − √(1 − ᾱ) v and ε = √ᾱ v + √(1 − ᾱ) x_t."""
    betas = betas_of("linear")
    schedule = NoiseSchedule(betas)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g).double(), torch.randn(3, 2, 4, 4, generator=g).double()
    timesteps = torch.tensor([3, 400, 998])
    velocity = schedule.get_velocity(x0, noise, timesteps)
    noisy = schedule.add_noise(x0, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a, b = math.sqrt(alpha_bar_by_product(betas, t)), math.sqrt(1 - alpha_bar_by_product(betas, t))
        torch.testing.assert_close(velocity[i], a * noise[i] - b * x0[i])
        torch.testing.assert_close(a * noisy[i] - b * velocity[i], x0[i])
        torch.testing.assert_close(a * velocity[i] + b * noisy[i], noise[i])


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(name):
    ours = NoiseSchedule(betas_of(name))
    theirs = diffusers.DDPMScheduler(beta_schedule=name, beta_start=RANGES[name][0], beta_end=RANGES[name][1])
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    timesteps = torch.tensor([0, 250, 750, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))
    torch.testing.assert_close(
        ours.get_velocity(x0, noise, timesteps), theirs.get_velocity(x0, noise, timesteps)
    )


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    betas = betas_of("linear")
    snr = NoiseSchedule(betas).snr(torch.tensor([0, 10, 999]))
    assert snr.dtype == torch.float32 and snr.shape == (3,)
    for value, t in zip(snr.tolist(), (0, 10, 999)):
        alpha_bar = alpha_bar_by_product(betas, t)
        assert value == pytest.approx(alpha_bar / (1 - alpha_bar), rel=1e-6)
    assert (NoiseSchedule(betas).snr(torch.arange(T)).diff() < 0).all()


def test_extract_broadcasts_and_checks_the_range():
    values = torch.arange(10, dtype=torch.float64) * 0.5
    out = extract(values, torch.tensor([1, 9]), ndim=4)
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float64
    assert out.flatten().tolist() == [0.5, 4.5]
    assert extract(values, torch.tensor(3), ndim=3).shape == (1, 1, 1)
    for bad in ([10], [-1]):
        with pytest.raises(ValueError, match="timesteps"):
            extract(values, torch.tensor(bad), ndim=4)


def test_make_betas_rejects_bad_input():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("cosine", T, 1e-4, 0.02)
    with pytest.raises(ValueError, match="trained_betas"):
        make_betas("linear", T, 1e-4, 0.02, trained_betas=[0.1] * 10)
    with pytest.raises(ValueError, match="beta_start/beta_end"):
        make_betas("linear", T, 1e-4, 1.5)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", 0, 1e-4, 0.02)
