"""Policy server and client over real loopback sockets, with a small real torch policy."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from real.host.server import PolicyServer
from real.robot.client import (
    PolicyClient,
    PolicyClientError,
    PolicyConnectionError,
    PolicyServerError,
    PolicyTimeoutError,
)
from real.robot.protocol import Error, Hello, HelloReply, decode_message, encode_message, frame, recv_frame
from robopolicy.policies.base import ChunkPolicy

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


class LinearChunkPolicy(ChunkPolicy):
    """A real (tiny) policy with the runtime interface: a linear map from the last state to a chunk."""

    n_obs_steps = 2
    horizon = 8
    n_action_steps = 4
    action_dim = 2
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [2], "names": None},
    }

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(3, self.horizon * 2)
        self.delay_s = delay_s

    def sample_chunk(self, obs: dict[str, torch.Tensor], noise: torch.Tensor | None = None,
                     prefix_actions: torch.Tensor | None = None) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        state = obs["observation.state"][:, -1]  # [B, To, D] -> [B, D]
        if not torch.isfinite(state).all():
            raise ValueError("state contains NaN or inf")
        chunk = self.head(state).view(-1, self.horizon, 2)  # [B, H, A]
        return chunk if noise is None else chunk + noise


def observation(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"observation.state": rng.standard_normal((2, 3)).astype(np.float32)}


def expected_chunk(policy: LinearChunkPolicy, obs: dict[str, np.ndarray], noise=None) -> np.ndarray:
    with torch.no_grad():
        batch = {k: torch.from_numpy(v)[None] for k, v in obs.items()}
        noise = None if noise is None else torch.from_numpy(noise)[None]
        return policy.sample_chunk(batch, noise)[0].numpy()


@pytest.fixture
def server():
    with PolicyServer(LinearChunkPolicy(), fps=10) as server:
        yield server


def test_round_trip_hello_and_infer(server):
    with PolicyClient(server.address, timeout_s=5.0) as client:
        meta = client.hello()
        assert meta.features == LinearChunkPolicy.features
        assert (meta.n_obs_steps, meta.horizon, meta.n_action_steps, meta.fps) == (2, 8, 4, 10.0)
        assert meta.noise_shape == [8, 2] and meta.supports_prefix is False
        policy = server.policy
        for seed in range(3):
            obs = observation(seed)
            chunk, info = client.infer(obs, timestamp=time.monotonic())
            assert chunk.shape == (8, 2) and chunk.dtype == np.float32
            np.testing.assert_allclose(chunk, expected_chunk(policy, obs), rtol=1e-6)
            assert info["inference_s"] > 0 and info["round_trip_s"] >= info["inference_s"]
        noise = np.random.default_rng(9).standard_normal((8, 2)).astype(np.float32)
        chunk, _ = client.infer(observation(), 0.0, noise=noise)
        np.testing.assert_allclose(chunk, expected_chunk(policy, observation(), noise), rtol=1e-6)
        # float64 states are cast; bad requests get a clear error and leave the connection usable
        chunk64, _ = client.infer({"observation.state": observation()["observation.state"].astype(np.float64)}, 0.0)
        np.testing.assert_allclose(chunk64, expected_chunk(policy, observation()), rtol=1e-6)
        bad_requests = [
            ({"observation.state": np.zeros((1, 3), np.float32)}, {}, "schema", r"expects \[2, 3\]"),
            ({"observation.wrist": np.zeros((2, 3), np.float32)}, {}, "schema", "missing"),
            ({"observation.state": np.zeros((2, 3), np.uint8)[:0]}, {}, "schema", "shape"),
            ({"observation.state": np.full((2, 3), np.nan, np.float32)}, {}, "inference", "NaN"),
            (observation(), {"noise": np.zeros((4, 2))}, "schema", "noise"),
            (observation(), {"prefix_actions": np.zeros((2, 2))}, "unsupported", "prefix_actions"),
        ]
        for obs, kwargs, code, match in bad_requests:
            with pytest.raises(PolicyServerError, match=match) as info:
                client.infer(obs, 0.0, **kwargs)
            assert info.value.code == code
        assert client.infer(observation(), 0.0)[0].shape == (8, 2)
        # a robot observation dict also carries "timestamp"; only observation.* keys travel
        assert client.infer({**observation(), "timestamp": 1.0}, 0.0)[0].shape == (8, 2)


def test_many_concurrent_clients(server):
    errors, results = [], []

    def worker(seed: int) -> None:
        try:
            with PolicyClient(server.address, timeout_s=10.0) as client:
                for i in range(10):
                    obs = observation(seed * 100 + i)
                    results.append((obs, client.infer(obs, 0.0)[0]))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 60
    for obs, chunk in results:
        np.testing.assert_allclose(chunk, expected_chunk(server.policy, obs), rtol=1e-6)


def test_token_is_required_and_checked():
    with PolicyServer(LinearChunkPolicy(), token="s3cret") as server:
        for token in (None, "wrong", "s3cret" + "x"):
            with PolicyClient(server.address, token=token, timeout_s=5.0) as client:
                with pytest.raises(PolicyServerError, match="token") as info:
                    client.hello()
                assert info.value.code == "auth"
                with pytest.raises(PolicyServerError, match="token"):
                    client.infer(observation(), 0.0)
        with PolicyClient(server.address, token="s3cret", timeout_s=5.0) as client:
            assert client.hello().horizon == 8
            assert client.infer(observation(), 0.0)[0].shape == (8, 2)


def test_refuses_public_interface_without_token():
    with pytest.raises(ValueError, match="without a token"):
        PolicyServer(LinearChunkPolicy(), host="0.0.0.0")


def test_stalled_server_honours_client_timeout():
    with PolicyServer(LinearChunkPolicy(delay_s=0.5)) as server:
        client = PolicyClient(server.address, timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(PolicyTimeoutError, match="within 0.2 s"):
            client.infer(observation(), 0.0)
        elapsed = time.monotonic() - started
        assert 0.2 <= elapsed < 0.5  # returned before the stalled reply could have arrived
        client.timeout_s = 3.0  # the same client recovers on a fresh connection
        chunk, info = client.infer(observation(), 0.0)
        assert info["inference_s"] >= 0.5
        np.testing.assert_allclose(chunk, expected_chunk(server.policy, observation()), rtol=1e-6)
        client.close()


def test_unreachable_server_fails_clearly():
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with PolicyClient(f"127.0.0.1:{port}", timeout_s=0.5) as client:
        with pytest.raises(PolicyConnectionError, match="Cannot reach policy server"):
            client.hello()


SERVER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from test_server_client import LinearChunkPolicy
from real.host.server import PolicyServer

server = PolicyServer(LinearChunkPolicy(), port=int(sys.argv[1]))
print(server.address[1], flush=True)
server.serve_forever()
"""


def start_server_process(port: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(port), str(TESTS_DIR)],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready:
        proc.kill()
        raise RuntimeError("server process did not start within 60 s")
    return proc, int(proc.stdout.readline())


def test_client_fails_clearly_when_server_is_killed_and_recovers_after_restart():
    proc, port = start_server_process(0)
    try:
        client = PolicyClient(("127.0.0.1", port), timeout_s=1.0)
        assert client.hello().horizon == 8
        first, _ = client.infer(observation(), 0.0)

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(PolicyConnectionError):
            client.infer(observation(), 0.0)
        assert time.monotonic() - started < 1.0

        proc, restarted_port = start_server_process(port)  # same port
        assert restarted_port == port
        again, _ = client.infer(observation(), 0.0)  # the next call after the restart succeeds
        np.testing.assert_array_equal(first, again)
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_restart_while_client_idle_is_transparent():
    proc, port = start_server_process(0)
    try:
        client = PolicyClient(("127.0.0.1", port), timeout_s=2.0)
        client.hello()
        proc.kill()
        proc.wait(timeout=10)
        proc, _ = start_server_process(port)
        assert client.infer(observation(), 0.0)[0].shape == (8, 2)  # stale connection replaced silently
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def raw_exchange(address, data: bytes, timeout: float = 5.0) -> list:
    """Send raw bytes, then read framed replies until the server closes or goes quiet."""
    replies = []
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + 0.5
        while True:
            try:
                payload = recv_frame(sock, deadline=deadline)
            except (TimeoutError, ConnectionError):
                break
            if payload is None:
                break
            replies.append(decode_message(payload))
    return replies


def test_garbage_and_oversized_messages_do_not_hurt_the_server(server):
    rng = np.random.default_rng(0)
    good = PolicyClient(server.address, timeout_s=5.0)
    # a frame whose body is not msgpack: error reply, connection stays usable for the next frame
    replies = raw_exchange(server.address, frame(rng.bytes(100)) + frame(encode_message(Hello())))
    assert isinstance(replies[0], Error) and replies[0].code == "malformed"
    assert replies[1].horizon == 8
    # a length prefix far above the limit: refused from the header, then the connection is closed
    replies = raw_exchange(server.address, struct.pack("!I", 2**31 - 1) + b"x" * 1000)
    assert [(r.code) for r in replies] == ["too_large"]
    # unframed garbage (an HTTP request) reads as a huge length too
    replies = raw_exchange(server.address, b"GET / HTTP/1.1\r\nHost: robot\r\n\r\n")
    assert [r.code for r in replies] == ["too_large"]
    # a message that is valid msgpack but not ours, an unsupported type, a truncated frame, a silent peer
    replies = raw_exchange(server.address, frame(b"\x93\x01\x02\x03") + frame(encode_message(Error("x", "y"))))
    assert [r.code for r in replies] == ["malformed", "unsupported"]
    raw_exchange(server.address, struct.pack("!I", 500) + b"only part of it")
    for _ in range(20):
        raw_exchange(server.address, rng.bytes(int(rng.integers(1, 64))))
    with socket.create_connection(server.address):
        pass
    # the server is still there for a good client
    obs = observation(3)
    np.testing.assert_allclose(good.infer(obs, 0.0)[0], expected_chunk(server.policy, obs), rtol=1e-6)
    good.close()


def test_oversized_request_from_client_is_refused_before_sending():
    with PolicyServer(LinearChunkPolicy(), max_message_bytes=4096) as server:
        with PolicyClient(server.address, timeout_s=5.0) as client:
            big = {"observation.state": np.zeros((2, 3000), np.float32)}
            with pytest.raises(PolicyClientError, match="above the"):
                client.infer(big, 0.0)
        with PolicyClient(server.address, timeout_s=5.0, max_message_bytes=1 << 20) as client:
            with pytest.raises(PolicyServerError) as info:  # the server refuses it from the length prefix
                client.infer(big, 0.0)
            assert info.value.code == "too_large"
            assert client.infer(observation(), 0.0)[0].shape == (8, 2)


def test_shutdown_closes_connected_clients_promptly():
    server = PolicyServer(LinearChunkPolicy()).start()
    client = PolicyClient(server.address, timeout_s=2.0)
    client.hello()
    started = time.monotonic()
    server.shutdown()
    assert time.monotonic() - started < 2.0
    with pytest.raises(PolicyConnectionError):
        client.infer(observation(), 0.0)
    client.close()


def test_a_version_1_client_is_answered_in_version_1(server):
    """Protocol 2 added `HelloReply.supports_prefix`; a robot on the previous release still gets a reply it reads."""
    import msgpack

    with socket.create_connection(server.address, timeout=5.0) as sock:
        sock.sendall(frame(msgpack.packb({"v": 1, "type": "hello"})))
        body = msgpack.unpackb(recv_frame(sock, deadline=time.monotonic() + 5.0))
    assert body["v"] == 1 and body["type"] == "hello_reply" and "supports_prefix" not in body
    assert isinstance(decode_message(encode_message(HelloReply({}, 1, 1, 1, supports_prefix=True), version=1)),
                      HelloReply)
