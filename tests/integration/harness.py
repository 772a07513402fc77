"""Real processes for integration tests: backends, the bridge and Envoy on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import yaml

from bench.processes import free_port, port_open
from metabridge.config import bootstrap as envoy_config
from metabridge.config.model import load
from metabridge.native import build as native_build

REPO = Path(__file__).resolve().parents[2]

# bridge.mode values: the bridge as its own process behind Envoy's ext_proc filter, and the core
# inside Envoy through the dynamic module (docs/inprocess.md). Tests that apply to both take a
# ``mode`` parameter (``@pytest.mark.parametrize("mode", MODES)``); the ``mode`` fixture in
# conftest.py is "ext_proc" for the others.
MODES = ("ext_proc", "inprocess")


def _log_tail(proc: subprocess.Popen, lines: int = 30) -> str:
    """The end of the log a Stack's process writes (``Stack._spawn`` records where), so a start
    that fails in CI says why."""
    path = getattr(proc, "log_path", None)
    if path is None or not path.exists():
        return ""
    return f"; the end of {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode} while starting{_log_tail(proc)}")
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout}s (last error: {last})")


def run_async(coro, timeout: float = 60):
    """Run a test's client coroutine to completion, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def cmd_route(cmd: int, cluster: str, **extra) -> dict:
    """An awesomerpc route: requests with this cmd go to ``cluster``."""
    return {"name": f"cmd{cmd}", "match": {"headers": [{"name": "cmd", "exact": str(cmd)}]}, "route": {"cluster": cluster}, **extra}


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (bounded by the socket's timeout)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


class Stack:
    """One test's Envoy + bridge + backends. ``config`` is the metabridge config as a dict."""

    def __init__(
        self,
        tmp: Path,
        config: dict,
        backends: dict[str, int] | None = None,
        *,
        backend_args: dict[str, list[str]] | None = None,
        envoy_args: list[str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.config = config
        self.backends = backends or {}  # name -> port of example awesomerpc servers to run
        self.backend_args = backend_args or {}  # name -> extra server arguments, e.g. ["--delay-ms", "200"]
        self.envoy_args = list(envoy_args or ())  # extra Envoy arguments, e.g. ["--drain-time-s", "1"]
        self.admin_port = free_port()
        self.bridge_address = f"unix:{tmp}/bridge.sock"
        config.setdefault("bridge", {})["listen"] = self.bridge_address
        config.setdefault("envoy", {}).update(admin_port=self.admin_port)
        self.config_path = tmp / "metabridge.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log_path = self.tmp / f"{name}.log"
        self.logs[name] = log_path
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = log_path  # for _log_tail
        self.procs[name] = proc
        return proc

    def start_backend(self, name: str, port: int, extra_args: list[str] | None = None) -> None:
        """An example awesomerpc server; ``extra_args`` (default: ``backend_args[name]``) are
        added to its command line, e.g. ``["--delay-ms", "200"]`` for a slow host."""
        extra = list(self.backend_args.get(name, ()) if extra_args is None else extra_args)
        proc = self._spawn(f"backend-{name}", [sys.executable, "-m", "examples.awesomerpc.server", "--host", "127.0.0.1", "--port", str(port), "--name", name, *extra])
        wait_until(lambda: port_open(port), 10, f"backend {name}", proc)

    def start_bridge(self) -> None:
        proc = self._spawn("bridge", [sys.executable, "-m", "metabridge.cli", "--log-level", "debug", "run", "-c", str(self.config_path)])
        for address in load(self.config_path).worker_addresses():
            sock = Path(address[len("unix:"):])
            wait_until(lambda: sock.exists() and subprocess.run([sys.executable, "-m", "metabridge.cli", "health", "--address", address], capture_output=True).returncode == 0, 15, f"bridge at {address}", proc)

    def start_envoy(self) -> None:
        bootstrap = self.tmp / "bootstrap.yaml"
        bootstrap.write_text(envoy_config.render_yaml(load(self.config_path)))
        proc = self._spawn("envoy", [envoy_config.find_envoy(), "-c", str(bootstrap), "--concurrency", "1", "--log-level", "info", "--use-dynamic-base-id", *self.envoy_args])
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 20, "envoy", proc)
        for listener in self.config["listeners"]:
            wait_until(lambda: port_open(listener["port"]), 10, f"envoy listener {listener['name']}", proc)

    def start(self) -> Stack:
        """Start everything; a stack that fails to start stops what it had started."""
        try:
            for name, port in self.backends.items():
                self.start_backend(name, port)
            self.start_bridge()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        # Envoy first: it closes the client connections still open, so the bridge's streams end
        # and it need not wait out its shutdown grace.
        for name in sorted(self.procs, key=lambda n: n != "envoy"):
            self.stop_process(name)

    def envoy_stat(self, name: str) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{name}$", timeout=2) as r:
            text = r.read().decode()
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""


class InProcessStack(Stack):
    """A Stack whose Envoy runs the core itself (bridge.mode inprocess): no bridge process; the
    core logs into Envoy's output, so ``log("bridge")`` is Envoy's log."""

    concurrency = 1

    def __init__(self, tmp: Path, config: dict, *args, **kwargs) -> None:
        config.setdefault("bridge", {})["mode"] = "inprocess"
        super().__init__(tmp, config, *args, **kwargs)
        assert native_build.main() == 0, "the dynamic module must build here (scripts/setup.sh builds it)"

    def start_bridge(self) -> None:
        pass

    def envoy_command(self) -> tuple[list[str], dict[str, str]]:
        bootstrap = self.tmp / "bootstrap.yaml"
        bootstrap.write_text(envoy_config.render_inprocess_yaml(load(self.config_path)))
        env = envoy_config.inprocess_environment()
        env["METABRIDGE_LOG_LEVEL"] = "debug"
        return [envoy_config.find_envoy(), "-c", str(bootstrap), "--concurrency", str(self.concurrency), "--log-level", "info", "--use-dynamic-base-id", *self.envoy_args], env

    def start_envoy(self) -> None:
        proc = self._spawn("envoy", *self.envoy_command())
        self.logs["bridge"] = self.logs["envoy"]  # the core logs into Envoy's output
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, 30, "envoy", proc)
        for listener in self.config["listeners"]:
            wait_until(lambda: port_open(listener["port"]), 10, f"envoy listener {listener['name']}", proc)


def stack_class(mode: str) -> type[Stack]:
    """The Stack for a bridge.mode: ``Stack`` for ext_proc, ``InProcessStack`` for inprocess."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return InProcessStack if mode == "inprocess" else Stack


class ReloadableCodec:
    """codecs/awesomerpc.py copied into ``tmp`` for a codec-reload test: ``ref`` names the copy;
    ``answer_no_route_with(444)`` rewrites it so ROUTE_NOT_FOUND replies carry that rsp_code (404
    in the original), a change a client can see; ``break_it()`` leaves a file that does not compile."""

    NO_ROUTE = "ErrorType.ROUTE_NOT_FOUND: {},"

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "arpc.py"
        self._original = (REPO / "codecs" / "awesomerpc.py").read_text()
        assert self.NO_ROUTE.format(404) in self._original
        self.path.write_text(self._original)
        self.ref = f"{self.path}:AwesomeRpcCodec"

    def answer_no_route_with(self, rsp_code: int) -> None:
        self.path.write_text(self._original.replace(self.NO_ROUTE.format(404), self.NO_ROUTE.format(rsp_code)))

    def break_it(self) -> None:
        self.path.write_text("class AwesomeRpcCodec(:\n")


def multi_endpoint_cluster(name: str, ports: list[int], **options) -> dict:
    """A cluster entry with one 127.0.0.1 endpoint per port (``options``: lb_policy, ...)."""
    return {"name": name, "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports], **options}


def awesomerpc_config(listen_port: int, clusters: dict[str, int], routes: list[dict], **listener_options) -> dict:
    """A config with one awesomerpc listener; clusters map name -> backend port."""
    return codec_config("awesomerpc", "codecs/awesomerpc.py:AwesomeRpcCodec", listen_port, clusters, routes, **listener_options)


def codec_config(codec: str, ref: str, listen_port: int, clusters: dict[str, int], routes: list[dict], *, codec_options: dict | None = None, **listener_options) -> dict:
    """A config with one listener named after ``codec``; ``ref`` is the codec reference relative
    to the repo root (e.g. ``codecs/dubbo:DubboCodec``); clusters map name -> backend port."""
    codec_entry: dict = {"ref": str(REPO / ref)}
    if codec_options:
        codec_entry["options"] = codec_options
    return {
        "codecs": {codec: codec_entry},
        "listeners": [
            {"name": codec, "address": "127.0.0.1", "port": listen_port, "codec": codec, "routes": routes, **listener_options}
        ],
        "clusters": [
            {"name": name, "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": port}]}
            for name, port in clusters.items()
        ],
    }


def example_config(path: str, listener_ports: dict[str, int], cluster_ports: dict[str, int]) -> dict:
    """An example config (``path`` relative to the repo root) made runnable in a test: listener
    and cluster endpoint ports replaced by the given ones (by name; a name not given keeps its
    port), and file/folder codec and filter references made absolute, since Stack writes the
    config elsewhere. Stack itself replaces the bridge address and Envoy's admin port."""
    source = REPO / path
    config = yaml.safe_load(source.read_text())

    def absolute(ref: str) -> str:
        location, sep, name = ref.rpartition(":")
        if sep and ("/" in location or location.endswith(".py") or location.startswith(".")):
            return f"{(source.parent / location).resolve()}:{name}"
        return ref

    for codec in config.get("codecs", {}).values():
        codec["ref"] = absolute(codec["ref"])
    for listener in config["listeners"]:
        listener["port"] = listener_ports.get(listener["name"], listener["port"])
        for entry in listener.get("filters", ()):
            if "ref" in entry:
                entry["ref"] = absolute(entry["ref"])
    for cluster in config["clusters"]:
        if cluster["name"] in cluster_ports:
            for endpoint in cluster["endpoints"]:
                endpoint["port"] = cluster_ports[cluster["name"]]
    return config


class Backend(Protocol):
    """A test backend running in the test process (a Dubbo provider, a Thrift server, ...)."""

    port: int

    def stop(self) -> None: ...


class Proxy:
    """A started stack in front of backends: ``port`` to call, ``backends`` by cluster name."""

    def __init__(self, port: int, backends: dict[str, Backend], stack: Stack) -> None:
        self.port = port
        self.backends = backends
        self.stack = stack


@contextlib.contextmanager
def proxy_factory(tmp: Path, *, codec: str, ref: str, example: str, start_backend: Callable[[str, Any], Backend], stack_cls: type[Stack] = Stack, bridge: dict | None = None) -> Iterator[Callable[..., Proxy]]:
    """The body of a codec's ``proxy`` fixture. Yields make(backends={cluster: spec}, routes=None):
    it starts ``start_backend(cluster, spec)`` for each cluster, then Envoy and the bridge with one
    ``codec`` listener on a free port in front of them: with ``routes``, a codec_config of ``ref``
    (5 s request timeout); without, the example config ``example`` (routes, options, clusters)
    with its clusters served by the given backends; ``bridge`` is merged into the config's
    ``bridge:`` section and the stack is a ``stack_cls``. Every stack, then every backend, is
    stopped on exit."""
    stacks: list[Stack] = []
    running: list[Backend] = []

    def make(backends: dict[str, Any], routes: list[dict] | None = None) -> Proxy:
        started = {}
        for cluster, spec in backends.items():
            backend = start_backend(cluster, spec)
            running.append(backend)
            started[cluster] = backend
        port = free_port()
        ports = {cluster: backend.port for cluster, backend in started.items()}
        if routes is None:
            cfg = example_config(example, {codec: port}, ports)
        else:
            cfg = codec_config(codec, ref, port, ports, routes, request_timeout="5s")
        cfg.setdefault("bridge", {}).update(bridge or {})
        stack = stack_cls(tmp, cfg)
        stacks.append(stack)
        stack.start()
        return Proxy(port, started, stack)

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()
        for backend in running:
            backend.stop()
