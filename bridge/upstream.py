"""The bridge's HTTP/2 client side toward Envoy's HTTP connection manager.

Each downstream connection gets one HTTP/2 connection, spoken through the ext_proc stream: what
this module writes goes to Envoy as read_data, what HCM answers arrives as write_data. Every
CONNECT stream on it is a tunnel: Envoy opens one upstream TCP connection for it to an endpoint
of the cluster named in CLUSTER_HEADER, chosen by its own load balancer.

This module knows HTTP/2 and tunnels, nothing about codecs or routing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame

from bridge import wire

CLUSTER_HEADER = wire.CLUSTER_HEADER.encode()
UPSTREAM_HOST_HEADER = wire.UPSTREAM_HOST_HEADER.encode()
RESPONSE_FLAGS_HEADER = wire.RESPONSE_FLAGS_HEADER.encode()


def _data_frame_repr(frame: DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 formats every frame it receives for its trace log even when nothing logs it, and
# hyperframe's repr of a DATA frame copies and hex-encodes the whole payload before keeping 20
# characters: most of the cost of a large response. Only the debug text changes.
DataFrame._body_repr = _data_frame_repr

# Large windows so flow control never throttles a tunnel in normal operation and WINDOW_UPDATEs
# (each an extra ext_proc message) are rare.
_MAX_WINDOW = 2**31 - 1
_MAX_FRAME = 2**24 - 1


class TunnelState(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


class Tunnel:
    """One CONNECT stream = one upstream connection. ``owner`` holds the session's own state."""

    __slots__ = ("stream_id", "cluster", "state", "upstream_host", "backlog", "owner")

    def __init__(self, stream_id: int, cluster: str) -> None:
        self.stream_id = stream_id
        self.cluster = cluster
        self.state = TunnelState.OPENING
        self.upstream_host = ""
        self.backlog = bytearray()  # bytes waiting for flow-control window
        self.owner = None

    def __repr__(self) -> str:
        return f"Tunnel({self.cluster}#{self.stream_id} {self.state.value} {self.upstream_host})"


@dataclass(slots=True)
class TunnelOpened:
    tunnel: Tunnel


@dataclass(slots=True)
class TunnelData:
    tunnel: Tunnel
    data: bytes


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
class ConnectionLost:
    """HCM sent GOAWAY or the HTTP/2 connection broke: no tunnel can be opened any more."""

    reason: str


class Upstream:
    """HTTP/2 client connection over ext_proc, multiplexing tunnels."""

    def __init__(self) -> None:
        config = H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = H2Connection(config=config)
        self._started = False
        self.tunnels: dict[int, Tunnel] = {}
        self.lost = False

    def _start(self) -> None:
        self._h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: _MAX_WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
            },
        )
        self._h2.max_inbound_frame_size = _MAX_FRAME
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_MAX_WINDOW - 65535)
        self._started = True

    def open_tunnel(self, cluster: str) -> Tunnel:
        if not self._started:
            self._start()
        stream_id = self._h2.get_next_available_stream_id()
        # :authority must be non-empty (an empty one kills the whole HTTP/2 connection); Envoy
        # does not connect to it, CLUSTER_HEADER picks the cluster.
        self._h2.send_headers(
            stream_id,
            [
                (b":method", b"CONNECT"),
                (b":authority", cluster.encode()),
                (CLUSTER_HEADER, cluster.encode()),
            ],
        )
        tunnel = Tunnel(stream_id, cluster)
        self.tunnels[stream_id] = tunnel
        return tunnel

    def send(self, tunnel: Tunnel, data: bytes) -> None:
        """Queue bytes for the tunnel; what the flow-control window allows goes out now."""
        if tunnel.backlog:
            tunnel.backlog += data
            self._flush(tunnel)
            return
        h2 = self._h2
        window = h2.local_flow_control_window(tunnel.stream_id)
        max_frame = h2.max_outbound_frame_size
        if len(data) <= window and len(data) <= max_frame:
            h2.send_data(tunnel.stream_id, data)
            return
        tunnel.backlog += data
        self._flush(tunnel)

    def _flush(self, tunnel: Tunnel) -> None:
        h2 = self._h2
        backlog = tunnel.backlog
        view = memoryview(backlog)
        sent = 0
        try:
            while sent < len(backlog):
                window = h2.local_flow_control_window(tunnel.stream_id)
                if window <= 0:
                    break
                n = min(window, h2.max_outbound_frame_size, len(backlog) - sent)
                h2.send_data(tunnel.stream_id, bytes(view[sent : sent + n]))
                sent += n
        finally:
            view.release()
            del backlog[:sent]  # once, not per frame: a 1 MiB frame is 64 HTTP/2 frames

    def close_tunnel(self, tunnel: Tunnel, reset: bool = False) -> None:
        """End our side of a tunnel (reset=True aborts it); forget it."""
        if tunnel.state is not TunnelState.CLOSED:
            tunnel.state = TunnelState.CLOSED
            try:
                if reset:
                    self._h2.reset_stream(tunnel.stream_id, ErrorCodes.CANCEL)
                else:
                    self._h2.end_stream(tunnel.stream_id)
            except H2Error:
                pass  # the stream is already closed on Envoy's side
        self.tunnels.pop(tunnel.stream_id, None)

    def receive(self, data: bytes) -> list:
        """Feed HCM's bytes; returns tunnel events (TunnelOpened/Data/Failed/Closed, ConnectionLost)."""
        try:
            events = self._h2.receive_data(data)
        except H2Error as exc:
            self.lost = True
            return [ConnectionLost(f"HTTP/2 protocol error from Envoy: {exc}")]
        out = []
        tunnels = self.tunnels
        for event in events:
            if isinstance(event, DataReceived):
                tunnel = tunnels.get(event.stream_id)
                if event.flow_controlled_length:
                    self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if tunnel is not None and event.data:
                    out.append(TunnelData(tunnel, event.data))
            elif isinstance(event, ResponseReceived):
                tunnel = tunnels.get(event.stream_id)
                if tunnel is None:
                    continue
                headers = dict(event.headers)
                status = int(headers.get(b":status", b"0"))
                tunnel.upstream_host = headers.get(UPSTREAM_HOST_HEADER, b"").decode()
                if status == 200:
                    tunnel.state = TunnelState.OPEN
                    out.append(TunnelOpened(tunnel))
                else:
                    self.close_tunnel(tunnel, reset=True)
                    out.append(TunnelFailed(tunnel, status, headers.get(RESPONSE_FLAGS_HEADER, b"").decode()))
            elif isinstance(event, (StreamEnded, StreamReset)):
                tunnel = tunnels.get(event.stream_id)
                if tunnel is None:
                    continue
                if isinstance(event, StreamReset):
                    reason = f"upstream connection reset (HTTP/2 error code {int(event.error_code)})"
                else:
                    reason = "upstream closed the connection"
                opening = tunnel.state is TunnelState.OPENING
                self.close_tunnel(tunnel, reset=isinstance(event, StreamReset))
                out.append(TunnelFailed(tunnel, 0, "") if opening else TunnelClosed(tunnel, reason))
            elif isinstance(event, TrailersReceived):
                continue
            elif isinstance(event, ConnectionTerminated):
                self.lost = True
                out.append(ConnectionLost(f"Envoy sent GOAWAY (error {event.error_code})"))
            # WindowUpdated / RemoteSettingsChanged may open windows: retried below.
        for tunnel in tunnels.values():
            if tunnel.backlog:
                self._flush(tunnel)
        return out

    def output(self) -> bytes:
        """Bytes to send to Envoy's HCM (as read_data), taken once."""
        return self._h2.data_to_send() if self._started else b""
