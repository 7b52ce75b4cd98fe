"""The variational bound on the negative log-likelihood, in bits per dimension (DESIGN.md §1).

``-log p(x_0) ≤ L = L_T + Σ_{t=2}^{T} L_{t-1} + L_0`` with (paper indices; diffusers' timestep
``t`` is the paper's ``t + 1``)

* ``L_T = KL(q(x_T | x_0) ‖ N(0, I))``, the prior term;
* ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))``, KLs between diagonal Gaussians;
* ``L_0 = -log p_θ(x_0 | x_1)``, a discretized Gaussian over the 256 pixel bins (data in
  ``[-1, 1]``, bin width ``2/255``, the outermost bins extended to ``±∞``).

Each term is summed over pixels (nats) and divided by ``D · ln 2`` (``D = C·H·W``). The means and
variances come from :class:`~ddpm_pipeline.DDPMTargetScheduler`
(:meth:`~ddpm_pipeline.DDPMTargetScheduler.posterior_mean_variance`,
:meth:`~ddpm_pipeline.DDPMTargetScheduler.model_mean_variance`), so ε, x0 and μ models and both
variance types share this code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .scheduling_ddpm_target import DDPMTargetScheduler
from .seeding import derive_seed

#: Half the width of a pixel bin for data scaled to [-1, 1].
HALF_BIN = 1.0 / 255.0


def normal_kl(mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor, log_var_2: torch.Tensor) -> torch.Tensor:
    """``KL(N(m₁, v₁) ‖ N(m₂, v₂)) = ½ (log v₂ - log v₁ + v₁/v₂ + (m₁ - m₂)²/v₂ - 1)``, elementwise, nats."""
    return 0.5 * (log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2) + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """``log P(bin of x)`` under ``N(mean, exp(log_scale)²)``, elementwise, nats.

    ``x`` holds pixel values ``k/127.5 - 1`` (``k = 0..255``); the bin is ``[x - 1/255, x + 1/255]``
    with the lowest bin extended to ``-∞`` and the highest to ``+∞``:
    ``log(Φ((x + 1/255 - m)/s) - Φ((x - 1/255 - m)/s))``. Computed in float64 with ``log Φ``
    for the edge bins and, in the middle, ``log Φ(b) + log(1 - Φ(a)/Φ(b))`` on the bin's mirror
    image ``(a, b) = (-u, -l)`` when it lies above the mean (``Φ(u) - Φ(l) = Φ(-l) - Φ(-u)``), so
    that no bin's probability cancels to a spurious 0. Every branch is finite with finite
    gradients, so the term can be trained through (the hybrid objective of a learned variance).
    """
    x, mean, log_scale = (torch.as_tensor(v, dtype=torch.float64) for v in (x, mean, log_scale))
    inverse_scale = torch.exp(-log_scale)
    upper = (x - mean + HALF_BIN) * inverse_scale
    lower = (x - mean - HALF_BIN) * inverse_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(u): everything below the top edge
    log_survival_lower = torch.special.log_ndtr(-lower)  # log(1 - Φ(l)): everything above the bottom edge
    # A middle bin's Φ(u) - Φ(l), computed on the side of the mean where it lies (the lower tail), so
    # that it does not cancel; one formula for every bin (no masked-out branch to turn gradients NaN).
    above = x > mean
    low = torch.where(above, -upper, lower)
    high = torch.where(above, -lower, upper)
    log_high = torch.special.log_ndtr(high)
    log_middle = log_high + torch.log1p(-torch.exp(torch.special.log_ndtr(low) - log_high))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_middle))


@dataclass
class BoundTerms:
    """Per-image terms of the bound, in bits/dim (tensors ``[N]``)."""

    prior: torch.Tensor
    """``L_T / (D ln 2)``."""
    diffusion: torch.Tensor
    """``Σ_{t≥2} L_{t-1} / (D ln 2)``, exact or an unbiased estimate (see :func:`variational_bound`)."""
    decoder: torch.Tensor
    """``L_0 / (D ln 2)``."""
    per_timestep: torch.Tensor | None = None
    """``[N, T]``: ``L_{t-1}`` per diffusers timestep (index 0 holds ``L_0``), bits/dim, when every t was computed."""
    data_share: torch.Tensor | None = None
    """``[N]``, after :meth:`per_data_dimension`: the share of the canvas each image fills (1 for
    all of it, less for an image padded onto it), whose own dimensions ``D`` counts; None: ``D`` is
    the canvas's ``C·H·W``."""

    @property
    def total(self) -> torch.Tensor:
        """The whole bound per image, ``L_T + Σ L_{t-1} + L_0``."""
        return self.prior + self.diffusion + self.decoder

    def per_data_dimension(self, share: torch.Tensor) -> BoundTerms:
        """These terms (per dimension of the canvas) per dimension of each image itself: divided by
        ``share``, the share of the canvas each image fills (``[N]``;
        :meth:`~ddpm_pipeline.images.ImagePreprocessor.data_share`). For an image padded onto the
        canvas, the bound on ``-log p(x, padding)`` is one on ``-log p(x)``, since
        ``p(x) ≥ p(x, padding)``: divided by the image's own dimensions, it is that image's bound in
        bits/dim, comparable with numbers for the images at their own size (Fashion-MNIST's 28×28
        on a 32×32 canvas: ×1024/784), where dividing by the canvas's would dilute it with the
        padding's nearly free dimensions."""
        share = share.to(self.prior.dtype)
        return BoundTerms(
            prior=self.prior / share,
            diffusion=self.diffusion / share,
            decoder=self.decoder / share,
            per_timestep=None if self.per_timestep is None else self.per_timestep / share[:, None],
            data_share=share,
        )

    @classmethod
    def concatenate(cls, parts: list[BoundTerms]) -> BoundTerms:
        """The terms of several batches as one (``per_timestep`` only when every part has it;
        ``data_share`` when any part has it, 1 for the images of those without)."""
        curves = [part.per_timestep for part in parts]
        shares = [part.data_share for part in parts]
        if any(share is not None for share in shares):
            shares = [torch.ones_like(part.prior) if share is None else share for part, share in zip(parts, shares, strict=True)]
        return cls(
            prior=torch.cat([part.prior for part in parts]),
            diffusion=torch.cat([part.diffusion for part in parts]),
            decoder=torch.cat([part.decoder for part in parts]),
            per_timestep=None if any(curve is None for curve in curves) else torch.cat(curves),
            data_share=None if shares[0] is None else torch.cat(shares),
        )

    def summary(self) -> dict[str, float | int | None]:
        """Means over the ``N`` images, bits/dim: the bound (``bits_per_dim``) with its standard
        error ``s/√N`` (``s`` the sample standard deviation; ``None`` for one image), and each term.
        When some images are padded onto the canvas (:meth:`per_data_dimension`), also how many
        (``padded_images``) and the bound per dimension of the canvas (``canvas_bits_per_dim``, the
        number earlier versions reported)."""
        total = self.total
        count = len(total)
        summary = {
            "bits_per_dim": float(total.mean()),
            "bits_per_dim_stderr": float(total.std() / math.sqrt(count)) if count > 1 else None,
            "prior_term": float(self.prior.mean()),
            "diffusion_terms": float(self.diffusion.mean()),
            "decoder_term": float(self.decoder.mean()),
        }
        padded = 0 if self.data_share is None else int((self.data_share < 1).sum())
        if padded:
            summary.update(padded_images=padded, canvas_bits_per_dim=float((total * self.data_share).mean()))
        return summary


def prior_bpd(scheduler: DDPMTargetScheduler, original_samples: torch.Tensor) -> torch.Tensor:
    """``L_T = KL(N(√ᾱ_T x_0, (1-ᾱ_T) I) ‖ N(0, I))`` per image, bits/dim."""
    x0 = original_samples.double()
    last = scheduler.config.num_train_timesteps - 1
    alpha_bar = float(scheduler.schedule.alphas_cumprod[last])
    mean = math.sqrt(alpha_bar) * x0
    log_var = torch.full_like(x0, math.log1p(-alpha_bar))
    kl = normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))
    return _bits_per_dim(kl)


def timestep_bpd(
    model_output: torch.Tensor,
    scheduler: DDPMTargetScheduler,
    original_samples: torch.Tensor,
    noisy_samples: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """One term per image at diffusers timesteps ``t`` (``[N]``), bits/dim: the decoder NLL
    ``-log p_θ(x_0 | x_t)`` where ``t = 0``, otherwise ``KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t))``."""
    x0, xt, output = original_samples.double(), noisy_samples.double(), model_output.double()
    true_mean, true_log_var = scheduler.posterior_mean_variance(x0, xt, timesteps)
    model_mean, model_log_var = scheduler.model_mean_variance(output, xt, timesteps)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    is_decoder = (timesteps == 0).reshape(-1, *([1] * (x0.ndim - 1)))
    return _bits_per_dim(torch.where(is_decoder, decoder, kl))


def timestep_strata(num_train_timesteps: int, num_strata: int) -> list[int]:
    """Edges ``e_0 = 1 < e_1 < … < e_K = T`` of ``K`` strata of the diffusion timesteps
    ``1..T-1`` (stratum ``k`` is ``e_k ≤ t < e_{k+1}``), log-spaced: ``e_k ≈ (T-1)^{k/K}``, each at
    least one timestep wide. The terms ``L_{t-1}`` fall steeply with ``t`` (half of the sum can lie
    in the first ten), so the small timesteps get strata of their own, computed exactly.
    """
    count = num_train_timesteps - 1
    if not 1 <= num_strata <= count:
        raise ValueError(f"num_strata must be between 1 and T-1 = {count}, got {num_strata}.")
    edges = [0]
    for k in range(1, num_strata):
        geometric = math.floor(count ** (k / num_strata))
        edges.append(min(max(edges[-1] + 1, geometric), count - (num_strata - k)))
    edges.append(count)
    return [edge + 1 for edge in edges]


def stratified_timesteps(
    num_train_timesteps: int, num_strata: int, batch: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep drawn uniformly from each stratum of :func:`timestep_strata`, per image
    (``[batch, K]``, long), and each stratum's width ``w_k`` (``[K]``, float64).

    ``Σ_k w_k L_{t_k - 1}`` is an unbiased estimate of ``Σ_{t=1}^{T-1} L_{t-1}``: every ``t`` lies
    in exactly one stratum and is drawn from it with probability ``1 / w_k``.
    """
    edges = torch.tensor(timestep_strata(num_train_timesteps, num_strata), dtype=torch.long)
    starts, widths = edges[:-1], edges[1:] - edges[:-1]
    uniform = torch.rand(batch, num_strata, generator=generator, dtype=torch.float64,
                         device=generator.device if generator else "cpu").cpu()  # fmt: skip
    offsets = (uniform * widths).floor().long().clamp(max=widths - 1)
    return starts + offsets, widths.double()


@torch.no_grad()
def is_exact_bound(num_train_timesteps: int, num_timesteps: int | None) -> bool:
    """Whether :func:`variational_bound` with ``num_timesteps`` computes every ``L_{t-1}`` (None, or
    at least ``T - 1`` timesteps) rather than an estimate from ``num_timesteps`` strata."""
    return num_timesteps is None or num_timesteps >= num_train_timesteps - 1


def bound_evaluations_per_image(num_train_timesteps: int, num_timesteps: int | None) -> int:
    """The network evaluations :func:`variational_bound` makes per image: the decoder's at ``t = 0``
    and one per timestep, ``T`` for the exact bound, ``K + 1`` for an estimate from ``K``."""
    return num_train_timesteps if is_exact_bound(num_train_timesteps, num_timesteps) else num_timesteps + 1


def variational_bound(
    unet: Callable[..., object],
    scheduler: DDPMTargetScheduler,
    original_samples: torch.Tensor,
    num_timesteps: int | None = None,
    generator: torch.Generator | None = None,
    show_progress: bool = False,
) -> BoundTerms:
    """The bound's terms for a batch of images in ``[-1, 1]`` (quantized to the 256 levels).

    ``num_timesteps=None`` computes every ``L_{t-1}`` (``T`` network evaluations per image): the
    exact bound. An integer ``K < T - 1`` estimates ``Σ_{t≥2} L_{t-1}`` without bias from ``K``
    timesteps per image, one drawn uniformly from each of ``K`` log-spaced strata of ``1..T-1``
    and weighted by its stratum's width (:func:`stratified_timesteps`; the first strata are single
    timesteps, so the steep start of the sum is computed exactly). The prior and decoder terms are
    always exact. ``x_t`` is drawn from ``q(x_t | x_0)`` with ``generator`` (each KL is in closed
    form given ``x_t``, so the bound is an expectation over those draws, as in DDPM and
    improved-diffusion).
    """
    check_model_range(original_samples)
    device = original_samples.device
    model_dtype = original_samples.dtype  # the network sees x_t in the images' dtype; the terms are float64
    x0 = quantize(original_samples.double())
    batch = x0.shape[0]
    num_train = scheduler.config.num_train_timesteps
    exact = is_exact_bound(num_train, num_timesteps)
    if exact:
        chosen = torch.arange(1, num_train, device=device).expand(batch, -1)
        weights = torch.ones(num_train - 1, dtype=torch.float64)
    else:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1 (or None for every timestep), got {num_timesteps}.")
        chosen, weights = stratified_timesteps(num_train, num_timesteps, batch, generator)
        chosen = chosen.to(device)
    all_timesteps = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), chosen.long()], dim=1)
    terms = torch.zeros(batch, all_timesteps.shape[1], dtype=torch.float64, device=device)
    columns = range(all_timesteps.shape[1])
    for column in tqdm(columns, desc="timesteps of the bound", disable=not show_progress, leave=False):
        t = all_timesteps[:, column]
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else "cpu")
        xt = scheduler.add_noise(x0, noise.to(device=device, dtype=x0.dtype), t)
        output = unet(xt.to(model_dtype), t)
        output = getattr(output, "sample", output)
        terms[:, column] = timestep_bpd(output, scheduler, x0, xt, t)
    return BoundTerms(
        prior=prior_bpd(scheduler, x0).cpu(),
        diffusion=(terms[:, 1:].cpu() * weights).sum(dim=1),
        decoder=terms[:, 0].cpu(),
        per_timestep=terms.cpu() if exact else None,
    )


def batch_bound(
    unet: Callable[..., object],
    scheduler: DDPMTargetScheduler,
    images: torch.Tensor,
    num_timesteps: int | None,
    seed: int,
    batch_index: int,
    show_progress: bool = False,
) -> BoundTerms:
    """:func:`variational_bound` of batch ``batch_index`` of a data set, its timesteps and ``x_t``
    drawn from a CPU generator seeded by ``derive_seed(seed, batch_index)``: the same images give the
    same terms whichever process or measurement computes them (``eval_metrics.py``'s bits/dim and
    the held-out bound during training alike)."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, batch_index))
    return variational_bound(unet, scheduler, images, num_timesteps, generator, show_progress=show_progress)


def check_model_range(images: torch.Tensor) -> None:
    """Raise unless ``images`` are floats in the model's range ``[-1, 1]`` (``pixel/127.5 - 1``),
    within half a bin (:data:`HALF_BIN`): :func:`quantize` would clamp pixels of 0–255 to white,
    and the bound would be that of other images, without a word."""
    if images.numel() == 0:
        return
    if not images.is_floating_point():
        raise TypeError(f"The bound takes float images in [-1, 1], got {images.dtype}: convert 0–255 pixels with "
                        "ddpm_pipeline.images.levels_to_model_range (pixel/127.5 - 1).")  # fmt: skip
    low, high = torch.stack(torch.aminmax(images)).tolist()  # one pass, one read-back
    if low < -1 - HALF_BIN or high > 1 + HALF_BIN:
        hint = "0–255 pixels with levels_to_model_range (pixel/127.5 - 1)" if high > 2 else "them to [-1, 1]"
        raise ValueError(f"The bound takes images in [-1, 1], the range the model was trained on; these span "
                         f"[{low:.4g}, {high:.4g}]. Convert {hint}.")  # fmt: skip


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Snap values in ``[-1, 1]`` to the 256 levels ``k/127.5 - 1`` (the data the bound is of)."""
    return (((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1).to(images.dtype)


def _bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension, divided by ``D · ln 2``."""
    per_image = nats.flatten(1)
    return per_image.sum(dim=1) / (per_image.shape[1] * math.log(2.0))
