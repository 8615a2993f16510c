"""The SO-100 twin's Feetech bus: packets and checksums, the STS3215 control table, the servo loop, the pty.

Byte strings here are written out by hand from Feetech's protocol (and match what scservo_sdk sends: LeRobot's
driver drives the twin in tests/test_so100.py)."""

from __future__ import annotations

import os
import select
import time

import numpy as np
import pytest

from real.host.feetech_twin import (
    BROADCAST_ID,
    INST_ACTION,
    INST_PING,
    INST_READ,
    INST_REG_WRITE,
    INST_SYNC_READ,
    INST_SYNC_WRITE,
    INST_WRITE,
    FeetechBus,
    PacketParser,
    PtyServer,
    SO100Twin,
    checksum,
    from_sign_magnitude,
    instruction_packet,
    status_packet,
    to_sign_magnitude,
)
from sim.so100 import MAX_RES, MOTORS

TICK_DEG = 360.0 / MAX_RES


def test_checksum_and_packets_match_the_protocol_byte_for_byte():
    # PING servo 1: FF FF 01 02 01 FB (Feetech's manual example)
    assert instruction_packet(1, INST_PING) == bytes.fromhex("ffff010201fb")
    # READ servo 1, 2 bytes at 56 (Present_Position)
    assert instruction_packet(1, INST_READ, [56, 2]) == bytes.fromhex("ffff01040238 02be")
    assert checksum([0x01, 0x04, 0x02, 0x38, 0x02]) == 0xBE
    # a status packet: id, length, error, params, checksum
    assert status_packet(1, 0, [0x00, 0x08]) == bytes([0xFF, 0xFF, 1, 4, 0, 0x00, 0x08, ~(1 + 4 + 8) & 0xFF])


def test_parser_resyncs_on_garbage_and_drops_bad_checksums():
    parser = PacketParser()
    good = instruction_packet(3, INST_WRITE, [40, 1])
    bad = bytearray(instruction_packet(2, INST_PING))
    bad[-1] ^= 0x55
    stream = b"\x00\x13" + bytes(bad) + b"\xff" + good + instruction_packet(BROADCAST_ID, INST_PING)
    packets = []
    for cut in (1, 5, 9, len(stream)):  # split anywhere: the parser waits for the rest
        packets += list(parser.feed(stream[:cut]))
        stream = stream[cut:]
    packets += list(parser.feed(stream))
    assert packets == [(3, INST_WRITE, bytes([40, 1])), (BROADCAST_ID, INST_PING, b"")]
    assert parser.dropped == 1


def test_sign_magnitude_round_trip():
    for bit in (10, 11, 15):
        for value in (0, 1, 1000, -1, -300):
            assert from_sign_magnitude(to_sign_magnitude(value, bit), bit) == value
    assert to_sign_magnitude(-5, 11) == 0x805


def test_bus_answers_ping_read_write_sync_and_ignores_unknown_ids():
    bus = FeetechBus()
    assert bus.handle(1, INST_PING, b"") == status_packet(1)
    assert bus.handle(9, INST_PING, b"") == b""  # nobody there: the host times out
    assert bus.handle(BROADCAST_ID, INST_PING, b"") == b"".join(status_packet(i) for i in range(1, 7))
    # model number 777 at address 3, firmware 3.10
    assert bus.handle(2, INST_READ, bytes([3, 2])) == status_packet(2, 0, (777).to_bytes(2, "little"))
    assert bus.handle(2, INST_READ, bytes([0, 2])) == status_packet(2, 0, bytes([3, 10]))
    # write Goal_Position 1000 to servo 4, read it back
    assert bus.handle(4, INST_WRITE, bytes([42, 0xE8, 0x03])) == status_packet(4)
    assert bus.servos[4].get("Goal_Position") == 1000
    # read-only registers keep their value
    bus.handle(4, INST_WRITE, bytes([3, 0, 0]))
    assert bus.servos[4].get("ID") == 4 and int.from_bytes(bus.servos[4].read(3, 2), "little") == 777
    # sync write: no answer; each servo gets its slice
    params = bytes([42, 2]) + b"".join(bytes([i]) + (100 * i).to_bytes(2, "little") for i in (1, 2, 3))
    assert bus.handle(BROADCAST_ID, INST_SYNC_WRITE, params) == b""
    assert [bus.servos[i].get("Goal_Position") for i in (1, 2, 3)] == [100, 200, 300]
    # sync read: one status packet per listed servo, in the order asked
    reply = bus.handle(BROADCAST_ID, INST_SYNC_READ, bytes([42, 2, 3, 1]))
    assert reply == status_packet(3, 0, (300).to_bytes(2, "little")) + status_packet(1, 0, (100).to_bytes(2, "little"))
    # a broadcast write changes every servo and answers nothing
    assert bus.handle(BROADCAST_ID, INST_WRITE, bytes([41, 7])) == b""
    assert all(s.get("Acceleration") == 7 for s in bus.servos.values())
    # REG_WRITE waits for ACTION
    bus.handle(5, INST_REG_WRITE, bytes([42, 0x10, 0x00]))
    assert bus.servos[5].get("Goal_Position") != 16
    bus.handle(5, INST_ACTION, b"")
    assert bus.servos[5].get("Goal_Position") == 16
    # Response_Status_Level 0: writes are silent, reads still answered
    bus.handle(6, INST_WRITE, bytes([8, 0]))
    assert bus.handle(6, INST_WRITE, bytes([41, 1])) == b""
    assert bus.handle(6, INST_READ, bytes([41, 1])) == status_packet(6, 0, bytes([1]))


def test_homing_offset_and_limits_as_on_the_servo():
    twin = SO100Twin()
    cal = twin.encoders.calibration()
    for k, motor in enumerate(MOTORS):
        servo = twin.bus.servos[cal[motor].id]
        assert servo.get("Homing_Offset") == cal[motor].homing_offset
        raw = int(np.clip(np.round(twin.raw()[k]), 0, 4095))
        assert servo.get("Present_Position") == raw - cal[motor].homing_offset  # Present = raw - Homing_Offset
    # a goal outside the position limits is clamped to them
    servo = twin.bus.servos[1]
    servo.set("Goal_Position", 5000)
    assert twin.goal_raw(0) == servo.get("Max_Position_Limit") + servo.get("Homing_Offset")


def test_servo_loop_reaches_the_goal_within_one_tick_and_torque_off_is_limp():
    twin = SO100Twin()
    cal = twin.encoders.calibration()
    goal_deg = np.array([20.0, -30.0, 25.0, 40.0, -60.0, 30.0])
    raw_goal = twin.encoders.raw_ticks(twin.encoders.from_lerobot(goal_deg))
    for k, motor in enumerate(MOTORS):
        twin.bus.handle(cal[motor].id, INST_WRITE, bytes([40, 1]))  # torque on: holds where it is
        goal = int(round(raw_goal[k])) - cal[motor].homing_offset
        twin.bus.handle(cal[motor].id, INST_WRITE, bytes([42]) + goal.to_bytes(2, "little"))
    twin.advance(1.5)
    for motor in MOTORS:
        servo = twin.bus.servos[cal[motor].id]
        assert abs(servo.get("Present_Position") - servo.get("Goal_Position")) <= 1
        assert servo.get("Moving") == 0
    measured = twin.encoders.to_lerobot(twin.joint_positions())
    assert np.abs(measured[:5] - goal_deg[:5]).max() <= TICK_DEG
    # torque off: the shoulder falls under gravity, and the goal register follows the present position
    twin.bus.handle(BROADCAST_ID, INST_WRITE, bytes([40, 0]))
    before = twin.joint_positions()
    twin.advance(0.5)
    assert np.abs(twin.joint_positions() - before)[1] > 0.05
    servo = twin.bus.servos[2]
    assert servo.get("Goal_Position") == servo.get("Present_Position")


def test_pty_serves_packets_in_real_time():
    server = PtyServer(SO100Twin()).start()
    fd = os.open(server.port, os.O_RDWR | os.O_NOCTTY)
    try:
        def ask(packet: bytes, expected_len: int) -> bytes:
            os.write(fd, packet)
            reply, deadline = b"", time.monotonic() + 2.0
            while len(reply) < expected_len and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    reply += os.read(fd, 256)
            return reply

        assert ask(instruction_packet(1, INST_PING), 6) == status_packet(1)
        position = ask(instruction_packet(BROADCAST_ID, INST_SYNC_READ, [56, 2, 1, 2, 3, 4, 5, 6]), 6 * 8)
        assert len(position) == 48 and all(position[8 * k + 2] == k + 1 for k in range(6))
        t0 = server.twin.sim_time
        time.sleep(0.3)
        assert server.twin.sim_time - t0 == pytest.approx(0.3, abs=0.1)  # the physics keeps the wall clock
    finally:
        os.close(fd)
        server.close()
