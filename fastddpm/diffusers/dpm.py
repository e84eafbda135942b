"""fastddpm's DPMSolverMultistepScheduler: diffusers' DPM-Solver++ stepping with one fused op.

    from fastddpm.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class with the same config (plus ``fastddpm_backend``). diffusers'
``set_timesteps`` places the timesteps and sigmas (every spacing, ``steps_offset``, Karras,
exponential, beta and Lu-lambda sigmas, ``lambda_min_clipped``, custom timesteps); the
float64 tables of the whole run are then built once from those sigmas by
:func:`fastddpm.samplers.tables.dpm.build` (the native "dpm++" sampler's builder), and each
``step`` is one ``fastddpm.ops.solver_step``: the data prediction x0 (thresholded when
configured), the update from it and the run's earlier x0's, and the x0 kept for the next step.

Noise (``algorithm_type="sde-dpmsolver++"``): drawn as diffusers draws it, ``randn_tensor``
with the caller's generator, float32, the model output's shape, at every step (also the last,
where its weight is 0), or ``variance_noise`` when given.

Differences from diffusers (fixes): the SDE order-3 step uses the exact D2 weight (diffusers'
has the wrong sign on its 1/2, see :mod:`fastddpm.samplers.tables.dpm`); a step between two
equal sigmas (Karras sigmas with ``final_sigmas_type="sigma_min"``: heun with >= 15 steps,
order 3) is the identity, where diffusers gives NaN. Coefficients are formed in float64 and
applied in float32 (float64 for float64 inputs); half inputs are stepped in float32 and the
result returned in the model output's dtype, as diffusers returns it.

Not implemented (NotImplementedError): algorithm_type "dpmsolver"/"sde-dpmsolver" (the
noise-prediction variants), use_flow_sigmas, prediction_type "flow_prediction",
use_dynamic_shifting, solver_order > 3, variance_type "learned"/"learned_range" with
an SDE algorithm or a prediction_type other than "epsilon" (diffusers itself fails there).
"""
try:
    import diffusers
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastddpm.diffusers needs diffusers: pip install diffusers") from e

import inspect

import torch

from .. import ops
from ..samplers.tables import dpm as dpm_tables
from ._output import output
from ._solver import SolverSteps

__all__ = ["DPMSolverMultistepScheduler"]

_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
_HALF = (torch.float16, torch.bfloat16)


def _not_implemented(option, value, why=""):
    raise NotImplementedError(f"fastddpm.diffusers.DPMSolverMultistepScheduler does not implement "
                              f"{option}={value!r}{why}")


class DPMSolverMultistepScheduler(SolverSteps, diffusers.DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++, ODE and SDE, orders 1-3), each
    step one fused op. Same config and results (see the module doc for the fixes), plus
    ``fastddpm_backend``: the fastddpm backend of the steps ("auto" by default)."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type=None, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", fastddpm_backend: str = "auto"):
        arguments = locals()
        init = diffusers.DPMSolverMultistepScheduler.__init__.__wrapped__
        init(self, **{k: arguments[k] for k in inspect.signature(init).parameters if k != "self"})
        self._check_config()
        self._fd_start = 0

    def _check_config(self):
        cfg = self.config  # after diffusers' own renames (deis -> dpmsolver++, bh1 -> midpoint, ...)
        if cfg.algorithm_type not in _ALGORITHMS:
            _not_implemented("algorithm_type", cfg.algorithm_type, f"; it implements {list(_ALGORITHMS)}")
        if cfg.prediction_type not in _PREDICTIONS:
            _not_implemented("prediction_type", cfg.prediction_type, f"; it implements {sorted(_PREDICTIONS)}")
        if isinstance(cfg.solver_order, bool) or cfg.solver_order not in dpm_tables.ORDERS:
            _not_implemented("solver_order", cfg.solver_order, "; it implements 1, 2 and 3")
        for option in ("use_flow_sigmas", "use_dynamic_shifting"):
            if getattr(cfg, option):
                _not_implemented(option, True)
        if cfg.variance_type is not None and (cfg.algorithm_type != "dpmsolver++" or cfg.prediction_type != "epsilon"):
            _not_implemented("variance_type", cfg.variance_type,
                             f" with algorithm_type={cfg.algorithm_type!r} and prediction_type="
                             f"{cfg.prediction_type!r} (only with 'dpmsolver++' and 'epsilon')")
        if not isinstance(cfg.fastddpm_backend, str):
            raise TypeError(f"fastddpm_backend must be a str, got {cfg.fastddpm_backend!r}")

    def _build_plan(self, start=0):
        cfg = self.config
        return dpm_tables.build(
            self.sigmas.to(torch.float64), self.timesteps.cpu(), prediction=_PREDICTIONS[cfg.prediction_type],
            order=cfg.solver_order, solver_type=cfg.solver_type, sde=cfg.algorithm_type == "sde-dpmsolver++",
            lower_order_final=cfg.lower_order_final, euler_at_final=cfg.euler_at_final,
            final_sigmas_type=cfg.final_sigmas_type, start=start)

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        """diffusers' set_timesteps; then the float64 tables of the whole run, built once."""
        super().set_timesteps(num_inference_steps, device=device, mu=mu, timesteps=timesteps)
        self._plan_ready(self._build_plan())
        self._fd_start = 0

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        """diffusers' step, as one fused op (see the module doc)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        ops.check_float("sample", sample)
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        cfg = self.config
        if cfg.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # the mean part, as diffusers takes it
        first = self.step_index is None
        if first:
            self._init_step_index(timestep)
        i = self.step_index
        if first and i != self._fd_start and self._fd_next == 0:
            # a run that begins mid-schedule (set_begin_index): its warm-up counts from there
            self._plan_ready(self._build_plan(start=i))
            self._fd_start, self._fd_next = i, i
        cdt = torch.float64 if sample.dtype == torch.float64 else torch.float32
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            noise = noise.to(cdt) if self._fd_plan.noisy[i] else None
        threshold = (float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value)) if cfg.thresholding else None
        named = self._fused_step(i, sample.to(cdt), model_output.to(cdt), noise=noise, threshold=threshold)
        prev_sample = named["prev"].to(model_output.dtype)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return output(SchedulerOutput, prev_sample=prev_sample)
