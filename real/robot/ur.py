"""A Universal Robots e-Series arm (UR3e / UR5e / UR10e) behind the HAL, through ur_rtde.

Commands are joint positions [6] (rad) sent with `RTDEControlInterface.servoJ` once per control period; the
state is `RTDEReceiveInterface`'s actual joint positions, joint speeds and TCP pose. The safety limits come from
the arm's published data (`real.robot.arm_specs`): the datasheet joint range and speed, scaled by
`velocity_scale`, and chosen so that servoJ's lookahead filter, which overshoots a stepped target's speed by
(1 + period / lookahead), still stays under the datasheet speed. `hold()` is `servoStop`, `stop()` is
`servoStop` then a blocking `stopJ` (and a protective stop with `protective_stop=true`); the controller's own
RTDE watchdog (`setWatchdog`) stops the arm should this process die or stall, since every command kicks it.

The vendor client is injected: `vendor` is anything with `RTDEControlInterface(host)` and
`RTDEReceiveInterface(host)` (default: ur_rtde's modules; tests pass `real.host.ur_standin.URStandin`).
numpy + standard library (+ ur_rtde at connect): this runs on the robot computer.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from real.robot.arm_specs import ARMS
from real.robot.cameras import camera_features, connect_all, disconnect_all, make_cameras, read_images
from real.robot.hal import Robot, RobotLimits
from robopolicy.config import register_config, setting

UR_MODELS = ("ur3e", "ur5e", "ur10e")


class URError(RuntimeError):
    """The UR arm or its connection failed, or a setting cannot work (one sentence naming it)."""


@register_config("robot", "ur")
@dataclass
class URConfig:
    """configs/robot/ur.yaml: the keyword arguments of `URRobot` (`_target_` names the class)."""

    target = "real.robot.ur.URRobot"

    host: str = setting("192.168.1.10", "the controller's IP address (the pendant: Settings > System > Network)")
    model: str = setting("ur5e", "ur3e | ur5e | ur10e (joint range and speeds from its datasheet)",
                         choices=UR_MODELS)
    control_hz: float = setting(20.0, "the node's control rate: one servoJ per period")
    velocity_scale: float = setting(0.25, "safety: joint speed limit as a fraction of the datasheet's")
    max_acceleration: float = setting(2.0, "safety: joint acceleration limit (rad/s^2)")
    joint_margin: float = setting(0.05, "safety: rad kept clear of each end of the joint range")
    position_lower: list[float] | None = setting(None, "safety: a tighter joint range for this cell (rad); null: "
                                                 "the datasheet's")
    position_upper: list[float] | None = setting(None, "... its upper ends")
    lookahead_s: float = setting(0.1, "servoJ lookahead time, 0.03-0.2 s (longer: smoother, later)")
    gain: float = setting(300.0, "servoJ proportional gain, 100-2000")
    stop_deceleration: float = setting(2.0, "rad/s^2 of stopJ and servoStop")
    protective_stop: bool = setting(False, "stop() also triggers a protective stop (unlock it on the pendant)")
    watchdog_hz: float | None = setting(5.0, "the controller stops the arm when no command comes at this rate; "
                                        "null: no RTDE watchdog")
    cameras: Any = setting(None, "cameras by name, e.g. {front: {type: opencv, source: 0, width: 96, height: 96}} "
                           "(real/robot/cameras.py); null: none")
    task: str = setting("", "the instruction recorded with each episode")

    def __post_init__(self) -> None:
        if self.model not in UR_MODELS:
            raise URError(f"robot.model={self.model!r} is not a supported UR arm; choose one of {UR_MODELS}.")
        if not 0 < self.velocity_scale <= 1:
            raise URError(f"robot.velocity_scale must be in (0, 1], got {self.velocity_scale}.")
        if not 0.03 <= self.lookahead_s <= 0.2:
            raise URError(f"robot.lookahead_s must be between 0.03 and 0.2 s (ur_rtde's range), got "
                          f"{self.lookahead_s}.")
        if not 1 <= self.control_hz <= 500:
            raise URError(f"robot.control_hz must be between 1 and 500 (the RTDE rate), got {self.control_hz}.")


@dataclass
class URRobot(Robot):
    """A UR arm on joint-position servoing. Extra status: "protective_stopped", "controller_time"."""

    host: str = "192.168.1.10"
    model: str = "ur5e"
    control_hz: float = 20.0
    velocity_scale: float = 0.25
    max_acceleration: float = 2.0
    joint_margin: float = 0.05
    position_lower: list[float] | None = None
    position_upper: list[float] | None = None
    lookahead_s: float = 0.1
    gain: float = 300.0
    stop_deceleration: float = 2.0
    protective_stop: bool = False
    watchdog_hz: float | None = 5.0
    cameras: Any = None
    task: str = ""
    vendor: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        URConfig(**{k: getattr(self, k) for k in URConfig.__dataclass_fields__})  # the same checks
        self.spec = ARMS[self.model]
        self.period = 1.0 / self.control_hz
        self._cameras = make_cameras(self.cameras)
        lower = np.asarray(self.spec.position_lower) + self.joint_margin
        upper = np.asarray(self.spec.position_upper) - self.joint_margin
        if self.position_lower is not None:
            lower = np.maximum(lower, self.position_lower)
        if self.position_upper is not None:
            upper = np.minimum(upper, self.position_upper)
        # servoJ's lookahead filter reaches (1 + period / lookahead) times a stepped target's speed
        overshoot = 1.0 + self.period / self.lookahead_s
        speed = np.asarray(self.spec.max_velocity) * self.velocity_scale / max(overshoot * self.velocity_scale, 1.0)
        self._limits = RobotLimits(position_lower=lower, position_upper=upper, max_velocity=speed,
                                   max_acceleration=self.max_acceleration, control_period_s=self.period)
        self._control: Any = None
        self._receive: Any = None
        self._last_sent: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------ HAL
    @property
    def observation_features(self) -> dict[str, dict]:
        joints = [f"joint{i + 1}" for i in range(6)]
        names = [f"{j}.pos" for j in joints] + [f"{j}.vel" for j in joints] + ["x", "y", "z", "rx", "ry", "rz"]
        return {"observation.state": {"dtype": "float32", "shape": [18], "names": names},
                **camera_features(self._cameras)}

    @property
    def action_features(self) -> dict[str, dict]:
        return {"action": {"dtype": "float32", "shape": [6], "names": [f"joint{i + 1}.pos" for i in range(6)]}}

    @property
    def limits(self) -> RobotLimits:
        return self._limits

    @property
    def fps(self) -> float:
        return self.control_hz

    @property
    def task_description(self) -> str:
        return self.task

    @property
    def is_connected(self) -> bool:
        return self._control is not None and bool(self._control.isConnected())

    def connect(self) -> None:
        if self.is_connected:
            return
        vendor = self.vendor if self.vendor is not None else _ur_rtde()
        try:
            self._receive = vendor.RTDEReceiveInterface(self.host)
            self._control = vendor.RTDEControlInterface(self.host)
        except RuntimeError as exc:
            self._control = self._receive = None
            raise URError(f"Cannot connect to the UR controller at {self.host} ({exc}); check the address, that "
                          "the arm is powered on in remote control, and that no other program holds RTDE.") from None
        if self._receive.isProtectiveStopped():
            self.disconnect()
            raise URError(f"The UR arm at {self.host} is in a protective stop; clear it on the pendant first.")
        q = self.command_state()
        if ((q < self._limits.position_lower) | (q > self._limits.position_upper)).any():
            self.disconnect()
            raise URError(f"The UR arm's joints {np.round(q, 3).tolist()} are outside the safety range "
                          f"[{np.round(self._limits.position_lower, 3).tolist()}, "
                          f"{np.round(self._limits.position_upper, 3).tolist()}]; move it inside with the pendant.")
        try:
            connect_all(self._cameras)
        except BaseException:
            self.disconnect()
            raise

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start an episode where the arm is: the control script runs again (the RTDE watchdog ends it between
        episodes, when no command comes) with its watchdog armed."""
        control, receive = self._require()
        if receive.isProtectiveStopped():
            raise URError(f"The UR arm at {self.host} is in a protective stop; clear it on the pendant, then "
                          "start the next episode.")
        if not control.isProgramRunning():
            control.reconnect()
        if self.watchdog_hz:
            control.setWatchdog(self.watchdog_hz)
        return self.get_observation()

    def disconnect(self) -> None:
        disconnect_all(self._cameras)
        if self._control is not None:
            try:
                if self._control.isConnected():
                    self.stop()
                    self._control.stopScript()
            except RuntimeError:
                pass
            self._control.disconnect()
        if self._receive is not None:
            self._receive.disconnect()
        self._control = self._receive = None

    def get_observation(self) -> dict[str, Any]:
        receive = self._require()[1]
        t = time.monotonic()
        state = np.concatenate([receive.getActualQ(), receive.getActualQd(), receive.getActualTCPPose()])
        return {"observation.state": state.astype(np.float32), **read_images(self._cameras), "timestamp": t}

    def send_action(self, action: np.ndarray) -> np.ndarray:
        """servoJ to the joint positions (clamped to the safety range); returns what was sent."""
        control = self._require()[0]
        q = np.asarray(action, dtype=np.float64)
        if q.shape != (6,) or not np.isfinite(q).all():
            raise URError(f"URRobot.send_action needs 6 finite joint positions, got shape {q.shape}; filter "
                          "commands through the safety layer first.")
        q = np.clip(q, self._limits.position_lower, self._limits.position_upper)
        if not control.isProgramRunning():
            raise URError("The UR controller's script is not running (a protective stop, or its watchdog saw no "
                          "command for too long); start a new episode with reset().")
        if self.watchdog_hz:
            control.kickWatchdog()
        if not control.servoJ(q.tolist(), 0.0, 0.0, self.period, self.lookahead_s, self.gain):
            raise URError(f"The UR controller refused servoJ to {np.round(q, 4).tolist()} (protective stop?).")
        self._last_sent = q
        return q

    def hold(self) -> None:
        control = self._require()[0]
        if control.isProgramRunning():
            control.servoStop(self.stop_deceleration)

    def stop(self) -> None:
        control = self._require()[0]
        try:
            if control.isProgramRunning():
                control.servoStop(self.stop_deceleration)
            control.stopJ(self.stop_deceleration, False)
        finally:
            if self.protective_stop:
                control.triggerProtectiveStop()

    def command_state(self) -> np.ndarray:
        receive = self._require()[1]
        return np.asarray(receive.getActualQ(), dtype=np.float64)

    @property
    def status(self) -> dict[str, Any]:
        receive = self._require()[1]
        return {"success": False, "truncated": False, "protective_stopped": bool(receive.isProtectiveStopped()),
                "controller_time": float(receive.getTimestamp())}

    def _require(self) -> tuple[Any, Any]:
        if self._control is None:
            raise URError("URRobot is not connected; call connect() (or use `with robot:`).")
        return self._control, self._receive


def _ur_rtde() -> SimpleNamespace:
    try:
        control = importlib.import_module("rtde_control")
        receive = importlib.import_module("rtde_receive")
    except ImportError:
        raise URError("robot=ur needs ur_rtde on the robot computer: pip install 'robopolicy[ur]' "
                      "(or pip install ur-rtde).") from None
    return SimpleNamespace(RTDEControlInterface=control.RTDEControlInterface,
                           RTDEReceiveInterface=receive.RTDEReceiveInterface)
