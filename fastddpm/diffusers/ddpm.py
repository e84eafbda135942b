"""fastddpm's DDPMScheduler and DDIMScheduler: diffusers' schedulers, stepping with fused kernels.

(Imported from :mod:`fastddpm.diffusers`, which holds one module per scheduler family.)

    from fastddpm.diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

Both are subclasses of diffusers' classes with the same config (plus ``fused_noise``), so
``from_config``, ``save_pretrained``/``from_pretrained``, ``_compatibles`` and pipelines work
unchanged. ``set_timesteps`` builds per-timestep tables once, in float64, from
:mod:`fastddpm.samplers.tables` (one row per train timestep t, with diffusers' previous
timestep for each); ``step`` is then the fused ``fastddpm.ops.p_sample_step`` (a step without
noise, such as DDIM's with eta = 0, is that form less its noise term, the fused
``fastddpm.ops.q_sample``; a second fused q_sample forms ``pred_original_sample``), and
``add_noise`` and ``get_velocity`` are the fused q_sample with per-sample timesteps.

Results. By default the variance noise is drawn as diffusers draws it (``randn_tensor`` with the
caller's generator, same shape, dtype and device, only where diffusers draws it) and passed to
the kernel, so sampling loops give diffusers' images to float32 rounding. With
``fused_noise=True`` the kernel draws it from fastddpm's counter-based stream instead: one seed
per step from the generator, and a sample's noise depends only on that seed and the sample's
global index (rank * local batch + k under torch.distributed), so ranks that draw the same seed
give the whole batch's step however it is split. Faster, but not diffusers' random stream.

Differences. Coefficients are formed in float64 and applied in float32 (float64 for float64
samples); diffusers forms them in float32 and, for float16/bfloat16 samples, rounds them to the
sample's dtype, so half-precision results differ from diffusers' by that rounding (fastddpm's
are the more accurate). ``variance_type="learned"``/``"learned_range"`` scale the noise
by the model's per-element standard deviation in PyTorch before the fused step.
``variance_type="fixed_large_log"`` raises NotImplementedError: diffusers' step takes the square
root of log(beta) there, which is NaN.
"""
try:
    import diffusers
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastddpm.diffusers needs diffusers: pip install diffusers") from e

import inspect

import torch

from .. import backends, ops
from .._checks import default_offset as _default_offset
from ..samplers import clipping, stream_noise, tables
from ._output import output
from ._solver import stream_seed

__all__ = ["DDPMScheduler", "DDIMScheduler"]

_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' DDPM variance_type -> the tables' variance of the noise it adds.
_DDPM_VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta",
                   "learned": "beta", "learned_range": "beta_tilde"}


def _check_choice(option, value, allowed):
    if value not in allowed:
        raise NotImplementedError(f"fastddpm.diffusers does not implement {option}={value!r}; "
                                  f"it implements {sorted(allowed)}")


class _FusedSteps:
    """What both schedulers share: the tables, on each device, and the fused step."""

    def _base_init(self, base, arguments):
        """diffusers' own ``base.__init__`` without its config decorator (the subclass's
        registered the config, fused_noise included) on the arguments it takes, then the checks
        both schedulers share."""
        init = base.__init__.__wrapped__
        init(self, **{k: arguments[k] for k in inspect.signature(init).parameters if k != "self"})
        self._check_common_config()

    def _check_common_config(self):
        _check_choice("prediction_type", self.config.prediction_type, _PREDICTIONS)
        if not isinstance(self.config.fused_noise, bool):
            raise TypeError(f"fused_noise must be a bool, got {self.config.fused_noise!r}")

    @property
    def _clipping(self):
        return bool(self.config.thresholding or self.config.clip_sample)

    def _reset_tables(self):
        ab = self.alphas_cumprod.to("cpu", torch.float64)
        self._alpha_bar64 = ab
        # q(x_t | x0): add_noise is sqrt_ab x0 + sqrt_1m_ab noise, get_velocity sqrt_ab noise - sqrt_1m_ab x0.
        self._forward64 = {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(), "minus_sqrt_1m_ab": -(1 - ab).sqrt()}
        self._tables64 = {}  # key -> float64 tables of the steps, one row per train timestep
        self._on = {}  # (key, device, dtype) -> those tables there

    def _tables(self, key, x):
        """The tables ``key`` (made by ``self._make_tables(key)`` once) in x's compute dtype on x's device."""
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        where = (key, x.device, cdt)
        if where not in self._on:
            if key not in self._tables64:
                tab = self._make_tables(key)
                if "k2" in tab:
                    tab["minus_k2"] = -tab["k2"]  # the fused step's c2
                self._tables64[key] = tab
            self._on[where] = {k: v.to(x.device, cdt) for k, v in self._tables64[key].items()}
        return self._on[where]

    def _step_tables(self, ts_prev, noisy, kind, **options):
        """tables.step_tables over every train timestep t (row t), going to ``ts_prev[t]``."""
        ts = torch.arange(self.config.num_train_timesteps)
        return tables.step_tables(self._alpha_bar64, ts, kind, prediction=_PREDICTIONS[self.config.prediction_type],
                                  ts_prev=ts_prev, noisy=noisy, **options)

    def _seed(self, sample, generator):
        return stream_seed(sample, generator)

    def _fused_step(self, sample, out, t, tab, *, noisy, noise, generator, sigma="s"):
        """(prev_sample, pred_original_sample) of one step at timestep t (an int, or a tensor on
        sample's device). ``noise`` is the variance noise (None with fused_noise: drawn here)."""
        out = ops.check_like("model_output", out, "sample", sample)
        clipped = self._clipping
        seed, offset = None, 0
        if noisy and noise is None:
            seed, offset = self._seed(sample, generator), _default_offset(sample.shape[0])
        if not clipped:
            if noisy:
                prev = ops.p_sample_step(sample, out, t, tab["k1"], tab["minus_k2"], tab[sigma], noise,
                                         seed=seed, sample_offset=offset)
            else:  # no noise term: k1 x_t + k2 out is the fused q_sample's form (no draw, unlike sigma = 0)
                prev = ops.q_sample(sample, t, tab["k1"], tab["k2"], out)
            return prev, ops.q_sample(sample, t, tab["a"], tab["b"], out)
        # The fused clipped step indexes the tables by a step number: here the timestep.
        n = self.config.num_train_timesteps
        if isinstance(t, torch.Tensor) and t.dim() != 0 or not 0 <= int(t) < n:
            raise ValueError(f"timestep must be one int in [0, {n}), got {t}")
        key = f"coef_{sigma}"  # the general step's tables with this noise scale, made once per device
        if key not in tab:
            tab[key] = ops.clipped_coef(tab["a"], tab["b"], tab["p"], tab["q"], tab["r"], tab[sigma])
            tab["x0_coef"] = tables.x0_only(tab[key])
        coef = tab[key]
        impl = backends.resolve(None, sample.device)
        t = torch.full((sample.shape[0],), int(t), dtype=torch.int64, device=sample.device)
        cfg = self.config
        bound, clip = clipping.bound_or_clip(
            impl, sample, out, None, 1.0, t, tab, None if cfg.thresholding else float(cfg.clip_sample_range),
            float(cfg.dynamic_thresholding_ratio) if cfg.thresholding else None, float(cfg.sample_max_value))
        if noise is not None:
            noise = ops.check_like("noise", noise, "sample", sample)
        elif seed is None:  # no noise term: the kernel draws nothing
            seed = clipping.quiet_seed(sample.device)
        prev = ops.run_solver_step(impl, sample, out, None, (), t, coef, bound, clip, 1.0, noise, seed, offset)[0]
        return prev, clipping.predicted_x0(impl, sample, out, None, 1.0, t, tab, bound, clip)

    def _checked_timesteps(self):
        """set_timesteps' timesteps as a list, each in [0, num_train_timesteps): diffusers' own
        would index alphas_cumprod out of range (or at -1, wrapping round) in step."""
        ts, n = self.timesteps.tolist(), self.config.num_train_timesteps
        bad = [t for t in ts if not 0 <= t < n]
        if bad:
            raise ValueError(f"set_timesteps gave timesteps outside [0, {n}): {bad} (timestep_spacing="
                             f"{self.config.timestep_spacing!r}, steps_offset={self.config.steps_offset}; "
                             "diffusers' 'trailing' appends a spurious -1 for some step counts): choose "
                             "another num_inference_steps or spacing")
        return ts

    def _check_inputs(self, model_output, sample):
        ops.check_float("sample", sample)
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")

    def _per_sample_t(self, timesteps, x):
        """add_noise's ``timesteps`` (an int, a 0-d or a [B] integer tensor) -> an int64 [B] tensor on x's device."""
        if not isinstance(timesteps, torch.Tensor):
            return timesteps
        t = timesteps.to(x.device).flatten()
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        return t

    def add_noise(self, original_samples, noise, timesteps):
        """sqrt(ab[t]) original_samples + sqrt(1 - ab[t]) noise, per-sample t: the fused q_sample."""
        ops.check_float("original_samples", original_samples)
        tab = self._tables("forward", original_samples)
        return ops.q_sample(original_samples, self._per_sample_t(timesteps, original_samples), tab["sqrt_ab"],
                            tab["sqrt_1m_ab"], noise)

    def get_velocity(self, sample, noise, timesteps):
        """sqrt(ab[t]) noise - sqrt(1 - ab[t]) sample, per-sample t: the fused q_sample."""
        ops.check_float("sample", sample)
        noise = ops.check_like("noise", noise, "sample", sample)
        tab = self._tables("forward", sample)
        return ops.q_sample(noise, self._per_sample_t(timesteps, sample), tab["sqrt_ab"], tab["minus_sqrt_1m_ab"],
                            sample)


class DDPMScheduler(_FusedSteps, diffusers.DDPMScheduler):
    """diffusers' ``DDPMScheduler`` with fastddpm's fused step, add_noise and get_velocity.

    Same config and behaviour (see the module doc for the differences), plus ``fused_noise``:
    draw the variance noise in-kernel from fastddpm's counter-based stream (not diffusers' stream).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, fused_noise: bool = False):
        self._base_init(diffusers.DDPMScheduler, locals())
        if variance_type == "fixed_large_log":
            raise NotImplementedError("fastddpm.diffusers does not implement variance_type='fixed_large_log': "
                                      "diffusers' step takes the square root of log(beta) there, which is NaN")
        _check_choice("variance_type", variance_type, _DDPM_VARIANCES)
        self._reset_tables()
        self._listed = None  # the timesteps step accepts after set_timesteps (None: every t)

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """diffusers' set_timesteps; then the tables of those steps, built once."""
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        self._reset_tables()
        self._listed = {}
        ts = self._checked_timesteps()
        for i, t in enumerate(ts):
            self._listed.setdefault(t, ts[i + 1] if i + 1 < len(ts) else -1)  # diffusers takes the first match
        self._tables("steps", self.timesteps.new_empty(0, dtype=torch.float32))

    def _make_tables(self, key):
        if key == "forward":
            return dict(self._forward64)
        # diffusers' previous_timestep: the next listed timestep after set_timesteps, else t - 1.
        n = self.config.num_train_timesteps
        ts_prev = torch.arange(n) - 1
        for t, prev in (self._listed or {}).items():
            ts_prev[t] = prev
        noisy = torch.arange(n) > 0  # diffusers adds noise where t > 0
        variance = _DDPM_VARIANCES[self.config.variance_type]
        tab = self._step_tables(ts_prev, noisy, "ddpm", variance=variance)
        if self.config.variance_type in ("learned", "learned_range"):
            # The model gives the standard deviation: the fused step takes it as noise of sigma 1.
            tab["unit"] = noisy.to(torch.float64)
            small = self._step_tables(ts_prev, noisy, "ddpm", variance="beta_tilde")["s"]
            large = self._step_tables(ts_prev, noisy, "ddpm", variance="beta")["s"]
            tab["min_log"], tab["max_log"] = (small ** 2).log(), (large ** 2).log()
        return tab

    def _timestep(self, timestep):
        t = int(timestep)
        n = self.config.num_train_timesteps
        if self._listed is not None and t not in self._listed:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps (set_timesteps)")
        if not 0 <= t < n:
            raise ValueError(f"timestep must lie in [0, {n}), got {t}")
        return t

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """diffusers' DDPM step: x_{t_prev} from the model output at ``timestep``, fused."""
        self._check_inputs(model_output, sample)
        t = self._timestep(timestep)
        learned = self.config.variance_type in ("learned", "learned_range")
        predicted_variance = None
        if learned:
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={self.config.variance_type!r} needs model_output with twice "
                                 f"sample's {sample.shape[1]} channels, got {model_output.shape[1]}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        tab = self._tables("steps", sample)
        noisy = t > 0
        noise = None
        if noisy and not self.config.fused_noise:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        if noisy and learned:
            if noise is None:
                noise = stream_noise(self._seed(sample, generator), _default_offset(sample.shape[0]),
                                     sample.shape, tab["s"].dtype, sample.device)
            noise = self._learned_std(predicted_variance, tab, t) * noise
        prev, x0 = self._fused_step(sample, model_output, t, tab, noisy=noisy, noise=noise, generator=generator,
                                    sigma="unit" if learned else "s")
        if not return_dict:
            return prev, x0
        return output(DDPMSchedulerOutput, prev_sample=prev, pred_original_sample=x0)

    def _learned_std(self, predicted_variance, tab, t):
        """The per-element standard deviation of diffusers' learned variance types."""
        v = predicted_variance.to(tab["s"].dtype)
        if self.config.variance_type == "learned":
            return v ** 0.5
        frac = (v + 1) / 2  # learned_range: interpolate log beta_tilde .. log beta
        return torch.exp(0.5 * (frac * tab["max_log"][t] + (1 - frac) * tab["min_log"][t]))


class DDIMScheduler(_FusedSteps, diffusers.DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with fastddpm's fused step, add_noise and get_velocity.

    Same config and behaviour (see the module doc for the differences), plus ``fused_noise``.
    As in diffusers, step t goes to ``t - num_train_timesteps // num_inference_steps`` whatever
    the spacing; tables for each ``eta`` passed to step are built on first use.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, fused_noise: bool = False):
        self._base_init(diffusers.DDIMScheduler, locals())
        self._reset_tables()

    def set_timesteps(self, num_inference_steps, device=None):
        """diffusers' set_timesteps; then the (eta = 0) tables of those steps, built once."""
        super().set_timesteps(num_inference_steps, device=device)
        self._checked_timesteps()
        self._reset_tables()
        self._tables((0.0, False), self.timesteps.new_empty(0, dtype=torch.float32))

    def _make_tables(self, key):
        if key == "forward":
            return dict(self._forward64)
        eta, eps_from_x0 = key
        n = self.config.num_train_timesteps
        ts_prev = torch.arange(n) - n // self.num_inference_steps
        noisy = torch.ones(n, dtype=torch.bool)  # diffusers adds eta-scaled noise at every step
        return self._step_tables(ts_prev, noisy, "ddim", eta=eta, final_alpha_one=bool(self.config.set_alpha_to_one),
                                 eps_from_x0=eps_from_x0)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """diffusers' DDIM step: x_{t - T // n} from the model output at ``timestep``, fused."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        self._check_inputs(model_output, sample)
        eta = float(eta)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        noisy = eta > 0
        noise = None
        if noisy:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = variance_noise
            if noise is None and not self.config.fused_noise:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
        # Without clipping eps from x0 is eps itself: use_clipped_model_output changes nothing.
        tab = self._tables((eta, bool(use_clipped_model_output) and self._clipping), sample)
        t = timestep.to(sample.device) if isinstance(timestep, torch.Tensor) else timestep
        prev, x0 = self._fused_step(sample, model_output, t, tab, noisy=noisy, noise=noise, generator=generator)
        if not return_dict:
            return prev, x0
        return output(DDIMSchedulerOutput, prev_sample=prev, pred_original_sample=x0)
