"""The triton backend's vlb_loss (forward and d/dout) against the reference (objectives.vlb_terms
with PyTorch's autograd), in Triton's interpreter on CPU (tests/conftest.py) or compiled on a GPU.

Inputs are near a trained model's (the mean channels close to their target): there the decoder's
float32 probabilities are well conditioned, so the reference and the kernels agree closely;
far from it both compute 1 + tanh(..) of a tanh near -1 and differ as much as their tanh's ulp.
"""
import os

import pytest
import torch
from torch.testing import assert_close

from fastddpm import ops, schedule
from fastddpm.backends.triton import ops as triton_ops  # noqa: F401 (registers fastddpm_triton)
from helpers import DTYPES, seed_tensor, table_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
NS = torch.ops.fastddpm_triton
N_STEPS = 9
MEANS = ("eps", "x0")
VARIANCES = ("learned", "learned_range", "fixed")
# (B, C, spatial...): C = 1..4, odd spatial sizes; D = 21, 75, 1311 (two blocks, ragged last quad).
SHAPES = [(3, 1, 21), (4, 3, 5, 5), (2, 3, 19, 23)]
CHUNKED = (2, 2, 101, 91)  # D = 18382: two chunks of the per-sample sums and the finishing kernel


def _tables(dtype, fixed_variance="small"):
    tabs = schedule.vlb_tables(schedule.linear(N_STEPS), fixed_variance)
    return torch.stack([tabs[k] for k in schedule.VLB_COLUMNS], 1).to(DEVICE, dtype)


def _inputs(shape, dtype, mean_type, variance_type, seed=0):
    """x0 in [-1, 1] with exact edges -1 and 1; noise; out whose mean channels are near their target
    (eps or x0) and whose variance channels are in about [-1.2, 1.2] (learned range) or near
    the posterior's log variance (learned); t with 0 (the decoder) mixed with t > 0."""
    g = torch.Generator().manual_seed(seed)
    b, c = shape[0], shape[1]
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    flat = x0.view(b, -1)
    flat[:, 0], flat[:, 1], flat[:, -1] = -1.0, 1.0, -1.0
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    target = noise if mean_type == "eps" else x0
    mean = target + 0.003 * torch.randn(shape, generator=g, dtype=torch.float64)
    parts = [mean]
    if variance_type == "learned_range":
        parts.append(torch.rand(shape, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    elif variance_type == "learned":
        parts.append(-7 + 4 * torch.rand(shape, generator=g, dtype=torch.float64))
    out = torch.cat(parts, 1)
    t = torch.randint(1, N_STEPS, (b,), generator=g)
    t[0] = 0
    if b > 2:
        t[2] = 0
    to = lambda v: v.to(DEVICE, dtype)  # noqa: E731
    return to(x0), to(out), t.to(DEVICE), to(noise)


def _loss_and_grad(backend, x0, out, t, tables, noise, w, **kwargs):
    o = out.clone().requires_grad_()
    loss = ops.vlb_loss(x0, o, t, tables, noise, backend=backend, **kwargs)
    (g,) = torch.autograd.grad((loss * w).sum(), o)
    return loss.detach(), g


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-11)
    if dtype == torch.float32:
        return dict(rtol=2e-4, atol=2e-5)
    return dict(rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean_type", MEANS)
@pytest.mark.parametrize("variance_type", VARIANCES)
def test_vlb_matches_reference(poisoned, dtype, mean_type, variance_type):
    tables = _tables(table_dtype(dtype), "large" if variance_type == "fixed" else "small")
    shapes = SHAPES if dtype in (torch.float32, torch.float64) else SHAPES[:2]
    for i, shape in enumerate(shapes):
        x0, out, t, noise = _inputs(shape, dtype, mean_type, variance_type, seed=i)
        g = torch.Generator().manual_seed(50 + i)
        w = (torch.rand(shape[0], 2, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, table_dtype(dtype))
        for detach in (True, False):
            kw = dict(mean_type=mean_type, variance_type=variance_type, detach_mean=detach)
            what = f"{shape}, detach_mean={detach}: "
            loss, grad = _loss_and_grad("triton", x0, out, t, tables, noise, w, **kw)
            ref_loss, ref_grad = _loss_and_grad("reference", x0, out, t, tables, noise, w, **kw)
            assert loss.shape == (shape[0], 2) and loss.dtype == table_dtype(dtype)
            assert grad.shape == out.shape and grad.dtype == dtype
            assert_close(loss, ref_loss, **_tol(dtype), msg=lambda m: what + m)
            # Gradients relative to their largest: the half types round d/dout to their own ulp.
            scale = ref_grad.abs().max().item()
            # float32: the decoder's d/dmean at t == 0 (|d/dout| ~ 20 there) loses ~1e-3 relative
            # in either float32 computation (the difference of two CDFs).
            tol = dict(rtol=1e-3, atol=2e-5) if dtype == torch.float32 else _tol(dtype)
            assert_close(grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1),
                         msg=lambda m: what + m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mean_type", MEANS)
def test_vlb_drawn_noise_is_the_normal_stream(poisoned, dtype, mean_type):
    # Drawn noise: the reference given ops.normal's stream; the mean loss's expanded gradient.
    shape = (3, 2, 7, 5)
    x0, out, t, _ = _inputs(shape, dtype, mean_type, "learned_range", seed=4)
    tables = _tables(table_dtype(dtype))
    for offset in (0, 2**32 - 2):
        seed = seed_tensor(2**64 - 11, DEVICE)
        noise = ops.normal(shape, seed=seed, sample_offset=offset, dtype=dtype, backend="triton") \
            if hasattr(ops, "normal") else NS.normal(seed, list(shape), offset, dtype)
        # out's mean channels near this noise, so the eps model is near its target.
        if mean_type == "eps":
            out = torch.cat([noise + 0.15 * (out[:, :2] - x0), out[:, 2:]], 1)
        res = []
        for backend, n, sd in (("triton", None, seed), ("reference", noise, None)):
            o = out.clone().requires_grad_()
            loss = ops.vlb_loss(x0, o, t, tables, n, seed=sd, sample_offset=offset, backend=backend,
                                mean_type=mean_type, detach_mean=False)
            loss.mean().backward()  # an expanded (stride-0) incoming gradient
            res.append((loss.detach(), o.grad))
        tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=5e-4, atol=5e-5)
        assert_close(res[0][0], res[1][0], **tol)
        assert_close(res[0][1], res[1][1], rtol=tol["rtol"], atol=tol["atol"] * max(res[1][1].abs().max().item(), 1))


def test_vlb_chunked_sums_and_strided_inputs(poisoned):
    # Two chunks per sample (the finishing kernel); a non-contiguous out and an expanded t.
    x0, out, t, noise = _inputs(CHUNKED, torch.float32, "eps", "learned_range", seed=7)
    tables = _tables(torch.float32)
    w = torch.tensor([[1.0, 2.0], [0.3, 1.5]], device=DEVICE)
    got = _loss_and_grad("triton", x0, out, t, tables, noise, w)
    expect = _loss_and_grad("reference", x0, out, t, tables, noise, w)
    assert_close(got[0], expect[0], rtol=2e-4, atol=2e-5)
    assert_close(got[1], expect[1], rtol=2e-4, atol=1e-9)
    strided = out.transpose(2, 3).contiguous().transpose(2, 3)
    t0 = torch.zeros(1, dtype=torch.int64, device=DEVICE).expand(2)
    a = ops.vlb_loss(x0, strided, t0, tables, noise, backend="triton")
    b = ops.vlb_loss(x0, out, t0.contiguous(), tables, noise, backend="triton")
    assert torch.equal(a, b)


def test_vlb_refuses_gradients_but_out_and_forward_ad():
    x0, out, t, noise = _inputs((2, 1, 5), torch.float32, "eps", "learned_range")
    tables = _tables(torch.float32)
    for name in ("x0", "tables", "noise"):
        args = dict(x0=x0, tables=tables, noise=noise)
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"vlb_loss differentiates out only, but {name} requires grad"):
            ops.vlb_loss(args["x0"], out.clone().requires_grad_(), t, args["tables"], args["noise"], backend="triton")
    with torch.no_grad():
        ops.vlb_loss(x0.clone().requires_grad_(), out, t, tables, noise, backend="triton")
    with pytest.raises(RuntimeError, match="fastddpm: vlb_loss on the triton .*has no forward-mode AD"):
        torch.func.jvp(lambda o: ops.vlb_loss(x0, o, t, tables, noise, backend="triton"), (out,),
                       (torch.ones_like(out),))
    o = out.clone().requires_grad_()
    (g,) = torch.autograd.grad(ops.vlb_loss(x0, o, t, tables, noise, backend="triton").sum(), o, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through vlb_loss is not supported"):
        g.sum().backward()


def test_vlb_saves_the_seed_not_the_generated_noise():
    x0, out, t, _ = _inputs((3, 2, 4), torch.float32, "x0", "learned")
    tables = _tables(torch.float32)
    saved = []
    o = out.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = ops.vlb_loss(x0, o, t, tables, seed=4, mean_type="x0", variance_type="learned", backend="triton")
    # x0, out, t, tables and the 1-element seed; nothing new of the data's size.
    assert sorted(x.numel() for x in saved) == [1, 3, 24, 48, 81]
    loss.sum().backward()


def _raw(**change):
    x0, out, t, noise = _inputs((3, 2, 5), torch.float32, "eps", "learned_range")
    args = dict(x0=x0, out=out, t=t, tables=_tables(torch.float32), noise=None, seed=seed_tensor(2, DEVICE),
                sample_offset=0, mean_type=0, variance_type=1, detach_mean=True)
    args.update(change)
    return tuple(args.values())


X0 = torch.zeros(3, 2, 5, device=DEVICE)
BAD = [
    (dict(out=torch.zeros(3, 2, 5, device=DEVICE)), ValueError,
     "out \\(the model's output\\) must have shape \\(3, 4, 5\\) \\(4 channels"),
    (dict(out=torch.zeros(3, 4, 5, device=DEVICE), variance_type=2), ValueError,
     "out \\(the model's output\\) must have shape \\(3, 2, 5\\) \\(2 channels"),
    (dict(out=torch.zeros(3, 4, 5, device=DEVICE).double()), TypeError, "out must have the dtype of x0"),
    (dict(x0=X0[:, 0, 0]), ValueError, "x0 must have a channel dimension \\(rank >= 2\\), got shape \\(3,\\)"),
    (dict(x0=X0.int()), TypeError, "x0 must be float16, bfloat16, float32 or float64"),
    (dict(tables=torch.zeros(N_STEPS, 8, device=DEVICE)), ValueError, "tables must have shape \\[n_steps >= 1, 9\\]"),
    (dict(tables=torch.zeros(N_STEPS * 9, device=DEVICE)), ValueError, "tables must have shape"),
    (dict(tables=torch.zeros(N_STEPS, 9, device=DEVICE).half()), TypeError, "tables must be float32 or float64"),
    (dict(tables=torch.zeros(N_STEPS, 9, device="meta")), RuntimeError, "tables is on meta"),
    (dict(t=torch.tensor([1, 2], device=DEVICE)), ValueError, "t must have shape \\[3\\]"),
    (dict(t=torch.tensor([1.0, 2.0, 3.0], device=DEVICE)), TypeError, "t must be an int32 or int64 tensor"),
    (dict(mean_type=2), ValueError, "mean_type must be 0 \\(eps\\) or 1 \\(x0\\), got 2"),
    (dict(variance_type=3), ValueError, "variance_type must be 0 \\(learned\\), 1 \\(learned_range\\) or 2"),
    (dict(noise=X0.double()), TypeError, "noise must have the dtype of x0"),
    (dict(seed=None), ValueError, "either a noise/target tensor or a seed is required"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=lambda v: str(v)[:40])
def test_vlb_raw_op_argument_errors(change, error, message):
    args = _raw(**change)
    with pytest.raises(error, match=message):
        NS.vlb_loss(*args)
    with pytest.raises(error, match=message):
        NS.vlb_loss_backward(torch.ones(3, 2, device=DEVICE), *args)


def test_vlb_out_of_range_t():
    x0, out, t, noise = _inputs((3, 2, 5), torch.float32, "eps", "learned_range")
    tables = _tables(torch.float32)
    with pytest.raises((ValueError, IndexError, RuntimeError), match="t"):
        ops.vlb_loss(x0, out, torch.tensor([0, N_STEPS, 1], device=DEVICE), tables, noise, backend="triton")
    # The raw op (torch.compile's path, no host check) poisons the sample instead of reading out of bounds.
    got = NS.vlb_loss(x0, out, torch.tensor([0, N_STEPS, -1], device=DEVICE), tables, noise, None, 0, 0, 1, True)
    assert got[1:, 1].isnan().all() and got[0].isfinite().all()


def test_vlb_empty(poisoned):
    tables = _tables(torch.float32)
    x0 = torch.zeros(0, 2, 3, device=DEVICE)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert NS.vlb_loss(x0, torch.zeros(0, 4, 3, device=DEVICE), t, tables, None, seed_tensor(1, DEVICE), 0, 0, 1,
                       True).shape == (0, 2)
    assert NS.vlb_loss_backward(torch.zeros(0, 2, device=DEVICE), x0, torch.zeros(0, 4, 3, device=DEVICE), t, tables,
                                None, seed_tensor(1, DEVICE), 0, 0, 1, True).shape == (0, 4, 3)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_vlb_opcheck(requires_grad):
    utils = dict(test_utils=("test_schema", "test_autograd_registration")) if INTERPRET else {}
    tables = _tables(torch.float32)
    for var_code, variance_type in enumerate(VARIANCES):
        x0, out, t, noise = _inputs((3, 2, 5), torch.float32, "eps", variance_type)
        out = out.requires_grad_(requires_grad)
        for n, sd in ((noise, None), (None, seed_tensor(7, DEVICE))):
            for mean_code in (0, 1):
                torch.library.opcheck(NS.vlb_loss.default, (x0, out, t, tables, n, sd, 3, mean_code, var_code,
                                                            mean_code == 0), **utils)
                torch.library.opcheck(NS.vlb_loss_backward.default,
                                      (torch.rand(3, 2, device=DEVICE), x0, out.detach(), t, tables, n, sd, 3,
                                       mean_code, var_code, mean_code == 1), **utils)
