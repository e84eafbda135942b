"""The triton backend: Triton kernels as ``torch.ops.fastddpm_triton.*`` (see triton_ops).

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before Triton is imported (as CI does)
it also takes CPU tensors and runs the same kernels in Triton's interpreter.
"""
import os
import sys

import torch
import torch.autograd.forward_ad as fwAD

from .. import composite

name = "triton"
_self = sys.modules[__name__]  # this module, as composite's backend
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
    # Called as they are, through their Python autograd kernel even when no gradient flows:
    # skipping it (about 5 us a call) would take a private PyTorch API and a test of every way
    # a gradient can flow (forward AD included) to stay correct.
    return getattr(torch.ops.fastddpm_triton, name).default


def _check_no_forward_ad(op, *tensors):
    """Raise under forward-mode AD: register_autograd has no jvp formula, and an op whose inputs
    are dual tensors that do not require grad runs below autograd, with zero tangents."""
    if torch.compiler.is_compiling():
        return
    for x in tensors:
        if x is not None and fwAD.unpack_dual(x).tangent is not None:
            raise RuntimeError(f"fastddpm: {op} on the triton backend has no forward-mode AD (torch.func.jvp, "
                               "torch.autograd.forward_ad); use backend='reference' for it")


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    _check_no_forward_ad("q_sample", x0, sqrt_ab, sqrt_1m_ab, noise)
    return _op("q_sample")(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    _check_no_forward_ad("p_sample_step", x_t, eps_theta, c1, c2, sigma, noise)
    return _op("p_sample_step")(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)


def mse_per_sample(pred, target, seed, sample_offset):
    _check_no_forward_ad("mse_per_sample", pred, target)
    return _op("mse_per_sample")(pred, target, seed, sample_offset)


def solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset, var=None):
    _check_no_forward_ad("solver_step", x, out, out_cond, *history, coef, bound, noise, var)
    return _op("solver_step")(x, out, out_cond, list(history), t, coef, bound, clip, guidance, noise, seed,
                              sample_offset, var)


def vlb_loss(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean):
    _check_no_forward_ad("vlb_loss", x0, out, tables, noise)
    return _op("vlb_loss")(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean)


def target_mse(pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    _check_no_forward_ad("target_mse", pred, x0, cx0, ceps, noise)
    return _op("target_mse")(pred, x0, t, cx0, ceps, noise, seed, sample_offset)


def sample_t(seed, batch, n_steps, sample_offset):
    return _op("sample_t")(seed, batch, n_steps, sample_offset)


def normal(seed, size, sample_offset, dtype):
    return _op("normal")(seed, list(size), sample_offset, dtype)


def train_inputs(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise):
    return composite.train_inputs(_self, x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise)


def mse_loss(pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    return composite.mse_loss(_self, pred, target, seed, sample_offset, weight, x0, t, cx0, ceps)


def materialises_noise(dtype) -> bool:
    """Regenerating noise is nearly free on a GPU and memory is dear: loss stores no noise tensor."""
    return False
