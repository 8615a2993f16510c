"""A stand-in for franky-control's API, moving a MuJoCo Franka Panda built from Franka's published DH table.

`FrankaStandin()` is one simulated arm and exposes, as attributes, the franky names the driver
(`real.robot.franka`) uses: `Robot(fci_hostname, relative_dynamics_factor=...)`, `Gripper(fci_hostname)`,
`JointMotion(JointState(q))`, `JointState`, `RelativeDynamicsFactor`, `ControlException`, `Exception`; so the
driver takes it in place of the `franky` module: `FrankaRobot(vendor=FrankaStandin())`. What it copies:
- a 1 kHz control loop; `move(JointMotion, asynchronous=True)` replaces the running motion at once and the
  trajectory generator heads for the new target from the present state within the joint velocity and
  acceleration limits scaled by the relative dynamics factor (franky's Ruckig also limits jerk: not copied);
- reflexes: a target outside the joint range, or the arm itself leaving its range or speed, aborts the motion
  with a `ControlException` (raised by `move`, `poll_motion` or `join_motion`) and `has_errors` stays set until
  `recover_from_errors()`;
- `stop()` ends the motion, braking at the acceleration limit; `move(..., asynchronous=False)` blocks until the
  target is reached; on the virtual clock (`realtime=False`) the caller advances time with `advance(seconds)`;
- the Franka Hand: `width`, `max_width`, `move(width, speed)`, `move_async`, `stop`, `homing`.
`violations` lists every limit the arm itself exceeded: tests assert it stays empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from real.host.arm_model import ServoArm
from real.robot.arm_specs import ARMS, PANDA_GRIPPER_MAX_WIDTH


class FrankyException(Exception):  # noqa: N818 (franky's name: franky.Exception)
    pass


class ControlException(FrankyException):  # noqa: N818
    pass


class RelativeDynamicsFactor:
    def __init__(self, velocity: float = 1.0, acceleration: float | None = None, jerk: float | None = None) -> None:
        self.velocity = float(velocity)
        self.acceleration = float(velocity if acceleration is None else acceleration)
        self.jerk = float(velocity if jerk is None else jerk)
        for value in (self.velocity, self.acceleration, self.jerk):
            if not 0 < value <= 1:
                raise ValueError("RelativeDynamicsFactor values must be in (0, 1]")


class JointState:
    def __init__(self, position, velocity=None) -> None:
        self.position = np.asarray(position, dtype=np.float64).copy()
        self.velocity = np.zeros(7) if velocity is None else np.asarray(velocity, dtype=np.float64).copy()


class JointMotion:
    def __init__(self, target: JointState, reference_type=None, relative_dynamics_factor=1.0,
                 return_when_finished: bool = True) -> None:
        self.target = target
        self.relative_dynamics_factor = relative_dynamics_factor


@dataclass
class VectorDynamicsLimit:
    """franky's joint limits: `max` is Franka's, `get()` the value in force."""

    max: np.ndarray
    value: np.ndarray

    def get(self) -> np.ndarray:
        return self.value.copy()

    def set(self, value) -> None:
        self.value = np.minimum(np.asarray(value, dtype=np.float64), self.max)


class FrankaStandin:
    """One simulated Panda with its hand; its attributes mirror the `franky` module."""

    Exception = FrankyException
    ControlException = ControlException
    JointMotion = JointMotion
    JointState = JointState
    RelativeDynamicsFactor = RelativeDynamicsFactor

    def __init__(self, realtime: bool = True) -> None:
        self.spec = ARMS["panda"]
        self.arm = ServoArm(self.spec, self._on_tick, realtime=realtime)
        self.setpoint = self.arm.q
        self.velocity = np.zeros(7)
        self.target: np.ndarray | None = None  # the running motion's goal; None: no motion
        self.stopping = False
        self.rdf = 1.0
        self.error: str | None = None
        self.reflexes = 0
        self.violations: list[str] = []
        self.gripper_width = PANDA_GRIPPER_MAX_WIDTH
        self.gripper_goal = PANDA_GRIPPER_MAX_WIDTH
        self.gripper_speed = 0.05
        self._lo, self._hi = np.asarray(self.spec.position_lower), np.asarray(self.spec.position_upper)
        self._vmax, self._amax = np.asarray(self.spec.max_velocity), np.asarray(self.spec.max_acceleration)

    def Robot(self, fci_hostname: str, relative_dynamics_factor=1.0, **kwargs) -> _Robot:  # noqa: N802
        return _Robot(self, fci_hostname, relative_dynamics_factor)

    def Gripper(self, fci_hostname: str) -> _Gripper:  # noqa: N802
        return _Gripper(self)

    def advance(self, seconds: float) -> None:
        self.arm.advance(seconds)

    def close(self) -> None:
        self.arm.close()

    @property
    def moving(self) -> bool:
        return self.target is not None or self.stopping

    # ------------------------------------------------------------------------------------- controller
    def _on_tick(self, now: float) -> np.ndarray:
        dt = self.arm.tick_s
        vmax, amax = self._vmax * self.rdf, self._amax * self.rdf
        if self.target is not None and self.error is None:
            # time-optimal per joint: the fastest speed from which the joint still stops at the target
            gap = self.target - self.setpoint
            stop_speed = np.sqrt(2.0 * amax * np.abs(gap))
            desired = np.sign(gap) * np.minimum(vmax, np.minimum(stop_speed, np.abs(gap) / dt))
            self.velocity = self.velocity + np.clip(desired - self.velocity, -amax * dt, amax * dt)
            if np.abs(gap).max() < 1e-6 and np.abs(self.velocity).max() < 1e-6:
                self.velocity[:] = 0.0
                self.target = None
        else:  # stopped, or a reflex: brake at the acceleration limit
            self.velocity = np.sign(self.velocity) * np.maximum(np.abs(self.velocity) - self._amax * dt, 0.0)
            if not self.velocity.any():
                self.stopping = False
        self.setpoint = self.setpoint + self.velocity * dt
        step = np.clip(self.gripper_goal - self.gripper_width, -self.gripper_speed * dt, self.gripper_speed * dt)
        self.gripper_width += float(step)
        q, qd = self.arm.data.qpos[:7], self.arm.data.qvel[:7]
        if ((q < self._lo - 1e-3) | (q > self._hi + 1e-3)).any():
            self._reflex("joint_position_limits_violation")
            self.violations.append(f"t={now:.3f}: joint position {q.tolist()} out of range")
        if (np.abs(qd) > self._vmax * 1.05).any():
            self._reflex("joint_velocity_violation")
            self.violations.append(f"t={now:.3f}: joint speed {np.abs(qd).max():.3f} rad/s")
        return self.setpoint

    def _reflex(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            self.reflexes += 1
        self.target, self.stopping = None, True


class _Robot:
    """franky.Robot (the calls the driver makes)."""

    def __init__(self, arm: FrankaStandin, hostname: str, relative_dynamics_factor) -> None:
        self._a, self.fci_hostname = arm, hostname
        self.relative_dynamics_factor = relative_dynamics_factor
        self.joint_velocity_limit = VectorDynamicsLimit(arm._vmax.copy(), arm._vmax.copy())
        self.joint_acceleration_limit = VectorDynamicsLimit(arm._amax.copy(), arm._amax.copy())
        arm.arm.start()

    @property
    def relative_dynamics_factor(self) -> float:
        return self._a.rdf

    @relative_dynamics_factor.setter
    def relative_dynamics_factor(self, value) -> None:
        factor = value.velocity if isinstance(value, RelativeDynamicsFactor) else float(value)
        if not 0 < factor <= 1:
            raise ValueError("relative_dynamics_factor must be in (0, 1]")
        self._a.rdf = factor

    def _raise_error(self) -> None:
        if self._a.error is not None:
            raise ControlException(f"libfranka: Move command aborted: motion aborted by reflex! [{self._a.error}]")

    def move(self, motion: JointMotion, asynchronous: bool = False, limit_rate: bool = False,
             cutoff_frequency: float = 100.0) -> None:
        a = self._a
        with a.arm.lock:
            self._raise_error()
            target = motion.target.position
            if target.shape != (7,) or not np.isfinite(target).all():
                raise ControlException("libfranka: invalid joint motion target")
            if ((target < a._lo) | (target > a._hi)).any():
                a._reflex("joint_motion_generator_position_limits_violation")
                self._raise_error()
            a.target, a.stopping = target.copy(), False
        if not asynchronous:
            self.join_motion()

    def join_motion(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._a.target is not None and self._a.error is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._a.advance(self._a.arm.tick_s * (1 if self._a.arm.realtime else 10))
        self._raise_error()
        return True

    def poll_motion(self) -> bool:
        self._raise_error()
        return self._a.target is not None

    def stop(self) -> None:
        with self._a.arm.lock:
            self._a.target, self._a.stopping = None, bool(self._a.velocity.any())

    @property
    def is_in_control(self) -> bool:
        return self._a.moving

    @property
    def has_errors(self) -> bool:
        return self._a.error is not None

    def recover_from_errors(self) -> bool:
        a = self._a
        with a.arm.lock:
            if a.velocity.any():  # libfranka recovers once the arm is at rest
                a.stopping = True
                return False
            a.error = None
            a.setpoint = a.arm.q
        return True

    @property
    def current_joint_state(self) -> JointState:
        return JointState(self._a.arm.q, self._a.arm.qd)

    @property
    def current_joint_positions(self) -> np.ndarray:
        return self._a.arm.q


class _Gripper:
    """franky.Gripper: a Franka Hand moving at `speed` toward a width."""

    def __init__(self, arm: FrankaStandin) -> None:
        self._a = arm
        self.max_width = PANDA_GRIPPER_MAX_WIDTH

    @property
    def width(self) -> float:
        return self._a.gripper_width

    def move_async(self, width: float, speed: float):
        if not 0.0 <= width <= self.max_width:
            raise ControlException(f"gripper width {width} outside [0, {self.max_width}]")
        with self._a.arm.lock:
            self._a.gripper_goal, self._a.gripper_speed = float(width), float(speed)
        return True

    def move(self, width: float, speed: float) -> bool:
        self.move_async(width, speed)
        while abs(self._a.gripper_width - self._a.gripper_goal) > 1e-6:
            self._a.advance(0.01)
        return True

    def homing(self) -> bool:
        return self.move(self.max_width, 0.1)

    def stop(self) -> bool:
        with self._a.arm.lock:
            self._a.gripper_goal = self._a.gripper_width
        return True
