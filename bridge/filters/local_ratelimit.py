"""The local rate limit filter (``local_ratelimit``): token buckets kept in the bridge.

    filters:
      - name: local_ratelimit
        config:
          token_bucket: {max_tokens: 100, tokens_per_fill: 100, fill_interval: 1s}   # optional default
          conditions:                                 # optional; the first that matches wins
            - match: {headers: [{name: cmd, exact: "2"}]}   # a route's match syntax
              token_bucket: {max_tokens: 10, tokens_per_fill: 10, fill_interval: 1s}

The reference's semantics (MetaProtocol's local rate limit): a request takes a token from the
bucket of the first condition whose match holds, else from the default bucket; with no default
bucket a request no condition matches is not limited. A request that finds its bucket empty gets
the codec's OVER_LIMIT reply. Buckets start full and refill by ``tokens_per_fill`` every whole
``fill_interval`` (at most ``max_tokens``), computed from the clock when a request arrives: no
timers.

The rate holds for the whole bridge: with ``bridge.workers: N`` (N > 1) the worker processes
share each bucket. Its state (tokens, time of the last fill) lives in a small file on tmpfs that
every worker maps, updated under an flock, so one busy connection on one worker can use the
whole rate, as with one worker. See docs/filters/local_ratelimit.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import multiprocessing
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema

from metabridge.config import model
from metabridge.config.schema import DURATION, SCHEMA, explain
from metabridge.core.router import Predicate, compile_header_matches
from metabridge.sdk.codec import ErrorType
from metabridge.sdk.filter import Filter, FilterStatus

# A route's `match` (headers: exact | prefix | suffix | regex | present, invert), as the config
# file's schema defines it, so a filter's match is checked exactly as a route's is.
MATCH_SCHEMA: dict[str, Any] = SCHEMA["properties"]["listeners"]["items"]["properties"]["routes"]["items"]["properties"]["match"]

_TOKEN_BUCKET = {
    "type": "object",
    "additionalProperties": False,
    "required": ["max_tokens", "fill_interval"],
    "properties": {
        "max_tokens": {"type": "integer", "minimum": 1},
        "tokens_per_fill": {"type": "integer", "minimum": 1},
        "fill_interval": {"type": "string", "pattern": DURATION},
    },
}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "token_bucket": _TOKEN_BUCKET,
        "conditions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["token_bucket"],
                "properties": {"match": MATCH_SCHEMA, "token_bucket": _TOKEN_BUCKET},
            },
        },
    },
}


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(config)"


def check_config(config: Mapping[str, Any], schema: dict[str, Any]) -> None:
    """Raise ValueError naming the first offending field (``conditions[0].token_bucket.max_tokens: ...``)."""
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise ValueError(f"{_path(first.absolute_path)}: {explain(first)}")


def compile_match(raw_match: Mapping[str, Any] | None, where: str) -> Predicate:
    """A route-style ``match`` (already checked against MATCH_SCHEMA) as one predicate on the
    headers. Parsed by the config model's route parser and compiled by the router's matcher
    compiler, so a filter's match and a route's cannot drift apart."""
    headers = model.parse_header_matches(raw_match)
    for i, matcher in enumerate(headers):
        if matcher.kind == "regex":
            try:
                re.compile(matcher.value)
            except re.error as exc:  # named as the model names a route's bad regex
                raise ValueError(f"{where}.headers[{i}].regex: invalid regular expression: {exc}") from exc
    return compile_header_matches(headers)


class TokenBucket:
    """A bucket kept in this process (one bridge worker)."""

    __slots__ = ("capacity", "fill", "interval", "units", "last_fill", "where")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float, where: str) -> None:
        self.capacity = max_tokens
        self.fill = tokens_per_fill
        self.interval = fill_interval
        self.units = max_tokens  # starts full
        self.last_fill = now
        self.where = where

    def take(self, now: float) -> bool:
        """Refill for the whole intervals since the last fill, then take a token if there is one."""
        elapsed = now - self.last_fill
        if elapsed >= self.interval:
            fills = int(elapsed // self.interval)
            self.last_fill += fills * self.interval
            units = self.units + fills * self.fill
            self.units = units if units < self.capacity else self.capacity
        if self.units >= 1:
            self.units -= 1
            return True
        return False

    @property
    def tokens(self) -> int:
        return self.units


# A shared bucket's file: a marker, the tokens left, the time of the last fill (time.monotonic(),
# which is the same clock in every process of the machine).
_SHARED = struct.Struct("<8sqd")
_SHARED_MAGIC = b"mbbucket"


_SHARED_PREFIX = "metabridge-buckets-"


def _shared_base() -> Path:
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def shared_dir_for(owner_pid: int) -> Path:
    """Where the buckets shared by the workers of the bridge whose supervisor is ``owner_pid`` live."""
    return _shared_base() / f"{_SHARED_PREFIX}{owner_pid}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_shared_buckets() -> list[Path]:
    """Delete the bucket directories of supervisors no longer running (one killed with SIGKILL
    cannot remove its own); returns those removed. Another user's are left alone."""
    removed = []
    for path in _shared_base().glob(f"{_SHARED_PREFIX}*"):
        pid = path.name[len(_SHARED_PREFIX):]
        if not pid.isdigit() or _running(int(pid)) or path.stat().st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def default_shared_dir() -> Path:
    """This bridge's shared buckets: a worker process shares with its supervisor's other workers."""
    parent = multiprocessing.parent_process()
    return shared_dir_for(parent.pid if parent is not None and parent.pid else os.getpid())


def remove_shared_buckets(owner_pid: int) -> None:
    """Delete the shared buckets of the bridge supervised by ``owner_pid`` (at its stop)."""
    shutil.rmtree(shared_dir_for(owner_pid), ignore_errors=True)


class SharedTokenBucket:
    """A bucket shared by the bridge's worker processes: its state is a file on tmpfs that each
    worker maps, read and written under an exclusive flock (one lock and one unlock system call
    per request). The file is named after the listener, the bucket's place in the config and its
    numbers, so every worker finds the same one, a worker restarted or reloaded with the same
    bucket carries on with its tokens, and a changed bucket gets a new, full one. It is opened at
    the first request: building the filter (``metabridge validate``) creates nothing."""

    __slots__ = ("capacity", "fill", "interval", "where", "path", "_fd", "_map")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float, where: str, path: Path) -> None:
        self.capacity = max_tokens
        self.fill = tokens_per_fill
        self.interval = fill_interval
        self.where = where
        self.path = path
        self._fd = -1
        self._map: mmap.mmap | None = None

    def _attach(self, now: float) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _SHARED.size:  # the first worker here: a full bucket
                    os.ftruncate(fd, _SHARED.size)
                    os.pwrite(fd, _SHARED.pack(_SHARED_MAGIC, self.capacity, now), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, _SHARED.size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def take(self, now: float) -> bool:
        if self._map is None:
            self._attach(now)
        fd, view = self._fd, self._map
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            _, units, last_fill = _SHARED.unpack_from(view)
            elapsed = now - last_fill
            if elapsed >= self.interval:
                fills = int(elapsed // self.interval)
                last_fill += fills * self.interval
                units = min(units + fills * self.fill, self.capacity)
            taken = units >= 1
            _SHARED.pack_into(view, 0, _SHARED_MAGIC, units - 1 if taken else units, last_fill)
            return taken
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @property
    def tokens(self) -> int:
        """Tokens left as of the last request (a full bucket before the first)."""
        if self._map is None:
            return self.capacity
        return _SHARED.unpack_from(self._map)[1]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            os.close(self._fd)
            self._map, self._fd = None, -1


class LocalRateLimitStats:
    """The filter's counters (plain integers); ``snapshot()`` is what an exporter reads."""

    __slots__ = ("ok", "rate_limited", "unlimited")

    def __init__(self) -> None:
        self.ok = 0  # took a token
        self.rate_limited = 0  # found its bucket empty: OVER_LIMIT reply
        self.unlimited = 0  # no condition matched and there is no default bucket

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class LocalRateLimitFilter(Filter):
    name = "local_ratelimit"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        listener: str,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        shared_dir: str | os.PathLike | None = None,
    ) -> None:
        """``workers``: the bridge's worker processes; with more than one, every bucket is shared
        by them through files in ``shared_dir`` (default: this bridge's, see default_shared_dir)."""
        super().__init__(config, listener=listener)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected a positive integer, got {workers!r}")
        check_config(config, CONFIG_SCHEMA)
        self.workers = workers
        self.clock = clock
        self.shared_dir = None if workers == 1 else Path(shared_dir) if shared_dir is not None else default_shared_dir()
        self.stats = LocalRateLimitStats()
        now = clock()
        self.conditions: list[tuple[Predicate, TokenBucket | SharedTokenBucket]] = []
        for i, condition in enumerate(config.get("conditions") or ()):
            where = f"conditions[{i}]"
            predicate = compile_match(condition.get("match"), f"{where}.match")
            self.conditions.append((predicate, self._bucket(condition["token_bucket"], f"{where}.token_bucket", now)))
        default = config.get("token_bucket")
        self.default = self._bucket(default, "token_bucket", now) if default is not None else None

    def _bucket(self, raw: Mapping[str, Any], where: str, now: float) -> TokenBucket | SharedTokenBucket:
        interval = model.parse_duration(raw["fill_interval"])
        if interval <= 0:
            raise ValueError(f"{where}.fill_interval: must be more than 0, got {raw['fill_interval']!r}")
        max_tokens, per_fill = raw["max_tokens"], raw.get("tokens_per_fill", 1)
        if self.shared_dir is None:
            return TokenBucket(max_tokens, per_fill, interval, now, where)
        name = hashlib.sha256(repr((self.listener, where, max_tokens, per_fill, interval)).encode()).hexdigest()[:24]
        return SharedTokenBucket(max_tokens, per_fill, interval, where, self.shared_dir / f"{name}.bucket")

    def bucket_for(self, headers: Mapping[str, str]) -> TokenBucket | SharedTokenBucket | None:
        """The bucket a request with these headers takes its token from (None: not limited)."""
        for predicate, bucket in self.conditions:
            if predicate(headers):
                return bucket
        return self.default

    def on_request(self, request) -> FilterStatus:
        bucket = self.bucket_for(request.metadata.headers)
        if bucket is None:
            self.stats.unlimited += 1
            return FilterStatus.CONTINUE
        if bucket.take(self.clock()):
            self.stats.ok += 1
            return FilterStatus.CONTINUE
        self.stats.rate_limited += 1
        request.local_reply(ErrorType.OVER_LIMIT, f"local rate limit ({bucket.where}) exceeded on listener {self.listener!r}")
        return FilterStatus.STOP
