"""Calls of the compiled ops ``torch.ops.fastddpm.*``, shared by the cpu and cuda backends.

The dispatcher picks the CPU or CUDA kernel from the tensors' device. Autograd is C++
(csrc/autograd.cpp), cheap enough to call the ops as they are whether or not a gradient flows;
the fake kernels are fastddpm._autograd's, registered by fastddpm._extension when _C loads.
"""
import torch


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    return torch.ops.fastddpm.q_sample.default(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    return torch.ops.fastddpm.p_sample_step.default(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)


def mse_per_sample(pred, target, seed, sample_offset):
    return torch.ops.fastddpm.mse_per_sample.default(pred, target, seed, sample_offset)


def sample_t(seed, batch, n_steps, sample_offset):
    return torch.ops.fastddpm.sample_t.default(seed, batch, n_steps, sample_offset)


def normal(seed, size, sample_offset, dtype):
    return torch.ops.fastddpm.normal.default(seed, list(size), sample_offset, dtype)


def solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset, var=None):
    return torch.ops.fastddpm.solver_step.default(x, out, out_cond, list(history), t, coef, bound, clip, guidance,
                                                  noise, seed, sample_offset, var)


def vlb_loss(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean):
    return torch.ops.fastddpm.vlb_loss.default(x0, out, t, tables, noise, seed, sample_offset, mean_type,
                                               variance_type, detach_mean)


def target_mse(pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    return torch.ops.fastddpm.target_mse.default(pred, x0, t, cx0, ceps, noise, seed, sample_offset)
