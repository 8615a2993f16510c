"""Curation on mixed-quality data: uniform training vs quality weighting vs filtering, on the same store.

    .venv/bin/python benchmarks/curation.py                  # the default tasks (sloppy mode), ~40 min on 2 cores
    .venv/bin/python benchmarks/curation.py --tasks builtin/pick_place:sloppy metaworld/drawer-open-v3:noise=0.5

For each task the store is built as a user would, through the console script: `robopolicy collect` 30 clean
expert demonstrations (seed 0), then appends 30 bad ones (the expert's `noise=<std>` or `sloppy` mode, seed 1000)
to the same store. `robopolicy data quality` writes a quality weight per episode; the report's ranking is scored
against the clean(1)/bad(0) label with Spearman's rank correlation and the AUC (the probability that a random
clean episode outranks a random bad one). Then three policies with the default config on that store:
uniform sampling, `quality_weighting=true`, and the store filtered by `robopolicy data filter min_quality=Q`;
each evaluated over 100 episodes (`robopolicy eval`), success with its 95% Wilson interval.
Training keeps only successful episodes (the trainer's default `only_success=true`) in all three arms, so the
bad data that remains is successful-but-bad demonstrations. Prints one JSON object as the last line and writes
benchmarks/results/curation.json.

Which bad data hurts is task-dependent (measured with this script, uniform arm, 100 episodes): the `sloppy`
MetaWorld expert (drifting noise and pauses) hurts pick-place-v3 and push-v3; `noise=0.5` (noisy labels) barely
hurts builtin/pick_place and does not hurt drawer-open-v3, and neither mode hurts drawer-open-v3. Choose tasks
where uniform training actually suffers, or the comparison says nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
from train_targets import ROOT, run, train_and_eval  # the same CLI runner and train -> eval step

TASKS = ["metaworld/pick-place-v3:sloppy", "metaworld/push-v3:sloppy"]
ARMS = ("uniform", "weighted", "filtered")
BAD_SEED = 1000  # the bad batch's first seed: no seed repeats the clean batch's


def parse_task(spec: str) -> tuple[str, list[str], str]:
    """'builtin/pick_place:noise=0.5' -> (task, collect overrides of the bad batch, a short name of the mode)."""
    task, _, mode = spec.partition(":")
    mode = mode or "sloppy"
    if mode == "sloppy":
        return task, ["expert.sloppy=true"], "sloppy"
    if mode.startswith("noise="):
        return task, [f"expert.noise={float(mode.split('=', 1)[1])}"], mode.replace("=", "")
    if mode.startswith("sloppy+noise="):
        return task, ["expert.sloppy=true", f"expert.noise={float(mode.split('=', 1)[1])}"], mode.replace("=", "")
    raise SystemExit(f"unknown bad-data mode {mode!r} in {spec!r}: use noise=<std>, sloppy or sloppy+noise=<std>.")


def build_store(task: str, bad: list[str], store: Path, n_clean: int, n_bad: int) -> dict:
    """30 clean + 30 bad episodes in one store (reused when complete: collection is deterministic given seeds)."""
    done = store / "collection.json"
    if done.exists():
        return json.loads(done.read_text())
    clean = run("collect", f"task={task}", f"episodes={n_clean}", f"out={store}", "seed=0", "overwrite=true")
    noisy = run("collect", f"task={task}", f"episodes={n_bad}", f"out={store}", f"seed={BAD_SEED}", *bad)
    summary = {"clean": {k: clean.get(k) for k in ("episodes", "success_rate", "first_episode", "first_seed")},
               "bad": {k: noisy.get(k) for k in ("episodes", "success_rate", "first_episode", "first_seed")},
               "bad_overrides": bad}
    done.write_text(json.dumps(summary))
    return summary


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        for value in np.unique(x):
            r[x == value] = r[x == value].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count half."""
    pos, neg = scores[positive][:, None], scores[~positive][None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def rank_quality(report_path: Path, n_clean: int) -> dict:
    """Score the report's weights against the clean(1)/bad(0) label (episodes 0..n_clean-1 are the clean batch)."""
    rows = json.loads(report_path.read_text())["episodes"]
    quality = np.array([row["quality"] for row in rows])
    clean = np.array([row["index"] < n_clean for row in rows])
    success = np.array([bool(row["success"]) for row in rows])
    measures = {}
    for name in ("jerk", "idle_fraction", "action_divergence"):
        values = np.array([np.nan if row[name] is None else row[name] for row in rows], dtype=float)
        measures[name] = {"clean_mean": float(np.nanmean(values[clean])), "bad_mean": float(np.nanmean(values[~clean]))}
    return {"spearman": round(spearman(quality, clean), 3), "auc": round(auc(quality, clean), 3),
            # the trainer keeps successful episodes only: the ranking among those is what curation acts on
            "spearman_successful": round(spearman(quality[success], clean[success]), 3),
            "auc_successful": round(auc(quality[success], clean[success]), 3),
            "quality_clean_median": float(np.median(quality[clean])), "quality_bad_median": float(np.median(quality[~clean])),
            "successful": {"clean": int((clean & success).sum()), "bad": int((~clean & success).sum())},
            "measures": measures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="task[:mode], mode noise=<std> | sloppy")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--clean", type=int, default=30)
    parser.add_argument("--bad", type=int, default=30)
    parser.add_argument("--min-quality", type=float, default=0.5, help="the filter threshold (README's example)")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--override", nargs="*", default=[], help="extra train settings for every arm")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in --work without retraining")
    parser.add_argument("--work", type=Path, default=Path("/tmp/robopolicy_curation"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "curation.json")
    args = parser.parse_args()

    args.results.parent.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "curation", "clean": args.clean, "bad": args.bad, "min_quality": args.min_quality,
               "eval_episodes": args.eval_episodes, "overrides": args.override, "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "tasks": []}
    for spec in args.tasks:
        task, bad, mode = parse_task(spec)
        name = f"{task.replace('/', '_')}_{mode}"
        store, filtered = args.work / "data" / name, args.work / "data" / f"{name}_filtered"
        entry = {"task": task, "bad_mode": mode, "collection": build_store(task, bad, store, args.clean, args.bad)}
        run("data", "quality", f"store={store}", f"out={args.work / 'reports' / name}")
        entry["ranking"] = rank_quality(args.work / "reports" / name / "report.json", args.clean)
        kept = run("data", "filter", f"store={store}", f"out={filtered}", f"min_quality={args.min_quality}",
                   "overwrite=true")
        kept_ids = np.array(kept["kept_episodes"])
        entry["filter"] = {"min_quality": args.min_quality, "kept_clean": int((kept_ids < args.clean).sum()),
                           "kept_bad": int((kept_ids >= args.clean).sum())}
        print(f"{task} ({mode}): spearman {entry['ranking']['spearman']} auc {entry['ranking']['auc']}, "
              f"filter keeps {entry['filter']}", flush=True)
        entry["arms"] = {}
        summary["tasks"].append(entry)
        for arm in args.arms:
            data = filtered if arm == "filtered" else store
            extra = ["quality_weighting=true"] if arm == "weighted" else []
            row = train_and_eval(task, None, data, args.work / "runs" / f"{name}_{arm}", args.eval_episodes,
                                 extra + args.override, args.reuse)
            entry["arms"][arm] = row
            args.results.write_text(json.dumps(summary, indent=2))  # after every run: a long run keeps what it measured
            print(f"{task:>26} {mode:>9} {arm:>9}: success {row['success_rate']:.2f} {row['success_ci95']} "
                  f"train {row['train_seconds']:.0f} s (load {row['load_avg_1min']['after_train']})", flush=True)
    args.results.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
