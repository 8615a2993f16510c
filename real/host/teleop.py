"""A scripted intervener for the simulated robot: the task's expert takes over when the policy stalls.

It plays the human with a takeover pedal: it watches the end-effector (entries `ee.x, ee.y, ee.z` of
`observation.state`), and when it has moved less than `stall_distance` over the last `stall_s` seconds
(without success), or when `patience_s` passed without success since the episode began or the last takeover
ended (a person who sees the attempt going nowhere), it intervenes for `takeover_s` seconds, acting with the scripted expert from the robot's own
observations. The expert is asked at the task's own rate (its phase machine counts task steps) and its action
held in between. It plans from the state its command will meet, one control step after the frame it read (the
expert's `predict`: its previous command applied), and restarts its phase machine at each takeover. Imports `sim` lazily (the intervener runs on the workstation, beside the simulator).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

from real.robot.hal import Robot, Teleoperator
from robopolicy.data.spec import STATE_KEY


class ScriptedIntervener(Teleoperator):
    def __init__(self, robot: Robot, task: str, *, stall_s: float = 2.0, stall_distance: float = 0.01,
                 takeover_s: float = 3.0, patience_s: float | None = None, seed: int = 0, predict: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.robot, self.task = robot, task
        self.stall_s, self.stall_distance, self.takeover_s = stall_s, stall_distance, takeover_s
        self.patience_s = patience_s  # also take over after this long without success since the last takeover
        self.seed = seed
        self.predict = predict  # plan from the state the command will meet (one control step on), not the frame read
        self._clock = clock
        self._expert = None
        self._ee_slice: slice | None = None
        self.interventions = 0

    def connect(self) -> None:
        import sim

        self._expert = sim.make_expert(self.task, seed=self.seed)
        names = self.robot.observation_features[STATE_KEY]["names"]
        start = names.index("ee.x")
        self._ee_slice = slice(start, start + 3)
        self.reset(self.seed)

    def disconnect(self) -> None:
        self._expert = None

    def reset(self, seed: int | None = None) -> None:
        """A new episode: forget the motion history, the expert starts over."""
        if self._expert is not None:
            self._expert.reset(seed)
        self._track: deque[tuple[float, np.ndarray]] = deque()
        self._until = -np.inf
        self._patience_from: float | None = None  # the episode's start, then the end of the last takeover
        self._action: np.ndarray | None = None
        self._next_expert_t = -np.inf

    @property
    def is_intervening(self) -> bool:
        return self._clock() < self._until

    def get_action(self) -> np.ndarray | None:
        if self._expert is None:
            raise RuntimeError("ScriptedIntervener is not connected; use it in a `with` block.")
        now = self._clock()
        obs = self.robot.get_observation()
        state = np.asarray(obs[STATE_KEY], dtype=np.float64)
        if not np.isfinite(state).all():
            return self._action if self.is_intervening else None
        if self._patience_from is None:
            self._patience_from = now
        impatient = (self.patience_s is not None and now - max(self._patience_from, self._until) >= self.patience_s
                     and not self.robot.status["success"])
        if not self.is_intervening and (self._stalled(now, state[self._ee_slice]) or impatient):
            self._until = now + self.takeover_s
            self._next_expert_t = now
            self.interventions += 1
            self._action = None  # the command in force is the policy's, not one of ours
            if hasattr(self._expert, "restart"):
                self._expert.restart()  # a stale phase from an earlier takeover: judge the scene afresh
        if not self.is_intervening:
            return None
        period = 1.0 / (self.robot.fps or 10)
        # the expert's phase machine runs at the task rate, on a fixed schedule: rescheduling from `now` made a
        # 20 Hz control loop whose tick came a hair early wait a third tick, so the expert ran at 6.7 Hz with each
        # action held 1.5 times as long as the task means (recorded that way, the interventions taught it too)
        if now >= self._next_expert_t - 0.25 * period:
            # the command sent now meets the robot a control step after the frame read (the arm samples it as it
            # captures the next frame), when our previous command has moved it once more: plan from there. Acting
            # on the frame itself, the expert's full-gain moves circled the cube ~2 cm off, never descending, and
            # only 6 of 37 takeovers of a weak base's deployment ended in success (3 s each; the expert needs 2.5)
            planned = state.astype(np.float32)
            if self.predict and self._action is not None and hasattr(self._expert, "predict"):
                planned = self._expert.predict(planned, self._action)
            self._action = np.asarray(self._expert.act({STATE_KEY: planned}))
            self._next_expert_t += period
            if self._next_expert_t < now:  # fell behind by more than a period: start the schedule again
                self._next_expert_t = now + period
        return self._action

    def _stalled(self, now: float, ee: np.ndarray) -> bool:
        if self.robot.status["success"]:
            return False
        self._track.append((now, ee.copy()))
        while self._track and self._track[0][0] < now - self.stall_s:
            self._track.popleft()
        t_first, ee_first = self._track[0]
        # stalled: the whole window spans stall_s and the hand stayed within stall_distance of where it was
        return now - t_first >= 0.9 * self.stall_s and all(
            np.linalg.norm(p - ee_first) < self.stall_distance for _, p in self._track
        )
