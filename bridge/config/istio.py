"""Istio EnvoyFilter resources that give an istio-proxy sidecar the metabridge chain.

Istio generates a `tcp_proxy` filter for every filter chain of a TCP port (a Service port named
`tcp-...`, e.g. `tcp-metaprotocol-dubbo-server`): in the outbound listener of that port
(`0.0.0.0_PORT`, one chain per destination) and in `virtualInbound` (one chain per port). For
each listener of the metabridge config, the patches put the bootstrap's chain in its place on
that port: the ext_proc network filter before `tcp_proxy`, then the HTTP/2 connection manager
that terminates the bridge's CONNECT tunnels instead of it. The bridge cluster (the bridge
container of the same pod, over the socket in a volume both mount) and the config's own clusters
are added to the sidecar's clusters; a config cluster named as Istio names its clusters
(`outbound|PORT|SUBSET|HOST`, `inbound|PORT||`, what `--manifests` derives) is istiod's, so the
tunnels use it as istiod sends it (endpoints, mTLS, DestinationRule policies) and it is not added.

The filter and cluster bodies are those `build_bootstrap` renders, so the sidecar runs exactly
the chain a metabridge Envoy runs (docs/istio.md).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from metabridge.config.bootstrap import EnvoyConfigError, build_bootstrap
from metabridge.config.model import Config

API_VERSION = "networking.istio.io/v1alpha3"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
# Where Istio's patches apply: the sidecar's outbound listeners (the client side, where Aeraki's
# MetaProtocol routes too) or its inbound ones (in front of the pod's own server).
CONTEXTS = {"outbound": "SIDECAR_OUTBOUND", "inbound": "SIDECAR_INBOUND"}
# Pods that run the bridge container carry this label; only their sidecars are patched (a
# sidecar without a bridge beside it would close every connection on the patched ports).
DEFAULT_WORKLOAD_LABELS = {"metabridge/bridge": "enabled"}
# Istio's cluster names (pilot's model.BuildSubsetKey): direction|port|subset|host.
ISTIO_CLUSTER = re.compile(r"^(outbound|inbound)\|[0-9]+\|[^|]*\|[^|]*\Z")


def _resource_name(config: Config, side: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(config.source).stem.lower()).strip("-") or "config"
    return f"metabridge-{stem}-{side}"[:63].rstrip("-")


def build_envoy_filters(
    config: Config,
    *,
    side: str = "outbound",
    workload_labels: dict[str, str] | None = None,
    bridge_addresses: list[str] | None = None,
    endpoint_overrides: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The EnvoyFilter resources (as dicts) for `config` on the `side` ("outbound" or "inbound")
    of the sidecars selected by `workload_labels`. bridge_addresses and endpoint_overrides are
    build_bootstrap's."""
    if side not in CONTEXTS:
        raise EnvoyConfigError(f"Istio side {side!r}: expected one of {', '.join(CONTEXTS)}")
    if config.mode == "inprocess":
        # The sidecar is Istio's proxy: it has no metabridge module, interpreter or config file.
        raise EnvoyConfigError(
            f"{config.source}: bridge.mode inprocess does not apply with --istio: the sidecar's Envoy would need the"
            " metabridge module, its Python and the config inside the istio-proxy container; use bridge.mode ext_proc"
            " (the bridge as a container beside it, docs/istio.md)"
        )
    ports = [listener.port for listener in config.listeners]
    shared = sorted({p for p in ports if ports.count(p) > 1})
    if shared:
        # Istio's match is by port: two listeners on one port would patch the same chains twice.
        raise EnvoyConfigError(f"{config.source}: listeners share port(s) {shared}; each needs a port of its own under Istio")
    bootstrap = build_bootstrap(config, bridge_addresses=bridge_addresses, endpoint_overrides=endpoint_overrides)
    resources = bootstrap["static_resources"]
    context = CONTEXTS[side]

    patches: list[dict[str, Any]] = []
    # Clusters first: the chains refer to them. ADD with SIDECAR_OUTBOUND: Istio inserts clusters
    # once per sidecar in that context, and a cluster serves listeners of either side.
    for cluster in resources["clusters"]:
        if ISTIO_CLUSTER.match(cluster["name"]):
            continue  # istiod's own: adding one of the same name would make the sidecar reject its clusters
        patches.append({"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND"}, "patch": {"operation": "ADD", "value": cluster}})
    chains = {listener["name"]: listener["filter_chains"] for listener in resources["listeners"]}
    for listener in config.listeners:
        [chain] = chains[listener.name]
        ext_proc, hcm = chain["filters"]
        match = {"context": context, "listener": {"portNumber": listener.port, "filterChain": {"filter": {"name": TCP_PROXY}}}}
        # Istio applies a resource's patches in order: ext_proc goes in front of tcp_proxy, then
        # tcp_proxy (terminal) becomes HCM (terminal), the chain's last filter.
        patches.append({"applyTo": "NETWORK_FILTER", "match": match, "patch": {"operation": "INSERT_BEFORE", "value": ext_proc}})
        patches.append({"applyTo": "NETWORK_FILTER", "match": copy.deepcopy(match), "patch": {"operation": "REPLACE", "value": hcm}})

    # One resource: Istio applies all of it or none, so no chain ever names a missing cluster.
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "EnvoyFilter",
            "metadata": {"name": _resource_name(config, side), "labels": {"app.kubernetes.io/managed-by": "metabridge"}},
            "spec": {
                "workloadSelector": {"labels": dict(workload_labels or DEFAULT_WORKLOAD_LABELS)},
                "configPatches": patches,
            },
        }
    ]


def render_istio_yaml(config: Config, **kwargs: Any) -> str:
    """build_envoy_filters as YAML documents, headed by a do-not-edit comment."""
    documents = build_envoy_filters(config, **kwargs)
    header = (
        f"# Generated by `metabridge render --istio` from {Path(config.source).name}; do not edit by hand.\n"
        "# Needs an istio-proxy whose Envoy has envoy.filters.network.ext_proc (docs/istio.md).\n"
    )
    return header + yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False)
