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


def stream_seed(sample, generator):
    """The seed of a step's counter-based noise (``fused_noise=True``), drawn from ``generator``
    (one generator; None: the default of sample's device) and moved to sample's device."""
    if isinstance(generator, (list, tuple)):
        raise NotImplementedError("fused_noise=True with a list of generators: pass one generator")
    gen_device = sample.device if generator is None else generator.device
    return ops.draw_seed(gen_device, generator).to(sample.device)


class SolverSteps:
    """Mixin for a diffusers scheduler subclass stepping with a Plan."""

    _fd_plan = None

    def _plan_ready(self, plan: tables.Plan):
        """A new run: its plan, no history, tables not yet on any device."""
        self._fd_plan = plan
        self._fd_multistep = plan.depth > 0 or plan.uses_last  # whether steps read a history
        self._fd_on = {}  # (device, dtype) -> {"coef", "x0_coef", "steps"}
        self._fd_history = []
        self._fd_next = 0

    def _fd_tables(self, x):
        """The run's tables on x's device in x's compute dtype, with the backend for the device
        and, per batch size, every step's t (made once: a step's own indexing and expand cost
        more than its kernel at a pipeline's latent size)."""
        key = (x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        tab = self._fd_on.get(key)
        if tab is None:
            coef = self._fd_plan.coef.to(key[0], key[1])
            tab = self._fd_on[key] = {"coef": coef, "x0_coef": tables.x0_only(coef),
                                      "steps": torch.arange(len(self._fd_plan), device=key[0]),
                                      "impl": backends.resolve(getattr(self.config, "fastddpm_backend", "auto"),
                                                               key[0]),
                                      "quiet_seed": clipping.quiet_seed(key[0])}
        return tab

    @staticmethod
    def _fd_t(tab, i, batch):
        """Step i's t for a batch of ``batch`` samples: [batch] views of the run's step indices."""
        ts = tab.get(batch)
        if ts is None:
            ts = tab[batch] = [s.expand(batch) for s in tab["steps"]]
        return ts[i]

    def _fused_step(self, i, sample, model_output, noise=None, threshold=None, stream=None):
        """Step i of the run on ``sample`` (x_i) and ``model_output``: {output name: tensor} (the
        Plan's outputs, "prev" first), in sample's dtype (model_output must be in it too, as every
        caller makes it). ``noise`` is the z of the step (None
        where the plan draws none, or where ``stream``, (seed, sample_offset), has the kernel draw
        it from the counter-based stream); ``threshold`` (ratio, max value) thresholds x0 as
        diffusers' ``_threshold_sample`` (two passes: the quantile of the unclamped x0 first)."""
        plan = self._fd_plan
        if i == 0:
            self._fd_history = []
        elif i != self._fd_next:
            raise RuntimeError(f"{type(self).__name__}: step index {i} follows step {self._fd_next - 1}; "
                               "call set_timesteps to start a new run")
        history = tuple(self._fd_history[:plan.n_history(i)]) if self._fd_multistep else ()
        tab = self._fd_tables(sample)
        impl, t = tab["impl"], self._fd_t(tab, i, sample.shape[0])
        bound, clip = None, float("inf")
        if threshold is not None:
            ratio, max_value = threshold
            bound = clipping.threshold_bound(impl, sample, model_output, None, 1.0, t,
                                             tab, ratio, max_value)
        seed, offset = (None, 0) if noise is not None else stream or (tab["quiet_seed"], 0)
        if noise is None and stream is None and plan.noisy[i]:
            raise ValueError(f"step {i} adds noise: pass its noise")
        y = ops.run_solver_step(impl, sample, model_output, None, history, t, tab["coef"], bound, clip, 1.0, noise,
                                seed, offset)
        named = {name: y[k] for k, name in enumerate(plan.outputs)}
        if self._fd_multistep:
            models = self._fd_history[1:] if plan.uses_last and i > 0 else self._fd_history
            if "m" in named:
                models = ([named["m"]] + models)[:plan.depth]
            self._fd_history = ([named["last"]] if plan.uses_last else []) + models
        self._fd_next = i + 1
        return named

    def _predicted_x0(self, i, sample, model_output, threshold=None):
        """The x0 step i uses (thresholded when asked), one pass of the x0-only tables."""
        tab = self._fd_tables(sample)
        impl, t = tab["impl"], self._fd_t(tab, i, sample.shape[0])
        model_output = model_output.to(sample.dtype)
        bound = None
        if threshold is not None:
            bound = clipping.threshold_bound(impl, sample, model_output, None, 1.0, t,
                                             tab, *threshold)
        return ops.run_solver_step(impl, sample, model_output, None, (), t, tab["x0_coef"], bound, float("inf"), 1.0,
                                   None, tab["quiet_seed"], 0)[0]
