"""The cuda backend: the C++/CUDA kernels of csrc/cuda, called as torch.ops.fastddpm.

Inputs arrive validated by fastddpm.ops; the ops check again in C++ (they are public via
torch.ops). Their autograd is C++ (csrc/autograd.cpp, shared with the cpu backend), their fake
kernels fastddpm._autograd's, registered once for the namespace by fastddpm._extension when _C
loads. Seeds are 1-element int64 tensors on the
GPU that the kernels read in device memory (see csrc/cuda/ops_cuda.cu): no host sync, and
CUDA-graph replays draw fresh noise.
"""
import torch

from .. import _extension
from .compiled import (mse_loss, mse_per_sample, normal, p_sample_step, q_sample, sample_t, solver_step,  # noqa: F401
                       target_mse, train_inputs, vlb_loss)

name = "cuda"
device_types = ("cuda",)


def has_cuda_kernels():
    """Whether the loaded _C registered a CUDA kernel for every op (it has none when it was
    built without a CUDA toolkit or against a CPU build of torch)."""
    if _extension.load() is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastddpm::{op}", "CUDA")
               for op in _extension.OP_NAMES)


def available():
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if _extension.load() is None:
        return False, f"the compiled extension fastddpm._C is not built or failed to load ({_extension.error()})"
    if not has_cuda_kernels():
        return False, ("fastddpm._C was built without its CUDA kernels (no CUDA toolkit or a CPU build of "
                       "torch at build time); rebuild with FASTDDPM_CUDA=1 pip install --no-build-isolation .")
    return True, ""


# Regenerating noise is nearly free on a GPU and memory is dear: loss stores no noise tensor.
def materialises_noise(dtype) -> bool:
    return False
