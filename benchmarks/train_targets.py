"""The issue's success table: 50 expert demonstrations -> `robopolicy train` (default config) -> 100 eval episodes.

    .venv/bin/python benchmarks/train_targets.py                       # every task x {flow, diffusion}, ~2 h
    .venv/bin/python benchmarks/train_targets.py --tasks builtin/push_two_ways --policies flow diffusion mlp
    .venv/bin/python benchmarks/train_targets.py --tasks builtin/pick_place --images --policies flow

Everything runs through the console script as a user would (collect, train, eval), with the shipped defaults
plus any `--override key=value`. Each row reports train_seconds (the optimisation steps alone, from the run's
summary.json), the success rate with its 95% Wilson interval, and the load average around the run (the
machine may be shared: wall-clock times are inflated by load). Prints one JSON object as the last line and
writes benchmarks/results/train_targets[_images].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROBOPOLICY = str(Path(sys.executable).parent / "robopolicy")
TASKS = ["builtin/push", "builtin/pick_place", "builtin/push_two_ways",
         "metaworld/push-v3", "metaworld/pick-place-v3", "metaworld/drawer-open-v3"]
TARGET_SUCCESS = {"state": 0.9, "images": 0.8}


def run(*args: str) -> dict:
    """One `robopolicy` command; its summary is the last line of standard output."""
    proc = subprocess.run([ROBOPOLICY, *args], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"robopolicy {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load() -> float:
    return round(os.getloadavg()[0], 2)


def collect(task: str, store: Path, episodes: int, images: bool) -> dict:
    """The store of `episodes` expert demonstrations, reused when an earlier run collected the same one with the same
    task code: collection is deterministic given the seeds, but not across changes to the tasks or experts (a store
    left in a work folder by older code once made diffusion on builtin/push read 0.77 where fresh data gave 0.99)."""
    stamp_path = store.parent / f"{store.name}.stamp.json"
    stamp = {"task": task, "episodes": episodes, "images": images, "sim": _sim_version()}
    if stamp["sim"] and (store / "zarr.json").exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return {"store": str(store), "reused": True}
    summary = run("collect", f"task={task}", f"episodes={episodes}", f"out={store}",
                  f"obs.images={str(images).lower()}", "overwrite=true")
    stamp_path.write_text(json.dumps(stamp))
    return summary


def _sim_version() -> str | None:
    """The git tree hash of sim/ (tasks, experts), or None outside a git checkout or with uncommitted changes there
    (never reused then)."""
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "sim"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
        tree = subprocess.run(["git", "rev-parse", "HEAD:sim"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else tree


def train_and_eval(task: str, policy: str | None, store: Path, run_dir: Path, eval_episodes: int,
                   overrides: list[str], reuse: bool) -> dict:
    load_before = load()
    started = time.perf_counter()
    reused = reuse and (run_dir / "summary.json").exists()
    if reused:
        train = json.loads((run_dir / "summary.json").read_text())
    else:
        choice = [f"policy={policy}"] if policy else []  # None: the trainer's default policy
        train = run("train", f"task={task}", f"data={store}", f"out={run_dir}", *choice, "overwrite=true",
                    "eval.every=0", "eval.final_episodes=0", *overrides)
    wall = time.perf_counter() - started
    load_train = load()
    # One torch thread: at batch <= num_envs, two OpenMP threads mostly wait on each other (badly so under load).
    ev = run("eval", f"ckpt={run_dir}", f"episodes={eval_episodes}", f"out={run_dir / 'eval'}", "threads=1")
    policy_cfg = yaml.safe_load((run_dir / "checkpoints" / "last" / "config.yaml").read_text())["policy"]
    return {
        "task": task, "policy": policy, "steps": train["steps"], "parameters": train["parameters"],
        "policy_config": {k: policy_cfg.get(k) for k in ("denoiser", "horizon", "n_action_steps",
                                                           "num_inference_steps", "prediction_type")},
        "train_seconds": train["train_seconds"], "train_wall_seconds": None if reused else round(wall, 1),
        "success_rate": ev["success_rate"], "success_ci95": ev["success_ci95"], "episodes": ev["episodes"],
        "mean_length": ev["mean_length"], "eval_seconds": ev["seconds"],
        "load_avg_1min": {"before_train": load_before, "after_train": load_train, "after_eval": load()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--policies", nargs="+", default=["flow", "diffusion"])
    parser.add_argument("--demos", type=int, default=50)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--images", action="store_true", help="collect and train with the task's cameras")
    parser.add_argument("--override", nargs="*", default=[], help="extra train settings, e.g. steps=2000")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in --work without retraining")
    parser.add_argument("--work", type=Path, default=Path("/tmp/robopolicy_train_targets"))
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON output; default benchmarks/results/train_targets[_images].json")
    args = parser.parse_args()

    obs = "images" if args.images else "state"
    out = args.results or ROOT / "benchmarks" / "results" / f"train_targets{'_images' if args.images else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "train_targets", "demos": args.demos, "eval_episodes": args.eval_episodes,
               "overrides": args.override, "targets": {"success": TARGET_SUCCESS[obs], "train_seconds": 600},
               "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(), "rows": []}
    for task in args.tasks:
        name = task.replace("/", "_")
        store = args.work / "data" / f"{name}_{obs}"
        collect(task, store, args.demos, args.images)
        for policy in args.policies:
            row = train_and_eval(task, policy, store, args.work / "runs" / f"{name}_{obs}_{policy}",
                                 args.eval_episodes, args.override, args.reuse)
            row["obs"] = obs
            row["meets_target"] = row["success_rate"] >= TARGET_SUCCESS[obs] and row["train_seconds"] < 600
            summary["rows"].append(row)
            out.write_text(json.dumps(summary, indent=2))  # after every row: a long run keeps what it measured
            print(f"{task:>26} {policy:>10} {obs:>6}: success {row['success_rate']:.2f} {row['success_ci95']} "
                  f"train {row['train_seconds']:.0f} s (load {row['load_avg_1min']['after_train']})", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
