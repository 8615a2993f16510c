"""Check a demonstration store end to end: metadata, arrays against their specs, every committed chunk."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import zarr

from robopolicy.data.chunks import ChunkError, ChunkReader
from robopolicy.data.spec import STAT_NAMES, is_image_key
from robopolicy.data.store import SOURCES, StoreError, _read_root_attrs, check_features


def validate_store(path: str | os.PathLike) -> list[str]:
    """Human-readable problems of the store at `path`; an empty list when it is valid."""
    path = Path(path)
    try:
        attrs = _read_root_attrs(path)
    except StoreError as err:
        return [str(err)]
    problems: list[str] = []
    num_episodes, num_frames = attrs["num_episodes"], attrs["num_frames"]
    if not (isinstance(num_episodes, int) and isinstance(num_frames, int) and num_episodes >= 0 and num_frames >= 0):
        return [f"{path}: num_episodes={num_episodes!r} / num_frames={num_frames!r} must be ints >= 0."]
    if not isinstance(attrs["fps"], int) or attrs["fps"] <= 0:
        problems.append(f"{path}: fps {attrs['fps']!r} must be a positive int.")
    try:
        features = check_features(attrs["features"])
    except StoreError as err:
        return [*problems, f"{path}: feature specs are invalid: {err}"]

    root = zarr.open_group(path, mode="r")
    problems += _check_undeclared_arrays(path, features)
    for key, spec in features.items():
        problems += _check_array(root, path, f"data/{key}", spec, num_frames)
    ends = _read_episode_ends(root, path, num_episodes, problems)
    if ends is not None:
        problems += _check_episodes(path, attrs["episodes"], ends, num_episodes, num_frames)
    problems += _check_stats(path, attrs.get("stats"), features)
    return problems


def _check_undeclared_arrays(path: Path, features: dict) -> list[str]:
    data_dir = path / "data"
    if not data_dir.is_dir():
        return [f"{path}: the data/ group is missing."]
    on_disk = {p.parent.name for p in data_dir.glob("*/zarr.json")}
    return [
        f"{path}: array data/{key} has no feature spec in the root metadata (was a spec deleted?)."
        for key in sorted(on_disk - set(features))
    ]


def _open_array(root: zarr.Group, path: Path, name: str) -> zarr.Array | str:
    try:
        array = root[name]
    except Exception as err:  # missing or garbled array metadata; zarr raises several types
        return f"{path}: array {name} cannot be opened ({type(err).__name__}: {err})."
    if not isinstance(array, zarr.Array):
        return f"{path}: {name} is a group, expected an array."
    return array


def _check_array(root: zarr.Group, path: Path, name: str, spec: dict, num_frames: int) -> list[str]:
    """Spec agreement, then every committed chunk decodes and float data is finite."""
    array = _open_array(root, path, name)
    if isinstance(array, str):
        return [array]
    problems = []
    if np.dtype(array.dtype) != np.dtype(spec["dtype"]):
        problems.append(f"{path}: {name} has dtype {array.dtype}, its feature spec says {spec['dtype']}.")
    if list(array.shape[1:]) != spec["shape"]:
        problems.append(f"{path}: {name} has frame shape {list(array.shape[1:])}, its feature spec says {spec['shape']}.")
    if array.shape[0] < num_frames:
        problems.append(f"{path}: {name} holds {array.shape[0]} frames, fewer than the committed {num_frames}.")
    if problems:
        return problems
    return _check_chunks(array, path, name, num_frames)


def _check_chunks(array: zarr.Array, path: Path, name: str, num_frames: int) -> list[str]:
    reader = ChunkReader(array, path / name)
    problems, first_nonfinite = [], None
    for index in range(reader.num_chunks(num_frames)):
        start = index * reader.frames_per_chunk
        stop = min(start + reader.frames_per_chunk, num_frames)
        try:
            chunk = reader.read(index)[: stop - start]
        except ChunkError as err:
            problems.append(f"{path}: {name} chunk {index} (frames {start}-{stop - 1}) is damaged: {err}.")
            continue
        if first_nonfinite is None and chunk.dtype.kind == "f":
            bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
            if bad.any():
                first_nonfinite = start + int(bad.argmax())
    if first_nonfinite is not None:
        problems.append(f"{path}: {name} holds NaN or inf (first at frame {first_nonfinite}).")
    return problems


def _read_episode_ends(root: zarr.Group, path: Path, num_episodes: int, problems: list[str]) -> np.ndarray | None:
    name = "meta/episode_ends"
    array = _open_array(root, path, name)
    if isinstance(array, str):
        problems.append(array)
        return None
    if np.dtype(array.dtype) != np.int64 or array.ndim != 1:
        problems.append(f"{path}: {name} must be int64 [num_episodes], got {array.dtype} {list(array.shape)}.")
        return None
    if array.shape[0] < num_episodes:
        problems.append(f"{path}: {name} holds {array.shape[0]} entries, fewer than the {num_episodes} committed episodes.")
        return None
    damaged = _check_chunks(array, path, name, num_episodes)
    problems += damaged
    return None if damaged else np.asarray(array[:num_episodes])


def _check_episodes(path: Path, episodes: object, ends: np.ndarray, num_episodes: int, num_frames: int) -> list[str]:
    problems = []
    if num_episodes and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
        problems.append(f"{path}: meta/episode_ends is not strictly increasing from a positive first end: {ends.tolist()[:20]}.")
    last = int(ends[-1]) if num_episodes else 0
    if last != num_frames:
        problems.append(f"{path}: meta/episode_ends ends at frame {last}, but num_frames is {num_frames}.")
    if not isinstance(episodes, list):
        return [*problems, f"{path}: the 'episodes' attribute must be a list of per-episode metadata."]
    if len(episodes) != num_episodes:
        return [*problems, f"{path}: the store commits {num_episodes} episodes but holds metadata for {len(episodes)}."]
    lengths = np.diff(ends, prepend=0)
    for i, episode in enumerate(episodes):
        where = f"{path}: episode {i} metadata"
        if not isinstance(episode, dict):
            problems.append(f"{where} is not a dict.")
            continue
        if episode.get("index") != i:
            problems.append(f"{where} has index {episode.get('index')!r}, expected {i}.")
        if episode.get("length") != int(lengths[i]):
            problems.append(f"{where} has length {episode.get('length')!r}, but meta/episode_ends gives {int(lengths[i])}.")
        if not isinstance(episode.get("task"), str):
            problems.append(f"{where} has task {episode.get('task')!r}, expected a string.")
        if episode.get("source") not in SOURCES:
            problems.append(f"{where} has source {episode.get('source')!r}, expected one of {', '.join(SOURCES)}.")
        if episode.get("success") not in (True, False, None):
            problems.append(f"{where} has success {episode.get('success')!r}, expected true, false or null.")
        quality = episode.get("quality")
        if not isinstance(quality, (int, float)) or isinstance(quality, bool) or not math.isfinite(quality) or quality < 0:
            problems.append(f"{where} has quality {quality!r}, expected a finite number >= 0.")
    return problems


def _check_stats(path: Path, stats: object, features: dict) -> list[str]:
    if stats is None:
        return []
    if not isinstance(stats, dict):
        return [f"{path}: cached stats must be a dict keyed by feature."]
    problems = []
    for key, per_key in stats.items():
        if key not in features:
            problems.append(f"{path}: cached stats name {key!r}, which is not a feature.")
            continue
        spec = features[key]
        expected = [spec["shape"][-1]] if is_image_key(key) else spec["shape"]
        for name in STAT_NAMES:
            try:
                value = np.asarray(per_key[name], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                problems.append(f"{path}: cached stats of {key!r} lack a numeric {name!r}.")
                continue
            if list(value.shape) != expected:
                problems.append(f"{path}: cached stats {key!r}/{name} have shape {list(value.shape)}, the data needs {expected}.")
            elif not np.isfinite(value).all():
                problems.append(f"{path}: cached stats {key!r}/{name} hold NaN or inf.")
    return problems
