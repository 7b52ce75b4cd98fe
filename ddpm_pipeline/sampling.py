"""Sampling a saved pipeline to disk, shared by ``sample_ddpm.py`` and ``eval_metrics.py``: the
pipeline (with the fast paths and the sampler asked for), the store its numbered PNGs go to (keyed
on the model's exact weights and the sampling options), and the processes that share the batches.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from .checkpointing import checkpoint_step, list_checkpoints
from .inception_weights import file_digest
from .option_values import FAST_SAMPLING_CHOICES, SAMPLING_DTYPE_CHOICES, SCHEDULER_CHOICES, TIMESTEP_SPACINGS
from .pace import Pace
from .pipeline_ddpm_target import DDPMTargetPipeline
from .pretrained import check_repo_id, is_local_source
from .run_outputs import snapshot_name
from .sample_store import UNRECORDED_DEFAULTS, SampleStore, recorded_batch_size
from .scheduling_ddpm_target import DDPMTargetScheduler
from .speed import cpu_precision_advice, cpu_threads_per_process, is_compiled
from .stop_signals import lone_process_advice, started_by_launcher

logger = logging.getLogger(__name__)
#: The CPU precision advice already logged in this process (it is the same for every pipeline it samples).
_ADVICE_GIVEN: set[str] = set()

#: --scheduler's diffusers samplers, built from the saved scheduler's config (same betas), for ε, x0
#: and v models; with "ddpm" (this package's ancestral sampler) they are :data:`SCHEDULER_CHOICES`
SAMPLER_SCHEDULERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


def check_sampling_options(config: Any) -> None:
    """Clear errors for bad sampling options of ``config`` (an object with the fields of
    :data:`~ddpm_pipeline.option_values.SAMPLING_OPTIONS`), before any work."""
    if config.fast_sampling not in FAST_SAMPLING_CHOICES:
        raise ValueError(f"--fast_sampling must be one of {', '.join(FAST_SAMPLING_CHOICES)}, got {config.fast_sampling!r}.")
    if config.scheduler not in SCHEDULER_CHOICES:
        raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULER_CHOICES)}, got {config.scheduler!r}.")
    if config.compile_unet and config.fast_sampling == "off":
        raise ValueError("--compile_unet compiles the fast sampling path, which --fast_sampling off turns off: "
                         "drop one of the two.")  # fmt: skip
    if not 0 <= config.eta <= 1:
        # DDIM's x_{t-1} takes √(1 − ᾱ_{t-1} − σ_t²) with σ_t = η·√((1 − ᾱ_{t-1})/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t-1}),
        # which η > 1 makes the root of a negative number at some step: NaN images
        raise ValueError(f"--eta must be between 0 (deterministic DDIM) and 1 (the DDPM posterior's variance), got "
                         f"{config.eta}: beyond 1 the DDIM step's noise exceeds what x_(t-1) can hold, and the images "
                         "become NaN.")  # fmt: skip
    if config.eta != 0 and config.scheduler != "ddim":
        raise ValueError(f"--eta is DDIM's η: it applies with --scheduler ddim, not {config.scheduler}.")
    if config.timestep_spacing is not None and config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"--timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {config.timestep_spacing!r}.")
    if config.sampling_dtype not in SAMPLING_DTYPE_CHOICES:
        raise ValueError(f"--sampling_dtype must be one of {', '.join(SAMPLING_DTYPE_CHOICES)}, got {config.sampling_dtype!r}.")


def requested_device(device: str | None) -> torch.device:
    """``--device``: ``None`` = CUDA when available, else the CPU; a device torch does not know, or
    CUDA on a machine without it, is refused naming the fix (rather than failing in torch later)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a device torch knows: give cuda, cuda:N or cpu.") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch finds no CUDA device on this machine; drop --device (or give cpu).")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")  # fmt: skip
    return chosen


def new_folder_batch_size(default: int, num_images: int, device: str | None) -> int:
    """The batch size of a new sample folder given no ``--batch_size``: ``default``, except on a CPU
    at most the ``num_images`` asked for. A batch is always sampled whole (image ``i`` depends on its
    batch's seed and size, :class:`~ddpm_pipeline.sample_store.SampleStore`), so 4 images drawn in a
    batch of 64 take the time of 64, and a CPU's time per step grows with the batch: on the 2-core
    reference CPU the DDPM CIFAR-10 network takes 0.2 s a step at batch 4 and 4 s at 64. A GPU
    evaluates a batch of 64 in about the time of 4, so there ``default`` stays, which a folder grown
    later keeps. A folder with images keeps its own batch size (:func:`folder_batch_size`)."""
    if requested_device(device).type == "cpu":
        return max(1, min(default, num_images))
    return default


def folder_batch_size(folder: str | Path, default: int, num_images: int, device: str | None) -> int:
    """``--batch_size`` when none is given: the batch size the samples in ``folder`` were drawn with
    (image ``i`` depends on it, so a folder grows in its own), else :func:`new_folder_batch_size`.
    Growing a folder whose batch is smaller than a new one's is logged, with the way to larger
    batches: a new folder."""
    new_folder = new_folder_batch_size(default, num_images, device)
    batch_size = recorded_batch_size(folder, new_folder)
    if batch_size < new_folder and num_images > batch_size:
        logger.info(f"{folder} holds samples drawn in batches of {batch_size}, so its new ones are too (image i "
                    f"depends on the batch size); a new folder would sample in batches of {new_folder}")  # fmt: skip
    return batch_size


@dataclass
class LaunchedProcesses:
    """The processes a sampling or evaluation command runs in: this one alone, or the ``N`` that
    ``accelerate launch --num_processes N`` (``torchrun``) started. They share the sampling (and
    the bound) batch by batch; the main process alone then writes what comes of it (the grid, the
    metrics and the report)."""

    device: torch.device
    index: int = 0
    count: int = 1
    state: PartialState | None = None

    @classmethod
    def from_environment(cls, device: str | None = None, program: str = "eval_metrics.py") -> LaunchedProcesses:
        """One process on ``device`` (default: CUDA when available), unless a launcher set
        ``WORLD_SIZE``: then every process gets its own GPU (``cuda:LOCAL_RANK``), or joins the
        others over gloo on a machine without CUDA or with ``device="cpu"``. ``program`` is the
        script the error for a launch Accelerate did not join names. On the CPU, processes a launcher
        started (which leaves each one thread, ``OMP_NUM_THREADS=1``) take back their share of the
        cores, as training does."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            processes = cls(requested_device(device))
            if (advice := lone_process_advice(program)) is not None:
                logger.warning(advice)
        else:
            state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
            if state.num_processes != world_size:
                raise RuntimeError(
                    f"Launched as {world_size} processes, but Accelerate joined {state.num_processes}: each would sample "
                    f"every image. Launch with `accelerate launch --multi_gpu --num_processes N {program} ...`."
                )
            processes = cls(state.device, state.process_index, state.num_processes, state)
        if processes.device.type == "cpu" and started_by_launcher():  # which left this process one thread (OMP_NUM_THREADS=1)
            torch.set_num_threads(cpu_threads_per_process(processes.count))
        return processes

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes the results (grid, metrics, report)."""
        return self.index == 0

    def wait(self) -> None:
        """Wait until every process got here (nothing to wait for alone)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def main_first(self) -> AbstractContextManager:
        """A block the main process runs before the others (creating the sample folder's record)."""
        return self.state.main_process_first() if self.state is not None else nullcontext()

    def fill(self, store: SampleStore, pipeline: DDPMTargetPipeline, num_samples: int,
             long_job_advice: str = "") -> tuple[int, int, float]:  # fmt: skip
        """Fill ``store`` up to ``num_samples`` images, these processes sharing its batches
        (:meth:`SampleStore.fill`). Returns how many of those images were there before (counted
        by the main process before any process writes; 0 on the others), how many this process
        wrote, and the seconds the sampling took, from the processes' start together to their end
        together. On a CPU, the main process tells early how long a long job will take
        (:class:`~ddpm_pipeline.pace.Pace`, with ``long_job_advice``)."""
        reused = store.count_existing(num_samples) if self.is_main else 0
        pace = Pace("this sampling", long_job_advice) if self.is_main and self.device.type == "cpu" else None
        self.wait()
        started = time.perf_counter()
        written = store.fill(pipeline, num_samples, show_progress=self.is_main, process_index=self.index,
                             num_processes=self.count, pace=pace)  # fmt: skip
        self.wait()
        return reused, written, time.perf_counter() - started


def model_identity(model: str) -> str:
    """What a store records of ``model``: a local folder's absolute path, else the Hub id."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def weights_fingerprint(model: str) -> list[list[str]]:
    """``[file name, SHA-256]`` of each UNet weight file of a local pipeline folder (empty for a Hub
    id): what the sample and bound stores are keyed on besides the path, so that a model trained
    further in the same folder never has its old samples scored as its own."""
    files = sorted(Path(model, "unet").glob("diffusion_pytorch_model*")) if Path(model).is_dir() else []
    return [[path.name, file_digest(path)] for path in files]


def sample_store(folder: str | Path, model: str, num_inference_steps: int, seed: int, batch_size: int,
                 unet_dtype: torch.dtype = torch.float32, scheduler: str = "ddpm", eta: float = 0.0,
                 noise_device: str = "cpu", timestep_spacing: str = "leading") -> SampleStore:  # fmt: skip
    """The store of ``model``'s samples in ``folder`` for these sampling options: what
    ``sample_ddpm.py`` fills and :func:`~ddpm_pipeline.evaluation.evaluate` fills and reads, so a
    caller that fills it first (with a faster pipeline, or in time-limited pieces) has its samples
    scored rather than redone. A UNet sampling in half precision, another scheduler, DDIM's ``eta``,
    a ``timestep_spacing`` other than diffusers' default ``"leading"`` (the one the pipeline's
    scheduler takes: :func:`timestep_spacing_of`) or noise drawn on a GPU (``noise_device="cuda"``,
    see :func:`noise_device`) makes other images than the float32 ancestral sampler with CPU noise
    and leading timesteps: they are then part of the options (the
    defaults record nothing, as stores did before the options existed), so the stores are never
    mixed. A local model is also keyed on its weights (:func:`weights_fingerprint`): trained further
    in the same folder, it needs a new ``folder``."""
    settings = {"model": model_identity(model), "num_inference_steps": num_inference_steps, "seed": seed, "batch_size": batch_size}
    fingerprint = weights_fingerprint(model)
    if fingerprint:  # a local folder: its exact weights (a Hub id records none)
        settings["weights"] = fingerprint
    options = {"unet_dtype": str(unet_dtype).removeprefix("torch."), "scheduler": scheduler, "eta": eta,
               "noise_device": noise_device, "timestep_spacing": timestep_spacing}  # fmt: skip
    settings.update({name: value for name, value in options.items() if value != UNRECORDED_DEFAULTS[name]})
    return SampleStore(folder, settings)


def noise_device(device: torch.device) -> str:
    """Where a store's batches draw their noise when sampled on ``device``: ``"cuda"`` on a GPU,
    where a CPU generator would draw each step's noise on the CPU and copy it over, stopping the GPU
    at every step until the copy is done (a synchronous copy from pageable memory); else ``"cpu"``.
    CUDA's generator gives the same numbers for a seed on GPUs of one model, so processes on a
    machine's GPUs still write the images one would (a GPU of another model may draw others)."""
    return "cuda" if device.type == "cuda" else "cpu"


def timestep_spacing_of(pipeline: DDPMTargetPipeline) -> str:
    """The ``timestep_spacing`` of the pipeline's scheduler (diffusers' default ``"leading"`` where
    its config has none, as stock configs written before the option existed)."""
    return pipeline.scheduler.config.get("timestep_spacing", "leading")


def sampling_record(pipeline: DDPMTargetPipeline, fast_sampling: str) -> dict[str, Any]:
    """What a report records of how ``pipeline`` sampled: fast paths on or off, the UNet's dtype,
    whether it is compiled, the scheduler's class and its timestep spacing."""
    return {"fast": fast_sampling != "off", "unet_dtype": str(pipeline.unet.dtype).removeprefix("torch."),
            "compiled": is_compiled(pipeline.unet), "scheduler": type(pipeline.scheduler).__name__,
            "timestep_spacing": timestep_spacing_of(pipeline)}  # fmt: skip


def check_model_exists(model: str) -> None:
    """Raise, naming the fix, when ``model`` is a path (:func:`~ddpm_pipeline.pretrained.is_local_source`)
    that does not exist (it cannot be a Hub repo id either), or a name that is no valid Hub repo id
    (:func:`~ddpm_pipeline.pretrained.check_repo_id`)."""
    if is_local_source(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(
            f"--model {model} is not a folder, nor a Hub repo id (user/name): give a train_ddpm.py --output_dir "
            "or a save_pretrained folder (is the path right?)."
        )
    check_repo_id(model, "--model")


def unreachable_hub_model_message(model: str) -> str:
    """Why ``model``, not a local folder, cannot be loaded as a Hub repo, and the fixes."""
    return (f"--model {model} is not a local folder, and as a Hub repo it is neither cached nor reachable (offline, "
            f"HF_HUB_OFFLINE=1?). Download it once on a machine with network access (`hf download {model}`, into "
            "the same HF_HOME), or give a local pipeline folder (is the path right?).")  # fmt: skip


def check_hub_model(model: str) -> None:
    """Raise, naming the fix, when ``model`` (no local folder: a Hub repo id) is not a pipeline that can be
    loaded: a repo neither cached nor reachable (a mistyped local folder's name, offline), no such repo, or
    one without ``model_index.json``. Fetching that file (or finding it cached) is the first thing
    ``from_pretrained`` does, so this costs nothing more; it lets an evaluation find the mistake before it
    reads the reference data."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        hf_hub_download(model, "model_index.json")
    except LocalEntryNotFoundError as error:  # before EntryNotFoundError: it is a subclass of it
        raise FileNotFoundError(unreachable_hub_model_message(model)) from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"--model {model}: the Hub repo has no model_index.json, so it is not a diffusers "
                                "pipeline: give a DDPMPipeline repo or folder.") from error  # fmt: skip
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"--model {model} is not a local folder, nor a Hub repo (or it is private and no token is saved): check the "
            "path, or the repo id (owner/name) and `hf auth login`."
        ) from error


def load_pipeline(model: str) -> DDPMTargetPipeline:
    """``DDPMTargetPipeline.from_pretrained(model)`` (float32, on the CPU), with an error that
    names the fixes when ``model`` is a path (:func:`~ddpm_pipeline.pretrained.is_local_source`)
    that does not exist, or a Hub id that is neither cached nor reachable."""
    check_model_exists(model)
    try:
        return DDPMTargetPipeline.from_pretrained(model)
    except OSError as error:
        if Path(model).exists():
            if "Unable to load weights" in str(error):  # diffusers' words for a weights file it cannot read
                raise ValueError(damaged_weights_message(model, error)) from error
            raise
        raise FileNotFoundError(unreachable_hub_model_message(model)) from error


def damaged_weights_message(model: str, error: OSError) -> str:
    """Why a local pipeline folder's UNet weights cannot be loaded (diffusers' ``error``), and how to
    get the model back: from the run's last checkpoint in the folder, when it has one."""
    checkpoints = list_checkpoints(model)
    if checkpoints:
        latest = checkpoints[-1]
        fix = (f"`python -m ddpm_pipeline.export_checkpoint {latest}` writes the model of its last checkpoint, as "
               f"{Path(model) / snapshot_name(checkpoint_step(latest), 'steps')}; or restore the folder from a copy.")  # fmt: skip
    else:
        fix = "Restore the folder from a copy, or save the pipeline again."
    first_sentence = str(error).split(". ")[0].rstrip(".")
    return f"The weights of {model} cannot be read, cut short or damaged ({first_sentence}). {fix}"


def sampling_pipeline(model: str, device: torch.device, fast_sampling: str = "auto", dtype: str = "auto",
                      scheduler: str = "ddpm", compile: bool | None = None,
                      spacing: str | None = None) -> DDPMTargetPipeline:  # fmt: skip
    """``model``'s pipeline on ``device`` for sampling: with :meth:`DDPMTargetPipeline.enable_fast_sampling`
    (``dtype`` for its UNet, ``compile`` for ``torch.compile``: ``None`` = its auto) unless ``fast_sampling``
    is ``"off"``, with ``scheduler`` (a name of :data:`SCHEDULER_CHOICES`) built from the saved
    one's config unless it is ``"ddpm"``, and with its ``timestep_spacing`` set to ``spacing``
    unless that is None (the saved one's)."""
    pipeline = load_pipeline(model).to(device)
    overrides = {} if spacing is None else {"timestep_spacing": spacing}
    if scheduler != "ddpm":
        if isinstance(pipeline.scheduler, DDPMTargetScheduler) and not pipeline.scheduler.is_stock_compatible():
            raise ValueError(
                f"--scheduler {scheduler} cannot sample a {pipeline.scheduler.config.prediction_type!r} model: "
                "diffusers' samplers take ε, x0 or v predictions; use --scheduler ddpm."
            )
        pipeline.scheduler = SAMPLER_SCHEDULERS[scheduler].from_config(pipeline.scheduler.config, **overrides)
    elif overrides:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **overrides)
    if fast_sampling != "off":
        pipeline.enable_fast_sampling(dtype=dtype, compile=compile)
        advice = cpu_precision_advice(pipeline.unet.dtype, dtype == "auto", device,
                                      pipeline.scheduler.config.prediction_type, "--sampling_dtype bfloat16")  # fmt: skip
        # a warning came from enable_fast_sampling; the advice, once a process (not for each of --snapshots' pipelines)
        if advice is not None and advice[0] == logging.INFO and advice[1] not in _ADVICE_GIVEN:
            _ADVICE_GIVEN.add(advice[1])
            logger.info(advice[1])
    return pipeline
