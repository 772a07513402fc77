"""One client connection: the decode loop, limits, reply order and replies.

Sans-IO toward its transport. The transport feeds ``receive_client`` (the client's bytes) and
``receive_upstream`` (HCM's HTTP/2 bytes), then calls ``take`` for what to send: bytes for HCM,
bytes for the client, and whether to close the connection. Work that starts on a timer or when
a filter resumes a paused request ends with a call to ``wake``, after which the transport takes
the output again. Time comes from a Clock (metabridge.core.clock).

Every request is accounted for: it gets its response or exactly one local reply (the codec's
``on_error``), or, when not even that can be built, the connection is closed. Exceptions from
the codec are contained here (``codec_error``); those from filters in metabridge.core.chain.

The class is split by job: this module has the request side, completion and replies; the
response side is metabridge.core.responses, streams metabridge.core.streams, tunnel failures and
drains metabridge.core.upstream_events, timers and buffer accounting metabridge.core.timers.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable

from metabridge.core.clock import Clock
from metabridge.core.pool import Link, UpstreamPool
from metabridge.core.request import ActiveRequest
from metabridge.core.responses import ResponseMatching
from metabridge.core.router import route_request
from metabridge.core.streams import StreamFrames
from metabridge.core.timers import ConnectionTimers
from metabridge.core.upstream_events import UpstreamEvents
from metabridge.core.tunnels import (
    ConnectionDraining,
    ConnectionLost,
    TunnelClosed,
    TunnelFailed,
    TunnelOpened,
    TunnelState,
    Upstream,
)
from metabridge.logs import event, failure
from metabridge.sdk.codec import CodecError, DecodeStatus, Error, ErrorType, FrameTooLarge, MessageType, Metadata
from metabridge.stats import RouteStats

log = logging.getLogger("metabridge.connection")

_EMPTY = b""
# Enum members as module constants: on the hot path an Enum class attribute costs about ten
# times a global's (CPython 3.11).
_WAIT = DecodeStatus.WAIT_FOR_DATA
_ONEWAY, _HEARTBEAT, _RESPONSE, _ERROR, _STREAM_INIT = MessageType.ONEWAY, MessageType.HEARTBEAT, MessageType.RESPONSE, MessageType.ERROR, MessageType.STREAM_INIT
_OPENING, _CLOSED = TunnelState.OPENING, TunnelState.CLOSED
_STREAM_FOLLOWERS = (MessageType.STREAM_DATA, MessageType.STREAM_CLOSE_ONE_WAY, MessageType.STREAM_CLOSE_TWO_WAY)


class Connection(ResponseMatching, StreamFrames, UpstreamEvents, ConnectionTimers):
    # Its many attributes as slots: past 30 an instance dict stops sharing its keys (CPython
    # 3.11) and every attribute access on the hot path gets slower. The mixins have no slots,
    # so an instance still has a __dict__ (for anything else set on it).
    __slots__ = (
        "listener", "stats", "clock", "_now", "id", "_wake", "_max_frame", "_max_in_flight", "_max_client_buffer",
        "_max_upstream_queue", "_frame_timeout", "codec", "_by_id", "upstream", "pool", "_inbuf", "_to_client",
        "_to_links", "_reply_order", "_streams", "_paused", "active", "_holding", "_upstream_full", "_buffered",
        "_partial_since", "_frame_timer", "_stopped_reading", "_half_closed", "_finished", "_close", "_end_client",
        "_in_event", "_last_activity", "_deadline_fifo", "_deadline_heap", "_deadline_timer", "_deadline_armed",
        "_idle_timer", "_probe_interval", "_probe_timer", "_shadows",
    )  # fmt: skip

    def __init__(self, listener, clock: Clock, connection_id: str = "", wake: Callable[[], None] | None = None) -> None:
        self.listener = listener  # metabridge.core.runtime.ListenerRuntime
        self.stats = stats = listener.stats
        self.clock = clock
        self._now = clock.now  # read on every event: one attribute, not the clock's method lookup
        self.id = connection_id
        self._wake = wake or (lambda: None)
        config = listener.config
        self._max_frame = config.max_frame_size
        self._max_in_flight = config.max_requests_in_flight
        self._max_client_buffer = config.max_client_buffer
        self._max_upstream_queue = config.max_upstream_queue
        self._frame_timeout = config.frame_timeout
        self.codec = listener.new_codec()
        self._by_id = listener.codec_cls.has_request_id
        self.upstream = Upstream()
        self.pool = UpstreamPool(self)
        self._inbuf = bytearray()
        self._to_client: list[bytes] = []
        # Frames routed to each tunnel while handling one event: sent as one HTTP/2 DATA frame
        # per tunnel (pipelined clients put several requests in one read).
        self._to_links: dict[Link, list[bytes]] = {}
        # Without request ids the client matches replies by position: release them in request
        # order, even when tunnels to different clusters or local replies answer out of order.
        self._reply_order: deque[ActiveRequest] | None = None if self._by_id else deque()
        self._streams: dict[object, ActiveRequest] = {}
        self._paused: set[ActiveRequest] = set()  # held by a filter (answered or resumed later)
        self.active = 0  # two-way requests and streams in flight
        self._shadows = 0  # mirror copies waiting for their answer (read and dropped)
        self._holding = False  # decoding paused: bytes wait in _inbuf (in-flight or upstream limit)
        self._upstream_full = False  # some tunnel's queue is over max_upstream_queue
        self._buffered = 0  # this connection's share of the process's ByteBudget
        self._partial_since = 0.0  # when the partial frame at the end of _inbuf began
        self._frame_timer = None
        self._stopped_reading = False  # a bad request: nothing more is decoded
        self._half_closed = False  # the client sent FIN
        self._finished = False  # we ended (or are ending) the connection
        self._close = False
        self._end_client = False  # HCM ended the connection: pass the end to the client
        self._in_event = False
        now = clock.now()
        self._last_activity = now
        # Request deadlines (metabridge.core.timers): requests in deadline order in a FIFO, the few
        # that arrive with an earlier deadline than the last one in a heap; one timer.
        self._deadline_fifo: deque[ActiveRequest] = deque()
        self._deadline_heap: list = []
        self._deadline_timer = None
        self._deadline_armed = 0.0
        self._idle_timer = clock.call_at(now + config.idle_timeout, self._check_idle)
        self._probe_interval = config.drain_probe_interval
        self._probe_timer = clock.call_at(now + self._probe_interval, self._probe_drain) if self._probe_interval else None
        stats.downstream_cx_total += 1
        stats.downstream_cx_active += 1

    # ---- transport -> core ------------------------------------------------------------------

    def receive_client(self, data: bytes, end_of_stream: bool) -> None:
        """Client bytes: decode every whole frame, run each request through the chain."""
        self._last_activity = self._now()
        if self._finished:
            return
        self._in_event = True
        try:
            if data and not self._stopped_reading:
                self._inbuf += data
                self._decode_requests()
            if end_of_stream:
                self._half_closed = True
                self._finish_if_drained()
            if self._to_links:
                self._flush_links()
        finally:
            self._in_event = False

    def receive_upstream(self, data: bytes, end_of_stream: bool) -> None:
        """HCM's HTTP/2 bytes: tunnel events, responses for the client."""
        self._last_activity = self._now()
        if self._finished:
            return
        self._in_event = True
        try:
            for ev in self.upstream.receive(data) if data else ():
                if type(ev) is tuple:  # (tunnel, data): a tunnel's bytes
                    link = ev[0].owner
                    if not link.dropped:  # e.g. reset for a bad response earlier in this batch
                        self._on_tunnel_data(link, ev[1])
                elif type(ev) is TunnelOpened:
                    self._on_tunnel_opened(ev.tunnel.owner)
                elif type(ev) is TunnelFailed:
                    self._on_tunnel_failed(ev.tunnel.owner, ev.status, ev.flags)
                elif type(ev) is TunnelClosed:
                    tunnel = ev.tunnel
                    self._drop_link(tunnel.owner, ErrorType.UNSPECIFIED, f"{ev.reason} (cluster {tunnel.cluster!r}, host {tunnel.upstream_host or 'unknown'})", retry_on="reset")
                elif type(ev) is ConnectionDraining:
                    self._on_draining(ev)
                elif type(ev) is ConnectionLost:
                    self._on_connection_lost(ev.reason)
            if self._upstream_full:
                self._upstream_full = any(len(link.tunnel.backlog) > self._max_upstream_queue for link in self.pool.links())
            if end_of_stream:
                # HCM ended the downstream connection: answer what waits, then pass the end on.
                for link in self.pool.links():
                    self._drop_link(link, ErrorType.UNSPECIFIED, "Envoy closed the connection's upstream side")
                self._finished = True
                self._end_client = True
            if self._holding or self._to_links:
                self._after_event()
        finally:
            self._in_event = False

    def take(self) -> tuple[bytes, bytes, bool, bool]:
        """(bytes for HCM, bytes for the client, close the connection, end the client's side)."""
        to_client = self._to_client
        if to_client:
            client = to_client[0] if len(to_client) == 1 else _EMPTY.join(to_client)
            to_client.clear()
        else:
            client = _EMPTY
        if self._close or self._end_client:
            close, end = self._close, self._end_client
            self._close = self._end_client = False
            return self.upstream.output(), client, close, end
        return self.upstream.output(), client, False, False

    def close(self) -> None:
        """The transport is gone (the client connection closed): free everything."""
        self._idle_timer.cancel()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        self._cancel_deadlines()
        if self._frame_timer is not None:
            self._frame_timer.cancel()
        self._release_buffer()
        event(log, logging.DEBUG, "connection_closed", listener=self.listener.name, connection=self.id, requests_in_flight=self.active)
        waiting = [*self._paused, *(r for link in self.pool.links() for r in link.pending())]
        if self._shadows:
            self._abandon_shadows(waiting)
        for link in self.pool.links():
            self._cancel_setup_timer(link)
        if self.active and not self._finished:
            self.stats.cx_destroy_remote_with_active_rq += 1  # the client left before its replies
        for request in waiting:
            self._settle(request)
            self._complete(request)
        self.stats.downstream_cx_active -= 1
        self._finished = True

    # ---- requests ---------------------------------------------------------------------------

    def _decode_requests(self) -> None:
        inbuf = self._inbuf
        codec = self.codec
        stats = self.stats
        was_holding, self._holding = self._holding, False
        while inbuf:
            if (self.active >= self._max_in_flight or self._upstream_full) and len(inbuf) <= self._max_client_buffer:
                self._holding = True  # backpressure: the bytes wait until requests complete
                if not was_holding:
                    if self._upstream_full:
                        stats.downstream_paused_upstream_full += 1
                    else:
                        stats.downstream_paused_in_flight += 1
                break
            metadata = Metadata()
            try:
                status = codec.decode(inbuf, metadata)
            except CodecError as exc:
                self._bad_request(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - plugin code: contained, logged, counted
                self._codec_failed("decode", exc, None)
                self._bad_request(f"codec failed: {type(exc).__name__}: {exc}")
                return
            if status is _WAIT:
                if len(inbuf) > self._max_frame:
                    self._bad_request(str(FrameTooLarge(f"partial frame of {len(inbuf)} bytes exceeds max_frame_size {self._max_frame}")))
                    return
                break
            self._partial_since = 0.0
            stats.request_decoding_success += 1
            self._on_request(metadata)
            if self._finished or self._stopped_reading:
                return
        if inbuf or self._buffered:
            self._track_buffer()
        else:
            self._partial_since = 0.0

    def _on_request(self, metadata: Metadata) -> None:
        stats = self.stats
        stats.request += 1
        kind = metadata.message_type
        if kind is _HEARTBEAT:
            stats.request_heartbeat += 1
            self._answer_heartbeat(metadata)
            return
        if kind in _STREAM_FOLLOWERS:
            self._on_client_stream_frame(metadata)
            return
        if kind is _RESPONSE or kind is _ERROR:
            event(log, logging.WARNING, "client_sent_response_dropped", listener=self.listener.name, operation=metadata.operation_name)
            return
        request = ActiveRequest(self, metadata, self._last_activity)
        if kind is _ONEWAY:
            stats.request_oneway += 1
        else:
            if kind is _STREAM_INIT:
                request.is_stream = True
                stats.request_stream += 1
            else:
                stats.request_twoway += 1
            self.active += 1
            stats.request_active += 1
            if self._reply_order is not None:
                self._reply_order.append(request)
            if self.active > self._max_in_flight or self._upstream_full:
                stats.request_overflow += 1
                self.fail(request, ErrorType.OVER_LIMIT, f"connection over its limits ({self.active - 1} requests in flight, max_requests_in_flight {self._max_in_flight}; or its upstream queue is full)")
                return
            if request.is_stream and (metadata.stream_id in self._streams or not self._by_id):
                problem = "is already open on this connection" if self._by_id else "cannot be matched: streams need a codec with request ids"
                self.fail(request, ErrorType.UNSPECIFIED, f"stream {metadata.stream_id} {problem}")
                return
        chain = self.listener.chain
        if chain.filters:
            chain.start(request)
            if request.paused:
                self._paused.add(request)
        else:
            route_request(request)

    def answer(self, request: ActiveRequest, kind: ErrorType, message: str) -> None:
        """A filter's local reply, now or later (from a timer or a callback)."""
        self._event(self.fail, request, kind, message)

    def resume(self, request: ActiveRequest) -> None:
        """A paused request goes on with the next filter (called by the filter that paused it)."""
        if request.done or not request.paused:
            return
        request.paused = False
        self._paused.discard(request)
        self._event(self.listener.chain.start, request)

    def encode_request(self, request: ActiveRequest, mutation) -> bytes | None:
        """The request frame with ``mutation`` applied, or None after answering the request."""
        try:
            return self.codec.encode(request.metadata, mutation)
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, CodecError):
                self._codec_failed("encode", exc, request.metadata)
            self.fail(request, ErrorType.UNSPECIFIED, f"route {request.route.name!r}: request_mutation cannot be applied: {exc}")
            return None

    def forward(self, request: ActiveRequest, frame: bytes, timeout: float) -> None:
        """Send a routed request into a tunnel of its cluster (the router's last step)."""
        metadata = request.metadata
        if self.upstream.lost:
            self.fail(request, ErrorType.UNSPECIFIED, "the connection to Envoy's upstream side is gone")
            return
        route = request.route
        keys = route.hash_policy
        if keys:
            headers = metadata.headers
            key = headers.get(keys[0], "") if len(keys) == 1 else "\x1f".join([headers.get(k, "") for k in keys]).strip("\x1f")
            request.hash_key = key
            link = self.pool.pick_hashed(request.cluster, key) if key else self.pool.pick(request.cluster)
        else:
            link = self.pool.pick(request.cluster)
        if link is None:
            self.fail(request, ErrorType.UNSPECIFIED, f"Envoy is draining this connection: no new upstream connection to cluster {request.cluster!r}")
            return
        request.attempt += 1
        request.forwarded = self._last_activity
        if metadata.message_type is _ONEWAY:
            self._send(link, frame)
            if route.mirrors:
                self._mirror(request, frame, timeout)
            self._complete(request)
            return
        by_id = link.by_id
        if self._by_id and not request.is_stream and metadata.request_id not in by_id:
            by_id[metadata.request_id] = request  # the common case of _register, inline
            request.link = link
            link.active += 1
        elif not self._register(request, link):
            return
        if not request.is_stream:
            request.expires = deadline = self._last_activity + timeout
            retry = route.retry
            if retry is not None and retry.per_try_timeout is not None:
                deadline = min(deadline, self._last_activity + retry.per_try_timeout)
            request.deadline = deadline
            fifo = self._deadline_fifo
            if fifo and deadline < fifo[-1].deadline or self._deadline_timer is None or deadline < self._deadline_armed:
                self._add_deadline(request)
            else:
                fifo.append(request)  # the common case of _add_deadline, inline
            if retry is not None or link.tunnel.state is _OPENING:
                request.frame = frame  # it may be sent again: a retry, or a re-dispatch if the tunnel never connects
            else:
                metadata.frame = _EMPTY  # sent: a request in flight does not pin its bytes
        else:
            self._streams[metadata.stream_id] = request
        frames = self._to_links.get(link)
        if frames is None:
            self._to_links[link] = [frame]
        else:
            frames.append(frame)
        if route.mirrors:
            self._mirror(request, frame, timeout)

    def _mirror(self, request: ActiveRequest, frame: bytes, timeout: float) -> None:
        """Copies for the route's mirror clusters: sent beside the request, their replies read
        and dropped; nothing that happens to a copy reaches the client or delays its reply."""
        stats = self.stats
        route = request.route
        oneway = request.metadata.message_type is _ONEWAY
        for policy in route.mirrors:
            if policy.fraction < 100 and random.random() * 100 >= policy.fraction:
                continue
            link = self.pool.pick(policy.cluster)
            if link is None:
                stats.mirror(route.name, policy.cluster).mirror_failed += 1
                continue
            stats.mirror(route.name, policy.cluster).mirror_sent += 1
            self._send(link, frame)
            if oneway or request.is_stream:
                continue
            shadow = ActiveRequest(self, request.metadata, self._last_activity)
            shadow.mirror = True
            shadow.route = request.route
            shadow.cluster = policy.cluster
            shadow.attempt = 1
            shadow.forwarded = self._last_activity
            shadow.expires = shadow.deadline = self._last_activity + timeout
            if link.tunnel.state is _OPENING:
                shadow.frame = frame
            self._shadows += 1  # until it settles (at once when _register answers it)
            if self._register(shadow, link):
                self._add_deadline(shadow)

    def _abandon_shadows(self, waiting: list[ActiveRequest]) -> None:
        """The client connection ended with mirror copies unanswered: Envoy ends the tunnels with
        it, so they are given up; counted per (route, mirror cluster) as mirror_abandoned."""
        counts: dict[tuple[str, str], int] = {}
        for request in waiting:
            if request.mirror and not request.done:
                key = (request.route.name, request.cluster)
                counts[key] = counts.get(key, 0) + 1
        for (route, cluster), n in counts.items():
            self.stats.mirror(route, cluster).mirror_abandoned += n
            event(log, logging.DEBUG, "mirror_abandoned", listener=self.listener.name, connection=self.id, route=route, cluster=cluster, copies=n, reason="the client connection ended before their answers")

    def pick_for(self, request: ActiveRequest, avoid: Link | None = None) -> Link | None:
        """Another link for a request being sent again (by its hash key, when it has one)."""
        if request.hash_key:
            return self.pool.pick_hashed(request.cluster, request.hash_key, avoid=avoid)
        return self.pool.pick(request.cluster, avoid=avoid)

    def retry(self, request: ActiveRequest, reason: str, failed: Link | None) -> bool:
        """Send a request again, on another host's tunnel when the cluster has one, if its
        route's retry_policy allows it for ``reason``; False when it does not."""
        route = request.route
        policy = route.retry if route is not None else None
        if policy is None or reason not in policy.retry_on or request.mirror or request.is_stream or request.attempt > policy.num_retries or not request.frame:
            return False
        now = self.clock.now()
        if now >= request.expires or self.upstream.lost:
            return False
        link = self.pick_for(request, avoid=failed)
        if link is None:
            return False
        if request.link is not None:
            self._detach(request, request.link, keep_place=True)
        if not self._register(request, link):
            return True  # answered (an id clash on the new tunnel)
        request.attempt += 1
        self.stats.route(route.name, request.cluster).request_retry += 1
        event(log, logging.DEBUG, "request_retry", listener=self.listener.name, connection=self.id, cluster=request.cluster, reason=reason, attempt=request.attempt, request_id=request.metadata.request_id)
        request.deadline = min(request.expires, now + policy.per_try_timeout) if policy.per_try_timeout else request.expires
        self._add_deadline(request)
        self._send(link, request.frame)
        return True

    def _register(self, request: ActiveRequest, link: Link) -> bool:
        metadata = request.metadata
        if request.is_stream:
            link.streams[metadata.stream_id] = request
        elif self._by_id:
            if metadata.request_id in link.by_id:
                # Responses are matched by id per tunnel: a second request with the same id on
                # it could not be told apart from the first.
                self.fail(request, ErrorType.UNSPECIFIED, f"request id {metadata.request_id} is already in flight on this connection")
                return False
            link.by_id[metadata.request_id] = request
        else:
            link.in_order.append(request)
        request.link = link
        link.active += 1
        return True

    def _send(self, link: Link, frame: bytes) -> None:
        frames = self._to_links.get(link)
        if frames is None:
            self._to_links[link] = [frame]
        else:
            frames.append(frame)

    def _answer_heartbeat(self, metadata: Metadata) -> None:
        try:
            reply = self.codec.heartbeat_reply(metadata)
        except Exception as exc:  # noqa: BLE001
            self._codec_failed("heartbeat_reply", exc, metadata)
            self._close_now("the codec cannot answer a heartbeat")
            return
        self._queue_reply(reply, None)

    def _bad_request(self, message: str) -> None:
        """A request that cannot be decoded: decode nothing more, answer what is in flight, close."""
        self.stats.request_decoding_error += 1
        self.stats.downstream_cx_closed_bad_request += 1
        event(log, logging.WARNING, "bad_request_closing_connection", listener=self.listener.name, connection=self.id, error=message, requests_in_flight=self.active)
        self._stopped_reading = True
        self._inbuf.clear()
        self._track_buffer()
        self._finish_if_drained()

    # ---- completion -------------------------------------------------------------------------

    def _settle(self, request: ActiveRequest) -> None:
        """Mark a request answered (by its response or a local reply), or given up."""
        if request.done:
            return
        request.done = True
        if request.mirror:
            if request.link is not None:
                request.link.active -= 1
            shadows = self._shadows = self._shadows - 1
            if shadows == 0 and self.active == 0:
                self._finish_if_drained()
            return
        if request.metadata.message_type is _ONEWAY:
            return
        link = request.link
        if link is not None:
            link.active -= 1
            if link.retiring and link.active == 0:
                self._drop_link(link, ErrorType.UNSPECIFIED, "retired: another tunnel serves its host")
        active = self.active = self.active - 1
        self.stats.request_active -= 1
        # Settled requests leave the deadline queue from its head at once, and from behind a
        # slow one within a few requests, so none is kept for up to a whole timeout.
        fifo, heap = self._deadline_fifo, self._deadline_heap
        while fifo and fifo[0].done:
            fifo.popleft()
        if (fifo or heap) and len(fifo) + len(heap) > 2 * active + 8:
            self._compact_deadlines()
        if active == 0 and (self._half_closed or self._stopped_reading or self.upstream.draining):
            self._finish_if_drained()

    def fail(self, request: ActiveRequest, kind: ErrorType, message: str) -> None:
        """Answer a request with a local reply (once; a request already answered is left alone)."""
        if request.done:
            return
        if request.paused:
            request.paused = False
            self._paused.discard(request)
        link = request.link
        if link is not None:
            metadata = request.metadata
            if request.is_stream:
                link.streams.pop(metadata.stream_id, None)
                self._streams.pop(metadata.stream_id, None)
            elif self._by_id and link.by_id.get(metadata.request_id) is request:
                del link.by_id[metadata.request_id]
        self._settle(request)
        if request.mirror:
            self.stats.mirror(request.route.name, request.cluster).mirror_failed += 1  # counted, never answered
            return
        self._local_reply(request.metadata, kind, message, request, timed=True)

    def _route_stats(self, request: ActiveRequest | None) -> RouteStats:
        """Where a request's outcome counts: its (route, cluster), or ("", "") before routing."""
        route = request.route if request is not None else None
        return self.stats.route(route.name, request.cluster) if route is not None else self.stats.route("", "")

    def _local_reply(self, metadata: Metadata, kind: ErrorType, message: str, request: ActiveRequest | None, timed: bool = False) -> None:
        """The codec's error reply; ``timed``: the request's time ends here (not after its
        response was already timed)."""
        stats = self._route_stats(request)
        stat = "local_response_" + kind.value
        setattr(stats, stat, getattr(stats, stat) + 1)
        if timed and metadata.message_type is not _ONEWAY:
            stats.observe((self._last_activity - request.received) * 1000.0)
        event(log, logging.INFO, "local_reply", listener=self.listener.name, connection=self.id, error=kind.value, message=message, request_id=metadata.request_id, operation=metadata.operation_name)
        if request is not None:
            request.error = kind
        if metadata.message_type is _ONEWAY:
            # Nobody reads a reply to a oneway message; one would be taken for the next call's.
            if request is not None:
                self._complete(request)
            return
        try:
            reply = self.codec.on_error(metadata, Error(kind, message))
        except Exception as exc:  # noqa: BLE001
            self._codec_failed("on_error", exc, metadata)
            self._close_now(f"the codec cannot build an error reply ({kind.value}: {message})")
            return
        self._queue_reply(reply, request)

    def _queue_reply(self, data: bytes, request: ActiveRequest | None) -> None:
        """Queue bytes for the client; for in-order protocols, only once earlier requests are answered."""
        order = self._reply_order
        if request is not None:
            request.replied = self._last_activity
            request.reply_size = len(data)
        if order is None or request is None and not order:
            self._to_client.append(data)
        else:
            if request is None:  # a reply to a message that never waited (heartbeat, unknown stream)
                request = ActiveRequest(self, Metadata(), self._last_activity)
                request.done = True
                order.append(request)
            request.reply = data
            while order and order[0].reply is not None:
                self._to_client.append(order.popleft().reply)
        if request is not None and request.next_filter > 0:
            self._complete(request)

    def _complete(self, request: ActiveRequest) -> None:
        """The chain's on_complete, once per request that reached a filter."""
        if request.next_filter > 0:
            self.listener.chain.on_complete(request)
            request.next_filter = -1
            request.response = None  # its bytes are the client's now

    # ---- failures ---------------------------------------------------------------------------

    def _codec_failed(self, hook: str, exc: Exception, metadata: Metadata | None, direction: str = "request") -> None:
        self.stats.codec_error += 1
        failure(
            log,
            "codec_error",
            exc,
            listener=self.listener.name,
            codec=type(self.codec).__name__,  # the class this connection started with (a reload may have changed the listener's)
            hook=hook,
            direction=direction,
            connection=self.id,
            request_id=metadata.request_id if metadata is not None else None,
        )

    def _close_now(self, reason: str) -> None:
        event(log, logging.WARNING, "closing_connection", listener=self.listener.name, connection=self.id, reason=reason, requests_in_flight=self.active)
        if self.active and not self._finished:
            self.stats.cx_destroy_local_with_active_rq += 1
        self._finished = True
        self._close = True

    # ---- timers and limits ------------------------------------------------------------------

    def _event(self, fn, *args) -> None:
        """Run work that did not come from the transport (a timer, a resumed request), contain
        what it raises, and wake the transport to send what it produced."""
        if self._finished:
            return
        nested = self._in_event
        self._in_event = True
        try:
            self._last_activity = self.clock.now()
            fn(*args)
            self._after_event()
        except Exception as exc:  # noqa: BLE001 - a bug must not leave requests unanswered silently
            self.stats.internal_error += 1
            failure(log, "internal_error", exc, listener=self.listener.name, connection=self.id)
            self._close_now("internal error")
        finally:
            self._in_event = nested
        if not nested:
            self._wake()

    def _after_event(self) -> None:
        if self._holding and not self._finished and not self._stopped_reading and self.active < self._max_in_flight and not self._upstream_full:
            self._decode_requests()
        self._flush_links()

    def _flush_links(self) -> None:
        to_links = self._to_links
        if not to_links:
            return
        upstream = self.upstream
        limit = self._max_upstream_queue
        for link, frames in to_links.items():
            tunnel = link.tunnel
            if tunnel.state is not _CLOSED:
                upstream.send(tunnel, frames[0] if len(frames) == 1 else _EMPTY.join(frames))
                if len(tunnel.backlog) > limit:
                    self._upstream_full = True
        to_links.clear()

    def _finish_if_drained(self) -> None:
        """After the client's FIN, a bad request or Envoy's drain: end the connection once every
        request has its reply and every mirror copy its answer (or its deadline)."""
        if self.active == 0 and self._shadows == 0 and not self._finished and (self._half_closed or self._stopped_reading or self.upstream.draining):
            self._finished = True
            self._close = True
