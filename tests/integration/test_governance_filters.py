"""The local rate limit and fault injection filters through a real Envoy and the bridge, in front
of awesomerpc example backends (examples/governance.yaml, its filters replaced per test): under
the limit every request passes, over it OVER_LIMIT (429); the rate over time; a delay measured,
holding only its own request; the abort percentage within statistical bounds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest

from metabridge.sdk.codec import ErrorType
from examples.awesomerpc.client import AwesomeRpcClient
from examples.awesomerpc.protocol import ERROR_CODES
from tests.integration.harness import MODES, REPO, Stack, example_config, free_port, run_async, stack_class

OVER_LIMIT = ERROR_CODES[ErrorType.OVER_LIMIT]
TIMEOUT = ERROR_CODES[ErrorType.TIMEOUT]


def cmd(value: int) -> dict:
    return {"headers": [{"name": "cmd", "exact": str(value)}]}


def governance_stack(tmp, filters: list[dict] | None = None, workers: int | None = None, mode: str = "ext_proc") -> Stack:
    """examples/governance.yaml on free ports with its two backends; ``filters`` replaces its chain."""
    ports = {"awesomerpc-v1": free_port(), "awesomerpc-v2": free_port()}
    listen = free_port()
    config = example_config("examples/governance.yaml", {"awesomerpc": listen}, ports)
    if filters is not None:
        config["listeners"][0]["filters"] = filters
    if workers is not None:
        config["bridge"]["workers"] = workers
    config["bridge"]["mode"] = mode
    cls = stack_class(mode)
    s = cls(tmp, config, {"v1": ports["awesomerpc-v1"], "v2": ports["awesomerpc-v2"]})
    s.listen_port = listen
    return s


@pytest.fixture
def make_stack(tmp_path):
    started = []

    def make(filters=None, workers=None) -> Stack:
        s = governance_stack(tmp_path, filters, workers)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.stop()


def test_metabridge_validate_accepts_the_governance_example():
    done = subprocess.run([sys.executable, "-m", "metabridge.cli", "validate", "-c", "examples/governance.yaml"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---- local rate limit ----------------------------------------------------------------------------------


def test_under_the_limit_every_request_passes_over_it_over_limit(make_stack):
    stack = make_stack(
        [
            {
                "name": "local_ratelimit",
                "config": {
                    "token_bucket": {"max_tokens": 20, "fill_interval": "1h"},
                    "conditions": [{"match": cmd(2), "token_bucket": {"max_tokens": 5, "fill_interval": "1h"}}],
                },
            }
        ]
    )

    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", stack.listen_port) as c:
            under = await asyncio.gather(*(c.call(1, b"a") for _ in range(20)), *(c.call(2, b"b") for _ in range(5)))
            over = await asyncio.gather(c.call(1, b"a"), c.call(2, b"b"))
        async with await AwesomeRpcClient.connect("127.0.0.1", stack.listen_port) as other:
            over.append(await other.call(1, b"c"))
        return under, over

    under, over = run_async(main(), 30)
    assert [(r.rsp_code, r.body) for r in under] == [(0, b"v1|a")] * 20 + [(0, b"v2|b")] * 5
    assert [r.rsp_code for r in over] == [OVER_LIMIT] * 3, "both buckets empty, for every connection of the listener"


async def hammer(port: int, connections: int, callers: int, seconds: float) -> tuple[int, int, float]:
    """``callers`` concurrent loops per connection calling cmd 1 for ``seconds``:
    (admitted, refused with OVER_LIMIT, elapsed)."""
    counts = {0: 0, OVER_LIMIT: 0}
    clients = [await AwesomeRpcClient.connect("127.0.0.1", port) for _ in range(connections)]
    started = time.monotonic()
    stop = started + seconds

    async def loop(client):
        while time.monotonic() < stop:
            reply = await client.call(1, b"x")
            counts[reply.rsp_code] += 1

    try:
        await asyncio.gather(*(loop(c) for c in clients for _ in range(callers)))
    finally:
        for c in clients:
            c.close()
            await c.wait_closed()
    return counts[0], counts[OVER_LIMIT], time.monotonic() - started


def assert_rate(admitted: int, refused: int, elapsed: float, burst: int, per_second: float, fill: int) -> None:
    expected = burst + per_second * elapsed
    # The client's window and the bridge's fill boundaries are not aligned: one fill either way.
    slack = 0.05 * per_second * elapsed + fill
    assert refused > admitted, f"the clients asked for more than the limit ({admitted} admitted, {refused} refused)"
    assert abs(admitted - expected) <= slack, f"{admitted} admitted in {elapsed:.2f}s, expected {expected:.0f} +- {slack:.0f}"


def test_the_configured_rate_holds_over_time(make_stack):
    stack = make_stack([{"name": "local_ratelimit", "config": {"token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "100ms"}}}])
    admitted, refused, elapsed = run_async(hammer(stack.listen_port, 2, 4, 3.0), 30)
    assert_rate(admitted, refused, elapsed, burst=5, per_second=50, fill=5)


def test_the_configured_rate_holds_for_the_whole_bridge_with_two_workers(make_stack):
    stack = make_stack([{"name": "local_ratelimit", "config": {"token_bucket": {"max_tokens": 10, "tokens_per_fill": 10, "fill_interval": "200ms"}}}], workers=2)
    admitted, refused, elapsed = run_async(hammer(stack.listen_port, 4, 3, 3.0), 30)
    assert_rate(admitted, refused, elapsed, burst=10, per_second=50, fill=10)



async def offered(port: int, connections: int, per_connection: float, seconds: float) -> tuple[int, int, float]:
    """Each of ``connections`` sends cmd 1 at ``per_connection`` requests/s for ``seconds``
    without waiting for replies (an open loop, so the offered rate does not sag with latency):
    (admitted, refused with OVER_LIMIT, time from the first send to the last)."""
    clients = [await AwesomeRpcClient.connect("127.0.0.1", port) for _ in range(connections)]
    calls: list[asyncio.Task] = []
    started = time.monotonic()
    stop = started + seconds
    last = started

    async def send(client: AwesomeRpcClient, offset: float) -> None:
        nonlocal last
        due = started + offset
        while due < stop:
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # pacing the load, not waiting for a condition
            calls.append(asyncio.ensure_future(client.call(1, b"x", timeout=10)))
            last = max(last, time.monotonic())
            due += 1 / per_connection

    try:
        await asyncio.gather(*(send(c, i / (connections * per_connection)) for i, c in enumerate(clients)))
        replies = await asyncio.gather(*calls)
    finally:
        for c in clients:
            c.close()
            await c.wait_closed()
    codes = Counter(r.rsp_code for r in replies)
    assert set(codes) <= {0, OVER_LIMIT}, codes
    return codes[0], codes[OVER_LIMIT], last - started


def connections_per_worker(stack: Stack) -> dict[str, int]:
    """Envoy's count of connections (one per client connection) to each bridge worker."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/clusters", timeout=2) as r:
        lines = r.read().decode().splitlines()
    return {parts[1]: int(parts[3]) for parts in (line.split("::") for line in lines) if len(parts) == 4 and parts[0] == "metabridge_bridge" and parts[2] == "cx_total"}


def test_a_100_per_second_limit_admits_100_per_second_in_total_with_four_workers(make_stack):
    """bridge.workers: 4 and a limit of 100 requests/s (bursts of 20), for 3.5 s each: 12 client
    connections offering 75 requests/s each (900/s), which Envoy spreads over all four workers,
    then 2 connections offering 450/s each, which reach only two workers. Both times the bridge
    as a whole admits 100/s within 5 %: the workers share the bucket, so a worker's busy
    connections can use what idle workers leave."""
    max_tokens, per_fill, interval = 20, 10, 0.1
    rate = per_fill / interval
    stack = make_stack([{"name": "local_ratelimit", "config": {"token_bucket": {"max_tokens": max_tokens, "tokens_per_fill": per_fill, "fill_interval": "100ms"}}}], workers=4)
    seen: dict[str, int] = {}
    for connections, per_connection in ((12, 75), (2, 450)):
        admitted, refused, elapsed = run_async(offered(stack.listen_port, connections, per_connection, 3.5), 60)
        total = connections_per_worker(stack)
        per_worker = {w: n - seen.get(w, 0) for w, n in total.items()}
        seen = total
        what = f"{connections} connections (per worker {sorted(per_worker.values())})"
        if connections >= 4:
            assert len(per_worker) == 4 and min(per_worker.values()) >= 1, f"{what}: every worker should carry connections"
        assert refused > 3 * admitted, f"{what}: the clients offered far more than the limit ({admitted} admitted, {refused} refused)"
        # At most the burst plus the fills over the window, plus one fill for the window's edges
        # not lining up with the fills; at least 95 % of the rate over the window.
        high, low = max_tokens + rate * elapsed + per_fill, 0.95 * rate * elapsed
        assert low <= admitted <= high, f"{what}: {admitted} admitted in {elapsed:.2f}s ({admitted / elapsed:.1f}/s), expected {low:.0f}..{high:.0f}"
        print(f"{what}: {admitted} admitted, {refused} refused in {elapsed:.2f}s ({admitted / elapsed:.1f}/s); bounds {low:.0f}..{high:.0f}")

# ---- fault injection -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODES)
def fault_stack(request, tmp_path_factory):
    """Both modes: the delay is a timer of the connection's clock (the event loop's, or the
    in-process module's timer thread inside Envoy)."""
    s = governance_stack(
        tmp_path_factory.mktemp("fault"),
        [
            {"name": "fault", "config": {"delay": {"fixed_delay": "200ms"}, "match": cmd(5)}},
            {"name": "fault", "config": {"abort": {"error": "TIMEOUT", "percentage": 25}, "match": cmd(6)}},
        ],
        mode=request.param,
    )
    yield s.start()
    s.stop()


async def timed(call):
    started = time.monotonic()
    reply = await call
    return reply, time.monotonic() - started


def test_a_delay_holds_its_request_for_the_fixed_delay_and_nothing_else(fault_stack):
    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", fault_stack.listen_port) as c:
            await c.call(1, b"warm")  # the tunnel is open: what follows measures the filter
            delayed, other = await asyncio.gather(timed(c.call(5, b"d")), timed(c.call(1, b"o")))
            started = time.monotonic()
            many = await asyncio.gather(*(c.call(5, b"m") for _ in range(10)))
            return delayed, other, many, time.monotonic() - started

    (delayed, took), (other, other_took), many, many_took = run_async(main(), 30)
    assert (delayed.rsp_code, delayed.body) == (0, b"v1|d") and took >= 0.2, f"cmd 5 took {took:.3f}s"
    assert (other.rsp_code, other.body) == (0, b"v1|o") and other_took < took - 0.1, f"cmd 1 took {other_took:.3f}s beside the delayed call"
    assert all(r.body == b"v1|m" for r in many)
    assert 0.2 <= many_took < 1.0, f"10 delayed calls took {many_took:.3f}s: they waited together, not in turn"


def test_the_abort_percentage_holds_within_statistical_bounds(fault_stack):
    n = 400

    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", fault_stack.listen_port) as c:
            replies = []
            for _ in range(n // 50):
                replies += await asyncio.gather(*(c.call(6, b"a") for _ in range(50)))
            others = await asyncio.gather(*(c.call(1, b"x") for _ in range(50)))
            return replies, others

    replies, others = run_async(main(), 60)
    aborted = sum(1 for r in replies if r.rsp_code == TIMEOUT)
    assert all(r.rsp_code == TIMEOUT or (r.rsp_code, r.body) == (0, b"v1|a") for r in replies)
    sigma = (n * 0.25 * 0.75) ** 0.5
    assert abs(aborted - n * 0.25) <= 5 * sigma, f"{aborted} of {n} aborted, expected {n * 0.25:.0f} +- {5 * sigma:.0f}"
    assert all((r.rsp_code, r.body) == (0, b"v1|x") for r in others), "requests the match does not select are untouched"
