"""Residual RL on a frozen base (ResiP, Ankile et al. 2024; Policy Decorator, Yuan et al. 2024).

The base proposes its chunk; a small SAC actor adds a bounded correction to each executed action:
    a_t = unnormalize(normalize(base_t) + scale * r_t),   r = tanh(...) in [-1, 1]^(n_action_steps x A)
in the base's normalized action units, so `scale` bounds the deviation from the base in every dimension (one number,
or one per action dimension: e.g. a wider bound on the gripper than on the arm's motion).
The residual is decided once per chunk from the observation features and the base's executed actions, so it runs
through the same `sample_chunk` runtime as any policy (eval and deploy unchanged). `n_action_steps` (fewer than the
base's) decides more often: with 1, every step runs the first action of a fresh base chunk plus a residual decided
from the latest state (ResiP's per-step residual), which can correct an imprecise base's moves as they happen.

Progressive exploration (Policy Decorator): early on, most episodes run the base alone (residual 0, recorded as
such) and the fraction of episodes with the residual grows linearly to 1 over `explore_steps` env steps, so a
random residual does not wreck the base's successes before the critic knows better. `residual_penalty` adds
c |r|^2 to the actor loss, keeping the correction as small as the task allows.

`optimizer`: "sac" (off-policy, replay buffer; the default) or "ppo" (on-policy, clipped surrogate with GAE over
whole episodes, `robopolicy.rl.ppo`). Both train the same actor, so the refined checkpoint is the same either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from einops import rearrange

from robopolicy.policies import register_policy
from robopolicy.rl.core import RefinedPolicy, ReplayBuffer, raw_dtypes, transition_shapes
from robopolicy.rl.ppo import PPO, RolloutStore
from robopolicy.rl.sac import SAC, TanhGaussianActor


@register_policy("residual")
class ResidualPolicy(RefinedPolicy):
    name = "residual"

    def build(self, cfg: Mapping[str, Any]) -> None:
        # [A]: one bound per action dimension; a buffer so it moves with the policy (not saved: it is config)
        self.register_buffer("scale", residual_scale(cfg.get("scale", 0.2), self.action_dim), persistent=False)
        self.latent_dim = self.n_exec * self.action_dim
        # a tiny initial mean: the refined policy starts as the base
        self.actor = TanhGaussianActor(self.feature_dim + self.latent_dim, self.latent_dim,
                                       list(cfg.get("hidden", [256, 256])), init_scale=0.01)

    def inputs(self, obs: Mapping[str, torch.Tensor], base_chunk: torch.Tensor) -> torch.Tensor:
        """[features, normalized executed base actions] -> [B, F + n_exec * A]."""
        executed = self.normalize_actions(base_chunk[:, self.exec_slice])
        return torch.cat([self.encode(obs), executed.flatten(1)], dim=-1)

    def apply_residual(self, base_chunk: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The base chunk [B, H, A] with `scale * residual` added (normalized units) to its executed actions."""
        chunk = base_chunk.clone()
        executed = self.normalize_actions(base_chunk[:, self.exec_slice])
        residual = rearrange(residual, "b (t a) -> b t a", a=self.action_dim)
        chunk[:, self.exec_slice] = self.base.unnormalize_actions(executed + self.scale * residual)
        return chunk

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        base_chunk = self.base.sample_chunk(obs, noise)
        return self.apply_residual(base_chunk, self.actor.deterministic(self.inputs(obs, base_chunk)))


def residual_scale(scale: Any, action_dim: int) -> torch.Tensor:
    """`scale` (one number, or one per action dimension) as a tensor [A]."""
    if isinstance(scale, (int, float)):
        return torch.full((action_dim,), float(scale))
    values = [float(v) for v in scale]
    if len(values) != action_dim:
        raise ValueError(f"residual scale has {len(values)} values but the base's actions have {action_dim} "
                         "dimensions; give one number or one per action dimension.")
    return torch.tensor(values)


OPTIMIZERS = ("sac", "ppo")


class Residual:
    keep_raw_obs = False

    def __init__(self, policy: ResidualPolicy, cfg: Mapping[str, Any], seed: int = 0):
        self.policy = policy
        self.gamma = float(cfg.get("gamma", 0.99))
        self.optimizer = str(cfg.get("optimizer", "sac"))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"residual optimizer {self.optimizer!r} is unknown; use algo.optimizer=sac or ppo.")
        learner_cfg = {**cfg, "action_penalty": float(cfg.get("residual_penalty", 0.0))}
        in_dim = policy.feature_dim + policy.latent_dim
        self.on_policy = self.optimizer == "ppo"
        if self.on_policy:
            self.ppo = PPO(in_dim, policy.latent_dim, learner_cfg, actor=policy.actor, seed=seed)
        else:
            self.sac = SAC(in_dim, policy.latent_dim, learner_cfg, actor=policy.actor)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.explore_start = float(cfg.get("explore_start", 0.2))
        self.explore_steps = int(cfg.get("explore_steps", 20_000))
        self.enabled: dict[int, bool] = {}

    def enabled_fraction(self, env_steps: int) -> float:
        if self.explore_steps <= 0:
            return 1.0
        return min(1.0, self.explore_start + (1.0 - self.explore_start) * env_steps / self.explore_steps)

    def start_episode(self, worker: int, env_steps: int) -> None:
        self.enabled[worker] = bool(self.rng.random() < self.enabled_fraction(env_steps))

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        noise = torch.randn(next(iter(obs.values())).shape[0], *self.policy.noise_shape, generator=self.generator)
        return self.policy.inputs(obs, self.policy.base.sample_chunk(obs, noise))

    def act(self, obs, inputs, workers, explore):
        policy = self.policy
        extras: dict[str, torch.Tensor] = {}
        if self.on_policy:
            residual, extras = self.ppo.act(inputs, explore, self.generator)
        else:
            residual = self.sac.act(inputs, explore, self.generator)
        if explore:  # progressive exploration: the base alone in the episodes without the residual
            on = torch.tensor([self.enabled.get(i, True) for i in workers], dtype=residual.dtype)
            residual = residual * on[:, None]
            if self.on_policy:  # PPO's ratio is only defined where the actor's sample was executed
                extras["policy_mask"] = on
        base_executed = rearrange(inputs[:, policy.feature_dim:], "b (t a) -> b t a", a=policy.action_dim)
        actions = policy.base.unnormalize_actions(
            base_executed + policy.scale * rearrange(residual, "b (t a) -> b t a", a=policy.action_dim))
        return residual, actions, extras

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.sac.update(batch)

    def ready(self) -> bool:
        """On-policy: enough fresh episodes for a PPO update."""
        return self.ppo.ready()

    def update_rollouts(self) -> dict[str, float]:
        return self.ppo.update()


def make_method(policy_cfg: Mapping[str, Any], cfg: Mapping[str, Any]
                ) -> tuple[Residual, ReplayBuffer | RolloutStore]:
    algo = cfg["algo"]
    policy = ResidualPolicy(policy_cfg)
    method = Residual(policy, algo, int(cfg["seed"]))
    if method.on_policy:
        return method, method.ppo.rollouts
    shapes = transition_shapes(method, policy.feature_dim + policy.latent_dim, policy.latent_dim)
    return method, ReplayBuffer(int(algo.get("buffer_size", 100_000)), shapes, raw_dtypes(method))


def policy_config(base: Mapping[str, str], algo: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": "residual", "base": dict(base), "scale": _plain_scale(algo.get("scale", 0.2)),
            "hidden": list(algo.get("hidden", [256, 256])), "n_action_steps": algo.get("n_action_steps")}


def _plain_scale(scale: Any) -> float | list[float]:
    return float(scale) if isinstance(scale, (int, float)) else [float(v) for v in scale]
