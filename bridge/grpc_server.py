"""A small gRPC server on HTTP/2, made for one client: Envoy's gRPC client.

Why not grpcio's server: every ext_proc message costs a round trip between grpcio's C core, its
poller thread and the event loop (tens of µs each, four messages per proxied request), several
times the bridge's own work. Here one asyncio Protocol per HTTP/2 connection parses frames with
``struct`` and hands whole gRPC messages to the stream's handler in the same call; everything a
batch of received frames produces leaves in one socket write. HPACK is the ``hpack`` library.

What it speaks: HTTP/2 with prior knowledge (no TLS, no upgrade), unary and bidirectional
streaming gRPC without compression, flow control both ways, PING, GOAWAY on shutdown. What it
does not: server push, priorities (ignored), compressed messages (rejected with UNIMPLEMENTED).

A service is a mapping from ``/package.Service/Method`` to a handler factory: called with the
stream when its HEADERS arrive, it returns a ``StreamHandler`` that gets each message, the end
of the client's side and a reset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from typing import Callable, Iterable

from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError

from bridge.logs import event

log = logging.getLogger("metabridge.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 6, 7, 8, 9

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 1, 4, 5

# gRPC status codes used here.
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 3, 5, 8, 12, 13, 14

MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535
_DEFAULT_FRAME = 16384
_MAX_FRAME = 2**24 - 1  # what we accept: the peer may send large DATA frames in one piece
_WINDOW_REFILL = 2**30  # return received bytes to the peer's window once this many are used
_MAX_HEADER_BLOCK = 1 << 20

_frame_header = struct.Struct(">BHBBL")  # length (24 bits, split 8 + 16), type, flags, stream id
_u32 = struct.Struct(">L")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _frame_header.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def grpc_message(body: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + _u32.pack(len(body)) + body


class GrpcError(Exception):
    """Raised by a handler to end its stream with a gRPC status (``code``) and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamHandler:
    """What a method implementation sees of one call; override what you need."""

    def on_message(self, message: bytes) -> None:
        """One whole request message (without the gRPC prefix)."""

    def on_end(self) -> None:
        """The client has sent its last message; a unary call answers here."""

    def on_reset(self) -> None:
        """The call is gone (reset by the client, or the connection closed): free everything."""


class Stream:
    """One call: the handler's way to answer."""

    __slots__ = ("id", "conn", "headers", "handler", "send_window", "backlog", "trailers", "started", "local_closed", "remote_closed", "_rx", "_unacked")

    def __init__(self, stream_id: int, conn: "GrpcConnection", headers: dict[str, str], send_window: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.headers = headers
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        self.backlog = bytearray()  # DATA payload waiting for flow-control window
        self.trailers: bytes | None = None  # trailers waiting behind the backlog
        self.started = False  # response HEADERS sent
        self.local_closed = False
        self.remote_closed = False
        self._rx = bytearray()  # a gRPC message spread over several DATA frames
        self._unacked = 0

    def send(self, messages: Iterable[bytes]) -> None:
        """Send serialized messages (each gets its gRPC prefix), in one DATA frame where it fits."""
        if self.local_closed:
            return
        payload = b"".join([b"\x00" + _u32.pack(len(m)) + m for m in messages])
        if payload:
            self.conn._send_data(self, payload)

    def finish(self, code: int = OK, message: str = "") -> None:
        """End the call with a gRPC status (trailers); a no-op once ended."""
        if self.local_closed:
            return
        self.local_closed = True
        conn = self.conn
        fields = [("grpc-status", str(code))]
        if message:
            fields.append(("grpc-message", _percent_encode(message)))
        if not self.started:  # trailers-only response
            self.started = True
            fields = [(":status", "200"), ("content-type", "application/grpc")] + fields
        block = conn._encoder.encode(fields)
        trailers = conn._headers_frames(self.id, block, END_STREAM)
        if self.backlog:
            self.trailers = trailers
        else:
            conn._write(trailers)
            conn._stream_done(self)


def _percent_encode(text: str) -> str:
    raw = text.encode("utf-8")
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


Factory = Callable[[Stream], StreamHandler]


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection from a gRPC client."""

    def __init__(self, server: "GrpcServer") -> None:
        self._server = server
        self._methods = server.methods
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._preface_seen = False
        self._decoder = Decoder()
        self._encoder = Encoder()
        self._streams: dict[int, Stream] = {}
        self._last_stream_id = 0
        self._peer_window = _DEFAULT_WINDOW  # initial window of new streams, from the peer's SETTINGS
        self._peer_max_frame = _DEFAULT_FRAME
        self._conn_send_window = _DEFAULT_WINDOW
        self._conn_unacked = 0
        self._blocked: dict[int, Stream] = {}  # streams with a backlog, in the order they blocked
        self._header_block: tuple[int, int, bytearray] | None = None  # (stream, flags, fragments)
        self._out: list[bytes] | None = None  # set while handling received bytes: one write at the end
        self._going_away = False
        self._broken = False  # a protocol error: GOAWAY sent, the connection is closing
        self.closed = asyncio.get_running_loop().create_future()

    # ---- transport -------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._server.connections.add(self)
        settings = struct.pack(">HLHLHL", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW, SETTINGS_MAX_FRAME_SIZE, _MAX_FRAME, 3, 2**31 - 1)
        transport.write(_frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, _u32.pack(MAX_WINDOW - _DEFAULT_WINDOW)))

    def connection_lost(self, exc) -> None:
        self._server.connections.discard(self)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._reset_handler(stream)
        if not self.closed.done():
            self.closed.set_result(None)

    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        buf = self._buf
        buf += data
        self._out = out = []
        try:
            pos = 0
            if not self._preface_seen:
                if bytes(buf[: len(PREFACE)]) != PREFACE[: len(buf)]:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client (bad connection preface)")
                if len(buf) < len(PREFACE):
                    return
                self._preface_seen = True
                pos = len(PREFACE)
            size = len(buf)
            unpack = _frame_header.unpack_from
            while size - pos >= 9:
                hi, lo, kind, flags, stream_id = unpack(buf, pos)
                length = hi << 16 | lo
                if length > _MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds the {_MAX_FRAME} advertised")
                end = pos + 9 + length
                if end > size:
                    break
                payload = bytes(buf[pos + 9 : end])
                pos = end
                stream_id &= 0x7FFFFFFF
                if kind == DATA:
                    self._on_data(stream_id, flags, payload)
                else:
                    self._on_control(kind, flags, stream_id, payload)
            del buf[:pos]
        except _ConnectionError as exc:
            event(log, logging.WARNING, "grpc_connection_error", error=str(exc), hint="the client broke the HTTP/2 protocol; the connection is closed")
            out.append(_frame(GOAWAY, 0, 0, _u32.pack(self._last_stream_id) + _u32.pack(exc.code) + str(exc).encode()[:200]))
            self._broken = True
            buf.clear()
        finally:
            self._out = None
            transport = self._transport
            if out and not transport.is_closing():
                transport.write(b"".join(out))
            if self._broken:
                transport.close()

    # ---- frames ----------------------------------------------------------------------------

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        flow = len(payload)
        if flags & PADDED:
            payload = _strip_padding(payload)
        self._conn_unacked += flow
        if self._conn_unacked >= _WINDOW_REFILL:
            self._write(_frame(WINDOW_UPDATE, 0, 0, _u32.pack(self._conn_unacked)))
            self._conn_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id == 0 or stream_id > self._last_stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream we already ended: its late bytes are dropped
        stream._unacked += flow
        if stream._unacked >= _WINDOW_REFILL:
            self._write(_frame(WINDOW_UPDATE, 0, stream_id, _u32.pack(stream._unacked)))
            stream._unacked = 0
        if payload:
            self._on_grpc_bytes(stream, payload)
        if flags & END_STREAM and stream_id in self._streams:
            self._on_remote_end(stream)

    def _on_grpc_bytes(self, stream: Stream, payload: bytes) -> None:
        rx = stream._rx
        if rx:
            rx += payload
            data = rx
        else:
            data = payload
        limit = self._server.max_message
        pos, size = 0, len(data)
        while size - pos >= 5:
            length = _u32.unpack_from(data, pos + 1)[0]
            if length > limit:
                self._fail_stream(stream, RESOURCE_EXHAUSTED, f"gRPC message of {length} bytes exceeds the limit of {limit}")
                return
            if data[pos]:
                self._fail_stream(stream, UNIMPLEMENTED, "compressed gRPC messages are not supported: configure the client without compression")
                return
            end = pos + 5 + length
            if end > size:
                break
            message = bytes(data[pos + 5 : end])
            pos = end
            if not self._call(stream, stream.handler.on_message, message):
                return
        if rx:
            del rx[:pos]
        elif pos < size:
            rx += data[pos:]

    def _on_control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_block is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == HEADERS:
            if flags & PADDED:
                payload = _strip_padding(payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._header_block = (stream_id, flags, bytearray(payload))
            if flags & END_HEADERS:
                self._on_header_block()
        elif kind == CONTINUATION:
            if self._header_block is None or self._header_block[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            block = self._header_block[2]
            block += payload
            if len(block) > _MAX_HEADER_BLOCK:
                raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._on_header_block()
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
                self._write(_frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
            self._on_window_update(stream_id, _u32.unpack(payload)[0] & 0x7FFFFFFF)
        elif kind == PING:
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                self._blocked.pop(stream_id, None)
                stream.local_closed = stream.remote_closed = True
                self._reset_handler(stream)
        elif kind == GOAWAY:
            self._going_away = True  # running calls go on; the client opens no new ones here
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")
        # PRIORITY and unknown frame types are ignored, as HTTP/2 requires.

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                if delta > 0:
                    self._flush_blocked()
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not _DEFAULT_FRAME <= value <= _MAX_FRAME:
                    raise _ConnectionError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range")
                self._peer_max_frame = value
            elif key == SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value

    def _on_window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self._conn_send_window += increment
            if self._conn_send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._flush_blocked()
            return
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            if stream.backlog:
                self._flush(stream)

    def _on_header_block(self) -> None:
        stream_id, flags, block = self._header_block
        self._header_block = None
        try:
            fields = self._decoder.decode(bytes(block))
        except HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"bad HPACK block: {exc}") from exc
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client
            if flags & END_STREAM:
                self._on_remote_end(stream)
            return
        if stream_id <= self._last_stream_id or stream_id % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} out of order")
        self._last_stream_id = stream_id
        headers = dict(fields)
        stream = Stream(stream_id, self, headers, self._peer_window)
        if self._going_away or self._server.stopping:
            self._write(_frame(RST_STREAM, 0, stream_id, _u32.pack(REFUSED_STREAM)))
            return
        self._streams[stream_id] = stream
        factory = self._methods.get(headers.get(":path", ""))
        if factory is None:
            stream.remote_closed = bool(flags & END_STREAM)
            self._fail_stream(stream, UNIMPLEMENTED, f"method {headers.get(':path')!r} is not served here")
            return
        if not self._call(stream, lambda: setattr(stream, "handler", factory(stream))):
            return
        if flags & END_STREAM:
            self._on_remote_end(stream)

    # ---- streams ---------------------------------------------------------------------------

    def _call(self, stream: Stream, fn, *args) -> bool:
        """Run handler code; an error ends the call with its status, not the connection."""
        try:
            fn(*args)
        except GrpcError as exc:
            self._fail_stream(stream, exc.code, str(exc))
            return False
        except Exception as exc:  # a bug in a handler must not take the other calls down
            event(log, logging.ERROR, "grpc_handler_failed", path=stream.headers.get(":path"), error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._fail_stream(stream, INTERNAL, f"{type(exc).__name__}: {exc}")
            return False
        return not stream.local_closed or stream.handler is not None

    def _on_remote_end(self, stream: Stream) -> None:
        if stream.remote_closed:
            return
        stream.remote_closed = True
        if stream._rx:
            self._fail_stream(stream, INTERNAL, "the call ended inside a gRPC message")
            return
        if stream.handler is not None:
            self._call(stream, stream.handler.on_end)
        if stream.local_closed:
            self._stream_done(stream)

    def _fail_stream(self, stream: Stream, code: int, message: str) -> None:
        """End a call with an error status; reset it if the client is still sending."""
        handler, stream.handler = stream.handler, None
        if not stream.local_closed:
            stream.backlog.clear()
            self._blocked.pop(stream.id, None)
            stream.finish(code, message)
        if not stream.remote_closed:
            stream.remote_closed = True
            self._write(_frame(RST_STREAM, 0, stream.id, _u32.pack(NO_ERROR)))
        self._streams.pop(stream.id, None)
        if handler is not None:
            try:
                handler.on_reset()
            except Exception as exc:
                event(log, logging.ERROR, "grpc_handler_failed", path=stream.headers.get(":path"), error=f"{type(exc).__name__}: {exc}", exc_info=True)

    def _stream_done(self, stream: Stream) -> None:
        if stream.local_closed and stream.remote_closed and not stream.backlog:
            self._streams.pop(stream.id, None)
            self._blocked.pop(stream.id, None)
            if self._server.stopping and not self._streams and self._transport is not None:
                self._transport.close()

    def _reset_handler(self, stream: Stream) -> None:
        handler, stream.handler = stream.handler, None
        if handler is not None:
            try:
                handler.on_reset()
            except Exception as exc:
                event(log, logging.ERROR, "grpc_handler_failed", path=stream.headers.get(":path"), error=f"{type(exc).__name__}: {exc}", exc_info=True)

    # ---- sending ---------------------------------------------------------------------------

    def _headers_frames(self, stream_id: int, block: bytes, flags: int) -> bytes:
        limit = self._peer_max_frame
        if len(block) <= limit:
            return _frame(HEADERS, flags | END_HEADERS, stream_id, block)
        parts = [_frame(HEADERS, flags, stream_id, block[:limit])]
        for offset in range(limit, len(block), limit):
            last = offset + limit >= len(block)
            parts.append(_frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[offset : offset + limit]))
        return b"".join(parts)

    def _send_data(self, stream: Stream, payload: bytes) -> None:
        if not stream.started:
            stream.started = True
            self._write(self._headers_frames(stream.id, self._encoder.encode([(":status", "200"), ("content-type", "application/grpc")]), 0))
        n = len(payload)
        if not stream.backlog and n <= stream.send_window and n <= self._conn_send_window and n <= self._peer_max_frame:
            stream.send_window -= n
            self._conn_send_window -= n
            self._write(_frame(DATA, 0, stream.id, payload))
            return
        stream.backlog += payload
        self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        backlog = stream.backlog
        sent = 0
        with memoryview(backlog) as view:
            while sent < len(backlog):
                n = min(stream.send_window, self._conn_send_window, self._peer_max_frame, len(backlog) - sent)
                if n <= 0:
                    break
                stream.send_window -= n
                self._conn_send_window -= n
                self._write(_frame(DATA, 0, stream.id, bytes(view[sent : sent + n])))
                sent += n
        del backlog[:sent]
        if backlog:
            self._blocked.setdefault(stream.id, stream)
            return
        self._blocked.pop(stream.id, None)
        if stream.trailers is not None:
            trailers, stream.trailers = stream.trailers, None
            self._write(trailers)
            self._stream_done(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._conn_send_window <= 0:
                break
            self._flush(stream)

    def go_away(self) -> None:
        """Tell the client to open no new calls here; running calls go on."""
        self._going_away = True
        self._write(_frame(GOAWAY, 0, 0, _u32.pack(self._last_stream_id) + _u32.pack(NO_ERROR)))
        if not self._streams and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _strip_padding(payload: bytes) -> bytes:
    if not payload:
        raise _ConnectionError(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class GrpcServer:
    """Listens on ``unix:PATH`` or ``HOST:PORT`` and serves ``methods``."""

    def __init__(self, methods: dict[str, Factory], max_message: int = 64 * 1024 * 1024) -> None:
        self.methods = methods
        self.max_message = max_message
        self.connections: set[GrpcConnection] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        factory = lambda: GrpcConnection(self)  # noqa: E731
        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if os.path.exists(path):
                os.unlink(path)  # a stale socket from a previous run
            self._server = await loop.create_unix_server(factory, path)
        else:
            host, _, port = address.rpartition(":")
            self._server = await loop.create_server(factory, host.strip("[]") or None, int(port), reuse_address=True)

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
        connections = list(self.connections)
        for conn in connections:
            conn.go_away()
        if grace and connections:
            await asyncio.wait([conn.closed for conn in connections], timeout=grace)
        for conn in list(self.connections):
            conn.abort()
        if connections:
            await asyncio.wait([conn.closed for conn in connections], timeout=1.0)
