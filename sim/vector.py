"""Vectorized environments: many envs stepping in a few worker processes, exchanging data through shared memory.

gymnasium's AsyncVectorEnv runs one process per env and pays a pickled pipe round trip per env per step
(~250 us with the wake-ups), as long as a whole step of our built-in tasks. Here each worker process owns
a block of envs; actions, observations, rewards and flags live in one shared buffer of numpy views, and a
step costs one command byte and one reply byte per worker. Workers are started with forkserver (falling
back to spawn), never fork: a forked MuJoCo/GL or torch state is a classic source of hangs.

Semantics are gymnasium's (checked against SyncVectorEnv in the tests): the three autoreset modes,
`reset(seed=int | list, options={"reset_mask": mask})`, and `info["success"]` (bool [num_envs]) with its
`_success` mask. Other keys of an env's info are not carried. With SAME_STEP autoreset the returned
observation starts the next episode, the finished one's last observation is in `info["final_obs"]` and its
success in `info["final_info"]["success"]`. An env that raises, a worker that dies or one that stops
answering ends the call with a `VectorEnvError` naming the env, instead of a hang.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

# one-byte commands (parent -> worker) and replies (worker -> parent); a reset or get_attr command carries
# a JSON payload after its byte, an error reply a JSON description of the exception
_STEP, _RESET, _GET_ATTR, _CLOSE = b"S", b"R", b"A", b"C"
_OK, _ERROR = b"K", b"E"
_ALIGN = 64  # each array starts on its own cache line



def seeds_per_env(seed: int | list[int | None] | None, num_envs: int) -> list[int | None]:
    """gymnasium's `reset(seed=...)` as one seed per env: None (unseeded), int (seed + i) or a list of them."""
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(num_envs)]
    if len(seed) != num_envs:
        raise ValueError(f"reset got {len(seed)} seeds for num_envs={num_envs}: pass one per env.")
    return list(seed)

class VectorEnvError(RuntimeError):
    """An env raised inside a worker, or a worker died or stopped answering."""


def _make(task: str, env_kwargs: dict[str, Any]) -> gym.Env:
    from sim import make_env

    return make_env(task, **env_kwargs)


def make_vector_env(
    task: str,
    num_envs: int,
    *,
    seed: int | None = None,
    autoreset: str = "same_step",
    num_workers: int | None = None,
    **env_kwargs: Any,
) -> gym.vector.VectorEnv:
    """`num_envs` copies of `task`; with `seed`, env i is reset with seed + i on the first reset.

    `autoreset`: "same_step" (default), "next_step", or "disabled" (the caller resets finished envs with
    `reset(seed=..., options={"reset_mask": mask})`, as `robopolicy.rollout` does to seed every episode).
    `num_workers` processes share the envs (default: one per core, at most one per env); a single env, or
    `num_workers=0`, runs in this process.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}.")
    if num_workers is None:
        num_workers = min(num_envs, os.cpu_count() or 1) if num_envs > 1 else 0
    mode = AutoresetMode[autoreset.upper()]
    env_fn = partial(_make, task, dict(env_kwargs))
    if num_workers == 0:
        envs: gym.vector.VectorEnv = gym.vector.SyncVectorEnv([env_fn] * num_envs, autoreset_mode=mode)
    else:
        envs = SharedMemoryVectorEnv(env_fn, num_envs, num_workers=num_workers, autoreset_mode=mode, name=task)
    if seed is not None:
        envs.reset(seed=seed)
    return envs


def _layout(obs_space: gym.spaces.Dict, action_space: gym.spaces.Box, num_envs: int) -> tuple[dict, int]:
    """Byte offset, dtype and shape of every shared array: name -> (offset, dtype, shape); total bytes."""
    arrays: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for key, space in obs_space.spaces.items():
        arrays[f"obs/{key}"] = (space.dtype, space.shape)
        arrays[f"final_obs/{key}"] = (space.dtype, space.shape)
    arrays["action"] = (action_space.dtype, action_space.shape)
    arrays["reward"] = (np.dtype(np.float64), ())
    for flag in ("terminated", "truncated", "success", "final_success", "reset_mask", "has_seed"):
        arrays[flag] = (np.dtype(np.bool_), ())
    arrays["seed"] = (np.dtype(np.int64), ())
    layout, offset = {}, 0
    for name, (dtype, shape) in arrays.items():
        layout[name] = (offset, np.dtype(dtype).str, (num_envs, *shape))
        offset += -(-np.dtype(dtype).itemsize * num_envs * int(np.prod(shape)) // _ALIGN) * _ALIGN
    return layout, max(offset, _ALIGN)


def _views(buffer: Any, layout: dict) -> dict[str, np.ndarray]:
    """Numpy arrays over the shared buffer, one per layout entry (writes are seen by every process)."""
    return {
        name: np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        for name, (offset, dtype, shape) in layout.items()
    }


def _error_reply(exc: BaseException, env_index: int, during: str) -> bytes:
    description = {"env": env_index, "during": during, "type": type(exc).__name__, "message": str(exc),
                   "traceback": traceback.format_exc()}
    return _ERROR + json.dumps(description).encode()


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__} cannot be sent from a worker (only JSON-able values)")


def _worker(env_fn: Callable[[], gym.Env], first: int, count: int, buffer: Any, layout: dict,
            conn: Connection, autoreset_mode: AutoresetMode) -> None:
    """Owns envs first .. first+count-1: runs each command on all of them, then replies one byte."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    envs: list[gym.Env] = []
    try:
        while len(envs) < count:
            envs.append(env_fn())
    except Exception as exc:
        conn.send_bytes(_error_reply(exc, first + len(envs), "construction"))
        return
    conn.send_bytes(_OK)
    v = _views(buffer, layout)
    obs_keys = [name.removeprefix("obs/") for name in layout if name.startswith("obs/")]
    needs_reset = [False] * count  # NEXT_STEP: the env ended on the previous step

    def write(i: int, obs: dict, info: dict, prefix: str = "obs/", success: str = "success") -> None:
        for key in obs_keys:
            v[prefix + key][i] = obs[key]
        v[success][i] = bool(info.get("success", False))

    while True:
        try:
            command = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            break
        op, payload = command[:1], command[1:]
        if op == _CLOSE:
            break
        i, reply = first, _OK
        try:
            if op == _STEP:
                for j, env in enumerate(envs):
                    i = first + j
                    if needs_reset[j]:
                        obs, info = env.reset()
                        needs_reset[j] = False
                        reward, terminated, truncated = 0.0, False, False
                    else:
                        # a copy: an env may keep its action, and the buffer is rewritten next step
                        obs, reward, terminated, truncated, info = env.step(v["action"][i].copy())
                        if autoreset_mode == AutoresetMode.SAME_STEP and (terminated or truncated):
                            write(i, obs, info, "final_obs/", "final_success")
                            obs, info = env.reset()
                        needs_reset[j] = autoreset_mode == AutoresetMode.NEXT_STEP and (terminated or truncated)
                    write(i, obs, info)
                    v["reward"][i], v["terminated"][i], v["truncated"][i] = reward, terminated, truncated
            elif op == _RESET:
                options = json.loads(payload) or None
                for j, env in enumerate(envs):
                    i = first + j
                    if v["reset_mask"][i]:
                        seed = int(v["seed"][i]) if v["has_seed"][i] else None
                        obs, info = env.reset(seed=seed, options=options)
                        needs_reset[j] = False
                        write(i, obs, info)
            elif op == _GET_ATTR:
                name = payload.decode()
                reply = _OK + json.dumps([env.get_wrapper_attr(name) for env in envs], default=_to_json).encode()
        except Exception as exc:
            reply = _error_reply(exc, i, {_STEP: "step", _RESET: "reset", _GET_ATTR: "get_attr"}.get(op, "?"))
        conn.send_bytes(reply)
    for env in envs:
        env.close()


class SharedMemoryVectorEnv(gym.vector.VectorEnv):
    """`num_envs` envs from `env_fn` split in contiguous blocks over `num_workers` processes."""

    def __init__(
        self,
        env_fn: Callable[[], gym.Env],
        num_envs: int,
        *,
        num_workers: int,
        autoreset_mode: AutoresetMode = AutoresetMode.SAME_STEP,
        timeout: float = 300.0,
        name: str = "env",
    ):
        self._conns: list[Connection] = []  # set first: close() must work whatever fails below
        self._procs: list[mp.process.BaseProcess] = []
        if not 1 <= num_workers <= num_envs:
            raise ValueError(f"num_workers must be between 1 and num_envs={num_envs}, got {num_workers}.")
        # spaces and metadata from one env built here, as gymnasium's AsyncVectorEnv does
        probe = env_fn()
        self.single_observation_space, self.single_action_space = probe.observation_space, probe.action_space
        self.metadata = {**probe.metadata, "autoreset_mode": autoreset_mode}
        self.render_mode = None
        probe.close()
        if not isinstance(self.single_observation_space, gym.spaces.Dict) or not all(
            isinstance(s, gym.spaces.Box) for s in self.single_observation_space.spaces.values()
        ):
            raise TypeError(f"{name}: the shared-memory vector env needs a Dict of Box observation space, "
                            f"got {self.single_observation_space}.")
        self.num_envs, self.autoreset_mode = num_envs, autoreset_mode
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.name, self.timeout = name, timeout

        layout, nbytes = _layout(self.single_observation_space, self.single_action_space, num_envs)
        context = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        self._buffer = context.RawArray("b", nbytes)
        self._v = _views(self._buffer, layout)
        self._obs_keys = list(self.single_observation_space.spaces)
        # contiguous blocks of envs, sizes differing by at most one
        bounds = np.linspace(0, num_envs, num_workers + 1).round().astype(int)
        self._blocks = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        for lo, hi in self._blocks:
            parent_end, child_end = context.Pipe()
            proc = context.Process(
                target=_worker, args=(env_fn, lo, hi - lo, self._buffer, layout, child_end, autoreset_mode),
                name=f"{name} envs {lo}-{hi - 1}", daemon=True,
            )
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
        self._collect("construction")

    # ---- gymnasium VectorEnv API ----------------------------------------------------------------------
    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        seed = seeds_per_env(seed, self.num_envs)
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is None:
            mask = np.ones(self.num_envs, dtype=np.bool_)
        elif not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == (self.num_envs,)):
            raise ValueError(f"options['reset_mask'] must be a bool numpy array of shape ({self.num_envs},), "
                             f"got {mask!r}.")
        self._v["reset_mask"][:] = mask
        self._v["has_seed"][:] = [s is not None for s in seed]
        self._v["seed"][:] = [0 if s is None else s for s in seed]
        payload = json.dumps(options).encode()
        # workers whose envs all stay as they are are not woken up
        workers = [w for w, (lo, hi) in enumerate(self._blocks) if mask[lo:hi].any()]
        self._send(_RESET + payload, workers)
        self._collect("reset", workers)
        self._v["terminated"][mask] = False
        self._v["truncated"][mask] = False
        info = {"success": np.where(mask, self._v["success"], False), "_success": mask.copy()}
        return self._observation("obs/"), info

    def step(
        self, actions: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self._v["action"][:] = actions
        self._send(_STEP)
        self._collect("step")
        v = self._v
        info: dict[str, Any] = {"success": v["success"].copy(), "_success": np.ones(self.num_envs, np.bool_)}
        ended = v["terminated"] | v["truncated"]
        if self.autoreset_mode == AutoresetMode.SAME_STEP and ended.any():
            final = self._observation("final_obs/")
            info["final_obs"] = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(ended):
                info["final_obs"][i] = {k: final[k][i] for k in self._obs_keys}
            info["_final_obs"] = ended
            info["final_info"] = {"success": np.where(ended, v["final_success"], False), "_success": ended.copy()}
            info["_final_info"] = ended.copy()
        return (self._observation("obs/"), v["reward"].copy(), v["terminated"].copy(), v["truncated"].copy(),
                info)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """The attribute `name` of every env (JSON-able values: numbers, strings, lists, dicts, arrays)."""
        self._send(_GET_ATTR + name.encode())
        return tuple(value for reply in self._collect("get_attr") for value in json.loads(reply))

    def close_extras(self, terminate: bool = False, **kwargs: Any) -> None:
        """Ask every worker to stop (with `terminate`, or any still alive after a few seconds: SIGTERM,
        then SIGKILL)."""
        for conn in [] if terminate else self._conns:
            try:
                conn.send_bytes(_CLOSE)
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + (0.0 if terminate else 5.0)
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (empty once closed)."""
        return [proc.pid for proc in self._procs]

    # ---- plumbing -------------------------------------------------------------------------------------
    def _observation(self, prefix: str) -> dict[str, np.ndarray]:
        return {key: self._v[prefix + key].copy() for key in self._obs_keys}

    def _send(self, command: bytes, workers: list[int] | None = None) -> None:
        if self.closed:
            raise VectorEnvError(f"The vector env of {self.name} is closed: make a new one.")
        for w in range(len(self._conns)) if workers is None else workers:
            self._conns[w].send_bytes(command)

    def _collect(self, during: str, workers: list[int] | None = None) -> list[bytes]:
        """Every addressed worker's reply payload, in worker order; raises VectorEnvError on an env error
        (after all replies are in, so the pipes stay in step), a dead worker or a timeout (after closing)."""
        pending = list(range(len(self._conns))) if workers is None else list(workers)
        replies: dict[int, bytes] = {}
        deadline = time.monotonic() + self.timeout
        while pending:
            waitables = [self._conns[w] for w in pending] + [self._procs[w].sentinel for w in pending]
            ready = set(wait(waitables, timeout=max(0.0, deadline - time.monotonic())))
            if not ready:
                w = pending[0]
                self.close(terminate=True)
                raise VectorEnvError(f"Worker {w} of {self.name} (envs {self._span(w)}) did not finish its "
                                     f"{during} within {self.timeout:.0f} s; the vector env was closed.")
            for w in list(pending):
                conn, proc = self._conns[w], self._procs[w]
                try:
                    if conn in ready or conn.poll():
                        replies[w] = conn.recv_bytes()
                        pending.remove(w)
                        continue
                except (EOFError, OSError):
                    pass
                if proc.sentinel in ready or not proc.is_alive():
                    proc.join(1.0)
                    span, code = self._span(w), proc.exitcode
                    self.close(terminate=True)
                    raise VectorEnvError(f"Worker {w} of {self.name} (envs {span}) died with exit code {code} "
                                         f"during {during}; the vector env was closed.")
        for w in sorted(replies):
            if replies[w][:1] == _ERROR:
                error = json.loads(replies[w][1:])
                exc = VectorEnvError(f"Env {error['env']} of {self.name} (worker {w}) raised {error['type']} "
                                     f"during {error['during']}: {error['message']}")
                exc.add_note(f"Worker traceback:\n{error['traceback']}")
                if error["during"] == "construction":
                    self.close(terminate=True)
                raise exc
        return [replies[w][1:] for w in sorted(replies)]

    def _span(self, worker: int) -> str:
        lo, hi = self._blocks[worker]
        return f"{lo}-{hi - 1}"
