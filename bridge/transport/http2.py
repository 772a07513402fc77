"""HTTP/2 for the bridge's two kinds of connection, without I/O: frames in, frames out.

The bridge speaks HTTP/2 twice per proxied request: as a gRPC server to Envoy's ext_proc client
(bridge.transport.grpc_server) and as a client to Envoy's HTTP connection manager through the tunnels
(bridge.core.tunnels). Both peers are Envoy, both hot paths are DATA frames on long-lived streams,
and a general-purpose HTTP/2 state machine costs more per frame than everything else the bridge
does for a request. This module keeps what those two connections need and nothing else: frame
parsing with ``struct``, HEADERS/CONTINUATION assembly with ``hpack``, SETTINGS, PING, RST_STREAM,
GOAWAY and flow control in both directions. Priorities are ignored and push is refused.

Receive windows are opened to the maximum at once and refilled in large steps, so the peer
never waits for a WINDOW_UPDATE and few are sent.
"""

from __future__ import annotations

import struct

from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 6, 7, 8, 9

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 1, 2, 4, 5

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
MAX_FRAME = 2**24 - 1  # what we accept: the peer may send a large DATA frame in one piece
_WINDOW_REFILL = 2**30  # give received bytes back to the peer's window once this many are used
_MAX_HEADER_BLOCK = 1 << 20

_frame_header = struct.Struct(">BHBBL")  # length (24 bits, split 8 + 16), type, flags, stream id
u32 = struct.Struct(">L")
_goaway = struct.Struct(">LL")  # last stream id, error code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _frame_header.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


class Pieces:
    """The start of a length-prefixed unit (an HTTP/2 frame, a gRPC message) that arrived cut
    short, held without re-copying until all the bytes it needs are there (re-joining at every
    piece would be quadratic in the unit's size)."""

    __slots__ = ("held", "need")

    def __init__(self) -> None:
        self.held = bytearray()
        self.need = 0  # bytes the held unit needs to be whole

    def __bool__(self) -> bool:
        return bool(self.held)

    def add(self, data: bytes) -> bytes | None:
        """``data`` after what is held: the bytes to parse now, or None while the unit is short."""
        held = self.held
        if not held:
            return data
        held += data
        if len(held) < self.need:
            return None
        data = bytes(held)
        held.clear()
        return data

    def hold(self, rest: bytes, need: int) -> None:
        self.held += rest
        self.need = need


class ProtocolError(Exception):
    """The peer broke HTTP/2; the connection cannot go on. ``code`` goes into the GOAWAY."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2Stream:
    """A stream's transport state; the connection's subclass adds what its streams carry."""

    __slots__ = ("id", "send_window", "backlog", "after_backlog", "unacked", "local_closed", "remote_closed")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.backlog = bytearray()  # DATA payload waiting for flow-control window
        self.after_backlog: bytes | None = None  # the closing frame, once the backlog is out
        self.unacked = 0  # received bytes not yet given back to the peer's window
        self.local_closed = False  # we sent END_STREAM (or reset)
        self.remote_closed = False  # the peer sent END_STREAM (or reset)


class Http2Connection:
    """Frames, settings and flow control of one connection; subclasses give the streams meaning.

    Subclasses implement ``_write`` (bytes toward the peer) and the ``on_*`` hooks, and call
    ``feed`` with the bytes received.
    """

    def __init__(self, *, server: bool) -> None:
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.streams: dict[int, H2Stream] = {}
        self.highest_stream_id = 0  # streams at or below it that are not in ``streams`` are closed
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW  # the connection's
        self._unacked = 0
        self._blocked: dict[int, H2Stream] = {}  # streams with a backlog, in the order they blocked
        self._header_block: tuple[int, int, bytearray] | None = None  # stream, flags, fragments
        self._pieces = Pieces()  # a frame not yet whole
        self._need_preface = server

    # ---- hooks ---------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        """Queue bytes for the peer; a memoryview is of immutable bytes and may be kept."""
        raise NotImplementedError

    def on_headers(self, stream_id: int, headers: dict[str, str], end_stream: bool) -> None:
        """A complete header block (a new stream, a response or trailers)."""

    def on_data(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        """DATA payload on an open stream (may be empty when only END_STREAM is set)."""

    def on_reset(self, stream: H2Stream, code: int) -> None:
        """The peer reset the stream; it is already forgotten."""

    def on_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        """The peer will accept no new streams."""

    def on_stream_sent(self, stream: H2Stream) -> None:
        """A stream's closing frame went out after its backlog."""

    # ---- receiving -----------------------------------------------------------------------

    def settings_frames(self) -> bytes:
        """Our SETTINGS plus a WINDOW_UPDATE opening the connection's receive window fully."""
        settings = struct.pack(">HLHLHL", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW, SETTINGS_MAX_FRAME_SIZE, MAX_FRAME, SETTINGS_ENABLE_PUSH, 0)
        return frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, u32.pack(MAX_WINDOW - DEFAULT_WINDOW))

    def feed(self, data: bytes) -> None:
        """Handle every whole frame received so far; raises ProtocolError."""
        data = self._pieces.add(data)
        if data is None:
            return
        pos = 0
        if self._need_preface:
            if data[: len(PREFACE)] != PREFACE[: len(data)]:
                raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client (bad connection preface)")
            if len(data) < len(PREFACE):
                self._pieces.hold(data, len(PREFACE))
                return
            self._need_preface = False
            pos = len(PREFACE)
        size = len(data)
        unpack = _frame_header.unpack_from
        try:
            while size - pos >= 9:
                hi, lo, kind, flags, stream_id = unpack(data, pos)
                end = pos + 9 + (hi << 16 | lo)  # any 24-bit length is within the MAX_FRAME we advertise
                if end > size:
                    break
                payload = data[pos + 9 : end]
                pos = end
                if kind == DATA:
                    self._on_data_frame(stream_id & 0x7FFFFFFF, flags, payload)
                else:
                    self._on_control_frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
        finally:
            if pos < size:  # keep the start of the next frame until the whole frame is here
                self._pieces.hold(data[pos:], 9 + (data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]) if size - pos >= 9 else 9)

    def _on_data_frame(self, stream_id: int, flags: int, payload: bytes) -> None:
        flow = len(payload)
        if flags & PADDED:
            payload = _strip_padding(payload)
        self._unacked += flow
        if self._unacked >= _WINDOW_REFILL:
            self._write(frame(WINDOW_UPDATE, 0, 0, u32.pack(self._unacked)))
            self._unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id == 0 or stream_id > self.highest_stream_id:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream already closed here: late bytes are dropped
        stream.unacked += flow
        if stream.unacked >= _WINDOW_REFILL:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, u32.pack(stream.unacked)))
            stream.unacked = 0
        end = bool(flags & END_STREAM)
        if end:
            stream.remote_closed = True
        self.on_data(stream, payload, end)

    def _on_control_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_block is not None and kind != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
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
                raise ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            block = self._header_block[2]
            block += payload
            if len(block) > _MAX_HEADER_BLOCK:
                raise ProtocolError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._on_header_block()
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
                self._write(frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
            self._on_window_update(stream_id, u32.unpack(payload)[0] & 0x7FFFFFFF)
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._blocked.pop(stream_id, None)
                stream.local_closed = stream.remote_closed = True
                stream.backlog.clear()
                self.on_reset(stream, u32.unpack(payload[:4])[0] if len(payload) >= 4 else 0)
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY must be at least 8 bytes")
            last_stream_id, code = _goaway.unpack_from(payload)
            self.on_goaway(last_stream_id & 0x7FFFFFFF, code, payload[8:])
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "push is disabled")
        # PRIORITY and unknown frame types are ignored, as HTTP/2 requires.

    def _on_header_block(self) -> None:
        stream_id, flags, block = self._header_block
        self._header_block = None
        try:
            fields = self.decoder.decode(bytes(block))
        except HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"bad HPACK block: {exc}") from exc
        end = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None and end:
            stream.remote_closed = True
        self.on_headers(stream_id, dict(fields), end)

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                if delta > 0:
                    self._flush_blocked()
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= MAX_FRAME:
                    raise ProtocolError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range")
                self.peer_max_frame = value
            elif key == SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value

    def _on_window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            if stream.backlog:
                self._flush(stream)

    # ---- sending -------------------------------------------------------------------------

    def send_headers(self, stream_id: int, fields: list[tuple[str, str]], end_stream: bool = False) -> None:
        self._write(self.headers_frames(stream_id, fields, end_stream))

    def headers_frames(self, stream_id: int, fields: list[tuple[str, str]], end_stream: bool = False) -> bytes:
        """A header block as HEADERS (+ CONTINUATION) frames; encode only when sending next."""
        block = self.encoder.encode(fields)
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            return frame(HEADERS, flags | END_HEADERS, stream_id, block)
        parts = [frame(HEADERS, flags, stream_id, block[:limit])]
        for offset in range(limit, len(block), limit):
            last = offset + limit >= len(block)
            parts.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[offset : offset + limit]))
        return b"".join(parts)

    def send_data(self, stream: H2Stream, payload: bytes) -> None:
        """Send what the windows allow now; the rest waits in the stream's backlog."""
        n = len(payload)
        if not stream.backlog and n <= stream.send_window and n <= self.send_window and n <= self.peer_max_frame:
            stream.send_window -= n
            self.send_window -= n
            self._write(frame(DATA, 0, stream.id, payload))
            return
        if stream.backlog:
            stream.backlog += payload
            self._flush(stream)
            return
        # Large: frames are cut from the payload itself (memoryview slices of immutable bytes,
        # copied once when the output is joined); only what the windows hold back is kept.
        sent = self._send_frames(stream, memoryview(payload))
        if sent < n:
            stream.backlog += payload[sent:]
            self._blocked.setdefault(stream.id, stream)

    def _send_frames(self, stream: H2Stream, view: memoryview) -> int:
        """DATA frames from ``view`` while the windows allow; returns how many bytes went."""
        sent, total, limit = 0, len(view), self.peer_max_frame
        while sent < total:
            n = min(stream.send_window, self.send_window, limit, total - sent)
            if n <= 0:
                break
            stream.send_window -= n
            self.send_window -= n
            self._write(_frame_header.pack(n >> 16, n & 0xFFFF, DATA, 0, stream.id))
            self._write(view[sent : sent + n])
            sent += n
        return sent

    def close_stream(self, stream: H2Stream, closing_frame: bytes) -> None:
        """Send ``closing_frame`` (END_STREAM DATA or trailers) once the backlog is out."""
        stream.local_closed = True
        if stream.backlog:
            stream.after_backlog = closing_frame
        else:
            self._write(closing_frame)

    def end_stream(self, stream: H2Stream) -> None:
        self.close_stream(stream, frame(DATA, END_STREAM, stream.id))

    def reset_stream(self, stream: H2Stream, code: int) -> None:
        """Abort a stream (dropping its backlog) and forget it."""
        if not (stream.local_closed and stream.remote_closed) or stream.backlog:
            self._write(frame(RST_STREAM, 0, stream.id, u32.pack(code)))
        stream.local_closed = stream.remote_closed = True
        stream.backlog.clear()
        stream.after_backlog = None
        self.forget(stream)

    def forget(self, stream: H2Stream) -> None:
        """Drop a finished stream from the connection's tables."""
        self._blocked.pop(stream.id, None)
        self.streams.pop(stream.id, None)

    def goaway_frame(self, code: int, debug: str = "") -> bytes:
        return frame(GOAWAY, 0, 0, u32.pack(self.highest_stream_id) + u32.pack(code) + debug.encode()[:200])

    def _flush(self, stream: H2Stream) -> None:
        backlog = stream.backlog
        sendable = min(stream.send_window, self.send_window, len(backlog))
        if sendable <= 0:
            self._blocked.setdefault(stream.id, stream)
            return
        # A copy of what can go now: the frames keep slices of it until the output is joined,
        # and the backlog itself must stay resizable.
        with memoryview(backlog) as view:
            chunk = bytes(view[:sendable])
        sent = self._send_frames(stream, memoryview(chunk))
        del backlog[:sent]  # once, not per frame: a 1 MiB message is 64 frames
        if backlog:
            self._blocked.setdefault(stream.id, stream)
            return
        self._blocked.pop(stream.id, None)
        if stream.after_backlog is not None:
            closing, stream.after_backlog = stream.after_backlog, None
            self._write(closing)
            self.on_stream_sent(stream)

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.send_window <= 0:
                break
            self._flush(stream)


def _strip_padding(payload: bytes) -> bytes:
    if not payload:
        raise ProtocolError(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]
