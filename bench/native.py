"""Envoy bootstraps for the native paths metabridge is compared with.

- ``tcp_proxy``: a listener whose only filter is ``envoy.filters.network.tcp_proxy`` to the
  backend: what plain TCP forwarding through Envoy costs, the ceiling for any L7 proxy in it.
- ``generic_proxy``: ``envoy.filters.network.generic_proxy`` with the built-in Dubbo codec
  (``envoy.generic_proxy.codecs.dubbo``) and its router, routing each request on service and
  method: Envoy's own C++ layer-7 proxy for the same protocol metabridge's Dubbo path serves.

Both are plain dicts in Envoy's YAML field names (the real binary validates them; see
tests/bench/test_bench_smoke.py).
"""

from __future__ import annotations

from typing import Any

from bench import wire

BACKEND_CLUSTER = "backend"

_GENERIC_PROXY = "type.googleapis.com/envoy.extensions.filters.network.generic_proxy.v3.GenericProxy"
_GENERIC_ROUTER = "type.googleapis.com/envoy.extensions.filters.network.generic_proxy.router.v3.Router"
_GENERIC_DUBBO = "type.googleapis.com/envoy.extensions.filters.network.generic_proxy.codecs.dubbo.v3.DubboCodecConfig"
_GENERIC_REQUEST_INPUT = "type.googleapis.com/envoy.extensions.filters.network.generic_proxy.matcher.v3.RequestMatchInput"
_GENERIC_REQUEST_MATCHER = "type.googleapis.com/envoy.extensions.filters.network.generic_proxy.matcher.v3.RequestMatcher"
_GENERIC_ROUTE_ACTION = "type.googleapis.com/envoy.extensions.filters.network.generic_proxy.action.v3.RouteAction"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


# generic_proxy holds each whole message in the connection's buffer: Envoy's default limit of
# 1 MiB makes its Dubbo codec fail ("request decoding failure") on the 1 MiB points.
GENERIC_PROXY_BUFFER_LIMIT = 4 * 1024 * 1024


def _bootstrap(admin_port: int, listen_port: int, network_filter: dict[str, Any], backend_port: int, buffer_limit: int | None = None) -> dict[str, Any]:
    limit = {} if buffer_limit is None else {"per_connection_buffer_limit_bytes": buffer_limit}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [{"filters": [network_filter]}],
                    **limit,
                }
            ],
            "clusters": [
                {
                    "name": BACKEND_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "lb_policy": "ROUND_ROBIN",
                    **limit,
                    "load_assignment": {
                        "cluster_name": BACKEND_CLUSTER,
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}}}]}
                        ],
                    },
                }
            ],
        },
    }


def tcp_proxy_bootstrap(admin_port: int, listen_port: int, backend_port: int) -> dict[str, Any]:
    network_filter = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": "bench", "cluster": BACKEND_CLUSTER},
    }
    return _bootstrap(admin_port, listen_port, network_filter, backend_port)


def generic_proxy_bootstrap(admin_port: int, listen_port: int, backend_port: int) -> dict[str, Any]:
    """generic_proxy + Dubbo codec; one route matching the benchmark's service and method."""
    route = {
        "predicate": {
            "single_predicate": {
                "input": {"name": "request", "typed_config": {"@type": _GENERIC_REQUEST_INPUT}},
                "custom_match": {
                    "name": "request",
                    "typed_config": {
                        "@type": _GENERIC_REQUEST_MATCHER,
                        "host": {"exact": wire.DUBBO_SERVICE},
                        "method": {"exact": wire.DUBBO_METHOD},
                    },
                },
            }
        },
        "on_match": {"action": {"name": "route", "typed_config": {"@type": _GENERIC_ROUTE_ACTION, "cluster": BACKEND_CLUSTER}}},
    }
    network_filter = {
        "name": "envoy.filters.network.generic_proxy",
        "typed_config": {
            "@type": _GENERIC_PROXY,
            "stat_prefix": "bench",
            "codec_config": {"name": "envoy.generic_proxy.codecs.dubbo", "typed_config": {"@type": _GENERIC_DUBBO}},
            "filters": [{"name": "envoy.filters.generic.router", "typed_config": {"@type": _GENERIC_ROUTER}}],
            "route_config": {"name": "bench", "routes": {"matcher_list": {"matchers": [route]}}},
        },
    }
    return _bootstrap(admin_port, listen_port, network_filter, backend_port, GENERIC_PROXY_BUFFER_LIMIT)
