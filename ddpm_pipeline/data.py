"""Image data through HF `datasets`: a Hub name, an image folder, a saved data set, or the bundled one.

Every source becomes a `datasets.Dataset` with an image column; :class:`ImagePreprocessor` turns
its images into training tensors in [-1, 1].
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .unet import sample_height_width

#: Fashion-MNIST's 10,000 test images (MIT license, © 2017 Zalando SE; LICENSE beside them).
BUNDLED_DIR = Path(__file__).parent / "bundled_data" / "fashion_mnist"
BUNDLED_IMAGES = BUNDLED_DIR / "t10k-images-idx3-ubyte.gz"
BUNDLED_LABELS = BUNDLED_DIR / "t10k-labels-idx1-ubyte.gz"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_COLUMN_NAMES = ("image", "img")
RESIZE_MODES = ("auto", "crop", "pad")
BAD_IMAGE_POLICIES = ("skip", "fail")

logger = logging.getLogger(__name__)


class BadImageError(ValueError):
    """An image of the data set that cannot be read or preprocessed; the message names it."""


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, gzip or raw) as a numpy array.

    Layout: two zero bytes, a type byte (``0x08`` = uint8), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
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
    with tarfile.open(archive_path, "r:*") as archive:
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
    x0 = torch.tensor(read_idx(BUNDLED_IMAGES)[:num_images], dtype=torch.float32)[:, None] / 127.5 - 1.0
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
        try:
            return datasets.load_dataset(dataset_name, dataset_config, split=split, cache_dir=cache_dir)
        except ConnectionError as error:  # neither cached nor reachable
            raise ConnectionError(hub_unreachable_message(dataset_name, error, cache_dir)) from error
    if train_data_dir:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--train_data_dir {folder} is not a folder.")
        extensions = {ext.lower() for ext in Image.registered_extensions()}
        if not any(path.is_file() and path.suffix.lower() in extensions for path in folder.rglob("*")):
            raise ValueError(
                f"--train_data_dir {folder} holds no image files (.png, .jpg, .webp, … in it or its subfolders): "
                "point it at the folder of images."
            )
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split, cache_dir=cache_dir)
    if dataset_path:
        path = Path(dataset_path)
        if not path.exists():
            raise FileNotFoundError(f"--dataset_path {path} does not exist (write one with Dataset.save_to_disk).")
        return select_split(datasets.load_from_disk(str(path)), split, what=str(path))
    return select_split(bundled_dataset(), split, what="the bundled data set")


def select_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, what: str = "the data set") -> datasets.Dataset:
    """The rows that ``split`` names in a ``save_to_disk`` data set, read as
    ``load_dataset(split=...)`` reads it (``datasets.ReadInstruction``): ``"test"``,
    ``"train[:1000]"``, ``"train[10%:20%]"``, ``"train[-500:]"``, ``"train+test"``. A
    ``DatasetDict``'s splits are its keys; a lone ``Dataset`` is one split under any name, so
    there only the slice counts (``"train[:1000]"`` = its first 1000 rows)."""
    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"--split {split!r} is not a split name or slice ({error}); e.g. train, train[:1000], train[:10%].") from error
    names = _split_names(split)
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
        parts.append(rows if whole else rows.select(range(part.from_, part.to)))
    if not sum(len(rows) for rows in parts):
        raise ValueError(f"--split {split!r} selects no rows of {what} ({', '.join(f'{n}: {len(r)}' for n, r in splits.items())} rows).")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _split_names(split: str) -> list[str]:
    """The split names in a split spec: ``"train[:10%]+test"`` → ``["train", "test"]``."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


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
    the only column with an `Image` feature."""
    columns = dataset.column_names
    if image_column:
        if image_column not in columns:
            raise ValueError(f"--image_column {image_column!r} is not a column; the columns are {columns}.")
        return image_column
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    image_features = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(image_features) == 1:
        return image_features[0]
    raise ValueError(f"Cannot tell which column holds the images (columns: {columns}); pass --image_column.")


@dataclass(frozen=True)
class ImagePreprocessor:
    """PIL image → float tensor ``[C, R, R]`` in [-1, 1], the same for training and evaluation.

    1. convert to ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``);
    2. ``resize_mode``: ``"pad"`` centers the image on a black R×R canvas (28 → 32 for MNIST-like
       data); ``"crop"`` resizes it (bicubic) by ``max(R/width, R/height)``, the least that covers
       the canvas, and center-crops; ``"auto"`` pads images that fit on the canvas and crops the rest;
    3. scale ``x/127.5 - 1``; a random horizontal flip when ``random_flip``.

    ``resolution`` is R, or ``(height, width)`` for a non-square canvas (a UNet2DModel's
    ``sample_size`` may be either); a square pair is stored as one number.
    """

    resolution: int | tuple[int, int]
    channels: int = 1
    resize_mode: str = "auto"
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}.")
        resolution = self.resolution
        if isinstance(resolution, (list, tuple)):
            if len(resolution) != 2:
                raise ValueError(f"resolution must be one size or (height, width), got {resolution}.")
            resolution = int(resolution[0]) if resolution[0] == resolution[1] else (int(resolution[0]), int(resolution[1]))
            object.__setattr__(self, "resolution", resolution)
        if min(self.height_width) < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}.")

    @property
    def height_width(self) -> tuple[int, int]:
        """The canvas as ``(height, width)``."""
        return sample_height_width(self.resolution)

    def to_pil(self, image: Image.Image) -> Image.Image:
        """Steps 1–2: the canvas-sized image in the right mode (transparent pixels composited on
        black, 16-bit images scaled to 8 bits)."""
        image = to_8bit_opaque(image).convert("L" if self.channels == 1 else "RGB")
        size_h, size_w = self.height_width
        width, height = image.size
        fits = width <= size_w and height <= size_h
        if self.resize_mode == "pad" or (self.resize_mode == "auto" and fits):
            if not fits:
                raise ValueError(
                    f"Cannot pad a {width}x{height} image to {size_w}x{size_h}: use resize_mode='auto' or 'crop'."
                )
            canvas = Image.new(image.mode, (size_w, size_h), 0)
            canvas.paste(image, ((size_w - width) // 2, (size_h - height) // 2))
            return canvas
        scale = max(size_w / width, size_h / height)
        resized = image.resize((max(size_w, round(width * scale)), max(size_h, round(height * scale))), Image.BICUBIC)
        left, top = (resized.width - size_w) // 2, (resized.height - size_h) // 2
        return resized.crop((left, top, left + size_w, top + size_h))

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        array = np.asarray(self.to_pil(image), dtype=np.float32)
        tensor = torch.from_numpy(array.reshape(*self.height_width, self.channels)).permute(2, 0, 1)
        tensor = tensor / 127.5 - 1.0
        if self.random_flip and torch.rand((), generator=generator).item() < 0.5:
            tensor = tensor.flip(-1)
        return tensor.contiguous()


def to_8bit_opaque(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit channels and no alpha: 16-bit (``I;16``, ``I``) gray scaled by 255/65535
    (``I`` only when its values exceed 255), transparency composited on black (like the padding)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(array * (255 / 65535) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image


#: PIL modes without colour: their images train as one channel.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

#: The EXIF tag that says how a camera's stored pixels must be flipped or turned to show the picture
#: upright: 1 as stored, 2–8 the other seven flips and quarter turns (5–8 swap width and height).
EXIF_ORIENTATION = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """``image``'s EXIF orientation, 1 (as stored) when it has none or its EXIF cannot be parsed: a
    malformed tag leaves the pixels usable, so it never makes an image bad."""
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - PIL raises many kinds of errors for malformed EXIF
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """``image`` as it is meant to be seen, as photo viewers and `datasets`' own decoding show it:
    flipped or turned by its EXIF orientation (Pillow's ``ImageOps.exif_transpose``, which also
    clears the tag, so turning twice is harmless); returned unchanged when the orientation is 1."""
    if exif_orientation(image) == 1:
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of :func:`upright` ``(image)`` without turning its pixels: orientations 5–8
    turn the picture a quarter, so they swap the stored sides."""
    width, height = image.size
    return (height, width) if exif_orientation(image) >= 5 else (width, height)


class ImageSource:
    """A `datasets.Dataset`'s image column, opened one image at a time as PIL images; a file that
    cannot be read raises `BadImageError` naming it (decoded here rather than in `datasets`)."""

    def __init__(self, dataset: datasets.Dataset, image_column: str):
        if len(dataset) == 0:
            raise ValueError("The training data set is empty.")
        self.images = dataset.select_columns([image_column])
        self.undecoded = isinstance(dataset.features.get(image_column), datasets.Image)
        if self.undecoded:
            self.images = self.images.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.images)

    def open(self, index: int, load: bool = True) -> Image.Image:
        """Image ``index``, turned :func:`upright`; with ``load=False`` only opened (size and mode
        read, as stored: :func:`upright_size` gives the upright size), its pixels not decoded."""
        item = self.images[int(index)][self.image_column]
        if not self.undecoded:
            if not isinstance(item, Image.Image):
                raise TypeError(
                    f"Column {self.image_column!r} holds {type(item).__name__}, not images: pass --image_column."
                )
            return item
        try:
            image = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
            if load:
                image.load()
                image = upright(image)
            return image
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise BadImageError(f"{self.name(index)} cannot be used: {type(error).__name__}: {error}") from error

    def name(self, index: int) -> str:
        """How messages name image ``index``: its file, where it has one."""
        if self.undecoded:
            return self.images[int(index)][self.image_column].get("path") or f"image {index} (stored in the data set)"
        return f"image {index}"


@dataclass(frozen=True)
class ImageFormat:
    """What a data set's images look like, from :func:`inspect_images`: ``size`` is the median of
    their shorter sides, ``channels`` 3 if any of them has colour (a mode outside
    :data:`GRAY_MODES`), else 1; ``sizes`` each inspected image's ``(width, height)``."""

    size: int
    channels: int
    smallest: int
    largest: int
    inspected: int
    sizes: tuple[tuple[int, int], ...] = ()

    def too_big_to_pad(self, resolution: int | tuple[int, int]) -> int:
        """How many of the inspected images are wider or taller than the canvas (``R`` or ``(height,
        width)``): padding, which never shrinks an image, cannot put them on it."""
        height, width = sample_height_width(resolution)
        return sum(w > width or h > height for w, h in self.sizes)

    def describe(self) -> str:
        sides = f"{self.size}px" if self.smallest == self.largest else f"shorter sides {self.smallest}–{self.largest}px, median {self.size}"
        colour = "RGB" if self.channels == 3 else "grayscale"
        return f"{colour}, {sides} ({self.inspected} images inspected)"


def inspect_images(source: ImageSource, max_images: int = 64) -> ImageFormat:
    """The :class:`ImageFormat` of ``max_images`` images spread evenly over ``source`` (headers
    only: nothing is decoded); unreadable ones are passed over."""
    count, wanted = len(source), min(len(source), max_images)
    indices = sorted({round(i * (count - 1) / max(1, wanted - 1)) for i in range(wanted)})
    shorter_sides, sizes, colour = [], [], False
    for index in indices:
        try:
            image = source.open(index, load=False)
        except BadImageError:
            continue
        with image:  # closes the file the header came from
            shorter_sides.append(min(image.size))
            sizes.append(upright_size(image))
            colour = colour or image.mode not in GRAY_MODES
    if not shorter_sides:
        raise ValueError(
            f"None of the {len(indices)} images inspected can be read: check the files, or pass --resolution and --channels."
        )
    shorter_sides.sort()
    return ImageFormat(
        size=shorter_sides[(len(shorter_sides) - 1) // 2],
        channels=3 if colour else 1,
        smallest=shorter_sides[0],
        largest=shorter_sides[-1],
        inspected=len(shorter_sides),
        sizes=tuple(sizes),
    )


def check_padding(
    image_format: ImageFormat,
    resolution: int | tuple[int, int],
    resize_mode: str,
    what: str = "images",
    skips_bad_images: bool = True,
) -> None:
    """With ``resize_mode="pad"``, which centers each image on a black canvas (``R`` or ``(height,
    width)``) and never shrinks one, some of the inspected images may not fit: a `ValueError` naming
    the fix when none fits (or any, where a bad image is not skipped but fails), else a warning that
    they will be skipped as bad images. Other modes fit any image: nothing to check."""
    too_big = image_format.too_big_to_pad(resolution)
    if resize_mode != "pad" or too_big == 0:
        return
    height, width = sample_height_width(resolution)
    largest = max(max(size) for size in image_format.sizes)
    count = len(image_format.sizes)
    fix = "--resize_mode auto (pads the images that fit and resizes the rest) or crop"
    if isinstance(resolution, int) and skips_bad_images:
        fix += f", or a --resolution of at least {largest}"
    which = f"all {count}" if too_big == count else f"{too_big} of the {count}"
    problem = (
        f"--resize_mode pad: {which} {what} inspected are larger than the {width}×{height} canvas (up to {largest}px), "
        "and padding never shrinks an image"
    )
    if too_big == count or not skips_bad_images:
        raise ValueError(f"{problem}. Use {fix}.")
    logger.warning(f"{problem}: they will be skipped as bad images. To keep them, use {fix}.")


#: Padded images that cover less of the canvas than this (the median, by area) get a warning.
MOSTLY_PADDING = 0.5


def padded_coverage(image_format: ImageFormat, resolution: int | tuple[int, int], resize_mode: str = "auto") -> float | None:
    """The median fraction of the canvas's area (``R`` or ``(height, width)``) that the inspected
    images cover once preprocessed: ``w·h / (W·H)`` for one padded, 1 for one that ``auto`` resizes
    to fill it (``pad`` skips those); ``None`` when nothing is left, or ``crop`` fills every canvas."""
    if resize_mode not in ("pad", "auto"):
        return None
    height, width = sample_height_width(resolution)
    fractions = sorted(
        w * h / (width * height) if w <= width and h <= height else 1.0
        for w, h in image_format.sizes
        if resize_mode == "auto" or (w <= width and h <= height)
    )
    return fractions[(len(fractions) - 1) // 2] if fractions else None


def warn_if_mostly_padding(image_format: ImageFormat, resolution: int | tuple[int, int], resize_mode: str) -> None:
    """A warning when the default ``resize_mode="auto"`` pads the images that fit the canvas and they
    would cover under :data:`MOSTLY_PADDING` of it: 28 px images on a 64 px canvas are small pictures
    in a black frame, which the network then learns to draw. MNIST's 28 → 32 (77 %) is the DDPM
    convention and passes quietly, and an explicit ``pad`` is taken as meant."""
    coverage = padded_coverage(image_format, resolution, resize_mode) if resize_mode == "auto" else None
    if coverage is None or coverage >= MOSTLY_PADDING:
        return
    height, width = sample_height_width(resolution)
    sides = f"{image_format.size}px" if image_format.smallest == image_format.largest else f"{image_format.smallest}–{image_format.largest}px"
    logger.warning(
        f"--resize_mode auto pads these {sides} images onto a {width}×{height} canvas, where they cover "
        f"{coverage:.0%} of it (the median of {image_format.inspected} inspected): the network would learn small "
        "pictures in a black frame. Pass --resize_mode crop to scale them up to fill it, or a --resolution near their size."
    )


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

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` preprocessed; `BadImageError` naming it when it cannot be."""
        image = self.source.open(index)
        try:
            return self.preprocess(image)
        except ValueError as error:
            raise BadImageError(f"{self.source.name(index)} cannot be used: {error}") from error

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index``; a bad one is, with ``bad_images="skip"``, replaced by the next readable
        image (the same one every time, so runs stay reproducible) and counted in :attr:`skipped`."""
        last_error = None
        for offset in range(len(self)):
            candidate = (int(index) + offset) % len(self)
            try:
                return self.load(candidate)
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


def stack_images(images: TrainingImages, device: torch.device | str, batch_size: int = 512, progress: bool = True) -> torch.Tensor:
    """Every preprocessed image of ``images`` in one float32 tensor ``[N, C, R, R]`` on ``device``:
    ``stack_images(images)[i]`` equals ``images[i]`` exactly."""
    from tqdm.auto import tqdm

    first = images[0]
    stacked = torch.empty((len(images), *first.shape), dtype=first.dtype, device=device)
    # No DataLoader here: iterating one draws from the global RNG, which would change the weights'
    # initialization that follows.
    for start in tqdm(range(0, len(images), batch_size), desc="data to device", disable=not progress):
        stop = min(start + batch_size, len(images))
        stacked[start:stop] = torch.stack([images[i] for i in range(start, stop)]).to(device)
    return stacked
