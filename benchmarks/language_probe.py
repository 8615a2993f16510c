"""Is a language task imitable from its state at all? A per-step MLP regression told the goal as a one-hot, closed loop.

    .venv/bin/python benchmarks/language_probe.py --store datasets/pick_color --steps 3000 12000

The simplest cloned policy: three GELU layers of 256 from the min-max normalized current state and the goal's one-hot
(read from each episode's instruction) to the current action, trained with MSE (Adam 1e-3, batches of 256), then run
for `--episodes` seeded evaluation episodes (seeds 100000 + k, as `eval`). No chunks, no history, no sampler: where it
succeeds and the shipped policies do not, the state and the demonstrations suffice and the limit is the policy or its
training budget. Prints one JSON object as the last line and writes benchmarks/results/language_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sim
from robopolicy.data import DemoStore
from sim.builtin.base import all_goals

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--task", default="builtin/pick_color")
    parser.add_argument("--steps", type=int, nargs="+", default=[3000, 12000], help="evaluate after each")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "language_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    env = sim.make_env(args.task)
    task = env.unwrapped
    goals = all_goals(task.goal_fields)
    store = DemoStore.open(args.store)
    state, action = store.read("observation.state"), store.read("action")
    lengths = np.diff(np.concatenate([[0], store.episode_ends]))
    goal = np.repeat([goals.index(task.goal_from_instruction(ep["task"])) for ep in store.episodes], lengths)
    low, high = state.min(0), state.max(0)

    def inputs(states: np.ndarray, goal_index: np.ndarray) -> torch.Tensor:
        normalized = 2 * (states - low) / np.maximum(high - low, 1e-6) - 1
        return torch.from_numpy(np.concatenate([normalized, np.eye(len(goals))[goal_index]], -1).astype(np.float32))

    x, y = inputs(state, goal), torch.from_numpy(action.astype(np.float32))
    net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                        nn.Linear(256, 256), nn.GELU(), nn.Linear(256, y.shape[1]))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    rows, done, started = [], 0, time.perf_counter()
    for target in sorted(args.steps):
        for _ in range(target - done):
            batch = torch.from_numpy(rng.integers(0, len(x), 256))
            loss = ((net(x[batch]) - y[batch]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        done = target
        successes = 0
        for k in range(args.episodes):
            obs, _ = env.reset(seed=100_000 + k)
            goal_index = np.array(goals.index(task.goal))
            for _ in range(task.max_episode_steps):
                with torch.no_grad():
                    act = net(inputs(obs["observation.state"], goal_index)[None])[0].numpy().clip(-1, 1)
                obs, _, terminated, truncated, info = env.step(act)
                if terminated or truncated:
                    break
            successes += bool(info["success"])
        rows.append({"steps": target, "batch_size": 256, "episodes": args.episodes,
                     "success_rate": successes / args.episodes, "final_loss": round(loss.item(), 5),
                     "load": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "language_probe", "task": args.task, "store": str(args.store),
              "demonstrations": store.num_episodes, "results": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
