"""The compose stack's config without a Docker engine: examples/docker.yaml is the three example
configs in one, and docker-compose.yml runs it in both the bridge and Envoy, points every cluster
endpoint at a service of the compose network and publishes every listener."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from metabridge.config import model as config_module
from tests.docker.conftest import COMPOSE_FILE, REPO_ROOT

DOCKER_CONFIG = "examples/docker.yaml"
PARTS = ("examples/awesomerpc.yaml", "examples/dubbo.yaml", "examples/thrift.yaml")
PORT_MAPPING = re.compile(r"127\.0\.0\.1:\$\{METABRIDGE_[A-Z]+_PORT:-(?P<default>\d+)\}:(?P<container>\d+)")


def _load(path: str | object) -> Any:
    return yaml.safe_load((REPO_ROOT / str(path)).read_text())


@pytest.fixture(scope="module")
def combined() -> dict[str, Any]:
    return _load(DOCKER_CONFIG)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return _load(COMPOSE_FILE.relative_to(REPO_ROOT))["services"]


def test_docker_config_is_the_three_example_configs_in_one(combined: dict[str, Any]) -> None:
    parts = [_load(part) for part in PARTS]
    assert combined["codecs"] == {name: codec for part in parts for name, codec in part["codecs"].items()}
    assert combined["listeners"] == [listener for part in parts for listener in part["listeners"]]
    assert combined["clusters"] == [cluster for part in parts for cluster in part["clusters"]]
    for part, path in zip(parts, PARTS):
        assert (combined["bridge"], combined["envoy"]) == (part["bridge"], part["envoy"]), f"bridge/envoy sections differ from {path}"
    loaded = config_module.load(REPO_ROOT / DOCKER_CONFIG)  # valid, codecs and clusters cross-checked
    assert [listener.name for listener in loaded.listeners] == ["awesomerpc", "dubbo", "thrift"]


def _envoy_render_options(services: dict[str, Any]) -> list[str]:
    command = services["envoy"]["command"]
    return command[: command.index("--")]


def test_bridge_and_envoy_run_the_docker_config(services: dict[str, Any]) -> None:
    assert f"--config={DOCKER_CONFIG}" in _envoy_render_options(services)
    bridge = services["bridge"]["command"]
    assert bridge[bridge.index("--config") + 1] == DOCKER_CONFIG


def test_every_cluster_endpoint_is_a_compose_service(combined: dict[str, Any], services: dict[str, Any]) -> None:
    rewrites = dict(option.removeprefix("--endpoint=").split("=") for option in _envoy_render_options(services) if option.startswith("--endpoint="))
    endpoints = {f"{endpoint['address']}:{endpoint['port']}" for cluster in combined["clusters"] for endpoint in cluster["endpoints"]}
    assert set(rewrites) == endpoints, "each cluster endpoint needs one --endpoint rewrite in the envoy service"
    for old, new in rewrites.items():
        service, port = new.split(":")
        assert service in services, f"{old} is rewritten to {new}, but there is no service {service!r}"
        assert port == old.split(":")[1]
        assert f"--port {port}" in " ".join(services[service]["command"]), f"service {service} does not listen on {port}"
    assert set(services["envoy"]["depends_on"]) == {"bridge", *(new.split(":")[0] for new in rewrites.values())}


def test_every_listener_is_published_on_loopback_only(combined: dict[str, Any], services: dict[str, Any]) -> None:
    published = set()
    for mapping in services["envoy"]["ports"]:
        # Each host port is a variable whose default is the port inside the container.
        match = PORT_MAPPING.fullmatch(mapping)
        assert match, f"{mapping!r}: expected 127.0.0.1:${{METABRIDGE_..._PORT:-N}}:N"
        assert match["default"] == match["container"], mapping
        published.add(int(match["container"]))
    assert published == {listener["port"] for listener in combined["listeners"]} | {combined["envoy"]["admin_port"]}


# The in-process profile: examples/docker-inprocess.yaml and the envoy-inprocess service.
INPROCESS_CONFIG = "examples/docker-inprocess.yaml"
INPROCESS_SERVICES = ("envoy-inprocess", "demo-inprocess", "prometheus-inprocess")
INPROCESS_PORT_MAPPING = re.compile(r"127\.0\.0\.1:\$\{METABRIDGE_INPROCESS_[A-Z]+_PORT:-(?P<default>\d+)\}:(?P<container>\d+)")


@pytest.fixture(scope="module")
def inprocess() -> dict[str, Any]:
    return _load(INPROCESS_CONFIG)


def test_inprocess_config_is_the_docker_config_with_the_containers_addresses(combined: dict[str, Any], inprocess: dict[str, Any], services: dict[str, Any]) -> None:
    assert inprocess["bridge"] == {"mode": "inprocess", "metrics_port": 9102, "metrics_address": "0.0.0.0"}
    assert inprocess["envoy"] == {"admin_port": combined["envoy"]["admin_port"], "admin_address": "0.0.0.0"}
    assert inprocess["codecs"] == combined["codecs"]
    # Listeners: the same but bound to every address of the container.
    assert inprocess["listeners"] == [{**listener, "address": "0.0.0.0"} for listener in combined["listeners"]]
    # Clusters: the same, with each endpoint the compose service the ext_proc stack's Envoy rewrites it to.
    rewrites = dict(option.removeprefix("--endpoint=").split("=") for option in _envoy_render_options(services) if option.startswith("--endpoint="))
    expected = []
    for cluster in combined["clusters"]:
        endpoints = []
        for endpoint in cluster["endpoints"]:
            host, port = rewrites[f"{endpoint['address']}:{endpoint['port']}"].split(":")
            endpoints.append({"address": host, "port": int(port)})
        expected.append({**cluster, "endpoints": endpoints})
    assert inprocess["clusters"] == expected
    loaded = config_module.load(REPO_ROOT / INPROCESS_CONFIG)
    assert loaded.mode == "inprocess" and [listener.name for listener in loaded.listeners] == ["awesomerpc", "dubbo", "thrift"]


def test_inprocess_services_are_a_profile_of_their_own(services: dict[str, Any]) -> None:
    # `docker compose up` (no profile) starts the ext_proc stack only.
    assert {name for name, service in services.items() if service.get("profiles")} == set(INPROCESS_SERVICES)
    assert all(services[name]["profiles"] == ["inprocess"] for name in INPROCESS_SERVICES)
    envoy = services["envoy-inprocess"]
    assert envoy["command"][:3] == ["metabridge", "run", "--config"]
    assert envoy["command"][3] == "${METABRIDGE_INPROCESS_CONFIG:-examples/docker-inprocess.yaml}"
    assert "--with-envoy" in envoy["command"]
    # The same backends as the ext_proc stack's Envoy, and no bridge.
    assert set(envoy["depends_on"]) == set(services["envoy"]["depends_on"]) - {"bridge"}
    assert services["demo-inprocess"]["command"][-4:] == ["--host", "envoy-inprocess", "--port", "10000"]
    assert set(services["prometheus-inprocess"]["depends_on"]) == {"envoy-inprocess"}


def test_inprocess_listeners_are_published_on_loopback_only_on_ports_of_their_own(inprocess: dict[str, Any], services: dict[str, Any]) -> None:
    published, defaults = set(), set()
    for mapping in services["envoy-inprocess"]["ports"]:
        match = INPROCESS_PORT_MAPPING.fullmatch(mapping)
        assert match, f"{mapping!r}: expected 127.0.0.1:${{METABRIDGE_INPROCESS_..._PORT:-N}}:M"
        published.add(int(match["container"]))
        defaults.add(int(match["default"]))
    assert published == {listener["port"] for listener in inprocess["listeners"]} | {inprocess["envoy"]["admin_port"], inprocess["bridge"]["metrics_port"]}
    # Both modes can run side by side: none of the in-process defaults is a host port of the ext_proc stack.
    ext_proc_defaults = {int(PORT_MAPPING.fullmatch(m)["default"]) for name in ("envoy", "bridge", "prometheus") for m in services[name]["ports"]}
    assert not defaults & ext_proc_defaults, defaults & ext_proc_defaults
