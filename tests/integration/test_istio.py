"""`metabridge render --istio` through a real Envoy: an Istio-shaped sidecar bootstrap with the
EnvoyFilter applied routes awesomerpc requests request by request, on the outbound side (a
destination's chain of `0.0.0.0_PORT`, the tunnels going to clusters of Istio's naming that the
sidecar already has, as istiod sends them) and on the inbound side (the port's chain of
`virtualInbound`, the tunnels going to the config's own clusters, which the EnvoyFilter adds).

Without iptables nothing redirects connections to Istio's unbound listeners, so the listener
under test is bound on 127.0.0.1 at the config's port: the outbound chain matches that
destination address, the inbound chain that destination port, as they would for a redirected
connection.

What does not apply in-process (so this file runs in ext_proc only):
- the patched sidecar: `render --istio` gives the sidecar the ext_proc chain toward a bridge container beside it (the bridge as a separate process); it renders that chain for a bridge.mode inprocess config too, and an istio-proxy with the module inside is not a deployment it renders.
"""

from __future__ import annotations

import urllib.request

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient
from metabridge.config import bootstrap as envoy_config
from metabridge.config.istio import build_envoy_filters
from metabridge.config.model import load
from tests.integration.harness import Stack, awesomerpc_config, cmd_route, free_port, port_open, run_async, wait_until
from tests.istio_sidecar import apply_envoy_filter, istio_sidecar_bootstrap, static_cluster


def _sidecar_for_test(port: int, admin_port: int, side: str, istio_clusters: dict[str, int]) -> dict:
    sidecar = istio_sidecar_bootstrap([port])
    # Stand-ins for the EDS clusters istiod would send for the backends.
    sidecar["static_resources"]["clusters"] += [static_cluster(n, "127.0.0.1", p) for n, p in istio_clusters.items()]
    sidecar["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for listener in sidecar["static_resources"]["listeners"]:
        address = listener["address"]["socket_address"]
        if listener["name"] == f"0.0.0.0_{port}" and side == "outbound":
            address["address"] = "127.0.0.1"
            listener["bind_to_port"] = True
            listener["filter_chains"][0]["filter_chain_match"]["prefix_ranges"] = [{"address_prefix": "127.0.0.1", "prefix_len": 32}]
        elif listener["name"] == "virtualInbound" and side == "inbound":
            address.update(address="127.0.0.1", port_value=port)
            del listener["listener_filters"]  # no redirected connections: the local address is the destination
        elif listener["name"] in ("virtualInbound", "virtualOutbound"):
            address.update(address="127.0.0.1", port_value=free_port())
    return sidecar


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_patched_sidecar_routes_each_request(tmp_path, side):
    ports = {"v1": free_port(), "v2": free_port()}
    if side == "outbound":
        clusters = {f"outbound|{port}||{name}.default.svc.cluster.local": port for name, port in ports.items()}
    else:
        clusters = dict(ports)
    v1, v2 = clusters
    config = awesomerpc_config(free_port(), clusters, [cmd_route(1, v1), cmd_route(2, v2)])
    stack = Stack(tmp_path, config, ports)
    try:
        for name, port in ports.items():
            stack.start_backend(name, port)
        stack.start_bridge()
        listen_port = config["listeners"][0]["port"]
        [envoy_filter] = build_envoy_filters(load(stack.config_path), side=side)
        istio_clusters = clusters if side == "outbound" else {}
        patched = apply_envoy_filter(_sidecar_for_test(listen_port, stack.admin_port, side, istio_clusters), envoy_filter)
        bootstrap = tmp_path / "sidecar.yaml"
        bootstrap.write_text(yaml.safe_dump(patched, sort_keys=False))
        proc = stack._spawn("envoy", [envoy_config.find_envoy(), "-c", str(bootstrap), "--concurrency", "1", "--log-level", "info", "--use-dynamic-base-id"])
        url = f"http://127.0.0.1:{stack.admin_port}/ready"
        wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 20, "envoy", proc)
        wait_until(lambda: port_open(listen_port), 10, "patched listener", proc)

        async def calls():
            async with await AwesomeRpcClient.connect("127.0.0.1", listen_port) as client:
                return [await client.call(cmd, b"hello") for cmd in (1, 2, 1, 2)]

        replies = run_async(calls())
        assert [r.rsp_code for r in replies] == [0, 0, 0, 0], stack.log("bridge")[-2000:]
        # One client connection, each request routed on its own cmd by the bridge's routes.
        assert [r.body for r in replies] == [b"v1|hello", b"v2|hello", b"v1|hello", b"v2|hello"]
        # The client's connection went through the patched chain: one ext_proc stream, and a
        # CONNECT tunnel per backend terminated by the HCM that replaced tcp_proxy.
        name = config["listeners"][0]["name"]
        assert stack.envoy_stat(f"network_ext_proc.{name}.streams_started") == 1
        assert stack.envoy_stat(f"http.{name}.downstream_cx_upgrades_total") == 2
    finally:
        stack.stop()
