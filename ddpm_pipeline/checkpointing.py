"""Resumable checkpoints: written atomically, found again by step, pruned to a limit.

A checkpoint is a folder ``checkpoint-<step>`` holding Accelerate's ``save_state`` (weights,
optimizer, learning-rate schedule, EMA, random states) and ``trainer_state.json``. It is written
under a temporary name and renamed into place only once complete, so a crash mid-write never
leaves a folder that looks like a checkpoint. ``trainer_state.json`` records the size of every
other file (:data:`FILE_SIZES_KEY`), so that a checkpoint damaged afterwards (a copy cut short, a
disk error) is refused before a run resumes from it, naming the file, rather than failing inside
Accelerate, or resuming without its random states, which Accelerate skips when it cannot read them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .atomic import (
    atomic_path,
    delete_atomically,
    flush_folder_entries,
    flush_to_disk,
    move_into_place,
    temporary_sibling,
)
from .json_files import UnreadableJSON, read_json_object
from .run_records import SNAPSHOT_SUMMARY_NAME, TRAINING_SUMMARY_NAME

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
#: The key of ``trainer_state.json`` that records the size in bytes of each of the checkpoint's
#: other files, by its path in the checkpoint (absent from checkpoints of earlier versions).
FILE_SIZES_KEY = "file_sizes"
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


class UnreadableTrainerState(ValueError):
    """A checkpoint's ``trainer_state.json`` is not a JSON object: emptied or cut short (a power cut
    before its data reached the disk, a copy cut short), or overwritten. ``damage`` says how."""

    def __init__(self, checkpoint: str | Path, damage: str):
        super().__init__(damaged_checkpoint_message(checkpoint, damage))
        self.damage = damage


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (``global_step``, ``training_config``…); an
    :class:`UnreadableTrainerState` when it is not a JSON object."""
    try:
        return read_json_object(Path(checkpoint) / TRAINER_STATE_NAME)
    except UnreadableJSON as error:
        raise UnreadableTrainerState(checkpoint, f"{TRAINER_STATE_NAME} {error.problem}") from error


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
    state) fills a temporary folder; the main process then adds ``trainer_state.json`` last, flushes
    the folder to the disk (:func:`~ddpm_pipeline.atomic.flush_to_disk`) and renames it into place.
    An older checkpoint of the same step is replaced. When the write or the flush fails with an
    `OSError` (a full disk), the partial folder is deleted and the error names the last complete
    checkpoint to resume from.
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
        wait_for_everyone()
        if is_main_process:
            trainer_state = {**trainer_state, FILE_SIZES_KEY: file_sizes(temporary)}
            with atomic_path(temporary / TRAINER_STATE_NAME) as partial:
                partial.write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
            flush_to_disk(temporary)  # on the disk before it is named: a power cut cannot leave it named but empty
    except OSError as error:  # a full disk or quota, a lost mount: free what was written, say what is safe
        if is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise disk_write_error(output_dir, final.name, error) from error
    if is_main_process:
        move_into_place(temporary, final)
        flush_folder_entries(output_dir)  # the rename itself, before older checkpoints are pruned
    wait_for_everyone()
    return final


def disk_write_error(output_dir: str | Path, what: str, error: OSError) -> OSError:
    """``error`` (a full disk or quota, a lost mount) met writing ``what`` (a checkpoint, the
    pipeline, a snapshot) into a run's ``output_dir``, whose partial copy is gone, as an error with
    the same ``errno`` that names what is safe and the way on: the last complete checkpoint, from
    which ``--resume_from_checkpoint latest`` goes on (at the run's last step, writing the pipeline)."""
    checkpoints = list_checkpoints(output_dir)
    safe = (f"The last complete checkpoint is {checkpoints[-1]}" if checkpoints else
            "No checkpoint was written yet (the run starts again from step 0)")  # fmt: skip
    return OSError(
        error.errno,
        f"Could not write {what} in {output_dir} ({error.strerror or error}); its partial copy was removed. "
        f"{safe}: free disk space (or pass another --output_dir with the run copied there) and run the same "
        "command with --resume_from_checkpoint latest, which goes on from there (at the run's last step, it writes "
        "the pipeline).",
    )


def file_sizes(folder: Path) -> dict[str, int]:
    """The size in bytes of each file in ``folder`` and its subfolders but ``trainer_state.json``,
    by its path relative to ``folder``."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != TRAINER_STATE_NAME
    }


def damaged_files(checkpoint: str | Path) -> list[str]:
    """What differs from the file sizes ``checkpoint`` recorded when it was written (its
    ``trainer_state.json``'s :data:`FILE_SIZES_KEY`): each file missing (``"optimizer.bin is
    missing"``) or of another size (``"model.safetensors has 2,048 bytes, not the 4,096 it was
    written with"``), or its ``trainer_state.json`` that cannot be read; ``[]`` when all agree, or
    for a checkpoint that recorded none."""
    checkpoint = Path(checkpoint)
    try:
        recorded = read_trainer_state(checkpoint).get(FILE_SIZES_KEY) or {}
    except UnreadableTrainerState as error:
        return [error.damage]
    problems = []
    for name, size in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{name} has {actual:,} bytes, not the {size:,} it was written with")
    return problems


#: What reading a damaged file raises: torch.load's RuntimeError says "PytorchStreamReader failed
#: reading zip archive", the others are read errors by their type alone.
UNREADABLE_FILE_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError)


def unreadable_file_damage(error: BaseException) -> str | None:
    """``"SafetensorError: Error while deserializing header"``: the type and first sentence of an
    error that reading a damaged file raised (:data:`UNREADABLE_FILE_ERRORS`); None for others."""
    if not isinstance(error, UNREADABLE_FILE_ERRORS):
        return None
    text = str(error).splitlines()[0] if str(error) else "no details"
    if isinstance(error, RuntimeError) and "PytorchStreamReader" not in text:
        return None
    first_sentence = re.split(r"(?<=[.!])\s", text, maxsplit=1)[0].rstrip(".")
    return f"{type(error).__name__}: {first_sentence}"


@contextmanager
def naming_damage(checkpoint: str | Path, advice: str) -> Iterator[None]:
    """Reading ``checkpoint`` within: an error that a damaged file of it raises
    (:func:`unreadable_file_damage`) becomes a ValueError naming the checkpoint and the damage,
    followed by ``advice`` (what to do instead); other errors pass as they are."""
    try:
        yield
    except UNREADABLE_FILE_ERRORS as error:
        damage = unreadable_file_damage(error)
        if damage is None:
            raise
        raise ValueError(f"{damaged_checkpoint_message(checkpoint, damage)} {advice}") from error


def damaged_checkpoint_message(checkpoint: str | Path, damage: str) -> str:
    """``"Checkpoint … is damaged (damage): …"``, to which the caller adds what to do instead."""
    return f"Checkpoint {checkpoint} is damaged ({damage}): a copy cut short, a full disk or a disk error."


def earlier_checkpoint(checkpoint: str | Path) -> Path | None:
    """The complete checkpoint before ``checkpoint`` in its folder, or None."""
    step = checkpoint_step(checkpoint)
    earlier = [path for path in list_checkpoints(Path(checkpoint).parent) if step is None or checkpoint_step(path) < step]
    return earlier[-1] if earlier else None


def resume_elsewhere_advice(checkpoint: str | Path, output_dir: str | Path) -> str:
    """How a run into ``output_dir`` resumes when ``checkpoint`` cannot be read: from the checkpoint
    before it (in its own folder, deleting the outputs past it; another run's, as a branch), or
    from a copy."""
    earlier = earlier_checkpoint(checkpoint)
    if earlier is None:
        return "No earlier checkpoint is there: restore the folder from a copy, or start again with --overwrite_output_dir."
    if earlier.parent.resolve() != Path(output_dir).resolve():  # a branch of another run: nothing to delete
        return f"Resume from the checkpoint before it, --resume_from_checkpoint {earlier}, or restore the folder from a copy."
    return (f"Resume from the checkpoint before it, --resume_from_checkpoint {earlier.name} --overwrite_output_dir "
            f"(which deletes what the run wrote after step {checkpoint_step(earlier)}, this checkpoint with it), or "
            "restore the folder from a copy.")  # fmt: skip


def check_checkpoint_intact(checkpoint: str | Path, output_dir: str | Path) -> None:
    """Raise a ValueError naming each file of ``checkpoint`` that is missing or not the size it was
    written at (:func:`damaged_files`), and the checkpoint to resume from instead."""
    problems = damaged_files(checkpoint)
    if problems:
        raise ValueError(f"{damaged_checkpoint_message(checkpoint, '; '.join(problems))} "
                         f"{resume_elsewhere_advice(checkpoint, output_dir)}")  # fmt: skip


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; return what was deleted."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in doomed:
        delete_atomically(path)
    return doomed


def outputs_past(output_dir: Path, step: int) -> list[Path]:
    """What a run left in ``output_dir`` past optimizer step ``step`` (0: everything), which a run
    going on from ``step`` there would mix with its own: checkpoints (``--resume_from_checkpoint
    latest`` would pick the newest), ``snapshot-*`` pipelines (not written again, and scored by
    ``eval_metrics.py --snapshots``) and a finished pipeline trained past it (by its
    ``training_summary.json``)."""
    later = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) > step]
    for record in sorted(output_dir.glob(f"snapshot-*/{SNAPSHOT_SUMMARY_NAME}")):
        if _recorded_step(record) > step:
            later.append(record.parent)
    summary = output_dir / TRAINING_SUMMARY_NAME
    if summary.is_file() and _recorded_step(summary) > step:
        later.append(summary)
    return later


def _recorded_step(summary: Path) -> int:
    """The ``global_step`` of a run summary (``training_summary.json``, ``snapshot.json``); one that
    cannot be read counts as past any step."""
    try:
        return int(json.loads(summary.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 62


def check_start(output_dir: Path, checkpoint: Path | None, overwrite: bool, resume_latest: bool,
                is_main_process: bool) -> tuple[int, list[Path]]:  # fmt: skip
    """Check what ``output_dir`` holds past the step a run starts at there: 0 when it starts afresh
    (``checkpoint`` None) or branches from another folder's checkpoint, the checkpoint's step when it
    resumes one of this folder's (:func:`outputs_past`).

    * Resuming this folder's newest checkpoint: snapshots past it are this run's own, taken before
      it stopped; nothing to do.
    * Snapshots alone (no checkpoint, no finished pipeline) with ``resume_latest``
      (``--resume_from_checkpoint latest`` found no checkpoint): an attempt stopped before its first
      checkpoint left them; they are deleted, and this run writes them again.
    * Anything else past the start — another run's outputs, or checkpoints and a finished pipeline
      past an older checkpoint resumed (an abandoned continuation) — would mix with this run's: it is
      refused, naming the choices, or with ``overwrite`` (``--overwrite_output_dir``) deleted.

    Deletions are made by the main process and logged. Returns the step the run starts at and what
    is to go past it (the caller deletes the rest of it: the pipeline whose summary is among them,
    later grids, records)."""
    in_place = checkpoint is not None and checkpoint.parent.resolve() == output_dir.resolve()
    step = checkpoint_step(checkpoint) if in_place else 0
    later = outputs_past(output_dir, step)
    abandoned = [path for path in later if checkpoint_step(path) is not None or path.name == TRAINING_SUMMARY_NAME]
    if not later or (in_place and not abandoned):  # snapshots past the newest checkpoint: this run's, before it stopped
        return step, []
    names = ", ".join("a finished pipeline" if path.name == TRAINING_SUMMARY_NAME else path.name for path in later)
    if checkpoint is None and resume_latest and not abandoned:
        why = "left by an attempt that stopped before its first checkpoint (this run writes them again)"
    elif overwrite:
        why = "--overwrite_output_dir"
    elif in_place:
        raise ValueError(
            f"{output_dir} holds outputs past step {step} ({names}), of the run that went on from {checkpoint.name} "
            f"before: resuming {checkpoint.name} here would mix them with this run's. Branch into another folder "
            f"(--resume_from_checkpoint {checkpoint} --output_dir NEW_FOLDER), or pass --overwrite_output_dir to delete "
            f"them and go on from step {step} here."
        )
    else:
        raise ValueError(
            f"{output_dir} holds an earlier run ({names}), and a run started afresh there would mix with it (its newest "
            "checkpoint would be this run's --resume_from_checkpoint latest). Pass --resume_from_checkpoint latest to "
            "continue it (with a larger --max_train_steps to train it further), another --output_dir for a new run, or "
            "--overwrite_output_dir to delete its outputs and start afresh."
        )
    if is_main_process:
        logger.warning(f"deleting {names} in {output_dir}: {why}")
        for path in later:
            delete_atomically(path)
    return step, later
