"""World-size and batch-split invariance.

The counter-based noise of a sample depends only on (seed, global sample index, element), and
``loss`` draws one seed per call from the torch generator. So two DDP ranks on half batches,
each with the default ``sample_offset = rank * local_batch``, must train exactly like one
process on the whole batch, and two half batches with the right offsets must give the
per-sample losses of one batch.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastddpm
from helpers import cpu_backends

WORLD = 2
BATCH = 6  # global; 3 per rank, odd on purpose
SHAPE = (2, 3, 5)  # 30 elements per sample: not a multiple of Philox's 4 lanes
N_STEPS = 50
STEPS = 3
LR = 0.1


class TinyEps(nn.Module):
    """Per-sample eps model (no batch statistics), so its output for a sample ignores the rest."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.temb = nn.Linear(1, d)

    def forward(self, x, t):
        h = self.lin(x.flatten(1)) + self.temb(t.to(x.dtype).unsqueeze(1) / N_STEPS)
        return h.view_as(x)


def _init_model():
    torch.manual_seed(0)
    return TinyEps(math.prod(SHAPE))


def _data():
    g = torch.Generator().manual_seed(1234)
    return torch.randn((BATCH,) + SHAPE, generator=g)


def _train(backend, x0, wrap=None):
    """STEPS of SGD on loss(x0) from a fixed init; returns the final parameters."""
    model = _init_model()
    net = wrap(model) if wrap else model
    diffusion = fastddpm.DenoiseDiffusion(net, N_STEPS, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(1)  # every rank seeds alike, so every loss call draws the same seed
    for _ in range(STEPS):
        opt.zero_grad()
        diffusion.loss(x0).backward()  # sample_offset None: rank * local batch under DDP
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, store_path, out_dir, backends):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # two processes share the cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        local = BATCH // WORLD
        shard = _data()[rank * local:(rank + 1) * local]
        results = {b: _train(b, shard, wrap=DistributedDataParallel) for b in backends}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path):
    backends = cpu_backends()
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), backends), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x0 = _data()
    for backend in backends:
        single = _train(backend, x0)
        start = _init_model().state_dict()
        assert not any(torch.equal(single[k], start[k]) for k in single), "training did not move"
        for r, result in enumerate(ranks):
            got = result[backend]
            assert got.keys() == single.keys()
            for k in single:
                torch.testing.assert_close(got[k], single[k], rtol=0, atol=1e-5,
                                           msg=lambda m: f"{backend}, rank {r}, {k}: {m}")


def test_default_offset_is_rank_times_local_batch(monkeypatch):
    # Without spawning: fake an initialised process group of rank 1 and check the noise that
    # q_sample draws is the second half of the whole batch's.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    diffusion = fastddpm.DenoiseDiffusion(_init_model(), N_STEPS, backend="reference")
    x0 = torch.zeros((BATCH,) + SHAPE)
    t = torch.full((BATCH,), N_STEPS - 1)
    whole = diffusion.q_sample(x0, t, generator=torch.Generator().manual_seed(3), sample_offset=0)
    half = diffusion.q_sample(x0[3:], t[3:], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(half, whole[3:], rtol=0, atol=0)
    explicit = diffusion.q_sample(x0[3:], t[3:], generator=torch.Generator().manual_seed(3), sample_offset=0)
    torch.testing.assert_close(explicit, whole[:3], rtol=0, atol=0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_split_gives_same_per_sample_loss(backend, dtype):
    x0 = torch.randn((7,) + SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)
    diffusion = fastddpm.DenoiseDiffusion(_init_model().to(dtype), N_STEPS, backend=backend)

    def loss(x, offset):
        return diffusion.loss(x, generator=torch.Generator().manual_seed(11), reduction="none",
                              sample_offset=offset)

    whole = loss(x0, 0)
    parts = torch.cat([loss(x0[:2], 0), loss(x0[2:5], 2), loss(x0[5:], 5)])
    # The same arithmetic per sample; only the model's matmul sees another batch size.
    torch.testing.assert_close(parts, whole)
    # And the split really is needed: the second half at offset 0 draws other noise and steps.
    assert not torch.allclose(loss(x0[2:5], 0), whole[2:5])
