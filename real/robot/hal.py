"""Hardware abstraction layer: the small interfaces every robot, camera and teleoperator driver implements.

Modelled on LeRobot's `Robot` / `Camera` / `Teleoperator`: the control node only ever talks to these, so a
simulated robot and a real arm are interchangeable. Imports numpy and the standard library only (this runs on
a robot computer without MuJoCo or torch).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class LimitsError(ValueError):
    """Raised for inconsistent robot limits (one sentence naming the field and what to fix)."""


def _per_dim(name: str, value: Any, n: int, allow_inf: bool = False) -> np.ndarray:
    """Broadcast a scalar or a length-n sequence to a float64 [n] array, with a clear error otherwise."""
    try:
        arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    except (TypeError, ValueError) as exc:
        raise LimitsError(
            f"RobotLimits.{name} must be a number or a list of {n} numbers, got {value!r}."
        ) from exc
    if np.isnan(arr).any() or (not allow_inf and np.isinf(arr).any()):
        raise LimitsError(f"RobotLimits.{name} must be finite numbers, got {arr.tolist()}.")
    return arr


@dataclass
class RobotLimits:
    """Command limits of one robot, in the units of its action vector (per dimension unless noted).

    position_lower / position_upper: command position range [A] (joint angles, or end-effector pose, gripper).
    max_velocity: |command change| / control_period_s [A], units per second.
    max_acceleration: |velocity change| / control_period_s [A], units per second^2 (inf: no limit).
    max_step: |command change| per control period [A] (inf: only the velocity limit applies).
    workspace_lower / workspace_upper: optional end-effector box [3] applied to the command dimensions
        `workspace_indices` (the x, y, z entries of an end-effector command).
    control_period_s: seconds between two commands (1 / fps).
    """

    position_lower: np.ndarray
    position_upper: np.ndarray
    max_velocity: np.ndarray
    max_acceleration: np.ndarray | float = math.inf
    max_step: np.ndarray | float = math.inf
    control_period_s: float = 0.1
    workspace_lower: np.ndarray | None = None
    workspace_upper: np.ndarray | None = None
    workspace_indices: tuple[int, int, int] = field(default=(0, 1, 2))

    def __post_init__(self) -> None:
        lower = np.asarray(self.position_lower, dtype=np.float64).reshape(-1)
        n = lower.shape[0]
        if n == 0:
            raise LimitsError(
                "RobotLimits.position_lower is empty; give one lower bound per action dimension."
            )
        self.position_lower = _per_dim("position_lower", lower, n)
        self.position_upper = _per_dim("position_upper", self.position_upper, n)
        if not (self.position_lower < self.position_upper).all():
            raise LimitsError(
                f"RobotLimits.position_lower {self.position_lower.tolist()} must be below "
                f"position_upper {self.position_upper.tolist()} in every dimension."
            )
        self.max_velocity = _per_dim("max_velocity", self.max_velocity, n)
        self.max_acceleration = _per_dim("max_acceleration", self.max_acceleration, n, allow_inf=True)
        self.max_step = _per_dim("max_step", self.max_step, n, allow_inf=True)
        for name in ("max_velocity", "max_acceleration", "max_step"):
            if not (getattr(self, name) > 0).all():
                raise LimitsError(f"RobotLimits.{name} must be positive, got {getattr(self, name).tolist()}.")
        if not (math.isfinite(self.control_period_s) and self.control_period_s > 0):
            raise LimitsError(
                f"RobotLimits.control_period_s must be a positive number, got {self.control_period_s!r}."
            )
        if (self.workspace_lower is None) != (self.workspace_upper is None):
            raise LimitsError("RobotLimits needs both workspace_lower and workspace_upper, or neither.")
        if self.workspace_lower is not None:
            self.workspace_lower = _per_dim("workspace_lower", self.workspace_lower, 3)
            self.workspace_upper = _per_dim("workspace_upper", self.workspace_upper, 3)
            self.workspace_indices = tuple(int(i) for i in self.workspace_indices)
            if len(self.workspace_indices) != 3 or not all(0 <= i < n for i in self.workspace_indices):
                raise LimitsError(
                    f"RobotLimits.workspace_indices must be 3 action indices in [0, {n}), got {self.workspace_indices}."
                )
            lo, hi = self.command_bounds()
            if not (lo < hi).all():
                raise LimitsError(
                    "RobotLimits workspace box does not overlap the position limits; fix one of them."
                )

    @property
    def action_dim(self) -> int:
        return int(self.position_lower.shape[0])

    def command_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension position bounds [A] with the workspace box folded in (the tighter of the two)."""
        lo, hi = self.position_lower.copy(), self.position_upper.copy()
        if self.workspace_lower is not None:
            idx = list(self.workspace_indices)
            lo[idx] = np.maximum(lo[idx], self.workspace_lower)
            hi[idx] = np.minimum(hi[idx], self.workspace_upper)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able form (inverse of `from_dict`)."""
        out: dict[str, Any] = {}
        for name in ("position_lower", "position_upper", "max_velocity", "max_acceleration", "max_step"):
            out[name] = [float(v) for v in getattr(self, name)]
        out["control_period_s"] = float(self.control_period_s)
        if self.workspace_lower is not None:
            out["workspace_lower"] = [float(v) for v in self.workspace_lower]
            out["workspace_upper"] = [float(v) for v in self.workspace_upper]
            out["workspace_indices"] = list(self.workspace_indices)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RobotLimits:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise LimitsError(f"Unknown robot limit keys {sorted(unknown)}; known keys are {sorted(known)}.")
        return cls(**data)


class Robot(ABC):
    """A robot the control node drives: observe, command, hold, stop.

    This class declares everything the control node calls. A driver must implement the abstract members; the
    others have defaults that fit a position-controlled arm with no notion of episodes: `reset(seed)` (start an
    episode, return its first observation), `status` (success / truncation of the episode), `hold_action(last)`
    (the command that holds still), `fps` (the rate the robot's actions are meant for) and `task_description`.
    Use as a context manager: `with robot: ...` connects and always disconnects (which stops the robot).
    """

    @property
    @abstractmethod
    def observation_features(self) -> dict[str, dict]:
        """Feature specs of `get_observation()` (keys `observation.state`, `observation.images.<cam>`)."""

    @property
    @abstractmethod
    def action_features(self) -> dict[str, dict]:
        """Feature specs of the command (`{"action": {"dtype": "float32", "shape": [A], "names": [...]}}`)."""

    @property
    @abstractmethod
    def limits(self) -> RobotLimits:
        """Command limits the safety layer enforces."""

    @property
    @abstractmethod
    def is_connected(self) -> bool: ...

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def disconnect(self) -> None:
        """Release the hardware; implementations call `stop()` first when still connected."""

    @abstractmethod
    def get_observation(self) -> dict[str, Any]:
        """Arrays keyed by the observation feature keys, plus "timestamp" (time.monotonic() seconds)."""

    @abstractmethod
    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Command the robot; returns the action actually sent (after the driver's own clamping)."""

    @abstractmethod
    def hold(self) -> None:
        """Hold the current position (used when actions stop arriving)."""

    @abstractmethod
    def stop(self) -> None:
        """Safe stop: halt motion and disable torque where the hardware supports it."""

    @abstractmethod
    def command_state(self) -> np.ndarray:
        """The command [A] the robot rests at now (the safety filter starts from it)."""

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start an episode (a simulator seeds it; a real robot is where it is) and return its first observation."""
        return self.get_observation()

    @property
    def status(self) -> dict[str, Any]:
        """The episode's status: "success" and "truncated" (bools), plus what the driver adds."""
        return {"success": False, "truncated": False}

    def hold_action(self, last_command: np.ndarray) -> np.ndarray:
        """The command [A] that holds still after `last_command` (a position-controlled arm: the same command)."""
        return np.asarray(last_command, dtype=np.float64).copy()

    @property
    def fps(self) -> float | None:
        """The rate the robot's actions are meant for (None: the policy's, or the node's control rate)."""
        return None

    @property
    def task_description(self) -> str:
        """The instruction recorded with each episode (and read by language-conditioned policies) when the
        deployment names none; a simulator may draw a new one at every reset."""
        return ""

    def set_instruction(self, instruction: str) -> None:  # noqa: B027 (a default, deliberately empty)
        """The instruction the next episodes are given (`deploy instruction=...`). A real robot needs nothing:
        a person sets the scene up; a simulator makes it the episode's goal."""

    def __enter__(self) -> Robot:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()


class Camera(ABC):
    """A camera producing uint8 [H, W, 3] RGB frames."""

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def disconnect(self) -> None: ...

    @abstractmethod
    def read(self) -> tuple[np.ndarray, float]:
        """Latest frame uint8 [H, W, 3] and its capture time (time.monotonic() seconds)."""

    def __enter__(self) -> Camera:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()


class Teleoperator(ABC):
    """A human input device (leader arm, spacemouse, keyboard) used for interventions and demonstrations."""

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def disconnect(self) -> None: ...

    @property
    @abstractmethod
    def is_intervening(self) -> bool:
        """True while the human has taken over (e.g. a pedal or button is held)."""

    @abstractmethod
    def get_action(self) -> np.ndarray | None:
        """The human's action [A], or None when the human is not intervening."""

    def reset(self, seed: int | None = None) -> None:  # noqa: B027 (a default, deliberately empty)
        """A new episode begins (nothing to do for a human device; a scripted one starts over)."""

    @property
    def outcome(self) -> bool | None:
        """The episode's outcome as the person marked it (True success, False failure; the episode ends there),
        or None while unmarked."""
        return None

    def __enter__(self) -> Teleoperator:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()
