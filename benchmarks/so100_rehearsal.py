"""The SO-100 rehearsal end to end: collect and train on builtin/so100_pick (or --task builtin/so100_touch),
`robopolicy eval` in sim, then the same checkpoint through LeRobot's unmodified SO100Follower on the Feetech twin, side by side on the same seeds.

    .venv/bin/python benchmarks/so100_rehearsal.py                       # 50 demos, 1500 steps, 50 + 50 episodes
    .venv/bin/python benchmarks/so100_rehearsal.py --ckpt RUN --episodes 10

Runs the commands a user runs (README, "Rehearsing on the SO-100 twin"): `robopolicy collect`, `robopolicy train`
(skipped with --ckpt), `robopolicy eval`; the twin with the task's scene (`python -m real.host.feetech_twin --task
...`), then `robopolicy deploy robot=so100 ckpt=RUN robot.port=<the pty> ...` (which runs the robot side in
LeRobot's virtualenv, .venv-lerobot, and serves the policy from ours) with `robot.scene=` (the twin's reset/success
channel); `--robot-computer` runs the two halves by hand instead, as on a separate robot computer: `robopolicy
serve` and `python -m real.robot --robot so100` in LeRobot's virtualenv. Prints one JSON object as the last line
and writes benchmarks/results/so100_rehearsal.json: both success rates, their difference, wall times, load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from real.host.feetech_twin import TwinProcess  # noqa: E402

ROBOPOLICY = str(Path(sys.executable).parent / "robopolicy")
LEROBOT_PYTHON = ROOT / ".venv-lerobot" / "bin" / "python"


def run(args: list[str], env: dict) -> dict:
    """A command; its last JSON line."""
    print(" ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def serve(ckpt: Path, env: dict) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([ROBOPOLICY, "serve", f"ckpt={ckpt}", "port=0"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = server.stderr.readline()
        match = re.search(r"on (127\.0\.0\.1:\d+)", line)
        if match:
            return server, match.group(1)
        if server.poll() is not None:
            break
    server.kill()
    raise SystemExit("robopolicy serve never announced its address")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin/so100_pick", help="an SO-100 task (builtin/so100_pick, so100_touch)")
    parser.add_argument("--ckpt", default=None, help="a trained run or checkpoint (skips collect and train)")
    parser.add_argument("--demos", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--episodes", type=int, default=50, help="episodes of eval and of the twin deployment")
    parser.add_argument("--folder", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<task>_rehearsal.json")
    parser.add_argument("--robot-computer", action="store_true", help="serve + python -m real.robot by hand "
                        "instead of one `robopolicy deploy robot=so100`")
    args = parser.parse_args(argv)
    task = args.task
    if not LEROBOT_PYTHON.exists():
        raise SystemExit(f"{LEROBOT_PYTHON} is missing: build LeRobot's virtualenv with `make lerobot-env`.")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        times: dict[str, float] = {}
        t = time.perf_counter()
        if args.ckpt:
            ckpt = Path(args.ckpt)
        else:
            run([ROBOPOLICY, "collect", f"task={task}", f"episodes={args.demos}", f"out={folder / 'demos'}",
                 "overwrite=true"], env)
            times["collect_s"] = time.perf_counter() - t
            t = time.perf_counter()
            run([ROBOPOLICY, "train", f"task={task}", f"data={folder / 'demos'}", f"out={folder / 'run'}",
                 f"steps={args.train_steps}", "eval.every=0", "eval.final_episodes=0", "eval.videos=0",
                 "overwrite=true"], env)
            times["train_s"] = time.perf_counter() - t
            ckpt = folder / "run"
        t = time.perf_counter()
        evaluated = run([ROBOPOLICY, "eval", f"ckpt={ckpt}", f"task={task}", f"episodes={args.episodes}",
                         "num_envs=2", f"out={folder / 'eval'}"], env)
        times["eval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with TwinProcess(ROOT / ".venv" / "bin" / "python", folder, task=task) as twin:
            settings = [f"robot.port={twin.port}", "robot.id=so100_twin",
                        f"robot.calibration_dir={twin.calibration_dir}", f"robot.scene={twin.scene}",
                        "control.control_hz=10", f"episodes={args.episodes}", "control.max_episode_s=8",
                        "overwrite=true"]
            if not args.robot_computer:  # one command: the robot side goes to LeRobot's virtualenv by itself
                deployed = run([ROBOPOLICY, "deploy", "robot=so100", f"ckpt={ckpt}",
                                f"out={folder / 'twin_deploy'}", *settings], env)
            else:
                server, address = serve(ckpt, env)
                try:
                    deployed = run([str(LEROBOT_PYTHON), "-m", "real.robot", "--robot", "so100", "--server",
                                    address, "--out", str(folder / "twin_deploy"), *settings], env)
                finally:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait(timeout=30)
        times["twin_deploy_s"] = time.perf_counter() - t
    result = {
        "task": task, "episodes": args.episodes,
        "eval_success_rate": evaluated["success_rate"], "eval_success_ci95": evaluated["success_ci95"],
        "twin_success_rate": deployed["success_rate"], "twin_success_ci95": deployed["success_ci95"],
        "difference_points": round(100 * (deployed["success_rate"] - evaluated["success_rate"]), 1),
        "twin_counts": deployed.get("counts", {}),
        "twin_via": "serve + python -m real.robot" if args.robot_computer else "robopolicy deploy robot=so100",
        **{k: round(v, 1) for k, v in times.items()},
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    out = Path(args.out or ROOT / f"benchmarks/results/{task.removeprefix('builtin/')}_rehearsal.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
