"""Experiment trackers (``train_ddpm.py --report_to tensorboard|wandb``): checked before any work,
started so that a resumed run continues its own record, and given the sample grids as images.

The losses themselves reach them through ``accelerator.log``; this module holds what is particular
to each tracker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .training_config import TrainingConfig

#: In --logging_dir: the id of the W&B run that a resumed training run continues.
WANDB_RUN_ID_NAME = "wandb_run_id.txt"
#: ``WANDB_MODE`` values in which W&B logs without an account (``dryrun`` is the old ``offline``).
WANDB_ACCOUNTLESS_MODES = ("offline", "disabled", "dryrun")


def check_tracker_installed(report_to: str) -> None:
    """Refuse, before any work, a ``--report_to`` whose package is missing. (Not a check of the
    options themselves: a run's saved options stay readable where that package is not installed.)"""
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report_to wandb needs the wandb package: pip install wandb (or use --report_to tensorboard).")


def check_wandb_login() -> None:
    """For ``--report_to wandb``, before any work: W&B has an API key (``WANDB_API_KEY``, a W&B
    settings file or ``~/.netrc``, where ``wandb.login`` finds it; on a terminal it asks for one
    now), unless ``WANDB_MODE`` logs without an account. Otherwise ``wandb.init`` would fail only
    once the data are loaded and the network built."""
    if os.environ.get("WANDB_MODE", "").lower() in WANDB_ACCOUNTLESS_MODES:
        return
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as error:
        raise RuntimeError(
            f"--report_to wandb: W&B has no API key on this machine ({error}). Run `wandb login` (or set "
            "WANDB_API_KEY), or log offline with WANDB_MODE=offline and `wandb sync` the run later, or use "
            "--report_to tensorboard."
        ) from error


def tracker_config(config: TrainingConfig) -> dict[str, Any]:
    """The options as TensorBoard hparams accept them (numbers, strings, booleans; the rest as JSON)."""
    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = value if isinstance(value, int | float | str | bool) else json.dumps(value)
    return flat


def tracker_init_kwargs(config: TrainingConfig, resumed: bool, resumed_step: int) -> dict[str, Any]:
    """``init_kwargs`` of the trackers, for the main process: a W&B run writes under --output_dir and
    is named after it, and a resumed training run (``resumed``) continues its W&B run (the id kept
    in ``<logging_dir>/wandb_run_id.txt``); a fresh run in the same folder starts a new one.

    A run resumed from its checkpoint of step ``resumed_step`` retrains the steps after it that a
    crash cut short; TensorBoard is told to hide what the crashed run logged from step
    ``resumed_step + 1`` on (``SummaryWriter(purge_step=...)``), so each step keeps one point.
    A fresh run (step 0) hides that way whatever an earlier run logged in the same folder (one
    overwritten, or one that crashed before its first checkpoint)."""
    if config.report_to == "tensorboard":
        return {"tensorboard": {"purge_step": resumed_step + 1}}
    if config.report_to != "wandb":
        return {}
    output_dir = Path(config.output_dir)
    id_file = output_dir / config.logging_dir / WANDB_RUN_ID_NAME
    if resumed and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(8)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return {"wandb": {"dir": str(output_dir), "name": output_dir.name, "id": run_id, "resume": "allow"}}


def log_image(trackers: Iterable[Any], name: str, path: Path, step: int) -> None:
    """The PNG at ``path`` as image ``name`` of ``step``: in TensorBoard's images tab, in a W&B
    run's media; nothing without trackers."""
    trackers = list(trackers)
    if not trackers:
        return
    with Image.open(path) as grid:
        image = np.asarray(grid.convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)
