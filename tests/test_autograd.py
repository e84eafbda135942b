"""Gradients of the fused ops: the C++ autograd (cpu backend, csrc/autograd.cpp), the Python one
(triton backend, here in Triton's interpreter, fastddpm/_autograd.py) and the reference backend
(PyTorch's own autograd) agree on the gradient of every floating input, the per-t tables
included; gradcheck confirms them numerically; forward-mode AD raises instead of returning zero
tangents.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fastddpm import _extension, ops, schedule
from backends_under_test import device_for

assert _extension.load() is not None, f"fastddpm._C is not built or failed to load: {_extension.error()}"

N_STEPS = 20
SHAPE = (6, 3, 5)  # 15 elements per sample
AUTOGRAD_BACKENDS = ("cpu", "triton")  # the C++ path and the Python path
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _tables(dtype):
    tabs = schedule.coefficient_tables(schedule.linear(N_STEPS))
    return {k: v.to(dtype) for k, v in tabs.items()}


def _inputs(dtype, gen):
    # Repeated steps: the table gradients must add the samples of one step up.
    t = torch.tensor([3, 7, 3, 0, 19, 7])
    data = {k: torch.randn(SHAPE, generator=gen, dtype=dtype) for k in ("x", "eps", "noise")}
    weight = torch.randn(SHAPE, generator=gen, dtype=dtype)
    return t, data, weight


# Each case: (op name, call(backend, tensors, t) -> output, names of the inputs that get grads).
def _q_sample(backend, v, t):
    return ops.q_sample(v["x"], t, v["sqrt_ab"], v["sqrt_1m_ab"], v.get("noise"), seed=11, sample_offset=2,
                        backend=backend)


def _p_sample_step(backend, v, t):
    return ops.p_sample_step(v["x"], v["eps"], t, v["c1"], v["c2"], v["sigma"], v.get("noise"), seed=12,
                             sample_offset=1, backend=backend)


def _mse(backend, v, t):
    return ops.mse_per_sample(v["x"], v.get("noise"), seed=13, sample_offset=4, backend=backend)


CASES = {
    "q_sample": (_q_sample, ("x", "sqrt_ab", "sqrt_1m_ab")),
    "p_sample_step": (_p_sample_step, ("x", "eps", "c1", "c2", "sigma")),
    "mse_per_sample": (_mse, ("x",)),
}


def _grads(backend, case, noise_given, dtype, table_dtype):
    call, names = CASES[case]
    gen = torch.Generator().manual_seed(7)
    t, data, weight = _inputs(dtype, gen)
    device = device_for(backend)
    values = {**data, **_tables(table_dtype)}
    if not noise_given:
        del values["noise"]
    names = names + (("noise",) if noise_given else ())
    leaves = {k: v.to(device).requires_grad_(k in names) for k, v in values.items()}
    out = call(backend, leaves, t.to(device))
    w = weight.to(device) if out.dim() > 1 else weight.flatten(1)[:, 0].to(device, out.dtype)
    grads = torch.autograd.grad((out * w).sum(), [leaves[k] for k in names])
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("dtype,table_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                               (torch.float32, torch.float64)])
@pytest.mark.parametrize("noise_given", [True, False], ids=["noise", "seeded"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", AUTOGRAD_BACKENDS)
def test_gradients_of_every_input_match_reference(backend, case, noise_given, dtype, table_dtype):
    out, got = _grads(backend, case, noise_given, dtype, table_dtype)
    ref_out, expect = _grads("reference", case, noise_given, dtype, table_dtype)
    tol = dict(TOL[dtype])
    if not noise_given:  # in-kernel normals against PyTorch's log/sin/cos: a few ulp apart
        tol["atol"] = max(tol["atol"], 1e-5)
    torch.testing.assert_close(out.cpu(), ref_out, **tol)
    assert set(got) == set(expect)
    for name in expect:
        assert got[name].dtype == expect[name].dtype, name
        torch.testing.assert_close(got[name].cpu(), expect[name], **tol, msg=lambda m: f"d/d{name}: {m}")


def test_table_gradient_is_not_dropped():
    # Only sqrt_ab of the two tables requires grad, as a user training a schedule might do.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=gen)
    t = torch.tensor([1, 2, 1, 0])
    got = {}
    for backend in ("cpu", "triton", "reference"):
        xx = x.clone().requires_grad_()
        sa = torch.rand(3, generator=torch.Generator().manual_seed(4)).requires_grad_()
        sb = torch.rand(3, generator=torch.Generator().manual_seed(5))
        ops.q_sample(xx, t, sa, sb, seed=3, backend=backend).sum().backward()
        assert sa.grad is not None, backend
        got[backend] = (xx.grad, sa.grad)
    # d/dsqrt_ab[s] = sum of x over the samples at step s, computed here directly.
    expect_sa = torch.stack([x[t == s].sum() for s in range(3)])
    for backend, (gx, gsa) in got.items():
        torch.testing.assert_close(gsa, expect_sa, rtol=1e-6, atol=1e-6, msg=backend)
        torch.testing.assert_close(gx, got["reference"][0], msg=backend)


def test_gradcheck_float64_tables_and_data_cpu():
    # Finite differences of the C++ ops, every floating input at once.
    gen = torch.Generator().manual_seed(9)
    t = torch.tensor([2, 0, 2])
    tabs = {k: v.requires_grad_() for k, v in _tables(torch.float64).items()}
    x, e, n = (torch.randn(3, 2, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    F = torch.ops.fastddpm
    seed = torch.tensor([21])
    sa, sb = tabs["sqrt_ab"], tabs["sqrt_1m_ab"]
    c1, c2, sg = tabs["c1"], tabs["c2"], tabs["sigma"]
    assert torch.autograd.gradcheck(lambda x, a, b, n: F.q_sample(x, t, a, b, n, None, 0), (x, sa, sb, n))
    assert torch.autograd.gradcheck(lambda x, a, b: F.q_sample(x, t.int(), a, b, None, seed, 3), (x, sa, sb))
    assert torch.autograd.gradcheck(
        lambda x, e, a, b, s, n: F.p_sample_step(x, e, t, a, b, s, n, None, 0), (x, e, c1, c2, sg, n))
    assert torch.autograd.gradcheck(
        lambda x, e, a, b, s: F.p_sample_step(x, e, t, a, b, s, None, seed, 1), (x, e, c1, c2, sg))


def test_opcheck_with_tables_requiring_grad():
    # opcheck's autograd-registration and fake-kernel checks with every floating input,
    # tables included, requiring grad.
    gen = torch.Generator().manual_seed(8)
    tabs = {k: v.requires_grad_() for k, v in _tables(torch.float32).items()}
    t = torch.tensor([4, 1, 4])
    x, e, n = (torch.randn(3, 2, 5, generator=gen).requires_grad_() for _ in range(3))
    seed = torch.tensor([31])
    F = torch.ops.fastddpm
    sa, sb, c1, c2, sg = (tabs[k] for k in ("sqrt_ab", "sqrt_1m_ab", "c1", "c2", "sigma"))
    for op, args in [(F.q_sample.default, (x, t, sa, sb, n, None, 0)),
                     (F.q_sample.default, (x, t, sa, sb, None, seed, 2)),
                     (F.p_sample_step.default, (x, e, t, c1, c2, sg, n, None, 0)),
                     (F.p_sample_step.default, (x, e, t, c1, c2, sg, None, seed, 1))]:
        torch.library.opcheck(op, args)


def test_gradients_through_torch_compile_match_eager_cpu():
    # The C++ backward, table gradients and noise regeneration included, traced by AOTAutograd.
    gen = torch.Generator().manual_seed(10)
    x0 = torch.randn(4, 3, 5, generator=gen)
    t = torch.tensor([1, 5, 1, 9])
    seed = torch.tensor([77])
    F = torch.ops.fastddpm

    def step(x0, sa, sb, c1, c2, sg):
        x_t = F.q_sample(x0, t, sa, sb, None, seed, 0)
        loss = F.mse_per_sample(x_t * 0.5, None, seed, 0).mean()
        return loss + F.p_sample_step(x_t, x0, t, c1, c2, sg, None, seed, 2).square().mean()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        tabs = {k: v.requires_grad_() for k, v in _tables(torch.float32).items()}
        x = x0.clone().requires_grad_()
        inputs = (x, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], tabs["c1"], tabs["c2"], tabs["sigma"])
        results.append(torch.autograd.grad(fn(*inputs), inputs))
    for eager, comp in zip(*results):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(comp, eager)


def test_double_backward_through_mse_is_a_clear_error_cpu():
    x = torch.randn(3, 4, requires_grad=True)
    (g,) = torch.autograd.grad(ops.mse_per_sample(x, seed=1, backend="cpu").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through mse_per_sample is not supported"):
        g.sum().backward()


# ---- forward-mode AD: an error, never a zero tangent --------------------------------------------

def _forward_ad_calls(backend):
    tabs = _tables(torch.float32)
    t = torch.tensor([1, 4])
    return {
        "q_sample": lambda x: ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=1, backend=backend),
        "p_sample_step": lambda x: ops.p_sample_step(x, x, t, tabs["c1"], tabs["c2"], tabs["sigma"], seed=1,
                                                     backend=backend),
        "mse_per_sample": lambda x: ops.mse_per_sample(x, seed=1, backend=backend),
    }


@pytest.mark.parametrize("backend", AUTOGRAD_BACKENDS)
def test_forward_mode_ad_raises(backend):
    x, tangent = torch.randn(2, 3), torch.ones(2, 3)
    for name, fn in _forward_ad_calls(backend).items():
        with pytest.raises(RuntimeError, match=f"fastddpm: {name} on the {backend} .*has no forward-mode AD"):
            torch.func.jvp(fn, (x,), (tangent,))
        with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"{name} .*has no forward-mode AD"):
            fn(fwAD.make_dual(x, tangent))


def test_forward_mode_ad_on_reference_is_the_linear_map():
    # What the fused backends refuse, the reference computes: the tangent of q_sample in x0 is
    # sqrt_ab[t] * tangent.
    tabs = _tables(torch.float32)
    t = torch.tensor([1, 4])
    x, tangent = torch.randn(2, 3), torch.randn(2, 3)
    _, jvp = torch.func.jvp(_forward_ad_calls("reference")["q_sample"], (x,), (tangent,))
    torch.testing.assert_close(jvp, tabs["sqrt_ab"][t].view(2, 1) * tangent)
