"""A virtual Feetech servo bus on a pseudo-terminal, backed in real time by a MuJoCo model of the SO-100.

LeRobot's unmodified `SO100Follower` / `FeetechMotorsBus` (through Feetech's `scservo_sdk`) open the twin's pty as
they would the arm's USB serial adapter and drive it byte for byte:

    python -m real.host.feetech_twin --calibration-dir CAL     # prints the pty path, e.g. /dev/pts/7
    lerobot-... / robopolicy deploy robot=so100 robot.port=/dev/pts/7 robot.calibration_dir=CAL ...

The protocol (Feetech "SCS" protocol 0, what the STS3215 speaks): instruction packets
`FF FF id len inst params... checksum`, status packets `FF FF id len error params... checksum`, len = number of
params + 2, checksum = ~(id + len + inst/error + params) & 0xFF. Instructions: PING, READ, WRITE, REG_WRITE, ACTION,
SYNC_READ (every listed servo answers in turn), SYNC_WRITE (no answer); the broadcast id 0xFE gets no answer except
to PING. A packet with a bad checksum is ignored, as a servo ignores it (the host times out).

Each servo has the STS3215's control table (little-endian words; positions, speed and homing offset in sign-
magnitude): model number 777, firmware 3.10, EPROM limits and homing offset (Present_Position = raw - Homing_Offset),
torque enable, acceleration, goal position (clamped to the position limits), and the read-only present position,
speed, load, voltage, temperature, moving flag and current. With the torque enabled, a servo's position loop
follows a setpoint that approaches the goal within the servo's top speed (Goal_Velocity, 0: top speed) and its
Acceleration register (100 ticks/s^2 per unit, 0: unlimited), and drives its joint's MuJoCo motor with a torque-
limited PID; with the torque off the joint is limp and the goal register follows the present position (as on the
servo). Not modelled: baud rates (any is accepted), return delay, EPROM persistence across power cycles, overload
and temperature protection, the servo's exact PID.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import signal
import socketserver
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sim.so100 import (
    ACCELERATION_UNIT,
    MOTOR_IDS,
    MOTORS,
    RESOLUTION,
    STALL_TORQUE,
    TOP_SPEED_TICKS,
    Encoders,
    ServoArm,
)

# ------------------------------------------------------------------------------------------- the packets
INST_PING, INST_READ, INST_WRITE, INST_REG_WRITE, INST_ACTION = 0x01, 0x02, 0x03, 0x04, 0x05
INST_SYNC_READ, INST_SYNC_WRITE = 0x82, 0x83
BROADCAST_ID = 0xFE
ERR_ANGLE, ERR_OVERLOAD = 0x02, 0x20  # status error bits (angle limit, overload)


def checksum(body: bytes | list[int]) -> int:
    """~(sum of id, length, instruction/error and params) & 0xFF."""
    return ~sum(body) & 0xFF


def instruction_packet(servo_id: int, instruction: int, params: bytes | list[int] = b"") -> bytes:
    body = bytes([servo_id, len(params) + 2, instruction, *params])
    return b"\xff\xff" + body + bytes([checksum(body)])


def status_packet(servo_id: int, error: int = 0, params: bytes | list[int] = b"") -> bytes:
    return instruction_packet(servo_id, error, params)  # the same layout, the error byte in place of the instruction


class PacketParser:
    """Cuts a byte stream into instruction packets `(id, instruction, params)`: skips bytes until a header,
    drops packets with an impossible length or a bad checksum (counted in `dropped`)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        self.buffer += data
        buf = self.buffer
        while True:
            start = buf.find(b"\xff\xff")
            if start < 0:
                del buf[: max(len(buf) - 1, 0)]  # keep a trailing 0xFF: it may start a header
                return
            # a third 0xFF is a header byte repeated (ids go up to 0xFE): start one later
            while start + 2 < len(buf) and buf[start + 2] == 0xFF:
                start += 1
            del buf[:start]
            if len(buf) < 4:
                return
            length = buf[3]
            if length < 2:
                self.dropped += 1
                del buf[:2]
                continue
            end = 4 + length
            if len(buf) < end:
                return
            body, check = bytes(buf[2:end - 1]), buf[end - 1]
            if checksum(body) != check:
                self.dropped += 1
                del buf[:2]
                continue
            del buf[:end]
            yield body[0], body[2], body[3:]


# ----------------------------------------------------------------------------------- the control table
# name: (address, size); words are little-endian
MODEL_NUMBER, STS3215_MODEL = (3, 2), 777
FIRMWARE = ((0, 1), (1, 1))
REG = {
    "ID": (5, 1), "Baud_Rate": (6, 1), "Return_Delay_Time": (7, 1), "Response_Status_Level": (8, 1),
    "Min_Position_Limit": (9, 2), "Max_Position_Limit": (11, 2), "Max_Torque_Limit": (16, 2),
    "P_Coefficient": (21, 1), "D_Coefficient": (22, 1), "I_Coefficient": (23, 1), "Protection_Current": (28, 2),
    "Homing_Offset": (31, 2), "Operating_Mode": (33, 1), "Overload_Torque": (36, 1),
    "Torque_Enable": (40, 1), "Acceleration": (41, 1), "Goal_Position": (42, 2), "Goal_Time": (44, 2),
    "Goal_Velocity": (46, 2), "Torque_Limit": (48, 2), "Lock": (55, 1),
    "Present_Position": (56, 2), "Present_Velocity": (58, 2), "Present_Load": (60, 2), "Present_Voltage": (62, 1),
    "Present_Temperature": (63, 1), "Status": (65, 1), "Moving": (66, 1), "Present_Current": (69, 2),
    "Maximum_Acceleration": (85, 1),
}
SIGN_BIT = {"Homing_Offset": 11, "Goal_Position": 15, "Goal_Velocity": 15, "Present_Position": 15,
            "Present_Velocity": 15, "Present_Load": 10}
READ_ONLY = (0, 1, 2, 3, 4) + tuple(range(56, 72))  # firmware, model number, the present-state block
TABLE_SIZE = 128


def to_sign_magnitude(value: int, bit: int) -> int:
    return (abs(value) | (1 << bit)) if value < 0 else value


def from_sign_magnitude(value: int, bit: int) -> int:
    return -(value & ~(1 << bit)) if value & (1 << bit) else value


class ServoRegisters:
    """One STS3215's control table: raw bytes, with named get/set in the register's encoding."""

    def __init__(self, servo_id: int) -> None:
        self.mem = bytearray(TABLE_SIZE)
        self.mem[0], self.mem[1] = 3, 10
        self.mem[3:5] = STS3215_MODEL.to_bytes(2, "little")
        for name, value in [("ID", servo_id), ("Baud_Rate", 0), ("Return_Delay_Time", 250),
                            ("Response_Status_Level", 1), ("Min_Position_Limit", 0), ("Max_Position_Limit", 4095),
                            ("Max_Torque_Limit", 1000), ("P_Coefficient", 32), ("D_Coefficient", 32),
                            ("Protection_Current", 500), ("Overload_Torque", 80), ("Torque_Limit", 1000),
                            ("Lock", 1), ("Present_Voltage", 120), ("Present_Temperature", 30),
                            ("Maximum_Acceleration", 254)]:
            self.set(name, value)

    def get(self, name: str) -> int:
        addr, size = REG[name]
        value = int.from_bytes(self.mem[addr: addr + size], "little")
        return from_sign_magnitude(value, SIGN_BIT[name]) if name in SIGN_BIT else value

    def set(self, name: str, value: int) -> None:
        addr, size = REG[name]
        value = int(value)
        if name in SIGN_BIT:
            value = to_sign_magnitude(value, SIGN_BIT[name])
        self.mem[addr: addr + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.mem[addr: addr + length]).ljust(length, b"\x00")

    def write(self, addr: int, data: bytes) -> bool:
        """Write bytes from the host; the read-only registers keep their value. Returns False past the table."""
        if addr + len(data) > TABLE_SIZE:
            return False
        for k, byte in enumerate(data):
            if addr + k not in READ_ONLY:
                self.mem[addr + k] = byte
        return True


class FeetechBus:
    """The servos on one bus: answers instruction packets from their control tables (no I/O, no physics)."""

    def __init__(self, ids: tuple[int, ...] = MOTOR_IDS) -> None:
        self.servos = {i: ServoRegisters(i) for i in ids}
        self.pending: dict[int, tuple[int, bytes]] = {}  # REG_WRITE, applied on ACTION
        self.on_write = lambda servo, addr, data: None  # the physics side hooks in (torque enable, ...)

    def handle(self, servo_id: int, instruction: int, params: bytes) -> bytes:
        """The status packets the bus answers with (b"" for none)."""
        if instruction == INST_SYNC_WRITE:
            if len(params) < 2:
                return b""
            addr, size = params[0], params[1]
            for k in range(2, len(params) - size, size + 1):
                if params[k] in self.servos:
                    self._write(params[k], addr, params[k + 1: k + 1 + size])
            return b""
        if instruction == INST_SYNC_READ:
            if len(params) < 2:
                return b""
            addr, size = params[0], params[1]
            return b"".join(status_packet(i, 0, self.servos[i].read(addr, size))
                            for i in params[2:] if i in self.servos)
        if servo_id == BROADCAST_ID:
            if instruction == INST_PING:
                return b"".join(status_packet(i) for i in sorted(self.servos))
            if instruction in (INST_WRITE, INST_REG_WRITE, INST_ACTION):
                for i in list(self.servos):
                    self._execute(i, instruction, params)
            return b""
        if servo_id not in self.servos:
            return b""
        return self._execute(servo_id, instruction, params)

    def _execute(self, servo_id: int, instruction: int, params: bytes) -> bytes:
        servo = self.servos[servo_id]
        if instruction == INST_PING:
            return status_packet(servo_id)
        if instruction == INST_READ and len(params) == 2:
            return status_packet(servo_id, 0, servo.read(params[0], params[1]))
        error = 0
        if instruction == INST_WRITE and params:
            error = 0 if self._write(servo_id, params[0], params[1:]) else ERR_ANGLE
        elif instruction == INST_REG_WRITE and params:
            self.pending[servo_id] = (params[0], bytes(params[1:]))
        elif instruction == INST_ACTION:
            if servo_id in self.pending:
                self._write(servo_id, *self.pending.pop(servo_id))
        else:
            return b""  # an instruction the servo does not know: no answer
        # Response_Status_Level 0: the servo answers only PING and READ
        return status_packet(servo_id, error) if servo.get("Response_Status_Level") else b""

    def _write(self, servo_id: int, addr: int, data: bytes) -> bool:
        ok = self.servos[servo_id].write(addr, bytes(data))
        if ok:
            self.on_write(self.servos[servo_id], addr, bytes(data))
        return ok


# ------------------------------------------------------------------------------------------- the physics
class SO100Twin(ServoArm):
    """The SO-100's servos on a `FeetechBus`, moving a MuJoCo SO-100 in real time (`step_to(now)`).

    `q0`: initial joint angles [6] (rad; default: the middle of every range, where a calibration starts).
    `timestep`: the physics and servo-loop period (250 Hz by default: light enough for a loaded machine).
    The servos boot calibrated (their EPROM holds the homing offsets and ranges of `encoders.calibration()`)
    unless `calibrated=False` (factory defaults: offset 0, limits 0..4095). The position loop itself is
    `sim.so100.ServoArm`'s, which the SO-100 tasks simulate too.
    """

    def __init__(self, q0: np.ndarray | None = None, calibrated: bool = True, worldbody: str = "",
                 timestep: float = 0.004) -> None:
        super().__init__(q0, worldbody, timestep)
        self.hand: np.ndarray | None = None  # joints a person's hand holds (hold_by_hand)
        self.bus = FeetechBus()
        self.bus.on_write = self._on_write
        if calibrated:
            for cal in self.encoders.calibration().values():
                servo = self.bus.servos[cal.id]
                servo.set("Homing_Offset", cal.homing_offset)
                servo.set("Min_Position_Limit", cal.range_min)
                servo.set("Max_Position_Limit", cal.range_max)
        self._update_present()
        for k, servo in enumerate(self.bus.servos.values()):
            servo.set("Goal_Position", servo.get("Present_Position"))
            self._refresh(k)

    def place(self, q: np.ndarray) -> None:
        """Put the joints at `q` (rad) at rest, every servo's goal where its joint now is (a rehearsal's reset)."""
        super().place(q)
        self._update_present()
        for k, servo in enumerate(self.bus.servos.values()):
            servo.set("Goal_Position", servo.get("Present_Position"))
            self._refresh(k)

    def hold_by_hand(self, q: np.ndarray | None) -> None:
        """A person's hand holds the joints at `q` (rad) whatever the servos do (a leader arm moved by hand, its
        torque off); None lets go."""
        self.hand = None if q is None else np.asarray(q, dtype=np.float64).copy()
        if self.hand is not None:
            self._held_by_hand()
            self._update_present()

    def physics_step(self) -> None:
        super().physics_step()
        if self.hand is not None:
            self._held_by_hand()

    def _held_by_hand(self) -> None:
        self.data.qpos[self.qpos_index] = self.hand
        self.data.qvel[self.dof_index] = 0.0

    # ---- encoder <-> registers
    def _servo(self, k: int) -> ServoRegisters:
        return self.bus.servos[MOTOR_IDS[k]]

    def _update_present(self) -> None:
        raw = self.raw()
        speed = self.data.qvel[self.dof_index] * self.encoders.direction * (RESOLUTION / (2 * np.pi))
        torque = self.data.ctrl[: len(MOTORS)]
        for k in range(len(MOTORS)):
            servo = self._servo(k)
            tick = int(np.clip(np.round(raw[k]), 0, RESOLUTION - 1))  # the encoder's reading
            servo.set("Present_Position", tick - servo.get("Homing_Offset"))
            servo.set("Present_Velocity", int(np.round(speed[k])))
            servo.set("Present_Load", int(np.clip(np.round(1000 * abs(torque[k]) / STALL_TORQUE), 0, 1000))
                      * (1 if torque[k] * self.encoders.direction[k] >= 0 else -1))
            servo.set("Present_Current", int(abs(torque[k]) / STALL_TORQUE * 400))
            moving = self.torque_on[k] and (abs(self.setpoint[k] - self.goal[k]) > 0.5 or abs(speed[k]) > 20)
            servo.set("Moving", int(bool(moving)))
            if not self.torque_on[k]:  # a limp servo's goal follows where it is
                servo.set("Goal_Position", servo.get("Present_Position"))
                self.goal[k] = self.goal_raw(k)

    def _on_write(self, servo: ServoRegisters, addr: int, data: bytes) -> None:
        k = MOTOR_IDS.index(servo.get("ID")) if servo.get("ID") in MOTOR_IDS else None
        if k is None:
            return
        torque_addr = REG["Torque_Enable"][0]
        if addr <= torque_addr < addr + len(data) and servo.get("Torque_Enable"):
            # torque on: hold where the joint is unless a goal comes with it
            self.setpoint[k], self.setpoint_speed[k], self.integral[k] = self.raw()[k], 0.0, 0.0
            goal_addr = REG["Goal_Position"][0]
            if not addr <= goal_addr < addr + len(data):
                servo.set("Goal_Position", int(round(self.raw()[k])) - servo.get("Homing_Offset"))
        self._refresh(k)

    def _refresh(self, k: int) -> None:
        """Servo k's registers the position loop reads, cached as arrays (refreshed on every write)."""
        servo = self._servo(k)
        self.torque_on[k] = servo.get("Torque_Enable") == 1
        self.goal[k] = self.goal_raw(k)
        self.top_speed[k] = min(abs(servo.get("Goal_Velocity")) or TOP_SPEED_TICKS, TOP_SPEED_TICKS)
        self.acceleration[k] = servo.get("Acceleration") * ACCELERATION_UNIT or np.inf
        self.torque_max[k] = STALL_TORQUE * min(servo.get("Torque_Limit"), servo.get("Max_Torque_Limit")) / 1000.0

    def goal_raw(self, k: int) -> float:
        """Servo k's goal in raw ticks, clamped to its position limits (in the homed frame) as the servo does."""
        servo = self._servo(k)
        goal = servo.get("Goal_Position")
        lo, hi = servo.get("Min_Position_Limit"), servo.get("Max_Position_Limit")
        if lo or hi:
            goal = min(max(goal, lo), hi)
        return float(goal + servo.get("Homing_Offset"))

    # ---- time
    def advance(self, seconds: float) -> None:
        """Run the physics for `seconds` and refresh the present-state registers."""
        for _ in range(max(int(round(seconds / self.model.opt.timestep)), 0)):
            self.physics_step()
        self._update_present()


class PtyServer:
    """Serves a twin's bus on a pseudo-terminal in real time: one thread reads instruction packets, answers them
    at once, and steps the physics to the wall clock between packets."""

    def __init__(self, twin: SO100Twin, max_lag_s: float = 0.05) -> None:
        self.twin = twin
        self.max_lag_s = max_lag_s
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave, termios.TCSANOW)  # no echo, no line editing: a serial line
        self.port = os.ttyname(self.slave)
        self.parser = PacketParser()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._calls: queue.Queue = queue.Queue()
        self.packets = 0

    def call(self, fn, timeout_s: float = 5.0):
        """Run `fn(twin)` on the serving thread between packets (the physics is not thread-safe); its result."""
        done: Future = Future()
        self._calls.put((fn, done))
        return done.result(timeout=timeout_s)

    def start(self) -> PtyServer:
        self._thread = threading.Thread(target=self.serve, name="feetech-twin", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        dt = self.twin.model.opt.timestep
        clock = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], max(clock + dt - time.monotonic(), 0))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # nobody holds the port now
                    data = b""
                for servo_id, instruction, params in self.parser.feed(data):
                    self.packets += 1
                    reply = self.twin.bus.handle(servo_id, instruction, params)
                    if reply:
                        os.write(self.master, reply)
            while not self._calls.empty():
                fn, done = self._calls.get()
                try:
                    done.set_result(fn(self.twin))
                except Exception as exc:  # noqa: BLE001 (handed to the caller)
                    done.set_exception(exc)
            now = time.monotonic()
            if now - clock > self.max_lag_s:  # fell behind (a loaded machine): slow the arm's time, never jump
                clock = now - self.max_lag_s
            steps = 0
            while clock + dt <= now:
                self.twin.physics_step()
                clock += dt
                steps += 1
            if steps:
                self.twin._update_present()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class SceneChannel:
    """Rehearsal only: a loopback side channel into the twin (what a person does to a real arm by hand).

    TCP on 127.0.0.1, one JSON object a line. With a task (`python -m real.host.feetech_twin --task
    builtin/so100_touch`, whose objects are built into the twin's model), `{"cmd": "reset", "seed": S}` places the
    arm at the start pose the task's env draws for seed S (every servo's goal where it now is), and
    `{"cmd": "status"}` answers the task's `success` and `truncated` (the env's episode length in the twin's time
    since the reset); the LeRobot adapter uses them when `robot.scene=127.0.0.1:PORT`: a real arm has no such
    channel, someone resets its scene by hand and judges success. With or without a task (`--channel`),
    `{"cmd": "hold", "lerobot": [6 values]}` has a hand hold the joints at that pose in LeRobot's units (a twin
    playing a leader arm, its torque off, moved by a person) and `{"cmd": "release"}` lets go.
    """

    def __init__(self, server: PtyServer, task: str | None = None) -> None:
        self.server = server
        self.scene = scene_for_task(task) if task else None
        self.reset_time = 0.0
        channel = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    try:
                        reply = channel.answer(json.loads(line))
                    except Exception as exc:  # noqa: BLE001 (a bad request gets its reason back)
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.tcp.daemon_threads = True
        self.port = self.tcp.server_address[1]
        threading.Thread(target=self.tcp.serve_forever, name="twin-scene", daemon=True).start()

    def answer(self, request: dict) -> dict:
        if request.get("cmd") in ("hold", "release"):
            pose = None if request["cmd"] == "release" else np.asarray(request["lerobot"], dtype=np.float64)
            if pose is not None and pose.shape != (len(MOTORS),):
                raise ValueError(f"hold needs {len(MOTORS)} joint values in LeRobot's units, got {pose.shape}")

            def hold(twin: SO100Twin) -> dict:
                twin.hold_by_hand(None if pose is None else twin.encoders.from_lerobot(pose))
                return {"ok": True}

            return self.server.call(hold)
        if request.get("cmd") in ("reset", "status") and self.scene is None:
            raise ValueError("this twin presents no task: start it with --task to reset or score episodes")
        if request.get("cmd") == "reset":
            rng = np.random.default_rng(request.get("seed"))  # what the task's env seeds its reset with

            def reset(twin: SO100Twin) -> dict:
                self.scene.reset(twin, rng)
                self.reset_time = twin.sim_time
                return {"ok": True}

            return self.server.call(reset)
        if request.get("cmd") == "status":
            def status(twin: SO100Twin) -> dict:
                success = self.scene.success(twin)
                elapsed = twin.sim_time - self.reset_time
                truncated = elapsed >= self.scene.default_max_episode_steps / self.scene.fps and not success
                return {"success": bool(success), "truncated": bool(truncated)}

            return self.server.call(status)
        raise ValueError(f"unknown request {request!r}: use reset, status, hold or release")

    def close(self) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()


def scene_for_task(task: str):
    """The scene of a task the twin can present (the SO-100 tasks of sim/builtin)."""
    from sim.builtin import SO100_TASKS, so100_scene

    if task.removeprefix("builtin/") not in SO100_TASKS:
        raise ValueError(f"The SO-100 twin has no scene for task {task!r}: use one of "
                         f"{', '.join('builtin/' + t for t in SO100_TASKS)}.")
    return so100_scene(task.removeprefix("builtin/"))()


def write_calibration(encoders: Encoders, directory: Path, robot_id: str) -> Path:
    """The twin's LeRobot calibration file `<directory>/<robot_id>.json` (what `lerobot-calibrate` would save)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{robot_id}.json"
    path.write_text(json.dumps({m: asdict(c) for m, c in encoders.calibration().items()}, indent=4))
    return path


class TwinProcess:
    """The twin in its own process (`python -m real.host.feetech_twin`), e.g. started from LeRobot's virtualenv,
    which has no MuJoCo: `python` is an interpreter that has it. `with TwinProcess(python, folder) as twin:`
    gives `twin.port` (the pty) and `twin.calibration_dir` (the LeRobot calibration file `<id>.json`)."""

    def __init__(self, python: str | Path, folder: Path, robot_id: str = "so100_twin", timeout_s: float = 60.0,
                 task: str | None = None, channel: bool = False):
        """`task`: present its scene, with the side channel; `channel`: the side channel alone (hold/release)."""
        self.python, self.folder, self.robot_id, self.timeout_s = str(python), Path(folder), robot_id, timeout_s
        self.task, self.channel = task, channel or task is not None
        self.calibration_dir = self.folder / "calibration"
        self.port = ""
        self.scene = ""  # with a task or channel=True: 127.0.0.1:PORT of its side channel (robot.scene)
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> TwinProcess:
        port_file = self.folder / "twin_port"
        port_file.unlink(missing_ok=True)
        task_file = self.folder / "twin_scene_port" if self.channel else None
        if task_file is not None:
            task_file.unlink(missing_ok=True)
        log = self.folder / "twin.log"
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        self._proc = subprocess.Popen([self.python, "-m", "real.host.feetech_twin", "--calibration-dir",
                                       str(self.calibration_dir), "--id", self.robot_id, "--port-file",
                                       str(port_file)]
                                      + ([] if task_file is None else ["--scene-port-file", str(task_file)])
                                      + (["--task", self.task] if self.task else ["--channel"] if self.channel else []),
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(log, "wb"))  # noqa: SIM115 (the child holds it)
        deadline = time.monotonic() + self.timeout_s
        while not port_file.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"The SO-100 twin did not start with {self.python}: "
                                   f"{log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = port_file.read_text()
        if task_file is not None:
            self.scene = f"127.0.0.1:{task_file.read_text()}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An SO-100 digital twin on a virtual Feetech servo bus (a pty).")
    parser.add_argument("--calibration-dir", type=Path, default=None,
                        help="write the twin's LeRobot calibration file here (<dir>/<id>.json)")
    parser.add_argument("--id", default="so100_twin", help="the robot id LeRobot names the calibration file by")
    parser.add_argument("--uncalibrated", action="store_true", help="servos with factory EPROM (no homing)")
    parser.add_argument("--port-file", type=Path, default=None, help="also write the pty's path to this file")
    parser.add_argument("--task", default=None, help="rehearsal only: present this task's scene (e.g. "
                        "builtin/so100_touch) and serve its reset / success channel on a loopback port")
    parser.add_argument("--channel", action="store_true", help="rehearsal only: serve the side channel without a "
                        "task (a hand holding the arm: the twin as a leader arm)")
    parser.add_argument("--scene-port-file", type=Path, default=None, help="write the scene channel's port here")
    args = parser.parse_args(argv)
    try:
        scene = scene_for_task(args.task) if args.task else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    twin = SO100Twin(calibrated=not args.uncalibrated, worldbody=scene.objects_xml if scene else "")
    if args.calibration_dir is not None:
        write_calibration(twin.encoders, args.calibration_dir, args.id)
    server = PtyServer(twin).start()
    channel = SceneChannel(server, args.task) if args.task or args.channel else None
    if channel is not None:
        print(f"scene channel: 127.0.0.1:{channel.port} (robot.scene=127.0.0.1:{channel.port})", flush=True)
        if args.scene_port_file is not None:
            _write_atomically(args.scene_port_file, str(channel.port))
    if args.port_file is not None:
        _write_atomically(args.port_file, server.port)
    print(server.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if channel is not None:
            channel.close()
        server.close()
    return 0


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


if __name__ == "__main__":
    sys.exit(main())
