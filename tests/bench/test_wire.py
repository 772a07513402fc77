"""The benchmark's wire helpers: Hessian2 strings, request templates, the echo backend's answers."""

from __future__ import annotations

import struct

import pytest

from bench import wire


@pytest.mark.parametrize("size", [0, 1, 31, 32, 1023, 1024, 0xFFFF, 0x10000, 3 * 0xFFFF + 7])
def test_hessian_string_round_trip(size):
    text = wire.payload_bytes(size).decode()
    encoded = wire.hessian_string(text)
    padded = b"\x00" + encoded + b"tail"
    assert wire.skip_hessian_string(padded, 1) == 1 + len(encoded)
    chunks = -(-size // 0xFFFF) if size > 1023 else 1
    header = 1 if size <= 31 else 2 if size <= 1023 else 3 * chunks
    assert len(encoded) == size + header


def test_skip_hessian_string_rejects_other_values():
    with pytest.raises(wire.WireError, match="expected a Hessian2 string"):
        wire.skip_hessian_string(b"\x91", 0)
    with pytest.raises(wire.WireError, match="past the end"):
        wire.skip_hessian_string(b"\x05ab", 0)


@pytest.mark.parametrize("size", [100, 70_000])
def test_dubbo_request_is_answered_with_its_argument(size):
    template = wire.request_template(wire.DUBBO, size)
    request = template.build(0x1234_5678_9A)
    assert wire.frame_length(wire.DUBBO, request, 0) == len(request)
    magic, flag, _, request_id, body = struct.unpack_from(">HBBqi", request)
    assert (magic, flag, request_id, body) == (0xDABB, 0xC2, 0x1234_5678_9A, len(request) - 16)

    reply = wire.dubbo_answer(request, 0, len(request))
    assert wire.frame_length(wire.DUBBO, reply, 0) == len(reply)
    assert wire.response_id(wire.DUBBO, reply) == 0x1234_5678_9A
    assert reply[16:] == template.expected_body
    assert template.expected_body[0] == 0x91  # RESPONSE_VALUE


def test_dubbo_heartbeat_gets_an_ok_event_reply():
    heartbeat = struct.pack(">HBBqi", 0xDABB, 0x80 | 0x40 | 0x20 | 0x02, 0, 7, 1) + b"N"
    reply = wire.dubbo_answer(heartbeat, 0, len(heartbeat))
    magic, flag, status, request_id, body = struct.unpack_from(">HBBqi", reply)
    assert (magic, flag, status, request_id, body) == (0xDABB, 0x22, 20, 7, 1)
    assert wire.response_id(wire.DUBBO, reply) == -1  # an event is never a request's response


def test_awesomerpc_echo_is_the_expected_response():
    template = wire.request_template(wire.AWESOMERPC, 100)
    frame = template.build(42)
    assert wire.frame_length(wire.AWESOMERPC, frame, 0) == len(frame) == 113
    assert wire.response_id(wire.AWESOMERPC, frame) == 42
    assert frame[13:] == template.expected_body
    error = frame[:11] + b"\x01\xf4" + frame[13:]  # rsp_code 500
    assert wire.response_id(wire.AWESOMERPC, error) == -1


def test_frame_length_waits_for_a_whole_header_and_rejects_garbage():
    assert wire.frame_length(wire.DUBBO, b"\xda\xbb\xc2", 0) == 0
    assert wire.frame_length(wire.AWESOMERPC, b"\x01" * 12, 0) == 0
    with pytest.raises(wire.WireError, match="magic"):
        wire.frame_length(wire.DUBBO, b"GET / HTTP/1.1\r\n\r\n", 0)
    with pytest.raises(wire.WireError, match="less than its header"):
        wire.frame_length(wire.AWESOMERPC, struct.pack("!BIIhh", 1, 1, 5, 1, 0), 0)
