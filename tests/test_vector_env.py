"""Vector envs: 2 worker processes step built-in tasks, reset finished episodes in the same step and
reproduce single envs exactly given the same seeds."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from sim import make_env
from sim.vector import make_vector_env

ACTIONS = np.random.default_rng(0).uniform(-1, 1, size=(8, 2, 4)).astype(np.float32)


@pytest.fixture
def push_pair():
    envs = make_vector_env("builtin/push", 2, max_episode_steps=4)
    yield envs
    envs.close()


def test_two_workers_match_single_envs_with_the_same_seeds(push_pair):
    assert isinstance(push_pair, gym.vector.AsyncVectorEnv) and push_pair.num_envs == 2
    obs, _ = push_pair.reset(seed=[3, 11])
    singles = [make_env("builtin/push", max_episode_steps=4) for _ in range(2)]
    single_obs = [env.reset(seed=s)[0] for env, s in zip(singles, (3, 11))]
    for i in range(2):
        np.testing.assert_array_equal(obs["observation.state"][i], single_obs[i]["observation.state"])
    for step in range(3):
        obs, reward, terminated, truncated, info = push_pair.step(ACTIONS[step])
        for i, env in enumerate(singles):
            s_obs, s_reward, s_term, s_trunc, s_info = env.step(ACTIONS[step, i])
            np.testing.assert_array_equal(obs["observation.state"][i], s_obs["observation.state"])
            assert (
                reward[i] == pytest.approx(s_reward) and terminated[i] == s_term and truncated[i] == s_trunc
            )
            assert info["success"][i] == s_info["success"]


def test_finished_episodes_reset_in_the_same_step(push_pair):
    obs, _ = push_pair.reset(seed=5)  # env i gets seed 5 + i
    single = make_env("builtin/push", max_episode_steps=4)
    single.reset(seed=6)
    for step in range(4):
        obs, reward, terminated, truncated, info = push_pair.step(ACTIONS[step])
        last, *_ = single.step(ACTIONS[step, 1])
    assert truncated.tolist() == [True, True] and not terminated.any()
    # SAME_STEP: the returned observation starts the next episode, the last one is in final_obs
    np.testing.assert_array_equal(info["final_obs"][1]["observation.state"], last["observation.state"])
    first_of_next, _ = single.reset()
    np.testing.assert_array_equal(obs["observation.state"][1], first_of_next["observation.state"])
    obs, reward, terminated, truncated, info = push_pair.step(ACTIONS[4])
    assert not truncated.any() and "final_obs" not in info


def test_one_env_is_in_process_and_seeded():
    envs = make_vector_env("builtin/reach", 1, seed=4)
    assert isinstance(envs, gym.vector.SyncVectorEnv)
    obs, _ = envs.reset(seed=4)
    expected, _ = make_env("builtin/reach").reset(seed=4)
    np.testing.assert_array_equal(obs["observation.state"][0], expected["observation.state"])
    obs, *_ = envs.step(ACTIONS[0, :1])
    assert obs["observation.state"].shape == (1, expected["observation.state"].shape[0])
    envs.close()


def test_images_come_through_shared_memory():
    envs = make_vector_env("builtin/pick_place", 2, images=True)
    obs, _ = envs.reset(seed=0)
    images = obs["observation.images.front"]
    assert images.shape == (2, 96, 96, 3) and images.dtype == np.uint8
    assert images.std() > 10 and not np.array_equal(images[0], images[1])  # different cube placements
    envs.close()


def test_bad_num_envs_raises():
    with pytest.raises(ValueError, match="num_envs must be at least 1"):
        make_vector_env("builtin/reach", 0)
