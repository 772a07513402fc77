"""The bridge's gRPC service: Envoy's network ext_proc ``Process`` stream, one Session each.

Envoy names the listener a stream belongs to in the gRPC initial metadata
(LISTENER_METADATA_KEY, set by the rendered bootstrap), which selects the codec and routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bridge._proto import network_ext_proc_pb2_grpc
from bridge.codec import Codec
from bridge.config import Config, ConfigError, ListenerConfig, load
from bridge.logs import event
from bridge.registry import CodecLoadError, load_codecs
from bridge.router import Router
from bridge.session import Session
from bridge.stats import ListenerStats
from bridge.wire import LISTENER_METADATA_KEY

log = logging.getLogger("metabridge.server")

SERVICE_NAME = "envoy.service.network_ext_proc.v3.NetworkExternalProcessor"
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


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


class Processor(network_ext_proc_pb2_grpc.NetworkExternalProcessorServicer):
    def __init__(self, runtimes: dict[str, ListenerRuntime]) -> None:
        self.runtimes = runtimes
        self._streams = 0

    async def Process(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        listener_name = dict(context.invocation_metadata()).get(LISTENER_METADATA_KEY)
        runtime = self.runtimes.get(listener_name)
        if runtime is None:
            event(log, logging.ERROR, "unknown_listener", listener=listener_name, known=sorted(self.runtimes), hint="re-render envoy/bootstrap.yaml from the config this bridge runs")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"metabridge has no listener {listener_name!r}")
            return
        self._streams += 1
        lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()

        async def write(messages) -> None:
            async with lock:  # one writer at a time; timers write between Envoy's messages
                for message in messages:
                    await context.write(message)

        def written(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                # The stream ended under a timer's reply: the connection is gone, nothing to send.
                event(log, logging.DEBUG, "late_write_dropped", listener=listener_name, error=str(task.exception()))

        def emit(messages) -> None:
            if messages:
                task = asyncio.ensure_future(write(messages))
                tasks.add(task)
                task.add_done_callback(written)

        session = Session(runtime, emit, connection=f"{os.getpid()}-{self._streams}")
        try:
            async for request in request_iterator:
                if request.HasField("read_data"):
                    data = request.read_data
                    await write(session.on_read(data.data, data.end_of_stream))
                if request.HasField("write_data"):
                    data = request.write_data
                    await write(session.on_write(data.data, data.end_of_stream))
        except asyncio.CancelledError:
            pass  # Envoy closed the stream (the downstream connection is gone)
        finally:
            session.close()
            for task in tasks:
                task.cancel()


async def serve(address: str, runtimes: dict[str, ListenerRuntime]) -> grpc.aio.Server:
    """Start the gRPC server (ext_proc + grpc.health.v1) on ``address`` and return it."""
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    network_ext_proc_pb2_grpc.add_NetworkExternalProcessorServicer_to_server(Processor(runtimes), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a previous run
    if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    event(log, logging.INFO, "bridge_listening", address=address, listeners=sorted(runtimes))
    return server
