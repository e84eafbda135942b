"""The per-step tables of every sampler: all the formulas of a reverse step, in float64, here only.

A sampler runs steps i = 0..n-1 over descending train timesteps t_0 > t_1 > ... > t_{n-1}
(what the model receives). Step i goes from t_i to the NEXT LISTED timestep: with
ab = alpha_bar[t_i] and ab_prev = alpha_bar[t_{i+1}] (for the last step ab_prev = 1 when
``final_alpha_one``, else alpha_bar[0]), every step is one of two linear forms in the model
output ``out`` and the noise ``z``:

- unclipped: ``x_prev = k1[i] x_t + k2[i] out + s[i] z``
  (the fused ``p_sample_step`` with c1 = k1, c2 = -k2, sigma = s);
- clipped or thresholded: ``x0 = clamp(a[i] x_t + b[i] out, -lim, lim) * scale``, then
  ``x_prev = p[i] x0 + q[i] x_t + r[i] out + s[i] z``.

Derivation. The prediction type fixes x0 and eps as linear forms in (x_t, out):
    x0  = a x_t + b out,   eps = c x_t + d out
    eps: x0 = (x_t - sqrt(1-ab) out) / sqrt(ab)   -> a = 1/sqrt(ab),  b = -sqrt(1-ab)/sqrt(ab);
         eps = out                                 -> c = 0,           d = 1
    x0:  x0 = out                                  -> a = 0,           b = 1;
         eps = (x_t - sqrt(ab) out) / sqrt(1-ab)   -> c = 1/sqrt(1-ab), d = -sqrt(ab)/sqrt(1-ab)
    v:   x0 = sqrt(ab) x_t - sqrt(1-ab) out        -> a = sqrt(ab),    b = -sqrt(1-ab);
         eps = sqrt(1-ab) x_t + sqrt(ab) out       -> c = sqrt(1-ab),  d = sqrt(ab)
The sampler fixes x_prev as  P x0 + Q x_t + R eps + s z:
    DDPM (Ho et al. eq. 7, respaced: beta_i = 1 - ab/ab_prev, alpha_i = 1 - beta_i):
         P = sqrt(ab_prev) beta_i / (1-ab),  Q = sqrt(alpha_i) (1-ab_prev) / (1-ab),  R = 0,
         s^2 = beta_i ("beta", labml's and diffusers' fixed_large) or
         s^2 = max((1-ab_prev)/(1-ab) beta_i, 1e-20) ("beta_tilde", diffusers' fixed_small);
    DDIM (Song et al. eq. 12): s = eta sqrt((1-ab_prev)/(1-ab) (1 - ab/ab_prev)),
         P = sqrt(ab_prev),  Q = 0,  R = sqrt(1 - ab_prev - s^2).
Substituting eps (always from the unclipped out, as diffusers' DDIM does by default) gives the
clipped form  p = P,  q = Q + R c,  r = R d,  and substituting x0 as well the unclipped form
    k1 = p a + q,   k2 = p b + r.
E.g. DDPM with eps prediction: k1 = sqrt(ab_prev) beta_i / ((1-ab) sqrt(ab)) + Q
= (beta_i + alpha_i (1-ab_prev)) / (sqrt(alpha_i) (1-ab)) = 1/sqrt(alpha_i) (since
alpha_i ab_prev = ab), and k2 = -beta_i / (sqrt(alpha_i) sqrt(1-ab)): labml's c1 and -c2.

The last step adds no noise (s = 0 there, as diffusers' DDPM and improved-diffusion do); for
DDIM that makes the last step deterministic (its R uses s = 0 too).
"""
import numpy as np
import torch

from ...objectives import PREDICTIONS, prediction_forms

KINDS = ("ddpm", "ddim")
SOLVERS = ("dpm++", "unipc", "euler", "euler_a")  # multistep solvers: solver_plan
SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("beta", "beta_tilde")
# Names of the tables step_tables returns (all float64, length n).
TABLES = ("k1", "k2", "s", "a", "b", "p", "q", "r")
MIN_POSTERIOR_VARIANCE = 1e-20  # diffusers clamps beta_tilde here (it takes its log)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
    return value


def timesteps(n_train: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """The descending int64 train timesteps of ``steps`` sampling steps, as diffusers' set_timesteps.

    "linspace": round(linspace(0, T-1, n)) reversed; "leading": arange(n) * (T // n) reversed,
    plus ``steps_offset``; "trailing": round(arange(T, 0, -T/n)) - 1.
    """
    _choice("spacing", spacing, SPACINGS)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int or None, got {type(steps).__name__}")
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps must lie in [1, n_steps={n_train}], got {steps}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int):
        raise TypeError(f"steps_offset must be an int, got {type(steps_offset).__name__}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing='leading' only, got spacing={spacing!r}")
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, steps).round()[::-1]
    elif spacing == "leading":
        ts = np.arange(steps)[::-1] * (n_train // steps) + steps_offset
        if steps_offset < 0 or ts[0] >= n_train:
            raise ValueError(f"steps_offset={steps_offset} puts the timesteps outside [0, {n_train}): "
                             f"they run from {ts[-1]} to {ts[0]}")
    else:
        # np.arange(T, 0, -T/n) as numpy forms it (T + k * delta, delta = (T - T/n) - T), but
        # exactly n values: the arange itself sometimes yields an (n+1)-th, which rounds to -1.
        delta = (n_train - n_train / steps) - n_train
        ts = np.round(n_train + np.arange(steps) * delta) - 1
    return torch.from_numpy(ts.astype(np.int64).copy())


def step_tables(alpha_bar, ts, kind, *, eta=0.0, variance="beta", prediction="eps",
                final_alpha_one=True, ts_prev=None, noisy=None, eps_from_x0=False) -> dict:
    """The float64 tables (names in TABLES) of the steps over timesteps ``ts`` (see the module doc).

    Explicit steps (diffusers' conventions): ``ts_prev[i]`` is the timestep step i goes to
    (default: the next listed one, -1 for the last), a negative one meaning alpha_bar 1 or
    alpha_bar[0] as ``final_alpha_one`` says; ``noisy[i]`` (bool) whether step i adds noise
    (default: all but the last; a quiet step has s = 0, and for DDIM R uses s = 0 too).
    ``eps_from_x0``: eps = (x_t - sqrt(ab) x0) / sqrt(1-ab) from the clipped x0, not from
    ``out`` (diffusers' DDIM ``use_clipped_model_output``): p = P - R sqrt(ab)/sqrt(1-ab),
    q = Q + R / sqrt(1-ab), r = 0.
    """
    _choice("kind", kind, KINDS)
    _choice("variance", variance, VARIANCES)
    _choice("prediction", prediction, PREDICTIONS)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    ts = torch.as_tensor(ts, dtype=torch.int64).cpu()
    if ts_prev is None:
        ts_prev = torch.cat([ts[1:], torch.full((1,), -1, dtype=torch.int64)])
    ts_prev = torch.as_tensor(ts_prev, dtype=torch.int64).cpu()
    if noisy is None:
        quiet = torch.arange(len(ts)) == len(ts) - 1
    else:
        quiet = ~torch.as_tensor(noisy, dtype=torch.bool).cpu()
    last = torch.ones((), dtype=torch.float64) if final_alpha_one else alpha_bar[0]
    ab = alpha_bar[ts]
    ab_prev = torch.where(ts_prev >= 0, alpha_bar[ts_prev.clamp(min=0)], last)
    a, b, c, d = prediction_forms(prediction, ab)
    if kind == "ddpm":
        beta = 1 - ab / ab_prev
        P = ab_prev.sqrt() * beta / (1 - ab)
        Q = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        R = torch.zeros_like(ab)
        var = beta if variance == "beta" else ((1 - ab_prev) / (1 - ab) * beta).clamp(min=MIN_POSTERIOR_VARIANCE)
        var[quiet] = 0.0
    else:
        var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        var[quiet] = 0.0
        direction = 1 - ab_prev - var
        if bool((direction < 0).any()):
            i = int(torch.nonzero(direction < 0)[0])
            raise ValueError(f"eta={eta} is too large for these steps: at step {i} (t={int(ts[i])}) "
                             f"1 - ab_prev - sigma^2 = {float(direction[i]):.3g} < 0")
        P = ab_prev.sqrt()
        Q = torch.zeros_like(ab)
        R = direction.sqrt()
    if eps_from_x0:
        p, q, r = P - R * ab.sqrt() / (1 - ab).sqrt(), Q + R / (1 - ab).sqrt(), torch.zeros_like(ab)
    else:
        p, q, r = P, Q + R * c, R * d
    return {"k1": p * a + q, "k2": p * b + r, "s": var.sqrt(), "a": a, "b": b, "p": p, "q": q, "r": r}


# ---- the general step's tables (fastddpm.ops.solver_step) -----------------------------------
# Every multistep solver (DPM-Solver++, UniPC, Euler, Euler-ancestral; modules beside this one)
# is a Plan: a float64 table coef [n, R + 1, 8] whose row i is step i of the run. Per element,
# row 0 forms x0 = coef[i, 0, X] x + coef[i, 0, OUT] out (clamped or thresholded where the
# solver says so), and rows 1..R are the step's outputs, each a weighted sum of the operands in
# COLUMNS. Step i reads these history operands, in order:
#   - "last" (only when plan.uses_last, and only from step 1 on): the previous step's output
#     named "last" (UniPC's corrected sample, from which its corrector starts);
#   - then the newest min(i, plan.depth) outputs named "m" of the earlier steps, newest first
#     (the converted model outputs: x0 predictions for DPM-Solver++ and UniPC with predict_x0).
# Output row 1 is always "prev", the next sample; a history column with no operand at that
# step holds 0. So a new solver adds a table builder here, not a kernel.
COLUMNS = ("x", "out", "x0", "h0", "h1", "h2", "h3", "z")
X, OUT, X0, H0, Z = 0, 1, 2, 3, 7


class Plan:
    """One solver run's tables (see above). ``coef`` float64 [n, R + 1, 8]; ``outputs`` the names
    of rows 1..R ("prev" first, then any of "m", "last", "x0"); ``timesteps`` what the model
    receives at each step; ``sigmas`` the run's sigma_i = sqrt((1 - ab_i) / ab_i) (n + 1
    values, the last the final one, as diffusers keeps them); ``depth`` the model-history
    entries a step may read; ``uses_last`` whether history[0] is the last corrected sample;
    ``input_scale`` [n] float64 or None: the factor scale_model_input applies (VE solvers)."""

    def __init__(self, coef, outputs, timesteps, sigmas, *, depth=0, uses_last=False, input_scale=None,
                 thresholded=False):
        coef = torch.as_tensor(coef, dtype=torch.float64)
        if coef.dim() != 3 or coef.shape[2] != len(COLUMNS) or coef.shape[1] != len(outputs) + 1:
            raise ValueError(f"coef must be [n, {len(outputs) + 1}, {len(COLUMNS)}], got {tuple(coef.shape)}")
        if outputs[0] != "prev":
            raise ValueError(f"the first output must be 'prev', got {outputs[0]!r}")
        self.coef, self.outputs, self.timesteps, self.sigmas = coef, tuple(outputs), timesteps, sigmas
        self.depth, self.uses_last, self.input_scale = depth, uses_last, input_scale
        self.thresholded = thresholded
        # host copy: which steps draw noise (any output weighs z)
        self.noisy = [bool(v) for v in (coef[:, 1:, Z] != 0).any(dim=1)]

    def __len__(self):
        return self.coef.shape[0]

    def n_history(self, i: int) -> int:
        """How many history operands step i reads (see the comment above Plan)."""
        last = 1 if self.uses_last and i > 0 else 0
        return last + min(i, self.depth)


def x0_only(coef):
    """Tables [n, 2, 8] whose one output is the step's x0 (row 0 kept; the output row takes x0):
    thresholding's first pass, and pred_original_sample."""
    out = torch.zeros(coef.shape[0], 2, len(COLUMNS), dtype=coef.dtype, device=coef.device)
    out[:, 0] = coef[:, 0]
    out[:, 1, X0] = 1.0
    return out


def sigmas_of(alpha_bar):
    """sigma = sqrt((1 - ab) / ab), the VE noise level of each train step (float64)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_sigma_of(sigma):
    """(alpha_t, sigma_t) of VE sigma: alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    alpha = 1 / (1 + sigma * sigma).sqrt()
    return alpha, sigma * alpha


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0):
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max down to sigma_min (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def learned_variance_coef(coef, alpha_bar, ts, learned_variance, *, final_alpha_one=True):
    """DDPM step tables (``coef`` [n, 2, 8], of step_tables over timesteps ``ts``) for a model
    that predicts its variance (improved DDPM): the noise column becomes 1 on noisy steps and
    row 0's columns 3 and 4 the log variance's range, which solver_step's ``var`` interpolates
    per element: "range" between log beta_i (f = 1) and the posterior's log beta_tilde_i (f = 0)
    of the respaced step i; "log" 1 and -1, so that the log variance is v itself."""
    coef = coef.clone()
    noisy = coef[:, 1, Z] != 0
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
    ts = torch.as_tensor(ts, dtype=torch.int64).cpu()
    ab = alpha_bar[ts]
    last = torch.ones((), dtype=torch.float64) if final_alpha_one else alpha_bar[0]
    ab_prev = torch.cat([alpha_bar[ts[1:]], last.view(1)])
    beta = 1 - ab / ab_prev
    tilde = (1 - ab_prev) / (1 - ab) * beta
    if learned_variance == "range":
        # Where the posterior variance is 0 (a last step to alpha_bar 1) the step adds no noise.
        hi, lo = beta.log(), torch.where(tilde > 0, tilde, beta).log()
    elif learned_variance == "log":
        hi, lo = torch.ones_like(beta), -torch.ones_like(beta)
    else:
        raise ValueError(f"learned_variance must be 'range' or 'log', got {learned_variance!r}")
    coef[:, 0, H0], coef[:, 0, H0 + 1] = torch.where(noisy, hi, 0.0), torch.where(noisy, lo, 0.0)
    coef[:, 1, Z] = noisy.to(coef.dtype)
    return coef


def multistep_timesteps(n_train, steps, spacing="linspace", steps_offset=0):
    """diffusers' multistep solvers' int64 timesteps (UniPC, DPM-Solver multistep): "linspace"
    rounds n + 1 points over [0, T - 1] and drops the last (0); "leading" takes multiples of
    T // (n + 1), drops 0 and adds ``steps_offset``; "trailing" as DDIM's."""
    _choice("spacing", spacing, SPACINGS)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps < n_train:
        raise ValueError(f"steps must lie in [1, {n_train}), got {steps}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int):
        raise TypeError(f"steps_offset must be an int, got {type(steps_offset).__name__}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing='leading' only, got spacing={spacing!r}")
    if spacing == "trailing":
        return timesteps(n_train, steps, "trailing")
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1]
    else:
        ts = (np.arange(steps + 1) * (n_train // (steps + 1)))[::-1][:-1] + steps_offset
        if steps_offset < 0 or ts[0] >= n_train:
            raise ValueError(f"steps_offset={steps_offset} puts the timesteps outside [0, {n_train})")
    return torch.from_numpy(ts.astype(np.int64).copy())


def sigma_to_t(sigma, log_sigmas):
    """The fractional train timestep of VE ``sigma`` by linear interpolation in log sigma
    (diffusers' _sigma_to_t), float64."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log_sigma = sigma.clamp(min=1e-10).log()
    n = log_sigmas.numel()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, n - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def solver_plan(kind, alpha_bar, steps, *, prediction="eps", spacing="linspace", steps_offset=0, **options) -> Plan:
    """The Plan of a native multistep sampler over train schedule ``alpha_bar`` (float64, [T]),
    in VP coordinates (the model receives x itself; x_T ~ N(0, I)).

    kind "dpm++": :func:`fastddpm.samplers.tables.dpm.plan`; "unipc":
    :func:`fastddpm.samplers.tables.unipc.plan`; "euler" and "euler_a":
    :func:`fastddpm.samplers.tables.euler.plan`. Each documents its options.
    """
    _choice("kind", kind, SOLVERS)
    if kind == "dpm++":
        from .dpm import plan
    elif kind == "unipc":
        from .unipc import plan
    else:
        from .euler import plan
        if "ancestral" in options:
            raise TypeError("ancestral is set by the kind: pass kind='euler' or kind='euler_a'")
        options["ancestral"] = kind == "euler_a"
    return plan(alpha_bar, steps, prediction=prediction, spacing=spacing, steps_offset=steps_offset, **options)
