"""MuJoCo models of the industrial arms, written from their published DH tables (`real.robot.arm_specs`), and
the real-time or virtual-clock servo loop the vendor-client stand-ins (`real.host.ur_standin`,
`real.host.franka_standin`) run them with.

The model is kinematically the arm the vendor publishes (every joint frame from the DH table, joint ranges from
the datasheet) with capsule links carrying the published link masses; position servos with gravity compensation
stand for the vendor's joint controllers. Meshes do not matter to a driver, so there are none.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import mujoco
import numpy as np

from real.robot.arm_specs import ArmSpec


def _euler_x(alpha: float) -> str:
    return f"{alpha:.10g} 0 0"


def build_mjcf(spec: ArmSpec) -> str:
    """The arm as MJCF: one body per DH frame, a hinge about its z axis, a capsule to the next frame."""
    frames = []  # (pos, alpha) of body i in body i-1, and where the link after joint i ends
    if spec.convention == "standard":
        # joint i turns about z_{i-1}; frame i sits at Tz(d_i) Tx(a_i) Rx(alpha_i) in the rotated frame i-1
        pos, alpha = np.zeros(3), 0.0
        for a, d, al in spec.dh:
            frames.append((pos, alpha))
            pos, alpha = np.array([a, 0.0, d]), al
        flange = (pos, alpha)
    else:
        # Craig's: body i = Tx(a_{i-1}) Rx(alpha_{i-1}) Tz(d_i), the joint about its z
        for a, d, al in spec.dh:
            frames.append((np.array([a, 0.0, 0.0]) + _rot_x(al) @ np.array([0.0, 0.0, d]), al))
        a, d, al = spec.flange
        flange = (np.array([a, 0.0, 0.0]) + _rot_x(al) @ np.array([0.0, 0.0, d]), al)
    children = [*frames[1:], flange]
    bodies, close = [], []
    for i, ((pos, alpha), (child_pos, _)) in enumerate(zip(frames, children, strict=True)):
        lo, hi = spec.position_lower[i], spec.position_upper[i]
        length = float(np.linalg.norm(child_pos))
        mass = spec.link_masses[i]
        inertia = max(mass * (0.05**2 + length**2 / 12.0), 1e-4)
        geom = (f'<geom type="capsule" fromto="0 0 0 {child_pos[0]:.6g} {child_pos[1]:.6g} {child_pos[2]:.6g}" '
                f'size="0.04" mass="0" rgba="0.6 0.6 0.65 1"/>' if length > 1e-6 else
                '<geom type="sphere" size="0.045" mass="0" rgba="0.6 0.6 0.65 1"/>')
        bodies.append(
            f'<body name="link{i + 1}" pos="{pos[0]:.10g} {pos[1]:.10g} {pos[2]:.10g}" euler="{_euler_x(alpha)}" '
            f'gravcomp="1">'
            f'<joint name="joint{i + 1}" axis="0 0 1" range="{lo:.10g} {hi:.10g}" limited="true" '
            f'armature="0.1" damping="0.5"/>'
            f'<inertial pos="{child_pos[0] / 2:.6g} {child_pos[1] / 2:.6g} {child_pos[2] / 2:.6g}" mass="{mass}" '
            f'diaginertia="{inertia:.6g} {inertia:.6g} {inertia:.6g}"/>{geom}')
        close.append("</body>")
    fpos, falpha = flange
    bodies.append(f'<body name="flange" pos="{fpos[0]:.10g} {fpos[1]:.10g} {fpos[2]:.10g}" '
                  f'euler="{_euler_x(falpha)}"><site name="flange" size="0.01"/></body>')
    # Position servos stiff enough to track within a servo tick (the vendor's joint controllers)
    actuators = "".join(
        f'<position joint="joint{i + 1}" kp="{4000 * m:.6g}" kv="{150 * m:.6g}" '
        f'ctrlrange="{spec.position_lower[i]:.10g} {spec.position_upper[i]:.10g}" ctrllimited="true"/>'
        for i, m in enumerate(np.maximum(spec.link_masses, 1.0))
    )
    dt = 1.0 / spec.servo_hz / 2
    return (f'<mujoco model="{spec.name}"><compiler angle="radian" autolimits="true"/>'
            f'<option timestep="{dt:.6g}" integrator="implicitfast"/>'
            f'<worldbody><light pos="0 0 3"/><geom type="plane" size="2 2 0.1" pos="0 0 -0.01"/>'
            f'{"".join(bodies)}{"".join(close)}</worldbody><actuator>{actuators}</actuator></mujoco>')


def _rot_x(t: float) -> np.ndarray:
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


class ServoArm:
    """A MuJoCo arm stepped one servo tick at a time, on the wall clock (`realtime=True`, a thread, as the
    controller runs) or on a virtual clock advanced by the client's blocking calls (`advance(seconds)`), which
    lets a test run thousands of commands without sleeping. `on_tick(t)` returns the joint setpoint [dof] of
    that tick (the vendor's trajectory generator); it runs with `lock` held."""

    def __init__(self, spec: ArmSpec, on_tick: Callable[[float], np.ndarray], realtime: bool = True) -> None:
        self.spec = spec
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(spec))
        self.data = mujoco.MjData(self.model)
        self.data.qpos[:] = spec.home
        self.data.ctrl[:] = spec.home
        mujoco.mj_forward(self.model, self.data)
        self.tick_s = 1.0 / spec.servo_hz
        self.substeps = max(1, round(self.tick_s / self.model.opt.timestep))
        self.on_tick = on_tick
        self.time = 0.0  # controller time [s] (RTDE's getTimestamp, libfranka's state.time)
        self.lock = threading.RLock()
        self.realtime = realtime
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flange_site = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, "flange")

    def start(self) -> None:
        if self.realtime and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"{self.spec.name}-servo", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def tick(self) -> None:
        with self.lock:
            self.data.ctrl[:] = self.on_tick(self.time)
            mujoco.mj_step(self.model, self.data, nstep=self.substeps)
            self.time += self.tick_s

    def advance(self, seconds: float) -> None:
        """Virtual clock: run the controller for `seconds` (a blocking vendor call); realtime: just wait."""
        if self.realtime:
            time.sleep(max(seconds, 0.0))
            return
        for _ in range(max(1, round(seconds / self.tick_s))):
            self.tick()

    def _run(self) -> None:
        start = time.monotonic()
        done = 0
        while not self._stop.is_set():
            due = int((time.monotonic() - start) / self.tick_s)
            if due - done > 50:  # starved (a loaded machine): skip ahead rather than race
                done = due - 50
            while done < due:
                self.tick()
                done += 1
            time.sleep(self.tick_s)

    @property
    def q(self) -> np.ndarray:
        with self.lock:
            return self.data.qpos[: self.spec.dof].copy()

    @property
    def qd(self) -> np.ndarray:
        with self.lock:
            return self.data.qvel[: self.spec.dof].copy()

    def flange_pose(self) -> np.ndarray:
        """[4, 4] pose of the flange in the base frame (the model's, so its own FK is checked against the DH)."""
        with self.lock:
            pose = np.eye(4)
            pose[:3, :3] = self.data.site_xmat[self.flange_site].reshape(3, 3)
            pose[:3, 3] = self.data.site_xpos[self.flange_site]
            return pose
