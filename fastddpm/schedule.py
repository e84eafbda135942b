"""Variance schedules, built and validated in float64.

A schedule is a 1-D float64 tensor of betas, beta_1..beta_T, indexed 0..T-1 by ``t``.
"""
import math
import operator

import torch

__all__ = ["linear", "cosine", "scaled_linear", "sigmoid", "rescale_zero_terminal_snr", "rescale_finite_terminal_snr",
           "from_betas", "resolve", "coefficient_tables", "gather", "MAX_STEPS"]

# The most steps a schedule may have: 2**20, over a million. Each table of the class takes
# 8 bytes a step in float64 (plus float32 copies on the device), so a mistyped 2**40 would
# otherwise fail deep in the allocator or exhaust memory; sample_t's own limit is 2**31.
MAX_STEPS = 2**20


def from_betas(betas) -> torch.Tensor:
    """Validate a user schedule and return it as a float64 CPU tensor."""
    betas = torch.as_tensor(betas)
    if betas.dim() != 1:
        raise ValueError(f"betas must be 1-D, got shape {tuple(betas.shape)}")
    if betas.numel() < 1:
        raise ValueError("betas must have at least one step (n_steps >= 1)")
    if not (betas.is_floating_point() or betas.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"betas must be a real tensor, got dtype {betas.dtype}")
    if betas.numel() > MAX_STEPS:
        raise ValueError(f"betas must have at most 2**20 = {MAX_STEPS} steps (n_steps), got {betas.numel()}")
    betas = betas.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(betas).all()):
        raise ValueError("betas must be finite, got a NaN or infinite value")
    if not bool(((betas > 0) & (betas < 1)).all()):
        bad = betas[(betas <= 0) | (betas >= 1)][0].item()
        raise ValueError(f"every beta must lie in (0, 1), got {bad}")
    return betas


def _check_n_steps(n_steps) -> int:
    """n_steps as a Python int (NumPy integers accepted) in [1, MAX_STEPS]."""
    if isinstance(n_steps, (bool, torch.Tensor)) or type(n_steps).__name__ == "bool_":
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    try:
        n_steps = operator.index(n_steps)
    except TypeError:
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}") from None
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if n_steps > MAX_STEPS:
        raise ValueError(f"n_steps must be at most 2**20 = {MAX_STEPS}, got {n_steps}")
    return n_steps


def linear(n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """labml's schedule: ``linspace(1e-4, 0.02, n_steps)`` (Ho et al. 2020)."""
    n_steps = _check_n_steps(n_steps)
    return from_betas(torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64))


def cosine(n_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped."""
    n_steps = _check_n_steps(n_steps)
    steps = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((steps + s) / (1 + s) * (math.pi / 2)) ** 2
    betas = 1 - f[1:] / f[:-1]
    return from_betas(betas.clamp(max=max_beta))


def scaled_linear(n_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule (diffusers' "scaled_linear"): a linspace of sqrt(beta), squared."""
    n_steps = _check_n_steps(n_steps)
    return from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, n_steps, dtype=torch.float64) ** 2)


def sigmoid(n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """diffusers' "sigmoid": sigmoid(linspace(-6, 6, n_steps)) * (beta_end - beta_start) + beta_start."""
    n_steps = _check_n_steps(n_steps)
    ramp = torch.sigmoid(torch.linspace(-6, 6, n_steps, dtype=torch.float64))
    return from_betas(ramp * (beta_end - beta_start) + beta_start)


def _rescaled_alpha_bar(betas, name) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1, up to alpha_bar: sqrt(alpha_bar) shifted so its last value
    is 0 and scaled so its first is kept, then squared (float64; the last alpha_bar is 0)."""
    betas = from_betas(betas)
    if betas.numel() < 2:
        raise ValueError(f"{name} needs at least 2 steps (the first is kept, the last set to 0)")
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # The operations and their order are diffusers', so float64 input gives its result bit for bit.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def _betas_of(alpha_bar) -> torch.Tensor:
    """The betas whose cumulative product of (1 - beta) is ``alpha_bar``."""
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1, as diffusers' function of this name: shift and scale
    sqrt(alpha_bar) so its first value is kept and its last is 0, then back to betas.

    The last beta is exactly 1 (alpha_bar_T = 0, zero terminal SNR), which :func:`from_betas`
    and ``DenoiseDiffusion`` refuse: the step's coefficients are infinite there and eps
    prediction undefined. ``DenoiseDiffusion(zero_terminal_snr=True)`` uses
    :func:`rescale_finite_terminal_snr` instead. Returns float64 betas, computed in float64;
    diffusers computes in its input's dtype, so the two agree exactly on float64 betas.
    """
    return _betas_of(_rescaled_alpha_bar(betas, "rescale_zero_terminal_snr"))


# alpha_bar of the last step after rescale_finite_terminal_snr: 2**-24, as diffusers' Euler,
# DPM-Solver and UniPC schedulers set it. At exactly 0, c2 = beta / (sqrt(alpha) sqrt(1 - ab))
# with beta = 1 (alpha = 0) is infinite and 1/sqrt(alpha) too; 2**-24 keeps every table finite
# (in float32 as well) while SNR_T = 2**-24 / (1 - 2**-24) is zero for any practical purpose.
# Where the rescaled alpha_bar_{T-1} is itself below 2**-23 (e.g. 1000 linear steps: 4e-9), the
# last is alpha_bar_{T-1} / 2 instead, so that alpha_bar keeps falling and beta_T stays in (0, 1).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def rescale_finite_terminal_snr(betas) -> torch.Tensor:
    """:func:`rescale_zero_terminal_snr` with a finite terminal: what
    ``DenoiseDiffusion(zero_terminal_snr=True)`` trains and samples with.

    Every alpha_bar but the last is Lin et al.'s (and diffusers'); the last, which they set to 0
    (beta_T = 1), is :data:`ZERO_SNR_ALPHA_BAR` (2**-24, as diffusers' Euler, DPM-Solver and
    UniPC schedulers set it) or half of alpha_bar_{T-1} where that is smaller (e.g. 1000 linear
    steps, where beta_T is then 0.5). So beta_T stays in (0, 1) and every coefficient table is
    finite: x0 and v prediction train and sample through the terminal step, eps prediction with
    c1, c2 large but finite there.
    """
    alpha_bar = _rescaled_alpha_bar(betas, "rescale_finite_terminal_snr")
    alpha_bar[-1] = min(ZERO_SNR_ALPHA_BAR, alpha_bar[-2].item() / 2)
    return from_betas(_betas_of(alpha_bar))


_NAMED = {"linear": linear, "cosine": cosine, "scaled_linear": scaled_linear, "sigmoid": sigmoid}


def resolve(schedule, n_steps: int, zero_terminal_snr: bool = False) -> torch.Tensor:
    """A schedule name or a betas tensor -> validated float64 betas of length n_steps
    (rescaled by :func:`rescale_finite_terminal_snr` when ``zero_terminal_snr``)."""
    n_steps = _check_n_steps(n_steps)
    if not isinstance(zero_terminal_snr, bool):
        raise TypeError(f"zero_terminal_snr must be a bool, got {type(zero_terminal_snr).__name__}")
    if isinstance(schedule, str):
        if schedule not in _NAMED:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(_NAMED)} or a betas tensor")
        betas = _NAMED[schedule](n_steps)
    else:
        betas = from_betas(schedule)
        if betas.numel() != n_steps:
            raise ValueError(f"schedule has {betas.numel()} betas but n_steps is {n_steps}")
    return rescale_finite_terminal_snr(betas) if zero_terminal_snr else betas


def coefficient_tables(betas: torch.Tensor) -> dict:
    """Per-t tables in float64: the one place their formulas live.

    ``1 - alpha_bar`` is formed as ``-expm1(cumsum(log1p(-beta)))``: ``1 - cumprod(alpha)``
    rounds to 0 for a beta below 1e-16 and would make ``c2`` infinite. Every table is checked
    finite in float64 and in the float32 the kernels read.
    """
    betas = from_betas(betas)
    alpha = 1 - betas
    alpha_bar = torch.cumprod(alpha, 0)
    one_minus_ab = -torch.expm1(torch.cumsum(torch.log1p(-betas), 0))
    sigma2 = betas
    tables = {
        "beta": betas,
        "alpha": alpha,
        "alpha_bar": alpha_bar,
        "sigma2": sigma2,
        "sqrt_ab": alpha_bar.sqrt(),
        "sqrt_1m_ab": one_minus_ab.sqrt(),
        "c1": alpha.rsqrt(),
        "c2": betas / (alpha.sqrt() * one_minus_ab.sqrt()),
        "sigma": sigma2.sqrt(),
    }
    check_finite(tables, betas)
    return tables


# The columns of the variational bound's per-t table (vlb_tables), in the order the fused
# vlb_loss op reads them (csrc/fastddpm/op_args.h: VlbArgs).
VLB_COLUMNS = ("sqrt_ab", "sqrt_1m_ab", "post_c1", "post_c2", "post_logvar", "log_beta", "sqrt_recip_ab",
               "sqrt_recipm1_ab", "fixed_logvar")


def vlb_tables(betas: torch.Tensor, fixed_variance: str = "small") -> dict:
    """The per-t float64 tables of the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021,
    arXiv:2102.09672), named in VLB_COLUMNS: the posterior q(x_{t-1} | x_t, x0) has mean
    post_c1 x0 + post_c2 x_t with post_c1 = beta sqrt(ab_prev) / (1 - ab), post_c2 =
    (1 - ab_prev) sqrt(alpha) / (1 - ab), and variance beta (1 - ab_prev) / (1 - ab), whose log is
    taken with its first value replaced by the second (it is 0 at t = 0): post_logvar. log_beta
    is the learned range's upper end; the model's x0 from an eps prediction is sqrt_recip_ab x_t
    - sqrt_recipm1_ab eps. fixed_logvar is the model's log variance when it is not learned:
    "small" the posterior's (post_logvar), "large" log(beta) with its first value the
    posterior's second."""
    betas = from_betas(betas)
    if fixed_variance not in ("small", "large"):
        raise ValueError(f"fixed_variance must be 'small' or 'large', got {fixed_variance!r}")
    alpha = 1 - betas
    alpha_bar = torch.cumprod(alpha, 0)
    one_minus_ab = -torch.expm1(torch.cumsum(torch.log1p(-betas), 0))
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    post_var = betas * (1 - ab_prev) / one_minus_ab
    # t = 0 has posterior variance 0: its log is taken as the next step's, as ADM does.
    clipped = torch.cat([post_var[1:2], post_var[1:]]) if betas.numel() > 1 else betas.clone()
    large = torch.cat([post_var[1:2], betas[1:]]) if betas.numel() > 1 else betas.clone()
    tables = {
        "sqrt_ab": alpha_bar.sqrt(),
        "sqrt_1m_ab": one_minus_ab.sqrt(),
        "post_c1": betas * ab_prev.sqrt() / one_minus_ab,
        "post_c2": (1 - ab_prev) * alpha.sqrt() / one_minus_ab,
        "post_logvar": clipped.log(),
        "log_beta": betas.log(),
        "sqrt_recip_ab": alpha_bar.rsqrt(),
        "sqrt_recipm1_ab": (one_minus_ab / alpha_bar).sqrt(),
        "fixed_logvar": clipped.log() if fixed_variance == "small" else large.log(),
    }
    check_finite(tables, betas)
    return tables


def check_finite(tables: dict, betas: torch.Tensor):
    """Every per-t table finite in float64 and in float32; else a ValueError naming the table,
    the step and its beta."""
    for name, tab in tables.items():
        bad = ~(torch.isfinite(tab) & torch.isfinite(tab.float()))
        if bool(bad.any()):
            step = int(bad.nonzero()[0])
            raise ValueError(
                f"the schedule gives a non-finite {name} at step t={step} ({float(tab[step])!r} in float64, "
                f"{float(tab[step].float())!r} in float32, from beta={float(betas[step])!r}); "
                "choose betas whose coefficient tables are finite")


def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``table[t]`` shaped [B, 1, ..., 1] to broadcast against the batch ``like`` (in ``dtype``)."""
    per_sample = table[t.long()].view((-1,) + (1,) * (like.dim() - 1))
    return per_sample if dtype is None else per_sample.to(dtype)
