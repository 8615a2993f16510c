"""A Franka Panda / FR3 behind the HAL, through franky-control (libfranka underneath, FCI on the arm).

Commands are joint positions [7] (rad) plus, with `gripper=true`, the Franka Hand's opening width (m). Each
command is an asynchronous `JointMotion` that replaces the running one: franky replans from the arm's present
state within its velocity / acceleration / jerk limits (scaled by `relative_dynamics_factor`), so the arm never
sees a step. The state is joint positions and velocities, the flange position from Franka's published
kinematics (`real.robot.arm_specs`), and the hand's width. Safety limits: the datasheet joint range less
`joint_margin`; joint speeds and accelerations from franky's own limits (`Robot.joint_velocity_limit.max`, the
vendor's data) scaled by `velocity_scale` / `acceleration_scale`.
Reflexes (a collision, a limit the arm hit) abort the motion with `ControlException`; the driver then recovers
(`recover_from_errors`, at most `max_recoveries` times per episode) and holds, as the operator would; one more
and it raises `FrankaError`, which ends the episode (and the control node stops the arm). `hold()` is a
`JointMotion` to where the arm is; `stop()` is franky's `stop()` (the motion ends; the arm brakes and holds).

The vendor client is injected: `vendor` is anything with franky's names (default: the `franky` module; tests pass
`real.host.franka_standin.FrankaStandin`). numpy + standard library (+ franky at connect): runs on the robot computer.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from real.robot.arm_specs import ARMS, PANDA_GRIPPER_MAX_WIDTH
from real.robot.cameras import camera_features, connect_all, disconnect_all, make_cameras, read_images
from real.robot.hal import Robot, RobotLimits
from robopolicy.config import register_config, setting

GRIPPER_SPEED = 0.1  # m/s, the Franka Hand's top speed
GRIPPER_DEADBAND = 0.005  # m: smaller width changes wait until the command settles


class FrankaError(RuntimeError):
    """The Franka arm or its connection failed, or a setting cannot work (one sentence naming it)."""


@register_config("robot", "franka")
@dataclass
class FrankaConfig:
    """configs/robot/franka.yaml: the keyword arguments of `FrankaRobot` (`_target_` names the class)."""

    target = "real.robot.franka.FrankaRobot"

    host: str = setting("172.16.0.2", "the arm's FCI address (Desk: Settings > Network; FCI activated)")
    control_hz: float = setting(20.0, "the node's control rate: one JointMotion per period")
    gripper: bool = setting(True, "command the Franka Hand (the last action entry: opening width in m)")
    relative_dynamics_factor: float = setting(0.1, "franky's global velocity/acceleration/jerk scale (0, 1]")
    velocity_scale: float = setting(0.1, "safety: joint speed limit as a fraction of Franka's")
    acceleration_scale: float = setting(0.1, "safety: joint acceleration limit as a fraction of Franka's")
    joint_margin: float = setting(0.05, "safety: rad kept clear of each end of the joint range")
    max_recoveries: int = setting(3, "reflexes recovered automatically per episode before the episode fails")
    cameras: Any = setting(None, "cameras by name, e.g. {front: {type: opencv, source: 0, width: 96, height: 96}} "
                           "(real/robot/cameras.py); null: none")
    task: str = setting("", "the instruction recorded with each episode")

    def __post_init__(self) -> None:
        for name in ("relative_dynamics_factor", "velocity_scale", "acceleration_scale"):
            if not 0 < getattr(self, name) <= 1:
                raise FrankaError(f"robot.{name} must be in (0, 1], got {getattr(self, name)}.")
        if not 1 <= self.control_hz <= 1000:
            raise FrankaError(f"robot.control_hz must be between 1 and 1000, got {self.control_hz}.")


@dataclass
class FrankaRobot(Robot):
    """A Franka arm on asynchronous joint motions. Extra status: "reflexes", "has_errors"."""

    host: str = "172.16.0.2"
    control_hz: float = 20.0
    gripper: bool = True
    relative_dynamics_factor: float = 0.1
    velocity_scale: float = 0.1
    acceleration_scale: float = 0.1
    joint_margin: float = 0.05
    max_recoveries: int = 3
    cameras: Any = None
    task: str = ""
    vendor: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        FrankaConfig(**{k: getattr(self, k) for k in FrankaConfig.__dataclass_fields__})  # the same checks
        self.spec = ARMS["panda"]
        self.period = 1.0 / self.control_hz
        self._cameras = make_cameras(self.cameras)
        self._robot: Any = None
        self._hand: Any = None
        self._limits: RobotLimits | None = None
        self._gripper_sent: float | None = None  # the hand's last width command
        self._gripper_last: float | None = None  # the last width asked for
        self.reflexes = 0
        self._recoveries = 0

    # ------------------------------------------------------------------------------------------ HAL
    @property
    def action_dim(self) -> int:
        return 7 + int(self.gripper)

    @property
    def observation_features(self) -> dict[str, dict]:
        joints = [f"joint{i + 1}" for i in range(7)]
        names = [f"{j}.pos" for j in joints] + [f"{j}.vel" for j in joints] + ["flange.x", "flange.y", "flange.z"]
        names += ["gripper.width"] if self.gripper else []
        return {"observation.state": {"dtype": "float32", "shape": [len(names)], "names": names},
                **camera_features(self._cameras)}

    @property
    def action_features(self) -> dict[str, dict]:
        names = [f"joint{i + 1}.pos" for i in range(7)] + (["gripper.width"] if self.gripper else [])
        return {"action": {"dtype": "float32", "shape": [self.action_dim], "names": names}}

    @property
    def limits(self) -> RobotLimits:
        if self._limits is None:
            raise FrankaError("FrankaRobot reads its limits from the arm: connect() first (or use `with robot:`).")
        return self._limits

    @property
    def fps(self) -> float:
        return self.control_hz

    @property
    def task_description(self) -> str:
        return self.task

    @property
    def is_connected(self) -> bool:
        return self._robot is not None

    def connect(self) -> None:
        if self.is_connected:
            return
        api = self.vendor if self.vendor is not None else _franky()
        self._api = api
        try:
            robot = api.Robot(self.host)
            robot.relative_dynamics_factor = self.relative_dynamics_factor
            hand = api.Gripper(self.host) if self.gripper else None
        except api.Exception as exc:
            raise FrankaError(f"Cannot connect to the Franka arm at {self.host} ({exc}); check the address, that "
                              "FCI is activated in Desk and the brakes are open.") from None
        if robot.has_errors and not robot.recover_from_errors():
            raise FrankaError(f"The Franka arm at {self.host} is in an error state that automatic recovery cannot "
                              "clear; check Desk.")
        self._robot, self._hand = robot, hand
        self._limits = self._make_limits(robot)
        q = self.command_state()
        lo, hi = self._limits.position_lower, self._limits.position_upper
        if ((q < lo) | (q > hi)).any():
            self._robot = self._hand = None
            raise FrankaError(f"The Franka arm's joints {np.round(q[:7], 3).tolist()} are outside the safety range; "
                              "move it inside (guiding mode) first.")
        try:
            connect_all(self._cameras)
        except BaseException:
            self.disconnect()
            raise

    def disconnect(self) -> None:
        disconnect_all(self._cameras)
        if self._robot is not None:
            try:
                self.stop()
            finally:
                self._robot = self._hand = None

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start an episode where the arm is (recovering from a reflex left by the last one)."""
        robot = self._require()
        self._recoveries = 0
        if robot.has_errors and not robot.recover_from_errors():
            raise FrankaError("The Franka arm is in an error state that automatic recovery cannot clear; check Desk.")
        return self.get_observation()

    def get_observation(self) -> dict[str, Any]:
        robot = self._require()
        t = time.monotonic()
        joints = robot.current_joint_state
        q = np.asarray(joints.position, dtype=np.float64)
        parts = [q, np.asarray(joints.velocity, dtype=np.float64), self.spec.forward_kinematics(q)[:3, 3]]
        if self._hand is not None:
            parts.append([float(self._hand.width)])
        return {"observation.state": np.concatenate(parts).astype(np.float32), **read_images(self._cameras),
                "timestamp": t}

    def send_action(self, action: np.ndarray) -> np.ndarray:
        """An asynchronous JointMotion (and a hand move when its width changed); returns what was sent."""
        robot, api = self._require(), self._api
        command = np.asarray(action, dtype=np.float64)
        if command.shape != (self.action_dim,) or not np.isfinite(command).all():
            raise FrankaError(f"FrankaRobot.send_action needs {self.action_dim} finite values, got shape "
                              f"{command.shape}; filter commands through the safety layer first.")
        command = np.clip(command, self.limits.position_lower, self.limits.position_upper)
        try:
            robot.move(api.JointMotion(api.JointState(command[:7])), asynchronous=True)
        except api.ControlException as exc:
            self._recover(exc)
            return self.command_state()
        if self._hand is not None:
            width = float(command[7])
            # each hand move is a new gripper command: send big changes at once, small ones once they settle
            settled = self._gripper_last is not None and abs(width - self._gripper_last) < 1e-6
            change = math.inf if self._gripper_sent is None else abs(width - self._gripper_sent)
            if change >= GRIPPER_DEADBAND or (settled and change > 1e-4):
                self._hand.move_async(width, GRIPPER_SPEED)
                self._gripper_sent = width
            self._gripper_last = width
        return command

    def hold(self) -> None:
        robot, api = self._require(), self._api
        try:
            robot.move(api.JointMotion(api.JointState(robot.current_joint_positions)), asynchronous=True)
        except api.ControlException as exc:
            self._recover(exc)

    def stop(self) -> None:
        robot, api = self._require(), self._api
        robot.stop()
        try:
            robot.join_motion(timeout=2.0)
        except api.ControlException:
            pass  # the stopped motion reports its end as an exception

    def command_state(self) -> np.ndarray:
        robot = self._require()
        q = np.asarray(robot.current_joint_positions, dtype=np.float64)
        return np.concatenate([q, [float(self._hand.width)]]) if self._hand is not None else q

    @property
    def status(self) -> dict[str, Any]:
        robot = self._require()
        return {"success": False, "truncated": False, "reflexes": self.reflexes, "has_errors": bool(robot.has_errors)}

    # ---------------------------------------------------------------------------------------- plumbing
    def _make_limits(self, robot: Any) -> RobotLimits:
        velocity = np.asarray(robot.joint_velocity_limit.max, dtype=np.float64) * self.velocity_scale
        acceleration = np.asarray(robot.joint_acceleration_limit.max, dtype=np.float64) * self.acceleration_scale
        lower = np.asarray(self.spec.position_lower) + self.joint_margin
        upper = np.asarray(self.spec.position_upper) - self.joint_margin
        if self.gripper:
            lower, upper = np.append(lower, 0.0), np.append(upper, PANDA_GRIPPER_MAX_WIDTH)
            velocity, acceleration = np.append(velocity, GRIPPER_SPEED), np.append(acceleration, np.inf)
        return RobotLimits(position_lower=lower, position_upper=upper, max_velocity=velocity,
                           max_acceleration=acceleration, control_period_s=self.period)

    def _recover(self, exc: Exception) -> None:
        """A reflex: recover and hold where the arm is, or end the episode after `max_recoveries`."""
        self.reflexes += 1
        self._recoveries += 1
        if self._recoveries > self.max_recoveries:
            raise FrankaError(f"The Franka arm stopped on a reflex {self._recoveries} times this episode ({exc}); "
                              "check Desk for the cause.") from None
        deadline = time.monotonic() + 2.0
        while not self._robot.recover_from_errors():
            if time.monotonic() > deadline:
                raise FrankaError(f"The Franka arm could not recover from a reflex ({exc}).") from None
            time.sleep(0.01)

    def _require(self) -> Any:
        if self._robot is None:
            raise FrankaError("FrankaRobot is not connected; call connect() (or use `with robot:`).")
        return self._robot


def _franky() -> Any:
    try:
        return importlib.import_module("franky")
    except ImportError:
        raise FrankaError("robot=franka needs franky on the robot computer: pip install 'robopolicy[franka]' "
                          "(or pip install franky-control).") from None
