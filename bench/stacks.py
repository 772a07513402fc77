"""The paths under test, each a stack of processes started before its points and stopped after.

- ``direct``: the client talks to the echo backend itself (the load generator's ceiling).
- ``tcp_proxy``: Envoy forwarding TCP (bench.native).
- ``generic_proxy``: Envoy's native generic_proxy with its Dubbo codec (bench.native).
- ``metabridge``: Envoy + the bridge (``python -m metabridge.cli run``), per-request routing with
  the awesomerpc or Dubbo codec, the bootstrap rendered by metabridge.config.bootstrap.
- ``inprocess``: the same config with ``bridge.mode: inprocess``: Envoy alone, the core running
  inside it through the dynamic module (docs/inprocess.md).

Every Envoy runs with the same ``--concurrency`` (1 unless ``bench run --envoy-concurrency``).
"""

from __future__ import annotations

import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import native, wire
from bench.processes import REPO, Child, free_port, port_open

DIRECT = "direct"
TCP_PROXY = "tcp_proxy"
GENERIC_PROXY = "generic_proxy"
METABRIDGE = "metabridge"
INPROCESS = "inprocess"
PATHS = (DIRECT, TCP_PROXY, GENERIC_PROXY, METABRIDGE, INPROCESS)

BRIDGE_MAX_FRAME_SIZE = "4MiB"  # the size points go up to 1 MiB
_CODEC_REFS = {
    wire.AWESOMERPC: REPO / "codecs" / "awesomerpc.py",
    wire.DUBBO: REPO / "codecs" / "dubbo",
}
_CODEC_CLASSES = {wire.AWESOMERPC: "AwesomeRpcCodec", wire.DUBBO: "DubboCodec"}


@dataclass(frozen=True)
class PathSpec:
    """One path for one protocol; ``routes`` > 1 puts routes that never match before the real one."""

    path: str
    protocol: str
    routes: int = 1

    @property
    def name(self) -> str:
        return f"{self.path}/{self.protocol}"


def _envoy_bin() -> str:
    from metabridge.config.bootstrap import find_envoy

    return find_envoy()


class Stack:
    """The processes of one path: ``start()`` returns the port the client connects to."""

    def __init__(self, spec: PathSpec, backend_ports: dict[str, int], workdir: Path, bridge_workers: int = 1, envoy_concurrency: int = 1) -> None:
        self.spec = spec
        self.bridge_workers = bridge_workers
        self.envoy_concurrency = envoy_concurrency
        self.backend_port = backend_ports[spec.protocol]
        self.workdir = workdir
        self.children: dict[str, Child] = {}  # role ("envoy", "bridge") -> process
        self.admin_port: int | None = None  # Envoy's, once started

    def start(self) -> int:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> int:
        if self.spec.path == DIRECT:
            return self.backend_port
        listen_port, admin_port = free_port(), free_port()
        self.admin_port = admin_port
        if self.spec.path == TCP_PROXY:
            bootstrap = native.tcp_proxy_bootstrap(admin_port, listen_port, self.backend_port)
        elif self.spec.path == GENERIC_PROXY:
            if self.spec.protocol != wire.DUBBO:
                raise ValueError("generic_proxy is measured with its Dubbo codec only")
            bootstrap = native.generic_proxy_bootstrap(admin_port, listen_port, self.backend_port)
        elif self.spec.path == METABRIDGE:
            bootstrap = self._start_bridge(admin_port, listen_port)
        elif self.spec.path == INPROCESS:
            bootstrap, env = self._inprocess(admin_port, listen_port)
            self._start_envoy(bootstrap, admin_port, listen_port, env)
            return listen_port
        else:
            raise ValueError(f"unknown path {self.spec.path!r}")
        self._start_envoy(bootstrap, admin_port, listen_port)
        return listen_port

    def _log(self, role: str) -> Path:
        return self.workdir / f"{self.spec.name.replace('/', '-')}-r{self.spec.routes}-{role}.log"

    def _start_envoy(self, bootstrap: dict[str, Any] | str, admin_port: int, listen_port: int, env: dict[str, str] | None = None) -> None:
        path = self.workdir / f"{self.spec.name.replace('/', '-')}-r{self.spec.routes}-bootstrap.yaml"
        path.write_text(bootstrap if isinstance(bootstrap, str) else yaml.safe_dump(bootstrap, sort_keys=False))
        args = [_envoy_bin(), "-c", str(path), "--concurrency", str(self.envoy_concurrency), "--log-level", "warning", "--use-dynamic-base-id"]
        if env:  # through env(1), which execs Envoy: the pid measured stays Envoy's
            args = ["env", *(f"{key}={value}" for key, value in env.items()), *args]
        envoy = self.children["envoy"] = Child(f"envoy ({self.spec.name})", args, self._log("envoy"))
        ready = f"http://127.0.0.1:{admin_port}/ready"
        envoy.wait_until(lambda: urllib.request.urlopen(ready, timeout=1).status == 200, 30, "ready")
        envoy.wait_until(lambda: port_open(listen_port), 10, f"listening on port {listen_port}")

    def _start_bridge(self, admin_port: int, listen_port: int) -> str:
        from metabridge.config import bootstrap as envoy_config
        from metabridge.config.model import load

        protocol = self.spec.protocol
        socket_path = self.workdir / f"bridge-{protocol}-r{self.spec.routes}.sock"
        config = {
            "bridge": {"listen": f"unix:{socket_path}", "workers": self.bridge_workers, "log_level": "warning"},
            "envoy": {"admin_port": admin_port, "message_timeout": "5s", "concurrency": self.envoy_concurrency},
            **bridge_listener_config(protocol, self.spec.routes, listen_port, self.backend_port),
        }
        config_path = self.workdir / f"metabridge-{protocol}-r{self.spec.routes}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        config_model = load(config_path)
        bootstrap = envoy_config.render_yaml(config_model)
        args = [sys.executable, "-m", "metabridge.cli", "--log-level", "warning", "run", "-c", str(config_path)]
        bridge = self.children["bridge"] = Child(f"bridge ({self.spec.name})", args, self._log("bridge"))
        for address in config_model.worker_addresses():
            bridge.wait_until(lambda a=address: _bridge_serving(a), 30, f"serving on {address}")
        return bootstrap

    def _inprocess(self, admin_port: int, listen_port: int) -> tuple[str, dict[str, str]]:
        """The in-process bootstrap and the variables Envoy needs for the module."""
        from metabridge.config import bootstrap as envoy_config
        from metabridge.config.model import load

        protocol = self.spec.protocol
        config = {
            "bridge": {"mode": "inprocess", "log_level": "warning"},
            "envoy": {"admin_port": admin_port, "concurrency": self.envoy_concurrency},
            **bridge_listener_config(protocol, self.spec.routes, listen_port, self.backend_port),
        }
        config_path = self.workdir / f"inprocess-{protocol}-r{self.spec.routes}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        names = ("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", "METABRIDGE_PYTHON", "PYTHONPATH")
        env = envoy_config.inprocess_environment({})
        env = {key: env[key] for key in names} | {"METABRIDGE_LOG_LEVEL": "warning"}
        return envoy_config.render_inprocess_yaml(load(config_path)), env

    def pids(self) -> dict[str, int]:
        return {role: child.pid for role, child in self.children.items()}

    def stop(self) -> None:
        # Envoy first, so no connection reaches a stopping bridge.
        for role in ("envoy", "bridge"):
            child = self.children.pop(role, None)
            if child is not None:
                child.stop()


def bridge_listener_config(protocol: str, routes: int, listen_port: int, backend_port: int) -> dict[str, Any]:
    """The codec, the listener "bench" with its routes and the backend cluster of a bridge config."""
    return {
        "codecs": {protocol: {"ref": f"{_CODEC_REFS[protocol]}:{_CODEC_CLASSES[protocol]}"}},
        "listeners": [
            {
                "name": "bench",
                "address": "127.0.0.1",
                "port": listen_port,
                "codec": protocol,
                "max_frame_size": BRIDGE_MAX_FRAME_SIZE,
                "routes": bridge_routes(protocol, routes),
            }
        ],
        "clusters": [{"name": native.BACKEND_CLUSTER, "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": backend_port}]}],
    }


def bridge_routes(protocol: str, count: int) -> list[dict[str, Any]]:
    """``count`` routes: ``count - 1`` exact matches that never fire, then the benchmark's own."""
    if protocol == wire.AWESOMERPC:
        def match(value: str) -> dict[str, Any]:
            return {"headers": [{"name": "cmd", "exact": value}]}

        # cmd is an i16: other commands start well above the benchmark's.
        fillers = [match(str(1000 + i)) for i in range(count - 1)]
        real = match(str(wire.ARPC_CMD))
    else:
        def match(method: str) -> dict[str, Any]:
            return {"headers": [{"name": "interface", "exact": wire.DUBBO_SERVICE}, {"name": "method", "exact": method}]}

        fillers = [match(f"{wire.DUBBO_METHOD}{i}") for i in range(count - 1)]
        real = match(wire.DUBBO_METHOD)
    routes = [{"name": f"other-{i}", "match": m, "route": {"cluster": native.BACKEND_CLUSTER}} for i, m in enumerate(fillers)]
    routes.append({"name": "bench", "match": real, "route": {"cluster": native.BACKEND_CLUSTER}})
    return routes


def _bridge_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not Path(address.removeprefix("unix:")).exists():
        return False
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Backend:
    """The echo backend (bench.backend) on two free ports, one per protocol."""

    def __init__(self, workdir: Path) -> None:
        self.ports = {wire.AWESOMERPC: free_port(), wire.DUBBO: free_port()}
        args = [sys.executable, "-m", "bench.backend", "--awesomerpc-port", str(self.ports[wire.AWESOMERPC]), "--dubbo-port", str(self.ports[wire.DUBBO])]
        self.child = Child("echo backend", args, workdir / "backend.log")
        try:
            for port in self.ports.values():
                self.child.wait_until(lambda p=port: port_open(p), 15, f"listening on port {port}")
        except BaseException:
            self.child.stop()
            raise

    @property
    def pid(self) -> int:
        return self.child.pid

    def stop(self) -> None:
        self.child.stop()
