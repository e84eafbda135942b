"""The C++ CPU kernels (torch.ops.fastddpm on CPU tensors) against the reference backend and
float64 math, on every instruction-set build of the kernels this CPU can run.

Outputs are poisoned (the ``poisoned`` fixture, helpers.poisoned_outputs): every ``at::empty``
the kernels allocate comes back filled with NaN, so an element a kernel forgets to write fails
the comparison. If fastddpm._C is not built these tests fail (CI builds it).
"""
import itertools

import pytest
import torch

from fastddpm import _checks, _extension, ops, philox
from fastddpm.backends import reference
from helpers import (DTYPES, NOISE_TOL, expected_uniforms, mse_backward_args, mse_tol, op_args, per_sample64,
                     sample_inputs, tables, tol)

F = torch.ops.fastddpm
N_STEPS = 50
# Odd shapes: samples of 1, 7, 4255 (3 blocks of the kernels, the last partial) elements.
SHAPES = ((5,), (3, 7), (3, 5, 23, 37))


def _load():
    C = _extension.load()
    assert C is not None, f"fastddpm._C is not built or failed to load: {_extension.error()}"
    return C


def _isas():
    C = _extension.load()
    return C.cpu_isas() if C is not None else ["default"]


@pytest.fixture(params=_isas())
def isa(request):
    """Runs the test on one build of the kernels, then restores the best one."""
    C = _load()
    best = C.cpu_isa()
    C.set_cpu_isa(request.param)
    yield request.param
    C.set_cpu_isa(best)


def _tables(dtype=torch.float32):
    return tables(N_STEPS, dtype)


def _seed(value=0x1234_5678_9ABC_DEF0):
    return ops.seed_tensor(value, torch.device("cpu"), None)


def _layout(x, layout):
    """x (values unchanged) as a contiguous, channels_last or strided (non-dense) tensor."""
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.t().contiguous().t()
    big = torch.full((x.shape[0] * 2,) + x.shape[1:], float("nan"), dtype=x.dtype)
    big[::2] = x
    return big[::2]


def _f64(x):
    return x.to(torch.float64)


# ---- the extension itself -------------------------------------------------------------------

def test_extension_loads_and_runs_the_best_build():
    C = _load()
    assert "cpu" in __import__("fastddpm").available_backends()
    cap = torch.backends.cpu.get_cpu_capability()
    best = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default")
    assert C.cpu_isas()[0] == best and C.cpu_isa() == best
    with pytest.raises(ValueError, match="not compiled in or not supported"):
        C.set_cpu_isa("sse9")


def test_build_choice_follows_aten_cpu_capability():
    """ATEN_CPU_CAPABILITY=default (as on a CPU without AVX2) selects the baseline build."""
    import os
    import subprocess
    import sys
    code = "from fastddpm import _extension; C = _extension.load(); print(C.cpu_isa(), *C.cpu_isas())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["default", "default"]


# ---- noise ----------------------------------------------------------------------------------

def test_philox_known_answer(isa):
    # Key (0, 0), counter (0, 0, 0, 0): 6627e8d5 e169c58d bc57ac4c 9b00dbd8 as uniforms.
    got = torch.frombuffer(bytearray(_load().philox_uniforms(0, 0, 1)), dtype=torch.float32)
    words = torch.tensor([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], dtype=torch.int64)
    assert torch.equal(got, philox.uniform(words))


@pytest.mark.parametrize("seed, g", [(0, 0), (0x1234_5678_9ABC_DEF0, 7), (2**64 - 1, 2**40 + 3)])
def test_uniforms_bit_identical_to_reference(isa, seed, g):
    quads = 37  # not a multiple of the kernels' group of 16 quads
    got = torch.frombuffer(bytearray(_load().philox_uniforms(seed, g, quads)), dtype=torch.float32)
    want = expected_uniforms(seed, torch.arange(quads, dtype=torch.int64), g).reshape(-1)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("offset", [0, 3, 2**33 + 5])
def test_in_kernel_noise_matches_reference(isa, poisoned, offset):
    shape = (3, 5, 23, 37)
    seed = _seed()
    zero, one = torch.zeros(N_STEPS), torch.ones(N_STEPS)
    t = torch.zeros(shape[0], dtype=torch.int64)
    got = F.q_sample(torch.zeros(shape), t, zero, one, None, seed, offset)
    torch.testing.assert_close(got, philox.normal(seed, offset, shape), **NOISE_TOL)
    # The noise of a sample depends only on (seed, g, j): a sub-batch at its offset agrees.
    part = F.q_sample(torch.zeros((1,) + shape[1:]), t[:1], zero, one, None, seed, offset + 2)
    assert torch.equal(part[0], got[2])


def _box_muller_math(x):
    """(log x, sin x, cos x) from the active build's Box-Muller functions, float32 x."""
    outs = _load().box_muller_math(x.contiguous().numpy().tobytes())
    return [torch.frombuffer(bytearray(o), dtype=torch.float32) for o in outs]


def _float_range(lo, hi, n):
    """n float32s spread evenly over the bit patterns of [lo, hi] (so every binade, denser near
    lo), both ends included."""
    bits = torch.tensor([lo, hi], dtype=torch.float32).view(torch.int32).long()
    return torch.linspace(bits[0], bits[1], n, dtype=torch.float64).round().long().int().view(torch.float32)


def test_box_muller_log_is_accurate_over_its_inputs(isa):
    """log over max(u, 1e-7), u in [0, 1): 4M floats across every binade of [1e-7, 1], and every
    float in [1 - 2**-13, 1), where log nears 0 (its relative error matters most there)."""
    x = torch.cat([_float_range(1e-7, 1.0, 1 << 22),
                   1.0 - torch.arange(1, 1 << 11, dtype=torch.float64) * 2.0**-24]).float()
    got, _, _ = _box_muller_math(x)
    exact = torch.log(x.double())
    rel = ((got.double() - exact).abs() / exact.abs().clamp(min=2.0**-126))
    assert rel.max() < 1.5e-7, f"log: max relative error {rel.max():.3g} at x = {x[rel.argmax()]:.9g}"


def test_box_muller_sincos_is_accurate_over_its_inputs(isa):
    """sin and cos over float32(2 pi) * u, u in [0, 1): 4M floats evenly spaced over [0, 2 pi],
    4M over the bit patterns (dense near 0), and the floats next to every multiple of pi/4."""
    two_pi = torch.tensor(philox.TWO_PI, dtype=torch.float32)
    eighths = torch.arange(9, dtype=torch.float64) * (torch.pi / 4)
    near = (eighths[:, None] + torch.arange(-64, 65, dtype=torch.float64)[None, :] * 2.0**-22).flatten()
    x = torch.cat([torch.linspace(0, float(two_pi), 1 << 22, dtype=torch.float32),
                   _float_range(2.0**-126, float(two_pi), 1 << 22),
                   near.clamp(0, float(two_pi)).float(), torch.zeros(1), two_pi.reshape(1)])
    _, sin, cos = _box_muller_math(x)
    for name, got, exact in (("sin", sin, torch.sin(x.double())), ("cos", cos, torch.cos(x.double()))):
        err = (got.double() - exact).abs()
        assert err.max() < 1.2e-7, f"{name}: max error {err.max():.3g} at x = {x[err.argmax()]:.9g}"


def test_in_kernel_normals_are_accurate(isa):
    """The kernels' normals against Box-Muller in float64 on the same (bit-exact) uniforms and
    the same float32 angle: within 2e-6, a few float32 ulp of the largest normals (|z| < 5.7)."""
    seed, g, quads = 0x0F0F_1234_5678_9ABC, 5, 1 << 18
    u = torch.frombuffer(bytearray(_load().philox_uniforms(seed, g, quads)), dtype=torch.float32).view(quads, 4)
    theta = (torch.tensor(philox.TWO_PI, dtype=torch.float32) * u[:, 1::2]).double()
    r = torch.sqrt(-2 * torch.log(u[:, 0::2].clamp(min=philox.BOX_MULLER_MIN_U).double()))
    exact = torch.stack([r[:, 0] * torch.cos(theta[:, 0]), r[:, 0] * torch.sin(theta[:, 0]),
                         r[:, 1] * torch.cos(theta[:, 1]), r[:, 1] * torch.sin(theta[:, 1])], dim=-1).flatten()
    zero, one = torch.zeros(N_STEPS), torch.ones(N_STEPS)
    key = _checks.seed_tensor(seed, torch.device("cpu"), None)
    got = F.q_sample(torch.zeros(1, 4 * quads), torch.zeros(1, dtype=torch.int64), zero, one, None, key, g)[0]
    err = (got.double() - exact).abs()
    assert err.max() < 2e-6, f"max error {err.max():.3g} at element {err.argmax()}"


@pytest.mark.parametrize("n_steps, offset", [(1, 0), (1000, 5), (2**31 - 1, 2**40)])
def test_sample_t_matches_reference(n_steps, offset):
    seed = _seed()
    got = F.sample_t(seed, 257, n_steps, offset)
    assert got.dtype == torch.int64
    assert torch.equal(got, philox.timesteps(seed, 257, n_steps, offset))


# ---- q_sample and p_sample_step ---------------------------------------------------------------

CASES = list(itertools.product(SHAPES, DTYPES, ("given", "drawn")))


@pytest.mark.parametrize("shape, dtype, noise_kind", CASES)
def test_q_sample(isa, poisoned, shape, dtype, noise_kind):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    t = torch.randint(N_STEPS, (shape[0],), generator=gen)
    noise = torch.randn(shape, generator=gen).to(dtype) if noise_kind == "given" else None
    seed = None if noise is not None else _seed()
    tab_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tabs = _tables(tab_dtype)
    for layout in ("contiguous", "channels_last", "strided"):
        for t_arg in (t, t.to(torch.int32)):
            xin = _layout(x0, layout)
            nin = None if noise is None else _layout(noise, layout)
            got = F.q_sample(xin, t_arg, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], nin, seed, 4)
            assert got.dtype == dtype and got.shape == x0.shape and got.is_contiguous()
            want = reference.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], noise, seed, 4)
            torch.testing.assert_close(got, want, **tol(dtype, noise is None))
    # float64 math on the same (rounded) inputs; drawn noise is the reference's float32 normal.
    eps = noise if noise is not None else philox.normal(seed, 4, shape)
    exact = per_sample64(tabs["sqrt_ab"], t, x0) * _f64(x0) + per_sample64(tabs["sqrt_1m_ab"], t, x0) * _f64(eps)
    torch.testing.assert_close(_f64(got), exact, **tol(dtype, noise is None))


@pytest.mark.parametrize("shape, dtype, noise_kind", CASES)
def test_p_sample_step(isa, poisoned, shape, dtype, noise_kind):
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(shape, generator=gen).to(dtype)
    eps = torch.randn(shape, generator=gen).to(dtype)
    t = torch.randint(N_STEPS, (shape[0],), generator=gen)
    noise = torch.randn(shape, generator=gen).to(dtype) if noise_kind == "given" else None
    seed = None if noise is not None else _seed(99)
    tabs = _tables(torch.float64 if dtype == torch.float64 else torch.float32)
    c = (tabs["c1"], tabs["c2"], tabs["sigma"])
    for layout in ("contiguous", "channels_last", "strided"):
        for t_arg in (t, t.to(torch.int32)):
            got = F.p_sample_step(_layout(x_t, layout), _layout(eps, layout), t_arg, *c,
                                  None if noise is None else _layout(noise, layout), seed, 0)
            assert got.dtype == dtype and got.shape == x_t.shape and got.is_contiguous()
            want = reference.p_sample_step(x_t, eps, t, *c, noise, seed, 0)
            torch.testing.assert_close(got, want, **tol(dtype, noise is None))
    z = noise if noise is not None else philox.normal(seed, 0, shape)
    exact = (per_sample64(c[0], t, x_t) * _f64(x_t) - per_sample64(c[1], t, x_t) * _f64(eps)
             + per_sample64(c[2], t, x_t) * _f64(z))
    torch.testing.assert_close(_f64(got), exact, **tol(dtype, noise is None))


def test_mixed_table_dtypes_and_expanded_t(isa, poisoned):
    # float64 tables for float32 data (cast like the reference), t a stride-0 expanded view.
    x0 = torch.randn(4, 3, 9)
    t = torch.tensor(17).expand(4)
    tabs = _tables(torch.float64)
    got = F.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, _seed(), 0)
    want = reference.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, _seed(), 0)
    torch.testing.assert_close(got, want, **tol(torch.float32, drawn=True))


# Outputs of 4 MiB or more whose samples start on vector boundaries are written with
# non-temporal stores (kernels_impl.h, streams_output): float32 [65, 16384] and float64
# [33, 16384] take that path, [65, 16387] (its rows off the vector width) the plain one.
STREAMED = ((torch.float32, (65, 16, 1024)), (torch.float32, (65, 16387)), (torch.float64, (33, 16384)))


@pytest.mark.parametrize("dtype, shape", STREAMED, ids=str)
def test_large_outputs_streamed_or_not(isa, poisoned, dtype, shape):
    gen = torch.Generator().manual_seed(12)
    x, e = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2))
    t = torch.randint(N_STEPS, (shape[0],), generator=gen)
    seed = _seed(21)
    tabs = _tables(dtype)
    z = philox.normal(seed, 3, shape).to(dtype)
    a, b = per_sample64(tabs["sqrt_ab"], t, x), per_sample64(tabs["sqrt_1m_ab"], t, x)
    for noise in (e, None):  # given, then drawn
        got = F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], noise, None if noise is not None else seed, 3)
        want = a * _f64(x) + b * _f64(e if noise is not None else z)
        torch.testing.assert_close(_f64(got), want, **tol(dtype, noise is None))
    c1, c2, sg = (per_sample64(tabs[k], t, x) for k in ("c1", "c2", "sigma"))
    got = F.p_sample_step(x, e, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 3)
    torch.testing.assert_close(_f64(got), c1 * _f64(x) - c2 * _f64(e) + sg * _f64(z), **tol(dtype, True))
    # d MSE / d pred: the backward kernel (target given) and mse_loss's forward (noise drawn).
    d = x[0].numel()
    g = torch.rand(shape[0], generator=gen, dtype=dtype) + 0.5
    g64 = per_sample64(g, torch.arange(shape[0]), x)
    got = F.mse_per_sample_backward(g, x, e, None, 3)
    torch.testing.assert_close(_f64(got), 2 * g64 * (_f64(x) - _f64(e)) / d, **tol(dtype))
    pred = x.clone().requires_grad_()
    F.mse_loss(pred, None, seed, 3, None).backward()
    torch.testing.assert_close(_f64(pred.grad), 2 * (_f64(x) - _f64(z)) / (d * shape[0]), **tol(dtype, True))
    # target_mse's backward, the v target cx0[t] x0 + ceps[t] noise formed in the kernel.
    cx0, ceps = tabs["sqrt_ab"], -tabs["sqrt_1m_ab"]
    got = F.target_mse_backward(g, x, e, t, cx0, ceps, None, seed, 3)
    target = per_sample64(cx0, t, x) * _f64(e) + per_sample64(ceps, t, x) * _f64(z)
    torch.testing.assert_close(_f64(got), 2 * g64 * (_f64(x) - target) / d, **tol(dtype, True))


# ---- mse_per_sample forward and backward ------------------------------------------------------

@pytest.mark.parametrize("shape, dtype, target_kind", CASES)
def test_mse_per_sample(isa, poisoned, shape, dtype, target_kind):
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(shape, generator=gen).to(dtype)
    target = torch.randn(shape, generator=gen).to(dtype) if target_kind == "given" else None
    seed = None if target is not None else _seed(7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tgt = target if target is not None else philox.normal(seed, 1, shape)
    exact = ((_f64(pred) - _f64(tgt)) ** 2).reshape(shape[0], -1).mean(1)
    grad = torch.rand(shape[0], generator=gen, dtype=acc) + 0.5
    exact_grad = grad.to(torch.float64).view((-1,) + (1,) * (len(shape) - 1)) * 2 * (_f64(pred) - _f64(tgt)) \
        / pred[0].numel()
    for layout in ("contiguous", "channels_last", "strided"):
        pin = _layout(pred, layout)
        tin = None if target is None else _layout(target, layout)
        got = F.mse_per_sample(pin, tin, seed, 1)
        assert got.dtype == acc and got.shape == (shape[0],)
        drawn = target is None
        torch.testing.assert_close(got, reference.mse_per_sample(pred, target, seed, 1), **mse_tol(dtype, drawn))
        torch.testing.assert_close(_f64(got), exact, **mse_tol(dtype, drawn))
        # Backward kernel (noise regenerated when target is None), incoming grad expanded.
        g_pred = F.mse_per_sample_backward(grad, pin, tin, seed, 1)
        assert g_pred.dtype == dtype and g_pred.shape == shape and g_pred.is_contiguous()
        torch.testing.assert_close(_f64(g_pred), exact_grad, **tol(dtype, drawn))
    ones = torch.ones((), dtype=acc).expand(shape[0])
    torch.testing.assert_close(F.mse_per_sample_backward(ones, pred, target, seed, 1),
                               F.mse_per_sample_backward(ones.contiguous(), pred, target, seed, 1), rtol=0, atol=0)


def test_mse_autograd_matches_reference(isa):
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(3, 4, 5, 7, generator=gen)
    target = torch.randn(3, 4, 5, 7, generator=gen)
    for tgt in (target, None):
        seed = _seed(11) if tgt is None else None
        grads = []
        for fn in (F.mse_per_sample, reference.mse_per_sample):
            p = pred.clone().requires_grad_()
            tt = None if tgt is None else tgt.clone().requires_grad_()
            (fn(p, tt, seed, 2) * torch.arange(1.0, 4.0)).sum().backward()
            grads.append((p.grad, None if tt is None else tt.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], **tol(torch.float32, drawn=tgt is None))
        if tgt is not None:
            torch.testing.assert_close(grads[0][1], grads[1][1], **tol(torch.float32))


def test_mse_does_not_depend_on_thread_count(isa):
    # Many blocks per sample, several tasks: the per-sample sum is taken in a fixed order.
    pred = torch.randn(3, 3, 129, 131)
    seed = _seed(5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((F.mse_per_sample(pred, None, seed, 0), F.q_sample(pred, torch.zeros(3, dtype=torch.int64),
                            torch.ones(1), torch.ones(1), None, seed, 0)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1])
    torch.testing.assert_close(results[0][0], reference.mse_per_sample(pred, None, seed, 0),
                               **mse_tol(torch.float32, drawn=True))


def test_empty_batch(isa):
    tabs = _tables()
    x = torch.randn(0, 3, 5)
    t = torch.zeros(0, dtype=torch.int64)
    assert F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, _seed(), 0).shape == (0, 3, 5)
    assert F.p_sample_step(x, x, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, _seed(), 0).shape == (0, 3, 5)
    assert F.mse_per_sample(x, None, _seed(), 0).shape == (0,)
    assert F.mse_per_sample_backward(torch.zeros(0), x, None, _seed(), 0).shape == (0, 3, 5)
    assert F.sample_t(_seed(), 0, 10, 0).shape == (0,)


# ---- gradients --------------------------------------------------------------------------------

def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    tabs = _tables(torch.float64)
    t = torch.randint(N_STEPS, (2,), generator=gen)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, e, n = leaf(2, 3, 5), leaf(2, 3, 5), leaf(2, 3, 5)
    seed = _seed(3)
    assert torch.autograd.gradcheck(
        lambda x, n: F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], n, None, 0), (x, n))
    assert torch.autograd.gradcheck(
        lambda x: F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 0), (x,))
    assert torch.autograd.gradcheck(
        lambda x, e, n: F.p_sample_step(x, e, t, tabs["c1"], tabs["c2"], tabs["sigma"], n, None, 0), (x, e, n))
    assert torch.autograd.gradcheck(lambda p, g: F.mse_per_sample(p, g, None, 0), (x, n))
    assert torch.autograd.gradcheck(lambda p: F.mse_per_sample(p, None, seed, 3), (x,))


# ---- torch.library.opcheck and torch.compile -----------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    _load()
    for name in ("q_sample", "p_sample_step", "mse_per_sample", "sample_t"):
        for sample in sample_inputs(name, shapes=[(3, 4, 5)], dtypes=[torch.float32], n_steps=N_STEPS,
                                    requires_grad=requires_grad, seed=6):
            torch.library.opcheck(getattr(F, name).default, op_args(name, sample))
            if name == "mse_per_sample":
                torch.library.opcheck(F.mse_per_sample_backward.default, mse_backward_args(sample))


def test_torch_compile_fullgraph_matches_eager():
    _load()
    tabs = _tables()
    seed = _seed(9)
    x0 = torch.randn(4, 3, 6, 5)

    def step(x0, w):
        t = F.sample_t(seed, x0.shape[0], N_STEPS, 0)
        x_t = F.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 0)
        eps_theta = w * x_t
        loss = F.mse_per_sample(eps_theta, None, seed, 0).mean()
        x_prev = F.p_sample_step(x_t, eps_theta, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 0)
        return loss, x_prev

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        w = torch.tensor(0.7, requires_grad=True)
        loss, x_prev = fn(x0, w)
        (gw,) = torch.autograd.grad(loss + x_prev.sum(), w)
        results.append((loss, x_prev, gw))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


# ---- argument checks in C++ (the ops are public through torch.ops) -------------------------------

def test_cpp_argument_checks():
    _load()
    tabs = _tables()
    x = torch.randn(2, 3)
    t = torch.zeros(2, dtype=torch.int64)
    sa, s1 = tabs["sqrt_ab"], tabs["sqrt_1m_ab"]
    bad = [
        (lambda: F.q_sample(x.int(), t, sa, s1, None, _seed(), 0), "x0 must be float16, bfloat16"),
        (lambda: F.q_sample(x, t.float(), sa, s1, None, _seed(), 0), "t must be an int32 or int64"),
        (lambda: F.q_sample(x, t[:1], sa, s1, None, _seed(), 0), r"t must have shape \[2\]"),
        (lambda: F.q_sample(x, t + N_STEPS, sa, s1, None, _seed(), 0), r"t must lie in \[0, 50\)"),
        (lambda: F.q_sample(x, t - 1, sa, s1, None, _seed(), 0), r"t must lie in \[0, 50\)"),
        (lambda: F.q_sample(x, t, sa[:3], s1, None, _seed(), 0), "sqrt_1m_ab has 50, expected 3"),
        (lambda: F.q_sample(x, t, sa.half(), s1, None, _seed(), 0), "sqrt_ab must be float32 or float64"),
        (lambda: F.q_sample(x, t, sa[None], s1, None, _seed(), 0), "sqrt_ab must be a 1-D per-t table"),
        (lambda: F.q_sample(x, t, sa, s1, None, None, 0), "seed is required when noise is None"),
        (lambda: F.q_sample(x, t, sa, s1, None, torch.zeros(2, dtype=torch.int64), 0), "seed must be a 1-element int64"),
        (lambda: F.q_sample(x, t, sa, s1, x[:1], None, 0), "noise must have the shape of x0"),
        (lambda: F.q_sample(x, t, sa, s1, x.double(), None, 0), "noise must have the dtype of x0"),
        (lambda: F.q_sample(x, t, sa, s1, None, _seed(), -1), "sample_offset must be >= 0"),
        (lambda: F.p_sample_step(x, x[:1], t, sa, sa, sa, None, _seed(), 0), "eps_theta must have the shape of x_t"),
        (lambda: F.mse_per_sample(torch.randn(2, 0), None, _seed(), 0), "at least one element per sample"),
        (lambda: F.mse_per_sample(x, x.half(), None, 0), "target must have the dtype of pred"),
        (lambda: F.mse_per_sample_backward(torch.ones(3), x, None, _seed(), 0), r"grad must have shape \[2\]"),
        (lambda: F.sample_t(_seed(), 2, 0, 0), r"n_steps must lie in \[1, 2\*\*31\)"),
        (lambda: F.sample_t(_seed(), -1, 5, 0), "batch must be >= 0"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()


# ---- through fastddpm.ops (the cpu backend module) ------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
def test_ops_layer_on_cpu_backend(poisoned, requires_grad):
    """ops.* with backend="cpu" (the ops called as they are, their autograd in C++) agree
    with the reference backend, values and gradients."""
    _load()
    tabs = _tables()
    gen = torch.Generator().manual_seed(12)
    x0 = torch.randn(3, 2, 5, 7, generator=gen)
    eps = torch.randn(3, 2, 5, 7, generator=gen)
    t = torch.randint(N_STEPS, (3,), generator=gen)
    results = {}
    for backend in ("cpu", "reference"):
        x = x0.clone().requires_grad_(requires_grad)
        x_t = ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=21, sample_offset=1, backend=backend)
        x_prev = ops.p_sample_step(x_t, eps, t, tabs["c1"], tabs["c2"], tabs["sigma"], seed=22, backend=backend)
        loss = ops.mse_per_sample(x_t, seed=21, sample_offset=1, backend=backend)
        steps = ops.sample_t(23, 5, N_STEPS, backend=backend)
        assert x_t.requires_grad == requires_grad and loss.requires_grad == requires_grad
        grad = torch.autograd.grad((loss.sum() + x_prev.sum()), x)[0] if requires_grad else None
        results[backend] = (x_t, x_prev, loss, steps, grad)
    for got, want in zip(results["cpu"], results["reference"]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol(torch.float32, drawn=True))


def test_without_extension_the_package_runs_on_reference_and_says_why_once():
    """With _C unimportable: fastddpm imports, warns once with the reason, cpu is unavailable."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastddpm._C":
                    raise ImportError("fastddpm._C blocked by the test")
        sys.meta_path.insert(0, Block())
        import torch, fastddpm
        from fastddpm import ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backends = fastddpm.available_backends()
            fastddpm.available_backends()
            x = ops.q_sample(torch.randn(2, 3), 0, torch.ones(3), torch.zeros(3))
        assert "cpu" not in backends and "reference" in backends, backends
        msgs = [str(w.message) for w in caught if "fastddpm._C" in str(w.message)]
        assert len(msgs) == 1 and "blocked by the test" in msgs[0], msgs
        try:
            ops.q_sample(x, 0, torch.ones(3), torch.zeros(3), backend="cpu")
        except fastddpm.BackendUnavailableError as e:
            assert "blocked by the test" in str(e), e
        else:
            raise AssertionError("backend='cpu' ran without _C")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr
