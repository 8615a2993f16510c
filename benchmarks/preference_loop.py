"""The human-in-the-loop cycle: deploy with interventions -> refine -> redeploy, K rounds; apo, dpo and hg_dagger
refined from exactly the same recordings.

    nice -n 10 .venv/bin/python benchmarks/preference_loop.py --base runs/pref/weak            # 3 rounds x 30
    .venv/bin/python benchmarks/preference_loop.py --rounds 2 --deploy-episodes 20 --eval-episodes 50

Round r (1..K):
  1. `robopolicy deploy ckpt=CURRENT intervention.enabled=true` on the simulated robot (MuJoCo in real time behind
     the HAL, the policy in its own process) for `--deploy-episodes` episodes from start states unseen by the
     demonstrations and by the evaluation (seeds 5000 + ...); the scripted intervener (the task's expert) takes
     over when the policy stalls. CURRENT is the base in round 1, then the previous round's apo policy (apo drives
     the loop).
  2. Each algorithm refines the BASE from every recording so far (`robopolicy finetune algo=A
     algo.data=[round_1/deploy/episodes, ...]`): the three see exactly the same recordings.
  3. Each refined checkpoint is evaluated over the same `--eval-episodes` unseen seeds (`robopolicy eval`'s seeds,
     100000 + k), success with its 95% Wilson interval.
Prints the success per round and algorithm and one JSON object last; writes benchmarks/results/preference_loop.json.
The weak base (when --base is not given) is the quickstart's: 15 demonstrations, 2000 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from preference_offline import load, weak_base
from train_targets import ROOT, run

DEPLOY_SEED = 5000  # start states unseen by the demonstrations (0..49) and the evaluation (100000..)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="builtin/pick_place")
    parser.add_argument("--base", type=Path, default=None, help="a weak base run or checkpoint (default: train one)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_preference_loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deploy-episodes", type=int, default=30)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--algos", nargs="+", default=["apo", "dpo", "hg_dagger"])
    parser.add_argument("--steps", type=int, default=None, help="gradient steps (default: each algorithm's)")
    parser.add_argument("--extra", nargs="*", default=[], help="more finetune overrides for every algorithm")
    # the weak base fails by fumbling near the cube (a few cm of motion) or by wandering: the intervener counts
    # 5 cm in 2 s as a stall and takes over after 5 s without success, as a watching person would
    parser.add_argument("--intervention", nargs="*",
                        default=["intervention.stall_distance=0.05", "intervention.patience_s=5.0"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.base or weak_base(args.work, args.task)
    started, load_start = time.perf_counter(), load()
    current, recordings, rounds, base_eval = base, [], [], None
    for r in range(1, args.rounds + 1):
        folder = args.work / f"round_{r}"
        done = folder / "deploy" / "summary.json"
        if done.exists() and r == 1:  # the base's deployment is the same every time: reused (resume)
            deployed = json.loads(done.read_text())
        else:
            deployed = run("deploy", f"ckpt={current}", f"task={args.task}", f"episodes={args.deploy_episodes}",
                           f"seed={DEPLOY_SEED + 1000 * r}", f"out={folder / 'deploy'}", "overwrite=true",
                           "intervention.enabled=true", *args.intervention)
        recordings.append(str(folder / "deploy" / "episodes"))
        point = {"round": r, "deployed": str(current), "load": load(),
                 "deploy": {k: deployed.get(k) for k in ("success_rate", "success_ci95", "episodes", "interventions")},
                 "refined": {}}
        for algo in args.algos:
            steps = [f"algo.steps={args.steps}"] if args.steps else []
            summary = run("finetune", f"algo={algo}", f"ckpt={base}", f"algo.data=[{','.join(recordings)}]", *steps, f"out={folder / algo}", "overwrite=true", f"task={args.task}",
                          f"eval.base_episodes={args.eval_episodes if base_eval is None else 0}",
                          f"eval.final_episodes={args.eval_episodes}", *args.extra)
            base_eval = base_eval or summary["base_eval"]
            final = summary["final_eval"]
            point["refined"][algo] = {"success_rate": final["success_rate"], "success_ci95": final["success_ci95"],
                                      "counts": summary["counts"], "train_seconds": summary["train_seconds"]}
        rounds.append(point)
        print(f"round {r}: deployed {point['deploy']['success_rate']:.2f} with {point['deploy']['interventions']} "
              "interventions; refined " + ", ".join(
                  f"{a} {v['success_rate']:.2f} {v['success_ci95']}" for a, v in point["refined"].items()),
              file=sys.stderr)
        if "apo" in point["refined"]:
            current = folder / "apo"
    report = {
        "benchmark": "preference_loop", "task": args.task, "base": str(base),
        "base_eval": {k: base_eval[k] for k in ("success_rate", "success_ci95", "episodes")},
        "rounds": rounds, "deploy_episodes": args.deploy_episodes, "steps": args.steps, "extra": args.extra,
        "wall_seconds": round(time.perf_counter() - started, 1), "load_average_1min": [load_start, load()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    out = ROOT / "benchmarks" / "results" / "preference_loop.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
