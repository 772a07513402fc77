"""Per-route timeouts and Envoy's graceful drain, through a real Envoy and the bridge.

The example backend's cmd 98 sleeps <body> ms before answering; a request_mutation lets a second
route reach the same slow command.

Every test runs in both bridge modes (ext_proc and inprocess): the drain reaches the core through
HCM's GOAWAY on its tunnels in either.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from metabridge.sdk.codec import ErrorType
from examples.awesomerpc.client import AwesomeRpcClient, Reply
from examples.awesomerpc.protocol import ERROR_CODES
from tests.integration.harness import MODES, Stack, cmd_route, run_async, wait_until
from tests.integration.waits import slow_requests_received, until

CMD_FAST = 2
CMD_SLOW = 98  # the example backend sleeps <body> ms before answering
CMD_SLOW_ALIAS = 97  # rewritten to 98 by its route, so a second route reaches the slow command
GOAWAY_GRACEFUL_LAST_STREAM = 2**31 - 1


class RecordingClient(AwesomeRpcClient):
    """Keeps every frame the proxy sent, including ones no call waits for (a stray error reply
    or a late response would show up here and nowhere else)."""

    def __init__(self, *args, **kwargs) -> None:
        self.frames: list[tuple[int, int, bytes]] = []  # (flow, rsp_code, body)
        super().__init__(*args, **kwargs)

    def _deliver(self, metadata) -> None:
        self.frames.append((metadata.request_id, metadata.properties["rsp_code"], bytes(metadata.frame[metadata.header_size :])))
        super()._deliver(metadata)

    async def wait_for_eof(self, timeout: float) -> str | None:
        """The reason the connection ended, or None if it is still open after ``timeout`` s."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader_task), timeout)
        except asyncio.TimeoutError:
            return None
        return self._closed_reason


def run(coro):
    return run_async(coro, 40)


async def connect(s: Stack) -> RecordingClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", s.listen_port)
    return RecordingClient(reader, writer)


async def timed(call) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = await call
    return reply, time.monotonic() - started


# ---- per-route timeout ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_route_timeout_overrides_listener_timeout(stack):
    routes = [
        cmd_route(CMD_SLOW, "v1", timeout="200ms"),
        cmd_route(CMD_SLOW_ALIAS, "v1", request_mutation=[{"key": "cmd", "value": str(CMD_SLOW)}]),
        cmd_route(CMD_FAST, "v1"),
    ]
    s = stack(routes, request_timeout="5s")

    async def main():
        c = await connect(s)
        try:
            # Both ask the backend to sleep 1000 ms, on the same tunnel; the one on the 200 ms
            # route is sent first, so its late response comes back before the other's reply.
            short = asyncio.ensure_future(timed(c.call(CMD_SLOW, b"1000")))
            await until(lambda: slow_requests_received(s, "v1", 1000) == 1, 10, "the first slow request at v1")
            long = asyncio.ensure_future(timed(c.call(CMD_SLOW_ALIAS, b"1000")))
            (short_reply, short_elapsed), (long_reply, long_elapsed) = await asyncio.gather(short, long)
            after = await c.call(CMD_FAST, b"after")
            return short_reply, short_elapsed, long_reply, long_elapsed, after, list(c.frames)
        finally:
            c.close()
            await c.wait_closed()

    short_reply, short_elapsed, long_reply, long_elapsed, after, frames = run(main())
    assert short_reply.rsp_code == ERROR_CODES[ErrorType.TIMEOUT], short_reply
    # The route's 200 ms, not the listener's 5 s nor the backend's 1 s.
    assert 0.15 <= short_elapsed < 0.7, short_elapsed
    assert (long_reply.rsp_code, long_reply.body) == (0, b"v1|1000"), long_reply
    assert 0.95 <= long_elapsed < 4, long_elapsed
    assert (after.rsp_code, after.body) == (0, b"v1|after"), after
    # Exactly one frame per request: the timed-out request's late response was dropped.
    assert len(frames) == 3, frames
    assert "no response within 0.2s" in s.log("bridge")


# ---- graceful drain ---------------------------------------------------------------------------

DRAIN_ENVOY_ARGS = [
    # drainClose() is true at once (the default, gradual, makes it true with a probability that
    # grows over --drain-time-s); the listeners are stopped only after 30 s, past the test.
    "--drain-strategy", "immediate", "--drain-time-s", "30",
]
CONNECTIONS, PER_CONNECTION, SLOW_MS = 4, 3, 500


def post_drain(s: Stack) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{s.admin_port}/drain_listeners?graceful", method="POST")
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 200, r.status


def drain_close_count(s: Stack) -> int:
    """How many downstream connections Envoy's HCM started draining (sent its first GOAWAY on)."""
    return s.envoy_stat("http.awesomerpc.downstream_cx_drain_close")


async def slow_requests_in_flight(s: Stack) -> tuple[list[RecordingClient], list[asyncio.Future]]:
    """CONNECTIONS clients with PER_CONNECTION slow requests each, once every tunnel is up."""
    clients = [await connect(s) for _ in range(CONNECTIONS)]
    calls = [asyncio.ensure_future(c.call(CMD_SLOW, str(SLOW_MS).encode())) for c in clients for _ in range(PER_CONNECTION)]
    deadline = time.monotonic() + 5
    while s.envoy_stat("cluster.v1.upstream_cx_active") < CONNECTIONS:
        assert time.monotonic() < deadline, "the tunnels to v1 did not come up"
        await asyncio.sleep(0.01)  # the poll loop's interval
    return clients, calls


def assert_all_answered(clients: list[RecordingClient], replies) -> None:
    bad = [r for r in replies if not isinstance(r, Reply) or (r.rsp_code, r.body) != (0, f"v1|{SLOW_MS}".encode())]
    assert not bad, f"{len(bad)} of {len(replies)} in-flight requests lost their response: {bad[:4]}"
    for i, c in enumerate(clients):
        errors = [f for f in c.frames if f[1] != 0]
        assert not errors, f"connection {i} got error replies: {errors}"


@pytest.mark.parametrize("mode", MODES)
def test_graceful_drain_closes_connections_after_their_in_flight_requests(stack):
    """The drain as a client sees it: requests in flight on open tunnels, then
    /drain_listeners?graceful, and nothing else. Every request gets its response, then every
    connection ends (EOF, no error reply). The bridge hears of the drain through its drain probe
    (a header-only request whose answer carries HCM's GOAWAY), here every 500 ms."""
    s = stack([cmd_route(CMD_SLOW, "v1")], request_timeout="5s", drain_probe_interval="500ms", envoy_args=DRAIN_ENVOY_ARGS)

    async def main():
        clients, calls = await slow_requests_in_flight(s)
        try:
            post_drain(s)
            in_flight_at_drain = sum(not f.done() for f in calls)
            replies = await asyncio.gather(*calls, return_exceptions=True)
            # Envoy's final GOAWAY comes 5 s (HCM drain_timeout) after its first; 6 s covers it.
            ends = await asyncio.gather(*(c.wait_for_eof(6) for c in clients))
            return clients, in_flight_at_drain, replies, ends
        finally:
            for c in clients:
                c.close()
                await c.wait_closed()

    clients, in_flight_at_drain, replies, ends = run(main())
    assert in_flight_at_drain == len(replies), f"only {in_flight_at_drain} of {len(replies)} requests were in flight when the drain began"
    assert_all_answered(clients, replies)
    drains_seen = s.log("bridge").count('"upstream_draining"')
    still_open = [i for i, end in enumerate(ends) if end is None]
    assert not still_open, (
        f"connections {still_open} of {CONNECTIONS} are still open 6 s after their last reply: the bridge logged "
        f"upstream_draining {drains_seen} times, Envoy's HCM started draining {drain_close_count(s)} connections "
        "(it sends its GOAWAY only when it encodes response headers: a drain probe's or a new tunnel's)"
    )
    assert all(end == "the server closed the connection" for end in ends), ends
    assert drains_seen == CONNECTIONS


@pytest.mark.parametrize("mode", MODES)
def test_graceful_drain_goaway_reaching_the_bridge(stack):
    """As above, but each connection opens one new tunnel (to v2) after the drain began; HCM
    puts its first GOAWAY (NO_ERROR, last stream 2^31-1) before that tunnel's response headers.
    The bridge lets the open tunnels finish: every request in flight gets its response, and each
    connection ends (EOF, no error reply) once its last reply is out."""
    routes = [cmd_route(CMD_SLOW, "v1"), cmd_route(CMD_FAST, "v2")]
    s = stack(routes, backends=("v1", "v2"), request_timeout="5s", envoy_args=DRAIN_ENVOY_ARGS)

    async def main():
        clients, calls = await slow_requests_in_flight(s)
        try:
            post_drain(s)
            in_flight_at_drain = sum(not f.done() for f in calls)
            new = await asyncio.gather(*(c.call(CMD_FAST, b"during the drain") for c in clients))
            await asyncio.to_thread(wait_until, lambda: s.log("bridge").count('"upstream_draining"') >= CONNECTIONS, 5, "upstream_draining on every connection")
            replies = await asyncio.gather(*calls, return_exceptions=True)
            ends = await asyncio.gather(*(c.wait_for_eof(6) for c in clients))
            return clients, in_flight_at_drain, new, replies, ends
        finally:
            for c in clients:
                c.close()
                await c.wait_closed()

    clients, in_flight_at_drain, new, replies, ends = run(main())
    assert in_flight_at_drain == len(replies), f"only {in_flight_at_drain} of {len(replies)} requests were in flight when the drain began"
    assert all((r.rsp_code, r.body) == (0, b"v2|during the drain") for r in new), new
    assert_all_answered(clients, replies)
    assert ends == ["the server closed the connection"] * CONNECTIONS, ends
    for i, c in enumerate(clients):
        assert len(c.frames) == PER_CONNECTION + 1, (i, c.frames)
    assert drain_close_count(s) == CONNECTIONS
    bridge_log = s.log("bridge")
    assert bridge_log.count('"upstream_draining"') == CONNECTIONS
    assert f'"last_stream_id": {GOAWAY_GRACEFUL_LAST_STREAM}' in bridge_log
    assert '"local_reply"' not in bridge_log
