"""The request pipeline in the core: filter chain, per-request load balancing, per-route
deadlines, limits and contained codec failures (through the ext_proc transport, fake HCM)."""

from __future__ import annotations

from metabridge.config.model import ClusterConfig, Endpoint, HeaderMatch, RouteConfig, WeightedCluster
from metabridge.core.chain import FilterChain
from metabridge.core.runtime import ByteBudget
from metabridge.sdk.codec import Direction, ErrorType, Metadata
from metabridge.sdk.filter import Filter, FilterStatus
from tests.unit.connection_harness import (
    CLOSE,
    OVER_LIMIT,
    TIMEOUT,
    UNSPECIFIED,
    AwesomeRpcCodec,
    Harness,
    encode_frame,
    in_loop,
    parse_frames,
    route,
    wait_until,
)

HOST_HEADER = b"x-metabridge-host"
HOSTS = [b"127.0.0.1:10001", b"127.0.0.1:10002", b"127.0.0.1:10003"]


def three_hosts(policy: str = "ROUND_ROBIN") -> dict[str, ClusterConfig]:
    endpoints = tuple(Endpoint("127.0.0.1", 10001 + i) for i in range(3))
    return {"c1": ClusterConfig("c1", endpoints, lb_policy=policy), "c2": ClusterConfig("c2", (Endpoint("127.0.0.1", 10004),))}


def flows_per_stream(h: Harness) -> dict[int, list[int]]:
    return {sid: [flow for flow, *_ in parse_frames(bytes(data))] for sid, data in h.hcm.received.items()}


# ---- per-request load balancing ---------------------------------------------------------------------


@in_loop
async def test_round_robin_spreads_one_connections_requests_over_a_tunnel_per_host():
    h = Harness(clusters=three_hosts())
    h.read(b"".join(encode_frame(i, 1) for i in range(1, 31)))
    assert sorted(h.hcm.requests) == [1, 3, 5]
    assert sorted(r[HOST_HEADER] for r in h.hcm.requests.values()) == HOSTS, "each tunnel asks Envoy for its own host"
    assert [len(flows) for flows in flows_per_stream(h).values()] == [10, 10, 10]


@in_loop
async def test_least_request_avoids_the_host_that_is_slow_to_answer():
    h = Harness(clusters=three_hosts("LEAST_REQUEST"))
    h.read(encode_frame(1, 1) + encode_frame(2, 1) + encode_frame(3, 1))
    assert [len(f) for f in flows_per_stream(h).values()] == [1, 1, 1]
    slow = next(sid for sid, flows in flows_per_stream(h).items() if flows == [3])
    for sid in (1, 3, 5):
        h.hcm.accept(sid)
        if sid != slow:
            flow = flows_per_stream(h)[sid][0]
            h.hcm.send(sid, encode_frame(flow, 1, b"ok"))
    h.write()
    for flow in range(10, 20):  # one at a time, each answered before the next
        h.read(encode_frame(flow, 1))
        sid = next(s for s, flows in flows_per_stream(h).items() if flow in flows)
        h.hcm.send(sid, encode_frame(flow, 1, b"ok"))
        h.write()
    assert flows_per_stream(h)[slow] == [3], "the slow host, still busy, got nothing more"
    fast = [len(flows) for sid, flows in flows_per_stream(h).items() if sid != slow]
    assert fast == [6, 6], f"the two fast hosts, tied every time, take turns: {fast}"


@in_loop
async def test_a_tunnel_that_fails_to_connect_hands_its_requests_to_another_host():
    h = Harness(clusters=three_hosts())
    h.read(encode_frame(1, 1) + encode_frame(2, 1) + encode_frame(3, 1))
    h.hcm.accept(1)
    h.hcm.refuse(3, b"UF")
    h.hcm.accept(5)
    h.write()
    assert h.client_frames() == [], "nothing failed: the refused tunnel's request moved on"
    assert h.stats.request_redispatched == 1
    moved = [f for sid in (1, 5) for f in flows_per_stream(h)[sid]]
    assert sorted(moved) == [1, 2, 3]
    # The failed slot rests: the next requests use the two open tunnels, no new CONNECT.
    h.read(encode_frame(4, 1) + encode_frame(5, 1))
    assert sorted(h.hcm.requests) == [1, 3, 5]
    for sid in (1, 5):
        for flow in flows_per_stream(h)[sid]:
            h.hcm.send(sid, encode_frame(flow, 1, b"ok"))
    h.write()
    assert sorted(flow for flow, *_ in h.client_frames()) == [1, 2, 3, 4, 5]


# ---- the filter chain ----------------------------------------------------------------------------------


class Recorder(Filter):
    def __init__(self, name: str, seen: list, raises: str = "") -> None:
        super().__init__({}, listener="test")
        self.name, self.seen, self.raises = name, seen, raises

    def _hook(self, hook: str) -> None:
        self.seen.append((self.name, hook))
        if hook == self.raises:
            raise RuntimeError(f"{self.name} broke in {hook}")

    def on_request(self, request):
        self._hook("on_request")
        return FilterStatus.CONTINUE

    def on_response(self, request, response):
        self._hook("on_response")

    def on_complete(self, request):
        self._hook("on_complete")


class Deny(Filter):
    name = "deny"

    def on_request(self, request):
        if request.metadata.headers.get("cmd") == "2":
            request.local_reply(ErrorType.OVER_LIMIT, "cmd 2 is not allowed")
            return FilterStatus.STOP
        return FilterStatus.CONTINUE


class Pause(Filter):
    name = "pause"

    def __init__(self) -> None:
        super().__init__({}, listener="test")
        self.paused = []

    def on_request(self, request):
        self.paused.append(request)
        return FilterStatus.STOP


def with_filters(h: Harness, *filters: Filter) -> Harness:
    h.runtime.chain = FilterChain(filters, "test", h.stats)
    return h


@in_loop
async def test_filters_see_requests_in_order_and_responses_in_reverse():
    seen = []
    h = with_filters(Harness(), Recorder("a", seen), Recorder("b", seen))
    h.read(encode_frame(1, 1))
    assert seen == [("a", "on_request"), ("b", "on_request")]
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"ok"))
    h.write()
    assert seen[2:] == [("b", "on_response"), ("a", "on_response"), ("a", "on_complete"), ("b", "on_complete")]
    assert h.client_frames() == [(1, 1, 0, b"ok")]


@in_loop
async def test_a_filter_answers_locally_and_later_filters_never_see_the_request():
    seen = []
    h = with_filters(Harness(), Deny({}, listener="test"), Recorder("after", seen))
    h.read(encode_frame(1, 2) + encode_frame(2, 1))
    assert h.client_frames() == [(1, 2, OVER_LIMIT, b"")]
    assert flows_per_stream(h) == {1: [2]}, "the allowed request is routed, the denied one never"
    assert seen == [("after", "on_request")]


@in_loop
async def test_a_paused_request_resumes_later_without_holding_up_others():
    pause = Pause()
    h = with_filters(Harness(), pause)
    h.read(encode_frame(1, 1) + encode_frame(2, 2))
    assert not h.hcm.requests and len(pause.paused) == 2
    pause.paused[1].resume()  # resumed out of order, outside any Envoy message
    assert list(h.hcm.requests) == [1] and flows_per_stream(h) == {1: [2]}
    assert h.emitted, "the resumed request's bytes went out through the transport's wake-up"
    pause.paused[0].resume()
    assert flows_per_stream(h) == {1: [2], 3: [1]}


@in_loop
async def test_filter_exceptions_cost_only_their_own_request():
    seen = []
    h = with_filters(Harness(), Recorder("broken", seen, raises="on_request"))
    h.read(encode_frame(1, 1))
    assert h.client_frames() == [(1, 1, UNSPECIFIED, b"")]
    assert h.stats.filter_error == 1 and h.stats.request_active == 0
    for hook in ("on_response", "on_complete"):
        h = with_filters(Harness(), Recorder("broken", seen, raises=hook))
        h.read(encode_frame(1, 1))
        h.hcm.accept(1)
        h.hcm.send(1, encode_frame(1, 1, b"ok"))
        h.write()
        assert h.client_frames() == [(1, 1, 0, b"ok")], f"a failing {hook} does not lose the response"
        assert h.stats.filter_error == 1


# ---- deadlines ----------------------------------------------------------------------------------------


@in_loop
async def test_each_route_has_its_own_timeout():
    quick = RouteConfig("quick", (HeaderMatch("cmd", "exact", "1"),), (WeightedCluster("c1", 1),), {}, {}, timeout=0.05)
    h = Harness(routes=(quick, route("slow", "2", "c1")), request_timeout=30.0)
    h.read(encode_frame(1, 2) + encode_frame(2, 1))
    await wait_until(lambda: h.client_frames(), "the quick route's timeout")
    assert h.client_frames() == [(2, 1, TIMEOUT, b"")], "the 30 s request is still waiting"
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 2, b"late but in time"))
    h.write()
    assert h.client_frames()[-1] == (1, 2, 0, b"late but in time")


# ---- limits ---------------------------------------------------------------------------------------------


@in_loop
async def test_requests_past_the_in_flight_limit_wait_undecoded_until_others_finish():
    h = Harness(max_requests_in_flight=2)
    h.read(b"".join(encode_frame(i, 1) for i in range(1, 5)))
    assert flows_per_stream(h) == {1: [1, 2]}
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"ok"))
    h.write()
    assert flows_per_stream(h) == {1: [1, 2, 3]}, "one answered, one more decoded and sent"
    assert h.client_frames() == [(1, 1, 0, b"ok")]
    assert h.stats.downstream_paused_in_flight == 1, "one pause: taken up again at once after the third"


@in_loop
async def test_past_the_client_buffer_requests_are_answered_over_limit():
    frame = encode_frame(1, 1, b"x" * 50)
    h = Harness(max_requests_in_flight=1, max_frame_size=len(frame), max_client_buffer=2 * len(frame))
    h.read(b"".join(encode_frame(i, 1, b"x" * 50) for i in range(1, 6)))
    # One in flight, two held (the buffer's worth), the two past the buffer shed.
    assert flows_per_stream(h) == {1: [1]}
    assert h.client_frames() == [(2, 1, OVER_LIMIT, b""), (3, 1, OVER_LIMIT, b"")]
    assert h.stats.request_overflow == 2


@in_loop
async def test_a_slow_upstream_pushes_back_on_its_client():
    h = Harness(max_upstream_queue=1000)
    big = encode_frame(1, 1, b"x" * 70_000)  # more than the fake HCM's 64 KiB window
    h.read(big)
    h.read(encode_frame(2, 1))
    assert len(h.hcm.received[1]) < len(big), "the tunnel's window holds part of the frame back"
    assert h.stats.request == 1, "the second request waits undecoded while the tunnel's queue is full"
    for _ in range(20):  # HCM's WINDOW_UPDATEs let the queue drain; then decoding resumes
        if h.stats.request == 2:
            break
        h.write()
    assert h.stats.request == 2 and flows_per_stream(h) == {1: [1, 2]}
    assert h.stats.downstream_paused_upstream_full == 1


@in_loop
async def test_a_frame_that_does_not_complete_within_frame_timeout_closes_the_connection():
    h = Harness(frame_timeout=0.05)
    h.read(encode_frame(1, 1, b"whole"))
    h.read(encode_frame(2, 1, b"partial")[:15])
    await wait_until(lambda: any(m.connection_status == CLOSE for m in h.emitted), "the frame timeout")
    assert h.stats.downstream_cx_frame_timeout == 1


@in_loop
async def test_undecoded_bytes_over_the_process_budget_close_the_connection_that_grows_it():
    h = Harness()
    h.runtime.budget = ByteBudget(100)
    other = Harness()
    other.runtime.budget = h.runtime.budget
    other.read(encode_frame(9, 1, b"y" * 80)[:60])  # 60 bytes of a partial frame: within budget
    answer = h.read(encode_frame(1, 1, b"x" * 200)[:120])
    assert answer[-1].connection_status == CLOSE and h.stats.downstream_cx_overflow == 1
    assert h.runtime.budget.used == 60, "the closed connection's bytes are given back"


# ---- contained codec failures -----------------------------------------------------------------------


class BrokenCodec(AwesomeRpcCodec):
    """Raises plain exceptions (not CodecError) for chosen cmds, as a buggy codec would."""

    def decode(self, buffer, metadata):
        status = super().decode(buffer, metadata)
        if metadata.properties.get("cmd") == 9 and self.direction is Direction.REQUEST:
            raise KeyError("decode bug")
        if metadata.properties.get("cmd") == 8 and self.direction is Direction.RESPONSE:
            raise ValueError("response decode bug")
        return status

    def on_error(self, metadata, error):
        if metadata.properties.get("cmd") == 7:
            raise RuntimeError("on_error bug")
        return super().on_error(metadata, error)


@in_loop
async def test_a_codec_decode_bug_closes_only_that_connection_after_its_requests_are_answered():
    h = Harness(codec_cls=BrokenCodec)
    other = Harness(codec_cls=BrokenCodec)
    h.read(encode_frame(1, 1) + encode_frame(2, 9) + encode_frame(3, 1))
    assert h.stats.codec_error == 1 and flows_per_stream(h) == {1: [1]}
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"ok"))
    answer = h.write()
    assert h.client_frames() == [(1, 1, 0, b"ok")] and answer[-1].connection_status == CLOSE
    other.read(encode_frame(5, 1))
    assert flows_per_stream(other) == {1: [5]}, "another connection keeps working"


@in_loop
async def test_a_response_decode_bug_fails_the_requests_on_that_tunnel_with_bad_response():
    h = Harness(codec_cls=BrokenCodec)
    h.read(encode_frame(1, 1) + encode_frame(2, 2))
    h.hcm.accept(1)
    h.hcm.accept(3)
    h.hcm.send(1, encode_frame(1, 8))
    h.hcm.send(3, encode_frame(2, 2, b"fine"))
    h.write()
    assert sorted(h.client_frames()) == [(1, 1, 502, b""), (2, 2, 0, b"fine")]
    assert h.stats.codec_error == 1


@in_loop
async def test_an_on_error_bug_closes_the_connection_rather_than_losing_the_reply():
    h = Harness(codec_cls=BrokenCodec)
    answer = h.read(encode_frame(1, 7))  # no route for cmd 7: on_error raises
    assert answer[-1].connection_status == CLOSE and h.stats.codec_error == 1


@in_loop
async def test_response_codecs_know_their_direction():
    h = Harness()
    h.read(encode_frame(1, 1))
    assert h.session.codec.direction is Direction.REQUEST
    assert h.session.pool.links()[0].codec.direction is Direction.RESPONSE


def test_awesomerpc_labels_frames_by_the_direction_it_decodes():
    frame = encode_frame(4, 5, b"x")
    for direction, kind in ((Direction.REQUEST, "request"), (Direction.RESPONSE, "response")):
        codec = AwesomeRpcCodec()
        codec.direction = direction
        metadata = Metadata()
        codec.decode(bytearray(frame), metadata)
        assert metadata.message_type.value == kind
