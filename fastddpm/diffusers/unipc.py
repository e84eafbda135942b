"""fastddpm's UniPCMultistepScheduler: diffusers' UniPC, each step one fused general step.

(Imported from :mod:`fastddpm.diffusers`.)

    from fastddpm.diffusers import UniPCMultistepScheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class with the same config. ``set_timesteps`` runs diffusers' own (the
same timesteps and float32 sigmas), then builds the run's tables once, in float64, from
:func:`fastddpm.samplers.tables.unipc.coefficients` (the native "unipc" sampler's builder): the
corrector's and predictor's rho (diffusers solves for them with ``torch.linalg.solve`` at every
step) depend on the sigmas only. ``step`` is then one pass of ``fastddpm.ops.solver_step``,
which writes the next sample, the corrected sample and the converted model output at once.
UniPC draws no noise.

Differences from diffusers (the drop-in gives the finite limit where diffusers' float32 formula
does not): ``solver_type="bh1"`` with ``final_sigmas_type="zero"`` (diffusers: NaN at the last
step, -inf * 0; the limit is the x0 prediction), ``predict_x0=False`` with "zero" (diffusers:
NaN, 0 * inf; the limit is again the x0 prediction); a last step to sigma 0 at order >= 2
(``lower_order_final=False``: diffusers gives inf or NaN, its higher-order terms diverge) is
taken at order 1; a step of h = 0 (``use_karras_sigmas`` with "sigma_min", whose last two sigmas
are equal) is the identity (diffusers: NaN at order 3). Half-precision samples step in float32
(diffusers steps them in their own dtype), prev_sample returned in the sample's dtype.

Not implemented (NotImplementedError at construction): ``solver_p``, ``solver_order`` > 3,
``prediction_type="flow_prediction"``, ``use_flow_sigmas``, ``use_exponential_sigmas``,
``use_beta_sigmas``, ``use_dynamic_shifting``.
"""
try:
    import diffusers
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastddpm.diffusers needs diffusers: pip install diffusers") from e

import inspect

import torch

from .. import ops
from ..samplers import tables
from ..samplers.tables import unipc as unipc_tables
from ._output import output
from ._solver import SolverSteps

__all__ = ["UniPCMultistepScheduler"]

_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_HALF = (torch.float16, torch.bfloat16)


def _not_implemented(option, value, why=""):
    raise NotImplementedError(f"fastddpm.diffusers.UniPCMultistepScheduler does not implement {option}={value!r}"
                              + (f": {why}" if why else ""))


class UniPCMultistepScheduler(SolverSteps, diffusers.UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` stepping with fastddpm's fused general step.

    Same config and behaviour (see the module doc for the differences and the options not
    implemented).
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector=[],  # noqa: B006
                 solver_p=None, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sigma_min=None, sigma_max=None, shift_terminal=None):
        arguments = locals()
        for option in ("use_flow_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting"):
            if arguments[option]:
                _not_implemented(option, arguments[option])
        if solver_p is not None:
            _not_implemented("solver_p", type(solver_p).__name__, "the UniC corrector over another scheduler")
        if prediction_type not in _PREDICTIONS:
            _not_implemented("prediction_type", prediction_type, f"it implements {sorted(_PREDICTIONS)}")
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
            raise ValueError(f"solver_order must be a positive int, got {solver_order!r}")
        if solver_order > unipc_tables.MAX_ORDER:
            _not_implemented("solver_order", solver_order, "it implements orders 1 to 3")
        init = diffusers.UniPCMultistepScheduler.__init__.__wrapped__
        init(self, **{k: arguments[k] for k in inspect.signature(init).parameters if k != "self"})
        if self.config.solver_type not in unipc_tables.VARIANTS:  # pragma: no cover - diffusers checks it
            _not_implemented("solver_type", self.config.solver_type)
        if final_sigmas_type not in unipc_tables.FINAL_SIGMAS:
            raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got {final_sigmas_type}")
        self._fd_start = None

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        """diffusers' set_timesteps; then the run's tables, built once (and the history reset)."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        n = self.config.num_train_timesteps
        bad = [t for t in self.timesteps.tolist() if not 0 <= t < n]
        if bad:
            raise ValueError(f"set_timesteps gave timesteps outside [0, {n}): {bad} (timestep_spacing="
                             f"{self.config.timestep_spacing!r}, steps_offset={self.config.steps_offset})")
        self._sigmas64 = self.sigmas.to(torch.float64)
        self._fd_start = None
        self._plan_from(0)

    def _plan_from(self, start):
        """The plan of a run that starts at step ``start`` (diffusers begins its warm-up there:
        no corrector at the first step, orders counted from it)."""
        off = {i + 1 - start for i in self.disable_corrector}
        coef, outputs, depth, uses_last = unipc_tables.coefficients(
            self._sigmas64[start:], prediction=_PREDICTIONS[self.config.prediction_type],
            order=self.config.solver_order, variant=self.config.solver_type, predict_x0=bool(self.predict_x0),
            lower_order_final=bool(self.config.lower_order_final), corrector_off=off)
        plan = tables.Plan(coef, outputs, self.timesteps[start:].cpu(), self._sigmas64[start:], depth=depth,
                           uses_last=uses_last)
        self._plan_ready(plan)
        self._fd_start = start

    def step(self, model_output, timestep, sample, return_dict=True):
        """diffusers' UniPC step (corrector, then predictor), one fused pass."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        ops.check_float("sample", sample)
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        model_output = ops.check_like("model_output", model_output, "sample", sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        if i >= len(self.timesteps):
            raise ValueError(f"step {i} is past the last of the {len(self.timesteps)} steps: call set_timesteps")
        if i - self._fd_start != self._fd_next:
            if self._fd_next != 0:
                raise RuntimeError(f"UniPCMultistepScheduler: step index {i} does not follow step "
                                   f"{self._fd_start + self._fd_next - 1}; call set_timesteps to start a new run")
            # a run starting past step 0 (set_begin_index, img2img): diffusers' warm-up starts there
            self._plan_from(i)
        dtype = sample.dtype
        x, out = sample, model_output
        if dtype in _HALF:
            x, out = x.float(), out.float()
        threshold = None
        if self.config.thresholding and self.predict_x0:
            threshold = (float(self.config.dynamic_thresholding_ratio), float(self.config.sample_max_value))
        named = self._fused_step(i - self._fd_start, x, out, threshold=threshold)
        prev = named["prev"].to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return output(SchedulerOutput, prev_sample=prev)
