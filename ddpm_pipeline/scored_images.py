"""The images ``eval_metrics.py`` scores: a folder of image files, or an ``.npz`` array of them.

An ``.npz`` holds the images as ``arr_0``, ``uint8 [N, H, W, C]`` with ``C`` = 1 or 3 (or
``[N, H, W]`` for grayscale): the array ``sample_ddpm.py --npz`` writes and the one that
evaluation suites such as guided-diffusion's ``evaluator.py`` read, so samples of another code
base are scored here as they are there. Either way the images reach the feature extractor as
``uint8 [B, 3, H, W]`` batches, grayscale repeated to RGB, exactly as
:func:`~ddpm_pipeline.sample_store.image_batches` reads files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .generation import IMAGES_FOLDER, REPORT_NAME
from .images import GRAY_MODES, upright_size
from .reference import naming_unreadable_npz
from .sample_store import SETTINGS_FILE, image_batches, image_files, naming_unreadable_image

NPZ_SUFFIX = ".npz"
#: The array of an ``.npz`` that holds the images (numpy's name for the first positional array).
NPZ_ARRAY = "arr_0"


def read_npz_images(path: str | Path) -> np.ndarray:
    """The images of an ``.npz`` file as ``uint8 [N, H, W, C]`` (``C`` = 1 or 3): its ``arr_0``,
    or its only array; ``[N, H, W]`` is grayscale, and an alpha channel (``C`` = 2 or 4) is
    composited on black, ``round(c·α/255)`` (as :func:`~ddpm_pipeline.images.to_8bit_opaque` reads
    files); a clear error for anything else."""
    path = Path(path)
    with naming_unreadable_npz(path, "images"), np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        name = NPZ_ARRAY if NPZ_ARRAY in names else (names[0] if len(names) == 1 else None)
        array = archive[name] if name is not None else None
    if array is None:
        raise ValueError(f"--samples {path} holds no {NPZ_ARRAY} and {len(names)} arrays ({', '.join(names)}): "
                         f"save the images as its first array, np.savez(path, images).")  # fmt: skip
    if array.ndim == 3:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"--samples {path}: {name} is {array.dtype} {list(array.shape)}, not images as uint8 [N, H, W, C] with "
            "C = 1 or 3 (pixels 0-255, channels last): convert it, e.g. (x * 255).round().astype(np.uint8) for "
            "floats in [0, 1], x.transpose(0, 2, 3, 1) for [N, C, H, W]."
        )
    if array.shape[-1] in (2, 4):  # with alpha: composited on black, as image files with transparency are read
        color, alpha = array[..., :-1].astype(np.uint32), array[..., -1:].astype(np.uint32)
        array = ((color * alpha + 127) // 255).astype(np.uint8)
    return array


@dataclass(frozen=True)
class ScoredImages:
    """The images to score: ``files`` (sorted image paths) or ``array`` (``uint8 [N, H, W, C]``),
    read from ``source``."""

    source: Path
    files: tuple[Path, ...] = ()
    array: np.ndarray | None = None

    @classmethod
    def from_path(cls, path: str | Path) -> ScoredImages:
        """A folder's image files (recursively) or an ``.npz`` file's array, from ``--samples``; for
        a ``sample_ddpm.py --output_dir``, the samples in its ``images/``."""
        path = Path(path)
        if path.suffix.lower() == NPZ_SUFFIX and path.is_file():
            return cls(path, array=read_npz_images(path))
        if path.is_file():
            raise FileNotFoundError(f"--samples {path} is a file: give a folder of images or an .npz of them.")
        if (path / REPORT_NAME).is_file() and (path / IMAGES_FOLDER / SETTINGS_FILE).is_file():
            path = path / IMAGES_FOLDER  # a sample_ddpm.py --output_dir: its samples, not its grid beside them
        return cls(path, files=tuple(image_files(path)))

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def head(self, count: int) -> ScoredImages:
        """The first ``count`` images."""
        if self.array is not None:
            return ScoredImages(self.source, array=self.array[:count])
        return ScoredImages(self.source, files=self.files[:count])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """``uint8 [B, 3, H, W]`` batches, grayscale repeated to RGB."""
        if self.array is None:
            yield from image_batches(list(self.files), batch_size)
            return
        for start in range(0, len(self.array), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(self.array[start : start + batch_size])).permute(0, 3, 1, 2)
            yield (batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch).contiguous()  # as files are stacked

    def size_and_channels(self) -> tuple[int, int, int]:
        """The images' ``(height, width, channels)``: the size they share, and 1 channel when all
        are grayscale, else 3 (a grayscale image among colour ones is read as RGB, its gray
        repeated). Files of more than one size are refused here, from their headers, before any is
        scored: the reference is prepared at the samples' size."""
        if self.array is not None:
            _, height, width, channels = self.array.shape
            return height, width, channels
        first_of_size: dict[tuple[int, int], Path] = {}
        all_gray = True
        for path in self.files:
            with naming_unreadable_image(path), Image.open(path) as image:
                first_of_size.setdefault(upright_size(image), path)
                all_gray = all_gray and image.mode in GRAY_MODES
        if len(first_of_size) > 1:
            shown = "; ".join(f"{width}×{height}: {path}" for (width, height), path in list(first_of_size.items())[:3])
            more = f"; … {len(first_of_size)} sizes in all" if len(first_of_size) > 3 else ""
            raise ValueError(
                f"--samples {self.source} holds images of {len(first_of_size)} sizes ({shown}{more}): they are scored "
                "at one size, against the reference prepared at it. Resize them to one size, or score each size apart."
            )
        ((width, height),) = first_of_size
        return height, width, 1 if all_gray else 3
