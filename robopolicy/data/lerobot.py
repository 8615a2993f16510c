"""LeRobot datasets on disk: export a store as a LeRobotDataset v3.0, import v3.0 and v2.1 (and v2.0) layouts.

We read and write LeRobot's files ourselves (pyarrow for parquet, PyAV for mp4, Pillow for PNG) so robopolicy
never imports lerobot. The v3.0 layout, as LeRobot 0.4.4 writes it:

    meta/info.json                          codebase_version, fps, features (LeRobot specs), totals, path templates
    meta/stats.json                         per feature: min max mean std count q01 q10 q50 q90 q99
    meta/tasks.parquet                      task_index, with the task string as the (pandas) index
    meta/episodes/chunk-000/file-000.parquet  one row per episode: tasks, length, data/video file, frame range,
                                            per-episode stats/<key>/<stat>
    data/chunk-000/file-000.parquet         one row per frame; vectors as fixed-size lists, images (dtype
                                            "image") as struct<bytes: PNG, path>; timestamp, frame_index,
                                            episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4     (dtype "video") episodes back to back; an episode's frames start at
                                            its from_timestamp in the file
Files roll over to the next file index at ~100 MB (data) / ~200 MB (videos), at episode boundaries.

v2.1 (and v2.0): one parquet per episode at `data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet`,
`meta/episodes.jsonl`, `meta/tasks.jsonl`, one mp4 per episode and camera.

Keys map 1:1. LeRobot keeps per-frame scalars as shape [1]; the store's `next.reward` / `next.success` /
`next.done` are shape [] and convert both ways. Episode metadata LeRobot has no place for (source, success,
quality, extra) travels in extra `robopolicy/*` columns of the episodes table, which LeRobot ignores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from robopolicy.data.spec import ACTION_KEY, OBSERVATION_PREFIX, image_key, is_image_key
from robopolicy.data.stats import channel_histograms, image_stats, lowdim_stats
from robopolicy.data.store import DemoStore, StoreError, staged_store

CODEBASE_VERSION = "v3.0"
READABLE_VERSIONS = ("v2.0", "v2.1", "v3.0")
DEFAULT_FEATURES = {  # LeRobot adds these to every dataset
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
SCALAR_KEYS = ("next.reward", "next.success", "next.done")  # shape [] in the store, [1] in LeRobot
STAT_QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_FILE_MB, VIDEO_FILE_MB = 100, 200
VIDEO_CODEC, VIDEO_CRF, VIDEO_GOP = "h264", 18, 2  # a keyframe every 2 frames keeps random access cheap
PNG_LEVEL = 1  # PNG is lossless at any level; 1 is ~4x faster to write than LeRobot's 6
STORE_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float32", "uint8": "uint8",
                "int8": "int32", "int16": "int32", "int32": "int32", "uint16": "int32", "uint32": "int64",
                "int64": "int64", "bool": "bool"}


# ================================================================================================= export
def export_lerobot(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    video: bool = False,
    max_file_mb: float = DATA_FILE_MB,
) -> dict:
    """Write the store at `store_path` as a LeRobotDataset v3.0 in `out_dir` (which must not exist or be empty).

    Images are stored as PNG inside the parquet files (LeRobot's "image" dtype), or as h264 mp4 with
    `video=True`. Built in a sibling temp folder and moved into place when complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir.is_file() or any(out_dir.iterdir())):
        raise StoreError(f"{out_dir} already exists and is not empty; choose an empty or new export folder.")
    with DemoStore.open(store_path, "r") as store:
        if store.num_episodes == 0:
            raise StoreError(f"{store.path} holds no episodes; there is nothing to export.")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.exporting"
        try:
            summary = _Exporter(store, staging, video=video, max_file_mb=max_file_mb).run()
            with contextlib.suppress(FileNotFoundError):
                out_dir.rmdir()  # an empty folder the user made for us
            staging.rename(out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {**summary, "out_dir": str(out_dir), "repo_id": repo_id or f"robopolicy/{Path(store_path).name}"}


class _Exporter:
    """One pass over the store's episodes, writing data, videos and per-episode metadata as it goes."""

    def __init__(self, store: DemoStore, root: Path, *, video: bool, max_file_mb: float):
        self.store, self.root, self.video = store, root, video
        self.max_data_bytes = max_file_mb * 2**20
        self.max_video_bytes = max_file_mb * 2**20 * VIDEO_FILE_MB / DATA_FILE_MB
        self.image_keys = [k for k in store.features if is_image_key(k)]
        self.features = _lerobot_features(store.features, video=video, fps=store.fps)
        tasks = [ep["task"] for ep in store.episodes]
        self.task_index = {task: i for i, task in enumerate(dict.fromkeys(tasks))}
        self.schema = _data_schema(self.features)
        self.data_file = _RollingParquet(root, DATA_PATH, self.schema, self.max_data_bytes)
        self.videos = {key: _RollingVideo(root, key, store.fps, self.max_video_bytes)
                       for key in self.image_keys} if video else {}
        # whole-dataset statistics: low-dim values kept (they are small), images as pixel histograms
        self.lowdim_values: dict[str, list[np.ndarray]] = {}
        self.histograms: dict[str, np.ndarray] = {}

    def run(self) -> dict:
        rows = []
        starts, ends = self.store.episode_starts, self.store.episode_ends
        for index, episode in enumerate(self.store.episodes):
            rows.append(self._export_episode(index, episode, int(starts[index]), int(ends[index])))
        self.data_file.close()
        for writer in self.videos.values():
            writer.close()
        self._write_meta(rows)
        return {
            "format": f"lerobot {CODEBASE_VERSION}", "episodes": len(rows), "frames": self.store.num_frames,
            "tasks": len(self.task_index), "fps": self.store.fps,
            "images": "video" if self.video and self.image_keys else ("image" if self.image_keys else None),
        }

    def _export_episode(self, index: int, episode: dict, start: int, stop: int) -> dict:
        length = stop - start
        frames = {key: self.store.read(key, start, stop) for key in self.store.features}
        frame_index = np.arange(length, dtype=np.int64)
        frames.update({
            "timestamp": (frame_index / self.store.fps).astype(np.float32), "frame_index": frame_index,
            "episode_index": np.full(length, index, dtype=np.int64), "index": np.arange(start, stop, dtype=np.int64),
            "task_index": np.full(length, self.task_index[episode["task"]], dtype=np.int64),
        })
        columns = {}
        for key in self.schema.names:
            if key in self.image_keys:
                columns[key] = pa.array([{"bytes": _png(image), "path": f"frame-{t:06d}.png"}
                                         for t, image in enumerate(frames[key])], type=self.schema.field(key).type)
            else:
                columns[key] = _arrow_column(frames[key], self.schema.field(key).type)
        chunk_index, file_index = self.data_file.write(pa.table(columns, schema=self.schema))
        row: dict[str, Any] = {
            "episode_index": index, "tasks": [episode["task"]], "length": length,
            "data/chunk_index": chunk_index, "data/file_index": file_index,
            "dataset_from_index": start, "dataset_to_index": stop,
        }
        for key, writer in self.videos.items():
            chunk_index, file_index, from_ts = writer.write(frames[key])
            row.update({f"videos/{key}/chunk_index": chunk_index, f"videos/{key}/file_index": file_index,
                        f"videos/{key}/from_timestamp": from_ts,
                        f"videos/{key}/to_timestamp": from_ts + length / self.store.fps})
        for key, values in frames.items():
            if key in self.image_keys:
                histogram = channel_histograms(values)
                self.histograms[key] = self.histograms.get(key, 0) + histogram
                stats = _lerobot_stats(image_stats(histogram, STAT_QUANTILES), length, image=True)
            else:
                values = values.reshape(length, -1)
                self.lowdim_values.setdefault(key, []).append(values)
                stats = _lerobot_stats(lowdim_stats(values, STAT_QUANTILES), length, image=False)
            row.update({f"stats/{key}/{name}": value.tolist() for name, value in stats.items()})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        row.update({  # robopolicy's own episode metadata; LeRobot reads past unknown columns
            "robopolicy/source": episode["source"], "robopolicy/success": episode["success"],
            "robopolicy/quality": float(episode["quality"]), "robopolicy/extra": json.dumps(episode["extra"]),
        })
        return row

    def _write_meta(self, rows: list[dict]) -> None:
        meta = self.root / "meta"
        meta.mkdir(parents=True, exist_ok=True)
        path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy")
        tasks = list(self.task_index)
        # pandas metadata makes pd.read_parquet (LeRobot's loader) restore the task strings as the index
        pandas_meta = {
            "index_columns": ["__index_level_0__"],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                                "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                 "metadata": None},
                {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
                 "metadata": None},
            ],
            "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0",
        }
        table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                          "__index_level_0__": pa.array(tasks, pa.string())})
        pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), meta / "tasks.parquet")

        frames = self.store.num_frames
        stats = {key: _lerobot_stats(lowdim_stats(np.concatenate(parts), STAT_QUANTILES), frames, image=False)
                 for key, parts in self.lowdim_values.items()}
        stats.update({key: _lerobot_stats(image_stats(hist, STAT_QUANTILES), frames, image=True)
                      for key, hist in self.histograms.items()})
        (meta / "stats.json").write_text(json.dumps(
            {key: {name: v.tolist() for name, v in per_key.items()} for key, per_key in stats.items()}, indent=4))
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.store.info.get("robot_type"),
            "total_episodes": len(rows), "total_frames": self.store.num_frames, "total_tasks": len(tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILE_MB,
            "video_files_size_in_mb": VIDEO_FILE_MB, "fps": self.store.fps,
            "splits": {"train": f"0:{len(rows)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.videos else None, "features": self.features,
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))


def _lerobot_features(features: dict[str, dict], *, video: bool, fps: int) -> dict[str, dict]:
    out = {}
    for key, spec in features.items():
        if is_image_key(key):
            out[key] = {"dtype": "video" if video else "image", "shape": spec["shape"],
                        "names": ["height", "width", "channels"]}
            if video:
                height, width, _ = spec["shape"]
                out[key]["info"] = {
                    "video.height": height, "video.width": width, "video.codec": VIDEO_CODEC,
                    "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                    "video.channels": 3, "has_audio": False,
                }
        elif len(spec["shape"]) <= 1:
            out[key] = {"dtype": spec["dtype"], "shape": spec["shape"] or [1], "names": spec["names"]}
        else:
            raise StoreError(f"feature {key!r} has shape {spec['shape']}; LeRobot export supports scalars, "
                             "vectors and images. Flatten it into a vector first.")
    return {**out, **DEFAULT_FEATURES}


def _data_schema(features: dict[str, dict]) -> pa.Schema:
    """The parquet schema of the frame table, with the Hugging Face `datasets` feature description."""
    fields, hf = [], {}
    for key, spec in features.items():
        if spec["dtype"] == "video":
            continue
        if spec["dtype"] == "image":
            fields.append(pa.field(key, pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
            hf[key] = {"_type": "Image"}
        elif spec["shape"] == [1]:
            fields.append(pa.field(key, pa.from_numpy_dtype(np.dtype(spec["dtype"]))))
            hf[key] = {"dtype": spec["dtype"], "_type": "Value"}
        else:
            fields.append(pa.field(key, pa.list_(pa.from_numpy_dtype(np.dtype(spec["dtype"])), spec["shape"][0])))
            hf[key] = {"feature": {"dtype": spec["dtype"], "_type": "Value"}, "length": spec["shape"][0],
                       "_type": "List"}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": hf}})})


def _arrow_column(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), arrow_type.list_size)
    return pa.array(values.reshape(len(values)))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


class _RollingParquet:
    """Episodes appended to data/chunk-XXX/file-YYY.parquet, moving to the next file past a size limit."""

    def __init__(self, root: Path, template: str, schema: pa.Schema, max_bytes: float):
        self.root, self.template, self.schema, self.max_bytes = root, template, schema, max_bytes
        self.chunk_index, self.file_index, self.bytes, self.writer = 0, 0, 0, None

    def write(self, table: pa.Table) -> tuple[int, int]:
        if self.writer is not None and self.bytes + table.nbytes > self.max_bytes:
            self.close()
            self.chunk_index, self.file_index = _next_file(self.chunk_index, self.file_index)
        if self.writer is None:
            path = self.root / self.template.format(chunk_index=self.chunk_index, file_index=self.file_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer, self.bytes = pq.ParquetWriter(path, self.schema, compression="snappy"), 0
        self.writer.write_table(table)
        self.bytes += table.nbytes
        return self.chunk_index, self.file_index

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _RollingVideo:
    """One camera's episodes encoded back to back into videos/<key>/chunk-XXX/file-YYY.mp4 (frame i at i/fps)."""

    def __init__(self, root: Path, key: str, fps: int, max_bytes: float):
        self.root, self.key, self.fps, self.max_bytes = root, key, fps, max_bytes
        self.chunk_index, self.file_index = 0, 0
        self.container = self.stream = self.path = None
        self.frames_in_file = 0

    def write(self, images: np.ndarray) -> tuple[int, int, float]:
        import av

        if self.container is not None and self.path.stat().st_size > self.max_bytes:
            self.close()
            self.chunk_index, self.file_index = _next_file(self.chunk_index, self.file_index)
        if self.container is None:
            self.path = self.root / VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk_index,
                                                      file_index=self.file_index)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), "w")
            self.stream = self.container.add_stream(VIDEO_CODEC, rate=self.fps,
                                                    options={"crf": str(VIDEO_CRF), "g": str(VIDEO_GOP)})
            self.stream.pix_fmt = "yuv420p"
            self.stream.height, self.stream.width = images.shape[1:3]
            self.frames_in_file = 0
        from_timestamp = self.frames_in_file / self.fps
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames_in_file  # the stream's time base is 1/fps
            self.container.mux(self.stream.encode(frame))
            self.frames_in_file += 1
        return self.chunk_index, self.file_index, from_timestamp

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode())  # flush delayed frames
            self.container.close()
            self.container = None


def _next_file(chunk_index: int, file_index: int) -> tuple[int, int]:
    return (chunk_index + 1, 0) if file_index == CHUNKS_SIZE - 1 else (chunk_index, file_index + 1)


# ------------------------------------------------------------------------------------------- statistics
def _lerobot_stats(stats: dict[str, np.ndarray], count: int, *, image: bool) -> dict[str, np.ndarray]:
    """Our statistics in LeRobot's layout: per-channel image statistics as [C, 1, 1], and `count` [1] (frames)."""
    if image:
        stats = {name: value.reshape(-1, 1, 1) for name, value in stats.items()}
    return {**stats, "count": np.array([count])}


# ================================================================================================= import
def import_lerobot(src_dir: str | os.PathLike, out_store: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Import a LeRobotDataset folder (v3.0, v2.1 or v2.0 layout) into a new store at `out_store`."""
    src = Path(src_dir)
    info = _read_info(src)
    reader = _V30Reader(src, info) if info["codebase_version"] == "v3.0" else _V2Reader(src, info)
    features, key_map, skipped = _store_features(info["features"], src / "meta" / "info.json")
    store_info = {"imported_from": {"format": "lerobot", "codebase_version": info["codebase_version"],
                                    "path": str(src.resolve()), "robot_type": info.get("robot_type")},
                  "lerobot_keys": {ours: theirs for theirs, ours in key_map.items()}}
    if info.get("robot_type"):
        store_info["robot_type"] = info["robot_type"]
    sources = {}
    with staged_store(out_store, features, int(info["fps"]), overwrite=overwrite, info=store_info) as store:
        for episode in reader.episodes(key_map):
            frames = {key_map[k]: _to_store(v, features[key_map[k]]) for k, v in episode["frames"].items()}
            success = episode["success"]
            if success is None and "next.success" in frames:
                success = bool(frames["next.success"].any())
            store.append_episode(frames, task=episode["task"], source=episode["source"], success=success,
                                 quality=episode["quality"], extra=episode["extra"])
            sources[episode["source"]] = sources.get(episode["source"], 0) + 1
        store.compute_stats()
        frames_total, episodes_total = store.num_frames, store.num_episodes
    return {
        "format": f"lerobot {info['codebase_version']}", "store": str(out_store), "episodes": episodes_total,
        "frames": frames_total, "fps": int(info["fps"]), "features": sorted(features), "skipped": skipped,
        "tasks": len(reader.tasks), "sources": sources,
    }


def _read_info(src: Path) -> dict:
    path = src / "meta" / "info.json"
    if not src.is_dir():
        raise StoreError(f"{src} is not a folder; point to the root of a LeRobot dataset (with meta/info.json).")
    if not path.is_file():
        raise StoreError(f"{path} is missing; {src} is not a LeRobot dataset root.")
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise StoreError(f"{path} is not valid JSON ({err}).") from None
    for name in ("codebase_version", "fps", "features", "data_path"):
        if name not in info:
            raise StoreError(f"{path} lacks {name!r}; it does not look like a LeRobot dataset's info.json.")
    if info["codebase_version"] not in READABLE_VERSIONS:
        raise StoreError(f"{path}: codebase_version {info['codebase_version']!r} is not one of "
                         f"{', '.join(READABLE_VERSIONS)}; convert the dataset with LeRobot first.")
    return info


def _store_features(lerobot: dict[str, dict], where: Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    """LeRobot features -> (store features, {lerobot key: store key}, {skipped lerobot key: why})."""
    features, key_map, skipped = {}, {}, {}
    for key, spec in lerobot.items():
        dtype, shape = spec.get("dtype"), [int(s) for s in spec.get("shape", [])]
        if key in DEFAULT_FEATURES or key == "subtask_index":
            continue
        if dtype in ("image", "video"):
            names = [str(n).lower() for n in (spec.get("names") or [])]
            if len(shape) == 3 and names[:1] in (["channels"], ["channel"]):
                shape = [shape[1], shape[2], shape[0]]  # declared channel-first; frames decode as HWC
            if len(shape) != 3 or shape[2] != 3:
                skipped[key] = f"{dtype} of shape {shape} is not an RGB image"
                continue
            ours = key if is_image_key(key) else image_key(key.split(".")[-1])
            features[ours] = {"dtype": "uint8", "shape": shape, "names": None}
        elif dtype in STORE_DTYPES:
            ours = key
            if key in SCALAR_KEYS and shape == [1]:
                shape = []
            names = spec.get("names")
            if isinstance(names, dict):  # older datasets: {"motors": [...]}
                names = next(iter(names.values()), None)
            names = names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None
            features[ours] = {"dtype": STORE_DTYPES[dtype], "shape": shape, "names": names}
        else:
            skipped[key] = f"dtype {dtype!r} has no store equivalent"
            continue
        if "/" in ours:
            raise StoreError(f"{where}: feature {key!r} contains '/', which store keys cannot hold.")
        key_map[key] = ours
    if ACTION_KEY not in features:
        raise StoreError(f"{where}: the dataset has no {ACTION_KEY!r} feature (it has {', '.join(sorted(lerobot))}); "
                         "a demonstration store needs an action per frame.")
    if not any(k.startswith(OBSERVATION_PREFIX) for k in features):
        raise StoreError(f"{where}: the dataset has no '{OBSERVATION_PREFIX}*' feature; a store needs observations.")
    return features, key_map, skipped


def _to_store(values: np.ndarray, spec: dict) -> np.ndarray:
    return np.asarray(values).reshape(len(values), *spec["shape"]).astype(spec["dtype"], copy=False)


class _Reader:
    """Shared by both layouts: frames of an episode from a parquet table plus its videos."""

    def __init__(self, src: Path, info: dict):
        self.src, self.info, self.fps = src, info, float(info["fps"])
        self.video_keys = [k for k, s in info["features"].items() if s.get("dtype") == "video"]
        self._table_path: Path | None = None
        self._table: pa.Table | None = None
        self._videos: dict[str, _VideoCursor] = {}
        self.tasks: dict[int, str] = {}

    def _read_table(self, path: Path) -> pa.Table:
        if path != self._table_path:
            if not path.is_file():
                raise StoreError(f"{path} is missing; the dataset's data files are incomplete.")
            try:
                self._table = pq.read_table(path)
            except (pa.ArrowException, OSError) as err:
                raise StoreError(f"{path} cannot be read as parquet ({err}); the file is damaged.") from None
            self._table_path = path
        return self._table

    def _frames(self, path: Path, episode_index: int, length: int, key_map: dict[str, str],
                videos: dict[str, tuple[Path, float]]) -> dict[str, np.ndarray]:
        table = self._read_table(path)
        if "episode_index" not in table.column_names:
            raise StoreError(f"{path} has no 'episode_index' column; it is not a LeRobot data file.")
        rows = np.flatnonzero(table.column("episode_index").to_numpy() == episode_index)
        if len(rows) != length:
            raise StoreError(f"{path} holds {len(rows)} frames of episode {episode_index}, "
                             f"its metadata says {length}; the dataset is inconsistent.")
        episode = table.take(pa.array(rows))
        if "frame_index" in episode.column_names:
            episode = episode.take(pa.array(np.argsort(episode.column("frame_index").to_numpy(), kind="stable")))
        frames = {}
        for key in key_map:
            if key in self.video_keys:
                video_path, from_timestamp = videos[key]
                if "timestamp" in episode.column_names:
                    timestamps = episode.column("timestamp").to_numpy().astype(np.float64)
                else:
                    timestamps = np.arange(length) / self.fps
                frames[key] = self._video(video_path).frames_at(from_timestamp + timestamps)
            elif key not in episode.column_names:
                raise StoreError(f"{path} has no column {key!r}, which meta/info.json declares.")
            else:
                frames[key] = _column_numpy(episode.column(key), key, path, self.src)
        return frames

    def _video(self, path: Path) -> _VideoCursor:
        cursor = self._videos.get(path)
        if cursor is None:
            cursor = self._videos[path] = _VideoCursor(path, self.fps)
        return cursor

    def _episode_record(self, frames: dict, tasks: list[str], extra_columns: dict) -> dict:
        task = tasks[0] if tasks else ""
        extra = {"lerobot_tasks": tasks} if len(tasks) > 1 else {}
        record = {"frames": frames, "task": task, "source": "human", "success": None, "quality": 1.0,
                  "extra": extra}
        if extra_columns.get("robopolicy/source") is not None:  # written by our own export
            record.update(source=extra_columns["robopolicy/source"], success=extra_columns.get("robopolicy/success"),
                          quality=float(extra_columns.get("robopolicy/quality", 1.0)),
                          extra=json.loads(extra_columns.get("robopolicy/extra") or "{}"))
        return record

    def close(self) -> None:
        for cursor in self._videos.values():
            cursor.close()
        self._videos.clear()


class _V30Reader(_Reader):
    def __init__(self, src: Path, info: dict):
        super().__init__(src, info)
        tasks_path = src / "meta" / "tasks.parquet"
        table = _read_parquet(tasks_path)
        index_column = next((c for c in table.column_names if c != "task_index"), None)
        if "task_index" not in table.column_names or index_column is None:
            raise StoreError(f"{tasks_path} lacks task_index and the task strings; it is not a LeRobot tasks table.")
        self.tasks = dict(zip(table.column("task_index").to_pylist(), table.column(index_column).to_pylist()))
        paths = sorted((src / "meta" / "episodes").glob("*/*.parquet"))
        if not paths:
            raise StoreError(f"{src / 'meta' / 'episodes'} holds no parquet files; the episode index is missing.")
        self.episode_rows = sorted((row for p in paths for row in _read_parquet(p).to_pylist()),
                                   key=lambda row: row["episode_index"])

    def episodes(self, key_map: dict[str, str]) -> Iterator[dict]:
        try:
            for row in self.episode_rows:
                path = self.src / self.info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                                file_index=row["data/file_index"])
                videos = {
                    key: (self.src / self.info["video_path"].format(
                        video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                        file_index=row[f"videos/{key}/file_index"]), float(row[f"videos/{key}/from_timestamp"]))
                    for key in self.video_keys if key in key_map
                }
                frames = self._frames(path, row["episode_index"], row["length"], key_map, videos)
                yield self._episode_record(frames, list(row.get("tasks") or []), row)
        finally:
            self.close()


class _V2Reader(_Reader):
    """v2.0 / v2.1: one parquet and one mp4 per episode, metadata in JSON lines."""

    def __init__(self, src: Path, info: dict):
        super().__init__(src, info)
        self.tasks = {row["task_index"]: row["task"] for row in _read_jsonl(src / "meta" / "tasks.jsonl")}
        self.episode_rows = sorted(_read_jsonl(src / "meta" / "episodes.jsonl"), key=lambda r: r["episode_index"])
        self.chunks_size = int(info.get("chunks_size", CHUNKS_SIZE))

    def episodes(self, key_map: dict[str, str]) -> Iterator[dict]:
        try:
            for row in self.episode_rows:
                index = row["episode_index"]
                where = {"episode_chunk": index // self.chunks_size, "episode_index": index}
                path = self.src / self.info["data_path"].format(**where)
                videos = {key: (self.src / self.info["video_path"].format(video_key=key, **where), 0.0)
                          for key in self.video_keys if key in key_map}
                frames = self._frames(path, index, row["length"], key_map, videos)
                tasks = row.get("tasks") or []
                if not tasks and "task_index" in row:
                    tasks = [self.tasks.get(row["task_index"], "")]
                yield self._episode_record(frames, list(tasks), row)
                self.close()  # one video file per episode: release it
        finally:
            self.close()


def _read_parquet(path: Path) -> pa.Table:
    if not path.is_file():
        raise StoreError(f"{path} is missing; the LeRobot dataset is incomplete.")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise StoreError(f"{path} cannot be read as parquet ({err}); the file is damaged.") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise StoreError(f"{path} is missing; the LeRobot v2 dataset is incomplete.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise StoreError(f"{path} line {number} is not valid JSON; the file is damaged.") from None
    return rows


def _column_numpy(column: pa.ChunkedArray, key: str, path: Path, root: Path) -> np.ndarray:
    """A parquet column -> [T, ...] array: fixed/variable-size lists stacked, image structs decoded to HWC."""
    kind = column.type
    if pa.types.is_struct(kind):  # Hugging Face Image: {"bytes", "path"}
        return np.stack([_decode_image(item, key, path, root) for item in column.to_pylist()])
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        values = column.to_pylist()
        try:
            return np.asarray(values)
        except ValueError:
            raise StoreError(f"{path}: column {key!r} holds rows of different lengths.") from None
    return column.to_numpy(zero_copy_only=False)


def _decode_image(item: dict | None, key: str, path: Path, root: Path) -> np.ndarray:
    if item is None:
        raise StoreError(f"{path}: column {key!r} has an empty image.")
    try:
        if item.get("bytes"):
            image = Image.open(io.BytesIO(item["bytes"]))
        elif item.get("path") and (root / item["path"]).is_file():
            image = Image.open(root / item["path"])
        else:
            raise StoreError(f"{path}: column {key!r} holds an image with neither bytes nor a readable path.")
        return np.asarray(image.convert("RGB"))
    except OSError as err:
        raise StoreError(f"{path}: an image in column {key!r} cannot be decoded ({err}).") from None


class _VideoCursor:
    """Sequential frame access into one mp4: timestamps asked in increasing order decode each frame once."""

    def __init__(self, path: Path, fps: float):
        import av

        if not path.is_file():
            raise StoreError(f"{path} is missing; the dataset's videos are incomplete.")
        self.path, self.tolerance = path, 0.25 / fps  # a quarter frame: unambiguous, robust to rounding
        try:
            self.container = av.open(str(path))
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError) as err:
            raise StoreError(f"{path} cannot be opened as a video ({err}); the file is damaged.") from None
        self.frames = self.container.decode(self.stream)
        self.previous: tuple[float, np.ndarray] | None = None
        self.current: tuple[float, np.ndarray] | None = None

    def frames_at(self, timestamps: np.ndarray) -> np.ndarray:
        return np.stack([self._frame_at(float(t)) for t in timestamps])

    def _frame_at(self, timestamp: float) -> np.ndarray:
        import av

        if self.previous is not None and abs(self.previous[0] - timestamp) <= self.tolerance:
            return self.previous[1]
        while self.current is None or self.current[0] < timestamp - self.tolerance:
            try:
                frame = next(self.frames)
            except StopIteration:
                raise StoreError(f"{self.path} ends before timestamp {timestamp:.4f} s; the video is shorter "
                                 "than its episode metadata says.") from None
            except av.FFmpegError as err:
                raise StoreError(f"{self.path} cannot be decoded ({err}); the file is damaged.") from None
            self.previous = self.current
            self.current = (float(frame.pts * frame.time_base), frame.to_ndarray(format="rgb24"))
        if abs(self.current[0] - timestamp) > self.tolerance:
            raise StoreError(f"{self.path} has no frame within {self.tolerance * 1e3:.1f} ms of {timestamp:.4f} s "
                             f"(nearest {self.current[0]:.4f} s); video and frame timestamps disagree.")
        return self.current[1]

    def close(self) -> None:
        self.container.close()


