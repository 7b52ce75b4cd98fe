"""`TrainingConfig`: every option of a training run, its defaults, checks and command line.

The defaults are the main job: the small UNet preset trained on the bundled Fashion-MNIST images
on a CPU in minutes. `docs` of each field is the command line's help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .commands import program_name
from .json_files import read_json_object
from .option_values import (
    COMPILE_MODES,
    DEFAULT_IMPORTANCE_HISTORY,
    DEFAULT_IMPORTANCE_UNIFORM_PROB,
    DEFAULT_SNR_GAMMA,
    DEFAULT_VLB_WEIGHT,
    HOLD_OUT_ROWS,
    LOSS_WEIGHTINGS,
    RESIZE_MODES,
    TIMESTEP_SAMPLINGS,
    VARIANCE_TYPES,
    canonical_prediction_type,
    is_learned_variance,
    model_output_channels,
)
from .stop_signals import DEFAULT_STOP_SIGNALS, signal_name
from .unet_presets import (
    PRESETS,
    PRESETS_BY_IMAGE_SIZE,
    downsampling_factor,
    nearest_trainable_size,
    preset_for_image_size,
)

if TYPE_CHECKING:
    from .images import ImageFormat


def split_problems(split: str, option: str, forms: str = "") -> list[str]:
    """The problem with ``option``'s ``split``, before any data is read: a spec that ``datasets``
    cannot read (:func:`~ddpm_pipeline.splits.read_instruction`), with a hint for a decimal comma
    (``0,05``); ``[]`` when it reads."""
    from .splits import read_instruction  # datasets: imported to check the options, not to list them (--help)

    try:
        read_instruction(split, option, forms)
    except ValueError as error:
        comma = "; write a share with a point: 0.05" if re.fullmatch(r"\s*\d*,\d+\s*%?\s*", split) else ""
        return [f"{str(error).rstrip('.')}{comma}."]
    return []


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
BETA_SCHEDULES = ("linear", "cosine")
TRAINING_PREDICTION_TYPES = ("epsilon", "x0", "mu", "v_prediction")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none")
CONFIG_FILE_NAME = "training_config.json"

#: What a run from scratch uses for the options a fine-tuning run takes from its pretrained model.
FRESH_RUN_DEFAULTS: dict[str, Any] = {
    "prediction_type": "epsilon",
    "beta_schedule": "cosine",
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small",
}
#: options of diffusers' examples/unconditional_image_generation/train_unconditional.py that this
#: script names otherwise, or does without; the command line names the equivalent instead of
#: "unrecognized arguments"
DIFFUSERS_EXAMPLE_OPTIONS = {
    "--dataset_config_name": "--dataset_config",
    "--model_config_name_or_path": "--unet_overrides CONFIG (a UNet2DModel config.json, or the folder holding it: that architecture with new weights), or --pretrained_model_name_or_path to start from trained weights",
    "--center_crop": "--resize_mode crop",
    "--eval_batch_size": "--num_grid_images",
    "--save_images_epochs": "--save_images_steps (in optimizer steps)",
    "--save_model_epochs": "--checkpointing_steps (resumable states) or --snapshot_steps (pipelines along the way); the pipeline is written at the end",
    "--hub_private_repo": "--hub_private",
    "--logger": "--report_to",
    "--ddpm_num_steps": "--num_train_timesteps",
    "--ddpm_num_inference_steps": "--grid_inference_steps",
    "--ddpm_beta_schedule": "--beta_schedule linear or cosine (diffusers' squaredcos_cap_v2)",
    "--enable_xformers_memory_efficient_attention": "nothing: the UNet's attention runs on torch's scaled_dot_product_attention",
    "--local_rank": "nothing: accelerate launch gives each process its rank",
}  # fmt: skip
#: values of diffusers' names for a choice that this script spells otherwise
DIFFUSERS_EXAMPLE_VALUES = {
    ("--prediction_type", "sample"): "--prediction_type x0",
    ("--beta_schedule", "squaredcos_cap_v2"): "--beta_schedule cosine",
}
#: A run that leaves its image size to the data trains at most at this size (the largest preset's).
LARGEST_DATA_RESOLUTION = PRESETS_BY_IMAGE_SIZE[-1][0]
_SIZE_RULE = ", ".join(f"{name} up to {size}px" for size, name in PRESETS_BY_IMAGE_SIZE[:-1])
#: Options that change the network's weights' shapes: a fine-tuning run takes them from its model.
WEIGHT_SHAPE_FIELDS = ("model", "block_out_channels", "layers_per_block", "unet_overrides")

#: Options that define the network and its objective, and whether a checkpoint holds EMA weights:
#: a checkpoint only resumes a run that agrees on them.
ARCHITECTURE_FIELDS = (
    "model",
    "pretrained_model_name_or_path",
    "revision",
    "block_out_channels",
    "layers_per_block",
    "dropout",
    "unet_overrides",
    "resolution",
    "channels",
    "prediction_type",
    "beta_schedule",
    "num_train_timesteps",
    "variance_type",
    "use_ema",
)


def take_python_values(config: Any, numbers_as_text: tuple[str, ...] = (), heading: str = "Bad options:") -> None:
    """Turn, in place, what a Python caller gives a config dataclass into what its command line
    gives: a path (`pathlib.Path`) into its text, a numpy integer or float into Python's, and a
    number given for an option of ``numbers_as_text`` (read as text, such as a share of images:
    ``0.05``, ``500``) into its text. Then raise a ValueError (under ``heading``) naming each
    option of type ``int`` or ``float`` given something else (``max_train_steps="100"``), which
    would otherwise fail later in a comparison, or after hours of work in the JSON of a report."""
    problems = []
    for option in dataclasses.fields(config):
        value = getattr(config, option.name)
        kind = option.type if isinstance(option.type, str) else getattr(option.type, "__name__", str(option.type))
        kind = kind.removesuffix(" | None")
        if isinstance(value, os.PathLike):
            setattr(config, option.name, os.fspath(value))
        elif value is None or isinstance(value, bool):
            if isinstance(value, bool) and kind in ("int", "float"):
                problems.append(f"--{option.name} must be a{'n integer' if kind == 'int' else ' number'}, got {value!r}.")
        elif option.name in numbers_as_text and isinstance(value, numbers.Real):
            setattr(config, option.name, str(value.item() if hasattr(value, "item") else value))
        elif kind == "int":
            if isinstance(value, numbers.Integral):
                setattr(config, option.name, int(value))
            else:
                problems.append(f"--{option.name} must be an integer, got {value!r}.")
        elif kind == "float":
            if isinstance(value, numbers.Real):
                setattr(config, option.name, float(value))
            else:
                problems.append(f"--{option.name} must be a number, got {value!r}.")
    if problems:
        raise ValueError(heading + "\n  " + "\n  ".join(problems))


def unet_config_file_overrides(location: str) -> str:
    """``--unet_overrides`` naming a file: the JSON text of the `UNet2DModel` ``config.json`` at
    ``location`` (or in the folder ``location``, such as a pipeline's ``unet/``) without diffusers'
    own entries (``_class_name``, ``_diffusers_version``, ``_name_or_path``: names starting with
    ``_``). ``location`` unchanged when no such file or folder exists (the JSON check names it)."""
    path = Path(location).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise ValueError(f"--unet_overrides {location} is a pipeline folder: give its "
                             f"network's config, {path / 'unet'}.")  # fmt: skip
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--unet_overrides {location} is a folder without a config.json: "
                             "give a UNet2DModel config.json or the folder holding one.")  # fmt: skip
    elif not path.is_file():
        return location
    try:
        options = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"--unet_overrides {path} cannot be read ({error.strerror or error}).") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--unet_overrides {path} is not a JSON file ({error}).") from error
    if not isinstance(options, dict):
        raise ValueError(f"--unet_overrides {path} holds no JSON object of UNet2DModel options.")
    kind = options.get("_class_name", "UNet2DModel")
    if kind not in ("UNet2DModel", "DDPMUNet"):
        raise ValueError(f"--unet_overrides {path} is the config of a {kind}: this package trains diffusers' "
                         "UNet2DModel (unconditional DDPMs); give a UNet2DModel config.json.")  # fmt: skip
    return json.dumps({name: value for name, value in options.items() if not name.startswith("_")})


def sets_every_preset_option(model: str, overrides: dict[str, Any]) -> bool:
    """Whether ``overrides`` (``--unet_overrides``) replace every option of preset ``model``, as a
    whole ``config.json`` does: the network is then the file's, whatever the preset."""
    return set(PRESETS[model]) <= set(overrides)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shape_override_problems(overrides: dict[str, Any]) -> list[str]:
    """What is wrong with the sizes in ``--unet_overrides`` (``sample_size``: one size or
    ``[height, width]``; ``block_out_channels``: one or more channel counts)."""
    problems = []
    size = overrides.get("sample_size")
    if size is not None and not (
        _is_positive_int(size) or (isinstance(size, list) and len(size) == 2 and all(map(_is_positive_int, size)))
    ):
        problems.append(
            f"--unet_overrides sample_size must be a positive integer or [height, width], got {json.dumps(size)}."
        )
    channels = overrides.get("block_out_channels")
    if channels is not None and not (isinstance(channels, list) and channels and all(map(_is_positive_int, channels))):
        problems.append(
            f"--unet_overrides block_out_channels must be a list of positive integers, one per level, got "
            f"{json.dumps(channels)}."
        )
    return problems


def _option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainingConfig:
    """All settings of one `train` run (see ``python train_ddpm.py --help``)."""

    # data
    dataset_name: str | None = _option(None, "A data set on the Hugging Face Hub, e.g. cifar10 (needs the network).")
    dataset_config: str | None = _option(None, "The Hub data set's configuration name, if it has several.")
    split: str = _option("train", "Which split to train on, as datasets reads it: a name (train, test; an image folder's "
                         "subfolders), a slice (train[:1000], train[:10%]) or a sum (train+test).")
    train_data_dir: str | None = _option(None, "A local folder of images (read with the `imagefolder` builder).")
    dataset_path: str | None = _option(None, "A data set written by `Dataset.save_to_disk` (see ddpm_pipeline.convert).")
    image_column: str | None = _option(None, "The column holding the images: images, paths to image files, or arrays of pixels [H, W], [H, W, C] or [C, H, W] (integers 0-255 or floats in [0, 1]) (default: image, img, the one Image column, or the one column of image bytes or arrays).")
    cache_dir: str | None = _option(None, "Where `datasets` and --pretrained_model_name_or_path cache their downloads.")
    resolution: int | None = _option(None, f"Training image size in pixels (default: the pretrained network's or --model's sample_size; without either, the data's: the median shorter side of 64 images spread over the data set, at most {LARGEST_DATA_RESOLUTION}, rounded to a size the network's down-sampling divides).")
    channels: int | None = _option(None, "1 = grayscale, 3 = RGB (default: the pretrained network's in_channels; for a new network, the data's: 3 if any of 64 images spread over the data set has colour).", choices=(1, 3))
    resize_mode: str = _option("auto", "pad (center on black), crop (resize + center crop), auto = pad if smaller.", choices=RESIZE_MODES)
    bad_images: str = _option("skip", "An unreadable or unusable image: skip it (logged and counted; the next readable image stands in) or fail naming the file.", choices=("skip", "fail"))
    random_flip: bool = _option(False, "Flip training images left-right at random.")
    dataloader_num_workers: int | None = _option(None, "DataLoader worker processes (0 = load in the main process; none = 0 on the CPU or with --data_on_device, else up to 8 per GPU).")
    num_cpu_threads: int | None = _option(None, "Torch threads per process when training on the CPU (default: the available cores / processes; `accelerate launch` would otherwise leave 1).")
    # model
    model: str | None = _option(None, f"UNet preset (DDPMUNet.preset_names(); default: by the image size, {_SIZE_RULE}, {PRESETS_BY_IMAGE_SIZE[-1][1]} beyond).", choices=tuple(sorted(PRESETS)))
    pretrained_model_name_or_path: str | None = _option(None, "Fine-tune: start from a trained DDPM's weights and noise schedule instead of a new network: a train_ddpm.py --output_dir, a save_pretrained folder, a Hub repo such as google/ddpm-cifar10-32, or a UNet2DModel folder. Its architecture stays (--model and the architecture options are refused; --resolution and --dropout may change); the diffusion options default to its scheduler's.")
    revision: str | None = _option(None, "The Hub revision (branch, tag or commit) of --pretrained_model_name_or_path.")
    block_out_channels: list[int] | None = _option(None, "Override the preset's channels per resolution level.", nargs="+", type=int)
    layers_per_block: int | None = _option(None, "Override the preset's ResNet blocks per level.")
    dropout: float | None = _option(None, "Override the preset's dropout rate.")
    unet_overrides: str | None = _option(None, 'Any other UNet2DModel options as JSON, e.g. \'{"norm_num_groups": 16}\', or a UNet2DModel config.json (or the folder holding it, such as a pipeline\'s unet/), whose every option replaces the preset\'s: that architecture with new weights (--pretrained_model_name_or_path starts from trained ones). The run records the JSON itself.')
    # diffusion
    prediction_type: str | None = _option(None, "What the network predicts: the noise ε, the clean image x0, the posterior mean μ, or v = √ᾱ_t ε - √(1-ᾱ_t) x0 (default epsilon, or the pretrained scheduler's).", choices=TRAINING_PREDICTION_TYPES)
    beta_schedule: str | None = _option(None, "Noise schedule: cosine (Nichol & Dhariwal; better than linear for the main job in FID and bits/dim, see README) or linear (Ho et al.) (default cosine, or the pretrained scheduler's).", choices=BETA_SCHEDULES)
    num_train_timesteps: int | None = _option(None, "Diffusion steps T (default 1000, or the pretrained scheduler's).")
    loss_weighting: str = _option("simple", "simple = unweighted MSE on the target; vlb = the variational bound: with a fixed variance the MSE under the bound's weights λ_t, with --variance_type learned_range the bound's term L_t itself (Improved DDPM's L_vlb, which trains the mean too; pair it with --timestep_sampling importance); min_snr = Min-SNR-γ (Hang et al. 2023): min(SNR_t, γ)·‖x0 - x̂0‖² expressed on the target, min(1, γ/SNR_t) times the ε MSE.", choices=LOSS_WEIGHTINGS)
    snr_gamma: float | None = _option(None, f"γ of --loss_weighting min_snr (default {DEFAULT_SNR_GAMMA:g}, the paper's); as in diffusers' scripts, giving it alone turns min_snr on.")
    variance_type: str | None = _option(None, "The reverse process variance: fixed_small (posterior β̃_t), fixed_large (β_t), or learned_range (Improved DDPM: the network also outputs a per-pixel interpolation between their logs, trained by the hybrid objective, see --vlb_weight, or by the bound alone, see --loss_weighting) (default fixed_small, or the pretrained scheduler's).", choices=VARIANCE_TYPES)
    vlb_weight: float = _option(DEFAULT_VLB_WEIGHT, "λ of Improved DDPM's hybrid objective L_simple + λ·L_vlb, which trains a learned variance (--variance_type learned_range) through the bound while the mean keeps L_simple (with --loss_weighting simple).")
    timestep_sampling: str = _option("uniform", "How each image's timestep t is drawn: uniform, or importance (Improved DDPM: p_t ∝ √E[L_t²] over the last --importance_history losses at t, uniform until every t has them; each loss is weighted by 1/(T p_t), so the objective is unchanged and its estimate less noisy when the terms differ widely over t, as the bound's do).", choices=TIMESTEP_SAMPLINGS)
    importance_history: int = _option(DEFAULT_IMPORTANCE_HISTORY, "With --timestep_sampling importance: losses kept per timestep (the warm-up draws uniformly until every timestep has this many: about T × this / batch steps or more).")
    importance_uniform_prob: float = _option(DEFAULT_IMPORTANCE_UNIFORM_PROB, "With --timestep_sampling importance: the share of the uniform distribution mixed into p_t, in (0, 1].")
    # optimization
    train_batch_size: int = _option(32, "Images per device per forward pass.")
    gradient_accumulation_steps: int = _option(1, "Forward passes per optimizer step.")
    learning_rate: float = _option(2e-3, "Peak learning rate (AdamW).")
    lr_scheduler: str = _option("cosine", "Learning-rate schedule after warmup.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _option(100, "Optimizer steps of linear warmup.")
    adam_beta1: float = _option(0.9, "AdamW β1.")
    adam_beta2: float = _option(0.999, "AdamW β2.")
    adam_weight_decay: float = _option(0.0, "AdamW decoupled weight decay.")
    adam_epsilon: float = _option(1e-8, "AdamW ε.")
    nonfinite_loss: str = _option("stop", "On a NaN/inf loss: stop (with the step named; nothing non-finite is saved) or skip that optimizer step (done on the device, with fused AdamW).", choices=("stop", "skip"))
    max_skipped_steps: int = _option(100, "With --nonfinite_loss skip: stop once this many steps have been skipped.")
    max_grad_norm: float | None = _option(1.0, "Clip the gradient's global norm to this (none to disable).")
    max_train_steps: int | None = _option(800, "Optimizer steps to train; overrides --num_epochs (none = use epochs).")
    num_epochs: int = _option(10, "Passes over the data set when --max_train_steps is none.")
    max_train_minutes: float | None = _option(None, "A training-time budget: stop (and save as usual) once this many minutes were spent training, summed over resumed pieces; checked every --log_every steps. A decaying --lr_scheduler then measures its progress in training time too, and its decay ends when the budget does (or at the step limit, if that comes first).")
    stop_after_minutes: float | None = _option(None, "End this invocation after this many wall-clock minutes with a checkpoint, to continue later with --resume_from_checkpoint latest (for time-limited jobs); the run itself is unchanged.")
    checkpoint_on_signals: list[str] = _option(list(DEFAULT_STOP_SIGNALS), "On these signals (a scheduler's preemption notice, Ctrl-C, SLURM's --signal warning), finish the optimizer step, write a checkpoint and end with exit status 128 + the signal's number; continue with --resume_from_checkpoint latest. A second signal acts at once. none = die on them as usual.", nargs="*", type=str)
    snapshot_minutes: list[float] | None = _option(None, "Also write the EMA pipeline when the training clock passes each of these minutes, into --output_dir/snapshot-<m>min/ (quality against training time from one run); checked every --log_every steps.", nargs="+", type=float)
    snapshot_steps: list[int] | None = _option(None, "Also write the EMA pipeline at these optimizer steps, into --output_dir/snapshot-<n>steps/.", nargs="+", type=int)
    # EMA
    use_ema: bool = _option(True, "Keep an exponential moving average of the weights for sampling and saving.")
    ema_max_decay: float = _option(0.9999, "The EMA decay's ceiling.")
    ema_min_decay: float = _option(0.0, "The EMA decay's floor.")
    ema_warmup: bool = _option(True, "Warm the decay up as 1 - (1 + n/γ)^-p; without it, (1 + n)/(10 + n).")
    ema_inv_gamma: float = _option(1.0, "γ of the EMA warmup.")
    ema_power: float = _option(0.75, "p of the EMA warmup (3/4 suits short runs, 2/3 long ones).")
    # precision and reproducibility
    mixed_precision: str | None = _option("auto", "Autocast precision with float32 master weights and loss: auto = bf16 on a GPU (fp16 on one older than Ampere, e.g. a T4 or V100, which only emulates bf16; fp32 for the μ target, which half precision ruins), no on the CPU (where bf16 is faster on a CPU with AVX512-BF16 or AMX, which the log names, and fp16 does nothing: refused).", choices=MIXED_PRECISION)
    # speed (none = auto: on for a GPU, off on the CPU, except where a help says otherwise; see ddpm_pipeline.speed)
    allow_tf32: bool | None = _option(None, "Let fp32 matmuls/convolutions use TF32 tensor cores (never for the μ target unless given).")
    channels_last: bool | None = _option(None, "Keep the UNet's weights and activations in NHWC memory layout (auto: on a GPU, and on the CPU with --compile_unet, where it is most of what compiling gains).")
    compile_unet: bool | None = _option(None, "torch.compile the UNet (the first steps take a while to compile; auto: on for CUDA when Triton supports the GPU). On the CPU an opt-in for long runs (needs a C++ compiler): 1.14-1.33x the images/s on the 2-core reference CPU (with channels_last, which it turns on there), after about 40 s of compiling and a recompile for a smaller last batch; the 800-step main job is slower with it.")
    compile_mode: str | None = _option(None, f"torch.compile mode: {', '.join(COMPILE_MODES)} (none = default).")
    fused_adam: bool | None = _option(None, "One fused AdamW kernel per step (else multi-tensor foreach kernels); auto: on for CUDA and the CPU.")
    gradient_checkpointing: bool = _option(False, "Recompute each UNet block's activations in the backward pass instead of keeping them: less memory (larger batches or images) for more compute (README: measured on a CPU); the same gradients.")
    data_on_device: bool | None = _option(None, "Preprocess the whole data set once into device memory (auto: when it takes at most a quarter of the GPU's memory, or on the CPU of the machine's, there only when the run reads every image at least once).")
    seed: int = _option(0, "Seed for weights, data order, noise and dropout: a run is reproducible on the CPU.")
    # outputs
    output_dir: str = _option("outputs/ddpm-fashion-mnist", "Where the pipeline, checkpoints, grids and logs go.")
    checkpointing_steps: int | None = _option(400, "Save a resumable checkpoint every N optimizer steps (none = only at the end).")
    checkpoints_total_limit: int | None = _option(2, "Keep at most this many checkpoints, deleting the oldest.")
    overwrite_output_dir: bool = _option(False, "Start afresh in an --output_dir that holds an earlier run (checkpoints, snapshots or a finished pipeline), or go back to an older checkpoint of it, deleting that run's outputs (past the checkpoint) first; files of your own stay. Without it, such a start is refused, since the two runs would mix.")
    resume_from_checkpoint: str | None = _option(
        None,
        "latest (the newest in --output_dir), checkpoint-N (looked up in --output_dir), or the path of any "
        "checkpoint-N folder (another run's starts a branch of that run in --output_dir, with its loss history up to step N).",
    )
    save_images_steps: int | None = _option(400, "Write a sample grid every N optimizer steps (none = only the one at the end).")
    validation_split: str | None = _option(None, "Held-out images of the same source: a share or a count of --split's images held out of training (0.05, 5%, 500; which ones: --validation_rows), or a split (test; or a slice, train[-500:] with --split 'train[:-500]'): every --validation_steps steps, the EMA network's bound in bits/dim on --validation_images of them and on as many training images is logged and plotted (validation_curve.png), to see it learn or overfit.")
    validation_rows: str = _option("random", "Which images a --validation_split share or count holds out: random (drawn by a fixed seed, the same for every run of the data and share: a fair sample of the split however it is ordered) or last (its last rows, as Keras takes them; an image folder lists its images class by class, so they may be one class).", choices=HOLD_OUT_ROWS)
    validation_steps: int | None = _option(400, "With --validation_split: measure every N optimizer steps (none = only at the end; always at the end).")
    validation_images: int = _option(256, "With --validation_split: the held-out images measured (all of them, where there are fewer), and as many training images (each set's spread evenly over it).")
    validation_timesteps: int | None = _option(20, "With --validation_split: timesteps per image of the bound's unbiased estimate, one from each of K log-spaced strata (none = every timestep, exact: T network evaluations per image).")
    num_grid_images: int = _option(64, "Images in each sample grid (a square number looks best).")
    grid_inference_steps: int = _option(100, "Sampling steps for the grids (respaced; T gives the full chain).")
    report_to: str = _option("tensorboard", "Where to log the loss, learning rate and sample grids besides the progress bar and files: TensorBoard (in --logging_dir) or Weights & Biases (pip install wandb; `wandb login`, or WANDB_MODE=offline; one W&B run per --output_dir, continued on resuming).", choices=REPORT_TO)
    logging_dir: str = _option("logs", "TensorBoard folder, relative to --output_dir.")
    push_to_hub: bool = _option(False, "Upload the finished pipeline with a model card to the Hub (needs --hub_model_id and a login).")
    hub_model_id: str | None = _option(None, "The Hub repo to push to, user-or-org/name (created if needed).")
    hub_private: bool = _option(False, "Create the Hub repo as private.")
    hub_token: str | None = _option(None, "A Hub token with write access (default: the saved `hf auth login`); never written to disk.")
    hub_license: str = _option("apache-2.0", "The license named in the model card.")
    log_every: int | None = _option(
        None, "Read the loss back from the device every N steps (each step is still logged); none = 1 on the CPU, 25 on a GPU, where every read stalls the pipeline."  # noqa: E501
    )

    def __post_init__(self) -> None:
        # from Python, values in the types one would write there rather than the command line's text
        take_python_values(self, numbers_as_text=("validation_split",), heading="Bad training options:")
        if isinstance(self.unet_overrides, dict):
            self.unet_overrides = json.dumps(self.unet_overrides)
        elif self.unet_overrides and not self.unet_overrides.lstrip().startswith("{"):
            try:
                self.unet_overrides = unet_config_file_overrides(self.unet_overrides)
            except ValueError as error:
                raise ValueError(f"Bad training options:\n  {error}") from error
        if isinstance(self.checkpoint_on_signals, str):
            self.checkpoint_on_signals = [self.checkpoint_on_signals]
        if self.pretrained_model_name_or_path is None:
            for name, value in FRESH_RUN_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if [name.lower() for name in self.checkpoint_on_signals] == ["none"]:
            self.checkpoint_on_signals = []
        if self.snr_gamma is not None and self.loss_weighting == "simple":
            self.loss_weighting = "min_snr"  # diffusers' --snr_gamma is the switch itself
        if self.loss_weighting == "min_snr" and self.snr_gamma is None:
            self.snr_gamma = DEFAULT_SNR_GAMMA
        self.validate()
        self.checkpoint_on_signals = [signal_name(name) for name in self.checkpoint_on_signals]

    def validate(self) -> None:
        """Raise `ValueError` naming the bad option and what to give instead."""
        problems = []

        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not _is_positive_int(value):
                problems.append(f"--{name} must be a positive integer{' or none' if allow_none else ''}, got {value!r}.")

        for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "num_grid_images",
                     "grid_inference_steps", "validation_images"):  # fmt: skip
            positive(name)
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "save_images_steps",
                     "resolution", "layers_per_block", "num_cpu_threads", "log_every", "max_skipped_steps",
                     "num_train_timesteps", "validation_steps", "validation_timesteps"):  # fmt: skip
            positive(name, allow_none=True)
        problems += split_problems(self.split, "--split")
        if self.validation_split is not None:
            from .hold_out import held_out_amount  # datasets and numpy, as split_problems

            try:
                amount = held_out_amount(self.validation_split)
            except ValueError as error:
                problems.append(str(error))
            else:
                if amount is None:
                    problems += split_problems(self.validation_split, "--validation_split",
                                               ", or a share or a count of --split's images to hold out (0.05, 5%, 500)")  # fmt: skip
            if self.validation_split.replace(" ", "") == self.split.replace(" ", ""):
                problems.append(
                    f"--validation_split {self.validation_split!r} is the training split itself: hold images out, e.g. "
                    "--validation_split 0.05 (a share or a count of --split's images), or name another split (test)."
                )
        if self.pretrained_model_name_or_path is not None:
            given = [f"--{name}" for name in WEIGHT_SHAPE_FIELDS if getattr(self, name) is not None]
            if given:
                problems.append(
                    f"{', '.join(given)} and --pretrained_model_name_or_path both define the network: fine-tuning keeps "
                    f"the pretrained architecture, so drop {' and '.join(given)}."
                )
        if self.num_train_timesteps is not None and self.grid_inference_steps > self.num_train_timesteps:
            problems.append(
                f"--grid_inference_steps {self.grid_inference_steps} exceeds --num_train_timesteps "
                f"{self.num_train_timesteps}."
            )
        if self.num_train_timesteps is not None and self.num_train_timesteps >= 2 and self.beta_schedule == "linear":
            try:
                from .schedules import make_betas  # torch: imported for the linear schedule alone

                make_betas("linear", self.num_train_timesteps)
            except ValueError as error:
                problems.append(f"--num_train_timesteps {self.num_train_timesteps} --beta_schedule linear: {error}")
        for name in ("snapshot_minutes", "snapshot_steps"):
            if any(value <= 0 for value in getattr(self, name) or ()):
                problems.append(f"--{name} must be positive, got {getattr(self, name)}.")
        for name in ("max_train_minutes", "stop_after_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"--{name} must be positive or none, got {value}.")
        for name in self.checkpoint_on_signals:
            try:
                signal_name(name)
            except ValueError as error:
                problems.append(f"--checkpoint_on_signals: {error}")
        positive("importance_history")
        if not 0.0 < self.importance_uniform_prob <= 1.0:
            problems.append(
                f"--importance_uniform_prob must be in (0, 1], got {self.importance_uniform_prob}: every timestep needs "
                "a positive probability for the weighted loss to stay unbiased."
            )
        if self.vlb_weight < 0:
            problems.append(f"--vlb_weight must be ≥ 0, got {self.vlb_weight}.")
        if self.snr_gamma is not None and self.loss_weighting != "min_snr":
            problems.append(
                f"--snr_gamma is Min-SNR-γ's and does not apply to --loss_weighting {self.loss_weighting}: drop it, or "
                "use --loss_weighting min_snr."
            )
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            problems.append(f"--snr_gamma must be positive, got {self.snr_gamma} (the paper's is {DEFAULT_SNR_GAMMA:g}).")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"--learning_rate must be a positive number, got {self.learning_rate}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        for name in ("adam_weight_decay", "adam_epsilon"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"--{name} must be ≥ 0, got {getattr(self, name)}.")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be in [0, 2**32), as NumPy's seeds are, got {self.seed}.")
        if not str(self.output_dir).strip():
            problems.append("--output_dir is empty: name the folder the run writes to (e.g. outputs/my-ddpm).")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            problems.append(f"--compile_mode {self.compile_mode!r} is not one of: {', '.join(COMPILE_MODES)} (or none).")
        for name in ("ema_inv_gamma", "ema_power"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                problems.append(
                    f"--{name} must be positive, got {getattr(self, name)} (the EMA's decay warms up as "
                    "1 - (1 + step/ema_inv_gamma)^-ema_power)."
                )
        if self.lr_warmup_steps < 0:
            problems.append(f"--lr_warmup_steps must be ≥ 0, got {self.lr_warmup_steps}.")
        if not 0.0 <= self.ema_min_decay <= self.ema_max_decay < 1.0:
            problems.append(
                f"Need 0 ≤ --ema_min_decay ≤ --ema_max_decay < 1, got {self.ema_min_decay} and {self.ema_max_decay}."
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"--max_grad_norm must be positive or none, got {self.max_grad_norm}.")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            problems.append(f"--dataloader_num_workers must be ≥ 0, got {self.dataloader_num_workers}.")
        sources = [name for name in ("dataset_name", "train_data_dir", "dataset_path") if getattr(self, name)]
        if len(sources) > 1:
            problems.append(f"Give one data source, not {' and '.join('--' + name for name in sources)}.")
        if self.unet_overrides:
            try:
                overrides = json.loads(self.unet_overrides)
            except json.JSONDecodeError as error:
                problems.append(f"--unet_overrides is not valid JSON ({error}), nor a file: give e.g. '{{\"dropout\": 0.1}}', or "
                                "the path of a UNet2DModel config.json.")
            else:
                if not isinstance(overrides, dict):
                    problems.append("--unet_overrides must be a JSON object of UNet2DModel options.")
                else:
                    problems.extend(_shape_override_problems(overrides))
        if self.push_to_hub:
            repo = self.hub_model_id
            if not repo or repo.count("/") != 1 or not all(repo.split("/")):
                problems.append(f"--push_to_hub needs --hub_model_id user-or-org/model-name, got {repo!r}.")
        for spec in dataclasses.fields(self):  # options with a fixed set of values, also when built from Python
            choices, value = spec.metadata.get("choices"), getattr(self, spec.name)
            if choices and value is not None and value not in choices:
                problems.append(f"--{spec.name} {value!r} is not one of: {', '.join(map(str, choices))}.")
        if self.prediction_type is not None:
            canonical_prediction_type(self.prediction_type)  # raises with the accepted names
        if problems:
            raise ValueError("Bad training options:\n  " + "\n  ".join(problems))

    # -- the network -------------------------------------------------------------------------

    def explicit_unet_overrides(self) -> dict[str, Any]:
        """The JSON of ``--unet_overrides`` as a dict (empty without it)."""
        return json.loads(self.unet_overrides) if self.unet_overrides else {}

    def network_name(self) -> str | None:
        """How the log and plots name a new network: its ``--model``, or, where ``--unet_overrides``
        sets every option of that preset (a whole ``config.json``), ``"UNet2DModel (--unet_overrides)"``."""
        if self.model is not None and sets_every_preset_option(self.model, self.explicit_unet_overrides()):
            return "UNet2DModel (--unet_overrides)"
        return self.model

    def data_source(self, split: str) -> dict[str, Any]:
        """The options that name ``split`` of this run's data, as
        :func:`~ddpm_pipeline.data.load_image_dataset` and
        :func:`~ddpm_pipeline.data.describe_data_source` take them."""
        return dict(dataset_name=self.dataset_name, dataset_config=self.dataset_config, split=split,
                    train_data_dir=self.train_data_dir, dataset_path=self.dataset_path)  # fmt: skip

    def unet_overrides_dict(self) -> dict[str, Any]:
        """The preset overrides these options ask for: the JSON of ``--unet_overrides``, then
        ``--resolution`` → ``sample_size``, ``--channels`` → ``in_channels`` (and ``out_channels``
        unless the JSON sets it), ``--block_out_channels``, ``--layers_per_block``, ``--dropout``; a
        learned variance doubles ``out_channels`` (:func:`~ddpm_pipeline.schedules.model_output_channels`)."""
        explicit = self.explicit_unet_overrides()
        overrides = dict(explicit)
        if self.resolution is not None:
            overrides["sample_size"] = self.resolution
        if self.channels is not None:  # out_channels too, unless the JSON sets it
            overrides["in_channels"] = self.channels
            overrides.setdefault("out_channels", self.channels)
        if self.block_out_channels is not None:
            overrides["block_out_channels"] = list(self.block_out_channels)
        if self.layers_per_block is not None:
            overrides["layers_per_block"] = self.layers_per_block
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        learned = self.variance_type is not None and is_learned_variance(self.variance_type)
        if learned and "out_channels" not in explicit:
            if "in_channels" not in overrides and self.model is None:
                raise ValueError("The network's channels are not known yet: call with_data_defaults() first.")
            in_channels = overrides.get("in_channels") or PRESETS[self.model]["in_channels"]
            overrides["out_channels"] = model_output_channels(in_channels, self.variance_type)
        return overrides

    def with_data_defaults(self, image_format: ImageFormat) -> tuple[TrainingConfig, list[str]]:
        """A new network's options with what they leave open taken from its images, and the options
        so chosen (as ``--name value``):

        - ``--channels``: the data's (unless ``--unet_overrides`` sets ``in_channels``);
        - ``--resolution``: ``--model``'s ``sample_size``; without ``--model``, the data's size
          ``min(size, LARGEST_DATA_RESOLUTION)`` made a multiple of the network's down-sampling
          (:func:`~ddpm_pipeline.unet_presets.nearest_trainable_size`);
        - ``--model``: :func:`~ddpm_pipeline.unet_presets.preset_for_image_size` of the image size.

        A fine-tuning run's options come from its pretrained network instead: it is returned as is.
        """
        from .unet import DDPMUNet  # diffusers: imported when a run starts, not to parse its options

        if self.pretrained_model_name_or_path is not None:
            return self, []
        explicit = self.explicit_unet_overrides()
        chosen: dict[str, Any] = {}
        if self.channels is None and "in_channels" not in explicit:
            chosen["channels"] = image_format.channels
        data_size = min(image_format.size, LARGEST_DATA_RESOLUTION)
        size = self.resolution or explicit.get("sample_size")  # the JSON may give [height, width]
        model = self.model
        if model is None:
            model = chosen["model"] = preset_for_image_size(max(size) if isinstance(size, list) else size or data_size)
        if size is None:
            sized = dataclasses.replace(self, **{**chosen, "model": model})
            factor = downsampling_factor(DDPMUNet.preset_config(model, **sized.unet_overrides_dict()))
            chosen["resolution"] = nearest_trainable_size(data_size if self.model is None else PRESETS[model]["sample_size"], factor)
        whole = sets_every_preset_option(model, explicit)  # a whole config.json: the preset does not show in the network
        described = [f"--{name} {value}" for name, value in chosen.items() if not (name == "model" and whole)]
        return dataclasses.replace(self, **chosen), described

    # -- records -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every option, except the Hub token (a secret: it is never saved or logged)."""
        return {**dataclasses.asdict(self), "hub_token": None}

    def save(self, path: str | Path) -> None:
        """Write the options as JSON (``training_config.json`` beside a pipeline)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """The options of :meth:`to_dict`'s output; keys this version does not know (written by
        another version of the package) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        """Read a file written by :meth:`save` (see :meth:`from_dict`)."""
        return cls.from_dict(read_json_object(path))

    def architecture(self) -> dict[str, Any]:
        """The :data:`ARCHITECTURE_FIELDS`, with a new network's unset ``resolution`` and
        ``channels`` read as its preset's (as runs recorded them before these came from the data)."""
        from .unet import DDPMUNet  # diffusers: imported when a run starts, not to parse its options

        values = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        if self.model is not None:
            preset = DDPMUNet.preset_config(self.model, **self.explicit_unet_overrides())
            values["resolution"] = values["resolution"] or preset["sample_size"]
            values["channels"] = values["channels"] or preset["in_channels"]
        return values

    def architecture_differences(self, other: TrainingConfig) -> list[str]:
        """The :meth:`architecture` fields on which two runs disagree, as ``name: mine vs other's``."""
        mine, theirs = self.architecture(), other.architecture()
        return [f"{name}: {mine[name]!r} vs {theirs[name]!r}" for name in ARCHITECTURE_FIELDS if mine[name] != theirs[name]]

    # -- the command line --------------------------------------------------------------------

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        """An `argparse` parser with one ``--option`` per field (``--no_option`` for booleans;
        ``none`` for optional numbers)."""
        parser = argparse.ArgumentParser(
            prog=program_name("train_ddpm.py"),
            description="Train a DDPM (ε, x0 or μ target) with diffusers and Accelerate; "
            "with no options, the small preset on the bundled Fashion-MNIST images.",
            formatter_class=DefaultsHelpFormatter,
        )
        for spec in dataclasses.fields(cls):
            meta = dict(spec.metadata)
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
            kwargs: dict[str, Any] = {"default": default, "help": meta.pop("help")}
            if spec.type in ("bool", "bool | None"):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = meta.pop("type") if "type" in meta else _ARG_TYPES[spec.type]
                kwargs.update(meta)
            parser.add_argument(f"--{spec.name}", **kwargs)
        return parser

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> TrainingConfig:
        """Parse a command line (``sys.argv[1:]`` when ``argv`` is None); bad values exit with the reason."""
        parser = cls.argument_parser()
        hints = diffusers_example_hints(sys.argv[1:] if argv is None else argv)
        if hints:
            parser.error("options as diffusers' train_unconditional.py spells them; this script's equivalents: " + "; ".join(hints))
        namespace = parser.parse_args(argv)
        try:
            return cls(**vars(namespace))
        except ValueError as error:
            parser.error(str(error))


def diffusers_example_hints(argv: list[str]) -> list[str]:
    """``"--theirs → ours"`` for each option (or choice value) of diffusers' unconditional training
    example in ``argv`` that this script spells otherwise (:data:`DIFFUSERS_EXAMPLE_OPTIONS`,
    :data:`DIFFUSERS_EXAMPLE_VALUES`); ``--name=value`` and ``--name value`` alike."""
    hints = []
    for index, token in enumerate(argv):
        name, has_value, value = token.partition("=")
        if not has_value and index + 1 < len(argv):
            value = argv[index + 1]
        if name in DIFFUSERS_EXAMPLE_OPTIONS:
            hints.append(f"{name} → {DIFFUSERS_EXAMPLE_OPTIONS[name]}")
        elif (name, value) in DIFFUSERS_EXAMPLE_VALUES:
            hints.append(f"{name} {value} → {DIFFUSERS_EXAMPLE_VALUES[name, value]}")
    return hints


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help texts taken literally (argparse %-formats them, so a ``%`` such as ``train[:10%]`` is
    escaped here) with each option's default appended, except a ``None`` its text already explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = (action.help or "").replace("%", "%%")
        explained = action.default is None and "default" in text
        takes_default = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if action.default is argparse.SUPPRESS or explained or not takes_default:
            return text
        return f"{text} (default: %(default)s)"


def optional(kind: type) -> Any:
    """An argparse ``type`` for an option that may be switched off: ``none`` or ``null`` (any case)
    → ``None``, anything else → ``kind(text)``. Shared by every command line of the project."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def dataclass_parser(config_class: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A command line with one option per field of the dataclass ``config_class``: ``--name`` with
    the field's default and its ``metadata["help"]``. A ``bool`` field (or an auto/on/off
    ``bool | None``) takes ``--name`` and ``--no-name``, an ``int`` or ``float`` field a number or
    ``none``, a ``str | None`` field a string or ``none``, and any other a string."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)
    for item in dataclasses.fields(config_class):
        annotation = str(item.type)
        if annotation.startswith("bool"):
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif annotation.startswith("int"):
            kind = {"type": optional(int)}
        elif annotation.startswith("float"):
            kind = {"type": optional(float)}
        else:
            kind = {"type": optional(str) if "None" in annotation else str}
        parser.add_argument(f"--{item.name}", default=item.default, help=item.metadata["help"], **kind)
    return parser


_ARG_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "str | None": optional(str),
    "int | None": optional(int),
    "float | None": optional(float),
}
