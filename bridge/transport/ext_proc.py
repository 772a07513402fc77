"""The ext_proc transport: Envoy's network ext_proc ``Process`` stream drives one core
Connection per client connection.

Envoy names the listener a stream belongs to in the gRPC initial metadata
(LISTENER_METADATA_KEY, set by the rendered bootstrap), which selects the codec and routes.
Only this module builds ProcessingRequest/ProcessingResponse messages. Each Envoy message gets
one answer in its own direction (which also stops Envoy's message_timeout); bytes for HCM
travel as read_data and bytes for the client as write_data, in the same batch when both exist.
"""

from __future__ import annotations

import itertools
import logging
import os

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from metabridge._proto.network_ext_proc_pb2 import ProcessingRequest, ProcessingResponse
from metabridge.core.clock import LoopClock
from metabridge.core.connection import Connection
from metabridge.core.runtime import ListenerRuntime
from metabridge.logs import event
from metabridge.transport.grpc_server import INVALID_ARGUMENT, NOT_FOUND, GrpcError, GrpcServer, Stream, StreamHandler, message_limit
from metabridge.wire import LISTENER_METADATA_KEY

log = logging.getLogger("metabridge.server")

SERVICE_NAME = "envoy.service.network_ext_proc.v3.NetworkExternalProcessor"


_CLOSE = ProcessingResponse(connection_status=ProcessingResponse.CLOSE).SerializeToString()
_EMPTY = b""


def _answer(direction: str, data: bytes, end_of_stream: bool = False) -> bytes:
    """A serialized ProcessingResponse carrying ``data`` as ``direction`` ("read_data" or
    "write_data").

    Fields are set in place: ProcessingResponse(read_data=Data(data=x)) copies the sub-message
    by serializing and re-parsing it (1.5 ms for 1 MiB, against 0.04 ms this way).
    """
    answer = ProcessingResponse()
    part = getattr(answer, direction)
    part.data = data
    if end_of_stream:
        part.end_of_stream = True
    return answer.SerializeToString()


_EMPTY_READ = _answer("read_data", _EMPTY)
_EMPTY_WRITE = _answer("write_data", _EMPTY)


class ExtProcCall(StreamHandler):
    """One ``Process`` stream (one downstream connection): its Connection, fed message by message."""

    __slots__ = ("stream", "connection", "_runtime", "_id", "_ended")

    def __init__(self, stream: Stream, runtimes: dict[str, ListenerRuntime], connection: str) -> None:
        self.stream = stream
        listener = stream.headers.get(LISTENER_METADATA_KEY)
        runtime = runtimes.get(listener)
        if runtime is None:
            event(log, logging.ERROR, "unknown_listener", listener=listener, known=sorted(runtimes), hint="re-render envoy/bootstrap.yaml from the config this bridge runs")
            raise GrpcError(NOT_FOUND, f"metabridge has no listener {listener!r}")
        # The core Connection (and what counts a client connection) starts with the first valid
        # ProcessingRequest: a stream that never carries one is counted apart.
        self.connection: Connection | None = None
        self._runtime = runtime
        self._id = connection
        self._ended = False

    def on_message(self, message: bytes | memoryview) -> None:
        if self._ended:
            return
        try:
            request = ProcessingRequest.FromString(message)
        except DecodeError as exc:
            raise GrpcError(INVALID_ARGUMENT, f"not a ProcessingRequest: {exc}") from exc
        connection = self.connection
        if connection is None:
            connection = self.connection = Connection(self._runtime, LoopClock(), self._id, wake=self._flush)
        if request.HasField("read_data"):
            data = request.read_data
            connection.receive_client(data.data, data.end_of_stream)
            self._send(answer_read=True)
        if request.HasField("write_data"):
            data = request.write_data
            connection.receive_upstream(data.data, data.end_of_stream)
            self._send(answer_write=True)

    def _flush(self) -> None:
        """The connection has output of its own (a timer fired, a filter resumed)."""
        if self.connection is not None:
            self._send()

    def _send(self, answer_read: bool = False, answer_write: bool = False) -> None:
        to_hcm, to_client, close, end = self.connection.take()
        out = []
        if to_hcm:
            out.append(_answer("read_data", to_hcm))
        elif answer_read:
            out.append(_EMPTY_READ)
        if to_client:
            out.append(_answer("write_data", to_client))
        elif answer_write and not end:
            out.append(_EMPTY_WRITE)
        if end:
            out.append(_answer("write_data", _EMPTY, end_of_stream=True))
        if close:
            out.append(_CLOSE)  # on its own: CLOSE in a message with bytes loses the bytes
        if out:
            self.stream.send(out)

    def on_end(self) -> None:
        self.on_reset()
        self.stream.finish()

    def on_reset(self) -> None:
        # Envoy ended the stream: the downstream connection is gone.
        if self._ended:
            return
        self._ended = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
        else:
            self._runtime.stats.ext_proc_stream_without_request += 1


class HealthCall(StreamHandler):
    """grpc.health.v1 ``Check`` (and ``Watch``, which reports once and stays open)."""

    def __init__(self, stream: Stream, watch: bool) -> None:
        self.stream = stream
        self.watch = watch
        self.service: str | None = None

    def on_message(self, message: bytes) -> None:
        self.service = health_pb2.HealthCheckRequest.FromString(message).service
        if self.watch:
            self._report()

    def on_end(self) -> None:
        if not self.watch:
            self._report()
        self.stream.finish()

    def _report(self) -> None:
        if self.service not in _SERVING:
            raise GrpcError(NOT_FOUND, f"unknown service {self.service!r}")
        self.stream.send([health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()])


_SERVING = ("", SERVICE_NAME)


def serve_methods(runtimes: dict[str, ListenerRuntime]) -> dict:
    """The bridge's gRPC methods: ext_proc's Process and grpc.health.v1."""
    streams = itertools.count(1)
    pid = os.getpid()
    return {
        f"/{SERVICE_NAME}/Process": lambda stream: ExtProcCall(stream, runtimes, f"{pid}-{next(streams)}"),
        "/grpc.health.v1.Health/Check": lambda stream: HealthCall(stream, watch=False),
        "/grpc.health.v1.Health/Watch": lambda stream: HealthCall(stream, watch=True),
    }


async def serve(address: str, runtimes: dict[str, ListenerRuntime], limits: dict | None = None) -> GrpcServer:
    """Start the gRPC server (ext_proc + grpc.health.v1) on ``address`` and return it;
    ``limits``: GrpcServer keywords (the config's bridge.grpc)."""
    limits = dict(limits or {})
    max_message = limits.pop("max_message", None) or message_limit(runtime.config.max_frame_size for runtime in runtimes.values())
    server = GrpcServer(serve_methods(runtimes), max_message=max_message, **limits)
    try:
        await server.start(address)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    event(log, logging.INFO, "bridge_listening", address=address, listeners=sorted(runtimes))
    return server
