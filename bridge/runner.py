"""``metabridge run``: the bridge's process life.

One worker process serves each address of ``Config.worker_addresses`` (Envoy's bridge cluster
has one endpoint per worker and spreads connections over them). With one worker the bridge runs
in this process; with more, this process supervises them. Optionally it also supervises Envoy.
Everything stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from metabridge import logs
from metabridge.config.model import Config, ConfigError
from metabridge.logs import event
from metabridge.admin import LocalAdmin, SupervisorAdmin, serve_admin, serve_worker_socket, worker_socket
from metabridge.config import live
from metabridge.core.runtime import apply_config, build_runtimes, reload_routes
from metabridge.filters import access_log
from metabridge.filters.local_ratelimit import remove_shared_buckets, remove_stale_shared_buckets
from metabridge.transport.ext_proc import serve

log = logging.getLogger("metabridge.runner")

_RESTART_WINDOW = 60.0  # seconds
_MAX_RESTARTS = 5  # a child crashing more often than this per window is not going to get better
_STOP_GRACE = 10.0


def install_event_loop() -> None:
    if os.environ.get("METABRIDGE_EVENT_LOOP") == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def exit_cause(exit_code: int | None) -> dict:
    """A child's exit for its log event: a negative code is the signal that ended it, named."""
    if exit_code is not None and exit_code < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-exit_code).name}
    return {}


class _RestartBudget:
    """Allows a crashed child to be restarted, up to _MAX_RESTARTS per _RESTART_WINDOW."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._times: list[float] = []

    def spend(self, exit_code: int | None) -> float:
        """Record a crash; return the back-off before restarting, or raise when exhausted."""
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < _RESTART_WINDOW] + [now]
        if len(self._times) > _MAX_RESTARTS:
            raise RuntimeError(f"{self.what} exited {len(self._times)} times within {_RESTART_WINDOW:g}s (last exit code {exit_code}); see its log above")
        return min(2 ** len(self._times) * 0.1, 5.0)


class EnvoySupervisor:
    """Starts Envoy with the rendered bootstrap and restarts it if it dies unexpectedly."""

    def __init__(self, config: Config, bridge_addresses: list[str], envoy_bin: str | None, log_level: str, bootstrap: str | None = None, *, dynamic: bool | None = None, env: dict[str, str] | None = None) -> None:
        """``bootstrap``: the text to start Envoy with (live config's dynamic bootstrap, the
        in-process one); default: the static rendering of ``config``. ``dynamic``: its listeners
        come from live config's files (default: when ``bootstrap`` is given). ``env``: Envoy's
        environment (in-process: inprocess_environment()); default: this process's."""
        from metabridge.config import bootstrap as envoy_config

        self._bin = envoy_bin or envoy_config.find_envoy()
        self._dir = tempfile.TemporaryDirectory(prefix="metabridge-envoy-")
        self.bootstrap = Path(self._dir.name) / "bootstrap.yaml"
        self.bootstrap.write_text(bootstrap or envoy_config.render_yaml(config, bridge_addresses=bridge_addresses))
        self._args = [self._bin, "-c", str(self.bootstrap), "--concurrency", str(config.envoy_concurrency), "--log-level", log_level, "--use-dynamic-base-id"]
        self._env = env
        self._mode = config.mode
        if dynamic is None:
            dynamic = bootstrap is not None
        if dynamic:
            # A changed or removed listener drains: with Envoy's default (gradual) strategy its HCM
            # sends the GOAWAY that makes the bridge finish and close a connection only with a
            # probability that grows over the drain time, so a connection could still be open when
            # the drain time ends and Envoy closes it. Immediate: the bridge's next drain probe sees it.
            self._args += ["--drain-strategy", "immediate"]
        self._proc: subprocess.Popen | None = None
        self._budget = _RestartBudget("Envoy")
        self._stopping = False

    def start(self) -> None:
        self._proc = subprocess.Popen(self._args, env=self._env)
        event(log, logging.INFO, "envoy_started", pid=self._proc.pid, bootstrap=str(self.bootstrap), mode=self._mode)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def watch(self) -> None:
        """Restart Envoy when it exits on its own; raise when it keeps crashing."""
        while not self._stopping:
            await asyncio.sleep(0.2)
            if self._proc is None or self._proc.poll() is None:
                continue
            code = self._proc.returncode
            delay = self._budget.spend(code)
            # In-process, a crash in a codec's or a C extension's code is Envoy's (SIGSEGV).
            event(log, logging.ERROR, "envoy_exited_restarting", exit_code=code, restart_in_seconds=delay, **exit_cause(code))
            await asyncio.sleep(delay)
            self.start()

    def stop(self) -> None:
        self._stopping = True
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()


def raise_open_file_limit() -> None:
    """Envoy opens one HTTP/2 connection to the bridge per client connection (so one client's
    flood cannot reset another's), so the bridge needs a socket per client: take the soft
    open-file limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    elif hard == resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1 << 20), hard))
    event(log, logging.DEBUG, "open_file_limit", soft=resource.getrlimit(resource.RLIMIT_NOFILE)[0])


async def _start_bridge(config: Config, address: str, index: int, admin_dir: str | None = None, live_dir: str | None = None):
    """One bridge: the gRPC server, its admin endpoint and route reload on SIGHUP. A worker
    (``admin_dir`` set) answers its supervisor's admin on a Unix socket there instead. With
    ``live_dir`` (a worker under live config) SIGHUP applies the supervisor's snapshot there."""
    raise_open_file_limit()
    runtimes = build_runtimes(config)
    server = await serve(address, runtimes, config.grpc_limits)
    if any(listener.rds for listener in config.listeners):  # this process's own RDS streams (docs/rds.md)
        from metabridge.xds import client as rds_client  # envoy-data-plane's models load only here

        rds_client.start(runtimes)
    if admin_dir is not None:
        serve_worker_socket(LocalAdmin(config, runtimes, server), worker_socket(admin_dir, index))
    elif config.metrics_port is not None:
        serve_admin(LocalAdmin(config, runtimes, server), config.metrics_address, config.metrics_port)
    loop = asyncio.get_running_loop()
    if live_dir is not None:
        loop.add_signal_handler(signal.SIGHUP, live.apply_snapshot, Path(live_dir), runtimes, index)
    else:
        loop.add_signal_handler(signal.SIGHUP, reload_routes, runtimes, lambda: live.ConfigSource.of(config).load(), config.source)
    # Every bridge process handles SIGUSR1 (access logs reopen their files), so a rotation's
    # signal never ends a process that has no log file.
    loop.add_signal_handler(signal.SIGUSR1, access_log.reopen_files)
    return server, runtimes


def _worker_main(config: Config, address: str, index: int, log_level: str, admin_dir: str | None = None, live_dir: str | None = None) -> None:
    """Entry point of a worker process: serve one address until SIGTERM."""
    logs.setup(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    install_event_loop()
    asyncio.run(_serve_until_stopped(config, address, index, admin_dir, live_dir))


async def _serve_until_stopped(config: Config, address: str, index: int, admin_dir: str | None = None, live_dir: str | None = None) -> None:
    server, _ = await _start_bridge(config, address, index, admin_dir, live_dir)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2.0)


async def _accepts(address: str) -> bool:
    """Whether a connection to ``address`` (unix:PATH or HOST:PORT) is accepted."""
    try:
        if address.startswith("unix:"):
            _, writer = await asyncio.open_unix_connection(address[len("unix:"):])
        else:
            host, _, port = address.rpartition(":")
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except OSError:
        return False
    writer.close()
    return True


class WorkerSupervisor:
    """Runs one bridge process per worker address and restarts any that dies."""

    def __init__(self, config: Config, addresses: list[str], live_config: bool = False) -> None:
        self._config = config
        self._addresses = addresses
        self._context = multiprocessing.get_context("spawn")  # no forked gRPC state
        self._procs: dict[str, multiprocessing.Process] = {}
        self._budget = _RestartBudget("a bridge worker")
        self._stopping = False
        # With bridge.metrics_port: where the workers answer the supervisor's admin endpoint.
        self._admin_dir = tempfile.TemporaryDirectory(prefix="metabridge-admin-") if config.metrics_port is not None else None
        self.admin_sockets = [worker_socket(self._admin_dir.name, i) for i in range(len(addresses))] if self._admin_dir else []
        # Live config: where the supervisor leaves the config for the workers to apply.
        self._live_dir = tempfile.TemporaryDirectory(prefix="metabridge-live-") if live_config else None
        self._snapshots = live.Snapshots(Path(self._live_dir.name)) if self._live_dir else None

    def _start(self, address: str) -> None:
        index = self._addresses.index(address)
        level = logging.getLevelName(logging.getLogger().level).lower()
        admin_dir = self._admin_dir.name if self._admin_dir else None
        live_dir = self._live_dir.name if self._live_dir else None
        proc = self._context.Process(target=_worker_main, args=(self._config, address, index, level, admin_dir, live_dir), name=f"metabridge-worker {address}", daemon=False)
        proc.start()
        self._procs[address] = proc
        event(log, logging.INFO, "worker_started", pid=proc.pid, address=address)

    def start(self) -> None:
        stale = remove_stale_shared_buckets()
        if stale:
            event(log, logging.INFO, "stale_ratelimit_buckets_removed", directories=[str(p) for p in stale], reason="their bridge is no longer running")
        for address in self._addresses:
            self._start(address)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every worker accepts connections, so Envoy never meets a missing socket."""
        deadline = time.monotonic() + timeout
        for address in self._addresses:
            while not await _accepts(address):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bridge worker at {address} did not start listening within {timeout:g}s; see its log above")
                await asyncio.sleep(0.05)
        event(log, logging.INFO, "workers_ready", workers=len(self._addresses))

    async def watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.2)
            for address, proc in list(self._procs.items()):
                if proc.is_alive() or self._stopping:
                    continue
                delay = self._budget.spend(proc.exitcode)
                event(log, logging.ERROR, "worker_exited_restarting", address=address, exit_code=proc.exitcode, restart_in_seconds=delay, **exit_cause(proc.exitcode))
                await asyncio.sleep(delay)
                self._start(address)

    def reload(self) -> None:
        """SIGHUP: every worker reloads itself; a worker restarted later starts from the config
        as it is now (one that does not load is refused by each worker, so keep the old)."""
        try:
            self._config = live.ConfigSource.of(self._config).load()
        except ConfigError:
            pass
        for proc in self._procs.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    async def apply(self, config: Config) -> None:
        """Live config: every live worker applies ``config``; returns once each has said so (a
        worker started from now on starts from it)."""
        assert self._snapshots is not None
        self._config = config
        appliers = [live.Applier(self._addresses.index(address), _signaller(proc), proc.is_alive) for address, proc in self._procs.items()]
        await self._snapshots.apply(config, appliers)

    def forward(self, sig: int) -> None:
        """Pass a signal on to every live worker (SIGUSR1: access logs reopen their files)."""
        for proc in self._procs.values():
            if proc.is_alive():
                os.kill(proc.pid, sig)

    def stop(self) -> None:
        self._stopping = True
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs.values():
            proc.join(_STOP_GRACE)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self._admin_dir:
            self._admin_dir.cleanup()
        if self._live_dir:
            self._live_dir.cleanup()
        remove_shared_buckets(os.getpid())  # the workers' shared rate-limit buckets


async def _main(config: Config, listen: str | None, with_envoy: bool, envoy_bin: str | None, envoy_log_level: str, source: live.ConfigSource | None = None, xds_dir: Path | None = None, render_options: dict | None = None) -> int:
    addresses = config.worker_addresses(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = workers = envoy = None
    watchers: list[asyncio.Future] = []
    exit_code = 0
    xds_tmp = None
    try:
        if len(addresses) == 1:
            server, runtimes = await _start_bridge(config, addresses[0], 0)
            apply_workers = _in_process(runtimes)
        else:
            build_runtimes(config)  # fail here, once, on a bad codec rather than in every worker
            workers = WorkerSupervisor(config, addresses, live_config=source is not None)
            apply_workers = workers.apply
            workers.start()
            loop.add_signal_handler(signal.SIGHUP, workers.reload)
            loop.add_signal_handler(signal.SIGUSR1, workers.forward, signal.SIGUSR1)
            watchers.append(asyncio.ensure_future(workers.watch()))
            await workers.wait_ready()
            if config.metrics_port is not None:
                serve_admin(SupervisorAdmin(workers.admin_sockets), config.metrics_address, config.metrics_port)
        live_config = None
        if source is not None:
            if xds_dir is None:
                xds_tmp = tempfile.TemporaryDirectory(prefix="metabridge-xds-")
                xds_dir = Path(xds_tmp.name)
            live_config = live.LiveConfig(source, config, xds_dir.resolve(), apply_workers, bridge_addresses=addresses, render_options=render_options)
            # SIGHUP now reloads Envoy's resources too, not only the workers' routes.
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(live_config.reload(force=True)))
            watchers.append(asyncio.ensure_future(live_config.run()))
            event(log, logging.INFO, "live_config_watching", files=[str(p) for p in source.files()][:20], xds_dir=str(xds_dir))
        if with_envoy:
            bootstrap = live_config.bootstrap_yaml() if live_config else None
            envoy = EnvoySupervisor(config, addresses, envoy_bin, envoy_log_level, bootstrap)
            envoy.start()
            watchers.append(asyncio.ensure_future(envoy.watch()))
        exit_code = await until_stopped(stop, watchers)
    finally:
        event(log, logging.INFO, "shutting_down")
        for watcher in watchers:
            watcher.cancel()
        if envoy:
            envoy.stop()  # Envoy first, so no new connection reaches a stopping bridge
        if workers:
            workers.stop()
        if server:
            await server.stop(grace=2.0)
        if xds_tmp:
            xds_tmp.cleanup()
        event(log, logging.INFO, "stopped")
    return exit_code


def _signaller(proc: multiprocessing.Process):
    """A worker's live.Applier.notify: SIGHUP makes it apply the snapshot (apply_snapshot)."""

    async def notify() -> None:
        with contextlib.suppress(ProcessLookupError):  # it died meanwhile: its restart reads the snapshot
            os.kill(proc.pid, signal.SIGHUP)

    return notify


async def until_stopped(stop: asyncio.Event, watchers: list[asyncio.Future]) -> int:
    """Until ``stop`` is set (0) or a watcher fails (logged, 1)."""
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([waiter, *watchers], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    exit_code = 0
    for watcher in watchers:
        if watcher in done and watcher.exception():
            event(log, logging.ERROR, "giving_up", error=str(watcher.exception()))
            exit_code = 1
    return exit_code


def _in_process(runtimes: dict):
    """Live config's worker step when the bridge runs in this process."""

    async def apply(config: Config) -> None:
        apply_config(runtimes, config, envoy_follows=True)

    return apply


def run(config: Config, *, listen: str | None = None, with_envoy: bool = False, envoy_bin: str | None = None, envoy_log_level: str = "warning", source: live.ConfigSource | None = None, xds_dir: Path | None = None, render_options: dict | None = None) -> int:
    """``source``: watch it and apply changes live (Envoy's listeners and clusters from files
    in ``xds_dir``, a private directory by default, rendered with ``render_options``); None: the
    static bootstrap, SIGHUP reloads the workers' routes only."""
    if config.mode == "inprocess":  # no bridge process: Envoy runs the core (docs/inprocess.md)
        from metabridge.inprocess_runner import run_inprocess

        return run_inprocess(config, with_envoy=with_envoy, envoy_bin=envoy_bin, envoy_log_level=envoy_log_level, source=source, xds_dir=xds_dir, render_options=render_options)
    install_event_loop()
    return asyncio.run(_main(config, listen, with_envoy, envoy_bin, envoy_log_level, source, xds_dir, render_options))
