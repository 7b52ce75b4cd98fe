"""Score every pipeline one training run saved, to see how its quality grows as it trains.

``eval_metrics.py --model RUN --snapshots`` evaluates each ``snapshot-*`` pipeline a
``train_ddpm.py --snapshot_minutes / --snapshot_steps`` run wrote in its ``--output_dir`` and, when
the run has finished, the final pipeline there, all with the same options (samples, sampler, seed,
reference, metrics), and plots each metric against the training steps and minutes. Every point is
an ordinary :func:`~ddpm_pipeline.evaluation.evaluate` run with its own report, sample folder and
grid, so an interrupted or repeated call reuses the samples already drawn, and a snapshot added
later costs only its own sampling (and every point's features, computed again).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .evaluation import EvaluationConfig, evaluate, load_training_config, resolve_reference
from .metrics import FEATURE_METRICS, SCORE_NAMES
from .plots import save_metrics_over_training
from .run_records import load_run_summary
from .sampling import LaunchedProcesses

logger = logging.getLogger(__name__)

#: The name of a run's final pipeline (its ``--output_dir`` itself) among its snapshots.
FINAL_NAME = "final"
SNAPSHOT_PATTERN = "snapshot-*"
#: Score in a point's row → its label in the plot and the log: the sample metrics, then bits/dim.
SCORE_LABELS = {**SCORE_NAMES, "bits_per_dim": "bits/dim"}


@dataclass(frozen=True)
class RunPipeline:
    """One pipeline a training run saved: a snapshot or the final one, and how far it had trained."""

    name: str
    path: Path
    step: int
    train_seconds: float


def run_pipelines(run_dir: str | Path) -> list[RunPipeline]:
    """The ``snapshot-*`` pipelines in a ``train_ddpm.py`` ``--output_dir`` and its final pipeline
    (once the run has finished), ordered by training step. Each is placed by its own record
    (``snapshot.json``, ``training_summary.json``); a final pipeline at a snapshot's step stands
    for both. Raises when the folder holds no snapshot, with the options that make them."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"--snapshots scores the pipelines a training run saved, but --model {run_dir} is not a folder on this "
            "machine: give a train_ddpm.py --output_dir."
        )
    candidates = [(path.name, path) for path in sorted(run_dir.glob(SNAPSHOT_PATTERN)) if path.is_dir()]
    if not candidates:
        raise ValueError(
            f"{run_dir} holds no snapshot-* pipelines: train with --snapshot_minutes (e.g. 1 2 5) or --snapshot_steps "
            "(e.g. 1000 5000) to save the pipeline part-way, export the run's checkpoints as snapshots (`python -m "
            "ddpm_pipeline.export_checkpoint RUN/checkpoint-N`), or leave out --snapshots to score the final pipeline alone."
        )
    if (run_dir / "model_index.json").is_file():
        candidates.append((FINAL_NAME, run_dir))
    by_step: dict[int, RunPipeline] = {}
    for name, path in candidates:
        summary, _ = load_run_summary(path)
        if summary is None or not (path / "model_index.json").is_file():
            logger.warning(f"left out {path}: it is not a pipeline with its training record (snapshot.json / training_summary.json)")
            continue
        pipeline = RunPipeline(name, path, int(summary["global_step"]), float(summary["train_seconds"]))
        if pipeline.step in by_step and name != FINAL_NAME:
            logger.warning(f"left out {path}: {by_step[pipeline.step].path} holds the pipeline of the same step {pipeline.step}")
            continue
        by_step[pipeline.step] = pipeline
    return [by_step[step] for step in sorted(by_step)]


def point_scores(report: dict[str, Any]) -> dict[str, float | None]:
    """The scores of one ``evaluate`` report that the curves show (:data:`SCORE_LABELS`; None
    for one not measured)."""
    metrics = report.get("metrics", {})
    scores: dict[str, float | None] = {key: metrics.get(key) for key in SCORE_NAMES}
    bound = metrics.get("bpd")
    scores["bits_per_dim"] = bound.get("bits_per_dim") if isinstance(bound, dict) else None
    return scores


def point_config(config: EvaluationConfig, pipeline: RunPipeline) -> EvaluationConfig:
    """The options of one point: ``config``'s, with the pipeline as ``--model``, the report
    ``<output stem>-<name>.json`` and samples in ``--samples_dir``/<name> (default: beside that report)."""
    stem = Path(config.output).with_suffix("")
    samples_dir = str(Path(config.samples_dir) / pipeline.name) if config.samples_dir else None
    return replace(config, model=str(pipeline.path), snapshots=False, output=f"{stem}-{pipeline.name}.json",
                   samples_dir=samples_dir)  # fmt: skip


def score_snapshots(config: EvaluationConfig | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate each pipeline of the run in ``config.model`` (:func:`run_pipelines`) with
    ``config``'s options, each into its own report (:func:`point_config`); then write the run's
    summary to ``config.output`` (every point's step, training minutes, scores and report) and
    ``<output stem>-curve.png`` (each score against the steps and minutes), and return the summary.
    Without ``--reference`` every point is compared with the data the run records (its
    ``training_config.json``: :func:`~ddpm_pipeline.evaluation.resolve_reference`, resolved once).

    ``score_snapshots(model="outputs/run", num_samples=5000, metrics="fid,kid")``. Launched as
    several processes, they share each point's sampling as :func:`evaluate` does; the others
    return ``{"process_index": i, "points": n}``."""
    config = config or EvaluationConfig(**{**options, "snapshots": True})
    config.validate()
    pipelines = run_pipelines(config.model)
    processes = LaunchedProcesses.from_environment(config.device)
    # one reference for every point, named once (and in the summary): the run's data, unless given
    training = load_training_config(config.model) or load_training_config(str(pipelines[0].path))
    config = resolve_reference(config, training, announce=processes.is_main)
    if processes.is_main:
        logger.info(f"scoring {len(pipelines)} pipelines of {config.model}: " + ", ".join(p.name for p in pipelines))
    points = []
    for number, pipeline in enumerate(pipelines, start=1):
        one = point_config(config, pipeline)
        if processes.is_main:
            logger.info(f"[{number}/{len(pipelines)}] {pipeline.name}: step {pipeline.step}, "
                        f"{pipeline.train_seconds / 60:.2f} training minutes")  # fmt: skip
        report = evaluate(one)
        points.append({"name": pipeline.name, "model": str(pipeline.path), "step": pipeline.step,
                       "train_minutes": pipeline.train_seconds / 60, "report": one.output,
                       "scores": point_scores(report)})  # fmt: skip
    if not processes.is_main:
        return {"process_index": processes.index, "points": len(points)}
    output = Path(config.output)
    measured = {key: label for key, label in SCORE_LABELS.items() if any(p["scores"][key] is not None for p in points)}
    curve = save_metrics_over_training(
        [p["step"] for p in points], [p["train_minutes"] for p in points],
        {label: [p["scores"][key] for p in points] for key, label in measured.items()},
        output.with_name(f"{output.stem}-curve.png"),
        title=f"{Path(config.model).resolve().name}: {len(points)} pipelines" + (
            f", {config.num_samples:,} samples of {config.num_inference_steps} steps ({config.scheduler}) each"
            if any(metric in FEATURE_METRICS for metric in config.metric_list()) else ""),
    )  # fmt: skip
    summary = {"run": str(Path(config.model).resolve()), "points": points, "curve": str(curve),
               "options": {f.name: getattr(config, f.name) for f in fields(config)}}  # fmt: skip
    with atomic_path(output) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(f"wrote {output} and {curve}:\n{score_table(points, measured)}")
    return summary


def score_table(points: list[dict[str, Any]], measured: dict[str, str]) -> str:
    """The points' scores as an aligned text table, a row per point."""
    header = ["pipeline", "step", "minutes", *measured.values()]
    rows = [[p["name"], f"{p['step']:,}", f"{p['train_minutes']:.2f}",
             *("–" if p["scores"][key] is None else f"{p['scores'][key]:.4g}" for key in measured)] for p in points]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows])
