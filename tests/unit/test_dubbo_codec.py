"""The Dubbo2/Hessian2 codec: byte-level conformance vectors, framing, mutation, local replies,
and property tests (round trips; hostile bytes only ever give CodecError or WAIT_FOR_DATA)."""

from __future__ import annotations

import importlib
import struct
from pathlib import Path

import pytest
from dubbo_ssl.codec.decoder import Response as SslReader
from dubbo_ssl.codec.encoder import Object as SslObject
from dubbo_ssl.codec.encoder import Request as SslRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metabridge.sdk.codec import CodecError, DecodeStatus, Error, ErrorType, FrameTooLarge, MessageType, Metadata, ResponseStatus
from metabridge.config.model import load
from metabridge.registry import load_codec_class, load_codecs

REPO_ROOT = Path(__file__).resolve().parents[2]
DubboCodec = load_codec_class("codecs/dubbo:DubboCodec", REPO_ROOT)
_PACKAGE = DubboCodec.__module__.rpartition(".")[0]
hessian2 = importlib.import_module(f"{_PACKAGE}.hessian2")
frames = importlib.import_module(f"{_PACKAGE}.frames")
DubboBodyError = importlib.import_module(_PACKAGE).DubboBodyError

MiB = 1024 * 1024


# -- hand-assembled Hessian2 (independent of the codec's writer) --------------------------------


def s(text: str) -> bytes:
    """A short ASCII string: length byte 0x00-0x1f, then the bytes."""
    raw = text.encode("ascii")
    assert len(raw) < 32
    return bytes([len(raw)]) + raw


def header(flag: int, status: int, request_id: int, body: bytes) -> bytes:
    return b"\xda\xbb" + bytes([flag, status]) + struct.pack(">q", request_id) + struct.pack(">i", len(body))


def request_frame(body: bytes, request_id: int = 42, flag: int = 0xC2) -> bytes:
    return header(flag, 0, request_id, body) + body


GREETER = "com.example.Greeter"
# dubbo version, path, version, method, descriptor, one String argument, attachments map.
REQUEST_BODY = (
    s("2.0.2")
    + s(GREETER)
    + s("1.0.0")
    + s("sayHello")
    + s("Ljava/lang/String;")
    + s("bob")
    + b"H"
    + s("path") + s(GREETER)
    + s("group") + s("g1")
    + s("X-Tag") + s("blue")
    + s("timeout") + b"\xcb\xb8"  # a non-string attachment (int 3000): not routable
    + b"Z"
)
REQUEST = request_frame(REQUEST_BODY)


def decode_one(data: bytes, codec=None) -> Metadata:
    codec = codec or DubboCodec()
    buffer = bytearray(data)
    metadata = Metadata()
    assert codec.decode(buffer, metadata) is DecodeStatus.DONE
    assert not buffer, "decode must consume exactly one frame"
    return metadata


# -- requests ------------------------------------------------------------------------------------


def test_request_vector_headers_and_properties():
    metadata = decode_one(REQUEST)
    assert metadata.message_type is MessageType.REQUEST
    assert metadata.request_id == 42
    assert metadata.operation_name == f"{GREETER}/sayHello"
    assert dict(metadata.headers) == {
        "interface": GREETER,
        "path": GREETER,
        "version": "1.0.0",
        "method": "sayHello",
        "group": "g1",
        "x-tag": "blue",
    }
    assert metadata.headers["X-TAG"] == "blue"
    assert metadata.header_size == 16 and metadata.body_size == len(REQUEST_BODY)
    assert metadata.frame == REQUEST
    assert metadata.properties["dubbo_version"] == "2.0.2"
    assert metadata.properties["parameter_types"] == "Ljava/lang/String;"


def test_oneway_request():
    metadata = decode_one(request_frame(REQUEST_BODY, flag=0x82))
    assert metadata.message_type is MessageType.ONEWAY


def test_attachments_override_body_fields_but_not_the_method():
    body = (
        s("2.0.2") + s("com.example.Impl") + b"N" + s("get") + s("")
        + b"H" + s("interface") + s(GREETER) + s("version") + s("2.0.0") + s("method") + s("spoofed") + b"Z"
    )
    metadata = decode_one(request_frame(body))
    assert metadata.headers["interface"] == GREETER
    assert metadata.headers["path"] == "com.example.Impl"
    assert metadata.headers["version"] == "2.0.0"
    assert metadata.headers["method"] == "get"
    assert metadata.operation_name == f"{GREETER}/get"


def test_request_without_version_or_attachments_map():
    body = s("2.0.2") + s(GREETER) + b"N" + s("ping") + s("")
    metadata = decode_one(request_frame(body))
    assert dict(metadata.headers) == {"interface": GREETER, "path": GREETER, "method": "ping"}
    assert metadata.properties["attachments_span"] == (len(body) + 16, len(body) + 16)


COMPLEX_ARGS = (
    # a java object: class definition (name, 2 fields) then an instance 0x60
    b"C" + s("com.example.User") + b"\x92" + s("name") + s("tags")
    + b"\x60" + s("ann") + b"\x7a" + s("a") + s("b")  # untyped compact list of 2
    # the same class again by number ('O' form), with a back-reference as a field
    + b"O\x90" + b"S\x00\x03abc" + b"\x51\x90"
    # a typed fixed list with int type ref, a variable untyped list, a typed map
    + b"V" + s("[int") + b"\x93" + b"\x91\xc9\x00\xd5\x00\x00"
    + b"W" + b"\x4e\x54\x46" + b"Z"
    + b"M" + s("java.util.TreeMap") + s("k") + b"L" + bytes(8) + b"Z"
    # binary: short, chunked ('A' chunk then final 'B'), doubles, dates, longs
    + b"\x23abc" + b"A\x00\x02xy" + b"B\x00\x01z"
    + b"\x5b\x5c\x5d\x05\x5e\x01\x00\x5f\x00\x00\x00\x01D" + bytes(8)
    + b"\x4a" + bytes(8) + b"\x4b" + bytes(4)
    + b"\xe0\xf8\x01\x3c\x00\x01\x59" + bytes(4)
    # a chunked string: 'R' chunk of 2 units (one 2-byte char), then the final short chunk
    + b"R\x00\x02\xc3\xa9z" + b"\x01q"
)
COMPLEX_DESCRIPTOR = (
    "Lcom/example/User;Lcom/example/User;[ILjava/util/List;Ljava/util/Map;[B[BDDDDDDLjava/util/Date;Ljava/util/Date;JJJJLjava/lang/String;"
)


def test_request_with_complex_arguments_is_skipped_to_the_attachments():
    descriptor = bytes([0x30, len(COMPLEX_DESCRIPTOR)]) + COMPLEX_DESCRIPTOR.encode()  # a 32-1023 char string
    body = s("2.0.2") + s(GREETER) + s("1.0.0") + s("save") + descriptor + COMPLEX_ARGS
    body += b"H" + s("trace") + s("t-1") + b"Z"
    metadata = decode_one(request_frame(body))
    assert metadata.headers["trace"] == "t-1"
    assert metadata.headers["method"] == "save"


def test_chunked_and_non_ascii_attachment_strings_are_read():
    long_value = "x" * 40
    body = (
        s("2.0.2") + s(GREETER) + b"N" + s("m") + s("")
        + b"H"
        + s("chunked") + b"R\x00\x03abc" + b"R\x00\x01d" + b"\x02ef"
        + s("medium") + b"\x30\x28" + long_value.encode()
        + s("accent") + b"\x02\xc3\xa9\xe2\x82\xac"  # 'é€': 2 units, 5 bytes
        + s("emoji") + b"\x02\xed\xa0\xbd\xed\xb8\x80"  # U+1F600 as Java writes it: two 3-byte surrogate halves
        + s("emoji4") + b"\x02\xf0\x9f\x98\x80"  # the same as plain 4-byte UTF-8 (two units)
        + b"Z"
    )
    headers = decode_one(request_frame(body)).headers
    assert headers["chunked"] == "abcdef"
    assert headers["medium"] == long_value
    assert headers["accent"] == "é€"
    assert headers["emoji"] == "\U0001f600"
    assert headers["emoji4"] == "\U0001f600"


def test_typed_attachments_map_and_non_string_keys():
    body = (
        s("2.0.2") + s(GREETER) + b"N" + s("m") + s("")
        + b"M" + s("java.util.HashMap") + b"\x91" + s("int-key") + s("k") + s("v") + b"Z"
    )
    assert dict(decode_one(request_frame(body)).headers)["k"] == "v"


@pytest.mark.parametrize(
    "body, reason",
    [
        (s("2.0.2") + b"\x91" + s("1.0.0") + s("m") + s(""), "path not a string"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("Q"), "bad descriptor"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("I"), "argument missing"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("I") + b"\x40", "reserved tag"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("") + b"H" + s("k"), "map not terminated"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("") + b"\x91", "attachments not a map"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("I") + b"\x60", "undefined class"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("") + b"M", "typed map without its type"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("") + b"M\xc8", "typed map with a cut type number"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("I") + b"V\x01a", "list without its length"),
        (s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("I") + b"C\x01A", "class definition cut short"),
        (s("2.0.2") + b"\x05ab", "string shorter than declared"),
        (s("2.0.2") + b"\x02\xff\xff", "invalid UTF-8"),
    ],
)
def test_malformed_request_body_is_a_codec_error_with_the_request_id(body, reason):
    buffer = bytearray(request_frame(body, request_id=9) + REQUEST)
    with pytest.raises(DubboBodyError) as info:
        DubboCodec().decode(buffer, Metadata())
    assert isinstance(info.value, CodecError)
    assert info.value.request_id == 9 and info.value.is_request
    assert bytes(buffer) == REQUEST, "the bad frame is consumed so the stream stays in step"


# -- responses -----------------------------------------------------------------------------------


def response_frame(body: bytes, status: int = 20, request_id: int = 42, flag: int = 0x02) -> bytes:
    return header(flag, status, request_id, body) + body


EXCEPTION = b"C" + s("java.lang.RuntimeException") + b"\x91" + s("detailMessage") + b"\x60" + s("boom")


@pytest.mark.parametrize(
    "body, message_type, status",
    [
        (b"\x91" + s("hello"), MessageType.RESPONSE, ResponseStatus.OK),
        (b"\x92", MessageType.RESPONSE, ResponseStatus.OK),
        (b"\x90" + EXCEPTION, MessageType.ERROR, ResponseStatus.ERROR),
        (b"\x93" + EXCEPTION + b"H" + s("a") + s("b") + b"Z", MessageType.ERROR, ResponseStatus.ERROR),
        (b"\x94" + s("hello") + b"H" + s("a") + s("b") + b"Z", MessageType.RESPONSE, ResponseStatus.OK),
        (b"\x95" + b"H" + s("a") + s("b") + b"Z", MessageType.RESPONSE, ResponseStatus.OK),
    ],
    ids=["value", "null", "exception", "exception+attachments", "value+attachments", "null+attachments"],
)
def test_response_result_types(body, message_type, status):
    metadata = decode_one(response_frame(body, request_id=77))
    assert metadata.request_id == 77
    assert metadata.message_type is message_type
    assert metadata.response_status is status
    assert metadata.properties["result_type"] == body[0] - 0x90


@pytest.mark.parametrize("status", [30, 31, 40, 50, 60, 70, 80, 90, 100])
def test_error_status_responses(status):
    metadata = decode_one(response_frame(s("it failed"), status=status, request_id=5))
    assert metadata.message_type is MessageType.ERROR
    assert metadata.response_status is ResponseStatus.ERROR
    assert metadata.request_id == 5
    assert metadata.properties["status"] == status
    assert metadata.properties["error_message"] == "it failed"


def test_unknown_result_type_is_a_body_error_with_the_id():
    with pytest.raises(DubboBodyError) as info:
        DubboCodec().decode(bytearray(response_frame(b"\x99", request_id=3)), Metadata())
    assert info.value.request_id == 3 and not info.value.is_request


# -- heartbeats ----------------------------------------------------------------------------------

HEARTBEAT_REQUEST = bytes.fromhex("dabbe200" "0000000000000011" "00000001" "4e")
HEARTBEAT_RESPONSE = bytes.fromhex("dabb2214" "0000000000000011" "00000001" "4e")


def test_heartbeat_request_and_reply():
    codec = DubboCodec()
    metadata = decode_one(HEARTBEAT_REQUEST, codec)
    assert metadata.message_type is MessageType.HEARTBEAT
    assert metadata.request_id == 0x11
    assert codec.heartbeat_reply(metadata) == HEARTBEAT_RESPONSE


def test_heartbeat_responses_are_heartbeats_whatever_their_status():
    assert decode_one(HEARTBEAT_RESPONSE).message_type is MessageType.HEARTBEAT
    # dubbo-py answers heartbeats with status 0; a read-only event carries "R" instead of null.
    assert decode_one(bytes.fromhex("dabb2200000000000000000100000001") + b"N").message_type is MessageType.HEARTBEAT
    assert decode_one(header(0xA2, 0, 2, s("R")) + s("R")).message_type is MessageType.HEARTBEAT


# -- local error replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error_type, status",
    [
        (ErrorType.ROUTE_NOT_FOUND, 60),
        (ErrorType.CLUSTER_NOT_FOUND, 60),
        (ErrorType.NO_HEALTHY_UPSTREAM, 80),
        (ErrorType.BAD_RESPONSE, 50),
        (ErrorType.OVER_LIMIT, 100),
        (ErrorType.TIMEOUT, 31),
        (ErrorType.UNSPECIFIED, 80),
    ],
)
def test_on_error_frames(error_type, status):
    codec = DubboCodec()
    request = decode_one(REQUEST, codec)
    reply = codec.on_error(request, Error(error_type, "no route for sayHello"))
    assert reply == bytes.fromhex("dabb02") + bytes([status]) + struct.pack(">qi", 42, 22) + s("no route for sayHello")
    metadata = decode_one(reply, codec)
    assert metadata.message_type is MessageType.ERROR
    assert metadata.request_id == 42
    assert metadata.properties["error_message"] == "no route for sayHello"


def test_on_error_with_a_long_non_ascii_message():
    message = "délai dépassé " * 100
    reply = DubboCodec().on_error(decode_one(REQUEST), Error(ErrorType.TIMEOUT, message))
    assert reply[3] == 31
    assert decode_one(reply).properties["error_message"] == message


# -- framing ---------------------------------------------------------------------------------------


def test_every_partial_prefix_waits_and_consumes_nothing():
    codec = DubboCodec()
    for size in range(len(REQUEST)):
        buffer = bytearray(REQUEST[:size])
        assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
        assert buffer == REQUEST[:size]


def test_several_frames_in_one_buffer():
    codec = DubboCodec()
    reply = response_frame(b"\x91" + s("hi"), request_id=42)
    buffer = bytearray(REQUEST + HEARTBEAT_REQUEST + reply + REQUEST[:10])
    kinds = []
    for _ in range(3):
        metadata = Metadata()
        assert codec.decode(buffer, metadata) is DecodeStatus.DONE
        kinds.append(metadata.message_type)
    assert kinds == [MessageType.REQUEST, MessageType.HEARTBEAT, MessageType.RESPONSE]
    assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
    assert buffer == REQUEST[:10]


def test_oversized_body_is_rejected_from_the_header_alone():
    announced = header(0xC2, 0, 1, b"")[:12] + struct.pack(">i", 8 * MiB + 1)
    with pytest.raises(FrameTooLarge, match="max_body_size"):
        DubboCodec(max_frame_size=64 * MiB).decode(bytearray(announced), Metadata())
    small = header(0xC2, 0, 1, b"")[:12] + struct.pack(">i", 1000)
    with pytest.raises(FrameTooLarge, match="max_body_size 999"):
        DubboCodec(options={"max_body_size": 999}).decode(bytearray(small), Metadata())
    with pytest.raises(FrameTooLarge, match="max_frame_size"):
        DubboCodec(max_frame_size=1015).decode(bytearray(small), Metadata())
    assert DubboCodec(options={"max_body_size": "1KiB"}).max_body_size == 1024


def test_bad_max_body_size_option():
    for bad in ("lots", 0, -5, True):
        with pytest.raises(ValueError, match="max_body_size"):
            DubboCodec(options={"max_body_size": bad})


def test_bad_magic_unsupported_serialization_and_negative_length():
    with pytest.raises(CodecError, match="magic"):
        DubboCodec().decode(bytearray(b"ls\r\n"), Metadata())
    with pytest.raises(CodecError, match="magic"):
        DubboCodec().decode(bytearray(b"\xda\xbc"), Metadata())
    fastjson = bytearray(REQUEST)
    fastjson[2] = 0xC6
    with pytest.raises(CodecError, match="serialization id 6 .fastjson."):
        DubboCodec().decode(fastjson, Metadata())
    with pytest.raises(CodecError, match="negative"):
        DubboCodec().decode(bytearray(REQUEST[:12] + b"\xff\xff\xff\xff"), Metadata())


# -- mutation --------------------------------------------------------------------------------------


def test_empty_mutation_returns_the_frame_itself():
    codec = DubboCodec()
    metadata = decode_one(REQUEST, codec)
    assert codec.encode(metadata, {}) is metadata.frame


def test_mutation_adds_and_replaces_attachments():
    codec = DubboCodec()
    metadata = decode_one(REQUEST, codec)
    out = codec.encode(metadata, {"x-tag": "green", "x-routed-by": "metabridge", "trace": "é-1"})
    assert struct.unpack(">i", out[12:16])[0] == len(out) - 16
    assert out[:12] == REQUEST[:12]
    again = decode_one(out, codec)
    assert dict(again.headers) == {
        "interface": GREETER,
        "path": GREETER,
        "version": "1.0.0",
        "method": "sayHello",
        "group": "g1",
        "x-tag": "green",
        "x-routed-by": "metabridge",
        "trace": "é-1",
    }
    # The replaced entry keeps its original key spelling and place; the int attachment survives.
    body = out[16:]
    assert body.index(s("X-Tag") + s("green")) < body.index(s("timeout") + b"\xcb\xb8") < body.index(s("x-routed-by"))


@pytest.mark.parametrize(
    "attachments",
    [b"", b"N", b"M" + s("java.util.HashMap") + s("k") + s("v") + b"Z"],
    ids=["no map", "null map", "typed map"],
)
def test_mutation_when_the_map_is_missing_null_or_typed(attachments):
    body = s("2.0.2") + s(GREETER) + s("1.0.0") + s("m") + s("I") + b"\x95" + attachments
    codec = DubboCodec()
    out = codec.encode(decode_one(request_frame(body, flag=0x82), codec), {"added": "yes"})
    again = decode_one(out, codec)
    assert again.message_type is MessageType.ONEWAY
    assert again.headers["added"] == "yes"
    assert ("k" in again.headers) == attachments.startswith(b"M")


def test_response_mutation_rewrites_response_attachments_only():
    codec = DubboCodec()
    with_attachments = decode_one(response_frame(b"\x94" + EXCEPTION[:0] + s("hello") + b"H" + s("a") + s("b") + b"Z"), codec)
    out = codec.encode(with_attachments, {"a": "c", "served-by": "v2"})
    assert out[16:] == b"\x94" + s("hello") + b"H" + s("a") + s("c") + s("served-by") + s("v2") + b"Z"
    exception = decode_one(response_frame(b"\x93" + EXCEPTION + b"H" + b"Z"), codec)
    assert codec.encode(exception, {"k": "v"})[16:] == b"\x93" + EXCEPTION + b"H" + s("k") + s("v") + b"Z"
    plain = decode_one(response_frame(b"\x91" + s("hello")), codec)
    assert codec.encode(plain, {"k": "v"}) is plain.frame
    error = decode_one(response_frame(s("nope"), status=70), codec)
    assert codec.encode(error, {"k": "v"}) is error.frame
    heartbeat = decode_one(HEARTBEAT_REQUEST, codec)
    assert codec.encode(heartbeat, {"k": "v"}) is heartbeat.frame


# -- mutation of attachments that use what the arguments (or the result) defined ---------------------
#
# Hessian2 numbers class definitions, type names and object slots per body, so an attachment value
# may be an object of a class the arguments defined (0x60), a list naming its type by the number of
# one the arguments wrote, or a back-reference to an argument object (Q).

# Written by dubbo-ssl-python 0.9.6's request encoder (one Hessian2 writer for the whole body, as
# Java's Hessian2Output is): save(User{name: ann, age: 3}, [1, 2, 3]) with attachments owner =
# User{name: bob, age: 4} (class #0, defined by the first argument) and ids = [7, 8] (type '[int'
# by number, written by the second); see test_peer_vectors_are_what_the_peer_writes.
PEER_CROSSING_REQUEST_BODY = bytes.fromhex(
    "05322e302e3213636f6d2e6578616d706c652e4772656574657205312e302e300473617665144c636f6d2f6578616d70"
    "6c652f557365723b5b494310636f6d2e6578616d706c652e5573657292046e616d65036167656003616e6e9373045b69"
    "6e7491929348047061746813636f6d2e6578616d706c652e4772656574657209696e7465726661636513636f6d2e6578"
    "616d706c652e477265657465720776657273696f6e05312e302e300567726f7570026731056f776e65726003626f6294"
    "036964737290979805782d74616704626c75655a"
)
# The same writer for an OK response with attachments (result type 4): the value User{name: ann,
# ids: [1, 2]}, then attachments owner = User{name: bob, ids: [7, 8]} (class #0 and type '[int' by
# number, both defined by the value) and x-tag = blue.
PEER_CROSSING_RESPONSE_BODY = bytes.fromhex(
    "944310636f6d2e6578616d706c652e5573657292046e616d65036964736003616e6e72045b696e74919248056f776e65"
    "726003626f627290979805782d74616704626c75655a"
)
# Hand-built, with the forms that writer does not use: a class by number ('O'), a typed list
# naming its type by number, and back-references. Object slots: #0 ann, #1 her tags list, #2 the
# map argument, #3 cat, #4 cat's tags, #5 the attachments map, #6 bob, #7 bob's tags.
HAND_CROSSING_REQUEST_BODY = (
    s("2.0.2") + s(GREETER) + s("1.0.0") + s("save") + s("Lcom/example/U;Ljava/util/Map;")
    + b"C" + s("com.example.U") + b"\x92" + s("name") + s("tags")
    + b"\x60" + s("ann") + b"V" + s("[string") + b"\x91" + s("a")
    + b"H" + s("k") + b"O\x90" + s("cat") + b"\x70\x90" + b"Z"
    + b"H"
    + s("owner") + b"\x60" + s("bob") + b"\x71\x90" + s("b")  # class #0, type #0 from the arguments
    + s("same") + b"\x51\x90"  # the first argument itself
    + s("x-tag") + s("blue")
    + b"Z"
)
# An exception with attachments (result type 3): the cause is an object of the exception's class,
# and "again" refers back to the exception (slot #0; the map is #1, the cause #2).
HAND_CROSSING_RESPONSE_BODY = (
    b"\x93" + b"C" + s("java.lang.RuntimeException") + b"\x91" + s("detailMessage") + b"\x60" + s("boom")
    + b"H" + s("cause") + b"\x60" + s("inner") + s("again") + b"\x51\x90" + s("x-tag") + s("blue") + b"Z"
)
CROSSING_FRAMES = {
    "peer request": request_frame(PEER_CROSSING_REQUEST_BODY),
    "peer response": response_frame(PEER_CROSSING_RESPONSE_BODY),
    "hand request": request_frame(HAND_CROSSING_REQUEST_BODY),
    "hand response": response_frame(HAND_CROSSING_RESPONSE_BODY),
}


def read_body_independently(frame: bytes) -> list:
    """Every value of the frame's body as dubbo-ssl-python's Hessian2 reader reads them (it keeps
    class definitions, type names and object slots across the body, as Java does)."""
    reader = SslReader(bytearray(frame[16:]))
    values = []
    while reader.length():
        values.append(reader.read_next())
    return values


def test_peer_vectors_are_what_the_peer_writes():
    request = SslRequest(
        {
            "dubbo_version": "2.0.2",
            "path": GREETER,
            "version": "1.0.0",
            "method": "save",
            "group": "g1",
            "arguments": [SslObject("com.example.User", {"name": "ann", "age": 3}), [1, 2, 3]],
            "context": {"owner": SslObject("com.example.User", {"name": "bob", "age": 4}), "ids": [7, 8], "x-tag": "blue"},
        }
    )
    assert bytes(request.encode())[16:] == PEER_CROSSING_REQUEST_BODY
    write = SslRequest({})._encode_single_value  # the same writer, for a response body
    body = [0x94] + write(SslObject("com.example.User", {"name": "ann", "ids": [1, 2]})) + [0x48]
    body += write("owner") + write(SslObject("com.example.User", {"name": "bob", "ids": [7, 8]})) + write("x-tag") + write("blue") + [0x5A]
    assert bytes(b & 0xFF for b in body) == PEER_CROSSING_RESPONSE_BODY


@pytest.mark.parametrize("frame", list(CROSSING_FRAMES.values()), ids=list(CROSSING_FRAMES))
def test_mutation_round_trips_attachments_that_use_definitions_from_before_them(frame):
    codec = DubboCodec()
    first = decode_one(frame, codec)
    mutation = {"X-TAG": "green", "x-routed-by": "metabridge"}
    out = codec.encode(first, mutation)
    again = decode_one(out, codec)
    start = first.properties["attachments_span"][0]
    assert out[16:start] == frame[16:start], "arguments (or result) are copied byte for byte"
    before, after = read_body_independently(frame), read_body_independently(out)
    assert after[:-1] == before[:-1]
    # The replaced entry keeps its key's spelling; object and list values are carried intact.
    assert after[-1] == {**before[-1], "x-tag": "green", "x-routed-by": "metabridge"}
    assert any(isinstance(value, dict) for value in after[-1].values())
    if first.message_type is MessageType.REQUEST:
        assert again.headers["x-tag"] == "green" and again.headers["x-routed-by"] == "metabridge"
        assert dict(again.headers) == {**dict(first.headers), "x-tag": "green", "x-routed-by": "metabridge"}
    # The mutated frame can itself be mutated (its attachments are read again in context).
    twice = codec.encode(again, {"x-tag": "red"})
    assert read_body_independently(twice)[-1]["x-tag"] == "red"


def test_mutation_of_repeated_requests_splices_at_each_frames_own_offsets():
    """A connection's second request with the same attachments bytes reuses the first one's
    parse; its arguments are longer, so the map sits further on: the rewrite must follow it."""
    codec = DubboCodec()
    short = frames.build_request(1, GREETER, "echo", ["a"], attachments={"x-tag": "blue", "k": "v"})
    longer = frames.build_request(2, GREETER, "echo", ["a" * 40], attachments={"x-tag": "blue", "k": "v"})
    decode_one(short, codec)
    metadata = decode_one(longer, codec)
    again = decode_one(codec.encode(metadata, {"x-tag": "green"}), DubboCodec())
    assert again.headers["x-tag"] == "green" and again.headers["k"] == "v"
    assert read_body_independently(codec.encode(metadata, {"x-tag": "green"}))[5] == "a" * 40


# -- caps on the work of stepping over a body ------------------------------------------------------


def request_with_arguments(*arguments: bytes, attachments: bytes = b"HZ", request_id: int = 7) -> bytes:
    body = s("2.0.2") + s(GREETER) + s("1.0.0") + s("save") + s("LA;" * len(arguments)) + b"".join(arguments) + attachments
    return request_frame(body, request_id=request_id)


def list_header(count: int) -> bytes:
    return b"X" + (bytes([0x90 + count]) if count <= 0x2F else b"I" + struct.pack(">i", count))


def nulls(count: int) -> bytes:
    return list_header(count) + b"N" * count


def assert_over_limit(frame: bytes, message: str, **options) -> None:
    buffer = bytearray(frame + REQUEST)
    with pytest.raises(DubboBodyError, match=f"request 7 is over a limit: .*{message}.*; raise it if such requests are expected") as info:
        DubboCodec(options=options).decode(buffer, Metadata())
    assert info.value.request_id == 7 and info.value.is_request
    assert bytes(buffer) == REQUEST, "the frame is consumed: the stream stays in step"


def test_values_cap_counts_every_value_stepped_over():
    # A list of 8 nulls is 9 values; with the map's string pair, 11 in all.
    frame = request_with_arguments(nulls(8), attachments=b"H" + s("k") + s("v") + b"Z")
    assert decode_one(frame, DubboCodec(options={"max_elements": 11})).headers["k"] == "v"
    assert_over_limit(frame, r"more than 10 Hessian2 values to step over \(codec option max_elements\)", max_elements=10)


def test_values_cap_counts_string_arguments_stepped_over_without_a_reader():
    # Three plain string arguments, then a list of 2 nulls (3 values) and the map's pair: 8 in all.
    frame = request_with_arguments(s("a"), s("b"), s("c"), nulls(2), attachments=b"H" + s("k") + s("v") + b"Z")
    assert decode_one(frame, DubboCodec(options={"max_elements": 8})).headers["k"] == "v"
    assert_over_limit(frame, r"more than 7 Hessian2 values", max_elements=7)
    assert_over_limit(frame, r"more than 2 Hessian2 values", max_elements=2)  # within the strings
    only_strings = request_with_arguments(s("a"), s("b"), s("c"))
    assert decode_one(only_strings, DubboCodec(options={"max_elements": 3}))
    assert_over_limit(only_strings, r"more than 2 Hessian2 values", max_elements=2)


def test_skip_plain_strings_stops_at_other_values_the_budget_and_the_end():
    medium = hessian2.encode_string("x" * 100)  # the medium form, as the benchmark's argument
    data = s("a") + medium + b"N" + s("b")
    after_two = 2 + len(medium)
    assert hessian2.skip_plain_strings(data, 0, 5, 100) == (after_two, 2)  # stops at the null
    assert hessian2.skip_plain_strings(data, 0, 1, 100) == (2, 1)  # the count
    assert hessian2.skip_plain_strings(data, 0, 5, 1) == (2, 1)  # the budget
    assert hessian2.skip_plain_strings(data, after_two + 1, 5, 100) == (len(data), 1)  # the end
    non_ascii = hessian2.encode_string("\u00e9t\u00e9")
    assert hessian2.skip_plain_strings(non_ascii, 0, 1, 100) == (0, 0)  # left to the Reader
    cut = medium[:50]
    assert hessian2.skip_plain_strings(cut, 0, 1, 100) == (0, 0)  # a truncated one too
    reader = hessian2.Reader(data, after_two, max_elements=3, spent=2)
    reader.skip()  # the third value of three
    with pytest.raises(hessian2.HessianLimitError, match="more than 3 Hessian2 values"):
        reader.skip()


def test_values_cap_refuses_a_list_from_its_announced_length():
    announced = request_with_arguments(list_header(1_000_000))  # no elements follow: none are needed to refuse it
    assert_over_limit(announced, r"more than 1000 Hessian2 values", max_elements=1000)
    assert_over_limit(request_with_arguments(nulls(70_000)), r"more than 65536 .*max_elements")  # the default


def test_values_cap_covers_objects_and_their_fields():
    objects = b"C" + s("A") + b"\x92" + s("a") + s("b") + b"\x60NN" + b"\x60NN"  # 2 objects of 2 fields: 6 values
    assert decode_one(request_with_arguments(objects[:-3], objects[-3:]), DubboCodec(options={"max_elements": 6}))
    assert_over_limit(request_with_arguments(objects[:-3], objects[-3:]), r"more than 5 .*max_elements", max_elements=5)


def test_nesting_cap():
    def nested(depth: int) -> bytes:
        return b"\x79" * depth + b"N"  # lists of one element, ``depth`` open at once

    assert decode_one(request_with_arguments(nested(128)))  # the default
    assert_over_limit(request_with_arguments(nested(129)), r"nested deeper than 128 levels .*max_nesting_depth")
    assert_over_limit(request_with_arguments(nested(4)), r"nested deeper than 3 levels .*max_nesting_depth", max_nesting_depth=3)


def test_attachments_cap():
    entries = b"".join(s(f"k{i}") + s("v") for i in range(5))
    frame = request_with_arguments(attachments=b"H" + entries + b"Z")
    assert len(decode_one(frame, DubboCodec(options={"max_attachments": 5})).headers) == 9
    assert_over_limit(frame, r"more than 4 attachments \(codec option max_attachments\)", max_attachments=4)


def test_response_mutation_over_a_cap_forwards_the_response_as_it_came():
    response = response_frame(b"\x94" + nulls(20) + b"H" + s("a") + s("b") + b"Z")
    codec = DubboCodec(options={"max_elements": 10})
    metadata = decode_one(response, codec)  # decoding a response steps over nothing
    assert codec.encode(metadata, {"k": "v"}) is metadata.frame
    unlimited = DubboCodec()
    assert read_body_independently(unlimited.encode(decode_one(response, unlimited), {"k": "v"}))[-1] == {"a": "b", "k": "v"}


@pytest.mark.parametrize("bad", [0, -3, True, "100", 2.5])
@pytest.mark.parametrize("option", ["max_elements", "max_nesting_depth", "max_attachments"])
def test_bad_cap_options_are_refused(option, bad):
    with pytest.raises(ValueError, match=f"dubbo codec option {option}: .* is not a positive integer"):
        DubboCodec(options={option: bad})


# -- the codec's own writer against the reader -----------------------------------------------------


def test_long_strings_are_chunked_like_java():
    text = "ab" * 20000 + "é"
    encoded = hessian2.encode_string(text)
    assert encoded[:3] == b"R\x80\x00"  # a full 32768-unit chunk first
    reader = hessian2.Reader(encoded)
    assert reader.read_string() == text and reader.at_end()
    encoded = hessian2.encode_string("\U0001f600")
    assert encoded == b"\x02\xed\xa0\xbd\xed\xb8\x80"


def test_deep_nesting_does_not_recurse():
    depth = 100_000
    nested = b"\x79" * depth + b"N"
    reader = hessian2.Reader(nested)
    reader.skip()
    assert reader.at_end()


def test_example_config_loads_with_the_dubbo_codec():
    config = load(REPO_ROOT / "examples" / "dubbo.yaml")
    listener = config.listener("dubbo")
    assert listener.port == 10200 and listener.codec == "dubbo"
    assert {c.name for r in listener.routes for c in r.clusters} == {"dubbo-v1", "dubbo-v2"}
    assert any(r.request_mutation for r in listener.routes)
    assert [(e.address, e.port) for c in ("dubbo-v1", "dubbo-v2") for e in config.clusters[c].endpoints] == [
        ("127.0.0.1", 10201),
        ("127.0.0.1", 10202),
    ]
    codec_class = load_codecs(config)["dubbo"]
    assert codec_class.name == "dubbo"
    assert codec_class(options=config.codecs["dubbo"].options).max_body_size == 8 * MiB


# -- properties ------------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=30)
attachment_keys = names.filter(lambda k: k not in {"interface", "path", "version", "method"})
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(hessian2.Long),
    st.floats(allow_nan=True),
    texts,
    st.binary(max_size=1100),
    st.integers(min_value=-(2**62), max_value=2**62).map(hessian2.Date),
    st.integers(min_value=0, max_value=20).map(hessian2.Ref),
)
class_names = st.sampled_from(["com.example.A", "com.example.B", "java.lang.Exception"])


def _containers(children):
    return st.one_of(
        st.lists(children, max_size=10),
        st.dictionaries(st.one_of(texts, st.integers(min_value=-(2**63), max_value=2**63 - 1)), children, max_size=6),
        st.builds(hessian2.TypedList, class_names, st.lists(children, max_size=10).map(tuple), st.booleans()),
        st.builds(hessian2.TypedMap, class_names, st.lists(st.tuples(texts, children), max_size=5).map(tuple)),
        st.builds(
            hessian2.JavaObject,
            class_names,
            st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), children), max_size=3, unique_by=lambda f: f[0]).map(tuple),
        ),
    )


# deferred: keeps the strategy's repr short (hypothesis warns about huge reprs otherwise)
values = st.deferred(lambda: st.recursive(scalars, _containers, max_leaves=25))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(items=st.lists(values, max_size=4))
def test_skip_steps_over_exactly_one_value_at_a_time(items):
    writer = hessian2.Writer()
    for item in items:
        writer.write(item)
    data = writer.getvalue() + b"\x91"
    reader = hessian2.Reader(data)
    for _ in items:
        reader.skip()
    assert reader.read_int() == 1 and reader.at_end()


@FAST
@given(
    request_id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    interface=names,
    method=names,
    version=st.one_of(st.none(), names),
    attachments=st.dictionaries(attachment_keys, texts, max_size=6),
    args=st.lists(values, max_size=4),
    twoway=st.booleans(),
    mutation=st.dictionaries(attachment_keys, texts, max_size=3),
)
def test_request_round_trip_and_mutation(request_id, interface, method, version, attachments, args, twoway, mutation):
    frame = frames.build_request(request_id, interface, method, args, version=version, attachments=attachments, twoway=twoway)
    codec = DubboCodec(max_frame_size=64 * MiB)
    metadata = decode_one(frame, codec)
    expected = {"interface": interface, "path": interface, "method": method, **({"version": version} if version else {}), **attachments}
    assert dict(metadata.headers) == expected
    assert metadata.request_id == request_id
    assert metadata.message_type is (MessageType.REQUEST if twoway else MessageType.ONEWAY)
    assert metadata.operation_name == f"{interface}/{method}"

    mutated = decode_one(codec.encode(metadata, mutation), codec)
    assert dict(mutated.headers) == {**expected, **mutation}
    assert mutated.request_id == request_id
    assert mutated.body_size == len(mutated.frame) - 16


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_codec_errors(data):
    for start in (b"", b"\xda\xbb"):
        buffer = bytearray(start + data)
        before = bytes(buffer)
        try:
            status = DubboCodec().decode(buffer, Metadata())
        except CodecError:
            continue
        if status is DecodeStatus.WAIT_FOR_DATA:
            assert bytes(buffer) == before


@FAST
@given(flag=st.sampled_from([0xC2, 0x82, 0xE2, 0x02, 0x22]), status=st.sampled_from([0, 20, 70]), body=st.binary(max_size=80))
def test_random_bodies_behind_a_valid_header_decode_or_raise_codec_error(flag, status, body):
    try:
        decode_one(header(flag, status, 1, body) + body)
    except CodecError:
        pass


@FAST
@given(st.data())
def test_truncated_and_corrupted_real_frames(data):
    frame = frames.build_request(3, GREETER, "save", data.draw(st.lists(values, max_size=3)), attachments={"k": "v"})
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    buffer = bytearray(frame[:cut])
    assert DubboCodec(max_frame_size=64 * MiB).decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
    assert buffer == frame[:cut]
    # Flip one body byte: the frame still frames, and decoding it gives metadata or CodecError.
    position = data.draw(st.integers(min_value=16, max_value=len(frame) - 1))
    corrupted = bytearray(frame)
    corrupted[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        decode_one(bytes(corrupted), DubboCodec(max_frame_size=64 * MiB))
    except CodecError:
        pass


def _decoded(metadata: Metadata) -> tuple:
    return (dict(metadata.headers), metadata.operation_name, metadata.request_id, metadata.properties)


@FAST
@given(
    st.lists(
        st.tuples(
            st.sampled_from([GREETER, "com.example.Other"]),
            st.sampled_from(["sayHello", "bye"]),
            st.sampled_from([{}, {"group": "g1"}, {"group": "g2"}, {"group": "g2", "X-Tag": "blue"}]),  # g1/g2: same length
            st.lists(values, max_size=2),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(min_value=0, max_value=7),
)
def test_a_connection_decodes_repeated_requests_as_a_fresh_codec_would(requests, mixed_in):
    """One codec per connection reuses the parse of repeated body fields and attachments: the
    result must be what decoding each request on its own gives (including one whose attachments
    hold a non-string value, which is never reused)."""
    built = [frames.build_request(i, interface, method, args, attachments=attachments) for i, (interface, method, attachments, args) in enumerate(requests)]
    built.insert(mixed_in % (len(built) + 1), REQUEST)
    connection = DubboCodec()
    for frame in built + built:
        assert _decoded(decode_one(frame, connection)) == _decoded(decode_one(frame))
