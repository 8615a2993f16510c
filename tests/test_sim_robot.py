"""The simulated robot: its own process, real-time physics, sensor latency and faults on request."""

from __future__ import annotations

import time

import numpy as np
import pytest

from real.robot.sim_robot import SimRobot, SimRobotError


@pytest.fixture(scope="module")
def robot():
    with SimRobot("builtin/pick_place", control_hz=20, sensor_hz=50, sensor_latency_s=0.03) as robot:
        yield robot


def ee(obs):
    return obs["observation.state"][14:17]


def test_spec_and_limits_follow_the_task(robot):
    assert robot.action_features["action"]["shape"] == [4]
    assert robot.observation_features["observation.state"]["names"][14:17] == ["ee.x", "ee.y", "ee.z"]
    limits = robot.limits
    assert limits.position_lower.tolist() == [-1.0] * 4 and limits.position_upper.tolist() == [1.0] * 4
    assert limits.max_step.tolist() == [1.0] * 4 and limits.control_period_s == pytest.approx(0.05)
    assert robot.fps == 10 and robot.task_description


def test_physics_follows_wall_clock_without_commands(robot):
    robot.reset(seed=1)
    time.sleep(0.55)
    # the task's 10 Hz control ticks ran on their own while nobody sent anything
    assert 4 <= robot.status["step"] <= 7


def test_commands_move_the_arm_in_real_time(robot):
    start = ee(robot.reset(seed=2)).copy()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        robot.send_action(np.array([1.0, 0.0, 0.0, -1.0]))
        time.sleep(0.05)
    moved = ee(robot.get_observation()) - start
    assert moved[0] > 0.05 and abs(moved[1]) < 0.02
    robot.hold()
    time.sleep(0.3)
    held = ee(robot.get_observation()).copy()
    time.sleep(0.3)
    np.testing.assert_allclose(ee(robot.get_observation()), held, atol=0.005)


def test_observations_carry_their_capture_time_and_arrive_late(robot):
    robot.reset(seed=3)
    time.sleep(0.2)
    ages = []
    for _ in range(10):
        obs = robot.get_observation()
        ages.append(time.monotonic() - obs["timestamp"])
        time.sleep(0.013)
    assert min(ages) >= 0.03 and max(ages) < 0.03 + 0.02 + 0.05  # latency + one sensor period + scheduling


def test_faults_nan_drop_stale_on_request(robot):
    robot.reset(seed=4)
    time.sleep(0.1)
    robot.inject_fault("nan", 0.2)
    time.sleep(0.1)
    assert np.isnan(robot.get_observation()["observation.state"]).all()
    time.sleep(0.2)
    assert np.isfinite(robot.get_observation()["observation.state"]).all()

    robot.inject_fault("drop", 0.3)
    time.sleep(0.1)
    frozen = robot.get_observation()["timestamp"]
    time.sleep(0.1)
    assert robot.get_observation()["timestamp"] == frozen
    time.sleep(0.2)
    assert robot.get_observation()["timestamp"] > frozen

    robot.inject_fault("stale", 0.3)
    time.sleep(0.1)
    stale = robot.get_observation()
    assert time.monotonic() - stale["timestamp"] > 0.09  # new frames arrive, but all of them old
    with pytest.raises(SimRobotError, match="Unknown fault"):
        robot.inject_fault("melt", 1.0)


def test_hold_action_keeps_the_gripper_and_stops_motion(robot):
    robot.reset(seed=5)
    np.testing.assert_array_equal(robot.command_state(), [0, 0, 0, -1])
    np.testing.assert_array_equal(robot.hold_action(np.array([0.7, -0.2, 0.1, 0.9])), [0, 0, 0, 0.9])


def test_stop_is_reported_and_disconnect_ends_the_process():
    robot = SimRobot("builtin/reach", control_hz=10)
    with pytest.raises(SimRobotError, match="not connected"):
        _ = robot.limits
    with robot:
        robot.reset(seed=0)
        robot.stop()
        deadline = time.monotonic() + 1.0
        while not robot.status.get("stopped") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert robot.status["stopped"]
        proc = robot._proc
    assert proc.poll() is not None and not robot.is_connected


def test_unknown_task_is_refused():
    with pytest.raises(SimRobotError, match="built-in task"):
        SimRobot("metaworld/push-v3")


@pytest.mark.parametrize("first_command_after_s", [0.0, 0.03])
def test_a_node_at_the_task_rate_gets_exactly_the_gym_env_trajectory(first_command_after_s):
    """Phase-locked servo sampling + tick-synchronous frames: commands sent at 10 Hz by a (jittery) loop drive
    the real-time robot through exactly the states the gym env reaches with the same actions, however long the
    node (or a loaded machine) takes to send the episode's first command after the reset."""
    import sim

    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-1, 1, (12, 3)), np.full((12, 1), -1.0)], axis=1)
    frames = {}
    with SimRobot("builtin/pick_place", control_hz=10, sensor_latency_s=0.01) as robot:
        robot.reset(seed=7)
        time.sleep(first_command_after_s)  # the driver's physics runs on meanwhile
        t0 = time.monotonic()
        for k, action in enumerate(actions):
            while time.monotonic() < t0 + 0.1 * k:
                obs = robot.get_observation()
                frames[obs["timestamp"]] = obs["observation.state"].copy()
                time.sleep(0.005)
            robot.send_action(action)
        while time.monotonic() < t0 + 0.1 * len(actions) + 0.1:
            obs = robot.get_observation()
            frames[obs["timestamp"]] = obs["observation.state"].copy()
            time.sleep(0.005)
    # the servo ticks, from half a period after the first command on (the reset frame is before it)
    times = sorted(t for t in frames if t > t0)
    assert np.allclose(np.diff(times), 0.1, atol=1e-6)
    assert times[0] - t0 == pytest.approx(0.05, abs=0.01)  # half a control period after the first command
    env = sim.make_env("builtin/pick_place")
    expected, _ = env.reset(seed=7)
    for k, t in enumerate(times[:len(actions)]):
        # the same states, up to the 50-80 ms the arm rested before the first sampled command (gravity settling)
        np.testing.assert_allclose(frames[t], expected["observation.state"], atol=2e-3, err_msg=f"tick {k}")
        expected, *_ = env.step(actions[k].astype(np.float32))
