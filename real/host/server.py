"""Policy server: runs a policy's `sample_chunk` for remote robots over `real.robot.protocol` (workstation side).

Transport: plain TCP with 4-byte length-prefixed frames, one thread per connection. Chosen over pyzmq
because the length prefix lets the server refuse an oversized message from its header before reading it,
a dead peer is just a closed socket (no REQ/REP state machine to wedge), and a robot computer needs only
the standard library for it. Inference is serialized by one lock: one model, one device.

The policy is a `robopolicy.policies.base.ChunkPolicy`: `sample_chunk(obs, noise=None, prefix_actions=None)`, its
shape (`n_obs_steps`, `horizon`, `n_action_steps`, `features`, `noise_shape`) and its declared `supports_prefix`,
all sent in the hello reply. A request's `noise` (drawn by the robot from its episode seed) is passed on as
`noise=`, so a deployed chunk is a function of the observation, the noise and the prefix, as in evaluation. A
policy that declares `language` gets the request's `instruction` as `obs["task"]`; a request without one is refused.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any

import numpy as np

from real.robot.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Error,
    Hello,
    HelloReply,
    Infer,
    InferReply,
    Message,
    ProtocolError,
    check_bind_allowed,
    decode_versioned,
    encode_message,
    frame,
    recv_frame,
    token_matches,
)

log = logging.getLogger(__name__)


def policy_metadata(policy: Any, fps: float | None = None) -> HelloReply:
    """The `hello` reply for a policy (a ChunkPolicy); raises TypeError for anything else."""
    from robopolicy.policies.base import ChunkPolicy

    if not isinstance(policy, ChunkPolicy):
        raise TypeError(f"{type(policy).__name__} cannot be served: a policy is a robopolicy ChunkPolicy.")
    features = {
        key: {
            "dtype": str(spec["dtype"]),
            "shape": [int(d) for d in spec["shape"]],
            "names": spec.get("names"),
        }
        for key, spec in policy.features.items()
    }
    if "action" not in features or len(features["action"]["shape"]) != 1:
        raise TypeError(f"{type(policy).__name__}.features needs an 'action' feature of shape [A].")
    return HelloReply(
        features=features,
        n_obs_steps=int(policy.n_obs_steps),
        horizon=int(policy.horizon),
        n_action_steps=int(policy.n_action_steps),
        fps=None if fps is None else float(fps),
        noise_shape=[int(d) for d in policy.noise_shape],
        supports_prefix=bool(policy.supports_prefix),
        language=bool(policy.language),
        delay_aware=bool(policy.delay_aware),
    )


class PolicyServer:
    """Serve `policy` on host:port (port 0 picks a free one; see `address`).

    Binding anything but loopback requires `token`; when a token is set every request must carry it.
    Use `serve_forever()` in the foreground, or `start()` / `shutdown()` (or a `with` block) in a thread.
    """

    def __init__(
        self,
        policy: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        fps: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_clients: int = 32,
        frame_timeout_s: float = 10.0,
    ) -> None:
        check_bind_allowed(host, token)
        self.policy = policy
        self.token = token
        self.metadata = policy_metadata(policy, fps)
        self.max_message_bytes = max_message_bytes
        self.max_clients = max_clients
        # a message once started must arrive whole within this, so slow senders cannot hold a thread forever
        self.frame_timeout_s = frame_timeout_s
        self._obs_specs = {k: v for k, v in self.metadata.features.items() if k.startswith("observation.")}
        self._infer_lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((host, port), backlog=64)
        self._listener.settimeout(0.1)  # lets the accept loop notice shutdown
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._serve_thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------- lifecycle

    def serve_forever(self) -> None:
        """Accept and serve clients until `shutdown()` is called."""
        log.info("policy server listening on %s:%d", *self.address)
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            with self._conns_lock:
                busy = len(self._conns) >= self.max_clients
                if not busy:
                    self._conns.add(conn)
            if busy:
                self._reply_and_close(
                    conn, Error("busy", f"Server already serves {self.max_clients} clients.")
                )
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def start(self) -> PolicyServer:
        """Serve in a background thread; returns self."""
        self._serve_thread = threading.Thread(target=self.serve_forever, name="policy-server", daemon=True)
        self._serve_thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, close every connection, wait for the handler threads."""
        self._stop.set()
        if self._serve_thread is not None and self._serve_thread is not threading.current_thread():
            self._serve_thread.join()
        self._listener.close()
        with self._conns_lock:
            for conn in self._conns:
                _close(conn)
        for thread in self._threads:
            thread.join(timeout=5.0)

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------------------------------- connection

    def _serve_connection(self, conn: socket.socket, peer: tuple) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(conn, selectors.EVENT_READ)
            while not self._stop.is_set():
                # Idle clients may wait indefinitely between requests; poll so shutdown is noticed.
                if not selector.select(timeout=0.1):
                    continue
                try:
                    payload = recv_frame(
                        conn, self.max_message_bytes, time.monotonic() + self.frame_timeout_s
                    )
                except ProtocolError as exc:  # oversized or empty frame: the stream cannot be resynced
                    self._reply_and_close(conn, Error(exc.code, str(exc)), drain_s=1.0)
                    return
                if payload is None:
                    return
                reply, version = self._handle(payload)
                try:
                    encoded = encode_message(reply, self.max_message_bytes, version)
                except ProtocolError as exc:  # e.g. a policy returning a chunk above the size limit
                    encoded = encode_message(Error(exc.code, str(exc), reply.request_id), version=version)
                conn.settimeout(self.frame_timeout_s)
                conn.sendall(frame(encoded))
        except (OSError, ValueError) as exc:  # peer gone, timed out mid-message, or socket closed by shutdown
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            selector.close()
            with self._conns_lock:
                self._conns.discard(conn)
            _close(conn)

    def _handle(self, payload: bytes) -> tuple[Message, int]:
        """The reply to one request, and the protocol version to write it in (the request's)."""
        try:
            message, version = decode_versioned(payload, self.max_message_bytes)
        except ProtocolError as exc:
            return Error(exc.code, str(exc)), PROTOCOL_VERSION
        if not isinstance(message, Hello | Infer):
            return Error(
                "unsupported", f"The policy server answers hello and infer, not {type(message).__name__}."
            ), version
        request_id = message.request_id if isinstance(message, Infer) else None
        if not token_matches(self.token, message.token):
            return Error("auth", "Missing or wrong token; pass the server's token to the client.", request_id), version
        if isinstance(message, Hello):
            return self.metadata, version
        try:
            return self._infer(message), version
        except ProtocolError as exc:
            return Error(exc.code, str(exc), request_id), version
        except Exception as exc:  # a policy failure must not take the server down
            log.exception("inference failed")
            return Error("inference", f"Policy raised {type(exc).__name__}: {exc}", request_id), version

    def _reply_and_close(self, conn: socket.socket, error: Error, drain_s: float = 0.0) -> None:
        """Send a last error and close. Draining what the peer is still sending first (bounded in time)
        avoids a TCP reset that could destroy the error reply before the peer reads it."""
        try:
            conn.settimeout(1.0)
            conn.sendall(frame(encode_message(error)))
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + drain_s
            while (remaining := deadline - time.monotonic()) > 0:
                conn.settimeout(remaining)
                if not conn.recv(1 << 16):
                    break
        except OSError:
            pass
        finally:
            _close(conn)

    # ---------------------------------------------------------------------------------------- inference

    def _infer(self, message: Infer) -> InferReply:
        import torch

        observation = self._check_observation(message.observation)
        noise = None
        if message.noise is not None:
            noise = self._check_array("noise", message.noise, self.metadata.noise_shape, "float32")
        prefix = None
        if message.prefix_actions is not None:
            if not self.metadata.supports_prefix:
                raise ProtocolError(
                    "This policy does not support prefix_actions (supports_prefix is false); send none.",
                    "unsupported",
                )
            n_action = self.metadata.features["action"]["shape"][0]
            if message.prefix_actions.ndim != 2 or message.prefix_actions.shape[1] != n_action:
                raise ProtocolError(f"prefix_actions must have shape [k, {n_action}].", "schema")
            prefix = message.prefix_actions.astype(np.float32)
        if self.metadata.language and not message.instruction:
            raise ProtocolError("This policy is language-conditioned: send an instruction with every infer request "
                                "(deploy instruction=\"...\").", "schema")

        queued = time.perf_counter()
        with self._infer_lock, torch.inference_mode():
            started = time.perf_counter()
            device = _policy_device(self.policy)
            # wire arrays are one robot's history [To, ...]; the policy takes a batch [B=1, To, ...]
            obs = {k: torch.from_numpy(v).unsqueeze(0).to(device) for k, v in observation.items()}
            noise, prefix = (None if a is None else torch.from_numpy(a).unsqueeze(0).to(device) for a in (noise, prefix))
            if self.metadata.language:
                obs["task"] = [message.instruction]
            chunk = self.policy.sample_chunk(obs, noise=noise, prefix_actions=prefix)
            chunk = chunk.detach().to("cpu", torch.float32).numpy()[0]  # [H, A]
            finished = time.perf_counter()
        expected = (self.metadata.horizon, self.metadata.features["action"]["shape"][0])
        if chunk.shape != expected:
            raise RuntimeError(
                f"sample_chunk returned shape {chunk.shape[:]} per sample, expected {expected}."
            )
        timing = {"queue_s": started - queued, "inference_s": finished - started}
        return InferReply(message.request_id, chunk, timing)

    def _check_observation(self, observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(set(self._obs_specs) - set(observation))
        extra = sorted(set(observation) - set(self._obs_specs))
        if missing or extra:
            raise ProtocolError(
                f"Observation keys do not match the policy: missing {missing}, unexpected {extra}.", "schema"
            )
        return {
            key: self._check_array(
                key, observation[key], [self.metadata.n_obs_steps, *spec["shape"]], spec["dtype"]
            )
            for key, spec in self._obs_specs.items()
        }

    @staticmethod
    def _check_array(name: str, value: np.ndarray, shape: list[int], dtype: str) -> np.ndarray:
        if list(value.shape) != list(shape):
            raise ProtocolError(
                f"{name} has shape {list(value.shape)}, the policy expects {list(shape)}.", "schema"
            )
        if not np.can_cast(value.dtype, dtype, casting="same_kind"):
            raise ProtocolError(f"{name} has dtype {value.dtype}, the policy expects {dtype}.", "schema")
        return np.ascontiguousarray(value, dtype=dtype)


def _policy_device(policy: Any) -> Any:
    """The device of the policy's first parameter (CPU for a policy without parameters)."""
    import torch

    return next(policy.parameters(), torch.tensor(0)).device


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
