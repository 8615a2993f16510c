"""The replay buffer of chunk-level transitions shared by the off-policy refinement methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


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
