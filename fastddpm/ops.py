"""The fused functional ops: checked here (:mod:`fastddpm._checks`), then run on one backend.

Every check happens before any backend runs, and names the argument at fault. Tables are 1-D
per-t coefficient tables (see :func:`fastddpm.schedule.coefficient_tables`). When ``noise``
(``target`` for the MSE) is None, the op uses the counter-based noise of ``(seed,
sample_offset)`` (see :mod:`fastddpm.philox`); ``seed=None`` draws one from the torch generator
of the tensor's device (``generator`` if given).

Each public op checks its arguments once and calls its ``run_*`` function: the unchecked layer,
which takes a backend module (:func:`fastddpm.backends.resolve`) and arguments already checked
and converted (``t`` an int tensor [B], ``seed`` a 1-element int64 tensor or None, noise in the
data's dtype). :class:`fastddpm.DenoiseDiffusion` makes its own checks, once, and calls it too.
"""
import torch

from . import backends
from .objectives import MEAN_TYPES, VARIANCE_TYPES
from .schedule import VLB_COLUMNS
from ._checks import (FLOATS, as_int, check_bound, check_channels, check_clip, check_coef, check_elements, check_float,
                      check_history, check_like, check_offset, check_real, check_shape, check_t, check_tables,
                      check_weight, common_dtype, draw_seed, seed_tensor)

__all__ = ["q_sample", "p_sample_step", "mse_per_sample", "mse_loss", "sample_t", "normal", "clipped_step",
           "solver_step", "target_mse", "vlb_loss", "draw_seed"]

_Q_TABLES = ("sqrt_ab", "sqrt_1m_ab")
_P_TABLES = ("c1", "c2", "sigma")
_STEP_TABLES = ("a", "b", "p", "q", "r", "s")
_TARGET_TABLES = ("cx0", "ceps")


def _step_args(ref_name, ref, t, n_steps, noise, sample_offset, seed, generator, backend):
    """The checks every op with per-t tables ends with: (t as an int [B] tensor, noise in ref's
    dtype or None, sample_offset, the seed tensor (None when noise is given), the backend)."""
    t = check_t(t, ref.shape[0], ref.device, n_steps)
    noise = check_like("noise", noise, ref_name, ref, optional=True)
    sample_offset = check_offset(sample_offset)
    seed = None if noise is not None else seed_tensor(seed, ref.device, generator)
    return t, noise, sample_offset, seed, backends.resolve(backend, ref.device)


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise=None, *, seed=None, sample_offset=0, backend=None,
             generator=None):
    """x_t = sqrt_ab[t] * x0 + sqrt_1m_ab[t] * noise, one pass, noise drawn in-kernel if None."""
    check_float("x0", x0)
    n = check_tables(_Q_TABLES, (sqrt_ab, sqrt_1m_ab), "x0", x0)
    t, noise, sample_offset, seed, impl = _step_args("x0", x0, t, n, noise, sample_offset, seed, generator, backend)
    return run_q_sample(impl, x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)


def run_q_sample(impl, x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset):
    """q_sample on backend module ``impl``, arguments already checked (seed None iff noise given)."""
    return impl.q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise=None, *, seed=None, sample_offset=0,
                  backend=None, generator=None):
    """x_{t-1} = c1[t] * x_t - c2[t] * eps_theta + sigma[t] * z, noise z drawn in-kernel if None."""
    check_float("x_t", x_t)
    n = check_tables(_P_TABLES, (c1, c2, sigma), "x_t", x_t)
    eps_theta = check_like("eps_theta", eps_theta, "x_t", x_t)
    t, noise, sample_offset, seed, impl = _step_args("x_t", x_t, t, n, noise, sample_offset, seed, generator, backend)
    return run_p_sample_step(impl, x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)


def run_p_sample_step(impl, x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset):
    """p_sample_step on backend module ``impl``, arguments already checked (eps_theta in x_t's dtype)."""
    return impl.p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)


def mse_per_sample(pred, target=None, *, seed=None, sample_offset=0, backend=None, generator=None):
    """mean over each sample of (pred - target)^2 -> [B] (float32 for half inputs).

    With ``target`` None the target is the noise of ``(seed, sample_offset)``, regenerated in
    forward and backward rather than stored.
    """
    check_float("pred", pred)
    check_like("target", target, "pred", pred, optional=True, cast=False)
    check_elements("pred", pred)
    sample_offset = check_offset(sample_offset)
    pred, target = common_dtype(pred, target)
    seed = None if target is not None else seed_tensor(seed, pred.device, generator)
    impl = backends.resolve(backend, pred.device)
    return run_mse_per_sample(impl, pred, target, seed, sample_offset)


def run_mse_per_sample(impl, pred, target, seed, sample_offset):
    """mse_per_sample on backend module ``impl``, arguments already checked (one dtype)."""
    return impl.mse_per_sample(pred, target, seed, sample_offset)


def mse_loss(pred, target=None, *, weight=None, seed=None, sample_offset=0, backend=None, generator=None):
    """sum_b weight[b] * mse_b / B, a 0-d tensor: the (weighted) mean over samples of
    :func:`mse_per_sample`, in one call and one autograd node (float32 for half inputs).

    ``weight`` is None (the plain mean) or a [B] floating tensor on pred's device, e.g. per-t
    loss weights gathered by t; it is a constant (it must not require grad), as is ``target``:
    the gradient is d/dpred (use :func:`mse_per_sample` for gradients of the target). With
    ``target`` None the target is the noise of ``(seed, sample_offset)``, regenerated in the
    backward rather than stored.
    """
    # The common call, F.mse_loss's (a plain target of pred's dtype, shape and device, no weight,
    # the default offset), is tested once: at a tiny size the general checks below were 3.9 us of
    # a 31 us forward and backward (benchmarks/RESULTS.md). Anything else, and every error, takes them.
    if (type(pred) is torch.Tensor and type(target) is torch.Tensor and weight is None
            and type(sample_offset) is int and sample_offset == 0 and pred.dtype == target.dtype
            and pred.dtype in FLOATS and pred.shape == target.shape and pred.device == target.device
            and pred.dim() > 0 and pred.numel() > 0 and not target.requires_grad):
        return run_mse_loss(backends.resolve(backend, pred.device), pred, target, None, 0, None)
    check_float("pred", pred)
    check_like("target", target, "pred", pred, optional=True, cast=False)
    check_elements("pred", pred)
    if target is not None and target.requires_grad and torch.is_grad_enabled():
        raise ValueError("target must not require grad (mse_loss differentiates pred only); detach it, or use "
                         "mse_per_sample (then a mean) for the target's gradient")
    sample_offset = check_offset(sample_offset)
    pred, target = common_dtype(pred, target)
    weight = check_weight(weight, pred)
    seed = None if target is not None else seed_tensor(seed, pred.device, generator)
    impl = backends.resolve(backend, pred.device)
    return run_mse_loss(impl, pred, target, seed, sample_offset, weight)


def run_mse_loss(impl, pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    """mse_loss on backend module ``impl``, arguments already checked; with x0, t, cx0 and ceps the
    per-sample MSE is target_mse's (target cx0[t] x0 + ceps[t] noise, ``target`` the noise)."""
    return impl.mse_loss(pred, target, seed, sample_offset, weight, x0, t, cx0, ceps)


def run_train_inputs(impl, x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise):
    """(x_t, t, noise, seed) of a training step in one call on backend module ``impl``: the seed
    drawn from ``generator`` unless given (then an empty tensor is returned for it), t =
    sample_t(seed), x_t = q_sample(x0, t) with the stream's noise, and that noise where
    ``keep_noise`` (else an empty tensor). Arguments already checked; x0 and the tables must not
    require grad."""
    return impl.train_inputs(x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise)


def clipped_step(x_t, out, t, a, b, p, q, r, s, noise=None, *, out_cond=None, guidance=1.0, clip=None, bound=None,
                 seed=None, sample_offset=0, backend=None, generator=None):
    """The samplers' clipped, thresholded or guided step, one pass (k = t[b] per sample b):

        o  = out + guidance (out_cond - out)    (classifier-free guidance; o = out without out_cond)
        x0 = clamp(a[k] x_t + b[k] o, -clip, clip)                      (clip None: no clamp)
           or clamp(a[k] x_t + b[k] o, -bound[b], bound[b]) / bound[b]  (dynamic thresholding)
        x_prev = p[k] x0 + q[k] x_t + r[k] o + s[k] z

    ``out`` is the model output (the unconditional one with ``out_cond``); ``bound`` a [B]
    float32/float64 tensor of per-sample bounds (>= 1 for Imagen's thresholding); z is ``noise``,
    else the counter-based normals of ``(seed, sample_offset)`` (not drawn for a sample whose
    s[k] is 0). The fused backends compute no gradient: run it under torch.no_grad(), or on
    backend="reference".
    """
    check_float("x_t", x_t)
    n = check_tables(_STEP_TABLES, (a, b, p, q, r, s), "x_t", x_t)
    out = check_like("out", out, "x_t", x_t)
    out_cond = check_like("out_cond", out_cond, "x_t", x_t, optional=True)
    guidance = check_real("guidance", guidance)
    clip = check_clip(clip)
    if bound is not None:
        if clip != float("inf"):
            raise ValueError("pass clip or bound, not both")
        check_bound(bound, x_t)
    t, noise, sample_offset, seed, impl = _step_args("x_t", x_t, t, n, noise, sample_offset, seed, generator, backend)
    return run_clipped_step(impl, x_t, out, out_cond, t, a, b, p, q, r, s, bound, clip, guidance, noise, seed,
                            sample_offset)


def clipped_coef(a, b, p, q, r, s):
    """solver_step's tables [n, 2, 8] of the clipped step: row 0 forms x0 = a x_t + b o, row 1
    is p x0 + q x_t + r o + s z (columns x, out, x0, history[0..3], z)."""
    zero = torch.zeros_like(a)
    x0_row = torch.stack([a, b, zero, zero, zero, zero, zero, zero], dim=1)
    step_row = torch.stack([q, r, p, zero, zero, zero, zero, s], dim=1)
    return torch.stack([x0_row, step_row], dim=1)


def run_clipped_step(impl, x_t, out, out_cond, t, a, b, p, q, r, s, bound, clip, guidance, noise, seed,
                     sample_offset):
    """clipped_step on backend module ``impl``, arguments already checked (clip a float, inf for none):
    the general step with the tables of :func:`clipped_coef`."""
    coef = clipped_coef(a, b, p, q, r, s)
    return impl.solver_step(x_t, out, out_cond, (), t, coef, bound, clip, guidance, noise, seed, sample_offset)[0]


def solver_step(x, out, t, coef, history=(), noise=None, *, out_cond=None, var=None, guidance=1.0, clip=None,
                bound=None, seed=None, sample_offset=0, backend=None, generator=None):
    """The general sampler step, one pass: every sampler's step is a row of tables ``coef``
    ([n_steps, R + 1, 8], float32 or float64; k = t[b] per sample b):

        o  = out + guidance (out_cond - out)          (o = out without out_cond)
        x0 = clamp(coef[k, 0, 0] x + coef[k, 0, 1] o)  (clip, or thresholding at bound, as clipped_step)
        y[r - 1] = coef[k, r] . (x, o, x0, history[0], .., history[3], z)    for r = 1 .. R

    Returns y, shape [R, *x.shape], in x's dtype (the half types compute in float32). The
    columns are (x, out, x0, history[0..3], z); ``history`` holds up to 4 tensors like x
    (earlier x0 predictions, a corrector's last sample, ...), and columns of absent history
    entries are not read. z is ``noise``, else the counter-based normals of ``(seed,
    sample_offset)``, not drawn for a sample whose column-7 entries are all 0. ``var`` (like x,
    a learned variance's channels) scales z per element by exp(0.5 (f coef[k, 0, 3] + (1 - f)
    coef[k, 0, 4])) with f = (var + 1) / 2: improved DDPM's learned range between log beta and the
    posterior's log variance (1 and -1 make it a learned log variance). Tables come from
    :mod:`fastddpm.samplers.tables`. The fused backends compute no gradient (run under
    torch.no_grad(), or on backend="reference").
    """
    check_float("x", x)
    n = check_coef(coef, "x", x)
    out = check_like("out", out, "x", x)
    out_cond = check_like("out_cond", out_cond, "x", x, optional=True)
    var = check_like("var", var, "x", x, optional=True)
    history = check_history(history, "x", x)
    guidance = check_real("guidance", guidance)
    clip = check_clip(clip)
    if bound is not None:
        if clip != float("inf"):
            raise ValueError("pass clip or bound, not both")
        check_bound(bound, x)
    t, noise, sample_offset, seed, impl = _step_args("x", x, t, n, noise, sample_offset, seed, generator, backend)
    return run_solver_step(impl, x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed,
                           sample_offset, var)


def run_solver_step(impl, x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset,
                    var=None):
    """solver_step on backend module ``impl``, arguments already checked (clip a float, inf for none)."""
    if var is None:
        return impl.solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset)
    return impl.solver_step(x, out, out_cond, history, t, coef, bound, clip, guidance, noise, seed, sample_offset, var)


def target_mse(pred, x0, t, cx0, ceps, noise=None, *, seed=None, sample_offset=0, backend=None, generator=None):
    """mean over each sample of (pred - target)^2 -> [B], target = cx0[t] x0 + ceps[t] noise.

    The training target of every prediction type in one pass: eps (cx0, ceps) = (0, 1), x0
    (1, 0), v (-sqrt(1 - ab), sqrt(ab)) (:func:`fastddpm.objectives.target_tables`). With
    ``noise`` None the noise is that of ``(seed, sample_offset)``, regenerated in forward and
    backward rather than stored (and not drawn for a sample whose ceps[t] is 0). ``x0`` is cast
    to pred's dtype; float32 result for half inputs, as :func:`mse_per_sample`.
    """
    check_float("pred", pred)
    check_elements("pred", pred)
    n = check_tables(_TARGET_TABLES, (cx0, ceps), "pred", pred)
    x0 = check_like("x0", x0, "pred", pred)
    t, noise, sample_offset, seed, impl = _step_args("pred", pred, t, n, noise, sample_offset, seed, generator,
                                                     backend)
    return run_target_mse(impl, pred, x0, t, cx0, ceps, noise, seed, sample_offset)


def run_target_mse(impl, pred, x0, t, cx0, ceps, noise, seed, sample_offset):
    """target_mse on backend module ``impl``, arguments already checked (x0 and noise in pred's dtype)."""
    return impl.target_mse(pred, x0, t, cx0, ceps, noise, seed, sample_offset)


def vlb_loss(x0, out, t, tables, noise=None, *, mean_type="eps", variance_type="learned_range", detach_mean=True,
             seed=None, sample_offset=0, backend=None, generator=None):
    """Per-sample (mse, vb) of the hybrid loss of improved DDPM (Nichol & Dhariwal 2021), [B, 2]
    in the compute dtype (float32; float64 for float64 data), one fused pass forward and one
    backward: see :func:`fastddpm.objectives.vlb_terms` for the formulas.

    ``x0`` [B, C, ...] the data, ``out`` the model output: its C mean channels (eps or x0 by
    ``mean_type``) then, unless ``variance_type`` is "fixed", C variance channels ("learned":
    the log variance; "learned_range": v in [-1, 1] interpolating between the posterior's log
    variance and log beta). ``tables`` [n_steps, 9]: :func:`fastddpm.schedule.vlb_tables`'s
    columns stacked in ``schedule.VLB_COLUMNS`` order. x_t is formed again from x0 and the noise
    (``noise``, else the counter-based normals of ``(seed, sample_offset)``, regenerated in the
    backward, never stored). Differentiable in ``out`` only; with ``detach_mean`` the vb term
    reaches only the variance channels (ADM's hybrid loss).
    """
    check_float("x0", x0)
    check_elements("x0", x0)
    if x0.dim() < 2:
        raise ValueError(f"x0 must have a channel dimension (rank >= 2), got shape {tuple(x0.shape)}")
    mean_code = _choice_index("mean_type", mean_type, MEAN_TYPES)
    var_code = _choice_index("variance_type", variance_type, VARIANCE_TYPES)
    if not isinstance(detach_mean, bool):
        raise TypeError(f"detach_mean must be a bool, got {type(detach_mean).__name__}")
    fixed = variance_type == "fixed"
    check_channels("out (the model's output)", out, "x0", x0, 1 if fixed else 2,
                   f"the {'mean' if fixed else 'mean and variance'} channels for x0's {x0.shape[1]}")
    out = out if out.dtype == x0.dtype else out.to(x0.dtype)
    if not isinstance(tables, torch.Tensor) or tables.dim() != 2 or tables.shape[1] != len(VLB_COLUMNS) \
            or tables.dtype not in (torch.float32, torch.float64):
        got = tuple(tables.shape) if isinstance(tables, torch.Tensor) else type(tables).__name__
        raise ValueError(f"tables must be a float32/float64 [n_steps, {len(VLB_COLUMNS)}] tensor "
                         f"(schedule.vlb_tables in VLB_COLUMNS order), got {got}")
    if tables.device != x0.device:
        raise RuntimeError(f"tables is on {tables.device} but x0 is on {x0.device}")
    t, noise, sample_offset, seed, impl = _step_args("x0", x0, t, tables.shape[0], noise, sample_offset, seed,
                                                     generator, backend)
    return run_vlb_loss(impl, x0, out, t, tables, noise, seed, sample_offset, mean_code, var_code, detach_mean)


def run_vlb_loss(impl, x0, out, t, tables, noise, seed, sample_offset, mean_code, var_code, detach_mean):
    """vlb_loss on backend module ``impl``, arguments already checked (the types as indices of
    objectives.MEAN_TYPES and VARIANCE_TYPES)."""
    return impl.vlb_loss(x0, out, t, tables, noise, seed, sample_offset, mean_code, var_code, detach_mean)


def _choice_index(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return allowed.index(value)


MAX_SAMPLE_T_STEPS = 2**31  # the compiled sample_t op checks the same bound (csrc/fastddpm/op_checks.h)


def check_sample_t_steps(n_steps) -> int:
    n_steps = as_int("n_steps", n_steps)
    if not 1 <= n_steps < MAX_SAMPLE_T_STEPS:
        raise ValueError(f"n_steps must be an int in [1, 2**31), got {n_steps!r}")
    return n_steps


def sample_t(seed, batch: int, n_steps: int, *, sample_offset=0, device=None, backend=None):
    """The timesteps ``loss`` draws: int64 [batch] in [0, n_steps) from the contract's stream."""
    batch = as_int("batch", batch, "a non-negative int")
    if batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    n_steps = check_sample_t_steps(n_steps)
    sample_offset = check_offset(sample_offset)
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    seed = seed_tensor(seed, device, None)
    impl = backends.resolve(backend, device)
    return run_sample_t(impl, seed, batch, n_steps, sample_offset)


def run_sample_t(impl, seed, batch, n_steps, sample_offset):
    """sample_t on backend module ``impl``, arguments already checked."""
    return impl.sample_t(seed, batch, n_steps, sample_offset)


def normal(shape, *, seed=None, sample_offset=0, dtype=torch.float32, device=None, generator=None,
           backend=None):
    """The contract's noise itself: the float32 normals that q_sample, p_sample_step and
    mse_per_sample draw in-kernel for ``(seed, sample_offset)``, as a tensor of ``shape`` (batch
    first: row b is sample ``sample_offset + b``) rounded to ``dtype``.

    ``device`` defaults to the seed tensor's device, else the generator's, else the CPU.
    """
    shape = check_shape(shape)
    if not isinstance(dtype, torch.dtype) or dtype not in FLOATS:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    sample_offset = check_offset(sample_offset)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device is None:
        if isinstance(seed, torch.Tensor):
            device = seed.device
        elif generator is not None:
            device = generator.device
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if seed is None and generator is not None and generator.device.type != device.type:
        raise RuntimeError(f"generator is on {generator.device} but device is {device}")
    seed = seed_tensor(seed, device, generator)
    impl = backends.resolve(backend, device)
    return run_normal(impl, seed, shape, sample_offset, dtype)


def run_normal(impl, seed, shape, sample_offset, dtype):
    """normal on backend module ``impl``, arguments already checked."""
    return impl.normal(seed, shape, sample_offset, dtype)
