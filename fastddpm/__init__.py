"""fastddpm: DDPM (Ho et al. 2020) with fused, counter-based-noise kernels for PyTorch."""
from . import backends, ops, schedule
from .backends import BACKENDS, BackendUnavailableError, available_backends
from .diffusion import DenoiseDiffusion

__all__ = ["DenoiseDiffusion", "ops", "schedule", "available_backends", "BACKENDS", "BackendUnavailableError"]
__version__ = "0.1.0"
