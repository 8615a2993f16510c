"""Vector envs: worker processes each stepping a block of built-in envs through shared memory behave exactly
like gymnasium's in-process SyncVectorEnv (every autoreset mode, partial resets), and a failing env, a dead
or a stuck worker ends the call with a clear error, never a hang."""

from __future__ import annotations

import os
import time
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from sim import make_env
from sim.vector import SharedMemoryVectorEnv, VectorEnvError, make_vector_env

NUM_ENVS = 5  # on 2 workers: blocks of 2 and 3 envs
MAX_STEPS = 3
FAIL, CRASH, HANG = 7.0, 8.0, 9.0  # first action entry that makes a `_Faulty` env misbehave


class _Faulty(gym.Wrapper):
    """A built-in env that raises, exits or hangs when told to by its action (the worker runs it for real)."""

    def step(self, action):
        if action[0] == FAIL:
            raise ValueError("gripper encoder returned garbage")
        if action[0] == CRASH:
            os._exit(3)
        if action[0] == HANG:
            time.sleep(60)
        return self.env.step(action)


def _faulty_reach() -> gym.Env:
    return _Faulty(make_env("builtin/reach"))


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped, not a zombie


def _actions(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(steps, NUM_ENVS, 4)).astype(np.float32)


def _assert_same(ours, theirs, where: str) -> None:
    """Recursive equality of step/reset tuples, obs dicts, arrays and gymnasium info dicts (object arrays
    of final_obs); dtypes included."""
    if isinstance(theirs, tuple):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"{where}: keys {sorted(ours)} != {sorted(theirs)}"
        for key in theirs:
            _assert_same(ours[key], theirs[key], f"{where}[{key}]")
    elif isinstance(theirs, np.ndarray) and theirs.dtype == object:
        assert ours.shape == theirs.shape, where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert (a is None) == (b is None), f"{where}[{i}]"
            if b is not None:
                _assert_same(a, b, f"{where}[{i}]")
    else:
        np.testing.assert_array_equal(ours, theirs, err_msg=where, strict=True)


@pytest.mark.parametrize("autoreset", ["same_step", "next_step", "disabled"])
def test_workers_match_in_process_envs_in_every_autoreset_mode(autoreset):
    """Same seeds and actions: identical observations, rewards, flags and infos, step by step, including
    episode ends (every MAX_STEPS steps) and, with autoreset disabled, the caller's seeded partial resets."""
    mode = AutoresetMode[autoreset.upper()]
    ours = make_vector_env("builtin/push", NUM_ENVS, autoreset=autoreset, num_workers=2,
                           max_episode_steps=MAX_STEPS)
    theirs = gym.vector.SyncVectorEnv([partial(make_env, "builtin/push", max_episode_steps=MAX_STEPS)] * NUM_ENVS,
                                      autoreset_mode=mode)
    try:
        assert isinstance(ours, SharedMemoryVectorEnv) and ours.num_envs == NUM_ENVS
        assert ours.single_observation_space == theirs.single_observation_space
        assert ours.single_action_space == theirs.single_action_space
        seeds = [3, 11, 5, 2, 7]
        _assert_same(ours.reset(seed=seeds), theirs.reset(seed=seeds), "reset with a seed list")
        _assert_same(ours.reset(seed=3), theirs.reset(seed=3), "reset with seed + i")
        episode_ends = 0
        for step, action in enumerate(_actions(2 * MAX_STEPS + 1)):
            result, expected = ours.step(action), theirs.step(action)
            _assert_same(result, expected, f"step {step}")
            ended = expected[2] | expected[3]
            episode_ends += ended.sum()
            if mode == AutoresetMode.DISABLED and ended.any():
                seeds = [100 + step + i if e else None for i, e in enumerate(ended)]
                _assert_same(ours.reset(seed=seeds, options={"reset_mask": ended}),
                             theirs.reset(seed=seeds, options={"reset_mask": ended}), f"masked reset {step}")
        assert episode_ends >= 2 * NUM_ENVS  # the comparison covered episode ends
    finally:
        ours.close()
        theirs.close()


def test_partial_reset_restarts_only_the_masked_envs():
    envs = make_vector_env("builtin/reach", NUM_ENVS, autoreset="disabled", num_workers=2, seed=0)
    singles = [make_env("builtin/reach") for _ in range(NUM_ENVS)]
    for i, env in enumerate(singles):
        env.reset(seed=i)
    actions = _actions(2)
    try:
        for i, env in enumerate(singles):
            env.step(actions[0, i])
        before, *_ = envs.step(actions[0])
        mask = np.array([False, True, False, False, True])
        seeds = [None, 40, None, None, 44]
        obs, info = envs.reset(seed=seeds, options={"reset_mask": mask})
        assert info["_success"].tolist() == mask.tolist()
        for i in np.flatnonzero(mask):
            expected, _ = singles[i].reset(seed=seeds[i])
            np.testing.assert_array_equal(obs["observation.state"][i], expected["observation.state"])
        # untouched envs keep their episode: their next step matches the single env that was never reset
        obs, *_ = envs.step(actions[1])
        for i, env in enumerate(singles):
            expected, *_ = env.step(actions[1, i])
            np.testing.assert_array_equal(obs["observation.state"][i], expected["observation.state"])
        assert not np.array_equal(obs["observation.state"][0], before["observation.state"][0])
    finally:
        envs.close()


def test_same_step_autoreset_returns_the_next_episode_and_the_final_observation():
    envs = make_vector_env("builtin/push", 2, max_episode_steps=4)
    single = make_env("builtin/push", max_episode_steps=4)
    try:
        envs.reset(seed=5)  # env i gets seed 5 + i
        single.reset(seed=6)
        for action in _actions(4)[:, :2]:
            obs, reward, terminated, truncated, info = envs.step(action)
            last, *_ = single.step(action[1])
        assert truncated.tolist() == [True, True] and not terminated.any()
        np.testing.assert_array_equal(info["final_obs"][1]["observation.state"], last["observation.state"])
        assert info["final_info"]["success"].dtype == np.bool_ and info["success"].dtype == np.bool_
        first_of_next, _ = single.reset()
        np.testing.assert_array_equal(obs["observation.state"][1], first_of_next["observation.state"])
        obs, reward, terminated, truncated, info = envs.step(_actions(1)[0, :2])
        assert not truncated.any() and "final_obs" not in info
    finally:
        envs.close()


def test_one_env_is_in_process_and_seeded():
    envs = make_vector_env("builtin/reach", 1, seed=4)
    assert isinstance(envs, gym.vector.SyncVectorEnv)
    obs, _ = envs.reset(seed=4)
    expected, _ = make_env("builtin/reach").reset(seed=4)
    np.testing.assert_array_equal(obs["observation.state"][0], expected["observation.state"])
    envs.close()


def test_images_come_through_shared_memory_and_attributes_through_the_pipe():
    envs = make_vector_env("builtin/pick_place", 3, images=True)
    try:
        assert len(envs.worker_pids) == min(3, os.cpu_count() or 1)  # one worker per core by default
        obs, _ = envs.reset(seed=0)
        images = obs["observation.images.front"]
        assert images.shape == (3, 96, 96, 3) and images.dtype == np.uint8
        assert images.std() > 10 and not np.array_equal(images[0], images[1])  # different cube placements
        assert envs.get_attr("fps") == (10, 10, 10)
        assert envs.get_attr("feature_names")[2] == make_env("builtin/pick_place").unwrapped.feature_names
    finally:
        envs.close()


def test_an_env_raising_is_reported_with_its_index_and_the_envs_stay_usable():
    envs = SharedMemoryVectorEnv(_faulty_reach, NUM_ENVS, num_workers=2, name="faulty reach")
    try:
        envs.reset(seed=0)
        actions = _actions(1)[0]
        actions[3, 0] = FAIL
        with pytest.raises(VectorEnvError, match=r"Env 3 of faulty reach \(worker 1\) raised ValueError during "
                                                 r"step: gripper encoder returned garbage"):
            envs.step(actions)
        envs.reset(seed=0)
        obs, *_ = envs.step(_actions(1)[0])
        assert obs["observation.state"].shape[0] == NUM_ENVS
    finally:
        envs.close()


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_dead_or_stuck_worker_ends_the_call_and_leaves_no_process(fault):
    envs = SharedMemoryVectorEnv(_faulty_reach, NUM_ENVS, num_workers=2, timeout=3.0, name="faulty reach")
    pids = envs.worker_pids
    envs.reset(seed=0)
    actions = _actions(1)[0]
    actions[1, 0] = CRASH if fault == "crash" else HANG
    message = "died with exit code 3" if fault == "crash" else "did not finish its step within 3 s"
    start = time.monotonic()
    with pytest.raises(VectorEnvError, match=rf"Worker 0 of faulty reach \(envs 0-1\) {message}"):
        envs.step(actions)
    assert time.monotonic() - start < 30
    assert envs.closed
    _assert_gone(pids)
    with pytest.raises(VectorEnvError, match="closed"):
        envs.step(actions)


def test_close_leaves_no_process_behind():
    envs = make_vector_env("builtin/reach", 4, num_workers=2)
    pids = envs.worker_pids
    assert len(pids) == 2
    envs.close()
    envs.close()  # idempotent
    assert envs.worker_pids == []
    _assert_gone(pids)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_envs must be at least 1"):
        make_vector_env("builtin/reach", 0)
    with pytest.raises(ValueError, match="num_workers must be between 1 and num_envs=2"):
        make_vector_env("builtin/reach", 2, num_workers=3)
