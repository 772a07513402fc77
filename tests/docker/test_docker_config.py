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
