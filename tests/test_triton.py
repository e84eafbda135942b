"""The triton backend's kernels against the reference backend and float64 math.

Without a CUDA GPU, tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported, so
the kernels run in Triton's interpreter on CPU tensors (CI has no GPU); on a CUDA machine the
same tests run compiled on the GPU. opcheck's fake-tensor test and torch.compile of the
triton_ops fail under the interpreter, so those two are checked by tests/test_gpu.py on a GPU
instead; here two subprocesses with the interpreter off compile every kernel to an sm_90 cubin
and run the ops as fake kernels on symbolic shapes, which needs no GPU.

Every output the kernels allocate is pre-filled with NaN (the ``poisoned`` fixture of
tests/conftest.py), so an element a kernel fails to write fails the comparison. Shapes are odd on purpose: D not a
multiple of 4 (the Philox quad), of a block (1024 elements) or of an MSE chunk (16384).
"""
import os

import pytest
import torch
from torch.testing import assert_close

import fastddpm
from fastddpm import ops, philox
from fastddpm.backends import triton as triton_backend
from fastddpm.backends.triton import ops as triton_ops
from helpers import (DTYPES, NOISE_TOL, assert_rounded_like, expected_uniforms, mse_tol, output_and_grads,
                     per_sample64, sample_inputs, seed_tensor, tables, tol)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
N_STEPS = 37
SHAPES = [(3, 5, 7, 3), (2, 3, 19, 23), (1, 1), (4, 9)]  # D = 105, 1311 (two blocks), 1, 9


def _tables(dtype=torch.float32):
    return tables(N_STEPS, dtype, DEVICE)


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _t(batch, seed=1):
    return torch.randint(0, N_STEPS, (batch,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ---- registration and availability ------------------------------------------------------

def test_backend_is_available_and_registered():
    ok, reason = fastddpm.backends.status("triton")
    assert ok, reason
    assert "triton" in fastddpm.available_backends()
    assert DEVICE in triton_backend.device_types
    for name in ("q_sample", "p_sample_step", "mse_per_sample", "mse_per_sample_backward", "sample_t", "normal",
                 "solver_step", "target_mse", "target_mse_backward"):
        assert hasattr(torch.ops.fastddpm_triton, name)
    assert not hasattr(torch.ops.fastddpm_triton, "clipped_step")  # fastddpm.ops.clipped_step uses solver_step
    if INTERPRET:  # CI: auto on CPU stays with the CPU backends; triton is asked for by name
        assert fastddpm.backends.resolve("triton", torch.device("cpu")) is triton_backend


def test_blocks_cover_each_sample_once():
    for d in [1, 3, 4, 5, 63, 64, 65, 1023, 1024, 1025, 4097, 16385, 10**6 + 3]:
        nblk, block_q = triton_ops._blocks(d)
        covered = nblk * block_q * 4
        assert covered >= d and covered - block_q * 4 < d, (d, nblk, block_q)
        assert block_q & (block_q - 1) == 0 and triton_ops.MIN_BLOCK_Q <= block_q <= triton_ops.MAX_BLOCK_Q


# ---- the noise contract -----------------------------------------------------------------

@pytest.mark.parametrize("seed,g", [(0, 0), (2**64 - 1, 2**32 + 5), (0x0123456789ABCDEF, 77)])
def test_uniforms_bit_exact(poisoned, seed, g):
    qs = torch.tensor([0, 1, 2, 3, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 3, 2**40 + 9], dtype=torch.int64)
    qs = torch.cat([qs, torch.randint(0, 2**62, (22,), generator=torch.Generator().manual_seed(seed % 97))])
    out = triton_ops.contract_uniforms(seed_tensor(seed, DEVICE), qs.to(DEVICE), g)
    assert torch.equal(out.cpu(), expected_uniforms(seed, qs, g))  # bit for bit, as the contract demands


@pytest.mark.parametrize("seed", [0, 12345, 2**64 - 3])
@pytest.mark.parametrize("sample_offset", [0, 3, 2**32 + 1])
def test_generated_noise_matches_reference(poisoned, seed, sample_offset):
    # q_sample with sqrt_ab = 0 and sqrt_1m_ab = 1 returns its float32 noise exactly.
    shape = (3, 2, 17, 31)  # D = 1054: two blocks, a ragged last quad
    x0 = _data(shape, torch.float32)
    zeros, ones = torch.zeros(N_STEPS, device=DEVICE), torch.ones(N_STEPS, device=DEVICE)
    got = ops.q_sample(x0, _t(3), zeros, ones, seed=seed, sample_offset=sample_offset, backend="triton")
    expect = philox.normal(seed_tensor(seed, DEVICE), sample_offset, shape)
    assert_close(got, expect, **NOISE_TOL)
    # A sample's noise depends only on (seed, g, j): the batch's tail alone draws the same.
    tail = ops.q_sample(x0[1:], _t(3)[1:], zeros, ones, seed=seed, sample_offset=sample_offset + 1,
                        backend="triton")
    assert torch.equal(tail, got[1:])


@pytest.mark.parametrize("n_steps", [1, 7, 1000, 2**31 - 1])
def test_sample_t_matches_reference(poisoned, n_steps):
    for seed, offset, batch in [(0, 0, 5), (2**63 + 11, 2**33, 300), (99, 7, 1)]:
        got = ops.sample_t(seed, batch, n_steps, sample_offset=offset, device=DEVICE, backend="triton")
        expect = ops.sample_t(seed, batch, n_steps, sample_offset=offset, device=DEVICE, backend="reference")
        assert got.dtype == torch.int64 and torch.equal(got, expect)
    assert ops.sample_t(5, 0, n_steps, device=DEVICE, backend="triton").shape == (0,)


# ---- q_sample and p_sample_step ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given_noise", [True, False])
def test_q_sample(poisoned, dtype, shape, given_noise):
    tabs = _tables(torch.float64 if dtype == torch.float64 else torch.float32)
    x0 = _data(shape, dtype)
    t = _t(shape[0])
    noise = _data(shape, dtype, seed=2) if given_noise else None
    args = (x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], noise)
    got = ops.q_sample(*args, seed=42, sample_offset=5, backend="triton")
    expect = ops.q_sample(*args, seed=42, sample_offset=5, backend="reference")
    assert got.dtype == dtype and got.shape == x0.shape
    assert_close(got, expect, **tol(dtype, not given_noise))
    if given_noise:  # and against float64 math on the same (rounded) inputs
        assert_rounded_like(got, expect)
        exact = (per_sample64(tabs["sqrt_ab"], t, x0) * x0.double()
                 + per_sample64(tabs["sqrt_1m_ab"], t, x0) * noise.double())
        assert_close(got, exact.to(dtype), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("given_noise", [True, False])
def test_p_sample_step(poisoned, dtype, shape, given_noise):
    tabs = _tables(torch.float64 if dtype == torch.float64 else torch.float32)
    x_t, eps = _data(shape, dtype), _data(shape, dtype, seed=3)
    t = _t(shape[0], seed=4)
    noise = _data(shape, dtype, seed=5) if given_noise else None
    args = (x_t, eps, t, tabs["c1"], tabs["c2"], tabs["sigma"], noise)
    got = ops.p_sample_step(*args, seed=7, sample_offset=2, backend="triton")
    expect = ops.p_sample_step(*args, seed=7, sample_offset=2, backend="reference")
    assert got.dtype == dtype and got.shape == x_t.shape
    # c1 is up to 1/sqrt(1 - beta_max) and c2 large at small t: scale atol by the terms' size.
    assert_close(got, expect, **tol(dtype, not given_noise))
    if given_noise:
        assert_rounded_like(got, expect)
        exact = (per_sample64(tabs["c1"], t, x_t) * x_t.double()
                 - per_sample64(tabs["c2"], t, x_t) * eps.double()
                 + per_sample64(tabs["sigma"], t, x_t) * noise.double())
        assert_close(got, exact.to(dtype), **tol(dtype))


def test_strided_inputs_and_mixed_tables(poisoned):
    # channels_last x0, a transposed noise view, an expanded int32 t, float64 tables for
    # float32 data, a strided table: all read by logical index.
    tabs64 = _tables(torch.float64)
    x0 = _data((3, 4, 5, 7), torch.float32).to(memory_format=torch.channels_last)
    noise = _data((3, 4, 7, 5), torch.float32, seed=8).transpose(2, 3)
    t = torch.tensor(11, dtype=torch.int32, device=DEVICE).expand(3)
    sqrt_1m_ab = torch.stack([tabs64["sqrt_1m_ab"], tabs64["sqrt_ab"]], 1)[:, 0]  # stride 2
    for n in (noise, None):
        args = (x0, t, tabs64["sqrt_ab"], sqrt_1m_ab, n)
        got = ops.q_sample(*args, seed=3, backend="triton")
        assert_close(got, ops.q_sample(*args, seed=3, backend="reference"), **tol(torch.float32, n is None))
    eps = _data((3, 7, 4, 5), torch.float32, seed=9).permute(0, 2, 3, 1)
    args = (x0, eps, t, tabs64["c1"], tabs64["c2"], tabs64["sigma"])
    assert_close(ops.p_sample_step(*args, seed=4, backend="triton"),
                 ops.p_sample_step(*args, seed=4, backend="reference"), **tol(torch.float32))


def test_empty_batch(poisoned):
    tabs = _tables()
    for shape in [(0, 3, 4), (2, 0)]:
        x = _data(shape, torch.float32)
        t = torch.zeros(shape[0], dtype=torch.int64, device=DEVICE)
        assert ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], seed=1, backend="triton").shape == shape
        assert ops.p_sample_step(x, x, t, tabs["c1"], tabs["c2"], tabs["sigma"], seed=1,
                                 backend="triton").shape == shape
    assert ops.mse_per_sample(_data((0, 5), torch.float16), seed=1, backend="triton").shape == (0,)


def test_out_of_range_t_poisons_instead_of_reading_out_of_bounds():
    # ops.py checks t on the host except under torch.compile; there the kernel must not read
    # past the tables. Call the op directly to bypass that check.
    tabs = _tables()
    x0 = _data((3, 10), torch.float32)
    t = torch.tensor([0, N_STEPS, -1], device=DEVICE)
    out = torch.ops.fastddpm_triton.q_sample(x0, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], x0, None, 0)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


# ---- mse_per_sample ---------------------------------------------------------------------

MSE_SHAPES = [(3, 5, 7, 3), (2, 3, 101, 61), (1, 1), (5, 2, 3)]  # D = 105, 18483 (two chunks), 1, 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MSE_SHAPES)
@pytest.mark.parametrize("given_target", [True, False])
def test_mse_per_sample(poisoned, dtype, shape, given_target):
    pred = _data(shape, dtype)
    target = _data(shape, dtype, seed=6) if given_target else None
    got = ops.mse_per_sample(pred, target, seed=17, sample_offset=9, backend="triton")
    expect = ops.mse_per_sample(pred, target, seed=17, sample_offset=9, backend="reference")
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (shape[0],)
    assert_close(got, expect, **mse_tol(dtype, not given_target))
    if given_target:
        diff = pred.double() - target.double()
        assert_close(got, (diff * diff).reshape(shape[0], -1).mean(1).to(got.dtype), **mse_tol(dtype))
    # Deterministic: the same input gives the same bits (no atomics in the reduction).
    assert torch.equal(got, ops.mse_per_sample(pred, target, seed=17, sample_offset=9, backend="triton"))


def test_mse_mixed_dtypes_promote(poisoned):
    pred, target = _data((3, 50), torch.bfloat16), _data((3, 50), torch.float32, seed=2)
    assert_close(ops.mse_per_sample(pred, target, backend="triton"),
                 ops.mse_per_sample(pred, target, backend="reference"), **mse_tol(torch.float32))


# ---- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(poisoned, dtype):
    # Each op's sample inputs (noise given and drawn) at one odd shape, triton against reference.
    for op in ("q_sample", "p_sample_step", "mse_per_sample"):
        for sample in sample_inputs(op, DEVICE, (dtype,), [(3, 2, 5, 7)], n_steps=N_STEPS):
            out, grads = output_and_grads(op, sample, "triton")
            out_ref, grads_ref = output_and_grads(op, sample, "reference")
            assert_close(out, out_ref, **(mse_tol if op == "mse_per_sample" else tol)(dtype, sample.drawn))
            for g, g_ref in zip(grads, grads_ref):
                assert g.dtype == dtype
                assert_close(g, g_ref, **tol(dtype, sample.drawn))


def test_mse_backward_matches_float64_formula(poisoned):
    # d/dpred mean_b((pred - target)^2) weighted by w_b = w_b * 2 (pred - target) / D
    pred, target = _data((4, 3, 11), torch.float32), _data((4, 3, 11), torch.float32, seed=1)
    w = _data((4,), torch.float32, seed=2)
    got = torch.ops.fastddpm_triton.mse_per_sample_backward(w.expand(4), pred, target, None, 0)
    exact = w.double().view(4, 1, 1) * 2 * (pred.double() - target.double()) / 33
    assert_close(got, exact.float(), rtol=1e-6, atol=1e-7)


def test_training_loss_through_the_class(poisoned):
    # DenoiseDiffusion.loss on the triton backend: sample_t, q_sample and the MSE regenerating
    # its noise, forward and backward, against the reference backend with the same generator.
    class Eps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x) + t.view(-1, 1, 1, 1) / N_STEPS

    model = Eps().to(DEVICE)
    x0 = _data((4, 3, 9, 7), torch.float32)
    losses, grads = [], []
    for backend in ("triton", "reference"):
        model.zero_grad()
        diffusion = fastddpm.DenoiseDiffusion(model, N_STEPS, DEVICE, backend=backend)
        loss = diffusion.loss(x0, generator=torch.Generator(DEVICE).manual_seed(3))
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.conv.weight.grad.clone())
    assert_close(losses[0], losses[1], **mse_tol(torch.float32, drawn=True))
    assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ---- the kernels compile for a GPU ------------------------------------------------------

# Run with the interpreter off: compiles every kernel (each constexpr variant, and Triton's
# specialisation of ints equal to 1) to a cubin for sm_90 with Triton's bundled ptxas. No GPU
# is needed; it catches what the interpreter accepts but the compiler rejects (a non-constexpr
# global, say). Written for Triton >= 3.3's ASTSource(fn, signature, constexprs).
_COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastddpm.backends.triton import kernels as K

TARGET = GPUTarget("cuda", 90, 32)
I, P = "i32", lambda t: "*" + t
compiled = 0
def build(fn, types, consts):
    global compiled
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET, options={"num_warps": 4})
    compiled += 1

for dt in ("fp32", "fp16", "bf16", "fp64"):
    acc = "fp64" if dt == "fp64" else "fp32"
    for flag in (False, True):
        common = dict(IS_F64=dt == "fp64", BLOCK_Q=256)
        build(K.q_sample_kernel, dict(x_ptr=P(dt), t_ptr=P("i64"), sqrt_ab_ptr=P("fp32"), sqrt_1m_ab_ptr=P("fp32"),
              noise_ptr=P(dt), seed_ptr=P("i64"), out_ptr=P(dt), D="i64", nblk=I, n_steps=I, sample_offset="i64"),
              dict(HAS_NOISE=flag, **common))
        build(K.p_sample_step_kernel, dict(x_ptr=P(dt), eps_ptr=P(dt), t_ptr=P("i32"), c1_ptr=P("fp64"),
              c2_ptr=P("fp64"), sigma_ptr=P("fp64"), noise_ptr=P(dt), seed_ptr=P("i64"), out_ptr=P(dt), D=I,
              nblk=I, n_steps=I, sample_offset=I), dict(HAS_NOISE=flag, **common))
        # mse_per_sample's kernels (TABLES False) and target_mse's (x0, t and the tables read).
        tables = dict(x0_ptr=P(dt), t_ptr=P("i32" if flag else "i64"), cx0_ptr=P(acc), ceps_ptr=P("fp32"), n_steps=I)
        mse = dict(pred_ptr=P(dt), target_ptr=P(dt), seed_ptr=P("i64"), out_ptr=P(acc), D=I, nblk=I,
                   blocks_per_chunk=I, nchunk=I, sample_offset=I, **tables)
        for final, with_tables in ((False, False), (True, False), (flag, True)):
            build(K.mse_partial_kernel, mse, dict(HAS_TARGET=flag, TABLES=with_tables, FINAL=final, **common))
        for with_tables in (False, True):
            build(K.mse_backward_kernel, dict(grad_ptr=P(acc), pred_ptr=P(dt), target_ptr=P(dt), seed_ptr=P("i64"),
                  out_ptr=P(dt), D=I, nblk=I, sample_offset=I, **tables), dict(HAS_TARGET=flag, TABLES=with_tables,
                  **common))
        # solver_step: every R (outputs) and history count over the dtypes, coef of either dtype.
        for n_out, n_history in (((1, 0), (4, 4)) if flag else ((2, 1), (3, 3))):
            step = dict(x_ptr=P(dt), model_ptr=P(dt), cond_ptr=P(dt), **{f"h{h}_ptr": P(dt) for h in range(4)},
                        t_ptr=P("i32" if n_out % 2 else "i64"), coef_ptr=P(acc if flag else "fp32"),
                        bound_ptr=P("fp64" if n_history % 2 else "fp32"), noise_ptr=P(dt), seed_ptr=P("i64"),
                        var_ptr=P(dt), y_ptr=P(dt), clip_bits="i64", guidance_bits="i64", plane="i64" if flag else I, D=I, nblk=I,
                        n_steps=I, sample_offset="i64")
            build(K.solver_step_kernel, step, dict(HAS_COND=flag, N_HISTORY=n_history, HAS_BOUND=n_out % 2 == 1,
                  HAS_NOISE=n_history % 2 == 0, HAS_VAR=n_out > 1, R=n_out, **common))
        # vlb_loss: every mean and variance type and detach_mean over the dtypes, tables of either dtype.
        vlb = dict(x0_ptr=P(dt), out_ptr=P(dt), t_ptr=P("i32" if flag else "i64"), tables_ptr=P(acc if flag else "fp32"),
                   noise_ptr=P(dt), seed_ptr=P("i64"), res_ptr=P(acc), D=I, D_OUT=I, nblk=I, n_steps=I,
                   blocks_per_chunk=I, nchunk=I, sample_offset="i64")
        for mean_type in (0, 1):
            for var_type in (0, 1, 2):
                build(K.vlb_partial_kernel, vlb, dict(HAS_NOISE=flag, MEAN_TYPE=mean_type, VAR_TYPE=var_type,
                      FINAL=(mean_type + var_type) % 2 == 0, **common))
                build(K.vlb_backward_kernel, dict(vlb, grad_ptr=P(acc), res_ptr=P(dt)),
                      dict(HAS_NOISE=flag, MEAN_TYPE=mean_type, VAR_TYPE=var_type, DETACH=(var_type + flag) % 2 == 0,
                           **common))
    build(K.vlb_finish_kernel, dict(partial_ptr=P(acc), res_ptr=P(acc), nchunk=I, D=I), dict(BLOCK=128))
    build(K.mse_finish_kernel, dict(partial_ptr=P(acc), out_ptr=P(acc), nchunk=I, D=I), dict(BLOCK=128))
# Triton passes an int argument equal to 1 as a constexpr (and types small ones i32: the solver
# step's float bits of 0.0 and 5e-324).
mse_f32 = dict(pred_ptr=P("fp32"), target_ptr=P("fp32"), seed_ptr=P("i64"), out_ptr=P("fp32"), blocks_per_chunk=I,
               x0_ptr=P("fp32"), t_ptr=P("i64"), cx0_ptr=P("fp32"), ceps_ptr=P("fp32"))
for with_tables in (False, True):
    build(K.mse_partial_kernel, mse_f32, dict(D=1, nblk=1, n_steps=1, nchunk=1, sample_offset=1, HAS_TARGET=False,
          TABLES=with_tables, FINAL=True, IS_F64=False, BLOCK_Q=4))
build(K.solver_step_kernel, dict(x_ptr=P("fp64"), model_ptr=P("fp64"), cond_ptr=P("fp64"),
      **{f"h{h}_ptr": P("fp64") for h in range(4)}, t_ptr=P("i64"), coef_ptr=P("fp64"), bound_ptr=P("fp64"),
      noise_ptr=P("fp64"), seed_ptr=P("i64"), var_ptr=P("fp64"), y_ptr=P("fp64"), guidance_bits=I),
      dict(clip_bits=1, plane=1, D=1, nblk=1, n_steps=1, sample_offset=1, HAS_COND=True, N_HISTORY=2,
           HAS_BOUND=False, HAS_NOISE=False, HAS_VAR=True, R=2, IS_F64=True, BLOCK_Q=4))
vlb_1 = dict(x0_ptr=P("fp32"), out_ptr=P("fp32"), t_ptr=P("i64"), tables_ptr=P("fp32"), noise_ptr=P("fp32"),
             seed_ptr=P("i64"), blocks_per_chunk=I)
build(K.vlb_partial_kernel, dict(vlb_1, res_ptr=P("fp32")), dict(D=1, D_OUT=1, nblk=1, n_steps=1, nchunk=1,
      sample_offset=1, HAS_NOISE=False, MEAN_TYPE=0, VAR_TYPE=2, FINAL=True, IS_F64=False, BLOCK_Q=4))
build(K.vlb_backward_kernel, dict(vlb_1, grad_ptr=P("fp32"), res_ptr=P("fp32")), dict(D=1, D_OUT=1, nblk=1,
      n_steps=1, sample_offset=1, HAS_NOISE=False, MEAN_TYPE=1, VAR_TYPE=2, DETACH=False, IS_F64=False, BLOCK_Q=4))
build(K.sample_t_kernel, dict(seed_ptr=P("i64"), out_ptr=P("i64"), batch=I, n_steps=I, sample_offset="i64"),
      dict(BLOCK=256))
build(K.sample_t_kernel, dict(seed_ptr=P("i64"), out_ptr=P("i64"), batch=I), dict(n_steps=1, sample_offset=1,
      BLOCK=256))
for dt in ("fp32", "fp16", "bf16", "fp64"):
    build(K.normal_kernel, dict(seed_ptr=P("i64"), out_ptr=P(dt), D=I, nblk=I, sample_offset="i64"), dict(BLOCK_Q=256))
build(K.uniforms_kernel, dict(seed_ptr=P("i64"), q_ptr=P("i64"), g="i64", out_ptr=P("fp32"), n=I), dict(BLOCK=128))
print("compiled", compiled)
"""


# The fake-tensor half of what torch.compile does with the ops, with the interpreter off (the
# interpreter would run the kernels on fake data): each triton_op, being its own fake kernel,
# must give the right shapes and dtypes for symbolic (dynamic) shapes.
_FAKE_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from fastddpm.backends.triton import ops as triton_ops  # registers torch.ops.fastddpm_triton

ns = torch.ops.fastddpm_triton
mode = FakeTensorMode(shape_env=ShapeEnv())
def fake(real):
    dims = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * real.dim())
    return mode.from_tensor(real, symbolic_context=dims)
for real_shape in [(2, 3, 101, 61), (5, 7)]:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, t = fake(torch.randn(real_shape, dtype=dtype)), fake(torch.zeros(real_shape[0], dtype=torch.int64))
        seed, tab = mode.from_tensor(torch.zeros(1, dtype=torch.int64)), mode.from_tensor(torch.rand(50))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        with mode:
            for out in (ns.q_sample(x, t, tab, tab, None, seed, 0), ns.q_sample(x, t, tab, tab, x, None, 3),
                        ns.p_sample_step(x, x, t, tab, tab, tab, None, seed, 0),
                        ns.mse_per_sample_backward(torch.ones(x.shape[0], dtype=acc), x, None, seed, 0)):
                assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
            for target in (None, x):
                m = ns.mse_per_sample(x, target, seed if target is None else None, 0)
                assert m.shape == (x.shape[0],) and m.dtype == acc
            bound = mode.from_tensor(torch.ones(real_shape[0]))
            for n_out, (out_cond, history, bnd, clip) in enumerate(((None, [], None, float("inf")),
                                                                    (x, [x], bound, float("inf")),
                                                                    (x, [x] * 4, None, 1.0)), start=1):
                coef = mode.from_tensor(torch.rand(50, n_out + 1, 8, dtype=acc))
                for noise in (None, x):
                    out = ns.solver_step(x, x, out_cond, history, t, coef, bnd, clip, 2.0, noise,
                                         seed if noise is None else None, 1)
                    assert out.shape == (n_out,) + tuple(x.shape) and out.dtype == dtype and out.is_contiguous()
                    m = ns.target_mse(x, x, t, tab, tab, noise, seed if noise is None else None, 2)
                    assert m.shape == (x.shape[0],) and m.dtype == acc
                    g = ns.target_mse_backward(torch.ones(x.shape[0], dtype=acc), x, x, t, tab, tab, noise,
                                               seed if noise is None else None, 2)
                    assert g.shape == x.shape and g.dtype == dtype and g.is_contiguous()
            s = ns.sample_t(seed, x.shape[0], 50, 0)
            assert s.shape == (x.shape[0],) and s.dtype == torch.int64
            n = ns.normal(seed, list(x.shape), 5, dtype)
            assert n.shape == x.shape and n.dtype == dtype and n.is_contiguous()
print("fake ok")
"""


def _run_without_interpreter(script):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns unless the default is stated
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_kernels_compile_for_sm90():
    out = _run_without_interpreter(_COMPILE_SCRIPT)
    assert "compiled 188" in out, out


def test_ops_are_their_own_fake_kernels_under_symbolic_shapes():
    assert "fake ok" in _run_without_interpreter(_FAKE_SCRIPT)


# ---- the GPU report's code paths, dry-run on CPU -----------------------------------------

def test_gpu_report_dry_run(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "report.md"
    # The checks are tests/test_gpu.py in the interpreter; three quick ones here (the whole file
    # takes a minute or more in the interpreter: FASTDDPM_TEST_GPU_DEVICE=cpu pytest tests/test_gpu.py).
    quick = "-k 'fully_written or sample_t or uniforms'"
    cmd = [sys.executable, "-m", "benchmarks.gpu_report", "--device", "cpu", "--rep-ms", "1", "--output", str(out),
           "--pytest-args", quick]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    rows = {r[0]: r[1] for r in (line[2:].split(" | ") for line in report.splitlines() if line.startswith("| test_"))}
    assert rows == {"test_sample_t_equals_the_cpu_reference[triton]": "PASS",
                    "test_sample_t_equals_the_cpu_reference[cuda]": "skip",
                    "test_uniforms_bit_exact": "PASS",
                    "test_outputs_fully_written[triton]": "PASS",
                    "test_outputs_fully_written[cuda]": "skip"}, report
    for size in ("tiny 1x1x4x4", "odd 3x1100"):
        assert f"| copy | {size} | copy_ | " in report
        for case in ("q_sample_noise", "q_sample_draw", "p_sample_draw", "mse_fwd_bwd"):
            for provider in ("eager", "triton-op", "fastddpm-triton"):
                assert f"| {case} | {size} | {provider} | " in report, (case, size, provider)
        assert f"| train_step | {size} | fastddpm-triton | " in report
    assert "Timing errors" not in report


def test_gpu_report_goals_verdicts():
    from benchmarks import gpu_report as R
    from fastddpm.cli.bench import cases as benchmarking
    sizes = {"cifar": R.CIFAR, "2^26": (4096, 4, 64, 64)}
    n = 2**26
    copy_ms = 2 * n * 4 / 4.0e12 * 1e3  # 4 TB/s
    results = {("copy", "2^26"): {"copy_": copy_ms}, ("copy", "cifar"): {"copy_": 0.004}}
    for case in R.BANDWIDTH_CASES:  # triton at 90% of copy bandwidth, except p_sample_draw at 80%
        frac = 0.8 if case == "p_sample_draw" else 0.9
        ms = benchmarking.bytes_moved(case, sizes["2^26"]) / (4.0e12 * frac) * 1e3
        results[(case, "2^26")] = {"triton-op": ms, "eager": 4 * ms}
        results[(case, "cifar")] = {"triton-op": 0.006, "fastddpm-triton": 0.03,
                                    "eager": 0.005 if case == "mse_fwd_bwd" else 0.02}
    launches = R.launch_verdicts([("test_one_kernel_launch_per_op[triton]", "FAIL", "counts {'q_sample': 2}", 1.0),
                                  ("test_one_kernel_launch_per_op[cuda]", "PASS", "", 1.0),
                                  ("test_opcheck[triton]", "PASS", "", 1.0)])
    assert launches == {"triton": (False, "counts {'q_sample': 2}"), "cuda": (True, "")}
    text = "\n".join(R._goals(results, sizes, launches))
    assert "copy bandwidth at >= 256 MB (bare ops): NOT met (lowest 80%: p_sample_draw at 2^26)" in text
    assert "triton: one kernel launch per op (test_one_kernel_launch_per_op): NOT met (counts {'q_sample': 2})" in text
    assert "cuda: one kernel launch per op (test_one_kernel_launch_per_op): met" in text
    assert "triton-op: per-call time at cifar no worse than eager: NOT met for mse_fwd_bwd\n" in text + "\n"
    assert "fastddpm-triton: per-call time at cifar no worse than eager: NOT met for q_sample_noise" in text
