"""Training stores no noise.

``loss(x0)`` with ``noise=None`` is recorded with ``torch.autograd.graph.saved_tensors_hooks``.
The model runs under its own (identity) hooks, so only what the diffusion ops save is seen.
Each saved tensor is then sorted by its storage:

* alias: the storage of a tensor that lives anyway while training -- ``x0``, the model output
  ``pred``, a parameter or buffer, or a per-t coefficient table of the diffusion. Saving it
  costs no memory.
* new: any other storage, i.e. one allocated by the diffusion step itself. Its full storage
  size is counted once (several saved views of one storage count once).

A fused backend that regenerates its noise (triton, cuda: the GPU, where memory is dear) saves
``t`` (the int64 step per sample, drawn inside ``loss``) and the 8-byte seed: at most
``8 * B + 8`` new bytes. The cpu backend draws the noise once for float32/float64 data and keeps
that one tensor for the backward (``materialises_noise``: on a CPU a normal costs more than a
memory pass); for half types it regenerates like the GPU backends. Where its reduced MSE takes
the loss (float32/float64, an eps or x0 target, x0 not requiring grad: ``mse_loss``'s forward
writes d/dpred in the same pass) it saves that gradient instead, one tensor of pred's size, and
nothing of the noise. The reference backend's MSE is PyTorch autograd, which
saves ``pred - noise``: a noise-sized tensor, ``4 * D`` bytes or more per sample.

``python tests/test_saved_tensors.py`` prints both figures for a CIFAR-sized batch.
"""
import os
import sys

if __name__ == "__main__":  # before Triton is imported, as tests/conftest.py does under pytest
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from torch import nn

import fastddpm
from helpers import device_for, kernel_backends

N_STEPS = 100
SHAPE = (5, 3, 7, 9)  # B = 5, D = 189: odd on purpose


class TinyEps(nn.Module):
    """A per-sample eps model whose own saved tensors are hidden from the outer hooks."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.outputs = []  # the model outputs of the last call(s): pred, for the alias check

    def forward(self, x, t):
        with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
            pred = self.lin(x.flatten(1)).view_as(x) + t.view((-1,) + (1,) * (x.dim() - 1)) / N_STEPS
        self.outputs.append(pred)
        return pred


def measure_saved(backend, shape, dtype, device="cpu", x0_grad=False, prediction="eps"):
    """(new_bytes, alias_bytes, new_descriptions) that the diffusion ops of ``loss(x0)`` save for backward."""
    torch.manual_seed(0)
    model = TinyEps(int(torch.Size(shape[1:]).numel())).to(device, dtype)
    diffusion = fastddpm.DenoiseDiffusion(model, N_STEPS, backend=backend, prediction=prediction)
    x0 = torch.randn(shape, device=device, dtype=dtype).requires_grad_(x0_grad)
    saved = []  # references keep each storage alive, so no pointer is reused meanwhile

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = diffusion.loss(x0, generator=torch.Generator(device).manual_seed(1))
    loss.backward()  # what was saved must be enough for backward
    assert model.lin.weight.grad is not None and torch.isfinite(model.lin.weight.grad).all()

    live = [x0, *model.outputs, *model.parameters(), *diffusion.buffers()]
    live += [tab for tables in diffusion._tables.values() for tab in tables.values()]
    live_ptrs = {t.untyped_storage().data_ptr() for t in live}
    new, alias = {}, {}
    for t in saved:
        storage = t.untyped_storage()
        kind = alias if storage.data_ptr() in live_ptrs else new
        kind[storage.data_ptr()] = (storage.nbytes(), f"{t.dtype} {tuple(t.shape)}")
    return sum(n for n, _ in new.values()), sum(n for n, _ in alias.values()), [d for _, d in new.values()]


def fuses_grad(backend, dtype, prediction="eps", x0_grad=False):
    """Whether ``loss`` takes the cpu backend's mse_loss that makes d/dpred in its forward."""
    return backend == "cpu" and dtype in (torch.float32, torch.float64) and prediction != "v" and not x0_grad


def new_bytes_allowed(backend, dtype, shape, target_uses_noise=True, fused_grad=False):
    """(least, most) new bytes a fused loss may save: ``t`` and the 8-byte seed; plus, where the
    backend draws the noise once and keeps it for the MSE's backward (the cpu backend: cheaper
    on a CPU than regenerating it), exactly one noise-sized tensor in the data's dtype when the
    target is made from the noise. With ``fused_grad`` exactly d/dpred, one tensor of pred's size."""
    batch, d = shape[0], torch.Size(shape[1:]).numel()
    if fused_grad:
        return batch * d * dtype.itemsize, batch * d * dtype.itemsize
    if target_uses_noise and fastddpm.backends.get(backend).materialises_noise(dtype):
        noise_bytes = batch * d * dtype.itemsize
        return noise_bytes, noise_bytes + 8 * batch + 8
    return 0, 8 * batch + 8


@pytest.mark.parametrize("x0_grad", [False, True], ids=["x0_data", "x0_requires_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", kernel_backends())
def test_fused_loss_saves_no_noise(backend, dtype, x0_grad):
    # x0 requiring grad (say, an encoder trained through the loss) makes q_sample save t too.
    new, alias, what = measure_saved(backend, SHAPE, dtype, device_for(backend), x0_grad)
    batch, d = SHAPE[0], torch.Size(SHAPE[1:]).numel()
    lo, hi = new_bytes_allowed(backend, dtype, SHAPE, fused_grad=fuses_grad(backend, dtype, x0_grad=x0_grad))
    assert lo <= new <= hi, f"{backend} saved {new} new bytes for {batch} samples of {d} elements: {what}"
    # pred is saved (the MSE's backward needs it) but only as an alias of the model output.
    assert alias >= batch * d * dtype.itemsize


# Not the half types: materialised noise would be rounded to the data's dtype (the kernels draw
# float32 normals), which is why materialises_noise is False for them.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b in ("cpu", "triton")])
def test_materialised_and_regenerated_noise_give_the_same_loss_and_gradients(monkeypatch, backend, dtype):
    """Where the noise is generated changes memory and speed, never the values: the loss and
    the gradients of the model are bit for bit the same either way."""
    device = device_for(backend)
    mod = fastddpm.backends.get(backend)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    results = []
    for materialise in (False, True):
        monkeypatch.setattr(mod, "materialises_noise", lambda _dtype, m=materialise: m)
        torch.manual_seed(0)  # the same weights both times
        model = TinyEps(torch.Size(SHAPE[1:]).numel()).to(device, dtype)
        diffusion = fastddpm.DenoiseDiffusion(model, N_STEPS, backend=backend)
        loss = diffusion.loss(x0, generator=torch.Generator(device).manual_seed(11))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1), (l0, l1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_loss_saves_a_noise_sized_tensor(dtype):
    # The contrast the fused ops remove, and a check that the measurement sees such a tensor.
    new, _, _ = measure_saved("reference", SHAPE, dtype)
    batch, d = SHAPE[0], torch.Size(SHAPE[1:]).numel()
    assert new >= batch * d * 4  # pred - noise, in float32 (the compute dtype)


if __name__ == "__main__":
    shape = tuple(int(s) for s in sys.argv[1].split("x")) if len(sys.argv) > 1 else (64, 3, 32, 32)
    print(f"loss(x0) with noise=None, x0 {'x'.join(map(str, shape))} float32: bytes saved by the diffusion ops")
    print(f"{'backend':<10} {'new':>12} {'new/sample':>11} {'alias (pred...)':>16}")
    for backend in ["reference"] + kernel_backends():
        try:
            new, alias, _ = measure_saved(backend, shape, torch.float32, device_for(backend))
        except BaseException as e:  # pytest.fail raises a BaseException
            print(f"{backend:<10} unavailable: {e}")
            continue
        print(f"{backend:<10} {new:>12} {new / shape[0]:>11.1f} {alias:>16}")
