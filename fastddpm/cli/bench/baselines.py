"""The eager code users run today, written as labml writes it: the baseline for benchmarks.

Not used by fastddpm itself; ``benchmarks/`` and ``fastddpm bench`` time it beside the fused
ops (and ``torch.compile`` of it).
"""
import torch
import torch.nn.functional as F

from ... import schedule as schedules


def gather(consts: torch.Tensor, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    return consts.gather(-1, t).reshape((-1,) + (1,) * (ndim - 1))


class LabmlDiffusion:
    """labml's DenoiseDiffusion, verbatim in its arithmetic (float32 tables, torch.randn)."""

    def __init__(self, eps_model, n_steps: int, device=None):
        self.eps_model = eps_model
        self.beta = schedules.linear(n_steps).to(device=device, dtype=torch.float32)
        self.alpha = 1.0 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        self.n_steps = n_steps
        self.sigma2 = self.beta

    def q_xt_x0(self, x0, t):
        mean = gather(self.alpha_bar, t, x0.dim()) ** 0.5 * x0
        var = 1 - gather(self.alpha_bar, t, x0.dim())
        return mean, var

    def q_sample(self, x0, t, eps=None):
        if eps is None:
            eps = torch.randn_like(x0)
        mean, var = self.q_xt_x0(x0, t)
        return mean + (var ** 0.5) * eps

    def p_sample_step(self, xt, t, eps_theta, eps=None):
        """labml's p_sample after the model call: mean plus sigma * z."""
        alpha_bar = gather(self.alpha_bar, t, xt.dim())
        alpha = gather(self.alpha, t, xt.dim())
        eps_coef = (1 - alpha) / (1 - alpha_bar) ** 0.5
        mean = 1 / (alpha ** 0.5) * (xt - eps_coef * eps_theta)
        var = gather(self.sigma2, t, xt.dim())
        if eps is None:
            eps = torch.randn(xt.shape, device=xt.device, dtype=xt.dtype)
        return mean + (var ** 0.5) * eps

    def p_sample(self, xt, t):
        return self.p_sample_step(xt, t, self.eps_model(xt, t))

    def loss(self, x0, noise=None):
        batch_size = x0.shape[0]
        t = torch.randint(0, self.n_steps, (batch_size,), device=x0.device, dtype=torch.long)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, eps=noise)
        eps_theta = self.eps_model(xt, t)
        return F.mse_loss(noise, eps_theta)
