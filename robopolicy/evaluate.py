"""Evaluation of a policy in vectorized simulation: success rate with its 95% Wilson interval, returns, videos.

`PolicyAgent` is how every part of the project runs an action-chunk policy in a vector env: it keeps each
worker's observation history (`n_obs_steps`) and queue of actions, and asks the policy for a new chunk only for
the workers whose queue ran out, in one batch. The initial noise of each worker comes from a generator seeded by
its episode seed, so an evaluation is reproducible given its seeds and `num_envs` (a batch's float rounding
depends on its size, ~1e-6 in the actions, which a contact-rich task can turn into another outcome: a weak vla on
builtin/push_two_ways scored 0.41 over 100 episodes at num_envs=2 and 0.46 at 8; compare checkpoints at one).
A policy that declares `language` gets each worker's instruction as `obs["task"]` (the envs' `instruction`, read
by the rollout at every reset). The evaluation of a language policy, or of any policy on a task with goals
(`goal_fields`: the language tasks, MetaWorld's `metaworld/mt10` whose goal is the task), reports success per goal
beside the total.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from robopolicy.data.spec import OBSERVATION_PREFIX, is_image_key
from robopolicy.metrics import mean_success_summary, success_summary
from robopolicy.rollout import TASK_KEY, Episode, run_episodes

# Seeds for evaluation start far from the collection seeds (0, 1, ...), so a policy is scored on unseen episodes.
EVAL_SEED = 100_000


class PolicyAgent:
    def __init__(self, policy, num_workers: int, *, chunk_fn: Callable | None = None):
        """`chunk_fn(obs, noise) -> actions [B, H, A]` replaces `policy.sample_chunk` (e.g. value-guided selection)."""
        self.policy = policy
        self.chunk_fn = chunk_fn or policy.sample_chunk
        self.obs_keys = [k for k in policy.features if k.startswith(OBSERVATION_PREFIX)]
        self.history = [deque(maxlen=policy.n_obs_steps) for _ in range(num_workers)]
        self.queue: list[deque] = [deque() for _ in range(num_workers)]
        self.generators = [torch.Generator() for _ in range(num_workers)]

    def reset(self, index: int, seed: int) -> None:
        self.history[index].clear()
        self.queue[index].clear()
        self.generators[index].manual_seed(seed)

    def act(self, obs: dict[str, np.ndarray], active: np.ndarray) -> np.ndarray:
        policy = self.policy
        for i in np.flatnonzero(active):
            frame = {k: obs[k][i] for k in self.obs_keys}
            history = self.history[i]
            history.append(frame)
            while len(history) < policy.n_obs_steps:  # pad the start of an episode with its first frame
                history.appendleft(frame)
        need = [i for i in np.flatnonzero(active) if not self.queue[i]]
        if need:
            batch = {k: torch.from_numpy(np.stack([np.stack([f[k] for f in self.history[i]]) for i in need]))
                     for k in self.obs_keys}  # each [b, To, ...]
            if policy.language:
                batch[TASK_KEY] = [str(obs[TASK_KEY][i]) for i in need]
            noise = torch.stack([torch.randn(policy.noise_shape, generator=self.generators[i]) for i in need])
            with torch.inference_mode():
                chunk = self.chunk_fn(batch, noise).cpu().numpy()  # [b, H, A]
            start = policy.n_obs_steps - 1
            for row, i in enumerate(need):
                self.queue[i].extend(chunk[row, start:start + policy.n_action_steps])
        action = np.zeros((len(self.queue), policy.action_dim), dtype=np.float32)
        for i in np.flatnonzero(active):
            action[i] = self.queue[i].popleft()
        return action


def evaluate(envs, policy, n_episodes: int, *, seed: int = EVAL_SEED, chunk_fn: Callable | None = None,
             video_dir: str | Path | None = None, n_videos: int = 0, progress=None) -> dict:
    """Success rate (with 95% Wilson interval), mean return and length over `n_episodes` seeded episodes."""
    start = time.perf_counter()
    agent = PolicyAgent(policy, envs.num_envs, chunk_fn=chunk_fn)
    image_keys = [k for k in envs.single_observation_space.spaces if is_image_key(k)]
    n_videos = n_videos if (video_dir and image_keys) else 0
    instructed = policy.language or has_goals(envs)

    def done(ep: Episode) -> None:
        if ep.index < n_videos:
            write_video(Path(video_dir) / f"episode_{ep.index:03d}.mp4", ep.stacked()[image_keys[0]],
                        fps=_fps(envs))
        if progress is not None:
            progress.update(1)

    # a sampler that draws inside its steps (DDPM's) draws from torch's global generator: seeded here, the evaluation
    # is the seed's alone; forked, so the caller's stream (a training run's) does not depend on it
    with torch.random.fork_rng():  # the CPU's generator and, where CUDA runs, each GPU's
        torch.manual_seed(seed)
        episodes = run_episodes(envs, agent, n_episodes, seed=seed, record=lambda index: index < n_videos,
                                on_episode=done, instructions=instructed)
    summary = success_summary([ep.success for ep in episodes])
    if instructed:
        summary["per_goal"] = per_group(episodes, lambda ep: goal_name(ep.goal))
    summary.update(
        mean_return=float(np.mean([ep.ret for ep in episodes])),
        mean_length=float(np.mean([ep.length for ep in episodes])),
        seed=seed,
        seconds=round(time.perf_counter() - start, 2),
        per_episode=[{"seed": ep.seed, "success": ep.success, "return": round(ep.ret, 4), "length": ep.length,
                      "max_step_reward": round(ep.max_step_reward, 4),
                      **({"instruction": ep.instruction} if instructed else {})} for ep in episodes],
    )
    return summary


def has_goals(envs) -> bool:
    """Whether a vector env's task draws a goal per episode (`goal_fields`), by which its success is grouped."""
    try:
        return bool(envs.get_attr("goal_fields")[0])
    except Exception:  # a task without the attribute (single MetaWorld tasks, pusht)
        return False


def goal_name(goal: dict) -> str:
    """A goal dict as one short label: {"color": "red", "target": "yellow"} -> "color=red,target=yellow"."""
    return ",".join(f"{k}={v}" for k, v in goal.items()) or "-"


def per_group(episodes: list[Episode], key: Callable[[Episode], str]) -> dict:
    """Success (with its Wilson interval) per group of episodes, and the unweighted mean over the groups (with its
    interval: `mean_success_summary`)."""
    groups: dict[str, list[bool]] = {}
    for ep in episodes:
        groups.setdefault(key(ep), []).append(ep.success)
    out = {name: success_summary(groups[name]) for name in sorted(groups)}
    mean = mean_success_summary(list(out.values()))
    return {"groups": out, "mean": mean["success_rate"], "mean_ci95": mean["success_ci95"]}


def _fps(envs) -> int:
    try:
        return int(envs.get_attr("fps")[0])
    except Exception:  # an env without the attribute: a sensible video rate
        return 10


def write_video(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """mp4 through imageio's ffmpeg plugin (shipped as a wheel), gif when ffmpeg is unavailable."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
        return path
    except Exception:
        gif = path.with_suffix(".gif")
        imageio.mimwrite(gif, list(frames), duration=1.0 / fps)
        return gif
