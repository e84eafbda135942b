"""The two calls of a training step's diffusion part (csrc/train_ops.cpp) and the direct calls
of the hot ops (csrc/fast_calls.cpp):

- torch.ops.fastddpm.train_inputs against the separate ops it fuses (sample_t, normal,
  q_sample), bit for bit, and its seed drawn as torch.randint draws it from the same generator;
- torch.ops.fastddpm.mse_loss and fastddpm.ops.mse_loss (every backend on CPU tensors) against
  float64 math, values and d/dpred, with its refusals and opcheck;
- fastddpm._C.<op> against torch.ops.fastddpm.<op>, bit for bit, and the calls it declines
  (NotImplemented: a tensor subclass, other argument types, a __torch_function__ mode);
- DenoiseDiffusion.loss's fused path against its per-sample path and the reference backend;
- every backend module defines the whole backend interface.

Outputs of the ops are NaN-poisoned (the ``poisoned`` fixture) where they are compared.
"""
import inspect

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import _extension, ops, schedule
from fastddpm.backends import compiled
from helpers import (DTYPES, HALF_DTYPES, cpu_backends, mse_tol, per_sample64, seed_tensor, seeded_loss, table_dtype,
                     tables)

F = torch.ops.fastddpm
N_STEPS = 37
SEEDS = (0, 0xFFFFFFFF, 2**63 + 12345, 2**64 - 1)
OFFSETS = (0, 7, 2**32 - 2)


def _C():
    C = _extension.load()
    assert C is not None, f"fastddpm._C is not built or failed to load: {_extension.error()}"
    return C


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _q_tables(dtype):
    tabs = tables(N_STEPS, table_dtype(dtype))
    return tabs["sqrt_ab"], tabs["sqrt_1m_ab"]


# ---- train_inputs ------------------------------------------------------------------------------

TI_SHAPES = ((3, 5, 7), (1, 1), (5, 3, 17), (4, 2, 3, 5), (6,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TI_SHAPES, ids=str)
def test_train_inputs_matches_the_separate_ops(poisoned, shape, dtype):
    _C()
    sa, s1 = _q_tables(dtype)
    keeps = (False,) if dtype in HALF_DTYPES else (False, True)
    for i, keep in enumerate(keeps):
        x0 = _randn(shape, dtype, _gen(len(shape) + i), 2.0)
        seed = seed_tensor(SEEDS[(len(shape) + i) % len(SEEDS)])
        offset = OFFSETS[(shape[0] + i) % len(OFFSETS)]
        x_t, t, noise, seed_out = F.train_inputs(x0, sa, s1, seed, None, offset, keep)
        assert t.dtype == torch.int64 and t.shape == (shape[0],)
        assert torch.equal(t, F.sample_t(seed, shape[0], N_STEPS, offset))
        assert x_t.dtype == dtype and x_t.shape == shape and x_t.is_contiguous()
        assert not x_t.isnan().any()
        assert torch.equal(x_t, F.q_sample(x0, t, sa, s1, None, seed, offset))
        assert seed_out.numel() == 0 and seed_out.dtype == torch.int64  # a given seed is not returned
        if keep:
            assert noise.dtype == dtype and noise.shape == shape
            assert torch.equal(noise, F.normal(seed, list(shape), offset, dtype))
            assert torch.equal(x_t, F.q_sample(x0, t, sa, s1, noise, None, offset))
        else:
            assert noise.numel() == 0
        # The data's schedule is used: the result is not x0 and differs with the offset.
        other = F.train_inputs(x0, sa, s1, seed, None, offset + 1, keep)[0]
        assert not torch.equal(other, x_t)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("manual_seed", [0, 1, 12345, 2**40 + 3, 987654321])
def test_train_inputs_draws_the_seed_as_randint(manual_seed, keep):
    _C()
    sa, s1 = _q_tables(torch.float32)
    x0 = _randn((4, 3, 5), torch.float32, _gen(1))
    g, g2 = _gen(manual_seed), _gen(manual_seed)
    for _ in range(3):  # successive draws from the generator track randint's
        x_t, t, noise, seed_out = F.train_inputs(x0, sa, s1, None, g, 5, keep)
        want = torch.randint(2**63 - 1, (1,), dtype=torch.int64, generator=g2)
        assert seed_out.shape == (1,) and seed_out.dtype == torch.int64
        assert torch.equal(seed_out, want)
        assert torch.equal(g.get_state(), g2.get_state())  # the generator advanced as randint's
        assert torch.equal(t, F.sample_t(want, 4, N_STEPS, 5))
        assert torch.equal(x_t, F.q_sample(x0, t, sa, s1, None, want, 5))
        assert (noise.numel() != 0) == keep
    # The default generator (generator None).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(manual_seed)
        drawn = F.train_inputs(x0, sa, s1, None, None, 0, keep)[3]
        after = torch.get_rng_state()
        torch.manual_seed(manual_seed)
        want = torch.randint(2**63 - 1, (1,), dtype=torch.int64)
        assert torch.equal(drawn, want)
        assert torch.equal(after, torch.get_rng_state())


def test_train_inputs_refusals():
    _C()
    sa, s1 = _q_tables(torch.float32)
    x0 = _randn((3, 4), torch.float32, _gen(2))
    seed = seed_tensor(3)
    for dtype in HALF_DTYPES:
        with pytest.raises(RuntimeError, match="keep_noise"):
            F.train_inputs(x0.to(dtype), sa, s1, seed, None, 0, True)
    with pytest.raises(RuntimeError, match="pass seed or generator, not both"):
        F.train_inputs(x0, sa, s1, seed, _gen(0), 0, False)
    leaf = x0.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="records no gradient"):
        F.train_inputs(leaf, sa, s1, seed, None, 0, False)
    with pytest.raises(RuntimeError, match="records no gradient"):
        F.train_inputs(x0, sa.clone().requires_grad_(), s1, seed, None, 0, False)
    with torch.no_grad():  # no gradient asked for: it runs
        got = F.train_inputs(leaf, sa, s1, seed, None, 0, False)[0]
    assert torch.equal(got, F.train_inputs(x0, sa, s1, seed, None, 0, False)[0])
    with pytest.raises(RuntimeError, match="x0 must be float16, bfloat16, float32 or float64"):
        F.train_inputs(x0.int(), sa, s1, seed, None, 0, False)
    with pytest.raises(RuntimeError, match="batch dimension"):
        F.train_inputs(x0[0, 0], sa, s1, seed, None, 0, False)


@pytest.mark.parametrize("keep", [False, True])
def test_opcheck_train_inputs(keep):
    _C()
    sa, s1 = _q_tables(torch.float32)
    x0 = _randn((3, 4, 5), torch.float32, _gen(4))
    torch.library.opcheck(F.train_inputs.default, (x0, sa, s1, seed_tensor(11), None, 3, keep))


# ---- mse_loss: the op ------------------------------------------------------------------------

MSE_SHAPES = ((5,), (3, 7), (1, 1, 9), (4, 3, 5, 7), (1,))
# d/dpred against float64 math: one rounding of a float32 result (half types), a few float32
# ulp (float32), float64 throughout. atol: float16's subnormal spacing, else relative to the
# largest gradient (the error of a float32 target cx0[t] x0 + ceps[t] noise is absolute).
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _grad_tol(dtype, ref):
    atol = GRAD_RTOL[dtype] * ref.abs().max().item() + (2**-24 if dtype == torch.float16 else 0.0)
    return dict(rtol=GRAD_RTOL[dtype], atol=atol)


def _loss_tol(dtype, drawn):
    # A float32 per-sample MSE (float64 for float64 data) summed in double and rounded once.
    return mse_tol(dtype, drawn=drawn)


class MseCase:
    """One mse_loss call: pred (a leaf), target or (seed, offset), weight, the target_mse tables."""

    def __init__(self, shape, dtype, drawn, weighted, with_tables, seed=0, backend="cpu"):
        gen = _gen(seed)
        self.backend = backend  # whose normals the drawn target is
        b = shape[0]
        self.shape, self.dtype, self.drawn = shape, dtype, drawn
        self.pred = _randn(shape, dtype, gen).requires_grad_()
        self.target = None if drawn else _randn(shape, dtype, gen)
        self.seed = seed_tensor(SEEDS[seed % len(SEEDS)]) if drawn else None
        self.offset = OFFSETS[seed % len(OFFSETS)] if drawn else 0
        wdt = torch.float64 if seed % 2 else torch.float32
        self.weight = (torch.rand(b, generator=gen, dtype=torch.float64) * 3).to(wdt) if weighted else None
        self.tabs = None
        if with_tables:
            tdt = table_dtype(dtype)
            cx0 = (torch.rand(N_STEPS, generator=gen, dtype=torch.float64) * 2 - 1).to(tdt)
            ceps = (torch.rand(N_STEPS, generator=gen, dtype=torch.float64) + 0.1).to(tdt)
            ceps[::3] = 0
            t = torch.randint(N_STEPS, (b,), generator=gen)
            self.tabs = (_randn(shape, dtype, gen), t, cx0, ceps)

    def args(self):
        return (self.pred, self.target, self.seed, self.offset, self.weight) + (self.tabs or ())

    def target64(self):
        """The target in float64: the given one or the stream's float32 normals (the backend's
        own, torch.ops.fastddpm.normal for the cpu), through the tables when given."""
        if self.target is not None:
            eps = self.target.double()
        else:
            eps = ops.normal(self.shape, seed=self.seed, sample_offset=self.offset, dtype=torch.float32,
                             backend=self.backend).double()
        if self.tabs is None:
            return eps
        x0, t, cx0, ceps = self.tabs
        return per_sample64(cx0, t, eps) * x0.double() + per_sample64(ceps, t, eps) * eps

    def reduce64(self, per_sample):
        if self.weight is None:
            return per_sample.mean()
        return (per_sample * self.weight.double()).sum() / self.shape[0]

    def expected(self, scale=1.0):
        """(loss, d(scale * loss)/dpred) in float64."""
        p = self.pred.detach().double().requires_grad_()
        per = ((p - self.target64()) ** 2).reshape(self.shape[0], -1).mean(1)
        loss = self.reduce64(per)
        (g,) = torch.autograd.grad(loss * scale, p)
        return loss.detach(), g

    def per_sample_op(self):
        """The per-sample MSE of the separate op (mse_per_sample or target_mse)."""
        p = self.pred.detach()
        if self.tabs is None:
            return F.mse_per_sample(p, self.target, self.seed, self.offset)
        x0, t, cx0, ceps = self.tabs
        return F.target_mse(p, x0, t, cx0, ceps, self.target, self.seed, self.offset)


def _variants():
    return [(drawn, weighted, with_tables) for drawn in (False, True) for weighted in (False, True)
            for with_tables in (False, True)]


def _check_loss_and_grads(case, loss_fn):
    loss = loss_fn()
    acc = table_dtype(case.dtype)
    assert loss.shape == () and loss.dtype == acc
    want, _ = case.expected()
    torch.testing.assert_close(loss.detach().double(), want, **_loss_tol(case.dtype, case.drawn))
    for scale in (1.0, 3.7, 65536.0):
        loss = loss_fn()
        (g,) = torch.autograd.grad(loss * scale, case.pred)
        _, g_want = case.expected(scale)
        assert g.dtype == case.dtype and g.shape == case.shape
        torch.testing.assert_close(g.double(), g_want.to(case.dtype).double(), **_grad_tol(case.dtype, g_want))
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MSE_SHAPES, ids=str)
def test_mse_loss_op_matches_float64(poisoned, shape, dtype):
    _C()
    for i, (drawn, weighted, with_tables) in enumerate(_variants()):
        case = MseCase(shape, dtype, drawn, weighted, with_tables, seed=i + len(shape))
        loss = _check_loss_and_grads(case, lambda: F.mse_loss(*case.args()))
        # The separate op's per-sample MSE reduced the same way (in double, rounded once).
        per = case.per_sample_op()
        reduced = case.reduce64(per.double()).to(per.dtype)
        torch.testing.assert_close(loss.detach(), reduced, rtol=2.5e-7 if per.dtype == torch.float32 else 1e-15,
                                   atol=0)
        # no_grad: the same value, no graph.
        with torch.no_grad():
            quiet = F.mse_loss(*case.args())
        assert quiet.grad_fn is None and torch.equal(quiet, loss.detach())


def test_mse_loss_known_answers():
    _C()
    pred, target = torch.full((4, 3, 5), 3.0), torch.full((4, 3, 5), 1.0)
    assert F.mse_loss(pred, target, None, 0, None).item() == 4.0
    w = torch.tensor([1.0, 0.0, 2.0, 5.0])
    assert F.mse_loss(pred, target, None, 0, w).item() == 4.0 * 8.0 / 4
    per_row = torch.arange(4.0).view(4, 1, 1).expand(4, 3, 5).contiguous()  # sample b off by b
    assert F.mse_loss(per_row, torch.zeros(4, 3, 5), None, 0, w).item() == (0 + 0 + 2 * 4 + 5 * 9) / 4
    # x0 prediction's tables (cx0, ceps) = (1, 0): the target is x0 whatever the noise.
    x0 = torch.randn(4, 3, 5, generator=_gen(1))
    one, zero = torch.ones(N_STEPS), torch.zeros(N_STEPS)
    t = torch.tensor([0, 5, 9, 36])
    assert F.mse_loss(x0, None, seed_tensor(5), 0, None, x0, t, one, zero).item() == 0.0
    # An empty batch: NaN, as the mean of nothing.
    assert F.mse_loss(torch.zeros(0, 3), torch.zeros(0, 3), None, 0, None).isnan()


def test_mse_loss_op_refusals():
    _C()
    case = MseCase((3, 4, 5), torch.float32, False, True, False)
    pred, target, w = case.pred, case.target, case.weight
    x0, t = _randn((3, 4, 5), torch.float32, _gen(1)), torch.tensor([0, 1, 2])
    cx0 = ceps = torch.ones(N_STEPS)
    for name, call in (
            ("target", lambda: F.mse_loss(pred, target.clone().requires_grad_(), None, 0, w)),
            ("weight", lambda: F.mse_loss(pred, target, None, 0, w.clone().requires_grad_())),
            ("x0", lambda: F.mse_loss(pred, None, seed_tensor(1), 0, None, x0.clone().requires_grad_(), t, cx0,
                                      ceps))):
        with pytest.raises(RuntimeError, match=f"differentiates pred only, but {name} requires grad"):
            call()
    with torch.no_grad():  # no gradient asked for: a constant that requires grad is fine
        F.mse_loss(pred, target.clone().requires_grad_(), None, 0, w.clone().requires_grad_())
    bad = [
        (lambda: F.mse_loss(pred, target, None, 0, w[:2]), r"weight must have shape \[3\]"),
        (lambda: F.mse_loss(pred, target, None, 0, w[None]), r"weight must have shape \[3\]"),
        (lambda: F.mse_loss(pred, target, None, 0, torch.ones(3, dtype=torch.int64)), "weight must be a floating"),
        (lambda: F.mse_loss(pred, None, seed_tensor(1), 0, None, x0, t, None, ceps),
         "pass x0, t, cx0 and ceps together.*got 3 of them"),
        (lambda: F.mse_loss(pred, None, seed_tensor(1), 0, None, x0=x0), "got 1 of them"),
        (lambda: F.mse_loss(pred[0, 0, 0], target[0, 0, 0], None, 0, None), "pred must have a batch dimension"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()
            pytest.fail(f"no error; expected {message!r}")


@pytest.mark.parametrize("with_tables", [False, True], ids=["mse", "target_mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_mse_loss_double_backward_is_a_clear_error(dtype, with_tables):
    _C()
    for drawn in (False, True):
        case = MseCase((3, 7), dtype, drawn, True, with_tables)
        loss = F.mse_loss(*case.args())
        (g,) = torch.autograd.grad(loss, case.pred, create_graph=True)
        _, want = case.expected()
        torch.testing.assert_close(g.double(), want.to(dtype).double(), **_grad_tol(dtype, want))  # still holds
        assert g.requires_grad  # a graph was asked for: its derivative is refused, not dropped
        with pytest.raises(RuntimeError, match="double backward"):
            g.sum().backward()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_mse_loss(requires_grad):
    _C()
    for i, (drawn, weighted, with_tables) in enumerate(_variants()):
        case = MseCase((3, 4, 5), torch.float32, drawn, weighted, with_tables, seed=i)
        args = case.args()
        if not requires_grad:
            args = (args[0].detach(),) + args[1:]
        torch.library.opcheck(F.mse_loss.default, args)
        grad = torch.tensor(1.7)
        torch.library.opcheck(F.mse_loss_backward.default, (grad, args[0].detach()) + args[1:])


# ---- mse_loss: fastddpm.ops ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_ops_mse_loss_matches_float64(poisoned, backend, dtype):
    shapes = ((3, 7), (1, 2, 5)) if backend == "triton" else ((3, 7), (1, 2, 5), (5,), (4, 3, 5, 7))
    for shape in shapes:
        for drawn in (False, True):
            for weighted in (False, True):
                case = MseCase(shape, dtype, drawn, weighted, False, seed=len(shape) + 2 * drawn + weighted,
                               backend=backend)
                _check_loss_and_grads(case, lambda: ops.mse_loss(case.pred, case.target, weight=case.weight,
                                                                 seed=case.seed, sample_offset=case.offset,
                                                                 backend=backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_ops_mse_loss_argument_errors(backend):
    case = MseCase((3, 4), torch.float32, False, True, False)
    pred, target, w = case.pred, case.target, case.weight
    bad = [
        (dict(weight=w[:2]), ValueError, r"weight must have shape \[3\]"),
        (dict(weight=torch.ones(3, dtype=torch.int32)), TypeError, "weight must be"),
        (dict(weight="1"), TypeError, "weight must be a torch.Tensor"),
        (dict(weight=w.clone().requires_grad_()), ValueError, "weight must not require grad"),
        (dict(pred=pred[0, 0]), ValueError, "pred must have a batch dimension"),
        (dict(target=target[:2]), ValueError, "target must have the shape of pred"),
        (dict(pred=pred.detach().int()), TypeError, "pred must be"),
    ]
    bad += [(dict(weight=None, target=target[:2]), ValueError, "target must have the shape of pred"),
            (dict(weight=None, target=target.double()), None, None),  # promoted, as F.mse_loss does
            (dict(weight=None, target=target.to(torch.device("meta"))), RuntimeError, "target is on meta"),
            (dict(weight=None, pred=pred[0, 0], target=target[0, 0]), ValueError, "pred must have a batch dimension"),
            (dict(weight=None, pred=pred[:, :0], target=target[:, :0]), ValueError, "at least one element"),
            (dict(weight=None, sample_offset=-1), ValueError, "sample_offset must lie in"),
            (dict(weight=None, sample_offset=0.5), TypeError, "sample_offset must be"),
            (dict(weight=None, pred=pred.detach().int(), target=target.int()), TypeError, "pred must be")]
    for kw, exc, message in bad:  # (weight=None: the checks of mse_loss's common call, F.mse_loss's)
        call = dict(pred=pred, target=target, weight=w)
        call.update(kw)
        if exc is None:
            got = ops.mse_loss(call.pop("pred"), call.pop("target"), **call, backend=backend)
            assert got.dtype == torch.float64
            continue
        with pytest.raises(exc, match=message):
            ops.mse_loss(call.pop("pred"), call.pop("target"), **call, backend=backend)
            pytest.fail(f"no error; expected {message!r}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_ops_mse_loss_refuses_a_target_that_requires_grad(backend):
    # The docstring: target is a constant, as weight is (the gradient is d/dpred only). Every
    # backend says so, naming it, as every backend refuses a weight that requires grad.
    case = MseCase((3, 4), torch.float32, False, False, False)
    with pytest.raises((ValueError, RuntimeError), match="target"):
        ops.mse_loss(case.pred, case.target.clone().requires_grad_(), backend=backend)


# ---- fastddpm._C direct calls ----------------------------------------------------------------

class Sub(torch.Tensor):
    pass


class PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _direct_cases():
    """{op: [positional arguments in schema order, every argument given]}."""
    gen = _gen(21)
    tabs = tables(N_STEPS)
    sa, s1, c1, c2, sigma = (tabs[k] for k in ("sqrt_ab", "sqrt_1m_ab", "c1", "c2", "sigma"))
    shape = (3, 2, 5, 3)
    x, e, x0 = (_randn(shape, torch.float32, gen) for _ in range(3))
    t = torch.tensor([0, 17, 36])
    seed = seed_tensor(0x1234_5678_9ABC_DEF0)
    cx0 = torch.rand(N_STEPS, generator=gen) * 2 - 1
    ceps = torch.rand(N_STEPS, generator=gen)
    coef = ops.clipped_coef(*(torch.rand(N_STEPS, generator=gen) for _ in range(6)))
    vlb = schedule.vlb_tables(schedule.linear(N_STEPS))
    vlb = torch.stack([vlb[c] for c in schedule.VLB_COLUMNS], 1).float().contiguous()
    out = torch.cat([e, torch.rand(shape, generator=gen) * 2 - 1], 1)
    w = torch.rand(3, generator=gen)
    inf = float("inf")
    return {
        "q_sample": [(x, t, sa, s1, None, seed, 5), (x, t.int(), sa, s1, e, None, 0)],
        "p_sample_step": [(x, e, t, c1, c2, sigma, None, seed, 5), (x, e, t, c1, c2, sigma, x0, None, 0)],
        "mse_per_sample": [(x, e, None, 0), (x, None, seed, 3)],
        "target_mse": [(x, x0, t, cx0, ceps, None, seed, 2), (x, x0, t, cx0, ceps, e, None, 0)],
        "solver_step": [(x, e, None, [], t, coef, None, inf, 1.0, None, seed, 2, None),
                        (x, e, x0, (x0,), t, coef, None, 1.0, 2.5, e, None, 0, None)],
        "vlb_loss": [(x0, out, t, vlb, None, seed, 1, 0, 1, True), (x0, out, t, vlb, e, None, 0, 1, 1, False)],
        "train_inputs": [(x, sa, s1, seed, None, 4, False), (x, sa, s1, seed, None, 4, True)],
        "mse_loss": [(x, e, None, 0, None, None, None, None, None), (x, None, seed, 3, w, x0, t, cx0, ceps)],
    }


DIRECT_OPS = ("q_sample", "p_sample_step", "mse_per_sample", "target_mse", "solver_step", "vlb_loss",
              "train_inputs", "mse_loss")


def _same(a, b):
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is torch.Tensor and type(b) is torch.Tensor and a.dtype == b.dtype and torch.equal(a, b)


def _replace(args, i, value):
    return args[:i] + (value,) + args[i + 1:]


@pytest.mark.parametrize("op", DIRECT_OPS)
def test_direct_call_matches_torch_ops(poisoned, op):
    C = _C()
    for args in _direct_cases()[op]:
        got = getattr(C, op)(*args)
        want = getattr(F, op)(*args)
        assert got is not NotImplemented
        assert _same(got, want), f"_C.{op} differs from torch.ops.fastddpm.{op}"
        assert _same(getattr(compiled, op)(*args), want)
    if op == "train_inputs":  # the seed drawn from a generator, as torch.ops draws it
        args = _replace(_replace(_direct_cases()[op][1], 3, None), 4, _gen(77))
        got = C.train_inputs(*args)
        want = F.train_inputs(*_replace(args, 4, _gen(77)))
        assert got[3].numel() == 1 and _same(got, want)


@pytest.mark.parametrize("op", ["mse_loss", "mse_per_sample", "q_sample", "target_mse", "vlb_loss"])
def test_direct_call_records_the_same_gradient(op):
    C = _C()
    args = _direct_cases()[op][0]
    diff = 1 if op == "vlb_loss" else 0  # vlb_loss differentiates out
    grads = []
    for fn in (getattr(C, op), getattr(F, op)):
        leaf = args[diff].detach().clone().requires_grad_()
        y = fn(*_replace(args, diff, leaf))
        (g,) = torch.autograd.grad(y.sum(), leaf)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])
    # nn.Parameter is a plain tensor here: taken, and its gradient recorded.
    param = nn.Parameter(args[diff].detach().clone())
    y = getattr(C, op)(*_replace(args, diff, param))
    assert y is not NotImplemented
    y.sum().backward()
    assert torch.equal(param.grad, grads[1])


@pytest.mark.parametrize("op", DIRECT_OPS)
def test_direct_call_declines_what_it_does_not_take(op):
    C = _C()
    fn = getattr(C, op)
    args = _direct_cases()[op][0]
    declined = [
        _replace(args, 0, args[0].as_subclass(Sub)),  # a subclass may override __torch_function__
        _replace(args, 0, 1.0),  # a float where a tensor goes
        _replace(args, 0, None),  # None where a tensor is required
        args[:-1],  # too few arguments
        args + (0,),  # too many
        (),
    ]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    declined += [_replace(args, i, args[i].as_subclass(Sub)) for i in tensors[1:]]
    ints = [i for i, a in enumerate(args) if type(a) is int]
    declined += [_replace(args, i, True) for i in ints]  # a bool is not an int of the schema
    declined += [_replace(args, i, float(args[i])) for i in ints]
    declined += [_replace(args, i, 2**64) for i in ints]  # out of int64's range
    if op == "train_inputs":
        declined += [_replace(args, 6, 1), _replace(args, 4, 5), _replace(args, 4, "cpu")]
    if op == "solver_step":
        declined += [_replace(args, 3, [args[0].as_subclass(Sub)]), _replace(args, 3, args[0]),
                     _replace(args, 7, "inf")]
    if op == "vlb_loss":
        declined.append(_replace(args, 9, 1))
    for bad in declined:
        assert fn(*bad) is NotImplemented, f"_C.{op} took {[type(a).__name__ for a in bad]}"
    with PassThroughMode():
        assert fn(*args) is NotImplemented
    assert fn(*args) is not NotImplemented  # the mode's exit restores the direct path
    with pytest.raises(TypeError):
        fn(*args[:-1], **{"x": args[-1]})  # keyword arguments are not taken at all


@pytest.mark.parametrize("op", DIRECT_OPS)
def test_compiled_falls_back_to_torch_ops(op):
    # fastddpm.backends.compiled (the cpu and cuda backends' calls) takes what _C declines to
    # torch.ops: a subclass and a TorchFunctionMode still work, with the same values.
    _C()
    for args in _direct_cases()[op]:
        want = getattr(F, op)(*args)
        got = getattr(compiled, op)(*_replace(args, 0, args[0].as_subclass(Sub)))
        got = tuple(y.as_subclass(torch.Tensor) for y in got) if isinstance(got, tuple) else got
        assert _same(got if isinstance(got, tuple) else got.as_subclass(torch.Tensor), want)
        with PassThroughMode():
            assert _same(getattr(compiled, op)(*args), want)


def test_direct_call_errors_are_the_ops_errors():
    C = _C()
    cases = _direct_cases()
    q = cases["q_sample"][0]
    mse = cases["mse_loss"][0]
    ti = cases["train_inputs"][0]
    bad = [
        ("q_sample", _replace(q, 1, torch.tensor([0, 99, 1]))),  # t out of range
        ("q_sample", _replace(_replace(q, 5, None), 4, None)),  # neither noise nor seed
        ("mse_loss", _replace(mse, 4, torch.ones(2))),  # weight's shape
        ("mse_loss", _replace(mse, 1, mse[1].clone().requires_grad_())),  # the autograd kernel's refusal
        ("train_inputs", _replace(ti, 4, _gen(0))),  # seed and generator
        ("train_inputs", _replace(ti, 0, ti[0].half())[:6] + (True,)),  # keep_noise in half
        ("mse_per_sample", _replace(cases["mse_per_sample"][0], 1, torch.ones(2))),
    ]
    for op, args in bad:
        with pytest.raises(Exception) as want:
            getattr(F, op)(*args)
        with pytest.raises(Exception) as got:
            getattr(C, op)(*args)
        assert type(got.value) is type(want.value), op
        assert str(got.value) == str(want.value), op


# ---- DenoiseDiffusion.loss -------------------------------------------------------------------

LOSS_STEPS = 50


class TinyEps(nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        gen = _gen(5)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Embedding(LOSS_STEPS, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t)[:, :, None, None].to(x.dtype)


def _diffusion(prediction, backend, dtype, model=None):
    model = model if model is not None else TinyEps().to(dtype)
    return fastddpm.DenoiseDiffusion(model, LOSS_STEPS, prediction=prediction, backend=backend)


def _x0(dtype, requires_grad=False):
    return _randn((4, 3, 5, 7), dtype, _gen(8)).requires_grad_(requires_grad)


def _close(dtype, loose=False):
    if loose:  # another backend's noise (within 2e-6) through the model
        return dict(rtol=2e-5, atol=2e-6)
    return dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_fused_equals_per_sample_mean(prediction, backend, dtype):
    d = _diffusion(prediction, backend, dtype)
    x0 = _x0(dtype)
    params = list(d.eps_model.parameters())
    for seed in (0, 3):
        fused, fused_grads = seeded_loss(d, x0, seed, params)
        per, per_grads = seeded_loss(d, x0, seed, params, per_sample=True)
        assert fused.dtype == dtype and fused.shape == ()
        torch.testing.assert_close(fused, per, **_close(dtype))
        for g, w in zip(fused_grads, per_grads):
            torch.testing.assert_close(g, w, **_close(dtype))
    other, _ = seeded_loss(d, x0, 1, params)
    assert other != fused  # the seed matters
    if backend == "cpu":  # the default call is the fused one: one node, the mse_loss op
        with torch.random.fork_rng(devices=[]):
            loss = d.loss(x0)
        assert loss.grad_fn.name().endswith("::MseLoss>"), loss.grad_fn.name()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_min_snr_fused_equals_per_sample_mean(prediction, backend, dtype):
    d = _diffusion(prediction, backend, dtype)
    x0 = _x0(dtype)
    params = list(d.eps_model.parameters())
    fused, fused_grads = seeded_loss(d, x0, 4, params, weighting="min_snr")
    per, per_grads = seeded_loss(d, x0, 4, params, weighting="min_snr", per_sample=True)
    torch.testing.assert_close(fused, per, **_close(dtype))
    for g, w in zip(fused_grads, per_grads):
        torch.testing.assert_close(g, w, **_close(dtype))
    plain, _ = seeded_loss(d, x0, 4, params)
    assert plain != fused  # the weights were applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_cpu_equals_reference(prediction, dtype):
    model = TinyEps().to(dtype)
    d_cpu, d_ref = (_diffusion(prediction, b, dtype, model) for b in ("cpu", "reference"))
    x0 = _x0(dtype)
    params = list(model.parameters())
    for seed in (0, 9):
        got, got_grads = seeded_loss(d_cpu, x0, seed, params)
        want, want_grads = seeded_loss(d_ref, x0, seed, params)
        torch.testing.assert_close(got, want, **_close(dtype, loose=True))
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_with_x0_requiring_grad(prediction, dtype):
    # The separate ops then run (train_inputs records no gradient): x0 gets its gradient, the
    # reference backend's, from the same seed as the fused call's (the value is the same).
    model = TinyEps().to(dtype)
    d_cpu, d_ref = (_diffusion(prediction, b, dtype, model) for b in ("cpu", "reference"))
    x0 = _x0(dtype, requires_grad=True)
    params = list(model.parameters())
    got, got_grads = seeded_loss(d_cpu, x0, 6, [x0] + params)
    want, want_grads = seeded_loss(d_ref, x0, 6, [x0] + params)
    assert got_grads[0].abs().sum() > 0
    torch.testing.assert_close(got, want, **_close(dtype, loose=True))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-6)
    fused, fused_grads = seeded_loss(d_cpu, x0.detach(), 6, params)
    torch.testing.assert_close(got, fused, **_close(dtype))
    for g, w in zip(got_grads[1:], fused_grads):
        torch.testing.assert_close(g, w, **_close(dtype))


# ---- loss(x0)'s common call: the hot path makes the general path's calls ---------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_common_call_equals_the_general_path(prediction, backend, dtype):
    # sample_offset=0 is the default's value but takes loss's general path: the same values and
    # gradients bit for bit, and the same node.
    d = _diffusion(prediction, backend, dtype)
    x0 = _x0(dtype)
    params = list(d.eps_model.parameters())
    hot, hot_grads = seeded_loss(d, x0, 11, params)
    general, general_grads = seeded_loss(d, x0, 11, params, sample_offset=0)
    assert torch.equal(hot, general)
    for g, w in zip(hot_grads, general_grads):
        assert torch.equal(g, w)
    with torch.random.fork_rng(devices=[]):
        assert type(d.loss(x0).grad_fn) is type(d.loss(x0, sample_offset=0).grad_fn)


def test_loss_common_call_follows_a_reassigned_backend():
    d = _diffusion("eps", "cpu", torch.float32)
    x0 = _x0(torch.float32)
    assert d.loss(x0).grad_fn.name().endswith("::MseLoss>")
    d.backend = "reference"
    assert not d.loss(x0).grad_fn.name().endswith("::MseLoss>")
    d.backend = "cpu"
    assert d.loss(x0).grad_fn.name().endswith("::MseLoss>")


class _Float32Eps(TinyEps):
    def forward(self, x, t):
        return super().forward(x.float(), t)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_loss_common_call_with_another_output_dtype(backend):
    # float64 data, a float32 model output: the MSE promotes, as the general path does.
    d = _diffusion("eps", backend, torch.float64, _Float32Eps())
    x0 = _x0(torch.float64)
    params = list(d.eps_model.parameters())
    hot, hot_grads = seeded_loss(d, x0, 11, params)
    general, general_grads = seeded_loss(d, x0, 11, params, sample_offset=0)
    assert hot.dtype == torch.float64 and torch.equal(hot, general)
    for g, w in zip(hot_grads, general_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.float32, torch.float16)], ids=str)
def test_loss_of_a_narrower_model_output_is_in_the_data_dtype(x_dtype, out_dtype):
    # The cpu backend keeps the noise (x0's dtype) and the MSE promotes; the reference backend
    # regenerates it, in the promoted dtype too: the same dtype, and values within the noise's
    # rounding. Before, the reference compared a narrower output with noise of that dtype.
    class Narrow(TinyEps):
        def forward(self, x, t):
            return super().forward(x.to(x_dtype), t).to(out_dtype)
    model = Narrow().to(x_dtype)
    x0 = _x0(x_dtype)
    params = list(model.parameters())
    got, got_grads = seeded_loss(_diffusion("eps", "cpu", x_dtype, model), x0, 11, params)
    want, want_grads = seeded_loss(_diffusion("eps", "reference", x_dtype, model), x0, 11, params)
    assert got.dtype == want.dtype == x_dtype
    torch.testing.assert_close(got, want, **_close(x_dtype, loose=True))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_loss_common_call_refuses_a_bad_model_output(backend):
    class Bad(TinyEps):
        def forward(self, x, t):
            return super().forward(x, t)[:, :2]
    d = _diffusion("eps", backend, torch.float32, Bad())
    with pytest.raises(ValueError, match="eps_model's output must have the shape of x0"):
        d.loss(_x0(torch.float32))


# ---- the backend interface -------------------------------------------------------------------

INTERFACE = ("q_sample", "p_sample_step", "mse_per_sample", "mse_loss", "sample_t", "normal", "solver_step",
             "target_mse", "vlb_loss", "train_inputs", "materialises_noise", "available")


@pytest.mark.parametrize("name", fastddpm.backends.BACKENDS)
def test_backend_module_defines_the_interface(name):
    try:
        mod = fastddpm.backends.get(name)
    except ImportError as e:
        pytest.skip(f"backend module {name!r} does not import here: {e}")
    missing = [f for f in INTERFACE if not callable(getattr(mod, f, None))]
    assert not missing, f"backend {name!r} lacks {missing}"
    assert mod.name == name
    assert mod.device_types is None or isinstance(mod.device_types, tuple)
    ok, reason = mod.available()
    assert isinstance(ok, bool) and isinstance(reason, str)
    # The same parameters as the reference's (the callers pass them positionally).
    ref = fastddpm.backends.get("reference")
    for f in INTERFACE:
        if f != "available":
            got = list(inspect.signature(getattr(mod, f)).parameters)
            assert got == list(inspect.signature(getattr(ref, f)).parameters), f"{name}.{f}{got}"
