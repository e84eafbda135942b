"""Every GPU backend (triton; cuda when built) on the GPU, against the reference backend.

Skipped without CUDA. ``FASTDDPM_TEST_GPU_DEVICE=cpu`` runs the triton backend's tests on CPU
tensors in Triton's interpreter instead (a dry run of this file, small sizes; the CUDA-only
tests skip with their reason):

    pytest tests/test_gpu.py                                # a CUDA machine
    FASTDDPM_TEST_GPU_DEVICE=cpu pytest tests/test_gpu.py   # anywhere

A backend in ``FASTDDPM_EXPECT_BACKENDS`` (default "cpu,triton") that cannot run fails; any other
absent one (cuda without a CUDA build) skips. Outputs are NaN-poisoned (the ``poisoned``
fixture) in the comparisons. ``python -m benchmarks.gpu_report`` runs this file first.
"""
import math
import os

import pytest
import torch
from torch.testing import assert_close

import fastddpm
from fastddpm import objectives, ops, philox, schedule
from helpers import (DTYPES, HALF_DTYPES, NOISE_TOL, OFFSETS, SEEDS, TOL, assert_rounded_like, expected_backends,
                     expected_uniforms, mse_backward_args, mse_tol, op_args, output_and_grads, sample_inputs,
                     seed_tensor, table_dtype, tables, tol)

DEVICE = os.environ.get("FASTDDPM_TEST_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_CUDA = DEVICE is not None and torch.device(DEVICE).type == "cuda"
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA GPU (FASTDDPM_TEST_GPU_DEVICE=cpu: a dry run in Triton's interpreter)")


def cuda_only(why):
    return pytest.mark.skipif(not ON_CUDA, reason=f"CUDA only: {why}")


GPU_BACKENDS = ("triton", "cuda")
OP_NAMESPACE = {"triton": "fastddpm_triton", "cuda": "fastddpm"}
N_STEPS = 1000
ELEMENTWISE = ("q_sample", "p_sample_step")
# Odd on purpose: D = 105, 1311 (two blocks), 18483 (two MSE chunks), 1. Under the interpreter
# only the small ones: it runs each program in Python.
SHAPES = [(3, 5, 7, 3), (2, 3, 19, 23), (2, 3, 101, 61), (1, 1)] if ON_CUDA else [(3, 5, 7, 3), (1, 1)]
CIFAR = (128, 3, 32, 32)


def _require(name):
    """Skip (or, for an expected backend, fail) unless backend ``name`` runs on DEVICE tensors."""
    ok, reason = fastddpm.backends.status(name)
    if ok and not fastddpm.backends.takes(fastddpm.backends.get(name), torch.device(DEVICE)):
        ok, reason = False, f"it takes no {DEVICE} tensors"
    if ok and ON_CUDA and name == "triton" and fastddpm.backends.get(name).INTERPRET:
        pytest.fail("TRITON_INTERPRET=1 runs Triton in its interpreter: run with TRITON_INTERPRET=0 (the default "
                    "of tests/conftest.py on a CUDA machine) to test the compiled kernels")
    if not ok:
        message = f"backend {name!r} cannot run on {DEVICE}: {reason}"
        if name in expected_backends():
            pytest.fail(message)
        pytest.skip(message)
    return name


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    return _require(request.param)


def _gen():
    return torch.Generator(DEVICE).manual_seed(0)


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE, generator=gen).to(dtype)


def _call(op, sample, backend):
    return getattr(ops, op)(*sample.args, **sample.kwargs, backend=backend)


def _check(op, got, want, dtype, drawn, what):
    if op == "mse_per_sample":
        assert_close(got, want, **mse_tol(dtype, drawn), msg=lambda m: f"{what}: {m}")
    else:
        assert_close(got, want, **tol(dtype, drawn), msg=lambda m: f"{what}: {m}")
        assert_rounded_like(got, want, f"{what}: ")


# ---- every op and dtype against the reference on the same device ------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ELEMENTWISE + ("mse_per_sample",))
def test_op_matches_reference(poisoned, backend, op, dtype):
    for sample in sample_inputs(op, DEVICE, (dtype,), SHAPES, n_steps=N_STEPS):
        got, want = _call(op, sample, backend), _call(op, sample, "reference")
        assert got.dtype == want.dtype and got.shape == want.shape
        _check(op, got, want, dtype, sample.drawn, f"{tuple(sample.args[0].shape)} drawn={sample.drawn}")


def test_sample_t_equals_the_cpu_reference(poisoned, backend):
    for sample in sample_inputs("sample_t", DEVICE):
        seed, batch, n_steps = sample.args
        got = ops.sample_t(seed, batch, n_steps, sample_offset=sample.kwargs["sample_offset"], device=DEVICE,
                           backend=backend)
        expect = ops.sample_t(seed.cpu(), batch, n_steps, sample_offset=sample.kwargs["sample_offset"],
                              backend="reference")
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), expect), (batch, n_steps)


# ---- the noise contract -----------------------------------------------------------------------

def test_normals_within_the_contract_of_the_cpu_reference(poisoned, backend):
    # q_sample with sqrt_ab = 0 and sqrt_1m_ab = 1 returns its float32 noise.
    shape = (3, 2, 17, 31)  # D = 1054: two blocks, a ragged last quad
    gen = _gen()
    x0 = _randn(shape, gen)
    t = torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
    zeros, ones = torch.zeros(N_STEPS, device=DEVICE), torch.ones(N_STEPS, device=DEVICE)
    for seed, offset in zip(SEEDS, (0, 2**32 + 1, 7, 2**40)):
        got = ops.q_sample(x0, t, zeros, ones, seed=seed, sample_offset=offset, backend=backend)
        assert_close(got.cpu(), philox.normal(seed_tensor(seed), offset, shape), **NOISE_TOL)


def test_normal_op_is_the_in_kernel_noise(poisoned, backend):
    """ops.normal gives q_sample's in-kernel noise bit for bit; other dtypes round it."""
    shape = (3, 2, 17, 31)
    gen = _gen()
    t = torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
    zeros, ones = torch.zeros(N_STEPS, device=DEVICE), torch.ones(N_STEPS, device=DEVICE)
    for seed, offset in zip(SEEDS, (0, 2**32 + 1, 7, 2**40)):
        got = ops.normal(shape, seed=seed, sample_offset=offset, device=DEVICE, backend=backend)
        x_t = ops.q_sample(_randn(shape, gen), t, zeros, ones, seed=seed, sample_offset=offset, backend=backend)
        assert torch.equal(got, x_t), f"normal differs from q_sample's noise for seed {seed}"
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            rounded = ops.normal(shape, seed=seed, sample_offset=offset, dtype=dtype, device=DEVICE, backend=backend)
            assert torch.equal(rounded, got.to(dtype)), (seed, dtype)


def test_uniforms_bit_exact():
    from fastddpm.backends.triton import ops as triton_ops
    _require("triton")
    qs = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**40 + 9]),
                    torch.randint(0, 2**62, (1000,), generator=torch.Generator().manual_seed(1))])
    for seed, g in [(0, 0), (2**64 - 1, 2**32 + 5), (0x0123456789ABCDEF, 77)]:
        got = triton_ops.contract_uniforms(seed_tensor(seed, DEVICE), qs.to(DEVICE), g).cpu()
        assert torch.equal(got, expected_uniforms(seed, qs, g)), f"uniforms differ for seed {seed:#x}, g {g}"


# ---- gradients and the deterministic MSE -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients(poisoned, backend, dtype):
    for op in ELEMENTWISE + ("mse_per_sample",):
        for sample in sample_inputs(op, DEVICE, (dtype,), [(3, 2, 5, 7)], n_steps=N_STEPS):
            out, grads = output_and_grads(op, sample, backend)
            out_ref, grads_ref = output_and_grads(op, sample, "reference")
            _check(op, out, out_ref, dtype, sample.drawn, f"{op} drawn={sample.drawn}")
            for g, g_ref in zip(grads, grads_ref):
                assert g.dtype == dtype
                assert_close(g, g_ref, **tol(dtype, sample.drawn), msg=lambda m: f"{op} grad: {m}")


def test_mse_is_bitwise_deterministic(backend):
    pred = _randn((8, 3, 128, 129) if ON_CUDA else (1, 3, 101, 61), _gen())  # several MSE chunks a sample
    seed = ops.draw_seed(DEVICE, _gen())
    first = ops.mse_per_sample(pred, seed=seed, backend=backend)
    for _ in range(3):
        assert torch.equal(first, ops.mse_per_sample(pred, seed=seed, backend=backend))


# ---- layouts, the 16-byte path and poisoned outputs --------------------------------------------

# D a multiple of 8: every dtype's 16-byte path (smaller batches in the interpreter).
LAYOUT_SHAPES = [(4 if ON_CUDA else 2, 3, 16, 16), (3, 8), (2, 4, 6, 6)]


def _three_ops(dtype, x, y, t, seed):
    tabs = tables(N_STEPS, table_dtype(dtype), DEVICE)
    return {
        "q_sample": lambda b: ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed, sample_offset=5,
                                           backend=b),
        "p_sample_step": lambda b: ops.p_sample_step(x, y, t, tabs["c1"], tabs["c2"], tabs["sigma"], seed=seed,
                                                     sample_offset=5, backend=b),
        "mse_per_sample": lambda b: ops.mse_per_sample(x, seed=seed, sample_offset=5, backend=b),
        "mse given target": lambda b: ops.mse_per_sample(x, y, backend=b),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_16_byte_path_and_layouts(poisoned, backend, dtype):
    """D % 8 == 0 (the kernels' vector path), a strided slice, channels_last, an expanded int32 t."""
    gen = _gen()
    for shape in LAYOUT_SHAPES:
        x = _randn(shape, gen, dtype)
        views = [x, _randn((shape[0], 2) + shape[1:], gen, dtype)[:, 1]]  # contiguous; a strided slice
        if x.dim() == 4:
            views.append(x.to(memory_format=torch.channels_last))
        y = _randn(shape, gen, dtype)
        t = torch.tensor(737, dtype=torch.int32, device=DEVICE).expand(shape[0])  # stride 0, int32
        seed = ops.draw_seed(DEVICE, gen)
        for v in views:
            for name, call in _three_ops(dtype, v, y, t, seed).items():
                op = "mse_per_sample" if name.startswith("mse") else name
                _check(op, call(backend), call("reference"), dtype, name != "mse given target",
                       f"{name} {shape} strides {v.stride()}")


def test_outputs_fully_written(poisoned, backend):
    shape = (5, 3, 13, 7)  # odd D: the scalar path and ragged chunks
    gen = _gen()
    x, y = _randn(shape, gen), _randn(shape, gen)
    t = torch.randint(0, N_STEPS, (shape[0],), device=DEVICE, generator=gen)
    for name, call in _three_ops(torch.float32, x, y, t, ops.draw_seed(DEVICE, gen)).items():
        got = call(backend)
        assert not got.isnan().any(), f"{name}: unwritten (NaN) elements"
        _check("mse_per_sample" if name.startswith("mse") else name, got, call("reference"), torch.float32,
               name != "mse given target", name)


# ---- the samplers' step (solver_step; clipped_step is its one-row case) and the training target --

# The GPU backends (all of them have the solver_step and target_mse kernels).
NEW_OP_BACKENDS = ("cuda", "triton")
NEW_OP_SHAPES = SHAPES + [(4, 3, 16, 16)]  # and D % 8 == 0: every dtype's 16-byte path


@pytest.fixture(params=NEW_OP_BACKENDS)
def new_op_backend(request):
    return _require(request.param)


def _random_tables(names, dtype, gen):
    """Per-t tables of uniform values in [-1, 1] in the table dtype of ``dtype``; the last one
    (the noise's coefficient) is 0 at every third step, where no noise is drawn."""
    tabs = {k: (torch.rand(N_STEPS, device=DEVICE, generator=gen, dtype=torch.float64) * 2 - 1).to(table_dtype(dtype))
            for k in names}
    tabs[names[-1]][::3] = 0
    return tabs


def _steps(batch, gen, int32=False):
    """Random steps [batch]; the first two are 0 (noise coefficient 0) and 1 (not 0)."""
    t = torch.randint(0, N_STEPS, (batch,), device=DEVICE, generator=gen)
    t[:2] = torch.tensor([0, 1], device=DEVICE)[:batch]
    return t.int() if int32 else t


def _noise_kwargs(drawn, shape, dtype, gen, i):
    """The noise given, or drawn from one of SEEDS at one of OFFSETS."""
    if drawn:
        return dict(seed=seed_tensor(SEEDS[i % len(SEEDS)], DEVICE), sample_offset=OFFSETS[i % len(OFFSETS)])
    return dict(noise=_randn(shape, gen, dtype), sample_offset=OFFSETS[i % len(OFFSETS)])


# The clamp of clipped_step's x0: none, clip, or thresholding at a float32 / float64 bound.
LIMITS = ("none", "clip", "bound float32", "bound float64")


def _clipped_step_cases(shape, dtype, gen):
    """(kwargs of ops.clipped_step, drawn, description) for the noise given and drawn, with and
    without guidance (its weight 0 once: o = out), and each of LIMITS."""
    tabs = _random_tables("abpqrs", dtype, gen)
    i = 0
    for drawn in (False, True):
        for guidance in (None, 1.5, 0.0):
            for limit in LIMITS:
                kw = dict(x_t=_randn(shape, gen, dtype), out=_randn(shape, gen, dtype), t=_steps(shape[0], gen, drawn),
                          **tabs, **_noise_kwargs(drawn, shape, dtype, gen, i))
                if guidance is not None:
                    kw.update(out_cond=_randn(shape, gen, dtype), guidance=guidance)
                if limit == "clip":
                    kw["clip"] = 1.0
                elif limit != "none":
                    bound_dtype = torch.float32 if limit == "bound float32" else torch.float64
                    kw["bound"] = (torch.rand(shape[0], device=DEVICE, generator=gen) * 1.5 + 0.5).to(bound_dtype)
                i += 1
                yield kw, drawn, f"{shape} {dtype} drawn={drawn} guidance={guidance} {limit}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clipped_step_matches_reference(poisoned, new_op_backend, dtype):
    gen = _gen()
    for shape in NEW_OP_SHAPES:
        for kw, drawn, what in _clipped_step_cases(shape, dtype, gen):
            got = ops.clipped_step(**kw, backend=new_op_backend)
            want = ops.clipped_step(**kw, backend="reference")
            assert got.dtype == want.dtype == dtype and got.shape == want.shape, what
            _check("clipped_step", got, want, dtype, drawn, what)


def _solver_coef(outputs, n_history, dtype, gen, noise_free=False):
    """solver_step's tables [N_STEPS, outputs + 1, 8] in ``dtype``, uniform in [-1/2, 1/2] (a row
    of eight terms stays within the tolerances of a few): column 7 (the noise's) of every output
    row is 0 at every third step (at every step when ``noise_free``), where no noise is drawn; the
    columns of absent history entries hold NaN, which no backend may read."""
    coef = torch.rand((N_STEPS, outputs + 1, 8), device=DEVICE, generator=gen, dtype=torch.float64) - 0.5
    coef[:, 1:, 7][slice(None) if noise_free else slice(None, None, 3)] = 0
    coef[:, 1:, 3 + n_history:7] = float("nan")
    return coef.to(dtype)


# (R, history entries): every pair on a GPU; in the interpreter a few covering each R and count.
SOLVER_SIZES = [(r, h) for r in range(1, 5) for h in range(5)]
if not ON_CUDA:
    SOLVER_SIZES = SOLVER_SIZES[::3]


def _solver_step_cases(shape, dtype, gen):
    """(kwargs of ops.solver_step, drawn, description): the noise given and drawn, for each of
    SOLVER_SIZES, cycling through guidance (none, 1.5, 0), LIMITS and float32 / float64 tables,
    plus a step that draws no noise at all (column 7 zero everywhere)."""
    i = 0
    for drawn in (False, True):
        for outputs, n_history, noise_free in [(r, h, False) for r, h in SOLVER_SIZES] + [(2, 1, True)]:
            guidance, limit = (None, 1.5, 0.0)[i % 3], LIMITS[i % len(LIMITS)]
            coef_dtype = torch.float64 if i % 2 else torch.float32
            kw = dict(x=_randn(shape, gen, dtype), out=_randn(shape, gen, dtype), t=_steps(shape[0], gen, drawn),
                      coef=_solver_coef(outputs, n_history, coef_dtype, gen, noise_free),
                      history=tuple(_randn(shape, gen, dtype) for _ in range(n_history)),
                      **_noise_kwargs(drawn, shape, dtype, gen, i))
            if guidance is not None:
                kw.update(out_cond=_randn(shape, gen, dtype), guidance=guidance)
            if limit == "clip":
                kw["clip"] = 1.0
            elif limit != "none":
                bound_dtype = torch.float32 if limit == "bound float32" else torch.float64
                kw["bound"] = (torch.rand(shape[0], device=DEVICE, generator=gen) * 1.5 + 0.5).to(bound_dtype)
            i += 1
            yield kw, drawn, (f"{shape} {dtype} drawn={drawn} R={outputs} history={n_history} guidance={guidance} "
                              f"{limit} {coef_dtype} tables{' noise-free' if noise_free else ''}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_solver_step_matches_reference(poisoned, new_op_backend, dtype):
    """Every output row (all written: poisoned), R = 1..4 and 0..4 history operands, the noise
    given and drawn (not drawn for the samples whose column-7 entries are all 0), guidance, clip
    and bound."""
    gen = _gen()
    for shape in NEW_OP_SHAPES:
        for kw, drawn, what in _solver_step_cases(shape, dtype, gen):
            got = ops.solver_step(**kw, backend=new_op_backend)
            want = ops.solver_step(**kw, backend="reference")
            assert got.dtype == want.dtype == dtype and got.shape == want.shape, what
            assert got.shape == (kw["coef"].shape[1] - 1,) + shape and got.is_contiguous(), what
            _check("solver_step", got, want, dtype, drawn, what)


def _target_cases(shape, dtype, gen):
    """(pred, x0, t, cx0, ceps, noise kwargs, drawn, description) for random tables (ceps 0 at
    every third step) and x0 prediction's (ceps 0 everywhere: no noise drawn at all), the noise
    given and drawn."""
    x0_tables = dict(cx0=torch.ones(N_STEPS, device=DEVICE, dtype=table_dtype(dtype)),
                     ceps=torch.zeros(N_STEPS, device=DEVICE, dtype=table_dtype(dtype)))
    i = 0
    for name, tabs in (("random", _random_tables(("cx0", "ceps"), dtype, gen)), ("x0", x0_tables)):
        for drawn in (False, True):
            yield (_randn(shape, gen, dtype), _randn(shape, gen, dtype), _steps(shape[0], gen, drawn), tabs["cx0"],
                   tabs["ceps"], _noise_kwargs(drawn, shape, dtype, gen, i), drawn,
                   f"{shape} {dtype} {name} tables drawn={drawn}")
            i += 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_target_mse_matches_reference(poisoned, new_op_backend, dtype):
    gen = _gen()
    for shape in NEW_OP_SHAPES:
        for pred, x0, t, cx0, ceps, kw, drawn, what in _target_cases(shape, dtype, gen):
            got = ops.target_mse(pred, x0, t, cx0, ceps, **kw, backend=new_op_backend)
            want = ops.target_mse(pred, x0, t, cx0, ceps, **kw, backend="reference")
            assert got.dtype == want.dtype == table_dtype(dtype) and got.shape == (shape[0],), what
            assert_close(got, want, **mse_tol(dtype, drawn), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_target_mse_backward_matches_reference_autograd(poisoned, new_op_backend, dtype):
    """The backward op against autograd through the reference, with a per-sample incoming
    gradient and an expanded (stride-0) one, each scaled so that 2 grad / D < 1: the drawn
    noise enters with a coefficient of at most 1, as tol(drawn=True) assumes."""
    backward = getattr(torch.ops, OP_NAMESPACE[new_op_backend]).target_mse_backward
    gen = _gen()
    for shape in NEW_OP_SHAPES:
        d = math.prod(shape[1:])
        for k, (pred, x0, t, cx0, ceps, kw, drawn, what) in enumerate(_target_cases(shape, dtype, gen)):
            if k % 2:
                grad = (torch.rand(shape[0], device=DEVICE, generator=gen, dtype=table_dtype(dtype)) + 0.5) * (d / 3)
            else:
                grad = torch.tensor(0.25 * d, device=DEVICE, dtype=table_dtype(dtype)).expand(shape[0])
            got = backward(grad, pred, x0, t, cx0, ceps, kw.get("noise"), kw.get("seed"), kw["sample_offset"])
            leaf = pred.detach().clone().requires_grad_(True)
            (ops.target_mse(leaf, x0, t, cx0, ceps, **kw, backend="reference") * grad).sum().backward()
            assert got.dtype == dtype and got.shape == pred.shape, what
            assert_close(got, leaf.grad, **tol(dtype, drawn), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_new_ops_layouts(poisoned, new_op_backend, dtype):
    """A strided slice and channels_last data (and history), an expanded int32 t, on the 16-byte
    path's D."""
    gen = _gen()
    shape = (4 if ON_CUDA else 2, 3, 16, 16)
    step_tabs, target_tabs = _random_tables("abpqrs", dtype, gen), _random_tables(("cx0", "ceps"), dtype, gen)
    x, y = _randn(shape, gen, dtype), _randn(shape, gen, dtype)
    t = torch.tensor(4, dtype=torch.int32, device=DEVICE).expand(shape[0])  # stride 0; s[4], coef[4, :, 7] != 0
    seed = ops.draw_seed(DEVICE, gen)
    coef = _solver_coef(3, 2, table_dtype(dtype), gen)
    for v in (_randn((shape[0], 2) + shape[1:], gen, dtype)[:, 1], x.to(memory_format=torch.channels_last)):
        calls = {
            "clipped_step": lambda b: ops.clipped_step(v, y, t, **step_tabs, out_cond=x, guidance=2.0, clip=1.0,
                                                       seed=seed, sample_offset=5, backend=b),
            "solver_step": lambda b: ops.solver_step(v, y, t, coef, (x, v), out_cond=v, guidance=2.0, clip=1.0,
                                                     seed=seed, sample_offset=5, backend=b),
            "target_mse": lambda b: ops.target_mse(v, y, t, **target_tabs, seed=seed, sample_offset=5, backend=b),
        }
        for name, call in calls.items():
            got, want = call(new_op_backend), call("reference")
            what = f"{name} strides {v.stride()}"
            if name == "target_mse":
                assert_close(got, want, **mse_tol(dtype, drawn=True), msg=lambda m: f"{what}: {m}")
            else:
                _check(name, got, want, dtype, True, what)


def test_target_mse_is_bitwise_deterministic(new_op_backend):
    gen = _gen()
    shape = (8, 3, 128, 129) if ON_CUDA else (1, 3, 101, 61)  # several MSE chunks a sample
    pred, x0 = _randn(shape, gen), _randn(shape, gen)
    t, tabs = _steps(shape[0], gen), _random_tables(("cx0", "ceps"), torch.float32, gen)
    seed = ops.draw_seed(DEVICE, gen)
    first = ops.target_mse(pred, x0, t, **tabs, seed=seed, backend=new_op_backend)
    for _ in range(3):
        assert torch.equal(first, ops.target_mse(pred, x0, t, **tabs, seed=seed, backend=new_op_backend))


# ---- the variational bound (vlb_loss) and solver_step's learned variance -----------------------

# x0 [B, C, ...]: C = 1..4, odd spatial sizes and a rank-2 x0; on a GPU also a sample of several
# MSE parts (D = 12322: the scratch and second pass) and D % 8 == 0 (every dtype's 16-byte path).
VLB_SHAPES = ([(5, 1, 7, 3), (4, 3, 19, 23), (3, 2, 101, 61), (6, 4, 16, 16), (3, 3)] if ON_CUDA
              else [(5, 1, 7, 3), (3, 2, 5), (3, 3)])
# (drawn, detach_mean): every pair on a GPU; in the interpreter each value once.
VLB_NOISE_DETACH = ([(drawn, detach) for drawn in (False, True) for detach in (True, False)] if ON_CUDA
                    else [(False, True), (True, False)])


def _vlb_tables(dtype):
    """The linear schedule's vlb tables [N_STEPS, 9] (schedule.VLB_COLUMNS) in the table dtype of ``dtype``."""
    tabs = schedule.vlb_tables(schedule.linear(N_STEPS))
    return torch.stack([tabs[k] for k in schedule.VLB_COLUMNS], dim=1).to(DEVICE, table_dtype(dtype)).contiguous()


def _vlb_inputs(shape, mean_type, variance_type, dtype, gen, noise_kwargs):
    """(x0, out, t): x0 on the 256 bins of [-1, 1] with each sample's first two elements at the
    edges -1 and 1 (the decoder's open bins); the model output's mean channels near their target
    (eps + N(0, 0.3^2): the noise of ``noise_kwargs``, given or the stream's; x0 + N(0, 0.003^2)),
    so that the decoder's bin probabilities stay well inside float32 (a mean many bin widths
    away floors them at 1e-12 in float32 but not in float64); the variance channels uniform in
    [-1, 1] (learned_range) or log variances in [-8, -2] (learned); t with samples 0 and 2 at
    t == 0 (the decoder's term) among t > 0."""
    x0 = torch.randint(0, 256, shape, device=DEVICE, generator=gen).double() / 127.5 - 1
    x0.view(shape[0], -1)[:, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=DEVICE)
    x0 = x0.to(dtype).double()
    noise = torch.randn(shape, device=DEVICE, generator=gen, dtype=torch.float64)
    if mean_type == "eps":
        eps = noise_kwargs.get("noise")
        if eps is None:
            eps = ops.normal(shape, seed=noise_kwargs["seed"], sample_offset=noise_kwargs["sample_offset"],
                             device=DEVICE, backend="reference")
        mean = eps.double() + 0.3 * noise
    else:
        mean = x0 + 0.003 * noise
    out = mean
    if variance_type != "fixed":
        v = torch.rand(shape, device=DEVICE, generator=gen, dtype=torch.float64) * 2 - 1
        out = torch.cat([mean, v if variance_type == "learned_range" else v * 3 - 5], dim=1)
    t = torch.randint(1, N_STEPS, (shape[0],), device=DEVICE, generator=gen)
    t[0::2][:2] = 0
    return x0.to(dtype), out.to(dtype), t


def _vlb_tol(dtype, drawn, what="vb"):
    """assert_close kwargs of vlb_loss's columns (what: "mse", "vb") or gradients ("grad", with
    atol relative to the largest gradient, passed on by the caller). float32 math (all but
    float64) loses more than the MSE's few ulp in the vb term: exp and log of log variances near
    -10, the decoder's CDF difference; the drawn noise differs from the reference's by up to
    DRAWN_ATOL per element."""
    if what == "mse":
        return mse_tol(dtype, drawn)
    f64 = dtype == torch.float64
    if what == "vb":
        out = dict(rtol=1e-10, atol=1e-10) if f64 else dict(rtol=1e-4, atol=1e-5)
    else:
        out = dict(rtol=1e-9, atol=1e-10) if f64 else dict(rtol=1e-3, atol=1e-5)
        if dtype in HALF_DTYPES:  # gradients rounded to the half type
            out = dict(rtol=4 * TOL[dtype]["rtol"], atol=1e-3)
    if drawn:
        out = dict(rtol=max(out["rtol"], 1e-4), atol=max(out["atol"], 1e-5))
    return out


def _vlb_loss_and_grad(backend, x0, out, t, tabs, kw, mean_type, variance_type, detach_mean, weights):
    """ops.vlb_loss on ``backend`` and d/dout of (weights * loss).sum() (autograd)."""
    leaf = out.detach().clone().requires_grad_(True)
    loss = ops.vlb_loss(x0, leaf, t, tabs, **kw, mean_type=mean_type, variance_type=variance_type,
                        detach_mean=detach_mean, backend=backend)
    (grad,) = torch.autograd.grad((loss * weights).sum(), leaf)
    return loss.detach(), grad


def _assert_grad_close(got, want, dtype, drawn, what):
    kw = _vlb_tol(dtype, drawn, "grad")
    scale = float(want.abs().max()) if want.numel() else 1.0
    assert_close(got, want, rtol=kw["rtol"], atol=kw["atol"] * scale, msg=lambda m: f"{what} d/dout: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vlb_loss_matches_reference(poisoned, new_op_backend, dtype):
    """Forward values and d/dout of a per-sample weighted sum against autograd through the
    reference, every mean_type x variance_type, the noise given and drawn, detach_mean both ways."""
    gen = _gen()
    tabs = _vlb_tables(dtype)
    acc = table_dtype(dtype)
    i = 0
    for shape in VLB_SHAPES:
        for mean_type in objectives.MEAN_TYPES:
            for variance_type in objectives.VARIANCE_TYPES:
                for drawn, detach_mean in VLB_NOISE_DETACH:
                    kw = _noise_kwargs(drawn, shape, dtype, gen, i)
                    x0, out, t = _vlb_inputs(shape, mean_type, variance_type, dtype, gen, kw)
                    if drawn and i % 2:
                        t = t.int()
                    weights = torch.rand((shape[0], 2), device=DEVICE, generator=gen, dtype=acc) + 0.5
                    i += 1
                    what = f"{shape} {dtype} {mean_type}/{variance_type} drawn={drawn} detach_mean={detach_mean}"
                    args = (x0, out, t, tabs, kw, mean_type, variance_type, detach_mean, weights)
                    loss, grad = _vlb_loss_and_grad(new_op_backend, *args)
                    loss_ref, grad_ref = _vlb_loss_and_grad("reference", *args)
                    assert loss.dtype == acc and loss.shape == (shape[0], 2), what
                    assert grad.dtype == dtype and grad.shape == out.shape, what
                    assert_close(loss[:, 0], loss_ref[:, 0], **_vlb_tol(dtype, drawn, "mse"),
                                 msg=lambda m: f"{what} mse: {m}")
                    assert_close(loss[:, 1], loss_ref[:, 1], **_vlb_tol(dtype, drawn, "vb"),
                                 msg=lambda m: f"{what} vb: {m}")
                    _assert_grad_close(grad, grad_ref, dtype, drawn, what)


def test_vlb_loss_expanded_grad_and_layouts(poisoned, new_op_backend):
    """loss.mean().backward() (a stride-0 [B, 2] gradient) on a strided x0 and a channels_last
    out, against the reference."""
    gen = _gen()
    tabs = _vlb_tables(torch.float32)
    shape = (4 if ON_CUDA else 2, 3, 8, 8)
    for variance_type in objectives.VARIANCE_TYPES:
        seed = ops.draw_seed(DEVICE, gen)
        x0, out, t = _vlb_inputs(shape, "eps", variance_type, torch.float32, gen, dict(seed=seed, sample_offset=7))
        x0 = torch.stack([x0, x0], dim=1)[:, 1]  # a strided view
        out = out.to(memory_format=torch.channels_last)
        grads, losses = [], []
        for backend in (new_op_backend, "reference"):
            leaf = out.detach().clone().requires_grad_(True)
            loss = ops.vlb_loss(x0, leaf, t, tabs, seed=seed, sample_offset=7, variance_type=variance_type,
                                detach_mean=False, backend=backend)
            loss.mean().backward()
            losses.append(loss.detach())
            grads.append(leaf.grad)
        assert_close(losses[0], losses[1], **_vlb_tol(torch.float32, True), msg=lambda m: f"{variance_type}: {m}")
        _assert_grad_close(grads[0], grads[1], torch.float32, True, variance_type)


def test_vlb_loss_is_bitwise_deterministic(new_op_backend):
    gen = _gen()
    shape = (4, 3, 128, 129) if ON_CUDA else (1, 3, 101, 61)  # several MSE parts a sample
    tabs, seed = _vlb_tables(torch.float32), ops.draw_seed(DEVICE, gen)
    x0, out, t = _vlb_inputs(shape, "eps", "learned_range", torch.float32, gen, dict(seed=seed, sample_offset=3))
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    grad = torch.rand((shape[0], 2), device=DEVICE, generator=gen)
    args = (x0, out, t, tabs, None, seed, 3, 0, 1, False)
    first, first_grad = ns.vlb_loss(*args), ns.vlb_loss_backward(grad, *args)
    for _ in range(2):
        assert torch.equal(first, ns.vlb_loss(*args))
        assert torch.equal(first_grad, ns.vlb_loss_backward(grad, *args))


def test_vlb_loss_bad_arguments(new_op_backend):
    """The model output with C channels where 2C are needed (the message names the model output
    and the channel count), t out of range, a wrong table shape: from fastddpm.ops and from the
    backend's raw op."""
    gen = _gen()
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    tabs, seed = _vlb_tables(torch.float32), ops.draw_seed(DEVICE, gen)
    x0, out, t = _vlb_inputs((2, 3, 5, 5), "eps", "learned_range", torch.float32, gen,
                             dict(seed=seed, sample_offset=0))
    half = out[:, :3].contiguous()
    with pytest.raises(ValueError, match=r"model's output.*6 channels"):
        ops.vlb_loss(x0, half, t, tabs, seed=seed, backend=new_op_backend)
    with pytest.raises((ValueError, RuntimeError), match=r"model('s)? output.*6 channels"):
        ns.vlb_loss(x0, half, t, tabs, None, seed, 0, 0, 1, True)
    with pytest.raises((ValueError, RuntimeError), match=r"model('s)? output.*6 channels"):
        ns.vlb_loss_backward(torch.ones((2, 2), device=DEVICE), x0, half, t, tabs, None, seed, 0, 0, 1, True)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        ops.vlb_loss(x0, out, torch.tensor([0, N_STEPS], device=DEVICE), tabs, seed=seed, backend=new_op_backend)
    for bad in (tabs[:, :8], tabs[:, 0]):
        with pytest.raises(ValueError, match="tables must be"):
            ops.vlb_loss(x0, out, t, bad, seed=seed, backend=new_op_backend)
        with pytest.raises((ValueError, RuntimeError), match="tables must"):
            ns.vlb_loss(x0, out, t, bad, None, seed, 0, 0, 1, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_solver_step_with_var_matches_reference(poisoned, new_op_backend, dtype):
    """var (a learned variance's channels, uniform in [-1, 1]) scales z by exp(0.5 (f coef[k, 0,
    3] + (1 - f) coef[k, 0, 4])): every case of test_solver_step_matches_reference (in the
    interpreter every other one), the noise given and drawn, and the noise-free step."""
    gen = _gen()
    for shape in NEW_OP_SHAPES:
        for k, (kw, drawn, what) in enumerate(_solver_step_cases(shape, dtype, gen)):
            if not ON_CUDA and k % 2:
                continue
            kw["var"] = (torch.rand(shape, device=DEVICE, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
            got = ops.solver_step(**kw, backend=new_op_backend)
            want = ops.solver_step(**kw, backend="reference")
            assert got.dtype == want.dtype == dtype and got.shape == want.shape, what
            _check("solver_step", got, want, dtype, drawn, f"var {what}")


# ---- CUDA only -------------------------------------------------------------------------------

@cuda_only("2.4e9 elements, 4.8 GB a tensor")
def test_more_than_2_31_elements(backend):
    """The last sample (element offsets past 2**31) against the reference on that sample alone."""
    shape, dtype = (9, 2**28), torch.float16
    gen = _gen()
    x0 = torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen)
    t = torch.randint(0, N_STEPS, (shape[0],), device=DEVICE, generator=gen)
    tabs = tables(N_STEPS, torch.float32, DEVICE)
    seed = ops.draw_seed(DEVICE, gen)
    try:
        got = ops.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed, backend=backend)[-1:]
        expect = ops.q_sample(x0[-1:], t[-1:], tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed,
                              sample_offset=shape[0] - 1, backend="reference")
        assert_close(got, expect, **tol(dtype, drawn=True))
        del got, expect
        got = ops.mse_per_sample(x0, seed=seed, backend=backend)[-1:]
        expect = ops.mse_per_sample(x0[-1:], seed=seed, sample_offset=shape[0] - 1, backend="reference")
        assert_close(got, expect, rtol=1e-4, atol=0)  # a 2**28-term float32 sum in two orders
    finally:
        del x0
        torch.cuda.empty_cache()


@cuda_only("opcheck's fake-tensor and aot_dispatch tests cannot trace Triton's interpreter")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    ns = getattr(torch.ops, OP_NAMESPACE[backend])
    for name in ("q_sample", "p_sample_step", "mse_per_sample", "sample_t"):
        for sample in sample_inputs(name, DEVICE, (torch.float32,), [(3, 2, 5, 7)], n_steps=N_STEPS,
                                    requires_grad=requires_grad):
            torch.library.opcheck(getattr(ns, name).default, op_args(name, sample))
            if name == "mse_per_sample":
                torch.library.opcheck(ns.mse_per_sample_backward.default, mse_backward_args(sample))
    seed = ops.draw_seed(DEVICE)
    for size, dtype in (([3, 2, 5, 7], torch.float32), ([5, 3], torch.bfloat16)):
        torch.library.opcheck(ns.normal.default, (seed, size, 4, dtype))


def _new_op_args(shape, gen, drawn=True):
    """Positional arguments of solver_step (guided and thresholded with R = 2 and two history
    operands; "solver_step 4x4": clipped, R = 4 and four), target_mse and target_mse_backward on
    float32 data, the noise drawn or given. A key's first word names the op."""
    x, y, z = _randn(shape, gen), _randn(shape, gen), _randn(shape, gen)
    t, seed = _steps(shape[0], gen), ops.draw_seed(DEVICE, gen)
    noise, seed = (None, seed) if drawn else (_randn(shape, gen), None)
    history = [_randn(shape, gen) for _ in range(4)]
    coef2, coef4 = _solver_coef(2, 2, torch.float32, gen), _solver_coef(4, 4, torch.float64, gen)
    target = _random_tables(("cx0", "ceps"), torch.float32, gen)
    bound = torch.rand(shape[0], device=DEVICE, generator=gen) + 0.5
    grad = torch.rand(shape[0], device=DEVICE, generator=gen) + 0.5
    return {
        "solver_step": (x, y, z, history[:2], t, coef2, bound, float("inf"), 1.5, noise, seed, 3),
        "solver_step 4x4": (x, y, None, history, t, coef4, None, 1.0, 1.0, noise, seed, 3),
        "target_mse": (x, y, t, *target.values(), noise, seed, 3),
        "target_mse_backward": (grad, x, y, t, *target.values(), noise, seed, 3),
    }


@cuda_only("opcheck's fake-tensor and aot_dispatch tests cannot trace Triton's interpreter")
def test_opcheck_of_the_new_ops(new_op_backend):
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    for drawn in (False, True):
        for name, args in _new_op_args((3, 2, 5, 7), _gen(), drawn).items():
            torch.library.opcheck(getattr(ns, name.split()[0]).default, args)


@cuda_only("torch.compile cannot trace a triton_op under Triton's interpreter")
def test_compile_fullgraph_of_the_ops(backend):
    ns = getattr(torch.ops, OP_NAMESPACE[backend])
    tabs = tables(N_STEPS, torch.float32, DEVICE)

    def step(x0, t, seed, w):
        x_t = ns.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 0)
        pred = x_t * w
        loss = ns.mse_per_sample(pred, None, seed, 0).mean()
        prev = ns.p_sample_step(x_t, pred, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 0)
        return loss, prev, ns.sample_t(seed, x0.shape[0], N_STEPS, 0)

    gen = _gen()
    x0, t = _randn((4, 3, 9, 11), gen), torch.randint(0, N_STEPS, (4,), device=DEVICE, generator=gen)
    seed = ops.draw_seed(DEVICE, gen)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        w = torch.full((1,), 0.9, device=DEVICE, requires_grad=True)
        loss, prev, ts = fn(x0, t, seed, w)
        loss.backward()
        results.append((loss.detach(), prev, ts, w.grad))
    for got, expect in zip(results[1], results[0]):
        assert_close(got, expect, rtol=1e-6, atol=1e-6)


@cuda_only("torch.compile cannot trace a triton_op under Triton's interpreter")
def test_compile_fullgraph_of_fastddpm_ops(backend):
    tabs = tables(N_STEPS, torch.float32, DEVICE)

    def f(x0, t, seed):
        x_t = ops.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=seed, backend=backend)
        return ops.mse_per_sample(x_t, seed=seed, backend=backend)

    gen = _gen()
    x0, t = _randn((4, 3, 9, 11), gen), torch.randint(0, N_STEPS, (4,), device=DEVICE, generator=gen)
    seed = ops.draw_seed(DEVICE, gen)
    assert_close(torch.compile(f, fullgraph=True)(x0, t, seed), f(x0, t, seed), rtol=1e-6, atol=1e-6)


@cuda_only("torch.compile cannot trace a triton_op under Triton's interpreter")
def test_compile_fullgraph_of_solver_step(new_op_backend):
    """The raw op (a history list) and ops.solver_step chained under torch.compile(fullgraph=True),
    against eager: the same kernels on the same inputs."""
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    gen = _gen()
    shape = (4, 3, 9, 11)
    x, out, out_cond, h0, h1 = (_randn(shape, gen) for _ in range(5))
    t, seed = _steps(shape[0], gen), ops.draw_seed(DEVICE, gen)
    coef3, coef1 = _solver_coef(3, 2, torch.float32, gen), _solver_coef(1, 4, torch.float64, gen)
    bound = torch.rand(shape[0], device=DEVICE, generator=gen) + 0.5

    def f(x, out, out_cond, h0, h1, seed):
        y = ns.solver_step(x, out, out_cond, [h0, h1], t, coef3, None, 1.0, 1.5, None, seed, 3)
        prev = ops.solver_step(y[0] * 0.5, out, t, coef1, (h0, h1, y[1], y[2]), seed=seed, bound=bound,
                               backend=new_op_backend)
        return y, prev

    args = (x, out, out_cond, h0, h1, seed)
    for got, expect in zip(torch.compile(f, fullgraph=True)(*args), f(*args)):
        assert_close(got, expect, rtol=1e-6, atol=1e-6)


def _vlb_op_args(shape, gen, drawn=True, mean_type=0, variance_type=1, detach_mean=True):
    """Positional arguments of the raw vlb_loss and vlb_loss_backward (float32, x0 [B, C, ...],
    t with zeros among t > 0, the noise drawn or given; a random [B, 2] incoming gradient)."""
    seed = ops.draw_seed(DEVICE, gen)
    kw = dict(seed=seed, sample_offset=3) if drawn else dict(noise=_randn(shape, gen), sample_offset=3)
    x0, out, t = _vlb_inputs(shape, objectives.MEAN_TYPES[mean_type], objectives.VARIANCE_TYPES[variance_type],
                             torch.float32, gen, kw)
    args = (x0, out, t, _vlb_tables(torch.float32), kw.get("noise"), kw.get("seed"), 3, mean_type, variance_type,
            detach_mean)
    grad = torch.rand((shape[0], 2), device=DEVICE, generator=gen) + 0.5
    return {"vlb_loss": args, "vlb_loss_backward": (grad, *args)}


@cuda_only("opcheck's fake-tensor and aot_dispatch tests cannot trace Triton's interpreter")
def test_opcheck_of_vlb_loss_and_solver_step_var(new_op_backend):
    """vlb_loss (out requiring grad: its autograd too) and its backward for every mean and
    variance type, the noise drawn and given; solver_step with var."""
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    gen = _gen()
    for mean_type in (0, 1):
        for variance_type in (0, 1, 2):
            for drawn in (False, True):
                new = _vlb_op_args((3, 2, 5, 7), gen, drawn, mean_type, variance_type, detach_mean=not drawn)
                x0, out, *rest = new["vlb_loss"]
                torch.library.opcheck(ns.vlb_loss.default, (x0, out.requires_grad_(True), *rest))
                torch.library.opcheck(ns.vlb_loss_backward.default, new["vlb_loss_backward"])
    for drawn in (False, True):
        args = _new_op_args((3, 2, 5, 7), gen, drawn)["solver_step"]
        torch.library.opcheck(ns.solver_step.default, (*args, _randn(args[0].shape, gen)))


@cuda_only("torch.compile cannot trace a triton_op under Triton's interpreter")
def test_compile_fullgraph_of_vlb_loss(new_op_backend):
    """The raw vlb_loss with its backward (a per-sample weighted sum and the mean) and
    solver_step with var under torch.compile(fullgraph=True), against eager."""
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    gen = _gen()
    shape = (4, 3, 9, 11)
    x0, out, t, tabs, _, seed, offset, mean_type, variance_type, detach_mean = _vlb_op_args(shape, gen)["vlb_loss"]
    w = torch.rand((shape[0], 2), device=DEVICE, generator=gen)
    x, h = _randn(shape, gen), _randn(shape, gen)
    coef = _solver_coef(2, 1, torch.float32, gen)

    def f(out, seed):
        loss = ns.vlb_loss(x0, out, t, tabs, None, seed, offset, mean_type, variance_type, detach_mean)
        total = (loss * w).sum() + loss.mean()
        y = ns.solver_step(x, out[:, :3].detach(), None, [h], t, coef, None, 1.0, 1.0, None, seed, 0,
                           out[:, 3:].detach().clamp(-1, 1))
        return loss, total, y

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaf = out.detach().clone().requires_grad_(True)
        loss, total, y = fn(leaf, seed)
        total.backward()
        results.append((loss.detach(), y, leaf.grad))
    for got, expect in zip(results[1], results[0]):
        assert_close(got, expect, rtol=1e-6, atol=1e-6)


@cuda_only("kernel launches are counted by the CUDA profiler")
def test_one_kernel_launch_per_op(backend):
    """Kernels launched by one call of each bare op at the CIFAR size (float32)."""
    from torch.profiler import ProfilerActivity, profile
    mod = fastddpm.backends.resolve(backend, torch.device(DEVICE))
    ns = getattr(torch.ops, OP_NAMESPACE[backend])
    tabs = tables(N_STEPS, torch.float32, DEVICE)
    gen = _gen()
    x, y = _randn(CIFAR, gen), _randn(CIFAR, gen)
    t = torch.randint(0, N_STEPS, (CIFAR[0],), device=DEVICE, generator=gen)
    seed, g = ops.draw_seed(DEVICE, gen), _randn((CIFAR[0],), gen)
    calls = {
        "q_sample": lambda: mod.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, seed, 0),
        "p_sample_step": lambda: mod.p_sample_step(x, y, t, tabs["c1"], tabs["c2"], tabs["sigma"], None, seed, 0),
        "mse_per_sample": lambda: mod.mse_per_sample(x, None, seed, 0),
        "mse_per_sample_backward": lambda: ns.mse_per_sample_backward(g, x, None, seed, 0),
        "sample_t": lambda: mod.sample_t(seed, CIFAR[0], N_STEPS, 0),
        "normal": lambda: mod.normal(seed, CIFAR, 0, torch.float32),
    }
    if hasattr(mod, "solver_step"):
        new = _new_op_args(CIFAR, gen)
        calls.update({"solver_step": lambda: mod.solver_step(*new["solver_step"]),
                      "solver_step 4x4": lambda: mod.solver_step(*new["solver_step 4x4"]),
                      "target_mse": lambda: mod.target_mse(*new["target_mse"]),
                      "target_mse_backward": lambda: ns.target_mse_backward(*new["target_mse_backward"])})
    if hasattr(mod, "vlb_loss"):
        vlb = _vlb_op_args(CIFAR, gen)
        calls.update({"vlb_loss": lambda: mod.vlb_loss(*vlb["vlb_loss"]),
                      "vlb_loss_backward": lambda: ns.vlb_loss_backward(*vlb["vlb_loss_backward"])})
    counts = {}
    for name, call in calls.items():
        call()  # compiled and cached before the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        counts[name] = len([e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                            and not e.name.startswith(("Memcpy", "Memset"))])
    assert all(c == 1 for c in counts.values()), f"kernel launches per op call: {counts}"


@cuda_only("CUDA graphs")
def test_cuda_graph_replays_draw_fresh_noise(backend):
    """ops draws the seed on the device inside the graph, so each replay has fresh noise."""
    gen = _gen()
    x0, t = _randn((4, 3, 8, 8), gen), torch.randint(0, N_STEPS, (4,), device=DEVICE, generator=gen)
    zeros, ones = torch.zeros(N_STEPS, device=DEVICE), torch.ones(N_STEPS, device=DEVICE)

    def step():  # with sqrt_ab = 0 and sqrt_1m_ab = 1, x_t is the noise itself
        seed = ops.draw_seed(DEVICE)  # what ops.q_sample does with seed=None
        return ops.q_sample(x0, t, zeros, ones, seed=seed, backend=backend), seed

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs advises
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, seed = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out.cpu(), philox.normal(seed.cpu(), 0, out.shape), **NOISE_TOL)
        seen.append(int(seed.item()))
    assert len(set(seen)) == 3, f"replays reused seeds {seen}"


@cuda_only("CUDA graphs")
def test_solver_step_cuda_graph_replays_draw_fresh_noise(new_op_backend):
    """ops.solver_step with seed=None draws its seed on the device inside the graph: each replay
    has fresh noise. Output row 1 is the noise itself, row 2 x + history[0] + 2 z."""
    gen = _gen()
    shape = (4, 3, 8, 8)
    x, out, h = _randn(shape, gen), _randn(shape, gen), _randn(shape, gen)
    t = torch.randint(0, 10, (shape[0],), device=DEVICE, generator=gen)
    coef = torch.zeros((10, 3, 8), device=DEVICE)
    coef[:, 1, 7] = 1
    coef[:, 2, 0], coef[:, 2, 3], coef[:, 2, 7] = 1, 1, 2

    def step():
        seed = ops.draw_seed(DEVICE)  # what ops.solver_step does with seed=None
        return ops.solver_step(x, out, t, coef, (h,), seed=seed, backend=new_op_backend), seed

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs advises
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, seed = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y[0].cpu(), philox.normal(seed.cpu(), 0, shape), **NOISE_TOL)
        assert_close(y[1], x + h + 2 * y[0], **tol(torch.float32))
        seen.append(int(seed.item()))
    assert len(set(seen)) == 3, f"replays reused seeds {seen}"


class _SmallEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) + t.view(-1, 1, 1, 1).to(x.dtype) / N_STEPS


@cuda_only("host-device syncs exist only with a device")
def test_training_and_sampling_do_not_sync_with_the_host(backend):
    """loss(t=None) with its backward, p_sample with a Python int t and a short sampling loop
    queue their work without waiting for the GPU (torch.cuda.set_sync_debug_mode raises on a sync)."""
    diffusion = fastddpm.DenoiseDiffusion(_SmallEps().to(DEVICE), N_STEPS, backend=backend)
    x0 = _randn((4, 3, 8, 8), _gen())

    def run():
        diffusion.loss(x0).backward()
        x = diffusion.p_sample(x0, 5)
        with torch.no_grad():
            for t in reversed(range(4)):
                x = diffusion.p_sample(x, t)
        return x

    run()  # the kernels compile (and cache) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x).all()


@cuda_only("host-device syncs exist only with a device")
def test_new_ops_do_not_sync_with_the_host(new_op_backend):
    """The ops themselves (the public ones check t's range on the host) queue their work
    without waiting for the GPU: the seed and t are read in-kernel; target_mse's samples span
    several parts (its scratch and second pass)."""
    mod = fastddpm.backends.resolve(new_op_backend, torch.device(DEVICE))
    ns = getattr(torch.ops, OP_NAMESPACE[new_op_backend])
    new = _new_op_args((4, 3, 128, 129), _gen())
    x, out, out_cond, history, t, coef, bound, _, _, _, seed, offset = new["solver_step"]
    calls = [
        lambda: mod.solver_step(*new["solver_step"]),
        lambda: mod.solver_step(*new["solver_step 4x4"]),
        lambda: mod.solver_step(x, out, None, (), t, coef, None, 1.0, 1.0, None, seed, offset),
        lambda: mod.target_mse(*new["target_mse"]),
        lambda: ns.target_mse_backward(*new["target_mse_backward"]),
    ]
    vlb = _vlb_op_args((4, 3, 128, 129), _gen())  # several parts a sample: the scratch and second pass
    calls += [lambda: mod.vlb_loss(*vlb["vlb_loss"]), lambda: ns.vlb_loss_backward(*vlb["vlb_loss_backward"]),
              lambda: mod.solver_step(*new["solver_step"], x)]  # var: x
    for call in calls:  # outside the check: the first calls allocate
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [call() for call in calls]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(o).all() for o in outs)
