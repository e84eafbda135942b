"""fastddpm's EulerDiscreteScheduler and EulerAncestralDiscreteScheduler: diffusers' schedulers,
each step one pass of the fused general step (``fastddpm.ops.solver_step``).

(Imported from :mod:`fastddpm.diffusers`.)

    from fastddpm.diffusers import EulerDiscreteScheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' classes with the same config. ``set_timesteps`` is diffusers' own (the
same timesteps, sigmas and init_noise_sigma, whatever the spacing, sigma schedule --
Karras, exponential, beta, log-linear interpolation, custom ``sigmas``/``timesteps`` -- and
final sigma); the step tables are then built once, in float64, from those sigmas by
:mod:`fastddpm.samplers.tables.euler` (VE coordinates, as diffusers' sample).
``scale_model_input`` multiplies by the tables' 1 / sqrt(sigma^2 + 1).

The noise of Euler-ancestral (and of Euler's churn) is drawn as diffusers draws it
(``randn_tensor`` with the caller's generator, model_output's shape, dtype and device, at every
step, the last included), so loops give diffusers' results to float32 rounding.

Differences. diffusers forms sigma_down = sqrt(s'^2 - s_up^2) in float32, which loses all its
digits (or is NaN) when s' << s (e.g. two steps); here it is s'^2 / s exactly. Half-precision
samples step in float32, as diffusers' (which upcasts), returning prev_sample in model_output's
dtype. ``timestep_type="continuous"`` raises NotImplementedError (diffusers passes 0.25 log sigma
to the model there; not implemented here).
"""
try:
    import diffusers
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastddpm.diffusers needs diffusers: pip install diffusers") from e

import inspect

import torch

from .._checks import check_float, default_offset
from ..samplers.tables import euler as euler_tables
from ._output import output
from ._solver import SolverSteps, stream_seed

__all__ = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]

# pred_original_sample's dtype as diffusers' (float32 at least), for the usual dtypes
_X0_DTYPE = {d: torch.promote_types(torch.float32, d) for d in (torch.float16, torch.bfloat16, torch.float32,
                                                               torch.float64)}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "original_sample": "x0"}


def _as(x, dtype):
    """x in dtype; x itself when it is already (a same-dtype .to() still costs a dispatch)."""
    return x if x.dtype == dtype else x.to(dtype)


def _not_implemented(option, value, why=""):
    raise NotImplementedError(f"fastddpm.diffusers does not implement {option}={value!r}{why}")


class _EulerSteps(SolverSteps):
    """What both share: the plan of diffusers' sigmas, scale_model_input, the fused step."""

    _ancestral = False
    _fd_plans = None

    def _base_init(self, base, arguments):
        init = base.__init__.__wrapped__
        init(self, **{k: arguments[k] for k in inspect.signature(init).parameters if k != "self"})
        if self.config.prediction_type not in self._supported_predictions:
            _not_implemented("prediction_type", self.config.prediction_type,
                             f"; it implements {sorted(self._supported_predictions)}")

    def _tables_ready(self):
        """After diffusers' set_timesteps: the step tables of its sigmas, built once."""
        self._fd_plans, self._fd_ons = {}, {}
        self._plan_ready(self._plan_for(None))

    def _plan_for(self, churn):
        """The plan (cached per churn key) over diffusers' sigmas; churn: None or
        (s_churn, s_tmin, s_tmax, s_noise)."""
        plan = self._fd_plans.get(churn)
        if plan is None:
            n = len(self.timesteps)
            gamma, s_noise = None, 1.0
            if churn is not None:
                s_churn, s_tmin, s_tmax, s_noise = churn
                g = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1)
                gamma = [g if s_tmin <= s <= s_tmax else 0.0 for s in self.sigmas[:n].tolist()]
            plan = euler_tables.build(self.sigmas.to(torch.float64), self.timesteps,
                                      _PREDICTIONS[self.config.prediction_type], ancestral=self._ancestral,
                                      gamma=gamma, s_noise=s_noise)
            self._fd_plans[churn] = plan
        return plan

    def _use_plan(self, plan):
        """Make ``plan`` the one _fused_step runs (no history: switching keeps the run going),
        with its own tables on each device."""
        if plan is not self._fd_plan:
            self._fd_ons[id(self._fd_plan)] = self._fd_on
            self._fd_plan = plan
            self._fd_on = self._fd_ons.get(id(plan), {})

    def scale_model_input(self, sample, timestep):
        """sample / sqrt(sigma^2 + 1) of the current step (one fused multiply)."""
        if self._fd_plan is None:
            return super().scale_model_input(sample, timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        key = ("input_scale", sample.device, dtype)
        scale = self._fd_on.get(key)
        if scale is None:
            scale = self._fd_on[key] = self._fd_plan.input_scale.to(sample.device, dtype)
        return sample * scale[self.step_index]

    def _check_step(self, model_output, timestep, sample):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        if self._fd_plan is None:
            raise ValueError("call set_timesteps before step")
        check_float("sample", sample)
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        if self.step_index is None:
            self._init_step_index(timestep)

    def _run(self, model_output, sample, noise, stream=None):
        """(prev_sample, pred_original_sample) of the current step, as diffusers' dtypes (the
        noise given, or drawn in the kernel from ``stream``, (seed, sample_offset))."""
        i = self.step_index
        if i >= len(self._fd_plan):
            raise IndexError(f"step {i} is past the last of the {len(self._fd_plan)} steps: call set_timesteps")
        sdt, mdt = sample.dtype, model_output.dtype  # (each read of a tensor's dtype is a call)
        compute = torch.float64 if sdt == torch.float64 else torch.float32
        x = sample if sdt == compute else sample.to(compute)
        out = model_output if mdt == compute else model_output.to(compute)
        if noise is not None:
            noise = _as(noise, compute)
        named = self._fused_step(i, x, out, noise=noise, stream=stream)
        prev = named["prev"] if mdt == compute else named["prev"].to(mdt)
        x0_dtype = _X0_DTYPE.get(mdt) or torch.promote_types(torch.float32, mdt)
        x0 = named["x0"] if x0_dtype == compute else named["x0"].to(x0_dtype)
        self._step_index += 1
        return prev, x0


class EulerDiscreteScheduler(_EulerSteps, diffusers.EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` with fastddpm's fused step (same config)."""

    _supported_predictions = ("epsilon", "v_prediction", "sample", "original_sample")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, sigma_min: float = None,
                 sigma_max: float = None, timestep_spacing: str = "linspace", timestep_type: str = "discrete",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        if timestep_type != "discrete":
            _not_implemented("timestep_type", timestep_type, "; it implements 'discrete'")
        if interpolation_type not in ("linear", "log_linear"):
            _not_implemented("interpolation_type", interpolation_type, "; it implements 'linear', 'log_linear'")
        if final_sigmas_type not in ("zero", "sigma_min"):
            _not_implemented("final_sigmas_type", final_sigmas_type, "; it implements 'zero', 'sigma_min'")
        self._base_init(diffusers.EulerDiscreteScheduler, locals())

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None, sigmas=None):
        """diffusers' set_timesteps (custom ``timesteps`` or ``sigmas`` included); then the step
        tables of its sigmas, built once."""
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas)
        self._tables_ready()

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True):
        """diffusers' Euler step (with its churn), one fused pass."""
        self._check_step(model_output, timestep, sample)
        noise = churn = None
        if s_churn != 0:  # diffusers' gamma of this step (sigmas live on the host: no sync)
            sigma = float(self.sigmas[self.step_index])
            gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
            if gamma != 0:
                churn = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
            if gamma > 0:
                noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                     generator=generator)
        self._use_plan(self._plan_for(churn))
        prev, x0 = self._run(model_output, sample, noise)
        if not return_dict:
            return prev, x0
        return output(EulerDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_EulerSteps, diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` with fastddpm's fused step (same config, plus
    ``fused_noise``: False draws each step's noise as diffusers draws it; True has the kernel draw
    it from fastddpm's counter-based stream, one seed per step from the generator, as the DDPM
    and DDIM drop-ins' ``fused_noise``: faster, but not diffusers' random stream)."""

    _ancestral = True
    _supported_predictions = ("epsilon", "v_prediction")  # diffusers' step raises for "sample"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 fused_noise: bool = False):
        if not isinstance(fused_noise, bool):
            raise TypeError(f"fused_noise must be a bool, got {fused_noise!r}")
        self._base_init(diffusers.EulerAncestralDiscreteScheduler, locals())

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' set_timesteps; then the step tables of its sigmas, built once."""
        super().set_timesteps(num_inference_steps, device=device)
        self._tables_ready()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """diffusers' Euler-ancestral step, one fused pass; its noise drawn as diffusers draws it."""
        self._check_step(model_output, timestep, sample)
        if self.config.fused_noise:
            prev, x0 = self._run(model_output, sample, None, (stream_seed(sample, generator),
                                                              default_offset(sample.shape[0])))
        else:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            prev, x0 = self._run(model_output, sample, noise)
        if not return_dict:
            return prev, x0
        return output(EulerAncestralDiscreteSchedulerOutput, prev_sample=prev, pred_original_sample=x0)
