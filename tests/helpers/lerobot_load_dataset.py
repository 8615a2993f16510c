"""Run with LeRobot's interpreter: load a dataset with LeRobot's own `LeRobotDataset` and dump every frame.

    python lerobot_load_dataset.py ROOT OUT.npz [ROOT OUT.npz ...]

OUT.npz holds, per feature key, the frames stacked in index order (images converted back to uint8 HWC), plus
`task` (the task string of each frame) and `meta_json` (fps, episode count, features as LeRobot reads them).
No pickle: plain arrays only.
"""

import json
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    for root, out in zip(args[::2], args[1::2]):
        dump(root, out)


def dump(root: str, out: str) -> None:
    dataset = LeRobotDataset("robopolicy/check", root=root)  # its default video decoder: torchcodec
    camera_keys = set(dataset.meta.camera_keys)
    frames: dict[str, list] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        for key, value in item.items():
            if key in camera_keys:  # float [C, H, W] in [0, 1] -> uint8 [H, W, C]
                value = (value.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            elif hasattr(value, "numpy"):
                value = value.numpy()
            frames.setdefault(key, []).append(value)
    meta = {"fps": dataset.fps, "num_episodes": dataset.num_episodes, "num_frames": dataset.num_frames,
            "features": dataset.features, "camera_keys": sorted(camera_keys),
            "tasks": list(dataset.meta.tasks.index)}
    np.savez(out, meta_json=np.array(json.dumps(meta)), **{k: np.stack(v) for k, v in frames.items()})


if __name__ == "__main__":
    main()
