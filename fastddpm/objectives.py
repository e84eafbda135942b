"""Training objectives: what the model predicts and how each step's loss is weighted.

The one place of their per-t float64 tables (from alpha_bar, ab below):

* the training target of each prediction type, ``target = cx0[t] x0 + ceps[t] eps``:
  eps (labml's, Ho et al. 2020): (0, 1); x0: (1, 0); v (Salimans & Ho 2022):
  ``v = sqrt(ab) eps - sqrt(1 - ab) x0``, i.e. (-sqrt(1 - ab), sqrt(ab));
* the model output read back as eps, for p_sample: ``eps = ex[t] x_t + eout[t] out``;
* min-SNR-gamma weights (Hang et al. 2023), SNR = ab / (1 - ab): min(SNR, g) / SNR for eps,
  min(SNR, g) for x0 and min(SNR, g) / (SNR + 1) for v;
* the variational bound's terms (Ho et al. 2020, Nichol & Dhariwal 2021): the Gaussian KL, the
  discretized Gaussian decoder likelihood, the learned variance's log (:func:`vlb_terms`, the
  reference of the fused ``vlb_loss``; its per-t tables are :func:`fastddpm.schedule.vlb_tables`).

``fastddpm.ops.target_mse`` is the per-sample MSE against ``cx0[t] x0 + ceps[t] eps`` in one
fused pass, with the noise eps regenerated from ``(seed, sample_offset)`` in forward and
backward, so no noise-sized tensor is saved for backward.
"""
import torch

from ._checks import common_dtype


PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction) -> str:
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def _snr_parts(alpha_bar: torch.Tensor, one_minus_ab: torch.Tensor = None):
    alpha_bar = alpha_bar.to(torch.float64)
    one_minus_ab = 1 - alpha_bar if one_minus_ab is None else one_minus_ab.to(torch.float64)
    return alpha_bar, one_minus_ab


def target_tables(prediction, alpha_bar, one_minus_ab=None):
    """(cx0, ceps) float64: the training target is cx0[t] x0 + ceps[t] eps."""
    ab, omab = _snr_parts(alpha_bar, one_minus_ab)
    prediction = check_prediction(prediction)
    if prediction == "eps":
        return torch.zeros_like(ab), torch.ones_like(ab)
    if prediction == "x0":
        return torch.ones_like(ab), torch.zeros_like(ab)
    return -omab.sqrt(), ab.sqrt()


def prediction_forms(prediction, alpha_bar, one_minus_ab=None):
    """(a, b, c, d) float64: the model output ``out`` read as x0 = a x_t + b out and as
    eps = c x_t + d out (the samplers' step tables and p_sample both use them).

    From x_t = sqrt(ab) x0 + sqrt(1 - ab) eps: eps prediction gives x0 = (x_t - sqrt(1-ab) out)
    / sqrt(ab); x0 prediction eps = (x_t - sqrt(ab) out) / sqrt(1 - ab); v prediction
    x0 = sqrt(ab) x_t - sqrt(1 - ab) v and eps = sqrt(1 - ab) x_t + sqrt(ab) v.
    """
    ab, omab = _snr_parts(alpha_bar, one_minus_ab)
    prediction = check_prediction(prediction)
    sq, sq1m = ab.sqrt(), omab.sqrt()
    one, zero = torch.ones_like(ab), torch.zeros_like(ab)
    if prediction == "eps":
        return 1 / sq, -sq1m / sq, zero, one
    if prediction == "x0":
        return zero, one, 1 / sq1m, -sq / sq1m
    return sq, -sq1m, sq1m, sq


def eps_tables(prediction, alpha_bar, one_minus_ab=None):
    """(ex, eout) float64: the model output ``out`` read as eps = ex[t] x_t + eout[t] out."""
    return prediction_forms(prediction, alpha_bar, one_minus_ab)[2:]


def min_snr_weights(prediction, alpha_bar, gamma=5.0, one_minus_ab=None):
    """Min-SNR-gamma loss weights per t (float64), in the form for the prediction type."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0 or gamma == float("inf"):
        raise ValueError(f"min_snr_gamma must be a finite number > 0, got {gamma!r}")
    ab, omab = _snr_parts(alpha_bar, one_minus_ab)
    prediction = check_prediction(prediction)
    snr = ab / omab
    clipped = snr.clamp(max=float(gamma))
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def check_weights(weights, n_steps: int) -> torch.Tensor:
    """A user per-t weight table: 1-D, n_steps long, real, finite, >= 0 -> float64 CPU."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weighting must be None, 'min_snr' or a 1-D tensor of per-t weights, got "
                        f"{type(weights).__name__}")
    if weights.dim() != 1 or weights.numel() != n_steps:
        raise ValueError(f"weighting must be a 1-D tensor of n_steps = {n_steps} weights, got shape "
                         f"{tuple(weights.shape)}")
    if weights.is_complex() or weights.dtype == torch.bool:
        raise TypeError(f"weighting must be a real tensor, got {weights.dtype}")
    w = weights.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weighting must be finite, got a NaN or infinite weight")
    if bool((w < 0).any()):
        step = int((w < 0).nonzero()[0])
        raise ValueError(f"weighting must be >= 0, got {float(w[step])!r} at t={step}")
    return w


class _Promoted(torch.autograd.Function):
    """``fn(pred, x0)`` on pred and x0 promoted to their common dtype (as PyTorch's arithmetic
    would), saving the two as they are: the promoted copies are made again in backward rather
    than kept, which is what mixed dtypes (a float32 model output against bfloat16 data, or the
    reverse under autocast) would otherwise cost in saved memory."""

    @staticmethod
    def forward(ctx, fn, pred, x0):
        ctx.fn = fn
        ctx.save_for_backward(pred, x0)
        with torch.no_grad():
            return fn(*common_dtype(pred, x0))

    @staticmethod
    def backward(ctx, grad):
        pred, x0 = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            p, x = pred.detach().requires_grad_(need[0]), x0.detach().requires_grad_(need[1])
            wanted = [v for v, n in zip((p, x), need) if n]
            grads = iter(torch.autograd.grad(ctx.fn(*common_dtype(p, x)), wanted, grad) if wanted else ())
        return None, next(grads) if need[0] else None, next(grads) if need[1] else None


def promoted_mse(fn, pred, x0):
    """``fn(pred, x0)``, a per-sample MSE, on the two promoted to their common dtype without
    saving the promoted copies (see :class:`_Promoted`); ``fn`` itself when the dtypes agree."""
    if pred.dtype == x0.dtype:
        return fn(pred, x0)
    return _Promoted.apply(fn, pred, x0)


# ---- the variational bound (ADM's hybrid and KL losses) ------------------------------------
MEAN_TYPES = ("eps", "x0")                      # what the mean channels predict
VARIANCE_TYPES = ("learned", "learned_range", "fixed")  # how the model's log variance is formed
LN2 = 0.6931471805599453
CDF_A = 0.7978845608028654   # sqrt(2 / pi), of the tanh approximation of the normal CDF
CDF_B = 0.044715
BIN = 1.0 / 255.0            # half a bin of 8-bit data scaled to [-1, 1]
LOG_FLOOR = 1e-12            # the decoder's probabilities are clamped here before their log


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_std_normal_cdf(x):
    """The standard normal CDF's tanh approximation, 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(CDF_A * (x + CDF_B * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element of data x in [-1, 1] on 256 bins under N(mean, e^(2 log_scale)):
    the CDF over [x - 1/255, x + 1/255], the lowest bin open below and the highest above, each
    probability clamped at 1e-12 before its log."""
    centered = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = approx_std_normal_cdf(inv_stdv * (centered + BIN))
    cdf_min = approx_std_normal_cdf(inv_stdv * (centered - BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_FLOOR))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_FLOOR))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def learned_logvar(v, log_min, log_max, variance_type):
    """The model's log variance from its variance channels v: "learned_range" interpolates
    frac = (v + 1) / 2 between log_min (the posterior's) and log_max (log beta); "learned" is v."""
    if variance_type == "learned":
        return v
    frac = (v + 1.0) / 2.0
    return frac * log_max + (1.0 - frac) * log_min


def vlb_terms(x0, out, t, tables, noise, mean_type, variance_type, detach_mean=True):
    """Per-sample (mse, vb) [B, 2] of the hybrid loss, in the compute dtype: the reference of the
    fused ``vlb_loss`` op (``tables`` [n, 9] in schedule.VLB_COLUMNS order, ``noise`` the eps of
    x_t = sqrt_ab x0 + sqrt_1m_ab eps).

    ``out`` holds the mean channels (eps or x0 by ``mean_type``) and, unless ``variance_type``
    is "fixed", as many variance channels after them on dim 1. mse is the mean of (target -
    mean part)^2 (target eps or x0). vb is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits
    per dimension where t > 0, and the discretized decoder's negative log likelihood of x0 in bits
    where t == 0; with ``detach_mean`` (ADM's hybrid loss) it reaches only the variance channels.
    """
    cdt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0c, outc, eps = x0.to(cdt), out.to(cdt), noise.to(cdt)
    c = tables.to(cdt)[t]  # [B, 9]

    def col(k):
        return c[:, k].view((-1,) + (1,) * (x0.dim() - 1))

    sqrt_ab, sqrt_1m_ab, post_c1, post_c2, post_logvar, log_beta, s_rab, s_rm1ab, fixed_logvar = (
        col(k) for k in range(9))
    channels = x0.shape[1]
    if variance_type == "fixed":
        mean_part, logvar = outc, fixed_logvar.expand_as(x0c)
    else:
        mean_part, v = outc[:, :channels], outc[:, channels:]
        logvar = learned_logvar(v, post_logvar, log_beta, variance_type)
    x_t = sqrt_ab * x0c + sqrt_1m_ab * eps
    target = eps if mean_type == "eps" else x0c
    mse = ((target - mean_part) ** 2).flatten(1).mean(1)
    m = mean_part.detach() if detach_mean else mean_part
    x0_pred = s_rab * x_t - s_rm1ab * m if mean_type == "eps" else m
    mean_q = post_c1 * x0c + post_c2 * x_t
    mean_p = post_c1 * x0_pred + post_c2 * x_t
    kl = normal_kl(mean_q, post_logvar, mean_p, logvar).flatten(1).mean(1) / LN2
    nll = -discretized_gaussian_log_likelihood(x0c, mean_p, 0.5 * logvar).flatten(1).mean(1) / LN2
    vb = torch.where(t == 0, nll, kl)
    return torch.stack([mse, vb], dim=1)
