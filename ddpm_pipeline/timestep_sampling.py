"""How training draws its timesteps: uniformly, or by importance (Improved DDPM §3.3).

The objective is an expectation over ``t ~ U{0..T-1}``. Any distribution ``p`` with ``p_t > 0``
estimates it without bias when each draw's loss is weighted by ``1/(T p_t)``:
``E_{t~p}[L_t / (T p_t)] = (1/T) Σ_t L_t``. The variance of that estimate is smallest for
``p_t ∝ √E[L_t²]``; for the variational bound, whose terms span orders of magnitude (the first
few timesteps dominate), uniform draws make a very noisy gradient and importance sampling is what
makes the bound trainable on its own (Nichol & Dhariwal 2021, §3.3).

:class:`ImportanceTimestepSampler` estimates ``E[L_t²]`` from the last ``history`` losses seen at
each ``t`` (a ring buffer per timestep), draws uniformly until every timestep has that many, and
then from ``p_t = (1 - u) √E[L_t²] / Σ_s √E[L_s²] + u/T``. All of it stays on the device: no host
synchronization per step. Every process of a multi-process run must feed it the whole global
batch's losses, so that all keep the same state and draw the same timesteps.
"""

from __future__ import annotations

from typing import Any

import torch

from .option_values import DEFAULT_IMPORTANCE_HISTORY, DEFAULT_IMPORTANCE_UNIFORM_PROB


def _table_dtype(device: torch.device) -> torch.dtype:
    """float64 for the probabilities and their cumulative sum, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


class ImportanceTimestepSampler:
    """Draws timesteps with ``p_t ∝ √E[L_t²]`` (mixed with ``u`` of the uniform distribution) and
    returns the weights ``1/(T p_t)`` that keep the loss an unbiased estimate of the uniform one."""

    def __init__(
        self,
        num_timesteps: int,
        history: int = DEFAULT_IMPORTANCE_HISTORY,
        uniform_prob: float = DEFAULT_IMPORTANCE_UNIFORM_PROB,
        device: str | torch.device = "cpu",
    ):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        if history < 1:
            raise ValueError(f"The loss history per timestep must hold at least 1 value, got {history}.")
        if not 0.0 < uniform_prob <= 1.0:
            raise ValueError(
                f"uniform_prob must be in (0, 1], got {uniform_prob}: every timestep needs a positive probability "
                "for the weighted loss to stay unbiased."
            )
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self.device = torch.device(device)
        dtype = _table_dtype(self.device)
        # row t < T: timestep t's ring buffer of losses; row T: scratch for what is not recorded
        self._table = torch.zeros((num_timesteps + 1, history), dtype=dtype, device=self.device)
        #: ``counts[t]``: the losses seen at timestep ``t`` so far.
        self.counts = torch.zeros(num_timesteps, dtype=torch.long, device=self.device)

    @property
    def losses(self) -> torch.Tensor:
        """``[T, history]``: each timestep's last losses (in ring order; zeros where none yet)."""
        return self._table[: self.num_timesteps]

    @property
    def warm(self) -> torch.Tensor:
        """Whether every timestep has a full history (a 0-dim bool tensor on the device)."""
        return (self.counts >= self.history).all()

    def probabilities(self) -> torch.Tensor:
        """``p_t``: uniform until :attr:`warm`, then ``(1-u) √m_t / Σ_s √m_s + u/T`` with ``m_t`` the
        mean of the squared losses in timestep ``t``'s history."""
        second_moment_root = self.losses.pow(2).mean(dim=1).sqrt()
        total = second_moment_root.sum()
        uniform = torch.full_like(second_moment_root, 1.0 / self.num_timesteps)
        proportional = second_moment_root / torch.where(total > 0, total, torch.ones_like(total))
        importance = (1.0 - self.uniform_prob) * proportional + self.uniform_prob * uniform
        return torch.where(self.warm & (total > 0), importance, uniform)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` timesteps drawn from :meth:`probabilities` by inverting its cumulative sum
        at uniform numbers from ``generator``, and their weights ``1/(T p_t)`` (float32)."""
        p = self.probabilities()
        cumulative = p.cumsum(0)
        uniforms = torch.rand(batch_size, device=self.device, dtype=p.dtype, generator=generator)
        timesteps = torch.searchsorted(cumulative, uniforms * cumulative[-1], right=True).clamp_(max=self.num_timesteps - 1)
        weights = 1.0 / (self.num_timesteps * p[timesteps])
        return timesteps, weights.float()

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (unweighted, detached) at their timesteps, in order: each
        timestep keeps its last ``history`` values. Non-finite losses are not recorded. No host
        synchronization (no boolean indexing, no ``bincount``)."""
        timesteps = timesteps.to(self.device).long().flatten()
        losses = losses.detach().to(self.device, self._table.dtype).flatten()
        if timesteps.shape != losses.shape:
            raise ValueError(f"{timesteps.numel()} timesteps but {losses.numel()} losses.")
        spare = self.num_timesteps  # a scratch row for what is not recorded
        bucket = torch.where(torch.isfinite(losses), timesteps, torch.full_like(timesteps, spare))
        order = torch.sort(bucket, stable=True).indices
        bucket, values = bucket[order], losses[order]
        per_bucket = torch.zeros(spare + 1, dtype=torch.long, device=self.device)
        per_bucket.scatter_add_(0, bucket, torch.ones_like(bucket))
        first_of_bucket = per_bucket.cumsum(0) - per_bucket
        rank = torch.arange(bucket.numel(), device=self.device) - first_of_bucket[bucket]
        # only each timestep's last `history` new values survive, and their ring slots are distinct;
        # the rest are written to the scratch row
        keep = (bucket < spare) & (rank >= per_bucket[bucket] - self.history)
        counts = torch.cat([self.counts, self.counts.new_zeros(1)])
        slot = (counts[bucket] + rank) % self.history
        self._table.index_put_((torch.where(keep, bucket, spare), slot), values)
        self.counts += per_bucket[:spare]

    def state_dict(self) -> dict[str, Any]:
        """The history and its shape, on the CPU (for a checkpoint; ``uniform_prob`` is an option)."""
        return {
            "num_timesteps": self.num_timesteps,
            "history": self.history,
            "losses": self.losses.cpu().clone(),
            "counts": self.counts.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s history; its shape must agree."""
        saved = (state["num_timesteps"], state["history"])
        if saved != (self.num_timesteps, self.history):
            raise ValueError(
                f"The saved timestep history is for T = {saved[0]} with {saved[1]} losses per timestep, this run has "
                f"T = {self.num_timesteps} and --importance_history {self.history}: give that run's values."
            )
        self.losses.copy_(state["losses"].to(self.losses.dtype))
        self.counts.copy_(state["counts"])
