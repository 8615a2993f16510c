"""A policy in the control node's own process (`deploy inference=thread`, tests, benchmarks): the workstation's
inference backend; the robot computer talks to a policy server through `real.robot.control_node.RemoteInference`
instead."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


class LocalInference:
    """A `ChunkPolicy` in this process. `extra_latency_s` injects a delay."""

    def __init__(self, policy: Any, extra_latency_s: float = 0.0, fps: float | None = None) -> None:
        self.policy = policy
        self.n_obs_steps, self.horizon = int(policy.n_obs_steps), int(policy.horizon)
        self.n_action_steps, self.features = int(policy.n_action_steps), dict(policy.features)
        self.fps = fps
        self.supports_prefix, self.language = bool(policy.supports_prefix), bool(policy.language)
        self.delay_aware = bool(policy.delay_aware)
        self.noise_shape = tuple(int(d) for d in policy.noise_shape)
        self.extra_latency_s = float(extra_latency_s)

    def infer(self, observation, timestamp, prefix_actions, noise=None, instruction=None):
        started = time.perf_counter()
        with torch.inference_mode():
            obs = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in observation.items()}  # [1, To, ...]
            prefix = None if prefix_actions is None or not self.supports_prefix else \
                torch.from_numpy(prefix_actions.astype(np.float32))[None]  # [1, k, A]
            noise = None if noise is None else torch.from_numpy(np.asarray(noise, dtype=np.float32))[None]
            if self.language:
                obs["task"] = [instruction or ""]
            chunk = self.policy.sample_chunk(obs, noise=noise, prefix_actions=prefix)[0].cpu().numpy()  # [H, A]
        if self.extra_latency_s:
            time.sleep(self.extra_latency_s)
        return chunk, {"inference_s": time.perf_counter() - started}

    def close(self) -> None:
        pass
