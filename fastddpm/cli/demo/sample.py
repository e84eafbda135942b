"""Sampling: the full DDPM chain and short DDIM and DPM-Solver++ runs, from the same seed, counting model calls."""
import time
from dataclasses import dataclass

import torch

from .config import DemoConfig
from .train import make_diffusion, sync

# (name, what make_sampler gets beside the step count, which DemoConfig field gives the steps).
# DDIM with eta = 0 is deterministic; "trailing" spacing starts it at t = n_steps - 1 as the
# DDPM chain does, from the same pure noise x_T (leading spacing would start it below T).
SAMPLERS = {
    "ddpm": (dict(kind="ddpm"), "n_steps"),
    "ddim": (dict(kind="ddim", eta=0.0, spacing="trailing"), "ddim_steps"),
    # DPM-Solver++ 2M (midpoint), diffusers' default solver and "linspace" spacing, which also
    # starts at t = n_steps - 1.
    "dpm": (dict(kind="dpm++", order=2, spacing="linspace"), "dpm_steps"),
}


@dataclass
class Samples:
    images: torch.Tensor  # [count, 1, 8, 8] on the CPU
    sampler: str
    steps: int
    model_calls: int
    wall_s: float


class _CountCalls(torch.nn.Module):
    """The eps-model, counting its calls: the figure that says how many steps really ran."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x, t):
        self.calls += 1
        return self.model(x, t)


def sample(model, cfg: DemoConfig, device, backend, sampler: str = "ddpm", progress: bool = False) -> Samples:
    """``cfg.sample_count`` digits from ``model`` by ``sampler`` ("ddpm": all n_steps, labml's
    sigma^2 = beta; "ddim": cfg.ddim_steps; "dpm": DPM-Solver++ in cfg.dpm_steps). x_T and the noise come from the seed cfg.seed + 3,
    so every model and sampler starts from the same x_T."""
    options, steps_field = SAMPLERS[sampler]
    model.eval()
    counted = _CountCalls(model)
    diffusion = make_diffusion(counted, cfg, device, backend)
    gen = torch.Generator(device).manual_seed(cfg.seed + 3)
    steps = getattr(cfg, steps_field)
    t0 = time.perf_counter()
    x = diffusion.sample((cfg.sample_count, 1, 8, 8), sampler=diffusion.sampler(steps=steps, **options),
                         generator=gen, sample_offset=0, progress=progress)
    sync(device)
    return Samples(x.float().cpu(), sampler, steps, counted.calls, time.perf_counter() - t0)


def sampler_options(sampler: str) -> dict:
    """What summary.json records of a sampler's configuration."""
    return dict(SAMPLERS[sampler][0])
