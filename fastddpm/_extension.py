"""Loads the compiled ops, fastddpm._C, once.

Importing _C runs its static registrations (the torch.ops.fastddpm schemas, the CPU/CUDA
kernels and their autograd); this module then registers the fake kernels of fastddpm._autograd
on those ops, once for every backend that uses them. When _C is absent or
broken the package stays on the reference path and says so once, with the reason.
"""
import threading
import warnings

OP_NAMES = ("q_sample", "p_sample_step", "mse_per_sample", "mse_per_sample_backward", "sample_t", "normal",
            "solver_step", "target_mse", "target_mse_backward", "vlb_loss", "vlb_loss_backward", "train_inputs",
            "mse_loss", "mse_loss_backward")

_lock = threading.Lock()
_state = {"done": False, "module": None, "error": None}


def load():
    """The _C module, or None (after one warning saying why) if it cannot be loaded."""
    if not _state["done"]:
        with _lock:
            if not _state["done"]:
                _load()
    return _state["module"]


def _load():
    try:
        import torch

        from . import _C
        from . import _autograd

        _autograd.register_fakes({name: getattr(torch.ops.fastddpm, name).default for name in OP_NAMES})
        _state["module"] = _C
    except Exception as e:  # ImportError (not built), OSError (ABI/linking), RuntimeError
        _state["error"] = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"fastddpm: the compiled extension fastddpm._C could not be loaded ({_state['error']}); "
            "the cpu and cuda backends are unavailable and fastddpm runs on its reference backend "
            "(pure PyTorch). Build it with `pip install --no-build-isolation .`.",
            RuntimeWarning, stacklevel=3)
    finally:
        _state["done"] = True


def error():
    """Why _C could not be loaded ('' if it loaded or was not tried yet)."""
    return _state["error"] or ""
