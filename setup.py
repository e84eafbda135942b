"""Builds fastddpm and its compiled ops, fastddpm._C.

    pip install --no-build-isolation .      (or -e .; torch must already be installed)

The extension is compiled against the torch it will run with, so the build must see the
installed torch: without --no-build-isolation, pip builds in a temporary environment holding
only pyproject.toml's build requirements, and would either fail or (were torch listed there)
download another torch, possibly a CUDA build of several GB, and compile against it. torch is
therefore not a build requirement, and this file stops at once, saying to pass
--no-build-isolation, when torch cannot be imported or comes from a temporary build
environment (see import_torch).

_C holds the schema of torch.ops.fastddpm (csrc/ops.cpp) and the CPU kernels (csrc/cpu). The
CPU kernels are compiled once per instruction set, as ATen compiles its own (csrc/cpu/
kernels_<isa>.cpp with the flags of CPU_ISA_FLAGS), and the best build the CPU supports is chosen
when they first run: the package is fast on an AVX-512 machine and still correct on one without.

CUDA kernels (csrc/cuda/*.cu) are built when FASTDDPM_CUDA=1, or, with FASTDDPM_CUDA unset or
"auto", when torch is a CUDA build, a CUDA toolkit is found (CUDA_HOME or nvcc on PATH), a test
program links against its CUDA runtime (-lcudart, as the extension will) and its major version
is torch's, even with no GPU visible. In auto mode a failed probe says why and builds the CPU
kernels only; with FASTDDPM_CUDA=1 it is an error; FASTDDPM_CUDA=0 never builds them.
TORCH_CUDA_ARCH_LIST chooses the GPU architectures; unset, they are those of the visible GPUs,
or DEFAULT_CUDA_ARCHS with none visible. FASTDDPM_WERROR=1 (CI) makes warnings in our .cu files
errors. The C++ sources compile in parallel, MAX_JOBS at once (default: one per CPU).
"""
import glob
import importlib
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")

NO_ISOLATION = ("fastddpm compiles its extension against the torch already installed, so install torch first "
                "and build fastddpm without build isolation: `pip install --no-build-isolation .` "
                "(uv: `uv pip install --no-build-isolation .`; pypa build: `python -m build --no-isolation`)")
# Directories of the temporary build environments of pip (pip-build-env-*), pypa build
# (build-env-*) and uv (builds-v0/...): a torch found there is not the torch fastddpm will run with.
_BUILD_ENV_DIR = re.compile(r"[\\/](pip-build-env-[^\\/]*|build-env-[^\\/]*|builds-v\d+)[\\/]")


def isolated_build_path(path):
    """Whether ``path`` lies inside a temporary build environment of pip, build or uv."""
    return _BUILD_ENV_DIR.search(path) is not None


def import_torch(importer=importlib.import_module):
    """The installed torch to build against, or SystemExit saying to use --no-build-isolation.

    The test: torch is not a build requirement (pyproject.toml), so an isolated build cannot
    import it at all; and should a build environment provide one anyway (a tool adding it), its
    path lies in that environment's temporary directory.
    """
    try:
        torch = importer("torch")
    except ImportError as e:
        raise SystemExit(f"fastddpm: torch is not importable in this build ({e}). {NO_ISOLATION}.") from None
    path = os.path.abspath(getattr(torch, "__file__", None) or "")
    if isolated_build_path(path):
        raise SystemExit(f"fastddpm: this build imports torch from a temporary build environment ({path}), "
                         f"not the torch installed where fastddpm will run; {NO_ISOLATION}.")
    return torch

# -O3: about 30% faster noise generation than -O2 here (benchmarks/RESULTS.md).
CXX_FLAGS = ["-O3"]
# Per instruction set: the defines ATen's vector headers select their width by, and -m flags.
CPU_ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma"],
}
_ISA_SOURCE = re.compile(r"kernels_(\w+)\.cpp$")


def _cxx_flags():
    """CXX_FLAGS, plus -fopenmp where torch's own threads are OpenMP's.

    at::parallel_for is header code: compiled without -fopenmp it runs every loop on the
    calling thread. -fopenmp is passed to the compiler only, not the linker, so the OpenMP calls
    bind to the libgomp torch has already loaded and one thread pool (torch.set_num_threads)
    serves ATen and these kernels alike.
    """
    import torch
    flags = list(CXX_FLAGS)
    if os.name != "nt" and sys.platform != "darwin" and torch._C.has_openmp:
        flags.append("-fopenmp")
    return flags


def _isas():
    """The CPU builds to compile: the SIMD ones on x86-64 with GCC/Clang, else the default."""
    if os.name == "nt" or platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    return ["default", "avx2", "avx512"]


# ---- CUDA kernels (csrc/cuda) ---------------------------------------------------------------

# With no GPU visible torch cannot choose the architectures itself: build for A100 (8.0) and
# H100/H200 (9.0), plus PTX of 9.0 that newer GPUs compile when the module loads.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# --threads=0: nvcc compiles the architectures of a file in parallel.
NVCC_FLAGS = ["-O3", "--threads=0"]
# FASTDDPM_WERROR=1: warnings of nvcc and of the host compiler in our .cu files are errors.
# torch's headers are passed as system headers (-isystem, see _configure_cuda), so theirs don't
# count; -Wno-unknown-pragmas because the host compiler sees nvcc's `#pragma unroll` in
# host-device functions and ignores it, as intended.
NVCC_WERROR_FLAGS = ["-Werror=all-warnings", "-Xcompiler=-Wall,-Wextra,-Wno-unknown-pragmas"]


def cuda_mode(env=os.environ):
    """FASTDDPM_CUDA as "0", "1" or "auto" (unset or empty means auto)."""
    mode = env.get("FASTDDPM_CUDA", "").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise RuntimeError(f"FASTDDPM_CUDA must be 0, 1 or auto, got {env['FASTDDPM_CUDA']!r}")
    return mode


def want_cuda(mode, problem):
    """Whether to build the CUDA kernels, given why they cannot be built (``problem``, None if
    they can): auto builds them when they can and else says why; mode "1" insists."""
    if mode == "0":
        return False
    if problem is None:
        return True
    if mode == "1":
        raise RuntimeError("FASTDDPM_CUDA=1 but " + problem)
    print(f"fastddpm: building the CPU kernels only: {problem} (FASTDDPM_CUDA=1 makes this an error, "
          "FASTDDPM_CUDA=0 skips the probe)", file=sys.stderr)
    return False


def cuda_problem(torch_cuda, cuda_home, torch_version, *, link_probe=None, version_probe=None):
    """Why the CUDA kernels cannot be built here, or None: torch must be a CUDA build, a toolkit
    must be found, a program must link against its runtime, and its major version be torch's."""
    if torch_cuda is None:
        return "the installed torch is not a CUDA build (torch.version.cuda is None)"
    if cuda_home is None:
        return "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    problem = (link_probe or cudart_link_problem)(cuda_home)
    if problem is not None:
        return problem
    try:
        toolkit = (version_probe or toolkit_version)(cuda_home)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
        return f"the CUDA toolkit at {cuda_home} did not report its version ({e})"
    return cuda_version_problem(toolkit, torch_cuda, cuda_home, torch_version)


def cudart_dir(cuda_home):
    """The directory torch links a CUDA extension's -lcudart from (torch.utils.cpp_extension's
    library_paths choice: lib64, or lib where there is no lib64)."""
    lib = os.path.join(cuda_home, "lib64")
    if not os.path.exists(lib) and os.path.exists(os.path.join(cuda_home, "lib")):
        lib = os.path.join(cuda_home, "lib")
    return lib


def cudart_link_problem(cuda_home, cxx=None):
    """None if a trivial program links with ``-L<cudart_dir> -lcudart`` (as the extension will
    link), else why not. A toolkit of headers and nvcc without the runtime's linkable library
    (only libcudart.so.N, as some wheels ship) fails here instead of at the end of the build."""
    if os.name == "nt":
        return None  # MSVC links cudart.lib by another route; nothing to probe the same way
    lib = cudart_dir(cuda_home)
    cxx = cxx or shlex.split(os.environ.get("CXX", "c++"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = cxx + [src, "-o", os.path.join(tmp, "probe"), f"-L{lib}", "-lcudart"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"could not run the C++ compiler to test-link the CUDA runtime ({e})"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
        why = next((line for line in lines if "cannot find" in line), lines[-1])  # ld's own reason
        return f"a test program does not link against the CUDA runtime of {cuda_home} (-L{lib} -lcudart: {why.strip()})"
    return None


def toolkit_version(cuda_home):
    """(major, minor) of the CUDA toolkit at cuda_home, from `nvcc --version`."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"could not read the CUDA version of {nvcc} from: {out!r}")
    return int(match.group(1)), int(match.group(2))


def cuda_version_problem(toolkit, torch_cuda, cuda_home, torch_version):
    """A toolkit of another CUDA major version than torch's cannot build against it: why, or None."""
    torch_major = int(torch_cuda.split(".")[0])
    if toolkit[0] == torch_major:
        return None
    return (f"the CUDA toolkit at {cuda_home} is CUDA {toolkit[0]}.{toolkit[1]}, but torch {torch_version} was "
            f"built with CUDA {torch_cuda}: the major versions must match. Point CUDA_HOME at a CUDA "
            f"{torch_major}.x toolkit, install a torch built for CUDA {toolkit[0]}, or build without the CUDA "
            "kernels (FASTDDPM_CUDA=0)")


def cuda_arch_list(env, gpu_count):
    """TORCH_CUDA_ARCH_LIST to build with: the user's; with none, the visible GPUs' (None lets
    torch choose them); with no GPU visible, DEFAULT_CUDA_ARCHS."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return env["TORCH_CUDA_ARCH_LIST"]
    return None if gpu_count > 0 else DEFAULT_CUDA_ARCHS


def _configure_cuda():
    """Checks the CUDA set-up; returns the nvcc flags, or None when no CUDA kernels are built."""
    mode = cuda_mode()
    if mode == "0":
        return None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    if not want_cuda(mode, cuda_problem(torch.version.cuda, CUDA_HOME, torch.__version__)):
        return None
    arch_list = cuda_arch_list(os.environ, torch.cuda.device_count())
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension
    flags = list(NVCC_FLAGS)
    if os.environ.get("FASTDDPM_WERROR") == "1":
        for path in include_paths():
            flags += ["-isystem", path]
        flags += NVCC_WERROR_FLAGS
    return flags


def _with_isa_flags(src, postargs):
    """Compiler arguments for one source: the ISA flags of a kernels_<isa>.cpp added."""
    match = _ISA_SOURCE.search(src)
    if not match:
        return postargs
    flags = CPU_ISA_FLAGS[match.group(1)]
    if isinstance(postargs, dict):
        return {**postargs, "cxx": list(postargs.get("cxx", [])) + flags}
    return list(postargs) + flags


def ext_modules():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    isas = _isas()
    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    for src in sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))):
        match = _ISA_SOURCE.search(src)
        if match is None or match.group(1) in isas:
            cpu_sources.append(src)
    macros = [(f"FASTDDPM_BUILD_{isa.upper()}", None) for isa in isas if isa != "default"]
    compile_args = {"cxx": _cxx_flags()}
    headers = sorted(glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True))
    kwargs = dict(include_dirs=[os.path.join(ROOT, CSRC)], define_macros=macros,
                  extra_compile_args=compile_args, depends=headers)

    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    nvcc_flags = _configure_cuda() if cuda_sources else None
    if nvcc_flags is not None:
        compile_args["nvcc"] = nvcc_flags
        macros.append(("FASTDDPM_WITH_CUDA", None))
        return [CUDAExtension("fastddpm._C", cpu_sources + cuda_sources, **kwargs)]
    return [CppExtension("fastddpm._C", cpu_sources, **kwargs)]


def build_jobs():
    """How many C++ sources compile at once: MAX_JOBS (torch's variable for it), else the CPUs."""
    jobs = os.environ.get("MAX_JOBS", "").strip()
    return max(1, int(jobs)) if jobs.isdigit() else max(1, os.cpu_count() or 1)


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """BuildExtension with per-source flags for the per-ISA kernel builds.

        setuptools gives every source of an extension the same flags, so the compile step is
        wrapped to add each kernels_<isa>.cpp's own; ninja (one set of flags) is not used.
        """

        def build_extension(self, ext):
            compiler = self.compiler
            compile_one = compiler._compile

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                return compile_one(obj, src, ext_, cc_args, _with_isa_flags(src, extra_postargs), pp_opts)

            def compile_all(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                            extra_postargs=None, depends=None):
                # distutils' compile, with the C++ sources compiled in parallel (MAX_JOBS, else
                # one per CPU: the build is most of a fresh set-up). The .cu sources go first,
                # one at a time: torch's compile step swaps the compiler executable for them.
                macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                    output_dir, macros, include_dirs, sources, depends, extra_postargs)
                cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
                jobs = [(obj,) + tuple(build[obj]) for obj in objects if obj in build]
                cuda = [j for j in jobs if j[2] in (".cu", ".cuh")]
                for obj, src, ext_ in cuda:
                    _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts)
                with ThreadPoolExecutor(max_workers=build_jobs()) as pool:
                    list(pool.map(lambda j: _compile(j[0], j[1], j[2], cc_args, extra_postargs, pp_opts),
                                  [j for j in jobs if j not in cuda]))
                return objects

            compiler._compile = _compile
            compiler.compile = compile_all
            try:
                super().build_extension(ext)
            finally:
                compiler._compile = compile_one
                del compiler.compile  # the class's own again

    return {"build_ext": BuildExt.with_options(use_ninja=False)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    import_torch()  # first: an isolated build stops here, before anything is compiled
    setup(ext_modules=ext_modules(), cmdclass=cmdclass())
