"""The one YAML file a user writes: codecs, listeners with routes, clusters, the bridge itself.

Loaded with PyYAML, checked against a JSON Schema (jsonschema) and then for cross-references;
every error names the file, the path inside it and the problem.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from metabridge.config.schema import SCHEMA, explain
from metabridge.config.units import parse_duration, parse_size  # also for filters' and codecs' options
from metabridge.sdk.codec import DEFAULT_MAX_FRAME_SIZE


class ConfigError(Exception):
    """A config file that cannot be used; the message says where and why."""


_DEFAULT_LISTEN = "unix:/tmp/metabridge.sock"


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    kind: str  # exact | prefix | suffix | regex | present
    value: str | bool
    invert: bool = False


@dataclass(frozen=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True)
class RouteConfig:
    name: str
    headers: tuple[HeaderMatch, ...]
    clusters: tuple[WeightedCluster, ...]  # one entry with weight 1 for a plain `cluster`
    request_mutation: dict[str, str]
    response_mutation: dict[str, str]
    timeout: float | None = None  # overrides the listener's request_timeout
    mirrors: tuple[MirrorPolicy, ...] = ()
    retry: RetryPolicy | None = None
    hash_policy: tuple[str, ...] = ()  # header keys for consistent hashing


@dataclass(frozen=True)
class MirrorPolicy:
    cluster: str
    fraction: float = 100.0  # percent of the route's requests copied to the cluster


@dataclass(frozen=True)
class RetryPolicy:
    num_retries: int = 1
    retry_on: frozenset[str] = frozenset({"connect_failure", "reset"})
    per_try_timeout: float | None = None


@dataclass(frozen=True)
class RdsTls:
    """Files (relative to the config file) for the xDS server's TLS: the CA that signed its
    certificate, and a client certificate and key for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name its certificate must hold (default: the server's host)


@dataclass(frozen=True)
class RdsConfig:
    """A listener's routes from an xDS server (docs/rds.md)."""

    server: str  # HOST:PORT or unix:PATH
    route_config_name: str
    api: str = "rds"  # rds: RouteDiscoveryService.StreamRoutes; ads: AggregatedDiscoveryService
    node_id: str = "metabridge"
    node_cluster: str = "metabridge"
    tls: RdsTls | None = None


@dataclass(frozen=True)
class FilterConfig:
    name: str
    ref: str | None = None  # None: a built-in filter
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    address: str
    port: int
    codec: str
    routes: tuple[RouteConfig, ...]
    filters: tuple[FilterConfig, ...] = ()
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    request_timeout: float = 30.0
    idle_timeout: float = 3600.0
    tunnel_setup_timeout: float = 10.0
    tunnels_per_cluster: int | None = None  # None: one per endpoint of the cluster
    # A frame that has begun must be whole within this (a client trickling bytes is closed).
    frame_timeout: float = 10.0
    # Past this many requests in flight the connection stops decoding the client's bytes.
    max_requests_in_flight: int = 1000
    # Undecoded client bytes held back while decoding is paused; past it, requests are
    # decoded and answered OVER_LIMIT instead of being held.
    max_client_buffer: int = 2 * DEFAULT_MAX_FRAME_SIZE
    # Bytes waiting in the bridge for one tunnel's flow-control window; past it the
    # connection stops decoding until the upstream catches up.
    max_upstream_queue: int = DEFAULT_MAX_FRAME_SIZE
    # How often a connection with open tunnels asks HCM whether Envoy is draining (0: never).
    drain_probe_interval: float = 5.0
    # Routes from an xDS server; ``routes`` then serve until its first accepted push.
    rds: RdsConfig | None = None


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int


@dataclass(frozen=True)
class HealthCheck:
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 1.0
    lb_policy: str = "ROUND_ROBIN"
    max_connections: int | None = None
    max_pending_requests: int | None = None
    health_check: HealthCheck | None = None


@dataclass(frozen=True)
class CodecConfig:
    name: str
    ref: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    source: str
    codecs: dict[str, CodecConfig]
    listeners: tuple[ListenerConfig, ...]
    clusters: dict[str, ClusterConfig]
    bridge_listen: str = _DEFAULT_LISTEN
    workers: int = 1
    # ext_proc: the bridge is a process Envoy streams to; inprocess: Envoy runs it in a dynamic
    # module (docs/inprocess.md).
    mode: str = "ext_proc"
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    log_level: str = "info"
    # Undecoded client bytes all connections of one bridge process may hold; a connection that
    # would take the total past it is closed.
    max_buffered_bytes: int = 256 * 1024 * 1024
    # The bridge's gRPC server limits (bridge.grpc), as GrpcServer keywords; unset ones keep
    # the server's defaults (docs/grpc-server.md). None for max_message: derived from the
    # listeners' max_frame_size.
    grpc_limits: dict[str, Any] = field(default_factory=dict)
    envoy_admin_address: str = "127.0.0.1"
    envoy_admin_port: int = 9901
    message_timeout: float = 5.0
    envoy_concurrency: int = 1
    base_dir: Path = Path(".")
    lines: dict[tuple, int] = field(default_factory=dict, compare=False, repr=False)  # see line_index
    # What it was read from, to read it again (a reload): the config file (a manifests folder's
    # base, if any) and the manifests folder; None when it was parsed from memory.
    config_file: Path | None = field(default=None, compare=False)
    manifests: Path | None = field(default=None, compare=False)

    def at(self, where: str) -> str:
        """What an error about ``where`` ("codecs.x.ref") appends: " (line N)" when the file has it."""
        line = line_of(self.lines, where)
        return f" (line {line})" if line else ""

    def worker_addresses(self, listen: str | None = None) -> list[str]:
        """Where each bridge worker process listens: worker i of N gets '<path>.<i>' (Unix
        socket) or port+i (TCP), so Envoy can spread streams over N endpoints. ``listen``
        overrides bridge.listen."""
        if listen is None:
            listen = self.bridge_listen
        else:
            problem = _listen_problem(listen, self.workers)
            if problem:
                raise ConfigError(f"--listen {problem}")
        if self.workers == 1:
            return [listen]
        if listen.startswith("unix:"):
            return [f"{listen}.{i}" for i in range(self.workers)]
        host, _, port = listen.rpartition(":")
        return [f"{host}:{int(port) + i}" for i in range(self.workers)]

    def listener(self, name: str) -> ListenerConfig:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top level)"


def _listen_problem(listen: str, workers: int) -> str | None:
    """Why ``workers`` bridge processes cannot listen at ``listen`` (see worker_addresses), or None."""
    if listen.startswith("unix:"):
        return None if listen[len("unix:"):] else f"{listen!r}: 'unix:' needs a socket path"
    host, _, port = listen.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        return f"{listen!r}: expected unix:PATH or HOST:PORT with a port in 1..65535"
    last = int(port) + workers - 1
    if last > 65535:
        return f"{listen!r}: {workers} workers listen on ports {port}..{last}, past 65535; choose a lower port"
    return None


def _undefined(kind: str, name: str, section: str, defined) -> str:
    """The problem of a reference to a name that is not defined under ``section``."""
    close = difflib.get_close_matches(name, list(defined), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = f"known: {', '.join(sorted(defined))}" if defined else f"there are no {section}"
    return f"unknown {kind} {name!r}{hint}; define it under {section!r} ({known})"


def _mutation(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {item["key"]: item["value"] for item in items or ()}


def parse_header_matches(raw_match: dict[str, Any] | None) -> tuple[HeaderMatch, ...]:
    """A ``match: {headers: [...]}`` mapping (schema-checked) as HeaderMatch values: the one
    parser of the header-match syntax, for routes and for filters' match conditions."""
    matchers = []
    for header in (raw_match or {}).get("headers", ()):
        kind = next(k for k in ("exact", "prefix", "suffix", "regex", "present") if k in header)
        matchers.append(HeaderMatch(header["name"], kind, header[kind], bool(header.get("invert", False))))
    return tuple(matchers)


def _route(raw: dict[str, Any], index: int) -> RouteConfig:
    matchers = parse_header_matches(raw.get("match"))
    action = raw["route"]
    if "cluster" in action:
        clusters = (WeightedCluster(action["cluster"], 1),)
    else:
        clusters = tuple(WeightedCluster(w["name"], w["weight"]) for w in action["weighted_clusters"])
    return RouteConfig(
        name=raw.get("name") or f"route{index}",
        headers=tuple(matchers),
        clusters=clusters,
        request_mutation=_mutation(raw.get("request_mutation")),
        response_mutation=_mutation(raw.get("response_mutation")),
        timeout=parse_duration(raw["timeout"]) if "timeout" in raw else None,
        mirrors=tuple(MirrorPolicy(m["cluster"], float(m.get("runtime_fraction", 100))) for m in raw.get("request_mirror_policies", ())),
        retry=_retry_policy(raw["retry_policy"]) if "retry_policy" in raw else None,
        hash_policy=tuple(raw.get("hash_policy", ())),
    )


def build_routes(raw_routes: list[dict[str, Any]], clusters: Mapping[str, Any], where: str) -> tuple[tuple[RouteConfig, ...], list[str]]:
    """Schema-checked ``routes`` entries as RouteConfigs, and the problems found in them (each
    "<where>.routes[j]...: message": bad regexes, weights adding up to 0, clusters not among
    ``clusters``). The one builder of routes, for a config file's and for routes from RDS."""
    routes = []
    problems: list[str] = []
    for j, raw_route in enumerate(raw_routes):
        for k, header in enumerate((raw_route.get("match") or {}).get("headers", ())):
            if "regex" in header:
                try:
                    re.compile(header["regex"])
                except re.error as exc:
                    problems.append(f"{where}.routes[{j}].match.headers[{k}].regex: invalid regular expression: {exc}")
        route = _route(raw_route, j)
        if sum(w.weight for w in route.clusters) == 0:
            problems.append(f"{where}.routes[{j}].route.weighted_clusters: weights add up to 0")
        targets = [("route.cluster", route.clusters[0].name)] if "cluster" in raw_route["route"] else [
            (f"route.weighted_clusters[{k}].name", w.name) for k, w in enumerate(route.clusters)
        ]
        targets += [(f"request_mirror_policies[{k}].cluster", m.cluster) for k, m in enumerate(route.mirrors)]
        for at, cluster in targets:
            if cluster not in clusters:
                problems.append(f"{where}.routes[{j}].{at}: {_undefined('cluster', cluster, 'clusters', clusters)}")
        routes.append(route)
    return tuple(routes), problems


def _rds(raw: dict[str, Any], base_dir: Path) -> RdsConfig:
    tls = raw.get("tls")
    return RdsConfig(
        server=raw["server"],
        route_config_name=raw["route_config_name"],
        api=raw.get("api", "rds"),
        node_id=raw.get("node_id", "metabridge"),
        node_cluster=raw.get("node_cluster", "metabridge"),
        tls=None
        if tls is None
        else RdsTls(
            ca=base_dir / tls["ca"],
            cert=base_dir / tls["cert"] if "cert" in tls else None,
            key=base_dir / tls["key"] if "key" in tls else None,
            server_name=tls.get("server_name"),
        ),
    )


def _retry_policy(raw: dict[str, Any]) -> RetryPolicy:
    default = RetryPolicy()
    return RetryPolicy(
        num_retries=raw.get("num_retries", default.num_retries),
        retry_on=frozenset(raw.get("retry_on", default.retry_on)),
        per_try_timeout=parse_duration(raw["per_try_timeout"]) if "per_try_timeout" in raw else None,
    )


_PATH_PART = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def _parts(where: str) -> list:
    """The inverse of _path: "listeners[0].codec" -> ["listeners", 0, "codec"]."""
    return [int(index) if index else name for name, index in _PATH_PART.findall(where)]


def line_index(text: str) -> dict[tuple, int]:
    """For a YAML text, the line (1-based) of each value by its path of keys and indices."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    index: dict[tuple, int] = {}
    pending = [((), root)] if root is not None else []
    while pending and len(index) < 100_000:  # aliases can make a small text a huge tree
        path, node = pending.pop()
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            pending.extend((path + (key.value,), value) for key, value in node.value if isinstance(key, yaml.ScalarNode))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((path + (i,), item) for i, item in enumerate(node.value))
    return index


def line_finder(text: str) -> Callable[[list], int | None]:
    """For a YAML text, a function from a path of keys and indices to the line of its deepest
    part the document has."""
    lines = line_index(text)
    return lambda path: line_of(lines, path)


def line_of(lines: dict[tuple, int], path: list | str) -> int | None:
    """The line of the deepest part of ``path`` (a list, or "listeners[0].codec") the file has."""
    key = tuple(_parts(path) if isinstance(path, str) else path)
    while key and key not in lines:
        key = key[:-1]
    return lines.get(key)


def _grpc_limits(raw: dict[str, Any]) -> dict[str, Any]:
    """bridge.grpc as GrpcServer keywords."""
    limits: dict[str, Any] = {}
    for key in ("max_concurrent_streams", "max_frame_size", "max_continuations", "connection_window"):
        if key in raw:
            limits[key] = raw[key]
    if "max_header_list_size" in raw:
        limits["max_header_list_size"] = parse_size(raw["max_header_list_size"])
    if "max_message_size" in raw:
        limits["max_message"] = parse_size(raw["max_message_size"])
    for kind in ("reset", "ping", "settings"):
        if f"{kind}_rate" in raw:
            limits[f"{kind}_burst"] = raw[f"{kind}_rate"]["burst"]
            limits[f"{kind}_rate"] = float(raw[f"{kind}_rate"]["per_second"])
    return limits


def _first_unknown(error) -> list:
    """For an unknown-key error, the key itself, so that its own line is named."""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        return [next((key for key in error.instance if key not in known), None)]
    return []


def parse(raw: Any, source: str = "<config>", base_dir: Path = Path("."), lines: dict[tuple, int] | None = None) -> Config:
    """Validate a loaded YAML document and build the Config; ConfigError names what is wrong
    (and the line, when ``lines``, the file's line_index, has it)."""
    lines = lines or {}

    def located(where: str, message: str, path: list | None = None) -> str:
        line = line_of(lines, where if path is None else path)
        return f"{source}: {where}: {message}" + (f" (line {line})" if line else "")

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        found = [located(_path(e.absolute_path), explain(e), list(e.absolute_path) + _first_unknown(e)) for e in errors[:10]]
        raise ConfigError("invalid config:\n  " + "\n  ".join(found))

    problems: list[str] = []
    codecs = {
        name: CodecConfig(name, entry["ref"], dict(entry.get("options") or {}))
        for name, entry in raw["codecs"].items()
    }
    clusters: dict[str, ClusterConfig] = {}
    for i, c in enumerate(raw["clusters"]):
        if c["name"] in clusters:
            problems.append(f"clusters[{i}].name: duplicate cluster name {c['name']!r}")
        breakers = c.get("circuit_breakers") or {}
        hc = c.get("health_check")
        clusters[c["name"]] = ClusterConfig(
            name=c["name"],
            endpoints=tuple(Endpoint(e["address"], e["port"]) for e in c["endpoints"]),
            connect_timeout=parse_duration(c.get("connect_timeout", "1s")),
            lb_policy=c.get("lb_policy", "ROUND_ROBIN"),
            max_connections=breakers.get("max_connections"),
            max_pending_requests=breakers.get("max_pending_requests"),
            health_check=None
            if hc is None
            else HealthCheck(
                interval=parse_duration(hc.get("interval", "5s")),
                timeout=parse_duration(hc.get("timeout", "1s")),
                unhealthy_threshold=hc.get("unhealthy_threshold", 2),
                healthy_threshold=hc.get("healthy_threshold", 1),
            ),
        )

    listeners = []
    names: set[str] = set()
    ports: set[tuple[str, int]] = set()
    for i, entry in enumerate(raw["listeners"]):
        where = f"listeners[{i}]"
        if entry["name"] in names:
            problems.append(f"{where}.name: duplicate listener name {entry['name']!r}")
        names.add(entry["name"])
        address = entry.get("address", "127.0.0.1")
        if entry["port"] and (address, entry["port"]) in ports:
            problems.append(f"{where}.port: {address}:{entry['port']} is used by another listener")
        ports.add((address, entry["port"]))
        if entry["codec"] not in codecs:
            problems.append(f"{where}.codec: {_undefined('codec', entry['codec'], 'codecs', codecs)}")
        if "routes" not in entry and "rds" not in entry:
            problems.append(f"{where}: 'routes' is a required property (or 'rds', to receive them from an xDS server)")
        routes, route_problems = build_routes(entry.get("routes", []), clusters, where)
        problems += route_problems
        rds = _rds(entry["rds"], base_dir) if "rds" in entry else None
        if rds is not None:
            problem = _listen_problem(rds.server, 1)
            if problem:
                problems.append(f"{where}.rds.server: {problem}")
        max_frame_size = parse_size(entry.get("max_frame_size", DEFAULT_MAX_FRAME_SIZE))
        max_client_buffer = parse_size(entry.get("max_client_buffer", 2 * max_frame_size))
        if max_client_buffer < max_frame_size:
            problems.append(f"{where}.max_client_buffer: {max_client_buffer} bytes is less than max_frame_size ({max_frame_size}); a whole frame must fit")
        listeners.append(
            ListenerConfig(
                name=entry["name"],
                address=address,
                port=entry["port"],
                codec=entry["codec"],
                routes=tuple(routes),
                filters=tuple(FilterConfig(f["name"], f.get("ref"), dict(f.get("config") or {})) for f in entry.get("filters", ())),
                max_frame_size=max_frame_size,
                request_timeout=parse_duration(entry.get("request_timeout", "30s")),
                idle_timeout=parse_duration(entry.get("idle_timeout", "1h")),
                tunnel_setup_timeout=parse_duration(entry.get("tunnel_setup_timeout", "10s")),
                tunnels_per_cluster=entry.get("tunnels_per_cluster"),
                frame_timeout=parse_duration(entry.get("frame_timeout", "10s")),
                max_requests_in_flight=entry.get("max_requests_in_flight", 1000),
                max_client_buffer=max_client_buffer,
                max_upstream_queue=parse_size(entry.get("max_upstream_queue", max_frame_size)),
                drain_probe_interval=parse_duration(entry.get("drain_probe_interval", "5s")),
                rds=rds,
            )
        )
    bridge = raw.get("bridge") or {}
    listen_problem = _listen_problem(bridge.get("listen", _DEFAULT_LISTEN), bridge.get("workers", 1))
    if listen_problem:
        problems.append(f"bridge.listen: {listen_problem}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(located(*p.split(": ", 1)) for p in problems))

    envoy = raw.get("envoy") or {}
    return Config(
        source=source,
        codecs=codecs,
        listeners=tuple(listeners),
        clusters=clusters,
        bridge_listen=bridge.get("listen", _DEFAULT_LISTEN),
        workers=bridge.get("workers", 1),
        mode=bridge.get("mode", "ext_proc"),
        metrics_port=bridge.get("metrics_port"),
        metrics_address=bridge.get("metrics_address", "127.0.0.1"),
        log_level=bridge.get("log_level", "info"),
        max_buffered_bytes=parse_size(bridge.get("max_buffered_bytes", "256MiB")),
        grpc_limits=_grpc_limits(bridge.get("grpc") or {}),
        envoy_admin_address=envoy.get("admin_address", "127.0.0.1"),
        envoy_admin_port=envoy.get("admin_port", 9901),
        message_timeout=parse_duration(envoy.get("message_timeout", "5s")),
        envoy_concurrency=envoy.get("concurrency", 1),
        base_dir=base_dir,
        lines=lines,
    )


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return dataclasses.replace(parse(raw, str(path), path.parent, line_index(text)), config_file=path.resolve())
