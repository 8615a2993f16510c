"""1-D temporal conditional U-Net denoiser (Chi et al., diffusion_policy `ConditionalUnet1D`).

Convolves over the action chunk's time axis; every residual block is FiLM-conditioned on
[sinusoidal embedding of the diffusion step / flow time, encoded observation history].
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1)),
                             persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, dim]
        angles = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def timestep_embedder(dim: int) -> nn.Sequential:
    return nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))


class Conv1dBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks; the condition predicts a per-channel scale and bias (FiLM) between them."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.shortcut = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, T], cond: [B, cond_dim]
        scale, bias = rearrange(self.film(cond), "b (two c) -> two b c 1", two=2)
        out = self.conv1(x) * scale + bias
        return self.conv2(out) + self.shortcut(x)


class ConditionalUnet1D(nn.Module):
    """Predicts epsilon (diffusion) or velocity (flow) for an action chunk [B, H, A].

    The horizon must be divisible by 2 ** (len(down_dims) - 1).
    """

    def __init__(self, action_dim: int, global_cond_dim: int, down_dims: list[int], kernel_size: int = 5,
                 n_groups: int = 8, step_embed_dim: int = 64):
        super().__init__()
        self.step_embedder = timestep_embedder(step_embed_dim)
        cond_dim = step_embed_dim + global_cond_dim
        widths = [action_dim, *down_dims]

        def block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(c_in, c_out, cond_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        for level, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            is_last = level == len(down_dims) - 1
            self.down.append(nn.ModuleList([
                block(c_in, c_out), block(c_out, c_out),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if not is_last else nn.Identity(),
            ]))
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        for c_out, c_in in reversed(list(zip(down_dims[:-1], down_dims[1:]))):
            self.up.append(nn.ModuleList([
                block(c_in * 2, c_out), block(c_out, c_out),
                nn.ConvTranspose1d(c_out, c_out, 4, stride=2, padding=1),
            ]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        # sample [B, H, A], timestep [B], global_cond [B, F] -> [B, H, A]
        cond = torch.cat([self.step_embedder(timestep), global_cond], dim=-1)
        x = rearrange(sample, "b h a -> b a h")
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        # As in Chi et al.: the deepest skip joins the mid output (same length, no downsampling there) and the
        # full-resolution skip of the first level is left unused.
        for res1, res2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, cond), cond))
        return rearrange(self.final(x), "b a h -> b h a")
