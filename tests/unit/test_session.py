"""bridge/core/connection.py through the ext_proc transport: client bytes in, HTTP/2 to a fake
HCM out, and back (the harness is tests/unit/connection_harness.py)."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from metabridge._proto.network_ext_proc_pb2 import ProcessingResponse
from metabridge.sdk.codec import DecodeStatus, MalformedFrame
from tests.unit.connection_harness import (
    BAD_RESPONSE,
    CLOSE,
    CLUSTER_HEADER,
    CLUSTER_NOT_FOUND,
    NO_HEALTHY_UPSTREAM,
    OVER_LIMIT,
    ROUTE_NOT_FOUND,
    TIMEOUT,
    UNSPECIFIED,
    AwesomeRpcCodec,
    Harness,
    InOrderCodec,
    encode_frame,
    has_read,
    has_write,
    in_loop,
    parse_frames,
    route,
    wait_until,
)


# ---- read path: framing ----------------------------------------------------------------------------

STREAM = encode_frame(1, 1, b"hello") + encode_frame(77, 0) + encode_frame(2, 2, b"x" * 40) + encode_frame(3, 1)


def h2_and_client_bytes(messages: list[ProcessingResponse]) -> tuple[bytes, bytes]:
    return (
        b"".join(m.read_data.data for m in messages if has_read(m)),
        b"".join(m.write_data.data for m in messages if has_write(m)),
    )


@in_loop
async def test_frames_split_at_every_byte_boundary_give_the_same_output():
    whole = Harness()
    whole.read(STREAM)
    # Two tunnels (c1, c2) carrying exactly the three requests; the heartbeat is answered here.
    assert whole.hcm.requests.keys() == {1, 3}
    expected = {sid: parse_frames(bytes(data)) for sid, data in whole.hcm.received.items()}
    assert expected == {1: [(1, 1, 0, b"hello"), (3, 1, 0, b"")], 3: [(2, 2, 0, b"x" * 40)]}
    assert whole.client_frames() == [(77, 0, 0, b"")]
    whole.close()

    def tunnels_and_client(h: Harness):
        return {sid: parse_frames(bytes(data)) for sid, data in h.hcm.received.items()}, h.client_frames()

    for cut in range(1, len(STREAM)):
        split = Harness()
        first, second = split.read(STREAM[:cut]), split.read(STREAM[cut:])
        assert [has_read(m) for m in first].count(True) == 1 and [has_read(m) for m in second].count(True) == 1
        assert tunnels_and_client(split) == (expected, [(77, 0, 0, b"")]), f"cut at byte {cut}"
        split.close()

    trickle = Harness()
    for i in range(len(STREAM)):
        answer = trickle.read(STREAM[i : i + 1])
        assert has_read(answer[0]), "every read gets a read_data answer"
    assert tunnels_and_client(trickle) == (expected, [(77, 0, 0, b"")])
    trickle.close()


@in_loop
async def test_frames_of_one_read_travel_in_one_http2_data_frame_per_tunnel():
    h = Harness()
    h.read(b"".join(encode_frame(i, 1, b"p") for i in range(1, 9)))
    assert h.hcm.data_frames[1] == 1, "8 pipelined requests, one DATA frame"
    assert [flow for flow, *_ in parse_frames(bytes(h.hcm.received[1]))] == list(range(1, 9))


@in_loop
async def test_partial_frame_is_held_and_answered_with_empty_read_data():
    h = Harness()
    frame = encode_frame(5, 1, b"body")
    answer = h.read(frame[:10])
    assert len(answer) == 1 and has_read(answer[0]) and answer[0].read_data.data == b""
    assert answer[0].connection_status == ProcessingResponse.CONTINUE
    assert h.stats.request == 0 and not h.hcm.requests
    answer = h.read(frame[10:])
    assert len(answer) == 1 and answer[0].read_data.data
    assert bytes(h.hcm.received[1]) == frame
    assert h.stats.request == h.stats.request_decoding_success == 1


@in_loop
async def test_several_frames_in_one_read_make_one_read_data_answer():
    h = Harness()
    frames = [encode_frame(i, 1, bytes([i]) * i) for i in range(1, 6)]
    answer = h.read(b"".join(frames))
    assert len(answer) == 1 and has_read(answer[0])
    assert bytes(h.hcm.received[1]) == b"".join(frames)
    assert h.stats.request_twoway == 5 and h.stats.request_active == 5


@in_loop
async def test_request_mutation_rewrites_the_forwarded_frame():
    h = Harness()
    h.read(encode_frame(9, 3, b"tagged"))
    assert parse_frames(bytes(h.hcm.received[1])) == [(9, 30, 0, b"tagged")]


# ---- read path: local answers ------------------------------------------------------------------


@in_loop
async def test_no_route_gets_a_route_not_found_reply_and_no_http2():
    h = Harness()
    answer = h.read(encode_frame(11, 42, b"nobody-home"))
    assert [has_read(m) for m in answer] == [True, False]
    assert answer[0].read_data.data == b""
    assert parse_frames(answer[1].write_data.data) == [(11, 42, ROUTE_NOT_FOUND, b"")]
    assert h.stats.local_response_route_not_found == 1 and h.stats.request_active == 0


@in_loop
async def test_heartbeat_is_answered_locally_without_http2():
    h = Harness()
    answer = h.read(encode_frame(123, 0))
    assert answer[0].read_data.data == b"", "a heartbeat must not open a tunnel"
    assert parse_frames(answer[1].write_data.data) == [(123, 0, 0, b"")]
    assert h.stats.request_heartbeat == 1 and h.stats.tunnel_opened == 0


@in_loop
async def test_malformed_frame_stops_decoding_answers_what_is_in_flight_then_closes():
    h = Harness()
    bad = bytes.fromhex("01" "00000001" "00000005" "0001" "0000")  # len 5 < its 13-byte header
    answer = h.read(encode_frame(1, 1) + encode_frame(2, 0) + bad)
    assert [m.connection_status for m in answer] == [ProcessingResponse.CONTINUE] * len(answer), "request 1 is still in flight"
    assert bytes(h.hcm.received[1]) == encode_frame(1, 1), "frames before the bad one are forwarded"
    assert h.client_frames() == [(2, 0, 0, b"")], "and the heartbeat before it answered"
    assert h.stats.request_decoding_error == 1 and h.stats.downstream_cx_closed_bad_request == 1
    # Whatever the client sends afterwards is swallowed.
    later = h.read(encode_frame(3, 1))
    assert len(later) == 1 and later[0].read_data.data == b""
    assert 3 not in h.hcm.requests and bytes(h.hcm.received[1]) == encode_frame(1, 1)
    # The request in flight gets its response; then the connection closes, CLOSE on its own.
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"ok"))
    answer = h.write()
    assert h.client_frames() == [(2, 0, 0, b""), (1, 1, 0, b"ok")]
    assert answer[-1].connection_status == CLOSE
    assert not has_read(answer[-1]) and not has_write(answer[-1]), "CLOSE must travel without data"


@in_loop
async def test_frame_larger_than_max_frame_size_closes_the_connection():
    h = Harness(max_frame_size=64)
    answer = h.read(encode_frame(1, 1, b"z" * 100)[:40])  # the header already announces 113 bytes
    assert answer[-1].connection_status == CLOSE and not has_read(answer[-1])
    assert h.stats.request_decoding_error == 1


# ---- the HTTP/2 side -------------------------------------------------------------------------------


@in_loop
async def test_connect_then_response_reaches_the_client():
    h = Harness()
    h.read(encode_frame(7, 1, b"ping"))
    assert h.hcm.requests[1] == {b":method": b"CONNECT", b":authority": b"c1", CLUSTER_HEADER: b"c1"}
    assert bytes(h.hcm.received[1]) == encode_frame(7, 1, b"ping")

    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(7, 1, b"pong"))
    answer = h.write()
    assert any(has_write(m) for m in answer)
    assert h.client_frames() == [(7, 1, 0, b"pong")]
    assert (h.stats.response, h.stats.response_success, h.stats.request_active) == (1, 1, 0)
    assert h.session.pool.links()[0].tunnel.upstream_host == "127.0.0.1:10001"


@in_loop
async def test_every_envoy_message_gets_one_answer_in_its_direction():
    h = Harness()
    h.read(encode_frame(7, 1))
    h.hcm.accept(1)
    answer = h.write()  # only SETTINGS and HEADERS: nothing for the client yet
    assert [has_write(m) for m in answer].count(True) == 1
    assert all(m.write_data.data == b"" for m in answer if has_write(m))


@in_loop
async def test_responses_split_and_out_of_order_are_matched_by_id():
    h = Harness()
    h.read(encode_frame(1, 1, b"a") + encode_frame(2, 1, b"b"))
    h.hcm.accept(1)
    second, first = encode_frame(2, 1, b"B"), encode_frame(1, 1, b"A")
    h.hcm.send(1, second + first[:4])
    h.write()
    assert h.client_frames() == [(2, 1, 0, b"B")]
    h.hcm.send(1, first[4:])
    h.write()
    assert h.client_frames() == [(2, 1, 0, b"B"), (1, 1, 0, b"A")]
    assert h.stats.request_active == 0


@in_loop
async def test_response_mutation_and_error_responses():
    h = Harness()
    h.read(encode_frame(4, 3) + encode_frame(5, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(4, 30, b"ok") + encode_frame(5, 1, rsp_code=7))
    h.write()
    assert h.client_frames() == [(4, 31, 0, b"ok"), (5, 1, 7, b"")]
    assert (h.stats.response_success, h.stats.response_error) == (1, 1)


@in_loop
async def test_upstream_heartbeats_are_dropped():
    h = Harness()
    h.read(encode_frame(1, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(999, 0) + encode_frame(1, 1, b"r"))
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"r")]
    assert h.stats.response_unmatched == 0


@in_loop
async def test_a_large_request_is_delivered_through_flow_control():
    h = Harness()
    frame = encode_frame(1, 1, bytes(range(256)) * 800)  # 204813 bytes, over the initial 64 KiB windows
    h.read(frame)
    assert 0 < len(h.hcm.received[1]) < len(frame)
    for _ in range(50):  # HCM's WINDOW_UPDATEs let the rest out
        if len(h.hcm.received[1]) == len(frame):
            break
        h.write()
    assert bytes(h.hcm.received[1]) == frame


@in_loop
async def test_tunnels_per_cluster_round_robin():
    h = Harness(tunnels_per_cluster=2)
    h.read(encode_frame(1, 1) + encode_frame(2, 1) + encode_frame(3, 1))
    assert sorted(h.hcm.requests) == [1, 3]
    assert parse_frames(bytes(h.hcm.received[1])) == [(1, 1, 0, b""), (3, 1, 0, b"")]
    assert parse_frames(bytes(h.hcm.received[3])) == [(2, 1, 0, b"")]
    assert h.stats.tunnel_opened == 2


@in_loop
async def test_duplicate_request_id_in_flight_gets_an_error_reply():
    h = Harness()
    h.read(encode_frame(7, 1, b"first") + encode_frame(7, 1, b"second"))
    assert parse_frames(bytes(h.hcm.received[1])) == [(7, 1, 0, b"first")]
    assert h.client_frames() == [(7, 1, UNSPECIFIED, b"")]
    assert h.stats.request_active == 1


# ---- tunnel failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "rsp_code", "stat"),
    [
        (b"NC", CLUSTER_NOT_FOUND, "local_response_cluster_not_found"),
        (b"UO", OVER_LIMIT, "local_response_over_limit"),
        (b"UH", NO_HEALTHY_UPSTREAM, "local_response_no_healthy_upstream"),
        (b"UF", UNSPECIFIED, "local_response_unspecified"),
        (b"UT", TIMEOUT, "local_response_timeout"),
        (b"", UNSPECIFIED, "local_response_unspecified"),
    ],
)
@in_loop
async def test_refused_connect_becomes_the_matching_error_reply(flags, rsp_code, stat):
    h = Harness()
    h.read(encode_frame(1, 2) + encode_frame(2, 2))
    h.hcm.refuse(1, flags)
    answer = h.write()
    assert [m.connection_status for m in answer] == [ProcessingResponse.CONTINUE] * len(answer), "the client connection stays"
    assert h.client_frames() == [(1, 2, rsp_code, b""), (2, 2, rsp_code, b"")]
    assert getattr(h.stats, stat) == 2 and h.stats.tunnel_failed == 1 and h.stats.request_active == 0
    # The next request to that cluster tries a new tunnel.
    h.read(encode_frame(3, 2))
    assert sorted(h.hcm.requests) == [1, 3]


@in_loop
async def test_reset_after_open_fails_exactly_the_pending_requests():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 1) + encode_frame(3, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(3, 1, b"done"))
    h.write()
    h.hcm.h2.reset_stream(1, ErrorCodes.CONNECT_ERROR)
    h.write()
    frames = h.client_frames()
    assert frames[0] == (3, 1, 0, b"done")
    assert sorted(frames[1:]) == [(1, 1, UNSPECIFIED, b""), (2, 1, UNSPECIFIED, b"")]
    assert h.stats.local_response_unspecified == 2 and h.stats.request_active == 0
    h.hcm.take()
    h.write()  # nothing more happens for the dead tunnel
    assert len(h.client_frames()) == 3


@in_loop
async def test_upstream_close_fails_the_pending_requests():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"r"), end_stream=True)
    h.write()
    assert h.client_frames() == [(1, 1, 0, b"r"), (2, 1, UNSPECIFIED, b"")]
    assert 1 in h.hcm.ended, "the bridge ends its side of the tunnel too"


@in_loop
async def test_undecodable_response_is_a_bad_response_and_resets_the_tunnel():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 1))
    h.hcm.accept(1)
    h.hcm.send(1, bytes.fromhex("01" "00000001" "00000002" "0001" "0000"))
    h.write()
    assert sorted(h.client_frames()) == [(1, 1, BAD_RESPONSE, b""), (2, 1, BAD_RESPONSE, b"")]
    assert h.stats.response_decoding_error == 1
    assert h.hcm.reset.get(1) == ErrorCodes.CANCEL


@in_loop
async def test_goaway_fails_everything_and_closes_after_the_replies():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 2))
    h.hcm.accept(1)
    h.hcm.h2.close_connection(error_code=ErrorCodes.INTERNAL_ERROR)
    answer = h.write()
    assert sorted(h.client_frames()) == [(1, 1, UNSPECIFIED, b""), (2, 2, UNSPECIFIED, b"")]
    assert answer[-1].connection_status == CLOSE and not has_write(answer[-1]) and not has_read(answer[-1])
    assert h.read(encode_frame(3, 1))[0].read_data.data == b""


def goaway(last_stream_id: int, code: int = 0) -> bytes:
    return b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big")


@in_loop
async def test_graceful_goaway_lets_open_tunnels_finish_then_closes():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 2))  # c1 on stream 1, c2 on stream 3
    h.hcm.accept(1)
    h.write()
    answer = h.write(data=goaway(1))  # HCM drains: stream 1 goes on, stream 3 is refused
    assert h.client_frames() == [(2, 2, UNSPECIFIED, b"")], "the refused tunnel's request fails at once"
    assert all(m.connection_status == ProcessingResponse.CONTINUE for m in answer)
    # A new request for c1 still travels on the open tunnel; one for c2 cannot get a tunnel.
    h.read(encode_frame(3, 1) + encode_frame(4, 2))
    assert 5 not in h.hcm.requests
    assert parse_frames(bytes(h.hcm.received[1])) == [(1, 1, 0, b""), (3, 1, 0, b"")]
    assert h.client_frames()[-1] == (4, 2, UNSPECIFIED, b"")
    h.hcm.send(1, encode_frame(1, 1, b"a"))
    assert all(m.connection_status == ProcessingResponse.CONTINUE for m in h.write()), "request 3 still in flight"
    h.hcm.send(1, encode_frame(3, 1, b"b"))
    answer = h.write()
    assert h.client_frames()[-2:] == [(1, 1, 0, b"a"), (3, 1, 0, b"b")]
    assert answer[-1].connection_status == CLOSE, "drained: the connection ends once nothing is in flight"
    assert h.stats.downstream_cx_drained == 1


@in_loop
async def test_broken_http2_from_hcm_fails_everything_and_closes():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 2))
    h.hcm.accept(1)
    h.write()
    bad_window_update = b"\x00\x00\x02\x08\x00\x00\x00\x00\x00\x00\x01"  # 2 bytes, not 4
    answer = h.write(data=bad_window_update)
    assert sorted(h.client_frames()) == [(1, 1, UNSPECIFIED, b""), (2, 2, UNSPECIFIED, b"")]
    assert answer[-1].connection_status == CLOSE


# ---- timers ----------------------------------------------------------------------------------------


@in_loop
async def test_request_timeout_replies_through_emit_and_drops_the_late_response():
    h = Harness(request_timeout=0.05)
    h.read(encode_frame(1, 1) + encode_frame(2, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(2, 1, b"quick"))
    h.write()
    await wait_until(lambda: h.emitted, "the timeout reply")
    assert [m.connection_status for m in h.emitted] == [ProcessingResponse.CONTINUE] * len(h.emitted)
    emitted_frames = parse_frames(b"".join(m.write_data.data for m in h.emitted if has_write(m)))
    assert emitted_frames == [(1, 1, TIMEOUT, b"")]
    assert h.stats.local_response_timeout == 1 and h.stats.request_active == 0

    h.hcm.send(1, encode_frame(1, 1, b"late"))
    answer = h.write()
    assert all(m.write_data.data == b"" for m in answer if has_write(m)), "a late response is not forwarded"
    assert h.client_frames() == [(2, 1, 0, b"quick"), (1, 1, TIMEOUT, b"")]
    assert h.stats.response_unmatched == 1


@in_loop
async def test_in_order_protocol_drops_the_late_response_of_a_timed_out_request():
    h = Harness(codec_cls=InOrderCodec, request_timeout=0.05)
    h.read(encode_frame(1, 1))
    h.hcm.accept(1)
    h.write()
    await wait_until(lambda: h.emitted, "the timeout reply")
    h.read(encode_frame(2, 1))
    # No ids to go by: the first response is the timed-out request's, the second is request 2's.
    h.hcm.send(1, encode_frame(1000, 1, b"late") + encode_frame(2000, 1, b"second"))
    h.write()
    assert h.client_frames() == [(1, 1, TIMEOUT, b""), (2000, 1, 0, b"second")]
    assert h.stats.response_unmatched == 1 and h.stats.request_active == 0


@in_loop
async def test_tunnel_setup_timeout_fails_requests_and_resets_the_stream():
    h = Harness(tunnel_setup_timeout=0.05)
    h.read(encode_frame(1, 2))
    await wait_until(lambda: h.emitted, "the setup timeout")
    assert h.client_frames() == [(1, 2, TIMEOUT, b"")]
    assert h.hcm.reset.get(1) == ErrorCodes.CANCEL
    assert h.stats.tunnel_failed == 1


@in_loop
async def test_idle_timeout_closes_the_connection():
    h = Harness(idle_timeout=0.05)
    h.read(encode_frame(7, 0))  # Envoy opens the stream with the client's first bytes
    await wait_until(lambda: h.emitted, "the idle close")
    assert [m.connection_status for m in h.emitted] == [CLOSE]
    assert h.stats.idle_timeout == 1


# ---- connection ends ----------------------------------------------------------------------------------


@in_loop
async def test_client_half_close_waits_for_pending_responses():
    h = Harness()
    answer = h.read(encode_frame(1, 1), end_of_stream=True)
    assert CLOSE not in [m.connection_status for m in answer]
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"bye"))
    answer = h.write()
    assert h.client_frames() == [(1, 1, 0, b"bye")]
    assert answer[-1].connection_status == CLOSE and not has_write(answer[-1])


@in_loop
async def test_client_half_close_with_nothing_pending_closes_at_once():
    h = Harness()
    answer = h.read(encode_frame(1, 42), end_of_stream=True)  # no route: answered locally
    assert h.client_frames() == [(1, 42, ROUTE_NOT_FOUND, b"")]
    assert answer[-1].connection_status == CLOSE and not has_write(answer[-1])


@in_loop
async def test_hcm_end_of_stream_is_passed_to_the_client():
    h = Harness()
    answer = h.write(end_of_stream=True, data=b"")
    assert has_write(answer[-1]) and answer[-1].write_data.end_of_stream


@in_loop
async def test_close_settles_every_pending_request():
    h = Harness()
    h.read(encode_frame(1, 1) + encode_frame(2, 2))
    assert h.stats.request_active == 2 and h.stats.downstream_cx_active == 1
    h.close()
    assert h.stats.request_active == 0 and h.stats.downstream_cx_active == 0


# ---- known bugs --------------------------------------------------------------------------------------


@in_loop
async def test_response_mutation_the_codec_rejects_becomes_an_error_reply():
    bad = (route("bad-response-mutation", "1", "c1", response_mutation={"cmd": "not-a-number"}),)
    h = Harness(routes=bad)
    h.read(encode_frame(1, 1) + encode_frame(2, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"r"))
    h.write()
    assert [(flow, code != 0) for flow, _, code, _ in h.client_frames()] == [(1, True)]
    assert h.stats.request_active == 1


@in_loop
async def test_request_mutation_the_codec_rejects_fails_only_that_request():
    routes = (route("bad-request-mutation", "1", "c1", request_mutation={"cmd": "99999"}), route("fine", "2", "c2"))
    h = Harness(routes=routes)
    answer = h.read(encode_frame(1, 1) + encode_frame(2, 2))
    assert CLOSE not in [m.connection_status for m in answer]
    assert [(flow, code != 0) for flow, _, code, _ in h.client_frames()] == [(1, True)]
    # no tunnel was opened for the failed request: request 2 travels on the first stream
    assert parse_frames(bytes(h.hcm.received[1])) == [(2, 2, 0, b"")]
    assert h.stats.request_decoding_error == 0


@in_loop
async def test_one_undecodable_response_stream_is_counted_once():
    h = Harness()
    h.read(encode_frame(1, 1))
    h.hcm.accept(1)
    h.hcm.send(1, bytes.fromhex("01" "00000001" "00000002" "0001" "0000"))
    h.hcm.send(1, b"trailing bytes of the same broken stream")
    h.write()
    assert h.client_frames() == [(1, 1, BAD_RESPONSE, b"")]
    assert h.stats.response_decoding_error == 1


@in_loop
async def test_in_order_protocol_replies_leave_in_request_order():
    """Without request ids the client matches by position: a no-route reply, a heartbeat and a
    fast tunnel's answer all wait for the earlier request on a slower tunnel."""
    h = Harness(codec_cls=InOrderCodec)
    h.read(encode_frame(1, 1, b"slow") + encode_frame(2, 9) + encode_frame(3, 0) + encode_frame(4, 2, b"fast"))
    h.hcm.accept(1)
    h.hcm.accept(3)
    h.hcm.send(3, encode_frame(40, 2, b"fast-reply"))
    h.write()
    assert h.client_frames() == [], "nothing may overtake request 1"
    h.hcm.send(1, encode_frame(10, 1, b"slow-reply"))
    h.write()
    assert [(flow, code) for flow, _, code, _ in h.client_frames()] == [(10, 0), (2, ROUTE_NOT_FOUND), (3, 0), (40, 0)]


@in_loop
async def test_by_id_protocol_replies_leave_as_soon_as_they_are_ready():
    h = Harness()
    h.read(encode_frame(1, 1, b"slow") + encode_frame(2, 9))
    assert [(flow, code) for flow, _, code, _ in h.client_frames()] == [(2, ROUTE_NOT_FOUND)]


class BodyCheckingCodec(AwesomeRpcCodec):
    """awesomerpc whose responses with body b"BAD" have a good header but a bad body."""

    def decode(self, buffer, metadata):
        status = super().decode(buffer, metadata)
        if status is DecodeStatus.DONE and metadata.frame.endswith(b"BAD"):
            raise MalformedFrame("bad body", metadata.request_id)
        return status


@in_loop
async def test_malformed_response_body_fails_only_its_request_and_keeps_the_tunnel():
    h = Harness(codec_cls=BodyCheckingCodec)
    h.read(encode_frame(1, 1) + encode_frame(2, 1))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"BAD") + encode_frame(2, 1, b"good"))
    h.write()
    assert h.client_frames() == [(1, 1, BAD_RESPONSE, b""), (2, 1, 0, b"good")]
    assert 1 not in h.hcm.reset, "the upstream connection is still in step: kept"
    assert h.stats.response_decoding_error == 1


@in_loop
async def test_a_connection_with_open_tunnels_probes_hcm_and_hears_of_a_drain():
    h = Harness(drain_probe_interval=0.02)
    h.read(encode_frame(1, 1))
    h.hcm.accept(1)
    h.write()
    await wait_until(lambda: len(h.hcm.requests) > 1, "a drain probe")
    probe_id = max(h.hcm.requests)
    assert h.hcm.requests[probe_id][b":method"] == b"GET" and probe_id in h.hcm.ended
    # HCM answers 404 and, as Envoy does when its listener drains, a graceful GOAWAY with it.
    h.hcm.h2.send_headers(probe_id, [(b":status", b"404")], end_stream=True)
    h.write()
    h.write(data=goaway(2**31 - 1))
    assert h.stats.downstream_cx_drained == 1
    h.hcm.send(1, encode_frame(1, 1, b"done"))
    answer = h.write()
    assert h.client_frames() == [(1, 1, 0, b"done")]
    assert answer[-1].connection_status == CLOSE


@in_loop
async def test_a_stream_that_never_carries_a_processing_request_is_counted_apart():
    h = Harness()
    h.close()
    assert (h.stats.downstream_cx_total, h.stats.ext_proc_stream_without_request) == (0, 1)
    h = Harness()
    h.read(encode_frame(1, 1))
    h.close()
    assert (h.stats.downstream_cx_total, h.stats.downstream_cx_active, h.stats.ext_proc_stream_without_request) == (1, 0, 0)
