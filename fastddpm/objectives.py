"""Training objectives: what the model predicts and how each step's loss is weighted.

The one place of their per-t float64 tables (from alpha_bar, ab below):

* the training target of each prediction type, ``target = cx0[t] x0 + ceps[t] eps``:
  eps (labml's, Ho et al. 2020): (0, 1); x0: (1, 0); v (Salimans & Ho 2022):
  ``v = sqrt(ab) eps - sqrt(1 - ab) x0``, i.e. (-sqrt(1 - ab), sqrt(ab));
* the model output read back as eps, for p_sample: ``eps = ex[t] x_t + eout[t] out``;
* min-SNR-gamma weights (Hang et al. 2023), SNR = ab / (1 - ab): min(SNR, g) / SNR for eps,
  min(SNR, g) for x0 and min(SNR, g) / (SNR + 1) for v.

:func:`target_mse` is the per-sample MSE against the target ``cx0[t] x0 + ceps[t] eps`` with
the noise eps regenerated from ``(seed, sample_offset)``: the backend's fused q_sample forms
the target in-kernel (q_sample of x0 with the tables cx0 and ceps is exactly it), forward and
again in backward, so no noise-sized tensor is saved for backward.
"""
import torch

from .schedule import gather

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


class _TargetMSE(torch.autograd.Function):
    """Per-sample MSE of pred against cx0[t] x0 + ceps[t] eps(seed, offset), saving pred, x0,
    t and the seed only: the backward forms the target again with the fused q_sample."""

    @staticmethod
    def forward(ctx, pred, x0, t, cx0, ceps, seed, offset, impl):
        ctx.impl, ctx.offset = impl, offset
        ctx.save_for_backward(pred, x0, t, cx0, ceps, seed)
        pred_acc, target = _acc_target(impl, pred, x0, t, cx0, ceps, seed, offset)
        return impl.mse_per_sample(pred_acc, target, None, 0)

    @staticmethod
    def backward(ctx, grad):
        pred, x0, t, cx0, ceps, seed = ctx.saved_tensors
        need_pred, need_x0 = ctx.needs_input_grad[:2]
        if not (need_pred or need_x0):
            return (None,) * 8
        with torch.enable_grad():
            p, target = _acc_target(ctx.impl, pred.detach(), x0.detach(), t, cx0, ceps, seed, ctx.offset)
            p = p.detach().requires_grad_()
            # the backend's own MSE backward: d/dpred = g * 2/D * (pred - target)
            (g_pred,) = torch.autograd.grad(ctx.impl.mse_per_sample(p, target, None, 0), p, grad)
        gp = g_pred.to(pred.dtype) if need_pred else None
        gx = (-g_pred * gather(cx0, t, g_pred, g_pred.dtype)).to(x0.dtype) if need_x0 else None
        return gp, gx, None, None, None, None, None, None


def _acc_target(impl, pred, x0, t, cx0, ceps, seed, offset):
    """pred and the target in the accumulation dtype (float32 for half types, as the MSE)."""
    acc = torch.float64 if torch.float64 in (pred.dtype, x0.dtype) else torch.float32
    if seed is None:  # x0 prediction: the target is x0 itself
        return pred.to(acc), x0.to(acc)
    with torch.no_grad():
        target = impl.q_sample(x0.to(acc), t, cx0, ceps, None, seed, offset)
    return pred.to(acc), target


def target_mse(impl, pred, x0, t, cx0, ceps, seed, offset):
    """[B] per-sample MSE of ``pred`` against ``cx0[t] x0 + ceps[t] eps`` with eps the noise of
    ``(seed, offset)`` (``seed`` None: against x0 itself, for x0 prediction with pred and x0 of
    different dtypes, so neither's cast is saved); arguments already checked (pred and x0 of any float dtypes, computed in
    float64 if either is float64, else float32: the tables' dtype)."""
    return _TargetMSE.apply(pred, x0, t, cx0, ceps, seed, offset, impl)
