"""The Dubbo2 (Hessian2) codec: frames, routing metadata, attachment mutation, local replies.

One class decodes both directions: requests (and heartbeats) from consumers, responses (and
heartbeats or read-only events) from providers. Only what routing needs is parsed: the header,
the request's service/method/version strings, and its attachments map; argument values are
stepped over without being built, and response values are not touched unless a response
mutation needs the attachments behind them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metabridge.sdk.codec import (
    DEFAULT_MAX_FRAME_SIZE,
    Codec,
    CodecError,
    DecodeStatus,
    Error,
    ErrorType,
    FrameTooLarge,
    Headers,
    MalformedFrame,
    MessageType,
    Metadata,
    ResponseStatus,
    take_frame,
)
from metabridge.config.model import parse_size

from .frames import build_error_response, build_heartbeat
from .hessian2 import HessianError, HessianLimitError, Reader, encode_string, encode_string_map, skip_plain_strings
from .protocol import (
    EXCEPTION_RESULTS,
    FLAG_EVENT,
    FLAG_REQUEST,
    FLAG_TWOWAY,
    HEADER,
    HEADER_SIZE,
    HESSIAN2,
    MAGIC,
    RESULTS_WITH_ATTACHMENTS,
    RESULTS_WITH_VALUE,
    SERIALIZATION_MASK,
    SERIALIZATION_NAMES,
    ResultType,
    Status,
    count_parameters,
)

DEFAULT_MAX_BODY_SIZE = 8 * 1024 * 1024
# Caps on stepping over a request's arguments and attachments (and, for a response mutation, a
# result): without them a valid 4 MiB list of nulls took 0.6 s of the bridge's one event loop.
LIMIT_DEFAULTS = {"max_nesting_depth": 128, "max_elements": 65_536, "max_attachments": 1024}

# How each local-reply reason reaches a Dubbo consumer (see docs/codecs/dubbo.md).
ERROR_STATUS: dict[ErrorType, Status] = {
    ErrorType.ROUTE_NOT_FOUND: Status.SERVICE_NOT_FOUND,
    ErrorType.CLUSTER_NOT_FOUND: Status.SERVICE_NOT_FOUND,
    ErrorType.NO_HEALTHY_UPSTREAM: Status.SERVER_ERROR,
    ErrorType.BAD_RESPONSE: Status.BAD_RESPONSE,
    ErrorType.OVER_LIMIT: Status.SERVER_THREADPOOL_EXHAUSTED,
    ErrorType.TIMEOUT: Status.SERVER_TIMEOUT,
    ErrorType.UNSPECIFIED: Status.SERVER_ERROR,
}

_VALID_RESULT_TYPES = frozenset(int(t) for t in ResultType)
# An attachments map's entries as Reader.read_map_entries gives them (offsets from the map's start).
Entries = list[tuple[str | None, str | None, int, int, int]]
_MEMO_LIMIT = 4096  # bytes: longer body fields or attachments are parsed every time
_DONE, _WAIT = DecodeStatus.DONE, DecodeStatus.WAIT_FOR_DATA
_REQUEST, _ONEWAY, _RESPONSE, _ERROR, _HEARTBEAT = MessageType.REQUEST, MessageType.ONEWAY, MessageType.RESPONSE, MessageType.ERROR, MessageType.HEARTBEAT
_OK = int(Status.OK)
_STATUS_OK, _STATUS_ERROR = ResponseStatus.OK, ResponseStatus.ERROR
# An OK response's result type as Dubbo writes it: one compact Hessian2 int byte (0x90 + type).
_COMPACT_RESULT_TYPES = range(0x90, 0x90 + len(ResultType))


class DubboBodyError(MalformedFrame):
    """A frame with a valid header but a malformed body.

    The frame has been consumed from the buffer (the stream stays in step), and ``request_id``
    says which call it belonged to, so a bad response can be answered with BAD_RESPONSE.
    """

    def __init__(self, message: str, request_id: int, is_request: bool) -> None:
        super().__init__(message, request_id)
        self.is_request = is_request


class DubboCodec(Codec):
    """Dubbo2 protocol with Hessian2 serialization.

    Options: ``max_body_size`` (bytes or a size such as "8MiB"; default 8 MiB), checked against
    each frame's header together with the listener's ``max_frame_size``; ``max_elements``,
    ``max_nesting_depth`` and ``max_attachments``, caps on the Hessian2 values stepped over and
    the attachments read per message (LIMIT_DEFAULTS).
    """

    name = "dubbo"
    has_request_id = True
    carries_headers = True  # a mutation's headers become request attachments

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(max_frame_size=max_frame_size, options=options)
        self._last_prefix: tuple[bytes, tuple, int] | None = None  # body fields of the last request, its argument count
        self._last_attachments: tuple[bytes, list[tuple[str, str]], Entries] | None = None
        # The headers and operation name built from the two above (while both are reused, so are they).
        self._last_headers: tuple[tuple, list[tuple[str, str]], Headers, str] | None = None
        raw = self.options.get("max_body_size", DEFAULT_MAX_BODY_SIZE)
        try:
            self.max_body_size = parse_size(raw)
        except (TypeError, ValueError):
            raise ValueError(f"dubbo codec option max_body_size: {raw!r} is not a size (use bytes or e.g. '8MiB')") from None
        if isinstance(raw, bool) or self.max_body_size < 1:
            raise ValueError(f"dubbo codec option max_body_size: {raw!r} must be a positive size")
        self.max_nesting_depth, self.max_elements, self.max_attachments = (_limit(self.options, key) for key in LIMIT_DEFAULTS)

    # -- decode --------------------------------------------------------------------------------

    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        available = len(buffer)
        if available < HEADER_SIZE:
            if (available >= 1 and buffer[0] != MAGIC >> 8) or (available >= 2 and buffer[1] != MAGIC & 0xFF):
                self._bad_magic(buffer)
            return _WAIT
        magic, flag, status, request_id, body_size = HEADER.unpack_from(buffer)
        frame_size = HEADER_SIZE + body_size
        # One test passes a usual header; _refuse_header names what is wrong in the order given.
        if magic != MAGIC or flag & SERIALIZATION_MASK != HESSIAN2 or not 0 <= body_size <= self.max_body_size or frame_size > self.max_frame_size:
            self._refuse_header(buffer, magic, flag, request_id, body_size)
        if available < frame_size:
            return _WAIT

        frame = take_frame(buffer, frame_size)
        metadata.frame = frame
        metadata.request_id = request_id
        metadata.header_size = HEADER_SIZE
        metadata.body_size = body_size
        try:
            if flag & FLAG_EVENT:
                # Heartbeats (null body) and read-only events ("R"): answered or dropped locally.
                metadata.message_type = _HEARTBEAT
                metadata.properties = {"flag": flag, "serialization": HESSIAN2, "status": status, "twoway": bool(flag & FLAG_TWOWAY)}
            elif flag & FLAG_REQUEST:
                self._decode_request(frame, flag, status, metadata)
            else:
                self._decode_response(frame, flag, status, metadata)
        except HessianLimitError as exc:
            raise DubboBodyError(f"dubbo: request {request_id} is over a limit: {exc}; raise it if such requests are expected", request_id, bool(flag & FLAG_REQUEST)) from None
        except (HessianError, ValueError) as exc:
            is_request = bool(flag & FLAG_REQUEST)
            kind = "request" if is_request else "response"
            raise DubboBodyError(f"dubbo: malformed {kind} body in frame {request_id}: {exc}", request_id, is_request) from None
        return _DONE

    def _refuse_header(self, buffer: bytearray, magic: int, flag: int, request_id: int, body_size: int) -> None:
        """Raise the error for a header decode does not accept (the first that applies)."""
        if magic != MAGIC:
            self._bad_magic(buffer)
        serialization = flag & SERIALIZATION_MASK
        if serialization != HESSIAN2:
            kind = "request" if flag & FLAG_REQUEST else "response"
            name = SERIALIZATION_NAMES.get(serialization, "unknown")
            raise CodecError(
                f"dubbo: {kind} {request_id} uses serialization id {serialization} ({name}); only hessian2 (id 2) "
                "is supported: set serialization=hessian2 on the consumer and provider"
            )
        if body_size < 0:
            raise CodecError(f"dubbo: frame {request_id} announces a negative body length {body_size}")
        if body_size > self.max_body_size:
            raise FrameTooLarge(
                f"dubbo: frame {request_id} has a {body_size}-byte body, over max_body_size {self.max_body_size} "
                "(raise the codec option max_body_size if such bodies are expected)"
            )
        self.check_frame_size(HEADER_SIZE + body_size)

    @staticmethod
    def _bad_magic(buffer: bytearray) -> None:
        start = bytes(buffer[:2]).hex()
        raise CodecError(
            f"dubbo: frame starts with 0x{start} instead of magic 0xdabb; the peer is not speaking Dubbo2 "
            "(telnet/qos commands and Triple are not supported on a dubbo listener)"
        )

    def _decode_request(self, frame: bytes, flag: int, status: int, metadata: Metadata) -> None:
        metadata.message_type = _REQUEST if flag & FLAG_TWOWAY else _ONEWAY
        # A connection sends the same service, method and attachments over and over: when the
        # bytes equal the last request's, their parse is reused (parsing depends on nothing but
        # those bytes: strings, and a plain map of strings).
        prefix = self._last_prefix
        if prefix is not None and frame.startswith(prefix[0], HEADER_SIZE):
            _, fields, arguments = prefix
            pos = HEADER_SIZE + len(prefix[0])
        else:
            reader = self._reader(frame, HEADER_SIZE)
            # dubbo version, path (the interface), service version, method, parameter types
            fields = (reader.read_string_or_null(), reader.read_string(), reader.read_string_or_null(), reader.read_string(), reader.read_string_or_null() or "")
            arguments = count_parameters(fields[4])
            pos = reader.pos
            if pos - HEADER_SIZE <= _MEMO_LIMIT:
                self._last_prefix = (frame[HEADER_SIZE:pos], fields, arguments)
        dubbo_version, path, service_version, method, parameter_types = fields
        # The arguments: plain strings stepped over without a Reader, a Reader for the rest (they
        # are strings only before it, so it needs no class definitions made earlier).
        pos, skipped = skip_plain_strings(frame, pos, arguments, self.max_elements)
        reader = None
        if skipped < arguments:
            reader = Reader(frame, pos, self.max_elements, self.max_nesting_depth, spent=skipped)
            for _ in range(arguments - skipped):
                reader.skip()
            pos = reader.pos
        attachments_start = pos
        memo = self._last_attachments
        if memo is not None and len(frame) - attachments_start == len(memo[0]) and frame.endswith(memo[0]):
            _, pairs, entries = memo
            attachments_end = len(frame)
        else:
            if reader is None:
                reader = Reader(frame, pos, self.max_elements, self.max_nesting_depth, spent=skipped)
            pairs, entries = self._read_attachments(reader, frame, attachments_start)
            attachments_end = reader.pos

        routable = self._last_headers
        if routable is not None and routable[0] is fields and routable[1] is pairs:
            metadata.headers.update_from(routable[2])  # both memos held: the same headers again
            metadata.operation_name = routable[3]
        else:
            # What the provider sees: body fields first, attachments override them (Dubbo's
            # DecodeableRpcInvocation does putAll), except the method, which only the body names.
            headers = metadata.headers
            headers["interface"] = path
            headers["path"] = path
            if service_version:
                headers["version"] = service_version
            for key, value in pairs:
                headers[key] = value
            headers["method"] = method
            metadata.operation_name = f"{headers['interface']}/{method}"
            self._last_headers = (fields, pairs, headers.copy(), metadata.operation_name)

        metadata.properties = {
            "flag": flag,
            "serialization": HESSIAN2,  # the only one decode accepts
            "status": status,
            "dubbo_version": dubbo_version,
            "path": path,
            "service_version": service_version,
            "parameter_types": parameter_types,
            "attachments_span": (attachments_start, attachments_end),
            "attachment_entries": entries,
        }

    def _read_attachments(self, reader: Reader, frame: bytes, start: int) -> tuple[list[tuple[str, str]], Entries]:
        """The attachments' string pairs (other keys and values are not routable), and the
        entries with their offsets for a later rewrite."""
        entries = [] if reader.at_end() else reader.read_map_entries(self.max_attachments)
        pairs = [(key, value) for key, value, *_ in entries if key is not None and value is not None]
        # Memoised only for a plain map of strings that ends the frame (as Dubbo writes it):
        # other values may depend on class definitions made earlier in the body.
        plain = len(pairs) == len(entries) and (not entries or frame[start] == 0x48)
        if plain and reader.at_end() and len(frame) - start <= _MEMO_LIMIT:
            self._last_attachments = (frame[start:], pairs, entries)
        return pairs, entries

    @staticmethod
    def _decode_response(frame: bytes, flag: int, status: int, metadata: Metadata) -> None:
        if status != _OK:
            metadata.message_type = _ERROR
            metadata.response_status = _STATUS_ERROR
            reader = Reader(frame, HEADER_SIZE)
            error_message = None if reader.at_end() else reader.read_string_or_null()
            metadata.properties = {"flag": flag, "serialization": HESSIAN2, "status": status, "error_message": error_message}
            return
        tag = frame[HEADER_SIZE] if len(frame) > HEADER_SIZE else -1
        if tag in _COMPACT_RESULT_TYPES:
            result_type, value_offset = tag - 0x90, HEADER_SIZE + 1
        else:
            reader = Reader(frame, HEADER_SIZE)
            result_type = reader.read_int()
            if result_type not in _VALID_RESULT_TYPES:
                raise ValueError(f"unknown result type {result_type} (expected 0-5)")
            value_offset = reader.pos
        metadata.properties = {"flag": flag, "serialization": HESSIAN2, "status": status, "result_type": result_type, "value_offset": value_offset}
        if result_type in EXCEPTION_RESULTS:
            metadata.message_type = _ERROR
            metadata.response_status = _STATUS_ERROR
        else:
            metadata.message_type = _RESPONSE
            metadata.response_status = _STATUS_OK

    # -- encode --------------------------------------------------------------------------------

    def encode(self, metadata: Metadata, mutation: Mapping[str, str]) -> bytes:
        if not mutation:
            return metadata.frame
        found = self._attachments(metadata)
        if found is None:
            return metadata.frame
        span, entries = found
        return _rewrite_attachments(metadata.frame, span, entries, mutation)

    def _reader(self, frame: bytes, pos: int) -> Reader:
        return Reader(frame, pos, self.max_elements, self.max_nesting_depth)

    def _attachments(self, metadata: Metadata) -> tuple[tuple[int, int], Entries] | None:
        """Where the attachments map is and its entries, or None when the message has none to
        rewrite."""
        props = metadata.properties
        span = props.get("attachments_span")
        if span is not None:
            return span, props["attachment_entries"]
        if metadata.message_type not in (MessageType.RESPONSE, MessageType.ERROR):
            return None
        result_type = props.get("result_type")
        if result_type not in RESULTS_WITH_ATTACHMENTS:
            return None  # no attachments slot: adding one would change the result type
        # One reader from the value to the end, so the map is read knowing the class
        # definitions the value made (its entries may use them).
        reader = self._reader(metadata.frame, props["value_offset"])
        try:
            if result_type in RESULTS_WITH_VALUE:
                reader.skip()
            start = reader.pos
            entries = reader.read_map_entries(self.max_attachments)
        except HessianError:
            return None  # a response we cannot walk (or not within the caps) is forwarded as it came
        span = props["attachments_span"] = (start, reader.pos)
        props["attachment_entries"] = entries
        return span, entries

    # -- local replies -------------------------------------------------------------------------

    def on_error(self, metadata: Metadata, error: Error) -> bytes:
        status = ERROR_STATUS.get(error.type, Status.SERVER_ERROR)
        serialization = metadata.properties.get("serialization", HESSIAN2)
        return build_error_response(metadata.request_id or 0, status, error.message, serialization)

    def heartbeat_reply(self, metadata: Metadata) -> bytes:
        serialization = metadata.properties.get("serialization", HESSIAN2)
        return build_heartbeat(metadata.request_id or 0, response=True, serialization=serialization)


def _limit(options: Mapping[str, Any], key: str) -> int:
    value = options.get(key, LIMIT_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"dubbo codec option {key}: {value!r} is not a positive integer (default {LIMIT_DEFAULTS[key]})")
    return value


def _rewrite_attachments(frame: bytes, span: tuple[int, int], entries: Entries, mutation: Mapping[str, str]) -> bytes:
    """The frame with ``mutation`` applied to its attachments map and the body length patched.

    Existing entries keep their bytes and order; a key the mutation names (matched without
    regard to case, like headers) gets the new value in place; other keys are appended.
    """
    start, end = span
    wanted = {key.lower(): (key, value) for key, value in mutation.items()}
    if start == end or frame[start] == 0x4E:  # no map, or a null one: write a fresh map
        new_map = encode_string_map((key, str(value)) for key, value in wanted.values())
    else:
        # Splice at the entry offsets decode found, not by reading the map again: on its own the
        # map cannot be read, as its values may use class definitions (and type names and object
        # slots) made by the arguments or result before it; Hessian2 numbers them per body.
        pieces = []
        cursor = start
        replaced = set()
        for key, _value, _key_start, value_start, value_end in entries:
            lowered = key.lower() if key is not None else None
            if lowered in wanted:
                pieces.append(frame[cursor : start + value_start])
                pieces.append(encode_string(str(wanted[lowered][1])))
                cursor = start + value_end
                replaced.add(lowered)
        pieces.append(frame[cursor : end - 1])  # up to the map's closing 'Z'
        for lowered, (key, value) in wanted.items():
            if lowered not in replaced:
                pieces.append(encode_string(key) + encode_string(str(value)))
        pieces.append(b"Z")
        new_map = b"".join(pieces)
    body = frame[HEADER_SIZE:start] + new_map + frame[end:]
    return frame[:12] + len(body).to_bytes(4, "big", signed=True) + body


__all__ = ["DEFAULT_MAX_BODY_SIZE", "ERROR_STATUS", "LIMIT_DEFAULTS", "DubboBodyError", "DubboCodec"]
