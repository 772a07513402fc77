"""The Dubbo codec against independent Dubbo peers on loopback sockets (no proxy yet).

A real consumer (dubbo-ssl-python) calls a provider built on dubbo-py's codec through a recording
TCP relay; the codec must read the recorded bytes the way the peers meant them. Frames the codec
makes (mutated requests, error replies, heartbeat replies) must be accepted by those peers.
"""

from __future__ import annotations

import importlib
import socket
from pathlib import Path

import pytest

from metabridge.sdk.codec import DecodeStatus, Error, ErrorType, MessageType, Metadata, ResponseStatus
from metabridge.registry import load_codec_class
from dubbo.codec.hessian2 import DubboHeartBeatResponse, DubboResponse
from tests.helpers import decode_frames
from tests.peers.dubbo_peers import (
    ConsumerError,
    ScriptedProvider,
    call,
    call_raw,
    decode_with_dubbo_py,
    decode_with_dubbo_ssl,
    start_provider,
)
from tests.peers.tcp_relay import TcpRelay

REPO_ROOT = Path(__file__).resolve().parents[2]
DubboCodec = load_codec_class("codecs/dubbo:DubboCodec", REPO_ROOT)
frames = importlib.import_module(DubboCodec.__module__.rpartition(".")[0] + ".frames")
GREETER = "com.example.Greeter"
HOST = "127.0.0.1"


def decode_all(data: bytes) -> list[Metadata]:
    buffer = bytearray(data)
    messages = decode_frames(DubboCodec(), buffer)
    assert not buffer, f"{len(buffer)} bytes left that do not make a whole frame"
    return messages


def read_frames(sock: socket.socket, count: int) -> list[Metadata]:
    """Read ``count`` whole frames from a socket (bounded by the socket's timeout)."""
    codec, buffer, messages = DubboCodec(), bytearray(), []
    while len(messages) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(messages)} of {count} frames"
        buffer += chunk
        messages += decode_frames(codec, buffer)
    return messages


@pytest.fixture
def provider():
    with start_provider(GREETER, version="1.0.0", name="greeter-v1") as running:
        yield running


def test_real_consumer_and_provider_bytes_decode_right(provider):
    with TcpRelay(provider.host, provider.port) as relay:
        assert call(HOST, relay.port, GREETER, "whoami") == "greeter-v1"
        assert call(HOST, relay.port, GREETER, "echo", ["héllo wörld €"], {"x-tag": "blue", "trace-id": "t-1"}, group="g1") == "héllo wörld €"
        seen = call(HOST, relay.port, GREETER, "attachments", [], {"x-tag": "green", "retries": 3})
        sent, answered = relay.snapshot()

    assert seen["x-tag"] == "green" and seen["interface"] == GREETER
    requests = decode_all(sent)
    assert [m.message_type for m in requests] == [MessageType.REQUEST] * 3
    assert [m.headers["method"] for m in requests] == ["whoami", "echo", "attachments"]
    assert [m.operation_name for m in requests] == [f"{GREETER}/whoami", f"{GREETER}/echo", f"{GREETER}/attachments"]
    assert all(m.headers["interface"] == GREETER and m.headers["version"] == "1.0.0" for m in requests)
    assert "group" not in requests[0].headers  # the consumer sends a null group: not routable
    assert requests[1].headers["group"] == "g1"
    assert requests[1].headers["x-tag"] == "blue" and requests[1].headers["trace-id"] == "t-1"
    assert requests[2].headers["x-tag"] == "green"
    assert "retries" not in requests[2].headers  # an int attachment is carried, not routable
    assert requests[1].properties["parameter_types"] == "Ljava/lang/String;"

    # The provider (the library's own decoder) saw the same calls with the same ids.
    assert [(c.request_id, c.method, c.version) for c in provider.received] == [
        (m.request_id, m.headers["method"], m.headers["version"]) for m in requests
    ]
    assert provider.received[1].attachments["x-tag"] == "blue"

    responses = decode_all(answered)
    assert [m.request_id for m in responses] == [m.request_id for m in requests]
    assert all(m.message_type is MessageType.RESPONSE and m.response_status is ResponseStatus.OK for m in responses)


def test_second_consumer_library_bytes_decode_right(provider):
    """dubbo-py's consumer encoder: a different layout of the same protocol (it even declares a
    String argument as 'S'); the codec still finds every attachment behind the arguments."""
    with TcpRelay(provider.host, provider.port) as relay:
        reply = call_raw(HOST, relay.port, GREETER, "echo", ["x" * 300], {"x-tag": "blue", "nested": {"a": [1, 2]}}, request_id=912)
        sent, answered = relay.wait_for(from_target=16)
    assert reply.status == 20 and reply.data == "x" * 300
    (request,) = decode_all(sent)
    assert request.request_id == 912
    assert request.headers["method"] == "echo" and request.headers["interface"] == GREETER
    assert request.headers["x-tag"] == "blue" and "nested" not in request.headers
    (response,) = decode_all(answered)
    assert response.request_id == 912 and response.message_type is MessageType.RESPONSE


def test_mutated_request_reaches_the_provider_with_the_new_attachments(provider):
    with TcpRelay(provider.host, provider.port) as relay:
        call(HOST, relay.port, GREETER, "attachments", [], {"x-tag": "blue"})
        sent, _ = relay.snapshot()
    codec = DubboCodec()
    (request,) = decode_all(sent)
    mutated = codec.encode(request, {"X-Tag": "green", "x-routed-by": "metabridge"})

    with socket.create_connection((provider.host, provider.port), timeout=5.0) as sock:
        sock.sendall(mutated)
        (response,) = read_frames(sock, 1)
    assert response.request_id == request.request_id and response.message_type is MessageType.RESPONSE
    attachments = decode_with_dubbo_py(response.frame).data
    assert attachments["x-tag"] == "green"
    assert attachments["x-routed-by"] == "metabridge"
    assert attachments["interface"] == GREETER
    assert provider.received[-1].attachments == attachments


# Which ErrorType is answered for which method the scripted provider receives.
ERROR_FOR_METHOD = {error_type.value: error_type for error_type in ErrorType}
EXPECTED_STATUS = {
    ErrorType.ROUTE_NOT_FOUND: 60,
    ErrorType.CLUSTER_NOT_FOUND: 60,
    ErrorType.NO_HEALTHY_UPSTREAM: 80,
    ErrorType.BAD_RESPONSE: 50,
    ErrorType.OVER_LIMIT: 100,
    ErrorType.TIMEOUT: 31,
    ErrorType.UNSPECIFIED: 80,
}


def answer_with_on_error(frame: bytes) -> bytes:
    codec = DubboCodec()
    (request,) = decode_all(frame)
    error_type = ERROR_FOR_METHOD[request.headers["method"]]
    return codec.on_error(request, Error(error_type, f"metabridge: {error_type.value} for {request.operation_name}"))


def test_on_error_replies_make_real_consumers_raise_instead_of_hanging():
    with ScriptedProvider(answer_with_on_error) as fake:
        for error_type, status in EXPECTED_STATUS.items():
            message = f"metabridge: {error_type.value} for {GREETER}/{error_type.value}"
            # dubbo-py's consumer reads every status; check the status and message it got.
            reply = call_raw(HOST, fake.port, GREETER, error_type.value, ["a"])
            assert (reply.status, reply.error) == (status, message)
            if status == 100:
                # dubbo-ssl-python's status table stops at 90 (it predates Dubbo's
                # SERVER_THREADPOOL_EXHAUSTED): its reader fails with KeyError and the call would
                # hang until its own timeout, so this status is checked with dubbo-py only.
                continue
            with pytest.raises(ConsumerError) as info:
                call(HOST, fake.port, GREETER, error_type.value, ["a"], timeout=5.0)
            assert message in str(info.value)
            assert type(info.value).__name__ == "DubboResponseException"  # not a timeout


def test_heartbeat_reply_is_accepted_by_both_libraries():
    codec = DubboCodec()
    heartbeat = Metadata()
    heartbeat_request = bytes.fromhex("dabbe2000000000000000321000000014e")
    assert codec.decode(bytearray(heartbeat_request), heartbeat) is DecodeStatus.DONE
    reply = codec.heartbeat_reply(heartbeat)

    decoded = decode_with_dubbo_py(reply)
    assert isinstance(decoded, DubboHeartBeatResponse) and decoded.id == 0x321
    assert decode_with_dubbo_ssl(reply) == (1, None)  # 1: a heartbeat response, null body

    # On a live connection: a heartbeat reply arriving before a real answer must be consumed
    # cleanly by the consumer, which then gets its result rather than a timeout.
    def heartbeat_then_answer(frame: bytes) -> bytes:
        (request,) = decode_all(frame)
        return reply + DubboResponse(request.request_id, DubboResponse.OK, "pong", None).encode()

    with ScriptedProvider(heartbeat_then_answer) as fake:
        assert call(HOST, fake.port, GREETER, "ping", timeout=5.0) == "pong"


def test_provider_answers_a_heartbeat_the_codec_reads(provider):
    with socket.create_connection((provider.host, provider.port), timeout=5.0) as sock:
        sock.sendall(frames.build_heartbeat(55, response=False))
        (answer,) = read_frames(sock, 1)
    assert answer.message_type is MessageType.HEARTBEAT and answer.request_id == 55
    assert provider.heartbeats == 1

