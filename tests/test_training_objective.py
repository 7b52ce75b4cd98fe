"""The training objective: exact at the optimum, and a tiny model overfits a handful of images."""

import pytest
import torch

from ddpm_pipeline import DDPMTargetScheduler, DDPMUNet, diffusion_loss


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
@pytest.mark.parametrize("weighting", ["simple", "vlb"])
def test_loss_is_zero_for_the_exact_denoiser(target, weighting):
    scheduler = DDPMTargetScheduler(prediction_type=target)
    x0 = handful_of_images(4)
    loss = diffusion_loss(Oracle(scheduler, x0), scheduler, x0, weighting, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


@pytest.mark.parametrize("target,weighting", [("epsilon", "simple"), ("x0", "simple"), ("mu", "simple"), ("mu", "vlb")])
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
