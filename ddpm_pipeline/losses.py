"""The DDPM training objective, built from the scheduler's targets and weights."""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import UNet2DModel

from .likelihood import timestep_bpd
from .option_values import DEFAULT_SNR_GAMMA, DEFAULT_VLB_WEIGHT
from .scheduling_ddpm_target import DDPMTargetScheduler


class DiffusionLossTerms(NamedTuple):
    """Each image's loss (float32, ``[B]``) and its parts.

    - ``loss``: what is trained (before any importance weight).
    - ``mse``: ``λ_t · mean_pixels (prediction - target)²``, the mean's regression term. With a learned
      variance trained on ``L_vlb`` it is not part of the loss and is reported unweighted, detached.
    - ``vlb``: ``T · L_t``, the bound's term at the image's timestep in bits/dim (``E_t`` of it is
      ``L_vlb``), with a learned variance; ``None`` with a fixed one.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor | None


def has_bound_term(scheduler: DDPMTargetScheduler, weighting: str, vlb_weight: float) -> bool:
    """Whether :func:`diffusion_loss_terms` has a ``vlb`` term: with a learned variance, trained on
    ``L_vlb`` (``weighting="vlb"``) or on the hybrid objective with ``vlb_weight > 0``."""
    return scheduler.learns_variance and (weighting == "vlb" or vlb_weight > 0)


def diffusion_loss_terms(
    unet: UNet2DModel,
    scheduler: DDPMTargetScheduler,
    clean_images: torch.Tensor,
    weighting: str = "simple",
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    vlb_weight: float = DEFAULT_VLB_WEIGHT,
    snr_gamma: float = DEFAULT_SNR_GAMMA,
) -> DiffusionLossTerms:
    """Each image's loss ``λ_t · mean_pixels (f_θ(x_t, t) - target)²`` (float32, ``[B]``), with
    ``t ~ U{0..T-1}`` and ``ε ~ N(0, I)`` unless given.

    ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`` (:meth:`~DDPMTargetScheduler.add_noise`), the target is the
    scheduler's :meth:`~DDPMTargetScheduler.get_target` and ``λ_t`` its
    :meth:`~DDPMTargetScheduler.loss_weight` (``"simple"``, ``"vlb"``, or ``"min_snr"`` with
    ``γ = snr_gamma``). The squared error is taken in float32 whatever the network's dtype. Pass
    ``timesteps``/``noise`` to fix them.

    With a learned variance (``variance_type="learned_range"``):

    - ``weighting="simple"`` is Improved DDPM's hybrid objective ``L_simple + λ L_vlb`` (with
      ``"min_snr"``, the Min-SNR-weighted MSE takes ``L_simple``'s place): each image adds
      ``vlb_weight · T · L_t``, where ``L_t`` is the bound's term at its timestep in bits/dim
      (:func:`~ddpm_pipeline.likelihood.timestep_bpd`: the KL
      ``KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t))``, the decoder NLL at ``t = 0``), so that
      ``T · E_t[L_t]`` is ``L_vlb``. The term sees the predicted mean through a stop-gradient: it
      trains the variance channels only, and the mean keeps the weighted MSE (λ = 0.001 is the
      paper's).
    - ``weighting="vlb"`` is Improved DDPM's ``L_vlb``: the loss is ``T · L_t`` alone, and both the
      mean and the variance are trained through the bound (``vlb_weight`` is not used). Its terms
      span orders of magnitude over ``t``: draw the timesteps by importance
      (:class:`~ddpm_pipeline.timestep_sampling.ImportanceTimestepSampler`).

    Returns the :class:`DiffusionLossTerms`: the loss that is trained, and its parts for logging.
    """
    if not clean_images.is_floating_point():  # torch.randn_like would fail with "normal_kernel_cpu not implemented"
        raise TypeError(f"clean_images must be float images in [-1, 1], got {clean_images.dtype}: convert 0–255 "
                        "pixels with ddpm_pipeline.images.levels_to_model_range (pixel/127.5 - 1).")  # fmt: skip
    batch = clean_images.shape[0]
    device = clean_images.device
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device, generator=generator)
    if noise is None:
        noise = torch.randn(clean_images.shape, device=device, dtype=clean_images.dtype, generator=generator)
    noisy = scheduler.add_noise(clean_images, noise, timesteps)
    output = unet(noisy, timesteps).sample
    num_timesteps = scheduler.config.num_train_timesteps
    target = scheduler.get_target(clean_images, noise, timesteps, noisy_samples=noisy)
    prediction, variance_values = scheduler.split_model_output(output, noisy)
    squared_error = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if scheduler.learns_variance and weighting == "vlb":
        bound = num_timesteps * timestep_bpd(output, scheduler, clean_images, noisy, timesteps).float()
        return DiffusionLossTerms(loss=bound, mse=squared_error.detach(), vlb=bound)
    mse = scheduler.loss_weight(timesteps, weighting, snr_gamma) * squared_error
    if not has_bound_term(scheduler, weighting, vlb_weight):
        return DiffusionLossTerms(loss=mse, mse=mse, vlb=None)
    frozen_mean = torch.cat([prediction.detach(), variance_values], dim=1)
    bound = num_timesteps * timestep_bpd(frozen_mean, scheduler, clean_images, noisy, timesteps).float()
    return DiffusionLossTerms(loss=mse + vlb_weight * bound, mse=mse, vlb=bound)


def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMTargetScheduler,
    clean_images: torch.Tensor,
    weighting: str = "simple",
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    vlb_weight: float = DEFAULT_VLB_WEIGHT,
    sample_weights: torch.Tensor | None = None,
    snr_gamma: float = DEFAULT_SNR_GAMMA,
) -> torch.Tensor:
    """The batch's training loss: ``mean_b w_b · ℓ_b`` with ``ℓ_b`` the ``loss`` of
    :func:`diffusion_loss_terms` for image ``b`` and ``w_b`` its ``sample_weights`` (default 1;
    importance-sampled timesteps pass ``1/(T p_t)``, which keeps the loss an unbiased estimate of
    the uniform-``t`` objective)."""
    per_sample = diffusion_loss_terms(
        unet, scheduler, clean_images, weighting, timesteps=timesteps, noise=noise, generator=generator,
        vlb_weight=vlb_weight, snr_gamma=snr_gamma,
    ).loss  # fmt: skip
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()
