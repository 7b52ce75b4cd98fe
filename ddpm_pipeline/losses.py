"""The DDPM training objective, built from the scheduler's targets and weights."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from .scheduling_ddpm_target import DDPMTargetScheduler


def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMTargetScheduler,
    clean_images: torch.Tensor,
    weighting: str = "simple",
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``mean_b λ_{t_b} · mean_pixels (f_θ(x_t, t) - target)²`` with ``t ~ U{0..T-1}``, ``ε ~ N(0, I)``.

    ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`` (:meth:`~DDPMTargetScheduler.add_noise`), the target is the
    scheduler's :meth:`~DDPMTargetScheduler.get_target` and ``λ_t`` its
    :meth:`~DDPMTargetScheduler.loss_weight` (``"simple"`` or ``"vlb"``). The squared error is
    taken in float32 whatever the network's dtype. Pass ``timesteps``/``noise`` to fix them.
    """
    batch = clean_images.shape[0]
    device = clean_images.device
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device, generator=generator)
    if noise is None:
        noise = torch.randn(clean_images.shape, device=device, dtype=clean_images.dtype, generator=generator)
    noisy = scheduler.add_noise(clean_images, noise, timesteps)
    target = scheduler.get_target(clean_images, noise, timesteps, noisy_samples=noisy)
    prediction = unet(noisy, timesteps).sample
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (scheduler.loss_weight(timesteps, weighting) * per_sample).mean()
