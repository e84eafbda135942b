"""Cross-backend reproducibility.

With one seed every backend must give the reference backend's results: the noise is a
function of (seed, global sample index, element) only. Uniform words are exact, normals agree
to 1e-5 by the contract (libm versus other math; measured within 1e-6 on one device), so
outputs agree to that noise tolerance (scaled by the coefficient in front of the noise, at most
1) or one rounding of the output dtype, whichever is larger (helpers.tol); timesteps are
integers and agree exactly. Every check runs against the reference on CPU, so a GPU run of this
file also checks GPU-versus-CPU reproducibility, to the contract's bound. Outputs are
NaN-poisoned (the ``poisoned`` fixture), so an element never written fails.

CI must have the cpu and triton backends (``FASTDDPM_EXPECT_BACKENDS``, default "cpu,triton",
names the ones that must be present): a missing one fails here instead of shrinking the test.
"""

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import ops
from helpers import (SEEDS, assert_rounded_like, device_for, expected_backends, kernel_backends, mse_tol,
                     table_dtype, tables, tol)

pytestmark = pytest.mark.usefixtures("poisoned")
N_STEPS = 40
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def test_expected_backends_are_present():
    for name in expected_backends():
        ok, reason = fastddpm.backends.status(name)
        assert ok, f"backend {name!r} must be available in CI: {reason}"


# Layouts of a batch-first tensor with odd sizes (nothing a multiple of 4 or of a block).
def _contiguous(x):
    return x


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _sliced(x):
    return torch.cat([x, x], dim=3)[..., ::2]  # non-contiguous view of x's values


def _empty_batch(x):
    return x[:0]


LAYOUTS = {"contiguous": _contiguous, "channels_last": _channels_last, "sliced": _sliced,
           "empty_batch": _empty_batch}
SHAPE = (5, 3, 7, 9)


def _randn(shape, dtype, layout, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return LAYOUTS[layout](x.to(dtype))


def _tables(dtype):
    return tables(N_STEPS, table_dtype(dtype))


def _steps(batch, int32=False):
    t = torch.randint(N_STEPS, (batch,), generator=torch.Generator().manual_seed(5))
    t[0] = N_STEPS - 1  # the largest noise coefficients
    return t.int() if int32 else t


def _tol(out, dtype):
    """Drawn noise; the contract's bound when ``out`` is on another device than the reference."""
    return tol(dtype, drawn=True, cross_device=out.device.type != "cpu")


def _check(out, ref, backend):
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
    torch.testing.assert_close(out.cpu(), ref, **_tol(out, ref.dtype), msg=lambda m: f"{backend}: {m}")
    assert_rounded_like(out, ref, f"{backend}: ")


def _on(device, *xs):
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_q_sample_same_seed_same_result(backend, dtype, layout):
    device = device_for(backend)
    tabs = _tables(dtype)
    x0 = _randn(SHAPE, dtype, layout, 1)
    t = _steps(SHAPE[0], int32=layout == "sliced")[:x0.shape[0]]
    for seed, offset in zip(SEEDS, (0, 3, 2**32 - 2)):  # the last crosses g's 32-bit word
        args = (tabs["sqrt_ab"], tabs["sqrt_1m_ab"])
        ref = ops.q_sample(x0, t, *args, seed=seed, sample_offset=offset, backend="reference")
        out = ops.q_sample(*_on(device, x0, t, *args), seed=seed, sample_offset=offset, backend=backend)
        _check(out, ref, backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_p_sample_step_same_seed_same_result(backend, dtype, layout):
    device = device_for(backend)
    tabs = _tables(dtype)
    x_t = _randn(SHAPE, dtype, layout, 2)
    eps = _randn(SHAPE, dtype, "contiguous", 3)[:x_t.shape[0]]  # a layout other than x_t's
    t = _steps(SHAPE[0]) if layout != "sliced" else torch.tensor(7).expand(SHAPE[0])  # stride 0
    t = t[:x_t.shape[0]]
    for seed, offset in zip(SEEDS, (0, 3, 2**32 - 2)):
        args = (tabs["c1"], tabs["c2"], tabs["sigma"])
        ref = ops.p_sample_step(x_t, eps, t, *args, seed=seed, sample_offset=offset, backend="reference")
        out = ops.p_sample_step(*_on(device, x_t, eps, t, *args), seed=seed, sample_offset=offset,
                                backend=backend)
        _check(out, ref, backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mse_to_seeded_noise_and_its_gradient(backend, dtype):
    device = device_for(backend)
    pred_ref = _randn(SHAPE, dtype, "channels_last", 4).requires_grad_()
    pred = pred_ref.detach().to(device).requires_grad_()
    seed, offset = SEEDS[2], 11
    ref = ops.mse_per_sample(pred_ref, seed=seed, sample_offset=offset, backend="reference")
    out = ops.mse_per_sample(pred, seed=seed, sample_offset=offset, backend=backend)
    assert out.dtype == ref.dtype and out.shape == ref.shape == (SHAPE[0],)
    torch.testing.assert_close(out.detach().cpu(), ref.detach(),
                               **mse_tol(dtype, drawn=True, cross_device=device.type != "cpu"))
    weights = torch.arange(1.0, SHAPE[0] + 1, dtype=ref.dtype)  # a different grad per sample
    (ref * weights).sum().backward()
    (out * weights.to(device)).sum().backward()
    _check(pred.grad, pred_ref.grad, backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_sample_t_identical(backend):
    device = device_for(backend)
    for seed in SEEDS:
        for n_steps, offset in ((1000, 0), (7, 2**32 - 3), (2**31 - 1, 12345)):
            ref = ops.sample_t(seed, 9, n_steps, sample_offset=offset, backend="reference")
            out = ops.sample_t(seed, 9, n_steps, sample_offset=offset, device=device, backend=backend)
            assert out.dtype == torch.int64
            torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


class TinyEps(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, t):
        return self.lin(x.flatten(1)).view_as(x) * (1 + t.view(-1, 1, 1, 1).to(x.dtype) / N_STEPS)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_loss_and_sampling_loop_same_seed_same_result(backend, dtype):
    device = device_for(backend)
    x0 = _randn(SHAPE, dtype, "contiguous", 6)
    results = {}
    for name, dev in (("reference", torch.device("cpu")), (backend, device)):
        torch.manual_seed(0)
        model = TinyEps(x0[0].numel()).to(dev, dtype)
        diffusion = fastddpm.DenoiseDiffusion(model, N_STEPS, backend=name)
        gen = torch.Generator(dev).manual_seed(8)
        loss = diffusion.loss(x0.to(dev), generator=gen, reduction="none", sample_offset=4)
        loss.mean().backward()
        x = x0.to(dev)
        with torch.no_grad():
            for t in (N_STEPS - 1, N_STEPS // 2, 0):  # a few reverse steps, each its own seed
                x = diffusion.p_sample(x, t, generator=gen)
        results[name] = (loss.detach().cpu(), model.lin.weight.grad.cpu(), x.cpu())
    (loss_ref, grad_ref, x_ref), (loss, grad, x) = results["reference"], results[backend]
    cross_device = device.type != "cpu"
    torch.testing.assert_close(loss, loss_ref, **mse_tol(dtype, drawn=True, cross_device=cross_device))
    torch.testing.assert_close(grad, grad_ref, **mse_tol(dtype, drawn=True, cross_device=cross_device))
    # Three steps compound the noise differences: each step's output moves by its sigma * dz.
    step = tol(dtype, drawn=True, cross_device=cross_device)
    torch.testing.assert_close(x, x_ref, rtol=step["rtol"], atol=3 * step["atol"])
