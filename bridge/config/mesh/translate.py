"""Mesh resources -> the file config's raw dict (codecs, listeners, routes, clusters, filters).

Aeraki's model: a Service or ServiceEntry port named ``tcp-metaprotocol-<protocol>[-<suffix>]``
is a MetaProtocol service; its protocol's codec comes from an ApplicationProtocol; a MetaRouter
routes the traffic for its hosts to DestinationRule subsets. Names follow Istio's convention:
each service port is a listener ``outbound|PORT||HOST``, each subset a cluster
``outbound|PORT|SUBSET|HOST`` (and the whole service ``outbound|PORT||HOST``). The result goes
through model.parse like a file config, so every check the file config has applies here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from metabridge.config.mesh.manifests import Resource
from metabridge.config.mesh.schema import SPECS
from metabridge.config.model import _path, parse_duration
from metabridge.config.schema import explain

# The ApplicationProtocol annotation that names a metabridge codec (a ref, as in `codecs:`).
CODEC_ANNOTATION = "metabridge.io/codec"
# Aeraki's codec names for the protocols metabridge has a built-in codec for.
BUILTIN_CODECS = {"aeraki.meta_protocol.codec.dubbo": "dubbo", "aeraki.meta_protocol.codec.thrift": "thrift"}
# Aeraki knows these protocols without an ApplicationProtocol.
DEFAULT_PROTOCOLS = {"dubbo": "dubbo", "thrift": "thrift"}
PORT_NAME = re.compile(r"tcp-metaprotocol-([A-Za-z0-9_.]+)(-.+)?\Z")
PORT_RULE = "tcp-metaprotocol-<protocol>[-<suffix>], e.g. tcp-metaprotocol-dubbo or tcp-metaprotocol-thrift-hello"

_GROUPS = {
    "ApplicationProtocol": "metaprotocol.aeraki.io/",
    "MetaRouter": "metaprotocol.aeraki.io/",
    "ServiceEntry": "networking.istio.io/",
    "DestinationRule": "networking.istio.io/",
    "EndpointSlice": "discovery.k8s.io/",
}
_CORE = ("Service", "Pod", "Endpoints")
_VALIDATORS = {kind: jsonschema.Draft202012Validator(schema) for kind, schema in SPECS.items()}
_LB_SIMPLE = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST", "RANDOM": "RANDOM"}
_ROUTE_KEYS = {"name", "match", "route", "mirror", "mirrorPercentage", "requestMutation", "responseMutation"}
_SPEC_KEYS = {"hosts", "routes", "localRateLimit", "globalRateLimit"}


def cluster_name(port: int, subset: str, host: str) -> str:
    return f"outbound|{port}|{subset}|{host}"


def fqdn(host: str, namespace: str) -> str:
    """A short name is a Service in the resource's namespace (as Istio and Aeraki resolve it)."""
    return host if "." in host else f"{host}.{namespace}.svc.cluster.local"


class Problems:
    """Errors and warnings, each naming the file, the resource, the field and the line."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    @staticmethod
    def _say(res: Resource, path: list, message: str) -> str:
        line = res.line_of(path)
        return f"{res.file}: {res.ref}: {_path(path)}: {message}" + (f" (line {line})" if line else "")

    def error(self, res: Resource, path: list, message: str) -> None:
        self.errors.append(self._say(res, path, message))

    def warn(self, res: Resource, path: list, message: str) -> None:
        self.warnings.append(self._say(res, path, message))


@dataclass
class Port:
    number: int
    name: str
    target: int | str | None
    index: int  # in spec.ports
    protocol: str | None  # the MetaProtocol protocol, None for other ports


@dataclass
class Host:
    name: str
    resource: Resource
    ports: dict[int, Port]
    instances: dict[int, dict[tuple[str, int], dict[str, str]]] = field(default_factory=dict)  # port -> (address, port) -> labels

    def meta_ports(self) -> list[Port]:
        return [p for p in self.ports.values() if p.protocol]


@dataclass
class Subset:
    labels: dict[str, str]
    policy: dict[str, Any]
    index: int


@dataclass
class Destination:
    rule: Resource
    subsets: dict[str, Subset]
    policy: dict[str, Any]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class Translator:
    def __init__(self, resources: list[Resource], base: dict[str, Any]) -> None:
        self.problems = Problems()
        self.base = base
        self.by_kind: dict[str, list[Resource]] = {}
        for res in resources:
            group = _GROUPS.get(res.kind)
            if group is None and res.kind not in _CORE:
                continue  # Deployments, ConfigMaps, ...: not what a proxy needs
            expected_core = res.kind in _CORE and res.api_version != "v1"
            if expected_core or (group and not res.api_version.startswith(group)):
                self.problems.warn(res, ["apiVersion"], f"{res.api_version!r} is not the {res.kind} metabridge reads ({group or 'v1'}...); ignored")
                continue
            errors = sorted(_VALIDATORS[res.kind].iter_errors(res.body), key=lambda e: list(e.absolute_path))
            for error in errors:
                self.problems.error(res, list(error.absolute_path), explain(error))
            if not errors:
                self.by_kind.setdefault(res.kind, []).append(res)
        self.pods = self.by_kind.get("Pod", [])
        self.hosts: dict[str, Host] = {}
        self.destinations: dict[str, Destination] = {}
        self.codecs: dict[str, dict[str, Any]] = {}
        self.cluster_names: set[str] = set()

    # -- codecs --------------------------------------------------------------------------

    def _codecs(self) -> None:
        """protocol -> codec entry: the base config's `codecs.<protocol>` first, then an
        ApplicationProtocol's annotation, then its Aeraki codec name, then Aeraki's defaults."""
        chosen: dict[str, dict[str, Any]] = {p: {"ref": ref} for p, ref in DEFAULT_PROTOCOLS.items()}
        seen: dict[str, Resource] = {}
        for res in self.by_kind.get("ApplicationProtocol", []):
            protocol, codec = res.spec.get("protocol"), res.spec.get("codec")
            if not isinstance(protocol, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", protocol):
                self.problems.error(res, ["spec", "protocol"], f"{protocol!r} is not a protocol name (letters, digits, '_', '.'; it is the third part of a port name {PORT_RULE})")
                continue
            if protocol in seen:
                self.problems.error(res, ["spec", "protocol"], f"protocol {protocol!r} is also defined by {seen[protocol].ref}; keep one ApplicationProtocol per protocol")
                continue
            seen[protocol] = res
            ref = res.annotations.get(CODEC_ANNOTATION)
            if ref:
                chosen[protocol] = {"ref": _absolute(ref, res.file.parent)}
            elif codec in BUILTIN_CODECS:
                chosen[protocol] = {"ref": BUILTIN_CODECS[codec]}
            elif protocol in (self.base.get("codecs") or {}):
                pass  # the base config's entry, below
            else:
                self.problems.error(
                    res,
                    ["spec", "codec"],
                    f"{codec!r} is not a codec metabridge has (built in: {', '.join(sorted(BUILTIN_CODECS))}); "
                    f"name a metabridge codec in the annotation {CODEC_ANNOTATION}: <ref> or under codecs.{protocol} in the base config",
                )
                chosen.pop(protocol, None)
        chosen.update(self.base.get("codecs") or {})
        self.codecs = chosen

    # -- services and their endpoints -----------------------------------------------------

    def _ports(self, res: Resource, number_key: str) -> dict[int, Port]:
        ports: dict[int, Port] = {}
        for i, raw in enumerate(res.spec.get("ports") or []):
            number, name = raw.get(number_key), str(raw.get("name") or "")
            if not isinstance(number, int):
                self.problems.error(res, ["spec", "ports", i, number_key], f"{number!r} is not a port number")
                continue
            protocol = None
            match = PORT_NAME.fullmatch(name)
            if match:
                protocol = match.group(1)
                if protocol not in self.codecs:
                    self.problems.error(
                        res, ["spec", "ports", i, "name"],
                        f"unknown protocol {protocol!r} in port name {name!r} (known: {', '.join(sorted(self.codecs))}); "
                        f"add an ApplicationProtocol with spec.protocol: {protocol}, or a codecs.{protocol} entry in the base config",
                    )
                    protocol = None
            elif "metaprotocol" in name:
                self.problems.error(res, ["spec", "ports", i, "name"], f"port name {name!r} does not follow the rule {PORT_RULE}; rename it")
            ports[number] = Port(number, name, raw.get("targetPort"), i, protocol)
        return ports

    def _pod_port(self, pod: Resource, target: int | str | None, default: int) -> int | None:
        if isinstance(target, int):
            return target
        if isinstance(target, str) and target:
            for container in pod.spec.get("containers") or []:
                for port in container.get("ports") or []:
                    if port.get("name") == target:
                        return port.get("containerPort")
            return None
        return default

    def _pods(self, namespace: str, selector: dict[str, str]) -> list[tuple[Resource, str]]:
        """Running pods (with an IP) whose labels hold the selector."""
        found = []
        for pod in self.pods:
            status = pod.body.get("status") or {}
            if pod.namespace != namespace or not selector or not _matches(selector, pod.labels):
                continue
            if status.get("podIP") and status.get("phase", "Running") == "Running":
                found.append((pod, status["podIP"]))
        return found

    def _pod_labels(self, ref: dict | None, namespace: str) -> dict[str, str]:
        if not ref or ref.get("kind") != "Pod":
            return {}
        for pod in self.pods:
            if pod.name == ref.get("name") and pod.namespace == ref.get("namespace", namespace):
                return pod.labels
        return {}

    def _service(self, res: Resource) -> None:
        host = Host(f"{res.name}.{res.namespace}.svc.cluster.local", res, self._ports(res, "port"))
        selector = dict(res.spec.get("selector") or {})
        endpoints = [e for e in self.by_kind.get("Endpoints", []) if e.name == res.name and e.namespace == res.namespace]
        slices = [s for s in self.by_kind.get("EndpointSlice", []) if s.namespace == res.namespace and s.labels.get("kubernetes.io/service-name") == res.name]
        for port in host.ports.values():
            found: dict[tuple[str, int], dict[str, str]] = {}
            for pod, ip in self._pods(res.namespace, selector):
                number = self._pod_port(pod, port.target, port.number)
                if number:
                    found.setdefault((ip, number), {}).update(pod.labels)
            for ep in endpoints:
                for subset in ep.body.get("subsets") or []:
                    numbers = [p.get("port") for p in subset.get("ports") or [] if p.get("name", "") == port.name or len(subset["ports"]) == 1]
                    for address in subset.get("addresses") or []:
                        for number in numbers if address.get("ip") else ():
                            found.setdefault((address.get("ip"), number), {}).update(self._pod_labels(address.get("targetRef"), res.namespace))
            for es in slices:
                numbers = [p.get("port") for p in es.body.get("ports") or [] if p.get("name", "") == port.name or len(es.body["ports"]) == 1]
                for endpoint in es.body.get("endpoints") or []:
                    if (endpoint.get("conditions") or {}).get("ready") is False:
                        continue
                    for address in endpoint.get("addresses") or []:
                        for number in numbers:
                            found.setdefault((address, number), {}).update(self._pod_labels(endpoint.get("targetRef"), res.namespace))
            host.instances[port.number] = found
        self._add_host(host)

    def _service_entry(self, res: Resource) -> None:
        hosts = res.spec.get("hosts") or []
        if not hosts or not isinstance(hosts[0], str):
            self.problems.error(res, ["spec", "hosts"], "a ServiceEntry needs at least one host")
            return
        if len(hosts) > 1:
            self.problems.warn(res, ["spec", "hosts"], f"only the first host ({hosts[0]}) is served, as Aeraki does; make one ServiceEntry per host")
        if "*" in hosts[0]:
            self.problems.error(res, ["spec", "hosts", 0], f"wildcard host {hosts[0]!r} is not supported; name the host")
            return
        host = Host(fqdn(hosts[0], res.namespace), res, self._ports(res, "number"))
        listed = res.spec.get("endpoints") or []
        for i, endpoint in enumerate(listed):
            address = endpoint.get("address")
            if not isinstance(address, str) or not address or address.startswith("unix://"):
                self.problems.error(res, ["spec", "endpoints", i, "address"], f"{address!r}: give an IP address or a DNS name (Unix sockets are not supported)")
        listed = [e for e in listed if isinstance(e.get("address"), str) and e["address"] and not e["address"].startswith("unix://")]
        selector = dict((res.spec.get("workloadSelector") or {}).get("labels") or {})
        for port in host.ports.values():
            found: dict[tuple[str, int], dict[str, str]] = {}
            default = port.target if isinstance(port.target, int) else port.number
            for endpoint in listed:
                address = endpoint["address"]
                number = (endpoint.get("ports") or {}).get(port.name, default)
                found.setdefault((address, number), {}).update(endpoint.get("labels") or {})
            if not listed:
                for pod, ip in self._pods(res.namespace, selector):
                    found.setdefault((ip, default), {}).update(pod.labels)
            if not listed and not selector and res.spec.get("resolution") in ("DNS", "DNS_ROUND_ROBIN"):
                found[(hosts[0], default)] = {}
            host.instances[port.number] = found
        self._add_host(host)

    def _add_host(self, host: Host) -> None:
        other = self.hosts.get(host.name)
        if other is not None:
            self.problems.error(host.resource, ["metadata", "name"], f"host {host.name} is also defined by {other.resource.ref}; keep one")
            return
        self.hosts[host.name] = host

    # -- destination rules ------------------------------------------------------------------

    def _destination_rules(self) -> None:
        for res in self.by_kind.get("DestinationRule", []):
            raw_host = res.spec.get("host")
            if not isinstance(raw_host, str):
                self.problems.error(res, ["spec", "host"], "a DestinationRule needs spec.host")
                continue
            host = fqdn(raw_host, res.namespace)
            if host not in self.hosts:
                self.problems.warn(res, ["spec", "host"], f"host {host} is not a Service or ServiceEntry in the manifests; ignored")
                continue
            if host in self.destinations:
                self.problems.warn(res, ["spec", "host"], f"host {host} already has {self.destinations[host].rule.ref}; this one is ignored")
                continue
            subsets = {}
            for i, raw in enumerate(res.spec.get("subsets") or []):
                if not isinstance(raw.get("name"), str):
                    self.problems.error(res, ["spec", "subsets", i, "name"], "a subset needs a name")
                    continue
                subsets[raw["name"]] = Subset(dict(raw.get("labels") or {}), raw.get("trafficPolicy") or {}, i)
            self.destinations[host] = Destination(res, subsets, res.spec.get("trafficPolicy") or {})

    def _policy(self, res: Resource, path: list, policy: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """A DestinationRule trafficPolicy as cluster keys, and the consistent-hash header."""
        cluster: dict[str, Any] = {}
        header = None
        for key in policy:
            if key not in ("loadBalancer", "connectionPool"):
                self.problems.warn(res, [*path, key], "not supported yet; ignored")
        lb = policy.get("loadBalancer") or {}
        for key in lb:
            if key not in ("simple", "consistentHash"):
                self.problems.warn(res, [*path, "loadBalancer", key], "not supported yet; ignored")
        simple = lb.get("simple")
        if simple is not None:
            if simple in _LB_SIMPLE:
                cluster["lb_policy"] = _LB_SIMPLE[simple]
            elif simple not in ("UNSPECIFIED", "ROUND_ROBIN"):
                self.problems.error(res, [*path, "loadBalancer", "simple"], f"{simple!r} has no metabridge equivalent; use one of {', '.join(_LB_SIMPLE)}")
        ring = lb.get("consistentHash")
        if ring is not None:
            header = ring.get("httpHeaderName")
            for key in ring:
                if key not in ("httpHeaderName", "maglev", "ringHash"):
                    self.problems.warn(res, [*path, "loadBalancer", "consistentHash", key], "not supported (metabridge hashes on a request attribute: httpHeaderName); ignored")
            if header:
                cluster["lb_policy"] = "MAGLEV" if "maglev" in ring else "RING_HASH"
            else:
                self.problems.warn(res, [*path, "loadBalancer", "consistentHash"], "without httpHeaderName there is nothing to hash on; the cluster keeps its default balancing")
        pool = policy.get("connectionPool") or {}
        tcp, http = pool.get("tcp") or {}, pool.get("http") or {}
        breakers = {}
        if "maxConnections" in tcp:
            breakers["max_connections"] = tcp["maxConnections"]
        if "http1MaxPendingRequests" in http:
            breakers["max_pending_requests"] = http["http1MaxPendingRequests"]
        if breakers:
            cluster["circuit_breakers"] = breakers
        if "connectTimeout" in tcp:
            if self._duration(res, [*path, "connectionPool", "tcp", "connectTimeout"], tcp["connectTimeout"]):
                cluster["connect_timeout"] = tcp["connectTimeout"]
        return cluster, header

    def _duration(self, res: Resource, path: list, value: Any) -> bool:
        try:
            parse_duration(value)
        except ValueError as exc:
            self.problems.error(res, path, str(exc))
            return False
        return True

    # -- clusters and listeners -------------------------------------------------------------

    def _clusters(self) -> tuple[list[dict], dict[str, str | None]]:
        """Every cluster (the service's and one per subset, per MetaProtocol port) and the
        consistent-hash header of each."""
        clusters: list[dict] = []
        hashing: dict[str, str | None] = {}
        for host in self.hosts.values():
            dest = self.destinations.get(host.name)
            base_policy, base_header = self._policy(dest.rule, ["spec", "trafficPolicy"], dest.policy) if dest else ({}, None)
            for port in host.meta_ports():
                everything = host.instances.get(port.number) or {}
                if not everything:
                    self.problems.error(
                        host.resource, ["spec", "ports", port.index],
                        f"port {port.number} of {host.name} has no endpoints: add spec.endpoints, or the Pods (or Endpoints/EndpointSlices) the selector matches",
                    )
                    continue
                variants = [("", everything, base_policy, base_header)]
                for name, subset in (dest.subsets if dest else {}).items():
                    policy, header = self._policy(dest.rule, ["spec", "subsets", subset.index, "trafficPolicy"], subset.policy)
                    chosen = {k: v for k, v in everything.items() if _matches(subset.labels, v)}
                    if not chosen:
                        self.problems.warn(dest.rule, ["spec", "subsets", subset.index, "labels"], f"subset {name!r} selects no endpoint of {host.name} port {port.number}; its cluster is left out")
                        continue
                    # As Istio merges them: a subset's loadBalancer replaces the rule's whole loadBalancer.
                    own_lb = "loadBalancer" in subset.policy
                    inherited = {k: v for k, v in base_policy.items() if not (own_lb and k == "lb_policy")}
                    variants.append((name, chosen, {**inherited, **policy}, header if own_lb else base_header))
                for subset_name, endpoints, policy, header in variants:
                    name = cluster_name(port.number, subset_name, host.name)
                    clusters.append({"name": name, "endpoints": [{"address": a, "port": p} for a, p in sorted(endpoints)], **policy})
                    hashing[name] = header
        return clusters, hashing

    def translate(self) -> dict[str, Any]:
        self._codecs()
        for res in self.by_kind.get("Service", []):
            self._service(res)
        for res in self.by_kind.get("ServiceEntry", []):
            self._service_entry(res)
        self._destination_rules()
        clusters, hashing = self._clusters()
        self.cluster_names = set(hashing)
        routers = self._routers()
        listeners = []
        ports: dict[int, Host] = {}
        for host in self.hosts.values():
            for port in host.meta_ports():
                if port.number in ports:
                    other = ports[port.number]
                    self.problems.error(
                        host.resource, ["spec", "ports", port.index],
                        f"port {port.number} is also a MetaProtocol port of {other.resource.ref} ({other.name}); metabridge listens on each service port, so give the services different ports",
                    )
                    continue
                ports[port.number] = host
                name = cluster_name(port.number, "", host.name)
                router = routers.get(host.name)
                if router is None or not router.spec.get("routes"):
                    # Aeraki's default route: the whole service (a MetaRouter may hold only rate limits).
                    route: dict[str, Any] = {"name": "default", "route": {"cluster": name}}
                    if hashing.get(name):
                        route["hash_policy"] = [hashing[name]]
                    routes = [route]
                else:
                    routes = self._routes(router, port.number, hashing)
                filters = self._filters(router) if router else []
                listener = {"name": name, "port": port.number, "codec": port.protocol, "routes": routes}
                if filters:
                    listener["filters"] = filters
                listeners.append(listener)
        raw = {key: value for key, value in self.base.items() if key not in ("codecs", "listeners", "clusters")}
        used = {listener["codec"] for listener in listeners} | {entry["codec"] for entry in self.base.get("listeners") or []}
        raw["codecs"] = {name: entry for name, entry in self.codecs.items() if name in used}
        raw["listeners"] = list(self.base.get("listeners") or []) + listeners
        raw["clusters"] = list(self.base.get("clusters") or []) + clusters
        return raw

    # -- MetaRouters --------------------------------------------------------------------------

    def _routers(self) -> dict[str, Resource]:
        routers: dict[str, Resource] = {}
        for res in self.by_kind.get("MetaRouter", []):
            for key in res.spec:
                if key not in _SPEC_KEYS:
                    self.problems.warn(res, ["spec", key], "not supported yet; ignored")
            hosts = res.spec.get("hosts") or []
            if not hosts:
                self.problems.error(res, ["spec", "hosts"], "a MetaRouter needs at least one host")
            for i, raw_host in enumerate(hosts):
                host = fqdn(str(raw_host), res.namespace)
                if host not in self.hosts:
                    self.problems.error(res, ["spec", "hosts", i], f"host {host} is not a Service or ServiceEntry in the manifests (known: {', '.join(sorted(self.hosts)) or 'none'})")
                elif not self.hosts[host].meta_ports():
                    self.problems.error(res, ["spec", "hosts", i], f"{self.hosts[host].resource.ref} has no port named {PORT_RULE}")
                elif host in routers:
                    self.problems.error(res, ["spec", "hosts", i], f"host {host} is also routed by {routers[host].ref}; keep one MetaRouter per host")
                else:
                    routers[host] = res
        return routers

    def _target(self, res: Resource, path: list, raw: Any, listener_port: int) -> tuple[str, str] | None:
        """A destination or mirror {host, subset, port} as (cluster name, subset)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("host"), str):
            self.problems.error(res, [*path, "host"], "a destination needs a host")
            return None
        host_name = fqdn(raw["host"], res.namespace)
        host = self.hosts.get(host_name)
        if host is None:
            self.problems.error(res, [*path, "host"], f"host {host_name} is not a Service or ServiceEntry in the manifests (known: {', '.join(sorted(self.hosts))})")
            return None
        number = (raw.get("port") or {}).get("number") or listener_port
        port = host.ports.get(number)
        if port is None or not port.protocol:
            meta = ", ".join(str(p.number) for p in host.meta_ports()) or "none"
            self.problems.error(res, [*path, "port", "number"] if raw.get("port") else [*path, "host"], f"{host_name} has no MetaProtocol port {number} (its tcp-metaprotocol-* ports: {meta}); set port.number")
            return None
        subset = raw.get("subset") or ""
        if subset:
            dest = self.destinations.get(host_name)
            if dest is None or subset not in dest.subsets:
                known = ", ".join(dest.subsets) if dest else "none: no DestinationRule for this host"
                self.problems.error(res, [*path, "subset"], f"subset {subset!r} is not defined in a DestinationRule for {host_name} (subsets: {known}); add it to the DestinationRule's spec.subsets")
                return None
        name = cluster_name(number, subset, host_name)
        if name not in self.cluster_names:
            self.problems.error(res, [*path, "subset"] if subset else [*path, "host"], f"{name} has no endpoints (see the warnings and errors about {host_name}); nothing to send to")
            return None
        return name, subset

    def _match(self, res: Resource, path: list, raw: Any) -> list[dict]:
        """match.attributes {key: {exact | prefix | regex}} as route header matches; an
        attribute with none of them asks only that it is present (Aeraki's catch-all)."""
        if raw is None:
            return []
        attributes = raw.get("attributes") if isinstance(raw, dict) else None
        for key in raw if isinstance(raw, dict) else ():
            if key != "attributes":
                self.problems.warn(res, [*path, key], "not supported yet (a match has attributes); ignored")
        if not isinstance(attributes, dict):
            self.problems.error(res, path, "expected attributes: {name: {exact | prefix | regex: value}}")
            return []
        headers = []
        for key, match in attributes.items():
            where = [*path, "attributes", key]
            kinds = [k for k in ("exact", "prefix", "regex") if k in (match or {})]
            extra = sorted(set(match or {}) - {"exact", "prefix", "regex"})
            if extra or len(kinds) > 1:
                self.problems.error(res, where, f"expected one of exact, prefix, regex (got {', '.join(extra + kinds)})")
                continue
            if not kinds:
                headers.append({"name": str(key), "present": True})
                continue
            value = str(match[kinds[0]])
            if kinds[0] == "regex":
                try:
                    re.compile(value)
                except re.error as exc:
                    self.problems.error(res, [*where, "regex"], f"invalid regular expression: {exc}")
                    continue
            headers.append({"name": str(key), kinds[0]: value})
        return headers

    def _mutation(self, res: Resource, path: list, raw: Any) -> list[dict]:
        items = []
        for i, item in enumerate(raw or []):
            if not isinstance(item, dict) or not item.get("key"):
                self.problems.error(res, [*path, i], "expected {key: ..., value: ...}")
                continue
            items.append({"key": str(item["key"]), "value": str(item.get("value", ""))})
        return items

    def _routes(self, res: Resource, listener_port: int, hashing: dict[str, str | None]) -> list[dict]:
        routes = []
        for i, raw in enumerate(res.spec.get("routes") or []):
            path = ["spec", "routes", i]
            for key in raw:
                if key not in _ROUTE_KEYS:
                    self.problems.warn(res, [*path, key], "not supported yet; ignored")
            route: dict[str, Any] = {"name": str(raw.get("name") or f"route{i}")}
            headers = self._match(res, [*path, "match"], raw.get("match"))
            if headers:
                route["match"] = {"headers": headers}
            destinations = raw.get("route") or []
            if not destinations:
                self.problems.error(res, [*path, "route"], "a route needs at least one destination")
                continue
            targets = []
            for j, entry in enumerate(destinations):
                target = self._target(res, [*path, "route", j, "destination"], (entry or {}).get("destination"), listener_port)
                weight = (entry or {}).get("weight", 0)
                if not isinstance(weight, int) or weight < 0:
                    self.problems.error(res, [*path, "route", j, "weight"], f"{weight!r} is not a weight (a whole number, 0 or more)")
                    target = None
                if target:
                    targets.append((target[0], weight))
            if len(targets) != len(destinations):
                continue
            if len(targets) == 1:
                route["route"] = {"cluster": targets[0][0]}  # one destination: its weight does not matter
            elif sum(w for _, w in targets) == 0:
                self.problems.error(res, [*path, "route"], "the destinations' weights add up to 0; give each a weight")
                continue
            else:
                route["route"] = {"weighted_clusters": [{"name": n, "weight": w} for n, w in targets]}
            hash_keys = list(dict.fromkeys(hashing[n] for n, _ in targets if hashing.get(n)))
            if hash_keys:
                route["hash_policy"] = hash_keys
            if "mirror" in raw:
                target = self._target(res, [*path, "mirror"], raw["mirror"], listener_port)
                percent = (raw.get("mirrorPercentage") or {}).get("value") or 100  # 0 or absent: all, as Aeraki
                if not isinstance(percent, (int, float)) or not 0 < percent <= 100:
                    self.problems.error(res, [*path, "mirrorPercentage", "value"], f"{percent!r} is not a percentage (more than 0, at most 100)")
                elif target:
                    route["request_mirror_policies"] = [{"cluster": target[0], "runtime_fraction": percent}]
            elif "mirrorPercentage" in raw:
                self.problems.warn(res, [*path, "mirrorPercentage"], "without mirror nothing is mirrored; ignored")
            for key, out in (("requestMutation", "request_mutation"), ("responseMutation", "response_mutation")):
                if raw.get(key):
                    route[out] = self._mutation(res, [*path, key], raw[key])
            routes.append(route)
        return routes

    # -- rate limits ----------------------------------------------------------------------

    def _bucket(self, res: Resource, path: list, raw: Any) -> dict | None:
        if not isinstance(raw, dict):
            self.problems.error(res, path, "expected {maxTokens, tokensPerFill, fillInterval}")
            return None
        bucket: dict[str, Any] = {"max_tokens": raw.get("maxTokens"), "fill_interval": raw.get("fillInterval")}
        if not isinstance(bucket["max_tokens"], int) or bucket["max_tokens"] < 1:
            self.problems.error(res, [*path, "maxTokens"], f"{bucket['max_tokens']!r}: a whole number, at least 1")
            return None
        if not self._duration(res, [*path, "fillInterval"], bucket["fill_interval"]):
            return None
        if raw.get("tokensPerFill"):  # absent or 0: one token per fill, as Envoy's buckets
            bucket["tokens_per_fill"] = raw["tokensPerFill"]
        return bucket

    def _filters(self, res: Resource) -> list[dict]:
        filters = []
        local = res.spec.get("localRateLimit")
        if local is not None:
            path = ["spec", "localRateLimit"]
            config: dict[str, Any] = {}
            if local.get("tokenBucket") is not None:
                bucket = self._bucket(res, [*path, "tokenBucket"], local["tokenBucket"])
                if bucket:
                    config["token_bucket"] = bucket
            conditions = []
            for i, condition in enumerate(local.get("conditions") or []):
                bucket = self._bucket(res, [*path, "conditions", i, "tokenBucket"], (condition or {}).get("tokenBucket"))
                headers = self._match(res, [*path, "conditions", i, "match"], (condition or {}).get("match"))
                if bucket:
                    conditions.append({"token_bucket": bucket, **({"match": {"headers": headers}} if headers else {})})
            if conditions:
                config["conditions"] = conditions
            if local.get("tokenBucket") is None and not local.get("conditions"):
                self.problems.error(res, path, "give a tokenBucket, conditions, or both")
            elif config:
                filters.append({"name": "local_ratelimit", "config": config})
        limit = res.spec.get("globalRateLimit")
        if limit is not None:
            filters.extend(self._global_limit(res, limit))
        return filters

    def _global_limit(self, res: Resource, raw: dict[str, Any]) -> list[dict]:
        path = ["spec", "globalRateLimit"]
        ok = True
        if not raw.get("domain"):
            self.problems.error(res, [*path, "domain"], "required: the rate limit service's domain")
            ok = False
        descriptors = []
        for i, d in enumerate(raw.get("descriptors") or []):
            if not (d or {}).get("property") or not d.get("descriptorKey"):
                self.problems.error(res, [*path, "descriptors", i], "expected {property: <attribute>, descriptorKey: <key>}")
                ok = False
            else:
                descriptors.append({"property": str(d["property"]), "descriptor_key": str(d["descriptorKey"])})
        if not raw.get("descriptors"):
            self.problems.error(res, [*path, "descriptors"], "at least one descriptor is required")
            ok = False
        address = self._rate_limit_service(res, [*path, "rateLimitService"], raw.get("rateLimitService"))
        config: dict[str, Any] = {"domain": raw.get("domain"), "descriptors": descriptors, "rls": {"address": address}, "failure_mode_deny": bool(raw.get("denyOnFail", False))}
        if "requestTimeout" in raw:
            ok = self._duration(res, [*path, "requestTimeout"], raw["requestTimeout"]) and ok
            config["timeout"] = raw["requestTimeout"]
        headers = self._match(res, [*path, "match"], raw.get("match"))
        if headers:
            config["match"] = {"headers": headers}
        return [{"name": "ratelimit", "config": config}] if ok and address else []

    def _rate_limit_service(self, res: Resource, path: list, raw: Any) -> str | None:
        """Aeraki names a cluster, outbound|PORT|SUBSET|HOST; metabridge's filter calls an
        address: the host's first endpoint when the manifests have it, else HOST:PORT."""
        if not isinstance(raw, str) or not raw:
            self.problems.error(res, path, "required: outbound|PORT||HOST, HOST:PORT or unix:PATH")
            return None
        parts = raw.split("|")
        if len(parts) != 4:
            return raw
        port_text, host_name = parts[1], fqdn(parts[3], res.namespace)
        if parts[0] != "outbound" or not port_text.isdigit() or not parts[3]:
            self.problems.error(res, path, f"{raw!r}: expected outbound|PORT|SUBSET|HOST")
            return None
        host = self.hosts.get(host_name)
        found = sorted((host.instances.get(int(port_text)) or {}) if host else {})
        if not found:
            return f"{host_name}:{port_text}"
        if len(found) > 1:
            self.problems.warn(res, path, f"{host_name} has {len(found)} endpoints; the filter calls the first, {found[0][0]}:{found[0][1]}")
        return f"{found[0][0]}:{found[0][1]}"


def _absolute(ref: str, folder: Path) -> str:
    """A file or folder codec ref is relative to the manifest that names it."""
    location, sep, name = ref.rpartition(":")
    if sep and ("/" in location or location.endswith(".py") or location.startswith(".")) and not Path(location).is_absolute():
        return f"{(folder / location).resolve()}:{name}"
    return ref


def translate(resources: list[Resource], base: dict[str, Any]) -> tuple[dict[str, Any], Problems]:
    translator = Translator(resources, base)
    return translator.translate(), translator.problems
