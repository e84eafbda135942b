"""What the multistep drop-ins share: a Plan's tables on each device, the run's history, and the
fused general step (``fastddpm.ops.solver_step``).

A drop-in (DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler) builds its :class:`fastddpm.samplers.tables.Plan` in
``set_timesteps`` from the same tables module as the native samplers, calls
:meth:`SolverSteps._plan_ready` with it, and runs each ``step`` as one call of
:meth:`SolverSteps._fused_step`. diffusers' own ``step_index``/``begin_index`` bookkeeping is
kept (the subclass inherits it): the index is found once, on the first step, as diffusers finds it.
"""
import torch

from .. import backends, ops
from ..samplers import clipping, tables


class SolverSteps:
    """Mixin for a diffusers scheduler subclass stepping with a Plan."""

    _fd_plan = None

    def _plan_ready(self, plan: tables.Plan):
        """A new run: its plan, no history, tables not yet on any device."""
        self._fd_plan = plan
        self._fd_on = {}  # (device, dtype) -> {"coef", "x0_coef", "steps"}
        self._fd_history = []
        self._fd_next = 0

    def _fd_tables(self, x):
        key = (x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        tab = self._fd_on.get(key)
        if tab is None:
            coef = self._fd_plan.coef.to(key[0], key[1])
            tab = self._fd_on[key] = {"coef": coef, "x0_coef": tables.x0_only(coef),
                                      "steps": torch.arange(len(self._fd_plan), device=key[0])}
        return tab

    def _fused_step(self, i, sample, model_output, noise=None, threshold=None):
        """Step i of the run on ``sample`` (x_i) and ``model_output``: {output name: tensor} (the
        Plan's outputs, "prev" first), in sample's dtype. ``noise`` is the z of the step (None
        where the plan draws none); ``threshold`` (ratio, max value) thresholds x0 as diffusers'
        ``_threshold_sample`` (two passes: the quantile of the unclamped x0 first)."""
        plan = self._fd_plan
        if i == 0:
            self._fd_history = []
        elif i != self._fd_next:
            raise RuntimeError(f"{type(self).__name__}: step index {i} follows step {self._fd_next - 1}; "
                               "call set_timesteps to start a new run")
        history = tuple(self._fd_history[:plan.n_history(i)])
        impl = backends.resolve(getattr(self.config, "fastddpm_backend", "auto"), sample.device)
        tab = self._fd_tables(sample)
        t = tab["steps"][i].expand(sample.shape[0])
        if model_output.dtype != sample.dtype:  # (a same-dtype .to() still costs a dispatch)
            model_output = model_output.to(sample.dtype)
        bound, clip = None, float("inf")
        if threshold is not None:
            ratio, max_value = threshold
            bound = clipping.threshold_bound(impl, sample, model_output, None, 1.0, t,
                                             tab, ratio, max_value)
        seed = None if noise is not None else clipping.quiet_seed(sample.device)
        if noise is None and plan.noisy[i]:
            raise ValueError(f"step {i} adds noise: pass its noise")
        y = ops.run_solver_step(impl, sample, model_output, None, history, t, tab["coef"], bound, clip, 1.0, noise,
                                seed, 0)
        named = {name: y[k] for k, name in enumerate(plan.outputs)}
        models = self._fd_history[1:] if plan.uses_last and i > 0 else self._fd_history
        if "m" in named:
            models = ([named["m"]] + models)[:plan.depth]
        self._fd_history = ([named["last"]] if plan.uses_last else []) + models
        self._fd_next = i + 1
        return named

    def _predicted_x0(self, i, sample, model_output, threshold=None):
        """The x0 step i uses (thresholded when asked), one pass of the x0-only tables."""
        impl = backends.resolve(getattr(self.config, "fastddpm_backend", "auto"), sample.device)
        tab = self._fd_tables(sample)
        t = tab["steps"][i].expand(sample.shape[0])
        model_output = model_output.to(sample.dtype)
        bound = None
        if threshold is not None:
            bound = clipping.threshold_bound(impl, sample, model_output, None, 1.0, t,
                                             tab, *threshold)
        return ops.run_solver_step(impl, sample, model_output, None, (), t, tab["x0_coef"], bound, float("inf"), 1.0,
                                   None, clipping.quiet_seed(sample.device), 0)[0]
