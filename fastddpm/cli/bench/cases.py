"""What fastddpm benchmarks: sizes, cases, providers and bytes moved, defined once.

``benchmarks/`` (pytest-benchmark, goals.py, gpu_report.py) and ``fastddpm bench`` all
parametrize over this module, so
every figure in benchmarks/RESULTS.md means the same thing wherever it was measured.

- A *size* is a batch shape (batch first).
- A *case* is one unit of work at a size: an op, the diffusion part of a training step, a DDIM
  sampler step (with and without clipping) or a whole DDIM sampling loop. Its
  ``bytes_moved`` is the least traffic any implementation needs (each input read once, each
  output written once), so ``bytes / time`` is an honest GB/s to set beside the ``copy`` case,
  a ``copy_`` into a preallocated tensor measured in the same run.
- A *provider* makes, for a case and its inputs, a zero-argument callable that runs the case
  once: each fastddpm kernel backend (through ``fastddpm.ops``/``DenoiseDiffusion``), the eager
  PyTorch code users run today (labml's, and diffusers' DDIM step math written out, in
  :mod:`fastddpm.cli.bench.baselines`), ``torch.compile`` of labml's, and diffusers' schedulers
  (``DDPMScheduler``, ``DDIMScheduler``) when diffusers is installed.

Add a provider by adding a :class:`Provider` to :data:`PROVIDERS`.
"""
from dataclasses import dataclass
from inspect import signature
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ... import backends, ops, schedule
from ...diffusion import DenoiseDiffusion
from ..scale_model import ScaleModel
from .baselines import AdmStyleDiffusion, DiffusersStyleDDIM, LabmlDiffusion

N_STEPS = 1000
DDIM_STEPS = 50      # the sampler cases: DDIM (eta = 0, eps prediction) over 50 "leading" steps
DDIM_STEP_I = 25     # the step the single-step cases time (t = 480: noise neither tiny nor pure)
CLIP = 1.0           # ddim_step_clip clamps the predicted x0 to [-CLIP, CLIP]
THRESHOLD = 0.995    # ddim_step_threshold: dynamic thresholding at this quantile ratio (diffusers' default)
THRESHOLD_MAX = 1.5  # ... with s at most this (diffusers' default 1.0 would make it a clip to 1)
GUIDANCE = 7.5       # ddim_step_cfg: classifier-free guidance weight (Stable Diffusion's default)
SOLVER_STEPS = 20    # the multistep solvers' cases: diffusers' default configs set to 20 steps
SOLVER_STEP_I = 10   # the step the single-step solver cases time (history full, not the last)

SIZES = {
    "cifar": (128, 3, 32, 32),     # a CIFAR-10 batch
    "latent": (32, 4, 64, 64),     # a latent-diffusion batch
    "large": (256, 3, 64, 64),
    "tiny": (2, 1, 4, 4),          # host work only: launch, dispatch, checks
    "host": (1, 4, 8, 8),          # host work of a scheduler's step (one latent-like sample)
    "dit": (64, 4, 32, 32),        # DiT's latent batch (adm_hybrid)
}


@dataclass(frozen=True)
class Case:
    name: str
    group: str          # the op it times (pytest-benchmark groups by op and size)
    description: str
    tensors_moved: int  # least number of size-N tensors read or written (bytes = this * N * itemsize)


CASES = {c.name: c for c in (
    Case("copy", "copy", "dst.copy_(src) into a preallocated tensor: the bandwidth yardstick", 2),
    Case("q_sample_noise", "q_sample", "q_sample(x0, t, noise) with the noise given", 3),
    Case("q_sample_draw", "q_sample", "q_sample(x0, t) drawing its noise", 2),
    Case("p_sample_draw", "p_sample", "the p_sample update after the model call, drawing its noise", 3),
    Case("mse_fwd_bwd", "mse", "MSE(pred, target) forward and backward (grad of pred)", 5),
    # q_sample reads x0, writes x_t; the MSE reads eps_theta forward, reads it and writes its
    # grad backward (the one-parameter model's own traffic is not counted).
    Case("train_step", "train_step", "the diffusion part of a training step: loss(x0).backward(), "
         "one-parameter eps model", 5),
    # A sampler step reads x_t and the model output and writes x_prev.
    Case("ddim_step", "sampler_step", f"one DDIM step ({DDIM_STEPS} steps, eps prediction) after the model call", 3),
    Case("ddim_step_clip", "sampler_step", f"the same DDIM step with the predicted x0 clipped to +-{CLIP}", 3),
    Case("ddim_step_threshold", "sampler_step", f"the same DDIM step with dynamic thresholding (ratio {THRESHOLD}, "
         f"s <= {THRESHOLD_MAX})", 3),
    # reads x_t and both model outputs, writes x_prev
    Case("ddim_step_cfg", "sampler_step", f"the same DDIM step from two model outputs with guidance {GUIDANCE}", 4),
    # x_T written once, then per step the step's own 3 tensors (the trivial model's traffic,
    # eps = 0.1 x_t, is not counted, as train_step does not count its model's).
    Case("ddim_loop", "sampler_loop", f"a whole {DDIM_STEPS}-step DDIM sampling loop from x_T drawn in it, "
         "trivial model eps = 0.1 x_t", 1 + 3 * DDIM_STEPS),
    # The multistep solvers' step(), diffusers' and the drop-in's, at step SOLVER_STEP_I of
    # SOLVER_STEPS: each reads x_i and the model output and writes x_{i+1} (the history they
    # also read, and the x0 they keep, are counted as one more tensor each where they exist).
    Case("dpm_step", "solver_step", f"one DPM-Solver++ 2M step ({SOLVER_STEPS} steps) after the model call", 5),
    Case("unipc_step", "solver_step", f"one UniPC bh2 order-2 step with its corrector ({SOLVER_STEPS} steps)", 6),
    Case("euler_step", "solver_step", f"one Euler step ({SOLVER_STEPS} steps)", 3),
    Case("euler_a_step", "solver_step", f"one Euler-ancestral step ({SOLVER_STEPS} steps), noise drawn", 4),
    # q_sample reads x0 and writes x_t; the loss reads x0 and the 2C-channel output forward, and
    # x0 and the output backward, writing its 2C-channel gradient (the model's own traffic aside).
    Case("adm_hybrid", "adm", "ADM's hybrid training_losses (learned range, eps prediction, MSE + vb) forward "
         "and backward, one-parameter model with 2C output channels", 10),
    Case("dpm_loop", "sampler_loop", f"a whole {SOLVER_STEPS}-step DPM-Solver++ 2M loop, trivial model "
         "eps = 0.1 x_t", 1 + 4 * SOLVER_STEPS),
)}


def bytes_moved(case: str, shape, dtype=torch.float32) -> int:
    n = 1
    for s in shape:
        n *= s
    return CASES[case].tensors_moved * n * torch.empty((), dtype=dtype).element_size()


class Inputs:
    """The tensors of every case at one size, made once per benchmark (fixed seed)."""

    def __init__(self, shape, device="cpu", dtype=torch.float32, seed=0):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn():
            return torch.randn(self.shape, generator=g).to(self.device, dtype)

        self.x0 = randn()
        self.noise = randn()
        self.eps_theta = randn()
        self.eps_cond = randn()  # the conditional output of the guided step
        self.dst = torch.empty_like(self.x0)
        self.t = torch.randint(N_STEPS, (self.shape[0],), generator=g).to(self.device)
        self.pred = randn().requires_grad_()
        self.model = ScaleModel().to(self.device)
        self.model2 = TwoChannelScaleModel().to(self.device)  # a learned-variance model's 2C outputs
        self.x0_unit = (self.x0 / 4).clamp(-1, 1)  # data in [-1, 1], as the decoder's bins assume
        self.tables = {k: v.to(self.device, torch.float64 if dtype == torch.float64 else torch.float32)
                       for k, v in schedule.coefficient_tables(schedule.linear(N_STEPS)).items()}
        self.ddim_t = int(DiffusersStyleDDIM(N_STEPS, DDIM_STEPS).timesteps[DDIM_STEP_I])


def _backward(loss, *leaves):
    for leaf in leaves:  # fresh grads, so no case pays for accumulating into old ones
        leaf.grad = None
    loss.backward()


OP_CASES = tuple(c for c in CASES if c != "copy")
STEP_CASES = ("ddim_step", "ddim_step_clip", "ddim_step_threshold", "ddim_step_cfg")
SAMPLER_CASES = STEP_CASES + ("ddim_loop",)
SOLVER_STEP_CASES = ("dpm_step", "unipc_step", "euler_step", "euler_a_step")
SOLVER_CASES = SOLVER_STEP_CASES + ("dpm_loop",)  # diffusers' schedulers and the drop-ins only
OP_CASES = tuple(c for c in OP_CASES if c not in SOLVER_CASES)
LABML_CASES = tuple(c for c in OP_CASES if c not in SAMPLER_CASES)  # the cases labml's code has


class TwoChannelScaleModel(torch.nn.Module):
    """ScaleModel with a learned variance's output: w * (x, x) on dim 1 (2C channels)."""

    def __init__(self, w: float = 0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, x, t):
        return self.w * torch.cat([x, x], dim=1)


def _adm_fused(backend, inp):
    """ADM's hybrid loss on fastddpm's ops as fastddpm.adm runs it: the fused q_sample drawing the
    noise, the model, the fused vlb_loss regenerating it, and the backward."""
    impl = backends.resolve(backend, inp.device)
    cdt = torch.float64 if inp.dtype == torch.float64 else torch.float32
    vt = schedule.vlb_tables(schedule.linear(N_STEPS))
    tab = torch.stack([vt[k] for k in schedule.VLB_COLUMNS], 1).to(inp.device, cdt)
    sqrt_ab, sqrt_1m_ab = tab[:, 0].contiguous(), tab[:, 1].contiguous()
    x0, t = inp.x0_unit, inp.t

    def step():
        seed = ops.draw_seed(inp.device)
        x_t = ops.run_q_sample(impl, x0, t, sqrt_ab, sqrt_1m_ab, None, seed, 0)
        terms = ops.run_vlb_loss(impl, x0, inp.model2(x_t, t), t, tab, None, seed, 0, 0, 1, True)
        _backward(terms.sum(1).mean(), inp.model2.w)
    return step


def trivial_model(x, t):
    """The sampler loop's eps-model: next to no work, so the loop times the sampler alone."""
    return 0.1 * x


@dataclass
class Provider:
    name: str
    available: Callable[[torch.device], tuple]  # device -> (ok, reason)
    make: Callable[[str, Inputs], Optional[Callable[[], object]]]  # None: case not provided
    cases: tuple = OP_CASES  # the cases it provides


# ---- fastddpm: one provider per kernel backend ------------------------------------------------

def _fastddpm_make(backend):
    def make(case, inp):
        diff = DenoiseDiffusion(inp.model, N_STEPS, inp.device, backend=backend)
        tab = inp.tables
        if case == "q_sample_noise":
            return lambda: diff.q_sample(inp.x0, inp.t, inp.noise)
        if case == "q_sample_draw":
            return lambda: diff.q_sample(inp.x0, inp.t)
        if case == "p_sample_draw":
            return lambda: ops.p_sample_step(inp.x0, inp.eps_theta, inp.t, tab["c1"], tab["c2"], tab["sigma"],
                                             backend=backend)
        if case == "mse_fwd_bwd":
            return lambda: _backward(ops.mse_loss(inp.pred, inp.noise, backend=backend), inp.pred)
        if case == "train_step":
            return lambda: _backward(diff.loss(inp.x0), inp.model.w)
        if case in STEP_CASES:
            sampler = diff.sampler("ddim", DDIM_STEPS, **_sampler_options(case))
            if case == "ddim_step_cfg":
                pair = (inp.eps_theta, inp.eps_cond)
                return lambda: sampler.step(inp.x0, pair, DDIM_STEP_I, guidance=GUIDANCE)
            return lambda: sampler.step(inp.x0, inp.eps_theta, DDIM_STEP_I)
        if case == "ddim_loop":
            sampler = diff.sampler("ddim", DDIM_STEPS)
            return lambda: diff.sample(inp.shape, sampler=sampler, model=trivial_model)
        if case == "adm_hybrid":
            return _adm_fused(backend, inp)
        return None
    return make


def _sampler_options(case):
    if case == "ddim_step_clip":
        return dict(clip=CLIP)
    if case == "ddim_step_threshold":
        return dict(threshold=THRESHOLD, threshold_max=THRESHOLD_MAX)
    return {}


def guided(u, c):
    """Classifier-free guidance as pipelines write it before the scheduler's step."""
    return u + GUIDANCE * (c - u)


def _fastddpm_available(backend):
    def available(device):
        ok, reason = backends.status(backend)
        if not ok:
            return False, reason
        mod = backends.get(backend)
        if mod.device_types is not None and device.type not in mod.device_types:
            return False, f"runs on {'/'.join(mod.device_types)} tensors, not {device.type}"
        return True, ""
    return available


# ---- eager labml code, and torch.compile of it ------------------------------------------------

def _labml_fns(inp):
    labml = LabmlDiffusion(inp.model, N_STEPS, inp.device)
    adm = AdmStyleDiffusion(N_STEPS, inp.device)
    ddim, ddim_clip = (DiffusersStyleDDIM(N_STEPS, DDIM_STEPS, inp.device, clip) for clip in (None, CLIP))
    return {
        "ddim_step": lambda xt, eps_theta: ddim.step(eps_theta, inp.ddim_t, xt),
        "ddim_step_clip": lambda xt, eps_theta: ddim_clip.step(eps_theta, inp.ddim_t, xt),
        "ddim_step_cfg": lambda xt, eps_theta: ddim.step(guided(eps_theta, inp.eps_cond), inp.ddim_t, xt),
        "q_sample_noise": lambda x0, t, noise: labml.q_sample(x0, t, eps=noise),
        "q_sample_draw": lambda x0, t: labml.q_sample(x0, t),
        "p_sample_draw": lambda xt, t, eps_theta: labml.p_sample_step(xt, t, eps_theta),
        "mse_fwd_bwd": lambda pred, target: F.mse_loss(target, pred),
        "train_step": lambda x0: labml.loss(x0),
        "adm_hybrid": lambda x0, t: adm.training_losses(inp.model2, x0, t)["loss"].mean(),
    }


def _labml_make(compile_):
    def make(case, inp):
        fns = _labml_fns(inp)
        if case not in fns or (compile_ and case not in LABML_CASES):  # compile: labml's code only
            return None
        fn = torch.compile(fns[case], dynamic=False) if compile_ else fns[case]
        if case == "q_sample_noise":
            return lambda: fn(inp.x0, inp.t, inp.noise)
        if case == "q_sample_draw":
            return lambda: fn(inp.x0, inp.t)
        if case == "p_sample_draw":
            return lambda: fn(inp.x0, inp.t, inp.eps_theta)
        if case in STEP_CASES:
            return lambda: fn(inp.x0, inp.eps_theta)
        if case == "mse_fwd_bwd":
            return lambda: _backward(fn(inp.pred, inp.noise), inp.pred)
        if case == "adm_hybrid":
            return lambda: _backward(fn(inp.x0_unit, inp.t), inp.model2.w)
        return lambda: _backward(fn(inp.x0), inp.model.w)  # train_step
    return make


# ---- diffusers' DDPMScheduler (optional: pip install diffusers) ---------------------------------

def _diffusers_available(device):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False, "diffusers is not installed (pip install diffusers)"
    return True, ""


def _schedulers(adapter):
    """(DDPMScheduler, DDIMScheduler): diffusers' own, or fastddpm's drop-in subclasses of them."""
    if adapter:
        from ...diffusers import DDIMScheduler, DDPMScheduler
    else:
        from diffusers import DDIMScheduler, DDPMScheduler
    return DDPMScheduler, DDIMScheduler


def diffusers_ddim(clip=None, threshold=False, adapter=False):
    """diffusers' DDIMScheduler (``adapter``: fastddpm.diffusers') configured as fastddpm's DDIM
    cases: the linear betas, "leading" spacing, final alpha_bar = 1, eps prediction, set to
    DDIM_STEPS steps; ``clip`` or ``threshold`` (THRESHOLD, THRESHOLD_MAX) as the cases say."""
    DDIMScheduler = _schedulers(adapter)[1]

    sched = DDIMScheduler(num_train_timesteps=N_STEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=clip is not None, clip_sample_range=clip or 1.0, set_alpha_to_one=True,
                          steps_offset=0, timestep_spacing="leading", prediction_type="epsilon",
                          thresholding=threshold, dynamic_thresholding_ratio=THRESHOLD,
                          sample_max_value=THRESHOLD_MAX if threshold else 1.0)
    sched.set_timesteps(DDIM_STEPS)
    return sched


def _diffusers_loop(sched, shape, device):
    """The loop of diffusers' DDIM pipelines: x_T ~ randn, then model call and step per timestep."""
    with torch.no_grad():
        x = torch.randn(shape, device=device)
        for t in sched.timesteps:
            x = sched.step(trivial_model(x, t), t, x).prev_sample
    return x


def _diffusers_make(case, inp, adapter=False):
    """add_noise and step as diffusers users call them, configured to the seed's math:
    linear betas, sigma^2 = beta ("fixed_large"), no clipping of the predicted x0; DDIM as
    :func:`diffusers_ddim`. ``adapter``: the same calls on fastddpm.diffusers' schedulers."""
    DDPMScheduler = _schedulers(adapter)[0]

    if case in STEP_CASES:
        ddim = diffusers_ddim(CLIP if case == "ddim_step_clip" else None, case == "ddim_step_threshold", adapter)
        t = int(ddim.timesteps[DDIM_STEP_I])
        if case == "ddim_step_cfg":
            return lambda: ddim.step(guided(inp.eps_theta, inp.eps_cond), t, inp.x0).prev_sample
        return lambda: ddim.step(inp.eps_theta, t, inp.x0).prev_sample
    if case == "ddim_loop":
        ddim = diffusers_ddim(adapter=adapter)
        return lambda: _diffusers_loop(ddim, inp.shape, inp.device)

    sched = DDPMScheduler(num_train_timesteps=N_STEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type="fixed_large", clip_sample=False)
    if case == "q_sample_noise":
        return lambda: sched.add_noise(inp.x0, inp.noise, inp.t)
    if case == "q_sample_draw":
        return lambda: sched.add_noise(inp.x0, torch.randn_like(inp.x0), inp.t)
    if case == "p_sample_draw":
        t = N_STEPS // 2  # step() takes one t for the whole batch (t > 0: it draws noise)
        return lambda: sched.step(inp.eps_theta, t, inp.x0).prev_sample
    if case == "train_step":  # diffusers' training examples: randn_like, randint, add_noise, mse_loss
        def train_step():
            noise = torch.randn_like(inp.x0)
            t = torch.randint(N_STEPS, (inp.x0.shape[0],), device=inp.device)
            pred = inp.model(sched.add_noise(inp.x0, noise, t), t)
            _backward(F.mse_loss(pred, noise), inp.model.w)
        return train_step
    return None


# ---- the multistep solvers: diffusers' schedulers and fastddpm.diffusers' drop-ins ---------------

_SOLVER_CLASSES = {"dpm_step": "DPMSolverMultistepScheduler", "dpm_loop": "DPMSolverMultistepScheduler",
                   "unipc_step": "UniPCMultistepScheduler", "euler_step": "EulerDiscreteScheduler",
                   "euler_a_step": "EulerAncestralDiscreteScheduler"}


def solver_scheduler(case, adapter=False):
    """diffusers' scheduler of ``case`` (``adapter``: fastddpm.diffusers' drop-in) with its
    default config over the cases' linear betas, set to SOLVER_STEPS steps."""
    if adapter:
        from ... import diffusers as module
    else:
        import diffusers as module
    sched = getattr(module, _SOLVER_CLASSES[case])(num_train_timesteps=N_STEPS, beta_schedule="linear",
                                                   beta_start=1e-4, beta_end=0.02)
    sched.set_timesteps(SOLVER_STEPS)
    return sched


def _solver_loop(sched, shape, device):
    """The loop of diffusers' pipelines: x_T = randn * init_noise_sigma, then per timestep
    scale_model_input, the model call and step."""
    with torch.no_grad():
        sched.set_timesteps(SOLVER_STEPS)
        x = torch.randn(shape, device=device) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(trivial_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


def _solver_make(case, inp, adapter=False):
    """A scheduler's step at index SOLVER_STEP_I as pipelines call it, repeated: the run is
    taken there once (its history filled), then each call sets the step index back to it."""
    if case not in SOLVER_CASES:
        return None
    sched = solver_scheduler(case, adapter)
    if case == "dpm_loop":
        return lambda: _solver_loop(sched, inp.shape, inp.device)
    x, out = inp.x0, inp.eps_theta
    # as pipelines do: a generator only where step takes one (UniPC's is deterministic)
    gen = {"generator": torch.Generator(inp.device).manual_seed(0)} if "generator" in signature(sched.step).parameters \
        else {}
    with torch.no_grad():
        for t in sched.timesteps[:SOLVER_STEP_I]:
            sched.step(out, t, x, **gen)
    t = sched.timesteps[SOLVER_STEP_I]

    sched.is_scale_input_called = True  # Euler's: the model input was scaled (it warns otherwise)

    def step():
        sched._step_index = SOLVER_STEP_I
        if adapter:
            sched._fd_next = SOLVER_STEP_I  # the drop-in checks that steps run in order
        return sched.step(out, t, x, **gen).prev_sample
    return step


def _copy_make(case, inp):
    return (lambda: inp.dst.copy_(inp.x0)) if case == "copy" else None


def _always(device):
    return True, ""


PROVIDERS = {p.name: p for p in (
    Provider("copy_", _always, _copy_make, cases=("copy",)),
    *(Provider(f"fastddpm-{b}", _fastddpm_available(b), _fastddpm_make(b)) for b in ("cpu", "cuda", "triton")),
    # eager: labml's code, and for the DDIM steps diffusers' step math written out (baselines.py)
    Provider("eager", _always, _labml_make(False), cases=LABML_CASES + ("ddim_step", "ddim_step_clip", "ddim_step_cfg")),
    Provider("compile", _always, _labml_make(True), cases=LABML_CASES),
    Provider("diffusers", _diffusers_available,
             lambda case, inp: _solver_make(case, inp) or _diffusers_make(case, inp),
             cases=("q_sample_noise", "q_sample_draw", "p_sample_draw", "train_step") + SAMPLER_CASES + SOLVER_CASES),
    # fastddpm.diffusers' drop-in schedulers called exactly as diffusers' (their step, add_noise)
    Provider("fastddpm-diffusers", _diffusers_available,
             lambda case, inp: _solver_make(case, inp, True) or _diffusers_make(case, inp, adapter=True),
             cases=("q_sample_noise", "q_sample_draw", "p_sample_draw", "train_step") + SAMPLER_CASES + SOLVER_CASES),
)}


# The performance goals, as ratios of medians measured side by side: (case, baseline provider,
# highest fused/baseline ratio, sizes it applies to). At the tiny size only host work is timed:
# what a GPU step costs at CIFAR size, where the data moves in about a microsecond.
_REAL_SIZES = ("cifar", "latent", "large")
GOALS = (
    ("q_sample_noise", "eager", 0.5, _REAL_SIZES),
    ("q_sample_draw", "eager", 0.35, _REAL_SIZES),
    ("p_sample_draw", "eager", 0.3, _REAL_SIZES),
    ("mse_fwd_bwd", "eager", 0.5, _REAL_SIZES),
    ("train_step", "eager", 0.5, _REAL_SIZES),
    ("q_sample_noise", "compile", 1.0, _REAL_SIZES),
    ("q_sample_noise", "eager", 0.5, ("tiny",)),
    ("q_sample_draw", "eager", 0.5, ("tiny",)),
    ("p_sample_draw", "eager", 0.5, ("tiny",)),
    ("mse_fwd_bwd", "eager", 1.0, ("tiny",)),
    ("train_step", "eager", 0.6, ("tiny",)),
    # needs diffusers (goals.py says when it is absent)
    *((case, "diffusers", 0.3, ("cifar",)) for case in STEP_CASES),
    # the drop-ins' step against diffusers' (goals.py runs them as --fused fastddpm-diffusers does)
    *((case, "diffusers", 0.3, ("cifar", "host")) for case in SOLVER_STEP_CASES),
    ("dpm_loop", "diffusers", 0.3, ("cifar",)),
    # ADM's hybrid loss, forward and backward, at DiT's latent batch
    ("adm_hybrid", "eager", 0.2, ("dit",)),
    ("adm_hybrid", "compile", 1.0, ("dit",)),
)
# A bare fused op call (q_sample drawing its noise, called as the library calls it: fastddpm._C's
# direct call) at the tiny size costs at most this many torch.add calls of the same tensors
# (benchmarks/goals.py times the two, and the torch.ops call beside them).
BARE_OP_GOAL = 1.5


def make_callable(provider: str, case: str, inputs: Inputs):
    """A zero-argument callable running ``case`` once (synchronised on CUDA), or None."""
    if case not in PROVIDERS[provider].cases:
        return None
    fn = PROVIDERS[provider].make(case, inputs)
    if fn is None or inputs.device.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize(inputs.device)
        return out
    return synced
