"""Training objectives: what the model predicts and how each step's loss is weighted.

The one place of their per-t float64 tables (from alpha_bar, ab below):

* the training target of each prediction type, ``target = cx0[t] x0 + ceps[t] eps``:
  eps (labml's, Ho et al. 2020): (0, 1); x0: (1, 0); v (Salimans & Ho 2022):
  ``v = sqrt(ab) eps - sqrt(1 - ab) x0``, i.e. (-sqrt(1 - ab), sqrt(ab));
* the model output read back as eps, for p_sample: ``eps = ex[t] x_t + eout[t] out``;
* min-SNR-gamma weights (Hang et al. 2023), SNR = ab / (1 - ab): min(SNR, g) / SNR for eps,
  min(SNR, g) for x0 and min(SNR, g) / (SNR + 1) for v.

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
