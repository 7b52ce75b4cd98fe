"""`EvaluationConfig`: the options of ``eval_metrics.py`` and :func:`~ddpm_pipeline.evaluation.evaluate`.

Kept apart from :mod:`~ddpm_pipeline.evaluation`, whose imports (torch, torch-fidelity, diffusers)
take seconds, so that ``--help`` and a bad option are answered at once. The checks that need those
modules (:meth:`EvaluationConfig.validate`) import them when the work begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .commands import program_name
from .option_values import sampling_option
from .training_config import dataclass_parser, split_problems, take_python_values

#: Images per sampling and feature batch when no --batch_size is given and no samples are there.
DEFAULT_BATCH_SIZE = 256
#: The settings a run trained on a CPU suggests, and a long evaluation on a CPU: the README's protocol
#: for the main job (11 to 14 minutes on the 2-core reference machine), where the defaults would sample for days.
QUICK_CPU_SETTINGS = {"num_samples": 1000, "num_inference_steps": 100, "reference_max_images": 1000,
                      "bpd_num_images": 500, "bpd_timesteps": 20}  # fmt: skip
#: :data:`QUICK_CPU_SETTINGS` as ``eval_metrics.py`` options.
QUICK_CPU_EVALUATION = "--metrics fid,kid,bpd " + " ".join(f"--{name} {value}" for name, value in QUICK_CPU_SETTINGS.items())


@dataclass
class EvaluationConfig:
    """Options of :func:`~ddpm_pipeline.evaluation.evaluate` and ``eval_metrics.py`` (one field per
    command-line flag)."""

    model: str | None = field(default=None, metadata={"help": "Pipeline folder or Hub id to sample from."})
    samples: str | None = field(default=None, metadata={"help": "Score these images instead of sampling a model: a folder of image files, or an .npz whose arr_0 holds them as uint8 [N, H, W, C] (sample_ddpm.py --npz; guided-diffusion's format)."})  # noqa: E501
    snapshots: bool = field(default=False, metadata={"help": "With --model a train_ddpm.py --output_dir: score each snapshot-* pipeline the run saved (--snapshot_minutes / --snapshot_steps) and its final one, each into <output stem>-<name>.json, and plot the scores against the training steps and minutes (<output stem>-curve.png); --output gets the summary."})  # noqa: E501
    reference: str | None = field(default=None, metadata={"help": "Reference data: 'bundled', a saved data set or image folder, a Hub data set name, or a .npz statistics file (default: the data the --model was trained on, from its training_config.json)."})  # noqa: E501
    reference_split: str | None = field(default=None, metadata={"help": "Split of a saved / Hub / image-folder reference, as datasets reads it: a name, a slice (train[:5000]) or a sum (train+test) (default: the training run's --split for its own data, else train)."})  # noqa: E501
    reference_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub reference data set (default: the training run's, for its own data)."})  # noqa: E501
    reference_max_images: int | None = field(default=None, metadata={"help": "Use only N reference images, spread evenly over the split (not its first N, which may be of one class; none = all)."})  # noqa: E501
    metrics: str = field(default="fid,kid,prc", metadata={"help": "Comma-separated: fid, isc, kid, prc, bpd."})
    num_samples: int = field(default=50000, metadata={"help": "Samples to generate and score."})
    num_inference_steps: int = field(default=1000, metadata={"help": "Sampling steps (fewer = respaced chain)."})
    scheduler: str = sampling_option("scheduler")
    eta: float = sampling_option("eta")
    timestep_spacing: str | None = sampling_option("timestep_spacing")
    batch_size: int | None = field(default=None, metadata={"help": f"Images per sampling / feature batch (default: with --model, the batch size of the samples already in the samples folder, else {DEFAULT_BATCH_SIZE}, on a CPU at most --num_samples). Sample i depends on the seed and the batch size."})  # noqa: E501
    fast_sampling: str = sampling_option("fast_sampling")
    compile_unet: bool | None = sampling_option("compile_unet")
    sampling_dtype: str = sampling_option("sampling_dtype")
    seed: int = field(default=0, metadata={"help": "Sampling seed (image i is the same for any --num_samples at the same --batch_size)."})
    output: str = field(default="results.json", metadata={"help": "The JSON report; the grid and plots are written beside it."})
    samples_dir: str | None = field(default=None, metadata={"help": "Where samples are written and reused (default: <output stem>-samples/; with --snapshots, a subfolder per pipeline)."})
    inception_weights: str | None = field(default=None, metadata={"help": "torch-fidelity-format Inception weights (default: torch-fidelity downloads them)."})  # noqa: E501
    feature_extractor: str | None = field(default=None, metadata={"help": "A torch-fidelity feature extractor name (default: InceptionV3 for the weights)."})  # noqa: E501
    resolution: int | None = field(default=None, metadata={"help": "Reference resolution when scoring --samples (default: the samples' size)."})
    channels: int | None = field(default=None, metadata={"help": "Reference channels when scoring --samples (default: the samples' mode)."})
    resize_mode: str | None = field(default=None, metadata={"help": "Reference resize mode (default: the model's training_config.json, else auto)."})
    kid_subsets: int = field(default=100, metadata={"help": "KID: random subsets."})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID: subset size (capped at the sample count)."})
    isc_splits: int = field(default=10, metadata={"help": "Inception Score: splits (mean and std over them)."})
    image_column: str | None = field(default=None, metadata={"help": "The column holding the images in the --reference and --bpd_data data sets (default: the training run's --image_column for its own data, else image, img, the one Image column, or the one column of image bytes or arrays)."})  # noqa: E501
    bpd_data: str | None = field(default=None, metadata={"help": "Data for bits/dim (default: --reference), same forms as --reference."})
    bpd_split: str | None = field(default=None, metadata={"help": "Split for bits/dim data (default: with --reference left to the model's training data, the images its run held out, its --validation_split, where it had one; else --reference_split)."})  # noqa: E501
    bpd_held_out: str | None = field(default=None, metadata={"help": "Measure bits/dim on only the images of --bpd_split that train_ddpm.py --validation_split SHARE holds out at random (0.05, 5%, 500) (default: with --reference left to the model's training data, the share its run held out at random, where it did)."})  # noqa: E501
    bpd_num_images: int | None = field(default=1000, metadata={"help": "Images to average bits/dim over, spread evenly over the split (none = all)."})
    bpd_timesteps: int | None = field(default=None, metadata={"help": "Timesteps per image for bits/dim (none = every t, exact; K = an unbiased estimate from one timestep in each of K log-spaced strata)."})  # noqa: E501
    bpd_batch_size: int = field(default=64, metadata={"help": "Images per bits/dim batch."})
    cache_dir: str | None = field(default=None, metadata={"help": "Reference statistics cache (default: ~/.cache/ddpm_pipeline)."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})

    def metric_list(self) -> list[str]:
        """``--metrics`` as a list of known metric names."""
        from .metrics import parse_metrics

        return parse_metrics(self.metrics)

    def __post_init__(self) -> None:
        # from Python: paths and numbers as the command line gives them (a `Path` as its text)
        take_python_values(self, numbers_as_text=("bpd_held_out",))

    def validate(self) -> None:
        """Clear errors before any work."""
        from .hold_out import held_out_amount
        from .metrics import PRC_NEIGHBORHOOD, REFERENCE_METRICS, fewest_images
        from .preflight import refuse_pipeline_folder
        from .sampling import check_sampling_options

        metrics = self.metric_list()
        if (self.model is None) == (self.samples is None):
            raise ValueError("Give exactly one of --model (a pipeline to sample) and --samples (a folder of images or an .npz).")
        if self.snapshots and self.model is None:
            raise ValueError("--snapshots scores the pipelines a training run saved: give --model, that run's --output_dir.")
        if "bpd" in metrics and self.model is None:
            raise ValueError("bits/dim (bpd) needs --model: --samples, images alone, have no likelihood.")
        fewest = fewest_images(metrics)
        why = f" (precision/recall compares each image with its {PRC_NEIGHBORHOOD} nearest neighbours)" if fewest > 2 else ""
        if self.num_samples < fewest:
            raise ValueError(f"--num_samples must be at least {fewest}{why}, got {self.num_samples}.")
        if self.reference_max_images is not None and self.reference_max_images < fewest and set(metrics) & set(REFERENCE_METRICS):
            raise ValueError(f"--reference_max_images must be at least {fewest}{why}, got {self.reference_max_images}.")
        if not str(self.output).strip():
            raise ValueError("--output is empty: name the JSON report to write (e.g. results.json).")
        if Path(self.output).is_dir():
            raise ValueError(f"--output {self.output} is a folder: name the JSON report to write, e.g. "
                             f"{Path(self.output) / 'results.json'} (a report never replaces a folder).")  # fmt: skip
        if self.seed < 0:
            raise ValueError(f"--seed must be ≥ 0, got {self.seed}.")
        if self.num_inference_steps < 1:
            raise ValueError(f"--num_inference_steps must be positive, got {self.num_inference_steps}.")
        for name in ("batch_size", "bpd_batch_size", "kid_subsets", "isc_splits", "bpd_num_images", "reference_max_images",
                     "resolution"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be positive, got {value}.")
        if self.kid_subset_size < 2:
            raise ValueError(f"--kid_subset_size must be at least 2, got {self.kid_subset_size}.")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")
        if self.samples_dir:
            refuse_pipeline_folder(self.samples_dir, "--samples_dir", harm="")
        if self.bpd_timesteps is not None and self.bpd_timesteps < 1:
            raise ValueError("--bpd_timesteps must be positive (or none for every timestep).")
        for option in ("reference_split", "bpd_split"):
            if getattr(self, option) is not None:
                problems = split_problems(getattr(self, option), f"--{option}")
                if problems:
                    raise ValueError(problems[0])
        if self.bpd_held_out is not None:
            if "bpd" not in metrics:
                raise ValueError("--bpd_held_out picks the images of the bits/dim: add bpd to --metrics, or drop it.")
            try:
                amount = held_out_amount(self.bpd_held_out)
            except ValueError:  # its message names --validation_split
                amount = None
            if amount is None:
                raise ValueError(f"--bpd_held_out {self.bpd_held_out!r} is not a share between 0 and 1 (0.05, 5%) or a count "
                                 "of at least 1 (500): give the --validation_split of the training run whose held-out "
                                 "images to measure.")  # fmt: skip
        check_sampling_options(self)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> EvaluationConfig:
        """The options of the ``eval_metrics.py`` command line (``argv``, default: ``sys.argv[1:]``)."""
        parser = dataclass_parser(cls, program_name("eval_metrics.py"),
                                  "Score a DDPM pipeline (or images) with torch-fidelity and the variational bound.")  # fmt: skip
        return cls(**vars(parser.parse_args(argv)))
