"""Faults and limits through a real Envoy and the bridge (awesomerpc), each beside a healthy client.

Every test runs a healthy client on another connection of the same listener for the whole fault;
each of its requests must succeed. One stack serves the module (starting Envoy and the bridge
takes seconds), with one listener per fault:

    broken   tests/integration/broken_codec.py: decode raises a plain exception for cmd 66,
             on_error for cmd 67 (no route, so the bridge must build a local reply for it)
    slow     frame_timeout 1s (slowloris)
    big      max_frame_size 2MiB, request_timeout 2s; cmd 5 goes to "blackhole", a backend
             that accepts connections and never reads, cmd 6 to "sink", one that reads
             everything and never answers

Counters come from the bridge's Prometheus endpoint (bridge.metrics_port), events from its JSON log.

Every test runs in both bridge modes (ext_proc and inprocess), one stack per mode: the bounds are
the core's. In-process the core's process is Envoy's, so the memory measured is Envoy's (its own
buffers included), a fresh start for a memory test restarts Envoy, and the admin endpoint and the
JSON log are Envoy's.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.awesomerpc.client import encode_frame
from tests.integration.broken_codec import DECODE_BUG_CMD, ON_ERROR_BUG_CMD
from tests.integration.both_modes import core_process, in_process
from tests.integration.harness import MODES, REPO, Stack, free_port, port_open, read_until_closed, stack_class, wait_until

HEADER = struct.Struct("!BIIhh")  # version, flow, len, cmd, rsp_code
CMD_OK = 1  # -> v1 (every listener)
CMD_SLOW = 98  # -> v1, which sleeps <body> ms before answering
CMD_BLACKHOLE = 5  # -> blackhole (listener "big")
CMD_SINK = 6  # -> sink (listener "big")
CMD_OK_LONG = 7  # -> v1 with a 30 s route timeout (listener "big")
OVER_LIMIT, TIMEOUT = 429, 504
MiB = 1024 * 1024


def route(cmd: int, cluster: str, **options) -> dict:
    return {"match": {"headers": [{"name": "cmd", "exact": str(cmd)}]}, "route": {"cluster": cluster}, **options}


def parse_replies(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Whole awesomerpc frames in ``data`` as (flow, cmd, rsp_code, body); a cut-off tail is an error."""
    replies, at = [], 0
    while at < len(data):
        _, flow, length, cmd, rsp_code = HEADER.unpack_from(data, at)
        assert at + length <= len(data), f"a reply cut short: {len(data) - at} of {length} bytes"
        replies.append((flow, cmd, rsp_code, data[at + HEADER.size : at + length]))
        at += length
    return replies


class BlockingClient:
    """One awesomerpc connection, one call at a time."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = bytearray()
        self.flow = 0

    def call(self, cmd: int, body: bytes) -> tuple[int, int, int, bytes]:
        self.flow += 1
        self.sock.sendall(encode_frame(self.flow, cmd, body))
        while len(self.buffer) < HEADER.size or len(self.buffer) < HEADER.unpack_from(self.buffer)[2]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the proxy")
            self.buffer += chunk
        length = HEADER.unpack_from(self.buffer)[2]
        reply = parse_replies(bytes(self.buffer[:length]))[0]
        del self.buffer[:length]
        return reply

    def close(self) -> None:
        self.sock.close()


class HealthyClient(threading.Thread):
    """Calls cmd 1 on its own connection every ``pace`` seconds until stopped; records every outcome."""

    def __init__(self, port: int, pace: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.pace = pace
        self.sent = 0
        self.ok: list[float] = []  # when each successful call completed
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            client = BlockingClient(self.port)
        except OSError as exc:
            self.failures.append(f"connect: {exc}")
            return
        try:
            while not self._halt.is_set():
                body = f"healthy-{self.sent}".encode()
                self.sent += 1
                try:
                    flow, cmd, rsp_code, reply = client.call(CMD_OK, body)
                except OSError as exc:
                    self.failures.append(f"call {self.sent}: {type(exc).__name__}: {exc}")
                    return
                if (flow, cmd, rsp_code, reply) != (client.flow, CMD_OK, 0, b"v1|" + body):
                    self.failures.append(f"call {self.sent}: {(flow, cmd, rsp_code, reply)!r}")
                else:
                    self.ok.append(time.monotonic())
                self._halt.wait(self.pace)
        finally:
            client.close()

    def finish(self) -> None:
        self._halt.set()
        self.join(10)
        assert not self.is_alive(), "the healthy client is stuck"

    def ok_between(self, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.ok)


@contextlib.contextmanager
def healthy_client(port: int):
    """A HealthyClient that has made one successful call before the body runs; after the body,
    it is stopped and must have had no failure."""
    client = HealthyClient(port)
    client.start()
    wait_until(lambda: client.ok or client.failures or not client.is_alive(), 5, "the healthy client's first call")
    assert client.ok, client.failures
    try:
        yield client
    finally:
        client.finish()
    assert not client.failures, client.failures
    assert len(client.ok) == client.sent


class SilentBackend:
    """A backend that accepts connections and never answers. ``read=False``: it never reads either
    (small receive buffers, so the kernel absorbs little of what Envoy writes); ``read=True``: it
    reads and discards everything, so nothing upstream of it ever pushes back."""

    def __init__(self, read: bool) -> None:
        self.read = read
        self.listener = socket.socket()
        if not read:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited by accepted sockets
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.bytes_read = 0
        self._read_more = threading.Condition()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by stop()
            self.accepted.append(conn)
            if self.read:
                threading.Thread(target=self._discard, args=(conn,), daemon=True).start()

    def _discard(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := conn.recv(1 << 20):
                with self._read_more:
                    self.bytes_read += len(chunk)
                    self._read_more.notify_all()

    def wait_read(self, total: int, timeout: float) -> None:
        """Until ``total`` bytes have been read (over all connections)."""
        with self._read_more:
            if not self._read_more.wait_for(lambda: self.bytes_read >= total, timeout):
                raise TimeoutError(f"the sink read {self.bytes_read} bytes, not {total}, within {timeout}s")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)
        for conn in self.accepted:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class FaultProxy:
    def __init__(self, stack: Stack, ports: dict[str, int], metrics_port: int, sink: SilentBackend) -> None:
        self.stack = stack
        self.sink = sink
        self.ports = ports  # listener name -> port
        self.metrics_port = metrics_port

    def restart_bridge(self) -> None:
        """A fresh bridge process (Envoy stays; in-process a fresh Envoy): memory measured from a
        clean start, not on top of what earlier tests left allocated but free inside the process."""
        if in_process(self.stack):
            self.stack.stop_process("envoy")
            self.stack.start_envoy()
        else:
            self.stack.stop_process("bridge")
            self.stack.start_bridge()
        wait_until(lambda: port_open(self.metrics_port), 10, "bridge metrics", core_process(self.stack))

    def pid(self, name: str) -> int:
        """The process of ``name`` ("bridge" or "envoy"); in-process the bridge is Envoy."""
        return (core_process(self.stack) if name == "bridge" else self.stack.procs[name]).pid

    def metric(self, name: str, listener: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        m = re.search(rf'^metabridge_{name}{{listener="{listener}"}} ([0-9.e+-]+)$', text, re.M)
        assert m, f"metabridge_{name} not exported for {listener}"
        return float(m.group(1))

    def log_mark(self) -> int:
        return len(self.stack.log("bridge"))

    def events(self, since: int, name: str) -> list[dict]:
        """The bridge's JSON log events called ``name`` written after ``since`` (a log_mark)."""
        found = []
        for line in self.stack.log("bridge")[since:].splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == name:
                        found.append(entry)
        return found

    def memory(self, name: str = "bridge") -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the bridge (or Envoy) process, in bytes."""
        status = Path(f"/proc/{self.pid(name)}/status").read_text()
        return {key: int(value.split()[0]) * 1024 for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}

    def reset_peak_memory(self, name: str = "bridge") -> bool:
        """Reset the bridge's (or Envoy's) VmHWM to its current RSS (Linux >= 4.0); False if not permitted."""
        try:
            Path(f"/proc/{self.pid(name)}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


@pytest.fixture(scope="module", params=MODES)
def proxy(tmp_path_factory, request):
    blackhole, sink = SilentBackend(read=False), SilentBackend(read=True)
    taken: set[int] = set()

    def distinct_port() -> int:  # free_port() may hand out a port twice; one stack needs five
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    v1_port, metrics_port = distinct_port(), distinct_port()
    ports = {name: distinct_port() for name in ("broken", "slow", "big")}

    def listener(name: str, codec: str, routes: list[dict], **options) -> dict:
        return {"name": name, "address": "127.0.0.1", "port": ports[name], "codec": codec, "routes": routes, **options}

    cfg = {
        "bridge": {"metrics_port": metrics_port},
        "codecs": {
            "awesomerpc": {"ref": f"{REPO / 'codecs' / 'awesomerpc.py'}:AwesomeRpcCodec"},
            "broken": {"ref": f"{REPO / 'tests' / 'integration' / 'broken_codec.py'}:BrokenAwesomeRpcCodec"},
        },
        "listeners": [
            listener("broken", "broken", [route(CMD_OK, "v1"), route(CMD_SLOW, "v1")], request_timeout="5s"),
            listener("slow", "awesomerpc", [route(CMD_OK, "v1")], frame_timeout="1s"),
            listener("big", "awesomerpc", [route(CMD_OK, "v1"), route(CMD_BLACKHOLE, "blackhole"), route(CMD_SINK, "sink", timeout="30s"), route(CMD_OK_LONG, "v1", timeout="30s")], max_frame_size="2MiB", request_timeout="2s"),
        ],
        "clusters": [
            {"name": "v1", "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": v1_port}]},
            {"name": "blackhole", "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": blackhole.port}]},
            {"name": "sink", "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": sink.port}]},
        ],
    }
    stack = stack_class(request.param)(tmp_path_factory.mktemp("faults"), cfg, {"v1": v1_port})
    try:
        stack.start()
        wait_until(lambda: port_open(metrics_port), 10, "bridge metrics", core_process(stack))
        yield FaultProxy(stack, ports, metrics_port, sink)
    finally:
        stack.stop()
        blackhole.stop()
        sink.stop()


def test_codec_decode_bug_closes_only_that_connection_after_its_replies(proxy):
    port = proxy.ports["broken"]
    mark = proxy.log_mark()
    codec_errors = proxy.metric("codec_error_total", "broken")
    with healthy_client(port) as healthy:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        # Three requests in flight (two slow), then the frame the codec's decode fails on, then
        # one more that is never decoded: one write, so the bug hits while the three are pending.
        sock.sendall(
            encode_frame(1, CMD_SLOW, b"300")
            + encode_frame(2, CMD_SLOW, b"300")
            + encode_frame(3, CMD_OK, b"three")
            + encode_frame(4, DECODE_BUG_CMD, b"boom")
            + encode_frame(5, CMD_OK, b"never decoded")
        )
        started = time.monotonic()
        data = read_until_closed(sock)  # the proxy closes it: bounded by the 5 s socket timeout
        closed = time.monotonic()
        sock.close()
        assert closed - started < 4.5, "the connection was not closed by the proxy"
    assert sorted(parse_replies(data)) == [(1, CMD_SLOW, 0, b"v1|300"), (2, CMD_SLOW, 0, b"v1|300"), (3, CMD_OK, 0, b"v1|three")]
    assert closed - started >= 0.3  # it waited for the slow replies before closing
    assert healthy.ok_between(started, closed) >= 1

    wait_until(lambda: proxy.events(mark, "codec_error"), 5, "the codec_error event")
    [error] = proxy.events(mark, "codec_error")
    assert (error["listener"], error["codec"], error["hook"], error["direction"]) == ("broken", "BrokenAwesomeRpcCodec", "decode", "request"), error
    assert "Traceback" in error["exception"] and "RuntimeError: deliberate decode bug" in error["exception"], error
    assert proxy.metric("codec_error_total", "broken") == codec_errors + 1
    [closing] = proxy.events(mark, "bad_request_closing_connection")
    assert closing["connection"] == error["connection"] and "codec failed: RuntimeError" in closing["error"], closing
    wait_until(lambda: proxy.metric("request_active", "broken") == 0, 5, "nothing left in flight")


def test_codec_on_error_bug_closes_only_that_connection(proxy):
    port = proxy.ports["broken"]
    mark = proxy.log_mark()
    with healthy_client(port) as healthy:
        client = BlockingClient(port)
        assert client.call(CMD_OK, b"fine") == (1, CMD_OK, 0, b"v1|fine")
        started = time.monotonic()
        # No route for cmd 67: the bridge needs the codec's error reply, and on_error raises.
        client.sock.sendall(encode_frame(2, ON_ERROR_BUG_CMD, b"no route"))
        leaked = read_until_closed(client.sock)
        closed = time.monotonic()
        client.close()
    assert leaked == b""  # no reply could be built: closed, and nothing raw reached the client
    assert closed - started < 4.5, "the connection was not closed by the proxy"
    assert healthy.ok_between(started - 0.1, time.monotonic()) >= 1
    wait_until(lambda: proxy.events(mark, "codec_error"), 5, "the codec_error event")
    [error] = proxy.events(mark, "codec_error")
    assert (error["listener"], error["codec"], error["hook"], error["direction"]) == ("broken", "BrokenAwesomeRpcCodec", "on_error", "request"), error
    assert "Traceback" in error["exception"] and "RuntimeError: deliberate on_error bug" in error["exception"], error
    assert any("cannot build an error reply" in e["reason"] for e in proxy.events(mark, "closing_connection"))
    wait_until(lambda: proxy.metric("request_active", "broken") == 0, 5, "nothing left in flight")


def test_slowloris_closed_at_frame_timeout(proxy):
    port = proxy.ports["slow"]
    timeouts = proxy.metric("downstream_cx_frame_timeout_total", "slow")
    frame = encode_frame(1, CMD_OK, b"x" * 100)  # 113 bytes: the trickle needs ~5.7 s to finish it
    with healthy_client(port) as healthy:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(frame[:56])
        started = time.monotonic()
        sent, received, closed = 56, b"", None
        while closed is None and time.monotonic() - started < 5:
            readable, _, _ = select.select([sock], [], [], 0.1)  # the trickle's pace: one byte per 100 ms
            try:
                if readable:
                    chunk = sock.recv(65536)
                    received += chunk
                    if not chunk:
                        closed = time.monotonic()
                        break
                if sent < len(frame) - 1:  # never the last byte: the frame stays partial
                    sock.send(frame[sent : sent + 1])
                    sent += 1
            except (ConnectionResetError, BrokenPipeError):
                closed = time.monotonic()
        sock.close()
    assert closed is not None, f"still open {time.monotonic() - started:.1f}s after the half frame ({sent} of {len(frame)} bytes sent)"
    assert 1.0 <= closed - started <= 3.0, closed - started
    assert received == b""
    assert healthy.ok_between(started, closed) >= 5
    wait_until(lambda: proxy.metric("downstream_cx_frame_timeout_total", "slow") == timeouts + 1, 5, "the frame timeout counted")


@dataclass
class Flood:
    """What one flood connection got back, and what the bridge's memory did meanwhile."""

    n: int
    seconds_to_send: float
    codes: dict[int, int]  # flow -> rsp_code of its one reply
    decoded: int  # requests the bridge decoded (the rest wait undecoded)
    rss_before: int
    peak: int
    envoy_growth: int
    healthy_ok: int  # the healthy client's successful calls while the flood was answered

    @property
    def growth(self) -> int:
        return self.peak - self.rss_before

    def count(self, code: int) -> int:
        return sum(c == code for c in self.codes.values())

    def __str__(self) -> str:
        return (
            f"{self.n} x 1 MiB sent in {self.seconds_to_send:.2f}s: {self.count(OVER_LIMIT)} OVER_LIMIT, {self.count(TIMEOUT)} TIMEOUT,"
            f" {self.n - self.decoded} undecoded; bridge RSS {self.rss_before / MiB:.0f} MiB -> peak {self.peak / MiB:.0f} MiB"
            f" (+{self.growth / MiB:.1f} MiB); Envoy +{self.envoy_growth / MiB:.1f} MiB; {self.healthy_ok} healthy calls meanwhile"
        )


def flood(proxy: FaultProxy, cmd: int, n: int) -> Flood:
    """On a fresh bridge, beside a healthy client: write ``n`` 1 MiB requests for ``cmd`` on one
    connection as fast as the proxy takes them, read what comes back, and wait until every
    request the bridge decoded has had its one reply (OVER_LIMIT at once, TIMEOUT after 2 s)."""
    proxy.restart_bridge()
    port = proxy.ports["big"]
    frames = [encode_frame(flow, cmd, bytes([flow % 256]) * (MiB - HEADER.size)) for flow in range(1, n + 1)]
    requests_before = proxy.metric("request_total", "big")
    resettable = proxy.reset_peak_memory()
    envoy_resettable = proxy.reset_peak_memory("envoy")
    before, envoy_before = proxy.memory(), proxy.memory("envoy")["VmRSS"]
    peak = before["VmRSS"]

    def sample() -> None:
        nonlocal peak
        peak = max(peak, proxy.memory()["VmRSS"])

    with healthy_client(port) as healthy:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        received = bytearray()

        def read_replies() -> None:
            with contextlib.suppress(OSError):
                while chunk := sock.recv(1 << 20):
                    received.extend(chunk)

        reader = threading.Thread(target=read_replies, daemon=True)
        reader.start()
        started = time.monotonic()
        for frame in frames:
            sock.sendall(frame)
            sample()
        sent = time.monotonic()

        def all_answered(healthy_in_flight: int) -> bool:
            sample()
            decoded = proxy.metric("request_total", "big") - requests_before - healthy.sent
            return proxy.metric("request_active", "big") <= healthy_in_flight and len(parse_complete(received)) >= decoded

        wait_until(lambda: all_answered(1), 15, "a reply for every decoded request")
        answered = time.monotonic()
    wait_until(lambda: all_answered(0), 5, "a reply for every decoded request, the healthy client stopped")
    after = proxy.memory()
    decoded = int(proxy.metric("request_total", "big") - requests_before - healthy.sent)
    replies = parse_complete(received)
    sock.close()
    reader.join(5)

    codes: dict[int, int] = {}
    for flow, reply_cmd, rsp_code, body in replies:
        assert reply_cmd == cmd and body == b"" and 1 <= flow <= n and flow not in codes, (flow, reply_cmd, rsp_code, body[:20])
        codes[flow] = rsp_code
    assert len(codes) == decoded, f"{decoded} requests decoded, {len(codes)} replies"
    assert set(codes.values()) <= {OVER_LIMIT, TIMEOUT}, codes
    result = Flood(
        n=n,
        seconds_to_send=sent - started,
        codes=codes,
        decoded=decoded,
        rss_before=before["VmRSS"],
        peak=max(peak, after["VmHWM"] if resettable else 0),
        envoy_growth=proxy.memory("envoy")["VmHWM" if envoy_resettable else "VmRSS"] - envoy_before,
        healthy_ok=healthy.ok_between(started, answered),
    )
    print(f"\n{result}")
    return result


def test_slow_upstream_backpressure_bounds_the_bridge_memory(proxy):
    """128 x 1 MiB requests to a backend that never reads. What stays in the bridge for this
    connection: at most max_upstream_queue (= max_frame_size, 2 MiB) plus one frame waiting for
    the tunnel's window, at most max_client_buffer (2 x max_frame_size, 4 MiB) of undecoded client
    bytes, and the requests Envoy took before it stopped (its 16 MiB tunnel stream window, its
    connection buffers, the sockets' kernel buffers: about 16-20 requests), which stay in flight
    until request_timeout. Everything past that is answered OVER_LIMIT at once, except up to
    max_client_buffer (4 requests) that wait undecoded. Growth well under the 128 MiB sent shows
    the flood is shed, not buffered."""
    result = flood(proxy, CMD_BLACKHOLE, 128)
    assert 0 <= result.n - result.decoded <= 4, f"more than max_client_buffer (4 MiB) held undecoded: {result}"
    assert result.count(OVER_LIMIT) >= result.n // 2, f"the excess was not shed with OVER_LIMIT: {result}"
    assert result.count(TIMEOUT) <= 32, f"more requests forwarded than Envoy's window and buffers hold: {result}"
    assert result.growth < 100 * MiB, f"the bridge grew by {result.growth / MiB:.1f} MiB: {result}"
    assert result.healthy_ok >= 5, result


def test_upstream_that_reads_but_never_answers_does_not_pin_request_bytes(proxy):
    """64 x 1 MiB requests to a backend that reads everything and never answers, each written once
    the backend has read the one before (so nothing pushes back and nothing is shed): all 64 are
    forwarded and wait for a response (the route's timeout is 30 s). docs/pipeline.md ("Limits"):
    the memory one connection can pin in the bridge is about max_client_buffer + max_upstream_queue
    (4 + 2 MiB) per cluster it uses, plus the responses in flight (none here); the bound below
    leaves more than 5x that for transient copies. A bridge that keeps every forwarded request's
    bytes until its reply pins all 64 MiB instead. Closing the connection frees them."""
    proxy.restart_bridge()
    port, sink, n = proxy.ports["big"], proxy.sink, 64
    frames = [encode_frame(flow, CMD_SINK, bytes([flow % 256]) * (MiB - HEADER.size)) for flow in range(1, n + 1)]
    resettable = proxy.reset_peak_memory()
    before = proxy.memory()
    peak = before["VmRSS"]
    with healthy_client(port) as healthy:
        started = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        base = sink.bytes_read
        for i, frame in enumerate(frames, 1):
            sock.sendall(frame)
            sink.wait_read(base + i * MiB, 10)
            peak = max(peak, proxy.memory()["VmRSS"])
        # The healthy client's call may be in flight too.
        wait_until(lambda: proxy.metric("request_active", "big") in (n, n + 1), 5, f"{n} requests in flight")
        in_flight = proxy.memory()
        # With every one of them pinned in flight, the healthy client goes on being answered (the
        # writes alone take a tenth of a second in-process: too short a window to count on).
        answered_then = len(healthy.ok)
        wait_until(lambda: len(healthy.ok) >= answered_then + 5 or healthy.failures, 5, f"five healthy calls with all {n} requests in flight")
        sock.close()
        wait_until(lambda: proxy.metric("request_active", "big") <= 1, 5, "the closed connection's requests freed")
        ended = time.monotonic()
        healthy_during = healthy.ok_between(started, ended)
    peak = max(peak, in_flight["VmRSS"], in_flight["VmHWM"] if resettable else 0)
    growth = peak - before["VmRSS"]
    print(f"\nread but never answered: {n} x 1 MiB forwarded and waiting; bridge RSS {before['VmRSS'] / MiB:.0f} MiB -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f} MiB), {in_flight['VmRSS'] / MiB:.0f} MiB with all {n} waiting; {healthy_during} healthy calls in the {ended - started:.2f}s")
    assert sink.bytes_read - base >= n * MiB
    assert growth < 40 * MiB, f"the bridge grew by {growth / MiB:.1f} MiB while {n} forwarded requests of 1 MiB waited for their responses"
    assert healthy_during >= 5


def test_answered_requests_do_not_pin_their_bytes(proxy):
    """One client calls 1 MiB requests one after the other (each answered with 1 MiB by v1, on a
    route with a 30 s timeout); once all are answered nothing is in flight, so the bridge should
    hold about what it held before (docs/pipeline.md: "plus the responses in flight": none)."""
    proxy.restart_bridge()
    port, n = proxy.ports["big"], 64
    body = b"m" * (MiB - HEADER.size - 8)
    before = proxy.memory()
    with healthy_client(port) as healthy:
        started = time.monotonic()
        client = BlockingClient(port)
        try:
            for i in range(1, n + 1):
                assert client.call(CMD_OK_LONG, body) == (i, CMD_OK_LONG, 0, b"v1|" + body)
            # The healthy client's call may be in flight.
            wait_until(lambda: proxy.metric("request_active", "big") <= 1, 5, "nothing in flight")
            answered = proxy.memory()
        finally:
            client.close()
        wait_until(lambda: proxy.metric("downstream_cx_active", "big") == 1, 5, "the connection closed")
        closed = proxy.memory()
        healthy_during = healthy.ok_between(started, time.monotonic())
    growth = answered["VmRSS"] - before["VmRSS"]
    print(f"\nanswered: {n} x 1 MiB calls answered one by one; bridge RSS {before['VmRSS'] / MiB:.0f} MiB -> {answered['VmRSS'] / MiB:.0f} MiB with none in flight (+{growth / MiB:.1f} MiB), {closed['VmRSS'] / MiB:.0f} MiB once the connection closed")
    assert healthy_during >= 5
    assert growth < 40 * MiB, f"the bridge grew by {growth / MiB:.1f} MiB and holds it with no request in flight"


def parse_complete(data: bytearray) -> list[tuple[int, int, int, bytes]]:
    """The whole frames at the front of ``data`` (a reply still arriving is left out)."""
    end = 0
    while end + HEADER.size <= len(data):
        length = HEADER.unpack_from(data, end)[2]
        if end + length > len(data):
            break
        end += length
    return parse_replies(bytes(data[:end]))
