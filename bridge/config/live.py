"""Live configuration: a changed config file (or manifests folder) applied without a restart.

The supervisor polls the config's files (``ConfigWatch``); when their content changed and has
stayed the same for one poll (an editor's half-written file is not taken), it loads and checks
the new config (schema, references, codecs, filters, and the Envoy resources it renders). A
config that does not load is refused, logged, and the running one stays. One that loads is
applied in the order that loses no request (``LiveConfig.apply``):

1. Envoy gets every cluster of the old and the new config (CDS), so a route may use a new
   cluster and a changed cluster has its new endpoints before any route sends to them;
2. every bridge worker (in-process: the interpreter inside Envoy) gets the new listeners
   (``apply_config``), so none of their connections finds a worker that does not know it;
3. Envoy gets the new tunnel routes (RDS) and listeners (LDS): a new listener opens, a removed
   one drains (open connections finish what is in flight), an unchanged one is left alone;
4. every worker routes by the new config (routes, filters, timeouts, cluster endpoints, codecs);
5. Envoy drops the clusters the new config no longer has: no route uses them any more.

A step Envoy refuses (its admin counts the update as rejected) refuses the config: the files
and the workers are put back as the running config has them.

Workers in other processes (bridge workers; in-process, the interpreter inside Envoy) get each
config as a snapshot in the supervisor's private directory (``Snapshots``): told of it (SIGHUP;
a command on the in-process side's control socket), each applies it and acks its version
(``apply_snapshot``), and one that starts again starts from the snapshot in force.

Envoy reads LDS, CDS and RDS from files in one directory (``path_config_source`` with a
``watched_directory``); each file is replaced by writing a temporary file in that directory and
renaming it over the old one, as Envoy requires, and only when its content changed, so an
unchanged listener is never drained. Each file carries a version (a digest of its resources);
a step is done when Envoy's admin reports that version, and Envoy refusing it refuses the config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from metabridge.config import bootstrap as envoy_config
from metabridge.config.model import Config, ConfigError, load
from metabridge.logs import event
from metabridge.registry import CodecLoadError

log = logging.getLogger("metabridge.live")

POLL_INTERVAL = 0.25  # seconds between looks at the config's files
ENVOY_APPLY_TIMEOUT = 5.0  # how long a step waits for Envoy's admin to report the new version
ADMIN_UNANSWERED = 1.0  # an admin silent this long is taken as unreachable, not waited for
WORKER_APPLY_TIMEOUT = 10.0
_SNAPSHOT = "config.pickle"
INTERPRETER = 0  # the applier index of the interpreter inside Envoy (bridge.mode inprocess)
# Config fields read only at start (the bridge's processes and servers, Envoy's command line).
_RESTART_ONLY = ("bridge_listen", "workers", "metrics_port", "metrics_address", "log_level", "max_buffered_bytes", "grpc_limits", "envoy_admin_address", "envoy_admin_port", "envoy_concurrency", "mode")


class LiveConfigError(Exception):
    """A new config that is refused (it does not load, or Envoy rejects what it renders)."""


@dataclasses.dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from: a file, or a manifests folder (or file) with an optional
    base config file; ``load`` reads it as `metabridge run` did at start."""

    config: Path | None = None
    manifests: Path | None = None

    @classmethod
    def of(cls, config: Config) -> ConfigSource:
        """Where ``config`` was read from, to read it again (a reload)."""
        if config.config_file is None and config.manifests is None:
            raise ConfigError(f"{config.source}: this config was not read from a file, so it cannot be read again")
        return cls(config.config_file, config.manifests)

    def files(self) -> list[Path]:
        found = [self.config] if self.config is not None else []
        if self.manifests is not None:
            if self.manifests.is_dir():
                found += sorted(p for p in self.manifests.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            else:
                found.append(self.manifests)
        return found

    def load(self) -> Config:
        if self.manifests is None:
            return load(self.config)
        from metabridge.config import mesh

        loaded = mesh.load(self.manifests, self.config)
        for warning in loaded.warnings:
            event(log, logging.WARNING, "manifests_warning", warning=warning)
        return loaded.config


class ConfigWatch:
    """Tells when the source's files changed: their names, sizes and modification times, then
    a digest of their content (a rewrite with the same content is no change)."""

    def __init__(self, source: ConfigSource) -> None:
        self.source = source
        self._stat = self._signature()
        self._pending: tuple | None = None
        self.digest = self._digest()

    def _signature(self) -> tuple:
        items = []
        for path in self.source.files():
            try:
                st = path.stat()
            except OSError:
                items.append((str(path), None))
                continue
            items.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(items)

    def _digest(self) -> str:
        h = hashlib.sha256()
        for path in self.source.files():
            h.update(str(path).encode() + b"\0")
            try:
                h.update(path.read_bytes())
            except OSError:
                h.update(b"\1missing")
        return h.hexdigest()

    def changed(self) -> bool:
        """True once the files differ from the last accepted or refused content and have not
        changed since the previous call (so a file being written is read only when whole)."""
        signature = self._signature()
        if signature == self._stat:
            self._pending = None
            return False
        if signature != self._pending:
            self._pending = signature  # changed since the last look: wait for it to settle
            return False
        self._stat, self._pending = signature, None
        digest = self._digest()
        if digest == self.digest:
            return False
        self.digest = digest
        return True

    def mark(self) -> None:
        """Take the files as they are now as seen (after a forced reload)."""
        self._stat, self._pending, self.digest = self._signature(), None, self._digest()


def check(config: Config) -> None:
    """Everything a start would check, without starting: codecs import and accept their
    options, filters build (raises ConfigError / CodecLoadError)."""
    from metabridge.core.runtime import build_runtimes

    build_runtimes(config)


def _version(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


class XdsDirectory:
    """The directory Envoy's LDS, CDS and RDS files live in."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, response: dict[str, Any]) -> str | None:
        """Replace file ``name`` with ``response`` (versioned) by rename; the version when the
        content changed, else None (the file is left alone, so Envoy does nothing)."""
        version = _version(response)
        target = self.path / name
        text = yaml.safe_dump({"version_info": version, **response}, sort_keys=False)
        try:
            if target.read_text() == text:
                return None
        except OSError:
            pass
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        os.fchmod(fd, 0o644)  # Envoy may run as another user (a container beside the bridge)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.rename(tmp, target)  # atomic: Envoy sees the old file or the new one, never a part
        return version

    def remove_except(self, keep: set[str]) -> None:
        """Delete RDS files no listener refers to any more."""
        for path in self.path.glob("rds-*.yaml"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


class EnvoyAdmin:
    """Envoy's admin endpoint: which LDS / CDS version it has applied, and whether it refused one."""

    def __init__(self, address: str, port: int) -> None:
        self.url = f"http://{address}:{port}"
        self.known = port != 0  # port 0: Envoy picked one; nothing to ask

    def _stats(self, prefix: str) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.url}/stats?filter=^{prefix}\\.", timeout=1) as reply:
            text = reply.read().decode()
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            out[key] = value.strip().strip('"')
        return out

    async def failures(self, prefix: str) -> tuple | None:
        """Envoy's count of refused updates under ``prefix``; None when the admin does not answer."""
        if not self.known:
            return None
        try:
            stats = await asyncio.to_thread(self._stats, prefix)
        except (OSError, urllib.error.URLError):
            return None
        return stats.get(f"{prefix}.update_rejected"), stats.get(f"{prefix}.update_failure")

    async def wait_version(self, prefix: str, version: str, before: tuple | None, timeout: float = ENVOY_APPLY_TIMEOUT) -> None:
        """Until Envoy reports ``version`` under ``prefix`` (listener_manager.lds,
        cluster_manager.cds); LiveConfigError when it refuses the update (its refusal count
        moves from ``before``) or answers without the version. An admin that does not answer
        at all is logged and waited for no longer: the files are in place for when it reads them."""
        if not self.known:
            return
        start = time.monotonic()
        deadline = start + timeout
        answered = False
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not answered and time.monotonic() - start > ADMIN_UNANSWERED:
                break
            try:
                stats = await asyncio.to_thread(self._stats, prefix)
            except (OSError, urllib.error.URLError) as exc:
                last_error = exc
            else:
                answered = True
                if stats.get(f"{prefix}.version_text") == version:
                    return
                failures = (stats.get(f"{prefix}.update_rejected"), stats.get(f"{prefix}.update_failure"))
                if before is not None and failures != before:
                    kind = prefix.rsplit(".", 1)[-1].upper()
                    raise LiveConfigError(f"Envoy refused the new {kind} resources (its log says why)")
            await asyncio.sleep(0.02)
        if not answered:
            event(log, logging.WARNING, "envoy_admin_unreachable", admin=self.url, error=str(last_error), hint="the new files are in place; without Envoy's admin the bridge cannot tell when Envoy has them")
            return
        raise LiveConfigError(f"Envoy's admin at {self.url} did not report {prefix}.version_text {version} within {timeout:g} s")


def write_snapshot(directory: Path, config: Config, version: str) -> None:
    """The config the workers are to apply, for their SIGHUP (see apply_snapshot)."""
    fd, tmp = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "wb") as out:
        pickle.dump((version, config), out)
    os.rename(tmp, directory / _SNAPSHOT)


def read_snapshot(directory: Path) -> tuple[str, Config]:
    """(version, config) of the snapshot in force in ``directory``."""
    with open(Path(directory) / _SNAPSHOT, "rb") as source:
        return pickle.load(source)  # written by our own supervisor, in its private directory


def write_ack(directory: Path, index: int, version: str) -> None:
    """Applier ``index`` (a worker; 0 for the interpreter inside Envoy) has applied ``version``."""
    directory = Path(directory)
    tmp = directory / f".ack-{index}"
    tmp.write_text(version)
    os.rename(tmp, directory / f"ack-{index}")


def apply_snapshot(directory: Path, runtimes: dict, index: int) -> str:
    """An applier's side (a worker's SIGHUP in live mode, the in-process side's ``apply``):
    apply the supervisor's snapshot, then say so; returns its version."""
    from metabridge.core.runtime import apply_config

    version, config = read_snapshot(directory)
    apply_config(runtimes, config, envoy_follows=True)
    write_ack(directory, index, version)
    return version


def read_ack(directory: Path, index: int) -> str | None:
    try:
        return (Path(directory) / f"ack-{index}").read_text()
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class Applier:
    """One process that applies the supervisor's snapshots: a bridge worker (told by SIGHUP),
    or the interpreter inside Envoy (told over its control socket). ``notify`` tells it a new
    snapshot is there; ``alive`` says whether it runs (one that does not starts from the
    snapshot in force when it starts again)."""

    index: int
    notify: Callable[[], Awaitable[None]]
    alive: Callable[[], bool]


class Snapshots:
    """The supervisor's side of apply_snapshot / read_ack, in its private ``directory``: each
    config it publishes gets a version of its own, and ``apply`` returns once every live applier
    has acked that version."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._count = 0

    def publish(self, config: Config) -> str:
        """Leave ``config`` as the snapshot in force (what an applier starts from); its version."""
        self._count += 1
        version = f"{os.getpid()}-{self._count}"
        write_snapshot(self.directory, config, version)
        return version

    async def apply(self, config: Config, appliers: list[Applier], timeout: float = WORKER_APPLY_TIMEOUT) -> list[int]:
        """Publish ``config``, tell every live applier, and wait until each has acked it or
        stopped; the indexes still waiting after ``timeout`` (logged)."""
        version = self.publish(config)
        deadline = time.monotonic() + timeout
        waiting = {a.index: a for a in appliers if a.alive()}
        await asyncio.gather(*(a.notify() for a in waiting.values()))
        while waiting:
            for index, applier in list(waiting.items()):
                if read_ack(self.directory, index) == version or not applier.alive():
                    del waiting[index]  # applied, or stopped: a restart starts from ``config``
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        if waiting:
            event(log, logging.WARNING, "workers_slow_to_apply_config", workers=sorted(waiting), seconds=timeout, version=version)
        return sorted(waiting)


def _summary(old: Config, new: Config) -> dict[str, list[str]]:
    old_l = {lst.name: lst for lst in old.listeners}
    new_l = {lst.name: lst for lst in new.listeners}

    def diff(a: dict, b: dict) -> tuple[list[str], list[str], list[str]]:
        return sorted(set(b) - set(a)), sorted(set(a) - set(b)), sorted(n for n in set(a) & set(b) if a[n] != b[n])

    la, lr, lc = diff(old_l, new_l)
    ca, cr, cc = diff(old.clusters, new.clusters)
    return {"listeners_added": la, "listeners_removed": lr, "listeners_changed": lc, "clusters_added": ca, "clusters_removed": cr, "clusters_changed": cc}


class LiveConfig:
    """The supervisor's side: the config in force, Envoy's files, and how a new config is
    brought to Envoy and to every worker. ``apply_workers(config)`` makes every worker apply
    ``config`` and returns when they have."""

    def __init__(
        self,
        source: ConfigSource,
        config: Config,
        xds_dir: Path,
        apply_workers: Callable[[Config], Awaitable[None]],
        *,
        bridge_addresses: list[str] | None = None,
        render_options: dict[str, Any] | None = None,
        render: Callable[..., tuple[dict[str, Any], dict[str, dict[str, Any]]]] | None = None,
    ) -> None:
        """``render_options``: build_dynamic's listener_address and endpoint_overrides, applied
        to every rendering (as `render --dynamic` was given them). ``render(config, directory,
        **render_options)``: the bootstrap and files (default: build_dynamic's, with the bridge
        cluster at ``bridge_addresses``; in-process: build_inprocess_dynamic's)."""
        self.source = source
        self.config = config
        self.xds = XdsDirectory(xds_dir)
        self._apply_workers = apply_workers
        if render is None:
            render = functools.partial(envoy_config.build_dynamic, bridge_addresses=bridge_addresses)
        self._renderer = render
        self._render_options = dict(render_options or {})
        self.watch = ConfigWatch(source)
        self.admin = EnvoyAdmin(config.envoy_admin_address, config.envoy_admin_port)
        self._lock = asyncio.Lock()
        self.bootstrap, files = self._render(config)
        for name, response in files.items():  # before Envoy starts: nothing to wait for
            self.xds.write(name, response)

    def _render(self, config: Config) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        return self._renderer(config, self.xds.path, **self._render_options)

    def bootstrap_yaml(self) -> str:
        header = f"# Generated by `metabridge run` from {Path(self.config.source).name}: listeners and clusters come from {self.xds.path}; do not edit by hand.\n"
        return header + yaml.safe_dump(self.bootstrap, sort_keys=False)

    async def run(self) -> None:
        """Poll the config's files for ever, applying each change."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                if self.watch.changed():
                    await self.reload()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the proxy
                event(log, logging.ERROR, "live_config_error", error=f"{type(exc).__name__}: {exc}", hint="the running config stays; report this with the log")

    async def reload(self, force: bool = False) -> bool:
        """Load the source and apply it; False (logged) when it is refused."""
        if force:
            self.watch.mark()
        async with self._lock:
            started = time.monotonic()
            try:
                # Off the event loop: it goes on serving meanwhile, and a filter built only to be
                # checked installs nothing on it (the access log's SIGUSR1 handler).
                new, new_bootstrap, files = await asyncio.to_thread(self._load_and_check)
            except (ConfigError, CodecLoadError, envoy_config.EnvoyConfigError, OSError) as exc:
                event(log, logging.ERROR, "live_config_refused_keeping_old", config=self.config.source, error=str(exc), hint="fix the config; the running one stays in force until a config that loads is saved")
                return False
            fixed = [name for name in _RESTART_ONLY if getattr(new, name, None) != getattr(self.config, name, None)]
            if fixed or new_bootstrap != self.bootstrap:
                event(log, logging.WARNING, "reload_needs_restart", settings=fixed or ["envoy bootstrap"], hint="these settings apply when the bridge (and Envoy) restart; listeners, routes and clusters apply now")
            try:
                await self._apply(new, files)
            except LiveConfigError as exc:
                event(log, logging.ERROR, "live_config_refused_keeping_old", config=self.config.source, error=str(exc), hint="Envoy's log says why; the running config stays in force")
                await self._restore()
                return False
            changes = _summary(self.config, new)
            self.config = new
            event(log, logging.INFO, "live_config_applied", config=new.source, seconds=round(time.monotonic() - started, 3), steps=self._steps, **{k: v for k, v in changes.items() if v})
            return True

    def _load_and_check(self) -> tuple[Config, dict[str, Any], dict[str, dict[str, Any]]]:
        new = self.source.load()
        check(new)
        return (new, *self._render(new))

    async def _write_and_wait(self, name: str, response: dict[str, Any], stat_prefix: str | None) -> None:
        before = await self.admin.failures(stat_prefix) if stat_prefix else None
        version = self.xds.write(name, response)
        if version is not None and stat_prefix is not None:
            await self.admin.wait_version(stat_prefix, version, before)

    def _step(self, name: str) -> None:
        now = time.monotonic()
        self._steps[name] = round(now - self._last, 3)
        self._last = now

    async def _apply(self, new: Config, files: dict[str, dict[str, Any]]) -> None:
        old = self.config
        self._steps: dict[str, float] = {}
        self._last = time.monotonic()
        # 1. Every cluster either config has, with the new definitions.
        union = dataclasses.replace(new, clusters={**old.clusters, **new.clusters})
        _, union_files = await asyncio.to_thread(self._render, union) if set(old.clusters) - set(new.clusters) else (None, files)
        self._step("render")
        await self._write_and_wait(envoy_config.CDS_FILE, union_files[envoy_config.CDS_FILE], "cluster_manager.cds")
        self._step("clusters_added")
        # 2. The workers serve the new listeners (the others keep their routes until Envoy has
        #    taken the new listeners: a refusal there leaves nothing to undo but idle runtimes).
        known = {lst.name for lst in old.listeners}
        added = tuple(lst for lst in new.listeners if lst.name not in known)
        if added:
            await self._apply_workers(dataclasses.replace(old, listeners=old.listeners + added, codecs={**new.codecs, **old.codecs}, clusters=union.clusters))
            self._step("workers_listeners")
        # 3. Routes before the listeners that name them (Envoy refuses a listener whose RDS
        #    file does not exist), then the listeners.
        rds = {name for name in files if name.startswith("rds-")}
        for name in sorted(rds):
            self.xds.write(name, files[name])
        await self._write_and_wait(envoy_config.LDS_FILE, files[envoy_config.LDS_FILE], "listener_manager.lds")
        self._step("listeners")
        # 4. The workers route by the new config.
        await self._apply_workers(new)
        self._step("workers")
        # 5. Clusters no route uses any more.
        await self._write_and_wait(envoy_config.CDS_FILE, files[envoy_config.CDS_FILE], "cluster_manager.cds")
        self._step("clusters_removed")
        self.xds.remove_except(rds)

    async def _restore(self) -> None:
        """Put Envoy's files back as the config in force renders them (a refused step may have
        written some), and the workers on it."""
        _, files = await asyncio.to_thread(self._render, self.config)
        for name in sorted(files, key=lambda n: n == envoy_config.LDS_FILE):
            self.xds.write(name, files[name])
        await self._apply_workers(self.config)


__all__ = [
    "ConfigSource",
    "ConfigWatch",
    "EnvoyAdmin",
    "LiveConfig",
    "Applier",
    "LiveConfigError",
    "Snapshots",
    "XdsDirectory",
    "apply_snapshot",
    "check",
    "read_ack",
    "read_snapshot",
    "write_ack",
    "write_snapshot",
]
