"""The C++ CPU kernels of the fused variational bound, torch.ops.fastddpm.vlb_loss and
vlb_loss_backward, against the reference (objectives.vlb_terms under PyTorch autograd), on every
instruction-set build of the kernels this CPU can run: forward values and the gradient in out
for every mean_type x variance_type, both detach_mean values, every dtype, odd shapes (C = 1..4,
spatial sizes not multiples of the blocks), samples at t == 0 (the decoder NLL, x0 at -1, 1 and
inside) mixed with t > 0 (the KL), the noise given or drawn, an expanded incoming gradient; the
refusal of gradients for x0 / tables / noise, forward AD, opcheck and the argument checks.
"""
import math

import pytest
import torch

from fastddpm import ops, philox, schedule
from fastddpm.backends import reference
from helpers import DTYPES, HALF_DTYPES, seed_tensor
from test_cpu_kernels import _load, isa  # noqa: F401  (isa: a fixture, one build of the kernels per run)

F = torch.ops.fastddpm
N_STEPS = 25
MEAN_TYPES = (0, 1)  # eps, x0
VARIANCE_TYPES = (0, 1, 2)  # learned, learned_range, fixed
# x0's shapes: C = 1..4, spatial sizes odd and not multiples of the CPU's vectors or blocks; the
# last has 2 blocks of 2048 per sample plus a partial one (D = 3 * 37 * 41 = 4551).
VLB_SHAPES = ((3, 1, 5), (4, 2, 3, 7), (5, 3, 9, 11), (2, 4, 1, 1), (3, 3, 37, 41))
SEED = 0x1234_5678_9ABC_DEF0

# Forward (mse, vb) and d/dout tolerances against the reference, per data dtype. float32: sums of
# D terms in another order, Sleef's exp against PyTorch's; the half types are rounded data with
# float32 math on both sides, their gradients rounded once to the half type.
FWD_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
           torch.float16: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-5, atol=2e-6)}
GRAD_TOL = {torch.float32: dict(rtol=2e-4, atol=1e-7), torch.float64: dict(rtol=1e-7, atol=1e-12),
            torch.float16: dict(rtol=4e-3, atol=1e-6), torch.bfloat16: dict(rtol=3e-2, atol=1e-6)}


def _tables(dtype=torch.float32, fixed_variance="small"):
    tabs = schedule.vlb_tables(schedule.linear(N_STEPS), fixed_variance)
    return torch.stack([tabs[c] for c in schedule.VLB_COLUMNS], 1).to(dtype).contiguous()


def _inputs(shape, dtype, mean_type, variance_type, seed=0, drawn=False, t=None):
    """vlb_loss's arguments as a dict in schema order. x0 in [-1, 1] with a share of exactly -1
    and 1 (the decoder's open bins); t: sample 0 at 0, then alternating 0 and random > 0."""
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[0], shape[1]
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    edge = torch.rand(shape, generator=gen)
    x0[edge < 0.15] = -1.0
    x0[edge > 0.85] = 1.0
    if t is None:
        t = torch.randint(1, N_STEPS, (b,), generator=gen)
        t[::2] = 0
    tables = _tables(torch.float64 if dtype == torch.float64 else torch.float32)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    mean = torch.randn(shape, generator=gen, dtype=torch.float64)
    if mean_type == 1:  # an x0 prediction near x0 (the decoder NLL then sees both clamped and open bins)
        mean = x0 + 0.05 * mean
    else:  # an eps prediction near the noise
        mean = noise + 0.3 * mean
    if variance_type == 2:
        out = mean
    else:
        v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2.4 - 1.2  # f slightly beyond [0, 1]
        if variance_type == 0:  # a log variance between the posterior's and log beta, and beyond
            lo = tables[:, 4].double()[t].view((-1,) + (1,) * (len(shape) - 1))
            hi = tables[:, 5].double()[t].view((-1,) + (1,) * (len(shape) - 1))
            v = lo + (v + 1) / 2 * (hi - lo)
        out = torch.cat([mean, v], 1)
    a = dict(x0=x0.to(dtype), out=out.to(dtype), t=t, tables=tables, noise=noise.to(dtype), seed=None,
             sample_offset=3 + seed, mean_type=mean_type, variance_type=variance_type, detach_mean=True)
    if drawn:
        a.update(noise=None, seed=seed_tensor(SEED + seed))
    return a


def _names(mean_type, variance_type):
    return ("eps", "x0")[mean_type], ("learned", "learned_range", "fixed")[variance_type]


def ref_forward(a, out=None):
    """objectives.vlb_terms on the arguments (the drawn noise as fastddpm.philox makes it)."""
    noise = a["noise"]
    if noise is None:
        noise = philox.normal(a["seed"], a["sample_offset"], a["x0"].shape)
    mean_name, var_name = _names(a["mean_type"], a["variance_type"])
    return reference.vlb_loss(a["x0"], a["out"] if out is None else out, a["t"], a["tables"], noise, None, 0,
                              a["mean_type"], a["variance_type"], a["detach_mean"])


def run(a, **change):
    return F.vlb_loss(*dict(a, **change).values())


def grads(fn, a, w):
    out = a["out"].detach().requires_grad_(True)
    loss = fn(dict(a, out=out))
    (g,) = torch.autograd.grad((loss * w).sum(), out)
    return loss.detach(), g


def _weights(batch, seed, dtype):
    gen = torch.Generator().manual_seed(100 + seed)
    return (torch.rand((batch, 2), generator=gen, dtype=torch.float64) * 2 - 0.5).to(dtype)


# ---- against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("variance_type", VARIANCE_TYPES, ids=lambda v: _names(0, v)[1])
@pytest.mark.parametrize("mean_type", MEAN_TYPES, ids=lambda m: _names(m, 0)[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vlb_matches_reference(isa, poisoned, dtype, mean_type, variance_type):  # noqa: F811
    _load()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for i, shape in enumerate(VLB_SHAPES):
        for detach in (True, False):
            drawn = (i + detach) % 2 == 1
            a = _inputs(shape, dtype, mean_type, variance_type, seed=i, drawn=drawn)
            a["detach_mean"] = detach
            what = f"shape {shape} detach_mean={detach} drawn={drawn}: "
            w = _weights(shape[0], i, acc)
            got, g_got = grads(run, a, w)
            want, g_want = grads(ref_forward, a, w)
            assert got.dtype == acc and got.shape == (shape[0], 2), what
            assert g_got.dtype == dtype and g_got.shape == a["out"].shape, what
            ftol, gtol = dict(FWD_TOL[dtype]), dict(GRAD_TOL[dtype])
            if drawn and dtype != torch.float64:  # the normals within ~1e-6 of the reference's
                ftol["rtol"], gtol["rtol"] = max(ftol["rtol"], 1e-4), max(gtol["rtol"], 1e-3)
            elif drawn:  # float64 work on float32 normals that differ by an ulp or two
                ftol, gtol = dict(rtol=1e-5, atol=1e-7), dict(rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(got, want, **ftol, msg=lambda m: what + m)
            torch.testing.assert_close(g_got.to(acc), g_want.to(acc), **gtol, msg=lambda m: what + m)
            assert torch.isfinite(g_got).all(), what


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES, ids=lambda v: _names(0, v)[1])
def test_vlb_gradients_against_float64_finite_differences(variance_type):
    # The float64 kernel's d/dout against central differences of its own forward.
    _load()
    a = _inputs((3, 2, 2, 3), torch.float64, 0, variance_type, seed=7)
    a["detach_mean"] = False
    w = _weights(3, 7, torch.float64)
    _, g = grads(run, a, w)
    out = a["out"]
    h = 1e-6
    for idx in [(0, 0, 0, 0), (0, 1, 1, 2), (1, 0, 1, 1), (2, 1, 0, 2), (2, out.shape[1] - 1, 1, 0)]:
        e = torch.zeros_like(out)
        e[idx] = h
        fd = ((run(a, out=out + e) - run(a, out=out - e)) * w).sum() / (2 * h)
        assert abs(float(fd) - float(g[idx])) <= 1e-6 * max(1.0, abs(float(fd))), (idx, float(fd), float(g[idx]))


def test_vlb_terms_by_branch(isa):  # noqa: F811
    # Each sample's vb is the KL (t > 0) or the decoder NLL (t == 0): compare per sample, all t == 0
    # and all t > 0, float64, against the reference exactly enough to tell the branches apart.
    _load()
    for t in (torch.zeros(4, dtype=torch.long), torch.tensor([1, 5, 13, N_STEPS - 1])):
        for vt in VARIANCE_TYPES:
            a = _inputs((4, 3, 5, 7), torch.float64, 0, vt, seed=3, t=t)
            torch.testing.assert_close(run(a), ref_forward(a), rtol=1e-10, atol=1e-12)


def test_vlb_drawn_noise_is_the_stream(isa):  # noqa: F811
    # Drawn noise is ops.normal's float32 stream: the same result as that noise given, bit for bit.
    _load()
    a = _inputs((3, 2, 9, 13), torch.float32, 0, 1, seed=2, drawn=True)
    z = ops.normal(a["x0"].shape, seed=a["seed"], sample_offset=a["sample_offset"], dtype=torch.float32,
                   backend="cpu")
    assert torch.equal(run(a), run(a, noise=z, seed=None))
    w = _weights(3, 2, torch.float32)
    a_given = dict(a, noise=z, seed=None)
    assert torch.equal(grads(run, a, w)[1], grads(run, a_given, w)[1])


def test_vlb_expanded_grad_and_mean_backward(isa):  # noqa: F811
    _load()
    a = _inputs((4, 3, 7, 5), torch.float32, 1, 1, seed=4)
    out = a["out"].detach().requires_grad_(True)
    run(a, out=out).mean().backward()
    out_ref = a["out"].detach().requires_grad_(True)
    ref_forward(a, out=out_ref).mean().backward()
    torch.testing.assert_close(out.grad, out_ref.grad, **GRAD_TOL[torch.float32])
    # the backward op itself on an expanded (stride 0) grad
    g = torch.tensor([[0.5, 2.0]]).expand(4, 2)
    args = list(a.values())
    got = F.vlb_loss_backward(g, *args)
    torch.testing.assert_close(got, F.vlb_loss_backward(g.contiguous(), *args), rtol=0, atol=0)


def test_vlb_through_ops_matches_reference():
    _load()
    a = _inputs((4, 3, 9, 11), torch.float32, 0, 1, seed=5)
    kw = dict(mean_type="eps", variance_type="learned_range", detach_mean=False)
    out1 = a["out"].detach().requires_grad_(True)
    out2 = a["out"].detach().requires_grad_(True)
    got = ops.vlb_loss(a["x0"], out1, a["t"], a["tables"], a["noise"], **kw, backend="cpu")
    want = ops.vlb_loss(a["x0"], out2, a["t"], a["tables"], a["noise"], **kw, backend="reference")
    torch.testing.assert_close(got, want, **FWD_TOL[torch.float32])
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(out1.grad, out2.grad, **GRAD_TOL[torch.float32])


def test_vlb_does_not_depend_on_thread_count(isa):  # noqa: F811
    _load()
    a = _inputs((3, 3, 37, 41), torch.float32, 0, 1, seed=2, drawn=True)
    w = _weights(3, 2, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(grads(run, a, w))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1])


def test_vlb_decoder_edges_and_floor(isa):  # noqa: F811
    # t == 0 with a tiny variance and the mean far off: the probabilities hit the 1e-12 floor
    # (vb = -log(1e-12) / ln 2 per element, gradient 0 there), at x0 = -1, 1 and inside.
    _load()
    x0 = torch.tensor([[[-1.0, 1.0, 0.25]]]).expand(2, 1, 3).contiguous()
    mean = torch.tensor([[[1.0, -1.0, -0.75]]]).expand(2, 1, 3).contiguous()
    out = torch.cat([mean, torch.full_like(mean, -20.0)], 1)
    a = dict(x0=x0, out=out, t=torch.zeros(2, dtype=torch.long), tables=_tables(), noise=torch.zeros_like(x0),
             seed=None, sample_offset=0, mean_type=1, variance_type=0, detach_mean=False)
    got = run(a)
    torch.testing.assert_close(got[:, 1], torch.full((2,), -math.log(1e-12) / math.log(2)), rtol=1e-6, atol=0)
    w = torch.ones(2, 2)
    g_got = grads(run, a, w)[1]
    g_ref = grads(ref_forward, a, w)[1]
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)
    assert (g_got[:, 1] == 0).all()


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 1, 0)], ids=str)
def test_vlb_of_empty_tensors(shape):
    _load()
    a = _inputs((1, shape[1], 1), torch.float32, 0, 1)
    x0 = torch.zeros(shape)
    out = torch.zeros((shape[0], 2 * shape[1]) + shape[2:])
    t = torch.zeros(shape[0], dtype=torch.long)
    r = F.vlb_loss(x0, out, t, a["tables"], torch.zeros(shape), None, 0, 0, 1, True)
    assert r.shape == (shape[0], 2)
    g = F.vlb_loss_backward(torch.ones(shape[0], 2), x0, out, t, a["tables"], torch.zeros(shape), None, 0, 0, 1, True)
    assert g.shape == out.shape


# ---- autograd: out only; no forward AD, no double backward -----------------------------------

def test_vlb_refuses_gradients_but_out():
    _load()
    a = _inputs((2, 3, 4), torch.float32, 0, 1)
    for name in ("x0", "tables", "noise"):
        call = dict(a, **{name: a[name].clone().requires_grad_(True)})
        with pytest.raises(RuntimeError, match="vlb_loss differentiates out only"):
            run(call)
    with torch.no_grad():  # no recording: no refusal
        run(dict(a, x0=a["x0"].clone().requires_grad_(True)))


def test_vlb_forward_mode_ad_raises():
    _load()
    import torch.autograd.forward_ad as fwAD
    a = _inputs((2, 3, 4), torch.float32, 0, 1)
    with fwAD.dual_level():
        out = fwAD.make_dual(a["out"], torch.ones_like(a["out"]))
        with pytest.raises(RuntimeError, match="vlb_loss on the cpu and cuda backends has no forward-mode AD"):
            run(a, out=out)


def test_vlb_double_backward_raises():
    _load()
    a = _inputs((2, 3, 4), torch.float32, 0, 1)
    out = a["out"].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(run(a, out=out).sum(), out, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through vlb_loss"):
        g.sum().backward()


def test_vlb_saves_no_new_full_size_tensor():
    # What the forward saves for backward: its inputs (the generated noise is not among them).
    _load()
    a = _inputs((2, 3, 8, 8), torch.float32, 0, 1, drawn=True)
    out = a["out"].detach().requires_grad_(True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run(a, out=out)
    big = [s for s in saved if s.numel() >= a["x0"].numel()]
    assert len(big) == 2 and any(s is a["x0"] for s in big) and any(s is out for s in big)


# ---- opcheck -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_opcheck_vlb(variance_type):
    _load()
    for drawn, mean_type in ((False, 0), (True, 1)):
        a = _inputs((3, 2, 3, 5), torch.float32, mean_type, variance_type, seed=1, drawn=drawn)
        g = torch.rand(3, 2)
        torch.library.opcheck(F.vlb_loss_backward.default, (g,) + tuple(a.values()))
        a["out"] = a["out"].requires_grad_(True)
        torch.library.opcheck(F.vlb_loss.default, tuple(a.values()))


# ---- argument checks in C++ --------------------------------------------------------------------

def test_vlb_argument_checks():
    _load()
    a = _inputs((2, 3, 4, 5), torch.float32, 0, 1)

    def raises(match, **change):
        with pytest.raises(RuntimeError, match=match):
            run(a, **change)

    # out with C channels where 2C are needed: names the model output and the expected channels
    raises(r"out \(the model output\) must have shape \[2, 6, 4, 5\] \(6 channels", out=a["x0"])
    raises(r"out \(the model output\) must have shape \[2, 3, 4, 5\] \(3 channels", variance_type=2)
    raises("t must lie in \\[0, 25\\), got t\\[1\\] = 25", t=torch.tensor([0, N_STEPS]))
    raises("t must lie in \\[0, 25\\), got t\\[0\\] = -1", t=torch.tensor([-1, 0]))
    raises(r"tables must be a float32/float64 \[n_steps, 9\] tensor", tables=a["tables"][:, :8].contiguous())
    raises(r"tables must be a float32/float64 \[n_steps, 9\] tensor", tables=a["tables"][0].contiguous())
    raises("tables must be a float32/float64", tables=a["tables"].half())
    raises("tables is empty", tables=a["tables"][:0])
    raises("noise must have the shape of x0", noise=a["noise"][:1])
    raises("noise must have the dtype of x0", noise=a["noise"].double())
    raises("seed is required when noise is None", noise=None)
    raises("out must have the dtype of x0", out=a["out"].double())
    raises("x0 must have a channel dimension", x0=a["x0"][:, 0, 0, 0], out=a["out"][:, 0, 0, 0])
    raises("mean_type must be 0 \\(eps\\) or 1 \\(x0\\), got 2", mean_type=2)
    raises("variance_type must be 0 \\(learned\\), 1 \\(learned_range\\) or 2 \\(fixed\\), got 3", variance_type=3)
    raises("t must have shape \\[2\\]", t=torch.zeros(3, dtype=torch.long))
    raises("sample_offset must be >= 0", sample_offset=-1)
    raises("x0 must be float16, bfloat16, float32 or float64", x0=a["x0"].int())
    args = list(a.values())
    with pytest.raises(RuntimeError, match=r"grad must have shape \[2, 2\]"):
        F.vlb_loss_backward(torch.ones(2), *args)


def test_vlb_python_argument_checks():
    _load()
    a = _inputs((2, 3, 4, 5), torch.float32, 0, 1)
    with pytest.raises(ValueError,
                       match=r"out \(the model's output\) has shape \(2, 3, 4, 5\), expected \(2, 6, 4, 5\): 6 channels"):
        ops.vlb_loss(a["x0"], a["x0"], a["t"], a["tables"], a["noise"], backend="cpu")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_vlb_half_result_dtype(dtype):
    _load()
    a = _inputs((2, 3, 4), dtype, 0, 1)
    assert run(a).dtype == torch.float32


def test_vlb_nan_stays_in_its_sample(isa):  # noqa: F811
    # A NaN in one sample's output (t == 0 and t > 0) makes that sample's terms NaN, not the floor.
    _load()
    for t0 in (True, False):
        a = _inputs((3, 2, 5), torch.float32, 0, 1, t=torch.tensor([0 if t0 else 4, 0, 3]))
        out = a["out"].clone()
        out[0, 0, 2] = float("nan")
        got = run(a, out=out)
        assert torch.isnan(got[0, 1]) and torch.isfinite(got[1:]).all(), t0
