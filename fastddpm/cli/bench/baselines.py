"""The eager code users run today, written as labml writes it: the baseline for benchmarks.

Not used by fastddpm itself; ``benchmarks/`` and ``fastddpm bench`` time it beside the fused
ops (and ``torch.compile`` of it).
"""
import math

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


class AdmStyleDiffusion:
    """The hybrid loss of improved DDPM (learned range, eps prediction, MSE + vb) written as the
    ADM family's gaussian_diffusion.py computes it, op by op in eager PyTorch: float64 tables
    gathered per call and cast, the model output split into (mean, v), a detached copy of the mean
    inside the vb term, the true and the model's posterior, normal_kl, the discretized decoder
    NLL, mean over the non-batch dims, where(t == 0, nll, kl). The baseline of the adm_hybrid
    case (and, compiled, of torch.compile); fastddpm's fused vlb_loss does it in one pass."""

    def __init__(self, n_steps: int, device=None):
        betas = schedules.linear(n_steps).to(torch.float64)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.t = {  # kept in float64, as ADM keeps its numpy arrays
            "sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1.0 - ab).sqrt(),
            "sqrt_recip_ab": (1.0 / ab).sqrt(), "sqrt_recipm1_ab": (1.0 / ab - 1).sqrt(),
            "post_c1": betas * ab_prev.sqrt() / (1.0 - ab), "post_c2": (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])), "log_beta": betas.log(),
        }
        self.t = {k: v.to(device) for k, v in self.t.items()}
        self.n_steps = n_steps

    def _extract(self, name, t, like):
        return self.t[name][t].float().view((-1,) + (1,) * (like.dim() - 1)).expand(like.shape)

    @staticmethod
    def _normal_kl(mean1, logvar1, mean2, logvar2):
        return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                      + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))

    @staticmethod
    def _decoder_nll(x, means, log_scales):
        def cdf(v):
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * torch.pow(v, 3))))
        centered = x - means
        inv_stdv = torch.exp(-log_scales)
        cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
        cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
        log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        cdf_delta = cdf_plus - cdf_min
        return torch.where(x < -0.999, log_cdf_plus,
                           torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))

    def training_losses(self, model, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self._extract("sqrt_ab", t, x_start) * x_start + self._extract("sqrt_1m_ab", t, x_start) * noise
        model_output = model(x_t, t)
        c = x_start.shape[1]
        mean_out, var_values = torch.split(model_output, c, dim=1)
        frozen = torch.cat([mean_out.detach(), var_values], dim=1)
        # _vb_terms_bpd: the true posterior, the model's from the frozen output
        true_mean = self._extract("post_c1", t, x_t) * x_start + self._extract("post_c2", t, x_t) * x_t
        true_logvar = self._extract("post_logvar", t, x_t)
        eps, v = torch.split(frozen, c, dim=1)
        frac = (v + 1) / 2
        logvar = frac * self._extract("log_beta", t, x_t) + (1 - frac) * true_logvar
        pred_x0 = self._extract("sqrt_recip_ab", t, x_t) * x_t - self._extract("sqrt_recipm1_ab", t, x_t) * eps
        mean = self._extract("post_c1", t, x_t) * pred_x0 + self._extract("post_c2", t, x_t) * x_t
        kl = self._normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=list(range(1, x_t.dim()))) / math.log(2.0)
        nll = -self._decoder_nll(x_start, mean, 0.5 * logvar).mean(dim=list(range(1, x_t.dim()))) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - mean_out) ** 2).mean(dim=list(range(1, x_t.dim())))
        return {"mse": mse, "vb": vb, "loss": mse + vb}
