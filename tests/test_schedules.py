"""The schedules and derived tables equal DESIGN.md §1's closed forms (float64) and diffusers' own."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_pipeline import NoiseSchedule, cosine_betas, linear_betas, make_betas
from ddpm_pipeline.option_values import canonical_prediction_type


def closed_form_linear(num_steps: int) -> np.ndarray:
    scale = 1000 / num_steps
    start, end = 1e-4 * scale, 0.02 * scale
    return np.array([start + (end - start) * t / (num_steps - 1) for t in range(num_steps)])


def closed_form_cosine(num_steps: int, s: float = 0.008) -> np.ndarray:
    def f(t: float) -> float:
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - (f(t + 1) / f(0)) / (f(t) / f(0)), 0.999) for t in range(num_steps)])


@pytest.mark.parametrize("num_steps", [1000, 500, 4000])
def test_linear_betas_closed_form(num_steps):
    betas = linear_betas(num_steps)
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), closed_form_linear(num_steps), rtol=0, atol=1e-12)
    # scaled so that T·mean(β) stays that of T = 1000
    assert betas.sum().item() == pytest.approx(closed_form_linear(1000).sum(), rel=1e-12)


@pytest.mark.parametrize("num_steps", [1000, 250, 4000])
def test_cosine_betas_closed_form(num_steps):
    betas = cosine_betas(num_steps)
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), closed_form_cosine(num_steps), rtol=0, atol=1e-12)
    assert betas.max().item() <= 0.999
    assert betas[-1].item() == 0.999  # the cap binds at the last step


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_derived_tables_closed_form(schedule):
    num_steps = 1000
    betas = closed_form_linear(num_steps) if schedule == "linear" else closed_form_cosine(num_steps)
    tables = NoiseSchedule.from_betas(make_betas(schedule, num_steps))
    alpha_bar = np.cumprod(1 - betas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    posterior_variance = (1 - alpha_bar_prev) * betas / (1 - alpha_bar)
    expected = {
        "alphas": 1 - betas,
        "alphas_cumprod": alpha_bar,
        "alphas_cumprod_prev": alpha_bar_prev,
        "sqrt_alphas_cumprod": np.sqrt(alpha_bar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alpha_bar),
        "posterior_mean_coef1": np.sqrt(alpha_bar_prev) * betas / (1 - alpha_bar),
        "posterior_mean_coef2": np.sqrt(1 - betas) * (1 - alpha_bar_prev) / (1 - alpha_bar),
        "posterior_variance": posterior_variance,
        "posterior_variance_clipped": np.concatenate([[posterior_variance[1]], posterior_variance[1:]]),
        "posterior_log_variance_clipped": np.log(np.concatenate([[posterior_variance[1]], posterior_variance[1:]])),
    }
    for name, value in expected.items():
        got = getattr(tables, name)
        assert got.dtype == torch.float64, name
        np.testing.assert_allclose(got.numpy(), value, rtol=1e-12, atol=1e-12, err_msg=name)
    assert tables.posterior_variance[0].item() == 0.0
    # μ̃ = b x0 + c x_t equals (x_t - β/√(1-ᾱ) ε)/√α for x_t = √ᾱ x0 + √(1-ᾱ) ε
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal(num_steps), rng.standard_normal(num_steps)
    x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * eps
    mu_from_x0 = tables.posterior_mean_coef1.numpy() * x0 + tables.posterior_mean_coef2.numpy() * x_t
    mu_from_eps = (x_t - betas / np.sqrt(1 - alpha_bar) * eps) / np.sqrt(1 - betas)
    np.testing.assert_allclose(mu_from_x0, mu_from_eps, rtol=1e-9, atol=1e-12)


def test_linear_matches_diffusers_linear():
    ours = NoiseSchedule.from_betas(make_betas("linear", 1000))
    stock = DDPMScheduler(beta_schedule="linear")
    # diffusers computes in float32: ours rounded to float32 agree to one float32 ulp
    np.testing.assert_allclose(ours.betas.float().numpy(), stock.betas.numpy(), rtol=2e-7, atol=0)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), stock.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_cosine_matches_diffusers_squaredcos_cap_v2():
    ours = make_betas("cosine", 1000)
    stock = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    # diffusers evaluates the same formula in Python float64 and stores float32
    np.testing.assert_allclose(ours.float().numpy(), stock.betas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.numpy(), stock.betas.double().numpy(), rtol=1e-7, atol=0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_vlb_weights_closed_forms(variance_type):
    tables = NoiseSchedule.from_betas(make_betas("linear", 1000))
    betas, alphas, alpha_bar = tables.betas, tables.alphas, tables.alphas_cumprod
    alpha_bar_prev = tables.alphas_cumprod_prev
    if variance_type == "fixed_small":
        sigma2 = tables.posterior_variance_clipped
    else:
        sigma2 = torch.cat([tables.posterior_variance[1:2], betas[1:]])
    closed = {
        "mu": 1 / (2 * sigma2),
        "sample": alpha_bar_prev * betas**2 / (2 * sigma2 * (1 - alpha_bar) ** 2),
        "epsilon": betas**2 / (2 * sigma2 * alphas * (1 - alpha_bar)),
    }
    for target, raw in closed.items():
        weights = tables.vlb_weights(target, variance_type)
        assert weights.mean().item() == pytest.approx(1.0, rel=1e-12)
        np.testing.assert_allclose(weights.numpy(), (raw / raw.mean()).numpy(), rtol=1e-10)
    # with fixed_small, ε's true-bound weight is 1/2 · β/(α(1-ᾱ_{t-1})) for t ≥ 1
    if variance_type == "fixed_small":
        raw = closed["epsilon"][1:]
        np.testing.assert_allclose(raw.numpy(), (0.5 * betas / (alphas * (1 - alpha_bar_prev)))[1:].numpy(), rtol=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_closed_forms(schedule, gamma):
    tables = NoiseSchedule.from_betas(make_betas(schedule, 1000))
    alpha_bar = tables.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    np.testing.assert_allclose(tables.signal_to_noise_ratio().numpy(), snr.numpy(), rtol=1e-12)
    capped = torch.minimum(snr, torch.full_like(snr, gamma))
    closed = {
        "epsilon": torch.minimum(torch.ones_like(snr), gamma / snr),  # Hang et al.'s min(1, γ/SNR_t)
        "sample": capped,
        "v_prediction": capped / (snr + 1),
        "mu": capped / tables.posterior_mean_coef1**2,
    }
    for target, weights in closed.items():
        np.testing.assert_allclose(tables.min_snr_weights(target, gamma).numpy(), weights.numpy(), rtol=1e-10)
    # the capped steps are exactly those with SNR_t > γ: early t, where x_t is nearly x_0
    capped_steps = tables.min_snr_weights("epsilon", gamma) < 1 - 1e-9
    assert torch.equal(capped_steps, snr > gamma) and capped_steps[0] and not capped_steps[-1]
    with pytest.raises(ValueError, match="gamma must be positive"):
        tables.min_snr_weights("epsilon", 0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_training_scripts(prediction_type):
    """diffusers' train_text_to_image.py --snr_gamma: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    from diffusers.training_utils import compute_snr

    from ddpm_pipeline import DDPMTargetScheduler

    scheduler = DDPMTargetScheduler(beta_schedule="linear", prediction_type=prediction_type)
    timesteps = torch.arange(1000)
    snr = compute_snr(scheduler, timesteps)
    stock = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    stock = stock / snr if prediction_type == "epsilon" else stock / (snr + 1)
    ours = scheduler.loss_weight(timesteps, "min_snr", snr_gamma=5.0)
    assert ours.dtype == torch.float32
    # diffusers takes 1 - ᾱ_t in float32, which loses digits where ᾱ_t ≈ 1 (1.7e-4 at t = 0); ours is float64
    np.testing.assert_allclose(ours.numpy(), stock.numpy(), rtol=5e-4)
    np.testing.assert_allclose(ours[100:].numpy(), stock[100:].numpy(), rtol=1e-5)


def test_conversion_coefficients_match_closed_forms():
    tables = NoiseSchedule.from_betas(make_betas("cosine", 1000))
    betas, alphas, alpha_bar = tables.betas, tables.alphas, tables.alphas_cumprod
    k1, k2 = tables.conversion_coefficients("epsilon", "mu")  # μ = (x_t - β/√(1-ᾱ) ε)/√α
    np.testing.assert_allclose(k1.numpy(), (-betas / ((1 - alpha_bar).sqrt() * alphas.sqrt())).numpy(), rtol=1e-10)
    np.testing.assert_allclose(k2.numpy(), (1 / alphas.sqrt()).numpy(), rtol=1e-10)
    k1, k2 = tables.conversion_coefficients("epsilon", "sample")  # x0 = (x_t - √(1-ᾱ) ε)/√ᾱ
    np.testing.assert_allclose(k1.numpy(), (-(1 - alpha_bar).sqrt() / alpha_bar.sqrt()).numpy(), rtol=1e-10)
    np.testing.assert_allclose(k2.numpy(), (1 / alpha_bar.sqrt()).numpy(), rtol=1e-10)
    k1, k2 = tables.conversion_coefficients("mu", "sample")  # x0 = (μ - c x_t)/b
    np.testing.assert_allclose(k1.numpy(), (1 / tables.posterior_mean_coef1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        k2.numpy(), (-tables.posterior_mean_coef2 / tables.posterior_mean_coef1).numpy(), rtol=1e-12
    )


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="Unknown beta_schedule 'quadratic'"):
        make_betas("quadratic", 1000)
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer"):
        linear_betas(1)
    with pytest.raises(ValueError, match="reaches β ≥ 1"):  # the scaled linear schedule's last β: 0.02 · 1000/20
        linear_betas(20)
    assert float(linear_betas(21)[-1]) == pytest.approx(0.02 * 1000 / 21)
    with pytest.raises(ValueError, match="open interval"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="Unknown prediction_type 'noise'"):
        canonical_prediction_type("noise")
    assert canonical_prediction_type("x0") == "sample"
