"""What the test files share: which backends run, per-dtype tolerances, NaN-poisoned outputs,
coefficient tables and sample inputs for each op (as Liger-Kernel's test/utils.py does).

- backends: :func:`expected_backends`, :func:`kernel_backends`, :func:`device_for`,
  :func:`cpu_backends` (from backends_under_test, re-exported here);
- tolerances: :data:`TOL`, :func:`tol`, :func:`mse_tol`, :data:`NOISE_ATOL`, :data:`NOISE_TOL`,
  :func:`assert_rounded_like`;
- poisoned outputs: :func:`poisoned_outputs` (the ``poisoned`` fixture of tests/conftest.py);
- inputs: :data:`DTYPES`, :data:`SHAPES`, :func:`tables`, :func:`table_dtype`,
  :func:`per_sample64`, :func:`seed_tensor`, :func:`expected_uniforms`, :func:`sample_inputs` (of :data:`OPS`),
  :func:`op_args`, :func:`mse_backward_args`, :func:`output_and_grads`;
- DenoiseDiffusion's loss: :func:`seeded_loss`.
"""
import contextlib
from typing import NamedTuple

import torch

from backends_under_test import cpu_backends, device_for, expected_backends, kernel_backends  # noqa: F401
from fastddpm import ops, philox, schedule

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# ---- tolerances ------------------------------------------------------------------------------

# Output dtype -> tolerance of a kernel's result against the reference backend or float64 math
# on the same (rounded) inputs, with the noise given. Every backend computes half types in
# float32 and float64 in float64, then rounds once to the output dtype.
TOL = {
    # One ulp of the output: both sides round a float32 result to nearest, and two float32
    # results a few ulp apart may straddle a rounding boundary of the 11-bit (float16) or
    # 8-bit (bfloat16) significand. atol covers float32 cancellation of terms of size ~4.
    torch.float16: dict(rtol=2**-10, atol=2e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=2e-6),
    # A few float32 ulp (1.2e-7 each): FMA contraction and the order of the two or three terms.
    torch.float32: dict(rtol=1.3e-6, atol=2e-6),
    # float64 throughout; the tables are float64 too.
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
# The noise contract: a backend's float32 normals lie within 1e-5 of the reference's on any
# device (libm, Sleef, libdevice and Triton's math differ by a few ulp in log, sin and cos).
NOISE_ATOL = 1e-5
NOISE_TOL = dict(rtol=0, atol=NOISE_ATOL)
# Measured on one device (CPU kernels, Triton in its interpreter, and the same within a GPU):
# the normals are within 1e-6 of the reference's (1-2 float32 ulp at |z| < 8). Outputs with
# drawn noise are held to 2e-6 (the noise enters with a coefficient of at most 1), so a loss
# of accuracy shows long before the contract's bound is at risk.
DRAWN_ATOL = 2e-6


def tol(dtype, drawn=False, cross_device=False):
    """assert_close kwargs for an elementwise result of ``dtype``.

    ``drawn``: the noise was drawn in-kernel (not given), so it differs from the reference's by
    up to ``DRAWN_ATOL``, or by the contract's ``NOISE_ATOL`` when the reference ran on another
    device (``cross_device``: a GPU result against the CPU's reference).
    """
    out = dict(TOL[dtype])
    if drawn or cross_device:
        out["atol"] = max(out["atol"], NOISE_ATOL if cross_device else DRAWN_ATOL)
    return out


def mse_tol(dtype, drawn=False, cross_device=False):
    """assert_close kwargs for the per-sample MSE of ``dtype`` data (a float32 or float64 result).

    A mean of D squares: float32 sums in another order lose up to about log2(D) ulp, hence 2e-6
    relative. With a drawn target each normal z moves by dz, measured within 3.5e-7 |z| (1e-6
    at most, DRAWN_ATOL's measurement), and the mean of 2 |pred - z| |dz| stays within 1e-6
    relative plus 1e-6. Across devices the contract's 1e-5 per normal: 1e-5 relative.
    """
    f64 = dtype == torch.float64
    out = dict(rtol=1e-12, atol=1e-12) if f64 else dict(rtol=2e-6, atol=1e-6)
    if drawn:
        out = dict(rtol=max(out["rtol"], 1e-6), atol=max(out["atol"], 1e-6))
    if cross_device:
        out = dict(rtol=max(out["rtol"], NOISE_ATOL), atol=max(out["atol"], 1e-6))
    return out


def assert_rounded_like(got, expect, what=""):
    """Half outputs round the float32 result to nearest even, as the reference does: they may
    differ only where a few-ulp float32 difference crosses a rounding boundary (measured: under
    2 elements in 10**4), not everywhere (which would mean another rounding mode)."""
    if got.dtype in HALF_DTYPES and got.numel():
        differ = (got.cpu() != expect.cpu()).double().mean().item()
        assert differ <= 0.01, f"{what}{differ:.1%} of {got.dtype} outputs differ from the reference's rounding"


# ---- NaN-poisoned outputs ----------------------------------------------------------------------

@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated uninitialised meanwhile starts as NaN (integers: their largest
    value), so an output element a kernel forgets to write fails the comparison.

    PyTorch's deterministic mode with ``fill_uninitialized_memory`` fills each ``torch.empty``
    (Python, as the Triton ops allocate) and ``at::empty`` (C++ and CUDA kernels) on every device.
    ``warn_only``: a nondeterministic PyTorch op elsewhere warns instead of raising.
    """
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(3).isnan().all(), "deterministic mode did not poison torch.empty"
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.utils.deterministic.fill_uninitialized_memory = old[2]


# ---- inputs ----------------------------------------------------------------------------------

N_STEPS = 37
# Odd on purpose: D = 1, 7, 105 and 1311 (two of the Triton kernels' 1024-element blocks, the
# last partial) elements per sample, none a multiple of the Philox quad (4).
SHAPES = ((5,), (3, 7), (3, 5, 7, 3), (2, 3, 19, 23), (1, 1))
# Sample offsets: 0, small, and one whose batch crosses the 32-bit word of the sample index.
OFFSETS = (0, 5, 2**32 - 2)


def table_dtype(dtype):
    """The dtype of the per-t tables fastddpm uses for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tables(n_steps=N_STEPS, dtype=torch.float32, device="cpu"):
    """The linear schedule's per-t coefficient tables in ``dtype`` on ``device``."""
    return {k: v.to(device, dtype) for k, v in schedule.coefficient_tables(schedule.linear(n_steps)).items()}


def per_sample64(table, t, like):
    """``table[t]`` in float64, shaped to broadcast against ``like`` (for float64 expectations)."""
    return table.to(torch.float64)[t.long()].view((-1,) + (1,) * (like.dim() - 1))


def seed_tensor(seed, device="cpu"):
    """A 64-bit seed as the ops take it: a 1-element int64 tensor holding its bit pattern."""
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=device)


def expected_uniforms(seed, q, g):
    """The contract's four float32 uniforms of Philox at quads ``q`` (int64) of sample ``g`` for a
    64-bit ``seed``, from fastddpm.philox: [len(q), 4], to compare bit for bit."""
    m = philox.MASK32
    words = philox.philox4x32_10(q & m, q >> 32, torch.full_like(q, g & m), torch.full_like(q, g >> 32),
                                 torch.tensor(seed & m), torch.tensor(seed >> 32))
    return torch.stack([philox.uniform(w) for w in words], dim=-1)


class SampleInput(NamedTuple):
    """``getattr(fastddpm.ops, op)(*args, **kwargs, backend=...)``; ``drawn``: the noise (the
    MSE's target) is drawn in-kernel from ``kwargs["seed"]``, else it is one of ``args``."""
    args: tuple
    kwargs: dict
    drawn: bool


OPS = ("q_sample", "p_sample_step", "mse_per_sample", "sample_t")
# (batch, n_steps, sample_offset) of sample_t: one step, many samples past the 32-bit word of
# the offset, the largest n_steps, an empty batch.
SAMPLE_T_CASES = ((5, 1, 0), (300, 7, 2**33), (9, 1000, 2**32 - 3), (1, 2**31 - 1, 12345), (0, 10, 0))
SEEDS = (0, 0xFFFFFFFF, 2**63 + 12345, 2**64 - 1)  # lo word all ones; hi bit set (negative as int64)


def sample_inputs(op, device="cpu", dtypes=DTYPES, shapes=SHAPES, *, n_steps=N_STEPS, requires_grad=False,
                  seed=0):
    """Sample inputs of ``fastddpm.ops.<op>``: for each shape and dtype the noise given and
    drawn (with an int64 ``t`` and with an int32 one), seeds with either 32-bit word extreme,
    offsets across a 32-bit word; float tensors require grad if asked. Random but fixed by
    ``seed``; tables in the data's table dtype."""
    gen = torch.Generator().manual_seed(seed)
    if op == "sample_t":
        for i, (batch, steps, offset) in enumerate(SAMPLE_T_CASES):
            yield SampleInput((seed_tensor(SEEDS[i % len(SEEDS)], device), batch, steps),
                              dict(sample_offset=offset, device=device), True)
        return
    if op not in OPS:
        raise ValueError(f"no sample inputs for op {op!r}")

    def randn(shape, dtype):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
        return x.requires_grad_(requires_grad)

    i = 0
    for shape in shapes:
        for dtype in dtypes:
            tabs = tables(n_steps, table_dtype(dtype), device)
            for drawn in (False, True):
                t = torch.randint(n_steps, (shape[0],), generator=gen)
                t[0] = n_steps - 1  # the largest noise coefficients
                t = (t.int() if drawn else t).to(device)
                data = [randn(shape, dtype) for _ in range(2 if op == "p_sample_step" else 1)]
                noise = None if drawn else randn(shape, dtype)
                kwargs = dict(sample_offset=OFFSETS[i % len(OFFSETS)])
                if drawn:
                    kwargs["seed"] = seed_tensor(SEEDS[i % len(SEEDS)], device)
                i += 1
                if op == "q_sample":
                    args = (data[0], t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], noise)
                elif op == "p_sample_step":
                    args = (data[0], data[1], t, tabs["c1"], tabs["c2"], tabs["sigma"], noise)
                else:
                    args = (data[0], noise)
                yield SampleInput(args, kwargs, drawn)


def op_args(op, sample):
    """``sample`` as the positional arguments of a backend's op ``torch.ops.<namespace>.<op>``
    (the schema in fastddpm/_autograd.py): noise, then the seed (None when the noise is given)
    and the sample offset."""
    if op == "sample_t":
        return (*sample.args, sample.kwargs["sample_offset"])
    return (*sample.args, sample.kwargs.get("seed"), sample.kwargs["sample_offset"])


def mse_backward_args(sample, generator=None):
    """An mse_per_sample sample as the arguments of ``mse_per_sample_backward``: a random
    per-sample incoming gradient in the MSE's dtype, then the (detached) inputs."""
    pred, target = sample.args
    grad = torch.rand(pred.shape[0], generator=generator, dtype=table_dtype(pred.dtype)).to(pred.device) + 0.5
    return (grad, pred.detach(), None if target is None else target.detach(), sample.kwargs.get("seed"),
            sample.kwargs["sample_offset"])


# The arguments of each op that carry a gradient (the data and the given noise, not the tables).
DIFFERENTIABLE = {"q_sample": (0, 4), "p_sample_step": (0, 1, 6), "mse_per_sample": (0, 1)}


def output_and_grads(op, sample, backend):
    """``fastddpm.ops.<op>`` on ``sample`` with ``backend``, and the gradients of its tensor
    arguments for a weighted sum (a distinct gradient per element) plus the mean (a stride-0
    gradient) of the output: (output, [gradients of the arguments that are not None])."""
    args = list(sample.args)
    idx = [i for i in DIFFERENTIABLE[op] if args[i] is not None]
    for i in idx:
        args[i] = args[i].detach().clone().requires_grad_(True)
    out = getattr(ops, op)(*args, **sample.kwargs, backend=backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ((out * weights.to(out.device, out.dtype)).sum() + out.mean()).backward()
    return out.detach(), [args[i].grad for i in idx]


def seeded_loss(d, x0, seed, wrt, **kwargs):
    """d.loss(x0, **kwargs) under torch.manual_seed(seed) (reduction "none" then .mean() when
    ``per_sample=True`` is passed), its value and its gradients for the tensors of ``wrt``."""
    per_sample = kwargs.pop("per_sample", False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = d.loss(x0, reduction="none", **kwargs).mean() if per_sample else d.loss(x0, **kwargs)
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), grads
