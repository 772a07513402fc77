"""The fault injection filter through a connection (ext_proc transport, fake HCM): aborts with
the codec's error reply, delays that hold one request and nothing else, percentages within
statistical bounds (seeded), the match, its place in the chain, and config errors."""

from __future__ import annotations

import asyncio
import random

import pytest

from metabridge.core.chain import FilterChain
from metabridge.filters import BUILTIN
from metabridge.filters.fault import FaultFilter
from metabridge.filters.local_ratelimit import LocalRateLimitFilter
from metabridge.sdk.filter import Filter
from tests.unit.connection_harness import OVER_LIMIT, ROUTES, TIMEOUT, UNSPECIFIED, Harness, encode_frame, in_loop, parse_frames, route, wait_until

CMD_5 = {"headers": [{"name": "cmd", "exact": "5"}]}


def fault(config, seed: int | None = 7) -> FaultFilter:
    kwargs = {} if seed is None else {"rand": random.Random(seed).random}
    return FaultFilter(config, listener="test", **kwargs)


def with_filters(*filters: Filter, **listener_options) -> Harness:
    h = Harness(routes=(*ROUTES, route("cmd-5", "5", "c1")), **listener_options)
    h.runtime.chain = FilterChain(filters, "test", h.stats)
    return h


def routed(h: Harness) -> list[int]:
    return sorted(flow for data in h.hcm.received.values() for flow, *_ in parse_frames(bytes(data)))


def frames(cmd: int, flows) -> bytes:
    return b"".join(encode_frame(flow, cmd) for flow in flows)


@in_loop
async def test_an_abort_answers_with_the_codecs_error_reply_and_never_reaches_the_router():
    f = fault({"abort": {"error": "TIMEOUT"}})
    h = with_filters(f)
    h.read(frames(1, [1, 2]))
    assert h.client_frames() == [(1, 1, TIMEOUT, b""), (2, 1, TIMEOUT, b"")]
    assert routed(h) == []
    assert f.stats.snapshot() == {"delays_injected": 0, "aborts_injected": 2, "active_faults": 0}
    assert h.stats.local_response_timeout == 2


@pytest.mark.parametrize(("error", "code"), [("OVER_LIMIT", OVER_LIMIT), ("UNSPECIFIED", UNSPECIFIED)])
@in_loop
async def test_the_abort_is_the_error_type_configured(error, code):
    h = with_filters(fault({"abort": {"error": error, "percentage": 100}}))
    h.read(frames(1, [1]))
    assert h.client_frames() == [(1, 1, code, b"")]


@in_loop
async def test_only_requests_the_match_selects_are_faulted():
    f = fault({"abort": {"error": "TIMEOUT"}, "match": CMD_5})
    h = with_filters(f)
    h.read(encode_frame(1, 5) + encode_frame(2, 1) + encode_frame(3, 5))
    assert h.client_frames() == [(1, 5, TIMEOUT, b""), (3, 5, TIMEOUT, b"")]
    assert routed(h) == [2]


@in_loop
async def test_a_delay_holds_its_request_and_nothing_else():
    loop = asyncio.get_running_loop()
    f = fault({"delay": {"fixed_delay": "150ms"}, "match": CMD_5})
    h = with_filters(f)
    started = loop.time()
    h.read(encode_frame(1, 5) + encode_frame(2, 1))
    assert routed(h) == [2], "the other request went on at once"
    assert f.stats.active_faults == 1 and f.stats.delays_injected == 1
    h.answer_all()
    assert h.client_frames() == [(2, 1, 0, b"ok")], "and was answered while the delayed one waits"
    h.read(encode_frame(3, 1))  # the connection keeps taking requests meanwhile
    assert routed(h) == [2, 3]
    await wait_until(lambda: 1 in routed(h), "the delayed request to be forwarded")
    assert loop.time() - started >= 0.15
    assert f.stats.active_faults == 0
    h.answer_all()
    assert sorted(flow for flow, *_ in h.client_frames()) == [1, 2, 3]


@in_loop
async def test_many_delayed_requests_wait_concurrently_not_one_after_another():
    loop = asyncio.get_running_loop()
    f = fault({"delay": {"fixed_delay": "100ms"}})
    h = with_filters(f)
    started = loop.time()
    h.read(frames(1, range(1, 21)))
    await wait_until(lambda: len(routed(h)) == 20, "all delayed requests forwarded")
    assert loop.time() - started < 1.0, "20 delays of 100 ms overlapped"


@in_loop
async def test_a_delay_then_an_abort_replies_after_the_delay():
    loop = asyncio.get_running_loop()
    f = fault({"delay": {"fixed_delay": "80ms"}, "abort": {"error": "OVER_LIMIT"}})
    h = with_filters(f)
    started = loop.time()
    h.read(frames(1, [1]))
    assert h.client_frames() == [], "not yet: the delay comes first"
    await wait_until(lambda: h.client_frames(), "the abort after the delay")
    assert loop.time() - started >= 0.08 - 0.001  # uvloop's clock counts whole milliseconds
    assert h.client_frames() == [(1, 1, OVER_LIMIT, b"")] and routed(h) == []
    assert f.stats.snapshot() == {"delays_injected": 1, "aborts_injected": 1, "active_faults": 0}


@in_loop
async def test_a_connection_that_closes_during_a_delay_cancels_it():
    f = fault({"delay": {"fixed_delay": "50ms"}})
    h = with_filters(f)
    h.read(frames(1, [1, 2]))
    assert f.stats.active_faults == 2
    h.close()
    assert f.stats.active_faults == 0
    await asyncio.sleep(0.12)  # past the 50 ms delay: a timer left behind would have fired by now
    assert routed(h) == [] and h.stats.internal_error == 0 and h.stats.filter_error == 0


@in_loop
async def test_abort_and_delay_percentages_hold_within_statistical_bounds():
    # Seeded, so the test is deterministic; the bounds are 5 standard deviations of a binomial
    # (n=4000), so they would hold for practically any seed.
    n = 4000
    f = fault({"abort": {"error": "TIMEOUT", "percentage": 10}}, seed=11)
    h = with_filters(f, max_requests_in_flight=2 * n)
    h.read(frames(1, range(1, n + 1)))
    aborted = sum(1 for _, _, code, _ in h.client_frames() if code == TIMEOUT)
    assert abs(aborted - 400) <= 5 * (n * 0.1 * 0.9) ** 0.5, aborted
    assert f.stats.aborts_injected == aborted and len(routed(h)) == n - aborted

    f = fault({"delay": {"fixed_delay": "1ms", "percentage": 25}, "abort": {"error": "TIMEOUT", "percentage": 50}}, seed=12)
    h = with_filters(f, max_requests_in_flight=2 * n)
    h.read(frames(1, range(1, n + 1)))
    immediate = sum(1 for _, _, code, _ in h.client_frames() if code == TIMEOUT)
    delayed = f.stats.delays_injected
    assert abs(delayed - 1000) <= 5 * (n * 0.25 * 0.75) ** 0.5, delayed
    await wait_until(lambda: f.stats.active_faults == 0, "the delays to end")
    aborted = sum(1 for _, _, code, _ in h.client_frames() if code == TIMEOUT)
    assert abs(aborted - 2000) <= 5 * (n * 0.5 * 0.5) ** 0.5, aborted
    # Independent choices: about half the delayed requests were aborted after their delay.
    assert abs((aborted - immediate) - delayed / 2) <= 5 * (delayed * 0.25) ** 0.5
    assert len(routed(h)) == n - aborted


@in_loop
async def test_percentage_zero_never_faults_and_the_default_is_one_hundred():
    h = with_filters(fault({"abort": {"error": "TIMEOUT", "percentage": 0}, "delay": {"fixed_delay": "1s", "percentage": 0}}))
    h.read(frames(1, range(1, 101)))
    assert h.client_frames() == [] and len(routed(h)) == 100
    f = fault({"abort": {"error": "TIMEOUT"}}, seed=None)  # the default random source
    h = with_filters(f)
    h.read(frames(1, range(1, 101)))
    assert f.stats.aborts_injected == 100


@in_loop
async def test_a_rate_limiter_before_the_fault_filter_refuses_before_any_delay():
    rl = LocalRateLimitFilter({"token_bucket": {"max_tokens": 1, "fill_interval": "1h"}}, listener="test")
    f = fault({"delay": {"fixed_delay": "50ms"}})
    h = with_filters(rl, f)
    h.read(frames(1, [1, 2]))
    assert h.client_frames() == [(2, 1, OVER_LIMIT, b"")], "refused at once"
    assert f.stats.delays_injected == 1
    await wait_until(lambda: routed(h) == [1], "the admitted request, after its delay")


def test_fault_is_built_in_by_name():
    assert BUILTIN["fault"] == "metabridge.filters.fault:FaultFilter"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "give a 'delay', an 'abort' or both"),
        ({"abort": {"error": "BOOM"}}, "abort.error: 'BOOM' is not one of ROUTE_NOT_FOUND, CLUSTER_NOT_FOUND"),
        ({"abort": {"percentage": 5}}, "abort: 'error' is a required property"),
        ({"abort": {"error": "TIMEOUT", "percentage": 150}}, "abort.percentage: 150 is greater than the maximum of 100"),
        ({"delay": {"fixed_delay": "100"}}, "delay.fixed_delay: '100' is not a duration: it needs a unit, e.g. 100s or 100ms"),
        ({"delay": {"percentage": 5}}, "delay: 'fixed_delay' is a required property"),
        ({"delay": {"fixed_delay": "1s", "percentage": -1}}, "delay.percentage: -1 is less than the minimum of 0"),
        ({"delay": {"fixed_delay": "1s", "percentage": "50%"}}, "delay.percentage: '50%' is not of type 'number'"),
        ({"delay": {"fixed_delay": "1s"}, "match": {"headers": [{"name": "cmd", "regex": "(["}]}}, "match.headers[0].regex: invalid regular expression"),
        ({"delay": {"fixed_delay": "1s"}, "match": {"headers": [{"exact": "5"}]}}, "match.headers[0]: 'name' is a required property"),
        ({"delay": {"fixed_delay": "1s"}, "abourt": {}}, "(config): unknown key 'abourt' (did you mean 'abort'?)"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(config, message):
    with pytest.raises(ValueError) as caught:
        FaultFilter(config, listener="test")
    assert message in str(caught.value)
