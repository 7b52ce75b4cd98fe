"""The values the programs' options take, and their defaults, in plain Python.

Parsing a command line, printing its ``--help`` and refusing a misspelt option or value need these
names and nothing heavier, so neither torch nor diffusers (seconds to import) loads before the
options are known to be good. The modules that implement an option import its names from here:
:mod:`~ddpm_pipeline.schedules` and :mod:`~ddpm_pipeline.scheduling_ddpm_target` the diffusion's,
:mod:`~ddpm_pipeline.sampling` the samplers', and so on. The UNet presets are in
:mod:`~ddpm_pipeline.unet_presets`.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

# -- the diffusion ---------------------------------------------------------------------------

#: What a network can be trained to predict: the noise ε, the clean image x0 (diffusers calls it
#: ``"sample"``), the posterior mean μ̃_t, or the velocity v = √ᾱ ε - √(1-ᾱ) x0.
PREDICTION_TYPES = ("epsilon", "sample", "mu", "v_prediction")
#: Accepted spellings of the prediction types, mapped to their canonical name.
PREDICTION_TYPE_ALIASES = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}
#: The reverse process variance: fixed to ``β̃_t`` or ``β_t``, or learned by the network as an
#: interpolation between their logs (Improved DDPM's ``"learned_range"``, diffusers' name for it).
FIXED_VARIANCE_TYPES = ("fixed_small", "fixed_large")
LEARNED_VARIANCE_TYPES = ("learned_range",)
VARIANCE_TYPES = FIXED_VARIANCE_TYPES + LEARNED_VARIANCE_TYPES
#: Per-timestep loss weights: none (``L_simple``), the true variational bound's, or Min-SNR-γ's.
LOSS_WEIGHTINGS = ("simple", "vlb", "min_snr")
#: Min-SNR-γ loss weighting's γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
#: Weighting Strategy", whose experiments found 5 best; diffusers' training scripts' --snr_gamma).
DEFAULT_SNR_GAMMA = 5.0
#: Improved DDPM's λ in ``L_hybrid = L_simple + λ L_vlb``.
DEFAULT_VLB_WEIGHT = 0.001
#: How each training image's timestep is drawn (:mod:`~ddpm_pipeline.timestep_sampling`).
TIMESTEP_SAMPLINGS = ("uniform", "importance")
#: Improved DDPM's values: the last 10 losses per timestep, mixed with 0.1% of the uniform distribution.
DEFAULT_IMPORTANCE_HISTORY = 10
DEFAULT_IMPORTANCE_UNIFORM_PROB = 0.001
#: Which timesteps a respaced chain visits (diffusers' ``timestep_spacing``).
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def canonical_prediction_type(prediction_type: str) -> str:
    """The canonical name of a prediction type (``"x0"`` → ``"sample"``), or a clear error."""
    name = PREDICTION_TYPE_ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}: choose 'epsilon' (noise), "
            "'sample' or 'x0' (clean image), 'mu' (posterior mean) or 'v_prediction'."
        )
    return name


def is_learned_variance(variance_type: str) -> bool:
    """Whether the network predicts its own variance (and so outputs twice its input's channels)."""
    return variance_type in LEARNED_VARIANCE_TYPES


def model_output_channels(in_channels: int, variance_type: str) -> int:
    """The channels a DDPM network outputs: one prediction per input channel, and with a learned
    variance one variance value per input channel after them (``2 · in_channels``)."""
    return 2 * in_channels if is_learned_variance(variance_type) else in_channels


# -- data and speed --------------------------------------------------------------------------

#: How an image is brought to the training size (:class:`~ddpm_pipeline.images.ImagePreprocessor`).
RESIZE_MODES = ("auto", "crop", "pad")
#: ``--validation_rows``: how a share picks the rows it holds out (:mod:`~ddpm_pipeline.hold_out`).
HOLD_OUT_ROWS = ("random", "last")
#: ``torch.compile``'s modes (None is "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# -- sampling --------------------------------------------------------------------------------

FAST_SAMPLING_CHOICES = ("auto", "off")
SAMPLING_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
#: --scheduler: the saved scheduler ("ddpm": this package's ancestral sampler), or a diffusers one
#: built from its config (same betas), for ε, x0 and v models (:data:`~ddpm_pipeline.sampling.SAMPLER_SCHEDULERS`)
SCHEDULER_CHOICES = ("ddpm", "ddim", "dpmsolver++", "euler")
#: The options every sampling command line (``sample_ddpm.py``, ``eval_metrics.py``) has: default and help.
SAMPLING_OPTIONS: dict[str, tuple[Any, str]] = {
    "scheduler": ("ddpm", "Sampler: ddpm (the folder's own: ancestral, respaced exactly), or ddim (η = --eta), dpmsolver++ or euler, built from its config with the same betas (ε, x0 and v models; 20-100 steps are usual)."),  # noqa: E501
    "fast_sampling": ("auto", "auto: sample with pipe.enable_fast_sampling() (on CUDA: bf16 UNet for ε/x0, channels_last, torch.compile with CUDA graphs; nothing on the CPU); off: the plain float32 pipeline."),  # noqa: E501
    "compile_unet": (None, "torch.compile the UNet when sampling fast: auto = on CUDA where Triton supports the GPU; on the CPU an opt-in (--compile_unet, with channels_last; needs a C++ compiler) that gave 1.28-1.37x the UNet evaluations/s on the 2-core reference CPU after 15-60 s of compiling: for long sampling."),  # noqa: E501
    "eta": (0.0, "DDIM's η with --scheduler ddim: 0 = deterministic DDIM, 1 = the respaced ancestral sampler (fixed_small), in between the DDIM paper's family."),  # noqa: E501
    "timestep_spacing": (None, "Which timesteps fewer --num_inference_steps than the model's T visit: leading (diffusers' default; 100 of 1000 start at t = 990), trailing (start at t = T-1, the pure noise the chain was trained to reach; Lin et al. 2024 advise it for few steps) or linspace; default: the saved scheduler's own (leading for this package's)."),  # noqa: E501
    "sampling_dtype": ("auto", "The UNet's dtype when sampling fast: auto (bfloat16 on CUDA, float16 on GPUs older than Ampere, float32 for μ and on the CPU), float32, bfloat16 (faster on a CPU with AVX512-BF16 or AMX too), float16."),  # noqa: E501
}


def sampling_option(name: str) -> Any:
    """A new dataclass field for the sampling option ``name`` of :data:`SAMPLING_OPTIONS`, with its
    default and help, for a command line's config class."""
    default, text = SAMPLING_OPTIONS[name]
    return field(default=default, metadata={"help": text})
