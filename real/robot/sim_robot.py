"""The simulated robot's HAL driver (robot side): a built-in MuJoCo task, run in real time by a simulated arm.

The physics runs in `real.host.sim_arm` (MuJoCo, `sim`), in a process of its own; this driver talks to it over a
socket as a real arm's network API would, so it needs only numpy, msgpack and the standard library and runs on a
robot computer without MuJoCo. `address=None` (the default) starts the arm as this process's child (for a
workstation, where MuJoCo is installed); `address="HOST:PORT"` connects to one started with
`python -m real.host.sim_arm --port PORT` (e.g. from the robot virtualenv, to an arm in the main one).

Transport: length-framed msgpack messages (arrays as `real.robot.protocol` array maps; no pickle); commands are
one-way, so `send_action` never waits for the simulator. Frames arrive on a reader thread and `get_observation`
returns the latest, stamped with its capture time (time.monotonic, shared by the processes of one machine).
See `real.host.sim_arm` for the arm's timing (phase-locked servo sampling, tick-synchronous frames) and faults.
"""

from __future__ import annotations

import math
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from real.robot.client import parse_address
from real.robot.hal import Robot, RobotLimits
from real.robot.protocol import decode_array, encode_value, frame, recv_frame
from robopolicy.config import register_config, setting

FAULTS = ("stale", "drop", "nan", "delay")
MAX_CATCH_UP_S = 0.25  # an arm starved for longer than this skips ahead instead of racing to catch up


class SimRobotError(RuntimeError):
    """The simulated arm failed, or was asked something it cannot do."""


@register_config("robot", "sim")
@dataclass
class SimRobotConfig:
    """configs/robot/sim.yaml: the keyword arguments of `SimRobot` (`_target_` names the class)."""

    target = "real.robot.sim_robot.SimRobot"

    task: str = setting("builtin/pick_place", "the built-in task (deploy's task=, by default the checkpoint's)")
    images: Any = setting("auto", "auto: the cameras the policy uses; false; or a list (front, wrist, top)")
    image_size: int = setting(96, "camera image height and width")
    control_hz: float = setting(20.0, "the node's control rate (the safety limits are per control period)")
    sensor_hz: float | None = setting(None, "state frames per second; null: one per servo tick (the task's rate)")
    sensor_latency_s: float = setting(0.01, "capture -> arrival at the node")
    max_step: float = setting(2.0, "safety: largest command change per control period (action units)")
    max_velocity: float | None = setting(None, "safety: units/s; null: max_step per control period")
    max_acceleration: float | None = setting(None, "safety: units/s^2; null: no limit")
    max_episode_steps: int | None = setting(None, "task steps (at the task's own rate); null: the task's default")
    address: str | None = setting(None, "HOST:PORT of a running `python -m real.host.sim_arm`; null: start one "
                                  "as a child process")


def pack_message(message: dict) -> bytes:
    """One framed msgpack message; arrays inside travel as protocol array maps."""
    return frame(msgpack.packb(encode_value(message), use_bin_type=True))


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"}:
            return decode_array(value, "sim_robot")
        return {k: _decode(v) for k, v in value.items()}
    return value


def recv_message(sock: socket.socket, deadline: float | None = None) -> dict | None:
    """The next framed message (None when the peer closed between messages)."""
    payload = recv_frame(sock, deadline=deadline)
    return None if payload is None else _decode(msgpack.unpackb(payload, raw=False))


class SimRobot(Robot):
    """A built-in task (`builtin/<name>`) as a robot; actions are the task's (ee_delta: [dx, dy, dz, gripper]).

    `reset(seed)` starts an episode, `status` holds the task's success/truncation (and step, reward, holding,
    stopped) of the latest published frame, `hold_action(last)` is the command that holds still,
    `command_state()` the command the robot rests at; beyond the HAL: `inject_fault(kind, duration_s)`.
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
        address: str | None = None,
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
        self._instruction: str | None = None  # set_instruction's, sent with every reset
        self._episode_instruction: str | None = None  # the simulator's for the current episode
        self.control_hz = float(control_hz)
        self.address = None if address is None else parse_address(address)
        self._arm_config = {
            "op": "configure",
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
        self._connected = False
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._replies: queue.Queue[dict] = queue.Queue()
        self._latest: dict | None = None
        self._latest_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._spec: dict | None = None
        self._limits: RobotLimits | None = None
        self._status: dict[str, Any] = {"success": False, "truncated": False, "step": 0, "reward": 0.0}
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
    def status(self) -> dict[str, Any]:
        return self._status

    @property
    def fps(self) -> int:
        """The task's own control rate (the rate the policy's actions are meant for)."""
        return int(self._require_spec()["fps"])

    @property
    def task_description(self) -> str:
        """The current episode's instruction (a language task draws one per reset), else the task's description."""
        return self._episode_instruction or str(self._require_spec()["task_description"])

    def set_instruction(self, instruction: str) -> None:
        """Every next episode's goal is the one `instruction` names (the simulator refuses one naming none)."""
        self._instruction = instruction

    @property
    def is_connected(self) -> bool:
        return self._connected and (self._proc is None or self._proc.poll() is None)

    def connect(self) -> None:
        if self.is_connected:
            return
        where = f"{self.task} at {self.address[0]}:{self.address[1]}" if self.address else self.task
        if self.address is None:  # the arm as our child process, on a socketpair
            sock, child = socket.socketpair()
            cmd = [sys.executable, "-m", "real.host.sim_arm", "--fd", str(child.fileno())]
            self._proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
            child.close()
        else:
            try:
                sock = socket.create_connection(self.address, timeout=self._start_timeout_s)
            except OSError as exc:
                raise SimRobotError(f"Cannot reach the simulated arm at {self.address[0]}:{self.address[1]} "
                                    f"({exc}); start it with `python -m real.host.sim_arm`.") from None
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            self._send(self._arm_config)
            ready = recv_message(sock, deadline=time.monotonic() + self._start_timeout_s)
        except (TimeoutError, OSError) as exc:
            self.disconnect()
            raise SimRobotError(f"The simulated arm for {where} did not start ({exc}).") from None
        if ready is None or ready.get("op") != "ready":
            self.disconnect()
            raise SimRobotError(f"The simulated arm for {where} failed: {ready and ready.get('error')}")
        self._spec = ready
        self._limits = self._make_limits(ready)
        self._connected = True
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
        self._connected = False
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
        reply = self._request({"op": "reset", "seed": seed, "instruction": self._instruction}, timeout_s=30.0)
        self._episode_instruction = reply.get("instruction")
        with self._latest_lock:
            self._latest = reply["frame"]
        self._status = reply["frame"]["status"]
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
            self._sock.sendall(pack_message(message))

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
                message = recv_message(sock)
            except (OSError, ValueError, ConnectionError):
                message = None
            if message is None:
                self._replies.put({"error": "The simulated arm has gone (its process exited or the connection dropped)."})
                return
            if message.get("op") == "frame":
                with self._latest_lock:
                    self._latest = message
                self._status = message["status"]
                self.frames_received += 1
            else:
                self._replies.put(message)
