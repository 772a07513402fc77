"""Byte-level tests of codecs/awesomerpc.py, loaded through the registry as the bridge loads it."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metabridge.sdk.codec import CodecError, DecodeStatus, Error, ErrorType, FrameTooLarge, Metadata, MessageType, ResponseStatus
from metabridge.registry import load_codec_class

REPO_ROOT = Path(__file__).resolve().parents[2]
AwesomeRpcCodec = load_codec_class("codecs/awesomerpc.py:AwesomeRpcCodec", REPO_ROOT)
codec_module = sys.modules[AwesomeRpcCodec.__module__]
encode_frame = codec_module.encode_frame
ERROR_CODES = codec_module.ERROR_CODES

# version 1, flow 0x01020304, len 18, cmd 7, rsp_code 0, body "hello"
KNOWN_FRAME = bytes.fromhex("01" "01020304" "00000012" "0007" "0000") + b"hello"


def decode_one(data: bytes | bytearray, codec=None) -> tuple[DecodeStatus, Metadata, bytearray]:
    buffer = bytearray(data)
    metadata = Metadata()
    status = (codec or AwesomeRpcCodec()).decode(buffer, metadata)
    return status, metadata, buffer


def decoded_request(flow: int = 42, cmd: int = 3, body: bytes = b"payload") -> Metadata:
    status, metadata, _ = decode_one(encode_frame(flow, cmd, body))
    assert status is DecodeStatus.DONE
    return metadata


def test_codec_identity():
    assert AwesomeRpcCodec.name == "awesomerpc"
    assert AwesomeRpcCodec.has_request_id is True
    assert codec_module.HEADER.size == codec_module.HEADER_SIZE == 13


def test_encode_frame_matches_known_bytes():
    assert encode_frame(0x01020304, 7, b"hello") == KNOWN_FRAME
    assert encode_frame(5, -2, rsp_code=-1, version=9) == bytes.fromhex("09" "00000005" "0000000d" "fffe" "ffff")


@pytest.mark.parametrize("fields", [{"flow": -1, "cmd": 1}, {"flow": 1 << 32, "cmd": 1}, {"flow": 1, "cmd": 0x8000}, {"flow": 1, "cmd": 1, "version": 256}])
def test_encode_frame_rejects_out_of_range_fields(fields):
    with pytest.raises(ValueError, match="out of range"):
        encode_frame(**fields)


def test_decode_known_frame():
    status, metadata, buffer = decode_one(KNOWN_FRAME)
    assert status is DecodeStatus.DONE
    assert buffer == b""
    assert metadata.message_type is MessageType.REQUEST
    assert metadata.request_id == 0x01020304
    assert metadata.response_status is ResponseStatus.OK
    assert metadata.operation_name == "cmd7"
    assert dict(metadata.headers) == {"cmd": "7"}
    assert metadata.header_size == 13
    assert metadata.body_size == 5
    assert metadata.frame == KNOWN_FRAME
    assert isinstance(metadata.frame, bytes)
    assert metadata.properties == {"version": 1, "cmd": 7, "rsp_code": 0}


def test_decode_negative_cmd_and_error_rsp_code():
    status, metadata, _ = decode_one(encode_frame(1, -5, b"x", rsp_code=503))
    assert status is DecodeStatus.DONE
    assert metadata.headers["cmd"] == "-5"
    assert metadata.operation_name == "cmd-5"
    assert metadata.response_status is ResponseStatus.ERROR
    assert metadata.properties["rsp_code"] == 503


@pytest.mark.parametrize("cut", [0, 1, 12, 13, 17])
def test_partial_frame_waits_and_consumes_nothing(cut):
    partial = KNOWN_FRAME[:cut]
    status, metadata, buffer = decode_one(partial)
    assert status is DecodeStatus.WAIT_FOR_DATA
    assert buffer == partial
    assert metadata.request_id is None


def test_frame_completed_across_calls_with_the_same_instance():
    codec = AwesomeRpcCodec()
    buffer = bytearray()
    for byte in KNOWN_FRAME[:-1]:
        buffer.append(byte)
        assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
    buffer.append(KNOWN_FRAME[-1])
    metadata = Metadata()
    assert codec.decode(buffer, metadata) is DecodeStatus.DONE
    assert metadata.frame == KNOWN_FRAME
    assert buffer == b""


def test_several_frames_in_one_buffer_decode_one_at_a_time():
    frames = [encode_frame(1, 1, b"a"), encode_frame(2, 0), encode_frame(3, 2, b"ccc")]
    tail = encode_frame(4, 4, b"dddd")[:15]
    buffer = bytearray(b"".join(frames) + tail)
    codec = AwesomeRpcCodec()
    seen = []
    for expected in frames:
        metadata = Metadata()
        assert codec.decode(buffer, metadata) is DecodeStatus.DONE
        seen.append((metadata.request_id, metadata.message_type))
        assert metadata.frame == expected
    assert seen == [(1, MessageType.REQUEST), (2, MessageType.HEARTBEAT), (3, MessageType.REQUEST)]
    assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
    assert buffer == tail


@pytest.mark.parametrize("length", [0, 1, 12])
def test_len_below_header_size_is_a_codec_error(length):
    frame = struct.pack("!BIIhh", 1, 9, length, 1, 0)
    with pytest.raises(CodecError, match=f"len {length}"):
        decode_one(frame)


def test_oversized_frame_raises_before_the_body_arrives():
    codec = AwesomeRpcCodec(max_frame_size=100)
    header_only = struct.pack("!BIIhh", 1, 9, 101, 1, 0)
    with pytest.raises(FrameTooLarge, match="101"):
        decode_one(header_only, codec)
    # Exactly at the limit is fine: the codec just waits for the rest.
    status, _, buffer = decode_one(struct.pack("!BIIhh", 1, 9, 100, 1, 0), codec)
    assert status is DecodeStatus.WAIT_FOR_DATA
    assert len(buffer) == 13


def test_heartbeat_decode_and_reply():
    status, metadata, _ = decode_one(encode_frame(77, 0))
    assert status is DecodeStatus.DONE
    assert metadata.message_type is MessageType.HEARTBEAT
    reply = AwesomeRpcCodec().heartbeat_reply(metadata)
    assert reply == bytes.fromhex("01" "0000004d" "0000000d" "0000" "0000")


def test_encode_without_mutation_returns_the_frame_itself():
    metadata = decoded_request()
    codec = AwesomeRpcCodec()
    assert codec.encode(metadata, {}) is metadata.frame
    # Keys other than cmd have nowhere to go in awesomerpc and are ignored.
    assert codec.encode(metadata, {"x-version": "v2", "traceparent": "00-abc"}) is metadata.frame


@pytest.mark.parametrize("key", ["cmd", "CMD"])
def test_encode_with_cmd_mutation_rewrites_only_the_cmd_field(key):
    metadata = decoded_request(flow=42, cmd=3, body=b"payload")
    encoded = AwesomeRpcCodec().encode(metadata, {key: "30", "other": "ignored"})
    assert encoded == encode_frame(42, 30, b"payload")
    assert metadata.frame == encode_frame(42, 3, b"payload")  # the original is untouched


@pytest.mark.parametrize("value", ["thirty", "", "32768", "-32769", "1.5"])
def test_encode_rejects_a_cmd_mutation_that_does_not_fit(value):
    with pytest.raises(CodecError, match="cmd="):
        AwesomeRpcCodec().encode(decoded_request(), {"cmd": value})


def test_error_code_table_is_complete_distinct_and_fits_i16():
    assert set(ERROR_CODES) == set(ErrorType)
    codes = list(ERROR_CODES.values())
    assert len(set(codes)) == len(codes)
    assert all(code != 0 and -0x8000 <= code <= 0x7FFF for code in codes)
    assert ERROR_CODES[ErrorType.ROUTE_NOT_FOUND] == 404
    assert ERROR_CODES[ErrorType.TIMEOUT] == 504


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_on_error_reply_for_each_error_type(error_type):
    request = decoded_request(flow=0xDEADBEEF, cmd=12, body=b"some body")
    reply = AwesomeRpcCodec().on_error(request, Error(error_type, "because"))
    assert len(reply) == 13
    version, flow, length, cmd, rsp_code = struct.unpack("!BIIhh", reply)
    assert (version, flow, length, cmd) == (1, 0xDEADBEEF, 13, 12)
    assert rsp_code == ERROR_CODES[error_type]
    status, metadata, _ = decode_one(reply)
    assert status is DecodeStatus.DONE
    assert metadata.response_status is ResponseStatus.ERROR


frame_fields = st.tuples(
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(-0x8000, 0x7FFF),
    st.integers(-0x8000, 0x7FFF),
    st.binary(max_size=300),
)


@given(fields=frame_fields, split=st.integers(0, 400), trailing=st.binary(max_size=20))
def test_round_trip_property(fields, split, trailing):
    version, flow, cmd, rsp_code, body = fields
    frame = encode_frame(flow, cmd, body, rsp_code=rsp_code, version=version)
    split = min(split, len(frame))
    codec = AwesomeRpcCodec()
    buffer = bytearray(frame[:split])
    metadata = Metadata()
    if split < len(frame):
        assert codec.decode(buffer, metadata) is DecodeStatus.WAIT_FOR_DATA
        assert buffer == frame[:split]
    buffer += frame[split:] + trailing
    assert codec.decode(buffer, metadata) is DecodeStatus.DONE
    assert buffer == trailing
    assert metadata.frame == frame
    assert metadata.request_id == flow
    assert metadata.headers["cmd"] == str(cmd)
    assert metadata.body_size == len(body)
    assert metadata.frame[metadata.header_size :] == body
    assert metadata.properties == {"version": version, "cmd": cmd, "rsp_code": rsp_code}
    assert metadata.message_type is (MessageType.HEARTBEAT if cmd == 0 else MessageType.REQUEST)
    assert metadata.response_status is (ResponseStatus.OK if rsp_code == 0 else ResponseStatus.ERROR)


@given(fields=frame_fields, new_cmd=st.integers(-0x8000, 0x7FFF))
def test_cmd_mutation_property(fields, new_cmd):
    version, flow, cmd, rsp_code, body = fields
    codec = AwesomeRpcCodec()
    status, metadata, _ = decode_one(encode_frame(flow, cmd, body, rsp_code=rsp_code, version=version), codec)
    assert status is DecodeStatus.DONE
    status, mutated, _ = decode_one(codec.encode(metadata, {"cmd": str(new_cmd)}), codec)
    assert status is DecodeStatus.DONE
    assert mutated.properties == {"version": version, "cmd": new_cmd, "rsp_code": rsp_code}
    assert mutated.request_id == flow
    assert mutated.frame[13:] == body


@given(st.lists(st.integers(min_value=-0x8000, max_value=0x7FFF), min_size=1, max_size=6))
def test_a_connection_decodes_repeated_commands_as_a_fresh_codec_would(cmds):
    """One codec per connection remembers its last command's name and headers: every message
    still gets what a fresh codec gives it, in headers of its own."""
    connection = AwesomeRpcCodec()
    for flow, cmd in enumerate(cmds + cmds):
        frame = encode_frame(flow, cmd, b"body")
        _, reused, _ = decode_one(frame, connection)
        _, fresh, _ = decode_one(frame)
        assert (dict(reused.headers), reused.operation_name, reused.properties) == (dict(fresh.headers), fresh.operation_name, fresh.properties)
        reused.headers["cmd"] = "changed"  # a filter's change stays with its message
