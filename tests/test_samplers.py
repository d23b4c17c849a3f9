"""Euler, Euler ancestral, Heun and DPM-Solver++: parity with diffusers, closed forms, the diffusers API, bad input.

`python tests/test_samplers.py` prints the parity grid's worst relative error per sampler.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import pickle

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

import latentdiff
from latentdiff.noise_schedule import make_betas
from latentdiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    check_sampler,
    sampler_from_config,
)
from latentdiff.schedulers.sigmas import ZERO_SNR_ALPHA_CUMPROD, KarrasScheduler
from tests.test_schedulers import diffusers_scheduler

T = 1000
SHAPE = (2, 3, 8, 8)
PARITY_RTOL = 1e-5

# name -> (ours, diffusers', the config that makes the sampler)
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, {}),
    "euler-karras": (EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, {}),
    "heun-karras": (HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m-karras": (
        DPMSolverMultistepScheduler,
        diffusers.DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True},
    ),
    "dpmpp_2m-heun": (
        DPMSolverMultistepScheduler,
        diffusers.DPMSolverMultistepScheduler,
        {"solver_type": "heun", "lower_order_final": False},
    ),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++"},
    ),
    "dpmpp_2m_sde-karras": (
        DPMSolverMultistepScheduler,
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
}
SCHEDULES = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]
# zero terminal SNR only with v-prediction: ε-prediction is refused there (test_epsilon_with_zero_snr_is_refused)
PREDICTIONS = [("epsilon", False), ("v_prediction", False), ("v_prediction", True), ("sample", False)]


def excluded(sampler: str, schedule: str, prediction_type: str, zero_snr: bool) -> bool:
    """Cases with no oracle: diffusers' Euler ancestral raises for x₀-prediction; its Heun has no zero-SNR option;
    its DPM-Solver with Karras sigmas truncates (not rounds) the cosine schedule's timesteps to integers. And the
    cosine schedule's σ_max ≈ 2·10⁴ leaves float32 Heun and Euler ancestral (whose first step is x − σ_max ε̂ of two
    ~10⁴ numbers) at ~1e-4 from each other and from the float64 truth: test_cosine_schedule_is_float32_bound."""
    return (
        (sampler == "euler_a" and prediction_type == "sample")
        or (sampler in ("euler_a", "heun", "heun-karras") and schedule == "squaredcos_cap_v2")
        or (sampler.startswith("heun") and zero_snr)
        or (sampler.startswith("dpmpp") and "karras" in sampler and schedule == "squaredcos_cap_v2")
    )


GRID = [
    (sampler, schedule, prediction, spacing, steps)
    for sampler, schedule, prediction, spacing, steps in itertools.product(
        SAMPLERS, SCHEDULES, PREDICTIONS, SPACINGS, (6, 20)
    )
    if not excluded(sampler, schedule, *prediction)
]


# ----- helpers ---------------------------------------------------------------------------------------------------


def fake_denoiser(model_input: torch.Tensor, t: float, fixed: torch.Tensor) -> torch.Tensor:
    """A smooth, fixed function of (x_t, t) standing in for a trained model."""
    return torch.tanh(model_input) * (0.5 + float(t) / T) + 0.1 * fixed


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def case_config(sampler: str, schedule: str, prediction: tuple[str, bool], spacing: tuple[str, int]) -> dict:
    prediction_type, zero_snr = prediction
    return {
        **SCHEDULES[schedule],
        **SAMPLERS[sampler][2],
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": zero_snr,
        "timestep_spacing": spacing[0],
        "steps_offset": spacing[1],
    }


def diffusers_sampler(diffusers_class: type, config: dict, float64: bool = True):
    """diffusers' sampler for ``config``; by default with β and ᾱ in float64.

    diffusers keeps β and ᾱ in float32; σ_t = √((1 − ᾱ_t)/ᾱ_t) then carries up to ~1e-4 relative error near t = 0,
    where 1 − ᾱ_t is small, and ~1e-5 at the cosine schedule's capped β = 0.999. With float64 β (the same β
    formulas, see test_noise_schedule.py) and float64 ᾱ (diffusers' own zero-SNR rescale and 2⁻²⁴ clamp) the grid
    compares the step formulas, not that rounding (test_stock_diffusers_differs_by_its_float32_sigmas shows it).
    Keys the diffusers class does not take (Heun: ``rescale_betas_zero_snr``) are left out.
    """
    accepted = inspect.signature(diffusers_class.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted}
    theirs = diffusers_class(**config)
    if not float64:
        return theirs
    plain = diffusers_class(**{k: v for k, v in config.items() if k != "rescale_betas_zero_snr"})
    betas = make_betas(
        plain.config.beta_schedule,
        T,
        plain.config.beta_start,
        plain.config.beta_end,
        plain.config.trained_betas,
    )
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    if config.get("rescale_betas_zero_snr"):
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
    theirs.betas, theirs.alphas, theirs.alphas_cumprod = betas, 1 - betas, alphas_cumprod
    return theirs


def loop_error(ours, theirs, num_inference_steps: int, seed: int = 0) -> tuple[bool, float, float]:
    """Run both samplers' full loops from the same x_T with the same noise.

    Returns (timesteps equal to 1e-4, x_T scale equal, worst prev_sample error over every step): the error is
    max|ours − theirs| / max|theirs| per step, the final sample included. Stochastic steps get the same z: as
    ``variance_noise`` where diffusers takes it, else from generators seeded alike (diffusers draws z with
    ``torch.randn(shape, generator=...)``, as this project does).
    """
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    same = ours.timesteps.shape == theirs.timesteps.shape and torch.allclose(
        ours.timesteps.double(), theirs.timesteps.double(), rtol=0, atol=1e-4
    )
    same_scale = abs(float(ours.init_noise_sigma) / float(theirs.init_noise_sigma) - 1) < 1e-6
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * float(theirs.init_noise_sigma)
    fixed = torch.randn(SHAPE, generator=g)
    x_ours, x_theirs = x.clone(), x.clone()
    error = 0.0
    for i, t in enumerate(theirs.timesteps):
        out_ours = fake_denoiser(ours.scale_model_input(x_ours, ours.timesteps[i]), t, fixed)
        out_theirs = fake_denoiser(theirs.scale_model_input(x_theirs, t), t, fixed)
        if isinstance(ours, DPMSolverMultistepScheduler):
            z = torch.randn(SHAPE, generator=g)
            extra_ours, extra_theirs = {"variance_noise": z}, {"variance_noise": z}
        else:
            extra_ours = {"generator": torch.Generator().manual_seed(seed + i)}
            extra_theirs = {"generator": torch.Generator().manual_seed(seed + i)}
        if isinstance(ours, HeunDiscreteScheduler):
            extra_ours = extra_theirs = {}
        x_ours = ours.step(out_ours, ours.timesteps[i], x_ours, **extra_ours).prev_sample
        x_theirs = theirs.step(out_theirs, t, x_theirs, **extra_theirs).prev_sample
        error = max(error, relative_error(x_ours, x_theirs))
    return same, same_scale, error


def parity_case(sampler, schedule, prediction, spacing, steps, float64=True):
    config = case_config(sampler, schedule, prediction, spacing)
    ours_class, theirs_class, _ = SAMPLERS[sampler]
    return loop_error(ours_class(**config), diffusers_sampler(theirs_class, config, float64), steps)


# ----- parity with diffusers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler,schedule,prediction,spacing,steps", GRID, ids=["-".join(map(str, case)) for case in GRID]
)
def test_matches_diffusers(sampler, schedule, prediction, spacing, steps):
    same_timesteps, same_scale, error = parity_case(sampler, schedule, prediction, spacing, steps)
    assert same_timesteps and same_scale
    assert error < PARITY_RTOL


def test_euler_churn_matches_diffusers():
    config = {**SCHEDULES["scaled_linear"], "timestep_spacing": "trailing"}
    ours, theirs = (
        EulerDiscreteScheduler(**config),
        diffusers_sampler(diffusers.EulerDiscreteScheduler, config),
    )
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    x_ours, x_theirs = x.clone(), x.clone()
    churn = {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 20.0, "s_noise": 1.003}
    for i, t in enumerate(theirs.timesteps):
        out = fake_denoiser(ours.scale_model_input(x_ours, t), t, x)
        theirs.scale_model_input(x_theirs, t)
        g_ours, g_theirs = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        x_ours = ours.step(out, t, x_ours, generator=g_ours, **churn).prev_sample
        x_theirs = theirs.step(out.clone(), t, x_theirs, generator=g_theirs, **churn).prev_sample
        assert relative_error(x_ours, x_theirs) < PARITY_RTOL
    plain = EulerDiscreteScheduler(**config)
    plain.set_timesteps(10)
    assert not torch.allclose(x_ours, _run(plain, x)[-1])  # churn changed the result


def _run(scheduler, x: torch.Tensor, fixed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """A deterministic sampler's trajectory from x (every prev_sample, the final one last)."""
    fixed = x if fixed is None else fixed
    trajectory = []
    for t in scheduler.timesteps:
        out = fake_denoiser(scheduler.scale_model_input(x, t), t, fixed)
        x = scheduler.step(out, t, x).prev_sample
        trajectory.append(x)
    return trajectory


def test_cosine_schedule_is_float32_bound():
    """With σ_max ≈ 2·10⁴, float32 Heun (either library) is ~1e-4 from the float64 truth on some step (this project's
    Heun in float64, whose steps are diffusers' to 1e-5 on the grid); this project's float32 error is no larger."""
    case = ("heun", "squaredcos_cap_v2", ("epsilon", False), ("linspace", 0))
    config = case_config(*case)
    truth, ours, theirs = (
        HeunDiscreteScheduler(**config),
        HeunDiscreteScheduler(**config),
        diffusers_sampler(diffusers.HeunDiscreteScheduler, config),
    )
    g = torch.Generator().manual_seed(12)
    x, fixed = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    runs = []
    for scheduler, dtype in ((truth, torch.float64), (ours, torch.float32), (theirs, torch.float32)):
        scheduler.set_timesteps(6)
        runs.append(_run(scheduler, (x * float(scheduler.init_noise_sigma)).to(dtype), fixed.to(dtype)))
    ours_error, theirs_error = (
        max(relative_error(step.double(), exact) for step, exact in zip(run, runs[0])) for run in runs[1:]
    )
    assert PARITY_RTOL < theirs_error < 1e-2 and ours_error < 2 * theirs_error


def test_stock_diffusers_differs_by_its_float32_sigmas():
    """diffusers as shipped computes σ_t from float32 β and ᾱ_t. Near t = 0, 1 − ᾱ_t ≈ 4e-5 (cosine schedule) keeps
    only ~3 digits, so its σ is wrong by up to ~1e-3 relative there; this project's σ is the float64 closed form.
    Its whole loop then differs from this project's by ~1e-3, and the grid's float64 buffers remove that difference:
    the rounding was in diffusers' σ, not in the step."""
    config = {**SCHEDULES["squaredcos_cap_v2"], "prediction_type": "v_prediction"}
    ours, stock = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    alphas_cumprod = torch.cumprod(1 - make_betas("squaredcos_cap_v2", T, 0.0001, 0.02), 0)
    truth = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    ours_error = ((ours.train_sigmas - truth).abs() / truth).max().item()
    stock_sigmas = ((1 - stock.alphas_cumprod.double()) / stock.alphas_cumprod.double()).sqrt()
    stock_error = ((stock_sigmas - truth).abs() / truth).max().item()
    assert ours_error < 1e-12 and 1e-5 < stock_error < 1e-2
    case = ("euler", "squaredcos_cap_v2", ("v_prediction", False), ("linspace", 0), 6)
    assert parity_case(*case, float64=False)[2] > 1e-4  # stock diffusers: far outside the tolerance
    assert parity_case(*case, float64=True)[2] < PARITY_RTOL  # with float64 σ: inside


# ----- closed forms ----------------------------------------------------------------------------------------------


def ddim_reference(spacing: str = "trailing") -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULES["scaled_linear"], timestep_spacing=spacing, clip_sample=False)


def test_euler_with_epsilon_is_ddim_eta_zero_in_unscaled_x():
    """Euler's step x' = x + (σ' − σ) ε̂ is DDIM's η = 0 step (Song et al. 2021 eq. 14) for x = x_t/√ᾱ_t: on the same
    integer timesteps the two trajectories agree after scaling by √ᾱ_t, and both end on the same x₀."""
    euler = EulerDiscreteScheduler(**SCHEDULES["scaled_linear"], timestep_spacing="trailing")
    ddim = ddim_reference()
    euler.set_timesteps(8)
    ddim.set_timesteps(8)
    assert torch.equal(euler.timesteps.long(), ddim.timesteps)
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fixed = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x_t / ddim.alphas_cumprod[ddim.timesteps[0]].sqrt()
    for i, t in enumerate(ddim.timesteps.tolist()):
        out = fake_denoiser(x_t, t, fixed)
        assert torch.allclose(euler.scale_model_input(x, euler.timesteps[i]), x_t, rtol=1e-12, atol=1e-12)
        x = euler.step(out, euler.timesteps[i], x).prev_sample
        x_t = ddim.step(out, t, x_t).prev_sample
        scale = ddim.alphas_cumprod[ddim.timesteps[i + 1]].sqrt() if i + 1 < 8 else 1.0
        assert torch.allclose(x * scale, x_t, rtol=1e-10, atol=1e-10)


def test_dpm_solver_first_order_is_ddim():
    """DPM-Solver++(1), x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) x̂₀, is DDIM with η = 0 (Lu et al. 2022 §3.1)."""
    dpm = DPMSolverMultistepScheduler(
        **SCHEDULES["scaled_linear"], timestep_spacing="trailing", solver_order=1
    )
    ddim = ddim_reference()
    dpm.set_timesteps(8)
    ddim.set_timesteps(8)
    x_dpm = x_ddim = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fixed = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for t in ddim.timesteps.tolist():
        x_dpm = dpm.step(fake_denoiser(x_dpm, t, fixed), t, x_dpm).prev_sample
        x_ddim = ddim.step(fake_denoiser(x_ddim, t, fixed), t, x_ddim).prev_sample
        assert torch.allclose(x_dpm, x_ddim, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_heun_first_stage_is_an_euler_step_and_the_second_averages_the_slopes(zero_snr):
    """Line 8 of EDM's Algorithm 1 averages d in σ; on a zero-SNR schedule the average is of D, in u = 1/σ (heun.py)."""
    config = {
        **SCHEDULES["scaled_linear"],
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": zero_snr,
    }
    heun, euler = HeunDiscreteScheduler(**config), EulerDiscreteScheduler(**config)
    heun.set_timesteps(5)
    euler.set_timesteps(5)
    assert len(heun.timesteps) == 2 * 5 - 1 and heun.order == 2
    x = (
        torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        * heun.init_noise_sigma
    )
    t0, t1 = heun.timesteps[0], heun.timesteps[1]
    out0 = fake_denoiser(heun.scale_model_input(x, t0), t0, x)
    euler.scale_model_input(x, t0)
    stage = heun.step(out0, t0, x).prev_sample
    assert torch.equal(stage, euler.step(out0, t0, x).prev_sample)
    sigma0, sigma1 = float(heun.sigmas[0]), float(heun.sigmas[1])
    out1 = fake_denoiser(heun.scale_model_input(stage, t1), t1, x)
    second = heun.step(out1, t1, stage)
    denoised0, denoised1 = heun._denoised(out0, x, sigma0), second.pred_original_sample
    if zero_snr:
        ratio = sigma1 / sigma0
        expected = ratio * x + (1 - ratio) * (denoised0 + denoised1) / 2
    else:
        expected = x + (sigma1 - sigma0) * ((x - denoised0) / sigma0 + (stage - denoised1) / sigma1) / 2
    assert torch.allclose(second.prev_sample, expected, rtol=1e-12, atol=1e-9)


# Gaussian data x₀ ~ N(μ, s²) per element has the exact denoiser D(x; σ) = μ + s²/(s² + σ²) (x − μ), and its
# probability-flow ODE (dx/dσ = (x − D)/σ) the exact solution x(σ) − μ ∝ √(s² + σ²): from x(σ_0) = σ_0 z it ends at
# x(0) = μ + s/√(s² + σ_0²) (σ_0 z − μ). On a zero-SNR schedule σ_0 ≈ 4096 stands for ∞.
GAUSS_MEAN, GAUSS_STD = 0.5, 1.0
ZERO_SNR_SAMPLERS = ["euler", "euler-karras", "euler_a", "heun", "heun-karras", "dpmpp_2m", "dpmpp_2m-karras"]
ZERO_SNR_SAMPLERS += ["dpmpp_2m_sde", "dpmpp_2m_sde-karras"]


def sample_gaussian_data(sampler: str, spacing: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sampler's final sample, the exact ODE's end from the same x_T), 20,000 float64 elements each, driven by
    the exact denoiser of N(μ, s²) data given as a v-prediction on the default's schedule (zero SNR)."""
    ours_class, _, extra_config = SAMPLERS[sampler]
    scheduler = ours_class(
        **SCHEDULES["scaled_linear"],
        **extra_config,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(19)
    z = torch.randn(20_000, generator=g, dtype=torch.float64)
    x = z * scheduler.init_noise_sigma  # the sampler's own x_T (DPM-Solver++ carries the VP x_t = z)
    mean, std, sigma_max = GAUSS_MEAN, GAUSS_STD, float(scheduler.sigmas[0])
    exact = mean + std / (std**2 + sigma_max**2) ** 0.5 * (sigma_max * z - mean)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)  # x_t = x/√(σ² + 1)
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        alpha_prod = 1 / (1 + sigma**2)
        denoised = mean + std**2 / (std**2 + sigma**2) * (model_input / alpha_prod**0.5 - mean)
        epsilon = (model_input - alpha_prod**0.5 * denoised) / (1 - alpha_prod) ** 0.5
        velocity = alpha_prod**0.5 * epsilon - (1 - alpha_prod) ** 0.5 * denoised
        extra = {} if ours_class is HeunDiscreteScheduler else {"generator": g}
        x = scheduler.step(velocity, t, x, **extra).prev_sample
    return x, exact


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("sampler", ZERO_SNR_SAMPLERS)
def test_no_sampler_blows_up_from_the_zero_snr_sigma_max(sampler, spacing):
    """4 steps from σ_max ≈ 4096: every sampler ends finite, with the data's mean and at most its spread (too few
    steps lose spread, none adds it). Heun's trapezoid in σ left σ_0/(2σ_1) times too much noise after the first
    interval: its samples had 9 to 55 times the data's spread (heun.py)."""
    x, exact = sample_gaussian_data(sampler, spacing, steps=4)
    assert torch.isfinite(x).all()
    assert abs(x.mean() - exact.mean()) < 0.1 * GAUSS_STD
    assert x.std() < 1.2 * GAUSS_STD


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_second_order_samplers_follow_the_exact_flow_from_zero_snr(spacing):
    """10 steps: the 2nd-order samplers end within 0.1 s (root mean square) of the exact ODE solution and closer than
    Euler (measured: Heun 0.07, DPM-Solver++ 2M 0.06, Euler 0.14-0.15; Heun with the trapezoid in σ 0.30-0.55)."""
    error = {}
    for sampler in ("euler", "heun", "dpmpp_2m"):
        x, exact = sample_gaussian_data(sampler, spacing, steps=10)
        error[sampler] = float((x - exact).pow(2).mean().sqrt())
    assert error["heun"] < 0.1 * GAUSS_STD and error["dpmpp_2m"] < 0.1 * GAUSS_STD, error
    assert error["heun"] < error["euler"] and error["dpmpp_2m"] < error["euler"], error


ALL_SAMPLERS = [
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    DPMSolverMultistepScheduler,
]


@pytest.mark.parametrize("scheduler_class", ALL_SAMPLERS)
@pytest.mark.parametrize(
    "prediction_type,zero_snr", [("epsilon", False), ("v_prediction", True), ("sample", False)]
)
def test_a_denoiser_that_knows_x0_lands_on_x0(scheduler_class, prediction_type, zero_snr):
    """With D(x; σ) = x₀ exactly, every sampler's last step returns x₀ (its final σ is 0), the stochastic ones too."""
    scheduler = scheduler_class(
        **SCHEDULES["scaled_linear"], prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr
    )
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        alpha_prod = 1 / (1 + sigma**2)  # the VP ᾱ of this σ (sigmas.py)
        epsilon = (model_input - alpha_prod**0.5 * x0) / (1 - alpha_prod) ** 0.5
        output = {
            "epsilon": epsilon,
            "sample": x0,
            "v_prediction": alpha_prod**0.5 * epsilon - (1 - alpha_prod) ** 0.5 * x0,
        }[prediction_type]
        extra = {} if scheduler_class is HeunDiscreteScheduler else {"generator": g}
        x = scheduler.step(output, t, x, **extra).prev_sample
    assert torch.allclose(x, x0, atol=1e-6)


def test_karras_sigmas_are_eq_5_and_their_timesteps_invert_the_table():
    scheduler = EulerDiscreteScheduler(**SCHEDULES["scaled_linear"], use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas[:-1]
    rho = 7.0
    ramp = sigmas ** (1 / rho)
    assert torch.allclose(ramp.diff(), ramp.diff()[:1].expand(9), rtol=1e-9)  # evenly spaced in σ^{1/ρ}
    assert scheduler.sigmas[-1] == 0
    t = scheduler.timesteps.double()
    low = t.floor().long()
    # σ at t, interpolated linearly in log σ, gives back the Karras σ (to float32 timestep rounding)
    log_table = scheduler.train_sigmas.log()
    log_sigma = log_table[low] + (t - low) * (log_table[(low + 1).clamp(max=T - 1)] - log_table[low])
    assert torch.allclose(log_sigma.exp(), sigmas, rtol=1e-4)


# ----- the diffusers API -----------------------------------------------------------------------------------------

OURS = [DDIMScheduler, DDPMScheduler, *ALL_SAMPLERS]


def test_classes_are_exported_under_diffusers_names():
    for cls in OURS:
        assert getattr(latentdiff, cls.__name__) is cls
        assert cls.__name__ in dir(diffusers)
    assert set(DDIMScheduler().compatibles) == set(OURS)


@pytest.mark.parametrize("scheduler_class", OURS)
def test_config_is_a_read_only_mapping_and_attributes(scheduler_class):
    scheduler = scheduler_class(prediction_type="v_prediction")
    config = scheduler.config
    assert isinstance(config, dict) and config["prediction_type"] == config.prediction_type == "v_prediction"
    assert dict(config)["num_train_timesteps"] == T and set(config) == set(vars(config))
    with pytest.raises(TypeError, match="read-only"):
        config["prediction_type"] = "epsilon"
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    assert json.loads(json.dumps(config))["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("scheduler_class", ALL_SAMPLERS)
def test_save_config_from_pretrained_and_diffusers_reads_it(scheduler_class, tmp_path):
    ours = scheduler_class(
        **SCHEDULES["scaled_linear"],
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    ours.save_config(tmp_path / "scheduler")
    loaded = scheduler_class.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.config == ours.config
    theirs = getattr(diffusers, scheduler_class.__name__).from_pretrained(tmp_path, subfolder="scheduler")
    for key, value in ours.config.items():
        if key in theirs.config and key != "trained_betas":
            assert theirs.config[key] == value, key
    same, same_scale, error = loop_error(loaded, diffusers_sampler(type(theirs), dict(ours.config)), 8)
    assert same and same_scale and error < PARITY_RTOL


def test_from_config_crosses_libraries_both_ways():
    ours = DDIMScheduler(
        **SCHEDULES["scaled_linear"], prediction_type="v_prediction", rescale_betas_zero_snr=True
    )
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(
        ours.config
    )  # diffusers takes our config as a dict
    assert theirs.config.prediction_type == "v_prediction" and theirs.config.rescale_betas_zero_snr
    back = EulerDiscreteScheduler.from_config(theirs.config, timestep_spacing="trailing")
    assert back.config.beta_schedule == "scaled_linear" and back.config.timestep_spacing == "trailing"
    assert back.config.rescale_betas_zero_snr and back.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("scheduler_class", OURS)
def test_step_with_return_dict_false_is_a_tuple(scheduler_class):
    scheduler = scheduler_class()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    extra = (
        {} if scheduler_class is HeunDiscreteScheduler else {"generator": torch.Generator().manual_seed(8)}
    )
    output = scheduler.step(torch.zeros(SHAPE), t, x, **extra)
    scheduler.set_timesteps(4)
    extra = (
        {} if scheduler_class is HeunDiscreteScheduler else {"generator": torch.Generator().manual_seed(8)}
    )
    as_tuple = scheduler.step(torch.zeros(SHAPE), t, x, return_dict=False, **extra)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.prev_sample)
    assert torch.equal(as_tuple[1], output.pred_original_sample)


def ddpm_loop_error(ours: DDPMScheduler, theirs, timesteps: list[int]) -> float:
    """Worst relative error of prev_sample over DDPM steps at ``timesteps``, the same z on both sides."""
    x_ours = x_theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    g_ours, g_theirs = torch.Generator().manual_seed(10), torch.Generator().manual_seed(10)
    error = 0.0
    for t in timesteps:
        z = torch.randn(SHAPE, generator=g_ours) if t > 0 else None  # diffusers draws only where t > 0
        x_ours = ours.step(fake_denoiser(x_ours, t, x_ours), t, x_ours, variance_noise=z).prev_sample
        x_theirs = theirs.step(
            fake_denoiser(x_theirs, t, x_theirs), t, x_theirs, generator=g_theirs
        ).prev_sample
        error = max(error, relative_error(x_ours, x_theirs))
    return error


def test_ddpm_custom_timesteps_match_diffusers():
    config = {**SCHEDULES["scaled_linear"], "clip_sample": False}
    custom = [999, 700, 321, 50, 0]
    ours, theirs = DDPMScheduler(**config), diffusers_scheduler(diffusers.DDPMScheduler, config)
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == custom
    assert ddpm_loop_error(ours, theirs, custom) < PARITY_RTOL
    with pytest.raises(ValueError, match="descending"):
        DDPMScheduler().set_timesteps(timesteps=[0, 500])


def test_ddpm_steps_the_training_chain_before_set_timesteps_as_diffusers():
    config = {**SCHEDULES["scaled_linear"], "clip_sample": False}
    ours, theirs = DDPMScheduler(**config), diffusers_scheduler(diffusers.DDPMScheduler, config)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == list(range(T - 1, -1, -1))
    assert ddpm_loop_error(ours, theirs, list(range(T - 1, T - 6, -1))) < PARITY_RTOL


def test_sigma_samplers_step_the_training_chain_before_set_timesteps():
    scheduler = EulerDiscreteScheduler()
    assert len(scheduler.timesteps) == T and scheduler.timesteps[0] == T - 1
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)) * scheduler.init_noise_sigma
    chain = _run(scheduler, x)
    explicit = EulerDiscreteScheduler()
    explicit.set_timesteps(T)  # linspace over all T: the same integers
    assert torch.equal(chain[-1], _run(explicit, x)[-1])


# ----- names and bad input ---------------------------------------------------------------------------------------


def test_sampler_names_build_the_samplers_they_name():
    base = DDIMScheduler(**SCHEDULES["scaled_linear"], prediction_type="v_prediction").config
    sde = sampler_from_config("dpmpp_2m_sde", base, karras=True)
    assert isinstance(sde, DPMSolverMultistepScheduler) and sde.config.algorithm_type == "sde-dpmsolver++"
    assert sde.config.use_karras_sigmas and sde.config.prediction_type == "v_prediction"
    assert isinstance(sampler_from_config("euler_a", base), EulerAncestralDiscreteScheduler)
    assert not sampler_from_config("heun", base).config.use_karras_sigmas


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: check_sampler("dpm++"), "sampler='dpm\\+\\+' is unknown"),
        (lambda: check_sampler("euler_a", karras=True), "no Karras sigmas"),
        (lambda: check_sampler("ddim", karras=True), "no Karras sigmas"),
        (lambda: EulerDiscreteScheduler().set_timesteps(T + 1), "num_inference_steps=1001"),
        (lambda: DPMSolverMultistepScheduler(solver_order=3), "solver_order=3"),
        (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver"), "algorithm_type"),
        (lambda: EulerDiscreteScheduler().set_timesteps(timesteps=[999, 0]), "custom timesteps"),
        (lambda: HeunDiscreteScheduler(final_sigmas_type="one"), "final_sigmas_type"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("scheduler_class", ALL_SAMPLERS)
def test_epsilon_with_zero_snr_is_refused(scheduler_class):
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True with prediction_type='epsilon'"):
        scheduler_class(rescale_betas_zero_snr=True)
    ddim_config = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    assert scheduler_class.from_config(ddim_config).config.rescale_betas_zero_snr


def test_a_step_past_the_last_is_an_error():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    x = torch.zeros(SHAPE)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros(SHAPE), t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps again"):
        scheduler.step(torch.zeros(SHAPE), scheduler.timesteps[-1], x)
    assert isinstance(scheduler, KarrasScheduler)


if __name__ == "__main__":  # the parity grid's worst errors, for the record
    worst: dict[str, tuple[float, tuple]] = {}
    for case in GRID:
        same, same_scale, error = parity_case(*case)
        assert same and same_scale, case
        if error >= worst.get(case[0], (-1.0, ()))[0]:
            worst[case[0]] = (error, case)
    for name, (error, case) in worst.items():
        print(f"{name}: worst sample error {error:.2e} at {case}")
    print(f"{len(GRID)} loops")
