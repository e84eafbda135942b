"""Euler and Euler-ancestral: the tables against float64 formulas written out here, the drop-ins
against diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler step by step, and
the native samplers against the drop-ins."""
import math

import pytest
import torch

import fastddpm
from backends_under_test import device_for, kernel_backends
from fastddpm.samplers import tables
from fastddpm.samplers.tables import euler

BACKENDS = kernel_backends() + ["reference"]  # an expected backend that is absent fails
SHAPE = (2, 3, 4, 4)


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")


def linear_ab(n=1000, lo=1e-4, hi=0.02):
    return torch.cumprod(1 - torch.linspace(lo, hi, n, dtype=torch.float64), 0)


def cosine_ab(n=400):
    t = torch.arange(n + 1, dtype=torch.float64) / n
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - beta, 0)


def zero_snr_ab(n=1000):
    ab = linear_ab(n)
    s = ab.sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return s * s  # ends in exactly 0


# ---- (1) the tables against float64 formulas ---------------------------------------------------

def ve_step(x, out, z, s, s2, prediction, ancestral):
    """One VE step written out (REFERENCES' formulas), float64."""
    if prediction == "eps":
        x0 = x - s * out
    elif prediction == "v":
        x0 = out * (-s / math.sqrt(s * s + 1)) + x / (s * s + 1)
    else:
        x0 = out
    if not ancestral:
        return x + (x - x0) / s * (s2 - s), x0
    up = math.sqrt(s2 ** 2 * (s ** 2 - s2 ** 2) / s ** 2)
    down = math.sqrt(max(s2 ** 2 - up ** 2, 0.0))
    return x + (x - x0) / s * (down - s) + z * up, x0


def apply(coef, i, x, out, z):
    """The general step's rows on float64 operands (no clipping, no history)."""
    c = coef[i]
    x0 = c[0, 0] * x + c[0, 1] * out
    ops = (x, out, x0, 0, 0, 0, 0, z)
    return [sum(c[r, k] * ops[k] for k in range(8) if c[r, k] != 0) for r in range(1, c.shape[0])]


@pytest.mark.parametrize("ancestral", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("schedule,steps,spacing", [(linear_ab, 1, "linspace"), (linear_ab, 7, "leading"),
                                                    (cosine_ab, 13, "trailing"), (linear_ab, 25, "linspace")])
def test_tables_against_formulas(schedule, steps, spacing, prediction, ancestral):
    ab = schedule()
    g = torch.Generator().manual_seed(steps)
    x, out, z = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(3))
    ts = tables.timesteps(ab.numel(), steps, spacing)
    sig = ((1 - ab[ts]) / ab[ts]).sqrt()
    sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    ve = euler.build(sigmas, ts, prediction, ancestral=ancestral).coef
    p = euler.plan(ab, steps, prediction=prediction, spacing=spacing, ancestral=ancestral)
    assert torch.equal(p.timesteps, ts) and p.outputs == ("prev", "x0") and p.depth == 0
    for i in range(steps):
        s, s2 = float(sigmas[i]), float(sigmas[i + 1])
        xv = x * math.sqrt(1 + s * s)  # the same state in VE coordinates
        want, want_x0 = ve_step(xv, out, z, s, s2, prediction, ancestral)
        prev, x0 = apply(ve, i, xv, out, z)
        torch.testing.assert_close(prev, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
        prev, x0 = apply(p.coef, i, x, out, z)  # VP: x_VP = x_VE / sqrt(1 + s^2)
        torch.testing.assert_close(prev, want / math.sqrt(1 + s2 * s2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
        assert p.noisy[i] == (ancestral and i < steps - 1)
    assert p.input_scale is None
    torch.testing.assert_close(euler.build(sigmas, ts, prediction).input_scale, 1 / (1 + sig * sig).sqrt())


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("steps,spacing", [(10, "linspace"), (8, "trailing"), (20, "leading")])
def test_native_is_ddim(prediction, steps, spacing):
    """Euler is DDIM with eta = 0 and Euler-ancestral DDIM with eta = 1 (VP coordinates)."""
    ab = linear_ab()
    for ancestral, eta in ((False, 0.0), (True, 1.0)):
        p = euler.plan(ab, steps, prediction=prediction, spacing=spacing, ancestral=ancestral)
        d = tables.step_tables(ab, p.timesteps, "ddim", eta=eta, prediction=prediction)
        torch.testing.assert_close(p.coef[:, 1, 0], d["k1"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p.coef[:, 1, 1], d["k2"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p.coef[:, 1, 7], d["s"], rtol=1e-9, atol=1e-12)


def test_karras_and_final_sigma():
    ab = linear_ab()
    p = euler.plan(ab, 12, karras=True, final_sigmas_type="sigma_min")
    train = ((1 - ab) / ab).sqrt()
    rho = 7.0
    ramp = torch.linspace(0, 1, 12, dtype=torch.float64)
    want = (train[999] ** (1 / rho) + ramp * (train[0] ** (1 / rho) - train[999] ** (1 / rho))) ** rho
    torch.testing.assert_close(p.sigmas[:12], want, rtol=1e-12, atol=0)
    assert float(p.sigmas[12]) == float(train[0])
    # each timestep is the log-sigma interpolation of its sigma, rounded
    for s, t in zip(want.tolist(), p.timesteps.tolist()):
        lo = int(torch.searchsorted(train, torch.tensor(s, dtype=torch.float64))) - 1
        lo = min(max(lo, 0), 998)
        w = (math.log(train[lo]) - math.log(s)) / (math.log(train[lo]) - math.log(train[lo + 1]))
        assert t == round(lo + min(max(w, 0), 1))


def test_zero_terminal_snr_native():
    ab = zero_snr_ab()
    for ancestral in (False, True):
        p = euler.plan(ab, 10, prediction="v", ancestral=ancestral)
        assert bool(torch.isfinite(p.coef).all())
        # the first step (alpha = 0): x0 = -v, x' = alpha' x0 (+ sigma' z)
        a2 = math.sqrt(float(ab[p.timesteps[1]]))
        assert float(p.coef[0, 1, 0]) == 0.0
        assert math.isclose(float(p.coef[0, 1, 1]), -a2, rel_tol=1e-12)
        with pytest.raises(ValueError, match="prediction='eps'"):
            euler.plan(ab, 10, prediction="eps", ancestral=ancestral)


def test_native_options_validated():
    ab = linear_ab()
    with pytest.raises(ValueError, match="karras"):
        euler.plan(ab, 10, ancestral=True, karras=True)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        euler.plan(ab, 10, ancestral=True, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        euler.plan(ab, 10, final_sigmas_type="bogus")
    with pytest.raises(ValueError, match="prediction"):
        euler.plan(ab, 10, prediction="epsilon")
    with pytest.raises(ValueError, match="spacing"):
        euler.plan(ab, 10, spacing="bogus")
    with pytest.raises(TypeError):
        tables.solver_plan("euler", ab, 10, bogus=1)


# ---- (2) the drop-ins against diffusers -----------------------------------------------------

def toy_model(x, t):
    """Deterministic, per element, eps-like (x0 stays O(1))."""
    return 0.9 * x + 0.1 * torch.tanh(2 * x) + 1e-4 * float(t)


@pytest.fixture
def on_backend(monkeypatch):
    """Run the drop-ins' fused steps on one named backend."""
    from fastddpm.diffusers import _solver
    real = _solver.backends.resolve

    def use(backend):
        monkeypatch.setattr(_solver.backends, "resolve", lambda name, device: real(backend, device))
        return device_for(backend)
    return use


def run_both(ours, theirs, steps, *, device="cpu", dtype=torch.float32, step_kwargs=None, tol=(1e-4, 1e-4),
             set_kwargs=None, atol_per_sigma=0.0, follow=False):
    """Loop both schedulers; ``atol_per_sigma``: extra absolute tolerance times the step's sigma
    (half precision: diffusers forms sigma * model_output in the half type, rounding it there);
    ``follow``: both step from diffusers' sample each step (half types, where rounding the
    samples to the type makes the two loops drift apart)."""
    set_kwargs = set_kwargs or {"num_inference_steps": steps}
    ours.set_timesteps(device=device, **set_kwargs)
    theirs.set_timesteps(device=device, **set_kwargs)
    assert ours.timesteps.dtype == theirs.timesteps.dtype and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.sigmas.dtype == theirs.sigmas.dtype and torch.equal(ours.sigmas, theirs.sigmas)
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma)
    g = torch.Generator(device).manual_seed(0)
    x = (torch.randn(SHAPE, generator=g, device=device) * theirs.init_noise_sigma).to(dtype)
    xa, xb = x.clone(), x.clone()
    ga, gb = torch.Generator(device).manual_seed(5), torch.Generator(device).manual_seed(5)
    for i, t in enumerate(theirs.timesteps):
        atol = tol[1] + atol_per_sigma * float(theirs.sigmas[i])
        ia, ib = ours.scale_model_input(xa, t), theirs.scale_model_input(xb, t)
        assert ia.dtype == ib.dtype
        torch.testing.assert_close(ia, ib, rtol=tol[0], atol=tol[1])
        oa, ob = toy_model(ia, t), toy_model(ib, t)
        keep = (xa.clone(), oa.clone())
        ra = ours.step(oa, t, xa, generator=ga, **(step_kwargs or {}))
        rb = theirs.step(ob, t, xb, generator=gb, **(step_kwargs or {}))
        assert torch.equal(keep[0], xa) and torch.equal(keep[1], oa), "step modified its inputs"
        assert ra.prev_sample.dtype == rb.prev_sample.dtype
        assert ra.pred_original_sample.dtype == rb.pred_original_sample.dtype
        torch.testing.assert_close(ra.prev_sample, rb.prev_sample, rtol=tol[0], atol=atol)
        torch.testing.assert_close(ra.pred_original_sample, rb.pred_original_sample, rtol=tol[0], atol=atol)
        assert ours.step_index == theirs.step_index
        xa, xb = (rb.prev_sample.clone() if follow else ra.prev_sample), rb.prev_sample
    return xa, xb


EULER_CONFIGS = [
    {},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
     "beta_end": 0.012},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "leading"},
    {"use_exponential_sigmas": True, "prediction_type": "sample"},
    {"use_beta_sigmas": True, "timestep_spacing": "trailing"},
    {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min"},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "prediction_type": "original_sample"},
]
ANCESTRAL_CONFIGS = [
    {},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
]


def _classes(ancestral):
    diffusers = _diffusers()
    from fastddpm.diffusers import euler as ours
    if ancestral:
        return ours.EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler
    return ours.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler


@pytest.mark.parametrize("cfg", EULER_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_euler_matches_diffusers(cfg):
    if cfg.get("use_beta_sigmas"):
        pytest.importorskip("scipy", reason="diffusers' beta sigmas need scipy")
    Ours, Theirs = _classes(False)
    run_both(Ours(**cfg), Theirs(**cfg), 12)


@pytest.mark.parametrize("cfg", ANCESTRAL_CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_ancestral_matches_diffusers(cfg):
    Ours, Theirs = _classes(True)
    run_both(Ours(**cfg), Theirs(**cfg), 15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ancestral", [False, True])
def test_drop_ins_on_every_backend(backend, ancestral, on_backend):
    device = on_backend(backend)
    Ours, Theirs = _classes(ancestral)
    run_both(Ours(), Theirs(), 6, device=device)


@pytest.mark.parametrize("churn", [dict(s_churn=0.8), dict(s_churn=1.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003),
                                   dict(s_churn=-0.5)])
def test_euler_churn_matches_diffusers(churn):
    Ours, Theirs = _classes(False)
    run_both(Ours(), Theirs(), 10, step_kwargs=churn)


def test_custom_sigmas_and_timesteps():
    Ours, Theirs = _classes(False)
    run_both(Ours(), Theirs(), None, set_kwargs={"sigmas": [14.0, 6.0, 2.5, 0.9, 0.3, 0.0]})
    run_both(Ours(), Theirs(), None, set_kwargs={"timesteps": [900, 650, 400, 200, 50, 10]})


@pytest.mark.parametrize("ancestral", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(ancestral, dtype):
    Ours, Theirs = _classes(ancestral)
    run_both(Ours(), Theirs(), 8, dtype=dtype, tol=(2e-2, 2e-2),
             atol_per_sigma=8e-3 if dtype == torch.float16 else 3e-2, follow=True)


def test_ancestral_two_steps_is_finite_and_exact():
    """diffusers forms sigma_down = sqrt(s'^2 - s_up^2) in float32: with s' << s it loses every
    digit (here: it is far off or NaN); the drop-in's step is exact (s_down = s'^2 / s)."""
    Ours, Theirs = _classes(True)
    ours, theirs = Ours(), Theirs()
    ours.set_timesteps(2)
    theirs.set_timesteps(2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * theirs.init_noise_sigma
    t = ours.timesteps[0]
    out = toy_model(ours.scale_model_input(x, t), t)
    ra = ours.step(out, t, x, generator=torch.Generator().manual_seed(1))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double()
    s, s2 = float(ours.sigmas[0]), float(ours.sigmas[1])
    x64 = x.double()
    x0 = x64 - s * out.double()
    up = s2 * math.sqrt(1 - (s2 / s) ** 2)
    down = s2 * s2 / s
    want = x64 + (x64 - x0) / s * (down - s) + z * up
    assert bool(torch.isfinite(ra.prev_sample).all())
    torch.testing.assert_close(ra.prev_sample.double(), want, rtol=1e-5, atol=1e-5)
    s32 = torch.tensor([s, s2], dtype=torch.float32)
    up32 = (s32[1] ** 2 * (s32[0] ** 2 - s32[1] ** 2) / s32[0] ** 2) ** 0.5
    down32 = (s32[1] ** 2 - up32 ** 2) ** 0.5
    assert not math.isclose(float(down32), down, rel_tol=1e-2)  # diffusers' float32 value is wrong


def test_sample_prediction_large_sigma_is_exact():
    """x0 prediction on the cosine schedule (sigma_max ~ 2e4): diffusers' float32
    x + (x - x0) / s (s' - s) cancels (2.8e-4 relative error here); the fused step forms
    (s'/s) x + (1 - s'/s) x0 and stays at float32 rounding of the float64 loop."""
    Ours, _ = _classes(False)
    ours = Ours(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    ours.set_timesteps(12)
    sig = ours.sigmas.double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    x64 = x.double()
    for i, t in enumerate(ours.timesteps):
        x = ours.step(toy_model(ours.scale_model_input(x, t), t), t, x).prev_sample
        s, s2 = sig[i], sig[i + 1]
        out = toy_model(x64 / (1 + s * s).sqrt(), t)
        x64 = x64 + (x64 - out) / s * (s2 - s)
        torch.testing.assert_close(x.double(), x64, rtol=2e-6, atol=2e-6)


# ---- (3) config, state, inputs, unsupported options ------------------------------------------

@pytest.mark.parametrize("ancestral", [False, True])
def test_from_config_and_reset(ancestral):
    Ours, Theirs = _classes(ancestral)
    theirs = Theirs(timestep_spacing="trailing", prediction_type="v_prediction")
    ours = Ours.from_config(theirs.config)
    assert type(ours) is Ours and isinstance(ours, Theirs)
    assert ours.config.timestep_spacing == "trailing" and ours.config.prediction_type == "v_prediction"
    xa, _ = run_both(ours, Theirs.from_config(theirs.config), 5)
    # a second run after set_timesteps gives the same result (state reset)
    xa2, _ = run_both(ours, Theirs.from_config(theirs.config), 5)
    torch.testing.assert_close(xa, xa2, rtol=0, atol=0)


def test_unsupported_options_raise():
    E, TheirE = _classes(False)
    EA, TheirEA = _classes(True)
    with pytest.raises(NotImplementedError, match="timestep_type"):
        E.from_config(TheirE(timestep_type="continuous").config)
    with pytest.raises(NotImplementedError, match="prediction_type"):
        EA.from_config(TheirEA(prediction_type="sample").config)
    with pytest.raises(NotImplementedError, match="timestep_type"):
        E(timestep_type="continuous")
    with pytest.raises(NotImplementedError, match="prediction_type"):
        EA(prediction_type="sample")
    with pytest.raises(NotImplementedError, match="interpolation_type"):
        E(interpolation_type="cubic")
    with pytest.raises(NotImplementedError, match="prediction_type"):
        E.from_config(TheirE(prediction_type="bogus").config)


def test_step_needs_timesteps_of_the_schedule():
    E, _ = _classes(False)
    s = E()
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 3, x)
    t = s.timesteps[0]
    got = s.step(torch.ones(SHAPE), t, x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == 2 and s.step_index == 1
    s.set_timesteps(4)  # a new run mid-way
    assert s.step_index is None and len(s._fd_plan) == 4


# ---- (4) native samplers against the drop-ins ------------------------------------------------

@pytest.mark.parametrize("ancestral", [False, True])
@pytest.mark.parametrize("cfg,native", [
    ({"timestep_spacing": "leading", "steps_offset": 1}, {"spacing": "leading", "steps_offset": 1}),
    ({"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {"spacing": "trailing", "prediction": "v"}),
    ({"timestep_spacing": "leading", "final_sigmas_type": "sigma_min"},
     {"spacing": "leading", "final_sigmas_type": "sigma_min"}),
])
def test_native_sample_matches_drop_in(ancestral, cfg, native):
    """The native VP run from x_T equals the drop-in's VE loop from x_T sqrt(1 + sigma_0^2), the
    same noise (the drop-in draws it from the generator, the native run is handed the same
    draws), converted back by 1 / sqrt(1 + sigma_last^2)."""
    if ancestral and "final_sigmas_type" in cfg:
        pytest.skip("Euler-ancestral has no final_sigmas_type")
    Ours, _ = _classes(ancestral)
    sched = Ours(**cfg)
    steps = 9
    sched.set_timesteps(steps)
    ab = sched.alphas_cumprod.to(torch.float64)  # the same train schedule for both
    sampler = fastddpm.samplers.Sampler(ab, kind="euler_a" if ancestral else "euler", steps=steps, **native)
    assert sampler.timesteps.tolist() == sched.timesteps.long().tolist()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(steps)] if ancestral else [None] * steps
    x = x_T.clone()
    for i in range(steps):  # native, VP coordinates: the model receives x itself
        t = sampler.timesteps[i]
        x = sampler.step(x, toy_model(x, t), i, noise=noises[i] if sampler.noisy[i] else None)
    xv = x_T * math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    g = torch.Generator().manual_seed(7)
    for t in sched.timesteps:
        xv = sched.step(toy_model(sched.scale_model_input(xv, t), t), t, xv, generator=g).prev_sample
    s_last = float(sched.sigmas[steps])
    torch.testing.assert_close(x, xv / math.sqrt(1 + s_last ** 2), rtol=1e-4, atol=1e-4)


class Net(torch.nn.Module):
    def forward(self, x, t):
        return toy_model(x, 0) + 1e-4 * t.to(x.dtype).view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["euler", "euler_a"])
def test_diffusion_sample(kind):
    """diffusion.sample(kind=..., steps=...) runs the plan: x_T given, each step as written here."""
    diffusion = fastddpm.DenoiseDiffusion(Net(), 100)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    got = diffusion.sample(x_T, kind=kind, steps=6, spacing="trailing")
    ab = diffusion._tables64["alpha_bar"]
    p = euler.plan(ab, 6, spacing="trailing", ancestral=kind == "euler_a")
    assert p.timesteps.tolist() == tables.timesteps(100, 6, "trailing").tolist()
    assert bool(torch.isfinite(got).all()) and got.shape == x_T.shape
    if kind == "euler":  # deterministic: the float64 Euler loop in VE coordinates
        x = x_T.double() * math.sqrt(1 + float(p.sigmas[0]) ** 2)
        for i, t in enumerate(p.timesteps.tolist()):
            s, s2 = float(p.sigmas[i]), float(p.sigmas[i + 1])
            out = Net()(x / math.sqrt(1 + s * s), torch.full((SHAPE[0],), t)).double()
            x = x + (s2 - s) * out
        torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def test_ancestral_fused_noise():
    """fused_noise=True: each step's noise is the counter-based stream of one seed drawn from the
    generator (at the sample's global index), so a step equals the step given that noise."""
    _diffusers()
    from fastddpm.diffusers import EulerAncestralDiscreteScheduler
    from fastddpm.samplers import stream_noise
    g = torch.Generator().manual_seed(5)
    x, out = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    fused, given = EulerAncestralDiscreteScheduler(fused_noise=True), EulerAncestralDiscreteScheduler()
    fused.set_timesteps(10)
    given.set_timesteps(10)
    assert EulerAncestralDiscreteScheduler.from_config(fused.config).config.fused_noise is True
    for step, t in enumerate(fused.timesteps[:3]):
        got = fused.step(out, t, x, generator=torch.Generator().manual_seed(100 + step))
        seed = fastddpm.ops.draw_seed("cpu", torch.Generator().manual_seed(100 + step))
        given._check_step(out, t, x)
        want_prev, want_x0 = given._run(out, x, stream_noise(seed, 0, x.shape, torch.float32, "cpu"))
        torch.testing.assert_close(got.prev_sample, want_prev, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.pred_original_sample, want_x0, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="fused_noise must be a bool"):
        EulerAncestralDiscreteScheduler(fused_noise=1)
