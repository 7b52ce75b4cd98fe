"""The learning-rate schedule of a run: diffusers' named schedules, over the run's real length.

A decaying schedule (``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``) runs through
its decay as training progresses. With a step limit ``N`` the progress at optimizer step ``n`` is
diffusers' ``(n - W) / (N - W)``, ``W`` being the warmup steps. A training-time budget
(``--max_train_minutes``, ``B`` seconds) ends a run at a step count nobody knows in advance, so
progress is also measured in training time, and the schedule follows whichever limit is nearer::

    p(n) = max( (n - W) / (N - W),  (T(n) - T_W) / (B - T_W) ),   clipped to [0, 1]
    λ(n) = f(W + p(n) · (N - W))   for n > W,   λ(n) = f(n) during warmup

where ``f`` is diffusers' own schedule function for ``N`` steps (so the shapes are diffusers'),
``T(n)`` the training seconds at step ``n`` and ``T_W`` those at the end of warmup. ``T(n)`` is
extrapolated from the last clock reading ``(n_k, T_k)`` at the speed measured between the last two
readings, ``T(n) = T_k + (n - n_k) · r``; readings come every ``--log_every`` steps from the main
process's clock, which every process receives, so all processes use the same learning rate.

So the decay ends (0 for ``cosine`` and ``linear``) as the budget runs out, whatever the speed
does on the way; at a constant speed the schedule is diffusers' schedule for the number of steps
the budget allows, and without a budget, or while the step limit is the nearer one, it is
``diffusers.optimization.get_scheduler`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

#: the schedules whose multiplier depends on the run's length
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")
#: what a checkpoint keeps (the options come from the run's configuration)
STATE_KEYS = ("last_epoch", "_step_count", "base_lrs", "_last_lr", "reading", "warmup_end_seconds")
#: what shapes the schedule (:meth:`RunLengthLR.definition`), kept in a checkpoint so that a run
#: resumed with another schedule can tell: another name, warmup, length or time budget
DEFINITION_KEY = "definition"


def diffusers_multiplier(name: str, learning_rate: float, warmup_steps: int, total_steps: int) -> Callable[[float], float]:
    """diffusers' schedule ``name`` as a function of the step: ``lr(n) = learning_rate · f(n)``."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)  # polynomial reads its lr
    return get_scheduler(name, optimizer=probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps).lr_lambdas[0]


def warmup_advice(name: str, warmup_steps: int, total_steps: int) -> str | None:
    """A warning for a warmup that fills the run, else None. diffusers' warmup scales the rate by
    ``n / W`` at step ``n ≤ W`` (counted from 0), so with ``W ≥ N`` every step is warmup: the rate
    climbs to ``(N - 1) / W`` of ``--learning_rate`` at the last step, and a decaying schedule
    never decays. (``constant`` ignores the warmup, as diffusers' does.)"""
    if name == "constant" or warmup_steps < total_steps:
        return None
    decay = f", and the {name} decay never starts" if name in DECAYING_SCHEDULES else ""
    return (
        f"--lr_warmup_steps {warmup_steps} is not shorter than this run's {total_steps} steps: the learning rate climbs "
        f"for the whole run, to {(total_steps - 1) / warmup_steps:.0%} of --learning_rate at its last step{decay}. "
        f"Pass a shorter warmup, e.g. --lr_warmup_steps {total_steps // 10} (a tenth of the run)."
    )


class RunLengthLR(LRScheduler):
    """diffusers' schedule ``name`` with ``warmup_steps`` of warmup, decaying over ``total_steps``
    or over ``budget_seconds`` of training, whichever ends first (the module docstring has the
    formulas). :meth:`observe` feeds it the training clock."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        warmup_steps: int,
        total_steps: int,
        budget_seconds: float | None = None,
        last_epoch: int = -1,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        self.name, self.warmup_steps, self.step_limit = name, warmup_steps, total_steps
        self.budget_seconds = budget_seconds
        #: the last clock reading: (step, training seconds, seconds per step since the reading before, or None)
        self.reading: tuple[int, float, float | None] | None = None
        self.warmup_end_seconds: float | None = None  # T_W
        #: the definition the restored state was built with (None: nothing restored, or a
        #: checkpoint written before definitions were kept)
        self.restored_definition: dict[str, Any] | None = None
        learning_rate = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        self._multiplier = diffusers_multiplier(name, learning_rate, warmup_steps, total_steps)
        super().__init__(optimizer, last_epoch)

    @property
    def decays_over_budget(self) -> bool:
        """Whether the time budget can end the decay (a decaying schedule with a budget)."""
        return self.budget_seconds is not None and self.name in DECAYING_SCHEDULES

    def definition(self) -> dict[str, Any]:
        """What shapes the multipliers: the schedule's name and warmup steps and, for a decaying
        schedule, its step limit and time budget (a constant one does not depend on them)."""
        decaying = self.name in DECAYING_SCHEDULES
        return {"name": self.name, "warmup_steps": self.warmup_steps,
                "step_limit": self.step_limit if decaying else None,
                "budget_seconds": self.budget_seconds if decaying else None}  # fmt: skip

    def observe(self, step: int, train_seconds: float) -> None:
        """A clock reading: ``train_seconds`` of training after ``step`` optimizer steps."""
        if not self.decays_over_budget:
            return
        rate = None
        if self.reading is not None and step > self.reading[0]:
            rate = (train_seconds - self.reading[1]) / (step - self.reading[0])
        self.reading = (step, train_seconds, rate)
        if self.warmup_end_seconds is None and step >= self.warmup_steps:
            self.warmup_end_seconds = max(0.0, train_seconds - (step - self.warmup_steps) * (rate or 0.0))

    def train_seconds_at(self, step: int) -> float | None:
        """``T(n)``, extrapolated from the last reading (None before the first)."""
        if self.reading is None:
            return None
        reading_step, seconds, rate = self.reading
        return seconds + max(0, step - reading_step) * (rate or 0.0)

    def time_progress(self, step: int) -> float:
        """``(T(n) - T_W) / (B - T_W)``: how far through the decay the budget is (0 without one)."""
        seconds = self.train_seconds_at(step) if self.decays_over_budget else None
        if seconds is None or self.warmup_end_seconds is None:
            return 0.0
        return (seconds - self.warmup_end_seconds) / max(1e-9, self.budget_seconds - self.warmup_end_seconds)

    def expected_total_steps(self) -> int:
        """The step at which the decay is expected to end now: ``N``, or the budget's end at the
        measured speed when that comes first."""
        if self.reading is None or not self.reading[2] or not self.decays_over_budget:
            return self.step_limit
        step, seconds, rate = self.reading
        return max(step, min(self.step_limit, step + round((self.budget_seconds - seconds) / rate)))

    def multiplier(self, step: int) -> float:
        """``λ(n)``: the factor of the peak learning rate at optimizer step ``step``."""
        warmup = self.warmup_steps
        if step <= warmup:
            return self._multiplier(step)
        by_time = min(1.0, self.time_progress(step))
        if by_time <= (step - warmup) / max(1, self.step_limit - warmup):
            return self._multiplier(step)  # the step limit is the nearer end: diffusers' schedule as it is
        return self._multiplier(warmup + by_time * (self.step_limit - warmup))

    def get_lr(self) -> list[float]:
        """Each group's rate at the current step: ``base · λ(n)``."""
        factor = self.multiplier(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The position and the clock readings, and the :meth:`definition` they were reached with
        (the options themselves come from the run's configuration)."""
        return {**{key: getattr(self, key) for key in STATE_KEYS if hasattr(self, key)}, DEFINITION_KEY: self.definition()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, keeping this run's definition (the checkpoint's is kept as
        :attr:`restored_definition`); also reads the ``LambdaLR`` state of checkpoints written
        before this class (its ``lr_lambdas`` entry carries nothing the run needs)."""
        for key in STATE_KEYS:
            if key in state_dict:
                setattr(self, key, state_dict[key])
        self.restored_definition = state_dict.get(DEFINITION_KEY)

    def restart_here(self) -> None:
        """Set the learning rate of the next step from this schedule at the restored position
        (``lr = base · λ(n)`` at ``n = last_epoch``), replacing the rate restored with it."""
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr
