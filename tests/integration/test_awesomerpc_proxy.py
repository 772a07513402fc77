"""The awesomerpc data path through a real Envoy and the bridge, with real backends, in both
modes (``mode``: the bridge process behind ext_proc, and the core inside Envoy, docs/inprocess.md).

Not in-process (no bridge process there):
- test_bridge_killed_fails_closed_then_recovers: kills and restarts the bridge process; Envoy's
  ext_proc filter fails closed without it. In-process there is nothing separate to kill (a crash
  is Envoy's; the in-process failure outcomes are test_inprocess.py's).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import urllib.request
from collections import Counter

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient, ConnectionClosed, encode_frame
from examples.awesomerpc.protocol import ERROR_CODES
from metabridge.sdk.codec import ErrorType
from tests.integration.harness import MODES, Stack, awesomerpc_config, cmd_route, free_port, port_open, read_until_closed, run_async, stack_class, wait_until
from tests.integration.waits import slow_requests_received, until

CMD_SLOW = 98  # the example backend sleeps <body> ms before answering
CMD_CLOSE = 99  # the example backend closes the connection without answering


def run(coro):
    return run_async(coro, 60)


async def connect(s: Stack) -> AwesomeRpcClient:
    return await AwesomeRpcClient.connect("127.0.0.1", s.listen_port)


DEFAULT_ROUTES = [cmd_route(1, "v1"), cmd_route(2, "v2"), cmd_route(CMD_SLOW, "v1"), cmd_route(CMD_CLOSE, "v1")]


@pytest.mark.parametrize("mode", MODES)
def test_routes_by_cmd(stack):
    s = stack(DEFAULT_ROUTES)

    async def main():
        async with await connect(s) as c:
            r1 = await c.call(1, b"a")
            r2 = await c.call(2, b"b")
            assert (r1.rsp_code, r1.body, r1.cmd) == (0, b"v1|a", 1)
            assert (r2.rsp_code, r2.body, r2.cmd) == (0, b"v2|b", 2)

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_weighted_split_within_statistical_bounds(stack):
    route = {"match": {"headers": [{"name": "cmd", "exact": "1"}]}, "route": {"weighted_clusters": [{"name": "v1", "weight": 80}, {"name": "v2", "weight": 20}]}}
    s = stack([route])
    n = 1000

    async def main():
        async with await connect(s) as c:
            replies = await asyncio.gather(*(c.call(1, b"x") for _ in range(n)))
        return Counter(r.body.split(b"|")[0] for r in replies)

    seen = run(main())
    assert sum(seen.values()) == n
    # Binomial(1000, 0.2): sd ~12.6; +-5 sd keeps this from flaking while catching a wrong split.
    assert 137 <= seen[b"v2"] <= 263, seen


@pytest.mark.parametrize("mode", MODES)
def test_request_and_response_mutation(stack):
    routes = [cmd_route(3, "v1", request_mutation=[{"key": "cmd", "value": "30"}], response_mutation=[{"key": "cmd", "value": "31"}])]
    s = stack(routes)

    async def main():
        async with await connect(s) as c:
            return await c.call(3, b"m")

    reply = run(main())
    # The backend echoes the cmd it received: 30 is the request mutation; the client sees the
    # response mutation (31).
    assert reply.body == b"v1|m"
    assert reply.cmd == 31
    assert reply.rsp_code == 0


@pytest.mark.parametrize("mode", MODES)
def test_no_route_replies_with_error_carrying_request_id(stack):
    s = stack(DEFAULT_ROUTES)

    async def main():
        async with await connect(s) as c:
            bad = await c.call(7, b"?")
            good = await c.call(1, b"still fine")
            return bad, good

    bad, good = run(main())
    assert bad.rsp_code == ERROR_CODES[ErrorType.ROUTE_NOT_FOUND]
    assert bad.flow == 1 and bad.cmd == 7 and bad.body == b""
    assert good.body == b"v1|still fine"


def reload(s: Stack, mode: str) -> None:
    """Apply the changed config file: SIGHUP to the bridge process; in-process, POST /reload on
    the admin endpoint inside Envoy (Envoy owns its signals)."""
    if mode == "ext_proc":
        s.procs["bridge"].send_signal(signal.SIGHUP)
        wait_until(lambda: '"routes_reloaded"' in s.log("bridge"), 10, "route reload")
        return
    request = urllib.request.Request(f"http://127.0.0.1:{s.metrics_port}/reload", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=30) as r:
        body = r.read().decode()
    assert r.status == 200 and body.startswith("reloaded"), body
    assert '"routes_reloaded"' in s.log("bridge")


@pytest.mark.parametrize("mode", MODES)
def test_a_cluster_envoy_does_not_have_gets_cluster_not_found(tmp_path, mode):
    # A route may name only a defined cluster, but one added by a reload is not in Envoy's
    # bootstrap until it is re-rendered: Envoy answers its tunnel 503 NC.
    ports = {"v1": free_port()}
    cfg = awesomerpc_config(free_port(), ports, [cmd_route(1, "v1")])
    cfg["bridge"] = {"metrics_port": free_port()}  # in-process, POST /reload is served there
    s = stack_class(mode)(tmp_path, cfg, ports)
    s.listen_port, s.metrics_port = cfg["listeners"][0]["port"], cfg["bridge"]["metrics_port"]
    s.start()
    try:
        wait_until(lambda: port_open(s.metrics_port), 10, "the admin endpoint", s.procs["bridge" if mode == "ext_proc" else "envoy"])
        raw = yaml.safe_load(s.config_path.read_text())
        raw["clusters"].append({"name": "nowhere", "endpoints": [{"address": "127.0.0.1", "port": free_port()}]})
        raw["listeners"][0]["routes"] = [cmd_route(1, "nowhere")]
        s.config_path.write_text(yaml.safe_dump(raw))
        reload(s, mode)

        async def main():
            async with await connect(s) as c:
                return await c.call(1, b"x")

        assert run(main()).rsp_code == ERROR_CODES[ErrorType.CLUSTER_NOT_FOUND]
        assert any('"reload_needs_restart"' in line and '"cluster": "nowhere"' in line for line in s.log("bridge").splitlines()), "the reload said Envoy lacks it"
    finally:
        s.stop()


@pytest.mark.parametrize("mode", MODES)
def test_dead_backend_gets_error_reply(stack):
    dead = free_port()  # nothing listens here: connection refused
    s = stack([cmd_route(1, "dead")], backends=(), extra_clusters={"dead": dead})

    async def main():
        async with await connect(s) as c:
            return await c.call(1, b"x")

    reply = run(main())
    assert reply.rsp_code == ERROR_CODES[ErrorType.UNSPECIFIED]


@pytest.mark.parametrize("mode", MODES)
def test_backend_closing_mid_request_gets_error_reply(stack):
    s = stack(DEFAULT_ROUTES)

    async def main():
        async with await connect(s) as c:
            slow = asyncio.ensure_future(c.call(CMD_SLOW, b"2000"))
            # The slow request is at the backend, so the close drops it too.
            await until(lambda: slow_requests_received(s, "v1", 2000), 10, "the slow request at v1")
            closing = await c.call(CMD_CLOSE, b"")
            slow_reply = await slow
            after = await c.call(1, b"again")  # a new tunnel is opened
            return closing, slow_reply, after

    closing, slow_reply, after = run(main())
    # Both requests pending on the tunnel get exactly one error reply each.
    assert closing.rsp_code == ERROR_CODES[ErrorType.UNSPECIFIED]
    assert slow_reply.rsp_code == ERROR_CODES[ErrorType.UNSPECIFIED]
    assert after.body == b"v1|again"


@pytest.mark.parametrize("mode", MODES)
def test_request_timeout(stack):
    s = stack(DEFAULT_ROUTES, request_timeout="300ms")

    async def main():
        async with await connect(s) as c:
            started = time.monotonic()
            slow = await c.call(CMD_SLOW, b"1500")
            elapsed = time.monotonic() - started
            fast = await c.call(1, b"ok")
            return slow, elapsed, fast

    slow, elapsed, fast = run(main())
    assert slow.rsp_code == ERROR_CODES[ErrorType.TIMEOUT]
    assert 0.25 < elapsed < 1.4  # answered by the core's timer, not by the backend's late reply
    assert fast.body == b"v1|ok"


@pytest.mark.parametrize("mode", MODES)
def test_heartbeat_answered_without_reaching_backend(stack):
    s = stack(DEFAULT_ROUTES)

    async def main():
        async with await connect(s) as c:
            return [await c.heartbeat() for _ in range(3)]

    replies = run(main())
    assert all(r.cmd == 0 and r.rsp_code == 0 for r in replies)
    assert [r.flow for r in replies] == [1, 2, 3]
    # No tunnel, so no upstream connection, was ever made.
    assert s.envoy_stat("cluster.v1.upstream_cx_total") == 0
    assert s.envoy_stat("cluster.v2.upstream_cx_total") == 0


@pytest.mark.parametrize("mode", MODES)
def test_100_interleaved_requests_on_one_connection(stack, mode):
    s = stack(DEFAULT_ROUTES)

    async def main():
        async with await connect(s) as c:
            calls = [c.call(1 if i % 2 else 2, f"req-{i}".encode()) for i in range(100)]
            # a few slow ones so answers come back out of order
            calls += [c.call(CMD_SLOW, b"50") for _ in range(5)]
            return await asyncio.gather(*calls)

    replies = run(main())
    for i, reply in enumerate(replies[:100]):
        expected = b"v1|" if i % 2 else b"v2|"
        assert reply.body == expected + f"req-{i}".encode()
    assert all(r.rsp_code == 0 for r in replies)
    if mode == "inprocess":  # the module's counter of contained failures exists, and none happened
        errors = [line for line in envoy_stats(s).splitlines() if line.split(":")[0].endswith("metabridge_inprocess_errors")]
        assert errors and all(line.endswith(": 0") for line in errors), errors


@pytest.mark.parametrize("mode", MODES)
def test_50_concurrent_connections(stack):
    s = stack(DEFAULT_ROUTES)

    async def one(i):
        async with await connect(s) as c:
            replies = [await c.call(1 + i % 2, f"c{i}-{k}".encode()) for k in range(5)]
        return i, replies

    async def main():
        return await asyncio.gather(*(one(i) for i in range(50)))

    for i, replies in run(main()):
        prefix = b"v1|" if i % 2 == 0 else b"v2|"
        assert [r.body for r in replies] == [prefix + f"c{i}-{k}".encode() for k in range(5)]


def envoy_stats(s: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/stats", timeout=2) as r:
        return r.read().decode()


def _raw_connection(s: Stack) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.listen_port), timeout=5)
    return sock


@pytest.mark.parametrize("mode", MODES)
def test_malformed_frame_closes_only_that_connection(stack):
    s = stack(DEFAULT_ROUTES)

    async def main():
        async with await connect(s) as healthy:
            assert (await healthy.call(1, b"before")).body == b"v1|before"
            bad = _raw_connection(s)
            bad.sendall(b"\x01\x00\x00\x00\x01\x00\x00\x00\x05garbage")  # len 5 < 13-byte header
            leaked = await asyncio.get_running_loop().run_in_executor(None, read_until_closed, bad)
            bad.close()
            after = await healthy.call(2, b"after")
            return leaked, after

    leaked, after = run(main())
    assert leaked == b""  # closed, and nothing (no raw HTTP/2) reached the client
    assert after.body == b"v2|after"
    assert "bad_request_closing_connection" in s.log("bridge")


@pytest.mark.parametrize("mode", MODES)
def test_oversized_frame_rejected(stack):
    s = stack(DEFAULT_ROUTES, max_frame_size="1KiB")

    async def main():
        async with await connect(s) as other:
            big = _raw_connection(s)
            big.sendall(encode_frame(1, 1, b"x" * 4096)[:600])  # the header alone announces 4109 bytes
            leaked = await asyncio.get_running_loop().run_in_executor(None, read_until_closed, big)
            big.close()
            small = await other.call(1, b"y" * 500)
            return leaked, small

    leaked, small = run(main())
    assert leaked == b""
    assert small.body == b"v1|" + b"y" * 500


@pytest.mark.parametrize("mode", MODES)
def test_client_half_close_ends_connection_and_frees_state(stack):
    """Envoy's HTTP connection manager does not keep half-closed downstream connections: a
    client FIN ends the connection. The defined outcome: the client sees the close, nothing raw
    leaks, the bridge frees the session (its tunnels close with it) and serves others."""
    s = stack(DEFAULT_ROUTES)
    sock = _raw_connection(s)
    sock.sendall(encode_frame(7, CMD_SLOW, b"1000"))
    wait_until(lambda: slow_requests_received(s, "v1", 1000), 10, "the request in flight at v1 (on a tunnel)")
    sock.shutdown(socket.SHUT_WR)
    data = read_until_closed(sock)
    sock.close()
    assert data in (b"", encode_frame(7, CMD_SLOW, b"v1|1000"))
    wait_until(lambda: '"event": "connection_closed"' in s.log("bridge"), 5, "session cleanup")

    async def main():
        async with await connect(s) as c:
            return await c.call(1, b"next")

    assert run(main()).body == b"v1|next"


@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_closes_connection(stack):
    s = stack(DEFAULT_ROUTES, idle_timeout="500ms")
    sock = _raw_connection(s)
    sock.sendall(encode_frame(1, 1, b"hi"))
    started = time.monotonic()
    data = read_until_closed(sock)
    sock.close()
    assert b"v1|hi" in data
    assert 0.4 < time.monotonic() - started < 4
    assert "idle_timeout" in s.log("bridge")


@pytest.mark.parametrize("mode", MODES)
def test_circuit_breaker_queue_and_overflow(stack):
    """max_connections 1: a second tunnel queues (no signal from Envoy: the bridge's setup timer
    answers), a third overflows the pending queue at once (503 UO)."""
    s = stack(
        [cmd_route(CMD_SLOW, "v1"), cmd_route(1, "v1")],
        tunnel_setup_timeout="500ms",
        cluster_options={"v1": {"circuit_breakers": {"max_connections": 1, "max_pending_requests": 1}}},
    )

    async def main():
        first = await connect(s)
        hold = asyncio.ensure_future(first.call(CMD_SLOW, b"3000"))  # keeps the only connection
        await until(lambda: slow_requests_received(s, "v1", 3000), 10, "the first request at v1 (on the only connection)")
        assert s.envoy_stat("cluster.v1.upstream_cx_active") == 1
        second, third = await connect(s), await connect(s)
        queued = asyncio.ensure_future(second.call(1, b"queued"))
        await until(lambda: s.envoy_stat("cluster.v1.upstream_rq_pending_active") == 1, 10, "the second tunnel queued in Envoy")
        overflow = await third.call(1, b"overflow")
        queued_reply = await queued
        for c in (first, second, third):
            c.close()
        hold.cancel()
        return queued_reply, overflow

    queued, overflow = run(main())
    assert overflow.rsp_code == ERROR_CODES[ErrorType.OVER_LIMIT]
    assert queued.rsp_code == ERROR_CODES[ErrorType.TIMEOUT]


@pytest.mark.parametrize("mode", MODES)
def test_clients_leaving_mid_request_leave_the_proxy_healthy(stack):
    """Connections closed with requests in flight, timers armed and tunnels opening: their
    state is freed and the proxy keeps serving."""
    s = stack(DEFAULT_ROUTES, request_timeout="200ms")
    for i in range(100):
        with _raw_connection(s) as sock:
            sock.sendall(encode_frame(i + 1, CMD_SLOW if i % 2 else 1, b"300" if i % 2 else b"x"))

    async def main():
        async with await connect(s) as c:
            return await c.call(2, b"still")

    assert run(main()).body == b"v2|still"
    wait_until(lambda: s.envoy_stat("listener.127.0.0.1_%d.downstream_cx_active" % s.listen_port) == 0, 10, "connections freed")


@pytest.mark.parametrize("mode", MODES)
def test_responses_past_the_tunnel_window(stack):
    """24 MiB of responses on one tunnel, more than its 16 MiB window: the window must be given
    back to HCM (in-process: bytes for HCM made during HCM's write, sent from a scheduled event)."""
    s = stack(DEFAULT_ROUTES, max_frame_size="2MiB")
    body = b"x" * (1024 * 1024)

    async def main():
        async with await connect(s) as c:
            return [await c.call(1, body, timeout=20) for _ in range(24)]

    replies = run(main())
    assert len(replies) == 24 and all(r.body == b"v1|" + body for r in replies)


def test_bridge_killed_fails_closed_then_recovers(stack):
    s = stack(DEFAULT_ROUTES)

    async def main():
        c = await connect(s)
        assert (await c.call(1, b"before")).body == b"v1|before"
        s.stop_process("bridge", signal.SIGKILL)
        with pytest.raises((ConnectionClosed, TimeoutError)):
            await c.call(1, b"during", timeout=3)
        assert c.closed
        # A new connection while the bridge is down is closed too: no raw bytes pass.
        raw = _raw_connection(s)
        raw.sendall(encode_frame(1, 1, b"raw"))
        leaked = await asyncio.get_running_loop().run_in_executor(None, read_until_closed, raw)
        raw.close()
        assert leaked == b""
        s.start_bridge()
        async with await connect(s) as again:
            return await again.call(2, b"after restart")

    assert run(main()).body == b"v2|after restart"
