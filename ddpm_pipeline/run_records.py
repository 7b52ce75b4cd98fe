"""What a training run records as it goes: its loss history (a CSV kept across resumes), the
per-step losses read back from the device in batches, and the clock of training seconds."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


class LossHistory:
    """``loss_history.csv`` (step, loss, learning rate), kept across resumes: rows after the
    resumed step (from the run that crashed) are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.rows: list[tuple[int, float, float]] = []
        if not enabled:
            return
        if resume_step > 0 and path.is_file():
            with path.open(newline="") as handle:
                for row in csv.DictReader(handle):
                    if int(row["step"]) <= resume_step:
                        self.rows.append((int(row["step"]), float(row["loss"]), float(row["lr"])))
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss", "lr"])
            writer.writerows(self.rows)
        self._handle = path.open("a", newline="")
        self._writer = csv.writer(self._handle)

    def append(self, step: int, loss: float, lr: float) -> None:
        """One row: the loss of ``step`` (mean over processes) and its learning rate."""
        if self.enabled:
            self.rows.append((step, loss, lr))
            self._writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}"])

    def flush(self) -> None:
        """Write the buffered rows to the file (before a checkpoint, and before an error ends the run)."""
        if self.enabled:
            self._handle.flush()

    def close(self) -> None:
        """Close the CSV file."""
        if self.enabled:
            self._handle.close()


class PendingLosses:
    """Per-step losses kept on the device and read back in one transfer by :meth:`flush`, so the
    loop does not wait for the GPU every step; each step still gets its row in the history, its
    TensorBoard point and the progress bar's postfix."""

    def __init__(self, accelerator: Accelerator, history: LossHistory, progress: tqdm):
        self.accelerator, self.history, self.progress = accelerator, history, progress
        self.pending: list[tuple[int, torch.Tensor, float, int]] = []
        self.last_loss: float | None = None

    def add(self, step: int, loss: torch.Tensor, lr: float, epoch: int) -> None:
        """Keep ``step``'s loss (a device tensor, not read back yet)."""
        self.pending.append((step, loss.detach(), lr, epoch))

    def flush(self) -> list[int]:
        """Log the pending losses; return the steps whose loss was not finite."""
        if not self.pending:
            return []
        stacked = torch.stack([loss for _, loss, _, _ in self.pending])
        gathered = self.accelerator.gather(stacked[None]).mean(dim=0).tolist()  # mean over processes
        nonfinite = []
        for (step, _, lr, epoch), loss in zip(self.pending, gathered, strict=True):
            self.history.append(step, loss, lr)
            self.accelerator.log({"loss": loss, "lr": lr, "epoch": epoch}, step=step)
            if not math.isfinite(loss):
                nonfinite.append(step)
        step, _, lr, epoch = self.pending[-1]
        self.last_loss = gathered[-1]
        self.progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
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
