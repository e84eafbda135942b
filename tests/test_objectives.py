"""Prediction types (eps, x0, v), min-SNR and per-t loss weights, against float64 math written here."""
import math

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import objectives, ops, philox, schedule
from helpers import cpu_backends, device_for, kernel_backends, mse_tol, tol

N = 37
PREDICTIONS = ("eps", "x0", "v")
SHAPES = ((5,), (3, 7), (2, 3, 19, 23))  # D = 1, 7, 1311: odd, the last over a Triton block
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Recorder(nn.Module):
    """out = 0.5 x_t + w (a parameter, so the loss has a gradient); keeps each call's input and output."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(shape[1:], generator=g, dtype=torch.float64).to(device, dtype))
        self.calls = []

    def forward(self, x, t):
        out = 0.5 * x + self.w
        out.retain_grad() if out.requires_grad else None
        self.calls.append((x.detach(), out))
        return out


def _ab64(d):
    return d._tables64["alpha_bar"]


def _drawn(seed_gen_seed, batch, shape, offset, device):
    """The seed loss draws from a Generator seeded so, and its t and noise (the contract's stream)."""
    seed = torch.randint(2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator(device).manual_seed(seed_gen_seed),
                         device=device)
    return philox.timesteps(seed, batch, N, offset), philox.normal(seed, offset, shape, device)


def _target64(prediction, x0, noise, t, ab):
    a = ab[t.long().cpu()].view((-1,) + (1,) * (x0.dim() - 1)).to(x0.device)
    x0, noise = x0.double(), noise.double()
    return {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]


# ---- tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_float64(prediction):
    ab = schedule.coefficient_tables(schedule.cosine(50))["alpha_bar"]
    got = objectives.min_snr_weights(prediction, ab, 5.0)
    expect = []
    for a in ab.tolist():
        snr = a / (1 - a)
        m = min(snr, 5.0)
        expect.append({"eps": m / snr, "x0": m, "v": m / (snr + 1)}[prediction])
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_eps_tables_invert_the_forward_process(prediction):
    # eps = ex x_t + eout out holds for the exact out of each type (float64).
    ab = schedule.coefficient_tables(schedule.linear(N))["alpha_bar"]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randn(N, 4, generator=g, dtype=torch.float64)
    a = ab[:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = x0 if prediction == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0
    ex, eout = objectives.eps_tables(prediction, ab)
    torch.testing.assert_close(ex[:, None] * x_t + eout[:, None] * out, eps, rtol=1e-9, atol=1e-9)


# ---- loss: every backend x prediction x dtype x shape, given and drawn noise ---------------------

@pytest.mark.parametrize("weighting", [None, "min_snr", "table"])
@pytest.mark.parametrize("drawn", [False, True], ids=["noise_given", "noise_drawn"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_loss_against_float64(backend, prediction, drawn, weighting, poisoned):
    device = device_for(backend)
    for shape in SHAPES:
        for dtype in DTYPES:
            model = Recorder(shape, dtype, device)
            d = fastddpm.DenoiseDiffusion(model, N, schedule="cosine", backend=backend, prediction=prediction)
            g = torch.Generator().manual_seed(shape[0] + 7)
            x0 = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
            offset = 5
            if drawn:
                t, noise = _drawn(11, shape[0], shape, offset, device)
                kwargs = dict(generator=torch.Generator(device).manual_seed(11))
            else:
                t = torch.randint(N, (shape[0],), generator=g).to(device)
                noise = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
                kwargs = dict(noise=noise, t=t)
            w64 = None
            if weighting == "min_snr":
                w64 = objectives.min_snr_weights(prediction, _ab64(d), 3.0)
                kwargs.update(weighting="min_snr", min_snr_gamma=3.0)
            elif weighting == "table":
                w64 = torch.rand(N, generator=g, dtype=torch.float64) * 2
                kwargs.update(weighting=w64.to(device, torch.float32 if dtype != torch.float64 else dtype))
                w64 = kwargs["weighting"].double().cpu()
            per = d.loss(x0, reduction="none", sample_offset=offset, **kwargs)
            (_, out), = model.calls
            target = _target64(prediction, x0, noise, t, _ab64(d))
            expect = (out.detach().double() - target).pow(2).reshape(shape[0], -1).mean(1)
            if w64 is not None:
                expect = expect * w64[t.long().cpu()].to(device)
            assert per.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            what = f"{backend} {prediction} {dtype} {shape}"
            torch.testing.assert_close(per.double(), expect, **mse_tol(dtype, drawn), msg=what)


# ---- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("backend", kernel_backends())
def test_loss_gradients_match_reference(backend, prediction):
    device = device_for(backend)
    shape = (3, 5, 7, 3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        grads = []
        for b in ("reference", backend):
            model = Recorder(shape, dtype, device)
            d = fastddpm.DenoiseDiffusion(model, N, backend=b, prediction=prediction)
            x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            x0 = x0.to(device, dtype).requires_grad_()
            loss = d.loss(x0, generator=torch.Generator(device).manual_seed(5), weighting="min_snr")
            loss.backward()
            grads.append((model.w.grad.double(), x0.grad.double()))
        for ref, got in zip(*grads):
            torch.testing.assert_close(got, ref, **tol(dtype, drawn=True), msg=f"{backend} {prediction} {dtype}")


@pytest.mark.parametrize("backend", [b for b in cpu_backends()])
def test_target_mse_gradcheck(backend):
    tabs = schedule.coefficient_tables(schedule.linear(N))
    cx0, ceps = objectives.target_tables("v", tabs["alpha_bar"])
    g = torch.Generator().manual_seed(2)
    # Four samples at four steps, two elements each: gradcheck perturbs every element (and the
    # triton backend runs in Triton's interpreter here), so the shape is kept small.
    pred = torch.randn(4, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(4, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, N - 1, 5, 17])
    seed = torch.tensor([123], dtype=torch.int64)
    fn = lambda p, x: ops.target_mse(p, x, t, cx0, ceps, seed=seed, sample_offset=7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred, x0))


# ---- no noise-sized tensor saved ------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", kernel_backends())
def test_fused_loss_saves_no_noise_for_each_prediction(backend, dtype, prediction):
    from test_saved_tensors import SHAPE, fuses_grad, measure_saved, new_bytes_allowed

    new, alias, what = measure_saved(backend, SHAPE, dtype, device_for(backend), prediction=prediction)
    batch, d = SHAPE[0], math.prod(SHAPE[1:])
    # The x0 target is x0 itself; the v target is made from the noise (kept once on the cpu backend).
    lo, hi = new_bytes_allowed(backend, dtype, SHAPE, target_uses_noise=prediction == "v",
                               fused_grad=fuses_grad(backend, dtype, prediction))
    assert lo <= new <= hi, f"{backend} {prediction} saved {new} new bytes: {what}"
    assert alias >= batch * d * dtype.itemsize


# ---- p_sample and the samplers read the prediction type ---------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("backend", ["reference", *kernel_backends()])
def test_p_sample_reads_the_prediction(backend, prediction, poisoned):
    device = device_for(backend)
    shape = (4, 3, 7)
    for dtype in (torch.float32, torch.float64):
        model = Recorder(shape, dtype, device)
        d = fastddpm.DenoiseDiffusion(model, N, backend=backend, prediction=prediction)
        g = torch.Generator().manual_seed(4)
        x_t = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        z = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        t = torch.tensor([0, 1, 20, N - 1], device=device)
        got = d.p_sample(x_t, t, z)
        out = model.calls[0][1].double()
        ab = _ab64(d)[t.cpu()].view(-1, 1, 1).to(device)
        x, beta = x_t.double(), d._tables64["beta"][t.cpu()].view(-1, 1, 1).to(device)
        eps = {"eps": out, "x0": (x - ab.sqrt() * out) / (1 - ab).sqrt(), "v": (1 - ab).sqrt() * x + ab.sqrt() * out}
        expect = (x - beta / (1 - ab).sqrt() * eps[prediction]) / (1 - beta).sqrt() + beta.sqrt() * z.double()
        # x0 prediction at t=0 divides by sqrt(1 - ab_0) = 0.01: 100x the float32 rounding of out.
        scale = 100 if prediction == "x0" and dtype == torch.float32 else 1
        t_ = tol(dtype)
        torch.testing.assert_close(got.double(), expect, rtol=t_["rtol"] * scale, atol=t_["atol"] * scale)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sampler_defaults_to_the_class_prediction(prediction, monkeypatch):
    d = fastddpm.DenoiseDiffusion(lambda x, t: torch.zeros_like(x), 20, prediction=prediction)
    assert d.sampler(steps=5).prediction == prediction
    assert d.sampler(steps=5, prediction="eps").prediction == "eps"
    seen = []
    monkeypatch.setattr(fastddpm.samplers, "sample", lambda diffusion, shape, **options: seen.append(options))
    d.sample((2, 3), steps=4)
    d.sample((2, 3), sampler=d.sampler(steps=4))  # a given sampler keeps its own
    assert seen == [dict(steps=4, prediction=prediction), dict(sampler=seen[1]["sampler"])]


# ---- bad arguments ---------------------------------------------------------------------------------

def test_objective_arguments_are_checked():
    m = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="prediction must be one of"):
        fastddpm.DenoiseDiffusion(m, N, prediction="sample")
    d = fastddpm.DenoiseDiffusion(m, N)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="weighting must be None, 'min_snr'"):
        d.loss(x, weighting="snr")
    with pytest.raises(ValueError, match="min_snr_gamma must be a finite number > 0"):
        d.loss(x, weighting="min_snr", min_snr_gamma=0)
    with pytest.raises(ValueError, match="1-D tensor of n_steps = 37"):
        d.loss(x, weighting=torch.ones(36))
    with pytest.raises(ValueError, match="must be finite"):
        d.loss(x, weighting=torch.full((N,), float("nan")))
    with pytest.raises(ValueError, match=r"must be >= 0, got -1.0 at t=3"):
        d.loss(x, weighting=torch.ones(N).index_fill(0, torch.tensor([3]), -1.0))
    with pytest.raises(TypeError, match="weighting must be None"):
        d.loss(x, weighting=[1.0] * N)
