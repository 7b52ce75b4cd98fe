"""How long a long job on a CPU will take, told before it has run for long.

Sampling 50,000 images with 1,000 steps, or the exact bound of 1,000 images, takes minutes on a GPU
and hours to days on a CPU. The progress bars estimate the time left only once a whole batch is done,
which on a CPU can take many minutes; :class:`Pace` times the first batch's second network
evaluation instead (the first pays for one-off set-up) and says at once how long the job will take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: A job that would take longer than this is announced with its length.
LONG_JOB_SECONDS = 10 * 60


class Pace:
    """The length of a job of network evaluations of one batch size: :meth:`expect` names how many
    the job holds; :meth:`tick` marks the end of each of the first batch's (or use the object as that
    batch's ``callback_on_step_end``, or wrap its network with :meth:`timed`). After the second tick,
    where the job would take longer than :data:`LONG_JOB_SECONDS` at that pace (``seconds an
    evaluation × evaluations``), ``what`` is logged with its length once, with ``advice`` for a
    shorter job."""

    def __init__(self, what: str, advice: str = "", clock: Callable[[], float] = time.perf_counter):
        self.what = what
        self.advice = advice
        self.clock = clock
        self.evaluations = 0
        self.batch_size = 0
        self.ticks: list[float] = []

    def expect(self, evaluations: int, batch_size: int) -> None:
        """The job ahead: ``evaluations`` network evaluations of a batch of ``batch_size`` images."""
        self.evaluations, self.batch_size = evaluations, batch_size

    def tick(self) -> None:
        """Mark the end of an evaluation; after the second, announce a long job."""
        self.ticks.append(self.clock())
        if len(self.ticks) != 2:
            return
        seconds_each = self.ticks[1] - self.ticks[0]
        seconds = seconds_each * self.evaluations
        if seconds > LONG_JOB_SECONDS:
            logger.warning(
                f"{self.what} takes about {duration(seconds)} on this CPU ({self.evaluations:,} network evaluations of a "
                f"batch of {self.batch_size} at {seconds_each:.2f} s each, the pace of the first batch)"
                + (f"; {self.advice}" if self.advice else "")
            )

    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        """As a pipeline's ``callback_on_step_end``: :meth:`tick` after each step."""
        self.tick()
        return callback_kwargs

    def timed(self, network: Callable[..., Any]) -> Callable[..., Any]:
        """``network``, calling :meth:`tick` after each evaluation."""

        def evaluate_and_tick(*args: Any, **kwargs: Any) -> Any:
            output = network(*args, **kwargs)
            self.tick()
            return output

        return evaluate_and_tick


def duration(seconds: float) -> str:
    """``seconds`` for people: minutes, hours or days."""
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
