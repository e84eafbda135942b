"""setup.py's CUDA decisions (FASTDDPM_CUDA, version check, arch list) and the cuda backend's
availability reasons, checked on a machine without a GPU. That the kernels compile and register
is .ci/cuda_build.sh's job; that they compute the right thing is checked on a GPU
(benchmarks/gpu_report.py)."""
import importlib.util
import re
import stat
from pathlib import Path

import pytest
import torch

from fastddpm import backends
from fastddpm.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fastddpm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("", "auto"), ("auto", "auto"), (" AUTO ", "auto"),
                                         ("0", "0"), ("1", "1")])
def test_cuda_mode(setup_py, value, mode):
    env = {} if value is None else {"FASTDDPM_CUDA": value}
    assert setup_py.cuda_mode(env) == mode


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_cuda_mode_rejects_other_values(setup_py, value):
    with pytest.raises(RuntimeError, match=f"FASTDDPM_CUDA must be 0, 1 or auto, got '{value}'"):
        setup_py.cuda_mode({"FASTDDPM_CUDA": value})


def test_want_cuda_auto_builds_only_with_toolkit_and_cuda_torch(setup_py):
    assert setup_py.want_cuda("auto", "13.0", "/usr/local/cuda") is True
    assert setup_py.want_cuda("auto", None, "/usr/local/cuda") is False
    assert setup_py.want_cuda("auto", "13.0", None) is False
    assert setup_py.want_cuda("0", "13.0", "/usr/local/cuda") is False
    assert setup_py.want_cuda("1", "13.0", "/usr/local/cuda") is True


def test_want_cuda_forced_says_what_is_missing(setup_py):
    with pytest.raises(RuntimeError, match=r"FASTDDPM_CUDA=1 but the installed torch is not a CUDA build"):
        setup_py.want_cuda("1", None, "/usr/local/cuda")
    with pytest.raises(RuntimeError, match=r"FASTDDPM_CUDA=1 but no CUDA toolkit was found"):
        setup_py.want_cuda("1", "12.4", None)


def test_version_mismatch_names_both_versions(setup_py):
    setup_py.check_cuda_versions((13, 0), "13.0", "/opt/cuda", "2.14.1")
    setup_py.check_cuda_versions((12, 8), "12.4", "/opt/cuda", "2.6.0")  # minor versions may differ
    with pytest.raises(RuntimeError) as info:
        setup_py.check_cuda_versions((12, 4), "13.0", "/opt/cuda-12.4", "2.14.1+cu130")
    message = str(info.value)
    assert "CUDA 12.4" in message and "with CUDA 13.0" in message and "/opt/cuda-12.4" in message


def test_toolkit_version_reads_nvcc(setup_py, tmp_path):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.6, V12.6.85'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    assert setup_py.toolkit_version(str(tmp_path)) == (12, 6)


def test_arch_list_without_gpu_includes_hopper_and_ampere(setup_py):
    archs = setup_py.cuda_arch_list({}, gpu_count=0).replace("+PTX", "").split(";")
    assert "9.0" in archs and "8.0" in archs
    assert setup_py.cuda_arch_list({}, gpu_count=1) is None  # torch picks the visible GPUs'
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}, gpu_count=0) == "8.6"


def test_cuda_backend_says_why_it_is_unavailable():
    ok, reason = backends.status("cuda")
    if torch.version.cuda is None:
        assert (ok, reason) == (False, f"torch {torch.__version__} is not a CUDA build")
    elif not torch.cuda.is_available():
        assert (ok, reason) == (False, "no CUDA GPU is visible")
    else:
        assert ok == cuda_backend.has_cuda_kernels(), reason
    if not ok:
        x = torch.zeros(2, 3)
        with pytest.raises(backends.BackendUnavailableError, match=re.escape(f"'cuda' is not available: {reason}")):
            backends.resolve("cuda", x.device)
    assert cuda_backend.device_types == ("cuda",)
