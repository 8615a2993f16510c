"""A compact latent world model in the style of TD-MPC2, conditioned on action chunks.

    encode(state)            -> z                 the current state (normalized) -> latent [B, L]
    next(z, chunk)           -> z' per member     an ensemble of dynamics heads, one step = one executed chunk of
                                                  `chunk_steps` env actions; their disagreement says how far
                                                  imagination can be trusted
    decode(z)                -> state history     the last `obs_steps` states (what a policy observes)
    reward(z, chunk)         -> summed env reward over the chunk
    success(z, chunk)        -> P(the task succeeds within the chunk)  (DiWA's reward classifier, on next.success;
                                                  the tasks terminate on success, so it is the termination head too)

Saved as a folder: `model.safetensors` (weights and normalization) and `config.json` (the config, the store
features it was trained on, training facts). Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from robopolicy.config import from_mapping, register_config, setting, to_dict

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class WorldModelError(ValueError):
    """A world model or its data that cannot be used as asked (the message says why and what to do)."""


@register_config("world_model", "latent")
@dataclass
class WorldModelConfig:
    name: str = setting("latent", "the world model's kind (latent: TD-MPC2-style latent dynamics)")
    chunk_steps: int = setting(4, "env steps per dynamics step: the executed chunk of the policies it imagines "
                               "(flow's n_action_steps)")
    obs_steps: int = setting(2, "state frames decoded at each step: the policies' n_obs_steps")
    latent_dim: int = setting(64, "width of the latent state")
    hidden: list[int] = setting([128, 128], "hidden widths of every network")
    ensemble: int = setting(5, "dynamics heads; their disagreement bounds trust in imagination")
    horizon: int = setting(4, "chunk steps unrolled per training sample (multi-step consistency)")
    rho: float = setting(0.8, "weight of unrolled step h is rho ** h (TD-MPC2's temporal weighting)")
    reward_weight: float = setting(0.5, "weight of the reward loss")
    success_weight: float = setting(1.0, "weight of the success classifier's loss")

    def __post_init__(self) -> None:
        if self.chunk_steps < 1 or self.obs_steps < 1 or self.ensemble < 1 or self.horizon < 1:
            raise ValueError("world_model chunk_steps, obs_steps, ensemble and horizon must be at least 1.")


def mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU blocks (TD-MPC2 uses Mish, 15x slower than ReLU on this CPU), then a linear output."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class EnsembleMLP(nn.Module):
    """`members` MLPs of mlp()'s shape evaluated together: one batched matmul per layer, not a Python loop over
    members (the loop was most of a training step's time on a 2-core CPU)."""

    def __init__(self, members: int, in_dim: int, hidden: list[int], out_dim: int):
        super().__init__()
        widths = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norm_weights = nn.ParameterList()
        self.norm_biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers = [nn.Linear(fan_in, fan_out) for _ in range(members)]  # nn.Linear's initialization
            self.weights.append(nn.Parameter(torch.stack([lin.weight.detach().T for lin in layers])))  # [E, in, out]
            self.biases.append(nn.Parameter(torch.stack([lin.bias.detach() for lin in layers])[:, None]))  # [E, 1, out]
            if i < len(hidden):
                self.norm_weights.append(nn.Parameter(torch.ones(members, 1, fan_out)))
                self.norm_biases.append(nn.Parameter(torch.zeros(members, 1, fan_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, B, in] (member e's inputs) -> [E, B, out]."""
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = F.layer_norm(x, x.shape[-1:]) * self.norm_weights[i] + self.norm_biases[i]
                x = F.relu(x)
        return x


class WorldModel(nn.Module):
    def __init__(self, config: WorldModelConfig, state_dim: int, action_dim: int):
        super().__init__()
        self.cfg, self.state_dim, self.action_dim = config, state_dim, action_dim
        hidden, latent = list(config.hidden), config.latent_dim
        chunk_dim = config.chunk_steps * action_dim
        self.encoder = mlp(state_dim, hidden, latent)
        self.dynamics = EnsembleMLP(config.ensemble, latent + chunk_dim, hidden, latent)
        self.decoder = mlp(latent, hidden, config.obs_steps * state_dim)
        self.reward_head = mlp(latent + chunk_dim, hidden, 1)
        self.success_head = mlp(latent + chunk_dim, hidden, 1)
        for name, size in (("state_mean", state_dim), ("state_std", state_dim), ("action_mean", action_dim),
                           ("action_std", action_dim)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))
        self.register_buffer("reward_std", torch.ones(()))

    # ------------------------------------------------------------------------------------------ normalization
    def set_normalization(self, states: torch.Tensor, actions: torch.Tensor, chunk_rewards: torch.Tensor) -> None:
        """Mean / std of the training data (std floored: constant dimensions such as a fixed target)."""
        self.state_mean.copy_(states.mean(0))
        self.state_std.copy_(states.std(0).clamp_min(1e-3))
        self.action_mean.copy_(actions.mean(0))
        self.action_std.copy_(actions.std(0).clamp_min(1e-3))
        self.reward_std.copy_(chunk_rewards.std().clamp_min(1e-3))

    def _chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """Actions [B, K, A] in robot units -> normalized and flattened [B, K * A]."""
        if chunk.shape[-2] != self.cfg.chunk_steps:
            raise WorldModelError(f"the world model steps {self.cfg.chunk_steps} actions at a time, the policy "
                                  f"executes {chunk.shape[-2]}: train it with model.chunk_steps="
                                  f"{chunk.shape[-2]}.")
        return ((chunk - self.action_mean) / self.action_std).flatten(-2)

    # ------------------------------------------------------------------------------------------ the model
    def encode(self, state: torch.Tensor) -> torch.Tensor:
        """States [..., S] in robot units -> latents [..., L]."""
        return self.encoder((state - self.state_mean) / self.state_std)

    def next(self, z: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Every member's next latent from the same z [B, L]: [E, B, L] (residual dynamics)."""
        return self.next_per_member(z.expand(self.cfg.ensemble, *z.shape), chunk.expand(self.cfg.ensemble,
                                                                                         *chunk.shape))

    def next_per_member(self, z: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Member e's next latent of its own trajectory: z [E, B, L], chunk [E, B, K, A] -> [E, B, L]."""
        return z + self.dynamics(torch.cat([z, self._chunk(chunk)], -1))

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).unflatten(-1, (self.cfg.obs_steps, self.state_dim))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., L] -> the last obs_steps states [..., To, S] in robot units (oldest first)."""
        return self.decode_normalized(z) * self.state_std + self.state_mean

    def reward(self, z: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """The env reward summed over the chunk [...]."""
        return self.reward_head(torch.cat([z, self._chunk(chunk)], -1)).squeeze(-1) * self.reward_std

    def success_logit(self, z: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        return self.success_head(torch.cat([z, self._chunk(chunk)], -1)).squeeze(-1)

    def success(self, z: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """P(success within the chunk) [...]."""
        return torch.sigmoid(self.success_logit(z, chunk))


# ---------------------------------------------------------------------------------------------- files


def save_world_model(folder: str | Path, model: WorldModel, features: Mapping[str, Any],
                     extra: Mapping[str, Any] | None = None) -> Path:
    """model.safetensors + config.json in `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "robopolicy.world_model"})
    info = {"model": to_dict(model.cfg), "state_dim": model.state_dim, "action_dim": model.action_dim,
            "features": dict(features), **dict(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=1))
    return folder


def read_world_model_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.exists() or not (Path(folder) / WEIGHTS_FILE).exists():
        raise WorldModelError(f"No world model at {folder}: make one with `robopolicy world-model train "
                              f"data=STORE out={folder}`.")
    return json.loads(path.read_text())


def load_world_model(folder: str | Path) -> tuple[WorldModel, dict[str, Any]]:
    """The model (eval mode) and its config.json."""
    info = read_world_model_info(folder)
    model = WorldModel(from_mapping(WorldModelConfig, info["model"], where="model"), info["state_dim"],
                       info["action_dim"])
    model.load_state_dict(_stacked_dynamics(load_file(str(Path(folder) / WEIGHTS_FILE)), model.cfg))
    return model.eval().requires_grad_(False), info


def _stacked_dynamics(weights: dict[str, torch.Tensor], cfg: WorldModelConfig) -> dict[str, torch.Tensor]:
    """Weights saved when the dynamics heads were separate mlp()s (dynamics.<member>.<layer>.*) stacked as
    EnsembleMLP's; newer weights pass through."""
    if "dynamics.0.0.weight" not in weights:
        return weights
    out = {k: v for k, v in weights.items() if not k.startswith("dynamics.")}
    members = range(cfg.ensemble)
    for i in range(len(cfg.hidden) + 1):  # mlp(): Linear, LayerNorm, ReLU per hidden layer, then Linear
        out[f"dynamics.weights.{i}"] = torch.stack([weights[f"dynamics.{e}.{3 * i}.weight"].T for e in members])
        out[f"dynamics.biases.{i}"] = torch.stack([weights[f"dynamics.{e}.{3 * i}.bias"][None] for e in members])
        if i < len(cfg.hidden):
            for key, name in (("weight", "norm_weights"), ("bias", "norm_biases")):
                out[f"dynamics.{name}.{i}"] = torch.stack([weights[f"dynamics.{e}.{3 * i + 1}.{key}"][None]
                                                           for e in members])
    return out
