"""Success rate on the simulated robot at 20 Hz with 0 ms vs 150 ms of injected inference latency, for each
execution mode (sync, ensemble, rtc), side by side in one run, next to `robopolicy eval` of the same checkpoint
on the same episode seeds (--eval-episodes; the reference deployment is measured against).

    .venv/bin/python benchmarks/deploy_latency.py --ckpt runs/quickstart/checkpoints/last --task builtin/push
    .venv/bin/python benchmarks/deploy_latency.py            # no --ckpt: collects demos and trains one first

Without --ckpt it runs `robopolicy collect` (--demos expert episodes) and `robopolicy train` (--train-steps,
no evaluation) on the task into a temporary folder first. Each case is `real.host.deploy.deploy` with the
shipped configs (configs/deploy.yaml, robot=sim), the policy in a child process, episodes seeded from 100000.
Prints one JSON object as the last line and writes benchmarks/results/deploy_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROBOPOLICY = str(Path(sys.executable).parent / "robopolicy")


def train_checkpoint(folder: Path, task: str, demos: int, steps: int) -> Path:
    store, run = folder / "demos", folder / "run"
    for args in (["collect", f"task={task}", f"episodes={demos}", f"out={store}"],
                 ["train", f"task={task}", f"data={store}", f"out={run}", f"steps={steps}", "eval.every=0",
                  "eval.final_episodes=0", "eval.videos=0"]):
        print("robopolicy " + " ".join(args), file=sys.stderr)
        subprocess.run([ROBOPOLICY, *args], check=True, stdout=subprocess.DEVNULL)
    return run / "checkpoints" / "last"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--task", default="builtin/pick_place")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--modes", nargs="+", default=["sync", "ensemble", "rtc"])
    parser.add_argument("--latencies", nargs="+", type=float, default=[0.0, 0.15])
    parser.add_argument("--eval-episodes", type=int, default=100, help="robopolicy eval reference (0: skip)")
    parser.add_argument("--demos", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/deploy_latency.json"))
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from real.host.deploy import deploy

    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else train_checkpoint(Path(tmp), args.task, args.demos, args.train_steps)
        if args.eval_episodes:
            proc = subprocess.run([ROBOPOLICY, "eval", f"ckpt={ckpt}", f"task={args.task}",
                                   f"episodes={args.eval_episodes}", f"out={tmp}/eval"],
                                  check=True, capture_output=True, text=True)
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            cases["eval"] = {k: summary[k] for k in ("success_rate", "success_ci95", "successes", "episodes")}
            print(json.dumps({"eval": cases["eval"]}), file=sys.stderr)
        for latency in args.latencies:
            for mode in args.modes:
                overrides = [f"ckpt={ckpt}", f"out={tmp}/{mode}_{latency}", f"episodes={args.episodes}",
                             f"robot.task={args.task}", f"control.control_hz={args.hz}", f"control.mode={mode}",
                             f"inject_latency_s={latency}", "record=false"]
                with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                    cfg = compose(config_name="deploy", overrides=overrides)
                started = time.perf_counter()
                summary = deploy(cfg)
                cases[f"{mode}@{int(latency * 1000)}ms"] = {
                    k: summary[k] for k in ("success_rate", "success_ci95", "successes", "episodes",
                                            "obs_to_command_ms", "inference_latency_ms", "tick_lateness_ms")
                } | {"hold_ticks": summary["counts"]["hold_ticks"], "seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps({f"{mode}@{int(latency * 1000)}ms": cases[f"{mode}@{int(latency * 1000)}ms"]}),
                      file=sys.stderr)
    report = {"benchmark": "deploy_latency", "task": args.task, "ckpt": str(args.ckpt or "trained by this script"),
              "control_hz": args.hz, "episodes_per_case": args.episodes, "cases": cases,
              "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
