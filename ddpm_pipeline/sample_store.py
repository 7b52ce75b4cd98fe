"""Samples for evaluation, written to disk as PNGs and reused when a run is repeated or resumed.

Image ``i`` is the ``i mod B``-th image of batch ``i // B`` (``B`` the batch size), and batch ``b``
is sampled from its own generator seeded from ``(seed, b)``: so image ``i`` does not depend on
how many images were asked for or on how often the run was interrupted. ``sampling.json`` in the
folder records the model and the sampling options; a folder written with other options is refused
rather than mixed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_path
from .json_files import read_json_object
from .pace import Pace
from .pipeline_ddpm_target import DDPMTargetPipeline, DDPMTargetPipelineOutput
from .seeding import derive_seed

logger = logging.getLogger(__name__)

SETTINGS_FILE = "sampling.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: The sampling options a store records only where they differ from these defaults, so that a
#: store written before an option existed holds none of it and reads as its default.
UNRECORDED_DEFAULTS: dict[str, Any] = {"unet_dtype": "float32", "scheduler": "ddpm", "eta": 0.0, "noise_device": "cpu",
                                       "timestep_spacing": "leading"}  # fmt: skip
#: The recorded sampling options a command line sets, and its flag.
OPTION_FLAGS = {"num_inference_steps": "--num_inference_steps", "seed": "--seed", "batch_size": "--batch_size",
                "scheduler": "--scheduler", "eta": "--eta", "unet_dtype": "--sampling_dtype", "noise_device": "--device",
                "timestep_spacing": "--timestep_spacing"}  # fmt: skip


def recorded_settings(folder: str | Path) -> dict[str, Any] | None:
    """The sampling options ``folder``'s samples were made with (its ``sampling.json``), or None
    for a folder without samples yet."""
    settings_path = Path(folder) / SETTINGS_FILE
    if not settings_path.is_file():
        return None
    return read_json_object(settings_path, f"delete {Path(folder)} (or give another folder) to sample afresh")


def recorded_batch_size(folder: str | Path, default: int) -> int:
    """The batch size the samples in ``folder`` were drawn with, else ``default`` (a new folder).
    Image ``i`` depends on the batch size, so a command given none adds to a folder with the
    folder's own rather than be refused."""
    saved = recorded_settings(folder)
    return int(saved["batch_size"]) if saved is not None else default


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one batch of samples: :func:`~ddpm_pipeline.seeding.derive_seed` of ``(seed, batch_index)``."""
    return derive_seed(seed, batch_index)


def sample_name(index: int) -> str:
    """The file of sample ``i``: ``000042.png``."""
    return f"{index:06d}.png"


#: What every PNG file starts with, and the IEND chunk it ends with (length 0, type, CRC).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def is_whole_png(path: Path) -> bool:
    """Whether ``path`` is a PNG file from its signature to its IEND chunk: a sample as
    :func:`_write_png` wrote it, not one a power cut left empty or full of zeros under its name, or
    a copy cut short (20 bytes read, so a store of 50,000 samples is checked in a second)."""
    try:
        with path.open("rb") as file:
            start = file.read(len(PNG_SIGNATURE))
            file.seek(0, 2)
            if file.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            file.seek(-len(PNG_END), 2)
            return start == PNG_SIGNATURE and file.read() == PNG_END
    except OSError:  # missing, or a folder
        return False


def count_complete(folder: Path) -> int:
    """How many images ``000000.png, 000001.png, …`` exist whole (:func:`is_whole_png`) without a gap."""
    count = 0
    while is_whole_png(folder / sample_name(count)):
        count += 1
    return count


def recorded_option(settings: dict[str, Any], name: str) -> Any:
    """Sampling option ``name`` of a store's ``settings``: its recorded value, else its default
    (:data:`UNRECORDED_DEFAULTS`)."""
    return settings.get(name, UNRECORDED_DEFAULTS.get(name))


def _shown(key: str, value: Any) -> str:
    """A recorded option as an error shows it: a weights fingerprint as its files' first hash digits."""
    if key == "weights" and isinstance(value, list):
        return ", ".join(f"{name} {digest[:12]}…" for name, digest in value)
    return repr(value)


def _refusal(folder: Path, saved: dict[str, Any], settings: dict[str, Any], differing: list[str]) -> str:
    """Why a store's folder holds no samples for ``settings``, and the ways on."""
    differences = "; ".join(f"{k}: {_shown(k, recorded_option(saved, k))} there vs "
                            f"{_shown(k, recorded_option(settings, k))} now" for k in differing)  # fmt: skip
    if "model" in differing:
        made = f"samples of another model ({differences})"
    elif "weights" in differing:  # the same folder, its weights replaced: trained further or again since
        made = f"samples of other weights of {settings.get('model')}, trained since they were drawn ({differences})"
    else:
        made = f"samples made with other options ({differences})"
    reuse = ""
    if all(k in OPTION_FLAGS for k in differing):  # the same model: its options would reuse the images
        flags = " ".join(f"{OPTION_FLAGS[k]} {recorded_option(saved, k)}" for k in differing)
        reuse = f"To reuse and add to its images, sample with its options ({flags}); or sample"
    return (
        f"{folder} holds {made}. {reuse or 'Sample'} into another folder (sample_ddpm.py --output_dir, "
        "eval_metrics.py --samples_dir), or delete this one to sample afresh."
    )


class SampleStore:
    """A folder of numbered sample PNGs from one pipeline and one set of sampling options."""

    def __init__(self, folder: str | Path, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.settings = settings
        self.folder.mkdir(parents=True, exist_ok=True)
        saved = recorded_settings(self.folder)
        if saved is not None:
            keys = sorted(saved.keys() | settings.keys())  # an option only one side records differs too
            differing = [k for k in keys if saved.get(k) != settings.get(k)]
            if differing:
                raise ValueError(_refusal(self.folder, saved, settings, differing))
        else:
            (self.folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def option(self, name: str) -> Any:
        """A sampling option of the store (:func:`recorded_option`)."""
        return recorded_option(self.settings, name)

    def existing(self) -> int:
        """How many images ``000000.png, 000001.png, …`` exist without a gap."""
        return count_complete(self.folder)

    def count_existing(self, num_samples: int) -> int:
        """How many of the first ``num_samples`` images exist whole (gaps allowed: several processes,
        or one interrupted, may have written later batches before earlier ones). A damaged one
        (:func:`is_whole_png`) is named in a warning, and drawn again by :meth:`fill`."""
        paths = self.paths(num_samples)
        whole = [is_whole_png(path) for path in paths]
        damaged = [path.name for path, ok in zip(paths, whole, strict=True) if not ok and path.exists()]
        if damaged:
            shown = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
            logger.warning(f"{self.folder}: {shown} cut short or empty (a power cut, a copy cut short): "
                           "drawing them again")  # fmt: skip
        return sum(whole)

    def batches_to_sample(self, num_samples: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
        """The batches that process ``process_index`` of ``num_processes`` samples: every
        ``num_processes``-th batch from its index on (batch ``b`` to process ``b mod N``), skipping
        batches whose images up to ``num_samples`` all exist already."""
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")
        batch_size = int(self.settings["batch_size"])
        last_batch = -(-num_samples // batch_size)
        paths = self.paths(num_samples)
        return [
            batch
            for batch in range(process_index, last_batch, num_processes)
            if not all(is_whole_png(path) for path in paths[batch * batch_size : (batch + 1) * batch_size])
        ]

    def fill(
        self,
        pipeline: DDPMTargetPipeline,
        num_samples: int,
        show_progress: bool = True,
        process_index: int = 0,
        num_processes: int = 1,
        pace: Pace | None = None,
    ) -> int:
        """Sample until ``num_samples`` images exist; returns how many were newly written. ``pace``
        (:class:`~ddpm_pipeline.pace.Pace`) times the first batch's steps, to tell early how long the
        whole job will take.

        Whole batches are sampled (the last one's surplus is discarded) so that every image is the
        same whatever ``num_samples`` is. Each PNG is written to a temporary name and renamed.
        Several processes (``process_index`` of ``num_processes``) share the work batch by batch
        (:meth:`batches_to_sample`); since batch ``b`` is always sampled from the seed of ``b``,
        the folder they fill holds the same images as one process would write (to the bit where
        they compute alike: on a CPU, with as many threads each).
        """
        batch_size = int(self.settings["batch_size"])
        batches = self.batches_to_sample(num_samples, process_index, num_processes)
        written = 0
        pipeline.set_progress_bar_config(disable=not show_progress, leave=False, desc="denoising a batch")
        todo = sum(min(batch_size, num_samples - batch * batch_size) for batch in batches)
        if pace is not None:
            pace.expect(len(batches) * int(self.settings["num_inference_steps"]), batch_size)
        with tqdm(total=todo, desc="sampling", unit="img", disable=not show_progress or not batches) as progress:
            for batch in batches:
                timed = pace if batch == batches[0] else None
                images = self.sample_batch(pipeline, batch, callback_on_step_end=timed).images
                _refuse_diverged(images, batch)
                kept = images[: max(0, num_samples - batch * batch_size)]
                for index, image in enumerate(kept, start=batch * batch_size):
                    path = self.folder / sample_name(index)
                    if not is_whole_png(path):
                        _write_png(image, path)
                        written += 1
                progress.update(len(kept))  # a batch at once: the rate and time left count whole batches
        return written

    def sample_batch(self, pipeline: DDPMTargetPipeline, batch: int, trajectory_steps: int | None = None,
                     callback_on_step_end: Callable | None = None) -> DDPMTargetPipelineOutput:  # fmt: skip
        """Batch ``batch`` as the store samples it: ``batch_size`` images (``output_type="np"``) from
        the generator seeded by :func:`batch_seed` of ``(seed, batch)`` (on the CPU, or on the
        pipeline's GPU for a store whose ``noise_device`` is ``"cuda"``), with the store's steps and
        η; with ``trajectory_steps``, its trajectory recorded too (the images are the same), and
        ``callback_on_step_end`` called after each step, as the pipeline calls it."""
        # noise on the pipeline's GPU when the store says so (the GPU each process samples on)
        device = pipeline.device if self.option("noise_device") != "cpu" else "cpu"
        generator = torch.Generator(device=device).manual_seed(batch_seed(int(self.settings["seed"]), batch))
        return pipeline(
            batch_size=int(self.settings["batch_size"]),
            generator=generator,
            num_inference_steps=int(self.settings["num_inference_steps"]),
            eta=float(self.option("eta")),
            output_type="np",
            trajectory_steps=trajectory_steps,
            callback_on_step_end=callback_on_step_end,
        )

    def paths(self, num_samples: int) -> list[Path]:
        """The files of the first ``num_samples`` samples."""
        return [self.folder / sample_name(i) for i in range(num_samples)]


def _refuse_diverged(images: np.ndarray, batch: int) -> None:
    """Stop before non-finite samples become PNGs: 8-bit conversion would turn NaN into black
    pixels, and every metric computed on them would be silently wrong."""
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        raise FloatingPointError(
            f"Sampling batch {batch} diverged: {int((~finite).sum())} of {len(images)} images hold NaN or inf "
            "values, so no metric on them would mean anything. Nothing of this batch was written. "
            "Check the model (a μ model sampled with fewer steps needs clip_sample=True in its scheduler "
            "config), or sample with more steps or in float32."
        )


def _write_png(image: np.ndarray, path: Path) -> None:
    """``[H, W, C]`` in [0, 1] → 8-bit PNG (``round(255·x)``), written atomically."""
    array = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as partial:
        picture.save(partial)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder (recursively), sorted by path; hidden files (among them the
    partial writes of :func:`~ddpm_pipeline.atomic.atomic_path`) are not images of the set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--samples {folder} is not there: give a folder of images or an .npz of them.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


@contextmanager
def naming_unreadable_image(path: Path) -> Iterator[None]:
    """Reading the image file ``path`` within: PIL's error for a file it cannot read (empty, cut
    short, not an image: :data:`~ddpm_pipeline.images.IMAGE_READ_ERRORS`) becomes a ValueError
    naming the file."""
    from .images import IMAGE_READ_ERRORS  # images imports datasets: not at sample_ddpm.py's start, as below

    try:
        yield
    except IMAGE_READ_ERRORS as error:
        raise ValueError(f"{path} cannot be read as an image ({type(error).__name__}: {error}): replace it, or "
                         "remove it.") from error  # fmt: skip


def image_batches(paths: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """``uint8 [B, 3, H, W]`` batches of image files (grayscale repeated to RGB), each read as the
    training data's images are: turned :func:`~ddpm_pipeline.images.upright`, then
    :func:`~ddpm_pipeline.images.to_8bit_opaque`."""
    from .features import pil_to_uint8
    from .images import to_8bit_opaque, upright

    for start in range(0, len(paths), batch_size):
        tensors = []
        for path in paths[start : start + batch_size]:
            with naming_unreadable_image(path), Image.open(path) as image:
                tensors.append(pil_to_uint8(to_8bit_opaque(upright(image))))
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"Images of different sizes {sorted(shapes)} among {paths[start]}…: resize them to one size.")
        yield torch.stack(tensors)
