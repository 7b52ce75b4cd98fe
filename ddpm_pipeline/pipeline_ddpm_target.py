"""`DDPMTargetPipeline`: `diffusers.DDPMPipeline` for ε, x0 and μ models, with trajectories."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_ddpm_target import DDPMTargetScheduler
from .speed import (
    compile_module,
    cpu_precision_advice,
    explain_compile_failure,
    is_channels_last,
    needs_full_precision,
    resolve_channels_last,
    resolve_compile,
    resolve_sampling_dtype,
    set_tf32,
    to_channels_last,
)
from .trajectory import DDPMTrajectory
from .unet_presets import sample_height_width

OUTPUT_TYPES = ("pil", "np", "pt")
#: how to sample without torch.compile, for the error that says it failed
UNCOMPILED_SAMPLING = ("load the pipeline afresh and call enable_fast_sampling(compile=False), or pass "
                       "--fast_sampling off to eval_metrics.py")  # fmt: skip
STOCK_UNET = ("diffusers", "UNet2DModel")
PACKAGE_SCHEDULER = ("ddpm_pipeline", "DDPMTargetScheduler")
#: diffusers' step-end callback: ``f(pipe, step_index, timestep, callback_kwargs) -> dict``, or its callback classes
StepEndCallback = Callable[[DDPMPipeline, int, Any, dict], dict] | PipelineCallback | MultiPipelineCallbacks


@dataclass
class DDPMTargetPipelineOutput(ImagePipelineOutput):
    """``images`` as the parent returns them, and the ``trajectory`` when one was asked for."""

    trajectory: DDPMTrajectory | None = None


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype=dtype)``, in place. diffusers' ``ModelMixin.to`` (0.42, for one) warns at
    every cast that modules "should be kept in float32", naming none when the model keeps none
    (`UNet2DModel`): such a model is cast as a plain ``torch.nn.Module``, which is all that call does."""
    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(dtype=dtype)
    else:
        torch.nn.Module.to(model, dtype=dtype)


class DDPMTargetPipeline(DDPMPipeline):
    """Ancestral DDPM sampling for networks that predict ε, x0 or μ (and v), full or respaced,
    with a fixed variance or a learned one (``variance_type="learned_range"``: the UNet outputs
    twice the image's channels; other schedulers get the prediction channels alone).

    Parameters:
        unet: the denoising `UNet2DModel` (or :class:`~ddpm_pipeline.DDPMUNet`).
        scheduler: a :class:`~ddpm_pipeline.DDPMTargetScheduler`; a stock `DDPMScheduler` is
            converted to one with the same betas and options. Any other diffusers scheduler
            (``DDIMScheduler``, ``DPMSolverMultistepScheduler``, …) samples ε, x0 and v models
            as it would in diffusers; the idiom is
            ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``, which keeps the
            training betas exactly (the scheduler's config is in stock terms).

    ``save_pretrained`` writes a folder that ``diffusers.DDPMPipeline.from_pretrained`` loads:
    with stock class names only (no need for this package) for ε, x0 and v targets; with
    ``["ddpm_pipeline", "DDPMTargetScheduler"]`` for μ, which then needs ``ddpm_pipeline``
    installed.
    """

    #: what ``callback_on_step_end`` may read and replace: the state after the step
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        # converted here too: register_modules records the module's class before __setattr__ runs
        super().__init__(unet=unet, scheduler=_sampling_scheduler(scheduler))
        # DDPMUNet adds no config: record it as the stock class it saves as.
        if isinstance(unet, UNet2DModel):
            self.register_to_config(unet=STOCK_UNET)
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def num_timesteps(self) -> int:
        """How many steps the current (or last) call visits."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a ``callback_on_step_end`` to stop the chain after that
        step (diffusers' convention): the call returns the state that step reached, as images."""
        return self._interrupt

    def __setattr__(self, name: str, value) -> None:
        """Setting ``scheduler`` (in ``__init__`` or later, diffusers' way of swapping samplers)
        converts a stock `DDPMScheduler` to a `DDPMTargetScheduler` and checks any other."""
        if name == "scheduler":
            value = _sampling_scheduler(value)
        super().__setattr__(name, value)
        if name == "scheduler" and isinstance(value, DDPMTargetScheduler) and hasattr(self, "_internal_dict"):
            self.register_to_config(scheduler=PACKAGE_SCHEDULER)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as a `DDPMPipeline` folder (``model_index.json``, ``unet/``, ``scheduler/``).

        For ε, x0 and v the scheduler is written as a stock `DDPMScheduler`
        (:meth:`DDPMTargetScheduler.to_stock_scheduler`: the config is in stock terms already), so
        the folder loads without ``ddpm_pipeline``. Keyword arguments go to
        `DiffusionPipeline.save_pretrained`.
        """
        if not isinstance(self.scheduler, DDPMTargetScheduler):  # another diffusers scheduler: as it is
            portable = DDPMPipeline(unet=self.unet, scheduler=self.scheduler)
        elif self.scheduler.is_stock_compatible():
            portable = DDPMPipeline(unet=self.unet, scheduler=self.scheduler.to_stock_scheduler())
        else:
            portable = DDPMPipeline(unet=self.unet, scheduler=self.scheduler)
            portable.register_to_config(scheduler=PACKAGE_SCHEDULER)
        portable.register_to_config(unet=self.config.unet)
        portable.save_pretrained(save_directory, **kwargs)

    def enable_fast_sampling(
        self,
        dtype: torch.dtype | str | None = "auto",
        channels_last: bool | None = None,
        compile: bool | None = None,
        compile_mode: str | None = None,
        allow_tf32: bool | None = None,
    ) -> DDPMTargetPipeline:
        """Switch on the fast sampling paths, in place (call after ``pipe.to(device)``); returns the pipeline.

        Args:
            dtype: the UNet's dtype; ``"auto"`` = bfloat16 on CUDA (float16 before Ampere),
                float32 on the CPU and for μ models (see :mod:`ddpm_pipeline.speed`). The state
                ``x_t`` and the scheduler's arithmetic stay in float32 whatever the UNet's dtype.
            channels_last: NHWC weights and activations (``None``: on for CUDA, and on the CPU
                when compiling, where it is most of what compiling gains).
            compile: ``torch.compile`` the UNet in place (``None``: on for CUDA when Triton supports
                the GPU; ``True`` where it does not raises, naming the fix). On the CPU an opt-in
                that needs a C++ compiler: Inductor's C++ kernels with channels_last gave 1.28–1.37×
                the UNet evaluations/s on the 2-core reference CPU, after 15–60 s of compiling
                (README, Speed).
            compile_mode: ``None`` = ``"reduce-overhead"`` on CUDA, which replays the fixed-shape
                UNet call as a CUDA graph, and the default mode elsewhere.
            allow_tf32: TF32 tensor cores for float32 work on CUDA (``None``: on except for μ).

        For reproducible and fast sampling on a GPU, pass a generator on the device
        (``torch.Generator("cuda")``): a CPU generator draws each step's noise on the CPU and copies it.
        """
        device = self.unet.device
        prediction_type = self.scheduler.config.prediction_type
        dtype = resolve_sampling_dtype(dtype, device, prediction_type)
        advice = cpu_precision_advice(dtype, False, device, prediction_type, 'dtype="bfloat16"')
        if advice is not None:
            warnings.warn(advice[1], stacklevel=2)  # half precision this CPU only emulates
        if self.unet.dtype != dtype:
            _cast(self.unet, dtype)
        compiling = resolve_compile(compile, device, "enable_fast_sampling(compile=False)")
        if resolve_channels_last(channels_last, device, compiling):
            to_channels_last(self.unet)
        if device.type == "cuda":
            set_tf32(allow_tf32 if allow_tf32 is not None else not needs_full_precision(prediction_type))
        if compiling:
            compile_module(self.unet, compile_mode or ("reduce-overhead" if device.type == "cuda" else None))
        return self

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        trajectory_steps: int | Sequence[int] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> DDPMTargetPipelineOutput | tuple:
        r"""Sample ``batch_size`` images by ancestral sampling (or with the diffusers scheduler set).

        Args:
            batch_size: number of images.
            generator: a `torch.Generator` (or one per image) for deterministic sampling.
            num_inference_steps: how many of the T training steps to visit; ``None`` means all T.
                Fewer steps respace the chain (``timestep_spacing`` picks them) and use each
                step's exact respaced posterior (:meth:`DDPMTargetScheduler.step`). Another
                scheduler takes its own steps (DDIM or DPM-Solver: 20–100 are usual).
            output_type: ``"pil"`` (`PIL.Image` list), ``"np"`` (``[B, H, W, C]`` in [0, 1]) or
                ``"pt"`` (``[B, C, H, W]`` in [0, 1]).
            return_dict: return a :class:`DDPMTargetPipelineOutput` instead of a tuple.
            trajectory_steps: record ``x_t``, ``ε̂`` and ``x̂_0`` at these visited timesteps, or at
                this many evenly spaced ones (first and last included); see
                :func:`~ddpm_pipeline.render_trajectory`.
            eta: DDIM's η, for schedulers whose ``step`` takes it (``DDIMScheduler``): 0 is the
                deterministic DDIM sampler, 1 the ancestral one (the respaced DDPM posterior with
                ``fixed_small``); ignored by the others.
            latents: the starting noise ``x_T`` (``[batch_size, C, H, W]``, standard normal), instead
                of drawing it from ``generator``: to interpolate between starts, or to sample the same
                start with other settings. It is scaled by ``scheduler.init_noise_sigma`` as a drawn
                one is; ``generator`` still draws every step's noise.
            callback_on_step_end: called after each step as
                ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)``, with
                ``callback_kwargs`` holding the tensors named in ``callback_on_step_end_tensor_inputs``
                (``"latents"``: the state after the step, ``x_{t-1}``); it returns a dict, and a
                ``"latents"`` in it replaces the state. A diffusers `PipelineCallback` works too. Set
                ``pipe._interrupt = True`` in it to stop after this step.
            callback_on_step_end_tensor_inputs: the tensors passed to the callback (of
                ``pipe._callback_tensor_inputs``).

        Returns:
            :class:`DDPMTargetPipelineOutput` (``images``, ``trajectory``), or the tuple
            ``(images,)`` / ``(images, trajectory)`` when a trajectory was recorded.

        The state ``x_t`` is kept in float32 when the UNet runs in half precision, and every noise
        draw (``x_T`` and each step's ``z``) is float32: for the same generator a half-precision
        UNet sees the same noise as a float32 one, and its images differ only by its rounding.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for batch_size {batch_size}: pass one per image.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not tensors of this pipeline; pick from "
                f"{self._callback_tensor_inputs}."
            )
        scheduler = self.scheduler
        num_train_timesteps = scheduler.config.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = num_train_timesteps
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
                f"got {num_inference_steps}."
            )

        shape = (batch_size, self.unet.config.in_channels, *sample_height_width(self.unet.config.sample_size))
        device = self._execution_device
        unet_dtype = self.unet.dtype
        state_dtype = torch.float32 if unet_dtype in (torch.float16, torch.bfloat16) else unet_dtype
        scheduler.set_timesteps(num_inference_steps)
        self._num_timesteps, self._interrupt = len(scheduler.timesteps), False
        if latents is None:
            image = randn_tensor(shape, generator=generator, device=device, dtype=state_dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; this pipeline starts from {shape} "
                f"(batch_size, the UNet's in_channels and sample_size): pass batch_size={latents.shape[0]} "
                "or noise of that shape."
            )
        else:
            image = latents.to(device=device, dtype=state_dtype)
        # 1 for DDPM, DDIM, DPM-Solver; √(σ_max² + 1) of the set timesteps for Euler-type schedulers
        image = image * scheduler.init_noise_sigma
        visited = [int(t) for t in scheduler.timesteps]
        # The UNet's timesteps go to the device once (not one copy per step); step() keeps its
        # coefficients as Python floats, so the loop never waits for the device.
        unet_timesteps = scheduler.timesteps.to(device)
        memory_format = torch.channels_last if is_channels_last(self.unet) else torch.contiguous_format
        record = set(_trajectory_timesteps(trajectory_steps, scheduler.timesteps))
        # ε̂ and x̂0 for the trajectory come from DDPMTargetScheduler's formulas, with the set scheduler's betas
        explain = scheduler
        if record and not isinstance(scheduler, DDPMTargetScheduler):
            explain = DDPMTargetScheduler.from_config(scheduler.config)
        step_options = _step_options(scheduler, generator, eta)
        learned_variance_channels = self.unet.config.out_channels == 2 * self.unet.config.in_channels
        snapshots: dict[str, list[torch.Tensor]] = {"samples": [], "noise": [], "x0": []}

        with explain_compile_failure(UNCOMPILED_SAMPLING):  # once per call, not per step
            for index, t in enumerate(self.progress_bar(scheduler.timesteps)):
                if self.interrupt:
                    break
                if device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # a compiled UNet's CUDA graph may reuse its output
                state = scheduler.scale_model_input(image, t)  # x_t itself except for Euler-type schedulers
                unet_input = state.to(dtype=unet_dtype, memory_format=memory_format)
                model_output = self.unet(unet_input, unet_timesteps[index]).sample
                if model_output.dtype != image.dtype:
                    model_output = model_output.to(image.dtype)  # the scheduler's arithmetic in float32
                if learned_variance_channels and not isinstance(scheduler, DDPMTargetScheduler):
                    model_output = model_output[:, : image.shape[1]]  # DDIM and the solvers take the prediction alone
                step = scheduler.step(model_output, t, image, **step_options)
                if int(t) in record:  # x̂0 as the step used it (clipped if the config says so), where it tells
                    x_t = state.float()
                    x0 = getattr(step, "pred_original_sample", None)
                    x0 = explain.predict_x0(model_output, x_t, int(t)) if x0 is None else x0
                    snapshots["samples"].append(x_t.cpu())
                    snapshots["noise"].append(explain.predict_epsilon(model_output, x_t, int(t)).cpu())
                    snapshots["x0"].append(x0.float().cpu())
                image = step.prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": image}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, index, t, callback_kwargs) or {}
                    image = outputs.pop("latents", image)

        trajectory = None
        if record:
            trajectory = DDPMTrajectory(
                timesteps=[t for t in visited if t in record],
                samples=torch.stack(snapshots["samples"]),
                noise_predictions=torch.stack(snapshots["noise"]),
                x0_predictions=torch.stack(snapshots["x0"]),
            )

        _warn_if_diverged(image, scheduler)
        images = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.float().cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,) if trajectory is None else (images, trajectory)
        return DDPMTargetPipelineOutput(images=images, trajectory=trajectory)


def _warn_if_diverged(final_state: torch.Tensor, scheduler: DDPMScheduler) -> None:
    """Warn when the chain's final state ``x_0`` holds NaN or ±inf (one check after the loop, so
    sampling itself never waits for the device): such images are not samples, and clamping them
    to [0, 1] would hide it."""
    finite = torch.isfinite(final_state).flatten(1).all(dim=1)
    if bool(finite.all()):
        return
    hint = "train longer, sample in float32"
    if not scheduler.config.get("clip_sample", True) and not scheduler.config.get("thresholding", True):
        hint += ", or set clip_sample=True (it bounds x̂_0 at every step)"
    warnings.warn(
        f"Sampling diverged: {int((~finite).sum())} of {finite.numel()} images hold NaN or inf values and are not "
        f"samples ({scheduler.config.prediction_type} target, {len(scheduler.timesteps)} steps). "
        f"An untrained or badly trained network does this, most often a μ network sampled with fewer steps "
        f"than it was trained with, whose x̂_0 = (μ̂ - c_t x_t)/b_t magnifies its error: {hint}.",
        RuntimeWarning,
        stacklevel=4,  # this helper, __call__, torch.no_grad's wrapper, the caller
    )


def _sampling_scheduler(scheduler) -> SchedulerMixin:
    """The scheduler a `DDPMTargetPipeline` samples with: a stock `DDPMScheduler` converted to a
    `DDPMTargetScheduler` (same betas and options), any other diffusers scheduler as it is."""
    if isinstance(scheduler, DDPMScheduler):
        return DDPMTargetScheduler.from_stock_scheduler(scheduler)
    if isinstance(scheduler, SchedulerMixin) and callable(getattr(scheduler, "step", None)):
        return scheduler
    raise TypeError(
        f"DDPMTargetPipeline samples with a diffusers scheduler, got {type(scheduler).__name__}; pass a "
        "DDPMTargetScheduler, a DDPMScheduler, or another diffusers scheduler built from the pipeline's, e.g. "
        "DDIMScheduler.from_config(pipe.scheduler.config)."
    )


def _step_options(scheduler: SchedulerMixin, generator, eta: float) -> dict:
    """The keyword arguments of ``scheduler.step`` besides output, timestep and state: the
    generator, and DDIM's η, for the schedulers whose ``step`` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        options["eta"] = eta
    return options


def _trajectory_timesteps(trajectory_steps: int | Sequence[int] | None, timesteps: torch.Tensor) -> list[int]:
    """The visited timesteps to record: ``k`` evenly spaced ones, or the given ones (checked)."""
    if trajectory_steps is None:
        return []
    if timesteps.is_floating_point() and not torch.equal(timesteps, timesteps.round()):
        raise ValueError(
            "trajectory_steps needs a scheduler with integer timesteps (DDPM, DDIM, DPM-Solver); this one "
            "visits fractional ones: record trajectories with the pipeline's DDPMTargetScheduler."
        )
    visited = [int(t) for t in timesteps]
    if isinstance(trajectory_steps, (int, np.integer)):
        count = int(trajectory_steps)
        if count < 1:
            raise ValueError(f"trajectory_steps must be ≥ 1, got {count}.")
        positions = np.linspace(0, len(visited) - 1, min(count, len(visited))).round().astype(int)
        return [visited[i] for i in sorted(set(positions.tolist()))]
    chosen = [int(t) for t in trajectory_steps]
    missing = sorted(set(chosen) - set(visited))
    if missing:
        raise ValueError(
            f"trajectory_steps {missing} are not visited by this sampler (it visits {visited[0]}..{visited[-1]} "
            f"in {len(visited)} steps); pick from pipe.scheduler.timesteps or pass a count."
        )
    return chosen
