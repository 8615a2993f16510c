"""Wire protocol: round trips, and a decoder that answers anything malformed with ProtocolError only."""

from __future__ import annotations

import socket
import struct
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from real.robot.protocol import (
    DTYPES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Error,
    EStop,
    Hello,
    HelloReply,
    Infer,
    InferReply,
    ProtocolError,
    check_bind_allowed,
    decode_message,
    encode_message,
    frame,
    recv_frame,
    token_matches,
)

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "g"]},
    "observation.images.front": {"dtype": "uint8", "shape": [8, 8, 3], "names": None},
    "action": {"dtype": "float32", "shape": [4], "names": None},
}


def valid_messages() -> list:
    rng = np.random.default_rng(0)
    observation = {
        "observation.state": rng.standard_normal((2, 4)).astype(np.float32),
        "observation.images.front": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
    }
    return [
        Hello(),
        Hello(token="s3cret"),
        HelloReply(FEATURES, n_obs_steps=2, horizon=16, n_action_steps=8, fps=10.0, noise_shape=[16, 4]),
        HelloReply(FEATURES, n_obs_steps=1, horizon=4, n_action_steps=4),
        Infer(7, observation, timestamp=123.5, token="s3cret"),
        Infer(8, observation, 1.0, None, rng.standard_normal((16, 4)).astype(np.float32), np.zeros((3, 4), np.float32)),
        InferReply(7, rng.standard_normal((16, 4)).astype(np.float32), {"inference_s": 0.01, "queue_s": 0.0}),
        Error("schema", "observation.state has shape [3], the policy expects [2, 4].", request_id=7),
        Error("auth", "wrong token"),
        EStop("operator button", token="s3cret"),
    ]


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape
            np.testing.assert_array_equal(value, other)
        elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
            assert value.keys() == other.keys()
            for key in value:
                np.testing.assert_array_equal(value[key], other[key])
                assert value[key].dtype == other[key].dtype
        else:
            assert value == other


@pytest.mark.parametrize("message", valid_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_of_every_message_type(message):
    assert_same(message, decode_message(encode_message(message)))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 5), (1, 2, 3, 1)])
def test_round_trip_of_every_allowed_dtype_and_shape(dtype, shape):
    array = (np.arange(int(np.prod(shape))) % 2).astype(dtype).reshape(shape)
    decoded = decode_message(encode_message(InferReply(1, array, {})))
    assert decoded.action_chunk.dtype == np.dtype(dtype) and decoded.action_chunk.shape == shape
    np.testing.assert_array_equal(decoded.action_chunk, array)
    decoded.action_chunk[...] = 0  # decoded arrays are writable copies, not views into the message


def test_big_endian_and_non_contiguous_arrays_arrive_as_native_values():
    array = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    decoded = decode_message(encode_message(InferReply(1, array, {}))).action_chunk
    np.testing.assert_array_equal(decoded, array)


def test_encoder_refuses_object_arrays_and_oversized_messages():
    with pytest.raises(ProtocolError, match="dtype object"):
        encode_message(InferReply(1, np.array([object()]), {}))
    with pytest.raises(ProtocolError, match="above the 1000 limit") as info:
        encode_message(InferReply(1, np.zeros(1000, np.float32), {}), max_bytes=1000)
    assert info.value.code == "too_large"


# ---------------------------------------------------------------------------------------- fuzzing


def decode_or_protocol_error(payload: bytes) -> None:
    """The only acceptable outcomes: a valid message, or ProtocolError."""
    try:
        message = decode_message(payload)
    except ProtocolError:
        return
    assert type(message) in (Hello, HelloReply, Infer, InferReply, Error, EStop)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_protocol_error(payload):
    decode_or_protocol_error(payload)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=10,
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["hello", "hello_reply", "infer", "infer_reply", "error", "estop", "other"]),
    st.dictionaries(
        st.sampled_from(["token", "request_id", "observation", "timestamp", "noise", "action_chunk", "timing",
                         "features", "n_obs_steps", "horizon", "code", "message", "reason", "extra"]),
        msgpack_values,
        max_size=4,
    ),
)
def test_wrongly_typed_fields_never_raise_anything_but_protocol_error(type_name, fields):
    decode_or_protocol_error(msgpack.packb({"v": PROTOCOL_VERSION, "type": type_name, **fields}))


OPTIONAL_FIELDS = {"token", "fps", "noise_shape", "noise", "prefix_actions", "request_id"}


def semantic_mutations(body: dict, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """Structured mutations of a valid message body that must all be refused."""
    mutations = [
        ("version", {**body, "v": PROTOCOL_VERSION + 1}),
        ("version as string", {**body, "v": str(PROTOCOL_VERSION)}),
        ("no version", {k: v for k, v in body.items() if k != "v"}),
        ("unknown type", {**body, "type": "infer2"}),
        ("unknown field", {**body, "surprise": 1}),
        ("non-string key", {**body, 5: 1}),
    ]
    for key, value in body.items():
        if key in ("v", "type"):
            continue
        for wrong in (None, True, 1.5, -3, "x", b"x", [1, 2], {"a": 1}, 2**64 - 1):
            accepted = type(wrong) is type(value) or (wrong is None and key in OPTIONAL_FIELDS)
            accepted |= type(value) is float and type(wrong) is int  # numbers may be sent as integers
            if not accepted:
                mutations.append((f"{key}={wrong!r}", {**body, key: wrong}))
    for path, array in find_arrays(body):
        for name, bad in (
            ("object dtype", {**array, "dtype": "object"}),
            ("numpy char code", {**array, "dtype": "<f4"}),
            ("unicode dtype", {**array, "dtype": "<U4"}),
            ("float128", {**array, "dtype": "float128"}),
            ("short buffer", {**array, "data": array["data"][:-1]}),
            ("long buffer", {**array, "data": array["data"] + b"\0"}),
            ("shape mismatch", {**array, "shape": [*array["shape"], 2]}),
            ("negative dim", {**array, "shape": [-1, *array["shape"]]}),
            ("huge dims", {**array, "shape": [2**40, 2**40]}),
            ("too many dims", {**array, "shape": [1] * 9}),
            ("float dim", {**array, "shape": [float(d) for d in array["shape"]]}),
            ("data as list", {**array, "data": list(array["data"][:4])}),
            ("missing data", {k: v for k, v in array.items() if k != "data"}),
            ("extra key", {**array, "order": "F"}),
        ):
            mutations.append((f"{'.'.join(path)}: {name}", set_path(body, path, bad)))
    return mutations


def find_arrays(value, path=()):
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"} and isinstance(value["data"], bytes):
            yield path, value
        else:
            for key, item in value.items():
                yield from find_arrays(item, (*path, key))


def set_path(body: dict, path: tuple, new) -> dict:
    if len(path) == 1:
        return {**body, path[0]: new}
    return {**body, path[0]: set_path(body[path[0]], path[1:], new)}


def test_structured_mutations_of_valid_messages_are_all_refused():
    rng = np.random.default_rng(1)
    count = 0
    for message in valid_messages():
        body = msgpack.unpackb(encode_message(message))
        for name, mutated in semantic_mutations(body, rng):
            with pytest.raises(ProtocolError):
                decode_message(msgpack.packb(mutated, strict_types=False))
                pytest.fail(f"accepted mutation {name} of {type(message).__name__}")
            count += 1
    assert count > 200


def test_byte_level_mutations_of_valid_messages():
    rng = np.random.default_rng(2)
    payloads = [encode_message(m) for m in valid_messages()]
    for _ in range(3000):
        payload = bytearray(payloads[rng.integers(len(payloads))])
        op = rng.integers(4)
        if op == 0:  # truncate
            payload = payload[: rng.integers(len(payload))]
            with pytest.raises(ProtocolError):
                decode_message(bytes(payload))
            continue
        if op == 1:  # flip bytes
            for i in rng.integers(0, len(payload), rng.integers(1, 4)):
                payload[i] ^= int(rng.integers(1, 256))
        elif op == 2:  # insert random bytes
            i = rng.integers(len(payload))
            payload[i:i] = rng.integers(0, 256, rng.integers(1, 8), dtype=np.uint8).tobytes()
        else:  # delete a slice
            i = rng.integers(len(payload))
            del payload[i : i + rng.integers(1, 8)]
        decode_or_protocol_error(bytes(payload))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x91" * 100_000 + b"\xc0",  # 100k nested arrays
        b"\x81\xa1k" * 50_000 + b"\xc0",  # 50k nested maps
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4 billion items
        b"\xc6\xff\xff\xff\xf0",  # bin header claiming 4 GB
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp extension
        b"\xc7\x01\x05x",  # unknown extension
        msgpack.packb({"v": 1, "type": "hello", "token": "\ud800x"}, unicode_errors="surrogatepass"),
        msgpack.packb({"v": 1, "type": "hello"}) + b"\x00",  # trailing data
        b"",
    ],
)
def test_hostile_payloads_fail_fast_with_protocol_error(payload):
    started = time.perf_counter()
    with pytest.raises(ProtocolError):
        decode_message(payload)
    assert time.perf_counter() - started < 1.0


def test_decoder_refuses_payloads_above_the_limit_before_parsing():
    payload = encode_message(InferReply(1, np.zeros(100, np.float32), {}))
    with pytest.raises(ProtocolError) as info:
        decode_message(payload, max_bytes=len(payload) - 1)
    assert info.value.code == "too_large"


# ---------------------------------------------------------------------------------------- framing


def test_frames_over_a_real_socket_pair():
    a, b = socket.socketpair()
    with a, b:
        payloads = [encode_message(m) for m in valid_messages()]
        a.sendall(b"".join(frame(p) for p in payloads))
        for p in payloads:
            assert recv_frame(b, deadline=time.monotonic() + 1) == p
        a.sendall(struct.pack("!I", 2**31))  # claims 2 GiB: refused from the header alone
        with pytest.raises(ProtocolError) as info:
            recv_frame(b, max_bytes=MAX_MESSAGE_BYTES, deadline=time.monotonic() + 1)
        assert info.value.code == "too_large"
        a.sendall(struct.pack("!I", 0))
        with pytest.raises(ProtocolError, match="Empty"):
            recv_frame(b, deadline=time.monotonic() + 1)
        a.sendall(struct.pack("!I", 100) + b"only part")  # truncated: times out rather than hanging
        with pytest.raises(TimeoutError):
            recv_frame(b, deadline=time.monotonic() + 0.1)
        a.sendall(struct.pack("!I", 100) + b"cut short")  # peer goes away mid-message
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            recv_frame(b, deadline=time.monotonic() + 1)


def test_clean_close_between_frames_returns_none():
    a, b = socket.socketpair()
    with a, b:
        a.close()
        assert recv_frame(b, deadline=time.monotonic() + 1) is None


# ---------------------------------------------------------------------------------------- auth


def test_token_compare_and_bind_policy():
    assert token_matches(None, None) and token_matches(None, "anything")
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cret", "s3crex") and not token_matches("s3cret", None)
    assert not token_matches("s3cret", "s3cret" * 1000) and not token_matches("s3cret", 5)
    check_bind_allowed("127.0.0.1", None)
    check_bind_allowed("::1", None)
    check_bind_allowed("0.0.0.0", "s3cret")
    for host in ("0.0.0.0", "192.168.1.10", "robot.local", "::"):
        with pytest.raises(ValueError, match="without a token"):
            check_bind_allowed(host, None)
