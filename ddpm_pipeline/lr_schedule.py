"""The learning-rate schedule of a run: diffusers' named schedules, over the run's real length.

A decaying schedule (``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``) needs the
number of optimizer steps ``N`` it decays over. With a step limit that is the limit. With a
training-time budget (``--max_train_minutes``) the step count is not known in advance, so the
schedule estimates it from the measured speed and decays over whichever ends the run first::

    N̂ = min(N_limit, n + (B - s) / r)

where ``n`` steps took ``s`` training seconds so far, ``B`` is the budget in seconds and ``r`` the
seconds per step measured since this process's first time check (so a ``torch.compile`` of the
first steps does not count). Each step's multiplier is diffusers' own schedule function (built for
``N_limit``) evaluated at the *same progress* through the decay::

    λ(n) = f(v),   v = W + min(1, (n - W) / max(1, N̂ - W)) · (N_limit - W)   for n > W (else v = n)

with ``W`` the warmup steps. When ``N̂ = N_limit`` (no budget, or one that will not end the run
first) ``v = n`` and the schedule is diffusers' ``get_scheduler`` exactly; with a budget the decay
reaches its end (0 for cosine and linear) as the budget runs out. The estimate is refreshed every
``--log_every`` steps from the main process's clock, which every process receives, so all
processes use the same learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

#: the schedules whose multiplier depends on the run's length
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def diffusers_multiplier(name: str, learning_rate: float, warmup_steps: int, total_steps: int) -> Callable[[float], float]:
    """diffusers' schedule ``name`` as a function of the step: ``lr(n) = learning_rate · f(n)``."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)  # polynomial reads its lr
    return get_scheduler(name, optimizer=probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps).lr_lambdas[0]


class RunLengthLR(LRScheduler):
    """diffusers' schedule ``name`` with ``warmup_steps`` of warmup, decaying over ``total_steps``
    or, with ``budget_seconds``, over the steps the budget is estimated to allow when that is fewer
    (the module docstring has the formulas). :meth:`observe` feeds it the training clock."""

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
        self.estimated_total_steps: float = float(total_steps)
        self._anchor: tuple[int, float] | None = None  # (step, seconds) at this process's first check
        learning_rate = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        self._multiplier = diffusers_multiplier(name, learning_rate, warmup_steps, total_steps)
        super().__init__(optimizer, last_epoch)

    @property
    def decays_over_budget(self) -> bool:
        """Whether the schedule's length follows the time budget (a decaying schedule with one)."""
        return self.budget_seconds is not None and self.name in DECAYING_SCHEDULES

    def expected_total_steps(self) -> int:
        """The steps the decay is planned over now: ``N̂`` (``N_limit`` without a budget)."""
        return max(1, min(self.step_limit, math.ceil(self.estimated_total_steps)))

    def observe(self, step: int, train_seconds: float) -> None:
        """Refresh ``N̂`` from the training clock: ``train_seconds`` after ``step`` optimizer steps."""
        if not self.decays_over_budget:
            return
        if self._anchor is None or step <= self._anchor[0]:
            self._anchor = (step, train_seconds)  # the rate is measured from here on
            return
        anchor_step, anchor_seconds = self._anchor
        seconds_per_step = (train_seconds - anchor_seconds) / (step - anchor_step)
        if seconds_per_step <= 0:
            return
        remaining = max(0.0, self.budget_seconds - train_seconds)
        self.estimated_total_steps = min(float(self.step_limit), step + remaining / seconds_per_step)

    def multiplier(self, step: int) -> float:
        """``λ(n)``: the factor of the peak learning rate at optimizer step ``step``."""
        total, warmup = min(float(self.step_limit), self.estimated_total_steps), self.warmup_steps
        if step <= warmup or total >= self.step_limit:
            return self._multiplier(step)
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return self._multiplier(warmup + progress * (self.step_limit - warmup))

    def get_lr(self) -> list[float]:
        factor = self.multiplier(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The position and the current estimate (the options come from the run's configuration)."""
        keys = ("last_epoch", "_step_count", "base_lrs", "_last_lr", "estimated_total_steps")
        return {key: getattr(self, key) for key in keys if hasattr(self, key)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; also reads the ``LambdaLR`` state of checkpoints written
        before this class (its ``lr_lambdas`` entry carries nothing the run needs)."""
        for key in ("last_epoch", "_step_count", "base_lrs", "_last_lr", "estimated_total_steps"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
