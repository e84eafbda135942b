"""The C++ CPU kernels of the clipped step (fastddpm.ops.clipped_step: the general step
solver_step with the tables of ops.clipped_coef) and of target_mse (and target_mse's C++
autograd) against the reference backend, on every instruction-set build of the kernels this CPU
can run. solver_step's own coverage (outputs, history, argument checks) is in
tests/test_solver_step_cpu.py.

Outputs are poisoned (the ``poisoned`` fixture): every ``at::empty`` the kernels allocate starts
as NaN, so an element a kernel forgets to write fails the comparison. The step tables have
s[k] = 0 and the target tables ceps[k] = 0 at some steps, where the kernels draw no noise.
"""
import pytest
import torch

from fastddpm import ops
from helpers import DTYPES, OFFSETS, SHAPES, assert_rounded_like, mse_tol, seed_tensor, table_dtype, tol
from test_cpu_kernels import _load, isa  # noqa: F401  (isa: a fixture, one build of the kernels per run)

F = torch.ops.fastddpm
N_STEPS = 23
ZERO_STEPS = (0, 3, 6, 9, 12, 15, 18, 21)  # the steps whose s (clipped_step) or ceps (target_mse) is 0
SEEDS = (0x1234_5678_9ABC_DEF0, 2**64 - 1, 7)
# Sum of up to D = 1311 float32 products in another order than the reference's reduction, of
# size O(1): a table gradient's float32 error, far below this unless a term is wrong.
SUM_TOL = dict(rtol=1e-5, atol=1e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _step_tables(dtype, gen):
    """Random step tables a, b, p, q, r, s (s in [0, 1], 0 at ZERO_STEPS) in ``dtype``."""
    u = lambda lo, hi: torch.rand(N_STEPS, generator=gen, dtype=torch.float64) * (hi - lo) + lo  # noqa: E731
    tabs = dict(a=u(0.8, 2.0), b=u(-1.5, -0.2), p=u(0.1, 1.0), q=u(0.0, 0.9), r=u(-0.5, 0.5), s=u(0.1, 1.0))
    tabs["s"][list(ZERO_STEPS)] = 0
    return {k: v.to(dtype) for k, v in tabs.items()}


def _target_tables(dtype, gen):
    """Random (cx0, ceps) in ``dtype``, ceps 0 at ZERO_STEPS (x0 prediction's form there)."""
    cx0 = torch.rand(N_STEPS, generator=gen, dtype=torch.float64) * 2 - 1
    ceps = torch.rand(N_STEPS, generator=gen, dtype=torch.float64) + 0.1
    ceps[list(ZERO_STEPS)] = 0
    return cx0.to(dtype), ceps.to(dtype)


def _steps(batch, gen, int32):
    """[batch] steps with a zero-s/ceps step first and a nonzero one second, then random."""
    t = torch.randint(N_STEPS, (batch,), generator=gen)
    t[0] = ZERO_STEPS[1]
    if batch > 1:
        t[1] = N_STEPS - 1
    return t.int() if int32 else t


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ---- clipped_step ----------------------------------------------------------------------------

CLIP_MODES = ("none", "clip", "bound")


def clipped(x_t, out, out_cond, t, tabs, bound, clip, guidance, noise, seed, sample_offset=0):
    """The raw op on the clipped step's tables (a, b, p, q, r, s): torch.ops.fastddpm.solver_step
    with coef = ops.clipped_coef(*tabs), its one output."""
    coef = ops.clipped_coef(*tabs)
    y = F.solver_step(x_t, out, out_cond, [], t, coef, bound, clip, guidance, noise, seed, sample_offset)
    assert y.shape == (1, *x_t.shape)
    return y[0]


def _clipped_inputs(shape, dtype, drawn, mode, guided, seed=0):
    gen = _gen(seed)
    tabs = _step_tables(table_dtype(dtype), gen)
    x_t = _randn(shape, dtype, gen, 2.0)
    out = _randn(shape, dtype, gen, 2.0)
    kwargs = dict(sample_offset=OFFSETS[seed % len(OFFSETS)])
    if guided:
        kwargs.update(out_cond=_randn(shape, dtype, gen, 2.0), guidance=2.5)
    if mode == "clip":
        kwargs["clip"] = 1.0
    elif mode == "bound":  # Imagen's per-sample bounds, >= 1 (float32 or float64)
        bdt = torch.float64 if seed % 2 else torch.float32
        kwargs["bound"] = (torch.rand(shape[0], generator=gen, dtype=torch.float64) * 2 + 1).to(bdt)
    noise = None if drawn else _randn(shape, dtype, gen)
    if drawn:
        kwargs["seed"] = seed_tensor(SEEDS[seed % len(SEEDS)])
    t = _steps(shape[0], gen, int32=drawn)
    args = (x_t, out, t, *(tabs[k] for k in "abpqrs"), noise)
    return args, kwargs


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("mode", CLIP_MODES)
@pytest.mark.parametrize("drawn", [False, True], ids=["noise", "drawn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clipped_step_matches_reference(isa, poisoned, shape, dtype, drawn, mode, guided):  # noqa: F811
    _load()
    args, kwargs = _clipped_inputs(shape, dtype, drawn, mode, guided, seed=len(shape) + shape[-1])
    got = ops.clipped_step(*args, **kwargs, backend="cpu")
    want = ops.clipped_step(*args, **kwargs, backend="reference")
    assert got.dtype == dtype and got.shape == shape and got.is_contiguous()
    torch.testing.assert_close(got, want, **tol(dtype, drawn=drawn))
    assert_rounded_like(got, want)
    if mode == "clip":  # the clamp is active: some |a x_t + b o| exceed the clip
        a, b = args[3], args[4]
        o = args[1] if not guided else args[1] + 2.5 * (kwargs["out_cond"] - args[1])
        pre = a[args[2].long()].view((-1,) + (1,) * (len(shape) - 1)) * args[0] + \
            b[args[2].long()].view((-1,) + (1,) * (len(shape) - 1)) * o
        assert (pre.abs() > 1).any()


@pytest.mark.parametrize("mode", CLIP_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clipped_step_without_noise_where_s_is_zero(isa, poisoned, dtype, mode):  # noqa: F811
    # A sample whose s[t] is 0 gets no noise term: with the noise drawn it equals the noise-free
    # step exactly (z = 0), on the cpu and the reference backend; the others do get noise.
    _load()
    shape = (6, 3, 19, 23)
    args, kwargs = _clipped_inputs(shape, dtype, True, mode, True, seed=4)
    t = args[2]
    zero = torch.tensor([int(k) in ZERO_STEPS for k in t])
    assert zero.any() and not zero.all()
    got = ops.clipped_step(*args, **kwargs, backend="cpu")
    no_noise = dict(kwargs, seed=None)
    args0 = (*args[:-1], torch.zeros(shape, dtype=dtype))
    noise_free = ops.clipped_step(*args0, **no_noise, backend="cpu")
    torch.testing.assert_close(got[zero], noise_free[zero], rtol=0, atol=0)
    torch.testing.assert_close(noise_free, ops.clipped_step(*args0, **no_noise, backend="reference"), **tol(dtype))
    torch.testing.assert_close(got, ops.clipped_step(*args, **kwargs, backend="reference"), **tol(dtype, drawn=True))
    assert (got[~zero] != noise_free[~zero]).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clipped_step_clamps_and_thresholds_exactly(isa, dtype):  # noqa: F811
    # Known answers: a = 1, b = 0 so x0 = clamp(x_t); p = 1 and q = r = s = 0 give y = x0. 45
    # elements per sample: the vector loop and the scalar tail.
    _load()
    row = [[-3.0, -0.5, 0.0, 0.7, 5.0], [-9.0, 1.5, 2.0, -2.5, 8.0]]
    x = torch.tensor(row, dtype=dtype).repeat(1, 9)
    one, zero = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    t = torch.tensor([1, 2])
    inf = float("inf")
    tabs = (one, zero, one, zero, zero, zero)
    y = clipped(x, x, None, t, tabs, None, 1.0, 1.0, None, seed_tensor(1))
    assert torch.equal(y, x.clamp(-1, 1))
    y = clipped(x, x, None, t, tabs, None, inf, 1.0, None, seed_tensor(1))
    assert torch.equal(y, x)
    bound = torch.tensor([2.0, 4.0], dtype=torch.float64)
    y = clipped(x, x, None, t, tabs, bound, inf, 1.0, None, seed_tensor(1))
    lim = bound.to(dtype)[:, None]
    torch.testing.assert_close(y, torch.maximum(torch.minimum(x, lim), -lim) / lim, **tol(dtype))
    # NaN passes through the clamp, as in torch.clamp, in the vector loop and the tail.
    xn = x.clone()
    xn[0, [2, 44]] = float("nan")
    for clip, bnd in ((1.0, None), (inf, bound)):
        yn = clipped(xn, xn, None, t, tabs, bnd, clip, 1.0, None, seed_tensor(1))
        assert torch.equal(yn.isnan(), xn.isnan())


def test_clipped_step_guidance_known_answer():
    # a = 0, b = 1, p = 1: y = clamp(u + w (c - u)); w = 0 gives u, w = 1 gives c.
    _load()
    gen = _gen(3)
    u, c = torch.randn(3, 40, generator=gen), torch.randn(3, 40, generator=gen)
    one, zero = torch.ones(4), torch.zeros(4)
    t = torch.tensor([0, 1, 3])
    for w, want in ((0.0, u), (1.0, c), (3.0, u + 3.0 * (c - u))):
        y = clipped(torch.randn(3, 40), u, c, t, (zero, one, one, zero, zero, zero), None, float("inf"), w,
                    torch.randn(3, 40), None)
        torch.testing.assert_close(y, want, **tol(torch.float32))


def test_clipped_step_empty_batch():
    _load()
    tabs = _step_tables(torch.float32, _gen(0))
    x = torch.randn(0, 3, 5)
    t = torch.zeros(0, dtype=torch.int64)
    y = clipped(x, x, x, t, [tabs[k] for k in "abpqrs"], torch.zeros(0), float("inf"), 2.0, None, seed_tensor(1))
    assert y.shape == (0, 3, 5)
    assert ops.clipped_step(x, x, t, *(tabs[k] for k in "abpqrs"), bound=torch.zeros(0), seed=1,
                            backend="cpu").shape == (0, 3, 5)


def test_clipped_step_under_grad_is_a_clear_error():
    _load()
    args, kwargs = _clipped_inputs((3, 7), torch.float32, True, "clip", True)
    x_t, out, t, a, b, p, q, r, s, _ = args
    message = "solver_step on the cpu and cuda backends has no backward"
    leaves = dict(x_t=x_t, out=out, out_cond=kwargs["out_cond"], a=a, s=s,
                  bound=torch.ones(3, dtype=torch.float64) * 2)
    for name in leaves:
        call = dict(x_t=x_t, out=out, out_cond=kwargs["out_cond"], a=a, s=s, bound=None)
        call[name] = leaves[name].clone().requires_grad_()
        clip = 1.0 if call["bound"] is None else float("inf")
        with pytest.raises(RuntimeError, match=message):
            clipped(call["x_t"], call["out"], call["out_cond"], t, (call["a"], b, p, q, r, call["s"]), call["bound"],
                    clip, 2.5, None, kwargs["seed"])
    with pytest.raises(RuntimeError, match="run it under torch.no_grad"):
        ops.clipped_step(x_t.clone().requires_grad_(), out, t, a, b, p, q, r, s, clip=1.0, seed=3, backend="cpu")
    with torch.no_grad():
        x = x_t.clone().requires_grad_()
        got = ops.clipped_step(x, out, t, a, b, p, q, r, s, clip=1.0, seed=3, backend="cpu")
    torch.testing.assert_close(got, ops.clipped_step(x_t, out, t, a, b, p, q, r, s, clip=1.0, seed=3,
                                                     backend="reference"), **tol(torch.float32, drawn=True))


# ---- target_mse ------------------------------------------------------------------------------

def _target_inputs(shape, dtype, drawn, seed=0, requires_grad=False):
    gen = _gen(seed)
    cx0, ceps = _target_tables(table_dtype(dtype), gen)
    pred, x0 = _randn(shape, dtype, gen), _randn(shape, dtype, gen)
    noise = None if drawn else _randn(shape, dtype, gen)
    kwargs = dict(sample_offset=OFFSETS[seed % len(OFFSETS)])
    if drawn:
        kwargs["seed"] = seed_tensor(SEEDS[seed % len(SEEDS)])
    t = _steps(shape[0], gen, int32=drawn)
    return [pred, x0, t, cx0, ceps, noise], kwargs


@pytest.mark.parametrize("drawn", [False, True], ids=["noise", "drawn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_target_mse_matches_reference(isa, poisoned, shape, dtype, drawn):  # noqa: F811
    _load()
    args, kwargs = _target_inputs(shape, dtype, drawn, seed=shape[-1] + len(shape))
    got = ops.target_mse(*args, **kwargs, backend="cpu")
    want = ops.target_mse(*args, **kwargs, backend="reference")
    assert got.dtype == table_dtype(dtype) and got.shape == (shape[0],)
    torch.testing.assert_close(got, want, **mse_tol(dtype, drawn=drawn))


def _loss_and_grads(args, kwargs, backend, wanted):
    """target_mse and the gradients of args[i] for i in ``wanted`` of a weighted sum plus the mean
    (a stride-0 incoming gradient) of it."""
    args = list(args)
    for i in wanted:
        args[i] = args[i].detach().clone().requires_grad_()
    out = ops.target_mse(*args, **kwargs, backend=backend)
    weights = torch.randn(out.shape, generator=_gen(11), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum() + out.mean(), [args[i] for i in wanted])
    return out.detach(), dict(zip(wanted, grads))


@pytest.mark.parametrize("drawn", [False, True], ids=["noise", "drawn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_target_mse_gradients_match_reference(isa, poisoned, shape, dtype, drawn):  # noqa: F811
    _load()
    args, kwargs = _target_inputs(shape, dtype, drawn, seed=shape[-1] + 2 * len(shape))
    wanted = [0, 1, 3, 4] + ([] if drawn else [5])  # pred, x0, cx0, ceps, noise
    out, got = _loss_and_grads(args, kwargs, "cpu", wanted)
    ref_out, want = _loss_and_grads(args, kwargs, "reference", wanted)
    torch.testing.assert_close(out, ref_out, **mse_tol(dtype, drawn=drawn))
    for i in (0, 1, 5):  # the data's gradients, elementwise in the data's dtype
        if i in wanted:
            assert got[i].dtype == dtype
            torch.testing.assert_close(got[i], want[i], **tol(dtype, drawn=drawn))
    pred, x0, t = args[0], args[1], args[2].long()
    if dtype in (torch.float32, torch.float64):
        for i in (3, 4):
            # d/dceps sums the noise: drawn, it is the cpu's normals against the reference's.
            torch.testing.assert_close(got[i], want[i], **(tol(dtype, drawn) if dtype == torch.float64 else SUM_TOL))
    else:  # half data: the table gradients from the cpu's own d/dpred, in float64
        gp = got[0].double().flatten(1) if pred.dim() > 1 else got[0].double()[:, None]
        noise = want_noise(args, kwargs, dtype)
        for i, x in ((3, x0), (4, noise)):
            per = -(gp * x.double().reshape(gp.shape)).sum(1)
            expect = torch.zeros(N_STEPS, dtype=torch.float64).index_add(0, t, per)
            torch.testing.assert_close(got[i].double(), expect, **SUM_TOL)


def want_noise(args, kwargs, dtype):
    """The noise target_mse used: the given one, or the stream's float32 normals."""
    if args[5] is not None:
        return args[5]
    return ops.normal(args[0].shape, seed=kwargs["seed"], sample_offset=kwargs["sample_offset"], dtype=torch.float32)


def test_target_mse_where_ceps_is_zero_draws_no_noise_term():
    # ceps = 0 at every step: the loss is that of x0 prediction, mse(pred, cx0[t] x0), with the
    # noise drawn or given (any noise), equal to mse_per_sample of that target.
    _load()
    gen = _gen(5)
    pred, x0 = torch.randn(4, 3, 40, 41, generator=gen), torch.randn(4, 3, 40, 41, generator=gen)
    cx0, ceps = torch.rand(N_STEPS, generator=gen), torch.zeros(N_STEPS)
    t = torch.tensor([2, 5, 7, 22])
    target = cx0[t].view(-1, 1, 1, 1) * x0
    want = F.mse_per_sample(pred, target, None, 0)
    for noise, seed in ((None, seed_tensor(9)), (torch.randn(4, 3, 40, 41, generator=gen), None)):
        torch.testing.assert_close(F.target_mse(pred, x0, t, cx0, ceps, noise, seed, 3), want, rtol=1e-6, atol=0)
        gw = torch.rand(4, generator=gen)
        torch.testing.assert_close(F.target_mse_backward(gw, pred, x0, t, cx0, ceps, noise, seed, 3),
                                   F.mse_per_sample_backward(gw, pred, target, None, 0), rtol=1e-6, atol=1e-9)


def test_target_mse_does_not_depend_on_thread_count(isa):  # noqa: F811
    _load()
    args, kwargs = _target_inputs((3, 3, 129, 131), torch.float32, True, seed=2)
    pred, x0, t, cx0, ceps, _ = args
    t = torch.tensor([1, 4, 22])  # ceps 0, then two nonzero
    grad = torch.rand(3, generator=_gen(1))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((F.target_mse(pred, x0, t, cx0, ceps, None, kwargs["seed"], 5),
                            F.target_mse_backward(grad, pred, x0, t, cx0, ceps, None, kwargs["seed"], 5)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], ops.target_mse(pred, x0, t, cx0, ceps, seed=kwargs["seed"],
                                                             sample_offset=5, backend="reference"),
                               **mse_tol(torch.float32, drawn=True))


def test_target_mse_empty_batch():
    _load()
    cx0, ceps = _target_tables(torch.float32, _gen(0))
    x = torch.randn(0, 3, 5)
    t = torch.zeros(0, dtype=torch.int32)
    assert F.target_mse(x, x, t, cx0, ceps, None, seed_tensor(1), 0).shape == (0,)
    assert F.target_mse_backward(torch.zeros(0), x, x, t, cx0, ceps, None, seed_tensor(1), 0).shape == (0, 3, 5)


def test_target_mse_gradcheck_float64():
    _load()
    gen = _gen(7)
    cx0, ceps = (x.requires_grad_() for x in _target_tables(torch.float64, gen))
    t = torch.tensor([3, 1, 1])  # a ceps-0 step and a repeated step

    def leaf():
        return torch.randn(3, 2, 5, generator=gen, dtype=torch.float64).requires_grad_()

    pred, x0, noise = leaf(), leaf(), leaf()
    assert torch.autograd.gradcheck(lambda p, x, c, e, n: F.target_mse(p, x, t, c, e, n, None, 0),
                                    (pred, x0, cx0, ceps, noise))
    seed = seed_tensor(17)
    assert torch.autograd.gradcheck(lambda p, x, c, e: F.target_mse(p, x, t.int(), c, e, None, seed, 2),
                                    (pred, x0, cx0, ceps))


def test_gradients_of_ops_sharing_a_signature():
    # target_mse_backward has p_sample_step's C++ signature: each autograd kernel must call its
    # own op whichever of the two runs first in the process.
    _load()
    args, kwargs = _target_inputs((3, 7), torch.float32, True, seed=3)
    _, got = _loss_and_grads(args, kwargs, "cpu", [0])
    _, want = _loss_and_grads(args, kwargs, "reference", [0])
    torch.testing.assert_close(got[0], want[0], **tol(torch.float32, drawn=True))
    x, e = args[0], args[1]
    c = args[3].abs()
    step = F.p_sample_step(x, e, args[2], c, c, c, e, None, 0)
    cg = c[args[2].long()][:, None]
    torch.testing.assert_close(step, cg * x - cg * e + cg * e, **tol(torch.float32))
    _, again = _loss_and_grads(args, kwargs, "cpu", [0])
    torch.testing.assert_close(again[0], got[0], rtol=0, atol=0)


def test_target_mse_double_backward_is_a_clear_error():
    _load()
    args, kwargs = _target_inputs((3, 7), torch.float64, True)
    pred = args[0].requires_grad_()
    loss = F.target_mse(pred, args[1], args[2], args[3], args[4], None, kwargs["seed"], 0).sum()
    (g,) = torch.autograd.grad(loss, pred, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through target_mse is not supported"):
        g.sum().backward()


def test_forward_mode_ad_raises():
    _load()
    import torch.autograd.forward_ad as fwAD
    args, kwargs = _target_inputs((3, 7), torch.float32, True)
    with fwAD.dual_level():
        pred = fwAD.make_dual(args[0], torch.ones_like(args[0]))
        with pytest.raises(RuntimeError, match="target_mse on the cpu and cuda backends has no forward-mode AD"):
            F.target_mse(pred, args[1], args[2], args[3], args[4], None, kwargs["seed"], 0)
        cargs, ckw = _clipped_inputs((3, 7), torch.float32, True, "none", False)
        x_t = fwAD.make_dual(cargs[0], torch.ones_like(cargs[0]))
        with pytest.raises(RuntimeError, match="solver_step on the cpu and cuda backends has no forward-mode AD"):
            clipped(x_t, cargs[1], None, cargs[2], cargs[3:9], None, float("inf"), 1.0, None, ckw["seed"])


# ---- opcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_target_mse(requires_grad):
    _load()
    for drawn in (False, True):
        args, kwargs = _target_inputs((3, 4, 5), torch.float32, drawn, seed=6)
        if requires_grad:
            args = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
        full = (*args, kwargs.get("seed"), kwargs["sample_offset"])
        torch.library.opcheck(F.target_mse.default, full)
        grad = torch.rand(3, generator=_gen(2)) + 0.5
        torch.library.opcheck(F.target_mse_backward.default, (grad, *(a.detach() if a is not None else a
                                                                      for a in full[:6]), *full[6:]))


def test_opcheck_clipped_step():
    _load()
    for drawn, mode, guided in ((True, "bound", True), (False, "clip", False), (True, "none", False)):
        (x_t, out, t, a, b, p, q, r, s, noise), kw = _clipped_inputs((3, 4, 5), torch.float32, drawn, mode, guided)
        clip = kw.get("clip", float("inf"))
        torch.library.opcheck(F.solver_step.default, (x_t, out, kw.get("out_cond"), [], t,
                                                      ops.clipped_coef(a, b, p, q, r, s), kw.get("bound"), clip,
                                                      kw.get("guidance", 1.0), noise, kw.get("seed"),
                                                      kw["sample_offset"]))


# ---- argument checks in C++ ------------------------------------------------------------------

def test_cpp_argument_checks():
    _load()
    (x, o, t, a, b, p, q, r, s, _), kw = _clipped_inputs((2, 3), torch.float32, True, "none", False)
    seed, inf = kw["seed"], float("inf")
    tabs = (a, b, p, q, r, s)
    bound = torch.ones(2) * 2

    def step(x=x, o=o, oc=None, t=t, tabs=tabs, bound=None, clip=inf, guidance=1.0, noise=None, seed=seed):
        return clipped(x, o, oc, t, tabs, bound, clip, guidance, noise, seed)

    (pred, x0, tt, cx0, ceps, _), tkw = _target_inputs((2, 3), torch.float32, True)

    def mse(pred=pred, x0=x0, t=tt, cx0=cx0, ceps=ceps, noise=None, seed=tkw["seed"]):
        return F.target_mse(pred, x0, t, cx0, ceps, noise, seed, 0)

    def mse_bwd(grad=torch.ones(2), **kw):
        args = dict(pred=pred, x0=x0, t=tt, cx0=cx0, ceps=ceps, noise=None, seed=tkw["seed"])
        args.update(kw)
        return F.target_mse_backward(grad, *args.values(), 0)

    bad = [
        (lambda: step(clip=0.0), r"clip must be > 0 \(inf for no clipping\), got 0"),
        (lambda: step(clip=-1.0), "clip must be > 0"),
        (lambda: step(clip=float("nan")), "clip must be > 0"),
        (lambda: step(bound=bound[:1]), r"bound must have shape \[2\] \(one per sample\)"),
        (lambda: step(bound=bound[None]), r"bound must have shape \[2\]"),
        (lambda: step(bound=bound.half()), "bound must be float32 or float64, got Half"),
        (lambda: step(bound=bound, clip=1.0), "pass clip or bound, not both"),
        (lambda: step(guidance=inf), "guidance must be finite, got inf"),
        (lambda: step(guidance=float("nan")), "guidance must be finite"),
        (lambda: step(t=t + N_STEPS), rf"t must lie in \[0, {N_STEPS}\)"),
        (lambda: step(t=t.float()), "t must be an int32 or int64"),
        (lambda: step(oc=o[:1]), "out_cond must have the shape of x"),
        (lambda: step(oc=o.double()), "out_cond must have the dtype of x"),
        (lambda: step(o=o[:, :2]), "out must have the shape of x"),
        (lambda: step(seed=None), "seed is required when noise is None"),
        (lambda: step(noise=x[:1], seed=None), "noise must have the shape of x"),
        (lambda: step(x=x.int()), "x must be float16, bfloat16"),
        (lambda: mse(x0=x0[:1]), "x0 must have the shape of pred"),
        (lambda: mse(x0=x0.double()), "x0 must have the dtype of pred"),
        (lambda: mse(pred=torch.randn(2, 0), x0=torch.randn(2, 0)), "pred must have at least one element per sample"),
        (lambda: mse(t=tt - 4), rf"t must lie in \[0, {N_STEPS}\)"),
        (lambda: mse(seed=None), "seed is required when noise is None"),
        (lambda: mse(noise=x0.half(), seed=None), "noise must have the dtype of pred"),
        (lambda: mse(ceps=ceps[:4]), f"ceps has 4, expected {N_STEPS}"),
        (lambda: mse(cx0=cx0.int()), "cx0 must be float32 or float64"),
        (lambda: mse_bwd(grad=torch.ones(3)), r"grad must have shape \[2\]"),
        (lambda: mse_bwd(x0=x0[:, :1]), "x0 must have the shape of pred"),
        (lambda: mse_bwd(seed=None), "seed is required when noise is None"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()
            pytest.fail(f"no error; expected {message!r}")
