"""The goal-oracle bound of a language task: a state policy told the goal as a one-hot feature, no instruction.

    .venv/bin/python benchmarks/language_oracle.py --store datasets/pick_color --task builtin/pick_color --steps 4000

Copies the store with `observation.goal` added (a one-hot over the task's goals, read from each episode's recorded
instruction), trains `--policy` (a shipped config, default flow) on it with the train command's loop, and evaluates
on the task with the same one-hot added to every observation. Beside a vla trained on the same store, it separates
what the language conditioning costs from what imitating the task costs. `--set encoder.film_key=observation.goal`
makes the one-hot scale and shift the state features (FiLM) instead of only joining them. `--goal-feature selected`
adds, instead of the one-hot, the state features of the entities the goal names (`cube_red.*` and `pad_yellow.*` for
color red, target yellow: the entity whose name has the goal value as a `_`-separated word), beside the full state:
what a perfect selection of the instructed objects would give a policy. Prints one JSON object as the last line and
writes benchmarks/results/language_oracle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import yaml

import sim
from robopolicy.data import DemoStore
from robopolicy.data.spec import STATE_KEY
from robopolicy.train import TrainConfig, TrainEvalConfig, train
from sim.builtin.base import all_goals
from sim.vector import SharedMemoryVectorEnv

ROOT = Path(__file__).resolve().parents[1]
GOAL_KEY = "observation.goal"


class GoalOneHot(gym.ObservationWrapper):
    """Adds the env's current goal as `observation.goal`: a one-hot [n_goals], or (`selected`) the state features
    of the entities the goal names."""

    def __init__(self, env: gym.Env, goals: list[dict], kind: str = "one-hot"):
        super().__init__(env)
        self.goals, self.kind = goals, kind
        self.names = list(env.unwrapped.feature_names[STATE_KEY]) if kind == "selected" else []
        size = len(goals) if kind == "one-hot" else len(selected_index(self.names, goals[0]))
        spaces = dict(env.observation_space.spaces)
        spaces[GOAL_KEY] = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)

    def observation(self, obs: dict) -> dict:
        goal = self.env.unwrapped.goal
        if self.kind == "one-hot":
            return {**obs, GOAL_KEY: one_hot(self.goals, goal)}
        return {**obs, GOAL_KEY: obs[STATE_KEY][selected_index(self.names, goal)].astype(np.float32)}


def selected_index(names: list[str], goal: dict) -> list[int]:
    """The state dimensions of the entities the goal names, in goal-field order (each entity's own order)."""
    index = []
    for value in goal.values():
        found = [i for i, n in enumerate(names) if value in str(n).split(".")[0].split("_")]
        if not found:
            raise ValueError(f"no state feature names the goal value {value!r}.")
        index += found
    return index


def one_hot(goals: list[dict], goal: dict) -> np.ndarray:
    out = np.zeros(len(goals), dtype=np.float32)
    out[goals.index(goal)] = 1.0
    return out


def oracle_store(store_path: Path, out: Path, task: str, kind: str = "one-hot") -> list[dict]:
    """A copy of the store with every frame's goal feature; returns the goal list (the one-hot's order)."""
    env = sim.make_env(task).unwrapped
    goals = all_goals(env.goal_fields)
    src = DemoStore.open(store_path)
    features = dict(src.features)
    names = list(src.features[STATE_KEY]["names"])
    if kind == "one-hot":
        features[GOAL_KEY] = {"dtype": "float32", "shape": [len(goals)], "names": [str(g) for g in goals]}
    else:
        index = selected_index(names, goals[0])
        features[GOAL_KEY] = {"dtype": "float32", "shape": [len(index)], "names": [f"selected{k}" for k in index]}
    dst = DemoStore.create(out, features, src.fps, overwrite=True)
    for i, meta in enumerate(src.episodes):
        frames = src.get_episode(i)
        length = len(frames["action"])
        goal = env.goal_from_instruction(meta["task"])
        if kind == "one-hot":
            frames[GOAL_KEY] = np.tile(one_hot(goals, goal), (length, 1))
        else:
            frames[GOAL_KEY] = np.asarray(frames[STATE_KEY])[:, selected_index(names, goal)].astype(np.float32)
        dst.append_episode(frames, task=meta["task"], source=meta["source"], success=meta["success"])
    dst.close()
    return goals


def oracle_env(task: str, goals: list[dict], kind: str = "one-hot") -> gym.Env:
    return GoalOneHot(sim.make_env(task), goals, kind)


def make_envs(task: str, goals: list[dict], kind: str, n: int):
    """Workers in one subprocess, reset by the rollout (as the train command's own vector env)."""
    return SharedMemoryVectorEnv(partial(oracle_env, task, goals, kind), n, num_workers=1,
                                 autoreset_mode=gym.vector.AutoresetMode.DISABLED, name=task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--task", default="builtin/pick_color")
    parser.add_argument("--policy", default="flow")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--goal-feature", choices=("one-hot", "selected"), default="one-hot",
                        help="one-hot: the goal's index; selected: the state features of the entities it names")
    parser.add_argument("--max-episodes", type=int, default=None, help="train on the store's first N episodes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="policy settings over the shipped config, e.g. encoder.state_dim=256")
    parser.add_argument("--work", type=Path, default=Path("/tmp/robopolicy_language_oracle"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "language_oracle.json")
    args = parser.parse_args()

    goals = oracle_store(args.store, args.work / "store", args.task, args.goal_feature)
    policy_cfg = yaml.safe_load((ROOT / "configs" / "policy" / f"{args.policy}.yaml").read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = policy_cfg
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    cfg = TrainConfig(task=args.task, data=str(args.work / "store"), out=str(args.work / "run"), overwrite=True,
                      steps=args.steps, batch_size=args.batch_size, max_episodes=args.max_episodes,
                      eval=TrainEvalConfig(every=0, final_episodes=args.episodes, num_envs=4, videos=0))
    load_before = round(os.getloadavg()[0], 2)
    summary = train(cfg, policy_cfg, make_envs=partial(make_envs, args.task, goals, args.goal_feature, 4), log=lambda m: None)
    result = {"benchmark": "language_oracle", "task": args.task, "store": str(args.store), "policy": args.policy,
              "policy_settings": args.set, "goal_feature": args.goal_feature,
              "max_episodes": args.max_episodes, "steps": args.steps, "batch_size": args.batch_size,
              "train_seconds": summary["train_seconds"], "eval": summary["eval"],
              "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
