"""Drop-in replacements for diffusers' schedulers, stepping with fastddpm's fused kernels.

    from fastddpm.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Each class is a subclass of diffusers' class of the same name with the same config. One module
per scheduler family: :mod:`.ddpm` (DDPMScheduler, DDIMScheduler), :mod:`.dpm`
(DPMSolverMultistepScheduler), :mod:`.unipc` (UniPCMultistepScheduler) and :mod:`.euler`
(EulerDiscreteScheduler, EulerAncestralDiscreteScheduler). Importing it needs diffusers.
"""
from .ddpm import DDIMScheduler, DDPMScheduler
from .dpm import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .unipc import UniPCMultistepScheduler

__all__ = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]
