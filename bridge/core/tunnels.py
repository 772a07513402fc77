"""The bridge's HTTP/2 client side toward Envoy's HTTP connection manager.

Each downstream connection gets one HTTP/2 connection, spoken through the ext_proc stream: what
this module writes goes to Envoy as read_data, what HCM answers arrives as write_data. Every
CONNECT stream on it is a tunnel: Envoy opens one upstream TCP connection for it to an endpoint
of the cluster named in CLUSTER_HEADER, chosen by its own load balancer.

HCM's SETTINGS_MAX_CONCURRENT_STREAMS is honoured: a tunnel opened while that many streams are
open waits here, without a stream id, until one ends (what is sent to it meanwhile is kept in
its backlog); the connection's tunnel-setup timer bounds the wait. A CONNECT that HCM resets with
REFUSED_STREAM (RFC 9113 8.7: not processed) fails with the flag ``REFUSED_STREAM``.

This module knows HTTP/2 and tunnels, nothing about codecs or routing.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from metabridge import wire
from metabridge.transport.http2 import CANCEL, DATA, NO_ERROR, PREFACE, REFUSED_STREAM, H2Stream, Http2Connection, ProtocolError, pack_frame_header

CLUSTER_HEADER = wire.CLUSTER_HEADER
HOST_OVERRIDE_HEADER = wire.HOST_OVERRIDE_HEADER
HASH_KEY_HEADER = wire.HASH_KEY_HEADER
UPSTREAM_HOST_HEADER = wire.UPSTREAM_HOST_HEADER
RESPONSE_FLAGS_HEADER = wire.RESPONSE_FLAGS_HEADER


class TunnelState(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


class Tunnel(H2Stream):
    """One CONNECT stream = one upstream connection. ``owner`` holds the session's own state.
    Its id is 0 while it waits for a stream (HCM's concurrent-stream limit)."""

    __slots__ = ("cluster", "state", "upstream_host", "owner", "fields")

    def __init__(self, stream_id: int, cluster: str, send_window: int) -> None:
        super().__init__(stream_id, send_window)
        self.cluster = cluster
        self.state = TunnelState.OPENING
        self.upstream_host = ""
        self.owner = None
        self.fields: list | None = None  # the CONNECT's headers, until they are sent

    def __repr__(self) -> str:
        return f"Tunnel({self.cluster}#{self.id} {self.state.value} {self.upstream_host})"


# Enum members as module constants: on the hot path an Enum class attribute costs about ten
# times a global's (CPython 3.11).
_OPEN, _CLOSED = TunnelState.OPEN, TunnelState.CLOSED


@dataclass(slots=True)
class TunnelOpened:
    tunnel: Tunnel


@dataclass(slots=True)
class TunnelFailed:
    """Envoy answered the CONNECT with a non-200 status (no tunnel was made)."""

    tunnel: Tunnel
    status: int
    flags: str


@dataclass(slots=True)
class TunnelClosed:
    """An open tunnel ended: the upstream closed (FIN) or the stream was reset."""

    tunnel: Tunnel
    reason: str


@dataclass(slots=True)
class ConnectionDraining:
    """HCM sent a graceful GOAWAY: tunnels up to ``last_stream_id`` go on, no new one may open;
    ``refused`` are the tunnels above it, which HCM will never serve."""

    last_stream_id: int
    refused: list[Tunnel]


@dataclass(slots=True)
class ConnectionLost:
    """HCM sent GOAWAY or the HTTP/2 connection broke: no tunnel can be opened any more."""

    reason: str


class Upstream(Http2Connection):
    """HTTP/2 client connection over ext_proc, multiplexing tunnels."""

    def __init__(self) -> None:
        super().__init__(server=False)
        self._out: list[bytes] = []
        self._events: list = []
        self._next_stream_id = 1
        self._queued: deque[Tunnel] = deque()  # tunnels waiting for a stream, oldest first
        self.lost = False
        self.draining = False  # graceful GOAWAY received: open tunnels go on, no new ones

    def _write(self, data: bytes) -> None:
        if not self.lost:
            self._out.append(data)

    def open_tunnel(self, cluster: str, host: str = "", hash_key: str = "") -> Tunnel:
        """A CONNECT stream to ``cluster``; ``host`` ("ip:port") asks Envoy for that endpoint,
        ``hash_key`` lets a RING_HASH / MAGLEV cluster's hash choose it."""
        if self._next_stream_id == 1:
            self._out.append(PREFACE + self.settings_frames())
        # :authority must be non-empty and valid (an empty one, or the '|' of Istio-style names,
        # kills the whole HTTP/2 connection); Envoy does not connect to it, CLUSTER_HEADER picks the cluster.
        fields = [(":method", "CONNECT"), (":authority", cluster.replace("|", "_")), (CLUSTER_HEADER, cluster)]
        if host:
            fields.append((HOST_OVERRIDE_HEADER, host))
        if hash_key:
            fields.append((HASH_KEY_HEADER, hash_key))
        tunnel = Tunnel(0, cluster, -1)  # no window until it has a stream: send() keeps its bytes
        tunnel.fields = fields
        if self._queued or len(self.streams) >= self.peer_max_streams:
            self._queued.append(tunnel)  # HCM allows no more streams now
        else:
            self._start(tunnel)
        return tunnel

    @property
    def queued(self) -> int:
        """Tunnels waiting for a stream."""
        return len(self._queued)

    def _start(self, tunnel: Tunnel) -> None:
        """Give a tunnel its stream: the CONNECT, then what was sent to it while it waited."""
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        self.highest_stream_id = stream_id
        tunnel.id = stream_id
        tunnel.send_window = self.peer_initial_window
        self.send_headers(stream_id, tunnel.fields)
        tunnel.fields = None
        self.streams[stream_id] = tunnel
        if tunnel.backlog:
            data = bytes(tunnel.backlog)
            tunnel.backlog.clear()
            self.send_data(tunnel, data)

    def _start_queued(self) -> None:
        queued = self._queued
        while queued and len(self.streams) < self.peer_max_streams and not self.lost and not self.draining:
            self._start(queued.popleft())

    def send_drain_probe(self) -> None:
        """A header-only GET that HCM answers 404 itself. Envoy's HCM checks whether its listener
        is draining only when it sends response headers, so a connection whose tunnels are all
        open would never hear of a drain; the probe's answer carries the GOAWAY when it is."""
        if self.lost or self.draining or len(self.streams) >= self.peer_max_streams:
            return  # at HCM's stream limit: no probe this time (the next CONNECT's answer would carry a GOAWAY)
        if self._next_stream_id == 1:
            self._out.append(PREFACE + self.settings_frames())
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        self.highest_stream_id = stream_id
        self.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "metabridge"), (":path", "/drain-probe")], end_stream=True)
        probe = H2Stream(stream_id, self.peer_initial_window)
        probe.local_closed = True
        self.streams[stream_id] = probe

    def send(self, tunnel: Tunnel, data: bytes) -> None:
        """Queue bytes for the tunnel; what the flow-control window allows goes out now."""
        if tunnel.local_closed:
            return
        n = len(data)
        # send_data's common case (one DATA frame the windows allow, nothing waiting) and _write,
        # inline: this runs for every request.
        if n <= tunnel.send_window and n <= self.send_window and n <= self.peer_max_frame and not tunnel.backlog and not self.lost:
            tunnel.send_window -= n
            self.send_window -= n
            self._out.append(pack_frame_header(n >> 16, n & 0xFFFF, DATA, 0, tunnel.id) + data)
        elif not tunnel.id:  # waiting for a stream: kept until it has one
            tunnel.backlog += data
        else:
            self.send_data(tunnel, data)

    def close_tunnel(self, tunnel: Tunnel, reset: bool = False) -> None:
        """End our side of a tunnel (reset=True aborts it); forget it."""
        if not tunnel.id:  # still waiting for a stream: nothing of it reached HCM
            tunnel.state = TunnelState.CLOSED
            tunnel.backlog.clear()
            if tunnel in self._queued:
                self._queued.remove(tunnel)
            return
        if tunnel.state is not TunnelState.CLOSED:
            tunnel.state = TunnelState.CLOSED
            if reset:
                self.reset_stream(tunnel, CANCEL)
            elif not tunnel.local_closed:
                self.end_stream(tunnel)
        if not tunnel.backlog:
            self.forget(tunnel)
        if self._queued:
            self._start_queued()

    def receive(self, data: bytes) -> list:
        """Feed HCM's bytes; returns tunnel events: TunnelOpened/Failed/Closed, ConnectionDraining,
        ConnectionLost, and for a tunnel's bytes a ``(tunnel, data)`` tuple (one per response: a
        tuple costs a small part of what making a class instance does)."""
        events = self._events = []
        try:
            self.feed(data)
        except ProtocolError as exc:
            self.lost = True
            events.append(ConnectionLost(f"HTTP/2 protocol error from Envoy: {exc}"))
        if self._queued:
            self._start_queued()  # streams ended, or HCM raised its limit
        return events

    def output(self) -> bytes:
        """Bytes to send to Envoy's HCM (as read_data), taken once."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    # ---- HTTP/2 events ---------------------------------------------------------------------

    def on_headers(self, stream_id: int, headers: dict[str, str], end_stream: bool) -> None:
        tunnel = self.streams.get(stream_id)
        if type(tunnel) is not Tunnel:  # a drain probe's answer (or a stream already gone)
            if tunnel is not None and end_stream:
                self.forget(tunnel)
            return
        if tunnel.state is TunnelState.CLOSED:
            return
        if tunnel.state is TunnelState.OPENING:
            status = headers.get(":status", "0")
            tunnel.upstream_host = headers.get(UPSTREAM_HOST_HEADER, "")
            if status == "200":
                tunnel.state = TunnelState.OPEN
                self._events.append(TunnelOpened(tunnel))
            else:
                self.close_tunnel(tunnel, reset=not end_stream)
                self._events.append(TunnelFailed(tunnel, int(status) if status.isdigit() else 0, headers.get(RESPONSE_FLAGS_HEADER, "")))
                return
        if end_stream:
            self._ended(tunnel, "upstream closed the connection", reset=False)

    def on_data(self, tunnel: Tunnel, data: bytes, end_stream: bool) -> None:
        if type(tunnel) is not Tunnel:  # a drain probe's 404 body
            if end_stream:
                self.forget(tunnel)
            return
        if data and tunnel.state is _OPEN:
            self._events.append((tunnel, data))
        if end_stream and tunnel.state is not _CLOSED:
            self._ended(tunnel, "upstream closed the connection", reset=False)

    def on_reset(self, tunnel: Tunnel, code: int) -> None:
        if type(tunnel) is Tunnel and tunnel.state is not TunnelState.CLOSED:
            # REFUSED_STREAM before the CONNECT's answer: HCM did not process it (e.g. over its
            # concurrent-stream limit), so it may be made again on a new stream.
            self._ended(tunnel, f"upstream connection reset (HTTP/2 error code {code})", reset=True, flags="REFUSED_STREAM" if code == REFUSED_STREAM else "")

    def on_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        if code == NO_ERROR:
            # Graceful (a draining listener): streams up to last_stream_id still complete.
            self.draining = True
            beyond = [stream for sid, stream in self.streams.items() if sid > last_stream_id]
            refused = [t for t in beyond if type(t) is Tunnel]
            for stream in beyond:
                if type(stream) is Tunnel:
                    stream.state = TunnelState.CLOSED
                self.forget(stream)
            for tunnel in self._queued:  # never sent: HCM will not serve them either
                tunnel.state = TunnelState.CLOSED
                tunnel.backlog.clear()
                refused.append(tunnel)
            self._queued.clear()
            self._events.append(ConnectionDraining(last_stream_id, refused))
            return
        # The connection ends once its replies are out; nothing more goes to HCM.
        self.lost = True
        self._out.clear()
        self._events.append(ConnectionLost(f"Envoy sent GOAWAY (error {code}{': ' + debug.decode(errors='replace') if debug else ''})"))

    def on_stream_sent(self, tunnel: Tunnel) -> None:
        if tunnel.state is TunnelState.CLOSED:
            self.forget(tunnel)

    def _ended(self, tunnel: Tunnel, reason: str, reset: bool, flags: str = "") -> None:
        opening = tunnel.state is TunnelState.OPENING
        self.close_tunnel(tunnel, reset=reset)
        self._events.append(TunnelFailed(tunnel, 0, flags) if opening else TunnelClosed(tunnel, reason))
