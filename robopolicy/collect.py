"""`robopolicy collect`: roll out a source of actions (a scripted expert) into a demonstration store."""

from __future__ import annotations

import time

import numpy as np

from robopolicy.metrics import success_summary
from robopolicy.rollout import Episode, run_episodes


class ExpertAgent:
    """One scripted expert per vector-env worker (experts keep per-episode state such as their phase).

    `act` returns (executed, recorded) actions: an expert with DART exploration (an `explore(obs) ->
    (label, executed)` method) runs a perturbed action while the store keeps the expert's correction.
    """

    def __init__(self, experts: list, action_dim: int):
        self.experts = experts
        self.action_dim = action_dim

    def reset(self, index: int, seed: int) -> None:
        self.experts[index].reset(seed)

    def act(self, obs: dict[str, np.ndarray], active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        label = np.zeros((len(self.experts), self.action_dim), dtype=np.float32)
        executed = np.zeros_like(label)
        for i in np.flatnonzero(active):
            expert, obs_i = self.experts[i], {k: v[i] for k, v in obs.items()}
            if hasattr(expert, "explore"):
                label[i], executed[i] = expert.explore(obs_i)
            else:
                label[i] = executed[i] = expert.act(obs_i)
        return executed, label


def collect(envs, experts: list, store, n_episodes: int, *, seed: int, task: str, source: str = "expert",
            progress=None, instructions: bool = False, agent=None) -> dict:
    """Append `n_episodes` expert episodes to `store` as they finish; returns the summary figures. With
    `instructions` (envs with `instruction` and `goal` attributes) the experts are told each episode's goal and
    the store records each episode's instruction as its task; otherwise every episode's task is `task`. `agent`
    (e.g. a policy's `evaluate.PolicyAgent`) replaces the experts: its rollouts are recorded."""
    start = time.perf_counter()

    dart = float(getattr(experts[0], "dart", 0.0)) if experts else 0.0  # these episodes ran perturbed actions
    extra = {"dart": dart} if dart > 0 else {}

    def append(ep: Episode) -> None:
        store.append_episode(ep.stacked(), task=ep.instruction or task, source=source, success=ep.success,
                             extra={"seed": ep.seed, **extra})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(success=f"{ep.success}", refresh=False)

    agent = agent or ExpertAgent(experts, envs.single_action_space.shape[0])
    episodes = run_episodes(envs, agent, n_episodes, seed=seed, record=True, on_episode=append,
                            instructions=instructions)
    elapsed = time.perf_counter() - start
    frames = sum(ep.length for ep in episodes)
    return {
        **success_summary([ep.success for ep in episodes]),
        "frames": frames,
        "mean_length": frames / max(1, len(episodes)),
        "seconds": round(elapsed, 2),
        "frames_per_second": round(frames / elapsed, 1),
    }
