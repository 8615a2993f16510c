"""Demonstration store throughput beside LeRobotDataset 0.4.4, on the same frames, in the same run.

Measures write throughput (frames/s: state + two 96x96 cameras + action) and random-access training-window
sampling (windows/s, n_obs_steps=2, horizon=16; state-only and with both cameras). The LeRobot half runs as a
subprocess with its own interpreter (`--lerobot-python`, default .venv-lerobot/bin/python), since LeRobot pins
a different torch. Prints one JSON object last and writes benchmarks/results/store_throughput.json.

    .venv/bin/python benchmarks/store_throughput.py [--episodes 20 --length 100]

This file imports only numpy at module level so the LeRobot interpreter can run its `--lerobot-worker` half.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STATE_DIM, ACTION_DIM, IMAGE_SHAPE, CAMERAS = 10, 4, (96, 96, 3), ("front", "wrist")
FPS, N_OBS_STEPS, HORIZON = 10, 2, 16


def make_episode(index: int, length: int) -> dict[str, np.ndarray]:
    """A smooth moving scene plus sensor noise: compresses like camera frames, unlike pure noise."""
    rng = np.random.default_rng(index)
    t = np.arange(length)[:, None, None]
    yy, xx = np.mgrid[0 : IMAGE_SHAPE[0], 0 : IMAGE_SHAPE[1]]
    episode = {
        "observation.state": rng.normal(size=(length, STATE_DIM)).astype(np.float32),
        "action": rng.normal(size=(length, ACTION_DIM)).astype(np.float32),
    }
    for c, camera in enumerate(CAMERAS):
        scene = 128 + 60 * np.sin((xx[None] + 3 * t + 17 * c) / 9.0) * np.cos((yy[None] - 2 * t) / 13.0)
        noise = rng.normal(0, 4, size=(length, *IMAGE_SHAPE))
        image = scene[..., None] + noise + np.array([0, 20, -20])
        episode[f"observation.images.{camera}"] = np.clip(image, 0, 255).astype(np.uint8)
    return episode


def features(with_images: bool) -> dict[str, dict]:
    spec = {
        "observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
        "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": None},
    }
    if with_images:
        for camera in CAMERAS:
            spec[f"observation.images.{camera}"] = {"dtype": "uint8", "shape": list(IMAGE_SHAPE), "names": None}
    return spec


def timed_sampling(get_item, num_items: int, budget_s: float, seed: int) -> dict:
    """Random-access reads until num_items or budget_s; windows/s over what was read."""
    indices = np.random.default_rng(seed).integers(0, num_items, size=100_000)
    get_item(int(indices[-1]))  # warm-up: first-call setup is not throughput
    count, start = 0, time.perf_counter()
    while count < len(indices) - 1 and time.perf_counter() - start < budget_s:
        get_item(int(indices[count]))
        count += 1
    elapsed = time.perf_counter() - start
    return {"windows": count, "seconds": round(elapsed, 3), "windows_per_s": round(count / elapsed, 1)}


# ------------------------------------------------------------------------------------------------- ours
def run_ours(workdir: Path, episodes: int, length: int, budget_s: float) -> dict:
    from robopolicy.data import DemoStore, WindowDataset

    data = [make_episode(i, length) for i in range(episodes)]
    store = DemoStore.create(workdir / "ours", features(with_images=True), fps=FPS)
    start = time.perf_counter()
    for episode in data:
        store.append_episode(episode, task="benchmark")
    write_s = time.perf_counter() - start
    store.close()
    store = DemoStore.open(workdir / "ours")
    size = sum(f.stat().st_size for f in (workdir / "ours").rglob("*") if f.is_file())

    state_keys = ["observation.state", "action"]
    state_only = WindowDataset(store, N_OBS_STEPS, HORIZON, keys=state_keys)
    with_images = WindowDataset(store, N_OBS_STEPS, HORIZON)
    uncached = WindowDataset(store, N_OBS_STEPS, HORIZON, image_cache_chunks=0)
    batch = 64

    def batched(dataset):
        rng = np.random.default_rng(1)
        return lambda _: dataset.get_batch(rng.integers(0, len(dataset), batch))

    result = {
        "write": {"frames": episodes * length, "seconds": round(write_s, 3),
                  "frames_per_s": round(episodes * length / write_s, 1), "bytes_on_disk": size},
        "sample_state_only": timed_sampling(state_only.__getitem__, len(state_only), budget_s, 0),
        "sample_with_images": timed_sampling(with_images.__getitem__, len(with_images), budget_s, 0),
        "sample_with_images_no_cache": timed_sampling(uncached.__getitem__, len(uncached), budget_s, 0),
    }
    for name, dataset in [("state_only", state_only), ("with_images", uncached)]:
        timing = timed_sampling(batched(dataset), len(dataset), budget_s, 0)
        timing["windows_per_s"] = round(timing["windows_per_s"] * batch, 1)
        timing["windows"] *= batch
        result[f"get_batch{batch}_{name}"] = timing
    return result


# ------------------------------------------------------------------------------------------------- LeRobot
def run_lerobot(workdir: Path, episodes: int, length: int, budget_s: float) -> dict:
    """Runs inside the LeRobot interpreter."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    data = [make_episode(i, length) for i in range(episodes)]
    delta_timestamps = {key: [k / FPS for k in range(1 - N_OBS_STEPS, 1)] for key in features(True) if key != "action"}
    delta_timestamps["action"] = [k / FPS for k in range(1 - N_OBS_STEPS, 1 - N_OBS_STEPS + HORIZON)]
    result = {}
    for with_images in (False, True):
        name = "with_images" if with_images else "state_only"
        spec = {
            key: ({"dtype": "image", "shape": IMAGE_SHAPE, "names": ["height", "width", "channel"]}
                  if key.startswith("observation.images.") else {**value, "shape": tuple(value["shape"])})
            for key, value in features(with_images).items()
        }
        root = workdir / f"lerobot_{name}"
        dataset = LeRobotDataset.create(f"bench/{name}", fps=FPS, root=root, features=spec, use_videos=False)
        start = time.perf_counter()
        for episode in data:
            for t in range(length):
                dataset.add_frame({key: episode[key][t] for key in spec} | {"task": "benchmark"})
            dataset.save_episode()
        dataset.finalize()
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        result[f"write_{name}"] = {"frames": episodes * length, "seconds": round(write_s, 3),
                                   "frames_per_s": round(episodes * length / write_s, 1), "bytes_on_disk": size}
        reloaded = LeRobotDataset(f"bench/{name}", root=root,
                                  delta_timestamps={k: v for k, v in delta_timestamps.items() if k in spec})
        item = reloaded[length // 2]
        assert tuple(item["action"].shape) == (HORIZON, ACTION_DIM), item["action"].shape
        result[f"sample_{name}"] = timed_sampling(reloaded.__getitem__, len(reloaded), budget_s, 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=10.0, help="seconds per sampling measurement")
    parser.add_argument("--lerobot-python", default=".venv-lerobot/bin/python")
    parser.add_argument("--lerobot-worker", metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.lerobot_worker:
        print(json.dumps(run_lerobot(Path(args.lerobot_worker), args.episodes, args.length, args.budget_s)))
        return

    with tempfile.TemporaryDirectory() as workdir:
        ours = run_ours(Path(workdir), args.episodes, args.length, args.budget_s)
        report = {
            "setup": {"episodes": args.episodes, "length": args.length, "state_dim": STATE_DIM,
                      "cameras": list(CAMERAS), "image_shape": list(IMAGE_SHAPE), "n_obs_steps": N_OBS_STEPS,
                      "horizon": HORIZON, "cpu_count": os.cpu_count()},
            "robopolicy": ours,
        }
        lerobot_python = Path(args.lerobot_python)
        if not lerobot_python.exists():
            print(f"note: {lerobot_python} not found; reporting robopolicy only "
                  "(create .venv-lerobot per shared/ENVIRONMENT.md to compare).", file=sys.stderr)
        else:
            command = [str(lerobot_python), __file__, "--lerobot-worker", workdir, "--episodes", str(args.episodes),
                       "--length", str(args.length), "--budget-s", str(args.budget_s)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                raise SystemExit(f"the LeRobot half failed:\n{done.stderr[-3000:]}")
            lerobot = json.loads(done.stdout.strip().splitlines()[-1])
            report["lerobot_0.4.4"] = lerobot
            report["ratios"] = {
                "write_with_images": round(ours["write"]["frames_per_s"] / lerobot["write_with_images"]["frames_per_s"], 2),
                "sample_state_only": round(ours["sample_state_only"]["windows_per_s"] / lerobot["sample_state_only"]["windows_per_s"], 1),
                "sample_with_images": round(ours["sample_with_images"]["windows_per_s"] / lerobot["sample_with_images"]["windows_per_s"], 1),
                "sample_with_images_no_cache": round(
                    ours["sample_with_images_no_cache"]["windows_per_s"] / lerobot["sample_with_images"]["windows_per_s"], 1),
            }
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "store_throughput.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
