"""deploy/kubernetes: every manifest is a valid object of a current Kubernetes (strict schema:
unknown fields rejected), its metabridge config is valid for metabridge itself, and the pieces
that must agree (ports, socket, probes, selectors, security settings) do."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from metabridge.config.bootstrap import render_yaml, validate_with_envoy
from metabridge.config.model import Config, load
from metabridge.config.units import parse_size
from metabridge.core.runtime import build_runtimes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37"  # the newest schema kubernetes-validate 1.37.0 ships
PORT_NAME = re.compile(r"^tcp-metaprotocol-(?P<protocol>[a-z0-9]+)-[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def _manifests() -> dict[str, dict]:
    """kind -> the one object of that kind, over every manifest file except kustomization.yaml."""
    objects: dict[str, dict] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    return objects


MANIFESTS = _manifests()
POD = MANIFESTS["Deployment"]["spec"]["template"]
CONTAINERS = {c["name"]: c for c in POD["spec"]["containers"]}
INIT = {c["name"]: c for c in POD["spec"]["initContainers"]}
ALL_CONTAINERS = [*POD["spec"]["initContainers"], *POD["spec"]["containers"]]


def _mounts(container: dict) -> dict[str, str]:
    """volume name -> mount path."""
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", ())}


def _volume_path(container: dict, path: str) -> str:
    """The name of the volume that holds ``path`` in ``container`` (fails when none does)."""
    for name, mount in _mounts(container).items():
        if path.startswith(mount.rstrip("/") + "/"):
            return name
    raise AssertionError(f"{container['name']}: {path} is on no mounted volume")


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {shlex.join(command)}"
    return command[command.index(flag) + 1]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    path = tmp_path_factory.mktemp("configmap") / "metabridge.yaml"
    path.write_text(MANIFESTS["ConfigMap"]["data"]["metabridge.yaml"])
    return load(path)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_kubernetes_schema(kind):
    assert kubernetes_validate.validate(MANIFESTS[kind], KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_strict_validation_rejects_an_unknown_field():
    broken = copy.deepcopy(MANIFESTS["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_configmap_config_passes_metabridge_validation(config):
    build_runtimes(config)  # imports every codec, compiles every route (as `metabridge validate`)
    routed = {w.name for listener in config.listeners for route in listener.routes for w in route.clusters}
    assert routed <= set(config.clusters)
    validate_with_envoy(render_yaml(config))  # what the init container renders, Envoy accepts


def test_service_ports_follow_the_metaprotocol_rule_and_match_the_listeners(config):
    service = MANIFESTS["Service"]
    ports = service["spec"]["ports"]
    for port in ports:
        assert PORT_NAME.match(port["name"]), port["name"]
        assert len(port["name"]) <= 63  # a DNS label
    assert sorted((PORT_NAME.match(p["name"])["protocol"], p["port"], p["targetPort"]) for p in ports) == sorted(
        (listener.codec, listener.port, listener.port) for listener in config.listeners
    )
    # Envoy binds every listener on the pod's addresses and declares each port.
    assert {listener.address for listener in config.listeners} == {"0.0.0.0"}
    assert sorted(p["containerPort"] for p in CONTAINERS["envoy"]["ports"]) == sorted(l.port for l in config.listeners)
    assert CONTAINERS["bridge"]["ports"] == [{"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"}]


def test_bridge_socket_and_probes_agree_between_containers(config):
    bridge, envoy, render = CONTAINERS["bridge"], CONTAINERS["envoy"], INIT["render-bootstrap"]
    sockets = config.worker_addresses()
    assert all(address.startswith("unix:") for address in sockets)
    # The bridge listens where the init container tells Envoy to connect: both read bridge.listen
    # from the same file (no --listen / --bridge-address to drift apart).
    config_path = _option(bridge["command"], "--config")
    assert _option(render["command"], "--config") == config_path
    assert "--listen" not in bridge["command"] and "--bridge-address" not in render["command"]
    assert _volume_path(bridge, config_path) == _volume_path(render, config_path) == "config"
    # Each socket is on the one emptyDir both containers mount, at the same path.
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    for address in sockets:
        path = address.removeprefix("unix:")
        volume = _volume_path(bridge, path)
        assert _volume_path(envoy, path) == volume and "emptyDir" in volumes[volume]
        assert _mounts(bridge)[volume] == _mounts(envoy)[volume]
    # The bridge's probes ask every worker's socket.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = bridge[probe]["exec"]["command"]
        assert command[:2] == ["metabridge", "health"]
        assert [_option(command, "--address")] == sockets
    # Envoy starts from the rendered bootstrap, with the config's concurrency.
    bootstrap = _option(render["command"], "--output")
    assert _option(envoy["command"], "-c") == bootstrap
    assert _volume_path(render, bootstrap) == _volume_path(envoy, bootstrap) == "envoy-bootstrap"
    assert int(_option(envoy["command"], "--concurrency")) == config.envoy_concurrency
    # Envoy's probes and drain hook reach its admin API where the config puts it.
    admin = f"http://{config.envoy_admin_address}:{config.envoy_admin_port}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert envoy[probe]["exec"]["command"] == ["metabridge-probe", f"{admin}/ready"]
    drain = envoy["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert f"{admin}/drain_listeners?graceful" in drain
    drain_seconds = int(_option(envoy["command"], "--drain-time-s"))
    assert f"time.sleep({drain_seconds})" in drain
    # The bridge outlives Envoy's drain, and both fit in the grace period.
    bridge_stop = bridge["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain_seconds < bridge_stop < POD["spec"]["terminationGracePeriodSeconds"]


def test_selectors_and_targets_agree():
    labels = POD["metadata"]["labels"]
    deployment = MANIFESTS["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert MANIFESTS["Service"]["spec"]["selector"].items() <= labels.items()
    assert MANIFESTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = MANIFESTS["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert [m["containerResource"]["container"] for m in hpa["metrics"]] == ["bridge"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert hpa["minReplicas"] > MANIFESTS["PodDisruptionBudget"]["spec"]["maxUnavailable"]
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == MANIFESTS["ConfigMap"]["metadata"]["name"]


def test_containers_run_as_the_images_non_root_user_with_nothing_extra():
    uid = int(re.search(r"--uid (\d+)", (ROOT / "docker" / "Dockerfile").read_text())[1])
    pod_security = POD["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == uid
    for container in ALL_CONTAINERS:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "runAsUser" not in security or security["runAsUser"] != 0


def test_the_bridge_has_a_writable_temporary_directory():
    # Read-only root: with several workers and metrics_port the bridge's supervisor creates a
    # temporary directory (tempfile), which fails when no candidate is writable.
    volumes = {v["name"]: v for v in POD["spec"]["volumes"]}
    name = _volume_path(CONTAINERS["bridge"], "/tmp/metabridge-admin-x")
    assert "emptyDir" in volumes[name]


def test_every_container_has_cpu_and_memory_requests_and_limits(config):
    for container in ALL_CONTAINERS:
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (container["name"], kind)
    # The bridge may buffer max_buffered_bytes of client data on top of its own ~70 MiB.
    limit = parse_size(CONTAINERS["bridge"]["resources"]["limits"]["memory"].replace("Mi", "MiB"))
    assert limit >= config.max_buffered_bytes * config.workers + 128 * 2**20
