"""LeRobot's unmodified SO100Follower drives the SO-100 twin through its pty, behind our `Robot` contract.

Runs in LeRobot's virtualenv (`tests/test_so100.py` runs this file there from `make test`); the twin runs in a
child process on the project's interpreter (it has MuJoCo). Elsewhere these tests skip."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot.robots.so_follower", reason="runs in LeRobot's virtualenv (tests/test_so100.py)")

from real.host.feetech_twin import TwinProcess  # noqa: E402
from real.robot.lerobot_arm import MAX_RES, MOTORS, LeRobotArmError, SO100Arm  # noqa: E402
from real.robot.safety import SafetyFilter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MUJOCO_PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    with TwinProcess(MUJOCO_PYTHON, tmp_path_factory.mktemp("twin")) as twin:
        yield twin


def test_lerobot_driver_code_is_unmodified():
    """Every file of LeRobot's SO follower, motor buses and Feetech SDK hashes as pip installed it."""
    checked = 0
    for dist_name, prefixes in [("lerobot", ("lerobot/robots/so_follower/", "lerobot/motors/")),
                                ("feetech-servo-sdk", ("scservo_sdk/",))]:
        dist = importlib.metadata.distribution(dist_name)
        for path, digest, _ in csv.reader(dist.read_text("RECORD").splitlines()):
            if path.startswith(prefixes) and path.endswith(".py") and digest:
                algo, expected = digest.split("=", 1)
                actual = hashlib.new(algo, Path(dist.locate_file(path)).read_bytes()).digest()
                assert base64.urlsafe_b64encode(actual).rstrip(b"=").decode() == expected, path
                checked += 1
    assert checked >= 8


def test_commanded_and_measured_joint_positions_agree_within_one_servo_tick(twin):
    with SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir)) as robot:
        cal = robot.calibration
        tick = np.array([360.0 / MAX_RES] * 5 + [100.0 / (cal["gripper"]["range_max"] - cal["gripper"]["range_min"])])
        lo, hi = robot.limits.command_bounds()
        rng = np.random.default_rng(0)
        for _ in range(4):
            target = rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo))
            safety = SafetyFilter(robot.limits)
            safety.reset(robot.command_state())
            for _ in range(200):  # ramp there within the safety limits, at the control rate
                safe, _ = safety.filter(target)
                sent = robot.send_action(safe)
                time.sleep(robot.limits.control_period_s)
                if np.allclose(safe, target):
                    break
            assert np.allclose(sent, target)
            time.sleep(1.0)  # let the servos settle
            measured = robot.get_observation()["observation.state"].astype(np.float64)
            # LeRobot writes int(value * 4095 / 360 + mid) ticks: the servo can only reach that tick
            assert (np.abs(measured - sent) <= tick + 1e-6).all(), (measured - sent, tick)


def test_limits_come_from_the_calibration_and_bad_settings_fail_clearly(twin, tmp_path):
    robot = SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir))
    cal = robot.calibration["elbow_flex"]
    half = (cal["range_max"] - cal["range_min"]) / 2 * 360 / MAX_RES
    assert robot.limits.position_upper[2] == pytest.approx(half - 2.0)
    assert robot.action_features["action"]["names"] == [f"{m}.pos" for m in MOTORS]
    with pytest.raises(LeRobotArmError, match="No LeRobot calibration file"):
        SO100Arm(port=twin.port, id="nobody", calibration_dir=str(tmp_path))
    with pytest.raises(LeRobotArmError, match="Cannot connect"):
        SO100Arm(port=str(tmp_path / "no_such_port"), id="so100_twin",
                 calibration_dir=str(twin.calibration_dir)).connect()


def test_hold_and_stop_keep_the_arm_where_it_is(twin):
    with SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir)) as robot:
        robot.stop()
        time.sleep(0.5)
        before = robot.command_state()
        time.sleep(0.5)
        after = robot.command_state()
        assert np.abs(after - before).max() <= 2 * 360 / MAX_RES  # held against gravity, torque on


# builtin/so100_touch's touching pose (sim/builtin/so100_touch.py TOUCH_POSE; this env has no MuJoCo to import it)
TOUCH_POSE = np.array([35.0, 25.0, -30.0, 30.0, 0.0, 20.0])


def test_scene_channel_resets_by_seed_and_reports_success_through_the_adapter(tmp_path_factory):
    """robot.scene= (rehearsal only): reset(seed) places the task's start pose, status is the task's success."""
    with TwinProcess(MUJOCO_PYTHON, tmp_path_factory.mktemp("scene"), task="builtin/so100_touch") as twin, \
            SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir),
                     scene=twin.scene) as robot:
        first = robot.reset(seed=3)["observation.state"]
        assert robot.status == {"success": False, "truncated": False}
        robot.reset(seed=4)
        assert np.abs(robot.reset(seed=3)["observation.state"] - first).max() <= 2 * 360 / MAX_RES
        safety = SafetyFilter(robot.limits)
        safety.reset(robot.command_state())
        for _ in range(60):
            robot.send_action(safety.filter(TOUCH_POSE)[0])
            time.sleep(robot.limits.control_period_s)
            if robot.status["success"]:
                break
        assert robot.status["success"]
