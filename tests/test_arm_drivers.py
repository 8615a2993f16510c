"""The UR and Franka drivers against their vendor clients' MuJoCo stand-ins: kinematics from the published DH
tables, limits from the vendor data, servo behaviour, and what each vendor's controller does on a fault
(UR: protective stop, RTDE watchdog; Franka: reflexes and recovery). The conformance suite
(tests/test_robot_conformance.py) checks limits, hold and stop on every driver; this file what is each one's own."""

from __future__ import annotations

import math
import time

import mujoco
import numpy as np
import pytest

from real.host.arm_model import ServoArm
from real.host.franka_standin import FrankaStandin
from real.host.ur_standin import URStandin
from real.robot.arm_specs import ARMS, rotation_vector
from real.robot.deployment import make_robot
from real.robot.franka import FrankaError, FrankaRobot
from real.robot.safety import SafetyFilter
from real.robot.ur import URError, URRobot
from robopolicy.config import ConfigError


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_the_mujoco_model_has_the_published_kinematics_and_joint_range(arm):
    spec = ARMS[arm]
    model = ServoArm(spec, lambda t: np.asarray(spec.home), realtime=False)
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.uniform(np.maximum(spec.position_lower, -3.0), np.minimum(spec.position_upper, 3.0))
        model.data.qpos[:] = q
        mujoco.mj_forward(model.model, model.data)
        np.testing.assert_allclose(model.flange_pose(), spec.forward_kinematics(q), atol=1e-8)
    np.testing.assert_allclose(model.model.jnt_range, np.stack([spec.position_lower, spec.position_upper], 1))


def test_published_reference_poses():
    # UR5e at zero: the arm stretched along -x (a2 + a3), wrist offsets d4 / d6 (UR's DH sheet)
    pose = ARMS["ur5e"].forward_kinematics(np.zeros(6))
    np.testing.assert_allclose(pose[:3, 3], [-0.8172, -0.2329, 0.0628], atol=1e-4)
    # Panda at zero: flange 0.088 m forward, 0.926 m up (0.333 + 0.316 + 0.384 - 0.107)
    pose = ARMS["panda"].forward_kinematics(np.zeros(7))
    np.testing.assert_allclose(pose[:3, 3], [0.088, 0.0, 0.926], atol=1e-6)


def test_rotation_vector_round_trips():
    rng = np.random.default_rng(1)
    for _ in range(200):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = rng.uniform(0, math.pi)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rotation = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k
        got = rotation_vector(rotation)
        if angle < math.pi - 1e-6:
            np.testing.assert_allclose(got, angle * axis, atol=1e-7)
        else:
            np.testing.assert_allclose(np.abs(got), np.abs(angle * axis), atol=1e-6)


# ================================================================================================== UR


@pytest.fixture
def ur():
    standin = URStandin("ur5e", realtime=False)
    with URRobot(vendor=standin, control_hz=50.0) as robot:
        robot.reset()
        yield robot, standin
    standin.close()


def test_ur_limits_come_from_the_datasheet_and_the_servo_filter(ur):
    robot, _ = ur
    limits = robot.limits
    datasheet = np.asarray(ARMS["ur5e"].max_velocity)
    # the lookahead filter overshoots a stepped target's speed by (1 + period / lookahead)
    assert (limits.max_velocity * (1 + robot.period / robot.lookahead_s) <= datasheet + 1e-9).all()
    assert (limits.max_velocity <= 0.25 * datasheet + 1e-9).all()
    np.testing.assert_allclose(limits.position_upper, 2 * math.pi - 0.05)
    assert robot.observation_features["observation.state"]["shape"] == [18]


def test_ur_servoj_tracks_filtered_commands_and_reports_the_tcp(ur):
    robot, standin = ur
    safety = SafetyFilter(robot.limits)
    safety.reset(robot.command_state())
    goal = robot.command_state() + np.array([0.3, -0.2, 0.2, 0.1, -0.1, 0.3])
    for _ in range(150):  # 3 s on the controller's clock
        robot.send_action(safety.filter(goal)[0])
    np.testing.assert_allclose(robot.command_state(), goal, atol=1e-3)
    state = robot.get_observation()["observation.state"]
    pose = ARMS["ur5e"].forward_kinematics(state[:6])
    np.testing.assert_allclose(state[12:15], pose[:3, 3], atol=1e-3)
    assert standin.violations == [] and standin.arm.time == pytest.approx(3.0, abs=0.01)


def test_ur_protective_stop_ends_the_episode_and_blocks_the_next_until_cleared(ur):
    robot, standin = ur
    q = robot.command_state()
    standin.RTDEControlInterface("x").triggerProtectiveStop()
    with pytest.raises(URError, match="script is not running"):
        robot.send_action(q)
    with pytest.raises(URError, match="protective stop"):
        robot.reset()
    standin.unlock_protective_stop()
    robot.reset()
    robot.send_action(q)


def test_ur_rtde_watchdog_stops_the_arm_when_commands_stop_coming():
    standin = URStandin("ur5e", realtime=True)
    try:
        with URRobot(vendor=standin, control_hz=50.0, watchdog_hz=10.0) as robot:
            robot.reset()
            safety = SafetyFilter(robot.limits)
            safety.reset(robot.command_state())
            goal = robot.command_state() + 0.5
            for _ in range(20):  # moving
                robot.send_action(safety.filter(goal)[0])
                time.sleep(robot.period)
            assert np.abs(standin.arm.qd).max() > 0.05
            time.sleep(0.5)  # the control process stalls: no command, no kick
            assert standin.watchdog_trips == 1 and not standin.moving
            assert np.abs(standin.arm.qd).max() < 1e-3
            robot.reset()  # the next episode uploads the script again
            robot.send_action(robot.command_state())
    finally:
        standin.close()


def test_ur_refuses_a_start_outside_the_safety_range():
    standin = URStandin("ur5e", realtime=False, home=[0.0, -1.57, 1.57, -1.57, -1.57, 6.28])
    with pytest.raises(URError, match="outside the safety range"):
        URRobot(vendor=standin).connect()
    standin.close()


def test_ur_from_its_config_without_ur_rtde_is_one_sentence():
    robot = make_robot({"_target_": "real.robot.ur.URRobot", "host": "127.0.0.1", "control_hz": None}, {}, 20.0)
    assert isinstance(robot, URRobot) and robot.control_hz == 20.0
    with pytest.raises(URError, match="pip install"):
        robot.connect()
    with pytest.raises((ConfigError, URError), match="model"):
        make_robot({"_target_": "real.robot.ur.URRobot", "model": "ur99"}, {}, 20.0)


# ============================================================================================== Franka


@pytest.fixture
def franka():
    standin = FrankaStandin(realtime=False)
    with FrankaRobot(vendor=standin, control_hz=50.0) as robot:
        robot.reset()
        yield robot, standin
    standin.close()


def test_franka_limits_come_from_frankys_joint_limits(franka):
    robot, _ = franka
    limits = robot.limits
    np.testing.assert_allclose(limits.max_velocity[:7], 0.1 * np.asarray(ARMS["panda"].max_velocity))
    np.testing.assert_allclose(limits.max_acceleration[:7], 0.1 * np.asarray(ARMS["panda"].max_acceleration))
    np.testing.assert_allclose(limits.position_lower[:7], np.asarray(ARMS["panda"].position_lower) + 0.05)
    assert limits.position_upper[7] == pytest.approx(0.08)
    assert robot.action_features["action"]["shape"] == [8]


def test_franka_joint_motions_and_the_hand_follow_commands(franka):
    robot, standin = franka
    safety = SafetyFilter(robot.limits)
    safety.reset(robot.command_state())
    goal = robot.command_state() + np.array([0.2, -0.2, 0.1, 0.2, -0.1, 0.2, 0.3, 0.0])
    goal[7] = 0.02  # close the hand to 2 cm
    for _ in range(200):  # 4 s
        robot.send_action(safety.filter(goal)[0])
        standin.advance(robot.period)
    np.testing.assert_allclose(robot.command_state(), goal, atol=2e-3)
    state = robot.get_observation()["observation.state"]
    np.testing.assert_allclose(state[14:17], standin.arm.flange_pose()[:3, 3], atol=1e-3)
    assert standin.violations == []


def test_franka_reflex_is_recovered_then_the_episode_fails(franka):
    robot, standin = franka
    q = robot.command_state()
    for k in range(robot.max_recoveries):
        standin._reflex("cartesian_reflex")  # e.g. a collision
        sent = robot.send_action(q)
        np.testing.assert_allclose(sent, robot.command_state())  # nothing new was sent: it holds where it is
        assert robot.reflexes == k + 1 and not standin.error
    standin._reflex("cartesian_reflex")
    with pytest.raises(FrankaError, match="reflex"):
        robot.send_action(q)
    robot.reset()  # a new episode recovers again
    robot.send_action(q)


def test_franka_needs_a_connection_for_its_limits_and_franky_to_connect():
    robot = make_robot({"_target_": "real.robot.franka.FrankaRobot", "control_hz": None}, {}, 20.0)
    with pytest.raises(FrankaError, match="connect"):
        _ = robot.limits
    with pytest.raises(FrankaError, match="pip install"):
        robot.connect()
