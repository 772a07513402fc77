"""The admin endpoint on ``bridge.metrics_port``: /ready, /metrics, /config_dump, /routes.

One bridge process serves it itself (``LocalAdmin``). With ``bridge.workers > 1`` the
supervisor serves it (``SupervisorAdmin``) and each worker answers the supervisor on a Unix
socket of its own in a private directory: one line in (``snapshot``, ``routes`` or ``config``),
one JSON document out. A scrape asks every worker for its snapshot and sums them
(metabridge.metrics.MergedCollector), so one scrape sees the whole bridge.

Both servers run in daemon threads: a scrape never waits for the event loop, and reads the
loop's plain integers as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from metabridge.logs import event
from metabridge.metrics import BridgeCollector, MergedCollector, families_snapshot

log = logging.getLogger("metabridge.admin")

ENDPOINTS = ("/ready", "/metrics", "/config_dump", "/routes")
# POST path -> the admin method that carries it out, where the admin has one, and the word its
# answer starts with when it did.
_POST_ACTIONS = {"/reload": ("reload", "reloaded"), "/reopen_logs": ("reopen_logs", "reopened")}
REDACTED = "<redacted>"
# Codec options and filter config keys whose values /config_dump hides: a name containing one
# of these words (api_key, password, auth_token, client_secret, credentials, ...).
SECRET_KEY = re.compile(r"password|passwd|secret|token|credential|key", re.IGNORECASE)
WORKER_TIMEOUT_S = 2.0


# ---- what the endpoints show ------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A config value as JSON: dataclasses as objects, tuples and frozensets as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def redact(value: Any) -> Any:
    """``value`` with every secret-looking key's value replaced by REDACTED, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def config_dump(config, runtimes) -> dict:
    """The effective config: the one loaded at start, with each listener, its codec and the
    clusters as the last reload left them (routes, filters, timeouts; the codec a reload loaded,
    not one it refused; clusters added, changed or removed by live config); codec options and
    filter config redacted. The bridge section is the start's: its settings need a restart."""
    data = plain(config)
    data["listeners"] = [plain(runtime.config) for runtime in runtimes.values()]
    for runtime in runtimes.values():
        data["codecs"][runtime.codec_entry.name] = plain(runtime.codec_entry)
    if runtimes:  # every reload gives all the runtimes the same clusters
        data["clusters"] = plain(next(iter(runtimes.values())).clusters)
    for codec in data["codecs"].values():
        codec["options"] = redact(codec["options"])
    for listener in data["listeners"]:
        for entry in listener["filters"]:
            entry["config"] = redact(entry["config"])
    return data


def route_table(runtimes) -> dict:
    """Each listener's live routes, in match order, and its filter chain."""
    return {
        name: {
            "filters": [current.name for current in runtime.chain.filters],
            "routes": [plain(route) for route in runtime.config.routes],
        }
        for name, runtime in runtimes.items()
    }


class LocalAdmin:
    """The endpoints of one bridge process (its runtimes, its gRPC server)."""

    def __init__(self, config, runtimes, server) -> None:
        self._config = config
        self._runtimes = runtimes
        self._server = server  # GrpcServer: serving until it is stopping
        self._collector = BridgeCollector(runtimes, server.stats)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)

    def ready(self) -> tuple[bool, str]:
        return (False, "the bridge is stopping") if self._server.stopping else (True, "serving")

    def metrics(self) -> bytes:
        return generate_latest(self._registry)

    def config_dump(self) -> dict:
        return config_dump(self._config, self._runtimes)

    def routes(self) -> dict:
        return {"listeners": route_table(self._runtimes)}

    def answer(self, command: str) -> dict:
        """What a worker tells the supervisor."""
        if command == "snapshot":
            return {"pid": os.getpid(), "ready": self.ready()[0], "families": families_snapshot(self._collector)}
        if command == "routes":
            return self.routes()
        if command == "config":
            return self.config_dump()
        return {"error": f"unknown command {command!r}"}


class SupervisorAdmin:
    """The endpoints of a bridge with worker processes: every worker's answers, combined."""

    def __init__(self, sockets: list[str]) -> None:
        self._sockets = sockets  # worker i's Unix socket, by index
        self._collector = MergedCollector(lambda: self._ask_all("snapshot"))
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)

    def _ask_all(self, command: str) -> list[dict | None]:
        return [ask_worker(path, command) for path in self._sockets]

    def ready(self) -> tuple[bool, str]:
        replies = self._ask_all("snapshot")
        waiting = [str(i) for i, reply in enumerate(replies) if reply is None or not reply["ready"]]
        if waiting:
            return False, f"worker(s) {', '.join(waiting)} of {len(replies)} not serving"
        return True, f"{len(replies)} workers serving"

    def metrics(self) -> bytes:
        return generate_latest(self._registry)

    def _first(self, command: str) -> tuple[dict, list[dict | None]]:
        replies = self._ask_all(command)
        first = next((reply for reply in replies if reply is not None), None)
        if first is None:
            raise RuntimeError("no bridge worker answered")
        return first, replies

    def config_dump(self) -> dict:
        first, _ = self._first("config")
        return first

    def routes(self) -> dict:
        """The first worker's table, and every worker's (they differ only while a reload is
        reaching them, or when one refused it)."""
        first, replies = self._first("routes")
        return {"listeners": first["listeners"], "workers": [reply["listeners"] if reply else None for reply in replies]}


# ---- transports -------------------------------------------------------------------------------


def ask_worker(path: str, command: str, timeout: float = WORKER_TIMEOUT_S) -> dict | None:
    """One worker's answer to ``command``, or None when it does not answer in time."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError) as exc:
        event(log, logging.DEBUG, "worker_admin_unanswered", socket=path, command=command, error=str(exc))
        return None


class _WorkerHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        command = self.rfile.readline(64).decode(errors="replace").strip()
        self.wfile.write(json.dumps(self.server.admin.answer(command)).encode())


def serve_worker_socket(admin: LocalAdmin, path: str) -> socketserver.ThreadingUnixStreamServer:
    """A worker's answers to the supervisor, on a Unix socket at ``path``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this worker slot's previous process
    server = socketserver.ThreadingUnixStreamServer(path, _WorkerHandler)
    server.daemon_threads = True
    server.admin = admin
    threading.Thread(target=server.serve_forever, name="metabridge-worker-admin", daemon=True).start()
    return server


class _AdminHandler(BaseHTTPRequestHandler):
    server_version = "metabridge-admin"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        admin = self.server.admin
        path = self.path.split("?", 1)[0]
        try:
            if path == "/ready":
                ok, detail = admin.ready()
                self._send(200 if ok else 503, "text/plain; charset=utf-8", (("ready: " if ok else "not ready: ") + detail + "\n").encode())
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, admin.metrics())
            elif path == "/config_dump":
                self._json(admin.config_dump())
            elif path == "/routes":
                self._json(admin.routes())
            else:
                self._send(404, "text/plain; charset=utf-8", f"not found; endpoints: {' '.join(ENDPOINTS)}\n".encode())
        except Exception as exc:  # noqa: BLE001 - a failed answer must not take the admin server down
            event(log, logging.ERROR, "admin_request_failed", path=path, error=f"{type(exc).__name__}: {exc}")
            self._send(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        # Only an admin that has the action (in-process, where Envoy owns the signals, so SIGHUP
        # and SIGUSR1 cannot reach the module): POST /reload and POST /reopen_logs.
        name, done = _POST_ACTIONS.get(self.path.split("?", 1)[0], (None, None))
        action = getattr(self.server.admin, name, None) if name else None
        if action is None:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")
            return
        try:
            ok, detail = action()
        except Exception as exc:  # noqa: BLE001 - a failed action must not take the admin server down
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self._send(200 if ok else 400, "text/plain; charset=utf-8", ((f"{done}: " if ok else "refused: ") + detail + "\n").encode())

    def _json(self, data: dict) -> None:
        self._send(200, "application/json", json.dumps(data, indent=2).encode() + b"\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        event(log, logging.DEBUG, "admin_request", client=self.client_address[0], request=format % args)


class _AdminServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, port: int, admin) -> None:
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.admin = admin
        super().__init__((address.strip("[]"), port), _AdminHandler)


def serve_admin(admin: LocalAdmin | SupervisorAdmin, address: str, port: int) -> tuple[ThreadingHTTPServer, int]:
    """Serve the admin endpoints on address:port (0: any free port) in a daemon thread; returns
    the server and the port it bound."""
    server = _AdminServer(address, port, admin)
    threading.Thread(target=server.serve_forever, name="metabridge-admin", daemon=True).start()
    bound = server.server_address[1]
    event(log, logging.INFO, "admin_listening", address=f"{address}:{bound}", endpoints=list(ENDPOINTS))
    return server, bound


def worker_socket(directory: str, index: int) -> str:
    return str(Path(directory) / f"worker-{index}.sock")

