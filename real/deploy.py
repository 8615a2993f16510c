"""Entry points of `robopolicy serve` and `robopolicy deploy` (the workstation side of the robot stack).

serve(ckpt_dir, host, port, token)   load a checkpoint and answer `real.protocol` requests until SIGTERM/SIGINT
deploy(cfg)                          run N episodes on the configured robot with a local or remote policy, record
                                     them to <out>/episodes and write <out>/summary.json

A local checkpoint is served from a child process by default (`inference: process`): the policy's Python work
then never competes with the control loop for the GIL, which is what keeps the loop's period jitter under a
millisecond. `inference: thread` runs it in a thread of the node's process instead.

Policies are served with prefix-preserving sampling where they support it
(`robopolicy.policies.inpainting`), for the control node's real-time chunking mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np


class DeployError(ValueError):
    """A deployment setting that cannot work (one sentence naming it)."""


# ======================================================================================================= serve


def serve(ckpt_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 5555, token: str | None = None, *,
          fps: float | None = None, threads: int | None = None, on_ready: Any = None) -> None:
    """Serve a checkpoint until SIGTERM / SIGINT (or KeyboardInterrupt). `on_ready(address)` is called once bound."""
    import torch

    from real.server import PolicyServer
    from robopolicy.checkpoint import load_policy
    from robopolicy.policies.inpainting import servable_policy

    if threads:
        torch.set_num_threads(int(threads))
    policy = servable_policy(load_policy(ckpt_dir))
    server = PolicyServer(policy, host=host, port=int(port), token=token, fps=fps)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        if on_ready is not None:
            on_ready(server.address)
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerProcess:
    """`serve` in a child process on loopback with a random token (a local checkpoint, off the node's GIL)."""

    def __init__(self, ckpt_dir: str | os.PathLike, *, port: int = 0, token: str | None = None, threads: int = 1,
                 fps: float | None = None, start_timeout_s: float = 120.0) -> None:
        self.token = token or secrets.token_hex(16)
        cmd = [sys.executable, "-m", "real.deploy", "--ckpt", str(ckpt_dir), "--threads", str(threads),
               "--port", str(port)]
        if fps:
            cmd += ["--fps", str(fps)]
        env = {**os.environ, "ROBOPOLICY_SERVE_TOKEN": self.token, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
        line = self.proc.stdout.readline()  # the child prints its bound address once it listens
        if not line:
            code = self.proc.wait(timeout=start_timeout_s)
            raise DeployError(f"The policy server for {ckpt_dir} exited with code {code} before listening.")
        host, port = json.loads(line)["address"]
        self.address = f"{host}:{port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ====================================================================================================== deploy


def _plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _percentiles(values: list[float], scale: float = 1e3) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values) * scale
    return {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3),
            "max": round(float(v.max()), 3), "n": int(v.size)}


def make_backend(cfg: Any, closers: list) -> Any:
    """The inference backend `cfg` asks for: server=HOST:PORT, or ckpt= in a child process or a thread."""
    from real.control_node import LocalInference, RemoteInference

    inject = float(cfg.get("inject_latency_s") or 0.0)
    timeout = float(cfg.get("inference_timeout_s") or 1.0)
    if cfg.get("server"):
        if cfg.get("ckpt"):
            raise DeployError("Pass either ckpt=... (a local policy) or server=HOST:PORT, not both.")
        backend = RemoteInference(str(cfg.server), token=cfg.get("token"), timeout_s=timeout,
                                  extra_latency_s=inject)
    elif cfg.get("ckpt"):
        ckpt = Path(str(cfg.ckpt))
        if not (ckpt / "features.json").is_file() and (ckpt / "checkpoints" / "last").is_dir():
            ckpt = ckpt / "checkpoints" / "last"  # a training run folder
        if not (ckpt / "features.json").is_file():
            raise DeployError(f"No checkpoint at {cfg.ckpt}: pass a checkpoint folder or a training run folder.")
        if cfg.get("inference", "process") == "process":
            server = ServerProcess(ckpt, threads=int(cfg.get("policy_threads") or 1))
            closers.append(server.close)
            backend = RemoteInference(server.address, token=server.token, timeout_s=timeout, extra_latency_s=inject)
        else:
            from robopolicy.checkpoint import load_policy
            from robopolicy.policies.inpainting import servable_policy

            backend = LocalInference(servable_policy(load_policy(ckpt)), extra_latency_s=inject)
    else:
        raise DeployError("`robopolicy deploy` needs ckpt=CHECKPOINT or server=HOST:PORT.")
    closers.append(backend.close)
    return backend


def make_robot(robot_cfg: Any, backend: Any, control_hz: float) -> Any:
    """Instantiate the robot config (`_target_` + keyword arguments); `images: auto` takes the policy's cameras."""
    from hydra.utils import instantiate

    kwargs = dict(_plain(robot_cfg))
    if kwargs.get("images") == "auto":
        prefix = "observation.images."
        kwargs["images"] = sorted(k[len(prefix):] for k in backend.features if k.startswith(prefix)) or False
    if "control_hz" in kwargs and kwargs["control_hz"] is None:
        kwargs["control_hz"] = control_hz
    return instantiate(kwargs)


def deploy(cfg: Any) -> dict:
    """Run `cfg.episodes` episodes on `cfg.robot` with the configured policy; returns (and writes) the summary."""
    from real.control_node import ControlConfig, ControlNode
    from real.recording import EpisodeRecorder
    from real.watchdog import Watchdog
    from robopolicy.data import validate_store

    out = Path(str(cfg.out))
    summary_path = out / "summary.json"
    if summary_path.exists() and not cfg.get("overwrite", False):
        raise DeployError(f"{summary_path} exists; choose another out=... or pass overwrite=true.")
    control = ControlConfig(**_plain(cfg.control))
    closers: list = []
    results = []
    try:
        backend = make_backend(cfg, closers)
        robot = make_robot(cfg.robot, backend, control.control_hz)
        robot.connect()
        closers.insert(0, robot.disconnect)  # disconnect (and stop) the robot first
        recorder = None
        if cfg.get("record", True):
            fps = max(1, round(control.control_hz))
            recorder = EpisodeRecorder(out / "episodes", robot.observation_features, robot.action_features["action"],
                                       fps, overwrite=bool(cfg.get("overwrite", False)),
                                       info={"robot": type(robot).__name__, "mode": control.mode})
            closers.insert(1, recorder.close)
        teleop = None
        if cfg.get("intervention", {}).get("enabled", False):
            from real.teleop import ScriptedIntervener

            iv = cfg.intervention
            teleop = ScriptedIntervener(robot, str(cfg.robot.task), stall_s=float(iv.stall_s),
                                        takeover_s=float(iv.takeover_s), seed=int(cfg.seed))
            teleop.connect()
            closers.insert(0, teleop.disconnect)
        watchdog = Watchdog(1.0 / control.control_hz, control.hold_after, control.stop_after)
        node = ControlNode(robot, backend, control, recorder=recorder, teleop=teleop, watchdog=watchdog,
                           task=getattr(robot, "task_description", ""))
        closers.insert(0, node.close)
        in_main = threading.current_thread() is threading.main_thread()
        with watchdog.signal_estop() if in_main else contextlib.nullcontext():
            for i in range(int(cfg.episodes)):
                result = node.run_episode(seed=int(cfg.seed) + i)
                results.append(result)
                print(f"episode {i}: success={result.success} ticks={result.ticks} "
                      f"chunks={result.counts['chunks']} clamped={result.counts['clamped_ticks']}", file=sys.stderr)
                if result.aborted:
                    break
    finally:
        for close in closers:
            try:
                close()
            except Exception as exc:  # keep closing the rest: the robot must be released
                print(f"warning: cleanup step failed: {exc}", file=sys.stderr)
    summary = summarize(results, control)
    if cfg.get("record", True):
        summary["store"] = str(out / "episodes")
        summary["store_problems"] = validate_store(out / "episodes")
    summary["summary_path"] = str(summary_path)
    out.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def summarize(results: list, control: Any) -> dict:
    """Success rate with its Wilson interval, timing percentiles (ms) and safety / fault counts over episodes."""
    from robopolicy.metrics import success_summary

    summary: dict[str, Any] = success_summary([r.success for r in results])
    totals: dict[str, int] = {}
    for r in results:
        for key, value in r.counts.items():
            totals[key] = totals.get(key, 0) + value
    summary.update(
        mode=control.mode,
        control_hz=control.control_hz,
        aborted=next((r.aborted for r in results if r.aborted), None),
        interventions=sum(r.intervention for r in results),
        tick_lateness_ms=_percentiles([x for r in results for x in r.tick_lateness_s]),
        obs_to_command_ms=_percentiles([x for r in results for x in r.obs_to_command_s]),
        inference_latency_ms=_percentiles([x for r in results for x in r.inference_latency_s]),
        counts=totals,
        per_episode=[{"success": r.success, "ticks": r.ticks, "seconds": round(r.duration_s, 2),
                      "intervention": r.intervention, "aborted": r.aborted} for r in results],
    )
    return summary


def _main() -> None:
    """`python -m real.deploy --ckpt DIR`: the child process of `ServerProcess` (token from the environment)."""
    parser = argparse.ArgumentParser(description="Serve a checkpoint on loopback; prints its address as JSON.")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fps", type=float, default=None)
    args = parser.parse_args()

    def announce(address: tuple[str, int]) -> None:
        sys.stdout.write(json.dumps({"address": list(address)}) + "\n")
        sys.stdout.flush()

    serve(args.ckpt, "127.0.0.1", args.port, os.environ.get("ROBOPOLICY_SERVE_TOKEN"), fps=args.fps,
          threads=args.threads, on_ready=announce)


if __name__ == "__main__":
    _main()

__all__ = ["DeployError", "ServerProcess", "deploy", "make_backend", "make_robot", "serve", "summarize"]
