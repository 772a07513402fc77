"""The response side of a connection: decode what a tunnel carries and match it to its request
(by request id, or in order for protocols without one)."""

from __future__ import annotations

from bisect import bisect_left

from metabridge.core.pool import Link
from metabridge.core.request import ActiveRequest
from metabridge.sdk.codec import CodecError, DecodeStatus, ErrorType, FrameTooLarge, MalformedFrame, MessageType, Metadata, ResponseStatus
from metabridge.stats import TIME_BOUNDS_MS

# Enum members as module constants: on the hot path an Enum class attribute costs about ten
# times a global's (CPython 3.11).
_WAIT = DecodeStatus.WAIT_FOR_DATA
_HEARTBEAT, _ERROR, _STATUS_ERROR = MessageType.HEARTBEAT, MessageType.ERROR, ResponseStatus.ERROR


class ResponseMatching:
    """Mixed into Connection."""

    def _on_tunnel_data(self, link: Link, data: bytes) -> None:
        buffer = link.buffer
        buffer += data
        codec = link.codec
        stats = self.stats
        by_id = self._by_id
        while buffer:
            metadata = Metadata()
            try:
                if codec.decode(buffer, metadata) is _WAIT:
                    if len(buffer) <= self._max_frame:
                        return
                    raise FrameTooLarge(f"partial response of {len(buffer)} bytes exceeds max_frame_size {self._max_frame}")
            except MalformedFrame as exc:
                # One bad response, stream still in step: only its request gets BAD_RESPONSE.
                stats.response_decoding_error += 1
                request = self._take(link, exc.request_id)
                if request is not None:
                    self.fail(request, ErrorType.BAD_RESPONSE, f"undecodable response from {link.tunnel.upstream_host or link.tunnel.cluster}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - CodecError or a codec bug: the stream is lost
                stats.response_decoding_error += 1
                if not isinstance(exc, CodecError):
                    self._codec_failed("decode", exc, None, direction="response")
                self._drop_link(link, ErrorType.BAD_RESPONSE, f"undecodable response from {link.tunnel.upstream_host or link.tunnel.cluster}: {exc}", reset=True)
                return
            kind = metadata.message_type
            if kind is _HEARTBEAT:
                continue  # upstream heartbeats are never forwarded
            if link.streams:
                request = link.streams.get(metadata.stream_id)
                if request is not None:
                    self._on_stream_response(request, metadata)
                    continue
            # _take, with its by-id case inline
            request = link.by_id.pop(metadata.request_id, None) if by_id else self._take(link, metadata.request_id)
            if request is None:
                stats.response_unmatched += 1
                continue
            self._on_response(request, metadata)

    def _retriable(self, link, metadata: Metadata) -> bool:
        """The codec's optional is_retriable, contained: a codec bug there means "not retriable"
        (the response is passed on), logged and counted as a codec_error."""
        try:
            return bool(link.codec.is_retriable(metadata))
        except Exception as exc:  # noqa: BLE001 - plugin code
            self._codec_failed("is_retriable", exc, metadata, direction="response")
            return False

    def _on_response(self, request: ActiveRequest, metadata: Metadata) -> None:
        route = request.route
        if request.mirror:
            self._settle(request)
            self.stats.mirror(route.name, request.cluster).mirror_response += 1  # read and dropped
            return
        retry = route.retry
        if retry is not None and "retriable_error" in retry.retry_on and self._retriable(request.link, metadata) and self.retry(request, "retriable_error", request.link):
            return
        now = request.first_response = self._last_activity
        self._settle(request)
        # Its outcome and time, by (route, cluster): RouteStats.observe, inline.
        stats = self.stats.routes.get((route.name, request.cluster))
        if stats is None:
            stats = self.stats.route(route.name, request.cluster)
        stats.response += 1
        if metadata.message_type is _ERROR or metadata.response_status is _STATUS_ERROR:
            stats.response_error += 1
        else:
            stats.response_success += 1
        ms = (now - request.received) * 1000.0
        stats.buckets[bisect_left(TIME_BOUNDS_MS, ms)] += 1
        stats.sum_ms += ms
        chain = self.listener.chain
        if chain.filters:
            request.response = metadata  # for filters only; dropped once they are done
            chain.on_response(request, metadata)
        mutation = request.route.response_mutation
        if request.response_mutation:
            mutation = {**mutation, **request.response_mutation}
        elif not mutation and self._reply_order is None:
            request.replied = self._last_activity
            self._to_client.append(metadata.frame)  # the common case of _queue_reply, inline
            if request.next_filter > 0:
                self._complete(request)
            return
        frame = metadata.frame
        if mutation:
            try:
                frame = request.link.codec.encode(metadata, mutation)
            except Exception as exc:  # noqa: BLE001
                if not isinstance(exc, CodecError):
                    self._codec_failed("encode", exc, metadata, direction="response")
                self._local_reply(request.metadata, ErrorType.BAD_RESPONSE, f"route {request.route.name!r}: response_mutation cannot be applied: {exc}", request)
                return
        self._queue_reply(frame, request)

    def _take(self, link: Link, request_id) -> ActiveRequest | None:
        """Remove and return the request a response on this tunnel answers: by id, or the oldest
        one for protocols without ids. None when nothing waits for it (for in-order protocols:
        the late response of a request that already timed out)."""
        if self._by_id:
            return link.by_id.pop(request_id, None)
        if not link.in_order:
            return None
        request = link.in_order.popleft()
        return None if request.done else request
