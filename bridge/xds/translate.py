"""An ``envoy.config.route.v3.RouteConfiguration`` in Aeraki's convention as metabridge routes.

Aeraki's control plane sends a MetaRouter as one virtual host whose routes match ``prefix: /``
plus header matchers (the MetaRouter's ``match.attributes``), route to Istio's subset clusters
(``outbound|PORT|SUBSET|HOST``, one or weighted), and carry the hash policy (header names), the
mirror (cluster and fraction) and the mutations (``request_headers_to_add`` /
``response_headers_to_add``). Each route is turned into the dict a config file's route holds and
built by the config's own schema and ``build_routes``, so a route from RDS is checked exactly
like one in a file (regexes, weights, clusters that exist).

A field that would change what a route does and that metabridge cannot honour (a redirect, a
path match other than ``/``, a ``typed_per_filter_config``, ...) refuses the whole
RouteConfiguration, naming the field: routing differently from what the control plane asked is
worse than keeping the routes in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import betterproto2
import jsonschema

from metabridge.config.model import RouteConfig, build_routes
from metabridge.config.schema import ROUTE, explain

TYPE_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# The retry_on reasons metabridge has (docs/routes.md), also in Envoy's spelling with '-'.
_RETRY_ON = {"connect_failure", "reset", "no_healthy_upstream", "timeout", "retriable_error"}
_DENOMINATOR = {0: 100, 1: 10_000, 2: 1_000_000}  # FractionalPercent: HUNDRED, TEN_THOUSAND, MILLION
_ROUTES_SCHEMA = {"type": "array", "items": ROUTE}


class TranslationError(Exception):
    """A RouteConfiguration metabridge refuses; the message lists every problem found."""


_DEFAULTS: dict[type, Any] = {}


def _set_fields(message: betterproto2.Message) -> list[str]:
    """The fields of ``message`` that hold something other than their default."""
    cls = type(message)
    default = _DEFAULTS.get(cls)
    if default is None:
        default = _DEFAULTS[cls] = cls()
    return [f.name for f in dataclasses.fields(message) if getattr(message, f.name) != getattr(default, f.name)]


def _unsupported(message: betterproto2.Message, allowed: set[str], where: str, problems: list[str], why: str = "") -> None:
    for name in _set_fields(message):
        if name not in allowed:
            problems.append(f"{where}.{name}: not supported by metabridge{why}; remove it (supported here: {', '.join(sorted(allowed))})")


def translate(config, clusters: Mapping[str, Any]) -> tuple[RouteConfig, ...]:
    """The routes of ``config`` (a RouteConfiguration), in order; TranslationError lists every
    problem, including clusters that are not among ``clusters``."""
    problems: list[str] = []
    _unsupported(config, {"name", "virtual_hosts", "validate_clusters", "metadata"}, "route_config", problems)
    if len(config.virtual_hosts) > 1:
        names = ", ".join(repr(v.name) for v in config.virtual_hosts)
        problems.append(f"virtual_hosts: {len(config.virtual_hosts)} virtual hosts ({names}); metabridge takes one per listener, as Aeraki sends")
    raw_routes: list[dict[str, Any]] = []
    for v, vhost in enumerate(config.virtual_hosts[:1]):
        where = f"virtual_hosts[{v}]"
        _unsupported(vhost, {"name", "domains", "routes"}, where, problems)
        for j, route in enumerate(vhost.routes):
            raw = _route(route, f"{where}.routes[{j}]", problems)
            if raw is not None:
                raw_routes.append(raw)
    if problems:
        raise TranslationError("; ".join(problems))
    errors = sorted(jsonschema.Draft202012Validator(_ROUTES_SCHEMA).iter_errors(raw_routes), key=lambda e: list(e.absolute_path))
    if errors:
        raise TranslationError("; ".join(f"virtual_hosts[0].routes{_index(e.absolute_path)}: {explain(e)}" for e in errors[:10]))
    routes, problems = build_routes(raw_routes, clusters, "virtual_hosts[0]")
    if problems:
        raise TranslationError("; ".join(problems))
    return routes


def _index(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _route(route, where: str, problems: list[str]) -> dict[str, Any] | None:
    if route.route is None:
        kind = betterproto2.which_one_of(route, "action")[0]
        problems.append(f"{where}: " + (f"a {kind} route is not supported" if kind else "no action") + "; metabridge routes to clusters: give the route a 'route' action")
        return None
    _unsupported(route, {"name", "match", "route", "request_headers_to_add", "response_headers_to_add", "metadata", "decorator"}, where, problems)
    raw: dict[str, Any] = {}
    if route.name:
        raw["name"] = route.name
    headers = _match(route.match, f"{where}.match", problems)
    if headers:
        raw["match"] = {"headers": headers}
    raw.update(_action(route.route, f"{where}.route", problems))
    for key, field_name in (("request_mutation", "request_headers_to_add"), ("response_mutation", "response_headers_to_add")):
        items = _headers_to_add(getattr(route, field_name), f"{where}.{field_name}", problems)
        if items:
            raw[key] = items
    return raw


def _match(match, where: str, problems: list[str]) -> list[dict[str, Any]]:
    if match is None:
        return []
    _unsupported(match, {"prefix", "headers"}, where, problems, " (metabridge matches a request's attributes as headers; there is no path)")
    kind, value = betterproto2.which_one_of(match, "path_specifier")
    if kind == "prefix" and value not in ("", "/"):
        problems.append(f"{where}.prefix: {value!r}: only '/' (every request, as Aeraki sends) is supported; match attributes with headers instead")
    headers = []
    for k, header in enumerate(match.headers):
        entry = _header(header, f"{where}.headers[{k}]", problems)
        if entry is not None:
            headers.append(entry)
    return headers


def _header(header, where: str, problems: list[str]) -> dict[str, Any] | None:
    _unsupported(header, {"name", "exact_match", "safe_regex_match", "present_match", "prefix_match", "suffix_match", "string_match", "invert_match"}, where, problems)
    entry: dict[str, Any] = {"name": header.name}
    kind, value = betterproto2.which_one_of(header, "header_match_specifier")
    if not kind:
        entry["present"] = True  # Envoy: a matcher with no specifier asks that the header is present
    elif kind in ("exact_match", "prefix_match", "suffix_match"):
        entry[kind[: -len("_match")]] = value
    elif kind == "safe_regex_match":
        entry["regex"] = value.regex
    elif kind == "present_match":
        entry["present"] = value
    elif kind == "string_match":
        _unsupported(value, {"exact", "prefix", "suffix", "safe_regex"}, f"{where}.string_match", problems)
        pattern, text = betterproto2.which_one_of(value, "match_pattern")
        if not pattern:
            problems.append(f"{where}.string_match: no pattern; give exact, prefix, suffix or safe_regex")
            return None
        entry["regex" if pattern == "safe_regex" else pattern] = text.regex if pattern == "safe_regex" else text
    else:
        problems.append(f"{where}.{kind}: not supported by metabridge; use exact, prefix, suffix, safe_regex or present matching")
        return None
    if header.invert_match:
        entry["invert"] = True
    return entry


def _action(action, where: str, problems: list[str]) -> dict[str, Any]:
    _unsupported(action, {"cluster", "weighted_clusters", "hash_policy", "request_mirror_policies", "timeout", "retry_policy"}, where, problems)
    raw: dict[str, Any] = {}
    if action.weighted_clusters is not None:
        weighted = action.weighted_clusters
        _unsupported(weighted, {"clusters", "total_weight"}, f"{where}.weighted_clusters", problems)
        clusters = []
        for k, cluster in enumerate(weighted.clusters):
            _unsupported(cluster, {"name", "weight"}, f"{where}.weighted_clusters.clusters[{k}]", problems)
            clusters.append({"name": cluster.name, "weight": cluster.weight or 0})
        raw["route"] = {"weighted_clusters": clusters}
    elif action.cluster:
        raw["route"] = {"cluster": action.cluster}
    else:
        problems.append(f"{where}: no cluster; give cluster or weighted_clusters")
        raw["route"] = {"cluster": "-"}
    hash_keys = []
    for k, policy in enumerate(action.hash_policy):
        _unsupported(policy, {"header"}, f"{where}.hash_policy[{k}]", problems, " (metabridge hashes on request attributes: use header)")
        if policy.header is not None:
            _unsupported(policy.header, {"header_name"}, f"{where}.hash_policy[{k}].header", problems)
            hash_keys.append(policy.header.header_name)
    if hash_keys:
        raw["hash_policy"] = hash_keys
    mirrors = []
    for k, mirror in enumerate(action.request_mirror_policies):
        _unsupported(mirror, {"cluster", "runtime_fraction"}, f"{where}.request_mirror_policies[{k}]", problems)
        entry: dict[str, Any] = {"cluster": mirror.cluster}
        fraction = mirror.runtime_fraction
        if fraction is not None:
            _unsupported(fraction, {"default_value"}, f"{where}.request_mirror_policies[{k}].runtime_fraction", problems, " (there is no Envoy runtime in the bridge)")
            percent = fraction.default_value
            if percent is not None:
                entry["runtime_fraction"] = min(100.0, percent.numerator * 100 / _DENOMINATOR.get(int(percent.denominator), 100))
            else:
                entry["runtime_fraction"] = 0.0
        mirrors.append(entry)
    if mirrors:
        raw["request_mirror_policies"] = mirrors
    if action.timeout is not None:
        timeout = _duration(action.timeout)
        if timeout is None:
            problems.append(f"{where}.timeout: 0 (no timeout) is not supported; give a positive timeout or leave it out for the listener's request_timeout")
        else:
            raw["timeout"] = timeout
    if action.retry_policy is not None:
        raw["retry_policy"] = _retry(action.retry_policy, f"{where}.retry_policy", problems)
    return raw


def _retry(policy, where: str, problems: list[str]) -> dict[str, Any]:
    _unsupported(policy, {"retry_on", "num_retries", "per_try_timeout"}, where, problems)
    raw: dict[str, Any] = {}
    reasons = [r.strip().replace("-", "_") for r in policy.retry_on.split(",") if r.strip()]
    unknown = [r for r in reasons if r not in _RETRY_ON]
    if unknown:
        problems.append(f"{where}.retry_on: {', '.join(unknown)} not supported; metabridge retries on {', '.join(sorted(_RETRY_ON))} ('-' or '_')")
    elif reasons:
        raw["retry_on"] = reasons
    if policy.num_retries is not None:
        raw["num_retries"] = policy.num_retries
    if policy.per_try_timeout is not None:
        per_try = _duration(policy.per_try_timeout)
        if per_try is not None:
            raw["per_try_timeout"] = per_try
    return raw


def _duration(duration) -> str | None:
    """A protobuf Duration (a timedelta in the models) in the config's syntax ("1500ms"); None for 0."""
    millis = duration.total_seconds() * 1000
    if millis <= 0:
        return None
    return f"{millis:.6f}".rstrip("0").rstrip(".") + "ms"


def _headers_to_add(options, where: str, problems: list[str]) -> list[dict[str, str]]:
    items = []
    for k, option in enumerate(options):
        # append / append_action / keep_empty_value: a codec sets an attribute to one value.
        _unsupported(option, {"header", "append", "append_action", "keep_empty_value"}, f"{where}[{k}]", problems)
        header = option.header
        if header is None or not header.key:
            problems.append(f"{where}[{k}].header: a key is required")
            continue
        value = header.value
        if not value and header.raw_value:
            try:
                value = header.raw_value.decode()
            except UnicodeDecodeError:
                problems.append(f"{where}[{k}].header.raw_value: not UTF-8; codecs take text values")
                continue
        items.append({"key": header.key, "value": value})
    return items
