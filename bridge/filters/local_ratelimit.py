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

The rate holds for the whole bridge: with ``bridge.workers: N`` each worker process keeps 1/N of
every bucket (``max_tokens / N`` rounded up to a whole request, ``tokens_per_fill / N`` kept exactly
in 1/N-token units), so N workers that each get their share of the connections admit the
configured rate between them. See docs/filters/local_ratelimit.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema

from metabridge.config import model
from metabridge.config.schema import DURATION, SCHEMA
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
        raise ValueError(f"{_path(first.absolute_path)}: {first.message}")


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
    """One worker's share of a configured bucket, in units of 1/``workers`` token (integers, so
    the share of tokens_per_fill is exact): a request costs ``workers`` units."""

    __slots__ = ("capacity", "fill", "interval", "cost", "units", "last_fill", "where")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float, workers: int, now: float, where: str) -> None:
        self.cost = workers
        self.capacity = -(-max_tokens // workers) * workers  # max_tokens / workers, rounded up to a whole request
        self.fill = tokens_per_fill
        self.interval = fill_interval
        self.units = self.capacity  # starts full
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
        if self.units >= self.cost:
            self.units -= self.cost
            return True
        return False

    @property
    def tokens(self) -> float:
        return self.units / self.cost


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

    def __init__(self, config: Mapping[str, Any], *, listener: str, workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, listener=listener)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected a positive integer, got {workers!r}")
        check_config(config, CONFIG_SCHEMA)
        self.workers = workers
        self.clock = clock
        self.stats = LocalRateLimitStats()
        now = clock()
        self.conditions: list[tuple[Predicate, TokenBucket]] = []
        for i, condition in enumerate(config.get("conditions") or ()):
            where = f"conditions[{i}]"
            predicate = compile_match(condition.get("match"), f"{where}.match")
            self.conditions.append((predicate, self._bucket(condition["token_bucket"], f"{where}.token_bucket", now)))
        default = config.get("token_bucket")
        self.default = self._bucket(default, "token_bucket", now) if default is not None else None

    def _bucket(self, raw: Mapping[str, Any], where: str, now: float) -> TokenBucket:
        interval = model.parse_duration(raw["fill_interval"])
        if interval <= 0:
            raise ValueError(f"{where}.fill_interval: must be more than 0, got {raw['fill_interval']!r}")
        return TokenBucket(raw["max_tokens"], raw.get("tokens_per_fill", 1), interval, self.workers, now, where)

    def bucket_for(self, headers: Mapping[str, str]) -> TokenBucket | None:
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
