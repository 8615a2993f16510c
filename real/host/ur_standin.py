"""A stand-in for ur_rtde's client classes, moving a MuJoCo UR e-Series arm (`real.host.arm_model`).

`URStandin(model)` is one simulated controller; its `RTDEControlInterface(hostname)` and
`RTDEReceiveInterface(hostname)` have the names, signatures and behaviour of ur_rtde 1.6's classes for the calls
the driver (`real.robot.ur`) makes, so the driver takes it in place of the vendor modules:
`URRobot(vendor=URStandin("ur5e"))`. What the real controller does and this one copies:
- a 500 Hz servo loop; `servoJ(q, speed, acceleration, time, lookahead_time, gain)` sets a target the servo
  approaches with the lookahead time constant (speed and acceleration unused, as in ur_rtde) and returns at once
  (on the virtual clock, `realtime=False`, it runs the controller for `time`: "blocking for time t");
- a target out of the joint range, or one that needs more than the datasheet's joint speed, is a protective stop,
  after which every motion call raises RuntimeError as ur_rtde does when its control script is not running;
- `servoStop(a)` / `speedStop(a)` / `stopJ(a, asynchronous)` decelerate at `a`; `stopJ` blocks until at rest;
- `setWatchdog(min_frequency)` / `kickWatchdog()`: no kick for 1 / min_frequency stops the arm and the script.
`violations` lists every limit the arm itself (not just the commands) exceeded: tests assert it stays empty.
Not copied: Cartesian servoing (servoL, speedL), the dashboard client, I/O, force mode.
"""

from __future__ import annotations

import time

import numpy as np

from real.host.arm_model import ServoArm
from real.robot.arm_specs import ARMS, rotation_vector


class URStandin:
    """One simulated UR controller; `RTDEControlInterface` / `RTDEReceiveInterface` connect to it."""

    def __init__(self, model: str = "ur5e", realtime: bool = True, home: list[float] | None = None) -> None:
        self.spec = ARMS[model]
        self.arm = ServoArm(self.spec, self._on_tick, realtime=realtime)
        if home is not None:
            self.arm.data.qpos[: self.spec.dof] = home
        self.setpoint = self.arm.q
        self.velocity = np.zeros(self.spec.dof)
        self.target = self.setpoint.copy()
        self.mode = "idle"  # idle | servo | speed | stopping
        self.lookahead_s = 0.1
        self.decel = 2.0
        self.speed_target = np.zeros(self.spec.dof)
        self.speed_accel = 0.5
        self.script_running = False
        self.protective_stopped = False
        self.protective_stops = 0
        self.watchdog_period: float | None = None
        self.last_kick = 0.0
        self.connections = 0
        self.watchdog_trips = 0
        self.violations: list[str] = []
        self.max_abs_velocity = np.zeros(self.spec.dof)  # the servo setpoint's, over the whole run
        self._vmax = np.asarray(self.spec.max_velocity)
        self._lo, self._hi = np.asarray(self.spec.position_lower), np.asarray(self.spec.position_upper)

    # vendor-module look-alikes: URRobot(vendor=standin) calls standin.RTDEControlInterface(host), ...
    def RTDEControlInterface(self, hostname: str, frequency: float = -1.0, flags: int = 1, ur_cap_port: int = 50002,
                             rt_priority: int = 0) -> _Control:  # noqa: N802 (ur_rtde's names)
        return _Control(self, hostname)

    def RTDEReceiveInterface(self, hostname: str, frequency: float = -1.0, variables: list[str] | None = None,
                             verbose: bool = False, use_upper_range_registers: bool = False,
                             rt_priority: int = 0) -> _Receive:  # noqa: N802
        return _Receive(self, hostname)

    # ------------------------------------------------------------------------------------- controller
    def _on_tick(self, now: float) -> np.ndarray:
        dt = self.arm.tick_s
        if self.watchdog_period and self.script_running and now - self.last_kick > self.watchdog_period:
            self._begin_stop(4.0)
            self.script_running = False
            self.watchdog_trips += 1
        if self.mode == "servo":
            velocity = (self.target - self.setpoint) / self.lookahead_s
            if (np.abs(velocity) > self._vmax * (1 + 1e-9)).any():
                self.protective_stop(f"servoJ target needs {np.abs(velocity).max():.3f} rad/s, above the "
                                     f"datasheet joint speed")
            else:
                self.velocity = velocity
        elif self.mode == "speed":
            change = np.clip(self.speed_target - self.velocity, -self.speed_accel * dt, self.speed_accel * dt)
            self.velocity = self.velocity + change
        elif self.mode == "stopping":
            slower = np.maximum(np.abs(self.velocity) - self.decel * dt, 0.0)
            self.velocity = np.sign(self.velocity) * slower
            if not slower.any():
                self.mode = "idle"
        else:
            self.velocity = np.zeros(self.spec.dof)
        self.setpoint = self.setpoint + self.velocity * dt
        self.max_abs_velocity = np.maximum(self.max_abs_velocity, np.abs(self.velocity))
        if ((self.setpoint < self._lo) | (self.setpoint > self._hi)).any():
            self.setpoint = np.clip(self.setpoint, self._lo, self._hi)
            self.protective_stop("joint position limit")
        self._check_measured()
        return self.setpoint

    def _check_measured(self) -> None:
        q, qd = self.arm.data.qpos[: self.spec.dof], self.arm.data.qvel[: self.spec.dof]
        if ((q < self._lo - 1e-3) | (q > self._hi + 1e-3)).any():
            self.violations.append(f"t={self.arm.time:.3f}: joint position {q.tolist()} out of range")
        if (np.abs(qd) > self._vmax * 1.05).any():
            self.violations.append(f"t={self.arm.time:.3f}: joint speed {np.abs(qd).max():.3f} rad/s")

    def protective_stop(self, reason: str) -> None:
        if not self.protective_stopped:
            self.protective_stops += 1
            self.violations.append(f"protective stop: {reason}")
        self.protective_stopped = True
        self.script_running = False
        self._begin_stop(10.0)

    def _begin_stop(self, decel: float) -> None:
        self.decel = float(decel)
        self.mode = "stopping" if self.velocity.any() else "idle"

    def unlock_protective_stop(self) -> None:
        """What the pendant (or the dashboard's unlockProtectiveStop) does."""
        with self.arm.lock:
            self.protective_stopped = False

    @property
    def moving(self) -> bool:
        return self.mode != "idle"

    def close(self) -> None:
        self.arm.close()


class _Control:
    """ur_rtde.RTDEControlInterface: uploads the control script on connect; motion calls raise once it stops."""

    def __init__(self, ctrl: URStandin, hostname: str) -> None:
        self._c, self.hostname = ctrl, hostname
        self._connected = True
        ctrl.connections += 1
        with ctrl.arm.lock:
            ctrl.script_running = not ctrl.protective_stopped
            ctrl.last_kick = ctrl.arm.time
        ctrl.arm.start()

    def _running(self) -> URStandin:
        c = self._c
        if not self._connected:
            raise RuntimeError("RTDE control interface is not connected")
        if not c.script_running:
            raise RuntimeError("RTDE control script is not running!")
        return c

    def servoJ(self, q, speed, acceleration, time_s, lookahead_time, gain) -> bool:  # noqa: N802
        c = self._running()
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (c.spec.dof,) or not np.isfinite(q).all():
            raise RuntimeError(f"servoJ needs {c.spec.dof} finite joint positions")
        with c.arm.lock:
            if ((q < c._lo) | (q > c._hi)).any():
                c.protective_stop("servoJ target outside the joint limits")
                return False
            if c.mode != "servo":  # entering servo mode starts from the present setpoint
                c.target = c.setpoint.copy()
            c.mode, c.target = "servo", q.copy()
            c.lookahead_s = float(np.clip(lookahead_time, 0.03, 0.2))
        c.arm.advance(time_s)
        return True

    def speedJ(self, qd, acceleration: float = 0.5, time_s: float = 0.0) -> bool:  # noqa: N802
        c = self._running()
        with c.arm.lock:
            c.mode, c.speed_target, c.speed_accel = "speed", np.asarray(qd, dtype=np.float64), float(acceleration)
        c.arm.advance(time_s)
        return True

    def servoStop(self, a: float = 10.0) -> bool:  # noqa: N802
        c = self._running()
        with c.arm.lock:
            if c.mode in ("servo", "speed"):
                c._begin_stop(a)
        return True

    def speedStop(self, a: float = 10.0) -> bool:  # noqa: N802
        return self.servoStop(a)

    def stopJ(self, a: float = 2.0, asynchronous: bool = False) -> None:  # noqa: N802
        c = self._c
        if not self._connected:
            raise RuntimeError("RTDE control interface is not connected")
        with c.arm.lock:
            c._begin_stop(a)
        if not asynchronous:
            deadline = time.monotonic() + 10.0
            while c.moving and time.monotonic() < deadline:
                c.arm.advance(c.arm.tick_s * (1 if c.arm.realtime else 10))

    def setWatchdog(self, min_frequency: float = 10.0) -> bool:  # noqa: N802
        c = self._running()
        with c.arm.lock:
            c.watchdog_period, c.last_kick = 1.0 / float(min_frequency), c.arm.time
        return True

    def kickWatchdog(self) -> bool:  # noqa: N802
        c = self._running()
        with c.arm.lock:
            c.last_kick = c.arm.time
        return True

    def triggerProtectiveStop(self) -> bool:  # noqa: N802
        with self._c.arm.lock:
            self._c.protective_stop("triggered by the client")
        return True

    def isProgramRunning(self) -> bool:  # noqa: N802
        return self._c.script_running

    def stopScript(self) -> None:  # noqa: N802
        with self._c.arm.lock:
            self._c.script_running = False
            self._c.watchdog_period = None

    def isConnected(self) -> bool:  # noqa: N802
        return self._connected

    def reconnect(self) -> bool:
        """Reconnect and upload the control script again (its watchdog is off until set again)."""
        self._connected = True
        with self._c.arm.lock:
            self._c.script_running = not self._c.protective_stopped
            self._c.watchdog_period = None
        return True

    def disconnect(self) -> None:
        self._connected = False

    def initPeriod(self):  # noqa: N802
        return time.monotonic()

    def waitPeriod(self, t_start) -> None:  # noqa: N802
        pass


class _Receive:
    """ur_rtde.RTDEReceiveInterface: the controller's state at its 500 Hz rate."""

    def __init__(self, ctrl: URStandin, hostname: str) -> None:
        self._c, self.hostname = ctrl, hostname
        self._connected = True
        ctrl.arm.start()

    def getActualQ(self) -> list[float]:  # noqa: N802
        return self._c.arm.q.tolist()

    def getActualQd(self) -> list[float]:  # noqa: N802
        return self._c.arm.qd.tolist()

    def getTargetQ(self) -> list[float]:  # noqa: N802
        with self._c.arm.lock:
            return self._c.setpoint.tolist()

    def getActualTCPPose(self) -> list[float]:  # noqa: N802
        pose = self._c.arm.flange_pose()
        return [*pose[:3, 3].tolist(), *rotation_vector(pose[:3, :3]).tolist()]

    def getTimestamp(self) -> float:  # noqa: N802
        return self._c.arm.time

    def getRobotMode(self) -> int:  # noqa: N802
        return 7  # ROBOT_MODE_RUNNING

    def isProtectiveStopped(self) -> bool:  # noqa: N802
        return self._c.protective_stopped

    def isEmergencyStopped(self) -> bool:  # noqa: N802
        return False

    def getSafetyStatusBits(self) -> int:  # noqa: N802
        return (1 << 2) if self._c.protective_stopped else 1  # bit 0 normal mode, bit 2 protective stop

    def isConnected(self) -> bool:  # noqa: N802
        return self._connected

    def disconnect(self) -> None:
        self._connected = False
