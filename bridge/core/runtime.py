"""What every connection of one listener shares: codec class, routes, filter chain, stats, limits."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from metabridge.config.model import ClusterConfig, Config, ConfigError, ListenerConfig, load
from metabridge.core.chain import FilterChain
from metabridge.core.router import Router
from metabridge.filters import build_filters
from metabridge.logs import event
from metabridge.registry import CodecLoadError, load_codecs
from metabridge.sdk.codec import Codec, Direction
from metabridge.stats import ListenerStats

log = logging.getLogger("metabridge.runtime")

# Lb policies whose tunnels may ask Envoy for a host; with a hash policy the hash decides.
_OVERRIDABLE = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")


class ByteBudget:
    """Bytes that connections of one bridge process hold undecoded (partial or held-back
    frames), against ``bridge.max_buffered_bytes``."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


@dataclass
class ListenerRuntime:
    config: ListenerConfig
    codec_cls: type[Codec]
    codec_options: dict
    router: Router
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(1 << 62))
    stats: ListenerStats = field(default_factory=ListenerStats)
    chain: FilterChain | None = None

    def __post_init__(self) -> None:
        if self.chain is None:
            self.chain = FilterChain((), self.config.name, self.stats)
        self._plans: dict[str, tuple[tuple[str, ...], str]] = {}

    @property
    def name(self) -> str:
        return self.config.name

    def new_codec(self, direction: Direction = Direction.REQUEST) -> Codec:
        codec = self.codec_cls(max_frame_size=self.config.max_frame_size, options=self.codec_options)
        codec.direction = direction
        return codec

    def new_codec_for_responses(self) -> Codec:
        return self.new_codec(Direction.RESPONSE)

    def cluster_plan(self, cluster: str) -> tuple[tuple[str, ...], str]:
        """(the host each tunnel slot asks for, the cluster's lb_policy) for a connection's pool."""
        plan = self._plans.get(cluster)
        if plan is None:
            plan = self._plans[cluster] = _plan(self.clusters.get(cluster), self.config.tunnels_per_cluster)
        return plan


def _plan(cluster: ClusterConfig | None, slots: int | None) -> tuple[tuple[str, ...], str]:
    if cluster is None:  # not in the config (Envoy may still have it): let its lb_policy pick
        return ("",) * (slots or 1), "ROUND_ROBIN"
    hosts = []
    for endpoint in cluster.endpoints:
        try:
            ip = ipaddress.ip_address(endpoint.address)
        except ValueError:
            hosts.append("")  # a name: Envoy resolves it, its lb_policy picks
            continue
        hosts.append(f"[{ip}]:{endpoint.port}" if ip.version == 6 else f"{ip}:{endpoint.port}")
    if cluster.lb_policy not in _OVERRIDABLE:
        hosts = [""] * len(hosts)
    count = slots or len(hosts)
    return tuple(hosts[i % len(hosts)] for i in range(count)), cluster.lb_policy


def build_runtimes(config: Config) -> dict[str, ListenerRuntime]:
    codecs = load_codecs(config)
    budget = ByteBudget(config.max_buffered_bytes)
    runtimes = {}
    for listener in config.listeners:
        stats = ListenerStats()
        runtime = ListenerRuntime(
            config=listener,
            codec_cls=codecs[listener.codec],
            codec_options=config.codecs[listener.codec].options,
            router=Router(listener.routes),
            clusters=config.clusters,
            budget=budget,
            stats=stats,
            chain=FilterChain(build_filters(listener, config), listener.name, stats),
        )
        try:
            runtime.new_codec()  # a codec that rejects its options fails here, at start-up
        except Exception as exc:
            where = f"codecs.{listener.codec}.options"
            raise CodecLoadError(f"{config.source}: {where}: {type(exc).__name__}: {exc}{config.at(where)}") from exc
        runtimes[listener.name] = runtime
    return runtimes


def reload_routes(runtimes: dict[str, ListenerRuntime], path: str) -> None:
    """Re-read the config file and swap in each listener's new routes, filters and timeouts.

    Running connections pick the new routes up on their next request; nothing is disconnected.
    Changes that need Envoy's bootstrap re-rendered (listeners, ports, codecs, clusters) are
    reported and left alone. A config that does not load leaves everything as it was.
    """
    try:
        config = load(path)
        chains = {lst.name: build_filters(lst, config) for lst in config.listeners}
    except (ConfigError, CodecLoadError, OSError) as exc:
        event(log, logging.ERROR, "reload_failed_keeping_old_routes", config=path, error=str(exc))
        return
    new = {listener.name: listener for listener in config.listeners}
    for name, runtime in runtimes.items():
        listener = new.pop(name, None)
        if listener is None or listener.codec != runtime.config.codec or listener.port != runtime.config.port:
            event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="listener removed or its codec/port changed: re-render Envoy's bootstrap and restart")
            continue
        runtime.router = Router(listener.routes)
        runtime.chain = FilterChain(chains[name], name, runtime.stats)
        runtime.config = listener
        runtime._plans.clear()
        event(log, logging.INFO, "routes_reloaded", listener=name, routes=len(listener.routes), filters=len(chains[name]))
    for name in new:
        event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="new listener: re-render Envoy's bootstrap and restart")
