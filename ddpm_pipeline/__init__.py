"""ddpm_pipeline: train and evaluate DDPMs (ε, x0 or μ targets) with Hugging Face diffusers."""

# diffusers loads a pipeline part from a non-diffusers library by looking up these base classes on
# the library's top-level module (DESIGN.md §3), so they must be importable from here.
from diffusers import ModelMixin, SchedulerMixin

from .losses import diffusion_loss
from .pipeline_ddpm_target import DDPMTargetPipeline, DDPMTargetPipelineOutput
from .schedules import NoiseSchedule, cosine_betas, linear_betas, make_betas
from .scheduling_ddpm_target import DDPMTargetScheduler
from .trajectory import DDPMTrajectory, render_trajectory
from .unet import DDPMUNet

__version__ = "0.1.0"

__all__ = [
    "DDPMTargetPipeline",
    "DDPMTargetPipelineOutput",
    "DDPMTargetScheduler",
    "DDPMTrajectory",
    "DDPMUNet",
    "ModelMixin",
    "NoiseSchedule",
    "SchedulerMixin",
    "cosine_betas",
    "diffusion_loss",
    "linear_betas",
    "make_betas",
    "render_trajectory",
]
