"""The demo's options (:class:`DemoConfig`), the --smoke preset, and their checks."""
from dataclasses import dataclass


class DemoError(Exception):
    """A bad option or environment; the message says what to do. The CLI exits with 2."""


@dataclass
class DemoConfig:
    steps: int = 1200
    batch_size: int = 128  # global: split over the ranks under torchrun
    n_steps: int = 1000
    width: int = 24
    lr: float = 2e-3
    sample_count: int = 100
    burst_steps: int = 20
    ddim_steps: int = 50  # DDIM (eta = 0) steps, sampled beside the full DDPM chain of n_steps
    dpm_steps: int = 20  # DPM-Solver++ 2M steps, sampled beside them
    # The weights' exponential moving average: 1 / (1 - 0.995) = 200 steps, the last sixth of
    # the default 1200, where the cosine learning rate is small; half of its weight lies on the
    # last 138 steps, so a few hundred steps of training already leave the start behind.
    ema_decay: float = 0.995
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    out: str = "fastddpm-demo"
    progress: bool = True


# Fields --smoke changes (tests and a quick look): seconds instead of minutes.
SMOKE = dict(steps=6, batch_size=32, n_steps=20, width=8, sample_count=24, burst_steps=2, ddim_steps=5,
             dpm_steps=4)


def check_config(cfg: DemoConfig):
    for field in ("steps", "batch_size", "n_steps", "width", "sample_count", "burst_steps", "ddim_steps",
                  "dpm_steps"):
        if getattr(cfg, field) < 1:
            raise DemoError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(cfg, field)}")
    if cfg.width % 2:
        raise DemoError(f"--width must be even (the timestep embedding is sin/cos pairs), got {cfg.width}")
    if cfg.sample_count < 2:
        raise DemoError(f"--sample-count must be >= 2 to score the samples, got {cfg.sample_count}")
    if cfg.ddim_steps > cfg.n_steps:
        raise DemoError(f"--ddim-steps must be at most --n-steps ({cfg.n_steps}), got {cfg.ddim_steps}")
    if cfg.dpm_steps > cfg.n_steps:
        raise DemoError(f"--dpm-steps must be at most --n-steps ({cfg.n_steps}), got {cfg.dpm_steps}")
    if not 0 <= cfg.ema_decay < 1:
        raise DemoError(f"--ema-decay must lie in [0, 1), got {cfg.ema_decay}")
    if not cfg.lr > 0:
        raise DemoError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.seed < 2**63:
        raise DemoError(f"--seed must lie in [0, 2**63), got {cfg.seed}")
