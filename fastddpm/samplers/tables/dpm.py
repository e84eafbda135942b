"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): multistep, ODE or SDE, orders 1-3, as a Plan.

State (VP): sigma_i the VE noise level of step i, alpha = 1 / sqrt(1 + sigma^2), sigma_vp =
sigma alpha, lambda = log(alpha / sigma_vp) = -log(sigma). Step i goes from s0 = sigma_i to
t = sigma_{i+1}; h = lambda_t - lambda_s0, r0 = (lambda_s0 - lambda_s1) / h,
r1 = (lambda_s1 - lambda_s2) / h. The model output becomes the data prediction
x0_i = P_i x_i + Q_i out_i (eps: 1/alpha, -sigma_vp/alpha; v: alpha, -sigma_vp; x0: 0, 1), and

    x_{i+1} = A x_i + B0 x0_i + B1 x0_{i-1} + B2 x0_{i-2} + C z

with g = h (ODE) or 2 h (SDE), phi = alpha_t (1 - e^-g), psi = alpha_t (1 - (1 - e^-g) / g),
chi = alpha_t ((e^-g - 1 + g) / g^2 - 1/2):
    A = sigma_vp,t / sigma_vp,s0 (ODE), times e^-h (SDE);  C = 0 (ODE), sigma_vp,t sqrt(1 - e^-2h) (SDE);
    order 1:       B0 = phi;
    2M midpoint:   B0 = phi (1 + 1/(2 r0)),  B1 = -phi / (2 r0);
    2M heun:       B0 = phi + psi / r0,      B1 = -psi / r0;
    3M (c = r0/(r0+r1), d = 1/(r0+r1)):
                   B0 = phi + psi (1+c)/r0 - chi d/r0,
                   B1 = -psi ((1+c)/r0 + c/r1) + chi d (1/r0 + 1/r1),
                   B2 = psi c/r1 - chi d/r1.
These are the exact exponential integrals of the Taylor-expanded data prediction (the SDE's
weight 2 e^{-2(lambda_t - lambda)} gives the same forms with g = 2h). diffusers' SDE order-3
step adds its D2 term with the wrong sign of the 1/2 (k-diffusion's ``sample_dpmpp_3m_sde``
and the integral above agree); here it is the exact one. A step with h = 0 (two equal sigmas,
as Karras sigmas with final_sigmas_type "sigma_min" give at the end) is the identity
x_{i+1} = x_i, the limit h -> 0 of every form (diffusers' heun and order-3 forms give 0/0 = NaN
there). A step to sigma = 0 (final_sigmas_type "zero") is order 1 with A = 0, B0 = 1: x0.

The order of each step follows diffusers' step(): ``order`` once ``order - 1`` earlier steps of
the run exist (the warm-up), lowered at the last step to 1 (``euler_at_final``, or
``lower_order_final`` with fewer than 15 steps, or final sigma 0) and at the one before it to
at most 2 (``lower_order_final`` with fewer than 15 steps).

Outputs: "prev", and "m" (x0_i, pushed onto the history) when ``order`` > 1; depth order - 1.
"""
import math

import numpy as np
import torch

from . import COLUMNS, H0, OUT, SPACINGS, X, X0, Z, Plan, _choice, karras_sigmas, multistep_timesteps, sigma_to_t, sigmas_of

ORDERS = (1, 2, 3)
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")
PREDICTIONS = ("eps", "x0", "v")
LOWER_ORDER_STEPS = 15  # lower_order_final lowers the last steps of runs shorter than this


def _phi(g):
    return 1.0 if math.isinf(g) else -math.expm1(-g)


def _psi(g):
    """1 - (1 - e^-g) / g (-> g/2 as g -> 0)."""
    if math.isinf(g):
        return 1.0
    if g < 1e-3:
        return g / 2 - g * g / 6 + g ** 3 / 24 - g ** 4 / 120
    return 1.0 + math.expm1(-g) / g


def _chi(g):
    """(e^-g - 1 + g) / g^2 - 1/2 (-> -g/6 as g -> 0)."""
    if math.isinf(g):
        return -0.5
    if g < 1e-3:
        return -g / 6 + g * g / 24 - g ** 3 / 120 + g ** 4 / 720
    return (math.expm1(-g) + g) / (g * g) - 0.5


def step_orders(n, order, *, lower_order_final=True, euler_at_final=False, final_sigmas_type="zero", start=0):
    """The order of each step i = 0..n-1 of a run that starts at step ``start`` (diffusers' step())."""
    orders = []
    for i in range(n):
        warm = min(max(i - start, 0), order)
        short = lower_order_final and n < LOWER_ORDER_STEPS
        last = i == n - 1 and (euler_at_final or short or final_sigmas_type == "zero")
        second = i == n - 2 and short
        if order == 1 or warm < 1 or last:
            orders.append(1)
        elif order == 2 or warm < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def build(sigmas, timesteps, *, prediction="eps", order=2, solver_type="midpoint", sde=False,
          lower_order_final=True, euler_at_final=False, final_sigmas_type="zero", start=0) -> Plan:
    """The Plan over the run's VE ``sigmas`` (n + 1 values, the last the final one) and the
    ``timesteps`` the model receives (n): the builder the native sampler and the diffusers
    drop-in share (the drop-in passes diffusers' own sigmas and timesteps). ``start``: the step
    the run begins at (diffusers' begin_index): the warm-up counts from there."""
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).cpu().flatten()]
    ts = torch.as_tensor(timesteps).cpu().to(torch.int64)
    n = len(sig) - 1
    if ts.numel() != n or n < 1:
        raise ValueError(f"need n + 1 sigmas for n >= 1 timesteps, got {len(sig)} sigmas and {ts.numel()} timesteps")
    if any(not s >= 0 or math.isinf(s) for s in sig) or any(s == 0 for s in sig[:-1]):
        raise ValueError("sigmas must be finite and positive (the final one may be 0)")
    orders = step_orders(n, order, lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                         final_sigmas_type=final_sigmas_type, start=start)
    depth = order - 1
    outputs = ("prev", "m") if depth > 0 else ("prev",)
    # numpy while it is filled in element by element (a torch setitem costs microseconds: it
    # was most of set_timesteps), as unipc.build does.
    coef = np.zeros((n, len(outputs) + 1, len(COLUMNS)), dtype=np.float64)
    alpha = [1 / math.sqrt(1 + s * s) for s in sig]
    svp = [s * a for s, a in zip(sig, alpha)]
    lam = [math.inf if s == 0 else -math.log(s) for s in sig]
    for i in range(n):
        # row 0: the data prediction x0_i from (x_i, out_i)
        if prediction == "eps":
            coef[i, 0, X], coef[i, 0, OUT] = 1 / alpha[i], -svp[i] / alpha[i]
        elif prediction == "v":
            coef[i, 0, X], coef[i, 0, OUT] = alpha[i], -svp[i]
        else:
            coef[i, 0, OUT] = 1.0
        if depth > 0:
            coef[i, 2, X0] = 1.0
        row = coef[i, 1]
        h = lam[i + 1] - lam[i]
        if h == 0:  # two equal sigmas: the exact step is the identity
            row[X] = 1.0
            continue
        g = 2 * h if sde else h
        a_t = alpha[i + 1]
        phi, psi, chi = a_t * _phi(g), a_t * _psi(g), a_t * _chi(g)
        ratio = svp[i + 1] / svp[i]
        row[X] = ratio * (math.exp(-h) if sde else 1.0)
        if sde and h < 0:
            raise ValueError(f"step {i} raises sigma ({sig[i]} -> {sig[i + 1]}): the SDE variant needs sigmas "
                             "that do not increase")
        if sde:
            row[Z] = svp[i + 1] * math.sqrt(-math.expm1(-2 * h)) if not math.isinf(h) else 0.0
        k = orders[i]
        if k > 1 and math.isinf(h):
            raise ValueError(f"step {i} goes to sigma 0 at order {k}: only a first-order step can")
        b = [0.0, 0.0, 0.0]
        if k == 1:
            b[0] = phi
        elif k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            if solver_type == "midpoint":
                b[0], b[1] = phi * (1 + 1 / (2 * r0)), -phi / (2 * r0)
            else:
                b[0], b[1] = phi + psi / r0, -psi / r0
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            c, d = r0 / (r0 + r1), 1 / (r0 + r1)
            b[0] = phi + psi * (1 + c) / r0 - chi * d / r0
            b[1] = -psi * ((1 + c) / r0 + c / r1) + chi * d * (1 / r0 + 1 / r1)
            b[2] = psi * c / r1 - chi * d / r1
        row[X0] = b[0]
        row[H0], row[H0 + 1] = b[1], b[2]
    if not np.isfinite(coef).all():
        raise ValueError("DPM-Solver++ tables are not finite for these sigmas")
    return Plan(coef, outputs, ts, torch.tensor(sig, dtype=torch.float64), depth=depth)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def plan(alpha_bar, steps, *, prediction="eps", spacing="linspace", steps_offset=0, order=2, solver_type="midpoint",
         sde=False, lower_order_final=True, euler_at_final=False, karras=False, final_sigmas_type="zero") -> Plan:
    """The native DPM-Solver++ Plan over train schedule ``alpha_bar`` ([T], float64), VP coordinates.

    Options as diffusers' DPMSolverMultistepScheduler: ``order`` (solver_order) 1, 2 or 3;
    ``solver_type`` "midpoint" or "heun" (order 2); ``sde`` the SDE variant
    (algorithm_type "sde-dpmsolver++"; its steps draw noise); ``lower_order_final``,
    ``euler_at_final``; ``karras`` Karras sigmas between the schedule's extremes (timesteps
    from them); ``final_sigmas_type`` "zero" (the last step lands on x0) or "sigma_min"
    (on the schedule's smallest sigma). Timesteps as diffusers' DPM set_timesteps places them
    (:func:`fastddpm.samplers.tables.multistep_timesteps`).
    """
    _choice("prediction", prediction, PREDICTIONS)
    _choice("spacing", spacing, SPACINGS)
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    _choice("solver_type", solver_type, SOLVER_TYPES)
    _choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    for name, value in (("sde", sde), ("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final),
                        ("karras", karras)):
        _check_bool(name, value)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    n_train = alpha_bar.numel()
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps must lie in [1, n_steps={n_train}], got {steps}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int):
        raise TypeError(f"steps_offset must be an int, got {type(steps_offset).__name__}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing='leading' only, got spacing={spacing!r}")
    sig_all = sigmas_of(alpha_bar)
    if karras:
        sig = karras_sigmas(float(sig_all[0]), float(sig_all[-1]), steps)
        sig[0], sig[-1] = sig_all[-1], sig_all[0]  # the ends exactly (as the float32 sigmas give them)
        ts = sigma_to_t(sig, sig_all.log()).round().to(torch.int64)
    else:
        ts = multistep_timesteps(n_train, steps, spacing, steps_offset)
        if steps_offset < 0 or int(ts[0]) >= n_train:
            raise ValueError(f"steps_offset={steps_offset} puts the timesteps outside [0, {n_train})")
        sig = sig_all[ts]
    final = torch.zeros(1, dtype=torch.float64) if final_sigmas_type == "zero" else sig_all[:1]
    return build(torch.cat([sig, final]), ts, prediction=prediction, order=order, solver_type=solver_type, sde=sde,
                 lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                 final_sigmas_type=final_sigmas_type)
