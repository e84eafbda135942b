"""The cpu backend: the C++ kernels of csrc/cpu, called as torch.ops.fastddpm.

Inputs arrive validated by fastddpm.ops; the ops check again in C++ (they are public via
torch.ops). Their autograd is C++ (csrc/autograd.cpp, shared with the cuda backend), their
fake kernels fastddpm._autograd's, registered by fastddpm._extension when _C loads.
"""
import torch

from .. import _extension
from .compiled import (mse_loss, mse_per_sample, normal, p_sample_step, q_sample, sample_t, solver_step,  # noqa: F401
                       target_mse, train_inputs, vlb_loss)

name = "cpu"
device_types = ("cpu",)


def available():
    if _extension.load() is None:
        return False, f"the compiled extension fastddpm._C is not built or failed to load ({_extension.error()})"
    return True, ""


# Whether ``DenoiseDiffusion.loss`` draws the noise once (the normal op) and keeps it for the
# backward instead of regenerating it in q_sample, the MSE forward and the MSE backward. On a CPU
# a normal costs more than a memory pass, and materialising made the diffusion part of a
# training step 20-45% faster at CIFAR and latent sizes (benchmarks/RESULTS.md, "Where the noise
# is generated on a CPU"). Half types keep regenerating: materialised noise would be rounded to
# the data's dtype, which would change the result.
def materialises_noise(dtype) -> bool:
    return dtype in (torch.float32, torch.float64)
