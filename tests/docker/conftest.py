"""Fixtures for the docker tests (pytest-docker): build the image with docker/build.sh, start the
repository's docker-compose.yml under a project name of its own, wait until Envoy serves, and
always take the stack down again (containers, networks, volumes), also when starting it failed.

The ``stack`` fixture runs each test in both modes: ``ext_proc`` (the default services: Envoy and
the bridge container) and ``inprocess`` (the compose file's "inprocess" profile: one Envoy with the
core inside, started in the same project once the first in-process test needs it, in front of the
same backend containers). ``ext_proc_stack`` and ``inprocess_stack`` are the two on their own.

Without a reachable Docker engine the tests fail with a message saying so, unless
METABRIDGE_SKIP_DOCKER=1, which skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_docker.plugin import DockerComposeExecutor, Services, get_docker_services
from thriftpy2.transport import TTransportException

from bench.processes import free_port
from examples.awesomerpc.client import call_sync
from tests.peers import dubbo_peers, thrift_peers

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
BUILD_SCRIPT = REPO_ROOT / "docker" / "build.sh"
SKIP_ENV = "METABRIDGE_SKIP_DOCKER"
# The compose file publishes Envoy on the host ports these name (127.0.0.1 only), mapped to
# these ports inside the envoy container (examples/docker.yaml's listeners and admin).
LISTENER_PORT_ENV = "METABRIDGE_LISTENER_PORT"
DUBBO_PORT_ENV = "METABRIDGE_DUBBO_PORT"
THRIFT_PORT_ENV = "METABRIDGE_THRIFT_PORT"
ADMIN_PORT_ENV = "METABRIDGE_ADMIN_PORT"
METRICS_PORT_ENV = "METABRIDGE_METRICS_PORT"  # the bridge's admin endpoint
PROMETHEUS_PORT_ENV = "METABRIDGE_PROMETHEUS_PORT"
# The tests' Prometheus config: the compose stack's, scraping every second.
PROMETHEUS_CONFIG_ENV = "METABRIDGE_PROMETHEUS_CONFIG"
TEST_PROMETHEUS_CONFIG = REPO_ROOT / "tests" / "docker" / "prometheus.yml"
# The in-process services' host ports and Prometheus config (same ports inside the containers).
INPROCESS_PORT_ENVS = tuple(
    f"METABRIDGE_INPROCESS_{what}_PORT" for what in ("LISTENER", "DUBBO", "THRIFT", "ADMIN", "METRICS", "PROMETHEUS")
)
INPROCESS_PROMETHEUS_CONFIG_ENV = "METABRIDGE_INPROCESS_PROMETHEUS_CONFIG"
TEST_INPROCESS_PROMETHEUS_CONFIG = REPO_ROOT / "tests" / "docker" / "prometheus-inprocess.yml"
ENVOY_LISTENER_PORT = 10000  # awesomerpc
ENVOY_DUBBO_PORT = 10200
ENVOY_THRIFT_PORT = 10100
ENVOY_ADMIN_PORT = 9901
METRICS_PORT = 9102  # the admin endpoint: the bridge's, or in-process the one inside Envoy
PROMETHEUS_PORT = 9090
INPROCESS_PROFILE = "inprocess"
MODES = ("ext_proc", "inprocess")


@dataclass(frozen=True)
class ModeServices:
    """The compose services of one mode."""

    envoy: str
    demo: str
    prometheus: str
    metrics: str  # the service serving the admin endpoint on METRICS_PORT


SERVICES = {
    "ext_proc": ModeServices(envoy="envoy", demo="demo", prometheus="prometheus", metrics="bridge"),
    "inprocess": ModeServices(envoy="envoy-inprocess", demo="demo-inprocess", prometheus="prometheus-inprocess", metrics="envoy-inprocess"),
}
GREETER = "com.example.Greeter"  # the interface the Dubbo providers serve

BUILD_TIMEOUT_S = 1200  # a first build makes the base image and downloads every wheel
READY_TIMEOUT_S = 120
LOG_TAIL_LINES = 40


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _engine_problem() -> str | None:
    """Why no Docker engine can be used, or None when one answers."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    try:
        result = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if result.returncode != 0:
        return f"no Docker engine is reachable (`docker info` said: {result.stdout.strip()})"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    problem = _engine_problem()
    if problem is None:
        return
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{problem}; skipped because {SKIP_ENV}=1")
    pytest.fail(f"{problem}. The docker tests need a Docker engine; set {SKIP_ENV}=1 to skip them instead.", pytrace=False)


@pytest.fixture(scope="session")
def docker_compose_command(docker_engine: None) -> str:
    """Compose v2 when the docker CLI has it, else docker-compose v1 (which has no `up --wait`)."""
    if _run(["docker", "compose", "version"]).returncode == 0:
        return "docker compose"
    if shutil.which("docker-compose"):
        return "docker-compose"
    pytest.fail("neither `docker compose` (v2) nor `docker-compose` (v1) is installed", pytrace=False)


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    # Unique per run, so parallel or leftover runs never share containers or networks.
    return f"metabridge-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # Readiness is polled by the stack fixture: docker-compose v1 has no `up --wait`.
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down --volumes --remove-orphans --timeout 5"]


@pytest.fixture(scope="session")
def metabridge_image(docker_engine: None) -> None:
    """docker/build.sh: builds metabridge:latest, reusing the cached base image and wheels."""
    try:
        result = _run(["bash", str(BUILD_SCRIPT)], timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"docker/build.sh did not finish within {BUILD_TIMEOUT_S} s", pytrace=False)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-LOG_TAIL_LINES:])
        pytest.fail(f"docker/build.sh failed with exit status {result.returncode}:\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def published_ports() -> Iterator[None]:
    """Free host ports for Envoy, the bridge's admin and Prometheus, so the tests never collide with a
    running demo on the defaults; and the tests' Prometheus config."""
    names = (LISTENER_PORT_ENV, DUBBO_PORT_ENV, THRIFT_PORT_ENV, ADMIN_PORT_ENV, METRICS_PORT_ENV, PROMETHEUS_PORT_ENV, *INPROCESS_PORT_ENVS)
    wanted = {name: str(port) for name, port in zip(names, (free_port() for _ in names))}
    wanted[PROMETHEUS_CONFIG_ENV] = str(TEST_PROMETHEUS_CONFIG)
    wanted[INPROCESS_PROMETHEUS_CONFIG_ENV] = str(TEST_INPROCESS_PROMETHEUS_CONFIG)
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def docker_services(
    docker_compose_command: str,
    docker_compose_file: str,
    docker_compose_project_name: str,
    docker_setup: list[str],
    docker_cleanup: list[str],
    metabridge_image: None,
    published_ports: None,
) -> Iterator[Services]:
    # pytest-docker runs the set-up before the block that guarantees the clean-up, so a failed
    # `up` would leave containers behind: run the set-up inside it instead. The set-up starts the
    # default (ext_proc) services; the clean-up, and the services' port look-ups, see the
    # in-process profile's services too.
    compose = DockerComposeExecutor(docker_compose_command, docker_compose_file, docker_compose_project_name)
    with get_docker_services(_with_profile(docker_compose_command), docker_compose_file, docker_compose_project_name, [], docker_cleanup) as services:
        for command in docker_setup:
            execute_or_fail(compose, command)
        yield services


def execute_or_fail(compose: DockerComposeExecutor, command: str) -> None:
    """Run a compose command; a failure fails the test with compose's output and the stack's state."""
    try:
        compose.execute(command)
        failure = None
    except Exception as exc:  # pytest-docker raises a bare Exception carrying compose's output
        failure = f"`{command}` failed: {exc}"
    if failure is not None:
        pytest.fail(f"{failure}\n{Stack.describe_with(compose)}", pytrace=False)


def _with_profile(docker_compose_command: str) -> str:
    """The compose command with the in-process profile's services enabled (compose's global
    --profile option, in v2 and in v1 from 1.28)."""
    return f"{docker_compose_command} --profile {INPROCESS_PROFILE}"


class Stack:
    """The running compose stack of one mode as the tests see it from the host."""

    def __init__(self, compose: DockerComposeExecutor, project: str, mode: str, services: Services) -> None:
        self.compose = compose
        self.project = project
        self.mode = mode
        self.services = SERVICES[mode]
        self.host = "127.0.0.1"
        envoy = self.services.envoy
        self.listener_port = services.port_for(envoy, ENVOY_LISTENER_PORT)  # awesomerpc
        self.dubbo_port = services.port_for(envoy, ENVOY_DUBBO_PORT)
        self.thrift_port = services.port_for(envoy, ENVOY_THRIFT_PORT)
        self.admin_port = services.port_for(envoy, ENVOY_ADMIN_PORT)  # Envoy's admin
        self.metrics_port = services.port_for(self.services.metrics, METRICS_PORT)  # the admin endpoint
        self.prometheus_port = services.port_for(self.services.prometheus, PROMETHEUS_PORT)

    def metrics_text(self) -> str:
        """The admin endpoint's /metrics now (the bridge's, or in-process the one inside Envoy)."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, service: str) -> None:
        self.compose.execute(f"stop --timeout 5 {service}")

    def start(self, service: str) -> None:
        self.compose.execute(f"start {service}")

    def logs(self, service: str = "") -> str:
        return self.compose.execute(f"logs --no-color {service}", ignore_stderr=True).decode(errors="replace")

    def container_state(self, service: str) -> tuple[str, int]:
        """(status, exit code) of the service's one container, found by compose's labels."""
        ids = _run(
            ["docker", "ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={self.project}",
             "--filter", f"label=com.docker.compose.service={service}"]
        ).stdout.split()
        assert len(ids) == 1, f"expected one {service} container in project {self.project}, found {ids}"
        status, code = _run(["docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", ids[0]]).stdout.split()
        return status, int(code)

    def wait_for_exit(self, service: str, timeout: float = READY_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, code = self.container_state(service)
            if status in ("exited", "dead"):
                return code
            time.sleep(0.5)  # the poll loop's interval
        pytest.fail(f"{service} did not exit within {timeout} s\n{self.describe()}", pytrace=False)

    def envoy_counters(self, suffix: str) -> dict[str, int]:
        """Envoy's counters whose names end with ``suffix``, by name (e.g. ``.upstream_cx_total``)."""
        query = urllib.parse.urlencode({"format": "json", "filter": suffix})
        with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}/stats?{query}", timeout=5) as response:
            stats = json.load(response)["stats"]
        return {stat["name"]: stat["value"] for stat in stats if "value" in stat and stat["name"].endswith(suffix)}

    def serving_problem(self) -> str | None:
        """Why the stack does not serve yet (Envoy ready, every listener accepting and answering a
        call), or None. Each call uses a connection of its own."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}/ready", timeout=2) as response:
                if response.status != 200:
                    return f"Envoy's /ready answered HTTP {response.status}"
        except OSError as exc:
            return f"Envoy's admin /ready is not answering: {exc}"
        for protocol, port in (("awesomerpc", self.listener_port), ("dubbo", self.dubbo_port), ("thrift", self.thrift_port)):
            try:
                with socket.create_connection((self.host, port), timeout=2):
                    pass
            except OSError as exc:
                return f"Envoy's {protocol} listener does not accept connections: {exc}"
        try:
            call_sync(self.host, self.listener_port, 2, b"ready?", timeout=3)
        except (OSError, TimeoutError) as exc:
            return f"an awesomerpc call through Envoy failed: {exc}"
        try:
            # dubbo-py's consumer, on a fresh connection: dubbo-ssl-python's pooled one could be a
            # connection Envoy closed while the bridge was down.
            reply = dubbo_peers.call_raw(self.host, self.dubbo_port, GREETER, "whoami", timeout=3)
        except (OSError, EOFError) as exc:
            return f"a Dubbo call through Envoy failed: {exc!r}"
        if reply.status != reply.OK:
            return f"a Dubbo call through Envoy got status {reply.status}: {reply.error}"
        try:
            with thrift_peers.client_for(self.host, self.thrift_port, timeout=3) as client:
                client.whoami()
        except (OSError, TTransportException) as exc:
            return f"a Thrift call through Envoy failed: {exc!r}"
        return None

    def wait_until_serving(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        problem = "not checked"
        while time.monotonic() < deadline:
            problem = self.serving_problem()
            if problem is None:
                return
            time.sleep(0.5)  # the poll loop's interval
        pytest.fail(f"the compose stack did not serve within {timeout} s: {problem}\n{self.describe()}", pytrace=False)

    def describe(self) -> str:
        return self.describe_with(self.compose)

    @staticmethod
    def describe_with(compose: DockerComposeExecutor) -> str:
        """`ps` and the last log lines of every service, for failure messages."""
        parts = []
        for command in ("ps", f"logs --no-color --tail {LOG_TAIL_LINES}"):
            try:
                parts.append(compose.execute(command, ignore_stderr=True).decode(errors="replace"))
            except Exception as exc:  # best effort: the message is for a failure report
                parts.append(f"({command} failed: {exc})")
        return "\n".join(parts)


@pytest.fixture(scope="session")
def ext_proc_stack(docker_services: Services, docker_compose_command: str, docker_compose_file: str, docker_compose_project_name: str) -> Stack:
    """The default services: Envoy with network ext_proc, and the bridge container."""
    compose = DockerComposeExecutor(docker_compose_command, docker_compose_file, docker_compose_project_name)
    running = Stack(compose, docker_compose_project_name, "ext_proc", docker_services)
    running.wait_until_serving()
    return running


@pytest.fixture(scope="session")
def inprocess_stack(docker_services: Services, docker_compose_command: str, docker_compose_file: str, docker_compose_project_name: str) -> Stack:
    """The in-process profile's Envoy (with its demo job and Prometheus), started in the same
    project as the default services: it reuses their backend containers, which are running."""
    compose = DockerComposeExecutor(_with_profile(docker_compose_command), docker_compose_file, docker_compose_project_name)
    names = SERVICES["inprocess"]
    execute_or_fail(compose, f"up -d {names.envoy} {names.demo} {names.prometheus}")
    running = Stack(compose, docker_compose_project_name, "inprocess", docker_services)
    running.wait_until_serving()
    return running


@pytest.fixture(scope="session", params=MODES)
def stack(request: pytest.FixtureRequest) -> Stack:
    """The stack of each mode in turn (pytest runs every ext_proc test before the in-process ones)."""
    return request.getfixturevalue(f"{request.param}_stack")
