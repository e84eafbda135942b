"""Edge cases of DenoiseDiffusion and the ops on every backend that takes CPU tensors: a right
answer, or a clear error naming the caller's argument raised before any kernel runs."""
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastddpm
from backends_under_test import cpu_backends
from fastddpm import backends, ops, schedule

N = 10
OPS = ("q_sample", "p_sample_step", "mse_per_sample", "sample_t")
ROOT = Path(__file__).resolve().parents[1]


class Eps(nn.Module):
    def __init__(self, out=None):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.out = out  # what forward returns instead of w * x, when given

    def forward(self, x, t):
        if self.out is not None:
            return self.out(x)
        return self.w.to(x.dtype) * x + 0.01 * t.view((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


@pytest.fixture(params=cpu_backends())
def backend(request):
    return request.param


@pytest.fixture
def no_kernel(backend, monkeypatch):
    """The backend under test, with every op replaced by one that fails the test if it runs."""
    mod = backends.resolve(backend, torch.device("cpu"))
    for name in OPS:
        monkeypatch.setattr(mod, name, lambda *a, _n=name: pytest.fail(f"{backend}'s {_n} ran on bad input"))
    return backend


# ---- the data's device against the tables' ------------------------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda d, x: d.q_sample(x, 3), "x0"),
    (lambda d, x: d.q_xt_x0(x, 3), "x0"),
    (lambda d, x: d.p_sample(x, 3), "x_t"),
    (lambda d, x: d.loss(x), "x0"),
])
def test_data_on_another_device_than_the_tables(no_kernel, call, name):
    model = Eps()
    d = fastddpm.DenoiseDiffusion(model, N, device="meta", backend=no_kernel)
    assert d.beta.device.type == "meta"
    with pytest.raises(RuntimeError, match=f"{name} is on cpu but the DenoiseDiffusion's tables are on meta; move one"):
        call(d, torch.ones(2, 6))
    d = fastddpm.DenoiseDiffusion(model, N, backend=no_kernel)
    with pytest.raises(RuntimeError, match=f"{name} is on meta but the DenoiseDiffusion's tables are on cpu; move one"):
        call(d, torch.ones(2, 6, device="meta"))


def test_moving_the_module_moves_the_check(backend):
    d = fastddpm.DenoiseDiffusion(Eps(), N, device="meta", backend=backend)
    d.to_empty(device="cpu")  # meta holds no values: the tables are set again from the schedule
    torch.testing.assert_close(d.beta, torch.linspace(1e-4, 0.02, N))
    x0, eps = torch.randn(2, 6), torch.randn(2, 6)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, N, dtype=torch.float64), 0)[3]
    torch.testing.assert_close(d.q_sample(x0, 3, eps).double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double(),
                               rtol=1e-5, atol=1e-6)


# ---- eps_model's output ---------------------------------------------------------------------

@pytest.mark.parametrize("out, exc, match", [
    (lambda x: torch.ones_like(x, device="meta"), RuntimeError, "eps_model's output is on meta but {x} is on cpu"),
    (lambda x: torch.ones(x.shape, dtype=torch.int64), TypeError, "eps_model's output must be a floating tensor"),
    (lambda x: (x,), TypeError, "eps_model's output must be a torch.Tensor, got tuple"),
    (lambda x: x[:, :1], ValueError, r"eps_model's output must have the shape of {x} \(3, 4\), got \(3, 1\)"),
])
def test_eps_model_output_is_checked_by_loss_and_p_sample(backend, monkeypatch, out, exc, match):
    d = fastddpm.DenoiseDiffusion(Eps(out), N, backend=backend)
    mod = backends.resolve(backend, torch.device("cpu"))
    for name in ("p_sample_step", "mse_per_sample"):  # q_sample runs in loss before the model
        monkeypatch.setattr(mod, name, lambda *a, _n=name: pytest.fail(f"{_n} ran on a bad model output"))
    x = torch.randn(3, 4)
    with pytest.raises(exc, match=match.format(x="x0")):
        d.loss(x)
    with pytest.raises(exc, match=match.format(x="x_t")):
        d.p_sample(x, 2)


def test_eps_model_output_of_another_float_dtype(backend):
    """A float64 output for float32 data: the MSE computes in float64, as PyTorch would."""
    d = fastddpm.DenoiseDiffusion(Eps(lambda x: x.double() * 0.5), N, backend=backend)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0, 4, 9])
    got = d.loss(x0, eps, t=t, reduction="none")
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, N, dtype=torch.float64), 0)[t].view(3, 1)
    x_t = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()).float()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ((x_t.double() * 0.5 - eps.double()) ** 2).mean(1), rtol=1e-5, atol=1e-6)


# ---- the schedule's tables are finite ------------------------------------------------------

def exact_tables(betas):
    """c1, c2, sigma of each step from exact rational arithmetic, rounded once to float."""
    out, ab = [], Fraction(1)
    for b in betas:
        b = Fraction(b)
        ab *= 1 - b
        one_m_ab = 1 - ab
        out.append((1 / math.sqrt(1 - b), float(b) / (math.sqrt(1 - b) * math.sqrt(one_m_ab)), math.sqrt(b)))
    return torch.tensor(out, dtype=torch.float64)


def test_a_tiny_beta_gives_finite_tables_and_steps(backend):
    betas = torch.tensor([1e-17, 0.01, 0.02], dtype=torch.float64)
    tabs = schedule.coefficient_tables(betas)
    exact = exact_tables(betas.tolist())
    for i, name in enumerate(("c1", "c2", "sigma")):
        torch.testing.assert_close(tabs[name], exact[:, i], rtol=1e-13, atol=0)
    torch.testing.assert_close(tabs["sqrt_1m_ab"][0], torch.tensor(1e-17, dtype=torch.float64).sqrt(), rtol=1e-13, atol=0)
    d = fastddpm.DenoiseDiffusion(Eps(), 3, schedule=betas, backend=backend)
    for dtype in (torch.float32, torch.float64):
        x, z = torch.randn(4, 5, dtype=dtype), torch.randn(4, 5, dtype=dtype)
        t = torch.zeros(4, dtype=torch.int64)
        expect = exact[0, 0] * x.double() - exact[0, 1] * d.eps_model(x, t).double() + exact[0, 2] * z.double()
        got = d.p_sample(x, 0, z)
        torch.testing.assert_close(got.double(), expect, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-7)
        assert torch.isfinite(d.p_sample(x, 0)).all() and torch.isfinite(d.loss(x, t=t))


def test_non_finite_tables_are_rejected_naming_the_step():
    betas = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    tabs = {"c1": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
            "c2": torch.tensor([1.0, 1e300, 3.0], dtype=torch.float64)}  # finite in float64, not float32
    with pytest.raises(ValueError, match=r"non-finite c2 at step t=1 \(1e\+300 in float64, inf in float32, from beta=0.2\)"):
        schedule.check_finite(tabs, betas)
    tabs["c2"][1] = float("nan")
    tabs["c1"][2] = float("inf")
    with pytest.raises(ValueError, match="non-finite c1 at step t=2"):
        schedule.check_finite(tabs, betas)


# ---- n_steps is bounded -------------------------------------------------------------------

@pytest.mark.parametrize("n", [2**20 + 1, 2**31, 2**40])
def test_n_steps_has_an_upper_bound(n):
    for make in (lambda: fastddpm.DenoiseDiffusion(Eps(), n), lambda: schedule.linear(n),
                 lambda: schedule.cosine(n), lambda: schedule.resolve("linear", n)):
        with pytest.raises(ValueError, match=rf"n_steps must be at most 2\*\*20 = 1048576, got {n}"):
            make()


def test_the_largest_schedule_is_accepted():
    betas = schedule.linear(schedule.MAX_STEPS)
    assert betas.shape == (2**20,) and betas[-1] == 0.02
    with pytest.raises(ValueError, match=r"betas must have at most 2\*\*20 = 1048576 steps \(n_steps\), got 1048577"):
        schedule.from_betas(torch.full((2**20 + 1,), 0.01, dtype=torch.float64))


# ---- messages that name the caller's argument ---------------------------------------------

def test_loss_of_samples_without_elements_names_x0(no_kernel):
    d = fastddpm.DenoiseDiffusion(Eps(), N, backend=no_kernel)
    with pytest.raises(ValueError, match=r"x0 must have at least one element per sample, got shape \(3, 0\)"):
        d.loss(torch.randn(3, 0))


def test_seed_on_meta_is_named(no_kernel):
    tab = torch.linspace(0.1, 0.9, N)
    seed = torch.tensor([1], device="meta")
    x = torch.randn(3, 4)
    for call in (lambda: ops.q_sample(x, 2, tab, tab, seed=seed, backend=no_kernel),
                 lambda: ops.p_sample_step(x, x, 2, tab, tab, tab, seed=seed, backend=no_kernel),
                 lambda: ops.mse_per_sample(x, seed=seed, backend=no_kernel),
                 lambda: ops.sample_t(seed, 3, N, device="cpu", backend=no_kernel)):
        with pytest.raises(RuntimeError, match="seed is on meta, which holds no value, but the data is on cpu"):
            call()


# ---- labml drop-in ------------------------------------------------------------------------

def test_labml_keyword_xt(backend):
    d = fastddpm.DenoiseDiffusion(Eps(), N, backend=backend)
    x, t = torch.randn(3, 4), torch.tensor([1, 5, 9])
    torch.manual_seed(3)
    expect = d.p_sample(x, t)
    torch.manual_seed(3)
    torch.testing.assert_close(d.p_sample(xt=x, t=t), expect, rtol=0, atol=0)
    with pytest.raises(TypeError, match="p_sample got both x_t and xt; pass one"):
        d.p_sample(x, t, xt=x)
    with pytest.raises(TypeError, match="missing its argument t"):
        d.p_sample(xt=x)
    with pytest.raises(TypeError, match="missing its argument x_t"):
        d.p_sample(t=t)


@pytest.mark.parametrize("t", [np.int64(4), np.int32(4), np.array(4), np.uint8(4)])
def test_numpy_integer_t(backend, t):
    d = fastddpm.DenoiseDiffusion(Eps(), N, backend=backend)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, N, dtype=torch.float64), 0)[4]
    expect = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(d.q_sample(x0, t, eps).double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.q_sample(x0, 4, eps, sample_offset=np.int64(2)), d.q_sample(x0, 4, eps))


@pytest.mark.parametrize("t, match", [(np.float64(4.0), "got float64"), (np.bool_(True), "got bool"),
                                      (np.array([1, 2, 3]), "got ndarray"), (np.int64(N), r"t must lie in \[0, 10\), got 10")])
def test_numpy_t_that_is_not_an_integer_step(no_kernel, t, match):
    d = fastddpm.DenoiseDiffusion(Eps(), N, backend=no_kernel)
    with pytest.raises((TypeError, ValueError), match=match):
        d.q_sample(torch.randn(3, 4), t)


def test_numpy_n_steps():
    d = fastddpm.DenoiseDiffusion(Eps(), np.int64(N))
    assert d.n_steps == N and type(d.n_steps) is int


def test_cuda_device_without_cuda_is_named():
    if torch.cuda.is_available():
        assert fastddpm.DenoiseDiffusion(Eps(), N, device="cuda").beta.is_cuda
        return
    why = "is not a CUDA build" if torch.version.cuda is None else "no CUDA GPU is visible"
    with pytest.raises(RuntimeError, match=f"device is cuda but .*{why}; pass device='cpu'"):
        fastddpm.DenoiseDiffusion(Eps(), N, device="cuda")
    with pytest.raises(ValueError, match="device must be a torch.device or a device string, got 'gpu0'"):
        fastddpm.DenoiseDiffusion(Eps(), N, device="gpu0")


# ---- the backend is resolved once ---------------------------------------------------------

def test_backend_is_probed_once_per_device_type(monkeypatch):
    probes = []
    status = backends.status
    monkeypatch.setattr(backends, "status", lambda name: probes.append(name) or status(name))
    backends.reload_env()  # forget the cached choices
    try:
        d = fastddpm.DenoiseDiffusion(Eps(), N)
        first = len(probes)
        assert first >= 1
        x = torch.randn(2, 3)
        for _ in range(3):
            d.loss(x).backward()
            d.p_sample(x, 4)
            ops.q_sample(x, 1, d.beta, d.beta)
        assert len(probes) == first
    finally:
        monkeypatch.undo()
        backends.reload_env()


def test_loss_resolves_the_backend_once(backend, monkeypatch):
    calls = []
    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, device: calls.append(name) or resolve(name, device))
    d = fastddpm.DenoiseDiffusion(Eps(), N, backend=backend)
    calls.clear()
    d.loss(torch.randn(2, 3))
    assert calls == []  # the common call finds it with the tables, resolved when they were built
    d.loss(torch.randn(2, 3), sample_offset=0)  # the general path
    assert calls == [backend]


# ---- torch.compile of the first call in a process -----------------------------------------

def test_first_call_in_a_fresh_process_may_be_compiled():
    """The class's first call, compiled with fullgraph=True, needs no eager call before it: in a
    fresh process for the default backend, then for the reference backend's first use (the
    Triton interpreter does not run under torch.compile)."""
    script = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        import fastddpm

        class Eps(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.tensor(0.5))
            def forward(self, x, t):
                return self.w * x

        for backend in ("auto", "reference"):
            d = fastddpm.DenoiseDiffusion(Eps(), 10, backend=backend)
            x = torch.randn(4, 3)
            torch.manual_seed(1)
            compiled = torch.compile(lambda x: d.loss(x), fullgraph=True)(x)
            step = torch.compile(lambda x: d.p_sample(x, 7), fullgraph=True)
            torch.manual_seed(2)
            sampled = step(x)
            torch.manual_seed(1)
            torch.testing.assert_close(compiled, d.loss(x))
            torch.manual_seed(2)
            torch.testing.assert_close(sampled, d.p_sample(x, 7))
            print("ok", fastddpm.backends.resolve(backend, x.device).name)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    auto = backends.resolve("auto", torch.device("cpu")).name
    assert proc.stdout.split() == ["ok", auto, "ok", "reference"]
