"""UniPC: the tables (fastddpm.samplers.tables.unipc) against float64 UniPC written out here, the
drop-in UniPCMultistepScheduler against diffusers' own class step by step, and the native
"unipc" sampler against the drop-in."""
import math

import numpy as np
import pytest
import torch

import fastddpm
from backends_under_test import kernel_backends
from fastddpm import samplers
from fastddpm.samplers.tables import unipc as unipc_tables

diffusers = pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")
from fastddpm.diffusers import UniPCMultistepScheduler  # noqa: E402

BACKENDS = kernel_backends() + ["reference"]
SHAPE = (2, 3, 4, 4)
PRED = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def toy(x, t):
    """A deterministic per-sample model of (x, t)."""
    tt = torch.as_tensor(t).to(x.dtype).reshape(-1)
    tt = tt.view((-1,) + (1,) * (x.dim() - 1)) if tt.numel() > 1 else tt.reshape(())
    return torch.tanh(0.7 * x) + 0.001 * tt


def _backend_scope(monkeypatch, backend):
    monkeypatch.setattr(fastddpm.backends, "resolve",
                        lambda name, device, _r=fastddpm.backends.resolve: _r(backend, device))


# ---- float64 UniPC, written out from the paper's formulas (Zhao et al. 2023, B(h) variants) ----

def _alpha_sd(s):
    a = 1 / math.sqrt(1 + s * s)
    return a, s * a


def _bh_update(x, m0, older, m_new, sig_s, sig_t, older_sigs, p, *, corrector, variant, predict_x0):
    """One UniP (corrector False) / UniC update of order p from sigma sig_s to sig_t, float64."""
    a_s, sd_s = _alpha_sd(sig_s)
    a_t, sd_t = _alpha_sd(sig_t)
    if sig_t == 0:  # lambda_t = inf: the first-order step's limit is the x0 prediction
        return m0 if predict_x0 else (x - sd_s * m0) / a_s
    if sig_t == sig_s:
        return x
    lam = lambda a, sd: math.log(a) - math.log(sd)  # noqa: E731
    h = lam(a_t, sd_t) - lam(a_s, sd_s)
    hh = -h if predict_x0 else h
    B = hh if variant == "bh1" else math.expm1(hh)
    rks, D = [], []
    for k in range(1, p):
        rk = (lam(*_alpha_sd(older_sigs[k - 1])) - lam(a_s, sd_s)) / h
        rks.append(rk)
        D.append((older[k - 1] - m0) / rk)
    rks.append(1.0)
    # b_k = k! h phi_{k+1}(hh) / B(h), phi by its recursion
    b, phi, fact = [], math.expm1(hh) / hh - 1, 1
    for k in range(1, p + 1):
        b.append(phi * fact / B)
        fact *= k + 1
        phi = phi / hh - 1 / fact
    R = np.array([[r ** j for r in rks] for j in range(p)])
    if corrector:
        rho = [0.5] if p == 1 else np.linalg.solve(R, np.array(b))
        res = sum(rho[k] * D[k] for k in range(p - 1)) + rho[-1] * (m_new - m0)
    else:
        rho = [] if p == 1 else [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1]))
        res = sum(rho[k] * D[k] for k in range(p - 1)) if p > 1 else 0.0
    if predict_x0:
        return sd_t / sd_s * x - a_t * math.expm1(hh) * m0 - a_t * B * res
    return a_t / a_s * x - sd_t * math.expm1(hh) * m0 - sd_t * B * res


def _threshold(x0, ratio, max_value):
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).view(-1, *[1] * (x0.dim() - 1))
    return x0.clamp(-s, s) / s


def unipc64(sigmas, timesteps, x, model, *, prediction="eps", order=2, variant="bh2", predict_x0=True,
            lower_order_final=True, corrector_off=(), threshold=None):
    """A whole UniPC run in float64: the samples after each step."""
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]
    x = x.double()
    ms, last, outs = [], None, []
    for i in range(n):
        a, sd = _alpha_sd(sig[i])
        out = model(x, timesteps[i]).double()
        x0 = {"eps": (x - sd * out) / a, "x0": out, "v": a * x - sd * out}[prediction]
        eps = {"eps": out, "x0": (x - a * out) / sd, "v": a * out + sd * x}[prediction]
        if threshold is not None and predict_x0:
            x0 = _threshold(x0, *threshold)
        m = x0 if predict_x0 else eps
        if i > 0 and i not in corrector_off:
            p = orders[i - 1]
            x = _bh_update(last, ms[0], ms[1:], m, sig[i - 1], sig[i], sig[i - 2::-1] if i >= 2 else [], p,
                           corrector=True, variant=variant, predict_x0=predict_x0)
        ms.insert(0, m)
        last = x
        p = orders[i] if sig[i + 1] > 0 else 1
        x = _bh_update(x, ms[0], ms[1:], None, sig[i], sig[i + 1], sig[i - 1::-1] if i >= 1 else [], p,
                       corrector=False, variant=variant, predict_x0=predict_x0)
        outs.append(x)
    return outs


def _alpha_bar(kind):
    if kind == "linear":
        return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    s = 0.008  # cosine
    f = lambda t: math.cos((t / 200 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(200)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


# ---- (1) the native plan's tables, stepped by the sampler, against the float64 run above ------

NATIVE = [
    ("linear", 10, dict()),
    ("linear", 10, dict(order=3, variant="bh1")),
    ("linear", 7, dict(order=1, final_sigmas_type="sigma_min")),
    ("linear", 12, dict(order=3, lower_order_final=False, final_sigmas_type="sigma_min", prediction="x0")),
    ("linear", 12, dict(order=3, lower_order_final=False, prediction="v")),  # order 3 into sigma 0: order 1
    ("linear", 9, dict(variant="bh1", predict_x0=False)),  # both of diffusers' NaN cases at sigma 0
    ("linear", 9, dict(order=3, predict_x0=False, prediction="x0", variant="bh1", final_sigmas_type="sigma_min")),
    ("linear", 8, dict(corrector=False, order=3)),
    ("linear", 8, dict(corrector=False, order=1)),
    ("cosine", 11, dict(karras=True, order=3, final_sigmas_type="sigma_min", lower_order_final=False)),  # h = 0
    ("cosine", 11, dict(karras=True, variant="bh1")),
    ("cosine", 6, dict(spacing="leading", steps_offset=1, prediction="v")),
    ("cosine", 6, dict(spacing="trailing", order=3)),
]


@pytest.mark.parametrize("schedule,steps,options", NATIVE)
def test_native_tables_against_float64(schedule, steps, options):
    ab = _alpha_bar(schedule)
    options = dict(options)
    spacing, offset = options.pop("spacing", "linspace"), options.pop("steps_offset", 0)
    prediction = options.get("prediction", "eps")
    plan = unipc_tables.plan(ab, steps, spacing=spacing, steps_offset=offset, **options)
    assert plan.coef.dtype == torch.float64 and len(plan) == steps and plan.timesteps.dtype == torch.int64
    assert (plan.sigmas[-1] == 0) == (options.get("final_sigmas_type", "zero") == "zero")
    assert not any(plan.noisy)
    opts = {k: v for k, v in options.items() if k not in ("karras", "final_sigmas_type", "prediction")}
    if "corrector" in opts:
        opts["corrector_off"] = () if opts.pop("corrector") else tuple(range(steps))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = unipc64(plan.sigmas, plan.timesteps, x, toy, prediction=prediction, **opts)
    sampler = samplers.Sampler(ab, kind="unipc", steps=steps, spacing=spacing, steps_offset=offset,
                               backend="reference", **options)
    for i in range(steps):
        x = sampler.step(x, toy(x, sampler.timesteps[i]), i)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, expected[i], rtol=1e-10, atol=1e-10)


def test_native_timesteps_and_sigmas():
    ab = _alpha_bar("linear")
    p = unipc_tables.plan(ab, 10)
    assert p.timesteps.tolist() == np.linspace(0, 999, 11).round()[::-1][:-1].astype(int).tolist()
    sig = ((1 - ab) / ab).sqrt()
    torch.testing.assert_close(p.sigmas[:-1], sig[p.timesteps], rtol=0, atol=0)
    p = unipc_tables.plan(ab, 10, spacing="leading", steps_offset=1)
    assert p.timesteps.tolist() == [t * (1000 // 11) + 1 for t in range(10, 0, -1)]
    p = unipc_tables.plan(ab, 10, final_sigmas_type="sigma_min")
    assert float(p.sigmas[-1]) == float(sig[0])
    # order 3 with the corrector reads the last sample and three model outputs
    p = unipc_tables.plan(ab, 10, order=3)
    assert p.uses_last and p.depth == 3 and p.outputs == ("prev", "last", "m")
    assert [p.n_history(i) for i in range(5)] == [0, 2, 3, 4, 4]
    p = unipc_tables.plan(ab, 10, order=1, corrector=False)
    assert not p.uses_last and p.depth == 0 and p.outputs == ("prev",)


@pytest.mark.parametrize("bad,match", [
    (dict(order=4), "order"), (dict(order=0), "order"), (dict(variant="bh3"), "variant"),
    (dict(final_sigmas_type="one"), "final_sigmas_type"), (dict(prediction="epsilon"), "prediction"),
    (dict(corrector=1), "corrector"), (dict(karras="yes"), "karras"), (dict(spacing="middle"), "spacing"),
    (dict(spacing="linspace", steps_offset=1), "steps_offset"), (dict(spacing="leading", steps_offset=900), "outside"),
])
def test_native_plan_validates(bad, match):
    with pytest.raises(ValueError, match=match):
        unipc_tables.plan(_alpha_bar("linear"), 10, **bad)


# ---- (2) the drop-in against diffusers' own class, step by step -------------------------------

DROPIN = [
    dict(),
    dict(solver_order=3),
    dict(solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(predict_x0=False, final_sigmas_type="sigma_min", solver_order=3),
    dict(predict_x0=False, final_sigmas_type="sigma_min", prediction_type="sample", solver_type="bh1"),
    dict(predict_x0=False, prediction_type="v_prediction"),  # bh2: diffusers' last step is NaN; checked below
    dict(prediction_type="sample", solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_type="bh1"),
    dict(disable_corrector=[0, 3, 4], solver_order=3),
    dict(use_karras_sigmas=True, solver_order=3),
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", beta_schedule="scaled_linear",
         beta_start=0.00085, beta_end=0.012),
    dict(thresholding=True, prediction_type="sample", dynamic_thresholding_ratio=0.9, sample_max_value=1.2),
    dict(thresholding=True, predict_x0=False, final_sigmas_type="sigma_min"),  # thresholding unused: eps
    dict(timestep_spacing="leading", steps_offset=1, beta_schedule="squaredcos_cap_v2"),
    dict(timestep_spacing="trailing", solver_order=3, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
]


def _loop(ref, fd, steps, x, *, check=True, rtol=1e-5, atol=1e-5):
    ref.set_timesteps(steps)
    fd.set_timesteps(steps)
    assert torch.equal(ref.timesteps, fd.timesteps) and ref.timesteps.dtype == fd.timesteps.dtype
    assert torch.equal(ref.sigmas, fd.sigmas) and fd.init_noise_sigma == ref.init_noise_sigma
    xa, xb, results = x.clone(), x.clone(), []
    for t in ref.timesteps:
        a = ref.step(toy(xa, t), t, xa).prev_sample
        b = fd.step(toy(xb, t), t, xb).prev_sample
        assert b.dtype == a.dtype and torch.isfinite(b).all()
        if check:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol * (1 + float(a.abs().max())))
        results.append(b)
        xa, xb = a, b
    return results


def _ids(configs):
    return [",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in configs]


# the whole matrix on the default backend; a few configs (history of depth 3 with the last
# sample, thresholding, eps updates) on every backend
@pytest.mark.parametrize("backend,config",
                         [("auto", c) for c in DROPIN]
                         + [(b, DROPIN[k]) for b in BACKENDS for k in (9, 12, 4)],
                         ids=[f"auto-{i}" for i in _ids(DROPIN)]
                         + [f"{b}-{i}" for b in BACKENDS for i in _ids([DROPIN[k] for k in (9, 12, 4)])])
def test_dropin_against_diffusers(monkeypatch, backend, config):
    if backend != "auto":
        _backend_scope(monkeypatch, backend)
    ref, fd = diffusers.UniPCMultistepScheduler(**config), UniPCMultistepScheduler(**config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    last_nan = not config.get("predict_x0", True) and config.get("final_sigmas_type", "zero") == "zero"
    steps = 12 if "thresholding" not in config else 10
    if last_nan:  # diffusers' last step is NaN: compare the others, the last against float64 below
        ref.set_timesteps(steps)
        got = _loop(ref, fd, steps, x, check=False)
        ref.set_timesteps(steps)
        xa = x.clone()
        for k, t in enumerate(ref.timesteps[:-1]):
            xa = ref.step(toy(xa, t), t, xa).prev_sample
            torch.testing.assert_close(got[k], xa, rtol=1e-5, atol=1e-5 * (1 + float(xa.abs().max())))
        return
    _loop(ref, fd, steps, x)


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(predict_x0=False),
                                    dict(predict_x0=False, solver_type="bh1", prediction_type="sample"),
                                    dict(solver_order=2, lower_order_final=False, prediction_type="v_prediction"),
                                    dict(solver_order=3, lower_order_final=False, use_karras_sigmas=True,
                                         final_sigmas_type="sigma_min")])
def test_dropin_finite_where_diffusers_is_not(config):
    """bh1 or predict_x0=False into sigma 0 (diffusers: NaN), order 2 into sigma 0 (diffusers: inf or
    NaN), order 3 over h = 0 (karras with sigma_min: the last two sigmas equal; diffusers: NaN): the
    drop-in gives the finite limit, equal to the float64 run."""
    steps = 10
    ref, fd = diffusers.UniPCMultistepScheduler(**config), UniPCMultistepScheduler(**config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref.set_timesteps(steps)
    xa = x.clone()
    for t in ref.timesteps:
        xa = ref.step(toy(xa, t), t, xa).prev_sample
    assert not torch.isfinite(xa).all()  # diffusers' bug, which the drop-in fixes
    got = _loop(ref, fd, steps, x, check=False)
    expected = unipc64(fd.sigmas.double(), fd.timesteps, x, toy, prediction=PRED[fd.config.prediction_type],
                       order=fd.config.solver_order, variant=fd.config.solver_type, predict_x0=fd.config.predict_x0,
                       lower_order_final=fd.config.lower_order_final)
    for k in range(steps):
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5,
                                   atol=1e-5 * (1 + float(expected[k].abs().max())))


def test_dropin_half_precision():
    ref, fd = diffusers.UniPCMultistepScheduler(solver_order=3), UniPCMultistepScheduler(solver_order=3)
    ref.set_timesteps(10)
    fd.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xa, xb = x.clone(), x.half()
    for t in ref.timesteps:
        xa = ref.step(toy(xa, t), t, xa).prev_sample
        xb = fd.step(toy(xb.float(), t).half(), t, xb).prev_sample
        assert xb.dtype == torch.float16
        torch.testing.assert_close(xb.float(), xa, rtol=1e-2, atol=1e-2 * (1 + float(xa.abs().max())))


def test_dropin_begin_index_midway():
    """A run that starts at step k (img2img, set_begin_index): diffusers' warm-up starts there."""
    ref, fd = diffusers.UniPCMultistepScheduler(solver_order=3), UniPCMultistepScheduler(solver_order=3)
    ref.set_timesteps(12)
    fd.set_timesteps(12)
    ref.set_begin_index(4)
    fd.set_begin_index(4)
    xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps[4:]:
        xa = ref.step(toy(xa, t), t, xa).prev_sample
        xb = fd.step(toy(xb, t), t, xb).prev_sample
        torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5 * (1 + float(xa.abs().max())))


# ---- (3) config, state, inputs, unsupported options ------------------------------------------

def test_from_config_and_state():
    ref = diffusers.UniPCMultistepScheduler(solver_order=3, solver_type="bh1", use_karras_sigmas=True,
                                           final_sigmas_type="sigma_min")
    fd = UniPCMultistepScheduler.from_config(ref.config)
    assert type(fd) is UniPCMultistepScheduler and isinstance(fd, diffusers.UniPCMultistepScheduler)
    assert fd.config.solver_order == 3 and fd.config.solver_type == "bh1" and fd.config.use_karras_sigmas
    back = diffusers.UniPCMultistepScheduler.from_config(fd.config)
    assert back.config.solver_order == 3
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    first = _loop(ref, fd, 8, x)
    # set_timesteps resets the history: a second run equals the first
    second = _loop(ref, fd, 8, x)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # inputs not modified; return_dict=False is diffusers' 1-tuple; scale_model_input is the identity
    fd.set_timesteps(8)
    t = fd.timesteps[0]
    s, o = x.clone(), toy(x, t)
    o_copy = o.clone()
    assert torch.equal(fd.scale_model_input(s, t), s)
    res = fd.step(o, t, s, return_dict=False)
    assert isinstance(res, tuple) and len(res) == 1
    assert torch.equal(s, x) and torch.equal(o, o_copy)
    res2 = fd.step(toy(res[0], fd.timesteps[1]), fd.timesteps[1], res[0])
    assert isinstance(res2, diffusers.schedulers.scheduling_utils.SchedulerOutput)


@pytest.mark.parametrize("option,value", [
    ("use_exponential_sigmas", True), ("use_beta_sigmas", True), ("use_flow_sigmas", True),
    ("use_dynamic_shifting", True), ("prediction_type", "flow_prediction"), ("solver_order", 4),
])
def test_unsupported_options_raise(option, value):
    with pytest.raises(NotImplementedError, match=option):
        UniPCMultistepScheduler(**{option: value})
    cfg = dict(diffusers.UniPCMultistepScheduler().config)
    cfg.pop("_use_default_values", None)  # else from_config drops the keys that took defaults
    cfg[option] = value
    with pytest.raises(NotImplementedError, match=option):
        UniPCMultistepScheduler.from_config(cfg)


def test_solver_p_raises():
    with pytest.raises(NotImplementedError, match="solver_p"):
        UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler())


def test_step_order_enforced():
    fd = UniPCMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        fd.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    fd.set_timesteps(6)
    x = torch.zeros(SHAPE)
    for t in fd.timesteps:
        x = fd.step(toy(x, t), t, x).prev_sample
    with pytest.raises((ValueError, IndexError)):
        fd.step(toy(x, 0), fd.timesteps[-1], x)


# ---- (4) the native sampler against the drop-in loop ------------------------------------------

@pytest.mark.parametrize("native,config", [
    (dict(), dict()),
    (dict(order=3, variant="bh1", final_sigmas_type="sigma_min"),
     dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    (dict(prediction="v", predict_x0=False, final_sigmas_type="sigma_min", spacing="leading", steps_offset=1),
     dict(prediction_type="v_prediction", predict_x0=False, final_sigmas_type="sigma_min",
          timestep_spacing="leading", steps_offset=1)),
    (dict(karras=True, order=3, corrector=False), dict(use_karras_sigmas=True, solver_order=3,
                                                       disable_corrector=list(range(12)))),
    (dict(threshold=0.9, threshold_max=1.5, prediction="x0", spacing="trailing"),
     dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample",
          timestep_spacing="trailing")),
])
def test_native_sample_equals_dropin(native, config):
    steps = 12
    fd = UniPCMultistepScheduler(**config)
    # the diffusion's schedule: diffusers' float32 alphas_cumprod, as float64 betas
    ab = fd.alphas_cumprod.double()
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    diffusion = fastddpm.DenoiseDiffusion(lambda x, t: toy(x, t), 1000, schedule=betas,
                                          prediction=native.pop("prediction", "eps"))
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    got = diffusion.sample(x_T, kind="unipc", steps=steps, **native)
    fd.set_timesteps(steps)
    x = x_T.clone()
    for t in fd.timesteps:
        x = fd.step(toy(x, t.expand(x.shape[0])), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5 * (1 + float(x.abs().max())))
