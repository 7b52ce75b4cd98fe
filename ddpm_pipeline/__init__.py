"""ddpm_pipeline: train and evaluate DDPMs (ε, x0 or μ targets) with Hugging Face diffusers.

The names below are imported on first use (PEP 562), so that a command line parses its options,
prints its ``--help`` or refuses a bad option without first loading torch and diffusers. Diffusers
loads a pipeline part from a non-diffusers library by looking up its base classes on the library's
top-level module (DESIGN.md §3): ``ModelMixin`` and ``SchedulerMixin`` are among them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module it comes from.
_EXPORTS = {
    "ModelMixin": "diffusers",
    "SchedulerMixin": "diffusers",
    "DiffusionLossTerms": ".losses",
    "diffusion_loss": ".losses",
    "diffusion_loss_terms": ".losses",
    "DDPMTargetPipeline": ".pipeline_ddpm_target",
    "DDPMTargetPipelineOutput": ".pipeline_ddpm_target",
    "NoiseSchedule": ".schedules",
    "cosine_betas": ".schedules",
    "linear_betas": ".schedules",
    "make_betas": ".schedules",
    "DDPMTargetScheduler": ".scheduling_ddpm_target",
    "ImportanceTimestepSampler": ".timestep_sampling",
    "DDPMTrajectory": ".trajectory",
    "render_trajectory": ".trajectory",
    "DDPMUNet": ".unet",
    "evaluate": ".evaluation",
    "EvaluationConfig": ".evaluation_config",
}

if TYPE_CHECKING:
    from diffusers import ModelMixin, SchedulerMixin

    from .evaluation import evaluate
    from .evaluation_config import EvaluationConfig
    from .losses import DiffusionLossTerms, diffusion_loss, diffusion_loss_terms
    from .pipeline_ddpm_target import DDPMTargetPipeline, DDPMTargetPipelineOutput
    from .schedules import NoiseSchedule, cosine_betas, linear_betas, make_betas
    from .scheduling_ddpm_target import DDPMTargetScheduler
    from .timestep_sampling import ImportanceTimestepSampler
    from .trajectory import DDPMTrajectory, render_trajectory
    from .unet import DDPMUNet


def __getattr__(name: str) -> Any:
    """The public name ``name``, imported from its module on first use and kept here after."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the public ones not yet imported among them."""
    return sorted([*globals(), *_EXPORTS])


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
