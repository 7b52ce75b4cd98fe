"""Per-batch terms of the variational bound on disk, so an interrupted bits/dim run resumes.

Batch ``b`` of a bits/dim computation depends only on its images and its seed (see
:func:`~ddpm_pipeline.evaluation.bound_over_data`), so its terms can be kept as soon as they are
computed, one file per batch (``batch-000012.pt``, written atomically), and a repeated run reads
them back instead of computing them again. ``bound.json`` records the options they were computed
with; terms from other options (another model, its weights rewritten, other data or timesteps)
are discarded, never mixed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .checkpointing import UNREADABLE_FILE_ERRORS, unreadable_file_damage
from .json_files import UnreadableJSON, read_json_object
from .likelihood import BoundTerms

logger = logging.getLogger(__name__)

SETTINGS_FILE = "bound.json"
_TERMS = ("prior", "diffusion", "decoder", "per_timestep", "data_share")


def batch_file_name(batch_index: int) -> str:
    """The file of batch ``b``'s terms: ``batch-000042.pt``."""
    return f"batch-{batch_index:06d}.pt"


def _recorded_settings(path: Path) -> dict[str, Any] | None:
    """The settings a store recorded, or None when the file cannot be read (emptied or cut short:
    the terms beside it cannot be told from others')."""
    try:
        return read_json_object(path)
    except UnreadableJSON:
        return None


class BoundStore:
    """A folder of per-batch :class:`~ddpm_pipeline.likelihood.BoundTerms` for one set of options."""

    def __init__(self, folder: str | Path, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        settings_path = self.folder / SETTINGS_FILE
        if settings_path.is_file() and _recorded_settings(settings_path) != self.settings:
            logger.warning(f"{self.folder} holds bound terms computed with other options; computing them afresh")
            self.remove()
        if not settings_path.is_file():
            with atomic_path(settings_path) as partial:
                partial.write_text(json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

    def load(self, batch_index: int) -> BoundTerms | None:
        """The stored terms of batch ``batch_index``, or None when it has not been computed, or its
        file cannot be read (emptied or cut short: a power cut, a full disk; computed again)."""
        path = self.folder / batch_file_name(batch_index)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except UNREADABLE_FILE_ERRORS as error:
            damage = unreadable_file_damage(error)
            if damage is None:
                raise
            logger.warning(f"{path} cannot be read ({damage}): computing its batch again")
            return None
        return BoundTerms(**{name: saved.get(name) for name in _TERMS})

    def save(self, batch_index: int, terms: BoundTerms) -> None:
        """Keep the terms of batch ``batch_index`` (on the CPU; the file appears complete or not at all)."""
        values = {name: getattr(terms, name) for name in _TERMS if getattr(terms, name) is not None}
        with atomic_path(self.folder / batch_file_name(batch_index)) as partial:
            torch.save({name: value.detach().cpu() for name, value in values.items()}, partial)

    def count(self) -> int:
        """How many batches are stored."""
        return len(list(self.folder.glob("batch-*.pt")))

    def remove(self) -> None:
        """Delete the folder (once the report that needed it is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
