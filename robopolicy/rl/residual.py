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
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from robopolicy.config import register_config, setting
from robopolicy.policies import ChunkPolicy, register_policy
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import RewardSpec, raw_dtypes, transition_shapes
from robopolicy.rl.online import AlgoConfig
from robopolicy.rl.ppo import PPO, PPOConfig, RolloutStore
from robopolicy.rl.refined import RefinedPolicy
from robopolicy.rl.sac import SAC, SACConfig, TanhGaussianActor


@register_config("algo", "residual")
@dataclass
class ResidualConfig(PPOConfig, SACConfig, AlgoConfig):  # fields: AlgoConfig's, SACConfig's, PPOConfig's, own
    name: str = setting("residual", "residual | residual_ppo")
    optimizer: str = setting("sac", "sac | ppo (configs/algo/residual_ppo.yaml sets the PPO settings)",
                             choices=("sac", "ppo"))
    scale: float | list[float] = setting(0.3, "|residual| <= scale per action dimension, in the base's normalized "
                                         "units; one number or one per action dimension, e.g. [0.2, 0.2, 0.2, 1.0]")
    residual_penalty: float = setting(0.01, "c |r|^2 in the actor loss")
    explore_start: float = setting(0.2, "fraction of episodes with the residual on at the start ...")
    explore_steps: int = setting(10_000, "... growing linearly to 1 over this many env steps (progressive "
                                 "exploration)")
    n_action_steps: int | None = setting(None, "null: the base's; fewer (1: a per-step residual, as ResiP's) "
                                         "decides more often, on the first k actions of a fresh base chunk")
    batch_size: int = setting(128, "transitions per update")
    updates_per_step: float = setting(0.5, "gradient updates per env step (2 per 4-step chunk)")


@register_config("algo", "residual_ppo")
@dataclass
class ResidualPPOConfig(ResidualConfig):
    name: str = setting("residual_ppo", "residual | residual_ppo")
    optimizer: str = setting("ppo", "sac | ppo", choices=("sac", "ppo"))
    explore_steps: int = setting(0, "PPO explores through its own Gaussian; every episode runs the residual")
    explore_start: float = setting(1.0, "fraction of episodes with the residual on at the start")


@register_policy("residual")
class ResidualPolicy(RefinedPolicy):
    """Refined runtime: the base's chunk (from the given noise) plus the actor's bounded residual on its executed
    actions."""

    name = "residual"
    config_class = ResidualConfig
    runtime_fields = ("scale", "hidden", "n_action_steps")

    def __init__(self, config: ResidualConfig, base: ChunkPolicy, base_ref: Mapping[str, str]):
        super().__init__(config, base, base_ref, n_action_steps=config.n_action_steps)

    def build(self, config: ResidualConfig) -> None:
        # [A]: one bound per action dimension; a buffer so it moves with the policy (not saved: it is config)
        self.register_buffer("scale", residual_scale(config.scale, self.action_dim), persistent=False)
        self.latent_dim = self.n_exec * self.action_dim
        # a tiny initial mean: the refined policy starts as the base
        self.actor = TanhGaussianActor(self.feature_dim + self.latent_dim, self.latent_dim, list(config.hidden),
                                       init_scale=0.01)

    def executed(self, base_chunk: torch.Tensor) -> torch.Tensor:
        """The base chunk's executed actions, normalized: [B, n_exec, A]."""
        return self.normalize_actions(base_chunk[:, self.exec_slice])

    def inputs(self, obs: Mapping[str, torch.Tensor], base_chunk: torch.Tensor) -> torch.Tensor:
        """[features, normalized executed base actions] -> [B, F + n_exec * A]."""
        return torch.cat([self.encode(obs), self.executed(base_chunk).flatten(1)], dim=-1)

    def corrected(self, executed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """THE residual formula, for training and run time alike: executed actions [B, n_exec, A] (normalized)
        plus `scale * residual` [B, n_exec * A], in robot units."""
        residual = rearrange(residual, "b (t a) -> b t a", a=self.action_dim)
        return self.base.unnormalize_actions(executed + self.scale * residual)

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        """`noise` is the base's."""
        self.check_prefix(prefix_actions)
        base_chunk = self.base.sample_chunk(obs, noise)
        chunk = base_chunk.clone()
        residual = self.actor.deterministic(self.inputs(obs, base_chunk))
        chunk[:, self.exec_slice] = self.corrected(self.executed(base_chunk), residual)
        return chunk


def residual_scale(scale: float | list[float], action_dim: int) -> torch.Tensor:
    """`scale` (one number, or one per action dimension) as a tensor [A]."""
    if isinstance(scale, (int, float)):
        return torch.full((action_dim,), float(scale))
    values = [float(v) for v in scale]
    if len(values) != action_dim:
        raise ValueError(f"residual scale has {len(values)} values but the base's actions have {action_dim} "
                         "dimensions; give one number or one per action dimension.")
    return torch.tensor(values)


class Residual:
    keep_raw_obs = False

    def __init__(self, policy: ResidualPolicy, cfg: ResidualConfig, seed: int = 0):
        self.policy = policy
        self.gamma, self.n_step = cfg.gamma, cfg.n_step
        in_dim = policy.feature_dim + policy.latent_dim
        self.on_policy = cfg.optimizer == "ppo"  # declared per run: the optimizer is a setting of this method
        if self.on_policy:
            self.ppo = PPO(in_dim, policy.latent_dim, cfg, actor=policy.actor, seed=seed,
                           action_penalty=cfg.residual_penalty)
        else:
            self.sac = SAC(in_dim, policy.latent_dim, cfg, actor=policy.actor, action_penalty=cfg.residual_penalty)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.explore_start, self.explore_steps = cfg.explore_start, cfg.explore_steps
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
        return residual, policy.corrected(base_executed, residual), extras

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.sac.update(batch)

    def ready(self) -> bool:
        """On-policy: enough fresh episodes for a PPO update."""
        return self.ppo.ready()

    def update_rollouts(self) -> dict[str, float]:
        return self.ppo.update()


def make_method(base: ChunkPolicy, base_ref: Mapping[str, str], algo: ResidualConfig, reward: RewardSpec, seed: int
                ) -> tuple[Residual, ReplayBuffer | RolloutStore]:
    policy = ResidualPolicy(algo, base, base_ref)
    method = Residual(policy, algo, seed)
    if method.on_policy:
        return method, method.ppo.rollouts
    shapes = transition_shapes(method, policy.feature_dim + policy.latent_dim, policy.latent_dim)
    return method, ReplayBuffer(algo.buffer_size, shapes, raw_dtypes(method))
