"""A listener's routes from an xDS server: one state-of-the-world RDS subscription per listener.

``Subscription`` is the protocol's state machine, with no I/O: the first request, and for each
DiscoveryResponse the request that answers it — an ACK (``version_info`` of the response, its
nonce) once the routes are applied, or a NACK (the last accepted ``version_info``, the nonce,
``error_detail`` with what is wrong) when they are refused, the old routes staying.
``RdsClient`` runs it over a gRPC stream (``RouteDiscoveryService.StreamRoutes``, or ADS), and
opens a new stream with exponential back-off whenever one fails or ends; the new stream's first
request carries the last accepted version.

Every bridge process runs its own streams (a worker per process: each worker subscribes, the
control plane sees one subscriber per worker), so no route table crosses process boundaries.
Messages are envoy-data-plane's models, carried by a plain ``grpc.aio`` channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.rpc import Status

from metabridge.config.model import RdsConfig
from metabridge.logs import event, failure
from metabridge.xds.translate import TYPE_URL, TranslationError, translate

log = logging.getLogger("metabridge.xds")

METHODS = {
    "rds": "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
    "ads": "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
}
_INVALID_ARGUMENT = 3  # google.rpc.Code
_BACKOFF_INITIAL = 0.5  # seconds
_BACKOFF_MAX = 30.0
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 30_000),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Subscription:
    """The ACK/NACK state machine of one state-of-the-world subscription to one RouteConfiguration.

    ``apply`` gets the RouteConfiguration of each response that has it and raises
    TranslationError (or ValueError) to refuse it.
    """

    def __init__(self, rds: RdsConfig, apply: Callable[[RouteConfiguration], None], node: Node) -> None:
        self.name = rds.route_config_name
        self.node = node
        self._apply = apply
        self.version_info = ""  # the last version accepted
        self.nonce = ""  # the last response's
        self.last_error: str | None = None  # the last refusal's, until a version is accepted

    def first_request(self) -> DiscoveryRequest:
        """A new stream's first request: the last version accepted (empty at first), no nonce."""
        return DiscoveryRequest(version_info=self.version_info, node=self.node, resource_names=[self.name], type_url=TYPE_URL)

    def on_response(self, response: DiscoveryResponse) -> DiscoveryRequest:
        """Apply ``response`` (or refuse it) and return the ACK or NACK to send."""
        self.nonce = response.nonce
        try:
            self._take(response)
        except Exception as exc:  # noqa: BLE001 - whatever refuses the push is its error_detail
            if not isinstance(exc, (TranslationError, ValueError)):  # a bug: keep its traceback
                failure(log, "rds_apply_failed", exc, route_config_name=self.name, version_info=response.version_info)
                exc = f"{type(exc).__name__}: {exc}"
            self.last_error = f"version {response.version_info!r}: {exc}"
            return DiscoveryRequest(
                version_info=self.version_info,
                node=self.node,
                resource_names=[self.name],
                type_url=TYPE_URL,
                response_nonce=response.nonce,
                error_detail=Status(code=_INVALID_ARGUMENT, message=self.last_error),
            )
        self.version_info = response.version_info
        self.last_error = None
        return DiscoveryRequest(version_info=self.version_info, node=self.node, resource_names=[self.name], type_url=TYPE_URL, response_nonce=response.nonce)

    def _take(self, response: DiscoveryResponse) -> None:
        if response.type_url != TYPE_URL:
            raise ValueError(f"type_url {response.type_url!r}: this stream subscribes to {TYPE_URL} only")
        found = None
        for i, resource in enumerate(response.resources):
            if resource.type_url != TYPE_URL:
                raise ValueError(f"resources[{i}]: type_url {resource.type_url!r} is not {TYPE_URL}")
            try:
                config = RouteConfiguration.parse(resource.value)
            except Exception as exc:  # noqa: BLE001 - whatever the decoder raises: bytes that are not the message
                raise ValueError(f"resources[{i}]: not a RouteConfiguration ({type(exc).__name__}: {exc})") from exc
            if config.name == self.name:
                found = config
        if found is not None:  # a response without ours (another listener's, over ADS) changes nothing
            self._apply(found)


def node_for(rds: RdsConfig) -> Node:
    return Node(id=rds.node_id, cluster=rds.node_cluster, user_agent_name="metabridge")


class RdsClient:
    """Keeps one RDS stream open for a listener and swaps its route table on each accepted push."""

    def __init__(self, runtime, rds: RdsConfig, *, rand: Callable[[], float] = random.random) -> None:
        self.runtime = runtime
        self.rds = rds
        self.subscription = Subscription(rds, self._apply, node_for(rds))
        self._rand = rand

    def _apply(self, config: RouteConfiguration) -> None:
        routes = translate(config, self.runtime.clusters)
        self.runtime.replace_routes(routes)

    def _channel(self):
        import grpc  # only bridges with an rds listener load gRPC's client

        options = list(_CHANNEL_OPTIONS)
        tls = self.rds.tls
        if tls is None:
            return grpc.aio.insecure_channel(self.rds.server, options=options)
        # Read at every (re)connect, so certificates rotated on disk are picked up.
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes() if tls.key else None,
            certificate_chain=tls.cert.read_bytes() if tls.cert else None,
        )
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.aio.secure_channel(self.rds.server, credentials, options=options)

    async def run(self) -> None:
        """Until cancelled: a stream at a time, a new one after a back-off when one fails."""
        import grpc

        backoff = _BACKOFF_INITIAL
        listener = self.runtime.name
        while True:
            received = False
            try:
                async with self._channel() as channel:
                    call = channel.stream_stream(METHODS[self.rds.api], request_serializer=DiscoveryRequest.SerializeToString, response_deserializer=DiscoveryResponse.FromString)()
                    await call.write(self.subscription.first_request())
                    event(log, logging.INFO, "rds_stream_opened", listener=listener, server=self.rds.server, route_config_name=self.rds.route_config_name, version_info=self.subscription.version_info)
                    while True:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            break
                        received = True
                        await call.write(self._handle(response))
                error = "the server ended the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except OSError as exc:  # the TLS files
                error = f"cannot read a TLS file: {exc}; check listeners[].rds.tls"
            except Exception as exc:  # noqa: BLE001 - a bug must not end the subscription for good
                failure(log, "rds_client_error", exc, listener=listener, server=self.rds.server)
                error = f"{type(exc).__name__}: {exc}"
            if received:
                backoff = _BACKOFF_INITIAL
            delay = backoff * (0.5 + self._rand())
            event(log, logging.WARNING, "rds_stream_failed", listener=listener, server=self.rds.server, error=error, retry_in_seconds=round(delay, 3), hint="routes stay as they are; check the xDS server's address, TLS settings and logs")
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _handle(self, response: DiscoveryResponse) -> DiscoveryRequest:
        request = self.subscription.on_response(response)
        listener = self.runtime.name
        if request.error_detail is not None:
            event(log, logging.ERROR, "rds_update_rejected", listener=listener, version_info=response.version_info, nonce=response.nonce, kept_version=self.subscription.version_info, error=request.error_detail.message)
        else:
            event(log, logging.INFO, "rds_routes_applied", listener=listener, version_info=response.version_info, nonce=response.nonce, routes=[r.name for r in self.runtime.router.routes])
        return request


_RUNNING: set[asyncio.Task] = set()  # the loop holds tasks weakly


def start(runtimes: Mapping[str, Any]) -> list[asyncio.Task]:
    """An RdsClient task for each listener with ``rds``, on the running loop (until it ends)."""
    tasks = []
    for runtime in runtimes.values():
        rds = runtime.config.rds
        if rds is not None:
            task = asyncio.ensure_future(RdsClient(runtime, rds).run())
            _RUNNING.add(task)
            task.add_done_callback(_RUNNING.discard)
            tasks.append(task)
    return tasks
