"""Vectorized environments: several envs stepping in worker processes (or in-process for one env).

Workers are started with forkserver (falling back to spawn), never fork: a forked MuJoCo/GL or torch
state is a classic source of hangs. Observations travel through shared memory. Episodes reset in the
same step they end (SAME_STEP autoreset): the returned observation is the new episode's first one and
the finished episode's last observation is in `info["final_obs"]`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from functools import partial
from typing import Any

import gymnasium as gym


def _make(task: str, env_kwargs: dict[str, Any]) -> gym.Env:
    from sim import make_env

    return make_env(task, **env_kwargs)


def make_vector_env(
    task: str, num_envs: int, *, seed: int | None = None, autoreset: str = "same_step", **env_kwargs: Any
) -> gym.vector.VectorEnv:
    """`num_envs` copies of `task`; with `seed`, env i is reset with seed + i on the first reset.

    `autoreset`: "same_step" (default), "next_step", or "disabled" (the caller resets finished envs with
    `reset(seed=..., options={"reset_mask": mask})`, as `robopolicy.rollout` does to seed every episode).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}.")
    fns = [partial(_make, task, dict(env_kwargs)) for _ in range(num_envs)]
    autoreset = gym.vector.AutoresetMode[autoreset.upper()]
    if num_envs == 1:
        envs: gym.vector.VectorEnv = gym.vector.SyncVectorEnv(fns, autoreset_mode=autoreset)
    else:
        context = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        # more workers than cores: let at most one step per core run at a time instead of thrashing
        cores = os.cpu_count() or 1
        envs = gym.vector.AsyncVectorEnv(
            fns,
            shared_memory=True,
            context=context,
            autoreset_mode=autoreset,
            max_concurrency=cores if num_envs > cores else None,
        )
    if seed is not None:
        envs.reset(seed=seed)
    return envs
