"""Entry points of `robopolicy serve` and `robopolicy deploy` (the workstation side of the robot stack).

serve(ckpt_dir, host, port, token)   load a checkpoint and answer `real.robot.protocol` requests until SIGTERM/SIGINT
deploy(cfg)                          run N episodes on the configured robot with a local or remote policy, record
                                     them to <out>/episodes and write <out>/summary.json (`real.robot.deployment`)

A local checkpoint is served from a child process by default (`inference: process`): the policy's Python work
then never competes with the control loop for the GIL, which is what keeps the loop's period jitter under a
millisecond. `inference: thread` runs it in a thread of the node's process instead. The robot computer's own
entry point, without hydra or torch, is `python -m real.robot` (real/robot/__main__.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from real.robot.deployment import (
    DeployConfig,
    DeployError,
    deploy_config,
    human_teleop,
    make_robot,
    parse_value,
    robot_config_class,
    run_episodes,
)
from robopolicy.config import CONFIGS, register_config, setting, to_dict

REPO_ROOT = Path(__file__).resolve().parents[2]


@register_config("command", "serve")
@dataclass(kw_only=True)  # `out` / `ckpt` have no default and may come in any order
class ServeConfig:
    """configs/serve.yaml."""

    ckpt: str = setting(doc="a checkpoint folder (or a training run folder)")
    host: str = setting("127.0.0.1", "anything but loopback requires a token")
    port: int = setting(5555, "TCP port (0: a free one)")
    token: str | None = setting(None, "a shared secret every request must carry")
    fps: float | None = setting(None, "the rate the policy's actions are meant for (sent in the hello reply)")
    threads: int | None = setting(None, "torch CPU threads; null: torch's default")


# ======================================================================================================= serve


def serve(ckpt_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 5555, token: str | None = None, *,
          fps: float | None = None, threads: int | None = None, on_ready: Any = None) -> None:
    """Serve a checkpoint until SIGTERM / SIGINT (or KeyboardInterrupt). `on_ready(address)` is called once bound."""
    import torch

    from real.host.server import PolicyServer
    from robopolicy.checkpoint import resolve_checkpoint
    from robopolicy.loading import load_policy

    if threads:
        torch.set_num_threads(int(threads))
    policy = load_policy(resolve_checkpoint(ckpt_dir))
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
        cmd = [sys.executable, "-m", "real.host.deploy", "--ckpt", str(ckpt_dir), "--threads", str(threads),
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


def make_backend(config: DeployConfig, closers: list) -> Any:
    """The inference backend the config asks for: server=HOST:PORT, or ckpt= in a child process or a thread."""
    from real.host.local_inference import LocalInference
    from real.robot.control_node import RemoteInference

    inject, timeout = config.inject_latency_s, config.inference_timeout_s
    if config.server:
        backend = RemoteInference(config.server, token=config.token, timeout_s=timeout, extra_latency_s=inject)
    elif config.ckpt:
        from robopolicy.checkpoint import resolve_checkpoint

        ckpt = resolve_checkpoint(config.ckpt)
        if config.inference == "process":
            server = ServerProcess(ckpt, threads=config.policy_threads)
            closers.append(server.close)
            backend = RemoteInference(server.address, token=server.token, timeout_s=timeout, extra_latency_s=inject)
        else:
            from robopolicy.loading import load_policy

            backend = LocalInference(load_policy(ckpt), extra_latency_s=inject)
    else:
        raise DeployError("`robopolicy deploy` needs ckpt=CHECKPOINT or server=HOST:PORT.")
    closers.append(backend.close)
    return backend


def deploy(cfg: Any) -> dict:
    """Run `cfg.episodes` episodes on `cfg.robot` with the configured policy; returns (and writes) the summary.
    `cfg`: the composed configs/deploy.yaml (a DictConfig or plain mapping), validated here once."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    config, robot_section = deploy_config(cfg)
    config.check_out()
    robot_cls = robot_config_class(str(robot_section.get("_target_", "")))
    if getattr(robot_cls, "driver_env", None) == "lerobot" and importlib.util.find_spec("lerobot") is None:
        return deploy_from_lerobot_env(config, robot_section)
    closers: list = []
    try:
        backend = make_backend(config, closers)
        robot = make_robot(robot_section, backend.features, config.control.control_hz)
        robot.connect()
        closers.insert(0, robot.disconnect)  # disconnect (and stop) the robot first
        iv = config.intervention
        teleop = human_teleop(iv, robot)  # keyboard or leader arm
        if teleop is not None:
            teleop.connect()
            closers.insert(0, teleop.disconnect)
        elif iv.enabled:
            from real.host.teleop import ScriptedIntervener

            teleop = ScriptedIntervener(robot, str(robot_section["task"]), stall_s=iv.stall_s,
                                        stall_distance=iv.stall_distance, takeover_s=iv.takeover_s,
                                        patience_s=iv.patience_s, seed=config.seed)
            teleop.connect()
            closers.insert(0, teleop.disconnect)
        return run_episodes(config, robot, backend, teleop)
    finally:
        for close in closers:
            try:
                close()
            except Exception as exc:  # keep closing the rest: the robot must be released
                print(f"warning: cleanup step failed: {exc}", file=sys.stderr)


# ==================================================================== a robot whose driver lives in another env


def lerobot_python() -> Path:
    """The interpreter of LeRobot's virtualenv: $ROBOPOLICY_LEROBOT_PYTHON, or .venv-lerobot in the working folder
    or beside this package (what `make lerobot-env` builds)."""
    if os.environ.get("ROBOPOLICY_LEROBOT_PYTHON"):
        return Path(os.environ["ROBOPOLICY_LEROBOT_PYTHON"])
    for root in (Path.cwd(), REPO_ROOT):
        if (root / ".venv-lerobot" / "bin" / "python").exists():
            return root / ".venv-lerobot" / "bin" / "python"
    raise DeployError("This robot runs LeRobot's driver, which imports only in LeRobot's virtualenv (it pins its own "
                      "torch): build it with `make lerobot-env` or point ROBOPOLICY_LEROBOT_PYTHON at its python.")


def robot_side_overrides(config: DeployConfig, robot_section: Mapping[str, Any]) -> list[str]:
    """Every setting of this run as the robot computer's `key=value` overrides (`python -m real.robot`)."""
    settings = to_dict(config)
    for key in ("ckpt", "server", "token", "inference", "policy_threads", "out"):
        settings.pop(key)
    settings["robot"] = {k: v for k, v in robot_section.items() if k != "_target_"}

    def text(value: Any) -> str:
        if isinstance(value, str) and parse_value(value) == value:
            return value
        return json.dumps(value)

    def flatten(prefix: str, section: Mapping[str, Any]) -> list[str]:
        items = []
        for key, value in section.items():
            if isinstance(value, Mapping):
                items += flatten(f"{prefix}{key}.", value)
            else:
                items.append(f"{prefix}{key}={text(value)}")
        return items

    return flatten("", settings)


def deploy_from_lerobot_env(config: DeployConfig, robot_section: Mapping[str, Any]) -> dict:
    """The same run with the robot side (`python -m real.robot`) in LeRobot's virtualenv, the policy served from
    this one (a child process on loopback with a random token, or `server=`); keys go to the child's terminal."""
    python = lerobot_python()
    if not python.exists():
        raise DeployError(f"ROBOPOLICY_LEROBOT_PYTHON={python} does not exist; build LeRobot's virtualenv with "
                          "`make lerobot-env`.")
    name = next(n for (group, n), cls in CONFIGS.items()
                if group == "robot" and cls.target == robot_section["_target_"])
    closers: list = []
    try:
        if config.server:
            address, token = config.server, config.token
        elif config.ckpt:
            from robopolicy.checkpoint import resolve_checkpoint

            server = ServerProcess(resolve_checkpoint(config.ckpt), threads=config.policy_threads)
            closers.append(server.close)
            address, token = server.address, server.token
        else:
            raise DeployError("`robopolicy deploy` needs ckpt=CHECKPOINT or server=HOST:PORT.")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT),
                                                                        os.environ.get("PYTHONPATH")) if p)}
        if token:
            env["ROBOPOLICY_SERVE_TOKEN"] = token
        cmd = [str(python), "-m", "real.robot", "--robot", name, "--server", address, "--out", str(config.out),
               *robot_side_overrides(config, robot_section)]
        print(f"robot={name} runs LeRobot's driver in {python.parent.parent}: python -m real.robot --robot {name} "
              f"--server {address} ...", file=sys.stderr)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise DeployError(f"The robot side in LeRobot's virtualenv exited with code {proc.returncode} (its "
                              "error is printed above).")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        summary.pop("command", None)
        return summary
    finally:
        for close in closers:
            close()


def _main() -> None:
    """`python -m real.host.deploy --ckpt DIR`: the child process of `ServerProcess` (token from the environment)."""
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

__all__ = ["DeployError", "ServeConfig", "ServerProcess", "deploy", "make_backend", "serve"]
