"""PushT (gym-pusht) behind the project's observation keys. It has no scripted expert: evaluation and import only.

State: agent xy, block xy, block angle (5-d). Action: absolute xy target of the agent in [0, 512]^2.
Success: block coverage of the goal above 95% (gym-pusht's `is_success`).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from robopolicy.data.spec import ACTION_KEY, STATE_KEY, image_key

STATE_NAMES = ["agent_x", "agent_y", "block_x", "block_y", "block_angle"]
ACTION_NAMES = ["target_x", "target_y"]
CAMERA = "top"


class PushT(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, *, images: bool | list[str] = False, image_size: int = 96,
                 max_episode_steps: int | None = None, render_mode: str | None = None):
        try:
            import gym_pusht  # noqa: F401  (registers the env id)
        except ImportError as e:
            raise ImportError("The pusht task needs the pusht extra: pip install -e '.[pusht]'.") from e
        if images not in (False, True, [CAMERA], (CAMERA,)):
            raise ValueError(f"pusht has one camera, {CAMERA!r}; got {images!r}.")
        self.cameras = [CAMERA] if images else []
        self._env = gym.make(
            "gym_pusht/PushT-v0",
            obs_type="state",
            render_mode="rgb_array",
            observation_width=image_size,
            observation_height=image_size,
        ).unwrapped
        self.max_episode_steps = max_episode_steps or 300
        self.fps = 10
        self.task_description = "push the T-shaped block onto the T-shaped target"
        self.feature_names = {STATE_KEY: STATE_NAMES, ACTION_KEY: ACTION_NAMES}
        spaces = {STATE_KEY: gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)}
        if self.cameras:
            spaces[image_key(CAMERA)] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(0.0, 512.0, (2,), np.float32)
        self.image_size = image_size
        self._steps = 0

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {STATE_KEY: np.asarray(state, dtype=np.float32)}
        if self.cameras:
            obs[image_key(CAMERA)] = self._env._render(visualize=False)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        state, _ = self._env.reset(seed=seed)
        self._steps = 0
        return self._observation(state), {"success": False}

    def step(self, action: np.ndarray):
        state, reward, _, _, info = self._env.step(np.asarray(action, dtype=np.float32))
        self._steps += 1
        success = bool(info["is_success"])
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observation(state), float(reward), success, truncated, {"success": success}

    def render(self):
        return self._env.render()

    def close(self):
        self._env.close()


def make_pusht_env(**kwargs) -> PushT:
    return PushT(**kwargs)
