"""DART collection: the env executes the expert's perturbed action, the store keeps the expert's clean label."""

from __future__ import annotations

import numpy as np
import pytest

from robopolicy.collect import collect
from robopolicy.data import DemoStore
from robopolicy.features import features_from_env
from sim import make_env, make_expert
from sim.builtin import make_builtin_env
from sim.builtin.experts import EXPERT_CLASSES
from sim.vector import make_vector_env


def test_explore_returns_the_clean_label_and_a_perturbed_executed_action():
    env = make_builtin_env("push")
    obs, _ = env.reset(seed=0)
    explorer = EXPERT_CLASSES["push"]("push", dart=0.3, seed=0)
    clean = EXPERT_CLASSES["push"]("push", dart=0.0, seed=0)
    label, executed = explorer.explore(obs)
    np.testing.assert_array_equal(label, clean.act(obs))
    assert not np.allclose(label[:3], executed[:3]) and label[3] == executed[3]  # the gripper is not perturbed
    assert np.all(np.abs(executed) <= 1.0)
    label, executed = clean.explore(obs)
    np.testing.assert_array_equal(label, executed)


def test_only_the_push_two_ways_expert_explores_by_default():
    assert make_expert("builtin/push_two_ways").dart > 0
    assert all(make_expert(f"builtin/{task}").dart == 0 for task in ("reach", "push", "pick_place"))
    with pytest.raises(ValueError, match="dart must be a non-negative std"):
        EXPERT_CLASSES["push"]("push", dart=-0.1)


def test_joint_pos_expert_explores_in_joint_space():
    env = make_builtin_env("push", control="joint_pos")
    obs, _ = env.reset(seed=0)
    label, executed = EXPERT_CLASSES["push"]("push", dart=0.3, seed=0, control="joint_pos").explore(obs)
    assert label.shape == executed.shape == (8,) and not np.allclose(label[:7], executed[:7])


def test_collect_records_labels_while_the_env_runs_the_perturbed_actions(tmp_path):
    """Replaying the stored actions open-loop must not reproduce the stored states (they were not the
    executed actions), while a clean expert run along the stored states gives exactly the stored actions."""
    task = "builtin/push"
    probe = make_env(task)
    features = features_from_env(probe.observation_space, probe.action_space, probe.unwrapped.feature_names)
    store = DemoStore.create(tmp_path / "dart", features=features, fps=probe.unwrapped.fps)
    envs = make_vector_env(task, 2, autoreset="disabled")
    try:
        summary = collect(envs, [EXPERT_CLASSES["push"]("push", dart=0.5) for _ in range(2)], store, 3, seed=0, task="push")
    finally:
        envs.close()
    assert summary["episodes"] == 3 and summary["success_rate"] == 1.0
    for meta in store.episodes:
        frames = store.get_episode(meta["index"])
        assert meta["extra"]["dart"] == 0.5
        clean = EXPERT_CLASSES["push"]("push", dart=0.0)
        clean.reset(meta["extra"]["seed"])
        labels = np.stack([clean.act({"observation.state": s}) for s in frames["observation.state"]])
        np.testing.assert_allclose(frames["action"], labels, atol=1e-6)
        replay, _ = probe.reset(seed=meta["extra"]["seed"])
        np.testing.assert_array_equal(replay["observation.state"], frames["observation.state"][0])
        for action in frames["action"][:-1]:
            replay, *_ = probe.step(action)
        assert not np.allclose(replay["observation.state"], frames["observation.state"][-1], atol=1e-3)


@pytest.mark.parametrize("task", ["push", "push_two_ways"])
def test_pushing_experts_recover_from_strong_perturbations(task):
    env = make_builtin_env(task)
    successes = []
    # 20 seeds, not 8: on one machine's MuJoCo/numpy build push_two_ways lost seeds 4 and 7 of 0-7 (0.75) while
    # recovering on 37 of seeds 0-39 (0.925); 8 episodes are too few for a 0.85 line
    for seed in range(20):
        expert = EXPERT_CLASSES[task](task, dart=0.6, seed=seed)
        obs, _ = env.reset(seed=seed)
        for _ in range(env.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(expert.explore({**obs, "goal": env.goal})[1])
            if terminated or truncated:
                break
        successes.append(info["success"])
    assert np.mean(successes) >= 0.85, successes


def test_collect_cli_sets_dart_for_builtin_tasks_and_refuses_it_elsewhere(cli, tmp_path):
    from robopolicy.data import DemoStore

    cli("collect", "task=builtin/push", "episodes=2", f"out={tmp_path / 'push'}", "expert.dart=0.4", check=True)
    with DemoStore.open(tmp_path / "push") as store:
        assert [ep["extra"]["dart"] for ep in store.episodes] == [0.4, 0.4]
    proc = cli("collect", "task=metaworld/push-v3", "episodes=1", f"out={tmp_path / 'mw'}", "expert.dart=0.4")
    assert proc.returncode != 0 and "expert.dart" in proc.stderr and not (tmp_path / "mw").exists()
