"""Training: the demo's schedule, the training loop shared by the timed bursts and the main
run, and the smoothed loss shown in the progress bar and the loss plot."""
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ... import schedule
from ...diffusion import DenoiseDiffusion
from .config import DemoConfig, DemoError
from .model import TinyUNet

LOSS_SMOOTHING = 0.95  # exponential moving average shown in the progress bar and the plot


def scaled_linear_betas(n_steps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule stretched to ``n_steps`` so alpha_bar at T stays near 4e-5.

    For n_steps = 1000 it is exactly the seed's ``linspace(1e-4, 0.02)``; shorter chains take
    proportionally larger steps (Nichol & Dhariwal 2021) so x_T is still close to pure noise.
    """
    scale = 1000.0 / n_steps
    return schedule.linear(n_steps, 1e-4 * scale, min(0.02 * scale, 0.999))


def make_diffusion(model, cfg: DemoConfig, device, backend: str) -> DenoiseDiffusion:
    """The demo's DenoiseDiffusion: the same schedule for training and sampling."""
    return DenoiseDiffusion(model, cfg.n_steps, device, schedule=scaled_linear_betas(cfg.n_steps), backend=backend)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """The training loop shared by the timed bursts and the main run."""

    def __init__(self, cfg: DemoConfig, device, backend: str, init_state: dict, train_x: torch.Tensor,
                 rank: int, world: int):
        self.model = TinyUNet(1, cfg.width).to(device)
        self.model.load_state_dict(init_state)
        wrapped = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.diffusion = make_diffusion(wrapped, cfg, device, backend)
        # torch's own EMA of the weights, updated after every optimiser step; sampled beside them
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(cfg.steps, 1))
        self.train_x, self.rank, self.world = train_x, rank, world
        self.local = cfg.batch_size // world
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same on every rank
        self.noise_gen = torch.Generator(device).manual_seed(cfg.seed + 2)

    def step(self) -> torch.Tensor:
        """One optimiser step; returns the loss averaged over the global batch (detached)."""
        idx = torch.randperm(len(self.train_x), generator=self.data_gen)[:self.local * self.world]
        x0 = self.train_x[idx[self.rank * self.local:(self.rank + 1) * self.local]]
        loss = self.diffusion.loss(x0, generator=self.noise_gen)  # sample_offset: rank * local
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update_parameters(self.model)
        self.sched.step()
        loss = loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(loss)
            loss = loss / self.world
        return loss


class LossAverage:
    """Exponential moving average of the loss, bias-corrected as in Adam so early steps are not
    dragged toward zero-initialised history; shown in the progress bar and the loss plot."""

    def __init__(self, decay: float = LOSS_SMOOTHING):
        self.decay, self.value, self.count = decay, 0.0, 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.value = self.decay * self.value + (1 - self.decay) * loss
        return self.value / (1 - self.decay ** self.count)


def train(trainer: Trainer, cfg: DemoConfig, progress: bool) -> list:
    from tqdm.auto import tqdm

    losses, average = [], LossAverage()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        loss = float(trainer.step())
        if not np.isfinite(loss):
            raise DemoError(f"the training loss became {loss} at step {len(losses)}; try a smaller --lr")
        losses.append(loss)
        bar.set_postfix(loss=f"{average.update(loss):.4f}", refresh=False)
    return losses
