"""Sampling: the full reverse process from pure noise."""
import torch

from .config import DemoConfig
from .train import make_diffusion


@torch.no_grad()
def sample(model, cfg: DemoConfig, device, backend, desc: str, progress: bool) -> torch.Tensor:
    """The full reverse process, t = n_steps-1 .. 0, from x_T ~ N(0, I); [count, 1, 8, 8]."""
    from tqdm.auto import tqdm

    model.eval()
    diffusion = make_diffusion(model, cfg, device, backend)
    gen = torch.Generator(device).manual_seed(cfg.seed + 3)
    x = torch.randn(cfg.sample_count, 1, 8, 8, device=device, generator=gen)
    for t in tqdm(range(cfg.n_steps - 1, -1, -1), desc=desc, unit="step", disable=not progress,
                  dynamic_ncols=True):
        x = diffusion.p_sample(x, t, generator=gen, sample_offset=0)
    return x.float().cpu()
