"""Export / import throughput of the LeRobot and robomimic interop, on a state store and an image store.

Stores: state (10-d) + action (4-d) + reward/success, and the same plus two 96x96 cameras (a smooth moving
scene with sensor noise, compressing like camera frames). Measures frames/s of
    export_lerobot (images as PNG in parquet, and as h264 video), import_lerobot of each export,
    import_robomimic of the same frames written as a robomimic HDF5.
Prints one JSON object last and writes benchmarks/results/store_interop.json.

    .venv/bin/python benchmarks/store_interop.py [--episodes 10 --length 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from robopolicy.data import DemoStore
from robopolicy.data.lerobot import export_lerobot, import_lerobot
from robopolicy.data.robomimic import import_robomimic

STATE_DIM, ACTION_DIM, IMAGE_SHAPE, CAMERAS, FPS = 10, 4, (96, 96, 3), ("front", "wrist"), 10


def make_episode(index: int, length: int, images: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    episode = {"observation.state": rng.normal(size=(length, STATE_DIM)).astype(np.float32),
               "action": rng.normal(size=(length, ACTION_DIM)).astype(np.float32),
               "next.reward": np.linspace(0, 1, length, dtype=np.float32),
               "next.success": np.arange(length) == length - 1}
    if images:
        t = np.arange(length)[:, None, None]
        yy, xx = np.mgrid[0:IMAGE_SHAPE[0], 0:IMAGE_SHAPE[1]]
        for c, camera in enumerate(CAMERAS):
            scene = 128 + 60 * np.sin((xx[None] + 3 * t + 17 * c) / 9.0) * np.cos((yy[None] - 2 * t) / 13.0)
            noisy = scene[..., None] + rng.normal(0, 4, (length, *IMAGE_SHAPE))
            episode[f"observation.images.{camera}"] = np.clip(noisy, 0, 255).astype(np.uint8)
    return episode


def make_store(path: Path, episodes: int, length: int, images: bool) -> None:
    features = {"observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
                "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": None},
                "next.reward": {"dtype": "float32", "shape": [], "names": None},
                "next.success": {"dtype": "bool", "shape": [], "names": None}}
    if images:
        features.update({f"observation.images.{c}": {"dtype": "uint8", "shape": list(IMAGE_SHAPE), "names": None}
                         for c in CAMERAS})
    with DemoStore.create(path, features, fps=FPS) as store:
        for i in range(episodes):
            store.append_episode(make_episode(i, length, images), task="bench")


def make_robomimic(path: Path, episodes: int, length: int, images: bool) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_group("data").attrs["env_args"] = json.dumps({"env_name": "Bench", "env_kwargs": {"control_freq": FPS}})
        for i in range(episodes):
            episode = make_episode(i, length, images)
            demo = h5.create_group(f"data/demo_{i}")
            demo.create_dataset("obs/state", data=episode["observation.state"])
            for camera in CAMERAS if images else ():
                demo.create_dataset(f"obs/{camera}_image", data=episode[f"observation.images.{camera}"])
            demo.create_dataset("actions", data=episode["action"])
            demo.create_dataset("rewards", data=episode["next.success"].astype(np.float64))
            demo.create_dataset("dones", data=episode["next.success"].astype(np.int64))


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--length", type=int, default=100)
    args = parser.parse_args()
    frames = args.episodes * args.length
    results = {"episodes": args.episodes, "length": args.length, "frames": frames,
               "image_shape": list(IMAGE_SHAPE), "cameras": list(CAMERAS)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, images in (("state", False), ("images", True)):
            store = tmp / f"{kind}.store"
            make_store(store, args.episodes, args.length, images)
            modes = (("image", False), ("video", True)) if images else (("state", False),)
            for mode, video in modes:
                out = tmp / f"{kind}-{mode}.lerobot"
                seconds = timed(export_lerobot, store, out, video=video)
                results[f"{kind}/export_lerobot_{mode}_fps"] = round(frames / seconds, 1)
                seconds = timed(import_lerobot, out, tmp / f"{kind}-{mode}.back")
                results[f"{kind}/import_lerobot_{mode}_fps"] = round(frames / seconds, 1)
                size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                results[f"{kind}/lerobot_{mode}_mb"] = round(size / 2**20, 2)
            make_robomimic(tmp / f"{kind}.hdf5", args.episodes, args.length, images)
            seconds = timed(import_robomimic, tmp / f"{kind}.hdf5", tmp / f"{kind}-robomimic.store")
            results[f"{kind}/import_robomimic_fps"] = round(frames / seconds, 1)
    out_path = Path(__file__).resolve().parent / "results" / "store_interop.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
