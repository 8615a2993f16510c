"""Watchdog: hold the robot when fresh actions stop arriving, stop it when they stay away, and latch e-stops.

The control loop calls `action_received()` whenever a fresh, valid action arrives and asks `state()` every
period: OK, HOLD (no fresh action for `hold_after` periods), STOP (none for `stop_after` periods, or the
emergency-stop latch is set). The latch is set by a signal (SIGINT/SIGTERM by default), a key press or a
message (`EStopListener`, a UDP datagram), and only `reset()` clears it: a stop must never undo itself.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum

from real.robot.protocol import (
    EStop,
    ProtocolError,
    check_bind_allowed,
    decode_message,
    encode_message,
    token_matches,
)


class WatchdogState(str, Enum):
    OK = "ok"
    HOLD = "hold"
    STOP = "stop"


class Watchdog:
    def __init__(
        self,
        period_s: float,
        hold_after: int = 3,
        stop_after: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"Watchdog period_s must be positive, got {period_s!r}.")
        if not 0 < hold_after <= stop_after:
            raise ValueError(
                f"Watchdog needs 0 < hold_after <= stop_after, got {hold_after} and {stop_after}."
            )
        self.period_s = float(period_s)
        self.hold_after = int(hold_after)
        self.stop_after = int(stop_after)
        self._clock = clock
        # Re-entrant: a signal handler runs in the main thread and may interrupt it while it holds the lock.
        self._lock = threading.RLock()
        self._last_action = clock()
        self._estop_reason: str | None = None

    @property
    def estopped(self) -> bool:
        return self._estop_reason is not None

    @property
    def estop_reason(self) -> str | None:
        return self._estop_reason

    def action_received(self, now: float | None = None) -> None:
        """Mark a fresh, valid action (call it only after the action passed validation)."""
        with self._lock:
            self._last_action = self._clock() if now is None else now

    def state(self, now: float | None = None) -> WatchdogState:
        if self._estop_reason is not None:
            return WatchdogState.STOP
        now = self._clock() if now is None else now
        periods = (now - self._last_action) / self.period_s
        if periods >= self.stop_after:
            return WatchdogState.STOP
        if periods >= self.hold_after:
            return WatchdogState.HOLD
        return WatchdogState.OK

    def trigger_estop(self, reason: str) -> None:
        """Latch the emergency stop; the first reason is kept (later ones do not overwrite it)."""
        with self._lock:
            if self._estop_reason is None:
                self._estop_reason = reason

    def reset(self, now: float | None = None) -> None:
        """Clear the e-stop latch and restart the action timer (an explicit operator decision)."""
        with self._lock:
            self._estop_reason = None
            self._last_action = self._clock() if now is None else now

    @contextmanager
    def signal_estop(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
        """Within the block, the given signals latch the e-stop instead of killing the process.

        The previous handlers are restored on exit. Signal handlers can only be set from the main thread.
        """
        signals = list(signals)
        previous = {sig: signal.getsignal(sig) for sig in signals}

        def handler(signum: int, _frame: object) -> None:
            self.trigger_estop(f"signal {signal.Signals(signum).name}")

        try:
            for sig in signals:
                signal.signal(sig, handler)
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class EStopListener:
    """Latch a watchdog's e-stop when an authenticated `estop` message arrives over UDP.

    UDP because an e-stop button or an operator laptop must reach the robot without a session: one
    datagram, no connection to set up or lose. Messages use `real.robot.protocol` (version, token, no pickle);
    anything else is ignored. Use as a context manager; `address` is the bound (host, port).
    """

    def __init__(
        self, watchdog: Watchdog, host: str = "127.0.0.1", port: int = 0, token: str | None = None
    ) -> None:
        check_bind_allowed(host, token)
        self.watchdog = watchdog
        self.token = token
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.settimeout(0.1)
        self.address: tuple[str, int] = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="estop-listener", daemon=True)

    def start(self) -> EStopListener:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sock.close()

    def __enter__(self) -> EStopListener:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                message = decode_message(data)
            except ProtocolError:
                continue
            if isinstance(message, EStop) and token_matches(self.token, message.token):
                self.watchdog.trigger_estop(f"message from {sender[0]}:{sender[1]}: {message.reason}")


def send_estop(address: tuple[str, int], reason: str, token: str | None = None) -> None:
    """Send one e-stop datagram to an `EStopListener` (from an operator tool or a test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(encode_message(EStop(reason=reason, token=token)), address)
