"""LeRobot's leader arms as our `Teleoperator`: a person takes over a follower arm by moving its leader.

LeRobot's unmodified `SO100Leader` / `SO101Leader` / `KochLeader` (their Feetech / Dynamixel buses and calibration
files, imported only at connect, in LeRobot's virtualenv like the follower adapter `real.robot.lerobot_arm`) read
the leader's joints; the follower's action is those joints in the follower's units (LeRobot degrees about the middle
of each calibrated range, the gripper 0-100). A leader arm has no button, so the keyboard is the pedal: space takes
over and releases, y / n mark the episode a success or a failure (`KeyboardTeleop`'s keys; its motion keys are
ignored here). The follower's safety filter ramps it from where it is to the leader's pose within its velocity and
acceleration limits, as for any other command.

    python -m real.robot --robot so100 --server HOST:PORT --out runs/dagger intervention.enabled=true \\
        intervention.device=leader intervention.leader.port=/dev/ttyACM1 intervention.leader.id=my_leader

numpy only at import time: this runs on the robot computer.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from real.robot.hal import Robot, Teleoperator
from real.robot.keyboard import KeyboardTeleop
from real.robot.lerobot_arm import (
    MAX_RES,
    MOTORS,
    LeRobotArmError,
    default_calibration_dir,
    load_calibration,
    read_retrying,
)
from robopolicy.config import setting

# leader type: (LeRobot module, teleoperator class, config class, calibration folder name, body units)
# body units: "degrees" (use_degrees=True, as our followers) or "m100_100" (LeRobot's -100..100 over the range,
# converted here to degrees about the middle of the leader's calibrated range)
LEROBOT_LEADERS = {
    "so100_leader": ("lerobot.teleoperators.so_leader", "SO100Leader", "SO100LeaderConfig", "so_leader", "degrees"),
    "so101_leader": ("lerobot.teleoperators.so_leader", "SO101Leader", "SO101LeaderConfig", "so_leader", "degrees"),
    "koch_leader": ("lerobot.teleoperators.koch_leader", "KochLeader", "KochLeaderConfig", "koch_leader",
                    "m100_100"),
}


@dataclass
class LeaderConfig:
    """The `intervention.leader:` section of configs/deploy.yaml (intervention.device=leader)."""

    type: str = setting("so100_leader", "LeRobot's leader arm", choices=tuple(LEROBOT_LEADERS))
    port: str = setting("/dev/ttyACM1", "the leader's serial port (lerobot-find-port), or an SO-100 twin's pty")
    id: str = setting("my_leader", "the leader's LeRobot id: its calibration file is <calibration_dir>/<id>.json")
    calibration_dir: str | None = setting(None, "folder of the leader's LeRobot calibration files; null: LeRobot's "
                                          "default ($HF_LEROBOT_CALIBRATION/teleoperators/<leader>)")
    read_retries: int = setting(2, "a read the leader's servos do not answer in time is asked again this many times")


def leader_calibration_dir(leader_type: str) -> Path:
    """Where LeRobot keeps a leader's calibration files ($HF_LEROBOT_CALIBRATION/teleoperators/<name>)."""
    robots = default_calibration_dir("so100_follower").parent  # .../calibration/robots
    return robots.parent / "teleoperators" / LEROBOT_LEADERS[leader_type][3]


class LeaderArm(Teleoperator):
    """A LeRobot leader arm driving `robot` (a LeRobot follower) while the pedal (the keyboard) is down.

    `fd`: where the pedal's keys come from (default: the terminal; a pipe in tests)."""

    def __init__(self, robot: Robot, config: LeaderConfig | None = None, *, fd: int | None = None) -> None:
        self.config = config or LeaderConfig()
        cfg = self.config
        if cfg.type not in LEROBOT_LEADERS:
            raise LeRobotArmError(f"intervention.leader.type={cfg.type!r} is not a LeRobot leader arm: use one of "
                                  f"{', '.join(LEROBOT_LEADERS)}.")
        names = list(robot.action_features["action"]["names"])
        if names != [f"{m}.pos" for m in MOTORS]:
            raise LeRobotArmError(f"A {cfg.type} drives an arm whose actions are {[f'{m}.pos' for m in MOTORS]}; "
                                  f"this robot's are {names}.")
        self.robot = robot
        self.calibration_dir = (Path(cfg.calibration_dir).expanduser() if cfg.calibration_dir
                                else leader_calibration_dir(cfg.type))
        self.calibration = load_calibration(self.calibration_dir / f"{cfg.id}.json")
        self.pedal = KeyboardTeleop(len(MOTORS), robot=robot, fd=fd, drive=False)
        self._leader: Any = None
        self.read_errors = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        if self._leader is not None:
            return
        cfg = self.config
        module, cls_name, config_name, _, units = LEROBOT_LEADERS[cfg.type]
        try:
            lerobot = importlib.import_module(module)
        except ImportError as exc:
            raise LeRobotArmError(f"LeRobot's {cls_name} does not import here ({exc}); run the robot side in "
                                  "LeRobot's virtualenv (make lerobot-env).") from None
        kwargs: dict[str, Any] = {"port": cfg.port, "id": cfg.id, "calibration_dir": self.calibration_dir}
        if units == "degrees":
            kwargs["use_degrees"] = True
        for attempt in range(cfg.read_retries + 1):
            leader = getattr(lerobot, cls_name)(getattr(lerobot, config_name)(**kwargs))
            try:
                leader.connect(calibrate=False)  # LeRobot's calibrate() asks questions on stdin: never here
                break
            except (ConnectionError, OSError, RuntimeError) as exc:
                with contextlib.suppress(Exception):
                    leader.bus.disconnect(disable_torque=False)
                if attempt == cfg.read_retries:
                    raise LeRobotArmError(
                        f"Cannot connect to the {cfg.type} on {cfg.port} "
                        f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); check the port "
                        "(lerobot-find-port), the power and the servo ids.") from None
                time.sleep(0.2)
        if not leader.is_calibrated:  # what LeRobot does when you press ENTER to use the file
            leader.bus.write_calibration(leader.calibration)
        self._leader = leader
        self.pedal.connect()

    def disconnect(self) -> None:
        self.pedal.disconnect()
        if self._leader is not None:
            try:
                if self._leader.is_connected:
                    self._leader.disconnect()
            finally:
                self._leader = None

    def reset(self, seed: int | None = None) -> None:
        self.pedal.reset(seed)

    # ------------------------------------------------------------------------------------------ the HAL side
    @property
    def is_intervening(self) -> bool:
        return self.pedal.is_intervening

    @property
    def outcome(self) -> bool | None:
        return self.pedal.outcome

    def get_action(self) -> np.ndarray | None:
        if not self.pedal.is_intervening:
            return None
        return self.read()

    def read(self) -> np.ndarray:
        """The leader's joints now, in the follower's units [6]."""
        if self._leader is None:
            raise LeRobotArmError("The leader arm is not connected; call connect() (or use `with leader:`).")
        def retried() -> None:
            self.read_errors += 1

        reading = read_retrying(self._leader.get_action, self._leader.bus, self.config.read_retries,
                                f"The {self.config.type} on {self.config.port}", retried)
        values = np.array([reading[f"{m}.pos"] for m in MOTORS], dtype=np.float64)
        if LEROBOT_LEADERS[self.config.type][4] == "m100_100":  # -100..100 over the range -> degrees about its middle
            for i, motor in enumerate(MOTORS[:-1]):
                lo, hi = self.calibration[motor]["range_min"], self.calibration[motor]["range_max"]
                values[i] = values[i] / 100.0 * (hi - lo) / 2 * 360.0 / MAX_RES
        return values
