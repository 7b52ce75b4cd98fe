"""Fine-tuning (--pretrained_model_name_or_path): from our pipelines, stock diffusers folders, bare
UNets and Hub repos (through the Hub cache, offline), keeping the network and its noise schedule."""

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import hub_cache_repo, reset_accelerate
from diffusers import DDPMPipeline, DDPMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel
from PIL import Image
from test_training import TINY, read_loss_history, run_training

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet
from ddpm_pipeline.pretrained import PretrainedDDPM, is_local_source
from ddpm_pipeline.training import Trainer, main
from ddpm_pipeline.training_config import TrainingConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

FINE_TUNE = ["--grid_inference_steps", "5", "--num_grid_images", "4", "--report_to", "none", "--resolution", "16"]


def tiny_unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**DDPMUNet.preset_config("ddpm-tiny-16", **overrides))


def stock_pipeline_folder(path, **scheduler_options):
    """What stock diffusers saves: `DDPMPipeline` of a `UNet2DModel` and a `DDPMScheduler`."""
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(**scheduler_options)).save_pretrained(path)
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k].to(first[k].dtype)) for k in first)


def fine_tune_config(source, output_dir, *options) -> TrainingConfig:
    return TrainingConfig.from_args(
        [*FINE_TUNE, "--pretrained_model_name_or_path", str(source), "--output_dir", str(output_dir), *map(str, options)]
    )


def test_a_fine_tuning_run_starts_from_the_pretrained_weights_and_schedule(tmp_path):
    source = stock_pipeline_folder(tmp_path / "stock", beta_schedule="linear", variance_type="fixed_large")
    trainer = Trainer(fine_tune_config(source, tmp_path / "out", "--max_train_steps", "2"))
    stock = DDPMPipeline.from_pretrained(source)
    assert same_weights(trainer.accelerator.unwrap_model(trainer.unet), stock.unet)
    ema = DDPMUNet(**trainer.unet_config)
    trainer.ema.copy_to(ema.parameters())
    assert same_weights(ema, stock.unet)  # the EMA starts from them too
    scheduler = trainer.noise_scheduler
    assert isinstance(scheduler, DDPMTargetScheduler)
    assert scheduler.config.variance_type == "fixed_large" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.schedule_name == "linear" and scheduler.config.num_train_timesteps == 1000
    torch.testing.assert_close(scheduler.alphas_cumprod, stock.scheduler.alphas_cumprod, rtol=1e-6, atol=0)
    # the local source is recorded by its absolute path, and the network by it (no preset)
    assert trainer.config.pretrained_model_name_or_path == str(source.resolve()) and trainer.config.model is None
    assert trainer.model_name == "stock (fine-tuned)"  # in plot titles and the log: the folder by its name, not its path


def test_fine_tuning_says_what_its_images_become_and_warns_when_they_lose_their_colour(tmp_path, caplog):
    source = stock_pipeline_folder(tmp_path / "stock")  # a grayscale network
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        Trainer(fine_tune_config(source, tmp_path / "gray"))  # the bundled gray images
    assert f"the data: grayscale, 28px (64 images inspected); {source} takes grayscale images; this run trains at 16px" in caplog.text
    assert "samples stay gray" not in caplog.text
    caplog.clear()
    folder = tmp_path / "colour"
    folder.mkdir()
    for index in range(4):
        Image.fromarray(np.full((20, 20, 3), (60 * index, 0, 200), dtype=np.uint8)).save(folder / f"{index}.png")
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        Trainer(fine_tune_config(source, tmp_path / "out", "--train_data_dir", folder, "--train_batch_size", "2"))
    assert "the data: RGB, 20px (4 images inspected)" in caplog.text
    assert "these colour images are trained on in gray and its samples stay gray" in caplog.text


def test_fine_tuning_continues_a_trained_run_and_resumes_exactly(tmp_path):
    base = tmp_path / "base"
    run_training(base, "--resolution", "16", "--max_train_steps", "60", "--train_batch_size", "16",
                 "--learning_rate", "3e-3", "--lr_warmup_steps", "5", "--checkpointing_steps", "60")  # fmt: skip
    base_losses = [loss for _, loss in read_loss_history(base)]
    reset_accelerate()
    out = tmp_path / "tuned"
    options = ["--max_train_steps", "10", "--train_batch_size", "16", "--learning_rate", "1e-4", "--lr_warmup_steps",
               "0", "--checkpointing_steps", "5", "--seed", "1"]  # fmt: skip
    result = main([*FINE_TUNE, "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), *options])
    assert result.global_step == 10
    tuned_losses = [loss for _, loss in read_loss_history(out)]
    # it starts where the pretrained run ended, far below a new network's loss
    assert np.mean(tuned_losses) < 0.6 * np.mean(base_losses[:5])
    assert np.mean(tuned_losses) < 1.5 * np.mean(base_losses[-10:])
    # the schedule and target are the pretrained run's (cosine, ε), without being given again
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == json.loads(
        (base / "scheduler" / "scheduler_config.json").read_text()
    )
    recorded = TrainingConfig.load(out / "training_config.json")
    assert recorded.pretrained_model_name_or_path == str(base.resolve()) and recorded.beta_schedule is None
    finished = UNet2DModel.from_pretrained(out / "unet")
    # stock diffusers loads the result
    assert type(DDPMPipeline.from_pretrained(out).scheduler).__name__ == "DDPMScheduler"
    # resumed from step 5 (the pretrained weights are not loaded over the checkpoint's): the same weights
    shutil.rmtree(out / "checkpoint-10")  # as a crash between the two checkpoints leaves it: no final pipeline
    for name in ("unet", "model_index.json", "training_summary.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    reset_accelerate()
    main([*FINE_TUNE, "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), *options,
          "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert same_weights(UNet2DModel.from_pretrained(out / "unet"), finished)


def test_a_resumed_fine_tuning_run_must_name_the_same_pretrained_model(tmp_path):
    first = stock_pipeline_folder(tmp_path / "a")
    out = tmp_path / "out"
    main([*FINE_TUNE, "--pretrained_model_name_or_path", str(first), "--output_dir", str(out), "--max_train_steps", "2",
          "--train_batch_size", "8", "--checkpointing_steps", "1"])  # fmt: skip
    reset_accelerate()
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        Trainer(TrainingConfig.from_args([*TINY, "--resolution", "16", "--output_dir", str(out),
                                          "--resume_from_checkpoint", "latest"]))  # fmt: skip


#: The keys of google/ddpm-cat-256's configs (UNet from diffusers 0.0.4, scheduler from 0.1.1).
EARLY_UNET_KEYS = ("act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "down_block_types",
                   "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
                   "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels", "sample_size",
                   "time_embedding_type", "up_block_types")  # fmt: skip
EARLY_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                   "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                   "trained_betas": None, "variance_type": "fixed_small"}  # fmt: skip


def test_a_pipeline_saved_by_an_early_diffusers_version_fine_tunes(tmp_path):
    """The google/ddpm-* repos carry configs from diffusers 0.0.4/0.1.1: fewer keys, no prediction_type."""
    source = stock_pipeline_folder(tmp_path / "early")
    unet_config = json.loads((source / "unet" / "config.json").read_text())
    early = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "tensor_format": "pt",
             **{key: unet_config[key] for key in EARLY_UNET_KEYS}}  # fmt: skip
    (source / "unet" / "config.json").write_text(json.dumps(early))
    (source / "scheduler" / "scheduler_config.json").write_text(json.dumps(EARLY_SCHEDULER))
    trainer = Trainer(fine_tune_config(source, tmp_path / "out"))
    assert same_weights(trainer.accelerator.unwrap_model(trainer.unet), UNet2DModel.from_pretrained(source / "unet"))
    config = trainer.noise_scheduler.config
    assert (config.prediction_type, config.variance_type, trainer.noise_scheduler.schedule_name) == ("epsilon", "fixed_small", "linear")
    assert "tensor_format" not in trainer.unet_config  # a key today's UNet2DModel does not take


def test_a_bare_unet_folder_takes_its_schedule_from_the_options(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet-only")
    trainer = Trainer(fine_tune_config(tmp_path / "unet-only", tmp_path / "out", "--beta_schedule", "linear",
                                       "--prediction_type", "x0"))  # fmt: skip
    assert same_weights(trainer.accelerator.unwrap_model(trainer.unet), unet)
    assert trainer.noise_scheduler.schedule_name == "linear"
    assert trainer.noise_scheduler.config.prediction_type == "sample"
    assert trainer.noise_scheduler.config.variance_type == "fixed_small"  # the fresh-run default


def test_options_given_explicitly_replace_the_pretrained_scheduler_s(tmp_path, caplog):
    source = stock_pipeline_folder(tmp_path / "stock", beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pretrained = PretrainedDDPM.load(str(source))
    assert pretrained.noise_scheduler().schedule_name == "cosine"
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.pretrained"):
        scheduler = pretrained.noise_scheduler(prediction_type="x0", num_train_timesteps=500, variance_type="fixed_large")
    assert scheduler.config.prediction_type == "sample" and scheduler.config.variance_type == "fixed_large"
    assert scheduler.config.clip_sample is False  # options not given stay the pretrained scheduler's
    expected = DDPMTargetScheduler(num_train_timesteps=500, beta_schedule="cosine")
    assert torch.equal(scheduler.schedule.betas, expected.schedule.betas)  # T changed, the schedule's name kept
    assert "new noise schedule (cosine, T = 500)" in caplog.text and "to predict sample" in caplog.text
    # a linear schedule with T ≠ 1000 saved by stock diffusers (its own betas) cannot be stretched
    custom = stock_pipeline_folder(tmp_path / "custom", num_train_timesteps=200)
    with pytest.raises(ValueError, match="give --beta_schedule too"):
        PretrainedDDPM.load(str(custom)).noise_scheduler(num_train_timesteps=100)
    stock = DDPMScheduler(num_train_timesteps=200)
    kept = PretrainedDDPM.load(str(custom)).noise_scheduler()
    torch.testing.assert_close(kept.alphas_cumprod, stock.alphas_cumprod, rtol=1e-6, atol=0)


def test_a_mu_pipeline_which_names_this_package_s_scheduler_fine_tunes_as_mu(tmp_path):
    scheduler = DDPMTargetScheduler(prediction_type="mu", beta_schedule="cosine", num_train_timesteps=100)
    DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), scheduler).save_pretrained(tmp_path / "mu")
    assert json.loads((tmp_path / "mu" / "model_index.json").read_text())["scheduler"][0] == "ddpm_pipeline"
    tuned = PretrainedDDPM.load(str(tmp_path / "mu")).noise_scheduler()
    assert tuned.config.prediction_type == "mu" and tuned.config.num_train_timesteps == 100
    assert torch.equal(tuned.schedule.betas, scheduler.schedule.betas)


def test_a_hub_repo_id_loads_through_the_hub_cache(tmp_path):
    """The Hub code path, offline: a repo laid out in --cache_dir as huggingface_hub caches it."""
    source = stock_pipeline_folder(tmp_path / "stock", variance_type="fixed_large")
    hub_cache_repo(tmp_path / "cache", "someone/tiny-ddpm", source)
    config = fine_tune_config("someone/tiny-ddpm", tmp_path / "out", "--cache_dir", tmp_path / "cache")
    trainer = Trainer(config)
    assert trainer.config.pretrained_model_name_or_path == "someone/tiny-ddpm"  # a repo id stays one
    assert same_weights(trainer.accelerator.unwrap_model(trainer.unet), DDPMPipeline.from_pretrained(source).unet)
    assert trainer.noise_scheduler.config.variance_type == "fixed_large"
    with pytest.raises(FileNotFoundError, match="neither cached nor reachable"):
        PretrainedDDPM.load("someone/not-cached", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=re.escape("--pretrained_model_name_or_path 'my run' is not a folder, nor "
                                                          "a Hub repo id")):  # fmt: skip
        PretrainedDDPM.load("my run", cache_dir=str(tmp_path / "cache"))


def test_the_training_resolution_and_dropout_may_change(tmp_path):
    source = stock_pipeline_folder(tmp_path / "stock")
    trainer = Trainer(fine_tune_config(source, tmp_path / "out", "--resolution", "8", "--dropout", "0.1"))
    assert trainer.unet_config["sample_size"] == 8 and trainer.unet_config["dropout"] == 0.1
    assert trainer.data.images[0].shape == (1, 8, 8)
    assert same_weights(trainer.accelerator.unwrap_model(trainer.unet), DDPMPipeline.from_pretrained(source).unet)


def test_is_local_source():
    assert not is_local_source("google/ddpm-cifar10-32") and not is_local_source("cifar10-ddpm")
    assert is_local_source("./run") and is_local_source("/abs/run") and is_local_source("a/b/c")


def _ldm_like(path):
    stock_pipeline_folder(path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "vqvae": ["diffusers", "VQModel"]}))


def _class_conditional(path):
    DDPMPipeline(unet=tiny_unet(num_class_embeds=10), scheduler=DDPMScheduler()).save_pretrained(path)


def _odd_output(path):
    DDPMPipeline(unet=tiny_unet(out_channels=3), scheduler=DDPMScheduler()).save_pretrained(path)


def _score_sde(path):
    ScoreSdeVePipeline(unet=tiny_unet(), scheduler=ScoreSdeVeScheduler()).save_pretrained(path)


def _checkpoint(path):
    (path / "checkpoint-100").mkdir(parents=True)
    (path / "checkpoint-100" / "model.safetensors").write_bytes(b"x")
    return path / "checkpoint-100"


def _empty(path):
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (_ldm_like, ValueError, "unconditional pixel-space DDPM pipelines"),
        (_class_conditional, ValueError, "class-conditional"),
        (_odd_output, ValueError, "outputs 3 channels for 1 in"),
        (_score_sde, ValueError, "no β schedule"),
        (_checkpoint, ValueError, "is a training checkpoint: continue that run with --resume_from_checkpoint.* or "
                                  "from this step's, which `python -m ddpm_pipeline.export_checkpoint "),
        (_empty, FileNotFoundError, "holds neither model_index.json"),
        (lambda path: path / "missing", FileNotFoundError, "no such folder"),
    ],
)
def test_what_cannot_be_fine_tuned_is_refused_with_the_reason(tmp_path, make, error, message):
    path = make(tmp_path / "source") or tmp_path / "source"
    with pytest.raises(error, match=message):
        PretrainedDDPM.load(str(path))


def test_options_that_contradict_the_pretrained_network_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--model, --layers_per_block and --pretrained_model_name_or_path both define"):
        TrainingConfig(pretrained_model_name_or_path="someone/model", model="ddpm-tiny-16", layers_per_block=2)
    source = stock_pipeline_folder(tmp_path / "stock")
    with pytest.raises(ValueError, match="takes 1-channel images: drop --channels"):
        Trainer(fine_tune_config(source, tmp_path / "out", "--channels", "3"))
    short = stock_pipeline_folder(tmp_path / "short", num_train_timesteps=20)
    with pytest.raises(ValueError, match="--grid_inference_steps 50 exceeds the 20 diffusion steps"):
        Trainer(fine_tune_config(short, tmp_path / "out", "--grid_inference_steps", "50"))


def test_a_run_from_scratch_keeps_its_defaults():
    config = TrainingConfig()
    assert (config.prediction_type, config.beta_schedule) == ("epsilon", "cosine")  # the network: by the data
    assert (config.num_train_timesteps, config.variance_type) == (1000, "fixed_small")
    fine_tune = TrainingConfig(pretrained_model_name_or_path="someone/model")
    assert fine_tune.model is None and fine_tune.beta_schedule is None and fine_tune.num_train_timesteps is None
