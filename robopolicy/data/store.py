"""The demonstration store: a zarr v3 directory of episodes with an atomic append.

Layout
    zarr.json                  root group; its attributes are the store's metadata AND the commit record
    data/<key>/                one array per feature, frames of all episodes concatenated on axis 0
    meta/episode_ends/         int64 [num_episodes], cumulative end frame of each episode

Commit protocol (a SIGKILL at any moment leaves every finished episode readable):
    1. resize every data array to num_frames + T and write the episode's frames,
    2. resize meta/episode_ends and write the new end,
    3. rewrite the root zarr.json with num_episodes + 1, num_frames + T and the episode's metadata.
Step 3 is one atomic file replace (zarr's LocalStore writes a temp `*.partial` file and renames it), so it is
the commit point. Readers and `validate_store` trust only the first `num_episodes` episodes and the first
`num_frames` frames; whatever a killed append left past them is ignored and overwritten by the next append.
Steps 1-2 only ever rewrite committed bytes inside the chunk that straddles `num_frames`, and they rewrite
them with the same values through an atomic replace, so committed data never changes. Stale `*.partial` files
are removed when the store is opened for appending. Durability across power loss (fsync) is not attempted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from robopolicy.data.chunks import ChunkError, ChunkReader
from robopolicy.data.spec import STAT_NAMES, is_image_key
from robopolicy.data.stats import channel_histograms, image_stats, lowdim_stats

try:  # a single-writer lock; not available on Windows, where we simply go without it
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = "robopolicy.demo_store"
FORMAT_VERSION = 1
SOURCES = ("expert", "policy", "human", "intervention")
DTYPES = ("float32", "float64", "uint8", "int32", "int64", "bool")
LOWDIM_CHUNK_BYTES = 1 << 20  # ~1 MiB of frames per low-dimensional chunk
IMAGE_CHUNK_FRAMES = 1  # one frame per image chunk: random access decodes only what a window needs
LOCK_FILE = ".writer.lock"


class StoreError(Exception):
    """A demonstration store, or data offered to it, is missing, malformed or inconsistent."""


def check_features(features: dict[str, dict]) -> dict[str, dict]:
    """Normalize feature specs to {"dtype", "shape", "names"}; raise StoreError naming a bad one."""
    if not isinstance(features, dict) or not features:
        raise StoreError("features must be a non-empty dict mapping a feature key to its spec.")
    clean = {}
    for key, spec in features.items():
        if not isinstance(key, str) or not key or "/" in key or key.startswith("__"):
            raise StoreError(f"feature key {key!r} is not a valid name (no '/', not empty, no leading '__').")
        if not isinstance(spec, dict) or "dtype" not in spec or "shape" not in spec:
            raise StoreError(f"feature {key!r}: spec must be a dict with 'dtype' and 'shape', got {spec!r}.")
        dtype = str(spec["dtype"])
        if dtype not in DTYPES:
            raise StoreError(f"feature {key!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
        shape = spec["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise StoreError(f"feature {key!r}: shape must be a list of positive ints, got {shape!r}.")
        names = spec.get("names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise StoreError(f"feature {key!r}: names must be null or a list of strings, got {names!r}.")
        if is_image_key(key) and (dtype != "uint8" or len(shape) != 3 or shape[2] != 3):
            raise StoreError(f"feature {key!r}: images must be uint8 [H, W, 3], got {dtype} {list(shape)}.")
        clean[key] = {"dtype": dtype, "shape": [int(s) for s in shape], "names": names}
    return clean


def chunk_frames(spec: dict, key: str) -> int:
    if is_image_key(key):
        return IMAGE_CHUNK_FRAMES
    frame_bytes = math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
    return int(min(1 << 16, max(64, LOWDIM_CHUNK_BYTES // frame_bytes)))


def _compressors(key: str) -> list:
    # crc32c after zstd: a damaged chunk fails its checksum on read instead of decoding to garbage
    return [ZstdCodec(level=1 if is_image_key(key) else 3), Crc32cCodec()]


def _is_store_dir(path: Path) -> bool:
    try:
        attrs = json.loads((path / "zarr.json").read_text())["attributes"]
        return attrs.get("format") == FORMAT
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _read_root_attrs(path: Path) -> dict:
    """The root attributes of a store, or StoreError saying what is wrong with the path."""
    if not path.exists():
        raise StoreError(f"{path} does not exist; create a store with DemoStore.create or check the path.")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a demonstration store directory.")
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        raise StoreError(f"{path} is not a demonstration store (no zarr.json); check the path.")
    try:
        meta = json.loads(meta_file.read_text())
        attrs = meta["attributes"]
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{meta_file} is garbled ({err}); the store's root metadata cannot be read.") from None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is a zarr group but not a robopolicy demonstration store (format != {FORMAT!r}).")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path} has format_version {attrs.get('format_version')!r}; this robopolicy reads version "
            f"{FORMAT_VERSION}. Convert the store or use a matching robopolicy."
        )
    for name in ("fps", "features", "num_episodes", "num_frames", "episodes"):
        if name not in attrs:
            raise StoreError(f"{meta_file}: attribute {name!r} is missing; the store's root metadata is damaged.")
    return attrs


class DemoStore:
    """Episodes of robot demonstrations in a zarr v3 directory (see the module docstring for the layout)."""

    _lock_fd: int | None = None  # also on the class: __del__ runs even when __init__ failed before setting it

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        self.mode = mode
        self._lock_fd: int | None = None
        self._attrs = _read_root_attrs(self.path)
        if mode == "a":
            self._acquire_lock()
            self._remove_stale_partials()
            self._attrs = _read_root_attrs(self.path)  # as of holding the lock
        self.features: dict[str, dict] = self._attrs["features"]
        # write_empty_chunks: every committed chunk exists on disk, so a deleted chunk file is detectable
        try:
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._root = zarr.open_group(self.path, mode="r" if mode == "r" else "r+")
                self._arrays = {key: self._root[f"data/{key}"] for key in self.features}
                self._ends_array = self._root["meta/episode_ends"]
            self._episode_ends = np.asarray(self._ends_array[: self.num_episodes], dtype=np.int64)
        except Exception as err:  # zarr raises KeyError / ValueError / codec errors for a damaged layout
            self.close()
            raise StoreError(f"{self.path} cannot be opened ({type(err).__name__}: {err}); "
                             "run validate_store on it to see what is damaged.") from None
        self._stats: dict[str, dict[str, np.ndarray]] | None = None

    # ----------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        features: dict[str, dict],
        fps: int,
        *,
        overwrite: bool = False,
        info: dict | None = None,
    ) -> DemoStore:
        """Create an empty store (opened for appending). Built in a sibling temp dir, then renamed into place."""
        path = Path(path)
        features = check_features(features)
        if not isinstance(fps, int) or fps <= 0:
            raise StoreError(f"fps must be a positive int, got {fps!r}.")
        info = dict(info or {})
        _check_json(info, "info")
        existing = path.exists() and (path.is_file() or any(path.iterdir()))
        if existing and not overwrite:
            raise StoreError(f"{path} already exists and is not empty; pass overwrite=True or choose another path.")
        if existing and not _is_store_dir(path):
            raise StoreError(f"{path} exists and is not a demonstration store; refusing to overwrite it.")

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.creating"
        try:
            root = zarr.open_group(tmp, mode="w")
            root.create_group("data")
            root.create_group("meta")
            for key, spec in features.items():
                root.create_array(
                    f"data/{key}",
                    shape=(0, *spec["shape"]),
                    chunks=(chunk_frames(spec, key), *spec["shape"]),
                    dtype=spec["dtype"],
                    compressors=_compressors(key),
                    fill_value=0,
                )
            root.create_array(
                "meta/episode_ends", shape=(0,), chunks=(1 << 14,), dtype="int64",
                compressors=_compressors("meta"), fill_value=0,
            )
            root.attrs.put({
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "fps": fps,
                "features": features,
                "info": info,
                "num_episodes": 0,
                "num_frames": 0,
                "episodes": [],
            })
            _move_into_place(tmp, path, existing)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path, "a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> DemoStore:
        """Open an existing store read-only ("r") or for appending ("a")."""
        if mode not in ("r", "a"):
            raise StoreError(f"mode must be 'r' or 'a', got {mode!r}.")
        return cls(Path(path), mode)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DemoStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DemoStore({str(self.path)!r}, episodes={self.num_episodes}, frames={self.num_frames})"

    def _acquire_lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"{self.path} is already open for appending by another process; close it first.") from None
        self._lock_fd = fd

    def _remove_stale_partials(self) -> None:
        # temp files of writes a killed process never renamed; we hold the writer lock, so none is live
        for stale in self.path.rglob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    # ----------------------------------------------------------------------------------------- properties
    @property
    def fps(self) -> int:
        return int(self._attrs["fps"])

    @property
    def info(self) -> dict:
        return dict(self._attrs.get("info") or {})

    @property
    def num_episodes(self) -> int:
        return int(self._attrs["num_episodes"])

    @property
    def num_frames(self) -> int:
        return int(self._attrs["num_frames"])

    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends.copy()

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self._episode_ends[:-1]]).astype(np.int64)

    @property
    def episodes(self) -> list[dict]:
        return [dict(ep) for ep in self._attrs["episodes"][: self.num_episodes]]

    def array(self, key: str) -> zarr.Array:
        """The raw zarr array of a feature (its length may exceed num_frames after a killed append)."""
        self._check_key(key)
        return self._arrays[key]

    # ----------------------------------------------------------------------------------------- reading
    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames [start, stop) of one feature, from committed data only."""
        self._check_key(key)
        stop = self.num_frames if stop is None else stop
        if not 0 <= start <= stop <= self.num_frames:
            raise StoreError(f"{self.path}: frame range [{start}, {stop}) of {key!r} is outside [0, {self.num_frames}).")
        return self._arrays[key][start:stop]

    def get_episode(self, index: int) -> dict[str, np.ndarray]:
        if not -self.num_episodes <= index < self.num_episodes:
            raise StoreError(f"{self.path}: episode {index} does not exist (the store has {self.num_episodes}).")
        index %= self.num_episodes
        start, stop = int(self.episode_starts[index]), int(self._episode_ends[index])
        return {key: self.read(key, start, stop) for key in self.features}

    def _check_key(self, key: str) -> None:
        if key not in self.features:
            raise StoreError(f"{self.path}: no feature {key!r}; the store has {', '.join(self.features)}.")

    # ----------------------------------------------------------------------------------------- writing
    def append_episode(
        self,
        frames: dict[str, np.ndarray],
        *,
        task: str,
        source: str = "expert",
        success: bool | None = None,
        quality: float = 1.0,
        extra: dict | None = None,
    ) -> int:
        """Append one episode atomically; returns its index. frames[key] has shape [T, *spec.shape]."""
        self._check_writable()
        frames = self._check_frames(frames)
        if not isinstance(task, str):
            raise StoreError(f"task must be a string (the language instruction), got {task!r}.")
        if source not in SOURCES:
            raise StoreError(f"source {source!r} is not one of {', '.join(SOURCES)}.")
        if success is not None and not isinstance(success, (bool, np.bool_)):
            raise StoreError(f"success must be True, False or None, got {success!r}.")
        quality = _check_quality(quality, "quality")
        extra = dict(extra or {})
        _check_json(extra, "extra")

        length = len(next(iter(frames.values())))
        start, index = self.num_frames, self.num_episodes
        stop = start + length
        # 1. data past the committed end (overwrites anything a killed append left there)
        for key, values in frames.items():
            array = self._arrays[key]
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = values
        # 2. the new episode end
        self._ends_array.resize((index + 1,))
        self._ends_array[index] = stop
        # 3. commit: one atomic rewrite of the root metadata
        episode = {
            "index": index, "length": length, "task": task, "source": source,
            "success": None if success is None else bool(success), "quality": quality, "extra": extra,
        }
        attrs = dict(self._attrs)
        attrs.update(num_episodes=index + 1, num_frames=stop, episodes=[*self.episodes, episode])
        attrs.pop("stats", None)  # cached statistics no longer describe the data
        self._write_attrs(attrs)
        self._episode_ends = np.append(self._episode_ends, np.int64(stop))
        self._stats = None
        return index

    def set_quality(self, weights: Sequence[float]) -> None:
        """Set every episode's quality weight (>= 0), e.g. from a curation pass."""
        self._check_writable()
        weights = list(weights)
        if len(weights) != self.num_episodes:
            raise StoreError(f"set_quality got {len(weights)} weights for {self.num_episodes} episodes.")
        episodes = self.episodes
        for episode, weight in zip(episodes, weights):
            episode["quality"] = _check_quality(weight, f"quality of episode {episode['index']}")
        self._write_attrs({**self._attrs, "episodes": episodes})

    def update_extra(self, updates: Mapping[int, Mapping[str, Any]]) -> None:
        """Merge keys into some episodes' `extra` metadata (e.g. preference labels), in one atomic write."""
        self._check_writable()
        episodes = self.episodes
        for index, values in updates.items():
            if not 0 <= int(index) < self.num_episodes:
                raise StoreError(f"{self.path}: episode {index} does not exist (the store has {self.num_episodes}).")
            extra = {**(episodes[int(index)].get("extra") or {}), **dict(values)}
            _check_json(extra, f"extra of episode {index}")
            episodes[int(index)] = {**episodes[int(index)], "extra": extra}
        self._write_attrs({**self._attrs, "episodes": episodes})

    def _check_writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.path} is open read-only; open it with DemoStore.open(path, mode='a') to write.")

    def _write_attrs(self, attrs: dict) -> None:
        self._root.attrs.put(attrs)
        self._attrs = attrs

    def _check_frames(self, frames: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(frames, dict):
            raise StoreError(f"frames must be a dict of arrays keyed by feature, got {type(frames).__name__}.")
        unknown = sorted(set(frames) - set(self.features))
        if unknown:
            raise StoreError(f"frames has key {unknown[0]!r}, which the store does not declare "
                             f"(declared: {', '.join(self.features)}).")
        missing = sorted(set(self.features) - set(frames))
        if missing:
            raise StoreError(f"frames lacks key {missing[0]!r}, which the store declares; every feature is required.")
        clean, lengths = {}, {}
        for key, spec in self.features.items():
            values = np.asarray(frames[key])
            dtype = np.dtype(spec["dtype"])
            # floats accept any numeric input (an env's float64 state); other dtypes must match exactly
            castable = dtype.kind == "f" and values.dtype.kind in "fiub"
            if values.dtype != dtype and not castable:
                raise StoreError(f"frames[{key!r}] has dtype {values.dtype}, the store declares {dtype}.")
            if values.ndim != 1 + len(spec["shape"]) or list(values.shape[1:]) != spec["shape"]:
                raise StoreError(f"frames[{key!r}] has shape {list(values.shape)}, expected [T, "
                                 f"{', '.join(map(str, spec['shape']))}].".replace("[T, ]", "[T]"))
            values = values.astype(dtype, copy=False)
            if dtype.kind == "f" and not np.isfinite(values).all():
                bad = int(np.argwhere(~np.isfinite(values.reshape(len(values), -1)))[0, 0])
                raise StoreError(f"frames[{key!r}] holds NaN or inf (first at frame {bad}); clean the episode.")
            clean[key], lengths[key] = values, len(values)
        if len(set(lengths.values())) != 1:
            raise StoreError(f"frames have different lengths per key: {lengths}; every key needs T frames.")
        if next(iter(lengths.values())) == 0:
            raise StoreError("frames hold an empty episode (T = 0); an episode needs at least one frame.")
        return clean

    # ----------------------------------------------------------------------------------------- statistics
    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Normalization statistics, cached in the store (computed on first use)."""
        if self._stats is None:
            cached = self._attrs.get("stats")
            if cached is not None:
                self._stats = {
                    key: {name: np.asarray(v, dtype=np.float32) for name, v in per_key.items()}
                    for key, per_key in cached.items()
                }
            else:
                self.compute_stats()
        return self._stats

    def compute_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Compute mean/std/min/max/q01/q99 over committed frames; saved in the store when writable."""
        if self.num_frames == 0:
            raise StoreError(f"{self.path} holds no frames yet; append episodes before computing statistics.")
        stats = {}
        for key in self.features:
            # low-dimensional features fit in memory; images stream chunk by chunk into pixel histograms
            if is_image_key(key):
                per_key = image_stats(self._pixel_histograms(key))
            else:
                per_key = lowdim_stats(self.read(key))
            stats[key] = {name: np.asarray(per_key[name], dtype=np.float32) for name in STAT_NAMES}
        if self.mode == "a":
            as_json = {key: {n: v.tolist() for n, v in per_key.items()} for key, per_key in stats.items()}
            self._write_attrs({**self._attrs, "stats": as_json})
        self._stats = stats
        return stats

    def _pixel_histograms(self, key: str) -> np.ndarray:
        """Pixel counts [C, 256] of an image feature over committed frames."""
        reader = ChunkReader(self._arrays[key], self.path / "data" / key)
        histograms = np.zeros((self.features[key]["shape"][-1], 256), dtype=np.int64)
        for index in range(reader.num_chunks(self.num_frames)):
            start = index * reader.frames_per_chunk
            try:
                chunk = reader.read(index)[: self.num_frames - start]  # [n, H, W, C]
            except ChunkError as err:
                raise StoreError(f"{self.path}: data/{key} chunk {index}: {err}; run validate_store.") from None
            histograms += channel_histograms(chunk)
        return histograms


@contextlib.contextmanager
def staged_store(
    path: str | os.PathLike,
    features: dict[str, dict],
    fps: int,
    *,
    overwrite: bool = False,
    info: dict | None = None,
) -> Iterator[DemoStore]:
    """A new store, filled inside the `with` block and moved to `path` only when the block succeeds.

    Importers and copies use it so that a bad source file found half-way leaves `path` exactly as it was.
    """
    path = Path(path)
    existing = path.exists() and (path.is_file() or any(path.iterdir()))
    if existing and not overwrite:
        raise StoreError(f"{path} already exists and is not empty; pass overwrite=True or choose another path.")
    if existing and not _is_store_dir(path):
        raise StoreError(f"{path} exists and is not a demonstration store; refusing to overwrite it.")
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.staging"
    try:
        store = DemoStore.create(staging, features, fps, info=info)
        with store:
            yield store
        _move_into_place(staging, path, existing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, path: Path, existing: bool) -> None:
    """Put a finished store at `path`: readers see the old store or the new one, never a half-made one."""
    if existing:  # swap: old store aside, new one in, old one gone
        old = path.parent / f".{path.name}.{uuid.uuid4().hex}.old"
        path.rename(old)
        staging.rename(path)
        shutil.rmtree(old)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()  # an empty directory the user made for us
        staging.rename(path)


def _check_quality(value: Any, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"{what} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise StoreError(f"{what} must be a finite number >= 0, got {value!r}.")
    return value


def _check_json(value: dict, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} must be JSON-serializable ({err}).") from None
