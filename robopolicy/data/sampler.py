"""Training windows from a demonstration store (the diffusion_policy convention).

A window anchored at frame t of an episode holds observations of frames t-To+1 .. t and actions of frames
t-To+1 .. t-To+horizon. Frame indices are clamped into the episode: observations before its start repeat the
first frame, actions outside it repeat the first / last action, and `action_is_pad` marks every action whose
frame lies outside the episode. Low-dimensional arrays live in memory; images come through an LRU cache of
decoded chunks, read straight from the chunk files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch.utils.data

from robopolicy.data.chunks import ChunkError, ChunkReader
from robopolicy.data.spec import ACTION_KEY, is_image_key, policy_features
from robopolicy.data.store import DemoStore, StoreError


class WindowDataset(torch.utils.data.Dataset):
    """One item per frame of the selected episodes: a dict of numpy arrays for the window anchored there."""

    def __init__(
        self,
        store: DemoStore,
        n_obs_steps: int,
        horizon: int,
        *,
        keys: Sequence[str] | None = None,
        episodes: Sequence[int] | None = None,
        image_cache_chunks: int = 256,
        frame_stride: int = 1,
        tasks: bool = False,
    ):
        """`frame_stride` k > 1 reads every k-th frame (a store recorded at k times the policy's rate, such as a
        deployment at 20 Hz of a 10 Hz policy)."""
        if n_obs_steps < 1 or horizon < n_obs_steps:
            raise StoreError(f"need 1 <= n_obs_steps <= horizon, got n_obs_steps={n_obs_steps}, horizon={horizon}.")
        if frame_stride < 1:
            raise StoreError(f"frame_stride must be at least 1, got {frame_stride}.")
        self.n_obs_steps, self.horizon, self.frame_stride = n_obs_steps, horizon, frame_stride
        self.store_path = store.path
        keys = list(keys) if keys is not None else list(policy_features(store.features))
        for key in keys:
            if key not in store.features:
                raise StoreError(f"{store.path}: no feature {key!r} to sample; the store has {', '.join(store.features)}.")
        if ACTION_KEY not in keys:
            raise StoreError(f"{store.path}: training windows need the {ACTION_KEY!r} feature among keys {keys}.")
        self.keys = keys
        self.image_keys = [k for k in keys if is_image_key(k)]

        selected = np.arange(store.num_episodes) if episodes is None else np.asarray(list(episodes), dtype=np.int64)
        if selected.size and (selected.min() < 0 or selected.max() >= store.num_episodes):
            raise StoreError(f"{store.path}: episodes {selected.tolist()} reach outside [0, {store.num_episodes}).")
        ends, starts = store.episode_ends, store.episode_starts
        # per item: its anchor frame and the [start, end) of its episode, all in store frame indices
        lengths = ends[selected] - starts[selected]
        self.item_episode = np.repeat(selected, lengths)
        self.item_start = np.repeat(starts[selected], lengths)
        self.item_end = np.repeat(ends[selected], lengths)
        self.item_frame = self.item_start + (np.arange(len(self.item_episode)) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        # with `tasks`, each window carries its episode's instruction as "task" (for language policies)
        self.episode_task = np.array([ep["task"] for ep in store.episodes], dtype=object) if tasks else None
        quality = np.array([ep["quality"] for ep in store.episodes], dtype=np.float64)
        self.item_quality = quality[self.item_episode] if len(quality) else np.zeros(0)

        self.lowdim = {k: store.read(k) for k in keys if not is_image_key(k)}
        self.image_readers = {k: ChunkReader(store.array(k), store.path / "data" / k) for k in self.image_keys}
        self.image_cache_chunks = image_cache_chunks
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.item_frame)

    def sample_weights(self) -> np.ndarray:
        """Per-item weights (the quality weight of each item's episode), for a WeightedRandomSampler."""
        return self.item_quality.copy()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch = self.get_batch([index])
        return {key: value[0] for key, value in batch.items()}

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Stacked windows for many items at once: states [B, To, D], images [B, To, H, W, 3],
        action [B, horizon, A], action_is_pad [B, horizon] (and task: instruction strings [B], an object array)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"window index out of range for a dataset of {len(self)} items")
        anchor = self.item_frame[indices][:, None]
        start, end = self.item_start[indices][:, None], self.item_end[indices][:, None]
        k = self.frame_stride
        obs_frames = np.maximum(anchor + k * np.arange(1 - self.n_obs_steps, 1), start)  # [B, To]
        action_frames = anchor + k * np.arange(1 - self.n_obs_steps, 1 - self.n_obs_steps + self.horizon)  # [B, H]
        batch = {"action_is_pad": (action_frames < start) | (action_frames >= end)}
        action_frames = np.clip(action_frames, start, end - 1)
        for key, values in self.lowdim.items():
            batch[key] = values[action_frames if key == ACTION_KEY else obs_frames]
        for key in self.image_keys:
            batch[key] = self._gather_images(key, obs_frames)
        if self.episode_task is not None:
            batch["task"] = self.episode_task[self.item_episode[indices]]
        return batch

    def _gather_images(self, key: str, frames: np.ndarray) -> np.ndarray:
        """frames [B, To] -> uint8 [B, To, H, W, 3], decoding each needed chunk once."""
        reader = self.image_readers[key]
        out = np.empty((*frames.shape, *reader.chunk_shape[1:]), dtype=np.uint8)
        flat = frames.reshape(-1)
        flat_out = out.reshape(len(flat), *reader.chunk_shape[1:])
        chunk_ids, offsets = np.divmod(flat, reader.frames_per_chunk)
        for chunk_id in np.unique(chunk_ids):
            chunk = self._chunk(key, reader, int(chunk_id))
            where = chunk_ids == chunk_id
            flat_out[where] = chunk[offsets[where]]
        return out

    def _chunk(self, key: str, reader: ChunkReader, chunk_id: int) -> np.ndarray:
        cached = self._cache.get((key, chunk_id))
        if cached is not None:
            self._cache.move_to_end((key, chunk_id))
            return cached
        try:
            chunk = reader.read(chunk_id)
        except ChunkError as err:
            raise StoreError(f"{self.store_path}: data/{key} chunk {chunk_id}: {err}; run validate_store.") from None
        if self.image_cache_chunks > 0:
            self._cache[(key, chunk_id)] = chunk
            if len(self._cache) > self.image_cache_chunks:
                self._cache.popitem(last=False)
        return chunk

    def __getstate__(self) -> dict:
        # DataLoader workers start with an empty cache each (and skip copying the parent's)
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state
