"""Language tasks: the instruction names the goal, success requires it, any phrasing can be evaluated, and the
instruction travels through rollouts and collection into the store."""

from __future__ import annotations

import numpy as np
import pytest

from robopolicy.collect import collect
from robopolicy.data import DemoStore
from robopolicy.features import features_from_env
from robopolicy.rollout import run_episodes
from sim import make_env, make_expert
from sim.builtin.tasks import SIDES
from sim.vector import make_vector_env


def expert_episode(env, expert, seed: int, goal: dict | None = None) -> bool:
    obs, _ = env.reset(seed=seed)
    expert.reset(seed)
    goal = env.unwrapped.goal if goal is None else goal
    for _ in range(env.unwrapped.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert.act({**obs, "goal": goal}))
        if terminated or truncated:
            return bool(info["success"])
    return False


def test_pick_color_expert_succeeds_on_the_instructed_pair_and_fails_on_another():
    env, expert = make_env("builtin/pick_color"), make_expert("builtin/pick_color")
    seeds = range(20)
    assert sum(expert_episode(env, expert, s) for s in seeds) >= 19
    # the expert told another pair than the env's goal places the wrong cube or on the wrong pad: no success
    wrong = []
    for s in range(6):
        env.reset(seed=s)
        goal = dict(env.unwrapped.goal)
        goal["color"] = next(c for c in env.unwrapped.goal_fields["color"] if c != goal["color"])
        wrong.append(expert_episode(env, expert, s, goal))
    assert not any(wrong)


def test_pick_color_expert_descends_a_cone_over_the_cube_and_closes_only_aligned():
    env, expert = make_env("builtin/pick_color"), make_expert("builtin/pick_color", dart=0.0)
    u = env.unwrapped
    descending_while_far = 0
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        expert.reset(seed)
        start_z = u.data.site_xpos[u._site][2]
        for _ in range(40):
            action = expert.act({**obs, "goal": u.goal})
            ee, cube = u.data.site_xpos[u._site].copy(), u.data.xpos[u._cube_body[u.goal["color"]]].copy()
            xy_error = np.linalg.norm(ee[:2] - cube[:2])
            height = ee[2] - cube[2]
            descending_while_far += bool(xy_error > 0.03 and ee[2] < start_z - 0.05)
            if height < 0.05:  # low only when aligned: inside the cone (height = 1.5 x horizontal error)
                assert xy_error <= (height + 0.004) / 1.5 + 0.01
            if action[3] > 0:  # the first close: at the bottom, over the cube
                assert xy_error < 0.012 and ee[2] < cube[2] + 0.01
                break
            obs, *_ = env.step(action)
        else:
            raise AssertionError(f"seed {seed}: the expert never closed the gripper")
    assert descending_while_far  # one approach, not "above the cube, then straight down"


def test_pick_color_state_gives_every_cube_and_pad_by_colour_with_its_offset_from_the_hand():
    env = make_env("builtin/pick_color")
    names = env.unwrapped.feature_names["observation.state"]
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        obs, *_ = env.step(np.array([0.5, -0.5, -0.5, -1.0], dtype=np.float32))
        state = dict(zip(names, obs["observation.state"]))
        ee = np.array([state["ee.x"], state["ee.y"], state["ee.z"]])
        for color in env.unwrapped.cube_colors:
            body = env.unwrapped.data.body(f"cube_{color}").xpos
            cube = np.array([state[f"cube_{color}.{a}"] for a in "xyz"])
            np.testing.assert_allclose(cube, body, atol=1e-6)
            np.testing.assert_allclose([state[f"cube_{color}.d{a}"] for a in "xyz"], cube - ee, atol=1e-6)
        for pad in env.unwrapped.pad_colors:
            xy = np.array([state[f"pad_{pad}.{a}"] for a in "xy"])
            np.testing.assert_allclose([state[f"pad_{pad}.d{a}"] for a in "xy"], xy - ee[:2], atol=1e-6)


def test_push_two_ways_success_requires_the_instructed_side():
    env, expert = make_env("builtin/push_two_ways"), make_expert("builtin/push_two_ways")
    for seed in range(2):
        env.reset(seed=seed)
        side = env.unwrapped.goal["side"]
        assert side in env.unwrapped.instruction
        other = {"side": next(s for s in SIDES if s != side)}
        assert expert_episode(env, expert, seed)
        assert not expert_episode(env, expert, seed, other)


def test_goal_and_instruction_vary_while_the_scene_does_not_reveal_them():
    env = make_env("builtin/pick_color")
    goals, texts = set(), set()
    for seed in range(40):
        env.reset(seed=seed)
        goals.add(tuple(env.unwrapped.goal.values()))
        texts.add(env.unwrapped.instruction)
        assert env.unwrapped.goal["color"] in env.unwrapped.instruction
    assert len(goals) == 6 and len(texts) > 6
    assert "goal" not in env.observation_space.spaces


def test_instruction_template_override_misinstruction_and_unknown_fields():
    env = make_env("builtin/pick_color", instruction_template="grab the {color} block, set it on {target}")
    env.reset(seed=3)
    goal = env.unwrapped.goal
    assert env.unwrapped.instruction == f"grab the {goal['color']} block, set it on {goal['target']}"
    liar = make_env("builtin/pick_color", misinstruct=True, instruction_template="{color} {target}")
    for seed in range(5):
        liar.reset(seed=seed)
        assert liar.unwrapped.instruction != f"{liar.unwrapped.goal['color']} {liar.unwrapped.goal['target']}"
    with pytest.raises(ValueError, match=r"names \{shape\}, but builtin/pick_color defines \{color\}, \{target\}"):
        make_env("builtin/pick_color", instruction_template="the {shape} one")
    with pytest.raises(ValueError, match="misinstruct needs a task whose instruction names a goal"):
        make_env("builtin/push", misinstruct=True)


def test_collect_records_each_episode_instruction_and_rollouts_hand_it_to_the_agent(tmp_path):
    probe = make_env("builtin/push_two_ways")
    features = features_from_env(probe.observation_space, probe.action_space, probe.unwrapped.feature_names)
    store = DemoStore.create(tmp_path / "s", features=features, fps=10)
    envs = make_vector_env("builtin/push_two_ways", 2, autoreset="disabled", num_workers=1)
    experts = [make_expert("builtin/push_two_ways") for _ in range(2)]
    try:
        summary = collect(envs, experts, store, 4, seed=0, task="unused", instructions=True)
    finally:
        envs.close()
    assert summary["success_rate"] == 1.0
    episodes = DemoStore.open(tmp_path / "s").episodes
    assert sorted(e["extra"]["seed"] for e in episodes) == [0, 1, 2, 3]
    for episode in episodes:  # stored as they finish, not in seed order: each names its seed
        task, seed = episode["task"], episode["extra"]["seed"]
        probe.reset(seed=seed)
        assert task == probe.unwrapped.instruction


def test_rollout_without_instructions_leaves_observations_as_they_were():
    class Zero:
        def reset(self, index, seed):
            pass

        def act(self, obs, active):
            assert "task" not in obs and "goal" not in obs
            return np.zeros((1, 4), np.float32)

    envs = make_vector_env("builtin/reach", 1, autoreset="disabled", max_episode_steps=3)
    episodes = run_episodes(envs, Zero(), 2)
    assert [ep.instruction for ep in episodes] == ["", ""]


def test_eval_of_several_tasks_reports_each_and_their_mean_with_wilson_intervals(cli, tmp_path):
    from conftest import last_json
    from test_rl_core import make_base

    ckpt = make_base(tmp_path / "base", task="builtin/push")  # push and push_two_ways share their features
    summary = last_json(cli("eval", f"ckpt={ckpt}", "tasks=[builtin/push,builtin/push_two_ways]", "episodes=3",
                            "num_envs=1", "max_episode_steps=3", f"out={tmp_path / 'eval'}", check=True))
    assert set(summary["per_task"]) == {"builtin/push", "builtin/push_two_ways"}
    for result in summary["per_task"].values():
        assert result["episodes"] == 3 and len(result["success_ci95"]) == 2
    lo, hi = summary["mean_success_ci95"]
    assert 0.0 <= lo <= summary["mean_success_rate"] <= hi <= 1.0 and summary["episodes"] == 6
