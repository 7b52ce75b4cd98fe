"""Write a trained pipeline's samples to disk: what ``sample_ddpm.py`` runs.

``generate_samples(model=..., num_images=...)`` fills ``<output_dir>/images/`` with numbered PNGs
through the same store as ``eval_metrics.py`` (:func:`~ddpm_pipeline.sampling.sample_store`), so
image ``i`` is the same however many images are asked for, an interrupted run resumes where it
stopped, ``accelerate launch --num_processes N`` shares the batches, and ``eval_metrics.py
--samples_dir <output_dir>/images`` with the same sampling options scores these images instead of
sampling again. Beside them go ``grid.png`` (the first images), ``sampling_report.json``, with
``--trajectory`` ``trajectory.png`` (the chain of the first images) and with ``--npz``
``samples.npz`` (``arr_0``: the images as ``uint8 [N, H, W, C]``, the array that
evaluation suites such as guided-diffusion's read).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path
from .pipeline_ddpm_target import DDPMTargetPipeline
from .plots import save_image_grid
from .preflight import check_output_dir, check_pipeline_folder
from .provenance import model_training, package_versions
from .sample_config import DEFAULT_BATCH_SIZE, SampleConfig
from .sample_store import SampleStore
from .sampling import (
    LaunchedProcesses,
    folder_batch_size,
    noise_device,
    sample_store,
    sampling_pipeline,
    sampling_record,
    timestep_spacing_of,
)
from .speed import device_description

logger = logging.getLogger(__name__)

IMAGES_FOLDER = "images"
GRID_NAME = "grid.png"
NPZ_NAME = "samples.npz"
TRAJECTORY_NAME = "trajectory.png"
#: The steps a trajectory shows, spread over the chain.
TRAJECTORY_STEPS = 8
REPORT_NAME = "sampling_report.json"
def read_images(paths: list[Path]) -> np.ndarray:
    """The PNGs at ``paths`` as one ``uint8 [N, H, W, C]`` array (``C`` = 1 for grayscale, 3 for
    RGB), exactly the stored pixels."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image)
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(arrays)


def write_npz(images: np.ndarray, path: Path) -> Path:
    """``images`` as ``arr_0`` of an ``.npz`` file (``np.savez``), written atomically."""
    with atomic_path(path) as partial, open(partial, "wb") as file:
        np.savez(file, images)
    return path


def generate_samples(config: SampleConfig | None = None, **options: Any) -> dict[str, Any]:
    """Sample ``config.model`` until ``<output_dir>/images`` holds ``num_images`` PNGs, then write
    the grid, the report (and the ``.npz``, also when an earlier call left one there, so that it
    holds the images the report describes); returns the report.

    ``generate_samples(model="outputs/ddpm-fashion-mnist", num_images=1000)`` or
    ``generate_samples(SampleConfig(...))``. Batch ``b`` of ``batch_size`` images is sampled from
    the seed of ``(seed, b)`` (:class:`~ddpm_pipeline.sample_store.SampleStore`), by the pipeline
    :func:`~ddpm_pipeline.sampling.sampling_pipeline` builds (its own ancestral sampler or a
    diffusers one, with the fast paths asked for). Launched as several processes, they sample the
    batches in turn; the main one writes the rest, and the others return
    ``{"process_index": i, "samples_written": n}``.
    """
    config = config or SampleConfig(**options)
    config.validate()
    output_dir = Path(config.output_dir)
    if config.batch_size is None:  # the folder's own, so that adding images to it is never refused for it;
        # read before the processes join, so before any of them writes the folder's record
        batch_size = folder_batch_size(output_dir / IMAGES_FOLDER, DEFAULT_BATCH_SIZE, config.num_images, config.device)
        config = replace(config, batch_size=batch_size)
    processes = LaunchedProcesses.from_environment(config.device, program="sample_ddpm.py")
    device = processes.device
    if Path(config.model).exists():  # else a Hub repo id, checked by from_pretrained
        check_pipeline_folder(config.model)
    pipeline = sampling_pipeline(config.model, device, config.fast_sampling, config.sampling_dtype, config.scheduler,
                                 config.compile_unet, config.timestep_spacing)  # fmt: skip
    if processes.is_main:
        check_output_dir(output_dir)
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    steps = config.num_inference_steps or num_train_timesteps
    if steps > num_train_timesteps:
        raise ValueError(
            f"--num_inference_steps {steps} exceeds the {num_train_timesteps} diffusion steps of {config.model}: "
            f"give at most {num_train_timesteps}."
        )
    with processes.main_first():  # the main process writes the folder's record of the options first
        store = sample_store(output_dir / IMAGES_FOLDER, config.model, steps, config.seed, config.batch_size,
                             pipeline.unet.dtype, config.scheduler, config.eta, noise_device(device),
                             timestep_spacing_of(pipeline))  # fmt: skip
    advice = "fewer --num_inference_steps respace the chain (100 take a tenth of the time of 1000)" if steps > 100 else ""
    reused, written, seconds = processes.fill(store, pipeline, config.num_images, long_job_advice=advice)
    if not processes.is_main:
        return {"process_index": processes.index, "samples_written": written}
    report = _report(config, store, pipeline, steps, reused, seconds, device, processes.count)
    paths = store.paths(config.num_images)
    if config.grid_images:
        grid = read_images(paths[: config.grid_images]).astype(np.float32) / 255.0
        report["grid"] = str(save_image_grid(grid, output_dir / GRID_NAME))
    if config.trajectory:  # batch 0 again, recorded: its first images are images 0, 1, … of the folder
        logger.info(f"sampling the first batch again, recording its chain for {TRAJECTORY_NAME}")
        store.sample_batch(pipeline, 0, trajectory_steps=TRAJECTORY_STEPS).trajectory.save_png(output_dir / TRAJECTORY_NAME)
        report["trajectory"] = str(output_dir / TRAJECTORY_NAME)
    npz_path = output_dir / NPZ_NAME
    if config.npz or npz_path.exists():  # an earlier call's array would no longer be the folder's images
        if not config.npz:
            logger.info(f"rewriting {npz_path}, which an earlier call wrote, with these {len(paths)} images")
        report["npz"] = str(write_npz(read_images(paths), npz_path))
    with atomic_path(output_dir / REPORT_NAME) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    speed = f" in {seconds:.1f} s ({report['images_per_s']:.2f} images/s)" if report["images_per_s"] else ""
    logger.info(f"{store.folder}: {config.num_images} images, {config.num_images - reused} sampled now{speed}, {reused} already there")
    return report


def _report(config: SampleConfig, store: SampleStore, pipeline: DDPMTargetPipeline, steps: int, reused: int, seconds: float,
            device: torch.device, num_processes: int) -> dict[str, Any]:  # fmt: skip
    """What ``sampling_report.json`` records: the images, how they were sampled and how fast."""
    new = config.num_images - reused
    return {
        "model": config.model,
        "images": str(store.folder),
        "num_images": config.num_images,
        "samples_reused": reused,
        "num_inference_steps": steps,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "sampling": sampling_record(pipeline, config.fast_sampling),
        "sampling_s": seconds,
        "images_per_s": new / seconds if new and seconds > 0 else None,
        "model_training": model_training(config.model),
        "device": device_description(device),
        "processes": num_processes,
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": asdict(config),
    }


def main(argv: Iterable[str] | None = None, config: SampleConfig | None = None) -> dict[str, Any]:
    """The ``sample_ddpm.py`` command line ``argv``, or its options ``config`` already parsed (as
    :func:`~ddpm_pipeline.commands.sample` parses them)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    return generate_samples(config if config is not None else SampleConfig.from_args(list(argv) if argv is not None else None))
