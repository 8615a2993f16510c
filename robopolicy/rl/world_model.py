"""Refinement inside a learned world model (after DiWA and MBPO), with few or no real env steps.

The base stays frozen; as in `steer`, a SAC actor picks its sampler's initial noise once per chunk (the refined
checkpoint is a `steer` checkpoint: eval, serve and deploy load it as any other). What changes is where the
transitions come from: imagined rollouts in a world model (robopolicy/world_model), started from real start states
(the first states of the store's episodes, or with `start_states=visited` any frame the store and the real
rounds recorded, as MBPO branches from visited states). Each imagined chunk step runs the base on the decoded state history,
steps one randomly chosen ensemble member (MBPO), and is rewarded like a real one (RewardSpec: the success
classifier's verdict, or the reward head for reward=dense) minus `disagreement_penalty` times the members'
disagreement; an imagined episode ends at a predicted success, and is cut short (not terminated) where the members
disagree more than `max_disagreement` or after `horizon_chunks` chunk steps.

Rounds: refine in imagination (`imagined_steps`), evaluate for real, then, while the `real_env_steps` budget lasts,
run the refined policy for `round_env_steps` real steps, add those episodes to the model's data (and to
out/real_rollouts, a store), retrain the model for `retrain_steps`, and refine again. `real_env_steps=0` is the
offline mode: the store alone. Learning curves are against REAL env steps; imagined steps are reported apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopolicy.config import register_config, setting
from robopolicy.data import DemoStore
from robopolicy.evaluate import EVAL_SEED, PolicyAgent, evaluate
from robopolicy.metrics import success_summary
from robopolicy.policies import ChunkPolicy
from robopolicy.rl.buffer import ReplayBuffer
from robopolicy.rl.collector import RewardSpec, transition_shapes
from robopolicy.rl.online import Curves, EvalSchedule
from robopolicy.rl.steer import Steer, SteerConfig, SteerPolicy
from robopolicy.rollout import run_episodes
from robopolicy.world_model import WorldModelConfig, WorldModelError, load_episodes, load_world_model
from robopolicy.world_model.imagine import check_policy, executed, policy_obs
from robopolicy.world_model.train import fit, new_model

REAL_SEED = 50_000  # real rounds' episode seeds: apart from collection (0, ...) and evaluation (100000, ...)


@register_config("algo", "world_model")
@dataclass
class WorldModelAlgoConfig(SteerConfig):  # steer's fields (the refined policy is a steer policy), then its own
    name: str = setting("world_model", "refinement inside a learned world model")
    n_step: int = setting(1, "imagined transitions are one decision each")
    wm: str | None = setting(None, "a world model folder (`robopolicy world-model train`); null: train one on data")
    data: list[str] | None = setting(None, "stores for the model and the start states; null: the world model's "
                                     "data, else the base's training store")
    model_steps: int = setting(3000, "training steps of a new world model (wm: null)")
    real_env_steps: int = setting(0, "budget of real env steps (0: offline, the store alone)")
    round_env_steps: int = setting(2000, "real env steps per round between refinements")
    retrain_steps: int = setting(500, "world-model steps after each round's real episodes")
    imagined_steps: int = setting(100_000, "imagined env steps of refinement per round")
    imagine_batch: int = setting(64, "imagined episodes stepped together")
    horizon_chunks: int = setting(40, "chunk steps before an imagined episode is cut short")
    disagreement_penalty: float = setting(1.0, "subtracted per unit of the members' disagreement (latent std)")
    max_disagreement: float = setting(0.5, "an imagined episode is cut short past this disagreement")
    success_threshold: float = setting(0.5, "the success classifier's probability counted as a success")
    start_states: str = setting("first", "where imagined rollouts start: first: the episodes' first states (the "
                                "task's start distribution) | visited: any recorded frame with its history, real "
                                "rounds' included (MBPO's branching; pair it with a short horizon_chunks)",
                                choices=("first", "visited"))


def make_method(base: ChunkPolicy, base_ref: Mapping[str, str], algo: WorldModelAlgoConfig, reward: RewardSpec,
                seed: int) -> tuple[Steer, ReplayBuffer]:
    """Noise steering (DSRL-SAC) whose transitions are imagined; its buffer holds them."""
    policy = SteerPolicy(algo, base, base_ref)
    method = Steer(policy, algo, seed)
    return method, ReplayBuffer(algo.buffer_size, transition_shapes(method, policy.feature_dim, policy.latent_dim))


@torch.no_grad()
def imagine_transitions(model, method: Steer, starts: torch.Tensor, algo: WorldModelAlgoConfig, reward: RewardSpec,
                        generator: torch.Generator) -> list[dict[str, np.ndarray]]:
    """One batch of imagined episodes from real state histories `starts` [B, To, S] under the current actor:
    chunk-level transitions."""
    policy, sac = method.policy, method.sac
    k, members, n = model.cfg.chunk_steps, model.cfg.ensemble, len(starts)
    z = model.encode(starts[:, -1])
    history = starts
    member = torch.randint(members, (n,), generator=generator)
    alive = torch.ones(n, dtype=torch.bool)
    obs = policy_obs(model, policy, history)
    features = policy.encode(obs)
    rows = []
    for _ in range(algo.horizon_chunks):
        latent = sac.act(features, True, generator)
        chunk = executed(policy, policy.steered_chunk(obs, latent))
        nexts = model.next(z, chunk)  # [E, B, L]
        z_next = nexts[member, torch.arange(n)]
        disagreement = nexts.std(0).mean(-1) if members > 1 else torch.zeros(n)
        success = model.success(z, chunk) > algo.success_threshold
        r = torch.as_tensor(reward(model.reward(z, chunk).numpy(), success.numpy()), dtype=torch.float32)
        r = r - reward.step_penalty * (k - 1) - algo.disagreement_penalty * disagreement  # RewardSpec is per step
        history = model.decode(z_next)
        obs = policy_obs(model, policy, history)
        next_features = policy.encode(obs)
        rows.append({"obs": features[alive], "action": latent[alive], "reward": r[alive],
                     "next_obs": next_features[alive], "done": success[alive].float(),
                     "steps": torch.full((int(alive.sum()),), float(k)), "mc_return": torch.zeros(int(alive.sum()))})
        alive &= ~success & (disagreement < algo.max_disagreement)
        if not alive.any():
            break
        z, features = z_next, next_features
    return [{key: v.numpy() for key, v in row.items()} for row in rows]


def refine_in_model(model, method: Steer, buffer: ReplayBuffer, starts: np.ndarray, algo: WorldModelAlgoConfig,
                    reward: RewardSpec, rng: np.random.Generator, generator: torch.Generator) -> dict[str, Any]:
    """`algo.imagined_steps` imagined env steps from state histories `starts` [N, To, S], each batch added to the
    buffer, then SAC updates at `updates_per_step` per imagined env step."""
    imagined, updates, debt, metrics = 0, 0, 0.0, {}
    lengths, successes = [], []
    while imagined < algo.imagined_steps:
        batch = torch.from_numpy(starts[rng.integers(0, len(starts), algo.imagine_batch)])
        rows = imagine_transitions(model, method, batch, algo, reward, generator)
        steps = sum(len(r["reward"]) for r in rows) * model.cfg.chunk_steps
        for row in rows:
            buffer.add(row)
        imagined += steps
        lengths.append(len(rows))
        successes.append(float(sum(r["done"].sum() for r in rows)) / algo.imagine_batch)
        if len(buffer) < algo.batch_size or imagined < algo.learning_starts:
            continue
        debt += steps * algo.updates_per_step
        while debt >= 1:
            metrics = method.update(buffer.sample(algo.batch_size, rng))
            debt -= 1
            updates += 1
    return {"imagined_env_steps": imagined, "updates": updates, "metrics": metrics,
            "imagined_success": round(float(np.mean(successes[-20:])), 4) if successes else None}


def run_real_episodes(policy, make_envs: Callable[[int], Any], env_steps: int, num_envs: int, seed: int
                      ) -> list[Any]:
    """Episodes of the refined policy (its stochastic runtime) until `env_steps` real steps have run."""
    episodes: list[Any] = []
    envs = make_envs(num_envs)
    try:
        while sum(ep.length for ep in episodes) < env_steps:
            episodes += run_episodes(envs, PolicyAgent(policy, num_envs), num_envs, seed=seed + len(episodes),
                                     record=True)
    finally:
        envs.close()
    return episodes


def run_model_based(method: Steer, buffer: ReplayBuffer, make_envs: Callable[[int], Any], *,
                    algo: WorldModelAlgoConfig, ev: EvalSchedule, reward: RewardSpec, num_envs: int, seed: int,
                    out: Path, task: str | None, base_data: str | None, log: Callable[[str], None] = print,
                    progress=None) -> dict[str, Any]:
    """The rounds (see the module docstring); returns what `run_online` returns, plus the imagined steps."""
    policy = method.policy
    out = Path(out)
    curves = Curves(out, algo.name, task)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    if algo.wm:
        model, info = load_world_model(algo.wm)
        data = list(algo.data or info["data"])
    else:
        data = list(algo.data or ([base_data] if base_data else []))
        if not data:
            raise WorldModelError("algo=world_model needs a world model (algo.wm=...) or stores (algo.data=[...]); "
                                  "the base names no training store.")
    episodes, features = load_episodes(data)
    if not algo.wm:
        model = new_model(WorldModelConfig(chunk_steps=policy.n_action_steps, obs_steps=policy.n_obs_steps),
                          episodes)
        started = time.perf_counter()
        fit(model, episodes, algo.model_steps, seed=seed)
        log(f"world model trained on {episodes.num_episodes} episodes in {time.perf_counter() - started:.0f} s")
    check_policy(model, policy)
    real_store = None
    real_steps, imagined, n_updates, metrics = 0, 0, 0, {}
    real_outcomes: list[bool] = []
    eval_envs = make_envs(ev.num_envs) if ev.episodes else None
    try:
        while True:
            model.eval().requires_grad_(False)
            starts = episodes.histories(model.cfg.obs_steps, first_only=algo.start_states == "first")
            result = refine_in_model(model, method, buffer, starts, algo, reward, rng, generator)
            imagined += result["imagined_env_steps"]
            n_updates += result["updates"]
            metrics = result["metrics"] or metrics
            if progress is not None:
                progress.update(result["imagined_env_steps"])
            line = f"real env steps {real_steps}, imagined {imagined}: imagined success {result['imagined_success']}"
            reached = False
            if eval_envs is not None:  # a crossing of the target is confirmed over confirm_episodes, as online
                for episodes_now in (ev.episodes, ev.confirm_episodes):
                    point = curves.add_eval(real_steps, evaluate(eval_envs, policy.eval(), episodes_now,
                                                                 seed=EVAL_SEED))
                    curves.eval[-1]["imagined_env_steps"] = imagined
                    line += f", real success {point['success_rate']:.2f} over {point['episodes']} episodes"
                    reached = point["success_rate"] >= ev.target
                    if not reached or ev.confirm_episodes <= ev.episodes:
                        break
            log(line)
            if curves.eval:
                curves.write()
            if real_steps >= algo.real_env_steps or (reached and ev.stop_at_target):
                break
            budget = min(algo.round_env_steps, algo.real_env_steps - real_steps)
            new = run_real_episodes(policy, make_envs, budget, num_envs, REAL_SEED + seed * 10_000 + len(real_outcomes))
            if real_store is None:
                real_store = DemoStore.create(out / "real_rollouts", features={**features, **_step_features()},
                                              fps=DemoStore.open(data[0]).fps, info={"task": task, "source": algo.name})
            for ep in new:
                real_store.append_episode(ep.stacked(), task=task or "", source="policy", success=ep.success,
                                          extra={"seed": ep.seed})
                curves.train_episodes.append({"env_steps": real_steps + ep.length, "success": ep.success,
                                              "return": round(ep.ret, 4), "length": ep.length, "seed": ep.seed})
                real_steps += ep.length
                real_outcomes.append(ep.success)
            episodes = episodes.extend([ep.stacked() for ep in new])
            fit(model, episodes, algo.retrain_steps, seed=seed + len(real_outcomes))
            log(f"real round: {len(new)} episodes, success {np.mean([ep.success for ep in new]):.2f}; "
                f"model retrained on {episodes.num_episodes} episodes")
    finally:
        if eval_envs is not None:
            eval_envs.close()
    return {"curves": curves, "env_steps": real_steps, "imagined_env_steps": imagined, "updates": n_updates,
            "metrics": metrics, "train_success_rate": success_summary(real_outcomes[-50:])["success_rate"]
            if real_outcomes else None}


def _step_features() -> dict[str, dict]:
    from robopolicy.data.spec import REWARD_KEY, SUCCESS_KEY

    return {REWARD_KEY: {"dtype": "float32", "shape": [], "names": None},
            SUCCESS_KEY: {"dtype": "bool", "shape": [], "names": None}}


def expected_imagined_steps(algo: WorldModelAlgoConfig) -> int:
    """For a progress bar: imagined env steps over every round."""
    rounds = 1 + math.ceil(algo.real_env_steps / max(algo.round_env_steps, 1))
    return rounds * algo.imagined_steps
