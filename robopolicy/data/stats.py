"""Normalization statistics of a store: mean, std, min, max, q01, q99 per dimension (images: per channel).

Low-dimensional features are read whole (they fit in memory). Images are streamed chunk by chunk into one
256-bin histogram per channel: uint8 pixels make every statistic, quantiles included, exact from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from robopolicy.data.chunks import ChunkError, ChunkReader
from robopolicy.data.store import STAT_NAMES, StoreError, is_image_key

if TYPE_CHECKING:
    from robopolicy.data.store import DemoStore

QUANTILES = (0.01, 0.99)


def compute_store_stats(store: DemoStore) -> dict[str, dict[str, np.ndarray]]:
    if store.num_frames == 0:
        raise StoreError(f"{store.path} holds no frames yet; append episodes before computing statistics.")
    stats = {}
    for key in store.features:
        if is_image_key(key):
            stats[key] = image_stats(_channel_histograms(store, key))
        else:
            stats[key] = lowdim_stats(store.read(key))
    return stats


def lowdim_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """values [N, *shape] -> each statistic with the feature's shape (float32)."""
    values = values.astype(np.float64)
    q01, q99 = np.quantile(values, QUANTILES, axis=0)
    stats = {
        "mean": values.mean(axis=0), "std": values.std(axis=0),
        "min": values.min(axis=0), "max": values.max(axis=0), "q01": q01, "q99": q99,
    }
    return {name: np.asarray(stats[name], dtype=np.float32) for name in STAT_NAMES}


def image_stats(histograms: np.ndarray) -> dict[str, np.ndarray]:
    """histograms [C, 256] pixel counts -> each statistic [C] in [0, 1] units (as np.quantile 'linear')."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    count = histograms.sum(axis=1, keepdims=True).astype(np.float64)
    mean = (histograms * levels).sum(axis=1) / count[:, 0]
    var = (histograms * levels**2).sum(axis=1) / count[:, 0] - mean**2
    present = histograms > 0
    stats = {
        "mean": mean,
        "std": np.sqrt(np.maximum(var, 0.0)),
        "min": levels[present.argmax(axis=1)],
        "max": levels[255 - present[:, ::-1].argmax(axis=1)],
    }
    cumulative = histograms.cumsum(axis=1)
    for name, q in zip(("q01", "q99"), QUANTILES):
        position = q * (count[:, 0] - 1)  # rank in the sorted pixels, interpolated like np.quantile
        lo, hi = np.floor(position), np.ceil(position)
        value_lo = np.array([np.searchsorted(c, r, side="right") for c, r in zip(cumulative, lo)])
        value_hi = np.array([np.searchsorted(c, r, side="right") for c, r in zip(cumulative, hi)])
        stats[name] = (value_lo + (position - lo) * (value_hi - value_lo)) / 255.0
    return {name: np.asarray(stats[name], dtype=np.float32) for name in STAT_NAMES}


def _channel_histograms(store: DemoStore, key: str) -> np.ndarray:
    reader = ChunkReader(store.array(key), store.path / "data" / key)
    channels = store.features[key]["shape"][-1]
    histograms = np.zeros((channels, 256), dtype=np.int64)
    for index in range(reader.num_chunks(store.num_frames)):
        start = index * reader.frames_per_chunk
        try:
            chunk = reader.read(index)[: store.num_frames - start]  # [n, H, W, C]
        except ChunkError as err:
            raise StoreError(f"{store.path}: data/{key} chunk {index}: {err}; run validate_store.") from None
        pixels = chunk.reshape(-1, channels)
        for c in range(channels):
            histograms[c] += np.bincount(pixels[:, c], minlength=256)
    return histograms
