"""UniPC's tables (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"), as
diffusers' ``UniPCMultistepScheduler`` steps (B(h) variants "bh1" and "bh2"), in float64.

Notation (VE sigma s_i of step i, the run's n + 1 sigmas, the last the final one): alpha_i =
1 / sqrt(1 + s_i^2), sd_i = s_i alpha_i (VP), lambda_i = log(alpha_i / sd_i) = -log s_i. Step i
turns the model output at the UNCORRECTED x_i into m_i: the x0 prediction (``predict_x0``,
clamped or thresholded where the run says so) or eps. Then, in one pass of the general step:

- corrector (UniC; from step 1 on, unless disabled at this step): from the previous corrected
  sample L = x_{i-1}^c over h = lambda_i - lambda_{i-1}, with the history m_{i-1}, ..., and m_i:
      x_i^c = A L + C m_{i-1} - F (sum_k rho_k (m_{i-1-k} - m_{i-1}) / r_k + rho_p (m_i - m_{i-1}))
  (r_k = (lambda_{i-1-k} - lambda_{i-1}) / h; rho solves R rho = b, R[j, k] = r_k^j over
  r = (r_1, .., r_{p-1}, 1), b_j = j! h phi_{j+1}(hh) / B(h); p = 1: rho = 1/2);
- predictor (UniP) from x_i^c to sigma s_{i+1}, with m_i, m_{i-1}, ...:
      x_{i+1} = A x_i^c + C m_i - F sum_k rho_k (m_{i-k} - m_i) / r_k
  (p = 2: rho = 1/2; p >= 3: R[:-1, :-1] rho = b[:-1]).

With predict_x0: hh = -h, A = sd_t / sd_s, C = -alpha_t expm1(hh) = alpha_t (1 - s_t / s_s),
F = alpha_t B(h); eps (predict_x0=False): hh = h, A = alpha_t / alpha_s, C = -sd_t expm1(h) =
-alpha_t (s_s - s_t), F = sd_t B(h). B(h) = hh ("bh1") or expm1(hh) ("bh2"); h phi_1 = expm1(hh),
h phi_{k+1} = h phi_k / hh - 1 / k! (the b_j recursion). The order of step i is
min(order, i + 1, and n - i with ``lower_order_final``); the corrector of step i has step i-1's.
Substituting x_i^c into the predictor makes the step one linear form in (x, out, x0, L, m_{i-1},
m_{i-2}, m_{i-3}): the plan's outputs are "prev" (x_{i+1}), "last" (x_i^c) and "m" (m_i).

Limits where diffusers' float32 formulas give NaN or inf (the tables give the finite limit):
a step to sigma 0 (final_sigmas_type "zero") has h = inf: its first-order step is exactly the
x0 prediction x0 = (x - sd_s eps) / alpha_s (diffusers: NaN for "bh1", -inf * 0, and for
predict_x0=False, 0 * inf); its higher-order terms grow without bound (diffusers: inf or NaN),
so that step is taken at order 1. A step of h = 0 (karras with "sigma_min": the last two sigmas
are equal) is the identity (diffusers: NaN at order 3).
"""
import math

import numpy as np
import torch

from . import COLUMNS, OUT, X, X0, Plan, _choice, karras_sigmas, multistep_timesteps, sigma_to_t, sigmas_of

VARIANTS = ("bh1", "bh2")
FINAL_SIGMAS = ("zero", "sigma_min")
PREDICTIONS = ("eps", "x0", "v")
SPACINGS = ("linspace", "leading", "trailing")
MAX_ORDER = 3  # the general step holds 4 history operands: the last sample and 3 model outputs


def step_orders(n, order, lower_order_final):
    """The predictor order of each of the n steps of a run (diffusers' warm-up and final lowering)."""
    return [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]


def _prediction_forms(prediction, alpha, sd):
    """(a, b, c, d): x0 = a x + b out and eps = c x + d out at VP (alpha, sd)."""
    if prediction == "eps":
        return 1 / alpha, -sd / alpha, 0.0, 1.0
    if prediction == "x0":
        return 0.0, 1.0, 1 / sd, -alpha / sd
    return alpha, -sd, sd, alpha


def _alpha_sd(sig):
    """alpha_sigma_of for one float: (1 / sqrt(1 + s^2), s / sqrt(1 + s^2))."""
    alpha = 1 / math.sqrt(1 + sig * sig)
    return alpha, sig * alpha


def _bh(sig_t, sig_s, sig_hist, p, variant, predict_x0, corrector):
    """(A, C, F, rho / r) of one UniP (corrector False) or UniC (True) update of order p from
    sigma sig_s to sig_t, sig_hist the earlier sigmas (newest first, p - 1 of them used).
    ``rho / r`` are the weights of the differences (m_k - m_s) for k = 1..p-1, then (UniC) the
    weight of (m_t - m_s). Returns None where h = 0 (the identity step)."""
    alpha_t, sd_t = _alpha_sd(sig_t)
    alpha_s, sd_s = _alpha_sd(sig_s)
    if sig_t == sig_s:
        return None
    if predict_x0:
        A, C = sd_t / sd_s, alpha_t * (1 - sig_t / sig_s)
    else:
        A, C = alpha_t / alpha_s, -alpha_t * (sig_s - sig_t)
    if sig_t == 0:  # h = inf: the first-order limit (see the module doc); no difference terms
        return A, C, 0.0, [0.0] * (p if corrector else p - 1)
    h = math.log(sig_s) - math.log(sig_t)  # lambda_t - lambda_s
    hh = -h if predict_x0 else h
    B = hh if variant == "bh1" else math.expm1(hh)
    F = (alpha_t if predict_x0 else sd_t) * B
    r = [(math.log(sig_s) - math.log(sig_hist[k])) / h for k in range(p - 1)]
    rks = r + [1.0]
    b, phi, fact = [], math.expm1(hh) / hh - 1, 1
    for j in range(1, p + 1):
        b.append(phi * fact / B)
        fact *= j + 1
        phi = phi / hh - 1 / fact
    R = np.array([[rk ** j for rk in rks] for j in range(p)], dtype=np.float64)
    b = np.array(b, dtype=np.float64)
    if corrector:
        rho = [0.5] if p == 1 else list(np.linalg.solve(R, b))
        weights = [rho[k] / r[k] for k in range(p - 1)] + [rho[-1]]
    else:
        if p == 1:
            rho = []
        elif p == 2:
            rho = [0.5]
        else:
            rho = list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        weights = [rho[k] / r[k] for k in range(p - 1)]
    return A, C, F, weights


def coefficients(sigmas, *, prediction="eps", order=2, variant="bh2", predict_x0=True, lower_order_final=True,
                 corrector_off=()):
    """(coef float64 [n, R + 1, 8], outputs, depth, uses_last) of a UniPC run over VE ``sigmas``
    (n + 1 values, float64; the last the final one), starting at its step 0 (no history).
    ``corrector_off``: the steps i whose corrector does not run (diffusers' disable_corrector
    holds i - 1). Outputs ("prev", then "last" where a corrector runs, then "m")."""
    _choice("prediction", prediction, PREDICTIONS)
    _choice("variant", variant, VARIANTS)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu().tolist()
    n = len(sig) - 1
    if n < 1:
        raise ValueError("sigmas must hold at least 2 values (one step and the final sigma)")
    if any(not math.isfinite(s) or s < 0 for s in sig) or any(s == 0 for s in sig[:-1]):
        raise ValueError("sigmas must be finite, > 0 before the last and >= 0 at the last")
    orders = step_orders(n, order, lower_order_final)
    corrects = [i > 0 and i not in set(corrector_off) for i in range(n)]
    uses_last = any(corrects)
    # history: [last] (when uses_last) + m_{i-1}, m_{i-2}, ... newest first
    depth = max([orders[i - 1] for i in range(n) if corrects[i]] + [p - 1 for p in orders])
    outputs = ("prev",) + (("last",) if uses_last else ()) + (("m",) if depth > 0 else ())
    base = 3 + (1 if uses_last else 0)  # column of m_{i-1}
    coef = np.zeros((n, len(outputs) + 1, len(COLUMNS)), dtype=np.float64)
    for i in range(n):
        alpha, sd = _alpha_sd(sig[i])
        a, b, c, d = _prediction_forms(prediction, alpha, sd)
        coef[i, 0, X], coef[i, 0, OUT] = a, b
        m = np.zeros(len(COLUMNS))  # m_i over the columns
        if predict_x0:
            m[X0] = 1.0
        else:
            m[X], m[OUT] = c, d
        hist = lambda k: base + k - 1  # noqa: E731 - the column of m_{i-k}
        # the corrected sample x_i^c
        xc = np.zeros(len(COLUMNS))
        if corrects[i]:
            p = orders[i - 1]
            u = _bh(sig[i], sig[i - 1], sig[i - 2::-1] if i >= 2 else [], p, variant, predict_x0, True)
            if u is None:
                xc[3] = 1.0
            else:
                A, C, F, w = u
                xc[3] += A
                xc[hist(1)] += C + F * sum(w)
                for k in range(1, p):
                    xc[hist(k + 1)] -= F * w[k - 1]
                xc -= F * w[-1] * m
        else:
            xc[X] = 1.0
        # the predictor from x_i^c
        p = orders[i]
        if sig[i + 1] == 0:
            p = 1  # the higher-order terms diverge at sigma 0 (module doc)
        u = _bh(sig[i + 1], sig[i], sig[i - 1::-1] if i >= 1 else [], p, variant, predict_x0, False)
        if u is None:
            prev = xc
        else:
            A, C, F, w = u
            prev = A * xc + (C + F * sum(w)) * m
            for k in range(1, p):
                prev[hist(k)] -= F * w[k - 1]
        rows = {"prev": prev, "last": xc, "m": m}
        for r, name in enumerate(outputs):
            coef[i, r + 1] = rows[name]
    return torch.from_numpy(coef), outputs, depth, uses_last


def plan(alpha_bar, steps, *, prediction="eps", spacing="linspace", steps_offset=0, order=2, variant="bh2",
         corrector=True, predict_x0=True, lower_order_final=True, karras=False, final_sigmas_type="zero") -> Plan:
    """The Plan of a native UniPC run (VP coordinates: the model receives x itself).

    order: 1, 2 or 3 (diffusers' solver_order); variant "bh1" or "bh2" (solver_type);
    corrector: run UniC from step 1 on (False: UniP alone); predict_x0: the update on x0
    predictions (else on eps); lower_order_final: lower the order over the last steps;
    karras: Karras et al.'s sigmas (timesteps interpolated in log sigma); final_sigmas_type:
    "zero" or "sigma_min" (the final sigma: the train schedule's smallest, or Karras' last).
    """
    _choice("prediction", prediction, PREDICTIONS)
    _choice("variant", variant, VARIANTS)
    _choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    for name, v in (("corrector", corrector), ("predict_x0", predict_x0), ("lower_order_final", lower_order_final),
                    ("karras", karras)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    n_train = alpha_bar.numel()
    ts = multistep_timesteps(n_train, steps, spacing, steps_offset)
    train_sig = sigmas_of(alpha_bar)
    if karras:
        sig = karras_sigmas(float(train_sig[0]), float(train_sig[-1]), steps)
        log_sigmas = train_sig.log().numpy()
        ts = sigma_to_t(sig, torch.as_tensor(log_sigmas, dtype=torch.float64)).round().to(torch.int64)
        last = float(sig[-1]) if final_sigmas_type == "sigma_min" else 0.0
    else:
        sig = train_sig[ts]
        last = float(train_sig[0]) if final_sigmas_type == "sigma_min" else 0.0
    sigmas = torch.cat([sig, torch.tensor([last], dtype=torch.float64)])
    off = () if corrector else tuple(range(steps))
    coef, outputs, depth, uses_last = coefficients(sigmas, prediction=prediction, order=order, variant=variant,
                                                   predict_x0=predict_x0, lower_order_final=lower_order_final,
                                                   corrector_off=off)
    return Plan(coef, outputs, ts, sigmas, depth=depth, uses_last=uses_last)
