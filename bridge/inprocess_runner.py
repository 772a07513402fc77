"""``metabridge run --with-envoy`` for bridge.mode inprocess: there is no bridge process, only
Envoy, started with the dynamic module's bootstrap and environment and restarted if it dies.
Stops cleanly on SIGINT/SIGTERM. SIGHUP reloads routes, filters and codecs through the module's
``POST /reload`` on bridge.metrics_port (Envoy keeps its own signals, so none reaches the module)."""

from __future__ import annotations

import logging
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from metabridge.config import bootstrap as envoy_config
from metabridge.config.model import Config
from metabridge.logs import event

log = logging.getLogger("metabridge.runner")

_STOP_GRACE = 10.0
_RELOAD_TIMEOUT = 30.0


def reload_inside_envoy(config: Config) -> bool:
    """Ask the module inside Envoy to reload the config file (its admin endpoint's POST /reload)."""
    if config.metrics_port is None:
        event(log, logging.WARNING, "reload_needs_admin", hint="in-process reloads go through bridge.metrics_port's POST /reload: set bridge.metrics_port")
        return False
    host = config.metrics_address.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard bind answers on loopback
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.metrics_port}/reload"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=_RELOAD_TIMEOUT) as reply:
            event(log, logging.INFO, "reload_applied", detail=reply.read().decode(errors="replace").strip())
            return True
    except urllib.error.HTTPError as exc:
        event(log, logging.ERROR, "reload_refused", detail=exc.read().decode(errors="replace").strip())
    except OSError as exc:
        event(log, logging.ERROR, "reload_unanswered", url=url, error=str(exc))
    return False


def run_inprocess(config: Config, *, with_envoy: bool, envoy_bin: str | None = None, envoy_log_level: str = "warning") -> int:
    if not with_envoy:
        event(log, logging.ERROR, "inprocess_needs_envoy", hint="bridge.mode inprocess runs inside Envoy: run with --with-envoy")
        return 2
    from metabridge.runner import _RestartBudget

    binary = envoy_bin or envoy_config.find_envoy()
    env = envoy_config.inprocess_environment()
    env["METABRIDGE_LOG_LEVEL"] = config.log_level
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Off the signal handler: the reload may take a while, and Envoy is watched meanwhile.
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload_inside_envoy, args=(config,), name="metabridge-reload", daemon=True).start())
    budget = _RestartBudget("Envoy")
    with tempfile.TemporaryDirectory(prefix="metabridge-envoy-") as tmp:
        bootstrap = Path(tmp) / "bootstrap.yaml"
        bootstrap.write_text(envoy_config.render_inprocess_yaml(config))
        args = [binary, "-c", str(bootstrap), "--concurrency", str(config.envoy_concurrency), "--log-level", envoy_log_level, "--use-dynamic-base-id"]
        proc = subprocess.Popen(args, env=env)
        event(log, logging.INFO, "envoy_started", pid=proc.pid, bootstrap=str(bootstrap), mode="inprocess")
        try:
            while not stop.wait(0.2):
                if proc.poll() is None:
                    continue
                try:
                    delay = budget.spend(proc.returncode)
                except RuntimeError as exc:
                    event(log, logging.ERROR, "giving_up", error=str(exc))
                    return 1
                event(log, logging.ERROR, "envoy_exited_restarting", exit_code=proc.returncode, restart_in_seconds=delay)
                if stop.wait(delay):
                    break
                proc = subprocess.Popen(args, env=env)
                event(log, logging.INFO, "envoy_started", pid=proc.pid, bootstrap=str(bootstrap), mode="inprocess")
        finally:
            event(log, logging.INFO, "shutting_down")
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            event(log, logging.INFO, "stopped")
    return 0
