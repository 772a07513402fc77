"""Per-request load balancing through a real Envoy and the bridge, over clusters of several hosts.

Every test runs example awesomerpc backends h0, h1 and h2 as the endpoints of one cluster
("pool"); a reply's body starts with the name of the backend that answered ("h1|..."), so the
client can count where its requests went.

Every test runs in both bridge modes (ext_proc and inprocess). Consistent hashing spreads its
connections over two bridge worker processes in the ext_proc mode and over two Envoy workers
in-process (one interpreter); the check that both carried connections reads Envoy's bridge
cluster in the one mode, its listener's per-worker counts in the other.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter

import pytest

from examples.awesomerpc.client import AwesomeRpcClient, Reply
from metabridge.sdk.codec import ErrorType
from examples.awesomerpc.protocol import ERROR_CODES
from tests.integration.harness import MODES, Stack, awesomerpc_config, free_port, multi_endpoint_cluster, run_async, stack_class, wait_until

HOSTS = ("h0", "h1", "h2")
CMD = 1
CMD_SLOW = 98  # the example backend sleeps <body> ms before answering
ROUTES = [{"name": f"cmd{cmd}", "match": {"headers": [{"name": "cmd", "exact": str(cmd)}]}, "route": {"cluster": "pool"}} for cmd in (CMD, CMD_SLOW)]
TOLERANCE = 0.05  # each host's share within 1/3 +- 5 percentage points
ERROR_RSP_CODES = frozenset(ERROR_CODES.values())


def start_pool_stack(tmp, lb_policy: str, backend_args: dict[str, list[str]] | None = None, mode: str = "ext_proc", **listener_options) -> Stack:
    ports = {name: free_port() for name in HOSTS}
    cfg = awesomerpc_config(free_port(), {}, ROUTES, request_timeout="5s", **listener_options)
    cfg["clusters"] = [multi_endpoint_cluster("pool", [ports[h] for h in HOSTS], lb_policy=lb_policy)]
    stack = stack_class(mode)(tmp, cfg, ports, backend_args=backend_args)
    stack.listen_port = cfg["listeners"][0]["port"]
    return stack.start()


@pytest.fixture(scope="module", params=MODES)
def round_robin(tmp_path_factory, request):
    """One ROUND_ROBIN stack (per mode) shared by the tests that only read distributions from it."""
    stack = start_pool_stack(tmp_path_factory.mktemp("rr"), "ROUND_ROBIN", mode=request.param)
    yield stack
    stack.stop()


@pytest.fixture
def pool_stack(tmp_path, mode):
    started: list[Stack] = []

    def make(lb_policy: str, **kwargs) -> Stack:
        stack = start_pool_stack(tmp_path, lb_policy, mode=mode, **kwargs)
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.stop()


def run(coro):
    return run_async(coro, 45)


async def connect(stack: Stack) -> AwesomeRpcClient:
    return await AwesomeRpcClient.connect("127.0.0.1", stack.listen_port)


def tunnels_per_host(stack: Stack) -> dict[str, int]:
    """Envoy's count of upstream connections (one per tunnel) to each host of "pool", by name."""
    names = {f"127.0.0.1:{port}": name for name, port in stack.backends.items()}
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/clusters", timeout=2) as r:
        text = r.read().decode()
    counts = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "pool" and parts[2] == "cx_total":
            counts[names.get(parts[1], parts[1])] = int(parts[3])
    return counts


def host_of(reply: Reply) -> str:
    assert reply.rsp_code == 0, reply
    name, sep, _ = reply.body.partition(b"|")
    assert sep, reply
    return name.decode()


def assert_balanced(seen: Counter, total: int, what: str) -> None:
    assert sum(seen.values()) == total, (what, seen)
    assert set(seen) <= set(HOSTS), (what, seen)
    for host in HOSTS:
        share = seen[host] / total
        assert abs(share - 1 / 3) <= TOLERANCE, f"{what}: {host} got {seen[host]} of {total} ({share:.1%}); all: {dict(seen)}"


async def pipelined(client: AwesomeRpcClient, total: int, batch: int, tag: str) -> list[Reply]:
    replies: list[Reply] = []
    for start in range(0, total, batch):
        calls = [client.call(CMD, f"{tag}-{i}".encode()) for i in range(start, min(start + batch, total))]
        replies += await asyncio.gather(*calls)
    return replies


def test_round_robin_spreads_one_connection_evenly(round_robin):
    n = 3000

    async def main():
        async with await connect(round_robin) as c:
            replies = await pipelined(c, n, 50, "rr")
        return replies

    replies = run(main())
    assert [r.body.partition(b"|")[2] for r in replies] == [f"rr-{i}".encode() for i in range(n)]
    assert_balanced(Counter(host_of(r) for r in replies), n, "one connection, ROUND_ROBIN")


def test_round_robin_per_request_across_eight_connections(round_robin):
    connections, per_connection = 8, 300

    async def one(i: int) -> list[Reply]:
        async with await connect(round_robin) as c:
            return await pipelined(c, per_connection, 50, f"c{i}")

    async def main():
        return await asyncio.gather(*(one(i) for i in range(connections)))

    results = run(main())
    total = Counter()
    for i, replies in enumerate(results):
        seen = Counter(host_of(r) for r in replies)
        # Balancing is per request on each connection, not per connection: every connection
        # spreads its own requests over the three hosts (its three slots reach three hosts).
        assert_balanced(seen, per_connection, f"connection {i}")
        total += seen
    assert_balanced(total, connections * per_connection, f"{connections} connections together")


def test_each_tunnel_slot_reaches_its_own_host(round_robin):
    """Three connections take turns, one request at a time, so the tunnels they open reach
    Envoy interleaved (A, B, C, A, B, C, ...). Each connection's three slots ask Envoy for their
    own endpoints (x-metabridge-host), so each connection's three requests reach three different
    hosts. Were the header ignored, Envoy's own round robin over the interleaved CONNECTs would
    hand every tunnel of one connection the same host."""

    async def main():
        clients = [await connect(round_robin) for _ in range(3)]
        try:
            seen: list[list[str]] = [[] for _ in clients]
            for turn in range(3):
                for i, c in enumerate(clients):
                    seen[i].append(host_of(await c.call(CMD, f"turn{turn}".encode())))
            return seen
        finally:
            for c in clients:
                c.close()
                await c.wait_closed()

    seen = run(main())
    for i, hosts in enumerate(seen):
        assert sorted(hosts) == sorted(HOSTS), f"connection {i}'s three round-robin requests reached {hosts} (all: {seen})"


@pytest.mark.parametrize("mode", MODES)
def test_least_request_avoids_the_slow_host(pool_stack):
    stack = pool_stack("LEAST_REQUEST", backend_args={"h2": ["--delay-ms", "200"]})
    workers, per_worker = 8, 75  # 600 requests, 8 in flight at a time on one connection

    async def main():
        async with await connect(stack) as c:

            async def worker(w: int) -> list[Reply]:
                return [await c.call(CMD, f"w{w}-{k}".encode()) for k in range(per_worker)]

            return [r for replies in await asyncio.gather(*(worker(w) for w in range(workers))) for r in replies]

    replies = run(main())
    n = workers * per_worker
    seen = Counter(host_of(r) for r in replies)
    assert sum(seen.values()) == n
    assert seen["h2"] / n < 0.15, f"the slow host h2 got {seen['h2']} of {n} requests: {dict(seen)}; tunnels per host (Envoy): {tunnels_per_host(stack)}"
    # The two fast hosts share the rest (each slot's tunnel reaches its own host).
    assert seen["h0"] > 0.3 * n and seen["h1"] > 0.3 * n, f"{dict(seen)}; tunnels per host (Envoy): {tunnels_per_host(stack)}"


@pytest.mark.parametrize("mode", MODES)
def test_killed_host_leaves_traffic_to_the_others(pool_stack):
    """Eight callers keep one connection busy; nine slow requests (three per host) are in flight
    when h2 is stopped. Every request gets exactly one reply: the slow ones on h2 an error reply,
    the rest their responses; what is sent once h2's tunnel is gone is answered by h0 and h1, and
    the client connection stays open."""
    stack = pool_stack("ROUND_ROBIN")
    workers, total = 8, 3000  # the kill takes about half of 2400 in-process (no gRPC hop: more requests per second)
    warm_up = 300  # replies before the slow requests are sent
    slow_count, slow_ms = 9, 1500

    async def main():
        log: list[tuple[float, Reply | BaseException]] = []  # (when the request was sent, outcome)
        killed_at = float("inf")
        sent = 0
        async with await connect(stack) as c:

            async def call(body: bytes, cmd: int = CMD) -> Reply | BaseException:
                try:
                    return await c.call(cmd, body, timeout=10)
                except Exception as exc:  # noqa: BLE001 - a request without a reply, counted
                    return exc

            async def worker(w: int) -> None:
                nonlocal sent
                while sent < total:
                    sent += 1
                    started = time.monotonic()
                    log.append((started, await call(f"w{w}".encode())))

            async def wait_for(condition, what: str, timeout: float = 20) -> None:
                deadline = time.monotonic() + timeout
                while not condition():
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.005)  # the poll loop's interval

            async def killer() -> list[Reply | BaseException]:
                nonlocal killed_at
                await wait_for(lambda: len(log) >= warm_up, f"{warm_up} replies")
                # Created in one step, so nothing else is sent between them: round robin puts
                # three on each slot.
                slow = [asyncio.ensure_future(call(str(slow_ms).encode(), CMD_SLOW)) for _ in range(slow_count)]
                slow_sent = time.monotonic()
                # Once 60 requests sent after them are answered (about 20 per tunnel, each tunnel
                # in order), the slow requests have reached their backends.
                await wait_for(lambda: sum(1 for t, _ in log if t > slow_sent) >= 60, "replies to requests sent after the slow ones")
                await asyncio.to_thread(stack.stop_process, "backend-h2")
                # The bridge has dropped h2's tunnel once the slow requests it held are answered
                # (with error replies, long before the others' 1.5 s): what is sent from then on
                # cannot be on that tunnel.
                await wait_for(lambda: sum(f.done() for f in slow) >= slow_count // 3, "the error replies of the slow requests on h2")
                killed_at = time.monotonic()
                return await asyncio.gather(*slow)

            slow_replies, *_ = await asyncio.gather(killer(), *(worker(w) for w in range(workers)))
            still_open = not c.closed
            last = await call(b"last")
        return sent, log, killed_at, slow_replies, still_open, last

    sent, log, killed_at, slow_replies, still_open, last = run(main())
    outcomes = [o for _, o in log] + slow_replies
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} of {sent + slow_count} requests got no reply, e.g. {failures[:3]}"
    assert len(log) == sent == total
    errors = Counter(r.rsp_code for r in outcomes if r.rsp_code != 0)
    assert set(errors) <= ERROR_RSP_CODES, errors

    # The slow requests: the three h2 held get one error reply each, the others their response.
    slow_ok = Counter(host_of(r) for r in slow_replies if r.rsp_code == 0)
    slow_failed = [r.rsp_code for r in slow_replies if r.rsp_code != 0]
    assert slow_ok == {"h0": 3, "h1": 3} and slow_failed == [ERROR_CODES[ErrorType.UNSPECIFIED]] * 3, (slow_ok, slow_replies)

    before = Counter(host_of(r) for t, r in log if t < killed_at and r.rsp_code == 0)
    after = [r for t, r in log if t > killed_at]
    after_hosts = Counter(host_of(r) for r in after if r.rsp_code == 0)
    assert before["h2"] > 0, before  # h2 did serve before it was stopped
    assert len(after) >= total // 2, (len(after), total)  # most of the traffic came after the kill
    assert set(after_hosts) <= {"h0", "h1"}, after_hosts
    assert min(after_hosts["h0"], after_hosts["h1"]) > 0.2 * len(after), after_hosts  # both take traffic
    # Requests sent after h2's tunnel was dropped go to a new tunnel for its slot (or, when that
    # one fails to connect to h2, are moved to another slot), so h0 or h1 answers them.
    after_errors = Counter(r.rsp_code for r in after if r.rsp_code != 0)
    assert not after_errors, f"{sum(after_errors.values())} of {len(after)} requests sent after h2's tunnel was dropped got error replies: {dict(after_errors)}"
    assert still_open and not isinstance(last, BaseException) and host_of(last) in {"h0", "h1"}, (still_open, last)
    print(f"before the kill: {dict(before)}; after: {dict(after_hosts)} of {len(after)}; error replies: {dict(errors)}")


# ---- consistent hashing ---------------------------------------------------------------------------------

KEYS = range(1000, 2000)  # awesomerpc's one routable header is cmd: 1000 cmds are 1000 hash keys
KEY_CONNECTIONS = 8  # Envoy spreads them over the bridge workers (4 each with 2 workers), in-process over its own


def start_hashed_stack(tmp, lb_policy: str, workers: int, mode: str = "ext_proc") -> Stack:
    """``workers`` bridge worker processes, in-process that many Envoy workers."""
    ports = {name: free_port() for name in HOSTS}
    cfg = awesomerpc_config(free_port(), {}, [{"route": {"cluster": "ring"}, "hash_policy": ["cmd"]}], request_timeout="5s")
    if mode == "ext_proc":
        cfg["bridge"] = {"workers": workers}
    # Every key a connection has not seen yet costs a tunnel (an upstream connection) until its
    # host is known: 8 connections learning 375 keys each need more than Envoy's default 1024.
    breakers = {"max_connections": 20000, "max_pending_requests": 20000}
    health = {"interval": "200ms", "timeout": "200ms", "unhealthy_threshold": 1}
    cfg["clusters"] = [multi_endpoint_cluster("ring", [ports[h] for h in HOSTS], lb_policy=lb_policy, circuit_breakers=breakers, health_check=health)]
    stack = stack_class(mode)(tmp, cfg, ports)
    stack.concurrency = workers  # Envoy's workers (InProcessStack only)
    stack.listen_port = cfg["listeners"][0]["port"]
    return stack.start()


async def hosts_of_keys(stack: Stack, keys, connections: int = KEY_CONNECTIONS, rounds: int = 3) -> dict[int, set[str]]:
    """Send every key on ``rounds`` of the ``connections`` (fresh ones), all connections at once:
    key -> the hosts that answered it."""
    keys = list(keys)
    seen: dict[int, set[str]] = {k: set() for k in keys}
    clients = [await connect(stack) for _ in range(connections)]

    async def send(i: int, client: AwesomeRpcClient) -> None:
        for round_ in range(rounds):
            mine = keys[(i + round_) % connections :: connections]
            for start in range(0, len(mine), 10):
                batch = mine[start : start + 10]
                for key, reply in zip(batch, await asyncio.gather(*(client.call(k, b"x") for k in batch))):
                    seen[key].add(host_of(reply))

    try:
        await asyncio.gather(*(send(i, c) for i, c in enumerate(clients)))
    finally:
        for c in clients:
            c.close()
            await c.wait_closed()
    return seen


def envoy_clusters(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/clusters", timeout=2) as r:
        return r.read().decode()


def one_host_per_key(seen: dict[int, set[str]], what: str) -> dict[int, str]:
    split = {k: sorted(h) for k, h in seen.items() if len(h) != 1}
    assert not split, f"{what}: {len(split)} keys answered by more than one host across connections, e.g. {list(split.items())[:5]}"
    return {k: next(iter(h)) for k, h in seen.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lb_policy", ["RING_HASH", "MAGLEV"])
def test_consistent_hashing_across_connections_and_workers_and_only_a_lost_hosts_keys_move(tmp_path, lb_policy, mode):
    """1000 keys, each sent on 3 of 8 connections spread over 2 bridge workers: one host per key,
    keys spread over the 3 hosts. Then h2 is stopped and Envoy's health check marks it down: every
    key of h0 and h1 stays where it was; h2's keys go to h0 and h1, one host per key again. Once h2
    is back and healthy, every key is on its first host again."""
    stack = start_hashed_stack(tmp_path, lb_policy, workers=2, mode=mode)
    try:
        placement = one_host_per_key(run(hosts_of_keys(stack, KEYS)), "all hosts up")
        shares = {h: sum(1 for p in placement.values() if p == h) / len(placement) for h in HOSTS}
        assert all(0.20 <= share <= 0.47 for share in shares.values()), shares
        # Both bridge workers carried connections (Envoy's cx_total per worker address); in-process
        # there is no bridge cluster.
        workers = {}
        for line in envoy_clusters(stack).splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "metabridge_bridge" and parts[2] == "cx_total":
                workers[parts[1]] = int(parts[3])
        if mode == "ext_proc":
            assert len(workers) == 2 and min(workers.values()) >= KEY_CONNECTIONS // 2 - 1, f"connections per bridge worker: {workers}"

        stack.stop_process("backend-h2")
        down = f"ring::127.0.0.1:{stack.backends['h2']}::health_flags::/failed_active_hc"
        wait_until(lambda: down in envoy_clusters(stack), 10, "Envoy's health check marking h2 down")
        after = one_host_per_key(run(hosts_of_keys(stack, KEYS)), "h2 down")
        moved = {k: (placement[k], after[k]) for k in KEYS if placement[k] != "h2" and after[k] != placement[k]}
        assert not moved, f"{len(moved)} keys of the surviving hosts moved (before, after), e.g. {list(moved.items())[:5]}"
        lost = [k for k in KEYS if placement[k] == "h2"]
        landed = Counter(after[k] for k in lost)
        assert set(landed) <= {"h0", "h1"} and sum(landed.values()) == len(lost), landed

        # h2 back: the ring never changed, so every key is where it was at first again.
        stack.start_backend("h2", stack.backends["h2"])
        up = f"ring::127.0.0.1:{stack.backends['h2']}::health_flags::healthy"
        wait_until(lambda: up in envoy_clusters(stack), 10, "Envoy's health check marking h2 up")
        back = one_host_per_key(run(hosts_of_keys(stack, KEYS)), "h2 back")
        returned = {k: (placement[k], back[k]) for k in KEYS if back[k] != placement[k]}
        assert not returned, f"{len(returned)} keys not on their first host once h2 is back (first, now), e.g. {list(returned.items())[:5]}"
        if mode == "inprocess":  # both Envoy workers carried some of the 24 connections (and the harness's one probe)
            workers = {n: stack.envoy_stat(f"listener.127.0.0.1_{stack.listen_port}.worker_{n}.downstream_cx_total") for n in range(2)}
            assert min(workers.values()) > 0 and sum(workers.values()) == 3 * KEY_CONNECTIONS + 1, f"connections per Envoy worker: {workers}"
        print(f"{lb_policy}: shares {shares}; h2's {len(lost)} keys went to {dict(landed)}; bridge workers' connections {workers}")
    finally:
        stack.stop()
