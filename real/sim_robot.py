"""A simulated robot: a built-in MuJoCo task running in real time in its own process, behind the HAL.

The driver process advances physics by wall-clock time (2 ms steps), so the arm keeps moving while the
policy thinks, exactly as a real arm would. It samples the latest command at the task's own control rate
(10 Hz for the built-in tasks, like a servo sampling its setpoint), so the action semantics are those the
policy was trained with, whatever rate the control node sends at. The sampling instants are phase-locked to
the node's command stream: the first command of an episode places them half a control period after the
node's ticks. Without that, two clocks with the same period tick within a millisecond of each other and OS
jitter decides whether a sample sees this tick's command or the previous one, so ee_delta moves get doubled
or skipped at random; a real servo sampling at a kilohertz has no such race.

The robot's state stream is synchronous with its control cycle (as libfranka's or RTDE's are): a frame is
captured at every servo tick and, with `sensor_hz` above the task's rate, at that rate in between. Frames are
published `sensor_latency_s` after capture, stamped with their capture time (time.monotonic, which is shared
by all processes of the machine). The default is one frame per tick: the built-in tasks' state holds joint
velocities, which swing within a 100 ms servo window, and a policy trained on tick-aligned states loses most
of its success when fed mid-window ones.

Faults on request (`inject_fault`): "stale" (the same old frame is published again), "drop" (no frames),
"nan" (state full of NaN), "delay" (extra sensor latency). Transport: a socketpair carrying length-framed
msgpack messages (no pickle); commands are one-way, so `send_action` never waits for the simulator.

This module imports only numpy, msgpack and the standard library; MuJoCo and `sim` are imported inside the
driver process.
"""

from __future__ import annotations

import math
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

import msgpack
import numpy as np

from real.hal import Robot, RobotLimits
from real.protocol import _array, _encode_value, frame, recv_frame

FAULTS = ("stale", "drop", "nan", "delay")
MAX_CATCH_UP_S = 0.25  # a driver starved for longer than this skips ahead instead of racing to catch up


class SimRobotError(RuntimeError):
    """The simulator process failed, or was asked something it cannot do."""


def _pack(message: dict) -> bytes:
    return frame(msgpack.packb(_encode_value(message), use_bin_type=True))


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"}:
            return _array(value, "sim_robot")
        return {k: _decode(v) for k, v in value.items()}
    return value


def _recv(sock: socket.socket, deadline: float | None = None) -> dict | None:
    payload = recv_frame(sock, deadline=deadline)
    return None if payload is None else _decode(msgpack.unpackb(payload, raw=False))


class SimRobot(Robot):
    """A built-in task (`builtin/<name>`) as a robot; actions are the task's (ee_delta: [dx, dy, dz, gripper]).

    Beyond the HAL: `reset(seed)` starts an episode, `status` holds the task's success/truncation of the
    latest published frame, `hold_action(last)` is the command that holds still, `command_state()` the
    command the robot rests at (for the safety filter), `inject_fault(kind, duration_s)`.
    """

    def __init__(
        self,
        task: str = "builtin/pick_place",
        *,
        images: bool | list[str] = False,
        image_size: int = 96,
        control_hz: float = 20.0,
        sensor_hz: float | None = None,
        sensor_latency_s: float = 0.0,
        max_step: float = 1.0,
        max_velocity: float | None = None,
        max_acceleration: float | None = None,
        max_episode_steps: int | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        if not task.startswith("builtin/"):
            raise SimRobotError(f"SimRobot task {task!r} must be a built-in task (builtin/<name>).")
        if not (control_hz > 0 and (sensor_hz is None or sensor_hz > 0) and sensor_latency_s >= 0):
            raise SimRobotError(
                f"SimRobot needs control_hz > 0, sensor_hz > 0 and sensor_latency_s >= 0, got "
                f"{control_hz}, {sensor_hz}, {sensor_latency_s}."
            )
        self.task = task
        self.control_hz = float(control_hz)
        self._driver_config = {
            "task": task,
            "images": images,
            "image_size": int(image_size),
            "sensor_hz": None if sensor_hz is None else float(sensor_hz),
            "sensor_latency_s": float(sensor_latency_s),
            "max_episode_steps": max_episode_steps,
            "command_hz": float(control_hz),
        }
        self._motion = (max_step, max_velocity, max_acceleration)
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._replies: queue.Queue[dict] = queue.Queue()
        self._latest: dict | None = None
        self._latest_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._spec: dict | None = None
        self._limits: RobotLimits | None = None
        self.status: dict[str, Any] = {"success": False, "truncated": False, "step": 0, "reward": 0.0}
        self.frames_received = 0

    # ------------------------------------------------------------------------------------------ HAL
    @property
    def observation_features(self) -> dict[str, dict]:
        return self._require_spec()["observation_features"]

    @property
    def action_features(self) -> dict[str, dict]:
        return {"action": self._require_spec()["action_feature"]}

    @property
    def limits(self) -> RobotLimits:
        self._require_spec()
        return self._limits

    @property
    def fps(self) -> int:
        """The task's own control rate (the rate the policy's actions are meant for)."""
        return int(self._require_spec()["fps"])

    @property
    def task_description(self) -> str:
        return str(self._require_spec()["task_description"])

    @property
    def is_connected(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def connect(self) -> None:
        if self.is_connected:
            return
        parent, child = socket.socketpair()
        cmd = [sys.executable, "-m", "real.sim_robot", str(child.fileno()),
               msgpack.packb(self._driver_config).hex()]
        self._proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self._sock = parent
        try:
            ready = _recv(parent, deadline=time.monotonic() + self._start_timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            self.disconnect()
            raise SimRobotError(f"The simulator process for {self.task} did not start ({exc}).") from None
        if ready is None or ready.get("op") != "ready":
            self.disconnect()
            raise SimRobotError(f"The simulator process for {self.task} failed: {ready and ready.get('error')}")
        self._spec = ready
        self._limits = self._make_limits(ready)
        self._reader = threading.Thread(target=self._read_loop, name="sim-robot-reader", daemon=True)
        self._reader.start()

    def disconnect(self) -> None:
        if self._sock is not None:
            try:
                if self.is_connected:
                    self.stop()
                    self._send({"op": "close"})
            except (OSError, SimRobotError):
                pass
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def get_observation(self) -> dict[str, Any]:
        """The latest published frame: observation arrays plus "timestamp" (its capture time).

        Returns the same frame again when no new one arrived (dropped frames): callers judge freshness by
        the timestamp, as they must with a real sensor.
        """
        with self._latest_lock:
            latest = self._latest
        if latest is None:
            raise SimRobotError("No observation yet: call reset(seed) to start an episode first.")
        return {**latest["obs"], "timestamp": latest["timestamp"]}

    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Fire-and-forget command; the driver clamps to the action space, as returned here."""
        spec = self._require_spec()
        sent = np.clip(np.asarray(action, dtype=np.float32), spec["action_low"], spec["action_high"])
        if sent.shape != tuple(spec["action_feature"]["shape"]) or not np.isfinite(sent).all():
            raise SimRobotError(f"SimRobot.send_action got {sent.shape} / non-finite values; filter commands first.")
        self._send({"op": "act", "action": sent})
        return sent

    def hold(self) -> None:
        self._request({"op": "hold"})

    def stop(self) -> None:
        self._request({"op": "stop"})

    # ------------------------------------------------------------------------------------ extensions
    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start an episode (the robot rests at `command_state()`); returns the first observation."""
        reply = self._request({"op": "reset", "seed": seed}, timeout_s=30.0)
        with self._latest_lock:
            self._latest = reply["frame"]
        self.status = reply["frame"]["status"]
        return self.get_observation()

    def hold_action(self, last_command: np.ndarray | None) -> np.ndarray:
        """The command that holds still: zero motion for ee_delta (keeping the gripper), the last pose otherwise."""
        rest = self.command_state()
        if last_command is None:
            return rest
        if self._require_spec()["control"] == "ee_delta":
            rest[-1] = last_command[-1]
            return rest
        return np.asarray(last_command, dtype=np.float64).copy()

    def command_state(self) -> np.ndarray:
        """The command the robot is at rest with after reset (gripper open, no motion)."""
        return np.asarray(self._require_spec()["rest_action"], dtype=np.float64).copy()

    def inject_fault(self, kind: str, duration_s: float) -> None:
        if kind not in FAULTS:
            raise SimRobotError(f"Unknown fault {kind!r}; choose one of {FAULTS}.")
        self._request({"op": "fault", "kind": kind, "duration_s": float(duration_s)})

    def __repr__(self) -> str:
        return f"SimRobot({self.task!r}, connected={self.is_connected})"

    # ---------------------------------------------------------------------------------------- plumbing
    def _make_limits(self, spec: dict) -> RobotLimits:
        max_step, max_velocity, max_acceleration = self._motion
        period = 1.0 / self.control_hz
        return RobotLimits(
            position_lower=spec["action_low"],
            position_upper=spec["action_high"],
            max_step=max_step,
            # default: the step limit is the velocity limit at the control rate
            max_velocity=max_velocity if max_velocity is not None else np.asarray(max_step) / period,
            max_acceleration=math.inf if max_acceleration is None else max_acceleration,
            control_period_s=period,
        )

    def _require_spec(self) -> dict:
        if self._spec is None:
            raise SimRobotError("SimRobot is not connected; call connect() (or use `with robot:`).")
        return self._spec

    def _send(self, message: dict) -> None:
        if self._sock is None:
            raise SimRobotError("SimRobot is not connected.")
        with self._send_lock:
            self._sock.sendall(_pack(message))

    def _request(self, message: dict, timeout_s: float = 2.0) -> dict:
        self._send(message)
        try:
            reply = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise SimRobotError(f"The simulator did not answer {message['op']!r} within {timeout_s} s.") from None
        if reply.get("error"):
            raise SimRobotError(reply["error"])
        return reply

    def _read_loop(self) -> None:
        sock = self._sock
        while True:
            try:
                message = _recv(sock)
            except (OSError, ValueError, ConnectionError):
                message = None
            if message is None:
                self._replies.put({"error": "The simulator process has exited."})
                return
            if message.get("op") == "frame":
                with self._latest_lock:
                    self._latest = message
                self.status = message["status"]
                self.frames_received += 1
            else:
                self._replies.put(message)


# ================================================================================= driver (own process)


class _Driver:
    """Runs in the simulator process: real-time physics, sensor publishing, faults."""

    def __init__(self, sock: socket.socket, config: dict) -> None:
        import mujoco

        import sim

        self.mujoco = mujoco
        self.sock = sock
        self.env = sim.make_env(config["task"], images=config["images"], image_size=config["image_size"],
                                max_episode_steps=config["max_episode_steps"])
        env = self.env.unwrapped
        self.model, self.data = env.model, env.data
        self.substeps = env.substeps
        env.substeps = 1  # env.step applies a command and takes one physics step; we step the rest
        self.dt = float(self.model.opt.timestep)
        # frames per servo tick: one at the tick, more in between when the sensor is faster than the task
        sensor_hz = config["sensor_hz"] or env.fps
        self.capture_every = max(1, round(1.0 / (sensor_hz * self.dt)))  # physics steps between frames
        self.latency = config["sensor_latency_s"]
        self.sample_offset = 0.5 / config["command_hz"]  # servo sample instants: mid-way between node ticks
        low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
        self.control = env.control
        self.rest = np.zeros_like(low)
        self.rest[-1] = -1.0  # gripper open, as every episode starts
        if self.control != "ee_delta":
            self.rest[:-1] = env.home_qpos
        self.spec = {
            "op": "ready",
            "observation_features": {
                key: {"dtype": str(space.dtype), "shape": list(space.shape),
                      "names": env.feature_names.get(key)}
                for key, space in env.observation_space.spaces.items()
            },
            "action_feature": {"dtype": "float32", "shape": list(low.shape), "names": env.feature_names["action"]},
            "action_low": low, "action_high": high, "rest_action": self.rest,
            "control": self.control, "fps": int(env.fps), "task_description": env.task_description,
        }
        self.running = False
        self.phase_locked = True  # nothing to lock to until an episode starts
        self.faults: dict[str, float] = {}  # kind -> end time

    # ------------------------------------------------------------------------------------------- loop
    def serve(self) -> None:
        self._send(self.spec)
        while True:
            now = time.monotonic()
            if self.running:
                self._advance(now)
                self._publish(now)
            wake = min(self._next_physics, self._next_publish()) if self.running else now + 0.1
            ready, _, _ = select.select([self.sock], [], [], max(wake - time.monotonic(), 0.0))
            if ready:
                message = _recv(self.sock)
                if message is None or message["op"] == "close":
                    return
                self._handle(message)

    def _handle(self, message: dict) -> None:
        op = message["op"]
        if op == "act":
            self.command = np.asarray(message["action"], dtype=np.float64)
            self.holding = False
            if not self.phase_locked:  # first command of the episode: sample half a node period after it
                due = time.monotonic() + self.sample_offset
                self._next_tick = max(math.ceil((due - self.t_start) / self.dt), self.steps_done)
                self.phase_locked = True
        elif op in ("hold", "stop"):
            self.holding = True
            self.stopped = op == "stop"
            self._send({"op": op})
        elif op == "reset":
            self._reset(message.get("seed"))
        elif op == "fault":
            self.faults[message["kind"]] = time.monotonic() + message["duration_s"]
            if message["kind"] == "stale" and self.history:
                self.stale_frame = self.history[-1]
            self._send({"op": "fault"})
        else:
            self._send({"op": op, "error": f"unknown request {op!r}"})

    def _reset(self, seed: int | None) -> None:
        obs, _ = self.env.reset(seed=seed)
        now = time.monotonic()
        self.t_start, self.steps_done = now, 0
        # physics step at which the command is next sampled: a control period after the reset, unless the
        # episode's first command locks the phase before that (so a first command that comes a few ms late on a
        # loaded machine still meets the reset state, not one already stepped under the rest command)
        self._next_tick, self.phase_locked = self.substeps, False
        self._next_physics = now + self.dt
        self._next_capture, self._last_capture = self.capture_every, 0  # physics steps; step 0 is the first frame
        self.command, self.holding, self.stopped = self.rest.copy(), False, False
        self.success = self.truncated = False
        self.reward = 0.0
        self.pending: deque[dict] = deque()  # captured, not yet published (sensor latency)
        self.history: deque[dict] = deque(maxlen=4)
        self.faults.clear()
        self.stale_frame = None
        self.running = True
        first = self._frame(obs, now)
        self.history.append(first)
        self._send({"op": "reset", "frame": first})

    # ---------------------------------------------------------------------------------------- physics
    def _advance(self, now: float) -> None:
        """Step physics up to wall-clock time; every `substeps` steps (a task tick) the latest command is applied."""
        mj = self.mujoco
        target = int((now - self.t_start) / self.dt)
        if target - self.steps_done > MAX_CATCH_UP_S / self.dt:  # starved: lose time rather than burst
            self.t_start += (target - self.steps_done) * self.dt - MAX_CATCH_UP_S
            target = self.steps_done + int(MAX_CATCH_UP_S / self.dt)
        stepped = False
        while self.steps_done < target:
            tick = self.steps_done == self._next_tick
            if tick and self.steps_done > self._last_capture:
                self._next_capture = self.steps_done  # the state stream follows the servo cycle
            if tick or self.steps_done == self._next_capture:
                mj.mj_kinematics(self.model, self.data)  # mj_step leaves them one step behind
                mj.mj_comPos(self.model, self.data)
            if self.steps_done == self._next_capture:
                self._capture(self.t_start + self.steps_done * self.dt)
            if tick:
                self._next_tick += self.substeps
                action = self._hold_command() if self.holding else self.command
                _, reward, success, truncated, _ = self.env.step(action.astype(np.float32))
                self.reward = float(reward)
                self.success = self.success or bool(success)
                self.truncated = self.truncated or bool(truncated)
            else:
                mj.mj_step(self.model, self.data)
            self.steps_done += 1
            stepped = True
        if stepped:
            mj.mj_kinematics(self.model, self.data)
            mj.mj_comPos(self.model, self.data)
        self._next_physics = self.t_start + (self.steps_done + 1) * self.dt

    def _hold_command(self) -> np.ndarray:
        hold = self.rest.copy()
        hold[-1] = self.command[-1]
        if self.control != "ee_delta":
            hold[:-1] = self.data.qpos[self.env.unwrapped._arm_qpos]
        return hold

    # ----------------------------------------------------------------------------------------- sensor
    def _capture(self, captured: float) -> None:
        """A frame of the current state (kinematics current), stamped with its physics time."""
        self._last_capture, self._next_capture = self.steps_done, self.steps_done + self.capture_every
        frame_ = self._frame(self.env.unwrapped._observation(), captured)
        self.pending.append(frame_)
        self.history.append(frame_)

    def _frame(self, obs: dict, captured: float) -> dict:
        status = {"success": self.success, "truncated": self.truncated,
                  "step": int(self.env.unwrapped._steps), "reward": self.reward,
                  "holding": self.holding, "stopped": self.stopped}
        return {"op": "frame", "obs": obs, "timestamp": captured, "status": status}

    def _active(self, kind: str, now: float) -> bool:
        return self.faults.get(kind, -1.0) > now

    def _next_publish(self) -> float:
        return self.pending[0]["timestamp"] + self.latency if self.pending else math.inf

    def _publish(self, now: float) -> None:
        latency = self.latency + (0.1 if self._active("delay", now) else 0.0)
        while self.pending and self.pending[0]["timestamp"] + latency <= now:
            frame_ = self.pending.popleft()
            if self._active("drop", now):
                continue
            if self._active("stale", now) and self.stale_frame is not None:
                frame_ = {**self.stale_frame, "status": frame_["status"]}
            elif self._active("nan", now):
                obs = dict(frame_["obs"])
                obs["observation.state"] = np.full_like(obs["observation.state"], np.nan)
                frame_ = {**frame_, "obs": obs}
            self._send(frame_)

    def _send(self, message: dict) -> None:
        self.sock.sendall(_pack(message))


def _driver_main(fd: int, config_hex: str) -> None:
    sock = socket.socket(fileno=fd)
    config = msgpack.unpackb(bytes.fromhex(config_hex), raw=False)
    try:
        driver = _Driver(sock, config)
    except Exception as exc:  # report why the simulator cannot start instead of dying silently
        sock.sendall(_pack({"op": "failed", "error": f"{type(exc).__name__}: {exc}"}))
        return
    try:
        driver.serve()
    except (ConnectionError, BrokenPipeError):
        pass  # the control node went away: the simulated robot simply ends
    finally:
        sock.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _driver_main(int(sys.argv[1]), sys.argv[2])
