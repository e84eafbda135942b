"""Bad input gets a clear error naming the argument, before any backend computes anything."""
import pytest
import torch

import fastddpm
from fastddpm import ops
from fastddpm.backends import reference

N = 10


@pytest.fixture
def no_compute(monkeypatch):
    """Make every backend entry point fail loudly: validation must stop bad input first."""
    def boom(*args):
        raise AssertionError("a backend ran on invalid input")
    for name in ("q_sample", "p_sample_step", "mse_per_sample", "sample_t"):
        monkeypatch.setattr(reference, name, boom)
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    fastddpm.backends.reload_env()  # the variable is read at import; read it again
    yield
    monkeypatch.undo()
    fastddpm.backends.reload_env()


def diffusion():
    return fastddpm.DenoiseDiffusion(lambda x, t: x, N, backend="reference")


X = torch.randn(3, 2, 4)
T = torch.tensor([0, 1, 2])
GENERATOR_INT = r"generator must be a torch.Generator on the data's device \(cpu\) or None, got int"


@pytest.mark.parametrize("call,exc,match", [
    (lambda d: d.q_sample(X, torch.tensor([0, 1, N])), ValueError, r"t must lie in \[0, 10\), got values in \[0, 10\]"),
    (lambda d: d.q_sample(X, torch.tensor([-1, 1, 2])), ValueError, r"t must lie in \[0, 10\)"),
    (lambda d: d.q_sample(X, N), ValueError, r"t must lie in \[0, 10\), got 10"),
    (lambda d: d.p_sample(X, -1), ValueError, r"t must lie in \[0, 10\)"),
    (lambda d: d.q_sample(X, torch.tensor([0, 1])), ValueError, r"t must have shape \[3\]"),
    (lambda d: d.q_sample(X, torch.zeros(3, 1, dtype=torch.int64)), ValueError, r"t must have shape \[3\]"),
    (lambda d: d.q_sample(X, torch.zeros(3)), TypeError, "t must be an int32 or int64 tensor, got torch.float32"),
    (lambda d: d.q_sample(X, 1.0), TypeError, "t must be an int or an integer tensor"),
    (lambda d: d.q_sample(X, True), TypeError, "got bool"),
    (lambda d: d.q_sample(X, torch.zeros(3, dtype=torch.int64, device="meta")), RuntimeError, "t is on meta"),
    (lambda d: d.q_sample(torch.ones(3, 4, dtype=torch.int64), T), TypeError, "x0 must be float16, bfloat16, float32 or float64"),
    (lambda d: d.q_sample(torch.tensor(1.0), T), ValueError, "x0 must have a batch dimension"),
    (lambda d: d.q_sample([1.0, 2.0], T), TypeError, "x0 must be a torch.Tensor"),
    (lambda d: d.q_sample(X, T, torch.randn(3, 2, 5)), ValueError, r"noise must have the shape of x0 \(3, 2, 4\)"),
    (lambda d: d.q_sample(X, T, torch.ones(3, 2, 4, dtype=torch.int32)), TypeError, "noise must be a floating tensor"),
    (lambda d: d.q_sample(X, T, noise=torch.randn(3, 2, 4), eps=torch.randn(3, 2, 4)), TypeError, "both noise and eps"),
    (lambda d: d.q_sample(X, T, torch.randn(3, 2, 4, device="meta")), RuntimeError, "noise is on meta"),
    (lambda d: d.p_sample(X, T, torch.randn(2, 2, 4)), ValueError, "noise must have the shape of x_t"),
    (lambda d: d.p_sample(torch.ones(3, 4, dtype=torch.int64), T), TypeError, "x_t must be float16"),
    (lambda d: d.loss(X, reduction="sum"), ValueError, "reduction must be one of"),
    (lambda d: d.loss(X, torch.randn(3, 2)), ValueError, "noise must have the shape of x0"),
    (lambda d: d.loss(X, t=torch.tensor([0, 1, 11])), ValueError, r"t must lie in \[0, 10\)"),
    (lambda d: d.loss(torch.ones(3, 2, dtype=torch.int64)), TypeError, "x0 must be float16"),
    (lambda d: d.q_sample(X, T, sample_offset=-1), ValueError, "sample_offset must lie in"),
    (lambda d: d.q_sample(X, T, sample_offset=1.5), TypeError, "sample_offset must be an int"),
    (lambda d: d.q_sample(X, T, generator=0), TypeError, GENERATOR_INT),
    (lambda d: d.p_sample(X, T, generator=0), TypeError, GENERATOR_INT),
    (lambda d: d.loss(X, generator=0), TypeError, GENERATOR_INT),
    (lambda d: d.loss(X, generator=torch.default_generator.get_state()), TypeError, "got Tensor"),
])
def test_class_rejects(no_compute, call, exc, match):
    with pytest.raises(exc, match=match):
        call(diffusion())


def test_eps_model_of_the_wrong_shape(no_compute, monkeypatch):
    monkeypatch.undo()  # q_sample must run for the model to be called
    d = fastddpm.DenoiseDiffusion(lambda x, t: x[:, :1], N, backend="reference")
    with pytest.raises(ValueError, match=r"eps_model's output must have the shape of x0 \(3, 2, 4\), got \(3, 1, 4\)"):
        d.loss(X)


TABS = {k: torch.linspace(0.1, 0.9, N) for k in ("a", "b", "c")}


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.q_sample(X, T, torch.rand(2), torch.rand(2)), ValueError, r"t must lie in \[0, 2\)"),
    (lambda: ops.q_sample(X, T, torch.rand(N), torch.rand(N - 1)), ValueError, "tables must have one length"),
    (lambda: ops.q_sample(X, T, torch.rand(N, 1), torch.rand(N)), ValueError, "sqrt_ab must be a 1-D per-t table"),
    (lambda: ops.q_sample(X, T, torch.rand(N).half(), torch.rand(N)), TypeError, "sqrt_ab must be float32 or float64"),
    (lambda: ops.q_sample(X, T, torch.rand(N), torch.rand(N, device="meta")), RuntimeError, "sqrt_1m_ab is on meta"),
    (lambda: ops.q_sample(X, T, torch.rand(0), torch.rand(0)), ValueError, "tables are empty"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], seed=-5), ValueError, r"seed must lie in \[0, 2\*\*64\)"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], seed=2**64), ValueError, r"seed must lie in \[0, 2\*\*64\)"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], seed=1.5), TypeError, "seed must be an int"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], seed=torch.tensor([1, 2])), ValueError, "seed tensor must hold one int64"),
    (lambda: ops.p_sample_step(X, None, T, TABS["a"], TABS["b"], TABS["c"]), TypeError, "eps_theta must be a torch.Tensor, got NoneType"),
    (lambda: ops.p_sample_step(X, X[:2], T, TABS["a"], TABS["b"], TABS["c"]), ValueError, "eps_theta must have the shape of x_t"),
    (lambda: ops.p_sample_step(X, X, T, TABS["a"], TABS["b"], torch.rand(3)), ValueError, "tables must have one length"),
    (lambda: ops.mse_per_sample(X, X[:, :1]), ValueError, "target must have the shape of pred"),
    (lambda: ops.mse_per_sample(torch.ones(3, 2, dtype=torch.int64)), TypeError, "pred must be float16"),
    (lambda: ops.mse_per_sample(torch.randn(3, 0)), ValueError, "at least one element per sample"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], backend="magic"), ValueError, "unknown backend 'magic'"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], backend=3), TypeError, "backend must be a str"),
    (lambda: ops.sample_t(torch.tensor([1]), -1, 10), ValueError, "batch must be a non-negative int"),
    (lambda: ops.sample_t(torch.tensor([1]), 4, 0), ValueError, r"n_steps must be an int in \[1, 2\*\*31\)"),
    (lambda: ops.q_sample(X, T, TABS["a"], TABS["b"], generator=0), TypeError, GENERATOR_INT),
    (lambda: ops.p_sample_step(X, X, T, TABS["a"], TABS["b"], TABS["c"], generator=0), TypeError, GENERATOR_INT),
    (lambda: ops.mse_per_sample(X, generator="seed"), TypeError, "generator must be a torch.Generator .* got str"),
    (lambda: ops.clipped_step(X, X, T, *[TABS["a"]] * 6, guidance=float("nan")), ValueError,
     "guidance must be a finite real number, got nan"),
    (lambda: ops.clipped_step(X, X, T, *[TABS["a"]] * 6, guidance=float("inf")), ValueError,
     "guidance must be a finite real number, got inf"),
    (lambda: ops.clipped_step(X, X, T, *[TABS["a"]] * 6, guidance="2"), TypeError,
     "guidance must be a finite real number, got str '2'"),
])
def test_ops_reject(no_compute, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_generator_of_another_device_type_is_named(no_compute):
    d = fastddpm.DenoiseDiffusion(lambda x, t: x, N, device="meta", backend="reference")
    x = torch.ones(3, 2, 4, device="meta")
    for call in (lambda: d.q_sample(x, 1, generator=torch.Generator()), lambda: d.loss(x, generator=torch.Generator())):
        with pytest.raises(RuntimeError, match="generator is on cpu but the data is on meta"):
            call()


def test_a_backend_that_cannot_run_on_the_device_fails_at_construction(monkeypatch):
    """As an unknown name does: the registry's reason, before any call."""
    if not fastddpm.backends.status("cuda")[0]:
        with pytest.raises(fastddpm.BackendUnavailableError, match="backend 'cuda' is not available: .+"):
            fastddpm.DenoiseDiffusion(lambda x, t: x, N, backend="cuda")
    # Availability is per device: a backend present in the process but not for the module's
    # device (Triton outside its interpreter takes CUDA tensors only) is refused too.
    mod = fastddpm.backends.get("reference")
    monkeypatch.setattr(mod, "device_types", ("cuda",))
    fastddpm.backends.reload_env()  # forget the cached choices
    try:
        with pytest.raises(fastddpm.BackendUnavailableError, match="'reference' runs on cuda tensors, got a tensor on cpu"):
            fastddpm.DenoiseDiffusion(lambda x, t: x, N, backend="reference")
        # A module built on meta is moved before use; its first call there checks the backend.
        d = fastddpm.DenoiseDiffusion(lambda x, t: x, N, device="meta", backend="reference")
        d.to_empty(device="cpu")
        with pytest.raises(fastddpm.BackendUnavailableError, match="runs on cuda tensors"):
            d.q_sample(X, T)
    finally:
        monkeypatch.undo()
        fastddpm.backends.reload_env()


def test_absent_backend_says_why():
    ok, reason = fastddpm.backends.status("cuda")
    if ok:
        pytest.fail("this test expects a machine without a usable cuda backend")
    with pytest.raises(fastddpm.BackendUnavailableError, match="'cuda' is not available: .+"):
        ops.q_sample(X, T, TABS["a"], TABS["b"], backend="cuda")


def test_ops_accept_mixed_dtypes_by_casting():
    x = torch.randn(3, 4)
    noise = torch.randn(3, 4, dtype=torch.float64)
    got = ops.q_sample(x, T, TABS["a"], TABS["b"], noise, backend="reference")
    assert got.dtype == torch.float32
    expect = TABS["a"][T].view(3, 1) * x + TABS["b"][T].view(3, 1) * noise.float()
    torch.testing.assert_close(got, expect)
    per = ops.mse_per_sample(x.half(), noise, backend="reference")  # promotes to float64
    assert per.dtype == torch.float64
    torch.testing.assert_close(per, ((x.half().double() - noise) ** 2).mean(1))


def test_seed_accepts_full_64_bit_range():
    x = torch.zeros(2, 8)
    a = ops.q_sample(x, 0, torch.ones(1), torch.ones(1), seed=2**64 - 1, backend="reference")
    b = ops.q_sample(x, 0, torch.ones(1), torch.ones(1), seed=torch.tensor([-1]), backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in fastddpm.available_backends() if b != "reference"])
def test_double_backward_through_fused_mse_is_an_error(backend):
    pred = torch.randn(3, 5, requires_grad=True)
    (g,) = torch.autograd.grad(ops.mse_per_sample(pred, seed=3, backend=backend).sum(), pred, create_graph=True)
    noise = fastddpm.philox.normal(torch.tensor([3]), 0, (3, 5))
    torch.testing.assert_close(g, 2 / 5 * (pred - noise))  # the first derivative is right
    with pytest.raises(RuntimeError, match="double backward through mse_per_sample is not supported"):
        g.sum().backward()
