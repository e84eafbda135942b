"""setup.py's decisions (an isolated build stops at once; FASTDDPM_CUDA, the link and version
probes, arch list) and the cuda backend's availability reasons, checked on a machine without a GPU. That the kernels compile and register
is .ci/cuda_build.sh's job; that they compute the right thing is checked on a GPU
(benchmarks/gpu_report.py)."""
import importlib.util
import re
import stat
import subprocess
import sys
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


def test_want_cuda_follows_the_probe(setup_py, capsys):
    assert setup_py.want_cuda("auto", None) is True
    assert setup_py.want_cuda("1", None) is True
    assert setup_py.want_cuda("0", None) is False
    assert setup_py.want_cuda("0", "anything") is False
    assert setup_py.want_cuda("auto", "no CUDA toolkit was found") is False  # the CPU kernels build
    assert "building the CPU kernels only: no CUDA toolkit was found" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="FASTDDPM_CUDA=1 but no CUDA toolkit was found"):
        setup_py.want_cuda("1", "no CUDA toolkit was found")


def _never(_cuda_home):
    raise AssertionError("probed after an earlier check failed")


def test_cuda_problem_says_what_is_missing_in_order(setup_py):
    links, version = (lambda home: None), (lambda home: (13, 0))
    assert setup_py.cuda_problem("13.0", "/usr/local/cuda", "2.14", link_probe=links, version_probe=version) is None
    assert setup_py.cuda_problem(None, "/usr/local/cuda", "2.14", link_probe=_never, version_probe=_never) == (
        "the installed torch is not a CUDA build (torch.version.cuda is None)")
    assert setup_py.cuda_problem("13.0", None, "2.14", link_probe=_never, version_probe=_never) == (
        "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    assert setup_py.cuda_problem("13.0", "/opt/cuda", "2.14", link_probe=lambda home: "no cudart",
                                 version_probe=_never) == "no cudart"
    assert "major versions must match" in setup_py.cuda_problem(
        "13.0", "/opt/cuda", "2.14", link_probe=links, version_probe=lambda home: (12, 4))

    def broken_nvcc(home):
        raise OSError("nvcc: not found")
    assert setup_py.cuda_problem("13.0", "/opt/cuda", "2.14", link_probe=links, version_probe=broken_nvcc) == (
        "the CUDA toolkit at /opt/cuda did not report its version (nvcc: not found)")


def test_cudart_link_probe_links_for_real(setup_py, tmp_path):
    """The probe runs the C++ compiler: a toolkit without a linkable libcudart fails it (the
    failure a CPU-only `pip install .` used to meet at its last step), one with it passes."""
    home = tmp_path / "cuda"
    (home / "lib64").mkdir(parents=True)
    problem = setup_py.cudart_link_problem(str(home))
    assert problem is not None and "does not link against the CUDA runtime" in problem and "cudart" in problem
    (home / "lib64" / "libcudart.so.13").write_bytes(b"")  # a runtime without its link name
    assert setup_py.cudart_link_problem(str(home)) is not None
    src = tmp_path / "cudart.c"
    src.write_text("int cudaRuntimeGetVersion(int *v) { *v = 13000; return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(home / "lib64" / "libcudart.so")], check=True)
    assert setup_py.cudart_link_problem(str(home)) is None
    lib_only = tmp_path / "cuda-lib"
    (lib_only / "lib").mkdir(parents=True)
    assert setup_py.cudart_dir(str(lib_only)) == str(lib_only / "lib")  # torch's choice without lib64
    assert setup_py.cudart_dir(str(home)) == str(home / "lib64")


@pytest.mark.parametrize("path, isolated", [
    ("/tmp/pip-build-env-k2j4/overlay/lib/python3.11/site-packages/torch/__init__.py", True),
    ("/tmp/build-env-x8d1/lib/python3.11/site-packages/torch/__init__.py", True),
    ("/home/u/.cache/uv/builds-v0/.tmpAbC/lib/python3.11/site-packages/torch/__init__.py", True),
    ("/work/main/.venv/lib/python3.11/site-packages/torch/__init__.py", False),
    ("/usr/lib/python3/dist-packages/torch/__init__.py", False),
    ("/home/u/my-build-env-tools/lib/site-packages/torch/__init__.py", False),
])
def test_isolated_build_path(setup_py, path, isolated):
    assert setup_py.isolated_build_path(path) is isolated


def test_import_torch_stops_an_isolated_build(setup_py):
    def no_torch(name):
        raise ModuleNotFoundError("No module named 'torch'")
    with pytest.raises(SystemExit, match="torch is not importable in this build .*--no-build-isolation"):
        setup_py.import_torch(no_torch)

    class Isolated:
        __file__ = "/tmp/pip-build-env-abc/overlay/lib/python3.11/site-packages/torch/__init__.py"
    with pytest.raises(SystemExit, match=r"temporary build environment \(/tmp/pip-build-env-abc/.*--no-build-isolation"):
        setup_py.import_torch(lambda name: Isolated)
    assert setup_py.import_torch() is torch  # the installed torch, as a non-isolated build sees it


def test_an_isolated_pip_build_stops_at_once(tmp_path):
    """What `pip install .` does with build isolation, without pip: run setup.py in a Python
    that sees only setuptools (no torch), as pip's isolated build environment does."""
    import _distutils_hack
    import setuptools
    shim = tmp_path / "site"
    shim.mkdir()
    for module in (setuptools, _distutils_hack):
        (shim / module.__name__).symlink_to(Path(module.__file__).parent)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = [{str(shim)!r}]; "
                           "sys.argv = ['setup.py', 'egg_info']; import runpy; runpy.run_path('setup.py', run_name='__main__')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "torch is not importable in this build" in proc.stderr and "--no-build-isolation" in proc.stderr


def test_version_mismatch_names_both_versions(setup_py):
    assert setup_py.cuda_version_problem((13, 0), "13.0", "/opt/cuda", "2.14.1") is None
    assert setup_py.cuda_version_problem((12, 8), "12.4", "/opt/cuda", "2.6.0") is None  # minors may differ
    message = setup_py.cuda_version_problem((12, 4), "13.0", "/opt/cuda-12.4", "2.14.1+cu130")
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
