"""One stored image → one training tensor: reading it (upright by its EXIF orientation, 8-bit,
opaque; a file that cannot be read named), inspecting a data set's sizes and colours from headers,
and preprocessing onto the network's canvas (pad, crop or auto) in [-1, 1].

A data set's image column may hold images (a `datasets.Image` feature, or the files' bytes), paths
to image files (strings, read as `datasets` reads an ``Image`` column of paths: a relative one from
the current directory), or arrays of pixels (``Array2D`` / ``Array3D`` or nested lists of numbers, as
``Dataset.from_dict`` stores a NumPy array; see :func:`pixels_to_image`).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image

from .option_values import RESIZE_MODES
from .unet_presets import sample_height_width

logger = logging.getLogger(__name__)


#: What PIL raises for a file it cannot read as an image (empty, cut short, corrupt, not an image:
#: its UnidentifiedImageError is an OSError; too big: DecompressionBombError).
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image of the data set that cannot be read or preprocessed; the message names it."""


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
        if self.pads(image.size):
            if width > size_w or height > size_h:
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

    def pads(self, size: tuple[int, int]) -> bool:
        """Whether an image of ``size`` (width, height) is padded onto the canvas (``"pad"``, or
        ``"auto"`` and it fits) rather than resized to cover it."""
        size_h, size_w = self.height_width
        return self.resize_mode == "pad" or (self.resize_mode == "auto" and size[0] <= size_w and size[1] <= size_h)

    def data_share(self, size: tuple[int, int]) -> float:
        """The share of the canvas that an image of ``size`` (width, height) fills once placed on it:
        ``w·h / (W·H)`` when it is padded (the rest is padding), 1 when it is resized to cover it.
        The bound in bits/dim counts the image's own dimensions: the canvas's divided by this
        (:meth:`~ddpm_pipeline.likelihood.BoundTerms.per_data_dimension`)."""
        if not self.pads(size):
            return 1.0
        size_h, size_w = self.height_width
        return min(size[0], size_w) * min(size[1], size_h) / (size_w * size_h)

    def levels(self, image: Image.Image) -> torch.Tensor:
        """Steps 1–2 as a tensor: the canvas's 8-bit levels, uint8 ``[C, H, W]`` (what step 3
        scales, :func:`levels_to_model_range`)."""
        pixels = np.array(self.to_pil(image)).reshape(*self.height_width, self.channels)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        tensor = levels_to_model_range(self.levels(image))
        if self.random_flip and torch.rand((), generator=generator).item() < 0.5:
            tensor = tensor.flip(-1)
        return tensor.contiguous()


def levels_to_model_range(levels: torch.Tensor) -> torch.Tensor:
    """8-bit pixel levels ``k`` (0‥255, of any dtype) as the network sees them:
    ``x = k / 127.5 - 1``, float32 in [-1, 1], computed as the preprocessing computes it."""
    return levels.to(torch.float32) / 127.5 - 1.0


def to_8bit_opaque(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit channels and no alpha: 16-bit gray (``I;16``, or ``I`` whose values
    exceed 255) scaled by 255/65535; 32-bit float gray (``F``, as TIFFs store it) read as floats in
    [0, 1] (``round(255 v)``, as arrays of pixels are) when every pixel lies there, else as levels
    in 0‥255; transparency composited on black (like the padding). A `ValueError` says when an
    ``I`` or ``F`` image lies outside those ranges (negative, beyond 16 bits or 255, NaN), which no
    8-bit picture can show without a scale only its data set knows."""
    if image.mode.startswith("I;16"):
        return Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) * (255 / 65535)).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        return gray_levels_to_8bit(np.asarray(image, dtype=np.float64), image.mode)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image


def gray_levels_to_8bit(pixels: np.ndarray, mode: str) -> Image.Image:
    """A 32-bit gray image's ``pixels`` (PIL mode ``mode``: ``"I"`` integers, ``"F"`` floats) as
    8-bit gray: integers in 0‥255 as they are, in 0‥65535 (16 bits) scaled by 255/65535; floats all
    in [0, 1] scaled by 255, else in [0, 255] as they are; each rounded to the nearest level.
    Raises `ValueError` naming the range for anything else."""
    low, high = float(pixels.min()), float(pixels.max())
    if mode == "F" and 0 <= low and high <= 1:
        return Image.fromarray(np.rint(pixels * 255).astype(np.uint8), "L")
    if mode == "I" and not (0 <= low and high <= 65535):
        raise ValueError(f"its 32-bit integer pixels span {low:.0f}‥{high:.0f}, beyond 16 bits (0‥65535, which are "
                         "scaled to 8): store the images with 8 or 16 bits")  # fmt: skip
    if mode == "F" and not (0 <= low and high <= 255):  # NaN fails this too
        raise ValueError(f"its float pixels span [{low:.4g}, {high:.4g}], neither [0, 1] nor 0‥255: scale them to "
                         "[0, 1] (with one scale for the whole data set) or store the images with 8 or 16 bits")  # fmt: skip
    scale = 255 / 65535 if high > 255 else 1.0
    return Image.fromarray(np.rint(pixels * scale).astype(np.uint8), "L")


#: PIL modes without colour: their images train as one channel.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

#: The EXIF tag that says how a camera's stored pixels must be flipped or turned to show the picture
#: upright: 1 as stored, 2–8 the other seven flips and quarter turns (5–8 swap width and height).
EXIF_ORIENTATION = 0x0112


def exif_orientation(image: Image.Image, header_only: bool = False) -> int:
    """``image``'s EXIF orientation, 1 (as stored) when it has none or its EXIF cannot be parsed: a
    malformed tag leaves the pixels usable, so it never makes an image bad. With ``header_only``,
    a PNG's pixels are not decoded to look for EXIF after them (Pillow's ``getexif`` would): only
    an eXIf chunk before the image data counts, where writers put it."""
    try:
        if header_only and image.format == "PNG" and "exif" not in image.info:
            return 1
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
    """``(width, height)`` of :func:`upright` ``(image)`` from its header, without decoding its pixels:
    orientations 5–8 turn the picture a quarter, so they swap the stored sides."""
    width, height = image.size
    return (height, width) if exif_orientation(image, header_only=True) >= 5 else (width, height)


#: What an image column may hold besides images and paths: arrays ``[H, W]``, ``[H, W, C]`` or
#: ``[C, H, W]`` with ``C`` one of these (gray, gray with alpha, RGB, RGBA).
ARRAY_CHANNELS = (1, 2, 3, 4)


def pixels_to_image(pixels: np.ndarray) -> Image.Image:
    """An array of pixels as a PIL image: ``[H, W]`` (gray), ``[H, W, C]`` or ``[C, H, W]`` with
    ``C`` = 1 (gray), 2 (gray and alpha), 3 (RGB) or 4 (RGBA; channels last where either end could
    be ``C``; alpha is composited on black when the image is preprocessed, as for files), of
    integers in 0‥255 (as they are) or floats in [0, 1] (``round(255 v)``, the nearest of an 8-bit
    image's 256 levels, so that ``k / 255`` gives back ``k``). A `ValueError` says what else it is."""
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[-1] not in ARRAY_CHANNELS and array.shape[0] in ARRAY_CHANNELS:
        array = np.moveaxis(array, 0, -1)  # [C, H, W], as torch keeps images
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in ARRAY_CHANNELS)) or 0 in array.shape:
        raise ValueError(
            f"an array of shape {list(np.shape(pixels))} is not an image: expected [H, W], [H, W, C] or [C, H, W] "
            f"with C = {', '.join(map(str, ARRAY_CHANNELS))}"
        )
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"its integer pixels span {low}‥{high}, not 0‥255 (for 16-bit pixels, store x // 257)")
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        low, high = float(array.min()), float(array.max())
        if not (0 <= low and high <= 1):  # NaN fails this too
            raise ValueError(
                f"its float pixels span [{low:.4g}, {high:.4g}], not [0, 1] (from [-1, 1], store (x + 1) / 2; "
                "from 0‥255, store them as integers)"
            )
        array = np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise ValueError(f"its pixels are {array.dtype}, not integers in 0‥255 or floats in [0, 1]")
    return Image.fromarray(array)


def column_kind(feature: object) -> str | None:
    """What an image column holds, from its `datasets` feature: ``"images"`` (an ``Image``
    feature, or image files' bytes: a binary column, or the ``{bytes, path}`` struct that an
    ``Image`` column is stored as, read where the feature was lost, say from Parquet written by
    pandas), ``"paths"`` (strings), ``"arrays"`` (``Array2D`` / ``Array3D``, or lists of lists of
    numbers, two or three deep), or None for anything else."""
    if isinstance(feature, datasets.Image):
        return "images"
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return "images"
    if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
        return "images"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "paths"
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return "arrays" if _is_number(feature.dtype) else None
    depth = 0
    while isinstance(feature, list) or type(feature).__name__ in ("Sequence", "List", "LargeList"):
        feature = feature[0] if isinstance(feature, list) else feature.feature
        depth += 1
    return "arrays" if depth in (2, 3) and isinstance(feature, datasets.Value) and _is_number(feature.dtype) else None


def _is_number(dtype: str) -> bool:
    return dtype.startswith(("int", "uint", "float"))


class ImageSource:
    """A `datasets.Dataset`'s image column (images, paths to image files or arrays of pixels:
    :func:`column_kind`), opened one image at a time as PIL images; an image that cannot be read
    raises `BadImageError` naming it (decoded here rather than in `datasets`)."""

    def __init__(self, dataset: datasets.Dataset, image_column: str):
        if len(dataset) == 0:
            raise ValueError("The data set is empty (no images to read).")
        self.images = dataset.select_columns([image_column])
        self.kind = column_kind(dataset.features.get(image_column))
        if self.undecoded:
            self.images = self.images.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column

    @property
    def undecoded(self) -> bool:
        """Whether the column holds image files (their bytes or paths), which are decoded here."""
        return self.kind in ("images", "paths")

    def __len__(self) -> int:
        return len(self.images)

    def open(self, index: int, load: bool = True) -> Image.Image:
        """Image ``index``, turned :func:`upright`; with ``load=False`` only opened (size and mode
        read, as stored: :func:`upright_size` gives the upright size), its pixels not decoded (an
        array's pixels are at hand either way: :func:`pixels_to_image`)."""
        item = self.images[int(index)][self.image_column]
        if self.kind == "arrays":  # nested lists: NumPy makes the array ~15× faster than datasets' numpy format
            try:
                return pixels_to_image(np.asarray(item))
            except ValueError as error:
                raise BadImageError(f"{self.name(index)} cannot be used: {error}") from error
        if not self.undecoded:
            if not isinstance(item, Image.Image):
                raise TypeError(
                    f"Column {self.image_column!r} holds {type(item).__name__}, not images (an Image feature, paths to "
                    "image files, or arrays of pixels): name the column that holds them with --image_column."
                )
            return item
        if not item.get("bytes") and "://" in (item.get("path") or ""):
            raise BadImageError(
                f"{self.name(index)} is a URL, and images are read from files, not downloaded as they train: download "
                "them first (with img2dataset, say) and point the data set at the files"
            )
        try:
            image = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
            if load:
                image.load()
                image = upright(image)
            return image
        except IMAGE_READ_ERRORS as error:
            hint = ""
            if isinstance(error, FileNotFoundError) and not item.get("bytes") and not os.path.isabs(item["path"]):
                hint = (f" (a relative path is read from the current directory, {os.getcwd()}: run from the folder the "
                        "paths are relative to, or store absolute paths)")  # fmt: skip
            raise BadImageError(f"{self.name(index)} cannot be used: {type(error).__name__}: {error}{hint}") from error

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

    def shorter_sides(self) -> str:
        """The shorter sides' range, ``28px`` or ``20–100px``."""
        return f"{self.size}px" if self.smallest == self.largest else f"{self.smallest}–{self.largest}px"

    def describe(self) -> str:
        """In words, for the log: ``"RGB, 64px (64 images inspected)"``."""
        sides = self.shorter_sides() if self.smallest == self.largest else f"shorter sides {self.shorter_sides()}, median {self.size}"
        colour = "RGB" if self.channels == 3 else "grayscale"
        return f"{colour}, {sides} ({self.inspected} images inspected)"


def inspect_images(source: ImageSource, max_images: int = 64) -> ImageFormat:
    """The :class:`ImageFormat` of ``max_images`` images spread evenly over ``source`` (headers
    only: nothing is decoded); unreadable ones are passed over."""
    count, wanted = len(source), min(len(source), max_images)
    indices = sorted({round(i * (count - 1) / max(1, wanted - 1)) for i in range(wanted)})
    shorter_sides, sizes, colour, first_error = [], [], False, None
    for index in indices:
        try:
            image = source.open(index, load=False)
        except BadImageError as error:
            first_error = first_error or error
            continue
        with image:  # closes the file the header came from
            shorter_sides.append(min(image.size))
            sizes.append(upright_size(image))
            colour = colour or image.mode not in GRAY_MODES
    if not shorter_sides:
        raise ValueError(
            f"None of the {len(indices)} images inspected can be read (the first: {first_error}): check the data, and "
            "that --image_column names the column that holds the images."
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
    preprocess = ImagePreprocessor(resolution, resize_mode=resize_mode)
    height, width = preprocess.height_width
    fits = [size for size in image_format.sizes if resize_mode == "auto" or (size[0] <= width and size[1] <= height)]
    fractions = sorted(preprocess.data_share(size) for size in fits)
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
    logger.warning(
        f"--resize_mode auto pads these {image_format.shorter_sides()} images onto a {width}×{height} canvas, where they cover "
        f"{coverage:.0%} of it (the median of {image_format.inspected} inspected): the network would learn small "
        "pictures in a black frame. Pass --resize_mode crop to scale them up to fill it, or a --resolution near their size."
    )
