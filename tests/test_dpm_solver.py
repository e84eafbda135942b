"""DPM-Solver++ (fastddpm.samplers.tables.dpm, fastddpm.diffusers.DPMSolverMultistepScheduler):
the tables against float64 formulas written out here, the drop-in against diffusers' own class
step by step, diffusers' bugs against the float64 formulas, and the native sampler's run."""
import math
import warnings

import pytest
import torch
from torch import nn

import fastddpm
from backends_under_test import device_for, kernel_backends
from fastddpm import ops, samplers
from fastddpm.samplers.tables import dpm as dpm_tables

diffusers = pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")
from fastddpm.diffusers import DPMSolverMultistepScheduler  # noqa: E402

BACKENDS = kernel_backends() + ["reference"]
SHAPE = (2, 3, 4, 4)
TOL = dict(rtol=1e-4, atol=1e-4)


# ---- float64 oracle: DPM-Solver++ as the papers write it (D0, D1, D2 differences) ------------

def oracle_orders(n, order, lower_order_final=True, euler_at_final=False, final="zero"):
    out = []
    for i in range(n):
        if i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final == "zero"):
            out.append(1)
        elif i == n - 2 and lower_order_final and n < 15:
            out.append(min(order, 2, i + 1))
        else:
            out.append(min(order, i + 1))
    return out


def oracle_run(sigmas, x, outs, prediction, orders, *, solver_type="midpoint", sde=False, noises=None):
    """x_{i+1} for every step in float64: ``outs(i, x)`` the model output at step i."""
    sig = [float(s) for s in sigmas]
    x = x.double()
    m, xs = [], []
    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        a_s, a_t = 1 / math.sqrt(1 + s * s), 1 / math.sqrt(1 + t * t)
        v_s, v_t = s * a_s, t * a_t
        out = outs(i, x).double()
        x0 = {"eps": (x - v_s * out) / a_s, "v": a_s * x - v_s * out, "x0": out}[prediction]
        m.insert(0, x0)
        if t == s:
            xs.append(x.clone())
            continue
        lam = [math.inf if v == 0 else -math.log(v) for v in sig]
        h = math.inf if t == 0 else lam[i + 1] - lam[i]
        g = 2 * h if sde else h
        em = math.exp(-g)
        if sde:
            base = (v_t / v_s) * math.exp(-h) * x + a_t * (1 - em) * m[0]
            base = base + v_t * math.sqrt(1 - math.exp(-2 * h)) * noises[i].double()
        else:
            base = (v_t / v_s) * x + a_t * (1 - em) * m[0]
        k = orders[i]
        if k == 1:
            x = base
        elif k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (m[0] - m[1]) / r0
            if solver_type == "midpoint":
                x = base + 0.5 * a_t * (1 - em) * d1
            else:
                x = base + a_t * ((em - 1) / g + 1) * d1
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d10, d11 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
            d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            d2 = (d10 - d11) / (r0 + r1)
            x = base + a_t * ((em - 1) / g + 1) * d1 - a_t * ((em - 1 + g) / g ** 2 - 0.5) * d2
        xs.append(x)
    return xs


class Toy(nn.Module):
    """Deterministic per-sample model over ``alpha_bar``: the x0 it implies is 0.5 tanh(x) plus a
    t-dependent shift, output as eps, x0 or v."""

    def __init__(self, alpha_bar, prediction="eps"):
        super().__init__()
        self.ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        self.prediction = prediction

    def forward(self, x, t):
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).cpu()
        ab = self.ab[t].to(x.device, x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        x0 = 0.5 * torch.tanh(x) + 0.001 * t.to(x.device, x.dtype).view_as(ab)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def _x_T(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---- (1) tables against the float64 oracle ---------------------------------------------------

def _schedule(kind, n=1000):
    if kind == "linear":
        beta = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    else:  # cosine
        s = 0.008
        f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * math.pi / 2) ** 2
        beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - beta, 0)


TABLE_CASES = [  # (schedule, steps, prediction, options)
    ("linear", 10, "eps", {}),
    ("linear", 20, "eps", {"order": 3}),
    ("cosine", 12, "v", {"solver_type": "heun"}),
    ("linear", 16, "x0", {"order": 3, "karras": True, "final_sigmas_type": "sigma_min"}),
    ("cosine", 8, "eps", {"order": 1, "spacing": "trailing"}),
    ("linear", 15, "eps", {"lower_order_final": False, "final_sigmas_type": "sigma_min", "spacing": "leading",
                           "steps_offset": 1}),
    ("linear", 18, "v", {"euler_at_final": True, "final_sigmas_type": "sigma_min", "karras": True,
                         "solver_type": "heun"}),
    ("linear", 10, "eps", {"sde": True}),
    ("cosine", 16, "eps", {"sde": True, "order": 3, "karras": True}),
    ("linear", 12, "x0", {"sde": True, "solver_type": "heun"}),
]


TABLE_RUNS = [(c, "reference") for c in TABLE_CASES] + [
    (c, b) for c in (TABLE_CASES[1], TABLE_CASES[3], TABLE_CASES[8]) for b in kernel_backends()]


@pytest.mark.parametrize("case,backend", TABLE_RUNS, ids=lambda c: str(c))
def test_tables_against_float64_formulas(case, backend):
    schedule, steps, prediction, opts = case
    device = device_for(backend)
    ab = _schedule(schedule)
    opts = dict(opts)
    spacing, offset = opts.pop("spacing", "linspace"), opts.pop("steps_offset", 0)
    plan = dpm_tables.plan(ab, steps, prediction=prediction, spacing=spacing, steps_offset=offset, **opts)
    order = opts.get("order", 2)
    orders = oracle_orders(steps, order, opts.get("lower_order_final", True), opts.get("euler_at_final", False),
                           opts.get("final_sigmas_type", "zero"))
    assert dpm_tables.step_orders(steps, order, lower_order_final=opts.get("lower_order_final", True),
                                  euler_at_final=opts.get("euler_at_final", False),
                                  final_sigmas_type=opts.get("final_sigmas_type", "zero")) == orders
    model = Toy(ab, prediction)
    sde = opts.get("sde", False)
    gen = torch.Generator().manual_seed(3)
    noises = [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(steps)]
    x_T = _x_T(dtype=torch.float64)
    want = oracle_run(plan.sigmas, x_T, lambda i, x: model(x, plan.timesteps[i]), prediction, orders,
                      solver_type=opts.get("solver_type", "midpoint"), sde=sde, noises=noises)
    # the plan's own run, through the fused op in float64
    coef = plan.coef.to(device)
    x, hist = x_T.to(device), []
    for i in range(steps):
        out = model(x, plan.timesteps[i]).to(device)
        t = torch.full((SHAPE[0],), i, dtype=torch.int64, device=device)
        noise = noises[i].to(device) if plan.noisy[i] else None
        seed = None if noise is not None else torch.zeros(1, dtype=torch.int64, device=device)
        y = ops.solver_step(x, out, t, coef, tuple(hist[:plan.n_history(i)]), noise, seed=seed, backend=backend)
        named = dict(zip(plan.outputs, y))
        if "m" in named:
            hist = ([named["m"]] + hist)[:plan.depth]
        x = named["prev"]
        torch.testing.assert_close(x.cpu(), want[i], rtol=1e-9, atol=1e-9)
    assert plan.noisy == [sde and i < steps - 1 if opts.get("final_sigmas_type", "zero") == "zero" else sde
                          for i in range(steps)]


def test_plan_validates_options():
    ab = _schedule("linear")
    for bad, err in [({"order": 4}, ValueError), ({"order": True}, ValueError), ({"solver_type": "bh2"}, ValueError),
                     ({"final_sigmas_type": "max"}, ValueError), ({"sde": 1}, TypeError), ({"karras": "yes"}, TypeError),
                     ({"prediction": "epsilon"}, ValueError), ({"spacing": "log"}, ValueError),
                     ({"steps_offset": 1}, ValueError)]:
        with pytest.raises(err, match=next(iter(bad))):
            dpm_tables.plan(ab, 10, **bad)
    with pytest.raises(ValueError, match="steps"):
        dpm_tables.plan(ab, 0)
    with pytest.raises(TypeError):
        dpm_tables.plan(ab, 10, bogus=1)
    # the native sampler takes the same names
    s = samplers.Sampler(ab, kind="dpm++", steps=10, order=3, solver_type="heun", sde=True, karras=True,
                         final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=True)
    assert s.plan.depth == 2 and len(s) == 10


# ---- (2) the drop-in against diffusers, step by step ------------------------------------------

def _loop(scheduler, steps, model, x, *, seed=7, noises=None, keep=True, **set_kw):
    scheduler.set_timesteps(steps, **set_kw)
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for k, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t)
        kw = {} if noises is None else {"variance_noise": noises[k]}
        x = scheduler.step(out, t, x, generator=gen, **kw).prev_sample
        xs.append(x)
    return xs


DROP_IN = [  # (config, steps)
    ({}, 10),
    ({"solver_order": 3}, 20),
    ({"solver_order": 1, "timestep_spacing": "trailing"}, 10),
    ({"solver_type": "heun", "prediction_type": "v_prediction"}, 12),
    ({"solver_order": 3, "lower_order_final": False, "timestep_spacing": "leading", "steps_offset": 1}, 12),
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "euler_at_final": True}, 15),
    ({"use_karras_sigmas": True, "solver_type": "heun"}, 10),
    ({"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.2}, 12),
    ({"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0, "solver_order": 3}, 16),
    ({"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 18),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "lambda_min_clipped": -5.1}, 25),
    ({"use_exponential_sigmas": True}, 10),
    ({"use_lu_lambdas": True, "solver_order": 3}, 16),
    ({"algorithm_type": "sde-dpmsolver++"}, 10),
    ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True}, 16),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 1, "final_sigmas_type": "sigma_min"}, 12),
    ({"algorithm_type": "deis", "solver_type": "bh2", "rescale_betas_zero_snr": True,
      "prediction_type": "v_prediction", "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 12),
]


# Every config on the default backend, a few on every backend (the fused op is the same).
DROP_IN_RUNS = [(c, n, "auto") for c, n in DROP_IN] + [
    (c, n, b) for c, n in (DROP_IN[1], DROP_IN[8], DROP_IN[14]) for b in BACKENDS]
# cosine: alpha_bar[999] = 2.4e-9, and x0 = (x - sigma_t eps) / alpha_t cancels in float32 (in
# diffusers' step and in the fused one alike): both lie ~5e-4 from the float64 run there
# (fastddpm's half as far), so the comparison with diffusers needs 1e-3.
LOOSE = {"squaredcos_cap_v2": dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.parametrize("config,steps,backend", DROP_IN_RUNS, ids=[f"{c}-{n}-{b}" for c, n, b in DROP_IN_RUNS])
def test_drop_in_matches_diffusers(config, steps, backend):
    if backend != "auto":
        device_for(backend)
    tol = LOOSE.get(config.get("beta_schedule"), TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DPMSolverMultistepScheduler(**config)
        ours = DPMSolverMultistepScheduler(**config, fastddpm_backend=backend)
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[ref.config.prediction_type]
    model = Toy(ref.alphas_cumprod.double(), pred)
    want = _loop(ref, steps, model, _x_T())
    got = _loop(ours, steps, model, _x_T())
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.sigmas, ref.sigmas) and ours.sigmas.dtype == ref.sigmas.dtype
    assert ours.init_noise_sigma == ref.init_noise_sigma and ours.order == ref.order
    assert ours.lower_order_nums == ref.lower_order_nums and ours.step_index == ref.step_index
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"step {k}: {m}")


def test_drop_in_half_and_variance_noise():
    cfg = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    ref, ours = diffusers.DPMSolverMultistepScheduler(**cfg), DPMSolverMultistepScheduler(**cfg)
    model = Toy(ref.alphas_cumprod.double())
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(10)]
    want = _loop(ref, 10, model, _x_T(), noises=noises)
    got = _loop(ours, 10, model, _x_T(), noises=noises)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    for dtype in (torch.float16, torch.bfloat16):
        ref, ours = diffusers.DPMSolverMultistepScheduler(solver_order=3), DPMSolverMultistepScheduler(solver_order=3)
        want = _loop(ref, 12, model, _x_T(dtype=dtype))
        got = _loop(ours, 12, model, _x_T(dtype=dtype))
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def test_drop_in_begin_index_mid_schedule():
    """img2img: set_begin_index(k); the warm-up counts from step k, as diffusers' lower_order_nums."""
    ref, ours = diffusers.DPMSolverMultistepScheduler(solver_order=3), DPMSolverMultistepScheduler(solver_order=3)
    model = Toy(ref.alphas_cumprod.double())
    res = []
    for s in (ref, ours):
        s.set_timesteps(20)
        s.set_begin_index(6)
        x, xs = _x_T(), []
        for t in s.timesteps[6:]:
            x = s.step(model(x, t), t, x).prev_sample
            xs.append(x)
        res.append(xs)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **TOL)


# ---- diffusers' bugs, against the float64 formulas ------------------------------------------

@pytest.mark.parametrize("config,steps", [
    ({"solver_type": "heun", "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 16),
    ({"solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 16),
    ({"solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 20),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 16),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True,
      "final_sigmas_type": "sigma_min"}, 20),
])
def test_drop_in_fixes_diffusers(config, steps):
    ref, ours = diffusers.DPMSolverMultistepScheduler(**config), DPMSolverMultistepScheduler(**config)
    model = Toy(ref.alphas_cumprod.double())
    gen = torch.Generator().manual_seed(2)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    want_bad = _loop(ref, steps, model, _x_T(), noises=noises)
    got = _loop(ours, steps, model, _x_T(), noises=noises)
    sde = config.get("algorithm_type") == "sde-dpmsolver++"
    if sde:
        assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(got, want_bad))
    else:
        assert not torch.isfinite(want_bad[-1]).all()  # diffusers' NaN
    orders = oracle_orders(steps, config.get("solver_order", 2), config.get("lower_order_final", True),
                           False, config.get("final_sigmas_type", "zero"))
    sig = ours.sigmas.double()
    x = _x_T()
    want = oracle_run(sig, x, lambda i, xx: model(xx.float(), ours.timesteps[i]), "eps", orders,
                      solver_type=config.get("solver_type", "midpoint"), sde=sde, noises=noises)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {k}: {m}")
    if not sde:
        torch.testing.assert_close(got[-1], got[-2])  # the h = 0 step is the identity


# ---- (3) config, state, inputs, unsupported options --------------------------------------------

def test_from_config_state_and_inputs():
    ref = diffusers.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)
    ours = DPMSolverMultistepScheduler.from_config(ref.config)
    assert isinstance(ours, DPMSolverMultistepScheduler)
    assert isinstance(ours, diffusers.DPMSolverMultistepScheduler)
    assert ours.config.solver_order == 3 and ours.config.use_karras_sigmas
    back = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    assert back.config.solver_order == 3
    model = Toy(ours.alphas_cumprod.double())
    first = _loop(ours, 12, model, _x_T())
    # a second run after a partial one: set_timesteps resets the history
    ours.set_timesteps(12)
    x = _x_T()
    for t in ours.timesteps[:4]:
        x = ours.step(model(x, t), t, x).prev_sample
    again = _loop(ours, 12, model, _x_T())
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # inputs not modified; return_dict=False gives diffusers' tuple
    ours.set_timesteps(12)
    x = _x_T()
    t = ours.timesteps[0]
    out = model(x, t)
    x_copy, out_copy = x.clone(), out.clone()
    res = ours.step(out, t, x, return_dict=False)
    assert isinstance(res, tuple) and len(res) == 1
    assert torch.equal(x, x_copy) and torch.equal(out, out_copy)
    assert ours.scale_model_input(x, t) is x
    with pytest.raises(TypeError):
        ours.step([out], ours.timesteps[1], res[0])


@pytest.mark.parametrize("option,value", [
    ("algorithm_type", "dpmsolver"), ("algorithm_type", "sde-dpmsolver"), ("use_flow_sigmas", True),
    ("prediction_type", "flow_prediction"), ("use_dynamic_shifting", True), ("solver_order", 4),
])
def test_unsupported_options_raise(option, value):
    extra = {"final_sigmas_type": "sigma_min"} if option == "algorithm_type" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match=option):
            DPMSolverMultistepScheduler(**{option: value}, **extra)
        config = diffusers.DPMSolverMultistepScheduler(**{option: value}, **extra).config
        with pytest.raises(NotImplementedError, match=option):
            DPMSolverMultistepScheduler.from_config(config)
    with pytest.raises(NotImplementedError, match="variance_type"):
        DPMSolverMultistepScheduler(variance_type="learned", algorithm_type="sde-dpmsolver++")


def test_learned_variance_takes_the_mean():
    ref, ours = (cls(variance_type="learned_range") for cls in (diffusers.DPMSolverMultistepScheduler,
                                                                 DPMSolverMultistepScheduler))
    eps = Toy(ref.alphas_cumprod.double())

    def model(x, t):
        e = eps(x, t)
        return torch.cat([e, 0.3 * e], dim=1)

    for a, b in zip(_loop(ours, 10, model, _x_T()), _loop(ref, 10, model, _x_T())):
        torch.testing.assert_close(a, b, **TOL)


# ---- (4) the native sampler's run equals the drop-in's -------------------------------------------

@pytest.mark.parametrize("native,config,steps", [
    ({"order": 2}, {}, 10),
    ({"order": 3, "karras": True, "prediction": "v"}, {"solver_order": 3, "use_karras_sigmas": True,
                                                       "prediction_type": "v_prediction"}, 16),
    ({"solver_type": "heun", "final_sigmas_type": "sigma_min", "spacing": "leading", "steps_offset": 1},
     {"solver_type": "heun", "final_sigmas_type": "sigma_min", "timestep_spacing": "leading", "steps_offset": 1}, 12),
    ({"sde": True, "order": 2, "prediction": "x0"}, {"algorithm_type": "sde-dpmsolver++", "prediction_type": "sample"}, 10),
])
def test_native_sampler_matches_drop_in(native, config, steps):
    ref = DPMSolverMultistepScheduler(**config)
    betas = ref.betas.double()
    native = dict(native)
    prediction = native.pop("prediction", "eps")
    diffusion = fastddpm.DenoiseDiffusion(Toy(torch.cumprod(1 - betas, 0), prediction), 1000, schedule=betas,
                                          backend="reference", prediction=prediction)
    model = diffusion.eps_model
    sampler = samplers.make_sampler(diffusion, "dpm++", steps, prediction=prediction, **native)
    assert repr(sampler).startswith("Sampler('dpm++'")
    ref.set_timesteps(steps)
    assert torch.equal(sampler.timesteps, ref.timesteps)
    torch.testing.assert_close(sampler.plan.sigmas, ref.sigmas.double(), rtol=3e-4, atol=0)  # float32 cumprod
    gen = torch.Generator().manual_seed(5)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    want = _loop(ref, steps, model, _x_T(), noises=noises)
    if native.get("sde"):
        x = _x_T()
        for i in range(steps):
            x = sampler.step(x, model(x, sampler.timesteps[i].expand(SHAPE[0])), i, noise=noises[i])
        got = x
    else:
        got = diffusion.sample(_x_T(), sampler=sampler)
    torch.testing.assert_close(got, want[-1], **TOL)
