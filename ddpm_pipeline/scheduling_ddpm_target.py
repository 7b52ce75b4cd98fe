"""`DDPMTargetScheduler`: diffusers' `DDPMScheduler` for three training targets (ε, x0, μ).

All coefficients come from :class:`ddpm_pipeline.schedules.NoiseSchedule` (float64); training,
sampling and evaluation call the methods here instead of re-deriving them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .option_values import (
    DEFAULT_SNR_GAMMA,
    LOSS_WEIGHTINGS,
    TIMESTEP_SPACINGS,
    VARIANCE_TYPES,
    canonical_prediction_type,
    is_learned_variance,
)
from .schedules import BETA_SCHEDULES, LINEAR_REFERENCE_STEPS, NoiseSchedule, learned_log_variance, make_betas

#: Key under which stock-class scheduler configs saved by earlier versions kept this class's
#: original config, whose terms then differed from stock ("cosine", a scaled linear schedule
#: without its betas); read when loading those folders, no longer written: the config is now in
#: stock terms itself.
ORIGINAL_CONFIG_KEY = "_ddpm_pipeline_config"

Timesteps = int | torch.Tensor


class DDPMTargetScheduler(DDPMScheduler):
    """A `DDPMScheduler` whose network may predict the noise ε, the clean image x0 or the mean μ̃.

    It takes every argument of `diffusers.DDPMScheduler`, with these differences:

    * ``beta_schedule``: also ``"cosine"`` (Improved DDPM, s = 0.008, β ≤ 0.999 — the same betas
      as diffusers' ``"squaredcos_cap_v2"``, the name it is stored as); ``"linear"`` scales its end
      points by 1000/T for ``num_train_timesteps`` ≠ 1000 (DESIGN.md §1) and is then stored with
      its betas as ``trained_betas``, and is the stock schedule for T = 1000.
    * ``prediction_type``: ``"epsilon"``, ``"sample"`` (alias ``"x0"``, stored as ``"sample"``),
      ``"mu"`` (the posterior mean μ̃_t) or ``"v_prediction"``.
    * ``variance_type``: ``"fixed_small"`` (σ_t² = β̃_t), ``"fixed_large"`` (σ_t² = β_t) or
      ``"learned_range"`` (Improved DDPM: the network outputs ``2C`` channels, its prediction and
      then ``v ∈ [-1, 1]`` per pixel, with ``log σ_t² = f log β_t + (1-f) log β̃_t``,
      ``f = (v+1)/2``; the stock class samples such a network the same way).

    Every table is computed in float64 (:attr:`schedule`); ``betas``, ``alphas`` and
    ``alphas_cumprod`` hold their float32 roundings, as in the parent.

    The config is therefore always in stock terms, and for every target but μ any diffusers
    scheduler built from it has the same betas, as diffusers' idiom expects:
    ``DDIMScheduler.from_config(pipe.scheduler.config)``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        prediction_type = canonical_prediction_type(prediction_type)
        if trained_betas is None and beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"Unknown beta_schedule {beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)} "
                "or pass trained_betas."
            )
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"Unsupported variance_type {variance_type!r}: DDPMTargetScheduler samples with a fixed variance, "
                "'fixed_small' (σ² = β̃_t) or 'fixed_large' (σ² = β_t), or a learned one, 'learned_range' (Improved DDPM)."
            )
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"Unknown timestep_spacing {timestep_spacing!r}: choose one of {', '.join(TIMESTEP_SPACINGS)}."
            )
        if rescale_betas_zero_snr:
            raise ValueError(
                "rescale_betas_zero_snr=True makes ᾱ_T = 0, where x0, μ and the bound are undefined; "
                "DDPMTargetScheduler does not support it."
            )
        # The parent knows neither "cosine" nor "mu": give it names it accepts, then register ours
        # again (the parent's own registration overwrote them), and replace its float32 tables.
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type="epsilon" if prediction_type == "mu" else prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
            if betas.numel() != num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {betas.numel()} values but num_train_timesteps is {num_train_timesteps}."
                )
        else:
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        ours = {"prediction_type": prediction_type, **_stock_schedule_config(beta_schedule, trained_betas, betas)}
        # diffusers' from_config drops the keys listed as defaults: these are not defaults any more.
        defaults = [key for key in self.config.get("_use_default_values", []) if key not in ours]
        self.register_to_config(**ours, _use_default_values=defaults)
        self.schedule = NoiseSchedule.from_betas(betas)
        self.betas = self.schedule.betas.float()
        self.alphas = self.schedule.alphas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self._device_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._conversions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._previous: dict[int, int] = {}

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """Build from a config dict, ours or another diffusers scheduler's (`DDPMScheduler`,
        `DDIMScheduler`, …; of another sampler's options, those this class takes are kept, except
        its ``variance_type``, which means something else there).

        A stock config that earlier versions wrote with this class's original config under
        ``_ddpm_pipeline_config`` is restored from it exactly. Any other stock config keeps its
        betas: a stock ``"linear"`` schedule with T ≠ 1000 is unscaled, so its betas are passed as
        ``trained_betas``.
        """
        if config is not None and not isinstance(config, dict):
            config = dict(config.config if hasattr(config, "config") else config)
        if config is not None:
            config = _config_from_stock(dict(config))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_stock_scheduler(cls, scheduler: DDPMScheduler) -> DDPMTargetScheduler:
        """Convert a stock `diffusers.DDPMScheduler` instance, keeping its betas exactly."""
        if isinstance(scheduler, cls):
            return scheduler
        return cls.from_config({**scheduler.config, "_class_name": "DDPMScheduler"})

    @property
    def schedule_name(self) -> str | None:
        """The noise schedule's name in this class's terms (``"cosine"`` for diffusers'
        ``"squaredcos_cap_v2"``), or None when the config holds its own betas (``trained_betas``)."""
        if self.config.trained_betas is not None:
            return None
        return "cosine" if self.config.beta_schedule == "squaredcos_cap_v2" else self.config.beta_schedule

    def is_stock_compatible(self) -> bool:
        """Whether stock `diffusers.DDPMScheduler` can sample this model (every target but μ)."""
        return self.config.prediction_type != "mu"

    def to_stock_scheduler(self) -> DDPMScheduler:
        """An equivalent stock `diffusers.DDPMScheduler`, for folders loadable without this package.

        Its config is this one's, which is in stock terms already (``"squaredcos_cap_v2"``, and a
        linear schedule with T ≠ 1000 as ``trained_betas``), so :meth:`from_config` restores every
        option from it. Raises for the μ target, which stock diffusers cannot sample.
        """
        if not self.is_stock_compatible():
            raise ValueError(
                "A μ-prediction scheduler has no stock diffusers equivalent: save it as "
                "DDPMTargetScheduler (loading it then needs `pip install ddpm_pipeline`)."
            )
        return DDPMScheduler(**self.config_options())

    def config_options(self) -> dict[str, Any]:
        """The config's options (not its ``_``-prefixed entries) as JSON values: what
        :meth:`from_config` rebuilds this scheduler from, and what a checkpoint records of it."""
        return {key: _json_safe(value) for key, value in self.config.items() if not key.startswith("_")}

    # ------------------------------------------------------------------ coefficient lookup
    def _coefficient(
        self, name: str, table: torch.Tensor, timesteps: Timesteps, like: torch.Tensor
    ) -> float | torch.Tensor:
        """``table[t]`` shaped to broadcast against ``like``.

        A Python ``int`` (or 0-d tensor) gives a Python float, exact in float64; a tensor of
        per-sample timesteps gives a tensor on ``like``'s device in the working dtype, from a
        per-device cache so no table is copied twice.
        """
        if isinstance(timesteps, (int, np.integer)) or (isinstance(timesteps, torch.Tensor) and timesteps.ndim == 0):
            return float(table[int(timesteps)])
        on_device = self._on_device(name, like.device, _work_dtype(like.dtype), lambda: table)
        values = on_device[timesteps.to(like.device).long()]
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def _on_device(
        self, name: str, device: torch.device, dtype: torch.dtype, build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The float64 table ``build()`` cast to ``dtype`` on ``device``, built and copied once per key."""
        key = (name, device, dtype)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = build().to(dtype=dtype).to(device)
        return table

    def _schedule_coefficient(self, name: str, timesteps: Timesteps, like: torch.Tensor) -> float | torch.Tensor:
        """:meth:`_coefficient` of the :class:`NoiseSchedule` table called ``name``."""
        return self._coefficient(name, getattr(self.schedule, name), timesteps, like)

    # ------------------------------------------------------------------ forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`` (sample from ``q(x_t | x_0)``)."""
        root_bar = self._schedule_coefficient("sqrt_alphas_cumprod", timesteps, original_samples)
        root_one_minus = self._schedule_coefficient("sqrt_one_minus_alphas_cumprod", timesteps, original_samples)
        noisy = root_bar * _work(original_samples) + root_one_minus * _work(noise)
        return noisy.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``v = √ᾱ_t ε - √(1-ᾱ_t) x_0`` (the ``v_prediction`` target)."""
        root_bar = self._schedule_coefficient("sqrt_alphas_cumprod", timesteps, sample)
        root_one_minus = self._schedule_coefficient("sqrt_one_minus_alphas_cumprod", timesteps, sample)
        return (root_bar * _work(noise) - root_one_minus * _work(sample)).to(sample.dtype)

    # ------------------------------------------------------------------ parameterizations
    @property
    def learns_variance(self) -> bool:
        """Whether the network predicts its variance too (``variance_type="learned_range"``)."""
        return is_learned_variance(self.config.variance_type)

    def split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prediction, variance_values)``: a learned-variance network's ``2C`` output channels
        split into its prediction (ε, x0, μ or v; the first ``C``) and ``v`` (the last ``C``); a
        fixed-variance network's output and ``None``. Raises when the channels do not fit."""
        channels = sample.shape[1]
        if self.learns_variance:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type 'learned_range' needs a network with 2 × {channels} output channels (its prediction, "
                    f"then the variance), got {model_output.shape[1]}: build the UNet with out_channels={2 * channels}."
                )
            prediction, variance_values = model_output.split(channels, dim=1)
            return prediction, variance_values
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}: with "
                f"variance_type {self.config.variance_type!r} the network predicts one value per pixel (a network "
                "with twice the channels learned its variance: use variance_type 'learned_range')."
            )
        return model_output, None

    def convert_prediction(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timesteps: Timesteps,
        to_type: str,
        from_type: str | None = None,
    ) -> torch.Tensor:
        """Turn a prediction of one target into another: ``q = k1_t·p + k2_t·x_t``.

        Every target is linear in ``(x_0, x_t)`` given ``x_t`` (see
        :meth:`NoiseSchedule.conversion_coefficients`); ``k1, k2`` are exact float64 coefficients of
        the *training* chain at ``timesteps``. ``from_type`` defaults to the configured
        ``prediction_type``. Types: ``"epsilon"``, ``"sample"``/``"x0"``, ``"mu"``, ``"v_prediction"``.
        A learned-variance network's whole output may be passed: its variance channels are dropped.
        """
        if self.learns_variance and model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        from_type = canonical_prediction_type(from_type or self.config.prediction_type)
        to_type = canonical_prediction_type(to_type)
        if from_type == to_type:
            return model_output
        name = f"{from_type}->{to_type}"
        if name not in self._conversions:
            self._conversions[name] = self.schedule.conversion_coefficients(from_type, to_type)
        k1, k2 = self._conversions[name]
        c1 = self._coefficient(name + ":k1", k1, timesteps, sample)
        c2 = self._coefficient(name + ":k2", k2, timesteps, sample)
        out = c1 * _work(model_output) + c2 * _work(sample)
        return out.to(model_output.dtype)

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """``x̂_0`` from the network output: ``(x_t - √(1-ᾱ_t) ε̂)/√ᾱ_t`` for ε, itself for x0, and
        ``(μ̂ - c_t x_t)/b_t`` for μ (training-chain ``b_t, c_t``)."""
        return self.convert_prediction(model_output, sample, timesteps, "sample")

    def predict_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """``ε̂`` from the network output: ``(x_t - √ᾱ_t x̂_0)/√(1-ᾱ_t)``, or itself for ε."""
        return self.convert_prediction(model_output, sample, timesteps, "epsilon")

    def predict_mu(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """``μ̂`` of the training chain's one-step posterior: ``b_t x̂_0 + c_t x_t``
        ``= (x_t - β_t/√(1-ᾱ_t) ε̂)/√α_t``, or itself for μ."""
        return self.convert_prediction(model_output, sample, timesteps, "mu")

    def posterior_mean(
        self, original_samples: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps
    ) -> torch.Tensor:
        """``μ̃_t(x_t, x_0) = b_t x_0 + c_t x_t``, the mean of ``q(x_{t-1} | x_t, x_0)``."""
        return self.convert_prediction(original_samples, sample, timesteps, "mu", from_type="sample")

    def posterior_mean_variance(
        self, original_samples: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)``: returns ``(μ̃_t, log β̃_t)`` (the log variance
        clipped at t = 0 to ``log β̃_1``, where ``β̃_0 = 0``), in the working dtype."""
        mean = self.posterior_mean(_work(original_samples), _work(sample), timesteps)
        log_variance = self._schedule_coefficient("posterior_log_variance_clipped", timesteps, mean)
        return mean, torch.as_tensor(log_variance, dtype=mean.dtype, device=mean.device).expand_as(mean)

    def model_mean_variance(
        self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse step on the training chain, ``p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t² I)``: returns
        ``(μ_θ, log σ_t²)`` with ``μ_θ = μ̃_t(x_t, x̂_0)``, ``x̂_0`` from :meth:`predict_x0` (clipped to
        ``±clip_sample_range`` when ``clip_sample``, as :meth:`step` does), and ``σ_t²`` the
        configured variance (:meth:`NoiseSchedule.model_variance`: ``β̃_t`` or ``β_t``, ``β̃_1`` at t = 0),
        or the learned one, ``log σ_t² = f log β_t + (1-f) log β̃_t`` with ``f = (v+1)/2`` from the
        network's variance channels (:func:`~ddpm_pipeline.schedules.learned_log_variance`; ``β̃_1`` for
        ``β̃_0``)."""
        prediction, variance_values = self.split_model_output(model_output, sample)
        x0 = self.predict_x0(_work(prediction), _work(sample), timesteps)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean = self.posterior_mean(x0, _work(sample), timesteps)
        variance_type = self.config.variance_type
        if variance_values is not None:
            min_log, max_log = self.schedule.learned_log_variance_bounds()
            lower = self._coefficient("learned:min_log", min_log, timesteps, mean)
            upper = self._coefficient("learned:max_log", max_log, timesteps, mean)
            return mean, learned_log_variance(variance_values.to(mean.dtype), lower, upper)
        table = self._on_device(
            f"log_variance:{variance_type}",
            mean.device,
            mean.dtype,
            lambda: self.schedule.model_variance(variance_type).log(),
        )
        if isinstance(timesteps, torch.Tensor) and timesteps.ndim > 0:
            log_variance = table[timesteps.to(mean.device).long()].reshape(-1, *([1] * (mean.ndim - 1)))
        else:
            log_variance = table[int(timesteps)]
        return mean, log_variance.expand_as(mean)

    def get_target(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        noisy_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The regression target for ``x_t = add_noise(x_0, ε, t)``: ``ε`` for ``"epsilon"``,
        ``x_0`` for ``"sample"``, ``μ̃_t = b_t x_0 + c_t x_t`` for ``"mu"`` and
        ``√ᾱ_t ε - √(1-ᾱ_t) x_0`` for ``"v_prediction"``.

        Pass ``noisy_samples`` (``x_t``) when it is already computed, to reuse it for μ.
        """
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return original_samples
        if prediction_type == "v_prediction":
            return self.get_velocity(original_samples, noise, timesteps)
        if noisy_samples is None:
            noisy_samples = self.add_noise(original_samples, noise, timesteps)
        return self.posterior_mean(original_samples, noisy_samples, timesteps)

    def loss_weight(
        self, timesteps: torch.Tensor, weighting: str = "simple", snr_gamma: float = DEFAULT_SNR_GAMMA
    ) -> torch.Tensor:
        """Per-sample loss weights ``λ_t``, float32, on ``timesteps``' device.

        ``"simple"``: all ones (DDPM's ``L_simple`` for ε). ``"vlb"``: the true variational bound's
        weight for the configured target, ``λ_t = b_t² / (A_t² · 2σ_t²)`` normalized to mean 1 over
        t (:meth:`NoiseSchedule.vlb_weights`): ``1/(2σ_t²)`` for μ, ``b_t²/(2σ_t²)`` for x0,
        ``β_t²/(2σ_t² α_t (1-ᾱ_t))`` for ε. ``"min_snr"``: Min-SNR-γ's ``λ_t = min(SNR_t, γ)/A_t²``
        with ``γ = snr_gamma`` (:meth:`NoiseSchedule.min_snr_weights`): ``min(1, γ/SNR_t)`` for ε,
        ``min(SNR_t, γ)`` for x0.
        """
        if weighting == "simple":
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        target = self.config.prediction_type
        if weighting == "vlb":
            name, build = "vlb", partial(self.schedule.vlb_weights, target, self.config.variance_type)
        elif weighting == "min_snr":
            name, build = f"min_snr:{snr_gamma!r}", partial(self.schedule.min_snr_weights, target, snr_gamma)
        else:
            raise ValueError(f"Unknown loss weighting {weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}.")
        return self._on_device(name, timesteps.device, torch.float32, build)[timesteps.long()]

    # ------------------------------------------------------------------ sampling
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps (as the parent does: ``timestep_spacing`` decides which
        ``num_inference_steps`` of the T training steps are visited, or pass ``timesteps``), and
        remember each one's predecessor so that :meth:`step` needs no search."""
        if num_inference_steps is None and timesteps is None:
            num_inference_steps = self.config.num_train_timesteps
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}.")
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)
        visited = [int(t) for t in self.timesteps.tolist()]
        if visited[-1] < 0 or visited[0] >= self.config.num_train_timesteps:
            raise ValueError(
                f"timesteps must lie in [0, {self.config.num_train_timesteps - 1}]; got {visited[0]}..{visited[-1]} "
                "(check steps_offset and timestep_spacing)."
            )
        self._previous = dict(zip(visited, visited[1:] + [-1], strict=True))

    def previous_timestep(self, timestep: Timesteps) -> int:
        """The timestep that :meth:`step` moves to from ``timestep`` (``-1`` after the last)."""
        t = int(timestep)
        if self._previous:
            if t not in self._previous:
                raise ValueError(f"timestep {t} is not in the scheduler's timesteps; call set_timesteps first.")
            return self._previous[t]
        return t - 1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Timesteps,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One ancestral step ``x_t → x_{t'}`` with ``t'`` the previous visited timestep.

        1. ``x̂_0`` from the prediction with the *training* chain's coefficients
           (:meth:`predict_x0`; for μ, ``x̂_0 = (μ̂ - c_t x_t)/b_t``), then clipped/thresholded as
           configured;
        2. the posterior of the (possibly respaced) step, ``β'_t = 1 - ᾱ_t/ᾱ_{t'}``:
           ``μ = √ᾱ_{t'} β'_t/(1-ᾱ_t) · x̂_0 + √(1-β'_t)(1-ᾱ_{t'})/(1-ᾱ_t) · x_t``;
        3. ``x_{t'} = μ + σ z`` with ``σ² = β̃'_t = (1-ᾱ_{t'})/(1-ᾱ_t) β'_t`` (``fixed_small``),
           ``β'_t`` (``fixed_large``) or ``exp(f log β'_t + (1-f) log β̃'_t)``, ``f = (v+1)/2``, per
           pixel (``learned_range``: the network's last ``C`` channels are ``v``), ``z ~ N(0, I)``
           drawn as the parent draws it, and ``z = 0`` at ``t = 0``.

        Half-precision inputs are computed in float32 and returned in ``sample``'s dtype; ``z`` is
        then drawn in float32 too (the parent draws it in the network's dtype, which rounds a bf16
        draw to 8 bits), so a half-precision network sees the same noise as a float32 one.
        """
        model_output, variance_values = self.split_model_output(model_output, sample)
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alphas_cumprod = self.schedule.alphas_cumprod
        alpha_bar_t = float(alphas_cumprod[t])
        alpha_bar_prev = float(alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta_t = float(self.schedule.betas[t]) if prev_t == t - 1 else 1.0 - alpha_bar_t / alpha_bar_prev

        pred_original_sample = self.predict_x0(_work(model_output), _work(sample), t)
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)

        coef_x0 = alpha_bar_prev**0.5 * beta_t / (1.0 - alpha_bar_t)
        coef_xt = (1.0 - beta_t) ** 0.5 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        prev_sample = coef_x0 * pred_original_sample + coef_xt * _work(sample)

        if t > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=_work_dtype(model_output.dtype)
            )
            small_variance = max((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t, 1e-20)
            if variance_values is not None:
                log_variance = learned_log_variance(_work(variance_values), math.log(small_variance), math.log(beta_t))
                prev_sample = prev_sample + torch.exp(0.5 * log_variance) * _work(noise)
            else:
                variance = small_variance if self.config.variance_type == "fixed_small" else beta_t
                prev_sample = prev_sample + variance**0.5 * _work(noise)

        prev_sample = prev_sample.to(sample.dtype)
        pred_original_sample = pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (their arithmetic is done in float32), else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _work(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(_work_dtype(tensor.dtype))


def _json_safe(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _stock_schedule_config(beta_schedule: str, trained_betas: Any, betas: torch.Tensor) -> dict[str, Any]:
    """The schedule's config entries in the terms of every diffusers scheduler: ``"cosine"`` as
    diffusers' identical ``"squaredcos_cap_v2"``, and this class's scaled linear schedule (its
    end points × 1000/T, which diffusers' ``"linear"`` does not scale) as ``trained_betas``."""
    if trained_betas is not None:
        return {"beta_schedule": beta_schedule, "trained_betas": _json_safe(trained_betas)}
    if beta_schedule == "cosine":
        return {"beta_schedule": "squaredcos_cap_v2", "trained_betas": None}
    if beta_schedule == "linear" and len(betas) != LINEAR_REFERENCE_STEPS:
        return {"beta_schedule": "linear", "trained_betas": betas.tolist()}
    return {"beta_schedule": beta_schedule, "trained_betas": None}


def _config_from_stock(config: dict[str, Any]) -> dict[str, Any]:
    """Map a stock diffusers scheduler's config onto this class's meaning of each option."""
    original = config.pop(ORIGINAL_CONFIG_KEY, None)
    if original is not None:  # complete: no key falls back to a default
        config.pop("_use_default_values", None)
        return {**config, **original, "_class_name": DDPMTargetScheduler.__name__}
    if config.get("_class_name") in (None, DDPMTargetScheduler.__name__):  # ours: as it is
        return config
    if config["_class_name"] != DDPMScheduler.__name__:
        # Another sampler (DDIM, DPM-Solver, …): keep the options this class takes, except variance_type,
        # which means something else there (DPM-Solver: whether the network learned it), so the DDPM
        # chain's default stands.
        accepted = inspect.signature(DDPMTargetScheduler.__init__).parameters.keys() - {"self", "variance_type"}
        config = {k: v for k, v in config.items() if k.startswith("_") or k in accepted}
    num_steps = config.get("num_train_timesteps", 1000)
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") == "linear" and num_steps != LINEAR_REFERENCE_STEPS:
        # stock "linear" is unscaled for T ≠ 1000, ours is scaled: keep the stock betas.
        start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
        config["trained_betas"] = torch.linspace(start, end, num_steps, dtype=torch.float64).tolist()
        # diffusers drops keys listed as defaults before calling __init__: this one is not a default now
        config["_use_default_values"] = [k for k in config.get("_use_default_values", []) if k != "trained_betas"]
    return config
