"""The global rate limit filter (``ratelimit``): asks a rate limit service, as Envoy's ratelimit
filters do, whether a request is over its limit.

    filters:
      - name: ratelimit
        config:
          domain: awesomerpc                        # the service's config domain
          descriptors:                              # one descriptor per item, as in the reference
            - {property: cmd, descriptor_key: cmd}  # (cmd, <the request's cmd header>)
            - entries:                              # or a hierarchical descriptor, entries in order
                - {value: awesomerpc, descriptor_key: service}   # a fixed value
                - {property: cmd, descriptor_key: cmd}
          match: {headers: [{name: cmd, prefix: "1"}]}   # optional: a route's match syntax
          rls: {address: "127.0.0.1:8081"}               # or unix:/path/to.sock
          timeout: 100ms                                 # default 100ms
          failure_mode_deny: false                       # default: fail open
          failure_mode_error: OVER_LIMIT                 # the reply when it fails closed

The API is Envoy's ``envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit`` (what
envoyproxy/ratelimit serves), over gRPC with a ``grpc.aio`` channel opened at the first request
and then reused: on the bridge process's event loop in the ext_proc mode; inside Envoy
(bridge.mode inprocess), where Envoy's workers run no event loop, on one loop in a daemon thread,
whose answers go back to the request's worker through its connection's clock
(``call_soon_threadsafe``). A request whose headers the
``match`` accepts (every request, without one) is paused (STOP) while the call runs; the
connection's other requests and other connections go on. The call is bounded by ``timeout`` (the
call's gRPC deadline). Then:

- OK (or UNKNOWN, as Envoy reads it): the request goes on to the next filter;
- OVER_LIMIT: the codec's OVER_LIMIT reply;
- an error or the timeout: the request goes on (fail open), or with ``failure_mode_deny`` gets
  the ``failure_mode_error`` reply (OVER_LIMIT by default, as the reference answers).

A descriptor whose property the request lacks (or has empty) is left out, as Envoy leaves out a
descriptor whose request header is absent; a request left with no descriptor passes without a
call. Every outcome is counted in ``stats`` (``RateLimitStats``). See docs/filters/ratelimit.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import jsonschema

from metabridge._proto.ratelimit_pb2 import RateLimitDescriptor, RateLimitRequest, RateLimitResponse
from metabridge.config import model
from metabridge.config.schema import DURATION, SCHEMA, explain
from metabridge.core.router import compile_header_matches
from metabridge.logs import event
from metabridge.sdk.codec import ErrorType
from metabridge.sdk.filter import Filter, FilterStatus

log = logging.getLogger("metabridge.filters.ratelimit")

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
DEFAULT_TIMEOUT = "100ms"
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
# A channel that lost the service retries its connection quickly, so calls work again within
# about a second of the service coming back (gRPC's default backoff grows to two minutes).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)

# A route's `match` exactly as the config file's schema defines it.
MATCH_SCHEMA: dict[str, Any] = SCHEMA["properties"]["listeners"]["items"]["properties"]["routes"]["items"]["properties"]["match"]
_KEY = {"type": "string", "minLength": 1}
_ENTRY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["descriptor_key"],
    "properties": {"descriptor_key": _KEY, "property": _KEY, "value": _KEY},
    "oneOf": [{"required": ["property"]}, {"required": ["value"]}],
}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["domain", "descriptors", "rls"],
    "properties": {
        "domain": _KEY,
        "descriptors": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "property": _KEY,
                    "descriptor_key": _KEY,
                    "entries": {"type": "array", "minItems": 1, "items": _ENTRY},
                },
                "oneOf": [{"required": ["property", "descriptor_key"]}, {"required": ["entries"]}],
            },
        },
        "match": MATCH_SCHEMA,
        "rls": {"type": "object", "additionalProperties": False, "required": ["address"], "properties": {"address": _KEY}},
        "timeout": {"type": "string", "pattern": DURATION},
        "failure_mode_deny": {"type": "boolean"},
        "failure_mode_error": {"enum": [e.name for e in ErrorType]},
    },
}


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(config)"


def _check(config: Mapping[str, Any]) -> None:
    errors = sorted(jsonschema.Draft202012Validator(CONFIG_SCHEMA).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise ValueError(f"{_path(first.absolute_path)}: {explain(first)}")


def _compile_match(raw_match: Mapping[str, Any] | None):
    """A route-style ``match`` as one predicate on the headers (None: no condition), parsed by
    the config model's header-match parser and compiled by the router's, as a route's is."""
    if not raw_match or not raw_match.get("headers"):
        return None
    headers = model.parse_header_matches(raw_match)
    for i, matcher in enumerate(headers):
        if matcher.kind == "regex":
            try:
                re.compile(matcher.value)
            except re.error as exc:
                raise ValueError(f"match.headers[{i}].regex: invalid regular expression: {exc}") from exc
    return compile_header_matches(headers)


def _check_address(address: str) -> str:
    if address.startswith("unix:"):
        if not address[len("unix:"):]:
            raise ValueError(f"rls.address: {address!r}: 'unix:' needs a socket path")
        return address
    host, _, port = address.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"rls.address: {address!r}: expected HOST:PORT (port 1..65535) or unix:PATH")
    return address


_BACKGROUND: asyncio.AbstractEventLoop | None = None
_BACKGROUND_LOCK = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The one event loop for calls made where none runs (Envoy's workers), in a daemon thread."""
    global _BACKGROUND
    with _BACKGROUND_LOCK:
        if _BACKGROUND is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="metabridge-ratelimit", daemon=True).start()
            _BACKGROUND = loop
        return _BACKGROUND


class RateLimitStats:
    """The filter's counters (plain integers); ``snapshot()`` is what an exporter reads.

    Each request the filter sees is counted once in ``not_matched``, ``no_descriptors`` or
    ``calls`` (a call to the service); each call once in ``ok``, ``over_limit``, ``error``,
    ``timeout`` or ``abandoned`` (the request ended first: its connection closed), and each
    ``error`` or ``timeout`` once more in ``failure_mode_allowed`` or ``failure_mode_denied``.
    ``snapshot()`` has these counters (bridge/metrics.py exports them as
    ``metabridge_filter_ratelimit_<counter>_total``); ``active``, the calls in flight, is a
    gauge and kept out of it, since the exporter makes every snapshot value a counter."""

    COUNTERS = (
        "calls",
        "ok",
        "over_limit",
        "error",
        "timeout",
        "failure_mode_allowed",
        "failure_mode_denied",
        "abandoned",
        "not_matched",
        "no_descriptors",
    )
    __slots__ = (*COUNTERS, "active")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}


class RateLimitFilter(Filter):
    name = "ratelimit"

    def __init__(self, config: Mapping[str, Any], *, listener: str) -> None:
        super().__init__(config, listener=listener)
        _check(config)
        self.domain: str = config["domain"]
        self.address = _check_address(config["rls"]["address"])
        self.timeout = model.parse_duration(config.get("timeout", DEFAULT_TIMEOUT))
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be more than 0, got {config['timeout']!r}")
        self.failure_mode_deny = bool(config.get("failure_mode_deny", False))
        self.failure_error = ErrorType[config.get("failure_mode_error", "OVER_LIMIT")]
        self.match = _compile_match(config.get("match"))
        # Each descriptor: ((descriptor_key, header to read or None, fixed value or None), ...)
        self.descriptors: tuple[tuple[tuple[str, str | None, str | None], ...], ...] = tuple(
            tuple((e["descriptor_key"], e.get("property", "").lower() or None, e.get("value")) for e in (d["entries"] if "entries" in d else (d,)))
            for d in config["descriptors"]
        )
        self.stats = RateLimitStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel = None
        self._rpc = None

    # ---- the call ---------------------------------------------------------------------------

    def build_descriptors(self, headers: Mapping[str, str]) -> list[RateLimitDescriptor]:
        """The descriptors for a request with these headers (those whose properties it has)."""
        out = []
        for entries in self.descriptors:
            descriptor = RateLimitDescriptor()
            for key, prop, value in entries:
                if prop is not None:
                    value = headers.get(prop)
                    if not value:
                        break
                descriptor.entries.add(key=key, value=value)
            else:
                out.append(descriptor)
        return out

    def _method(self):
        """ShouldRateLimit on this process's channel, opened on the running loop at first use."""
        loop = asyncio.get_running_loop()
        if self._rpc is None or self._loop is not loop:
            import grpc  # only bridges that configure the filter load gRPC's client

            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            self._rpc = self._channel.unary_unary(
                METHOD,
                request_serializer=RateLimitRequest.SerializeToString,
                response_deserializer=RateLimitResponse.FromString,
            )
            self._loop = loop
        return self._rpc

    async def close(self) -> None:
        """Close the channel now (filters have no shutdown hook: a dropped filter's channel
        closes when it is garbage-collected)."""
        channel, self._channel, self._rpc = self._channel, None, None
        if channel is not None:
            await channel.close()

    # ---- hooks ------------------------------------------------------------------------------

    def on_request(self, request) -> FilterStatus:
        stats = self.stats
        headers = request.metadata.headers
        if self.match is not None and not self.match(headers):
            stats.not_matched += 1
            return FilterStatus.CONTINUE
        descriptors = self.build_descriptors(headers)
        if not descriptors:
            stats.no_descriptors += 1
            return FilterStatus.CONTINUE
        message = RateLimitRequest(domain=self.domain, descriptors=descriptors)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # inside Envoy: the call runs on the background loop
            future = asyncio.run_coroutine_threadsafe(self._ask(message), background_loop())
            clock = request.connection.clock
            future.add_done_callback(lambda done: clock.call_soon_threadsafe(functools.partial(self._answered, request, done)))
        else:
            future = asyncio.ensure_future(self._decide(request, self._method()(message, timeout=self.timeout)))
        stats.calls += 1
        stats.active += 1
        request.state[self.name] = future
        return FilterStatus.STOP

    def on_complete(self, request) -> None:
        future = request.state.pop(self.name, None)
        if future is not None:
            # The request ended before its answer was applied (its connection closed).
            future.cancel()
            self.stats.abandoned += 1
            self.stats.active -= 1

    async def _ask(self, message) -> RateLimitResponse:
        """On the background loop: the call's answer (or its exception)."""
        call = self._method()(message, timeout=self.timeout)
        try:
            return await call
        except asyncio.CancelledError:  # the request ended: on_complete counted it
            call.cancel()
            raise

    def _answered(self, request, future) -> None:
        """On the request's worker: apply the background call's outcome."""
        if request.state.get(self.name) is not future:  # ended meanwhile (on_complete counted it)
            return
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._settle_failure(request, exc)
        else:
            self._settle(request, future.result())

    async def _decide(self, request, call) -> None:
        try:
            response = await call
        except asyncio.CancelledError:  # by on_complete, which counted it
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - grpc.aio.AioRpcError, or a response that does not parse
            self._settle_failure(request, exc)
            return
        self._settle(request, response)

    def _settle_failure(self, request, exc: BaseException) -> None:
        stats = self.stats
        stats.active -= 1
        request.state.pop(self.name, None)
        code = getattr(exc, "code", None)
        code = code() if callable(code) else None
        timed_out = code is not None and code.name == "DEADLINE_EXCEEDED"
        if timed_out:
            stats.timeout += 1
            why = f"did not answer within {self.timeout * 1000:g} ms"
        else:
            stats.error += 1
            details = exc.details() if hasattr(exc, "details") else str(exc)
            why = f"failed: {code.name if code is not None else type(exc).__name__}: {details}"
        self._failed(request, "timeout" if timed_out else "error", why)

    def _settle(self, request, response) -> None:
        stats = self.stats
        stats.active -= 1
        request.state.pop(self.name, None)
        if response.overall_code == OVER_LIMIT:
            stats.over_limit += 1
            event(log, logging.DEBUG, "ratelimit_over_limit", listener=self.listener, domain=self.domain, request_id=request.metadata.request_id)
            request.local_reply(ErrorType.OVER_LIMIT, f"over the rate limit (domain {self.domain!r})")
        else:
            stats.ok += 1
            request.resume()

    def _failed(self, request, outcome: str, why: str) -> None:
        deny = self.failure_mode_deny
        event(log, logging.DEBUG, "ratelimit_service_failed", listener=self.listener, address=self.address, outcome=outcome, error=why, denied=deny, request_id=request.metadata.request_id)
        if deny:
            self.stats.failure_mode_denied += 1
            request.local_reply(self.failure_error, f"rate limit service at {self.address} {why} (failure_mode_deny)")
        else:
            self.stats.failure_mode_allowed += 1
            request.resume()
