"""The compose stack end to end: real awesomerpc traffic from the host through the containerized
Envoy and bridge (in-process: the Envoy with the core inside) to the two backend containers, the
demo job, and, for the ext_proc mode, what happens when the bridge container stops and starts
again."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from metabridge.sdk.codec import DecodeStatus, Metadata
from examples.awesomerpc.client import AwesomeRpcClient, Reply, call_sync, encode_frame
from examples.awesomerpc.protocol import AwesomeRpcCodec

if TYPE_CHECKING:
    from tests.docker.conftest import Stack

# The first test also waits for the image build (minutes on a fresh machine).
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

SPLIT_CALLS = 400
SPLIT_CONNECTIONS = 4
# cmd 1 goes 80/20 to v1/v2, one random pick per message: v1's count is Binomial(400, 0.8),
# mean 320, standard deviation 8. Five deviations either way fail by chance about once in 1.7 million runs.
SPLIT_V1_BOUNDS = (280, 360)
CLOSE_WAIT_S = 15.0  # how long a connection may take to be closed before the test calls it open
MAX_LEAK_READ = 1 << 20


async def _calls(stack: Stack, cmd: int, bodies: list[bytes], connections: int = 1) -> list[Reply]:
    """One call per body, spread over a few connections, all in flight at once."""
    clients = [await AwesomeRpcClient.connect(stack.host, stack.listener_port) for _ in range(connections)]
    try:
        return await asyncio.gather(*(clients[i % connections].call(cmd, body) for i, body in enumerate(bodies)))
    finally:
        for client in clients:
            client.close()
        await asyncio.gather(*(client.wait_closed() for client in clients))


def _read_reply_body(sock: socket.socket) -> bytes:
    """Reads one whole awesomerpc frame from a raw socket and returns its body."""
    codec = AwesomeRpcCodec()
    buffer = bytearray()
    while True:
        metadata = Metadata()
        if codec.decode(buffer, metadata) is DecodeStatus.DONE:
            return bytes(metadata.frame[metadata.header_size :])
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {len(buffer)} bytes, before a whole reply"
        buffer += chunk


def _bytes_until_closed(sock: socket.socket, frame: bytes) -> bytes:
    """Sends a frame and returns every byte that arrives until the peer closes the connection."""
    received = bytearray()
    sock.settimeout(CLOSE_WAIT_S)
    try:
        sock.sendall(frame)
        while len(received) < MAX_LEAK_READ:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed by Envoy before or while sending: closed is what the test wants
    except socket.timeout:
        pytest.fail(f"the connection was still open {CLOSE_WAIT_S} s after the bridge stopped (received {bytes(received)!r})")
    return bytes(received)


def test_demo_job_checks_every_route_and_exits_zero(stack: Stack) -> None:
    exit_code = stack.wait_for_exit(stack.services.demo)
    logs = stack.logs(stack.services.demo)
    assert exit_code == 0, f"the demo job exited with {exit_code}:\n{logs}"
    assert "every answer was as configured" in logs, logs


@pytest.mark.parametrize(
    ("cmd", "backend", "cmd_seen_by_backend"),
    [(2, "v2", 2), (3, "v1", 30)],  # cmd 3's route rewrites it to 30 (request_mutation)
    ids=["cmd2-to-v2", "cmd3-rewritten-to-v1"],
)
def test_requests_from_the_host_are_routed_by_cmd(stack: Stack, cmd: int, backend: str, cmd_seen_by_backend: int) -> None:
    bodies = [f"request-{i}".encode() for i in range(20)]
    replies = asyncio.run(_calls(stack, cmd, bodies))
    for body, reply in zip(bodies, replies):
        assert (reply.cmd, reply.rsp_code, reply.body) == (cmd_seen_by_backend, 0, f"{backend}|".encode() + body)


def test_cmd1_is_split_80_20_between_v1_and_v2(stack: Stack) -> None:
    bodies = [f"split-{i}".encode() for i in range(SPLIT_CALLS)]
    replies = asyncio.run(_calls(stack, 1, bodies, connections=SPLIT_CONNECTIONS))
    backends = Counter(reply.body.split(b"|", 1)[0].decode() for reply in replies)
    assert set(backends) == {"v1", "v2"}, backends
    for body, reply in zip(bodies, replies):
        assert reply.rsp_code == 0 and reply.body.endswith(b"|" + body), reply
    low, high = SPLIT_V1_BOUNDS
    assert low <= backends["v1"] <= high, f"v1 answered {backends['v1']} of {SPLIT_CALLS} cmd-1 calls, expected {low}..{high}"


# Last in this module: it stops and restarts the bridge (and leaves the stack serving again).
def test_stopped_bridge_fails_closed_and_restarted_bridge_serves(ext_proc_stack: Stack) -> None:
    stack = ext_proc_stack
    with socket.create_connection((stack.host, stack.listener_port), timeout=CLOSE_WAIT_S) as ongoing:
        ongoing.sendall(encode_frame(1, 2, b"before"))
        assert _read_reply_body(ongoing) == b"v2|before"

        stack.stop("bridge")
        try:
            # Envoy must close connections rather than pass untranslated bytes on (failure_mode_allow: false).
            leaked = _bytes_until_closed(ongoing, encode_frame(2, 2, b"ongoing"))
            assert leaked == b"", f"an ongoing connection received bytes while the bridge was down: {leaked!r}"
            with socket.create_connection((stack.host, stack.listener_port), timeout=CLOSE_WAIT_S) as fresh:
                leaked = _bytes_until_closed(fresh, encode_frame(1, 2, b"new"))
            assert leaked == b"", f"a new connection received bytes while the bridge was down: {leaked!r}"
        finally:
            stack.start("bridge")

    stack.wait_until_serving()
    reply = call_sync(stack.host, stack.listener_port, 2, b"after")
    assert (reply.rsp_code, reply.body) == (0, b"v2|after")
