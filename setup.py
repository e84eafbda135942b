"""Builds fastddpm and its compiled ops, fastddpm._C.

    pip install --no-build-isolation .      (or -e .; torch must already be installed)

_C holds the schema of torch.ops.fastddpm (csrc/ops.cpp) and the CPU kernels (csrc/cpu). The
CPU kernels are compiled once per instruction set, as ATen compiles its own (csrc/cpu/
kernels_<isa>.cpp with the flags of CPU_ISA_FLAGS), and the best build the CPU supports is chosen
when they first run: the package is fast on an AVX-512 machine and still correct on one without.

CUDA kernels (csrc/cuda/*.cu) are built when FASTDDPM_CUDA=1, or, with FASTDDPM_CUDA unset, when
torch is a CUDA build and a CUDA toolkit is found; FASTDDPM_CUDA=0 never builds them.
"""
import glob
import os
import platform
import re

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")

# Per instruction set: the defines ATen's vector headers select their width by, and -m flags.
# Optimisation: -O3 (measured in benchmarks/RESULTS.md).
CXX_FLAGS = ["-O3"]
CPU_ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma"],
}
_ISA_SOURCE = re.compile(r"kernels_(\w+)\.cpp$")


def _isas():
    """The CPU builds to compile: the SIMD ones on x86-64 with GCC/Clang, else the default."""
    if os.name == "nt" or platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    return ["default", "avx2", "avx512"]


def _want_cuda():
    flag = os.environ.get("FASTDDPM_CUDA")
    if flag is not None:
        return flag.strip() == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


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
    compile_args = {"cxx": list(CXX_FLAGS)}
    kwargs = dict(include_dirs=[os.path.join(ROOT, CSRC)], define_macros=macros,
                  extra_compile_args=compile_args)

    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    if cuda_sources and _want_cuda():
        compile_args["nvcc"] = ["-O3"]
        macros.append(("FASTDDPM_WITH_CUDA", None))
        return [CUDAExtension("fastddpm._C", cpu_sources + cuda_sources, **kwargs)]
    return [CppExtension("fastddpm._C", cpu_sources, **kwargs)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """BuildExtension with per-source flags for the per-ISA kernel builds.

        setuptools gives every source of an extension the same flags, so the compile step is
        wrapped to add each kernels_<isa>.cpp's own; ninja (one set of flags) is not used.
        """

        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                return compile_one(obj, src, ext_, cc_args, _with_isa_flags(src, extra_postargs), pp_opts)

            self.compiler._compile = _compile
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

    return {"build_ext": BuildExt.with_options(use_ninja=False)}


setup(ext_modules=ext_modules(), cmdclass=cmdclass())
