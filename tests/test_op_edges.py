"""Edge cases of the compiled ops' host code and fake kernels, each once a crash, a wrong answer
or a needless refusal: empty batches with an explicit noise or target, tensors on the "meta"
device next to real ones, strided per-t tables, and one torch.compile graph for every batch size.
"""
import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import _extension, ops, schedule
from backends_under_test import device_for

assert _extension.load() is not None, f"fastddpm._C is not built or failed to load: {_extension.error()}"
F = torch.ops.fastddpm
N_STEPS = 10
BACKENDS = ("cpu", "triton", "reference")


def _tables(dtype=torch.float32):
    tabs = schedule.coefficient_tables(schedule.linear(N_STEPS))
    return {k: v.to(dtype) for k, v in tabs.items()}


# ---- empty batches with the noise / target given (the host code once read a seed never given) -----

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_with_explicit_noise_or_target(backend):
    device = device_for(backend)
    tabs = {k: v.to(device) for k, v in _tables().items()}
    zeros = torch.zeros(0, 3, device=device)
    d = fastddpm.DenoiseDiffusion(lambda x, t: x, N_STEPS, backend=backend).to(device)
    assert d.q_sample(zeros, 0, zeros).shape == (0, 3)
    assert d.p_sample(zeros, 0, zeros).shape == (0, 3)
    assert d.loss(zeros, zeros, reduction="none").shape == (0,)

    m = ops.mse_per_sample(torch.zeros(0, 5, device=device), torch.zeros(0, 5, device=device), backend=backend)
    assert m.shape == (0,) and m.dtype == torch.float32
    # A batch of samples with no elements.
    x = torch.zeros(2, 0, device=device)
    t = torch.tensor([1, 2], device=device)
    out = ops.p_sample_step(x, x, t, tabs["c1"], tabs["c2"], tabs["sigma"], x, backend=backend)
    assert out.shape == (2, 0)
    assert ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], x, backend=backend).shape == (2, 0)

    # Backward through the empty ops gives empty gradients.
    pred = torch.zeros(0, 4, device=device, requires_grad=True)
    target = torch.zeros(0, 4, device=device, requires_grad=True)
    ops.mse_per_sample(pred, target, backend=backend).sum().backward()
    assert pred.grad.shape == (0, 4) and target.grad.shape == (0, 4)


def test_empty_batch_raw_ops_with_noise_and_no_seed():
    # The raw C++ ops, with the seed None as it is when the noise is given.
    tabs = _tables()
    x = torch.zeros(0, 3)
    t = torch.zeros(0, dtype=torch.int64)
    assert F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], x, None, 0).shape == (0, 3)
    assert F.p_sample_step(x, x, t, tabs["c1"], tabs["c2"], tabs["sigma"], x, None, 0).shape == (0, 3)
    assert F.mse_per_sample(x, x, None, 0).shape == (0,)
    assert F.mse_per_sample_backward(torch.zeros(0), x, x, None, 0).shape == (0, 3)
    x20 = torch.zeros(2, 0)
    t2 = torch.zeros(2, dtype=torch.int64)
    assert F.p_sample_step(x20, x20, t2, tabs["c1"], tabs["c2"], tabs["sigma"], x20, None, 0).shape == (2, 0)
    # Without the seed and without noise it stays a clear error, also for an empty batch.
    with pytest.raises(RuntimeError, match="seed is required when noise is None"):
        F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], None, None, 0)


# ---- a tensor on "meta" next to real ones: the dispatcher picks the fake kernel -------------------

def _meta_cases():
    tabs = _tables()
    x = torch.randn(2, 3)
    t = torch.zeros(2, dtype=torch.int64)
    seed = torch.tensor([5])
    grad = torch.ones(2)
    q = dict(x0=x, t=t, sqrt_ab=tabs["sqrt_ab"], sqrt_1m_ab=tabs["sqrt_1m_ab"], noise=x, seed=seed)
    p = dict(x_t=x, eps_theta=x, t=t, c1=tabs["c1"], c2=tabs["c2"], sigma=tabs["sigma"], noise=x, seed=seed)
    m = dict(pred=x, target=x, seed=seed)
    b = dict(grad=grad, pred=x, target=x, seed=seed)
    return [(F.q_sample, q, "x0"), (F.p_sample_step, p, "x_t"), (F.mse_per_sample, m, "pred"),
            (F.mse_per_sample_backward, b, "pred")]


@pytest.mark.parametrize("case", range(4), ids=["q_sample", "p_sample_step", "mse_per_sample",
                                                "mse_per_sample_backward"])
def test_a_tensor_on_meta_beside_cpu_data_is_an_error_naming_it(case):
    op, args, data_name = _meta_cases()[case]
    for name in args:
        moved = {k: (v.to("meta") if k == name else v) for k, v in args.items()}
        values = list(moved.values()) + [0]  # sample_offset
        if name == data_name:  # then every other tensor is the odd one out; the first is named
            first = next(k for k in args if k != data_name)
            match = f"{first} is on cpu but {data_name} is on meta"
        else:
            match = f"{name} is on meta but {data_name} is on cpu"
        with pytest.raises(RuntimeError, match=match):
            op(*values)


def test_all_meta_still_gives_shapes():
    # The fake kernels keep working where every tensor is on one device (here "meta").
    tabs = {k: v.to("meta") for k, v in _tables().items()}
    x = torch.empty(2, 3, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    out = F.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], x, None, 0)
    assert out.shape == (2, 3) and out.device.type == "meta"


# ---- strided per-t tables are accepted, as the reference accepts them ---------------------------

def test_strided_tables_match_reference():
    gen = torch.Generator().manual_seed(1)
    tabs = {k: torch.stack([v, torch.full_like(v, float("nan"))], 1)[:, 0] for k, v in _tables().items()}
    assert not tabs["sqrt_ab"].is_contiguous()
    x = torch.randn(3, 4, 5, generator=gen)
    e = torch.randn(3, 4, 5, generator=gen)
    t = torch.tensor([0, 9, 4])
    for noise in (None, e):
        got, expect = (ops.q_sample(x, t, tabs["sqrt_ab"], tabs["sqrt_1m_ab"], noise, seed=2, backend=b)
                       for b in ("cpu", "reference"))
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
        got, expect = (ops.p_sample_step(x, e, t, tabs["c1"], tabs["c2"], tabs["sigma"], noise, seed=3, backend=b)
                       for b in ("cpu", "reference"))
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)


# ---- sample_t's batch is symbolic: one compiled graph for every batch size ------------------------

def test_sample_t_batch_is_a_symint_in_both_schemas():
    import fastddpm.backends.triton.ops  # noqa: F401  registers torch.ops.fastddpm_triton
    for schema in (F.sample_t.default._schema, torch.ops.fastddpm_triton.sample_t.default._schema):
        assert "SymInt batch" in str(schema), schema


class _OneParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.6))

    def forward(self, x, t):
        return self.w * x + 0.01 * t.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))


def test_loss_compiles_once_for_every_batch_size():
    torch._dynamo.reset()
    d = fastddpm.DenoiseDiffusion(_OneParam(), N_STEPS, backend="cpu")

    def step(x0):
        return d.loss(x0)  # t drawn by sample_t for the batch

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(4)
    for i, batch in enumerate((3, 5, 7, 9, 11)):
        x0 = torch.randn(batch, 2, 4, generator=gen)  # no other size equals a batch
        results = []
        for fn in (step, compiled):
            torch.manual_seed(batch)
            if fn is compiled and i > 0:  # a recompile for a new batch size fails the test
                with torch.compiler.set_stance("fail_on_recompile"):
                    loss = fn(x0)
            else:
                loss = fn(x0)
            (gw,) = torch.autograd.grad(loss, d.eps_model.w)
            results.append((loss, gw))
        torch.testing.assert_close(results[1], results[0])
