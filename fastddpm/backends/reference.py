"""The reference backend: the formulas of docs/architecture.md in plain PyTorch, the oracle for every kernel.

Inputs arrive validated by ``fastddpm.ops``. Half and bfloat16 compute in float32, float64 in
float64; autograd is PyTorch's own.
"""
import sys

import torch

from .. import objectives, philox
from . import composite
from .._checks import compute_dtype
from ..schedule import gather

name = "reference"
device_types = None  # any device


_self = sys.modules[__name__]  # this module, as composite's backend


def available():
    return True, ""


def _noise(noise, seed, sample_offset, like):
    if noise is not None:
        return noise
    return philox.normal(seed, sample_offset, like.shape, like.device)


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    cdt = compute_dtype(x0.dtype)
    eps = _noise(noise, seed, sample_offset, x0).to(cdt)
    x_t = gather(sqrt_ab, t, x0, cdt) * x0.to(cdt) + gather(sqrt_1m_ab, t, x0, cdt) * eps
    return x_t.to(x0.dtype)


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    cdt = compute_dtype(x_t.dtype)
    z = _noise(noise, seed, sample_offset, x_t).to(cdt)
    x_prev = (gather(c1, t, x_t, cdt) * x_t.to(cdt)
              - gather(c2, t, x_t, cdt) * eps_theta.to(cdt)
              + gather(sigma, t, x_t, cdt) * z)
    return x_prev.to(x_t.dtype)


def mse_per_sample(pred, target, seed, sample_offset):
    acc = compute_dtype(pred.dtype)
    target = _noise(target, seed, sample_offset, pred)
    diff = pred.to(acc) - target.to(acc)
    return (diff * diff).flatten(1).mean(dim=1) if pred.dim() > 1 else diff * diff


def solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset, var=None):
    cdt = compute_dtype(x.dtype)
    xc, o = x.to(cdt), out.to(cdt)
    if out_cond is not None:
        o = o + guidance * (out_cond.to(cdt) - o)
    c = coef.to(cdt)[t]  # [B, R + 1, 8]: each sample's rows

    def k(row, col):
        return c[:, row, col].view((-1,) + (1,) * (x.dim() - 1))

    x0 = k(0, 0) * xc + k(0, 1) * o
    if bound is not None:
        lim = bound.to(cdt).view((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.maximum(torch.minimum(x0, lim), -lim) / lim
    elif clip != float("inf"):
        x0 = x0.clamp(-clip, clip)
    operands = [xc, o, x0] + [h.to(cdt) for h in history]
    z = _noise(noise, seed, sample_offset, x).to(cdt)
    if var is not None:  # a learned variance: z scaled per element (objectives.learned_logvar)
        z = z * torch.exp(0.5 * objectives.learned_logvar(var.to(cdt), k(0, 4), k(0, 3), "learned_range"))
    rows = []
    for r in range(1, c.shape[1]):
        y = torch.zeros_like(xc)
        for col, v in enumerate(operands):
            y = y + k(r, col) * v
        rows.append(y + k(r, 7) * z)
    return torch.stack(rows).to(x.dtype)


def vlb_loss(x0, out, t, tables, noise, seed, sample_offset, mean_type, variance_type, detach_mean):
    eps = _noise(noise, seed, sample_offset, x0)
    return objectives.vlb_terms(x0, out, t, tables, eps, objectives.MEAN_TYPES[mean_type],
                                objectives.VARIANCE_TYPES[variance_type], detach_mean)


def target_mse(pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    acc = compute_dtype(pred.dtype)
    eps = _noise(noise, seed, sample_offset, pred).to(acc)
    target = gather(cx0, t, pred, acc) * x0.to(acc) + gather(ceps, t, pred, acc) * eps
    diff = pred.to(acc) - target
    return (diff * diff).flatten(1).mean(dim=1) if pred.dim() > 1 else diff * diff


def sample_t(seed, batch, n_steps, sample_offset):
    return philox.timesteps(seed, batch, n_steps, sample_offset)


def normal(seed, size, sample_offset, dtype):
    return philox.normal(seed, sample_offset, size).to(dtype).contiguous()


def train_inputs(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise):
    return composite.train_inputs(_self, x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise)


def mse_loss(pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    return composite.mse_loss(_self, pred, target, seed, sample_offset, weight, x0, t, cx0, ceps)


# The reference is PyTorch autograd: it saves what PyTorch saves.
def materialises_noise(dtype) -> bool:
    return False
