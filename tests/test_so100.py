"""The SO-100 through LeRobot's unmodified driver on the twin, run in LeRobot's virtualenv (where LeRobot's robot
classes import): tests/test_so100_lerobot.py (driver files as installed, commanded vs measured within one servo
tick, limits from the calibration) and the conformance suite's so100 case (tests/test_robot_conformance.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEROBOT_PYTHON = ROOT / ".venv-lerobot" / "bin" / "python"


@pytest.mark.parametrize("tests", ["tests/test_so100_lerobot.py", "tests/test_robot_conformance.py"])
def test_so100_in_lerobots_env(tests):
    if not LEROBOT_PYTHON.exists():
        if os.environ.get("ROBOPOLICY_SKIP_LEROBOT") == "1":
            pytest.skip("ROBOPOLICY_SKIP_LEROBOT=1 and .venv-lerobot is missing")
        pytest.fail(f"{LEROBOT_PYTHON} is missing: build it with `make lerobot-env` (or set ROBOPOLICY_SKIP_LEROBOT=1).")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    select = ["-k", "so100"] if "conformance" in tests else []
    proc = subprocess.run([str(LEROBOT_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, tests],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and " skipped" not in out, out[-2000:]  # nothing skipped: LeRobot's driver ran
