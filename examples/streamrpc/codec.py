"""The streamrpc codec: metabridge's view of the frames in protocol.py.

Load it as a codec package, the folder (so its relative import of protocol.py works):
``ref: .:StreamRpcCodec`` from a config in this folder (streamrpc.yaml), ``streamrpc:StreamRpcCodec``
from one in examples/. A single-file ref (``streamrpc/codec.py:StreamRpcCodec``) cannot import
protocol.py and fails to load.

One instance decodes one direction, and ``decode`` does not need to know which: it reads the
direction from the frame type (REQUEST and RESPONSE are unary; the four stream types look the
same either way), so ``self.direction`` is not used. What ``decode`` reports:

    frame               message_type           request_id   stream_id   response_status
    INIT                STREAM_INIT            id           id          OK
    DATA                STREAM_DATA            id           id          OK
    HALF_CLOSE          STREAM_CLOSE_ONE_WAY   id           id          OK
    CLOSE               STREAM_CLOSE_TWO_WAY   id           id          ERROR if flagged
    REQUEST             REQUEST                id           None        OK
    RESPONSE            RESPONSE               id           None        ERROR if flagged

Routable headers are the frame's header block (``method``, ``service``, ...). Mutations add or
replace entries on INIT and REQUEST frames; other frames are passed on unchanged. ``on_error``
answers a stream with CLOSE+ERROR (which ends it) and a unary call with RESPONSE+ERROR, both with
the header ``code`` (the ErrorType's value, e.g. ``route_not_found``) and the message as body.
There is no heartbeat.
"""

from __future__ import annotations

from collections.abc import Mapping

from metabridge.sdk.codec import Codec, CodecError, DecodeStatus, Error, MalformedFrame, Metadata, MessageType, ResponseStatus, take_frame

from .protocol import FLAG_ERROR, HEADER_SIZE, STREAM_TYPES, FrameType, ProtocolError, encode_frame, parse_frame, parse_headers, peek_header

MESSAGE_TYPES = {
    FrameType.INIT: MessageType.STREAM_INIT,
    FrameType.DATA: MessageType.STREAM_DATA,
    FrameType.HALF_CLOSE: MessageType.STREAM_CLOSE_ONE_WAY,
    FrameType.CLOSE: MessageType.STREAM_CLOSE_TWO_WAY,
    FrameType.REQUEST: MessageType.REQUEST,
    FrameType.RESPONSE: MessageType.RESPONSE,
}
_STREAM_MESSAGES = frozenset(MESSAGE_TYPES[t] for t in STREAM_TYPES)
_MUTABLE = (FrameType.INIT, FrameType.REQUEST)


class StreamRpcCodec(Codec):
    name = "streamrpc"
    has_request_id = True

    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        try:
            header = peek_header(buffer)
        except ProtocolError as exc:
            raise CodecError(str(exc)) from None
        if header is None:
            return DecodeStatus.WAIT_FOR_DATA
        self.check_frame_size(header.length)  # before waiting for a body we would refuse
        if len(buffer) < header.length:
            return DecodeStatus.WAIT_FOR_DATA
        frame = take_frame(buffer, header.length)
        try:
            headers = parse_headers(frame[HEADER_SIZE : HEADER_SIZE + header.hlen])
        except ProtocolError as exc:
            raise MalformedFrame(str(exc), header.id) from None

        is_stream = header.type in STREAM_TYPES
        metadata.message_type = MESSAGE_TYPES[header.type]
        metadata.request_id = header.id
        metadata.stream_id = header.id if is_stream else None
        metadata.response_status = ResponseStatus.ERROR if header.flags & FLAG_ERROR else ResponseStatus.OK
        method = headers.get("method", "")
        metadata.operation_name = f"{headers['service']}/{method}" if "service" in headers else method
        metadata.header_size = HEADER_SIZE + header.hlen
        metadata.body_size = header.length - metadata.header_size
        metadata.frame = frame
        metadata.headers.update(headers)
        metadata.properties["type"] = header.type
        return DecodeStatus.DONE

    def encode(self, metadata: Metadata, mutation: Mapping[str, str]) -> bytes:
        if not mutation or metadata.properties.get("type") not in _MUTABLE:
            return metadata.frame
        frame = parse_frame(metadata.frame)
        headers = {**frame.headers, **{key.lower(): value for key, value in mutation.items()}}
        try:
            return encode_frame(frame.type, frame.id, frame.body, headers, frame.flags)
        except ProtocolError as exc:
            raise CodecError(f"streamrpc mutation {dict(mutation)!r} cannot be written: {exc}; fix the route's request_mutation") from None

    def on_error(self, metadata: Metadata, error: Error) -> bytes:
        if metadata.message_type in _STREAM_MESSAGES:
            type_, id_ = FrameType.CLOSE, metadata.stream_id if metadata.stream_id is not None else metadata.request_id
        else:
            type_, id_ = FrameType.RESPONSE, metadata.request_id
        return encode_frame(type_, id_ or 0, error.message.encode(), {"code": error.type.value}, FLAG_ERROR)
