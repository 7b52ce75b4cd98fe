"""Long runs survive bad luck: NaN losses, full disks, bad files, killed processes."""

import math

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import ddpm_pipeline.training as training_module
from ddpm_pipeline.checkpointing import list_checkpoints
from ddpm_pipeline.training import main

TINY = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "2", "--num_grid_images", "4",
        "--report_to", "none", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--save_images_steps", "none"]  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The loss of the third optimizer step (third call) is NaN, as after an overflow."""
    original = training_module.diffusion_loss
    calls = {"n": 0}

    def loss_with_a_nan(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(training_module, "diffusion_loss", loss_with_a_nan)


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
    original = training_module.diffusion_loss
    monkeypatch.setattr(training_module, "diffusion_loss", lambda *a, **k: original(*a, **k) * math.nan)
    with pytest.raises(FloatingPointError, match="more than --max_skipped_steps 2"):
        main([*TINY, "--max_train_steps", "6", "--nonfinite_loss", "skip", "--max_skipped_steps", "2",
              "--log_every", "1", "--output_dir", str(tmp_path / "run")])  # fmt: skip
