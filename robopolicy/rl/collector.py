"""Chunked vector rollouts: a refinement method decides once per action chunk, and its decision (a "latent action":
the base's initial noise, a residual, ...) turns into `n_action_steps` env actions executed open loop. The
chunk-level transition stores the method's input features, the latent action, the reward summed over the executed
steps (`RewardSpec`), how many steps ran (`steps`, for the discount gamma ** steps) and whether the episode
terminated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from robopolicy.data.spec import is_image_key
from robopolicy.rl.refined import RefinedPolicy
from robopolicy.rollout import TASK_KEY, read_instructions, restarted


class Method(Protocol):
    """What the collector and the online loop need from a refinement method, declared by each method class."""

    policy: RefinedPolicy
    gamma: float
    n_step: int  # TD targets over n decisions (1 for methods that do not bootstrap, and for on-policy ones)
    keep_raw_obs: bool  # store the observation histories in the buffer (methods that re-run the base on them)
    on_policy: bool  # True: ready() and update_rollouts() on whole fresh episodes instead of update(batch)

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Input features [b, F] of the decision at these observation histories."""

    def act(self, obs: Mapping[str, torch.Tensor], inputs: torch.Tensor, workers: list[int], explore: bool
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(latent action [b, K], env actions [b, n_exec, A], extra fields to store with the transition)."""

    def start_episode(self, worker: int, env_steps: int) -> None: ...

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]: ...

    def ready(self) -> bool:
        """On-policy: enough fresh episodes for an update (their buffer is a `ppo.RolloutStore`)."""

    def update_rollouts(self) -> dict[str, float]: ...


@dataclass
class _Pending:
    obs: np.ndarray
    action: np.ndarray
    extras: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]
    reward: float = 0.0
    steps: int = 0


@dataclass
class _Worker:
    seed: int
    history: deque
    instruction: str = ""  # the episode's instruction (language tasks), handed to the base as obs["task"]
    queue: deque = field(default_factory=deque)
    pending: _Pending | None = None
    transitions: list[dict[str, np.ndarray]] = field(default_factory=list)
    ret: float = 0.0
    success: bool = False
    length: int = 0


@dataclass(frozen=True)
class RewardSpec:
    """The per-step reward the methods learn from, online and from a store alike (`robopolicy finetune`'s reward,
    reward_scale, success_bonus and step_penalty, which hold the defaults).

    "sparse" is 1 on the step the task succeeds (episodes terminate on success); "dense" is the env's own reward
    times `scale`, plus `success_bonus` on the success step (for shaped rewards without a bonus of their own, such
    as MetaWorld's). `step_penalty` is subtracted on every step (DSRL's reward offset: with sparse rewards, -1 per
    step and 0 on success, so Q starts optimistic at 0 and faster successes score higher).
    """

    kind: str
    scale: float
    success_bonus: float
    step_penalty: float

    def __post_init__(self) -> None:
        if self.kind not in ("sparse", "dense"):
            raise ValueError(f"reward {self.kind!r} is unknown; use 'sparse' or 'dense'.")

    def __call__(self, env_reward, success) -> np.ndarray:
        """Rewards (arrays over steps or envs) from the env's rewards and success flags."""
        success = np.asarray(success, np.float64)
        if self.kind == "sparse":
            reward = success
        else:
            reward = np.asarray(env_reward, np.float64) * self.scale + self.success_bonus * success
        return reward - self.step_penalty


class ChunkedCollector:
    """Steps a vector env (built with autoreset disabled) with chunked decisions of `method`, turning the steps into
    chunk-level transitions rewarded by `reward`. Episodes continue across `collect` calls; finished workers are
    reset with the next episode seed (seed, seed + 1, ...). Each finished episode's transitions get its Monte-Carlo
    return-to-go (`mc_return`) and go to `sink` together. A method with `n_step` > 1 gets n-decision transitions
    (see `n_step_rows`).
    """

    def __init__(self, envs, method: Method, sink: Callable[[dict[str, np.ndarray]], None], reward: RewardSpec, *,
                 seed: int = 0):
        self.n_step = 1 if method.on_policy else method.n_step  # on-policy methods compute their own advantages
        self.envs, self.method, self.sink, self.reward = envs, method, sink, reward
        policy = method.policy
        self.n_obs_steps, self.n_exec, self.obs_keys = policy.n_obs_steps, policy.n_exec, policy.obs_keys
        self.env_steps = 0
        self.episodes: list[dict[str, Any]] = []  # {"env_steps", "success", "return", "length", "seed"}
        self.language = bool(policy.language)
        if self.language and method.keep_raw_obs:
            raise ValueError(f"{type(method).__name__} re-runs its base on stored observations, which do not keep "
                             "the instruction: use a method that does not (steer, residual) with a language base.")
        n = envs.num_envs
        self.next_seed = seed + n
        self.workers = [_Worker(seed=seed + i, history=deque(maxlen=self.n_obs_steps)) for i in range(n)]
        obs, _ = envs.reset(seed=[seed + i for i in range(n)])
        self.obs = obs
        self._read_instructions(range(n))
        for i in range(n):
            method.start_episode(i, 0)

    def _read_instructions(self, workers) -> None:
        if self.language:
            texts, _ = read_instructions(self.envs)
            for i in workers:
                self.workers[i].instruction = str(texts[i])

    def _histories(self, workers: list[int]) -> dict[str, Any]:
        obs: dict[str, Any] = {
            k: torch.from_numpy(np.stack([np.stack([f[k] for f in self.workers[i].history]) for i in workers]))
            for k in self.obs_keys}  # each [b, To, ...]
        if self.language:
            obs[TASK_KEY] = [self.workers[i].instruction for i in workers]
        return obs

    def _push_frames(self, obs: Mapping[str, np.ndarray], workers: list[int]) -> None:
        for i in workers:
            frame = {k: np.asarray(obs[k][i]) for k in self.obs_keys}
            history = self.workers[i].history
            history.append(frame)
            while len(history) < self.n_obs_steps:  # pad the start of an episode with its first frame
                history.appendleft(frame)

    def _close(self, i: int, next_inputs: np.ndarray, next_raw: dict[str, np.ndarray], done: bool) -> None:
        w, p = self.workers[i], self.workers[i].pending
        if p is None:
            return
        row = {"obs": p.obs, "action": p.action, "reward": np.float32(p.reward), "next_obs": next_inputs,
               "done": np.float32(done), "steps": np.float32(p.steps), **p.extras}
        if self.method.keep_raw_obs:
            row.update({f"raw.{k}": v for k, v in p.raw.items()})
            row.update({f"next_raw.{k}": v for k, v in next_raw.items()})
        w.transitions.append(row)
        w.pending = None

    def _flush_episode(self, i: int) -> None:
        w = self.workers[i]
        if w.transitions:
            ret = 0.0
            gamma = self.method.gamma
            for row in reversed(w.transitions):  # G_t = r_t + gamma^steps_t G_{t+1}
                ret = float(row["reward"]) + gamma ** float(row["steps"]) * ret
                row["mc_return"] = np.float32(ret)
            rows = n_step_rows(w.transitions, self.n_step, gamma) if self.n_step > 1 else w.transitions
            self.sink({k: np.stack([row[k] for row in rows]) for k in rows[0]})
        self.episodes.append({"env_steps": self.env_steps, "success": w.success, "return": round(w.ret, 4),
                              "length": w.length, "seed": w.seed})

    @torch.no_grad()
    def _decide(self, workers: list[int], explore: bool) -> None:
        raw = self._histories(workers)
        inputs = self.method.observe(raw)
        latent, actions, extras = self.method.act(raw, inputs, workers, explore)
        inputs_np, latent_np, actions_np = inputs.cpu().numpy(), latent.cpu().numpy(), actions.cpu().numpy()
        extras_np = {k: v.cpu().numpy() for k, v in extras.items()}
        for row, i in enumerate(workers):
            w = self.workers[i]
            self._close(i, inputs_np[row], {k: v[row].numpy() for k, v in raw.items() if k != TASK_KEY}, done=False)
            w.pending = _Pending(obs=inputs_np[row], action=latent_np[row],
                                 extras={k: v[row] for k, v in extras_np.items()},
                                 raw={k: v[row].numpy() for k, v in raw.items() if k != TASK_KEY})
            w.queue.extend(actions_np[row])

    def collect(self, n_env_steps: int, explore: bool = True) -> int:
        """Run at least `n_env_steps` env steps (a whole number of vector steps); returns how many ran."""
        start = self.env_steps
        n = self.envs.num_envs
        while self.env_steps - start < n_env_steps:
            self._push_frames(self.obs, list(range(n)))
            need = [i for i in range(n) if not self.workers[i].queue]
            if need:
                self._decide(need, explore)
            action = np.stack([self.workers[i].queue.popleft() for i in range(n)]).astype(np.float32)
            next_obs, reward, terminated, truncated, info = self.envs.step(action)
            success = np.asarray(info.get("success", np.zeros(n, bool)), dtype=bool)
            self.env_steps += n
            learned = self.reward(reward, success)
            lost = restarted(info, n)  # their worker died: the episode starts again (same seed), its steps dropped
            for i in np.flatnonzero(lost):
                self.workers[i] = _Worker(seed=self.workers[i].seed, history=deque(maxlen=self.n_obs_steps))
                self.method.start_episode(i, self.env_steps)
            if lost.any():
                self._read_instructions(np.flatnonzero(lost))
            for i in np.flatnonzero(~lost):
                w = self.workers[i]
                w.pending.reward += float(learned[i])
                w.pending.steps += 1
                w.ret += float(reward[i])
                w.success |= bool(success[i])
                w.length += 1
            finished = [i for i in range(n) if (terminated[i] or truncated[i]) and not lost[i]]
            if finished:
                self._finish(finished, next_obs, terminated)
                restart = np.zeros(n, dtype=bool)
                restart[finished] = True
                seeds = [None] * n
                for i in finished:
                    seeds[i] = self.next_seed
                    self.next_seed += 1
                new_obs, reset_info = self.envs.reset(seed=seeds, options={"reset_mask": restart})
                lost = restarted(reset_info, n)
                take = restart | lost
                next_obs = {k: np.where(take.reshape(-1, *([1] * (v.ndim - 1))), new_obs[k], v)
                            for k, v in next_obs.items()}
                for i in np.flatnonzero(take):
                    self.workers[i] = _Worker(seed=seeds[i] if restart[i] else self.workers[i].seed,
                                              history=deque(maxlen=self.n_obs_steps))
                    self.method.start_episode(i, self.env_steps)
                self._read_instructions(np.flatnonzero(take))
            self.obs = next_obs
        return self.env_steps - start

    @torch.no_grad()
    def _finish(self, finished: list[int], final_obs: Mapping[str, np.ndarray], terminated: np.ndarray) -> None:
        """Close each finished episode's last transition with the input at its final observation."""
        self._push_frames(final_obs, finished)
        raw = self._histories(finished)
        inputs = self.method.observe(raw).cpu().numpy()
        for row, i in enumerate(finished):
            self._close(i, inputs[row], {k: v[row].numpy() for k, v in raw.items() if k != TASK_KEY}, done=bool(terminated[i]))
            self._flush_episode(i)


def n_step_rows(rows: list[dict[str, np.ndarray]], n: int, gamma: float) -> list[dict[str, np.ndarray]]:
    """One episode's chunk-level transitions made n-decision ones: the reward of decisions t .. t+n-1 (discounted
    by gamma ** env steps within), their total `steps`, and `done` and the `next_*` fields of the last of them (fewer
    at the episode's end). The TD target r + gamma ** steps (1 - done) Q(next) then bootstraps n decisions ahead,
    so a sparse success reaches the early decisions of a long episode n times faster."""
    out = []
    for t, row in enumerate(rows):
        window = rows[t:t + n]
        reward, steps = 0.0, 0.0
        for later in window:
            reward += gamma ** steps * float(later["reward"])
            steps += float(later["steps"])
        last = window[-1]
        out.append({**row, "reward": np.float32(reward), "steps": np.float32(steps), "done": last["done"],
                    **{k: v for k, v in last.items() if k.startswith("next_")}})
    return out


def transition_shapes(method: Method, feature_dim: int, latent_dim: int,
                      extras: Mapping[str, tuple[int, ...]] = ()) -> dict[str, tuple[int, ...]]:
    """Buffer fields of a method's chunk-level transitions."""
    shapes = {"obs": (feature_dim,), "action": (latent_dim,), "reward": (), "next_obs": (feature_dim,),
              "done": (), "steps": (), "mc_return": (), **dict(extras)}
    if method.keep_raw_obs:
        policy = method.policy
        for key in policy.obs_keys:
            shape = (policy.n_obs_steps, *policy.features[key]["shape"])
            shapes[f"raw.{key}"] = shape
            shapes[f"next_raw.{key}"] = shape
    return shapes


def raw_dtypes(method: Method) -> dict[str, Any]:
    return {f"{prefix}.{k}": np.uint8 for k in method.policy.obs_keys if is_image_key(k)
            for prefix in ("raw", "next_raw")}


def raw_obs(batch: Mapping[str, torch.Tensor], prefix: str = "raw") -> dict[str, torch.Tensor]:
    """The observation histories stored under `raw.<key>` (or `next_raw.<key>`) of a sampled batch."""
    return {k[len(prefix) + 1:]: v for k, v in batch.items() if k.startswith(prefix + ".")}
