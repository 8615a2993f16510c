"""Execution modes, prefix-preserving sampling and the control node on the real simulated robot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import yaml
from conftest import wait_until

from real.host.local_inference import LocalInference
from real.host.server import PolicyServer
from real.robot.control_node import (
    ControlConfig,
    ControlNode,
    ControlNodeError,
    ObservationBuffer,
    RemoteInference,
)
from real.robot.execution import (
    ChunkPlan,
    EnsembleExecutor,
    RTCExecutor,
    SyncExecutor,
    committed_slots,
    make_executor,
)
from real.robot.hal import Teleoperator
from real.robot.recording import EpisodeRecorder
from real.robot.sim_robot import SimRobot
from robopolicy.data import DemoStore, validate_store
from robopolicy.policies import make_policy

STATE_DIM, ACTION_DIM = 28, 4  # builtin/pick_place
FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
    "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": None},
}


def small_policy(name: str, **overrides):
    with open(f"configs/policy/{name}.yaml") as f:
        cfg = yaml.safe_load(f)
    if "unet" in cfg:
        cfg["unet"] = {"down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "step_embed_dim": 16}
    cfg.update(overrides)
    stats = {k: {s: np.full(v["shape"], x, np.float32) for s, x in
                 {"mean": 0, "std": 1, "min": -1, "max": 1, "q01": -1, "q99": 1}.items()} for k, v in FEATURES.items()}
    torch.manual_seed(0)
    return make_policy(cfg, FEATURES, stats).eval()


def ramp_chunk(horizon: int = 16, start: float = 0.0) -> np.ndarray:
    return np.stack([np.full(ACTION_DIM, start + j, dtype=np.float64) for j in range(horizon)])


# ------------------------------------------------------------------------------------------ chunk timing


def test_plan_drops_actions_whose_time_passed_and_interpolates():
    # To = 2: index 1 is due at the observation time t_obs = 10.0; dt = 0.1
    plan = ChunkPlan.anchored(ramp_chunk(), 10.0, 0.1, n_obs_steps=2, n_execute=8)
    assert plan.sample(10.0)[0] == pytest.approx(1.0)
    # arriving 0.25 s after the observation, the first actions are gone: 1.0 + 2.5 steps
    assert plan.sample(10.25)[0] == pytest.approx(3.5)
    assert plan.sample(10.25, interpolate=False)[0] == pytest.approx(3.0)
    assert plan.sample(9.95) is None  # before the observation's own action
    assert plan.sample(10.0 + 8 * 0.1) is None  # past the 8 executed actions


def test_sync_holds_while_waiting_and_starts_chunk_on_arrival():
    ex = SyncExecutor(2, 16, 8, 0.1)
    assert ex.wants_inference(0.0) and ex.action_at(0.0) is None  # nothing yet: the node holds
    ex.add_chunk(ramp_chunk(), t_obs=0.0, now=0.3)  # 300 ms late; sync starts from index To-1 anyway
    assert ex.action_at(0.3)[0] == pytest.approx(1.0)
    assert not ex.wants_inference(0.5)
    assert ex.action_at(0.3 + 0.8) is None and ex.wants_inference(0.3 + 0.8)


def test_sync_asks_for_the_next_chunk_once_the_plans_end_is_observed():
    """Evaluation observes after a chunk's last action; so must sync. Slots on the command instants (origin 0.025
    + k * 0.1), frames captured a servo phase later: at the plan's end (0.525) the newest frame is the one captured
    as its last action began (0.427), a state one action behind the arm's. The request waits for the end's frame."""
    ex = SyncExecutor(2, 16, 4, 0.1)
    ex.origin = 0.025
    ex.add_chunk(ramp_chunk(), t_obs=0.0, now=0.075)  # starts at the slot at 0.125; 4 actions end at 0.525
    assert not ex.wants_inference(0.475, latest_obs=0.427)  # still executing
    assert not ex.wants_inference(0.525, latest_obs=0.427)  # ran out, but its last action is not observed yet
    assert ex.wants_inference(0.575, latest_obs=0.527)
    assert ex.wants_inference(0.525)  # a caller that does not know the frame's time asks at the end


def test_ensemble_averages_overlapping_chunks_with_exponential_weights():
    ex = EnsembleExecutor(1, 8, 4, 0.1, decay=0.5)
    ex.add_chunk(np.zeros((8, ACTION_DIM)), t_obs=0.0, now=0.0)
    assert not ex.wants_inference(0.05) and ex.wants_inference(0.1)
    ex.add_chunk(np.ones((8, ACTION_DIM)), t_obs=0.1, now=0.1)
    w_old, w_new = 1.0, np.exp(-0.5)  # i = 0 for the oldest prediction
    assert ex.action_at(0.2)[0] == pytest.approx(w_new / (w_old + w_new))
    assert ex.action_at(0.85)[0] == pytest.approx(1.0)  # only the newer chunk reaches that far


def test_rtc_asks_early_by_the_measured_delay_and_freezes_the_prefix():
    ex = RTCExecutor(2, 16, 8, 0.1)
    # 250 ms inference: slots 100 and 200 ms after the observation begin meanwhile. The robot was holding still,
    # so this first chunk starts on arrival (its index 1, the action "now", due at t = 0).
    ex.add_chunk(ramp_chunk(), t_obs=-0.25, now=0.0)
    assert ex.delay_steps == 2
    assert ex.action_at(0.0)[0] == pytest.approx(1.0)
    # the execution horizon of 8 actions ends at t = 0.8; ask 2 steps before
    assert not ex.wants_inference(0.55) and ex.wants_inference(0.6)
    prefix = ex.prefix_for(t_obs=0.6)
    # past action (index 0 at t=0.5), the one due at the observation (0.6) and those whose slots begin while
    # the next chunk is computed (0.7, 0.8)
    assert prefix.shape == (2 + 2, ACTION_DIM)
    np.testing.assert_allclose(prefix[:, 0], [6.0, 7.0, 8.0, 9.0])
    # a chunk that continues the prefix switches seamlessly
    new = ramp_chunk(start=6.0)
    before = ex.action_at(0.85)
    ex.add_chunk(new, t_obs=0.6, now=0.85)
    np.testing.assert_allclose(ex.action_at(0.85), before)


def test_a_chunk_for_a_robot_holding_still_starts_at_the_next_slot_of_the_action_clock():
    for mode in ("sync", "ensemble", "rtc"):
        ex = make_executor(mode, n_obs_steps=2, horizon=16, n_action_steps=4, action_dt=0.1)
        ex.origin = 0.025  # slots at 0.025 + k * 0.1
        ex.add_chunk(ramp_chunk(), t_obs=0.0, now=0.07)
        assert ex.action_at(0.11) is None, mode  # still holding until the slot at 0.125
        assert ex.action_at(0.125)[0] == pytest.approx(1.0), mode
        assert ex.action_at(0.225)[0] == pytest.approx(2.0), mode


def test_rtc_asks_for_the_next_chunk_once_the_boundary_slot_is_observed():
    """A chunk that started on arrival has its slots on the node's command instants (origin 0.025 + k * 0.1); the
    servo samples them, and the state is captured, a phase later (0.027 + k * 0.1). At the boundary's command
    instant the newest frame is the previous slot's: the request waits for the boundary's frame."""
    ex = RTCExecutor(2, 16, 4, 0.1)
    ex.origin = 0.025
    ex.add_chunk(ramp_chunk(), t_obs=0.0, now=0.075)  # the reset frame's chunk, starting at the slot at 0.125
    assert ex.delay_steps == 0
    assert ex.wants_inference(0.525) and not ex.wants_inference(0.525, latest_obs=0.427)  # 4 actions: ends at 0.525
    assert ex.wants_inference(0.575, latest_obs=0.527)
    # the prefix for the boundary's frame: the action before it and the one due at it, from the running chunk
    np.testing.assert_allclose(ex.prefix_for(0.527)[:, 0], [4.02, 5.02])


def test_rtc_fast_inference_commits_only_the_current_slot():
    ex = RTCExecutor(2, 16, 4, 0.1)
    ex.add_chunk(ramp_chunk(), t_obs=0.0, now=0.03)  # 30 ms: no later slot began before the chunk arrived
    assert ex.delay_steps == 0
    assert ex.prefix_for(t_obs=0.4).shape == (2, ACTION_DIM)


def test_committed_slots_count_the_slots_that_begin_before_a_chunks_first_command():
    # 10 Hz actions; the node picks a chunk up at a command instant 0.1 - 2 ms after its observation at 0 ms
    # latency (the servo's phase lag), 0.2 - 2 ms at 100 ms, 0.25 - 2 ms (a mid-slot tick) at 150 ms
    assert [committed_slots(x, 0.1) for x in (0.0, 0.03, 0.098, 0.1, 0.198, 0.248, 0.25, 0.3)] == [0, 0, 0, 0, 1, 2,
                                                                                                   2, 2]
    assert committed_slots(0.1 + 1e-4, 0.1) == 1  # a slot at +100 ms that began before the first command


def test_rtc_expects_the_median_delay_of_the_latest_chunks_so_one_late_chunk_does_not_lengthen_the_next_prefixes():
    ex = RTCExecutor(2, 16, 4, 0.1)
    assert ex.delay_steps == 0  # expected_latency_s 0 before any chunk
    expected = []
    # chunks picked up 98 ms after their observation (0 ms injected: the servo phase short of a slot), one late
    for t, latency in enumerate([0.098, 0.148, 0.098, 0.098, 0.198, 0.198, 0.198]):
        ex.add_chunk(ramp_chunk(), t_obs=t * 0.4, now=t * 0.4 + latency)
        expected.append(ex.delay_steps)
        assert ex.prefix_for(t * 0.4 + 0.3).shape == (2 + ex.delay_steps, ACTION_DIM)
    # a latency smoothed in seconds stays over 100 ms for the three chunks after the late one (one frozen action
    # too many each); the slot median is back at 0 with the next chunk and follows a lasting change after two
    assert expected == [0, 1, 0, 0, 0, 1, 1]


def test_rtc_without_prefix_support_cross_fades():
    ex = make_executor("rtc", n_obs_steps=1, horizon=8, n_action_steps=4, action_dt=0.1, supports_prefix=False,
                       blend_steps=2)
    ex.add_chunk(np.zeros((8, ACTION_DIM)), 0.0, 0.0)
    assert ex.prefix_for(0.2) is None
    ex.add_chunk(np.ones((8, ACTION_DIM)), 0.2, 0.2)
    assert ex.action_at(0.2)[0] == pytest.approx(0.0)
    assert ex.action_at(0.3)[0] == pytest.approx(0.5)
    assert ex.action_at(0.4)[0] == pytest.approx(1.0)


def test_observation_history_is_spaced_at_the_action_rate():
    buf = ObservationBuffer(["observation.state"], n_obs_steps=3, dt=0.1)
    for i in range(20):  # a 50 Hz sensor
        buf.add(i * 0.02, {"observation.state": np.array([i * 0.02])})
    history, t_obs = buf.history()
    assert t_obs == pytest.approx(0.38)
    np.testing.assert_allclose(history["observation.state"][:, 0], [0.18, 0.28, 0.38], atol=0.021)


# ------------------------------------------------------------------------------- the node on the sim robot


@pytest.fixture(scope="module")
def robot():
    with SimRobot("builtin/pick_place", control_hz=20, sensor_latency_s=0.01) as robot:
        yield robot


def assert_commands_within_limits(actions: np.ndarray, robot: SimRobot) -> None:
    limits = robot.limits
    assert (actions >= limits.position_lower - 1e-6).all() and (actions <= limits.position_upper + 1e-6).all()
    steps = np.abs(np.diff(np.vstack([robot.command_state(), actions]), axis=0))
    assert (steps <= limits.max_step + 1e-5).all()


@pytest.mark.parametrize("mode", ["sync", "ensemble", "rtc"])
def test_node_runs_each_mode_within_limits_and_records(robot, tmp_path, mode):
    backend = LocalInference(small_policy("flow", num_inference_steps=2))
    recorder = EpisodeRecorder(tmp_path / "store", robot.observation_features, robot.action_features["action"], 20)
    node = ControlNode(robot, backend, ControlConfig(control_hz=20, mode=mode, max_episode_s=1.5),
                       recorder=recorder, task="pick")
    try:
        result = node.run_episode(seed=3)
    finally:
        node.close()
        recorder.close()
    assert result.counts["chunks"] >= 2 and result.counts["chunk_errors"] == 0
    assert 25 <= result.ticks <= 31  # 1.5 s at 20 Hz
    assert validate_store(tmp_path / "store") == []
    with DemoStore.open(tmp_path / "store") as store:
        episode = store.get_episode(0)
        assert store.episodes[0]["source"] == "policy"
        assert store.episodes[0]["extra"]["mode"] == mode
    assert_commands_within_limits(episode["action"], robot)
    # latency compensation: every chunk in use was computed from an observation before its command
    used = episode["timing.chunk_obs_timestamp"][:, 0] > 0
    assert (episode["timing.chunk_obs_timestamp"][used, 0] < episode["timing.command_time"][used, 0]).all()
    assert robot.status["stopped"] or wait_until(lambda: robot.status["stopped"], 1.0)
    if mode == "rtc":
        # every chunk after the first continued a frozen prefix; the prefix covered the slots the robot executed
        # from the old chunk before the new one's first command. A loaded machine can make a chunk late (it meets
        # more slots than were frozen), and the delay estimate (the median of the latest chunks') then freezes one
        # slot too many for the next chunk; any other mismatch is an off-by-one in what is frozen (one too few
        # leaves no match at all, one too many shows up without a late chunk before it)
        slots = result.prefix_slots
        assert len(slots) == result.counts["chunks"] - 1
        assert any(sent == actual for sent, actual in slots), slots
        for i, (sent, actual) in enumerate(slots):
            after_a_late_chunk = any(a > s for s, a in slots[max(i - 2, 0):i])
            assert sent <= actual or after_a_late_chunk, slots
    else:
        assert result.prefix_slots == []


def test_robot_is_stopped_when_the_episode_raises(robot):
    class FailingTeleop(Teleoperator):
        calls, is_intervening = 0, False

        def connect(self):
            pass

        def disconnect(self):
            pass

        def get_action(self):
            self.calls += 1
            if self.calls == 10:
                raise RuntimeError("teleoperator unplugged")
            return None

    backend = LocalInference(small_policy("mlp"))
    node = ControlNode(robot, backend, ControlConfig(control_hz=20, max_episode_s=5), teleop=FailingTeleop())
    try:
        with pytest.raises(RuntimeError, match="unplugged"):
            node.run_episode(seed=0)
    finally:
        node.close()
    assert wait_until(lambda: robot.status["stopped"], 1.0)


def test_estop_ends_the_episode_and_stops_the_robot(robot):
    backend = LocalInference(small_policy("mlp"))
    node = ControlNode(robot, backend, ControlConfig(control_hz=20, max_episode_s=10))
    timer = threading.Timer(0.5, node.watchdog.trigger_estop, args=("operator button",))
    timer.start()
    try:
        result = node.run_episode(seed=0)
    finally:
        node.close()
    assert result.aborted == "operator button" and result.duration_s < 2.0
    assert wait_until(lambda: robot.status["stopped"], 1.0)


def test_policy_that_does_not_fit_the_robot_is_refused(robot):
    features = {"observation.state": {"dtype": "float32", "shape": [5], "names": None}, **{"action": FEATURES["action"]}}

    class Wrong:
        n_obs_steps, horizon, n_action_steps, fps, supports_prefix, noise_shape = 1, 4, 2, 10, False, (4, 4)

        def infer(self, *args):
            raise AssertionError("never called")

        def close(self):
            pass

    backend = Wrong()
    backend.features = features
    with pytest.raises(ControlNodeError, match=r"does not fit the robot .*observation.state has shape \[28\] where \[5\]"):
        ControlNode(robot, backend)


class LoggedInference(RemoteInference):
    """Remote inference that keeps every request's (t_obs, observation history, noise, chunk)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = []

    def infer(self, observation, timestamp, prefix_actions, noise=None):
        chunk, info = super().infer(observation, timestamp, prefix_actions, noise)
        self.log.append((timestamp, observation["observation.state"].copy(), noise.copy(), chunk.copy()))
        return chunk, info


def deploy_once(robot, server, tmp_path, seed: int):
    backend = LoggedInference(server.address)
    recorder = EpisodeRecorder(tmp_path / f"store_{seed}_{len(list(tmp_path.iterdir()))}", robot.observation_features,
                               robot.action_features["action"], 20)
    node = ControlNode(robot, backend, ControlConfig(control_hz=20, mode="sync", max_episode_s=2.5), recorder=recorder)
    try:
        node.run_episode(seed=seed)
    finally:
        node.close()
        backend.close()
        recorder.close()
    with DemoStore.open(recorder.path) as store:
        return store.get_episode(0), backend.log


def test_deploy_with_the_same_seed_twice_gives_the_same_chunks_and_actions(robot, tmp_path):
    """Each chunk's noise is drawn from a generator seeded by the episode seed, and the policy is deterministic
    given it, so the same seed gives the same chunk for the same observation history, through the server.

    What holds for the recorded actions: in sync mode the simulated arm samples commands phase-locked to the node
    and publishes tick-synchronous frames, so the same seed replays the same observations and hence the same
    actions (measured: all 61 ticks of a 3 s episode within 1e-6). Timing can still break that on a loaded
    machine (a frame published more than ~15 ms late, or a chunk more than ~45 ms late, shifts the episode by
    one servo tick), so the guarantee checked here is: the same noise sequence, the same chunk wherever the
    observation history was the same, and the same recorded actions up to the first request whose observation
    timing differed (all of them when none did)."""
    with PolicyServer(small_policy("flow", num_inference_steps=2)) as server:
        (first, log_a), (second, log_b) = (deploy_once(robot, server, tmp_path, seed=11) for _ in range(2))
        other, log_c = deploy_once(robot, server, tmp_path, seed=12)
    n = min(len(log_a), len(log_b))
    assert n >= 3
    for (_, _, noise_a, _), (_, _, noise_b, _) in zip(log_a, log_b):
        np.testing.assert_array_equal(noise_a, noise_b)
    same_obs = [np.array_equal(log_a[i][1], log_b[i][1]) for i in range(n)]
    assert same_obs[0]  # the reset frame: the seeded task's initial state
    for i in range(n):
        if same_obs[i]:
            np.testing.assert_allclose(log_a[i][3], log_b[i][3], atol=1e-5)
    # the recorded actions, up to the first tick that used a chunk from a diverging observation
    diverged = same_obs.index(False) if False in same_obs else None

    def ticks_before_divergence(episode, log) -> int:
        if diverged is None:
            return len(episode["action"])
        in_use = episode["timing.chunk_obs_timestamp"][:, 0]
        return int(np.argmax(in_use == log[diverged][0])) if (in_use == log[diverged][0]).any() else len(in_use)

    k = min(ticks_before_divergence(first, log_a), ticks_before_divergence(second, log_b))
    assert k >= 10 or diverged is not None
    np.testing.assert_allclose(first["action"][:k], second["action"][:k], atol=1e-5)
    # another seed: other noise, another first chunk for the same reset frame
    assert not np.allclose(log_c[0][2], log_a[0][2]) and not np.allclose(log_c[0][3], log_a[0][3], atol=1e-3)
