"""The demo's eps-model: a tiny UNet with a timestep embedding, sized for 8x8 images.

Two resolutions (8x8 and 4x4) are all an 8x8 digit needs; residual blocks add the timestep
embedding as a per-channel shift, as in Ho et al. (2020). Kept small so the demo trains in a
minute or two on two CPU cores.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [B] -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """eps_theta(x_t, t) for [B, channels, H, W] images with H and W even (8x8 in the demo)."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        t_dim = 4 * width
        self.width = width
        self.t_mlp = nn.Sequential(nn.Linear(width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = ResBlock(width, width, t_dim)
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * width, 2 * width, t_dim)
        self.mid2 = ResBlock(2 * width, 2 * width, t_dim)
        self.unpool = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.up = ResBlock(2 * width, width, t_dim)
        self.out_norm = _norm(width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        # A zero output layer starts the model at eps_theta = 0, a stable start for the MSE.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.t_mlp(timestep_embedding(t, self.width))
        h0 = self.down(self.inp(x), temb)
        h = self.mid2(self.mid1(self.pool(h0), temb), temb)
        h = self.up(torch.cat([self.unpool(h), h0], dim=1), temb)
        return self.out(F.silu(self.out_norm(h)))
