"""Published kinematics and limits of the industrial arms the drivers support (vendor data, no hardware needed).

One `ArmSpec` per arm model: the Denavit-Hartenberg table the vendor publishes, the joint position range and
the maximum joint speeds and accelerations of its datasheet. The drivers (`real.robot.ur`, `real.robot.franka`)
derive their safety limits from these; the MuJoCo stand-ins on the workstation (`real.host.arm_model`) build
their models from the same tables, so a test against a stand-in checks the kinematics and limits the real arm has.

Sources: Universal Robots, "DH parameters for calculations of kinematics and dynamics" and the e-Series
datasheets (joint ranges +-360 deg; UR5e/UR3e 180 deg/s on every joint, UR10e 120 deg/s on base and shoulder);
Franka Robotics, "Robot and interface specifications" (Panda / FR3 modified DH, q/dq/ddq limits).
numpy + standard library: this runs on the robot computer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class ArmSpec:
    """An arm's published data. `dh` rows are (a, d, alpha) per joint [m, m, rad]; `convention` is "standard"
    (T_i = Rz(q) Tz(d) Tx(a) Rx(alpha), UR) or "modified" (Craig's: T_i = Rx(alpha) Tx(a) Rz(q) Tz(d), Franka),
    `flange` the (a, d, alpha) after the last joint (modified convention only)."""

    name: str
    convention: str
    dh: tuple[tuple[float, float, float], ...]
    position_lower: tuple[float, ...]
    position_upper: tuple[float, ...]
    max_velocity: tuple[float, ...]  # rad/s, the datasheet's
    max_acceleration: tuple[float, ...]  # rad/s^2 (UR publishes none: ur_rtde's servo limit, 40 rad/s^2, is used)
    link_masses: tuple[float, ...]  # kg, for the stand-in's dynamics
    home: tuple[float, ...]  # a safe, singularity-free posture
    servo_hz: float  # the controller's servo rate (UR: 500 Hz RTDE, Franka: 1 kHz FCI)
    flange: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def dof(self) -> int:
        return len(self.dh)

    def forward_kinematics(self, q: np.ndarray) -> np.ndarray:
        """The flange pose [4, 4] in the base frame for joint positions q [dof]."""
        pose = np.eye(4)
        for (a, d, alpha), angle in zip(self.dh, np.asarray(q, dtype=np.float64), strict=True):
            if self.convention == "standard":
                pose = pose @ _rz(angle) @ _tz(d) @ _tx(a) @ _rx(alpha)
            else:
                pose = pose @ _rx(alpha) @ _tx(a) @ _rz(angle) @ _tz(d)
        if self.convention == "modified":
            a, d, alpha = self.flange
            pose = pose @ _rx(alpha) @ _tx(a) @ _tz(d)
        return pose


def _rz(t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _rx(t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])


def _tz(d: float) -> np.ndarray:
    out = np.eye(4)
    out[2, 3] = d
    return out


def _tx(a: float) -> np.ndarray:
    out = np.eye(4)
    out[0, 3] = a
    return out


def rotation_vector(rotation: np.ndarray) -> np.ndarray:
    """Axis-angle vector [3] of a rotation matrix (UR's pose convention: x, y, z, rx, ry, rz)."""
    r = np.asarray(rotation, dtype=np.float64)
    # the quaternion by Shepperd's method (stable for every angle), then angle * axis
    trace = np.trace(r)
    i = int(np.argmax([trace, r[0, 0], r[1, 1], r[2, 2]]))
    if i == 0:
        w = math.sqrt(1.0 + trace) / 2.0
        v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (4.0 * w)
    else:
        j, k = (i % 3), ((i + 1) % 3)
        a = i - 1
        s = math.sqrt(max(1.0 + 2.0 * r[a, a] - trace, 0.0))
        v = np.zeros(3)
        v[a] = s / 2.0
        v[j] = (r[a, j] + r[j, a]) / (2.0 * s)
        v[k] = (r[a, k] + r[k, a]) / (2.0 * s)
        w = (r[k, j] - r[j, k]) / (2.0 * s)
    if w < 0:
        w, v = -w, -v
    norm = float(np.linalg.norm(v))
    if norm < 1e-12:
        return np.zeros(3)
    return 2.0 * math.atan2(norm, w) * v / norm


_UR_RANGE = ((-TWO_PI,) * 6, (TWO_PI,) * 6)
_UR_ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)
_UR_HOME = (0.0, -math.pi / 2, math.pi / 2, -math.pi / 2, -math.pi / 2, 0.0)


def _ur(name: str, a: tuple, d: tuple, speed_deg: tuple, masses: tuple) -> ArmSpec:
    return ArmSpec(
        name=name, convention="standard", dh=tuple(zip(a, d, _UR_ALPHA, strict=True)),
        position_lower=_UR_RANGE[0], position_upper=_UR_RANGE[1],
        max_velocity=tuple(math.radians(s) for s in speed_deg), max_acceleration=(40.0,) * 6,
        link_masses=masses, home=_UR_HOME, servo_hz=500.0,
    )


ARMS: dict[str, ArmSpec] = {
    "ur3e": _ur("ur3e", (0, -0.24355, -0.2132, 0, 0, 0), (0.15185, 0, 0, 0.13105, 0.08535, 0.0921),
                (180,) * 3 + (360,) * 3, (1.98, 3.4445, 1.437, 0.871, 0.805, 0.261)),
    "ur5e": _ur("ur5e", (0, -0.425, -0.3922, 0, 0, 0), (0.1625, 0, 0, 0.1333, 0.0997, 0.0996),
                (180,) * 6, (3.761, 8.058, 2.846, 1.37, 1.3, 0.365)),
    "ur10e": _ur("ur10e", (0, -0.6127, -0.57155, 0, 0, 0), (0.1807, 0, 0, 0.17415, 0.11985, 0.11655),
                 (120, 120) + (180,) * 4, (7.369, 13.051, 3.989, 2.1, 1.98, 0.615)),
    "panda": ArmSpec(
        name="panda", convention="modified",
        dh=((0, 0.333, 0), (0, 0, -math.pi / 2), (0, 0.316, math.pi / 2), (0.0825, 0, math.pi / 2),
            (-0.0825, 0.384, -math.pi / 2), (0, 0, math.pi / 2), (0.088, 0, math.pi / 2)),
        flange=(0.0, 0.107, 0.0),
        position_lower=(-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973),
        position_upper=(2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973),
        max_velocity=(2.1750, 2.1750, 2.1750, 2.1750, 2.6100, 2.6100, 2.6100),
        max_acceleration=(15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0),
        link_masses=(4.97, 0.65, 3.23, 3.59, 1.23, 1.67, 0.74),
        home=(0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4),
        servo_hz=1000.0,
    ),
}
PANDA_GRIPPER_MAX_WIDTH = 0.08  # m, Franka Hand
