"""Calls of the compiled ops ``torch.ops.fastddpm.*``, shared by the cpu and cuda backends.

The dispatcher picks the CPU or CUDA kernel from the tensors' device. Autograd and fake kernels
are the shared ones of fastddpm._autograd, registered by fastddpm._extension when _C loads.
"""
import torch

from .._autograd import call_op as _call


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    return _call(torch.ops.fastddpm.q_sample.default, (x0, noise),
                 (x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset))


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    return _call(torch.ops.fastddpm.p_sample_step.default, (x_t, eps_theta, noise),
                 (x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset))


def mse_per_sample(pred, target, seed, sample_offset):
    return _call(torch.ops.fastddpm.mse_per_sample.default, (pred, target), (pred, target, seed, sample_offset))


def sample_t(seed, batch, n_steps, sample_offset):
    return _call(torch.ops.fastddpm.sample_t.default, (), (seed, batch, n_steps, sample_offset))


def normal(seed, size, sample_offset, dtype):
    return _call(torch.ops.fastddpm.normal.default, (), (seed, list(size), sample_offset, dtype))
