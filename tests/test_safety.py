"""Safety filter (property-based and explicit cases) and watchdog (real timing, real signals, real UDP)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from real.robot.hal import LimitsError, RobotLimits
from real.robot.safety import SafetyEventKind, SafetyFilter, braking_reach
from real.robot.watchdog import EStopListener, Watchdog, WatchdogState, send_estop

TOL = 1e-9


def arm_limits(**overrides) -> RobotLimits:
    kwargs = dict(
        position_lower=[-1.0, -1.0, 0.0, -2.0],
        position_upper=[1.0, 1.0, 1.0, 2.0],
        max_velocity=[0.5, 0.5, 0.5, 2.0],
        max_acceleration=[2.0, 2.0, 2.0, 20.0],
        max_step=[0.04, 0.04, 0.04, 1.0],
        control_period_s=0.1,
    )
    kwargs.update(overrides)
    return RobotLimits(**kwargs)


def assert_stream_safe(limits: RobotLimits, dt: float, start: np.ndarray, outputs: list[np.ndarray]) -> None:
    """Every command within the position/workspace box; consecutive ones within step/velocity/acceleration."""
    lower, upper = limits.command_bounds()
    max_delta = np.minimum(limits.max_step, limits.max_velocity * dt)
    max_delta_change = limits.max_acceleration * dt**2
    previous, previous_delta = np.clip(start, lower, upper), np.zeros_like(start)
    for y in outputs:
        assert y.shape == start.shape and np.isfinite(y).all()
        assert (y >= lower).all() and (y <= upper).all()
        delta = y - previous
        assert (np.abs(delta) <= max_delta + TOL).all()
        assert (np.abs(delta - previous_delta) <= max_delta_change + TOL).all()
        previous, previous_delta = y, delta


# ------------------------------------------------------------------------------------- property test
# Hypothesis picks the structure (dimension, which limits exist, the kind of every command in the stream)
# and a seed; numpy fills in the numbers. Drawing every float through hypothesis costs ~5 ms per example,
# this keeps 10,000 streams within the time budget while hypothesis still shrinks failing streams.

COMMAND_KINDS = ["near", "near", "far", "huge", "nan", "inf", "wrong_length", "matrix", "text", "none", "hold"]


def make_command(kind: str, rng: np.random.Generator, dim: int, previous: np.ndarray) -> object:
    if kind == "near":
        return rng.uniform(-4, 4, dim)
    if kind == "far":
        return rng.uniform(-1e6, 1e6, dim)
    if kind == "huge":
        return rng.choice([1e300, -1e300, 1.7e308], dim)
    if kind in ("nan", "inf"):
        command = rng.uniform(-4, 4, dim)
        command[rng.integers(dim)] = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
        return command
    if kind == "wrong_length":
        return rng.uniform(-4, 4, rng.choice([n for n in range(dim + 4) if n != dim]))
    if kind == "matrix":
        return rng.uniform(-4, 4, (2, dim))
    if kind == "text":
        return ["x"] * dim
    if kind == "none":
        return None
    return previous  # re-filter the last safe command: the hold path


@st.composite
def limits_and_stream(draw):
    dim = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lower = rng.uniform(-3, 2, dim)
    span = rng.uniform(0.01, 3, dim) if draw(st.booleans()) else rng.uniform(1e-3, 0.05, dim)
    workspace = {}
    if dim >= 3 and draw(st.booleans()):
        mid = lower[:3] + span[:3] / 2  # a box overlapping the position limits
        half = rng.uniform(0.005, 2, 3)
        workspace = dict(workspace_lower=mid - half, workspace_upper=mid + half)
    limits = RobotLimits(
        position_lower=lower,
        position_upper=lower + span,
        max_velocity=10 ** rng.uniform(-3, 1, dim),
        max_acceleration=np.inf if draw(st.booleans()) else 10 ** rng.uniform(-2, 3, dim),
        max_step=np.inf if draw(st.booleans()) else 10 ** rng.uniform(-3, 1, dim),
        control_period_s=draw(st.sampled_from([0.002, 0.01, 0.05, 0.1])),
        **workspace,
    )
    start = rng.uniform(-5, 5, dim)
    kinds = draw(st.lists(st.sampled_from(COMMAND_KINDS), min_size=1, max_size=40))
    return limits, start, kinds, rng


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(limits_and_stream())
def test_no_stream_ever_breaks_a_limit(case):
    limits, start, kinds, rng = case
    safety = SafetyFilter(limits)
    outputs = []
    for kind in kinds:
        previous = safety.last_command if outputs else start
        command = make_command(kind, rng, limits.action_dim, previous)
        outputs.append(safety.filter(command, current_state=start)[0])
    assert_stream_safe(limits, limits.control_period_s, start, outputs)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 50), st.floats(1e-4, 5))
def test_braking_reach_inverts_the_stopping_distance(budget, a):
    d = float(braking_reach(np.array([budget]), np.array([a]))[0])
    n = np.floor(d / a)
    distance = d + n * d - a * n * (n + 1) / 2  # this step plus the decelerating ones
    assert distance <= budget * (1 + 1e-9) + 1e-12
    assert d >= 0


# ------------------------------------------------------------------------------------- explicit cases


def test_nan_inf_and_wrong_shape_hold_the_last_safe_command():
    safety = SafetyFilter(arm_limits())
    start = np.array([0.1, 0.2, 0.3, 0.4])
    for bad in ([np.nan, 0, 0, 0], [0, np.inf, 0, 0], [0.0, 0.0], np.zeros((2, 4)), "x", None, [object()] * 4):
        safe, events = safety.filter(bad, current_state=start)
        np.testing.assert_array_equal(safe, start)
        assert [e.kind for e in events] == [SafetyEventKind.INVALID_COMMAND]


def test_jump_beyond_step_limit_is_clamped_to_the_step():
    safety = SafetyFilter(arm_limits(max_acceleration=np.inf))
    safe, events = safety.filter([0.9, 0.0, 0.5, 0.0], current_state=np.array([0.0, 0.0, 0.5, 0.0]))
    np.testing.assert_allclose(safe, [0.04, 0.0, 0.5, 0.0])
    kinds = {e.kind: e.dims for e in events}
    assert kinds[SafetyEventKind.STEP_LIMIT] == (0,)
    assert kinds[SafetyEventKind.VELOCITY_LIMIT] == (0,)  # 0.9 per 0.1 s is above 0.5 per s as well


def test_acceleration_ramps_up_from_rest():
    safety = SafetyFilter(arm_limits(max_step=np.inf, max_velocity=10.0, max_acceleration=1.0))
    start = np.zeros(4) + [0, 0, 0.5, 0]
    deltas = []
    previous = start
    for _ in range(3):
        safe, events = safety.filter([1.0, 0.0, 0.5, 0.0], current_state=start)
        deltas.append(safe[0] - previous[0])
        previous = safe
        assert SafetyEventKind.ACCELERATION_LIMIT in {e.kind for e in events}
    np.testing.assert_allclose(deltas, [0.01, 0.02, 0.03])  # a * dt^2 more per period


def test_position_limit_and_workspace_box():
    limits = arm_limits(workspace_lower=[-0.5, -0.5, 0.1], workspace_upper=[0.5, 0.5, 0.8], max_step=np.inf)
    limits = RobotLimits.from_dict({**limits.to_dict(), "max_velocity": 100.0, "max_acceleration": np.inf})
    safety = SafetyFilter(limits)
    safe, events = safety.filter([0.7, -3.0, 0.9, 5.0], current_state=np.array([0.0, 0.0, 0.5, 0.0]))
    np.testing.assert_allclose(safe, [0.5, -0.5, 0.8, 2.0])
    kinds = {e.kind: e.dims for e in events}
    assert kinds[SafetyEventKind.POSITION_LIMIT] == (1, 3)
    assert kinds[SafetyEventKind.WORKSPACE] == (0, 1, 2)


def test_brakes_before_the_position_limit_instead_of_overshooting():
    limits = arm_limits(max_step=np.inf, max_velocity=5.0, max_acceleration=5.0)
    safety = SafetyFilter(limits)
    start = np.array([0.0, 0.0, 0.5, 0.0])
    outputs, kinds = [], set()
    for _ in range(60):  # push hard towards x = 10, far past the limit at 1.0
        safe, events = safety.filter([10.0, 0.0, 0.5, 0.0], current_state=start)
        outputs.append(safe)
        kinds |= {e.kind for e in events}
    assert_stream_safe(limits, 0.1, start, outputs)
    assert SafetyEventKind.BRAKING in kinds
    assert outputs[-1][0] == pytest.approx(1.0)  # arrives at the limit and rests there


def test_limits_reject_inconsistent_values():
    with pytest.raises(LimitsError, match="position_lower"):
        arm_limits(position_upper=[-1.0, 1.0, 1.0, 2.0])
    with pytest.raises(LimitsError, match="max_velocity"):
        arm_limits(max_velocity=0.0)
    with pytest.raises(LimitsError, match="Unknown robot limit keys"):
        RobotLimits.from_dict({**arm_limits().to_dict(), "max_jerk": 1.0})


# ------------------------------------------------------------------------------------------ watchdog

PERIOD = 0.01


def test_watchdog_holds_then_stops_without_fresh_actions():
    watchdog = Watchdog(PERIOD, hold_after=3, stop_after=8)
    assert watchdog.state() is WatchdogState.OK
    time.sleep(4 * PERIOD)
    assert watchdog.state() is WatchdogState.HOLD
    watchdog.action_received()
    assert watchdog.state() is WatchdogState.OK
    time.sleep(9 * PERIOD)
    assert watchdog.state() is WatchdogState.STOP
    watchdog.action_received()  # actions resuming recovers from a stall (not from an e-stop)
    assert watchdog.state() is WatchdogState.OK


def test_watchdog_state_boundaries_with_explicit_times():
    watchdog = Watchdog(PERIOD, hold_after=2, stop_after=5, clock=lambda: 0.0)
    assert watchdog.state(now=0.0199) is WatchdogState.OK
    assert watchdog.state(now=0.0201) is WatchdogState.HOLD
    assert watchdog.state(now=0.0499) is WatchdogState.HOLD
    assert watchdog.state(now=0.0501) is WatchdogState.STOP


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_latches_estop_until_reset(signum):
    watchdog = Watchdog(PERIOD)
    previous = signal.getsignal(signum)
    with watchdog.signal_estop([signum]):
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode boundary
        assert watchdog.estopped and signal.Signals(signum).name in watchdog.estop_reason
        watchdog.action_received()  # fresh actions do not clear a latched e-stop
        assert watchdog.state() is WatchdogState.STOP
    assert signal.getsignal(signum) is previous
    watchdog.reset()
    assert watchdog.state() is WatchdogState.OK and not watchdog.estopped


def test_estop_message_over_udp_latches_and_bad_token_is_ignored():
    watchdog = Watchdog(PERIOD, hold_after=100, stop_after=200)
    with EStopListener(watchdog, token="s3cret") as listener:
        send_estop(listener.address, "wrong token", token="guess")
        send_estop(listener.address, "no token")
        time.sleep(0.2)
        assert watchdog.state() is WatchdogState.OK
        send_estop(listener.address, "operator pressed the button", token="s3cret")
        deadline = time.monotonic() + 2.0
        while not watchdog.estopped and time.monotonic() < deadline:
            time.sleep(0.01)
    assert watchdog.state() is WatchdogState.STOP
    assert "operator pressed the button" in watchdog.estop_reason
    watchdog.reset()
    assert watchdog.state() is WatchdogState.OK


def test_estop_listener_refuses_public_interface_without_token():
    with pytest.raises(ValueError, match="without a token"):
        EStopListener(Watchdog(PERIOD), host="0.0.0.0")
