"""What training logs of its loss: the parts of a learned variance's loss, the loss per quarter of
the timesteps (weighted right under importance sampling), the CSV across resumes, and the plot."""

import csv
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from test_learned_variance import learned_unet, quantized_images
from test_learned_variance import scheduler as learned_scheduler
from test_training import run_training
from tqdm import tqdm

from ddpm_pipeline import DDPMTargetScheduler, DDPMUNet, diffusion_loss, diffusion_loss_terms
from ddpm_pipeline.likelihood import timestep_bpd
from ddpm_pipeline.losses import DiffusionLossTerms
from ddpm_pipeline.model_card import build_model_card
from ddpm_pipeline.plots import moving_average
from ddpm_pipeline.run_records import QUARTER_COLUMNS, LossHistory, PendingLosses, step_record
from ddpm_pipeline.training import Trainer
from ddpm_pipeline.training_config import TrainingConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

T = 20


def read_rows(output_dir):
    with open(output_dir / "loss_history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def fixed_inputs(count=4):
    images = quantized_images(count)
    timesteps = torch.tensor([0, 3, 11, T - 1])[:count]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    return images, timesteps, noise


@pytest.mark.parametrize("weighting", ["simple", "vlb"])
def test_the_terms_of_a_learned_variance_s_loss(weighting):
    """Hybrid: loss = mse + λ·vlb with vlb = T·L_t. L_vlb: loss = vlb, and mse is the mean's
    unweighted error, reported but not trained (no gradient)."""
    unet, s = learned_unet(), learned_scheduler()
    images, timesteps, noise = fixed_inputs()
    terms = diffusion_loss_terms(unet, s, images, weighting, timesteps=timesteps, noise=noise, vlb_weight=0.01)
    output = unet(s.add_noise(images, noise, timesteps), timesteps).sample
    bound = T * timestep_bpd(output, s, images, s.add_noise(images, noise, timesteps), timesteps)
    torch.testing.assert_close(terms.vlb, bound.float(), rtol=1e-5, atol=1e-6)
    prediction, _ = s.split_model_output(output, images)
    squared_error = (prediction - noise).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(terms.mse, squared_error, rtol=1e-5, atol=1e-7)
    if weighting == "simple":
        torch.testing.assert_close(terms.loss, terms.mse + 0.01 * terms.vlb)
    else:
        assert torch.equal(terms.loss, terms.vlb) and not terms.mse.requires_grad
    batch = diffusion_loss(unet, s, images, weighting, timesteps=timesteps, noise=noise, vlb_weight=0.01)
    torch.testing.assert_close(batch, terms.loss.mean())


def test_a_fixed_variance_s_loss_is_its_mse_alone():
    s = DDPMTargetScheduler(num_train_timesteps=T, beta_schedule="cosine", prediction_type="sample")
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPMUNet.preset_config("ddpm-tiny-16"))
    images, timesteps, noise = fixed_inputs()
    terms = diffusion_loss_terms(unet, s, images, "vlb", timesteps=timesteps, noise=noise)
    assert terms.vlb is None and torch.equal(terms.loss, terms.mse)


def test_a_step_record_splits_the_loss_by_quarter_of_the_timesteps():
    """Entry 0 is the batch loss mean_b w_b ℓ_b; the quarter sums add up to it; S_q/W_q is the
    self-normalized weighted mean of the quarter's losses; records average across micro-batches."""
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([0, 1, 4, 5, 9, 12, 19, 19])
    loss = torch.rand(8, generator=generator)
    weights = torch.rand(8, generator=generator) + 0.5
    terms = DiffusionLossTerms(loss=loss, mse=loss * 0.9, vlb=loss * 30)
    record = step_record(terms, timesteps, T, weights)
    assert record.shape == (3 + 2 * len(QUARTER_COLUMNS),)
    torch.testing.assert_close(record[0], (weights * loss).mean())
    torch.testing.assert_close(record[1], (weights * loss * 0.9).mean())
    torch.testing.assert_close(record[2], (weights * loss * 30).mean())
    sums, totals = record[3:7], record[7:]
    torch.testing.assert_close(sums.sum(), record[0])
    for q, members in enumerate([[0, 1, 2], [3, 4], [5], [6, 7]]):  # t < 5, < 10, < 15, < 20
        index = torch.tensor(members)
        expected = (weights[index] * loss[index]).sum() / weights[index].sum()
        torch.testing.assert_close(sums[q] / totals[q], expected)
    halves = [step_record(terms._replace(loss=loss[h], mse=loss[h] * 0.9, vlb=loss[h] * 30), timesteps[h], T, weights[h])
              for h in (slice(0, 4), slice(4, 8))]  # fmt: skip
    torch.testing.assert_close(torch.stack(halves).mean(dim=0), record)
    empty = step_record(DiffusionLossTerms(loss[:2], loss[:2], None), timesteps[:2], T)
    assert math.isnan(empty[2]) and empty[7].item() == 1.0 and empty[8:].eq(0).all()


def test_the_history_keeps_its_columns_across_a_resume_from_an_older_csv(tmp_path):
    path = tmp_path / "loss_history.csv"
    path.write_text("step,loss,lr\n1,0.5,0.001\n2,0.4,0.002\n3,0.3,0.003\n")  # as written before the quarters
    history = LossHistory(path, resume_step=2, enabled=True, terms=True)
    history.append(3, 0.25, 0.003, loss_q0=0.5, loss_q1=None, loss_q2=0.1, loss_q3=0.05, mse=0.2, vlb=4.0)
    history.close()
    assert path.read_text().splitlines() == [
        "step,loss,lr,loss_q0,loss_q1,loss_q2,loss_q3,mse,vlb",
        "1,0.5,0.001,,,,,,",
        "2,0.4,0.002,,,,,,",
        "3,0.25,0.003,0.5,,0.1,0.05,0.2,4",
    ]
    again = LossHistory(path, resume_step=3, enabled=True)
    steps, q1 = again.series("loss_q0")
    again.close()
    assert steps == [1, 2, 3] and np.isnan(q1[:2]).all() and q1[2] == 0.5


def test_a_crash_while_the_history_is_rewritten_on_resume_leaves_it_whole(tmp_path, monkeypatch):
    path = tmp_path / "loss_history.csv"
    path.write_text("step,loss,lr\n1,0.5,0.001\n2,nan,0.002\n3,0.3,0.003\n")
    before = path.read_text()

    def crash(*args):
        raise KeyboardInterrupt("killed while rewriting")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        LossHistory(path, resume_step=2, enabled=True)
    assert path.read_text() == before
    monkeypatch.undo()
    history = LossHistory(path, resume_step=2, enabled=True)
    history.close()
    assert path.read_text().splitlines()[1:] == ["1,0.5,0.001,,,,", "2,nan,0.002,,,,"]  # a NaN loss stays NaN
    assert [p.name for p in tmp_path.iterdir()] == ["loss_history.csv"]


def test_the_recent_means_average_the_last_steps_with_a_value(tmp_path):
    history = LossHistory(tmp_path / "loss_history.csv", resume_step=0, enabled=True)
    assert len(history) == 0 and history.recent_means(3) == {}
    history.append(1, 9.0, 0.1, loss_q0=9.0, loss_q1=None, loss_q2=None, loss_q3=None)
    history.append(2, 0.5, 0.1, loss_q0=None, loss_q1=0.5, loss_q2=None, loss_q3=None)
    history.append(3, math.nan, 0.1, loss_q0=None, loss_q1=None, loss_q2=math.nan, loss_q3=None)  # a skipped step
    history.append(4, 0.25, 0.1, loss_q0=0.125, loss_q1=None, loss_q2=None, loss_q3=None)
    history.close()
    assert len(history) == 4
    # the last three rows: the non-finite loss and the empty cells are left out, a column without a value too
    assert history.recent_means(3) == {"loss": 0.375, "loss_q0": 0.125, "loss_q1": 0.5}
    assert history.recent_means(100)["loss"] == pytest.approx((9.0 + 0.5 + 0.25) / 3)


def test_the_moving_average_skips_missing_values():
    np.testing.assert_allclose(moving_average([1, math.nan, 3, math.nan, math.nan, 6], 2), [1, 1, 3, 3, math.nan, 6])
    np.testing.assert_allclose(moving_average([1, 2, 4, 8, 16], 4, centered=True), [1, 7 / 3, 31 / 5, 28 / 3, 16])
    np.testing.assert_allclose(moving_average([1, math.nan, 3, 4], 3, centered=True), [1, 2, 3.5, 4])


def test_a_hybrid_run_logs_its_terms_and_quarters_and_plots_them(tmp_path):
    out = tmp_path / "run"
    run_training(out, "--resolution", "16", "--max_train_steps", "12", "--train_batch_size", "8",
                 "--variance_type", "learned_range", "--vlb_weight", "0.01", "--timestep_sampling", "importance",
                 "--importance_history", "1", "--num_train_timesteps", "8", "--log_every", "4")  # fmt: skip
    rows = read_rows(out)
    assert list(rows[0]) == ["step", "loss", "lr", *QUARTER_COLUMNS, "mse", "vlb"] and len(rows) == 12
    for row in rows:
        assert float(row["loss"]) == pytest.approx(float(row["mse"]) + 0.01 * float(row["vlb"]), rel=1e-4)
        assert any(row[name] for name in QUARTER_COLUMNS)
    assert Image.open(out / "loss_curve.png").size == (1680, 480)  # the loss, and the loss by quarter
    # the run's summary averages the CSV's rows (all 12: fewer than 100), and the model card tells it
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 12 and summary["global_batch_size"] == 8 and summary["num_processes"] == 1
    assert summary["epochs"] == pytest.approx(12 / (10_000 / 8)) and summary["data"]["num_images"] == 10_000
    assert summary["mixed_precision"] == "no" and summary["device"].startswith("cpu")
    recent = summary["recent_loss"]
    assert recent["steps"] == 12
    for name in ("loss", "mse", "vlb", *QUARTER_COLUMNS):
        values = [float(row[name]) for row in rows if row[name]]
        assert recent[name] == pytest.approx(np.mean(values), rel=1e-5), name  # the CSV keeps 6 digits
    card = build_model_card(out, "someone/hybrid").text
    assert "## Training results" in card and "Trained for 12 optimizer steps of 8 images (0.0096 epochs of 10,000 images)" in card
    assert f"averaged {recent['loss']:.4g} (its MSE part {recent['mse']:.4g}, its bound part {recent['vlb']:.4g})" in card
    assert "over the last 12 steps" in card and "](loss_curve.png)" in card and "](trajectory.png)" in card


class _OneProcess:
    """What PendingLosses asks of an Accelerator, for one process."""

    def gather(self, tensor):
        return tensor

    def log(self, values, step):
        pass


def test_the_progress_bar_draws_a_step_once_and_shows_its_loss(tmp_path):
    """The loss's postfix waits for the bar's next draw instead of drawing it again (a log file
    got every step twice), and closing the bar shows the last loss."""
    stream = io.StringIO()
    progress = tqdm(total=3, file=stream, mininterval=0, miniters=1, ascii=True)
    history = LossHistory(tmp_path / "loss_history.csv", 0, enabled=True)
    pending = PendingLosses(_OneProcess(), history, progress)
    for step, loss in enumerate([0.5, 0.25, 0.125], start=1):
        terms = DiffusionLossTerms(loss=torch.full((2,), loss), mse=torch.full((2,), loss), vlb=None)
        pending.add(step, step_record(terms, torch.tensor([1, 7]), T), lr=1e-3, epoch=0)
        progress.update(1)
        pending.flush()
    progress.close()
    draws = [line for line in stream.getvalue().replace("\n", "\r").split("\r") if line.strip()]
    assert len(draws) == 1 + 3 + 1  # the empty bar, one per step, and the close
    assert "loss=0.2500" in draws[3] and "loss=0.1250" in draws[-1] and draws[-1].startswith("100%")
    history.flush()
    assert pending.last_loss == 0.125 and [float(row["loss"]) for row in read_rows(tmp_path)] == [0.5, 0.25, 0.125]


def test_a_fixed_variance_run_logs_quarters_without_terms(tmp_path):
    out = tmp_path / "run"
    run_training(out, "--resolution", "16", "--max_train_steps", "3", "--train_batch_size", "8")
    rows = read_rows(out)
    assert list(rows[0]) == ["step", "loss", "lr", *QUARTER_COLUMNS]
    for row in rows:  # uniform draws: the loss is a convex combination of the quarters' means
        quarters = [float(row[name]) for name in QUARTER_COLUMNS if row[name]]
        assert min(quarters) * 0.9999 <= float(row["loss"]) <= max(quarters) * 1.0001


def test_a_training_step_returns_its_record(tmp_path):
    """The quarter sums of a step's record add up to the loss it trained on."""
    config = TrainingConfig.from_args(["--model", "ddpm-tiny-16", "--resolution", "16", "--report_to", "none",
                                       "--output_dir", str(tmp_path)])  # fmt: skip
    trainer = Trainer(config)
    images = torch.stack([trainer.data.images[i] for i in range(8)])
    record = trainer.training_step(images, seed=0)
    assert record.shape == (11,) and record.device == images.device
    torch.testing.assert_close(record[3:7].sum(), record[0])
    torch.testing.assert_close(record[7:].sum(), torch.tensor(1.0))  # uniform draws: weight 1 per image


def test_the_trainer_weights_its_loss_by_min_snr_with_the_given_gamma(tmp_path):
    """ε's Min-SNR weight is min(1, γ/SNR_t): 1 everywhere for a γ above every SNR_t (the same loss as
    L_simple, step for step), below 1 near the data for γ = 1."""

    def first_step_loss(*options):
        config = TrainingConfig.from_args(["--model", "ddpm-tiny-16", "--resolution", "16", "--report_to", "none",
                                           "--output_dir", str(tmp_path / "-".join(options or ("simple",))), *options])  # fmt: skip
        trainer = Trainer(config)
        images = torch.stack([trainer.data.images[i] for i in range(8)])
        return trainer.training_step(images, seed=0)[0]

    simple = first_step_loss()
    torch.testing.assert_close(first_step_loss("--snr_gamma", "1e9"), simple)
    assert first_step_loss("--loss_weighting", "min_snr", "--snr_gamma", "1") < 0.99 * simple


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_record_does_not_synchronize_with_the_host():
    loss = torch.rand(128, device="cuda")
    timesteps = torch.randint(0, 1000, (128,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        record = step_record(DiffusionLossTerms(loss, loss, None), timesteps, 1000, torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(record[3:7].sum(), loss.mean())
