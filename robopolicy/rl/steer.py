"""Latent-noise steering (DSRL, Wagenmaker et al. 2025): RL in the base sampler's noise space.

The frozen base maps (observation, initial noise) -> action chunk deterministically. A SAC actor picks the noise,
tanh-bounded to [-noise_scale, noise_scale] per element, once per chunk; the environment sees only the base's
actions, so the refined policy stays on the base's action manifold while RL chooses among its modes.

`steer` (DSRL-SAC): the critic is Q(s, noise), trained on the chunk-level transitions directly.
`steer_na` (DSRL-NA, noise aliasing): the critic Q_A(s, chunk) is over the executed actions, so noises that give
the same chunk share their value; it is distilled into Q_W(s, noise) = Q_A(s, base(s, noise)), which trains the
noise actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from robopolicy.policies import register_policy
from robopolicy.rl.core import RefinedPolicy, ReplayBuffer, raw_dtypes, raw_obs, transition_shapes
from robopolicy.rl.sac import SAC, TanhGaussianActor, TwinQ, soft_update


@register_policy("steer")
class SteerPolicy(RefinedPolicy):
    """Refined runtime: noise = noise_scale * tanh(actor(encode(obs))), chunk = base(obs, noise)."""

    name = "steer"

    def build(self, cfg: Mapping[str, Any]) -> None:
        self.noise_scale = float(cfg.get("noise_scale", 1.0))
        # "mean": the actor's mean noise; "sample": the actor's Gaussian with the runtime's noise as its epsilon
        # (stochastic like the training episodes, still deterministic given the noise)
        self.actor_sampling = str(cfg.get("actor_sampling", "mean"))
        if self.actor_sampling not in ("mean", "sample"):
            raise ValueError(f"steer actor_sampling {self.actor_sampling!r} is unknown; use 'mean' or 'sample'.")
        # "full": the noise of the whole chunk [H, A] (DSRL); "executed": only the noise at the executed indices
        # [n_exec, A], the rest fixed at 0, a 4x smaller search space for a 16-step horizon with 4 executed steps
        self.latent = str(cfg.get("latent", "full"))
        if self.latent not in ("full", "executed"):
            raise ValueError(f"steer latent {self.latent!r} is unknown; use 'full' or 'executed'.")
        self.latent_dim = (self.horizon if self.latent == "full" else self.n_exec) * self.action_dim
        self.actor = TanhGaussianActor(self.feature_dim, self.latent_dim, list(cfg.get("hidden", [256, 256])))

    def latent_to_noise(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] in [-1, 1] -> the base's initial noise [B, H, A]."""
        if self.latent == "full":
            return self.noise_scale * rearrange(latent, "b (h a) -> b h a", h=self.horizon)
        noise = latent.new_zeros(latent.shape[0], self.horizon, self.action_dim)
        noise[:, self.exec_slice] = self.noise_scale * rearrange(latent, "b (t a) -> b t a", a=self.action_dim)
        return noise

    @torch.no_grad()
    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        """The base's chunk at the actor's noise; the given noise is only the actor's epsilon ("sample"), drawn here
        when none is given (as the base draws its own), so `deploy` samples like `eval`."""
        features = self.encode(obs)
        if self.actor_sampling == "sample":
            mu, log_std = self.actor(features)
            if noise is None:
                noise = torch.randn(mu.shape[0], *self.noise_shape, device=mu.device)
            eps = noise.to(mu) if self.latent == "full" else noise.to(mu)[:, self.exec_slice]
            latent = torch.tanh(mu + log_std.exp() * eps.flatten(1))  # eps: [B, latent_dim]
        else:
            latent = self.actor.deterministic(features)
        return self.base.sample_chunk(obs, self.latent_to_noise(latent))


class Steer:
    """DSRL-SAC: the SAC action is the latent (noise / noise_scale) in [-1, 1]^(H*A)."""

    keep_raw_obs = False

    def __init__(self, policy: SteerPolicy, cfg: Mapping[str, Any], seed: int = 0):
        self.policy = policy
        self.gamma = float(cfg.get("gamma", 0.99))
        self.sac = SAC(policy.feature_dim, policy.latent_dim, cfg, actor=policy.actor)
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.encode(obs)

    def executed_chunk(self, obs: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """The base's executed actions [b, n_exec, A] for these latents."""
        chunk = self.policy.base.sample_chunk(obs, self.policy.latent_to_noise(latent))
        return chunk[:, self.policy.exec_slice]

    def act(self, obs, inputs, workers, explore):
        latent = self.sac.act(inputs, explore, self.generator)
        return latent, self.executed_chunk(obs, latent), {}

    def start_episode(self, worker: int, env_steps: int) -> None:
        pass

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.sac.update(batch)


class SteerNoiseAliased(Steer):
    """DSRL-NA: TD on Q_A(s, executed chunk), distillation into Q_W(s, noise) (= the SAC critic), actor on Q_W."""

    keep_raw_obs = True  # the base is re-run on stored observations for next chunks and distillation

    def __init__(self, policy: SteerPolicy, cfg: Mapping[str, Any], seed: int = 0):
        super().__init__(policy, cfg, seed)
        hidden = list(cfg.get("hidden", [256, 256]))
        self.chunk_dim = policy.n_exec * policy.action_dim
        self.action_critic = TwinQ(policy.feature_dim, self.chunk_dim, hidden)
        self.action_critic_target = TwinQ(policy.feature_dim, self.chunk_dim, hidden).requires_grad_(False)
        self.action_critic_target.load_state_dict(self.action_critic.state_dict())
        self.action_critic_optim = torch.optim.Adam(self.action_critic.parameters(), lr=float(cfg.get("lr", 3e-4)))

    def normalized_chunk(self, obs: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """Executed actions in the base's normalized units, flattened: [b, n_exec * A]."""
        return self.policy.normalize_actions(self.executed_chunk(obs, latent)).flatten(1)

    def act(self, obs, inputs, workers, explore):
        latent, actions, _ = super().act(obs, inputs, workers, explore)
        return latent, actions, {"chunk": self.policy.normalize_actions(actions).flatten(1)}

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
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

        with torch.no_grad():  # distillation targets on the actor's noises and on uniform ones
            raw = raw_obs(batch)
            latent = torch.cat([sac.actor.sample(obs)[0], torch.rand_like(batch["action"]) * 2 - 1])
            obs2 = torch.cat([obs, obs])
            raw2 = {k: torch.cat([v, v]) for k, v in raw.items()}
            distil_target = torch.min(*self.action_critic(obs2, self.normalized_chunk(raw2, latent)))
        distil_loss = sac.update_critic(obs2, latent, distil_target)
        metrics = sac.update_actor_and_alpha(obs)
        return {"action_critic_loss": action_critic_loss.item(), "distil_loss": distil_loss, **metrics}


def make_method(policy_cfg: Mapping[str, Any], cfg: Mapping[str, Any]) -> tuple[Steer, ReplayBuffer]:
    """The steering method for `algo.name` steer | steer_na, with its replay buffer."""
    algo = cfg["algo"]
    policy = SteerPolicy(policy_cfg)
    method = (SteerNoiseAliased if algo["name"] == "steer_na" else Steer)(policy, algo, int(cfg["seed"]))
    extras = {"chunk": (policy.n_exec * policy.action_dim,)} if method.keep_raw_obs else {}
    shapes = transition_shapes(method, policy.feature_dim, policy.latent_dim, extras)
    return method, ReplayBuffer(int(algo.get("buffer_size", 100_000)), shapes, raw_dtypes(method))


def policy_config(base: Mapping[str, str], algo: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": "steer", "base": dict(base), "noise_scale": float(algo.get("noise_scale", 1.0)),
            "actor_sampling": str(algo.get("actor_sampling", "mean")), "latent": str(algo.get("latent", "full")),
            "hidden": list(algo.get("hidden", [256, 256]))}
