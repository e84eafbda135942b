"""train_inputs and mse_loss of a backend whose ops are Python (reference, triton): the same
results as the compiled ops (csrc/train_ops.cpp) from the backend's own q_sample, sample_t,
normal and per-sample MSE, in several calls rather than one (the reference is the oracle; on
the triton backend host work is the Python of its ops anyway)."""
from .._checks import draw_seed


def train_inputs(impl, x0, sqrt_ab, sqrt_1m_ab, seed, generator, sample_offset, keep_noise):
    """(x_t, t, noise, seed) as torch.ops.fastddpm.train_inputs gives them on backend ``impl``."""
    drawn = seed is None
    if drawn:
        seed = draw_seed(x0.device, generator)
    t = impl.sample_t(seed, x0.shape[0], sqrt_ab.shape[0], sample_offset)
    if keep_noise:
        noise = impl.normal(seed, x0.shape, sample_offset, x0.dtype)
        x_t = impl.q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise, None, sample_offset)
    else:
        noise = x0.new_empty(0)
        x_t = impl.q_sample(x0, t, sqrt_ab, sqrt_1m_ab, None, seed, sample_offset)
    return x_t, t, noise, seed if drawn else seed.new_empty(0)


def mse_loss(impl, pred, target, seed, sample_offset, weight, x0=None, t=None, cx0=None, ceps=None):
    """sum_b weight[b] mse_b / B as torch.ops.fastddpm.mse_loss gives it, on backend ``impl``."""
    if cx0 is not None:
        per_sample = impl.target_mse(pred, x0, t, cx0, ceps, target, seed, sample_offset)
    else:
        per_sample = impl.mse_per_sample(pred, target, seed, sample_offset)
    return (per_sample * weight.to(per_sample.dtype)).mean() if weight is not None else per_sample.mean()
