"""Prometheus exposition of the bridge's counters (metabridge.stats), the filters' own counters
and the gRPC server's, built only at scrape time.

``BridgeCollector`` reads one process's plain integers and bucket arrays and yields
``metabridge_<name>`` families. With several worker processes each worker hands its families
over as a JSON snapshot (``families_snapshot``) and the supervisor's ``MergedCollector`` sums
them, so one scrape sees the whole bridge (metabridge.admin carries the snapshots).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from metabridge.stats import COUNTERS, GAUGES, MIRROR_COUNTERS, ROUTE_COUNTERS, TIME_BOUNDS_MS

_LOCAL_HELP = {
    "route_not_found": "no route matched",
    "cluster_not_found": "the route's cluster is unknown to Envoy",
    "no_healthy_upstream": "the cluster had no healthy host",
    "bad_response": "the upstream's response could not be decoded (or its mutation applied)",
    "over_limit": "a limit refused the request (a rate limit, a circuit breaker, the connection's limits)",
    "timeout": "no response within the request timeout (or no tunnel within tunnel_setup_timeout)",
    "unspecified": "any other failure (a connect failure, a lost tunnel, a filter's own error)",
}

# What each family means; docs/observability.md lists the same.
HELP = {
    "request": "requests decoded (every message kind, heartbeats included)",
    "request_decoding_error": "requests that could not be decoded (the connection is closed)",
    "request_decoding_success": "frames decoded from clients",
    "request_oneway": "oneway requests",
    "request_twoway": "two-way requests",
    "request_heartbeat": "heartbeats answered by the bridge",
    "request_stream": "streams opened (STREAM_INIT)",
    "request_stream_unknown": "stream frames for no open stream",
    "request_overflow": "requests answered OVER_LIMIT because the connection was over its limits",
    "request_redispatched": "requests moved to another host's tunnel after a failed connect",
    "response_decoding_error": "upstream responses that could not be decoded",
    "response_unmatched": "upstream responses that matched no request in flight",
    "idle_timeout": "connections closed by the listener's idle_timeout",
    "cx_destroy_local_with_active_rq": "connections the bridge closed with requests in flight",
    "cx_destroy_remote_with_active_rq": "connections the client closed with requests in flight",
    "downstream_cx_total": "client connections",
    "ext_proc_stream_without_request": "ext_proc streams that ended before carrying a request",
    "downstream_cx_closed_bad_request": "connections closed after a bad request",
    "downstream_cx_frame_timeout": "connections closed because a frame stayed partial past frame_timeout",
    "downstream_paused_in_flight": "times decoding paused at max_requests_in_flight",
    "downstream_paused_upstream_full": "times decoding paused because a tunnel's queue was full",
    "downstream_cx_overflow": "connections closed over bridge.max_buffered_bytes",
    "downstream_cx_drained": "connections ended by Envoy's graceful drain",
    "codec_error": "exceptions raised by the codec (contained)",
    "filter_error": "exceptions raised by filters (contained)",
    "internal_error": "bridge bugs contained by closing the connection",
    "tunnel_opened": "upstream CONNECT tunnels opened",
    "tunnel_failed": "upstream CONNECT tunnels that failed",
    "tunnel_stream_waited": "tunnels that waited for a stream (HCM's SETTINGS_MAX_CONCURRENT_STREAMS reached)",
    "request_active": "two-way requests and streams in flight",
    "downstream_cx_active": "client connections open",
    "response": "upstream responses passed to the client (stream frames included)",
    "response_success": "responses the codec reports as successful",
    "response_error": "responses the codec reports as errors (the upstream's own error replies)",
    "request_retry": "retries by the route's retry_policy",
    "mirror_sent": "copies sent to a mirror cluster by the route's mirror policy",
    "mirror_response": "mirror copies answered (the answer is dropped)",
    "mirror_failed": "mirror copies that could not be sent or got no answer",
    "mirror_abandoned": "mirror copies still unanswered when the client connection ended (its tunnels end with it)",
    "request_time_ms": "time from decoding a two-way request to queueing its reply (response or local reply), milliseconds",
    "rate_limited": "requests refused by a rate-limit filter (local_ratelimit or ratelimit)",
    **{f"local_response_{kind}": f"local replies: {text}" for kind, text in _LOCAL_HELP.items()},
}

_ROUTE_LABELS = ["listener", "route", "cluster"]
_BOUNDS = tuple(f"{bound:g}" for bound in TIME_BOUNDS_MS) + ("+Inf",)
# Filter counters that count what each filter refused for a rate limit.
_RATE_LIMITED = {"local_ratelimit": ("rate_limited",), "ratelimit": ("over_limit",)}


def _help(name: str) -> str:
    return HELP.get(name, name.replace("_", " "))


class BridgeCollector(Collector):
    """One process's families, from its listeners' runtimes (name -> ListenerRuntime)."""

    def __init__(self, runtimes, grpc_stats=None) -> None:
        self._runtimes = runtimes
        self._grpc_stats = grpc_stats  # the gRPC server's transport counters (GrpcServer.stats)

    def collect(self) -> Iterable[Metric]:
        runtimes = list(self._runtimes.items())
        snapshots = [(name, runtime.stats.snapshot()) for name, runtime in runtimes]
        for counter in COUNTERS:
            family = CounterMetricFamily(f"metabridge_{counter}", _help(counter), labels=["listener"])
            for name, snapshot in snapshots:
                family.add_metric([name], snapshot[counter])
            yield family
        for gauge in GAUGES:
            family = GaugeMetricFamily(f"metabridge_{gauge}", _help(gauge), labels=["listener"])
            for name, snapshot in snapshots:
                family.add_metric([name], snapshot[gauge])
            yield family
        yield from self._route_families(runtimes)
        yield from self._filter_families(runtimes)
        if self._grpc_stats is not None:
            for counter, value in self._grpc_stats.snapshot().items():
                family = CounterMetricFamily(f"metabridge_grpc_{counter}", f"the bridge's gRPC server: {counter.replace('_', ' ')}")
                family.add_metric([], value)
                yield family

    def _route_families(self, runtimes) -> Iterable[Metric]:
        # list(): the event loop may add a key while this runs in the scrape thread.
        routes = [(name, key, stats) for name, runtime in runtimes for key, stats in list(runtime.stats.routes.items())]
        mirrors = [(name, key, stats) for name, runtime in runtimes for key, stats in list(runtime.stats.mirrors.items())]
        for counters, entries in ((ROUTE_COUNTERS, routes), (MIRROR_COUNTERS, mirrors)):
            families = {c: CounterMetricFamily(f"metabridge_{c}", _help(c), labels=_ROUTE_LABELS) for c in counters}
            for name, (route, cluster), stats in entries:
                labels = [name, route, cluster]
                for counter, value in stats.snapshot().items():
                    families[counter].add_metric(labels, value)
            yield from families.values()
        histogram = HistogramMetricFamily("metabridge_request_time_ms", _help("request_time_ms"), labels=_ROUTE_LABELS)
        for name, (route, cluster), stats in routes:
            counts, total, buckets = list(stats.buckets), 0, []
            for bound, count in zip(_BOUNDS, counts):
                total += count
                buckets.append((bound, total))
            histogram.add_metric([name, route, cluster], buckets, stats.sum_ms)
        yield histogram

    def _filter_families(self, runtimes) -> Iterable[Metric]:
        """Each filter's own counters (a ``stats`` with ``snapshot()``), as
        ``metabridge_filter_<filter>_<counter>_total{listener, index}`` (a gauge, without
        ``_total``, for a name with "active" in it); ``index`` is the filter's place in the
        chain (a listener may list a filter twice). Also ``metabridge_rate_limited_total``."""
        families: dict[str, Metric] = {}
        limited = CounterMetricFamily("metabridge_rate_limited", _help("rate_limited"), labels=["listener"])
        for name, runtime in runtimes:
            refused = 0
            for index, current in enumerate(runtime.chain.filters):
                stats = getattr(current, "stats", None)
                if stats is None or not callable(getattr(stats, "snapshot", None)):
                    continue
                snapshot = stats.snapshot()
                refused += sum(snapshot.get(counter, 0) for counter in _RATE_LIMITED.get(current.name, ()))
                for counter, value in snapshot.items():
                    metric = f"metabridge_filter_{current.name}_{counter}"
                    family = families.get(metric)
                    if family is None:
                        kind = GaugeMetricFamily if "active" in counter else CounterMetricFamily
                        family = families[metric] = kind(metric, f"{current.name} filter: {counter.replace('_', ' ')}", labels=["listener", "index"])
                    family.add_metric([name, str(index)], value)
            limited.add_metric([name], refused)
        yield limited
        yield from families.values()


ListenerStatsCollector = BridgeCollector  # its earlier name


def families_snapshot(collector: Collector) -> list:
    """The collector's families as JSON-able lists: [name, type, help, [[sample, labels, value]]]."""
    return [
        [family.name, family.type, family.documentation, [[s.name, s.labels, s.value] for s in family.samples]]
        for family in collector.collect()
    ]


class MergedCollector(Collector):
    """The sum of every worker's families, for the supervisor's /metrics.

    ``fetch()`` returns, per worker slot, its snapshot (``{"pid": ..., "families": [...]}``) or
    None when the worker did not answer. A worker that does not answer keeps counting with its
    last snapshot; when a slot's pid changes (the worker was restarted with fresh counters), the
    old process's counters and histograms are carried over, so the sums never go backwards
    (Prometheus would read a drop as a counter reset). Gauges are the live workers' only.
    """

    def __init__(self, fetch: Callable[[], list[dict | None]]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._last: dict[int, dict] = {}  # slot -> its last snapshot
        self._carried: dict[tuple, float] = {}  # (family, type, help, sample, labels) -> value

    def collect(self) -> Iterable[Metric]:
        replies = self._fetch()
        with self._lock:
            for slot, reply in enumerate(replies):
                if reply is None:
                    continue
                last = self._last.get(slot)
                if last is not None and last["pid"] != reply["pid"]:
                    for key, value in _samples(last["families"], counting_only=True):
                        self._carried[key] = self._carried.get(key, 0.0) + value
                self._last[slot] = reply
            totals: dict[tuple, float] = {}
            for slot in range(len(replies)):
                snapshot = self._last.get(slot)
                if snapshot is None:
                    continue
                gauges_live = replies[slot] is not None
                for key, value in _samples(snapshot["families"], counting_only=not gauges_live):
                    totals[key] = totals.get(key, 0.0) + value
            for key, value in self._carried.items():
                totals[key] = totals.get(key, 0.0) + value
        families: dict[str, Metric] = {}
        for (name, kind, documentation, sample, labels), value in totals.items():
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, documentation, kind)
            family.add_sample(sample, dict(labels), value)
        yield from families.values()


def _samples(families: list, counting_only: bool):
    for name, kind, documentation, samples in families:
        if counting_only and kind == "gauge":
            continue
        for sample, labels, value in samples:
            yield (name, kind, documentation, sample, tuple(sorted(labels.items()))), value
