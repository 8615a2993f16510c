"""Transformer denoiser: the action chunk's steps are tokens that attend to each other and to two condition
tokens (diffusion step / flow time, encoded observation history). Same call signature as `ConditionalUnet1D`.
"""

from __future__ import annotations

import torch
from torch import nn

from robopolicy.policies.unet1d import timestep_embedder


class TransformerDenoiser(nn.Module):
    def __init__(self, action_dim: int, global_cond_dim: int, horizon: int, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.action_in = nn.Linear(action_dim, d_model)
        self.step_embedder = timestep_embedder(d_model)
        self.cond_in = nn.Linear(global_cond_dim, d_model)
        # Learned positions for the 2 condition tokens followed by the horizon action tokens.
        self.position = nn.Parameter(torch.zeros(1, horizon + 2, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.action_out = nn.Linear(d_model, action_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        # sample [B, H, A], timestep [B], global_cond [B, F] -> [B, H, A]
        cond_tokens = torch.stack([self.step_embedder(timestep), self.cond_in(global_cond)], dim=1)  # [B, 2, D]
        tokens = torch.cat([cond_tokens, self.action_in(sample)], dim=1) + self.position
        out = self.norm(self.blocks(tokens))
        return self.action_out(out[:, 2:])
