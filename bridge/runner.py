"""``metabridge run``: the bridge's process life: serve, optionally supervise Envoy, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bridge.config import Config
from bridge.logs import event
from bridge.server import build_runtimes, serve

log = logging.getLogger("metabridge.runner")

_RESTART_WINDOW = 60.0  # seconds
_MAX_RESTARTS = 5  # Envoy crashing more often than this per window is not going to get better


def _install_event_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class EnvoySupervisor:
    """Starts Envoy with the rendered bootstrap and restarts it if it dies unexpectedly."""

    def __init__(self, config: Config, bridge_address: str, envoy_bin: str | None, log_level: str) -> None:
        from bridge import envoy_config

        self._bin = envoy_bin or envoy_config.find_envoy()
        self._dir = tempfile.TemporaryDirectory(prefix="metabridge-envoy-")
        self.bootstrap = Path(self._dir.name) / "bootstrap.yaml"
        self.bootstrap.write_text(envoy_config.render_yaml(config, bridge_addresses=[bridge_address] if config.workers == 1 else None))
        self._args = [self._bin, "-c", str(self.bootstrap), "--concurrency", str(config.envoy_concurrency), "--log-level", log_level, "--use-dynamic-base-id"]
        self._proc: subprocess.Popen | None = None
        self._restarts: list[float] = []
        self._stopping = False

    def start(self) -> None:
        self._proc = subprocess.Popen(self._args)
        event(log, logging.INFO, "envoy_started", pid=self._proc.pid, bootstrap=str(self.bootstrap))

    async def watch(self) -> None:
        """Restart Envoy when it exits on its own; give up (raising) when it keeps crashing."""
        while not self._stopping:
            await asyncio.sleep(0.2)
            if self._proc is None or self._proc.poll() is None:
                continue
            code = self._proc.returncode
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW] + [now]
            if len(self._restarts) > _MAX_RESTARTS:
                raise RuntimeError(f"Envoy exited {len(self._restarts)} times within {_RESTART_WINDOW:g}s (last exit code {code}); see its log above")
            event(log, logging.ERROR, "envoy_exited_restarting", exit_code=code, restart=len(self._restarts))
            await asyncio.sleep(min(2 ** len(self._restarts) * 0.1, 5.0))
            self.start()

    def stop(self) -> None:
        self._stopping = True
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()


async def _main(config: Config, listen: str, with_envoy: bool, envoy_bin: str | None, envoy_log_level: str) -> int:
    runtimes = build_runtimes(config)
    server = await serve(config, listen, runtimes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = None
    watcher = None
    exit_code = 0
    try:
        if with_envoy:
            supervisor = EnvoySupervisor(config, listen, envoy_bin, envoy_log_level)
            supervisor.start()
            watcher = asyncio.ensure_future(supervisor.watch())
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([waiter] + ([watcher] if watcher else []), return_when=asyncio.FIRST_COMPLETED)
        if watcher in done and watcher.exception():
            event(log, logging.ERROR, "envoy_gave_up", error=str(watcher.exception()))
            exit_code = 1
        waiter.cancel()
    finally:
        event(log, logging.INFO, "shutting_down")
        if watcher:
            watcher.cancel()
        if supervisor:
            supervisor.stop()  # Envoy first, so no new connection reaches a stopping bridge
        await server.stop(grace=2.0)
        event(log, logging.INFO, "stopped")
    return exit_code


def run(config: Config, *, listen: str | None = None, with_envoy: bool = False, envoy_bin: str | None = None, envoy_log_level: str = "warning") -> int:
    _install_event_loop()
    return asyncio.run(_main(config, listen or config.bridge_listen, with_envoy, envoy_bin, envoy_log_level))
