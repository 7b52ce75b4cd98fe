"""Checks made before any work: a run that cannot finish should say so at start-up, not after an hour.

Each raises an error that names the problem and the fix.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from .checkpointing import TRAINER_STATE_NAME, read_trainer_state
from .json_files import read_json_object
from .option_values import is_learned_variance, model_output_channels
from .run_outputs import snapshot_name
from .run_records import SNAPSHOT_SUMMARY_NAME, TRAINING_SUMMARY_NAME
from .training_config import CONFIG_FILE_NAME
from .unet_presets import downsampling_factor, nearest_trainable_size, sample_height_width

#: Bytes one checkpoint holds per parameter: fp32 weights, EMA weights, AdamW's two moments.
CHECKPOINT_BYTES_PER_PARAMETER = 16
#: Room for grids, logs, the loss history and file-system overhead.
OUTPUT_SLACK_BYTES = 64 * 2**20


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and prove it writable by writing and deleting a probe file;
    a file at its name (or at a folder's it would be in) is named as such."""
    folder = Path(output_dir)
    taken = next((path for path in (folder, *folder.parents) if path.exists() or path.is_symlink()), None)
    if taken is not None and not taken.is_dir():
        where = "" if taken == folder else f" ({taken}, a folder it would be in, is a file)"
        raise FileExistsError(f"--output_dir {folder} is not a folder{where}: name a folder (a new one is created).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"--output_dir {folder} is not writable ({error.strerror or error}): pick a folder you can write to, "
            "or fix its permissions."
        ) from error
    return folder


def run_output_bytes(num_parameters: int, checkpoints_kept: int | None, snapshots: int = 0) -> int:
    """Disk a run needs at its peak: ``(kept + 1)`` checkpoints (one more while the next is written
    before the oldest is pruned) of 16 bytes per parameter, the saved fp32 pipeline and each
    snapshot pipeline (4 bytes per parameter), and slack."""
    kept = 1 if checkpoints_kept is None else checkpoints_kept  # unlimited: checked for the first ones
    pipelines = 1 + snapshots
    return (kept + 1) * CHECKPOINT_BYTES_PER_PARAMETER * num_parameters + 4 * pipelines * num_parameters + OUTPUT_SLACK_BYTES


def check_free_space(output_dir: str | Path, needed_bytes: int) -> None:
    """Raise when the file system of ``output_dir`` has less free space than ``needed_bytes``."""
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OSError(
            f"--output_dir {output_dir} has {free / 2**20:.0f} MiB free, but this run's checkpoints and pipeline "
            f"need about {needed_bytes / 2**20:.0f} MiB: free some space, choose another --output_dir, or keep "
            "fewer checkpoints (--checkpoints_total_limit)."
        )


def check_unet_config(config: dict[str, Any], variance_type: str = "fixed_small", fine_tuning: bool = False) -> None:
    """The network can be built and trained on its images: as many output channels as the variance
    type needs (:func:`~ddpm_pipeline.schedules.model_output_channels`: the input's, or twice them for
    a learned variance), one channel count per level of blocks, a resolution the down-sampling path
    divides, channel counts its GroupNorm groups divide."""
    problems = []
    levels = len(config["block_out_channels"])
    down, up = list(config.get("down_block_types") or ()), list(config.get("up_block_types") or ())
    if down and up and (len(down) != levels or len(up) != levels):  # raised alone: the checks below count on the levels
        example = " ".join(str(config["block_out_channels"][min(i, levels - 1)]) for i in range(len(down)))
        raise ValueError(
            f"The UNet configuration cannot train:\n  block_out_channels {config['block_out_channels']} gives {levels} "
            f"level(s), but the network has {len(down)} down blocks ({', '.join(down)}) and {len(up)} up blocks: give one "
            f"channel count per level (--block_out_channels {example}), or blocks to match with --unet_overrides "
            "'{\"down_block_types\": [...], \"up_block_types\": [...]}'."
        )
    factor = downsampling_factor(config)
    size = config["sample_size"]
    sizes = sample_height_width(size)
    if any(s % factor for s in sizes):
        nearest = sorted({nearest_trainable_size(s, factor) for s in sizes})
        problems.append(
            f"resolution {size} is not divisible by {factor}, the UNet's down-sampling over {levels} levels: "
            f"use --resolution {nearest[0]} (or a multiple of {factor})."
        )
    expected = model_output_channels(config["in_channels"], variance_type)
    if config["out_channels"] != expected:
        learned = is_learned_variance(variance_type)
        needs = "its prediction and then its variance, 2 × in_channels" if learned else "a tensor shaped like its input"
        if fine_tuning:
            fix = (
                "fine-tuning keeps the pretrained output layer, so keep its variance type: drop --variance_type"
            )
        elif learned:
            fix = "drop out_channels from --unet_overrides (it is set from the variance type)"
        else:
            fix = "set both with --channels, or use --variance_type learned_range for a network with twice the output channels"
        problems.append(
            f"the network has in_channels {config['in_channels']} and out_channels {config['out_channels']}, but with "
            f"variance_type {variance_type} a DDPM outputs {needs} ({expected}): {fix}."
        )
    groups = config.get("norm_num_groups", 32)
    bad = [c for c in config["block_out_channels"] if c % groups]
    if bad:
        problems.append(f"block_out_channels {bad} are not divisible by norm_num_groups {groups}: change one of them.")
    if problems:
        raise ValueError("The UNet configuration cannot train:\n  " + "\n  ".join(problems))


def refuse_pipeline_folder(folder: str | Path, option: str, harm: str) -> None:
    """Raise when ``folder``, given as ``option``, holds a pipeline (``model_index.json``): samples
    written there would do ``harm`` and mix with the files a push uploads. The error suggests a
    sibling folder of their own."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        resolved = folder.resolve()
        raise ValueError(
            f"{option} {folder} holds a pipeline (model_index.json): the samples would {harm}mix with the files a "
            f"push uploads. Give them a folder of their own, e.g. {option} {resolved.with_name(resolved.name + '-samples')}."
        )


def check_pipeline_folder(folder: str | Path) -> None:
    """A saved pipeline folder has its index, a UNet (config and weights) and a scheduler, and
    they agree, and the run's records beside them (read when the reports are written, after the
    sampling) can be read; raise naming what is missing, mismatched or unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give a train_ddpm.py --output_dir or a save_pretrained folder.")
    missing = [name for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json")
               if not (folder / name).is_file()]  # fmt: skip
    weights = list((folder / "unet").glob("diffusion_pytorch_model*.safetensors")) + list(
        (folder / "unet").glob("diffusion_pytorch_model*.bin")
    )
    if not weights and (folder / "unet").is_dir():
        missing.append("unet/diffusion_pytorch_model.safetensors")
    if missing:
        if (folder / TRAINER_STATE_NAME).is_file():
            step = read_trainer_state(folder).get("global_step", 0)
            raise ValueError(
                f"{folder} is a training checkpoint, not a pipeline: `python -m ddpm_pipeline.export_checkpoint {folder}` "
                f"writes its pipeline, as {folder.parent / snapshot_name(step, 'steps')}."
            )
        if folder.name in ("unet", "scheduler") and (folder.parent / "model_index.json").is_file():
            raise ValueError(f"{folder} is a part of the pipeline in {folder.parent}: give that folder.")
        raise FileNotFoundError(
            f"{folder} is not a complete pipeline folder: missing {', '.join(missing)}. Point to a finished "
            "train_ddpm.py --output_dir (an interrupted run can be finished with --resume_from_checkpoint latest, "
            "or a checkpoint-N of it exported with `python -m ddpm_pipeline.export_checkpoint`)."
        )
    index = read_json_object(folder / "model_index.json")
    for part in ("unet", "scheduler"):
        if part not in index:
            raise ValueError(f"{folder}/model_index.json lists no {part!r}: it is not a DDPM pipeline folder.")
    unet = read_json_object(folder / "unet" / "config.json")
    variance_type = read_json_object(folder / "scheduler" / "scheduler_config.json").get("variance_type", "fixed_small")
    expected = model_output_channels(unet.get("in_channels", 0), variance_type)
    if unet.get("out_channels") != expected:
        raise ValueError(
            f"{folder}/unet predicts {unet.get('out_channels')} channels from {unet.get('in_channels')}, but its scheduler's "
            f"variance_type {variance_type!r} needs {expected}: a DDPM UNet outputs a tensor shaped like its input, "
            "or that and its variance (twice the channels) with variance_type 'learned_range'."
        )
    for record in (CONFIG_FILE_NAME, TRAINING_SUMMARY_NAME, SNAPSHOT_SUMMARY_NAME):
        if (folder / record).is_file():
            read_json_object(folder / record)
