"""The codec SDK: the whole contract between metabridge and a protocol.

A codec is a class; the bridge creates one instance per downstream connection for the request
direction and one per upstream tunnel for the response direction, so an instance may keep
partial-parse state. Codecs are sans-IO: bytes in, bytes out.

    decode(buffer, metadata) -> DecodeStatus
        Consume exactly one whole frame from the front of ``buffer`` (a bytearray: ``del
        buffer[:n]``) and fill ``metadata``; or return WAIT_FOR_DATA, consuming nothing, when the
        buffer does not hold a whole frame yet. Raise CodecError for bytes that can never become a
        valid frame and FrameTooLarge (via ``check_frame_size``) as soon as a header announces a
        frame bigger than ``max_frame_size``. Raise MalformedFrame after consuming a whole frame
        whose body is invalid, so only that message fails.
    encode(metadata, mutation) -> bytes
        The frame to send on, with ``mutation`` (routable headers to add or replace) applied.
        Returning ``metadata.frame`` unchanged is fine when the protocol has nowhere to put them.
    on_error(metadata, error) -> bytes
        A protocol-correct error reply to the request that ``metadata`` describes. Read what
        it needs from ``properties`` and the other fields: ``metadata.frame`` is released once
        the request has been sent, so a request in flight does not pin its bytes.
    heartbeat_reply(metadata) -> bytes
        Optional: the reply to a HEARTBEAT request (answered locally, never forwarded).
    is_retriable(response) -> bool
        Optional: whether an error response may be retried on another host (default False).

``self.direction`` (set by the bridge before the first decode) says what an instance decodes:
Direction.REQUEST for what clients send, Direction.RESPONSE for what upstreams send, so a
protocol whose requests and responses look alike can label each frame correctly.

See docs/writing-a-codec.md for a worked example.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

# The codec contract's version (major, minor): minor grows with additions a codec may ignore,
# major with anything that could break an existing codec.
CODEC_API_VERSION = (1, 0)

DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024


class DecodeStatus(enum.Enum):
    WAIT_FOR_DATA = 0
    DONE = 1


class Direction(enum.Enum):
    REQUEST = "request"  # frames from clients
    RESPONSE = "response"  # frames from upstreams


class MessageType(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"
    ONEWAY = "oneway"
    STREAM_INIT = "stream_init"
    STREAM_DATA = "stream_data"
    STREAM_CLOSE_ONE_WAY = "stream_close_one_way"
    STREAM_CLOSE_TWO_WAY = "stream_close_two_way"
    HEARTBEAT = "heartbeat"
    ERROR = "error"


class ResponseStatus(enum.Enum):
    OK = "ok"
    ERROR = "error"


class ErrorType(enum.Enum):
    ROUTE_NOT_FOUND = "route_not_found"
    CLUSTER_NOT_FOUND = "cluster_not_found"
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    BAD_RESPONSE = "bad_response"
    OVER_LIMIT = "over_limit"
    TIMEOUT = "timeout"
    UNSPECIFIED = "unspecified"


@dataclass(frozen=True, slots=True)
class Error:
    """Why the bridge answers a request itself; passed to ``Codec.on_error``."""

    type: ErrorType
    message: str


class CodecError(Exception):
    """The bytes can never become a valid frame (the connection or reply is given up)."""


class FrameTooLarge(CodecError):
    """A frame announces a size above the configured ``max_frame_size``."""


class MalformedFrame(CodecError):
    """A whole frame was consumed from the buffer but its body is invalid.

    The byte stream is still in step, and ``request_id`` names the message, so the bridge can
    answer just that request (BAD_RESPONSE for a response) instead of giving up the connection.
    """

    def __init__(self, message: str, request_id: int | None) -> None:
        super().__init__(message)
        self.request_id = request_id


def take_frame(buffer: bytearray, length: int) -> bytes:
    """Remove the first ``length`` bytes of ``buffer`` and return them as bytes.

    One copy however large the frame (``bytes(buffer[:length])`` makes two).
    """
    if length == len(buffer):
        frame = bytes(buffer)
        buffer.clear()
        return frame
    with memoryview(buffer) as view:
        frame = bytes(view[:length])
    del buffer[:length]
    return frame


class Headers(MutableMapping[str, str]):
    """Routable string headers with case-insensitive keys (stored lower-cased)."""

    __slots__ = ("_items",)  # a plain dict, keys lower-cased: the router reads it directly

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = {}
        if items:
            for key, value in items.items():
                self[key] = value

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __setitem__(self, key: str, value: str) -> None:
        self._items[key.lower()] = str(value)

    def __delitem__(self, key: str) -> None:
        del self._items[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key.lower(), default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> Headers:
        """A new Headers with the same entries (their keys are lower-cased already)."""
        new = Headers.__new__(Headers)
        new._items = self._items.copy()
        return new

    def update_from(self, other: Headers) -> None:
        """Add (or replace with) ``other``'s entries in one dict update, their keys being
        lower-cased already: for a codec that fills a message's headers with an earlier one's
        (cheaper than ``copy``, which makes another object)."""
        self._items.update(other._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


# Metadata's defaults as module constants: made for every message, and an Enum class attribute
# costs about ten times a global's (CPython 3.11).
_REQUEST, _STATUS_OK = MessageType.REQUEST, ResponseStatus.OK


class Metadata:
    """What a codec learned about one message.

    ``headers`` are routable (routes, hash policies, rate-limit conditions and access logs see
    them); ``properties`` are the codec's own opaque notes, carried from decode to encode/on_error.
    """

    __slots__ = (
        "message_type",
        "request_id",
        "stream_id",
        "response_status",
        "operation_name",
        "header_size",
        "body_size",
        "frame",
        "headers",
        "properties",
    )

    def __init__(self) -> None:
        self.message_type: MessageType = _REQUEST
        self.request_id: int | None = None
        self.stream_id: int | None = None
        self.response_status: ResponseStatus = _STATUS_OK
        self.operation_name: str = ""
        self.header_size: int = 0
        self.body_size: int = 0
        self.frame: bytes = b""
        self.headers: Headers = Headers()
        self.properties: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Metadata(type={self.message_type.value}, id={self.request_id}, "
            f"op={self.operation_name!r}, headers={self.headers!r}, size={len(self.frame)})"
        )


class Codec:
    """Base class for codecs. Subclasses set ``name`` and implement decode, encode and on_error
    (heartbeat_reply and is_retriable are optional).

    ``has_request_id``: True when responses carry the request's id (matched by id, in any
    order); False when responses come back in request order.
    ``carries_headers``: True when ``encode`` writes any mutation header into the frame (so a
    trace context such as W3C ``traceparent`` reaches the upstream); False when it cannot.
    ``options`` are the codec's own settings from the config file's ``codecs.<name>.options``.
    """

    name: ClassVar[str] = ""
    has_request_id: ClassVar[bool] = True
    carries_headers: ClassVar[bool] = False
    direction: Direction = Direction.REQUEST

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, options: Mapping[str, Any] | None = None) -> None:
        self.max_frame_size = max_frame_size
        self.options: Mapping[str, Any] = options or {}

    def check_frame_size(self, size: int) -> None:
        """Raise FrameTooLarge when ``size`` (a whole frame, header included) is over the limit."""
        if size > self.max_frame_size:
            raise FrameTooLarge(f"{self.name or type(self).__name__} frame of {size} bytes exceeds max_frame_size {self.max_frame_size}")

    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        raise NotImplementedError

    def encode(self, metadata: Metadata, mutation: Mapping[str, str]) -> bytes:
        raise NotImplementedError

    def on_error(self, metadata: Metadata, error: Error) -> bytes:
        raise NotImplementedError

    def heartbeat_reply(self, metadata: Metadata) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} decoded a HEARTBEAT but has no heartbeat_reply")

    def is_retriable(self, response: Metadata) -> bool:
        """Optional: whether an error response says "try another host" (a route whose
        retry_policy lists ``retriable_error`` then retries instead of passing it on)."""
        return False


REQUIRED_METHODS = ("decode", "encode", "on_error")
