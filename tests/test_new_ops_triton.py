"""The triton backend's solver_step and target_mse against the reference backend.

Run in Triton's interpreter on CPU tensors without a GPU (tests/conftest.py), compiled on a
CUDA machine. Outputs are NaN-poisoned (the ``poisoned`` fixture); shapes are small but for one
of two 1024-element blocks with a ragged last quad (2x3x19x23), and one of two MSE chunks.
(fastddpm.ops.clipped_step is solver_step with ops.clipped_coef's tables: tests/test_samplers.py.)
opcheck's fake-tensor and aot_dispatch tests cannot trace the interpreter: here opcheck checks
the schema and the autograd registration, and tests/test_triton.py's subprocess scripts check
the fake kernels under symbolic shapes and compile the kernels for sm_90.
"""
import math
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


# ---- solver_step ---------------------------------------------------------------------------

# Ranks 1 to 4: D = 1, 7, 10, 1311 (two blocks, a ragged last quad) and 1 (every int argument 1).
SOLVER_SHAPES = [(5,), (4, 7), (3, 2, 5), (2, 3, 19, 23), (1, 1)]
# (mode, R outputs, history tensors): every R in 1..4 and every history count in 0..4.
SOLVER_CASES = [("plain", 1, 0), ("clip", 2, 4), ("bound", 3, 1), ("guided", 4, 2), ("guided+bound", 4, 3),
                ("guided+clip", 1, 4)]
LAST_ROW_Z = N_STEPS - 1  # the step at which only output R's z coefficient is nonzero


def _solver_coef(n_out, n_history, dtype, seed=3):
    """[N_STEPS, R + 1, 8] tables: x0 = a x + b o with a in [0.5, 2.5) so clipping bites, other
    entries in [-1, 1). The entries the op must not read are NaN: row 0's columns 2..7 and the
    columns of absent history. Column 7 (z) is 0 in every row at ZERO_S, and at LAST_ROW_Z in
    every row but the last (the stream is still drawn there)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(N_STEPS, n_out + 1, 8, generator=g, dtype=torch.float64) * 2 - 1
    c[:, 0, 0] += 1.5
    c[:, 0, 2:] = float("nan")
    c[:, 1:, 3 + n_history:7] = float("nan")
    c[list(ZERO_S), 1:, 7] = 0
    c[LAST_ROW_Z, 1:n_out, 7] = 0
    return c.to(DEVICE, dtype)


def _solver_kwargs(mode, x, dtype):
    kwargs = {}
    for part in mode.split("+"):
        kwargs.update(_mode_kwargs(part, x, dtype))
    return kwargs


def _solver_pair(x, out, t, coef, history=(), noise=None, **kwargs):
    """ops.solver_step on the triton backend and on the reference: (got, expect), got checked to
    be [R, *x.shape], contiguous, in x's dtype."""
    got = ops.solver_step(x, out, t, coef, history, noise, **kwargs, backend="triton")
    expect = ops.solver_step(x, out, t, coef, history, noise, **kwargs, backend="reference")
    assert got.shape == (coef.shape[1] - 1,) + tuple(x.shape) and got.dtype == x.dtype and got.is_contiguous()
    return got, expect


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOLVER_SHAPES, ids=str)
@pytest.mark.parametrize("given_noise", [True, False])
def test_solver_step_matches_reference(poisoned, dtype, shape, given_noise):
    x, out = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    t = _t(shape[0], int32=not given_noise)
    noise = _randn(shape, dtype, 7) if given_noise else None
    for i, (mode, n_out, n_history) in enumerate(SOLVER_CASES):
        coef = _solver_coef(n_out, n_history, table_dtype(dtype), seed=10 + i)
        history = [_randn(shape, dtype, 20 + h) for h in range(n_history)]
        kwargs = dict(_solver_kwargs(mode, x, dtype), sample_offset=OFFSETS[i % len(OFFSETS)])
        if not given_noise:
            kwargs["seed"] = seed_tensor(2**64 - 1 - i, DEVICE)
        got, expect = _solver_pair(x, out, t, coef, history, noise, **kwargs)
        what = f"{mode}, R={n_out}, {n_history} history: "
        assert_close(got, expect, **tol(dtype, not given_noise), msg=lambda m: what + m)
        if given_noise:
            assert_rounded_like(got, expect, what)


def _var_coef(n_out, n_history, dtype, seed=3):
    """_solver_coef with row 0's columns 3 and 4 (the learned range's log beta and posterior log
    variance) set: the var operand reads them."""
    c = _solver_coef(n_out, n_history, torch.float64, seed)
    g = torch.Generator().manual_seed(seed + 100)
    c[:, 0, 3] = -1 - torch.rand(N_STEPS, generator=g, dtype=torch.float64)
    c[:, 0, 4] = -3 - torch.rand(N_STEPS, generator=g, dtype=torch.float64)
    return c.to(DEVICE, dtype)


def _var(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 19, 23)], ids=str)
@pytest.mark.parametrize("given_noise", [True, False])
def test_solver_step_var_matches_reference(poisoned, dtype, shape, given_noise):
    # A learned variance scales z per element; with and without guidance, history and bound.
    x, out, var = _randn(shape, dtype, 1), _randn(shape, dtype, 2), _var(shape, dtype, 3)
    t = _t(shape[0], int32=given_noise)
    noise = _randn(shape, dtype, 7) if given_noise else None
    for i, (mode, n_out, n_history) in enumerate(SOLVER_CASES[:4]):
        coef = _var_coef(n_out, n_history, table_dtype(dtype), seed=10 + i)
        history = [_randn(shape, dtype, 20 + h) for h in range(n_history)]
        kwargs = dict(_solver_kwargs(mode, x, dtype), sample_offset=OFFSETS[i % len(OFFSETS)], var=var)
        if not given_noise:
            kwargs["seed"] = seed_tensor(12345 + i, DEVICE)
        got, expect = _solver_pair(x, out, t, coef, history, noise, **kwargs)
        what = f"var, {mode}, R={n_out}, {n_history} history: "
        # z is scaled by up to exp(0.5 * -1) < 1: the drawn noise's tolerance holds.
        assert_close(got, expect, **tol(dtype, not given_noise), msg=lambda m: what + m)
        if given_noise:
            assert_rounded_like(got, expect, what)
        # var changes the result only through z: without it, the outputs differ where z enters.
        plain = ops.solver_step(x, out, t, coef, history, noise, **{k: v for k, v in kwargs.items() if k != "var"},
                                backend="triton")
        assert not torch.equal(plain, got)


def test_solver_step_var_is_not_read_where_z_is_skipped(poisoned):
    # t[0] is a step whose column-7 entries are all 0: its var (NaN here) is not needed.
    shape = (3, 2, 9)
    x, out, var = _randn(shape, torch.float32, 1), _randn(shape, torch.float32, 2), _var(shape, torch.float32, 3)
    t = torch.tensor([ZERO_S[0], 2, N_STEPS - 1], device=DEVICE)
    coef = _var_coef(2, 1, torch.float32)
    bad = var.clone()
    bad[0] = float("nan")
    for noise in (None, _randn(shape, torch.float32, 4)):
        kwargs = dict(seed=5) if noise is None else {}
        expect = ops.solver_step(x, out, t, coef, [x], noise, var=var, **kwargs, backend="triton")
        got = ops.solver_step(x, out, t, coef, [x], noise, var=bad, **kwargs, backend="triton")
        assert_close(got, expect)
        # A NaN var where z enters shows.
        bad2 = var.clone()
        bad2[1, 0, 0] = float("nan")
        assert ops.solver_step(x, out, t, coef, [x], noise, var=bad2, **kwargs, backend="triton")[:, 1, 0, 0].isnan().all()


def test_solver_step_var_raw_op():
    # The raw op takes var last (default None); argument checks like x's.
    x = _randn((3, 5), torch.float32, 1)
    args = _solver_raw_args()
    assert torch.equal(NS.solver_step(*args), NS.solver_step(*args, None))
    assert not torch.equal(NS.solver_step(*args), NS.solver_step(*args, x.clone()))
    for var, error, message in ((x.double(), TypeError, "var must have the dtype of x"),
                                (x[:, :4], ValueError, "var must have the shape of x"),
                                (x.to("meta"), RuntimeError, "var is on meta")):
        with pytest.raises(error, match=message):
            NS.solver_step(*args, var)
    with pytest.raises(RuntimeError, match="fastddpm: solver_step on the triton .*has no forward-mode AD"):
        torch.func.jvp(lambda v: ops.solver_step(x, x, torch.tensor([1, 2, 3], device=DEVICE), _var_coef(1, 0, torch.float32),
                                                 seed=1, var=v, backend="triton"), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solver_step_t_and_coef_kinds(poisoned, dtype):
    # int32, int64 and expanded (stride-0) t; float32 and float64 coef whatever the data's dtype,
    # and a strided coef view: all read by logical index.
    shape = (3, 5, 7)
    x, out, h = _randn(shape, dtype, 1), _randn(shape, dtype, 2), _randn(shape, dtype, 3)
    steps = torch.tensor([ZERO_S[1], N_STEPS - 1, 2], device=DEVICE)
    ts = [steps, steps.int(), torch.tensor(5, device=DEVICE).expand(3), torch.tensor(6, dtype=torch.int32,
                                                                                      device=DEVICE).expand(3)]
    for coef_dtype in (torch.float32, torch.float64):
        coef = _solver_coef(2, 1, coef_dtype)
        strided = torch.stack([coef, coef + 1], dim=-1)[..., 0]  # last-dimension stride 2
        for i, t in enumerate(ts):
            got, expect = _solver_pair(x, out, t, strided if i % 2 else coef, [h], clip=1.5, seed=i)
            assert_close(got, expect, **tol(dtype, drawn=True), msg=lambda m: f"{coef_dtype}, t {t}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_solver_step_draws_the_normal_stream(poisoned, dtype):
    # Output r is r z: the drawn z is ops.normal's stream for (seed, sample_offset), bit for bit
    # against the triton normal op, within the noise tolerance against the reference's.
    shape, seed, offset = (3, 2, 17, 31), 2**63 + 77, 2**32 - 2  # two blocks; g crosses a 32-bit word
    coef = torch.zeros(N_STEPS, 4, 8, device=DEVICE)
    coef[:, 1:, 7] = torch.tensor([1.0, 2.0, -4.0])
    x = _randn(shape, dtype, 1)
    t = _t(shape[0], int32=False, seed=2)
    t[0] = 3
    y = ops.solver_step(x, x, t, coef, seed=seed, sample_offset=offset, backend="triton")
    z = ops.normal(shape, seed=seed, sample_offset=offset, dtype=torch.float32, device=DEVICE, backend="triton")
    assert torch.equal(y[0], z.to(dtype))
    assert torch.equal(y[1], (2 * z).to(dtype)) and torch.equal(y[2], (-4 * z).to(dtype))
    z_ref = ops.normal(shape, seed=seed, sample_offset=offset, dtype=torch.float32, device=DEVICE,
                       backend="reference")
    assert_close(y[0].float(), z_ref.to(dtype).float(), **tol(dtype, drawn=True))


def test_solver_step_skips_the_stream_only_where_column_7_is_zero(poisoned):
    # A sample whose column-7 entries are all 0 does not depend on the seed; one with any nonzero
    # entry (only the last row's at LAST_ROW_Z) does, in exactly the rows that have one.
    coef = _solver_coef(3, 2, torch.float32)
    x, out, h0, h1 = (_randn((5, 30), torch.float32, s) for s in (1, 2, 3, 4))
    t = torch.tensor([ZERO_S[0], LAST_ROW_Z, ZERO_S[1], 3, LAST_ROW_Z], device=DEVICE)
    y1, y2 = (ops.solver_step(x, out, t, coef, (h0, h1), seed=s, clip=1.0, backend="triton") for s in (1, 2))
    noisy = coef[t, 1:, 7].T != 0  # [R, B]
    assert noisy[:, 0].sum() == 0 and noisy[:, 1].tolist() == [False, False, True]
    assert torch.equal(y1[~noisy], y2[~noisy]) and (y1[noisy] != y2[noisy]).all()
    # The skipped samples equal the step with a zero noise tensor.
    quiet = ~noisy.any(0)
    y0 = ops.solver_step(x, out, t, coef, (h0, h1), torch.zeros_like(x), clip=1.0, backend="triton")
    assert torch.equal(y1[:, quiet], y0[:, quiet])


def test_solver_step_clamps_and_propagates_nan(poisoned):
    # The clamp is active (some |a x + b out| > clip), inf is clamped to +-clip, NaN passes
    # through as in torch.clamp, and clip=inf (clip None) does not clamp.
    coef = _solver_coef(2, 2, torch.float32)
    x, out = _randn((3, 40), torch.float32, 1) * 3, _randn((3, 40), torch.float32, 2)
    history = [_randn((3, 40), torch.float32, s) for s in (3, 4)]
    x[0, 0], x[1, 3], x[2, 5] = float("nan"), float("inf"), -float("inf")
    t = torch.tensor([2, 5, 7], device=DEVICE)
    assert ((coef[t, 0, 0:1] * x + coef[t, 0, 1:2] * out).abs() > 1).any()
    bound = torch.tensor([1.0, 2.0, 1.5], device=DEVICE)
    for kwargs in (dict(clip=1.0), dict(bound=bound), {}):
        got, expect = _solver_pair(x, out, t, coef, history, seed=1, **kwargs)
        assert got[:, 0, 0].isnan().all()
        assert_close(got, expect, equal_nan=True, **tol(torch.float32, drawn=True))
    # Output 1 is x0 itself (column 2 = 1, the rest 0; an inf x would give 0 * inf = NaN): NaN
    # at the NaN, within [-clip, clip] elsewhere and reaching it. Output 2 (all 0) is 0 * NaN
    # there and 0 elsewhere.
    x0_coef = coef.clone()
    x0_coef[:, 1:] = 0
    x0_coef[:, 1, 2] = 1
    x_nan = torch.where(x.isinf(), 0.0, x)
    y = ops.solver_step(x_nan, out, t, x0_coef, history, seed=1, clip=0.5, backend="triton")
    finite = ~y[0].isnan()
    assert finite.sum() == x.numel() - 1 and y[0, 0, 0].isnan() and torch.equal(y[1].isnan(), ~finite)
    assert (y[1][finite] == 0).all()
    assert (y[0][finite].abs() <= 0.5).all() and (y[0][finite].abs() == 0.5).any()
    # Every passed operand is read with its coefficient: a NaN in a history tensor or in the
    # given noise shows through a 0 coefficient (0 * NaN = NaN), as in the reference.
    zero_cols = x0_coef.clone()
    hist = [h.clone() for h in history]
    hist[1][1, 7] = float("nan")
    noise = _randn((3, 40), torch.float32, 5)
    noise[2, 9] = float("nan")
    got, expect = _solver_pair(x_nan, out, t, zero_cols, hist, noise, clip=0.5)
    assert_close(got, expect, equal_nan=True, **tol(torch.float32))
    assert got.isnan().sum() == 3 * 2 and got[:, 1, 7].isnan().all() and got[:, 2, 9].isnan().all()


def test_solver_step_out_of_range_t_poisons(poisoned):
    # ops.py checks t on the host except under torch.compile; there the kernel must not read
    # past coef: NaN for a bad t. The raw op skips the check.
    coef = _solver_coef(2, 1, torch.float32)
    x = _randn((3, 10), torch.float32, 1)
    t = torch.tensor([0, N_STEPS, -1], device=DEVICE)
    y = NS.solver_step(x, x, None, [x], t, coef, None, math.inf, 1.0, x, None, 0)
    assert torch.isfinite(y[:, 0]).all() and torch.isnan(y[:, 1:]).all()


@pytest.mark.parametrize("w", [1 / 3, 0.0, -0.0, -2.5, 5e-324])
def test_solver_step_raw_op_clip_inf_and_float64_scalars(poisoned, w):
    # The raw op with clip=inf clamps nothing; float64 data sees the float64 guidance exactly
    # (1/3 is no float32 value; the bits of 0.0 and 5e-324 reach the kernel as an i32 0 and a
    # constexpr 1, those of -0.0 as -2**63). The tables are the clipped step's (ops.clipped_coef).
    tabs = _step_tables(torch.float64)
    x, out, cond, h = (_randn((3, 11), torch.float64, s) for s in (1, 2, 3, 4))
    t = torch.tensor([1, 2, 3], device=DEVICE)
    coef = ops.clipped_coef(*tabs.values())
    coef = torch.cat([coef, coef[:, 1:] * 2], dim=1)  # a second output of twice the step, plus 0.5 h
    coef[:, 2, 3] = 0.5
    got = NS.solver_step(x, out, cond, [h], t, coef, None, math.inf, w, x, None, 0)
    o = out + w * (cond - out)
    k = {n: tab[t].view(-1, 1) for n, tab in tabs.items()}
    exact = k["p"] * (k["a"] * x + k["b"] * o) + k["q"] * x + k["r"] * o + k["s"] * x
    assert_close(got, torch.stack([exact, 2 * exact + 0.5 * h]), **tol(torch.float64))


def test_schemas_match_the_cpp_ops():
    # One schema per op on every backend (triton_op infers SymInt for an int argument);
    # clipped_step is gone from both (fastddpm.ops.clipped_step is solver_step's wrapper).
    from fastddpm import _extension
    assert not hasattr(NS, "clipped_step")
    assert _extension.load() is not None, _extension.error()
    for name in ("solver_step", "target_mse", "target_mse_backward", "vlb_loss", "vlb_loss_backward"):
        theirs = str(getattr(torch.ops.fastddpm, name).default._schema)
        assert _our_schema(name) == theirs


def _our_schema(name):
    # triton_op infers SymInt for every int argument; the C++ schemas say int.
    ours = str(getattr(NS, name).default._schema).replace("fastddpm_triton::", "fastddpm::")
    for arg in ("sample_offset", "mean_type", "variance_type"):
        ours = ours.replace(f"SymInt {arg}", f"int {arg}")
    return ours


def test_schemas_match_csrc_ops_cpp():
    # The same against the schema text in csrc/ops.cpp, which holds even while the compiled
    # extension lags behind the source.
    import re
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "ops.cpp")).read()
    defs = {}
    for m in re.finditer(r'm\.def\(((?:\s*"[^"]*")+)', src):
        text = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        defs[text.split("(")[0]] = "fastddpm::" + " ".join(text.split())
    for name in ("solver_step", "target_mse", "target_mse_backward", "vlb_loss", "vlb_loss_backward"):
        assert _our_schema(name) == defs[name], name


def test_solver_step_has_no_backward():
    coef = _solver_coef(2, 2, torch.float32)
    x, out, h0, h1 = (_randn((2, 5), torch.float32, s) for s in (1, 2, 3, 4))
    t = torch.tensor([1, 2], device=DEVICE)
    message = "fastddpm: solver_step on the triton backend has no backward.*no_grad.*reference"
    expect = ops.solver_step(x, out, t, coef, (h0, h1), seed=1, out_cond=h1, backend="triton")
    for needs_grad in ("x", "out", "out_cond", "coef", "h0", "h1"):
        args = {"x": x, "out": out, "out_cond": h1, "coef": coef, "h0": h0, "h1": h1}
        args[needs_grad] = args[needs_grad].clone().requires_grad_()

        def step():
            return ops.solver_step(args["x"], args["out"], t, args["coef"], (args["h0"], args["h1"]), seed=1,
                                   out_cond=args["out_cond"], backend="triton")
        with pytest.raises(RuntimeError, match=message):
            step()
        with torch.no_grad():  # no gradient asked for: it runs, as without requires_grad
            assert_close(step(), expect, equal_nan=True)
    # The clipped step goes through it too; the reference backend is PyTorch's autograd.
    tabs = _step_tables(torch.float32)
    with pytest.raises(RuntimeError, match=message):
        ops.clipped_step(x.clone().requires_grad_(), out, t, *tabs.values(), seed=1, backend="triton")
    xr = x.clone().requires_grad_()
    ops.solver_step(xr, out, t, coef, (h0, h1), seed=1, backend="reference").sum().backward()
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
    coef = _solver_coef(2, 1, torch.float32)
    x, tangent = _randn((2, 3), torch.float32, 1), torch.ones(2, 3, device=DEVICE)
    t = torch.tensor([1, 4], device=DEVICE)
    calls = [("target_mse", lambda p: ops.target_mse(p, x, t, cx0, ceps, seed=1, backend="triton")),
             ("solver_step", lambda v: ops.solver_step(v, x, t, coef, (x,), seed=1, backend="triton")),
             ("solver_step", lambda h: ops.solver_step(x, x, t, coef, (h,), seed=1, backend="triton"))]
    for name, fn in calls:
        with pytest.raises(RuntimeError, match=f"fastddpm: {name} on the triton .*has no forward-mode AD"):
            torch.func.jvp(fn, (x,), (tangent,))


# ---- edges, argument checks and opcheck ----------------------------------------------------

def test_empty_batches(poisoned):
    coef = _solver_coef(3, 2, torch.float32)
    cx0, ceps = _target_tables(torch.float32)
    for shape in [(0, 3, 4), (2, 0)]:
        x = _randn(shape, torch.float32, 1)
        t = torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
        got = NS.solver_step(x, x, x, [x, x], t, coef, None, 1.0, 2.0, None, seed_tensor(1, DEVICE), 0)
        assert got.shape == (3,) + shape and got.dtype == x.dtype
        got = ops.solver_step(x, x, t, coef, [x], bound=torch.ones(shape[0], device=DEVICE), backend="triton")
        assert got.shape == (3,) + shape
        assert NS.target_mse_backward(torch.ones(shape[0], device=DEVICE), x, x, t, cx0, ceps, None, seed_tensor(1, DEVICE), 0).shape == shape
    assert ops.target_mse(*(_randn((0, 5), torch.float16, 1),) * 2, torch.zeros(0, dtype=torch.int64, device=DEVICE), cx0, ceps,
                          seed=1, backend="triton").shape == (0,)
    # The raw op's mean of no elements, as torch.mean gives it.
    empty = _randn((2, 0), torch.float32, 1)
    assert NS.target_mse(empty, empty, torch.zeros(2, dtype=torch.int64, device=DEVICE), cx0, ceps, None,
                         seed_tensor(1, DEVICE), 0).isnan().all()


def _solver_raw_args(**change):
    x = _randn((3, 5), torch.float32, 1)
    args = dict(x=x, out=x.clone(), out_cond=None, history=[x, x], t=torch.tensor([1, 2, 3], device=DEVICE),
                coef=_solver_coef(2, 2, torch.float32), bound=None, clip=1.0, guidance=1.0, noise=None,
                seed=seed_tensor(2, DEVICE), sample_offset=0)
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
BAD_SOLVER = [
    (dict(x=X.int()), TypeError, "x must be float16, bfloat16, float32 or float64, got torch.int32"),
    (dict(x=X[0, 0]), ValueError, "x must have a batch dimension"),
    (dict(clip=0.0), ValueError, "clip must be > 0 \\(inf for no clipping\\), got 0.0"),
    (dict(clip=-1.0), ValueError, "clip must be > 0"),
    (dict(clip=float("nan")), ValueError, "clip must be > 0"),
    (dict(guidance=float("inf")), ValueError, "guidance must be finite, got inf"),
    (dict(guidance=float("nan")), ValueError, "guidance must be finite"),
    (dict(bound=torch.ones(3, device=DEVICE)), ValueError, "pass clip or bound, not both"),
    (dict(bound=torch.ones(4, device=DEVICE), clip=float("inf")), ValueError, "bound must have shape \\[3\\]"),
    (dict(bound=torch.ones(3, dtype=torch.float16, device=DEVICE), clip=float("inf")), TypeError,
     "bound must be float32 or float64, got torch.float16"),
    (dict(bound=torch.ones(3, device="meta"), clip=float("inf")), RuntimeError, "bound is on meta but x is on"),
    (dict(out=X.double()), TypeError, "out must have the dtype of x"),
    (dict(out=X[:2]), ValueError, "out must have the shape of x"),
    (dict(out_cond=X.half()), TypeError, "out_cond must have the dtype of x"),
    (dict(out_cond=X[:, :4]), ValueError, "out_cond must have the shape of x"),
    (dict(noise=X.double()), TypeError, "noise must have the dtype of x"),
    (dict(history=[X, X.double()]), TypeError, "history\\[1\\] must have the dtype of x"),
    (dict(history=[X[:, :2]]), ValueError, "history\\[0\\] must have the shape of x"),
    (dict(history=[X, X.to("meta")]), RuntimeError, "history\\[1\\] is on meta"),
    (dict(history=[X] * 5), ValueError, "history holds at most 4 tensors, got 5"),
    (dict(coef=_solver_coef(2, 2, torch.float16)), TypeError, "coef must be float32 or float64, got torch.float16"),
    (dict(coef=torch.ones(N_STEPS, 3, 7, device=DEVICE)), ValueError,
     "coef must have shape \\[n_steps, R \\+ 1, 8\\] with 1 <= R <= 4 .*got \\(9, 3, 7\\)"),
    (dict(coef=torch.ones(N_STEPS, 1, 8, device=DEVICE)), ValueError, "coef must have shape .*got \\(9, 1, 8\\)"),
    (dict(coef=torch.ones(N_STEPS, 6, 8, device=DEVICE)), ValueError, "coef must have shape .*got \\(9, 6, 8\\)"),
    (dict(coef=torch.ones(N_STEPS, 16, device=DEVICE)), ValueError, "coef must have shape .*got \\(9, 16\\)"),
    (dict(coef=torch.ones(0, 2, 8, device=DEVICE)), ValueError, "coef is empty \\(n_steps must be >= 1\\)"),
    (dict(coef=torch.ones(N_STEPS, 2, 8, device="meta")), RuntimeError, "coef is on meta but x is on"),
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


@pytest.mark.parametrize("change,error,message", BAD_SOLVER, ids=lambda v: str(v)[:40])
def test_solver_step_raw_op_argument_errors(change, error, message):
    with pytest.raises(error, match=message):
        NS.solver_step(*_solver_raw_args(**change))


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
        return  # solver_step refuses gradients (test_solver_step_has_no_backward)
    bound = torch.tensor([1.0, 1.5, 3.0], device=DEVICE)
    for out_cond, history, bnd, clip, n, sd, n_out in ((x0, [], None, 1.0, None, seed, 1),
                                                       (None, [pred, x0], bound, math.inf, noise, None, 4),
                                                       (None, [noise] * 4, None, math.inf, None, seed, 2)):
        coef = _solver_coef(n_out, len(history), torch.float32)
        torch.library.opcheck(NS.solver_step.default, (pred, x0, out_cond, history, t, coef, bnd, clip, 2.0, n, sd, 5),
                              **utils)
        coef = _var_coef(n_out, len(history), torch.float32)
        torch.library.opcheck(NS.solver_step.default,
                              (pred, x0, out_cond, history, t, coef, bnd, clip, 2.0, n, sd, 5, noise), **utils)
