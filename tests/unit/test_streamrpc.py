"""examples/streamrpc: the codec at the byte level (loaded through the registry, as a config loads
it), then the example client against the example backend directly, on loopback sockets."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metabridge.config.model import load
from metabridge.registry import load_codec_class, load_codecs
from metabridge.sdk.codec import CodecError, DecodeStatus, Error, ErrorType, FrameTooLarge, MalformedFrame, Metadata, MessageType, ResponseStatus
from examples.streamrpc.client import ConnectionClosed, StreamRpcClient
from examples.streamrpc.protocol import FLAG_ERROR, HEADER, HEADER_SIZE, FrameType, ProtocolError, encode_frame, parse_frame
from examples.streamrpc.server import serve
from tests.helpers import decode_frames

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "examples/streamrpc/streamrpc.yaml"
StreamRpcCodec = load_codec_class("examples/streamrpc:StreamRpcCodec", REPO_ROOT)
HOST = "127.0.0.1"

INIT = encode_frame(FrameType.INIT, 7, b"5", {"method": "count", "service": "demo"})
# Every kind of frame, as either side sends it: (frame, message type, stream id).
FRAMES = [
    (INIT, MessageType.STREAM_INIT, 7),
    (encode_frame(FrameType.DATA, 7, b"42"), MessageType.STREAM_DATA, 7),
    (encode_frame(FrameType.HALF_CLOSE, 7), MessageType.STREAM_CLOSE_ONE_WAY, 7),
    (encode_frame(FrameType.CLOSE, 7, headers={"server": "v1"}), MessageType.STREAM_CLOSE_TWO_WAY, 7),
    (encode_frame(FrameType.REQUEST, 8, b"", {"method": "whoami"}), MessageType.REQUEST, None),
    (encode_frame(FrameType.RESPONSE, 8, b"v1"), MessageType.RESPONSE, None),
]


def decode_one(data: bytes, codec=None) -> Metadata:
    buffer, metadata = bytearray(data), Metadata()
    assert (codec or StreamRpcCodec()).decode(buffer, metadata) is DecodeStatus.DONE
    assert buffer == b""
    return metadata


# -- the codec --------------------------------------------------------------------------------


def test_known_bytes():
    frame = encode_frame(FrameType.REQUEST, 0x01020304, b"hi", {"Method": "whoami"})
    assert frame == b"SR" + bytes.fromhex("01" "05" "00" "01020304" "0000001e" "000d") + b"method=whoami" + b"hi"
    assert HEADER.size == HEADER_SIZE == 15


@pytest.mark.parametrize("data, message_type, stream_id", FRAMES)
def test_decode_every_frame_type(data, message_type, stream_id):
    metadata = decode_one(data)
    frame = parse_frame(data)
    assert metadata.message_type is message_type
    assert metadata.stream_id == stream_id
    assert metadata.request_id == frame.id  # the stream id for stream frames
    assert metadata.response_status is ResponseStatus.OK
    assert metadata.frame == data
    assert dict(metadata.headers) == frame.headers
    assert metadata.header_size + metadata.body_size == len(data)
    assert data[metadata.header_size :] == frame.body


def test_init_headers_are_routable():
    metadata = decode_one(INIT)
    assert metadata.headers["method"] == "count" and metadata.headers["service"] == "demo"
    assert metadata.operation_name == "demo/count"


def test_error_flag_is_an_error_status():
    metadata = decode_one(encode_frame(FrameType.CLOSE, 3, b"boom", {"code": "x"}, FLAG_ERROR))
    assert metadata.message_type is MessageType.STREAM_CLOSE_TWO_WAY
    assert metadata.response_status is ResponseStatus.ERROR


def test_several_frames_in_one_buffer_round_trip_unchanged():
    codec, buffer = StreamRpcCodec(), bytearray(b"".join(data for data, _, _ in FRAMES))
    decoded = decode_frames(codec, buffer)
    assert buffer == b""
    assert [m.frame for m in decoded] == [data for data, _, _ in FRAMES]
    assert all(codec.encode(m, {}) is m.frame for m in decoded)


@pytest.mark.parametrize("data", [data for data, _, _ in FRAMES])
def test_truncated_at_every_byte_waits_and_consumes_nothing(data):
    codec = StreamRpcCodec()
    for cut in range(len(data)):
        buffer = bytearray(data[:cut])
        assert codec.decode(buffer, Metadata()) is DecodeStatus.WAIT_FOR_DATA
        assert buffer == data[:cut]
    decode_one(data, codec)  # and the same instance decodes it once whole


def test_oversized_frame_is_refused_from_its_header():
    frame = encode_frame(FrameType.DATA, 1, b"x" * 100)
    buffer = bytearray(frame[:HEADER_SIZE])  # the body has not arrived
    with pytest.raises(FrameTooLarge):
        StreamRpcCodec(max_frame_size=100).decode(buffer, Metadata())
    decode_one(frame, StreamRpcCodec(max_frame_size=len(frame)))


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"XX" + encode_frame(FrameType.DATA, 1)[2:], "magic"),
        (encode_frame(FrameType.DATA, 1)[:2] + b"\x02" + encode_frame(FrameType.DATA, 1)[3:], "version"),
        (HEADER.pack(b"SR", 1, 9, 0, 1, HEADER_SIZE, 0), "type"),
        (HEADER.pack(b"SR", 1, 2, 0, 1, HEADER_SIZE + 3, 4) + b"abc", "length"),
    ],
)
def test_bytes_that_are_not_streamrpc(data, problem):
    with pytest.raises(CodecError, match=problem):
        StreamRpcCodec().decode(bytearray(data), Metadata())


def test_bad_header_block_consumes_the_frame_and_names_it():
    data = HEADER.pack(b"SR", 1, FrameType.INIT, 0, 9, HEADER_SIZE + 5, 5) + b"novl!"
    buffer = bytearray(data + INIT)
    with pytest.raises(MalformedFrame) as raised:
        StreamRpcCodec().decode(buffer, Metadata())
    assert raised.value.request_id == 9
    assert buffer == INIT  # the stream stays in step


@pytest.mark.parametrize("data", [INIT, FRAMES[4][0]])
def test_mutation_adds_and_replaces_headers_on_init_and_requests(data):
    codec = StreamRpcCodec()
    metadata = decode_one(data)
    again = decode_one(codec.encode(metadata, {"X-Routed-By": "metabridge", "method": "renamed"}))
    assert again.headers["x-routed-by"] == "metabridge" and again.headers["method"] == "renamed"
    assert again.request_id == metadata.request_id and again.message_type is metadata.message_type
    assert again.frame[again.header_size :] == data[metadata.header_size :]  # body untouched


@pytest.mark.parametrize("data", [data for data, kind, _ in FRAMES if kind not in (MessageType.STREAM_INIT, MessageType.REQUEST)])
def test_mutation_leaves_other_frames_alone(data):
    metadata = decode_one(data)
    assert StreamRpcCodec().encode(metadata, {"x": "y"}) is metadata.frame


def test_mutation_that_cannot_be_written_is_a_codec_error():
    with pytest.raises(CodecError, match="mutation"):
        StreamRpcCodec().encode(decode_one(INIT), {"bad=key": "v"})


@pytest.mark.parametrize(
    "data, reply_type, kind",
    [
        (INIT, FrameType.CLOSE, MessageType.STREAM_CLOSE_TWO_WAY),
        (FRAMES[1][0], FrameType.CLOSE, MessageType.STREAM_CLOSE_TWO_WAY),
        (FRAMES[2][0], FrameType.CLOSE, MessageType.STREAM_CLOSE_TWO_WAY),
        (FRAMES[4][0], FrameType.RESPONSE, MessageType.RESPONSE),
    ],
)
@pytest.mark.parametrize("error_type", list(ErrorType))
def test_on_error_closes_the_stream_or_answers_the_call(data, reply_type, kind, error_type):
    codec = StreamRpcCodec()
    request = decode_one(data)
    reply = codec.on_error(request, Error(error_type, "no route for method"))
    decoded = decode_one(reply)
    assert decoded.message_type is kind
    assert decoded.request_id == request.request_id
    assert decoded.stream_id == request.stream_id
    assert decoded.response_status is ResponseStatus.ERROR
    assert decoded.headers["code"] == error_type.value
    frame = parse_frame(reply)
    assert (frame.type, frame.error, frame.body) == (reply_type, True, b"no route for method")


def test_encode_frame_refuses_what_cannot_be_framed():
    for bad in ({"": "v"}, {"a=b": "v"}, {"k": "line\nbreak"}):
        with pytest.raises(ProtocolError):
            encode_frame(FrameType.INIT, 1, headers=bad)
    with pytest.raises(ProtocolError):
        encode_frame(FrameType.DATA, 1 << 32)


def test_example_config_loads_with_its_codec():
    config = load(CONFIG)
    assert load_codecs(config)["streamrpc"].name == "streamrpc"
    assert [r.headers[0].value for r in config.listeners[0].routes] == ["echo", "sum|count", "whoami"]


# -- the client against the backend ----------------------------------------------------------


@pytest.fixture
def server():
    with serve(HOST, 0, "v1") as server:
        yield server


@pytest.fixture
def client(server):
    with StreamRpcClient(HOST, server.port, timeout=5.0) as client:
        yield client


def data_bodies(frames):
    return [f.body for f in frames if f.type is FrameType.DATA]


def test_client_streaming_sum(client):
    stream = client.open_stream("sum")
    for n in (1, 2, 39):
        stream.send(str(n).encode())
    stream.half_close()
    frames = stream.recv_until_closed()
    assert data_bodies(frames) == [b"42"]
    assert frames[-1].type is FrameType.CLOSE and not frames[-1].error
    assert {f.id for f in frames} == {stream.id}
    assert all(f.headers["server"] == "v1" for f in frames)


def test_server_streaming_count(client):
    frames = client.open_stream("count", b"5").recv_until_closed()
    assert data_bodies(frames) == [b"0", b"1", b"2", b"3", b"4"]
    assert frames[-1].type is FrameType.CLOSE


def test_bidirectional_echo_half_closes_after_the_client(client):
    stream = client.open_stream("echo")
    for word in (b"a", b"b"):
        stream.send(word)
        assert stream.recv().body == word  # one in, one out, while the stream is open
    stream.half_close()
    assert stream.recv().type is FrameType.HALF_CLOSE


def test_unary_whoami_sees_the_request_headers(client, server):
    reply = client.call("whoami", headers={"x-canary": "true"})
    assert reply.type is FrameType.RESPONSE and not reply.error
    assert reply.body == b"v1"
    assert reply.headers["x-canary"] == "true"
    assert server.seen[-1].headers == {"method": "whoami", "service": "demo", "x-canary": "true"}


def test_two_streams_and_calls_interleave_on_one_connection(client):
    total, echo = client.open_stream("sum"), client.open_stream("echo")
    total.send(b"10")
    echo.send(b"ping")
    assert client.call("whoami").body == b"v1"  # a unary call between stream frames
    total.send(b"20")
    echo.send(b"pong")
    counted = client.open_stream("count", b"3")
    total.half_close()
    echo.half_close()
    # Read them in a different order from the one they were opened and answered in.
    assert data_bodies(counted.recv_until_closed()) == [b"0", b"1", b"2"]
    assert [f.body for f in echo.recv_until_closed()] == [b"ping", b"pong", b""]
    assert data_bodies(total.recv_until_closed()) == [b"30"]
    assert len({total.id, echo.id, counted.id}) == 3


def test_errors_close_the_stream_or_answer_the_call(client):
    bad = client.open_stream("nosuch").recv()
    assert (bad.type, bad.error, bad.headers["code"]) == (FrameType.CLOSE, True, "unknown_method")
    stream = client.open_stream("sum")
    stream.send(b"not a number")
    bad = stream.recv()
    assert (bad.type, bad.error, bad.headers["code"]) == (FrameType.CLOSE, True, "bad_request")
    reply = client.call("nosuch")
    assert (reply.type, reply.error, reply.headers["code"]) == (FrameType.RESPONSE, True, "unknown_method")


def test_cancel_ends_a_stream_without_an_answer(client):
    stream = client.open_stream("sum")
    stream.send(b"1")
    stream.cancel()
    assert client.call("whoami").body == b"v1"  # the connection is still fine
    with pytest.raises(TimeoutError):
        stream.recv(timeout=0.3)


def test_garbage_closes_the_connection(client):
    client.send_raw(b"not streamrpc at all!")
    with pytest.raises(ConnectionClosed):
        client.recv(1)


def test_command_lines():
    server = subprocess.Popen(
        [sys.executable, "-m", "examples.streamrpc.server", "--port", "0", "--name", "cli"], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        port = int(re.search(r"listening on [\d.]+:(\d+)", server.stderr.readline()).group(1))
        out = subprocess.run(
            [sys.executable, "-m", "examples.streamrpc.client", "--port", str(port), "sum", "1", "2", "3"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        assert out.splitlines() == ["DATA id=1 server=cli body=6", "CLOSE id=1 server=cli body="]
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
