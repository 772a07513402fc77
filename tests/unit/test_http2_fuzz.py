"""Property-based fuzzing of the HTTP/2 frame parser and of the whole gRPC server connection:
random bytes, random frame sequences and mutations of a valid call. Whatever arrives, the
server never raises, never holds more than its limits allow, answers a broken connection with
a GOAWAY and closes it, and a call on another connection of the same server keeps working.
"""

from __future__ import annotations

import struct

from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metabridge.core.tunnels import ConnectionLost, Upstream
from metabridge.transport import http2
from metabridge.transport.http2 import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Http2Connection,
    ProtocolError,
)
from tests.unit.test_http2_states import ECHO, HOLD, Harness, frame, message, new_server

LIMITS = dict(max_concurrent_streams=4, max_header_list_size=2048, max_message=2048, max_continuations=4, connection_window=70_000, reset_burst=50, ping_burst=20, settings_burst=20)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_limits(h: Harness) -> None:
    """What the server holds for this connection stays within its limits."""
    conn, limits = h.conn, h.server.limits
    assert len(conn.streams) <= limits.max_concurrent_streams
    assert len(conn._pieces.held) <= 9 + limits.max_frame_size
    assert conn._header_block is None or len(conn._header_block.block) <= limits.max_header_block
    assert len(conn._closed) <= limits.closed_streams
    partial = sum(len(s.pieces.held) for s in conn.streams.values())
    assert all(len(s.pieces.held) <= h.server.max_message + 5 for s in conn.streams.values())
    assert partial <= limits.connection_window
    backlog = sum(len(s.backlog) for s in conn.streams.values())
    assert backlog <= 2 * limits.connection_window + limits.max_frame_size
    if h.goaway() is not None:
        assert h.transport.closed


def feed_all(h: Harness, pieces: list[bytes]) -> None:
    for piece in pieces:
        h.send(piece)  # data_received: raising here fails the test
        check_limits(h)
        if h.transport.closed:
            break


def another_connection_serves(h: Harness) -> None:
    other = Harness(h.server)
    other.assert_serves(1)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


# ---- the frame parser alone ----------------------------------------------------------------


class Sink(Http2Connection):
    def __init__(self, server: bool) -> None:
        super().__init__(server=server)
        self.out: list[bytes] = []

    def _write(self, data) -> None:
        self.out.append(bytes(data))


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8), st.booleans())
def test_parser_raises_only_protocol_errors(data, cuts, server):
    conn = Sink(server)
    if not server:
        conn.settings_frames()
    try:
        for piece in split((PREFACE if server else b"") + data, cuts):
            conn.feed(piece)
            assert len(conn._pieces.held) <= 9 + conn.limits.max_frame_size
    except ProtocolError as exc:
        assert 0 <= exc.code <= 0xD


@FUZZ
@given(st.binary(max_size=3000))
def test_tunnel_side_never_raises(data):
    """The client side (metabridge.core.tunnels) fed anything by 'HCM': events, never an exception."""
    upstream = Upstream()
    upstream.open_tunnel("cluster")
    upstream.output()
    events = upstream.receive(data)
    assert all(not isinstance(e, ConnectionLost) for e in events[:-1])


# ---- the whole server connection ----------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4000), st.lists(st.integers(0, 4000), max_size=8))
def test_server_survives_random_bytes(data, cuts):
    h = Harness(new_server(**LIMITS))
    feed_all(h, split(data, cuts))
    another_connection_serves(h)


_stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 0x7FFFFFFF, 0x80000001])


@st.composite
def frames(draw, encoder: Encoder):
    kind = draw(st.sampled_from([DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, 5, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION, 0x20]))
    flags = draw(st.sampled_from([0, END_STREAM, END_HEADERS, END_HEADERS | END_STREAM, 0x08, 0x20, 0x2D, 0xFF]))
    stream_id = draw(_stream_ids)
    payload = draw(
        st.one_of(
            st.binary(max_size=40),
            st.just(b""),
            st.builds(lambda n: n.to_bytes(4, "big"), st.integers(0, 2**32 - 1)),
            st.builds(message, st.binary(max_size=300)),
            st.builds(lambda n: b"\x00" + n.to_bytes(4, "big"), st.integers(0, 2**32 - 1)),  # a message prefix alone
            st.builds(lambda path, extra: encoder.encode([(":method", "POST"), (":path", path)] + extra), st.sampled_from([ECHO, HOLD, "/x"]), st.lists(st.tuples(st.sampled_from(["a", "te", "x-long"]), st.text(max_size=30)), max_size=3)),
            st.builds(lambda entries: b"".join(struct.pack(">HL", k, v) for k, v in entries), st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=4)),
            st.just(b"\x20" * 10),
            st.just(b"\xbe" * 100),
        )
    )
    return frame(kind, flags, stream_id, payload)


@FUZZ
@given(st.data())
def test_server_survives_random_frame_sequences(data):
    encoder = Encoder()
    h = Harness(new_server(**LIMITS))
    sequence = data.draw(st.lists(frames(encoder), max_size=40))
    cuts = data.draw(st.lists(st.integers(0, 20_000), max_size=4))
    feed_all(h, split(b"".join(sequence), cuts))
    another_connection_serves(h)


def _valid_call(h: Harness) -> list[bytes]:
    """A well-formed conversation: two calls with messages, a PING, a SETTINGS, trailers."""
    return [
        frame(HEADERS, END_HEADERS, 1, h.request_headers()),
        frame(DATA, 0, 1, message(b"first")),
        frame(HEADERS, END_HEADERS, 3, h.request_headers(HOLD)),
        frame(PING, 0, 0, b"pingpong"),
        frame(DATA, 0, 1, message(b"second")[:4]),
        frame(DATA, 0, 1, message(b"second")[4:]),
        frame(SETTINGS, 0, 0, struct.pack(">HL", http2.SETTINGS_INITIAL_WINDOW_SIZE, 100_000)),
        frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big")),
        frame(RST_STREAM, 0, 3, (8).to_bytes(4, "big")),
        frame(HEADERS, END_HEADERS | END_STREAM, 1, h.encoder.encode([("x-trailer", "t")])),
        frame(GOAWAY, 0, 0, bytes(8)),
    ]


_mutation = st.tuples(st.sampled_from(["drop", "repeat", "swap", "flip", "truncate", "retype", "restream", "reflag", "lengthen"]), st.integers(0, 10), st.integers(0, 255))


def mutate(frames_: list[bytes], mutations) -> list[bytes]:
    out = list(frames_)
    for how, index, value in mutations:
        if not out:
            break
        i = index % len(out)
        f = bytearray(out[i])
        if how == "drop":
            del out[i]
            continue
        if how == "repeat":
            out.insert(i, bytes(f))
            continue
        if how == "swap":
            j = value % len(out)
            out[i], out[j] = out[j], out[i]
            continue
        if not f:
            continue
        if how == "flip":
            f[value % len(f)] ^= 1 << (value % 8)
        elif how == "truncate":
            f = f[: value % len(f)]
        elif len(f) < 9:  # a truncated frame has no header left to change
            pass
        elif how == "retype":
            f[3] = value % 12
        elif how == "restream":
            f[5:9] = (value % 8).to_bytes(4, "big")
        elif how == "reflag":
            f[4] = value
        elif how == "lengthen":
            f[0:3] = (int.from_bytes(f[0:3], "big") + value).to_bytes(3, "big")
        out[i] = bytes(f)
    return out


@FUZZ
@given(st.lists(_mutation, max_size=6), st.lists(st.integers(0, 2000), max_size=4))
def test_server_survives_mutations_of_a_valid_call(mutations, cuts):
    h = Harness(new_server(**LIMITS))
    feed_all(h, split(b"".join(mutate(_valid_call(h), mutations)), cuts))
    another_connection_serves(h)


def test_the_valid_call_is_served_unmutated():
    """The base of the mutations is itself served without any error."""
    h = Harness(new_server(**LIMITS))
    feed_all(h, _valid_call(h))
    assert h.echoed(1) == message(b"first") + message(b"second")
    assert h.status(1) == "0"
    assert h.goaway() is None
