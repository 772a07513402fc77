"""streamrpc's wire format: one frame layout for both directions, unary calls and streams alike.

Every frame is a 15-byte big-endian header, a header block and a body:

    offset size field    meaning
    0      2    magic    b"SR"
    2      1    version  1
    3      1    type     FrameType: INIT 1, DATA 2, HALF_CLOSE 3, CLOSE 4, REQUEST 5, RESPONSE 6
    4      1    flags    bit 0 ERROR: the frame reports a failure (header ``code``, body = message)
    5      4    id       u32 stream id (INIT..CLOSE) or request id (REQUEST, RESPONSE)
    9      4    length   u32 TOTAL frame length, header included
    13     2    hlen     u16 size of the header block that follows the header
    15     hlen headers  UTF-8 ``key=value`` entries joined by "\\n" (keys lower-case); may be empty
    ...    ...  body     length - 15 - hlen opaque bytes

A stream starts with INIT (headers ``method``, usually ``service``; a body if the method wants
one), then both sides send DATA with the stream's id. HALF_CLOSE ends the sender's side (the other
side may go on sending); CLOSE ends both. CLOSE with the ERROR flag is how a stream fails. A unary
call is REQUEST (headers ``method``, ``service``) answered by a RESPONSE with the same id, the ERROR
flag set when it failed. Stream ids and request ids come from one counter per connection, so they
never collide and any number of streams and calls interleave on one connection.

Nothing here depends on metabridge: the codec, the server and the client all build on it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

MAGIC = b"SR"
VERSION = 1
HEADER = struct.Struct("!2sBBBIIH")
"""magic, version, type, flags, id, length, hlen."""
HEADER_SIZE = HEADER.size  # 15
FLAG_ERROR = 0x01
MAX_ID = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    INIT = 1  # opens a stream
    DATA = 2  # one message on a stream, either direction
    HALF_CLOSE = 3  # the sender has nothing more to send on this stream
    CLOSE = 4  # the stream is over for both sides (with FLAG_ERROR: it failed)
    REQUEST = 5  # a unary call
    RESPONSE = 6  # its answer (with FLAG_ERROR: the call failed)


STREAM_TYPES = frozenset({FrameType.INIT, FrameType.DATA, FrameType.HALF_CLOSE, FrameType.CLOSE})


class ProtocolError(ValueError):
    """Bytes or fields that are not streamrpc."""


@dataclass(frozen=True)
class Header:
    """The fixed part of a frame, as ``peek_header`` reads it."""

    type: FrameType
    flags: int
    id: int
    length: int
    hlen: int


@dataclass(frozen=True)
class Frame:
    type: FrameType
    id: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    flags: int = 0

    @property
    def error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def is_stream(self) -> bool:
        return self.type in STREAM_TYPES


def encode_headers(headers: dict[str, str]) -> bytes:
    entries = []
    for key, value in headers.items():
        key, value = str(key).lower(), str(value)
        if not key or "=" in key or "\n" in key or "\n" in value:
            raise ProtocolError(f"streamrpc header {key!r}={value!r}: keys must be non-empty without '=' or newlines, values without newlines")
        entries.append(f"{key}={value}")
    return "\n".join(entries).encode()


def parse_headers(block: bytes) -> dict[str, str]:
    if not block:
        return {}
    try:
        text = block.decode()
    except UnicodeDecodeError:
        raise ProtocolError("streamrpc header block is not UTF-8") from None
    headers = {}
    for entry in text.split("\n"):
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ProtocolError(f"streamrpc header entry {entry[:40]!r} is not key=value")
        headers[key.lower()] = value
    return headers


def encode_frame(type: FrameType, id: int, body: bytes = b"", headers: dict[str, str] | None = None, flags: int = 0) -> bytes:
    block = encode_headers(headers) if headers else b""
    length = HEADER_SIZE + len(block) + len(body)
    if not 0 <= id <= MAX_ID or len(block) > 0xFFFF or length > MAX_ID:
        raise ProtocolError(f"streamrpc frame out of range: id {id}, header block {len(block)} bytes, length {length}")
    return HEADER.pack(MAGIC, VERSION, FrameType(type), flags, id, length, len(block)) + block + body


def peek_header(buffer: bytes | bytearray) -> Header | None:
    """The header at the front of ``buffer`` (consuming nothing), or None until all 15 bytes are there."""
    if len(buffer) < HEADER_SIZE:
        return None
    magic, version, type_, flags, id_, length, hlen = HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise ProtocolError(f"not a streamrpc frame: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"streamrpc version {version} is not supported (only {VERSION})")
    if type_ not in FrameType._value2member_map_:
        raise ProtocolError(f"streamrpc frame type {type_} is unknown (id {id_})")
    if length < HEADER_SIZE + hlen:
        raise ProtocolError(f"streamrpc frame (id {id_}) announces length {length}, less than its header and {hlen}-byte header block")
    return Header(FrameType(type_), flags, id_, length, hlen)


def parse_frame(data: bytes) -> Frame:
    """One whole frame (exactly ``header.length`` bytes) as a Frame."""
    header = peek_header(data)
    if header is None or len(data) != header.length:
        raise ProtocolError(f"parse_frame wants exactly one whole frame, got {len(data)} bytes")
    block_end = HEADER_SIZE + header.hlen
    return Frame(header.type, header.id, data[block_end:], parse_headers(data[HEADER_SIZE:block_end]), header.flags)


def take_frame(buffer: bytearray, max_frame_size: int = 16 * 1024 * 1024) -> Frame | None:
    """Remove one whole frame from the front of ``buffer`` and return it, or None (consuming
    nothing) until one has arrived. For the server and client; the codec has its own decode."""
    header = peek_header(buffer)
    if header is None:
        return None
    if header.length > max_frame_size:
        raise ProtocolError(f"streamrpc frame of {header.length} bytes is over the {max_frame_size}-byte limit")
    if len(buffer) < header.length:
        return None
    data = bytes(buffer[: header.length])
    del buffer[: header.length]
    return parse_frame(data)
