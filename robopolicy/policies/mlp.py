"""Behaviour-cloning baseline: an MLP regresses the whole normalized action chunk from the encoded observation
history (L1 or MSE). Unimodal by construction: on multimodal demonstrations it averages the modes, which is
what the generative policies are compared against.

`sample_chunk` accepts `noise` and ignores it, so every caller can use one runtime for all policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import nn

from robopolicy.config import register_config, setting
from robopolicy.policies.base import ActionChunkPolicy, PolicyConfig


@register_config("policy", "mlp")
@dataclass
class MLPConfig(PolicyConfig):
    name: str = setting("mlp", "the policy (its registry name)")
    hidden_dims: list[int] = setting([256, 256], "hidden layer widths")
    loss_type: str = setting("l1", "l1 | mse", choices=("l1", "mse"))


class MLPPolicy(ActionChunkPolicy):
    name = "mlp"
    config_class = MLPConfig

    def __init__(self, config: MLPConfig, features: Mapping[str, Mapping],
                 stats: Mapping[str, Mapping[str, np.ndarray]] | None):
        super().__init__(config, features, stats)
        widths = [self.obs_encoder.out_dim, *config.hidden_dims]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.LayerNorm(w_out), nn.Mish()]
        layers.append(nn.Linear(widths[-1], self.horizon * self.action_dim))
        self.head = nn.Sequential(*layers)
        self.loss_type = config.loss_type

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Normalized action chunk [B, H, A] from observation features [B, F]."""
        return rearrange(self.head(features), "b (h a) -> b h a", h=self.horizon)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        features, penalty = self.encode_for_loss(batch)
        error = self.predict(features) - self.normalized_actions(batch)
        loss = self.masked_mean(error.abs() if self.loss_type == "l1" else error ** 2, batch)
        return loss + penalty, {"loss": loss.item(), "encoder_penalty": penalty.item()}

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        return self.sample_from_features(self.encode(obs), noise, prefix_actions)

    @torch.no_grad()
    def sample_from_features(self, global_cond: torch.Tensor, noise: torch.Tensor | None = None,
                             prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        del noise  # deterministic regression: accepted for a uniform runtime, not used
        self.check_prefix(prefix_actions)
        return self.unnormalize_actions(self.predict(global_cond))
