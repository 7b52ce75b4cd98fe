"""What a report records of where its numbers come from: the versions of the packages that made
them, and how far the model they were made with had trained."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from .pretrained import is_local_source
from .run_records import load_run_summary

#: The packages whose versions a report names.
PACKAGES = ("ddpm_pipeline", "torch", "diffusers", "torch-fidelity", "datasets", "numpy", "scipy")


def package_versions() -> dict[str, str | None]:
    """The installed version of each package a report names (None where one is missing)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_training(model: str | None) -> dict[str, Any] | None:
    """How far the run that wrote a local pipeline folder had trained (its
    :func:`~ddpm_pipeline.run_records.load_run_summary`, with ``"snapshot": true`` for a
    ``--snapshot_*`` folder), so that reports of one run's snapshots line up against its steps and
    minutes; None for a Hub id or a folder without a summary."""
    if not model or not is_local_source(model):
        return None
    summary, snapshot = load_run_summary(Path(model).expanduser())
    return None if summary is None else {**summary, "snapshot": snapshot}
