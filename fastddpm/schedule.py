"""Variance schedules, built and validated in float64.

A schedule is a 1-D float64 tensor of betas, beta_1..beta_T, indexed 0..T-1 by ``t``.
"""
import math

import torch

__all__ = ["linear", "cosine", "from_betas", "resolve", "coefficient_tables", "gather"]


def from_betas(betas) -> torch.Tensor:
    """Validate a user schedule and return it as a float64 CPU tensor."""
    betas = torch.as_tensor(betas)
    if betas.dim() != 1:
        raise ValueError(f"betas must be 1-D, got shape {tuple(betas.shape)}")
    if betas.numel() < 1:
        raise ValueError("betas must have at least one step (n_steps >= 1)")
    if not (betas.is_floating_point() or betas.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"betas must be a real tensor, got dtype {betas.dtype}")
    betas = betas.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(betas).all()):
        raise ValueError("betas must be finite, got a NaN or infinite value")
    if not bool(((betas > 0) & (betas < 1)).all()):
        bad = betas[(betas <= 0) | (betas >= 1)][0].item()
        raise ValueError(f"every beta must lie in (0, 1), got {bad}")
    return betas


def _check_n_steps(n_steps) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return n_steps


def linear(n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The seed's schedule: ``linspace(1e-4, 0.02, n_steps)`` (Ho et al. 2020)."""
    n_steps = _check_n_steps(n_steps)
    return from_betas(torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64))


def cosine(n_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped."""
    n_steps = _check_n_steps(n_steps)
    steps = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((steps + s) / (1 + s) * (math.pi / 2)) ** 2
    betas = 1 - f[1:] / f[:-1]
    return from_betas(betas.clamp(max=max_beta))


_NAMED = {"linear": linear, "cosine": cosine}


def resolve(schedule, n_steps: int) -> torch.Tensor:
    """A schedule name or a betas tensor -> validated float64 betas of length n_steps."""
    n_steps = _check_n_steps(n_steps)
    if isinstance(schedule, str):
        if schedule not in _NAMED:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(_NAMED)} or a betas tensor")
        return _NAMED[schedule](n_steps)
    betas = from_betas(schedule)
    if betas.numel() != n_steps:
        raise ValueError(f"schedule has {betas.numel()} betas but n_steps is {n_steps}")
    return betas


def coefficient_tables(betas: torch.Tensor) -> dict:
    """Per-t tables in float64 (DESIGN.md, Layers): the one place their formulas live."""
    betas = from_betas(betas)
    alpha = 1 - betas
    alpha_bar = torch.cumprod(alpha, 0)
    sigma2 = betas
    return {
        "beta": betas,
        "alpha": alpha,
        "alpha_bar": alpha_bar,
        "sigma2": sigma2,
        "sqrt_ab": alpha_bar.sqrt(),
        "sqrt_1m_ab": (1 - alpha_bar).sqrt(),
        "c1": alpha.rsqrt(),
        "c2": betas / (alpha.sqrt() * (1 - alpha_bar).sqrt()),
        "sigma": sigma2.sqrt(),
    }


def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``table[t]`` shaped [B, 1, ..., 1] to broadcast against the batch ``like`` (in ``dtype``)."""
    per_sample = table[t.long()].view((-1,) + (1,) * (like.dim() - 1))
    return per_sample if dtype is None else per_sample.to(dtype)
