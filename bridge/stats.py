"""The bridge's counters, with the reference's names (MetaProtocol's stats).

Plain integers on the hot path (an attribute increment); metabridge.metrics turns them into
Prometheus families only when scraped. Three scopes:

- ``ListenerStats``: per listener (decoding, request kinds, connections, limits, failures);
- ``RouteStats``: per (listener, route, cluster), recorded when a request is answered: its
  response or local reply by type, its retries, and ``request_time_ms`` as a bucket array;
- ``MirrorStats``: per (listener, route, mirror cluster), the copies a route's mirror policy sent.

A request answered before it had a route (no route matched, a filter refused it) counts under
route "" and cluster "".
"""

from __future__ import annotations

from bisect import bisect_left

from metabridge.sdk.codec import ErrorType

COUNTERS = (
    "request",
    "request_decoding_error",
    "request_decoding_success",
    "request_oneway",
    "request_twoway",
    "request_heartbeat",
    "request_stream",
    "request_stream_unknown",
    "request_overflow",
    "request_redispatched",
    "response_decoding_error",
    "response_unmatched",
    "idle_timeout",
    "cx_destroy_local_with_active_rq",
    "cx_destroy_remote_with_active_rq",
    "downstream_cx_total",
    "ext_proc_stream_without_request",
    "downstream_cx_closed_bad_request",
    "downstream_cx_frame_timeout",
    "downstream_paused_in_flight",
    "downstream_paused_upstream_full",
    "downstream_cx_overflow",
    "downstream_cx_drained",
    "codec_error",
    "filter_error",
    "internal_error",
    "tunnel_opened",
    "tunnel_failed",
    "tunnel_stream_waited",
)

GAUGES = ("request_active", "downstream_cx_active")

LOCAL_RESPONSES = tuple(f"local_response_{kind.value}" for kind in ErrorType)
ROUTE_COUNTERS = ("response", "response_success", "response_error", *LOCAL_RESPONSES, "request_retry")
MIRROR_COUNTERS = ("mirror_sent", "mirror_response", "mirror_failed", "mirror_abandoned")

# request_time_ms bucket bounds (Prometheus ``le``, inclusive), from well under a millisecond (the
# bridge's own share) to a minute; one more bucket past the last is +Inf.
TIME_BOUNDS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0)


class ListenerStats:
    __slots__ = COUNTERS + GAUGES + ("routes", "mirrors")

    def __init__(self) -> None:
        for name in COUNTERS + GAUGES:
            setattr(self, name, 0)
        self.routes: dict[tuple[str, str], RouteStats] = {}
        self.mirrors: dict[tuple[str, str], MirrorStats] = {}

    def route(self, route: str, cluster: str) -> RouteStats:
        """The (route, cluster) stats, made on first use (the keys come from the config)."""
        found = self.routes.get((route, cluster))
        if found is None:
            found = self.routes[(route, cluster)] = RouteStats()
        return found

    def mirror(self, route: str, cluster: str) -> MirrorStats:
        found = self.mirrors.get((route, cluster))
        if found is None:
            found = self.mirrors[(route, cluster)] = MirrorStats()
        return found

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS + GAUGES}


def _listener_total(name: str, scope: str) -> property:
    """A route-scoped counter summed over the listener's routes (read-only; for tests and logs)."""
    return property(lambda self: sum(getattr(stats, name) for stats in list(getattr(self, scope).values())))


for _name in ROUTE_COUNTERS:
    setattr(ListenerStats, _name, _listener_total(_name, "routes"))
for _name in MIRROR_COUNTERS:
    setattr(ListenerStats, _name, _listener_total(_name, "mirrors"))


class RouteStats:
    __slots__ = ROUTE_COUNTERS + ("buckets", "sum_ms")

    def __init__(self) -> None:
        for name in ROUTE_COUNTERS:
            setattr(self, name, 0)
        self.buckets = [0] * (len(TIME_BOUNDS_MS) + 1)
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        """One answered request's time (Connection inlines this on the response path)."""
        self.buckets[bisect_left(TIME_BOUNDS_MS, ms)] += 1
        self.sum_ms += ms

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ROUTE_COUNTERS}


class MirrorStats:
    __slots__ = MIRROR_COUNTERS

    def __init__(self) -> None:
        for name in MIRROR_COUNTERS:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MIRROR_COUNTERS}
