"""`robopolicy deploy robot=so100|so101|koch` from the project's environment: LeRobot's driver imports only in
LeRobot's virtualenv, so the robot side runs there (`python -m real.robot`) with every setting of the run. The
end-to-end path on the SO-100 twin is tests/test_so100_rehearsal.py; here, the settings' round trip and errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from real.host.deploy import robot_side_overrides
from real.robot.__main__ import settings_from
from real.robot.deployment import deploy_config
from robopolicy.config import config_class, defaults, to_dict


def so100_settings(**robot) -> dict:
    section = {"_target_": config_class("robot", "so100").target, **defaults(config_class("robot", "so100")),
               "control_hz": 10.0, **robot}
    return {"ckpt": "runs/x", "out": "runs/deploy", "episodes": 7, "seed": 5, "instruction": "pick it up",
            "control": {"mode": "rtc", "control_hz": 10.0, "expected_latency_s": 0.05},
            "intervention": {"enabled": True, "device": "leader", "leader": {"port": "/dev/pts/9", "id": "007"}},
            "robot": section}


def test_the_robot_side_gets_every_setting_of_the_run():
    config, section = deploy_config(so100_settings(port="/dev/pts/3", id="123", scene="127.0.0.1:4000"))
    args = argparse.Namespace(server="127.0.0.1:5555", token=None, out="runs/deploy", robot="so100",
                              overrides=robot_side_overrides(config, section))
    there, there_section = deploy_config(settings_from(args))
    mine = {k: v for k, v in to_dict(config).items() if k not in ("ckpt", "server", "token")}
    theirs = {k: v for k, v in to_dict(there).items() if k not in ("ckpt", "server", "token")}
    assert theirs == mine
    assert there_section == section  # "123" and "007" stay strings, null stays null
    assert there.intervention.leader.id == "007" and there_section["id"] == "123"


def test_a_missing_lerobot_env_is_one_sentence_and_nothing_is_written(tmp_path):
    out = tmp_path / "deploy"
    proc = subprocess.run([sys.executable, "-m", "robopolicy.cli", "deploy", "robot=so100", "server=127.0.0.1:9",
                           f"out={out}"], capture_output=True, text=True, timeout=120,
                          env={"ROBOPOLICY_LEROBOT_PYTHON": str(tmp_path / "no_python"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "ROBOPOLICY_LEROBOT_PYTHON" in proc.stderr and "make lerobot-env" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
