"""Image data through HF `datasets`: a Hub name, an image folder, a saved data set, or the bundled one.

Every source becomes a `datasets.Dataset` with an image column; :class:`TrainingImages` serves
its images as training tensors in [-1, 1] (read and preprocessed by :mod:`ddpm_pipeline.images`),
in the order of :class:`EpochShuffleSampler`, or all at once on the device (:func:`stack_images`).
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

from .images import BadImageError, ImagePreprocessor, ImageSource, column_kind, levels_to_model_range, upright_size
from .run_outputs import model_folder_kind
from .speed import available_cores
from .splits import read_instruction, split_names

#: Fashion-MNIST's 10,000 test images (MIT license, © 2017 Zalando SE; LICENSE beside them).
BUNDLED_DIR = Path(__file__).parent / "bundled_data" / "fashion_mnist"
BUNDLED_IMAGES = BUNDLED_DIR / "t10k-images-idx3-ubyte.gz"
BUNDLED_LABELS = BUNDLED_DIR / "t10k-labels-idx1-ubyte.gz"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_COLUMN_NAMES = ("image", "img")
BAD_IMAGE_POLICIES = ("skip", "fail")
#: the extensions ``datasets``' imagefolder builder reads as images
_IMAGE_FOLDER_EXTENSIONS = frozenset(extension.lower() for extension in ImageFolder.EXTENSIONS)

logger = logging.getLogger(__name__)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, gzip or raw) as a numpy array.

    Layout: two zero bytes, a type byte (``0x08`` = uint8), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (gzip.BadGzipFile, EOFError) as error:  # a .gz that is not gzip, or cut short
        raise ValueError(f"{path} is not a complete gzip file ({error}); download it again.") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (MNIST format): its header is {raw[:4]!r}.")
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: its header promises {shape} but it holds {data.size} values.")
    return data.reshape(shape)


def images_to_dataset(
    images: np.ndarray, labels: np.ndarray | None = None, class_names: list[str] | None = None
) -> datasets.Dataset:
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` (and labels) as a Dataset with an Image column."""
    columns: dict[str, list] = {"image": [Image.fromarray(image) for image in images]}
    features = {"image": datasets.Image()}
    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        columns["label"] = [int(label) for label in labels]
        features["label"] = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def idx_to_dataset(
    images_path: str | Path, labels_path: str | Path | None = None, class_names: list[str] | None = None
) -> datasets.Dataset:
    """MNIST / Fashion-MNIST IDX files as a Dataset (``image``, and ``label`` when given)."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path} holds an array of shape {images.shape}; expected images [N, H, W].")
    labels = read_idx(labels_path) if labels_path is not None else None
    return images_to_dataset(images, labels, class_names)


def cifar10_archive_to_dataset(archive_path: str | Path, split: str = "train") -> datasets.Dataset:
    """The CIFAR-10 python archive (``cifar-10-python.tar.gz``) as a Dataset with ``img`` and
    ``label`` columns, as the Hub's ``cifar10`` names them; ``split`` is ``"train"`` or ``"test"``."""
    members = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in members:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    images, labels = [], []
    try:
        archive = tarfile.open(archive_path, "r:*")
    except tarfile.ReadError as error:
        raise ValueError(
            f"{archive_path} is not a tar archive: give the CIFAR-10 python version, cifar-10-python.tar.gz "
            "(www.cs.toronto.edu/~kriz/cifar.html)."
        ) from error
    with archive:
        names = {Path(member.name).name: member for member in archive.getmembers()}
        for wanted in members[split]:
            if wanted not in names:
                raise ValueError(f"{archive_path} has no {wanted}: is it the CIFAR-10 *python* archive?")
            batch = pickle.loads(archive.extractfile(names[wanted]).read(), encoding="bytes")  # noqa: S301
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(batch[b"labels"])
    dataset = images_to_dataset(np.concatenate(images), np.asarray(labels), CIFAR10_CLASSES)
    return dataset.rename_column("image", "img")


def bundled_dataset() -> datasets.Dataset:
    """The data set shipped inside the package: Fashion-MNIST's 10,000 test images (28×28, gray)."""
    return idx_to_dataset(BUNDLED_IMAGES, BUNDLED_LABELS, FASHION_MNIST_CLASSES)


def bundled_images(num_images: int | None = None, size: int = 28) -> torch.Tensor:
    """The first ``num_images`` bundled images as a ``[N, 1, size, size]`` float32 tensor of
    ``pixel/127.5 - 1`` (the 256 levels in [-1, 1]), centred as the data pipeline centres them:
    padded with black (-1) to a larger ``size``, cropped to a smaller one."""
    x0 = levels_to_model_range(torch.tensor(read_idx(BUNDLED_IMAGES)[:num_images])[:, None])
    side = x0.shape[-1]
    if size > side:
        before = (size - side) // 2
        x0 = torch.nn.functional.pad(x0, [before, size - side - before] * 2, value=-1.0)
    elif size < side:
        start = (side - size) // 2
        x0 = x0[..., start : start + size, start : start + size]
    return x0


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    train_data_dir: str | Path | None = None,
    dataset_path: str | Path | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """One split of images from exactly one source, or the bundled data set when none is given.

    ``dataset_name``: a Hub data set (``load_dataset(name, config, split=split)``);
    ``train_data_dir``: a local folder of images (the ``imagefolder`` builder; subfolders named
    ``train``, ``test``, … are its splits);
    ``dataset_path``: a data set written by ``save_to_disk`` (:func:`select_split`).
    ``split`` is read as ``load_dataset`` reads it for all of them: a name, a slice
    (``train[:1000]``, ``train[10%:20%]``) or a sum (``train+test``); the bundled set is one split.
    """
    given = [
        name
        for name, value in (
            ("dataset_name", dataset_name),
            ("train_data_dir", train_data_dir),
            ("dataset_path", dataset_path),
        )
        if value
    ]
    if len(given) > 1:
        raise ValueError(f"Give one data source, not {' and '.join(given)}.")
    if dataset_name:
        check_hub_name_is_not_a_path(dataset_name)
        try:
            return load_split(lambda name: datasets.load_dataset(dataset_name, dataset_config, split=name, cache_dir=cache_dir),
                              split, f"the Hub data set {dataset_name}")  # fmt: skip
        except ConnectionError as error:  # neither cached nor reachable
            raise ConnectionError(hub_unreachable_message(dataset_name, error, cache_dir)) from error
    if train_data_dir:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--train_data_dir {folder} is not a folder.")
        model = model_folder_kind(folder)
        if model:  # its PNGs (samples.png, loss_curve.png, grids) would be the data
            raise ValueError(f"--train_data_dir {folder} holds {model}, not training images: point at the folder of "
                             "images (to start from a trained model, --pretrained_model_name_or_path).")  # fmt: skip
        if not holds_image_files(folder):
            if is_saved_dataset(folder):
                raise ValueError(f"--train_data_dir {folder} is a data set written by save_to_disk: pass it as --dataset_path {folder}.")
            others = other_files(folder)
            raise ValueError(
                f"The image folder {folder} holds no image files (.png, .jpg, .webp, … in it or its subfolders)"
                + (f"; it holds {others}, which are not read as images: convert them to PNG or JPEG, or point at the "
                   "folder of images." if others else ": point at the folder of images.")  # fmt: skip
            )
        warn_of_unread_photos(folder)
        check_image_folder_split(folder, split)
        return load_split(lambda name: datasets.load_dataset("imagefolder", data_dir=str(folder), split=name, cache_dir=cache_dir),
                          split, f"the image folder {folder}")  # fmt: skip
    if dataset_path:
        path = Path(dataset_path)
        if not path.exists():
            raise FileNotFoundError(f"--dataset_path {path} does not exist (write one with Dataset.save_to_disk).")
        if not is_saved_dataset(path):
            if path.is_file() and is_saved_dataset(path.parent):
                raise ValueError(f"--dataset_path {path} is a file of the data set that save_to_disk wrote: pass its folder, "
                                 f"--dataset_path {path.parent}.")  # fmt: skip
            fix = (
                f"it holds image files: pass it as --train_data_dir {path}"
                if path.is_dir() and holds_image_files(path)
                else "give the folder Dataset.save_to_disk or DatasetDict.save_to_disk wrote, or a folder of images as --train_data_dir"
            )
            raise ValueError(
                f"--dataset_path {path} is not a data set written by save_to_disk (it has no dataset_info.json or "
                f"dataset_dict.json); {fix}."
            )
        try:
            saved = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as error:  # pyarrow's: an OSError, or ArrowInvalid (a ValueError)
            reason = str(error).splitlines()[0] if str(error) else "no details"
            raise ValueError(f"--dataset_path {path} cannot be read ({type(error).__name__}: {reason}): a file of it is "
                             "cut short or damaged. Write it again with save_to_disk, or restore it from a copy.") from error  # fmt: skip
        return select_split(saved, split, what=str(path))
    return select_split(bundled_dataset(), split, what="the bundled data set")


def check_hub_name_is_not_a_path(dataset_name: str) -> None:
    """Raise where ``--dataset_name`` names a local path that ``load_dataset`` would not read as the
    user meant: a data set written by ``save_to_disk`` (``--dataset_path``), a path that does not
    exist (a Hub id never starts with ``.``, ``/`` or ``~``), or a file of a saved data set. A
    folder of images passes: ``load_dataset`` reads it with the ``imagefolder`` builder."""
    path = Path(dataset_name).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        raise ValueError(f"--dataset_name {dataset_name} is a data set written by save_to_disk, which load_dataset does not "
                         f"read: pass it as --dataset_path {dataset_name}.")  # fmt: skip
    if path.is_file():
        fix = (f"pass its folder as --dataset_path {path.parent}" if is_saved_dataset(path.parent)
               else "give a Hub data set name, a folder of images as --train_data_dir, or a data set written by "
               "save_to_disk as --dataset_path")  # fmt: skip
        raise ValueError(f"--dataset_name {dataset_name} is a file: {fix}.")
    if not path.exists() and dataset_name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--dataset_name {dataset_name} does not exist: a local path must name a folder of images "
                                "or a data set written by save_to_disk (as --dataset_path), a Hub data set a name like "
                                "ylecun/mnist.")  # fmt: skip


def load_split(load: Callable[[str], datasets.Dataset], split: str, what: str) -> datasets.Dataset:
    """``load(split)``, the split of the source ``what`` that ``load_dataset`` reads; its error for
    a slice that selects no rows (``Instruction "train[100:]" corresponds to no data!``, a slice
    past the end) turned into one that names the split, the source and its splits' sizes
    (``len(load(name))``), as :func:`select_split` does for a saved data set."""
    try:
        return load(split)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        sizes = ", ".join(f"{name}: {len(load(name)):,}" for name in dict.fromkeys(split_names(split)))
        raise ValueError(f"--split {split!r} selects no images of {what} ({sizes} images): a slice past the end?") from error


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds what ``save_to_disk`` writes: a `Dataset`'s ``dataset_info.json`` or a
    `DatasetDict`'s ``dataset_dict.json``."""
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def has_named_splits(dataset_name: str | None = None, train_data_dir: str | Path | None = None,
                     dataset_path: str | Path | None = None) -> bool:  # fmt: skip
    """Whether the source :func:`load_image_dataset` reads for these options has named splits: a
    Hub data set, an image folder, a saved `DatasetDict`. The bundled set and a saved `Dataset`
    are one data set, in which every split name (``train``, ``test``) means all of its rows."""
    if dataset_path is not None and not dataset_name and not train_data_dir:
        return (Path(dataset_path) / "dataset_dict.json").is_file()
    return bool(dataset_name or train_data_dir)


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file that ``datasets``' imagefolder builder reads as an image (by its extension)."""
    return path.suffix.lower() in _IMAGE_FOLDER_EXTENSIONS and path.is_file()


def holds_image_files(folder: Path) -> bool:
    """Whether ``folder`` or one of its subfolders holds an image file (:func:`is_image_file`)."""
    return any(is_image_file(path) for path in folder.rglob("*"))


#: Photo formats that cameras and phones write and that ``datasets`` does not read as images: a
#: folder's files of these kinds are left out of its data set (HEIC/HEIF: iPhones; the rest: raw files).
UNREAD_PHOTO_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf",
                                     ".orf", ".rw2"})  # fmt: skip


def warn_of_unread_photos(folder: Path) -> None:
    """Warn when the image folder ``folder`` holds photos of a format ``datasets`` leaves out
    (:data:`UNREAD_PHOTO_EXTENSIONS`), which would otherwise be missing from the data set unsaid."""
    unread_kinds = UNREAD_PHOTO_EXTENSIONS - _IMAGE_FOLDER_EXTENSIONS  # should a later datasets read some of them
    unread = sorted(path.relative_to(folder) for path in folder.rglob("*")
                    if path.suffix.lower() in unread_kinds and not _hidden(path.relative_to(folder)))  # fmt: skip
    if unread:
        listed = _counts_in_words(Counter(path.suffix.lower() for path in unread))
        logger.warning(
            f"{listed} file{'s' if len(unread) > 1 else ''} in {folder} (e.g. {unread[0].as_posix()}) are not read as "
            "images and will not be used: convert them to JPEG or PNG to train on them."
        )


def other_files(folder: Path, shown: int = 3) -> str:
    """What ``folder`` (and its subfolders, hidden ones aside) holds instead of image files, for the
    error that says it holds none: ``"3 .heic files"``, the ``shown`` most common extensions, or
    ``""`` when it holds no file at all."""
    counts = Counter(path.suffix.lower() or "extensionless" for path in folder.rglob("*")
                     if path.is_file() and not _hidden(path.relative_to(folder)))  # fmt: skip
    if not counts:
        return ""
    others = len(counts) - shown
    more = f" and files of {others} other kind{'s' if others > 1 else ''}" if others > 0 else ""
    return f"{_counts_in_words(counts, shown)} file{'s' if sum(counts.values()) > 1 else ''}{more}"


def _counts_in_words(counts: Counter, shown: int | None = None) -> str:
    """``"3 .heic, 1 .nef"``: the ``shown`` (default all) most common of ``counts``, ties by name,
    so that the order is the same on every filesystem."""
    common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:shown]
    return ", ".join(f"{count} {name}" for name, count in common)


def image_folder_splits(folder: Path) -> dict[str, list[Path]]:
    """The files (relative to ``folder``) of each split that ``datasets``' imagefolder builder finds
    in it, by the patterns of ``datasets.data_files.get_data_patterns``: folders or files whose names
    hold a split's name as a word (``train/``, ``train_cats/``, ``2020-test/``, ``validation.png``)
    make that split, and files outside them belong to none. ``{}`` when no name does: then every
    image is in ``train``. Hidden files and folders (``.``, ``__``) are in none."""
    base = folder.resolve()
    patterns = get_data_patterns(base.as_posix())
    if {str(name): list(globs) for name, globs in patterns.items()} == {"train": ["**"]}:
        return {}
    found = DataFilesDict.from_patterns(patterns, base_path=base.as_posix())
    return {str(name): sorted(Path(file).relative_to(base) for file in files) for name, files in found.items()}


def check_image_folder_split(folder: Path, split: str) -> None:
    """Refuse a ``split`` that the image folder ``folder`` does not have, or that holds no image
    (see :func:`image_folder_splits`), naming the splits ``datasets`` found; warn when image files
    lie in no split, where ``datasets`` would leave them out without a word."""
    splits = image_folder_splits(folder)
    names = list(dict.fromkeys(split_names(split)))
    if not splits:
        other = [name for name in names if name != "train"]
        if other:
            raise ValueError(
                f"The image folder {folder} has no folders or files named for a split (train/, test/, validation/, …), "
                f"so all its images are the split 'train', not {other[0]!r}: give a slice of train as the split, e.g. train[-500:]."
            )
        return
    found = "; ".join(f"{name}: {_files_in_words(files)}" for name, files in splits.items())
    images = {name: [file for file in files if is_image_file(folder / file)] for name, files in splits.items()}
    why = f"`datasets` makes a split of the folders and files whose names hold its name as a word (here {found})"
    for name in names:
        if name not in splits:
            raise ValueError(
                f"The image folder {folder} has the splits {sorted(splits)}, not {name!r}: {why}. Give one of them as "
                "the split, or point at the folder of images itself."
            )
        if not images[name]:
            raise ValueError(
                f"The image folder {folder} has no image files in its split {name!r}: {why}, and leaves the files "
                "outside them out. Rename those, or point at the folder of images itself."
            )
    in_splits = {file for files in images.values() for file in files}
    every = [path.relative_to(folder) for path in folder.rglob("*") if is_image_file(path)]
    every = [path for path in every if not _hidden(path)]
    left_out = sorted(set(every) - in_splits)
    if left_out:
        logger.warning(
            f"{len(left_out)} of the {len(every)} image files in {folder} are in no split and will not be used (e.g. "
            f"{left_out[0].as_posix()}): {why}, and then only the files in them. Rename those to use every image."
        )


def _files_in_words(files: list[Path]) -> str:
    """``"3 files, e.g. train_cats/a.png"``: how many, and the first one."""
    return f"{len(files)} file{'s' * (len(files) != 1)}, e.g. {files[0].as_posix()}"


def _hidden(relative: Path) -> bool:
    """Whether ``datasets`` skips this path: a part that starts with ``.`` or ``__``."""
    return any(part.startswith((".", "__")) for part in relative.parts)


def select_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, what: str = "the data set") -> datasets.Dataset:
    """The rows that ``split`` names in a ``save_to_disk`` data set, read as
    ``load_dataset(split=...)`` reads it (``datasets.ReadInstruction``): ``"test"``,
    ``"train[:1000]"``, ``"train[10%:20%]"``, ``"train[-500:]"``, ``"train+test"``. A
    ``DatasetDict``'s splits are its keys; a lone ``Dataset`` is one split under any name, so
    there only the slice counts (``"train[:1000]"`` = its first 1000 rows)."""
    instruction = read_instruction(split)
    names = split_names(split)
    if isinstance(loaded, datasets.DatasetDict):
        missing = sorted(set(names) - set(loaded))
        if missing:
            raise ValueError(f"{what} has splits {sorted(loaded)}, not {', '.join(map(repr, missing))}: pass --split.")
        splits = dict(loaded)
    elif len(set(names)) > 1:
        raise ValueError(f"{what} is one data set without splits; --split {split!r} names {sorted(set(names))}: give one.")
    else:
        splits = {names[0]: loaded}
    parts = []
    for part in instruction.to_absolute({name: len(rows) for name, rows in splits.items()}):
        rows = splits[part.splitname]
        whole = part.from_ == 0 and part.to == len(rows)
        if whole or part.from_ < part.to:  # a slice past the end selects nothing (datasets' select would fail)
            parts.append(rows if whole else rows.select(range(part.from_, part.to)))
    if not parts or not sum(len(rows) for rows in parts):
        raise ValueError(f"--split {split!r} selects no rows of {what} ({', '.join(f'{n}: {len(r)}' for n, r in splits.items())} rows).")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def shared_rows(split: str, other: str, split_size: Callable[[str], int], one_split: bool = False) -> list[tuple[str, int, int]]:
    """The rows that two split specs of one source both select, as ``(split name, start, end)``
    ranges, reading each spec as :func:`select_split` does (``datasets.ReadInstruction``) with
    ``split_size(name)`` rows in split ``name``. ``one_split``: the source is one data set without
    splits (the bundled set, a saved ``Dataset``), where every name is the same rows.
    ``shared_rows("train", "train[-500:]", {"train": 10_000}.get)`` → ``[("train", 9500, 10000)]``."""

    def ranges(spec: str) -> list[tuple[str, int, int]]:
        names = dict.fromkeys(split_names(spec))
        parts = read_instruction(spec).to_absolute({name: split_size(name) for name in names})
        return [("" if one_split else part.splitname, part.from_, part.to) for part in parts]

    shared = []
    for name, start, end in ranges(split):
        for other_name, other_start, other_end in ranges(other):
            if name == other_name and max(start, other_start) < min(end, other_end):
                shared.append((name, max(start, other_start), min(end, other_end)))
    return shared


def spread_rows(total: int, count: int | None) -> range | list[int]:
    """The rows of ``count`` of ``total`` rows spread evenly over them: row ``⌊(2i + 1)·M / 2N⌋``
    for ``i < N`` (the middle row of each of ``N`` equal strata; all rows when ``count`` is None or
    at least ``total``). A subset of a data set is taken so, not as its first rows: a source that
    lists its images class by class (an image folder of class subfolders) would give those one
    class or two."""
    if count is None or count >= total:
        return range(total)
    return [(2 * index + 1) * total // (2 * count) for index in range(count)]


def spread_subset(dataset: datasets.Dataset, count: int | None) -> datasets.Dataset:
    """``count`` rows of ``dataset`` spread evenly over it (:func:`spread_rows`); all of it when
    ``count`` is None or at least its length."""
    return dataset if count is None or count >= len(dataset) else dataset.select(spread_rows(len(dataset), count))


def describe_data_source(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    train_data_dir: str | Path | None = None,
    dataset_path: str | Path | None = None,
) -> str:
    """The source :func:`load_image_dataset` reads for these options, in words (local paths made
    absolute): ``"Hub data set cifar10, split train"``, ``"image folder /data/faces"``, …."""
    if dataset_name:
        return f"Hub data set {dataset_name}" + (f" ({dataset_config})" if dataset_config else "") + f", split {split}"
    if train_data_dir:
        return f"image folder {Path(train_data_dir).resolve()}" + (f", split {split}" if split != "train" else "")
    if dataset_path:
        return f"saved data set {Path(dataset_path).resolve()}, split {split}"
    return "the bundled Fashion-MNIST test set" + (f", split {split}" if split != "train" else "")


def data_identity(dataset: datasets.Dataset, source: str) -> dict[str, Any]:
    """What a checkpoint records of its training data, so that a resumed run can tell whether its
    data changed: the source in words, the number of images, and datasets' fingerprint of them (a
    hash of the loading options and of the files' paths and modification times, or of a saved data
    set's contents)."""
    return {"source": source, "num_images": len(dataset), "fingerprint": getattr(dataset, "_fingerprint", None)}


def hub_unreachable_message(dataset_name: str, error: Exception, cache_dir: str | None = None) -> str:
    """Why a Hub data set could not be loaded when it is neither cached nor reachable, and the fixes."""
    offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")]  # fmt: skip
    why = f"{' and '.join(offline)} {'is' if len(offline) == 1 else 'are'} set" if offline else "no network?"
    return (
        f"The Hub data set {dataset_name!r} is not in the datasets cache ({cache_dir or datasets.config.HF_DATASETS_CACHE}) "
        f"and the Hub could not be reached ({why}): {error}. Load it once with network access (later runs read the "
        "cache, offline too), or use a local copy: a folder of images or a data set written by Dataset.save_to_disk "
        "(train_ddpm.py --train_data_dir / --dataset_path, eval_metrics.py --reference PATH; `python -m "
        "ddpm_pipeline.convert` writes one from the MNIST / Fashion-MNIST IDX files or the CIFAR-10 archive)."
    )


def find_image_column(dataset: datasets.Dataset, image_column: str | None = None) -> str:
    """The column holding the images: ``image_column`` if given, else ``image`` or ``img``, else
    the only column with an `Image` feature, else the only one of images' bytes or arrays of pixels
    (:func:`~ddpm_pipeline.images.column_kind`; a column of strings may be captions as well as
    paths, so it is only read when named)."""
    columns = dataset.column_names
    if image_column:
        if image_column not in columns:
            raise ValueError(f"--image_column {image_column!r} is not a column; the columns are {columns}.")
        if column_kind(dataset.features[image_column]) is None:
            readable = [name for name, feature in dataset.features.items() if column_kind(feature) is not None]
            raise ValueError(
                f"--image_column {image_column!r} holds {dataset.features[image_column]}, not images (an Image feature, "
                "image files' bytes, paths to image files, or arrays of pixels): name the column that holds them"
                + (f" ({', '.join(readable)} could)." if readable else "; this data set has none.")
            )
        return image_column
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    image_features = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(image_features) == 1:
        return image_features[0]
    pixels = [name for name, feature in dataset.features.items() if column_kind(feature) in ("images", "arrays")]
    if len(pixels) == 1:
        return pixels[0]
    raise ValueError(f"Cannot tell which column holds the images (columns: {columns}); pass --image_column.")


class TrainingImages(torch.utils.data.Dataset):
    """A `datasets.Dataset`'s image column as preprocessed tensors ``[C, R, R]`` in [-1, 1].

    Random flips are left to the training step (which draws them from its own seeded generator),
    so an item depends only on its index and resumed runs see exactly the same data.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        preprocess: ImagePreprocessor,
        bad_images: str = "skip",
    ):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}.")
        self.source = ImageSource(dataset, image_column)
        self.preprocess = ImagePreprocessor(preprocess.resolution, preprocess.channels, preprocess.resize_mode)
        self.bad_images = bad_images
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int, levels: bool = False) -> torch.Tensor:
        """Image ``index`` preprocessed (with ``levels``, as its 8-bit levels:
        :meth:`~ddpm_pipeline.images.ImagePreprocessor.levels`); `BadImageError` naming it when it
        cannot be."""
        image = self.source.open(index)
        try:
            return self.preprocess.levels(image) if levels else self.preprocess(image)
        except ValueError as error:
            raise BadImageError(f"{self.source.name(index)} cannot be used: {error}") from error

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index``; a bad one is, with ``bad_images="skip"``, replaced by the next readable
        image (the same one every time, so runs stay reproducible) and counted in :attr:`skipped`."""
        return self.usable(index)[1]

    def data_share(self, index: int) -> float:
        """:meth:`~ddpm_pipeline.images.ImagePreprocessor.data_share` of image ``index`` (read from its
        header): the share of the canvas it fills."""
        return self.preprocess.data_share(upright_size(self.source.open(index, load=False)))

    def levels(self, index: int) -> torch.Tensor:
        """``self[index]`` as its 8-bit levels, uint8 (the same image, bad ones replaced alike):
        ``levels_to_model_range(self.levels(i))`` is ``self[i]`` exactly."""
        return self.usable(index, levels=True)[1]

    def usable(self, index: int, levels: bool = False) -> tuple[int, torch.Tensor]:
        """``(i, image i)`` for the image that ``self[index]`` gives: ``index``, or the readable one
        that replaces a bad one (see :meth:`__getitem__`); with ``levels``, as its 8-bit levels."""
        last_error = None
        for offset in range(len(self)):
            candidate = (int(index) + offset) % len(self)
            try:
                return candidate, self.load(candidate, levels)
            except BadImageError as error:
                last_error = error
                if self.bad_images == "fail":
                    raise BadImageError(f"{error}. Fix or remove it, or pass --bad_images skip to train without it.") from error
                if candidate not in self.skipped:
                    self.skipped.add(candidate)
                    logger.warning(f"skipping a bad image ({len(self.skipped)} so far): {error}")
        raise ValueError(
            f"None of the {len(self)} images of the data set can be used (see the warnings above); the last one "
            f"tried: {last_error}"
        )


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A fresh random order each epoch that depends only on ``(seed, epoch)``:
    ``randperm(n, generator=seeded(seed + epoch))``. Call :meth:`set_epoch` before iterating; a
    resumed run re-creates the same order and skips the batches already seen."""

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration yields (the order depends only on seed and epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


class IndexDataset(torch.utils.data.Dataset):
    """The indices ``0..n-1`` as a data set: the loader of a device-resident data set yields index
    batches (in the sampler's order, sharded and skipped like any other), and the training loop
    gathers the images from the device tensor."""

    def __init__(self, num_items: int):
        self.num_items = num_items

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> int:
        return int(index)


class ImageLevels(torch.utils.data.Dataset):
    """The images of a :class:`TrainingImages` as their 8-bit levels (uint8,
    :meth:`TrainingImages.levels`): what a loader sends to the device when the data set is not kept
    there, a quarter of float32's bytes to collate, pin and copy, made the network's inputs on the
    device, bit for bit the same."""

    def __init__(self, images: TrainingImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images.levels(index)


def read_batches(read: Callable[[int], torch.Tensor], count: int, batch_size: int,
                 threads: int | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
    """``torch.stack([read(i) for i in batch])`` for the consecutive batches of ``range(count)``,
    each batch read by ``threads`` threads (default: :func:`~ddpm_pipeline.speed.available_cores`):
    Pillow lets go of the GIL while it decodes and resizes, which is most of the work for photos.
    No DataLoader: iterating one draws from the global RNG."""
    with ThreadPoolExecutor(threads or available_cores()) as pool:
        for start in range(0, count, batch_size):
            yield torch.stack(list(pool.map(read, range(start, min(start + batch_size, count)))))


def stack_images(images: TrainingImages, device: torch.device | str, batch_size: int = 512, progress: bool = True,
                 threads: int | None = None) -> torch.Tensor:  # fmt: skip
    """Every preprocessed image of ``images`` in one tensor ``[N, C, R, R]`` on ``device``, as its
    8-bit levels (uint8: a quarter of float32's memory, so four times the images fit):
    ``levels_to_model_range(stack_images(images)[i])`` equals ``images[i]`` exactly
    (:meth:`TrainingImages.levels`). The images are read by ``threads``
    threads (:func:`read_batches`), and no random number is drawn, which would change the weights'
    initialization that follows."""
    from tqdm.auto import tqdm

    first = images.levels(0)
    stacked = torch.empty((len(images), *first.shape), dtype=first.dtype, device=device)
    batches = read_batches(images.levels, len(images), batch_size, threads)
    start = 0
    for batch in tqdm(batches, total=-(-len(images) // batch_size), desc="preprocessing the data", disable=not progress):
        stacked[start : start + len(batch)] = batch.to(device)
        start += len(batch)
    return stacked
