"""`metabridge render --istio`: the EnvoyFilter patches, applied to listeners of the shape Istio
generates for a sidecar's TCP ports, give the chain a metabridge Envoy runs, and real Envoy
accepts the result (`envoy --mode validate`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metabridge.cli import main
from metabridge.config.bootstrap import BRIDGE_CLUSTER, EnvoyConfigError, build_bootstrap, validate_with_envoy
from metabridge.config.istio import DEFAULT_WORKLOAD_LABELS, TCP_PROXY, build_envoy_filters, render_istio_yaml
from metabridge.config.model import load, parse
from tests.istio_sidecar import OTHER_PORT, apply_envoy_filter, istio_sidecar_bootstrap

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "docker.yaml"  # three listeners: awesomerpc 10000, dubbo 10200, thrift 10100
SOCKET = "unix:/run/metabridge/bridge.sock"
EXT_PROC = "envoy.filters.network.ext_proc"
HCM = "envoy.filters.network.http_connection_manager"


def _filter_names(bootstrap: dict) -> dict[tuple[str, int], list[str]]:
    """(listener, chain index) -> the chain's filter names."""
    return {
        (listener["name"], i): [f["name"] for f in chain["filters"]]
        for listener in bootstrap["static_resources"]["listeners"]
        for i, chain in enumerate(listener["filter_chains"])
    }


@pytest.fixture(scope="module")
def config():
    return load(EXAMPLE)


@pytest.fixture(scope="module")
def sidecar(config):
    return istio_sidecar_bootstrap([listener.port for listener in config.listeners])


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_patches_put_the_metabridge_chain_on_the_configs_ports_only(config, sidecar, side):
    [envoy_filter] = build_envoy_filters(config, side=side, bridge_addresses=[SOCKET])
    patched = apply_envoy_filter(sidecar, envoy_filter)
    before, after = _filter_names(sidecar), _filter_names(patched)
    ports = {listener.port for listener in config.listeners}
    changed = {key for key in before if before[key] != after[key]}
    if side == "outbound":
        # Every destination's chain on a config port; nothing on another port, nothing inbound.
        assert changed == {key for key in before if key[0] in {f"0.0.0.0_{p}" for p in ports}}
        assert len(changed) == 2 * len(ports)
        assert all(after[key] == [EXT_PROC, HCM] for key in changed)
    else:
        # The chain of each config port (in the order of the ports), not OTHER_PORT's nor the passthrough.
        assert changed == {("virtualInbound", i) for i in range(len(ports))}
        assert all(after[key] == ["envoy.filters.network.rbac", EXT_PROC, HCM] for key in changed)  # what came before stays
    assert after[(f"0.0.0.0_{OTHER_PORT}", 0)] == after[(f"0.0.0.0_{OTHER_PORT}", 1)] == [TCP_PROXY]
    assert after[("virtualInbound", len(ports))] == ["envoy.filters.network.rbac", TCP_PROXY]
    assert after[("virtualInbound", len(ports) + 1)] == [TCP_PROXY]  # the passthrough chain
    assert after[("virtualOutbound", 0)] == [TCP_PROXY]


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_patched_sidecar_is_accepted_by_envoy(config, sidecar, side):
    [envoy_filter] = build_envoy_filters(config, side=side, bridge_addresses=[SOCKET])
    patched = apply_envoy_filter(sidecar, envoy_filter)
    names = [c["name"] for c in patched["static_resources"]["clusters"]]
    assert len(names) == len(set(names))  # `envoy --mode validate` does not check this
    validate_with_envoy(yaml.safe_dump(patched, sort_keys=False))


def test_each_patched_chain_is_the_bootstrap_chain_of_its_listener(config, sidecar):
    [envoy_filter] = build_envoy_filters(config, bridge_addresses=[SOCKET])
    patched = apply_envoy_filter(sidecar, envoy_filter)
    bootstrap = build_bootstrap(config, bridge_addresses=[SOCKET])["static_resources"]
    by_port = {listener.port: listener.name for listener in config.listeners}
    expected = {lst["name"]: lst["filter_chains"][0]["filters"] for lst in bootstrap["listeners"]}
    for listener in patched["static_resources"]["listeners"]:
        port = listener["address"]["socket_address"]["port_value"]
        if port in by_port and listener["name"] not in ("virtualInbound", "virtualOutbound"):
            for chain in listener["filter_chains"]:
                assert chain["filters"] == expected[by_port[port]]
                metadata = chain["filters"][0]["typed_config"]["grpc_service"]["initial_metadata"]
                assert metadata == [{"key": "x-metabridge-listener", "value": by_port[port]}]
                assert chain["filters"][0]["typed_config"]["failure_mode_allow"] is False
    # The bridge cluster and the config's clusters are added, as the bootstrap renders them.
    added = {c["name"]: c for c in patched["static_resources"]["clusters"][len(sidecar["static_resources"]["clusters"]):]}
    assert added == {c["name"]: c for c in bootstrap["clusters"]}
    assert added[BRIDGE_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/metabridge/bridge.sock"}
    }


def test_one_envoy_filter_resource_selecting_the_bridge_pods(config):
    default, custom = build_envoy_filters(config), build_envoy_filters(config, side="inbound", workload_labels={"app": "shop"})
    assert len(default) == len(custom) == 1
    assert default[0]["spec"]["workloadSelector"] == {"labels": DEFAULT_WORKLOAD_LABELS}
    assert custom[0]["spec"]["workloadSelector"] == {"labels": {"app": "shop"}}
    assert default[0]["metadata"]["name"] == "metabridge-docker-outbound"
    assert custom[0]["metadata"]["name"] == "metabridge-docker-inbound"
    operations = [(p["applyTo"], p["patch"]["operation"]) for p in default[0]["spec"]["configPatches"]]
    assert operations == [("CLUSTER", "ADD")] * (1 + len(config.clusters)) + [
        ("NETWORK_FILTER", "INSERT_BEFORE"),
        ("NETWORK_FILTER", "REPLACE"),
    ] * len(config.listeners)
    contexts = {p["match"]["context"] for p in custom[0]["spec"]["configPatches"] if p["applyTo"] == "NETWORK_FILTER"}
    assert contexts == {"SIDECAR_INBOUND"}
    text = render_istio_yaml(config)
    assert text.startswith("# Generated by `metabridge render --istio` from docker.yaml")
    assert list(yaml.safe_load_all(text)) == default


def test_istios_own_clusters_are_used_not_added(sidecar):
    # A route to the cluster Istio generates for a destination (as --manifests derives them),
    # and one to a cluster of the config's own.
    istio_cluster = "outbound|10000||svc0.default.svc.cluster.local"  # in the sidecar already
    raw = {
        "bridge": {"listen": SOCKET},
        "codecs": {"awesomerpc": {"ref": "awesomerpc"}},
        "listeners": [{"name": "rpc", "port": 10000, "codec": "awesomerpc", "routes": [
            {"match": {"headers": [{"name": "cmd", "exact": "1"}]}, "route": {"cluster": istio_cluster}},
            {"match": {"headers": [{"name": "cmd", "exact": "2"}]}, "route": {"cluster": "local"}},
        ]}],
        "clusters": [
            {"name": istio_cluster, "endpoints": [{"address": "svc0.default.svc.cluster.local", "port": 10000}]},
            {"name": "local", "endpoints": [{"address": "127.0.0.1", "port": 10001}]},
        ],
    }
    [envoy_filter] = build_envoy_filters(parse(raw))
    added = [p["patch"]["value"]["name"] for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"]
    assert added == [BRIDGE_CLUSTER, "local"]
    patched = apply_envoy_filter(sidecar, envoy_filter)
    names = [c["name"] for c in patched["static_resources"]["clusters"]]
    assert len(names) == len(set(names)) and istio_cluster in names
    validate_with_envoy(yaml.safe_dump(patched, sort_keys=False))


def test_listeners_sharing_a_port_are_refused(config):
    raw = yaml.safe_load(EXAMPLE.read_text())
    # Two addresses, one port: fine for a bootstrap, ambiguous for Istio's match by port.
    raw["listeners"][1].update(address="127.0.0.2", port=raw["listeners"][0]["port"])
    shared = parse(raw, str(EXAMPLE), EXAMPLE.parent)
    with pytest.raises(EnvoyConfigError, match="share port"):
        build_envoy_filters(shared)
    with pytest.raises(EnvoyConfigError, match="Istio side"):
        build_envoy_filters(config, side="gateway")


def test_cli_render_istio_writes_the_resources(tmp_path, capsys):
    out = tmp_path / "envoyfilter.yaml"
    argv = ["render", "-c", str(EXAMPLE), "--istio", "--istio-side", "inbound", "--istio-selector", "app=shop",
            "--bridge-address", SOCKET, "--endpoint", "127.0.0.1:10001=awesomerpc-v1:10001", "-o", str(out)]
    assert main(argv) == 0
    [envoy_filter] = yaml.safe_load_all(out.read_text())
    assert envoy_filter["spec"]["workloadSelector"] == {"labels": {"app": "shop"}}
    clusters = {p["patch"]["value"]["name"]: p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"}
    endpoint = clusters["awesomerpc-v1"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "awesomerpc-v1", "port_value": 10001}
    # From Istio and Aeraki manifests (docs/mesh.md): the routes name istiod's clusters only.
    assert main(["render", "--manifests", str(ROOT / "examples" / "mesh" / "dubbo"), "--istio", "-o", str(out)]) == 0
    [envoy_filter] = yaml.safe_load_all(out.read_text())
    added = [p["patch"]["value"]["name"] for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"]
    assert added == [BRIDGE_CLUSTER]
    with pytest.raises(SystemExit, match="do not apply with --istio"):
        main(["render", "-c", str(EXAMPLE), "--istio", "--check"])


def test_inprocess_mode_is_refused_with_istio(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["bridge"] = {"mode": "inprocess"}
    for codec in raw["codecs"].values():
        codec["ref"] = str((EXAMPLE.parent / codec["ref"].rpartition(":")[0]).resolve()) + ":" + codec["ref"].rpartition(":")[2]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(EnvoyConfigError, match="inprocess does not apply with --istio"):
        build_envoy_filters(load(path))
    assert main(["render", "--istio", "-c", str(path)]) == 2
    assert "use bridge.mode ext_proc" in capsys.readouterr().err
