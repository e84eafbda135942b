"""The normal op (fastddpm.ops.normal, torch.ops.fastddpm.normal and fastddpm_triton::normal):
the contract's noise materialised, on every backend that takes CPU tensors (cpu, triton in the
interpreter, reference).

It is checked against the contract's oracle (fastddpm.philox.normal), against the noise the
other ops draw in-kernel for the same (seed, sample_offset) (q_sample with sqrt_ab = 0 and
sqrt_1m_ab = 1 gives x_t = eps exactly), for every dtype (the float32 normals rounded to it),
odd shapes, outputs poisoned with NaN before the kernels run, batch splits, and opcheck.
"""
import pytest
import torch

from backends_under_test import device_for, kernel_backends
from fastddpm import _checks, _extension, ops, philox

BACKENDS = kernel_backends() + ["reference"]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The contract: a backend's normals lie within 1e-5 of the reference's (libm/Sleef/Triton/the
# CPU kernels' polynomials against PyTorch's log/sin/cos).
NORMAL_TOL = dict(rtol=0, atol=1e-5)
# Rounded to a dtype, two normals that close may land one step of the dtype apart.
ROUNDING = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# Samples of 1, 7, 105 and 4255 elements (4255: three blocks of the CPU kernels and five of the
# Triton ones, the last partial), a 1-D batch and an empty one.
SHAPES = ((5,), (3, 7), (2, 3, 5, 7), (3, 5, 23, 37), (0, 3), (2, 0, 4))
SEED = 0x1234_5678_9ABC_DEF0


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# `poisoned` is the shared fixture (tests/conftest.py, helpers.poisoned_outputs).


def _seed(value=SEED):
    return _checks.seed_tensor(value, torch.device("cpu"), None)


def _normal(backend, shape, dtype=torch.float32, offset=0, seed=SEED):
    return ops.normal(shape, seed=seed, sample_offset=offset, dtype=dtype, device=device_for(backend),
                      backend=backend)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_contract(backend, poisoned, shape, dtype):
    offset = 2**33 + 5
    got = _normal(backend, shape, dtype, offset)
    assert got.shape == shape and got.dtype == dtype and got.is_contiguous()
    want = philox.normal(_seed(), offset, shape)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().to(torch.float64), want.to(dtype).to(torch.float64),
                               atol=NORMAL_TOL["atol"], rtol=ROUNDING[dtype])


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_other_dtypes_are_the_float32_normals_rounded(backend, poisoned, dtype):
    shape = (3, 5, 23, 37)
    f32 = _normal(backend, shape, torch.float32, 7)
    assert torch.equal(_normal(backend, shape, dtype, 7), f32.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_is_the_noise_the_other_ops_draw(backend, poisoned, dtype):
    """q_sample with sqrt_ab = 0 and sqrt_1m_ab = 1 returns its in-kernel noise itself, and the
    MSE of that noise against its own in-kernel target is 0: the same normals, bit for bit."""
    shape, offset = (3, 5, 23, 37), 11
    device = device_for(backend)
    noise = _normal(backend, shape, dtype, offset)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    zero = torch.zeros(10, device=device)
    t = torch.arange(3, device=device)
    x_t = ops.q_sample(x0, t, zero, zero + 1, seed=_seed().to(device), sample_offset=offset, backend=backend)
    assert torch.equal(x_t, noise)
    if dtype == torch.float32:
        mse = ops.mse_per_sample(noise, seed=_seed().to(device), sample_offset=offset, backend=backend)
        assert torch.equal(mse, torch.zeros(3, device=device))


def test_batch_split(backend):
    """Samples offset .. offset + B - 1 drawn in two calls equal one call (as data-parallel ranks
    drawing their shares of a global batch)."""
    shape, offset = (7, 3, 11), 40
    whole = _normal(backend, shape, offset=offset)
    first = _normal(backend, (3,) + shape[1:], offset=offset)
    rest = _normal(backend, (4,) + shape[1:], offset=offset + 3)
    assert torch.equal(torch.cat([first, rest]), whole)


def test_seed_none_draws_from_the_generator(backend):
    device = device_for(backend)

    def draw():
        gen = torch.Generator(device).manual_seed(3)
        return ops.normal((4, 6), generator=gen, device=device, backend=backend)

    a, b = draw(), draw()
    assert torch.equal(a, b)
    seed = ops.draw_seed(device, torch.Generator(device).manual_seed(3))
    assert torch.equal(a, _normal(backend, (4, 6), seed=seed))
    assert not torch.equal(a, _normal(backend, (4, 6), seed=int(seed) + 1))


def test_device_follows_the_seed_tensor(backend):
    seed = _seed().to(device_for(backend))
    assert ops.normal((2, 3), seed=seed, backend=backend).device == seed.device


def test_the_backends_agree():
    shape = (3, 5, 23, 37)
    want = philox.normal(_seed(), 9, shape)
    for backend in BACKENDS:
        torch.testing.assert_close(_normal(backend, shape, offset=9).cpu(), want, **NORMAL_TOL)


# ---- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shape=()), ValueError, r"shape must have a batch dimension"),
    (dict(shape=5), TypeError, r"shape must be a tuple or list of ints, got int"),
    (dict(shape=torch.zeros(2)), TypeError, r"shape must be a tuple or list of ints, got Tensor"),
    (dict(shape=(2, 3.0)), TypeError, r"shape must hold ints, got float"),
    (dict(shape=(2, True)), TypeError, r"shape must hold ints, got bool"),
    (dict(shape=(2, -1)), ValueError, r"shape must not be negative"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be float16, bfloat16, float32 or float64"),
    (dict(dtype="float32"), TypeError, r"dtype must be float16, bfloat16, float32 or float64"),
    (dict(sample_offset=-1), ValueError, r"sample_offset must lie in \[0, 2\*\*62\)"),
    (dict(sample_offset=1.0), TypeError, r"sample_offset must be an int"),
    (dict(seed=-1), ValueError, r"seed must lie in \[0, 2\*\*64\)"),
    (dict(seed=1.5), TypeError, r"seed must be an int, a 1-element int64 tensor or None"),
    (dict(seed=torch.zeros(2, dtype=torch.int64)), ValueError, r"seed tensor must hold one int64"),
    (dict(generator=3), TypeError, r"generator must be a torch.Generator or None"),
    (dict(device="cuda:0", generator=torch.Generator()), RuntimeError, r"generator is on cpu but device is cuda"),
    (dict(backend="nonesuch"), ValueError, r"unknown backend 'nonesuch'"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(shape=(2, 3))
    args.update(kwargs)
    shape = args.pop("shape")
    with pytest.raises(error, match=match):
        ops.normal(shape, **args)


def _compiled_op():
    assert _extension.load() is not None, f"fastddpm._C is not built or failed to load: {_extension.error()}"
    return torch.ops.fastddpm.normal.default


@pytest.mark.parametrize("args, match", [
    ((_seed(), [], 0, torch.float32), r"fastddpm \(cpu\): size must have a batch dimension"),
    ((_seed(), [2, -3], 0, torch.float32), r"fastddpm \(cpu\): size must not be negative"),
    ((_seed(), [2, 3], 0, torch.int64), r"fastddpm \(cpu\): dtype must be float16, bfloat16, float32 or float64"),
    ((_seed(), [2, 3], -1, torch.float32), r"fastddpm \(cpu\): sample_offset must be >= 0"),
    ((torch.zeros(2, dtype=torch.int64), [2, 3], 0, torch.float32), r"fastddpm \(cpu\): seed must be a 1-element int64"),
    ((torch.zeros(1, dtype=torch.int32), [2, 3], 0, torch.float32), r"fastddpm \(cpu\): seed must be a 1-element int64"),
])
def test_compiled_op_checks_its_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        _compiled_op()(*args)


def test_opcheck():
    """The C++ op (the Triton op's fake-tensor half fails under the interpreter: tests/test_triton.py
    checks it with the interpreter off, and benchmarks/gpu_report.py runs opcheck on a GPU)."""
    samples = [(_seed(), [3, 4, 5], 2, dtype) for dtype in DTYPES] + [(_seed(8), [0, 3], 0, torch.float32)]
    for args in samples:
        torch.library.opcheck(_compiled_op(), args)


def test_torch_compile_fullgraph_matches_eager():
    seed = _seed(9)

    def draw(seed):
        return ops.normal((4, 3, 5), seed=seed, sample_offset=2, backend="cpu") * 2

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(seed), draw(seed))


# ---- benchmarks/noise_strategy.py compares like with like -------------------------------------

def test_noise_strategies_give_the_same_gradient():
    """Regenerating the noise in each kernel and drawing it once with the normal op give the
    same gradient, bit for bit (float32): the benchmark times two ways of one step."""
    from benchmarks import noise_strategy
    from fastddpm.cli.bench import cases as B

    inp = B.Inputs((3, 5, 23, 37))
    fns = noise_strategy._step_fns(inp)
    grads = {}
    for name in ("regenerate", "materialise"):
        fns[name]()
        grads[name] = inp.model.w.grad.clone()
    assert torch.equal(grads["regenerate"], grads["materialise"])
    fns["eager"]()  # labml's step (its own noise): it runs and gives w a gradient
    assert torch.isfinite(inp.model.w.grad).all()
    threads = torch.get_num_threads()
    try:
        times = noise_strategy.measure("tiny", 1, 1)
    finally:
        torch.set_num_threads(threads)
    assert set(times) == set(noise_strategy.STRATEGIES) and all(m >= f > 0 for m, f in times.values())
