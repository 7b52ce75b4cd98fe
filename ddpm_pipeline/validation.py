"""A held-out bound during training: is the network learning the images, or memorizing them?

Every ``--validation_steps`` optimizer steps the trainer measures the variational bound in
bits/dim (:func:`~ddpm_pipeline.likelihood.variational_bound`: ``L_T + Σ_{t≥2} L_{t-1} + L_0``, the
negative log-likelihood bound of the 256-level images) of the EMA network on ``N`` held-out images
(``--validation_split``) and on ``N`` training images, each set's spread evenly over it
(:func:`spread_images`). The two fall together while the
network generalizes; a training bound that goes on falling while the held-out one stalls or rises
is overfitting, which small data sets reach soon.

The diffusion sum is estimated from ``K`` stratified timesteps per image
(:func:`~ddpm_pipeline.likelihood.stratified_timesteps`; ``K = None``: every timestep, exact). Batch
``b`` of either set draws its timesteps and ``x_t`` from a generator seeded by
``derive_seed(seed, b)`` at every measurement, so both sets and all measurements share their
random draws (common random numbers): the curves move with the weights, not with the draws, their
gap is a paired difference, and a resumed run measures what the uninterrupted one did.

:class:`HeldOutBound` measures; :class:`HeldOutMonitor` is what a training run keeps of it (when a
measurement is due, ``validation_history.csv``, the summary's record and the curve);
:mod:`~ddpm_pipeline.hold_out` picks the images that ``--validation_split 0.05`` (a share or a count
of the training split) holds out; :func:`check_held_out_split` refuses a held-out split that
shares rows with the training split; and :func:`unbalanced_classes_warning` says when the
measured images leave out most of the training images' classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .class_balance import (
    RARE,
    SHUFFLED_COPY,
    chance_of_so_few_classes,
    class_column,
    class_labels,
    classes_in_words,
    expected_classes,
)
from .data import TrainingImages, shared_rows, spread_rows
from .likelihood import BoundTerms, batch_bound
from .plots import save_metric_curves
from .run_outputs import VALIDATION_CURVE_NAME, VALIDATION_HISTORY_NAME
from .run_records import LossHistory
from .scheduling_ddpm_target import DDPMTargetScheduler
from .speed import strict_float32
from .splits import split_names

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


def spread_images(images: TrainingImages, count: int) -> PreprocessedImages:
    """``count`` images of ``images`` spread evenly over them (:func:`~ddpm_pipeline.data.spread_rows`;
    all of them if fewer), preprocessed; a bad image is replaced as training replaces it."""
    picked = [images.usable(index) for index in spread_rows(len(images), count)]
    return PreprocessedImages(torch.stack([image for _, image in picked]),
                              torch.tensor([images.data_share(index) for index, _ in picked]))  # fmt: skip


class HeldOutBound:
    """The bound of a network on held-out images and on as many training images (module docstring).

    ``validation`` and ``training`` are preprocessed images (:func:`spread_images`),
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


def unbalanced_classes_warning(training: datasets.Dataset, measured: dict[str, datasets.Dataset]) -> str | None:
    """A warning when a set of measured images (``measured``: a description of each set, and its
    images) holds so few of the ``training`` images' classes (their :func:`class_column`) that as
    many images drawn at random from them would hold as few in under 1% of draws
    (:func:`chance_of_so_few_classes`; the message gives the :func:`expected_classes` too): a source
    that lists its images class by class (an image folder of class subfolders) gives its first or
    last rows one class or two, and a bound measured on them measures those classes alone. None when
    no set is so, or there are no classes."""
    column = class_column(training)
    if column is None:
        return None
    labels = class_labels(training, column)
    if not len(labels):
        return None
    frequencies = np.bincount(labels)
    names = training.features[column].names
    few = []
    for what, images in measured.items():
        held = sorted(set(class_labels(images, column).tolist())) if column in images.column_names else []
        if not held:
            continue
        if chance_of_so_few_classes(frequencies, len(images), len(held)) < RARE:
            expected = expected_classes(frequencies, len(images))
            few.append(f"the {len(images):,} {what} hold {len(held)} of the training images' {np.count_nonzero(frequencies)} "
                       f"classes ({classes_in_words(names, held)}), where as many drawn at random would hold {expected:.1f} "
                       "on average")  # fmt: skip
    if not few:
        return None
    return (
        f"{'; '.join(few)}: the source lists its images class by class ({column}), so the bound measures those classes "
        "alone, and the held-out and training bounds differ by class as well as by whether the network saw them. "
        "Measure images of every class: hold out a share drawn at random (--validation_split 0.05 with "
        "--validation_rows random, the default), a split of its own (an image folder's test/ subfolder, "
        f"--validation_split test), or save the data shuffled and train on that, e.g. for an image folder {SHUFFLED_COPY}, "
        "then --dataset_path OUT."
    )


def check_held_out_split(split: str, validation_split: str, split_size: Callable[[str], int], one_split: bool) -> None:
    """Raise when ``validation_split`` selects rows that ``split`` trains on (say ``--validation_split
    'train[-500:]'`` with ``--split train``): the held-out bound would then measure training images,
    and show no overfitting where there is some. ``split_size(name)`` is the size of a named split,
    and ``one_split`` says the data has a single split that any name reads
    (:func:`~ddpm_pipeline.data.shared_rows`); ``split_size`` is not called for distinct named splits."""
    if not one_split and not set(split_names(split)) & set(split_names(validation_split)):
        return  # other splits of a source with named splits: no row in common
    shared = shared_rows(split, validation_split, split_size, one_split)
    if shared:
        rows = ", ".join(f"rows {start}–{end - 1}" + (f" of {name}" if name else "") for name, start, end in shared)
        raise ValueError(
            f"--validation_split {validation_split!r} holds {sum(end - start for _, start, end in shared):,} "
            f"images that --split {split!r} trains on ({rows}): the held-out bound would measure training "
            "images. Hold them out of training: --validation_split 0.05 (a share or a count of --split's images), "
            "--split 'train[:-500]' --validation_split 'train[-500:]', or another split (test)."
        )


class HeldOutMonitor:
    """The held-out bound over a training run (``--validation_split``): when a measurement is due,
    taking it (:meth:`HeldOutBound.measure`) into ``validation_history.csv`` and the run's summary
    (:attr:`record`), and drawing its curve.

    ``bound`` is None in the processes other than the main one, which alone measures; ``split`` is
    the held-out split's name, ``every`` the steps between measurements (None or 0: at the end
    only) and ``timesteps`` the ``K`` of the estimate (None: exact)."""

    def __init__(self, bound: HeldOutBound | None, split: str, every: int | None, timesteps: int | None):
        self.bound, self.split, self.every, self.timesteps = bound, split, every, timesteps
        self.record: dict[str, Any] | None = None  # the last measurement
        self.history: LossHistory | None = None

    def due(self, step: int) -> bool:
        """Whether a measurement is due after optimizer step ``step`` (a multiple of ``every``)."""
        return bool(self.every) and step % self.every == 0

    def open_history(self, output_dir: Path, step: int, resumed_from: Path | None) -> None:
        """Start ``validation_history.csv`` in ``output_dir`` from ``step`` on, with the rows of the
        run in ``resumed_from`` up to it (:class:`~ddpm_pipeline.run_records.LossHistory`); the last
        of them is the :attr:`record` until the next measurement."""
        self.history = LossHistory(
            output_dir / VALIDATION_HISTORY_NAME, step, enabled=self.bound is not None,
            resumed_history=resumed_from / VALIDATION_HISTORY_NAME if resumed_from else None, columns=VALIDATION_COLUMNS,
        )  # fmt: skip
        if len(self.history):
            steps, train = self.history.series("train_bpd")
            self._keep_record(steps[-1], {"train_bpd": train[-1], "validation_bpd": self.history.series("validation_bpd")[1][-1]})

    def _keep_record(self, step: int, values: dict[str, float]) -> None:
        self.record = {
            "step": step, **values, "split": self.split, "num_images": len(self.bound.validation),
            "num_train_images": len(self.bound.training), "timesteps": self.timesteps,
        }  # fmt: skip

    def close(self) -> None:
        """Close the history (nothing if it was never opened)."""
        if self.history is not None:
            self.history.close()

    def measure(self, step: int, unet: torch.nn.Module, scheduler: DDPMTargetScheduler,
                device: torch.device | str) -> dict[str, float] | None:  # fmt: skip
        """The bound of ``unet`` after step ``step`` (``{"train_bpd": …, "validation_bpd": …}``),
        written to the history at once (so that a checkpoint never gets ahead of it), kept as
        :attr:`record` and logged; None in a process that does not measure."""
        if self.bound is None:
            return None
        values = self.bound.measure(unet, scheduler, device)
        self.history.add(step, **values)
        self.history.flush()
        self._keep_record(step, values)
        logger.info(
            f"step {step}: the bound is {values['validation_bpd']:.4f} bits/dim on the held-out images, "
            f"{values['train_bpd']:.4f} on the training images"
        )
        return values

    def save_curve(self, output_dir: Path, model_name: str) -> Path | None:
        """``validation_curve.png`` in ``output_dir``: the bound on the training and the held-out
        images against the step; None in a process that does not measure."""
        if self.bound is None or self.history is None:
            return None
        steps, train = self.history.series("train_bpd")
        held_out = self.history.series("validation_bpd")[1]
        return save_metric_curves(
            {f"{len(self.bound.training)} training images": (steps, train),
             f"{len(self.bound.validation)} held-out images ({self.split})": (steps, held_out)},
            output_dir / VALIDATION_CURVE_NAME, xlabel="optimizer step", ylabel="bound, bits/dim",
            title=f"{model_name}: the EMA network's bound"
                  + (f" ({self.timesteps} timesteps per image)" if self.timesteps else " (exact)"),
        )  # fmt: skip
