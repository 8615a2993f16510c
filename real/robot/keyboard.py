"""A keyboard intervener for a person watching a real robot: take over, drive, release, mark the outcome.

    space      take over / release (the policy's chunks are ignored while a person drives)
    w / s      +x / -x      a / d   +y / -y      r / f   +z / -z     (the first three action dimensions)
    g / h      close / open the gripper (the last action dimension; latched)
    y / n      mark the episode a success / a failure (ends it; recorded as the episode's outcome)

The keys fit the built-in tasks' end-effector-velocity actions (`ee.dx, ee.dy, ee.dz, gripper` in [-1, 1]); a
motion key drives its axis at `speed` for `hold_s` after each press (a terminal repeats a held key faster than
that, so holding a key moves smoothly and letting go stops). Keys are read by a thread from a file descriptor:
the terminal (put in cbreak mode while connected, restored after) or any pipe, which is how the tests feed it.
numpy and the standard library only: it runs on the robot computer.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from real.robot.hal import Robot, Teleoperator

MOTION_KEYS = {"w": (0, 1.0), "s": (0, -1.0), "a": (1, 1.0), "d": (1, -1.0), "r": (2, 1.0), "f": (2, -1.0)}
GRIPPER_KEYS = {"g": 1.0, "h": -1.0}
OUTCOME_KEYS = {"y": True, "n": False}
TOGGLE_KEY = " "


class KeyboardTeleop(Teleoperator):
    def __init__(self, action_dim: int = 4, *, robot: Robot | None = None, fd: int | None = None,
                 speed: float = 0.5, hold_s: float = 0.15, clock: Callable[[], float] = time.monotonic,
                 drive: bool = True) -> None:
        """`robot`: a takeover keeps the gripper where the robot's command holds it (without one: open).
        `drive=False`: a pedal only (take over / release, outcomes); another device (a leader arm) drives."""
        if action_dim < 4:
            raise ValueError(f"the keyboard drives x, y, z and a gripper: action_dim must be at least 4, got "
                             f"{action_dim}.")
        self.action_dim, self.speed, self.hold_s, self.robot = action_dim, speed, hold_s, robot
        self.drive = drive
        self._given_fd = fd  # None: the terminal's standard input, looked up at connect
        self._fd = -1
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._saved_tty: list | None = None
        self.reset()

    # ------------------------------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        self._fd = sys.stdin.fileno() if self._given_fd is None else self._given_fd
        if os.isatty(self._fd):  # keys arrive one by one, unechoed; restored at disconnect
            import termios
            import tty

            self._saved_tty = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        self._stop.clear()
        self._thread = threading.Thread(target=self._read_keys, name="keyboard-teleop", daemon=True)
        self._thread.start()
        keys = "w/s a/d r/f move, g/h gripper" if self.drive else "the leader arm drives"
        print(f"keyboard intervener: space take over/release, {keys}, y/n success/failure", file=sys.stderr)

    def disconnect(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=0.5)
            self._thread = None
        if self._saved_tty is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None

    def reset(self, seed: int | None = None) -> None:
        """A new episode: released, standing still, gripper as the policy left it, no outcome marked."""
        with self._lock:
            self._intervening = False
            self._velocity_until = np.full(3, -np.inf)
            self._velocity = np.zeros(3)
            self._gripper: float | None = None
            self._outcome: bool | None = None

    # ------------------------------------------------------------------------------------------ the keys
    def press(self, key: str) -> None:
        """Handle one key (the reader thread calls it; so may a GUI)."""
        now = self._clock()
        with self._lock:
            if key == TOGGLE_KEY:
                self._intervening = not self._intervening
                self._velocity_until[:] = -np.inf
                if self._intervening:
                    self._gripper = None
            elif not self.drive and (key in MOTION_KEYS or key in GRIPPER_KEYS):
                pass
            elif key in MOTION_KEYS:
                axis, sign = MOTION_KEYS[key]
                self._velocity[axis] = sign * self.speed
                self._velocity_until[axis] = now + self.hold_s
            elif key in GRIPPER_KEYS:
                self._gripper = GRIPPER_KEYS[key]
            elif key in OUTCOME_KEYS:
                self._outcome = OUTCOME_KEYS[key]

    def _read_keys(self) -> None:
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 64)
            except OSError:
                return
            if not data:  # the pipe was closed
                return
            for key in data.decode(errors="ignore").lower():
                self.press(key)

    # ------------------------------------------------------------------------------------------ the HAL side
    @property
    def is_intervening(self) -> bool:
        with self._lock:
            return self._intervening

    @property
    def outcome(self) -> bool | None:
        with self._lock:
            return self._outcome

    def get_action(self) -> np.ndarray | None:
        now = self._clock()
        with self._lock:
            if not self._intervening:
                return None
            action = np.zeros(self.action_dim)
            moving = now < self._velocity_until
            action[:3] = np.where(moving, self._velocity, 0.0)
            if self._gripper is None:  # just took over: hold the gripper as it is
                self._gripper = float(self.robot.command_state()[-1]) if self.robot is not None else -1.0
            action[-1] = self._gripper
            return action
