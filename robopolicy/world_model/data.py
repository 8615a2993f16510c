"""The world model's data: whole episodes (state, action, reward, success per step) from one or more stores
(demonstrations, rollouts, deployment recordings), and batches of chunk-step windows drawn from them.

A window starts at any frame t of an episode and covers `horizon` chunk steps: at step h the state at
t + h K (K = chunk_steps), the K actions executed from there (padded with the episode's last action past its end),
their summed reward and whether the task succeeded among them. A store records the observation before each
action, so an episode's final observation is missing: a step that reaches past the episode's end has no next
state (masked), only its reward and success targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robopolicy.data import DemoStore
from robopolicy.data.spec import ACTION_KEY, REWARD_KEY, STATE_KEY, SUCCESS_KEY, feature_mismatch
from robopolicy.world_model.model import WorldModelError

NEEDED = (STATE_KEY, ACTION_KEY, REWARD_KEY, SUCCESS_KEY)


@dataclass
class Episodes:
    """Episodes concatenated over time, as the store keeps them: arrays [N, ...] and each episode's start and
    length."""

    state: np.ndarray  # [N, S]
    action: np.ndarray  # [N, A]
    reward: np.ndarray  # [N]
    success: np.ndarray  # [N] bool
    starts: np.ndarray  # [E]
    lengths: np.ndarray  # [E]

    @property
    def num_episodes(self) -> int:
        return len(self.starts)

    def subset(self, episodes: Sequence[int]) -> Episodes:
        parts = [slice(int(self.starts[e]), int(self.starts[e] + self.lengths[e])) for e in episodes]
        lengths = np.array([self.lengths[e] for e in episodes], dtype=np.int64)
        return Episodes(*(np.concatenate([a[p] for p in parts]) for a in (self.state, self.action, self.reward,
                                                                           self.success)),
                        starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths=lengths)

    def extend(self, frames: Sequence[dict[str, np.ndarray]]) -> Episodes:
        """These episodes plus recorded ones (rollout frames keyed as a store's)."""
        if not frames:
            return self
        lengths = np.array([len(f[ACTION_KEY]) for f in frames], dtype=np.int64)
        state = np.concatenate([self.state, *[f[STATE_KEY] for f in frames]]).astype(np.float32)
        return Episodes(state, np.concatenate([self.action, *[f[ACTION_KEY] for f in frames]]).astype(np.float32),
                        np.concatenate([self.reward, *[f[REWARD_KEY] for f in frames]]).astype(np.float32),
                        np.concatenate([self.success, *[f[SUCCESS_KEY] for f in frames]]).astype(bool),
                        np.concatenate([self.starts, len(self.state) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
                                        ]).astype(np.int64),
                        np.concatenate([self.lengths, lengths]))

    def first_states(self) -> np.ndarray:
        """Every episode's start state [E, S] (real start states for imagined rollouts)."""
        return self.state[self.starts]

    def histories(self, obs_steps: int, first_only: bool = False) -> np.ndarray:
        """The `obs_steps` states up to every frame [N, To, S] (an episode's start padded with its first frame, as
        rollouts pad it), or up to every episode's first frame only [E, To, S]."""
        ids = np.arange(self.num_episodes) if first_only else np.repeat(np.arange(self.num_episodes), self.lengths)
        t = np.zeros(len(ids), np.int64) if first_only else np.concatenate([np.arange(n) for n in self.lengths])
        back = np.clip(t[:, None] - np.arange(obs_steps - 1, -1, -1), 0, None)  # [N, To]
        return self.state[self.starts[ids][:, None] + back]


def load_episodes(paths: Sequence[str | Path]) -> tuple[Episodes, dict]:
    """Every episode of the stores (they must share their state and action features), and those features."""
    if not paths:
        raise WorldModelError("data= names no store: pass data=STORE or data=[STORE,STORE].")
    parts, features = [], None
    for path in paths:
        if not Path(path).exists():
            raise WorldModelError(f"No store at {path}: check the path (stores are made by `robopolicy collect`).")
        store = DemoStore.open(path)
        missing = [k for k in NEEDED if k not in store.features]
        if missing:
            raise WorldModelError(f"The store {path} has no {', '.join(missing)}: a world model learns from "
                                  f"{', '.join(NEEDED)}.")
        own = {k: store.features[k] for k in (STATE_KEY, ACTION_KEY)}
        if features is None:
            features = own
        mismatch = feature_mismatch(features, own, f"features of {paths[0]} and of {path}")
        if mismatch:
            raise WorldModelError(mismatch)
        if store.num_episodes == 0:
            continue
        data = {k: store.read(k) for k in NEEDED}
        for key in (STATE_KEY, ACTION_KEY, REWARD_KEY):
            if not np.isfinite(data[key]).all():
                raise WorldModelError(f"The store {path} holds NaN or infinite values in {key}.")
        parts.append((data, store.episode_starts, store.episode_ends - store.episode_starts))
    if not parts:
        raise WorldModelError(f"The stores {', '.join(map(str, paths))} hold no episodes.")
    offsets = np.cumsum([0] + [len(p[0][STATE_KEY]) for p in parts])
    episodes = Episodes(
        np.concatenate([p[0][STATE_KEY] for p in parts]).astype(np.float32),
        np.concatenate([p[0][ACTION_KEY] for p in parts]).astype(np.float32),
        np.concatenate([p[0][REWARD_KEY] for p in parts]).astype(np.float32),
        np.concatenate([p[0][SUCCESS_KEY] for p in parts]).astype(bool),
        np.concatenate([p[1] + o for p, o in zip(parts, offsets)]).astype(np.int64),
        np.concatenate([p[2] for p in parts]).astype(np.int64))
    return episodes, features


def sample_windows(episodes: Episodes, batch_size: int, horizon: int, chunk_steps: int, obs_steps: int,
                   rng: np.random.Generator, episode_ids: np.ndarray | None = None, t: np.ndarray | None = None
                   ) -> dict[str, torch.Tensor]:
    """A batch of windows (random start frames, or episodes `episode_ids` from frames `t`):

        state [B, H+1, S]       encoder inputs at each step (clamped to the last frame past the end)
        history [B, H+1, To, S] decoder targets: the obs_steps states up to each step (start padded)
        chunk [B, H, K, A]      executed actions (padded with the episode's last action)
        reward [B, H]           env reward summed over the chunk's steps within the episode
        success [B, H]          the task succeeded within the chunk
        valid [B, H+1]          step h starts inside the episode
    """
    if episode_ids is None:
        episode_ids = rng.integers(0, episodes.num_episodes, batch_size)
        t = (rng.random(batch_size) * episodes.lengths[episode_ids]).astype(np.int64)
    start, length = episodes.starts[episode_ids][:, None], episodes.lengths[episode_ids][:, None]
    pos = t[:, None] + np.arange(horizon + 1)[None] * chunk_steps  # [B, H+1]
    valid = pos < length
    state_idx = start + np.minimum(pos, length - 1)
    hist = np.clip(pos[..., None] - np.arange(obs_steps - 1, -1, -1), 0, length[..., None] - 1)  # [B, H+1, To]
    steps = pos[:, :-1, None] + np.arange(chunk_steps)  # [B, H, K]
    inside = steps < length[..., None]
    step_idx = start[..., None] + np.minimum(steps, length[..., None] - 1)
    return {
        "state": torch.from_numpy(episodes.state[state_idx]),
        "history": torch.from_numpy(episodes.state[start[..., None] + hist]),
        "chunk": torch.from_numpy(episodes.action[step_idx]),
        "reward": torch.from_numpy((episodes.reward[step_idx] * inside).sum(-1).astype(np.float32)),
        "success": torch.from_numpy((episodes.success[step_idx] & inside).any(-1).astype(np.float32)),
        "valid": torch.from_numpy(valid.astype(np.float32)),
    }


def all_windows(episodes: Episodes, horizon: int, chunk_steps: int, obs_steps: int) -> dict[str, torch.Tensor]:
    """One window from every frame of every episode (held-out evaluation)."""
    ids = np.repeat(np.arange(episodes.num_episodes), episodes.lengths)
    t = np.concatenate([np.arange(n) for n in episodes.lengths])
    return sample_windows(episodes, len(ids), horizon, chunk_steps, obs_steps, np.random.default_rng(0), ids, t)
