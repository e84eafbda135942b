"""DenoiseDiffusion's learned variance (learned_variance=, loss(objective=, vb_weight=), p_sample,
sample, calc_bpd) against the float64 ADM of test_adm, on every backend."""
import pytest
import torch

import fastddpm

from backends_under_test import device_for, kernel_backends
from helpers import seeded_loss
from fastddpm import DenoiseDiffusion
from fastddpm.adm import LossType, ModelMeanType, ModelVarType
from test_adm import SHAPE, RefADM, close_per_sample, data, grad_weight, linear_betas, nets

BACKENDS = kernel_backends() + ["reference"]
T = 100
VARS = {"range": ModelVarType.LEARNED_RANGE, "log": ModelVarType.LEARNED}
MEANS = {"eps": ModelMeanType.EPSILON, "x0": ModelMeanType.START_X}


def make(lv, prediction, backend, loss=LossType.MSE):
    var = VARS[lv]
    net, rnet = nets(var)
    d = DenoiseDiffusion(net, T, "cpu", schedule=torch.from_numpy(linear_betas(T)), backend=backend,
                         prediction=prediction, learned_variance=lv)
    return d, net, rnet, RefADM(linear_betas(T), MEANS[prediction], var, loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [None, "hybrid", "kl", "simple"])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
@pytest.mark.parametrize("lv", ["range", "log"])
def test_loss_matches_adm(lv, prediction, objective, backend):
    device_for(backend)
    d, net, rnet, ref = make(lv, prediction, backend, LossType.KL if objective == "kl" else LossType.MSE)
    x0, t = data(), torch.tensor([0, 1, 50, 99])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = d.loss(x0, noise, t=t, reduction="none", objective=objective)
    terms = ref.training_losses(rnet, x0.double(), t, noise.double())
    want = terms["mse"] if objective == "simple" else terms["loss"]
    close_per_sample(got.double(), want.detach(), t, backend)
    w = grad_weight(t, backend)
    (got.double() * w).sum().backward()
    (want * w).sum().backward()
    for p, rp in zip(net.parameters(), rnet.parameters()):
        err, scale = (p.grad.double() - rp.grad).abs().max().item(), rp.grad.abs().max().item()
        assert err <= 1e-4 * scale + 1e-6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_vb_weight_and_mean_reduction(backend):
    d, net, rnet, ref = make("range", "eps", backend)
    x0, t = data(), torch.tensor([0, 1, 50, 99])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    terms = ref.training_losses(rnet, x0.double(), t, noise.double())
    # More weights than the module keeps coefficient tensors for (a weight changed every step),
    # then the first again; float64 data makes a float64 coefficient.
    for w in (0.25, 1.0, 0.0, 3.0, *[0.1 * i for i in range(1, 10)], 0.25):
        got = d.loss(x0, noise, t=t, vb_weight=w)
        torch.testing.assert_close(got.double(), (terms["mse"] + w * terms["vb"]).mean().detach(), rtol=2e-5,
                                   atol=2e-5)
    got = d.to(torch.float64).loss(x0.double(), noise.double(), t=t, vb_weight=0.5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, (terms["mse"] + 0.5 * terms["vb"]).mean().detach(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
@pytest.mark.parametrize("lv", ["range", "log"])
def test_loss_common_call_equals_the_general_path(lv, prediction, backend, dtype, monkeypatch):
    # loss(x0) of a learned variance (hybrid, vb_weight 1) takes one tested path (it resolves no
    # backend: it found it with the tables); sample_offset=0 (the default's value), vb_weight=1
    # (an int) and objective="hybrid" take the general one: the same bits.
    d, net, _, _ = make(lv, prediction, backend)
    d = d.to(dtype)
    x0 = data().to(dtype)
    params = list(d.eps_model.parameters())
    resolve, calls = fastddpm.backends.resolve, []
    monkeypatch.setattr(fastddpm.backends, "resolve", lambda *a: calls.append(a) or resolve(*a))
    hot, hot_grads = seeded_loss(d, x0, 5, params)
    assert calls == []
    for kwargs in (dict(sample_offset=0), dict(vb_weight=1), dict(objective="hybrid")):
        general, general_grads = seeded_loss(d, x0, 5, params, **kwargs)
        assert torch.equal(hot, general), kwargs
        for g, w in zip(hot_grads, general_grads):
            assert torch.equal(g, w), kwargs
    assert len(calls) == 3
    other, _ = seeded_loss(d, x0, 5, params, vb_weight=0.5)
    assert other != hot  # the weight is applied


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", ["eps", "x0"])
@pytest.mark.parametrize("lv", ["range", "log"])
def test_p_sample_uses_the_learned_variance(lv, prediction, backend):
    device_for(backend)
    d, net, rnet, ref = make(lv, prediction, backend)
    x, t = torch.randn(SHAPE), torch.tensor([0, 3, 50, 99])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = d.p_sample(x, t, noise)
        mean, lv_, _ = ref.pmv(rnet(x.double(), t), x.double(), t, False)
    mask = (t != 0).double().view(-1, 1, 1, 1)
    torch.testing.assert_close(got.double(), mean + mask * torch.exp(0.5 * lv_) * noise.double(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_and_bpd_run(backend):
    device_for(backend)
    d, net, _, _ = make("range", "eps", backend)
    d2 = DenoiseDiffusion(net, 10, "cpu", schedule="cosine", backend=backend, learned_variance="range")
    g = torch.Generator().manual_seed(0)
    x = d2.sample((2, 2, 3, 3), generator=g)
    again = d2.sample((2, 2, 3, 3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, again)
    assert torch.isfinite(d2.sample((2, 2, 3, 3), kind="ddim", steps=5)).all()
    bpd = d2.calc_bpd(data((2, 2, 3, 3)))
    assert bpd["vb"].shape == (2, 10) and torch.isfinite(bpd["total_bpd"]).all()


def test_errors():
    with pytest.raises(ValueError, match="learned_variance must be one of"):
        DenoiseDiffusion(nets(ModelVarType.LEARNED_RANGE)[0], T, "cpu", learned_variance="learned")
    with pytest.raises(ValueError, match="prediction='eps' or 'x0'"):
        DenoiseDiffusion(nets(ModelVarType.LEARNED_RANGE)[0], T, "cpu", learned_variance="range", prediction="v")
    d = DenoiseDiffusion(lambda x, t: x, T, "cpu", learned_variance="range")
    with pytest.raises(ValueError, match=r"eps_model's output has shape \(4, 2, 3, 3\), expected \(4, 4, 3, 3\)"):
        d.loss(data())
    with pytest.raises(ValueError, match="4 channels"):
        d.p_sample(data(), 5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\)"):
        d.p_sample(data(), -1)
    plain = DenoiseDiffusion(lambda x, t: x, T, "cpu")
    with pytest.raises(ValueError, match="objective='hybrid' needs a learned variance"):
        plain.loss(data(), objective="hybrid")
    with pytest.raises(ValueError, match="objective must be one of"):
        plain.loss(data(), objective="vlb")
    with pytest.raises(ValueError, match="vb_weight"):
        d.loss(data(), vb_weight=-1.0)
    assert torch.isfinite(plain.loss(data(), objective="kl"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lv", ["range", "log"])
def test_respaced_ddpm_sampler_steps_with_the_learned_variance(lv, backend):
    """sampler("ddpm", steps) with a learned variance: each step of the respaced chain against
    float64 math written here (improved DDPM's respaced posterior, its log variance interpolated
    per element, no noise at the last step); DDIM reads the mean channels only."""
    device = device_for(backend)
    d = DenoiseDiffusion(lambda x, t: x, T, "cpu", backend=backend, learned_variance=lv).to(device)
    s = d.sampler("ddpm", 7, spacing="trailing")
    ab = torch.cumprod(1 - fastddpm.schedule.linear(T), 0)  # the schedule itself is not under test
    g = torch.Generator().manual_seed(3)
    x, eps, v, z = (torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    v = v.clamp(-1, 1)
    ts = s.timesteps.tolist()
    for i, t in enumerate(ts):
        a, a_prev = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a / a_prev
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x
        tilde = (1 - a_prev) / (1 - a) * beta
        logvar = v if lv == "log" else (v + 1) / 2 * beta.log() + (1 - v) / 2 * tilde.log()
        want = mean + (torch.exp(0.5 * logvar) * z if i + 1 < len(ts) else 0)
        out = torch.cat([eps, v], 1).float().to(device)
        got = s.step(x.float().to(device), out, i, noise=z.float().to(device))
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="learned variance"):
        s.step(x.float().to(device), eps.float().to(device), 0)  # C channels where 2C are needed
    ddim = d.sampler("ddim", 7)
    plain = DenoiseDiffusion(lambda x, t: x, T, "cpu", backend=backend).to(device).sampler("ddim", 7)
    out = torch.cat([eps, v], 1).float().to(device)
    torch.testing.assert_close(ddim.step(x.float().to(device), out, 2), plain.step(x.float().to(device),
                                                                                  eps.float().to(device), 2))


class _TwoC(torch.nn.Module):
    """A learned-variance model: w * x for the mean channels, tanh(v x) for the variance ones."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.v = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return torch.cat([self.w * x, torch.tanh(self.v * x)], 1)


def test_hybrid_loss_and_learned_p_sample_compile_fullgraph():
    """The hybrid loss (one vlb_loss forward and backward) and a learned-variance p_sample (one
    solver_step with var) compile without graph breaks on the cpu backend and give eager's
    numbers and gradients (the reference's in-graph Philox takes inductor minutes: not here)."""
    torch._dynamo.reset()
    d = DenoiseDiffusion(_TwoC(), 50, "cpu", backend="cpu", learned_variance="range")
    x = torch.rand(4, 2, 3, 3) * 2 - 1
    results = []
    for fn in (lambda x: d.loss(x), torch.compile(lambda x: d.loss(x), fullgraph=True)):
        torch.manual_seed(1)
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), d.eps_model.w.grad.clone(), d.eps_model.v.grad.clone()))
        d.eps_model.w.grad = d.eps_model.v.grad = None
    torch.testing.assert_close(results[0], results[1])
    step = torch.compile(lambda x: d.p_sample(x, 7), fullgraph=True)
    with torch.no_grad():  # a fused sampling step has no backward (the model's weights require grad)
        torch.manual_seed(2)
        expect = d.p_sample(x, 7)
        torch.manual_seed(2)
        torch.testing.assert_close(step(x), expect)


def test_learned_variance_needs_a_channel_dimension():
    """With a learned variance the model's 2C channels are counted on dim 1: data of rank 1 has
    none, and says so (it used to fail with an IndexError)."""
    d = fastddpm.DenoiseDiffusion(lambda x, t: torch.cat([x, x]), 20, learned_variance="range")
    with pytest.raises(ValueError, match=r"the data must have a channel dimension \(rank >= 2\)"):
        d.loss(torch.randn(4))
    with pytest.raises(ValueError, match=r"expected \(2, 6, 5\): 6 channels on dim 1"):
        fastddpm.DenoiseDiffusion(lambda x, t: x, 20, learned_variance="log").loss(torch.randn(2, 3, 5))
