"""Property-based differential test: every public op of fastddpm.ops on each kernel backend
against the reference backend, over random ranks, layouts, dtypes, timesteps, seeds, sample
offsets, given or drawn noise, forward and backward.

Hypothesis draws a *spec* (plain data: shapes, dtypes, layout names, a value seed); the test
builds the tensors from it, so a failure prints an input that is easy to rebuild. Examples are
derandomised (CI is deterministic) and few for triton, which runs in Triton's interpreter on
CPU tensors here (tests/conftest.py sets TRITON_INTERPRET=1).

Every comparison is an elementwise bound derived from how the result is computed (see
``_bound``): a few roundings of the compute dtype relative to the size of the terms (not of the
result, which may cancel), the contract's 1e-5 bound on drawn normals scaled by the coefficient
in front of the noise, and one ulp of the output dtype where it is narrower than the compute
dtype (the reference rounds once; a kernel may land on the neighbouring value).
Outputs are poisoned: with ``fill_uninitialized_memory`` every fresh allocation starts as NaN,
so an element a kernel forgets to write fails.
"""
import dataclasses
import math
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import device_for, poisoned_outputs
from fastddpm import ops, philox
from fastddpm._checks import seed_tensor
from fastddpm._checks import compute_dtype

# Backends to fuzz, each against backend="reference", on CPU tensors (the inputs' layouts are
# built on the CPU; triton runs there in the interpreter). The interpreter takes ~35 ms a
# launch, so triton gets fewer examples.
FUZZED = ["cpu", "triton"]
EXAMPLES = {"cpu": 150, "triton": 25}


def _on_cpu(backend):
    assert device_for(backend) == torch.device("cpu"), f"{backend} must take CPU tensors here"


def _settings(backend):
    return settings(derandomize=True, database=None, deadline=None, print_blob=False,
                    max_examples=EXAMPLES.get(backend, 25),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NOISE_ATOL = 1e-5  # the contract: drawn normals within 1e-5 of the reference's
# Roundings allowed in the compute dtype, relative to the magnitude of the terms: the table
# cast, the products and the sum, rounded once or contracted into an FMA. Per dtype that is
# 4 * 2**-24 = 2.4e-7 (float32, and float16/bfloat16, which compute in float32, plus one ulp of
# the output for its final rounding) and 4 * 2**-53 = 4.4e-16 (float64), of sum |coef * term|;
# plus NOISE_ATOL * |noise coef| when the noise is drawn (the normals' libm differences).
ROUNDINGS = 4
TABLE_LAYOUTS = ["contiguous", "stepped", "offset"]  # a 1-D table may be any strided view
SEED_EDGES = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
SPECIALS = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-41, 3e-6, 7e4, -1e39]
OFFSET_EDGES = [0, 1, 2**32 - 1, 2**62 - 64, 2**62 - 1]


# ---- comparisons -------------------------------------------------------------------------------

def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def ulp(v, dtype):
    """The spacing of ``dtype`` at magnitudes ``v`` (float64), subnormals included."""
    fi = torch.finfo(dtype)
    _, exp = torch.frexp(v)  # v = m * 2**exp, m in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(v, fi.eps), exp - 1)
    return torch.where(v < fi.smallest_normal, fi.smallest_normal * fi.eps, spacing)


def narrowest(*dtypes):
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _bound(got, ref, out_dtype, cdt, scale, noise_coef=None):
    """|got - ref| allowed elementwise (float64). ``out_dtype``: the narrowest dtype the result
    was rounded to (a gradient may pass through the op's dtype and then its input's)."""
    bound = ROUNDINGS * unit_roundoff(cdt) * scale
    if noise_coef is not None:
        bound = bound + NOISE_ATOL * noise_coef
    if torch.finfo(out_dtype).eps > torch.finfo(cdt).eps:
        bound = bound + ulp(torch.maximum(got.abs(), ref.abs()), out_dtype)
    return bound


def assert_within(got, ref, bound, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != reference {ref.dtype}"
    g, r = got.detach().double(), ref.detach().double()
    err = (g - r).abs()
    # A finite reference must be matched within the bound; an inf or NaN one exactly.
    ok = torch.where(r.isfinite(), g.isfinite() & (err <= bound), (g == r) | (g.isnan() & r.isnan()))
    if not bool(ok.all()):
        i = int((~ok).flatten().nonzero()[0])
        excess = torch.where(ok, 0.0, err - bound).flatten()
        j = int(excess.nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int((~ok).sum())}/{ok.numel()} elements outside the bound; first at flat "
            f"index {i}: got {g.flatten()[i].item()!r}, reference {r.flatten()[i].item()!r}, bound "
            f"{bound.flatten()[i].item():.3g}; worst at {j}: got {g.flatten()[j].item()!r}, "
            f"reference {r.flatten()[j].item()!r}, bound {bound.flatten()[j].item():.3g}")


# ---- layouts ----------------------------------------------------------------------------------
# torch has no negative strides (torch.flip copies), so the backwards-in-memory layouts are
# "reversed_dims" (every dim permuted) and "overlapping" (as_strided samples sharing memory).

def layouts_for(rank):
    names = ["contiguous", "expanded_batch", "offset", "stepped", "overlapping"]
    if rank >= 2:
        names += ["transposed", "expanded_inner", "reversed_dims"]
    if rank == 4:
        names += ["channels_last"]
    return names


def build(shape, dtype, layout, gen, scale=1.0, device="cpu"):
    """A tensor of ``shape`` and ``dtype`` with the memory layout ``layout`` and random normal
    values times ``scale``, or with ``scale="specials"`` some of them inf, NaN, zeros, values
    that are subnormal or overflow in the half types."""
    shape = tuple(shape)
    numel = math.prod(shape)

    def randn(*s):
        v = torch.randn(s, generator=gen, dtype=torch.float64)
        if scale == "specials":  # about one element in four special
            pick = torch.randint(0, 4 * len(SPECIALS), s, generator=gen)
            v = torch.where(pick < len(SPECIALS), torch.tensor(SPECIALS, dtype=torch.float64)[pick.clamp(max=len(SPECIALS) - 1)], v)
            return v.to(device, dtype)
        return (v * scale).to(device, dtype)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "offset":  # storage offset 1: misaligned for vector loads
        return randn(numel + 1)[1:].view(shape)
    if layout == "stepped":  # x[:, ::2] (x[::2] for rank 1)
        dim = 1 if len(shape) > 1 else 0
        big = list(shape)
        big[dim] *= 2
        return randn(*big)[(slice(None),) * dim + (slice(None, None, 2),)]
    if layout == "overlapping":  # consecutive samples share half their elements
        d = math.prod(shape[1:])
        strides = [max(1, d // 2)] + list(torch.empty(shape[1:] or (1,)).stride())[: len(shape) - 1]
        base = randn((shape[0] - 1) * strides[0] + d)
        return base.as_strided(shape, strides)
    if layout == "expanded_batch":  # one sample, stride 0 along the batch
        return randn(1, *shape[1:]).expand(shape)
    if layout == "expanded_inner":  # stride 0 along the last sample dim
        return randn(*shape[:-1], 1).expand(shape)
    if layout == "transposed":
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "reversed_dims":
        return randn(*reversed(shape)).permute(*reversed(range(len(shape))))
    if layout == "channels_last":
        return randn(*shape).contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def build_table(n, dtype, layout, gen, device="cpu"):
    """A 1-D per-t table with distinct values (so a wrong index shows), in some layout."""
    vals = (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2).to(device, dtype)
    if layout == "stepped":
        big = torch.full((2 * n,), float("nan"), dtype=dtype, device=device)
        big[::2] = vals
        return big[::2]
    if layout == "offset":
        big = torch.full((n + 1,), float("nan"), dtype=dtype, device=device)
        big[1:] = vals
        return big[1:]
    return vals


# ---- specs ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    layout: str


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One drawn input of an elementwise op (q_sample, p_sample_step, mse_per_sample)."""
    shape: tuple
    data: TensorSpec  # x0 / x_t / pred
    other: Optional[TensorSpec]  # eps_theta (p_sample_step); None otherwise
    noise: Optional[TensorSpec]  # noise / target; None: drawn in-kernel from the seed
    n_steps: int
    table_dtype: torch.dtype
    table_layout: str
    t: object  # int, or ("tensor", dtype, layout, values)
    seed: object  # int, or ("tensor", value, shape)
    sample_offset: int
    values_seed: int
    scale: object  # a float, or "specials"
    grad: bool
    grad_layout: str


seeds = st.one_of(st.sampled_from(SEED_EDGES), st.integers(0, 2**64 - 1))
offsets = st.one_of(st.sampled_from(OFFSET_EDGES), st.integers(0, 1000), st.integers(2**62 - 10**6, 2**62 - 1))


@st.composite
def seed_args(draw):
    """A seed as ops take it: an int in [0, 2**64) or a 1-element int64 tensor."""
    value = draw(seeds)
    if draw(st.booleans()):
        return value
    return ("tensor", value - 2**64 if value >= 2**63 else value, draw(st.sampled_from([(1,), (), (1, 1)])))


def make_seed(seed):
    if isinstance(seed, tuple):
        _, value, shape = seed
        return torch.tensor(value, dtype=torch.int64).reshape(shape)
    return seed


@st.composite
def shapes(draw, big=False, max_numel=240):
    """Small shapes of rank 1-4; with ``big`` sometimes samples of several kernel blocks (the
    cpu kernels cut a sample into blocks of 2048 elements, and a batch into parallel tasks of
    about 32768 elements)."""
    if big and draw(st.integers(0, 5)) == 0:
        d = draw(st.one_of(st.sampled_from([2047, 2048, 2049, 4097]), st.integers(1000, 4300)))
        batch = draw(st.integers(1, 12))
        return (batch, d) if draw(st.booleans()) else (batch, 1, d // 7 + 1, 7)
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 5))] + [draw(st.integers(1, 7)) for _ in range(rank - 1)]
    while math.prod(shape) > max_numel:
        shape[shape.index(max(shape))] //= 2
    return tuple(shape)


@st.composite
def op_specs(draw, op, big=False):
    shape = draw(shapes(big))
    rank = len(shape)
    lay = st.sampled_from(layouts_for(rank))
    dt = st.sampled_from(DTYPES)
    data = TensorSpec(draw(dt), draw(lay))
    other = TensorSpec(draw(dt), draw(lay)) if op == "p_sample_step" else None
    noise = TensorSpec(draw(dt), draw(lay)) if draw(st.booleans()) else None
    n_steps = draw(st.integers(1, 50))
    if draw(st.booleans()):
        t = draw(st.integers(0, n_steps - 1))
    else:
        t_shape = draw(st.sampled_from(["1d", "0d"]))
        count = shape[0] if t_shape == "1d" else 1
        values = tuple(draw(st.lists(st.integers(0, n_steps - 1), min_size=count, max_size=count)))
        t = ("tensor", draw(st.sampled_from([torch.int32, torch.int64])),
             draw(st.sampled_from(["contiguous", "stepped", "expanded"])) if t_shape == "1d" else "0d", values)
    return OpSpec(
        shape=shape, data=data, other=other, noise=noise, n_steps=n_steps,
        table_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        table_layout=draw(st.sampled_from(TABLE_LAYOUTS)),
        t=t, seed=draw(seed_args()), sample_offset=draw(offsets),
        values_seed=draw(st.integers(0, 2**31 - 1)), scale=draw(st.sampled_from([1.0, 1e-3, 100.0, "specials"])),
        grad=draw(st.booleans()), grad_layout=draw(st.sampled_from(["contiguous", "expanded", "stepped"])))


def make_t(spec, batch):
    if isinstance(spec.t, int):
        return spec.t
    _, dtype, layout, values = spec.t
    if layout == "0d":
        return torch.tensor(values[0], dtype=dtype)
    if layout == "expanded":
        return torch.tensor(values[:1], dtype=dtype).expand(batch)
    if layout == "stepped":
        return torch.tensor(values, dtype=dtype).repeat_interleave(2)[::2]
    return torch.tensor(values, dtype=dtype)


def t_vector(t, batch):
    """t as the int64 [B] the coefficients are gathered with."""
    if isinstance(t, int):
        return torch.full((batch,), t, dtype=torch.int64)
    return t.long().expand(batch)


def make_grad(like, layout, gen):
    g = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    if layout == "expanded":  # as after .sum(): one value, stride 0
        return g.flatten()[0].to(like.dtype).expand(like.shape)
    if layout == "stepped":
        return torch.cat([g, g], dim=0).to(like.dtype)[::2]
    return g.to(like.dtype)


def leaf(x, grad):
    """x itself as a leaf of the graph (detach keeps its strides and storage offset)."""
    return x.detach().requires_grad_(True) if grad else x


def drawn_noise(seed, offset, shape):
    return philox.normal(seed_tensor(make_seed(seed), torch.device("cpu"), None), offset, shape).double()


def snapshot(tensors):
    return [x.detach().clone() for x in tensors]


def assert_unchanged(tensors, before):
    for x, b in zip(tensors, before):
        assert torch.equal(x.detach().isnan(), b.isnan()) and torch.equal(
            x.detach().nan_to_num(), b.nan_to_num()), "an op wrote into one of its inputs"


def run_both(backend, fn, inputs, grad_layout, gen_seed):
    """fn(backend) and fn("reference") -> (out, grads) each, same upstream gradient (grads
    None when ``grad_layout`` is falsy)."""
    results = []
    for be in (backend, "reference"):
        with poisoned_outputs():
            out = fn(be)
        grads = None
        if grad_layout:
            g = make_grad(out, grad_layout, torch.Generator().manual_seed(gen_seed))
            with poisoned_outputs():
                grads = torch.autograd.grad(out, inputs, g)
        results.append((out, grads))
    return results


# ---- q_sample and p_sample_step: sums of per-t coefficients times tensors ----------------------
# q_sample(x0, t, sqrt_ab, sqrt_1m_ab, noise) = sqrt_ab[t] x0 + sqrt_1m_ab[t] noise;
# p_sample_step(x_t, eps_theta, t, c1, c2, sigma, noise) = c1[t] x_t - c2[t] eps_theta + sigma[t] noise.
# Each term's gradient is its coefficient (up to sign) times the upstream gradient.
TERMS = {"q_sample": ("x0", "noise"), "p_sample_step": ("x_t", "eps_theta", "noise")}


def check_linear_op(op, backend, spec):
    gen = torch.Generator().manual_seed(spec.values_seed)
    data = [leaf(build(spec.shape, spec.data.dtype, spec.data.layout, gen, spec.scale), spec.grad)]
    if spec.other is not None:
        data.append(leaf(build(spec.shape, spec.other.dtype, spec.other.layout, gen), spec.grad))
    noise = None if spec.noise is None else leaf(build(spec.shape, spec.noise.dtype, spec.noise.layout, gen), spec.grad)
    tables = [build_table(spec.n_steps, spec.table_dtype, spec.table_layout, gen) for _ in TERMS[op]]
    t = make_t(spec, spec.shape[0])
    inputs = data + ([noise] if noise is not None else [])
    before = snapshot(inputs + tables)

    def fn(be):
        return getattr(ops, op)(*data, t, *tables, noise, seed=make_seed(spec.seed),
                                sample_offset=spec.sample_offset, backend=be)

    (got, got_g), (ref, ref_g) = run_both(backend, fn, inputs, spec.grad and spec.grad_layout, spec.values_seed)
    assert_unchanged(inputs + tables, before)
    dtype = data[0].dtype  # the op's dtype: the other tensors are cast to it
    tv = t_vector(t, spec.shape[0])
    view = (-1,) + (1,) * (len(spec.shape) - 1)
    coefs = [tab.double()[tv].view(view).abs() for tab in tables]
    terms = [x.detach().to(dtype).double() for x in data]
    terms.append(noise.detach().to(dtype).double() if noise is not None else
                 drawn_noise(spec.seed, spec.sample_offset, spec.shape))
    cdt = compute_dtype(dtype)
    scale = sum(c * x.abs() for c, x in zip(coefs, terms))
    assert_within(got, ref, _bound(got.double(), ref.double(), dtype, cdt, scale,
                                   coefs[-1] if noise is None else None), op)
    if spec.grad:
        g = make_grad(got, spec.grad_layout, torch.Generator().manual_seed(spec.values_seed)).double().abs()
        for name, gg, rg, coef in zip(TERMS[op], got_g, ref_g, coefs):
            b = _bound(gg.double(), rg.double(), narrowest(dtype, gg.dtype), cdt, coef * g)
            assert_within(gg, rg, b, f"d {op} / d {name}")


@pytest.mark.parametrize("op", list(TERMS))
@pytest.mark.parametrize("backend", FUZZED)
def test_linear_op(backend, op):
    _on_cpu(backend)

    @_settings(backend)
    @given(spec=op_specs(op, big=backend == "cpu"))
    def run(spec):
        check_linear_op(op, backend, spec)

    run()


# ---- mse_per_sample ---------------------------------------------------------------------------

def check_mse_per_sample(backend, spec):
    gen = torch.Generator().manual_seed(spec.values_seed)
    pred = leaf(build(spec.shape, spec.data.dtype, spec.data.layout, gen, spec.scale), spec.grad)
    target = None if spec.noise is None else leaf(build(spec.shape, spec.noise.dtype, spec.noise.layout, gen), spec.grad)
    inputs = [x for x in (pred, target) if x is not None]
    before = snapshot(inputs)

    def fn(be):
        return ops.mse_per_sample(pred, target, seed=make_seed(spec.seed), sample_offset=spec.sample_offset,
                                  backend=be)

    (got, got_g), (ref, ref_g) = run_both(backend, fn, inputs, spec.grad and spec.grad_layout, spec.values_seed)
    assert_unchanged(inputs, before)
    common = pred.dtype if target is None else torch.promote_types(pred.dtype, target.dtype)
    acc = compute_dtype(common)
    d = math.prod(spec.shape[1:])
    p64 = pred.detach().to(common).double()
    tgt = target.detach().to(common).double() if target is not None else drawn_noise(
        spec.seed, spec.sample_offset, spec.shape)
    diff = (p64 - tgt).abs().reshape(spec.shape[0], -1)
    # Both sides sum D non-negative terms in blocks (torch's cascade sum, the kernels' lanes and
    # blocks), whose rounding error grows like log2(D) (measured: at most 4 roundings for D up
    # to 49157), plus the square and the division; a drawn target moves each diff by up to
    # NOISE_ATOL.
    bound = (2 * math.ceil(math.log2(d + 1)) + 8) * unit_roundoff(acc) * ref.double()
    if target is None:
        bound = bound + 2 * NOISE_ATOL * diff.mean(1) + NOISE_ATOL**2
    assert_within(got, ref, bound, "mse_per_sample")
    if spec.grad:
        g = make_grad(got, spec.grad_layout, torch.Generator().manual_seed(spec.values_seed)).double().abs()
        g = g.view((-1,) + (1,) * (len(spec.shape) - 1))
        for name, gg, rg in zip(("pred", "target"), got_g, ref_g):
            scale = 2 / d * diff.view(spec.shape) * g
            b = _bound(gg.double(), rg.double(), narrowest(common, gg.dtype), acc, scale,
                       2 / d * g.expand(spec.shape) if target is None else None)
            assert_within(gg, rg, b, f"d mse_per_sample / d {name}")


@pytest.mark.parametrize("backend", FUZZED)
def test_mse_per_sample(backend):
    _on_cpu(backend)

    @_settings(backend)
    @given(spec=op_specs("mse_per_sample", big=backend == "cpu"))
    def run(spec):
        check_mse_per_sample(backend, spec)

    run()


# ---- sample_t ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUZZED)
def test_sample_t(backend):
    _on_cpu(backend)

    @_settings(backend)
    @given(seed=seed_args(), batch=st.integers(0, 40),
           n_steps=st.one_of(st.sampled_from([1, 2, 3, 1000, 2**31 - 1]), st.integers(1, 2**31 - 1)),
           offset=offsets)
    def run(seed, batch, n_steps, offset):
        s = make_seed(seed)
        with poisoned_outputs():
            got = ops.sample_t(s, batch, n_steps, sample_offset=offset, backend=backend)
        ref = ops.sample_t(s, batch, n_steps, sample_offset=offset, backend="reference")
        assert got.dtype == torch.int64 and got.shape == (batch,)
        assert torch.equal(got, ref), f"sample_t: {got.tolist()} != reference {ref.tolist()}"
        assert bool(((ref >= 0) & (ref < n_steps)).all())

    run()


# ---- regressions the fuzzer found ------------------------------------------------------------

@pytest.mark.parametrize("backend", FUZZED)
def test_strided_tables_give_the_reference_result(backend):
    """A 1-D table that is a strided view (``tab[::2]``) is valid input to the public ops (the
    reference and triton backends take it); the cpu backend refused it in C++ ("c1 must be
    contiguous"). Found by test_p_sample_step: shape (1,), float16, c1/c2/sigma stepped."""
    _on_cpu(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen)
    eps = torch.randn(3, 5, generator=gen)
    t = torch.tensor([0, 2, 3])
    tabs = [torch.rand(8, generator=gen)[::2] for _ in range(3)]  # 4 steps, stride 2
    for noise in (None, torch.randn(3, 5, generator=gen)):
        got = ops.q_sample(x, t, tabs[0], tabs[1], noise, seed=7, backend=backend)
        ref = ops.q_sample(x, t, tabs[0], tabs[1], noise, seed=7, backend="reference")
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=NOISE_ATOL)
        got = ops.p_sample_step(x, eps, t, *tabs, noise, seed=7, backend=backend)
        ref = ops.p_sample_step(x, eps, t, *tabs, noise, seed=7, backend="reference")
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=NOISE_ATOL)
