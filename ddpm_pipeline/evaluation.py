"""Score a trained pipeline (or images: a folder, an .npz) the way papers do: FID, IS, KID,
precision/recall with torch-fidelity, and the variational bound in bits/dim.

``evaluate(...)`` is what ``eval_metrics.py`` runs; it writes a JSON report, a sample grid and
(with ``bpd``) a plot of the bound's terms over t, and returns the report.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .atomic import atomic_path
from .bound_store import BoundStore
from .class_balance import sliced_classes_warning
from .data import describe_data_source, spread_subset
from .evaluation_config import DEFAULT_BATCH_SIZE, QUICK_CPU_EVALUATION, QUICK_CPU_SETTINGS, EvaluationConfig
from .features import METRIC_LAYERS, FeatureExtractorSpec, extract_features
from .hold_out import held_out_amount
from .images import MOSTLY_PADDING, ImagePreprocessor, check_padding, inspect_images, padded_coverage
from .json_files import read_json_object
from .likelihood import BoundTerms, batch_bound, bound_evaluations_per_image
from .metrics import (
    FEATURE_METRICS,
    REFERENCE_METRICS,
    SCORE_NAMES,
    feature_metrics,
    fewest_images,
)
from .pace import Pace
from .pipeline_ddpm_target import DDPMTargetPipeline
from .plots import save_bound_terms_plot, save_image_grid
from .preflight import check_pipeline_folder
from .provenance import model_training, package_versions
from .reference import DataSource, naming_unreadable_npz, reference_statistics, training_data_reference
from .sampling import (
    LaunchedProcesses,
    check_hub_model,
    check_model_exists,
    folder_batch_size,
    load_pipeline,
    model_identity,
    noise_device,
    sample_store,
    sampling_pipeline,
    sampling_record,
    timestep_spacing_of,
    weights_fingerprint,
)
from .scheduling_ddpm_target import DDPMTargetScheduler
from .scored_images import ScoredImages
from .speed import device_description, strict_float32
from .training_config import CONFIG_FILE_NAME

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------


def load_training_config(model: str) -> dict[str, Any] | None:
    """``training_config.json`` beside a pipeline (a local folder, or a Hub repo when online)."""
    local = Path(model) / CONFIG_FILE_NAME
    if local.is_file():
        return read_json_object(local)
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return read_json_object(hf_hub_download(model, CONFIG_FILE_NAME))
    except Exception:  # noqa: BLE001 - any Hub failure just means "no recorded options"
        return None


def resolve_reference(config: EvaluationConfig, training: dict[str, Any] | None, announce: bool = True) -> EvaluationConfig:
    """``config`` with its reference named: ``--reference`` as given (its split ``train`` unless
    given), or, when a metric needs data (FID, KID, precision/recall, bits/dim) and none was given,
    the data the ``--model`` was trained on, from its ``training_config.json`` (``training``, None
    without one; :func:`~ddpm_pipeline.reference.training_data_reference`), with the run's split
    and configuration unless ``--reference_split`` / ``--reference_config`` are given, which is
    logged if ``announce``. Then, unless ``--bpd_data`` or ``--bpd_split`` is given, bits/dim are
    measured on the images the run held out (its ``--validation_split`` of the same source), where
    it held some out. Raises when nothing names the data: a folder of ``--samples``, or a
    pipeline without ``training_config.json`` (from the Hub, or saved by hand)."""
    needs_data = any(metric in REFERENCE_METRICS for metric in config.metric_list()) or (
        "bpd" in config.metric_list() and config.bpd_data is None
    )
    if config.reference is not None or not needs_data:
        return replace(config, reference_split=config.reference_split or "train")
    if training is None:
        if config.model is None:
            unknown = "--samples are images alone"
        elif Path(config.model).exists():
            unknown = f"--model {config.model} has no training_config.json to say what data it was trained on"
        else:
            unknown = f"--model {config.model} is a Hub repo without a training_config.json (or one that could not be fetched)"
        raise ValueError(
            f"{unknown}: give --reference, the data its images are to be compared with: an image folder, a save_to_disk "
            "folder, a Hub data set name (e.g. cifar10, with --reference_split), a .npz statistics file, or 'bundled' "
            "(the bundled Fashion-MNIST images)."
        )
    source, split, dataset_config = training_data_reference(training, config.model)
    split, dataset_config = config.reference_split or split, config.reference_config or dataset_config
    words = describe_data_source(training.get("dataset_name"), dataset_config, split, training.get("train_data_dir"),
                                 training.get("dataset_path"))  # fmt: skip
    held_out, trained_split = training.get("validation_split"), training.get("split") or "train"
    # a share of --split drawn at random, which the run records as given (the last rows are two splits by then)
    random_share = bool(held_out) and held_out_amount(held_out) is not None
    if random_share and split == trained_split:
        words += f", with the {held_out} of it held out of training at random"  # the statistics of the whole split
    if announce:
        logger.info(f"reference: the data {config.model} was trained on, {words}")
    bpd_split, bpd_held_out = config.bpd_split, config.bpd_held_out
    if "bpd" in config.metric_list() and config.bpd_data is None and bpd_split is None and held_out:
        # a likelihood is measured on images the model did not train on
        if not random_share:  # a split of its own
            bpd_split, words = held_out, f"split {held_out}"
        else:
            bpd_split, bpd_held_out = trained_split, bpd_held_out or held_out
            words = f"the {bpd_held_out} of split {bpd_split} drawn at random"
        if announce:
            logger.info(f"bits/dim: on the images {config.model} held out from its training, {words} "
                        "(its --validation_split)")  # fmt: skip
    return replace(config, reference=source, reference_split=split, reference_config=dataset_config, bpd_split=bpd_split,
                   bpd_held_out=bpd_held_out)  # fmt: skip


def model_preprocessing(pipeline: DDPMTargetPipeline, training: dict[str, Any] | None, resize_mode: str | None) -> ImagePreprocessor:
    """The training preprocessing of a pipeline: its UNet's size and channels, and the recorded resize mode."""
    mode = resize_mode or (training or {}).get("resize_mode") or "auto"
    return ImagePreprocessor(pipeline.unet.config.sample_size, int(pipeline.unet.config.in_channels), mode)


def data_source(data: str, split: str | None, dataset_config: str | None, config: EvaluationConfig,
                training: dict[str, Any] | None) -> DataSource:  # fmt: skip
    """``data`` (``--reference`` or ``--bpd_data``) as a :class:`~ddpm_pipeline.reference.DataSource`,
    its images read from ``--image_column``, else, where ``data`` is the data the ``--model`` was
    trained on (the same folder or Hub data set), from the column its run read them from."""
    source = DataSource.parse(data, split, dataset_config, config.image_column)
    trained_column = (training or {}).get("image_column")
    if config.image_column is None and trained_column and source.kind != "stats":
        try:
            trained_on = DataSource.parse(training_data_reference(training, config.model)[0])
        except FileNotFoundError:  # its folder is gone: whatever this is, it is not that data
            return source
        if (trained_on.kind, trained_on.location) == (source.kind, source.location):
            source = replace(source, image_column=trained_column)
    return source


def check_reference_size(source: DataSource, dataset: datasets.Dataset | None, max_images: int | None,
                         metrics: list[str]) -> None:  # fmt: skip
    """Raise, before the sampling, when the reference cannot give ``metrics``: a data set of fewer
    images (``dataset``, up to ``max_images`` of them) than they need (:func:`~ddpm_pipeline.metrics.fewest_images`),
    or a statistics file without the ``features`` that KID and precision/recall need."""
    compared = [metric for metric in metrics if metric in REFERENCE_METRICS]
    if source.kind == "stats":
        with naming_unreadable_npz(source.location, "statistics"), np.load(source.location, allow_pickle=False) as data:
            has_features = "features" in data.files
        needs_features = [{"kid": "KID", "prc": "precision/recall"}[metric] for metric in compared if metric in ("kid", "prc")]
        if needs_features and not has_features:
            raise ValueError(
                f"{' and '.join(needs_features)} need{'s' if len(needs_features) == 1 else ''} the reference's features, "
                f"but {source.location} holds only FID "
                "statistics (mu, sigma): pass a data source as --reference, or a stats file that has 'features'."
            )
        return
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    fewest = fewest_images(compared)
    if count < fewest:
        raise ValueError(
            f"The reference's split {source.split} holds {count} image(s), too few for {', '.join(compared)}: "
            f"{'precision/recall needs' if fewest > 2 else 'they need'} at least {fewest}. Give a --reference_split with more."
        )


def check_reference_padding(source: DataSource, dataset: datasets.Dataset, preprocess: ImagePreprocessor,
                            canvas_guessed: bool = False) -> None:  # fmt: skip
    """A reference image that ``resize_mode="pad"`` cannot fit on the canvas would fail after the
    sampling: :func:`~ddpm_pipeline.images.check_padding` of the images it inspects, before. Where
    the canvas was taken from the samples or the network rather than from a training run or
    ``--resize_mode`` (``canvas_guessed``), a warning when ``"auto"`` pads the reference's images
    onto it and they cover under :data:`~ddpm_pipeline.images.MOSTLY_PADDING` of it: the samples
    would be compared with small pictures in a black frame (28 px images on a 64 px canvas)."""
    if preprocess.resize_mode == "pad":
        image_format = inspect_images(source.images(dataset))
        check_padding(image_format, preprocess.resolution, "pad", what="reference images", skips_bad_images=False)
    elif canvas_guessed and preprocess.resize_mode == "auto":
        image_format = inspect_images(source.images(dataset))
        coverage = padded_coverage(image_format, preprocess.resolution, "auto")
        if coverage is not None and coverage < MOSTLY_PADDING:
            height, width = preprocess.height_width
            logger.warning(
                f"the reference's {image_format.shorter_sides()} images are padded onto the {width}×{height} canvas of "
                f"what is scored, where they cover {coverage:.0%} of it (the median of {image_format.inspected} "
                "inspected): the scores would compare what is scored with small pictures in a black frame. If it shows "
                "these images scaled up, pass --resize_mode crop; else pass a --reference of images its size."
            )


def samples_preprocessing(images: ScoredImages, config: EvaluationConfig) -> ImagePreprocessor:
    """How reference images are prepared to match the ``--samples``: their size and colour
    (:meth:`~ddpm_pipeline.scored_images.ScoredImages.size_and_channels`), unless ``--resolution`` /
    ``--channels`` say otherwise."""
    height, width, channels = images.size_and_channels()
    return ImagePreprocessor(config.resolution or (height, width), config.channels or channels, config.resize_mode or "auto")


def bound_store(folder: str | Path, model: str, source: DataSource, preprocess: ImagePreprocessor,
                num_images: int | None, num_timesteps: int | None, batch_size: int, seed: int) -> BoundStore:  # fmt: skip
    """The store of the bound's per-batch terms for these options (see :func:`bound_over_data`): the
    model (a local folder also by its weights' :func:`weights_fingerprint`), the data, the
    preprocessing and the estimator's options."""
    settings = {
        "model": model_identity(model),
        "weights": weights_fingerprint(model),
        "data": source.location,
        "split": source.split,
        "config": source.dataset_config,
        **({"image_column": source.image_column} if source.image_column else {}),  # a store made without it still matches
        **({"held_out": source.held_out} if source.held_out else {}),
        "preprocessing": [preprocess.resolution, preprocess.channels, preprocess.resize_mode],
        "num_images": num_images,
        "rows": "spread evenly",  # the terms of the first rows, which earlier versions measured, are not reused
        "timesteps": num_timesteps,
        "batch_size": batch_size,
        "seed": seed,
        "dimensions": "the images' own",  # the terms per canvas dimension that earlier versions kept are not reused
    }
    return BoundStore(folder, settings)


def bound_over_data(
    pipeline: DDPMTargetPipeline,
    source: DataSource,
    preprocess: ImagePreprocessor,
    num_images: int | None,
    num_timesteps: int | None,
    batch_size: int,
    seed: int,
    device: torch.device,
    processes: LaunchedProcesses | None = None,
    store: BoundStore | None = None,
    before_batch: Callable[[], None] | None = None,
    dataset: datasets.Dataset | None = None,
    long_job_advice: str = "",
) -> dict[str, Any] | None:
    """bits/dim averaged over ``num_images`` images of ``source`` spread evenly over it
    (:func:`~ddpm_pipeline.data.spread_subset`; all when None), with its per-term
    breakdown, the standard error over images, and the mean per-timestep curve when exact; each
    image's per dimension of its own (an image padded onto the canvas: the padding's dimensions not
    counted, :meth:`~ddpm_pipeline.likelihood.BoundTerms.per_data_dimension`). The
    network runs in float32 without TF32 (:func:`strict_float32`), whatever it sampled with, and the
    bound is the DDPM chain's of the pipeline's betas whichever scheduler the folder samples with.

    Batch ``b`` draws its timesteps and ``x_t`` noise from a CPU generator seeded by
    ``derive_seed(seed, b)``, so several ``processes`` can share the batches (``b`` to process
    ``b mod N``) and give the main process, after one gather, what one process computes; the
    others return None.

    With a ``store`` (:func:`bound_store`), each batch's terms are kept as soon as they are
    computed and a repeated call reads them back, so an interrupted run resumes where it stopped.
    ``before_batch`` is called before each batch that is computed (a time limit may raise there).
    ``dataset`` is ``source``'s images where this process has loaded them already. On a CPU, a
    bound that will take long is told early (:class:`~ddpm_pipeline.pace.Pace`, with ``long_job_advice``).
    """
    processes = processes or LaunchedProcesses(device)
    with processes.main_first():  # one download of a Hub data set, which the others then read from the cache
        if dataset is None:  # every process passes the barriers, loading or not
            dataset = source.load()
    dataset = spread_subset(dataset, num_images)
    source_images = source.images(dataset)  # read as in training: upright, bad files named
    count = len(dataset)
    scheduler = pipeline.scheduler
    if not isinstance(scheduler, DDPMTargetScheduler):  # a folder saved with DDIM, DPM-Solver, …
        scheduler = DDPMTargetScheduler.from_config(scheduler.config)
    unet = pipeline.unet.to(device).eval()
    mine: list[tuple[int, BoundTerms]] = []
    batches = range(processes.index, -(-count // batch_size), processes.count)
    # on a CPU, how long the batches left take, told from the first one computed (the main process's)
    pace = Pace("the bound (bits/dim)", long_job_advice) if processes.is_main and device.type == "cpu" else None
    evaluations_per_batch = bound_evaluations_per_image(scheduler.config.num_train_timesteps, num_timesteps)
    with strict_float32(device):
        for position, batch_index in enumerate(tqdm(batches, desc="bits/dim", unit="batch", disable=not processes.is_main)):
            bound = store.load(batch_index) if store is not None else None
            if bound is None:
                if before_batch is not None:
                    before_batch()
                start = batch_index * batch_size
                opened = [source_images.open(index) for index in range(start, min(start + batch_size, count))]
                batch = torch.stack([preprocess(image) for image in opened]).to(device)
                share = torch.tensor([preprocess.data_share(image.size) for image in opened])
                network = unet
                if pace is not None and not pace.ticks:  # the first batch this call computes
                    pace.expect((len(batches) - position) * evaluations_per_batch, len(opened))
                    network = pace.timed(unet)
                bound = batch_bound(network, scheduler, batch, num_timesteps, seed, batch_index,
                                    show_progress=processes.is_main).per_data_dimension(share)  # fmt: skip
                if store is not None:
                    store.save(batch_index, bound)
            mine.append((batch_index, bound))
    results = gather_object(mine) if processes.count > 1 else mine
    if not processes.is_main:
        return None
    terms = BoundTerms.concatenate([bound for _, bound in sorted(results, key=lambda item: item[0])])
    report = {
        **terms.summary(),
        "num_images": count,
        "timesteps": "all" if num_timesteps is None else num_timesteps,
        "data": source.location,
        "kind": source.kind,
        "split": source.split,
        "config": source.dataset_config,
        "image_column": source.image_column,
        "held_out": source.held_out,
        "prediction_type": scheduler.config.prediction_type,
        "variance_type": scheduler.config.variance_type,
    }
    if terms.per_timestep is not None:
        report["per_timestep_mean"] = terms.per_timestep.mean(dim=0).tolist()
    return report


@dataclass
class _DrawnSamples:
    """What :func:`_draw_samples` leaves: the store's folder, how many of its images were there
    before (counted by the main process), the images to score, the sampling record, how many this
    process wrote and the seconds the sampling took."""

    folder: Path
    reused: int
    paths: list[Path]
    sampling: dict[str, Any]
    written: int
    seconds: float


def _asks_for_more_than_quick(config: EvaluationConfig, names: tuple[str, ...]) -> bool:
    """Whether any of ``config``'s settings ``names`` asks for more than :data:`QUICK_CPU_SETTINGS`
    (None: all images, every timestep)."""
    return any(getattr(config, name) is None or getattr(config, name) > QUICK_CPU_SETTINGS[name] for name in names)


def long_evaluation_advice(config: EvaluationConfig) -> str:
    """What a sampling that would take long on a CPU suggests: the quick protocol
    (:data:`~ddpm_pipeline.evaluation_config.QUICK_CPU_EVALUATION`), unless it asks for no more."""
    if not _asks_for_more_than_quick(config, ("num_samples", "num_inference_steps")):
        return ""
    return f"for a quick FID-1k on a CPU, stop it (Ctrl-C) and give {QUICK_CPU_EVALUATION}"


def long_bound_advice(config: EvaluationConfig) -> str:
    """What a bound that would take long on a CPU suggests: the quick protocol's ``--bpd_num_images``
    and ``--bpd_timesteps`` (an unbiased estimate from that many timesteps per image), where it asks
    for more."""
    names = ("bpd_num_images", "bpd_timesteps")
    if not _asks_for_more_than_quick(config, names):
        return ""
    quick = " ".join(f"--{name} {QUICK_CPU_SETTINGS[name]}" for name in names)
    return (f"for an estimate on a CPU, stop it (Ctrl-C) and give {quick} (an unbiased estimate from "
            f"{QUICK_CPU_SETTINGS['bpd_timesteps']} timesteps per image, as the quick protocol)")


def _draw_samples(config: EvaluationConfig, device: torch.device, processes: LaunchedProcesses,
                  folder: Path) -> _DrawnSamples:  # fmt: skip
    """Fill the sample store in ``folder`` with ``config.num_samples`` images of ``config.model``
    (:func:`~ddpm_pipeline.sampling.sample_store`), the processes sharing its batches; the images
    already there are kept."""
    sampler = sampling_pipeline(config.model, device, config.fast_sampling, config.sampling_dtype, config.scheduler,
                                config.compile_unet, config.timestep_spacing)  # fmt: skip
    with processes.main_first():
        store = sample_store(folder, config.model, config.num_inference_steps, config.seed, config.batch_size,
                             sampler.unet.dtype, config.scheduler, config.eta, noise_device(device),
                             timestep_spacing_of(sampler))  # fmt: skip
    reused, written, seconds = processes.fill(store, sampler, config.num_samples,
                                              long_job_advice=long_evaluation_advice(config))  # fmt: skip
    return _DrawnSamples(folder, reused, store.paths(config.num_samples), sampling_record(sampler, config.fast_sampling),
                         written, seconds)  # fmt: skip


def _measure_bound(config: EvaluationConfig, pipeline: DDPMTargetPipeline, source: DataSource,
                   preprocess: ImagePreprocessor, device: torch.device, processes: LaunchedProcesses,
                   partial_folder: Path, dataset: datasets.Dataset | None) -> tuple[dict[str, Any] | None, BoundStore]:  # fmt: skip
    """The bound in bits/dim over ``source``'s images (:func:`bound_over_data`, every process taking
    part; ``dataset``: those images, where this process has loaded them), each batch's terms kept
    in ``partial_folder`` until the report is written, so that an interrupted evaluation reuses
    them. Returns the bound (``None`` on processes other than the main one) and the store of terms."""
    with processes.main_first():  # the main process writes (or clears) the store's settings first
        terms_store = bound_store(partial_folder, config.model, source, preprocess, config.bpd_num_images,
                                  config.bpd_timesteps, config.bpd_batch_size, config.seed)  # fmt: skip
    batches_reused = terms_store.count() if processes.is_main else 0
    if batches_reused:
        logger.info(f"bits/dim: reusing the terms of {batches_reused} batch(es) from {terms_store.folder}")
    processes.wait()  # counted before any process adds its own
    bound = bound_over_data(
        pipeline, source, preprocess, config.bpd_num_images, config.bpd_timesteps, config.bpd_batch_size,
        config.seed, device, processes, store=terms_store, dataset=dataset, long_job_advice=long_bound_advice(config),
    )  # fmt: skip
    if bound is not None:
        bound["data"] = config.bpd_data or config.reference  # as given, as the reference is: no more of the disk
        bound["batches_reused"] = batches_reused
        if bound.get("padded_images"):
            height, width = preprocess.height_width
            logger.info(
                f"bits/dim: {bound['padded_images']} of the {bound['num_images']} images are padded onto the {width}×{height} "
                f"canvas; each one's bound is per dimension of the image itself, padding not counted "
                f"({bound['bits_per_dim']:.4f}; per dimension of the canvas, {bound['canvas_bits_per_dim']:.4f})"
            )
    return bound, terms_store


def _add_feature_scores(report: dict[str, Any], timings: dict[str, float], config: EvaluationConfig,
                        feature_wanted: list[str], extractor: FeatureExtractorSpec, images: ScoredImages,
                        preprocess: ImagePreprocessor, device: torch.device, reference_source: DataSource | None,
                        reference_images: Any, grid_path: Path) -> None:  # fmt: skip
    """The feature metrics of ``images`` (against the statistics of ``reference_source``, computed or
    read from the cache, where a metric needs them) into ``report``, with the reference's record,
    the extractor's identity and a grid of the first 64 images at ``grid_path``."""
    if len(images) < 2:
        raise ValueError(f"Need at least 2 images to score, found {len(images)}.")
    tick = time.perf_counter()
    layers = {METRIC_LAYERS[m] for m in feature_wanted}
    network = extractor.create(layers, device)
    generated = extract_features(
        network, images.batches(config.batch_size), device, total=len(images),
        description="sample features",
    )
    timings["sample_features_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    reference = None
    if reference_source is not None:
        reference = reference_statistics(
            config.reference, preprocess, extractor, device, split=config.reference_split,
            dataset_config=config.reference_config, max_images=config.reference_max_images,
            batch_size=config.batch_size, cache_dir=config.cache_dir, dataset=reference_images,
            image_column=reference_source.image_column,
        )  # fmt: skip
        summarized = reference.key.get("source", {})
        report["reference"] = {
            "source": config.reference,
            "kind": summarized.get("kind"),  # of the data the statistics summarize, also when read from a .npz
            "location": summarized.get("location"),
            "split": summarized.get("split"),
            "config": summarized.get("dataset_config"),
            "image_column": summarized.get("image_column"),
            "num_images": reference.num_images,
            "statistics_file": str(reference.path) if reference.path else None,
            "cache_hit": reference.cache_hit,
        }
    timings["reference_s"] = time.perf_counter() - tick
    report["metrics"].update(
        feature_metrics(
            feature_wanted, generated,
            reference.statistics if reference else None, reference.features if reference else None,
            kid_subsets=config.kid_subsets, kid_subset_size=config.kid_subset_size, isc_splits=config.isc_splits,
        )  # fmt: skip
    )
    report["feature_extractor"] = extractor.identity()
    grid_count = min(64, len(images))
    grid = next(images.head(grid_count).batches(grid_count))  # read as the features were
    grid = grid[:, :1] if preprocess.channels == 1 else grid
    report["grid"] = str(save_image_grid(grid.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255.0, grid_path))


def evaluate(config: EvaluationConfig | None = None, **options: Any) -> dict[str, Any]:
    """Sample (resumably), compute the requested metrics and write the report.

    ``evaluate(model="outputs/ddpm-fashion-mnist", num_samples=5000, metrics="fid,kid,bpd")`` or
    ``evaluate(EvaluationConfig(...))``. Returns the report dict (also written to ``output``).
    With ``snapshots=True`` it scores every pipeline the run in ``model`` saved instead, and returns
    their summary (:func:`~ddpm_pipeline.snapshot_scores.score_snapshots`).

    Launched as several processes (``accelerate launch --multi_gpu --num_processes N
    eval_metrics.py …``), they sample the batches in turn — the same images one process would
    make — and share the bound's batches likewise; the main process scores the samples and gathers
    the bound, and the others return ``{"process_index": i, "samples_written": n}``.
    """
    config = config or EvaluationConfig(**options)
    config.validate()
    if config.snapshots:
        from .snapshot_scores import score_snapshots  # it calls this function for each pipeline

        return score_snapshots(config)
    metrics = config.metric_list()
    started = time.perf_counter()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    timings: dict[str, float] = {}
    output = Path(config.output)
    stem = output.with_suffix("")
    store_folder = Path(config.samples_dir or f"{stem}-samples")  # where a model's samples go
    if config.batch_size is None:  # the samples' own, so that they are reused rather than refused for it
        # read before the processes join, so before any of them writes the folder's record
        batch_size = DEFAULT_BATCH_SIZE
        if config.model:
            batch_size = folder_batch_size(store_folder, DEFAULT_BATCH_SIZE, config.num_samples, config.device)
        config = replace(config, batch_size=batch_size)
    processes = LaunchedProcesses.from_environment(config.device)
    device = processes.device
    output.parent.mkdir(parents=True, exist_ok=True)

    feature_wanted = [m for m in metrics if m in FEATURE_METRICS]
    extractor = FeatureExtractorSpec.for_weights(config.inception_weights)
    if config.feature_extractor:
        extractor = FeatureExtractorSpec(config.feature_extractor, extractor.weights_path)
    extractor.check_metrics(feature_wanted)
    # what can be wrong with the inputs is found before the sampling, which may take hours
    if config.model is not None:
        check_model_exists(config.model)
        if Path(config.model).exists():
            check_pipeline_folder(config.model)
        else:  # a Hub repo id (or a mistyped folder's name), found before its training_config.json is looked for
            check_hub_model(config.model)
    training = load_training_config(config.model) if config.model is not None else None  # read once, used twice
    config = resolve_reference(config, training, announce=processes.is_main)
    reference_source, reference_images = None, None  # the images loaded (a Hub data set downloaded) by the main process now
    if any(m in feature_wanted for m in REFERENCE_METRICS):
        reference_source = data_source(config.reference, config.reference_split, config.reference_config, config, training)
        if processes.is_main and reference_source.kind != "stats":
            reference_images = reference_source.load()
            warning = sliced_classes_warning(reference_images, config.reference_split, "the reference split",
                                             "For fewer reference images of every class, give the whole split and "
                                             "--reference_max_images N, which spreads them over it.")  # fmt: skip
            if warning is not None:
                logger.warning(warning)
        if processes.is_main:
            check_reference_size(reference_source, reference_images, config.reference_max_images, feature_wanted)
    bpd_source, bpd_images = None, None
    if "bpd" in metrics:
        bpd_source = data_source(config.bpd_data or config.reference, config.bpd_split or config.reference_split,
                                 config.reference_config, config, training)  # fmt: skip
        bpd_source = replace(bpd_source, held_out=config.bpd_held_out)
        if bpd_source.kind == "stats":
            raise ValueError("bits/dim needs images: --reference is a statistics file, so pass --bpd_data (a data source).")
        if processes.is_main:  # a folder that is not there, a slice past the end: refused before the sampling
            bpd_images = bpd_source.load()
    if feature_wanted:
        with processes.main_first():  # one download, before the sampling: the others find it cached
            extractor.ensure_weights()

    helper_result = {"process_index": processes.index, "samples_written": 0}  # what a process other than the main returns
    if not processes.is_main and config.model is None:
        return helper_result  # scoring --samples: nothing to share
    pipeline = None
    sampling: dict[str, Any] | None = None
    if config.model is not None:
        pipeline = load_pipeline(config.model).to(device)  # float32: the bound's network
        preprocess = model_preprocessing(pipeline, training, config.resize_mode)
        num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
        if feature_wanted and config.num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"--num_inference_steps {config.num_inference_steps} exceeds the {num_train_timesteps} diffusion steps "
                f"of {config.model}: give at most {num_train_timesteps}."
            )
        if reference_images is not None:  # padding never shrinks: a reference image too big for it would fail after sampling
            check_reference_padding(reference_source, reference_images, preprocess,
                                    canvas_guessed=training is None and config.resize_mode is None)  # fmt: skip
        samples_folder, reused, scored = None, 0, ScoredImages(Path())
        if feature_wanted:
            samples = _draw_samples(config, device, processes, store_folder)
            samples_folder, reused, sampling = samples.folder, samples.reused, samples.sampling
            scored = ScoredImages(samples.folder, files=tuple(samples.paths))
            timings["sampling_s"] = samples.seconds
            helper_result["samples_written"] = samples.written
    else:
        scored = ScoredImages.from_path(config.samples).head(config.num_samples)
        preprocess = samples_preprocessing(scored, config)
        if reference_images is not None:
            check_reference_padding(reference_source, reference_images, preprocess,
                                    canvas_guessed=config.resolution is None and config.resize_mode is None)  # fmt: skip
        samples_folder, reused = scored.source, len(scored)

    bound, terms_store = None, None
    if "bpd" in metrics:  # before the features: every process takes part, then only the main one goes on
        tick = time.perf_counter()
        bound, terms_store = _measure_bound(config, pipeline, bpd_source, preprocess, device, processes,
                                            Path(f"{stem}-bpd-partial"), bpd_images)  # fmt: skip
        timings["bpd_s"] = time.perf_counter() - tick
    if not processes.is_main:
        return helper_result

    report: dict[str, Any] = {
        "model": config.model,
        "samples": str(samples_folder) if samples_folder else None,
        "num_samples": len(scored),
        "samples_reused": reused,
        "num_inference_steps": config.num_inference_steps if config.model else None,
        "model_training": model_training(config.model),
        "weights": weights_fingerprint(config.model) if config.model else None,  # which weights: a push checks them
        "sampling": sampling,
        "seed": config.seed,
        "metrics": {},
        "preprocessing": {"resolution": preprocess.resolution, "channels": preprocess.channels, "resize_mode": preprocess.resize_mode},
        "device": device_description(device),
        "processes": processes.count,
        "versions": package_versions(),
        "date": started_at,
        "options": {f.name: getattr(config, f.name) for f in fields(config)},
    }
    if feature_wanted:
        _add_feature_scores(report, timings, config, feature_wanted, extractor, scored, preprocess, device,
                            reference_source, reference_images, Path(f"{stem}-grid.png"))  # fmt: skip

    if bound is not None:
        curve = bound.pop("per_timestep_mean", None)
        if curve is not None:
            report["bpd_plot"] = str(save_bound_terms_plot(curve, Path(f"{stem}-bpd.png")))
            report["bpd_per_timestep"] = curve
        report["metrics"]["bpd"] = bound

    timings["total_s"] = time.perf_counter() - started
    report["wall_time"] = timings
    with atomic_path(output) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")
    if terms_store is not None:
        terms_store.remove()  # the report holds the bound now
    logger.info(f"wrote {output}: {_summary(report['metrics'])}")
    return report


def _summary(metrics: dict[str, Any]) -> str:
    parts = []
    for key in SCORE_NAMES:  # the headline scores, in their order
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}")
    if "bpd" in metrics:
        parts.append(f"bits/dim {metrics['bpd']['bits_per_dim']:.4f}")
    return ", ".join(parts)


def main(argv: Iterable[str] | None = None, config: EvaluationConfig | None = None) -> dict[str, Any]:
    """The ``eval_metrics.py`` command line ``argv``, or its options ``config`` already parsed (as
    :func:`~ddpm_pipeline.commands.evaluate` parses them)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    return evaluate(config if config is not None else EvaluationConfig.from_args(list(argv) if argv is not None else None))
