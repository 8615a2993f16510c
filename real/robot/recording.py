"""Recording of deployment episodes into a demonstration store (`robopolicy.data.DemoStore`).

One frame per control tick: the observation the node had (the latest valid one), the command sent (`action`,
what the robot actually did, so the episode can be trained on) and the one requested before the safety
filter, safety clamp counts and flags, timing (observation capture time, command time, the observation time
and inference latency of the chunk in use), the watchdog state, whether a human intervened, whether the robot
held for want of an action (`action.held`: such frames are no one's decision, and preference training masks
them), and task success.
Episodes with any intervention are stored with source "intervention", the others with source "policy"; each
carries its preference labels in `extra["preference"]` (robopolicy/data/preferences.py).

The store is imported lazily: real/ must import without it; recording needs numpy + zarr (robopolicy.data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from real.robot.safety import SafetyEvent, SafetyEventKind

SAFETY_KINDS = list(SafetyEventKind)
WATCHDOG_CODES = {"ok": 0, "hold": 1, "stop": 2}


def recording_features(observation_features: dict[str, dict], action_feature: dict) -> dict[str, dict]:
    """Feature specs of a deployment store: the robot's observations and action plus the per-tick record."""
    action_dim = list(action_feature["shape"])
    names = action_feature.get("names")
    return {
        **{k: dict(v) for k, v in observation_features.items()},
        "action": {"dtype": "float32", "shape": action_dim, "names": names},
        "action.requested": {"dtype": "float32", "shape": action_dim, "names": names},
        "safety.events": {"dtype": "int32", "shape": [1], "names": ["count"]},
        # bit i set: the raw command violated SAFETY_KINDS[i] (invalid_command, position_limit, ...)
        "safety.flags": {"dtype": "int32", "shape": [1], "names": [k.value for k in SAFETY_KINDS]},
        "timing.obs_timestamp": {"dtype": "float64", "shape": [1], "names": None},
        "timing.command_time": {"dtype": "float64", "shape": [1], "names": None},
        "timing.chunk_obs_timestamp": {"dtype": "float64", "shape": [1], "names": None},
        "timing.inference_latency": {"dtype": "float32", "shape": [1], "names": None},
        "status.obs_fresh": {"dtype": "bool", "shape": [1], "names": None},
        "status.watchdog": {"dtype": "int32", "shape": [1], "names": list(WATCHDOG_CODES)},
        "intervention": {"dtype": "bool", "shape": [1], "names": None},
        # no policy or human action was due: the robot held (sync mode waiting for a chunk, failed inference)
        "action.held": {"dtype": "bool", "shape": [1], "names": None},
        "next.success": {"dtype": "bool", "shape": [1], "names": None},
    }


def safety_flags(events: list[SafetyEvent]) -> int:
    flags = 0
    for event in events:
        flags |= 1 << SAFETY_KINDS.index(event.kind)
    return flags


class EpisodeRecorder:
    """Collects one episode's frames in memory and appends them to the store atomically at `finish`."""

    def __init__(self, path: str | os.PathLike, observation_features: dict[str, dict], action_feature: dict,
                 fps: int, *, overwrite: bool = False, info: dict | None = None, lookback_s: float = 2.0) -> None:
        from robopolicy.data import DemoStore, StoreError

        self.path = Path(path)
        self.lookback_s = lookback_s  # the policy's seconds before a takeover labelled undesirable
        self.features = recording_features(observation_features, action_feature)
        if self.path.exists() and not overwrite and any(self.path.iterdir()):
            self.store = DemoStore.open(self.path, mode="a")
            if self.store.features != self.features:
                self.store.close()
                raise StoreError(
                    f"{self.path} holds episodes with other features than this robot records; "
                    "choose another out folder or pass overwrite=true."
                )
        else:
            self.store = DemoStore.create(self.path, self.features, int(fps), overwrite=overwrite, info=info)
        self.obs_keys = [k for k in observation_features]
        self._frames: list[dict[str, Any]] = []

    def start_episode(self) -> None:
        self._frames = []

    def add_frame(self, observation: dict[str, np.ndarray], *, requested: np.ndarray, sent: np.ndarray,
                  events: list[SafetyEvent], obs_timestamp: float, command_time: float,
                  chunk_obs_timestamp: float, inference_latency: float, obs_fresh: bool, watchdog: str,
                  intervention: bool, success: bool, held: bool = False) -> None:
        frame = {k: np.asarray(observation[k]) for k in self.obs_keys}
        frame.update({
            "action": np.asarray(sent, dtype=np.float32),
            "action.requested": np.asarray(requested, dtype=np.float32),
            "safety.events": np.array([len(events)], dtype=np.int32),
            "safety.flags": np.array([safety_flags(events)], dtype=np.int32),
            "timing.obs_timestamp": np.array([obs_timestamp]),
            "timing.command_time": np.array([command_time]),
            "timing.chunk_obs_timestamp": np.array([chunk_obs_timestamp]),
            "timing.inference_latency": np.array([inference_latency], dtype=np.float32),
            "status.obs_fresh": np.array([obs_fresh]),
            "status.watchdog": np.array([WATCHDOG_CODES[watchdog]], dtype=np.int32),
            "intervention": np.array([intervention]),
            "action.held": np.array([held]),
            "next.success": np.array([success]),
        })
        self._frames.append(frame)

    @property
    def num_frames(self) -> int:
        return len(self._frames)

    def finish_episode(self, *, task: str, success: bool, extra: dict | None = None) -> int | None:
        """Append the collected frames as one episode (None when there were none); returns its index."""
        if not self._frames:
            return None
        from robopolicy.data.preferences import LABEL_KEY, episode_labels

        frames = {key: np.stack([f[key] for f in self._frames]) for key in self.features}
        intervened = bool(frames["intervention"].any())
        source = "intervention" if intervened else "policy"
        extra = dict(extra or {})
        # desirability labels (the intervener's segments, the policy's before a takeover; or the outcome)
        labels = episode_labels(source, bool(success), length=len(self._frames), intervention=frames["intervention"],
                                lookback=max(1, round(self.lookback_s * self.store.fps)), group=extra.get("seed"))
        if labels is not None:
            extra[LABEL_KEY] = labels
        index = self.store.append_episode(frames, task=task, source=source, success=bool(success), extra=extra)
        self._frames = []
        return index

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
