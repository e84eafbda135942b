"""Samplers: DDPM and DDIM with respacing, eps/x0/v prediction, clipping, thresholding, guidance.

A sampler is a set of per-step tables (:mod:`fastddpm.samplers.tables`), computed once in
float64 and kept in float32 (float64 for float64 data) on the data's device. An unclipped step
is the fused ``fastddpm.ops.p_sample_step`` with those tables, indexed by the step number i; a
clipped, thresholded or guided step is the fused ``fastddpm.ops.clipped_step``
(:mod:`fastddpm.samplers.clipping`).

    sampler = make_sampler(diffusion, "ddim", steps=50)
    x = sample(diffusion, (16, 3, 32, 32), sampler=sampler, generator=g)
"""

import torch

from .. import _layout, backends, ops
from .._checks import (check_channels, check_float, check_like, check_offset, check_real, default_offset,
                       seed_tensor)
from ..ops import clipped_coef
from . import clipping, tables

__all__ = ["Sampler", "make_sampler", "sample", "stream_noise", "step_seed"]

_MASK63 = 2**63 - 1
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _step_keys(n: int) -> torch.Tensor:
    """63-bit keys, one per step, that step_seed XORs into the run's seed (no int64 overflow)."""
    return torch.tensor([_splitmix64(i + 1) & _MASK63 for i in range(n)], dtype=torch.int64)


def step_seed(seed: torch.Tensor, keys: torch.Tensor, i: int) -> torch.Tensor:
    """The seed of step i's noise: ``seed ^ keys[i]``, on the device, with no host sync.

    Every sample of the run shares it; the noise of a sample then depends only on
    (seed, step, global sample index), so any batch split gives the same images.
    """
    return torch.bitwise_xor(seed.reshape(1), keys[i:i + 1])


def stream_noise(seed, sample_offset: int, shape, dtype, device, backend="auto") -> torch.Tensor:
    """The counter-based normals of (seed, sample_offset) in ``dtype``: x_T and the clipped steps' z.

    Drawn by the fused ``fastddpm.ops.normal`` (the values of ``fastddpm.philox.normal``).
    """
    return ops.normal(tuple(shape), seed=seed, sample_offset=sample_offset, dtype=dtype, device=device,
                      backend=backend)


def _check_options(kind, eta, variance, clip, threshold, threshold_max, solver):
    tables._choice("kind", kind, tables.KINDS + tables.SOLVERS)
    if solver and kind in tables.KINDS:
        raise TypeError(f"kind={kind!r} takes no option {sorted(solver)[0]!r}")
    eta = check_real("eta", eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if kind == "ddpm" and eta != 0:
        raise ValueError(f"eta applies to kind='ddim' only, got eta={eta} with kind='ddpm'")
    if variance is None:
        variance = "beta"
    elif kind != "ddpm":
        raise ValueError(f"variance applies to kind='ddpm' only (DDIM's is set by eta), got {variance!r}")
    tables._choice("variance", variance, tables.VARIANCES)
    if clip is not None and threshold is not None:
        raise ValueError("pass clip or threshold, not both")
    if clip is not None:
        clip = check_real("clip", clip)
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
    if threshold is not None:
        threshold = check_real("threshold", threshold)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold (the quantile ratio) must lie in (0, 1], got {threshold}")
    threshold_max = check_real("threshold_max", threshold_max)
    if threshold_max < 1:
        raise ValueError(f"threshold_max must be >= 1, got {threshold_max}")
    return eta, variance, clip, threshold, threshold_max


def _check_out(name, out, x_t):
    if out is None:
        raise TypeError(f"{name} must be a tensor, got None")
    return check_like(name, out, "x_t", x_t)


class Sampler:
    """One configured sampler over a diffusion's schedule; build it with :func:`make_sampler`.

    ``timesteps`` (int64, descending, CPU) are what the model receives at steps i = 0..len-1.
    Every step is the fused general step ``fastddpm.ops.solver_step`` on the sampler's tables
    (``plan.coef``, :mod:`fastddpm.samplers.tables`). A multistep sampler ("dpm++", "unipc")
    keeps the history of its run (earlier x0 predictions, UniPC's corrected sample): step 0
    starts a new run, and step i > 0 must follow step i - 1.
    """

    def __init__(self, alpha_bar, *, kind="ddpm", steps=None, eta=0.0, variance=None, clip=None,
                 threshold=None, threshold_max=1.0, spacing=None, steps_offset=0,
                 final_alpha_one=True, prediction="eps", backend="auto", learned_variance=None, **solver):
        eta, variance, clip, threshold, threshold_max = _check_options(kind, eta, variance, clip, threshold,
                                                                       threshold_max, solver)
        n_train = alpha_bar.numel()
        steps = n_train if steps is None and kind in tables.KINDS else steps
        if steps is None:
            raise TypeError(f"kind={kind!r} needs steps (the number of sampling steps)")
        self.kind, self.eta, self.variance, self.prediction = kind, eta, variance, prediction
        self.steps_offset, self.final_alpha_one = steps_offset, bool(final_alpha_one)
        self.clip, self.threshold, self.threshold_max = clip, threshold, threshold_max
        self.backend = backend
        self.n_train = n_train
        # A learned variance (the model outputs 2C channels): DDPM samples with it, the others
        # read the mean channels only.
        self.learned_variance = learned_variance
        self.options = dict(solver)
        if kind in tables.KINDS:
            self.spacing = "leading" if spacing is None else spacing
            self.timesteps = tables.timesteps(n_train, steps, self.spacing, steps_offset)
            self.tables64 = tables.step_tables(alpha_bar, self.timesteps, kind, eta=eta, variance=variance,
                                               prediction=prediction, final_alpha_one=self.final_alpha_one)
            t64 = self.tables64
            coef = clipped_coef(t64["a"], t64["b"], t64["p"], t64["q"], t64["r"], t64["s"])
            if learned_variance is not None and kind == "ddpm":
                coef = tables.learned_variance_coef(coef, alpha_bar, self.timesteps, learned_variance,
                                                    final_alpha_one=self.final_alpha_one)
            self.plan = tables.Plan(coef, ("prev",), self.timesteps, None)
        else:
            if not final_alpha_one:
                raise ValueError(f"final_alpha_one applies to kind='ddpm' and 'ddim' only, got kind={kind!r}")
            self.spacing = "linspace" if spacing is None else spacing
            self.tables64 = {}
            self.plan = tables.solver_plan(kind, alpha_bar, steps, prediction=prediction, spacing=self.spacing,
                                           steps_offset=steps_offset, **solver)
            self.timesteps = self.plan.timesteps
        self.noisy = self.plan.noisy  # host copy: which steps draw noise
        self._keys = _step_keys(len(self.timesteps))
        self._on = {}  # (device, dtype) -> the tables there; filled once per device and dtype
        self._history, self._next = [], 0  # a multistep run's history operands, and its next step

    def __len__(self):
        return self.timesteps.numel()

    def __repr__(self):
        if self.kind == "ddim":
            extra = f", eta={self.eta}"
        elif self.kind == "ddpm":
            extra = f", variance={self.variance!r}"
        else:
            extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        if self.clip is not None:
            extra += f", clip={self.clip}"
        if self.threshold is not None:
            extra += f", threshold={self.threshold}, threshold_max={self.threshold_max}"
        return (f"Sampler({self.kind!r}, steps={len(self)}/{self.n_train}, spacing={self.spacing!r}, "
                f"prediction={self.prediction!r}{extra})")

    @property
    def fused(self) -> bool:
        """Whether a step is one pass of the fused step (no thresholding's quantile between two
        passes, no clamp of x0)."""
        return self.clip is None and self.threshold is None

    @property
    def multistep(self) -> bool:
        """Whether a step reads earlier steps' results (the run's history)."""
        return self.plan.depth > 0 or self.plan.uses_last

    def tables_for(self, x: torch.Tensor) -> dict:
        """The tables in x's compute dtype (float32; float64 for float64) on x's device."""
        key = (x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        if key not in self._on:
            tab = {k: v.to(key[0], key[1]) for k, v in self.tables64.items()}
            if "k2" in tab:
                tab["minus_k2"] = (-self.tables64["k2"]).to(key[0], key[1])
            tab["coef"] = self.plan.coef.to(key[0], key[1])
            tab["x0_coef"] = tables.x0_only(tab["coef"])
            tab["timesteps"] = self.timesteps.to(key[0])
            tab["keys"] = self._keys.to(key[0])
            tab["steps"] = torch.arange(len(self), device=key[0])  # i as the step's t
            self._on[key] = tab
        return self._on[key]

    def _check_i(self, i):
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"i (the step index) must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self):
            raise ValueError(f"i (the step index) must lie in [0, {len(self)}), got {i}")
        return i

    def _split(self, name, out, x_t):
        """A learned-variance output's (mean channels, variance channels), checked: 2C channels."""
        check_channels(name, out, "x_t", x_t, 2, "a learned variance: the mean channels, then as many variance "
                       "channels")
        c = x_t.shape[1]
        return check_like(name, out[:, :c], "x_t", x_t), check_like(name, out[:, c:], "x_t", x_t)

    def _check_output(self, model_output, x_t, guidance):
        """The model output(s) as the step reads them: out, or (uncond, cond) with guidance; with a
        learned variance, followed by the variance channels (of cond when guided; None unless DDPM)."""
        if self.learned_variance is not None:
            use_var = self.kind == "ddpm"
            if guidance is None:
                mean, var = self._split("model_output", model_output, x_t)
                return mean, (var if use_var else None)
            if not isinstance(model_output, (tuple, list)) or len(model_output) != 2:
                raise TypeError(f"guidance needs model_output to be the pair (uncond, cond), got "
                                f"{type(model_output).__name__}")
            check_real("guidance", guidance)
            (u, _), (c, var) = (self._split(f"model_output[{k}]", o, x_t) for k, o in enumerate(model_output))
            return (u, c), (var if use_var else None)
        if guidance is None:
            if isinstance(model_output, (tuple, list)):
                raise TypeError("model_output is a pair (uncond, cond); pass guidance=w to combine it")
            return _check_out("model_output", model_output, x_t), None
        check_real("guidance", guidance)
        if not isinstance(model_output, (tuple, list)) or len(model_output) != 2:
            got = type(model_output).__name__
            if isinstance(model_output, (tuple, list)):
                got += f" of length {len(model_output)}"
            raise TypeError(f"guidance needs model_output to be the pair (uncond, cond), got {got}")
        return tuple(_check_out(f"model_output[{k}]", o, x_t) for k, o in enumerate(model_output)), None

    def _clipping_args(self, x_t, out, guidance, i):
        """(backend, out, out_cond, guidance, t, tables, bound, clip) of the fused step i."""
        impl = backends.resolve(self.backend, x_t.device)
        tab = self.tables_for(x_t)
        t = tab["steps"][i].expand(x_t.shape[0])
        out, out_cond, guidance = (out, None, 1.0) if guidance is None else (out[0], out[1], float(guidance))
        bound, clip = clipping.bound_or_clip(impl, x_t, out, out_cond, guidance, t, tab, self.clip, self.threshold,
                                             self.threshold_max)
        return impl, out, out_cond, guidance, t, tab, bound, clip

    def predict_x0(self, x_t, model_output, i, *, guidance=None):
        """The x0 that step i uses (clipped or thresholded as configured), in x_t's dtype."""
        check_float("x_t", x_t)
        i = self._check_i(i)
        out, _ = self._check_output(model_output, x_t, guidance)
        impl, out, out_cond, guidance, t, tab, bound, clip = self._clipping_args(x_t, out, guidance, i)
        return _layout.like(clipping.predicted_x0(impl, x_t, out, out_cond, guidance, t, tab, bound, clip), x_t)

    def _history_for(self, i):
        """The history operands of step i (tables.Plan), checked to continue the run."""
        if not self.multistep:
            return ()
        if i == 0:
            self._history = []
        elif i != self._next:
            after = f"after step {self._next - 1}" if self._next else "before any step 0"
            raise RuntimeError(f"a multistep sampler's steps run in order: step {i} was asked for {after} "
                               "(step 0 starts a new run)")
        return tuple(self._history[:self.plan.n_history(i)])

    def _remember(self, i, outputs):
        """Push step i's outputs onto the run's history (last corrected sample, then model
        outputs newest first)."""
        if not self.multistep:
            return
        named = dict(zip(self.plan.outputs, outputs))
        models = self._history[1:] if self.plan.uses_last and i > 0 else self._history
        models = ([named["m"]] + models)[:self.plan.depth] if "m" in named else models
        self._history = ([named["last"]] if self.plan.uses_last else []) + models
        self._next = i + 1

    def step(self, x_t, model_output, i, *, noise=None, generator=None, seed=None, sample_offset=None,
             guidance=None):
        """x_prev of step i from x_t (at timestep ``timesteps[i]``) and the model's output there.

        ``model_output`` is the pair (uncond, cond) when ``guidance`` w is given:
        out = u + w (c - u). Noise is ``noise``, else the counter-based normals of ``seed``
        (drawn from ``generator``'s device generator when None) and ``sample_offset``, the
        global index of the batch's first sample (None: rank * batch under torch.distributed).
        A step that adds no noise draws no seed.
        """
        check_float("x_t", x_t)
        i = self._check_i(i)
        out, var = self._check_output(model_output, x_t, guidance)
        noise = check_like("noise", noise, "x_t", x_t, optional=True)
        offset = check_offset(default_offset(x_t.shape[0]) if sample_offset is None else sample_offset)
        if noise is None:
            if not self.noisy[i]:  # the kernel draws no noise, whatever the seed
                seed = clipping.quiet_seed(x_t.device)
            else:
                seed = seed_tensor(seed, x_t.device, generator)
        else:
            seed = None
        history = self._history_for(i)
        impl, out, out_cond, guidance, t, tab, bound, clip = self._clipping_args(x_t, out, guidance, i)
        y = ops.run_solver_step(impl, x_t, out, out_cond, history, t, tab["coef"], bound, clip, guidance, noise,
                                seed, offset, var)
        self._remember(i, y)
        return _layout.like(y[0], x_t)


def _check_diffusion(diffusion):
    # By a marker attribute, not isinstance: fastddpm.diffusion imports this package, not the
    # other way round (the library's import graph has no circle).
    if not getattr(type(diffusion), "_fastddpm_diffusion", False):
        raise TypeError(f"diffusion must be a fastddpm.DenoiseDiffusion, got {type(diffusion).__name__}")
    return diffusion


def make_sampler(diffusion, kind="ddpm", steps=None, *, eta=0.0, variance=None, clip=None, threshold=None,
                 threshold_max=1.0, spacing=None, steps_offset=0, final_alpha_one=True,
                 prediction="eps", **solver) -> Sampler:
    """A sampler over ``diffusion``'s schedule.

    kind: "ddpm" (variance "beta", the default and labml's, or "beta_tilde"), "ddim" (``eta``
    >= 0; 0 is deterministic), or a multistep solver: "dpm++" (DPM-Solver++), "unipc",
    "euler" or "euler_a" (Euler-ancestral), whose options (``**solver``) are listed in
    :func:`fastddpm.samplers.tables.solver_plan`. steps: sampling steps (default all n_steps for
    DDPM and DDIM; required for the solvers), placed by ``spacing`` "leading" (with
    ``steps_offset``), "trailing" or "linspace" as diffusers does (default "leading" for DDPM
    and DDIM, "linspace" for the solvers, as diffusers' defaults); a DDPM or DDIM step goes to
    the next listed timestep, the last to alpha_bar = 1 (``final_alpha_one``) or
    alpha_bar[0]. prediction: what the model outputs, "eps", "x0" or "v". clip: clamp the
    predicted x0 to [-clip, clip]; threshold: dynamic thresholding at that quantile ratio, with
    s at most ``threshold_max``. No noise is added at the last step.
    """
    diffusion = _check_diffusion(diffusion)
    return Sampler(diffusion._tables64["alpha_bar"], kind=kind, steps=steps, eta=eta, variance=variance,
                   clip=clip, threshold=threshold, threshold_max=threshold_max, spacing=spacing,
                   steps_offset=steps_offset, final_alpha_one=final_alpha_one, prediction=prediction,
                   backend=diffusion.backend, learned_variance=getattr(diffusion, "learned_variance", None), **solver)


def _progress(iterable, enabled, total):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="sampling")


def sample(diffusion, shape_or_x_T, *, sampler=None, steps=None, generator=None, sample_offset=None,
           progress=False, model=None, guidance=None, dtype=None, device=None, **sampler_options):
    """Run the whole reverse process under no_grad and return x_0.

    ``shape_or_x_T``: a shape (x_T drawn from the counter-based stream, in ``dtype``, default
    float32, on ``device``, default the diffusion's) or x_T itself. ``sampler`` a
    :class:`Sampler`, else one made by ``make_sampler(diffusion, steps=steps, **sampler_options)``.
    ``model(x_t, t)`` defaults to ``diffusion.eps_model``; with ``guidance`` w it returns the
    pair (uncond, cond). One seed is drawn from ``generator`` (the device's default generator
    when None); x_T and each step's noise come from it and the global sample index
    (``sample_offset`` of the first sample), so the same seed gives the same images for any
    batch split. ``progress`` shows a tqdm bar when tqdm is installed.
    """
    diffusion = _check_diffusion(diffusion)
    if sampler is None:
        sampler = make_sampler(diffusion, steps=steps, **sampler_options)
    elif not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a fastddpm.samplers.Sampler, got {type(sampler).__name__}")
    elif steps is not None or sampler_options:
        raise TypeError("pass either sampler= or the options to make one (steps, kind, ...), not both")
    model = diffusion.eps_model if model is None else model
    x_T = shape_or_x_T if isinstance(shape_or_x_T, torch.Tensor) else None
    if x_T is not None:
        if dtype is not None or device is not None:
            raise TypeError("dtype and device come from x_T when it is given; pass a shape to set them")
        check_float("x_T", x_T)
        shape, dtype, device = tuple(x_T.shape), x_T.dtype, x_T.device
    else:
        shape = _check_shape(shape_or_x_T)
        device = diffusion.alpha_bar.device if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in _FLOATS:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    batch = shape[0]
    offset = check_offset(default_offset(batch) if sample_offset is None else sample_offset)
    seed = ops.draw_seed(device, generator)
    with torch.no_grad():
        x = stream_noise(seed, offset, shape, dtype, device, sampler.backend) if x_T is None else x_T
        tab = sampler.tables_for(x)
        for i in _progress(range(len(sampler)), progress, len(sampler)):
            out = model(x, tab["timesteps"][i].expand(batch))
            x = sampler.step(x, out, i, seed=step_seed(seed, tab["keys"], i), sample_offset=offset,
                             guidance=guidance)
    return x if x_T is None else _layout.like(x, x_T)


def _check_shape(shape):
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape_or_x_T must be a shape or a tensor, got {type(shape).__name__}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of non-negative ints, got {shape}")
    return shape
