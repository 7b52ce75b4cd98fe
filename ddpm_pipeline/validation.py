"""A held-out bound during training: is the network learning the images, or memorizing them?

Every ``--validation_steps`` optimizer steps the trainer measures the variational bound in
bits/dim (:func:`~ddpm_pipeline.likelihood.variational_bound`: ``L_T + Σ_{t≥2} L_{t-1} + L_0``, the
negative log-likelihood bound of the 256-level images) of the EMA network on ``N`` held-out images
(``--validation_split``) and on the first ``N`` training images. The two fall together while the
network generalizes; a training bound that goes on falling while the held-out one stalls or rises
is overfitting, which small data sets reach soon.

The diffusion sum is estimated from ``K`` stratified timesteps per image
(:func:`~ddpm_pipeline.likelihood.stratified_timesteps`; ``K = None``: every timestep, exact). Batch
``b`` of either set draws its timesteps and ``x_t`` from a generator seeded by
``derive_seed(seed, b)`` at every measurement, so both sets and all measurements share their
random draws (common random numbers): the curves move with the weights, not with the draws, their
gap is a paired difference, and a resumed run measures what the uninterrupted one did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import TrainingImages
from .likelihood import BoundTerms, batch_bound
from .scheduling_ddpm_target import DDPMTargetScheduler
from .speed import strict_float32

logger = logging.getLogger(__name__)

#: the columns of ``validation_history.csv``: the step and the two bounds in bits/dim
VALIDATION_COLUMNS = ("step", "train_bpd", "validation_bpd")


@dataclass
class PreprocessedImages:
    """Images as the bound takes them: ``images``, float32 ``[n, C, H, W]`` in [-1, 1], and
    ``data_share`` (``[n]``), the share of the canvas each fills
    (:meth:`~ddpm_pipeline.images.ImagePreprocessor.data_share`: below 1 for a padded image, whose
    bound counts its own dimensions)."""

    images: torch.Tensor
    data_share: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def first_images(images: TrainingImages, count: int) -> PreprocessedImages:
    """The first ``count`` images of ``images`` (all of them if fewer), preprocessed; a bad image is
    replaced as training replaces it."""
    picked = [images.usable(index) for index in range(min(count, len(images)))]
    return PreprocessedImages(torch.stack([image for _, image in picked]),
                              torch.tensor([images.data_share(index) for index, _ in picked]))  # fmt: skip


class HeldOutBound:
    """The bound of a network on held-out images and on as many training images (module docstring).

    ``validation`` and ``training`` are preprocessed images (:func:`first_images`),
    ``num_timesteps`` the ``K`` of the estimate (None: exact), ``seed`` the draws' seed and
    ``batch_size`` the images per network batch.
    """

    def __init__(
        self,
        validation: PreprocessedImages,
        training: PreprocessedImages,
        num_timesteps: int | None,
        seed: int,
        batch_size: int = 64,
    ):
        if len(validation) == 0:
            raise ValueError("The validation split has no images: give one that selects some (--validation_split).")
        self.validation, self.training = validation, training
        self.num_timesteps, self.seed, self.batch_size = num_timesteps, seed, batch_size

    def bound(self, unet: Callable[..., object], scheduler: DDPMTargetScheduler, images: PreprocessedImages,
              device: torch.device | str, description: str | None = None) -> BoundTerms:  # fmt: skip
        """The bound's terms for ``images`` (per dimension of each image itself), batch ``b`` drawn
        as :func:`~ddpm_pipeline.likelihood.batch_bound` draws it; with a ``description``, a progress
        bar of that name counts the batches (and goes once they are done)."""
        starts = range(0, len(images), self.batch_size)
        batches = tqdm(starts, desc=description, unit="batch", leave=False, disable=description is None)
        return BoundTerms.concatenate([
            batch_bound(unet, scheduler, images.images[start : start + self.batch_size].to(device), self.num_timesteps,
                        self.seed, index).per_data_dimension(images.data_share[start : start + self.batch_size])
            for index, start in enumerate(batches)
        ])  # fmt: skip

    @torch.no_grad()
    def measure(self, unet: torch.nn.Module, scheduler: DDPMTargetScheduler, device: torch.device | str) -> dict[str, float]:
        """``{"train_bpd": …, "validation_bpd": …}``: the mean bound, bits/dim, over each set, with
        the network in float32 (no TF32) and in eval mode (no dropout)."""
        unet = unet.to(device).eval()
        with strict_float32(device):
            training = self.bound(unet, scheduler, self.training, device, "bound, training images")
            held_out = self.bound(unet, scheduler, self.validation, device, "bound, held-out images")
        return {"train_bpd": float(training.total.mean()), "validation_bpd": float(held_out.total.mean())}
