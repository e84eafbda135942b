"""What the ``fastddpm`` command's parts share: the usage error, --device and --backend parsing."""
from .. import backends

EXIT_USAGE = 2
BACKENDS = ("auto",) + backends.BACKENDS


class UsageError(Exception):
    """An error the user can fix; printed without a traceback."""


def parse_device(name: str, what: str, error=UsageError):
    """--device for ``what`` ("the demo", "the benchmarks"): "auto" is a GPU when one is visible,
    else the CPU; anything but a cpu or a visible cuda device raises ``error``."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows: too much here
        raise error(f"--device {name!r} is not a device: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"--device {name}: no CUDA GPU is visible to this torch ({torch.__version__}); "
                    "use --device cpu or --device auto")
    if device.type not in ("cpu", "cuda"):
        raise error(f"--device {name}: {what} runs on cpu or cuda")
    return device
