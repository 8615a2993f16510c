"""A vector env whose envs step in a pool of Ray actors, on this machine or across a Ray cluster (`rollout=ray`).

Each actor owns a contiguous block of the envs and builds them itself from the task name and JSON-able options
(nothing but names, numbers and numpy arrays travel; every node needs this package installed). Semantics are
`SharedMemoryVectorEnv`'s with autoreset disabled (the only mode `robopolicy.rollout` uses): the caller resets
finished envs with `reset(seed=[...], options={"reset_mask": mask})`.

Fault tolerance: actors are created with `max_restarts`. When one dies (a SIGKILLed process, a lost node), Ray
builds it again with fresh envs; we reset each of its envs with the seed of the episode it was running and report
them in `info["restarted"]`, and the runners in `robopolicy.rollout` rerun those episodes from their start. An
exception raised by an env is not a death: it ends the call with a `VectorEnvError` naming the env.

Loopback only: `address="local"` starts a private Ray instance with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, with
which every Ray service binds 127.0.0.1 (Ray's default is the machine's network address). Ray is imported here
only, so the default backend never loads it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from sim.vector import VectorEnvError, seeds_per_env

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(address: str = "local", num_cpus: int | None = None) -> bool:
    """Connect to Ray once per process: `local` starts a private instance bound to loopback, `auto` joins the
    cluster of `ray start`, `HOST:PORT` joins that one. An instance already running in this process is reused.
    Returns whether this call started or joined one. A Ray started here stays up for the next vector env (a
    command may build several in turn) until `ray.shutdown()` or the process ends (Ray shuts it down at exit)."""
    if address == "local":
        os.environ.update(LOOPBACK_ENV)  # read as Ray is imported and as its services start: bind 127.0.0.1 only
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # the same switch, should Ray have been imported before we set it
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


class EnvBlock:
    """A Ray actor's envs: `count` copies of `task` (made remote by `RayVectorEnv`)."""

    def __init__(self, task: str, env_kwargs_json: str, count: int):
        from sim import make_env

        kwargs = json.loads(env_kwargs_json)
        self.envs = [make_env(task, **kwargs) for _ in range(count)]

    def pid(self) -> int:
        return os.getpid()

    def reset(self, seeds: list[int | None], mask: list[bool], options: dict) -> tuple[dict, list[bool]]:
        """Reset the masked envs; their observations stacked (rows in mask order) and their success flags."""
        frames, success = [], []
        for env, seed, on in zip(self.envs, seeds, mask):
            if on:
                obs, info = env.reset(seed=seed, options=options or None)
                frames.append(obs)
                success.append(bool(info.get("success", False)))
        return _stack(frames), success

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        frames, reward, terminated, truncated, success = [], [], [], [], []
        for j, (env, action) in enumerate(zip(self.envs, actions)):
            try:
                obs, r, term, trunc, info = env.step(np.array(action))
            except Exception as exc:
                raise RuntimeError(f"env {j} of the block raised {type(exc).__name__}: {exc}") from exc
            frames.append(obs)
            reward.append(r)
            terminated.append(term)
            truncated.append(trunc)
            success.append(bool(info.get("success", False)))
        return (_stack(frames), np.asarray(reward, np.float64), np.asarray(terminated, bool),
                np.asarray(truncated, bool), np.asarray(success, bool))

    def get_attr(self, name: str) -> list:
        return [env.get_wrapper_attr(name) for env in self.envs]


def _stack(frames: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]} if frames else {}


class RayVectorEnv(gym.vector.VectorEnv):
    """`num_envs` envs of `task` in `workers` Ray actors (contiguous blocks, sizes differing by at most one)."""

    def __init__(self, task: str, num_envs: int, *, workers: int | None = None, address: str = "local",
                 max_restarts: int = 3, timeout: float = 300.0, **env_kwargs: Any):
        self._actors: list = []  # set first: close() must work whatever fails below
        import ray

        from sim import make_env

        probe = make_env(task, **env_kwargs)
        self.single_observation_space, self.single_action_space = probe.observation_space, probe.action_space
        self.metadata = {**probe.metadata, "autoreset_mode": AutoresetMode.DISABLED}
        self.render_mode = None
        probe.close()
        self.num_envs, self.name, self.timeout = num_envs, task, timeout
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        init_ray(address)
        if workers is None:
            workers = min(num_envs, max(1, int(ray.cluster_resources().get("CPU", 1))))
        if not 1 <= workers <= num_envs:
            raise ValueError(f"rollout.workers must be between 1 and num_envs={num_envs}, got {workers}.")
        bounds = np.linspace(0, num_envs, workers + 1).round().astype(int)
        self._blocks = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        # One CPU per actor would leave actors pending on a small machine (workers > CPUs): a fraction lets Ray
        # place them all while still spreading them over a cluster's nodes.
        remote = ray.remote(num_cpus=0.5, max_restarts=max_restarts, max_task_retries=0)(EnvBlock)
        kwargs_json = json.dumps(env_kwargs)
        self._actors = [remote.remote(task, kwargs_json, hi - lo) for lo, hi in self._blocks]
        self._seeds: list[int | None] = [None] * num_envs  # the seed of each env's current episode
        self._obs = {k: np.zeros((num_envs, *s.shape), s.dtype) for k, s in self.single_observation_space.items()}
        self._pids = self._gather([a.pid.remote() for a in self._actors], "construction")

    # ---- gymnasium VectorEnv API ----------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        seed = seeds_per_env(seed, self.num_envs)
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        mask = np.ones(self.num_envs, bool) if mask is None else np.asarray(mask, bool)
        for i in np.flatnonzero(mask):
            self._seeds[i] = None if seed[i] is None else int(seed[i])
        workers = [w for w, (lo, hi) in enumerate(self._blocks) if mask[lo:hi].any()]
        refs = [self._actors[w].reset.remote(self._seeds[lo:hi], mask[lo:hi].tolist(), options)
                for w, (lo, hi) in ((w, self._blocks[w]) for w in workers)]
        lost = np.zeros(self.num_envs, bool)
        success = np.zeros(self.num_envs, bool)
        for w, result in zip(workers, self._gather(refs, "reset", workers)):
            lo, hi = self._blocks[w]
            if result is None:  # the actor died: all its envs were reset, the unmasked ones lost their episode
                self._recover(w, success)
                lost[lo:hi] = ~mask[lo:hi]
                continue
            obs, ok = result
            rows = np.flatnonzero(mask[lo:hi]) + lo
            for k, v in obs.items():
                self._obs[k][rows] = v
            success[rows] = ok
        info = {"success": success & (mask | lost), "_success": mask | lost}
        if lost.any():
            info["restarted"] = lost
        return self._observation(), info

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions)
        refs = [a.step.remote(actions[lo:hi]) for a, (lo, hi) in zip(self._actors, self._blocks)]
        reward = np.zeros(self.num_envs)
        terminated, truncated = np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        success, lost = np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        for w, result in enumerate(self._gather(refs, "step")):
            lo, hi = self._blocks[w]
            if result is None:
                self._recover(w, success)
                lost[lo:hi] = True
                continue
            obs, reward[lo:hi], terminated[lo:hi], truncated[lo:hi], success[lo:hi] = result
            for k, v in obs.items():
                self._obs[k][lo:hi] = v
        info: dict[str, Any] = {"success": success, "_success": np.ones(self.num_envs, bool)}
        if lost.any():
            info["restarted"] = lost
        return self._observation(), reward, terminated, truncated, info

    def get_attr(self, name: str) -> tuple[Any, ...]:
        values = self._gather([a.get_attr.remote(name) for a in self._actors], "get_attr")
        for w, block in enumerate(values):
            if block is None:  # died and came back: its envs are reset with their episodes' seeds
                self._recover(w, np.zeros(self.num_envs, bool))
                values[w] = self._gather([self._actors[w].get_attr.remote(name)], "get_attr")[0]
        return tuple(v for block in values for v in block)

    def close_extras(self, **kwargs: Any) -> None:
        if not self._actors:
            return
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the actors (as of their last (re)start)."""
        return list(self._pids)

    # ---- plumbing -------------------------------------------------------------------------------------
    def _observation(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._obs.items()}

    def _gather(self, refs: list, during: str, workers: list[int] | None = None) -> list:
        """Each call's result in order; None for an actor that died during it (Ray restarts it)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

        workers = list(range(len(refs))) if workers is None else workers
        results: list = []
        for w, ref in zip(workers, refs):
            try:
                results.append(ray.get(ref, timeout=self.timeout))
            except (ActorDiedError, ActorUnavailableError):
                results.append(None)
            except GetTimeoutError:
                self.close()
                raise VectorEnvError(f"Ray worker {w} of {self.name} (envs {self._span(w)}) did not finish its "
                                     f"{during} within {self.timeout:.0f} s; the vector env was closed.") from None
            except RayTaskError as exc:
                raise VectorEnvError(f"Ray worker {w} of {self.name} (envs {self._span(w)}) raised during "
                                     f"{during}: {exc.cause if exc.cause is not None else exc}") from None
        return results

    def _recover(self, w: int, success: np.ndarray) -> None:
        """Reset every env of the restarted actor `w` with its episode's seed (waiting while Ray restarts it)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        lo, hi = self._blocks[w]
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                obs, ok = ray.get(self._actors[w].reset.remote(self._seeds[lo:hi], [True] * (hi - lo), {}),
                                  timeout=self.timeout)
                self._pids[w] = ray.get(self._actors[w].pid.remote(), timeout=self.timeout)
                break
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise VectorEnvError(f"Ray worker {w} of {self.name} did not come back within "
                                         f"{self.timeout:.0f} s.") from None
                time.sleep(0.1)
            except ActorDiedError as exc:  # out of restarts
                self.close()
                raise VectorEnvError(f"Ray worker {w} of {self.name} (envs {self._span(w)}) died and has no "
                                     f"restarts left (rollout.max_restarts); the vector env was closed.") from exc
        for k, v in obs.items():
            self._obs[k][lo:hi] = v
        success[lo:hi] = ok

    def _span(self, worker: int) -> str:
        lo, hi = self._blocks[worker]
        return f"{lo}-{hi - 1}"
