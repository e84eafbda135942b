"""DenoiseDiffusion on every available backend against labml's formulas in float64."""
import pytest
import torch
from torch import nn

import fastddpm
import np_philox
from helpers import TOL  # (rtol, atol) of a result against float64 math, for the result's dtype

BACKENDS = fastddpm.available_backends()
N = 50
DTYPES = list(TOL)


class Eps(nn.Module):
    """A tiny eps-model for any rank: depends on x, t and one learnable scale."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t):
        tt = t.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return torch.tanh(self.w.to(x.dtype) * x) + 0.01 * tt


def f64(n=N):
    """labml's schedule quantities in float64, computed here from first principles."""
    beta = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    alpha = 1 - beta
    return beta, alpha, torch.cumprod(alpha, 0)


def per_sample(v, t, like):
    return v[t.long()].view((-1,) + (1,) * (like.dim() - 1))


def close(got, expect, dtype):
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expect, **TOL[dtype])


def make(backend, n=N):
    return fastddpm.DenoiseDiffusion(Eps(), n, backend=backend)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


SHAPES = [(5,), (3, 7), (2, 3, 5), (3, 3, 5, 7), (1, 2, 3, 4, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_with_noise(backend, dtype, shape):
    d = make(backend)
    x0 = torch.randn(shape).to(dtype)
    eps = torch.randn(shape).to(dtype)
    t = torch.randint(0, N, (shape[0],))
    _, _, ab = f64()
    expect = per_sample(ab.sqrt(), t, x0) * x0.double() + per_sample((1 - ab).sqrt(), t, x0) * eps.double()
    close(d.q_sample(x0, t, eps), expect, dtype)
    close(d.q_sample(x0, t, eps=eps), expect, dtype)  # labml's keyword


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_xt_x0(dtype):
    d = make("reference")
    x0 = torch.randn(4, 3, 5).to(dtype)
    t = torch.tensor([0, 3, 49, 20])
    _, _, ab = f64()
    mean, var = d.q_xt_x0(x0, t)
    close(mean, per_sample(ab.sqrt(), t, x0) * x0.double(), dtype)
    torch.testing.assert_close(var.double(), per_sample(1 - ab, t, x0), rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_p_sample_with_noise(backend, dtype, shape):
    d = make(backend)
    x = torch.randn(shape).to(dtype)
    z = torch.randn(shape).to(dtype)
    t = torch.randint(0, N, (shape[0],))
    beta, alpha, ab = f64()
    eps_theta = d.eps_model(x, t).double()  # the module runs the model in x's dtype
    mean = per_sample(alpha.rsqrt(), t, x) * (x.double() - per_sample(beta / (1 - ab).sqrt(), t, x) * eps_theta)
    close(d.p_sample(x, t, z), mean + per_sample(beta.sqrt(), t, x) * z.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_with_noise_and_t(backend, dtype):
    d = make(backend)
    x0 = torch.randn(6, 2, 3, 5).to(dtype)
    eps = torch.randn_like(x0)
    t = torch.randint(0, N, (6,))
    _, _, ab = f64()
    x_t = (per_sample(ab.sqrt(), t, x0) * x0.double() + per_sample((1 - ab).sqrt(), t, x0) * eps.double()).to(dtype)
    eps_theta = d.eps_model(x_t, t).double()
    per = ((eps.double() - eps_theta) ** 2).reshape(6, -1).mean(1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = d.loss(x0, eps, t=t, reduction="none")
    assert got.shape == (6,)
    close(got, per, acc)
    close(d.loss(x0, eps, t=t), per.mean(), acc)


def test_loss_draws_t_and_noise_from_the_contract_stream(backend):
    d = make(backend)
    x0 = torch.randn(7, 3, 5)
    gen = torch.Generator().manual_seed(123)
    got = d.loss(x0, generator=gen, reduction="none")
    seed = int(torch.randint(2**63 - 1, (1,), generator=torch.Generator().manual_seed(123)))
    t = torch.tensor(np_philox.timesteps(seed, 0, 7, N))
    noise = torch.from_numpy(np_philox.normals(seed, 0, 7, 15)).reshape(7, 3, 5)
    _, _, ab = f64()
    x_t = (per_sample(ab.sqrt(), t, x0) * x0.double() + per_sample((1 - ab).sqrt(), t, x0) * noise).float()
    expect = ((noise - d.eps_model(x_t, t).double()) ** 2).reshape(7, -1).mean(1)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)


def test_loss_gradients_match_float64_autograd(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12))

    class M(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x.reshape(x.shape[0], -1)).reshape(x.shape) + 1e-3 * t.view(-1, 1, 1).to(x.dtype)

    d = fastddpm.DenoiseDiffusion(M(model), N, backend=backend)
    x0, eps = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    t = torch.tensor([0, 10, 20, 30, 49])
    d.loss(x0, eps, t=t).backward()
    got = [p.grad.clone() for p in model.parameters()]

    m64 = M(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12))).double()
    m64.net.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, _, ab = f64()
    x_t = per_sample(ab.sqrt(), t, x0) * x0.double() + per_sample((1 - ab).sqrt(), t, x0) * eps.double()
    ((eps.double() - m64(x_t, t)) ** 2).mean().backward()
    for g, p in zip(got, m64.net.parameters()):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g.double(), p.grad, rtol=1e-4, atol=1e-6)


def test_manual_seed_reproduces_every_method(backend):
    d = make(backend)
    x = torch.randn(4, 3, 6)
    t = torch.tensor([1, 5, 9, 49])
    for call in (lambda: d.q_sample(x, t), lambda: d.p_sample(x, t), lambda: d.loss(x, reduction="none")):
        torch.manual_seed(42)
        a = call()
        torch.manual_seed(42)
        b = call()
        c = call()  # no reseed: fresh noise
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


def test_q_sample_noise_is_the_contract_stream(backend):
    d = make(backend)
    x0 = torch.zeros(3, 2, 7)
    t = torch.full((3,), N - 1)
    gen = torch.Generator().manual_seed(9)
    got = d.q_sample(x0, t, generator=gen, sample_offset=4)
    seed = int(torch.randint(2**63 - 1, (1,), generator=torch.Generator().manual_seed(9)))
    _, _, ab = f64()
    expect = (1 - ab[-1]).sqrt() * torch.from_numpy(np_philox.normals(seed, 4, 3, 14)).reshape(3, 2, 7)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)


def test_noise_of_a_sample_does_not_depend_on_the_batch(backend):
    d = make(backend)
    x0 = torch.randn(6, 3, 5)
    t = torch.randint(0, N, (6,))

    def run(lo, hi, **kw):
        return d.q_sample(x0[lo:hi], t[lo:hi], generator=torch.Generator().manual_seed(1), **kw)

    full = run(0, 6)
    torch.testing.assert_close(run(2, 5, sample_offset=2), full[2:5], rtol=0, atol=0)
    torch.testing.assert_close(run(5, 6, sample_offset=5), full[5:6], rtol=0, atol=0)
    other = x0.clone()
    other[0] = 100.0  # another sample's data does not change this one's noise
    got = d.q_sample(other, t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got[1:], full[1:], rtol=0, atol=0)


def test_int_t_int32_t_and_0d_t(backend):
    d = make(backend)
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    ref = d.q_sample(x0, torch.full((3,), 7), eps)
    for t in (7, torch.tensor(7), torch.full((3,), 7, dtype=torch.int32)):
        torch.testing.assert_close(d.q_sample(x0, t, eps), ref, rtol=0, atol=0)


def test_strided_and_channels_last_inputs(backend):
    d = make(backend)
    base = torch.randn(4, 3, 6, 10)
    x0 = base[:, :, :, ::2]  # non-contiguous
    cl = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    t = torch.tensor([3, 1, 4, 1])
    for x in (x0, cl):
        eps = torch.randn(x.shape).to(memory_format=torch.channels_last) if x is cl else torch.randn(x.shape)
        torch.testing.assert_close(d.q_sample(x, t, eps), d.q_sample(x.contiguous(), t, eps.contiguous()))
        g = torch.Generator().manual_seed(2)
        drawn = d.q_sample(x, t, generator=g)
        torch.testing.assert_close(drawn, d.q_sample(x.contiguous(), t, generator=torch.Generator().manual_seed(2)))
        torch.testing.assert_close(d.p_sample(x, t, eps), d.p_sample(x.contiguous(), t, eps.contiguous()))
        torch.testing.assert_close(d.loss(x, eps, t=t), d.loss(x.contiguous(), eps.contiguous(), t=t))


def test_empty_batch(backend):
    d = make(backend)
    x0 = torch.randn(0, 3, 4)
    t = torch.zeros(0, dtype=torch.int64)
    assert d.q_sample(x0, t).shape == (0, 3, 4)
    assert d.p_sample(x0, t).shape == (0, 3, 4)
    assert d.loss(x0, reduction="none").shape == (0,)


def test_nan_stays_in_its_sample(backend):
    d = make(backend)
    x0 = torch.randn(3, 2, 5)
    x0[1, 0, 2] = float("nan")
    t = torch.tensor([4, 4, 4])
    out = d.q_sample(x0, t)
    assert torch.isnan(out[1, 0, 2]) and torch.isfinite(out[[0, 2]]).all()
    per = d.loss(x0, t=t, reduction="none")
    assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2]]).all()


def test_inputs_are_not_modified(backend):
    d = make(backend)
    x0, eps, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.tensor([1, 2, 3])
    saved = [x0.clone(), eps.clone(), t.clone()]
    d.q_sample(x0, t, eps)
    d.p_sample(x0, t, eps)
    d.loss(x0, eps, t=t)
    d.loss(x0)
    for a, b in zip((x0, eps, t), saved):
        assert torch.equal(a, b)


def test_positional_device_and_module_conversions():
    d = fastddpm.DenoiseDiffusion(Eps(), N, "cpu")
    assert d.beta.device.type == "cpu"
    assert list(d.state_dict()) == ["eps_model.w"]  # schedules are derived, not checkpointed
    x0, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([5, 6])
    before = d.q_sample(x0, t, eps)
    d.half()  # the kernel tables keep float32 so results do not change
    d.eps_model.float()
    torch.testing.assert_close(d.q_sample(x0, t, eps), before, rtol=0, atol=0)
    assert d.beta.dtype == torch.float16  # labml's attributes follow the module, as in nn.Module
    d.double()
    torch.testing.assert_close(d.q_sample(x0, t, eps), before, rtol=0, atol=0)


def test_backend_choice(monkeypatch):
    assert "reference" in fastddpm.available_backends()
    # Refused when built on the CPU (absent, or present for CUDA tensors only), not at the
    # first call, as an unknown name is.
    with pytest.raises(fastddpm.BackendUnavailableError, match="'cuda'.*not available|runs on cuda"):
        fastddpm.DenoiseDiffusion(Eps(), N, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'magic'"):
        fastddpm.DenoiseDiffusion(Eps(), N, backend="magic")
    calls = []
    from fastddpm.backends import reference
    monkeypatch.setattr(reference, "q_sample", lambda *a: calls.append(a) or a[0])
    try:
        # FASTDDPM_BACKEND is read at import: setting it later changes nothing until reload_env().
        monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
        auto = fastddpm.backends.resolve("auto", torch.device("cpu"))
        fastddpm.DenoiseDiffusion(Eps(), N).q_sample(torch.randn(2, 3), 1)
        assert len(calls) == (1 if auto is reference else 0)
        assert fastddpm.backends.reload_env() == "reference"
        fastddpm.DenoiseDiffusion(Eps(), N).q_sample(torch.randn(2, 3), 1)
        assert len(calls) == (2 if auto is reference else 1)
        monkeypatch.setenv("FASTDDPM_BACKEND", "magic")
        fastddpm.backends.reload_env()
        with pytest.raises(ValueError, match="FASTDDPM_BACKEND names an unknown backend 'magic'"):
            fastddpm.DenoiseDiffusion(Eps(), N).q_sample(torch.randn(2, 3), 1)
    finally:
        monkeypatch.undo()
        fastddpm.backends.reload_env()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
def test_loss_and_p_sample_compile_fullgraph(backend):
    """A training step and a sampling step of the class compile without graph breaks and give
    eager's numbers (the Triton interpreter cannot run under torch.compile: see gpu_report)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    d = fastddpm.DenoiseDiffusion(Eps(), N, backend=backend)
    x = torch.randn(4, 3, 5)
    results = []
    for fn in (lambda x: d.loss(x), torch.compile(lambda x: d.loss(x), fullgraph=True)):
        torch.manual_seed(1)
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), d.eps_model.w.grad.clone()))
        d.eps_model.w.grad = None
    torch.testing.assert_close(results[0], results[1])
    step = torch.compile(lambda x: d.p_sample(x, 7), fullgraph=True)
    torch.manual_seed(2)
    expect = d.p_sample(x, 7)
    torch.manual_seed(2)
    torch.testing.assert_close(step(x), expect)
