"""The simulated arm: a built-in MuJoCo task running in real time, serving the robot side's `SimRobot` driver.

This is the workstation half of the simulated robot (it needs MuJoCo and `sim`); `real.robot.sim_robot.SimRobot`
is the robot-computer half, a HAL driver that talks to it over a socket as a real arm's network API would
(numpy + msgpack only). Run it on its own, serving drivers on loopback one after the other:

    python -m real.host.sim_arm --port 6000      # prints {"address": [host, port]} once listening

or let `SimRobot` start one per connection as its child process (`SimRobot(address=None)`, the default).
Timestamps are time.monotonic() of this machine: the arm and the driver share a clock (same machine).

The arm advances physics by wall-clock time (2 ms steps), so it keeps moving while the policy thinks, exactly
as a real arm would. It samples the latest command at the task's own control rate (10 Hz for the built-in
tasks, like a servo sampling its setpoint), so the action semantics are those the policy was trained with,
whatever rate the control node sends at. The sampling instants are phase-locked to the node's command stream:
the first command of an episode places them half a control period after the node's ticks. Without that, two
clocks with the same period tick within a millisecond of each other and OS jitter decides whether a sample
sees this tick's command or the previous one, so ee_delta moves get doubled or skipped at random; a real
servo sampling at a kilohertz has no such race.

The state stream is synchronous with the control cycle (as libfranka's or RTDE's are): a frame is captured at
every servo tick and, with `sensor_hz` above the task's rate, at that rate in between. Frames are published
`sensor_latency_s` after capture, stamped with their capture time. The default is one frame per tick: the
built-in tasks' state holds joint velocities, which swing within a 100 ms servo window, and a policy trained
on tick-aligned states loses most of its success when fed mid-window ones.

Faults on request: "stale" (the same old frame is published again), "drop" (no frames), "nan" (state full of
NaN), "delay" (extra sensor latency).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import socket
import sys
import time
from collections import deque

import numpy as np

from real.robot.sim_robot import MAX_CATCH_UP_S, pack_message, recv_message
from robopolicy.data.spec import STATE_KEY


class SimArm:
    """One connection's simulated arm: real-time physics, sensor publishing, faults."""

    def __init__(self, sock: socket.socket, config: dict) -> None:
        import mujoco

        import sim

        self.mujoco = mujoco
        self.sock = sock
        self.env = sim.make_env(config["task"], images=config["images"], image_size=config["image_size"],
                                max_episode_steps=config["max_episode_steps"])
        env = self.env.unwrapped
        self.model, self.data = env.model, env.data
        self.arm_qpos = env.ik.qpos_adr
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
                message = recv_message(self.sock)
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
            try:
                self._reset(message.get("seed"), message.get("instruction"))
            except ValueError as exc:  # an instruction naming no goal of the task
                self._send({"op": op, "error": str(exc)})
        elif op == "fault":
            self.faults[message["kind"]] = time.monotonic() + message["duration_s"]
            if message["kind"] == "stale" and self.history:
                self.stale_frame = self.history[-1]
            self._send({"op": "fault"})
        else:
            self._send({"op": op, "error": f"unknown request {op!r}"})

    def _reset(self, seed: int | None, instruction: str | None = None) -> None:
        obs, _ = self.env.reset(seed=seed, options={"instruction": instruction} if instruction else None)
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
        self.reward, self.task_steps = 0.0, 0
        self.pending: deque[dict] = deque()  # captured, not yet published (sensor latency)
        self.history: deque[dict] = deque(maxlen=4)
        self.faults.clear()
        self.stale_frame = None
        self.running = True
        first = self._frame(obs, now)
        self.history.append(first)
        self._send({"op": "reset", "frame": first, "instruction": self.env.unwrapped.instruction})

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
                self.task_steps += 1
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
            hold[:-1] = self.data.qpos[self.arm_qpos]
        return hold

    # ----------------------------------------------------------------------------------------- sensor
    def _capture(self, captured: float) -> None:
        """A frame of the current state (kinematics current), stamped with its physics time."""
        self._last_capture, self._next_capture = self.steps_done, self.steps_done + self.capture_every
        frame_ = self._frame(self.env.unwrapped.observation(), captured)
        self.pending.append(frame_)
        self.history.append(frame_)

    def _frame(self, obs: dict, captured: float) -> dict:
        status = {"success": self.success, "truncated": self.truncated,
                  "step": self.task_steps, "reward": self.reward,
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
                obs[STATE_KEY] = np.full_like(obs[STATE_KEY], np.nan)
                frame_ = {**frame_, "obs": obs}
            self._send(frame_)

    def _send(self, message: dict) -> None:
        self.sock.sendall(pack_message(message))


def serve_connection(sock: socket.socket) -> None:
    """Serve one driver: its first message configures the arm (`{"op": "configure", ...}`), then it runs
    until the driver closes."""
    try:
        config = recv_message(sock, deadline=time.monotonic() + 30.0)
        if config is None or config.get("op") != "configure":
            return
        try:
            arm = SimArm(sock, config)
        except Exception as exc:  # report why the arm cannot start instead of dying silently
            sock.sendall(pack_message({"op": "failed", "error": f"{type(exc).__name__}: {exc}"}))
            return
        arm.serve()
    except (OSError, ValueError):
        pass  # the driver went away: the simulated arm simply ends
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A simulated arm (a built-in MuJoCo task in real time) for "
                                     "real.robot.sim_robot.SimRobot drivers.")
    parser.add_argument("--fd", type=int, help="serve this one connected socket (SimRobot's child process)")
    parser.add_argument("--port", type=int, default=0, help="listen on 127.0.0.1 here (0: a free port); prints "
                        "the address")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.fd is not None:
        serve_connection(socket.socket(fileno=args.fd))
        return
    listener = socket.create_server(("127.0.0.1", args.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"address": list(listener.getsockname()[:2])}), flush=True)
    with listener:
        while True:  # one driver at a time, as one arm takes one controller
            conn, _ = listener.accept()
            serve_connection(conn)


if __name__ == "__main__":
    main()
