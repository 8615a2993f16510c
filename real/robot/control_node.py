"""The control node: a fixed-rate loop that drives a robot from a chunk policy and never waits for inference.

Each tick (every 1 / control_hz seconds) the loop reads the robot's latest observation, hands a request to the
inference thread when the execution mode asks for a chunk (and no request is in flight), takes any chunk that
arrived, asks the executor (`real.robot.execution`) for the action due now, passes it through the safety filter and
sends it. Inference (`RemoteInference` to a `real.host.server` policy server, which keeps the model's Python work
off this process; on a workstation also `real.host.local_inference`) runs in its own thread, so a slow or
dead policy only means the executor runs out of actions: the node then sends the robot's hold command (through
the safety filter too); the watchdog stops the robot when no fresh action has come for `stop_after` periods,
and the node resumes by itself when actions come back. Chunks that are NaN/inf or of the wrong shape are
refused; observations that are non-finite or older than `stale_after_s` are never sent to the policy.
The robot is stopped on every way out of an episode (end, exception, KeyboardInterrupt, e-stop; SIGINT and
SIGTERM latch the e-stop inside `Watchdog.signal_estop`).

Everything the node calls on a robot is declared by `real.robot.hal.Robot` (with defaults), and everything it
asks of a policy by `InferenceBackend` (the policy's declared `supports_prefix` and `noise_shape`): nothing is
probed. Deployment is reproducible as evaluation is: each chunk's noise is drawn from a numpy generator seeded
by the episode seed (`run_episode(seed)`), so the k-th chunk of an episode is a function of its observation,
the seed and its prefix.
numpy + standard library: this runs on the robot computer.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from real.robot.client import PolicyClient, PolicyClientError, PolicyServerError
from real.robot.execution import MODES, committed_slots, make_executor
from real.robot.hal import Robot, Teleoperator
from real.robot.safety import SafetyFilter
from real.robot.watchdog import Watchdog, WatchdogState
from robopolicy.config import setting
from robopolicy.data.spec import ACTION_KEY, OBSERVATION_PREFIX, feature_problems


class ControlNodeError(RuntimeError):
    """The robot and the policy do not fit together, or the node is misconfigured."""


@dataclass
class ControlConfig:
    """The control node's settings (the `control:` section of configs/deploy.yaml)."""

    control_hz: float = setting(20.0, "10-100 Hz (the built-in tasks' actions are 10 Hz; the node interpolates "
                                "between them)")
    mode: str = setting("auto", "auto | sync | ensemble | rtc; auto: rtc for a delay-aware policy, else sync "
                        "(configs/deploy.yaml has the measurements behind it)", choices=("auto", *MODES))
    interpolate: bool = setting(True, "linear interpolation between the policy's actions up to control_hz")
    action_fps: float | None = setting(None, "the rate the policy's actions are meant for; null: the policy's "
                                       "or the robot's")
    hold_after: int = setting(3, "watchdog periods without a fresh action before HOLD")
    stop_after: int = setting(10, "... before STOP (the robot is stopped; the node resumes when actions return)")
    stale_after_s: float = setting(0.25, "older observations are not sent to the policy")
    max_episode_s: float = setting(60.0, "an episode ends after this many seconds")
    ensemble_decay: float = setting(0.01, "ACT temporal ensembling weight exp(-decay * i)")
    rtc_blend_steps: int = setting(4, "rtc cross-fade when the policy cannot freeze a prefix")
    expected_latency_s: float = setting(0.0, "rtc's first guess of the inference delay (then measured)")
    retry_after_s: float = setting(0.1, "wait after a failed inference before asking again")

    def __post_init__(self) -> None:
        if not 1.0 <= self.control_hz <= 1000.0:
            raise ControlNodeError(f"control_hz must be between 1 and 1000, got {self.control_hz}.")
        if self.mode not in ("auto", *MODES):
            raise ControlNodeError(f"mode {self.mode!r} is unknown; choose one of auto, {', '.join(MODES)}.")


# ============================================================================================ inference


class InferenceBackend(Protocol):
    """A policy as the node sees it: its shape, its declared capability and one call per chunk."""

    n_obs_steps: int
    horizon: int
    n_action_steps: int
    features: dict[str, dict]
    fps: float | None
    supports_prefix: bool  # the policy keeps committed prefix_actions (rtc freezes them)
    language: bool  # the policy reads the episode's instruction
    delay_aware: bool  # the policy was trained on committed prefixes (mode auto then runs rtc)
    noise_shape: tuple[int, ...]  # the standard normal noise one chunk is sampled from

    def infer(self, observation: dict[str, np.ndarray], timestamp: float, prefix_actions: np.ndarray | None,
              noise: np.ndarray | None = None, instruction: str | None = None) -> tuple[np.ndarray, dict[str, Any]]: ...

    def close(self) -> None: ...


class RemoteInference:
    """A policy behind a `real.host.server.PolicyServer`; its shape and capabilities come in the hello reply."""

    def __init__(self, address: str | tuple[str, int], token: str | None = None, timeout_s: float = 1.0,
                 extra_latency_s: float = 0.0, connect_timeout_s: float = 30.0) -> None:
        self.client = PolicyClient(address, token=token, timeout_s=timeout_s)
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                meta = self.client.hello()
                break
            except PolicyServerError:
                raise
            except PolicyClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.n_obs_steps, self.horizon, self.n_action_steps = meta.n_obs_steps, meta.horizon, meta.n_action_steps
        self.features, self.fps = meta.features, meta.fps
        self.supports_prefix, self.language = meta.supports_prefix, meta.language
        self.delay_aware = meta.delay_aware
        self.noise_shape = tuple(meta.noise_shape or (meta.horizon, meta.features[ACTION_KEY]["shape"][0]))
        self.extra_latency_s = float(extra_latency_s)

    def infer(self, observation, timestamp, prefix_actions, noise=None, instruction=None):
        prefix = prefix_actions if self.supports_prefix else None
        chunk, info = self.client.infer(observation, timestamp, noise=noise, prefix_actions=prefix,
                                        instruction=instruction if self.language else None)
        if self.extra_latency_s:
            time.sleep(self.extra_latency_s)
        return chunk, info

    def close(self) -> None:
        self.client.close()


@dataclass
class InferenceRequest:
    observation: dict[str, np.ndarray]  # key -> [n_obs_steps, ...]
    t_obs: float  # capture time of the newest observation
    prefix_actions: np.ndarray | None
    noise: np.ndarray | None = None  # [*noise_shape] standard normal, from the episode's generator
    instruction: str | None = None  # the episode's task in words (for a language policy)


@dataclass
class InferenceResult:
    t_obs: float
    latency_s: float  # from the request to the chunk being ready
    chunk: np.ndarray | None = None  # [H, A], validated
    error: str | None = None
    prefix_len: int = 0


class InferenceWorker:
    """One background thread running one request at a time; results are picked up with `poll()`."""

    def __init__(self, backend: InferenceBackend, action_dim: int) -> None:
        self.backend = backend
        self.expected_shape = (backend.horizon, action_dim)
        self._request: InferenceRequest | None = None
        self._result: InferenceResult | None = None
        self._busy = False
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, request: InferenceRequest) -> None:
        with self._cv:
            self._request, self._busy = request, True
            self._cv.notify()

    def poll(self) -> InferenceResult | None:
        with self._cv:
            result, self._result = self._result, None
        return result

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._request is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                request, self._request = self._request, None
            started = time.monotonic()
            result = InferenceResult(t_obs=request.t_obs, latency_s=0.0,
                                     prefix_len=0 if request.prefix_actions is None else len(request.prefix_actions))
            try:
                told = {} if request.instruction is None else {"instruction": request.instruction}
                chunk, _ = self.backend.infer(request.observation, request.t_obs, request.prefix_actions,
                                              request.noise, **told)
                chunk = np.asarray(chunk, dtype=np.float64)
                if chunk.shape != self.expected_shape:
                    result.error = f"chunk of shape {chunk.shape}, expected {self.expected_shape}"
                elif not np.isfinite(chunk).all():
                    result.error = "chunk holds NaN or inf"
                else:
                    result.chunk = chunk
            except (PolicyClientError, OSError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a local policy failing must not kill the thread
                result.error = f"policy raised {type(exc).__name__}: {exc}"
            result.latency_s = time.monotonic() - started
            with self._cv:
                self._result, self._busy = result, False


def execution_mode(mode: str, backend: InferenceBackend) -> str:
    """The execution mode to run: `auto` is rtc for a delay-aware policy (trained for the prefix rtc commits) and
    sync otherwise (sync measured best for policies trained without prefixes: configs/deploy.yaml)."""
    if mode != "auto":
        return mode
    return "rtc" if backend.delay_aware else "sync"


# ========================================================================================= observations


class ObservationBuffer:
    """Recent valid observation frames by capture time; builds the policy's history at the action rate."""

    def __init__(self, keys: list[str], n_obs_steps: int, dt: float, keep_s: float = 2.0) -> None:
        self.keys, self.n_obs_steps, self.dt, self.keep_s = keys, n_obs_steps, dt, keep_s
        self.frames: deque[tuple[float, dict[str, np.ndarray]]] = deque()

    def clear(self) -> None:
        self.frames.clear()

    @property
    def latest_time(self) -> float:
        return self.frames[-1][0] if self.frames else -math.inf

    def add(self, timestamp: float, observation: dict[str, np.ndarray]) -> None:
        self.frames.append((timestamp, {k: np.asarray(observation[k]) for k in self.keys}))
        while self.frames[0][0] < timestamp - self.keep_s:
            self.frames.popleft()

    def history(self) -> tuple[dict[str, np.ndarray], float]:
        """key -> [n_obs_steps, ...] for times t - (To - 1) dt .. t (t: the newest frame), and t."""
        t_obs = self.latest_time
        picked = []
        for k in range(self.n_obs_steps - 1, -1, -1):
            t = t_obs - k * self.dt
            picked.append(min(self.frames, key=lambda f: abs(f[0] - t))[1])  # the frame nearest the slot
        return {key: np.stack([f[key] for f in picked]) for key in self.keys}, t_obs


def observation_is_valid(observation: dict[str, Any], keys: list[str]) -> bool:
    for key in keys:
        value = np.asarray(observation.get(key))
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return False
    return True


# ============================================================================================== the node


@dataclass
class EpisodeResult:
    success: bool
    ticks: int
    duration_s: float
    aborted: str | None = None  # why the episode ended early (e-stop reason)
    intervention: bool = False
    episode_index: int | None = None  # in the recording store
    counts: dict[str, int] = field(default_factory=dict)
    tick_lateness_s: list[float] = field(default_factory=list)  # actual - scheduled tick start
    obs_to_command_s: list[float] = field(default_factory=list)  # per chunk: obs capture -> first command from it
    inference_latency_s: list[float] = field(default_factory=list)
    seed: int | None = None  # the episode's seed (the robot's reset and the chunks' noise)
    # per chunk sent with a committed prefix: (slots it froze beyond the one due at its observation, slots that
    # actually began before its first command); equal when the prefix covered exactly what the robot executed
    prefix_slots: list[tuple[int, int]] = field(default_factory=list)


class ControlNode:
    def __init__(self, robot: Robot, backend: InferenceBackend, config: ControlConfig | None = None, *,
                 recorder: Any | None = None, teleop: Teleoperator | None = None,
                 watchdog: Watchdog | None = None, task: str = "") -> None:
        self.robot, self.backend = robot, backend
        self.cfg = config or ControlConfig()
        self.recorder, self.teleop, self.task = recorder, teleop, task
        self.period = 1.0 / self.cfg.control_hz
        self.obs_keys = sorted(k for k in backend.features if k.startswith(OBSERVATION_PREFIX))
        self.action_dim = self._check_features()
        action_fps = self.cfg.action_fps or backend.fps or robot.fps or self.cfg.control_hz
        self.action_dt = 1.0 / float(action_fps)
        self.watchdog = watchdog or Watchdog(self.period, self.cfg.hold_after, self.cfg.stop_after)
        self.worker = InferenceWorker(backend, self.action_dim)
        self.mode = execution_mode(self.cfg.mode, backend)

    def _check_features(self) -> int:
        """The action dimension, once the robot is known to offer every feature the policy needs."""
        needed = {k: self.backend.features[k] for k in (*self.obs_keys, ACTION_KEY)}
        offered = {**self.robot.observation_features, **self.robot.action_features}
        problems = feature_problems(needed, offered)
        if problems:
            raise ControlNodeError(f"The policy does not fit the robot (robot features against the policy's): "
                                   f"{'; '.join(problems)}.")
        return int(offered[ACTION_KEY]["shape"][0])

    def close(self) -> None:
        self.worker.close()

    def _hold_command(self, last: np.ndarray) -> np.ndarray:
        return np.asarray(self.robot.hold_action(last), dtype=np.float64)

    def run_episode(self, seed: int | None = None) -> EpisodeResult:
        """Run one episode until success, truncation, `max_episode_s` or an e-stop; the robot is stopped after.
        `seed` seeds the robot's reset (a simulator's) and the noise of every chunk (None: fresh entropy)."""
        cfg, robot = self.cfg, self.robot
        executor = make_executor(
            self.mode, n_obs_steps=self.backend.n_obs_steps, horizon=self.backend.horizon,
            n_action_steps=self.backend.n_action_steps, action_dt=self.action_dt, interpolate=cfg.interpolate,
            ensemble_decay=cfg.ensemble_decay, supports_prefix=self.backend.supports_prefix,
            blend_steps=cfg.rtc_blend_steps, expected_latency_s=cfg.expected_latency_s,
        )
        buffer = ObservationBuffer(self.obs_keys, self.backend.n_obs_steps, self.action_dt)
        noise_rng = np.random.default_rng(seed)  # chunk k's noise: the k-th draw, as seeded evaluation does
        obs = robot.reset(seed)
        instruction = self.task or robot.task_description  # the deployment's, else the robot's for this episode
        if self.teleop is not None:
            self.teleop.reset(seed)
        if self.recorder is not None:
            self.recorder.start_episode()
        safety = SafetyFilter(robot.limits, dt=self.period)
        safety.reset(robot.command_state())
        last_sent = safety.last_command
        self.watchdog.reset()
        # hold_ticks: ticks without an action; stall_ticks: those after the policy's first action was sent
        counts = dict.fromkeys(("clamped_ticks", "safety_events", "hold_ticks", "stall_ticks", "stops", "chunks",
                                "chunk_errors", "invalid_obs", "stale_ticks", "intervention_ticks", "missed_ticks"), 0)
        result = EpisodeResult(success=False, ticks=0, duration_s=0.0, counts=counts, seed=seed)
        last_obs_t = -math.inf
        valid_obs = obs
        if observation_is_valid(obs, self.obs_keys):
            buffer.add(obs["timestamp"], obs)
        chunk_t_obs, chunk_latency, first_command_pending = 0.0, 0.0, False
        retry_at, stopped, success, acted = -math.inf, False, False, False
        start = time.monotonic()
        executor.origin = start + 0.5 * self.period  # action slots begin at command instants (see t_cmd)
        tick = 0
        try:
            while True:
                deadline = start + tick * self.period
                while (wait := deadline - time.monotonic()) > 0:
                    time.sleep(wait)
                now = time.monotonic()
                result.tick_lateness_s.append(now - deadline)
                # The command sent now holds until the next tick: it is the plan's action at the middle of that
                # period (the midpoint rule for a zero-order hold), timed on the schedule, not on OS wake-up jitter.
                t_cmd = deadline + 0.5 * self.period

                # 1. observation: only finite, new frames go into the policy's history
                obs = robot.get_observation()
                if obs["timestamp"] != last_obs_t:
                    last_obs_t = obs["timestamp"]
                    if observation_is_valid(obs, self.obs_keys):
                        buffer.add(obs["timestamp"], obs)
                        valid_obs = obs
                    else:
                        counts["invalid_obs"] += 1
                fresh = now - buffer.latest_time <= cfg.stale_after_s
                counts["stale_ticks"] += not fresh

                # 2. a chunk that arrived; 3. a new request when the mode wants one
                arrived = self.worker.poll()
                if arrived is not None:
                    if arrived.chunk is not None:
                        executor.add_chunk(arrived.chunk, arrived.t_obs, t_cmd)
                        counts["chunks"] += 1
                        chunk_t_obs, chunk_latency, first_command_pending = arrived.t_obs, arrived.latency_s, True
                        if arrived.prefix_len:
                            result.prefix_slots.append((arrived.prefix_len - self.backend.n_obs_steps,
                                                        committed_slots(t_cmd - arrived.t_obs, self.action_dt)))
                        result.inference_latency_s.append(arrived.latency_s)
                    else:
                        counts["chunk_errors"] += 1
                        retry_at = now + cfg.retry_after_s
                asks = not self.worker.busy and fresh and now >= retry_at
                if asks and executor.wants_inference(t_cmd, buffer.latest_time):
                    history, t_obs = buffer.history()
                    noise = noise_rng.standard_normal(self.backend.noise_shape, dtype=np.float32)
                    self.worker.submit(InferenceRequest(history, t_obs, executor.prefix_for(t_obs), noise,
                                                        instruction if self.backend.language else None))

                # 4. the action due now (a human's when intervening), the watchdog, the safety filter
                action = executor.action_at(t_cmd)
                intervening = False
                if self.teleop is not None:
                    human = self.teleop.get_action()
                    if human is not None:
                        action, intervening = np.asarray(human, dtype=np.float64), True
                        counts["intervention_ticks"] += 1
                if action is not None:
                    self.watchdog.action_received(now)
                state = self.watchdog.state(now)
                requested = action if action is not None else self._hold_command(last_sent)
                events: list = []
                if state is WatchdogState.STOP:
                    if not stopped:
                        robot.stop()
                        counts["stops"] += 1
                        stopped = True
                    requested = sent = last_sent = self._hold_command(last_sent)
                    safety.reset(sent)  # the robot is stopped at rest
                else:
                    sent, events = safety.filter(requested)
                    sent = robot.send_action(sent).astype(np.float64)
                    last_sent, stopped = sent, False
                    counts["hold_ticks"] += action is None
                    counts["stall_ticks"] += action is None and acted
                    acted |= action is not None
                    if events:
                        counts["clamped_ticks"] += 1
                        counts["safety_events"] += len(events)
                    if action is not None and not intervening and first_command_pending:
                        result.obs_to_command_s.append(now - chunk_t_obs)
                        first_command_pending = False
                command_time = time.monotonic()

                status = robot.status
                success = bool(status["success"])
                marked = self.teleop.outcome if self.teleop is not None else None
                if marked is not None:  # a person's verdict ends the episode and is its outcome
                    success = bool(marked)
                if self.recorder is not None:
                    self.recorder.add_frame(
                        valid_obs, requested=requested, sent=sent, events=events,
                        obs_timestamp=float(valid_obs["timestamp"]), command_time=command_time,
                        chunk_obs_timestamp=chunk_t_obs, inference_latency=chunk_latency, obs_fresh=fresh,
                        watchdog=state.value, intervention=intervening, held=action is None, success=success)
                result.intervention |= intervening
                tick += 1
                if self.watchdog.estopped:
                    result.aborted = self.watchdog.estop_reason
                    break
                if success or marked is not None or status["truncated"] or now - start >= cfg.max_episode_s:
                    break
                # a late tick is skipped rather than crammed in: the loop keeps its phase
                behind = int((time.monotonic() - (start + tick * self.period)) // self.period)
                if behind > 0:
                    counts["missed_ticks"] += behind
                    tick += behind
        finally:
            robot.stop()  # every way out of an episode stops the robot
            result.duration_s = time.monotonic() - start
            result.ticks = tick
            result.success = success
            if self.recorder is not None:
                result.episode_index = self.recorder.finish_episode(
                    task=instruction, success=success,
                    extra={"seed": seed, "mode": self.mode, "aborted": result.aborted, "counts": counts})
            self._drain(executor)
        return result

    def _drain(self, executor) -> None:
        """Let an in-flight request finish (bounded) so the next episode does not get this one's chunk."""
        deadline = time.monotonic() + 5.0
        while self.worker.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        self.worker.poll()
        executor.reset()
