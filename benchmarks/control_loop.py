"""Control-loop timing: period jitter at 50 Hz while inference runs concurrently, and observation-to-command latency.

    .venv/bin/python benchmarks/control_loop.py --seconds 20

The node drives the simulated robot (builtin/pick_place, its own process, state observations) in `ensemble` mode,
which asks for a new chunk every action step, so inference runs all the time. The policy is the shipped flow
config with random weights (timing does not depend on the weights), side by side:
  process: served from a child process (the deploy default; its Python work is off the loop's GIL)
  thread:  in a thread of the loop's own process
Reported in ms: tick lateness (actual - scheduled start of each period; the target is p99 < 1 ms on 2 cores),
obs-to-command (capture of the observation a chunk was computed from -> first command sent from that chunk) and
inference latency. Prints one JSON object as the last line and writes benchmarks/results/control_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from real.host.deploy import ServerProcess
from real.host.local_inference import LocalInference
from real.robot.control_node import ControlConfig, ControlNode, RemoteInference
from real.robot.deployment import summarize
from real.robot.sim_robot import SimRobot
from robopolicy.checkpoint import save_checkpoint
from robopolicy.loading import load_policy
from robopolicy.policies import make_policy

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, state_dim: int, action_dim: int) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/policy/flow.yaml").read_text())
    features = {"observation.state": {"dtype": "float32", "shape": [state_dim], "names": None},
                "action": {"dtype": "float32", "shape": [action_dim], "names": None}}
    stats = {k: {s: np.full(v["shape"], x, np.float32) for s, x in
                 {"mean": 0, "std": 1, "min": -1, "max": 1, "q01": -1, "q99": 1}.items()} for k, v in features.items()}
    torch.manual_seed(0)
    return save_checkpoint(folder / "ckpt", make_policy(cfg, features, stats), config={"policy": cfg})


def run(robot: SimRobot, backend, hz: float, seconds: float) -> dict:
    node = ControlNode(robot, backend, ControlConfig(control_hz=hz, mode="ensemble", max_episode_s=seconds))
    try:
        result = node.run_episode(seed=0)
    finally:
        node.close()
    summary = summarize([result], node.cfg)
    return {k: summary[k] for k in ("tick_lateness_ms", "obs_to_command_ms", "inference_latency_ms")} | {
        "chunks": result.counts["chunks"], "missed_ticks": result.counts["missed_ticks"],
        "chunks_per_s": round(result.counts["chunks"] / result.duration_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hz", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/control_loop.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, SimRobot("builtin/pick_place", control_hz=args.hz) as robot:
        state_dim = robot.observation_features["observation.state"]["shape"][0]
        ckpt = make_checkpoint(Path(tmp), state_dim, robot.action_features["action"]["shape"][0])
        server = ServerProcess(ckpt, threads=1)
        try:
            backend = RemoteInference(server.address, token=server.token)
            results["process"] = run(robot, backend, args.hz, args.seconds)
            backend.close()
        finally:
            server.close()
        results["thread"] = run(robot, LocalInference(load_policy(ckpt)), args.hz, args.seconds)
    report = {
        "benchmark": "control_loop", "control_hz": args.hz, "seconds_per_case": args.seconds, "mode": "ensemble",
        "policy": "flow (configs/policy/flow.yaml, random weights, 1 torch thread)", "cases": results,
        "target": "tick lateness p99 < 1 ms", "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
        "python": platform.python_version(), "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
