"""The gRPC server's defences over a real socket, with the h2 library as the peer: what h2 sees
of the advertised limits, a reset racing the client's trailers, refused streams, floods. The
raw-frame suite (tests/unit/test_http2_states.py) covers every case in memory; these show the
same outcomes to an independent HTTP/2 implementation.
"""

from __future__ import annotations

import asyncio

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived

from metabridge.transport.grpc_server import GrpcServer
from tests.unit.test_http2_states import ECHO, HOLD, METHODS, message

HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "x"), ("content-type", "application/grpc")]


class Client:
    """h2 as the client of a running GrpcServer."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.events: list = []

    @classmethod
    async def connect(cls, server: GrpcServer) -> "Client":
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    def flush(self) -> None:
        try:
            self.writer.write(self.h2.data_to_send())
        except ConnectionError:  # the server closed a connection it cut off
            pass

    async def pump(self, until, timeout: float = 5.0) -> None:
        self.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until():
            try:
                data = await asyncio.wait_for(self.reader.read(65536), deadline - loop.time())
            except ConnectionError:  # closed with our bytes unread: the kernel may reset
                return
            if not data:
                return
            for event in self.h2.receive_data(data):
                self.events.append(event)
                if isinstance(event, DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.flush()

    def terminated(self) -> ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, ConnectionTerminated)), None)

    def ended(self, stream_id: int) -> bool:
        return any(isinstance(e, (StreamEnded, StreamReset)) and e.stream_id == stream_id for e in self.events)

    def status(self, stream_id: int) -> str | None:
        for e in self.events:
            if isinstance(e, (ResponseReceived, TrailersReceived)) and e.stream_id == stream_id:
                headers = dict(e.headers)
                if "grpc-status" in headers:
                    return headers["grpc-status"]
        return None

    async def echo(self, stream_id: int, body: bytes) -> bytes:
        self.h2.send_headers(stream_id, HEADERS)
        self.h2.send_data(stream_id, message(body), end_stream=True)
        await self.pump(lambda: self.ended(stream_id))
        return b"".join(e.data for e in self.events if isinstance(e, DataReceived) and e.stream_id == stream_id)

    def close(self) -> None:
        self.writer.close()


async def started(**limits) -> GrpcServer:
    server = GrpcServer(METHODS, **limits)
    await server.start("127.0.0.1:0")
    return server


def test_h2_sees_the_advertised_limits():
    async def body():
        server = await started()
        client = await Client.connect(server)
        assert await client.echo(1, b"hello") == message(b"hello")
        remote = client.h2.remote_settings
        assert remote.max_concurrent_streams == 100
        assert remote.max_header_list_size == 16384
        assert remote.max_frame_size == 16384
        assert remote.enable_push == 0
        client.close()
        await server.stop()

    asyncio.run(body())


def test_trailers_racing_the_servers_reset_do_not_break_the_connection():
    """The client's message and trailers leave in one write; the server ends the call at the
    message (too large) and resets it, then the trailers arrive: ignored (RFC 9113 5.1), and
    the connection goes on serving."""

    async def body():
        server = await started(max_message=1000)
        client = await Client.connect(server)
        client.h2.send_headers(1, HEADERS)
        client.h2.send_data(1, message(b"x" * 2000))
        client.h2.send_headers(1, [("x-trailer", "late")], end_stream=True)
        await client.pump(lambda: client.ended(1))
        assert client.status(1) == "8"  # RESOURCE_EXHAUSTED
        assert await client.echo(3, b"after the reset") == message(b"after the reset")
        assert client.terminated() is None
        assert server.stats.connection_errors == 0
        client.close()
        await server.stop()

    asyncio.run(body())


def test_streams_past_the_limit_are_refused_before_h2_has_our_settings():
    async def body():
        server = await started(max_concurrent_streams=2)
        client = await Client.connect(server)
        hold = [(k, HOLD if k == ":path" else v) for k, v in HEADERS]
        for stream_id in (1, 3, 5):  # sent before the server's SETTINGS is read
            client.h2.send_headers(stream_id, hold)
        await client.pump(lambda: client.ended(5))
        reset = next(e for e in client.events if isinstance(e, StreamReset))
        assert (reset.stream_id, reset.error_code) == (5, ErrorCodes.REFUSED_STREAM)
        assert client.h2.remote_settings.max_concurrent_streams == 2
        client.h2.reset_stream(1)
        assert await client.echo(7, b"room again") == message(b"room again")
        client.close()
        await server.stop()

    asyncio.run(body())


def test_ping_flood_from_h2_gets_enhance_your_calm_and_others_are_served():
    async def body():
        server = await started()
        flooder = await Client.connect(server)
        for i in range(2000):
            flooder.h2.ping(i.to_bytes(8, "big"))
        await flooder.pump(lambda: flooder.terminated() is not None)
        # The GOAWAY reaches h2 unless the kernel resets the connection first (the server
        # closes it with the flood unread); the server's count is the ground truth.
        if flooder.terminated() is not None:
            assert flooder.terminated().error_code == ErrorCodes.ENHANCE_YOUR_CALM
        healthy = await Client.connect(server)
        assert await healthy.echo(1, b"fine") == message(b"fine")
        assert server.stats.connections_calmed == 1
        flooder.close()
        healthy.close()
        await server.stop()

    asyncio.run(body())


def test_rapid_reset_from_h2_gets_enhance_your_calm_and_others_are_served():
    async def body():
        server = await started()
        healthy = await Client.connect(server)
        assert await healthy.echo(1, b"before") == message(b"before")
        attacker = await Client.connect(server)
        hold = [(k, HOLD if k == ":path" else v) for k, v in HEADERS]
        for stream_id in range(1, 2 * 5000, 2):
            attacker.h2.send_headers(stream_id, hold)
            attacker.h2.reset_stream(stream_id)
        await attacker.pump(lambda: attacker.terminated() is not None)
        if attacker.terminated() is not None:  # see the PING flood test
            assert attacker.terminated().error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert server.stats.connections_calmed == 1
        assert server.stats.streams < 500  # calls made for the attacker before it was cut off
        assert await healthy.echo(3, b"after") == message(b"after")
        attacker.close()
        healthy.close()
        await server.stop()

    asyncio.run(body())


def test_h2_respects_the_16_kib_frame_size_with_large_messages():
    """With 16 KiB frames advertised, a 1 MiB message crosses 64+ DATA frames both ways."""

    async def body():
        server = await started()
        client = await Client.connect(server)
        big = bytes(range(256)) * 4096
        client.h2.send_headers(1, HEADERS)
        payload = message(big)
        sent = 0
        while sent < len(payload):
            await client.pump(lambda: client.h2.local_flow_control_window(1) > 0 and client.h2.max_outbound_frame_size > 0)
            n = min(client.h2.local_flow_control_window(1), client.h2.max_outbound_frame_size, len(payload) - sent)
            client.h2.send_data(1, payload[sent : sent + n], end_stream=sent + n == len(payload))
            sent += n
        await client.pump(lambda: client.ended(1), timeout=20)
        got = b"".join(e.data for e in client.events if isinstance(e, DataReceived) and e.stream_id == 1)
        assert got == payload and client.status(1) == "0"
        client.close()
        await server.stop()

    asyncio.run(body())
