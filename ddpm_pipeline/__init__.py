"""ddpm_pipeline: train and evaluate DDPMs (ε, x0 or μ targets) with Hugging Face diffusers."""

# diffusers loads a pipeline part from a non-diffusers library by looking up these base classes on
# the library's top-level module (DESIGN.md §3), so they must be importable from here.
from diffusers import ModelMixin, SchedulerMixin

from .losses import DiffusionLossTerms, diffusion_loss, diffusion_loss_terms
from .pipeline_ddpm_target import DDPMTargetPipeline, DDPMTargetPipelineOutput
from .schedules import NoiseSchedule, cosine_betas, linear_betas, make_betas
from .scheduling_ddpm_target import DDPMTargetScheduler
from .timestep_sampling import ImportanceTimestepSampler
from .trajectory import DDPMTrajectory, render_trajectory
from .unet import DDPMUNet

__version__ = "0.1.0"


def __getattr__(name: str):
    """``evaluate`` and ``EvaluationConfig`` are imported on first use (they pull in torch-fidelity)."""
    if name in ("evaluate", "EvaluationConfig"):
        from . import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DDPMTargetPipeline",
    "DDPMTargetPipelineOutput",
    "DDPMTargetScheduler",
    "DDPMTrajectory",
    "DDPMUNet",
    "DiffusionLossTerms",
    "EvaluationConfig",
    "ImportanceTimestepSampler",
    "ModelMixin",
    "NoiseSchedule",
    "SchedulerMixin",
    "cosine_betas",
    "diffusion_loss",
    "diffusion_loss_terms",
    "evaluate",
    "linear_betas",
    "make_betas",
    "render_trajectory",
]
