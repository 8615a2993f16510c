"""Run with LeRobot's interpreter: write a small LeRobotDataset through LeRobot's own recording API.

    python lerobot_make_dataset.py OUT_DIR KIND [KIND ...]      KIND: none | image | video

For each KIND it writes the dataset OUT_DIR/KIND/ (state, action, reward, success; plus a camera stored as
`image` or `video`) and OUT_DIR/KIND.npz: the exact arrays handed to `add_frame` (feature keys, plus
`episode_index`, `task_index` and `tasks`), so the caller can compare what it imports against what LeRobot was
given. Frames are random but seeded. No pickle: npz of plain arrays.
"""

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

TASKS = ("push the red block to the goal", "lift the cube")


def smooth_image(episode: int, t: int) -> np.ndarray:
    """Spatially smooth (a video codec keeps it within a few levels), 8 levels brighter every frame (so a frame
    taken from the wrong time stands out)."""
    yy, xx = np.mgrid[0:32, 0:40]
    image = np.stack([30 + 2 * xx + 8 * t, 40 + 2 * yy + 20 * episode, 60 + xx + yy + 8 * t], axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("kinds", nargs="+", choices=["none", "image", "video"])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--fps", type=int, default=15)
    args = parser.parse_args()
    for kind in args.kinds:
        write_dataset(args.out_dir / kind, args.out_dir / f"{kind}.npz", kind, args.episodes, args.fps)


def write_dataset(root: Path, truth_path: Path, images: str, episodes: int, fps: int) -> None:
    features = {
        "observation.state": {"dtype": "float32", "shape": (5,), "names": [f"q{i}" for i in range(5)]},
        "action": {"dtype": "float32", "shape": (3,), "names": ["dx", "dy", "grip"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
    }
    if images != "none":
        features["observation.images.front"] = {
            "dtype": images, "shape": (32, 40, 3), "names": ["height", "width", "channels"],
        }
    dataset = LeRobotDataset.create(
        repo_id="robopolicy/test", fps=fps, features=features, root=root,
        use_videos=images == "video", vcodec="h264",
    )
    rng = np.random.default_rng(0)
    truth: dict[str, list] = {key: [] for key in [*features, "episode_index", "task_index"]}
    for episode in range(episodes):
        length = int(rng.integers(8, 20))
        task = TASKS[episode % len(TASKS)]
        for t in range(length):
            frame = {
                "observation.state": rng.standard_normal(5).astype(np.float32),
                "action": rng.uniform(-1, 1, 3).astype(np.float32),
                "next.reward": np.array([t / length], dtype=np.float32),
                "next.success": np.array([t == length - 1]),
            }
            if images != "none":
                frame["observation.images.front"] = smooth_image(episode, t)
            for key, value in frame.items():
                truth[key].append(value)
            truth["episode_index"].append(episode)
            truth["task_index"].append(episode % len(TASKS))
            dataset.add_frame({**frame, "task": task})
        dataset.save_episode()
    dataset.finalize()
    np.savez(truth_path, tasks=np.array(TASKS), **{k: np.stack(v) for k, v in truth.items()})


if __name__ == "__main__":
    main()
