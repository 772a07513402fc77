"""The bridge's own gRPC server, spoken to by grpcio's client (an independent HTTP/2 + gRPC peer).

Envoy's gRPC client is covered by the integration tests; these check the protocol edges grpcio
can reach: streaming both ways, large messages across frames and flow-control windows, errors
as gRPC statuses, cancellation, health checks and shutdown.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from metabridge.transport.grpc_server import INTERNAL, GrpcError, GrpcServer, Stream, StreamHandler
from metabridge.transport.ext_proc import HealthCall, SERVICE_NAME

ECHO = "/test.Echo/Chat"


class EchoCall(StreamHandler):
    """Echoes each message; ``boom`` raises, ``deny`` fails the call, ``bye`` ends it."""

    resets: list[str] = []

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def on_message(self, message: bytes) -> None:
        if message == b"boom":
            raise ValueError("handler bug")
        if message == b"deny":
            raise GrpcError(INTERNAL, "denied: ü")
        if message == b"bye":
            self.stream.finish()
            return
        self.stream.send([message])

    def on_end(self) -> None:
        self.stream.finish()

    def on_reset(self) -> None:
        EchoCall.resets.append(self.stream.headers.get(":path"))


def identity(data: bytes) -> bytes:
    return data


async def start(max_message: int = 64 * 1024 * 1024, **limits) -> tuple[GrpcServer, str]:
    server = GrpcServer(
        {
            ECHO: EchoCall,
            "/grpc.health.v1.Health/Check": lambda stream: HealthCall(stream, watch=False),
            "/grpc.health.v1.Health/Watch": lambda stream: HealthCall(stream, watch=True),
        },
        max_message=max_message,
        **limits,
    )
    await server.start("127.0.0.1:0")
    return server, f"127.0.0.1:{server.port}"


def chat(channel: grpc.aio.Channel):
    return channel.stream_stream(ECHO, request_serializer=identity, response_deserializer=identity)


def run(coro):
    return asyncio.run(coro)


def test_stream_echoes_every_message_in_order():
    async def body():
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            call = chat(channel)()
            for i in range(200):
                await call.write(b"m%d" % i)
            await call.done_writing()
            got = [m async for m in call]
            assert got == [b"m%d" % i for i in range(200)]
            assert await call.code() == grpc.StatusCode.OK
        await server.stop()

    run(body())


@pytest.mark.parametrize("size", [0, 1, 16 * 1024 + 7, 1024 * 1024, 5 * 1024 * 1024])
def test_large_messages_cross_frames_and_flow_control_windows(size):
    async def body():
        server, address = await start()
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            call = chat(channel)()
            for _ in range(3):
                await call.write(payload)
                assert await call.read() == payload
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        await server.stop()

    run(body())


def test_handler_error_ends_that_call_only():
    async def body():
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            other = chat(channel)()
            await other.write(b"before")
            assert await other.read() == b"before"
            broken = chat(channel)()
            await broken.write(b"boom")
            assert await broken.code() == grpc.StatusCode.INTERNAL
            assert "ValueError: handler bug" in await broken.details()
            denied = chat(channel)()
            await denied.write(b"deny")
            assert await denied.code() == grpc.StatusCode.INTERNAL
            assert await denied.details() == "denied: ü"
            await other.write(b"after")
            assert await other.read() == b"after"
            await other.done_writing()
            assert await other.code() == grpc.StatusCode.OK
        await server.stop()

    run(body())


def test_server_may_end_the_call_first():
    async def body():
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            call = chat(channel)()
            await call.write(b"hi")
            await call.write(b"bye")
            assert await call.read() == b"hi"
            assert await call.code() == grpc.StatusCode.OK
        await server.stop()

    run(body())


def test_unknown_method_is_unimplemented():
    async def body():
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/test.Echo/Nope", request_serializer=identity, response_deserializer=identity)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"x")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await server.stop()

    run(body())


def test_message_over_the_limit_is_resource_exhausted():
    async def body():
        server, address = await start(max_message=1000)
        async with grpc.aio.insecure_channel(address) as channel:
            call = chat(channel)()
            await call.write(b"x" * 1001)
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = chat(channel)()
            await ok.write(b"x" * 1000)
            assert await ok.read() == b"x" * 1000
            await ok.done_writing()
        await server.stop()

    run(body())


def test_client_cancel_resets_the_handler():
    async def body():
        EchoCall.resets.clear()
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            call = chat(channel)()
            await call.write(b"a")
            assert await call.read() == b"a"
            call.cancel()
            for _ in range(100):
                if EchoCall.resets:
                    break
                await asyncio.sleep(0.01)
        assert EchoCall.resets == [ECHO]
        await server.stop()

    run(body())


def test_health_check_and_watch():
    async def body():
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        await server.stop()

    run(body())


def test_stop_lets_running_calls_finish_then_cuts_them():
    async def body():
        server, address = await start()
        async with grpc.aio.insecure_channel(address) as channel:
            call = chat(channel)()
            await call.write(b"a")
            assert await call.read() == b"a"
            stopping = asyncio.ensure_future(server.stop(grace=1.5))  # long enough for a loaded CI machine
            await asyncio.sleep(0.1)
            await call.write(b"still served during the grace period")
            assert await call.read() == b"still served during the grace period"
            await stopping
            assert await call.code() != grpc.StatusCode.OK
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(address.rsplit(":", 1)[1]))) != 0

    run(body())


def test_not_http2_gets_goaway_and_close():
    async def body():
        server, address = await start()
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 2)  # read until the server closes
        assert b"bad connection preface" in received
        writer.close()
        async with grpc.aio.insecure_channel(address) as channel:  # the server is still fine
            call = chat(channel)()
            await call.write(b"ok")
            assert await call.read() == b"ok"
            await call.done_writing()
        await server.stop()

    run(body())


def test_process_over_grpcio_reaches_a_session():
    """The bridge's own Process method, called by grpcio's generated ext_proc client."""
    from bench.stacks import bridge_listener_config
    from bench import wire
    from metabridge._proto import network_ext_proc_pb2 as pb
    from metabridge._proto.network_ext_proc_pb2_grpc import NetworkExternalProcessorStub
    from metabridge.config.model import parse
    from metabridge.core.runtime import build_runtimes
    from metabridge.transport.ext_proc import serve
    from metabridge.wire import LISTENER_METADATA_KEY

    async def body():
        runtimes = build_runtimes(parse(bridge_listener_config(wire.AWESOMERPC, routes=1, listen_port=1, backend_port=2)))
        server = await serve("127.0.0.1:0", runtimes)
        address = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = NetworkExternalProcessorStub(channel)
            call = stub.Process(metadata=((LISTENER_METADATA_KEY, "bench"),))
            await call.write(pb.ProcessingRequest(read_data=pb.Data(data=wire.request_template(wire.AWESOMERPC, 10).build(7))))
            answer = await call.read()
            # The request went into a new CONNECT tunnel: HTTP/2 for Envoy's connection manager.
            assert answer.read_data.data.startswith(b"PRI * HTTP/2.0")
            assert runtimes["bench"].stats.request_twoway == 1
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK

            # The call fails at its headers, before any message.
            unknown = stub.Process(metadata=((LISTENER_METADATA_KEY, "nope"),))
            assert await unknown.code() == grpc.StatusCode.NOT_FOUND
            assert "no listener 'nope'" in await unknown.details()
        await server.stop()

    run(body())


def test_unix_socket_is_replaced_at_start_and_removed_at_stop(tmp_path):
    path = tmp_path / "bridge.sock"
    path.write_text("stale")

    async def body():
        server = GrpcServer({ECHO: EchoCall})
        await server.start(f"unix:{path}")
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            call = chat(channel)()
            await call.write(b"over a unix socket")
            assert await call.read() == b"over a unix socket"
            await call.done_writing()
        await server.stop()

    run(body())
    assert not path.exists()


def test_raw_http2_client_edges():
    """What grpcio's client never sends, from the h2 library as client: padded and split DATA,
    a message spread over frames, a header block in CONTINUATION frames, PING, trailers that
    end the call, and a small receive window the server must respect."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, PingAckReceived, ResponseReceived, StreamEnded, TrailersReceived

    async def body():
        server, address = await start(max_header_list_size=64 * 1024)  # the headers below are ~29 KB
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        h2.initiate_connection()  # default 65,535-byte windows: the server must wait for updates
        events: list = []

        async def pump(until, timeout=5.0):
            writer.write(h2.data_to_send())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not until():
                data = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
                assert data, "server closed the connection"
                for ev in h2.receive_data(data):
                    events.append(ev)
                    if isinstance(ev, DataReceived):
                        h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                writer.write(h2.data_to_send())

        big = bytes(range(256)) * 1024  # 256 KiB: four times the client's window
        message = b"\x00" + len(big).to_bytes(4, "big") + big
        headers = [(":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "x"), ("content-type", "application/grpc")]
        headers += [(f"x-filler-{i}", "v" * 200) for i in range(120)]  # > 16 KiB of headers: CONTINUATION
        h2.send_headers(1, headers)
        await pump(lambda: h2.local_flow_control_window(1) > len(message))  # the server's SETTINGS and window
        h2.send_data(1, message[:3], pad_length=7)  # the 5-byte prefix itself split
        for offset in range(3, len(message), 10000):
            h2.send_data(1, message[offset : offset + 10000])
        h2.ping(b"12345678")
        await pump(lambda: any(isinstance(e, PingAckReceived) for e in events) and sum(len(e.data) for e in events if isinstance(e, DataReceived)) >= len(message))
        assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == message
        assert any(isinstance(e, ResponseReceived) for e in events)

        h2.send_headers(1, [("x-trailer", "done")], end_stream=True)  # trailers end the call
        await pump(lambda: any(isinstance(e, StreamEnded) for e in events))
        trailers = next(dict(e.headers) for e in events if isinstance(e, TrailersReceived))
        assert trailers["grpc-status"] == "0"
        writer.close()
        await server.stop()

    run(body())


def _h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0)  # preface and empty SETTINGS


@pytest.mark.parametrize(
    "frames, code, reason",
    [
        (_h2_frame(0, 0, 1, b"x"), 1, "DATA on idle stream 1"),
        (_h2_frame(4, 0, 0, b"\x00\x04\x00\x00"), 6, "multiple of 6"),
        (_h2_frame(4, 0, 0, b"\x00\x05\x00\x00\x00\x01"), 1, "MAX_FRAME_SIZE 1 out of range"),
        (_h2_frame(8, 0, 0, b"\x7f\xff\xff\xff"), 3, "connection window above"),
        (_h2_frame(8, 0, 0, b"\x00\x01"), 6, "WINDOW_UPDATE must be 4 bytes"),
        (_h2_frame(9, 4, 1, b""), 1, "unexpected CONTINUATION"),
        (_h2_frame(5, 4, 1, b"\x00\x00\x00\x02"), 1, "push"),
        (_h2_frame(1, 4, 2, b"\x82"), 1, "odd-numbered"),  # a client opens odd streams only
        (_h2_frame(1, 4 | 8, 1, b"\x09\x82"), 1, "padding longer than the frame"),
        (_h2_frame(1, 4, 1, b"\xff\xff\xff\xff\xff"), 9, "bad HPACK block"),
    ],
)
def test_http2_protocol_errors_get_goaway_with_their_code_and_close(frames, code, reason):
    async def body():
        server, address = await start()
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_HELLO + frames)
        received = await asyncio.wait_for(reader.read(), 2)  # until the server closes
        writer.close()
        goaway = received.rfind(b"\x07\x00\x00\x00\x00\x00")  # type GOAWAY, no flags, stream 0
        assert goaway >= 3, received
        payload = received[goaway + 6 :]
        assert int.from_bytes(payload[4:8], "big") == code
        assert reason in payload[8:].decode()
        await server.stop()

    run(body())


def test_compressed_and_truncated_messages_end_only_their_call():
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ResponseReceived, TrailersReceived

    async def body():
        server, address = await start()
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        h2.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "x"), ("content-type", "application/grpc")]
        h2.send_headers(1, headers)
        h2.send_data(1, b"\x01\x00\x00\x00\x01z")  # compressed flag set
        h2.send_headers(3, headers)
        h2.send_data(3, b"\x00\x00\x00\x00\x09abc", end_stream=True)  # ends 6 bytes short
        writer.write(h2.data_to_send())
        trailers: dict[int, dict] = {}
        while len(trailers) < 2:
            data = await asyncio.wait_for(reader.read(65536), 2)
            assert data, "the server closed the connection"
            for ev in h2.receive_data(data):
                # A trailers-only answer is a response to h2; either way it carries grpc-status.
                if isinstance(ev, (ResponseReceived, TrailersReceived)) and "grpc-status" in dict(ev.headers):
                    trailers[ev.stream_id] = dict(ev.headers)
            writer.write(h2.data_to_send())
        assert trailers[1]["grpc-status"] == "12" and "compressed" in trailers[1]["grpc-message"]
        assert trailers[3]["grpc-status"] == "13" and "inside a gRPC message" in trailers[3]["grpc-message"]
        writer.close()
        await server.stop()

    run(body())
