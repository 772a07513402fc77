"""The in-process transport: Envoy's network dynamic module (metabridge/native) drives one core
Connection per client connection, inside Envoy, on the connection's worker thread.

The module calls, per connection: ``on_read`` with the client's bytes (the answer replaces the
read buffer, so it reaches HCM), ``on_write`` with HCM's bytes (the answer replaces the write
buffer, so it reaches the client), ``on_scheduled`` when an event posted with
``native.schedule`` runs on the worker, ``on_event`` and ``on_destroy``. Bytes for HCM that
arise while HCM is writing (WINDOW_UPDATE, a request released by a response) are queued and
injected from a scheduled event: pushing them into HCM from inside its own write is not safe.
Timers run on one timer thread that only posts an event; the timer's callback runs on the worker.

Any exception here is contained: logged once per kind, counted, and the connection is closed.

Under live config (``metabridge run --with-envoy``, docs/live-config.md) each filter config also
names the runner's snapshot folder: the runtimes are built from the snapshot in force, and the
runner's ``apply`` on a control socket there applies each new one (``InprocessAdmin.answer``).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from metabridge.admin import LocalAdmin, serve_admin, serve_worker_socket, worker_socket
from metabridge.config import live
from metabridge.config.model import ConfigError
from metabridge.core.connection import Connection
from metabridge.core.runtime import ListenerRuntime, apply_config, build_runtimes
from metabridge.logs import event, failure
from metabridge.registry import CodecLoadError

try:  # only inside Envoy: the module defines it before importing this one
    import _metabridge_native as native
except ImportError:  # imported elsewhere (tests of the pure parts, docs)
    native = None

log = logging.getLogger("metabridge.inprocess")

_EMPTY = b""


@contextlib.contextmanager
def _between_hooks():
    """Apply a config while no hook runs on any Envoy thread (the module's hold_hooks), so a
    connection sees the runtimes of the old config or of the new one, never halfway, as a bridge
    process's event loop gives. Traffic waits meanwhile, as it does in a bridge process."""
    native.hold_hooks()
    try:
        yield
    finally:
        native.release_hooks()


# Envoy's network_connection_event values
REMOTE_CLOSE, LOCAL_CLOSE = 0, 1


class _Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerThread:
    """One thread for every connection's timers: at a timer's time it posts an event to the
    connection's worker (``native.schedule``), where the session runs what is due."""

    _COMPACT_MIN = 1024

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._compact_at = self._COMPACT_MIN

    def add(self, when: float, session: Session) -> None:
        with self._cond:
            heap = self._heap
            if len(heap) >= self._compact_at:
                # Closed connections leave entries up to their idle timeout away: drop them, so
                # the heap stays proportional to the open connections (amortised O(1) per add).
                heap[:] = [entry for entry in heap if (s := entry[2]()) is not None and not s.closed]
                heapq.heapify(heap)
                self._compact_at = max(self._COMPACT_MIN, 2 * len(heap))
            earliest = heap[0][0] if heap else None
            heapq.heappush(heap, (when, next(self._seq), weakref.ref(session)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metabridge-timers", daemon=True)
                self._thread.start()
            elif earliest is None or when < earliest:
                self._cond.notify()

    def _run(self) -> None:
        heap, cond = self._heap, self._cond
        while True:
            with cond:
                while not heap or heap[0][0] > time.monotonic():
                    cond.wait(None if not heap else max(0.0, heap[0][0] - time.monotonic()))
                _, _, ref = heapq.heappop(heap)
            session = ref()
            if session is not None:
                try:
                    session.post()
                except Exception as exc:  # noqa: BLE001 - this thread serves every connection's timers
                    failure(log, "inprocess_timer_post_failed", exc, handle=session.handle)


_TIMERS = TimerThread()


class SessionClock:
    """The core's Clock for one session: timers, and callbacks from other threads, run on the
    session's worker."""

    __slots__ = ("_session", "_heap", "_seq", "_soon")
    now = staticmethod(time.monotonic)

    def __init__(self, session: Session) -> None:
        self._session = session
        self._heap: list = []
        self._seq = itertools.count()
        self._soon: collections.deque = collections.deque()  # appended from any thread

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)  # before post(): the event it schedules drains the deque
        self._session.post()

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(when, callback)
        heap = self._heap
        if not heap or when < heap[0][0]:
            _TIMERS.add(when, self._session)
        heapq.heappush(heap, (when, next(self._seq), timer))
        return timer

    def run_due(self) -> None:
        soon = self._soon
        while soon:
            soon.popleft()()
        heap, now = self._heap, time.monotonic()
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if not timer.cancelled:
                timer.callback()
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if heap:
            _TIMERS.add(heap[0][0], self._session)  # the next one (a duplicate post is harmless)


class Session:
    """One client connection inside Envoy."""

    __slots__ = ("handle", "connection", "factory", "clock", "_hcm_queue", "_close_pending", "_posted", "_in_hook", "_closed", "__weakref__")

    def __init__(self, factory: FilterFactory, handle: int, connection_id: str) -> None:
        self.handle = handle
        self.factory = factory
        self._hcm_queue: list[bytes] = []
        self._close_pending = False  # decided during HCM's write: closed from the scheduled event
        self._posted = False
        self._in_hook = False
        self._closed = False
        self.clock = SessionClock(self)
        self.connection = Connection(factory.runtime, self.clock, connection_id, wake=self._wake)

    # ---- hooks (the module calls these on the worker, with the GIL) ---------------------------

    def on_read(self, data: bytes, end_of_stream: bool) -> bytes:
        """The client's bytes; returns the bytes for HCM."""
        if self._closed:
            return _EMPTY
        self._in_hook = True
        try:
            self.connection.receive_client(data, end_of_stream)
            to_hcm, to_client, close, end = self.connection.take()
            if self._hcm_queue:  # queued earlier: keep HCM's byte order
                to_hcm = _EMPTY.join([*self._hcm_queue, to_hcm])
                self._hcm_queue.clear()
            if to_client:
                native.inject_write(self.handle, to_client)
            if close or end or self._close_pending:
                self._close(flush=True)
                return _EMPTY
            return to_hcm
        except Exception as exc:  # noqa: BLE001 - contained: the connection closes
            self._failed("on_read", exc)
            return _EMPTY
        finally:
            self._in_hook = False

    def on_write(self, data: bytes, end_of_stream: bool) -> bytes:
        """HCM's bytes; returns the bytes for the client. Bytes for HCM wait for a scheduled event."""
        if self._closed:
            return _EMPTY
        self._in_hook = True
        try:
            self.connection.receive_upstream(data, end_of_stream)
            to_hcm, to_client, close, end = self.connection.take()
            if to_hcm:
                self._hcm_queue.append(to_hcm)
            if close or end:
                self._close_pending = True
            if to_hcm or close or end:
                self.post()
            return to_client
        except Exception as exc:  # noqa: BLE001
            self._failed("on_write", exc)
            return _EMPTY
        finally:
            self._in_hook = False

    def on_scheduled(self) -> None:
        """On the worker: run due timers, then send what waits."""
        self._posted = False
        if self._closed:
            return
        try:
            self._in_hook = True
            try:
                self.clock.run_due()
                to_hcm, to_client, close, end = self.connection.take()
            finally:
                self._in_hook = False
            close_after = close or end or self._close_pending
            parts = self._hcm_queue[:]
            self._hcm_queue.clear()
            if to_hcm:
                parts.append(to_hcm)
            if to_client:
                native.inject_write(self.handle, to_client)
            if close_after:
                self._close(flush=True)
            elif parts:
                # HCM may answer at once (our on_write runs inside this call): it queues.
                native.inject_read(self.handle, parts[0] if len(parts) == 1 else _EMPTY.join(parts))
        except Exception as exc:  # noqa: BLE001
            self._failed("on_scheduled", exc)

    def on_event(self, kind: int) -> None:
        if kind in (REMOTE_CLOSE, LOCAL_CLOSE):
            self._end()

    def on_destroy(self) -> None:
        self._end()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- internals ----------------------------------------------------------------------------

    def post(self) -> None:
        """Have on_scheduled run on the worker (from the timer thread or a hook)."""
        if self._closed or self._posted:
            return
        self._posted = True
        native.schedule(self.handle)

    def _wake(self) -> None:
        # Output made outside a hook (a timer's, which runs in on_scheduled, is taken there).
        if not self._in_hook:
            self.post()

    def _close(self, flush: bool) -> None:
        if not self._closed:
            native.close(self.handle, flush)

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True  # from now on nothing touches the handle
        try:
            self.connection.close()
        except Exception as exc:  # noqa: BLE001
            self.factory.contain("close", exc)

    def _failed(self, hook: str, exc: Exception) -> None:
        self.factory.contain(hook, exc)
        if not self._closed:
            native.count_error(self.handle)  # Envoy's metabridge_inprocess_errors
            native.close(self.handle, False)


class FilterFactory:
    """One listener's filter config inside Envoy: makes a Session per connection."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.errors = 0  # transport failures contained (each closed its connection)
        self._logged: set[str] = set()
        self._ids = itertools.count(1)
        self._pid = os.getpid()

    def new_connection(self, handle: int) -> Session:
        return Session(self, handle, f"{self._pid}-{next(self._ids)}")

    def contain(self, hook: str, exc: Exception) -> None:
        self.errors += 1
        if hook not in self._logged:  # once per hook: a failing path must not flood the log
            self._logged.add(hook)
            failure(log, "inprocess_transport_error", exc, listener=self.runtime.name, hook=hook, errors=self.errors)


class _InsideEnvoy:
    """What LocalAdmin asks of its server: Envoy serves (its own /ready says when it stops),
    and there is no gRPC server to count."""

    stopping = False
    stats = None


class InprocessAdmin(LocalAdmin):
    """bridge.metrics_port inside Envoy: the bridge process's endpoints over the runtimes every
    Envoy worker shares (one set of counters, so nothing to sum), plus ``POST /reload``: Envoy
    owns the signals, so SIGHUP cannot reach the module. Under live config (``live_dir``) it
    also answers the runner on a Unix socket there: ``apply`` applies the runner's snapshot."""

    def __init__(self, config, runtimes, live_dir: str | None = None) -> None:
        super().__init__(config, runtimes, _InsideEnvoy())
        self._reloading = threading.Lock()
        self._live_dir = live_dir
        self.control = None  # live config: the server of the runner's control socket

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file and apply its routes, filters and codecs (runtime.apply_config):
        connections opened afterwards on any worker use them. A config that does not load (its
        codecs and filters included) is refused and the old one stays. Under live config the
        runner applies every change (and knows which one is in force): refused here."""
        path = self._config.source
        if self._live_dir is not None:
            event(log, logging.WARNING, "reload_refused_live_config", config=path, hint="metabridge run watches the config and applies each saved change; send it SIGHUP to apply at once")
            return False, f"{path} is live config: `metabridge run` applies each saved change itself; send it SIGHUP to apply at once"
        with self._reloading:
            try:
                config = live.ConfigSource.of(self._config).load()
                live.check(config)  # codecs and filters load, as live config checks them
            except (ConfigError, CodecLoadError, OSError) as exc:
                event(log, logging.ERROR, "reload_failed_keeping_old_routes", config=path, error=str(exc))
                return False, str(exc)
            with _between_hooks():
                applied = apply_config(self._runtimes, config)
            if not applied:
                return False, "the config's filters did not load (see the log); the old routes stay"
        return True, path

    def reopen_logs(self) -> tuple[bool, str]:
        """What SIGUSR1 does to a bridge process: every access log reopens its file before its
        next write (after a rotation)."""
        from metabridge.filters import access_log

        access_log.reopen_files()
        return True, "access logs reopen their files"

    def answer(self, command: str) -> dict:
        """The runner's commands on the control socket (live config), and LocalAdmin's."""
        if command == "apply" and self._live_dir is not None:
            try:
                with self._reloading:
                    # The runner checked this config (live.check) before it published it.
                    with _between_hooks():
                        version = live.apply_snapshot(self._live_dir, self._runtimes, live.INTERPRETER)
            except Exception as exc:  # noqa: BLE001 - the runner waits for the ack, and logs its absence
                failure(log, "live_config_apply_failed", exc, directory=self._live_dir)
                return {"error": f"{type(exc).__name__}: {exc}"}
            event(log, logging.INFO, "live_config_snapshot_applied", version=version, listeners=sorted(self._runtimes))
            return {"applied": version}
        return super().answer(command)


_RUNTIMES: dict[str, dict[str, ListenerRuntime]] = {}  # config path (live: snapshot folder) -> its listeners' runtimes
_ADMINS: dict[str, InprocessAdmin] = {}  # the same key -> its admin (bridge.metrics_port, live config's control socket)
_LOCK = threading.Lock()


def _start(key: str, source: live.ConfigSource, path: str, live_dir: str | None) -> dict[str, ListenerRuntime]:
    """The first filter config of ``key``: load the config from ``source`` (live: the runner's
    snapshot in force, which a restarted Envoy starts from too) and build every listener's
    runtime. ``path`` names the source in messages."""
    from metabridge import logs

    logs.setup(os.environ.get("METABRIDGE_LOG_LEVEL", "info"))
    if live_dir is None:
        version, config = None, source.load()
    else:
        try:
            version, config = live.read_snapshot(Path(live_dir))
        except OSError as exc:
            raise RuntimeError(f"{path}: live config's snapshot in {live_dir} cannot be read ({exc}): this bootstrap is for an Envoy that `metabridge run --with-envoy` starts and feeds") from exc
    runtimes = _RUNTIMES[key] = build_runtimes(config)
    admin = None
    if live_dir is not None or config.metrics_port is not None:
        admin = _ADMINS[key] = InprocessAdmin(config, runtimes, live_dir)
    if live_dir is not None:
        # The ack first: a newer snapshot's ``apply``, which the socket may take at once, acks last.
        live.write_ack(Path(live_dir), live.INTERPRETER, version)
        admin.control = serve_worker_socket(admin, worker_socket(live_dir, live.INTERPRETER))  # the runner's commands
    event(log, logging.INFO, "inprocess_ready", config=path, listeners=sorted(runtimes), **({"live_version": version} if version else {}))
    if config.metrics_port is not None:
        # A daemon thread; it runs whenever Envoy's workers are outside Python.
        serve_admin(admin, config.metrics_address, config.metrics_port)
    return runtimes


def new_filter_config(name: bytes, config: bytes) -> FilterFactory:
    """Envoy's filter config: ``config`` is JSON ``{"config": FILE, "manifests": DIR, "listener":
    NAME}`` (either of FILE and DIR may be null: a manifests folder needs no base), with
    ``"live": DIR`` under live config. Raises (and Envoy then refuses the listener) when the
    config or its codecs do not load, or when the listener is not one the core knows: under live
    config the runner gives the in-process side a new listener's runtime before Envoy gets the
    listener, so no connection finds a listener the core does not know."""
    settings = json.loads(config or b"{}")
    listener, live_dir = settings["listener"], settings.get("live")
    file, manifests = settings.get("config"), settings.get("manifests")
    path = f"{file} + {manifests}" if file and manifests else (file or manifests)
    key = live_dir or path
    with _LOCK:
        runtimes = _RUNTIMES.get(key)
        if runtimes is None:
            source = live.ConfigSource(Path(file) if file else None, Path(manifests) if manifests else None)
            runtimes = _start(key, source, path, live_dir)
    runtime = runtimes.get(listener)
    if runtime is None:
        raise KeyError(f"{path}: no listener {listener!r} (known: {', '.join(sorted(runtimes))})")
    return FilterFactory(runtime)
