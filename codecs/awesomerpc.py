"""awesomerpc: the example protocol metabridge ships a codec, a backend and a client for.

Every message, request or response, is one frame: a 13-byte big-endian header, then the body.

    offset size field     meaning
    0      1    version   protocol version (this codec writes 1 and accepts any)
    1      4    flow      u32 request id; a response carries its request's flow
    5      4    len       u32 TOTAL frame length, header included (so len >= 13)
    9      2    cmd       i16 command; 0 is the heartbeat
    11     2    rsp_code  i16 0 = OK, anything else an error (see ERROR_CODES)
    13     ...  body      len - 13 opaque bytes

Requests and responses share this layout and the protocol has no direction bit, so ``decode``
labels frames by ``self.direction`` (set by the bridge): REQUEST (or HEARTBEAT for cmd 0) for
what clients send, RESPONSE for what upstreams send, with ``response_status`` ERROR when
rsp_code != 0.

Routable headers: ``cmd`` (the decimal command). It is also the only field a mutation can change:
the protocol has nowhere else to put headers, so other mutation keys are ignored.

The codec takes no options.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType

from metabridge.sdk.codec import Codec, CodecError, DecodeStatus, Direction, Error, ErrorType, Headers, Metadata, MessageType, ResponseStatus, take_frame

HEADER = struct.Struct("!BIIhh")
"""version u8, flow u32, len u32, cmd i16, rsp_code i16: the whole header, 13 bytes."""
HEADER_SIZE = HEADER.size
_CMD = struct.Struct("!h")
_CMD_OFFSET = 9  # version (1) + flow (4) + len (4)

HEARTBEAT_CMD = 0
PROTOCOL_VERSION = 1

# Enum members as module constants: on the hot path an Enum class attribute costs about ten
# times a global's (CPython 3.11).
_DONE, _WAIT = DecodeStatus.DONE, DecodeStatus.WAIT_FOR_DATA
_HEARTBEAT, _REQUEST, _RESPONSE = MessageType.HEARTBEAT, MessageType.REQUEST, MessageType.RESPONSE
_OK, _ERROR = ResponseStatus.OK, ResponseStatus.ERROR
_RESPONSE_DIRECTION = Direction.RESPONSE

ERROR_CODES: Mapping[ErrorType, int] = MappingProxyType(
    {
        ErrorType.ROUTE_NOT_FOUND: 404,  # no route matched the request
        ErrorType.OVER_LIMIT: 429,  # a local or global rate limit said no
        ErrorType.UNSPECIFIED: 500,  # anything else: connection failure, overflow, ...
        ErrorType.CLUSTER_NOT_FOUND: 501,  # the route names a cluster the proxy does not have
        ErrorType.BAD_RESPONSE: 502,  # the backend answered bytes that are not awesomerpc
        ErrorType.NO_HEALTHY_UPSTREAM: 503,  # the cluster has no healthy backend
        ErrorType.TIMEOUT: 504,  # the backend did not answer within the request timeout
    }
)
"""The rsp_code of the reply ``on_error`` builds for each error type (HTTP-like, all distinct)."""


def encode_frame(flow: int, cmd: int, body: bytes = b"", rsp_code: int = 0, version: int = PROTOCOL_VERSION) -> bytes:
    """One awesomerpc frame; raises ValueError when a field does not fit its header slot."""
    try:
        header = HEADER.pack(version, flow, HEADER_SIZE + len(body), cmd, rsp_code)
    except struct.error as exc:
        raise ValueError(
            f"awesomerpc frame fields out of range (version u8={version}, flow u32={flow}, "
            f"len u32={HEADER_SIZE + len(body)}, cmd i16={cmd}, rsp_code i16={rsp_code}): {exc}"
        ) from None
    return header + body if body else header


class AwesomeRpcCodec(Codec):
    """The awesomerpc codec; see the module docstring for the wire format."""

    name = "awesomerpc"
    has_request_id = True
    _last_cmd: tuple[int, str, Headers] | None = None  # the last command's number, name and headers

    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        available = len(buffer)
        if available < HEADER_SIZE:
            return _WAIT
        version, flow, length, cmd, rsp_code = HEADER.unpack_from(buffer)
        if length < HEADER_SIZE:
            raise CodecError(f"awesomerpc frame (flow {flow}) announces len {length}, less than its own {HEADER_SIZE}-byte header")
        # Refuse an oversized frame now, before buffering a body we would throw away.
        if length > self.max_frame_size:
            self.check_frame_size(length)
        if available < length:
            return _WAIT
        frame = take_frame(buffer, length)

        if cmd == HEARTBEAT_CMD:
            metadata.message_type = _HEARTBEAT
        else:
            metadata.message_type = _RESPONSE if self.direction is _RESPONSE_DIRECTION else _REQUEST
        metadata.request_id = flow
        metadata.response_status = _OK if rsp_code == 0 else _ERROR
        # A connection sends the same command over and over: its name and headers are made once.
        named = self._last_cmd
        if named is None or named[0] != cmd:
            named = self._last_cmd = (cmd, f"cmd{cmd}", Headers({"cmd": str(cmd)}))
        metadata.operation_name = named[1]
        metadata.header_size = HEADER_SIZE
        metadata.body_size = length - HEADER_SIZE
        metadata.frame = frame
        metadata.headers.update_from(named[2])
        metadata.properties = {"version": version, "cmd": cmd, "rsp_code": rsp_code}
        return _DONE

    def encode(self, metadata: Metadata, mutation: Mapping[str, str]) -> bytes:
        new_cmd = _mutated_cmd(mutation)
        if new_cmd is None:
            return metadata.frame
        frame = bytearray(metadata.frame)
        _CMD.pack_into(frame, _CMD_OFFSET, new_cmd)
        return bytes(frame)

    def on_error(self, metadata: Metadata, error: Error) -> bytes:
        # No body: awesomerpc has no error-message field, the rsp_code says it all. The cmd comes
        # from decode's properties (cmd 0 if the metadata was never decoded by this codec).
        rsp_code = ERROR_CODES.get(error.type, ERROR_CODES[ErrorType.UNSPECIFIED])
        return encode_frame(_flow(metadata), metadata.properties.get("cmd", HEARTBEAT_CMD), rsp_code=rsp_code)

    def heartbeat_reply(self, metadata: Metadata) -> bytes:
        return encode_frame(_flow(metadata), HEARTBEAT_CMD)

    def is_retriable(self, response: Metadata) -> bool:
        # 503: the backend says it cannot serve now; another host may.
        return response.properties.get("rsp_code") == ERROR_CODES[ErrorType.NO_HEALTHY_UPSTREAM]


def _flow(metadata: Metadata) -> int:
    return metadata.request_id if metadata.request_id is not None else 0


def _mutated_cmd(mutation: Mapping[str, str]) -> int | None:
    """The cmd a mutation asks for, or None when it does not touch cmd (keys are case-insensitive)."""
    for key, value in mutation.items():
        if key.lower() != "cmd":
            continue
        try:
            cmd = int(value)
        except (TypeError, ValueError):
            cmd = None
        if cmd is None or not -0x8000 <= cmd <= 0x7FFF:
            raise CodecError(f"awesomerpc mutation cmd={value!r} is not an integer in -32768..32767; fix the route's request_mutation/response_mutation")
        return cmd
    return None
