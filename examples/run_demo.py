"""The demo: two awesomerpc backends, the bridge supervising Envoy, a client, then a clean stop.

    python -m examples.run_demo          (scripts/demo.sh sets up the environment first)

Uses examples/awesomerpc.yaml as it is (ports 10000-10002, Envoy admin 9901).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from metabridge.config.model import load

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "awesomerpc.yaml"


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def _wait(check, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args[2] if len(proc.args) > 2 else proc.args[0]} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready within {timeout:g}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    config = load(CONFIG)
    listener = config.listeners[0]
    ports = [(listener.address, listener.port), (config.envoy_admin_address, config.envoy_admin_port)]
    ports += [(e.address, e.port) for c in config.clusters.values() for e in c.endpoints]
    busy = [f"{h}:{p}" for h, p in ports if _port_busy(h, p)]
    if busy:
        print(f"demo: ports already in use: {', '.join(busy)}; stop what is using them (a previous demo?) and retry", file=sys.stderr)
        return 1

    python = sys.executable
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        for name, cluster in (("v1", "awesomerpc-v1"), ("v2", "awesomerpc-v2")):
            endpoint = config.clusters[cluster].endpoints[0]
            procs.append(subprocess.Popen([python, "-m", "examples.awesomerpc.server", "--host", endpoint.address, "--port", str(endpoint.port), "--name", name], cwd=REPO, env=env))
        print(f"demo: rendering Envoy's config from {CONFIG.relative_to(REPO)} and starting the bridge with Envoy", flush=True)
        bridge = subprocess.Popen([python, "-m", "metabridge.cli", "--log-level", "warning", "run", "-c", str(CONFIG), "--with-envoy", "--envoy-log-level", "error"], cwd=REPO, env=env)
        procs.append(bridge)
        admin = f"http://{config.envoy_admin_address}:{config.envoy_admin_port}/ready"
        _wait(lambda: urllib.request.urlopen(admin, timeout=1).status == 200, 30, "Envoy", procs)
        _wait(lambda: _port_busy(listener.address, listener.port), 10, "Envoy's listener", procs)
        print(f"demo: Envoy listens on {listener.address}:{listener.port}; sending requests\n", flush=True)
        client = subprocess.run([python, "-m", "examples.awesomerpc.demo_client", "--host", listener.address, "--port", str(listener.port), "--admin-port", str(config.envoy_admin_port)], cwd=REPO, env=env)
        return client.returncode
    finally:
        print("\ndemo: shutting down", flush=True)
        for proc in reversed(procs):  # the bridge (and its Envoy) first, then the backends
            _stop(proc)
        left = [p.args for p in procs if p.poll() is None]
        print("demo: all processes stopped" if not left else f"demo: still running: {left}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
