"""Calls of the compiled ops ``torch.ops.fastddpm.*``, shared by the cpu and cuda backends.

The dispatcher picks the CPU or CUDA kernel from the tensors' device. Autograd is C++
(csrc/autograd.cpp, csrc/train_ops.cpp), cheap enough to call the ops as they are whether or not
a gradient flows; the fake kernels are fastddpm._autograd's, registered by fastddpm._extension
when _C loads.

In eager mode the hot ops are called through ``fastddpm._C``'s direct calls (csrc/fast_calls.cpp):
the same dispatcher call without torch.ops' generic argument parsing, which costs more than the
kernels at small sizes. A call they do not take (a tensor subclass, a __torch_function__ mode)
returns NotImplemented and goes through torch.ops; so does every call while torch.compile
traces, which sees torch.ops only.
"""
import torch

from .. import _extension

_fast = _extension.load()  # None when _C is absent: the backends using this module are then unavailable
_compiling = torch.compiler.is_compiling


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    if not _compiling():
        y = _fast.q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.q_sample.default(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    if not _compiling():
        y = _fast.p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.p_sample_step.default(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)


def mse_per_sample(pred, target, seed, sample_offset):
    if not _compiling():
        y = _fast.mse_per_sample(pred, target, seed, sample_offset)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.mse_per_sample.default(pred, target, seed, sample_offset)


def mse_loss(pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    if not _compiling():
        y = _fast.mse_loss(pred, target, seed, sample_offset, weight, x0, t, cx0, ceps)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.mse_loss.default(pred, target, seed, sample_offset, weight, x0, t, cx0, ceps)


def train_inputs(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise):
    if not _compiling():
        y = _fast.train_inputs(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.train_inputs.default(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset,
                                                   keep_noise)


def sample_t(seed, batch, n_steps, sample_offset):
    return torch.ops.fastddpm.sample_t.default(seed, batch, n_steps, sample_offset)


def normal(seed, size, sample_offset, dtype):
    return torch.ops.fastddpm.normal.default(seed, list(size), sample_offset, dtype)


def solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset, var=None):
    if not _compiling():
        y = _fast.solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset,
                              var)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.solver_step.default(x, out, out_cond, list(history), t, coef, bound, clip, guidance,
                                                  noise, seed, sample_offset, var)


def vlb_loss(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean):
    if not _compiling():
        y = _fast.vlb_loss(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.vlb_loss.default(x0, out, t, tables, noise, seed, sample_offset, mean_type,
                                               variance_type, detach_mean)


def target_mse(pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    if not _compiling():
        y = _fast.target_mse(pred, x0, t, cx0, ceps, noise, seed, sample_offset)
        if y is not NotImplemented:
            return y
    return torch.ops.fastddpm.target_mse.default(pred, x0, t, cx0, ceps, noise, seed, sample_offset)
