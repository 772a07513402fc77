"""HTTP/2 for the bridge's two kinds of connection, without I/O: frames in, frames out.

The bridge speaks HTTP/2 twice per proxied request: as a gRPC server to Envoy's ext_proc client
(metabridge.transport.grpc_server) and as a client to Envoy's HTTP connection manager through the tunnels
(metabridge.core.tunnels). Both peers are Envoy, both hot paths are DATA frames on long-lived streams,
and a general-purpose HTTP/2 state machine costs more per frame than everything else the bridge
does for a request. This module keeps what those two connections need: frame parsing with
``struct``, HEADERS/CONTINUATION assembly with ``hpack``, SETTINGS, PING, RST_STREAM, GOAWAY and
flow control in both directions. Priorities are ignored (but checked) and push is refused.

It is also defensive, because the gRPC server's port can be reached by any peer
(docs/grpc-server.md has the whole table):

- Stream states follow RFC 9113 section 5.1: frames on idle streams are connection errors;
  DATA or HEADERS on a half-closed (remote) stream are a stream error STREAM_CLOSED; frames on
  a stream this endpoint reset (or closed long ago) are ignored after minimal processing (HPACK
  state, connection window), so late trailers after a reset never break the connection; DATA or
  HEADERS after the peer's END_STREAM on a closed stream are a connection error STREAM_CLOSED.
- Every malformed frame gets the RFC's error code (section 5.4: connection errors end the
  connection with GOAWAY, stream errors reset only their stream).
- ``Limits`` are advertised where HTTP/2 has a setting for them and enforced: concurrent
  streams, header list size (HPACK decoding bounded, table-size updates included), frame
  size, CONTINUATION frames per header block, and token buckets for RST_STREAM (rapid reset),
  PING and SETTINGS; exceeding a bucket closes the connection with ENHANCE_YOUR_CALM.
- The connection's receive window is given back only for bytes no longer held (a subclass
  says what it holds in ``_held``), so one connection never pins more than its window.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY", "WINDOW_UPDATE", "CONTINUATION")

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 4, 5, 6, 7
CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = 8, 9, 10, 11

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 4, 5, 6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384
MAX_FRAME = 2**24 - 1  # the largest SETTINGS_MAX_FRAME_SIZE a peer may announce
UNLIMITED_STREAMS = 2**32 - 1  # SETTINGS_MAX_CONCURRENT_STREAMS before the peer sets it: no limit
HPACK_TABLE = 4096  # our SETTINGS_HEADER_TABLE_SIZE: the default, so never sent

_frame_header = struct.Struct(">BHBBL")  # length (24 bits, split 8 + 16), type, flags, stream id
pack_frame_header = _frame_header.pack  # for a frame built inline on a hot path (see frame())
_setting = struct.Struct(">HL")
u32 = struct.Struct(">L")
_goaway = struct.Struct(">LL")  # last stream id, error code

# How a stream that is no longer in ``streams`` was closed (RFC 9113 section 5.1, "closed").
_IGNORE = 0  # reset here, refused, or given up before the peer's END_STREAM: late frames are ignored
_RESET_BY_PEER = 1  # the peer sent RST_STREAM: DATA/HEADERS get a stream error STREAM_CLOSED
_ENDED = 2  # the peer sent END_STREAM: DATA/HEADERS are a connection error STREAM_CLOSED


@dataclass(frozen=True)
class Limits:
    """What one HTTP/2 connection accepts from its peer. The defaults are the tunnels' (their
    peer is Envoy's HCM, on a connection the bridge opened itself through ext_proc, so the
    rates are generous); the gRPC server, reachable by any peer, passes stricter ones
    (metabridge.transport.grpc_server.server_limits)."""

    max_concurrent_streams: int = 100  # streams the peer may have open (advertised; REFUSED_STREAM past it)
    max_header_list_size: int = 65536  # decoded size of a header block, RFC 9113 6.5.2 accounting (advertised)
    max_header_block: int = 65536  # compressed bytes of one header block (HEADERS + CONTINUATION)
    max_continuations: int = 32  # CONTINUATION frames in one header block
    max_frame_size: int = DEFAULT_FRAME  # advertised SETTINGS_MAX_FRAME_SIZE; a longer frame is FRAME_SIZE_ERROR
    initial_window: int = MAX_WINDOW  # each stream's receive window (advertised)
    connection_window: int = MAX_WINDOW  # the connection's receive window: what the peer may have unread here
    reset_burst: int = 10_000  # RST_STREAM received, plus streams reset or refused because of the peer ...
    reset_rate: float = 1000.0  # ... per second once the burst is spent (rapid reset, CVE-2023-44487)
    ping_burst: int = 1000  # PINGs answered at once, then per second
    ping_rate: float = 100.0
    settings_burst: int = 1000  # SETTINGS frames acknowledged at once, then per second
    settings_rate: float = 100.0
    closed_streams: int = 1024  # closed streams whose state is remembered (late frames on older ones are ignored)

    def __post_init__(self) -> None:
        if not DEFAULT_FRAME <= self.max_frame_size <= MAX_FRAME:
            raise ValueError(f"max_frame_size must be within {DEFAULT_FRAME}..{MAX_FRAME}")
        for name in ("initial_window", "connection_window"):
            if not DEFAULT_WINDOW <= getattr(self, name) <= MAX_WINDOW:
                raise ValueError(f"{name} must be within {DEFAULT_WINDOW}..{MAX_WINDOW}")
        if self.max_concurrent_streams < 1 or self.max_header_list_size < 1 or self.max_header_block < 1:
            raise ValueError("stream and header limits must be positive")


DEFAULT_LIMITS = Limits()


class RateLimit:
    """A token bucket: ``burst`` events at once, then ``rate`` per second."""

    __slots__ = ("burst", "rate", "tokens", "stamp")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def spend(self) -> bool:
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


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


class _HeaderBlock:
    """A header block whose HEADERS frame came without END_HEADERS."""

    __slots__ = ("stream", "flags", "bad_priority", "frames", "block")

    def __init__(self, stream: int, flags: int, bad_priority: bool, payload: bytes) -> None:
        self.stream = stream
        self.flags = flags
        self.bad_priority = bad_priority
        self.frames = 0  # CONTINUATION frames so far
        self.block = bytearray(payload)


class _Guard:
    """A connection's rarely used defences: the flood budgets and the closed-stream floor."""

    __slots__ = ("resets", "pings", "settings", "closed_floor", "preface")

    def __init__(self, limits: Limits) -> None:
        self.resets = RateLimit(limits.reset_burst, limits.reset_rate)
        self.pings = RateLimit(limits.ping_burst, limits.ping_rate)
        self.settings = RateLimit(limits.settings_burst, limits.settings_rate)
        self.closed_floor = 0  # streams at or below it may have been dropped from ``_closed``
        self.preface = False  # the client's connection preface is still to come


class Http2Connection:
    """Frames, settings and flow control of one connection; subclasses give the streams meaning.

    Subclasses implement ``_write`` (bytes toward the peer) and the ``on_*`` hooks, and call
    ``feed`` with the bytes received. A server (``server=True``) accepts the streams its peer
    opens (odd ids, up to ``limits.max_concurrent_streams``) and hands each new one to
    ``on_headers``; a client opens its own and registers them in ``streams``.
    """

    def __init__(self, *, server: bool, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.encoder = Encoder()
        self.decoder = Decoder(max_header_list_size=limits.max_header_list_size)
        self.decoder.max_allowed_table_size = HPACK_TABLE
        self.streams: dict[int, H2Stream] = {}
        self.highest_stream_id = 0  # streams at or below it that are not in ``streams`` are closed
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.peer_max_streams = UNLIMITED_STREAMS  # SETTINGS_MAX_CONCURRENT_STREAMS: none until the peer says
        self.send_window = DEFAULT_WINDOW  # the connection's
        # Few attributes on purpose: past 30 an instance's dict stops sharing its keys and every
        # attribute access on the hot path gets slower (CPython 3.11); rare state is grouped.
        self._is_server = server
        self._max_frame = limits.max_frame_size
        self._local_window = limits.initial_window
        self._stream_refill = limits.initial_window // 2
        # The connection's receive window as the peer sees it, less ``_refill_below``: one
        # comparison with 0 per batch tells when to give window back.
        self._refill_below = limits.connection_window // 2
        self._recv_credit = DEFAULT_WINDOW - self._refill_below
        self._blocked: dict[int, H2Stream] = {}  # streams with a backlog, in the order they blocked
        self._header_block: _HeaderBlock | None = None  # waiting for CONTINUATION
        self._pieces = Pieces()  # a frame not yet whole
        self._slow_start = server  # the next bytes need a look first: the preface, or CONTINUATION
        self._closed: dict[int, int] = {}  # recently closed stream -> _IGNORE / _RESET_BY_PEER / _ENDED
        self._guard = _Guard(limits)
        self._guard.preface = server

    # ---- hooks ---------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        """Queue bytes for the peer; a memoryview is of immutable bytes and may be kept."""
        raise NotImplementedError

    def on_headers(self, stream_id: int, headers: dict[str, str], end_stream: bool) -> None:
        """A complete header block: a new stream (server side; it is not in ``streams`` yet), a
        response or trailers on a stream in ``streams``."""

    def on_data(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        """DATA payload on an open stream (may be empty when only END_STREAM is set)."""

    def on_reset(self, stream: H2Stream, code: int) -> None:
        """The stream is gone: the peer reset it, or it broke the protocol on it and it was reset
        here (``code`` says which error). It is already forgotten."""

    def on_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        """The peer will accept no new streams."""

    def on_stream_sent(self, stream: H2Stream) -> None:
        """A stream's closing frame went out after its backlog."""

    def _held(self) -> int:
        """Bytes received or produced on this connection and not yet let go (they keep the
        connection's receive window shut). Here: what waits for the peer's windows."""
        blocked = self._blocked
        return sum(len(stream.backlog) for stream in blocked.values()) if blocked else 0

    # ---- receiving -----------------------------------------------------------------------

    def settings_frames(self) -> bytes:
        """Our SETTINGS plus a WINDOW_UPDATE opening the connection's receive window."""
        limits = self.limits
        settings = [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, limits.initial_window),
            (SETTINGS_MAX_FRAME_SIZE, limits.max_frame_size),
            (SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
        ]
        if self._is_server:
            settings.insert(1, (SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams))
        out = frame(SETTINGS, 0, 0, b"".join(_setting.pack(key, value) for key, value in settings))
        if limits.connection_window > DEFAULT_WINDOW:
            out += frame(WINDOW_UPDATE, 0, 0, u32.pack(limits.connection_window - DEFAULT_WINDOW))
        self._recv_credit = limits.connection_window - self._refill_below
        return out

    def feed(self, data: bytes) -> None:
        """Handle every whole frame received so far; raises ProtocolError (a connection error)."""
        pieces = self._pieces
        if pieces.held:  # the start of a frame came before
            data = pieces.add(data)
            if data is None:
                return
        pos = 0
        if self._slow_start:
            pos = self._start_feed(data)
            if pos < 0:
                return
        size = len(data)
        unpack = _frame_header.unpack_from
        max_frame = self._max_frame
        try:
            while size - pos >= 9:
                hi, lo, kind, flags, stream_id = unpack(data, pos)
                length = hi << 16 | lo
                if length > max_frame:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {max_frame}")
                end = pos + 9 + length
                if end > size:
                    break
                payload = data[pos + 9 : end]
                pos = end
                if kind == DATA:
                    self._on_data_frame(stream_id & 0x7FFFFFFF, flags, payload)
                else:
                    self._on_control_frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                    if self._header_block is not None:  # only CONTINUATION may come next
                        pos = self._continuations(data, pos)
        finally:
            if pos < size:  # keep the start of the next frame until the whole frame is here
                self._pieces.hold(data[pos:], 9 + (data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]) if size - pos >= 9 else 9)
        if self._recv_credit < 0:
            self._refill_connection()

    def _start_feed(self, data: bytes) -> int:
        """The connection preface, then the CONTINUATION frames of a header block left open by
        the last bytes; where the frames go on from, or -1 while the preface is short."""
        pos = 0
        guard = self._guard
        if guard.preface:
            if data[: len(PREFACE)] != PREFACE[: len(data)]:
                raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client (bad connection preface)")
            if len(data) < len(PREFACE):
                self._pieces.hold(data, len(PREFACE))
                return -1
            guard.preface = False
            pos = len(PREFACE)
        if self._header_block is not None:
            pos = self._continuations(data, pos)
        self._slow_start = self._header_block is not None
        return pos

    def _continuations(self, data: bytes, pos: int) -> int:
        """Frames from ``pos`` while a header block is open (each must be its CONTINUATION);
        returns where the block ended, or the start of a frame not yet whole (the main loop
        holds it). Kept off the DATA path, which then needs no check of its own."""
        size, max_frame = len(data), self._max_frame
        while self._header_block is not None and size - pos >= 9:
            hi, lo, kind, flags, stream_id = _frame_header.unpack_from(data, pos)
            length = hi << 16 | lo
            if length > max_frame:
                raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {max_frame}")
            end = pos + 9 + length
            if end > size:
                break
            self._on_control_frame(kind, flags, stream_id & 0x7FFFFFFF, data[pos + 9 : end])  # refuses anything else
            pos = end
        self._slow_start = self._header_block is not None
        return pos

    def _refill_connection(self) -> None:
        """Give the peer back the connection window of what is no longer held."""
        window = self._recv_credit + self._refill_below
        target = self.limits.connection_window - self._held()
        increment = target - window
        if increment > 0 and (increment >= self._refill_below // 4 or window <= 0):
            self._write(frame(WINDOW_UPDATE, 0, 0, u32.pack(increment)))
            self._recv_credit = target - self._refill_below

    def _on_data_frame(self, stream_id: int, flags: int, payload: bytes) -> None:
        flow = len(payload)
        credit = self._recv_credit - flow
        self._recv_credit = credit
        if credit < 0 and credit + self._refill_below < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA beyond the connection's flow-control window")
        if flags & PADDED:
            payload = _strip_padding(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            self._on_closed_stream_frame(DATA, stream_id, stream)
            return
        unacked = stream.unacked + flow
        if unacked >= self._stream_refill:  # half the stream's window used (or more: checked here)
            if unacked > self._local_window:
                self._stream_error(stream_id, FLOW_CONTROL_ERROR)
                return
            if not flags & END_STREAM:
                self._write(frame(WINDOW_UPDATE, 0, stream_id, u32.pack(unacked)))
                unacked = 0
        stream.unacked = unacked
        end = bool(flags & END_STREAM)
        if end:
            stream.remote_closed = True
        self.on_data(stream, payload, end)

    def _on_closed_stream_frame(self, kind: int, stream_id: int, stream: H2Stream | None) -> None:
        """DATA or a header block on a stream that is not open for the peer to send on."""
        name = FRAME_NAMES[kind]
        if stream is not None:  # half-closed (remote): the peer already sent END_STREAM
            self._stream_error(stream_id, STREAM_CLOSED)
            return
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"{name} on stream 0")
        if stream_id > self.highest_stream_id or not stream_id & 1:
            raise ProtocolError(PROTOCOL_ERROR, f"{name} on idle stream {stream_id}")
        how = self._closed.get(stream_id)
        if how is None:
            if stream_id > self._guard.closed_floor:  # never opened: skipped over by a higher stream
                if kind == HEADERS:
                    raise ProtocolError(PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} out of order (streams must be opened in increasing order)")
                raise ProtocolError(STREAM_CLOSED, f"{name} on closed stream {stream_id}")
            return  # closed long ago: ignored
        if how == _ENDED:
            raise ProtocolError(STREAM_CLOSED, f"{name} on stream {stream_id} after its END_STREAM")
        if how == _RESET_BY_PEER:
            self._stream_error(stream_id, STREAM_CLOSED)
        # _IGNORE: reset here; the peer may have sent this before it saw the RST_STREAM

    def _on_control_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        pending = self._header_block
        if pending is not None:
            if kind != CONTINUATION:
                raise ProtocolError(PROTOCOL_ERROR, f"{FRAME_NAMES[kind] if kind < 10 else f'frame type {kind}'} inside the header block of stream {pending.stream} (expected CONTINUATION)")
            if stream_id != pending.stream:
                raise ProtocolError(PROTOCOL_ERROR, f"CONTINUATION on stream {stream_id} inside the header block of stream {pending.stream}")
            pending.frames += 1
            if pending.frames > self.limits.max_continuations:
                raise ProtocolError(ENHANCE_YOUR_CALM, f"more than {self.limits.max_continuations} CONTINUATION frames in one header block")
            block = pending.block
            block += payload
            if len(block) > self.limits.max_header_block:
                raise ProtocolError(ENHANCE_YOUR_CALM, f"header block larger than {self.limits.max_header_block} bytes")
            if flags & END_HEADERS:
                self._header_block = None
                self._on_header_block(stream_id, pending.flags, bytes(block), pending.bad_priority)
            return
        if kind == HEADERS:
            self._on_headers_frame(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == SETTINGS:
            if stream_id:
                raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS on stream {stream_id}")
            if flags & ACK:
                if payload:
                    raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
                return
            if len(payload) % 6:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
            if not self._guard.settings.spend():
                raise ProtocolError(ENHANCE_YOUR_CALM, "SETTINGS flood")
            self._on_settings(payload)
            self._write(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if stream_id:
                raise ProtocolError(PROTOCOL_ERROR, f"PING on stream {stream_id}")
            if len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR, f"PING of {len(payload)} bytes (must be 8)")
            if not flags & ACK:
                if not self._guard.pings.spend():
                    raise ProtocolError(ENHANCE_YOUR_CALM, "PING flood")
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif kind == PRIORITY:
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            error = FRAME_SIZE_ERROR if len(payload) != 5 else PROTOCOL_ERROR if u32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id else 0
            if error:
                if stream_id in self.streams:
                    self._stream_error(stream_id, error)
                else:
                    raise ProtocolError(error, f"bad PRIORITY on stream {stream_id}")
        elif kind == GOAWAY:
            if stream_id:
                raise ProtocolError(PROTOCOL_ERROR, f"GOAWAY on stream {stream_id}")
            if len(payload) < 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY must be at least 8 bytes")
            last_stream_id, code = _goaway.unpack_from(payload)
            self.on_goaway(last_stream_id & 0x7FFFFFFF, code, payload[8:])
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "push is disabled")
        elif kind == CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        # Unknown frame types are ignored, as HTTP/2 requires.

    def _on_headers_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = _strip_padding(payload)
        bad_priority = False
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            bad_priority = u32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id  # depends on itself
            payload = payload[5:]
        if len(payload) > self.limits.max_header_block:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"header block larger than {self.limits.max_header_block} bytes")
        if flags & END_HEADERS:
            self._on_header_block(stream_id, flags, payload, bad_priority)
            return
        self._header_block = _HeaderBlock(stream_id, flags, bad_priority, payload)

    def _on_header_block(self, stream_id: int, flags: int, block: bytes, bad_priority: bool) -> None:
        # Decoded whatever becomes of the stream: the HPACK state is the connection's.
        if block and block[0] & 0xE0 == 0x20:
            _check_table_size_updates(block)
        try:
            fields = self.decoder.decode(block)
        except OversizedHeaderListError as exc:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"header list larger than SETTINGS_MAX_HEADER_LIST_SIZE {self.limits.max_header_list_size}") from exc
        except HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"bad HPACK block: {exc}") from exc
        except Exception as exc:  # hpack on bytes it does not expect: still the peer's fault
            raise ProtocolError(COMPRESSION_ERROR, f"bad HPACK block: {type(exc).__name__}: {exc}") from exc
        end = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:
            if stream.remote_closed:
                self._stream_error(stream_id, STREAM_CLOSED)
            elif bad_priority:
                self._stream_error(stream_id, PROTOCOL_ERROR)
            else:
                if end:
                    stream.remote_closed = True
                self.on_headers(stream_id, dict(fields), end)
            return
        if self._is_server and stream_id & 1 and stream_id > self.highest_stream_id:
            self.highest_stream_id = stream_id  # also closes the idle streams below it
            if bad_priority:
                self._stream_error(stream_id, PROTOCOL_ERROR)
            elif len(self.streams) >= self.limits.max_concurrent_streams:
                self.refuse_stream(stream_id)
            else:
                self.on_headers(stream_id, dict(fields), end)
            return
        if self._is_server and not stream_id & 1:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} out of order (a client opens odd-numbered streams)")
        self._on_closed_stream_frame(HEADERS, stream_id, None)

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        if stream_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if not self._guard.resets.spend():
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams reset (RST_STREAM flood)")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            if stream_id > self.highest_stream_id or not stream_id & 1:
                raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
            return  # already closed here
        self._remember(stream_id, _RESET_BY_PEER)
        self._blocked.pop(stream_id, None)
        stream.local_closed = stream.remote_closed = True
        stream.backlog.clear()
        stream.after_backlog = None
        self.on_reset(stream, u32.unpack(payload)[0])

    def _on_settings(self, payload: bytes) -> None:
        # Validated entry by entry, applied once per frame (the last value of a key counts), so
        # a frame full of INITIAL_WINDOW_SIZE entries walks the streams once.
        values: dict[int, int] = {}
        for key, value in _setting.iter_unpack(payload):
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= MAX_FRAME:
                    raise ProtocolError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range")
            elif key == SETTINGS_ENABLE_PUSH:
                if value > 1 or (value == 1 and not self._is_server):
                    raise ProtocolError(PROTOCOL_ERROR, f"ENABLE_PUSH {value} not allowed")
            values[key] = value
        value = values.get(SETTINGS_INITIAL_WINDOW_SIZE)
        if value is not None:
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            if delta:
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise ProtocolError(FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE takes stream {stream.id}'s window above 2^31-1")
                if delta > 0:
                    self._flush_blocked()
        value = values.get(SETTINGS_MAX_FRAME_SIZE)
        if value is not None:
            self.peer_max_frame = value
        value = values.get(SETTINGS_MAX_CONCURRENT_STREAMS)
        if value is not None:
            self.peer_max_streams = value  # how many streams we may have open; 0 is allowed (RFC 9113 6.5.2)
        value = values.get(SETTINGS_HEADER_TABLE_SIZE)
        if value is not None:
            self.encoder.header_table_size = min(value, HPACK_TABLE)  # ours may be smaller than allowed

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        increment = u32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if not increment:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE with a zero increment")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream_id or not stream_id & 1:
                raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # closed: the peer may not have seen our END_STREAM or RST_STREAM yet
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR)
            return
        if stream.backlog:
            self._flush(stream)

    # ---- stream ends ---------------------------------------------------------------------

    def _remember(self, stream_id: int, how: int) -> None:
        closed = self._closed
        closed[stream_id] = how
        if len(closed) > self.limits.closed_streams:
            oldest = next(iter(closed))
            del closed[oldest]
            guard = self._guard
            if oldest > guard.closed_floor:
                guard.closed_floor = oldest

    def refuse_stream(self, stream_id: int, code: int = REFUSED_STREAM) -> None:
        """Reset a stream the peer opened (or is sending on) that will not be served here. It
        counts against the reset budget: a peer that makes us reset too often is cut off."""
        if not self._guard.resets.spend():
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams reset")
        self._write(frame(RST_STREAM, 0, stream_id, u32.pack(code)))
        self._remember(stream_id, _IGNORE)

    def _stream_error(self, stream_id: int, code: int) -> None:
        """RFC 9113 section 5.4.2: reset the stream the peer broke the protocol on; the handler
        hears of it through ``on_reset``."""
        self.refuse_stream(stream_id, code)
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self._blocked.pop(stream_id, None)
            stream.local_closed = stream.remote_closed = True
            stream.backlog.clear()
            stream.after_backlog = None
            self.on_reset(stream, code)

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
            self._write(_frame_header.pack(n >> 16, n & 0xFFFF, DATA, 0, stream.id) + payload)  # frame(), inline
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
        """Abort a stream (dropping its backlog) and forget it; the peer's late frames on it
        are ignored."""
        if not (stream.local_closed and stream.remote_closed) or stream.backlog:
            self._write(frame(RST_STREAM, 0, stream.id, u32.pack(code)))
        stream.local_closed = stream.remote_closed = True
        stream.backlog.clear()
        stream.after_backlog = None
        self._blocked.pop(stream.id, None)
        if self.streams.pop(stream.id, None) is not None:
            self._remember(stream.id, _IGNORE)

    def forget(self, stream: H2Stream) -> None:
        """Drop a finished stream from the connection's tables (its closed state is kept for a
        while: late frames after the peer's END_STREAM are errors, others are ignored)."""
        self._blocked.pop(stream.id, None)
        if self.streams.pop(stream.id, None) is not None:
            self._remember(stream.id, _ENDED if stream.remote_closed else _IGNORE)

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
        raise ProtocolError(FRAME_SIZE_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


def _check_table_size_updates(block: bytes) -> None:
    """RFC 7541 4.2 allows dynamic table size updates only at the start of a header block, and
    two are all an encoder ever needs (the smallest size, then the final one). More are refused
    before hpack resizes its table for each one (a block of them cost ~1 s per MiB)."""
    pos, size, count = 0, len(block), 0
    while pos < size and block[pos] & 0xE0 == 0x20:
        count += 1
        if count > 2:
            raise ProtocolError(COMPRESSION_ERROR, "more than two dynamic table size updates at the start of a header block")
        if block[pos] & 0x1F == 0x1F:  # the integer goes on in 7-bit groups
            pos += 1
            while pos < size and block[pos] & 0x80:
                pos += 1
        pos += 1
