"""python -m ddpm_pipeline.export_checkpoint: a checkpoint's pipeline is the one its run saves at that step."""

import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import reset_accelerate
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from safetensors.torch import load_file, save_file
from test_finetune import FINE_TUNE, same_weights, tiny_unet
from test_training import run_training, saved_dataset

from ddpm_pipeline.checkpointing import FILE_SIZES_KEY, TRAINER_STATE_NAME, file_sizes, read_trainer_state
from ddpm_pipeline.export_checkpoint import SUMMARY_KEYS, export_checkpoint, main
from ddpm_pipeline.generation import SampleConfig, generate_samples
from ddpm_pipeline.preflight import check_pipeline_folder
from ddpm_pipeline.snapshot_scores import run_pipelines
from ddpm_pipeline.training import main as train_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PIPELINE_FILES = ("unet/config.json", "scheduler/scheduler_config.json", "model_index.json", "training_config.json")


def same_files(first, second, names=PIPELINE_FILES) -> bool:
    return all(json.loads((first / name).read_text()) == json.loads((second / name).read_text()) for name in names)


def old_checkpoint(checkpoint, copy):
    """``checkpoint`` as runs wrote it before checkpoints recorded the network and the scheduler."""
    shutil.copytree(checkpoint, copy)
    state = read_trainer_state(copy)
    for key in ("unet_config", "scheduler_config", "epochs", "device", "mixed_precision", "held_out", FILE_SIZES_KEY):
        state.pop(key, None)
    (copy / TRAINER_STATE_NAME).write_text(json.dumps(state))
    return copy


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run (checkpoints at steps 2 and 4, EMA decay 0.9, a held-out share measured at each
    checkpoint) and its finished pipeline."""
    reset_accelerate()
    root = tmp_path_factory.mktemp("export")
    out = root / "run"
    run_training(out, "--dataset_path", saved_dataset(root / "data", count=12, size=16), "--max_train_steps", 4,
                 "--train_batch_size", 4, "--checkpointing_steps", 2, "--save_images_steps", "none",
                 "--ema_max_decay", 0.9, "--validation_split", 4, "--validation_steps", 2,
                 "--validation_timesteps", 2)  # fmt: skip
    reset_accelerate()
    return out


def test_the_last_checkpoint_exports_to_the_pipeline_its_run_saved(finished_run, tmp_path):
    out = finished_run
    exported = export_checkpoint(out / "checkpoint-4", tmp_path / "step-4")
    assert same_weights(UNet2DModel.from_pretrained(exported / "unet"), UNet2DModel.from_pretrained(out / "unet"))
    assert same_files(exported, out)
    # its snapshot.json is the run's summary at that step: the same entries, the loss averaged from the CSV
    summary = json.loads((exported / "snapshot.json").read_text())
    finished = json.loads((out / "training_summary.json").read_text())
    assert {key: summary[key] for key in SUMMARY_KEYS} == {key: finished[key] for key in SUMMARY_KEYS}
    assert summary["held_out"]["step"] == 4 and summary["exported_from"] == str((out / "checkpoint-4").resolve())
    assert summary["recent_loss"].keys() == finished["recent_loss"].keys() and summary["recent_loss"]["steps"] == 4
    for column, value in finished["recent_loss"].items():
        assert summary["recent_loss"][column] == pytest.approx(value, rel=1e-5), column
    # the EMA weights, not the trained ones
    raw = load_file(out / "checkpoint-4" / "model.safetensors")
    saved = UNet2DModel.from_pretrained(exported / "unet").state_dict()
    assert sum(not torch.equal(saved[name], raw[name]) for name in raw) > len(raw) // 2


def test_an_earlier_checkpoint_becomes_a_snapshot_of_its_run_that_samples(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main([str(run / "checkpoint-2")]) == run / "snapshot-2steps"
    # eval_metrics.py --model RUN --snapshots scores it with the final pipeline
    assert [(pipeline.name, pipeline.step) for pipeline in run_pipelines(run)] == [("snapshot-2steps", 2), ("final", 4)]
    summary = json.loads((run / "snapshot-2steps" / "snapshot.json").read_text())
    assert summary["global_step"] == 2 and summary["recent_loss"]["steps"] == 2 and summary["held_out"]["step"] == 2
    pipeline = DDPMPipeline.from_pretrained(run / "snapshot-2steps")  # stock diffusers loads it
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 1)
    generate_samples(SampleConfig(model=str(run / "snapshot-2steps"), output_dir=str(tmp_path / "samples"), num_images=2,
                                  num_inference_steps=2, grid_images=0))  # fmt: skip
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 2
    # a second export of the step is refused, and nothing is written over the first
    written = (run / "snapshot-2steps" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="snapshot-2steps exists already .a snapshot of this step"):
        export_checkpoint(run / "checkpoint-2")
    assert (run / "snapshot-2steps" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == written
    # a checkpoint of a run before checkpoints recorded the network builds it from the options
    exported = export_checkpoint(old_checkpoint(run / "checkpoint-2", tmp_path / "old" / "checkpoint-2"), tmp_path / "o")
    assert same_files(exported, run / "snapshot-2steps")
    assert same_weights(UNet2DModel.from_pretrained(exported / "unet"), pipeline.unet)


def test_wrapped_weight_names_and_a_run_without_ema(tmp_path):
    out = tmp_path / "run"
    run_training(out, "--max_train_steps", 2, "--train_batch_size", 4, "--split", "train[:8]", "--save_images_steps",
                 "none", "--no-use_ema", "--checkpointing_steps", 2)  # fmt: skip
    checkpoint = out / "checkpoint-2"
    exported = export_checkpoint(checkpoint, tmp_path / "plain")
    assert same_weights(UNet2DModel.from_pretrained(exported / "unet"), UNet2DModel.from_pretrained(out / "unet"))
    # the names a DistributedDataParallel or compiled network gives its weights in the checkpoint
    weights = load_file(checkpoint / "model.safetensors")
    save_file({f"module._orig_mod.{name}": tensor for name, tensor in weights.items()}, checkpoint / "model.safetensors")
    state = read_trainer_state(checkpoint)  # as such a run records its files
    (checkpoint / TRAINER_STATE_NAME).write_text(json.dumps({**state, FILE_SIZES_KEY: file_sizes(checkpoint)}))
    wrapped = export_checkpoint(checkpoint, tmp_path / "wrapped")
    assert same_weights(UNet2DModel.from_pretrained(wrapped / "unet"), UNet2DModel.from_pretrained(out / "unet"))


def test_an_old_checkpoint_of_a_fine_tuning_run_rebuilds_the_pretrained_network_and_schedule(tmp_path):
    source = tmp_path / "stock"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="linear", variance_type="fixed_large")).save_pretrained(source)
    out = tmp_path / "tuned"
    train_main([*FINE_TUNE, "--pretrained_model_name_or_path", str(source), "--output_dir", str(out), "--max_train_steps",
                "2", "--train_batch_size", "4", "--split", "train[:8]", "--save_images_steps", "none"])  # fmt: skip
    exported = export_checkpoint(old_checkpoint(out / "checkpoint-2", tmp_path / "old" / "checkpoint-2"), tmp_path / "o")
    assert same_files(exported, out)
    assert same_weights(UNet2DModel.from_pretrained(exported / "unet"), UNet2DModel.from_pretrained(out / "unet"))


def test_what_is_not_a_checkpoint_is_named(finished_run, tmp_path):
    out = finished_run
    with pytest.raises(ValueError, match=f"{out} is a run folder: give one of its checkpoints .checkpoint-2, checkpoint-4."):
        export_checkpoint(out)
    with pytest.raises(ValueError, match="is a pipeline folder already: sample or score it as it is"):
        export_checkpoint(export_checkpoint(out / "checkpoint-4", tmp_path / "exported"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is not a train_ddpm.py checkpoint .it has no trainer_state.json"):
        export_checkpoint(empty)
    (empty / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(ValueError, match="trainer_state.json has no training_config: the checkpoint was written by a version"):
        export_checkpoint(empty)
    # where a pipeline is wanted, a checkpoint or a part of a pipeline names what to give instead
    with pytest.raises(ValueError, match=r"is a training checkpoint, not a pipeline: `python -m ddpm_pipeline.export_checkpoint .*checkpoint-2` writes its pipeline, as .*snapshot-2steps"):
        check_pipeline_folder(out / "checkpoint-2")
    with pytest.raises(ValueError, match=f"is a part of the pipeline in {out}: give that folder"):
        check_pipeline_folder(out / "unet")


def test_a_pipeline_whose_weights_are_damaged_names_the_checkpoint_that_gives_them_back(finished_run, tmp_path):
    """The finished pipeline's weights cut short (a power cut after the run, a copy): sampling it
    names the export of the run's last checkpoint, which writes the same model again."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    options = SampleConfig(model=str(run), output_dir=str(tmp_path / "samples"), num_images=2, num_inference_steps=2,
                           device="cpu")  # fmt: skip
    with pytest.raises(ValueError) as refused:
        generate_samples(options)
    assert str(refused.value).startswith(f"The weights of {run} cannot be read, cut short or damaged (Unable to load weights")
    assert str(refused.value).endswith(f"`python -m ddpm_pipeline.export_checkpoint {run / 'checkpoint-4'}` writes the model "
                                       f"of its last checkpoint, as {run / 'snapshot-4steps'}; or restore the folder from a copy.")  # fmt: skip
    main([str(run / "checkpoint-4")])  # the advice, then the model it gives back is the run's own
    assert same_weights(UNet2DModel.from_pretrained(run / "snapshot-4steps" / "unet"),
                        UNet2DModel.from_pretrained(finished_run / "unet"))  # fmt: skip
    assert generate_samples(replace(options, model=str(run / "snapshot-4steps")))["num_images"] == 2


def test_a_damaged_checkpoint_is_named_with_the_one_before_it(finished_run, tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(finished_run / name, run / name)
    ema = run / "checkpoint-4" / "custom_checkpoint_1.pkl"
    assert "shadow_params" in torch.load(ema, weights_only=True)  # the EMA's state, which the export reads
    ema.write_bytes(ema.read_bytes()[:500])
    with pytest.raises(ValueError) as refused:
        export_checkpoint(run / "checkpoint-4")
    assert str(refused.value).startswith(f"Checkpoint {run / 'checkpoint-4'} is damaged (custom_checkpoint_1.pkl has 500 bytes, not the ")
    assert str(refused.value).endswith(f"Export the checkpoint before it ({run / 'checkpoint-2'}) instead, or restore the folder "
                                       "from a copy.")  # fmt: skip
    state_text = (run / "checkpoint-4" / TRAINER_STATE_NAME).read_text()
    (run / "checkpoint-4" / TRAINER_STATE_NAME).write_text('{"global_step": 4, "training_con')  # cut short
    with pytest.raises(ValueError, match=re.escape("(trainer_state.json is not valid JSON (")) as refused:
        export_checkpoint(run / "checkpoint-4")
    assert str(refused.value).endswith(f"Export the checkpoint before it ({run / 'checkpoint-2'}) instead, or restore the folder "
                                       "from a copy.")  # fmt: skip
    (run / "checkpoint-4" / TRAINER_STATE_NAME).write_text(state_text)
    old = old_checkpoint(run / "checkpoint-4", run / "checkpoint-6")  # no sizes recorded: the read fails, and is named
    with pytest.raises(ValueError, match=re.escape(f"Checkpoint {old} is damaged (RuntimeError: PytorchStreamReader failed "
                                                   "reading zip archive: failed finding central directory)")):  # fmt: skip
        export_checkpoint(old)
    assert not list(run.glob("snapshot-*"))


def test_a_mu_model_with_a_learned_variance_exports_with_this_package_s_scheduler(tmp_path):
    out = tmp_path / "run"
    run_training(out, "--max_train_steps", 2, "--train_batch_size", 4, "--split", "train[:8]", "--save_images_steps",
                 "none", "--prediction_type", "mu", "--variance_type", "learned_range")  # fmt: skip
    exported = export_checkpoint(out / "checkpoint-2", tmp_path / "mu")
    assert same_files(exported, out)
    assert same_weights(UNet2DModel.from_pretrained(exported / "unet"), UNet2DModel.from_pretrained(out / "unet"))
    pipeline = DiffusionPipeline.from_pretrained(exported)
    assert type(pipeline.scheduler).__name__ == "DDPMTargetScheduler" and pipeline.scheduler.config.prediction_type == "mu"
