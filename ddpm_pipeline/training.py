"""The training loop behind ``train_ddpm.py``: Accelerate, EMA, checkpoints, grids and logs.

Reproducibility: the weights are initialized from ``--seed``; each epoch's data order depends
only on ``(seed, epoch)`` (:class:`~ddpm_pipeline.data.EpochShuffleSampler`); every micro-batch
draws its timesteps, noise, flips and dropout from a seed derived from ``(seed, epoch, batch,
process)``. A run resumed from a checkpoint therefore continues exactly as the uninterrupted run
would have (on the CPU: bit for bit).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import SCALER_NAME, DataLoaderConfiguration, ProjectConfiguration, broadcast, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .atomic import atomic_path, flush_folder_entries, flush_to_disk, move_into_place, remove, temporary_sibling
from .checkpointing import (
    check_checkpoint_intact,
    check_start,
    checkpoint_step,
    disk_write_error,
    list_checkpoints,
    naming_damage,
    prune_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    resume_elsewhere_advice,
    write_checkpoint,
)
from .class_balance import SHUFFLED_COPY, sliced_classes_warning
from .commands import invocation
from .data import (
    TrainingImages,
    data_identity,
    describe_data_source,
    find_image_column,
    has_named_splits,
    load_image_dataset,
    spread_subset,
)
from .evaluation_config import QUICK_CPU_EVALUATION
from .hold_out import held_out_amount, hold_out_last_rows, split_at_random
from .images import ImageSource, check_padding, inspect_images, levels_to_model_range, warn_if_mostly_padding
from .losses import diffusion_loss_terms, has_bound_term
from .lr_schedule import RunLengthLR, warmup_advice
from .model_card import EVAL_REPORT_NAME, eval_outputs
from .option_values import DEFAULT_SNR_GAMMA
from .pipeline_ddpm_target import DDPMTargetPipeline
from .plots import save_image_grid, save_loss_curve
from .preflight import check_free_space, check_output_dir, check_unet_config, run_output_bytes
from .pretrained import PretrainedDDPM, is_local_source
from .push import check_hub_access, push_to_hub
from .run_lock import OutputDirLock
from .run_outputs import (
    GRID_FOLDER,
    GRID_PREFIX,
    LOSS_CURVE_NAME,
    LOSS_HISTORY_NAME,
    PIPELINE_OUTPUTS,
    SAMPLES_NAME,
    TRAJECTORY_NAME,
    VALIDATION_HISTORY_NAME,
    grid_path,
    grid_step,
    snapshot_name,
)
from .run_records import (
    QUARTER_COLUMNS,
    SNAPSHOT_SUMMARY_NAME,
    SUMMARY_STEPS,
    TIMESTEP_QUARTERS,
    TRAINING_SUMMARY_NAME,
    LossHistory,
    PendingLosses,
    TrainingClock,
    step_record,
)
from .scheduling_ddpm_target import DDPMTargetScheduler
from .seeding import derive_seed
from .speed import (
    HALF_DTYPES,
    LAUNCHER_PRECISION_VARIABLE,
    build_adamw,
    compile_module,
    cpu_precision_advice,
    cpu_threads_per_process,
    device_description,
    explain_compile_failure,
    launcher_precision,
    needs_full_precision,
    resolve_channels_last,
    resolve_compile,
    resolve_fused_adam,
    resolve_mixed_precision,
    set_tf32,
    to_channels_last,
)
from .stop_signals import LAUNCHER_EXITED, StopRequest, lone_process_advice, signal_number, started_by_launcher
from .timestep_sampling import ImportanceTimestepSampler
from .trackers import check_tracker_installed, check_wandb_login, log_image, tracker_config, tracker_init_kwargs
from .training_config import CONFIG_FILE_NAME, TrainingConfig
from .training_data import TrainingData, describe_fine_tuning_data, fit_network_to_data
from .unet import DDPMUNet
from .unet_presets import describe_sample_size
from .validation import (
    HeldOutBound,
    HeldOutMonitor,
    check_held_out_split,
    spread_images,
    unbalanced_classes_warning,
)

logger = get_logger(__name__, log_level="INFO")

TIMESTEP_SAMPLER_STATE_NAME = "timestep_sampler.pt"
#: AdamW's implementation flags: a resumed run keeps its own (fused on a GPU), not its checkpoint's
OPTIMIZER_IMPLEMENTATION_KEYS = ("fused", "foreach")


#: A stop reason in the processes' all-gather that no signal number can be.
_LAUNCHER_EXITED_CODE = 1 << 16


@dataclass
class TrainingResult:
    """What :func:`train` produced. ``finished`` is False when ``--stop_after_minutes``, a stop
    signal or an exited launcher (``stopped_by``: the signal's name, e.g. ``"SIGTERM"``, or
    ``"launcher exited"``) ended this invocation early, with a checkpoint: the run continues with
    ``--resume_from_checkpoint latest``."""

    output_dir: Path
    global_step: int
    final_loss: float | None
    samples_path: Path | None
    finished: bool = True
    train_seconds: float = 0.0
    stopped_by: str | None = None
    device_type: str = "cpu"
    """Where it trained: ``"cpu"``, ``"cuda"``, … (``torch.device.type``)."""


#: A periodic grid that takes longer than this fraction of the training time between two grids gets
#: a warning (once a run) naming the options that make grids cheaper.
GRID_COST_WARNING_FRACTION = 0.25


def grid_cost_advice(grid_seconds: float, period_seconds: float, step: int, config: TrainingConfig) -> str | None:
    """A warning when one ``--save_images_steps`` grid took more than
    :data:`GRID_COST_WARNING_FRACTION` of ``period_seconds``, the training time of the
    ``--save_images_steps`` steps between two grids (a large network on a CPU: 64 images × 100
    steps can cost more than the 400 steps between grids); None otherwise. Grids are not counted as
    training time, but the run waits for them all the same. The advice scales
    ``--save_images_steps`` by ``⌈ratio / fraction⌉``, which brings the grids under the fraction."""
    if period_seconds <= 0 or grid_seconds <= GRID_COST_WARNING_FRACTION * period_seconds:
        return None
    ratio = grid_seconds / period_seconds
    every = config.save_images_steps * math.ceil(ratio / GRID_COST_WARNING_FRACTION)
    return (
        f"the sample grid at step {step} ({config.num_grid_images} images × {config.grid_inference_steps} steps) "
        f"took {grid_seconds / 60:.1f} min, {ratio:.0%} of the {period_seconds / 60:.1f} min that the "
        f"{config.save_images_steps} training steps between grids take (grids are not counted as training time, "
        f"but the run waits for them): --save_images_steps {every}, a smaller --num_grid_images or fewer "
        "--grid_inference_steps make them cheaper, and --save_images_steps none writes only the final grid"
    )


def remove_outputs_past(output_dir: Path, step: int, pipeline: bool) -> None:
    """Delete what a run wrote in ``output_dir`` past optimizer step ``step``, besides the
    checkpoints and snapshots (:func:`~ddpm_pipeline.checkpointing.check_start`) and the logs
    (TensorBoard hides them): with ``pipeline``, its finished pipeline and ``eval_metrics.py``'s
    scores of it (``eval_results.json`` and all beside it, :func:`~ddpm_pipeline.model_card.eval_outputs`);
    its grids of later steps;
    and, from step 0, its loss and held-out records (a resumed run keeps theirs up to its step)."""
    names = (PIPELINE_OUTPUTS if pipeline else ()) + ((LOSS_HISTORY_NAME, VALIDATION_HISTORY_NAME) if step == 0 else ())
    for name in names:
        remove(output_dir / name)
    if pipeline:  # the deleted pipeline's scores: its report and what eval_metrics.py wrote beside it
        for path in eval_outputs(output_dir / EVAL_REPORT_NAME):
            remove(path)
    for grid in (output_dir / GRID_FOLDER).glob(f"{GRID_PREFIX}*.png"):
        grid_at = grid_step(grid)
        if grid_at is None or grid_at > step:
            remove(grid)


def micro_batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """The seed of one micro-batch step: :func:`~ddpm_pipeline.seeding.derive_seed` of the three
    numbers. It is the same in every process: each draws the timesteps, noise and flips of the
    whole global batch and keeps its own rows, so N processes train exactly as one process with
    N times the batch (dropout aside, whose masks are drawn per process)."""
    return derive_seed(seed, epoch, batch_index)


#: `EMAModel`'s settings (its keyword arguments and attributes) and the options that give them
EMA_SETTINGS = {"decay": "ema_max_decay", "min_decay": "ema_min_decay", "use_ema_warmup": "ema_warmup",
                "inv_gamma": "ema_inv_gamma", "power": "ema_power"}  # fmt: skip


def ema_settings(config: TrainingConfig) -> dict[str, Any]:
    """`EMAModel`'s settings from the options (:data:`EMA_SETTINGS`)."""
    return {setting: getattr(config, option) for setting, option in EMA_SETTINGS.items()}


def adamw_hyperparameters(config: TrainingConfig) -> dict[str, Any]:
    """AdamW's ``lr``, ``betas``, ``weight_decay`` and ``eps`` from the options."""
    return {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2),
            "weight_decay": config.adam_weight_decay, "eps": config.adam_epsilon}  # fmt: skip


def build_ema(unet: torch.nn.Module, config: TrainingConfig) -> EMAModel:
    """diffusers' `EMAModel`: after the n-th optimizer step, ``θ̄ ← d_n θ̄ + (1 - d_n) θ`` with
    ``d_1 = 0`` and, for ``n ≥ 2``, ``d_n = clamp(1 - (1 + (n-1)/γ)^(-p), min_decay, max_decay)``
    (``--ema_warmup``) or ``clamp((1 + (n-1))/(10 + (n-1)), min_decay, max_decay)``."""
    return EMAModel(unet.parameters(), **ema_settings(config), foreach=True)


def build_unet(unet_config: dict[str, Any], unet_overrides: str | None) -> DDPMUNet:
    """``DDPMUNet(**unet_config)``; where ``--unet_overrides`` gave values that ``UNet2DModel``
    cannot be built from (a string where it takes a number, say), a ValueError that names them,
    instead of the error from deep inside diffusers."""
    try:
        return DDPMUNet(**unet_config)
    except (TypeError, ValueError, KeyError, IndexError) as error:
        if not unet_overrides:
            raise
        raise ValueError(
            f"The UNet cannot be built with --unet_overrides {unet_overrides} ({type(error).__name__}: {error}): its "
            "values go to diffusers' UNet2DModel as they are, so give them the names and types of its config.json "
            "(e.g. {\"attention_head_dim\": 8, \"norm_num_groups\": 16})."
        ) from error


def unet_config_for(config: TrainingConfig, pretrained: PretrainedDDPM | None = None) -> dict[str, Any]:
    """The `UNet2DModel` options of the network these (data-fitted) options train: the preset's
    with ``--block_out_channels``/``--layers_per_block``/``--unet_overrides``, or, when
    fine-tuning, the pretrained network's at the training resolution and dropout."""
    if pretrained is not None:
        return pretrained.unet_options(config.resolution, config.dropout, config.channels)
    return DDPMUNet.preset_config(config.model, **config.unet_overrides_dict())


def _option_text(value: Any) -> str:
    """An option's value as a log line shows it (``2e-05``, ``True``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_scheduler(config: TrainingConfig, pretrained: PretrainedDDPM | None = None) -> DDPMTargetScheduler:
    """The noise scheduler these options describe: a new one, or, when fine-tuning, the pretrained
    model's with the options given explicitly replacing its own."""
    if pretrained is not None:
        return pretrained.noise_scheduler(
            prediction_type=config.prediction_type,
            beta_schedule=config.beta_schedule,
            num_train_timesteps=config.num_train_timesteps,
            variance_type=config.variance_type,
        )
    return DDPMTargetScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        variance_type=config.variance_type,
    )


class Trainer:
    """One training run; :meth:`run` does everything (see :func:`train`)."""

    def __init__(self, config: TrainingConfig):
        check_tracker_installed(config.report_to)
        # Fine-tuning: its configs first (no weights yet), to know the network and the target.
        self.pretrained = None
        if config.pretrained_model_name_or_path is not None:
            self.pretrained = PretrainedDDPM.load(config.pretrained_model_name_or_path, config.revision, config.cache_dir)
            # a local folder is recorded by its absolute path: the run then resumes from any directory
            config = replace(config, pretrained_model_name_or_path=self.pretrained.source)
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.noise_scheduler = build_scheduler(config, self.pretrained)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if config.grid_inference_steps > self.noise_scheduler.config.num_train_timesteps:
            raise ValueError(
                f"--grid_inference_steps {config.grid_inference_steps} exceeds the {self.noise_scheduler.config.num_train_timesteps} "
                "diffusion steps of the pretrained scheduler: lower it."
            )
        # Launched as several processes on a machine without CUDA (`accelerate launch --multi_gpu`,
        # torchrun): Accelerate only joins them (gloo) when told they run on the CPU.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cpu_processes = world_size > 1 and not torch.cuda.is_available()
        device = PartialState(cpu=cpu_processes).device
        on_gpu = device.type == "cuda"
        launcher = os.environ.get(LAUNCHER_PRECISION_VARIABLE)
        self.precision_from_launcher = launcher_precision(config.mixed_precision, launcher)
        self.mixed_precision = resolve_mixed_precision(config.mixed_precision, device, self.prediction_type, launcher=launcher)
        self.accelerator = Accelerator(
            cpu=cpu_processes,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=self.mixed_precision,
            dataloader_config=DataLoaderConfiguration(non_blocking=on_gpu),
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / config.logging_dir)
            ),
        )
        if self.accelerator.num_processes != world_size:
            raise RuntimeError(
                f"Launched as {world_size} processes, but Accelerate joined {self.accelerator.num_processes}: "
                "each would train alone and overwrite the others' outputs. Launch with `accelerate launch "
                "--multi_gpu --num_processes N train_ddpm.py` (GPUs, or gloo on CPUs) or a matching accelerate config."
            )
        if (advice := lone_process_advice("train_ddpm.py")) is not None:
            logger.warning(advice)
        if self.accelerator.device.type == "cpu":
            torch.set_num_threads(config.num_cpu_threads or cpu_threads_per_process(self.accelerator.num_processes))
        strict_fp32 = needs_full_precision(self.prediction_type)
        self.allow_tf32 = config.allow_tf32 if config.allow_tf32 is not None else on_gpu and not strict_fp32
        self.compile_unet = resolve_compile(config.compile_unet, device, "--no-compile_unet")
        self.channels_last = resolve_channels_last(config.channels_last, device, self.compile_unet)
        # skipping a non-finite step happens inside the fused AdamW kernel (its found_inf input)
        self.fused_adam = resolve_fused_adam(config.fused_adam, device) or config.nonfinite_loss == "skip"
        self.log_every = config.log_every or (25 if on_gpu else 1)  # each read of the loss stalls a GPU
        self.skipped_steps = torch.zeros((), device=device)
        if on_gpu:
            set_tf32(self.allow_tf32)
        if self.accelerator.is_main_process:
            check_output_dir(self.output_dir)
            OutputDirLock(self.output_dir).check()  # another run writing there: refused before any work
            if config.report_to == "wandb":
                check_wandb_login()
        self.checkpoint = resolve_checkpoint(self.output_dir, config.resume_from_checkpoint)
        if self.checkpoint is not None:
            check_checkpoint_intact(self.checkpoint, self.output_dir)  # before anything is deleted or trained
        if self.checkpoint is None and config.resume_from_checkpoint == "latest":
            logger.info(f"--resume_from_checkpoint latest: no checkpoint in {self.output_dir} yet, so the run starts at step 0")
        start_step, deleted = check_start(self.output_dir, self.checkpoint, config.overwrite_output_dir,
                                          config.resume_from_checkpoint == "latest", self.accelerator.is_main_process)  # fmt: skip
        if deleted and self.accelerator.is_main_process:  # the rest of what the other run wrote, which this run's would sit among
            remove_outputs_past(self.output_dir, start_step, pipeline=any(path.name == TRAINING_SUMMARY_NAME for path in deleted))
        self.accelerator.wait_for_everyone()  # no process looks at the folder before the deletion is done
        self.split_sizes: dict[str, int] = {}  # of the training source's splits, as far as they are asked for
        self.config = config = self._hold_out_share(config)
        dataset, image_column = self._load_dataset()
        image_format = inspect_images(ImageSource(dataset, image_column))
        if self.pretrained is None:
            self.config = config = fit_network_to_data(config, image_format, self.accelerator.device.type)
        else:
            describe_fine_tuning_data(self.pretrained, config, image_format)
        if self.checkpoint is not None:
            self._check_resumable(self.checkpoint)
        if config.push_to_hub and self.accelerator.is_main_process:
            user = check_hub_access(config.hub_token)
            logger.info(f"will push the finished pipeline to {config.hub_model_id} as {user}")
        set_seed(config.seed)
        self.unet_config = unet_config_for(config, self.pretrained)
        if self.pretrained is not None:
            source = self.pretrained.source  # a Hub id, or a folder by its name (its path says nothing more in a plot title)
            self.model_name = f"{Path(source).name if is_local_source(source) else source} (fine-tuned)"
        else:
            self.model_name = config.network_name()
        check_unet_config(self.unet_config, self.noise_scheduler.config.variance_type, fine_tuning=self.pretrained is not None)
        check_padding(image_format, self.unet_config["sample_size"], config.resize_mode)
        if self.accelerator.is_main_process:
            warn_if_mostly_padding(image_format, self.unet_config["sample_size"], config.resize_mode)
        self.unet = build_unet(self.unet_config, config.unet_overrides)
        if self.pretrained is not None and self.checkpoint is None:  # resuming loads the checkpoint's weights
            self.pretrained.load_weights(self.unet)
            logger.info(f"starting from the weights of {self.pretrained.source}")
        if self.accelerator.is_main_process:
            parameters = sum(p.numel() for p in self.unet.parameters())
            snapshots = len(config.snapshot_minutes or ()) + len(config.snapshot_steps or ())
            check_free_space(self.output_dir, run_output_bytes(parameters, config.checkpoints_total_limit, snapshots))
        steps_done = (checkpoint_step(self.checkpoint) or 0) if self.checkpoint is not None else 0
        self.data = TrainingData.build(dataset, image_column, config, self.unet_config, self.accelerator, steps_done)
        self.held_out = self._build_held_out(dataset)
        self.grid_cost_warned = False  # grid_cost_advice is given once a run
        if self.channels_last:
            to_channels_last(self.unet)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = build_ema(self.unet, config) if config.use_ema else None
        self.optimizer = build_adamw(self.unet.parameters(), fused=self.fused_adam, **adamw_hyperparameters(config))
        self.unet, self.optimizer, self.dataloader = self.accelerator.prepare(
            self.unet, self.optimizer, self.data.dataloader
        )
        if self.compile_unet:
            compile_module(self.unet, config.compile_mode)
        if self.accelerator.is_main_process:
            logger.info(f"on {self.accelerator.device}: {self.speed_settings()}")
            autocast_dtype = HALF_DTYPES.get(self.accelerator.mixed_precision, torch.float32)
            chosen_by_auto = config.mixed_precision == "auto" and not self.precision_from_launcher
            advice = cpu_precision_advice(autocast_dtype, chosen_by_auto, device, self.prediction_type, "--mixed_precision bf16")
            if advice is not None:
                logger.log(*advice)
        self.steps_per_epoch = math.ceil(len(self.dataloader) / config.gradient_accumulation_steps)
        self.total_steps = config.max_train_steps or config.num_epochs * self.steps_per_epoch
        # Stepped by hand once per optimizer step (not through accelerate.prepare, which steps it
        # once per process), and checkpointed with the rest. With a time budget, a decaying schedule
        # also measures its progress in training time and ends as the budget does (lr_schedule.py).
        self.lr_scheduler = RunLengthLR(
            self.optimizer,
            config.lr_scheduler,
            warmup_steps=config.lr_warmup_steps,
            total_steps=self.total_steps,
            budget_seconds=None if config.max_train_minutes is None else 60 * config.max_train_minutes,
        )
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        advice = warmup_advice(config.lr_scheduler, config.lr_warmup_steps, self.total_steps)
        if advice is not None and self.accelerator.is_main_process:
            logger.warning(advice)
        # Saved beside Accelerate's state by save_checkpoint (not registered with it), so that a run
        # may switch between uniform and importance draws when it resumes.
        self.timestep_sampler, self._importance_announced = None, False
        if config.timestep_sampling == "importance":
            self.timestep_sampler = ImportanceTimestepSampler(
                self.noise_scheduler.config.num_train_timesteps,
                history=config.importance_history,
                uniform_prob=config.importance_uniform_prob,
                device=self.accelerator.device,
            )
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(self.ema)

    # -- setup -------------------------------------------------------------------------------

    def _check_resumable(self, checkpoint: Path) -> None:
        saved = read_trainer_state(checkpoint).get("training_config")
        if saved is None:
            return
        differences = TrainingConfig.from_dict(saved).architecture_differences(self.config)
        if differences:
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was trained with other model, diffusion or EMA options "
                f"(checkpoint vs now: {'; '.join(differences)}). Repeat that run's options, or start a new "
                "--output_dir."
            )

    def _split_size(self, name: str) -> int:
        """How many images split ``name`` of the training source has (loaded as training loads it,
        once a run: an image folder's files are listed at each load)."""
        if name not in self.split_sizes:
            with self.accelerator.main_process_first():
                self.split_sizes[name] = len(load_image_dataset(**self.config.data_source(name), cache_dir=self.config.cache_dir))
        return self.split_sizes[name]

    def _hold_out_share(self, config: TrainingConfig) -> TrainingConfig:
        """``config`` with a ``--validation_split`` share or count of ``--split``'s images
        (:func:`~ddpm_pipeline.hold_out.held_out_amount`) and ``--validation_rows last`` made the
        two splits it means, the last rows held out (:func:`~ddpm_pipeline.hold_out.hold_out_last_rows`),
        as the run records them (so evaluation and a resumed run read the same images); ``config``
        itself otherwise (rows held out at random are drawn as the split is loaded: :meth:`_load_dataset`)."""
        amount = None if config.validation_split is None else held_out_amount(config.validation_split)
        if amount is None or config.validation_rows != "last":
            return config
        split, held_out = hold_out_last_rows(config.split, amount, self._split_size)
        logger.info(f"--validation_split {config.validation_split}: trains on --split {split!r} and holds out "
                    f"--validation_split {held_out!r}, the last images of --split {config.split!r}")  # fmt: skip
        return replace(config, split=split, validation_split=held_out)

    def _load_dataset(self) -> tuple[datasets.Dataset, str]:
        """The training split and its image column: ``--split`` less the images a ``--validation_split``
        share holds out at random (:func:`~ddpm_pipeline.hold_out.split_at_random`; kept as
        :attr:`held_out_images`, else None). Sets :attr:`data_identity`, what checkpoints record of
        the data, and warns when a slice of it took few of its classes
        (:func:`~ddpm_pipeline.class_balance.sliced_classes_warning`)."""
        config = self.config
        source = config.data_source(config.split)
        with self.accelerator.main_process_first():
            dataset = load_image_dataset(**source, cache_dir=config.cache_dir)
        words = describe_data_source(**source)
        self.held_out_images: datasets.Dataset | None = None
        amount = None if config.validation_split is None else held_out_amount(config.validation_split)
        if amount is not None:  # drawn at random: a share of the last rows is two splits by now (_hold_out_share)
            total = len(dataset)
            dataset, self.held_out_images = split_at_random(dataset, amount, config.split)
            words += f", less the {len(self.held_out_images):,} images --validation_split {config.validation_split} holds out"
            logger.info(f"--validation_split {config.validation_split}: holds out {len(self.held_out_images):,} of the "
                        f"{total:,} images of --split {config.split!r}, drawn at random (--validation_rows random), and "
                        f"trains on the other {len(dataset):,}")  # fmt: skip
        self.data_identity = data_identity(dataset, words)
        warning = sliced_classes_warning(dataset, config.split, "--split", (
            f"To train on fewer images of every class, save the data shuffled and slice that, e.g. for an image folder "
            f"{SHUFFLED_COPY}, then --dataset_path OUT --split {config.split!r}."
        ))  # fmt: skip
        if warning is not None:
            logger.warning(warning)
        return dataset, find_image_column(dataset, config.image_column)

    def _build_held_out(self, training: datasets.Dataset) -> HeldOutMonitor | None:
        """With ``--validation_split``: the held-out bound's monitor, over ``--validation_images``
        images of that split of the training source and as many of the ``training`` images, each
        set's spread evenly over it (:func:`~ddpm_pipeline.validation.spread_images`), preprocessed
        as training preprocesses them (measured by the main process alone, so the images are only
        loaded there; it warns when either set holds few of the training images' classes); None
        without it."""
        config = self.config
        if config.validation_split is None:
            return None

        if self.held_out_images is not None:  # rows of --split drawn at random, which it does not train on
            dataset, held_out = self.held_out_images, f"{config.validation_split} of {config.split} at random"
            words = f"{describe_data_source(**config.data_source(config.split))}, drawn at random"
        else:
            one_split = not has_named_splits(config.dataset_name, config.train_data_dir, config.dataset_path)
            check_held_out_split(config.split, config.validation_split, self._split_size, one_split)
            source = config.data_source(config.validation_split)
            with self.accelerator.main_process_first():
                dataset = load_image_dataset(**source, cache_dir=config.cache_dir)
            held_out, words = config.validation_split, describe_data_source(**source)
        monitor = HeldOutMonitor(None, held_out, config.validation_steps, config.validation_timesteps)
        if not self.accelerator.is_main_process:
            return monitor
        images = TrainingImages(dataset, find_image_column(dataset, config.image_column), self.data.images.preprocess,
                                bad_images=config.bad_images)  # fmt: skip
        measured = min(config.validation_images, len(dataset))  # and as many training images
        monitor.bound = HeldOutBound(spread_images(images, measured), spread_images(self.data.images, measured),
                                     config.validation_timesteps, config.seed, batch_size=config.train_batch_size)  # fmt: skip
        warning = unbalanced_classes_warning(training, {
            f"held-out images measured ({held_out})": spread_subset(dataset, measured),
            "training images measured": spread_subset(training, measured),
        })  # fmt: skip
        if warning is not None:
            logger.warning(warning)
        timesteps = "every timestep" if config.validation_timesteps is None else f"{config.validation_timesteps} timesteps per image"
        logger.info(
            f"held out: {len(dataset):,} images of {words}; the bound ({timesteps}) on {len(monitor.bound.validation)} "
            f"of them and on {len(monitor.bound.training)} training images is measured "
            + (f"every {config.validation_steps} steps and at the end" if config.validation_steps else "at the end")
        )
        return monitor

    def measure_held_out(self, global_step: int) -> None:
        """The held-out bound of the EMA network after ``global_step``
        (:meth:`~ddpm_pipeline.validation.HeldOutMonitor.measure`), also logged to the trackers as
        ``validation/train_bpd`` and ``validation/validation_bpd``. Every process calls it; the main
        one measures while the others wait."""
        if self.held_out.bound is not None:
            pipeline = self.sampling_pipeline()
            values = self.held_out.measure(global_step, pipeline.unet, pipeline.scheduler, self.accelerator.device)
            self.accelerator.log({f"validation/{name}": value for name, value in values.items()}, step=global_step)
        self.accelerator.wait_for_everyone()

    def speed_settings(self) -> str:
        """The fast paths this run resolved its options (and their auto defaults) to, in one line
        for the log: what a user checks first when a run is slower or less exact than expected."""
        config, on_gpu = self.config, self.accelerator.device.type == "cuda"
        precision = self.accelerator.mixed_precision  # what autocast really does, whoever chose it
        precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling", "no": "float32"}.get(precision, precision)
        if self.precision_from_launcher:
            precision += f" (from accelerate launch's mixed_precision {self.precision_from_launcher})"
        settings = [precision]
        if on_gpu:
            settings.append("TF32 on" if self.allow_tf32 else "TF32 off")
        settings.append("channels_last" if self.channels_last else "NCHW")
        settings.append(f"torch.compile ({config.compile_mode or 'default'})" if self.compile_unet else "eager")
        settings.append("fused AdamW" if self.fused_adam else "foreach AdamW")
        if config.gradient_checkpointing:
            settings.append("gradient checkpointing")
        if self.data.device_images is not None:
            settings.append("data preprocessed in memory" if self.data.device_images.device.type == "cpu" else "data on the device")
        else:
            workers = self.data.dataloader.num_workers
            settings.append(f"{workers} loader workers" if workers else "data loaded in the main process")
        settings.append(f"loss read every {self.log_every} step{'s' if self.log_every > 1 else ''}")
        return ", ".join(settings)

    # -- pieces of the loop ------------------------------------------------------------------

    def sampling_unet(self) -> DDPMUNet:
        """A float32 copy of the network for sampling and saving, holding the EMA weights."""
        unet = DDPMUNet(**self.unet_config)
        unet.load_state_dict(self.accelerator.unwrap_model(self.unet).state_dict())
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        return unet.to(self.accelerator.device).eval()

    def sampling_pipeline(self) -> DDPMTargetPipeline:
        """:meth:`sampling_unet` (the EMA weights, or the trained ones without EMA) in a pipeline with
        its own copy of the noise scheduler, for grids, snapshots and the saved pipeline."""
        # its own scheduler: sampling sets timesteps, which the training scheduler must not carry
        scheduler = DDPMTargetScheduler.from_config(self.noise_scheduler.config)
        pipeline = DDPMTargetPipeline(unet=self.sampling_unet(), scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def save_grid(self, path: Path, trajectory_path: Path | None = None, step: int | None = None,
                  description: str = "sample grid") -> Path:  # fmt: skip
        """Sample ``--num_grid_images`` images (always from the same seed) and write the grid; with
        ``step``, log it to the trackers too (:func:`~ddpm_pipeline.trackers.log_image`). The denoising steps show a progress
        bar named ``description``, which goes once the grid is written."""
        pipeline = self.sampling_pipeline()
        pipeline.set_progress_bar_config(desc=description, leave=False)
        output = pipeline(
            batch_size=self.config.num_grid_images,
            generator=torch.Generator().manual_seed(self.config.seed),
            num_inference_steps=self.config.grid_inference_steps,
            output_type="np",
            trajectory_steps=8 if trajectory_path is not None else None,
        )
        save_image_grid(output.images, path)
        if trajectory_path is not None:
            output.trajectory.save_png(trajectory_path)
        if step is not None:
            log_image(self.accelerator.trackers, "samples", path, step)
        return path

    def _timed_grid(self, step: int, period_seconds: float) -> None:
        """The ``--save_images_steps`` grid of ``step``, with :func:`grid_cost_advice` logged the first
        time a grid costs too much against the ``period_seconds`` that the steps between grids take."""
        started = time.perf_counter()
        self.save_grid(grid_path(self.output_dir, step), step=step,
                       description=f"sample grid of step {step}")  # fmt: skip
        advice = None if self.grid_cost_warned else grid_cost_advice(time.perf_counter() - started, period_seconds, step, self.config)
        if advice:
            logger.warning(advice)
            self.grid_cost_warned = True

    def global_batch_size(self) -> int:
        """Images per optimizer step, over all processes."""
        config = self.config
        return config.train_batch_size * config.gradient_accumulation_steps * self.accelerator.num_processes

    def _warn_if_data_changed(self, state: dict[str, Any]) -> None:
        """A run resumed on other data (another source, images added or removed, files changed)
        trains on, on the data it has now; say so, naming what differs (checkpoints written before
        this record existed are not compared)."""
        saved, now = state.get("data"), self.data_identity
        if not saved:
            return
        if saved.get("source") != now["source"]:
            what = f"{saved.get('source')}, this run reads {now['source']}"
        elif saved.get("num_images") != now["num_images"]:
            what = f"{saved.get('num_images')} images, the data set has {now['num_images']} now"
        elif saved.get("fingerprint") != now["fingerprint"]:
            what = (f"the same number of images, but datasets' fingerprint of them differs ({saved.get('fingerprint')} "
                    f"then, {now['fingerprint']} now: files replaced or modified, or only touched or copied anew)")  # fmt: skip
        else:
            return
        logger.warning(
            f"{self.checkpoint} was trained on {what}: the run goes on from the saved weights and step on the data as it "
            "is now, so its batches differ from an uninterrupted run's. Point the data options at the run's own data "
            "to continue it as it was."
        )

    def _load_state(self, checkpoint: Path) -> None:
        """``accelerator.load_state``, with what this run is running on kept: its AdamW kernel
        (fused or foreach, not the checkpoint's), the EMA weights on its device (Accelerate loads
        custom states to the CPU, and `EMAModel` keeps its tensors where they come), and its fp16
        loss scaler when the checkpoint has no scaler state (trained in bf16 or fp32, resumed where
        ``auto`` means fp16: a GPU older than Ampere), which Accelerate would fail on: it then
        starts afresh."""
        accelerator, scaler = self.accelerator, self.accelerator.scaler
        kernels = [{key: group.get(key) for key in OPTIMIZER_IMPLEMENTATION_KEYS} for group in self.optimizer.param_groups]
        without_scaler = scaler is not None and not (checkpoint / SCALER_NAME).is_file()
        if without_scaler:
            logger.info(f"{checkpoint} has no fp16 loss-scaler state (it was trained in bf16 or fp32): the loss scale starts afresh")
            accelerator.scaler = None
        try:  # a file damaged within, or in a checkpoint written before they recorded their sizes, is named
            with naming_damage(checkpoint, resume_elsewhere_advice(checkpoint, self.output_dir)):
                accelerator.load_state(str(checkpoint))
        finally:
            accelerator.scaler = scaler
        for group, flags in zip(self.optimizer.param_groups, kernels, strict=True):
            group.update(flags)
        if self.ema is not None:
            self.ema.to(accelerator.device)

    def _apply_options_over_restored_state(self) -> None:
        """A checkpoint's optimizer, schedule and EMA states carry the options they were built with
        (``load_state`` restores AdamW's betas, weight decay and ε, the schedule's peak learning
        rate, the EMA's decays); this run's options replace them, so that a run resumed with another
        ``--learning_rate`` (say) trains at it from the resumed step on, keeping Adam's moments, the
        EMA weights and the position in the schedule. Changed options are logged; a run resumed with
        its own options is unchanged."""
        config, scheduler, ema = self.config, self.lr_scheduler, self.ema
        group = self.optimizer.param_groups[0]
        restored_and_wanted = {
            "learning_rate": (scheduler.base_lrs[0], config.learning_rate),
            "adam_beta1": (group["betas"][0], config.adam_beta1),
            "adam_beta2": (group["betas"][1], config.adam_beta2),
            "adam_weight_decay": (group["weight_decay"], config.adam_weight_decay),
            "adam_epsilon": (group["eps"], config.adam_epsilon),
        }
        if ema is not None:
            restored_and_wanted.update(
                {option: (getattr(ema, setting), getattr(config, option)) for setting, option in EMA_SETTINGS.items()}
            )
        changed = {name: pair for name, pair in restored_and_wanted.items() if pair[0] != pair[1]}
        schedule_changes = self._schedule_changes()
        if not changed and not schedule_changes:
            return
        restored_lr = scheduler.get_last_lr()[0]
        for group in self.optimizer.param_groups:  # its lr: the schedule's, set below
            group.update(adamw_hyperparameters(config), initial_lr=config.learning_rate)
        scheduler.base_lrs = [config.learning_rate] * len(scheduler.base_lrs)
        scheduler.restart_here()  # the rate of the next step: this run's schedule at the resumed step
        if ema is not None:
            for setting, value in ema_settings(config).items():
                setattr(ema, setting, value)
        described = [f"--{name} {_option_text(old)} → {_option_text(new)}" for name, (old, new) in changed.items()]
        new_lr = scheduler.get_last_lr()[0]
        logger.info(
            f"resumed with other options than {self.checkpoint}'s, applied from here on: {', '.join(described + schedule_changes)}"
            + (f"; the learning rate from step {scheduler.last_epoch + 1} on follows this run's schedule: "
               f"{restored_lr:.3g} → {new_lr:.3g} at that step" if new_lr != restored_lr else "")
        )  # fmt: skip

    def _schedule_changes(self) -> list[str]:
        """How this run's learning-rate schedule differs from the one the checkpoint's position was
        reached with (:meth:`~ddpm_pipeline.lr_schedule.RunLengthLR.definition`), in words: another
        ``--lr_scheduler`` or ``--lr_warmup_steps``, or, for a decaying schedule, another length
        (``--max_train_steps`` or ``--num_epochs``: a run trained further) or time budget. Empty when
        they agree or the checkpoint predates the record."""
        restored, now = self.lr_scheduler.restored_definition, self.lr_scheduler.definition()
        if restored is None or restored == now:
            return []
        labels = {"name": "--lr_scheduler", "warmup_steps": "--lr_warmup_steps",
                  "step_limit": f"the {now['name']} decay's length in steps", "budget_seconds": "--max_train_minutes"}  # fmt: skip

        def shown(key: str, value: Any) -> str:
            return _option_text(value / 60 if key == "budget_seconds" and value is not None else value)

        return [
            f"{label} {shown(key, restored.get(key))} → {shown(key, now[key])}"
            for key, label in labels.items()
            if restored.get(key) != now[key] and (key in ("name", "warmup_steps") or restored.get("name") == now["name"])
        ]

    def _warn_if_batch_changed(self, state: dict[str, Any]) -> None:
        """A run resumed with another global batch (other processes, batch size or accumulation)
        continues from the weights and optimizer state, but no longer as the uninterrupted run: say so."""
        saved, now = state.get("global_batch_size"), self.global_batch_size()
        if saved is None or saved == now:
            return
        logger.warning(
            f"{self.checkpoint} was trained with {saved} images per optimizer step ({state.get('num_processes')} "
            f"process(es)), this run takes {now} ({self.accelerator.num_processes} × --train_batch_size "
            f"{self.config.train_batch_size} × --gradient_accumulation_steps {self.config.gradient_accumulation_steps}): "
            "it goes on from the saved weights, optimizer and step, but from here its batches and data order differ "
            "from an uninterrupted run's, and the learning rate is not rescaled. Launch as before to continue that run exactly."
        )

    @property
    def logs_loss_terms(self) -> bool:
        """Whether the loss has a bound term besides the MSE (a learned variance trained on the
        hybrid objective or on L_vlb), so that both parts are logged."""
        return has_bound_term(self.noise_scheduler, self.config.loss_weighting, self.config.vlb_weight)

    def _save_state(self, folder: Path) -> None:
        """Accelerate's state (weights, optimizer, schedule, EMA, random states) and the timestep
        sampler's loss history into a checkpoint folder."""
        self.accelerator.save_state(str(folder))
        if self.timestep_sampler is not None and self.accelerator.is_main_process:
            torch.save(self.timestep_sampler.state_dict(), folder / TIMESTEP_SAMPLER_STATE_NAME)

    def _load_timestep_sampler(self, checkpoint: Path) -> None:
        """The loss history of a checkpoint of an importance-sampled run; a checkpoint without one
        (its run drew uniformly) starts a new history."""
        if self.timestep_sampler is None:
            return
        path = checkpoint / TIMESTEP_SAMPLER_STATE_NAME
        if path.is_file():
            self.timestep_sampler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            logger.warning(
                f"{checkpoint} holds no timestep loss history (its run drew timesteps uniformly): importance sampling "
                f"starts a new one and draws uniformly until every timestep has {self.config.importance_history} losses."
            )

    def save_checkpoint(self, step: int, train_seconds: float = 0.0, stop_reason: str | None = None) -> Path:
        """Write ``checkpoint-<step>`` (:func:`~ddpm_pipeline.checkpointing.write_checkpoint`) and
        prune old ones. ``stop_reason``, for the checkpoint a run stops with, is kept in its
        ``trainer_state.json`` as ``stopped_because`` (the console that showed it may be gone)."""
        path = write_checkpoint(
            self.output_dir,
            step,
            save_state=self._save_state,
            trainer_state={
                **self.run_progress(step, train_seconds),
                "epoch": step // self.steps_per_epoch,
                "training_config": self.config.to_dict(),
                # what a pipeline of this step needs besides the weights (python -m ddpm_pipeline.export_checkpoint)
                "unet_config": self.unet_config,
                "scheduler_config": self.noise_scheduler.config_options(),
                **({"stopped_because": stop_reason} if stop_reason else {}),
            },
            is_main_process=self.accelerator.is_main_process,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )
        if self.accelerator.is_main_process:
            for removed in prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit):
                logger.info(f"removed old checkpoint {removed}")
        return path

    def run_progress(self, global_step: int, train_seconds: float) -> dict[str, Any]:
        """How far the run is at ``global_step``, as a checkpoint records it and a summary shows it:
        the steps, epochs (steps ÷ steps per epoch), global batch, processes, training seconds,
        device, precision, data and the last held-out bound."""
        return {
            "global_step": global_step,
            "epochs": global_step / self.steps_per_epoch,
            "global_batch_size": self.global_batch_size(),
            "num_processes": self.accelerator.num_processes,
            "train_seconds": train_seconds,
            "device": device_description(self.accelerator.device),
            "mixed_precision": self.accelerator.mixed_precision,
            "data": self.data_identity,
            **({"held_out": self.held_out.record} if self.held_out is not None and self.held_out.record else {}),
        }

    def run_summary(self, global_step: int, train_seconds: float, history: LossHistory) -> dict[str, Any]:
        """What the run has done by ``global_step``, for the model card and for people: its
        :meth:`run_progress` and each loss column's mean over the last :data:`SUMMARY_STEPS` steps
        (``recent_loss``, with the number of steps averaged, ``steps``)."""
        return {**self.run_progress(global_step, train_seconds), "recent_loss": history.recent_loss(SUMMARY_STEPS)}

    def save_pipeline(self, summary: dict[str, Any]) -> None:
        """``save_pretrained`` of the EMA pipeline into ``output_dir``, with the options and the run's
        ``summary`` (``training_summary.json``) beside it; written to a temporary folder first, flushed
        to the disk (:func:`~ddpm_pipeline.atomic.flush_to_disk`) and moved into place part by part."""
        staging = temporary_sibling(self.output_dir / "pipeline")
        remove(staging)
        try:
            self.sampling_pipeline().save_pretrained(staging)
            self.config.save(staging / CONFIG_FILE_NAME)
            (staging / TRAINING_SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
            flush_to_disk(staging)
        except OSError as error:  # a full disk at the end of a long run: the last checkpoint holds the model
            remove(staging)
            raise disk_write_error(self.output_dir, "the pipeline", error) from error
        for entry in sorted(staging.iterdir()):
            move_into_place(entry, self.output_dir / entry.name)
        staging.rmdir()
        flush_folder_entries(self.output_dir)

    def save_snapshot(self, name: str, summary: dict[str, Any]) -> Path:
        """The EMA pipeline now, with the options and ``snapshot.json`` (the run's ``summary`` at
        this step: :meth:`run_summary`), into ``output_dir/name`` (written beside it, flushed to the
        disk, then renamed into place)."""
        folder = self.output_dir / name
        try:
            with atomic_path(folder, flush=True) as staging:
                self.sampling_pipeline().save_pretrained(staging)
                self.config.save(staging / CONFIG_FILE_NAME)
                (staging / SNAPSHOT_SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as error:
            raise disk_write_error(self.output_dir, name, error) from error
        logger.info(f"wrote {folder} (step {summary['global_step']}, {summary['train_seconds'] / 60:.2f} min trained)")
        return folder

    def _due_snapshots(self, global_step: int, train_seconds: float) -> list[str]:
        """The snapshots whose step or training minute has come and that are not written yet."""
        config = self.config
        due = [snapshot_name(n, "steps") for n in config.snapshot_steps or () if global_step == n]
        due += [snapshot_name(m, "minutes") for m in config.snapshot_minutes or () if train_seconds >= 60 * m]
        return [name for name in due if not (self.output_dir / name / SNAPSHOT_SUMMARY_NAME).is_file()]

    def after_optimizer_step(self) -> None:
        """Once per optimizer step: advance the learning-rate schedule and update the EMA weights."""
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    def training_step(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """Forward and backward of one micro-batch (and the optimizer step when the gradients are
        complete); returns its :func:`~ddpm_pipeline.run_records.step_record` (the loss first, then
        its parts and its quarters of the timesteps), detached and still on the device (no host sync).
        ``images`` is a batch of images in [-1, 1], of their 8-bit levels (uint8, what the loader
        yields) or of indices (int64) into the device-resident data set."""
        config = self.config
        if self.data.device_images is not None and images.dtype == torch.int64:
            images = self.data.device_images[images]  # a batch of indices into the device-resident data set
        if images.dtype == torch.uint8:  # the images' 8-bit levels (TrainingData): the network's inputs here
            images = levels_to_model_range(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        processes, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, images.shape[0]
        torch.manual_seed(derive_seed(seed, rank))  # dropout
        generator = torch.Generator(device=images.device).manual_seed(seed)
        rows = slice(rank * batch, (rank + 1) * batch)  # this process's rows of the global batch's draws
        if config.random_flip:
            flip = torch.rand(processes * batch, device=images.device, generator=generator)[rows] < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        weights = None
        if self.timestep_sampler is None:
            all_timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (processes * batch,),
                                          device=images.device, generator=generator)  # fmt: skip
        else:
            all_timesteps, all_weights = self.timestep_sampler.sample(processes * batch, generator)
            weights = all_weights[rows]
        timesteps = all_timesteps[rows]
        noise = torch.randn((processes * batch, *images.shape[1:]), device=images.device, dtype=images.dtype,
                            generator=generator)[rows]  # fmt: skip
        if self.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        with self.accelerator.accumulate(self.unet):
            terms = diffusion_loss_terms(
                self.unet, self.noise_scheduler, images, weighting=config.loss_weighting, timesteps=timesteps, noise=noise,
                vlb_weight=config.vlb_weight, snr_gamma=config.snr_gamma or DEFAULT_SNR_GAMMA,
            )  # fmt: skip
            per_sample = terms.loss
            loss = (per_sample if weights is None else per_sample * weights).mean()
            if self.timestep_sampler is not None:
                # every process records the whole global batch's losses: all keep the same history
                losses = self.accelerator.gather(per_sample.detach()) if processes > 1 else per_sample.detach()
                self.timestep_sampler.update(all_timesteps, losses)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                if config.max_grad_norm is not None:
                    grad_norm = self.accelerator.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
                elif config.nonfinite_loss == "skip":
                    grad_norm = self.accelerator.clip_grad_norm_(self.unet.parameters(), math.inf)
                if config.nonfinite_loss == "skip":
                    # the norm of the synchronized gradients: every process skips the same steps
                    found_inf = (~torch.isfinite(grad_norm)).float()
                    self.optimizer.optimizer.found_inf = found_inf
                    self.skipped_steps += found_inf
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return step_record(terms, timesteps, self.noise_scheduler.config.num_train_timesteps, weights)

    def _time_limits(self, clock: TrainingClock, piece_start: float, global_step: int) -> tuple[bool, bool]:
        """(training budget spent, this piece's time is up), as the main process sees them, so that
        every process stops at the same step; the learning-rate schedule sees the same clock."""
        config = self.config
        if config.max_train_minutes is None and config.stop_after_minutes is None:
            return False, False  # no limits: no tensor, no device read, no collective
        seconds = clock.total()
        readings = [
            config.max_train_minutes is not None and seconds >= 60 * config.max_train_minutes,
            config.stop_after_minutes is not None and time.perf_counter() - piece_start >= 60 * config.stop_after_minutes,
            seconds,
        ]
        if self.accelerator.num_processes > 1:
            device_readings = torch.tensor(readings, dtype=torch.float64, device=self.accelerator.device)
            readings = broadcast(device_readings, from_process=0).tolist()
        out_of_budget, piece_over, seconds = readings
        self.lr_scheduler.observe(global_step, seconds)
        return bool(out_of_budget), bool(piece_over)

    def _announce_importance_sampling(self, global_step: int) -> None:
        """Log once when the timestep sampler's history is full and its draws turn from uniform to
        importance (read back with the losses, every --log_every steps)."""
        sampler = self.timestep_sampler
        if sampler is None or self._importance_announced or not bool(sampler.warm):
            return
        self._importance_announced = True
        p = sampler.probabilities()
        logger.info(
            f"step {global_step}: every timestep has {sampler.history} recorded losses; timesteps are now drawn by "
            f"importance (p_t from {p.min().item() * sampler.num_timesteps:.3g}/T to {p.max().item() * sampler.num_timesteps:.3g}/T)"
        )

    def _check_finite(self, nonfinite_steps: list[int], global_step: int, history: LossHistory) -> None:
        """Act on the steps whose loss was NaN/inf (found when the losses are read back, every
        ``--log_every`` steps and always before anything is saved): stop, or count the skipped
        updates and stop past ``--max_skipped_steps``."""
        if not nonfinite_steps:
            return
        config = self.config
        shown = ", ".join(map(str, nonfinite_steps[:5])) + (" …" if len(nonfinite_steps) > 5 else "")
        if config.nonfinite_loss == "stop":
            history.flush()
            checkpoints = list_checkpoints(self.output_dir)
            raise FloatingPointError(
                f"The training loss became NaN/inf at step {nonfinite_steps[0]} (steps {shown}); stopped at step "
                f"{global_step} without saving anything from these steps. The last checkpoint is "
                f"{checkpoints[-1] if checkpoints else 'none (start again)'}: resume with --resume_from_checkpoint "
                "latest and a lower --learning_rate, a --max_grad_norm, or --mixed_precision no; or pass "
                "--nonfinite_loss skip to skip such steps."
            )
        skipped = int(self.skipped_steps.item())
        logger.warning(f"skipped the update of {len(nonfinite_steps)} step(s) with a NaN/inf loss ({shown}); {skipped} in all")
        if skipped > config.max_skipped_steps:
            history.flush()
            raise FloatingPointError(
                f"{skipped} optimizer steps had a NaN/inf loss, more than --max_skipped_steps {config.max_skipped_steps}: "
                "the run is diverging. Resume from the last checkpoint with a lower --learning_rate."
            )

    def _stop_reason(self, global_step: int, log_every: int) -> str | None:
        """Why to stop now: a stop signal (``--checkpoint_on_signals``), an exited launcher, or
        None. One process asks every step; several agree every ``log_every`` steps on any process's
        reason (one all-gather), so that all stop at the same step."""
        request = self.stop_request
        if self.accelerator.num_processes == 1:
            return request.reason()
        if global_step % log_every:
            return None
        reason = request.reason()
        mine = 0 if reason is None else _LAUNCHER_EXITED_CODE if reason == LAUNCHER_EXITED else signal_number(reason)
        number = int(self.accelerator.gather(torch.tensor([mine], device=self.accelerator.device)).max())
        if number == _LAUNCHER_EXITED_CODE:
            return LAUNCHER_EXITED
        return signal.Signals(number).name if number else None

    def _out_of_memory(self, error: torch.OutOfMemoryError, step: int) -> torch.OutOfMemoryError:
        """The GPU ran out of memory in a training step: the same error, saying how to fit the same
        optimizer step in less memory, and where the run can resume."""
        config = self.config
        batch, accumulation = config.train_batch_size, config.gradient_accumulation_steps
        fits = (f"--train_batch_size {batch // 2} --gradient_accumulation_steps {2 * accumulation} (the same "
                f"{self.global_batch_size()} images per optimizer step, in halves)") if batch > 1 else "a smaller --model"  # fmt: skip
        precision = "" if self.mixed_precision in ("bf16", "fp16") else " or --mixed_precision bf16 (not for μ),"
        if not config.gradient_checkpointing:
            precision += " or --gradient_checkpointing,"
        checkpoints = list_checkpoints(self.output_dir)
        return torch.OutOfMemoryError(
            f"Out of device memory in training step {step} ({self.model_name}, {describe_sample_size(self.unet_config['sample_size'])} images, "
            f"--train_batch_size {batch}): use {fits},{precision} or free the device of other processes. "
            f"The last checkpoint is {checkpoints[-1] if checkpoints else 'none'}; resume with "
            f"--resume_from_checkpoint latest. ({str(error).splitlines()[0] if str(error) else 'no details'})"
        )

    def _push(self) -> None:
        """Publish the finished folder; a failure (network, permissions) says that nothing is lost
        and how to publish the folder again, since training itself is done."""
        config = self.config
        try:
            # scores of earlier weights (a run resumed and trained further) are left off the card, with a warning
            info = push_to_hub(self.output_dir, config.hub_model_id, private=config.hub_private, token=config.hub_token,
                               license=config.hub_license, skip_stale_report=True)  # fmt: skip
        except Exception as error:
            raise RuntimeError(
                f"Training finished and everything is saved in {self.output_dir}, but the push to {config.hub_model_id} "
                f"failed ({type(error).__name__}: {error}). Push it again, without training, with `python -m "
                f"ddpm_pipeline.push {self.output_dir} --repo_id {config.hub_model_id}` (files already on the Hub "
                "are not sent twice)."
            ) from error
        logger.info(f"pushed to the Hub: {getattr(info, 'commit_url', info)}")

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        """Train, holding ``--output_dir``'s lock (:mod:`ddpm_pipeline.run_lock`: one run at a time),
        with the stop signals turned into a request to checkpoint and stop (see
        :mod:`ddpm_pipeline.stop_signals`) for as long as the run lasts, and a failure of
        ``torch.compile`` on the UNet explained (:func:`~ddpm_pipeline.speed.explain_compile_failure`)."""
        with (
            OutputDirLock(self.output_dir) if self.accelerator.is_main_process else nullcontext(),
            StopRequest(self.config.checkpoint_on_signals, watch_launcher=started_by_launcher()) as self.stop_request,
            explain_compile_failure("train again with --no-compile_unet (and --resume_from_checkpoint latest)"),
        ):
            result = self._run()
        if result.finished and self.stop_request.received:
            logger.warning(f"{self.stop_request.received} came after training had ended; the outputs are complete")
        return result

    def _resume(self) -> tuple[int, float]:
        """Restore the checkpoint this run resumes (weights, optimizer, schedule, EMA, timestep
        sampler, random states), put this run's options over it and warn where the batch or the data
        changed; returns its step and training seconds so far, ``(0, 0.0)`` for a new run."""
        if self.checkpoint is None:
            return 0, 0.0
        self._load_state(self.checkpoint)
        self._apply_options_over_restored_state()
        self._load_timestep_sampler(self.checkpoint)
        state = read_trainer_state(self.checkpoint)
        global_step, earlier_seconds = state["global_step"], state.get("train_seconds", 0.0)
        self._warn_if_batch_changed(state)
        self._warn_if_data_changed(state)
        stopped = f"; it had stopped: {state['stopped_because']}" if state.get("stopped_because") else ""
        logger.info(f"resumed from {self.checkpoint} at step {global_step} ({earlier_seconds / 60:.1f} min trained{stopped})")
        if global_step == self.total_steps:  # a run that stopped after its last checkpoint: it finishes
            logger.info(f"the checkpoint is at the run's last step ({global_step}): the pipeline is written from its weights")
        elif global_step > self.total_steps:
            if self.config.max_train_steps:
                option, limit = "--max_train_steps", f"--max_train_steps {self.total_steps}"
            else:
                option, limit = "--num_epochs", f"--num_epochs {self.config.num_epochs} ({self.total_steps} steps)"
            logger.warning(f"{limit} is not beyond the checkpoint's step {global_step}: nothing is trained, and the "
                           f"pipeline is written from its weights. To train further, give a larger {option}.")  # fmt: skip
        return global_step, earlier_seconds

    def _open_histories(self, global_step: int) -> LossHistory:
        """The training loss history (written by the main process), and the held-out bound's (when
        measured), from ``global_step`` on; a resumed run's start with the rows of the run its
        checkpoint belongs to, up to that step (this folder's, or another one's when branching).
        Returns the loss history."""
        resumed_from = self.checkpoint.parent if self.checkpoint is not None else None
        if self.held_out is not None:
            self.held_out.open_history(self.output_dir, global_step, resumed_from)
        return LossHistory(self.output_dir / LOSS_HISTORY_NAME, global_step, enabled=self.accelerator.is_main_process,
                           terms=self.logs_loss_terms,
                           resumed_history=resumed_from / LOSS_HISTORY_NAME if resumed_from else None)  # fmt: skip

    def _log_start(self) -> None:
        """Say what is trained, on what, for how long, and what stop signals and time budgets do."""
        config = self.config
        parameters = sum(p.numel() for p in self.unet.parameters())
        logger.info(
            f"{len(self.data.images)} images, {self.unet_config['in_channels']}×{describe_sample_size(self.unet_config['sample_size'])}; "
            f"{self.model_name}: {parameters:,} parameters; {self.steps_per_epoch} steps per epoch; "
            f"training to step {self.total_steps} (batch {config.train_batch_size} × "
            f"{config.gradient_accumulation_steps} accumulation × {self.accelerator.num_processes} processes)"
            + (f" or for {config.max_train_minutes:g} training minutes, whichever comes first" if config.max_train_minutes else "")
        )
        if self.stop_request.ignored:
            names, one = " and ".join(self.stop_request.ignored), len(self.stop_request.ignored) == 1
            logger.info(f"{names} {'is' if one else 'are'} ignored by this process, as a shell without job control "
                        f"starts `command &`: left so, {'it does' if one else 'they do'} not stop the run")  # fmt: skip
        if self.lr_scheduler.decays_over_budget:
            logger.info(f"the {config.lr_scheduler} learning-rate schedule measures its progress in training time too: "
                        "its decay ends when the time budget does")  # fmt: skip

    def _run(self) -> TrainingResult:
        config, accelerator = self.config, self.accelerator
        is_main = accelerator.is_main_process
        global_step, earlier_seconds = self._resume()
        if is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / CONFIG_FILE_NAME)
        if config.report_to != "none":
            init_kwargs = tracker_init_kwargs(config, self.checkpoint is not None, global_step) if is_main else {}
            accelerator.init_trackers("train_ddpm", config=tracker_config(config), init_kwargs=init_kwargs)
        history = self._open_histories(global_step)
        self._log_start()
        progress = tqdm(
            total=self.total_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process
        )
        first_epoch = global_step // self.steps_per_epoch
        batches_done = (global_step % self.steps_per_epoch) * config.gradient_accumulation_steps
        micro_records: list[torch.Tensor] = []
        log_every = self.log_every
        pending_losses = PendingLosses(accelerator, history, progress)
        clock = TrainingClock(earlier_seconds)
        grid_mark = (clock.total(), global_step)  # training seconds and step at the last grid, or this piece's start
        piece_start = time.perf_counter()
        stopped_early = budget_spent = False
        stopped_by = None
        epoch = first_epoch
        while global_step < self.total_steps:
            skip = batches_done if epoch == first_epoch else 0
            loader = accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            # Accelerate's loaders pass their own epoch count to the sampler when iterated; set it.
            loader.set_epoch(epoch)
            self.data.sampler.set_epoch(epoch)
            self.unet.train()
            for batch_index, images in enumerate(loader, start=skip):
                seed = micro_batch_seed(config.seed, epoch, batch_index)
                try:
                    micro_records.append(self.training_step(images, seed))
                except torch.OutOfMemoryError as error:
                    raise self._out_of_memory(error, global_step + 1) from error
                if not accelerator.sync_gradients:
                    continue
                lr = self.lr_scheduler.get_last_lr()[0]
                self.after_optimizer_step()
                global_step += 1
                pending_losses.add(global_step, torch.stack(micro_records).mean(dim=0), lr, epoch)
                micro_records = []
                progress.update(1)
                done = global_step >= self.total_steps
                if global_step % log_every == 0:
                    self._check_finite(pending_losses.flush(), global_step, history)
                    self._announce_importance_sampling(global_step)
                    budget_spent, stopped_early = self._time_limits(clock, piece_start, global_step)
                    if self.lr_scheduler.decays_over_budget:
                        progress.total = self.lr_scheduler.expected_total_steps()
                    done = done or budget_spent
                if global_step in (config.snapshot_steps or ()) or (config.snapshot_minutes and global_step % log_every == 0):
                    self._check_finite(pending_losses.flush(), global_step, history)  # every process: a gather
                    seconds = clock.total()
                    due = self._due_snapshots(global_step, seconds) if is_main else []
                    with clock.paused():
                        for name in due:
                            self.save_snapshot(name, self.run_summary(global_step, seconds, history))
                # measured before this step's checkpoint, so that a run resumed from it has the row
                if self.held_out is not None and self.held_out.due(global_step):
                    self._check_finite(pending_losses.flush(), global_step, history)  # the trackers' steps in order
                    with clock.paused():
                        self.measure_held_out(global_step)
                if not done and not stopped_early:
                    stopped_by = self._stop_reason(global_step, log_every)
                    stopped_early = stopped_by is not None
                if stopped_early and not done:
                    break
                if config.checkpointing_steps and global_step % config.checkpointing_steps == 0 and not done:
                    self._check_finite(pending_losses.flush(), global_step, history)
                    history.flush()
                    with clock.paused():
                        self.save_checkpoint(global_step, clock.total())
                if config.save_images_steps and global_step % config.save_images_steps == 0 and not done:
                    self._check_finite(pending_losses.flush(), global_step, history)
                    seconds_per_step = (clock.total() - grid_mark[0]) / (global_step - grid_mark[1])  # this piece's pace
                    with clock.paused():
                        if is_main:
                            self._timed_grid(global_step, seconds_per_step * config.save_images_steps)
                        self.unet.train()
                        accelerator.wait_for_everyone()
                    grid_mark = (clock.total(), global_step)
                if done:
                    break
            if done or stopped_early:
                break
            epoch += 1
        self._check_finite(pending_losses.flush(), global_step, history)
        progress.close()
        history.flush()
        train_seconds = clock.total()
        if stopped_early and not budget_spent and global_step < self.total_steps:
            self._checkpoint_and_stop(global_step, train_seconds, stopped_by)
            history.close()
            if self.held_out is not None:
                self.held_out.close()
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return TrainingResult(self.output_dir, global_step, pending_losses.last_loss, None, False, train_seconds,
                                  stopped_by, accelerator.device.type)  # fmt: skip
        if self.held_out is not None:
            if not self.held_out.due(global_step):
                self.measure_held_out(global_step)  # the end's, when no period ended here
            self.held_out.close()
        samples_path = self._finish(global_step, train_seconds, history)
        history.close()
        if is_main and config.push_to_hub:
            self._push()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainingResult(self.output_dir, global_step, pending_losses.last_loss, samples_path, True, train_seconds,
                              device_type=accelerator.device.type)  # fmt: skip

    def _checkpoint_and_stop(self, global_step: int, train_seconds: float, stopped_by: str | None) -> None:
        """A run stopped before its end (its piece's ``--stop_after_minutes`` up, a stop signal, or
        its launcher gone): write the checkpoint of this step with why it stopped, and say how to
        go on."""
        reason = f"this piece's {self.config.stop_after_minutes} min were up"
        if stopped_by == LAUNCHER_EXITED:
            reason = f"the launcher that started this run (PID {self.stop_request.launcher_pid}) has exited"
        elif stopped_by:
            reason = f"received {stopped_by}"
        checkpoint = self.save_checkpoint(global_step, train_seconds, stop_reason=reason)
        logger.info(
            f"{reason}: stopped at step {global_step} ({train_seconds / 60:.1f} min trained in all) and wrote "
            f"{checkpoint}; continue with --resume_from_checkpoint latest"
        )

    def _finish(self, global_step: int, train_seconds: float, history: LossHistory) -> Path | None:
        """A run that trained to its end: the last checkpoint on every process; then, by the main
        process, the EMA pipeline with the run's summary, the final grid and trajectory, and the
        loss (and held-out bound) curves. Returns the grid's path on the main process, else None."""
        summary = self.run_summary(global_step, train_seconds, history)
        recent = summary["recent_loss"]
        logger.info(
            f"trained to step {global_step} in {train_seconds:.0f} s"
            + (f" (loss {recent['loss']:.4g} over the last {recent['steps']} steps)" if "loss" in recent else "")
            + f"; writing the pipeline, then the final grid and trajectory ({self.config.num_grid_images} images × "
            f"{self.config.grid_inference_steps} steps, EMA weights)"
        )
        if self.data.images.skipped:  # counted here when the main process loaded them (workers count their own)
            logger.warning(f"{len(self.data.images.skipped)} bad image(s) were skipped (see the warnings above)")
        self.save_checkpoint(global_step, train_seconds)
        if not self.accelerator.is_main_process:
            return None
        self.save_pipeline(summary)
        samples_path = self.save_grid(self.output_dir / SAMPLES_NAME, trajectory_path=self.output_dir / TRAJECTORY_NAME,
                                      step=global_step, description="final grid")  # fmt: skip
        (self.output_dir / GRID_FOLDER).mkdir(exist_ok=True)
        shutil.copyfile(samples_path, grid_path(self.output_dir, global_step))
        steps, losses = history.series("loss")
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        by_quarter = {
            f"[{q * num_timesteps / TIMESTEP_QUARTERS:g}, {(q + 1) * num_timesteps / TIMESTEP_QUARTERS:g})":
                history.series(name)[1]
            for q, name in enumerate(QUARTER_COLUMNS)
        }  # fmt: skip
        save_loss_curve(steps, losses, self.output_dir / LOSS_CURVE_NAME, by_quarter=by_quarter,
                        title=f"{self.model_name}, {self.prediction_type} target, "
                              f"{self.noise_scheduler.schedule_name or 'custom'} schedule")  # fmt: skip
        if self.held_out is not None:
            self.held_out.save_curve(self.output_dir, self.model_name)
        return samples_path


def train(config: TrainingConfig) -> TrainingResult:
    """Train a DDPM as ``config`` says and write, into ``config.output_dir``: the EMA pipeline
    (``model_index.json``, ``unet/``, ``scheduler/``) with ``training_config.json``; ``samples.png``
    and ``trajectory.png``; ``samples/step_N.png`` grids; ``loss_history.csv`` and
    ``loss_curve.png``; ``checkpoint-N/`` folders; TensorBoard logs in ``logs/``.

    Accelerate keeps the mixed precision and gradient accumulation of a process's first
    ``Accelerator`` for every later one; they are released when the run returns or fails, so the
    next ``train`` in the same process (a notebook's next cell) runs with its own options."""
    try:
        return Trainer(config).run()
    finally:
        release_accelerate_state()


def release_accelerate_state() -> None:
    """Forget Accelerate's process-wide ``AcceleratorState`` and ``GradientState`` (its mixed
    precision, gradient accumulation, …), so the next ``Accelerator`` of this process is built from
    its own arguments rather than refused or given the first one's. ``PartialState`` (the
    processes, the device and a distributed launch's process group) is kept: it describes the
    process, not the run."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def exit_status(result: TrainingResult) -> int:
    """The exit status of ``train_ddpm.py``: 0, or ``128 + n`` when signal ``n`` stopped the run
    (with a checkpoint), as a shell reports a process that signal ended (143 for SIGTERM), or 1
    when its launcher had exited."""
    if result.stopped_by == LAUNCHER_EXITED:
        return 1
    return 128 + signal_number(result.stopped_by) if result.stopped_by else 0


def main(argv: list[str] | None = None, config: TrainingConfig | None = None) -> TrainingResult:
    """The ``train_ddpm.py`` command line ``argv`` (its exit status: :func:`exit_status`), or its
    options ``config`` already parsed (as :func:`~ddpm_pipeline.commands.train` parses them)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    config = config if config is not None else TrainingConfig.from_args(argv)
    result = train(config)
    if result.finished:
        folder = shlex.quote(str(result.output_dir))
        # eval_metrics.py's defaults (50,000 samples of 1,000 steps, the exact bound) are a GPU's work
        scoring, scores = " --metrics fid,kid,prc,bpd", "FID, KID, precision/recall and bits/dim"
        if result.device_type == "cpu":
            scoring, scores = f" {QUICK_CPU_EVALUATION}", "a quick FID-1k, KID and bits/dim on a CPU"
        evaluate, sample = invocation("eval_metrics.py"), invocation("sample_ddpm.py")
        snapshots = (f", `{evaluate} --model {folder}{scoring} --snapshots` for them at each snapshot too"
                     if config.snapshot_minutes or config.snapshot_steps else "")  # fmt: skip
        logger.info(
            f"done: the pipeline, samples.png and loss_curve.png are in {result.output_dir}. Next: "
            f"`{sample} --model {folder}` for more samples, `{evaluate} --model {folder}{scoring}` "
            f"for {scores}{snapshots}"
        )
    return result
