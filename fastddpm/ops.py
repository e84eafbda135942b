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
from ._checks import (FLOATS, as_int, check_bound, check_clip, check_elements, check_float, check_like, check_offset,
                      check_real, check_shape, check_t, check_tables, common_dtype, draw_seed, seed_tensor)

__all__ = ["q_sample", "p_sample_step", "mse_per_sample", "sample_t", "normal", "clipped_step", "target_mse",
           "draw_seed"]

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


def run_clipped_step(impl, x_t, out, out_cond, t, a, b, p, q, r, s, bound, clip, guidance, noise, seed,
                     sample_offset):
    """clipped_step on backend module ``impl``, arguments already checked (clip a float, inf for none)."""
    return impl.clipped_step(x_t, out, out_cond, t, a, b, p, q, r, s, bound, clip, guidance, noise, seed,
                             sample_offset)


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
