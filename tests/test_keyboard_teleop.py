"""The keyboard intervener, fed keys through a pipe and through a pseudo-terminal as a person types them."""

import os
import pty
import termios
import time

import numpy as np

from real.robot.keyboard import KeyboardTeleop


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class HeldGripper:
    """The part of a robot the intervener reads: the command it rests at (gripper closed on an object)."""

    def command_state(self) -> np.ndarray:
        return np.array([0.0, 0.0, 0.0, 1.0])


def type_keys(fd: int, keys: str, teleop: KeyboardTeleop, until, timeout: float = 2.0) -> None:
    os.write(fd, keys.encode())
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert until(), f"the keys {keys!r} had no effect"


def test_take_over_drive_release_and_mark_through_a_pipe():
    read_fd, write_fd = os.pipe()
    clock = Clock()
    teleop = KeyboardTeleop(4, robot=HeldGripper(), fd=read_fd, speed=0.5, hold_s=0.2, clock=clock)
    with teleop:
        assert teleop.get_action() is None and not teleop.is_intervening
        type_keys(write_fd, " ", teleop, lambda: teleop.is_intervening)
        np.testing.assert_allclose(teleop.get_action(), [0, 0, 0, 1.0])  # still, the gripper kept closed
        type_keys(write_fd, "w", teleop, lambda: teleop.get_action()[0] != 0)
        np.testing.assert_allclose(teleop.get_action(), [0.5, 0, 0, 1.0])
        type_keys(write_fd, "F", teleop, lambda: teleop.get_action()[2] != 0)  # upper case works too
        np.testing.assert_allclose(teleop.get_action(), [0.5, 0, -0.5, 1.0])
        clock.t = 0.3  # the keys were let go: the hand stops
        np.testing.assert_allclose(teleop.get_action(), [0, 0, 0, 1.0])
        type_keys(write_fd, "h", teleop, lambda: teleop.get_action()[3] == -1.0)  # open
        type_keys(write_fd, " ", teleop, lambda: not teleop.is_intervening)
        assert teleop.get_action() is None and teleop.outcome is None
        type_keys(write_fd, "y", teleop, lambda: teleop.outcome is not None)
        assert teleop.outcome is True
        teleop.reset()
        assert teleop.outcome is None and not teleop.is_intervening
        type_keys(write_fd, "n", teleop, lambda: teleop.outcome is not None)
        assert teleop.outcome is False
    os.close(write_fd)
    os.close(read_fd)


def test_a_terminal_is_put_in_cbreak_mode_and_restored():
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON  # a line-buffered terminal: keys would wait for Enter
    teleop = KeyboardTeleop(4, fd=slave)
    with teleop:
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # every key arrives at once
        type_keys(master, " d", teleop, lambda: teleop.is_intervening and teleop.get_action()[1] != 0)
        action = teleop.get_action()
        assert action[1] < 0 and action[3] == -1.0  # no robot given: the gripper starts open
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


def test_a_deployment_episode_records_the_takeover_and_ends_with_the_marked_outcome(tmp_path):
    """On the simulated robot: a person takes over, drives +x, marks a failure; the node ends the episode there and
    the recording carries the intervention flags, the outcome and the preference labels."""
    from test_control_node import small_policy

    from real.host.local_inference import LocalInference
    from real.robot.control_node import ControlConfig, ControlNode
    from real.robot.recording import EpisodeRecorder
    from real.robot.sim_robot import SimRobot
    from robopolicy.data import DemoStore

    read_fd, write_fd = os.pipe()
    with SimRobot("builtin/pick_place", control_hz=20, sensor_latency_s=0.01) as robot:
        recorder = EpisodeRecorder(tmp_path / "rec", robot.observation_features, robot.action_features["action"], 20,
                                   lookback_s=0.25)
        node = ControlNode(robot, LocalInference(small_policy("mlp")), ControlConfig(control_hz=20, max_episode_s=10),
                           recorder=recorder, teleop=None, task="pick")
        teleop = KeyboardTeleop(4, robot=robot, fd=read_fd, hold_s=10.0)
        node.teleop = teleop
        script = [(0.6, " w"), (1.2, "n")]

        def typist():
            start = time.monotonic()
            for at, keys in script:
                time.sleep(max(0.0, start + at - time.monotonic()))
                os.write(write_fd, keys.encode())

        import threading

        with teleop:
            thread = threading.Thread(target=typist)
            thread.start()
            try:
                result = node.run_episode(seed=0)
            finally:
                thread.join()
                node.close()
                recorder.close()
    os.close(write_fd)
    os.close(read_fd)
    assert not result.success and result.intervention and 1.0 < result.duration_s < 3.0
    with DemoStore.open(tmp_path / "rec") as store:
        meta = store.episodes[0]
        frames = store.get_episode(0)
    assert meta["source"] == "intervention" and meta["success"] is False
    flags = frames["intervention"][:, 0]
    assert flags.any() and not flags[:5].any() and flags[-1]
    np.testing.assert_allclose(frames["action.requested"][flags][:, 0], 0.5)  # the person's +x
    assert not frames["action.held"][flags].any()  # the person's frames are decisions, never holds
    kinds = [s[3] for s in meta["extra"]["preference"]["segments"]]
    assert kinds == ["pre_takeover", "intervention"]


def test_as_a_pedal_only_the_keyboard_ignores_its_driving_keys():
    read_fd, write_fd = os.pipe()
    teleop = KeyboardTeleop(6, fd=read_fd, drive=False)
    with teleop:
        type_keys(write_fd, " ", teleop, lambda: teleop.is_intervening)
        os.write(write_fd, b"wg")
        type_keys(write_fd, "n", teleop, lambda: teleop.outcome is False)
        np.testing.assert_allclose(teleop.get_action(), [0, 0, 0, 0, 0, -1.0])  # w and g did nothing
    os.close(write_fd)
    os.close(read_fd)


def test_a_leader_arm_refuses_a_follower_it_cannot_drive_and_a_missing_calibration(tmp_path):
    """intervention.device=leader: one sentence naming the problem, before any port is opened."""
    import pytest

    from real.robot.deployment import InterventionConfig, human_teleop
    from real.robot.lerobot_arm import LeRobotArmError
    from real.robot.lerobot_teleop import LeaderConfig

    class Arm:
        def __init__(self, names):
            self.action_features = {"action": {"shape": [len(names)], "names": names}}

    leader = LeaderConfig(port="/dev/null", id="nobody", calibration_dir=str(tmp_path))
    iv = InterventionConfig(enabled=True, device="leader", leader=leader)
    with pytest.raises(LeRobotArmError, match="drives an arm whose actions are"):
        human_teleop(iv, Arm(["ee.dx", "ee.dy", "ee.dz", "gripper"]))
    so100 = [f"{m}.pos" for m in ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")]
    with pytest.raises(LeRobotArmError, match="No LeRobot calibration file"):
        human_teleop(iv, Arm(so100))
    assert human_teleop(InterventionConfig(enabled=True, device="scripted"), Arm(so100)) is None
    assert isinstance(human_teleop(InterventionConfig(enabled=True, device="keyboard"), Arm(so100)), KeyboardTeleop)
