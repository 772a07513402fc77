"""ThriftCodec: Apache Thrift messages (binary or compact protocol, framed or unframed transport).

Framing: with the framed transport a message is a 4-byte big-endian length and that many bytes,
so only the message header (and a reply's first field) is read; with the unframed ("buffered")
transport nothing marks a message's end, so the codec walks the whole message (every field,
nested structs and containers included) to find it, within the caps of the ``max_*`` options.
See docs/codecs/thrift.md for options, detection, metadata and the error-reply table.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from metabridge.sdk.codec import (
    DEFAULT_MAX_FRAME_SIZE,
    Codec,
    CodecError,
    DecodeStatus,
    Error,
    ErrorType,
    Metadata,
    MessageType,
    ResponseStatus,
    take_frame,
)

from .reader import BinaryReader, CompactReader, Limits, MessageHeader, NeedMoreData, Reader, Walk
from .wire import (
    BINARY_FIRST_BYTE,
    CALL,
    COMPACT_PROTOCOL_ID,
    EXCEPTION,
    FRAME_HEADER_SIZE,
    MAX_NESTING_DEPTH,
    MESSAGE_TYPE_NAMES,
    MULTIPLEX_SEPARATOR,
    ONEWAY,
    REPLY,
    ApplicationExceptionType,
)
from .writer import APPLICATION_EXCEPTION_WRITERS, frame

TRANSPORTS = ("auto", "framed", "buffered")
PROTOCOLS = ("auto", "binary", "compact")
OPTION_CHOICES = {"transport": TRANSPORTS, "protocol": PROTOCOLS}
# Caps on walking an unframed message (framed ones are not walked); see docs/codecs/thrift.md.
LIMIT_DEFAULTS = {
    "max_nesting_depth": MAX_NESTING_DEPTH,
    "max_container_size": 65_536,
    "max_elements": 65_536,
}
OPTIONS = (*OPTION_CHOICES, *LIMIT_DEFAULTS)

# Used by on_error when the request's metadata does not say (it always does when this codec
# decoded it): the Apache Thrift defaults.
FALLBACK_PROTOCOL = "binary"
FALLBACK_TRANSPORT = "buffered"

ERROR_CODES: Mapping[ErrorType, int] = MappingProxyType(
    {
        ErrorType.ROUTE_NOT_FOUND: ApplicationExceptionType.UNKNOWN_METHOD,  # no route serves this method
        ErrorType.CLUSTER_NOT_FOUND: ApplicationExceptionType.INTERNAL_ERROR,
        ErrorType.NO_HEALTHY_UPSTREAM: ApplicationExceptionType.INTERNAL_ERROR,
        ErrorType.BAD_RESPONSE: ApplicationExceptionType.PROTOCOL_ERROR,  # the server answered bytes that are not Thrift
        ErrorType.OVER_LIMIT: ApplicationExceptionType.INTERNAL_ERROR,
        ErrorType.TIMEOUT: ApplicationExceptionType.INTERNAL_ERROR,
        ErrorType.UNSPECIFIED: ApplicationExceptionType.INTERNAL_ERROR,
    }
)
"""The TApplicationException type code of the reply ``on_error`` builds for each error type."""

_MESSAGE_TYPES = {CALL: MessageType.REQUEST, ONEWAY: MessageType.ONEWAY, REPLY: MessageType.RESPONSE, EXCEPTION: MessageType.ERROR}
_FRAME_LENGTH = struct.Struct(">i")
_PARTIAL_PREFIX = 16  # bytes remembered to recognise the same partial message on the next call


@dataclass(slots=True)
class _Message:
    """A message being decoded: its header and the (resumable) walk of its struct."""

    header: MessageHeader
    header_end: int  # buffer offset where the message's struct starts
    walk: Walk  # walk.pos is the message's end once the walk is done


@dataclass(slots=True)
class _Partial:
    """An unframed message not yet complete: resumed, not restarted, when more bytes arrive."""

    prefix: bytes  # the buffer's first bytes, to recognise the same message
    needed: int  # the buffer length it needs at least
    message: _Message | None  # None while even its header is incomplete


def _choice(options: Mapping[str, Any], key: str) -> str:
    choices = OPTION_CHOICES[key]
    value = options.get(key, "auto")
    if value not in choices:
        raise ValueError(f"thrift codec option {key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _limit(options: Mapping[str, Any], key: str) -> int:
    value = options.get(key, LIMIT_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"thrift codec option {key}: {value!r} is not a positive integer (default {LIMIT_DEFAULTS[key]})")
    return value


def _as_i32(value: int) -> int:
    return (value + 0x80000000) % (1 << 32) - 0x80000000


class ThriftCodec(Codec):
    """Thrift binary/compact over framed/unframed transport; see the module docstring.

    ``transport`` and ``protocol`` hold the configured choice, or ``"auto"`` until the first
    bytes of the connection reveal it; once known they stay fixed for this instance.
    """

    name = "thrift"
    # Real clients (thriftpy2 among them) send seqid 0 on every call and servers answer in
    # order on a connection, so responses are matched in order, not by seqid.
    has_request_id = False

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(max_frame_size=max_frame_size, options=options)
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"thrift codec: unknown option(s) {', '.join(unknown)}; known options: {', '.join(OPTIONS)}")
        self.transport = _choice(self.options, "transport")
        self.protocol = _choice(self.options, "protocol")
        self.limits = Limits(
            _limit(self.options, "max_nesting_depth"), _limit(self.options, "max_container_size"), _limit(self.options, "max_elements")
        )
        # The old non-strict binary encoding has no magic bytes to detect, so it is accepted only
        # when the protocol is configured explicitly.
        self._allow_non_strict = self.protocol == "binary"
        self._partial: _Partial | None = None

    # -- decode ------------------------------------------------------------------------------
    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        if not buffer:
            return DecodeStatus.WAIT_FOR_DATA
        if self.transport == "auto" and not self._detect_transport(buffer):
            return DecodeStatus.WAIT_FOR_DATA
        if self.transport == "framed":
            message = self._parse_framed(buffer)
        else:
            message = self._parse_unframed(buffer)
        if message is None:
            return DecodeStatus.WAIT_FOR_DATA
        self._fill(metadata, buffer, message)
        return DecodeStatus.DONE

    def _detect_transport(self, buffer: bytearray) -> bool:
        """Settle ``transport`` from the first bytes; False: need more bytes to tell."""
        if buffer[0] in (BINARY_FIRST_BYTE, COMPACT_PROTOCOL_ID):
            self.transport = "buffered"
        elif len(buffer) <= FRAME_HEADER_SIZE:
            return False
        elif buffer[FRAME_HEADER_SIZE] in (BINARY_FIRST_BYTE, COMPACT_PROTOCOL_ID):
            self.transport = "framed"
        else:
            raise CodecError(
                f"cannot detect the Thrift transport: the stream starts with {bytes(buffer[:FRAME_HEADER_SIZE + 1]).hex(' ')}, "
                "which is neither a strict binary (80 01) nor a compact (82) message, bare or after a 4-byte frame length; "
                "for the old non-strict binary encoding set the codec options protocol: binary and transport: framed or buffered"
            )
        return True

    def _detect_protocol(self, first: int) -> None:
        """Settle ``protocol`` from the first byte of a message."""
        if first == BINARY_FIRST_BYTE:
            self.protocol = "binary"
        elif first == COMPACT_PROTOCOL_ID:
            self.protocol = "compact"
        else:
            raise CodecError(
                f"cannot detect the Thrift protocol: a {self.transport} message starts with byte 0x{first:02x}, "
                "expected 0x80 (strict binary) or 0x82 (compact); for the old non-strict binary encoding set protocol: binary"
            )

    def _reader(self, buffer: bytearray, start: int, end: int, *, complete: bool) -> Reader:
        if self.protocol == "binary":
            return BinaryReader(buffer, start, end, complete=complete, limits=self.limits, allow_non_strict=self._allow_non_strict)
        return CompactReader(buffer, start, end, complete=complete, limits=self.limits)

    def _start(self, buffer: bytearray, start: int, end: int, *, complete: bool) -> tuple[Reader, _Message]:
        """A reader positioned after the header of the message at ``start``, and the message."""
        if self.protocol == "auto":
            self._detect_protocol(buffer[start])
        reader = self._reader(buffer, start, end, complete=complete)
        header = reader.message_begin()
        walk = Walk(reader.pos, capture=header.message_type == EXCEPTION, budget=self.limits.elements)
        return reader, _Message(header, reader.pos, walk)

    def _parse_framed(self, buffer: bytearray) -> _Message | None:
        if len(buffer) < FRAME_HEADER_SIZE:
            return None
        length = _FRAME_LENGTH.unpack_from(buffer)[0]
        if length <= 0:
            raise CodecError(
                f"Thrift frame length {length} is not positive; if the peer does not use the framed transport, "
                "set the codec option transport: buffered (or auto)"
            )
        total = FRAME_HEADER_SIZE + length
        self.check_frame_size(total)  # before buffering a body we would refuse anyway
        if len(buffer) < total:
            return None
        reader, message = self._start(buffer, FRAME_HEADER_SIZE, total, complete=True)
        # The frame length says where the message ends, so its struct is not walked (that cost
        # up to seconds for a hostile 4 MiB frame): a body that is not valid Thrift is for the
        # backend to refuse. Only a reply's first field is read, for its status.
        if message.header.message_type in (REPLY, EXCEPTION):
            reader.peek_fields(message.walk)
        message.walk.pos = total
        return message

    def _parse_unframed(self, buffer: bytearray) -> _Message | None:
        partial = self._partial
        if partial is not None and not buffer.startswith(partial.prefix):
            partial = None  # not the buffer the partial message was seen in
        if partial is not None and len(buffer) < partial.needed:
            return None
        # Walk at most max_frame_size bytes: a message needing more is refused, not waited for.
        end = min(len(buffer), self.max_frame_size)
        message = partial.message if partial is not None else None
        try:
            if message is None:
                reader, message = self._start(buffer, 0, end, complete=False)
            else:
                reader = self._reader(buffer, 0, end, complete=False)
            reader.walk(message.walk)
        except NeedMoreData as more:
            self.check_frame_size(more.needed)
            self._partial = _Partial(bytes(buffer[:_PARTIAL_PREFIX]), more.needed, message)
            return None
        self._partial = None
        return message

    def _fill(self, metadata: Metadata, buffer: bytearray, message: _Message) -> None:
        header, walk = message.header, message.walk
        service, separator, method = header.name.partition(MULTIPLEX_SEPARATOR)
        if not separator:
            service, method = "", header.name
        status = ResponseStatus.OK
        properties = metadata.properties
        if header.message_type == EXCEPTION:
            status = ResponseStatus.ERROR
            properties["exception_message"] = walk.exception_message
            properties["exception_type"] = walk.exception_type
        elif header.message_type == REPLY and walk.first_field_id not in (None, 0):
            status = ResponseStatus.ERROR  # field 0 is the result; any other is a declared exception
            properties["exception_field_id"] = walk.first_field_id

        metadata.message_type = _MESSAGE_TYPES[header.message_type]
        metadata.request_id = header.seqid
        metadata.response_status = status
        metadata.operation_name = header.name
        end = walk.pos
        metadata.header_size = message.header_end
        metadata.body_size = end - message.header_end
        metadata.frame = take_frame(buffer, end)
        metadata.headers["method"] = method
        if separator:
            metadata.headers["service"] = service
        properties["protocol"] = self.protocol
        properties["transport"] = self.transport
        properties["strict"] = header.strict
        properties["name"] = header.name
        properties["method"] = method
        properties["seqid"] = header.seqid
        properties["message_type"] = MESSAGE_TYPE_NAMES[header.message_type]

    # -- encode / replies --------------------------------------------------------------------
    def encode(self, metadata: Metadata, mutation: Mapping[str, str]) -> bytes:
        # Binary and compact messages have no header slot (only THeader has one), so a mutation
        # cannot be carried: the frame goes on unchanged.
        return metadata.frame

    def on_error(self, metadata: Metadata, error: Error) -> bytes:
        """An EXCEPTION message carrying a TApplicationException, in the request's protocol and
        transport, with its seqid and method name (without the multiplexing service prefix, as a
        multiplexed server answers). A oneway request gets nothing: its client reads no reply."""
        if metadata.message_type is MessageType.ONEWAY:
            return b""
        properties = metadata.properties
        protocol = properties.get("protocol") or (self.protocol if self.protocol != "auto" else FALLBACK_PROTOCOL)
        transport = properties.get("transport") or (self.transport if self.transport != "auto" else FALLBACK_TRANSPORT)
        method = properties.get("method") or metadata.headers.get("method") or metadata.operation_name
        seqid = properties.get("seqid", metadata.request_id or 0)
        code = ERROR_CODES.get(error.type, ApplicationExceptionType.INTERNAL_ERROR)
        text = f"{error.type.name}: {error.message}" if error.message else error.type.name
        message = APPLICATION_EXCEPTION_WRITERS[protocol](method, _as_i32(seqid), code, text)
        return frame(message) if transport == "framed" else message

    def heartbeat_reply(self, metadata: Metadata) -> bytes:
        raise NotImplementedError("Thrift has no heartbeat message: ThriftCodec never decodes a HEARTBEAT, so there is nothing to answer")
