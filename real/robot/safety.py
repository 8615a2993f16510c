"""Safety layer: every command passes through `SafetyFilter.filter` before it reaches the robot.

The filter guarantees, for every emitted command y_k (with delta_k = y_k - y_{k-1}, starting at rest):
  - position / workspace:  lower <= y_k <= upper
  - step and velocity:     |delta_k| <= min(max_step, max_velocity * dt)
  - acceleration:          |delta_k - delta_{k-1}| <= max_acceleration * dt^2
whatever it is given (NaN, inf, huge values, wrong shapes). Position and acceleration limits together can
be impossible to meet (arriving at a limit too fast to stop in time), so the filter also brakes early:
it only allows a delta from which the command can still come to rest inside the limits at maximum
deceleration. That invariant is what keeps the constraint set non-empty at every step. It approaches the
commanded target the same way, so an acceleration-limited command settles on a step target without swinging.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from real.robot.hal import RobotLimits


class SafetyEventKind(str, Enum):
    INVALID_COMMAND = "invalid_command"  # NaN / inf / wrong shape: the last safe command is held
    POSITION_LIMIT = "position_limit"
    WORKSPACE = "workspace"
    STEP_LIMIT = "step_limit"
    VELOCITY_LIMIT = "velocity_limit"
    ACCELERATION_LIMIT = "acceleration_limit"
    BRAKING = "braking"  # slowed down early to stop inside the position limits at max deceleration


@dataclass(frozen=True)
class SafetyEvent:
    """One limit the raw command violated, and the action dimensions it was clamped in."""

    kind: SafetyEventKind
    dims: tuple[int, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "dims": list(self.dims), "detail": self.detail}


def braking_reach(budget: np.ndarray, max_delta_change: np.ndarray) -> np.ndarray:
    """Largest delta d >= 0 from which a command can stop within `budget` at max deceleration.

    Stopping from delta d takes the deltas d-a, d-2a, ... (a = max_delta_change), so the distance
    covered including this step is f(d) = d + sum_{k=1..n} (d - k a), n = floor(d / a). f is increasing
    and piecewise linear with f(n a) = a n (n+1) / 2, so invert it in closed form per dimension.
    """
    budget = np.maximum(budget, 0.0)
    a = max_delta_change
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.floor((np.sqrt(1.0 + 8.0 * budget / a) - 1.0) / 2.0)
        n = np.where(np.isfinite(n), n, 0.0)
        # sqrt rounding can put n one off either way; fix it so that f(n a) <= budget < f((n+1) a).
        n = np.where(a * n * (n + 1) / 2 > budget, n - 1, n)
        n = np.where(a * (n + 1) * (n + 2) / 2 <= budget, n + 1, n)
        n = np.maximum(n, 0.0)
        reach = (budget + a * n * (n + 1) / 2) / (n + 1)
    # a = inf (no acceleration limit): the whole budget can be covered in one step.
    return np.where(np.isinf(a), budget, reach)


class SafetyFilter:
    """Clamp commands to the robot's limits, relative to the last command sent.

    Call `reset(current_state)` (or pass `current_state` to the first `filter`) with the robot's present
    command-space position; the filter assumes the robot is at rest there. To hold after a fault, filter
    `last_command` again: the command then decelerates within the acceleration limit and stays.
    Commands are float64 so no rounding ever pushes one past a limit; the driver casts as it needs.
    """

    def __init__(self, limits: RobotLimits, dt: float | None = None) -> None:
        self.limits = limits
        self.dt = float(dt if dt is not None else limits.control_period_s)
        if not (np.isfinite(self.dt) and self.dt > 0):
            raise ValueError(f"SafetyFilter dt must be a positive number of seconds, got {dt!r}.")
        self._lower, self._upper = limits.command_bounds()
        self._max_step = limits.max_step
        self._max_velocity_step = limits.max_velocity * self.dt
        self._max_delta_change = limits.max_acceleration * self.dt**2
        self._last: np.ndarray | None = None
        self._last_delta = np.zeros(limits.action_dim)

    @property
    def last_command(self) -> np.ndarray | None:
        return None if self._last is None else self._last.copy()

    def reset(self, current_state: np.ndarray) -> None:
        state = np.asarray(current_state, dtype=np.float64)
        if state.shape != (self.limits.action_dim,) or not np.isfinite(state).all():
            raise ValueError(
                f"SafetyFilter.reset needs a finite current state of shape ({self.limits.action_dim},), "
                f"got shape {state.shape}; read the robot's position before filtering commands."
            )
        self._last = np.clip(state, self._lower, self._upper)
        self._last_delta = np.zeros(self.limits.action_dim)

    def filter(
        self, command: Any, current_state: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[SafetyEvent]]:
        """Return (safe_command float64 [A], events naming every limit the raw command violated)."""
        if self._last is None:
            if current_state is None:
                raise ValueError(
                    "SafetyFilter.filter needs current_state on the first call (or call reset first)."
                )
            self.reset(current_state)
        last, last_delta = self._last, self._last_delta
        events: list[SafetyEvent] = []

        target = self._parse(command)
        if target is None:
            events.append(SafetyEvent(SafetyEventKind.INVALID_COMMAND, detail=_describe(command)))
            target = last.copy()

        self._check(
            events,
            SafetyEventKind.POSITION_LIMIT,
            target,
            self.limits.position_lower,
            self.limits.position_upper,
        )
        if self.limits.workspace_lower is not None:
            idx = np.asarray(self.limits.workspace_indices)
            self._check(
                events,
                SafetyEventKind.WORKSPACE,
                target[idx],
                self.limits.workspace_lower,
                self.limits.workspace_upper,
                dims=idx,
            )
        delta = np.clip(target, self._lower, self._upper) - last

        # Each motion limit is an interval on this step's delta; the braking one keeps the next step feasible.
        bounds = [
            (SafetyEventKind.STEP_LIMIT, -self._max_step, self._max_step),
            (SafetyEventKind.VELOCITY_LIMIT, -self._max_velocity_step, self._max_velocity_step),
            (
                SafetyEventKind.ACCELERATION_LIMIT,
                last_delta - self._max_delta_change,
                last_delta + self._max_delta_change,
            ),
            (
                SafetyEventKind.BRAKING,
                -braking_reach(last - self._lower, self._max_delta_change),
                braking_reach(self._upper - last, self._max_delta_change),
            ),
        ]
        low = np.full_like(delta, -np.inf)
        high = np.full_like(delta, np.inf)
        for kind, lo, hi in bounds:
            self._check(events, kind, delta, lo, hi)
            low, high = np.maximum(low, lo), np.minimum(high, hi)
        # Approach the target as the position limits are approached: no faster than lets the command stop on it
        # at maximum deceleration. Not a limit (no event): without it an acceleration-limited command overshoots
        # a step target and swings about it.
        toward = braking_reach(np.abs(delta), self._max_delta_change)
        low = np.where(delta < 0, np.maximum(low, -toward), low)
        high = np.where(delta > 0, np.minimum(high, toward), high)
        # Theory says low <= high; should rounding disagree, brake as hard as allowed (always feasible).
        braking = np.sign(last_delta) * np.maximum(np.abs(last_delta) - self._max_delta_change, 0.0)
        delta = np.where(low <= high, np.clip(delta, low, high), braking)

        safe = np.clip(last + delta, self._lower, self._upper)
        self._last_delta = safe - last
        self._last = safe
        return safe.copy(), events

    def _parse(self, command: Any) -> np.ndarray | None:
        try:
            arr = np.asarray(command, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            return None
        if arr.shape != (self.limits.action_dim,) or not np.isfinite(arr).all():
            return None
        return arr

    @staticmethod
    def _check(
        events: list[SafetyEvent],
        kind: SafetyEventKind,
        value: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        dims: np.ndarray | None = None,
    ) -> None:
        violated = np.flatnonzero((value < lower) | (value > upper))
        if violated.size:
            named = violated if dims is None else dims[violated]
            events.append(SafetyEvent(kind, tuple(int(d) for d in named), f"clamped dims {named.tolist()}"))


def _describe(command: Any) -> str:
    try:
        arr = np.asarray(command, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return f"not a numeric array ({type(command).__name__})"
    if not np.isfinite(arr).all():
        return f"non-finite values in command of shape {arr.shape}"
    return f"wrong shape {arr.shape}"
