"""A compact soft actor-critic over chunk-level decisions, shared by `steer` and `residual`.

The action is a vector in [-1, 1]^K (tanh-squashed Gaussian); each method says what it means (the base's initial
noise, a residual on the executed actions). Transitions carry `steps`, the number of env steps the decision
covered, so the bootstrap discount is gamma ** steps (a decision that ran a whole chunk looks further ahead than one
cut short by the episode's end).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robopolicy.config import setting

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, layer_norm: bool = True) -> nn.Sequential:
    """Linear -> (LayerNorm) -> ReLU blocks; LayerNorm keeps high update-to-data critics stable."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width)] + ([nn.LayerNorm(width)] if layer_norm else []) + [nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a | s): a = tanh(u), u ~ N(mu(s), sigma(s)); the deterministic action is tanh(mu(s))."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int], init_scale: float = 1.0):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden[:-1], hidden[-1])
        self.head = nn.Linear(hidden[-1], 2 * action_dim)
        with torch.no_grad():  # a small initial mean: the first deterministic actions stay near 0
            self.head.weight.mul_(init_scale)
            self.head.bias.zero_()

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.head(F.relu(self.trunk(obs))).chunk(2, dim=-1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterized action [B, K] and its log-probability [B]."""
        mu, log_std = self(obs)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        u = mu + log_std.exp() * eps
        action = torch.tanh(u)
        # log N(u) minus the tanh Jacobian, in the numerically stable form 2 (log 2 - u - softplus(-2u))
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return action, log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


class TwinQ(nn.Module):
    """Two independent Q(s, a) heads; the minimum curbs overestimation."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, hidden, 1)
        self.q2 = mlp(obs_dim + action_dim, hidden, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel: one kernel over all parameters rather than a loop of small per-tensor ops."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


@dataclass
class SACConfig:
    """The SAC settings of a method's config (mixed into steer's and residual's)."""

    tau: float = setting(0.005, "Polyak rate of the target critics")
    init_alpha: float = setting(0.05, "initial entropy temperature")
    target_entropy: float | None = setting(None, "null: SAC's -(latent dimension)")
    n_step: int = setting(1, "TD targets over n decisions (chunks) of an episode; 1: one-decision TD")

    def __post_init__(self) -> None:
        if self.n_step < 1:
            raise ValueError(f"n_step {self.n_step} must be a whole number >= 1 (1: one-decision TD targets).")


class SAC:
    """Actor, twin critic with Polyak targets, and a learned temperature (alpha) aiming at `target_entropy`.

    `cfg`: a method config with SACConfig's fields and `hidden`, `gamma`, `lr`. `action_penalty` adds
    c * |a|^2 to the actor loss (the residual method's pull towards the base action).
    """

    def __init__(self, obs_dim: int, action_dim: int, cfg: SACConfig, actor: TanhGaussianActor | None = None,
                 action_penalty: float = 0.0):
        """`actor`: the refined policy's own actor module (trained in place), or a new one."""
        hidden = list(cfg.hidden)
        self.gamma, self.tau, self.action_penalty = cfg.gamma, cfg.tau, action_penalty
        self.target_entropy = -float(action_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.actor = actor or TanhGaussianActor(obs_dim, action_dim, hidden)
        self.critic = TwinQ(obs_dim, action_dim, hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_alpha), requires_grad=True)
        lr = cfg.lr
        self.actor_optim = adam(self.actor.parameters(), lr)
        self.critic_optim = adam(self.critic.parameters(), lr)
        self.alpha_optim = adam([self.log_alpha], lr)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.actor.sample(obs, generator)[0] if explore else self.actor.deterministic(obs)

    def critic_target_value(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """r + gamma^steps (1 - done) (min Q'(s', a') - alpha log pi(a' | s')), a' ~ pi(s')."""
        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(batch["next_obs"])
            next_q = torch.min(*self.critic_target(batch["next_obs"], next_action)) - self.alpha * next_log_prob
            discount = self.gamma ** batch["steps"] * (1.0 - batch["done"])
            return batch["reward"] + discount * next_q

    def update_critic(self, obs: torch.Tensor, action: torch.Tensor, target: torch.Tensor) -> float:
        q1, q2 = self.critic(obs, action)
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optim.step()
        return loss.item()

    def update_actor_and_alpha(self, obs: torch.Tensor, critic: Callable | None = None) -> dict[str, float]:
        """Maximize min Q(s, pi(s)) + alpha H(pi(.|s)) under `critic(obs, action) -> (q1, q2)` (default: our own),
        then tune alpha."""
        critic = critic or self.critic
        action, log_prob = self.actor.sample(obs)
        q = torch.min(*critic(obs, action))
        loss = (self.alpha * log_prob - q).mean()
        if self.action_penalty:
            loss = loss + self.action_penalty * action.pow(2).sum(-1).mean()
        self.actor_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optim.step()
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_optim.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optim.step()
        return {"actor_loss": loss.item(), "alpha": self.alpha.item(), "entropy": -log_prob.mean().item()}

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One SAC step on a batch with obs [B, F], action [B, K], reward, next_obs, done, steps."""
        critic_loss = self.update_critic(batch["obs"], batch["action"], self.critic_target_value(batch))
        metrics = self.update_actor_and_alpha(batch["obs"])
        soft_update(self.critic_target, self.critic, self.tau)
        return {"critic_loss": critic_loss, **metrics}
