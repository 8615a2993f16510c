"""Shared pieces of online refinement: the frozen base, refined checkpoints, the replay buffer, chunked vector
rollouts, learning curves, and the one online loop every method runs.

A refinement method decides once per action chunk. Its decision (a "latent action": the base's initial noise, a
residual, ...) turns into `n_action_steps` env actions executed open loop; the chunk-level transition stores the
method's input features, the latent action, the reward summed over the executed steps, how many steps ran
(`steps`, for the discount gamma ** steps) and whether the episode terminated.

A refined checkpoint is an ordinary checkpoint folder whose policy (`steer`, `residual`, `value_guided`) holds only
the method's own weights and names its base by path and the sha256 of the base's model.safetensors; loading it
loads the base through `load_policy` and refuses a base that is missing or has changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from robopolicy.checkpoint import WEIGHTS_FILE, CheckpointError, load_policy, save_checkpoint
from robopolicy.evaluate import EVAL_SEED, evaluate
from robopolicy.metrics import success_summary

# ------------------------------------------------------------------------------------------ frozen base


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_reference(ckpt: str | Path) -> dict[str, str]:
    """What a refined checkpoint records about its base: absolute path and sha256 of its weights."""
    folder = Path(ckpt).resolve()
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"base checkpoint {folder} has no {WEIGHTS_FILE}; pass a checkpoint folder.")
    return {"path": str(folder), "sha256": file_sha256(folder / WEIGHTS_FILE)}


def load_frozen_base(reference: Mapping[str, str]) -> nn.Module:
    """The base policy named by `reference`, in eval mode without gradients; refuses a missing or changed base."""
    path = Path(str(reference.get("path", "")))
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"the refined checkpoint's base {path} is missing (no {WEIGHTS_FILE}); put the base checkpoint back "
            f"at that path, or refine again from an existing base."
        )
    actual = file_sha256(path / WEIGHTS_FILE)
    if actual != reference.get("sha256"):
        raise CheckpointError(
            f"the refined checkpoint's base {path} has changed since refinement (sha256 {actual[:12]}..., "
            f"expected {str(reference.get('sha256'))[:12]}...); restore the original base or refine again."
        )
    return load_policy(path).requires_grad_(False).eval()


def dummy_observation(features: Mapping[str, Mapping], n_obs_steps: int, batch: int = 1) -> dict[str, torch.Tensor]:
    obs = {}
    for key, spec in features.items():
        if key.startswith("observation."):
            dtype = torch.uint8 if spec["dtype"] == "uint8" else torch.float32
            obs[key] = torch.zeros(batch, n_obs_steps, *spec["shape"], dtype=dtype)
    return obs


class RefinedPolicy(nn.Module):
    """Runtime of a refined policy: a frozen base (kept out of `state_dict`, so the checkpoint holds only the
    method's own weights) plus the method's module. Subclasses set `name`, build their module in `build(cfg)` and
    implement `sample_chunk(obs, noise)`.

    `cfg["base"]` = {"path", "sha256"} (see `base_reference`). Built by `make_policy(cfg, features, stats=None)`,
    so `load_policy` rebuilds it from the folder like any other policy.
    """

    name = ""

    def __init__(self, cfg: Mapping[str, Any], features: Mapping[str, Mapping] | None = None,
                 stats: Mapping | None = None):
        super().__init__()
        self.config = dict(cfg)
        if not isinstance(cfg.get("base"), Mapping):
            raise CheckpointError(f"policy config {cfg.get('name')!r} lacks its base: base={{path, sha256}}.")
        base = load_frozen_base(cfg["base"])
        object.__setattr__(self, "_base", base)  # not a submodule: its weights stay in the base's own folder
        if features is not None and _obs_action(features) != _obs_action(base.features):
            raise CheckpointError(
                f"the refined checkpoint's features differ from those of its base {cfg['base']['path']}; "
                f"the base was replaced by another model."
            )
        self.features = base.features
        self.n_obs_steps, self.horizon, self.n_action_steps = base.n_obs_steps, base.horizon, base.n_action_steps
        if cfg.get("n_action_steps") is not None:  # decide more often than the base: run the chunk's first k steps
            k = int(cfg["n_action_steps"])
            if not 1 <= k <= base.n_action_steps:
                raise ValueError(f"n_action_steps={k}: a refined policy executes between 1 and the base's "
                                 f"{base.n_action_steps} steps of each chunk.")
            self.n_action_steps = k
        self.action_dim = base.action_dim
        self.obs_keys = sorted(k for k in self.features if k.startswith("observation."))
        with torch.no_grad():
            self.feature_dim = int(base.encode(dummy_observation(self.features, self.n_obs_steps)).shape[-1])
        self.build(self.config)

    @property
    def base(self) -> nn.Module:
        return self._base

    def build(self, cfg: Mapping[str, Any]) -> None:
        raise NotImplementedError

    @property
    def noise_shape(self) -> tuple[int, int]:
        return tuple(self.base.noise_shape)

    @property
    def n_exec(self) -> int:
        return self.n_action_steps

    @property
    def exec_slice(self) -> slice:
        """The chunk indices executed at run time (common.md: from n_obs_steps - 1, n_action_steps of them)."""
        return slice(self.n_obs_steps - 1, self.n_obs_steps - 1 + self.n_action_steps)

    @property
    def device(self) -> torch.device:
        return self.base.device

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.base.encode(obs)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return self.base.normalizer.normalize("action", actions)

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .float() move the hidden base too
        self.base._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def sample_chunk(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def _obs_action(features: Mapping[str, Mapping]) -> dict:
    return {k: (list(v["shape"]), v.get("dtype")) for k, v in features.items()
            if k.startswith("observation.") or k == "action"}


def save_refined(folder: str | Path, policy: RefinedPolicy, config: Mapping[str, Any],
                 extra_json: Mapping[str, Any] | None = None) -> Path:
    """A checkpoint folder `load_policy` reads like any other; config.yaml's policy section names the base."""
    return save_checkpoint(folder, policy, config={**dict(config), "policy": policy.config},
                           extra_json={"base": policy.config["base"], **dict(extra_json or {})})


# ---------------------------------------------------------------------------------------- replay buffer


class ReplayBuffer:
    """A ring buffer of numpy arrays, one per field (obs, action, reward, next_obs, done, steps, ...)."""

    def __init__(self, capacity: int, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, Any] | None = None):
        self.capacity = int(capacity)
        dtypes = dict(dtypes or {})
        self.data = {k: np.zeros((self.capacity, *s), dtype=dtypes.get(k, np.float32)) for k, s in shapes.items()}
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    def add(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append n transitions: every field as an array [n, ...]."""
        if set(rows) != set(self.data):
            raise KeyError(f"transition fields {sorted(rows)} differ from the buffer's {sorted(self.data)}.")
        n = len(next(iter(rows.values())))
        idx = (self.cursor + np.arange(n)) % self.capacity
        for k, v in rows.items():
            self.data[k][idx] = v
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, batch_size)
        return {k: torch.from_numpy(v[idx]) for k, v in self.data.items()}


# ---------------------------------------------------------------------------------- chunked vector rollout


class Method(Protocol):
    """What the collector and the online loop need from a refinement method."""

    policy: RefinedPolicy
    gamma: float
    keep_raw_obs: bool  # store the observation histories in the buffer (methods that re-run the base on them)

    def observe(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Input features [b, F] of the decision at these observation histories."""

    def act(self, obs: Mapping[str, torch.Tensor], inputs: torch.Tensor, workers: list[int], explore: bool
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(latent action [b, K], env actions [b, n_exec, A], extra fields to store with the transition)."""

    def start_episode(self, worker: int, env_steps: int) -> None: ...

    def update(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]: ...

    # on-policy methods (on_policy = True) instead implement ready() -> bool and update_rollouts() -> metrics;
    # their `buffer` is the collector's sink of whole episodes (robopolicy.rl.ppo.RolloutStore)


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
    queue: deque = field(default_factory=deque)
    pending: _Pending | None = None
    transitions: list[dict[str, np.ndarray]] = field(default_factory=list)
    ret: float = 0.0
    success: bool = False
    length: int = 0


def training_reward(kind: str, env_reward, success, *, reward_scale: float = 1.0, success_bonus: float = 0.0,
                    step_penalty: float = 0.0) -> np.ndarray:
    """The per-step reward the methods learn from (arrays over steps or envs), online and from a store alike:
    "sparse" is 1 on success; "dense" is the env's reward times `reward_scale` plus `success_bonus` on success;
    `step_penalty` is subtracted from both."""
    success = np.asarray(success, np.float64)
    if kind == "sparse":
        reward = success
    else:
        reward = np.asarray(env_reward, np.float64) * reward_scale + success_bonus * success
    return reward - step_penalty


class ChunkedCollector:
    """Steps a vector env (built with autoreset disabled) with chunked decisions of `method`, turning the steps into
    chunk-level transitions. Episodes continue across `collect` calls; finished workers are reset with the next
    episode seed (seed, seed + 1, ...). Each finished episode's transitions get its Monte-Carlo return-to-go
    (`mc_return`) and go to `sink` together.

    Reward: "sparse" is 1 on the step the task succeeds (episodes terminate on success), "dense" the env's own
    reward times `reward_scale`, plus `success_bonus` on the success step (for shaped rewards without a bonus of
    their own, such as MetaWorld's). `step_penalty` is subtracted on every step (DSRL's reward offset: with sparse
    rewards, -1 per step and 0 on success, so Q starts optimistic at 0 and faster successes score higher).
    `n_step` > 1 turns each transition into an n-decision one (see `n_step_rows`) before it goes to `sink`.
    """

    def __init__(self, envs, method: Method, sink: Callable[[dict[str, np.ndarray]], None], *,
                 reward: str = "sparse", reward_scale: float = 1.0, step_penalty: float = 0.0,
                 success_bonus: float = 0.0, seed: int = 0, n_step: int = 1):
        if reward not in ("sparse", "dense"):
            raise ValueError(f"reward {reward!r} is unknown; use 'sparse' or 'dense'.")
        if int(n_step) < 1:
            raise ValueError(f"n_step {n_step!r} must be a whole number >= 1 (1: one-decision TD targets).")
        self.n_step = int(n_step)
        self.envs, self.method, self.sink = envs, method, sink
        self.reward, self.reward_scale, self.step_penalty = reward, float(reward_scale), float(step_penalty)
        self.success_bonus = float(success_bonus)
        policy = method.policy
        self.n_obs_steps, self.n_exec, self.obs_keys = policy.n_obs_steps, policy.n_exec, policy.obs_keys
        self.env_steps = 0
        self.episodes: list[dict[str, Any]] = []  # {"env_steps", "success", "return", "length", "seed"}
        n = envs.num_envs
        self.next_seed = seed + n
        self.workers = [_Worker(seed=seed + i, history=deque(maxlen=self.n_obs_steps)) for i in range(n)]
        obs, _ = envs.reset(seed=[seed + i for i in range(n)])
        self.obs = obs
        for i in range(n):
            method.start_episode(i, 0)

    def _histories(self, workers: list[int]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.stack([np.stack([f[k] for f in self.workers[i].history]) for i in workers]))
                for k in self.obs_keys}  # each [b, To, ...]

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
            self._close(i, inputs_np[row], {k: v[row].numpy() for k, v in raw.items()}, done=False)
            w.pending = _Pending(obs=inputs_np[row], action=latent_np[row],
                                 extras={k: v[row] for k, v in extras_np.items()},
                                 raw={k: v[row].numpy() for k, v in raw.items()})
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
            learned = training_reward(self.reward, reward, success, reward_scale=self.reward_scale,
                                      success_bonus=self.success_bonus, step_penalty=self.step_penalty)
            for i in range(n):
                w = self.workers[i]
                w.pending.reward += float(learned[i])
                w.pending.steps += 1
                w.ret += float(reward[i])
                w.success |= bool(success[i])
                w.length += 1
            finished = [i for i in range(n) if terminated[i] or truncated[i]]
            if finished:
                self._finish(finished, next_obs, terminated)
                restart = np.zeros(n, dtype=bool)
                restart[finished] = True
                seeds = [None] * n
                for i in finished:
                    seeds[i] = self.next_seed
                    self.next_seed += 1
                new_obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": restart})
                next_obs = {k: np.where(restart.reshape(-1, *([1] * (v.ndim - 1))), new_obs[k], v)
                            for k, v in next_obs.items()}
                for i in finished:
                    self.workers[i] = _Worker(seed=seeds[i], history=deque(maxlen=self.n_obs_steps))
                    self.method.start_episode(i, self.env_steps)
            self.obs = next_obs
        return self.env_steps - start

    @torch.no_grad()
    def _finish(self, finished: list[int], final_obs: Mapping[str, np.ndarray], terminated: np.ndarray) -> None:
        """Close each finished episode's last transition with the input at its final observation."""
        self._push_frames(final_obs, finished)
        raw = self._histories(finished)
        inputs = self.method.observe(raw).cpu().numpy()
        for row, i in enumerate(finished):
            self._close(i, inputs[row], {k: v[row].numpy() for k, v in raw.items()}, done=bool(terminated[i]))
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
    return {f"{prefix}.{k}": np.uint8 for k in method.policy.obs_keys if k.startswith("observation.images.")
            for prefix in ("raw", "next_raw")}


def raw_obs(batch: Mapping[str, torch.Tensor], prefix: str = "raw") -> dict[str, torch.Tensor]:
    """The observation histories stored under `raw.<key>` (or `next_raw.<key>`) of a sampled batch."""
    return {k[len(prefix) + 1:]: v for k, v in batch.items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------------------------------- learning curves


class Curves:
    """Success rate against env steps: evaluations (95% Wilson interval) and training episodes; JSON and PNG."""

    def __init__(self, out: Path, algo: str, task: str | None):
        self.out, self.algo, self.task = Path(out), algo, task
        self.eval: list[dict[str, Any]] = []
        self.train_episodes: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def add_eval(self, env_steps: int, result: Mapping[str, Any]) -> dict[str, Any]:
        point = {"env_steps": int(env_steps), "success_rate": result["success_rate"],
                 "success_ci95": result["success_ci95"], "episodes": result["episodes"],
                 "mean_return": result["mean_return"], "wall_seconds": round(time.perf_counter() - self.started, 1)}
        self.eval.append(point)
        return point

    def steps_to(self, target: float, min_episodes: int = 0) -> int | None:
        """Env steps of the first evaluation of at least `min_episodes` episodes at or above `target` (None when
        none reached it)."""
        return next((p["env_steps"] for p in self.eval
                     if p["success_rate"] >= target and p["episodes"] >= min_episodes), None)

    def write(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        json_path, png_path = self.out / "curves.json", self.out / "curves.png"
        json_path.write_text(json.dumps({"algo": self.algo, "task": self.task, "eval": self.eval,
                                         "train_episodes": self.train_episodes}, indent=1))
        plot_curves({self.algo: self}, png_path, title=self.task or "")
        return json_path, png_path


def plot_curves(runs: Mapping[str, Curves], path: Path, title: str = "", window: int = 20) -> None:
    """One panel: evaluation success (markers, 95% band) and a moving average of training episode success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, curves in runs.items():
        line = None
        if curves.eval:
            x = [p["env_steps"] for p in curves.eval]
            line, = ax.plot(x, [p["success_rate"] for p in curves.eval], marker="o", label=f"{label} (eval)")
            ax.fill_between(x, [p["success_ci95"][0] for p in curves.eval], [p["success_ci95"][1] for p in curves.eval],
                            alpha=0.15, color=line.get_color())
        if curves.train_episodes:
            ok = np.array([e["success"] for e in curves.train_episodes], dtype=float)
            avg = np.convolve(ok, np.ones(window) / window, mode="valid") if len(ok) >= window else ok.cumsum() / (
                np.arange(len(ok)) + 1)
            steps = [e["env_steps"] for e in curves.train_episodes][len(ok) - len(avg):]
            ax.plot(steps, avg, linestyle=":", color=None if line is None else line.get_color(),
                    label=f"{label} (training, last {window})")
    ax.set(xlabel="environment steps", ylabel="success rate", ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- online loop


def run_online(method: Method, buffer: ReplayBuffer, make_envs: Callable[[int], Any], cfg: Mapping[str, Any],
               out: Path, *, log: Callable[[str], None] = print, progress=None) -> dict[str, Any]:
    """Collect chunked rollouts, update the method off-policy, evaluate periodically; returns the summary pieces.

    cfg: env_steps, num_envs, seed, reward, reward_scale, step_penalty, success_bonus,
    algo.{batch_size, learning_starts, updates_per_step, collect_steps, n_step},
    eval.{every, episodes, num_envs, target, confirm_episodes, stop_at_target}.
    """
    algo, ev = cfg["algo"], cfg["eval"]
    total = int(cfg["env_steps"])
    curves = Curves(out, str(algo["name"]), cfg.get("task"))
    rng = np.random.default_rng(int(cfg["seed"]))
    envs, eval_envs = make_envs(int(cfg["num_envs"])), None
    collector = ChunkedCollector(envs, method, buffer.add, reward=str(cfg.get("reward", "sparse")),
                                 reward_scale=float(cfg.get("reward_scale", 1.0)),
                                 step_penalty=float(cfg.get("step_penalty", 0.0)),
                                 success_bonus=float(cfg.get("success_bonus", 0.0)), seed=int(cfg["seed"]),
                                 # on-policy methods compute their own advantages over whole episodes
                                 n_step=1 if getattr(method, "on_policy", False) else int(algo.get("n_step", 1)))
    collect_steps = int(algo.get("collect_steps", 64))
    updates_per_step = float(algo.get("updates_per_step", 0.125))
    batch_size, learning_starts = int(algo.get("batch_size", 256)), int(algo.get("learning_starts", 2000))
    eval_every, eval_episodes = int(ev.get("every", 0)), int(ev.get("episodes", 0))
    target = float(ev.get("target", 0.9))
    # A short evaluation at or above the target is repeated over confirm_episodes before it counts: 20 episodes
    # on a policy at 0.7 reach 0.9 often enough to report a crossing that 100 episodes do not bear out.
    confirm_episodes = int(ev.get("confirm_episodes", 0))
    metrics: dict[str, float] = {}
    update_debt, n_updates = 0.0, 0
    next_eval = eval_every if eval_every else None
    reached = False
    try:
        if eval_episodes and eval_every:
            eval_envs = make_envs(int(ev.get("num_envs", 2)))
            log(f"env steps 0: success {_evaluate(curves, eval_envs, method, eval_episodes, 0):.2f}")
        while collector.env_steps < total and not reached:
            ran = collector.collect(min(collect_steps, total - collector.env_steps))
            if progress is not None:
                progress.update(ran)
            curves.train_episodes = collector.episodes
            if getattr(method, "on_policy", False):  # PPO: update on whole fresh episodes, then drop them
                if method.ready():
                    metrics = method.update_rollouts()
                    n_updates += 1
            elif len(buffer) and collector.env_steps >= learning_starts:
                update_debt += ran * updates_per_step
                while update_debt >= 1:
                    metrics = method.update(buffer.sample(batch_size, rng))
                    update_debt -= 1
                    n_updates += 1
            if next_eval is not None and collector.env_steps >= next_eval:
                next_eval += eval_every
                rate = _evaluate(curves, eval_envs, method, eval_episodes, collector.env_steps)
                log(f"env steps {collector.env_steps}: success {rate:.2f}, "
                    + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
                if rate >= target and confirm_episodes > eval_episodes:
                    rate = _evaluate(curves, eval_envs, method, confirm_episodes, collector.env_steps)
                    log(f"env steps {collector.env_steps}: success {rate:.2f} over {confirm_episodes} episodes")
                reached = bool(ev.get("stop_at_target", False)) and rate >= target
                curves.write()
    finally:
        envs.close()
        if eval_envs is not None:
            eval_envs.close()
    curves.train_episodes = collector.episodes
    return {"curves": curves, "env_steps": collector.env_steps, "updates": n_updates, "metrics": metrics,
            "train_success_rate": success_summary([e["success"] for e in collector.episodes[-50:]])["success_rate"]
            if collector.episodes else None}


def _evaluate(curves: Curves, envs, method: Method, episodes: int, env_steps: int) -> float:
    policy = method.policy.eval()
    result = evaluate(envs, policy, episodes, seed=EVAL_SEED)
    return curves.add_eval(env_steps, result)["success_rate"]
