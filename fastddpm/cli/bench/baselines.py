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


class DiffusersStyleDDIM:
    """DDIMScheduler.step's arithmetic for eps prediction, eta = 0, as diffusers writes it in
    eager PyTorch (float32 alphas_cumprod, a Python-float timestep lookup, ``** 0.5``): the
    baseline of the sampler-step cases, for comparing against without diffusers installed."""

    def __init__(self, n_steps: int, steps: int, device=None, clip=None):
        beta = schedules.linear(n_steps).to(device=device, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - beta, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0)  # set_alpha_to_one=True
        self.step_ratio = n_steps // steps
        self.timesteps = (torch.arange(0, steps) * self.step_ratio).flip(0)  # "leading", steps_offset=0
        self.clip = clip

    def step(self, model_output, timestep: int, sample):
        prev_timestep = timestep - self.step_ratio
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_epsilon = model_output
        if self.clip is not None:
            pred_original_sample = pred_original_sample.clamp(-self.clip, self.clip)
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * pred_epsilon
        return alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
