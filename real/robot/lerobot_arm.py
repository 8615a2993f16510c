"""LeRobot's arms behind the HAL: an SO-100 / SO-101 or a Koch follower, driven by LeRobot's own robot classes.

LeRobot's unmodified `SO100Follower` / `SO101Follower` / `KochFollower`, with their Feetech / Dynamixel motor
buses and calibration files, do the talking to the servos; this adapter gives them our `Robot` contract, so the
control node, safety filter and watchdog drive them as any other robot. It runs where LeRobot imports (the
LeRobot virtualenv, `make lerobot-env`: LeRobot pins its own torch); the policy runs behind a policy server on
the workstation (`python -m real.robot --robot so100 --server HOST:PORT ...`), or `robopolicy deploy robot=so100`.

Units are LeRobot's (`use_degrees=True`), so LeRobot datasets and policies trained on them line up: the five body
joints in degrees about the middle of each calibrated range, the gripper 0 (closed end of its range) to 100.
The safety limits come from the calibration file (each joint's recorded range, less `joint_margin_deg`) and the
servos' top speed (`velocity_scale` of it). `stop()` holds the arm where it is with the torque on (an SO-100
with its torque off falls onto its stops); `disconnect()` then disables the torque as LeRobot does
(`disable_torque_on_disconnect`). LeRobot is imported only at connect: this module imports numpy only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from real.robot.hal import Robot, RobotLimits
from robopolicy.config import register_config, setting

MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
MAX_RES = 4095  # LeRobot's degree scale for 4096-tick encoders (STS3215, XL430, XL330)
# robot type: (LeRobot module, robot class, config class, LeRobot's calibration folder name, top joint speed deg/s)
LEROBOT_ARMS = {
    # STS3215 at 7.4 V: 0.222 s per 60 degrees
    "so100_follower": ("lerobot.robots.so_follower", "SO100Follower", "SO100FollowerConfig", "so_follower", 270.0),
    "so101_follower": ("lerobot.robots.so_follower", "SO101Follower", "SO101FollowerConfig", "so_follower", 270.0),
    # XL430-W250: 57 rpm (the slower of the Koch's two servo models)
    "koch_follower": ("lerobot.robots.koch_follower", "KochFollower", "KochFollowerConfig", "koch_follower", 342.0),
}


class LeRobotArmError(RuntimeError):
    """A LeRobot arm, its calibration or its connection failed, or a setting cannot work (one sentence)."""


def default_calibration_dir(robot_type: str) -> Path:
    """Where LeRobot keeps this arm's calibration files ($HF_LEROBOT_CALIBRATION/robots/<name>)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    root = Path(os.environ.get("HF_LEROBOT_CALIBRATION",
                               Path(os.environ.get("HF_LEROBOT_HOME", home / "lerobot")) / "calibration"))
    return root.expanduser() / "robots" / LEROBOT_ARMS[robot_type][3]


def load_calibration(path: Path) -> dict[str, dict[str, int]]:
    """LeRobot's calibration file: per motor id, drive_mode, homing_offset, range_min, range_max."""
    if not path.is_file():
        raise LeRobotArmError(f"No LeRobot calibration file at {path}; calibrate the arm first (lerobot-calibrate "
                              "--robot.type=... --robot.port=... --robot.id=...) or set robot.calibration_dir.")
    try:
        calibration = json.loads(path.read_text())
        ranges = {m: (int(calibration[m]["range_min"]), int(calibration[m]["range_max"])) for m in MOTORS}
    except (ValueError, KeyError, TypeError) as exc:
        raise LeRobotArmError(f"The calibration file {path} is not a LeRobot arm calibration with motors "
                              f"{list(MOTORS)} ({exc!r}); recalibrate the arm.") from None
    bad = [m for m, (lo, hi) in ranges.items() if not 0 <= lo < hi <= MAX_RES]
    if bad:
        raise LeRobotArmError(f"The calibration file {path} has an empty or impossible range for {bad}; "
                              "recalibrate the arm.")
    return calibration


def read_retrying(read, bus: Any, retries: int, device: str, on_retry=None) -> Any:
    """`read()` of a LeRobot device, asked again up to `retries` times when its servos do not answer in time
    (LeRobot's ConnectionError), after dropping any late answer (it would be taken for the next read's);
    `on_retry()` is called before each new attempt. Fails with one sentence naming `device`."""
    for attempt in range(retries + 1):
        try:
            return read()
        except ConnectionError as exc:
            if attempt == retries:
                raise LeRobotArmError(f"{device} did not answer {attempt + 1} reads in a row ({exc}); check its "
                                      "cable and power.") from None
            if on_retry is not None:
                on_retry()
            bus.port_handler.ser.reset_input_buffer()
    raise AssertionError("unreachable")


@dataclass
class LeRobotArmConfig:
    """The settings every LeRobot arm shares (configs/robot/so100.yaml, so101.yaml, koch.yaml)."""

    # LeRobot's driver imports only in LeRobot's virtualenv: `robopolicy deploy` runs the robot side there
    # (`python -m real.robot`), serving the policy from its own environment (real/host/deploy.py)
    driver_env = "lerobot"

    port: str = setting("/dev/ttyACM0", "the arm's serial port (lerobot-find-port), or the SO-100 twin's pty")
    id: str = setting("my_arm", "the arm's LeRobot id: its calibration file is <calibration_dir>/<id>.json")
    calibration_dir: str | None = setting(None, "folder of LeRobot calibration files; null: LeRobot's default "
                                          "($HF_LEROBOT_CALIBRATION/robots/<robot>)")
    control_hz: float = setting(20.0, "the node's control rate: one goal-position write per period")
    velocity_scale: float = setting(0.5, "safety: joint speed limit as a fraction of the servos' top speed")
    max_acceleration: float = setting(2000.0, "safety: joint acceleration limit (deg/s^2; gripper: units/s^2)")
    joint_margin_deg: float = setting(2.0, "safety: degrees kept clear of each end of the calibrated range")
    read_retries: int = setting(2, "a read the servos do not answer in time (LeRobot's ConnectionError) is asked "
                                "again this many times, after dropping any late answer")
    disable_torque_on_disconnect: bool = setting(True, "LeRobot's: torque off when the driver disconnects (the "
                                                 "arm then rests on its stops)")
    task: str = setting("", "the instruction recorded with each episode")

    def __post_init__(self) -> None:
        if not 0 < self.velocity_scale <= 1:
            raise LeRobotArmError(f"robot.velocity_scale must be in (0, 1], got {self.velocity_scale}.")
        if not 1 <= self.control_hz <= 200:
            raise LeRobotArmError(f"robot.control_hz must be between 1 and 200, got {self.control_hz}.")
        if self.joint_margin_deg < 0 or self.max_acceleration <= 0 or self.read_retries < 0:
            raise LeRobotArmError("robot.joint_margin_deg and robot.read_retries must be >= 0 and "
                                  "robot.max_acceleration > 0.")


@register_config("robot", "so100")
@dataclass
class SO100Config(LeRobotArmConfig):
    """configs/robot/so100.yaml: LeRobot's SO100Follower (six Feetech STS3215)."""

    target = "real.robot.lerobot_arm.SO100Arm"
    scene: str | None = setting(None, "rehearsal only: 127.0.0.1:PORT of the SO-100 twin's scene channel "
                                "(feetech_twin --task ...): episodes then start at the task's seeded pose and end "
                                "on its success; null on a real arm")


@register_config("robot", "so101")
@dataclass
class SO101Config(LeRobotArmConfig):
    """configs/robot/so101.yaml: LeRobot's SO101Follower (six Feetech STS3215)."""

    target = "real.robot.lerobot_arm.SO101Arm"


@register_config("robot", "koch")
@dataclass
class KochConfig(LeRobotArmConfig):
    """configs/robot/koch.yaml: LeRobot's KochFollower (Dynamixel XL430 / XL330)."""

    target = "real.robot.lerobot_arm.KochArm"


class LeRobotArm(Robot):
    """One of LeRobot's follower arms (`robot_type`, a key of LEROBOT_ARMS) on joint-position control."""

    robot_type = "so100_follower"
    config_class: type[LeRobotArmConfig] = SO100Config

    def __init__(self, **settings: Any) -> None:
        self.config = self.config_class(**settings)
        cfg = self.config
        self.calibration_dir = (Path(cfg.calibration_dir).expanduser() if cfg.calibration_dir
                                else default_calibration_dir(self.robot_type))
        self.calibration = load_calibration(self.calibration_dir / f"{cfg.id}.json")
        self.period = 1.0 / cfg.control_hz
        self._limits = self._make_limits()
        self._robot: Any = None
        self.read_errors = 0  # reads the servos did not answer in time (each asked again)

    def _make_limits(self) -> RobotLimits:
        cfg = self.config
        top_deg = LEROBOT_ARMS[self.robot_type][4] * cfg.velocity_scale
        lower, upper, speed = [], [], []
        for motor in MOTORS:
            lo, hi = self.calibration[motor]["range_min"], self.calibration[motor]["range_max"]
            if motor == "gripper":  # 0..100 over the calibrated range
                margin = 100.0 * cfg.joint_margin_deg / ((hi - lo) * 360.0 / MAX_RES)
                lower.append(margin)
                upper.append(100.0 - margin)
                speed.append(100.0 * top_deg / ((hi - lo) * 360.0 / MAX_RES))
            else:  # degrees about the middle of the range
                half = (hi - lo) / 2 * 360.0 / MAX_RES
                lower.append(-half + cfg.joint_margin_deg)
                upper.append(half - cfg.joint_margin_deg)
                speed.append(top_deg)
        return RobotLimits(position_lower=lower, position_upper=upper, max_velocity=speed,
                           max_acceleration=cfg.max_acceleration, control_period_s=self.period)

    # ------------------------------------------------------------------------------------------ HAL
    @property
    def observation_features(self) -> dict[str, dict]:
        return {"observation.state": {"dtype": "float32", "shape": [len(MOTORS)],
                                      "names": [f"{m}.pos" for m in MOTORS]}}

    @property
    def action_features(self) -> dict[str, dict]:
        return {"action": {"dtype": "float32", "shape": [len(MOTORS)], "names": [f"{m}.pos" for m in MOTORS]}}

    @property
    def limits(self) -> RobotLimits:
        return self._limits

    @property
    def fps(self) -> float:
        return self.config.control_hz

    @property
    def task_description(self) -> str:
        return self.config.task

    @property
    def is_connected(self) -> bool:
        return self._robot is not None and bool(self._robot.is_connected)

    def connect(self) -> None:
        if self.is_connected:
            return
        module, robot_class, config_class = LEROBOT_ARMS[self.robot_type][:3]
        try:
            lerobot = importlib.import_module(module)
        except ImportError as exc:
            raise LeRobotArmError(f"LeRobot's {robot_class} does not import here ({exc}); run the robot side in "
                                  "LeRobot's virtualenv (make lerobot-env).") from None
        config = getattr(lerobot, config_class)(
            port=self.config.port, id=self.config.id, calibration_dir=self.calibration_dir, use_degrees=True,
            disable_torque_on_disconnect=self.config.disable_torque_on_disconnect)
        for attempt in range(self.config.read_retries + 1):  # a bus that misses one status packet is asked again
            robot = getattr(lerobot, robot_class)(config)
            try:
                robot.connect(calibrate=False)  # LeRobot's calibrate() asks questions on stdin: never here
                break
            except (ConnectionError, OSError, RuntimeError) as exc:
                with contextlib.suppress(Exception):  # release the port before the next attempt
                    robot.bus.disconnect(disable_torque=False)
                if attempt == self.config.read_retries:
                    raise LeRobotArmError(
                        f"Cannot connect to the {self.robot_type} on {self.config.port} "
                        f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); check the port "
                        "(lerobot-find-port), the power and the servo ids.") from None
                time.sleep(0.2)
        self._robot = robot
        if not robot.is_calibrated:  # what LeRobot does when you press ENTER to use the file
            with robot.bus.torque_disabled():
                robot.bus.write_calibration(robot.calibration)

    def disconnect(self) -> None:
        if self._robot is None:
            return
        try:
            if self._robot.is_connected:
                self.stop()
                self._robot.disconnect()
        finally:
            self._robot = None

    def get_observation(self) -> dict[str, Any]:
        robot = self._require()
        t = time.monotonic()

        def retried() -> None:
            nonlocal t
            self.read_errors += 1
            t = time.monotonic()

        observation = read_retrying(robot.get_observation, robot.bus, self.config.read_retries,
                                    f"The {self.robot_type} on {self.config.port}", retried)
        state = np.array([observation[f"{m}.pos"] for m in MOTORS], dtype=np.float32)
        return {"observation.state": state, "timestamp": t}

    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Goal positions to every servo (clamped to the safety range); returns what was sent."""
        robot = self._require()
        goal = np.asarray(action, dtype=np.float64)
        if goal.shape != (len(MOTORS),) or not np.isfinite(goal).all():
            raise LeRobotArmError(f"{type(self).__name__}.send_action needs {len(MOTORS)} finite joint positions, "
                                  f"got shape {goal.shape}; filter commands through the safety layer first.")
        goal = np.clip(goal, self._limits.position_lower, self._limits.position_upper)
        sent = robot.send_action({f"{m}.pos": float(v) for m, v in zip(MOTORS, goal)})
        return np.array([sent[f"{m}.pos"] for m in MOTORS], dtype=np.float64)

    def hold(self) -> None:
        """Goal = where the servos are now."""
        robot = self._require()
        robot.send_action({f"{m}.pos": float(v) for m, v in zip(MOTORS, self.command_state())})

    def stop(self) -> None:
        self.hold()

    def command_state(self) -> np.ndarray:
        return self.get_observation()["observation.state"].astype(np.float64)

    def _require(self) -> Any:
        if self._robot is None:
            raise LeRobotArmError(f"{type(self).__name__} is not connected; call connect() (or use `with robot:`).")
        return self._robot


class SO100Arm(LeRobotArm):
    """The SO-100; on the twin with `scene=` set, `reset(seed)` and `status` come from the twin's task scene."""

    robot_type, config_class = "so100_follower", SO100Config
    config: SO100Config

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._scene: Any = None

    def _ask_scene(self, request: dict) -> dict:
        if self._scene is None:
            host, _, port = str(self.config.scene).rpartition(":")
            try:
                self._scene = socket.create_connection((host, int(port)), timeout=5.0).makefile("rwb")
            except (OSError, ValueError) as exc:
                raise LeRobotArmError(f"No SO-100 twin scene channel at robot.scene={self.config.scene} ({exc}); "
                                      "start the twin with --task and pass the port it prints.") from None
        self._scene.write(json.dumps(request).encode() + b"\n")
        self._scene.flush()
        reply = json.loads(self._scene.readline() or b"{}")
        if "error" in reply or not reply:
            raise LeRobotArmError(f"The SO-100 twin's scene channel refused {request}: {reply.get('error', 'closed')}.")
        return reply

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        if self.config.scene:
            self._ask_scene({"cmd": "reset", "seed": seed})
        return self.get_observation()

    @property
    def status(self) -> dict[str, Any]:
        if not self.config.scene:
            return super().status
        reply = self._ask_scene({"cmd": "status"})
        return {"success": bool(reply["success"]), "truncated": bool(reply["truncated"])}

    def disconnect(self) -> None:
        try:
            super().disconnect()
        finally:
            if self._scene is not None:
                self._scene.close()
                self._scene = None


class SO101Arm(LeRobotArm):
    robot_type, config_class = "so101_follower", SO101Config


class KochArm(LeRobotArm):
    robot_type, config_class = "koch_follower", KochConfig
