"""The robot side in a virtualenv of its own (`make robot-env`: pyproject's `real` extra, the package with
--no-deps): no torch, no MuJoCo, yet it deploys against a policy server and a simulated arm that run in the main
virtualenv on loopback, as a robot computer would against a workstation and a real arm's network API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROBOPOLICY, ROOT
from test_serve_deploy_cli import TASK, make_checkpoint

from robopolicy.data import DemoStore, validate_store

ROBOT_PYTHON = ROOT / ".venv-robot" / "bin" / "python"


@pytest.fixture(scope="module")
def robot_python():
    """The robot virtualenv's python (built by `make robot-env` when missing)."""
    if not (ROOT / ".venv-robot" / ".installed").exists():
        subprocess.run(["make", "-s", "robot-env"], cwd=ROOT, check=True, timeout=600)
    return str(ROBOT_PYTHON)


def robot_env() -> dict:
    """The environment of a process on the robot computer: nothing of the main virtualenv on its path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def start(cmd: list[str], pattern: str, stream: str) -> tuple[subprocess.Popen, str]:
    """Start a main-venv process and wait for the address it announces on `stream`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = getattr(proc, stream).readline()
        if match := re.search(pattern, line):
            return proc, match.group(1)
        assert proc.poll() is None, f"{cmd[:3]} exited before listening"
    raise AssertionError(f"{cmd[:3]} never announced its address")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_robot_env_has_no_torch_no_mujoco_no_hydra(robot_python):
    for module in ("torch", "mujoco", "hydra"):
        proc = subprocess.run([robot_python, "-c", f"import {module}"], capture_output=True, text=True,
                              env=robot_env(), cwd="/")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module


def test_deploy_from_the_robot_env_against_a_server_and_an_arm_on_loopback(robot_python, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    server, address = start([ROBOPOLICY, "serve", f"ckpt={ckpt}", "port=0", "token=secret"],
                            r"on (127\.0\.0\.1:\d+)", "stderr")
    try:
        arm, arm_json = start([sys.executable, "-m", "real.host.sim_arm", "--port", "0"], r"(\{.*\})", "stdout")
        try:
            arm_address = ":".join(map(str, json.loads(arm_json)["address"]))
            proc = subprocess.run(
                [robot_python, "-m", "real.robot", "--server", address, "--token", "secret",
                 "--out", str(tmp_path / "deploy"), "episodes=2", "control.max_episode_s=3", f"task={TASK}",
                 f"robot.address={arm_address}"],
                capture_output=True, text=True, timeout=300, env=robot_env(), cwd="/")
            # a bad setting is one sentence and exit code 2
            bad = subprocess.run([robot_python, "-m", "real.robot", "--server", address, "--out",
                                  str(tmp_path / "bad"), "control.mode=fast"],
                                 capture_output=True, text=True, timeout=60, env=robot_env(), cwd="/")
        finally:
            stop(arm)
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2 and summary["counts"]["chunks"] > 0
    assert validate_store(tmp_path / "deploy" / "episodes") == []
    with DemoStore.open(tmp_path / "deploy" / "episodes") as store:
        assert [e["extra"]["seed"] for e in store.episodes] == [100000, 100001]
    assert bad.returncode == 2 and "control.mode='fast' is unknown" in bad.stderr and "Traceback" not in bad.stderr
