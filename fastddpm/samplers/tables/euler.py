"""Euler and Euler-ancestral (Karras et al. 2022, k-diffusion; diffusers' EulerDiscreteScheduler
and EulerAncestralDiscreteScheduler) as :class:`~fastddpm.samplers.tables.Plan` tables, float64.

Both work on the VE sample x_VE = x_VP sqrt(1 + s^2), s = sqrt((1 - ab) / ab). Step i goes from
s = sigma_i to s' = sigma_{i+1}; with the model output ``out`` read as
    x0 = A x_VE + B out:  eps A = 1, B = -s;  v A = 1 / (1 + s^2), B = -s / sqrt(1 + s^2);
                          x0 ("sample") A = 0, B = 1,
and r = s' / s:
    Euler:          x' = x + (x - x0) / s (s' - s)          = r x + (1 - r) x0
    Euler-ancestral: s_up = sqrt(s'^2 (s^2 - s'^2) / s^2) = s' sqrt(1 - r^2),
                    s_down = sqrt(s'^2 - s_up^2) = s' r,
                    x' = x + (x - x0) / s (s_down - s) + s_up z = r^2 x + (1 - r^2) x0 + s_up z
(s_down is formed as s' r: diffusers' float32 sqrt(s'^2 - s_up^2) loses it, or turns NaN, when
s' << s). In VP coordinates (alpha = 1 / sqrt(1 + s^2), sigma_t = s alpha; the model receives
x_VP itself) the step is alpha' times the VE one, with x_VE = x_VP / alpha and x0 from the VP
forms (eps a = 1 / alpha, b = -sigma_t / alpha; v a = alpha, b = -sigma_t; x0 a = 0, b = 1).
Euler is then DDIM with eta = 0 (x' = sigma_t'/sigma_t x + (alpha' - sigma_t' alpha / sigma_t)
x0) and Euler-ancestral DDIM with eta = 1. alpha = 0 (ab = 0, s = inf) is allowed where x0 is
finite there (v and x0 prediction): r = 0 and the step is x' = alpha' x0 (+ sigma_t' z).

Every step's outputs are ("prev", "x0"); nothing is kept between steps. Churn (diffusers'
``s_churn``, VE only): step i first raises s to s_hat = s (1 + gamma_i), x_hat = x + c z with
c = s_noise sqrt(s_hat^2 - s^2); eps reads x0 = x_hat - s_hat out (v keeps s, as diffusers
does), and the Euler step runs from s_hat: x' = (s'/s_hat) x_hat + (1 - s'/s_hat) x0.
"""
import torch

from . import COLUMNS, OUT, X, X0, Z, Plan, _choice, karras_sigmas, sigma_to_t, sigmas_of
from . import timesteps as spaced_timesteps

PREDICTIONS = ("eps", "x0", "v")
FINAL_SIGMAS = ("zero", "sigma_min")


def _alpha_sigma(s):
    """(alpha, sigma_t) of VE sigmas s (float64), alpha = 0 and sigma_t = 1 where s is inf."""
    inf = torch.isinf(s)
    alpha = torch.where(inf, torch.zeros_like(s), 1 / (1 + s * s).sqrt())
    sigma_t = torch.where(inf, torch.ones_like(s), s * alpha)
    return alpha, sigma_t


def _x0_forms(prediction, alpha, sigma_t):
    """(a, b): x0 = a x_VP + b out (VP coordinates)."""
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    if prediction == "eps":
        return 1 / alpha, -sigma_t / alpha
    if prediction == "x0":
        return zero, one
    return alpha, -sigma_t


def coefficients(sigmas, n, prediction="eps", *, ancestral=False, vp=False, gamma=None, s_noise=1.0):
    """coef float64 [n, 3, 8] of the steps sigma_i -> sigma_{i+1}, i < n (module doc): rows
    (x0 form, prev, x0). ``vp``: VP coordinates, else VE. ``gamma`` [n] (VE Euler only): churn."""
    _choice("prediction", prediction, PREDICTIONS)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sig.dim() != 1 or sig.numel() < n + 1:
        raise ValueError(f"need at least {n + 1} sigmas for {n} steps, got {tuple(sig.shape)}")
    s, s_next = sig[:n], sig[1:n + 1]
    if bool((s <= 0).any()) or bool(torch.isnan(sig[:n + 1]).any()) or bool((s_next < 0).any()):
        raise ValueError(f"sigmas must be > 0 (>= 0 for the last), got {sig[:n + 1].tolist()}")
    if bool(torch.isinf(s_next).any()):
        raise ValueError("only the first sigma may be infinite (alpha_bar = 0)")
    if ancestral and bool((s_next > s).any()):
        raise ValueError("Euler-ancestral needs non-increasing sigmas")
    alpha, sigma_t = _alpha_sigma(s)
    alpha_n, _ = _alpha_sigma(s_next)
    a, b = _x0_forms(prediction, alpha, sigma_t)  # VP forms
    coef = torch.zeros(n, 3, len(COLUMNS), dtype=torch.float64)
    if gamma is not None:
        if ancestral or vp:
            raise ValueError("churn (gamma) applies to VE Euler only")
        g = torch.as_tensor(gamma, dtype=torch.float64)
        s_hat = s * (1 + g)
        c = s_noise * (s_hat * s_hat - s * s).clamp(min=0).sqrt()
        A = a * alpha  # VE x0 forms
        B = -s_hat if prediction == "eps" else b
        rh = s_next / s_hat
        kx = rh + (1 - rh) * A  # prev = kx x_hat + (1 - rh) B out
        coef[:, 0, X], coef[:, 0, OUT] = A, B
        coef[:, 1, X], coef[:, 1, OUT], coef[:, 1, Z] = kx, (1 - rh) * B, kx * c
        coef[:, 2, X], coef[:, 2, OUT], coef[:, 2, Z] = A, B, A * c
        _check_finite(coef, prediction)
        return coef
    r = torch.where(torch.isinf(s), torch.zeros_like(s), s_next / s)
    if ancestral:
        kx_ve, kz_ve = r * r, s_next * (1 - r * r).clamp(min=0).sqrt()
    else:
        kx_ve, kz_ve = r, torch.zeros_like(r)
    k0 = 1 - kx_ve
    if vp:
        # x' = alpha' (kx_ve x_VP / alpha + k0 x0 + kz_ve z); kx_ve / alpha -> 0 where alpha = 0.
        kx = torch.where(alpha > 0, alpha_n * kx_ve / torch.where(alpha > 0, alpha, torch.ones_like(alpha)),
                         torch.zeros_like(alpha))
        k0, kz, A, B = alpha_n * k0, alpha_n * kz_ve, a, b
    else:
        kx, kz, A, B = kx_ve, kz_ve, a * alpha, b
        if prediction == "eps":
            A, B = torch.ones_like(s), -s  # exactly diffusers' x - s out
    coef[:, 0, X], coef[:, 0, OUT] = A, B
    coef[:, 1, X], coef[:, 1, OUT], coef[:, 1, Z] = kx + k0 * A, k0 * B, kz
    coef[:, 2, X0] = 1.0
    _check_finite(coef, prediction)
    return coef


def _check_finite(coef, prediction):
    if not bool(torch.isfinite(coef).all()):
        i = int(torch.nonzero(~torch.isfinite(coef).flatten(1).all(1))[0])
        raise ValueError(f"step {i}: prediction={prediction!r} gives no finite x0 there (alpha_bar = 0 needs "
                         "'v' or 'x0' prediction)")


def build(sigmas, timesteps, prediction="eps", *, ancestral=False, vp=False, gamma=None, s_noise=1.0) -> Plan:
    """The Plan of len(timesteps) steps over ``sigmas`` (at least n + 1 values, kept as given).
    VE plans carry input_scale = 1 / sqrt(1 + sigma_i^2) (scale_model_input)."""
    n = len(timesteps)
    coef = coefficients(sigmas, n, prediction, ancestral=ancestral, vp=vp, gamma=gamma, s_noise=s_noise)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    scale = None if vp else _alpha_sigma(sig[:n])[0]
    return Plan(coef, ("prev", "x0"), timesteps, sigmas, input_scale=scale)


def plan(alpha_bar, steps, *, prediction="eps", spacing="linspace", steps_offset=0, ancestral=False,
         karras=False, final_sigmas_type="zero") -> Plan:
    """The native Euler (``ancestral=False``, kind "euler") or Euler-ancestral (kind "euler_a")
    plan over train schedule ``alpha_bar`` in VP coordinates (x_T ~ N(0, I), the model receives
    x itself): the VE steps of the module doc between sigma_i = sigma(t_i) at the spaced integer
    timesteps t_i (tables.timesteps) and a final sigma of 0 (``final_sigmas_type="zero"``) or
    sigma(0) ("sigma_min", Euler only; the result is then x at that noise level).

    ``karras=True`` (Euler only, as diffusers' use_karras_sigmas): Karras et al.'s sigmas from
    sigma(t_{n-1}) to sigma(t_0), the model receiving the rounded log-sigma-interpolated timestep.
    alpha_bar may end in 0 (zero terminal SNR) with prediction "v" or "x0".
    """
    _choice("prediction", prediction, PREDICTIONS)
    _choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    if not isinstance(ancestral, bool) or not isinstance(karras, bool):
        raise TypeError(f"ancestral and karras must be bools, got {ancestral!r}, {karras!r}")
    if ancestral and karras:
        raise ValueError("karras applies to kind='euler' only (diffusers' Euler-ancestral has no Karras sigmas)")
    if ancestral and final_sigmas_type != "zero":
        raise ValueError(f"final_sigmas_type applies to kind='euler' only, got {final_sigmas_type!r} with 'euler_a'")
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    if alpha_bar.dim() != 1 or not bool(((alpha_bar >= 0) & (alpha_bar <= 1)).all()):
        raise ValueError("alpha_bar must be a 1-d schedule in [0, 1]")
    train = sigmas_of(alpha_bar)
    ts = spaced_timesteps(alpha_bar.numel(), steps, spacing, steps_offset)
    sig = train[ts]
    if karras:
        if not bool(torch.isfinite(sig).all()):
            raise ValueError("karras needs a finite sigma_max (alpha_bar > 0 at the first timestep)")
        sig = karras_sigmas(float(sig[-1]), float(sig[0]), steps)
        ts = sigma_to_t(sig, torch.as_tensor(train, dtype=torch.float64).clamp(min=1e-300).log()).round().to(torch.int64)
    last = train[0] if final_sigmas_type == "sigma_min" else torch.zeros((), dtype=torch.float64)
    sigmas = torch.cat([sig, last.reshape(1)])
    return build(sigmas, ts, prediction, ancestral=ancestral, vp=True)
