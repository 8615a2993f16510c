"""Policy-server wire protocol: versioned msgpack maps with raw array buffers, never pickle.

A message is one msgpack map `{"v": PROTOCOL_VERSION, "type": <name>, ...fields}`; arrays travel as
`{"dtype": str, "shape": [..], "data": bytes}` (little-endian, dtype from a whitelist). On a stream a message
is framed by a 4-byte big-endian length, so an oversized message is refused from its header before any byte
of it is read or decoded. Decoding is strict: every field is type-checked, unknown fields are refused, array
buffers must match dtype x shape exactly. Any failure raises `ProtocolError`, whatever the bytes were.

Messages (client -> server, reply):
  Hello(token)                                  -> HelloReply(policy metadata) | Error
  Infer(request_id, observation, timestamp,
        token, noise?, prefix_actions?,
        instruction?)                           -> InferReply(request_id, action_chunk, timing) | Error
  EStop(reason, token)  (datagram to a `real.robot.watchdog.EStopListener`, no reply)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import socket
import struct
import time
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import numpy as np

# 2: HelloReply.supports_prefix; 3: HelloReply.language and Infer.instruction (language-conditioned policies);
# 4: HelloReply.delay_aware (a policy trained on committed prefixes)
PROTOCOL_VERSION = 4
SUPPORTED_VERSIONS = (1, 2, 3, 4)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Plain numeric dtypes only: no object, string, void or datetime dtypes can ever be built from the wire.
DTYPES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_NDIM = 8
MAX_KEYS = 64
MAX_STR = 4096
_HEADER = struct.Struct("!I")


class ProtocolError(Exception):
    """A message that cannot be accepted; `code` is a short machine-readable reason sent back in `Error`."""

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------- messages


@dataclass
class Hello:
    token: str | None = None


@dataclass
class HelloReply:
    """The served policy's metadata: what to send (features, n_obs_steps) and how to execute the chunk."""

    features: dict[str, dict]
    n_obs_steps: int
    horizon: int
    n_action_steps: int
    fps: float | None = None
    noise_shape: list[int] | None = None
    supports_prefix: bool = False  # sample_chunk keeps committed prefix_actions (real-time chunking); since 2
    language: bool = False  # the policy reads an instruction: every Infer must carry one; since 3
    delay_aware: bool = False  # trained to continue a committed prefix (training-time RTC): run rtc; since 4


@dataclass
class Infer:
    """observation: key -> [n_obs_steps, *feature_shape]; noise: [horizon, A]; prefix_actions: [k, A];
    instruction: the task in words, for a policy whose hello reply declares `language` (since 3)."""

    request_id: int
    observation: dict[str, np.ndarray]
    timestamp: float
    token: str | None = None
    noise: np.ndarray | None = None
    prefix_actions: np.ndarray | None = None
    instruction: str | None = None


@dataclass
class InferReply:
    """action_chunk: [horizon, A] in robot units; timing: server-side seconds (e.g. "inference_s")."""

    request_id: int
    action_chunk: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class Error:
    code: str
    message: str
    request_id: int | None = None


@dataclass
class EStop:
    reason: str
    token: str | None = None


Message = Hello | HelloReply | Infer | InferReply | Error | EStop
_TYPE_NAMES: dict[type, str] = {
    Hello: "hello",
    HelloReply: "hello_reply",
    Infer: "infer",
    InferReply: "infer_reply",
    Error: "error",
    EStop: "estop",
}
_TYPES = {name: cls for cls, name in _TYPE_NAMES.items()}


# --------------------------------------------------------------------------------------------- validators
# Each takes the decoded value and the field path (for the error message) and returns the Python value.


def _int(value: Any, path: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{path} must be an integer, got {type(value).__name__}.", "schema")
    return value


def _pos_int(value: Any, path: str) -> int:
    if _int(value, path) <= 0:
        raise ProtocolError(f"{path} must be positive, got {value}.", "schema")
    return value


def _float(value: Any, path: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ProtocolError(f"{path} must be a finite number, got {value!r:.40}.", "schema")
    return float(value)


def _bool(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{path} must be true or false, got {type(value).__name__}.", "schema")
    return value


def _str(value: Any, path: str) -> str:
    if type(value) is not str or len(value) > MAX_STR:
        raise ProtocolError(f"{path} must be a string of at most {MAX_STR} characters.", "schema")
    return value


def _optional(check):
    def run(value: Any, path: str) -> Any:
        return None if value is None else check(value, path)

    return run


def _shape(value: Any, path: str) -> list[int]:
    if type(value) is not list or len(value) > MAX_NDIM:
        raise ProtocolError(f"{path} must be a list of at most {MAX_NDIM} dimensions.", "schema")
    for i, dim in enumerate(value):
        if type(dim) is not int or dim < 0:
            raise ProtocolError(f"{path}[{i}] must be a non-negative integer, got {dim!r:.40}.", "schema")
    return value


def _map(value: Any, path: str, max_keys: int = MAX_KEYS) -> dict:
    if type(value) is not dict or len(value) > max_keys:
        raise ProtocolError(f"{path} must be a map with at most {max_keys} entries.", "schema")
    for key in value:
        _str(key, f"{path} key")
    return value


def decode_array(value: Any, path: str) -> np.ndarray:
    """A wire array map `{"dtype", "shape", "data"}` -> numpy array, strictly checked (ProtocolError otherwise)."""
    value = _map(value, path)
    if set(value) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{path} must be an array map with exactly dtype, shape and data.", "schema")
    dtype_name = value["dtype"]
    if type(dtype_name) is not str or dtype_name not in DTYPES:
        raise ProtocolError(f"{path}.dtype {dtype_name!r:.40} is not one of {sorted(DTYPES)}.", "dtype")
    shape = _shape(value["shape"], f"{path}.shape")
    data = value["data"]
    if type(data) is not bytes:
        raise ProtocolError(f"{path}.data must be bytes, got {type(data).__name__}.", "schema")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize  # python ints: no overflow whatever the shape
    if expected != len(data):
        raise ProtocolError(
            f"{path}.data holds {len(data)} bytes but dtype {dtype_name} x shape {shape} needs {expected}.",
            "schema",
        )
    if dtype_name == "bool" and any(b > 1 for b in data):
        raise ProtocolError(f"{path}.data holds bool bytes other than 0 and 1.", "schema")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _array_dict(value: Any, path: str) -> dict[str, np.ndarray]:
    return {key: decode_array(item, f"{path}[{key!r}]") for key, item in _map(value, path).items()}


def _float_dict(value: Any, path: str) -> dict[str, float]:
    return {key: _float(item, f"{path}[{key!r}]") for key, item in _map(value, path).items()}


def _features(value: Any, path: str) -> dict[str, dict]:
    out = {}
    for key, spec in _map(value, path).items():
        spec = _map(spec, f"{path}[{key!r}]")
        if set(spec) != {"dtype", "shape", "names"}:
            raise ProtocolError(f"{path}[{key!r}] must have exactly dtype, shape and names.", "schema")
        names = spec["names"]
        if names is not None and (type(names) is not list or len(names) > MAX_STR):
            raise ProtocolError(f"{path}[{key!r}].names must be a list of strings or nil.", "schema")
        out[key] = {
            "dtype": _str(spec["dtype"], f"{path}[{key!r}].dtype"),
            "shape": _shape(spec["shape"], f"{path}[{key!r}].shape"),
            "names": None if names is None else [_str(n, f"{path}[{key!r}].names[]") for n in names],
        }
    return out


# field name -> (validator, required)
_SCHEMAS: dict[type, dict[str, tuple[Any, bool]]] = {
    Hello: {"token": (_optional(_str), False)},
    HelloReply: {
        "features": (_features, True),
        "n_obs_steps": (_pos_int, True),
        "horizon": (_pos_int, True),
        "n_action_steps": (_pos_int, True),
        "fps": (_optional(_float), False),
        "noise_shape": (_optional(_shape), False),
        "supports_prefix": (_bool, False),
        "language": (_bool, False),
        "delay_aware": (_bool, False),
    },
    Infer: {
        "request_id": (_int, True),
        "observation": (_array_dict, True),
        "timestamp": (_float, True),
        "token": (_optional(_str), False),
        "noise": (_optional(decode_array), False),
        "prefix_actions": (_optional(decode_array), False),
        "instruction": (_optional(_str), False),
    },
    InferReply: {"request_id": (_int, True), "action_chunk": (decode_array, True), "timing": (_float_dict, True)},
    Error: {"code": (_str, True), "message": (_str, True), "request_id": (_optional(_int), False)},
    EStop: {"reason": (_str, True), "token": (_optional(_str), False)},
}
# (message type, field) -> the protocol version that introduced it (fields not listed exist since 1)
_SINCE: dict[tuple[type, str], int] = {(HelloReply, "supports_prefix"): 2, (HelloReply, "language"): 3,
                                       (HelloReply, "delay_aware"): 4,
                                       (Infer, "instruction"): 3}


# ------------------------------------------------------------------------------------------ encode/decode


def encode_value(value: Any) -> Any:
    """Arrays (also inside dicts) -> wire array maps; everything else as it is (msgpack packs it)."""
    if isinstance(value, np.ndarray):
        if value.dtype.name not in DTYPES:
            raise ProtocolError(
                f"Cannot send an array of dtype {value.dtype}; use one of {sorted(DTYPES)}.", "dtype"
            )
        data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
        return {"dtype": value.dtype.name, "shape": list(value.shape), "data": data}
    if isinstance(value, dict):
        return {key: encode_value(item) for key, item in value.items()}
    return value


def encode_message(message: Message, max_bytes: int = MAX_MESSAGE_BYTES, version: int = PROTOCOL_VERSION) -> bytes:
    """Message -> msgpack bytes (no framing) in protocol `version` (fields that version lacks are left out).
    Raises ProtocolError when it would exceed `max_bytes`."""
    cls = type(message)
    if cls not in _TYPE_NAMES:
        raise ProtocolError(f"Cannot encode {cls.__name__}: not a protocol message.", "schema")
    body: dict[str, Any] = {"v": version, "type": _TYPE_NAMES[cls]}
    for f in fields(message):
        value = getattr(message, f.name)
        if value is not None and _SINCE.get((cls, f.name), 1) <= version:
            body[f.name] = encode_value(value)
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > max_bytes:
        raise ProtocolError(
            f"{cls.__name__} message is {len(payload)} bytes, above the {max_bytes} limit.", "too_large"
        )
    return payload


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed.")


def decode_message(payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """msgpack bytes -> Message, or ProtocolError (never another exception) for anything not a valid message."""
    return decode_versioned(payload, max_bytes)[0]


def decode_versioned(payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Message, int]:
    """`decode_message` and the protocol version the message was written in (a server answers in it)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError(f"A message must be bytes, got {type(payload).__name__}.")
    if len(payload) > max_bytes:
        raise ProtocolError(f"Message of {len(payload)} bytes is above the {max_bytes} limit.", "too_large")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, StackError, UnicodeDecodeError, ...)
        raise ProtocolError(f"Message is not valid msgpack ({type(exc).__name__}: {exc}).") from None
    if type(body) is not dict:
        raise ProtocolError(f"A message must be a msgpack map, got {type(body).__name__}.")
    version = body.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            f"Protocol version {version!r:.40} is not supported; this side speaks versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}; run the same robopolicy version on the robot and the server.",
            "version",
        )
    type_name = body.get("type")
    cls = _TYPES.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise ProtocolError(
            f"Unknown message type {type_name!r:.40}; known types are {sorted(_TYPES)}.", "schema"
        )
    schema = _SCHEMAS[cls]
    unknown = {k for k in set(body) - {"v", "type"} if k not in schema or _SINCE.get((cls, k), 1) > version}
    if unknown:
        raise ProtocolError(
            f"{type_name} message has unknown fields {sorted(map(str, unknown))[:8]}.", "schema"
        )
    values = {}
    for name, (check, required) in schema.items():
        if name not in body:
            if required:
                raise ProtocolError(f"{type_name} message misses the required field {name!r}.", "schema")
            continue
        values[name] = check(body[name], f"{type_name}.{name}")
    return cls(**values), version


# ------------------------------------------------------------------------------------------------ framing


def frame(payload: bytes) -> bytes:
    """Prefix a payload with its 4-byte big-endian length."""
    return _HEADER.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, received = [], 0
    while received < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out while receiving a message")
            sock.settimeout(remaining)
        chunk = sock.recv(min(n - received, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {received} of {n} bytes")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def recv_frame(
    sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES, deadline: float | None = None
) -> bytes | None:
    """Read one framed payload; None when the peer closed cleanly between messages.

    Raises ProtocolError("too_large") from the header alone, TimeoutError past `deadline` (time.monotonic),
    ConnectionError when the peer goes away mid-message.
    """
    try:
        header = _recv_exact(sock, _HEADER.size, deadline)
    except ConnectionError as exc:
        if str(exc).startswith("connection closed after 0 "):
            return None
        raise
    (length,) = _HEADER.unpack(header)
    if length == 0:
        raise ProtocolError("Empty message frame.")
    if length > max_bytes:
        raise ProtocolError(f"Message frame of {length} bytes is above the {max_bytes} limit.", "too_large")
    return _recv_exact(sock, length, deadline)


# ------------------------------------------------------------------------------------------ auth and bind


def token_matches(expected: str | None, given: str | None) -> bool:
    """True when no token is required, or `given` equals it (constant-time compare of digests)."""
    if expected is None:
        return True
    if type(given) is not str:
        return False
    return hmac.compare_digest(
        hashlib.sha256(expected.encode()).digest(), hashlib.sha256(given.encode("utf-8", "replace")).digest()
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to any interface


def check_bind_allowed(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token: anyone on the network could drive the robot."""
    if token is None and not is_loopback(host):
        raise ValueError(
            f"Refusing to listen on {host!r} without a token; pass token=... (a shared secret) or bind 127.0.0.1."
        )
