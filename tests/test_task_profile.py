"""Defaults derived from the task and the base at the start of `robopolicy finetune` (robopolicy/rl/task_profile.py):
the README's recipes fall out of measured properties, explicit settings win, and a base without noise authority
is named as such."""

from __future__ import annotations

import pytest
from test_rl_core import finetune_cfg, make_base, make_envs

from robopolicy.finetune import finetune
from robopolicy.loading import load_policy
from robopolicy.rl.task_profile import LOW_AUTHORITY, TaskProfile, derive_defaults, noise_authority


def profile(**kw) -> TaskProfile:
    base = {"episodes": 20, "base_success": 0.4, "mean_length": 60.0, "horizon": 150, "step_reward": 0.3,
            "shaped": True, "noise_authority": 0.2}
    return TaskProfile(**{**base, **kw})


def chosen(derived) -> dict:
    return {c.key: c.value for c in derived.choices}


def test_the_metaworld_residual_recipe_follows_from_its_reward_and_episode_length():
    # MetaWorld's shaped reward reaches 10 per step; a weak base's episodes run long
    mw = profile(mean_length=215.0, horizon=300, step_reward=9.6)
    assert chosen(derive_defaults(mw, "residual", set())) == {
        "reward": "dense", "reward_scale": 0.2, "step_penalty": 2.0, "algo.n_action_steps": 1, "algo.n_step": 10}


@pytest.mark.parametrize("step_reward", [2.01, 2.5, 3.0, 7.3, 9.5, 9.6, 9.71, 10.0, 18.2, 33.3, 250.0])
def test_the_scaled_reward_of_a_step_short_of_success_stays_under_the_step_penalty(step_reward):
    """The scale is 2 / m rounded down to two digits: rounded to nearest, MetaWorld's 9.6 got 0.21 (2.016 per step:
    hovering by the goal paid); two digits keep the scale within 10% of 2 / m."""
    scale = chosen(derive_defaults(profile(step_reward=step_reward), "residual", set()))["reward_scale"]
    assert scale * step_reward <= 2.0 + 1e-9
    assert scale * step_reward >= 0.9 * 2.0


def test_chain_methods_update_on_more_decisions_on_long_episodes():
    mw = profile(mean_length=215.0, horizon=300, step_reward=9.6)
    assert chosen(derive_defaults(mw, "reinflow", set())) == {
        "reward": "dense", "reward_scale": 0.2, "step_penalty": 2.0, "algo.ppo_rollout": 2048,
        "algo.ppo_minibatch": 512, "algo.ppo_clip": 0.03, "algo.actor_lr": 4.5e-5}
    assert chosen(derive_defaults(mw, "dppo", set())) == chosen(derive_defaults(mw, "reinflow", set()))
    assert chosen(derive_defaults(mw, "reinflow", {"algo.ppo_rollout"})).get("algo.ppo_rollout") is None


def test_the_builtin_recipes_follow_from_theirs():
    builtin = profile(mean_length=115.0, horizon=150, step_reward=1.9)
    assert chosen(derive_defaults(builtin, "residual", set())) == {
        "reward": "dense", "reward_scale": 1.0, "step_penalty": 2.0, "algo.n_step": 1}
    assert chosen(derive_defaults(builtin, "reinflow", set())) == {
        "reward": "dense", "reward_scale": 1.0, "step_penalty": 2.0}
    assert chosen(derive_defaults(builtin, "steer", set())) == {"reward": "sparse", "step_penalty": 1.0}
    # a task whose reward is success alone: nothing to shape with
    assert chosen(derive_defaults(profile(shaped=False), "residual", set()))["reward"] == "sparse"


def test_explicit_settings_win_and_steer_names_a_base_without_noise_authority():
    mw = profile(mean_length=215.0, horizon=300, step_reward=4.8, noise_authority=0.004)
    derived = derive_defaults(mw, "residual", {"reward", "algo.n_step"}, given_reward="sparse")
    assert chosen(derived) == {"step_penalty": 1.0, "algo.n_action_steps": 1}  # sparse as given: its penalty
    steer = derive_defaults(mw, "steer", set())
    assert len(steer.advice) == 1 and "algo=residual" in steer.advice[0] and str(LOW_AUTHORITY) in steer.advice[0]
    assert not derive_defaults(profile(noise_authority=0.3), "steer", set()).advice
    bottleneck = derive_defaults(profile(noise_authority=0.01), "steer_bottleneck", set())  # steers a VIB latent
    assert not bottleneck.advice


def test_bottleneck_steering_gets_the_residual_recipe_it_acts_like():
    """A residual on the VIB latent moves the executed actions as a residual on them does: the shaped reward under
    the step penalty and, on long episodes, per-step decisions with 10-step TD; steering's chunk-level n_step stays
    on short ones."""
    mw = profile(mean_length=215.0, horizon=300, step_reward=9.6)
    assert chosen(derive_defaults(mw, "steer_bottleneck", set())) == {
        "reward": "dense", "reward_scale": 0.2, "step_penalty": 2.0, "algo.n_action_steps": 1, "algo.n_step": 10}
    builtin = profile(mean_length=115.0, horizon=150, step_reward=1.9)
    assert chosen(derive_defaults(builtin, "steer_bottleneck", set())) == {
        "reward": "dense", "reward_scale": 1.0, "step_penalty": 2.0}
    assert chosen(derive_defaults(profile(shaped=False), "steer_bottleneck", set()))["reward"] == "sparse"


def test_noise_authority_of_a_base(tmp_path):
    base = load_policy(make_base(tmp_path / "base"))
    envs = make_envs(2)
    first, _ = envs.reset(seed=0)
    envs.close()
    spread = noise_authority(base, first)
    assert 0.0 < spread < 2.0  # an untrained flow base: its chunks follow its noise
    assert noise_authority(base, first) == spread  # seeded: the same figure again


def test_finetune_measures_the_task_and_fills_only_what_was_not_given(tmp_path):
    ckpt = make_base(tmp_path / "base")
    cfg = finetune_cfg({"name": "residual", "explore_steps": 32}, ckpt, tmp_path / "run")
    cfg["eval"].update(base_episodes=4)
    logs: list[str] = []
    summary = finetune(cfg, make_envs, log=logs.append, explicit={"reward_scale", "algo.explore_steps"})
    assert summary["task_profile"]["episodes"] == 4 and summary["task_profile"]["noise_authority"] is not None
    assert summary["task_profile"]["horizon"] == 10  # the test's episode limit
    assert set(summary["derived_defaults"]) == {"reward", "step_penalty", "algo.n_step"}  # reward_scale was given
    assert summary["reward"]["reward"] == summary["derived_defaults"]["reward"]["value"]
    assert any(line.startswith("default reward=") for line in logs)
    # a programmatic call: every key of the mapping counts as given, so nothing is replaced
    cfg2 = finetune_cfg({"name": "residual", "explore_steps": 32}, ckpt, tmp_path / "run2")
    cfg2["eval"].update(base_episodes=4)
    assert finetune(cfg2, make_envs, log=lambda m: None)["derived_defaults"] == {}


if __name__ == "__main__":
    pytest.main([__file__])
