"""Reference data for FID/KID/precision-recall and the likelihood: data sources and the feature cache.

A reference is given as one string, like a training data source:

* ``"bundled"`` — the bundled Fashion-MNIST test images;
* a folder written by ``Dataset.save_to_disk`` (it has ``dataset_info.json`` or ``dataset_dict.json``);
* any other folder — an image folder (the ``imagefolder`` builder);
* a ``.npz`` file — precomputed statistics (``mu``, ``sigma``, optionally ``features``), such as
  the cache files this module writes;
* anything else — a data set name on the Hugging Face Hub.

Its images are preprocessed exactly as for training (:class:`~ddpm_pipeline.images.ImagePreprocessor`),
turned to ``uint8`` RGB, and passed through the feature extractor once: the features and their
Gaussian statistics are cached in ``cache_dir`` under a key made of the source (with the data
set's fingerprint and the column its images are read from, where one is named), split, image
count, resolution, channels, resize mode and the extractor's name and weights digest. Changing
any of them computes new statistics; repeating them reuses the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .atomic import atomic_path
from .data import find_image_column, is_saved_dataset, load_image_dataset, read_batches, spread_subset
from .features import FeatureExtractorSpec, extract_features, pil_to_uint8
from .hold_out import held_out_share
from .images import ImagePreprocessor, ImageSource
from .metrics import gaussian_statistics
from .run_outputs import model_folder_kind

logger = logging.getLogger(__name__)

STATS_SUFFIX = ".npz"
#: What reading a damaged ``.npz`` raises: EOFError when empty, BadZipFile when cut short,
#: ValueError when zero-filled (numpy then takes it for pickled data).
NPZ_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def default_cache_dir() -> Path:
    """``$DDPM_PIPELINE_CACHE`` or ``$XDG_CACHE_HOME/ddpm_pipeline`` (``~/.cache/ddpm_pipeline``)."""
    if os.environ.get("DDPM_PIPELINE_CACHE"):
        return Path(os.environ["DDPM_PIPELINE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ddpm_pipeline"


@dataclass(frozen=True)
class DataSource:
    """A resolved reference data source (see the module docstring)."""

    kind: str
    """``"bundled"``, ``"saved"``, ``"imagefolder"``, ``"hub"`` or ``"stats"``."""
    location: str
    split: str = "train"
    dataset_config: str | None = None
    image_column: str | None = None
    """The column that holds the images; None: found as training finds it
    (:func:`~ddpm_pipeline.data.find_image_column`)."""
    held_out: str | None = None
    """A share or a count of ``split``'s images (``"5%"``, ``"500"``): only the images that
    ``train_ddpm.py --validation_split`` of it holds out at random
    (:func:`~ddpm_pipeline.hold_out.held_out_share`); None: all of the split."""

    @classmethod
    def parse(cls, spec: str | os.PathLike, split: str = "train", dataset_config: str | None = None,
              image_column: str | None = None) -> DataSource:  # fmt: skip
        """Classify ``spec`` as the module docstring says."""
        text = str(spec)
        if text in ("bundled", ""):
            # one split, sliced as a saved data set's (train[:1000])
            return cls("bundled", "bundled", split, image_column=image_column)
        path = Path(text)
        if path.suffix == STATS_SUFFIX:
            if not path.is_file():
                raise FileNotFoundError(f"Reference statistics {path} do not exist.")
            return cls("stats", str(path.resolve()), split)
        if path.is_dir():
            model = model_folder_kind(path)
            if model:  # its PNGs (samples.png, loss_curve.png, grids) would be read as the data
                raise ValueError(
                    f"{text} holds {model}, not the images to compare samples with or to measure the bound on: give "
                    "--reference / --bpd_data an image folder, a save_to_disk folder, a Hub data set or 'bundled', or "
                    "leave them out for the data the --model trained on."
                )
            return cls("saved" if is_saved_dataset(path) else "imagefolder", str(path.resolve()), split, image_column=image_column)
        if path.exists() or text.startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"Reference {text!r} is neither a folder, a .npz statistics file, 'bundled' nor a Hub data set name."
            )
        return cls("hub", text, split, dataset_config, image_column)

    def identity(self) -> dict[str, Any]:
        """What the source is, for cache keys and reports: its fields, without ``image_column`` when
        it names none (so keys made before the option existed still match)."""
        fields = asdict(self)
        for name in ("image_column", "held_out"):
            if fields[name] is None:
                del fields[name]
        return fields

    def images(self, dataset: datasets.Dataset) -> ImageSource:
        """The image column of ``dataset``, this source's loaded split, read as training reads it
        (:class:`~ddpm_pipeline.images.ImageSource`: upright, an unreadable file named)."""
        return ImageSource(dataset, find_image_column(dataset, self.image_column))

    def load(self, cache_dir: str | None = None) -> datasets.Dataset:
        """The split as a `datasets.Dataset`, or the images of it :attr:`held_out` names (not for ``"stats"``)."""
        if self.kind == "stats":
            raise ValueError(f"{self.location} is a statistics file, not a data set of images.")
        dataset = load_image_dataset(
            dataset_name=self.location if self.kind == "hub" else None,
            dataset_config=self.dataset_config,
            split=self.split,
            train_data_dir=self.location if self.kind == "imagefolder" else None,
            dataset_path=self.location if self.kind == "saved" else None,
            cache_dir=cache_dir,
        )
        return dataset if self.held_out is None else held_out_share(dataset, self.held_out, self.split)


def training_data_reference(training: dict[str, Any], model: str) -> tuple[str, str, str | None]:
    """The data a ``train_ddpm.py`` run trained on, from its ``training_config.json`` (``training``),
    as a reference: ``(source, split, dataset_config)`` for :meth:`DataSource.parse` — its image
    folder or ``save_to_disk`` folder (as recorded; a relative path is read from the current
    directory, as the run read it), its Hub data set with its configuration, or ``"bundled"`` — and its ``--split``.
    Raises when the recorded folder is not there, naming it and the fix."""
    split = training.get("split") or "train"
    for option in ("train_data_dir", "dataset_path"):
        if training.get(option):
            folder = Path(training[option]).expanduser()
            if not folder.exists():
                raise FileNotFoundError(
                    f"{model} was trained on --{option} {training[option]} (its training_config.json), which is not "
                    f"there from {Path.cwd()}: run from the directory the training ran in, or give --reference with "
                    "the data its samples are to be compared with."
                )
            return str(folder), split, None  # as the run recorded it: a report or model card shows no more of the disk
    if training.get("dataset_name"):
        return training["dataset_name"], split, training.get("dataset_config")
    return "bundled", split, None


@contextmanager
def naming_unreadable_npz(path: str | Path, holding: str) -> Iterator[None]:
    """Reading the ``.npz`` file ``path`` (of ``holding``: "statistics", "images") within: what a
    damaged one raises (:data:`NPZ_READ_ERRORS`) becomes a ValueError naming it."""
    try:
        yield
    except NPZ_READ_ERRORS as error:
        raise ValueError(f"{path} cannot be read as a .npz of {holding} ({type(error).__name__}: {error}).") from error


@dataclass
class ReferenceStatistics:
    """Features (``[N, 2048]``, or ``None`` for an ``mu``/``sigma``-only file) and FID statistics."""

    statistics: dict[str, np.ndarray]
    features: torch.Tensor | None
    num_images: int
    path: Path | None
    cache_hit: bool
    key: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        """Write ``mu``, ``sigma``, ``features`` and the key to a ``.npz`` file (atomically)."""
        path = Path(path)
        arrays = {"mu": self.statistics["mu"], "sigma": self.statistics["sigma"], "key": np.array(json.dumps(self.key))}
        if self.features is not None:
            arrays["features"] = self.features.numpy().astype(np.float32)
        with atomic_path(path) as partial:
            np.savez(partial, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path, cache_hit: bool = True) -> ReferenceStatistics:
        """Read a ``.npz`` with ``mu`` and ``sigma`` (and optionally ``features`` and ``key``); a
        ValueError naming the file when it lacks them or cannot be read (empty, cut short)."""
        with naming_unreadable_npz(path, "statistics"), np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("mu", "sigma", "features", "key") if name in data}
            key = json.loads(str(arrays["key"])) if "key" in arrays else {"file": str(path)}
        missing = [name for name in ("mu", "sigma") if name not in arrays]
        if missing:
            raise ValueError(f"{path} lacks {missing}: a statistics file needs 'mu' and 'sigma' (and may have 'features').")
        features = torch.from_numpy(arrays["features"]) if "features" in arrays else None
        statistics = {"mu": arrays["mu"].astype(np.float64), "sigma": arrays["sigma"].astype(np.float64)}
        count = len(features) if features is not None else int(key.get("num_images", 0))
        return cls(statistics, features, count, Path(path), cache_hit, key)


def _dataset_fingerprint(dataset: datasets.Dataset) -> str:
    return getattr(dataset, "_fingerprint", None) or "unknown"


def reference_key(
    source: DataSource,
    dataset: datasets.Dataset,
    preprocess: ImagePreprocessor,
    extractor: FeatureExtractorSpec,
    max_images: int | None,
) -> dict[str, Any]:
    """Everything the reference features depend on (a subset's, ``max_images`` of the split, by
    the rows it is taken from: :func:`~ddpm_pipeline.data.spread_rows`)."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    return {
        "source": source.identity(),
        "fingerprint": _dataset_fingerprint(dataset),
        "num_images": count,
        **({"rows": "spread evenly"} if count < len(dataset) else {}),  # the first rows were taken before
        "resolution": preprocess.resolution,
        "channels": preprocess.channels,
        "resize_mode": preprocess.resize_mode,
        "feature_extractor": extractor.identity(),
        "layer": "2048",
    }


def cache_path_for(key: dict[str, Any], cache_dir: str | Path) -> Path:
    """``<cache_dir>/reference-<first 20 hex of SHA-256 of the key>.npz``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"reference-{digest}{STATS_SUFFIX}"


def preprocessed_batches(
    images: ImageSource, preprocess: ImagePreprocessor, count: int, batch_size: int, threads: int | None = None
) -> Iterator[torch.Tensor]:
    """``uint8 [B, 3, R, R]`` batches of the first ``count`` images, preprocessed as in training,
    each batch read by ``threads`` threads (:func:`~ddpm_pipeline.data.read_batches`)."""

    def read(index: int) -> torch.Tensor:
        return pil_to_uint8(preprocess.to_pil(images.open(index)))

    return read_batches(read, count, batch_size, threads)


def reference_statistics(
    reference: str | os.PathLike,
    preprocess: ImagePreprocessor,
    extractor: FeatureExtractorSpec,
    device: torch.device | str = "cpu",
    split: str = "train",
    dataset_config: str | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    data_cache_dir: str | None = None,
    dataset: datasets.Dataset | None = None,
    image_column: str | None = None,
) -> ReferenceStatistics:
    """The reference's features and statistics: from a stats file, from the cache, or computed
    (then cached). ``max_images`` keeps N images of the split spread evenly over it
    (:func:`~ddpm_pipeline.data.spread_subset`); ``dataset`` is the
    reference's split when the caller has loaded it already; ``image_column`` the column that
    holds its images (default: found, :func:`~ddpm_pipeline.data.find_image_column`)."""
    source = DataSource.parse(reference, split, dataset_config, image_column)
    if source.kind == "stats":
        return ReferenceStatistics.load(source.location)
    if dataset is None:
        dataset = source.load(data_cache_dir)
    key = reference_key(source, dataset, preprocess, extractor, max_images)
    path = cache_path_for(key, cache_dir or default_cache_dir())
    if path.is_file():
        try:
            cached = ReferenceStatistics.load(path, cache_hit=True)
        except ValueError as error:  # emptied or cut short (a power cut, a full disk): computed again
            logger.warning(f"the cached reference statistics: {error} Computing them again.")
        else:
            if cached.key == key:
                return cached
    network = extractor.create(["2048"], device)
    count = key["num_images"]
    subset = spread_subset(dataset, count)
    features = extract_features(
        network, preprocessed_batches(source.images(subset), preprocess, count, batch_size), device, total=count,
        description=f"reference features ({source.location if source.kind != 'bundled' else 'bundled data'})",
    )["2048"]  # fmt: skip
    result = ReferenceStatistics(gaussian_statistics(features), features, count, path, False, key)
    result.save(path)
    return result
