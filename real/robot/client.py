"""Policy client: the robot side of `real.host.server`. Standard library + numpy + msgpack only.

Every call has a deadline (`timeout_s`) and raises `PolicyTimeoutError` past it; it never hangs. After
any transport failure the connection is dropped and the next call reconnects, so a restarted server is
picked up without the caller doing anything.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import numpy as np

from real.robot.protocol import (
    MAX_MESSAGE_BYTES,
    Error,
    Hello,
    HelloReply,
    Infer,
    InferReply,
    Message,
    ProtocolError,
    decode_message,
    encode_message,
    frame,
    recv_frame,
)


class PolicyClientError(Exception):
    """Base class of every error the client raises."""


class PolicyTimeoutError(PolicyClientError, TimeoutError):
    """No reply within the client's timeout."""


class PolicyConnectionError(PolicyClientError, ConnectionError):
    """The server cannot be reached or dropped the connection."""


class PolicyServerError(PolicyClientError):
    """The server answered with an `error` message (bad token, wrong observation, inference failure, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"policy server error [{code}]: {message}")
        self.code = code


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """ "host:port", "tcp://host:port" or (host, port) -> (host, port)."""
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    text = address.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"Policy server address {address!r} must look like 'host:port' (e.g. '127.0.0.1:5555')."
        )
    return host.strip("[]") or "127.0.0.1", int(port)


class PolicyClient:
    def __init__(
        self,
        address: str | tuple[str, int],
        token: str | None = None,
        timeout_s: float = 1.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"PolicyClient timeout_s must be positive, got {timeout_s!r}.")
        self.address = parse_address(address)
        self.token = token
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = max_message_bytes
        self.metadata: HelloReply | None = None
        self._sock: socket.socket | None = None
        self._request_ids = itertools.count(1)

    def hello(self) -> HelloReply:
        """Check version and token; returns (and keeps in `metadata`) the served policy's metadata."""
        reply = self._request(Hello(token=self.token))
        if not isinstance(reply, HelloReply):
            raise PolicyClientError(f"Expected a hello_reply from {self._where}, got {type(reply).__name__}.")
        self.metadata = reply
        return reply

    def infer(
        self,
        observation: dict[str, np.ndarray],
        timestamp: float,
        noise: np.ndarray | None = None,
        prefix_actions: np.ndarray | None = None,
        instruction: str | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """observation: key -> [n_obs_steps, ...] -> (action_chunk [horizon, A], info with server timing).

        Only the `observation.*` keys are sent, so a dict from `Robot.get_observation()` (which also
        holds "timestamp") can be passed as it is once its arrays are stacked over n_obs_steps.
        """
        request_id = next(self._request_ids)
        message = Infer(
            request_id=request_id,
            observation={k: np.asarray(v) for k, v in observation.items() if k.startswith("observation.")},
            timestamp=float(timestamp),
            token=self.token,
            noise=None if noise is None else np.asarray(noise, dtype=np.float32),
            prefix_actions=None if prefix_actions is None else np.asarray(prefix_actions, dtype=np.float32),
            instruction=instruction,
        )
        sent = time.perf_counter()
        reply = self._request(message)
        if not isinstance(reply, InferReply) or reply.request_id != request_id:
            self.close()  # out of step with the server: start over on a fresh connection
            raise PolicyClientError(f"Unexpected reply to infer request {request_id} from {self._where}.")
        info = {"request_id": request_id, "round_trip_s": time.perf_counter() - sent, **reply.timing}
        return reply.action_chunk, info

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _where(self) -> str:
        return f"policy server {self.address[0]}:{self.address[1]}"

    def _request(self, message: Message) -> Message:
        try:
            payload = frame(encode_message(message, self.max_message_bytes))
        except ProtocolError as exc:
            raise PolicyClientError(f"Cannot send request: {exc}") from None
        deadline = time.monotonic() + self.timeout_s
        # A kept connection may be stale (server restarted while we were idle): if it fails before any
        # reply, retry once on a fresh connection. Safe because hello and infer have no side effects.
        for attempt in range(2):
            reused = self._sock is not None
            try:
                sock = self._connect(deadline)
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                sock.sendall(payload)
                reply = recv_frame(sock, self.max_message_bytes, deadline)
                if reply is None:
                    raise ConnectionError("server closed the connection")
                decoded = decode_message(reply, self.max_message_bytes)
            except TimeoutError:
                self.close()  # a late reply would arrive on this connection out of step: drop it
                raise PolicyTimeoutError(
                    f"No reply from {self._where} within {self.timeout_s:.3g} s."
                ) from None
            except OSError as exc:
                self.close()
                if reused and attempt == 0:
                    continue
                raise PolicyConnectionError(
                    f"Cannot reach {self._where} ({exc}); is it running? The next call reconnects."
                ) from None
            except ProtocolError as exc:
                self.close()
                raise PolicyClientError(f"Invalid reply from {self._where}: {exc}") from None
            if isinstance(decoded, Error):
                if decoded.code == "too_large":
                    self.close()  # the server closes the stream after an oversized frame
                raise PolicyServerError(decoded.code, decoded.message)
            return decoded
        raise AssertionError("unreachable")

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock = socket.create_connection(self.address, timeout=remaining)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small request/reply messages
            self._sock = sock
        return self._sock
