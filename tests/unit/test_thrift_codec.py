"""Byte-level tests of codecs/thrift (loaded through the registry as the bridge loads it), with
hand-written vectors from the Thrift specs and messages encoded by thriftpy2 itself."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.thrift import TApplicationException, TMessageType

from metabridge.sdk.codec import CodecError, DecodeStatus, Error, ErrorType, FrameTooLarge, Metadata, MessageType, ResponseStatus
from metabridge.registry import load_codec_class
from tests.helpers import decode_frames
from tests.peers.thrift_peers import Variant, echo_thrift, encode_message, read_exception_reply, sample_payload

REPO_ROOT = Path(__file__).resolve().parents[2]
ThriftCodec = load_codec_class("codecs/thrift:ThriftCodec", REPO_ROOT)
ERROR_CODES = sys.modules[ThriftCodec.__module__].ERROR_CODES
Echo = echo_thrift.Echo

ALL_VARIANTS = [Variant(t, p) for t in ("framed", "buffered") for p in ("binary", "compact")]
VARIANT_IDS = [v.name for v in ALL_VARIANTS]

# Hand-written vectors (Thrift binary/compact specs): CALL echo(s="hi"), seqid 1.
BINARY_CALL = bytes.fromhex("80010001" "00000004") + b"echo" + bytes.fromhex("00000001" "0b0001" "00000002") + b"hi" + b"\x00"
COMPACT_CALL = bytes.fromhex("8221" "01" "04") + b"echo" + bytes.fromhex("18" "02") + b"hi" + b"\x00"


def framed(message: bytes) -> bytes:
    return struct.pack(">I", len(message)) + message


def decode_all(data: bytes, codec=None, **options) -> tuple[list[Metadata], bytearray]:
    """Decode every whole message in ``data``; returns them and what is left."""
    buffer = bytearray(data)
    return decode_frames(codec or ThriftCodec(options=options), buffer), buffer


def decode_one(data: bytes, codec=None, **options) -> Metadata:
    decoded, rest = decode_all(data, codec, **options)
    assert len(decoded) == 1 and rest == b"", f"expected exactly one message, got {decoded} and {bytes(rest)!r} left"
    return decoded[0]


def request(variant: Variant, method: str = "echo", seqid: int = 0, **args) -> Metadata:
    args = args or ({"s": "hi"} if method == "echo" else {})
    data = encode_message(variant, method, TMessageType.CALL, seqid, getattr(Echo, f"{method}_args")(**args))
    return decode_one(data)


# -- identity and options ---------------------------------------------------------------------


def test_codec_identity():
    assert ThriftCodec.name == "thrift"
    assert ThriftCodec.has_request_id is False
    codec = ThriftCodec()
    assert (codec.transport, codec.protocol) == ("auto", "auto")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transport": "http"}, "option transport: 'http' is not one of auto, framed, buffered"),
        ({"protocol": "json"}, "option protocol: 'json' is not one of auto, binary, compact"),
        ({"framing": "framed"}, "unknown option(s) framing"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError) as excinfo:
        ThriftCodec(options=options)
    assert message in str(excinfo.value)


# -- hand-written vectors ---------------------------------------------------------------------


def test_binary_unframed_vector():
    metadata = decode_one(BINARY_CALL)
    assert metadata.message_type is MessageType.REQUEST
    assert metadata.request_id == 1
    assert metadata.operation_name == "echo"
    assert dict(metadata.headers) == {"method": "echo"}
    assert metadata.response_status is ResponseStatus.OK
    assert metadata.frame == BINARY_CALL
    assert (metadata.header_size, metadata.body_size) == (16, len(BINARY_CALL) - 16)
    assert metadata.properties == {
        "protocol": "binary",
        "transport": "buffered",
        "strict": True,
        "name": "echo",
        "method": "echo",
        "seqid": 1,
        "message_type": "call",
    }


def test_binary_framed_vector():
    metadata = decode_one(framed(BINARY_CALL))
    assert metadata.frame == framed(BINARY_CALL)
    assert (metadata.header_size, metadata.body_size) == (4 + 16, len(BINARY_CALL) - 16)
    assert (metadata.properties["transport"], metadata.properties["protocol"]) == ("framed", "binary")


@pytest.mark.parametrize("data", [COMPACT_CALL, framed(COMPACT_CALL)], ids=["buffered", "framed"])
def test_compact_vectors(data):
    metadata = decode_one(data)
    assert (metadata.message_type, metadata.request_id, metadata.operation_name) == (MessageType.REQUEST, 1, "echo")
    assert metadata.header_size == len(data) - len(COMPACT_CALL) + 8
    assert metadata.properties["protocol"] == "compact"
    assert metadata.frame == data


def test_hand_vectors_match_thriftpy2():
    assert encode_message(Variant("buffered", "binary"), "echo", TMessageType.CALL, 1, Echo.echo_args(s="hi")) == BINARY_CALL
    assert encode_message(Variant("buffered", "compact"), "echo", TMessageType.CALL, 1, Echo.echo_args(s="hi")) == COMPACT_CALL


def test_compact_negative_seqid_and_long_field_jump():
    # seqid -1 as a 5-byte unsigned varint; field 300 (no delta: type byte then zigzag i16).
    message = bytes.fromhex("8221" "ffffffff0f" "01") + b"m" + bytes.fromhex("01" "d804") + b"\x00"
    metadata = decode_one(message)
    assert metadata.request_id == -1
    assert metadata.frame == message


def test_non_strict_binary_needs_explicit_protocol():
    message = bytes.fromhex("00000004") + b"ping" + bytes.fromhex("01" "00000009" "00")
    metadata = decode_one(message, protocol="binary", transport="buffered")
    assert (metadata.operation_name, metadata.request_id, metadata.properties["strict"]) == ("ping", 9, False)
    assert decode_one(framed(message), protocol="binary", transport="framed").frame == framed(message)
    with pytest.raises(CodecError, match="set the codec options protocol: binary and transport"):
        decode_all(message)
    with pytest.raises(CodecError, match="without a version header"):
        decode_all(bytes.fromhex("80010001") + b"\x00" * 8 + message, transport="buffered")  # strict first, then non-strict


# -- every variant, every message kind, encoded by thriftpy2 ------------------------------------


def kinds():
    """(method, thriftpy2 message type, body, expected message type, expected status, extra properties)"""
    return [
        ("echo", TMessageType.CALL, Echo.echo_args(s="hello"), MessageType.REQUEST, ResponseStatus.OK, {}),
        ("notify", TMessageType.ONEWAY, Echo.notify_args(s="note"), MessageType.ONEWAY, ResponseStatus.OK, {}),
        ("mirror", TMessageType.CALL, Echo.mirror_args(payload=sample_payload(5)), MessageType.REQUEST, ResponseStatus.OK, {}),
        ("echo", TMessageType.REPLY, Echo.echo_result(success="hello"), MessageType.RESPONSE, ResponseStatus.OK, {}),
        ("mirror", TMessageType.REPLY, Echo.mirror_result(success=sample_payload(6)), MessageType.RESPONSE, ResponseStatus.OK, {}),
        ("ping", TMessageType.REPLY, Echo.ping_result(), MessageType.RESPONSE, ResponseStatus.OK, {}),
        (
            "fail",
            TMessageType.REPLY,
            Echo.fail_result(err=echo_thrift.EchoError(message="declared")),
            MessageType.RESPONSE,
            ResponseStatus.ERROR,
            {"exception_field_id": 1},
        ),
        (
            "fail",
            TMessageType.EXCEPTION,
            TApplicationException(TApplicationException.INTERNAL_ERROR, "it broke"),
            MessageType.ERROR,
            ResponseStatus.ERROR,
            {"exception_message": "it broke", "exception_type": 6},
        ),
    ]


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("kind", kinds(), ids=lambda k: f"{k[0]}-{k[3].value}-{k[4].value}")
def test_thriftpy2_messages(variant, kind):
    method, thrift_type, body, message_type, status, extra = kind
    data = encode_message(variant, method, thrift_type, 42, body)
    codec = ThriftCodec()
    metadata = decode_one(data, codec)
    assert (codec.transport, codec.protocol) == (variant.transport, variant.protocol)
    assert metadata.message_type is message_type
    assert metadata.response_status is status
    assert metadata.request_id == 42
    assert metadata.operation_name == method
    assert dict(metadata.headers) == {"method": method}
    assert metadata.frame == data
    assert metadata.header_size + metadata.body_size == len(data)
    for key, value in extra.items():
        assert metadata.properties[key] == value


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_several_messages_in_one_buffer(variant):
    messages = [encode_message(variant, "echo", TMessageType.CALL, seqid, Echo.echo_args(s="x" * seqid)) for seqid in range(5)]
    partial = encode_message(variant, "whoami", TMessageType.CALL, 9, Echo.whoami_args())
    decoded, rest = decode_all(b"".join(messages) + partial[:-1])
    assert [m.request_id for m in decoded] == [0, 1, 2, 3, 4]
    assert [m.frame for m in decoded] == messages
    assert rest == partial[:-1]


@pytest.mark.parametrize("variant", [Variant("framed", "binary", True), Variant("buffered", "compact", True)], ids=lambda v: v.name)
def test_multiplexed_names(variant):
    call = decode_one(encode_message(variant, "echo", TMessageType.CALL, 3, Echo.echo_args(s="x")))
    assert call.operation_name == "Echo:echo"
    assert dict(call.headers) == {"service": "Echo", "method": "echo"}
    assert (call.properties["name"], call.properties["method"]) == ("Echo:echo", "echo")
    # Replies from a multiplexed server carry the bare method name.
    reply = decode_one(encode_message(variant, "echo", TMessageType.REPLY, 3, Echo.echo_result(success="x")))
    assert reply.operation_name == "echo"
    assert "service" not in reply.headers


def test_multiplexed_name_splits_at_the_first_separator():
    message = bytes.fromhex("80010001" "00000005") + b"a:b:c" + bytes.fromhex("00000000" "00")
    metadata = decode_one(message)
    assert dict(metadata.headers) == {"service": "a", "method": "b:c"}


# -- partial input ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_every_prefix_waits_and_consumes_nothing(variant):
    data = encode_message(variant, "mirror", TMessageType.CALL, 7, Echo.mirror_args(payload=sample_payload(4)))
    for cut in range(len(data)):
        buffer = bytearray(data[:cut])
        assert ThriftCodec().decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA, cut
        assert buffer == data[:cut]


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=VARIANT_IDS)
def test_byte_by_byte_on_one_codec(variant):
    messages = [encode_message(variant, "mirror", TMessageType.CALL, n, Echo.mirror_args(payload=sample_payload(n))) for n in (1, 2)]
    stream = b"".join(messages)
    codec, buffer, decoded = ThriftCodec(), bytearray(), []
    for byte in stream:
        buffer.append(byte)
        metadata = Metadata()
        if codec.decode(buffer, metadata) is DecodeStatus.DONE:
            decoded.append(metadata)
    assert [m.frame for m in decoded] == messages
    assert buffer == b""


def test_detection_waits_for_the_frame_length():
    for cut in range(5):
        codec = ThriftCodec()
        assert codec.decode(bytearray(framed(BINARY_CALL)[:cut]), Metadata()) is DecodeStatus.WAIT_FOR_DATA
        assert codec.transport == "auto"


def test_detection_sticks_to_the_connection():
    codec = ThriftCodec()
    decode_one(COMPACT_CALL, codec)
    assert (codec.transport, codec.protocol) == ("buffered", "compact")
    with pytest.raises(CodecError, match="compact protocol id 0x80"):
        decode_all(BINARY_CALL, codec)


@pytest.mark.parametrize(
    ("options", "data"),
    [
        ({"transport": "framed", "protocol": "compact"}, framed(COMPACT_CALL)),
        ({"transport": "buffered"}, BINARY_CALL),
        ({"protocol": "compact"}, framed(COMPACT_CALL)),
    ],
)
def test_explicit_options(options, data):
    assert decode_one(data, **options).frame == data


@pytest.mark.parametrize(
    ("options", "data", "message"),
    [
        ({"transport": "framed"}, BINARY_CALL, "frame length -2147418111 is not positive"),
        ({"transport": "buffered"}, framed(BINARY_CALL), "cannot detect the Thrift protocol"),
        ({"protocol": "compact"}, BINARY_CALL, "bad Thrift compact protocol id 0x80"),
    ],
)
def test_options_that_do_not_match_the_stream(options, data, message):
    with pytest.raises(CodecError, match=message):
        decode_all(data, **options)


# -- limits and garbage -----------------------------------------------------------------------


def test_framed_length_over_the_limit_is_refused_from_the_prefix_alone():
    codec = ThriftCodec(max_frame_size=1000)
    with pytest.raises(FrameTooLarge):
        codec.decode(bytearray(struct.pack(">I", 997) + b"\x80"), Metadata())


def test_framed_message_exactly_at_the_limit_passes():
    message = encode_message(Variant("framed", "binary"), "echo", TMessageType.CALL, 0, Echo.echo_args(s="y" * 500))
    assert decode_one(message, ThriftCodec(max_frame_size=len(message))).frame == message
    with pytest.raises(FrameTooLarge):
        decode_all(message, ThriftCodec(max_frame_size=len(message) - 1))


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_unframed_announced_string_over_the_limit_is_refused_early(protocol):
    variant = Variant("buffered", protocol)
    message = encode_message(variant, "echo", TMessageType.CALL, 0, Echo.echo_args(s="z" * 5000))
    codec = ThriftCodec(max_frame_size=1000)
    with pytest.raises(FrameTooLarge):
        codec.decode(bytearray(message[:40]), Metadata())  # only the string's length is known yet


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_unframed_buffer_growing_past_the_limit_is_refused(protocol):
    variant = Variant("buffered", protocol)
    message = encode_message(variant, "mirror", TMessageType.CALL, 0, Echo.mirror_args(payload=echo_thrift.Payload(numbers=list(range(0, 4000, 3)))))
    assert len(message) > 1000
    codec, buffer = ThriftCodec(max_frame_size=1000), bytearray()
    with pytest.raises(FrameTooLarge):
        for start in range(0, len(message), 100):
            buffer += message[start : start + 100]
            assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
            assert len(buffer) <= 1000, "the codec kept waiting past max_frame_size"


def binary_struct_message(body: bytes) -> bytes:
    """A strict binary CALL 'm' seqid 0 whose args struct is ``body`` (fields, without STOP)."""
    return bytes.fromhex("80010001" "00000001") + b"m" + bytes.fromhex("00000000") + body + b"\x00"


def compact_struct_message(body: bytes) -> bytes:
    return bytes.fromhex("8221" "00" "01") + b"m" + body + b"\x00"


# Wrong in the message header: refused whatever the transport.
HEADER_GARBAGE = {
    "binary bad version": (bytes.fromhex("80020001") + b"\x00" * 12, "bad Thrift binary protocol version 0x80020001"),
    "binary unknown message type": (bytes.fromhex("80010005") + b"\x00" * 12, "unknown Thrift message type 5"),
    "binary negative name": (bytes.fromhex("80010001" "fffffff0"), "negative length"),
    "binary name not utf-8": (bytes.fromhex("80010001" "00000002" "c328" "00000000" "00"), "not valid UTF-8"),
    "compact bad version": (bytes.fromhex("8222") + b"\x00" * 4, "unsupported Thrift compact protocol version 2"),
    "compact unknown message type": (bytes.fromhex("82a1") + b"\x00" * 4, "unknown Thrift message type 5"),
    "compact long varint": (bytes.fromhex("8221") + b"\xff" * 6, "varint longer than 5 bytes"),
}
# Wrong in a call's struct: found by the walk of an unframed message; a framed one is not walked.
BODY_GARBAGE = {
    "binary unknown field type": (binary_struct_message(bytes.fromhex("07" "0001")), "unknown Thrift binary type id 7"),
    "binary negative string": (binary_struct_message(bytes.fromhex("0b" "0001" "ffffffff")), "negative length"),
    "binary negative list": (binary_struct_message(bytes.fromhex("0f" "0001" "08" "80000000")), "negative length"),
    "binary unknown element type": (binary_struct_message(bytes.fromhex("0f" "0001" "01" "00000002")), "type id 1 in a container"),
    "binary too deep": (binary_struct_message(bytes.fromhex("0f0001") + bytes.fromhex("0f00000001") * 70 + b"\x00" * 300), "nested deeper than 64"),
    "binary struct too deep": (binary_struct_message(bytes.fromhex("0c0001") * 70 + b"\x00" * 70), "nested deeper than 64"),
    "compact unknown field type": (compact_struct_message(b"\x1e"), "unknown Thrift compact type id 14"),
    "compact negative string": (compact_struct_message(bytes.fromhex("18" "ffffffff0f")), "does not fit an i32"),
    "compact field id out of range": (compact_struct_message(bytes.fromhex("08" "feff07") + b"\x00"), "does not fit an i16"),
    "compact overlong varint in a list": (compact_struct_message(bytes.fromhex("19" "35") + b"\xff" * 6 + b"\x01" * 3), "varint longer than 5 bytes"),
    "compact too deep": (compact_struct_message(bytes.fromhex("19") + b"\x19" * 70 + b"\x00" * 10), "nested deeper than 64"),
    "compact unknown element type": (compact_struct_message(bytes.fromhex("19" "2e")), "type id 14 in a container"),
}


def assert_refused(data: bytes, message: str, **options) -> None:
    buffer = bytearray(data)
    with pytest.raises(CodecError, match=message):
        ThriftCodec(options=options).decode(buffer, Metadata())
    assert buffer == data


@pytest.mark.parametrize("name", list(HEADER_GARBAGE))
@pytest.mark.parametrize("transport", ["buffered", "framed"])
def test_header_garbage_raises_codec_error(name, transport):
    data, message = HEADER_GARBAGE[name]
    assert_refused(framed(data) if transport == "framed" else data, message)


@pytest.mark.parametrize("name", list(BODY_GARBAGE))
def test_body_garbage_raises_codec_error_when_unframed_and_is_not_read_when_framed(name):
    data, message = BODY_GARBAGE[name]
    assert_refused(data, message)
    metadata = decode_one(framed(data))
    assert (metadata.operation_name, metadata.frame) == ("m", framed(data))


def test_neither_protocol_is_refused():
    assert_refused(b"GET / HTTP/1.1\r\n\r\n", "cannot detect the Thrift transport")


def test_framed_message_header_must_fit_its_frame_but_the_body_is_not_walked():
    with pytest.raises(CodecError, match="past the end of its frame"):
        decode_all(framed(BINARY_CALL[:10]))  # the name runs past the frame
    with pytest.raises(CodecError, match="frame length 0 is not positive"):
        decode_all(b"\x00\x00\x00\x00\x80", transport="framed")
    # A struct cut short, or followed by more bytes, is the frame's length all the same.
    for data in (BINARY_CALL[:-1], BINARY_CALL + b"\x00"):
        assert decode_one(framed(data)).frame == framed(data)


# -- caps on walking an unframed message ---------------------------------------------------------


def binary_list_of_empty_structs(count: int) -> bytes:
    return binary_struct_message(bytes.fromhex("0f0001" "0c") + struct.pack(">i", count) + b"\x00" * count)


def compact_list_of_empty_structs(count: int) -> bytes:
    return compact_struct_message(b"\x19" + bytes([0xFC]) + _varint(count) + b"\x00" * count)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


LISTS_OF_STRUCTS = {"binary": binary_list_of_empty_structs, "compact": compact_list_of_empty_structs}


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_container_size_cap_is_checked_on_the_containers_header(protocol):
    build = LISTS_OF_STRUCTS[protocol]
    assert decode_one(build(100), max_container_size=100).frame == build(100)
    message = build(101)
    header_only = message[: len(message) - 101 - 1]  # the list's header arrived, none of its elements
    assert_refused(header_only, r"container of 101 elements .* codec option max_container_size \(100\)", max_container_size=100)
    assert_refused(build(70_000), r"max_container_size \(65536\)")  # the default


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_elements_cap_counts_every_field_and_element_of_the_message(protocol):
    build = LISTS_OF_STRUCTS[protocol]
    # The list's field, then one step per struct: 1 + 99 fits 100.
    assert decode_one(build(99), max_elements=100).frame == build(99)
    assert_refused(build(100), r"more than 100 fields and container elements .*\(codec option max_elements\)", max_elements=100)
    # Many small lists, each under the container cap, are counted together.
    body = b"".join((bytes.fromhex("0f") + struct.pack(">h", i) + bytes.fromhex("0c00000030") + b"\x00" * 48) for i in range(1, 4))
    assert_refused(binary_struct_message(body), "codec option max_elements", max_elements=100, protocol="binary")
    assert decode_one(binary_struct_message(body), max_elements=147, protocol="binary")


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_elements_cap_holds_across_a_message_arriving_in_pieces(protocol):
    """The walk resumes where it stopped; what it spent before the pause still counts."""
    build = LISTS_OF_STRUCTS[protocol]
    for count, fits in ((99, True), (100, False)):
        data, codec, buffer = build(count), ThriftCodec(options={"max_elements": 100, "max_container_size": 1000}), bytearray()
        for start in range(0, len(data) - 20, 7):
            buffer += data[start : start + 7]
            assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
        buffer += data[len(buffer) :]
        if fits:
            assert codec.decode(buffer, Metadata()) is DecodeStatus.DONE
        else:
            with pytest.raises(CodecError, match="max_elements"):
                codec.decode(buffer, Metadata())


def test_nesting_cap_is_an_option():
    nested = binary_struct_message(bytes.fromhex("0c0001") * 9 + b"\x00" * 9)  # 10 levels with the message struct
    assert decode_one(nested, max_nesting_depth=10)
    assert_refused(nested, r"nested deeper than 9 levels \(codec option max_nesting_depth\)", max_nesting_depth=9)


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_framed_messages_are_not_walked_so_the_caps_do_not_apply(protocol):
    data = framed(LISTS_OF_STRUCTS[protocol](5000))
    metadata = decode_one(data, max_elements=1, max_container_size=1, max_nesting_depth=1)
    assert metadata.frame == data and metadata.body_size == len(data) - metadata.header_size


def test_numbers_are_stepped_over_whole_and_do_not_count():
    numbers = binary_struct_message(bytes.fromhex("0f0001" "08") + struct.pack(">i", 10_000) + bytes(40_000))
    assert decode_one(numbers, max_elements=1, max_container_size=1).frame == numbers


@pytest.mark.parametrize("bad", [0, -1, True, "64", 1.5])
@pytest.mark.parametrize("option", ["max_nesting_depth", "max_container_size", "max_elements"])
def test_bad_cap_options_are_refused(option, bad):
    with pytest.raises(ValueError, match=f"option {option}: .* is not a positive integer"):
        ThriftCodec(options={option: bad})


@pytest.mark.parametrize("protocol", ["binary", "compact"])
def test_large_containers_resume_where_they_stopped(protocol):
    # Varint lists (compact), lists of structs and maps of strings, cut at every 97th byte.
    payload = echo_thrift.Payload(
        numbers=[(-1) ** i * 7**i % (2**31) for i in range(300)],
        inners=[echo_thrift.Inner(id=i, label="l" * (i % 5)) for i in range(200)],
        counters={f"k{i}": -(2**40) * i for i in range(100)},
    )
    data = encode_message(Variant("buffered", protocol), "mirror", TMessageType.CALL, 1, Echo.mirror_args(payload=payload))
    codec, buffer = ThriftCodec(), bytearray()
    for start in range(0, len(data), 97):
        buffer += data[start : start + 97]
        metadata = Metadata()
        status = codec.decode(buffer, metadata)
    assert status is DecodeStatus.DONE and metadata.frame == data and buffer == b""
    # The next message on the same codec starts from scratch.
    assert decode_one(BINARY_CALL if protocol == "binary" else COMPACT_CALL, codec).request_id == 1


def test_empty_containers_may_carry_any_element_type():
    # Some writers send type 0 for empty containers: nothing is read, so nothing is checked.
    assert decode_one(binary_struct_message(bytes.fromhex("0f0001" "00" "00000000" "0d0002" "0000" "00000000")))
    assert decode_one(compact_struct_message(bytes.fromhex("19" "00" "1b" "00")))


# -- encode, on_error, heartbeat --------------------------------------------------------------


def test_encode_returns_the_frame_unchanged():
    metadata = decode_one(framed(BINARY_CALL))
    assert ThriftCodec().encode(metadata, {"x-route": "v2", "method": "other"}) == framed(BINARY_CALL)


def test_heartbeat_reply_is_not_supported():
    with pytest.raises(NotImplementedError, match="Thrift has no heartbeat"):
        ThriftCodec().heartbeat_reply(Metadata())


@pytest.mark.parametrize("variant", ALL_VARIANTS + [Variant("framed", "compact", True), Variant("buffered", "binary", True)], ids=lambda v: v.name)
@pytest.mark.parametrize("error_type", list(ErrorType), ids=lambda e: e.name)
def test_on_error_is_a_tapplicationexception_thriftpy2_reads(variant, error_type):
    codec = ThriftCodec()
    metadata = decode_one(encode_message(variant, "echo", TMessageType.CALL, 77, Echo.echo_args(s="q")), codec)
    reply = codec.on_error(metadata, Error(error_type, "something specific"))
    name, message_type, seqid, exception = read_exception_reply(variant, reply)
    assert (name, message_type, seqid) == ("echo", TMessageType.EXCEPTION, 77)  # bare name even when multiplexed
    assert exception.type == ERROR_CODES[error_type]
    assert exception.message == f"{error_type.name}: something specific"
    # The reply is itself a well-formed message for the response direction.
    decoded = decode_one(reply)
    assert (decoded.message_type, decoded.response_status, decoded.request_id) == (MessageType.ERROR, ResponseStatus.ERROR, 77)
    assert decoded.properties["exception_message"] == exception.message


def test_error_code_table():
    assert set(ERROR_CODES) == set(ErrorType)
    assert ERROR_CODES[ErrorType.ROUTE_NOT_FOUND] == TApplicationException.UNKNOWN_METHOD
    assert ERROR_CODES[ErrorType.BAD_RESPONSE] == TApplicationException.PROTOCOL_ERROR
    assert ERROR_CODES[ErrorType.TIMEOUT] == TApplicationException.INTERNAL_ERROR


def test_on_error_keeps_a_negative_seqid():
    metadata = decode_one(bytes.fromhex("8221" "feffffff0f" "01") + b"m" + b"\x00")
    reply = ThriftCodec().on_error(metadata, Error(ErrorType.TIMEOUT, "slow"))
    assert decode_one(reply).request_id == -2


def test_on_error_for_oneway_sends_nothing():
    metadata = decode_one(encode_message(Variant("framed", "binary"), "notify", TMessageType.ONEWAY, 0, Echo.notify_args(s="n")))
    assert ThriftCodec().on_error(metadata, Error(ErrorType.ROUTE_NOT_FOUND, "none")) == b""


def test_on_error_without_codec_properties_uses_the_configured_variant():
    metadata = Metadata()
    metadata.request_id = 5
    metadata.headers["method"] = "whoami"
    codec = ThriftCodec(options={"transport": "framed", "protocol": "compact"})
    _, _, seqid, exception = read_exception_reply(Variant("framed", "compact"), codec.on_error(metadata, Error(ErrorType.UNSPECIFIED, "")))
    assert (seqid, exception.message, exception.type) == (5, "UNSPECIFIED", TApplicationException.INTERNAL_ERROR)


# -- properties -------------------------------------------------------------------------------

i32s = st.integers(-(2**31), 2**31 - 1)
i64s = st.integers(-(2**63), 2**63 - 1)
texts = st.text(max_size=12)
inners = st.builds(echo_thrift.Inner, id=st.none() | i32s, label=st.none() | texts)
payloads = st.builds(
    echo_thrift.Payload,
    flag=st.none() | st.booleans(),
    small=st.none() | st.integers(-128, 127),
    short_number=st.none() | st.integers(-(2**15), 2**15 - 1),
    number=st.none() | i32s,
    big_number=st.none() | i64s,
    ratio=st.none() | st.floats(allow_nan=False),
    text=st.none() | texts,
    blob=st.none() | st.binary(max_size=20),
    numbers=st.none() | st.lists(i32s, max_size=20),
    tags=st.none() | st.lists(texts, max_size=4, unique=True),
    counters=st.none() | st.dictionaries(texts, i64s, max_size=4),
    inner=st.none() | inners,
    inners=st.none() | st.lists(inners, max_size=3),
    flags_by_id=st.none() | st.dictionaries(i32s, st.lists(st.booleans(), max_size=4), max_size=3),
    far_flag=st.none() | st.booleans(),
)
variants = st.builds(Variant, st.sampled_from(["framed", "buffered"]), st.sampled_from(["binary", "compact"]), st.booleans())


@st.composite
def messages(draw):
    """(variant, bytes, expected message type, expected status, method, seqid) from thriftpy2."""
    variant = draw(variants)
    seqid = draw(st.integers(0, 2**31 - 1))  # thriftpy2's compact writer cannot encode negatives
    kind = draw(st.sampled_from(["call", "oneway", "reply", "declared", "exception"]))
    if kind == "call":
        method, thrift_type, body, expected = "mirror", TMessageType.CALL, Echo.mirror_args(payload=draw(payloads)), (MessageType.REQUEST, ResponseStatus.OK)
    elif kind == "oneway":
        method, thrift_type, body, expected = "notify", TMessageType.ONEWAY, Echo.notify_args(s=draw(texts)), (MessageType.ONEWAY, ResponseStatus.OK)
    elif kind == "reply":
        method, thrift_type, body, expected = "mirror", TMessageType.REPLY, Echo.mirror_result(success=draw(payloads)), (MessageType.RESPONSE, ResponseStatus.OK)
    elif kind == "declared":
        error = echo_thrift.EchoError(message=draw(texts))
        method, thrift_type, body, expected = "fail", TMessageType.REPLY, Echo.fail_result(err=error), (MessageType.RESPONSE, ResponseStatus.ERROR)
    else:
        error = TApplicationException(draw(st.integers(0, 7)), draw(texts))
        method, thrift_type, body, expected = "fail", TMessageType.EXCEPTION, error, (MessageType.ERROR, ResponseStatus.ERROR)
    data = encode_message(variant, method, thrift_type, seqid, body)
    name = f"Echo:{method}" if variant.multiplexed and thrift_type in (TMessageType.CALL, TMessageType.ONEWAY) else method
    return variant, data, expected, name, seqid


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(), trailing=st.binary(max_size=8), chunk=st.integers(1, 64))
def test_round_trip_of_thriftpy2_messages(message, trailing, chunk):
    variant, data, (message_type, status), name, seqid = message
    metadata = Metadata()
    buffer = bytearray(data + trailing)
    assert ThriftCodec().decode(buffer, metadata) is DecodeStatus.DONE
    assert buffer == trailing  # consumed exactly the message
    assert metadata.frame == data
    assert (metadata.message_type, metadata.response_status) == (message_type, status)
    assert (metadata.operation_name, metadata.request_id) == (name, seqid)
    assert metadata.headers["method"] == name.rpartition(":")[2]
    assert metadata.properties["transport"] == variant.transport
    # The same bytes arriving in pieces decode to the same message on one codec.
    codec, buffer = ThriftCodec(), bytearray()
    for start in range(0, len(data), chunk):
        buffer += data[start : start + chunk]
        pieces = Metadata()
        status_now = codec.decode(buffer, pieces)
        assert status_now is (DecodeStatus.DONE if start + chunk >= len(data) else DecodeStatus.WAIT_FOR_DATA)
    assert pieces.frame == data and buffer == b""


def check_never_crashes(data: bytes, **options) -> None:
    codec = ThriftCodec(max_frame_size=4096, options=options)
    buffer = bytearray(data)
    for _ in range(len(data) + 1):
        before = bytes(buffer)
        try:
            status = codec.decode(buffer, Metadata())
        except CodecError:  # FrameTooLarge included
            assert buffer == before
            return
        if status is DecodeStatus.WAIT_FOR_DATA:
            assert buffer == before
            return
        assert len(buffer) < len(before)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), options=st.sampled_from([{}, {"protocol": "binary", "transport": "buffered"}, {"transport": "framed"}]))
def test_random_bytes_never_crash(data, options):
    check_never_crashes(data, **options)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(), cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
def test_truncated_and_corrupted_messages_never_crash(message, cut, flips):
    data = bytearray(message[1])
    for position, value in flips:
        data[position % len(data)] = value
    check_never_crashes(bytes(data[: cut % (len(data) + 1)]))
    check_never_crashes(bytes(data))
