"""What a training run reads: the network options its images leave open (said in the log), and
the loader that feeds its loop (loader workers and pinned memory, or the whole preprocessed data
set on the device), over :class:`~ddpm_pipeline.data.TrainingImages` in the seeded order of an
:class:`~ddpm_pipeline.data.EpochShuffleSampler`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .data import EpochShuffleSampler, ImageLevels, IndexDataset, TrainingImages, stack_images
from .images import ImageFormat, ImagePreprocessor
from .pretrained import PretrainedDDPM
from .speed import cpu_threads_per_process, default_num_workers, fits_on_device
from .stop_signals import ignore_signals
from .training_config import TrainingConfig
from .unet_presets import CPU_PRESETS, describe_sample_size, sample_height_width

logger = get_logger(__name__, log_level="INFO")


def fit_network_to_data(config: TrainingConfig, image_format: ImageFormat, device_type: str) -> TrainingConfig:
    """``config`` with the network options it leaves open taken from the images
    (:meth:`TrainingConfig.with_data_defaults`), saying what was chosen, and warning when a CPU
    run (``device_type``) got a GPU-sized preset, with the CPU-sized one to pass instead."""
    fitted, chosen = config.with_data_defaults(image_format)
    if chosen:
        logger.info(f"the data: {image_format.describe()}; so {' '.join(chosen)} (give these options to choose otherwise)")
    if config.model is None and fitted.model not in CPU_PRESETS and device_type == "cpu":
        height, width = sample_height_width(fitted.resolution)
        scaled = ""
        if config.resolution is None and max(height, width) > 32:  # the small preset's own size would win
            scaled = (f"; without --resolution it trains at 32px, these images scaled down to it, and with "
                      f"--resolution {fitted.resolution} at their size, at about {height * width / 32**2:.0f}× the "
                      "cost of a step")  # fmt: skip
        logger.warning(
            f"--model {fitted.model}, chosen for images of {describe_sample_size(fitted.resolution)}, is the DDPM "
            "paper's GPU-sized network: on a CPU its steps take seconds each (the progress bar estimates the run's "
            "length). For a network sized for a CPU, pass --model ddpm-small-32 (2.5M parameters, made for 32px "
            f"images{scaled})."
        )
    return fitted


def describe_fine_tuning_data(pretrained: PretrainedDDPM, config: TrainingConfig, image_format: ImageFormat) -> None:
    """Fine-tuning keeps the pretrained network's channels: say what the images are turned into,
    and warn when that drops their colour."""
    channels = pretrained.unet_config["in_channels"]
    size = config.resolution or pretrained.unet_config["sample_size"]
    kind = "grayscale" if channels == 1 else "RGB"
    logger.info(f"the data: {image_format.describe()}; {pretrained.source} takes {kind} images; this run trains at {size}px")
    if image_format.channels == 3 and channels == 1:
        logger.warning(
            f"{pretrained.source} takes grayscale images, so these colour images are trained on in gray and its "
            "samples stay gray: for colour, fine-tune a colour network or train a new one (without "
            "--pretrained_model_name_or_path)."
        )


def device_resident_images(
    images: TrainingImages, wanted: bool | None, device: torch.device, show_progress: bool = True,
    threads: int | None = None, processes: int = 1, images_to_read: int | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """Every preprocessed image of ``images`` in one tensor of 8-bit levels on ``device``
    (:func:`~ddpm_pipeline.data.stack_images`, reading them with ``threads`` threads) when
    ``wanted`` (``--data_on_device``); when ``wanted`` is None, where it takes at most a quarter of
    the memory (:func:`~ddpm_pipeline.speed.fits_on_device`: a GPU's, or on the CPU the machine's,
    shared by ``processes``), on the CPU only when the run has at least every image left to read
    (``images_to_read``; None: not known, taken as enough), so that no image is decoded for
    nothing. Else None: the loader reads each batch as it comes."""
    height, width = sample_height_width(images.preprocess.resolution)
    total_bytes = images.preprocess.channels * height * width * len(images)  # 8-bit levels (stack_images)
    if wanted is None:
        reads_every_image = images_to_read is None or images_to_read >= len(images)
        wanted = fits_on_device(total_bytes, device, processes=processes) and (device.type != "cpu" or reads_every_image)
    elif wanted and device.type == "cuda" and not fits_on_device(total_bytes, device, fraction=0.9):
        raise ValueError(
            f"--data_on_device: the preprocessed data set takes {total_bytes / 2**30:.1f} GiB, more than the "
            f"GPU can hold beside the model; drop --data_on_device (the loader streams it instead)."
        )
    if not wanted:
        return None
    where = "memory" if device.type == "cpu" else f"{device} memory"
    logger.info(f"preprocessing {len(images)} images into {where} ({total_bytes / 2**20:.0f} MiB), once")
    return stack_images(images, device, progress=show_progress, threads=threads)


@dataclass
class TrainingData:
    """The training images and how the loop reads them: ``dataloader`` yields batches of images
    as their 8-bit levels (uint8) in ``sampler``'s order, or, with ``device_images`` (the whole
    preprocessed data set on the device, as levels too), batches of indices into it."""

    images: TrainingImages
    sampler: EpochShuffleSampler
    device_images: torch.Tensor | None
    dataloader: torch.utils.data.DataLoader

    @classmethod
    def build(cls, dataset: datasets.Dataset, column: str, config: TrainingConfig, unet_config: dict[str, Any],
              accelerator: Accelerator, steps_done: int = 0) -> TrainingData:  # fmt: skip
        """The images of ``dataset``'s ``column``, preprocessed for the network (``unet_config``'s
        size and channels, ``--resize_mode``), with ``--bad_images``, ``--data_on_device`` (whose
        default on the CPU weighs the images the run has left to read, after the ``steps_done`` of
        the checkpoint it resumes), ``--dataloader_num_workers`` (default:
        :func:`~ddpm_pipeline.speed.default_num_workers`) and ``--train_batch_size``; raises when the
        data set holds less than one optimizer step's batch, ``--train_batch_size`` ×
        ``--gradient_accumulation_steps`` × processes: an epoch ends the accumulation of gradients
        (an optimizer step, as in Accelerate and diffusers' examples), so each step would average
        fewer batches than the run says."""
        preprocess = ImagePreprocessor(unet_config["sample_size"], unet_config["in_channels"], config.resize_mode)
        images = TrainingImages(dataset, column, preprocess, bad_images=config.bad_images)
        images_per_step = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        if len(images) < images_per_step:
            accumulation = (f" × {config.gradient_accumulation_steps} accumulation"
                            if config.gradient_accumulation_steps > 1 else "")  # fmt: skip
            raise ValueError(
                f"The data set has {len(images)} images, fewer than one optimizer step's batch of {images_per_step} "
                f"(--train_batch_size {config.train_batch_size}{accumulation} × {accelerator.num_processes} processes): "
                f"lower --train_batch_size{' or --gradient_accumulation_steps' if accumulation else ''}, or add images."
            )
        sampler = EpochShuffleSampler(len(images), seed=config.seed)
        device = accelerator.device
        if config.max_train_steps is not None:
            images_to_read = max(0, config.max_train_steps - steps_done) * images_per_step
        else:  # --num_epochs
            images_to_read = max(0, config.num_epochs * len(images) - steps_done * images_per_step)
        device_images = device_resident_images(images, config.data_on_device, device, accelerator.is_local_main_process,
                                               threads=cpu_threads_per_process(accelerator.num_processes),
                                               processes=accelerator.num_processes, images_to_read=images_to_read)  # fmt: skip
        on_device = device_images is not None
        workers = config.dataloader_num_workers
        if workers is None:
            workers = default_num_workers(device, accelerator.num_processes, on_device)
        dataloader = torch.utils.data.DataLoader(
            IndexDataset(len(images)) if on_device else ImageLevels(images),
            batch_size=config.train_batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda" and not on_device,
            persistent_workers=workers > 0,
            # the trainer alone answers a stop signal; workers keep serving it until it has stopped
            worker_init_fn=functools.partial(ignore_signals, tuple(config.checkpoint_on_signals)) if workers > 0 else None,
        )
        return cls(images, sampler, device_images, dataloader)
