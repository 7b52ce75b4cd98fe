"""train_ddpm.py end to end: outputs load with stock diffusers, resume is exact, EMA is what is saved."""

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from conftest import reset_accelerate
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from ddpm_pipeline import speed, training, training_data
from ddpm_pipeline.checkpointing import list_checkpoints, read_trainer_state
from ddpm_pipeline.evaluation import EvaluationConfig
from ddpm_pipeline.images import ImageFormat
from ddpm_pipeline.training import TIMESTEP_SAMPLER_STATE_NAME, Trainer, build_ema, grid_cost_advice, main
from ddpm_pipeline.training_config import TrainingConfig
from ddpm_pipeline.training_data import fit_network_to_data

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "ddpm-tiny-16", "--grid_inference_steps", "5", "--num_grid_images", "4", "--report_to", "none"]



def run_training(output_dir, *options):
    return main([*TINY, "--output_dir", str(output_dir), *map(str, options)])


def saved_dataset(path, count=32, size=20, mode="L"):
    """A small save_to_disk data set of smooth random images (an ``img`` column, as on the Hub)."""
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    images = []
    for _ in range(count):
        base = rng.uniform(0, 255, (5, 5, channels)).astype(np.uint8)
        array = np.asarray(Image.fromarray(base.squeeze(-1) if channels == 1 else base).resize((size, size)))
        images.append(Image.fromarray(array))
    dataset = datasets.Dataset.from_dict({"img": images, "label": list(range(count))},
                                         features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}))  # fmt: skip
    dataset.save_to_disk(str(path))
    return path


def read_loss_history(output_dir):
    with open(Path(output_dir) / "loss_history.csv", newline="") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def test_cli_on_bundled_data_writes_a_stock_loadable_pipeline(tmp_path):
    out = tmp_path / "run"
    result = run_training(out, "--resolution", "16", "--max_train_steps", "40", "--train_batch_size", "16",
                          "--learning_rate", "3e-3", "--lr_warmup_steps", "5", "--checkpointing_steps", "20",
                          "--save_images_steps", "20")  # fmt: skip
    assert result.global_step == 40
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "training_config.json",
                 "samples.png", "trajectory.png", "loss_curve.png", "loss_history.csv", "samples/step_0000020.png",
                 "samples/step_0000040.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-20", "checkpoint-40"]
    assert Image.open(out / "samples.png").size == ((2 * 18 + 2) * 2,) * 2  # 2x2 grid of 16 px, padded, ×2
    # the recorded options are the ones used, and reload as a TrainingConfig
    recorded = TrainingConfig.load(out / "training_config.json")
    assert recorded.max_train_steps == 40 and recorded.resolution == 16 and recorded.model == "ddpm-tiny-16"
    # loss falls on real images
    losses = [loss for _, loss in read_loss_history(out)]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    # stock diffusers loads and samples it
    pipeline = DDPMPipeline.from_pretrained(out)
    assert type(pipeline.scheduler).__name__ == "DDPMScheduler"
    images = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


def mixed_image_folder(folder):
    """Ten images 24–33 pixels wide and 20 high, RGB but for a few grayscale ones."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(10):
        size = (24 + index, 20)
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array) if index % 3 else Image.fromarray(array[..., 0])
        image.save(folder / f"{index}.png")
    return folder


def test_cli_on_an_rgb_image_folder(tmp_path):
    folder = mixed_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    run_training(out, "--train_data_dir", folder, "--channels", "3", "--resolution", "16", "--max_train_steps", "3",
                 "--train_batch_size", "4", "--random_flip", "--prediction_type", "x0", "--beta_schedule", "cosine")  # fmt: skip
    pipeline = DDPMPipeline.from_pretrained(out)
    assert pipeline.unet.config.in_channels == 3 and pipeline.unet.config.sample_size == 16
    assert pipeline.scheduler.config.prediction_type == "sample"
    assert pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images = pipeline(batch_size=1, num_inference_steps=3, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_grids_show_their_progress_and_a_costly_grid_gets_advice_once(tmp_path, monkeypatch, caplog, capfd):
    """Each grid's denoising shows a progress bar (a large network's grid on a CPU takes minutes);
    the first grid that costs too much against the training between grids is reported, once."""
    consulted = []

    def always_costly(grid_seconds, period_seconds, step, config):
        consulted.append((step, grid_seconds, period_seconds, config.save_images_steps))
        return f"the grid of step {step} was costly"

    monkeypatch.setattr(training, "grid_cost_advice", always_costly)
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        run_training(tmp_path / "run", "--resolution", "16", "--max_train_steps", "6", "--train_batch_size", "4",
                     "--save_images_steps", "2", "--checkpointing_steps", "none")  # fmt: skip
    assert [(step, every) for step, _, _, every in consulted] == [(2, 2)]  # once advised, not asked again
    assert consulted[0][1] > 0 and consulted[0][2] > 0
    assert caplog.text.count("was costly") == 1
    progress = capfd.readouterr().err
    for bar in ("sample grid of step 2:", "sample grid of step 4:", "final grid:"):
        assert bar in progress, bar
    assert "then the final grid and trajectory (4 images × 5 steps, EMA weights)" in caplog.text


def test_grid_cost_advice_names_a_grid_period_that_fits():
    """Advice when a grid costs more than a quarter of the training between two grids; the period
    it names scales --save_images_steps by the whole factor that brings it under."""
    config = TrainingConfig(save_images_steps=400, num_grid_images=64, grid_inference_steps=100)
    assert training.GRID_COST_WARNING_FRACTION == 0.25
    assert grid_cost_advice(10.0, 100.0, 400, config) is None
    assert grid_cost_advice(25.0, 100.0, 400, config) is None
    assert grid_cost_advice(5.0, 0.0, 400, config) is None  # nothing trained since: nothing to weigh
    advice = grid_cost_advice(1020.0, 1380.0, 800, config)  # 17 min of grid, 23 min of training per 400 steps
    assert advice.startswith("the sample grid at step 800 (64 images × 100 steps) took 17.0 min, 74% of the 23.0 min "
                             "that the 400 training steps between grids take")  # fmt: skip
    assert "--save_images_steps 1200," in advice and "--save_images_steps none" in advice  # 400 × ⌈0.74 / 0.25⌉


def test_a_non_square_network_trains_resumes_samples_and_evaluates(tmp_path, caplog):
    """A UNet2DModel's sample_size may be [height, width], as diffusers' DDPMPipeline allows: the images
    are cropped to that canvas, and grids, trajectories, checkpoints and the bound follow it."""
    folder = mixed_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    options = ["--train_data_dir", folder, "--channels", "3", "--unet_overrides", '{"sample_size": [16, 32]}',
               "--train_batch_size", "4", "--checkpointing_steps", "2"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        run_training(out, *options, "--max_train_steps", "2")
    assert "10 images, 3×16×32; ddpm-tiny-16" in caplog.text
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        assert main([*TINY, "--output_dir", str(out), *map(str, options), "--max_train_steps", "3",
                     "--resume_from_checkpoint", "latest"]).global_step == 3  # fmt: skip
    assert f"Next: `python sample_ddpm.py --model {out}` for more samples" in caplog.text
    # on a CPU, the scoring it suggests is sized for a CPU (the defaults would sample for days), and parses
    assert (f"`python eval_metrics.py --model {out} {training.QUICK_CPU_EVALUATION}` for a quick FID-1k, KID and "
            "bits/dim on a CPU") in caplog.text  # fmt: skip
    quick = EvaluationConfig.from_args(["--model", str(out), *training.QUICK_CPU_EVALUATION.split()])
    quick.validate()
    assert (quick.num_samples, quick.num_inference_steps, quick.bpd_timesteps) == (1000, 100, 20)
    pipeline = DDPMPipeline.from_pretrained(out)
    assert list(pipeline.unet.config.sample_size) == [16, 32]
    assert pipeline(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 16, 32, 3)
    with Image.open(out / "trajectory.png") as trajectory, Image.open(out / "samples.png") as grid:
        assert (trajectory.width - 96) % (128 + 4) == 0  # 96 px of labels, then cells 64 high and 128 wide
        assert grid.width > 1.8 * grid.height  # 2×2 images twice as wide as high, with a thin border
    from ddpm_pipeline import evaluate

    report = evaluate(model=str(out), metrics="bpd", bpd_data=str(folder), bpd_num_images=2, bpd_timesteps=2,
                      output=str(tmp_path / "eval.json"))  # fmt: skip
    assert np.isfinite(report["metrics"]["bpd"]["bits_per_dim"])
    assert json.loads((tmp_path / "eval.json").read_text())["preprocessing"]["resolution"] == [16, 32]
    from ddpm_pipeline.generation import generate_samples

    generate_samples(model=str(out), num_images=2, batch_size=2, num_inference_steps=2, npz=True, output_dir=str(tmp_path / "samples"))
    with np.load(tmp_path / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (2, 16, 32, 3)


def test_an_image_folder_trains_at_its_own_size_and_colour(tmp_path, caplog, monkeypatch):
    folder = mixed_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    options = ["--train_data_dir", str(folder), "--output_dir", str(out), "--train_batch_size", "4", "--report_to", "none",
               "--grid_inference_steps", "2", "--num_grid_images", "4", "--checkpointing_steps", "2"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        main([*options, "--max_train_steps", "2"])
    assert "the data: RGB, 20px (10 images inspected); so --channels 3 --model ddpm-small-28 --resolution 20" in caplog.text
    saved = json.loads((out / "training_config.json").read_text())
    assert (saved["model"], saved["resolution"], saved["channels"]) == ("ddpm-small-28", 20, 3)
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (20, 3, 3)
    assert "GPU-sized" not in caplog.text  # a network made for the CPU
    # the same command resumes: the data give the same network again; had it been one of the paper's
    # GPU-sized networks, the CPU run says so, naming the CPU-sized one
    monkeypatch.setattr(training_data, "CPU_PRESETS", ())
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        assert main([*options, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]).global_step == 3
    assert "--model ddpm-small-28, chosen for images of 20², is the DDPM paper's GPU-sized network" in caplog.text
    assert "pass --model ddpm-small-32" in caplog.text
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    assert "was trained on" not in caplog.text  # the same data: nothing to warn of
    data = read_trainer_state(out / "checkpoint-3")["data"]
    assert data["source"] == f"image folder {folder.resolve()}" and data["num_images"] == 10 and data["fingerprint"]


def test_the_cpu_hint_for_large_images_says_what_the_small_network_does_with_them(caplog):
    """64 px images pick the GPU-sized ddpm-64; the CPU hint names ddpm-small-32 and says that it
    trains at 32 px (the images scaled down) unless --resolution 64 keeps their size, at 4× the cost."""
    PartialState(cpu=True)
    options = TrainingConfig(output_dir="unused")
    large = ImageFormat(size=64, channels=3, smallest=64, largest=64, inspected=8, sizes=((64, 64),) * 8)
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training_data"):
        config = fit_network_to_data(options, large, "cpu")
    assert (config.model, config.resolution) == ("ddpm-64", 64)
    assert ("pass --model ddpm-small-32 (2.5M parameters, made for 32px images; without --resolution it trains at 32px, "
            "these images scaled down to it, and with --resolution 64 at their size, at about 4× the cost of a step)") in caplog.text
    caplog.clear()
    small = ImageFormat(size=32, channels=3, smallest=32, largest=32, inspected=8, sizes=((32, 32),) * 8)
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training_data"):
        assert fit_network_to_data(options, small, "cpu").model == "ddpm-cifar10-32"
    assert "pass --model ddpm-small-32 (2.5M parameters, made for 32px images)." in caplog.text  # nothing to scale


def test_resuming_on_changed_data_goes_on_and_says_what_changed(tmp_path, caplog):
    folder = mixed_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    options = ["--train_data_dir", str(folder), "--output_dir", str(out), "--train_batch_size", "4", "--report_to", "none",
               "--save_images_steps", "none", "--grid_inference_steps", "2", "--num_grid_images", "4", "--resolution", "16"]  # fmt: skip
    main([*options, "--max_train_steps", "1"])
    shutil.copy(folder / "1.png", folder / "10.png")  # an image added
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.training"):
        assert main([*options, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]).global_step == 2
    assert f"{out / 'checkpoint-1'} was trained on 10 images, the data set has 11 now" in caplog.text
    caplog.clear()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "10.png")  # an image replaced
    os.utime(folder / "10.png", (1_000_000_000, 1_000_000_000))
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.training"):
        main([*options, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert "was trained on the same number of images, but datasets' fingerprint of them differs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.training"):
        main([*options[2:], "--dataset_path", str(saved_dataset(tmp_path / "saved", count=8, size=16)),
              "--channels", "3", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert f"was trained on image folder {folder.resolve()}, this run reads saved data set {(tmp_path / 'saved').resolve()}, split train" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.training"):  # a limit the checkpoint has passed: said so
        assert main([*options[2:], "--dataset_path", str(tmp_path / "saved"), "--channels", "3", "--max_train_steps", "2",
                     "--resume_from_checkpoint", "latest"]).global_step == 4  # fmt: skip
    assert ("--max_train_steps 2 is not beyond the checkpoint's step 4: nothing is trained, and the pipeline is written "
            "from its weights. To train further, give a larger --max_train_steps.") in caplog.text  # fmt: skip


def test_accelerate_launch_runs_the_script(tmp_path):
    """The documented command itself: ``accelerate launch --config_file accelerate_config.yaml train_ddpm.py``."""
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
               str(ROOT / "train_ddpm.py"), *TINY, "--dataset_path", str(data), "--output_dir", str(out),
               "--max_train_steps", "2", "--train_batch_size", "4", "--prediction_type", "mu"]  # fmt: skip
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    pipeline = DDPMPipeline.from_pretrained(out)  # μ: needs this package installed, which it is
    assert type(pipeline.scheduler).__name__ == "DDPMTargetScheduler"
    assert pipeline.scheduler.config.prediction_type == "mu"


RESUME_OPTIONS = ["--max_train_steps", "12", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
                  "--random_flip", "--dropout", "0.1", "--lr_warmup_steps", "2", "--lr_scheduler", "cosine",
                  "--checkpointing_steps", "3", "--save_images_steps", "none", "--seed", "7"]  # fmt: skip


def final_state(out):
    checkpoint = out / "checkpoint-12"
    weights = load_file(checkpoint / "model.safetensors")
    ema = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    return weights, ema, optimizer


# importance-sampled timesteps: with T = 10 and one loss per timestep, warm before the crash
IMPORTANCE_OPTIONS = ["--timestep_sampling", "importance", "--importance_history", "1", "--num_train_timesteps", "10",
                      "--loss_weighting", "vlb"]  # fmt: skip


@pytest.mark.parametrize("extra_options", [[], IMPORTANCE_OPTIONS], ids=["uniform", "importance"])
def test_resume_after_a_crash_gives_identical_weights(tmp_path, monkeypatch, extra_options):
    # 40 images, batch 4 × 2 accumulation → 5 optimizer steps per epoch: the crash after step 6 is
    # in the second epoch, and the resumed run finishes it and crosses into the third.
    data = saved_dataset(tmp_path / "data", count=40)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    options = [*RESUME_OPTIONS, *extra_options]
    run_training(straight, "--dataset_path", data, *options)

    original = Trainer.save_checkpoint

    def save_then_crash(self, step, *args, **kwargs):
        path = original(self, step, *args, **kwargs)
        if step == 6:
            raise KeyboardInterrupt("simulated crash after checkpoint-6")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(crashed, "--dataset_path", data, *options)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert [p.name for p in list_checkpoints(crashed)] == ["checkpoint-3", "checkpoint-6"]
    if extra_options:  # warm when it crashed: the resumed run draws by importance from the start
        sampler_state = torch.load(crashed / "checkpoint-6" / TIMESTEP_SAMPLER_STATE_NAME, weights_only=True)
        assert sampler_state["counts"].min() >= 1
    # a write cut short (the disk filled up while rows were appended, a power cut) leaves a row cut short
    with (crashed / "loss_history.csv").open("a") as history:
        history.write("7,0.81")
    reset_accelerate()
    result = run_training(crashed, "--dataset_path", data, *options, "--resume_from_checkpoint", "latest")
    assert result.global_step == 12
    if extra_options:  # the loss history went through the checkpoint
        final_a, final_b = (torch.load(out / "checkpoint-12" / TIMESTEP_SAMPLER_STATE_NAME, weights_only=True)
                            for out in (straight, crashed))  # fmt: skip
        assert torch.equal(final_a["counts"], final_b["counts"]) and torch.equal(final_a["losses"], final_b["losses"])

    (weights_a, ema_a, optim_a), (weights_b, ema_b, optim_b) = final_state(straight), final_state(crashed)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 12
    for shadow_a, shadow_b in zip(ema_a["shadow_params"], ema_b["shadow_params"], strict=True):
        assert torch.equal(shadow_a, shadow_b)
    for state_a, state_b in zip(optim_a["state"].values(), optim_b["state"].values(), strict=True):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    assert read_loss_history(straight) == read_loss_history(crashed)  # the curve spans the crash
    # and the saved pipelines are the same
    unet_a = UNet2DModel.from_pretrained(straight / "unet")
    unet_b = UNet2DModel.from_pretrained(crashed / "unet")
    for (name, a), (_, b) in zip(unet_a.state_dict().items(), unet_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--max_train_steps", "2", "--train_batch_size", "4", "--random_flip",
               "--save_images_steps", "none", "--checkpointing_steps", "none"]  # fmt: skip

    def weights(name, seed):
        reset_accelerate()
        run_training(tmp_path / name, *options, "--seed", seed)
        return load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")

    first, again, other = weights("a", 1), weights("b", 1), weights("c", 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_reading_losses_back_every_few_steps_logs_every_step_the_same(tmp_path):
    """--log_every N keeps losses on the device between reads: same rows, same values, same weights."""
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--max_train_steps", "7", "--train_batch_size", "4",
               "--save_images_steps", "none", "--checkpointing_steps", "3"]  # fmt: skip

    def run(name, every):
        reset_accelerate()
        result = run_training(tmp_path / name, *options, "--log_every", every)
        return result, read_loss_history(tmp_path / name)

    (each, each_rows), (batched, batched_rows) = run("each", 1), run("batched", 3)
    assert [step for step, _ in batched_rows] == list(range(1, 8))
    assert batched_rows == each_rows
    assert batched.final_loss == each.final_loss == pytest.approx(each_rows[-1][1], rel=1e-5)  # the CSV keeps 6 digits


def test_saved_pipeline_holds_the_ema_weights(tmp_path):
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    out = tmp_path / "run"
    run_training(out, "--dataset_path", data, "--max_train_steps", "5", "--train_batch_size", "4",
                 "--save_images_steps", "none", "--ema_max_decay", "0.9")  # fmt: skip
    checkpoint = list_checkpoints(out)[-1]
    raw = load_file(checkpoint / "model.safetensors")
    ema = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)
    saved = UNet2DModel.from_pretrained(out / "unet")
    names = [name for name, _ in saved.named_parameters()]
    assert len(names) == len(ema["shadow_params"])
    differs = 0
    for (name, parameter), shadow in zip(saved.named_parameters(), ema["shadow_params"], strict=True):
        assert torch.equal(parameter.detach(), shadow), name
        differs += not torch.equal(parameter.detach(), raw[name])
    assert differs > len(names) // 2  # the EMA is not the raw weights


def test_ema_update_formula():
    """θ̄_n = d_n θ̄_{n-1} + (1 - d_n) θ_n, d_1 = 0, d_n = min(max, 1 - (1 + (n-1)/γ)^-p)."""
    config = TrainingConfig(ema_max_decay=0.95, ema_inv_gamma=2.0, ema_power=1.5)
    module = torch.nn.Linear(3, 2)
    ema = build_ema(module, config)
    expected = [p.detach().clone() for p in module.parameters()]
    generator = torch.Generator().manual_seed(0)
    decays = []
    for n in range(1, 40):
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        decay = 0.0 if n == 1 else min(0.95, 1 - (1 + (n - 1) / 2.0) ** -1.5)
        decays.append(decay)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, module.parameters(), strict=True)]
        ema.step(module.parameters())
        assert ema.cur_decay_value == pytest.approx(decay, abs=1e-12)
    for shadow, value in zip(ema.shadow_params, expected, strict=True):
        torch.testing.assert_close(shadow, value, rtol=1e-6, atol=1e-6)
    assert decays[1] == pytest.approx(1 - 1.5**-1.5) and decays[-1] == 0.95  # warmed up, then capped
    without_warmup = build_ema(module, TrainingConfig(ema_warmup=False, ema_max_decay=0.999))
    assert without_warmup.get_decay(11) == pytest.approx(11 / 20)


def test_resume_refuses_another_architecture(tmp_path):
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    out = tmp_path / "run"
    run_training(out, "--dataset_path", data, "--max_train_steps", "1", "--train_batch_size", "4", "--save_images_steps", "none")
    reset_accelerate()
    with pytest.raises(ValueError, match="checkpoint vs now: prediction_type: 'epsilon' vs 'mu'"):
        run_training(out, "--dataset_path", data, "--max_train_steps", "2", "--train_batch_size", "4",
                     "--prediction_type", "mu", "--resume_from_checkpoint", "latest")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not a folder"):
        run_training(out, "--dataset_path", data, "--resume_from_checkpoint", tmp_path / "nowhere")
    # a checkpoint written by another version of the package, with an option this one lacks, resumes
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["training_config"]["an_option_from_another_version"] = 1
    state_file.write_text(json.dumps(state))
    reset_accelerate()
    assert run_training(out, "--dataset_path", data, "--max_train_steps", "2", "--train_batch_size", "4",
                        "--save_images_steps", "none", "--resume_from_checkpoint", "latest").global_step == 2  # fmt: skip
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_batch_size"] == 4


def test_resuming_with_another_global_batch_goes_on_and_says_what_changes(tmp_path, caplog):
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    out = tmp_path / "run"
    options = ["--dataset_path", data, "--save_images_steps", "none", "--report_to", "none"]
    run_training(out, *options, "--max_train_steps", "1", "--train_batch_size", "4")
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.training"):
        result = run_training(out, *options, "--max_train_steps", "2", "--train_batch_size", "2",
                              "--gradient_accumulation_steps", "3", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert result.global_step == 2
    assert "trained with 4 images per optimizer step (1 process(es)), this run takes 6" in caplog.text
    assert "--train_batch_size 2 × --gradient_accumulation_steps 3" in caplog.text


def test_a_run_branched_from_another_folders_checkpoint_continues_its_loss_history(tmp_path):
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--save_images_steps", "none", "--train_batch_size", "4", "--max_train_steps", "4",
               "--checkpointing_steps", "2"]  # fmt: skip
    first, branch = tmp_path / "first", tmp_path / "branch"
    run_training(first, *options)
    reset_accelerate()
    run_training(branch, *options, "--resume_from_checkpoint", first / "checkpoint-2")
    assert read_loss_history(branch) == read_loss_history(first)  # steps 1–2 from the first run, 3–4 retrained alike
    assert [p.name for p in list_checkpoints(first)] == ["checkpoint-2", "checkpoint-4"]  # the first run is untouched


def test_a_fresh_run_over_an_earlier_run_is_refused_unless_told_to_overwrite_it(tmp_path, caplog):
    """The same command again without --resume_from_checkpoint used to start afresh beside the earlier
    run's checkpoints and snapshots: until it wrote its own, 'latest' was the other run's newest, and
    the old snapshots stood for its own. It is refused, with the choices named, before any work;
    --overwrite_output_dir deletes them first and trains as in an empty folder."""
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--save_images_steps", "none", "--train_batch_size", "4", "--checkpointing_steps",
               "2", "--lr_warmup_steps", "0"]  # fmt: skip
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run_training(out, *options, "--max_train_steps", "4", "--snapshot_steps", "1")
    (out / "eval_results.json").write_text("{}")  # the earlier model's scores, which a push would put on the card
    (out / "eval_results-grid.png").write_bytes(b"its samples' grid")  # and what eval_metrics.py wrote beside them
    (out / "eval_results-samples").mkdir()
    (out / "eval_results-samples" / "000000.png").write_bytes(b"one of its samples")
    (out / "eval_results-final.json").write_text("{}")  # a --snapshots point's report
    (out / "notes.txt").write_text("mine")
    earlier = {path.name: path.stat().st_mtime_ns for path in out.iterdir() if not path.name.startswith(".")}  # not the lock
    reset_accelerate()
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-2, checkpoint-4, snapshot-1steps, a finished "
                                         r"pipeline\).*Pass "
                                         r"--resume_from_checkpoint latest to continue it .* or --overwrite_output_dir"):
        run_training(out, *options, "--max_train_steps", "3", "--learning_rate", "1e-2")
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir() if not path.name.startswith(".")} == earlier
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.checkpointing"):
        run_training(out, *options, "--max_train_steps", "3", "--learning_rate", "1e-2", "--overwrite_output_dir")
    assert (f"deleting checkpoint-2, checkpoint-4, snapshot-1steps, a finished pipeline in {out}: --overwrite_output_dir"
            in caplog.text)
    assert not (out / "eval_results.json").exists() and (out / "notes.txt").read_text() == "mine"  # the user's own kept
    assert not [path.name for path in out.glob("eval_results*")]
    reset_accelerate()
    run_training(fresh, *options, "--max_train_steps", "3", "--learning_rate", "1e-2")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"] and not (out / "snapshot-1steps").exists()
    assert read_loss_history(out) == read_loss_history(fresh)
    overwritten, new = (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors") for folder in (out, fresh))
    assert overwritten.keys() == new.keys() and all(torch.equal(overwritten[key], new[key]) for key in new)
    assert not list(out.glob(".*.old"))  # deleted whole
    # snapshots without a checkpoint (an attempt killed before its first one) do not stop the same command
    # with --resume_from_checkpoint latest, the cluster's way: it starts afresh and writes them again
    reset_accelerate()
    run_training(out, *options, "--max_train_steps", "2", "--snapshot_steps", "1", "--overwrite_output_dir")
    for checkpoint in list_checkpoints(out):  # a first attempt killed after its snapshot: no checkpoint, no summary
        shutil.rmtree(checkpoint)
    (out / "training_summary.json").unlink()
    stale = (out / "snapshot-1steps" / "snapshot.json").stat().st_mtime_ns
    reset_accelerate()
    with pytest.raises(ValueError, match=r"holds an earlier run \(snapshot-1steps\)"):
        run_training(out, *options, "--max_train_steps", "2", "--snapshot_steps", "1")
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.checkpointing"):
        run_training(out, *options, "--max_train_steps", "2", "--snapshot_steps", "1", "--resume_from_checkpoint", "latest")
    assert "deleting snapshot-1steps" in caplog.text and "before its first checkpoint" in caplog.text
    assert (out / "snapshot-1steps" / "snapshot.json").stat().st_mtime_ns != stale  # written again by this run
    # but a finished run's snapshots, its checkpoints deleted to save space, are kept: refused as above
    for checkpoint in list_checkpoints(out):
        shutil.rmtree(checkpoint)
    reset_accelerate()
    with pytest.raises(ValueError, match=r"holds an earlier run \(snapshot-1steps, a finished pipeline\)"):
        run_training(out, *options, "--max_train_steps", "2", "--snapshot_steps", "1", "--resume_from_checkpoint", "latest")


def test_resuming_an_older_checkpoint_in_place_is_refused_unless_told_to_overwrite_what_came_after(tmp_path, caplog):
    """--resume_from_checkpoint checkpoint-2 in a folder that went on to step 4: its checkpoint-4, later
    snapshot and finished pipeline belong to the abandoned continuation ('latest' would pick
    checkpoint-4 after a crash). Refused, naming them and the choices; --overwrite_output_dir deletes
    them and trains as a branch into a new folder does. Snapshots past the newest checkpoint are a
    resumed run's own, and stay (the crash-and-resume path)."""
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--save_images_steps", "2", "--train_batch_size", "4", "--checkpointing_steps",
               "2", "--lr_warmup_steps", "0", "--max_train_steps", "4", "--snapshot_steps", "3"]  # fmt: skip
    out, branch = tmp_path / "out", tmp_path / "branch"
    run_training(out, *options)
    reset_accelerate()
    run_training(branch, *options, "--resume_from_checkpoint", out / "checkpoint-2", "--learning_rate", "1e-2")
    reset_accelerate()
    with pytest.raises(ValueError, match=r"holds outputs past step 2 \(checkpoint-4, snapshot-3steps, a finished pipeline\)"
                                         r".* Branch into another folder .* or pass --overwrite_output_dir"):  # fmt: skip
        run_training(out, *options, "--resume_from_checkpoint", "checkpoint-2", "--learning_rate", "1e-2")
    assert (out / "checkpoint-4").is_dir() and (out / "training_summary.json").is_file()  # untouched
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.checkpointing"):
        run_training(out, *options, "--resume_from_checkpoint", "checkpoint-2", "--learning_rate", "1e-2",
                     "--overwrite_output_dir")  # fmt: skip
    assert "deleting checkpoint-4, snapshot-3steps, a finished pipeline" in caplog.text
    assert read_loss_history(out) == read_loss_history(branch)
    for folder in ("", "snapshot-3steps"):
        rewound, branched = (load_file(run / folder / "unet" / "diffusion_pytorch_model.safetensors") for run in (out, branch))
        assert all(torch.equal(rewound[key], branched[key]) for key in branched)
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    # resuming the newest checkpoint with a snapshot past it (a crash after the snapshot): nothing refused or deleted
    shutil.rmtree(out / "checkpoint-4")
    for name in ("training_summary.json", "model_index.json"):
        (out / name).unlink()
    snapshot = (out / "snapshot-3steps" / "snapshot.json").stat().st_mtime_ns
    reset_accelerate()
    run_training(out, *options, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-2")
    assert (out / "snapshot-3steps" / "snapshot.json").stat().st_mtime_ns == snapshot  # kept, as before


def test_a_resumed_run_trains_with_its_own_optimizer_and_ema_options(tmp_path, caplog):
    # the checkpoint's AdamW, schedule and EMA states carry the first run's options; the resumed run's replace them
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--save_images_steps", "none", "--train_batch_size", "4", "--max_train_steps", "4",
               "--checkpointing_steps", "2", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]  # fmt: skip
    first, branch = tmp_path / "first", tmp_path / "branch"
    run_training(first, *options, "--learning_rate", "1e-3", "--no-fused_adam")
    reset_accelerate()
    changed = ["--learning_rate", "1e-4", "--adam_beta2", "0.99", "--adam_weight_decay", "0.01", "--ema_max_decay", "0.99",
               "--fused_adam"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        run_training(branch, *options, *changed, "--resume_from_checkpoint", first / "checkpoint-2")
    assert ("applied from here on: --learning_rate 0.001 → 0.0001, --adam_beta2 0.999 → 0.99, --adam_weight_decay 0 → 0.01, "
            "--ema_max_decay 0.9999 → 0.99; the learning rate from step 3 on follows this run's schedule: 0.001 → 0.0001 "
            "at that step") in caplog.text  # fmt: skip
    with open(branch / "loss_history.csv", newline="") as handle:
        rates = {int(row["step"]): float(row["lr"]) for row in csv.DictReader(handle)}
    assert rates == {1: 1e-3, 2: 1e-3, 3: 1e-4, 4: 1e-4}
    group = torch.load(branch / "checkpoint-4" / "optimizer.bin", weights_only=False)["param_groups"][0]
    assert (group["initial_lr"], group["betas"], group["weight_decay"], group["fused"]) == (1e-4, (0.9, 0.99), 0.01, True)
    assert not group["foreach"]  # this run's fused kernel, not the checkpoint's foreach one
    ema = torch.load(branch / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=False)
    assert (ema["decay"], ema["optimization_step"]) == (0.99, 4)
    # turning the EMA off (or on) is refused before any work: a checkpoint holds EMA weights or not
    reset_accelerate()
    with pytest.raises(ValueError, match="use_ema: True vs False"):
        run_training(tmp_path / "no-ema", *options, "--no-use_ema", "--resume_from_checkpoint", first / "checkpoint-2")


def test_a_run_trained_further_follows_the_longer_schedule_from_its_resumed_step(tmp_path, caplog):
    # a finished 4-step cosine run, resumed to step 8: its rate has decayed to 0, and from step 5 on it
    # trains at the rates of an 8-step run, not one step at the old schedule's 0 first
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = ["--dataset_path", data, "--save_images_steps", "none", "--train_batch_size", "4", "--lr_scheduler", "cosine",
               "--lr_warmup_steps", "1", "--learning_rate", "1e-3"]  # fmt: skip
    first, further, straight = tmp_path / "first", tmp_path / "further", tmp_path / "straight"
    run_training(first, *options, "--max_train_steps", "4")
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        run_training(further, *options, "--max_train_steps", "8", "--resume_from_checkpoint", first / "checkpoint-4")
    reset_accelerate()
    run_training(straight, *options, "--max_train_steps", "8")

    def rates(folder):
        with open(folder / "loss_history.csv", newline="") as handle:
            return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(handle)}

    assert [rates(further)[n] for n in range(1, 5)] == [rates(first)[n] for n in range(1, 5)]
    assert [rates(further)[n] for n in range(5, 9)] == [rates(straight)[n] for n in range(5, 9)]
    assert rates(straight)[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 7)), rel=1e-5)
    assert "the cosine decay's length in steps 4 → 8; the learning rate from step 5 on follows this run's schedule: 0 → 0.000611" in caplog.text
    # resumed with its own schedule, a run says nothing of it
    caplog.clear()
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        run_training(straight, *options, "--max_train_steps", "8", "--resume_from_checkpoint", straight / "checkpoint-8")
    assert "other options" not in caplog.text


@pytest.fixture
def fp16_loss_scaling_on_the_cpu(monkeypatch):
    """fp16 runs get a loss scaler as on a GPU (Accelerate gives none on the CPU, and the trainer
    refuses fp16 there for that reason)."""
    monkeypatch.setattr(speed, "accelerate_autocasts_fp16", lambda device: True)
    original = Accelerator.__init__

    def init_with_scaler(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.mixed_precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(Accelerator, "__init__", init_with_scaler)


def test_resuming_in_fp16_from_a_checkpoint_without_loss_scaling_starts_the_scaler_afresh(
    tmp_path, caplog, fp16_loss_scaling_on_the_cpu
):
    # a bf16 run (an Ampere GPU) resumed where --mixed_precision auto means fp16 (an older GPU), and back
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    out = tmp_path / "run"
    options = ["--dataset_path", data, "--save_images_steps", "none", "--train_batch_size", "4", "--checkpointing_steps", "2",
               "--no-fused_adam"]  # fmt: skip
    run_training(out, *options, "--max_train_steps", "2", "--mixed_precision", "bf16")
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        run_training(out, *options, "--max_train_steps", "4", "--mixed_precision", "fp16", "--resume_from_checkpoint", "latest")
    assert "has no fp16 loss-scaler state" in caplog.text
    assert (out / "checkpoint-4" / "scaler.pt").is_file()
    reset_accelerate()
    assert run_training(out, *options, "--max_train_steps", "6", "--mixed_precision", "bf16",
                        "--resume_from_checkpoint", "latest").global_step == 6  # fmt: skip


def test_too_few_images_for_a_batch_is_a_clear_error(tmp_path):
    data = saved_dataset(tmp_path / "data", count=3, size=16)
    with pytest.raises(ValueError, match=r"3 images, fewer than one optimizer step's batch of 4 .*: lower --train_batch_size, or add"):
        run_training(tmp_path / "run", "--dataset_path", data, "--train_batch_size", "4")
    reset_accelerate()
    # an epoch ends the accumulation, so 2 batches of 2 (one epoch) could not make a step of 3 batches
    with pytest.raises(ValueError, match=r"batch of 6 \(--train_batch_size 2 × 3 accumulation × 1 processes\): "
                                         "lower --train_batch_size or --gradient_accumulation_steps"):  # fmt: skip
        run_training(tmp_path / "run", "--dataset_path", data, "--train_batch_size", "2", "--gradient_accumulation_steps", "3")


def test_train_can_be_called_again_in_the_same_process_with_other_options(tmp_path):
    """A notebook's cells: each train() gets its own mixed precision and gradient accumulation,
    after a run that finished and after one that failed, though Accelerate keeps both per process."""
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    options = [*TINY, "--dataset_path", str(data), "--train_batch_size", "2", "--max_train_steps", "2"]
    first = training.train(TrainingConfig.from_args([*options, "--output_dir", str(tmp_path / "fp32")]))
    with pytest.raises(ValueError, match="fewer than one optimizer step's batch"):
        training.train(TrainingConfig.from_args([*options, "--output_dir", str(tmp_path / "bad"), "--train_batch_size", "9"]))
    bf16 = training.train(TrainingConfig.from_args([*options, "--output_dir", str(tmp_path / "bf16"), "--mixed_precision", "bf16"]))
    accumulated = training.train(TrainingConfig.from_args([*options, "--output_dir", str(tmp_path / "acc"),
                                                           "--gradient_accumulation_steps", "2"]))  # fmt: skip
    assert first.finished and bf16.finished and accumulated.finished
    assert json.loads((tmp_path / "bf16" / "training_summary.json").read_text())["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "fp32" / "training_summary.json").read_text())["epochs"] == 0.5  # 2 steps of one batch of 2
    assert json.loads((tmp_path / "acc" / "training_summary.json").read_text())["epochs"] == 1.0  # 2 steps of two batches of 2


def test_training_config_json_matches_the_command_line(tmp_path):
    data = saved_dataset(tmp_path / "data", count=8, size=16)
    out = tmp_path / "run"
    run_training(out, "--dataset_path", data, "--max_train_steps", "1", "--train_batch_size", "4",
                 "--block_out_channels", "8", "16", "--save_images_steps", "none")  # fmt: skip
    recorded = json.loads((out / "training_config.json").read_text())
    assert recorded["block_out_channels"] == [8, 16] and recorded["dataset_path"] == str(data)
    assert list(UNet2DModel.from_pretrained(out / "unet").config.block_out_channels) == [8, 16]
