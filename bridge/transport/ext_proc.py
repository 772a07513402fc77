"""The bridge's gRPC service: Envoy's network ext_proc ``Process`` stream, one Session each.

Envoy names the listener a stream belongs to in the gRPC initial metadata
(LISTENER_METADATA_KEY, set by the rendered bootstrap), which selects the codec and routes.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from bridge._proto.network_ext_proc_pb2 import ProcessingRequest, ProcessingResponse
from bridge.sdk.codec import Codec
from bridge.config.model import Config, ConfigError, ListenerConfig, load
from bridge.transport.grpc_server import INVALID_ARGUMENT, NOT_FOUND, GrpcError, GrpcServer, Stream, StreamHandler
from bridge.logs import event
from bridge.registry import CodecLoadError, load_codecs
from bridge.core.router import Router
from bridge.core.connection import Session
from bridge.stats import ListenerStats
from bridge.wire import LISTENER_METADATA_KEY

log = logging.getLogger("metabridge.server")

SERVICE_NAME = "envoy.service.network_ext_proc.v3.NetworkExternalProcessor"


@dataclass
class ListenerRuntime:
    """What every session of one listener shares."""

    config: ListenerConfig
    codec_cls: type[Codec]
    codec_options: dict
    router: Router
    stats: ListenerStats = field(default_factory=ListenerStats)

    @property
    def name(self) -> str:
        return self.config.name

    def new_codec(self) -> Codec:
        return self.codec_cls(max_frame_size=self.config.max_frame_size, options=self.codec_options)


def build_runtimes(config: Config) -> dict[str, ListenerRuntime]:
    codecs = load_codecs(config)
    runtimes = {}
    for listener in config.listeners:
        runtime = ListenerRuntime(
            config=listener,
            codec_cls=codecs[listener.codec],
            codec_options=config.codecs[listener.codec].options,
            router=Router(listener.routes),
        )
        try:
            runtime.new_codec()  # a codec that rejects its options fails here, at start-up
        except Exception as exc:
            raise CodecLoadError(f"{config.source}: codecs.{listener.codec}.options: {type(exc).__name__}: {exc}") from exc
        runtimes[listener.name] = runtime
    return runtimes


def reload_routes(runtimes: dict[str, ListenerRuntime], path: str) -> None:
    """Re-read the config file and swap in each listener's new routes and timeouts.

    Running sessions pick the new routes up on their next request; nothing is disconnected.
    Changes that need Envoy's bootstrap re-rendered (listeners, ports, codecs, clusters) are
    reported and left alone. A config that does not load leaves everything as it was.
    """
    try:
        config = load(path)
    except (ConfigError, OSError) as exc:
        event(log, logging.ERROR, "reload_failed_keeping_old_routes", config=path, error=str(exc))
        return
    new = {listener.name: listener for listener in config.listeners}
    for name, runtime in runtimes.items():
        listener = new.pop(name, None)
        if listener is None or listener.codec != runtime.config.codec or listener.port != runtime.config.port:
            event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="listener removed or its codec/port changed: re-render Envoy's bootstrap and restart")
            continue
        runtime.router = Router(listener.routes)
        runtime.config = listener
        event(log, logging.INFO, "routes_reloaded", listener=name, routes=len(listener.routes))
    for name in new:
        event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="new listener: re-render Envoy's bootstrap and restart")


class ExtProcCall(StreamHandler):
    """One ``Process`` stream (one downstream connection): its Session, fed message by message."""

    __slots__ = ("stream", "session")

    def __init__(self, stream: Stream, runtimes: dict[str, ListenerRuntime], connection: str) -> None:
        self.stream = stream
        listener = stream.headers.get(LISTENER_METADATA_KEY)
        runtime = runtimes.get(listener)
        if runtime is None:
            event(log, logging.ERROR, "unknown_listener", listener=listener, known=sorted(runtimes), hint="re-render envoy/bootstrap.yaml from the config this bridge runs")
            raise GrpcError(NOT_FOUND, f"metabridge has no listener {listener!r}")
        self.session: Session | None = Session(runtime, self._send, connection=connection)

    def _send(self, responses: list[ProcessingResponse]) -> None:
        if responses:
            self.stream.send([r.SerializeToString() for r in responses])

    def on_message(self, message: bytes | memoryview) -> None:
        session = self.session
        if session is None:
            return
        try:
            request = ProcessingRequest.FromString(message)
        except DecodeError as exc:
            raise GrpcError(INVALID_ARGUMENT, f"not a ProcessingRequest: {exc}") from exc
        if request.HasField("read_data"):
            data = request.read_data
            self._send(session.on_read(data.data, data.end_of_stream))
        if request.HasField("write_data"):
            data = request.write_data
            self._send(session.on_write(data.data, data.end_of_stream))

    def on_end(self) -> None:
        self.on_reset()
        self.stream.finish()

    def on_reset(self) -> None:
        # Envoy ended the stream: the downstream connection is gone.
        session, self.session = self.session, None
        if session is not None:
            session.close()


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


async def serve(address: str, runtimes: dict[str, ListenerRuntime]) -> GrpcServer:
    """Start the gRPC server (ext_proc + grpc.health.v1) on ``address`` and return it."""
    server = GrpcServer(serve_methods(runtimes))
    try:
        await server.start(address)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    event(log, logging.INFO, "bridge_listening", address=address, listeners=sorted(runtimes))
    return server
