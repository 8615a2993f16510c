"""A compact PPO (clipped surrogate, GAE) over chunk-level decisions, the on-policy alternative to `sac.SAC`.

The actor is the same tanh-squashed Gaussian (`sac.TanhGaussianActor`) the refined policy runs, so a residual
trained with PPO saves and runs exactly like one trained with SAC. Decisions store the pre-tanh sample `u` (the
log-probability of a saturated tanh cannot be recovered from the action) and its log-probability at collection
time; the tanh Jacobian does not depend on the parameters, so the probability ratio needs only log N(u; mu, sigma).
Methods whose decision is a whole sampling chain (`reinflow`, `dppo`) give their own `log_prob(obs, u)`: one
log-likelihood per decision [B] (one ratio), or one per denoising step [B, K] (a ratio per step, each step's
advantage weighted by `step_weights`, DPPO's denoising discount, and its ratio clipped to `step_clip`, DPPO's
per-step clip schedule).

Rollouts arrive as whole episodes (the collector flushes an episode's chunk transitions together, in order), so
GAE runs backwards over each episode with the chunk discount gamma ** steps; an episode cut by the time limit
bootstraps from V(next_obs) of its last transition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from robopolicy.config import setting
from robopolicy.rl.sac import TanhGaussianActor, adam, mlp

LogProb = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# one stored episode -> the value network's inputs at each decision and at each next observation
ValueInputs = Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PPOConfig:
    """The PPO settings of a method's config (used by `optimizer: ppo`)."""

    ppo_rollout: int = setting(256, "chunk transitions (whole episodes) per update")
    ppo_epochs: int = setting(4, "passes over each rollout")
    ppo_minibatch: int = setting(64, "transitions per minibatch")
    ppo_clip: float = setting(0.2, "clipped-surrogate ratio bound")
    gae_lambda: float = setting(0.95, "GAE lambda")
    value_coef: float = setting(0.5, "value loss weight")
    entropy_coef: float = setting(0.0, "entropy bonus weight")
    max_grad_norm: float = setting(0.5, "gradient norm clip")


def gaussian_log_prob(actor: TanhGaussianActor, obs: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log N(u; mu(s), sigma(s)) [B], entropy of that Gaussian [B]); u is the pre-tanh sample [B, K]."""
    mu, log_std = actor(obs)
    log_prob = (-0.5 * ((u - mu) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(-1)
    return log_prob, entropy


class RolloutStore:
    """Whole episodes of on-policy chunk transitions, cleared after each PPO update (the `sink` of the collector)."""

    def __init__(self) -> None:
        self.episodes: list[dict[str, np.ndarray]] = []

    def add(self, rows: Mapping[str, np.ndarray]) -> None:
        self.episodes.append({k: np.asarray(v) for k, v in rows.items()})

    def __len__(self) -> int:
        return sum(len(ep["reward"]) for ep in self.episodes)

    def clear(self) -> None:
        self.episodes = []


class PPO:
    """Clipped-surrogate PPO with a separate value network V(s) and GAE(lambda).

    `cfg`: a method config with PPOConfig's fields and `hidden`, `gamma`, `lr`; `action_penalty` adds c |a|^2
    (the pull towards the base). `actor` is a `TanhGaussianActor` unless `log_prob(obs, u) -> (log-probability
    [B] or [B, K], entropy [B])` says how the actor module scores a stored decision `u`; its trainable parameters
    learn at `actor_lr` (None: `lr`). The first `value_warmup` updates train the value network only (DPPO's critic
    warm-up: advantages from an untrained V(s) are noise the actor would follow); `normalize_returns` fits the value
    network to returns divided by a running estimate of their std (returns of ~100 otherwise leave V(s) far off).
    `separate_grad_clip` clips the actor's and the value network's gradients each to `max_grad_norm` (as DPPO's
    separate optimizers do) rather than their joint norm: a value loss on returns of ~100 has a gradient far larger
    than the actor's, so the joint clip rescales the actor's gradient by a factor that changes with the value loss
    from minibatch to minibatch (Adam undoes a constant scale, not a varying one). `value_inputs` (with
    `value_dim`) gives the value network more than the observation: a chain method's baseline V(s, x_0) also sees
    the sampler's initial noise, drawn before any parameterized step (see `chain_ppo.ChainPPOConfig.value_on_noise`).
    """

    def __init__(self, obs_dim: int, action_dim: int, cfg: PPOConfig, actor: torch.nn.Module, seed: int = 0,
                 action_penalty: float = 0.0, log_prob: LogProb | None = None,
                 step_weights: torch.Tensor | None = None, step_clip: torch.Tensor | None = None,
                 actor_lr: float | None = None,
                 value_warmup: int = 0, normalize_returns: bool = False, separate_grad_clip: bool = False,
                 value_inputs: ValueInputs | None = None, value_dim: int | None = None):
        self.value_warmup, self.updates = value_warmup, 0
        self.separate_grad_clip = separate_grad_clip
        self.normalize_returns, self.return_scale = normalize_returns, 1.0  # V(s) = return_scale * value(s)
        self.gamma, self.lam, self.clip = cfg.gamma, cfg.gae_lambda, cfg.ppo_clip
        self.epochs, self.minibatch, self.rollout = cfg.ppo_epochs, cfg.ppo_minibatch, cfg.ppo_rollout
        self.value_coef, self.entropy_coef, self.max_grad_norm = cfg.value_coef, cfg.entropy_coef, cfg.max_grad_norm
        self.action_penalty = action_penalty
        self.actor = actor
        self.log_prob = log_prob or (lambda obs, u: gaussian_log_prob(actor, obs, u))
        self.step_weights = step_weights
        self.step_clip = step_clip  # [K]: per-step ratio bounds (None: ppo_clip at every step)
        self.value_inputs = value_inputs or (lambda ep: (ep["obs"], ep["next_obs"]))
        self.value = mlp(value_dim or obs_dim, list(cfg.hidden), 1)
        self.params = [p for p in [*actor.parameters(), *self.value.parameters()] if p.requires_grad]
        self.actor_params = [p for p in actor.parameters() if p.requires_grad]
        self.optim = torch.optim.Adam([{"params": [p for p in actor.parameters() if p.requires_grad],
                                        "lr": actor_lr or cfg.lr},
                                       {"params": list(self.value.parameters())}], lr=cfg.lr, fused=True) \
            if actor_lr else adam(self.params, cfg.lr)
        self.rollouts = RolloutStore()
        self.rng = np.random.default_rng(seed)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, explore: bool, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(action [B, K] in [-1, 1], extras to store: the pre-tanh sample `u` and its log-probability)."""
        mu, log_std = self.actor(obs)
        if not explore:
            return torch.tanh(mu), {}
        u = mu + log_std.exp() * torch.randn(mu.shape, generator=generator)
        log_prob, _ = gaussian_log_prob(self.actor, obs, u)
        return torch.tanh(u), {"u": u, "log_prob": log_prob}

    def ready(self) -> bool:
        return len(self.rollouts) >= self.rollout

    @torch.no_grad()
    def advantages(self) -> dict[str, torch.Tensor]:
        """The stored episodes as one batch with GAE advantages `adv` and value targets `ret`."""
        parts = []
        for ep in self.rollouts.episodes:
            value_in, next_value_in = self.value_inputs({k: torch.from_numpy(v) for k, v in ep.items()})
            value = self.value(value_in).squeeze(-1) * self.return_scale
            next_value = self.value(next_value_in).squeeze(-1) * self.return_scale
            discount = self.gamma ** torch.from_numpy(ep["steps"]) * (1.0 - torch.from_numpy(ep["done"]))
            delta = torch.from_numpy(ep["reward"]) + discount * next_value - value
            adv = torch.zeros_like(delta)
            running = 0.0
            for t in reversed(range(len(delta))):  # A_t = delta_t + gamma^steps lambda A_{t+1}
                running = delta[t] + discount[t] * self.lam * running
                adv[t] = running
            parts.append({"obs": torch.from_numpy(ep["obs"]), "value_in": value_in, "u": torch.from_numpy(ep["u"]),
                          "log_prob": torch.from_numpy(ep["log_prob"]), "mask": torch.from_numpy(ep["policy_mask"]),
                          "adv": adv, "ret": adv + value})
        data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.normalize_returns and len(data["ret"]) > 1:  # a running std of the value targets
            std = data["ret"].std().clamp_min(1e-3).item()
            self.return_scale = std if self.updates == 0 else 0.9 * self.return_scale + 0.1 * std
        return data

    def update(self) -> dict[str, float]:
        """`ppo_epochs` passes of minibatch updates over the stored rollouts, which are then dropped."""
        data = self.advantages()
        self.rollouts.clear()
        self.updates += 1
        return self.optimize(data, actor=self.updates > self.value_warmup)

    def optimize(self, data: dict[str, torch.Tensor], actor: bool = True) -> dict[str, float]:
        """The minibatch passes over one batch of decisions with their advantages (`advantages()`'s fields);
        `actor=False`: the value network's passes only."""
        n = len(data["adv"])
        mask = data["mask"]
        on = mask > 0
        if on.any():  # normalize advantages over the decisions the actor took
            mean, std = data["adv"][on].mean(), data["adv"][on].std().clamp_min(1e-6) if on.sum() > 1 else 1.0
            data["adv"] = (data["adv"] - mean) / std
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "clip_frac": [],
                                         "approx_kl": [], "actor_grad_norm": [], "value_grad_norm": []}
        for _ in range(self.epochs):
            for idx in np.array_split(self.rng.permutation(n), max(1, n // self.minibatch)):
                b = {k: v[idx] for k, v in data.items()}
                with torch.set_grad_enabled(actor):  # warm-up: the policy's loss is only reported
                    log_prob, entropy = self.log_prob(b["obs"], b["u"])
                    ratio = (log_prob - b["log_prob"]).exp()
                    adv = b["adv"] if ratio.dim() == 1 else b["adv"][:, None] * self.step_weights  # [B] or [B, K]
                    clip = self.clip if ratio.dim() == 1 or self.step_clip is None else self.step_clip
                    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
                    if surrogate.dim() > 1:  # one ratio per denoising step: their mean per decision
                        surrogate = surrogate.mean(-1)
                    weight = b["mask"] / b["mask"].sum().clamp_min(1.0)  # decisions without the residual: value only
                    policy_loss = -(surrogate * weight).sum() - self.entropy_coef * (entropy * weight).sum()
                    if self.action_penalty:
                        policy_loss = policy_loss + self.action_penalty * (
                            torch.tanh(self.actor(b["obs"])[0]).pow(2).sum(-1) * weight).sum()
                value_loss = F.mse_loss(self.value(b["value_in"]).squeeze(-1), b["ret"] / self.return_scale)
                loss = policy_loss + self.value_coef * value_loss if actor else self.value_coef * value_loss
                self.optim.zero_grad(set_to_none=True)
                loss.backward()
                actor_norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in self.actor_params if p.grad is not None] or [torch.zeros(())]))
                if self.separate_grad_clip:  # the value loss's gradient cannot shrink the actor's
                    torch.nn.utils.clip_grad_norm_(self.actor_params, self.max_grad_norm)
                    value_norm = torch.nn.utils.clip_grad_norm_(list(self.value.parameters()), self.max_grad_norm)
                else:
                    total = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                    value_norm = (total.square() - actor_norm.square()).clamp_min(0).sqrt()
                self.optim.step()
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["entropy"].append((entropy * weight).sum().item())
                stats["clip_frac"].append(((ratio - 1).abs() > clip).float().mean().item())
                stats["actor_grad_norm"].append(actor_norm.item())  # before clipping
                stats["value_grad_norm"].append(value_norm.item())
                with torch.no_grad():  # KL(old || new), Schulman's unbiased estimator, per ratio
                    stats["approx_kl"].append(((ratio - 1) - ratio.log()).mean().item())
        return {k: float(np.mean(v)) for k, v in stats.items()}
