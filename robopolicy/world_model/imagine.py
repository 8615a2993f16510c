"""Imagined rollouts of an action-chunk policy inside a world model, and the success rate they predict.

Each start state (from a store, or from env resets: no simulator step) is rolled out once per ensemble member, on
that member's own latent trajectory: the policy sees the decoded state history, its executed chunk steps the
latent, and the success classifier gives P(success within the chunk). An imagined episode succeeds with
probability 1 - prod_t (1 - p_t) over its chunks (it ends at the first success). The predicted success rate is
the mean over starts and members; its interval resamples both.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from robopolicy.data.spec import STATE_KEY
from robopolicy.world_model.model import WorldModel, WorldModelError


def check_policy(model: WorldModel, policy) -> None:
    """A policy the model can imagine: it observes the state alone and executes chunk_steps actions per chunk."""
    keys = sorted(k for k in policy.features if k.startswith("observation."))
    if keys != [STATE_KEY] or getattr(policy, "language", False):
        raise WorldModelError(f"the world model imagines state-only policies; this one observes {', '.join(keys)}"
                              + (" and an instruction" if getattr(policy, "language", False) else "") + ".")
    if policy.n_action_steps != model.cfg.chunk_steps:
        raise WorldModelError(f"the policy executes {policy.n_action_steps} actions per chunk, the world model "
                              f"steps {model.cfg.chunk_steps}: train the model with model.chunk_steps="
                              f"{policy.n_action_steps}.")
    if policy.n_obs_steps > model.cfg.obs_steps:
        raise WorldModelError(f"the policy observes {policy.n_obs_steps} frames, the world model decodes "
                              f"{model.cfg.obs_steps}: train it with model.obs_steps={policy.n_obs_steps}.")


def policy_obs(model: WorldModel, policy, history: torch.Tensor) -> dict[str, torch.Tensor]:
    """The policy's observation from decoded histories [N, To_model, S]."""
    return {STATE_KEY: history[:, model.cfg.obs_steps - policy.n_obs_steps:]}


def start_history(model: WorldModel, starts: torch.Tensor) -> torch.Tensor:
    """An episode's first observation history: its start state repeated (as rollouts pad it)."""
    return starts[:, None].expand(-1, model.cfg.obs_steps, -1)


def executed(policy, chunk: torch.Tensor) -> torch.Tensor:
    start = policy.n_obs_steps - 1
    return chunk[:, start:start + policy.n_action_steps]


@torch.no_grad()
def imagine_success(model: WorldModel, policy, starts: np.ndarray, max_episode_steps: int, *, seed: int = 0
                    ) -> dict[str, Any]:
    """Success probability of each (member, start) imagined episode [E, B] and the imagined steps taken."""
    check_policy(model, policy)
    policy.eval()
    members, n = model.cfg.ensemble, len(starts)
    generator = torch.Generator().manual_seed(seed)
    s0 = torch.as_tensor(starts, dtype=torch.float32)
    z = model.encode(s0).expand(members, n, -1).clone()  # [E, B, L]
    history = start_history(model, s0).repeat(members, 1, 1)  # [E * B, To, S]
    alive = torch.ones(members, n)
    succeeded = torch.zeros(members, n)
    disagreement = []
    for _ in range(math.ceil(max_episode_steps / model.cfg.chunk_steps)):
        noise = torch.randn(members * n, *policy.noise_shape, generator=generator)
        chunk = executed(policy, policy.sample_chunk(policy_obs(model, policy, history), noise))
        chunk = chunk.reshape(members, n, *chunk.shape[1:])
        p = model.success(z, chunk)
        succeeded += alive * p
        alive *= 1 - p
        z = model.next_per_member(z, chunk)
        disagreement.append(z.std(0).mean().item())
        history = model.decode(z).flatten(0, 1)
    steps = math.ceil(max_episode_steps / model.cfg.chunk_steps) * model.cfg.chunk_steps
    return {"success": succeeded.numpy(), "imagined_env_steps": steps * members * n,
            "mean_disagreement": float(np.mean(disagreement))}


def predict_success(model: WorldModel, policy, starts: np.ndarray, max_episode_steps: int, *, seed: int = 0,
                    resamples: int = 2000) -> dict[str, Any]:
    """The success rate the model predicts for `policy` from `starts`, with a 95% interval (bootstrap over start
    states and ensemble members) and each member's own rate."""
    started = time.perf_counter()
    out = imagine_success(model, policy, starts, max_episode_steps, seed=seed)
    p = out["success"]  # [E, B]
    rng = np.random.default_rng(seed)
    e_idx = rng.integers(0, p.shape[0], (resamples, p.shape[0]))
    b_idx = rng.integers(0, p.shape[1], (resamples, p.shape[1]))
    rates = p[e_idx[:, :, None], b_idx[:, None, :]].mean((1, 2))
    return {"success_rate": round(float(p.mean()), 4),
            "success_ci95": [round(float(np.quantile(rates, 0.025)), 4), round(float(np.quantile(rates, 0.975)), 4)],
            "per_member": [round(float(v), 4) for v in p.mean(1)], "starts": int(p.shape[1]),
            "imagined_env_steps": out["imagined_env_steps"], "mean_disagreement": round(out["mean_disagreement"], 5),
            "seconds": round(time.perf_counter() - started, 2)}
