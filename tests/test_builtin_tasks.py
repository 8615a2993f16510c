"""Built-in MuJoCo tasks: seeded resets, spaces, experts (clean, noisy, sloppy, bimodal), control modes, images."""

from __future__ import annotations

import numpy as np
import pytest

from sim import make_env, make_expert
from sim.builtin import BUILTIN_TASKS, SO100_TASKS, make_builtin_env, make_builtin_expert
from sim.builtin.tasks import OBSTACLE_POS

TASKS = [t for t in BUILTIN_TASKS if t not in SO100_TASKS]  # the SO-100 tasks: tests/test_so100_task.py


def rollout(env, expert, seed: int) -> tuple[bool, int, list[np.ndarray]]:
    """One expert episode: (success, steps, states)."""
    obs, _ = env.reset(seed=seed)
    expert.reset(seed=seed)
    states = [obs["observation.state"]]
    for step in range(1, env.unwrapped.max_episode_steps + 1):
        obs, reward, terminated, truncated, info = env.step(expert.act({**obs, "goal": env.unwrapped.goal}))
        assert np.isfinite(reward)
        states.append(obs["observation.state"])
        if terminated or truncated:
            assert terminated == info["success"]
            return info["success"], step, states
    raise AssertionError("episode neither terminated nor truncated at max_episode_steps")


def success_rate(task: str, seeds, **expert_kwargs) -> tuple[float, float]:
    env = make_env(f"builtin/{task}")
    results = [rollout(env, make_expert(f"builtin/{task}", **expert_kwargs), s) for s in seeds]
    return float(np.mean([r[0] for r in results])), float(np.mean([r[1] for r in results]))


@pytest.mark.parametrize("task", TASKS)
def test_reset_and_steps_are_determined_by_the_seed(task):
    env_a, env_b = make_builtin_env(task), make_builtin_env(task)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(15, 4)).astype(np.float32)
    obs_a, _ = env_a.reset(seed=7)
    obs_b, _ = env_b.reset(seed=7)
    np.testing.assert_array_equal(obs_a["observation.state"], obs_b["observation.state"])
    for action in actions:
        obs_a, *_ = env_a.step(action)
        obs_b, *_ = env_b.step(action)
    np.testing.assert_array_equal(obs_a["observation.state"], obs_b["observation.state"])
    other, _ = env_b.reset(seed=8)
    first, _ = env_a.reset(seed=7)
    assert not np.allclose(first["observation.state"], other["observation.state"])


@pytest.mark.parametrize("task", TASKS)
def test_spaces_keys_and_metadata(task):
    env = make_env(f"builtin/{task}")
    obs, info = env.reset(seed=0)
    assert set(obs) == {"observation.state"} and info["success"] is False
    assert obs in env.observation_space
    state = obs["observation.state"]
    assert state.dtype == np.float32 and state.ndim == 1
    base = env.unwrapped
    names = base.feature_names["observation.state"]
    assert len(names) == state.shape[0] == len(set(names))
    assert base.feature_names["action"] == ["ee.dx", "ee.dy", "ee.dz", "gripper"]
    assert (
        env.action_space.shape == (4,)
        and np.all(env.action_space.low == -1)
        and np.all(env.action_space.high == 1)
    )
    assert 10 <= base.fps <= 20 and base.task_description
    # the state carries what the experts read: end effector, gripper and the target
    ee = state[[names.index(n) for n in ("ee.x", "ee.y", "ee.z")]]
    np.testing.assert_allclose(ee, base.data.site_xpos[base.ik.site_id], atol=1e-6)
    assert "gripper.opening" in names
    assert {"target.x", "target.y", "target.z"} <= set(names) or {"pad_yellow.x", "cube_red.x"} <= set(names)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs in env.observation_space and isinstance(info["success"], bool)


def test_unknown_task_and_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="available are reach, push, pick_place, push_two_ways, pick_color"):
        make_builtin_env("stack")
    with pytest.raises(ValueError, match="available are"):
        make_builtin_expert("stack")
    with pytest.raises(ValueError, match="Unknown control 'torque'"):
        make_builtin_env("reach", control="torque")
    with pytest.raises(ValueError, match="Unknown camera 'side'"):
        make_builtin_env("reach", images=["side"])
    env = make_builtin_env("reach")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        env.step(np.zeros(3))


def test_episode_truncates_at_max_steps():
    env = make_builtin_env("push", max_episode_steps=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros(4, np.float32))[2:4] for _ in range(5)]
    assert flags[-1] == (False, True) and all(f == (False, False) for f in flags[:-1])


@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds_on_seeds(task):
    rate, _ = success_rate(task, range(10))
    assert rate >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds_on_100_seeds(task):
    rate, _ = success_rate(task, range(100))
    assert rate >= 0.95


@pytest.mark.parametrize("task", TASKS)
def test_noisy_and_sloppy_experts_mostly_succeed_and_sloppy_is_slower(task):
    noisy_rate, _ = success_rate(task, range(10), noise=0.1)
    sloppy_rate, sloppy_len = success_rate(task, range(10), sloppy=True)
    _, clean_len = success_rate(task, range(10))
    assert noisy_rate >= 0.7 and sloppy_rate >= 0.6
    assert sloppy_len > 1.2 * clean_len


def test_sloppy_actions_differ_from_clean_ones():
    env = make_builtin_env("pick_place")
    obs, _ = env.reset(seed=0)
    clean, sloppy = make_builtin_expert("pick_place"), make_builtin_expert("pick_place", sloppy=True, seed=0)
    assert not np.allclose(clean.act(obs), sloppy.act(obs))


def side_passed(states: list[np.ndarray], names: list[str]) -> float:
    """Sign of the block's y when it crossed the wall's x (0 if it never did)."""
    x, y = names.index("object.x"), names.index("object.y")
    for s in states:
        if s[x] >= OBSTACLE_POS[0]:
            return float(np.sign(s[y] - OBSTACLE_POS[1]))
    return 0.0


def test_push_two_ways_expert_goes_both_ways_and_straight_pushing_fails():
    env = make_builtin_env("push_two_ways")
    names = env.feature_names["observation.state"]
    sides, successes = [], []
    for seed in range(12):
        success, _, states = rollout(env, make_builtin_expert("push_two_ways"), seed)
        successes.append(success)
        sides.append(side_passed(states, names))
    assert sum(successes) >= 11
    assert sides.count(1.0) >= 3 and sides.count(-1.0) >= 3, sides
    # The mean of the two modes, a straight push, drives the block into the wall. The push expert shares
    # the state layout and pushes straight to the target.
    straight = [rollout(env, make_builtin_expert("push"), seed)[0] for seed in range(3)]
    assert not any(straight)


def test_joint_pos_control_tracks_targets():
    env = make_builtin_env("reach", control="joint_pos")
    assert env.action_space.shape == (8,)
    assert env.feature_names["action"][-1] == "gripper"
    obs, _ = env.reset(seed=0)
    target = env.unwrapped.home_qpos + np.array([0.3, -0.2, 0.2, 0.3, -0.2, 0.2, 0.3])
    action = np.append(target, 1.0).astype(np.float32)
    for _ in range(15):
        obs, *_ = env.step(action)
    np.testing.assert_allclose(obs["observation.state"][:7], target, atol=0.02)
    assert obs["observation.state"][env.feature_names["observation.state"].index("gripper.opening")] < 0.005


def test_ee_delta_moves_the_end_effector_and_keeps_it_above_the_table():
    env = make_builtin_env("reach")
    obs, _ = env.reset(seed=0)
    start = obs["observation.state"][14:17].copy()
    for _ in range(5):
        obs, *_ = env.step(np.array([1.0, 0.0, 0.0, -1.0], np.float32))
    moved = obs["observation.state"][14:17] - start
    assert 0.15 < moved[0] < 0.21 and abs(moved[1]) < 0.01 and abs(moved[2]) < 0.02
    for _ in range(20):
        obs, *_ = env.step(np.array([0.0, 0.0, -1.0, -1.0], np.float32))
    assert 0.0 < obs["observation.state"][16] < 0.02


def test_images_are_nonblank_and_follow_the_arm():
    env = make_builtin_env("pick_place", images=True)
    assert env._renderer is None  # created lazily, on the first observation
    obs, _ = env.reset(seed=0)
    image = obs["observation.images.front"]
    assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
    assert image.std() > 10 and obs in env.observation_space
    for _ in range(5):
        obs, *_ = env.step(np.array([0.0, 1.0, -1.0, 1.0], np.float32))
    moved = obs["observation.images.front"]
    assert np.abs(moved.astype(int) - image.astype(int)).mean() > 1.0
    env.close()


def test_camera_list_and_image_size_and_state_only_envs_never_render():
    env = make_builtin_env("push", images=["front", "wrist"], image_size=64)
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"observation.state", "observation.images.front", "observation.images.wrist"}
    assert obs["observation.images.wrist"].shape == (64, 64, 3) and obs["observation.images.wrist"].std() > 5
    env.close()
    state_only = make_builtin_env("push")
    state_only.reset(seed=0)
    state_only.step(np.zeros(4, np.float32))
    assert state_only._renderer is None and state_only._video_renderer is None
    video = make_builtin_env("push", render_mode="rgb_array")
    video.reset(seed=0)
    frame = video.render()
    assert frame.shape == (240, 320, 3) and frame.std() > 10
    video.close()


@pytest.mark.parametrize("task", ["push", "pick_place"])
def test_joint_pos_expert_succeeds_in_joint_space(task):
    env = make_builtin_env(task, control="joint_pos")
    expert = make_builtin_expert(task, control="joint_pos")
    obs, _ = env.reset(seed=0)
    assert expert.act(obs).shape == (8,)
    assert all(rollout(env, expert, seed)[0] for seed in range(3))


@pytest.mark.parametrize("task", TASKS)
def test_reward_is_dense_and_grows_towards_success(task):
    env = make_builtin_env(task)
    expert = make_builtin_expert(task)
    obs, _ = env.reset(seed=1)
    expert.reset(seed=1)
    rewards = []
    for _ in range(env.max_episode_steps):
        obs, reward, terminated, truncated, _ = env.step(expert.act({**obs, "goal": env.goal}))
        rewards.append(reward)
        if terminated or truncated:
            break
    assert terminated and len(set(np.round(rewards, 6))) > len(rewards) // 2  # shaped, not a sparse 0/1
    assert rewards[-1] > max(rewards[:-1]) and rewards[-2] > rewards[0]


@pytest.mark.parametrize("task", ["push", "push_two_ways"])
def test_push_state_spells_out_yaw_relative_vectors_and_the_push_frame(task):
    env = make_builtin_env(task)
    names = env.feature_names["observation.state"]
    actions = np.random.default_rng(1).uniform(-1, 1, size=(8, 4)).astype(np.float32)
    obs, _ = env.reset(seed=3)
    for action in actions:
        obs, *_ = env.step(action)
    s = {n: float(v) for n, v in zip(names, obs["observation.state"])}
    block = np.array([s["object.x"], s["object.y"], s["object.z"]])
    np.testing.assert_allclose(block, env.data.xpos[env.model.body("block").id], atol=1e-6)
    ee, target = np.array([s["ee.x"], s["ee.y"], s["ee.z"]]), np.array([s["target.x"], s["target.y"]])
    rel = [s["object_from_ee.x"], s["object_from_ee.y"], s["object_from_ee.z"]]
    np.testing.assert_allclose(rel, block - ee, atol=1e-6)
    np.testing.assert_allclose([s["target_from_object.x"], s["target_from_object.y"]], target - block[:2], atol=1e-6)
    # yaw of the quaternion, times 4 (a cube's quarter-turn symmetry)
    qw, _, _, qz = env.data.qpos[env._obj_qpos][3:7]
    yaw4 = 4 * 2 * np.arctan2(qz, qw)
    np.testing.assert_allclose([s["object.yaw4.cos"], s["object.yaw4.sin"]], [np.cos(yaw4), np.sin(yaw4)], atol=1e-3)
    # the push frame: unit direction block -> target, the hand's offset along it and to its left
    u = np.array([s["push_dir.x"], s["push_dir.y"]])
    np.testing.assert_allclose(u, (target - block[:2]) / np.linalg.norm(target - block[:2]), atol=1e-5)
    offset = s["ee_in_push_frame.along"] * u + s["ee_in_push_frame.lateral"] * np.array([-u[1], u[0]])
    np.testing.assert_allclose(offset, ee[:2] - block[:2], atol=1e-6)


def test_catch_ball_moves_with_physics_time_and_pausing_loses_it():
    """The ball crosses at constant velocity whoever steps the physics; the expert catches it on every seed,
    and the same expert pausing 2 of every 6 steps (stop-and-go execution) never does."""
    env, expert = make_builtin_env("catch"), make_builtin_expert("catch")
    obs, _ = env.reset(seed=3)
    start = env.ball_start.copy()
    state = env.feature_names["observation.state"]
    for _ in range(5):
        obs, *_ = env.step(np.array([0.0, 0.0, 0.0, -1.0], np.float32))
    ball = obs["observation.state"][[state.index(f"target.{a}") for a in "xyz"]]
    np.testing.assert_allclose(ball, start + env.ball_velocity * 0.5, atol=1e-5)
    successes = {}
    for pause in (0, 2):
        wins = 0
        for seed in range(20):
            obs, _ = env.reset(seed=seed)
            expert.reset(seed)
            for k in range(env.max_episode_steps):
                action = expert.act(obs)
                if k % (4 + pause) >= 4:
                    action = np.array([0.0, 0.0, 0.0, -1.0], np.float32)
                obs, _, success, truncated, _ = env.step(action)
                if success or truncated:
                    break
            wins += success
        successes[pause] = wins
    assert successes == {0: 20, 2: 0}
