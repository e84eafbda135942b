"""The demo's throughput comparison: short training bursts on each fused backend and on the
reference backend, same model and batch, timed with the shared harness (the backends take
turns, one step each, and the figures are medians: a machine shared with other work slows every
backend alike instead of whichever happened to run during a spike)."""
import functools

import torch

from ... import backends
from ...diffusion import DenoiseDiffusion
from .. import timing
from ..scale_model import ScaleModel
from .train import Trainer, sync

FUSED_BACKENDS = backends.KERNEL_BACKENDS
WARMUP = 2


def fused_backends(device: torch.device) -> list:
    """The fused (non-reference) backends that can run on ``device`` in this process."""
    names = []
    for name in FUSED_BACKENDS:
        if name == "triton" and device.type == "cpu":
            continue  # Triton's interpreter (TRITON_INTERPRET=1) checks kernels; it is not fast
        try:
            backends.resolve(name, device)
        except backends.BackendUnavailableError:
            continue
        names.append(name)
    return names


def fused_unavailable_reason() -> str:
    return "; ".join(f"{n}: {backends.status(n)[1]}" for n in FUSED_BACKENDS)


def _ops_step(diffusion, x0, gen):
    diffusion.loss(x0, generator=gen, sample_offset=0).backward()


def time_bursts(cfg, device, names, init_state, train_x, rank, world) -> dict:
    """Training steps per second on each backend in ``names``, and the diffusion ops' own cost:
    the same loss calls with a free eps-model (:class:`ScaleModel`)."""
    trainers = [Trainer(cfg, device, n, init_state, train_x, rank, world) for n in names]
    ops_only = [DenoiseDiffusion(ScaleModel().to(device), cfg.n_steps, device, backend=n) for n in names]
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x0 = train_x[:cfg.batch_size // world]
    fns = [tr.step for tr in trainers] + [functools.partial(_ops_step, d, x0, gen) for d in ops_only]
    samples = timing.time_interleaved(fns, warmup=WARMUP, min_time=0.0, min_rounds=cfg.burst_steps,
                                      max_rounds=cfg.burst_steps, sync=functools.partial(sync, device))
    out = {}
    for n, step_times, ops_times in zip(names, samples[:len(names)], samples[len(names):]):
        step_s = timing.median(step_times)
        out[n] = {"backend": n, "steps": len(step_times), "train_steps_per_s": 1.0 / step_s,
                  "train_samples_per_s": cfg.batch_size / step_s, "step_spread": timing.spread(step_times),
                  "diffusion_ops_ms_per_step": 1e3 * timing.median(ops_times)}
    return out


def burst_lines(bursts, fused):
    lines = ["training throughput (same model and batch, medians of interleaved steps in this run):"]
    for name, b in bursts.items():
        if isinstance(b, dict):
            lines.append(f"  {name:>9}: {b['train_steps_per_s']:7.1f} steps/s ({b['train_samples_per_s']:8.0f} "
                         f"samples/s, spread {b['step_spread']:.0%}); diffusion ops alone "
                         f"{b['diffusion_ops_ms_per_step']:.3f} ms/step")
    if not fused:
        lines.append(f"  no fused backend here ({bursts['fused_unavailable']})")
    return lines
