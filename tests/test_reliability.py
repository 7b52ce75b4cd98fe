"""Long runs survive bad luck: NaN losses, full disks, bad files, killed processes."""

import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import record_fsyncs, reset_accelerate, run_to_success, two_process_launch
from PIL import Image
from safetensors.torch import load_file

import ddpm_pipeline.atomic as atomic_module
import ddpm_pipeline.training as training_module
from ddpm_pipeline import evaluate, preflight
from ddpm_pipeline.checkpointing import (
    FILE_SIZES_KEY,
    TRAINER_STATE_NAME,
    list_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
)
from ddpm_pipeline.data import TrainingImages, load_image_dataset
from ddpm_pipeline.images import (
    BadImageError,
    ImageFormat,
    ImagePreprocessor,
    ImageSource,
    check_padding,
    inspect_images,
)
from ddpm_pipeline.training import QUICK_CPU_EVALUATION, TIMESTEP_SAMPLER_STATE_NAME, main
from ddpm_pipeline.training_config import TrainingConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TINY = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "2", "--num_grid_images", "4",
        "--report_to", "none", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--save_images_steps", "none"]  # fmt: skip



@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The loss of the third optimizer step (third call) is NaN, as after an overflow."""
    original = training_module.diffusion_loss_terms
    calls = {"n": 0}

    def loss_with_a_nan(*args, **kwargs):
        calls["n"] += 1
        terms = original(*args, **kwargs)
        return terms._replace(loss=terms.loss * math.nan) if calls["n"] == 3 else terms

    monkeypatch.setattr(training_module, "diffusion_loss_terms", loss_with_a_nan)


def test_nan_loss_stops_the_run_and_saves_nothing_from_it(tmp_path, nan_at_step_3):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="NaN/inf at step 3") as error:
        main([*TINY, "--max_train_steps", "8", "--checkpointing_steps", "2", "--log_every", "2", "--output_dir", str(out)])
    assert "checkpoint-2" in str(error.value) and "--resume_from_checkpoint latest" in str(error.value)
    # detected at the read-back after step 4, before that step's checkpoint: only step 2's exists
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model_index.json").exists()  # no pipeline written from NaN weights


def test_nan_loss_skip_mode_skips_that_update_on_the_device(tmp_path, nan_at_step_3):
    out = tmp_path / "run"
    result = main([*TINY, "--max_train_steps", "5", "--nonfinite_loss", "skip", "--log_every", "5",
                   "--output_dir", str(out)])  # fmt: skip
    assert result.global_step == 5 and np.isfinite(result.final_loss)
    weights = load_file(str(out / "checkpoint-5" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    optimizer = torch.load(out / "checkpoint-5" / "optimizer.bin", weights_only=False)
    steps = {float(state["step"]) for state in optimizer["state"].values()}
    assert steps == {4.0}  # five steps, one of them skipped by the fused kernel
    rows = (out / "loss_history.csv").read_text().splitlines()[1:]
    assert rows[2].split(",")[1] == "nan" and len(rows) == 5


def test_too_many_skipped_steps_stop_the_run(tmp_path, monkeypatch):
    original = training_module.diffusion_loss_terms

    def nan_loss(*args, **kwargs):
        terms = original(*args, **kwargs)
        return terms._replace(loss=terms.loss * math.nan)

    monkeypatch.setattr(training_module, "diffusion_loss_terms", nan_loss)
    with pytest.raises(FloatingPointError, match="more than --max_skipped_steps 2"):
        main([*TINY, "--max_train_steps", "6", "--nonfinite_loss", "skip", "--max_skipped_steps", "2",
              "--log_every", "1", "--output_dir", str(tmp_path / "run")])  # fmt: skip


def messy_folder(folder):
    """Good images in several modes and sizes, and every kind of bad file."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"good{i}.png")
    Image.new("RGBA", (12, 12), (255, 255, 255, 0)).save(folder / "transparent.png")  # fully transparent white
    Image.new("P", (12, 12), 3).save(folder / "palette.png")
    Image.new("L", (1, 1), 255).save(folder / "tiny.png")
    Image.new("RGB", (1500, 1000), (0, 0, 255)).save(folder / "huge.jpg")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image: the imagefolder builder leaves it out")
    return folder


def test_bad_files_are_named_skipped_and_counted(tmp_path):
    images = TrainingImages(load_image_dataset(train_data_dir=messy_folder(tmp_path / "imgs")), "image",
                            ImagePreprocessor(16, channels=1))  # fmt: skip
    assert len(images) == 14  # 11 images + 3 bad files, no .txt
    items = [images[i] for i in range(len(images))]
    assert all(item.shape == (1, 16, 16) and torch.isfinite(item).all() for item in items)
    skipped_names = sorted(Path(images.source.name(i)).name for i in images.skipped)
    assert skipped_names == ["corrupt.png", "truncated.png", "zero_bytes.png"]
    by_name = {Path(images.source.name(i)).name: images.load(i) for i in range(len(images)) if i not in images.skipped}
    assert torch.equal(by_name["transparent.png"], -torch.ones(1, 16, 16))  # transparent → black, like the padding
    assert by_name["sixteen_bit.png"].max() == 1.0  # 65535 → white, not clipped garbage
    assert by_name["tiny.png"][0, 7, 7] == 1.0 and by_name["tiny.png"][0, 0, 0] == -1.0  # padded to 16
    assert by_name["huge.jpg"].shape == (1, 16, 16)  # resized and cropped


def test_camera_photos_train_upright_by_their_exif_orientation(tmp_path):
    """A phone stores a portrait photo as landscape pixels with an EXIF orientation; photo viewers and
    `datasets`' own decoding turn it upright, and so must training. The reference for each of the eight
    orientations is Pillow's own ``ImageOps.exif_transpose``."""
    from PIL import ImageOps

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = np.zeros((8, 16), dtype=np.uint8)  # stored 16 wide, 8 tall, bright in one corner only
    pixels[:2, :3] = 255
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels, "L").save(folder / f"o{orientation}.png", exif=exif.tobytes())
    truncated = exif.tobytes()[:12]  # Pillow cannot parse it (a struct error)
    Image.fromarray(pixels, "L").save(folder / "malformed.png", exif=truncated)
    source = ImageSource(load_image_dataset(train_data_dir=folder), "image")
    by_name = {Path(source.name(i)).name: i for i in range(len(source))}
    for orientation in range(1, 9):
        index = by_name[f"o{orientation}.png"]
        with Image.open(folder / f"o{orientation}.png") as stored:
            expected = np.asarray(ImageOps.exif_transpose(stored))
        assert np.array_equal(np.asarray(source.open(index)), expected), orientation
        assert expected.shape == ((16, 8) if orientation >= 5 else (8, 16))
    assert np.array_equal(np.asarray(source.open(by_name["malformed.png"])), pixels)  # read as stored, not refused
    # Preprocessing sees the upright picture: o6 (a quarter turn) puts the bright corner top right.
    images = TrainingImages(load_image_dataset(train_data_dir=folder), "image", ImagePreprocessor((16, 8), channels=1, resize_mode="pad"))
    turned = images.load(by_name["o6.png"])
    assert turned.shape == (1, 16, 8) and turned[0, 0, -1] == 1.0 and turned[0, -1, 0] == -1.0
    # The size check before training reads the upright sizes too: on a portrait canvas 16 tall and
    # 8 wide, the four turned a quarter fit and the others (malformed included: read as stored) do not.
    image_format = inspect_images(source)
    assert sorted(image_format.sizes).count((8, 16)) == 4
    assert image_format.too_big_to_pad((16, 8)) == 5


def test_inspecting_images_reads_headers_and_decodes_no_pixels(tmp_path, monkeypatch):
    """Pillow's ``getexif`` decodes a PNG to look for EXIF after its pixels; the orientation check of
    the inspection must not, or 64 large photos take seconds instead of milliseconds."""
    from PIL import ImageFile

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 30)).save(folder / "plain.png")
    Image.new("RGB", (40, 30)).save(folder / "plain.jpg")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.format))
    image_format = inspect_images(ImageSource(load_image_dataset(train_data_dir=folder), "image"))
    assert image_format.sizes == ((40, 30), (40, 30)) and decoded == []


def test_bad_files_fail_when_asked_naming_the_file(tmp_path):
    folder = messy_folder(tmp_path / "imgs")
    images = TrainingImages(load_image_dataset(train_data_dir=folder), "image", ImagePreprocessor(16), bad_images="fail")
    with pytest.raises(BadImageError, match=r"corrupt\.png cannot be used.*--bad_images skip"):
        for i in range(len(images)):
            images[i]


def test_training_on_a_messy_folder_does_not_crash(tmp_path, caplog):
    out = tmp_path / "run"
    result = main([*TINY, "--train_data_dir", str(messy_folder(tmp_path / "imgs")), "--max_train_steps", "8",
                   "--output_dir", str(out)])  # fmt: skip
    assert result.global_step == 8 and np.isfinite(result.final_loss)
    assert "bad image(s) were skipped" in caplog.text


def test_padding_images_larger_than_the_canvas_is_refused_or_warned_before_any_work(tmp_path, caplog):
    """--resize_mode pad never shrinks an image: data none of whose images fit is refused up front, with
    the fix (before: every image was skipped as bad, then "no image can be read" came at the first batch)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index in range(4):
        Image.new("L", (20, 18)).save(folder / f"big{index}.png")
    with pytest.raises(ValueError, match=r"pad: all 4 images inspected are larger than the 16×16 canvas \(up to 20px\)"
                                         r".*--resize_mode auto.*--resolution of at least 20"):  # fmt: skip
        main([*TINY, "--train_data_dir", str(folder), "--resize_mode", "pad", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoint-1").exists()
    for index in range(4):
        Image.new("L", (12, 16)).save(folder / f"small{index}.png")
    reset_accelerate()
    result = main([*TINY, "--train_data_dir", str(folder), "--resize_mode", "pad", "--max_train_steps", "2",
                   "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert result.global_step == 2
    assert "--resize_mode pad: 4 of the 8 images inspected are larger than the 16×16 canvas (up to 20px)" in caplog.text
    assert "they will be skipped as bad images" in caplog.text


def test_the_padding_check_on_a_non_square_canvas(caplog):
    image_format = ImageFormat(size=16, channels=1, smallest=10, largest=16, inspected=2, sizes=((30, 16), (40, 10)))
    check_padding(image_format, (16, 32), "auto")  # only padding cannot shrink
    assert not caplog.text
    check_padding(image_format, (16, 32), "pad")
    assert "1 of the 2 images inspected are larger than the 32×16 canvas (up to 40px)" in caplog.text
    assert "--resolution" not in caplog.text  # one size would make the canvas square
    with pytest.raises(ValueError, match=r"all 2 images inspected are larger than the 32×8 canvas.*auto.*or crop\.$"):
        check_padding(image_format, (8, 32), "pad")


def test_a_data_set_with_no_usable_image_names_the_last_problem(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index in range(3):
        Image.new("L", (20, 20)).save(folder / f"{index}.png")
    images = TrainingImages(load_image_dataset(train_data_dir=folder), "image", ImagePreprocessor(16, resize_mode="pad"))
    with pytest.raises(ValueError, match=r"None of the 3 images of the data set can be used.*Cannot pad a 20x20 image"):
        images[0]


def test_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_dataset(train_data_dir=tmp_path / "empty")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--resolution", "29"], "not divisible by 2"),
        (["--unet_overrides", '{"out_channels": 3}'], "in_channels 1 and out_channels 3, but with variance_type fixed_small"),
        (["--block_out_channels", "12", "24"], "not divisible by norm_num_groups 8"),
        (["--unet_overrides", '{"attention_head_dim": "x"}'],
         r'The UNet cannot be built with --unet_overrides \{"attention_head_dim": "x"\} \(TypeError: '),  # diffusers' error, named
    ],
)
def test_bad_network_options_fail_before_any_work(tmp_path, options, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        main([*TINY, *options, "--max_train_steps", "2", "--output_dir", str(out)])
    assert not list_checkpoints(out) and not (out / "training_config.json").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("prediction_type", "noise"), ("beta_schedule", "quadratic"), ("bad_images", "ignore")]
)
def test_unknown_target_or_schedule_is_refused_from_python_and_the_command_line(field, value, capsys):
    with pytest.raises(ValueError, match=f"--{field} '{value}' is not one of|Unknown prediction_type"):
        TrainingConfig(**{field: value})
    with pytest.raises(SystemExit):
        TrainingConfig.from_args([f"--{field}", value])
    assert "invalid choice" in capsys.readouterr().err


def test_diffusers_example_spellings_get_this_scripts_equivalents(capsys):
    # the command line of diffusers' unconditional example, as its README gives it
    theirs = ["--dataset_name=huggan/flowers-102-categories", "--resolution=64", "--center_crop", "--random_flip",
              "--output_dir=ddpm-ema-flowers-64", "--train_batch_size=16", "--num_epochs=100", "--use_ema",
              "--learning_rate=1e-4", "--lr_warmup_steps=500", "--mixed_precision=no", "--ddpm_num_steps", "1000",
              "--ddpm_beta_schedule=squaredcos_cap_v2", "--prediction_type", "sample", "--logger=tensorboard"]  # fmt: skip
    with pytest.raises(SystemExit):
        TrainingConfig.from_args(theirs)
    error = capsys.readouterr().err
    for hint in ["--center_crop → --resize_mode crop", "--ddpm_num_steps → --num_train_timesteps",
                 "--ddpm_beta_schedule → --beta_schedule linear or cosine", "--prediction_type sample → --prediction_type x0",
                 "--logger → --report_to"]:  # fmt: skip
        assert hint in error
    ours = [*theirs[:2], "--resize_mode", "crop", *theirs[3:11], "--num_train_timesteps", "1000", "--beta_schedule",
            "cosine", "--prediction_type", "x0", "--report_to", "tensorboard", "--max_train_steps", "none"]  # fmt: skip
    config = TrainingConfig.from_args(ours)
    assert (config.resize_mode, config.resolution, config.beta_schedule, config.prediction_type) == ("crop", 64, "cosine", "x0")


def test_an_output_dir_that_cannot_be_a_folder_fails_at_start_up(tmp_path):
    """A file where the folder (or one it would be in) should be is named as such, not as a
    permission problem."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(FileExistsError, match=re.escape(f"--output_dir {blocker / 'run'} is not a folder ({blocker}, a folder "
                                                        "it would be in, is a file)")):  # fmt: skip
        main([*TINY, "--max_train_steps", "2", "--output_dir", str(blocker / "run")])
    with pytest.raises(FileExistsError, match=re.escape(f"--output_dir {blocker} is not a folder: name a folder")):
        main([*TINY, "--max_train_steps", "2", "--output_dir", str(blocker)])


def test_full_disk_fails_at_start_up(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError, match="MiB free, but this run's checkpoints and pipeline need about"):
        main([*TINY, "--max_train_steps", "2", "--output_dir", str(tmp_path / "run")])
    assert preflight.run_output_bytes(1_000_000, 2) == 3 * 16_000_000 + 4_000_000 + preflight.OUTPUT_SLACK_BYTES
    assert preflight.run_output_bytes(1_000_000, 2, snapshots=3) == preflight.run_output_bytes(1_000_000, 2) + 12_000_000


def test_incomplete_or_mismatched_pipeline_folders_are_named(tmp_path):
    out = tmp_path / "run"
    main([*TINY, "--max_train_steps", "1", "--output_dir", str(out)])
    preflight.check_pipeline_folder(out)  # complete
    (out / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing unet/diffusion_pytorch_model.safetensors"):
        preflight.check_pipeline_folder(out)
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate(model=str(out), metrics="bpd", output=str(tmp_path / "r.json"))
    shutil.rmtree(out / "scheduler")
    with pytest.raises(FileNotFoundError, match="scheduler/scheduler_config.json"):
        preflight.check_pipeline_folder(out)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        preflight.check_pipeline_folder(tmp_path / "nowhere")


def test_disk_full_during_a_checkpoint_frees_the_partial_copy_and_names_the_last_good_one(tmp_path, monkeypatch):
    """The disk fills up while checkpoint-4 is written (after the start-up check passed): the
    partial folder is deleted, the error names checkpoint-2, and the run resumes from it."""
    original = training_module.write_checkpoint

    def write_until_the_disk_is_full(output_dir, step, save_state, **kwargs):
        def save_state_on_a_full_disk(folder):
            save_state(folder)
            if step == 4:
                raise OSError(errno.ENOSPC, "No space left on device")

        return original(output_dir, step, save_state_on_a_full_disk, **kwargs)

    monkeypatch.setattr(training_module, "write_checkpoint", write_until_the_disk_is_full)
    options = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "2", "--output_dir", str(tmp_path)]
    with pytest.raises(OSError, match="Could not write checkpoint-4") as failure:
        main(options)
    assert failure.value.errno == errno.ENOSPC
    assert "No space left on device" in str(failure.value)
    assert f"The last complete checkpoint is {tmp_path / 'checkpoint-2'}" in str(failure.value)
    assert not (tmp_path / ".checkpoint-4.tmp").exists()  # the space the partial copy took is free again
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    monkeypatch.undo()
    reset_accelerate()
    assert main([*options, "--resume_from_checkpoint", "latest"]).global_step == 6


def test_a_damaged_checkpoint_is_refused_before_resuming_naming_the_file_and_the_one_before(tmp_path):
    """A checkpoint cut short after it was written (a copy, a disk error): its random states, which
    Accelerate would skip without a word (the run then resumes without them), and its weights in a
    checkpoint of an earlier version, which records no file sizes and fails inside safetensors."""
    options = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "2", "--output_dir", str(tmp_path)]
    assert main([*options, "--max_train_steps", "4"]).global_step == 4
    latest = tmp_path / "checkpoint-4"
    states = latest / "random_states_0.pkl"
    states.write_bytes(states.read_bytes()[:100])
    reset_accelerate()
    damaged = re.escape(f"Checkpoint {latest} is damaged (random_states_0.pkl has 100 bytes, not the ")
    with pytest.raises(ValueError, match=damaged) as refused:
        main([*options, "--resume_from_checkpoint", "latest"])
    assert "--resume_from_checkpoint checkpoint-2 --overwrite_output_dir" in str(refused.value)
    assert (tmp_path / "model_index.json").is_file()  # refused before anything was deleted
    # its trainer_state.json emptied (a power cut before the data of a checkpoint unsynced reached the disk)
    state_text = (latest / TRAINER_STATE_NAME).read_text()
    (latest / TRAINER_STATE_NAME).write_text("")
    reset_accelerate()
    with pytest.raises(ValueError, match=re.escape(f"Checkpoint {latest} is damaged (trainer_state.json is empty)")) as refused:
        main([*options, "--resume_from_checkpoint", "latest"])
    assert "--resume_from_checkpoint checkpoint-2 --overwrite_output_dir" in str(refused.value)
    (latest / TRAINER_STATE_NAME).write_text(state_text)
    # an earlier version's checkpoint: no sizes recorded, and its weights cut short
    state = read_trainer_state(latest)
    del state[FILE_SIZES_KEY]
    (latest / TRAINER_STATE_NAME).write_text(json.dumps(state))
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    reset_accelerate()
    with pytest.raises(ValueError, match=re.escape(f"Checkpoint {latest} is damaged (SafetensorError: ")):
        main([*options, "--resume_from_checkpoint", "latest"])
    reset_accelerate()  # the advice works: the run goes on from checkpoint-2
    resumed = main([*options, "--resume_from_checkpoint", "checkpoint-2", "--overwrite_output_dir"])
    assert resumed.global_step == 6 and [path.name for path in list_checkpoints(tmp_path)][-1] == "checkpoint-6"


def test_out_of_device_memory_says_how_to_fit_the_same_step(tmp_path, monkeypatch):
    original, calls = training_module.Trainer.training_step, {"n": 0}

    def step_until_memory_runs_out(self, images, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images, seed)

    monkeypatch.setattr(training_module.Trainer, "training_step", step_until_memory_runs_out)
    with pytest.raises(torch.OutOfMemoryError) as failure:
        main([*TINY, "--max_train_steps", "6", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "1",
              "--output_dir", str(tmp_path)])  # fmt: skip
    message = str(failure.value)
    assert "Out of device memory in training step 3 (ddpm-tiny-16, 16² images, --train_batch_size 4)" in message
    assert "--train_batch_size 2 --gradient_accumulation_steps 2 (the same 4 images per optimizer step" in message
    assert f"The last checkpoint is {tmp_path / 'checkpoint-2'}" in message and "Tried to allocate 2.00 GiB" in message
    assert "or --gradient_checkpointing," in message


KILLABLE_TRAINER = """
import sys, time
from pathlib import Path
from ddpm_pipeline import training

original = training.write_checkpoint

def write_then_hang_at_step_4(output_dir, step, save_state, **kwargs):
    def save_state_and_hang(folder):
        save_state(folder)  # the weights are on disk, trainer_state.json not yet
        if step == 4:
            (Path(output_dir) / "KILL_ME_NOW").write_text(str(folder))
            time.sleep(600)
    return original(output_dir, step, save_state_and_hang, **kwargs)

training.write_checkpoint = write_then_hang_at_step_4
training.main(sys.argv[1:])
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A real training process, SIGKILLed in the middle of writing checkpoint-4: checkpoint-2
    stays intact, `latest` ignores the half-written folder, and the resumed run ends with the
    weights of an uninterrupted run."""
    options = [*TINY, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "none"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_TRAINER, *options, "--output_dir", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "KILL_ME_NOW").exists():
        assert process.poll() is None, "the training process ended before reaching the checkpoint write"
        assert time.monotonic() < deadline, "the training process never reached checkpoint-4"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert (killed / ".checkpoint-4.tmp" / "model.safetensors").is_file()  # the half-written checkpoint
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-2"]
    assert resolve_checkpoint(killed, "latest") == killed / "checkpoint-2"
    result = main([*options, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert result.global_step == 6
    reset_accelerate()
    main([*options, "--output_dir", str(tmp_path / "straight")])
    resumed = load_file(str(killed / "checkpoint-6" / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    assert not (killed / ".checkpoint-4.tmp").exists()  # cleaned up by the rewrite of checkpoint-4


RECORDING_TRAINER = """
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from ddpm_pipeline import training

seen, last_weights, sampler = [], {}, {}
original = training.Trainer.training_step

def recording_step(self, images, seed):
    seen.append(images.tolist())  # with --data_on_device, the batch's indices into the data set
    loss = original(self, images, seed)
    last_weights.update({k: v.detach().clone() for k, v in self.accelerator.unwrap_model(self.unet).state_dict().items()})
    if self.timestep_sampler is not None:
        sampler.update(self.timestep_sampler.state_dict())
    return loss

training.Trainer.training_step = recording_step
training.main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
torch.save({"seen": seen, "weights": last_weights, "sampler": sampler}, out / f"rank{PartialState().process_index}.pt")
"""


@pytest.mark.parametrize("timestep_options", [[], ["--timestep_sampling", "importance", "--importance_history", "1",
                                                    "--num_train_timesteps", "5"]], ids=["uniform", "importance"])  # fmt: skip
def test_two_cpu_processes_train_as_one_with_the_global_batch(tmp_path, timestep_options):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU (gloo): different shards, identical
    weights on both ranks after each step, checkpoints and outputs written once, and the result
    equal to one process with the same global batch. With a time budget, so the main process's clock
    reading (and with it the learning-rate schedule's estimate) is broadcast to both ranks. With
    importance-sampled timesteps, both ranks record the global batch's losses: they keep the one
    history the single process keeps, and draw the same timesteps from it."""
    script = tmp_path / "recording_trainer.py"
    script.write_text(RECORDING_TRAINER)
    common = [*TINY[:TINY.index("--train_batch_size")], "--lr_warmup_steps", "0", "--save_images_steps", "none",
              "--max_train_steps", "3", "--checkpointing_steps", "2", "--data_on_device", "--random_flip",
              "--num_cpu_threads", "1", "--max_train_minutes", "60", *timestep_options]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [*two_process_launch(), str(script)]
    run_to_success([*launch, *common, "--train_batch_size", "4", "--output_dir", str(two)], env=env, timeout=600)
    run_to_success([sys.executable, str(script), *common, "--train_batch_size", "8", "--output_dir", str(one)], env=env, timeout=600)
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    single = torch.load(one / "rank0.pt")
    # each step, the two ranks saw disjoint halves of the single process's global batch
    for step in range(3):
        assert not set(rank0["seen"][step]) & set(rank1["seen"][step])
        assert sorted(rank0["seen"][step] + rank1["seen"][step]) == sorted(single["seen"][step])
    # gradients were synchronized: the ranks hold the same weights
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), name
    # and they equal the one-process run's, to float tolerance: the gradient all-reduce sums in another
    # order, and AdamW turns a rounding-level change of a near-zero gradient into up to lr per step
    # (torch 2.6's gloo: 2.7e-5 on 1 of 9216 weights), still 60× below the 3 steps' ±6e-3 (lr 2e-3)
    for name, weight in single["weights"].items():
        torch.testing.assert_close(rank0["weights"][name], weight, rtol=1e-4, atol=1e-4)
    # one checkpoint series, one pipeline, one loss history: written by the main process only
    assert [p.name for p in list_checkpoints(two)] == ["checkpoint-2", "checkpoint-3"]
    assert {p.name for p in (two / "checkpoint-3").iterdir()} >= {"model.safetensors", "random_states_0.pkl",
                                                                   "random_states_1.pkl", "trainer_state.json"}  # fmt: skip
    assert len((two / "loss_history.csv").read_text().splitlines()) == 1 + 3
    if timestep_options:
        assert torch.equal(rank0["sampler"]["counts"], rank1["sampler"]["counts"])
        assert torch.equal(rank0["sampler"]["losses"], rank1["sampler"]["losses"])
        assert torch.equal(rank0["sampler"]["counts"], single["sampler"]["counts"])
        assert single["sampler"]["counts"].sum() == 3 * 8
        assert (two / "checkpoint-3" / TIMESTEP_SAMPLER_STATE_NAME).is_file()
        after_two_steps = torch.load(one / "checkpoint-2" / TIMESTEP_SAMPLER_STATE_NAME, weights_only=True)
        assert after_two_steps["counts"].min() >= 1  # warm: the third step's draws were by importance
        torch.testing.assert_close(rank0["sampler"]["losses"], single["sampler"]["losses"], rtol=1e-4, atol=1e-5)
    ema_two = torch.load(two / "checkpoint-3" / "custom_checkpoint_1.pkl", weights_only=False)
    ema_one = torch.load(one / "checkpoint-3" / "custom_checkpoint_1.pkl", weights_only=False)
    for a, b in zip(ema_two["shadow_params"], ema_one["shadow_params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_time_budget_stops_training_and_saves_as_usual(tmp_path):
    out = tmp_path / "run"
    result = main([*TINY, "--max_train_steps", "100000", "--max_train_minutes", "0.05", "--lr_scheduler",
                   "constant_with_warmup", "--output_dir", str(out)])  # fmt: skip
    assert result.finished and 0 < result.global_step < 100000
    assert 3.0 <= result.train_seconds < 60
    state = json.loads((out / f"checkpoint-{result.global_step}" / "trainer_state.json").read_text())
    assert state["train_seconds"] == pytest.approx(result.train_seconds)
    assert (out / "model_index.json").is_file() and (out / "samples.png").is_file()


def test_pieces_of_a_run_give_the_uninterrupted_result(tmp_path, monkeypatch, caplog):
    """--stop_after_minutes ends an invocation with a checkpoint; repeating the command with
    --resume_from_checkpoint latest continues, and the pieces end with the uninterrupted weights."""
    options = [*TINY, "--max_train_steps", "12", "--checkpointing_steps", "none"]
    pieces = tmp_path / "pieces"
    clock = {"now": 0.0}
    monkeypatch.setattr(training_module.time, "perf_counter", lambda: clock.__setitem__("now", clock["now"] + 1.0) or clock["now"])
    results = []
    for _ in range(10):
        reset_accelerate()
        with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
            results.append(main([*options, "--stop_after_minutes", "0.1", "--resume_from_checkpoint", "latest",
                                 "--output_dir", str(pieces)]))  # fmt: skip
        if results[-1].finished:
            break
    # one command for the first piece and the rest: the first says that it starts afresh
    assert caplog.text.count(f"--resume_from_checkpoint latest: no checkpoint in {pieces} yet") == 1
    assert len(results) > 1 and not results[0].finished and results[-1].finished
    assert results[0].global_step < 12 == results[-1].global_step
    assert results[-1].train_seconds > results[0].train_seconds  # the clock sums the pieces
    monkeypatch.undo()
    reset_accelerate()
    main([*options, "--output_dir", str(tmp_path / "straight")])
    a = load_file(str(pieces / "checkpoint-12" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoint-12" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in b)
    assert [row.split(",")[:2] for row in (pieces / "loss_history.csv").read_text().splitlines()] == [
        row.split(",")[:2] for row in (tmp_path / "straight" / "loss_history.csv").read_text().splitlines()
    ]


def test_snapshots_hold_the_pipeline_of_their_step_or_minute(tmp_path, caplog):
    """--snapshot_steps / --snapshot_minutes write the EMA pipeline during the run (quality against
    training time from one run): snapshot-2steps is what a run stopped at step 2 would have saved."""
    options = [*TINY, "--lr_scheduler", "constant", "--checkpointing_steps", "none"]
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        main([*options, "--max_train_steps", "4", "--snapshot_steps", "2", "--snapshot_minutes", "1e-9", "--output_dir", str(out)])
    assert f"`python eval_metrics.py --model {out} {QUICK_CPU_EVALUATION} --snapshots` for them at each snapshot too" in caplog.text
    by_step = out / "snapshot-2steps"
    assert json.loads((by_step / "snapshot.json").read_text())["global_step"] == 2
    by_minute = json.loads((out / "snapshot-1e-09min" / "snapshot.json").read_text())
    assert by_minute["global_step"] == 1 and by_minute["train_seconds"] > 0  # the first check after 1e-9 minutes
    assert json.loads((by_step / "training_config.json").read_text())["snapshot_steps"] == [2]
    reset_accelerate()
    main([*options, "--max_train_steps", "2", "--output_dir", str(tmp_path / "two")])
    a = load_file(str(by_step / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in b)
    # and its summary is the one that run ends with, but for the clock
    taken = json.loads((by_step / "snapshot.json").read_text())
    ended = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert taken.pop("train_seconds") > 0 and ended.pop("train_seconds") > 0
    assert taken == ended and taken["recent_loss"]["steps"] == 2
    assert not list(out.glob(".*tmp"))


def test_the_models_a_run_saves_are_on_the_disk_before_they_are_named(tmp_path, monkeypatch):
    """The pipeline and each snapshot are flushed to the disk under their temporary names, then the
    folder that names them: a power cut cannot leave a finished run's model named but empty."""
    synced = record_fsyncs(monkeypatch)
    out = tmp_path / "run"
    main([*TINY, "--max_train_steps", "2", "--snapshot_steps", "1", "--checkpointing_steps", "none", "--output_dir", str(out)])
    for temporary, final in [(out / ".pipeline.tmp", out), (out / ".snapshot-1steps.tmp", out / "snapshot-1steps")]:
        flushed = {Path(path).relative_to(temporary) for path in synced if path.startswith(f"{temporary}/")}
        model_files = {Path("model_index.json"), Path("unet/diffusion_pytorch_model.safetensors"), Path("unet/config.json"),
                       Path("scheduler/scheduler_config.json"), Path("training_config.json")}  # fmt: skip
        assert model_files <= flushed and all((final / name).exists() for name in flushed)  # files and folders
    assert str(out) in synced[synced.index(f"{out}/.pipeline.tmp") :]  # the folder, after the moves named the files


def test_a_full_disk_when_the_pipeline_is_written_names_the_checkpoint_that_writes_it(tmp_path, monkeypatch):
    """The run's last checkpoint is written before its pipeline: a full disk then leaves no partial
    pipeline, and names the checkpoint and the resume that writes the pipeline from it."""
    out = tmp_path / "run"
    command = [*TINY, "--max_train_steps", "2", "--checkpointing_steps", "none", "--output_dir", str(out)]

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training_module, "flush_to_disk", full_disk)
    with pytest.raises(OSError, match=re.escape(f"Could not write the pipeline in {out} (No space left on device); its "
                                                f"partial copy was removed. The last complete checkpoint is "
                                                f"{out / 'checkpoint-2'}: free disk space")) as failed:  # fmt: skip
        main(command)
    assert failed.value.errno == errno.ENOSPC and "--resume_from_checkpoint latest" in str(failed.value)
    assert not (out / "model_index.json").exists() and not list(out.glob(".*tmp"))
    monkeypatch.undo()
    reset_accelerate()
    main([*command, "--resume_from_checkpoint", "latest"])
    reset_accelerate()
    main([*TINY, "--max_train_steps", "2", "--checkpointing_steps", "none", "--output_dir", str(tmp_path / "whole")])
    resumed = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    # a snapshot before the first checkpoint: the same resume starts the run again
    reset_accelerate()
    early = tmp_path / "early"
    monkeypatch.setattr(atomic_module, "flush_to_disk", full_disk)
    with pytest.raises(OSError, match=re.escape("Could not write snapshot-1steps in ") + ".* No checkpoint was written "
                                      r"yet \(the run starts again from step 0.* --resume_from_checkpoint latest"):
        main([*command[:-1], str(early), "--snapshot_steps", "1"])
    assert not list(early.glob("*snapshot*"))
    monkeypatch.undo()
    reset_accelerate()
    main([*command[:-1], str(early), "--snapshot_steps", "1", "--resume_from_checkpoint", "latest"])
    assert (early / "snapshot-1steps" / "snapshot.json").is_file() and (early / "model_index.json").is_file()


def test_bad_snapshot_options_are_refused():
    with pytest.raises(ValueError, match="snapshot_minutes must be positive"):
        TrainingConfig(snapshot_minutes=[1.0, 0.0])


def test_one_run_at_a_time_per_output_dir_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    """A second run into a folder a live run is writing to is refused before any work, naming the
    first; the lock dies with its process (here SIGKILL), so the killed run's resume just trains."""
    from ddpm_pipeline.run_lock import OutputDirLock, OutputDirLockedError

    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ddpm_pipeline.run_lock import OutputDirLock; "
         f"lock = OutputDirLock({str(folder)!r}); lock.acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirLockedError, match=rf"Another training run is writing to .*run \(pid {holder.pid} on "):
            main([*TINY, "--max_train_steps", "2", "--output_dir", str(folder)])
        assert sorted(p.name for p in folder.iterdir()) == [".train.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    result = main([*TINY, "--max_train_steps", "2", "--output_dir", str(folder)])
    assert result.finished and (folder / "model_index.json").exists()
    # in one process too: the lock is per open file, and the run lets go of it when it ends
    with OutputDirLock(folder), pytest.raises(OutputDirLockedError):
        OutputDirLock(folder).check()
    OutputDirLock(folder).check()


def test_a_file_system_without_locks_warns_and_trains_unguarded(tmp_path, monkeypatch, caplog):
    import fcntl

    from ddpm_pipeline.run_lock import OutputDirLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.run_lock"):
        assert OutputDirLock(tmp_path).acquire() is False
    assert "cannot lock" in caplog.text and "start only one run into it at a time" in caplog.text
    result = main([*TINY, "--max_train_steps", "1", "--output_dir", str(tmp_path / "run")])
    assert result.finished
