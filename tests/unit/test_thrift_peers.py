"""The thriftpy2 peers against each other on loopback sockets, and the Thrift codec against the
bytes they really exchange (recorded by a relay between client and server)."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest
from thriftpy2.thrift import TApplicationException

from metabridge.sdk.codec import Error, ErrorType, Metadata, MessageType, ResponseStatus
from metabridge.registry import load_codec_class
from tests.helpers import decode_frames
from tests.peers.thrift_peers import (
    BUFFERED_COMPACT,
    FRAMED_BINARY,
    LOOPBACK,
    EchoServer,
    Variant,
    client_for,
    echo_thrift,
    sample_payload,
    spawn_server,
)
from tests.peers.tcp_relay import TcpRelay

REPO_ROOT = Path(__file__).resolve().parents[2]
ThriftCodec = load_codec_class("codecs/thrift:ThriftCodec", REPO_ROOT)
SOCKET_TIMEOUT = 30.0  # a bound on hangs, not a speed expectation

PEER_VARIANTS = [FRAMED_BINARY, BUFFERED_COMPACT, Variant("buffered", "binary", multiplexed=True), Variant("framed", "compact", multiplexed=True), Variant("framed", "binary", strict=False)]


def decode_stream(data: bytes, chunk: int = 7, **options) -> tuple[ThriftCodec, list[Metadata]]:
    """Decode a recorded byte stream fed in small pieces, as it would arrive from a socket."""
    codec, buffer, decoded = ThriftCodec(options=options), bytearray(), []
    for start in range(0, len(data), chunk):
        buffer += data[start : start + chunk]
        decoded += decode_frames(codec, buffer)
    assert buffer == b"", f"{len(buffer)} recorded bytes left undecoded"
    return codec, decoded


def exercise(client, server_handler) -> None:
    """One of each message kind: calls, a oneway, replies, a declared exception, an EXCEPTION."""
    assert client.whoami() == server_handler.name
    assert client.echo("héllo") == "héllo"
    client.notify("note-1")
    with pytest.raises(echo_thrift.EchoError) as declared:
        client.fail("declared one", True)
    assert declared.value.message == "declared one"
    with pytest.raises(TApplicationException) as undeclared:
        client.fail("internal one", False)
    assert (undeclared.value.type, undeclared.value.message) == (TApplicationException.INTERNAL_ERROR, "internal one")
    assert client.mirror(sample_payload(7)) == sample_payload(7)
    assert server_handler.wait_for_notification("note-1")


@pytest.mark.parametrize("variant", PEER_VARIANTS, ids=lambda v: v.name)
def test_peers_talk_directly(variant):
    with EchoServer("v1", variant) as server, client_for(server.host, server.port, variant) as client:
        exercise(client, server.handler)
        assert client.ping() is None
    assert server.errors == []


def test_whoami_tells_servers_apart():
    with EchoServer("v1") as one, EchoServer("v2") as two:
        with client_for(LOOPBACK, one.port) as a, client_for(LOOPBACK, two.port) as b:
            assert (a.whoami(), b.whoami()) == ("v1", "v2")


def test_server_in_a_child_process():
    with spawn_server("child", BUFFERED_COMPACT) as server:
        with client_for(server.host, server.port, BUFFERED_COMPACT) as client:
            assert client.whoami() == "child"
            client.notify("from-test")
            assert server.wait_for_notification("from-test")
    assert server.process.returncode is not None


@pytest.mark.parametrize("variant", PEER_VARIANTS, ids=lambda v: v.name)
def test_codec_decodes_recorded_traffic(variant):
    with EchoServer("v1", variant) as server, TcpRelay(server.host, server.port) as relay:
        with client_for(LOOPBACK, relay.port, variant) as client:
            exercise(client, server.handler)
        assert relay.wait_closed(SOCKET_TIMEOUT), "the relayed connection did not close"
        to_server, to_client = relay.snapshot()

    # The old non-strict binary encoding (both peers write it here) has nothing to detect: it
    # needs the protocol configured.
    options = {} if variant.strict else {"protocol": "binary", "transport": variant.transport}
    requests_codec, requests = decode_stream(to_server, **options)
    prefix = "Echo:" if variant.multiplexed else ""
    assert [(m.operation_name, m.message_type) for m in requests] == [
        (prefix + "whoami", MessageType.REQUEST),
        (prefix + "echo", MessageType.REQUEST),
        (prefix + "notify", MessageType.ONEWAY),
        (prefix + "fail", MessageType.REQUEST),
        (prefix + "fail", MessageType.REQUEST),
        (prefix + "mirror", MessageType.REQUEST),
    ]
    assert [m.headers["method"] for m in requests] == ["whoami", "echo", "notify", "fail", "fail", "mirror"]
    assert all(m.request_id == 0 for m in requests)  # thriftpy2 sends seqid 0 on every call
    assert (requests_codec.transport, requests_codec.protocol) == (variant.transport, variant.protocol)
    assert b"".join(m.frame for m in requests) == to_server

    responses_codec, responses = decode_stream(to_client, **options)
    assert [(m.operation_name, m.message_type, m.response_status) for m in responses] == [
        ("whoami", MessageType.RESPONSE, ResponseStatus.OK),
        ("echo", MessageType.RESPONSE, ResponseStatus.OK),
        ("fail", MessageType.RESPONSE, ResponseStatus.ERROR),  # declared EchoError: result field 1
        ("fail", MessageType.ERROR, ResponseStatus.ERROR),  # TApplicationException
        ("mirror", MessageType.RESPONSE, ResponseStatus.OK),
    ]
    assert responses[2].properties["exception_field_id"] == 1
    assert responses[3].properties["exception_message"] == "internal one"
    assert (responses_codec.transport, responses_codec.protocol) == (variant.transport, variant.protocol)
    assert b"".join(m.frame for m in responses) == to_client


class ErrorServer:
    """A server that answers every request with the codec's on_error reply (as the bridge does
    for a request it cannot route); records the requests it decoded."""

    def __init__(self, error: Error) -> None:
        self.error = error
        self.requests: list[Metadata] = []
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(SOCKET_TIMEOUT)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._listener, contextlib.closing(self._listener.accept()[0]) as conn:
            conn.settimeout(SOCKET_TIMEOUT)
            codec, buffer = ThriftCodec(), bytearray()
            while data := conn.recv(65536):
                buffer += data
                for metadata in decode_frames(codec, buffer):
                    self.requests.append(metadata)
                    conn.sendall(codec.on_error(metadata, self.error))

    def wait_closed(self) -> None:
        self._thread.join(SOCKET_TIMEOUT)
        assert not self._thread.is_alive()


@pytest.mark.parametrize("variant", [FRAMED_BINARY, BUFFERED_COMPACT, Variant("framed", "compact", multiplexed=True)], ids=lambda v: v.name)
def test_real_client_raises_the_on_error_reply(variant):
    server = ErrorServer(Error(ErrorType.ROUTE_NOT_FOUND, "no route for this method"))
    with client_for(LOOPBACK, server.port, variant) as client:
        with pytest.raises(TApplicationException) as first:
            client.echo("x")
        client.notify("unanswered")  # oneway: on_error sends nothing, the stream stays in step
        with pytest.raises(TApplicationException) as second:
            client.whoami()
    server.wait_closed()
    for raised in (first.value, second.value):
        assert raised.type == TApplicationException.UNKNOWN_METHOD
        assert raised.message == "ROUTE_NOT_FOUND: no route for this method"
    assert [m.message_type for m in server.requests] == [MessageType.REQUEST, MessageType.ONEWAY, MessageType.REQUEST]
