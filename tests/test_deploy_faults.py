"""Faults during deployment: a real policy server that misbehaves on demand, killed, stalled or cut off, and stale
observations. In every case the commands stay within the limits, the robot holds as soon as actions stop, the node
recovers once the fault is over, and the recorded episode is a valid store."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch

from real.host.deploy import ServerProcess
from real.host.server import PolicyServer
from real.robot.control_node import ControlConfig, ControlNode, RemoteInference
from real.robot.recording import EpisodeRecorder
from real.robot.sim_robot import SimRobot
from robopolicy.checkpoint import save_checkpoint
from robopolicy.data import DemoStore, validate_store
from robopolicy.loading import load_policy
from robopolicy.policies import make_policy
from robopolicy.policies.base import ChunkPolicy

FAULT_START, FAULT_LEN, EPISODE_S = 0.8, 1.0, 3.2


class FaultyPolicy(ChunkPolicy):
    """A real (small) chunk policy whose forward misbehaves while `fault` is set."""

    # a short horizon: rtc keeps executing a chunk's tail when the next is late, and that tail must run out
    n_obs_steps, horizon, n_action_steps, action_dim = 2, 8, 4, 4
    features = {
        "observation.state": {"dtype": "float32", "shape": [28], "names": None},
        "action": {"dtype": "float32", "shape": [4], "names": None},
    }

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(2 * 28, 8 * 4)
        self.fault: str | None = None

    def sample_chunk(self, obs, noise=None, prefix_actions=None):
        state = obs["observation.state"].flatten(1)  # [B, To * D]
        chunk = 0.5 * torch.tanh(self.head(state)).view(-1, 8, 4)  # [B, H, A]
        if self.fault == "nan":
            return torch.full_like(chunk, float("nan"))
        if self.fault == "wrong_shape":
            return chunk[:, :, :3]
        if self.fault == "out_of_range":
            return chunk * 50.0
        if self.fault == "stall":
            time.sleep(0.5)
        return chunk


@pytest.fixture(scope="module")
def robot():
    with SimRobot("builtin/pick_place", control_hz=20, sensor_latency_s=0.01) as robot:
        yield robot


def run_with_fault(robot, backend, tmp_path, inject, clear):
    """One episode; `inject()` at FAULT_START, `clear()` FAULT_LEN later. Returns (result, episode frames)."""
    recorder = EpisodeRecorder(tmp_path / "store", robot.observation_features, robot.action_features["action"], 20)
    node = ControlNode(robot, backend, ControlConfig(control_hz=20, mode="rtc", max_episode_s=EPISODE_S,
                                                     hold_after=2, stop_after=8), recorder=recorder, task="pick")
    timers = [threading.Timer(FAULT_START, inject), threading.Timer(FAULT_START + FAULT_LEN, clear)]
    for timer in timers:
        timer.start()
    try:
        result = node.run_episode(seed=7)
    finally:
        for timer in timers:
            timer.join()
        node.close()
        recorder.close()
    assert validate_store(tmp_path / "store") == []
    with DemoStore.open(tmp_path / "store") as store:
        return result, store.get_episode(0)


def check_safe_hold_and_recovery(robot, result, episode, must_hold: bool = True):
    actions = episode["action"]
    limits = robot.limits
    assert (np.abs(actions) <= 1.0 + 1e-6).all()
    steps = np.abs(np.diff(np.vstack([robot.command_state(), actions]), axis=0))
    assert (steps <= limits.max_step + 1e-5).all()
    # whenever the watchdog saw no fresh action, the command sent that same period was the hold command
    holding = episode["status.watchdog"][:, 0] > 0
    assert holding.any() or not must_hold, "the fault was never noticed"
    np.testing.assert_array_equal(actions[holding, :3], 0.0)
    # recovery: fresh chunks from observations taken after the fault, executed (watchdog OK) at the end
    start = episode["timing.command_time"][0, 0]
    after = episode["timing.chunk_obs_timestamp"][:, 0] > start + FAULT_START + FAULT_LEN
    assert after.any(), "no chunk after the fault"
    # the robot held still, so the first chunk back waits for the next action slot (at most 2 ticks at 20 Hz)
    assert (episode["status.watchdog"][after, 0][2:] == 0).all()
    assert (episode["status.watchdog"][-5:, 0] == 0).all()


@pytest.mark.parametrize("fault", ["nan", "wrong_shape", "stall"])
def test_misbehaving_policy(robot, tmp_path, fault):
    policy = FaultyPolicy()
    with PolicyServer(policy) as server:
        backend = RemoteInference(server.address, timeout_s=1.0)
        result, episode = run_with_fault(robot, backend, tmp_path, lambda: setattr(policy, "fault", fault),
                                         lambda: setattr(policy, "fault", None))
        backend.close()
    if fault == "stall":
        assert max(result.inference_latency_s) >= 0.5
    else:
        assert result.counts["chunk_errors"] > 0
    check_safe_hold_and_recovery(robot, result, episode)


def test_out_of_range_chunks_are_clamped_to_the_limits(robot, tmp_path):
    policy = FaultyPolicy()
    with PolicyServer(policy) as server:
        backend = RemoteInference(server.address)
        result, episode = run_with_fault(robot, backend, tmp_path, lambda: setattr(policy, "fault", "out_of_range"),
                                         lambda: setattr(policy, "fault", None))
        backend.close()
    assert result.counts["clamped_ticks"] > 0
    requested = episode["action.requested"]
    assert np.abs(requested).max() > 1.5  # the policy asked for far too much...
    assert np.abs(episode["action"]).max() <= 1.0 + 1e-6  # ...and the robot never got it
    flags = episode["safety.flags"][:, 0]
    assert (flags[np.abs(requested).max(axis=1) > 1.0 + 1e-6] & 2).all()  # position_limit flagged per frame


def test_connection_dropped(robot, tmp_path):
    policy = FaultyPolicy()
    server = PolicyServer(policy).start()
    port = server.address[1]
    servers = [server]

    def restart():
        servers.append(PolicyServer(policy, port=port).start())

    backend = RemoteInference(server.address, timeout_s=0.5)
    try:
        result, episode = run_with_fault(robot, backend, tmp_path, servers[0].shutdown, restart)
    finally:
        backend.close()
        for s in servers:
            s.shutdown()
    check_safe_hold_and_recovery(robot, result, episode)


def test_policy_server_process_killed_and_restarted(robot, tmp_path):
    cfg = {"name": "mlp", "horizon": 8, "n_obs_steps": 2, "n_action_steps": 4, "hidden_dims": [32]}
    save_checkpoint(tmp_path / "ckpt", make_policy(cfg, FaultyPolicy.features), config={"policy": cfg})
    with socket.socket() as probe:  # a free port the restarted server can take again
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = ServerProcess(tmp_path / "ckpt", port=port, token="secret")
    # the server comes back in this process (a fresh process takes seconds to import torch on a busy machine)
    replacement = load_policy(tmp_path / "ckpt")
    servers = []

    def kill():
        os.kill(process.proc.pid, signal.SIGKILL)

    def restart():
        servers.append(PolicyServer(replacement, port=port, token="secret").start())

    backend = RemoteInference(process.address, token="secret", timeout_s=0.5)
    try:
        result, episode = run_with_fault(robot, backend, tmp_path, kill, restart)
    finally:
        backend.close()
        process.close()
        for server in servers:
            server.shutdown()
    # a second without a server: the watchdog stops the robot, and the node resumes by itself afterwards
    assert result.counts["stops"] >= 1 and result.counts["chunk_errors"] > 0
    check_safe_hold_and_recovery(robot, result, episode)


def test_stale_observations_are_not_sent_to_the_policy(robot, tmp_path):
    policy = FaultyPolicy()
    with PolicyServer(policy) as server:
        backend = RemoteInference(server.address)
        result, episode = run_with_fault(robot, backend, tmp_path, lambda: robot.inject_fault("stale", FAULT_LEN),
                                         lambda: None)
        backend.close()
    assert result.counts["stale_ticks"] > 0
    fresh = episode["status.obs_fresh"][:, 0]
    assert not fresh.all()
    check_safe_hold_and_recovery(robot, result, episode)


def test_sensor_nan_is_not_sent_to_the_policy(robot, tmp_path):
    policy = FaultyPolicy()
    with PolicyServer(policy) as server:
        backend = RemoteInference(server.address)
        result, episode = run_with_fault(robot, backend, tmp_path, lambda: robot.inject_fault("nan", FAULT_LEN),
                                         lambda: None)
        backend.close()
    assert result.counts["invalid_obs"] > 0
    assert np.isfinite(episode["observation.state"]).all()  # the recording keeps the last valid frame
    check_safe_hold_and_recovery(robot, result, episode)
