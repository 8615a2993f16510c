"""LeRobot v3.0 export / v3.0 and v2.1 import, checked against LeRobot 0.4.4's own code run in its virtualenv."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from robopolicy.data import DemoStore, StoreError, validate_store
from robopolicy.data.lerobot import export_lerobot, import_lerobot

ROOT = Path(__file__).resolve().parent.parent
LEROBOT_PYTHON = ROOT / ".venv-lerobot" / "bin" / "python"
HELPERS = Path(__file__).resolve().parent / "helpers"
VIDEO_TOLERANCE = 6.0  # mean absolute pixel error an h264 round trip may add on smooth images


def lerobot(script: str, *args: str, timeout: float = 300) -> None:
    """Run a helper script with LeRobot's interpreter; a missing LeRobot env fails (or skips when asked to)."""
    if not LEROBOT_PYTHON.exists():
        if os.environ.get("ROBOPOLICY_SKIP_LEROBOT") == "1":
            pytest.skip("ROBOPOLICY_SKIP_LEROBOT=1 and .venv-lerobot is missing")
        pytest.fail(f"{LEROBOT_PYTHON} is missing: build it with `make test` (or set ROBOPOLICY_SKIP_LEROBOT=1).")
    proc = subprocess.run([str(LEROBOT_PYTHON), str(HELPERS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"


def lerobot_reads_video() -> bool:
    """LeRobot 0.4.4 decodes video only through torchcodec (torchvision 0.29 dropped its VideoReader)."""
    if not LEROBOT_PYTHON.exists():
        return False
    return subprocess.run([str(LEROBOT_PYTHON), "-c", "import torchcodec.decoders"], capture_output=True).returncode == 0


def smooth_images(episode: int, length: int, height: int = 24, width: int = 32) -> np.ndarray:
    """[T, H, W, 3] uint8, spatially smooth and 8 levels brighter per frame (misaligned frames stand out)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [np.stack([30 + 3 * xx + 8 * t, 40 + 3 * yy + 25 * episode, 50 + xx + yy + 8 * t], -1)
              for t in range(length)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def make_store(path: Path, *, images: bool, episodes: int = 3) -> Path:
    rng = np.random.default_rng(1)
    features = {
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "grip"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
        "next.reward": {"dtype": "float32", "shape": [], "names": None},
        "next.success": {"dtype": "bool", "shape": [], "names": None},
    }
    if images:
        features["observation.images.front"] = {"dtype": "uint8", "shape": [24, 32, 3], "names": None}
        features["observation.images.wrist"] = {"dtype": "uint8", "shape": [24, 32, 3], "names": None}
    with DemoStore.create(path, features, fps=10) as store:
        for episode in range(episodes):
            length = 6 + 3 * episode
            frames = {
                "observation.state": rng.standard_normal((length, 4)), "action": rng.uniform(-1, 1, (length, 2)),
                "next.reward": np.linspace(0, 1, length), "next.success": np.arange(length) == length - 1,
            }
            if images:
                frames["observation.images.front"] = smooth_images(episode, length)
                frames["observation.images.wrist"] = smooth_images(episode + 3, length)[:, ::-1].copy()
            store.append_episode(frames, task=["push the block", "open the drawer"][episode % 2],
                                 source=["expert", "human"][episode % 2], success=episode != 1,
                                 quality=0.5 + 0.1 * episode, extra={"seed": episode})
    return path


def assert_frames_equal(store: DemoStore, frames: dict, *, image_tolerance: float = 0.0) -> None:
    for key, spec in store.features.items():
        ours = store.read(key)
        theirs = np.asarray(frames[key]).reshape(ours.shape)
        if key.startswith("observation.images.") and image_tolerance:
            error = np.abs(ours.astype(float) - theirs.astype(float)).mean(axis=(1, 2, 3))
            assert error.max() < image_tolerance, f"{key}: per-frame mean pixel error up to {error.max():.2f}"
        else:
            np.testing.assert_array_equal(ours, theirs.astype(spec["dtype"]), err_msg=key)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """State, image (and video when LeRobot can read it) exports, loaded back by LeRobot in one subprocess."""
    tmp = tmp_path_factory.mktemp("export")
    cases = {"state": (False, False), "image": (True, False)}
    if lerobot_reads_video():
        cases["video"] = (True, True)
    args = []
    for name, (images, video) in cases.items():
        store = make_store(tmp / f"{name}.store", images=images)
        export_lerobot(store, tmp / name, video=video)
        args += [str(tmp / name), str(tmp / f"{name}.npz")]
    lerobot("lerobot_load_dataset.py", *args)
    return {name: (tmp / f"{name}.store", np.load(tmp / f"{name}.npz")) for name in cases}


@pytest.mark.parametrize("case", ["state", "image"])
def test_export_loads_in_lerobot_frame_for_frame(exported, case):
    store_path, dump = exported[case]
    meta = json.loads(str(dump["meta_json"]))
    with DemoStore.open(store_path) as store:
        assert meta["fps"] == store.fps and meta["num_frames"] == store.num_frames
        assert meta["num_episodes"] == store.num_episodes
        assert_frames_equal(store, dump)
        tasks = [store.episodes[e]["task"] for e in dump["episode_index"]]
        assert list(dump["task"]) == tasks
        np.testing.assert_array_equal(dump["index"], np.arange(store.num_frames))
    assert meta["features"]["observation.state"]["names"] == ["x", "y", "z", "grip"]
    if case == "image":
        assert meta["features"]["observation.images.front"]["dtype"] == "image"


def test_export_video_loads_in_lerobot_within_codec_tolerance(exported):
    if "video" not in exported:
        pytest.skip("LeRobot's env has no torchcodec, its only working video decoder next to torchvision 0.29")
    store_path, dump = exported["video"]
    assert json.loads(str(dump["meta_json"]))["features"]["observation.images.front"]["dtype"] == "video"
    with DemoStore.open(store_path) as store:
        assert_frames_equal(store, dump, image_tolerance=VIDEO_TOLERANCE)


@pytest.fixture(scope="module")
def lerobot_written(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lerobot_written")
    lerobot("lerobot_make_dataset.py", str(tmp), "none", "image", "video")
    return tmp


@pytest.mark.parametrize("kind", ["none", "image", "video"])
def test_import_dataset_written_by_lerobot(lerobot_written, tmp_path, kind):
    truth = np.load(lerobot_written / f"{kind}.npz")
    summary = import_lerobot(lerobot_written / kind, tmp_path / "store")
    assert summary["episodes"] == 3 and summary["fps"] == 15
    assert validate_store(tmp_path / "store") == []
    with DemoStore.open(tmp_path / "store") as store:
        assert store.fps == 15
        assert store.features["next.reward"]["shape"] == []
        assert store.features["action"]["names"] == ["dx", "dy", "grip"]
        assert_frames_equal(store, truth, image_tolerance=VIDEO_TOLERANCE if kind == "video" else 0.0)
        if kind == "video":  # each frame is closer to its own truth than to its neighbours'
            ours = store.read("observation.images.front").astype(float)
            images = truth["observation.images.front"].astype(float)
            own = np.abs(ours[1:] - images[1:]).mean()
            assert own < np.abs(ours[1:] - images[:-1]).mean() / 2
        tasks = [str(task) for task in truth["tasks"]]
        assert [ep["task"] for ep in store.episodes] == [tasks[0], tasks[1], tasks[0]]
        assert all(ep["success"] for ep in store.episodes)
        assert "stats" in json.loads((tmp_path / "store" / "zarr.json").read_text())["attributes"]


def test_round_trip_keeps_episode_metadata(tmp_path):
    store = make_store(tmp_path / "a", images=True)
    export_lerobot(store, tmp_path / "lr")
    import_lerobot(tmp_path / "lr", tmp_path / "b")
    with DemoStore.open(tmp_path / "a") as a, DemoStore.open(tmp_path / "b") as b:
        assert_frames_equal(b, {key: a.read(key) for key in a.features})
        assert a.episodes == b.episodes
        assert a.features == b.features


def test_export_rolls_over_to_new_files_and_still_imports(tmp_path):
    store = make_store(tmp_path / "a", images=True, episodes=4)
    export_lerobot(store, tmp_path / "lr", max_file_mb=0.001)
    files = sorted(p.name for p in (tmp_path / "lr" / "data" / "chunk-000").iterdir())
    assert files == [f"file-{i:03d}.parquet" for i in range(4)]
    import_lerobot(tmp_path / "lr", tmp_path / "b")
    with DemoStore.open(tmp_path / "a") as a, DemoStore.open(tmp_path / "b") as b:
        assert_frames_equal(b, {key: a.read(key) for key in a.features})


def write_v21(root: Path, *, episodes: int = 2, fps: int = 10) -> dict:
    """A LeRobot v2.1 layout by hand: per-episode parquet + mp4, JSON-lines metadata. Returns the truth."""
    import av

    chunk = root / "data" / "chunk-000"
    chunk.mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(2)
    tasks = ["stack the cups", "wipe the table"]
    truth = {"observation.state": [], "action": [], "observation.images.top": []}
    for episode in range(episodes):
        length = 7 + episode
        state = rng.standard_normal((length, 3)).astype(np.float32)
        action = rng.standard_normal((length, 2)).astype(np.float32)
        table = pa.table({
            "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), 3),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), 2),
            "timestamp": pa.array(np.arange(length, dtype=np.float32) / fps),
            "frame_index": pa.array(np.arange(length)), "episode_index": pa.array(np.full(length, episode)),
            "index": pa.array(np.arange(length) + 7 * episode), "task_index": pa.array(np.full(length, episode)),
        })
        pq.write_table(table, chunk / f"episode_{episode:06d}.parquet")
        images = smooth_images(episode, length, 32, 32)
        video = root / "videos" / "chunk-000" / "observation.images.top" / f"episode_{episode:06d}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(video), "w") as container:
            stream = container.add_stream("h264", rate=fps, options={"crf": "18"})
            stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
            for image in images:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        truth["observation.state"].append(state)
        truth["action"].append(action)
        truth["observation.images.top"].append(images)
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": {"motors": ["a", "b", "c"]}},
        "action": {"dtype": "float32", "shape": [2], "names": None},
        "observation.images.top": {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channel"]},
        **{k: {"dtype": "int64" if k != "timestamp" else "float32", "shape": [1], "names": None}
           for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")},
    }
    info = {"codebase_version": "v2.1", "fps": fps, "chunks_size": 1000, "features": features,
            "total_episodes": episodes, "total_frames": sum(len(s) for s in truth["action"]),
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [tasks[e]], "length": 7 + e}) + "\n" for e in range(episodes)))
    return {key: np.concatenate(parts) for key, parts in truth.items()} | {"tasks": tasks}


def test_import_hand_built_v21_layout(tmp_path):
    truth = write_v21(tmp_path / "v21")
    summary = import_lerobot(tmp_path / "v21", tmp_path / "store")
    assert summary["format"] == "lerobot v2.1" and summary["frames"] == 15
    assert validate_store(tmp_path / "store") == []
    with DemoStore.open(tmp_path / "store") as store:
        assert [ep["task"] for ep in store.episodes] == truth["tasks"]
        assert store.features["observation.state"]["names"] == ["a", "b", "c"]
        assert_frames_equal(store, truth, image_tolerance=VIDEO_TOLERANCE)


def test_missing_action_is_named(tmp_path):
    make_store(tmp_path / "a", images=False)
    export_lerobot(tmp_path / "a", tmp_path / "lr")
    info_path = tmp_path / "lr" / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    del info["features"]["action"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(StoreError, match=r"info\.json.*no 'action' feature"):
        import_lerobot(tmp_path / "lr", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_damaged_parquet_is_named_and_existing_store_is_kept(tmp_path):
    make_store(tmp_path / "a", images=False)
    export_lerobot(tmp_path / "a", tmp_path / "lr")
    data_file = tmp_path / "lr" / "data" / "chunk-000" / "file-000.parquet"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    make_store(tmp_path / "existing", images=False, episodes=1)
    with pytest.raises(StoreError, match=r"file-000\.parquet.*damaged"):
        import_lerobot(tmp_path / "lr", tmp_path / "existing", overwrite=True)
    with DemoStore.open(tmp_path / "existing") as store:
        assert store.num_episodes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "existing", "lr"]  # no staging leftovers


def test_export_refuses_a_non_empty_folder(tmp_path):
    make_store(tmp_path / "a", images=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="already exists"):
        export_lerobot(tmp_path / "a", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
