"""The training objective: exact at the optimum, and a tiny model overfits a handful of images."""

import pytest
import torch

from ddpm_pipeline import DDPMTargetScheduler, DDPMUNet, diffusion_loss, diffusion_loss_terms


def handful_of_images(count: int = 8, size: int = 16) -> torch.Tensor:
    """Distinct simple shapes in [-1, 1]: squares, discs and stripes at a few positions."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for i in range(count):
        kind, offset = i % 3, 2 + i
        if kind == 0:
            mask = (ys >= offset) & (ys < offset + 6) & (xs >= 3) & (xs < 9)
        elif kind == 1:
            mask = (ys - 8) ** 2 + (xs - offset) ** 2 < 12
        else:
            mask = ((xs + offset) // 3) % 2 == 0
        images.append(mask.float() * 2 - 1)
    return torch.stack(images)[:, None]


class Oracle(torch.nn.Module):
    """Returns the exact target for known x0 (a perfect denoiser for a single training image)."""

    def __init__(self, scheduler, x0):
        super().__init__()
        self.scheduler, self.x0 = scheduler, x0

    def forward(self, noisy, timesteps):
        s = self.scheduler
        root_bar = s.schedule.sqrt_alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
        root_one_minus = s.schedule.sqrt_one_minus_alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
        noise = (noisy - root_bar * self.x0) / root_one_minus
        target = s.get_target(self.x0, noise, timesteps, noisy_samples=noisy)

        class Out:
            sample = target

        return Out()


@pytest.mark.parametrize("target", ["epsilon", "x0", "mu", "v_prediction"])
@pytest.mark.parametrize("weighting", ["simple", "vlb", "min_snr"])
def test_loss_is_zero_for_the_exact_denoiser(target, weighting):
    scheduler = DDPMTargetScheduler(prediction_type=target)
    x0 = handful_of_images(4)
    loss = diffusion_loss(Oracle(scheduler, x0), scheduler, x0, weighting, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


@pytest.mark.parametrize(
    "target,weighting", [("epsilon", "simple"), ("x0", "simple"), ("mu", "simple"), ("mu", "vlb"), ("x0", "min_snr")]
)
def test_tiny_model_overfits_a_handful_of_images(target, weighting):
    torch.manual_seed(0)
    images = handful_of_images(8)
    scheduler = DDPMTargetScheduler(prediction_type=target, num_train_timesteps=1000)
    unet = DDPMUNet.from_preset("ddpm-tiny-16")
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    # a fixed evaluation set of (t, ε) pairs, so the before/after losses are comparable
    evaluation = torch.Generator().manual_seed(123)
    eval_images = images.repeat(4, 1, 1, 1)
    eval_t = torch.randint(0, 1000, (eval_images.shape[0],), generator=evaluation)
    eval_noise = torch.randn(eval_images.shape, generator=evaluation)

    def evaluate() -> float:
        with torch.no_grad():
            return diffusion_loss(unet, scheduler, eval_images, weighting, timesteps=eval_t, noise=eval_noise).item()

    before = evaluate()
    training = torch.Generator().manual_seed(7)
    for _ in range(250):
        loss = diffusion_loss(unet, scheduler, images, weighting, generator=training)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    print(f"{target}/{weighting}: eval loss {before:.4g} -> {after:.4g}")
    assert after < 0.5 * before, (before, after)


class FixedNoiseGuess(torch.nn.Module):
    """A network whose noise estimate ε̂ is fixed, presented as the scheduler's target:
    ``p̂ = k1_t ε̂ + k2_t x_t`` (:meth:`NoiseSchedule.conversion_coefficients`)."""

    def __init__(self, scheduler, noise_guess):
        super().__init__()
        self.scheduler, self.noise_guess = scheduler, noise_guess

    def forward(self, noisy, timesteps):
        target = self.scheduler.config.prediction_type
        k1, k2 = self.scheduler.schedule.conversion_coefficients("epsilon", target)
        shape = (-1, 1, 1, 1)
        output = k1[timesteps].view(shape) * self.noise_guess + k2[timesteps].view(shape) * noisy.double()

        class Out:
            sample = output.float()

        return Out()


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_loss_is_the_same_for_every_target(gamma):
    """Min-SNR-γ is ``min(SNR_t, γ)·‖x_0 - x̂_0‖²`` whatever the network predicts: the same predictions,
    presented as ε, x0, v or μ, give the same loss per image."""
    x0 = handful_of_images(6).double()
    generator = torch.Generator().manual_seed(3)
    timesteps = torch.tensor([0, 1, 40, 200, 500, 999])
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    guess = noise + 0.3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    reference = DDPMTargetScheduler(beta_schedule="cosine")
    tables = reference.schedule
    noisy = tables.sqrt_alphas_cumprod[timesteps].view(-1, 1, 1, 1) * x0 + (
        tables.sqrt_one_minus_alphas_cumprod[timesteps].view(-1, 1, 1, 1) * noise
    )
    x0_guess = (noisy - tables.sqrt_one_minus_alphas_cumprod[timesteps].view(-1, 1, 1, 1) * guess) / (
        tables.sqrt_alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    )
    expected = tables.signal_to_noise_ratio()[timesteps].clamp(max=gamma) * (x0 - x0_guess).pow(2).flatten(1).mean(1)

    for target in ("epsilon", "x0", "v_prediction", "mu"):
        scheduler = DDPMTargetScheduler(beta_schedule="cosine", prediction_type=target)
        terms = diffusion_loss_terms(FixedNoiseGuess(scheduler, guess), scheduler, x0.float(), "min_snr",
                                     timesteps=timesteps, noise=noise.float(), snr_gamma=gamma)  # fmt: skip
        # μ carries x0 as b_t·x0 beside c_t·x_t (b_t ≈ 1e-4 at large t): float32 rounding, magnified
        tolerance = 3e-2 if target == "mu" else 1e-4
        torch.testing.assert_close(terms.loss.double(), expected, rtol=tolerance, atol=1e-7, msg=target)
        assert terms.vlb is None and torch.equal(terms.mse, terms.loss)


def test_integer_pixels_are_refused_with_the_conversion_named():
    unet, scheduler = DDPMUNet.from_preset("ddpm-tiny-16"), DDPMTargetScheduler(num_train_timesteps=40)
    with pytest.raises(TypeError, match="clean_images must be float images in .-1, 1., got torch.uint8: convert 0–255 "
                                        "pixels with ddpm_pipeline.images.levels_to_model_range"):  # fmt: skip
        diffusion_loss(unet, scheduler, torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
