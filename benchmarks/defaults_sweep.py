"""What a user should expect on their own task: the README's commands with NO overrides, over tasks and seeds.

    .venv/bin/python benchmarks/defaults_sweep.py                                 # offline + refinement, hours
    .venv/bin/python benchmarks/defaults_sweep.py --stages offline --tasks builtin/reach --seeds 0 1 2
    .venv/bin/python benchmarks/defaults_sweep.py --stages refine --tasks metaworld/push-v3 --methods residual

offline: 50 expert demonstrations -> `robopolicy train task=T data=D seed=S [policy=P]` -> `robopolicy eval`
         (100 episodes), per policy and seed; demonstrations collected once per task (collection seeds are fixed).
refine:  a deliberately weak base per task and seed (the README's: noisy / sloppy demonstrations, 30 of them, few
         training steps), then `robopolicy finetune algo=M ckpt=BASE seed=S` with nothing else: the defaults
         finetune derives from the task and the base (robopolicy/rl/task_profile.py) are what is measured;
         the refined policy's final evaluation (100 episodes) and the steps to the 0.9 target.

Every row has the success rate with its 95% Wilson interval and the load average; one table (JSON, CSV and a
markdown table on standard output) at benchmarks/results/defaults_sweep.{json,csv}, written after every row so a
long run keeps what it measured. Everything runs through the console script, as a user would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_targets import collect, load, run, train_and_eval  # noqa: E402

TASKS = ["builtin/reach", "builtin/push", "builtin/pick_place", "builtin/push_two_ways",
         "metaworld/push-v3", "metaworld/bin-picking-v3", "metaworld/drawer-open-v3"]
# the README's weak bases: how their demonstrations are degraded, how few and how briefly they are trained
WEAK_DEMOS = {"builtin": ["expert.sloppy=true"], "metaworld": ["expert.noise=0.3"]}
WEAK_TRAIN = {"builtin": ["max_episodes=30", "steps=1000"], "metaworld": ["max_episodes=30", "steps=500"]}


def family(task: str) -> str:
    return task.split("/", 1)[0]


def weak_base(task: str, seed: int, work: Path, demos: int, train: list[str] | None = None) -> Path:
    """A weak base (README's recipe, or `train`'s overrides: a task whose recipe base is not weak needs a weaker
    one); its run folder names the recipe so different recipes do not share a base."""
    name = task.replace("/", "_")
    store = work / "data" / f"{name}_weak"
    if not (store / "zarr.json").exists():
        run("collect", f"task={task}", f"episodes={demos}", f"out={store}", "overwrite=true", *WEAK_DEMOS[family(task)])
    recipe = train if train is not None else WEAK_TRAIN[family(task)]
    tag = "" if train is None else "_" + "_".join(o.replace("=", "") for o in train)
    base = work / "runs" / f"{name}_weak{tag}_s{seed}"
    if not (base / "summary.json").exists():
        run("train", f"task={task}", f"data={store}", f"out={base}", "policy=flow", f"seed={seed}", "overwrite=true",
            "eval.every=0", "eval.final_episodes=0", *recipe)
    return base


def refine(task: str, method: str, seed: int, base: Path, out: Path, env_steps: int | None,
           stop_at_target: bool = False) -> dict:
    load_before, started = load(), time.perf_counter()
    budget = [] if env_steps is None else [f"env_steps={env_steps}"]  # None: finetune's default (100k)
    # ending at the first confirmed crossing of 0.9 saves CPU and changes nothing the method learns
    budget += ["eval.stop_at_target=true"] if stop_at_target else []
    summary = run("finetune", f"algo={method}", f"ckpt={base}", f"out={out}", f"seed={seed}", "overwrite=true",
                  *budget)
    final = summary["final_eval"] or {}
    return {
        "stage": "refine", "task": task, "method": method, "seed": seed,
        "base_success": (summary["base_eval"] or {}).get("success_rate"),
        "success_rate": final.get("success_rate"), "success_ci95": final.get("success_ci95"),
        "episodes": final.get("episodes"), "env_steps": summary["env_steps"],
        "steps_to_target": summary["steps_to_target"], "derived_defaults": summary.get("derived_defaults"),
        "advice": summary.get("advice"), "wall_seconds": round(time.perf_counter() - started, 1),
        "load_avg_1min": {"before": load_before, "after": load()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=["offline", "refine"], choices=["offline", "refine"])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["flow", "diffusion"])
    parser.add_argument("--methods", nargs="+", default=["residual", "steer"])
    parser.add_argument("--demos", type=int, default=50)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--env-steps", type=int, default=None, help="refinement budget; default: finetune's own")
    parser.add_argument("--weak-train", nargs="*", default=None,
                        help="train overrides of the weak bases instead of the README's recipe, e.g. "
                             "max_episodes=10 steps=200 (for tasks where the recipe's base is not weak)")
    parser.add_argument("--stop-at-target", action="store_true",
                        help="end each refinement at its first 0.9 (confirmed over 100 episodes): steps to 0.9 only")
    parser.add_argument("--train-override", nargs="*", default=[],
                        help="extra offline train settings, for a quick look only (e.g. steps=200): the sweep's "
                             "point is the defaults")
    parser.add_argument("--work", type=Path, default=Path("/tmp/robopolicy_defaults_sweep"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "defaults_sweep.json")
    args = parser.parse_args()

    args.results.parent.mkdir(parents=True, exist_ok=True)
    table = {"benchmark": "defaults_sweep", "seeds": args.seeds, "cpu_count": os.cpu_count(), "rows": []}

    def record(row: dict) -> None:
        table["rows"].append(row)
        args.results.write_text(json.dumps(table, indent=2))
        with open(args.results.with_suffix(".csv"), "w", newline="") as f:
            keys = ["stage", "task", "policy", "method", "seed", "base_success", "success_rate", "success_ci95",
                    "episodes", "steps_to_target"]
            writer = csv.DictWriter(f, keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table["rows"])
        what = row.get("policy") or row.get("method")
        print(f"| {row['stage']} | {row['task']} | {what} | {row['seed']} | {row['success_rate']} | "
              f"{row['success_ci95']} | load {row['load_avg_1min']} |", flush=True)

    print("| stage | task | policy / method | seed | success | 95% CI | load |\n|---|---|---|---|---|---|---|")
    for task in args.tasks:
        name = task.replace("/", "_")
        if "offline" in args.stages:
            store = args.work / "data" / f"{name}_expert"
            collect(task, store, args.demos, images=False)
            for policy in args.policies:
                for seed in args.seeds:
                    row = train_and_eval(task, policy, store, args.work / "runs" / f"{name}_{policy}_s{seed}",
                                         args.eval_episodes, [f"seed={seed}", *args.train_override],
                                         reuse=False)
                    record({"stage": "offline", "seed": seed, **row})
        if "refine" in args.stages:
            for seed in args.seeds:
                base = weak_base(task, seed, args.work, args.demos, args.weak_train)
                for method in args.methods:
                    out = args.work / "runs" / f"{name}_{method}_s{seed}"
                    record({**refine(task, method, seed, base, out, args.env_steps, args.stop_at_target),
                            "weak_train": args.weak_train or WEAK_TRAIN[family(task)]})
    print(json.dumps(table))


if __name__ == "__main__":
    main()
