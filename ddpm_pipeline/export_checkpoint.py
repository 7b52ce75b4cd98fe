"""A training checkpoint as a pipeline folder: the model a run had at one of its checkpoints, to
sample or score that step without training further (or after a run that never finished).

    python -m ddpm_pipeline.export_checkpoint outputs/ddpm-fashion-mnist/checkpoint-400

writes ``outputs/ddpm-fashion-mnist/snapshot-400steps``, the folder that ``train_ddpm.py
--snapshot_steps 400`` would have saved there: the EMA weights (a run without EMA: its trained
weights) and the noise scheduler as the run saves its pipeline, its ``training_config.json``, and
``snapshot.json`` (the run up to the checkpoint: steps, training time, data, recent loss and
held-out bound). ``sample_ddpm.py --model``, ``eval_metrics.py --model`` (``--snapshots`` scores it
with the run's other snapshots), ``python -m ddpm_pipeline.push`` and
``DDPMPipeline.from_pretrained`` take it. ``--output`` writes it elsewhere. The checkpoint is only
read: training can resume from it as before.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .atomic import atomic_path
from .checkpointing import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_NAME,
    damaged_checkpoint_message,
    damaged_files,
    earlier_checkpoint,
    list_checkpoints,
    naming_damage,
    read_trainer_state,
)
from .console import run_command
from .pipeline_ddpm_target import DDPMTargetPipeline
from .pretrained import PretrainedDDPM
from .run_outputs import LOSS_HISTORY_NAME, snapshot_name
from .run_records import SNAPSHOT_SUMMARY_NAME, SUMMARY_STEPS, LossHistory
from .scheduling_ddpm_target import DDPMTargetScheduler
from .training import build_scheduler, unet_config_for
from .training_config import CONFIG_FILE_NAME, TrainingConfig
from .unet import DDPMUNet

logger = logging.getLogger(__name__)

PROGRAM = "python -m ddpm_pipeline.export_checkpoint"
#: The network's weights in a checkpoint, as Accelerate's ``save_state`` names them (safetensors, else pickled).
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
#: What wrapping adds in front of the network's parameter names: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: The summary entries a checkpoint records as a snapshot's ``snapshot.json`` has them
#: (:meth:`~ddpm_pipeline.training.Trainer.run_progress`; an older checkpoint has some of them).
SUMMARY_KEYS = ("global_step", "epochs", "global_batch_size", "num_processes", "train_seconds", "device",
                "mixed_precision", "data", "held_out")  # fmt: skip


def read_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a ``checkpoint-N`` folder that ``train_ddpm.py`` wrote; an error
    naming what ``checkpoint`` is instead (a run folder: its checkpoints; a pipeline folder)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give a checkpoint-N folder of a train_ddpm.py --output_dir.")
    if not (folder / TRAINER_STATE_NAME).is_file():
        checkpoints = list_checkpoints(folder)
        if checkpoints:
            names = ", ".join(path.name for path in checkpoints)
            raise ValueError(f"{folder} is a run folder: give one of its checkpoints ({names}), e.g. {checkpoints[-1]}.")
        if (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} is a pipeline folder already: sample or score it as it is.")
        raise ValueError(
            f"{folder} is not a train_ddpm.py checkpoint (it has no {TRAINER_STATE_NAME}): give a "
            f"{CHECKPOINT_PREFIX}N folder of a run's --output_dir."
        )
    problems = damaged_files(folder)
    if problems:
        raise ValueError(f"{damaged_checkpoint_message(folder, '; '.join(problems))} {_export_elsewhere_advice(folder)}")
    state = read_trainer_state(folder)
    missing = [key for key in ("global_step", "training_config") if key not in state]
    if missing:
        raise ValueError(f"{folder / TRAINER_STATE_NAME} has no {' or '.join(missing)}: the checkpoint was written by "
                         "a version of ddpm_pipeline too early to export; resume the run from it to save a pipeline.")  # fmt: skip
    return state


def _export_elsewhere_advice(checkpoint: Path) -> str:
    """What to export when ``checkpoint`` is damaged: the checkpoint before it, or a copy of it."""
    earlier = earlier_checkpoint(checkpoint)
    if earlier is None:
        return "Restore the folder from a copy."
    return f"Export the checkpoint before it ({earlier}) instead, or restore the folder from a copy."


def checkpoint_configs(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's network options and noise-scheduler config: recorded in its
    ``trainer_state.json``, or, in a checkpoint written before they were, built from its options
    as the run built them (a fine-tuning run's from its pretrained model, which must be at hand)."""
    if "unet_config" in state and "scheduler_config" in state:
        return state["unet_config"], state["scheduler_config"]
    config = TrainingConfig.from_dict(state["training_config"])
    pretrained = None
    if config.pretrained_model_name_or_path is not None:
        pretrained = PretrainedDDPM.load(config.pretrained_model_name_or_path, config.revision, config.cache_dir)
    return unet_config_for(config, pretrained), build_scheduler(config, pretrained).config_options()


def read_network_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained weights in ``checkpoint`` (:data:`WEIGHTS_NAMES`), named as the bare network
    names them (without :data:`WRAPPER_PREFIXES`)."""
    path = next((checkpoint / name for name in WEIGHTS_NAMES if (checkpoint / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{checkpoint} holds no network weights ({' or '.join(WEIGHTS_NAMES)}): is it complete?")
    weights = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    bare = {}
    for name, tensor in weights.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        bare[name] = tensor
    return bare


def read_ema_weights(checkpoint: Path) -> list[torch.Tensor]:
    """The EMA weights in ``checkpoint``: the ``shadow_params`` of diffusers' `EMAModel` state, which
    Accelerate saves among the ``custom_checkpoint_<i>.pkl`` of the objects registered for
    checkpointing, in the order of the network's parameters."""
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "shadow_params" in state:
            return state["shadow_params"]
    raise FileNotFoundError(
        f"{checkpoint} holds no EMA weights (no custom_checkpoint_*.pkl with an EMAModel state), though its run "
        "trained with --use_ema: is the checkpoint complete?"
    )


def checkpoint_pipeline(checkpoint: str | Path, state: dict[str, Any] | None = None) -> DDPMTargetPipeline:
    """The pipeline of ``checkpoint`` (float32, on the CPU): the network built from its options,
    holding its EMA weights (:func:`read_ema_weights`; a run without EMA: its trained weights), with
    the run's noise scheduler, as the run saves its pipeline."""
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint) if state is None else state
    unet_config, scheduler_config = checkpoint_configs(state)
    unet = DDPMUNet(**unet_config)
    use_ema = state["training_config"].get("use_ema", True)
    # a file damaged within, or in a checkpoint written before they recorded their sizes, is named
    with naming_damage(checkpoint, _export_elsewhere_advice(checkpoint)):
        weights, shadow = read_network_weights(checkpoint), read_ema_weights(checkpoint) if use_ema else None
    unet.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    if shadow is not None:
        parameters = list(unet.parameters())
        if len(shadow) != len(parameters) or any(s.shape != p.shape for s, p in zip(shadow, parameters, strict=False)):
            raise ValueError(f"The EMA weights in {checkpoint} do not fit its network ({len(shadow)} tensors for "
                             f"{len(parameters)} parameters).")  # fmt: skip
        with torch.no_grad():
            for parameter, average in zip(parameters, shadow, strict=True):
                parameter.copy_(average)
    scheduler = DDPMTargetScheduler.from_config(scheduler_config)
    return DDPMTargetPipeline(unet=unet.eval(), scheduler=scheduler)


def checkpoint_summary(checkpoint: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """``snapshot.json`` of the run up to ``checkpoint``: what its ``trainer_state.json`` holds of
    :data:`SUMMARY_KEYS`, the loss averaged over its last :data:`SUMMARY_STEPS` steps (from the
    run's ``loss_history.csv``, where it still has the checkpoint's step) and where it came from."""
    checkpoint = Path(checkpoint)
    summary = {key: state[key] for key in SUMMARY_KEYS if key in state}
    history_path = checkpoint.parent / LOSS_HISTORY_NAME
    if history_path.is_file():
        history = LossHistory.read(history_path, up_to_step=state["global_step"])
        steps, _ = history.series("step")
        if steps and steps[-1] == state["global_step"]:
            summary["recent_loss"] = history.recent_loss(SUMMARY_STEPS)
    summary["exported_from"] = str(checkpoint.resolve())
    return summary


def export_checkpoint(checkpoint: str | Path, output: str | Path | None = None) -> Path:
    """Write ``checkpoint``'s pipeline (:func:`checkpoint_pipeline`), its options and
    :func:`checkpoint_summary` into ``output`` (default: ``snapshot-<N>steps`` beside the
    checkpoint), atomically and flushed to the disk; return the folder. An existing ``output`` is refused."""
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    step = state["global_step"]
    output = checkpoint.parent / snapshot_name(step, "steps") if output is None else Path(output)
    if output.exists() or output.is_symlink():
        what = "a snapshot of this step (the run's, or an export's)" if output.name == snapshot_name(step, "steps") else "it"
        raise FileExistsError(f"{output} exists already ({what}): pass another --output, or delete it to export again.")
    pipeline = checkpoint_pipeline(checkpoint, state)
    summary = checkpoint_summary(checkpoint, state)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, flush=True) as staging:
        pipeline.save_pretrained(staging)
        (staging / CONFIG_FILE_NAME).write_text(json.dumps(state["training_config"], indent=2, sort_keys=True) + "\n")
        (staging / SNAPSHOT_SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    weights = "EMA" if state["training_config"].get("use_ema", True) else "trained"
    logger.info(f"wrote {output}: the {weights} weights of {checkpoint} (step {step:,})")
    return output


def main(argv: list[str] | None = None) -> Path:
    """The ``python -m ddpm_pipeline.export_checkpoint`` command line."""
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-N folder of a train_ddpm.py --output_dir")
    parser.add_argument("--output", type=Path,
                        help="the pipeline folder to write (default: snapshot-<N>steps beside the checkpoint)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    output = export_checkpoint(args.checkpoint, args.output)
    print(output)
    return output


if __name__ == "__main__":
    run_command(main, PROGRAM)
