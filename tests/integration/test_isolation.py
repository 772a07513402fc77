"""One client's traffic must not cost another client its connection, and a tunnel asked for a
given endpoint reaches it when it can, through a real Envoy.

Flood isolation (Envoy + bridge): Envoy's gRPC client puts every ext_proc stream of a worker on
one HTTP/2 connection to the bridge unless told otherwise, and resets that whole connection when
its outbound-frame flood limit trips, which closes every client of the listener. The rendered
bootstrap gives each stream its own connection; these tests flood beside a healthy client.

Host override (Envoy alone): the listener's chain minus ext_proc, so the test speaks HTTP/2
CONNECT to the connection manager itself, as the bridge does, and reads which endpoint each
tunnel reached.

The flood tests run in both bridge modes (ext_proc and inprocess): the per-connection bounds are
the core's; in-process there is no gRPC connection to share, and the partial frames have reached
the core once Envoy has read them. Host override runs once: it has no bridge in either mode (the
connection manager alone, the same in both).
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from metabridge.config import bootstrap as envoy_config
from metabridge.wire import CLUSTER_HEADER, HOST_OVERRIDE_HEADER, UPSTREAM_HOST_HEADER
from examples.awesomerpc.client import AwesomeRpcClient, encode_frame
from examples.awesomerpc.protocol import HEADER_SIZE
from tests.integration.both_modes import in_process
from tests.integration.harness import MODES, Stack, awesomerpc_config, free_port, multi_endpoint_cluster, stack_class, wait_until

BIG_BODY = 4 * 1024 * 1024 - 64  # the frame stays within the example backend's 4 MiB limit
FLOOD_REQUESTS = 60  # 240 MiB written at once: measured to trip Envoy's flood limit on a shared connection
PARTIAL_HOLDERS = 44  # 176 MiB of partial frames: measured to do the same
DEADLINE = 90.0  # seconds any one flood scenario may take
BRIDGE_TX_BYTES = f"cluster.{envoy_config.BRIDGE_CLUSTER}.upstream_cx_tx_bytes_total"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, DEADLINE + 30))


@pytest.fixture
def flood_stack(tmp_path, mode):
    """Envoy + bridge + one backend; the listener takes frames of 4 MiB and more."""
    port = free_port()
    backends = {"v1": free_port()}
    cfg = awesomerpc_config(
        port,
        backends,
        [{"route": {"cluster": "v1"}}],
        max_frame_size="8MiB",
        request_timeout="30s",
        frame_timeout="60s",  # the partial frames must outlast the test, not the bridge's timer
    )
    stack = stack_class(mode)(tmp_path, cfg, backends)
    stack.listen_port = port
    try:
        yield stack.start()
    finally:
        stack.stop()


async def until(check, timeout: float, what: str, beside: asyncio.Task) -> None:
    """Poll ``check`` (run in a thread: it may block) until it holds, at most ``timeout`` s;
    ``beside`` failing (the healthy client's calls) fails the wait at once."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if beside.done():
            beside.result()  # raises what ended it
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # the poll loop's interval


async def keep_calling(client: AwesomeRpcClient, stop: asyncio.Event, answered: list[int] | None = None) -> int:
    """Calls one after another until ``stop``; every one must be answered by the backend.
    ``answered`` (a one-item list) counts them as they come, for a test waiting for calls."""
    answered = answered if answered is not None else [0]
    deadline = time.monotonic() + DEADLINE
    while not stop.is_set():
        assert time.monotonic() < deadline, f"the flood outlasted {DEADLINE} s"
        body = f"healthy-{answered[0]}".encode()
        reply = await client.call(1, body, timeout=15)  # ConnectionClosed here is the failure
        assert (reply.rsp_code, reply.body) == (0, b"v1|" + body), reply
        answered[0] += 1
    return answered[0]


async def read_frames(reader: asyncio.StreamReader, count: int) -> tuple[int, int, bool]:
    """Up to ``count`` awesomerpc frames: (answered OK, error replies, connection closed)."""
    ok = errors = 0
    try:
        for _ in range(count):
            header = await reader.readexactly(HEADER_SIZE)
            length = int.from_bytes(header[5:9], "big")
            body = await reader.readexactly(length - HEADER_SIZE)
            if int.from_bytes(header[11:13], "big", signed=True) == 0 and len(body) == BIG_BODY + 3:
                ok += 1
            else:
                errors += 1
    except (asyncio.IncompleteReadError, ConnectionError):
        return ok, errors, True
    return ok, errors, False


async def flood(port: int) -> tuple[int, int, bool]:
    """FLOOD_REQUESTS valid 4 MiB requests on one connection, written without waiting."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"f" * BIG_BODY
    try:
        for flow in range(1, FLOOD_REQUESTS + 1):
            writer.write(encode_frame(flow, 1, body))
        try:
            await writer.drain()
        except ConnectionError:
            return 0, 0, True
        return await read_frames(reader, FLOOD_REQUESTS)
    finally:
        writer.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_flooding_client_leaves_other_connections_open(flood_stack):
    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", flood_stack.listen_port) as healthy:
            assert (await healthy.call(1, b"first")).body == b"v1|first"
            stop = asyncio.Event()
            calls = asyncio.create_task(keep_calling(healthy, stop))
            flooded = await asyncio.wait_for(flood(flood_stack.listen_port), DEADLINE)
            stop.set()
            during = await calls
            last = await healthy.call(1, b"last")
            return flooded, during, last, healthy.closed

    (ok, errors, flooder_closed), during, last, closed = run(main())
    # The flooder may be served, answered OVER_LIMIT or closed: whatever happens is its own.
    print(f"flooder: {ok} answered, {errors} error replies, closed={flooder_closed}; healthy calls during the flood: {during}")
    assert during >= 5, "the healthy client's calls did not overlap the flood"
    assert last.body == b"v1|last" and not closed


def unread_bytes(port: int) -> int:
    """Bytes on their way to the process listening on ``port`` (loopback, IPv4) and not yet read
    by it: its connections' receive queues plus the peers' send queues (/proc/net/tcp)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        tx_queue, rx_queue = (int(q, 16) for q in fields[4].split(":"))
        if state != "01":  # ESTABLISHED
            continue
        if int(local.rpartition(":")[2], 16) == port:
            total += rx_queue
        elif int(remote.rpartition(":")[2], 16) == port:
            total += tx_queue
    return total


@pytest.mark.parametrize("mode", MODES)
def test_clients_holding_partial_frames_leave_other_connections_open(flood_stack):
    partial = encode_frame(1, 1, b"p" * BIG_BODY)[:-1]  # one byte short of a whole frame

    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", flood_stack.listen_port) as healthy:
            assert (await healthy.call(1, b"first")).body == b"v1|first"
            stop, answered = asyncio.Event(), [0]
            calls = asyncio.create_task(keep_calling(healthy, stop, answered))
            sent_before = 0 if in_process(flood_stack) else flood_stack.envoy_stat(BRIDGE_TX_BYTES)
            holders = [await asyncio.open_connection("127.0.0.1", flood_stack.listen_port) for _ in range(PARTIAL_HOLDERS)]
            try:
                for _, writer in holders:
                    writer.write(partial)
                await asyncio.gather(*(writer.drain() for _, writer in holders))
                # Envoy has passed (nearly) all of it on to the bridge, while the healthy client called;
                # in-process the core takes the bytes Envoy reads, so all but 1 MiB of the 176 MiB read.
                if in_process(flood_stack):
                    reached = lambda: unread_bytes(flood_stack.listen_port) < 1024 * 1024  # noqa: E731
                else:
                    reached = lambda: flood_stack.envoy_stat(BRIDGE_TX_BYTES) - sent_before >= PARTIAL_HOLDERS * len(partial)  # noqa: E731
                await until(
                    reached,
                    DEADLINE,
                    "the partial frames to reach the bridge",
                    beside=calls,
                )
                # ... and the healthy client goes on being answered while they are held.
                reached_at = answered[0]
                await until(lambda: answered[0] >= reached_at + 5, DEADLINE, "five healthy calls beside the held partial frames", beside=calls)
                stop.set()
                during = await calls
                still_open = sum(1 for reader, writer in holders if not reader.at_eof() and not writer.is_closing())
                # A holder's frame, completed now, is answered: its state survived the others.
                reader, writer = holders[0]
                writer.write(encode_frame(1, 1, b"p" * BIG_BODY)[-1:])
                reply = await asyncio.wait_for(reader.readexactly(len(encode_frame(1, 1, b"v1|" + b"p" * BIG_BODY))), 30)
            finally:
                for _, writer in holders:
                    writer.close()
            last = await healthy.call(1, b"last")
            return during, still_open, reply, last, healthy.closed

    during, still_open, reply, last, closed = run(main())
    assert during >= 5, "the healthy client's calls did not overlap the partial frames"
    assert still_open == PARTIAL_HOLDERS
    assert reply == encode_frame(1, 1, b"v1|" + b"p" * BIG_BODY)
    assert last.body == b"v1|last" and not closed


# ---- host override: HTTP/2 CONNECT straight to the connection manager ----------------------

HOSTS = ("h0", "h1", "h2")
NOT_IN_CLUSTER = "127.0.0.1:1"
FALLBACK_TUNNELS = 30  # enough that RANDOM reaches every host but with odds of about 1e-5


def render_without_ext_proc(config, **options) -> str:
    """The rendered bootstrap, minus the ext_proc filter in front of the connection manager."""
    bootstrap = envoy_config.build_bootstrap(config, **options)
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            chain["filters"] = [f for f in chain["filters"] if f["name"] != "envoy.filters.network.ext_proc"]
    return yaml.safe_dump(bootstrap, sort_keys=False)


@pytest.fixture
def hcm_stack(tmp_path, monkeypatch):
    """Factory: hcm_stack(lb_policy) -> Envoy in front of backends h0, h1, h2 (cluster "pool",
    TCP health check every 200 ms), without ext_proc and without a bridge."""
    monkeypatch.setattr(envoy_config, "render_yaml", render_without_ext_proc)
    started: list[Stack] = []

    def make(lb_policy: str) -> Stack:
        ports = {name: free_port() for name in HOSTS}
        cfg = awesomerpc_config(free_port(), {}, [])
        health = {"interval": "200ms", "timeout": "200ms", "unhealthy_threshold": 1, "healthy_threshold": 1}
        cfg["clusters"] = [multi_endpoint_cluster("pool", list(ports.values()), lb_policy=lb_policy, health_check=health)]
        stack = Stack(tmp_path, cfg, ports)
        started.append(stack)
        stack.listen_port = cfg["listeners"][0]["port"]
        stack.addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        for name, port in ports.items():
            stack.start_backend(name, port)
        stack.start_envoy()
        return stack

    yield make
    for stack in started:
        stack.stop()


def host_health(stack: Stack, address: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/clusters", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"pool::{address}::health_flags::"):
                return line.rpartition("::")[2]
    return "absent"


def tunnel(port: int, host: str | None) -> tuple[dict[str, str], bytes]:
    """One CONNECT to cluster "pool" (naming ``host`` if given) carrying one awesomerpc request
    sent with the headers, before the 200, as the bridge sends it: (response headers, reply)."""
    request = encode_frame(7, 1, b"where")
    fields = [(":method", "CONNECT"), (":authority", "pool"), (CLUSTER_HEADER, "pool")]
    if host is not None:
        fields.append((HOST_OVERRIDE_HEADER, host))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, fields)
        conn.send_data(stream, request)
        sock.sendall(conn.data_to_send())
        headers: dict[str, str] = {}
        reply = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    reply += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
            if ended or (headers and headers[":status"] != "200") or len(reply) >= HEADER_SIZE + len(b"hX|where"):
                break
    return headers, reply


def answered_by(headers: dict[str, str], reply: bytes, addresses: dict[str, str]) -> str:
    """The backend that answered the tunnel's request; its address must be the one Envoy names."""
    assert headers.get(":status") == "200", headers
    name = reply[HEADER_SIZE:].partition(b"|")[0].decode()
    assert reply == encode_frame(7, 1, f"{name}|where".encode()), reply
    assert headers[UPSTREAM_HOST_HEADER] == addresses[name], (headers, name)
    return name


@pytest.mark.parametrize("lb_policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
def test_host_override_reaches_the_named_host_else_the_lb_policy_picks(hcm_stack, lb_policy):
    stack = hcm_stack(lb_policy)
    addresses = stack.addresses
    wait_until(lambda: all(host_health(stack, a) == "healthy" for a in addresses.values()), 10, "every host healthy")

    def reached(host: str | None, count: int) -> list[str]:
        return [answered_by(*tunnel(stack.listen_port, host), addresses) for _ in range(count)]

    assert reached(addresses["h1"], 10) == ["h1"] * 10
    assert reached(addresses["h2"], 10) == ["h2"] * 10
    # An endpoint the cluster does not have, or no header: the cluster's lb_policy chooses.
    assert set(reached(NOT_IN_CLUSTER, FALLBACK_TUNNELS)) == set(HOSTS)
    assert set(reached(None, FALLBACK_TUNNELS)) == set(HOSTS)

    # h1 goes down and its health check says so: a tunnel asked for it lands on a healthy host,
    # and the request it carried is answered there.
    stack.stop_process("backend-h1")
    wait_until(lambda: "failed_active_hc" in host_health(stack, addresses["h1"]), 10, "h1 marked unhealthy")
    fallback = reached(addresses["h1"], FALLBACK_TUNNELS)
    retried = stack.envoy_stat("cluster.pool.upstream_rq_retry")
    assert set(fallback) == {"h0", "h2"}, f"{fallback} (retries: {retried})"
