"""Fine-tuning: start a training run from a trained DDPM instead of random weights.

``--pretrained_model_name_or_path`` names one of:

* a pipeline folder: a finished ``train_ddpm.py --output_dir``, any ``save_pretrained`` folder of
  a `DDPMPipeline` (``model_index.json``, ``unet/``, ``scheduler/``);
* the same on the Hugging Face Hub, e.g. ``google/ddpm-cifar10-32`` (downloaded into
  ``--cache_dir``; with ``HF_HUB_OFFLINE=1``, read from that cache);
* a bare `UNet2DModel` folder or Hub repo (``config.json`` and its weights): the network only, the
  noise schedule then comes from the training options.

The network keeps its architecture (only ``sample_size`` and ``dropout``, which own no weights, may
change) and starts from the stored weights; the EMA starts from them too. The noise scheduler is
the pretrained one, converted to `DDPMTargetScheduler` with its betas kept exactly, and the
options given explicitly (target, schedule, T, sampling variance) replace its own.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from .checkpointing import TRAINER_STATE_NAME, checkpoint_step
from .json_files import read_json_object
from .option_values import LEARNED_VARIANCE_TYPES, canonical_prediction_type
from .scheduling_ddpm_target import DDPMTargetScheduler
from .training_config import FRESH_RUN_DEFAULTS

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
#: UNet classes whose weights a DDPM run can train (DDPMUNet saves as UNet2DModel).
TRAINABLE_UNET_CLASSES = ("UNet2DModel", "DDPMUNet")
#: Pipeline parts that mean the UNet does not denoise pixels, or is conditioned on something.
UNSUPPORTED_PARTS = ("vqvae", "vae", "text_encoder", "tokenizer", "image_encoder", "transformer")


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a local path rather than a Hub repo id (``name`` or
    ``owner/name``): it exists, is absolute, starts with ``.`` or ``~``, or has two or more ``/``."""
    return (
        Path(source).expanduser().exists()
        or Path(source).is_absolute()
        or source.startswith((".", "~"))
        or source.count("/") > 1
    )


def check_repo_id(source: str, option: str) -> None:
    """Raise, naming ``option`` and the fix, when ``source`` is no local path
    (:func:`is_local_source`) and no valid Hub repo id either (a folder's name with a space, say),
    which huggingface_hub would refuse with its own traceback."""
    if is_local_source(source):
        return
    try:
        validate_repo_id(source)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{option} {source!r} is not a folder, nor a Hub repo id (owner/name, of letters, digits, '-', '_' and "
            "'.'): give a folder that exists (is the path right?) or a Hub repo id."
        ) from error


@dataclass(frozen=True)
class PretrainedDDPM:
    """The configs of a trained DDPM (read without its weights), to build a run on.

    ``source`` is the absolute folder for a local source, else the Hub repo id;
    ``unet_subfolder`` is ``"unet"`` for a pipeline and None for a bare UNet;
    ``scheduler_config`` is None for a bare UNet.
    """

    source: str
    revision: str | None
    cache_dir: str | None
    unet_subfolder: str | None
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any] | None

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str, revision: str | None = None, cache_dir: str | None = None) -> PretrainedDDPM:
        """Read and check the configs of ``source``; raise naming the problem and what to give instead."""
        if is_local_source(source):
            folder = Path(source).expanduser().resolve()
            _check_local_folder(folder, source)
            source = str(folder)
        check_repo_id(source, "--pretrained_model_name_or_path")
        index = _read_json(source, PIPELINE_INDEX, None, revision, cache_dir)
        if index is not None:
            _check_pipeline_index(index, source)
            unet_config = _read_json(source, MODEL_CONFIG, "unet", revision, cache_dir)
            scheduler_config = _read_json(source, SCHEDULER_CONFIG, "scheduler", revision, cache_dir)
            if unet_config is None or scheduler_config is None:
                missing = "unet/config.json" if unet_config is None else "scheduler/scheduler_config.json"
                raise FileNotFoundError(f"--pretrained_model_name_or_path {source}: the pipeline has no {missing}.")
            _check_scheduler_config(scheduler_config, source)
            subfolder = "unet"
        else:
            unet_config = _read_json(source, MODEL_CONFIG, None, revision, cache_dir)
            if unet_config is None:
                raise FileNotFoundError(
                    f"--pretrained_model_name_or_path {source} holds neither {PIPELINE_INDEX} (a pipeline) nor "
                    f"{MODEL_CONFIG} (a UNet2DModel): give a train_ddpm.py --output_dir, a save_pretrained folder "
                    "or a Hub repo of a DDPMPipeline such as google/ddpm-cifar10-32."
                )
            scheduler_config, subfolder = None, None
        _check_unet_config(unet_config, source)
        return cls(source, revision, cache_dir, subfolder, unet_config, scheduler_config)

    # -- building the run --------------------------------------------------------------------

    def unet_options(
        self, resolution: int | None = None, dropout: float | None = None, channels: int | None = None
    ) -> dict[str, Any]:
        """The network's `UNet2DModel` options, with the training resolution and dropout when given
        (neither owns weights); ``channels`` must agree with the network's. Keys this diffusers'
        `UNet2DModel` does not take (from configs of other diffusers versions) are left out."""
        accepted = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
        ignored = sorted(key for key in self.unet_config if not key.startswith("_") and key not in accepted)
        if ignored:
            logger.info(f"ignoring UNet2DModel options this diffusers version does not know: {', '.join(ignored)}")
        options = {key: value for key, value in self.unet_config.items() if key in accepted}
        if channels is not None and channels != options["in_channels"]:
            raise ValueError(
                f"--channels {channels}, but the pretrained network takes {options['in_channels']}-channel images: "
                f"drop --channels (images are then converted to {options['in_channels']} channel(s))."
            )
        if resolution is not None:
            options["sample_size"] = resolution
        if dropout is not None:
            options["dropout"] = dropout
        return options

    def load_weights(self, unet: torch.nn.Module) -> None:
        """Copy the stored weights into ``unet`` (built from :meth:`unet_options`), as float32."""
        try:
            stored = UNet2DModel.from_pretrained(
                self.source, subfolder=self.unet_subfolder, revision=self.revision, cache_dir=self.cache_dir
            )
        except OSError as error:
            raise OSError(
                f"--pretrained_model_name_or_path {self.source}: could not load the network's weights ({error})."
            ) from error
        unet.load_state_dict({name: tensor.float() for name, tensor in stored.state_dict().items()})

    def noise_scheduler(
        self,
        prediction_type: str | None = None,
        beta_schedule: str | None = None,
        num_train_timesteps: int | None = None,
        variance_type: str | None = None,
    ) -> DDPMTargetScheduler:
        """The pretrained scheduler as a `DDPMTargetScheduler` (same betas), with the options given
        here replacing its own; a new ``beta_schedule`` or ``num_train_timesteps`` builds a new
        schedule, keeping the pretrained one's name when only T changes. A bare UNet has no
        scheduler: the options then define it (unset ones take the fresh-run defaults, except that a
        network with twice its input's channels learned its variance: ``"learned_range"``)."""
        if self.scheduler_config is None:
            given = {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
                     "prediction_type": prediction_type, "variance_type": variance_type}  # fmt: skip
            defaults = dict(FRESH_RUN_DEFAULTS)
            if self.unet_config.get("out_channels") == 2 * self.unet_config.get("in_channels", 0):
                defaults["variance_type"] = LEARNED_VARIANCE_TYPES[0]
            return DDPMTargetScheduler(
                **{name: defaults[name] if value is None else value for name, value in given.items()}
            )
        base = DDPMTargetScheduler.from_config(self.scheduler_config)
        config = {key: value for key, value in base.config.items() if not key.startswith("_")}
        if beta_schedule is not None or num_train_timesteps is not None:
            name = beta_schedule or base.schedule_name
            if name is None:
                raise ValueError(
                    f"The pretrained scheduler of {self.source} has its own betas (trained_betas), which "
                    f"--num_train_timesteps {num_train_timesteps} cannot stretch: give --beta_schedule too."
                )
            new = DDPMTargetScheduler(
                num_train_timesteps=num_train_timesteps or base.config.num_train_timesteps,
                beta_schedule=name,
                beta_start=base.config.beta_start,
                beta_end=base.config.beta_end,
            )
            schedule_keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas")
            config.update({key: new.config[key] for key in schedule_keys})
            if not torch.equal(new.schedule.betas, base.schedule.betas):
                logger.warning(
                    f"fine-tuning on a new noise schedule ({name}, T = {config['num_train_timesteps']}): the network "
                    f"was trained on {base.schedule_name or 'its own betas'}, T = {base.config.num_train_timesteps}"
                )
        if prediction_type is not None:
            new_target = canonical_prediction_type(prediction_type)
            if new_target != base.config.prediction_type:
                logger.warning(
                    f"fine-tuning to predict {new_target}: the network was trained to predict "
                    f"{base.config.prediction_type}, so its first outputs mean something else"
                )
            config["prediction_type"] = new_target
        if variance_type is not None:
            config["variance_type"] = variance_type
        return DDPMTargetScheduler.from_config(config)


def _check_local_folder(folder: Path, given: str) -> None:
    if not folder.exists():
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {given}: no such folder. Give a train_ddpm.py --output_dir, a "
            "save_pretrained folder, or a Hub repo id (owner/name)."
        )
    if not folder.is_dir():
        raise NotADirectoryError(f"--pretrained_model_name_or_path {given} is a file: give the folder that holds it.")
    if checkpoint_step(folder) is not None or (folder / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"--pretrained_model_name_or_path {given} is a training checkpoint: continue that run with "
            "--resume_from_checkpoint, or fine-tune from the pipeline its run wrote (the --output_dir above it), or "
            f"from this step's, which `python -m ddpm_pipeline.export_checkpoint {given}` writes."
        )


def _read_json(source: str, filename: str, subfolder: str | None, revision: str | None,
               cache_dir: str | None) -> dict[str, Any] | None:  # fmt: skip
    """A JSON file of a local folder or Hub repo, or None when the source has no such file."""
    if is_local_source(source):
        path = Path(source, subfolder or "", filename)
        return read_json_object(path) if path.is_file() else None
    try:
        path = hf_hub_download(source, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError as error:
        if filename == PIPELINE_INDEX:  # offline: a cached bare-UNet repo has no model_index.json either
            return None
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {source}: {filename} is neither cached nor reachable (offline, "
            "HF_HUB_OFFLINE=1?). Download it once on a machine with network access, into the same --cache_dir, "
            "or give a local folder."
        ) from error
    except EntryNotFoundError:  # the repo exists and lacks the file (LocalEntryNotFoundError is a subclass)
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {source}{f' (revision {revision})' if revision else ''}: no such "
            f"repo on the Hub (and no local folder of that name), or it is private and no token is saved "
            f"({type(error).__name__}). Check the id (owner/name) or `hf auth login`; for a local folder, give its path."
        ) from error
    return read_json_object(path)


def _check_pipeline_index(index: dict[str, Any], source: str) -> None:
    parts = {name: spec for name, spec in index.items() if not name.startswith("_")}
    unsupported = sorted(set(parts) & set(UNSUPPORTED_PARTS))
    if unsupported or "unet" not in parts or "scheduler" not in parts:
        found = f"{index.get('_class_name', 'a pipeline')} with {', '.join(sorted(parts))}"
        raise ValueError(
            f"--pretrained_model_name_or_path {source} is {found}: train_ddpm.py fine-tunes unconditional "
            "pixel-space DDPM pipelines (a UNet2DModel and a scheduler), such as google/ddpm-cifar10-32."
        )


def _check_unet_config(config: dict[str, Any], source: str) -> None:
    problems = []
    name = config.get("_class_name")
    if name not in TRAINABLE_UNET_CLASSES:
        problems.append(f"its network is a {name}, not a UNet2DModel")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        problems.append("its network is class-conditional, and train_ddpm.py trains unconditional models")
    if config.get("in_channels") not in (1, 3):
        problems.append(f"its network takes {config.get('in_channels')}-channel inputs; images have 1 or 3")
    in_channels = config.get("in_channels")
    if in_channels in (1, 3) and config.get("out_channels") not in (in_channels, 2 * in_channels):
        problems.append(
            f"its network outputs {config.get('out_channels')} channels for {in_channels} in; a DDPM predicts a "
            f"tensor shaped like its input ({in_channels}), or that and a learned variance ({2 * in_channels})"
        )
    if problems:
        raise ValueError(f"Cannot fine-tune {source}: " + "; ".join(problems) + ".")


def _check_scheduler_config(config: dict[str, Any], source: str) -> None:
    if not any(key in config for key in ("beta_start", "beta_schedule", "trained_betas")):
        raise ValueError(
            f"Cannot fine-tune {source}: its {config.get('_class_name', 'scheduler')} has no β schedule (a "
            "variance-exploding score model?); train_ddpm.py trains variance-preserving DDPMs."
        )
    try:
        DDPMTargetScheduler.from_config(config)
    except ValueError as error:
        raise ValueError(f"Cannot fine-tune {source}: its scheduler does not convert to a DDPM one: {error}") from error
