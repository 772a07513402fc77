"""Streams through a real Envoy and the bridge: the streamrpc example protocol and its example config.

Semantics under test: a stream's INIT is routed once and binds the stream to one upstream tunnel;
its DATA follow it; HALF_CLOSE (STREAM_CLOSE_ONE_WAY) ends one side, CLOSE (STREAM_CLOSE_TWO_WAY)
both; a stream counts as one request in flight (the request_active gauge, read from the admin
endpoint's /metrics: the bridge's, or in-process the one served inside Envoy).

examples/streamrpc/streamrpc.yaml routes sum and count to streamrpc-v1, echo to streamrpc-v2 (with
the request_mutation x-routed-by=metabridge on its INIT) and whoami to streamrpc-v1. One stack
serves the whole module in each mode (starting Envoy and the bridge takes seconds); every test
uses its own client connections, and the backends are servers in the test process the tests can
stop and restart.

Every test runs in both modes (the module's stack is parametrized): the bridge process behind
ext_proc, and the core inside Envoy (bridge.mode inprocess, docs/inprocess.md). Nothing here is
about the bridge as a separate process.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from examples.streamrpc.client import StreamRpcClient
from examples.streamrpc.protocol import FrameType
from examples.streamrpc.server import StreamRpcServer, serve
from tests.integration.harness import MODES, REPO, Stack, example_config, free_port, port_open, stack_class, wait_until

LISTENER = "streamrpc"
PAIR_LISTENER = "streamrpc-pair"


class StreamProxy:
    def __init__(self, stack: Stack, port: int, pair_port: int, metrics_port: int, servers: dict[str, StreamRpcServer]) -> None:
        self.stack = stack
        self.port = port
        self.pair_port = pair_port  # listener PAIR_LISTENER: every method to the two hosts of streamrpc-pair
        self.metrics_port = metrics_port
        self.servers = servers  # "v1" / "v2" -> the backend of streamrpc-v1 / streamrpc-v2; "a" / "b" -> streamrpc-pair's
        self.stopped: set[str] = set()

    def client(self, timeout: float = 5.0, port: int | None = None) -> StreamRpcClient:
        return StreamRpcClient("127.0.0.1", port or self.port, timeout=timeout)

    def metric(self, name: str) -> float:
        """metabridge_<name>{listener="streamrpc"} from the admin endpoint's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        m = re.search(rf'^metabridge_{name}{{listener="{LISTENER}"}} ([0-9.e+-]+)$', text, re.M)
        assert m, f"metabridge_{name} not exported"
        return float(m.group(1))

    def wait_active(self, n: int, what: str) -> None:
        wait_until(lambda: self.metric("request_active") == n, 5, f"request_active == {n} ({what})")

    def stop_backend(self, name: str) -> None:
        self.stopped.add(name)
        self.servers[name].stop()

    def restart(self, name: str) -> None:
        """Start backend ``name`` again on its old port, if a test stopped it."""
        if name in self.stopped:
            self.servers[name] = serve("127.0.0.1", self.servers[name].port, name)
            self.stopped.discard(name)


@pytest.fixture(scope="module", params=MODES)
def proxy(request, tmp_path_factory):
    mode = request.param
    servers = {name: serve("127.0.0.1", 0, name) for name in ("v1", "v2", "a", "b")}
    port, pair_port, metrics_port = free_port(), free_port(), free_port()
    cfg = example_config("examples/streamrpc/streamrpc.yaml", {LISTENER: port}, {"streamrpc-v1": servers["v1"].port, "streamrpc-v2": servers["v2"].port})
    # The example's ref is ".:StreamRpcCodec" (its own folder); Stack writes the config elsewhere.
    cfg["codecs"]["streamrpc"]["ref"] = f"{REPO / 'examples' / 'streamrpc'}:StreamRpcCodec"
    cfg["bridge"].update(mode=mode, metrics_port=metrics_port)
    # Beside the example: a listener whose one cluster has two hosts, balanced per request.
    cfg["listeners"].append({**cfg["listeners"][0], "name": PAIR_LISTENER, "port": pair_port, "routes": [{"route": {"cluster": "streamrpc-pair"}}]})
    cfg["clusters"].append({"name": "streamrpc-pair", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN", "endpoints": [{"address": "127.0.0.1", "port": servers[n].port} for n in ("a", "b")]})
    stack = stack_class(mode)(tmp_path_factory.mktemp(f"streaming-{mode}"), cfg)
    try:
        stack.start()
        wait_until(lambda: port_open(metrics_port), 10, "the admin endpoint", stack.procs["bridge" if mode == "ext_proc" else "envoy"])
        yield StreamProxy(stack, port, pair_port, metrics_port, servers)
    finally:
        stack.stop()
        for server in servers.values():
            server.stop()


@pytest.fixture
def p(proxy):
    """The module's proxy, with both backends running and nothing in flight before and after."""
    for name in proxy.servers:
        proxy.restart(name)
    proxy.wait_active(0, "before the test")
    yield proxy
    for name in proxy.servers:
        proxy.restart(name)


def data_bodies(frames) -> list[bytes]:
    return [f.body for f in frames if f.type is FrameType.DATA]


def assert_clean_end(frames, end: FrameType, server: str) -> None:
    assert frames[-1].type is end and not frames[-1].error, frames[-1]
    assert {f.headers.get("server") for f in frames} == {server}, frames


def test_client_server_and_bidi_streams_interleaved_with_unary_calls(p):
    seen_v2 = len(p.servers["v2"].seen)
    with p.client() as c:
        # Alone first: each kind of stream on its own.
        total = c.open_stream("sum")
        for n in (1, 2, 3):
            total.send(str(n).encode())
        total.half_close()
        frames = total.recv_until_closed()
        assert data_bodies(frames) == [b"6"]
        assert_clean_end(frames, FrameType.CLOSE, "v1")

        counter = c.open_stream("count", b"4")
        frames = counter.recv_until_closed()
        assert data_bodies(frames) == [b"0", b"1", b"2", b"3"]
        assert_clean_end(frames, FrameType.CLOSE, "v1")

        echo = c.open_stream("echo")
        echo.send(b"ping")
        assert echo.recv().body == b"ping"
        echo.half_close()
        frames = echo.recv_until_closed()
        assert_clean_end(frames, FrameType.HALF_CLOSE, "v2")

        # Then all three open at once on this connection, their frames interleaved with unary
        # calls, and their answers read in an order unlike the one they were sent in.
        total = c.open_stream("sum")
        echo = c.open_stream("echo")
        counter = c.open_stream("count", b"50")
        replies = []
        for i in range(10):
            total.send(str(i).encode())
            echo.send(f"e{i}".encode())
            replies.append(c.call("whoami", headers={"n": str(i)}))
            assert echo.recv().body == f"e{i}".encode()
        # Two streams wait for their client (sum, echo); count may still be running: the
        # bridge holds each stream as one request, whatever number of frames it carried.
        assert p.metric("request_active") in (2, 3)
        echo.half_close()
        total.half_close()
        count_frames = counter.recv_until_closed()
        echo_frames = echo.recv_until_closed()
        sum_frames = total.recv_until_closed()
        assert c.call("whoami").body == b"v1"  # the connection goes on after its streams

    assert all(r.type is FrameType.RESPONSE and not r.error and r.body == b"v1" and r.headers["server"] == "v1" for r in replies), replies
    assert [r.headers["n"] for r in replies] == [str(i) for i in range(10)]
    assert data_bodies(sum_frames) == [str(sum(range(10))).encode()]
    assert_clean_end(sum_frames, FrameType.CLOSE, "v1")
    assert data_bodies(count_frames) == [str(i).encode() for i in range(50)]
    assert_clean_end(count_frames, FrameType.CLOSE, "v1")
    assert echo_frames == [echo_frames[0]] and echo_frames[0].type is FrameType.HALF_CLOSE
    assert echo_frames[0].headers["server"] == "v2"

    # The route's request_mutation reached v2 on both echo INITs, and only there; the stream's
    # DATA frames are not INITs and are passed on unchanged (server.seen holds INITs and REQUESTs).
    echo_inits = p.servers["v2"].seen[seen_v2:]
    assert [f.type for f in echo_inits] == [FrameType.INIT, FrameType.INIT]
    assert all(f.headers.get("x-routed-by") == "metabridge" and f.headers["method"] == "echo" for f in echo_inits), echo_inits
    assert not any("x-routed-by" in f.headers for f in p.servers["v1"].seen)
    p.wait_active(0, "every stream ended")


def test_each_stream_stays_on_the_host_its_init_was_routed_to(p):
    """Two hosts behind one cluster, requests balanced over them: each stream's INIT picks a host
    once and every later frame of the stream goes the same way (a DATA balanced on its own would
    reach a host that never saw the INIT: an unknown_stream error, or a wrong sum)."""
    with p.client(port=p.pair_port) as c:
        streams = [c.open_stream("sum") for _ in range(6)]
        echoes = [c.open_stream("echo") for _ in range(2)]
        whoami = []
        for k in range(1, 6):
            for i, stream in enumerate(streams):
                stream.send(str(k * (i + 1)).encode())
            for echo in echoes:
                echo.send(f"{echo.id}:{k}".encode())
            whoami.append(c.call("whoami").body)
            for echo in echoes:
                assert echo.recv().body == f"{echo.id}:{k}".encode()
        for stream in streams + echoes:
            stream.half_close()
        results = [stream.recv_until_closed() for stream in streams]
        echo_ends = [echo.recv_until_closed() for echo in echoes]
    hosts = set()
    for i, frames in enumerate(results):
        assert data_bodies(frames) == [str(15 * (i + 1)).encode()], frames
        assert frames[-1].type is FrameType.CLOSE and not frames[-1].error, frames
        [host] = {f.headers["server"] for f in frames}
        hosts.add(host)
    for frames in echo_ends:
        assert [f.type for f in frames] == [FrameType.HALF_CLOSE] and not frames[0].error, frames
    assert hosts == {"a", "b"}, "the streams were not spread over both hosts: the binding was not exercised"
    assert set(whoami) <= {b"a", b"b"}


def test_stream_whose_upstream_dies_gets_an_error_and_the_connection_goes_on(p):
    v1 = p.servers["v1"]
    mark = len(v1.seen)
    with p.client() as c:
        doomed = c.open_stream("sum")  # v1
        doomed.send(b"5")
        survivor = c.open_stream("echo")  # v2
        survivor.send(b"a")
        assert survivor.recv().body == b"a"
        wait_until(lambda: any(f.id == doomed.id and f.headers.get("method") == "sum" for f in v1.seen[mark:]), 5, "v1 got the sum INIT")
        p.wait_active(2, "two open streams")

        p.stop_backend("v1")  # the sum stream's upstream connection dies mid-stream
        error = doomed.recv()
        assert error.type is FrameType.CLOSE and error.error, error
        assert error.headers.get("code") == "unspecified" and "server" not in error.headers, error  # the bridge's frame
        p.wait_active(1, "the dead stream freed")
        # The bridge no longer knows the stream: more DATA for it is answered, not forwarded.
        doomed.send(b"6")
        unknown = doomed.recv()
        assert unknown.type is FrameType.CLOSE and unknown.error and b"no open stream" in unknown.body, unknown

        # The other stream on the same connection is untouched ...
        survivor.send(b"b")
        assert survivor.recv().body == b"b"
        survivor.half_close()
        assert_clean_end(survivor.recv_until_closed(), FrameType.HALF_CLOSE, "v2")
        # ... a new stream to the other backend works ...
        fresh = c.open_stream("echo")
        fresh.send(b"c")
        fresh.half_close()
        frames = fresh.recv_until_closed()
        assert data_bodies(frames) == [b"c"]
        assert_clean_end(frames, FrameType.HALF_CLOSE, "v2")
        # ... v1's cluster answers with an error while its backend is down ...
        down = c.call("whoami")
        assert down.type is FrameType.RESPONSE and down.error and down.headers.get("code") == "unspecified", down
        # ... and once it is back, a new stream reaches it through a new tunnel.
        p.restart("v1")
        again = c.open_stream("sum")
        again.send(b"7")
        again.half_close()
        frames = again.recv_until_closed()
        assert data_bodies(frames) == [b"7"]
        assert_clean_end(frames, FrameType.CLOSE, "v1")
    p.wait_active(0, "every stream ended")


def test_client_cancel_frees_the_stream(p):
    with p.client() as c:
        # A server stream that would run for ever, cancelled while its DATA flow.
        endless = c.open_stream("count", b"1000000000")
        assert [endless.recv().body for _ in range(3)] == [b"0", b"1", b"2"]
        idle = c.open_stream("echo")
        idle.send(b"x")
        assert idle.recv().body == b"x"
        p.wait_active(2, "two open streams")
        endless.cancel()
        idle.cancel()
        p.wait_active(0, "both streams cancelled")
        # The bridge forgot both: DATA for them is answered as for an unknown stream (DATA the
        # count stream sent before its cancel arrived may still come first).
        for stream in (endless, idle):
            stream.send(b"1")
            frame = stream.recv()
            while frame.type is FrameType.DATA and stream is endless:
                frame = stream.recv()
            assert frame.type is FrameType.CLOSE and frame.error and b"no open stream" in frame.body, frame
        # New streams (new ids) on the same connection work.
        counter = c.open_stream("count", b"3")
        frames = counter.recv_until_closed()
        assert data_bodies(frames) == [b"0", b"1", b"2"]
        assert_clean_end(frames, FrameType.CLOSE, "v1")
        echo = c.open_stream("echo")
        echo.send(b"y")
        echo.half_close()
        assert data_bodies(echo.recv_until_closed()) == [b"y"]
        assert c.call("whoami").body == b"v1"
    p.wait_active(0, "every stream ended")
