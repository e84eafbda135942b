"""ADM's names over fastddpm's fused ops: a drop-in for improved-diffusion's, guided-diffusion's
and DiT's ``gaussian_diffusion`` / ``respace`` / ``create_diffusion``.

    from fastddpm.adm import create_diffusion
    diffusion = create_diffusion("")                      # DiT's training diffusion
    terms = diffusion.training_losses(model, x, t, dict(y=y))
    sampler = create_diffusion("250")
    x = sampler.p_sample_loop(model, x.shape, model_kwargs=dict(y=y))

The facade is thin: its tables come from :mod:`fastddpm.samplers.tables.adm` (float64, built
once per object), the work is ``fastddpm.ops``: a training step's loss is one
:func:`fastddpm.ops.vlb_loss` call (learned variance or a KL loss type) or one
:func:`fastddpm.ops.target_mse` (fixed variance, MSE), a sampling step one
:func:`fastddpm.ops.solver_step`. The model is called exactly once per training or sampling step,
with the original timesteps (floats times 1000 / T with ``rescale_timesteps``) and
``**model_kwargs``; a model returning ``(output, extra)`` is accepted (its first item is used).

Noise (``noise_source`` on the factories, the classes and the loops): ``"torch"`` (the default)
draws as ADM does, so the same torch RNG state gives ADM's samples and losses:
``torch.randn(*shape, device=device)`` for x_T when ``noise`` is None and
``torch.randn_like(x)`` in every step after the model call (also at t == 0 and in DDIM with
eta == 0, where ADM draws and discards); ``training_losses`` and ``q_sample`` draw
``torch.randn_like(x_start)`` when ``noise`` is None. ``"stream"`` draws fastddpm's
counter-based noise instead (in-kernel, one seed per loop drawn from the device's torch
generator, each sample's noise fixed by its global index: faster and batch-split invariant, but
not ADM's values).

Differences: ``cond_fn`` (classifier guidance) shifts p_sample's mean in PyTorch, unfused (mean
+ variance * cond_fn(x, t, **model_kwargs)), then adds the noise with one fused step; in DDIM it
shifts the eps of the step's x0 by -sqrt(1 - ab_t) cond_fn(...) in PyTorch between two fused
passes (guided-diffusion's condition_score). ``denoised_fn`` costs one more fused pass.
ModelMeanType.PREVIOUS_X is not supported (NotImplementedError).
"""
import enum

import numpy as np
import torch

from .. import ops, objectives, samplers
from .._checks import check_channels, check_t, default_offset, draw_seed
from ..samplers.tables import adm as adm_tables
from ..samplers.tables import x0_only

__all__ = ["create_diffusion", "create_gaussian_diffusion", "GaussianDiffusion", "SpacedDiffusion",
           "space_timesteps", "get_named_beta_schedule", "ModelMeanType", "ModelVarType", "LossType",
           "NOISE_SOURCES"]

NOISE_SOURCES = ("torch", "stream")


class ModelMeanType(enum.Enum):
    """Which type of output the model predicts (ADM's names)."""
    PREVIOUS_X = enum.auto()  # not supported here
    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    """What is used as the model's output variance (ADM's names)."""
    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()
    RESCALED_MSE = enum.auto()  # MSE with the vb term scaled by num_timesteps / 1000
    KL = enum.auto()
    RESCALED_KL = enum.auto()   # the KL scaled by num_timesteps

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


_MEAN = {ModelMeanType.EPSILON: "eps", ModelMeanType.START_X: "x0"}
_VAR = {ModelVarType.LEARNED: "learned", ModelVarType.LEARNED_RANGE: "learned_range",
        ModelVarType.FIXED_SMALL: "fixed_small", ModelVarType.FIXED_LARGE: "fixed_large"}


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """ADM's betas (numpy float64): "linear" (scaled to 1000 steps) or "cosine" /
    "squaredcos_cap_v2" (betas capped at 0.999)."""
    return adm_tables.named_betas(schedule_name, num_diffusion_timesteps).numpy()


def space_timesteps(num_timesteps, section_counts):
    """ADM's space_timesteps: the set of original steps to keep ("", "250", "ddim50",
    "10,15,20" or a list of ints); an impossible request is a ValueError."""
    return adm_tables.space_timesteps(num_timesteps, section_counts)


def _check_noise_source(noise_source):
    if noise_source not in NOISE_SOURCES:
        raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")
    return noise_source


def _progress(it, enabled):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it)


class GaussianDiffusion:
    """ADM's GaussianDiffusion over fastddpm's fused ops (see the module doc).

    ``betas`` 1-D (numpy or torch; validated, float64); ``model_mean_type`` EPSILON or START_X
    (PREVIOUS_X raises NotImplementedError); ``model_var_type`` LEARNED (the model's variance
    channels are its log variance), LEARNED_RANGE (v in [-1, 1] between the posterior's clipped
    log variance and log beta), FIXED_SMALL or FIXED_LARGE; ``loss_type`` a LossType;
    ``rescale_timesteps`` passes the model t * 1000 / T as floats. fastddpm's additions,
    keyword-only: ``noise_source`` "torch" (ADM's draws, the default) or "stream" (fastddpm's
    counter-based noise); ``backend`` as in :func:`fastddpm.ops.solver_step` ("auto": the
    fastest available).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False,
                 noise_source="torch", backend="auto"):
        if model_mean_type == ModelMeanType.PREVIOUS_X:
            raise NotImplementedError("model_mean_type=ModelMeanType.PREVIOUS_X is not supported by fastddpm.adm; "
                                      "use EPSILON or START_X")
        if model_mean_type not in _MEAN:
            raise ValueError(f"model_mean_type must be a ModelMeanType, got {model_mean_type!r}")
        if model_var_type not in _VAR:
            raise ValueError(f"model_var_type must be a ModelVarType, got {model_var_type!r}")
        if not isinstance(loss_type, LossType):
            raise ValueError(f"loss_type must be a LossType, got {loss_type!r}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.rescale_timesteps = bool(rescale_timesteps)
        self.noise_source = _check_noise_source(noise_source)
        self.backend = backend
        betas64 = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        self._betas64 = adm_tables.schedules.from_betas(betas64)
        self.betas = self._betas64.numpy()
        self.num_timesteps = self._betas64.numel()
        self.alphas_cumprod = adm_tables.alpha_bar_of(self._betas64).numpy()
        if not hasattr(self, "timestep_map"):
            self._map64, self.original_num_steps = torch.arange(self.num_timesteps), self.num_timesteps
        self._mean = _MEAN[model_mean_type]
        self._var = _VAR[model_var_type]
        self._learned = self._var in ("learned", "learned_range")
        self._vlb_var = self._var if self._learned else "fixed"
        # float64 masters, once per object; device copies per (device, dtype) on first use.
        fixed = "large" if self._var == "fixed_large" else "small"
        self._masters = {
            "vlb": adm_tables.vlb_table(self._betas64, fixed),
            "p": adm_tables.p_sample_coef(self._betas64, self._mean, self._var),
            "p_x0": adm_tables.p_sample_coef(self._betas64, "x0", self._var),
            "eps": adm_tables.eps_coef(self._betas64),
        }
        m = self._masters
        m["mean"], m["mean_x0"] = adm_tables.mean_coef(m["p"]), adm_tables.mean_coef(m["p_x0"])
        m["x0"] = x0_only(m["p"])
        m["add_noise"] = adm_tables.add_noise_coef(m["p"])
        cx0, ceps = objectives.target_tables(self._mean, torch.from_numpy(self.alphas_cumprod))
        m["cx0"], m["ceps"] = cx0, ceps
        cols = adm_tables.schedules.VLB_COLUMNS
        for name in ("sqrt_ab", "sqrt_1m_ab", "post_logvar", "log_beta", "fixed_logvar"):
            m[name] = m["vlb"][:, cols.index(name)].contiguous()
        self._model_t64 = adm_tables.model_timesteps(self._map64, self.original_num_steps, self.rescale_timesteps)
        self._prior = adm_tables.prior_table(self._betas64)
        self._keys = samplers._step_keys(self.num_timesteps)
        self._on = {}

    # ---- helpers: tables, checks, the model call ---------------------------------------------
    def _tab(self, x, name, eta=None):
        key = (x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        tabs = self._on.setdefault(key, {})
        full = name if eta is None else (name, float(eta))
        if full not in tabs:
            master = self._masters[name] if eta is None else self._ddim_master(name, eta)
            tabs[full] = master.to(key[0], key[1])
        return tabs[full]

    def _ddim_master(self, name, eta):
        mean = {"ddim_x0": "x0", "ddim_eps": "eps"}.get(name, self._mean)
        return adm_tables.ddim_coef(self._betas64, mean, eta)

    def _t(self, t, x):
        return check_t(t, x.shape[0], x.device, self.num_timesteps)

    def _model_t(self, t):
        if self._model_t64.device != t.device:
            self._model_t64 = self._model_t64.to(t.device)
        return self._model_t64[t]

    def _call(self, model, x, t, model_kwargs):
        """model(x, original t, **model_kwargs) once; its output checked: (mean part, var part or None)."""
        out = model(x, self._model_t(t), **(model_kwargs or {}))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model's output must be a tensor (or a tuple whose first item is one), got "
                            f"{type(out).__name__}")
        c = x.shape[1] if x.dim() >= 2 else "C"
        what = (f"{c} mean and {c} variance channels for model_var_type={self.model_var_type.name}"
                if self._learned else f"{c} channels for model_var_type={self.model_var_type.name}")
        return check_channels("the model's output", out, "x", x, 2 if self._learned else 1, what)

    def _split(self, out, x):
        if not self._learned:
            return out, None
        c = x.shape[1]
        return out[:, :c].contiguous(), out[:, c:].contiguous()

    def _source(self, noise_source):
        return self.noise_source if noise_source is None else _check_noise_source(noise_source)

    def _grad_backend(self, *tensors):
        # The fused backends compute no gradient: where one is wanted, the reference runs.
        if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors):
            return "reference"
        return self.backend

    # ---- forward process ----------------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(ab_t) x_start + sqrt(1 - ab_t) noise (noise: torch.randn_like(x_start)
        when None, or the stream's with noise_source="stream")."""
        t = self._t(t, x_start)
        if noise is None and self.noise_source == "torch":
            noise = torch.randn_like(x_start)
        return ops.q_sample(x_start, t, self._tab(x_start, "sqrt_ab"), self._tab(x_start, "sqrt_1m_ab"), noise,
                            backend=self.backend)

    # ---- training ------------------------------------------------------------------------------
    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """ADM's per-sample losses: a dict with "loss" and, for the MSE types, "mse" (and "vb"
        with a learned variance), each [B]. One fused op: ops.vlb_loss (learned variance or KL
        types; the mean detached inside vb for the MSE types, as ADM) or ops.target_mse."""
        t = self._t(t, x_start)
        seed, offset = None, default_offset(x_start.shape[0])
        if noise is None:
            if self.noise_source == "torch":
                noise = torch.randn_like(x_start)
            else:
                seed = draw_seed(x_start.device)
        x_t = ops.q_sample(x_start, t, self._tab(x_start, "sqrt_ab"), self._tab(x_start, "sqrt_1m_ab"), noise,
                           seed=seed, sample_offset=offset, backend=self.backend)
        out = self._call(model, x_t, t, model_kwargs)
        kl = self.loss_type.is_vb()
        if self._learned or kl:
            terms = ops.vlb_loss(x_start, out, t, self._tab(x_start, "vlb"), noise, mean_type=self._mean,
                                 variance_type=self._vlb_var, detach_mean=not kl, seed=seed, sample_offset=offset,
                                 backend=self.backend)
            if kl:
                loss = terms[:, 1]
                return {"loss": loss * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else loss}
            mse, vb = terms[:, 0], terms[:, 1]
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)
            return {"mse": mse, "vb": vb, "loss": mse + vb}
        mse = ops.target_mse(out, x_start, t, self._tab(x_start, "cx0"), self._tab(x_start, "ceps"), noise,
                             seed=seed, sample_offset=offset, backend=self.backend)
        return {"mse": mse, "loss": mse}

    # ---- reverse process -----------------------------------------------------------------------
    def _step(self, name, x, mean_part, var, t, clip_denoised, noise, seed, offset, denoised_fn, backend, eta=None):
        """One fused step over tables ``name`` (-> [R, *x.shape]); with denoised_fn the x0 is
        formed (unclipped), passed through it, and the step reads it as an x0 prediction."""
        clip = 1.0 if clip_denoised else None
        if denoised_fn is not None:
            x0 = ops.solver_step(x, mean_part, t, self._tab(x, "x0"), backend=backend, seed=0)[0]
            mean_part = denoised_fn(x0)
            name = {"p": "p_x0", "mean": "mean_x0", "ddim": "ddim_x0"}[name]
        coef = self._tab(x, name, eta)
        return ops.solver_step(x, mean_part, t, coef, noise=noise, var=var, clip=clip,
                               seed=seed if noise is None else None, sample_offset=offset, backend=backend)

    def _mean_variance(self, x, t, out, clip_denoised, denoised_fn):
        mean_part, var = self._split(out, x)
        backend = self._grad_backend(out, x)
        y = self._step("mean", x, mean_part, None, t, clip_denoised, None, 0, 0, denoised_fn, backend)
        if self._learned:
            log_variance = objectives.learned_logvar(
                var, self._tab(x, "post_logvar")[t].view((-1,) + (1,) * (x.dim() - 1)),
                self._tab(x, "log_beta")[t].view((-1,) + (1,) * (x.dim() - 1)),
                self._var)
        else:
            log_variance = self._tab(x, "fixed_logvar")[t].view((-1,) + (1,) * (x.dim() - 1)).expand(x.shape)
        log_variance = log_variance.to(y.dtype)
        return {"mean": y[0], "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": y[1]}

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """ADM's p_mean_variance: dict of "mean", "variance", "log_variance", "pred_xstart"
        (the mean and x0 from one fused step; differentiable through the reference backend)."""
        t = self._t(t, x)
        out = self._call(model, x, t, model_kwargs)
        return self._mean_variance(x, t, out, clip_denoised, denoised_fn)

    def _draw(self, x, source, seed):
        """(noise, seed) of a step: ADM's randn_like(x), or the stream's (seed given or drawn)."""
        if source == "torch":
            return torch.randn_like(x), None
        return None, (draw_seed(x.device) if seed is None else seed)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, *,
                 noise_source=None, _seed=None, _offset=None):
        """ADM's p_sample: {"sample", "pred_xstart"}; one model call and one fused step (the noise
        scaled by the learned or fixed sigma, none at t == 0). With ``cond_fn`` the mean is
        shifted by variance * cond_fn(x, t, **model_kwargs) in PyTorch (unfused)."""
        t = self._t(t, x)
        source = self._source(noise_source)
        out = self._call(model, x, t, model_kwargs)
        offset = default_offset(x.shape[0]) if _offset is None else _offset
        if cond_fn is None:
            mean_part, var = self._split(out, x)
            noise, seed = self._draw(x, source, _seed)
            y = self._step("p", x, mean_part, var, t, clip_denoised, noise, seed, offset, denoised_fn,
                           self.backend)
            return {"sample": y[0], "pred_xstart": y[1]}
        pmv = self._mean_variance(x, t, out, clip_denoised, denoised_fn)
        noise, seed = self._draw(x, source, _seed)
        gradient = cond_fn(x, self._model_t(t), **(model_kwargs or {}))
        mean = pmv["mean"].float() + pmv["variance"] * gradient.float()  # guided-diffusion's condition_mean
        _, var = self._split(out, x)
        # mean + nonzero_mask * sigma * noise: the p_sample step's noise row applied to the mean
        mean = mean.to(x.dtype)
        y = ops.solver_step(mean, mean, t, self._tab(x, "add_noise"), noise=noise, var=var,
                            seed=seed if noise is None else None, sample_offset=offset, backend=self.backend)
        return {"sample": y[0], "pred_xstart": pmv["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, *, noise_source=None):
        """ADM's p_sample_loop: x_T = noise, else torch.randn(*shape, device=device) (or the
        stream's), then p_sample at t = T-1 .. 0; returns the final sample."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                    model_kwargs, device, progress, noise_source=noise_source):
            pass
        return final["sample"]

    def _loop_start(self, shape, noise, device, source):
        if device is None:
            device = noise.device if noise is not None else torch.device("cpu")
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        offset = default_offset(shape[0])
        seed = draw_seed(device) if source == "stream" else None
        if noise is not None:
            img = noise
        elif source == "torch":
            img = torch.randn(*shape, device=device)
        else:
            img = samplers.stream_noise(seed, offset, shape, torch.float32, device, self.backend)
        keys = self._keys.to(device) if seed is not None else None
        return img, seed, keys, offset

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, *, noise_source=None):
        """Yields each p_sample's dict from t = T-1 down to 0."""
        source = self._source(noise_source)
        img, seed, keys, offset = self._loop_start(shape, noise, device, source)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((shape[0],), i, dtype=torch.int64, device=img.device)
            with torch.no_grad():
                step_seed = None if seed is None else samplers.step_seed(seed, keys, i)
                out = self.p_sample(model, img, t, clip_denoised, denoised_fn, cond_fn, model_kwargs,
                                    noise_source=source, _seed=step_seed, _offset=offset)
            yield out
            img = out["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, *, noise_source=None, _seed=None, _offset=None):
        """ADM's ddim_sample: {"sample", "pred_xstart"}, one model call and one fused step (eps
        re-derived from the clipped x0; the learned variance is ignored, as ADM does)."""
        t = self._t(t, x)
        if cond_fn is not None:
            return self._ddim_guided(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta,
                                     noise_source, _seed, _offset)
        source = self._source(noise_source)
        out = self._call(model, x, t, model_kwargs)
        mean_part, _ = self._split(out, x)
        noise, seed = self._draw(x, source, _seed)
        offset = default_offset(x.shape[0]) if _offset is None else _offset
        y = self._step("ddim", x, mean_part, None, t, clip_denoised, noise, seed, offset, denoised_fn,
                       self.backend, eta=eta)
        return {"sample": y[0], "pred_xstart": y[1]}

    def _ddim_guided(self, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta, noise_source, seed,
                     offset):
        """ddim_sample with classifier guidance (guided-diffusion's condition_score): the x0 of the
        step (clipped as configured), its eps (one fused pass), the eps shifted by
        -sqrt(1 - ab_t) cond_fn(x, t, **model_kwargs) in PyTorch (unfused), then the DDIM step read
        as an eps prediction of that eps (one fused pass, unclipped, as ADM's)."""
        source = self._source(noise_source)
        out = self._call(model, x, t, model_kwargs)
        pmv = self._mean_variance(x, t, out, clip_denoised, denoised_fn)
        eps = ops.solver_step(x, pmv["pred_xstart"], t, self._tab(x, "eps"), backend=self.backend, seed=0)[0]
        gradient = cond_fn(x, self._model_t(t), **(model_kwargs or {}))
        sqrt_1m_ab = self._tab(x, "vlb")[t, 1].view((-1,) + (1,) * (x.dim() - 1))
        eps = (eps.float() - sqrt_1m_ab.float() * gradient.float()).to(x.dtype)
        noise, seed = self._draw(x, source, seed)
        offset = default_offset(x.shape[0]) if offset is None else offset
        y = ops.solver_step(x, eps, t, self._tab(x, "ddim_eps", eta), noise=noise, seed=seed if noise is None else None,
                            sample_offset=offset, backend=self.backend)
        return {"sample": y[0], "pred_xstart": y[1]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, *, noise_source=None):
        """ADM's ddim_sample_loop (its draws as p_sample_loop's)."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                       model_kwargs, device, progress, eta,
                                                       noise_source=noise_source):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0, *,
                                     noise_source=None):
        """Yields each ddim_sample's dict from t = T-1 down to 0."""
        source = self._source(noise_source)
        img, seed, keys, offset = self._loop_start(shape, noise, device, source)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((shape[0],), i, dtype=torch.int64, device=img.device)
            with torch.no_grad():
                step_seed = None if seed is None else samplers.step_seed(seed, keys, i)
                out = self.ddim_sample(model, img, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta,
                                       noise_source=source, _seed=step_seed, _offset=offset)
            yield out
            img = out["sample"]

    # ---- evaluation ----------------------------------------------------------------------------
    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, *, noise_source=None):
        """ADM's calc_bpd_loop: dict of "total_bpd", "prior_bpd" [B], and "vb", "xstart_mse",
        "mse" [B, T] (column t for step t). Each step: noise (randn_like(x_start), or the
        stream's), one model call, the clipped x0 by a fused step, vb and xstart_mse by one
        ops.vlb_loss (the x0 read as an x0 prediction), the eps MSE by ops.mse_per_sample."""
        source = self._source(noise_source)
        offset = default_offset(x_start.shape[0])
        b = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        with torch.no_grad():
            for i in list(range(self.num_timesteps))[::-1]:
                t = torch.full((b,), i, dtype=torch.int64, device=x_start.device)
                noise, seed = self._draw(x_start, source, None)
                x_t = ops.q_sample(x_start, t, self._tab(x_start, "sqrt_ab"), self._tab(x_start, "sqrt_1m_ab"),
                                   noise, seed=seed, sample_offset=offset, backend=self.backend)
                out = self._call(model, x_t, t, model_kwargs)
                mean_part, var = self._split(out, x_t)
                x0 = self._step("x0", x_t, mean_part, None, t, clip_denoised, None, 0, 0, None, self.backend)[0]
                as_x0 = x0 if var is None else torch.cat([x0, var.to(x0.dtype)], dim=1)
                terms = ops.vlb_loss(x_start, as_x0, t, self._tab(x_start, "vlb"), noise, mean_type="x0",
                                     variance_type=self._vlb_var, detach_mean=False, seed=seed,
                                     sample_offset=offset, backend=self.backend)
                vb.append(terms[:, 1])
                xstart_mse.append(terms[:, 0])
                eps = ops.solver_step(x_t, x0, t, self._tab(x_start, "eps"), backend=self.backend, seed=0)[0]
                mse.append(ops.mse_per_sample(eps, noise, seed=seed, sample_offset=offset, backend=self.backend))
            vb, xstart_mse, mse = (torch.stack(v[::-1], dim=1) for v in (vb, xstart_mse, mse))
            prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim (objectives.normal_kl)."""
        mean_c, logvar = self._prior
        zero = torch.zeros((), dtype=torch.float64, device=x_start.device)
        kl = objectives.normal_kl(mean_c * x_start.double(), zero + logvar, zero, zero)
        return (kl.flatten(1).mean(1) / objectives.LN2).to(torch.float32 if x_start.dtype != torch.float64
                                                            else torch.float64)


class SpacedDiffusion(GaussianDiffusion):
    """ADM's SpacedDiffusion: the kept steps ``use_timesteps`` of the base process given by
    ``**kwargs`` (GaussianDiffusion's arguments); ``timestep_map`` lists the original step of each
    kept index, which is what the model receives (times 1000 / T as floats with
    rescale_timesteps, T the original step count)."""

    def __init__(self, use_timesteps, **kwargs):
        if "betas" not in kwargs:
            raise TypeError("SpacedDiffusion needs betas= (the base process's)")
        base = adm_tables.schedules.from_betas(torch.as_tensor(np.asarray(kwargs["betas"], dtype=np.float64)))
        self.use_timesteps = set(int(i) for i in use_timesteps)
        self.original_num_steps = base.numel()
        new_betas, self._map64 = adm_tables.spaced_betas(base, self.use_timesteps)
        self.timestep_map = self._map64.tolist()
        kwargs["betas"] = new_betas.numpy()
        super().__init__(**kwargs)


def create_gaussian_diffusion(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule="linear",
                              use_kl=False, predict_xstart=False, rescale_timesteps=False,
                              rescale_learned_sigmas=False, timestep_respacing="", noise_source="torch",
                              backend="auto"):
    """improved-diffusion's script_util.create_gaussian_diffusion (plus ``noise_source`` and
    ``backend``, see GaussianDiffusion)."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing), betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=(ModelVarType.LEARNED_RANGE if learn_sigma else
                        ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE),
        loss_type=loss_type, rescale_timesteps=rescale_timesteps, noise_source=noise_source, backend=backend)


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000,
                     *, noise_source="torch", backend="auto"):
    """DiT's diffusion.create_diffusion (plus ``noise_source`` and ``backend``): DiT trains with
    ``create_diffusion("")`` and samples with ``create_diffusion("250")``."""
    return create_gaussian_diffusion(
        steps=diffusion_steps, learn_sigma=learn_sigma, sigma_small=sigma_small, noise_schedule=noise_schedule,
        use_kl=use_kl, predict_xstart=predict_xstart, rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing if timestep_respacing is not None else "", noise_source=noise_source,
        backend=backend)
