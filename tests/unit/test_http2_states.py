"""The gRPC server's HTTP/2 against a peer that breaks the rules: RFC 9113's stream states
(section 5.1), its error handling (5.4), the frame definitions (6) and the server's advertised
and enforced limits, each case asserting the outcome the RFC asks for.

The server's connection is driven in memory with raw frames (``Harness``): every case is exact
about which frame comes back (a GOAWAY with its code, or a RST_STREAM on one stream) and that
the connection goes on serving when it should. tests/unit/test_http2_peers.py repeats the main
cases over a socket with the h2 library as the peer.
"""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from hpack import Decoder, Encoder

from metabridge.transport import http2
from metabridge.transport.grpc_server import GrpcConnection, GrpcServer, Stream, StreamHandler
from metabridge.transport.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    COMPRESSION_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ACK,
)

ECHO = "/test.Echo/Chat"
HOLD = "/test.Echo/Hold"  # never answers and never ends: the call stays open


class Echo(StreamHandler):
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def on_message(self, message) -> None:
        self.stream.send([bytes(message)])

    def on_end(self) -> None:
        self.stream.finish()


class Hold(StreamHandler):
    def __init__(self, stream: Stream) -> None:
        self.stream = stream


METHODS = {ECHO: Echo, HOLD: Hold}

_LOOP = asyncio.new_event_loop()


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Any frame, including ones http2.frame would never build (the length is what is sent)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def message(body: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(body).to_bytes(4, "big") + body


def parse_frames(data: bytes) -> tuple[list[tuple[int, int, int, bytes]], int]:
    """Whole frames in ``data`` and how many bytes they took."""
    frames, pos = [], 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos < 9 + length:
            break
        kind, flags = data[pos + 3], data[pos + 4]
        stream_id = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream_id, bytes(data[pos + 9 : pos + 9 + length])))
        pos += 9 + length
    return frames, pos


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data) -> None:
        assert not self.closed, "written after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return len(self.out)


def new_server(**limits) -> GrpcServer:
    return GrpcServer(METHODS, **limits)


class Harness:
    """One server connection in memory, the test playing the client with raw frames."""

    def __init__(self, server: GrpcServer | None = None, settings: bytes = b"", **limits) -> None:
        self.server = server or new_server(**limits)

        async def make() -> GrpcConnection:
            return GrpcConnection(self.server)

        self.conn = _LOOP.run_until_complete(make())
        self.transport = FakeTransport()
        self.conn.connection_made(self.transport)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.headers: dict[int, list[dict[str, str]]] = {}
        self._read = 0
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings))

    # ---- sending ---------------------------------------------------------------------------

    def send(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        """Feed bytes to the server; returns the frames it wrote in answer."""
        before = len(self.frames)
        self.conn.data_received(data)
        frames, used = parse_frames(self.transport.out[self._read :])
        self._read += used
        for kind, flags, stream_id, payload in frames:
            if kind == HEADERS:
                self.headers.setdefault(stream_id, []).append(dict(self.decoder.decode(payload)))
        self.frames += frames
        return self.frames[before:]

    def request_headers(self, path: str = ECHO, extra: list[tuple[str, str]] | None = None) -> bytes:
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"), ("content-type", "application/grpc")]
        return self.encoder.encode(fields + (extra or []))

    def open(self, stream_id: int, path: str = ECHO, end_stream: bool = False) -> list:
        return self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, self.request_headers(path)))

    def data(self, stream_id: int, payload: bytes, end_stream: bool = False) -> list:
        return self.send(frame(DATA, END_STREAM if end_stream else 0, stream_id, payload))

    def trailers(self, stream_id: int) -> list:
        return self.send(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, self.encoder.encode([("x-trailer", "1")])))

    # ---- what came back --------------------------------------------------------------------

    def goaway(self) -> tuple[int, str] | None:
        """The GOAWAY's error code and debug text, if one was sent."""
        for kind, _, _, payload in self.frames:
            if kind == GOAWAY:
                return int.from_bytes(payload[4:8], "big"), payload[8:].decode()
        return None

    def resets(self) -> dict[int, int]:
        return {sid: int.from_bytes(p, "big") for kind, _, sid, p in self.frames if kind == RST_STREAM}

    def echoed(self, stream_id: int) -> bytes:
        return b"".join(p for kind, _, sid, p in self.frames if kind == DATA and sid == stream_id)

    def status(self, stream_id: int) -> str | None:
        for block in self.headers.get(stream_id, []):
            if "grpc-status" in block:
                return block["grpc-status"]
        return None

    def alive(self) -> bool:
        return not self.transport.closed and self.goaway() is None

    def assert_serves(self, stream_id: int) -> None:
        """A new call on this connection is answered: the connection is healthy."""
        self.open(stream_id)
        self.data(stream_id, message(b"still here"), end_stream=True)
        assert self.echoed(stream_id) == message(b"still here")
        assert self.status(stream_id) == "0"
        assert self.alive()


def assert_connection_error(h: Harness, code: int, text: str = "") -> None:
    goaway = h.goaway()
    assert goaway is not None, f"no GOAWAY; frames: {h.frames}"
    assert goaway[0] == code, goaway
    assert text in goaway[1], goaway
    assert h.transport.closed


# ---- the connection's opening ------------------------------------------------------------


def test_settings_advertise_the_limits():
    h = Harness()
    kind, flags, sid, payload = h.frames[0]
    assert (kind, flags, sid) == (SETTINGS, 0, 0)
    settings = dict(struct.iter_unpack(">HL", payload))
    assert settings[http2.SETTINGS_MAX_CONCURRENT_STREAMS] == 100
    assert settings[http2.SETTINGS_MAX_HEADER_LIST_SIZE] == 16384
    assert settings[http2.SETTINGS_MAX_FRAME_SIZE] == 16384
    assert settings[http2.SETTINGS_ENABLE_PUSH] == 0
    window = next(p for k, _, s, p in h.frames if k == WINDOW_UPDATE and s == 0)
    assert 65535 + int.from_bytes(window, "big") == h.server.limits.connection_window


def test_limits_are_configurable():
    h = Harness(max_concurrent_streams=7, max_header_list_size=4096, max_frame_size=32768)
    settings = dict(struct.iter_unpack(">HL", h.frames[0][3]))
    assert settings[http2.SETTINGS_MAX_CONCURRENT_STREAMS] == 7
    assert settings[http2.SETTINGS_MAX_HEADER_LIST_SIZE] == 4096
    assert settings[http2.SETTINGS_MAX_FRAME_SIZE] == 32768


# ---- stream states (RFC 9113 5.1) ----------------------------------------------------------


@pytest.mark.parametrize("why", ["compressed", "too large", "unknown method"])
def test_trailers_and_data_after_the_server_reset_a_stream_are_ignored(why):
    """The issue's case: a call the server failed and reset (RST_STREAM NO_ERROR after its
    status) gets the client's late frames, which must not break the connection."""
    h = Harness(max_message=100)
    h.open(1, path="/nope" if why == "unknown method" else ECHO)
    if why == "compressed":
        h.data(1, message(b"z", compressed=True))
    elif why == "too large":
        h.data(1, message(b"x" * 101)[:50])
    assert h.resets() == {1: NO_ERROR}
    assert h.status(1) == {"compressed": "12", "too large": "8", "unknown method": "12"}[why]
    h.data(1, b"more bytes of the message the client had already sent")
    h.trailers(1)
    h.send(frame(WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")) + frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
    assert h.alive()
    h.assert_serves(3)


def test_hpack_state_survives_an_ignored_header_block():
    """Frames on a reset stream are ignored after minimal processing: a header block still
    updates the HPACK table, so the next block that refers to it decodes."""
    h = Harness(max_message=10)
    h.open(1)
    h.data(1, message(b"x" * 11))
    assert h.resets() == {1: NO_ERROR}
    h.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, h.encoder.encode([("x-new-name", "indexed from now on")])))
    h.send(frame(HEADERS, END_HEADERS, 3, h.request_headers(extra=[("x-new-name", "indexed from now on")])))
    h.data(3, message(b"ok"), end_stream=True)
    assert h.echoed(3) == message(b"ok") and h.alive()


def test_data_on_an_idle_stream_is_a_connection_error():
    h = Harness()
    h.data(1, b"x")
    assert_connection_error(h, PROTOCOL_ERROR, "DATA on idle stream 1")


def test_data_on_a_half_closed_remote_stream_is_a_stream_error():
    h = Harness()
    h.open(1, path=HOLD, end_stream=True)  # the client is done; the call goes on
    h.data(1, message(b"late"))
    assert h.resets() == {1: STREAM_CLOSED}
    assert h.alive()
    h.assert_serves(3)


def test_data_after_both_sides_ended_is_a_connection_error():
    h = Harness()
    h.open(1)
    h.data(1, message(b"a"), end_stream=True)
    assert h.status(1) == "0"
    h.data(1, message(b"b"))
    assert_connection_error(h, STREAM_CLOSED, "after its END_STREAM")


def test_headers_after_both_sides_ended_is_a_connection_error():
    h = Harness()
    h.open(1, end_stream=True)
    assert h.status(1) == "0"
    h.trailers(1)
    assert_connection_error(h, STREAM_CLOSED, "after its END_STREAM")


def test_window_update_and_rst_stream_on_a_closed_stream_are_ignored():
    h = Harness()
    h.open(1, end_stream=True)
    h.send(frame(WINDOW_UPDATE, 0, 1, (1).to_bytes(4, "big")) + frame(RST_STREAM, 0, 1, (0).to_bytes(4, "big")) + frame(PRIORITY, 0, 1, bytes(5)))
    assert h.alive()
    h.assert_serves(3)


def test_frames_after_the_client_reset_a_stream_are_a_stream_error():
    h = Harness()
    h.open(1, path=HOLD)
    h.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
    h.data(1, b"after my own reset")
    assert h.resets() == {1: STREAM_CLOSED}
    h.data(1, b"again")  # answered once; then ignored like any stream reset here
    assert h.resets() == {1: STREAM_CLOSED} and h.alive()
    h.assert_serves(3)


def test_headers_on_a_lower_stream_that_was_never_opened_is_a_connection_error():
    h = Harness()
    h.open(5, path=HOLD)
    h.open(3)
    assert_connection_error(h, PROTOCOL_ERROR, "out of order")


def test_headers_on_an_even_stream_is_a_connection_error():
    h = Harness()
    h.open(2)
    assert_connection_error(h, PROTOCOL_ERROR, "odd-numbered")


def test_second_header_block_without_end_stream_is_a_stream_error():
    h = Harness()
    h.open(1, path=HOLD)
    h.send(frame(HEADERS, END_HEADERS, 1, h.encoder.encode([("x-more", "1")])))
    assert h.resets() == {1: PROTOCOL_ERROR}
    h.assert_serves(3)


def test_many_closed_streams_are_remembered_within_a_bound():
    h = Harness(reset_burst=10_000)
    conn = h.conn
    for sid in range(1, 2 * 3000, 2):
        h.open(sid, end_stream=True)
    assert len(conn._closed) <= conn.limits.closed_streams
    h.data(1, b"x")  # forgotten long ago: ignored
    assert h.alive()


# ---- frames that are invalid in themselves (RFC 9113 6) --------------------------------------


@pytest.mark.parametrize(
    "frames, code, text",
    [
        (frame(RST_STREAM, 0, 0, bytes(4)), PROTOCOL_ERROR, "RST_STREAM on stream 0"),
        (frame(RST_STREAM, 0, 1, bytes(4)), PROTOCOL_ERROR, "RST_STREAM on idle stream 1"),
        (frame(RST_STREAM, 0, 1, bytes(3)), FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes"),
        (frame(PRIORITY, 0, 0, bytes(5)), PROTOCOL_ERROR, "PRIORITY on stream 0"),
        (frame(PRIORITY, 0, 1, bytes(4)), FRAME_SIZE_ERROR, "PRIORITY"),
        (frame(PING, 0, 0, b"abc"), FRAME_SIZE_ERROR, "PING of 3 bytes"),
        (frame(PING, 0, 1, bytes(8)), PROTOCOL_ERROR, "PING on stream 1"),
        (frame(WINDOW_UPDATE, 0, 0, bytes(4)), PROTOCOL_ERROR, "zero increment"),
        (frame(WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), FLOW_CONTROL_ERROR, "connection window above"),
        (frame(WINDOW_UPDATE, 0, 0, b"\x00\x01"), FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes"),
        (frame(WINDOW_UPDATE, 0, 7, (1).to_bytes(4, "big")), PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream 7"),
        (frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR, "SETTINGS on stream 1"),
        (frame(SETTINGS, ACK, 0, bytes(6)), FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"),
        (frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00"), FRAME_SIZE_ERROR, "multiple of 6"),
        (frame(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), PROTOCOL_ERROR, "ENABLE_PUSH 2"),
        (frame(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above"),
        (frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"), PROTOCOL_ERROR, "MAX_FRAME_SIZE 1 out of range"),
        (frame(GOAWAY, 0, 1, bytes(8)), PROTOCOL_ERROR, "GOAWAY on stream 1"),
        (frame(GOAWAY, 0, 0, bytes(7)), FRAME_SIZE_ERROR, "at least 8 bytes"),
        (frame(5, END_HEADERS, 1, bytes(4)), PROTOCOL_ERROR, "push"),
        (frame(CONTINUATION, END_HEADERS, 1, b""), PROTOCOL_ERROR, "unexpected CONTINUATION"),
        (frame(HEADERS, END_HEADERS, 0, b"\x82"), PROTOCOL_ERROR, "HEADERS on stream 0"),
        (frame(HEADERS, END_HEADERS | PADDED, 1, b"\x09\x82"), PROTOCOL_ERROR, "padding longer than the frame"),
        (frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\x00\x00"), FRAME_SIZE_ERROR, "priority fields"),
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), COMPRESSION_ERROR, "bad HPACK block"),
        (frame(DATA, PADDED, 1, b""), FRAME_SIZE_ERROR, "pad length"),
        (frame(0xFA, 0, 0, b"x" * 16385), FRAME_SIZE_ERROR, "exceeds SETTINGS_MAX_FRAME_SIZE 16384"),
    ],
)
def test_invalid_frames_are_connection_errors_with_the_rfc_code(frames, code, text):
    h = Harness()
    h.send(frames)
    assert_connection_error(h, code, text)


def test_an_oversized_frame_is_refused_from_its_header_without_waiting_for_it():
    h = Harness()
    h.send((1 << 20).to_bytes(3, "big") + bytes([DATA, 0]) + (1).to_bytes(4, "big"))  # the header of a 1 MiB frame
    assert_connection_error(h, FRAME_SIZE_ERROR, "exceeds SETTINGS_MAX_FRAME_SIZE")
    assert len(h.conn._pieces.held) <= 9


def test_unknown_frame_types_and_priority_on_idle_streams_are_ignored():
    h = Harness()
    h.send(frame(0xFA, 0xFF, 9, b"whatever") + frame(PRIORITY, 0, 11, (1).to_bytes(4, "big") + b"\x10"))
    assert h.alive()
    h.assert_serves(1)


@pytest.mark.parametrize(
    "bad, code",
    [
        (lambda sid: frame(WINDOW_UPDATE, 0, sid, bytes(4)), PROTOCOL_ERROR),  # zero increment
        (lambda sid: frame(WINDOW_UPDATE, 0, sid, b"\x7f\xff\xff\xff"), FLOW_CONTROL_ERROR),  # window above 2^31-1
        (lambda sid: frame(PRIORITY, 0, sid, sid.to_bytes(4, "big") + b"\x10"), PROTOCOL_ERROR),  # depends on itself
        (lambda sid: frame(PRIORITY, 0, sid, bytes(4)), FRAME_SIZE_ERROR),
    ],
)
def test_stream_level_errors_reset_only_their_stream(bad, code):
    h = Harness()
    h.open(1, path=HOLD)
    h.send(bad(1))
    assert h.resets() == {1: code}
    assert h.alive()
    h.assert_serves(3)


def test_headers_depending_on_itself_is_a_stream_error():
    h = Harness()
    h.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, (1).to_bytes(4, "big") + b"\x10" + h.request_headers()))
    assert h.resets() == {1: PROTOCOL_ERROR}
    h.assert_serves(3)


def test_data_inside_another_streams_header_block_is_a_connection_error():
    h = Harness()
    h.open(1, path=HOLD)
    block = h.request_headers()
    h.send(frame(HEADERS, 0, 3, block[:4]) + frame(DATA, 0, 1, b"x"))
    assert_connection_error(h, PROTOCOL_ERROR, "DATA inside the header block of stream 3")


def test_continuation_of_another_stream_is_a_connection_error():
    h = Harness()
    block = h.request_headers()
    h.send(frame(HEADERS, 0, 1, block[:4]) + frame(CONTINUATION, END_HEADERS, 3, block[4:]))
    assert_connection_error(h, PROTOCOL_ERROR, "CONTINUATION on stream 3")


def test_a_header_block_in_continuation_frames_is_served():
    h = Harness()
    block = h.request_headers()
    parts = [block[i : i + 3] for i in range(0, len(block), 3)]
    frames = frame(HEADERS, 0, 1, parts[0]) + b"".join(frame(CONTINUATION, END_HEADERS if i == len(parts) - 1 else 0, 1, p) for i, p in enumerate(parts[1:], 1))
    h.send(frames)
    h.data(1, message(b"split"), end_stream=True)
    assert h.echoed(1) == message(b"split") and h.status(1) == "0"


def test_continuation_flood_is_cut_off():
    h = Harness()
    block = h.request_headers()
    started = time.monotonic()
    h.send(frame(HEADERS, 0, 1, block) + frame(CONTINUATION, 0, 1, b"") * 1_000_000)
    assert_connection_error(h, ENHANCE_YOUR_CALM, "more than 32 CONTINUATION frames")
    assert time.monotonic() - started < 5


def test_header_block_over_the_limit_is_cut_off():
    h = Harness(max_header_list_size=4096)
    block = h.request_headers()
    h.send(frame(HEADERS, 0, 1, block) + b"".join(frame(CONTINUATION, 0, 1, b"\x00" * 1000) for _ in range(5)))
    assert_connection_error(h, ENHANCE_YOUR_CALM, "header block larger than 4096 bytes")


def test_header_list_over_max_header_list_size_is_cut_off():
    h = Harness()
    block = h.request_headers(extra=[("x-big", "a" * 18000)])  # Huffman: 18 KB in fewer than 12 KB
    assert len(block) < 16384
    h.send(frame(HEADERS, END_HEADERS, 1, block))
    assert_connection_error(h, ENHANCE_YOUR_CALM, "SETTINGS_MAX_HEADER_LIST_SIZE 16384")


def test_hpack_bomb_is_bounded_by_the_header_list_size():
    """A 4 KiB entry in the dynamic table, then a block referring to it thousands of times
    (1 byte each): decoding stops at the header list size, not at 16 MiB."""
    h = Harness()
    h.open(1, path=HOLD)
    first = h.encoder.encode([("x-bomb", "b" * 4000)])  # literal with incremental indexing: now entry 62
    h.send(frame(HEADERS, END_HEADERS, 3, h.request_headers(extra=[]) + first))
    started = time.monotonic()
    h.send(frame(HEADERS, END_HEADERS, 5, b"\xbe" * 16000))  # index 62, 16,000 times
    assert_connection_error(h, ENHANCE_YOUR_CALM, "SETTINGS_MAX_HEADER_LIST_SIZE")
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("updates", [3, 16000])
def test_table_size_updates_beyond_two_are_refused_quickly(updates):
    h = Harness()
    started = time.monotonic()
    h.send(frame(HEADERS, END_HEADERS, 1, b"\x20" * updates))
    assert_connection_error(h, COMPRESSION_ERROR, "more than two dynamic table size updates")
    assert time.monotonic() - started < 0.5


def test_two_table_size_updates_are_allowed():
    h = Harness()
    h.send(frame(HEADERS, END_HEADERS, 1, b"\x20\x3f\xe1\x1f" + h.request_headers()))  # 0, then 4096
    h.data(1, message(b"ok"), end_stream=True)
    assert h.echoed(1) == message(b"ok")


def test_table_size_update_above_our_setting_is_a_compression_error():
    h = Harness()
    h.send(frame(HEADERS, END_HEADERS, 1, b"\x3f\xe2\x1f" + h.request_headers()))  # 4097
    assert_connection_error(h, COMPRESSION_ERROR)


# ---- limits and floods -------------------------------------------------------------------------


def test_streams_past_max_concurrent_streams_are_refused():
    h = Harness(max_concurrent_streams=10)
    for sid in range(1, 21, 2):
        h.open(sid, path=HOLD)
    assert h.resets() == {}
    h.open(21, path=HOLD)
    assert h.resets() == {21: REFUSED_STREAM}
    h.data(21, b"late data on the refused stream")  # ignored
    assert len(h.conn.streams) == 10 and h.alive()
    h.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))  # one ends: room for one more
    h.assert_serves(23)


def test_rapid_reset_is_answered_with_enhance_your_calm():
    h = Harness()
    opened = 0
    for sid in range(1, 2 * 50_000, 2):
        h.send(frame(HEADERS, END_HEADERS, sid, h.request_headers(HOLD)) + frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big")))
        opened += 1
        if not h.alive():
            break
    assert_connection_error(h, ENHANCE_YOUR_CALM, "RST_STREAM flood")
    assert opened <= 300
    assert h.server.stats.streams <= 300


def test_ping_flood_is_answered_with_enhance_your_calm():
    h = Harness()
    h.send(frame(PING, 0, 0, bytes(8)) * 10_000)
    assert_connection_error(h, ENHANCE_YOUR_CALM, "PING flood")
    assert sum(1 for k, f, _, _ in h.frames if k == PING and f & ACK) <= 102


def test_settings_flood_is_answered_with_enhance_your_calm():
    h = Harness()
    h.send(frame(SETTINGS, 0, 0, b"\x00\x04\x00\x01\x00\x00" * 2000) * 1000)
    assert_connection_error(h, ENHANCE_YOUR_CALM, "SETTINGS flood")


def test_a_settings_frame_walks_the_streams_once():
    h = Harness(max_concurrent_streams=100)
    for sid in range(1, 201, 2):
        h.open(sid, path=HOLD)
    started = time.monotonic()
    for value in range(20):
        h.send(frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 65536 + value) * 2730))
    assert time.monotonic() - started < 2
    assert all(s.send_window == 65536 + 19 for s in h.conn.streams.values())
    assert h.alive()


def test_pings_are_answered_within_the_budget():
    h = Harness()
    answers = h.send(frame(PING, 0, 0, b"12345678") + frame(PING, ACK, 0, b"ignoreme"))
    assert [(k, f, p) for k, f, _, p in answers] == [(PING, ACK, b"12345678")]


# ---- flow control and memory -------------------------------------------------------------------


def test_data_beyond_the_connection_window_is_a_flow_control_error():
    h = Harness(connection_window=65535, max_message=1 << 20)
    h.open(1, path=HOLD)
    h.send(b"".join(frame(DATA, 0, 1, b"x" * 16384) for _ in range(5)))
    assert_connection_error(h, FLOW_CONTROL_ERROR, "connection's flow-control window")


class WindowedClient(Harness):
    """A client that keeps to the connection window the server gives it."""

    def __init__(self, **limits) -> None:
        super().__init__(**limits)
        self.window = 65535 + self._increments()

    def _increments(self, frames=None) -> int:
        return sum(int.from_bytes(p, "big") for k, _, s, p in (frames if frames is not None else self.frames) if k == WINDOW_UPDATE and s == 0)

    def data(self, stream_id: int, payload: bytes, end_stream: bool = False) -> list:
        assert len(payload) <= self.window, "the test client would break the window"
        self.window -= len(payload)
        answers = super().data(stream_id, payload, end_stream)
        self.window += self._increments(answers)
        return answers


def test_the_connection_window_is_not_given_back_for_partial_messages():
    limit = 50_000
    h = WindowedClient(max_message=limit, connection_window=2 * (limit + 5) + 16384)
    window = h.server.limits.connection_window
    body = b"m" * limit
    for sid in (1, 3):
        h.open(sid, path=HOLD)
    whole = message(body)
    for chunk in range(0, limit + 4, 10_000):  # two messages, each missing its last byte
        for sid in (1, 3):
            h.data(sid, whole[chunk : min(chunk + 10_000, limit + 4)])
            assert h.window + h.conn._held() <= window
    held = h.conn._held()
    assert held == 2 * (limit + 4)
    assert h.window <= window - held
    for sid in (1, 3):
        h.data(sid, message(body)[limit + 4 :])  # the last byte: both messages whole
    assert h.conn._held() == 0
    h.data(1, b"")  # the next batch gives the window back
    assert h.window >= window // 2


def test_a_client_that_does_not_read_is_bounded_by_the_connection_window():
    """The client never opens its stream window (INITIAL_WINDOW_SIZE 0) but keeps sending
    requests: answers pile up only until the connection window closes, and a client that
    ignores the window then is cut off."""
    h = WindowedClient(settings=struct.pack(">HL", 4, 0), max_message=10_000)
    window = h.server.limits.connection_window
    h.open(1)
    sent = 0
    chunk = message(b"r" * 9000)
    while h.window >= len(chunk) and sent < 10 * window:
        h.data(1, chunk)
        sent += len(chunk)
        backlog = sum(len(s.backlog) for s in h.conn.streams.values())
        assert backlog <= window + len(chunk)
    assert sent < 2 * window  # the window closed: the client could not go on
    assert h.alive()
    h.send(frame(DATA, 0, 1, chunk) * 8)  # ignoring the window now
    assert_connection_error(h, FLOW_CONTROL_ERROR)


def test_a_full_socket_pauses_reading_until_it_drains():
    h = Harness()
    h.conn.pause_writing()
    assert not h.transport.reading
    h.conn.resume_writing()
    assert h.transport.reading
    assert h.server.stats.write_pauses == 1


def test_partial_messages_are_refused_from_their_prefix():
    """A message declaring more than max_message ends its call before its bytes are held."""
    h = Harness(max_message=1000)
    h.open(1)
    h.data(1, b"\x00" + (60_000_000).to_bytes(4, "big") + b"x" * 95)
    assert h.status(1) == "8" and h.resets() == {1: NO_ERROR}
    assert h.conn._held() == 0


# ---- transport counters -----------------------------------------------------------------------


def test_stats_count_calls_refusals_and_resets():
    server = new_server(max_concurrent_streams=1)
    h = Harness(server)
    h.open(1, path=HOLD)
    h.open(3, path=HOLD)  # refused by the limit: never a call
    h.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
    stats = server.stats.snapshot()
    assert stats["connections"] == 1 and stats["streams"] == 1 and stats["streams_reset"] == 1
    h.send(frame(PING, 0, 0, b"abc"))
    assert server.stats.connection_errors == 1 and server.stats.connections_calmed == 0


# ---- the same state table on the tunnels' side (metabridge.core.tunnels, the client) ----------------


def _hcm_upstream():
    from metabridge.core.tunnels import Upstream

    upstream = Upstream()
    tunnel = upstream.open_tunnel("cluster")
    upstream.output()
    hcm = Encoder()
    upstream.receive(frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, hcm.encode([(":status", "200")])))
    return upstream, tunnel, hcm


def test_tunnel_frames_after_the_bridge_reset_it_are_ignored():
    from metabridge.core.tunnels import ConnectionLost

    upstream, tunnel, hcm = _hcm_upstream()
    upstream.close_tunnel(tunnel, reset=True)
    events = upstream.receive(frame(DATA, 0, 1, b"late") + frame(HEADERS, END_HEADERS | END_STREAM, 1, hcm.encode([("x-trailer", "1")])))
    assert not any(isinstance(e, (ConnectionLost, tuple)) for e in events)  # a tuple: a tunnel's bytes
    second = upstream.open_tunnel("cluster")
    events = upstream.receive(frame(HEADERS, END_HEADERS, 3, hcm.encode([(":status", "200")])) + frame(DATA, 0, 3, b"fresh"))
    assert [e[1] for e in events if type(e) is tuple] == [b"fresh"] and second.id == 3


def test_tunnel_frames_on_idle_streams_lose_the_connection():
    from metabridge.core.tunnels import ConnectionLost

    upstream, _, _ = _hcm_upstream()
    events = upstream.receive(frame(DATA, 0, 5, b"never opened"))
    assert any(isinstance(e, ConnectionLost) and "idle stream 5" in e.reason for e in events)


def test_message_limit_follows_the_listeners_frame_size():
    from metabridge.transport.grpc_server import message_limit

    assert message_limit([]) == 4 * 1024 * 1024
    assert message_limit([1 << 20, 16 << 20]) == 2 * (16 << 20) + 64 * 1024
