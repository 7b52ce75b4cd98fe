"""`SampleConfig`: the options of ``sample_ddpm.py`` and :func:`~ddpm_pipeline.generation.generate_samples`.

Kept apart from :mod:`~ddpm_pipeline.generation`, whose imports (torch, diffusers) take seconds, so
that ``--help`` and a bad option are answered at once. The checks that need those modules
(:meth:`SampleConfig.validate`) import them when the work begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .commands import program_name
from .option_values import sampling_option
from .training_config import dataclass_parser, take_python_values

#: Images per sampling batch in a new folder when no --batch_size is given.
DEFAULT_BATCH_SIZE = 64


@dataclass
class SampleConfig:
    """Options of :func:`~ddpm_pipeline.generation.generate_samples` and ``sample_ddpm.py`` (one field per
    command-line flag)."""

    model: str | None = field(default=None, metadata={"help": "Pipeline folder (a train_ddpm.py --output_dir) or Hub id to sample from."})  # noqa: E501
    output_dir: str = field(default="samples", metadata={"help": "Where images/ (the numbered PNGs), grid.png and sampling_report.json go (and trajectory.png, samples.npz)."})  # noqa: E501
    num_images: int = field(default=64, metadata={"help": "How many images to have in <output_dir>/images (those already there are kept)."})  # noqa: E501
    num_inference_steps: int | None = field(default=None, metadata={"help": "Sampling steps (fewer = respaced chain; default: the model's T, the full chain)."})  # noqa: E501
    scheduler: str = sampling_option("scheduler")
    eta: float = sampling_option("eta")
    timestep_spacing: str | None = sampling_option("timestep_spacing")
    batch_size: int | None = field(default=None, metadata={"help": f"Images per sampling batch (default: the batch size of the images already in <output_dir>/images, else {DEFAULT_BATCH_SIZE}, on a CPU at most --num_images). Image i depends on the seed and the batch size."})  # noqa: E501
    seed: int = field(default=0, metadata={"help": "Sampling seed (image i is the same for any --num_images at the same --batch_size)."})
    fast_sampling: str = sampling_option("fast_sampling")
    compile_unet: bool | None = sampling_option("compile_unet")
    sampling_dtype: str = sampling_option("sampling_dtype")
    grid_images: int = field(default=64, metadata={"help": "Images in grid.png, the first ones (0 = no grid)."})
    trajectory: bool = field(default=False, metadata={"help": "Also write trajectory.png: x_t, the predicted noise and the predicted x0 of the first 4 images at 8 steps (samples the first batch once more)."})  # noqa: E501
    npz: bool = field(default=False, metadata={"help": "Also write samples.npz: arr_0 = the images as uint8 [N, H, W, C]."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})

    def __post_init__(self) -> None:
        # from Python: paths and numbers as the command line gives them (a `Path` as its text)
        take_python_values(self, numbers_as_text=())

    def validate(self) -> None:
        """Clear errors before any work."""
        from .preflight import refuse_pipeline_folder
        from .sampling import check_sampling_options

        if not self.model:
            raise ValueError("Give --model: a train_ddpm.py --output_dir, a save_pretrained folder or a Hub repo id.")
        if not str(self.output_dir).strip():
            raise ValueError("--output_dir is empty: name the folder to write the samples to (e.g. samples).")
        refuse_pipeline_folder(self.output_dir, "--output_dir", harm="replace its training trajectory.png and ")
        for name in ("num_images", "batch_size", "num_inference_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be positive, got {value}.")
        if self.seed < 0:
            raise ValueError(f"--seed must be ≥ 0, got {self.seed}.")
        if self.grid_images < 0:
            raise ValueError(f"--grid_images must be ≥ 0 (0 = no grid), got {self.grid_images}.")
        check_sampling_options(self)
        if self.trajectory and self.scheduler == "euler":
            raise ValueError("--trajectory needs a sampler with integer timesteps; euler visits fractional ones: drop "
                             "--trajectory, or sample with ddpm, ddim or dpmsolver++.")  # fmt: skip

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> SampleConfig:
        """The options of the ``sample_ddpm.py`` command line (``argv``, default: ``sys.argv[1:]``)."""
        parser = dataclass_parser(cls, program_name("sample_ddpm.py"), "Sample a trained DDPM pipeline into a folder of PNGs.")
        return cls(**vars(parser.parse_args(argv)))
