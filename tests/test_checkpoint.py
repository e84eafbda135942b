"""Checkpoint and resume.

Training steps draw the data and each ``loss`` call's seed from the torch generator, so a
checkpoint after step k holding the model, the optimizer and the generator state must resume
into exactly (bit for bit) the parameters of an uninterrupted run at step n: the same
arithmetic runs on the same values in the same order.
"""
import pytest
import torch
from torch import nn

import fastddpm
from helpers import cpu_backends

N_STEPS = 30
SHAPE = (5, 3, 3, 3)  # 27 elements per sample
K, N = 3, 6


class TinyEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(27, 27)

    def forward(self, x, t):
        return self.lin(x.flatten(1)).view_as(x) * (1 + t.view(-1, 1, 1, 1).to(x.dtype) / N_STEPS)


class Run:
    """Model, Adam (stateful) and the generator the steps draw from ("global" or their own)."""

    def __init__(self, backend, rng, init_seed=0):
        torch.manual_seed(init_seed)
        self.model = TinyEps()
        self.diffusion = fastddpm.DenoiseDiffusion(self.model, N_STEPS, backend=backend)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.gen = torch.Generator().manual_seed(init_seed + 1) if rng == "generator" else None
        torch.manual_seed(init_seed + 1)

    def steps(self, n):
        for _ in range(n):
            x0 = torch.randn(SHAPE, generator=self.gen)
            self.opt.zero_grad()
            self.diffusion.loss(x0, generator=self.gen).backward()
            self.opt.step()

    def rng_state(self):
        return self.gen.get_state() if self.gen is not None else torch.get_rng_state()

    def set_rng_state(self, state):
        (self.gen.set_state if self.gen is not None else torch.set_rng_state)(state)

    def params(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("rng", ["global", "generator"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_resume_matches_uninterrupted_run(backend, rng, tmp_path):
    whole = Run(backend, rng)
    whole.steps(N)

    first = Run(backend, rng)
    first.steps(K)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.model.state_dict(), "opt": first.opt.state_dict(),
                "rng": first.rng_state()}, path)
    del first

    ckpt = torch.load(path, weights_only=True)
    resumed = Run(backend, rng, init_seed=99)  # other weights and RNG until the load
    resumed.model.load_state_dict(ckpt["model"])
    resumed.opt.load_state_dict(ckpt["opt"])
    resumed.set_rng_state(ckpt["rng"])
    resumed.steps(N - K)
    _assert_equal(resumed.params(), whole.params())
    assert resumed.opt.state_dict()["state"][0]["step"] == N


@pytest.mark.parametrize("backend", cpu_backends())
def test_resume_without_rng_state_differs(backend):
    # The check above has teeth: the generator state decides the data, seeds and timesteps.
    whole = Run(backend, "global")
    whole.steps(K + 1)
    resumed = Run(backend, "global")
    resumed.steps(K)
    torch.manual_seed(12345)  # a resume that forgot the RNG state
    resumed.steps(1)
    a, b = resumed.params(), whole.params()
    assert not any(torch.equal(a[k], b[k]) for k in a)
