"""The model card (``README.md``) of a trained pipeline folder, for the Hugging Face Hub.

The card's YAML metadata is huggingface_hub's `ModelCardData` (``library_name: diffusers``, tags,
data set, ``pipeline_tag``, license and, when ``eval_metrics.py`` has scored the model, its
metrics as ``model-index``); the body gives the recipe, the sample grid, the loading snippet and
the training options.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .atomic import atomic_path
from .data import describe_data_source
from .json_files import read_json_object
from .metrics import SCORE_NAMES
from .option_values import is_learned_variance
from .preflight import check_pipeline_folder
from .pretrained import is_local_source
from .run_outputs import LOSS_CURVE_NAME, SAMPLES_NAME, TRAJECTORY_NAME, VALIDATION_CURVE_NAME
from .run_records import QUARTER_COLUMNS, load_run_summary
from .sampling import weights_fingerprint
from .scheduling_ddpm_target import DDPMTargetScheduler
from .training_config import CONFIG_FILE_NAME, TrainingConfig
from .unet_presets import sample_height_width

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
EVAL_REPORT_NAME = "eval_results.json"
TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm"]
PIPELINE_TAG = "unconditional-image-generation"
BUNDLED_DATASET_ID = "zalando-datasets/fashion_mnist"
TARGET_NAMES = {"epsilon": "the noise ε", "sample": "the clean image x0", "mu": "the posterior mean μ", "v_prediction": "v"}
#: key in an ``eval_metrics.py`` report's metrics (:data:`~ddpm_pipeline.metrics.SCORE_NAMES`)
#: → (model-index metric type, display name); bits/dim is read from its own record.
MODEL_INDEX_TYPES = {"fid": "fid", "kid_mean": "kid", "isc_mean": "inception_score", "precision": "precision", "recall": "recall"}
METRIC_NAMES = {key: (MODEL_INDEX_TYPES[key], name) for key, name in SCORE_NAMES.items()}
#: the standard deviation over subsets / splits the report gives with a metric, shown beside it
METRIC_SPREADS = {"kid_mean": "kid_std", "isc_mean": "isc_std"}
#: The kinds of data source (:class:`~ddpm_pipeline.reference.DataSource`) that are local files.
LOCAL_KINDS = ("saved", "imagefolder", "stats")


def eval_outputs(report: str | Path) -> list[Path]:
    """The report ``FOLDER/NAME.json`` and the files ``eval_metrics.py`` wrote beside it, all named
    ``NAME-*``: ``NAME-grid.png``, ``NAME-bpd.png``, ``NAME-samples/``, ``NAME-bpd-partial/``,
    and with ``--snapshots`` each point's ``NAME-<point>.json`` with its own, and ``NAME-curve.png``."""
    report = Path(report)
    return [report, *sorted(report.parent.glob(f"{report.stem}-*"))]


def needs_package(pipeline_dir: str | Path) -> bool:
    """Whether loading the folder needs ``ddpm_pipeline`` (its scheduler is not a stock class: μ)."""
    index = read_json_object(Path(pipeline_dir) / "model_index.json")
    return index.get("scheduler", [None])[0] != "diffusers"


def dataset_id(config: TrainingConfig | None) -> str | None:
    """The Hub data set the model was trained on: ``--dataset_name``, or Fashion-MNIST for the
    bundled images; None for local folders (not on the Hub)."""
    if config is None:
        return None
    if config.dataset_name:
        return config.dataset_name
    if not config.train_data_dir and not config.dataset_path:
        return BUNDLED_DATASET_ID
    return None


def eval_dataset(record: dict[str, Any], source_key: str, dataset: str | None, dataset_name: str | None) -> dict[str, Any]:
    """The model-index data set of metrics measured on the data a report ``record`` names (its
    ``kind``, its source under ``source_key``, its ``split`` and ``config``): a Hub data set with its split,
    Fashion-MNIST's test split for the bundled images, ``custom`` (named by its folder or file) for
    local data; the training data set (``dataset``, ``dataset_name``) where the record has no kind."""
    kind, source, split = record.get("kind"), record.get(source_key), record.get("split")
    if kind == "bundled":
        return {"dataset_type": BUNDLED_DATASET_ID, "dataset_name": "Fashion-MNIST", "dataset_split": "test"}
    if kind == "hub":
        return {"dataset_type": source, "dataset_name": source, "dataset_split": split, "dataset_config": record.get("config")}
    if kind in LOCAL_KINDS and source:
        return {"dataset_type": "custom", "dataset_name": Path(str(source)).name, "dataset_split": split}
    return {"dataset_type": dataset or "custom", "dataset_name": dataset_name or "custom"}


#: eval_metrics.py's --scheduler choices, as a card names them
SAMPLER_NAMES = {"ddpm": "ancestral", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++", "euler": "Euler"}


def sampler_words(report: dict[str, Any]) -> str:
    """How a report's samples were drawn, where not by the folder's own ancestral sampler on
    diffusers' default (leading) timesteps: ``"DDIM, η = 0"``, ``"trailing timesteps"``, both
    joined by a semicolon; ``""`` otherwise (and for a report of images alone)."""
    if not report.get("model"):
        return ""
    options = report.get("options") or {}
    scheduler = options.get("scheduler") or "ddpm"
    words = []
    if scheduler != "ddpm":
        eta = f", η = {options.get('eta') or 0:g}" if scheduler == "ddim" else ""
        words.append(SAMPLER_NAMES.get(scheduler, scheduler) + eta)
    spacing = (report.get("sampling") or {}).get("timestep_spacing")
    if spacing not in (None, "leading"):
        words.append(f"{spacing} timesteps")
    return "; ".join(words)


def eval_results(report: dict[str, Any], dataset: str | None, dataset_name: str | None) -> list[EvalResult]:
    """The metrics of an ``eval_metrics.py`` report as `EvalResult`s (model-index entries), each on
    the data it was measured on (:func:`eval_dataset`): the sample metrics on the reference data,
    bits/dim on its own."""
    metrics = report.get("metrics", {})
    samples = report.get("num_samples")
    steps = report.get("num_inference_steps")
    sampler = sampler_words(report)
    setting = f"{samples} samples, {steps} steps{f'; {sampler}' if sampler else ''}" if samples else ""
    on_reference = {"task_type": PIPELINE_TAG, **eval_dataset(report.get("reference") or {}, "location", dataset, dataset_name)}
    results = []
    for key, (metric_type, display) in METRIC_NAMES.items():
        if isinstance(metrics.get(key), int | float):
            name = f"{display} ({setting})" if setting else display
            results.append(EvalResult(metric_type=metric_type, metric_value=round(float(metrics[key]), 6),
                                      metric_name=name, **on_reference))  # fmt: skip
    bpd = metrics.get("bpd")
    if isinstance(bpd, dict) and isinstance(bpd.get("bits_per_dim"), int | float):
        on_bound_data = {"task_type": PIPELINE_TAG, **eval_dataset(bpd, "data", dataset, dataset_name)}
        held_out = f", {bpd['held_out']} held out of {bpd.get('split')}" if bpd.get("held_out") else ""
        results.append(EvalResult(metric_type="bits_per_dim", metric_value=round(float(bpd["bits_per_dim"]), 6),
                                  metric_name=f"NLL bound (bits/dim{held_out})", **on_bound_data))  # fmt: skip
    return results


def load_training_config(pipeline_dir: str | Path) -> TrainingConfig | None:
    """The options the folder was trained with (``training_config.json``), or None."""
    path = Path(pipeline_dir) / CONFIG_FILE_NAME
    return TrainingConfig.load(path) if path.is_file() else None


def stale_report_reason(pipeline_dir: str | Path, report: dict[str, Any]) -> str | None:
    """Why an ``eval_metrics.py`` ``report`` does not score the pipeline now in ``pipeline_dir``
    (trained further or again since it was scored), or None: its UNet's
    :func:`~ddpm_pipeline.sampling.weights_fingerprint` differs from the folder's, or, for a report
    that records none, the training step it saw differs from the folder's ``training_summary.json``."""
    scored_step = (report.get("model_training") or {}).get("global_step")
    summary, _ = load_run_summary(pipeline_dir)
    step_now = summary.get("global_step") if summary else None
    steps = f" (the report saw step {scored_step}, the folder holds step {step_now})" if scored_step != step_now else ""
    recorded = report.get("weights")
    if recorded:
        differs = recorded != weights_fingerprint(str(pipeline_dir))
        return f"the folder's UNet is not the one it scored{steps}" if differs else None
    if scored_step is not None and step_now is not None and steps:
        return f"it scored the model at another training step{steps}"
    return None


def load_eval_report(pipeline_dir: str | Path, eval_report: str | Path | None = None,
                     skip_stale: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """The ``eval_metrics.py`` report: ``eval_report`` if given, else ``eval_results.json`` in the
    folder. A report of other weights than the folder's (:func:`stale_report_reason`) is refused,
    or with ``skip_stale`` left out with a warning."""
    path = Path(eval_report) if eval_report else Path(pipeline_dir) / EVAL_REPORT_NAME
    if eval_report and not path.is_file():
        raise FileNotFoundError(f"--eval_report {path} does not exist: give the JSON file eval_metrics.py wrote.")
    if not path.is_file():
        return None
    report = read_json_object(path, "give the JSON report eval_metrics.py wrote, or score the model again")
    if "points" in report and "metrics" not in report:  # the summary of eval_metrics.py --snapshots
        final = next((point["report"] for point in report["points"] if point["name"] == "final"), None)
        raise ValueError(
            f"{path} is the summary of eval_metrics.py --snapshots, which holds no metrics of one model: give the "
            f"report of the pipeline you push{f' ({final}, for the final one)' if final else ''} as --eval_report."
        )
    reason = stale_report_reason(pipeline_dir, report)
    if reason is not None:
        message = (f"{path} does not score the pipeline now in {pipeline_dir}: {reason}, so it scores another one (a "
                   "snapshot, or this model before it was trained further or again). Score this one with eval_metrics.py "
                   "(a new --output, or the same one once its -samples folder, samples of the other weights, is "
                   "deleted)")  # fmt: skip
        if skip_stale:
            logger.warning(f"{message}; the card leaves its metrics out.")
            return None
        raise ValueError(f"{message}, or give the report of these weights as --eval_report.")
    return report


def _duration(seconds: float) -> str:
    """``"0.9 s"``, ``"42 s"``, ``"3.4 min"``, ``"5.2 h"``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _results_section(pipeline_dir: Path) -> list[str]:
    """The card's "Training results": how long and on what the run trained, its recent loss, and the
    loss curve and sampling trajectory the run drew (each part only when the folder has it)."""
    summary, snapshot = load_run_summary(pipeline_dir)
    lines = []
    if summary is not None:
        processes = summary.get("num_processes", 1)
        device = summary.get("device")
        where = f" on {f'{processes} × ' if processes > 1 else ''}{device}" if device else ""
        precision = summary.get("mixed_precision")
        precision = {"no": ", float32", None: ""}.get(precision, f", {precision} mixed precision")
        batch = summary.get("global_batch_size")
        data = summary.get("data") or {}
        epochs = summary.get("epochs")
        seen = (f" ({epochs:.3g} epochs of {data['num_images']:,} images)"
                if epochs is not None and data.get("num_images") else "")  # fmt: skip
        lines.append(
            f"{'This snapshot was taken after' if snapshot else 'Trained for'} {summary['global_step']:,} optimizer steps"
            + (f" of {batch:,} images" if batch else "") + seen
            + f", {_duration(summary['train_seconds'])} of training{where}{precision}."
        )
        recent = summary.get("recent_loss") or {}
        if "loss" in recent:
            quarters = [recent.get(name) for name in QUARTER_COLUMNS]
            by_quarter = (
                " By quarter of the timesteps, from the least noisy (t < T/4) to the noisiest: "
                + ", ".join("–" if value is None else f"{value:.4g}" for value in quarters) + "."
                if any(value is not None for value in quarters) else ""
            )  # fmt: skip
            parts = (f" (its MSE part {recent['mse']:.4g}, its bound part {recent['vlb']:.4g})"
                     if "mse" in recent and "vlb" in recent else "")  # fmt: skip
            lines.append(f"The training loss averaged {recent['loss']:.4g}{parts} over the last {recent['steps']} steps.{by_quarter}")
        held_out = summary.get("held_out")
        if held_out:
            how = "every timestep" if held_out.get("timesteps") is None else f"{held_out['timesteps']} stratified timesteps per image"
            lines.append(
                f"At step {held_out['step']:,} the variational bound on the negative log-likelihood ({how}) was "
                f"{held_out['validation_bpd']:.4g} bits/dim on {held_out['num_images']:,} held-out images "
                f"({held_out['split']}) and {held_out['train_bpd']:.4g} on {held_out['num_train_images']:,} training images."
            )
    figures = [
        (LOSS_CURVE_NAME, "the training loss, in all and by quarter of the timesteps"),
        (VALIDATION_CURVE_NAME, "the bound on held-out and on training images during training"),
        (TRAJECTORY_NAME, "the sampling chain: x_t, the predicted noise and the predicted x0 at a few steps"),
    ]
    images = [f"![{alt}]({name})" for name, alt in figures if (pipeline_dir / name).is_file()]
    if not lines and not images:
        return []
    section = ["", "## Training results"]
    for paragraph in ([" ".join(lines)] if lines else []) + images:
        section += ["", paragraph]
    return section


def _image_size(sample_size: int | list[int] | None) -> str:
    """``"32×32"``, ``"16×32"`` (height × width), or ``"any size"`` for a UNet without one."""
    return "any size" if sample_size is None else "×".join(map(str, sample_height_width(sample_size)))


def build_model_card(
    pipeline_dir: str | Path,
    repo_id: str,
    license: str = "apache-2.0",
    eval_report: str | Path | None = None,
    skip_stale_report: bool = False,
) -> ModelCard:
    """The card of the pipeline in ``pipeline_dir`` as it will be published under ``repo_id``; an
    evaluation report of other weights is refused (:func:`load_eval_report`), or left out with
    ``skip_stale_report``."""
    pipeline_dir = Path(pipeline_dir)
    check_pipeline_folder(pipeline_dir)
    config = load_training_config(pipeline_dir)
    scheduler = DDPMTargetScheduler.from_pretrained(pipeline_dir / "scheduler")
    prediction_type = scheduler.config.prediction_type
    beta_schedule = scheduler.schedule_name or "custom"
    base_model = config.pretrained_model_name_or_path if config is not None else None
    local_base = None
    if base_model is not None and is_local_source(base_model):
        base_model, local_base = None, Path(base_model).name  # a local folder means nothing on the Hub: named only
    dataset = dataset_id(config)
    if config is None:  # a save_pretrained folder: nothing says what it was trained on
        dataset_name = None
    else:
        dataset_name = "Fashion-MNIST" if dataset == BUNDLED_DATASET_ID else (dataset or "a local image data set")
    report = load_eval_report(pipeline_dir, eval_report, skip_stale=skip_stale_report)
    results = eval_results(report, dataset, dataset_name) if report else []
    data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=list(TAGS),
        datasets=[dataset] if dataset else None,
        pipeline_tag=PIPELINE_TAG,
        model_name=repo_id.split("/")[-1],
        base_model=base_model,
        eval_results=results or None,
    )
    body = _body(pipeline_dir, repo_id, config, prediction_type, beta_schedule, dataset_name, report, base_model,
                 scheduler.config.variance_type, local_base)  # fmt: skip
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + body)


def _body(
    pipeline_dir: Path,
    repo_id: str,
    config: TrainingConfig | None,
    prediction_type: str,
    beta_schedule: str,
    dataset_name: str | None,
    report: dict[str, Any] | None,
    base_model: str | None = None,
    variance_type: str = "fixed_small",
    local_base: str | None = None,
) -> str:
    unet = read_json_object(pipeline_dir / "unet" / "config.json")
    if base_model:
        trained = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})"
    else:
        trained = f"fine-tuned from a local model (`{local_base}`)" if local_base else "trained"
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An unconditional DDPM (Ho et al. 2020) {trained}{f' on {dataset_name}' if dataset_name else ''} with "
        "[ddpm_pipeline](https://pypi.org/project/ddpm_pipeline/) and 🤗 diffusers: a `UNet2DModel` "
        f"({_image_size(unet.get('sample_size'))}, {unet.get('in_channels')} channel(s), "
        f"channels {unet.get('block_out_channels')}) that predicts {TARGET_NAMES.get(prediction_type, prediction_type)}, "
        f"with the {beta_schedule} noise schedule"
        + (
            " and a learned variance (Improved DDPM's `learned_range`: its last "
            f"{unet.get('in_channels')} output channel(s) interpolate the log variance between β̃_t and β_t)."
            if is_learned_variance(variance_type)
            else "."
        ),
        "",
    ]
    if config is None:
        lines += [f"The folder holds no `{CONFIG_FILE_NAME}`, so this card cannot say what the model was trained on or how.", ""]
    if (pipeline_dir / SAMPLES_NAME).is_file():
        lines += [f"![samples from the EMA weights]({SAMPLES_NAME})", ""]
    lines += ["## Use", ""]
    if needs_package(pipeline_dir):
        lines += [
            "This model predicts the posterior mean μ, which stock `DDPMScheduler` cannot sample, so loading it "
            "needs `pip install ddpm_pipeline` (its `DDPMTargetScheduler` is named in `model_index.json`); then:",
            "",
            "```python",
            "from diffusers import DDPMPipeline  # with ddpm_pipeline installed",
            f'image = DDPMPipeline.from_pretrained("{repo_id}")().images[0]',
            "```",
        ]
    else:
        lines += [
            "Stock diffusers is all it needs (the folder names only diffusers classes):",
            "",
            "```python",
            "from diffusers import DDPMPipeline",
            f'image = DDPMPipeline.from_pretrained("{repo_id}")().images[0]',
            "```",
            "",
            "`ddpm_pipeline.DDPMTargetPipeline` loads it too, adding respaced exact-posterior sampling and trajectories.",
        ]
    lines += _results_section(pipeline_dir)
    if report:
        lines += ["", "## Evaluation", "", _metrics_table(report)]
    if config is not None:
        lines += ["", "## Training", "", "| option | value |", "| --- | --- |"]
        for key, value in sorted(config.to_dict().items()):
            if key == "pretrained_model_name_or_path" and local_base:
                value = local_base  # recorded by its absolute path, for resuming: the card shows no more of the disk
            if key in ("train_data_dir", "dataset_path") and value is not None:
                value = Path(value).name  # likewise a local data set: named only
            if value is not None and key not in ("output_dir", "logging_dir", "cache_dir", "resume_from_checkpoint",
                                                 "overwrite_output_dir"):
                lines.append(f"| `{key}` | `{value}` |")
    return "\n".join(lines) + "\n"


def _data_words(source: Any, split: Any, kind: str | None = None) -> str:
    """A report's data source, as given to ``eval_metrics.py``, with its split; ``bundled`` in
    words (:func:`~ddpm_pipeline.data.describe_data_source`), as its one split is Fashion-MNIST's
    test set although datasets names it ``train``; local data by its folder or file name alone,
    since a path means nothing on the Hub."""
    if source == "bundled":
        return describe_data_source(split=split or "train")
    if kind in LOCAL_KINDS or (kind is None and isinstance(source, str) and is_local_source(source)):
        source = f"local data `{Path(str(source)).name}`"
    return f"{source}, split {split}" if split else str(source)


def _metrics_table(report: dict[str, Any]) -> str:
    """The report's metrics as a table, with how each was measured."""
    metrics = report.get("metrics", {})
    rows = ["| metric | value |", "| --- | --- |"]
    for key, (_, display) in METRIC_NAMES.items():
        if isinstance(metrics.get(key), int | float):
            spread = metrics.get(METRIC_SPREADS.get(key, ""))
            rows.append(f"| {display} | {metrics[key]:.4g}{f' ± {spread:.2g}' if isinstance(spread, int | float) else ''} |")
    bpd = metrics.get("bpd")
    if isinstance(bpd, dict) and "bits_per_dim" in bpd:
        stderr = bpd.get("bits_per_dim_stderr")
        rows.append(f"| NLL bound, bits/dim | {bpd['bits_per_dim']:.4g}{f' ± {stderr:.2g}' if stderr else ''} |")
    notes = []
    if any(key in metrics for key in METRIC_NAMES):
        reference = report.get("reference") or {}
        sampler = sampler_words(report)
        notes.append(
            f"Sample metrics: {report.get('num_samples')} samples with {report.get('num_inference_steps')} sampling "
            f"steps{f' ({sampler})' if sampler else ''} against {reference.get('num_images', 'the')} reference images "
            f"({_data_words(reference.get('source', 'see the report'), reference.get('split'), reference.get('kind'))})."
        )
    if isinstance(bpd, dict) and "bits_per_dim" in bpd:
        timesteps = bpd.get("timesteps")
        how = "every timestep" if timesteps in (None, "all") else f"{timesteps} stratified timesteps per image (unbiased)"
        padded = (f" {bpd['padded_images']} of them are padded onto the network's canvas: their bound is per dimension of "
                  f"the image itself, the padding not counted (per dimension of the canvas: {bpd['canvas_bits_per_dim']:.4g})."
                  if bpd.get("padded_images") and isinstance(bpd.get("canvas_bits_per_dim"), int | float) else "")  # fmt: skip
        held_out = f" (the {bpd['held_out']} of it held out of training at random)" if bpd.get("held_out") else ""
        notes.append(f"Bits/dim: the variational bound over {bpd.get('num_images')} images of "
                     f"{_data_words(bpd.get('data'), bpd.get('split'), bpd.get('kind'))}{held_out}, {how}.{padded}")
    notes.append("Computed by `eval_metrics.py` (torch-fidelity for the sample metrics).")
    return "\n".join(rows) + "\n\n" + " ".join(notes)


def write_model_card(pipeline_dir: str | Path, repo_id: str, license: str = "apache-2.0",
                     eval_report: str | Path | None = None, skip_stale_report: bool = False) -> Path:  # fmt: skip
    """Write the card (:func:`build_model_card`) as ``README.md`` in ``pipeline_dir`` (replacing an
    older one); returns its path."""
    path = Path(pipeline_dir) / CARD_NAME
    card = build_model_card(pipeline_dir, repo_id, license=license, eval_report=eval_report,
                            skip_stale_report=skip_stale_report)  # fmt: skip
    with atomic_path(path) as partial:
        partial.write_text(str(card))
    return path
