"""The files a training run writes in its ``--output_dir``, by name: one place for the trainer that
writes them, the model card that shows them and the run that clears them when it replaces them.

Beside these, the folder holds the pipeline (``model_index.json``, ``unet/``, ``scheduler/``),
``training_config.json`` (:data:`~ddpm_pipeline.training_config.CONFIG_FILE_NAME`), the run's
summary (:data:`~ddpm_pipeline.run_records.TRAINING_SUMMARY_NAME`), ``checkpoint-N/`` folders
(:mod:`~ddpm_pipeline.checkpointing`) and the trackers' logs.
"""

from __future__ import annotations

from pathlib import Path

from .checkpointing import TRAINER_STATE_NAME
from .run_records import TRAINING_SUMMARY_NAME

LOSS_HISTORY_NAME = "loss_history.csv"
LOSS_CURVE_NAME = "loss_curve.png"
#: With --validation_split: the bound on held-out and on training images, per measured step, and its plot.
VALIDATION_HISTORY_NAME = "validation_history.csv"
VALIDATION_CURVE_NAME = "validation_curve.png"
#: The finished run's grid of EMA samples, and its sampling chain.
SAMPLES_NAME = "samples.png"
TRAJECTORY_NAME = "trajectory.png"
#: The grids of --save_images_steps (and the final one): ``samples/step_0000400.png``.
GRID_FOLDER = "samples"
GRID_PREFIX = "step_"
#: The finished pipeline's files (its scores, eval_results.json and what lies beside it, are
#: :func:`~ddpm_pipeline.model_card.eval_outputs`).
PIPELINE_OUTPUTS = ("model_index.json", "unet", "scheduler", TRAINING_SUMMARY_NAME, SAMPLES_NAME, TRAJECTORY_NAME,
                    LOSS_CURVE_NAME, VALIDATION_CURVE_NAME)  # fmt: skip
#: The file that marks each kind of model folder a run writes, and the kind in words.
MODEL_FOLDER_MARKERS = (("model_index.json", "a pipeline"), (TRAINER_STATE_NAME, "a training checkpoint"))


def model_folder_kind(folder: Path) -> str | None:
    """What model ``folder`` holds, with the file that says so (``"a pipeline (model_index.json)"``,
    ``"a training checkpoint (trainer_state.json)"``), or None for any other folder: a run's or a
    checkpoint's folder is no data set, though its grids and loss curve are PNGs."""
    for marker, kind in MODEL_FOLDER_MARKERS:
        if (Path(folder) / marker).is_file():
            return f"{kind} ({marker})"
    return None


def grid_path(output_dir: Path, step: int) -> Path:
    """The sample grid of optimizer step ``step``: ``samples/step_0000400.png``."""
    return output_dir / GRID_FOLDER / f"{GRID_PREFIX}{step:07d}.png"


def grid_step(path: Path) -> int | None:
    """The step of a :func:`grid_path` file, None for a file of another name."""
    digits = path.stem.removeprefix(GRID_PREFIX)
    return int(digits) if path.stem.startswith(GRID_PREFIX) and digits.isdigit() else None


def snapshot_name(value: float, unit: str) -> str:
    """The folder of a ``--snapshot_minutes`` / ``--snapshot_steps`` pipeline: ``snapshot-2min``,
    ``snapshot-1p5min``, ``snapshot-400steps``."""
    if unit not in ("minutes", "steps"):
        raise ValueError(f"unit must be 'minutes' or 'steps', got {unit!r}.")
    return f"snapshot-{f'{value:g}'.replace('.', 'p')}{'min' if unit == 'minutes' else 'steps'}"
