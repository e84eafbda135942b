"""DenoiseDiffusion: labml's API (seed/model.diffusion.txt) over the fused ops."""
import torch
from torch import nn

from . import ops
from . import schedule as schedules

_REDUCTIONS = ("mean", "none")
_SEED_ATTRS = ("beta", "alpha", "alpha_bar", "sigma2")
_KERNEL_TABLES = ("sqrt_ab", "sqrt_1m_ab", "c1", "c2", "sigma")


def _default_offset(batch: int) -> int:
    """rank * local batch under torch.distributed, so ranks draw disjoint noise; else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * batch
    return 0


class DenoiseDiffusion(nn.Module):
    """Denoising diffusion (Ho et al. 2020) with fused q_sample, p_sample and loss.

    ``DenoiseDiffusion(eps_model, n_steps, device)`` as in labml. ``schedule`` is "linear" (the
    seed's), "cosine" or a 1-D tensor of betas; ``backend`` is "auto" or a name from
    :func:`fastddpm.available_backends`. ``beta``, ``alpha``, ``alpha_bar`` and ``sigma2`` are
    float32 buffers as in the seed; the kernels read float32 tables (float64 ones for float64
    data) computed once in float64, which follow the module across ``.to()`` and keep their
    dtype under ``.half()``.
    """

    def __init__(self, eps_model: nn.Module, n_steps: int, device=None, *, schedule="linear",
                 backend="auto"):
        super().__init__()
        betas = schedules.resolve(schedule, n_steps)
        if device is None:
            param = next(iter(eps_model.parameters()), None) if isinstance(eps_model, nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        if backend != "auto":
            from . import backends
            backends.status(backend)  # unknown names fail here; availability is per call
        self.eps_model = eps_model
        self.n_steps = n_steps
        self.backend = backend
        self._tables64 = schedules.coefficient_tables(betas)  # CPU float64 masters
        for name in _SEED_ATTRS:
            self.register_buffer(name, self._tables64[name].to(device, torch.float32), persistent=False)
        self._build_kernel_tables(device)

    def _build_kernel_tables(self, device):
        self._tables = {
            dt: {k: self._tables64[k].to(device, dt) for k in _KERNEL_TABLES}
            for dt in (torch.float32, torch.float64)
        }

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() move the buffers; rebuild the kernel tables there from the float64
        # masters so a .half() of the module never rounds them.
        super()._apply(fn, *args, **kwargs)
        self._build_kernel_tables(self.beta.device)
        return self

    def _table(self, name, x):
        tables = self._tables[torch.float64 if x.dtype == torch.float64 else torch.float32]
        return tables[name]

    def _t(self, t, x):
        return ops.check_t(t, x.shape[0], x.device, self.n_steps)

    def _checked(self, name, x, t, noise, sample_offset):
        """The checks every method makes, once: (t or None, noise cast to x's dtype, offset)."""
        ops.check_float(name, x)
        t = None if t is None else self._t(t, x)
        noise = ops.check_like("noise", noise, name, x)
        offset = _default_offset(x.shape[0]) if sample_offset is None else sample_offset
        return t, noise, ops.check_offset(offset)

    def q_xt_x0(self, x0: torch.Tensor, t):
        """Mean and variance of q(x_t | x_0), each shaped to broadcast against x0."""
        ops.check_float("x0", x0)
        t = self._t(t, x0)
        sqrt_ab = schedules.gather(self._table("sqrt_ab", x0), t, x0)
        var = schedules.gather(self._table("sqrt_1m_ab", x0), t, x0) ** 2
        return (sqrt_ab * x0).to(x0.dtype), var

    def q_sample(self, x0: torch.Tensor, t, noise=None, *, eps=None, generator=None, sample_offset=None):
        """Sample x_t ~ q(x_t | x_0); ``eps=`` is labml's name for ``noise``."""
        if eps is not None:
            if noise is not None:
                raise TypeError("q_sample got both noise and eps; pass one")
            noise = eps
        t, noise, offset = self._checked("x0", x0, t, noise, sample_offset)
        return ops.run_q_sample(x0, t, self._table("sqrt_ab", x0), self._table("sqrt_1m_ab", x0), noise, None,
                                offset, self.backend, generator)

    def p_sample(self, x_t: torch.Tensor, t, noise=None, *, generator=None, sample_offset=None):
        """Sample x_{t-1} ~ p_theta(x_{t-1} | x_t), noise added at every t as in the seed."""
        t, noise, offset = self._checked("x_t", x_t, t, noise, sample_offset)
        eps_theta = ops.check_eps_theta(self.eps_model(x_t, t), x_t)
        return ops.run_p_sample_step(x_t, eps_theta, t, self._table("c1", x_t), self._table("c2", x_t),
                                     self._table("sigma", x_t), noise, None, offset, self.backend, generator)

    def loss(self, x0: torch.Tensor, noise=None, *, t=None, generator=None, reduction="mean",
             sample_offset=None):
        """Simplified loss: mean over samples of mean((noise - eps_theta(x_t, t))^2).

        ``t`` defaults to one uniform step per sample from the contract's stream; with
        ``noise`` None the noise is generated in-kernel and regenerated for the MSE, never stored.
        ``reduction="none"`` returns the per-sample loss, shape [B].
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        t, noise, offset = self._checked("x0", x0, t, noise, sample_offset)
        batch = x0.shape[0]
        seed = ops.draw_seed(x0.device, generator)
        if t is None:
            t = ops.sample_t(seed, batch, self.n_steps, sample_offset=offset, backend=self.backend)
        x_t = ops.run_q_sample(x0, t, self._table("sqrt_ab", x0), self._table("sqrt_1m_ab", x0), noise, seed,
                               offset, self.backend, None)
        eps_theta = self.eps_model(x_t, t)
        if not isinstance(eps_theta, torch.Tensor) or eps_theta.shape != x0.shape:
            got = tuple(eps_theta.shape) if isinstance(eps_theta, torch.Tensor) else type(eps_theta).__name__
            raise ValueError(f"eps_model must return a tensor of the shape of x0 {tuple(x0.shape)}, got {got}")
        per_sample = ops.mse_per_sample(eps_theta, noise, seed=seed, sample_offset=offset, backend=self.backend)
        return per_sample if reduction == "none" else per_sample.mean()

    def sampler(self, kind="ddpm", steps=None, **options):
        """A DDPM or DDIM sampler over this schedule: see :func:`fastddpm.samplers.make_sampler`."""
        from . import samplers
        return samplers.make_sampler(self, kind, steps, **options)

    def sample(self, shape_or_x_T, **options):
        """Run a whole reverse process and return x_0: see :func:`fastddpm.samplers.sample`."""
        from . import samplers
        return samplers.sample(self, shape_or_x_T, **options)
