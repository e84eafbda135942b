"""The triton backend's clipped_step and target_mse against the reference backend.

Run in Triton's interpreter on CPU tensors without a GPU (tests/conftest.py), compiled on a
CUDA machine. Outputs are NaN-poisoned (the ``poisoned`` fixture); shapes are small but for one
of two 1024-element blocks with a ragged last quad (2x3x19x23), and one of two MSE chunks.
opcheck's fake-tensor and aot_dispatch tests cannot trace the interpreter: here opcheck checks
the schema and the autograd registration, and tests/test_triton.py's subprocess scripts check
the fake kernels under symbolic shapes and compile the kernels for sm_90.
"""
import os

import pytest
import torch
from torch.testing import assert_close

from fastddpm import ops
from fastddpm.backends.triton import ops as triton_ops  # noqa: F401 (registers fastddpm_triton)
from helpers import DTYPES, OFFSETS, assert_rounded_like, mse_tol, seed_tensor, table_dtype, tol

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
NS = torch.ops.fastddpm_triton
N_STEPS = 9
ZERO_S = (0, 4)  # steps whose noise coefficient (s, ceps) is 0: the stream is not drawn there
SHAPES = [(4, 7), (2, 3, 19, 23), (1, 1)]  # D = 7, 1311 (two blocks), 1
MODES = ("plain", "clip", "bound", "guided")


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _t(batch, int32, seed=1):
    """Steps covering a zero-noise step first, then random ones."""
    t = torch.randint(0, N_STEPS, (batch,), generator=torch.Generator().manual_seed(seed))
    t[0] = ZERO_S[seed % 2]
    if batch > 1:
        t[1] = N_STEPS - 1
    return (t.int() if int32 else t).to(DEVICE)


def _step_tables(dtype, seed=3):
    """a, b, p, q, r, s: a x_t + b out of either sign and beyond +-1, so clipping bites."""
    g = torch.Generator().manual_seed(seed)
    tabs = {k: (torch.rand(N_STEPS, generator=g, dtype=torch.float64) * 2 - 0.5) for k in "abpqrs"}
    tabs["a"] = tabs["a"] + 1
    tabs["s"][list(ZERO_S)] = 0
    return {k: v.to(DEVICE, dtype) for k, v in tabs.items()}


def _target_tables(dtype, seed=4):
    g = torch.Generator().manual_seed(seed)
    cx0 = torch.rand(N_STEPS, generator=g, dtype=torch.float64) * 2 - 1
    ceps = torch.rand(N_STEPS, generator=g, dtype=torch.float64) + 0.5
    ceps[list(ZERO_S)] = 0
    return cx0.to(DEVICE, dtype), ceps.to(DEVICE, dtype)


def _mode_kwargs(mode, x_t, dtype):
    if mode == "clip":
        return dict(clip=1.0)
    if mode == "bound":  # per-sample thresholds >= 1 (Imagen's), float32 for half data
        g = torch.Generator().manual_seed(5)
        return dict(bound=(1 + 2 * torch.rand(x_t.shape[0], generator=g, dtype=torch.float64)).to(
            DEVICE, table_dtype(dtype)))
    if mode == "guided":
        return dict(out_cond=_randn(x_t.shape, dtype, 6), guidance=2.5)
    return {}


# ---- clipped_step -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given_noise", [True, False])
def test_clipped_step_matches_reference(poisoned, dtype, shape, given_noise):
    tabs = _step_tables(table_dtype(dtype))
    x_t, out = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    t = _t(shape[0], int32=not given_noise)
    noise = _randn(shape, dtype, 7) if given_noise else None
    for i, mode in enumerate(MODES):
        kwargs = dict(_mode_kwargs(mode, x_t, dtype), sample_offset=OFFSETS[i % len(OFFSETS)])
        if not given_noise:
            kwargs["seed"] = seed_tensor(2**64 - 1 - i, DEVICE)
        args = (x_t, out, t, *tabs.values(), noise)
        got = ops.clipped_step(*args, **kwargs, backend="triton")
        expect = ops.clipped_step(*args, **kwargs, backend="reference")
        assert got.dtype == dtype and got.shape == shape and got.is_contiguous()
        assert_close(got, expect, **tol(dtype, not given_noise), msg=lambda m: f"{mode}: {m}")
        if given_noise:
            assert_rounded_like(got, expect, f"{mode}: ")


def test_clipped_step_clamps_and_propagates_nan(poisoned):
    # The clamp is active (some |a x_t + b out| > clip), inf is clamped to +-clip, NaN passes
    # through as in torch.clamp, and clip=inf (clip None) does not clamp.
    tabs = _step_tables(torch.float32)
    x_t, out = _randn((3, 40), torch.float32, 1) * 3, _randn((3, 40), torch.float32, 2)
    x_t[0, 0], x_t[1, 3], x_t[2, 5] = float("nan"), float("inf"), -float("inf")
    t = torch.tensor([2, 5, 7], device=DEVICE)
    a, b = tabs["a"][t].view(-1, 1), tabs["b"][t].view(-1, 1)
    assert ((a * x_t + b * out).abs() > 1).any()
    bound = torch.tensor([1.0, 2.0, 1.5], device=DEVICE)
    for kwargs in (dict(clip=1.0), dict(bound=bound), {}):
        args = (x_t, out, t, *tabs.values())
        got = ops.clipped_step(*args, seed=1, **kwargs, backend="triton")
        expect = ops.clipped_step(*args, seed=1, **kwargs, backend="reference")
        assert got[0, 0].isnan()
        assert_close(got, expect, equal_nan=True, **tol(torch.float32, drawn=True))
    # p = 1, q = r = s = 0: the output is x0 itself (an inf x_t would give q x_t = 0 * inf = NaN):
    # NaN at the NaN, within [-clip, clip] elsewhere and reaching it.
    one, zero = torch.ones(N_STEPS, device=DEVICE), torch.zeros(N_STEPS, device=DEVICE)
    x_nan = torch.where(x_t.isinf(), 0.0, x_t)
    x0 = ops.clipped_step(x_nan, out, t, tabs["a"], tabs["b"], one, zero, zero, zero, seed=1, clip=0.5,
                          backend="triton")
    finite = ~x0.isnan()
    assert finite.sum() == x0.numel() - 1 and x0[0, 0].isnan()
    assert (x0[finite].abs() <= 0.5).all() and (x0[finite].abs() == 0.5).any()


def test_clipped_step_skips_the_stream_only_where_s_is_zero(poisoned):
    # With s[t] = 0 the output must not depend on the seed; elsewhere it must.
    tabs = _step_tables(torch.float32)
    x_t, out = _randn((4, 30), torch.float32, 1), _randn((4, 30), torch.float32, 2)
    t = torch.tensor([ZERO_S[0], 2, ZERO_S[1], 3], device=DEVICE)
    y1, y2 = (ops.clipped_step(x_t, out, t, *tabs.values(), seed=s, backend="triton") for s in (1, 2))
    zero = tabs["s"][t] == 0
    assert torch.equal(y1[zero], y2[zero]) and (y1[~zero] != y2[~zero]).all()
    # and the skipped samples equal the noiseless formula with a zero noise tensor.
    assert torch.equal(y1[zero], ops.clipped_step(x_t, out, t, *tabs.values(), torch.zeros_like(x_t),
                                                  backend="triton")[zero])


@pytest.mark.parametrize("w", [1 / 3, 0.0, -0.0, -2.5, 5e-324])
def test_clipped_step_raw_op_clip_inf_and_float64_scalars(poisoned, w):
    # The raw op with clip=inf clamps nothing; float64 data sees the float64 guidance exactly
    # (1/3 is no float32 value; the bits of 0.0 and 5e-324 reach the kernel as an i32 0 and a
    # constexpr 1, those of -0.0 as -2**63).
    tabs = _step_tables(torch.float64)
    x_t, out, cond = (_randn((3, 11), torch.float64, s) for s in (1, 2, 3))
    t = torch.tensor([1, 2, 3], device=DEVICE)
    got = NS.clipped_step(x_t, out, cond, t, *tabs.values(), None, float("inf"), w, x_t, None, 0)
    o = out + w * (cond - out)
    k = {n: tab[t].view(-1, 1) for n, tab in tabs.items()}
    exact = k["p"] * (k["a"] * x_t + k["b"] * o) + k["q"] * x_t + k["r"] * o + k["s"] * x_t
    assert_close(got, exact, **tol(torch.float64))


def test_schemas_match_the_cpp_ops():
    # One schema per op on every backend (triton_op infers SymInt for an int argument).
    from fastddpm import _extension
    assert _extension.load() is not None, _extension.error()
    for name in ("clipped_step", "target_mse", "target_mse_backward"):
        ours = str(getattr(NS, name).default._schema).replace("SymInt sample_offset", "int sample_offset")
        theirs = str(getattr(torch.ops.fastddpm, name).default._schema)
        assert ours.replace("fastddpm_triton::", "fastddpm::") == theirs


def test_clipped_step_has_no_backward():
    tabs = _step_tables(torch.float32)
    x_t, out = _randn((2, 5), torch.float32, 1), _randn((2, 5), torch.float32, 2)
    t = torch.tensor([1, 2], device=DEVICE)
    message = "clipped_step on the triton backend has no backward"
    for needs_grad in ("x_t", "out", "a"):
        args = {"x_t": x_t, "out": out, **tabs}
        args[needs_grad] = args[needs_grad].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=message):
            ops.clipped_step(**args, t=t, seed=1, backend="triton")
        with torch.no_grad():  # no gradient asked for: it runs, as without requires_grad
            got = ops.clipped_step(**args, t=t, seed=1, backend="triton")
        assert_close(got, ops.clipped_step(x_t, out, t, *tabs.values(), seed=1, backend="triton"))
    # The reference backend is PyTorch's autograd, for whoever needs the gradient.
    xr = x_t.clone().requires_grad_()
    ops.clipped_step(xr, out, t, *tabs.values(), seed=1, backend="reference").sum().backward()
    assert xr.grad is not None


# ---- target_mse ---------------------------------------------------------------------------

# D = 18483: two MSE chunks and the finishing kernel. The chunking is dtype-independent: one
# dtype keeps the interpreter quick.
CHUNKED = [(torch.float32, (2, 3, 101, 61))]


@pytest.mark.parametrize("dtype,shape", [(d, s) for d in DTYPES for s in SHAPES] + CHUNKED, ids=str)
@pytest.mark.parametrize("given_noise", [True, False])
def test_target_mse_matches_reference(poisoned, dtype, shape, given_noise):
    cx0, ceps = _target_tables(table_dtype(dtype))
    pred, x0 = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    t = _t(shape[0], int32=given_noise, seed=shape[0])
    noise = _randn(shape, dtype, 3) if given_noise else None
    kwargs = dict(sample_offset=OFFSETS[len(shape) % len(OFFSETS)], seed=None if given_noise else 2**63 + 5)
    got = ops.target_mse(pred, x0, t, cx0, ceps, noise, **kwargs, backend="triton")
    expect = ops.target_mse(pred, x0, t, cx0, ceps, noise, **kwargs, backend="reference")
    assert got.dtype == table_dtype(dtype) and got.shape == (shape[0],)
    assert_close(got, expect, **mse_tol(dtype, not given_noise))
    # Deterministic: no atomics in the reduction.
    assert torch.equal(got, ops.target_mse(pred, x0, t, cx0, ceps, noise, **kwargs, backend="triton"))


def test_target_mse_skips_the_stream_only_where_ceps_is_zero(poisoned):
    cx0, ceps = _target_tables(torch.float32)
    pred, x0 = _randn((4, 30), torch.float32, 1), _randn((4, 30), torch.float32, 2)
    t = torch.tensor([ZERO_S[0], 2, ZERO_S[1], 3], device=DEVICE)
    m1, m2 = (ops.target_mse(pred, x0, t, cx0, ceps, seed=s, backend="triton") for s in (1, 2))
    zero = ceps[t] == 0
    assert torch.equal(m1[zero], m2[zero]) and (m1[~zero] != m2[~zero]).all()
    exact = ((pred.double() - cx0.double()[t].view(-1, 1) * x0.double()) ** 2).mean(1)
    assert_close(m1[zero], exact[zero].float(), **mse_tol(torch.float32))
    # The backward regenerates the same (skipped) stream.
    g = NS.target_mse_backward(torch.ones(4, device=DEVICE), pred, x0, t, cx0, ceps, None, seed_tensor(1, DEVICE), 0)
    expect = 2 / 30 * (pred.double() - cx0.double()[t].view(-1, 1) * x0.double())
    assert_close(g[zero], expect[zero].float(), rtol=1e-6, atol=1e-7)


def _target_mse_grads(backend, dtype, given_noise, tables_grad):
    shape = (5, 3, 7)
    cx0, ceps = _target_tables(table_dtype(dtype))
    leaves = {"pred": _randn(shape, dtype, 1), "x0": _randn(shape, dtype, 2), "cx0": cx0, "ceps": ceps}
    if given_noise:
        leaves["noise"] = _randn(shape, dtype, 3)
    names = ["pred", "x0"] + (["noise"] if given_noise else []) + (["cx0", "ceps"] if tables_grad else [])
    leaves = {k: v.clone().requires_grad_(k in names) for k, v in leaves.items()}
    t = torch.tensor([3, ZERO_S[0], 3, 8, 1], device=DEVICE)  # a repeated step: its table grads add up
    out = ops.target_mse(leaves["pred"], leaves["x0"], t, leaves["cx0"], leaves["ceps"], leaves.get("noise"),
                         seed=9, sample_offset=3, backend=backend)
    w = _randn((shape[0],), out.dtype, 4)
    # A weighted sum (one gradient per sample) plus the mean (a stride-0 incoming gradient).
    grads = torch.autograd.grad((out * w).sum() + out.mean(), [leaves[k] for k in names])
    return out.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_noise", [True, False])
def test_target_mse_gradients_match_reference_autograd(poisoned, dtype, given_noise):
    # Table gradients for float32/float64 data: for half data the d/dpred they sum is rounded
    # to the half dtype (the backward op's output), which the reference never does.
    tables_grad = dtype not in (torch.float16, torch.bfloat16)
    out, got = _target_mse_grads("triton", dtype, given_noise, tables_grad)
    ref_out, expect = _target_mse_grads("reference", dtype, given_noise, tables_grad)
    assert_close(out, ref_out, **mse_tol(dtype, not given_noise))
    assert set(got) == set(expect)
    for name, g in got.items():
        assert g.dtype == expect[name].dtype, name
        assert_close(g, expect[name], **tol(g.dtype, not given_noise), msg=lambda m: f"d/d{name}: {m}")


def test_target_mse_saves_the_seed_not_the_generated_noise():
    cx0, ceps = _target_tables(torch.float32)
    pred = _randn((3, 8), torch.float32, 1).requires_grad_()
    x0 = _randn((3, 8), torch.float32, 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = ops.target_mse(pred, x0, torch.tensor([1, 2, 3], device=DEVICE), cx0, ceps, seed=4, backend="triton")
    # pred, x0, t, the two tables and the 1-element seed; nothing of the noise's size.
    assert sorted(x.numel() for x in saved) == [1, 3, 9, 9, 24, 24]
    out.sum().backward()


def test_target_mse_double_backward_is_a_clear_error():
    cx0, ceps = _target_tables(torch.float32)
    pred = _randn((3, 4), torch.float32, 1).requires_grad_()
    out = ops.target_mse(pred, _randn((3, 4), torch.float32, 2), torch.tensor([1, 2, 3], device=DEVICE), cx0, ceps, seed=1,
                         backend="triton")
    (g,) = torch.autograd.grad(out.sum(), pred, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through target_mse is not supported"):
        g.sum().backward()


def test_forward_mode_ad_raises():
    cx0, ceps = _target_tables(torch.float32)
    tabs = _step_tables(torch.float32)
    x, tangent = _randn((2, 3), torch.float32, 1), torch.ones(2, 3, device=DEVICE)
    t = torch.tensor([1, 4], device=DEVICE)
    calls = {"target_mse": lambda p: ops.target_mse(p, x, t, cx0, ceps, seed=1, backend="triton"),
             "clipped_step": lambda v: ops.clipped_step(v, x, t, *tabs.values(), seed=1, backend="triton")}
    for name, fn in calls.items():
        with pytest.raises(RuntimeError, match=f"fastddpm: {name} on the triton .*has no forward-mode AD"):
            torch.func.jvp(fn, (x,), (tangent,))


# ---- edges, argument checks and opcheck ----------------------------------------------------

def test_empty_batches(poisoned):
    tabs = _step_tables(torch.float32)
    cx0, ceps = _target_tables(torch.float32)
    for shape in [(0, 3, 4), (2, 0)]:
        x = _randn(shape, torch.float32, 1)
        t = torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
        got = NS.clipped_step(x, x, x, t, *tabs.values(), None, 1.0, 2.0, None, seed_tensor(1, DEVICE), 0)
        assert got.shape == shape
        assert NS.target_mse_backward(torch.ones(shape[0], device=DEVICE), x, x, t, cx0, ceps, None, seed_tensor(1, DEVICE), 0).shape == shape
    assert ops.target_mse(*(_randn((0, 5), torch.float16, 1),) * 2, torch.zeros(0, dtype=torch.int64, device=DEVICE), cx0, ceps,
                          seed=1, backend="triton").shape == (0,)
    # The raw op's mean of no elements, as torch.mean gives it.
    empty = _randn((2, 0), torch.float32, 1)
    assert NS.target_mse(empty, empty, torch.zeros(2, dtype=torch.int64, device=DEVICE), cx0, ceps, None,
                         seed_tensor(1, DEVICE), 0).isnan().all()


def _clipped_raw_args(**change):
    tabs = _step_tables(torch.float32)
    x = _randn((3, 5), torch.float32, 1)
    args = dict(x_t=x, out=x.clone(), out_cond=None, t=torch.tensor([1, 2, 3], device=DEVICE), **tabs, bound=None, clip=1.0,
                guidance=1.0, noise=None, seed=seed_tensor(2, DEVICE), sample_offset=0)
    args.update(change)
    return tuple(args.values())


def _target_raw_args(**change):
    cx0, ceps = _target_tables(torch.float32)
    x = _randn((3, 5), torch.float32, 1)
    args = dict(pred=x, x0=x.clone(), t=torch.tensor([1, 2, 3], device=DEVICE), cx0=cx0, ceps=ceps, noise=None,
                seed=seed_tensor(2, DEVICE), sample_offset=0)
    args.update(change)
    return tuple(args.values())


X = _randn((3, 5), torch.float32, 1)
BAD_CLIPPED = [
    (dict(clip=0.0), ValueError, "clip must be > 0 \\(inf for no clipping\\), got 0.0"),
    (dict(clip=-1.0), ValueError, "clip must be > 0"),
    (dict(clip=float("nan")), ValueError, "clip must be > 0"),
    (dict(guidance=float("inf")), ValueError, "guidance must be finite, got inf"),
    (dict(guidance=float("nan")), ValueError, "guidance must be finite"),
    (dict(bound=torch.ones(3, device=DEVICE)), ValueError, "pass clip or bound, not both"),
    (dict(bound=torch.ones(4, device=DEVICE), clip=float("inf")), ValueError, "bound must have shape \\[3\\]"),
    (dict(bound=torch.ones(3, dtype=torch.float16, device=DEVICE), clip=float("inf")), TypeError,
     "bound must be float32 or float64, got torch.float16"),
    (dict(bound=torch.ones(3, device="meta"), clip=float("inf")), RuntimeError, "bound is on meta"),
    (dict(out=X.double()), TypeError, "out must have the dtype of x_t"),
    (dict(out=X[:2]), ValueError, "out must have the shape of x_t"),
    (dict(out_cond=X.half()), TypeError, "out_cond must have the dtype of x_t"),
    (dict(noise=X.double()), TypeError, "noise must have the dtype of x_t"),
    (dict(q=torch.ones(N_STEPS, dtype=torch.int32, device=DEVICE)), TypeError, "q must be float32 or float64"),
    (dict(s=torch.ones(N_STEPS + 1, device=DEVICE)), ValueError, "tables must have one length; s has"),
    (dict(t=torch.tensor([1.0, 2.0, 3.0], device=DEVICE)), TypeError, "t must be an int32 or int64 tensor"),
    (dict(t=torch.tensor([1, 2], device=DEVICE)), ValueError, "t must have shape \\[3\\]"),
    (dict(seed=None), ValueError, "either a noise/target tensor or a seed is required"),
    (dict(seed=torch.tensor([1, 2], device=DEVICE)), TypeError, "seed must be a 1-element int64 tensor"),
]
BAD_TARGET = [
    (dict(x0=X.half()), TypeError, "x0 must have the dtype of pred"),
    (dict(x0=X[:, :3]), ValueError, "x0 must have the shape of pred"),
    (dict(noise=X.bfloat16()), TypeError, "noise must have the dtype of pred"),
    (dict(cx0=torch.ones(2, N_STEPS, device=DEVICE)), ValueError, "cx0 must be a 1-D per-t table"),
    (dict(ceps=torch.ones(N_STEPS, device="meta")), RuntimeError, "ceps is on meta"),
    (dict(t=torch.tensor([1, 2, 3], dtype=torch.int16, device=DEVICE)), TypeError, "t must be an int32 or int64 tensor"),
    (dict(seed=None), ValueError, "either a noise/target tensor or a seed is required"),
]


@pytest.mark.parametrize("change,error,message", BAD_CLIPPED, ids=lambda v: str(v)[:40])
def test_clipped_step_raw_op_argument_errors(change, error, message):
    with pytest.raises(error, match=message):
        NS.clipped_step(*_clipped_raw_args(**change))


@pytest.mark.parametrize("change,error,message", BAD_TARGET, ids=lambda v: str(v)[:40])
def test_target_mse_raw_op_argument_errors(change, error, message):
    for op, args in ((NS.target_mse, _target_raw_args(**change)),
                     (NS.target_mse_backward, (torch.ones(3, device=DEVICE),) + _target_raw_args(**change))):
        with pytest.raises(error, match=message):
            op(*args)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    # Under the interpreter only the schema and autograd-registration checks can run.
    utils = dict(test_utils=("test_schema", "test_autograd_registration")) if INTERPRET else {}
    cx0, ceps = _target_tables(torch.float32)
    pred, x0, noise = (_randn((3, 2, 5), torch.float32, s).requires_grad_(requires_grad) for s in (1, 2, 3))
    cx0, ceps = cx0.requires_grad_(requires_grad), ceps.requires_grad_(requires_grad)
    t, seed = torch.tensor([4, 1, 4], device=DEVICE), seed_tensor(7, DEVICE)
    for n, sd in ((noise, None), (None, seed)):
        torch.library.opcheck(NS.target_mse.default, (pred, x0, t, cx0, ceps, n, sd, 3), **utils)
        grad = torch.rand(3, device=DEVICE) + 0.5
        torch.library.opcheck(NS.target_mse_backward.default,
                              (grad, pred.detach(), x0.detach(), t, cx0.detach(), ceps.detach(),
                               None if n is None else n.detach(), sd, 3), **utils)
    if requires_grad:
        return  # clipped_step refuses gradients (test_clipped_step_has_no_backward)
    tabs = _step_tables(torch.float32)
    bound = torch.tensor([1.0, 1.5, 3.0], device=DEVICE)
    for out_cond, bnd, clip, n, sd in ((x0, None, 1.0, None, seed), (None, bound, float("inf"), noise, None),
                                        (None, None, float("inf"), None, seed)):
        torch.library.opcheck(NS.clipped_step.default, (pred, x0, out_cond, t, *tabs.values(), bnd, clip, 2.0, n, sd,
                                                        5), **utils)
