"""Latent-noise steering (DSRL, Wagenmaker et al. 2025): RL in the base sampler's noise space.

The frozen base maps (observation, initial noise) -> action chunk deterministically. A SAC actor picks the noise,
tanh-bounded to [-noise_scale, noise_scale] per element, once per chunk; the environment sees only the base's
actions, so the refined policy stays on the base's action manifold while RL chooses among its modes.

`steer` (DSRL-SAC): the critic is Q(s, noise), trained on the chunk-level transitions directly.
`latent: bottleneck` (after ZPRL): for a base whose noise has little authority (cloned from a near-deterministic
expert), the actor instead adds a bounded residual to the base's VIB latent (a base trained with
`policy.encoder.bottleneck=vib`): chunk = base.sample_from_features(z + latent_scale * tanh(...), noise). It is a
residual, so it is treated as the residual method's: the actor starts at a ~0 residual (the base itself), explores
progressively (explore_start / explore_steps), and `finetune` gives it the shaped reward and, on long episodes,
per-step decisions (`n_action_steps` 1) with 10-step TD (robopolicy/rl/task_profile.py).

`steer_na` (DSRL-NA, noise aliasing): the critic Q_A(s, chunk) is over the executed actions, so noises that give
the same chunk share their value; it is distilled into Q_W(s, noise) = Q_A(s, base(s, noise)), which trains the
noise actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from robopolicy.config import register_config, setting
from robopolicy.policies import ActionChunkPolicy, ChunkPolicy, register_policy
from robopolicy.policies.base import PolicyConfigError
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import RewardSpec, raw_dtypes, raw_obs, transition_shapes
from robopolicy.rl.online import AlgoConfig
from robopolicy.rl.refined import RefinedPolicy, dummy_observation
from robopolicy.rl.sac import SAC, SACConfig, TanhGaussianActor, TwinQ, soft_update


@register_config("algo", "steer")
@dataclass
class SteerConfig(SACConfig, AlgoConfig):  # fields: AlgoConfig's, SACConfig's, own
    name: str = setting("steer", "steer (DSRL-SAC) | steer_na (DSRL-NA)")
    noise_scale: float = setting(1.5, "the noise is tanh-bounded to [-noise_scale, noise_scale] per element")
    actor_sampling: str = setting("sample", "at run time: sample: the actor's Gaussian with the runtime's noise as "
                                  "its epsilon (as DSRL evaluates) | mean: noise_scale * tanh(actor mean)",
                                  choices=("sample", "mean"))
    latent: str = setting("executed", "executed: only the executed steps' noise [n_action_steps x A], the rest 0, "
                          "a space H / n_action_steps times smaller | full: the whole chunk's [H x A] | "
                          "bottleneck: a residual on the base's VIB latent (policy.encoder.bottleneck=vib)",
                          choices=("executed", "full", "bottleneck"))
    latent_scale: float = setting(1.0, "latent bottleneck: |residual| <= latent_scale per latent dimension (in "
                                  "units of the VIB prior's std)")
    init_alpha: float = setting(0.05, "initial entropy temperature")
    target_entropy: float | None = setting(0.0, "DSRL's 0: a noise policy that keeps some spread; null: "
                                           "SAC's -(latent dimension)")
    n_step: int = setting(5, "TD targets over n decisions: a failing MetaWorld episode runs 75 decisions, "
                          "n-decision targets carry a success back n at a time")
    explore_start: float = setting(0.2, "latent bottleneck: fraction of episodes with the residual on at the start "
                                   "...")
    explore_steps: int = setting(10_000, "... growing linearly to 1 over this many env steps (progressive "
                                 "exploration, as the residual method's; noise steering always steers)")
    n_action_steps: int | None = setting(None, "null: the base's; fewer (1: decide every step, as ZPRL's latent "
                                         "residual does) runs the first k actions of each steered chunk")


@register_config("algo", "steer_na")
@dataclass
class SteerNAConfig(SteerConfig):
    name: str = setting("steer_na", "steer (DSRL-SAC) | steer_na (DSRL-NA)")
    batch_size: int = setting(128, "each update runs the base sampler on 3 x batch_size observations")
    updates_per_step: float = setting(0.125, "gradient updates per env step")
    actor_gradient: str = setting("distilled", "distilled: the actor climbs Q_W(s, noise), distilled from Q_A (DSRL-NA)"
                                  " | through_base: the actor climbs Q_A(s, base(s, latent)) through the base's "
                                  "sampler (a flow base with latent: bottleneck)", choices=("distilled", "through_base"))


@register_policy("steer")
class SteerPolicy(RefinedPolicy):
    """Refined runtime: noise = noise_scale * tanh(actor(encode(obs))), chunk = base(obs, noise).

    `noise` given to `sample_chunk` is the actor's epsilon (actor_sampling "sample"), never the base's noise."""

    name = "steer"
    config_class = SteerConfig
    runtime_fields = ("noise_scale", "actor_sampling", "latent", "latent_scale", "hidden", "n_action_steps")

    def __init__(self, config: SteerConfig, base: ChunkPolicy, base_ref: Mapping[str, str]):
        super().__init__(config, base, base_ref, n_action_steps=config.n_action_steps)

    def build(self, config: SteerConfig) -> None:
        self.noise_scale, self.actor_sampling, self.latent = config.noise_scale, config.actor_sampling, config.latent
        self.latent_scale = config.latent_scale
        self.latent_dim = (self.horizon if self.latent == "full" else self.n_exec) * self.action_dim
        if self.latent == "bottleneck":
            if not isinstance(self.base, ActionChunkPolicy) or self.base.obs_encoder.bottleneck != "vib":
                raise PolicyConfigError("algo.latent=bottleneck steers a VIB latent: train the base with "
                                        "policy.encoder.bottleneck=vib.")
            self.latent_dim = self.feature_dim
        # a residual on the latent starts at ~0, so the refined policy starts as the base (as the residual method's
        # does); a noise actor starts spread, as DSRL's
        init_scale = 0.01 if self.latent == "bottleneck" else 1.0
        self.actor = TanhGaussianActor(self.feature_dim, self.latent_dim, list(config.hidden), init_scale=init_scale)

    def normalized_executed(self, obs: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """The executed actions [B, n_exec * A] in the base's normalized units for latent residuals [B, latent_dim],
        differentiable in the latent: the flow base's ODE run with gradients (bottleneck steering only)."""
        if self.latent != "bottleneck" or not hasattr(self.base, "normalized_sample"):
            raise PolicyConfigError("algo.actor_gradient=through_base differentiates a flow base's sampler in its VIB "
                                    "latent: use latent: bottleneck on a flow base.")
        with torch.no_grad():
            features = self.encode(obs)
        return self.base.normalized_sample(features + self.latent_scale * latent)[:, self.exec_slice].flatten(1)

    def latent_to_noise(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] in [-1, 1] -> the base's initial noise [B, H, A]."""
        if self.latent == "full":
            return self.noise_scale * rearrange(latent, "b (h a) -> b h a", h=self.horizon)
        noise = latent.new_zeros(latent.shape[0], self.horizon, self.action_dim)
        noise[:, self.exec_slice] = self.noise_scale * rearrange(latent, "b (t a) -> b t a", a=self.action_dim)
        return noise

    def steered_chunk(self, obs: Mapping[str, torch.Tensor], latent: torch.Tensor,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """The base's chunk [B, H, A] for latent actions [B, latent_dim] in [-1, 1]: as its initial noise, or
        (bottleneck) as a residual on its VIB latent, sampled from the base's `noise`."""
        if self.latent == "bottleneck":
            return self.base.sample_from_features(self.encode(obs) + self.latent_scale * latent, noise)
        return self.base.sample_chunk(obs, self.latent_to_noise(latent))

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        """The base's chunk at the actor's noise; the given noise is only the actor's epsilon ("sample"). With the
        bottleneck latent the residual is the actor's mean and the noise is the base's."""
        self.check_prefix(prefix_actions)
        features = self.encode(obs)
        if self.latent == "bottleneck":
            return self.steered_chunk(obs, self.actor.deterministic(features), noise)
        if self.actor_sampling == "sample":
            mu, log_std = self.actor(features)
            if noise is None:
                noise = self.draw_noise(mu.shape[0], mu.device)
            eps = noise.to(mu) if self.latent == "full" else noise.to(mu)[:, self.exec_slice]
            latent = torch.tanh(mu + log_std.exp() * eps.flatten(1))  # eps: [B, latent_dim]
        else:
            latent = self.actor.deterministic(features)
        return self.base.sample_chunk(obs, self.latent_to_noise(latent))


class Steer:
    """DSRL-SAC: the SAC action is the latent (noise / noise_scale) in [-1, 1]^(H*A)."""

    keep_raw_obs = False
    on_policy = False

    def __init__(self, policy: SteerPolicy, cfg: SteerConfig, seed: int = 0):
        self.policy = policy
        self.gamma, self.n_step = cfg.gamma, cfg.n_step
        self.sac = SAC(policy.feature_dim, policy.latent_dim, cfg, actor=policy.actor)
        self.generator = torch.Generator().manual_seed(seed)
        # progressive exploration of a latent residual (the residual method's): a random residual on the latent
        # would wreck the base's successes before the critic knows better; a zero residual is the base itself
        explore = policy.latent == "bottleneck"
        self.explore_start = cfg.explore_start if explore else 1.0
        self.explore_steps = cfg.explore_steps if explore else 0
        self.rng = np.random.default_rng(seed)
        self.enabled: dict[int, bool] = {}

    def enabled_fraction(self, env_steps: int) -> float:
        if self.explore_steps <= 0:
            return 1.0
        return min(1.0, self.explore_start + (1.0 - self.explore_start) * env_steps / self.explore_steps)

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.encode(obs)

    def executed_chunk(self, obs: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """The base's executed actions [b, n_exec, A] for these latents."""
        return self.policy.steered_chunk(obs, latent)[:, self.policy.exec_slice]

    def act(self, obs, inputs, workers, explore):
        latent = self.sac.act(inputs, explore, self.generator)
        if explore and self.explore_steps > 0:  # the base alone (a zero residual, recorded as such) in the others
            on = torch.tensor([self.enabled.get(i, True) for i in workers], dtype=latent.dtype)
            latent = latent * on[:, None]
        return latent, self.executed_chunk(obs, latent), {}

    def start_episode(self, worker: int, env_steps: int) -> None:
        if self.explore_steps > 0:
            self.enabled[worker] = bool(self.rng.random() < self.enabled_fraction(env_steps))

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.sac.update(batch)


class SteerNoiseAliased(Steer):
    """DSRL-NA: TD on Q_A(s, executed chunk), distillation into Q_W(s, noise) (= the SAC critic), actor on Q_W."""

    keep_raw_obs = True  # the base is re-run on stored observations for next chunks and distillation

    def __init__(self, policy: SteerPolicy, cfg: SteerConfig, seed: int = 0):
        super().__init__(policy, cfg, seed)
        hidden = list(cfg.hidden)
        self.chunk_dim = policy.n_exec * policy.action_dim
        self.action_critic = TwinQ(policy.feature_dim, self.chunk_dim, hidden)
        self.action_critic_target = TwinQ(policy.feature_dim, self.chunk_dim, hidden).requires_grad_(False)
        self.action_critic_target.load_state_dict(self.action_critic.state_dict())
        self.action_critic_optim = torch.optim.Adam(self.action_critic.parameters(), lr=cfg.lr)
        self.through_base = cfg.actor_gradient == "through_base"
        if self.through_base:
            policy.normalized_executed(dummy_observation(policy.features, policy.n_obs_steps),
                                       torch.zeros(1, policy.latent_dim))  # a clear error now, not at the first update

    def normalized_chunk(self, obs: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """Executed actions in the base's normalized units, flattened: [b, n_exec * A]."""
        return self.policy.normalize_actions(self.executed_chunk(obs, latent)).flatten(1)

    def act(self, obs, inputs, workers, explore):
        latent, actions, _ = super().act(obs, inputs, workers, explore)
        return latent, actions, {"chunk": self.policy.normalize_actions(actions).flatten(1)}

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        action_critic_loss = self.update_action_critic(batch)
        if self.through_base:  # no distillation: the actor's gradient runs through the base into Q_A
            raw = raw_obs(batch)
            metrics = self.sac.update_actor_and_alpha(
                batch["obs"], critic=lambda obs, latent: self.action_critic(obs, self.policy.normalized_executed(raw, latent)))
            return {"action_critic_loss": action_critic_loss, **metrics}
        sac, obs = self.sac, batch["obs"]
        with torch.no_grad():  # distillation targets on the actor's noises and on uniform ones
            raw = raw_obs(batch)
            latent = torch.cat([sac.actor.sample(obs)[0], torch.rand_like(batch["action"]) * 2 - 1])
            obs2 = torch.cat([obs, obs])
            raw2 = {k: torch.cat([v, v]) for k, v in raw.items()}
            distil_target = torch.min(*self.action_critic(obs2, self.normalized_chunk(raw2, latent)))
        distil_loss = sac.update_critic(obs2, latent, distil_target)
        metrics = sac.update_actor_and_alpha(obs)
        return {"action_critic_loss": action_critic_loss, "distil_loss": distil_loss, **metrics}

    def update_action_critic(self, batch: Mapping[str, torch.Tensor]) -> float:
        """One TD step of Q_A(s, executed chunk), the next chunk from the current actor; the loss."""
        sac, obs = self.sac, batch["obs"]
        with torch.no_grad():  # TD target of Q_A with the next chunk the current noise actor would produce
            next_latent, next_log_prob = sac.actor.sample(batch["next_obs"])
            next_chunk = self.normalized_chunk(raw_obs(batch, "next_raw"), next_latent)
            next_q = torch.min(*self.action_critic_target(batch["next_obs"], next_chunk)) - sac.alpha * next_log_prob
            target = batch["reward"] + sac.gamma ** batch["steps"] * (1.0 - batch["done"]) * next_q
        q1, q2 = self.action_critic(obs, batch["chunk"])
        action_critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.action_critic_optim.zero_grad(set_to_none=True)
        action_critic_loss.backward()
        self.action_critic_optim.step()
        soft_update(self.action_critic_target, self.action_critic, sac.tau)
        return action_critic_loss.item()


def make_method(base: ChunkPolicy, base_ref: Mapping[str, str], algo: SteerConfig, reward: RewardSpec, seed: int
                ) -> tuple[Steer, ReplayBuffer]:
    """The steering method for `algo.name` steer | steer_na on a loaded base, with its replay buffer."""
    policy = SteerPolicy(algo, base, base_ref)
    method = (SteerNoiseAliased if algo.name == "steer_na" else Steer)(policy, algo, seed)
    extras = {"chunk": (policy.n_exec * policy.action_dim,)} if method.keep_raw_obs else {}
    shapes = transition_shapes(method, policy.feature_dim, policy.latent_dim, extras)
    return method, ReplayBuffer(algo.buffer_size, shapes, raw_dtypes(method))
