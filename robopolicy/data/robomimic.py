"""Import a robomimic HDF5 dataset into a demonstration store.

robomimic's layout: `data/demo_N/{obs/<key>, actions, rewards, dones}`, the JSON string attribute `env_args` on
`data` ({"env_name", "env_kwargs": {"control_freq", ...}}), and `mask/<filter_key>` lists of demo names
(e.g. "train", "valid"). Mapping:
    low-dimensional obs keys   -> `observation.state`, concatenated in sorted key order, one name per dimension
    `<name>_image` (uint8 HWC) -> `observation.images.<name>`
    actions                    -> `action`
    rewards                    -> `next.reward`
    rewards >= 1 (robosuite's sparse success reward), else dones -> `next.success`; episode success = last frame
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from robopolicy.data.spec import ACTION_KEY, STATE_KEY, image_key
from robopolicy.data.store import StoreError, staged_store

DEFAULT_FPS = 20  # robosuite's default control frequency


def import_robomimic(
    src_file: str | os.PathLike,
    out_store: str | os.PathLike,
    *,
    overwrite: bool = False,
    filter_key: str | None = None,
) -> dict:
    """Import the demos of a robomimic HDF5 file (those listed in `mask/<filter_key>` if given) into a new store."""
    import h5py

    src = Path(src_file)
    if not src.is_file():
        raise StoreError(f"{src} does not exist; give the path of a robomimic .hdf5 file.")
    try:
        h5 = h5py.File(src, "r")
    except OSError as err:
        raise StoreError(f"{src} cannot be opened as HDF5 ({err}); the file is damaged or not HDF5.") from None
    with h5:
        if "data" not in h5:
            raise StoreError(f"{src} has no 'data' group; it is not a robomimic dataset.")
        env_args = _env_args(h5["data"], src)
        demos = _demo_names(h5, src, filter_key)
        first = _group(h5, f"data/{demos[0]}", src)
        features, state_keys, image_keys = _features(first, src, demos[0])
        fps = int(env_args.get("env_kwargs", {}).get("control_freq", DEFAULT_FPS))
        task = str(env_args.get("env_name") or src.stem)
        info = {"imported_from": {"format": "robomimic", "path": str(src.resolve()), "filter_key": filter_key},
                "env_args": env_args}
        with staged_store(out_store, features, fps, overwrite=overwrite, info=info) as store:
            for name in demos:
                frames = _demo_frames(_group(h5, f"data/{name}", src), src, name, state_keys, image_keys, features)
                success = bool(frames["next.success"][-1]) if "next.success" in frames else None
                store.append_episode(frames, task=task, source="human", success=success, extra={"demo": name})
            store.compute_stats()
            frames_total = store.num_frames
    return {"format": "robomimic", "store": str(out_store), "episodes": len(demos), "frames": frames_total,
            "fps": fps, "task": task, "state_keys": state_keys, "image_keys": image_keys, "filter_key": filter_key}


def _env_args(data, src: Path) -> dict:
    raw = data.attrs.get("env_args")
    if raw is None:
        return {}
    try:
        env_args = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        raise StoreError(f"{src}: the env_args attribute of 'data' is not valid JSON.") from None
    return env_args if isinstance(env_args, dict) else {}


def _demo_names(h5, src: Path, filter_key: str | None) -> list[str]:
    if filter_key is None:
        names = list(h5["data"].keys())
    else:
        masks = h5.get("mask")
        if masks is None or filter_key not in masks:
            available = ", ".join(masks.keys()) if masks is not None else "none"
            raise ValueError(f"{src}: no mask/{filter_key} filter key (available: {available}).")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in masks[filter_key][()]]
        missing = [n for n in names if n not in h5["data"]]
        if missing:
            raise StoreError(f"{src}: mask/{filter_key} lists {missing[0]!r}, which is not under data/.")
    names = [n for n in names if n.startswith("demo")]
    if not names:
        raise StoreError(f"{src}: no demo_N groups under data/ (filter key {filter_key!r}); nothing to import.")
    return sorted(names, key=lambda n: int(re.sub(r"\D", "", n) or 0))  # demo_2 before demo_10


def _group(h5, path: str, src: Path):
    try:
        return h5[path]
    except (KeyError, OSError) as err:
        raise StoreError(f"{src}: {path} cannot be read ({err}); the file is damaged.") from None


def _features(demo, src: Path, name: str) -> tuple[dict, list[str], list[str]]:
    if "actions" not in demo:
        raise StoreError(f"{src}: data/{name} has no 'actions' dataset; a store needs an action per frame.")
    if "obs" not in demo or not len(demo["obs"]):
        raise StoreError(f"{src}: data/{name} has no 'obs' group; a store needs observations.")
    obs = demo["obs"]
    image_keys = sorted(k for k in obs if k.endswith("_image"))
    for key in image_keys:
        if obs[key].dtype != np.uint8 or obs[key].ndim != 4 or obs[key].shape[-1] != 3:
            raise StoreError(f"{src}: data/{name}/obs/{key} is {obs[key].dtype} {list(obs[key].shape)}; "
                             "image observations must be uint8 [T, H, W, 3].")
    state_keys = sorted(k for k in obs if k not in image_keys and obs[k].ndim <= 2)
    features = {}
    if state_keys:
        names = []
        for key in state_keys:
            dim = 1 if obs[key].ndim == 1 else obs[key].shape[1]
            names += [key] if dim == 1 else [f"{key}[{i}]" for i in range(dim)]
        features[STATE_KEY] = {"dtype": "float32", "shape": [len(names)], "names": names}
    for key in image_keys:
        features[image_key(key.removesuffix("_image"))] = {"dtype": "uint8", "shape": list(obs[key].shape[1:]),
                                                               "names": None}
    actions = demo["actions"]
    features[ACTION_KEY] = {"dtype": "float32", "shape": [int(np.prod(actions.shape[1:]))], "names": None}
    if "rewards" in demo:
        features["next.reward"] = {"dtype": "float32", "shape": [], "names": None}
    if "rewards" in demo or "dones" in demo:
        features["next.success"] = {"dtype": "bool", "shape": [], "names": None}
    return features, state_keys, image_keys


def _demo_frames(demo, src: Path, name: str, state_keys: list[str], image_keys: list[str],
                 features: dict) -> dict[str, np.ndarray]:
    where = f"{src}: data/{name}"
    try:
        obs = demo["obs"]
        frames = {}
        if state_keys:
            missing = [k for k in state_keys if k not in obs]
            if missing:
                raise StoreError(f"{where}/obs lacks {missing[0]!r}, which the first demo has; demos must agree.")
            parts = [np.asarray(obs[k][()], dtype=np.float32) for k in state_keys]
            frames[STATE_KEY] = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
        for key in image_keys:
            frames[image_key(key.removesuffix("_image"))] = np.asarray(obs[key][()])
        actions = np.asarray(demo["actions"][()], dtype=np.float32)
        frames[ACTION_KEY] = actions.reshape(len(actions), -1)
        rewards = np.asarray(demo["rewards"][()], dtype=np.float32) if "rewards" in demo else None
        if "next.reward" in features:
            frames["next.reward"] = rewards
        if "next.success" in features:
            frames["next.success"] = rewards >= 1.0 if rewards is not None else np.asarray(demo["dones"][()]) > 0
    except (KeyError, OSError) as err:
        raise StoreError(f"{where} cannot be read ({err}); the file is damaged.") from None
    lengths = {key: len(value) for key, value in frames.items()}
    if len(set(lengths.values())) != 1:
        raise StoreError(f"{where} has datasets of different lengths {lengths}; every key needs T frames.")
    return frames
