"""Success on the simulated robot at 20 Hz under injected inference latency (0, 50, 100, 150, 250 ms) for each
execution mode, side by side in one run, next to `robopolicy eval` of the same checkpoints on the same seeds.

    sync / ensemble / rtc   the plain checkpoint (--ckpt), control.mode set to the mode (rtc: prefix inpainting)
    delay_aware             the delay-aware checkpoint (--aware-ckpt, policy.max_delay > 0) with control.mode=auto,
                            which runs rtc with the learned prefix conditioning

    .venv/bin/python benchmarks/deploy_latency.py --ckpt PLAIN --aware-ckpt AWARE --task builtin/pick_place
    .venv/bin/python benchmarks/deploy_latency.py --aware-ckpt AWARE --modes delay_aware --episodes 100
    .venv/bin/python benchmarks/deploy_latency.py --task builtin/catch   # no checkpoints: collects and trains both

Without the checkpoints the modes need it runs `robopolicy collect` (--demos expert episodes) once and `robopolicy
train` twice on that store (--train-steps, policy.max_delay=0 and --max-delay), into a temporary folder. Each case
is `real.host.deploy.deploy` with the shipped configs (configs/deploy.yaml, robot=sim), the policy in a child
process, episodes seeded from 100000. Per rtc case `prefix_slots` says how the frozen prefixes fit the delays the
chunks met (matched / short / long). The `robopolicy eval` reference runs the same seeds (seed 100000 + k is the
same initial scene in both), by default exactly the deploy episodes' (--eval-episodes: --episodes), so the
comparison is paired: per case, besides `minus_eval`, `paired` counts the seeds that succeed both ways, only in
deployment, only in eval and neither, with the paired difference's 95% interval (Newcombe) and McNemar's exact p.
Per case also: success with its 95% Wilson interval, the fraction of ticks that held (no action), of ticks that
held after the episode's first action (stalls), and the mean episode duration. Writes the JSON after every case (a
partial run keeps what it measured) and prints it as the last line.
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
SEED = 100000


def run(args: list[str]) -> str:
    print("robopolicy " + " ".join(args), file=sys.stderr)
    return subprocess.run([ROBOPOLICY, *args], check=True, capture_output=True, text=True).stdout


def train_checkpoints(folder: Path, task: str, demos: int, steps: int, max_delay: int) -> tuple[Path, Path]:
    """(plain, delay-aware) checkpoints trained on one store of expert demonstrations."""
    store = folder / "demos"
    run(["collect", f"task={task}", f"episodes={demos}", f"out={store}"])
    ckpts = []
    for name, delay in (("plain", 0), ("aware", max_delay)):
        run(["train", f"task={task}", f"data={store}", f"out={folder / name}", f"steps={steps}",
             f"policy.max_delay={delay}", "eval.every=0", "eval.final_episodes=0", "eval.videos=0"])
        ckpts.append(folder / name / "checkpoints" / "last")
    return ckpts[0], ckpts[1]


def evaluate(ckpt: Path, task: str, episodes: int, out: Path) -> dict:
    """`robopolicy eval` on seeds SEED .. SEED + episodes - 1, with each seed's outcome (`by_seed`)."""
    summary = json.loads(run(["eval", f"ckpt={ckpt}", f"task={task}", f"episodes={episodes}", f"seed={SEED}",
                              f"out={out}"]).strip().splitlines()[-1])
    per_episode = json.loads(Path(summary["summary"]).read_text())["per_episode"]
    return {**{k: summary[k] for k in ("success_rate", "success_ci95", "successes", "episodes")},
            "by_seed": {str(e["seed"]): bool(e["success"]) for e in per_episode}}


def paired(case: dict, reference: dict) -> dict:
    """Deployment minus eval on the seeds both ran (`paired_difference`: first = deployment, second = eval)."""
    from robopolicy.metrics import paired_difference

    seeds = [s for s in case["by_seed"] if s in reference["by_seed"]]
    d = paired_difference([case["by_seed"][s] for s in seeds], [reference["by_seed"][s] for s in seeds])
    return {"episodes": d["episodes"], "both": d["both"], "deploy_only": d["first_only"],
            "eval_only": d["second_only"], "neither": d["neither"], "difference": d["difference"],
            "difference_ci95": d["difference_ci95"], "mcnemar_p": d["mcnemar_p"]}


def deploy_case(ckpt: Path, task: str, mode: str, latency: float, episodes: int, hz: float, out: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from real.host.deploy import deploy

    overrides = [f"ckpt={ckpt}", f"out={out}", f"episodes={episodes}", f"seed={SEED}", f"robot.task={task}",
                 f"control.control_hz={hz}", f"control.mode={mode}", f"inject_latency_s={latency}", "record=false"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="deploy", overrides=overrides)
    started = time.perf_counter()
    summary = deploy(cfg)
    ticks = sum(e["ticks"] for e in summary["per_episode"])
    counts = summary["counts"]
    return {
        **{k: summary[k] for k in ("mode", "success_rate", "success_ci95", "successes", "episodes")},
        "hold_tick_fraction": round(counts["hold_ticks"] / max(ticks, 1), 4),
        "stall_tick_fraction": round(counts["stall_ticks"] / max(ticks, 1), 4),  # holds after the first action
        "episode_s": round(sum(e["seconds"] for e in summary["per_episode"]) / max(len(summary["per_episode"]), 1), 2),
        "obs_to_command_ms_p50": (summary["obs_to_command_ms"] or {}).get("p50"),
        "inference_latency_ms_p50": (summary["inference_latency_ms"] or {}).get("p50"),
        "tick_lateness_ms_p99": (summary["tick_lateness_ms"] or {}).get("p99"),
        "prefix_slots": summary.get("prefix_slots"),  # rtc: frozen prefixes against the delays chunks met
        "wall_s": round(time.perf_counter() - started, 1),
        "by_seed": {str(e["seed"]): bool(e["success"]) for e in summary["per_episode"]},
    }


def brief(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "by_seed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="plain checkpoint (sync, ensemble, rtc)")
    parser.add_argument("--aware-ckpt", default=None, help="delay-aware checkpoint (delay_aware)")
    parser.add_argument("--task", default="builtin/pick_place")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--hz", type=float, default=20.0)
    parser.add_argument("--modes", nargs="+", default=["sync", "ensemble", "rtc", "delay_aware"])
    parser.add_argument("--latencies", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.15, 0.25])
    parser.add_argument("--eval-episodes", type=int, default=None,
                        help="robopolicy eval reference on seeds 100000.. (default: --episodes, the deploy seeds; "
                             "0: skip)")
    parser.add_argument("--demos", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=6000)
    parser.add_argument("--max-delay", type=int, default=3, help="policy.max_delay of the delay-aware checkpoint")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/deploy_latency.json"))
    args = parser.parse_args()
    if args.eval_episodes is None:
        args.eval_episodes = args.episodes

    report = {"benchmark": "deploy_latency", "task": args.task, "control_hz": args.hz,
              "episodes_per_case": args.episodes, "eval": {}, "cases": {}, "cpu_count": os.cpu_count(),
              "python": platform.python_version()}

    def write() -> None:
        report["load_avg_1min"] = os.getloadavg()[0]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    # the checkpoints the modes run: the plain one for sync / ensemble / rtc, the delay-aware one for delay_aware
    needed = {"aware" if mode == "delay_aware" else "plain" for mode in args.modes}
    given = {"plain": args.ckpt, "aware": args.aware_ckpt}
    with tempfile.TemporaryDirectory() as tmp:
        if all(given[name] for name in needed):
            ckpts = {name: Path(given[name]) for name in sorted(needed)}
            report["ckpts"] = {name: str(path) for name, path in ckpts.items()}
        else:
            plain, aware = train_checkpoints(Path(tmp), args.task, args.demos, args.train_steps, args.max_delay)
            ckpts = {"plain": plain, "aware": aware}
            report["ckpts"] = dict.fromkeys(ckpts, "trained by this script")
        if args.eval_episodes:
            for name, ckpt in ckpts.items():
                report["eval"][name] = evaluate(ckpt, args.task, args.eval_episodes, Path(tmp) / f"eval_{name}")
                print(json.dumps({f"eval {name}": brief(report["eval"][name])}), file=sys.stderr)
                write()
        for latency in args.latencies:
            for mode in args.modes:
                aware = mode == "delay_aware"
                key = f"{mode}@{round(latency * 1000)}ms"
                case = deploy_case(ckpts["aware" if aware else "plain"], args.task, "auto" if aware else mode,
                                   latency, args.episodes, args.hz, Path(tmp) / key)
                reference = report["eval"].get("aware" if aware else "plain")
                if reference:
                    case["minus_eval"] = round(case["success_rate"] - reference["success_rate"], 4)
                    case["paired"] = paired(case, reference)
                report["cases"][key] = case
                print(json.dumps({key: brief(case)}), file=sys.stderr)
                write()
    write()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
