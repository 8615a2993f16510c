"""Residual RL: a few updates on a real env give finite losses; the executed actions stay within `scale` of the
base's (in normalized units); progressive exploration enables the residual for a growing fraction of episodes."""

from __future__ import annotations

import math

import pytest
import torch
from test_rl_core import base_ckpt, finetune_cfg, make_envs, refined  # noqa: F401  (base_ckpt is a fixture)

from robopolicy.config import from_mapping
from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.rl.residual import Residual, ResidualConfig, ResidualPolicy


def test_residual_runs_updates_with_finite_losses(tmp_path, base_ckpt):  # noqa: F811
    summary = finetune(finetune_cfg({"name": "residual", "explore_steps": 32}, base_ckpt, tmp_path / "run"),
                       make_envs, log=lambda m: None)
    assert summary["env_steps"] == 64 and summary["updates"] > 0
    assert all(math.isfinite(v) for v in summary["last_metrics"].values())
    assert isinstance(load_policy(summary["checkpoint"]), ResidualPolicy)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_residual_bound_holds(base_ckpt, per_dimension):  # noqa: F811
    action_dim = load_policy(base_ckpt).action_dim
    scale = [0.05] * (action_dim - 1) + [0.3] if per_dimension else 0.05
    policy = refined(ResidualPolicy, base_ckpt, scale=scale, hidden=[16])
    with torch.no_grad():
        for p in policy.actor.parameters():
            p.normal_(0, 10.0)  # a saturated residual
    obs = {"observation.state": torch.randn(64, 2, *policy.features["observation.state"]["shape"])}
    noise = torch.randn(64, *policy.noise_shape)
    base_chunk = policy.base.sample_chunk(obs, noise)
    chunk = policy.sample_chunk(obs, noise)
    deviation = (policy.normalize_actions(chunk) - policy.normalize_actions(base_chunk)).abs()
    executed = deviation[:, policy.exec_slice]
    bound = torch.tensor(scale if per_dimension else [scale] * action_dim)
    assert (executed.amax(dim=(0, 1)) <= bound + 1e-5).all() and (executed.amax(dim=(0, 1)) > 0.8 * bound).all()
    outside = torch.ones(policy.horizon, dtype=torch.bool)
    outside[policy.exec_slice] = False
    assert deviation[:, outside].max() < 1e-5  # only the executed actions are corrected
    with pytest.raises(ValueError, match="one per action dimension"):
        refined(ResidualPolicy, base_ckpt, scale=[0.1] * (action_dim + 1))


def test_progressive_exploration_grows_the_enabled_fraction(base_ckpt):  # noqa: F811
    policy = refined(ResidualPolicy, base_ckpt, hidden=[16])
    method = Residual(policy, ResidualConfig(explore_start=0.2, explore_steps=1000, hidden=[16]), seed=0)
    assert method.enabled_fraction(0) == 0.2 and abs(method.enabled_fraction(500) - 0.6) < 1e-9
    assert method.enabled_fraction(5000) == 1.0

    def fraction(env_steps: int) -> float:
        on = 0
        for i in range(400):
            method.start_episode(i, env_steps)
            on += method.enabled[i]
        return on / 400

    assert 0.1 < fraction(0) < 0.3 and fraction(1000) == 1.0
    # a disabled episode runs the base alone: zero residual whatever the actor says
    method.enabled = {0: False, 1: True}
    obs = {"observation.state": torch.randn(2, 2, *policy.features["observation.state"]["shape"])}
    inputs = method.observe(obs)
    residual, actions, _ = method.act(obs, inputs, [0, 1], explore=True)
    assert torch.equal(residual[0], torch.zeros_like(residual[0])) and residual[1].abs().sum() > 0
    base_executed = inputs[0, policy.feature_dim:].view(policy.n_exec, policy.action_dim)
    assert torch.allclose(policy.normalize_actions(actions[0]), base_executed, atol=1e-5)


def test_residual_with_ppo_runs_updates_and_saves_a_residual_checkpoint(tmp_path, base_ckpt):  # noqa: F811
    summary = finetune(finetune_cfg({"name": "residual_ppo", "ppo_rollout": 8, "ppo_minibatch": 4}, base_ckpt,
                                    tmp_path / "run"), make_envs, log=lambda m: None)
    assert summary["algo"] == "residual_ppo" and summary["env_steps"] == 64 and summary["updates"] > 0
    assert {"policy_loss", "value_loss", "clip_frac"} <= set(summary["last_metrics"])
    assert all(math.isfinite(v) for v in summary["last_metrics"].values())
    assert isinstance(load_policy(summary["checkpoint"]), ResidualPolicy)


def test_ppo_moves_the_actor_towards_the_rewarded_action():
    """One-decision episodes rewarded by -(a - 0.5)^2: a few PPO updates move the mean action from 0 to 0.5."""
    import numpy as np

    from robopolicy.rl.ppo import PPO
    from robopolicy.rl.sac import TanhGaussianActor

    torch.manual_seed(0)
    actor = TanhGaussianActor(2, 1, [32, 32], init_scale=0.01)
    ppo = PPO(2, 1, ResidualConfig(hidden=[32, 32], lr=3e-3, ppo_rollout=128, ppo_minibatch=32), actor=actor)
    obs = torch.ones(1, 2)
    generator = torch.Generator().manual_seed(0)
    start = float(actor.deterministic(obs).detach())
    for _ in range(15):
        while not ppo.ready():
            action, extras = ppo.act(obs, explore=True, generator=generator)
            reward = -(action[0, 0] - 0.5) ** 2
            ppo.rollouts.add({"obs": obs.numpy(), "next_obs": obs.numpy(), "reward": np.array([reward], np.float32),
                              "done": np.ones(1, np.float32), "steps": np.ones(1, np.float32),
                              "u": extras["u"].numpy(), "log_prob": extras["log_prob"].numpy(),
                              "policy_mask": np.ones(1, np.float32)})
        metrics = ppo.update()
        assert len(ppo.rollouts) == 0 and all(math.isfinite(v) for v in metrics.values())
    assert abs(start) < 0.1 and abs(float(actor.deterministic(obs).detach()) - 0.5) < 0.15


def test_residual_optimizer_switch_rejects_unknown_names(base_ckpt):  # noqa: F811
    import pytest

    with pytest.raises(ValueError, match="optimizer='trpo' is unknown"):
        from_mapping(ResidualConfig, {"optimizer": "trpo", "hidden": [16]}, where="algo")


def test_a_per_step_residual_decides_every_step_and_loads_as_such(tmp_path, base_ckpt):  # noqa: F811
    """`algo.n_action_steps=1`: the residual runs the first action of each base chunk, corrected, then decides
    again (ResiP's per-step residual); the refined checkpoint keeps that, so eval and deploy do the same."""
    base = load_policy(base_ckpt)
    assert base.n_action_steps > 1
    summary = finetune(finetune_cfg({"name": "residual", "explore_steps": 32, "n_action_steps": 1}, base_ckpt,
                                    tmp_path / "run"), make_envs, log=lambda m: None)
    assert summary["env_steps"] == 64 and summary["updates"] > 0
    policy = load_policy(summary["checkpoint"])
    assert policy.n_action_steps == 1 and policy.latent_dim == base.action_dim
    assert policy.exec_slice == slice(base.n_obs_steps - 1, base.n_obs_steps)
    for bad in (0, 99):
        with pytest.raises(ValueError, match="between 1 and the base's"):
            refined(ResidualPolicy, base_ckpt, n_action_steps=bad)
