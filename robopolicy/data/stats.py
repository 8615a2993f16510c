"""Normalization statistics as pure functions of arrays: mean, std, min, max and quantiles per dimension, or per
channel for images. The store streams its frames through them (`DemoStore.compute_stats`); the LeRobot exporter
uses the same functions with LeRobot's list of quantiles.

Images are counted into one 256-bin histogram per channel (`channel_histograms`, summed over chunks or episodes):
uint8 pixels make every statistic, quantiles included, exact from it. Values come back as float64; the store
keeps float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

QUANTILES = {"q01": 0.01, "q99": 0.99}  # the store's: with mean, std, min, max they make spec.STAT_NAMES


def lowdim_stats(values: np.ndarray, quantiles: Mapping[str, float] = QUANTILES) -> dict[str, np.ndarray]:
    """values [N, *shape] -> mean, std, min, max and each named quantile, each with the feature's shape."""
    values = values.astype(np.float64)
    stats = {"mean": values.mean(axis=0), "std": values.std(axis=0), "min": values.min(axis=0),
             "max": values.max(axis=0)}
    stats.update(zip(quantiles, np.quantile(values, list(quantiles.values()), axis=0)))
    return stats


def channel_histograms(images: np.ndarray) -> np.ndarray:
    """images [..., C] uint8 -> pixel counts [C, 256]."""
    pixels = images.reshape(-1, images.shape[-1])
    return np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(pixels.shape[1])]).astype(np.int64)


def image_stats(histograms: np.ndarray, quantiles: Mapping[str, float] = QUANTILES) -> dict[str, np.ndarray]:
    """histograms [C, 256] pixel counts -> mean, std, min, max and each named quantile, each [C] in [0, 1] units
    (quantiles interpolated between pixel values as np.quantile's 'linear')."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    count = histograms.sum(axis=1).astype(np.float64)  # [C]
    mean = histograms @ levels / count
    present = histograms > 0
    stats = {
        "mean": mean,
        "std": np.sqrt(np.maximum(histograms @ levels**2 / count - mean**2, 0.0)),
        "min": levels[present.argmax(axis=1)],
        "max": levels[255 - present[:, ::-1].argmax(axis=1)],
    }
    cumulative = histograms.cumsum(axis=1)
    for name, q in quantiles.items():
        rank = q * (count - 1)  # in the sorted pixels of each channel
        lo, hi = np.floor(rank), np.ceil(rank)
        value_lo = np.array([np.searchsorted(c, r, side="right") for c, r in zip(cumulative, lo)])
        value_hi = np.array([np.searchsorted(c, r, side="right") for c, r in zip(cumulative, hi)])
        stats[name] = (value_lo + (rank - lo) * (value_hi - value_lo)) / 255.0
    return stats
