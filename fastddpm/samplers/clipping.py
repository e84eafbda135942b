"""Clipping and dynamic thresholding of a step's x0, on the fused general step ``solver_step``.

The fused ``fastddpm.ops.solver_step`` does guidance, x0, its clamp and the update in one pass
(see :mod:`fastddpm.samplers.tables` for the forms). Dynamic thresholding needs one number per
sample first, a quantile of |x0|, so it runs the op twice: once for the unclamped x0 (the
x0-only tables, :func:`fastddpm.samplers.tables.x0_only`), then, after a partial top-k per
sample, the step itself with that bound.

The samplers (:class:`fastddpm.samplers.Sampler`) and the diffusers drop-ins share these
functions; they call the unchecked ``ops.run_solver_step`` with arguments already checked.
"""
import math

import torch

from .. import ops

_NO_CLIP = float("inf")
_quiet_seeds = {}  # device -> a 1-element int64 seed for steps that draw no noise


def quiet_seed(device: torch.device) -> torch.Tensor:
    """The seed of a step whose noise coefficient is 0 everywhere: the kernels draw nothing for
    it (and the reference multiplies its normals by 0), so any fixed seed serves."""
    seed = _quiet_seeds.get(device)
    if seed is None:
        seed = _quiet_seeds[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return seed


def row_quantile(v, ratio):
    """torch.quantile(v, ratio, dim=1) (linear interpolation at rank ratio * (n - 1)), from the
    n - floor(rank) largest values of each row: a partial top-k instead of a full sort."""
    n = v.shape[1]
    rank = ratio * (n - 1)
    lo = math.floor(rank)
    top = torch.topk(v, n - lo, dim=1, sorted=True).values  # descending; the last is rank lo
    v_lo = top[:, -1]
    v_hi = top[:, -2] if n - lo >= 2 else v_lo
    return v_lo + (rank - lo) * (v_hi - v_lo)


def threshold_bound(impl, x_t, out, out_cond, guidance, t, tab, ratio, max_value):
    """Dynamic thresholding's per-sample bound (Saharia et al. 2022): s = clamp(quantile(|x0|,
    ratio), 1, max_value) of the unclamped x0, in the tables' dtype ([B]). ``tab["x0_coef"]``
    are the step's x0-only tables (:func:`fastddpm.samplers.tables.x0_only`)."""
    coef = tab["x0_coef"]
    cdt = coef.dtype
    if x_t.numel() == 0:  # no element to take a quantile of, nor to clamp
        return torch.ones(x_t.shape[0], dtype=cdt, device=x_t.device)
    # x0 in the compute dtype (not rounded to a half type) before its quantile is taken.
    xc, uc = x_t.to(cdt), out.to(cdt)
    cc = None if out_cond is None else out_cond.to(cdt)
    x0 = ops.run_solver_step(impl, xc, uc, cc, (), t, coef, None, _NO_CLIP, guidance, None, quiet_seed(x_t.device),
                             0)[0]
    return row_quantile(x0.reshape(x0.shape[0], -1).abs(), ratio).clamp(min=1.0, max=max_value)


def bound_or_clip(impl, x_t, out, out_cond, guidance, t, tab, clip, threshold, threshold_max):
    """(bound, clip) for the op: thresholding's per-sample bound and no clip, or no bound and
    ``clip`` (None: inf, no clamp)."""
    if threshold is not None:
        return threshold_bound(impl, x_t, out, out_cond, guidance, t, tab, threshold, threshold_max), _NO_CLIP
    return None, _NO_CLIP if clip is None else clip


def predicted_x0(impl, x_t, out, out_cond, guidance, t, tab, bound, clip):
    """The x0 the step uses, clamped or thresholded, in x_t's dtype."""
    return ops.run_solver_step(impl, x_t, out, out_cond, (), t, tab["x0_coef"], bound, clip, guidance, None,
                               quiet_seed(x_t.device), 0)[0]
