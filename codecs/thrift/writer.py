"""Encoders for the only message the codec writes itself: an EXCEPTION carrying a
TApplicationException (field 1 message: string, field 2 type: i32)."""

from __future__ import annotations

import struct

from .wire import (
    APPLICATION_EXCEPTION_MESSAGE_FIELD,
    APPLICATION_EXCEPTION_TYPE_FIELD,
    BINARY_VERSION_1,
    COMPACT_PROTOCOL_ID,
    COMPACT_TYPE_SHIFT,
    COMPACT_VERSION,
    EXCEPTION,
    BinaryType,
    CompactType,
)

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _binary_string(data: bytes) -> bytes:
    return _I32.pack(len(data)) + data


def _compact_string(data: bytes) -> bytes:
    return _varint(len(data)) + data


def binary_application_exception(name: str, seqid: int, code: int, message: str) -> bytes:
    """A strict binary EXCEPTION message (what Thrift servers write by default)."""
    text = message.encode("utf-8", errors="replace")
    return b"".join(
        (
            _U32.pack(BINARY_VERSION_1 | EXCEPTION),
            _binary_string(name.encode("utf-8", errors="replace")),
            _I32.pack(seqid),
            bytes((BinaryType.STRING,)) + _I16.pack(APPLICATION_EXCEPTION_MESSAGE_FIELD) + _binary_string(text),
            bytes((BinaryType.I32,)) + _I16.pack(APPLICATION_EXCEPTION_TYPE_FIELD) + _I32.pack(code),
            b"\x00",  # STOP
        )
    )


def compact_application_exception(name: str, seqid: int, code: int, message: str) -> bytes:
    """A compact EXCEPTION message; the seqid is an unsigned varint of its 32 bits."""
    text = message.encode("utf-8", errors="replace")
    return b"".join(
        (
            bytes((COMPACT_PROTOCOL_ID, (EXCEPTION << COMPACT_TYPE_SHIFT) | COMPACT_VERSION)),
            _varint(seqid & 0xFFFFFFFF),
            _compact_string(name.encode("utf-8", errors="replace")),
            # Field headers: the id delta (1, then 1 again) in the high nibble, the type in the low one.
            bytes(((APPLICATION_EXCEPTION_MESSAGE_FIELD << 4) | CompactType.BINARY,)) + _compact_string(text),
            bytes((((APPLICATION_EXCEPTION_TYPE_FIELD - APPLICATION_EXCEPTION_MESSAGE_FIELD) << 4) | CompactType.I32,))
            + _varint(((code << 1) ^ (code >> 31)) & 0xFFFFFFFF),  # zigzag i32
            b"\x00",  # STOP
        )
    )


APPLICATION_EXCEPTION_WRITERS = {"binary": binary_application_exception, "compact": compact_application_exception}


def frame(message: bytes) -> bytes:
    """Framed transport: a big-endian length, then the message."""
    return _U32.pack(len(message)) + message
