"""The fused functional ops (DESIGN.md, Layers 2): validated here, then run on one backend.

Every check happens before any backend runs, and names the argument at fault. Tables are 1-D
per-t coefficient tables (see :func:`fastddpm.schedule.coefficient_tables`). When ``noise``
(``target`` for the MSE) is None, the op uses the counter-based noise of DESIGN.md for
``(seed, sample_offset)``; ``seed=None`` draws one from the torch generator of the tensor's
device (``generator`` if given).
"""
import torch

from . import backends

__all__ = ["q_sample", "p_sample_step", "mse_per_sample", "sample_t", "normal", "draw_seed"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SEED_RANGE = 2**64


def _is_tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_float(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (rank >= 1), got a 0-d tensor")


def check_like(name, x, ref_name, ref):
    """``x`` (optional) must match ``ref`` in shape and device; it is cast to ref's dtype."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise RuntimeError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    return x if x.dtype == ref.dtype else x.to(ref.dtype)


def _check_tables(tables, ref_name, ref):
    n = None
    for name, tab in tables.items():
        if not isinstance(tab, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tab).__name__}")
        if tab.dim() != 1:
            raise ValueError(f"{name} must be a 1-D per-t table, got shape {tuple(tab.shape)}")
        if tab.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {tab.dtype}")
        if tab.device != ref.device:
            raise RuntimeError(f"{name} is on {tab.device} but {ref_name} is on {ref.device}")
        if n is not None and tab.numel() != n:
            raise ValueError(f"tables must have one length; {name} has {tab.numel()}, expected {n}")
        n = tab.numel()
    if n == 0:
        raise ValueError("the per-t tables are empty (n_steps must be >= 1)")
    return n


def check_t(t, batch: int, device, n_steps: int) -> torch.Tensor:
    """A Python int, 0-d or [B] integer tensor ``t`` -> validated int [B] tensor on ``device``."""
    if isinstance(t, bool):
        raise TypeError("t must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        if not 0 <= t < n_steps:
            raise ValueError(f"t must lie in [0, {n_steps}), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"t must be an int32 or int64 tensor, got {t.dtype}")
    if t.device != torch.device(device):
        raise RuntimeError(f"t is on {t.device} but the data is on {device}")
    if t.dim() == 0:
        t = t.expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape [{batch}] (one step per sample), got {tuple(t.shape)}")
    if t.numel() and not _is_tracing():
        # One small reduction; under torch.compile or CUDA-graph capture the kernels check.
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= n_steps:
            raise ValueError(f"t must lie in [0, {n_steps}), got values in [{lo}, {hi}]")
    return t


def draw_seed(device, generator=None) -> torch.Tensor:
    """A fresh 63-bit seed as a 1-element int64 tensor on ``device``, drawn without a host sync."""
    return torch.randint(2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)


def _seed_tensor(seed, device, generator):
    if seed is None:
        return draw_seed(device, generator)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed tensor must hold one int64, got shape {tuple(seed.shape)} and {seed.dtype}")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a 1-element int64 tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < _SEED_RANGE:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    if seed >= 2**63:  # keep the 64-bit pattern in a signed int64
        seed -= _SEED_RANGE
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_offset(sample_offset):
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int):
        raise TypeError(f"sample_offset must be an int, got {type(sample_offset).__name__}")
    if sample_offset < 0 or sample_offset >= 2**62:
        raise ValueError(f"sample_offset must lie in [0, 2**62), got {sample_offset}")
    return sample_offset


def q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise=None, *, seed=None, sample_offset=0, backend=None,
             generator=None):
    """x_t = sqrt_ab[t] * x0 + sqrt_1m_ab[t] * noise, one pass, noise drawn in-kernel if None."""
    check_float("x0", x0)
    n = _check_tables({"sqrt_ab": sqrt_ab, "sqrt_1m_ab": sqrt_1m_ab}, "x0", x0)
    t = check_t(t, x0.shape[0], x0.device, n)
    noise = check_like("noise", noise, "x0", x0)
    return run_q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, check_offset(sample_offset), backend, generator)


def run_q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset, backend, generator):
    """q_sample on arguments already checked as above (DenoiseDiffusion checks its own once)."""
    impl = backends.resolve(backend, x0.device)
    seed = None if noise is not None else _seed_tensor(seed, x0.device, generator)
    return impl.q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, seed, sample_offset)


def p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise=None, *, seed=None, sample_offset=0,
                  backend=None, generator=None):
    """x_{t-1} = c1[t] * x_t - c2[t] * eps_theta + sigma[t] * z, noise z drawn in-kernel if None."""
    check_float("x_t", x_t)
    n = _check_tables({"c1": c1, "c2": c2, "sigma": sigma}, "x_t", x_t)
    eps_theta = check_eps_theta(eps_theta, x_t)
    t = check_t(t, x_t.shape[0], x_t.device, n)
    noise = check_like("noise", noise, "x_t", x_t)
    return run_p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, check_offset(sample_offset),
                             backend, generator)


def check_eps_theta(eps_theta, x_t):
    if eps_theta is None:
        raise TypeError("eps_theta must be a tensor, got None")
    return check_like("eps_theta", eps_theta, "x_t", x_t)


def run_p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset, backend, generator):
    """p_sample_step on arguments already checked as above."""
    impl = backends.resolve(backend, x_t.device)
    seed = None if noise is not None else _seed_tensor(seed, x_t.device, generator)
    return impl.p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise, seed, sample_offset)


def mse_per_sample(pred, target=None, *, seed=None, sample_offset=0, backend=None, generator=None):
    """mean over each sample of (pred - target)^2 -> [B] (float32 for half inputs).

    With ``target`` None the target is the noise of ``(seed, sample_offset)``, regenerated in
    forward and backward rather than stored.
    """
    check_float("pred", pred)
    if target is not None:
        check_float("target", target)
        if target.dtype != pred.dtype:  # compute in the wider of the two, as PyTorch would
            common = torch.promote_types(pred.dtype, target.dtype)
            pred, target = pred.to(common), target.to(common)
    target = check_like("target", target, "pred", pred)
    if pred.shape[0] and pred[0].numel() == 0:
        raise ValueError(f"pred must have at least one element per sample, got shape {tuple(pred.shape)}")
    sample_offset = check_offset(sample_offset)
    impl = backends.resolve(backend, pred.device)
    seed = None if target is not None else _seed_tensor(seed, pred.device, generator)
    return impl.mse_per_sample(pred, target, seed, sample_offset)


def sample_t(seed, batch: int, n_steps: int, *, sample_offset=0, device=None, backend=None):
    """The timesteps ``loss`` draws: int64 [batch] in [0, n_steps) from the contract's stream."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 1 <= n_steps < 2**31:
        raise ValueError(f"n_steps must be an int in [1, 2**31), got {n_steps!r}")
    sample_offset = check_offset(sample_offset)
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    seed = _seed_tensor(seed, device, None)
    impl = backends.resolve(backend, device)
    return impl.sample_t(seed, batch, n_steps, sample_offset)


def _check_shape(shape):
    if isinstance(shape, torch.Tensor) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple or list of ints, got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError("shape must have a batch dimension (rank >= 1), got ()")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"shape must hold ints, got {type(s).__name__} in {tuple(shape)}")
        if s < 0:
            raise ValueError(f"shape must not be negative, got {tuple(shape)}")
    return tuple(shape)


def normal(shape, *, seed=None, sample_offset=0, dtype=torch.float32, device=None, generator=None,
           backend=None):
    """The contract's noise itself: the float32 normals that q_sample, p_sample_step and
    mse_per_sample draw in-kernel for ``(seed, sample_offset)``, as a tensor of ``shape`` (batch
    first: row b is sample ``sample_offset + b``) rounded to ``dtype``.

    ``device`` defaults to the seed tensor's device, else the generator's, else the CPU.
    """
    shape = _check_shape(shape)
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOATS:
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
    seed = _seed_tensor(seed, device, generator)
    impl = backends.resolve(backend, device)
    return impl.normal(seed, shape, sample_offset, dtype)
