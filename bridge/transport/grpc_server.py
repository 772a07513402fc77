"""A small gRPC server on HTTP/2, made for one client: Envoy's gRPC client.

Why not grpcio's server: every ext_proc message costs a round trip between grpcio's C core, its
poller thread and the event loop (tens of µs each, four messages per proxied request), several
times the bridge's own work. Here one asyncio Protocol per HTTP/2 connection (metabridge.transport.http2 does
the framing) hands whole gRPC messages to the stream's handler in the same call, and everything
a batch of received frames produces leaves in one socket write.

What it speaks: HTTP/2 with prior knowledge (no TLS, no upgrade), unary and bidirectional
streaming gRPC without compression. Compressed messages are refused with UNIMPLEMENTED.

Its limits (constructor arguments of GrpcServer, defaults below) are advertised where HTTP/2 has
a setting for them and enforced; docs/grpc-server.md lists them with the memory one connection
can pin. Write backpressure: while the socket's buffer is over asyncio's high-water mark
(``pause_writing``), the connection stops reading, so a peer that does not read cannot make it
produce more (PING and SETTINGS acknowledgements, answers).

A service is a mapping from ``/package.Service/Method`` to a handler factory: called with the
stream when its HEADERS arrive, it returns a ``StreamHandler`` that gets each message, the end
of the client's side and a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from typing import Callable, Iterable

from metabridge.transport import http2
from metabridge.transport.http2 import ENHANCE_YOUR_CALM, MAX_WINDOW, NO_ERROR, PROTOCOL_ERROR, H2Stream, Http2Connection, Limits, Pieces, ProtocolError, u32
from metabridge.logs import event

log = logging.getLogger("metabridge.grpc")

_PREFIX = struct.Struct(">BL")  # a gRPC message's compressed flag and length

# gRPC status codes used here.
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 3, 5, 8, 12, 13

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_MAX_HEADER_LIST = 16 * 1024  # gRPC's usual metadata limit; Envoy's ext_proc headers are < 1 KiB


def message_limit(max_frame_sizes: Iterable[int]) -> int:
    """A gRPC message limit for ext_proc serving listeners with these ``max_frame_size``s: a
    message carries at most what Envoy read at once from a client (or HCM wrote), which for a
    whole frame in one piece is the frame plus HTTP/2 and protobuf overhead; never below 4 MiB
    (Envoy's reads are bounded by its buffer limits, 1 MiB by default)."""
    largest = max(max_frame_sizes, default=0)
    return max(4 * 1024 * 1024, 2 * largest + 64 * 1024)


def server_limits(
    max_message: int = DEFAULT_MAX_MESSAGE,
    *,
    max_concurrent_streams: int = 100,
    max_header_list_size: int = DEFAULT_MAX_HEADER_LIST,
    max_frame_size: int = http2.DEFAULT_FRAME,
    max_continuations: int = 32,
    connection_window: int | None = None,
    reset_burst: int = 200,
    reset_rate: float = 100.0,
    ping_burst: int = 100,
    ping_rate: float = 20.0,
    settings_burst: int = 100,
    settings_rate: float = 10.0,
) -> Limits:
    """The HTTP/2 limits of the gRPC server. The connection window defaults to room for two
    whole messages (a stream can always finish its message; two streams can interleave)."""
    if connection_window is None:
        connection_window = min(MAX_WINDOW, 2 * (max_message + 5) + max_frame_size)
    return Limits(
        max_concurrent_streams=max_concurrent_streams,
        max_header_list_size=max_header_list_size,
        max_header_block=max_header_list_size,
        max_continuations=max_continuations,
        max_frame_size=max_frame_size,
        connection_window=max(http2.DEFAULT_WINDOW, connection_window),
        reset_burst=reset_burst,
        reset_rate=reset_rate,
        ping_burst=ping_burst,
        ping_rate=ping_rate,
        settings_burst=settings_burst,
        settings_rate=settings_rate,
    )


class GrpcStats:
    """Transport counters of one server (plain integers, read when scraped)."""

    __slots__ = ("connections", "connection_errors", "connections_calmed", "streams", "streams_refused", "streams_reset", "write_pauses")

    def __init__(self) -> None:
        self.connections = 0  # HTTP/2 connections accepted
        self.connection_errors = 0  # closed with a GOAWAY carrying an error code
        self.connections_calmed = 0  # ... of which ENHANCE_YOUR_CALM (a flood or a limit)
        self.streams = 0  # calls handed to a method
        self.streams_refused = 0  # refused (server stopping, client going away)
        self.streams_reset = 0  # calls reset by the client or for its protocol errors
        self.write_pauses = 0  # times the socket's buffer filled and reading paused

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


# Envoy opens one connection per client connection, and clients arrive in bursts: a connect to a
# Unix socket whose accept queue is full fails at once (EAGAIN), so the queue must hold a burst.
# The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


class GrpcError(Exception):
    """Raised by a handler to end its stream with a gRPC status (``code``) and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamHandler:
    """What a method implementation sees of one call; override what you need."""

    def on_message(self, message: bytes | memoryview) -> None:
        """One whole request message (without the gRPC prefix): bytes, or a read-only view of
        received bytes for a large one (protobuf's ``FromString`` takes either)."""

    def on_end(self) -> None:
        """The client has sent its last message; a unary call answers here."""

    def on_reset(self) -> None:
        """The call is gone (reset by the client, or the connection closed): free everything."""


class Stream(H2Stream):
    """One call: the handler's way to answer."""

    __slots__ = ("conn", "headers", "handler", "started", "ended", "pieces")

    def __init__(self, stream_id: int, conn: "GrpcConnection", headers: dict[str, str]) -> None:
        super().__init__(stream_id, conn.peer_initial_window)
        self.conn = conn
        self.headers = headers
        self.handler: StreamHandler | None = None
        self.started = False  # response HEADERS sent
        self.ended = False  # the handler was told the client is done
        self.pieces = Pieces()  # a gRPC message spread over several DATA frames

    def send(self, messages: Iterable[bytes]) -> None:
        """Send serialized messages (each gets its gRPC prefix), in one DATA frame where it fits."""
        if self.local_closed:
            return
        parts = []
        for message in messages:  # prefix and message joined once, not concatenated first
            parts.append(_PREFIX.pack(0, len(message)))
            parts.append(message)
        if not parts:
            return
        payload = b"".join(parts)
        conn = self.conn
        if not self.started:
            self.started = True
            conn.send_headers(self.id, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(self, payload)

    def finish(self, code: int = OK, message: str = "") -> None:
        """End the call with a gRPC status (trailers); a no-op once ended."""
        if self.local_closed:
            return
        fields = [("grpc-status", str(code))]
        if message:
            fields.append(("grpc-message", _percent_encode(message)))
        if not self.started:  # trailers-only response
            self.started = True
            fields = [(":status", "200"), ("content-type", "application/grpc")] + fields
        conn = self.conn
        conn.close_stream(self, conn.headers_frames(self.id, fields, end_stream=True))
        conn._forget_if_done(self)


def _percent_encode(text: str) -> str:
    raw = text.encode("utf-8")
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


Factory = Callable[[Stream], StreamHandler]


class GrpcConnection(asyncio.Protocol, Http2Connection):
    """One HTTP/2 connection from a gRPC client."""

    def __init__(self, server: "GrpcServer") -> None:
        limits = getattr(server, "limits", None) or server_limits(server.max_message)
        Http2Connection.__init__(self, server=True, limits=limits)
        self._server = server
        self._methods = server.methods
        self._stats: GrpcStats = getattr(server, "stats", None) or GrpcStats()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] | None = None  # set while handling received bytes: one write at the end
        self._going_away = False
        self._broken = False  # a protocol error: GOAWAY sent, the connection is closing
        self.closed = asyncio.get_running_loop().create_future()

    # ---- transport -------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._server.connections.add(self)
        self._stats.connections += 1
        transport.write(self.settings_frames())

    def connection_lost(self, exc) -> None:
        self._server.connections.discard(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._reset_handler(stream)
        if not self.closed.done():
            self.closed.set_result(None)

    def _write(self, data: bytes | memoryview) -> None:
        if self._out is not None:
            self._out.append(data)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._out = out = []
        try:
            self.feed(data)
        except ProtocolError as exc:
            stats = self._stats
            stats.connection_errors += 1
            if exc.code == ENHANCE_YOUR_CALM:
                stats.connections_calmed += 1
            event(log, logging.WARNING, "grpc_connection_error", error=str(exc), code=exc.code, hint="the client broke the HTTP/2 protocol or a limit; the connection is closed")
            out.append(self.goaway_frame(exc.code, str(exc)))
            self._broken = True
        finally:
            self._out = None
            transport = self._transport
            if out and not transport.is_closing():
                transport.write(b"".join(out))
            if self._broken:
                transport.close()

    def pause_writing(self) -> None:
        """The socket's buffer is full: read nothing more (which would make more to write)."""
        self._stats.write_pauses += 1
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._broken and not self._transport.is_closing():
            self._transport.resume_reading()

    def _held(self) -> int:
        """Answers waiting for the client's flow-control windows plus partial messages: what
        the connection's receive window is kept shut by (metabridge.transport.http2)."""
        held = Http2Connection._held(self)
        if held > self.limits.connection_window:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"the client does not read: {held} bytes of answers wait for its flow-control windows")
        for stream in self.streams.values():
            pieces = stream.pieces.held
            if pieces:
                held += len(pieces)
        return held

    # ---- HTTP/2 events ---------------------------------------------------------------------

    def on_headers(self, stream_id: int, headers: dict[str, str], end_stream: bool) -> None:
        # metabridge.transport.http2 has checked the stream's state: a stream in ``streams`` gets its
        # trailers, any other is new (within the concurrent-streams limit).
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client
            if not end_stream:  # RFC 9113 8.1: a second header block must end the stream
                self._stream_error(stream_id, PROTOCOL_ERROR)
            else:
                self._on_remote_end(stream)
            return
        if self._going_away or self._server.stopping:
            self._stats.streams_refused += 1
            self.refuse_stream(stream_id)
            return
        self._stats.streams += 1
        stream = Stream(stream_id, self, headers)
        stream.remote_closed = end_stream
        self.streams[stream_id] = stream
        factory = self._methods.get(headers.get(":path", ""))
        if factory is None:
            self._fail_stream(stream, UNIMPLEMENTED, f"method {headers.get(':path')!r} is not served here")
            return
        if self._call(stream, lambda: setattr(stream, "handler", factory(stream))) and end_stream:
            self._on_remote_end(stream)

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        if data and stream.handler is not None:
            self._on_grpc_bytes(stream, data)
        if end_stream and stream.id in self.streams:
            self._on_remote_end(stream)

    def on_reset(self, stream: Stream, code: int) -> None:
        self._stats.streams_reset += 1
        self._reset_handler(stream)

    def on_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        self._going_away = True  # running calls go on; the client opens no new ones here

    def on_stream_sent(self, stream: Stream) -> None:
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: Stream) -> None:
        """Both sides have ended and everything is sent: the call is over."""
        if stream.local_closed and stream.remote_closed and not stream.backlog:
            self.forget(stream)
            if self._server.stopping and not self.streams and self._transport is not None:
                self._transport.close()

    def _on_grpc_bytes(self, stream: Stream, payload: bytes) -> None:
        data = stream.pieces.add(payload)
        if data is None:
            return
        limit = self._server.max_message
        handler = stream.handler
        pos, size = 0, len(data)
        try:
            while size - pos >= 5:
                length = u32.unpack_from(data, pos + 1)[0]
                if length > limit:
                    raise GrpcError(RESOURCE_EXHAUSTED, f"gRPC message of {length} bytes exceeds the limit of {limit}")
                if data[pos]:
                    raise GrpcError(UNIMPLEMENTED, "compressed gRPC messages are not supported: configure the client without compression")
                end = pos + 5 + length
                if end > size:
                    break
                # A large message is handed over as a view of the received bytes, not a copy.
                message = data[pos + 5 : end] if length < 65536 else memoryview(data)[pos + 5 : end]
                pos = end
                handler.on_message(message)
                if stream.handler is None:
                    return
        except Exception as exc:
            self._handler_failed(stream, exc)
            return
        if pos < size:  # keep the start of the next message until the whole message is here
            stream.pieces.hold(data[pos:], 5 + u32.unpack_from(data, pos + 1)[0] if size - pos >= 5 else 5)

    # ---- calls -----------------------------------------------------------------------------

    def _call(self, stream: Stream, fn, *args) -> bool:
        """Run handler code; an error ends the call with its status, not the connection."""
        try:
            fn(*args)
        except Exception as exc:
            self._handler_failed(stream, exc)
            return False
        return stream.handler is not None

    def _handler_failed(self, stream: Stream, exc: Exception) -> None:
        if isinstance(exc, GrpcError):
            self._fail_stream(stream, exc.code, str(exc))
            return
        # A bug in a handler must not take the other calls down.
        event(log, logging.ERROR, "grpc_handler_failed", path=stream.headers.get(":path"), error=f"{type(exc).__name__}: {exc}", exc_info=True)
        self._fail_stream(stream, INTERNAL, f"{type(exc).__name__}: {exc}")

    def _on_remote_end(self, stream: Stream) -> None:
        """The client has sent its last message: tell the handler, once."""
        if stream.ended:
            return
        stream.ended = stream.remote_closed = True
        if stream.pieces:
            self._fail_stream(stream, INTERNAL, "the call ended inside a gRPC message")
            return
        if stream.handler is not None:
            self._call(stream, stream.handler.on_end)
        self._forget_if_done(stream)

    def _fail_stream(self, stream: Stream, code: int, message: str) -> None:
        """End a call with an error status; reset it if the client is still sending (its late
        frames, trailers included, are then ignored: RFC 9113 5.1)."""
        if not stream.local_closed:
            stream.backlog.clear()
            stream.after_backlog = None
            stream.finish(code, message)
        if not stream.remote_closed and stream.id in self.streams:
            self.refuse_stream(stream.id, NO_ERROR)  # counts against the reset budget
            stream.remote_closed = True
            self._blocked.pop(stream.id, None)
            del self.streams[stream.id]
        else:
            self.forget(stream)
        self._reset_handler(stream)

    def _reset_handler(self, stream: Stream) -> None:
        """Tell the handler its call is gone, once."""
        handler, stream.handler = stream.handler, None
        if handler is None:
            return
        try:
            handler.on_reset()
        except Exception as exc:
            event(log, logging.ERROR, "grpc_handler_failed", path=stream.headers.get(":path"), error=f"{type(exc).__name__}: {exc}", exc_info=True)

    # ---- shutdown --------------------------------------------------------------------------

    def go_away(self) -> None:
        """Tell the client to open no new calls here; running calls go on."""
        self._going_away = True
        self._write(self.goaway_frame(NO_ERROR))
        if not self.streams and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class GrpcServer:
    """Listens on ``unix:PATH`` or ``HOST:PORT`` and serves ``methods``.

    Limits (each connection's; docs/grpc-server.md):

    - ``max_message`` (16 MiB): a gRPC message declaring more ends its call with RESOURCE_EXHAUSTED
      (for ext_proc, ``message_limit`` derives it from the listeners' ``max_frame_size``);
    - ``max_concurrent_streams`` (100, advertised): streams past it are refused (REFUSED_STREAM);
    - ``max_header_list_size`` (16 KiB, advertised; also the compressed block's limit) and
      ``max_continuations`` (32 per block): past them, GOAWAY(ENHANCE_YOUR_CALM);
    - ``max_frame_size`` (16 KiB, advertised): a longer frame is a FRAME_SIZE_ERROR;
    - ``connection_window`` (2 x (max_message + 5) + max_frame_size): bytes the client may have
      sent and the server not yet let go (partial messages, answers waiting for the client's
      windows); answers waiting past it close the connection with ENHANCE_YOUR_CALM;
    - ``reset_burst``/``reset_rate`` (200, then 100/s), ``ping_burst``/``ping_rate`` (100, 20/s),
      ``settings_burst``/``settings_rate`` (100, 10/s): past them, GOAWAY(ENHANCE_YOUR_CALM).
    """

    def __init__(self, methods: dict[str, Factory], max_message: int = DEFAULT_MAX_MESSAGE, **limits) -> None:
        """``limits``: the keywords of ``server_limits`` (their defaults are there, once)."""
        self.methods = methods
        self.max_message = max_message
        self.limits = server_limits(max_message, **limits)
        self.stats = GrpcStats()
        self.connections: set[GrpcConnection] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._unix_path: str | None = None

    async def start(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: GrpcConnection(self)  # noqa: E731
        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if os.path.exists(path):
                os.unlink(path)  # a stale socket from a previous run
            self._server = await loop.create_unix_server(factory, path, backlog=LISTEN_BACKLOG)
            self._unix_path = path
        else:
            host, _, port = address.rpartition(":")
            self._server = await loop.create_server(factory, host.strip("[]") or None, int(port), reuse_address=True, backlog=LISTEN_BACKLOG)

    @property
    def port(self) -> int | None:
        sockets = self._server.sockets if self._server else ()
        for sock in sockets:
            name = sock.getsockname()
            if isinstance(name, tuple):
                return name[1]
        return None

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let running calls finish for ``grace`` seconds, then cut them."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        connections = list(self.connections)
        for conn in connections:
            conn.go_away()
        if grace and connections:
            await asyncio.wait([conn.closed for conn in connections], timeout=grace)
        for conn in list(self.connections):
            conn.abort()
        if connections:
            await asyncio.wait([conn.closed for conn in connections], timeout=1.0)
