"""Feature specs (`{"dtype", "shape", "names"}`) derived from gymnasium spaces, and checks between two sets."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


def features_from_env(observation_space: gym.spaces.Dict, action_space: gym.spaces.Box,
                      names: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """The store features of an env: its observation keys, `action`, `next.reward` and `next.success`."""
    names = names or {}
    features = {}
    for key, space in observation_space.spaces.items():
        features[key] = {"dtype": np.dtype(space.dtype).name, "shape": list(space.shape), "names": names.get(key)}
    features["observation.state"]["dtype"] = "float32"
    features["action"] = {"dtype": "float32", "shape": list(action_space.shape), "names": names.get("action")}
    features["next.reward"] = {"dtype": "float32", "shape": [], "names": None}
    features["next.success"] = {"dtype": "bool", "shape": [], "names": None}
    return features


def feature_mismatch(expected: dict[str, dict], actual: dict[str, dict], what: str = "features") -> str | None:
    """One sentence naming missing keys and shape mismatches between two feature sets, or None if they agree."""
    missing = sorted(set(expected) - set(actual))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    for key in sorted(set(expected) & set(actual)):
        a, b = list(expected[key]["shape"]), list(actual[key]["shape"])
        if a != b:
            problems.append(f"{key} has shape {b} where {a} is expected")
    return f"The {what} do not match: {'; '.join(problems)}." if problems else None
