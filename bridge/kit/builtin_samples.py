"""Sample frames of the built-in codecs, what ``check-codec`` uses when given no ``--samples``.

Frames are built with each codec's own frame builders where it has them (awesomerpc's
encode_frame, Dubbo's frames module); Thrift's are the spec's byte layouts written out, as in
its unit tests' hand-written vectors.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from pathlib import Path

from metabridge.kit.conformance import Samples
from metabridge.registry import CodecLoadError, load_codec_class
from metabridge.sdk.codec import Codec


def awesomerpc() -> Samples:
    from metabridge.codecs.awesomerpc import encode_frame

    return Samples(
        requests=[encode_frame(1, 2, b"hello"), encode_frame(2, 3), encode_frame(0xFFFFFFFF, -1, bytes(range(256)))],
        responses=[encode_frame(1, 2, b"hello"), encode_frame(2, 3, rsp_code=500), encode_frame(0xFFFFFFFF, -1, b"x" * 300)],
        heartbeats=[encode_frame(7, 0)],
    )


def dubbo() -> Samples:
    from metabridge.codecs.dubbo.frames import build_error_response, build_heartbeat, build_request, build_response
    from metabridge.codecs.dubbo.protocol import ResultType, Status

    greeter = "com.example.Greeter"
    return Samples(
        requests=[
            build_request(42, greeter, "sayHello", ["bob"], version="1.0.0", attachments={"group": "g1", "x-tag": "blue"}),
            build_request(43, greeter, "add", [1, 2]),
            build_request(44, greeter, "sayHello", ["carol"]),
            build_request(45, greeter, "notify", ["dave"], twoway=False),
        ],
        responses=[
            build_response(42, ResultType.VALUE_WITH_ATTACHMENTS, "hello bob", attachments={"trace": "t1"}),
            build_response(43, ResultType.VALUE, 3),
            build_error_response(44, Status.SERVICE_ERROR, "no such greeting"),
        ],
        heartbeats=[build_heartbeat(46, response=False)],
    )


# Thrift message types and the bits around them (the Thrift binary and compact protocol specs).
_CALL, _REPLY, _ONEWAY = 1, 2, 4
_I32 = struct.Struct(">i")


def _binary(message_type: int, name: str, seqid: int, field_id: int, text: bytes) -> bytes:
    """A strict binary message whose struct holds one string field."""
    return (
        struct.pack(">I", 0x80010000 | message_type) + _I32.pack(len(name)) + name.encode() + _I32.pack(seqid)
        + b"\x0b" + struct.pack(">h", field_id) + _I32.pack(len(text)) + text + b"\x00"
    )


def _compact(message_type: int, name: str, seqid: int, field_id: int, text: bytes) -> bytes:
    """A compact message whose struct holds one string field (short field header for id 1,
    the long form, type byte then zigzag id, for id 0). Small seqids and lengths fit one varint byte."""
    field = bytes((field_id << 4 | 0x08,)) if field_id else b"\x08\x00"
    return bytes((0x82, message_type << 5 | 1, seqid, len(name))) + name.encode() + field + bytes((len(text),)) + text + b"\x00"


def thrift() -> Samples:
    from metabridge.codecs.thrift.writer import binary_application_exception, frame

    return Samples(
        requests=[
            _binary(_CALL, "echo", 1, 1, b"hi"),
            _compact(_CALL, "echo", 2, 1, b"hi"),
            frame(_binary(_CALL, "echo", 3, 1, b"framed")),
            frame(_compact(_CALL, "Echo:echo", 4, 1, b"multiplexed")),
            _binary(_CALL, "echo", 5, 1, b"fails"),
            frame(_binary(_ONEWAY, "notify", 6, 1, b"n")),
        ],
        responses=[
            _binary(_REPLY, "echo", 1, 0, b"hi"),
            _compact(_REPLY, "echo", 2, 0, b"hi"),
            frame(_binary(_REPLY, "echo", 3, 0, b"framed")),
            frame(_compact(_REPLY, "echo", 4, 0, b"multiplexed")),
            binary_application_exception("echo", 5, 6, "internal error"),
        ],
    )


BUILTIN: dict[str, Callable[[], Samples]] = {"awesomerpc": awesomerpc, "dubbo": dubbo, "thrift": thrift}
"""Entry-point name of each built-in codec -> its samples."""


def _source(cls: type) -> Path | None:
    try:
        return Path(inspect.getfile(cls)).resolve()
    except (TypeError, OSError):
        return None


def samples_for(cls: type[Codec]) -> Samples | None:
    """The built-in samples for ``cls`` when it is a built-in codec (loaded by its entry-point
    name, its module or its file), else None."""
    for name, build in BUILTIN.items():
        try:
            builtin = load_codec_class(name)
        except CodecLoadError:
            continue
        if cls is builtin or (cls.__qualname__ == builtin.__qualname__ and _source(cls) is not None and _source(cls) == _source(builtin)):
            return build()
    return None
