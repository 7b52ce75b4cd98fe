"""--report_to: the loss and the sample grids reach TensorBoard and Weights & Biases (offline)."""

import importlib.util
import io

import numpy as np
import pytest
from accelerate import Accelerator
from conftest import reset_accelerate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_pipeline.run_outputs import LOSS_HISTORY_NAME
from ddpm_pipeline.run_records import read_loss_history
from ddpm_pipeline.trackers import WANDB_RUN_ID_NAME, check_wandb_login
from ddpm_pipeline.training import Trainer, main
from ddpm_pipeline.training_config import TrainingConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TINY = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "2", "--num_grid_images", "4",
        "--train_batch_size", "4", "--lr_warmup_steps", "0", "--save_images_steps", "2", "--checkpointing_steps", "2"]  # fmt: skip


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_tensorboard_gets_the_losses_and_every_sample_grid(tmp_path):
    out = tmp_path / "run"
    main([*TINY, "--max_train_steps", "4", "--output_dir", str(out), "--report_to", "tensorboard",
          "--split", "train[:-10]", "--validation_split", "train[-10:]", "--validation_steps", "3",
          "--validation_images", "2", "--validation_timesteps", "2"])  # fmt: skip
    events = EventAccumulator(str(out / "logs" / "train_ddpm"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert {"lr", "loss/q0"} <= set(events.Tags()["scalars"])
    # the held-out bound of step 3 and of the end, as validation_history.csv has it
    rows = read_loss_history(out / "validation_history.csv")
    for name in ("train_bpd", "validation_bpd"):
        logged = events.Scalars(f"validation/{name}")
        assert [event.step for event in logged] == [row["step"] for row in rows] == [3, 4]
        assert [event.value for event in logged] == pytest.approx([row[name] for row in rows], rel=1e-5)
    images = events.Images("samples")
    assert [image.step for image in images] == [2, 4]  # the grid of step 2, and the final one
    for image in images:  # each is the PNG written beside it
        logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        assert np.array_equal(logged, png_pixels(out / "samples" / f"step_{image.step:07d}.png"))


def test_a_run_resumed_after_a_crash_keeps_one_tensorboard_point_per_step(tmp_path, monkeypatch):
    # the crash comes after step 3 was logged, past checkpoint-2: the resumed run logs 3 again
    out = tmp_path / "run"
    options = [*TINY, "--max_train_steps", "4", "--output_dir", str(out), "--report_to", "tensorboard"]
    original_log = Accelerator.log

    def log_then_crash(self, values, step=None, **kwargs):
        original_log(self, values, step=step, **kwargs)
        if step == 3:
            self.end_training()  # what the crashed process had written reaches the file
            raise KeyboardInterrupt("simulated crash after logging step 3")

    monkeypatch.setattr(Accelerator, "log", log_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main(options)
    monkeypatch.setattr(Accelerator, "log", original_log)
    crashed = EventAccumulator(str(out / "logs" / "train_ddpm"), size_guidance={"scalars": 0}).Reload()
    assert [event.step for event in crashed.Scalars("loss")] == [1, 2, 3]
    reset_accelerate()
    main([*options, "--resume_from_checkpoint", "latest"])
    events = EventAccumulator(str(out / "logs" / "train_ddpm"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [image.step for image in events.Images("samples")] == [2, 4]
    # the points kept are the resumed run's (the same values: a resumed run retrains step 3 exactly)
    rows = {row["step"]: row["loss"] for row in read_loss_history(out / LOSS_HISTORY_NAME)}
    assert [event.value for event in events.Scalars("loss")] == pytest.approx([rows[step] for step in (1, 2, 3, 4)], rel=1e-5)
    # a fresh run over it (--overwrite_output_dir, another learning rate) hides all of its points
    reset_accelerate()
    main([*options, "--max_train_steps", "3", "--learning_rate", "1e-2", "--overwrite_output_dir"])
    events = EventAccumulator(str(out / "logs" / "train_ddpm"), size_guidance={"scalars": 0, "images": 0}).Reload()
    rows = {row["step"]: row["loss"] for row in read_loss_history(out / LOSS_HISTORY_NAME)}
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    assert [event.value for event in events.Scalars("loss")] == pytest.approx([rows[step] for step in (1, 2, 3)], rel=1e-5)
    assert [image.step for image in events.Images("samples")] == [2, 3]
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000003.png"]  # not step 4


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install -e '.[dev]')")
def test_weights_and_biases_offline_gets_the_grids_and_a_resumed_run_continues_its_run(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    options = [*TINY, "--output_dir", str(out), "--report_to", "wandb"]
    main([*options, "--max_train_steps", "2"])
    run_id = (out / "logs" / WANDB_RUN_ID_NAME).read_text().strip()
    reset_accelerate()
    main([*options, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)  # one W&B run, continued
    logged = {path.name.split("_")[1]: path for run in runs for path in (run / "files" / "media" / "images").glob("samples_*.png")}
    assert sorted(logged, key=int) == ["2", "4"]
    assert np.array_equal(png_pixels(logged["4"]), png_pixels(out / "samples.png"))
    # a fresh run in the same folder (its earlier run's checkpoints deleted) is a new W&B run
    reset_accelerate()
    main([*options, "--max_train_steps", "2", "--overwrite_output_dir"])
    assert (out / "logs" / WANDB_RUN_ID_NAME).read_text().strip() != run_id


def test_wandb_without_the_package_is_refused_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else real(name, *args))
    config = TrainingConfig.from_args([*TINY, "--report_to", "wandb", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="--report_to wandb needs the wandb package: pip install wandb"):
        Trainer(config)
    assert not (tmp_path / "run").exists()
    # the options of a W&B run stay readable without wandb (a model card, a resumed run's check)
    assert TrainingConfig.from_dict(config.to_dict()).report_to == "wandb"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install -e '.[dev]')")
def test_wandb_without_an_api_key_is_refused_before_the_data_are_loaded(tmp_path, monkeypatch):
    """Without a W&B login, wandb.init would fail only after the data are loaded and the network
    built; the run says so at start-up instead, with the ways on."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-settings"))
    monkeypatch.setattr(Trainer, "_load_dataset", lambda self: pytest.fail("the data were loaded before the W&B check"))
    import wandb.sdk

    wandb.sdk.teardown()  # W&B keeps the settings it started with per process: an earlier test's offline mode
    config = TrainingConfig.from_args([*TINY, "--report_to", "wandb", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(RuntimeError, match=r"W&B has no API key on this machine .*Run `wandb login`.*WANDB_MODE=offline"):
        Trainer(config)
    for mode in ("offline", "disabled"):  # no account needed: nothing to check
        monkeypatch.setenv("WANDB_MODE", mode)
        check_wandb_login()
