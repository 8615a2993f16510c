"""Vectorized episode runner shared by collection, evaluation and online refinement.

Episode k always runs with seed `seed + k`, whichever worker it lands on, so results are reproducible and
comparable across policies and worker counts. The vector env must be built with
`autoreset_mode=AutoresetMode.DISABLED`: we reset finished workers ourselves, with the next episode's seed.

Instructions: with `instructions=True` the envs' `instruction` (a string) and `goal` (a dict) attributes are read
after every reset and handed to the agent as `obs["task"]` and `obs["goal"]` (object arrays [n_workers]); a
language policy reads the first, a scripted expert the second. Neither is recorded as a frame: each episode keeps
its instruction and goal (`Episode.instruction`, `Episode.goal`).

Rollout backends (`RolloutConfig`, the `rollout:` section of eval, collect and finetune): every backend is a
gymnasium vector env with autoreset disabled, built by the CLI: `subprocess` (the default, `sim.vector`'s shared
memory workers on this machine) or `ray` (`sim.ray_vector`: a pool of Ray actors, on this machine or a cluster).
A backend whose worker can die and come back (Ray restarts a killed actor) reports it in `info["restarted"]`
(bool [num_envs], from `step` or `reset`): those envs were reset with the seed of the episode they were running,
and the runners here start that episode again from scratch (same index, same seed, the agent reset), so a run ends
with exactly the requested episodes, none twice, and the same results as a run without the failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from robopolicy.config import setting
from robopolicy.data.spec import ACTION_KEY, REWARD_KEY, SUCCESS_KEY

TASK_KEY, GOAL_KEY = "task", "goal"  # per-worker instruction strings and goal dicts in the observations
RESTARTED_KEY = "restarted"  # info key of a backend's envs whose worker died and was restarted (see above)
ROLLOUT_BACKENDS = ("subprocess", "ray")


@dataclass(kw_only=True)
class RolloutConfig:
    """Where the envs of a command step: `rollout=ray` is short for `rollout.backend=ray`."""

    backend: str = setting("subprocess", "subprocess: worker processes on this machine | ray: Ray actors "
                                         "(pip install robopolicy[scale])", choices=ROLLOUT_BACKENDS)
    address: str = setting("local", "ray: local (start a private Ray on loopback) | auto (the cluster of "
                                     "`ray start`) | HOST:PORT")
    workers: int | None = setting(None, "ray: actors, each stepping a block of the envs; null: one per env, "
                                        "at most one per CPU of the cluster")
    max_restarts: int = setting(3, "ray: restarts of a dead actor before the run fails (its episodes are rerun)")


def restarted(info: dict, n_envs: int) -> np.ndarray:
    """The envs a backend restarted during the last call (bool [n_envs]; all False for backends that cannot)."""
    return np.asarray(info.get(RESTARTED_KEY, np.zeros(n_envs, bool)), dtype=bool)


class Agent(Protocol):
    """Acts for a batch of workers; `reset(i, seed)` starts a new episode on worker i."""

    def reset(self, index: int, seed: int) -> None: ...

    def act(self, obs: dict[str, np.ndarray], active: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Actions [n_workers, A] to execute, or (executed, recorded) when the recorded action differs (DART)."""


@dataclass
class Episode:
    index: int
    seed: int
    success: bool = False
    ret: float = 0.0
    rewards: list[float] = field(default_factory=list)  # per step (ret is their sum)
    recording: bool = False
    frames: dict[str, list[np.ndarray]] = field(default_factory=dict)
    instruction: str = ""
    goal: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.frames.get(ACTION_KEY, ()))

    @property
    def max_step_reward(self) -> float:
        """The largest reward of one step short of success (a success step's bonus left out)."""
        steps = self.rewards[:-1] if self.success else self.rewards
        return max(steps, default=0.0)

    def stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.frames.items()}


def _slice(obs: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in obs.items() if k not in (TASK_KEY, GOAL_KEY)}


def read_instructions(envs) -> tuple[np.ndarray, np.ndarray]:
    """Every env's current instruction and goal, as object arrays [n_workers]."""
    texts, goals = np.empty(envs.num_envs, dtype=object), np.empty(envs.num_envs, dtype=object)
    texts[:], goals[:] = list(envs.get_attr("instruction")), list(envs.get_attr("goal"))
    return texts, goals


def run_episodes(
    envs,
    agent: Agent,
    n_episodes: int,
    *,
    seed: int = 0,
    record: bool | Callable[[int], bool] = False,
    on_episode: Callable[[Episode], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    instructions: bool = False,
) -> list[Episode]:
    """Run `n_episodes` episodes on a gymnasium vector env; returns them in episode order.

    With `record` (a bool, or a predicate on the episode index), each episode keeps its frames (observation before the action, action, reward, success), ready
    for `DemoStore.append_episode`. `on_episode` is called as each episode finishes (e.g. to append it to a store
    at once, so a killed process keeps every finished episode). `instructions`: see the module docstring.
    """
    n_workers = envs.num_envs
    episodes: list[Episode] = []
    current: list[Episode | None] = [None] * n_workers
    next_index = 0

    def start(i: int) -> None:
        nonlocal next_index
        current[i] = Episode(index=next_index, seed=seed + next_index,
                             recording=record(next_index) if callable(record) else record)
        if instructions:
            current[i].instruction, current[i].goal = str(obs[TASK_KEY][i]), dict(obs[GOAL_KEY][i])
        agent.reset(i, seed + next_index)
        next_index += 1

    first = min(n_workers, n_episodes)
    seeds = [seed + i if i < first else seed + 10**9 + i for i in range(n_workers)]
    obs, _ = envs.reset(seed=seeds)
    if instructions:
        obs[TASK_KEY], obs[GOAL_KEY] = read_instructions(envs)
    for i in range(first):
        start(i)
    done_count = 0
    while done_count < n_episodes:
        active = np.array([ep is not None for ep in current])
        action = agent.act(obs, active)
        executed, action = action if isinstance(action, tuple) else (action, action)
        next_obs, reward, terminated, truncated, info = envs.step(executed)
        success = np.asarray(info.get("success", np.zeros(n_workers, bool)), dtype=bool)
        finished = np.zeros(n_workers, dtype=bool)
        lost = restarted(info, n_workers) & active
        for i in np.flatnonzero(active & ~lost):
            ep = current[i]
            if ep.recording:
                for k, v in _slice(obs, i).items():
                    ep.frames.setdefault(k, []).append(v)
                ep.frames.setdefault(ACTION_KEY, []).append(np.asarray(action[i], dtype=np.float32))
                ep.frames.setdefault(REWARD_KEY, []).append(np.float32(reward[i]))
                ep.frames.setdefault(SUCCESS_KEY, []).append(np.bool_(success[i]))
            else:
                ep.frames.setdefault(ACTION_KEY, []).append(None)  # only the length is kept
            ep.ret += float(reward[i])
            ep.rewards.append(float(reward[i]))
            ep.success |= bool(success[i])
            if terminated[i] or truncated[i]:
                episodes.append(ep)
                done_count += 1
                if on_episode is not None:
                    on_episode(ep)
                current[i] = None
                finished[i] = True
        if on_step is not None:
            on_step(int(active.sum()))
        # Assign the next episodes to the workers that just finished, lowest worker first.
        restart_idx = list(np.flatnonzero(finished))[: max(0, n_episodes - next_index)]
        restart = np.zeros(n_workers, dtype=bool)
        restart[restart_idx] = True
        if restart.any():
            reset_seeds = [seed + next_index + int(np.sum(restart[:i])) if restart[i] else None
                           for i in range(n_workers)]
            new_obs, reset_info = envs.reset(seed=reset_seeds, options={"reset_mask": restart})
            lost |= restarted(reset_info, n_workers) & np.array([ep is not None for ep in current])
            take = restart | lost
            obs = {k: np.where(_expand(take, v), new_obs[k], next_obs[k]) for k, v in next_obs.items()}
            if instructions:
                obs[TASK_KEY], obs[GOAL_KEY] = read_instructions(envs)
            for i in restart_idx:
                start(i)
        else:
            obs = {**next_obs, **{k: obs[k] for k in (TASK_KEY, GOAL_KEY) if k in obs}}
        for i in np.flatnonzero(lost):  # the worker died mid-episode: run that episode again from its start
            ep = current[i]
            current[i] = Episode(index=ep.index, seed=ep.seed, recording=ep.recording, instruction=ep.instruction,
                                 goal=ep.goal)
            agent.reset(i, ep.seed)
    episodes.sort(key=lambda e: e.index)
    return episodes


def _expand(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
