"""What every connection of one listener shares: codec class, routes, filter chain, stats, limits;
and their reload on SIGHUP."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from metabridge.config.model import ClusterConfig, CodecConfig, Config, ConfigError, ListenerConfig, RouteConfig
from metabridge.core.chain import FilterChain
from metabridge.core.router import Router
from metabridge.filters import build_filters
from metabridge.logs import event
from metabridge.registry import CodecLoadError, load_codec_class, load_codecs, reference_path
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


@dataclass(frozen=True)
class CodecFactory:
    """A codec class with its options: what one connection makes all its codecs from, for its
    whole life (a reload gives later connections another factory)."""

    cls: type[Codec]
    options: dict
    max_frame_size: int

    def new(self, direction: Direction = Direction.REQUEST) -> Codec:
        codec = self.cls(max_frame_size=self.max_frame_size, options=self.options)
        codec.direction = direction
        return codec


@dataclass
class ListenerRuntime:
    config: ListenerConfig
    codec_cls: type[Codec]
    codec_entry: CodecConfig  # the codec in force (name, ref, options): the last one that loaded
    router: Router
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(1 << 62))
    stats: ListenerStats = field(default_factory=ListenerStats)
    chain: FilterChain | None = None
    # The routes the listener's xDS server last pushed (and the bridge accepted); None: none yet.
    rds_routes: tuple[RouteConfig, ...] | None = None

    def __post_init__(self) -> None:
        if self.chain is None:
            self.chain = FilterChain((), self.config.name, self.stats)
        # cluster -> its plan (cluster_plan); a reload empties it, and a connection's pool,
        # which reads it on every request, then asks for the new plan.
        self.plans: dict[str, tuple[tuple[str, ...], str]] = {}
        self.use_codec(self.codec_cls, self.codec_entry)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def codec_options(self) -> dict:
        return self.codec_entry.options

    def use_codec(self, cls: type[Codec], entry: CodecConfig) -> None:
        """Connections opened from now on make their codecs from ``cls`` with ``entry``'s
        options; open ones keep the factory they started with."""
        self.codec_cls, self.codec_entry = cls, entry
        self.codecs = CodecFactory(cls, entry.options, self.config.max_frame_size)

    def replace_routes(self, routes: tuple[RouteConfig, ...]) -> None:
        """Route every request from now on, on every connection, by ``routes`` (from RDS): the
        table is built first and swapped in one assignment, so a request sees the old table or
        the new one, never a mix. A SIGHUP reload keeps them (the file's routes only stand in
        until the first push)."""
        router = Router(routes)
        self.router = router
        self.rds_routes = tuple(routes)
        self.config = dataclasses.replace(self.config, routes=self.rds_routes)

    def new_codec(self, direction: Direction = Direction.REQUEST) -> Codec:
        return self.codecs.new(direction)

    def cluster_plan(self, cluster: str) -> tuple[tuple[str, ...], str]:
        """(the host each tunnel slot asks for, the cluster's lb_policy) for a connection's pool."""
        plan = self.plans.get(cluster)
        if plan is None:
            plan = self.plans[cluster] = _plan(self.clusters.get(cluster), self.config.tunnels_per_cluster)
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
            codec_entry=config.codecs[listener.codec],
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


def reload_routes(runtimes: dict[str, ListenerRuntime], reread: Callable[[], Config], what: str) -> None:
    """Read the config again (``reread``: from its file, or its manifests folder and base) and
    apply it (SIGHUP; see apply_config). A config that does not load leaves everything as it was."""
    try:
        config = reread()
    except (ConfigError, OSError) as exc:
        event(log, logging.ERROR, "reload_failed_keeping_old_routes", config=what, error=str(exc))
        return
    apply_config(runtimes, config)


def apply_config(runtimes: dict[str, ListenerRuntime], config: Config, *, envoy_follows: bool = False) -> bool:
    """Each listener's routes, filters, timeouts and clusters from ``config``, and its codec when
    the listener names another one or the codec's file or folder, reference or options changed
    (Envoy's bootstrap does not depend on codecs).

    Running connections pick the new routes up on their next request and keep the codec they
    started with; connections opened after the reload get the new codec. A codec that does not
    load (import error, contract violation, options refused) is refused and logged, and the old
    one stays; the routes are reloaded all the same. ``envoy_follows``: Envoy gets the new
    listeners and clusters too (live config, metabridge.config.live), so a new listener gets a
    runtime here and nothing needs a restart; otherwise such changes are reported and a new
    listener is left alone. A removed listener keeps its runtime (Envoy may still send it
    connections until it has the change). Returns False when nothing was applied.
    """
    try:
        chains = {lst.name: build_filters(lst, config) for lst in config.listeners}
    except (ConfigError, CodecLoadError, OSError) as exc:
        event(log, logging.ERROR, "reload_failed_keeping_old_routes", config=config.source, error=str(exc))
        return False
    new = {listener.name: listener for listener in config.listeners}
    known = next(iter(runtimes.values())).clusters if runtimes else {}
    loaded: dict[str, type[Codec] | CodecLoadError] = {}  # each codec imported once per reload
    for name, runtime in runtimes.items():
        listener = new.pop(name, None)
        if listener is None or (listener.port != runtime.config.port and not envoy_follows):
            if not envoy_follows:
                event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="listener removed or its port changed: re-render Envoy's bootstrap and restart")
            continue
        if listener.rds != runtime.config.rds:
            event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="the listener's rds settings changed: restart the bridge to reach the new xDS server")
        if runtime.rds_routes is not None and runtime.config.rds is not None:
            listener = dataclasses.replace(listener, routes=runtime.rds_routes, rds=runtime.config.rds)  # RDS's routes stay
        runtime.router = Router(listener.routes)
        runtime.chain = FilterChain(chains[name], name, runtime.stats)
        runtime.config = listener
        runtime.clusters = config.clusters
        runtime.plans.clear()
        _reload_codec(runtime, config, loaded)
        event(log, logging.INFO, "routes_reloaded", listener=name, routes=len(listener.routes), filters=len(chains[name]))
    budget = next(iter(runtimes.values())).budget if runtimes else ByteBudget(config.max_buffered_bytes)
    for name, listener in new.items():
        if not envoy_follows:
            event(log, logging.WARNING, "reload_needs_restart", listener=name, hint="new listener: re-render Envoy's bootstrap and restart")
            continue
        entry = config.codecs[listener.codec]
        cls = _load_once(entry, config, loaded)
        try:
            if isinstance(cls, CodecLoadError):
                raise cls
            stats = ListenerStats()
            runtime = ListenerRuntime(config=listener, codec_cls=cls, codec_entry=entry, router=Router(listener.routes), clusters=config.clusters, budget=budget, stats=stats, chain=FilterChain(chains[name], name, stats))
            runtime.new_codec()  # options refused here
        except Exception as exc:  # noqa: BLE001 - whatever the codec raises refuses the listener
            event(log, logging.ERROR, "listener_add_failed", listener=name, codec=entry.name, ref=entry.ref, error=f"{type(exc).__name__}: {exc}", hint="fix the codec; its connections are closed until a reload loads it")
            continue
        runtimes[name] = runtime
        event(log, logging.INFO, "listener_added", listener=name, routes=len(listener.routes), filters=len(chains[name]))
    if not envoy_follows:
        for name, cluster in config.clusters.items():
            if known.get(name) != cluster:
                change = "new" if name not in known else "changed"
                event(log, logging.WARNING, "reload_needs_restart", cluster=name, hint=f"{change} cluster: Envoy knows it as it was only until its bootstrap is re-rendered and it restarts (requests routed to a cluster Envoy does not have get CLUSTER_NOT_FOUND)")
    return True


def _load_once(entry, config: Config, loaded: dict):
    """The codec class ``entry`` names, or the CodecLoadError loading it gave, loaded once per
    reload (``loaded``: by codec name) however many listeners use it."""
    if entry.name not in loaded:
        try:
            loaded[entry.name] = load_codec_class(entry.ref, config.base_dir)
        except CodecLoadError as exc:
            loaded[entry.name] = exc
    return loaded[entry.name]


def _reload_codec(runtime: ListenerRuntime, config: Config, loaded: dict) -> None:
    """Give the listener's later connections the codec the config names now, if it loads."""
    entry = config.codecs[runtime.config.codec]
    file = reference_path(entry.ref, config.base_dir)
    cls = _load_once(entry, config, loaded)
    error = str(cls) if isinstance(cls, CodecLoadError) else None
    if error is None:
        try:
            CodecFactory(cls, entry.options, runtime.config.max_frame_size).new()  # options refused here
        except Exception as exc:  # noqa: BLE001 - whatever the codec raises refuses it
            error = f"codecs.{entry.name}.options: {type(exc).__name__}: {exc}"
    if error is not None:
        event(log, logging.ERROR, "codec_reload_failed_keeping_old_codec", listener=runtime.name, codec=entry.name, ref=entry.ref, file=str(file) if file else None, error=error)
        runtime.use_codec(runtime.codec_cls, runtime.codec_entry)
        return
    changed = cls is not runtime.codec_cls or entry.options != runtime.codec_options
    runtime.use_codec(cls, entry)
    if changed:
        event(log, logging.INFO, "codec_reloaded", listener=runtime.name, codec=entry.name, ref=entry.ref, file=str(file) if file else None, module=cls.__module__)
