"""The clipped, thresholded and guided sampler step in plain PyTorch.

The unclipped step is the fused ``p_sample_step``; this one forms x0 in between, so it is a
sequence of PyTorch ops for now. A fused clipped-step kernel (guidance, x0, clamp or threshold
and the update in one pass) is the next step; this function is what it will be tested against.
"""
import math

import torch


def guided(out, guidance):
    """Classifier-free guidance: ``u + w (c - u)`` for the pair ``out = (u, c)`` and weight w."""
    u, c = out
    return u + guidance * (c - u)


def in_compute_dtype(x_t, out, guidance, cdt):
    """(x_t, out) in the compute dtype, ``out`` combined by :func:`guided` there when guided."""
    oc = out.to(cdt) if guidance is None else guided(tuple(o.to(cdt) for o in out), guidance)
    return x_t.to(cdt), oc


def _row_quantile(v, ratio):
    """torch.quantile(v, ratio, dim=1) (linear interpolation at rank ratio * (n - 1)), from the
    n - floor(rank) largest values of each row: a partial top-k instead of a full sort."""
    n = v.shape[1]
    rank = ratio * (n - 1)
    lo = math.floor(rank)
    top = torch.topk(v, n - lo, dim=1, sorted=True).values  # descending; the last is rank lo
    v_lo = top[:, -1]
    v_hi = top[:, -2] if n - lo >= 2 else v_lo
    return v_lo + (rank - lo) * (v_hi - v_lo)


def threshold_x0(x0, ratio, max_value):
    """Dynamic thresholding (Saharia et al. 2022): per sample s = clamp(quantile(|x0|, ratio), 1,
    max_value), then x0 = clamp(x0, -s, s) / s."""
    s = _row_quantile(x0.reshape(x0.shape[0], -1).abs(), ratio).clamp(min=1.0, max=max_value)
    s = s.view((-1,) + (1,) * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def predicted_x0(x_t, out, tab, i, *, clip=None, threshold=None, threshold_max=1.0):
    """x0 = a[i] x_t + b[i] out, clipped to [-clip, clip] or thresholded, in the compute dtype.

    ``x_t`` and ``out`` are already in the compute dtype of ``tab`` (float32, float64 for float64).
    """
    x0 = tab["a"][i] * x_t + tab["b"][i] * out
    if clip is not None:
        return x0.clamp(-clip, clip)
    if threshold is not None:
        return threshold_x0(x0, threshold, threshold_max)
    return x0


def clipped_step(x_t, out, tab, i, *, noisy, noise=None, clip=None, threshold=None, threshold_max=1.0,
                 guidance=None):
    """x_prev = p[i] x0 + q[i] x_t + r[i] out + s[i] z with x0 from :func:`predicted_x0`.

    ``out`` is the model output, or the pair (uncond, cond) with ``guidance`` w. ``tab`` holds the
    sampler's tables in the compute dtype (float32; float64 for float64 data) on x_t's device.
    ``noisy`` (a host bool) says whether s[i] > 0; then z is ``noise`` (the caller draws the
    counter-based normals the fused kernels draw, or passes its own). Returns x_prev in x_t's dtype.
    """
    cdt = tab["s"].dtype
    xc, oc = in_compute_dtype(x_t, out, guidance, cdt)
    x0 = predicted_x0(xc, oc, tab, i, clip=clip, threshold=threshold, threshold_max=threshold_max)
    x_prev = tab["p"][i] * x0 + tab["q"][i] * xc + tab["r"][i] * oc
    if noisy:
        x_prev = x_prev + tab["s"][i] * noise.to(cdt)
    return x_prev.to(x_t.dtype)
