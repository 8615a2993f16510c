"""LeRobot's unmodified SO100Follower drives the SO-100 twin through its pty, behind our `Robot` contract.

Runs in LeRobot's virtualenv (`tests/test_so100.py` runs this file there from `make test`); the twin runs in a
child process on the project's interpreter (it has MuJoCo). Elsewhere these tests skip."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

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


# ------------------------------------------------------------------------------ LeRobot's leader arm, on a twin
def hold(channel: str, pose) -> None:
    """A person's hand holds the leader twin's joints at `pose` (LeRobot units); None lets go."""
    import json
    import socket

    host, _, port = channel.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5.0) as sock, sock.makefile("rwb") as f:
        f.write(json.dumps({"cmd": "release"} if pose is None else
                           {"cmd": "hold", "lerobot": [float(v) for v in pose]}).encode() + b"\n")
        f.flush()
        assert json.loads(f.readline()) == {"ok": True}


@pytest.fixture(scope="module")
def leader_twin(tmp_path_factory):
    """A second twin playing the leader arm (its torque off, held by a hand through the side channel)."""
    with TwinProcess(MUJOCO_PYTHON, tmp_path_factory.mktemp("leader"), robot_id="so100_leader_twin",
                     channel=True) as twin:
        yield twin


def test_leader_driver_code_is_unmodified():
    dist = importlib.metadata.distribution("lerobot")
    checked = 0
    for path, digest, _ in csv.reader(dist.read_text("RECORD").splitlines()):
        if path.startswith("lerobot/teleoperators/so_leader/") and path.endswith(".py") and digest:
            algo, expected = digest.split("=", 1)
            actual = hashlib.new(algo, Path(dist.locate_file(path)).read_bytes()).digest()
            assert base64.urlsafe_b64encode(actual).rstrip(b"=").decode() == expected, path
            checked += 1
    assert checked >= 2


def test_leader_arm_reads_the_hand_held_pose_only_while_the_pedal_is_down(twin, leader_twin):
    """LeRobot's SO100Leader on the leader twin, behind our Teleoperator: space takes over, the action is the leader's
    pose in the follower's units (within one encoder tick), space releases, y marks a success."""
    from real.robot.lerobot_teleop import LeaderArm, LeaderConfig

    read_fd, write_fd = os.pipe()
    with SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir)) as follower:
        leader = LeaderArm(follower, LeaderConfig(port=leader_twin.port, id="so100_leader_twin",
                                                  calibration_dir=str(leader_twin.calibration_dir)), fd=read_fd)
        cal = leader.calibration
        tick = np.array([360.0 / MAX_RES] * 5 + [100.0 / (cal["gripper"]["range_max"] - cal["gripper"]["range_min"])])
        with leader:
            pose = np.array([20.0, -15.0, 25.0, 10.0, -30.0, 40.0])
            hold(leader_twin.scene, pose)
            assert leader.get_action() is None and not leader.is_intervening
            os.write(write_fd, b" ")
            assert wait_until(lambda: leader.is_intervening)
            assert np.abs(leader.get_action() - pose).max() <= tick.max() + 1e-6
            moved = pose + np.array([-10.0, 12.0, -8.0, 5.0, 15.0, -20.0])
            hold(leader_twin.scene, moved)
            time.sleep(0.1)
            assert (np.abs(leader.get_action() - moved) <= tick + 1e-6).all()
            os.write(write_fd, b" ")
            assert wait_until(lambda: not leader.is_intervening)
            assert leader.get_action() is None
            os.write(write_fd, b"y")
            assert wait_until(lambda: leader.outcome is True)
            leader.reset()
            assert leader.outcome is None
            hold(leader_twin.scene, None)
    os.close(write_fd)
    os.close(read_fd)


def test_a_takeover_with_the_leader_moves_the_follower_through_the_control_node(twin, leader_twin, tmp_path):
    """The control node on the follower twin, a policy holding still, the leader held at a pose and the pedal down:
    the follower goes to the leader's pose within its safety limits and the recording marks the takeover."""
    from real.robot.control_node import ControlConfig, ControlNode
    from real.robot.lerobot_teleop import LeaderArm, LeaderConfig
    from real.robot.recording import EpisodeRecorder
    from real.robot.watchdog import Watchdog
    from robopolicy.data import DemoStore

    class Still:  # an InferenceBackend whose chunks hold the follower where the episode began
        n_obs_steps, horizon, n_action_steps, supports_prefix, language, delay_aware = 1, 8, 4, False, False, False

        def __init__(self, robot):
            self.features = {**robot.observation_features, **robot.action_features}
            self.noise_shape, self.fps = (self.horizon, 6), robot.fps
            self.rest = robot.command_state()

        def infer(self, observation, timestamp, prefix_actions, noise=None, instruction=None):
            return np.repeat(self.rest[None], self.horizon, axis=0), {}

        def close(self):
            pass

    read_fd, write_fd = os.pipe()
    with SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir)) as follower, \
            LeaderArm(follower, LeaderConfig(port=leader_twin.port, id="so100_leader_twin",
                                             calibration_dir=str(leader_twin.calibration_dir)), fd=read_fd) as leader:
        start = follower.command_state()
        target = np.clip(start + np.array([15.0, -10.0, 12.0, 8.0, -10.0, 10.0]), *follower.limits.command_bounds())
        hold(leader_twin.scene, target)
        control = ControlConfig(control_hz=follower.fps, max_episode_s=4.0)
        recorder = EpisodeRecorder(tmp_path / "episodes", follower.observation_features,
                                   follower.action_features["action"], round(follower.fps))
        node = ControlNode(follower, Still(follower), control, recorder=recorder, teleop=leader,
                           watchdog=Watchdog(1.0 / control.control_hz, control.hold_after, control.stop_after))
        threading.Timer(1.0, os.write, (write_fd, b" ")).start()  # the person steps on the pedal after a second
        result = node.run_episode(seed=0)
        node.close()
        recorder.close()
        hold(leader_twin.scene, None)
        time.sleep(0.5)
        reached = follower.command_state()
    os.close(write_fd)
    os.close(read_fd)
    assert result.intervention and result.counts["intervention_ticks"] > 0
    assert np.abs(reached - target).max() <= 1.0, (reached, target)  # degrees (gripper: percent)
    with DemoStore.open(tmp_path / "episodes") as store:
        flags = store.get_episode(0)["intervention"].reshape(-1)
    assert not flags[:10].any() and flags[-10:].all()
