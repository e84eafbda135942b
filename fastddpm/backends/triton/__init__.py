"""The triton backend: Triton kernels as ``torch.ops.fastddpm_triton.*`` (see triton_ops).

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before Triton is imported (as CI does)
it also takes CPU tensors and runs the same kernels in Triton's interpreter.
"""
import os

import torch

from ..._autograd import call_op

name = "triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
device_types = ("cuda", "cpu") if INTERPRET else ("cuda",)

try:  # importing triton_ops registers the ops; it needs Triton and torch >= 2.6
    from . import ops as _ops
    _import_error = None
except ImportError as e:
    _ops, _import_error = None, e


def available():
    if _ops is None:
        return False, f"Triton (with torch >= 2.6's torch.library.triton_op) is not importable: {_import_error}"
    if not INTERPRET and not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing Triton to run on CPU)"
    return True, ""


def _op(name):
    return getattr(torch.ops.fastddpm_triton, name).default


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    return call_op(_op("q_sample"), (x0, noise), (x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset))


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    return call_op(_op("p_sample_step"), (x_t, eps_theta, noise),
                   (x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset))


def mse_per_sample(pred, target, seed, sample_offset):
    return call_op(_op("mse_per_sample"), (pred, target), (pred, target, seed, sample_offset))


def sample_t(seed, batch, n_steps, sample_offset):
    return call_op(_op("sample_t"), (), (seed, batch, n_steps, sample_offset))


def normal(seed, size, sample_offset, dtype):
    return call_op(_op("normal"), (), (seed, list(size), sample_offset, dtype))
