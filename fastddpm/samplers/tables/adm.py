"""The ADM family's tables (improved-diffusion, guided-diffusion, DiT), in float64, built once per
diffusion object: every formula that :mod:`fastddpm.adm` uses lives here.

- :func:`named_betas`: ADM's ``get_named_beta_schedule`` ("linear": linspace(1e-4 s, 0.02 s, T)
  with s = 1000 / T; "cosine" / "squaredcos_cap_v2": Nichol & Dhariwal's alpha_bar, betas capped
  at 0.999, which is :func:`fastddpm.schedule.cosine`).
- :func:`space_timesteps` and :func:`spaced_betas`: ADM's respacing (kept steps' alpha_bar, new
  beta_i = 1 - ab_i / ab of the previous kept step).
- :func:`vlb_table`: the fused ``vlb_loss`` op's [n, 9] table (schedule.VLB_COLUMNS).
- :func:`p_sample_coef`: ADM's ``p_sample`` as ONE ``solver_step`` ([n, 3, 8]; outputs
  ("prev", "x0")): row 0 forms x0 (eps: (sqrt_recip_ab, -sqrt_recipm1_ab); x0: (0, 1)), and
  holds (log_beta, post_logvar) in columns 3, 4 for the learned range ((1, -1) for a plain learned
  log variance); row 1 is post_c2 x + post_c1 x0 + zc z, zc = 1 for a learned variance (the
  kernel scales z by exp(0.5 logvar(var))), exp(0.5 fixed_logvar) for a fixed one, 0 at t = 0
  (ADM's nonzero_mask); row 2 is x0 (``pred_xstart``). Without z it is ``p_mean_variance``'s mean.
- :func:`ddim_coef`: ADM's ``ddim_sample``: DDIM with eps re-derived from the clipped x0
  (:func:`fastddpm.samplers.tables.step_tables`, ``eps_from_x0=True``), indexed by t.
- :func:`eps_coef`: eps from x_t and x0 (``_predict_eps_from_xstart``), for calc_bpd_loop.
"""
import math

import numpy as np
import torch

from ... import schedule as schedules
from . import COLUMNS, step_tables

SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")
MAX_BETA = 0.999


def named_betas(name, num_diffusion_timesteps) -> torch.Tensor:
    """ADM's get_named_beta_schedule as float64 betas (a ValueError names an unknown schedule)."""
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"unknown noise_schedule {name!r}; expected one of {list(SCHEDULES)}")
    if isinstance(num_diffusion_timesteps, bool) or not isinstance(num_diffusion_timesteps, (int, np.integer)):
        raise TypeError(f"the number of diffusion steps must be an int, got {type(num_diffusion_timesteps).__name__}")
    n = int(num_diffusion_timesteps)
    if n < 1:
        raise ValueError(f"the number of diffusion steps must be >= 1, got {n}")
    if name == "linear":
        scale = 1000 / n  # numpy's linspace, as ADM forms it (torch's rounds some betas differently)
        return schedules.from_betas(torch.from_numpy(np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)))
    return schedules.cosine(n, max_beta=MAX_BETA)


def space_timesteps(num_timesteps, section_counts) -> set:
    """ADM's space_timesteps: the set of original steps kept.

    ``section_counts``: a list of ints or a string "10,15,20" (equal sections of the T steps, the
    first T % k one longer, each strided evenly to its count), "250" (one section), or "ddimN" (the
    first integer stride i with len(range(0, T, i)) == N). "" keeps every step.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text == "":
            return set(range(T))
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: 'ddimN' needs an int N") from None
            for i in range(1, T):
                if len(range(0, T, i)) == desired:
                    return set(range(0, T, i))
            if desired == T:
                return set(range(T))
            raise ValueError(f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} "
                             f"of the {T} steps (len(range(0, {T}, stride)) == {desired})")
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r} must be '', 'ddimN', an int or "
                             "comma-separated ints such as '10,15,20'") from None
    try:
        counts = [int(c) for c in section_counts]
    except (TypeError, ValueError):
        raise ValueError(f"section_counts must be a string or a list of ints, got {section_counts!r}") from None
    if not counts:
        raise ValueError("section_counts is empty")
    if len(counts) > T:
        raise ValueError(f"timestep_respacing asks for {len(counts)} sections of only {T} steps")
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size} "
                             f"(section {i} of {len(counts)} over {T} steps; each count must lie in [1, {size}])")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    return set(kept)


def spaced_betas(betas, use_timesteps):
    """(new betas, timestep_map) of the kept steps (sorted): ADM's SpacedDiffusion."""
    betas = schedules.from_betas(betas)
    keep = sorted(int(i) for i in use_timesteps)
    if not keep or keep[0] < 0 or keep[-1] >= betas.numel():
        raise ValueError(f"use_timesteps must be non-empty steps in [0, {betas.numel()}), got {keep[:3]}...")
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    ab = alpha_bar[keep]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return schedules.from_betas(1 - ab / prev), torch.tensor(keep, dtype=torch.int64)


def model_timesteps(timestep_map, original_num_steps, rescale):
    """What the model receives at each index: the original step, or as float32 times
    1000 / T (ADM's rescale_timesteps, formed as ADM forms it)."""
    if rescale:
        return timestep_map.float() * (1000.0 / original_num_steps)
    return timestep_map.clone()


def alpha_bar_of(betas):
    """ADM's alphas_cumprod (float64 cumprod of 1 - beta)."""
    return torch.cumprod(1.0 - schedules.from_betas(betas), 0)


def vlb_table(betas, fixed_variance="small"):
    """[n, 9] float64: schedule.vlb_tables stacked in VLB_COLUMNS order (fixed_variance "small"
    for FIXED_SMALL, "large" for FIXED_LARGE; the learned types ignore that column)."""
    tab = schedules.vlb_tables(betas, fixed_variance)
    return torch.stack([tab[k] for k in schedules.VLB_COLUMNS], dim=1)


def x0_form(betas, mean_type):
    """(a, b) float64: the model's x0 = a x_t + b out (mean_type "eps" or "x0")."""
    tab = schedules.vlb_tables(betas)
    if mean_type == "eps":
        return tab["sqrt_recip_ab"], -tab["sqrt_recipm1_ab"]
    if mean_type == "x0":
        return torch.zeros_like(tab["sqrt_ab"]), torch.ones_like(tab["sqrt_ab"])
    raise ValueError(f"mean_type must be 'eps' or 'x0', got {mean_type!r}")


def p_sample_coef(betas, mean_type, variance_type):
    """[n, 3, 8] float64 solver_step tables of ADM's p_sample (see the module doc); variance_type
    "learned", "learned_range", "fixed_small" or "fixed_large"."""
    tab = schedules.vlb_tables(betas, "large" if variance_type == "fixed_large" else "small")
    n = tab["sqrt_ab"].numel()
    a, b = x0_form(betas, mean_type)
    coef = torch.zeros(n, 3, len(COLUMNS), dtype=torch.float64)
    coef[:, 0, 0], coef[:, 0, 1] = a, b
    if variance_type == "learned_range":
        coef[:, 0, 3], coef[:, 0, 4] = tab["log_beta"], tab["post_logvar"]
        z = torch.ones(n, dtype=torch.float64)
    elif variance_type == "learned":
        coef[:, 0, 3], coef[:, 0, 4] = 1.0, -1.0
        z = torch.ones(n, dtype=torch.float64)
    elif variance_type in ("fixed_small", "fixed_large"):
        z = (0.5 * tab["fixed_logvar"]).exp()
    else:
        raise ValueError(f"unknown variance_type {variance_type!r}")
    z[0] = 0.0  # ADM's nonzero_mask: no noise at t == 0
    coef[:, 1, 0], coef[:, 1, 2], coef[:, 1, 7] = tab["post_c2"], tab["post_c1"], z
    coef[:, 2, 2] = 1.0
    return coef


def mean_coef(p_coef):
    """The p_sample tables without noise: row 1 is p_mean_variance's mean, row 2 pred_xstart."""
    coef = p_coef.clone()
    coef[:, 1, 7] = 0.0
    return coef


def add_noise_coef(p_coef):
    """[n, 2, 8]: x + zc z with p_sample's noise coefficient and variance columns (the last part
    of a p_sample whose mean was formed elsewhere: classifier guidance's shifted mean)."""
    coef = torch.zeros(p_coef.shape[0], 2, p_coef.shape[2], dtype=torch.float64)
    coef[:, 0, 3:5] = p_coef[:, 0, 3:5]
    coef[:, 1, 0] = 1.0
    coef[:, 1, 7] = p_coef[:, 1, 7]
    return coef


def fixed_logvar(betas, variance_type):
    """The fixed model log variance per t (FIXED_SMALL: posterior_log_variance_clipped; FIXED_LARGE:
    log(append(posterior_variance[1], betas[1:])))."""
    return schedules.vlb_tables(betas, "large" if variance_type == "fixed_large" else "small")["fixed_logvar"]


def ddim_coef(betas, mean_type, eta):
    """[n, 3, 8] float64 solver_step tables of ADM's ddim_sample, row k for t = k (outputs
    ("prev", "x0")): x0 clipped as configured, eps re-derived from it, sigma = eta sqrt((1 -
    ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev), no noise at t == 0, ab_prev 1 there."""
    ab = alpha_bar_of(betas)
    n = ab.numel()
    ts = torch.arange(n, dtype=torch.int64)
    st = step_tables(ab, ts, "ddim", eta=float(eta), prediction=mean_type, final_alpha_one=True,
                     ts_prev=ts - 1, noisy=ts != 0, eps_from_x0=True)
    coef = torch.zeros(n, 3, len(COLUMNS), dtype=torch.float64)
    coef[:, 0, 0], coef[:, 0, 1] = st["a"], st["b"]
    coef[:, 1, 0], coef[:, 1, 1], coef[:, 1, 2], coef[:, 1, 7] = st["q"], st["r"], st["p"], st["s"]
    coef[:, 2, 2] = 1.0
    return coef


def eps_coef(betas):
    """[n, 2, 8]: with x0 given as ``out`` (row 0 takes it as is), the output row is ADM's
    _predict_eps_from_xstart: (sqrt_recip_ab x_t - x0) / sqrt_recipm1_ab."""
    tab = schedules.vlb_tables(betas)
    n = tab["sqrt_ab"].numel()
    coef = torch.zeros(n, 2, len(COLUMNS), dtype=torch.float64)
    coef[:, 0, 1] = 1.0
    coef[:, 1, 0] = tab["sqrt_recip_ab"] / tab["sqrt_recipm1_ab"]
    coef[:, 1, 2] = -1.0 / tab["sqrt_recipm1_ab"]
    return coef


def prior_table(betas):
    """(mean coefficient, log variance) of q(x_T | x0) at the last step: sqrt(ab_T), log(1 - ab_T)
    (ADM's _prior_bpd against N(0, I))."""
    tab = schedules.vlb_tables(betas)
    return float(tab["sqrt_ab"][-1]), float(math.log(float(tab["sqrt_1m_ab"][-1]) ** 2))
