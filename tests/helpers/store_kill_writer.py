"""Append deterministic episodes to a store forever; the kill test SIGKILLs this process at random moments.

usage: store_kill_writer.py STORE SIDE_FILE [--create]
After each append returns, the episode index is written to SIDE_FILE and fsynced, so the test knows which
appends finished. Episode i's content depends only on i (see `make_episode`), so the test can check it.
"""

import os
import sys

import numpy as np

from robopolicy.data import DemoStore

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [7], "names": None},
    "observation.images.front": {"dtype": "uint8", "shape": [48, 48, 3], "names": None},
    "observation.images.wrist": {"dtype": "uint8", "shape": [48, 48, 3], "names": None},
    "action": {"dtype": "float32", "shape": [4], "names": None},
}


def make_episode(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    length = 20 + index % 7
    return {
        "observation.state": rng.normal(size=(length, 7)).astype(np.float32),
        "observation.images.front": rng.integers(0, 256, (length, 48, 48, 3), dtype=np.uint8),
        "observation.images.wrist": rng.integers(0, 256, (length, 48, 48, 3), dtype=np.uint8),
        "action": rng.normal(size=(length, 4)).astype(np.float32),
    }


def main() -> None:
    store_path, side_path = sys.argv[1], sys.argv[2]
    if "--create" in sys.argv:
        store = DemoStore.create(store_path, FEATURES, fps=10)
    else:
        store = DemoStore.open(store_path, mode="a")
    print("ready", flush=True)
    with open(side_path, "a") as side:
        while True:
            index = store.num_episodes
            assert store.append_episode(make_episode(index), task=f"episode {index}") == index
            side.write(f"{index}\n")
            side.flush()
            os.fsync(side.fileno())


if __name__ == "__main__":
    main()
