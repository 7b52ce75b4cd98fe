"""Quality study on Fashion-MNIST: which target and schedule win at a fixed training budget.

One command trains one *recipe* for a budget of training minutes (or steps), samples with the EMA
weights, and scores the samples with FID and KID against the statistics of the whole training set
(60k images, zero-padded to 32×32) and the model with bits/dim on the 10k test images; it appends
one JSON line per (budget milestone, sampler) to ``--results``::

    python benchmarks/quality_fmnist.py run eps-linear --inception_weights weights/inception-fid-nofc.pth
    python benchmarks/quality_fmnist.py run stock ...          # diffusers' own recipe, same protocol
    python benchmarks/quality_fmnist.py floor ...              # FID-5k of 5,000 real test images
    python benchmarks/quality_fmnist.py report --markdown study.md --plot fid_vs_minutes.png
    python benchmarks/quality_fmnist.py next                   # the recipe a GPU session runs next
    python benchmarks/quality_fmnist.py collect quality.tgz    # keep a session's records in the repository

**Across GPU sessions.** A session of 15 device minutes holds one recipe (``quality_session.sh``);
``collect`` adds what it returns to ``benchmarks/quality_fmnist/`` (records, grids, reports,
``study.md``), which is committed, and ``next`` names the first recipe of :data:`STUDY_ORDER` that
those records lack, so the study grows a recipe per session.

Recipes: ``{eps, x0, mu_simple, mu_vlb}-{linear, cosine}`` (the study) and
``{eps_minsnr, x0_minsnr}-{linear, cosine}`` (Min-SNR-γ, beyond it) are ``train_ddpm.py`` with that target,
schedule and loss weighting (any other ``train_ddpm.py`` option given on the command line goes to
them); ``stock`` is diffusers' ``train_unconditional.py`` recipe (:mod:`stock_recipe`) on the same
network, data, budget and sampler. Every recipe is sampled by the same :class:`DDPMTargetPipeline`
(its fast path on a GPU), with each of ``--sampler_steps`` (1000 = the full chain, fewer =
respaced), from the same seed.

**Pieces.** ``--stop_after_minutes M`` ends the command after about M minutes of wall-clock with
exit status 3 and everything done so far on disk (training checkpoints, numbered sample PNGs,
partial bits/dim sums, finished scores); the same command again continues where it stopped, and
the result is the one an uninterrupted run gives: every random draw is seeded by what it is, not
by when it happens, and the training clock counts training only (with a budget in minutes the step
count depends on the timing anyway, and a compiled network compiles again after a break, on the
clock: keep a recipe's training in one command where the budget allows). Each command does at
least one unit of work (a training check interval, a batch of samples, a batch of bits/dim, one
scoring).

**Budget.** ``--budget 5`` minutes of training (the trainer's clock: steps, including compilation,
excluding checkpoint and grid writing), or ``--budget_unit steps``. ``--milestones 1,2,3,5`` also
scores the model at those earlier budgets (the run is continued from each), for FID-vs-minutes.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_pipeline.atomic import atomic_path
from ddpm_pipeline.data import (
    BUNDLED_IMAGES,
    BUNDLED_LABELS,
    TrainingImages,
    find_image_column,
    idx_to_dataset,
    stack_images,
)
from ddpm_pipeline.evaluation import bound_over_data, bound_store, evaluate
from ddpm_pipeline.images import ImagePreprocessor, levels_to_model_range
from ddpm_pipeline.pipeline_ddpm_target import DDPMTargetPipeline
from ddpm_pipeline.plots import save_labelled_images, save_loss_curve, save_metric_curves
from ddpm_pipeline.provenance import package_versions
from ddpm_pipeline.reference import DataSource
from ddpm_pipeline.run_outputs import snapshot_name
from ddpm_pipeline.run_records import SNAPSHOT_SUMMARY_NAME
from ddpm_pipeline.sampling import noise_device, sample_store, sampling_pipeline
from ddpm_pipeline.scheduling_ddpm_target import DDPMTargetScheduler
from ddpm_pipeline.seeding import derive_seed
from ddpm_pipeline.speed import device_description
from ddpm_pipeline.training import micro_batch_seed, train
from ddpm_pipeline.training_config import TrainingConfig, optional
from ddpm_pipeline.unet import DDPMUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import append_json_lines  # noqa: E402
from stock_recipe import STOCK_DEFAULTS, StockRecipe  # noqa: E402  (sibling files: the benchmarks run as scripts)

PIECE_OVER_EXIT = 3
STUDY = "quality_fmnist"
TARGETS = {"eps": ("epsilon", "simple"), "x0": ("x0", "simple"), "mu_simple": ("mu", "simple"), "mu_vlb": ("mu", "vlb"),
           "eps_minsnr": ("epsilon", "min_snr"), "x0_minsnr": ("x0", "min_snr")}  # fmt: skip
SCHEDULES = ("linear", "cosine")
#: recipe name → train_ddpm.py's prediction_type, beta_schedule and loss_weighting
OUR_RECIPES = {
    f"{target}-{schedule}": {"prediction_type": prediction, "beta_schedule": schedule, "loss_weighting": weighting}
    for target, (prediction, weighting) in TARGETS.items()
    for schedule in SCHEDULES
}
STOCK = "stock"
RECIPES = (*OUR_RECIPES, STOCK)
#: train_ddpm.py options of every one of our recipes (before the command line's own)
OUR_DEFAULTS = ["--learning_rate", "2e-4", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "500",
                "--checkpointing_steps", "2000", "--checkpoints_total_limit", "1", "--save_images_steps", "none",
                "--report_to", "none"]  # fmt: skip
#: The study's network: DDPM's CIFAR-10 UNet at half width (8.9M parameters, 3.0 GFLOP per 32×32
#: forward instead of 35.7M and 12.1): plenty for 28×28 gray images, and 4× cheaper to sample 5,000
#: images three times and to bound 10,000 in a recipe that must fit one 15-minute GPU session.
HALF_WIDTH = [64, 128, 128, 128]
#: The order GPU sessions run the recipes in, one a session (``next``): the default recipe and the
#: stock one first, which the target compares, then the rest of the study.
STUDY_ORDER = ("eps-cosine", STOCK, "eps-linear", "x0-cosine", "x0-linear", "mu_vlb-cosine", "mu_vlb-linear",
               "mu_simple-cosine", "mu_simple-linear")  # fmt: skip
#: where the records of every session are kept, in the repository (``collect`` adds to it)
COLLECTED = Path("benchmarks/quality_fmnist")
DEFAULT_DATA = ("../shared/data/fashion-mnist", ".data/fashion-mnist")


class PieceOver(Exception):
    """This command's ``--stop_after_minutes`` are spent, or a stop signal ended its training;
    everything so far is on disk. The message says which."""


class Piece:
    """The wall-clock limit of one command: :meth:`check` before each unit of work (the first
    unit always runs, so every command makes progress)."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.perf_counter() + 60 * minutes
        self.units = 0

    def remaining_minutes(self) -> float | None:
        return None if self.end is None else max(0.0, (self.end - time.perf_counter()) / 60)

    def check(self) -> None:
        if self.units and self.end is not None and time.perf_counter() >= self.end:
            raise PieceOver

    def done(self) -> None:
        self.units += 1

    def next_unit(self) -> None:
        """:meth:`check`, then count the unit about to run (for work done inside a library call)."""
        self.check()
        self.done()


# -- data ------------------------------------------------------------------------------------


def find_data_dir(given: str | None) -> Path:
    """``--data_dir``, else the first of :data:`DEFAULT_DATA` that exists (holding at least the
    training files: the test files default to the package's bundled copy, the same bytes)."""
    candidates = [given] if given else list(DEFAULT_DATA)
    for candidate in candidates:
        if (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"No Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, …) in {', '.join(candidates)}: pass --data_dir "
        "the folder holding them (on a device machine, copy ../shared/data/fashion-mnist into .data/ and carry it)."
    )


def prepare_data(data_dir: Path, work_dir: Path, train_images: int | None = None) -> dict[str, Path]:
    """The IDX files as saved data sets ``<work_dir>/data/{train,test}`` (written once).

    ``train_images`` keeps only the first N training images (``data/train-first-N``: a pilot on a
    machine where Inception statistics of all 60k images would take hours); it is also the FID
    reference, since the reference is the training set."""
    paths = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        subset = train_images if split == "train" else None
        folder = work_dir / "data" / (split if subset is None else f"{split}-first-{subset}")
        if not (folder / "dataset_info.json").is_file():
            images, labels = data_dir / f"{prefix}-images-idx3-ubyte.gz", data_dir / f"{prefix}-labels-idx1-ubyte.gz"
            if split == "test" and not images.is_file():
                images, labels = BUNDLED_IMAGES, BUNDLED_LABELS  # Fashion-MNIST's test split ships with the package
            dataset = idx_to_dataset(images, labels)
            if subset is not None:
                if not 0 < subset <= len(dataset):
                    raise ValueError(f"--train_images must lie in [1, {len(dataset)}], got {subset}.")
                dataset = dataset.select(range(subset))
            with atomic_path(folder) as staging:
                dataset.save_to_disk(str(staging))
        paths[split] = folder
    return paths


# -- the study -------------------------------------------------------------------------------


@dataclass
class Milestone:
    """One point of the budget: a value in ``budget_unit`` and its folder label."""

    value: float
    unit: str

    @property
    def snapshot(self) -> str:
        """The trainer's folder for it (``snapshot-2min``)."""
        return snapshot_name(self.value, self.unit)

    @property
    def label(self) -> str:
        return self.snapshot.removeprefix("snapshot-")


class Study:
    """One command of the study (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, command: str = ""):
        self.args = args
        self.command = command
        self.work_dir = Path(args.work_dir)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.results = Path(args.results) if args.results else self.work_dir / "results.jsonl"
        self.cache_dir = Path(args.cache_dir) if args.cache_dir else self.work_dir / "cache"
        self.fast_sampling = "auto" if args.fast_sampling else "off"  # evaluate()'s spelling
        self.piece = Piece(args.stop_after_minutes)
        self.data = prepare_data(find_data_dir(args.data_dir), self.work_dir, args.train_images)
        self.unet_config = DDPMUNet.preset_config(
            args.model, sample_size=args.resolution, in_channels=1, out_channels=1, **json.loads(args.unet_overrides or "{}")
        )
        self.preprocess = ImagePreprocessor(args.resolution, 1, "auto")

    @functools.cached_property
    def parameters(self) -> int:
        """The network's parameter count (for the records; built once, when first asked)."""
        return sum(p.numel() for p in DDPMUNet(**self.unet_config).parameters())

    # -- bookkeeping ---------------------------------------------------------------------------

    def milestones(self) -> list[Milestone]:
        values = sorted({float(v) for v in (self.args.milestones or "").split(",") if v.strip()} | {self.args.budget})
        if values[0] <= 0 or values[-1] > self.args.budget:
            raise ValueError(f"--milestones must lie in (0, --budget {self.args.budget}], got {self.args.milestones}.")
        return [Milestone(v, self.args.budget_unit) for v in values]

    def run_dir(self, recipe: str) -> Path:
        """``runs/RECIPE-BUDGET``, with ``-seedN`` for seeds other than 0: repeats of a recipe at
        other seeds are runs of their own."""
        suffix = f"-seed{self.args.seed}" if self.args.seed else ""
        return self.work_dir / "runs" / f"{recipe}-{Milestone(self.args.budget, self.args.budget_unit).label}{suffix}"

    @staticmethod
    def read_state(run_dir: Path) -> dict[str, Any]:
        path = run_dir / "study_state.json"
        return json.loads(path.read_text()) if path.is_file() else {"trained": {}, "recorded": False}

    @staticmethod
    def write_state(run_dir: Path, state: dict[str, Any]) -> None:
        with atomic_path(run_dir / "study_state.json") as partial:
            partial.write_text(json.dumps(state, indent=2) + "\n")

    def check_settings(self, run_dir: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
        """A run folder holds one configuration: refuse to continue it with other options."""
        saved = state.setdefault("settings", settings)
        differences = [f"{k}: {saved.get(k)!r} there vs {v!r} now" for k, v in settings.items() if saved.get(k) != v]
        if differences:
            raise ValueError(
                f"{run_dir} holds a run with other options ({'; '.join(differences)}): pass another --work_dir, "
                "or delete that folder to start the recipe afresh."
            )

    # -- training ------------------------------------------------------------------------------

    def train_ours(self, recipe: str, run_dir: Path, milestones: list[Milestone], extra: list[str]) -> dict[str, dict]:
        """``train_ddpm.py`` with the recipe's options, in one run to the last milestone that
        snapshots the earlier ones (``--snapshot_minutes``/``--snapshot_steps``): no restart, so a
        compiled network is compiled once, as a user's run would be."""
        args, output = self.args, run_dir / "train"
        final, earlier = milestones[-1], [m.value for m in milestones[:-1]]
        options = [
            "--model", args.model, "--resolution", str(args.resolution), "--channels", "1",
            "--unet_overrides", args.unet_overrides or "{}", "--dataset_path", str(self.data["train"]),
            "--train_batch_size", str(args.batch_size), "--num_train_timesteps", str(args.num_train_timesteps),
            "--seed", str(args.seed), "--grid_inference_steps", str(min(100, args.num_train_timesteps)), *OUR_DEFAULTS, *extra,
            *[item for key, value in OUR_RECIPES[recipe].items() for item in (f"--{key}", value)],
            "--output_dir", str(output),
        ]  # fmt: skip
        if final.unit == "minutes":
            options += ["--max_train_minutes", str(final.value), "--max_train_steps", str(10**9)]
            options += ["--snapshot_minutes", *map(str, earlier)] if earlier else []
        else:
            options += ["--max_train_minutes", "none", "--max_train_steps", str(int(final.value))]
            options += ["--snapshot_steps", *(str(int(v)) for v in earlier)] if earlier else []
        remaining = self.piece.remaining_minutes()
        if remaining is not None:
            options += ["--stop_after_minutes", str(max(remaining, 1e-6))]
        options += ["--resume_from_checkpoint", "latest"]  # the piece before's checkpoint, or a start (a killed first try's snapshots go)
        result = train(TrainingConfig.from_args(options))
        self.piece.done()
        if not result.finished:
            raise PieceOver(f"training received {result.stopped_by}" if result.stopped_by else "")
        trained = {final.label: {"steps": result.global_step, "train_seconds": result.train_seconds, "pipeline": str(output)}}
        for milestone in milestones[:-1]:
            folder = output / milestone.snapshot
            taken = json.loads((folder / SNAPSHOT_SUMMARY_NAME).read_text())
            trained[milestone.label] = {"steps": taken["global_step"], "train_seconds": taken["train_seconds"], "pipeline": str(folder)}
        return trained

    def train_stock(self, run_dir: Path, milestones: list[Milestone]) -> dict[str, dict]:
        """diffusers' recipe (:class:`StockRecipe`) on the device-resident padded images, with the
        example's per-step loss read-back, in one run that saves a pipeline at each milestone: the
        EMA network with an equivalent :class:`DDPMTargetScheduler` (ε, linear), so the same
        sampler scores it."""
        args, output = self.args, run_dir / "train"
        output.mkdir(parents=True, exist_ok=True)
        dataset = DataSource.parse(str(self.data["train"])).load()
        levels = stack_images(TrainingImages(dataset, find_image_column(dataset), self.preprocess), self.device)
        images = levels_to_model_range(levels)
        steps_per_epoch = len(images) // args.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"The data set has {len(images)} images, fewer than one batch of {args.batch_size}.")
        recipe = StockRecipe(
            self.unet_config, self.device, num_training_steps=steps_per_epoch * STOCK_DEFAULTS["num_epochs"],
            num_train_timesteps=args.num_train_timesteps, seed=args.seed,
        )  # fmt: skip
        state_path = output / "stock_state.pt"
        progress: dict[str, Any] = {"step": 0, "train_seconds": 0.0, "losses": [], "saved": {}}
        if state_path.is_file():
            saved = torch.load(state_path, map_location=self.device, weights_only=False)
            recipe.load_state_dict(saved["recipe"])
            progress = saved["progress"]

        def save_state() -> None:
            with atomic_path(state_path) as partial:
                torch.save({"recipe": recipe.state_dict(), "progress": progress}, partial)

        def reached(milestone: Milestone) -> bool:
            if milestone.unit == "minutes":
                return progress["train_seconds"] >= 60 * milestone.value
            return progress["step"] >= milestone.value

        def save_reached() -> None:
            """A pipeline for each milestone just reached, and then the state (not more often: it
            is the whole optimizer; a crash loses at most one milestone's training)."""
            reached_now = [m for m in milestones if reached(m) and m.label not in progress["saved"]]
            for milestone in reached_now:
                folder = output / milestone.snapshot
                save_stock_pipeline(recipe, self.unet_config, folder)
                progress["saved"][milestone.label] = {"steps": progress["step"], "train_seconds": progress["train_seconds"],
                                                      "pipeline": str(folder)}  # fmt: skip
            if reached_now:
                save_state()

        order_epoch, order = -1, None
        while not reached(milestones[-1]):
            try:
                self.piece.check()
            except PieceOver:
                save_state()
                raise
            started = time.perf_counter()
            for _ in range(args.stock_check_every):
                epoch, index = divmod(progress["step"], steps_per_epoch)
                if epoch != order_epoch:
                    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(derive_seed(args.seed, epoch)))
                    order, order_epoch = order.to(self.device), epoch
                batch = images[order[index * args.batch_size : (index + 1) * args.batch_size]]
                step_seed = micro_batch_seed(args.seed, epoch, index)
                torch.manual_seed(step_seed)  # dropout: the same masks however the run is split
                loss = recipe.step(batch, torch.Generator(self.device).manual_seed(step_seed))
                progress["losses"].append(loss.item())  # the example logs loss.item() every step
                progress["step"] += 1
                if any(m.unit == "steps" and progress["step"] == m.value for m in milestones):
                    break
            progress["train_seconds"] += time.perf_counter() - started
            save_reached()
            self.piece.done()
        (output / "stock_recipe.json").write_text(json.dumps({**STOCK_DEFAULTS, "batch_size": args.batch_size}, indent=2) + "\n")
        save_loss_curve(range(1, len(progress["losses"]) + 1), progress["losses"], output / "loss_curve.png",
                        title="stock diffusers recipe")  # fmt: skip
        return progress["saved"]

    # -- evaluation ----------------------------------------------------------------------------

    def fill_samples(self, model: Path, samples: Path, steps: int) -> None:
        """Sample ``--num_samples`` images into the store, a batch per unit of work."""
        args = self.args
        pipeline = sampling_pipeline(str(model), self.device, self.fast_sampling)
        store = sample_store(samples, str(model), steps, args.seed, args.sample_batch_size, pipeline.unet.dtype,
                             noise_device=noise_device(self.device))
        while store.existing() < args.num_samples:
            self.piece.check()
            batch_end = (store.existing() // args.sample_batch_size + 1) * args.sample_batch_size
            store.fill(pipeline, min(args.num_samples, batch_end), show_progress=False)
            self.piece.done()
        del pipeline
        _free_device_memory()

    def score(self, model: Path | None, samples: Path, steps: int | None, output: Path) -> dict[str, Any]:
        """FID and KID of the samples against the training set (reference statistics cached)."""
        args = self.args
        if output.is_file():
            return json.loads(output.read_text())
        self.piece.check()
        options: dict[str, Any] = {
            "samples_dir" if model is not None else "samples": str(samples),
            "num_samples": args.num_samples, "metrics": "fid,kid", "reference": str(self.data["train"]),
            "batch_size": args.sample_batch_size, "seed": args.seed, "output": str(output),
            "inception_weights": args.inception_weights, "feature_extractor": args.feature_extractor,
            "cache_dir": str(self.cache_dir), "device": str(self.device), "fast_sampling": self.fast_sampling,
        }  # fmt: skip
        if model is not None:
            options.update(model=str(model), num_inference_steps=steps)
        else:
            options.update(resolution=args.resolution, channels=1, resize_mode="auto")
        report = evaluate(**options)
        self.piece.done()
        return report

    def bits_per_dim(self, model: Path, run_dir: Path) -> dict[str, Any]:
        """bits/dim of the test images (``--bpd_num_images``; all by default; per dimension of the images
        themselves, ``bpd_canvas`` per dimension of the padded canvas) with eval_metrics.py's
        own estimator (:func:`~ddpm_pipeline.evaluation.bound_over_data`), a batch per unit of work:
        each batch's terms are kept in ``bpd_partial/`` as it is done, so pieces resume."""
        args = self.args
        done_path = run_dir / "bpd.json"
        if done_path.is_file():
            return json.loads(done_path.read_text())
        source = DataSource.parse(str(self.data["test"]))
        store = bound_store(run_dir / "bpd_partial", str(model), source, self.preprocess, args.bpd_num_images,
                            args.bpd_timesteps, args.bpd_batch_size, args.seed)  # fmt: skip
        pipeline = DDPMTargetPipeline.from_pretrained(model).to(self.device)
        bound = bound_over_data(pipeline, source, self.preprocess, args.bpd_num_images, args.bpd_timesteps,
                                args.bpd_batch_size, args.seed, self.device, store=store,
                                before_batch=self.piece.next_unit)  # fmt: skip
        result = {
            "bpd": bound["bits_per_dim"],
            "bpd_stderr": bound["bits_per_dim_stderr"],
            "bpd_num_images": bound["num_images"],
            "bpd_timesteps": bound["timesteps"],
            "bpd_terms": {"prior": bound["prior_term"], "diffusion": bound["diffusion_terms"], "decoder": bound["decoder_term"]},
            # per dimension of the 28×28 images (above); per dimension of the 32×32 canvas they are padded onto:
            "bpd_canvas": bound.get("canvas_bits_per_dim", bound["bits_per_dim"]),
        }
        with atomic_path(done_path) as partial:  # its presence means "done": never a half-written one
            partial.write_text(json.dumps(result, indent=2) + "\n")
        store.remove()
        del pipeline
        _free_device_memory()
        return result

    # -- commands ------------------------------------------------------------------------------

    def run(self, recipe: str, extra: list[str]) -> list[dict[str, Any]]:
        """Train to each milestone, score each snapshot with each sampler, bits/dim of the last;
        append the records (once) and return them."""
        args = self.args
        if recipe == STOCK and extra:
            raise ValueError(f"Options {extra} are train_ddpm.py options for our recipes; the stock recipe takes none.")
        run_dir = self.run_dir(recipe)
        state = self.read_state(run_dir)
        settings = {"recipe": recipe, "model": args.model, "unet_overrides": args.unet_overrides,
                    "train_images": args.train_images, "resolution": args.resolution,
                    "num_train_timesteps": args.num_train_timesteps, "batch_size": args.batch_size,
                    "seed": args.seed, "budget": args.budget, "budget_unit": args.budget_unit,
                    "train_options": extra, "num_samples": args.num_samples,
                    "sample_batch_size": args.sample_batch_size, "bpd_num_images": args.bpd_num_images,
                    "bpd_timesteps": args.bpd_timesteps, "bpd_batch_size": args.bpd_batch_size,
                    "milestones": [m.value for m in self.milestones()]}  # fmt: skip
        self.check_settings(run_dir, state, settings)
        self.write_state(run_dir, state)
        if state["recorded"]:
            print(f"{recipe}: already done and recorded in {state['recorded']}")
            return []
        milestones = self.milestones()
        if not state["trained"]:
            self.piece.check()
            try:
                trained = self.train_stock(run_dir, milestones) if recipe == STOCK else self.train_ours(recipe, run_dir, milestones, extra)
            finally:
                _free_device_memory()  # the trainer's network, optimizer and data set
            for milestone in milestones:  # each scored model in a folder of its own
                source, model = Path(trained[milestone.label]["pipeline"]), run_dir / f"model-{milestone.label}"
                shutil.rmtree(model, ignore_errors=True)
                shutil.copytree(source, model, ignore=shutil.ignore_patterns("checkpoint-*", "snapshot-*", "logs", "*.pt", ".*"))
                state["trained"][milestone.label] = {**trained[milestone.label], "pipeline": str(model)}
            self.write_state(run_dir, state)
        if args.train_only:
            print(f"{recipe}: trained to {milestones[-1].label}; the same command without --train_only scores it")
            return []
        scores: dict[tuple[str, int], dict[str, Any]] = {}
        for milestone in milestones:
            snapshot = Path(state["trained"][milestone.label]["pipeline"])
            for steps in self.sampler_steps():
                samples = run_dir / f"samples-{milestone.label}-{steps}steps"
                self.fill_samples(snapshot, samples, steps)
                scores[milestone.label, steps] = self.score(snapshot, samples, steps, run_dir / f"eval-{milestone.label}-{steps}steps.json")
        final = milestones[-1]
        bpd = self.bits_per_dim(Path(state["trained"][final.label]["pipeline"]), run_dir) if args.bpd else None
        records = [self.record(recipe, milestone, steps, state, scores[milestone.label, steps],
                               bpd if milestone == final else None, extra)
                   for milestone in milestones for steps in self.sampler_steps()]  # fmt: skip
        append_json_lines(self.results, records)
        state["recorded"] = str(self.results)
        self.write_state(run_dir, state)
        return records

    def floor(self) -> dict[str, Any]:
        """The real-data floor: FID/KID of the first ``--num_samples`` test images (preprocessed as
        the training images are) against the training set's statistics."""
        args = self.args
        folder = self.work_dir / f"floor-test-{args.num_samples}"
        if not (folder / f"{args.num_samples - 1:06d}.png").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            test = DataSource.parse(str(self.data["test"])).load()
            column = find_image_column(test)
            if len(test) < args.num_samples:
                raise ValueError(f"The test split has {len(test)} images, fewer than --num_samples {args.num_samples}.")
            for index, image in enumerate(test.select(range(args.num_samples))[column]):
                self.preprocess.to_pil(image).save(folder / f"{index:06d}.png")
        reference = self.data["train"].name  # "train", or a pilot's "train-first-N"
        report = self.score(None, folder, None, self.work_dir / f"floor-{args.num_samples}-vs-{reference}.json")
        record = {
            **self.common_fields(), "recipe": "real data", "description": f"{args.num_samples} test images",
            "num_samples": report["num_samples"], "fid": report["metrics"]["fid"],
            "kid_mean": report["metrics"].get("kid_mean"), "kid_std": report["metrics"].get("kid_std"),
            **self.scoring_fields(report),
        }  # fmt: skip
        append_json_lines(self.results, [record])
        return record

    # -- records ------------------------------------------------------------------------------

    def sampler_steps(self) -> list[int]:
        return [int(v) for v in self.args.sampler_steps.split(",") if v.strip()]

    def common_fields(self) -> dict[str, Any]:
        args = self.args
        return {
            "study": STUDY, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_description(self.device), "command": self.command, "versions": package_versions(),
            "network": {"model": args.model, "unet_overrides": args.unet_overrides, "parameters": self.parameters},
            "resolution": args.resolution, "num_train_timesteps": args.num_train_timesteps, "seed": args.seed,
        }  # fmt: skip

    @staticmethod
    def scoring_fields(report: dict[str, Any]) -> dict[str, Any]:
        """What a score was measured against and with, from its evaluation report."""
        return {"reference": report.get("reference"), "feature_extractor": report.get("feature_extractor"),
                "eval_report": report["options"]["output"], "grid": report.get("grid")}  # fmt: skip

    def record(self, recipe: str, milestone: Milestone, steps: int, state: dict[str, Any], report: dict[str, Any],
               bpd: dict[str, Any] | None, extra: list[str]) -> dict[str, Any]:  # fmt: skip
        args, trained = self.args, state["trained"][milestone.label]
        metrics = report["metrics"]
        stock = {"prediction_type": STOCK_DEFAULTS["prediction_type"], "beta_schedule": STOCK_DEFAULTS["beta_schedule"],
                 "loss_weighting": "simple"}  # fmt: skip
        options = OUR_RECIPES.get(recipe, stock)
        return {
            **self.common_fields(), "recipe": recipe, "trainer": "stock diffusers" if recipe == STOCK else "ddpm_pipeline",
            **options, "train_options": extra, "batch_size": args.batch_size,
            "budget": milestone.value, "budget_unit": milestone.unit, "final": milestone.value == args.budget,
            "train_minutes": trained["train_seconds"] / 60, "steps": trained["steps"],
            "images_seen": trained["steps"] * args.batch_size,
            "sampler_steps": steps, "num_samples": report["num_samples"],
            "fid": metrics["fid"], "kid_mean": metrics.get("kid_mean"), "kid_std": metrics.get("kid_std"),
            **(bpd or {}), **self.scoring_fields(report),
        }  # fmt: skip


def stock_sampling_scheduler(recipe: StockRecipe) -> DDPMTargetScheduler:
    """Our scheduler with the stock recipe's noise schedule (ε target): diffusers' "linear" is
    ``linspace(β_1, β_T, T)`` for any T, ours is scaled by 1000/T, so the two agree at T = 1000 and
    the betas are given explicitly otherwise."""
    config = recipe.noise_scheduler.config
    if config.num_train_timesteps == 1000:
        return DDPMTargetScheduler(num_train_timesteps=1000, beta_start=config.beta_start, beta_end=config.beta_end,
                                   beta_schedule="linear", prediction_type="epsilon")  # fmt: skip
    betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
    return DDPMTargetScheduler(num_train_timesteps=config.num_train_timesteps, trained_betas=betas.tolist(),
                               prediction_type="epsilon")  # fmt: skip


def save_stock_pipeline(recipe: StockRecipe, unet_config: dict[str, Any], folder: Path) -> None:
    """The stock recipe's EMA network as a pipeline folder our sampler and evaluation read."""
    pipeline = DDPMTargetPipeline(unet=DDPMUNet(**unet_config), scheduler=stock_sampling_scheduler(recipe))
    pipeline.unet.load_state_dict(recipe.ema_unet().state_dict())
    with atomic_path(folder) as staging:
        pipeline.save_pretrained(staging)


def read_records(paths: list[Path], missing_ok: bool = False) -> list[dict[str, Any]]:
    """The study's records in the JSON lines files ``paths`` (with ``missing_ok``, a file that does
    not exist yet holds none)."""
    records = []
    for path in paths:
        if missing_ok and not Path(path).is_file():
            continue
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("study") == STUDY:
                    records.append(record)
    return records


def next_recipe(records: list[dict[str, Any]], seed: int = 0, budget: float = 5.0, budget_unit: str = "minutes") -> str | None:
    """The first recipe of :data:`STUDY_ORDER` with no final record at this seed and budget in
    ``records`` (None when every one has one)."""
    done = {r["recipe"] for r in records
            if r.get("final") and r.get("seed", 0) == seed and r.get("budget") == budget and r.get("budget_unit") == budget_unit}  # fmt: skip
    return next((recipe for recipe in STUDY_ORDER if recipe not in done), None)


def _record_key(record: dict[str, Any]) -> str:
    fields = ("recipe", "description", "seed", "budget", "budget_unit", "sampler_steps", "date")
    return json.dumps([record.get(name) for name in fields])


def collect(archive: Path, into: Path = COLLECTED) -> list[dict[str, Any]]:
    """Add a device session's ``quality.tgz`` (``quality_session.sh``'s) to the records kept in the
    repository: its records that ``into/records.jsonl`` lacks are appended, with their grids and
    evaluation reports copied under ``into`` (and the paths in the records pointing there), its
    other files (bits/dim, loss curves, study states) beside them and its log in ``into/logs/``;
    then the report of every record so far is written to ``into/study.md``, with the plot and the
    grids. Returns the records added."""
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        extracted = Path(folder)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(extracted, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: no filters; the archive is one of ours
                tar.extractall(extracted)  # noqa: S202
        if not (extracted / "results.jsonl").is_file():
            raise FileNotFoundError(f"{archive} holds no results.jsonl: did the session's study commands run (its session.log says)?")
        files = [path.relative_to(extracted) for path in sorted(extracted.rglob("*")) if path.is_file()]
        kept = [rel for rel in files if rel.parts[0] == "runs" or rel.name.startswith("floor-")]

        def moved(path: str | None) -> str | None:
            """Where a file a record names (by its path on the device) lies under ``into``."""
            if path is None:
                return None
            match = next((rel for rel in kept if path == str(rel) or path.endswith("/" + str(rel))), None)
            return str(into / match) if match else path

        existing = {_record_key(r) for r in read_records([into / "records.jsonl"], missing_ok=True)}
        added = []
        for record in read_records([extracted / "results.jsonl"]):
            if _record_key(record) not in existing:
                added.append({**record, "grid": moved(record.get("grid")), "eval_report": moved(record.get("eval_report"))})
        for rel in kept:
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(extracted / rel, into / rel)
        if (extracted / "session.log").is_file():
            (into / "logs").mkdir(exist_ok=True)
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            shutil.copy2(extracted / "session.log", into / "logs" / f"session-{stamp}.log")
    append_json_lines(into / "records.jsonl", added)
    text = report(read_records([into / "records.jsonl"], missing_ok=True), plot=into / "fid_vs_minutes.png",
                  grids=into / "sample_grids.png")  # fmt: skip
    (into / "study.md").write_text(text + "\n")
    return added


def _spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cell(values: list[float], digits: int) -> str:
    """One value (or several equal ones) as is; several (one per seed) as ``mean ± std``."""
    mean, std = _spread(values)
    return f"{mean:.{digits}f}" if not std else f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(
    records: list[dict[str, Any]], primary_steps: int | None = None, plot: Path | None = None, grids: Path | None = None
) -> str:
    """A Markdown table of the final records (best mean FID at the primary sampler first; a recipe
    run at several seeds shows ``mean ± std`` over them), the best recipe against the stock one,
    the best two compared seed by seed where they share seeds, (with ``plot``) FID against training
    minutes for the best two, and (with ``grids``) every recipe's sample grid at the primary
    sampler (its lowest seed) beside the floor's."""
    floor = list({r["description"]: r for r in records if r["recipe"] == "real data"}.values())  # the latest of each
    runs = [r for r in records if r["recipe"] != "real data"]
    if not runs:
        return "No study records yet."
    steps_all = sorted({r["sampler_steps"] for r in runs}, reverse=True)
    primary = primary_steps or steps_all[0]
    final: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in runs:  # the latest record of each (recipe, sampler, seed) at its final budget
        if r.get("final"):
            final.setdefault((r["recipe"], r["sampler_steps"]), {})[r.get("seed", 0)] = r

    def values(name: str, steps: int, key: str) -> list[float]:
        return [r[key] for _, r in sorted(final.get((name, steps), {}).items()) if r.get(key) is not None]

    def mean_fid(name: str, steps: int) -> float:
        return _spread(values(name, steps, "fid"))[0] if (name, steps) in final else math.inf

    recipes = sorted({recipe for recipe, _ in final}, key=lambda name: mean_fid(name, primary))
    header = ["recipe", "target", "schedule", "weighting", "seeds", "steps", "train min"]
    count = next(r["num_samples"] for r in runs if r.get("final"))
    fid_name = f"FID-{count / 1000:g}k" if count >= 1000 else f"FID-{count}"
    header += [f"{fid_name} @{s}" for s in steps_all]
    header += [f"KID×10³ @{primary}", "bits/dim"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in recipes:
        by_seed = next(final[name, s] for s in steps_all if (name, s) in final)
        first = by_seed[min(by_seed)]
        cells = [name, first["prediction_type"], first["beta_schedule"], first["loss_weighting"],
                 ", ".join(str(seed) for seed in sorted(by_seed)), _cell([r["steps"] for r in by_seed.values()], 0),
                 _cell([r["train_minutes"] for r in by_seed.values()], 2)]  # fmt: skip
        cells += [_cell(values(name, s, "fid"), 2) if (name, s) in final else "–" for s in steps_all]
        kids = [kid * 1e3 for kid in values(name, primary, "kid_mean")]
        cells += [_cell(kids, 2) if kids else "–"]
        bpds = [r["bpd"] for r in by_seed.values() if r.get("bpd") is not None]
        if len(bpds) == 1 and first.get("bpd_stderr"):
            cells += [f"{bpds[0]:.3f} ± {first['bpd_stderr']:.3f}"]
        else:
            cells += [_cell(bpds, 3) if bpds else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    first_fid = header.index(f"{fid_name} @{steps_all[0]}")
    for r in floor:
        cells = [f"real data ({r['description']})"] + [""] * (first_fid - 1) + [f"{r['fid']:.2f}"] + [""] * (len(header) - first_fid - 1)
        lines.append(("| " + " | ".join(cells) + " |").replace("  ", " "))
    if any(len(by_seed) > 1 for by_seed in final.values()):
        lines.append("\nWhere a recipe ran at several seeds, its cells are the mean ± the standard deviation over them "
                     "(for one seed, bits/dim shows ± its standard error over test images).")  # fmt: skip
    best = next((name for name in recipes if name != STOCK and (name, primary) in final), None)
    if best and (STOCK, primary) in final:
        ours, stock = mean_fid(best, primary), mean_fid(STOCK, primary)
        lines.append(f"\nBest recipe {best}: FID {ours:.2f} vs stock diffusers {stock:.2f} at {primary} sampling steps "
                     f"(ratio {ours / stock:.2f}; the target is ≤ 0.5).")  # fmt: skip
    leaders = [name for name in recipes if (name, primary) in final][:2]
    if len(leaders) == 2:
        shared = sorted(set(final[leaders[0], primary]) & set(final[leaders[1], primary]))
        if len(shared) > 1:
            gaps = [final[leaders[0], primary][seed]["fid"] - final[leaders[1], primary][seed]["fid"] for seed in shared]
            wins = sum(gap < 0 for gap in gaps)
            lines.append(f"\nSeed by seed ({', '.join(map(str, shared))}), {leaders[0]} minus {leaders[1]} at {primary} "
                         f"sampling steps: FID {', '.join(f'{gap:+.2f}' for gap in gaps)} (mean {np.mean(gaps):+.2f}); "
                         f"{leaders[0]} is better at {wins} of {len(shared)} seeds.")  # fmt: skip
    if plot is not None:
        series = {}
        for name in leaders:
            by_budget: dict[float, list[tuple[float, float]]] = {}
            for r in runs:  # the mean over seeds at each budget
                if r["recipe"] == name and r["sampler_steps"] == primary:
                    by_budget.setdefault(r["budget"] if "budget" in r else r["train_minutes"], []).append((r["train_minutes"], r["fid"]))
            points = sorted((float(np.mean([m for m, _ in p])), float(np.mean([f for _, f in p]))) for p in by_budget.values())
            series[name] = ([p[0] for p in points], [p[1] for p in points])
        save_metric_curves(series, plot, "training minutes", f"FID ({primary} sampling steps)",
                           title="Fashion-MNIST: FID against training time",
                           floor=floor[-1]["fid"] if floor else None, floor_label="real test images")  # fmt: skip
        lines.append(f"\n![FID against training minutes]({plot})")
    if grids is not None:
        shown = {name: final[name, primary][min(final[name, primary])] for name in recipes if (name, primary) in final}
        panels = [(f"{name}: FID {r['fid']:.1f}", r["grid"]) for name, r in shown.items() if r.get("grid")]
        panels += [(f"real data: FID {r['fid']:.1f}", r["grid"]) for r in floor[-1:] if r.get("grid")]
        if panels:
            save_labelled_images(panels, grids, columns=4)
            lines.append(f"\n![samples of each recipe ({primary} sampling steps)]({grids})")
        else:
            lines.append(f"\n(No sample grids in these records: {grids} not written.)")
    return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------------


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()  # compiled graphs hold the previous network's buffers
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", allow_abbrev=False, help="train and score one recipe (other options go to train_ddpm.py)")
    run.add_argument("recipe", choices=RECIPES)
    floor = commands.add_parser("floor", allow_abbrev=False, help="FID/KID of real test images against the training statistics")
    for sub in (run, floor):
        sub.add_argument("--work_dir", default="runs/quality-fmnist", help="data sets, runs, samples and scores")
        sub.add_argument("--data_dir", help=f"folder of the Fashion-MNIST IDX files (default: {' or '.join(DEFAULT_DATA)})")
        sub.add_argument("--results", help="JSON lines file to append to (default: <work_dir>/results.jsonl)")
        sub.add_argument("--train_images", type=int,
                         help="train on (and take FID statistics of) only the first N training images: a pilot")
        sub.add_argument("--model", default="ddpm-cifar10-32", help="UNet preset (one channel, --resolution)")
        sub.add_argument("--unet_overrides", default=json.dumps({"block_out_channels": HALF_WIDTH}),
                         help="JSON of UNet2DModel options over the preset ('{}' = the full 35.7M-parameter network)")  # fmt: skip
        sub.add_argument("--resolution", type=int, default=32, help="28×28 images are zero-padded to this")
        sub.add_argument("--num_train_timesteps", type=int, default=1000)
        sub.add_argument("--batch_size", type=int, default=128, help="training batch (both trainers)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--budget", type=float, default=5.0, help="training budget in --budget_unit")
        sub.add_argument("--budget_unit", choices=("minutes", "steps"), default="minutes")
        sub.add_argument("--milestones", help="comma-separated earlier budgets to score as well (FID vs minutes)")
        sub.add_argument("--sampler_steps", default="1000,250,100", help="comma-separated sampling steps")
        sub.add_argument("--num_samples", type=int, default=5000)
        sub.add_argument("--sample_batch_size", type=int, default=500)
        sub.add_argument("--fast_sampling", action=argparse.BooleanOptionalAction, default=True,
                         help="the pipeline's fast path on CUDA (bf16 for ε/x0, channels_last, compile)")  # fmt: skip
        sub.add_argument("--bpd", action=argparse.BooleanOptionalAction, default=True, help="bits/dim of the test set")
        sub.add_argument("--bpd_num_images", type=optional(int), default=None, help="test images for bits/dim (none = all)")
        sub.add_argument("--bpd_timesteps", type=optional(int), default=50,
                         help="timesteps per image (unbiased estimate); none = all T (exact, T evaluations per image)")  # fmt: skip
        sub.add_argument("--bpd_batch_size", type=int, default=500)
        sub.add_argument("--inception_weights", help="torch-fidelity-format Inception weights (DESIGN.md §4)")
        sub.add_argument("--feature_extractor", help="a torch-fidelity feature extractor name (default: InceptionV3)")
        sub.add_argument("--cache_dir", help="reference statistics cache (default: <work_dir>/cache)")
        sub.add_argument("--device", help="cuda or cpu (default: cuda when available)")
        sub.add_argument("--stock_check_every", type=int, default=25, help="stock recipe: steps between budget checks")
        sub.add_argument("--stop_after_minutes", type=float, help="end this command after about this long (exit 3)")
    run.add_argument("--train_only", action="store_true", help="stop after training (score in a later command)")
    nxt = commands.add_parser("next", allow_abbrev=False,
                              help="print the study's next recipe that the records lack (nothing when every one is recorded); "
                                   "run's other options are ignored")  # fmt: skip
    nxt.add_argument("--records", nargs="+", default=[str(COLLECTED / "records.jsonl")], help="JSON lines files (missing ones hold none)")
    nxt.add_argument("--seed", type=int, default=0)
    nxt.add_argument("--budget", type=float, default=5.0)
    nxt.add_argument("--budget_unit", choices=("minutes", "steps"), default="minutes")
    col = commands.add_parser("collect", help="add a device session's quality.tgz to the records kept in the repository")
    col.add_argument("archive", type=Path, help="quality_session.sh's $OUT/quality.tgz")
    col.add_argument("--into", type=Path, default=COLLECTED, help="the kept records, their files and the report")
    rep = commands.add_parser("report", help="Markdown table and FID-vs-minutes plot from the records")
    rep.add_argument("--results", nargs="+", default=["runs/quality-fmnist/results.jsonl"])
    rep.add_argument("--primary_steps", type=int, help="sampler for the ranking and the plot (default: the most steps)")
    rep.add_argument("--markdown", type=Path, help="write the table here too")
    rep.add_argument("--plot", type=Path, help="FID against training minutes for the best two recipes (PNG)")
    rep.add_argument("--grids", type=Path, help="each recipe's sample grid, titled with its FID, and the floor's (PNG)")
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Run one command; exits with status 3 when ``--stop_after_minutes`` ended it early."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "report":
        if extra:
            parser.error(f"unknown options {extra}")
        missing = [str(path) for path in args.results if not Path(path).is_file()]
        if missing:
            parser.error(f"no records at {', '.join(missing)}: run a recipe (or the floor) first, or pass --results")
        text = report(read_records(args.results), args.primary_steps, args.plot, args.grids)
        if args.markdown:
            args.markdown.write_text(text + "\n")
        print(text)
        return text
    if args.command == "next":  # run's options (QUALITY_OPTIONS) may come along: only seed and budget matter
        recipe = next_recipe(read_records(args.records, missing_ok=True), args.seed, args.budget, args.budget_unit)
        print(recipe or "")
        return recipe
    if args.command == "collect":
        if extra:
            parser.error(f"unknown options {extra}")
        added = collect(args.archive, args.into)
        print(f"added {len(added)} record(s) to {args.into / 'records.jsonl'}; report in {args.into / 'study.md'}")
        return added
    if args.command == "floor" and extra:
        parser.error(f"unknown options {extra}")
    given = list(argv) if argv is not None else sys.argv[1:]
    study = Study(args, command="python benchmarks/quality_fmnist.py " + shlex.join(given))
    try:
        result = study.run(args.recipe, extra) if args.command == "run" else study.floor()
    except PieceOver as stop:
        reason = str(stop) or f"stopped after --stop_after_minutes {args.stop_after_minutes}"
        print(f"{reason}; run the same command again to continue")
        raise SystemExit(PIECE_OVER_EXIT) from None
    for record in result if isinstance(result, list) else [result]:
        print(json.dumps({k: record.get(k) for k in ("recipe", "budget", "steps", "sampler_steps", "fid", "kid_mean", "bpd")}))
    return result


if __name__ == "__main__":
    main()
