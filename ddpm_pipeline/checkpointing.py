"""Resumable checkpoints: written atomically, found again by step, pruned to a limit.

A checkpoint is a folder ``checkpoint-<step>`` holding Accelerate's ``save_state`` (weights,
optimizer, learning-rate schedule, EMA, random states) and ``trainer_state.json``. It is written
under a temporary name and renamed into place only once complete, so a crash mid-write never
leaves a folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import atomic_path, delete_atomically, move_into_place, temporary_sibling
from .run_records import SNAPSHOT_SUMMARY_NAME, TRAINING_SUMMARY_NAME

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a folder named ``checkpoint-<step>``, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (smallest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.is_dir() and checkpoint_step(path) is not None and (path / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names.

    ``None`` → none; ``"latest"`` → the newest complete one in ``output_dir`` (None when there is
    none yet, so a first run and its restarts share one command); otherwise a path, which must be
    a complete checkpoint: as given, or else in ``output_dir`` (``checkpoint-1500``, as diffusers'
    training examples take it).
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and not path.is_absolute() and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path
    if not path.is_dir():
        there = [checkpoint.name for checkpoint in list_checkpoints(output_dir)]
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a folder, here or in --output_dir {output_dir}"
            + (f" (which holds {', '.join(there)})" if there else "")
            + ": give a checkpoint-N folder from an earlier run's --output_dir, or 'latest'."
        )
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"{path} has no {TRAINER_STATE_NAME}: it is not a complete checkpoint (an interrupted write "
            f"leaves only a .tmp folder). Give another checkpoint-N folder or 'latest'."
        )
    return path


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (``global_step``, ``training_config``…)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    save_state: Callable[[Path], None],
    trainer_state: dict[str, Any],
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and return its path.

    ``save_state(folder)`` (every process calls it: Accelerate writes each process's random
    state) fills a temporary folder; the main process then adds ``trainer_state.json`` last and
    renames the folder into place. An older checkpoint of the same step is replaced. When the
    write fails with an `OSError` (a full disk), the partial folder is deleted and the error names
    the last complete checkpoint to resume from.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = temporary_sibling(final)
    if is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    wait_for_everyone()
    try:
        save_state(temporary)
    except OSError as error:  # a full disk or quota, a lost mount: free what was written, say what is safe
        if is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        earlier = list_checkpoints(output_dir)
        raise OSError(
            error.errno,
            f"Could not write {final.name} in {output_dir} ({error.strerror or error}); its partial copy was removed. "
            f"The last complete checkpoint is {earlier[-1] if earlier else 'none'}: free disk space (or pass another "
            "--output_dir with the checkpoint copied there) and resume with --resume_from_checkpoint latest.",
        ) from error
    wait_for_everyone()
    if is_main_process:
        with atomic_path(temporary / TRAINER_STATE_NAME) as partial:
            partial.write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
        move_into_place(temporary, final)
    wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; return what was deleted."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in doomed:
        delete_atomically(path)
    return doomed


def earlier_run_outputs(output_dir: Path) -> list[Path]:
    """What an earlier run left in ``output_dir`` that a run started afresh there would mix with its
    own: its checkpoints (``--resume_from_checkpoint latest`` would pick its newest), its
    ``snapshot-*`` pipelines (not written again, and scored by ``eval_metrics.py --snapshots``) and,
    had it finished, its pipeline (marked by ``training_summary.json``)."""
    snapshots = sorted(path.parent for path in output_dir.glob(f"snapshot-*/{SNAPSHOT_SUMMARY_NAME}"))
    finished = [output_dir / TRAINING_SUMMARY_NAME] if (output_dir / TRAINING_SUMMARY_NAME).is_file() else []
    return [*list_checkpoints(output_dir), *snapshots, *finished]


def check_fresh_start(output_dir: Path, overwrite: bool, resume_latest: bool, is_main_process: bool) -> bool:
    """A run that starts at step 0 in ``output_dir``, where an earlier run left outputs
    (:func:`earlier_run_outputs`): refused, naming the choices; with ``overwrite``
    (``--overwrite_output_dir``) the main process deletes its checkpoints and snapshots instead, and
    says so. Snapshots alone (no checkpoint, no finished pipeline), found by
    ``--resume_from_checkpoint latest`` (``resume_latest``), were left by an attempt that stopped
    before its first checkpoint: they are deleted, since this run writes them again (a finished
    run's, its checkpoints deleted to save space, are not). Returns whether an earlier run's outputs
    are to go (the caller deletes the rest: its pipeline, grids and records)."""
    earlier = earlier_run_outputs(output_dir)
    if not earlier:
        return False
    names = ", ".join("a finished pipeline" if path.name == TRAINING_SUMMARY_NAME else path.name for path in earlier)
    if resume_latest and all(checkpoint_step(path) is None and path.name != TRAINING_SUMMARY_NAME for path in earlier):
        why = "left by an attempt that stopped before its first checkpoint (this run writes them again)"
    elif overwrite:
        why = "--overwrite_output_dir"
    else:
        raise ValueError(
            f"{output_dir} holds an earlier run ({names}), and a run started afresh there would mix with it (its newest "
            "checkpoint would be this run's --resume_from_checkpoint latest). Pass --resume_from_checkpoint latest to "
            "continue it (with a larger --max_train_steps to train it further), another --output_dir for a new run, or "
            "--overwrite_output_dir to delete its outputs and start afresh."
        )
    if is_main_process:
        logger.warning(f"deleting {names} in {output_dir}: {why}")
        for path in earlier:
            delete_atomically(path)
    return True
