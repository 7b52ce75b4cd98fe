"""The held-out bound during training (--validation_split): what it measures, that it is the bound
eval_metrics.py computes, and that a resumed run measures what the uninterrupted one did."""

import csv
import json
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import reset_accelerate
from PIL import Image
from test_training import run_training

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet
from ddpm_pipeline.class_balance import chance_of_so_few_classes, expected_classes, sliced_classes_warning
from ddpm_pipeline.data import TrainingImages, bundled_dataset, shared_rows
from ddpm_pipeline.evaluation import EvaluationConfig, bound_over_data, evaluate
from ddpm_pipeline.images import ImagePreprocessor
from ddpm_pipeline.likelihood import batch_bound
from ddpm_pipeline.model_card import build_model_card
from ddpm_pipeline.reference import DataSource
from ddpm_pipeline.training_config import TrainingConfig
from ddpm_pipeline.validation import (
    HeldOutBound,
    HeldOutMonitor,
    check_held_out_split,
    spread_images,
    unbalanced_classes_warning,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

HELD_OUT = ["--resolution", "16", "--num_train_timesteps", "20", "--train_batch_size", "4", "--split", "train[:-100]",
            "--validation_split", "train[-100:]", "--validation_images", "4", "--validation_timesteps", "3",
            "--validation_steps", "2", "--save_images_steps", "none"]  # fmt: skip


def read_rows(path):
    with open(path, newline="") as handle:
        return [{name: float(value) for name, value in row.items()} for row in csv.DictReader(handle)]


def test_the_held_out_bound_is_the_bound_eval_metrics_computes(tmp_path, capfd):
    """Both sets draw alike (common random numbers): the same images give the same bound, and it
    is eval_metrics.py's over those images, seed and batches; a progress bar counts each set's batches."""
    torch.manual_seed(0)
    pipeline = DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), DDPMTargetScheduler(num_train_timesteps=20, beta_schedule="cosine"))
    preprocess = ImagePreprocessor(16, 1, "auto")
    images = spread_images(TrainingImages(bundled_dataset(), "image", preprocess), 6)
    assert images.images.shape == (6, 1, 16, 16)
    held_out = HeldOutBound(images, images, num_timesteps=4, seed=3, batch_size=4)
    measured = held_out.measure(pipeline.unet, pipeline.scheduler, "cpu")
    assert measured["train_bpd"] == measured["validation_bpd"]
    progress = capfd.readouterr().err
    assert "bound, training images:" in progress and "bound, held-out images:" in progress
    assert held_out.measure(pipeline.unet, pipeline.scheduler, "cpu") == measured  # the same draws every time
    evaluated = bound_over_data(pipeline, DataSource.parse("bundled"), preprocess, 6, 4, 4, 3, torch.device("cpu"))
    assert measured["validation_bpd"] == pytest.approx(evaluated["bits_per_dim"], rel=1e-6)


def test_padded_images_are_bounded_per_dimension_of_their_own_in_training_and_evaluation(tmp_path):
    """Fashion-MNIST's 28×28 on a 32×32 canvas: the bound counts the 784 pixels of the image, not the
    1,024 of the canvas (whose padding costs almost nothing and would dilute it), alike in the held-out
    bound and in eval_metrics.py; images that fill the canvas are counted whole."""
    torch.manual_seed(0)
    pipeline = DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16", sample_size=32),
                                  DDPMTargetScheduler(num_train_timesteps=20, beta_schedule="cosine"))  # fmt: skip
    preprocess = ImagePreprocessor(32, 1, "auto")
    images = spread_images(TrainingImages(bundled_dataset(), "image", preprocess), 4)
    assert images.data_share.tolist() == [784 / 1024] * 4
    measured = HeldOutBound(images, images, num_timesteps=4, seed=3, batch_size=4).measure(pipeline.unet, pipeline.scheduler, "cpu")
    evaluated = bound_over_data(pipeline, DataSource.parse("bundled"), preprocess, 4, 4, 4, 3, torch.device("cpu"))
    assert measured["validation_bpd"] == pytest.approx(evaluated["bits_per_dim"], rel=1e-6)
    assert evaluated["padded_images"] == 4
    assert evaluated["bits_per_dim"] == pytest.approx(evaluated["canvas_bits_per_dim"] * 1024 / 784, rel=1e-12)
    canvas = batch_bound(pipeline.unet, pipeline.scheduler, images.images, 4, 3, 0)  # the padded tensors' own bound
    assert float(canvas.total.mean()) == pytest.approx(evaluated["canvas_bits_per_dim"], rel=1e-6)
    # a folder of 28 px and 40 px images: the 28s are padded (counted by their pixels), the 40s resized to fill it
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, side in enumerate([28, 40, 28, 40]):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (side, side), dtype=np.uint8)).save(folder / f"{index}.png")
    mixed = bound_over_data(pipeline, DataSource.parse(str(folder)), preprocess, None, 4, 4, 3, torch.device("cpu"))
    assert mixed["padded_images"] == 2 and mixed["num_images"] == 4
    assert mixed["bits_per_dim"] > mixed["canvas_bits_per_dim"]


def test_the_monitor_keeps_its_history_and_a_resumed_run_its_last_record(tmp_path):
    """HeldOutMonitor: due every ``every`` steps; each measurement is a history row at once and the
    summary's record; a run resumed at step 4 keeps the rows up to it and, until it measures again,
    the last of them as its record; a process that does not measure writes nothing."""
    torch.manual_seed(0)
    pipeline = DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), DDPMTargetScheduler(num_train_timesteps=20, beta_schedule="cosine"))
    images = spread_images(TrainingImages(bundled_dataset(), "image", ImagePreprocessor(16, 1, "auto")), 3)
    monitor = HeldOutMonitor(HeldOutBound(images, images, 2, seed=0, batch_size=2), "test", every=2, timesteps=2)
    assert [step for step in range(1, 7) if monitor.due(step)] == [2, 4, 6]
    assert not HeldOutMonitor(None, "test", every=None, timesteps=None).due(4)  # at the end only
    monitor.open_history(tmp_path, 0, None)
    assert monitor.record is None
    for step in (2, 4, 6):
        values = monitor.measure(step, pipeline.unet, pipeline.scheduler, "cpu")
        assert read_rows(tmp_path / "validation_history.csv")[-1] == pytest.approx({"step": step, **values}, rel=1e-5)
    monitor.close()
    assert monitor.record == {"step": 6, **values, "split": "test", "num_images": 3, "num_train_images": 3, "timesteps": 2}
    assert Image.open(monitor.save_curve(tmp_path, "tiny")).size[0] > 100
    resumed = HeldOutMonitor(monitor.bound, "test", every=2, timesteps=2)
    resumed.open_history(tmp_path, 4, tmp_path)
    resumed.close()
    assert [row["step"] for row in read_rows(tmp_path / "validation_history.csv")] == [2, 4]
    assert resumed.record["step"] == 4 and resumed.record["num_images"] == 3
    other = HeldOutMonitor(None, "test", every=2, timesteps=2)  # another process than the main one
    other.open_history(tmp_path / "other", 0, None)
    assert other.measure(2, pipeline.unet, pipeline.scheduler, "cpu") is None and other.save_curve(tmp_path, "tiny") is None
    assert not (tmp_path / "other").exists()


def test_a_run_measures_its_held_out_bound_and_a_resumed_run_the_same(tmp_path):
    first, branch = tmp_path / "first", tmp_path / "branch"
    run_training(first, *HELD_OUT, "--max_train_steps", "5", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3")
    rows = read_rows(first / "validation_history.csv")
    assert [row["step"] for row in rows] == [2, 4, 5]  # every 2 steps, and at the end
    assert all(0 < row["train_bpd"] < 100 and 0 < row["validation_bpd"] < 100 for row in rows)
    # the last row is the bound of the saved (EMA) pipeline on 4 images of each set, spread evenly over it
    pipeline = DDPMTargetPipeline.from_pretrained(first)
    preprocess = ImagePreprocessor(16, 1, "auto")
    config = TrainingConfig.load(first / "training_config.json")
    assert (config.validation_split, config.validation_images) == ("train[-100:]", 4)
    dataset = bundled_dataset()
    held_out = HeldOutBound(spread_images(TrainingImages(dataset.select(range(9900, 10_000)), "image", preprocess), 4),
                            spread_images(TrainingImages(dataset.select(range(9900)), "image", preprocess), 4), num_timesteps=3, seed=0,
                            batch_size=4)  # fmt: skip
    assert held_out.measure(pipeline.unet, pipeline.scheduler, "cpu") == pytest.approx(
        {"train_bpd": rows[-1]["train_bpd"], "validation_bpd": rows[-1]["validation_bpd"]}, rel=1e-5
    )  # the CSV keeps 6 digits
    summary = json.loads((first / "training_summary.json").read_text())
    assert summary["held_out"]["step"] == 5 and summary["held_out"]["validation_bpd"] == pytest.approx(rows[-1]["validation_bpd"], rel=1e-5)
    assert Image.open(first / "validation_curve.png").size[0] > 100
    card = build_model_card(first, "someone/x").text
    assert "on 4 held-out images (train[-100:]) and" in card and "](validation_curve.png)" in card
    # eval_metrics.py's bits/dim of the finished run, with the run's count, timesteps, seed and batch, nothing naming the data,
    # are measured on the held-out images: the run's last held-out bound
    scored = evaluate(model=str(first), metrics="bpd", bpd_num_images=4, bpd_timesteps=3, bpd_batch_size=4,
                      output=str(tmp_path / "r.json"), device="cpu")  # fmt: skip
    assert scored["metrics"]["bpd"]["split"] == "train[-100:]"
    assert scored["metrics"]["bpd"]["bits_per_dim"] == pytest.approx(summary["held_out"]["validation_bpd"], rel=1e-6)
    # a run branched from its step-2 checkpoint keeps the first row and measures the others alike
    reset_accelerate()
    run_training(branch, *HELD_OUT, "--max_train_steps", "5", "--checkpointing_steps", "2",
                 "--resume_from_checkpoint", first / "checkpoint-2")  # fmt: skip
    assert read_rows(branch / "validation_history.csv") == rows


def test_held_out_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="is the training split itself"):
        TrainingConfig(split="train", validation_split="train").validate()
    with pytest.raises(ValueError, match="--validation_images must be a positive integer, got 0"):
        TrainingConfig(validation_split="train[-10:]", validation_images=0).validate()
    with pytest.raises(ValueError, match="selects no rows"):
        run_training(tmp_path / "run", *HELD_OUT, "--validation_split", "train[10000:]", "--max_train_steps", "1")


@pytest.mark.parametrize(("split", "held_out", "shared"), [
    ("train", "train[-500:]", "500 images that --split 'train' trains on (rows 9500–9999)"),  # --split left out
    ("train[:9000]", "test[-2000:]", "1,000 images that --split 'train[:9000]' trains on (rows 8000–8999)"),  # one set
])  # fmt: skip
def test_a_held_out_split_that_shares_training_images_is_refused(tmp_path, split, held_out, shared):
    """The bundled set is one split under any name, so its slices overlap by rows whatever their names."""
    with pytest.raises(ValueError, match=re.escape(f"--validation_split {held_out!r} holds {shared}: the held-out bound "
                                                   "would measure training images")):  # fmt: skip
        run_training(tmp_path / "run", *HELD_OUT, "--split", split, "--validation_split", held_out, "--max_train_steps", "1")
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_the_split_check_reads_split_sizes_only_where_rows_can_be_shared():
    """Distinct named splits share nothing, so no split is loaded to learn its size; the same names,
    or a source of one split, are read and compared by rows."""
    def unread(name):
        raise AssertionError(f"split {name} was read")

    check_held_out_split("train[:50%]", "test", unread, one_split=False)
    sizes = {"train": 30, "test": 10}.get
    check_held_out_split("train[:-5]", "train[-5:]", sizes, one_split=False)
    with pytest.raises(ValueError, match=r"holds 10 images that --split 'train' trains on \(rows 0–9\)"):
        check_held_out_split("train", "test", lambda name: 10, one_split=True)  # one split of 10 under any name


def test_rows_shared_by_two_splits_of_a_source_with_named_splits(tmp_path):
    from test_training import saved_dataset

    from ddpm_pipeline.data import has_named_splits

    sizes = {"train": 30, "test": 10}.get
    assert shared_rows("train[:-5]", "train[-5:]", sizes) == [] and shared_rows("train", "test", sizes) == []
    assert shared_rows("train[:50%]+test[:4]", "test", sizes) == [("test", 0, 4)]
    assert shared_rows("train[:10%]", "train[:2]", sizes) == [("train", 0, 2)]  # percentages as datasets reads them
    # a saved DatasetDict's splits are distinct; its test split trains nothing of train
    whole = saved_dataset(tmp_path / "whole", count=12, size=16)
    splits = datasets.load_from_disk(str(whole)).train_test_split(test_size=4, shuffle=False)
    splits.save_to_disk(str(tmp_path / "dict"))
    assert has_named_splits(dataset_path=tmp_path / "dict") and not has_named_splits(dataset_path=whole)
    assert not has_named_splits() and has_named_splits("cifar10") and has_named_splits(train_data_dir=tmp_path)  # bundled: one
    run_training(tmp_path / "ok", *HELD_OUT, "--dataset_path", tmp_path / "dict", "--split", "train", "--validation_split",
                 "test", "--max_train_steps", "1", "--checkpointing_steps", "none")  # fmt: skip
    reset_accelerate()
    with pytest.raises(ValueError, match=r"holds 2 images that --split 'train' trains on \(rows 6–7 of train\)"):
        run_training(tmp_path / "bad", *HELD_OUT, "--dataset_path", tmp_path / "dict", "--split", "train",
                     "--validation_split", "train[6:]", "--max_train_steps", "1")  # fmt: skip


@pytest.mark.parametrize(("option", "value", "message"), [
    ("validation_split", "0,05", "--validation_split '0,05' is not a split name or slice (Unrecognized instruction format: "
     "0,05); e.g. train, train[:1000], train[:10%], train+test, or a share or a count of --split's images to hold out "
     "(0.05, 5%, 500); write a share with a point: 0.05."),
    ("validation_split", "train[::2]", "--validation_split 'train[::2]' is not a split name or slice"),
    ("split", "train[:1O0]", "--split 'train[:1O0]' is not a split name or slice (Unrecognized instruction format: "
     "train[:1O0]); e.g. train, train[:1000], train[:10%], train+test."),
])  # fmt: skip
def test_a_split_datasets_cannot_read_is_refused_before_any_work(tmp_path, option, value, message):
    """Refused with the options' other problems, naming the option and the forms it takes, instead
    of datasets' traceback once the data is read; eval_metrics.py's splits alike."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainingConfig(**{option: value}).validate()
    with pytest.raises(ValueError, match=re.escape("--reference_split 'train[:1O0]' is not a split name or slice")):
        EvaluationConfig(model="m", reference_split="train[:1O0]").validate()
    with pytest.raises(ValueError, match=re.escape("--bpd_split '0,05' is not a split name or slice")):
        EvaluationConfig(model="m", bpd_split="0,05").validate()


def test_the_classes_random_images_hold_on_average_and_the_chance_of_fewer():
    assert expected_classes(np.array([5, 5]), 1) == pytest.approx(1.0)
    assert expected_classes(np.array([1, 1, 1, 0]), 2) == pytest.approx(3 * (1 - (2 / 3) ** 2))
    assert expected_classes(np.array([99, 1]), 10) == pytest.approx(1 + 1 - 0.99**10)
    # one class of two in n draws: 2 · 2^-n; the estimate is within its sampling error of 4,000 draws
    for count in (4, 8):
        assert chance_of_so_few_classes(np.array([10, 10]), count, 1) == pytest.approx(2 * 0.5**count, abs=4 * (0.5**count / 4000) ** 0.5)
    assert chance_of_so_few_classes(np.array([3, 3, 3]), 5, 1) == pytest.approx(3 * (1 / 3) ** 5, abs=0.01)
    assert chance_of_so_few_classes(np.array([3, 3, 3]), 5, 3) == 0.5  # all: no fewer than on average
    # where the union bound C(K, h)·(top h shares)^n is below 1e-6 it is returned (exact here: one class of two)
    assert chance_of_so_few_classes(np.array([10, 10]), 30, 1) == pytest.approx(2 * 0.5**30, rel=1e-9)
    assert chance_of_so_few_classes(np.ones(1000), 1_200_000, 1) == 0.0  # a slice of ImageNet's size: no draws


def labelled(labels):
    return datasets.Dataset.from_dict({"label": labels, "x": list(range(len(labels)))},
                                      features=datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog", "owl"]),
                                                                  "x": datasets.Value("int64")}))  # fmt: skip


def test_measured_images_of_few_classes_are_warned_of():
    """Rows sorted by class give a slice of the first or last rows one class: warned of, naming the
    sets; rows in no order, or a set that random images could equally give, are not."""
    ordered = labelled([0] * 20 + [1] * 20 + [2] * 20)
    warning = unbalanced_classes_warning(ordered, {"held-out images (train[48:])": ordered.select(range(48, 60)),
                                                   "training images (the first 12)": ordered.select(range(12))})  # fmt: skip
    assert warning.startswith("the 12 held-out images (train[48:]) hold 1 of the training images' 3 classes ('owl'), where as "
                              "many drawn at random would hold 3.0 on average; the 12 training images (the first 12) hold 1 "
                              "of the training images' 3 classes ('cat')")  # fmt: skip
    assert "class by class (label)" in warning and "--validation_split test" in warning
    mixed = ordered.shuffle(seed=0)
    assert unbalanced_classes_warning(mixed, {"held-out images": mixed.select(range(48, 60))}) is None
    # 4 images of one class: random ones are so 3 times in 81 (3.7%), not rare enough to warn of
    assert unbalanced_classes_warning(ordered, {"held-out images": ordered.select(range(4))}) is None
    assert unbalanced_classes_warning(ordered.remove_columns("label"), {"held-out images": ordered.select(range(5))}) is None
    assert unbalanced_classes_warning(labelled([1] * 30), {"held-out images": labelled([1] * 5)}) is None  # one class
    assert unbalanced_classes_warning(labelled([-1] * 30), {"held-out images": labelled([-1] * 5)}) is None  # no labels


def test_a_slice_of_few_of_the_named_classes_is_warned_of():
    """A slice of a class-sorted source takes its first classes: warned of, naming them; a slice of
    mixed rows, the whole split, or a source without class labels are not."""
    ordered = labelled([0] * 20 + [1] * 20 + [2] * 20)
    warning = sliced_classes_warning(ordered.select(range(12)), "train[:12]", "--split", "Shuffle it.")
    assert warning == ("--split 'train[:12]' holds 1 of the 3 classes that its label column names ('cat'): the source lists "
                       "its images class by class, so a slice of it takes the first (or last) classes alone. Shuffle it.")  # fmt: skip
    assert sliced_classes_warning(ordered.shuffle(seed=0).select(range(12)), "train[:12]", "--split", "") is None
    assert sliced_classes_warning(ordered.select(range(20)), "train", "--split", "") is None  # not a slice: the data as it is
    assert sliced_classes_warning(ordered.select(range(3)), "train[:3]", "--split", "") is None  # one class: 1 in 9 at random
    assert sliced_classes_warning(ordered.remove_columns("label").select(range(12)), "train[:12]", "--split", "") is None


def class_folder(folder, per_class=16):
    """An image folder of three class subfolders (cat, dog, owl) of ``per_class`` random 16×16 images each."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name / f"{index}.png")
    return folder


def test_a_run_holds_out_a_share_drawn_at_random_and_evaluation_measures_the_same_images(tmp_path, caplog):
    """--validation_split 0.25 of an image folder of class subfolders (listed class by class): the
    run holds out 12 images drawn at random, of every class (so nothing is warned of), trains on the
    other 36, records the share as given, and eval_metrics.py measures the same 12 images by default
    (the same bound); the model card says which images. --validation_images 20 measures all 12 and
    as many training images. A resumed run holds out the same images, so its data is the checkpoint's."""
    images = class_folder(tmp_path / "images")
    options = [*HELD_OUT, "--train_data_dir", images, "--split", "train", "--validation_split", "0.25",
               "--validation_images", "20", "--checkpointing_steps", "2"]  # fmt: skip
    with caplog.at_level("INFO"):
        run_training(tmp_path / "run", *options, "--max_train_steps", "2")
    config = TrainingConfig.load(tmp_path / "run" / "training_config.json")
    assert (config.split, config.validation_split, config.validation_rows) == ("train", "0.25", "random")
    assert ("--validation_split 0.25: holds out 12 of the 48 images of --split 'train', drawn at random (--validation_rows "
            "random), and trains on the other 36") in caplog.text  # fmt: skip
    assert "classes" not in caplog.text  # 12 images drawn at random hold all three classes
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["held_out"]["split"] == "0.25 of train at random"
    # --validation_images 20: all 12 held-out images, and as many training images
    assert (summary["held_out"]["num_images"], summary["held_out"]["num_train_images"]) == (12, 12)
    with caplog.at_level("INFO"):
        scored = evaluate(model=str(tmp_path / "run"), metrics="bpd", bpd_num_images=12, bpd_timesteps=3, bpd_batch_size=4,
                          output=str(tmp_path / "r.json"), device="cpu")  # fmt: skip
    assert "bits/dim: on the images" in caplog.text and "the 0.25 of split train drawn at random" in caplog.text
    assert "image folder" in caplog.text and ", with the 0.25 of it held out of training at random" in caplog.text
    bound = scored["metrics"]["bpd"]
    assert (bound["split"], bound["held_out"], bound["num_images"]) == ("train", "0.25", 12)
    assert bound["bits_per_dim"] == pytest.approx(summary["held_out"]["validation_bpd"], rel=1e-6)
    # the same images named by hand: the folder as --reference, and the share
    by_hand = evaluate(model=str(tmp_path / "run"), metrics="bpd", reference=str(images), bpd_held_out="0.25",
                       bpd_num_images=12, bpd_timesteps=3, bpd_batch_size=4, output=str(tmp_path / "h.json"), device="cpu")  # fmt: skip
    assert by_hand["metrics"]["bpd"]["bits_per_dim"] == bound["bits_per_dim"]
    card = str(build_model_card(tmp_path / "run", "me/model", eval_report=tmp_path / "r.json"))
    assert "(the 0.25 of it held out of training at random)" in card and "(0.25 of train at random)" in card
    # resumed: the same 36 training images (the checkpoint's data, no warning) and the same held-out bound's rows
    reset_accelerate()
    caplog.clear()
    with caplog.at_level("INFO"):
        run_training(tmp_path / "run", *options, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert "holds out 12 of the 48 images" in caplog.text and "was trained on" not in caplog.text


def test_a_run_holds_out_the_last_rows_of_its_split_and_records_the_two_splits(tmp_path, caplog):
    """--validation_split 0.25 --validation_rows last of an image folder of class subfolders: the run
    trains on the first three quarters, measures the last quarter, records both splits (so
    eval_metrics.py measures the same images), and warns that the held-out images are of one class;
    the training images measured, spread over the training split, hold all three. A slice of the
    first images is warned of too."""
    class_folder(tmp_path / "images")
    options = [*HELD_OUT, "--train_data_dir", tmp_path / "images", "--split", "train", "--validation_split", "0.25",
               "--validation_rows", "last", "--validation_images", "8", "--max_train_steps", "2"]  # fmt: skip
    with caplog.at_level("INFO"):
        run_training(tmp_path / "run", *options)
    config = TrainingConfig.load(tmp_path / "run" / "training_config.json")
    assert (config.split, config.validation_split) == ("train[:36]", "train[36:]")
    assert "trains on --split 'train[:36]' and holds out --validation_split 'train[36:]'" in caplog.text
    # 8 images of one class, where the training images are 16 cats, 16 dogs and 4 owls: 0.4% of random draws
    assert "the 8 held-out images measured (train[36:]) hold 1 of the training images' 3 classes ('owl')" in caplog.text
    assert "training images measured" not in caplog.text  # 8 spread over the 36 hold all 3 classes
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    scored = evaluate(model=str(tmp_path / "run"), metrics="bpd", bpd_num_images=8, bpd_timesteps=3, bpd_batch_size=4,
                      output=str(tmp_path / "r.json"), device="cpu")  # fmt: skip
    assert scored["metrics"]["bpd"]["split"] == "train[36:]"
    assert scored["metrics"]["bpd"]["bits_per_dim"] == pytest.approx(summary["held_out"]["validation_bpd"], rel=1e-6)
    # a slice of the folder's first images is of its first class: the run says so
    reset_accelerate()
    caplog.clear()
    with caplog.at_level("INFO"):
        run_training(tmp_path / "slice", "--train_data_dir", tmp_path / "images", "--split", "train[:12]", "--train_batch_size", "4",
                     "--max_train_steps", "1", "--save_images_steps", "none")  # fmt: skip
    assert "--split 'train[:12]' holds 1 of the 3 classes that its label column names ('cat')" in caplog.text
    assert "--dataset_path OUT --split 'train[:12]'" in caplog.text
