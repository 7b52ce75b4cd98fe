"""Training's parts on their own: options, checkpoint files, data order, plots."""

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import record_fsyncs
from PIL import Image

from ddpm_pipeline.checkpointing import (
    FILE_SIZES_KEY,
    TRAINER_STATE_NAME,
    UnreadableTrainerState,
    check_checkpoint_intact,
    damaged_files,
    list_checkpoints,
    prune_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    unreadable_file_damage,
    write_checkpoint,
)
from ddpm_pipeline.data import EpochShuffleSampler, TrainingImages, load_image_dataset
from ddpm_pipeline.images import ImageFormat, ImagePreprocessor, ImageSource, inspect_images
from ddpm_pipeline.plots import image_grid, loss_window, moving_average, panel_title, save_loss_curve
from ddpm_pipeline.preflight import check_unet_config
from ddpm_pipeline.training import micro_batch_seed
from ddpm_pipeline.training_config import TrainingConfig
from ddpm_pipeline.unet import DDPMUNet


def test_defaults_are_the_main_job():
    config = TrainingConfig.from_args([])
    assert config == TrainingConfig()
    assert config.model is None and config.dataset_name is None and config.train_data_dir is None
    config, _ = config.with_data_defaults(inspect_images(ImageSource(load_image_dataset(), "image")))
    assert config.model == "ddpm-small-28"
    unet_config = DDPMUNet.preset_config(config.model, **config.unet_overrides_dict())
    assert unet_config["sample_size"] == 28 and unet_config["in_channels"] == 1


def test_command_line_types_none_and_booleans():
    config = TrainingConfig.from_args(
        ["--max_train_steps", "none", "--num_epochs", "3", "--no-use_ema", "--random_flip", "--dropout", "0.1",
         "--block_out_channels", "8", "16", "--channels", "3", "--resolution", "32", "--prediction_type", "mu",
         "--unet_overrides", '{"norm_num_groups": 4}', "--checkpoints_total_limit", "None"]  # fmt: skip
    )
    assert config.max_train_steps is None and config.num_epochs == 3 and config.checkpoints_total_limit is None
    assert config.use_ema is False and config.random_flip is True
    assert config.unet_overrides_dict() == {
        "norm_num_groups": 4, "sample_size": 32, "in_channels": 3, "out_channels": 3,
        "block_out_channels": [8, 16], "dropout": 0.1,
    }  # fmt: skip


def test_options_given_from_python_in_python_s_types():
    """``TrainingConfig(...)`` takes what one writes in Python for what the command line reads as
    text: a number of images to hold out, a dict of UNet options, one signal; and a number given as
    text, where an integer is wanted, is named instead of failing on a comparison."""
    config = TrainingConfig(validation_split=0.05, unet_overrides={"norm_num_groups": 4}, checkpoint_on_signals="SIGTERM")
    assert config.validation_split == "0.05" and config.checkpoint_on_signals == ["SIGTERM"]
    assert config.unet_overrides_dict()["norm_num_groups"] == 4
    assert config == TrainingConfig.from_args(["--validation_split", "0.05", "--unet_overrides", '{"norm_num_groups": 4}',
                                               "--checkpoint_on_signals", "SIGTERM"])  # fmt: skip
    assert TrainingConfig(validation_split=500).validation_split == "500"
    # a Path as its text, numpy's numbers as Python's: the config is saved as JSON
    config = TrainingConfig(output_dir=Path("runs") / "a", train_batch_size=np.int64(8), learning_rate=np.float32(0.5))
    assert config.output_dir == str(Path("runs") / "a") and type(config.train_batch_size) is int
    assert type(config.learning_rate) is float and json.dumps(config.to_dict())
    with pytest.raises(ValueError, match=r"Bad training options:\n  --learning_rate must be a number, got '1e-4'.\n"
                                         r"  --max_train_steps must be an integer, got '100'."):
        TrainingConfig(max_train_steps="100", learning_rate="1e-4")
    with pytest.raises(ValueError, match="--train_batch_size must be an integer, got 8.5"):
        TrainingConfig(train_batch_size=8.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train_batch_size", "0"], "--train_batch_size must be a positive integer, got 0"),
        (["--save_images_steps", "0"], "--save_images_steps must be a positive integer or none, got 0"),
        (["--grid_inference_steps", "2000"], "exceeds --num_train_timesteps"),
        (["--ema_max_decay", "1.0"], "--ema_max_decay < 1"),
        (["--unet_overrides", "{oops"], "not valid JSON"),
        (["--unet_overrides", "no/such/config.json"], "), nor a file: give e.g. '{\"dropout\": 0.1}', or the path of a UNet2DModel"),
        (["--dataset_name", "cifar10", "--train_data_dir", "x"], "Give one data source"),
        (["--prediction_type", "noise"], "invalid choice"),
        (["--loss_weighting", "vlb", "--snr_gamma", "2"], "does not apply to --loss_weighting vlb"),
        (["--snr_gamma", "0"], "--snr_gamma must be positive"),
        (["--num_train_timesteps", "20", "--grid_inference_steps", "10", "--beta_schedule", "linear"],
         "Use num_train_timesteps ≥ 21 with it, or the cosine schedule"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--output_dir", ""], "--output_dir is empty"),
        (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
        (["--adam_weight_decay", "-0.1"], "--adam_weight_decay must be ≥ 0"),
        (["--ema_inv_gamma", "0"], "--ema_inv_gamma must be positive"),
        (["--compile_mode", "fast"], "--compile_mode 'fast' is not one of: default, reduce-overhead"),
        (["--unet_overrides", '{"sample_size": [16, 24, 32]}'], "sample_size must be a positive integer or [height, width]"),
        (["--unet_overrides", '{"block_out_channels": []}'], "block_out_channels must be a list of positive integers"),
    ],
)
def test_bad_options_exit_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        TrainingConfig.from_args(argv)
    assert message in capsys.readouterr().err


def test_min_snr_is_turned_on_by_its_weighting_or_by_snr_gamma_alone(tmp_path):
    assert TrainingConfig().snr_gamma is None
    config = TrainingConfig.from_args(["--loss_weighting", "min_snr"])
    assert (config.loss_weighting, config.snr_gamma) == ("min_snr", 5.0)  # Hang et al.'s γ
    config = TrainingConfig.from_args(["--snr_gamma", "3"])  # diffusers' scripts: the switch itself
    assert (config.loss_weighting, config.snr_gamma) == ("min_snr", 3.0)
    config.save(tmp_path / "c.json")
    assert TrainingConfig.load(tmp_path / "c.json") == config


def test_config_save_load_and_architecture_differences(tmp_path):
    config = TrainingConfig(prediction_type="mu", block_out_channels=[8, 16], learning_rate=1e-4)
    config.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    data["an_option_from_a_newer_version"] = 1
    (tmp_path / "c.json").write_text(json.dumps(data))
    loaded = TrainingConfig.load(tmp_path / "c.json")
    assert loaded == config
    other = TrainingConfig(prediction_type="mu", block_out_channels=[8, 16], learning_rate=3e-4)
    assert loaded.architecture_differences(other) == []  # optimizer settings may change on resume
    assert loaded.architecture_differences(TrainingConfig()) == [
        "block_out_channels: [8, 16] vs None",
        "prediction_type: 'mu' vs 'epsilon'",
    ]


def fake_state(folder):
    (folder / "model.safetensors").write_text("weights")


def test_a_unet_config_file_gives_its_architecture(tmp_path):
    """``--unet_overrides`` may name a diffusers UNet2DModel config.json, or the folder holding it (a
    pipeline's unet/), as diffusers' training example takes --model_config_name_or_path: the run
    builds that network afresh and records the JSON itself, without diffusers' own entries."""
    source = DDPMUNet.from_preset("ddpm-small-32", norm_num_groups=4, attention_head_dim=8)
    source.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    saved = json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())
    assert {"_class_name", "_diffusers_version"} <= set(saved)
    wanted = {name: value for name, value in saved.items() if not name.startswith("_")}
    for given in (tmp_path / "pipe" / "unet", tmp_path / "pipe" / "unet" / "config.json"):
        config = TrainingConfig.from_args(["--unet_overrides", str(given)])
        assert json.loads(config.unet_overrides) == wanted  # the JSON, not the path: the run does not depend on the file
        assert config == TrainingConfig(unet_overrides=given)  # a Path from Python
        fitted, chosen = config.with_data_defaults(ImageFormat(size=28, channels=1, smallest=28, largest=28, inspected=1))
        assert chosen == [] and fitted.network_name() == "UNet2DModel (--unet_overrides)"  # no preset shows in it
        built = DDPMUNet(**DDPMUNet.preset_config(fitted.model, **fitted.unet_overrides_dict()))
        assert {name: value for name, value in built.config.items() if not name.startswith("_")} == {
            name: value for name, value in source.config.items() if not name.startswith("_")}
    assert TrainingConfig(model="ddpm-tiny-16", unet_overrides={"norm_num_groups": 4}).network_name() == "ddpm-tiny-16"
    refusals = {
        tmp_path / "pipe": "is a pipeline folder: give its network's config, ",
        tmp_path: "is a folder without a config.json",
        (tmp_path / "bad.json", "{not json"): "is not a JSON file",
        (tmp_path / "list.json", "[1, 2]"): "holds no JSON object of UNet2DModel options",
        (tmp_path / "sd.json", '{"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}'): (
            "is the config of a UNet2DConditionModel: this package trains diffusers' UNet2DModel"),
    }
    for given, message in refusals.items():
        if isinstance(given, tuple):
            given[0].write_text(given[1])
            given = given[0]
        with pytest.raises(ValueError, match=re.escape(f"--unet_overrides {given} {message}")):
            TrainingConfig(unet_overrides=str(given))


def test_checkpoints_are_atomic_listed_pruned_and_resolved(tmp_path):
    for step in (5, 10, 15):
        write_checkpoint(tmp_path, step, fake_state, {"global_step": step})
    # an interrupted write: a temporary folder, and a checkpoint folder without its state file
    (tmp_path / ".checkpoint-20.tmp").mkdir()
    (tmp_path / "checkpoint-25").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-15"
    assert resolve_checkpoint(tmp_path, None) is None
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None  # first run with "latest": start afresh
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-25"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-99"))
    # a bare name is looked for in the output folder too, as diffusers' training examples take it
    assert resolve_checkpoint(tmp_path, "checkpoint-10") == tmp_path / "checkpoint-10"
    with pytest.raises(FileNotFoundError, match=r"not a folder, here or in --output_dir .* \(which holds checkpoint-5, "
                                                 r"checkpoint-10, checkpoint-15\)"):  # fmt: skip
        resolve_checkpoint(tmp_path, "checkpoint-99")
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-5"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-15"]
    # rewriting a step replaces it whole; no temporary folders are left behind
    write_checkpoint(tmp_path, 15, fake_state, {"global_step": 15, "again": True})
    assert json.loads((tmp_path / "checkpoint-15" / TRAINER_STATE_NAME).read_text())["again"] is True
    assert not list(tmp_path.glob(".checkpoint-1*"))


def test_a_checkpoint_records_its_file_sizes_and_a_damaged_one_is_named(tmp_path):
    def two_files(folder):
        (folder / "model.safetensors").write_bytes(b"w" * 4096)
        (folder / "sub").mkdir()
        (folder / "sub" / "optimizer.bin").write_bytes(b"o" * 100)

    for step in (5, 10):
        write_checkpoint(tmp_path, step, two_files, {"global_step": step})
    latest = tmp_path / "checkpoint-10"
    recorded = json.loads((latest / TRAINER_STATE_NAME).read_text())[FILE_SIZES_KEY]
    assert recorded == {"model.safetensors": 4096, "sub/optimizer.bin": 100}
    assert damaged_files(latest) == []
    check_checkpoint_intact(latest, tmp_path)
    (latest / "model.safetensors").write_bytes(b"w" * 2048)  # a copy cut short
    (latest / "sub" / "optimizer.bin").unlink()
    assert damaged_files(latest) == [
        "model.safetensors has 2,048 bytes, not the 4,096 it was written with",
        "sub/optimizer.bin is missing",
    ]
    with pytest.raises(ValueError) as refused:
        check_checkpoint_intact(latest, tmp_path)
    assert str(refused.value) == (
        f"Checkpoint {latest} is damaged (model.safetensors has 2,048 bytes, not the 4,096 it was written with; "
        "sub/optimizer.bin is missing): a copy cut short, a full disk or a disk error. Resume from the checkpoint before it, --resume_from_checkpoint "
        "checkpoint-5 --overwrite_output_dir (which deletes what the run wrote after step 5, this checkpoint with it), "
        "or restore the folder from a copy."
    )
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint {re.escape(str(tmp_path / 'checkpoint-5'))}, or "):
        check_checkpoint_intact(latest, tmp_path / "branch")  # a branch into another folder: its path, nothing to delete
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="No earlier checkpoint is there: restore the folder from a copy, or start again"):
        check_checkpoint_intact(tmp_path / "checkpoint-5", tmp_path)
    # a checkpoint of an earlier version records no sizes: nothing to compare
    state = json.loads((latest / TRAINER_STATE_NAME).read_text())
    del state[FILE_SIZES_KEY]
    (latest / TRAINER_STATE_NAME).write_text(json.dumps(state))
    assert damaged_files(latest) == []
    # its trainer_state.json emptied (a power cut before its data reached the disk), cut short, or not an object
    text = (latest / TRAINER_STATE_NAME).read_text()
    for content, damage in [("", "trainer_state.json is empty"),
                            (text[: len(text) // 2], "trainer_state.json is not valid JSON ("),
                            ("[1, 2]", "trainer_state.json holds a JSON list, not an object")]:  # fmt: skip
        (latest / TRAINER_STATE_NAME).write_text(content)
        with pytest.raises(UnreadableTrainerState, match=re.escape(f"Checkpoint {latest} is damaged ({damage}")):
            read_trainer_state(latest)
        assert len(damaged_files(latest)) == 1 and damaged_files(latest)[0].startswith(damage)
        with pytest.raises(ValueError, match=re.escape(f"({damage}") + ".* --resume_from_checkpoint checkpoint-5 "):
            check_checkpoint_intact(latest, tmp_path)


def test_a_checkpoint_is_on_the_disk_before_it_is_named(tmp_path, monkeypatch):
    """Every file of the checkpoint is fsynced under its temporary name, then the folder holding the
    renamed checkpoint: a power cut cannot leave checkpoint-N with files of zeros or of no bytes."""
    synced = record_fsyncs(monkeypatch)
    write_checkpoint(tmp_path, 5, fake_state, {"global_step": 5})
    temporary = tmp_path / ".checkpoint-5.tmp"
    written = {path.relative_to(tmp_path / "checkpoint-5") for path in (tmp_path / "checkpoint-5").rglob("*") if path.is_file()}
    assert {Path(path).relative_to(temporary) for path in synced if path.startswith(f"{temporary}/")} >= written
    assert TRAINER_STATE_NAME in {Path(path).name for path in synced}
    assert synced.index(str(temporary)) < synced.index(str(tmp_path)) == len(synced) - 1  # the rename, synced last


def test_a_flush_that_fails_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A file system that allocates on write-back reports a full disk at fsync: the checkpoint is not
    named, its partial copy is removed, and the error names the last complete one."""
    write_checkpoint(tmp_path, 5, fake_state, {"global_step": 5})

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=re.escape(f"The last complete checkpoint is {tmp_path / 'checkpoint-5'}")) as failed:
        write_checkpoint(tmp_path, 10, fake_state, {"global_step": 10})
    assert failed.value.errno == errno.ENOSPC
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint-5"]


def test_read_errors_of_damaged_files_are_told_from_other_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.ones(64)}, tmp_path / "model.safetensors")
    torch.save({"step": torch.ones(64)}, tmp_path / "optimizer.bin")
    for path in (tmp_path / "model.safetensors", tmp_path / "optimizer.bin"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception) as safetensors_error:
        load_file(tmp_path / "model.safetensors")
    assert unreadable_file_damage(safetensors_error.value).startswith("SafetensorError: ")
    with pytest.raises(RuntimeError) as torch_error:
        torch.load(tmp_path / "optimizer.bin", weights_only=True)
    assert unreadable_file_damage(torch_error.value) == (
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory"
    )
    assert unreadable_file_damage(EOFError("Ran out of input")) == "EOFError: Ran out of input"
    assert unreadable_file_damage(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) is None
    assert unreadable_file_damage(ValueError("other")) is None


def test_a_failed_save_leaves_no_checkpoint(tmp_path):
    def failing(folder):
        fake_state(folder)
        raise OSError("disk full")

    write_checkpoint(tmp_path, 5, fake_state, {"global_step": 5})
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 10, failing, {"global_step": 10})
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-5"


def test_epoch_order_depends_only_on_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    again = EpochShuffleSampler(50, seed=3)
    again.set_epoch(1)
    assert sorted(first) == list(range(50)) and first != second and list(again) == second
    assert micro_batch_seed(0, 1, 2) == micro_batch_seed(0, 1, 2) != micro_batch_seed(0, 1, 3) != micro_batch_seed(0, 2, 2)


def test_training_images_from_each_source(tmp_path):
    bundled = TrainingImages(load_image_dataset(), "image", ImagePreprocessor(28, channels=1))
    assert len(bundled) == 10_000
    item = bundled[0]
    assert item.shape == (1, 28, 28) and item.min() >= -1 and item.max() <= 1
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(folder / "red.png")
    Image.new("L", (10, 10), 255).save(folder / "white.png")
    images = load_image_dataset(train_data_dir=folder)
    rgb = TrainingImages(images, "image", ImagePreprocessor(16, channels=3, resize_mode="crop"))
    gray = TrainingImages(images, "image", ImagePreprocessor(16, channels=1, resize_mode="crop"))
    by_color = sorted((rgb[i] for i in range(2)), key=lambda t: t[1].mean().item())
    assert by_color[0].shape == (3, 16, 16)
    assert torch.allclose(by_color[0][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))  # red stays red
    assert torch.allclose(by_color[1], torch.ones(3, 16, 16))  # white gray → white RGB
    assert {round(gray[i].mean().item(), 2) for i in range(2)} == {1.0, round(0.299 * 255 / 127.5 - 1, 2)}
    labels_only = datasets.Dataset.from_dict({"image": [1, 2]})
    with pytest.raises(TypeError, match="not images"):
        TrainingImages(labels_only, "image", ImagePreprocessor(16))[0]


def test_image_grid_and_loss_curve(tmp_path):
    images = np.linspace(0, 1, 5 * 4 * 3 * 1).reshape(5, 4, 3, 1)
    grid = image_grid(images, padding=1, scale=1)
    assert grid.size == (3 * (3 + 1) + 1, 2 * (4 + 1) + 1) and grid.mode == "L"  # 3 columns, 2 rows
    assert np.asarray(grid)[0].tolist() == [255] * grid.width  # padding is white
    rgb = image_grid(np.zeros((4, 2, 2, 3)), scale=3)
    assert rgb.mode == "RGB" and rgb.size == ((2 * 4 + 2) * 3,) * 2
    with pytest.raises(ValueError, match="image_grid takes"):
        image_grid(np.zeros((2, 4, 4)))
    np.testing.assert_allclose(moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    assert [loss_window(n) for n in (3, 20, 100, 800, 10_000)] == [1, 4, 10, 16, 200]  # short runs smoothed too
    path = save_loss_curve(list(range(1, 101)), list(np.exp(-np.arange(100) / 30)), tmp_path / "curve.png")
    assert Image.open(path).size == (840, 480)


def test_a_long_panel_title_is_broken_into_lines_that_fit_the_panel():
    """A fine-tuned Hub model's name made the held-out curve's title run off both sides of its 7-inch
    figure; broken into lines, every line lies inside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = "google/ddpm-celebahq-256 (fine-tuned): the EMA network's bound (20 timesteps per image)"
    assert panel_title("training loss") == "training loss"
    assert panel_title(title).replace("\n", " ") == title and max(map(len, panel_title(title).split("\n"))) <= 70
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for text, fits in [(title, False), (panel_title(title), True)]:
        box = axis.set_title(text).get_window_extent(figure.canvas.get_renderer())
        assert (box.x0 >= 0 and box.x1 <= figure.bbox.width) == fits
    plt.close(figure)


def test_inspecting_images_reads_their_size_and_colour_from_headers(tmp_path):
    bundled = inspect_images(ImageSource(load_image_dataset(), "image"))
    assert (bundled.size, bundled.channels, bundled.inspected) == (28, 1, 64)
    assert bundled.describe() == "grayscale, 28px (64 images inspected)"
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, (mode, size) in enumerate([("L", (40, 30)), ("LA", (64, 64)), ("I;16", (50, 90)), ("L", (20, 20))]):
        Image.new(mode, size).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    gray = inspect_images(ImageSource(load_image_dataset(train_data_dir=folder), "image"))
    assert (gray.size, gray.channels, gray.smallest, gray.largest, gray.inspected) == (30, 1, 20, 64, 4)  # median of 20, 30, 50, 64
    assert gray.describe() == "grayscale, shorter sides 20–64px, median 30 (4 images inspected)"
    assert gray.sizes == ((40, 30), (64, 64), (50, 90), (20, 20))
    assert (gray.too_big_to_pad(64), gray.too_big_to_pad(90), gray.too_big_to_pad((90, 50)), gray.too_big_to_pad((64, 64))) == (1, 0, 1, 1)
    Image.new("P", (40, 40)).save(folder / "palette.png")  # one image with colour makes the data RGB
    assert inspect_images(ImageSource(load_image_dataset(train_data_dir=folder), "image")).channels == 3
    with pytest.raises(ValueError, match="None of the 1 images inspected can be read"):
        inspect_images(ImageSource(datasets.Dataset.from_dict({"image": [str(folder / "broken.png")]}).cast_column("image", datasets.Image()), "image"))


FOUR_LEVELS = json.dumps({"down_block_types": ["DownBlock2D"] * 4, "up_block_types": ["UpBlock2D"] * 4})


@pytest.mark.parametrize(
    ("options", "size", "channels", "chosen"),
    [
        ([], 28, 1, {"model": "ddpm-small-28", "resolution": 28, "channels": 1}),  # the main job
        ([], 30, 3, {"model": "ddpm-cifar10-32", "resolution": 32, "channels": 3}),  # padded to a multiple of 8
        ([], 64, 3, {"model": "ddpm-64", "resolution": 64, "channels": 3}),
        ([], 100, 3, {"model": "ddpm-128", "resolution": 96, "channels": 3}),  # a size its 16x down-sampling divides
        ([], 1024, 3, {"model": "ddpm-celebahq-256", "resolution": 256, "channels": 3}),  # at most 256
        (["--model", "ddpm-cifar10-32"], 28, 1, {"resolution": 32, "channels": 1}),  # the preset's size
        (["--resolution", "48"], 256, 1, {"model": "ddpm-64", "channels": 1}),
        (["--channels", "3", "--model", "ddpm-small-28", "--resolution", "16"], 64, 1, {}),
        (["--unet_overrides", '{"in_channels": 3, "out_channels": 3}'], 20, 1, {"model": "ddpm-small-28", "resolution": 20}),
        (["--block_out_channels", "32", "32", "64", "64", "--unet_overrides", FOUR_LEVELS], 28, 1,
         {"model": "ddpm-small-28", "resolution": 32, "channels": 1}),  # 8x down-sampling: 28 padded to 32
        (["--unet_overrides", '{"sample_size": [32, 64]}'], 28, 1, {"model": "ddpm-64", "channels": 1}),  # by its larger side
    ],
)
def test_a_new_network_takes_what_its_options_leave_open_from_the_data(options, size, channels, chosen):
    config = TrainingConfig.from_args(options)
    image_format = ImageFormat(size=size, channels=channels, smallest=size, largest=size, inspected=8)
    resolved, described = config.with_data_defaults(image_format)
    assert {name: getattr(resolved, name) for name in chosen} == chosen
    assert sorted(described) == sorted(f"--{name} {value}" for name, value in chosen.items())
    assert resolved == dataclasses.replace(config, **chosen)
    unet_config = DDPMUNet.preset_config(resolved.model, **resolved.unet_overrides_dict())
    check_unet_config(unet_config)
    fine_tuning = TrainingConfig.from_args(["--pretrained_model_name_or_path", "some/ddpm"])
    assert fine_tuning.with_data_defaults(image_format) == (fine_tuning, [])


def test_channel_counts_for_another_number_of_levels_are_refused_naming_the_blocks():
    """--block_out_channels 32 with a 3-level preset: refused with the levels, the blocks and a fix,
    instead of the error from inside diffusers' UNet2DModel."""
    unet_config = DDPMUNet.preset_config("ddpm-small-28", block_out_channels=[32])
    with pytest.raises(ValueError, match=re.escape(
        "block_out_channels [32] gives 1 level(s), but the network has 3 down blocks (DownBlock2D, DownBlock2D, "
        "DownBlock2D) and 3 up blocks: give one channel count per level (--block_out_channels 32 32 32)"
    )):  # fmt: skip
        check_unet_config(unet_config)
    blocks = {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]}
    check_unet_config(DDPMUNet.preset_config("ddpm-small-28", block_out_channels=[32], **blocks))  # blocks to match


def test_runs_recorded_before_data_defaults_still_resume():
    # an earlier version left resolution and channels unset, meaning the preset's
    before = TrainingConfig.from_dict({"model": "ddpm-small-28", "resolution": None, "channels": None})
    now, _ = TrainingConfig().with_data_defaults(ImageFormat(28, 1, 28, 28, 64))
    assert before.architecture_differences(now) == []
    rgb, _ = TrainingConfig().with_data_defaults(ImageFormat(28, 3, 28, 28, 64))
    assert before.architecture_differences(rgb) == ["channels: 1 vs 3"]


@pytest.mark.parametrize("module", ["training", "evaluation", "push", "convert", "inception_weights"])
def test_every_command_line_prints_its_help(module, capsys):
    """``--help`` is the first thing a user runs; argparse %-formats help texts, so a bare ``%`` in one
    (``train[:10%]``) used to crash train_ddpm.py's with a ValueError."""
    import importlib

    main = importlib.import_module(f"ddpm_pipeline.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage:")
    if module == "training":
        from ddpm_pipeline.training_config import TrainingConfig

        assert all(f"--{field.name}" in printed for field in dataclasses.fields(TrainingConfig))
        assert "train[:10%]" in printed
