"""The stream side of a connection: STREAM_DATA and STREAM_CLOSE_* frames in both directions.

STREAM_INIT is routed like a request and binds the stream id to one tunnel (Connection.forward);
what follows here is matched by stream id, never routed again. A stream is in flight until both
sides are closed.
"""

from __future__ import annotations

from metabridge.core.request import ActiveRequest
from metabridge.sdk.codec import ErrorType, Metadata, MessageType

_STREAM_ENDS = (MessageType.STREAM_CLOSE_TWO_WAY, MessageType.RESPONSE, MessageType.ERROR)


class StreamFrames:
    """Mixed into Connection."""

    def _on_client_stream_frame(self, metadata: Metadata) -> None:
        request = self._streams.get(metadata.stream_id)
        if request is None or request.done:
            self.stats.request_stream_unknown += 1
            self._local_reply(metadata, ErrorType.UNSPECIFIED, f"no open stream {metadata.stream_id} on this connection", None)
            return
        self._send(request.link, metadata.frame)
        kind = metadata.message_type
        if kind is MessageType.STREAM_CLOSE_TWO_WAY or (kind is MessageType.STREAM_CLOSE_ONE_WAY and request.upstream_closed):
            self._end_stream(request)
        elif kind is MessageType.STREAM_CLOSE_ONE_WAY:
            request.client_closed = True

    def _on_stream_response(self, request: ActiveRequest, metadata: Metadata) -> None:
        if not request.first_response:
            request.first_response = self._last_activity
        self._route_stats(request).response += 1
        self._queue_reply(metadata.frame, None)
        kind = metadata.message_type
        if kind in _STREAM_ENDS or (kind is MessageType.STREAM_CLOSE_ONE_WAY and request.client_closed):
            self._end_stream(request)
        elif kind is MessageType.STREAM_CLOSE_ONE_WAY:
            request.upstream_closed = True

    def _end_stream(self, request: ActiveRequest) -> None:
        stream_id = request.metadata.stream_id
        self._streams.pop(stream_id, None)
        if request.link is not None:
            request.link.streams.pop(stream_id, None)
        self._settle(request)
        request.replied = self._last_activity
        self._complete(request)
