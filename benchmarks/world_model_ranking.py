"""How well a world model ranks checkpoints without the simulator: the checkpoints of one training run, each
evaluated for real (`--episodes` episodes) and in the model (`eval wm=`'s predict_success, from the same seeds'
start states: env resets, no simulator step), side by side; Spearman's rank correlation between the two.

    .venv/bin/python benchmarks/world_model_ranking.py --run /tmp/wm/pp_weak --wm /tmp/wm/wm_pp --episodes 100

`--run` is a training run whose `checkpoints/step_*` are ranked (train with checkpoint_every=N
keep_checkpoints=null to keep several); `--last N` keeps the newest N. `--real-repeat` evaluates every checkpoint
for real a second time from other seeds: the Spearman of those two real rankings is the agreement that evaluation
noise alone allows (checkpoints whose real rates lie within each other's intervals cannot be ranked reliably by
anything). Prints one JSON object as the last line and writes benchmarks/results/world_model_ranking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from robopolicy.checkpoint import read_checkpoint_info
from robopolicy.data.spec import STATE_KEY
from robopolicy.evaluate import EVAL_SEED, evaluate
from robopolicy.loading import load_policy
from robopolicy.world_model import load_world_model, predict_success

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPEAT_OFFSET = 50_000  # the repeated real evaluation's seeds: apart from the first's


def ranks(values: list[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        r[values == v] = r[values == v].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training run folder with checkpoints/step_*")
    parser.add_argument("--wm", required=True, help="world model folder, or several: A,B (the real evaluations "
                        "are shared; the first model's figures are the report's headline)")
    parser.add_argument("--last", type=int, default=5, help="the newest N checkpoints")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--real-repeat", action="store_true", help="a second real evaluation from other seeds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import sim
    from sim.vector import make_vector_env

    checkpoints = sorted((Path(args.run) / "checkpoints").glob("step_*"))[-args.last:]
    if len(checkpoints) < 2:
        sys.exit(f"error: {args.run}/checkpoints holds {len(checkpoints)} step checkpoints; rank at least 2.")
    task = read_checkpoint_info(checkpoints[0])["config"]["task"]
    models = {path: load_world_model(path)[0] for path in args.wm.split(",")}
    env = sim.make_env(task)
    starts = np.stack([env.reset(seed=EVAL_SEED + k)[0][STATE_KEY] for k in range(args.episodes)])
    max_steps = env.unwrapped.max_episode_steps
    env.close()
    envs = make_vector_env(task, args.num_envs, autoreset="disabled")
    rows = []
    try:
        for ckpt in checkpoints:
            policy = load_policy(ckpt)
            real = evaluate(envs, policy, args.episodes, seed=EVAL_SEED)
            row = {"checkpoint": str(ckpt), "real": real["success_rate"], "real_ci95": real["success_ci95"],
                   "real_seconds": real["seconds"]}
            if args.real_repeat:
                row["real_repeat"] = evaluate(envs, policy, args.episodes, seed=EVAL_SEED + REPEAT_OFFSET
                                              )["success_rate"]
            for path, model in models.items():
                predicted = predict_success(model, policy, starts, max_steps, seed=0)
                row.setdefault("predicted_by_model", {})[path] = {
                    "predicted": predicted["success_rate"], "predicted_ci95": predicted["success_ci95"],
                    "mean_disagreement": predicted["mean_disagreement"], "predicted_seconds": predicted["seconds"]}
            row.update(next(iter(row["predicted_by_model"].values())))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        envs.close()
    real = [r["real"] for r in rows]
    scores = {}
    for path in models:
        predicted = [r["predicted_by_model"][path]["predicted"] for r in rows]
        scores[path] = {"spearman": round(spearman(real, predicted), 4),
                        "mean_abs_error": round(float(np.mean(np.abs(np.array(real) - predicted))), 4)}
        if args.real_repeat:  # against the other real evaluation, and against both pooled (2x the episodes)
            repeat = [r["real_repeat"] for r in rows]
            scores[path]["spearman_vs_repeat"] = round(spearman(repeat, predicted), 4)
            scores[path]["spearman_vs_pooled"] = round(spearman([a + b for a, b in zip(real, repeat)], predicted), 4)
    report = {"benchmark": "world_model_ranking", "task": task, "run": args.run, "world_model": args.wm,
              "episodes": args.episodes, "checkpoints": rows, **next(iter(scores.values())),
              "by_model": scores,
              **({"real_vs_real_spearman": round(spearman(real, [r["real_repeat"] for r in rows]), 4)}
                 if args.real_repeat else {}),
              "load_average_1min": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "world_model_ranking.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
