"""The example awesomerpc backend and client library against each other, on loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from metabridge.sdk.codec import Metadata
from examples.awesomerpc.client import AwesomeRpcClient, ConnectionClosed, Reply, call_sync, encode_frame
from examples.awesomerpc.protocol import AwesomeRpcCodec
from examples.awesomerpc.server import serve
from tests.helpers import decode_frames

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


@contextlib.asynccontextmanager
async def backend(name: str = "v1"):
    server = await serve(HOST, 0, name)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def client_of(name: str = "v1"):
    async with backend(name) as port:
        async with await AwesomeRpcClient.connect(HOST, port) as client:
            yield client


async def read_replies(reader: asyncio.StreamReader, count: int) -> list[Metadata]:
    """Decode ``count`` frames from a raw stream (bounded by the caller's timeout)."""
    codec, buffer, replies = AwesomeRpcCodec(), bytearray(), []
    while len(replies) < count:
        chunk = await reader.read(4096)
        assert chunk, f"connection closed after {len(replies)} of {count} replies"
        buffer += chunk
        replies += decode_frames(codec, buffer)
    return replies


def test_concurrent_calls_on_one_connection_are_matched_by_flow():
    async def scenario():
        async with client_of("v1") as client:
            calls = [client.call(cmd=i % 7 + 1, body=f"req-{i}".encode()) for i in range(40)]
            return await asyncio.gather(*calls)

    replies = asyncio.run(scenario())
    assert [(r.cmd, r.rsp_code, r.body) for r in replies] == [(i % 7 + 1, 0, f"v1|req-{i}".encode()) for i in range(40)]
    assert len({r.flow for r in replies}) == 40


def test_backend_name_tells_backends_apart():
    async def scenario():
        async with client_of("v1") as one, client_of("v2") as two:
            return await one.call(5, b"x"), await two.call(5, b"x")

    from_v1, from_v2 = asyncio.run(scenario())
    assert from_v1.body == b"v1|x"
    assert from_v2.body == b"v2|x"


def test_heartbeat():
    async def scenario():
        async with client_of() as client:
            return await client.heartbeat()

    reply = asyncio.run(scenario())
    assert (reply.cmd, reply.rsp_code, reply.body) == (0, 0, b"")


def test_server_handles_pipelined_raw_frames_split_anywhere():
    frames = [encode_frame(100 + i, 3, b"b" * i) for i in range(5)] + [encode_frame(200, 0)]
    stream = b"".join(frames)

    async def scenario():
        async with backend("v1") as port:
            reader, writer = await asyncio.open_connection(HOST, port)
            # One write holding several frames, then a frame dribbled in byte by byte.
            writer.write(stream)
            for byte in encode_frame(300, 4, b"tail"):
                writer.write(bytes([byte]))
                await writer.drain()
            replies = await asyncio.wait_for(read_replies(reader, len(frames) + 1), 10)
            writer.close()
            return {m.request_id: (m.properties["cmd"], m.frame[13:]) for m in replies}

    by_flow = asyncio.run(scenario())
    expected = {100 + i: (3, b"v1|" + b"b" * i) for i in range(5)}
    expected.update({200: (0, b""), 300: (4, b"v1|tail")})
    assert by_flow == expected


def test_delayed_request_does_not_block_later_ones():
    async def scenario():
        async with client_of() as client:
            slow = asyncio.create_task(client.call(98, b"1000"))
            fast = asyncio.create_task(client.call(1, b"quick"))
            done, _ = await asyncio.wait({slow, fast}, return_when=asyncio.FIRST_COMPLETED)
            first_done = [task is fast for task in done]
            return first_done, await fast, await slow

    first_done, fast_reply, slow_reply = asyncio.run(scenario())
    assert first_done == [True]
    assert fast_reply.body == b"v1|quick"
    assert (slow_reply.cmd, slow_reply.rsp_code, slow_reply.body) == (98, 0, b"v1|1000")


def test_call_timeout_leaves_the_connection_usable():
    async def scenario():
        async with client_of() as client:
            with pytest.raises(TimeoutError, match="cmd=98"):
                await client.call(98, b"3000", timeout=0.2)
            return client.closed, await client.call(2, b"after")

    closed, reply = asyncio.run(scenario())
    assert closed is False
    assert reply.body == b"v1|after"


def test_malformed_delay_is_answered_with_400():
    async def scenario():
        async with client_of() as client:
            return await client.call(98, b"soon")

    reply = asyncio.run(scenario())
    assert reply.rsp_code == 400
    assert b"milliseconds" in reply.body


def test_cmd_99_closes_the_connection_and_fails_pending_calls():
    async def scenario():
        async with client_of() as client:
            pending = asyncio.create_task(client.call(98, b"5000"))
            await asyncio.sleep(0)  # let the pending call reach the server first
            with pytest.raises(ConnectionClosed, match="server closed"):
                await client.call(99)
            with pytest.raises(ConnectionClosed):
                await pending
            with pytest.raises(ConnectionClosed):
                await client.call(1)
            return client.closed

    assert asyncio.run(scenario()) is True


def test_client_close_fails_pending_calls():
    async def scenario():
        async with client_of() as client:
            pending = asyncio.create_task(client.call(98, b"5000"))
            await asyncio.sleep(0)
            client.close()
            with pytest.raises(ConnectionClosed, match="closed by the client"):
                await pending

    asyncio.run(scenario())


def test_server_closes_a_connection_sending_invalid_frames():
    async def scenario():
        async with backend() as port:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(encode_frame(1, 1, b"ok"))
            replies = await asyncio.wait_for(read_replies(reader, 1), 10)
            writer.write(bytes.fromhex("01" "00000002" "00000005" "0001" "0000"))  # len 5 < 13
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return replies, rest

    replies, rest = asyncio.run(scenario())
    assert [m.request_id for m in replies] == [1]
    assert rest == b""  # EOF: the server hung up


def wait_for_listening_port(proc: subprocess.Popen, lines: queue.Queue[str], name: str) -> int:
    """The port from the backend's "listening" log line; other log lines (e.g. asyncio debug) are skipped."""
    seen = []
    for _ in range(50):
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError(f"the backend logged no 'listening' line within 30s (status {proc.poll()}); it logged: {seen}") from None
        match = re.search(rf"awesomerpc backend {name} listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match.group(1))
        seen.append(line)
    raise AssertionError(f"no 'listening' line among the backend's first {len(seen)} log lines: {seen}")


def test_server_process_logs_its_port_serves_and_exits_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.awesomerpc.server", "--port", "0", "--name", "proc"],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A thread reads stderr so waits are bounded and the child never blocks on a full pipe.
    lines: queue.Queue[str] = queue.Queue()
    stderr_reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    stderr_reader.start()
    try:
        port = wait_for_listening_port(proc, lines, "proc")

        assert call_sync(HOST, port, 7, b"hi") == Reply(1, 7, 0, b"proc|hi")
        # A connection still open at SIGTERM must not keep the process alive.
        with socket.create_connection((HOST, port), timeout=10):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr_reader.join(timeout=30)
        proc.stderr.close()
    logged = "".join(lines.queue)
    assert "stopping" in logged
    assert "Traceback" not in logged and " ERROR " not in logged, logged
