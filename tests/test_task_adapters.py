"""MetaWorld and PushT behind the project's observation keys (real simulators, no stand-ins)."""

import numpy as np
import pytest

import sim
from sim import UnknownTaskError


def run_expert(task: str, seed: int, max_steps: int = 300) -> tuple[bool, int]:
    env, expert = sim.make_env(task), sim.make_expert(task)
    obs, _ = env.reset(seed=seed)
    expert.reset(seed)
    for t in range(max_steps):  # noqa: B007  (t is the episode length afterwards)
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            break
    env.close()
    return info["success"], t + 1


@pytest.mark.parametrize("task", ["metaworld/push-v3", "metaworld/drawer-open-v3", "metaworld/pick-place-v3"])
def test_metaworld_expert_succeeds(task):
    results = [run_expert(task, seed) for seed in range(3)]
    assert all(ok for ok, _ in results), results


def test_metaworld_observation_keys_goal_visible_and_seeded():
    env = sim.make_env("metaworld/push-v3")
    assert set(env.observation_space.spaces) == {"observation.state"}
    assert env.action_space.shape == (4,)
    assert len(env.unwrapped.feature_names["observation.state"]) == 39
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    c, _ = env.reset(seed=6)
    np.testing.assert_array_equal(a["observation.state"], b["observation.state"])
    goal_a, goal_c = a["observation.state"][-3:], c["observation.state"][-3:]
    assert np.abs(goal_a).sum() > 0, "the goal must be observable"
    assert not np.allclose(goal_a, goal_c), "different seeds must give different goals"
    assert a["observation.state"].dtype == np.float32


def test_metaworld_any_v3_task_name_and_unknown_name():
    env = sim.make_env("metaworld/window-open-v3")
    obs, _ = env.reset(seed=0)
    obs, reward, *_ , info = env.step(env.action_space.sample())
    assert "success" in info and np.isfinite(reward)
    with pytest.raises(ValueError, match="push-v3"):
        sim.make_env("metaworld/no-such-task-v3")


def test_metaworld_images_show_the_scene():
    env = sim.make_env("metaworld/push-v3", images=True)
    obs, _ = env.reset(seed=0)
    image = obs["observation.images.corner4"]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert image.std() > 10
    expert = sim.make_expert("metaworld/push-v3")
    for _ in range(15):
        obs, *_ = env.step(expert.act(obs))
    assert np.abs(obs["observation.images.corner4"].astype(int) - image.astype(int)).mean() > 0.5
    env.close()


def test_metaworld_expert_noise_and_sloppy_modes_differ_and_stay_in_bounds():
    env = sim.make_env("metaworld/push-v3")
    obs, _ = env.reset(seed=0)
    clean = sim.make_expert("metaworld/push-v3").act(obs)
    noisy = sim.make_expert("metaworld/push-v3", noise=0.3, seed=1).act(obs)
    sloppy = sim.make_expert("metaworld/push-v3", sloppy=True, seed=1)
    actions = [sloppy.act(obs) for _ in range(20)]
    assert not np.allclose(clean, noisy)
    assert all(np.all(np.abs(a) <= 1) for a in actions + [noisy])


def test_pusht_adapter():
    env = sim.make_env("pusht", images=True)
    obs, _ = env.reset(seed=0)
    assert obs["observation.state"].shape == (5,)
    assert obs["observation.images.top"].shape == (96, 96, 3)
    obs, reward, terminated, truncated, info = env.step(np.array([256.0, 256.0], dtype=np.float32))
    assert info["success"] in (True, False) and np.isfinite(reward)
    with pytest.raises(UnknownTaskError, match="no scripted expert"):
        sim.make_expert("pusht")


@pytest.mark.parametrize("name", ["nope", "builtin/nope", "metaworld", "foo/bar"])
def test_unknown_task_names_are_refused_clearly(name):
    with pytest.raises(ValueError) as e:
        sim.make_env(name)
    assert name.split("/")[-1] in str(e.value) or name in str(e.value)
