"""The variational bound in bits/dim: closed forms per term, an oracle with a known answer, and a
bound that falls as a tiny model trains."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_pipeline import DDPMTargetScheduler, DDPMUNet, diffusion_loss
from ddpm_pipeline.likelihood import (
    BoundTerms,
    bound_evaluations_per_image,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    quantize,
    stratified_timesteps,
    timestep_bpd,
    timestep_strata,
    variational_bound,
)

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1


class Oracle(torch.nn.Module):
    """The exact denoiser for data that is one constant image ``c``: it returns the configured
    target of ``x0 = c`` given ``x_t`` (so ``x̂0 = c`` for every target)."""

    def __init__(self, scheduler: DDPMTargetScheduler, image: torch.Tensor):
        super().__init__()
        self.scheduler = scheduler
        self.image = image

    def forward(self, sample, timesteps):
        x0 = self.image.expand_as(sample).to(sample.dtype)
        root_bar = self.scheduler.schedule.sqrt_alphas_cumprod[timesteps].reshape(-1, 1, 1, 1).to(sample.dtype)
        root_one_minus = self.scheduler.schedule.sqrt_one_minus_alphas_cumprod[timesteps].reshape(-1, 1, 1, 1).to(sample.dtype)
        noise = (sample - root_bar * x0) / root_one_minus
        return self.scheduler.get_target(x0, noise, timesteps, noisy_samples=sample)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mean, scale", [(0.0, 0.01), (0.3, 0.2), (-0.97, 0.05), (0.99, 1e-3), (0.5, 2.0)])
def test_discretized_gaussian_is_a_distribution_over_the_256_levels(mean, scale):
    log_p = discretized_gaussian_log_likelihood(
        LEVELS, torch.full_like(LEVELS, mean), torch.full_like(LEVELS, math.log(scale))
    )
    assert torch.isfinite(log_p).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-10)
    # Against SciPy's Φ on each bin (edges extended to ±∞ at the ends).
    upper = np.where(LEVELS.numpy() > 0.999, np.inf, LEVELS.numpy() + 1 / 255)
    lower = np.where(LEVELS.numpy() < -0.999, -np.inf, LEVELS.numpy() - 1 / 255)
    # the side of the mean each bin lies on, so that SciPy's reference does not cancel either
    mass = np.where(lower > mean, norm.sf(lower, mean, scale) - norm.sf(upper, mean, scale),
                    norm.cdf(upper, mean, scale) - norm.cdf(lower, mean, scale))  # fmt: skip
    big = mass > 1e-200
    np.testing.assert_allclose(log_p.numpy()[big], np.log(mass[big]), rtol=1e-9, atol=1e-11)


def test_discretized_gaussian_far_tail_is_finite_and_accurate():
    # A bin 40 standard deviations above the mean: Φ(u) - Φ(l) cancels to 0 naively.
    x = torch.tensor([0.5], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x, torch.tensor([0.1], dtype=torch.float64), torch.tensor([math.log(0.01)], dtype=torch.float64))
    expected = norm.logsf((0.5 - 1 / 255 - 0.1) / 0.01) + np.log1p(-np.exp(norm.logsf((0.5 + 1 / 255 - 0.1) / 0.01) - norm.logsf((0.5 - 1 / 255 - 0.1) / 0.01)))  # noqa: E501
    assert log_p.item() == pytest.approx(expected, rel=1e-9)


def test_discretized_gaussian_gradients_are_finite_in_every_bin():
    # Training a learned variance differentiates the decoder term: bins far on either side of the
    # mean, and edge bins, must not give NaN or infinite gradients.
    x = LEVELS.repeat(9)
    mean = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64).repeat_interleave(len(LEVELS)).requires_grad_()
    log_scale = torch.full_like(x, math.log(1e-3)).requires_grad_()
    discretized_gaussian_log_likelihood(x, mean, log_scale).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "mu"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_oracle_on_a_constant_image_gives_the_closed_form_bound(prediction_type, variance_type):
    """Data = one constant image c, model = the exact denoiser: every term has a closed form.

    The posterior mean is matched exactly, so each KL is ½(log σ_t²/β̃_t + β̃_t/σ_t² - 1) per
    dimension (0 for fixed_small); the prior is KL(N(√ᾱ_T c, 1-ᾱ_T) ‖ N(0,1)); the decoder is
    -log of the Gaussian mass N(c, β̃_1) puts on c's bin.
    """
    T = 40
    scheduler = DDPMTargetScheduler(num_train_timesteps=T, prediction_type=prediction_type, variance_type=variance_type)
    value = LEVELS[150].item()
    image = torch.full((1, 1, 4, 4), value, dtype=torch.float64)
    terms = variational_bound(Oracle(scheduler, image), scheduler, image.expand(3, -1, -1, -1),
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    s = scheduler.schedule
    ln2 = math.log(2)
    sigma2 = s.model_variance(variance_type)
    kl = 0.5 * ((sigma2[1:] / s.posterior_variance[1:]).log() + s.posterior_variance[1:] / sigma2[1:] - 1)
    expected_diffusion = kl.sum().item() / ln2
    a_T = s.alphas_cumprod[-1].item()
    expected_prior = 0.5 * (-math.log(1 - a_T) + (1 - a_T) + a_T * value**2 - 1) / ln2
    sigma_0 = math.sqrt(s.posterior_variance[1].item())
    expected_decoder = -math.log(norm.cdf(1 / 255 / sigma_0) - norm.cdf(-1 / 255 / sigma_0)) / ln2
    torch.testing.assert_close(terms.diffusion, torch.full((3,), expected_diffusion, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(terms.prior, torch.full((3,), expected_prior, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.decoder, torch.full((3,), expected_decoder, dtype=torch.float64), rtol=1e-9, atol=0)
    assert terms.per_timestep.shape == (3, T)
    if variance_type == "fixed_small":
        assert terms.diffusion.abs().max() < 1e-9


def test_timestep_strata_are_log_spaced_and_cover_every_timestep_once():
    edges = timestep_strata(1000, 20)
    assert edges[0] == 1 and edges[-1] == 1000 and len(edges) == 21
    widths = np.diff(edges)
    assert widths.min() >= 1 and list(widths[:5]) == [1, 1, 1, 1, 1]  # the steep start: single, exact timesteps
    assert (np.diff(widths) >= 0).all()  # ever wider strata
    assert timestep_strata(30, 29) == list(range(1, 31))  # as many strata as timesteps: each its own
    timesteps, weights = stratified_timesteps(1000, 20, 500, torch.Generator().manual_seed(0))
    assert timesteps.shape == (500, 20) and weights.sum() == 999
    for k in range(20):  # stratum k's draws stay inside it
        assert edges[k] <= timesteps[:, k].min() and timesteps[:, k].max() < edges[k + 1]
    with pytest.raises(ValueError, match="num_strata must be between 1 and T-1 = 29"):
        timestep_strata(30, 30)


def test_stratified_timestep_estimate_is_unbiased_and_far_tighter_than_uniform_draws():
    """K stratified timesteps weighted by their strata's widths average to the exact sum
    (fixed_large oracle: each term is a known constant, so only the choice of timesteps is random),
    with a spread well below that of K timesteps drawn uniformly and scaled by (T-1)/K."""
    T, K = 100, 8
    scheduler = DDPMTargetScheduler(num_train_timesteps=T, variance_type="fixed_large")
    image = torch.full((1, 1, 2, 2), 0.2, dtype=torch.float64)
    images = quantize(image).expand(2000, -1, -1, -1)
    oracle = Oracle(scheduler, quantize(image))
    exact = variational_bound(oracle, scheduler, images[:1])
    estimate = variational_bound(oracle, scheduler, images, num_timesteps=K, generator=torch.Generator().manual_seed(1))
    standard_error = estimate.diffusion.std().item() / math.sqrt(len(images))
    assert standard_error > 0  # really random
    assert abs(estimate.diffusion.mean().item() - exact.diffusion.item()) < 4 * standard_error
    assert estimate.per_timestep is None
    # the network evaluations each makes per batch, as bound_evaluations_per_image counts them
    calls = []
    counting = lambda *args: calls.append(1) or oracle(*args)  # noqa: E731
    for timesteps in (None, K, T - 1):
        calls.clear()
        variational_bound(counting, scheduler, images[:3], num_timesteps=timesteps, generator=torch.Generator().manual_seed(1))
        assert len(calls) == bound_evaluations_per_image(T, timesteps) == (T if timesteps in (None, T - 1) else K + 1)
    terms = exact.per_timestep[0, 1:].numpy()  # L_{t-1} for t = 1..T-1
    n = len(terms)
    uniform_std = math.sqrt(n**2 / K * terms.var() * (n - K) / (n - 1))  # K of n without replacement, scaled by n/K
    assert estimate.diffusion.std().item() < 0.2 * uniform_std  # 0.094 against 1.70 here


def test_prior_and_timestep_terms_match_their_definitions():
    scheduler = DDPMTargetScheduler(num_train_timesteps=50, prediction_type="x0", clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x0 = quantize(torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1)
    t = torch.tensor([7, 0])
    xt = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    prediction = x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # near x0: SciPy does not underflow
    got = timestep_bpd(prediction, scheduler, x0, xt, t)
    s = scheduler.schedule
    # t = 7: KL between N(μ̃(x0), β̃_7) and N(μ̃(x̂0), β̃_7) = (b_7 (x0 - x̂0))² / (2 β̃_7)
    b = s.posterior_mean_coef1[7].item()
    kl = ((b * (x0[0] - prediction[0])) ** 2 / (2 * s.posterior_variance[7].item())).sum().item()
    assert got[0].item() == pytest.approx(kl / (9 * math.log(2)), rel=1e-9)
    # t = 0: the decoder with mean x̂0 and variance β̃_1
    sd = math.sqrt(s.posterior_variance[1].item())
    x, m = x0[1].flatten().numpy(), prediction[1].flatten().numpy()
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    nll = -np.log(norm.cdf(upper, m, sd) - norm.cdf(lower, m, sd)).sum()
    assert got[1].item() == pytest.approx(nll / (9 * math.log(2)), rel=1e-9)
    a_T = s.alphas_cumprod[-1].item()
    prior = 0.5 * (-math.log(1 - a_T) + (1 - a_T) + a_T * x0**2 - 1).flatten(1).sum(1) / (9 * math.log(2))
    torch.testing.assert_close(prior_bpd(scheduler, x0), prior, rtol=1e-12, atol=0)


def test_bound_falls_as_a_tiny_model_trains():
    from ddpm_pipeline.data import bundled_dataset
    from ddpm_pipeline.images import ImagePreprocessor

    dataset = bundled_dataset().select(range(32))
    preprocess = ImagePreprocessor(16, 1, "crop")
    images = torch.stack([preprocess(row["image"]) for row in dataset])
    scheduler = DDPMTargetScheduler(num_train_timesteps=50, prediction_type="mu")
    torch.manual_seed(0)
    unet = DDPMUNet.from_preset("ddpm-tiny-16")

    def bound() -> float:
        unet.eval()
        terms = variational_bound(unet, scheduler, images, generator=torch.Generator().manual_seed(0))
        unet.train()
        return terms.total.mean().item()

    before = bound()
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = diffusion_loss(unet, scheduler, images, weighting="vlb", generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = bound()
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.8 * before, (before, after)


def test_terms_of_batches_concatenate_and_summarize():
    first = BoundTerms(torch.tensor([0.1, 0.2]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.5]), torch.ones(2, 4))
    second = BoundTerms(torch.tensor([0.3]), torch.tensor([4.0]), torch.tensor([2.0]), torch.zeros(1, 4))
    joined = BoundTerms.concatenate([first, second])
    totals = np.array([3.1, 4.7, 6.3])
    summary = joined.summary()
    assert summary["bits_per_dim"] == pytest.approx(totals.mean())
    assert summary["bits_per_dim_stderr"] == pytest.approx(totals.std(ddof=1) / math.sqrt(3))
    assert (summary["prior_term"], summary["diffusion_terms"], summary["decoder_term"]) == pytest.approx((0.2, 3.0, 1.5))
    assert joined.per_timestep.shape == (3, 4)
    # an estimate (no per-timestep curve) in any part: no curve for the whole; one image: no standard error
    assert BoundTerms.concatenate([first, BoundTerms(*(t[:1] for t in (first.prior, first.diffusion, first.decoder)))]).per_timestep is None
    assert BoundTerms(torch.tensor([0.1]), torch.tensor([2.0]), torch.tensor([1.0])).summary()["bits_per_dim_stderr"] is None


def test_terms_per_data_dimension_count_each_image_own_dimensions():
    """A padded image's bound per dimension of its own: the same bits in all, over its share of the
    canvas's dimensions; the summary keeps the canvas's number beside it."""
    canvas = BoundTerms(torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64),
                        torch.tensor([1.0, 1.5], dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))  # fmt: skip
    share = torch.tensor([784 / 1024, 1.0])  # 28×28 on a 32×32 canvas, and an image that fills it
    own = canvas.per_data_dimension(share)
    assert torch.allclose(own.total * own.data_share, canvas.total)
    assert own.total.tolist() == pytest.approx([3.1 * 1024 / 784, 4.7])
    assert own.per_timestep[0].tolist() == pytest.approx([1024 / 784] * 4) and own.per_timestep[1].tolist() == [1.0] * 4
    summary = own.summary()
    assert summary["padded_images"] == 1
    assert summary["canvas_bits_per_dim"] == pytest.approx(canvas.summary()["bits_per_dim"])
    assert summary["bits_per_dim"] == pytest.approx((3.1 * 1024 / 784 + 4.7) / 2)
    # nothing padded: the summary is the canvas's, with nothing added
    assert canvas.per_data_dimension(torch.ones(2)).summary() == canvas.summary()
    # a part without shares (terms per canvas dimension) joins as images that fill the canvas
    assert BoundTerms.concatenate([own, canvas]).data_share.tolist() == pytest.approx([784 / 1024, 1, 1, 1])


def test_the_bound_refuses_images_outside_the_model_range():
    """Pixels of 0–255 would be clamped to white before the bound: a number about other images."""
    scheduler = DDPMTargetScheduler(num_train_timesteps=20, beta_schedule="cosine")
    unet = DDPMUNet.from_preset("ddpm-tiny-16")
    pixels = torch.randint(0, 256, (2, 1, 16, 16))
    with pytest.raises(TypeError, match=r"float images in \[-1, 1\], got torch.int64: convert 0–255 pixels with "
                                        "ddpm_pipeline.images.levels_to_model_range"):  # fmt: skip
        variational_bound(unet, scheduler, pixels)
    with pytest.raises(ValueError, match=r"these span \[0, 255\]. Convert 0–255 pixels with levels_to_model_range"):
        variational_bound(unet, scheduler, torch.arange(256.0).reshape(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"these span \[-1.5, 1\]. Convert them to \[-1, 1\]"):
        variational_bound(unet, scheduler, torch.full((1, 1, 16, 16), -1.5).index_fill(3, torch.tensor([0]), 1.0))
    # the ends of the range are the data's, and half a bin beyond them is rounding
    edge = torch.tensor([-1.0, 1.0 + 0.9 / 255]).repeat(128).reshape(1, 1, 16, 16)
    terms = variational_bound(unet, scheduler, edge, num_timesteps=2, generator=torch.Generator().manual_seed(0))
    assert terms.total.shape == (1,) and torch.isfinite(terms.total).all() and terms.total.item() > 0
