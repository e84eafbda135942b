"""The C++ CPU kernel of the general sampler step, torch.ops.fastddpm.solver_step, against the
reference backend, on every instruction-set build of the kernels this CPU can run: R = 1..4
outputs, 0..4 history operands, guidance, clipping and thresholding, the noise given or drawn
(and not drawn for a sample whose z column is 0), every dtype, odd shapes of rank 1 to 4; its
argument checks, its refusal to record a gradient, and opcheck.

Outputs are poisoned (the ``poisoned`` fixture): the op allocates its [R, *x.shape] output with
at::empty, so an element the kernel forgets to write stays NaN and fails the comparison. The
table columns that must not be read (those of absent history operands, and row 0's beyond its
two) hold NaN, so a kernel that read one would fail too.
"""
import pytest
import torch

from fastddpm import ops
from fastddpm.backends import reference
from helpers import DTYPES, HALF_DTYPES, OFFSETS, SHAPES, assert_rounded_like, seed_tensor, table_dtype, tol
from test_cpu_kernels import _load, isa  # noqa: F401  (isa: a fixture, one build of the kernels per run)

F = torch.ops.fastddpm
N_STEPS = 23
ZERO_Z = (0, 3, 6, 9, 12, 15, 18, 21)  # steps whose z column is 0 in every output row: no draw
ROW1_NO_Z = (1, 4)  # steps whose z column is 0 in output row 1 only: z drawn when R >= 2
SEEDS = (0x1234_5678_9ABC_DEF0, 2**64 - 1, 7)
INF = float("inf")
# SHAPES (D = 1, 7, 105, 1311 and 1 elements per sample), and one of more than two of the CPU
# kernels' 2048-element blocks per sample, the last partial (D = 4551).
SOLVER_SHAPES = SHAPES + ((2, 3, 37, 41),)
# (R, number of history operands): the clipped step's (1, 0), every R and every history count.
COUNTS = ((1, 0), (1, 2), (2, 1), (2, 2), (3, 0), (3, 3), (4, 1), (4, 4))
# (drawn, mode, guided, t's kind, whether coef has the data's table dtype or the other one)
CONFIGS = ((False, "none", False, "int64", True), (True, "clip", True, "int32", False),
           (False, "bound", True, "expanded", True), (True, "bound", False, "int64", True),
           (True, "none", False, "expanded", False))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _coef(n_out, n_history, dtype, gen):
    """Random tables [N_STEPS, R + 1, 8] in ``dtype``: row 0 forms x0 (a in [0.8, 2], b in
    [-1.5, -0.2]); rows 1..R weight x, out, x0 and the history by U(-0.5, 0.5) and z by U(0, 1)
    (0 in every row at ZERO_Z, in row 1 at ROW1_NO_Z). Columns that are not read hold NaN."""
    def u(*size, lo=-0.5, hi=0.5):
        return torch.rand(size, generator=gen, dtype=torch.float64) * (hi - lo) + lo

    coef = torch.full((N_STEPS, n_out + 1, 8), float("nan"), dtype=torch.float64)
    coef[:, 0, 0] = u(N_STEPS, lo=0.8, hi=2.0)
    coef[:, 0, 1] = u(N_STEPS, lo=-1.5, hi=-0.2)
    coef[:, 1:, :3 + n_history] = u(N_STEPS, n_out, 3 + n_history)
    coef[:, 1:, 7] = u(N_STEPS, n_out, lo=0.0, hi=1.0)
    coef[list(ZERO_Z), 1:, 7] = 0
    coef[list(ROW1_NO_Z), 1, 7] = 0
    return coef.to(dtype)


def _steps(batch, gen, kind):
    """[batch] steps: a no-z step, a noisy one and a row-1-only one first, then random; or, for
    kind "expanded", one noisy step expanded (stride 0)."""
    if kind == "expanded":
        return torch.tensor([N_STEPS - 1]).expand(batch)
    t = torch.randint(N_STEPS, (batch,), generator=gen)
    first = torch.tensor([ZERO_Z[1], N_STEPS - 1, ROW1_NO_Z[0]])[:batch]
    t[:len(first)] = first
    return t.int() if kind == "int32" else t


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _inputs(shape, dtype, n_out, n_history, drawn=True, mode="none", guided=False, t_kind="int64",
            coef_dtype=None, seed=0):
    """solver_step's arguments as a dict in schema order (x, out, out_cond, history, t, coef,
    bound, clip, guidance, noise, seed, sample_offset)."""
    gen = _gen(seed)
    a = dict(x=_randn(shape, dtype, gen, 2.0), out=_randn(shape, dtype, gen, 2.0), out_cond=None,
             history=[_randn(shape, dtype, gen) for _ in range(n_history)],
             t=_steps(shape[0], gen, t_kind),
             coef=_coef(n_out, n_history, coef_dtype or table_dtype(dtype), gen),
             bound=None, clip=INF, guidance=1.0, noise=None, seed=None,
             sample_offset=OFFSETS[seed % len(OFFSETS)])
    if guided:
        a.update(out_cond=_randn(shape, dtype, gen, 2.0), guidance=2.5)
    if mode == "clip":
        a["clip"] = 1.0
    elif mode == "bound":  # Imagen's per-sample bounds, >= 1 (float32 or float64)
        a["bound"] = (torch.rand(shape[0], generator=gen, dtype=torch.float64) * 2 + 1).to(
            torch.float64 if seed % 2 else torch.float32)
    if drawn:
        a["seed"] = seed_tensor(SEEDS[seed % len(SEEDS)])
    else:
        a["noise"] = _randn(shape, dtype, gen)
    return a


def step(a, **change):
    """torch.ops.fastddpm.solver_step on the arguments ``a`` with ``change`` applied."""
    return F.solver_step(*dict(a, **change).values())


def ref_step(a, **change):
    return reference.solver_step(*dict(a, **change).values())


# ---- against the reference -------------------------------------------------------------------

@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"R{c[0]}-H{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SOLVER_SHAPES, ids=str)
def test_solver_step_matches_reference(isa, poisoned, shape, dtype, counts):  # noqa: F811
    _load()
    n_out, n_history = counts
    other = torch.float32 if table_dtype(dtype) == torch.float64 else torch.float64
    for i, (drawn, mode, guided, t_kind, own_coef) in enumerate(CONFIGS):
        a = _inputs(shape, dtype, n_out, n_history, drawn, mode, guided, t_kind, None if own_coef else other,
                    seed=i + len(shape) + shape[-1] + n_history)
        what = f"config {i}: "
        got = step(a)
        want = ref_step(a)
        assert got.dtype == dtype and got.shape == (n_out, *shape) and got.is_contiguous(), what
        torch.testing.assert_close(got, want, **tol(dtype, drawn=drawn), msg=lambda m: what + m)
        if got.numel() >= 1000:  # a share of differing roundings means something with enough elements
            assert_rounded_like(got, want, what)
        if mode == "clip" and got.numel() > 8:  # the clamp is active: some |c00 x + c01 o| exceed 1
            o = a["out"] if not guided else a["out"] + 2.5 * (a["out_cond"] - a["out"])
            c = a["coef"].double()[a["t"].long()].view((-1, n_out + 1, 8) + (1,) * (len(shape) - 1))
            assert ((c[:, 0, 0] * a["x"].double() + c[:, 0, 1] * o.double()).abs() > 1).any()


# Outputs of 4 MiB or more per plane whose samples start on vector boundaries are written with
# non-temporal stores (kernels_impl.h, streams_output): [33, 32768] float32 streams, [33, 32771]
# (rows off the vector width) does not; R = 2 outputs, one history operand, noise drawn.
@pytest.mark.parametrize("shape", [(33, 32, 1024), (33, 32771)], ids=str)
def test_solver_step_large_outputs_match_reference(isa, poisoned, shape):  # noqa: F811
    _load()
    a = _inputs(shape, torch.float32, 2, 1, drawn=True, mode="clip", guided=True, seed=3)
    got = step(a)
    assert got.shape == (2, *shape)
    torch.testing.assert_close(got, ref_step(a), **tol(torch.float32, drawn=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_solver_step_through_ops_matches_reference(poisoned, dtype):
    # fastddpm.ops.solver_step (its Python checks, then the cpu backend's op) as the reference.
    _load()
    a = _inputs((4, 3, 9, 11), dtype, 3, 2, drawn=True, mode="bound", guided=True, seed=5)
    kw = dict(history=a["history"], out_cond=a["out_cond"], guidance=a["guidance"], bound=a["bound"],
              seed=a["seed"], sample_offset=a["sample_offset"])
    got = ops.solver_step(a["x"], a["out"], a["t"], a["coef"], **kw, backend="cpu")
    want = ops.solver_step(a["x"], a["out"], a["t"], a["coef"], **kw, backend="reference")
    torch.testing.assert_close(got, want, **tol(dtype, drawn=True))
    torch.testing.assert_close(got, step(a), rtol=0, atol=0)


# ---- the noise: drawn as the stream's, only where some output row adds it ----------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_solver_step_draws_the_stream_noise_only_where_a_row_adds_it(isa, poisoned, dtype):  # noqa: F811
    _load()
    shape = (7, 3, 19, 23)
    a = _inputs(shape, dtype, 2, 1, drawn=True, mode="clip", guided=True, seed=4)
    t = a["t"].long()
    no_z = torch.tensor([int(k) in ZERO_Z for k in t])
    row1_no_z = torch.tensor([int(k) in ROW1_NO_Z for k in t])
    assert no_z.any() and row1_no_z.any() and not (no_z | row1_no_z).all()
    got = step(a)
    # The drawn z is the stream's: fastddpm.ops.normal's float32 normals of (seed, sample_offset),
    # given as the noise of the same step computed in the accumulation dtype.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = ops.normal(shape, seed=a["seed"], sample_offset=a["sample_offset"], dtype=torch.float32, backend="cpu")
    lifted = {k: (v.to(acc) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("coef", "bound")
                  else v) for k, v in a.items()}
    lifted["history"] = [h.to(acc) for h in a["history"]]
    given = step(lifted, noise=z.to(acc), seed=None).to(dtype)
    if dtype in HALF_DTYPES:
        torch.testing.assert_close(got, given, **tol(dtype))
        assert_rounded_like(got, given)
    else:
        assert torch.equal(got, given)
    # Against the reference's stream (fastddpm.philox), within the drawn-noise tolerance.
    torch.testing.assert_close(got, ref_step(a), **tol(dtype, drawn=True))
    # Where no output row adds z (column 7 all 0) nothing is drawn: the noise-free step exactly,
    # and so is output row 1 of the samples whose row 1 has no z; the other outputs differ.
    noise_free = step(a, noise=torch.zeros(shape, dtype=dtype), seed=None)
    torch.testing.assert_close(noise_free, ref_step(a, noise=torch.zeros(shape, dtype=dtype), seed=None),
                               **tol(dtype))
    assert torch.equal(got[:, no_z], noise_free[:, no_z])
    assert torch.equal(got[0, row1_no_z], noise_free[0, row1_no_z])
    noisy = ~no_z
    assert (got[1, noisy] != noise_free[1, noisy]).float().mean() > 0.9
    noisy_row1 = ~(no_z | row1_no_z)
    assert (got[0, noisy_row1] != noise_free[0, noisy_row1]).float().mean() > 0.9


def test_solver_step_does_not_depend_on_thread_count(isa):  # noqa: F811
    _load()
    a = _inputs((3, 3, 129, 131), torch.float32, 3, 2, drawn=True, mode="bound", guided=True, seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(step(a))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


# ---- exact answers -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_solver_step_known_answers(isa, dtype):  # noqa: F811
    # Row 0: x0 = clamp(x); each output row picks one operand (x0, out, history[h], z), so the
    # outputs are those operands exactly. 45 elements per sample: the vector loop and the tail.
    _load()
    gen = _gen(8)
    x = _randn((2, 45), dtype, gen, 3.0)
    out = _randn((2, 45), dtype, gen)
    hist = [_randn((2, 45), dtype, gen) for _ in range(4)]
    z = _randn((2, 45), dtype, gen)
    coef = torch.zeros(3, 5, 8, dtype=dtype)
    coef[:, 0, 0] = 1
    coef[:, 1, 2] = 1  # x0
    coef[:, 2, 1] = 1  # out
    coef[:, 3, 3 + 3] = 1  # history[3]
    coef[:, 4, 7] = 1  # z
    t = torch.tensor([1, 2])
    for clip, bound, x0 in ((1.0, None, x.clamp(-1, 1)), (INF, None, x)):
        y = F.solver_step(x, out, None, hist, t, coef, bound, clip, 1.0, z, None, 0)
        for got, want in zip(y, (x0, out, hist[3], z)):
            assert torch.equal(got, want)
    bound = torch.tensor([2.0, 4.0], dtype=torch.float64)
    y = F.solver_step(x, out, None, hist, t, coef, bound, INF, 1.0, z, None, 0)
    lim = bound.to(dtype)[:, None]
    torch.testing.assert_close(y[0], torch.maximum(torch.minimum(x, lim), -lim) / lim, **tol(dtype))
    # Guidance: x0's row reads out only; w = 0 gives out, w = 1 out_cond.
    c = _randn((2, 45), dtype, gen)
    coef[:, 0] = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0], dtype=dtype)
    for w, want in ((0.0, out), (1.0, c), (3.0, out + 3.0 * (c - out))):
        y = F.solver_step(x, out, c, hist, t, coef, None, INF, w, z, None, 0)
        torch.testing.assert_close(y[0], want, **tol(dtype))
        torch.testing.assert_close(y[1], want, **tol(dtype))


@pytest.mark.parametrize("mode", ["none", "clip", "bound"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_solver_step_nan_passes_through(isa, dtype, mode):  # noqa: F811
    # NaN in x reaches every output (through the clamp too, as torch.clamp passes it); NaN in a
    # history operand or in the given noise reaches every output even where its column is 0
    # (0 * NaN is NaN, as in the reference): every operand passed is read. In the vector loop
    # and in the tail.
    _load()
    shape = (3, 45)
    a = _inputs(shape, dtype, 3, 2, drawn=False, mode=mode, guided=True, seed=6)
    a["coef"][:, 1:, 3 + 1] = 0  # history[1] weighs nothing
    a["coef"][:, 1:, 7] = 0  # nor does the noise
    a["x"][0, [2, 44]] = float("nan")
    a["history"][1][1, [0, 40]] = float("nan")
    a["noise"][2, [5, 43]] = float("nan")
    got, want = step(a), ref_step(a)
    expect = torch.zeros(shape, dtype=torch.bool)
    expect[0, [2, 44]] = expect[1, [0, 40]] = expect[2, [5, 43]] = True
    for y in (got, want):
        assert torch.equal(y.isnan(), expect.expand_as(y))
    torch.testing.assert_close(got, want, **tol(dtype), equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 3, 5), (0,), (3, 0), (2, 4, 0)], ids=str)
def test_solver_step_of_empty_tensors(shape):
    _load()
    for drawn in (False, True):
        a = _inputs(shape, torch.float32, 2, 2, drawn=drawn, mode="bound", guided=True)
        y = step(a)
        assert y.shape == (2, *shape) and y.dtype == torch.float32
        assert ref_step(a).shape == y.shape


# ---- no gradient -------------------------------------------------------------------------------

def test_solver_step_under_grad_is_a_clear_error():
    _load()
    a = _inputs((3, 7), torch.float32, 2, 2, drawn=False, mode="bound", guided=True, seed=1)
    message = ("solver_step on the cpu and cuda backends has no backward .*run it under torch.no_grad.*"
               "backend='reference'")

    def leaf(x):
        return x.detach().clone().requires_grad_()

    for name in ("x", "out", "out_cond", "history", "coef", "bound", "noise"):
        call = dict(a)
        if name == "history":
            for i in range(2):
                call["history"] = [leaf(h) if j == i else h for j, h in enumerate(a["history"])]
                with pytest.raises(RuntimeError, match=message):
                    step(call)
        else:
            call[name] = leaf(a[name])
            with pytest.raises(RuntimeError, match=message):
                step(call)
    with pytest.raises(RuntimeError, match=message):
        ops.solver_step(leaf(a["x"]), a["out"], a["t"], a["coef"], a["history"], seed=3, backend="cpu")
    with torch.no_grad():
        got = step(a, x=leaf(a["x"]), coef=leaf(a["coef"]))
    assert not got.requires_grad
    torch.testing.assert_close(got, ref_step(a), **tol(torch.float32))
    # A tensor that requires grad with grad mode off, or none requiring it: no error.
    torch.testing.assert_close(step(a), got, rtol=0, atol=0)


def test_solver_step_forward_mode_ad_raises():
    _load()
    import torch.autograd.forward_ad as fwAD
    a = _inputs((3, 7), torch.float32, 1, 2, drawn=True)
    with fwAD.dual_level():
        for name in ("x", "history"):
            call = dict(a)
            if name == "x":
                call["x"] = fwAD.make_dual(a["x"], torch.ones_like(a["x"]))
            else:
                call["history"] = [a["history"][0], fwAD.make_dual(a["history"][1], torch.ones_like(a["x"]))]
            with pytest.raises(RuntimeError, match="solver_step on the cpu and cuda backends has no forward-mode AD"):
                step(call)


# ---- opcheck -----------------------------------------------------------------------------------

def test_opcheck_solver_step():
    _load()
    for counts, drawn, mode, guided in (((1, 0), True, "bound", True), ((2, 2), False, "clip", False),
                                        ((4, 4), True, "none", False), ((3, 1), False, "bound", True)):
        a = _inputs((3, 4, 5), torch.float32, *counts, drawn=drawn, mode=mode, guided=guided, seed=3)
        torch.library.opcheck(F.solver_step.default, tuple(a.values()))


# ---- argument checks in C++ --------------------------------------------------------------------

def test_solver_step_argument_checks():
    _load()
    a = _inputs((2, 3), torch.float32, 2, 2, drawn=True)
    x, coef, hist = a["x"], a["coef"], a["history"]
    meta = torch.device("meta")

    def on_cpu_kernel(**change):
        # The CPU kernel itself (a tensor on another device would send the dispatcher elsewhere).
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        return F.solver_step.default.redispatch(keys, *dict(a, **change).values())

    shape_msg = r"coef must have shape \[n_steps, R \+ 1, 8\] with 1 <= R <= 4"
    bad = [
        (lambda: step(a, coef=coef[:, 0]), shape_msg),
        (lambda: step(a, coef=coef[:, :1]), shape_msg + r" .*got \[23, 1, 8\]"),
        (lambda: step(a, coef=torch.zeros(N_STEPS, 6, 8)), shape_msg + r" .*got \[23, 6, 8\]"),
        (lambda: step(a, coef=coef[..., :7]), shape_msg),
        (lambda: step(a, coef=coef[:0]), r"coef is empty \(n_steps must be >= 1\)"),
        (lambda: step(a, coef=coef.half()), "coef must be float32 or float64, got Half"),
        (lambda: step(a, coef=coef.int()), "coef must be float32 or float64, got Int"),
        (lambda: on_cpu_kernel(coef=coef.to(meta)), "coef must be a CPU tensor, got one on meta"),
        (lambda: step(a, history=hist + [x, x, x]), "history holds at most 4 tensors, got 5"),
        (lambda: step(a, history=[hist[0], hist[1][:1]]), r"history\[1\] must have the shape of x \[2, 3\]"),
        (lambda: step(a, history=[hist[0].double()]), r"history\[0\] must have the dtype of x \(Float\), got Double"),
        (lambda: on_cpu_kernel(history=[hist[0], hist[1].to(meta)]), r"history\[1\] must be a CPU tensor"),
        (lambda: step(a, t=a["t"] + N_STEPS), rf"t must lie in \[0, {N_STEPS}\), got t\[0\] = "),
        (lambda: step(a, t=a["t"] - N_STEPS), rf"t must lie in \[0, {N_STEPS}\)"),
        (lambda: step(a, t=a["t"].float()), "t must be an int32 or int64 tensor"),
        (lambda: step(a, t=a["t"][:1]), r"t must have shape \[2\] \(one step per sample\)"),
        (lambda: step(a, x=x.int(), out=x.int()), "x must be float16, bfloat16, float32 or float64, got Int"),
        (lambda: step(a, x=x[0, 0], out=x[0, 0], history=[]), "x must have a batch dimension"),
        (lambda: step(a, out=x[:, :2]), "out must have the shape of x"),
        (lambda: step(a, out=x.double()), "out must have the dtype of x"),
        (lambda: step(a, out_cond=x[:1]), "out_cond must have the shape of x"),
        (lambda: step(a, out_cond=x.half()), "out_cond must have the dtype of x"),
        (lambda: step(a, noise=x[:1], seed=None), "noise must have the shape of x"),
        (lambda: step(a, noise=x.double(), seed=None), "noise must have the dtype of x"),
        (lambda: step(a, seed=None), "seed is required when noise is None"),
        (lambda: step(a, seed=torch.tensor([1.0])), "seed must be a 1-element int64 tensor"),
        (lambda: step(a, sample_offset=-1), "sample_offset must be >= 0, got -1"),
        (lambda: step(a, clip=0.0), r"clip must be > 0 \(inf for no clipping\), got 0"),
        (lambda: step(a, clip=float("nan")), "clip must be > 0"),
        (lambda: step(a, bound=torch.ones(1)), r"bound must have shape \[2\] \(one per sample\)"),
        (lambda: step(a, bound=torch.ones(2).half()), "bound must be float32 or float64, got Half"),
        (lambda: step(a, bound=torch.ones(2), clip=1.0), "pass clip or bound, not both"),
        (lambda: on_cpu_kernel(bound=torch.ones(2, device=meta)), "bound must be a CPU tensor"),
        (lambda: step(a, guidance=INF), "guidance must be finite, got inf"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=r"^fastddpm \(cpu\): .*" + message):
            call()
            pytest.fail(f"no error; expected {message!r}")
    # A tensor on the meta device sends the call to the fake kernel, which says the same.
    with pytest.raises(RuntimeError, match="coef is on meta but x is on cpu"):
        step(a, coef=coef.to(meta))


def test_solver_step_python_argument_checks():
    # fastddpm.ops.solver_step checks before any backend runs (fastddpm/_checks.py).
    _load()
    a = _inputs((2, 3), torch.float32, 2, 2, drawn=True)
    x, out, t, coef = a["x"], a["out"], a["t"], a["coef"]
    with pytest.raises(ValueError, match="history holds at most 4 tensors, got 5"):
        ops.solver_step(x, out, t, coef, [x] * 5, seed=1, backend="cpu")
    with pytest.raises(ValueError, match=r"coef must have shape \[n_steps, R \+ 1, 8\]"):
        ops.solver_step(x, out, t, coef[:, :1], seed=1, backend="cpu")
    with pytest.raises(TypeError, match="coef must be float32 or float64"):
        ops.solver_step(x, out, t, coef.half(), seed=1, backend="cpu")


# ---- var: the learned variance scales z per element ---------------------------------------------

def _with_var(a, seed=0):
    """a with var (like x, in [-1.3, 1.3]: f slightly beyond [0, 1]) and row 0's columns 3 and 4
    set (log beta's and the posterior log variance's kind of values)."""
    gen = _gen(100 + seed)
    x = a["x"]
    coef = a["coef"].clone()
    n = coef.shape[0]
    coef[:, 0, 3] = (torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 5).to(coef.dtype)
    coef[:, 0, 4] = (torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 8).to(coef.dtype)
    var = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2.6 - 1.3).to(x.dtype)
    return dict(a, coef=coef, var=var)


@pytest.mark.parametrize("counts", ((1, 0), (2, 2), (4, 4)), ids=lambda c: f"R{c[0]}-H{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SOLVER_SHAPES, ids=str)
def test_solver_step_var_matches_reference(isa, poisoned, shape, dtype, counts):  # noqa: F811
    _load()
    n_out, n_history = counts
    for i, (drawn, mode, guided, t_kind, own_coef) in enumerate(CONFIGS[:3]):
        a = _with_var(_inputs(shape, dtype, n_out, n_history, drawn, mode, guided, t_kind, seed=i + shape[-1]), i)
        what = f"config {i}: "
        got = step(a)
        want = ref_step(a)
        assert got.dtype == dtype and got.shape == (n_out, *shape), what
        t = dict(tol(dtype, drawn=drawn))
        if dtype != torch.float64:  # exp of the interpolated log variance: Sleef's against PyTorch's
            t["rtol"] = max(t["rtol"], 4e-6)
        torch.testing.assert_close(got, want, **t, msg=lambda m: what + m)
        # var changes the noisy samples' results, and scales exactly the z term
        noisy = torch.tensor([bool((a["coef"][int(k), 1:, 7] != 0).any()) for k in a["t"]])
        if noisy.any() and dtype == torch.float64:
            no_var = step(a, var=None)
            assert not torch.equal(got[:, noisy], no_var[:, noisy]), what


def test_solver_step_var_scale_known_answer():
    # R = 1: y = c x + s z with s = exp(0.5 (f c3 + (1 - f) c4)), f = (var + 1) / 2, in float64.
    _load()
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    var = torch.tensor([[-1.0, 1.0, 0.0]], dtype=torch.float64)
    coef = torch.zeros(1, 2, 8, dtype=torch.float64)
    coef[0, 0, 3], coef[0, 0, 4] = -2.0, -6.0  # f = 1 -> -2, f = 0 -> -6
    coef[0, 1, 0], coef[0, 1, 7] = 3.0, 0.5
    y = F.solver_step(x, x, None, [], torch.zeros(1, dtype=torch.long), coef, None, INF, 1.0, z, None, 0, var)
    s = torch.exp(0.5 * torch.tensor([-6.0, -2.0, -4.0], dtype=torch.float64))
    torch.testing.assert_close(y[0], 3.0 * x + 0.5 * s * z, rtol=1e-15, atol=0)


def test_solver_step_var_not_read_without_z(isa):  # noqa: F811
    # A sample whose column-7 entries are all 0 draws no z and needs no var: NaN there changes nothing.
    _load()
    a = _with_var(_inputs((6, 3, 5, 7), torch.float32, 2, 1, drawn=True, seed=3), 3)
    no_z = torch.tensor([bool((a["coef"][int(k), 1:, 7] == 0).all()) for k in a["t"]])
    assert no_z.any() and not no_z.all()
    var = a["var"].clone()
    var[no_z] = float("nan")
    got = step(a, var=var)
    assert torch.equal(got, step(a))
    assert torch.equal(got[:, no_z], step(a, var=None)[:, no_z])
    assert torch.isfinite(got).all()


def test_solver_step_var_given_noise_is_not_modified():
    _load()
    a = _with_var(_inputs((2, 3, 40), torch.float32, 2, 0, drawn=False, seed=1), 1)
    noise = a["noise"].clone()
    step(a)
    assert torch.equal(a["noise"], noise)


def test_solver_step_var_argument_checks():
    _load()
    a = _with_var(_inputs((2, 3), torch.float32, 2, 2, drawn=True))
    for bad, match in ((a["var"][:1], "var must have the shape of x"),
                       (a["var"].double(), "var must have the dtype of x")):
        with pytest.raises(RuntimeError, match=match):
            step(a, var=bad)
    with pytest.raises(RuntimeError, match="solver_step on the cpu and cuda backends has no backward"):
        step(a, var=a["var"].clone().requires_grad_(True))


def test_opcheck_solver_step_var():
    _load()
    a = _with_var(_inputs((3, 4, 5), torch.float32, 2, 1, drawn=True, mode="clip", seed=3))
    torch.library.opcheck(F.solver_step.default, tuple(a.values()))
