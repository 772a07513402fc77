"""``metabridge run --with-envoy`` for bridge.mode inprocess: there is no bridge process, only
Envoy, started with the dynamic module's bootstrap and environment and restarted if it dies.
Stops cleanly on SIGINT/SIGTERM.

By default the config is live (metabridge.config.live, docs/live-config.md): Envoy's listeners
and clusters come from LDS/CDS/RDS files, and the interpreter inside Envoy takes each config
from the runner's snapshots, acking them as a bridge worker does (``InsideEnvoy``); SIGHUP
applies the config at once. With ``--no-watch`` Envoy gets the static in-process bootstrap and
SIGHUP reloads routes, filters and codecs through the module's ``POST /reload`` on
bridge.metrics_port (Envoy keeps its own signals, so none reaches the module)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from metabridge.admin import ask_worker, worker_socket
from metabridge.config import bootstrap as envoy_config
from metabridge.config import live
from metabridge.config.model import Config
from metabridge.logs import event

log = logging.getLogger("metabridge.runner")

_RELOAD_TIMEOUT = 30.0


def ask_inside_envoy(config: Config, action: str) -> bool:
    """POST /<action> to the admin endpoint inside Envoy (``reload``: re-read the config file;
    ``reopen_logs``: access logs reopen their files): how a signal to `metabridge run` reaches
    the module, since Envoy keeps its own signals."""
    if config.metrics_port is None:
        event(log, logging.WARNING, f"{action}_needs_admin", hint=f"in-process, {action} goes through bridge.metrics_port's POST /{action}: set bridge.metrics_port")
        return False
    host = config.metrics_address.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard bind answers on loopback
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.metrics_port}/{action}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=_RELOAD_TIMEOUT) as reply:
            event(log, logging.INFO, f"{action}_applied", detail=reply.read().decode(errors="replace").strip())
            return True
    except urllib.error.HTTPError as exc:
        event(log, logging.ERROR, f"{action}_refused", detail=exc.read().decode(errors="replace").strip())
    except OSError as exc:
        event(log, logging.ERROR, f"{action}_unanswered", url=url, error=str(exc))
    return False


class InsideEnvoy:
    """Live config's applier in-process: the interpreter inside Envoy. It starts from the
    snapshot in force (``publish`` before Envoy starts, and again after every change, so a
    restarted Envoy starts from the config in force) and applies each new one when told over its
    control socket in the snapshot folder; it acks as a bridge worker does (live.Snapshots)."""

    def __init__(self, directory: Path, envoy_running) -> None:
        self.snapshots = live.Snapshots(directory)
        self._socket = worker_socket(str(directory), live.INTERPRETER)
        self._running = envoy_running

    async def _notify(self) -> None:
        # Until the socket answers: an interpreter starting up (Envoy's first filter config) may
        # have read the snapshot before the one just published, and serves its socket only then.
        deadline = time.monotonic() + live.WORKER_APPLY_TIMEOUT
        while self._running() and time.monotonic() < deadline:
            reply = await asyncio.to_thread(ask_worker, self._socket, "apply", live.WORKER_APPLY_TIMEOUT)
            if reply is not None:
                if "error" in reply:
                    event(log, logging.ERROR, "inprocess_apply_failed", error=reply["error"], hint="Envoy's log has the traceback; the listeners keep what they had")
                return
            await asyncio.sleep(0.05)

    async def apply(self, config: Config) -> None:
        """LiveConfig's worker step: Envoy's interpreter applies ``config`` (or, not running,
        starts from it)."""
        await self.snapshots.apply(config, [live.Applier(live.INTERPRETER, self._notify, self._running)])


def run_inprocess(config: Config, *, with_envoy: bool, envoy_bin: str | None = None, envoy_log_level: str = "warning", source: live.ConfigSource | None = None, xds_dir: Path | None = None, render_options: dict | None = None) -> int:
    """``source``: live config (docs/live-config.md): Envoy's listeners and clusters from files
    in ``xds_dir`` (a private folder by default), and the interpreter inside Envoy fed the
    runner's snapshots; None: the static in-process bootstrap, SIGHUP reloads through POST /reload."""
    if not with_envoy:
        event(log, logging.ERROR, "inprocess_needs_envoy", hint="bridge.mode inprocess runs inside Envoy: run with --with-envoy")
        return 2
    # What the interpreter inside Envoy will build, built here first: a codec or filter that does
    # not load is then refused before Envoy starts (CodecLoadError / ConfigError, exit 2), as a
    # bridge process refuses it, rather than as a listener Envoy rejects and goes on without.
    live.check(config)
    env = envoy_config.inprocess_environment(envoy=envoy_bin)
    # The level `metabridge --log-level` set (else the config's), for the core inside Envoy too.
    env["METABRIDGE_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return asyncio.run(_main(config, env, envoy_bin, envoy_log_level, source, xds_dir, render_options))


async def _main(config: Config, env: dict[str, str], envoy_bin: str | None, envoy_log_level: str, source: live.ConfigSource | None, xds_dir: Path | None, render_options: dict | None) -> int:
    from metabridge.runner import EnvoySupervisor, until_stopped

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchers: list[asyncio.Future] = []
    envoy = None
    with contextlib.ExitStack() as cleanup:
        try:
            if source is None:
                envoy = EnvoySupervisor(config, [], envoy_bin, envoy_log_level, envoy_config.render_inprocess_yaml(config), dynamic=False, env=env)
                # Off the loop: the reload may take a while, and Envoy is watched meanwhile.
                loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(asyncio.to_thread(ask_inside_envoy, config, "reload")))
            else:
                snapshots = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="metabridge-live-")))
                if xds_dir is None:
                    xds_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="metabridge-xds-")))
                inside = InsideEnvoy(snapshots, lambda: envoy is not None and envoy.running())
                render = functools.partial(envoy_config.build_inprocess_dynamic, live_dir=snapshots)
                live_config = live.LiveConfig(source, config, xds_dir.resolve(), inside.apply, render_options=render_options, render=render)
                inside.snapshots.publish(config)  # what Envoy's interpreter starts from
                envoy = EnvoySupervisor(config, [], envoy_bin, envoy_log_level, live_config.bootstrap_yaml(), dynamic=True, env=env)
                # SIGHUP applies the config at once, as a detected change does.
                loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(live_config.reload(force=True)))
                watchers.append(asyncio.ensure_future(live_config.run()))
                event(log, logging.INFO, "live_config_watching", files=[str(p) for p in source.files()][:20], xds_dir=str(xds_dir), mode="inprocess")
            # SIGUSR1: the access logs inside Envoy reopen their files, as a bridge process's do.
            loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(asyncio.to_thread(ask_inside_envoy, config, "reopen_logs")))
            envoy.start()
            watchers.append(asyncio.ensure_future(envoy.watch()))
            return await until_stopped(stop, watchers)
        finally:
            event(log, logging.INFO, "shutting_down")
            for watcher in watchers:
                watcher.cancel()
            if envoy is not None:
                envoy.stop()
            event(log, logging.INFO, "stopped")
