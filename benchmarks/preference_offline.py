"""Preference refinement without online RL: rollouts of a weak base labelled by success -> `apo` and `dpo`.

    nice -n 10 .venv/bin/python benchmarks/preference_offline.py                 # ~15 min on 2 cores
    .venv/bin/python benchmarks/preference_offline.py --base runs/pref/weak --starts 100 --per-start 2

1. The weak base: `robopolicy collect` 50 expert demonstrations of builtin/pick_place, `robopolicy train` flow on
   the first 15 for 2000 steps (the quickstart's weak base before it moved to sloppy demonstrations), unless --base names one.
2. Rollouts: `--per-start` rollouts of the base from each of `--starts` start states (seeds 1000, 1001, ...: unseen by the demonstrations and the evaluation), each pass with its own sampler noise, recorded into one store with
   success labels (rollouts of one start state with different outcomes are DPO's pairs).
3. `robopolicy finetune algo=apo|dpo algo.data=[ROLLOUTS]` from the same base on the same store; the base and
   each refined checkpoint evaluated over the same 100 unseen seeds (95% Wilson intervals).
Prints one JSON object last and writes benchmarks/results/preference_offline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from train_targets import ROOT, run

sys.path.insert(0, str(ROOT))
ROLLOUT_SEED = 1000  # start states unseen by the demonstrations (0..49) and by evaluation (100000..)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def weak_base(work: Path, task: str) -> Path:
    base = work / "weak"
    if not (base / "checkpoints" / "last").exists():
        run("collect", f"task={task}", "episodes=50", f"out={work / 'demos'}", "overwrite=true", "num_envs=2")
        run("train", f"task={task}", "policy=flow", f"data={work / 'demos'}", "max_episodes=15", "steps=2000",
            f"out={base}", "overwrite=true", "eval.episodes=0", "eval.final_episodes=0")
    return base


def record(base: Path, task: str, store_path: Path, starts: int, per_start: int) -> dict:
    import sim
    from robopolicy.cli import env_kwargs_for_features, make_vector_env
    from robopolicy.data import DemoStore
    from robopolicy.features import features_from_env
    from robopolicy.loading import load_policy
    from robopolicy.preference import record_rollouts

    done = store_path / "rollouts.json"
    if done.exists():
        return json.loads(done.read_text())
    policy = load_policy(base / "checkpoints" / "last")
    kwargs = env_kwargs_for_features(policy.features, None)
    probe = sim.make_env(task, **kwargs)
    features = features_from_env(probe.observation_space, probe.action_space,
                                 getattr(probe.unwrapped, "feature_names", None))
    fps, description = probe.unwrapped.fps, probe.unwrapped.task_description
    probe.close()
    store = DemoStore.create(store_path, features, fps, overwrite=True, info={"task": task, "source": "rollouts"})
    envs = make_vector_env(task, 2, kwargs)
    started = time.perf_counter()
    try:
        summary = record_rollouts(policy, envs, store, starts, per_start, seed=ROLLOUT_SEED, task=description)
    finally:
        envs.close()
        store.close()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    done.write_text(json.dumps(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="builtin/pick_place")
    parser.add_argument("--base", type=Path, default=None, help="a weak base run or checkpoint (default: train one)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_preference_offline")
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--per-start", type=int, default=2)
    parser.add_argument("--algos", nargs="+", default=["apo", "dpo"])
    parser.add_argument("--steps", type=int, default=None, help="gradient steps (default: each algorithm's)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--extra", nargs="*", default=[], help="more finetune overrides, e.g. algo.beta=100")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.base or weak_base(args.work, args.task)
    store = args.work / "rollouts"
    load_start, started = load(), time.perf_counter()
    rollouts = record(base, args.task, store, args.starts, args.per_start)
    results, base_eval = {}, None
    for algo in args.algos:
        steps = [f"algo.steps={args.steps}"] if args.steps else []
        summary = run("finetune", f"algo={algo}", f"ckpt={base}", f"algo.data=[{store}]", *steps,
                      f"out={args.work / algo}", "overwrite=true", f"task={args.task}",
                      f"eval.base_episodes={args.episodes if base_eval is None else 0}",
                      f"eval.final_episodes={args.episodes}", *args.extra)
        base_eval = base_eval or summary["base_eval"]
        final = summary["final_eval"]
        results[algo] = {"success_rate": final["success_rate"], "success_ci95": final["success_ci95"],
                         "improvement_points": round(100 * (final["success_rate"] - base_eval["success_rate"]), 1),
                         "train_seconds": summary["train_seconds"], "counts": summary["counts"],
                         "last_metrics": summary["last_metrics"], "checkpoint": summary["checkpoint"]}
        print(json.dumps({algo: results[algo]}), file=sys.stderr)
    report = {
        "benchmark": "preference_offline", "task": args.task, "base": str(base),
        "rollouts": rollouts, "base_eval": {k: base_eval[k] for k in ("success_rate", "success_ci95", "episodes")},
        "refined": results, "steps": args.steps, "extra": args.extra,
        "wall_seconds": round(time.perf_counter() - started, 1), "load_average_1min": [load_start, load()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    out = ROOT / "benchmarks" / "results" / "preference_offline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
