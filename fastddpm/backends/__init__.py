"""Backend registry: which implementations of the ops exist in this process, and choosing one.

A backend is a module with ``name``, ``device_types`` (a tuple of ``torch.device.type`` strings
it accepts, or None for any), ``available() -> (ok, reason)`` and the functions ``q_sample``,
``p_sample_step``, ``mse_per_sample``, ``sample_t`` and ``normal`` taking inputs already
validated by :mod:`fastddpm.ops` (same device, ``seed`` a 1-element int64 tensor or None), and
``materialises_noise(dtype)``: whether ``loss`` should draw its noise once and keep it (cheaper
where arithmetic is dear, the CPU) rather than regenerate it in each kernel (the GPU).

The ``FASTDDPM_BACKEND`` environment variable is read once, when this module is imported (with
``import fastddpm``); :func:`reload_env` reads it again. :func:`resolve` caches its choice per
(name, device type): a backend is probed once per process, not once per op, and a cache hit is
a dict lookup that torch.compile traces without a graph break. ``reload_env`` clears the cache.
"""
import os

import torch

# The one list of backend names (the CLI's --backend choices come from here).
BACKENDS = ("cpu", "cuda", "triton", "reference")
# The fused ones: every backend but the pure-PyTorch reference.
KERNEL_BACKENDS = tuple(n for n in BACKENDS if n != "reference")
# Order is preference for "auto" on a device type.
_AUTO = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "FASTDDPM_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here; the message says why."""


_modules = {}
_resolved = {}  # (name as asked, device type) -> backend module
_env_choice = "auto"


def reload_env():
    """Read FASTDDPM_BACKEND again ("auto" when unset or empty) and forget the cached choices."""
    global _env_choice
    _env_choice = os.environ.get(ENV_VAR, "").strip() or "auto"
    _resolved.clear()
    return _env_choice


reload_env()


def _import(name):
    # Plain import statements, not importlib: the registry stays traceable by torch.compile.
    if name == "cpu":
        from . import cpu as mod
    elif name == "cuda":
        from . import cuda as mod
    elif name == "triton":
        from . import triton as mod
    else:
        from . import reference as mod
    return mod


def get(name):
    """The module of backend ``name`` (imported on first use; it may be unavailable here)."""
    if name not in _modules:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}")
        _modules[name] = _import(name)
    return _modules[name]


def takes(mod, device: torch.device) -> bool:
    """Whether backend module ``mod`` accepts tensors on ``device``."""
    return mod.device_types is None or device.type in mod.device_types


def status(name):
    """(ok, reason) for backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}")
    try:
        mod = get(name)
    except ImportError as e:  # a backend's own dependency (Triton, the extension) is missing
        return False, f"its module failed to import: {e}"
    return mod.available()


def available_backends():
    """Names of the backends usable in this process, in order of preference."""
    return [n for n in BACKENDS if status(n)[0]]


def resolve(name, device: torch.device):
    """The backend module to run ops on tensors of ``device``.

    ``name`` None or "auto" means FASTDDPM_BACKEND if it was set (see the module docstring),
    else the best available backend for the device type. An explicit backend that is absent or
    cannot take the device raises :class:`BackendUnavailableError`; there is no silent fallback.
    The answer is cached per (name, device type); failures are not.
    """
    mod = _resolved.get((name, device.type))  # a hit is the whole cost of a call (every op makes one)
    if mod is not None:
        return mod
    if name is None:
        name = "auto"
    elif not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    mod = _resolved.get((name, device.type))
    if mod is None:
        mod = _resolve(name, device)
        _resolved[(name, device.type)] = mod
    return mod


def _resolve(name, device):
    if name == "auto":
        name = _env_choice
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"{ENV_VAR} names an unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}")
        if name == "auto":
            reasons = []
            for cand in _AUTO.get(device.type, ("reference",)):
                ok, reason = status(cand)
                if ok and takes(get(cand), device):
                    return get(cand)
                reasons.append(f"{cand}: {reason or 'does not take ' + device.type + ' tensors'}")
            raise BackendUnavailableError(
                f"no fastddpm backend can run on device {device} ({'; '.join(reasons)})")
    ok, reason = status(name)
    if not ok:
        raise BackendUnavailableError(f"fastddpm backend {name!r} is not available: {reason}")
    mod = get(name)
    if not takes(mod, device):
        raise BackendUnavailableError(
            f"fastddpm backend {name!r} runs on {'/'.join(mod.device_types)} tensors, got a tensor on {device}")
    return mod
