"""Tunnels and HCM's SETTINGS_MAX_CONCURRENT_STREAMS, and CONNECTs HCM refuses (REFUSED_STREAM):
through the ext_proc transport, with the fake HCM (an h2 server) behind it."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from metabridge.transport.http2 import GOAWAY, frame
from tests.unit.connection_harness import TIMEOUT, UNSPECIFIED, Harness, encode_frame, in_loop, parse_frames, wait_until

CLUSTER = b"x-metabridge-cluster"


def limited(limit: int, **options) -> Harness:
    """A connection with a tunnel to c1 open (request 1 on it) and HCM's limit lowered to ``limit``."""
    h = Harness(**options)
    h.read(encode_frame(1, 1, b"a"))
    assert list(h.hcm.requests) == [1]
    h.hcm.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
    h.write()
    assert h.session.upstream.peer_max_streams == limit
    return h


@in_loop
async def test_a_tunnel_over_hcms_stream_limit_waits_for_a_stream():
    h = limited(1)
    h.read(encode_frame(2, 2, b"b"))  # c2: a second tunnel, over HCM's limit of 1
    assert list(h.hcm.requests) == [1] and h.session.upstream.queued == 1, "no CONNECT beyond the limit"
    assert (h.stats.tunnel_opened, h.stats.tunnel_stream_waited) == (2, 1)
    assert h.hcm.reset == {} and h.client_frames() == []
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"one"), end_stream=True)  # answered; c1's upstream closed
    h.write()
    assert list(h.hcm.requests) == [1, 3] and h.hcm.requests[3][CLUSTER] == b"c2", "c1's stream ended: c2's tunnel has one"
    assert [flow for flow, *_ in parse_frames(bytes(h.hcm.received[3]))] == [2], "what waited went on the new stream"
    h.hcm.accept(3)
    h.hcm.send(3, encode_frame(2, 2, b"two"))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"one"), (2, 2, 0, b"two")]
    assert h.session.upstream.queued == 0 and h.stats.request_active == 0


@in_loop
async def test_hcm_raising_its_limit_starts_the_waiting_tunnels():
    h = limited(1)
    h.read(encode_frame(2, 2, b"b"))
    assert h.session.upstream.queued == 1
    h.hcm.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    h.write()
    assert list(h.hcm.requests) == [1, 3] and h.session.upstream.queued == 0


@in_loop
async def test_a_waiting_tunnel_is_bounded_by_the_setup_timeout():
    h = limited(1, tunnel_setup_timeout=0.05)
    h.hcm.accept(1)  # c1's tunnel is open (and stays): it holds HCM's one stream
    h.write()
    h.read(encode_frame(2, 2, b"b"))
    assert h.session.upstream.queued == 1
    await wait_until(lambda: h.client_frames() == [(2, 2, TIMEOUT, b"")], "the waiting tunnel's setup timeout")
    assert h.session.upstream.queued == 0 and list(h.hcm.requests) == [1], "given up without ever being sent"
    assert h.stats.request_active == 1, "request 1 still waits on its own tunnel"


@in_loop
async def test_a_refused_connect_is_made_again_on_a_new_stream_once():
    h = Harness()
    h.read(encode_frame(1, 1, b"a"))
    h.hcm.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    h.write()
    assert list(h.hcm.requests) == [1, 3] and h.hcm.requests[3][CLUSTER] == b"c1"
    assert [flow for flow, *_ in parse_frames(bytes(h.hcm.received[3]))] == [1], "the request again, on the new stream"
    assert h.client_frames() == [] and h.stats.request_redispatched == 1
    h.hcm.h2.reset_stream(3, ErrorCodes.REFUSED_STREAM)  # refused again: the request's one more try is spent
    h.write()
    assert h.client_frames() == [(1, 1, UNSPECIFIED, b"")] and h.stats.request_active == 0
    h.read(encode_frame(2, 1, b"b"))  # the slot did not rest: the next request opens a tunnel at once
    assert list(h.hcm.requests) == [1, 3, 5]
    h.hcm.accept(5)
    h.hcm.send(5, encode_frame(2, 1, b"ok"))
    h.write()
    assert h.client_frames()[-1] == (2, 1, 0, b"ok")


@in_loop
async def test_a_graceful_goaway_refuses_the_waiting_tunnels_too():
    h = limited(1)
    h.read(encode_frame(2, 2, b"b"))
    assert h.session.upstream.queued == 1
    h.write(data=frame(GOAWAY, 0, 0, (1).to_bytes(4, "big") + (0).to_bytes(4, "big")))  # graceful, up to stream 1
    assert h.session.upstream.queued == 0 and list(h.hcm.requests) == [1], "never sent"
    assert h.client_frames() == [(2, 2, UNSPECIFIED, b"")], "HCM will not serve it: an error reply"
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"one"))
    h.write()
    assert h.client_frames()[-1] == (1, 1, 0, b"one"), "the open tunnel finishes its request"
