"""The cpu backend: the C++ kernels of csrc/cpu, called as torch.ops.fastddpm.

Inputs arrive validated by fastddpm.ops; the ops check again in C++ (they are public via
torch.ops). Their autograd is C++ (csrc/autograd.cpp, shared with the cuda backend), their
fake kernels fastddpm._autograd's, registered by fastddpm._extension when _C loads.
"""
from .. import _extension
from .compiled import mse_per_sample, normal, p_sample_step, q_sample, sample_t  # noqa: F401

name = "cpu"
device_types = ("cpu",)


def available():
    if _extension.load() is None:
        return False, f"the compiled extension fastddpm._C is not built or failed to load ({_extension.error()})"
    return True, ""
