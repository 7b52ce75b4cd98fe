"""What a training run records as it goes: its loss history (a CSV kept across resumes, with the
loss per quarter of the timesteps), the per-step records read back from the device in batches,
and the clock of training seconds."""

from __future__ import annotations

import csv
import logging
import math
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .atomic import atomic_path
from .json_files import read_json_object
from .losses import DiffusionLossTerms

logger = logging.getLogger(__name__)

#: The training loss is also logged per quarter of the timesteps: ``loss_q{q}`` for ``t ∈ [qT/4, (q+1)T/4)``.
TIMESTEP_QUARTERS = 4
QUARTER_COLUMNS = tuple(f"loss_q{q}" for q in range(TIMESTEP_QUARTERS))
#: With a learned variance the loss's two parts are logged too (:class:`~ddpm_pipeline.losses.DiffusionLossTerms`).
TERM_COLUMNS = ("mse", "vlb")
#: A finished run's summary reports its loss averaged over this many last steps.
SUMMARY_STEPS = 100
#: Beside a finished run's pipeline: what the run did (:meth:`ddpm_pipeline.training.Trainer.run_summary`).
TRAINING_SUMMARY_NAME = "training_summary.json"
#: In each ``--snapshot_*`` folder: the same summary, of the run up to the snapshot.
SNAPSHOT_SUMMARY_NAME = "snapshot.json"


def step_record(
    terms: DiffusionLossTerms, timesteps: torch.Tensor, num_timesteps: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """One micro-batch's numbers to log, on the device, without a host sync (float32 ``[3 + 2Q]``):
    ``[mean_b w_b ℓ_b, mean_b w_b mse_b, mean_b w_b vlb_b (NaN without a bound term),
    S_0 … S_{Q-1}, W_0 … W_{Q-1}]`` with ``S_q = (1/B) Σ_{b: t_b ∈ q} w_b ℓ_b`` and
    ``W_q = (1/B) Σ_{b: t_b ∈ q} w_b`` over the Q = 4 quarters of the timesteps.

    ``w_b`` are the importance weights ``1/(T p_t)`` (1 for uniform draws), so that every entry is an
    unbiased estimate under uniform ``t`` and ``S_q / W_q`` estimates the mean loss over quarter
    ``q``'s timesteps. Every entry is a mean over images, so records of micro-batches and processes
    combine by averaging (:meth:`PendingLosses.flush`).
    """
    loss = terms.loss.detach().float()
    weights = torch.ones_like(loss) if weights is None else weights.float()
    vlb = terms.vlb.detach().float() if terms.vlb is not None else torch.full_like(loss, math.nan)
    quarter = torch.div(timesteps.long() * TIMESTEP_QUARTERS, num_timesteps, rounding_mode="floor")
    by_quarter = torch.zeros((2, TIMESTEP_QUARTERS), dtype=loss.dtype, device=loss.device)
    by_quarter[0].scatter_add_(0, quarter, weights * loss)
    by_quarter[1].scatter_add_(0, quarter, weights)
    means = torch.stack([(weights * loss).mean(), (weights * terms.mse.detach().float()).mean(), (weights * vlb).mean()])
    return torch.cat([means, by_quarter.flatten() / loss.numel()])


class LossHistory:
    """``loss_history.csv`` (step, loss, learning rate, the loss per quarter of the timesteps, and
    the loss's parts with a learned variance), kept across resumes: rows after the resumed step
    (from the run that crashed) are dropped. An empty cell: no image of that step fell in that
    quarter, or the earlier run did not record the column.

    ``resumed_history`` is the history of the run whose checkpoint this one resumes (default:
    ``path``): a run resumed in another folder from a checkpoint of another run's folder starts its
    history with that run's rows up to ``resume_step``, so its curve shows the whole training."""

    def __init__(
        self,
        path: Path,
        resume_step: int,
        enabled: bool,
        terms: bool = False,
        resumed_history: Path | None = None,
        columns: tuple[str, ...] | None = None,
    ):
        self.path = path
        self.enabled = enabled
        # another history kept the same way (``columns``, the first of them "step"): the held-out bound's
        self.columns = columns or ("step", "loss", "lr", *QUARTER_COLUMNS, *(TERM_COLUMNS if terms else ()))
        # one float64 array per column (NaN: no value), not a dict per row: some 60 bytes a row
        # instead of 450, 50 MB over a run of 800,000 steps
        self._values = {name: array("d") for name in self.columns}
        if not enabled:
            return
        source = path if resumed_history is None else resumed_history
        # the kept rows are streamed into a new file that then replaces the old one (which may be the
        # source): a crash while rewriting leaves the old history whole
        with atomic_path(path) as partial, partial.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            if resume_step > 0 and source.is_file():
                for row in iter_loss_history(source):
                    if row["step"] <= resume_step:
                        writer.writerow(self._cells(row))
                        self._keep(row)
        self._handle = path.open("a", newline="")
        self._writer = csv.writer(self._handle)

    def _cells(self, row: dict[str, float | None]) -> list[str]:
        return ["" if row.get(name) is None else f"{row[name]:.6g}" for name in self.columns]

    def _keep(self, row: dict[str, float | None]) -> None:
        for name, values in self._values.items():
            value = row.get(name)
            values.append(math.nan if value is None else value)

    def append(self, step: int, loss: float, lr: float, **values: float | None) -> None:
        """One row: the loss of ``step`` (mean over processes), its learning rate, and the other
        columns' ``values`` (None: none this step)."""
        self.add(step, loss=loss, lr=lr, **values)

    def add(self, step: int, **values: float | None) -> None:
        """One row of ``step`` with these columns' ``values`` (the others empty)."""
        if self.enabled:
            row = {"step": step, **values}
            self._keep(row)
            self._writer.writerow(self._cells(row))

    def series(self, column: str) -> tuple[list[int], list[float]]:
        """The steps and values of ``column`` (NaN where a row has none)."""
        return [int(step) for step in self._values["step"]], self._values[column].tolist()

    def __len__(self) -> int:
        """The number of rows (steps) recorded, the resumed run's kept rows included."""
        return len(self._values["step"])

    @classmethod
    def read(cls, path: Path, up_to_step: int | None = None) -> LossHistory:
        """A ``loss_history.csv`` read back, its rows up to ``up_to_step`` (all: None); not written to."""
        with path.open(newline="") as handle:
            columns = tuple(next(csv.reader(handle), ()))
        history = cls(path, 0, enabled=False, columns=columns or None)
        for row in iter_loss_history(path):
            if up_to_step is None or row["step"] <= up_to_step:
                history._keep(row)
        return history

    def recent_loss(self, steps: int = SUMMARY_STEPS) -> dict[str, float]:
        """:meth:`recent_means` with ``steps``, the number of rows they average (at most ``steps``):
        a run summary's ``recent_loss``."""
        return {"steps": min(steps, len(self)), **self.recent_means(steps)}

    def recent_means(self, steps: int = SUMMARY_STEPS) -> dict[str, float]:
        """Each loss column's mean over the last ``steps`` rows, ``(1/n) Σ value`` over the n of
        them with a finite value (a quarter's cell is empty on a step without an image there, and a
        step skipped for a non-finite loss is left out); a column with no such value is left out,
        so nothing is returned before the first row."""
        means = {}
        for name in self.columns:
            if name in ("step", "lr"):
                continue
            values = [value for value in self._values[name][-steps:] if math.isfinite(value)]
            if values:
                means[name] = math.fsum(values) / len(values)
        return means

    def flush(self) -> None:
        """Write the buffered rows to the file (before a checkpoint, and before an error ends the run)."""
        if self.enabled:
            self._handle.flush()

    def close(self) -> None:
        """Close the CSV file."""
        if self.enabled:
            self._handle.close()


def load_run_summary(folder: str | Path) -> tuple[dict[str, Any] | None, bool]:
    """What the run that wrote a pipeline folder did (``training_summary.json``), or, for a
    ``--snapshot_*`` folder, the run up to the snapshot (``snapshot.json``), and whether it is the
    latter; ``(None, False)`` for a folder written otherwise."""
    for name in (TRAINING_SUMMARY_NAME, SNAPSHOT_SUMMARY_NAME):
        path = Path(folder) / name
        if path.is_file():
            return read_json_object(path), name == SNAPSHOT_SUMMARY_NAME
    return None, False


def iter_loss_history(path: Path) -> Iterator[dict[str, float | None]]:
    """The rows of a ``loss_history.csv`` one at a time, each column's value a float (the step an
    int), None for an empty cell.

    A row that cannot be read, with fewer or more cells than the header or a cell that is not a
    number, is left out with a warning: a write cut short (a disk that filled up while rows were
    appended, a power cut) leaves the last row cut short. Such a row lies past the checkpoint a
    resume starts from (the history is flushed before each checkpoint), which drops it anyway.
    """
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        columns = next(reader, [])
        unreadable = []
        for row in reader:
            try:  # a row of fewer or more cells fails zip's strict check
                values: dict[str, float | None] = {name: None if text == "" else float(text)
                                                   for name, text in zip(columns, row, strict=True)}  # fmt: skip
                values["step"] = int(row[columns.index("step")])
            except ValueError:
                unreadable.append(reader.line_num)
                continue
            yield values
    if unreadable:
        lines = ", ".join(map(str, unreadable[:5])) + (", …" if len(unreadable) > 5 else "")
        logger.warning(f"{path}: left out {len(unreadable)} row(s) that cannot be read (line {lines}), such as the "
                       "last row of a run that stopped while writing it")  # fmt: skip


def read_loss_history(path: Path) -> list[dict[str, float | None]]:
    """The rows of a ``loss_history.csv`` (:func:`iter_loss_history`) as a list."""
    return list(iter_loss_history(path))


class PendingLosses:
    """Per-step :func:`step_record` s kept on the device and read back in one transfer by
    :meth:`flush`, so the loop does not wait for the GPU every step; each step still gets its row
    in the history, its TensorBoard points and the progress bar's postfix."""

    def __init__(self, accelerator: Accelerator, history: LossHistory, progress: tqdm):
        self.accelerator, self.history, self.progress = accelerator, history, progress
        self.pending: list[tuple[int, torch.Tensor, float, int]] = []
        self.last_loss: float | None = None

    def add(self, step: int, record: torch.Tensor, lr: float, epoch: int) -> None:
        """Keep ``step``'s record (a device tensor, not read back yet)."""
        self.pending.append((step, record.detach(), lr, epoch))

    def flush(self) -> list[int]:
        """Log the pending records (averaged over processes); return the steps whose loss was not finite."""
        if not self.pending:
            return []
        stacked = torch.stack([record for _, record, _, _ in self.pending])
        gathered = self.accelerator.gather(stacked[None]).mean(dim=0).tolist()  # mean over processes
        has_terms = TERM_COLUMNS[0] in self.history.columns
        nonfinite = []
        for (step, _, lr, epoch), (loss, mse, vlb, *by_quarter) in zip(self.pending, gathered, strict=True):
            sums, weights = by_quarter[:TIMESTEP_QUARTERS], by_quarter[TIMESTEP_QUARTERS:]
            values = {name: (s / w if w > 0 else None) for name, s, w in zip(QUARTER_COLUMNS, sums, weights, strict=True)}
            if has_terms:
                values.update(mse=mse, vlb=vlb)
            self.history.append(step, loss, lr, **values)
            logged = {"loss": loss, "lr": lr, "epoch": epoch}
            # TensorBoard groups loss/q0 … loss/q3, loss/mse and loss/vlb under "loss"
            logged.update({f"loss/{name.removeprefix('loss_')}": value for name, value in values.items() if value is not None})
            self.accelerator.log(logged, step=step)
            if not math.isfinite(loss):
                nonfinite.append(step)
        step, _, lr, epoch = self.pending[-1]
        self.last_loss = gathered[-1][0]
        # shown with the bar's next update (or its close): a refresh of its own here would draw every step twice
        self.progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch, refresh=False)
        self.pending = []
        return nonfinite


class TrainingClock:
    """Seconds spent training, summed over resumed pieces of a run; writing checkpoints and grids
    does not count (:meth:`paused`)."""

    def __init__(self, earlier_seconds: float = 0.0):
        self.earlier = earlier_seconds
        self.started = time.perf_counter()
        self.excluded = 0.0

    def total(self) -> float:
        """Training seconds so far: earlier pieces plus this one, less the paused time."""
        return self.earlier + time.perf_counter() - self.started - self.excluded

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside the block does not count as training."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start
