"""Scaling out on this machine: rollout throughput of the subprocess backend vs 1 and 2 Ray workers, and training
throughput of 1 vs 2 DDP ranks, measured side by side in one run.

Rollouts: the scripted expert of --task drives `run_episodes` (what `collect` and `eval` run) over the same seeded
--episodes with --num-envs envs on each backend: the shared-memory subprocess vector env (one worker per core),
and Ray actor pools of 1 and 2 workers (a private Ray on loopback, started before the
timing). Env steps/s = recorded frames / seconds; each figure is the best of --repeats (a shared machine only slows
a run down). Every backend must produce the same episodes (checked).

Training: `robopolicy train` of the default flow policy on a store collected here, --train-steps steps with
launcher=none and launcher=ddp nproc=2 (the same total batch), samples/s from each run's summary (the timed loop,
not process start-up).

Load averages are recorded before and after each part. Prints one JSON object as the last line and writes
benchmarks/results/scale.json.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/scale.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import sim
from robopolicy.collect import ExpertAgent
from robopolicy.rollout import run_episodes
from sim.ray_vector import RayVectorEnv, init_ray
from sim.vector import make_vector_env

RESULTS = Path(__file__).parent / "results" / "scale.json"
ROBOPOLICY = str(Path(sys.executable).parent / "robopolicy")


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rollout(envs, task: str, episodes: int) -> tuple[float, list]:
    experts = [sim.make_expert(task) for _ in range(envs.num_envs)]
    agent = ExpertAgent(experts, envs.single_action_space.shape[0])
    start = time.perf_counter()
    eps = run_episodes(envs, agent, episodes, seed=0)
    seconds = time.perf_counter() - start
    return sum(e.length for e in eps) / seconds, [(e.seed, e.success, round(e.ret, 5), e.length) for e in eps]


def bench_rollouts(task: str, episodes: int, num_envs: int, repeats: int) -> dict:
    init_ray("local", num_cpus=os.cpu_count())
    backends = {
        "subprocess": lambda: make_vector_env(task, num_envs, autoreset="disabled"),
        "ray_1_worker": lambda: RayVectorEnv(task, num_envs, workers=1),
        "ray_2_workers": lambda: RayVectorEnv(task, num_envs, workers=2),
    }
    best: dict[str, float] = {}
    reference = None
    load_before = load()
    for _ in range(repeats):
        for name, make in backends.items():
            envs = make()
            try:
                rollout(envs, task, min(episodes, num_envs))  # warm up: imports, first resets
                rate, eps = rollout(envs, task, episodes)
            finally:
                envs.close()
            reference = reference or eps
            assert eps == reference, f"{name} produced other episodes than the first backend"
            best[name] = max(best.get(name, 0.0), rate)
    import ray

    ray.shutdown()
    return {"task": task, "episodes": episodes, "num_envs": num_envs, "frames": sum(e[3] for e in reference),
            "env_steps_per_second": {k: round(v, 1) for k, v in best.items()},
            "ratio_to_subprocess": {k: round(v / best["subprocess"], 2) for k, v in best.items()},
            "load_before": load_before, "load_after": load()}


def bench_training(task: str, store_episodes: int, steps: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        subprocess.run([ROBOPOLICY, "collect", f"task={task}", f"episodes={store_episodes}", f"out={store}"],
                       check=True, capture_output=True)
        runs = {}
        load_before = load()
        for name, extra in (("1_rank", []), ("2_ranks", ["launcher=ddp", "nproc=2"])):
            started = time.perf_counter()
            proc = subprocess.run([ROBOPOLICY, "train", f"task={task}", f"data={store}", f"out={Path(tmp) / name}",
                                   f"steps={steps}", f"batch_size={batch_size}", "eval.episodes=0",
                                   "eval.final_episodes=0", f"checkpoint_every={steps}", *extra],
                                  check=True, capture_output=True, text=True)
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name] = {"samples_per_second": summary["samples_per_second"],
                          "train_seconds": summary["train_seconds"],
                          "process_seconds": round(time.perf_counter() - started, 1),
                          "final_loss": summary["final_loss"], "parameters": summary["parameters"]}
    return {"task": task, "policy": "flow (configs/policy/flow.yaml)", "steps": steps, "batch_size": batch_size,
            "threads_per_rank": 1, "runs": runs,
            "ratio_2_to_1": round(runs["2_ranks"]["samples_per_second"] / runs["1_rank"]["samples_per_second"], 2),
            "load_before": load_before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin/pick_place")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--store-episodes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "rollouts": bench_rollouts(args.task, args.episodes, args.num_envs, args.repeats),
        "training": bench_training(args.task, args.store_episodes, args.train_steps, args.batch_size),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
