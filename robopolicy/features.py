"""Feature specs (`{"dtype", "shape", "names"}`) derived from gymnasium spaces. To compare two sets of specs use
`robopolicy.data.spec.feature_mismatch`."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from robopolicy.data.spec import ACTION_KEY, REWARD_KEY, STATE_KEY, SUCCESS_KEY


def features_from_env(observation_space: gym.spaces.Dict, action_space: gym.spaces.Box,
                      names: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """The store features of an env: its observation keys, `action`, `next.reward` and `next.success`."""
    names = names or {}
    features = {}
    for key, space in observation_space.spaces.items():
        features[key] = {"dtype": np.dtype(space.dtype).name, "shape": list(space.shape), "names": names.get(key)}
    features[STATE_KEY]["dtype"] = "float32"
    features[ACTION_KEY] = {"dtype": "float32", "shape": list(action_space.shape), "names": names.get(ACTION_KEY)}
    features[REWARD_KEY] = {"dtype": "float32", "shape": [], "names": None}
    features[SUCCESS_KEY] = {"dtype": "bool", "shape": [], "names": None}
    return features
