import os

# Triton's interpreter must be chosen before triton is imported. Without a CUDA GPU (CI) the
# Triton kernels run on CPU tensors in it; on a CUDA machine they run compiled on the GPU
# (FASTDDPM_TEST_GPU_DEVICE=cpu asks for the interpreter there too). TRITON_INTERPRET wins.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    on_gpu = torch.cuda.is_available() and os.environ.get("FASTDDPM_TEST_GPU_DEVICE", "cuda") != "cpu"
    os.environ["TRITON_INTERPRET"] = "0" if on_gpu else "1"

import pytest  # noqa: E402

from helpers import poisoned_outputs  # noqa: E402


@pytest.fixture
def poisoned():
    """Outputs the kernels allocate start as NaN (helpers.poisoned_outputs)."""
    with poisoned_outputs():
        yield
