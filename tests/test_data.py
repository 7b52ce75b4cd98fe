"""Data sources, column detection, preprocessing and the offline converters."""

import gzip
import io
import logging
import pickle
import re
import struct
import tarfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_pipeline.convert import main as convert
from ddpm_pipeline.data import (
    TrainingImages,
    bundled_dataset,
    data_identity,
    describe_data_source,
    find_image_column,
    load_image_dataset,
    read_idx,
)
from ddpm_pipeline.images import (
    BadImageError,
    ImageFormat,
    ImagePreprocessor,
    ImageSource,
    column_kind,
    inspect_images,
    padded_coverage,
    pixels_to_image,
    to_8bit_opaque,
    warn_if_mostly_padding,
)


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_bundled_dataset_is_fashion_mnist_test_set():
    dataset = bundled_dataset()
    assert dataset.num_rows == 10_000
    assert find_image_column(dataset) == "image"
    first = dataset[0]
    assert first["image"].size == (28, 28) and first["image"].mode == "L"
    assert dataset.features["label"].names[first["label"]] == "Ankle boot"  # the set's first test image
    counts = np.bincount(dataset["label"], minlength=10)
    assert counts.tolist() == [1000] * 10
    assert load_image_dataset().num_rows == 10_000  # no source given → bundled


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 7, 6), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "a.raw", images, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "a.raw"), images)
    (tmp_path / "bad").write_bytes(b"PNG.....")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a.raw").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:-9])  # a download cut short
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    for broken in ("cut.gz", "plain.gz"):
        with pytest.raises(ValueError, match=f"{broken} is not a complete gzip file .*download it again"):
            read_idx(tmp_path / broken)


def test_idx_converter(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab.gz", labels)
    out = convert(
        [
            "idx",
            "--images",
            str(tmp_path / "img.gz"),
            "--labels",
            str(tmp_path / "lab.gz"),
            "--classes",
            "fashion-mnist",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    dataset = load_image_dataset(dataset_path=out)
    assert dataset.num_rows == 6 and dataset["label"] == labels.tolist()
    assert np.array_equal(np.asarray(dataset[3]["image"]), images[3])
    assert dataset.features["label"].names[9] == "Ankle boot"
    (tmp_path / "a_file").write_text("x")
    for taken in (out, tmp_path / "a_file"):  # a non-empty folder or a file: refused before any work
        with pytest.raises(SystemExit):
            convert(["idx", "--images", str(tmp_path / "img.gz"), "--output", str(taken)])


def test_cifar10_converter(tmp_path):
    rng = np.random.default_rng(2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = {}
    with tarfile.open(archive, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            batches[name] = data
            blob = pickle.dumps({b"data": data, b"labels": [1, 7]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    out = convert(["cifar10", "--archive", str(archive), "--split", "train", "--output", str(tmp_path / "train")])
    dataset = load_image_dataset(dataset_path=out)
    assert dataset.num_rows == 10 and dataset.column_names == ["img", "label"]
    assert find_image_column(dataset) == "img"
    # CIFAR rows are channel-planar (1024 R, 1024 G, 1024 B)
    expected = batches["data_batch_1"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(dataset[0]["img"]), expected)
    test = convert(["cifar10", "--archive", str(archive), "--split", "test", "--output", str(tmp_path / "test")])
    assert load_image_dataset(dataset_path=test).num_rows == 2
    (tmp_path / "page.html").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="page.html is not a tar archive: give the CIFAR-10 python version"):
        convert(["cifar10", "--archive", str(tmp_path / "page.html"), "--output", str(tmp_path / "none")])


def test_the_converter_names_a_missing_input_file(tmp_path, capsys):
    for arguments in (["idx", "--images", "missing.gz"], ["cifar10", "--archive", "missing.tar.gz"]):
        with pytest.raises(SystemExit):
            convert([*arguments, "--output", str(tmp_path / "out")])
        assert f"--{arguments[1][2:]} missing" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_data_a_checkpoint_records_names_its_source_count_and_fingerprint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert describe_data_source() == "the bundled Fashion-MNIST test set"
    assert describe_data_source(split="train[:1000]") == "the bundled Fashion-MNIST test set, split train[:1000]"
    assert describe_data_source(dataset_name="cifar10") == "Hub data set cifar10, split train"
    assert describe_data_source("ylecun/mnist", "mnist", "test") == "Hub data set ylecun/mnist (mnist), split test"
    assert describe_data_source(train_data_dir="faces") == f"image folder {tmp_path / 'faces'}"
    assert describe_data_source(dataset_path="saved", split="valid") == f"saved data set {tmp_path / 'saved'}, split valid"
    bundled = data_identity(load_image_dataset(), describe_data_source())
    assert bundled["num_images"] == 10_000 and bundled == data_identity(load_image_dataset(), describe_data_source())


def test_a_hub_data_set_neither_cached_nor_reachable_names_the_fixes(tmp_path):
    """Offline (as the tests run) with an empty cache: datasets' ConnectionError, with what to do."""
    with pytest.raises(ConnectionError, match="not in the datasets cache") as raised:
        load_image_dataset(dataset_name="ddpm-pipeline-tests/not-cached", cache_dir=str(tmp_path / "cache"))
    message = str(raised.value)
    assert "HF_HUB_OFFLINE" in message and str(tmp_path / "cache") in message
    assert "--train_data_dir / --dataset_path" in message and "ddpm_pipeline.convert" in message


def test_imagefolder_source_and_column_detection(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(folder / "c.png")
    dataset = load_image_dataset(train_data_dir=folder)
    assert dataset.num_rows == 3
    column = find_image_column(dataset)
    for channels in (1, 3):
        preprocess = ImagePreprocessor(resolution=32, channels=channels)
        tensors = [preprocess(image) for image in dataset[column]]
        assert all(t.shape == (channels, 32, 32) for t in tensors)
        assert all(-1 <= t.min() and t.max() <= 1 for t in tensors)
    with pytest.raises(ValueError, match="Give one data source"):
        load_image_dataset(train_data_dir=folder, dataset_path=folder)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_dataset(train_data_dir=tmp_path / "missing")
    (folder / "model_index.json").write_text("{}")  # a run folder: its grids and loss curve are PNGs
    with pytest.raises(ValueError, match=r"holds a pipeline \(model_index.json\), not training images: point at the"):
        load_image_dataset(train_data_dir=folder)


def test_an_image_folder_whose_names_datasets_reads_as_splits_says_so(tmp_path, caplog):
    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 7).save(path)

    # datasets takes "train_cats/" for a split, and then leaves "dogs/" out
    for path in ("train_cats/a.png", "train_cats/b.png", "dogs/c.png", ".thumbs/d.png"):
        image(tmp_path / "pets" / path)
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.data"):
        assert load_image_dataset(train_data_dir=tmp_path / "pets").num_rows == 2
    assert "1 of the 3 image files in" in caplog.text and "(e.g. dogs/c.png)" in caplog.text  # the hidden one is no loss
    assert "(here train: 2 files, e.g. train_cats/a.png)" in caplog.text
    with pytest.raises(ValueError, match=r"has the splits \['train'\], not 'validation'"):
        load_image_dataset(train_data_dir=tmp_path / "pets", split="train+validation")
    # file names make splits too, where no folder's name does
    for path in ("a_train_1.png", "b-test.png", "c.png"):
        image(tmp_path / "names" / path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.data"):
        assert load_image_dataset(train_data_dir=tmp_path / "names", split="test").num_rows == 1
    assert "1 of the 3 image files" in caplog.text and "(e.g. c.png)" in caplog.text
    assert "train: 1 file, e.g. a_train_1.png; test: 1 file, e.g. b-test.png" in caplog.text
    # the folder a run wrote: its only "train" is logs/train_ddpm/, which holds no image
    (tmp_path / "run" / "logs" / "train_ddpm").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "train_ddpm" / "events.out").write_bytes(b"0")
    image(tmp_path / "run" / "samples" / "step_1.png")
    with pytest.raises(ValueError, match="no image files in its split 'train'.*e.g. logs/train_ddpm/events.out"):
        load_image_dataset(train_data_dir=tmp_path / "run")
    # no split names: every image is "train", and another split is refused with the way to hold some out
    image(tmp_path / "plain" / "a" / "e.png")
    image(tmp_path / "plain" / "f.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.data"):
        assert load_image_dataset(train_data_dir=tmp_path / "plain").num_rows == 2
    assert not caplog.text
    with pytest.raises(ValueError, match=r"images are the split 'train', not 'test': .*train\[-500:\]"):
        load_image_dataset(train_data_dir=tmp_path / "plain", split="test")
    # only files datasets reads as images count
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "scan.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(ValueError, match=r"holds no image files .*; it holds 1 \.pdf file, which are not read as images: "
                                         "convert them to PNG or JPEG, or point at the folder of images"):  # fmt: skip
        load_image_dataset(train_data_dir=tmp_path / "documents")
    for name in ("IMG_1.HEIC", "IMG_2.heic", "IMG_3.heic", "notes.txt", "clip.mov", "data.xyz", ".DS_Store"):
        (tmp_path / "documents" / name).write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"it holds 3 \.heic, 1 \.mov, 1 \.pdf files and files of 2 other kinds, which"):
        load_image_dataset(train_data_dir=tmp_path / "documents")
    # beside readable images, photos of a format datasets leaves out are named, not dropped unsaid
    image(tmp_path / "documents" / "a.png")
    (tmp_path / "documents" / "raw").mkdir()
    (tmp_path / "documents" / "raw" / "DSC_1.NEF").write_bytes(b"\0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.data"):
        assert load_image_dataset(train_data_dir=tmp_path / "documents").num_rows == 1
    assert (f"3 .heic, 1 .nef files in {tmp_path / 'documents'} (e.g. IMG_1.HEIC) are not read as images and will not "
            "be used: convert them to JPEG or PNG") in caplog.text  # fmt: skip


def test_saved_dataset_dict_and_column_rules(tmp_path):
    pictures = [Image.new("L", (8, 8), 10 * i) for i in range(3)]
    dataset = datasets.Dataset.from_dict(
        {"picture": pictures, "n": [0, 1, 2]},
        features=datasets.Features({"picture": datasets.Image(), "n": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert load_image_dataset(dataset_path=tmp_path / "dd", split="test").num_rows == 1
    with pytest.raises(ValueError, match="has splits"):
        load_image_dataset(dataset_path=tmp_path / "dd", split="validation")
    # each kind of folder given as the other names the right option
    with pytest.raises(ValueError, match=f"written by save_to_disk: pass it as --dataset_path {tmp_path / 'dd'}"):
        load_image_dataset(train_data_dir=tmp_path / "dd")
    (tmp_path / "pictures" / "a").mkdir(parents=True)
    pictures[0].save(tmp_path / "pictures" / "a" / "0.png")
    with pytest.raises(ValueError, match=f"holds image files: pass it as --train_data_dir {tmp_path / 'pictures'}"):
        load_image_dataset(dataset_path=tmp_path / "pictures")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a data set written by save_to_disk .* or a folder of images"):
        load_image_dataset(dataset_path=tmp_path / "empty")
    with pytest.raises(ValueError, match=f"is a file of the data set that save_to_disk wrote: pass its folder, --dataset_path {tmp_path / 'dd'}."):
        load_image_dataset(dataset_path=tmp_path / "dd" / "dataset_dict.json")
    # a file of it cut short (a copy, a full disk): pyarrow's read error, named with the fix
    dataset.save_to_disk(str(tmp_path / "cut"))
    (arrow,) = (tmp_path / "cut").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"--dataset_path {tmp_path / 'cut'} cannot be read (") +
                       ".*: a file of it is cut short or damaged. Write it again with save_to_disk"):  # fmt: skip
        load_image_dataset(dataset_path=tmp_path / "cut")
    # load_dataset reads a saved data set given as --dataset_name with an error that names neither option
    with pytest.raises(ValueError, match=f"--dataset_name {tmp_path / 'dd'} is a data set written by save_to_disk, .* pass it as --dataset_path {tmp_path / 'dd'}."):
        load_image_dataset(dataset_name=str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=f"is a file: pass its folder as --dataset_path {tmp_path / 'dd'}."):
        load_image_dataset(dataset_name=str(tmp_path / "dd" / "dataset_dict.json"))
    with pytest.raises(FileNotFoundError, match="--dataset_name ./missing does not exist: a local path must name"):
        load_image_dataset(dataset_name="./missing")
    # a folder of images is what load_dataset reads as one (the imagefolder builder)
    assert load_image_dataset(dataset_name=str(tmp_path / "pictures")).num_rows == 1
    assert find_image_column(dataset) == "picture"  # the only Image feature
    assert find_image_column(dataset, "picture") == "picture"
    with pytest.raises(ValueError, match="--image_column 'photo' is not a column"):
        find_image_column(dataset, "photo")
    image = datasets.Image()
    two = datasets.Dataset.from_dict(
        {"a": pictures, "b": pictures}, features=datasets.Features({"a": image, "b": image})
    )
    with pytest.raises(ValueError, match="pass --image_column"):
        find_image_column(two)
    # without an Image feature: the one column of arrays (or of files' bytes); strings only when named
    arrays = np.zeros((2, 4, 4), np.uint8)
    assert find_image_column(datasets.Dataset.from_dict({"caption": ["a", "b"], "pixels": arrays, "n": [0, 1]})) == "pixels"
    assert find_image_column(datasets.Dataset.from_dict({"png": [b"x", b"y"], "n": [0, 1]})) == "png"
    for ambiguous in ({"pixels": arrays, "mask": arrays}, {"path": ["a.png", "b.png"], "n": [0, 1]}):
        with pytest.raises(ValueError, match="Cannot tell which column holds the images .* pass --image_column"):
            find_image_column(datasets.Dataset.from_dict(ambiguous))


def test_split_slices_and_sums_select_rows_of_every_source(tmp_path):
    # as datasets' load_dataset(split=...) reads them; they were ignored for folders and saved sets
    numbers = datasets.Dataset.from_dict({"n": list(range(10))})
    datasets.DatasetDict({"train": numbers, "test": numbers.select(range(4))}).save_to_disk(str(tmp_path / "dd"))
    numbers.save_to_disk(str(tmp_path / "lone"))
    saved = {"dataset_path": tmp_path / "dd"}
    assert load_image_dataset(**saved, split="train[:3]")["n"] == [0, 1, 2]
    assert load_image_dataset(**saved, split="train[-20%:]")["n"] == [8, 9]
    assert load_image_dataset(**saved, split="train[2:4]+test[:1]")["n"] == [2, 3, 0]
    assert load_image_dataset(dataset_path=tmp_path / "lone", split="train[:50%]")["n"] == [0, 1, 2, 3, 4]
    assert load_image_dataset(dataset_path=tmp_path / "lone", split="test")["n"] == list(range(10))  # a lone set: any name
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_image_dataset(**saved, split="train+validation[:2]")
    with pytest.raises(ValueError, match="one data set without splits"):
        load_image_dataset(dataset_path=tmp_path / "lone", split="train+test")
    with pytest.raises(ValueError, match="selects no rows"):
        load_image_dataset(**saved, split="train[5:5]")
    with pytest.raises(ValueError, match="selects no rows"):  # past the end: not datasets' IndexError
        load_image_dataset(**saved, split="train[20:]")
    assert load_image_dataset(**saved, split="train[8:]+test[9:]")["n"] == [8, 9]
    with pytest.raises(ValueError, match="is not a split name or slice"):
        load_image_dataset(**saved, split="train[:")
    assert load_image_dataset(split="train[:25]").num_rows == 25  # the bundled set
    # an image folder: its subfolders are its splits, and slices apply
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / "folder" / split).mkdir(parents=True)
        for index in range(count):
            Image.new("L", (8, 8), 40 * index).save(tmp_path / "folder" / split / f"{index}.png")
    folder = {"train_data_dir": tmp_path / "folder"}
    assert [load_image_dataset(**folder, split=split).num_rows for split in ("train", "test", "train[:1]+test")] == [3, 2, 3]


def test_preprocessing_pads_crops_flips_and_scales():
    square = Image.fromarray(np.full((28, 28), 255, np.uint8))
    padded = ImagePreprocessor(resolution=32)(square)
    assert padded.shape == (1, 32, 32)
    assert (
        torch.all(padded[:, 2:30, 2:30] == 1) and torch.all(padded[:, :2] == -1) and torch.all(padded[:, :, 30:] == -1)
    )
    gradient = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)))  # 64 wide, 48 high
    cropped = ImagePreprocessor(resolution=16, resize_mode="crop")(gradient)
    assert cropped.shape == (1, 16, 16)
    assert cropped[0, 0, 0] < cropped[0, 0, -1]  # left-to-right gradient kept
    flipper = ImagePreprocessor(resolution=16, resize_mode="crop", random_flip=True)
    outcomes = {bool(flipper(gradient, torch.Generator().manual_seed(s))[0, 0, 0] > 0) for s in range(20)}
    assert outcomes == {True, False}  # both orientations occur
    rgb = ImagePreprocessor(resolution=8, channels=3)(Image.new("L", (8, 8), 0))
    assert rgb.shape == (3, 8, 8) and torch.all(rgb == -1)
    with pytest.raises(ValueError, match="Cannot pad a 40x40 image"):
        ImagePreprocessor(resolution=32, resize_mode="pad")(Image.new("L", (40, 40)))
    with pytest.raises(ValueError, match="channels must be 1"):
        ImagePreprocessor(resolution=32, channels=2)


def test_the_data_share_is_the_part_of_the_canvas_the_image_fills():
    """What the bound divides by for a padded image: the share of the canvas its own pixels take,
    as preprocessing places them (a white image's pixels on the black canvas), 1 for a resized one."""
    cases = [(ImagePreprocessor(32), (28, 28), 784 / 1024), (ImagePreprocessor(32), (20, 31), 620 / 1024),
             (ImagePreprocessor(32), (40, 28), 1.0), (ImagePreprocessor(32), (32, 32), 1.0),
             (ImagePreprocessor(32, resize_mode="crop"), (28, 28), 1.0),
             (ImagePreprocessor(32, resize_mode="pad"), (32, 16), 0.5),
             (ImagePreprocessor((16, 32), resize_mode="auto"), (32, 8), 0.5)]  # fmt: skip
    for preprocess, size, share in cases:
        assert preprocess.data_share(size) == pytest.approx(share), (preprocess, size)
        placed = np.asarray(preprocess.to_pil(Image.new("L", size, 255)))
        assert (placed > 0).mean() == pytest.approx(share), (preprocess, size)
    images = TrainingImages(bundled_dataset().select(range(3)), "image", ImagePreprocessor(32))
    assert [images.data_share(index) for index in range(3)] == [784 / 1024] * 3  # Fashion-MNIST on a 32 px canvas


def test_auto_padding_that_leaves_most_of_the_canvas_black_is_warned_about(caplog):
    small = ImageFormat(size=28, channels=1, smallest=28, largest=28, inspected=3, sizes=((28, 28),) * 3)
    assert padded_coverage(small, 32) == pytest.approx(28 * 28 / 32**2)  # MNIST's 28 → 32: 77 %
    assert padded_coverage(small, 64) == pytest.approx(28 * 28 / 64**2)
    assert padded_coverage(small, (28, 56)) == pytest.approx(0.5)  # (height, width)
    assert padded_coverage(small, 64, "crop") is None  # crop fills every canvas
    mixed = ImageFormat(size=80, channels=3, smallest=28, largest=100, inspected=3, sizes=((28, 28), (100, 80), (90, 90)))
    assert padded_coverage(mixed, 64) == 1.0  # auto resizes the two larger ones to fill it
    assert padded_coverage(mixed, 64, "pad") == pytest.approx(28 * 28 / 64**2)  # pad skips them
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.images"):
        warn_if_mostly_padding(small, 32, "auto")
        warn_if_mostly_padding(small, 64, "pad")  # asked for
        warn_if_mostly_padding(mixed, 64, "auto")
        assert not caplog.records
        warn_if_mostly_padding(small, 64, "auto")
    assert len(caplog.records) == 1
    assert "28px images onto a 64×64 canvas, where they cover 19% of it" in caplog.text
    assert "--resize_mode crop" in caplog.text


def test_preprocessing_to_a_non_square_canvas():
    """A UNet2DModel's sample_size may be [height, width]: the canvas is then height × width."""
    assert ImagePreprocessor(resolution=[16, 16]).resolution == 16  # a square pair is one size
    wide = ImagePreprocessor(resolution=[16, 32])
    assert wide.resolution == (16, 32) and wide.height_width == (16, 32)
    padded = wide(Image.fromarray(np.full((10, 20), 255, np.uint8)))  # 20 wide, 10 high
    assert padded.shape == (1, 16, 32)
    assert torch.all(padded[:, 3:13, 6:26] == 1) and padded.sum() == 10 * 20 - (16 * 32 - 10 * 20)
    # crop: scaled by max(32/40, 16/40) = 0.8 to 32×32 (just covering the canvas), then the middle 16 rows
    rows = Image.fromarray(np.repeat(np.arange(40, dtype=np.uint8)[:, None] * 6, 40, axis=1))  # brighter downwards
    cropped = ImagePreprocessor(resolution=(16, 32), resize_mode="crop")(rows)
    expected = ImagePreprocessor(resolution=32, resize_mode="crop")(rows)[:, 8:24, :]
    assert cropped.shape == (1, 16, 32) and torch.equal(cropped, expected)
    assert ImagePreprocessor(resolution=(16, 32))(Image.new("L", (40, 40))).shape == (1, 16, 32)  # auto crops it
    with pytest.raises(ValueError, match="Cannot pad a 40x10 image to 32x16"):
        ImagePreprocessor(resolution=(16, 32), resize_mode="pad").to_pil(Image.new("L", (40, 10)))
    with pytest.raises(ValueError, match="one size or \\(height, width\\)"):
        ImagePreprocessor(resolution=[8, 8, 8])


def test_arrays_of_pixels_become_the_images_they_hold():
    """HW, HWC and CHW arrays of integers 0‥255 or floats in [0, 1] are the same 8-bit image; any
    other shape, range or type is refused with what it is and how to store it."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(pixels_to_image(rgb)), rgb) and pixels_to_image(rgb).mode == "RGB"
    assert np.array_equal(np.asarray(pixels_to_image(rgb.transpose(2, 0, 1))), rgb)  # channels first, as torch keeps them
    assert np.array_equal(np.asarray(pixels_to_image(rgb.astype(np.int64))), rgb)  # lists of ints read as int64
    assert np.array_equal(np.asarray(pixels_to_image(rgb.astype(np.float32) / 255)), rgb)  # k / 255 gives back k
    gray = rgb[..., 0]
    for layout in (gray, gray[..., None], gray[None]):
        image = pixels_to_image(layout)
        assert image.mode == "L" and np.array_equal(np.asarray(image), gray)
    rgba = pixels_to_image(np.dstack([rgb, np.full((5, 7), 128, np.uint8)]))
    assert rgba.mode == "RGBA" and rgba.size == (7, 5)
    gray_alpha = pixels_to_image(np.stack([gray, np.full((5, 7), 255, np.uint8)]))  # [2, H, W]
    assert gray_alpha.mode == "LA" and np.array_equal(np.asarray(to_8bit_opaque(gray_alpha).convert("L")), gray)
    assert np.asarray(pixels_to_image(np.array([[0.0, 0.5 / 255, 1.5 / 255, 1.0]]))).tolist() == [[0, 0, 2, 255]]  # rounded
    for pixels, message in [
        (np.zeros((5, 5, 5), np.uint8), r"shape \[5, 5, 5\] is not an image: expected \[H, W\], \[H, W, C\] or \[C, H, W\] "
                                        "with C = 1, 2, 3, 4"),
        (np.zeros(16, np.uint8), r"shape \[16\] is not an image"),
        (np.zeros((0, 4), np.uint8), r"shape \[0, 4\] is not an image"),
        (np.full((2, 2), 256), r"integer pixels span 256‥256, not 0‥255 \(for 16-bit pixels, store x // 257\)"),
        (np.full((2, 2), -1.0), r"float pixels span \[-1, -1\], not \[0, 1\] \(from \[-1, 1\], store \(x \+ 1\) / 2"),
        (np.array([[0.5, np.nan]]), r"float pixels span \[nan, nan\], not \[0, 1\]"),
        (np.full((2, 2), 255.0), r"float pixels span \[255, 255\], not \[0, 1\] .* from 0‥255, store them as integers"),
        (np.ones((2, 2), bool), "its pixels are bool, not integers in 0‥255 or floats in"),
    ]:
        with pytest.raises(ValueError, match=message):
            pixels_to_image(pixels)


def test_gray_files_of_16_and_32_bits_are_read_as_8_bit_levels_or_refused(tmp_path):
    """A float TIFF (PIL mode F) in [0, 1] is read as arrays of floats are, round(255 v), and one in
    0‥255 as levels; 16-bit PNGs (I;16) and 32-bit integer TIFFs (I) within 16 bits are scaled by
    255/65535. Out of those ranges an image is bad, named with its range and the fix, rather than
    clipped to black or white."""
    rng = np.random.default_rng(3)
    levels = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    levels[0, :2] = 0, 255
    sixteen = levels.astype(np.uint16) * 257  # k·257 is k exactly at 8 bits
    files = {
        "unit.tif": Image.fromarray(levels.astype(np.float32) / 255, "F"),
        "levels.tif": Image.fromarray(levels.astype(np.float32), "F"),
        "sixteen.png": Image.fromarray(sixteen),
        "int32.tif": Image.fromarray(sixteen.astype(np.int32), "I"),
        "small-int32.tif": Image.fromarray(levels.astype(np.int32), "I"),
        "negative.tif": Image.fromarray(levels.astype(np.float32) / 255 - 0.5, "F"),
        "hdr.tif": Image.fromarray(levels.astype(np.float32) * 4, "F"),
        "wide.tif": Image.fromarray(sixteen.astype(np.int32) * 16, "I"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    opened = {name: Image.open(tmp_path / name) for name in files}
    assert [opened[name].mode for name in ("unit.tif", "int32.tif")] == ["F", "I"]
    assert opened["sixteen.png"].mode in ("I;16", "I")  # Pillow 10.0 (the floor) opens them as I
    for name in ("unit.tif", "levels.tif", "sixteen.png", "int32.tif", "small-int32.tif"):
        assert np.array_equal(np.asarray(to_8bit_opaque(opened[name])), levels), name
    dataset = datasets.Dataset.from_dict({"image": [str(tmp_path / name) for name in files]}).cast_column("image", datasets.Image())
    images = TrainingImages(dataset, "image", ImagePreprocessor(8, 1), bad_images="fail")
    assert torch.equal(images[0], images[2]) and torch.equal(images[0], images[4])
    for index, message in [
        (5, r"negative.tif cannot be used: its float pixels span \[-0.5, 0.5\], neither \[0, 1\] nor 0‥255: scale them"),
        (6, r"hdr.tif cannot be used: its float pixels span \[0, 1020\], neither"),
        (7, r"wide.tif cannot be used: its 32-bit integer pixels span 0‥1048560, beyond 16 bits .*with 8 or 16 bits"),
    ]:
        with pytest.raises(BadImageError, match=message):
            images[index]


def test_a_column_of_urls_is_refused_with_what_to_do():
    dataset = datasets.Dataset.from_dict({"url": ["https://example.com/0.jpg", "hf://datasets/user/data/1.png"]})
    for index in range(2):
        with pytest.raises(BadImageError, match=r"is a URL, and images are read from files, not downloaded .*download them first"):
            ImageSource(dataset, "url").open(index)
    with pytest.raises(ValueError, match=r"None of the 2 images inspected can be read \(the first: https://example.com/0.jpg is a URL"):
        inspect_images(ImageSource(dataset, "url"))


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "imgs" / "a.png")
    dataset = datasets.Dataset.from_dict({"file": ["imgs/a.png"]})
    monkeypatch.chdir(tmp_path / "imgs")  # not the folder the path is relative to
    with pytest.raises(BadImageError, match=r"imgs/a.png cannot be used: FileNotFoundError: .* \(a relative path is read "
                                            r"from the current directory, .*imgs: run from the folder the paths are relative to"):  # fmt: skip
        ImageSource(dataset, "file").open(0)
    monkeypatch.chdir(tmp_path)
    assert ImageSource(dataset, "file").open(0).size == (4, 4)


def test_a_column_may_hold_images_paths_or_arrays_and_each_trains_on_the_same_tensors(tmp_path, monkeypatch):
    """The same pictures stored as PNG files (an Image column), as their bytes (without the Image
    feature), as paths to them (absolute or relative to the current directory), as an Array3D and
    as nested lists (what from_dict makes of a NumPy array), in HWC and CHW and as floats, are the
    same training tensors; a column of labels is refused."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"{index}.png")
    preprocess = ImagePreprocessor(16, channels=3, resize_mode="pad")

    def tensors(dataset, column):
        return torch.stack([TrainingImages(dataset, column, preprocess)[i] for i in range(len(pixels))])

    files = [str(folder / f"{i}.png") for i in range(6)]
    encoded = [(folder / f"{i}.png").read_bytes() for i in range(6)]
    expected = tensors(datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image()), "image")
    monkeypatch.chdir(tmp_path)
    array3d = datasets.Features({"photo": datasets.Array3D((12, 10, 3), "uint8"), "label": datasets.Value("int64")})
    columns = {
        "the files' bytes": datasets.Dataset.from_dict({"photo": encoded}),
        "a {bytes, path} struct": datasets.Dataset.from_dict({"photo": [{"bytes": data, "path": None} for data in encoded]}),
        "absolute paths": datasets.Dataset.from_dict({"photo": files}),
        "relative paths": datasets.Dataset.from_dict({"photo": [f"pictures/{i}.png" for i in range(6)]}),
        "Array3D": datasets.Dataset.from_dict({"photo": list(pixels), "label": list(range(6))}, features=array3d),
        "nested lists": datasets.Dataset.from_dict({"photo": pixels}),
        "channels first": datasets.Dataset.from_dict({"photo": pixels.transpose(0, 3, 1, 2)}),
        "floats in [0, 1]": datasets.Dataset.from_dict({"photo": pixels.astype(np.float32) / 255}),
    }
    for name, dataset in columns.items():
        kind = "paths" if "paths" in name else "images" if "bytes" in name else "arrays"
        assert ImageSource(dataset, "photo").kind == kind, name
        assert torch.equal(tensors(dataset, "photo"), expected), name
        assert inspect_images(ImageSource(dataset, "photo")).describe() == "RGB, 10px (6 images inspected)"
    assert column_kind(datasets.Image()) == "images" and column_kind(datasets.Value("int64")) is None
    assert column_kind(datasets.Sequence(datasets.Value("float32"))) is None  # one row of numbers is no image
    with pytest.raises(TypeError, match="Column 'label' holds int, not images .*: name the column that holds them with --image_column"):
        TrainingImages(columns["Array3D"], "label", preprocess)[0]
    # named as the image column, it is refused before any image is read, naming the columns that could be
    with pytest.raises(ValueError, match=r"--image_column 'label' holds Value\(.*int64.*\), not images .*: name the column that "
                                         r"holds them \(photo could\)\."):  # fmt: skip
        find_image_column(columns["Array3D"], "label")
    # arrays that are not images: each one is a bad image, named with what is wrong
    scaled = datasets.Dataset.from_dict({"photo": pixels.astype(np.float32)})
    with pytest.raises(ValueError, match=r"None of the 6 images inspected can be read \(the first: image 0 cannot be used: "
                                         r"its float pixels span \[.*\], not \[0, 1\]"):  # fmt: skip
        inspect_images(ImageSource(scaled, "photo"))
    with pytest.raises(BadImageError, match="image 2 cannot be used: its float pixels span .* --bad_images skip"):
        TrainingImages(scaled, "photo", preprocess, bad_images="fail")[2]


def test_a_subset_is_spread_evenly_over_the_rows():
    """The middle row of each of N equal strata: a class-sorted source gives a subset of every class."""
    from ddpm_pipeline.data import spread_rows, spread_subset

    assert spread_rows(24, 12) == list(range(1, 24, 2))
    assert spread_rows(10, 3) == [1, 5, 8]
    assert spread_rows(10_000, 4) == [1250, 3750, 6250, 8750]
    assert list(spread_rows(5, 5)) == list(spread_rows(5, 9)) == list(spread_rows(5, None)) == [0, 1, 2, 3, 4]
    for total, count in ((7, 1), (7, 6), (1000, 999), (3, 2)):
        rows = spread_rows(total, count)
        assert len(set(rows)) == count and 0 <= min(rows) and max(rows) < total
    sorted_by_class = datasets.Dataset.from_dict({"label": [0] * 50 + [1] * 50 + [2] * 50})
    assert set(spread_subset(sorted_by_class, 6)["label"]) == {0, 1, 2}
    assert spread_subset(sorted_by_class, None) is sorted_by_class


def test_a_slice_past_the_end_of_an_image_folder_names_the_split_and_its_size(tmp_path):
    """datasets' "Instruction ... corresponds to no data!" becomes the split, the folder and its size."""
    for index in range(3):
        Image.fromarray(np.full((8, 8), 50 * index, np.uint8)).save(tmp_path / f"{index}.png")
    with pytest.raises(ValueError, match=r"--split 'train\[10:\]' selects no images of the image folder .* \(train: 3 images\): "
                                         r"a slice past the end\?"):  # fmt: skip
        load_image_dataset(train_data_dir=tmp_path, split="train[10:]")
    assert len(load_image_dataset(train_data_dir=tmp_path, split="train[1:]")) == 2
