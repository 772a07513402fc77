"""A sidecar's listeners as Istio generates them, and an EnvoyFilter patch applier, for the
tests of `metabridge render --istio` (tests/unit/test_istio.py, tests/integration/test_istio.py)."""

from __future__ import annotations

import copy

from metabridge.config.istio import API_VERSION, TCP_PROXY

OTHER_PORT = 8080  # a TCP port of the mesh that is not the config's: must stay tcp_proxy


# --- A small EnvoyFilter patch applier, for the operations build_envoy_filters emits ---------
#
# It follows Istio's pilot/pkg/networking/core/envoyfilter (listener_patch.go, cluster_patch.go):
# - a patch applies to the listeners of its context: here `virtualInbound` is SIDECAR_INBOUND,
#   every other listener SIDECAR_OUTBOUND (ANY matches both);
# - `listener.portNumber` matches the listener's port, except on the virtual listeners
#   (`virtualInbound`, `virtualOutbound`), where it matches each filter chain's destination_port;
# - `filterChain.filter.name` picks the network filter an INSERT_BEFORE or REPLACE acts on;
# - for each filter chain the NETWORK_FILTER patches run in the order they are listed, each on
#   the chain as the previous ones left it;
# - CLUSTER ADD appends the value (Istio inserts an ADD of context SIDECAR_OUTBOUND or ANY into a
#   sidecar's clusters once).
# Any other operation, applyTo or match field is refused, so a patch the applier cannot judge
# fails the test instead of passing unapplied.

VIRTUAL = ("virtualInbound", "virtualOutbound")


def _context(listener: dict) -> str:
    return "SIDECAR_INBOUND" if listener["name"] == "virtualInbound" else "SIDECAR_OUTBOUND"


def _chain_matches(listener: dict, chain: dict, match: dict) -> bool:
    assert set(match) <= {"context", "listener"}, match
    if match["context"] not in ("ANY", _context(listener)):
        return False
    lmatch = match.get("listener", {})
    assert set(lmatch) <= {"portNumber", "filterChain"}, lmatch
    port = lmatch.get("portNumber")
    if port:
        if listener["name"] in VIRTUAL:
            if chain.get("filter_chain_match", {}).get("destination_port") != port:
                return False
        elif listener["address"]["socket_address"]["port_value"] != port:
            return False
    assert set(lmatch.get("filterChain", {})) <= {"filter"}, lmatch
    return True


def apply_envoy_filter(bootstrap: dict, envoy_filter: dict) -> dict:
    """A copy of `bootstrap` with `envoy_filter`'s configPatches applied as istiod would."""
    assert envoy_filter["apiVersion"] == API_VERSION and envoy_filter["kind"] == "EnvoyFilter"
    result = copy.deepcopy(bootstrap)
    patches = envoy_filter["spec"]["configPatches"]
    for patch in patches:
        assert patch["applyTo"] in ("CLUSTER", "NETWORK_FILTER"), patch["applyTo"]
    for listener in result["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for patch in (p for p in patches if p["applyTo"] == "NETWORK_FILTER"):
                if not _chain_matches(listener, chain, patch["match"]):
                    continue
                operation, value = patch["patch"]["operation"], patch["patch"]["value"]
                name = patch["match"]["listener"]["filterChain"]["filter"]["name"]
                filters = chain["filters"]
                at = next((i for i, f in enumerate(filters) if f["name"] == name), None)
                if at is None:
                    continue  # Istio: no such filter in this chain, nothing to do
                if operation == "INSERT_BEFORE":
                    filters.insert(at, copy.deepcopy(value))
                elif operation == "REPLACE":
                    filters[at] = copy.deepcopy(value)
                else:
                    raise AssertionError(f"operation {operation} on a NETWORK_FILTER is not handled by this applier")
    for patch in (p for p in patches if p["applyTo"] == "CLUSTER"):
        assert patch["patch"]["operation"] == "ADD" and patch["match"]["context"] in ("SIDECAR_OUTBOUND", "ANY"), patch
        result["static_resources"]["clusters"].append(copy.deepcopy(patch["patch"]["value"]))
    return result


# --- Listeners and clusters of the shape Istio generates for a sidecar ------------------------


def _tcp_proxy(cluster: str) -> dict:
    return {
        "name": TCP_PROXY,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        },
    }


def _rbac() -> dict:
    """Stands for the filters Istio puts before tcp_proxy (istio.stats, rbac for policies)."""
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC", "stat_prefix": "tcp."},
    }


def static_cluster(name: str, ip: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}],
        },
    }


def _original_dst_cluster(name: str) -> dict:
    return {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "10s"}


def istio_sidecar_bootstrap(ports: list[int]) -> dict:
    """A sidecar's listeners and clusters for TCP services on `ports` and on OTHER_PORT, as
    Istio generates them (EDS clusters written as STATIC): for each port an outbound listener
    `0.0.0.0_PORT` (not bound: virtualOutbound hands it the redirected connections) with a
    chain per destination Service VIP, `virtualOutbound` with its passthrough chain, and
    `virtualInbound` with a chain per port of the pod plus its passthrough chain."""
    listeners, clusters = [], []
    for i, port in enumerate([*ports, OTHER_PORT]):
        chains = []
        for j, host in enumerate((f"svc{i}.default.svc.cluster.local", f"other{i}.default.svc.cluster.local")):
            cluster = f"outbound|{port}||{host}"
            clusters.append(static_cluster(cluster, f"10.0.{i}.{j + 1}", port))
            chains.append(
                {
                    "filter_chain_match": {"prefix_ranges": [{"address_prefix": f"10.96.{i}.{j + 1}", "prefix_len": 32}]},
                    "filters": [_tcp_proxy(cluster)],
                }
            )
        listeners.append(
            {
                "name": f"0.0.0.0_{port}",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
                "bind_to_port": False,
                "filter_chains": chains,
            }
        )
    listeners.append(
        {
            "name": "virtualOutbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
            "use_original_dst": True,
            "filter_chains": [{"name": "virtualOutbound-catchall-tcp", "filters": [_tcp_proxy("PassthroughCluster")]}],
        }
    )
    inbound_chains = []
    for port in [*ports, OTHER_PORT]:
        clusters.append(_original_dst_cluster(f"inbound|{port}||"))
        inbound_chains.append(
            {
                "name": f"inbound|{port}||",
                "filter_chain_match": {"destination_port": port, "transport_protocol": "raw_buffer"},
                "filters": [_rbac(), _tcp_proxy(f"inbound|{port}||")],
            }
        )
    inbound_chains.append(
        {
            "name": "virtualInbound",
            "filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}]},
            "filters": [_tcp_proxy("InboundPassthroughCluster")],
        }
    )
    listeners.append(
        {
            "name": "virtualInbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
            "listener_filters": [
                {
                    "name": "envoy.filters.listener.original_dst",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
                }
            ],
            "filter_chains": inbound_chains,
        }
    )
    clusters += [_original_dst_cluster("PassthroughCluster"), _original_dst_cluster("InboundPassthroughCluster")]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
