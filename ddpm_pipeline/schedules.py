"""Noise schedules and the float64 tables derived from them.

This module is the single source of the DDPM arithmetic (Ho et al. 2020; Nichol & Dhariwal 2021).
Every table is computed in float64 on the CPU; callers cast the entries they need to their own
dtype and device. Notation (DESIGN.md §1), with ``t = 0 .. T-1`` as diffusers indexes steps:

* ``β_t`` the betas, ``α_t = 1 - β_t``, ``ᾱ_t = Π_{s≤t} α_s`` and ``ᾱ_{-1} = 1``;
* posterior ``q(x_{t-1} | x_t, x_0) = N(b_t x_0 + c_t x_t, β̃_t I)`` with
  ``b_t = √ᾱ_{t-1} β_t / (1-ᾱ_t)``, ``c_t = √α_t (1-ᾱ_{t-1}) / (1-ᾱ_t)`` and
  ``β̃_t = (1-ᾱ_{t-1}) β_t / (1-ᾱ_t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .option_values import DEFAULT_SNR_GAMMA, VARIANCE_TYPES, canonical_prediction_type, is_learned_variance

#: The linear schedule's end points for T = 1000 steps (DDPM paper).
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
#: The T at which the linear schedule is unscaled (diffusers' "linear" never scales).
LINEAR_REFERENCE_STEPS = 1000
#: The cosine schedule's offset ``s`` and cap on β (Improved DDPM).
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999

#: Schedule names understood by :func:`make_betas`; ``"squaredcos_cap_v2"`` is diffusers' name
#: for the same cosine schedule.
BETA_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2", "scaled_linear", "sigmoid")

def linear_betas(
    num_train_timesteps: int,
    beta_start: float = LINEAR_BETA_START,
    beta_end: float = LINEAR_BETA_END,
) -> torch.Tensor:
    """Linear betas, scaled to the number of steps as Improved DDPM does.

    ``β_t = linspace(k·beta_start, k·beta_end, T)[t]`` with ``k = 1000 / T``, so T = 1000 gives
    the DDPM paper's 1e-4 .. 0.02 and other T keep the same total amount of noise. The last β must
    stay below 1, so T must exceed ``1000·beta_end`` (T ≥ 21 for the paper's 0.02).
    """
    _check_num_steps(num_train_timesteps)
    scale = LINEAR_REFERENCE_STEPS / num_train_timesteps
    if beta_end * scale >= 1.0:
        fewest = math.floor(beta_end * LINEAR_REFERENCE_STEPS) + 1
        raise ValueError(
            f"The linear schedule scaled to T = {num_train_timesteps} steps (×1000/T: β from {beta_start * scale:g} "
            f"to {beta_end * scale:g}) reaches β ≥ 1, which would erase the image in one step. Use "
            f"num_train_timesteps ≥ {fewest} with it, or the cosine schedule, which takes any T."
        )
    return torch.linspace(beta_start * scale, beta_end * scale, num_train_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """The cosine schedule's ``f(t) = cos²(((t + s)/(1 + s)) · π/2)`` for ``t ∈ [0, 1]``."""
    return torch.cos((t + s) / (1.0 + s) * (math.pi / 2)) ** 2


def cosine_betas(num_train_timesteps: int, s: float = COSINE_S, max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Cosine betas (Improved DDPM): ``β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta)``.

    ``ᾱ(t) = f(t/T)/f(0)`` with ``f`` from :func:`cosine_alpha_bar`; the ``f(0)`` cancels in the
    ratio. Step ``t`` (0-based) runs from continuous time ``t/T`` to ``(t+1)/T``.
    """
    _check_num_steps(num_train_timesteps)
    grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = cosine_alpha_bar(grid, s)
    return torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float = LINEAR_BETA_START,
    beta_end: float = LINEAR_BETA_END,
) -> torch.Tensor:
    """Float64 betas for a named schedule.

    ``"linear"``: :func:`linear_betas` (scaled by 1000/T); ``"cosine"`` / ``"squaredcos_cap_v2"``:
    :func:`cosine_betas`; ``"scaled_linear"``: ``linspace(√beta_start, √beta_end, T)²`` and
    ``"sigmoid"``: ``sigmoid(linspace(-6, 6, T))·(beta_end - beta_start) + beta_start``, both as
    diffusers defines them.
    """
    _check_num_steps(num_train_timesteps)
    if beta_schedule == "linear":
        return linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_train_timesteps)
    if beta_schedule == "scaled_linear":
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
        return root**2
    if beta_schedule == "sigmoid":
        ramp = torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)
        return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}. Choose one of {', '.join(BETA_SCHEDULES)}.")


def _check_num_steps(num_train_timesteps: int) -> None:
    if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer ≥ 2, got {num_train_timesteps!r}.")


@dataclass(frozen=True)
class NoiseSchedule:
    """Every per-step quantity of a DDPM chain, as float64 tensors of shape ``[T]``.

    Build it with :meth:`from_betas`; the field docs give each formula.
    """

    betas: torch.Tensor
    """``β_t``."""
    alphas: torch.Tensor
    """``α_t = 1 - β_t``."""
    alphas_cumprod: torch.Tensor
    """``ᾱ_t = Π_{s≤t} α_s``."""
    alphas_cumprod_prev: torch.Tensor
    """``ᾱ_{t-1}``, with ``ᾱ_{-1} = 1``."""
    sqrt_alphas_cumprod: torch.Tensor
    """``√ᾱ_t``."""
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    """``√(1-ᾱ_t)``."""
    posterior_mean_coef1: torch.Tensor
    """``b_t = √ᾱ_{t-1} β_t / (1-ᾱ_t)``, the weight of ``x_0`` in ``μ̃_t``."""
    posterior_mean_coef2: torch.Tensor
    """``c_t = √α_t (1-ᾱ_{t-1}) / (1-ᾱ_t)``, the weight of ``x_t`` in ``μ̃_t``."""
    posterior_variance: torch.Tensor
    """``β̃_t = (1-ᾱ_{t-1}) β_t / (1-ᾱ_t)`` (0 at t = 0)."""
    posterior_variance_clipped: torch.Tensor
    """``β̃_t`` with ``β̃_0`` replaced by ``β̃_1``, so that it is positive everywhere."""
    posterior_log_variance_clipped: torch.Tensor
    """``log`` of :attr:`posterior_variance_clipped` (improved-diffusion's table)."""

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        """Derive every table from the betas (converted to float64 first)."""
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64).clone()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got {tuple(betas.shape)}.")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in the open interval (0, 1).")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        one_minus = 1.0 - alphas_cumprod
        posterior_variance = (1.0 - alphas_cumprod_prev) * betas / one_minus
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=one_minus.sqrt(),
            posterior_mean_coef1=alphas_cumprod_prev.sqrt() * betas / one_minus,
            posterior_mean_coef2=alphas.sqrt() * (1.0 - alphas_cumprod_prev) / one_minus,
            posterior_variance=posterior_variance,
            posterior_variance_clipped=clipped,
            posterior_log_variance_clipped=clipped.log(),
        )

    @property
    def num_train_timesteps(self) -> int:
        """``T``, the length of the chain."""
        return int(self.betas.numel())

    def model_variance(self, variance_type: str) -> torch.Tensor:
        """The reverse process variance ``σ_t²`` of ``p_θ(x_{t-1} | x_t)`` on the training chain.

        ``"fixed_small"``: ``σ_t² = β̃_t``; ``"fixed_large"``: ``σ_t² = β_t`` (DDPM's CIFAR-10 runs).
        At ``t = 0`` both use ``β̃_1`` (the clipped posterior variance) as improved-diffusion does, so
        that the table is positive and the decoder term has a finite variance. A learned variance
        has no table: see :func:`learned_log_variance`.
        """
        if variance_type == "fixed_small":
            return self.posterior_variance_clipped
        if variance_type == "fixed_large":
            return torch.cat([self.posterior_variance_clipped[:1], self.betas[1:]])
        if is_learned_variance(variance_type):
            raise ValueError(
                f"variance_type {variance_type!r} is predicted by the network, per pixel: it has no fixed table "
                "(see ddpm_pipeline.schedules.learned_log_variance)."
            )
        raise ValueError(f"Unknown variance_type {variance_type!r}: choose one of {', '.join(VARIANCE_TYPES)}.")

    def learned_log_variance_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ends of a learned variance's range on the training chain, ``(log β̃_t, log β_t)``,
        with ``β̃_0`` clipped to ``β̃_1`` as improved-diffusion does (see :func:`learned_log_variance`)."""
        return self.posterior_log_variance_clipped, self.betas.log()

    def prediction_coefficients(self, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each target is linear in ``(x_0, x_t)``: ``p = A_t x_0 + B_t x_t``; returns ``(A, B)``.

        * ``"sample"``: ``A = 1``, ``B = 0``;
        * ``"epsilon"``: ``ε = (x_t - √ᾱ_t x_0)/√(1-ᾱ_t)``, so ``A = -√ᾱ_t/√(1-ᾱ_t)``,
          ``B = 1/√(1-ᾱ_t)``;
        * ``"mu"``: ``μ̃_t = b_t x_0 + c_t x_t``;
        * ``"v_prediction"``: ``v = √ᾱ_t ε - √(1-ᾱ_t) x_0``, so ``A = -1/√(1-ᾱ_t)``,
          ``B = √ᾱ_t/√(1-ᾱ_t)``.
        """
        prediction_type = canonical_prediction_type(prediction_type)
        root_bar = self.sqrt_alphas_cumprod
        root_one_minus = self.sqrt_one_minus_alphas_cumprod
        if prediction_type == "sample":
            return torch.ones_like(self.betas), torch.zeros_like(self.betas)
        if prediction_type == "epsilon":
            return -root_bar / root_one_minus, 1.0 / root_one_minus
        if prediction_type == "mu":
            return self.posterior_mean_coef1, self.posterior_mean_coef2
        return -1.0 / root_one_minus, root_bar / root_one_minus

    def conversion_coefficients(self, from_type: str, to_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k1, k2)`` such that ``q = k1·p + k2·x_t`` turns a prediction ``p`` into ``q``.

        With ``p = A_p x_0 + B_p x_t`` and ``q = A_q x_0 + B_q x_t`` (see
        :meth:`prediction_coefficients`): ``k1 = A_q/A_p`` and ``k2 = B_q - A_q B_p/A_p``. For a μ
        model this inverts the *training* chain's ``μ̃_t = b_t x_0 + c_t x_t`` (DESIGN.md §1).
        """
        a_p, b_p = self.prediction_coefficients(from_type)
        a_q, b_q = self.prediction_coefficients(to_type)
        ratio = a_q / a_p
        return ratio, b_q - ratio * b_p

    def vlb_weights(self, prediction_type: str, variance_type: str) -> torch.Tensor:
        """Per-step weights of the true variational bound for a target, normalized to mean 1.

        ``L_{t-1} = ‖μ̃_t - μ_θ‖²/(2σ_t²)`` and ``μ = b_t x_0 + c_t x_t`` with ``x_0`` linear in the
        target (``dx_0 = dp/A_t``), so ``λ_t = b_t² / (A_t² · 2σ_t²)``: ``1/(2σ_t²)`` for μ,
        ``b_t²/(2σ_t²)`` for x0, ``β_t²/(2σ_t² α_t (1-ᾱ_t))`` for ε. ``σ_t²`` is
        :meth:`model_variance`. Normalized so that ``mean_t λ_t = 1``. A learned variance has no
        fixed ``σ_t²``, so no such weights: its ``"vlb"`` objective is the bound's term ``L_t``
        itself (:func:`~ddpm_pipeline.diffusion_loss_terms`).
        """
        if is_learned_variance(variance_type):
            raise ValueError(
                "The 'vlb' loss weights need a fixed variance σ_t²; with variance_type 'learned_range' the 'vlb' "
                "objective is the bound's term L_t itself, which diffusion_loss computes without weights."
            )
        a, _ = self.prediction_coefficients(prediction_type)
        weights = self.posterior_mean_coef1**2 / (a**2 * 2.0 * self.model_variance(variance_type))
        return weights / weights.mean()

    def signal_to_noise_ratio(self) -> torch.Tensor:
        """``SNR_t = ᾱ_t / (1-ᾱ_t)``: the power of the signal ``√ᾱ_t x_0`` in ``x_t`` over that of
        the noise ``√(1-ᾱ_t) ε``."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def min_snr_weights(self, prediction_type: str, gamma: float = DEFAULT_SNR_GAMMA) -> torch.Tensor:
        """Per-step weights of Min-SNR-γ (Hang et al. 2023) for a target.

        The objective is ``min(SNR_t, γ) · ‖x_0 - x̂_0‖²`` whatever the network predicts: the
        clean-image error weighted by the signal-to-noise ratio, capped at ``γ`` so that the
        nearly noise-free steps do not dominate. On the target ``p = A_t x_0 + B_t x_t``
        (:meth:`prediction_coefficients`), ``‖x_0 - x̂_0‖² = ‖p - p̂‖²/A_t²``, so
        ``λ_t = min(SNR_t, γ)/A_t²``: ``min(SNR_t, γ)/SNR_t`` for ε, ``min(SNR_t, γ)`` for x0,
        ``min(SNR_t, γ)/(SNR_t + 1)`` for v and ``min(SNR_t, γ)/b_t²`` for μ. Not normalized, as in
        diffusers' ``--snr_gamma``: for ε the weights are ``min(1, γ/SNR_t)``, so ``L_simple``'s
        learning rates carry over.
        """
        if not gamma > 0:
            raise ValueError(f"Min-SNR's gamma must be positive, got {gamma}.")
        a, _ = self.prediction_coefficients(prediction_type)
        return self.signal_to_noise_ratio().clamp(max=gamma) / a**2

    def tables(self) -> dict[str, torch.Tensor]:
        """All tables by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def learned_log_variance(variance_values: torch.Tensor, min_log: float | torch.Tensor,
                         max_log: float | torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Improved DDPM's learned variance (``"learned_range"``): the network's output ``v`` per pixel
    interpolates between the logs of the smallest and largest sensible variances,
    ``log σ² = f · log β_t + (1 - f) · log β̃_t`` with ``f = (v + 1)/2``: ``v = -1`` is
    ``fixed_small`` and, for ``t > 0``, ``v = 1`` is ``fixed_large``. ``min_log`` and ``max_log``
    are ``log β̃_t`` and ``log β_t`` of the step taken (the training chain's, or a respaced
    chain's ``β'_t``). ``v`` is not clipped, as in improved-diffusion."""
    fraction = (variance_values + 1.0) / 2.0
    return fraction * max_log + (1.0 - fraction) * min_log
