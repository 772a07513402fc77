"""The global rate limit filter (bridge/filters/ratelimit.py) through a connection (ext_proc
transport, fake HCM), against the test rate limit service (tests/peers/ratelimit_service.py)
served by grpc.aio in the test's own event loop."""

from __future__ import annotations

import asyncio
import functools
import time

import grpc
import pytest

from metabridge.config.model import parse
from metabridge.core.chain import FilterChain
from metabridge.filters import BUILTIN, build_filters
from metabridge.core.runtime import build_runtimes
from metabridge.filters.ratelimit import RateLimitFilter, RateLimitStats
from metabridge.metrics import ListenerStatsCollector
from metabridge.registry import CodecLoadError
from metabridge._proto import ratelimit_pb2
from metabridge._proto.ratelimit_pb2 import RateLimitRequest, RateLimitResponse
from bench.processes import free_port
from tests.peers.ratelimit_service import AioServer, Limit, RateLimitLogic, limit
from tests.unit.connection_harness import OVER_LIMIT, REPO_ROOT, UNSPECIFIED, Harness, encode_frame, parse_frames, wait_until

_made: list[RateLimitFilter] = []  # the filters a test made, whose channels it closes


def in_loop(test):
    """Runs an async test in a fresh event loop, then closes its filters' channels in that loop
    (grpc.aio's state must not outlive the loop it was made on)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        async def body():
            try:
                await test(*args, **kwargs)
            finally:
                for made in _made:
                    await made.close()
                _made.clear()

        asyncio.run(body())

    return run


def ratelimit(address: str, **config) -> RateLimitFilter:
    config.setdefault("domain", "awesomerpc")
    config.setdefault("descriptors", [{"property": "cmd", "descriptor_key": "cmd"}])
    config.setdefault("timeout", "500ms")  # generous: unit tests share the machine
    made = RateLimitFilter({"rls": {"address": address}, **config}, listener="test")
    _made.append(made)
    return made


def harness(f: RateLimitFilter) -> Harness:
    h = Harness()
    h.runtime.chain = FilterChain((f,), "test", h.stats)
    return h


def forwarded(h: Harness) -> list[int]:
    """Flows written into tunnels, in order per tunnel."""
    return sorted(flow for data in h.hcm.received.values() for flow, *_ in parse_frames(bytes(data)))


def replies(h: Harness) -> dict[int, int]:
    """flow -> rsp_code of what the client got."""
    return {flow: code for flow, _cmd, code, _body in h.client_frames()}


def decided(f: RateLimitFilter) -> int:
    s = f.stats
    return s.ok + s.over_limit + s.error + s.timeout


def answer_all(h: Harness) -> None:
    """HCM accepts every tunnel and the backend answers each forwarded request."""
    for sid, data in list(h.hcm.received.items()):
        h.hcm.accept(sid)
        for flow, cmd, _code, _body in parse_frames(bytes(data)):
            h.hcm.send(sid, encode_frame(flow, cmd, b"ok"))
    h.write()


# ---- the service's answer -----------------------------------------------------------------------


@in_loop
async def test_under_the_limit_requests_pass_and_over_it_they_get_over_limit():
    service = await AioServer([limit("cmd=1:3/hour")]).start()
    try:
        f = ratelimit(service.address)
        h = harness(f)
        h.read(b"".join(encode_frame(flow, 1) for flow in range(1, 6)))
        assert not h.hcm.requests, "every request waits for the service"
        await wait_until(lambda: decided(f) == 5, "five answers")
        await wait_until(lambda: len(forwarded(h)) + len(replies(h)) == 5, "five outcomes")
        assert len(forwarded(h)) == 3 and sorted(replies(h).values()) == [OVER_LIMIT, OVER_LIMIT]
        assert set(forwarded(h)).isdisjoint(replies(h)), "each request had exactly one outcome"
        answer_all(h)
        assert sorted(replies(h).values()) == [0, 0, 0, OVER_LIMIT, OVER_LIMIT]
        assert f.stats.active == 0
        assert (f.stats.calls, f.stats.ok, f.stats.over_limit, f.stats.error, f.stats.timeout) == (5, 3, 2, 0, 0)
        assert service.logic.descriptors_seen() == [("awesomerpc", ((("cmd", "1"),),))] * 5
        assert h.stats.request_active == 0
    finally:
        await service.stop()


@in_loop
async def test_each_descriptor_is_limited_on_its_own_values_and_hierarchical_entries_are_sent_in_order():
    service = await AioServer([limit("cmd:1/hour"), limit("service=awesomerpc,cmd=2:100/hour")]).start()
    try:
        f = ratelimit(
            service.address,
            descriptors=[
                {"property": "cmd", "descriptor_key": "cmd"},
                {"entries": [{"value": "awesomerpc", "descriptor_key": "service"}, {"property": "CMD", "descriptor_key": "cmd"}]},
            ],
        )
        h = harness(f)
        h.read(encode_frame(1, 1) + encode_frame(2, 2))
        await wait_until(lambda: decided(f) == 2, "two answers")
        assert forwarded(h) == [1, 2], "cmd 1 and cmd 2 each have their own counter"
        h.read(encode_frame(3, 2))
        await wait_until(lambda: decided(f) == 3, "third answer")
        assert replies(h) == {3: OVER_LIMIT}, "the second cmd 2 is over cmd's per-value limit of 1"
        assert ("awesomerpc", ((("cmd", "2"),), (("service", "awesomerpc"), ("cmd", "2")))) in service.logic.descriptors_seen()
    finally:
        await service.stop()


@in_loop
async def test_the_match_condition_and_absent_properties_skip_the_call():
    service = await AioServer([limit("cmd:0/minute")]).start()  # would refuse anything it is asked about
    try:
        f = ratelimit(service.address, match={"headers": [{"name": "cmd", "prefix": "1"}]})
        h = harness(f)
        h.read(encode_frame(1, 2))
        assert forwarded(h) == [1], "not matched: forwarded at once, no call"
        h.read(encode_frame(2, 13))
        await wait_until(lambda: decided(f) == 1, "one answer")
        assert replies(h) == {2: OVER_LIMIT}
        assert (f.stats.not_matched, f.stats.calls) == (1, 1)

        g = ratelimit(service.address, descriptors=[{"property": "user", "descriptor_key": "user"}])
        h = harness(g)
        h.read(encode_frame(1, 1))
        assert forwarded(h) == [1], "no descriptor could be built: forwarded at once"
        assert (g.stats.no_descriptors, g.stats.calls) == (1, 0)
        assert service.logic.calls == 1
    finally:
        await service.stop()


@in_loop
async def test_one_channel_per_filter_is_opened_on_the_loop_and_reused():
    service = await AioServer().start()
    try:
        f = ratelimit(service.address)
        first, second = harness(f), harness(f)
        first.read(encode_frame(1, 1))
        channel = f._channel
        second.read(encode_frame(1, 1) + encode_frame(2, 1))
        await wait_until(lambda: decided(f) == 3, "three answers")
        assert f._channel is channel and channel is not None
        assert forwarded(first) == [1] and forwarded(second) == [1, 2]
    finally:
        await service.stop()


# ---- failures -------------------------------------------------------------------------------------


@in_loop
async def test_service_down_fails_open_by_default_and_closed_with_failure_mode_deny():
    nobody = f"127.0.0.1:{free_port()}"
    f = ratelimit(nobody)
    h = harness(f)
    h.read(encode_frame(1, 1))
    await wait_until(lambda: forwarded(h) == [1], "the request to pass")
    assert (f.stats.error, f.stats.failure_mode_allowed, f.stats.failure_mode_denied) == (1, 1, 0)

    g = ratelimit(nobody, failure_mode_deny=True)
    h = harness(g)
    h.read(encode_frame(1, 1))
    await wait_until(lambda: replies(h) == {1: OVER_LIMIT}, "the request to be refused")
    assert not h.hcm.requests and (g.stats.error, g.stats.failure_mode_denied) == (1, 1)

    e = ratelimit(nobody, failure_mode_deny=True, failure_mode_error="UNSPECIFIED")
    h = harness(e)
    h.read(encode_frame(1, 1))
    await wait_until(lambda: replies(h) == {1: UNSPECIFIED}, "the configured error reply")


@in_loop
async def test_a_failing_service_is_an_error_and_the_filter_recovers_when_it_answers_again():
    service = await AioServer().start()
    try:
        service.logic.fail = grpc.StatusCode.UNAVAILABLE
        f = ratelimit(service.address, failure_mode_deny=True)
        h = harness(f)
        h.read(encode_frame(1, 1))
        await wait_until(lambda: replies(h) == {1: OVER_LIMIT}, "fail closed")
        assert (f.stats.error, f.stats.timeout) == (1, 0)
        service.logic.fail = None
        h.read(encode_frame(2, 1))
        await wait_until(lambda: forwarded(h) == [2], "the next request to pass")
        assert f.stats.ok == 1
    finally:
        await service.stop()


@in_loop
async def test_the_filter_reaches_a_service_restarted_on_its_address():
    port = free_port()
    f = ratelimit(f"127.0.0.1:{port}")
    h = harness(f)
    h.read(encode_frame(1, 1))
    await wait_until(lambda: f.stats.error == 1, "an error while the service is down")
    service = await AioServer([limit("cmd:0/minute")], address=f"127.0.0.1:{port}").start()
    try:
        flow = 2
        deadline = time.monotonic() + 5
        while f.stats.over_limit == 0 and time.monotonic() < deadline:
            h.read(encode_frame(flow, 1))
            await wait_until(lambda: decided(f) == flow, "an answer")
            flow += 1
            await asyncio.sleep(0.1)
        assert f.stats.over_limit == 1, "the channel reconnected: the service's answer arrived"
    finally:
        await service.stop()


@in_loop
async def test_a_slow_service_costs_the_timeout_and_nothing_else_waits_on_it():
    service = await AioServer().start()
    service.logic.delay = 2.0
    try:
        f = ratelimit(service.address, timeout="200ms", match={"headers": [{"name": "cmd", "exact": "1"}]})
        h, other = harness(f), harness(f)
        started = time.monotonic()
        h.read(encode_frame(1, 1) + encode_frame(2, 2))
        other.read(encode_frame(1, 2))
        assert forwarded(h) == [2] and forwarded(other) == [1], "the connection's other request and another connection go on"
        answer_all(h)
        answer_all(other)
        assert replies(h) == {2: 0} and replies(other) == {1: 0}, "and are answered while the call waits"
        await wait_until(lambda: forwarded(h) == [1, 2], "the slow one to pass (fail open)")
        took = time.monotonic() - started
        assert 0.2 <= took < 1.0, f"the timeout holds: {took:.3f}s"
        assert (f.stats.timeout, f.stats.error, f.stats.failure_mode_allowed) == (1, 0, 1)

        g = ratelimit(service.address, timeout="200ms", failure_mode_deny=True)
        h = harness(g)
        started = time.monotonic()
        h.read(encode_frame(1, 1))
        await wait_until(lambda: replies(h) == {1: OVER_LIMIT}, "fail closed on the timeout")
        assert 0.2 <= time.monotonic() - started < 1.0
        assert (g.stats.timeout, g.stats.failure_mode_denied) == (1, 1)
    finally:
        await service.stop()


@in_loop
async def test_a_connection_that_closes_while_its_request_waits_abandons_the_call():
    service = await AioServer().start()
    service.logic.delay = 1.0
    try:
        f = ratelimit(service.address, timeout="2s")
        h = harness(f)
        h.read(encode_frame(1, 1))
        await wait_until(lambda: service.logic.calls == 1, "the call to reach the service")
        h.close()
        assert (f.stats.abandoned, f.stats.active) == (1, 0)
        assert h.stats.request_active == 0 and h.client_frames() == []
        await asyncio.sleep(1.2)
        assert decided(f) == 0, "the abandoned call's late answer does nothing"
    finally:
        await service.stop()


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "127.0.0.1:8081"}}, "'domain' is a required property"),
        ({"domain": "d", "descriptors": [], "rls": {"address": "127.0.0.1:8081"}}, "descriptors: "),
        ({"domain": "d", "descriptors": [{"property": "cmd"}], "rls": {"address": "127.0.0.1:8081"}}, r"descriptors\[0\]"),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "nowhere"}}, "rls.address: 'nowhere'"),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "unix:"}}, "needs a socket path"),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "h:1"}, "timeout": "soon"}, "timeout: "),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "h:1"}, "timeout": "0ms"}, "must be more than 0"),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "h:1"}, "match": {"headers": [{"name": "cmd", "regex": "("}]}}, r"match.headers\[0\].regex: invalid"),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "h:1"}, "match": {"headers": [{"name": "cmd"}]}}, r"match.headers\[0\]"),
        ({"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "h:1"}, "failure_mode_error": "NOPE"}, "failure_mode_error"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(config, problem):
    with pytest.raises(ValueError, match=problem):
        RateLimitFilter(config, listener="test")


def test_it_is_a_builtin_filter_named_ratelimit_and_its_counters_are_exported():
    assert BUILTIN["ratelimit"] == "metabridge.filters.ratelimit:RateLimitFilter"
    raw = {
        "codecs": {"awesomerpc": {"ref": str(REPO_ROOT / "codecs/awesomerpc.py") + ":AwesomeRpcCodec"}},
        "listeners": [
            {
                "name": "awesomerpc",
                "port": 10000,
                "codec": "awesomerpc",
                "filters": [{"name": "ratelimit", "config": {"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "unix:/tmp/rls.sock"}}}],
                "routes": [{"route": {"cluster": "c"}}],
            }
        ],
        "clusters": [{"name": "c", "endpoints": [{"address": "127.0.0.1", "port": 1}]}],
    }
    config = parse(raw, "x.yaml")
    (built,) = build_filters(config.listeners[0], config)
    assert isinstance(built, RateLimitFilter) and built.address == "unix:/tmp/rls.sock" and built.timeout == 0.1
    runtimes = build_runtimes(config)
    (filter_,) = runtimes["awesomerpc"].chain.filters
    filter_.stats.over_limit, filter_.stats.active = 4, 1
    exported = {(s.name, s.labels["listener"], s.labels["index"]): s.value for family in ListenerStatsCollector(runtimes).collect() for s in family.samples if "ratelimit" in s.name}
    assert exported[("metabridge_filter_ratelimit_over_limit_total", "awesomerpc", "0")] == 4
    assert {name for name, *_ in exported} == {f"metabridge_filter_ratelimit_{c}_total" for c in RateLimitStats.COUNTERS}, "every counter; the gauge is not one"
    raw["listeners"][0]["filters"][0]["config"]["rls"] = {}
    with pytest.raises(CodecLoadError, match=r"listeners\[awesomerpc\].filters\[0\]: 'ratelimit' rejects its config: .*'address' is a required property"):
        build_filters(parse(raw, "x.yaml").listeners[0], config)


# ---- the test service's own counting ----------------------------------------------------------------


def request(domain: str, *descriptors: list[tuple[str, str]], override: tuple[int, int] | None = None) -> RateLimitRequest:
    message = RateLimitRequest(domain=domain)
    for entries in descriptors:
        d = message.descriptors.add()
        for key, value in entries:
            d.entries.add(key=key, value=value)
        if override:
            d.limit.requests_per_unit, d.limit.unit = override
    return message


def test_the_test_service_counts_per_descriptor_and_window():
    now = [1000.0]
    logic = RateLimitLogic([Limit((("cmd", "1"),), 2, "second"), Limit((("user", None),), 1, "minute")], clock=lambda: now[0])
    codes = [logic.decide(request("d", [("cmd", "1")])).overall_code for _ in range(3)]
    assert codes == [RateLimitResponse.OK, RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT]
    assert logic.decide(request("other", [("cmd", "1")])).overall_code == RateLimitResponse.OK, "domains count apart"
    assert logic.decide(request("d", [("cmd", "2")])).overall_code == RateLimitResponse.OK, "no limit for cmd 2"
    now[0] += 1.0
    answer = logic.decide(request("d", [("cmd", "1")]))
    assert answer.overall_code == RateLimitResponse.OK, "a new window"
    assert (answer.statuses[0].limit_remaining, answer.statuses[0].current_limit.requests_per_unit) == (1, 2)
    assert logic.decide(request("d", [("user", "a")])).overall_code == RateLimitResponse.OK
    both = logic.decide(request("d", [("user", "b")], [("user", "a")]))
    assert [s.code for s in both.statuses] == [RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT] and both.overall_code == RateLimitResponse.OVER_LIMIT
    over = logic.decide(request("d", [("x", "y")], override=(0, ratelimit_pb2.SECOND)))
    assert over.overall_code == RateLimitResponse.OVER_LIMIT, "a descriptor's own limit override counts"
