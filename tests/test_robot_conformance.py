"""One conformance suite, run against every `Robot` driver: the simulated robot, the UR and Franka drivers on
their vendor clients' MuJoCo stand-ins (`real.host.ur_standin`, `real.host.franka_standin`), and the SO-100 through
LeRobot's own driver on the SO-100 twin (`real.host.feetech_twin`; that case runs in LeRobot's virtualenv, where
tests/test_so100.py runs this file with `-k so100`, and skips elsewhere; the others skip there, without MuJoCo).

For each robot: commands never leave the limits over 10,000 random action streams (through the safety filter and
the driver; the stand-ins run on a virtual clock so no stream sleeps), and the arm itself never exceeds its joint
range or speed; the node sends the hold command in the first control period without a policy action; the robot
is stopped on every way out of an episode (exception, e-stop, KeyboardInterrupt, policy server killed) and an
e-stop stops it within one control period; the recorded episode is a valid store within the limits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import wait_until

import real.robot.control_node as control_node_module
from real.host.server import PolicyServer
from real.robot.control_node import ControlConfig, ControlNode, RemoteInference
from real.robot.hal import Robot, Teleoperator
from real.robot.recording import EpisodeRecorder
from real.robot.safety import SafetyFilter
from robopolicy.data import DemoStore, validate_store
from robopolicy.policies.base import ChunkPolicy

ROBOTS = ["sim", "ur", "franka", "so100"]
ROOT = Path(__file__).resolve().parent.parent
N_STREAMS = 10_000
CONTROL_HZ = 20.0


@dataclass
class Rig:
    """A connected robot and, for a stand-in, the simulated vendor controller behind it."""

    name: str
    robot: Robot
    standin: Any = None

    def stopped(self) -> bool:
        """The robot is at rest and commanded to stay (the stand-in's controller, or the sim arm's status)."""
        if self.standin is None:
            return bool(self.robot.status.get("stopped", True))
        return not self.standin.moving

    def after_command(self, seconds: float) -> None:
        """On a virtual clock, let the controller run until the next command (ur_rtde's servoJ does it itself:
        it blocks for its `time`; franky's asynchronous moves return at once; the twin runs on the wall clock)."""
        if type(self.standin).__name__ == "FrankaStandin" and not self.standin.arm.realtime:
            self.standin.advance(seconds)

    def hardware_violations(self) -> list[str]:
        return [] if self.standin is None else list(self.standin.violations)


class TwinServos:
    """The SO-100 twin's servos as LeRobot's bus reads them: moving while any servo's Moving flag is set."""

    def __init__(self, robot: Any) -> None:
        self.robot = robot
        self.violations: list[str] = []

    @property
    def moving(self) -> bool:
        return any(self.robot._robot.bus.sync_read("Moving", normalize=False).values())


def skip_unless_importable(name: str) -> None:
    """The SO-100 case needs LeRobot (its virtualenv); the others MuJoCo (the project's)."""
    module = "lerobot.robots.so_follower" if name == "so100" else "mujoco"
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"robot {name} needs {module}: " + ("tests/test_so100.py runs it in LeRobot's virtualenv"
                                                         if name == "so100" else "not in this virtualenv"))


@contextlib.contextmanager
def make_rig(name: str, realtime: bool, control_hz: float = CONTROL_HZ, tmp: Path | None = None) -> Iterator[Rig]:
    skip_unless_importable(name)
    if name == "sim":
        from real.robot.sim_robot import SimRobot

        with SimRobot("builtin/reach", control_hz=control_hz, max_step=2.0) as robot:
            robot.reset(seed=0)
            yield Rig(name, robot)
    elif name == "ur":
        from real.host.ur_standin import URStandin
        from real.robot.ur import URRobot

        standin = URStandin("ur5e", realtime=realtime)
        try:
            with URRobot(vendor=standin, control_hz=control_hz, stop_deceleration=4.0) as robot:
                yield Rig(name, robot, standin)
        finally:
            standin.close()
    elif name == "franka":
        from real.host.franka_standin import FrankaStandin
        from real.robot.franka import FrankaRobot

        standin = FrankaStandin(realtime=realtime)
        try:
            with FrankaRobot(vendor=standin, control_hz=control_hz) as robot:
                yield Rig(name, robot, standin)
        finally:
            standin.close()
    elif name == "so100":  # LeRobot's SO100Follower on the twin, which runs on the project's interpreter (MuJoCo)
        from real.host.feetech_twin import TwinProcess
        from real.robot.lerobot_arm import SO100Arm

        with TwinProcess(ROOT / ".venv" / "bin" / "python", tmp) as twin:
            # the twin shares a loaded machine: a stall past the Feetech SDK's 50 ms read timeout is asked again
            with SO100Arm(port=twin.port, id="so100_twin", calibration_dir=str(twin.calibration_dir),
                          control_hz=control_hz, read_retries=10) as robot:
                yield Rig(name, robot, TwinServos(robot))
    else:
        raise AssertionError(name)


# ============================================================================================ limits


def random_stream(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, length: int) -> list[Any]:
    """Commands a broken or adversarial policy might send: far targets, jumps, noise, NaN/inf, wrong shapes."""
    a = lo.shape[0]
    span = hi - lo
    kind = rng.integers(6)
    out: list[Any] = []
    target = rng.uniform(lo - 0.5 * span, hi + 0.5 * span)
    for k in range(length):
        if kind == 0:  # one far target, held
            cmd = target
        elif kind == 1:  # a new random target every step (jumps)
            cmd = rng.uniform(lo - 0.5 * span, hi + 0.5 * span)
        elif kind == 2:  # huge values
            cmd = rng.choice([-1e6, 1e6], size=a)
        elif kind == 3:  # fast oscillation
            cmd = lo + span * (0.5 + 0.6 * np.sin(k * rng.uniform(0.5, 3.0) + rng.uniform(0, 6, size=a)))
        elif kind == 4:  # random walk from the middle with big steps
            target = target + rng.normal(0, 0.2, size=a) * span
            cmd = target
        else:  # garbage between valid ones
            cmd = [np.full(a, np.nan), np.full(a, np.inf), np.zeros(a + 1), "x", target][rng.integers(5)]
        out.append(cmd)
    return out


def check_commands(limits, dt: float, start: np.ndarray, sent: list[np.ndarray]) -> None:
    """Every command of a stream obeys the position, step, velocity and acceleration limits from rest at start."""
    lo, hi = limits.command_bounds()
    tol = 1e-5 * np.maximum(1.0, np.abs(hi - lo))  # the drivers send float32 or float64
    prev, prev_delta = np.asarray(start, dtype=np.float64), np.zeros_like(lo)
    max_delta = np.minimum(limits.max_step, limits.max_velocity * dt)
    for y in sent:
        y = np.asarray(y, dtype=np.float64)
        assert np.isfinite(y).all() and y.shape == lo.shape
        assert (y >= lo - tol).all() and (y <= hi + tol).all(), (y, lo, hi)
        delta = y - prev
        assert (np.abs(delta) <= max_delta + tol).all(), (delta, max_delta)
        assert (np.abs(delta - prev_delta) <= limits.max_acceleration * dt**2 + tol).all()
        prev, prev_delta = y, delta


@pytest.mark.parametrize("name", ROBOTS)
def test_limits_never_exceeded_over_10000_random_streams(name, tmp_path):
    rng = np.random.default_rng(23)
    # the stand-ins' servo loops run in Python: fewer servo ticks per command keep 10,000 streams quick
    with make_rig(name, realtime=False, control_hz=100.0, tmp=tmp_path) as rig:
        robot, limits = rig.robot, rig.robot.limits
        lo, hi = limits.command_bounds()
        dt = limits.control_period_s
        for i in range(N_STREAMS):
            robot.reset(seed=i)  # as the node starts every episode
            start = robot.command_state()
            safety = SafetyFilter(limits)
            safety.reset(start)
            sent = []
            for cmd in random_stream(rng, lo, hi, int(rng.integers(1, 7))):
                safe, _ = safety.filter(cmd)
                sent.append(robot.send_action(safe))
                rig.after_command(dt)
            check_commands(limits, dt, np.clip(start, lo, hi), sent)
            robot.stop()  # as the node does at the end of every episode
        assert rig.hardware_violations() == []


# ================================================================================ the node, on the robot


class ScriptedPolicy:
    """An `InferenceBackend` in numpy: slow sine-wave chunks around where the robot rests; `fault` breaks it."""

    n_obs_steps, horizon, n_action_steps = 1, 8, 4
    supports_prefix = False
    language = False
    delay_aware = False

    def __init__(self, robot: Robot) -> None:
        self.features = {**robot.observation_features, **robot.action_features}
        self.fps = robot.fps or CONTROL_HZ
        self.noise_shape = (self.horizon, robot.action_features["action"]["shape"][0])
        lo, hi = robot.limits.command_bounds()
        self.base = np.clip(robot.hold_action(robot.command_state()), lo, hi)
        self.amplitude = np.minimum(0.1 * (hi - lo), 0.2)
        self.lo, self.hi = lo, hi
        self.fault: str | None = None
        self.calls = 0

    def infer(self, observation, timestamp, prefix_actions, noise=None, instruction=None):
        self.calls += 1
        if self.fault == "killed":
            raise ConnectionError("the policy server is gone")
        if self.fault == "raise":
            raise RuntimeError("policy bug")
        if self.fault == "nan":
            return np.full(self.noise_shape, np.nan), {}
        t = timestamp + np.arange(self.horizon) / self.fps
        chunk = self.base + self.amplitude * np.sin(2 * math.pi * 0.5 * t)[:, None]
        return np.clip(chunk, self.lo, self.hi), {}

    def close(self) -> None:
        pass


class ServedPolicy(ChunkPolicy):
    """The same sine-wave chunks as a torch `ChunkPolicy`, served by the real `PolicyServer` (killed mid-episode)."""

    n_obs_steps, horizon, n_action_steps = 1, 8, 4

    def __init__(self, scripted: ScriptedPolicy) -> None:
        super().__init__()
        self.features, self.action_dim = scripted.features, scripted.noise_shape[1]
        self.scripted = scripted

    def sample_chunk(self, obs, noise=None, prefix_actions=None):
        chunk, _ = self.scripted.infer(None, time.monotonic(), None)
        return torch.as_tensor(chunk, dtype=torch.float32)[None].expand(obs["observation.state"].shape[0], -1, -1)


class Interrupting(Teleoperator):
    """A teleoperator whose device raises `error` at tick `at` (an exception out of the control loop)."""

    def __init__(self, error: BaseException, at: int) -> None:
        self.error, self.at, self.ticks = error, at, 0

    def connect(self) -> None: ...

    def disconnect(self) -> None: ...

    @property
    def is_intervening(self) -> bool:
        return False

    def get_action(self):
        self.ticks += 1
        if self.ticks == self.at:
            raise self.error
        return None


@pytest.fixture(scope="module", params=ROBOTS)
def rig(request, tmp_path_factory):
    with make_rig(request.param, realtime=True, tmp=tmp_path_factory.mktemp(request.param)) as rig:
        yield rig


def run_node(rig: Rig, tmp_path, *, fault_at: float | None = None, fault: str = "killed", episode_s: float = 2.0,
             teleop: Teleoperator | None = None, estop_at: float | None = None, kill_server_at: float | None = None):
    """One recorded episode; returns (result or the exception, frames, per-tick executor log, info). With
    `kill_server_at`, the policy runs behind a real `PolicyServer` on loopback, shut down at that time."""
    robot = rig.robot
    policy = ScriptedPolicy(robot)
    server = backend = None
    if kill_server_at is not None:
        server = PolicyServer(ServedPolicy(policy)).start()
        backend = RemoteInference(server.address, timeout_s=0.5)
    log: list[tuple[float, bool]] = []  # per tick: (t_cmd, the executor had no action)
    make_executor = control_node_module.make_executor

    def logged_executor(*args, **kwargs):
        executor = make_executor(*args, **kwargs)
        action_at = executor.action_at

        def logged(now):
            action = action_at(now)
            log.append((now, action is None))
            return action

        executor.action_at = logged
        return executor

    recorder = EpisodeRecorder(tmp_path / "store", robot.observation_features, robot.action_features["action"],
                               int(CONTROL_HZ), overwrite=True)
    config = ControlConfig(control_hz=CONTROL_HZ, mode="sync", max_episode_s=episode_s, hold_after=2, stop_after=6)
    node = ControlNode(robot, backend or policy, config, recorder=recorder, teleop=teleop, task="conformance")
    timers = []
    if server is not None:
        timers.append(threading.Timer(kill_server_at, server.shutdown))
    if fault_at is not None:
        timers.append(threading.Timer(fault_at, lambda: setattr(policy, "fault", fault)))
    estop_time: list[float] = []
    if estop_at is not None:
        def estop():
            estop_time.append(time.monotonic())
            node.watchdog.trigger_estop("conformance e-stop")
        timers.append(threading.Timer(estop_at, estop))
    stop_times: list[float] = []
    original_stop = robot.stop

    def stop_spy():
        stop_times.append(time.monotonic())
        original_stop()

    robot.stop = stop_spy
    control_node_module.make_executor = logged_executor
    try:
        for timer in timers:
            timer.start()
        try:
            outcome: Any = node.run_episode(seed=1)
        except BaseException as exc:  # noqa: BLE001 (KeyboardInterrupt is one of the exits under test)
            outcome = exc
    finally:
        control_node_module.make_executor = make_executor
        del robot.stop
        for timer in timers:
            timer.cancel()
        node.close()
        recorder.close()
        if server is not None:
            backend.close()
            server.shutdown()
    assert validate_store(tmp_path / "store") == []
    with DemoStore.open(tmp_path / "store") as store:
        frames = store.get_episode(0)
    return outcome, frames, log, {"stop_times": stop_times, "estop_time": estop_time, "policy": policy}


def check_recording(rig: Rig, frames: dict) -> None:
    """The recorded commands are what the robot got, within its limits from where it rested."""
    limits = rig.robot.limits
    lo, hi = limits.command_bounds()
    actions = frames["action"].astype(np.float64)
    tol = 1e-5 * np.maximum(1.0, hi - lo)
    assert ((actions >= lo - tol) & (actions <= hi + tol)).all()
    assert np.isfinite(frames["observation.state"]).all()
    steps = np.abs(np.diff(actions, axis=0))
    assert (steps <= np.minimum(limits.max_step, limits.max_velocity * limits.control_period_s) + tol).all()


def test_hold_in_the_first_control_period_without_a_policy_action(rig, tmp_path):
    outcome, frames, log, info = run_node(rig, tmp_path, fault_at=0.8, fault="killed", episode_s=2.5)
    assert outcome.success in (False, True) and outcome.counts["chunk_errors"] > 0
    check_recording(rig, frames)
    n = min(len(log), len(frames["action"]))
    no_action = np.array([missing for _, missing in log[:n]])
    policy_ticks = np.flatnonzero(~no_action)
    assert policy_ticks.size > 0, "the policy never drove the robot"
    first_hold = policy_ticks[-1] + 1  # the fault: from here on the policy has nothing to give
    assert first_hold < n and no_action[first_hold:].all()
    requested, sent = frames["action.requested"].astype(np.float64), frames["action"].astype(np.float64)
    for k in range(first_hold, n):  # the very first period without an action already requests the hold
        expected = rig.robot.hold_action(sent[k - 1])
        np.testing.assert_allclose(requested[k], expected, atol=1e-5)
    # and the robot comes to rest: the last commands no longer move, and the arm stops
    np.testing.assert_allclose(sent[-1], sent[-2], atol=1e-5)
    assert wait_until(rig.stopped, 3.0), "the robot did not come to rest after the node stopped it"
    assert rig.hardware_violations() == []


@pytest.mark.parametrize("exit_path", ["exception", "keyboard_interrupt", "estop", "server_killed"])
def test_stopped_on_every_exit_path(rig, tmp_path, exit_path):
    period = 1.0 / CONTROL_HZ
    if exit_path == "exception":
        outcome, frames, _, info = run_node(rig, tmp_path, teleop=Interrupting(RuntimeError("device unplugged"), 15))
        assert isinstance(outcome, RuntimeError)
    elif exit_path == "keyboard_interrupt":
        outcome, frames, _, info = run_node(rig, tmp_path, teleop=Interrupting(KeyboardInterrupt(), 15))
        assert isinstance(outcome, KeyboardInterrupt)
    elif exit_path == "estop":
        outcome, frames, _, info = run_node(rig, tmp_path, estop_at=0.7)
        assert outcome.aborted == "conformance e-stop"
        # the e-stop stops the robot within one control period (plus scheduling slack on a loaded machine)
        assert info["stop_times"][0] - info["estop_time"][0] <= period + 0.05
    else:
        outcome, frames, _, info = run_node(rig, tmp_path, kill_server_at=0.7, episode_s=2.0)
        assert outcome.counts["chunks"] > 0 and outcome.counts["chunk_errors"] > 0
        assert outcome.counts["stops"] >= 1  # the watchdog stopped the robot while no action came
    assert info["stop_times"], "the robot was never stopped"
    check_recording(rig, frames)
    assert wait_until(rig.stopped, 3.0), "the robot did not come to rest after the node stopped it"
    assert rig.hardware_violations() == []
