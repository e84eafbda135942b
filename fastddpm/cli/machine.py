"""Facts about the machine a figure was measured on, recorded by ``fastddpm demo`` and
``fastddpm bench`` beside their timings: the CPU model, the CPU kernels' instruction set, the
thread count, the GPU, and the versions of what ran."""
import platform

import torch

from .. import __version__, _extension


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_isa():
    """The instruction set the CPU kernels were chosen to run with (``fastddpm._C.cpu_isa()``),
    or None when the compiled extension is not loaded."""
    ext = _extension.load()
    return ext.cpu_isa() if ext is not None else None


def versions(*optional) -> dict:
    """python, fastddpm and torch, and each of the ``optional`` modules (None when absent)."""
    out = {"python": platform.python_version(), "fastddpm": __version__, "torch": torch.__version__}
    for mod in optional:
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def describe(device: torch.device) -> dict:
    """Where a run happened: platform, CPU model, CPU kernel ISA, torch threads, GPU."""
    info = {"platform": platform.platform(), "device": str(device), "cpu": cpu_name(), "cpu_isa": cpu_isa(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
