"""A core Connection driven through the ext_proc transport, with a fake HCM behind it.

The transport (bridge/transport/ext_proc.py ExtProcCall) gets ProcessingRequests from a fake
gRPC stream, as the bridge's gRPC server hands them over, and its answers are parsed back. The
fake HCM is an ``h2`` server-side connection, as Envoy's HTTP connection manager is: it decodes
the bridge's CONNECT streams and answers them (200 + DATA, 503 with response flags, RST_STREAM,
GOAWAY). The codec is awesomerpc, loaded through the registry as the bridge loads it.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections import defaultdict
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset

from metabridge import wire
from metabridge._proto.network_ext_proc_pb2 import ProcessingRequest, ProcessingResponse
from metabridge.config.model import CodecConfig, HeaderMatch, ListenerConfig, RouteConfig, WeightedCluster
from metabridge.core.router import Router
from metabridge.core.runtime import ListenerRuntime
from metabridge.registry import load_codec_class
from metabridge.transport.ext_proc import ExtProcCall

# The test's HCM is h2 with raw (bytes) header names.
CLUSTER_HEADER = wire.CLUSTER_HEADER.encode()
UPSTREAM_HOST_HEADER = wire.UPSTREAM_HOST_HEADER.encode()
RESPONSE_FLAGS_HEADER = wire.RESPONSE_FLAGS_HEADER.encode()

REPO_ROOT = Path(__file__).resolve().parents[2]
AwesomeRpcCodec = load_codec_class("codecs/awesomerpc.py:AwesomeRpcCodec", REPO_ROOT)
awesomerpc = sys.modules[AwesomeRpcCodec.__module__]
encode_frame = awesomerpc.encode_frame
HEADER = awesomerpc.HEADER

CLOSE = ProcessingResponse.CLOSE
# rsp_code of the reply awesomerpc's on_error builds for each error type.
ROUTE_NOT_FOUND, OVER_LIMIT, UNSPECIFIED, CLUSTER_NOT_FOUND, BAD_RESPONSE, NO_HEALTHY_UPSTREAM, TIMEOUT = 404, 429, 500, 501, 502, 503, 504


class InOrderCodec(AwesomeRpcCodec):
    """awesomerpc as if it had no request ids: responses are matched in request order."""

    has_request_id = False


def route(name: str, cmd: str, cluster: str, request_mutation=None, response_mutation=None) -> RouteConfig:
    return RouteConfig(
        name=name,
        headers=(HeaderMatch("cmd", "exact", cmd),),
        clusters=(WeightedCluster(cluster, 1),),
        request_mutation=dict(request_mutation or {}),
        response_mutation=dict(response_mutation or {}),
    )


ROUTES = (
    route("cmd-1", "1", "c1"),
    route("cmd-2", "2", "c2"),
    route("cmd-3-mutated", "3", "c1", request_mutation={"cmd": "30"}, response_mutation={"cmd": "31"}),
)


def in_loop(test):
    """Runs an async test in a fresh event loop (the connection uses the running loop for its timers)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """awesomerpc frames -> [(flow, cmd, rsp_code, body)]; the bytes must hold whole frames."""
    out, rest = [], memoryview(data)
    while rest:
        _, flow, length, cmd, rsp_code = HEADER.unpack_from(rest)
        out.append((flow, cmd, rsp_code, bytes(rest[HEADER.size : length])))
        rest = rest[length:]
    return out


def has_read(message: ProcessingResponse) -> bool:
    return message.HasField("read_data")


def has_write(message: ProcessingResponse) -> bool:
    return message.HasField("write_data")


class FakeHcm:
    """The server side of the HTTP/2 connection: what Envoy's HCM does with the bridge's tunnels."""

    def __init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.requests: dict[int, dict[bytes, bytes]] = {}
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.data_frames: dict[int, int] = defaultdict(int)  # DATA frames seen per stream
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}

    def feed(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                self.requests[event.stream_id] = dict(event.headers)
            elif isinstance(event, DataReceived):
                self.received[event.stream_id] += event.data
                self.data_frames[event.stream_id] += 1
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, StreamReset):
                self.reset[event.stream_id] = event.error_code

    def accept(self, stream_id: int, host: bytes = b"127.0.0.1:10001") -> None:
        self.h2.send_headers(stream_id, [(b":status", b"200"), (UPSTREAM_HOST_HEADER, host)])

    def refuse(self, stream_id: int, flags: bytes, status: bytes = b"503") -> None:
        self.h2.send_headers(stream_id, [(b":status", status), (RESPONSE_FLAGS_HEADER, flags)], end_stream=True)

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.h2.send_data(stream_id, data, end_stream=end_stream)

    def take(self) -> bytes:
        return self.h2.data_to_send()


class FakeStream:
    """The gRPC stream ExtProcCall answers on: records what it sends."""

    headers = {wire.LISTENER_METADATA_KEY: "test"}

    def __init__(self) -> None:
        self.sink = None  # called with the answers of each send

    def send(self, messages) -> None:
        self.sink([ProcessingResponse.FromString(m) for m in messages])

    def finish(self) -> None:
        pass


class Harness:
    """One connection, through the ext_proc transport, with a fake HCM behind it and a record
    of what the client got."""

    def __init__(self, routes=ROUTES, codec_cls=AwesomeRpcCodec, clusters=None, **listener_options) -> None:
        self._accepted: set[int] = set()  # answer_all: tunnels accepted, requests answered
        self._answered: set[int] = set()
        config = ListenerConfig(name="test", address="127.0.0.1", port=0, codec="awesomerpc", routes=tuple(routes), **listener_options)
        self.runtime = ListenerRuntime(config=config, codec_cls=codec_cls, codec_entry=CodecConfig(codec_cls.__name__, codec_cls.__name__), router=Router(config.routes), clusters=clusters or {})
        self.emitted: list[ProcessingResponse] = []
        self._answers: list[ProcessingResponse] | None = None
        stream = FakeStream()
        stream.sink = self._sink
        self.call = ExtProcCall(stream, {"test": self.runtime}, "test-1")
        self.hcm = FakeHcm()
        self.client = bytearray()  # every byte the client was sent

    @property
    def session(self):
        """The core Connection (created by the transport with the first ProcessingRequest)."""
        return self.call.connection

    def _sink(self, messages: list[ProcessingResponse]) -> None:
        if self._answers is not None:
            self._answers.extend(messages)
        else:
            self._on_emit(messages)

    def _message(self, direction: str, data: bytes, end_of_stream: bool) -> list[ProcessingResponse]:
        request = ProcessingRequest()
        part = getattr(request, direction)
        part.data = data
        part.end_of_stream = end_of_stream
        self._answers = []
        try:
            self.call.on_message(request.SerializeToString())
            return self._answers
        finally:
            self._answers = None

    @property
    def stats(self):
        return self.runtime.stats

    def _deliver(self, messages: list[ProcessingResponse]) -> list[ProcessingResponse]:
        for message in messages:
            if has_read(message) and message.read_data.data:
                self.hcm.feed(message.read_data.data)
            if has_write(message):
                self.client += message.write_data.data
        return messages

    def _on_emit(self, messages: list[ProcessingResponse]) -> None:
        self.emitted.extend(messages)
        self._deliver(messages)

    def read(self, data: bytes, end_of_stream: bool = False) -> list[ProcessingResponse]:
        return self._deliver(self._message("read_data", data, end_of_stream))

    def write(self, end_of_stream: bool = False, data: bytes | None = None) -> list[ProcessingResponse]:
        """Hand HCM's pending HTTP/2 bytes (or ``data``) to the connection as Envoy's write_data."""
        return self._deliver(self._message("write_data", self.hcm.take() if data is None else data, end_of_stream))

    def close(self) -> None:
        self.call.on_reset()

    def client_frames(self) -> list[tuple[int, int, int, bytes]]:
        return parse_frames(bytes(self.client))

    def answer_all(self, body: bytes = b"ok") -> None:
        """HCM accepts every new tunnel and the backend answers every request it has not
        answered yet (once each), with ``body``."""
        for sid, data in self.hcm.received.items():
            if sid not in self._accepted:
                self.hcm.accept(sid)
                self._accepted.add(sid)
            for flow, cmd, _, _ in parse_frames(bytes(data)):
                if flow not in self._answered:
                    self._answered.add(flow)
                    self.hcm.send(sid, encode_frame(flow, cmd, body))
        self.write()


async def wait_until(condition, what: str, limit: float = 5.0) -> None:
    """Let the loop run (timers fire) until condition() holds; bounded."""
    for _ in range(int(limit / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


